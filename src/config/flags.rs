//! The flags and README.md's configuration table, both generated from `SETTINGS`.

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};

use super::settings::{Form, Scope, Setting, Slot, SETTINGS};
use super::RawSettings;

/// The flags every command takes (`Scope::Global`), as a layer of raw settings.
#[derive(Clone, Debug, Default)]
pub struct GlobalFlags(pub RawSettings);

/// The flags only `serve` takes (`Scope::Serve`), as a layer of raw settings.
#[derive(Clone, Debug, Default)]
pub struct ServeFlags(pub RawSettings);

impl RawSettings {
    /// Takes every value `other` sets, keeping the others.
    pub fn overlay(&mut self, mut other: RawSettings) {
        for setting in SETTINGS {
            match ((setting.slot)(self), (setting.slot)(&mut other)) {
                (Slot::Text(mine), Slot::Text(theirs)) if theirs.is_some() => *mine = theirs.take(),
                (Slot::Switch(mine), Slot::Switch(theirs)) if theirs.is_some() => *mine = theirs.take(),
                _ => {}
            }
        }
    }
}

/// `--help`'s line: the help as a sentence in plain text (without Markdown's backquotes), the
/// default and the variables. A help that starts with a literal (`` `sqlite://PATH` ``) keeps its case.
fn flag_help(setting: &Setting) -> String {
    let help = setting.help_with_range();
    let mut chars = help.chars();
    let capitalized: String = chars.next().map(|c| c.to_ascii_uppercase()).into_iter().chain(chars).collect();
    let (help, capitalized) = (help.replace('`', ""), capitalized.replace('`', ""));
    let sentence = match (setting.form, setting.default) {
        (Form::Switch, Some("true")) => format!("Do not {help}"),
        (Form::Switch, _) => capitalized,
        (_, Some(default)) => format!("{capitalized} (default {default})"),
        (_, None) => capitalized,
    };
    format!("{sentence} [env: {}]", env_names(setting).join(", "))
}

/// The setting's variables, the prefixed one first.
fn env_names(setting: &Setting) -> Vec<String> {
    std::iter::once(setting.env_name()).chain(setting.plain_env.map(str::to_owned)).collect()
}

fn add_flags(mut command: Command, scope: Scope) -> Command {
    // `--help` lists the flags in the table's order, every command's among `serve`'s.
    for (order, setting) in SETTINGS.iter().enumerate().filter(|(_, setting)| setting.scope == scope) {
        let flag = setting.flag();
        let arg = Arg::new(setting.name).long(flag[2..].to_owned()).help(flag_help(setting));
        let mut arg = arg.display_order(order + 1);
        arg = match setting.form {
            Form::Switch => arg.action(ArgAction::SetTrue),
            _ => arg.value_name(setting.value_name).value_parser(clap::builder::ValueParser::string()),
        };
        command = command.arg(arg.global(scope == Scope::Global));
    }
    command
}

fn read_flags(matches: &ArgMatches, scope: Scope) -> RawSettings {
    let mut raw = RawSettings::default();
    for setting in SETTINGS.iter().filter(|setting| setting.scope == scope) {
        match (setting.slot)(&mut raw) {
            Slot::Text(slot) => *slot = matches.get_one::<String>(setting.name).cloned(),
            // The flag says the opposite of the default (see `Setting::flag`).
            Slot::Switch(slot) => *slot = matches.get_flag(setting.name).then_some(setting.default != Some("true")),
        }
    }
    raw
}

macro_rules! flags_of_scope {
    ($flags:ident, $scope:expr) => {
        impl FromArgMatches for $flags {
            fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
                Ok($flags(read_flags(matches, $scope)))
            }

            fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
                self.0.overlay(read_flags(matches, $scope));
                Ok(())
            }
        }

        impl Args for $flags {
            fn augment_args(command: Command) -> Command {
                add_flags(command, $scope)
            }

            fn augment_args_for_update(command: Command) -> Command {
                add_flags(command, $scope)
            }
        }
    };
}

flags_of_scope!(GlobalFlags, Scope::Global);
flags_of_scope!(ServeFlags, Scope::Serve);

/// README.md's configuration table, as `redirect-sessions settings` prints it.
pub fn markdown_table() -> String {
    let mut table = String::from(
        "| setting (TOML key) | environment variable | flag | default | meaning |\n| --- | --- | --- | --- | --- |\n",
    );
    for setting in SETTINGS {
        let env = env_names(setting).iter().map(|name| format!("`{name}`")).collect::<Vec<_>>().join(", ");
        let scope = match setting.scope {
            Scope::Global => " (every command)",
            Scope::Serve => "",
        };
        let default = setting.default.map_or("none".to_owned(), |default| format!("`{default}`"));
        table.push_str(&format!(
            "| `{}` | {env} | `{}`{scope} | {default} | {} |\n",
            setting.name,
            setting.flag(),
            setting.help_with_range()
        ));
    }
    table
}

//! The one declaration per setting (docs/DESIGN.md "Settings: one declaration each"): the TOML
//! keys, variables, flags and README.md's table all follow it.

use clap::{Args, Command, FromArgMatches};

use super::*;
use crate::config::{markdown_table, Form, GlobalFlags, ServeFlags, SETTINGS};

#[test]
fn the_readme_configuration_table_is_the_generated_one() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
    let section = readme.split("\n## Configuration\n").nth(1).expect("README.md has a Configuration section");
    let section = section.split("\n## ").next().unwrap_or_default();
    let table: String = section.lines().filter(|line| line.starts_with('|')).map(|line| format!("{line}\n")).collect();
    assert!(
        table == markdown_table(),
        "README.md's configuration table differs from the declaration in src/config/settings.rs; \
         replace it with the output of `redirect-sessions settings`:\n{}",
        markdown_table()
    );
}

#[test]
fn every_declaration_is_complete_and_fits_a_table_cell() {
    for setting in SETTINGS {
        let help = setting.help;
        assert!(!help.is_empty() && !help.ends_with('.') && !help.contains('|'), "{}: {help:?}", setting.name);
        assert_eq!(setting.form == Form::Switch, setting.value_name.is_empty(), "{}", setting.name);
        assert_eq!(SETTINGS.iter().filter(|other| other.name == setting.name).count(), 1, "{}", setting.name);
    }
}

/// Every declared default, written the way a layer would give it.
fn defaults_as_text() -> Vec<(&'static str, Form, String)> {
    let listen = Config::defaults().listen.to_string();
    SETTINGS
        .iter()
        .filter_map(|setting| Some((setting.name, setting.form, setting.default?.replace("<listen>", &listen))))
        .collect()
}

#[test]
fn a_file_writing_every_default_under_its_declared_key_gives_the_defaults() {
    let toml: String = defaults_as_text()
        .into_iter()
        .map(|(name, form, text)| match form {
            Form::Switch => format!("{name} = {text}\n"),
            _ => format!("{name} = {text:?}\n"),
        })
        .collect();
    let file = TempToml::new(&toml);
    let config = load(Some(&file), &env(&[]), &no_flags());
    assert_eq!(format!("{config:?}"), format!("{:?}", Config::defaults()));
}

#[test]
fn variables_of_every_declared_name_give_the_defaults() {
    let vars: HashMap<String, String> = defaults_as_text()
        .into_iter()
        .map(|(name, _, text)| (crate::config::settings::find(name).env_name(), text))
        .collect();
    assert!(vars.contains_key("REDIRECT_SESSIONS_WEBHOOK_CONCURRENCY_PER_SUBSCRIPTION"));
    let config = load(None, &vars, &no_flags());
    assert_eq!(format!("{config:?}"), format!("{:?}", Config::defaults()));
}

fn command() -> Command {
    let global = GlobalFlags::augment_args(Command::new("redirect-sessions"));
    global.subcommand(ServeFlags::augment_args(Command::new("serve")))
}

#[test]
fn flags_of_every_declared_name_give_the_defaults_and_switch_flags_flip_them() {
    let mut args = vec!["redirect-sessions".to_owned(), "serve".to_owned()];
    for (name, form, text) in defaults_as_text() {
        if form != Form::Switch {
            args.extend([crate::config::settings::find(name).flag(), text]);
        }
    }
    let matches = command().try_get_matches_from(&args).expect("every flag is accepted");
    let mut flags = GlobalFlags::from_arg_matches(&matches).unwrap().0;
    let serve = matches.subcommand_matches("serve").unwrap();
    flags.overlay(ServeFlags::from_arg_matches(serve).unwrap().0);
    assert_eq!(format!("{:?}", load(None, &env(&[]), &flags)), format!("{:?}", Config::defaults()));

    let switches = ["--allow-private-callbacks", "--no-expiry-sweep", "--no-webhook-dispatcher"];
    let matches = command().try_get_matches_from(["redirect-sessions", "serve"].iter().chain(&switches)).unwrap();
    let flags = ServeFlags::from_arg_matches(matches.subcommand_matches("serve").unwrap()).unwrap().0;
    let config = load(None, &env(&[]), &flags);
    assert!(config.allow_private_callbacks && !config.allow_http_redirect_urls);
    assert!(!config.expiry_sweep && !config.webhook_dispatcher);
}

#[test]
fn serve_help_lists_every_flag_with_its_help_and_default() {
    let error = command().try_get_matches_from(["redirect-sessions", "serve", "--help"]).unwrap_err();
    assert_eq!(error.kind(), clap::error::ErrorKind::DisplayHelp);
    let help = error.to_string();
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        help.contains("--session-ttl <DURATION> Time to live of a session, e.g. 15m or 2s; from 1s to 24h"),
        "{help}"
    );
    assert!(help.contains("(default 15m)"), "{help}");
    assert!(help.contains("--no-expiry-sweep Do not run the expiry sweep in this instance"), "{help}");
    assert!(help.contains("--database-url <URL> sqlite://PATH"), "{help}");
    for setting in SETTINGS {
        assert!(help.contains(&format!("{} ", setting.flag())), "{} missing from:\n{help}", setting.flag());
    }
}

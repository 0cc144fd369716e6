//! Which layer wins, and how errors name the setting and its layer.

use super::*;

#[test]
fn defaults_are_as_documented() {
    let config = Config::defaults();
    assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
    let path = PathBuf::from("./data/redirect-sessions.db");
    assert_eq!(config.database_url, DatabaseUrl::Sqlite { path });
    assert_eq!(config.public_base(), "http://127.0.0.1:8080");
    assert_eq!(config.session_ttl, secs(15 * 60));
    let schedule = [5, 300, 1800, 7200, 18000, 36000, 36000].map(secs);
    assert_eq!(config.webhook_retry_schedule, schedule);
    assert_eq!(config.webhook_timeout, secs(10));
    assert!(!config.allow_private_callbacks && !config.allow_http_redirect_urls);
    assert_eq!((config.rate_limit_per_key, config.rate_limit_per_ip), (1000, 0));
    assert_eq!(config.metrics_listen, None);
    assert!(config.expiry_sweep && config.webhook_dispatcher);
    assert_eq!(config.log, "info");
    assert_eq!(config.otp_sender, OtpSender::Log);
}

#[test]
fn loading_nothing_gives_the_defaults() {
    let config = load(None, &env(&[]), &no_flags());
    assert_eq!(format!("{config:?}"), format!("{:?}", Config::defaults()));
}

#[test]
fn public_url_defaults_to_the_final_listen_address() {
    let flags = RawSettings { listen: Some("[::1]:9000".into()), ..no_flags() };
    assert_eq!(load(None, &env(&[]), &flags).public_base(), "http://[::1]:9000");
}

#[test]
fn public_base_drops_the_trailing_slash_but_keeps_the_path() {
    let flags = RawSettings { public_url: Some("https://pay.example.com/r/".into()), ..no_flags() };
    assert_eq!(load(None, &env(&[]), &flags).public_base(), "https://pay.example.com/r");
}

#[test]
fn the_file_overrides_defaults() {
    let file = TempToml::new(
        "session_ttl = \"1h\"\nexpiry_sweep = false\nrate_limit_per_ip = 5\n\
         webhook_retry_schedule = [\"1s\", \"2m\"]\nmetrics_listen = \"127.0.0.1:9100\"\n",
    );
    let config = load(Some(&file), &env(&[]), &no_flags());
    assert_eq!(config.session_ttl, secs(3600));
    assert!(!config.expiry_sweep);
    assert_eq!(config.rate_limit_per_ip, 5);
    assert_eq!(config.webhook_retry_schedule, [secs(1), secs(120)]);
    assert_eq!(config.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
}

#[test]
fn environment_overrides_the_file_field_by_field() {
    let file = TempToml::new("session_ttl = \"1h\"\nlog = \"debug\"\n");
    let vars = env(&[("REDIRECT_SESSIONS_SESSION_TTL", "2h"), ("REDIRECT_SESSIONS_EXPIRY_SWEEP", "0")]);
    let config = load(Some(&file), &vars, &no_flags());
    assert_eq!(config.session_ttl, secs(7200));
    assert!(!config.expiry_sweep);
    assert_eq!(config.log, "debug");
}

#[test]
fn flags_override_environment_and_file() {
    let file = TempToml::new("session_ttl = \"1h\"\nallow_private_callbacks = true\n");
    let vars = env(&[("REDIRECT_SESSIONS_SESSION_TTL", "2h"), ("REDIRECT_SESSIONS_LOG", "warn")]);
    let flags = RawSettings { session_ttl: Some("3h".into()), allow_private_callbacks: Some(false), ..no_flags() };
    let config = load(Some(&file), &vars, &flags);
    assert_eq!(config.session_ttl, secs(3 * 3600));
    assert!(!config.allow_private_callbacks);
    assert_eq!(config.log, "warn");
}

#[test]
fn a_later_layer_can_turn_the_metrics_listener_off() {
    let file = TempToml::new("metrics_listen = \"127.0.0.1:9100\"\n");
    let flags = RawSettings { metrics_listen: Some("off".into()), ..no_flags() };
    assert_eq!(load(Some(&file), &env(&[]), &flags).metrics_listen, None);
}

#[test]
fn plain_database_url_is_used_when_the_prefixed_one_is_absent() {
    let vars = env(&[("DATABASE_URL", "postgres://db/plain")]);
    let config = load(None, &vars, &no_flags());
    assert_eq!(config.database_url, DatabaseUrl::Postgres("postgres://db/plain".into()));
}

#[test]
fn prefixed_database_url_beats_plain_database_url_which_beats_the_file() {
    let file = TempToml::new("database_url = \"sqlite:file.db\"\n");
    let plain = env(&[("DATABASE_URL", "postgres://db/plain")]);
    let config = load(Some(&file), &plain, &no_flags());
    assert_eq!(config.database_url, DatabaseUrl::Postgres("postgres://db/plain".into()));
    let both = env(&[("DATABASE_URL", "postgres://db/plain"), ("REDIRECT_SESSIONS_DATABASE_URL", "sqlite:x.db")]);
    let config = load(Some(&file), &both, &no_flags());
    assert_eq!(config.database_url, DatabaseUrl::Sqlite { path: "x.db".into() });
}

#[test]
fn empty_environment_variables_count_as_unset() {
    let vars = env(&[("REDIRECT_SESSIONS_SESSION_TTL", ""), ("DATABASE_URL", "")]);
    let config = load(None, &vars, &no_flags());
    assert_eq!(config.session_ttl, secs(15 * 60));
    assert_eq!(config.database_url, Config::defaults().database_url);
}

#[test]
fn environment_booleans_accept_true_false_1_and_0() {
    for (text, expected) in [("true", true), ("1", true), ("false", false), ("0", false)] {
        let vars = env(&[("REDIRECT_SESSIONS_ALLOW_HTTP_REDIRECT_URLS", text)]);
        assert_eq!(load(None, &vars, &no_flags()).allow_http_redirect_urls, expected, "{text}");
    }
}

#[test]
fn a_bad_environment_boolean_names_the_variable() {
    let vars = env(&[("REDIRECT_SESSIONS_WEBHOOK_DISPATCHER", "yes")]);
    assert_eq!(
        error(None, &vars, &no_flags()),
        "invalid REDIRECT_SESSIONS_WEBHOOK_DISPATCHER \"yes\": expected true, false, 1 or 0"
    );
}

#[test]
fn a_bad_duration_flag_names_the_flag() {
    let flags = RawSettings { session_ttl: Some("abc".into()), ..no_flags() };
    assert_eq!(
        error(None, &env(&[]), &flags),
        "invalid --session-ttl \"abc\": expected a duration such as 15m, 2s or 500ms"
    );
}

#[test]
fn a_bad_public_url_in_the_environment_names_the_variable() {
    let vars = env(&[("REDIRECT_SESSIONS_PUBLIC_URL", "x")]);
    assert_eq!(
        error(None, &vars, &no_flags()),
        "invalid REDIRECT_SESSIONS_PUBLIC_URL \"x\": expected an absolute http(s) URL"
    );
}

#[test]
fn public_urls_with_other_schemes_queries_fragments_or_user_info_are_rejected() {
    for bad in ["ftp://h/", "https://h/?a=1", "https://h/#top", "https://u:secret@h/"] {
        let flags = RawSettings { public_url: Some(bad.into()), ..no_flags() };
        let message = error(None, &env(&[]), &flags);
        assert!(message.starts_with("invalid --public-url"), "{message}");
        assert!(!message.contains("secret"), "{message}");
    }
}

#[test]
fn a_bad_listen_address_in_the_file_names_the_file_and_the_key() {
    let file = TempToml::new("listen = \"localhost:80\"\n");
    let message = error(Some(&file), &env(&[]), &no_flags());
    let expected = format!(
        "invalid setting listen = \"localhost:80\" in {}: expected an IP address and port such as 127.0.0.1:8080",
        file.0.display()
    );
    assert_eq!(message, expected);
}

#[test]
fn an_unknown_key_in_the_file_is_named() {
    let file = TempToml::new("log = \"info\"\nsesion_ttl = \"1m\"\n");
    let message = error(Some(&file), &env(&[]), &no_flags());
    assert_eq!(message, format!("unknown setting \"sesion_ttl\" in {} (line 2)", file.0.display()));
}

#[test]
fn a_toml_syntax_error_is_one_line_naming_the_file() {
    let file = TempToml::new("this is not toml\n");
    let message = error(Some(&file), &env(&[]), &no_flags());
    assert!(message.starts_with(&format!("invalid config file {} (line 1): ", file.0.display())), "{message}");
}

#[test]
fn a_wrongly_typed_toml_value_names_the_key() {
    let file = TempToml::new("log = \"info\"\nexpiry_sweep = \"yes\"\n");
    let message = error(Some(&file), &env(&[]), &no_flags());
    let start = format!("invalid setting expiry_sweep in {} (line 2): ", file.0.display());
    assert!(message.starts_with(&start), "{message}");
}

#[test]
fn a_missing_config_file_is_an_error() {
    let path = std::env::temp_dir().join(format!("config-check-missing-{}.toml", std::process::id()));
    let message = Config::load(Some(&path), &env(&[]), &no_flags()).expect_err("missing file").to_string();
    assert!(message.starts_with(&format!("cannot read config file {}: ", path.display())), "{message}");
    assert!(!message.contains('\n'));
}

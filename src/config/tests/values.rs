//! The values each setting accepts, and the messages for those it refuses.

use super::*;

#[test]
fn session_ttl_outside_1s_to_24h_is_rejected() {
    for bad in ["500ms", "25h"] {
        let flags = RawSettings { session_ttl: Some(bad.into()), ..no_flags() };
        let expected = format!("invalid --session-ttl \"{bad}\": expected a duration from 1s to 24h");
        assert_eq!(error(None, &env(&[]), &flags), expected);
    }
}

#[test]
fn webhook_timeout_must_be_more_than_0_and_at_most_5m() {
    for bad in ["0s", "6m"] {
        let vars = env(&[("REDIRECT_SESSIONS_WEBHOOK_TIMEOUT", bad)]);
        assert!(error(None, &vars, &no_flags()).starts_with("invalid REDIRECT_SESSIONS_WEBHOOK_TIMEOUT"));
    }
}

#[test]
fn webhook_suspend_after_defaults_to_5_days_comes_from_every_layer_and_is_bounded() {
    assert_eq!(Config::defaults().webhook_suspend_after, hours(5 * 24));
    let file = TempToml::new("webhook_suspend_after = \"2d\"\n");
    assert_eq!(load(Some(&file), &env(&[]), &no_flags()).webhook_suspend_after, hours(48));
    let vars = env(&[("REDIRECT_SESSIONS_WEBHOOK_SUSPEND_AFTER", "12h")]);
    assert_eq!(load(Some(&file), &vars, &no_flags()).webhook_suspend_after, hours(12));
    let flags = RawSettings { webhook_suspend_after: Some("30m".into()), ..no_flags() };
    assert_eq!(load(Some(&file), &vars, &flags).webhook_suspend_after, Duration::from_secs(1800));
    for bad in ["59s", "91d", "soon"] {
        let vars = env(&[("REDIRECT_SESSIONS_WEBHOOK_SUSPEND_AFTER", bad)]);
        assert!(error(None, &vars, &no_flags()).starts_with("invalid REDIRECT_SESSIONS_WEBHOOK_SUSPEND_AFTER"));
    }
}

#[test]
fn webhook_concurrency_per_subscription_defaults_to_16_and_comes_from_every_layer() {
    assert_eq!(Config::defaults().webhook_concurrency_per_subscription, 16);
    let file = TempToml::new("webhook_concurrency_per_subscription = 4\n");
    assert_eq!(load(Some(&file), &env(&[]), &no_flags()).webhook_concurrency_per_subscription, 4);
    let vars = env(&[("REDIRECT_SESSIONS_WEBHOOK_CONCURRENCY_PER_SUBSCRIPTION", "8")]);
    assert_eq!(load(Some(&file), &vars, &no_flags()).webhook_concurrency_per_subscription, 8);
    let flags = RawSettings { webhook_concurrency_per_subscription: Some("2".into()), ..no_flags() };
    assert_eq!(load(Some(&file), &vars, &flags).webhook_concurrency_per_subscription, 2);
    for bad in ["0", "10001", "x"] {
        let flags = RawSettings { webhook_concurrency_per_subscription: Some(bad.into()), ..no_flags() };
        let expected = format!(
            "invalid --webhook-concurrency-per-subscription \"{bad}\": expected a whole number from 1 to 10000"
        );
        assert_eq!(error(None, &env(&[]), &flags), expected);
    }
}

#[test]
fn http_limits_default_and_come_from_every_layer() {
    let config = Config::defaults();
    assert_eq!((config.http_header_timeout, config.http_body_timeout), (secs(10), secs(30)));
    assert_eq!(config.http_max_connections, 10_000);
    let file = TempToml::new("http_header_timeout = \"5s\"\nhttp_max_connections = 50\n");
    let vars = env(&[("REDIRECT_SESSIONS_HTTP_BODY_TIMEOUT", "2s")]);
    let flags = RawSettings { http_max_connections: Some("7".into()), ..no_flags() };
    let config = load(Some(&file), &vars, &flags);
    assert_eq!((config.http_header_timeout, config.http_body_timeout), (secs(5), secs(2)));
    assert_eq!(config.http_max_connections, 7);
}

#[test]
fn http_limits_outside_their_ranges_are_rejected() {
    for (flags, expected) in [
        (
            RawSettings { http_header_timeout: Some("50ms".into()), ..no_flags() },
            "invalid --http-header-timeout \"50ms\": expected a duration from 100ms to 5m",
        ),
        (
            RawSettings { http_body_timeout: Some("11m".into()), ..no_flags() },
            "invalid --http-body-timeout \"11m\": expected a duration from 100ms to 10m",
        ),
        (
            RawSettings { http_max_connections: Some("0".into()), ..no_flags() },
            "invalid --http-max-connections \"0\": expected a whole number from 1 to 1000000",
        ),
    ] {
        assert_eq!(error(None, &env(&[]), &flags), expected);
    }
}

#[test]
fn an_empty_retry_schedule_is_rejected() {
    let file = TempToml::new("webhook_retry_schedule = \"\"\n");
    let message = error(Some(&file), &env(&[]), &no_flags());
    assert!(message.starts_with("invalid setting webhook_retry_schedule = \"\" in "), "{message}");
    assert!(message.ends_with("expected a comma separated list of durations such as 5s,5m,30m"));
}

#[test]
fn retry_schedules_with_zero_huge_or_too_many_delays_are_rejected() {
    let too_many = vec!["1s"; 21].join(",");
    for (bad, problem) in [
        ("1s,0s", "retry delay 2 must be more than 0 and at most 7d"),
        ("8d", "retry delay 1 must be more than 0 and at most 7d"),
        (too_many.as_str(), "expected at most 20 retry delays, got 21"),
    ] {
        let flags = RawSettings { webhook_retry_schedule: Some(bad.into()), ..no_flags() };
        let expected = format!("invalid --webhook-retry-schedule \"{bad}\": {problem}");
        assert_eq!(error(None, &env(&[]), &flags), expected);
    }
}

#[test]
fn a_rate_limit_that_is_not_a_number_is_rejected() {
    let vars = env(&[("REDIRECT_SESSIONS_RATE_LIMIT_PER_KEY", "lots")]);
    assert_eq!(
        error(None, &vars, &no_flags()),
        "invalid REDIRECT_SESSIONS_RATE_LIMIT_PER_KEY \"lots\": \
         expected a whole number of requests per second (0 turns it off)"
    );
    let file = TempToml::new("rate_limit_per_ip = -3\n");
    assert!(error(Some(&file), &env(&[]), &no_flags()).starts_with("invalid setting rate_limit_per_ip = \"-3\""));
}

#[test]
fn a_bad_plain_database_url_names_database_url_without_leaking_the_password() {
    let vars = env(&[("DATABASE_URL", "mysql://app:hunter2@db/x")]);
    let message = error(None, &vars, &no_flags());
    assert!(message.starts_with("invalid DATABASE_URL \"mysql://app:***@db/x\": unsupported scheme"), "{message}");
    assert!(!message.contains("hunter2"));
}

#[test]
fn passwords_are_masked_in_debug_output_and_echoed_values() {
    let url = DatabaseUrl::Postgres("postgres://app:hunter2@db/x?password=hunter2&sslmode=require".into());
    let shown = format!("{url:?}");
    assert!(!shown.contains("hunter2") && shown.contains("sslmode=require"), "{shown}");
    assert_eq!(redact("host=db password=hunter2 user=app"), "host=db password=*** user=app");
}

#[test]
fn durations_accept_each_unit_and_compound_forms() {
    assert_eq!(parse_duration("15m"), Ok(secs(900)));
    assert_eq!(parse_duration("2s"), Ok(secs(2)));
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("1h30m"), Ok(secs(5400)));
    assert_eq!(parse_duration("10d"), Ok(secs(864_000)));
    assert_eq!(parse_duration(" 1m1s500ms "), Ok(Duration::from_millis(61_500)));
}

#[test]
fn durations_reject_bare_numbers_signs_blanks_and_unknown_units() {
    for bad in ["15", "-1s", "", " ", "1x", "1.5s", "s", "1h 30m", "+1s"] {
        assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
    }
    assert!(parse_duration("15").unwrap_err().contains("needs a unit"));
}

#[test]
fn durations_reject_repeated_or_misordered_units_and_overflow() {
    assert!(parse_duration("1m1m").is_err());
    assert!(parse_duration("30m1h").is_err());
    assert_eq!(parse_duration("99999999999999999999s"), Err("duration is too large".into()));
    assert_eq!(parse_duration("18446744073709551615d"), Err("duration is too large".into()));
}

#[test]
fn duration_lists_allow_spaces_around_commas() {
    assert_eq!(parse_duration_list("1s, 2s ,5s"), Ok(vec![secs(1), secs(2), secs(5)]));
    assert!(parse_duration_list("1s,,2s").is_err());
    assert!(parse_duration_list("1s,2x").unwrap_err().contains("\"2x\""));
}

#[test]
fn sqlite_urls_take_relative_or_absolute_paths() {
    let sqlite = |p: &str| Ok(DatabaseUrl::Sqlite { path: PathBuf::from(p) });
    assert_eq!(parse_database_url("sqlite://./data/x.db"), sqlite("./data/x.db"));
    assert_eq!(parse_database_url("sqlite:///var/lib/x.db"), sqlite("/var/lib/x.db"));
    assert_eq!(parse_database_url("sqlite:x.db"), sqlite("x.db"));
    assert_eq!(parse_database_url("sqlite:/abs/x.db"), sqlite("/abs/x.db"));
}

#[test]
fn in_memory_empty_or_optioned_sqlite_urls_are_rejected() {
    assert!(parse_database_url("sqlite::memory:").unwrap_err().contains("in-memory"));
    assert!(parse_database_url("sqlite://:memory:").unwrap_err().contains("in-memory"));
    assert!(parse_database_url("sqlite://").is_err());
    assert!(parse_database_url("sqlite://x.db?mode=rwc").is_err());
}

#[test]
fn postgres_urls_are_kept_as_given() {
    for url in ["postgres://u:p@db:5432/app", "postgresql://db/app?sslmode=require"] {
        assert_eq!(parse_database_url(url), Ok(DatabaseUrl::Postgres(url.into())));
    }
}

#[test]
fn bare_paths_and_other_schemes_are_rejected_naming_the_accepted_schemes() {
    assert!(parse_database_url("./data/x.db").unwrap_err().contains("sqlite://PATH"));
    assert!(parse_database_url("mysql://db/x").unwrap_err().contains("postgres://"));
    assert!(parse_database_url("").is_err());
}

//! The one-time-code sender and the secrets keys: settings that go together, and secrets never shown.

use super::*;

const TOKEN: &str = "tok-3f9a_Zq.~+/=";

fn otp_http(url: &str, token: Option<&str>) -> OtpSender {
    OtpSender::Http { url: url.parse().unwrap(), token: token.map(str::to_owned) }
}

fn otp_flags(sender: Option<&str>, url: Option<&str>, token: Option<&str>) -> RawSettings {
    RawSettings {
        otp_sender: sender.map(str::to_owned),
        otp_http_url: url.map(str::to_owned),
        otp_http_token: token.map(str::to_owned),
        ..no_flags()
    }
}

#[test]
fn the_otp_sender_defaults_to_log() {
    assert_eq!(load(None, &env(&[]), &no_flags()).otp_sender, OtpSender::Log);
    let flags = otp_flags(Some("log"), None, None);
    assert_eq!(load(None, &env(&[]), &flags).otp_sender, OtpSender::Log);
}

#[test]
fn the_file_can_choose_the_http_otp_sender() {
    let file = TempToml::new(&format!(
        "otp_sender = \"http\"\notp_http_url = \"https://sms.example.com/v1/otp?tenant=7\"\n\
         otp_http_token = \"{TOKEN}\"\n"
    ));
    let config = load(Some(&file), &env(&[]), &no_flags());
    assert_eq!(config.otp_sender, otp_http("https://sms.example.com/v1/otp?tenant=7", Some(TOKEN)));
}

#[test]
fn the_environment_can_choose_the_http_otp_sender() {
    let vars = env(&[
        ("REDIRECT_SESSIONS_OTP_SENDER", "http"),
        ("REDIRECT_SESSIONS_OTP_HTTP_URL", "http://127.0.0.1:9000/otp"),
        ("REDIRECT_SESSIONS_OTP_HTTP_TOKEN", TOKEN),
    ]);
    let config = load(None, &vars, &no_flags());
    assert_eq!(config.otp_sender, otp_http("http://127.0.0.1:9000/otp", Some(TOKEN)));
}

#[test]
fn flags_can_choose_the_http_otp_sender_over_the_file_and_environment() {
    let file = TempToml::new("otp_sender = \"http\"\notp_http_url = \"https://file.example/otp\"\n");
    let vars = env(&[("REDIRECT_SESSIONS_OTP_HTTP_URL", "https://env.example/otp")]);
    let flags = otp_flags(Some("http"), Some("https://flag.example/otp"), Some(TOKEN));
    let config = load(Some(&file), &vars, &flags);
    assert_eq!(config.otp_sender, otp_http("https://flag.example/otp", Some(TOKEN)));
    // The token is optional.
    let config = load(Some(&file), &vars, &otp_flags(None, None, None));
    assert_eq!(config.otp_sender, otp_http("https://env.example/otp", None));
}

#[test]
fn the_http_otp_sender_without_a_url_is_rejected_naming_the_url_setting() {
    let flags = otp_flags(Some("http"), None, Some(TOKEN));
    let message = error(None, &env(&[]), &flags);
    assert_eq!(message, "invalid --otp-sender \"http\": otp_http_url is required when otp_sender is http");
    let file = TempToml::new("otp_sender = \"http\"\n");
    let message = error(Some(&file), &env(&[]), &no_flags());
    assert!(message.starts_with("invalid setting otp_sender = \"http\" in "), "{message}");
    assert!(message.ends_with(": otp_http_url is required when otp_sender is http"), "{message}");
}

#[test]
fn an_unknown_otp_sender_is_rejected() {
    let vars = env(&[("REDIRECT_SESSIONS_OTP_SENDER", "sms")]);
    assert_eq!(error(None, &vars, &no_flags()), "invalid REDIRECT_SESSIONS_OTP_SENDER \"sms\": expected log or http");
}

#[test]
fn otp_http_urls_with_other_schemes_relative_or_with_user_info_or_fragment_are_rejected() {
    for (bad, problem) in [
        ("ftp://sms.example/otp", "expected an absolute http(s) URL"),
        ("/otp", "expected an absolute http(s) URL"),
        ("sms.example/otp", "expected an absolute http(s) URL"),
        ("https://sms.example/otp#x", "expected an absolute http(s) URL without fragment"),
    ] {
        let flags = otp_flags(Some("http"), Some(bad), None);
        let expected = format!("invalid --otp-http-url {bad:?}: {problem}");
        assert_eq!(error(None, &env(&[]), &flags), expected);
    }
    for bad in ["https://user:secret@sms.example/otp", "https://secret@sms.example/otp"] {
        let vars = env(&[("REDIRECT_SESSIONS_OTP_SENDER", "http"), ("REDIRECT_SESSIONS_OTP_HTTP_URL", bad)]);
        let message = error(None, &vars, &no_flags());
        assert_eq!(
            message,
            "invalid REDIRECT_SESSIONS_OTP_HTTP_URL \"https://***@sms.example/otp\": \
             expected an absolute http(s) URL without user info (give the credential as otp_http_token)"
        );
    }
}

#[test]
fn bad_otp_tokens_are_rejected_without_being_shown() {
    let too_long = "x".repeat(4097);
    for bad in ["tok en secret", "", "secret\u{e9}", "secret\t", too_long.as_str()] {
        let flags = otp_flags(Some("http"), Some("https://sms.example/otp"), Some(bad));
        let message = error(None, &env(&[]), &flags);
        assert_eq!(
            message,
            "invalid --otp-http-token: expected 1 to 4096 visible ASCII characters without spaces (value not shown)"
        );
    }
    assert!(check_token(&"x".repeat(4096)).is_ok());
    let vars = env(&[("REDIRECT_SESSIONS_OTP_HTTP_TOKEN", "has a secret space")]);
    let message = error(None, &vars, &otp_flags(Some("http"), Some("https://sms.example/otp"), None));
    assert!(message.starts_with("invalid REDIRECT_SESSIONS_OTP_HTTP_TOKEN: "), "{message}");
    assert!(!message.contains("secret"), "{message}");
}

#[test]
fn a_token_of_the_wrong_toml_type_is_not_shown() {
    let file = TempToml::new("otp_sender = \"http\"\notp_http_token = 982451653\n");
    let message = error(Some(&file), &env(&[]), &no_flags());
    assert!(message.starts_with("invalid setting otp_http_token in "), "{message}");
    assert!(!message.contains("982451653"), "{message}");
}

#[test]
fn an_otp_url_or_token_while_the_sender_is_log_is_rejected() {
    let flags = otp_flags(None, Some("https://sms.example/otp"), None);
    assert_eq!(
        error(None, &env(&[]), &flags),
        "invalid --otp-http-url \"https://sms.example/otp\": only used when otp_sender is http, \
         but otp_sender is log (the default); set otp_sender to http or remove this setting"
    );
    let vars = env(&[("REDIRECT_SESSIONS_OTP_SENDER", "log"), ("REDIRECT_SESSIONS_OTP_HTTP_TOKEN", TOKEN)]);
    let message = error(None, &vars, &no_flags());
    assert_eq!(
        message,
        "invalid REDIRECT_SESSIONS_OTP_HTTP_TOKEN: only used when otp_sender is http, \
         but otp_sender is log (REDIRECT_SESSIONS_OTP_SENDER); set otp_sender to http or remove this setting"
    );
    // A later layer switching back to log does not silently drop an earlier layer's URL.
    let file = TempToml::new("otp_sender = \"http\"\notp_http_url = \"https://sms.example/otp\"\n");
    let message = error(Some(&file), &env(&[]), &otp_flags(Some("log"), None, None));
    assert!(message.starts_with("invalid setting otp_http_url = \"https://sms.example/otp\" in "), "{message}");
    assert!(message.ends_with("but otp_sender is log (--otp-sender); set otp_sender to http or remove this setting"));
}

#[test]
fn debug_output_of_the_config_never_shows_the_otp_token() {
    let flags = otp_flags(Some("http"), Some("https://sms.example/otp"), Some(TOKEN));
    let shown = format!("{:?}", load(None, &env(&[]), &flags));
    assert!(!shown.contains(TOKEN), "{shown}");
    assert!(
        shown.contains(r#"otp_sender: Http { url: "https://sms.example/otp", token: Some("<redacted>") }"#),
        "{shown}"
    );
    let without = format!("{:?}", otp_http("https://sms.example/otp", None));
    assert_eq!(without, r#"Http { url: "https://sms.example/otp", token: None }"#);
    assert_eq!(format!("{:?}", OtpSender::Log), "Log");
}

/// Base64 of 32 bytes, each `byte`.
fn secrets_key_text(byte: u8) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

#[test]
fn the_secrets_keys_come_from_every_layer_and_debug_shows_only_their_ids() {
    assert!(Config::defaults().secrets_key.is_none() && Config::defaults().secrets_old_keys.is_empty());
    let (a, b, c) = (secrets_key_text(1), secrets_key_text(2), secrets_key_text(3));
    let file = TempToml::new(&format!("secrets_key = \"{a}\"\nsecrets_old_keys = [\"{b}\", \"{c}\"]\n"));
    let config = load(Some(&file), &env(&[]), &no_flags());
    let id = |text: &str| SecretKey::parse(text).unwrap().id();
    assert_eq!(config.secrets_key.as_ref().map(SecretKey::id), Some(id(&a)));
    assert_eq!(config.secrets_old_keys.iter().map(SecretKey::id).collect::<Vec<_>>(), [id(&b), id(&c)]);
    let vars = env(&[("REDIRECT_SESSIONS_SECRETS_KEY", &b), ("REDIRECT_SESSIONS_SECRETS_OLD_KEYS", &a)]);
    let flags = RawSettings { secrets_key: Some(c.clone()), ..no_flags() };
    let config = load(Some(&file), &vars, &flags);
    assert_eq!(config.secrets_key.as_ref().map(SecretKey::id), Some(id(&c)));
    assert_eq!(config.secrets_old_keys.iter().map(SecretKey::id).collect::<Vec<_>>(), [id(&a)]);
    let shown = format!("{config:?}");
    for key in [&a, &b, &c] {
        assert!(!shown.contains(key.as_str()), "{shown}");
    }
    assert!(shown.contains(&id(&c)), "{shown}");
}

#[test]
fn malformed_secrets_keys_are_named_but_never_shown() {
    let good = secrets_key_text(7);
    let cases = [
        (
            RawSettings { secrets_key: Some("c2hvcnQ=".into()), ..no_flags() },
            env(&[]),
            "invalid --secrets-key: expected the base64 of 32 bytes, got 5 bytes (value not shown)",
        ),
        (
            no_flags(),
            env(&[("REDIRECT_SESSIONS_SECRETS_KEY", "not base64!")]),
            "invalid REDIRECT_SESSIONS_SECRETS_KEY: expected the base64 of 32 bytes (value not shown)",
        ),
        (
            no_flags(),
            env(&[("REDIRECT_SESSIONS_SECRETS_OLD_KEYS", &format!("{good},,{good}"))]),
            "invalid REDIRECT_SESSIONS_SECRETS_OLD_KEYS: entry 2 is empty; expected comma separated base64 keys",
        ),
        (
            RawSettings { secrets_old_keys: Some(format!("{good},AAAA")), ..no_flags() },
            env(&[]),
            "invalid --secrets-old-keys: entry 2: expected the base64 of 32 bytes, got 3 bytes (value not shown)",
        ),
    ];
    for (flags, vars, expected) in cases {
        let message = error(None, &vars, &flags);
        assert_eq!(message, expected);
        assert!(!message.contains(&good));
    }
    let file = TempToml::new("secrets_key = 12345\n");
    let message = error(Some(&file), &env(&[]), &no_flags());
    assert!(message.contains("secrets_key") && !message.contains("12345"), "{message}");
}

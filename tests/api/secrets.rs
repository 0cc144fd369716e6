//! Secrets at rest (docs/DESIGN.md "Secrets at rest", docs/OPERATIONS.md): the database holds
//! no subscription `apiKey`, no signing secret and no token signing key in clear — not in a
//! row, not in the SQLite file's free space or WAL; rows from before encryption are encrypted
//! at start; `secrets rotate` encrypts everything again so that the old key is no longer
//! needed; a wrong, malformed or missing key stops the program with one clear line; on SQLite
//! without a configured key a key file is created once beside the database.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::binary::{command, run, Finished, SECRETS_KEY};
use crate::common::*;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use redirect_sessions::domain::time::Timestamp;
use redirect_sessions::domain::token::KeyPair;
use redirect_sessions::secrets::SecretKey;
use redirect_sessions::state::AppState;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const SUBSCRIPTIONS: &str = "/customer-authentication-service/v1/redirect-session-events/subscriptions";

fn subscription_body(api_key: &str) -> Value {
    json!({
        "callbackUrl": "https://merchant.example/hooks",
        "apiKey": api_key,
        "eventTypes": ["RedirectSessionCancelled", "RedirectSessionExpired"]
    })
}

/// `PUT` a subscription as the server's merchant, with `x-request-id` when given; answers
/// status and body.
async fn put_subscription(server: &TestServer, id: Uuid, body: &Value, request_id: Option<Uuid>) -> (u16, Value) {
    put_subscription_as(server, &server.api_key, id, body, request_id).await
}

/// `PUT` a subscription as the merchant whose key is `api_key` (a restarted server has a new
/// merchant of its own).
async fn put_subscription_as(
    server: &TestServer,
    api_key: &str,
    id: Uuid,
    body: &Value,
    request_id: Option<Uuid>,
) -> (u16, Value) {
    let url = format!("{}{SUBSCRIPTIONS}/{id}", server.url);
    let mut request = server.client.request(Method::PUT, url).header("x-api-key", api_key).json(body);
    if let Some(request_id) = request_id {
        request = request.header("x-request-id", request_id.to_string());
    }
    status_and_json(request.send().await.unwrap()).await
}

/// The Ed25519 private key tokens are signed with now.
async fn token_signing_key(server: &TestServer) -> [u8; 32] {
    let keys = server.store().signing_keys(KeyPair::generate().unwrap(), Timestamp::now()).await.unwrap();
    keys.current.secret
}

/// The ways a secret could show in the database: its text, and for bytes the bytes and their
/// hex (PostgreSQL prints `bytea` as hex).
struct Needles(Vec<(String, Vec<u8>)>);

impl Needles {
    fn new() -> Needles {
        Needles(Vec::new())
    }

    fn text(&mut self, what: &str, text: &str) {
        self.0.push((what.to_owned(), text.as_bytes().to_vec()));
    }

    fn bytes(&mut self, what: &str, bytes: &[u8]) {
        self.0.push((format!("{what} (bytes)"), bytes.to_vec()));
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.0.push((format!("{what} (hex)"), hex.into_bytes()));
    }

    /// A `whsec_` secret: the text, its base64 part and the key bytes.
    fn signing_secret(&mut self, secret: &str) {
        self.text("the signing secret", secret);
        let encoded = secret.strip_prefix("whsec_").expect("a whsec_ secret");
        self.text("the signing secret's base64", encoded);
        self.bytes("the signing secret's key", &STANDARD.decode(encoded).unwrap());
    }

    /// Fails the test naming the first needle found in `haystack`.
    fn assert_none_in(&self, haystack: &[u8], where_: &str) {
        for (what, needle) in &self.0 {
            assert!(!contains(haystack, needle), "{what} is stored in clear in {where_}");
        }
    }

    /// Fails the test unless every needle is in `haystack` (shows that the search can see).
    fn assert_all_in(&self, haystack: &[u8], where_: &str) {
        for (what, needle) in &self.0 {
            if what.ends_with("(hex)") || what.ends_with("(bytes)") {
                continue;
            }
            assert!(contains(haystack, needle), "{what} should be in {where_}");
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|window| window == needle)
}

/// Everything the database keeps: on SQLite the bytes of the database file, its WAL and its
/// shared memory (free space included); on PostgreSQL every row of every table as text.
async fn raw_database(database: &TestDatabase) -> Vec<u8> {
    match database.sqlite_path() {
        Some(path) => {
            let mut bytes = Vec::new();
            for suffix in ["", "-wal", "-shm", "-journal"] {
                if let Ok(file) = std::fs::read(format!("{}{suffix}", path.display())) {
                    bytes.extend(file);
                }
            }
            assert!(!bytes.is_empty(), "the database file exists");
            bytes
        }
        None => {
            let sql = database.sql().await;
            let tables: Vec<String> = sql
                .query(
                    "SELECT quote_ident(table_name) FROM information_schema.tables
                      WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert!(tables.iter().any(|t| t == "subscriptions"), "{tables:?}");
            let mut text = String::new();
            for table in tables {
                let query = format!("SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM {table} t");
                let rows: String = sql.query_one(&query, &[]).await.unwrap().get(0);
                text.push_str(&rows);
                text.push('\n');
            }
            text.into_bytes()
        }
    }
}

/// Writes secrets in clear behind the service's back, as a build before encryption did.
async fn store_in_clear(database: &TestDatabase, subscription: Uuid, api_key: &str, secret: &str, key: [u8; 32]) {
    match database.sqlite_path() {
        Some(path) => {
            let c = rusqlite::Connection::open(path).unwrap();
            let changed = c
                .execute(
                    "UPDATE subscriptions SET api_key = ?2, signing_secret = ?3 WHERE id = ?1",
                    rusqlite::params![subscription.as_bytes(), api_key, secret],
                )
                .unwrap();
            assert_eq!(changed, 1);
            let changed =
                c.execute("UPDATE signing_keys SET secret = ?1 WHERE retired_on IS NULL", [&key[..]]).unwrap();
            assert_eq!(changed, 1);
        }
        None => {
            let sql = database.sql().await;
            let changed = sql
                .execute(
                    "UPDATE subscriptions SET api_key = $2, signing_secret = $3 WHERE id = $1",
                    &[&subscription, &api_key, &secret],
                )
                .await
                .unwrap();
            assert_eq!(changed, 1);
            let changed = sql
                .execute("UPDATE signing_keys SET secret = $1 WHERE retired_on IS NULL", &[&&key[..]])
                .await
                .unwrap();
            assert_eq!(changed, 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_holds_no_secret_in_clear_and_the_api_reads_them_all_the_same() {
    let server = TestServer::start().await;
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    let first_key = format!("callback-key-{}", Uuid::new_v4().simple());
    let second_key = format!("callback-key-{}", Uuid::new_v4().simple());
    let request_id = Uuid::new_v4();
    let (status, created) = put_subscription(&server, first, &subscription_body(&first_key), Some(request_id)).await;
    assert_eq!(status, 201, "{created}");
    let first_secret = created["signingSecret"].as_str().unwrap().to_owned();
    let (status, other) = put_subscription(&server, second, &subscription_body(&second_key), None).await;
    assert_eq!(status, 201, "{other}");
    let second_secret = other["signingSecret"].as_str().unwrap().to_owned();
    let signing_key = token_signing_key(&server).await;

    let mut needles = Needles::new();
    needles.text("the first apiKey", &first_key);
    needles.text("the second apiKey", &second_key);
    needles.signing_secret(&first_secret);
    needles.signing_secret(&second_secret);
    needles.bytes("the token signing key", &signing_key);
    let raw = raw_database(server.database()).await;
    needles.assert_none_in(&raw, "the database");
    // The search does see what is stored in clear: the callback URL.
    assert!(contains(&raw, b"https://merchant.example/hooks"), "the callback URL is in the database");

    // The service reads them all the same: the same PUT again is 200 (its apiKey compared in
    // clear), the idempotent replay shows the signing secret again, and the store hands out the
    // apiKey and secret as they were.
    let (status, again) = put_subscription(&server, first, &subscription_body(&first_key), None).await;
    assert_eq!(status, 200, "{again}");
    assert!(again.get("signingSecret").is_none(), "{again}");
    let (status, changed) = put_subscription(&server, first, &subscription_body("another-key"), None).await;
    assert_eq!(status, 409, "another apiKey is another subscription: {changed}");
    let (status, replayed) = put_subscription(&server, first, &subscription_body(&first_key), Some(request_id)).await;
    assert_eq!((status, &replayed), (201, &created), "the replay is the first answer");
    let stored = server.store().get_subscription(first).await.unwrap().unwrap();
    assert_eq!((stored.spec.api_key.as_str(), stored.signing_secret.as_str()), (first_key.as_str(), &*first_secret));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stored_in_clear_before_are_encrypted_at_the_next_start() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let (status, created) = put_subscription(&server, id, &subscription_body("sealed-at-first"), None).await;
    assert_eq!(status, 201, "{created}");
    let signing_key = token_signing_key(&server).await;
    let merchant_key = server.api_key.clone();
    let database = server.stop_keeping_database().await;

    // As an older build left them: in clear.
    let api_key = format!("old-clear-key-{}", Uuid::new_v4().simple());
    let secret = format!("whsec_{}", STANDARD.encode(Uuid::new_v4().as_bytes().repeat(2)));
    store_in_clear(&database, id, &api_key, &secret, signing_key).await;
    let mut needles = Needles::new();
    needles.text("the apiKey", &api_key);
    needles.signing_secret(&secret);
    needles.bytes("the token signing key", &signing_key);
    // The search finds them while they are in clear.
    needles.assert_all_in(&raw_database(&database).await, "the database");

    let server = TestServer::start_on(test_config(&database), database).await;
    needles.assert_none_in(&raw_database(server.database()).await, "the database after the start");
    let stored = server.store().get_subscription(id).await.unwrap().unwrap();
    assert_eq!((stored.spec.api_key.as_str(), stored.signing_secret.as_str()), (api_key.as_str(), secret.as_str()));
    assert_eq!(token_signing_key(&server).await, signing_key, "the same token signing key");
    let (status, again) = put_subscription_as(&server, &merchant_key, id, &subscription_body(&api_key), None).await;
    assert_eq!(status, 200, "{again}");

    // Idempotent: the next start finds nothing to encrypt and changes nothing.
    let before = raw_rows(server.database()).await;
    let database = server.stop_keeping_database().await;
    let server = TestServer::start_on(test_config(&database), database).await;
    assert_eq!(raw_rows(server.database()).await, before, "a second start encrypts nothing again");
    server.stop().await;
}

/// The stored secrets, row by row, as the database holds them.
async fn raw_rows(database: &TestDatabase) -> Vec<String> {
    match database.sqlite_path() {
        Some(path) => {
            let c = rusqlite::Connection::open(path).unwrap();
            let mut rows: Vec<String> = c
                .prepare("SELECT api_key || ' ' || signing_secret FROM subscriptions")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let keys: Vec<Vec<u8>> = c
                .prepare("SELECT secret FROM signing_keys")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            rows.extend(keys.into_iter().map(|k| String::from_utf8_lossy(&k).into_owned()));
            rows.sort();
            rows
        }
        None => {
            let mut rows = database.query_text("SELECT api_key || ' ' || signing_secret FROM subscriptions");
            rows.extend(database.query_text("SELECT convert_from(secret, 'UTF8') FROM signing_keys"));
            rows.sort();
            rows
        }
    }
}

/// `secrets rotate` of the real binary over `database` with the key ring given by environment.
fn rotate(database: &TestDatabase, key: &SecretKey, old: &[&SecretKey]) -> Finished {
    let mut rotate = command(&["secrets", "rotate", "--database-url", database.url()]);
    rotate.env("REDIRECT_SESSIONS_SECRETS_KEY", key.to_base64());
    let old: Vec<String> = old.iter().map(|k| k.to_base64()).collect();
    if !old.is_empty() {
        rotate.env("REDIRECT_SESSIONS_SECRETS_OLD_KEYS", old.join(","));
    }
    run(rotate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_encrypts_everything_again_and_the_old_key_is_no_longer_needed() {
    let server = TestServer::start().await;
    let old_key = server.database().secrets_key();
    let id = Uuid::new_v4();
    let request_id = Uuid::new_v4();
    let (status, created) =
        put_subscription(&server, id, &subscription_body("rotated-callback-key"), Some(request_id)).await;
    assert_eq!(status, 201, "{created}");
    let signing_key = token_signing_key(&server).await;
    let merchant_key = server.api_key.clone();
    let database = server.stop_keeping_database().await;

    let new_key = new_secrets_key();
    // Without the old key the rotation cannot read what it should encrypt again.
    let refused = tokio::task::block_in_place(|| rotate(&database, &new_key, &[]));
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert_eq!(refused.error_lines().len(), 1, "{refused:?}");
    assert!(refused.error_lines()[0].contains(&old_key.id()), "names the missing key: {refused:?}");

    let rotated = tokio::task::block_in_place(|| rotate(&database, &new_key, &[&old_key]));
    assert_eq!(rotated.code, Some(0), "{rotated:?}");
    assert_eq!(
        rotated.single_json_line(),
        json!({"keyId": new_key.id(), "subscriptions": 1, "signingKeys": 1, "idempotentAnswers": 1, "unchanged": 0})
    );
    let again = tokio::task::block_in_place(|| rotate(&database, &new_key, &[&old_key]));
    assert_eq!(
        again.single_json_line(),
        json!({"keyId": new_key.id(), "subscriptions": 0, "signingKeys": 0, "idempotentAnswers": 0, "unchanged": 3}),
        "{again:?}"
    );
    let raw = raw_database(&database).await;
    assert!(!contains(&raw, format!("v1:{}:", old_key.id()).as_bytes()), "nothing is left under the old key");
    assert!(contains(&raw, format!("v1:{}:", new_key.id()).as_bytes()), "the new key's values are there");

    // The new key alone serves: the subscription, its replay and the token key read as before.
    let mut config = test_config(&database);
    config.secrets_key = Some(new_key.clone());
    let server = TestServer::start_on(config, database).await;
    let stored = server.store().get_subscription(id).await.unwrap().unwrap();
    assert_eq!(stored.spec.api_key, "rotated-callback-key");
    assert_eq!(Some(stored.signing_secret.as_str()), created["signingSecret"].as_str());
    let body = subscription_body("rotated-callback-key");
    let (status, replayed) = put_subscription_as(&server, &merchant_key, id, &body, Some(request_id)).await;
    assert_eq!((status, &replayed), (201, &created), "the stored answer opens with the new key");
    assert_eq!(token_signing_key(&server).await, signing_key);
    let database = server.stop_keeping_database().await;

    // The old key alone no longer opens anything: the start stops with a clear error.
    let mut config = test_config(&database);
    config.secrets_key = Some(old_key.clone());
    let message = match AppState::open(config).await {
        Ok(_) => panic!("the old key alone must not start the service"),
        Err(error) => error.to_string(),
    };
    assert!(!message.contains('\n'), "{message}");
    assert!(message.contains(&new_key.id()) && message.contains("not configured"), "{message}");
    assert!(!message.contains(&old_key.to_base64()) && !message.contains(&new_key.to_base64()), "{message}");
    database.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_stops_the_start_with_one_clear_line() {
    let server = TestServer::start().await;
    let (status, body) = put_subscription(&server, Uuid::new_v4(), &subscription_body("k"), None).await;
    assert_eq!(status, 201, "{body}");
    let right = server.database().secrets_key();
    let database = server.stop_keeping_database().await;
    let wrong = new_secrets_key();

    let mut config = test_config(&database);
    config.secrets_key = Some(wrong.clone());
    let message = match AppState::open(config).await {
        Ok(_) => panic!("a wrong key must not start the service"),
        Err(error) => error.to_string(),
    };
    assert!(message.contains(&right.id()) && message.contains(&wrong.id()), "{message}");

    // The real binary: exit code 1, one line naming the key it needs, no key shown.
    let mut serve = command(&["serve", "--listen", "127.0.0.1:0", "--database-url", database.url()]);
    serve.env("REDIRECT_SESSIONS_SECRETS_KEY", wrong.to_base64());
    let finished = tokio::task::block_in_place(|| run(serve));
    assert_eq!(finished.code, Some(1), "{finished:?}");
    let errors = finished.error_lines();
    assert_eq!(errors.len(), 1, "{finished:?}");
    assert!(errors[0].contains(&right.id()) && errors[0].contains("secrets_old_keys"), "{finished:?}");
    for key in [&right, &wrong] {
        assert!(!finished.stderr.contains(&key.to_base64()), "no key in the output: {finished:?}");
    }
    database.remove().await;
}

/// Runs `args` with the environment `env` (on top of `command`'s), in `dir`.
fn run_in(dir: &Path, args: &[&str], env: &[(&str, &str)], without_key: bool) -> Finished {
    let mut command: Command = command(args);
    command.current_dir(dir).envs(env.iter().copied());
    if without_key {
        command.env_remove("REDIRECT_SESSIONS_SECRETS_KEY");
    }
    run(command)
}

/// Arguments, environment, what the error line must name, and what it must not show.
type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str, &'a str);

#[test]
fn malformed_or_missing_keys_exit_2_with_one_line_that_does_not_show_them() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("never.db").display());
    let valid = SECRETS_KEY;
    let cases: [Case; 5] = [
        (vec!["migrate", "--secrets-key", "c2hvcnQ="], vec![], "--secrets-key", "c2hvcnQ="),
        (
            vec!["serve"],
            vec![("REDIRECT_SESSIONS_SECRETS_KEY", "not a key!")],
            "REDIRECT_SESSIONS_SECRETS_KEY",
            "not a key",
        ),
        (
            vec!["merchant", "list"],
            vec![("REDIRECT_SESSIONS_SECRETS_OLD_KEYS", "c2VjcmV0cy1rZXktb2YtdGhlLWJpbmFyeS10ZXN0cyE=,bad")],
            "REDIRECT_SESSIONS_SECRETS_OLD_KEYS",
            "bad",
        ),
        (vec!["secrets", "rotate", "--secrets-old-keys", "x,"], vec![], "--secrets-old-keys", "x,"),
        (vec!["migrate", "--secrets-key", valid, "--secrets-old-keys", "AAAA"], vec![], "entry 1", "AAAA"),
    ];
    for (args, env, named, hidden) in cases {
        let mut all = args.clone();
        all.extend(["--database-url", &database]);
        let finished = run_in(dir.path(), &all, &env, false);
        assert_eq!(finished.code, Some(2), "{args:?}: {finished:?}");
        let lines = finished.stderr_lines();
        assert_eq!(lines.len(), 1, "{args:?}: one line: {finished:?}");
        assert!(lines[0].contains(named), "{args:?}: names {named}: {finished:?}");
        assert!(!lines[0].contains(hidden), "{args:?}: does not show the value: {finished:?}");
    }
    // PostgreSQL without a key: refused before connecting (nothing listens on port 1).
    for args in [vec!["migrate"], vec!["serve", "--listen", "127.0.0.1:0"], vec!["secrets", "rotate"]] {
        let mut all = args.clone();
        all.extend(["--database-url", "postgres://nobody@127.0.0.1:1/none"]);
        let finished = run_in(dir.path(), &all, &[], true);
        assert_eq!(finished.code, Some(2), "{args:?}: {finished:?}");
        let lines = finished.stderr_lines();
        assert_eq!(lines.len(), 1, "{args:?}: {finished:?}");
        assert!(lines[0].contains("secrets_key is required") && lines[0].contains("PostgreSQL"), "{finished:?}");
    }
    let left: Vec<PathBuf> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "nothing was created: {left:?}");
}

#[test]
fn without_a_key_sqlite_gets_a_key_file_beside_the_database_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data").join("shop.db");
    let database = format!("sqlite://{}", path.display());
    let key_file = PathBuf::from(format!("{}.secrets-key", path.display()));

    let created =
        run_in(dir.path(), &["merchant", "create", "--name", "Key File Shop", "--database-url", &database], &[], true);
    assert_eq!(created.code, Some(0), "{created:?}");
    // A token signing key: something encrypted with the file's key.
    let rotated = run_in(dir.path(), &["signing-key", "rotate", "--database-url", &database], &[], true);
    assert_eq!(rotated.code, Some(0), "{rotated:?}");
    let key = std::fs::read_to_string(&key_file).expect("the key file exists");
    let key = SecretKey::parse(&key).expect("it holds a key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "only the owner may read it");
    }
    let said = created.stderr_lines().into_iter().find(|l| l.contains("secrets key")).expect("a log line");
    assert!(said.contains(&key_file.display().to_string()), "the log says where: {said}");
    assert!(!created.stderr.contains(&key.to_base64()), "never the key: {created:?}");

    // Reused on later starts: the same key, the data reads.
    let listed = run_in(dir.path(), &["merchant", "list", "--database-url", &database], &[], true);
    assert_eq!(listed.code, Some(0), "{listed:?}");
    assert!(listed.stdout.contains("Key File Shop"), "{listed:?}");
    assert_eq!(SecretKey::parse(&std::fs::read_to_string(&key_file).unwrap()).unwrap().id(), key.id());
    assert!(listed.stderr.contains("read from the key file"), "{listed:?}");

    // A configured key wins over the file; the file's key it does not know is a clear error.
    let other = run_in(dir.path(), &["merchant", "list", "--database-url", &database], &[], false);
    assert_eq!(other.code, Some(1), "{other:?}");
    assert!(other.error_lines()[0].contains(&key.id()), "{other:?}");
    // Given as an old key, the file's key opens what it encrypted.
    let key_text = key.to_base64();
    let with_old = run_in(
        dir.path(),
        &["merchant", "list", "--database-url", &database],
        &[("REDIRECT_SESSIONS_SECRETS_OLD_KEYS", key_text.as_str())],
        false,
    );
    assert_eq!(with_old.code, Some(0), "{with_old:?}");
}

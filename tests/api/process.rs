//! The real `redirect-sessions` binary as a child process (README.md): admin commands, the
//! OpenAPI command, bad settings, layered settings, serving, crash durability and graceful
//! shutdown.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::binary::{command, run, Served};
use crate::common::{assert_error, new_transaction_intent, status_and_json, TestDatabase, BASE};
use crate::webhook_support::{subscription_body, subscription_path, Receiver};
use reqwest::{Method, Response};
use serde_json::{json, Value};
use uuid::Uuid;

/// A temporary working directory, and a fresh database of the backend under test: on SQLite a
/// file in the directory, on PostgreSQL a database of its own (dropped with the workspace).
struct Workspace {
    // Dropped before `dir` (fields drop in declaration order); a SQLite file goes with `dir`.
    database: TestDatabase,
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Workspace {
        let dir = tempfile::tempdir().expect("a temporary directory");
        Workspace { database: TestDatabase::fresh_at(&dir.path().join("db")), dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn database_url(&self) -> String {
        self.database.url().to_owned()
    }

    /// The binary, run in this directory, with no settings inherited from the environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = command(args);
        command.current_dir(self.path());
        command
    }

    /// Runs an admin command against this database; it must succeed and print one JSON line.
    fn admin(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        let url = self.database_url();
        all.extend(["--database-url", &url]);
        let finished = run(self.command(&all));
        assert_eq!(finished.code, Some(0), "{args:?}: {finished:?}");
        finished.single_json_line()
    }

    /// `merchant create`: answers the merchant's id and key.
    fn merchant(&self, name: &str) -> (Uuid, String) {
        let created = self.admin(&["merchant", "create", "--name", name]);
        (created["merchantId"].as_str().unwrap().parse().unwrap(), created["apiKey"].as_str().unwrap().to_owned())
    }

    /// `serve` on a free port over this database, with `args` and `env` added.
    fn serve(&self, args: &[&str], env: &[(&str, &str)]) -> Served {
        let url = self.database_url();
        let mut all = vec!["serve", "--listen", "127.0.0.1:0", "--database-url", &url];
        all.extend(args);
        let mut command = self.command(&all);
        command.envs(env.iter().copied());
        Served::start_command(command)
    }
}

/// The session calls of these tests, on a running `serve`.
trait SessionCalls {
    async fn put_session(&self, api_key: &str, id: Uuid, body: &Value) -> Response;
    async fn get_session(&self, api_key: &str, id: Uuid) -> Response;
    async fn cancel_session(&self, api_key: &str, id: Uuid) -> Response;
}

impl SessionCalls for Served {
    async fn put_session(&self, api_key: &str, id: Uuid, body: &Value) -> Response {
        self.request(Method::PUT, &format!("{BASE}/redirect-sessions/{id}"), api_key).json(body).send().await.unwrap()
    }

    async fn get_session(&self, api_key: &str, id: Uuid) -> Response {
        self.request(Method::GET, &format!("{BASE}/redirect-sessions/{id}"), api_key).send().await.unwrap()
    }

    async fn cancel_session(&self, api_key: &str, id: Uuid) -> Response {
        self.request(Method::POST, &format!("{BASE}/redirect-sessions/{id}/cancel"), api_key).send().await.unwrap()
    }
}

fn millis(text: &Value) -> i64 {
    use time::format_description::well_known::Rfc3339;
    let parsed = time::OffsetDateTime::parse(text.as_str().unwrap(), &Rfc3339).unwrap();
    (parsed.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Every byte of every file in `dir` (the database, its WAL and shared-memory files).
fn all_file_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

#[test]
fn merchant_create_prints_one_json_line_and_stores_only_a_hash_of_the_key() {
    let workspace = Workspace::new();
    let name = "Kiosk Zebra 7781";
    let created = workspace.admin(&["merchant", "create", "--name", name]);
    let members: Vec<&str> = created.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(members, ["merchantId", "apiKey"], "{created}");
    created["merchantId"].as_str().unwrap().parse::<Uuid>().expect("merchantId is a UUID");
    let api_key = created["apiKey"].as_str().unwrap();
    assert!(api_key.len() >= 32, "a long random key: {api_key}");

    match workspace.database.sqlite_path() {
        Some(database) => {
            let files = all_file_bytes(workspace.path());
            assert!(files.iter().any(|(path, _)| path == database), "the database file exists");
            let wal = PathBuf::from(format!("{}-wal", database.display()));
            for (path, bytes) in &files {
                assert!(!contains(bytes, api_key.as_bytes()), "the API key is stored in clear in {}", path.display());
            }
            // The search does find what is stored in clear: the merchant's name, in the file or its WAL.
            assert!(
                files
                    .iter()
                    .any(|(path, bytes)| (path == database || *path == wal) && contains(bytes, name.as_bytes())),
                "the merchant's name should be somewhere in the database files"
            );
        }
        None => {
            // Every row of every table, as PostgreSQL prints it.
            let tables = workspace.database.query_text(
                "SELECT quote_ident(table_name) FROM information_schema.tables \
                  WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
            );
            assert!(tables.iter().any(|t| t == "merchants"), "the schema is there: {tables:?}");
            let mut rows = Vec::new();
            for table in &tables {
                rows.extend(workspace.database.query_text(&format!("SELECT t::text FROM {table} t")));
            }
            for row in &rows {
                assert!(!row.contains(api_key), "the API key is stored in clear: {row}");
            }
            // The search does find what is stored in clear: the merchant's name.
            assert!(rows.iter().any(|row| row.contains(name)), "the merchant's name should be in a row: {rows:?}");
        }
    }
}

#[test]
fn merchant_list_prints_every_merchant() {
    let workspace = Workspace::new();
    let (first, _) = workspace.merchant("First Shop");
    let (second, _) = workspace.merchant("Second Shop");
    let listed = workspace.admin(&["merchant", "list"]);
    let merchants = listed.as_array().unwrap_or_else(|| panic!("a JSON array: {listed}"));
    assert_eq!(merchants.len(), 2, "{listed}");
    for (id, name) in [(first, "First Shop"), (second, "Second Shop")] {
        let merchant = merchants
            .iter()
            .find(|m| m["merchantId"] == id.to_string())
            .unwrap_or_else(|| panic!("{id} not listed: {listed}"));
        assert_eq!((&merchant["name"], &merchant["disabled"]), (&json!(name), &json!(false)), "{merchant}");
        assert!(merchant.get("apiKey").is_none(), "keys are shown only once: {merchant}");
    }
}

#[tokio::test]
async fn a_rotated_key_replaces_the_old_one_at_once_on_a_served_instance() {
    let workspace = Workspace::new();
    let (merchant, old_key) = workspace.merchant("Rotating Shop");
    let served = workspace.serve(&[], &[]);
    let id = Uuid::new_v4();
    assert_eq!(served.put_session(&old_key, id, &new_transaction_intent()).await.status(), 201);

    let rotated = workspace.admin(&["merchant", "rotate-key", "--merchant-id", &merchant.to_string()]);
    assert_eq!(rotated["merchantId"], merchant.to_string());
    let new_key = rotated["apiKey"].as_str().unwrap();
    assert_ne!(new_key, old_key);

    assert_error(served.get_session(&old_key, id).await, 401, "Unauthorized").await;
    let (status, session) = status_and_json(served.get_session(new_key, id).await).await;
    assert_eq!((status, &session["id"]), (200, &json!(id)), "{session}");
}

#[tokio::test]
async fn a_disabled_merchant_is_refused_by_a_served_instance() {
    let workspace = Workspace::new();
    let (merchant, key) = workspace.merchant("Closing Shop");
    let served = workspace.serve(&[], &[]);
    let id = Uuid::new_v4();
    assert_eq!(served.put_session(&key, id, &new_transaction_intent()).await.status(), 201);

    let disabled = workspace.admin(&["merchant", "disable", "--merchant-id", &merchant.to_string()]);
    assert_eq!(disabled, json!({"merchantId": merchant, "disabled": true}));
    assert_error(served.get_session(&key, id).await, 401, "Unauthorized").await;
    assert_error(served.put_session(&key, Uuid::new_v4(), &new_transaction_intent()).await, 401, "Unauthorized").await;
    let listed = workspace.admin(&["merchant", "list"]);
    assert_eq!(listed[0]["disabled"], true, "{listed}");
}

#[tokio::test]
async fn customer_create_prints_a_customer_id_that_sessions_can_use() {
    let workspace = Workspace::new();
    let created = workspace.admin(&["customer", "create", "--phone", "+4915112345678"]);
    let members: Vec<&str> = created.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(members, ["customerId"], "{created}");
    let customer: Uuid = created["customerId"].as_str().unwrap().parse().expect("a UUID");

    let (_, key) = workspace.merchant("Customer Shop");
    let served = workspace.serve(&[], &[]);
    let mut body = new_transaction_intent();
    body["customerId"] = json!(customer);
    let (status, session) = status_and_json(served.put_session(&key, Uuid::new_v4(), &body).await).await;
    assert_eq!((status, &session["customerId"]), (201, &json!(customer)), "{session}");
}

#[test]
fn customer_create_with_a_malformed_phone_number_exits_2() {
    let workspace = Workspace::new();
    let url = workspace.database_url();
    let finished = run(workspace.command(&["customer", "create", "--phone", "123", "--database-url", &url]));
    assert_eq!(finished.code, Some(2), "{finished:?}");
    assert_eq!(finished.stdout, "", "{finished:?}");
    let errors: Vec<&str> = finished.stderr_lines().into_iter().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{finished:?}");
    assert!(errors[0].contains("--phone"), "{finished:?}");
}

#[test]
fn admin_commands_refuse_a_malformed_merchant_id_with_exit_code_2() {
    let workspace = Workspace::new();
    let url = workspace.database_url();
    for command in ["rotate-key", "disable"] {
        let finished = run(workspace.command(&["merchant", command, "--merchant-id", "nope", "--database-url", &url]));
        assert_eq!(finished.code, Some(2), "{command}: {finished:?}");
        assert_eq!(finished.stdout, "", "{command}: {finished:?}");
        assert!(finished.stderr_lines().last().is_some_and(|l| l.contains("--merchant-id")), "{finished:?}");
    }
}

#[test]
fn openapi_prints_the_committed_document() {
    let workspace = Workspace::new();
    let finished = run(workspace.command(&["openapi"]));
    assert_eq!(finished.code, Some(0), "{finished:?}");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    let committed = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("the committed {path}: {e}"));
    let printed: Value = serde_json::from_str(&finished.stdout).expect("the output is JSON");
    assert_eq!(printed, serde_json::from_str::<Value>(&committed).unwrap(), "the same document as {path}");
    assert!(finished.stdout == committed, "`openapi` output differs from {path} in formatting; regenerate it");
    assert!(std::fs::read_dir(workspace.path()).unwrap().next().is_none(), "openapi touches no database");
}

#[test]
fn settings_prints_readme_table_and_serve_help_lists_every_setting_flag() {
    let workspace = Workspace::new();
    let finished = run(workspace.command(&["settings"]));
    assert_eq!(finished.code, Some(0), "{finished:?}");
    assert!(finished.stdout == redirect_sessions::config::markdown_table(), "{finished:?}");
    let finished = run(workspace.command(&["serve", "--help"]));
    assert_eq!(finished.code, Some(0), "{finished:?}");
    let words: Vec<&str> = finished.stdout.split_whitespace().collect();
    for setting in redirect_sessions::config::SETTINGS {
        assert!(words.contains(&setting.flag().as_str()), "{}: {finished:?}", setting.name);
        if let (Some(default), false) = (setting.default, setting.form == redirect_sessions::config::Form::Switch) {
            assert!(finished.stdout.contains(&format!("(default {default})")), "{}: {finished:?}", setting.name);
        }
    }
    assert!(std::fs::read_dir(workspace.path()).unwrap().next().is_none(), "neither touches a database");
}

/// An environment variable: name and value.
type Var<'a> = (&'a str, &'a str);

#[test]
fn bad_setting_values_exit_2_with_one_line_on_stderr_naming_the_setting() {
    let workspace = Workspace::new();
    let url = workspace.database_url();
    let config = workspace.path().join("bad.toml");
    std::fs::write(&config, "session_ttl = \"soon\"\n").unwrap();
    let config = config.display().to_string();
    let free = ["--listen", "127.0.0.1:0"];
    let no_env: &[Var] = &[];
    let cases: [(Vec<&str>, &[Var], &str); 9] = [
        (vec!["serve", "--session-ttl", "abc", "--database-url", &url, free[0], free[1]], no_env, "--session-ttl"),
        (vec!["serve", "--public-url", "notaurl", "--database-url", &url, free[0], free[1]], no_env, "--public-url"),
        (vec!["serve", "--listen", "nope", "--database-url", &url], no_env, "--listen"),
        (vec!["serve", "--database-url", "mysql://x", free[0], free[1]], no_env, "--database-url"),
        (vec!["migrate", "--database-url", "mysql://x"], no_env, "--database-url"),
        (vec!["merchant", "list", "--database-url", "mysql://x"], no_env, "--database-url"),
        (
            vec!["serve", "--database-url", &url, free[0], free[1]],
            &[("REDIRECT_SESSIONS_SESSION_TTL", "abc")],
            "REDIRECT_SESSIONS_SESSION_TTL",
        ),
        (vec!["serve", free[0], free[1]], &[("DATABASE_URL", "mysql://x")], "DATABASE_URL"),
        (vec!["serve", "--config", &config, "--database-url", &url, free[0], free[1]], no_env, "session_ttl"),
    ];
    for (args, env, named) in cases {
        let mut command = workspace.command(&args);
        command.envs(env.iter().copied());
        let finished = run(command);
        assert_eq!(finished.code, Some(2), "{args:?} {env:?}: {finished:?}");
        assert_eq!(finished.stdout, "", "{args:?} {env:?}: {finished:?}");
        let lines = finished.stderr_lines();
        assert_eq!(lines.len(), 1, "{args:?} {env:?}: one line on stderr: {finished:?}");
        assert!(lines[0].contains(named), "{args:?} {env:?}: the line names {named}: {finished:?}");
    }
    assert!(!workspace.database.is_migrated(), "no bad setting got as far as creating the database");
}

/// The session TTL a served instance applies: `expiresOn - createdOn` of a new session.
async fn served_ttl_millis(workspace: &Workspace, key: &str, args: &[&str], env: &[(&str, &str)]) -> i64 {
    let served = workspace.serve(args, env);
    let (status, session) =
        status_and_json(served.put_session(key, Uuid::new_v4(), &new_transaction_intent()).await).await;
    assert_eq!(status, 201, "{session}");
    millis(&session["expiresOn"]) - millis(&session["createdOn"])
}

#[tokio::test]
async fn settings_come_from_the_file_then_the_environment_then_the_flags() {
    let workspace = Workspace::new();
    let (_, key) = workspace.merchant("Settings Shop");
    let config = workspace.path().join("settings.toml");
    std::fs::write(&config, "session_ttl = \"5s\"\n").unwrap();
    let config = config.display().to_string();
    let env_ttl = [("REDIRECT_SESSIONS_SESSION_TTL", "2s")];

    assert_eq!(served_ttl_millis(&workspace, &key, &[], &env_ttl).await, 2_000, "the environment applies");
    assert_eq!(served_ttl_millis(&workspace, &key, &["--config", &config], &[]).await, 5_000, "the file applies");
    assert_eq!(
        served_ttl_millis(&workspace, &key, &["--config", &config], &env_ttl).await,
        2_000,
        "the environment beats the file"
    );
    assert_eq!(
        served_ttl_millis(&workspace, &key, &["--config", &config, "--session-ttl", "3s"], &env_ttl).await,
        3_000,
        "a flag beats the environment and the file"
    );
}

#[tokio::test]
async fn the_public_url_flag_sets_the_redirect_url_and_the_error_links() {
    let workspace = Workspace::new();
    let (_, key) = workspace.merchant("Public Shop");
    let served = workspace.serve(&["--public-url", "https://pay.example.com/base/"], &[]);
    let (status, session) =
        status_and_json(served.put_session(&key, Uuid::new_v4(), &new_transaction_intent()).await).await;
    assert_eq!((status, &session["redirectUrl"]), (201, &json!("https://pay.example.com/base/pay")), "{session}");
    let error = assert_error(served.get_session(&key, Uuid::new_v4()).await, 404, "RedirectSessionNotFound").await;
    assert_eq!(error["moreInfo"], "https://pay.example.com/base/docs/errors#RedirectSessionNotFound");
}

#[tokio::test]
async fn the_database_url_can_come_from_database_url_or_the_config_file() {
    let workspace = Workspace::new();
    let url = workspace.database_url();
    let mut migrate = workspace.command(&["migrate"]);
    migrate.env("DATABASE_URL", &url);
    let finished = run(migrate);
    assert_eq!(finished.code, Some(0), "{finished:?}");
    assert!(workspace.database.is_migrated(), "DATABASE_URL picked the database");

    let config = workspace.path().join("settings.toml");
    std::fs::write(&config, format!("database_url = {:?}\n", url)).unwrap();
    let finished = run(workspace.command(&[
        "merchant",
        "create",
        "--name",
        "File Shop",
        "--config",
        &config.display().to_string(),
    ]));
    assert_eq!(finished.code, Some(0), "{finished:?}");
    let listed = workspace.admin(&["merchant", "list"]);
    assert_eq!(listed[0]["name"], "File Shop", "the file's database_url was used: {listed}");
}

#[tokio::test]
async fn serve_logs_one_listening_line_with_the_address_it_is_bound_to() {
    let workspace = Workspace::new();
    let served = workspace.serve(&[], &[]);
    let response = served.client.get(format!("{}/health/ready", served.url)).send().await.unwrap();
    let (status, body) = status_and_json(response).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let lines = served.lines();
    let listening: Vec<&String> = lines.iter().filter(|l| l.contains("listening")).collect();
    assert_eq!(listening.len(), 1, "{lines:?}");
    assert!(listening[0].contains(served.url.trim_start_matches("http://")), "{lines:?}");
    assert!(lines.iter().all(|l| !l.contains('\u{1b}')), "no colour codes when stderr is not a terminal: {lines:?}");
}

#[tokio::test]
async fn a_session_survives_kill_9_and_can_be_cancelled_after_a_restart() {
    let workspace = Workspace::new();
    let (_, key) = workspace.merchant("Durable Shop");
    let mut served = workspace.serve(&[], &[]);
    let (id, request_id) = (Uuid::new_v4(), Uuid::new_v4());
    let put = |served: &Served| {
        served
            .request(Method::PUT, &format!("{BASE}/redirect-sessions/{id}"), &key)
            .header("x-request-id", request_id.to_string())
            .json(&new_transaction_intent())
            .send()
    };
    let first = put(&served).await.unwrap();
    assert_eq!(first.status(), 201);
    let first_body = first.bytes().await.unwrap();
    served.kill_9();

    let restarted = workspace.serve(&[], &[]);
    let (status, session) = status_and_json(restarted.get_session(&key, id).await).await;
    assert_eq!((status, &session["state"]), (200, &json!("Created")), "{session}");
    let replayed = put(&restarted).await.unwrap();
    assert_eq!(replayed.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    assert_eq!(replayed.bytes().await.unwrap(), first_body, "the stored outcome survived too");
    let (status, cancelled) = status_and_json(restarted.cancel_session(&key, id).await).await;
    assert_eq!((status, &cancelled["state"]), (200, &json!("Cancelled")), "{cancelled}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_create_answered_before_a_kill_9_amid_concurrent_writes_survives_it() {
    // Many writers at once share write batches (group commit); the process dies while batches
    // are in flight. Every create that was answered 201 must be there after the restart.
    let workspace = Workspace::new();
    let (_, key) = workspace.merchant("Crashing Shop");
    let unlimited = ["--rate-limit-per-key", "0"];
    let mut served = workspace.serve(&unlimited, &[]);
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut writers: Vec<_> = (0..48)
        .map(|_| {
            let (client, url, key, answered) =
                (served.client.clone(), served.url.clone(), key.clone(), answered.clone());
            tokio::spawn(async move {
                loop {
                    let id = Uuid::new_v4();
                    let sent = client
                        .put(format!("{url}{BASE}/redirect-sessions/{id}"))
                        .header("x-api-key", &key)
                        .json(&new_transaction_intent())
                        .send()
                        .await;
                    match sent {
                        Ok(response) if response.status() == 201 => answered.lock().unwrap().push(id),
                        Ok(response) => panic!("create answered {} before the crash", response.status()),
                        Err(_) => return, // the server is gone
                    }
                }
            })
        })
        .collect();
    // 500 answered creates, then the crash. A writer that stops early (it panicked, or the
    // server went away) fails the test at once; the deadline only keeps anything else from
    // hanging the run.
    let enough = async {
        while answered.lock().unwrap().len() < 500 {
            if let Some(stopped) = writers.iter().position(|writer| writer.is_finished()) {
                let outcome = writers.swap_remove(stopped).await;
                panic!("a writer stopped before the crash ({outcome:?}): {:?}", served.lines());
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(120), enough).await.unwrap_or_else(|_| {
        panic!("500 creates were not answered within two minutes ({} were)", answered.lock().unwrap().len())
    });
    served.kill_9();
    for writer in writers {
        writer.await.unwrap();
    }

    let answered = answered.lock().unwrap().clone();
    let restarted = workspace.serve(&unlimited, &[]);
    for id in answered {
        let (status, session) = status_and_json(restarted.get_session(&key, id).await).await;
        assert_eq!(status, 200, "session {id} was answered 201 before the crash but is gone: {session}");
    }
}

/// One create sent with an `x-request-id`, and the answer when one came back.
struct Sent {
    id: Uuid,
    request_id: Uuid,
    answer: Option<(u16, Vec<u8>)>,
}

async fn put_with_request_id(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    id: Uuid,
    request_id: Uuid,
) -> reqwest::Result<Response> {
    client
        .put(format!("{url}{BASE}/redirect-sessions/{id}"))
        .header("x-api-key", key)
        .header("x-request-id", request_id.to_string())
        .json(&new_transaction_intent())
        .send()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_creates_across_a_kill_9_run_once_and_replay_every_acknowledged_answer() {
    // Writers send creates with an x-request-id while the process dies. After the restart each
    // is retried with its own id: an acknowledged one replays its answer byte for byte, and an
    // unacknowledged one either replays (it committed) or runs now: never "exists already",
    // which would mean the change had committed without its answer.
    let workspace = Workspace::new();
    let (_, key) = workspace.merchant("Retrying Shop");
    let unlimited = ["--rate-limit-per-key", "0"];
    let mut served = workspace.serve(&unlimited, &[]);
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Sent>::new()));
    let answered = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let writers: Vec<_> = (0..32)
        .map(|_| {
            let (client, url, key, sent, answered) =
                (served.client.clone(), served.url.clone(), key.clone(), sent.clone(), answered.clone());
            tokio::spawn(async move {
                loop {
                    let (id, request_id) = (Uuid::new_v4(), Uuid::new_v4());
                    let answer = match put_with_request_id(&client, &url, &key, id, request_id).await {
                        Ok(response) => match response.status().as_u16() {
                            201 => Some((201, response.bytes().await.map(|b| b.to_vec()).unwrap_or_default())),
                            other => panic!("create answered {other} before the crash"),
                        },
                        Err(_) => None, // the server is gone
                    };
                    let done = answer.is_none();
                    sent.lock().unwrap().push(Sent { id, request_id, answer });
                    if done {
                        return;
                    }
                    answered.add_permits(1);
                }
            })
        })
        .collect();
    // 400 acknowledged creates, then the crash (waiting on answers, not on a clock).
    tokio::time::timeout(std::time::Duration::from_secs(120), answered.acquire_many(400))
        .await
        .expect("400 creates are answered within two minutes")
        .unwrap()
        .forget();
    served.kill_9();
    for writer in writers {
        writer.await.unwrap();
    }

    let sent = std::mem::take(&mut *sent.lock().unwrap());
    assert!(sent.iter().any(|s| s.answer.is_none()), "some creates were cut off by the crash");
    let restarted = workspace.serve(&unlimited, &[]);
    for Sent { id, request_id, answer } in sent {
        let retry = put_with_request_id(&restarted.client, &restarted.url, &key, id, request_id).await.unwrap();
        let status = retry.status().as_u16();
        let replayed = retry.headers().get("idempotent-replayed").is_some();
        let body = retry.bytes().await.unwrap().to_vec();
        match answer {
            Some((first_status, first_body)) => {
                assert!(replayed, "the acknowledged create {id} was not replayed after the crash");
                assert_eq!((status, &body), (first_status, &first_body), "session {id}");
            }
            None => assert_eq!(status, 201, "the retry of {id} found its session without its answer"),
        }
    }
}

#[tokio::test]
async fn sigterm_stops_the_server_gracefully_with_exit_status_0() {
    let workspace = Workspace::new();
    let (_, key) = workspace.merchant("Stopping Shop");
    let mut served = workspace.serve(&[], &[]);
    // A pooled keep-alive connection stays open across the signal.
    assert_eq!(served.put_session(&key, Uuid::new_v4(), &new_transaction_intent()).await.status(), 201);

    served.terminate();
    let status = served.wait_for_exit();
    assert_eq!(status.code(), Some(0), "{status}: {:?}", served.lines());
    let lines = served.lines();
    assert!(lines.iter().any(|l| l.contains("stopped")), "{lines:?}");
}

#[tokio::test]
async fn a_request_in_flight_at_sigterm_gets_its_answer_and_new_connections_are_refused() {
    let workspace = Workspace::new();
    let (_, key) = workspace.merchant("Draining Shop");
    let receiver = Receiver::silent().await;
    let mut served = workspace.serve(&[], &[("REDIRECT_SESSIONS_ALLOW_PRIVATE_CALLBACKS", "true")]);
    let id = Uuid::new_v4();
    let body = subscription_body(&receiver.url(), "receiver-key", &["RedirectSessionCancelled"]);
    let created = served.request(Method::PUT, &subscription_path(id), &key).json(&body).send().await.unwrap();
    let (status, created) = status_and_json(created).await;
    assert_eq!(status, 201, "{created}");

    // The test event waits at the receiver, so the request is in flight when the signal comes.
    let in_flight = served.request(Method::POST, &format!("{}/test", subscription_path(id)), &key).send();
    let in_flight = tokio::spawn(in_flight);
    receiver.wait_for_requests(1).await;
    served.terminate();

    let address = served.url.trim_start_matches("http://").to_owned();
    let mut refused = false;
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(&address).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(refused, "the listener still accepts connections after SIGTERM: {:?}", served.lines());

    receiver.release_silenced();
    let (status, answer) = status_and_json(in_flight.await.unwrap().unwrap()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!((answer["success"].clone(), answer["statusCode"].clone()), (json!(false), json!(503)), "{answer}");
    let status = served.wait_for_exit();
    assert_eq!(status.code(), Some(0), "{status}: {:?}", served.lines());
}

#[test]
fn migrate_on_a_fresh_file_exits_0_and_again_changes_nothing() {
    let workspace = Workspace::new();
    let url = workspace.database_url();
    for _ in 0..2 {
        let finished = run(workspace.command(&["migrate", "--database-url", &url]));
        assert_eq!(finished.code, Some(0), "{finished:?}");
        assert_eq!(finished.single_json_line(), json!({"migrated": true}));
        assert!(workspace.database.is_migrated());
    }
}

#[tokio::test]
async fn signing_key_rotate_makes_serve_publish_the_new_key_beside_the_old_one() {
    let workspace = Workspace::new();
    let jwks = |served: &Served| served.client.get(format!("{}/.well-known/jwks.json", served.url)).send();
    let kids = |jwks: &Value| -> Vec<String> {
        jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect()
    };
    let mut served = workspace.serve(&[], &[]);
    let (_, first) = status_and_json(jwks(&served).await.unwrap()).await;
    let first = kids(&first);
    assert_eq!(first.len(), 1, "{first:?}");
    served.kill_9();

    let rotated = workspace.admin(&["signing-key", "rotate"]);
    let new_kid = rotated["kid"].as_str().unwrap_or_else(|| panic!("{{\"kid\"}}: {rotated}")).to_owned();
    let served = workspace.serve(&[], &[]);
    let (_, after) = status_and_json(jwks(&served).await.unwrap()).await;
    assert_eq!(kids(&after), [new_kid, first[0].clone()], "current first, then the previous: {after}");
}

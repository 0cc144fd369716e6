//! A PostgreSQL outage while `serve` (the real binary) runs: during the outage requests answer
//! `503 ServiceUnavailable` with `Retry-After` — promptly, not hanging and not `500` — and
//! `/health/ready` is `503` while `/health/live` stays `200`; once PostgreSQL is back the same
//! process recovers by itself, with the data from before.
//!
//! The test runs a private PostgreSQL cluster of its own (initdb + pg_ctl on a free port, as the
//! `postgres` OS user when the tests run as root, since initdb refuses root), so it can stop and
//! start the server at will. When it cannot (no PostgreSQL server binaries, `initdb` or
//! `pg_ctl start` failing) it says it was skipped, and passes; under `CI=true` it fails instead,
//! so that CI never counts a test that did not run as passed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::binary::{command, Served};
use crate::common::{new_transaction_intent, BASE};
use reqwest::{Client, Method, Response};
use serde_json::{json, Value};
use uuid::Uuid;

/// A request that takes longer than this hangs, as far as this test is concerned.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the service may take to recover once PostgreSQL is back.
const RECOVERY: Duration = Duration::from_secs(60);
/// The OS user that owns the cluster when the tests run as root.
const CLUSTER_OWNER: &str = "postgres";

/// Whether the tests run in CI (`CI=true`), where a test that cannot run must fail.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value.eq_ignore_ascii_case("true") || value == "1")
}

/// Skips the test saying why; under `CI=true` fails it instead.
fn skip(why: &str) {
    assert!(!in_ci(), "CI=true, so this test may not be skipped: {why}");
    // Straight to the stream: libtest hides `println!` output of passing tests.
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

// ---------------------------------------------------------------------------------------------
// A private PostgreSQL cluster

/// The directory of `initdb`, `pg_ctl` and `postgres`: PostgreSQL 15's, else the newest
/// installed.
fn postgres_bin_dir() -> Option<PathBuf> {
    let has_all = |dir: &Path| ["initdb", "pg_ctl", "postgres"].iter().all(|b| dir.join(b).is_file());
    let preferred = PathBuf::from("/usr/lib/postgresql/15/bin");
    if has_all(&preferred) {
        return Some(preferred);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let entry = e.ok()?;
            Some((entry.file_name().to_str()?.parse().ok()?, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_all(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A cluster in a temporary directory on a port of its own, stopped and removed when dropped.
struct Cluster {
    bin: PathBuf,
    /// Holds `data/`, the socket directory and the server log.
    dir: tempfile::TempDir,
    port: u16,
    as_owner: bool,
}

impl Cluster {
    /// Creates and starts a cluster, or answers why it cannot.
    fn start() -> Result<Cluster, String> {
        let bin = postgres_bin_dir().ok_or("no PostgreSQL server binaries (initdb, pg_ctl, postgres) found")?;
        let as_owner = running_as_root();
        if as_owner {
            let known = Command::new("id").arg(CLUSTER_OWNER).output().is_ok_and(|o| o.status.success());
            if !known {
                return Err(format!("running as root and there is no `{CLUSTER_OWNER}` user to own a cluster"));
            }
            if Command::new("runuser").arg("--help").output().is_err() {
                return Err("running as root and `runuser` is missing".to_owned());
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("rs-outage-")
            .tempdir_in("/tmp")
            .map_err(|e| format!("no temporary directory: {e}"))?;
        std::fs::create_dir(dir.path().join("socket")).map_err(|e| e.to_string())?;
        if as_owner {
            let chown = Command::new("chown")
                .args(["-R", &format!("{CLUSTER_OWNER}:")])
                .arg(dir.path())
                .output()
                .map_err(|e| format!("chown: {e}"))?;
            if !chown.status.success() {
                return Err(format!("chown failed: {}", String::from_utf8_lossy(&chown.stderr)));
            }
        }
        let port = free_port();
        let cluster = Cluster { bin, dir, port, as_owner };
        let data = cluster.data();
        let initdb = cluster.run(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "--no-instructions"],
        )?;
        if !initdb.status.success() {
            return Err(format!("initdb failed: {}", String::from_utf8_lossy(&initdb.stderr)));
        }
        cluster.pg_ctl_start()?;
        Ok(cluster)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs one of the cluster's programs (as its owner when we are root).
    fn run(&self, program: &str, args: &[&str]) -> Result<Output, String> {
        let program = self.bin.join(program);
        let mut command = if self.as_owner {
            let mut command = Command::new("runuser");
            command.args(["-u", CLUSTER_OWNER, "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        };
        command.args(args).current_dir("/tmp").stdin(Stdio::null());
        command.output().map_err(|e| format!("cannot run {}: {e}", program.display()))
    }

    /// Starts the server on the cluster's port and waits until it accepts connections.
    fn pg_ctl_start(&self) -> Result<(), String> {
        let socket = self.dir.path().join("socket").display().to_string();
        let options = format!("-p {} -k {socket} -c listen_addresses=127.0.0.1 -c fsync=off", self.port);
        let log = self.dir.path().join("server.log").display().to_string();
        let started =
            self.run("pg_ctl", &["-D", &self.data(), "-l", &log, "-o", &options, "-w", "-t", "60", "start"])?;
        if started.status.success() {
            Ok(())
        } else {
            Err(format!("pg_ctl start failed: {} {}", String::from_utf8_lossy(&started.stderr), self.log()))
        }
    }

    /// `pg_ctl stop -m fast`: every session is disconnected, the server goes away.
    fn stop_fast(&self) {
        let stopped = self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "-t", "60", "stop"]).unwrap();
        assert!(stopped.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&stopped.stderr));
    }

    fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Stopped or not, it must not outlive the test; the directory goes with `dir`.
        let _ = self.run("pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "-t", "30", "stop"]);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------------
// Requests

/// A request that must be answered within `CLIENT_TIMEOUT`.
async fn send(client: &Client, method: Method, url: String, key: &str, body: Option<&Value>) -> Response {
    let started = Instant::now();
    let mut request = client.request(method.clone(), &url).header("x-api-key", key);
    if let Some(body) = body {
        request = request.json(body);
    }
    match request.send().await {
        Ok(response) => response,
        Err(error) if error.is_timeout() => {
            panic!("{method} {url} hung: no answer within {CLIENT_TIMEOUT:?} ({:?})", started.elapsed())
        }
        Err(error) => panic!("{method} {url}: {error}"),
    }
}

/// Asserts `503 ServiceUnavailable` with a usable `Retry-After`.
async fn assert_unavailable(response: Response, what: &str) {
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    assert_eq!(status, 503, "{what} during the outage: {text}");
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"));
    assert_eq!(body["code"], "ServiceUnavailable", "{what}: {body}");
    let seconds: u64 = retry_after
        .as_deref()
        .unwrap_or_else(|| panic!("{what}: no Retry-After"))
        .parse()
        .unwrap_or_else(|_| panic!("{what}: Retry-After {retry_after:?} is not whole seconds"));
    assert!(seconds >= 1, "{what}: Retry-After {seconds}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_gives_503_during_the_outage_and_the_service_recovers_by_itself() {
    let cluster = match Cluster::start() {
        Ok(cluster) => cluster,
        Err(why) => return skip(&format!("cannot run a private PostgreSQL cluster: {why}")),
    };
    let (admin, connection) = tokio_postgres::connect(&cluster.admin_url(), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("the private cluster answers: {e}\n{}", cluster.log()));
    tokio::spawn(connection);
    admin.batch_execute("CREATE DATABASE redirect_sessions").await.unwrap();
    drop(admin);
    let database_url = cluster.url("redirect_sessions");
    let pool_flags = ["--database-acquire-timeout", "2s", "--database-connect-timeout", "2s"];

    let mut merchant = vec!["merchant", "create", "--name", "Outage Shop", "--database-url", &database_url];
    merchant.extend(pool_flags);
    let created = command(&merchant).output().unwrap();
    assert!(created.status.success(), "{created:?}");
    let created: Value = serde_json::from_slice(&created.stdout).unwrap();
    let key = created["apiKey"].as_str().unwrap().to_owned();

    let mut serve = vec!["serve", "--listen", "127.0.0.1:0", "--database-url", &database_url];
    serve.extend(pool_flags);
    let served = Served::start(&serve);
    let client = Client::builder().timeout(CLIENT_TIMEOUT).build().unwrap();
    let session_url = |id: Uuid| format!("{}{BASE}/redirect-sessions/{id}", served.url);

    let before = Uuid::new_v4();
    let response = send(&client, Method::PUT, session_url(before), &key, Some(&new_transaction_intent())).await;
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    let response = send(&client, Method::GET, format!("{}/health/ready", served.url), &key, None).await;
    assert_eq!(response.status(), 200);

    // --- The outage.
    cluster.stop_fast();
    let outage = Instant::now();
    // Several rounds: the first meets the pooled connections the server closed, later ones
    // meet a refused connect.
    for round in 1..=3 {
        let read = send(&client, Method::GET, session_url(before), &key, None).await;
        assert_unavailable(read, &format!("a read (round {round})")).await;
        let create =
            send(&client, Method::PUT, session_url(Uuid::new_v4()), &key, Some(&new_transaction_intent())).await;
        assert_unavailable(create, &format!("a create (round {round})")).await;
        let ready = send(&client, Method::GET, format!("{}/health/ready", served.url), &key, None).await;
        assert_unavailable(ready, &format!("/health/ready (round {round})")).await;
        let live = send(&client, Method::GET, format!("{}/health/live", served.url), &key, None).await;
        assert_eq!(live.status(), 200, "/health/live answers while the database is down");
    }
    let answered_in = outage.elapsed() / 12;

    // --- PostgreSQL is back (same data directory, same port); `serve` is not restarted.
    cluster.pg_ctl_start().unwrap_or_else(|e| panic!("the cluster restarts: {e}"));
    let back = Instant::now();
    let deadline = back + RECOVERY;
    let session = loop {
        let response = send(&client, Method::GET, session_url(before), &key, None).await;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        if status == 200 {
            break serde_json::from_str::<Value>(&text).unwrap();
        }
        assert_eq!(status, 503, "while recovering, reads answer 503 or 200: {text}");
        assert!(
            Instant::now() < deadline,
            "the service did not recover within {RECOVERY:?} of PostgreSQL's restart: {text}\n{:?}",
            served.lines()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = writeln!(
        std::io::stderr(),
        "outage: answers took {answered_in:?} on average; reads succeeded {:?} after PostgreSQL was back",
        back.elapsed()
    );
    assert_eq!((&session["id"], &session["state"]), (&json!(before), &json!("Created")), "{session}");
    let response = send(&client, Method::PUT, session_url(Uuid::new_v4()), &key, Some(&new_transaction_intent())).await;
    assert_eq!(response.status(), 201, "a create works again: {}", response.text().await.unwrap());
    let response = send(&client, Method::GET, format!("{}/health/ready", served.url), &key, None).await;
    assert_eq!(response.status(), 200, "ready again");
    let lines = served.lines();
    assert!(lines.iter().all(|l| !l.contains("panicked")), "{lines:?}");
    drop(served);
    drop(cluster);
}

//! `loadgen`: the reproducible load benchmark. It starts the release server on a fresh
//! database, creates a merchant, and measures each scenario for a fixed time with many
//! concurrent keep-alive connections, printing a Markdown table for `docs/BENCHMARKS.md`.
//!
//! Writes go out as merchants send them: every create and every cancel carries a fresh
//! `x-request-id` (a random UUID v4), so the server's idempotency layer is part of what is
//! measured; `--no-request-id` leaves the header out. Reads carry none. The scenarios
//! (`--scenarios`, comma-separated; the default leaves out the `-bare` ones):
//! - `ceiling`: `GET /health/live`, the HTTP stack alone; the other rows are compared with it.
//! - `create`: `PUT` sessions with fresh ids; `create-bare`: the same without `x-request-id`.
//! - `replay`: the creates sent again (same path, body bytes and `x-request-id`); the server
//!   answers the stored `201` with `idempotent-replayed: true`, and any other answer is an error.
//! - `read`: `GET` the created sessions.
//! - `cancel`: cancel each created session once; `cancel-bare`: the same without `x-request-id`.
//!   Together they split the created sessions in two halves.
//! - `pay`: the hosted page with a browser's cookie.
//! - `webhooks`: deliveries to a local receiver (its ceiling, a backlog drained, end to end, idle).
//! - `recover` (not in the default): 100,000 deliveries fail for good at a receiver answering
//!   500, then the receiver answers 204 and one `POST …/subscriptions/{id}/recover` queues them
//!   all again: how long the recovery takes to answer, and how fast its deliveries drain.
//!
//! The table names the variant of every write row, so one run can measure both against one
//! ceiling:
//!
//! cargo build --release --bins && ./target/release/loadgen --connections 256 --duration 10s \
//!     --scenarios ceiling,create,create-bare,replay,read,cancel,cancel-bare,pay,webhooks
//! ./target/release/loadgen --connections 256 --scenarios ceiling,recover

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use redirect_sessions::config::parse_duration;
use tokio::net::TcpStream;
use uuid::Uuid;

const BASE: &str = "/customer-authentication-service/v1";

/// Every scenario `--scenarios` knows, in the order they run.
const SCENARIOS: [&str; 10] =
    ["ceiling", "create", "create-bare", "replay", "read", "cancel", "cancel-bare", "pay", "webhooks", "recover"];

struct Args {
    connections: usize,
    duration: Duration,
    server: PathBuf,
    scenarios: Vec<String>,
    prefill: usize,
    /// An admin URL of a PostgreSQL server: the benchmark creates (and drops) its own database.
    postgres: Option<String>,
    instances: usize,
    /// Whether creates and cancels carry a fresh `x-request-id` (`--no-request-id`: no).
    request_id: bool,
}

impl Args {
    fn wants(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }

    /// The variants of the write scenario `name` this run wants, as whether they send an
    /// `x-request-id`: `name` as `--no-request-id` says, then `name-bare` without one.
    fn variants(&self, name: &str) -> Vec<bool> {
        let wanted = [(self.wants(name), self.request_id), (self.wants(&format!("{name}-bare")), false)];
        wanted.into_iter().filter_map(|(wanted, request_id)| wanted.then_some(request_id)).collect()
    }
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        connections: 256,
        duration: Duration::from_secs(10),
        server: PathBuf::from("target/release/redirect-sessions"),
        scenarios: ["ceiling", "create", "replay", "read", "cancel", "pay", "webhooks"].map(str::to_owned).to_vec(),
        prefill: 0,
        postgres: None,
        instances: 1,
        request_id: true,
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        let mut value = || words.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--connections" => args.connections = value()?.parse().map_err(|_| "--connections: a number")?,
            "--duration" => args.duration = parse_duration(&value()?)?,
            "--server" => args.server = PathBuf::from(value()?),
            "--scenarios" => args.scenarios = value()?.split(',').map(str::to_owned).collect(),
            "--prefill" => args.prefill = value()?.parse().map_err(|_| "--prefill: a number")?,
            "--postgres" => args.postgres = Some(value()?),
            "--instances" => args.instances = value()?.parse().map_err(|_| "--instances: a number")?,
            "--no-request-id" => args.request_id = false,
            _ => {
                return Err(format!(
                    "unknown flag {flag}; flags: --connections N --duration 10s --server PATH --scenarios {} \
                     --prefill N --postgres ADMIN_URL --instances N --no-request-id",
                    SCENARIOS.join(",")
                ))
            }
        }
    }
    if let Some(unknown) = args.scenarios.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        return Err(format!("unknown scenario {unknown}; scenarios: {}", SCENARIOS.join(",")));
    }
    if args.instances == 0 || (args.instances > 1 && args.postgres.is_none()) {
        return Err("--instances above 1 needs --postgres (one SQLite file serves one instance)".to_owned());
    }
    Ok(args)
}

fn main() {
    let args = match args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    runtime.block_on(run(args));
}

/// The key every server of this run encrypts its secrets with (PostgreSQL requires one; the
/// environment's `REDIRECT_SESSIONS_SECRETS_KEY` when set).
static SECRETS_KEY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use base64::Engine;
    std::env::var("REDIRECT_SESSIONS_SECRETS_KEY").unwrap_or_else(|_| {
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).expect("random bytes");
        base64::engine::general_purpose::STANDARD.encode(key)
    })
});

/// The servers under test (one per instance, one database), killed on drop.
struct Server {
    children: Vec<Child>,
    addresses: Vec<SocketAddr>,
    dir: PathBuf,
    database: String,
    /// The admin URL and the name of the PostgreSQL database to drop at the end.
    postgres: Option<(String, String)>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some((admin, name)) = &self.postgres {
            psql(admin, &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        }
    }
}

fn psql(url: &str, sql: &str) -> String {
    let output = Command::new("psql").args([url, "-Atqc", sql]).output().expect("psql runs");
    assert!(output.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

impl Server {
    /// Starts `instances` servers on a fresh database: a SQLite file in a new temporary
    /// directory, or a new database on the PostgreSQL server of `postgres` (an admin URL).
    fn start(binary: &Path, postgres: Option<&str>, instances: usize, extra: &[&str]) -> Server {
        let dir = std::env::temp_dir().join(format!("loadgen-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let (database, postgres) = match postgres {
            None => (format!("sqlite://{}/bench.db", dir.display()), None),
            Some(admin) => {
                let name = format!("rs_bench_{}", Uuid::new_v4().simple());
                psql(admin, &format!("CREATE DATABASE {name}"));
                let (base, _) = admin.rsplit_once('/').expect("a URL with a database name");
                (format!("{base}/{name}"), Some((admin.to_owned(), name)))
            }
        };
        let mut server = Server { children: Vec::new(), addresses: Vec::new(), dir, database, postgres };
        server.spawn_all(binary, instances, extra);
        server
    }

    fn spawn_all(&mut self, binary: &Path, instances: usize, extra: &[&str]) {
        for _ in 0..instances {
            let (child, address) = Self::spawn(binary, &self.database, extra);
            self.children.push(child);
            self.addresses.push(address);
        }
    }

    fn stop(&mut self) {
        for child in &mut self.children {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        }
        for mut child in self.children.drain(..) {
            let _ = child.wait();
        }
        self.addresses.clear();
    }

    /// Stops the servers and starts them again on the same database with `extra` flags.
    fn restart(&mut self, binary: &Path, extra: &[&str]) {
        let instances = self.children.len();
        self.stop();
        self.spawn_all(binary, instances, extra);
    }

    /// The first instance, for single-connection steps.
    fn first(&self) -> SocketAddr {
        self.addresses[0]
    }

    fn spawn(binary: &Path, database: &str, extra: &[&str]) -> (Child, SocketAddr) {
        let mut child = Command::new(binary)
            .env("REDIRECT_SESSIONS_SECRETS_KEY", &*SECRETS_KEY)
            .args(["serve", "--listen", "127.0.0.1:0", "--database-url", database, "--rate-limit-per-key", "0"])
            .args(["--allow-private-callbacks", "--allow-http-redirect-urls", "--log", "info"])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}; run `cargo build --release` first", binary.display()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let (found, address) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let echo = std::env::var_os("LOADGEN_SERVER_LOG").is_some();
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("server: {line}");
                }
                if let Some(at) = line.find("address=") {
                    let text = line[at + 8..].split_whitespace().next().unwrap_or("");
                    if let Ok(address) = text.parse::<SocketAddr>() {
                        let _ = found.send(address);
                    }
                }
            }
        });
        let address = address.recv_timeout(Duration::from_secs(30)).expect("the server logs its address");
        (child, address)
    }

    fn create_merchant(&self, binary: &Path) -> String {
        let output = Command::new(binary)
            .env("REDIRECT_SESSIONS_SECRETS_KEY", &*SECRETS_KEY)
            .args(["merchant", "create", "--name", "Bench", "--database-url", &self.database])
            .output()
            .expect("merchant create runs");
        let created: serde_json::Value = serde_json::from_slice(&output.stdout).expect("merchant create prints JSON");
        created["apiKey"].as_str().expect("an apiKey").to_owned()
    }

    /// The highest peak resident set size of the instances, in MiB.
    fn peak_rss_mib(&self) -> f64 {
        let peak = |child: &Child| {
            let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .map_or(0.0, |kib| kib / 1024.0)
        };
        self.children.iter().map(peak).fold(0.0, f64::max)
    }

    /// CPU time (user and system) the instances have used so far.
    fn cpu_time(&self) -> Duration {
        // utime and stime are fields 14 and 15 of /proc/<pid>/stat, in clock ticks (100 Hz on
        // Linux); the command name before them is in parentheses and may hold spaces.
        let ticks = |child: &Child| -> u64 {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap_or_default();
            let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            after_name.split_whitespace().skip(11).take(2).filter_map(|t| t.parse::<u64>().ok()).sum()
        };
        Duration::from_millis(self.children.iter().map(ticks).sum::<u64>() * 10)
    }

    /// Runs `scenario` and records the server CPU time it took.
    async fn measured(&self, scenario: impl std::future::Future<Output = Stats>) -> Stats {
        let before = self.cpu_time();
        let mut stats = scenario.await;
        stats.server_cpu = Some(self.cpu_time().saturating_sub(before));
        stats
    }

    /// Bytes the database takes, and of those the SQLite WAL's: the file grows to the most it
    /// held between two checkpoints and stays that size. PostgreSQL: the database's size.
    fn database_bytes(&self) -> (u64, u64) {
        let size = |file: &str| std::fs::metadata(self.dir.join(file)).map_or(0, |m| m.len());
        match &self.postgres {
            Some(_) => (psql(&self.database, "SELECT pg_database_size(current_database())").parse().unwrap_or(0), 0),
            None => (size("bench.db") + size("bench.db-wal"), size("bench.db-wal")),
        }
    }
}

/// What one scenario measured.
struct Stats {
    name: String,
    requests: usize,
    errors: usize,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    /// CPU time the server processes used during the scenario, when measured. Steadier than
    /// requests/s on a machine the load generator shares.
    server_cpu: Option<Duration>,
}

impl Stats {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let index = ((self.latencies_us.len() as f64 * p).ceil() as usize).clamp(1, self.latencies_us.len()) - 1;
        f64::from(self.latencies_us[index]) / 1000.0
    }
}

type MakeRequest = Arc<dyn Fn(usize) -> Option<Request<Full<Bytes>>> + Send + Sync>;

/// The answer a scenario counts as done; any other is an error.
#[derive(Clone, Copy)]
struct Expect {
    status: u16,
    /// Whether the answer is a stored one replayed (`idempotent-replayed: true`).
    replayed: bool,
}

impl Expect {
    /// `status`, from a request the server executed (not a replay).
    const fn status(status: u16) -> Expect {
        Expect { status, replayed: false }
    }

    fn met_by<B>(self, response: &hyper::Response<B>) -> bool {
        let replayed = response.headers().get("idempotent-replayed").is_some_and(|value| value == "true");
        response.status() == self.status && replayed == self.replayed
    }
}

/// Runs `make` on `connections` connections for `duration` (or until it answers `None`).
async fn load(
    name: &str,
    targets: &[SocketAddr],
    connections: usize,
    duration: Duration,
    expect: Expect,
    make: MakeRequest,
) -> Stats {
    eprintln!("{name}…");
    let sequence = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..connections)
        .map(|worker| {
            let (make, sequence) = (make.clone(), sequence.clone());
            let address = targets[worker % targets.len()];
            tokio::spawn(async move {
                let (mut done, mut errors, mut latencies) = (0usize, 0usize, Vec::new());
                let mut sender = None;
                while Instant::now() < deadline {
                    if sender.is_none() {
                        sender = connect(address).await;
                        if sender.is_none() {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                    let Some(request) = make(sequence.fetch_add(1, Ordering::Relaxed)) else { break };
                    let sent = Instant::now();
                    let answer = sender.as_mut().expect("connected").send_request(request).await;
                    match answer {
                        Ok(response) => {
                            let met = expect.met_by(&response);
                            let _ = response.into_body().collect().await;
                            latencies.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                            if met {
                                done += 1;
                            } else {
                                errors += 1;
                            }
                        }
                        Err(_) => {
                            errors += 1;
                            sender = None;
                        }
                    }
                }
                (done, errors, latencies)
            })
        })
        .collect();
    let mut stats = Stats {
        name: name.to_owned(),
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
        server_cpu: None,
    };
    for worker in workers {
        let (done, errors, latencies) = worker.await.expect("a worker finishes");
        stats.requests += done;
        stats.errors += errors;
        stats.latencies_us.extend(latencies);
    }
    stats.elapsed = started.elapsed().min(duration.max(Duration::from_millis(1)));
    stats.latencies_us.sort_unstable();
    stats
}

async fn connect(address: SocketAddr) -> Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(address).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(connection);
    Some(sender)
}

/// A merchant API request; `request_id` goes out as its `x-request-id`.
fn request(
    method: Method,
    address: SocketAddr,
    path: &str,
    key: &str,
    body: Option<Bytes>,
    request_id: Option<Uuid>,
) -> Request<Full<Bytes>> {
    let mut builder =
        Request::builder().method(method).uri(path).header("host", address.to_string()).header("x-api-key", key);
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    if let Some(request_id) = request_id {
        builder = builder.header("x-request-id", request_id.to_string());
    }
    builder.body(Full::new(body.unwrap_or_default())).expect("a valid request")
}

const SESSION_BODY: &str = r#"{"type":"NewTransactionIntent","transactionData":{"type":"PassthroughWithdrawal","amount":100.5,"currency":"EUR","externalReference":"bench-0001"},"redirectData":{"successUrl":"https://shop.example/ok","failureUrl":"https://shop.example/failed","abortUrl":"https://shop.example/aborted","qrCodeSuccessUrl":"https://shop.example/qr"},"locale":"de-DE"}"#;

/// Creates session `id` with `SESSION_BODY`: the same bytes every time, so a replay matches.
fn create_request(address: SocketAddr, key: &str, id: Uuid, request_id: Option<Uuid>) -> Request<Full<Bytes>> {
    let body = Some(Bytes::from_static(SESSION_BODY.as_bytes()));
    request(Method::PUT, address, &format!("{BASE}/redirect-sessions/{id}"), key, body, request_id)
}

fn cancel_request(address: SocketAddr, key: &str, id: Uuid, request_id: Option<Uuid>) -> Request<Full<Bytes>> {
    request(Method::POST, address, &format!("{BASE}/redirect-sessions/{id}/cancel"), key, None, request_id)
}

/// How a row says whether its writes carry an `x-request-id`.
fn header_label(request_id: bool) -> &'static str {
    if request_id {
        "x-request-id"
    } else {
        "no x-request-id"
    }
}

/// A session a create made, with the `x-request-id` the create carried.
#[derive(Clone, Copy)]
struct Created {
    id: Uuid,
    request_id: Option<Uuid>,
}

/// Creates sessions with fresh ids, each with a fresh `x-request-id` when `request_id`;
/// answers the stats and the sessions created.
async fn create_sessions(
    name: &str,
    server: &Server,
    key: &str,
    connections: usize,
    duration: Duration,
    limit: usize,
    request_id: bool,
) -> (Stats, Vec<Created>) {
    let sessions: Vec<Created> =
        (0..limit).map(|_| Created { id: Uuid::new_v4(), request_id: request_id.then(Uuid::new_v4) }).collect();
    let (address, key, list) = (server.first(), key.to_owned(), Arc::new(sessions));
    let make: MakeRequest = {
        let list = list.clone();
        Arc::new(move |n| list.get(n).map(|session| create_request(address, &key, session.id, session.request_id)))
    };
    let stats = server.measured(load(name, &server.addresses, connections, duration, Expect::status(201), make)).await;
    let created = list.iter().take(stats.requests + stats.errors).copied().collect();
    (stats, created)
}

/// Creates `n` sessions (with an `x-request-id` each when `request_id`) and arrives on the
/// hosted page with each token as a browser does (a form POST); answers the cookies the page
/// handed out.
async fn arrived_browsers(address: SocketAddr, key: &str, n: usize, request_id: bool) -> Vec<String> {
    let mut sender = connect(address).await.expect("the server answers");
    let mut cookies = Vec::with_capacity(n);
    for _ in 0..n {
        let create = create_request(address, key, Uuid::new_v4(), request_id.then(Uuid::new_v4));
        sender.ready().await.expect("the connection stays open");
        let response = sender.send_request(create).await.expect("created");
        let body = response.into_body().collect().await.expect("a body").to_bytes();
        let session: serde_json::Value = serde_json::from_slice(&body).expect("a session");
        let token = session["token"].as_str().expect("a token");
        let form = url::form_urlencoded::Serializer::new(String::new()).append_pair("token", token).finish();
        let arrival = Request::builder()
            .method(Method::POST)
            .uri("/pay")
            .header("host", address.to_string())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form)))
            .expect("valid");
        sender.ready().await.expect("the connection stays open");
        let response = sender.send_request(arrival).await.expect("arrived");
        assert_eq!(response.status(), 303, "arriving on the hosted page");
        let cookie = response.headers()["set-cookie"].to_str().expect("ASCII");
        cookies.push(cookie.split(';').next().expect("a cookie").to_owned());
        let _ = response.into_body().collect().await;
    }
    cookies
}

/// When each session's event first arrived at a receiver.
type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// A webhook receiver answering 204 that records when each session's event arrived.
async fn receiver() -> (SocketAddr, Arrivals) {
    let (address, arrivals, _) = switchable_receiver().await;
    (address, arrivals)
}

/// Like `receiver`, answering with the status in the returned cell (204 at first).
async fn switchable_receiver() -> (SocketAddr, Arrivals, Arc<AtomicU16>) {
    let arrivals: Arrivals = Arc::default();
    let answer = Arc::new(AtomicU16::new(204));
    let (seen, status) = (arrivals.clone(), answer.clone());
    let app = axum::Router::new().route(
        "/hook",
        post(move |body: Bytes| {
            let (seen, status) = (seen.clone(), status.clone());
            async move {
                let at = Instant::now();
                // The session id follows `"data":{"id":"`; finding it beats parsing the event.
                let text = String::from_utf8_lossy(&body);
                if let Some(id) = text.split(r#""data":{"id":""#).nth(1).and_then(|rest| rest.get(..36)) {
                    seen.lock().expect("not poisoned").entry(id.to_owned()).or_insert(at);
                }
                axum::http::StatusCode::from_u16(status.load(Ordering::Relaxed)).expect("a status")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let address = listener.local_addr().expect("an address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, arrivals, answer)
}

/// Subscribes `hook` to cancellations; answers the subscription's id.
async fn subscribe(server: &Server, key: &str, hook: SocketAddr) -> Uuid {
    let id = Uuid::new_v4();
    let subscription =
        format!(r#"{{"callbackUrl":"http://{hook}/hook","apiKey":"bench","eventTypes":["RedirectSessionCancelled"]}}"#);
    let path = format!("{BASE}/redirect-session-events/subscriptions/{id}");
    let put = request(Method::PUT, server.first(), &path, key, Some(Bytes::from(subscription)), None);
    let mut sender = connect(server.first()).await.expect("connects");
    let status = sender.send_request(put).await.expect("subscribes").status();
    assert_eq!(status, 201, "subscribing the receiver");
    id
}

/// A counter or gauge of the first instance's `/metrics`.
async fn metric(server: &Server, series: &str) -> f64 {
    let get = Request::builder()
        .uri("/metrics")
        .header("host", server.first().to_string())
        .body(Full::default())
        .expect("valid");
    let mut sender = connect(server.first()).await.expect("connects");
    let body = sender.send_request(get).await.expect("answers").into_body().collect().await.expect("a body");
    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    text.lines().find_map(|line| line.strip_prefix(&format!("{series} "))?.parse().ok()).unwrap_or(0.0)
}

/// How many deliveries the `recover` scenario makes fail and recovers in one request.
const RECOVERED: usize = 100_000;

/// `recover`: `RECOVERED` deliveries fail for good, then one recovery queues them all again
/// and they drain to the receiver, which answers 204 from then on.
async fn recover(server: &mut Server, key: &str, args: &Args, rows: &mut Vec<String>) {
    let (hook, arrivals, answer) = switchable_receiver().await;
    let subscription = subscribe(server, key, hook).await;
    // One retry a millisecond later: every delivery fails for good after two attempts.
    server.restart(&args.server, &["--webhook-retry-schedule", "1ms", "--webhook-concurrency-per-subscription", "256"]);
    answer.store(500, Ordering::Relaxed);
    let since = Instant::now();
    let wall_since = redirect_sessions::domain::time::Timestamp::now();
    let (_, sessions) = create_sessions(
        "create (to fail)",
        server,
        key,
        args.connections,
        Duration::from_secs(3600),
        RECOVERED,
        args.request_id,
    )
    .await;
    let make = cancels(server.first(), key, sessions, args.request_id, None);
    let cancelled = load(
        "cancel (to fail)",
        &server.addresses,
        args.connections,
        Duration::from_secs(3600),
        Expect::status(200),
        make,
    )
    .await;
    let failed_series = "redirect_sessions_webhook_deliveries_failed_total";
    let deadline = Instant::now() + Duration::from_secs(1200);
    while (metric(server, failed_series).await as usize) < cancelled.requests && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("{} deliveries failed for good in {:?}", cancelled.requests, since.elapsed());

    answer.store(204, Ordering::Relaxed);
    arrivals.lock().expect("not poisoned").clear();
    let window = format!(r#"{{"since":"{wall_since}"}}"#);
    let path = format!("{BASE}/redirect-session-events/subscriptions/{subscription}/recover");
    let post = request(Method::POST, server.first(), &path, key, Some(Bytes::from(window)), Some(Uuid::new_v4()));
    let mut sender = connect(server.first()).await.expect("connects");
    let started = Instant::now();
    let response = sender.send_request(post).await.expect("recovers");
    let answered = started.elapsed();
    let body = response.into_body().collect().await.expect("a body").to_bytes();
    let recovered: serde_json::Value = serde_json::from_slice(&body).expect("a JSON answer");
    let queued = recovered["queued"].as_u64().unwrap_or(0) as usize;
    let deadline = Instant::now() + Duration::from_secs(600);
    while arrivals.lock().expect("not poisoned").len() < queued && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = arrivals.lock().expect("not poisoned").len();
    let last = arrivals.lock().expect("not poisoned").values().max().copied().unwrap_or(started);
    rows.push(row(
        &Stats {
            name: format!("recover: one POST …/recover queues {queued} failed deliveries ({recovered})"),
            requests: 1,
            errors: usize::from(queued != cancelled.requests),
            elapsed: answered,
            latencies_us: vec![answered.as_micros() as u32],
            server_cpu: None,
        },
        None,
    ));
    rows.push(row(
        &Stats {
            name: format!("recover: drain the {queued} recovered deliveries (from the POST)"),
            requests: drained,
            errors: queued - drained,
            elapsed: last.saturating_duration_since(started),
            latencies_us: Vec::new(),
            server_cpu: None,
        },
        None,
    ));
    server.restart(&args.server, &[]);
}

async fn webhooks(server: &mut Server, key: &str, args: &Args, rows: &mut Vec<String>) {
    let (hook, arrivals) = receiver().await;
    // The receiver's own ceiling, measured by posting to it directly.
    let event = Bytes::from(r#"{"specversion":"1.0","data":{"id":"ceiling"}}"#);
    let make: MakeRequest =
        Arc::new(move |_| Some(request(Method::POST, hook, "/hook", "-", Some(event.clone()), None)));
    let ceiling =
        load("receiver ceiling (POST 204)", &[hook], args.connections, args.duration, Expect::status(204), make).await;
    rows.push(row(&ceiling, None));

    subscribe(server, key, hook).await;

    // Drain: queue deliveries with the dispatcher off, then start it and time the backlog.
    server.restart(&args.server, &["--no-webhook-dispatcher"]);
    let (_, backlog) = create_sessions(
        "create (for the backlog)",
        server,
        key,
        args.connections,
        args.duration,
        100_000,
        args.request_id,
    )
    .await;
    let make = cancels(server.first(), key, backlog, args.request_id, None);
    let queued = load(
        &format!("cancel (queues a delivery each, {})", header_label(args.request_id)),
        &server.addresses,
        args.connections,
        Duration::from_secs(3600),
        Expect::status(200),
        make,
    )
    .await;
    rows.push(row(&queued, None));
    arrivals.lock().expect("not poisoned").clear();
    let started = Instant::now();
    // The backlog's deliveries all go to one subscription: the server's default limit of
    // attempts in flight per subscription (16) would be what the drain measures.
    let drain_flags = ["--webhook-concurrency-per-subscription", "256"];
    server.restart(&args.server, &drain_flags);
    let deadline = Instant::now() + Duration::from_secs(300);
    while arrivals.lock().expect("not poisoned").len() < queued.requests && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = arrivals.lock().expect("not poisoned").len();
    let last = arrivals.lock().expect("not poisoned").values().max().copied().unwrap_or(started);
    let drain = Stats {
        name: format!("deliveries: drain a backlog of {} (incl. restart; {})", queued.requests, drain_flags.join(" ")),
        requests: drained,
        errors: queued.requests - drained,
        elapsed: last.saturating_duration_since(started),
        latencies_us: Vec::new(),
        server_cpu: None,
    };
    rows.push(row(&drain, Some(&ceiling)));
    // The rows below measure the server's defaults again.
    server.restart(&args.server, &[]);
    let mut sender = connect(server.first()).await.expect("connects");

    // Idle latency: one cancel at a time, waiting for its delivery.
    let (_, idle) =
        create_sessions("create (for webhooks)", server, key, 4, Duration::from_secs(60), 200, args.request_id).await;
    let mut idle_delays = Vec::new();
    for session in &idle {
        let cancel = cancel_request(server.first(), key, session.id, args.request_id.then(Uuid::new_v4));
        let response = sender.send_request(cancel).await.expect("cancels");
        let acknowledged = Instant::now();
        let _ = response.into_body().collect().await;
        let id = session.id.to_string();
        let arrived = loop {
            if let Some(at) = arrivals.lock().expect("not poisoned").get(&id).copied() {
                break at;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        idle_delays.push(arrived.saturating_duration_since(acknowledged).as_micros() as u32);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    idle_delays.sort_unstable();
    let idle = Stats {
        name: "commit → delivery, idle (one at a time)".to_owned(),
        requests: idle_delays.len(),
        errors: 0,
        elapsed: Duration::from_secs(1),
        latencies_us: idle_delays,
        server_cpu: None,
    };

    // Throughput: cancel many sessions as fast as possible and count deliveries per second.
    let (_, sessions) = create_sessions(
        "create (for webhooks)",
        server,
        key,
        args.connections,
        args.duration,
        400_000,
        args.request_id,
    )
    .await;
    arrivals.lock().expect("not poisoned").clear();
    let acknowledged: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let make = cancels(server.first(), key, sessions, args.request_id, Some(acknowledged.clone()));
    let started = Instant::now();
    let cancelled = load(
        &format!("cancel (with a subscriber, {})", header_label(args.request_id)),
        &server.addresses,
        args.connections,
        args.duration,
        Expect::status(200),
        make,
    )
    .await;
    let expected = cancelled.requests;
    let deadline = Instant::now() + Duration::from_secs(120);
    while arrivals.lock().expect("not poisoned").len() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let arrived = arrivals.lock().expect("not poisoned").clone();
    let last = arrived.values().max().copied().unwrap_or(started);
    let acks = acknowledged.lock().expect("not poisoned");
    let mut delays: Vec<u32> = arrived
        .iter()
        .filter_map(|(id, at)| Some(at.saturating_duration_since(*acks.get(id)?).as_micros() as u32))
        .collect();
    delays.sort_unstable();
    let deliveries = Stats {
        name: "deliveries end to end (cancel → receiver)".to_owned(),
        requests: arrived.len(),
        errors: expected.saturating_sub(arrived.len()),
        elapsed: last.saturating_duration_since(started),
        latencies_us: delays,
        server_cpu: None,
    };
    rows.push(row(&cancelled, None));
    rows.push(row(&deliveries, Some(&ceiling)));
    rows.push(row(&idle, None).replace(&format!("{:.0}", idle.rate()), "—"));
}

/// Cancels each of `sessions` once, in the order of `spread`, each cancel with a fresh
/// `x-request-id` when `request_id`; notes in `sent`, when given, when each was sent.
fn cancels(
    address: SocketAddr,
    key: &str,
    sessions: Vec<Created>,
    request_id: bool,
    sent: Option<Arc<Mutex<HashMap<String, Instant>>>>,
) -> MakeRequest {
    let key = key.to_owned();
    Arc::new(move |n| {
        let session = sessions.get(spread(n, sessions.len()))?;
        if let Some(sent) = &sent {
            sent.lock().expect("not poisoned").insert(session.id.to_string(), Instant::now());
        }
        Some(cancel_request(address, &key, session.id, request_id.then(Uuid::new_v4)))
    })
}

/// The `n`th of `len` sessions in an order that jumps across the whole set (each one once):
/// reads and cancels then touch old and new sessions alike, not the pages just written in
/// creation order. `n` past the end stays past it.
fn spread(n: usize, len: usize) -> usize {
    // A stride coprime with `len` visits every index once.
    const STRIDES: [usize; 3] = [2_654_435_761, 1_000_003, 7];
    match STRIDES.iter().find(|&&stride| len > 0 && gcd(stride % len, len) == 1) {
        Some(&stride) if n < len => ((n as u128 * stride as u128) % len as u128) as usize,
        _ => n,
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One scenario whose requests all answer as `expect` says, on every instance, measured.
async fn scenario(server: &Server, args: &Args, name: &str, expect: Expect, make: MakeRequest) -> Stats {
    server.measured(load(name, &server.addresses, args.connections, args.duration, expect, make)).await
}

fn row(stats: &Stats, ceiling: Option<&Stats>) -> String {
    let ratio = ceiling.map_or("—".to_owned(), |c| format!("{:.0} %", 100.0 * stats.rate() / c.rate()));
    let cpu = match stats.server_cpu {
        Some(cpu) if stats.requests > 0 => format!("{:.1}", cpu.as_secs_f64() * 1e6 / stats.requests as f64),
        _ => "—".to_owned(),
    };
    format!(
        "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {cpu} |",
        stats.name,
        stats.rate(),
        stats.percentile_ms(0.5),
        stats.percentile_ms(0.99),
        stats.percentile_ms(0.999),
        stats.errors,
        ratio
    )
}

async fn run(args: Args) {
    let mut server = Server::start(&args.server, args.postgres.as_deref(), args.instances, &[]);
    let key = server.create_merchant(&args.server);
    let wants = |s: &str| args.wants(s);
    let mut rows = Vec::new();
    let address = server.first();

    let mut prefilled = Vec::new();
    if args.prefill > 0 {
        eprintln!("prefilling {} sessions…", args.prefill);
        let (connections, duration) = (args.connections, Duration::from_secs(3600));
        let (stats, sessions) =
            create_sessions("prefill", &server, &key, connections, duration, args.prefill, args.request_id).await;
        eprintln!("prefilled {} sessions at {:.0}/s", stats.requests, stats.rate());
        prefilled = sessions;
    }
    let make: MakeRequest = Arc::new(move |_| {
        Some(
            Request::builder()
                .uri("/health/live")
                .header("host", address.to_string())
                .body(Full::default())
                .expect("valid"),
        )
    });
    let ceiling = scenario(&server, &args, "ceiling: GET /health/live", Expect::status(200), make).await;
    if wants("ceiling") {
        rows.push(row(&ceiling, Some(&ceiling)));
    }
    // Each variant (with or without `x-request-id`) is a row of its own; read, replay and
    // cancel need sessions, so they create them when no create scenario is asked for.
    let mut creates = args.variants("create");
    let cancel_variants = args.variants("cancel");
    if creates.is_empty() && (wants("read") || wants("replay") || !cancel_variants.is_empty()) {
        creates.push(args.request_id);
    }
    let mut created = Vec::new();
    for &request_id in &creates {
        let name = format!("create session (fresh ids, {})", header_label(request_id));
        let (stats, sessions) =
            create_sessions(&name, &server, &key, args.connections, args.duration, 2_000_000, request_id).await;
        rows.push(row(&stats, Some(&ceiling)));
        created.extend(sessions);
    }
    if !creates.is_empty() {
        created.extend(prefilled);
    }
    if wants("replay") {
        let mut sent: Vec<Created> = created.iter().filter(|session| session.request_id.is_some()).copied().collect();
        if sent.is_empty() {
            // No create carried an `x-request-id` (`--no-request-id`): make some that do.
            let (_, sessions) =
                create_sessions("create (to replay)", &server, &key, args.connections, args.duration, 2_000_000, true)
                    .await;
            created.extend(&sessions);
            sent = sessions;
        }
        let (key, list) = (key.clone(), Arc::new(sent));
        let make: MakeRequest = Arc::new(move |n| {
            let session = list.get(spread(n % list.len().max(1), list.len()))?;
            Some(create_request(address, &key, session.id, session.request_id))
        });
        let name = "replay create (same id, body and x-request-id: the stored 201)";
        let replayed = Expect { status: 201, replayed: true };
        rows.push(row(&scenario(&server, &args, name, replayed, make).await, Some(&ceiling)));
    }
    if wants("read") {
        let (key, list) = (key.clone(), Arc::new(created.clone()));
        let make: MakeRequest = Arc::new(move |n| {
            let session = list.get(spread(n % list.len().max(1), list.len()))?;
            Some(request(Method::GET, address, &format!("{BASE}/redirect-sessions/{}", session.id), &key, None, None))
        });
        rows.push(row(&scenario(&server, &args, "read session", Expect::status(200), make).await, Some(&ceiling)));
    }
    // The cancel variants split the created sessions: each session is cancelled once.
    let share = created.len() / cancel_variants.len().max(1);
    for (&request_id, sessions) in cancel_variants.iter().zip(created.chunks(share.max(1))) {
        let make = cancels(address, &key, sessions.to_vec(), request_id, None);
        let name = format!("cancel session (each id once, {})", header_label(request_id));
        rows.push(row(&scenario(&server, &args, &name, Expect::status(200), make).await, Some(&ceiling)));
    }
    if wants("pay") {
        let cookies = Arc::new(arrived_browsers(address, &key, 256, args.request_id).await);
        let make: MakeRequest = Arc::new(move |n| {
            Some(
                Request::builder()
                    .uri("/pay")
                    .header("host", address.to_string())
                    .header("cookie", &cookies[n % cookies.len()])
                    .body(Full::default())
                    .expect("valid"),
            )
        });
        let name = "hosted page: GET /pay (with cookie)";
        rows.push(row(&scenario(&server, &args, name, Expect::status(200), make).await, Some(&ceiling)));
    }
    let sessions = created.len();
    let (database, wal) = server.database_bytes();
    if wants("webhooks") {
        webhooks(&mut server, &key, &args, &mut rows).await;
    }
    if wants("recover") {
        recover(&mut server, &key, &args, &mut rows).await;
    }

    println!(
        "connections: {}, duration per scenario: {:?}, prefilled sessions: {}",
        args.connections, args.duration, args.prefill
    );
    println!();
    println!("| scenario | requests/s | p50 ms | p99 ms | p99.9 ms | errors | vs ceiling | server CPU µs/request |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in rows {
        println!("{row}");
    }
    println!();
    println!("server peak RSS: {:.1} MiB", server.peak_rss_mib());
    if sessions > 0 {
        let per_session = |bytes: u64| bytes as f64 / sessions as f64;
        let wal = if wal > 0 {
            format!(" ({wal} of them the WAL; {:.0} bytes per session without it)", per_session(database - wal))
        } else {
            String::new()
        };
        println!(
            "database: {database} bytes for {sessions} sessions = {:.0} bytes per session{wal}",
            per_session(database)
        );
    }
}

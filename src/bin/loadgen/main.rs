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

mod load;
mod report;
mod server;
mod webhooks;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::{Method, Request};
use redirect_sessions::config::parse_duration;

use crate::load::{
    create_request, create_sessions, header_label, request, scenario, spread, Created, Expect, MakeRequest, Stats,
};
use crate::report::row;
use crate::server::Server;

pub(crate) const BASE: &str = "/customer-authentication-service/v1";

/// Every scenario `--scenarios` knows, in the order they run.
const SCENARIOS: [&str; 10] =
    ["ceiling", "create", "create-bare", "replay", "read", "cancel", "cancel-bare", "pay", "webhooks", "recover"];

pub(crate) struct Args {
    pub(crate) connections: usize,
    pub(crate) duration: Duration,
    pub(crate) server: PathBuf,
    pub(crate) scenarios: Vec<String>,
    pub(crate) prefill: usize,
    /// An admin URL of a PostgreSQL server: the benchmark creates (and drops) its own database.
    pub(crate) postgres: Option<String>,
    pub(crate) instances: usize,
    /// Whether creates and cancels carry a fresh `x-request-id` (`--no-request-id`: no).
    pub(crate) request_id: bool,
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

async fn run(args: Args) {
    let mut server = Server::start(&args.server, args.postgres.as_deref(), args.instances, &[]);
    let key = server.create_merchant(&args.server);
    let mut rows = Vec::new();
    let address = server.first();

    let prefilled = prefill(&server, &args, &key).await;
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
    if args.wants("ceiling") {
        rows.push(row(&ceiling, Some(&ceiling)));
    }
    let created = creates(&server, &args, &key, &ceiling, prefilled, &mut rows).await;
    reads_and_cancels(&server, &args, &key, &ceiling, &created, &mut rows).await;
    let sessions = created.len();
    let database = server.database_bytes();
    if args.wants("webhooks") {
        webhooks::webhooks(&mut server, &key, &args, &mut rows).await;
    }
    if args.wants("recover") {
        webhooks::recover(&mut server, &key, &args, &mut rows).await;
    }
    report::print(&args, rows, server.peak_rss_mib(), sessions, database);
}

/// `--prefill`: sessions created before any scenario; answers them.
async fn prefill(server: &Server, args: &Args, key: &str) -> Vec<Created> {
    if args.prefill == 0 {
        return Vec::new();
    }
    eprintln!("prefilling {} sessions…", args.prefill);
    let (connections, duration) = (args.connections, Duration::from_secs(3600));
    let (stats, sessions) =
        create_sessions("prefill", server, key, connections, duration, args.prefill, args.request_id).await;
    eprintln!("prefilled {} sessions at {:.0}/s", stats.requests, stats.rate());
    sessions
}

/// The create rows and `replay`; answers every session created (with the prefilled ones).
async fn creates(
    server: &Server,
    args: &Args,
    key: &str,
    ceiling: &Stats,
    prefilled: Vec<Created>,
    rows: &mut Vec<String>,
) -> Vec<Created> {
    let address = server.first();
    // Each variant (with or without `x-request-id`) is a row of its own; read, replay and
    // cancel need sessions, so they create them when no create scenario is asked for.
    let mut creates = args.variants("create");
    if creates.is_empty() && (args.wants("read") || args.wants("replay") || !args.variants("cancel").is_empty()) {
        creates.push(args.request_id);
    }
    let mut created = Vec::new();
    for &request_id in &creates {
        let name = format!("create session (fresh ids, {})", header_label(request_id));
        let (stats, sessions) =
            create_sessions(&name, server, key, args.connections, args.duration, 2_000_000, request_id).await;
        rows.push(row(&stats, Some(ceiling)));
        created.extend(sessions);
    }
    if !creates.is_empty() {
        created.extend(prefilled);
    }
    if args.wants("replay") {
        let mut sent: Vec<Created> = created.iter().filter(|session| session.request_id.is_some()).copied().collect();
        if sent.is_empty() {
            // No create carried an `x-request-id` (`--no-request-id`): make some that do.
            let (_, sessions) =
                create_sessions("create (to replay)", server, key, args.connections, args.duration, 2_000_000, true)
                    .await;
            created.extend(&sessions);
            sent = sessions;
        }
        let (key, list) = (key.to_owned(), Arc::new(sent));
        let make: MakeRequest = Arc::new(move |n| {
            let session = list.get(spread(n % list.len().max(1), list.len()))?;
            Some(create_request(address, &key, session.id, session.request_id))
        });
        let name = "replay create (same id, body and x-request-id: the stored 201)";
        let replayed = Expect { status: 201, replayed: true };
        rows.push(row(&scenario(server, args, name, replayed, make).await, Some(ceiling)));
    }
    created
}

/// The `read`, `cancel` and `pay` rows, on the sessions `created`.
async fn reads_and_cancels(
    server: &Server,
    args: &Args,
    key: &str,
    ceiling: &Stats,
    created: &[Created],
    rows: &mut Vec<String>,
) {
    let address = server.first();
    if args.wants("read") {
        let (key, list) = (key.to_owned(), Arc::new(created.to_vec()));
        let make: MakeRequest = Arc::new(move |n| {
            let session = list.get(spread(n % list.len().max(1), list.len()))?;
            Some(request(Method::GET, address, &format!("{BASE}/redirect-sessions/{}", session.id), &key, None, None))
        });
        rows.push(row(&scenario(server, args, "read session", Expect::status(200), make).await, Some(ceiling)));
    }
    // The cancel variants split the created sessions: each session is cancelled once.
    let cancel_variants = args.variants("cancel");
    let share = created.len() / cancel_variants.len().max(1);
    for (&request_id, sessions) in cancel_variants.iter().zip(created.chunks(share.max(1))) {
        let make = load::cancels(address, key, sessions.to_vec(), request_id, None);
        let name = format!("cancel session (each id once, {})", header_label(request_id));
        rows.push(row(&scenario(server, args, &name, Expect::status(200), make).await, Some(ceiling)));
    }
    if args.wants("pay") {
        let cookies = Arc::new(load::arrived_browsers(address, key, 256, args.request_id).await);
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
        rows.push(row(&scenario(server, args, name, Expect::status(200), make).await, Some(ceiling)));
    }
}

//! The servers under test: started on a fresh database, measured, stopped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use uuid::Uuid;

use crate::load::Stats;

/// The key every server of this run encrypts its secrets with (PostgreSQL requires one; the
/// environment's `REDIRECT_SESSIONS_SECRETS_KEY` when set).
pub(crate) static SECRETS_KEY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use base64::Engine;
    std::env::var("REDIRECT_SESSIONS_SECRETS_KEY").unwrap_or_else(|_| {
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).expect("random bytes");
        base64::engine::general_purpose::STANDARD.encode(key)
    })
});

/// The servers under test (one per instance, one database), killed on drop.
pub(crate) struct Server {
    children: Vec<Child>,
    pub(crate) addresses: Vec<SocketAddr>,
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

pub(crate) fn psql(url: &str, sql: &str) -> String {
    let output = Command::new("psql").args([url, "-Atqc", sql]).output().expect("psql runs");
    assert!(output.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

impl Server {
    /// Starts `instances` servers on a fresh database: a SQLite file in a new temporary
    /// directory, or a new database on the PostgreSQL server of `postgres` (an admin URL).
    pub(crate) fn start(binary: &Path, postgres: Option<&str>, instances: usize, extra: &[&str]) -> Server {
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
    pub(crate) fn restart(&mut self, binary: &Path, extra: &[&str]) {
        let instances = self.children.len();
        self.stop();
        self.spawn_all(binary, instances, extra);
    }

    /// The first instance, for single-connection steps.
    pub(crate) fn first(&self) -> SocketAddr {
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

    pub(crate) fn create_merchant(&self, binary: &Path) -> String {
        let output = Command::new(binary)
            .env("REDIRECT_SESSIONS_SECRETS_KEY", &*SECRETS_KEY)
            .args(["merchant", "create", "--name", "Bench", "--database-url", &self.database])
            .output()
            .expect("merchant create runs");
        let created: serde_json::Value = serde_json::from_slice(&output.stdout).expect("merchant create prints JSON");
        created["apiKey"].as_str().expect("an apiKey").to_owned()
    }

    /// The highest peak resident set size of the instances, in MiB.
    pub(crate) fn peak_rss_mib(&self) -> f64 {
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
    pub(crate) async fn measured(&self, scenario: impl std::future::Future<Output = Stats>) -> Stats {
        let before = self.cpu_time();
        let mut stats = scenario.await;
        stats.server_cpu = Some(self.cpu_time().saturating_sub(before));
        stats
    }

    /// Bytes the database takes, and of those the SQLite WAL's: the file grows to the most it
    /// held between two checkpoints and stays that size. PostgreSQL: the database's size.
    pub(crate) fn database_bytes(&self) -> (u64, u64) {
        let size = |file: &str| std::fs::metadata(self.dir.join(file)).map_or(0, |m| m.len());
        match &self.postgres {
            Some(_) => (psql(&self.database, "SELECT pg_database_size(current_database())").parse().unwrap_or(0), 0),
            None => (size("bench.db") + size("bench.db-wal"), size("bench.db-wal")),
        }
    }
}

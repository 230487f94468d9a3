//! A real `redis-server` for tests: the integration tests' helpers, and the backend tests
//! inside the crate (which include this file by path).

#![allow(dead_code, unreachable_pub)]

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the server may take to answer.
const WAIT: Duration = Duration::from_secs(20);

/// A real `redis-server` on loopback without persistence, killed when dropped.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl RedisServer {
    /// Starts one on `port` and waits until it answers PING; `None` (with the reason on
    /// stderr) when the binary is missing and the run is not strict.
    pub fn start(port: u16) -> Option<Self> {
        let child = match Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                let why = format!("redis-server cannot run here ({e}): install Debian's redis-server");
                assert!(std::env::var_os("KVSTORE_TEST_STRICT").is_none(), "{why}");
                eprintln!("SKIPPED: {why}");
                return None;
            }
        };
        let mut server = Self { child, port };
        let deadline = Instant::now() + WAIT;
        loop {
            // One that exits (its port taken, say) would otherwise be waited for in full.
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("redis-server on port {port} exited ({status}) before it answered");
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
                {
                    return Some(server);
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! Loopback ports for the servers that tests start (SeaweedFS, Redis, an index restarted where
//! its agents report).
//!
//! A port is checked free and handed to a server that binds it later. A port from the kernel's
//! ephemeral range could be taken in between by any outgoing connection on the machine, and the
//! tests running beside this one open many, so ports are picked below that range, where the
//! kernel never hands one out by itself. nextest runs each test in its own process, so a picked
//! port is also reserved with a lock on a file named after it, held until this process exits
//! (the kernel drops it however the process ends); a port whose file another process holds is
//! not picked. The files stay behind, empty, one per port ever picked.

#![allow(dead_code, unreachable_pub)]

use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher as _, RandomState};
use std::net::TcpListener;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use rustix::fs::{FlockOperation, flock};

/// The lock files of the ports this process picked, held for its life.
static RESERVED: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// Where picks start when the ephemeral range leaves room below it (privileged and the usual
/// well-known service ports stay out).
const LOWEST: u32 = 10_000;

/// Picks tried before giving up.
const TRIES: usize = 10_000;

/// A free loopback port, reserved for this process.
pub fn free_port() -> u16 {
    free_ports(0).0
}

/// A free port and the one `offset` above it, both free and reserved (for a server that derives
/// a second port from the first, as SeaweedFS does for its admin gRPC port).
pub fn free_port_and(offset: u16) -> (u16, u16) {
    free_ports(offset)
}

fn free_ports(offset: u16) -> (u16, u16) {
    let candidates = candidates(u32::from(offset));
    for _ in 0..TRIES {
        let port = pick(&candidates);
        let other = port + offset;
        if reserve(port) && (offset == 0 || reserve(other)) {
            return (port, other);
        }
    }
    panic!("no free port (with one {offset} above it) in {candidates:?} after {TRIES} tries");
}

/// The kernel's ephemeral range, or Linux's default where it cannot be read.
pub fn ephemeral_range() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut bounds = text.split_whitespace().map(str::parse::<u32>);
            Some((bounds.next()?.ok()?, bounds.next()?.ok()?))
        })
        .unwrap_or((32_768, 60_999))
}

/// Where a pick may fall so that it and the port `reach` above it stay in bounds.
fn candidates(reach: u32) -> Range<u16> {
    let (low, high) = ephemeral_range();
    let bounded = |from: u32, to: u32| {
        let clamp = |p: u32| u16::try_from(p.min(65_535)).unwrap_or(u16::MAX);
        clamp(from)..clamp(to)
    };
    if low.saturating_sub(reach + LOWEST) >= 1_000 {
        return bounded(LOWEST, low - reach);
    }
    // No room below: above the range, or the range itself as the last resort.
    if 65_536u32.saturating_sub(reach + high + 1) >= 1_000 {
        return bounded(high + 1, 65_536 - reach);
    }
    bounded(1_024, 65_536 - reach)
}

/// A random port of `candidates` (std's per-process random hasher keys as the source: a test
/// helper needs no better randomness than that).
fn pick(candidates: &Range<u16>) -> u16 {
    let span = u64::from(candidates.end - candidates.start).max(1);
    let random = RandomState::new().hash_one(0u8);
    // The remainder is below `span`, which fits in u16.
    candidates.start + u16::try_from(random % span).unwrap_or(0)
}

/// Takes `port` for this process: its lock file, unless another process holds it (or this one
/// took it before), and a bind of it on every address, which fails where anything listens on it.
pub fn reserve(port: u16) -> bool {
    let dir = std::env::temp_dir().join("kvtier-test-ports");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let path: PathBuf = dir.join(port.to_string());
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    // A lock belongs to its open file, so a second open in this process is refused as well.
    if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
        return false;
    }
    if TcpListener::bind(("0.0.0.0", port)).is_err() {
        return false;
    }
    RESERVED.lock().unwrap_or_else(PoisonError::into_inner).push(file);
    true
}

//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::process::{Child, Command, Stdio};

pub mod ports;
pub mod weed;

use kvstore::{
    BlockHash, BlockKey, DiskTier, DiskTierConfig, HostTierConfig, HugePages, IoEngineChoice, Namespace,
    StoreConfig, TieredStore,
};

pub fn ns() -> Namespace {
    Namespace::builder("test-model")
        .kv_dtype("bfloat16")
        .block_size(16)
        .build()
}

pub fn key(i: u64) -> BlockKey {
    BlockKey::new(ns(), BlockHash::from_u64(i))
}

/// Deterministic content for block `i`: every byte depends on the block and its position, so a
/// torn or misplaced block never matches.
pub fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn host(capacity: u64, slab: u64) -> HostTierConfig {
    HostTierConfig {
        capacity,
        slab_size: slab,
        huge_pages: HugePages::Off,
        preallocate: false,
        name: "kvtier-test".into(),
    }
}

/// A store with only the host tier (evictions are dropped).
pub fn host_only(capacity: u64, slab: u64) -> TieredStore {
    TieredStore::open(StoreConfig {
        host: host(capacity, slab),
        disk: None,
        object: None,
    })
    .expect("open host-only store")
}

/// Writes blocks `0..n` of `len` bytes to a disk tier; whether every one was stored.
pub fn put_blocks(d: &DiskTier, n: u64, len: usize) -> bool {
    let data: Vec<Vec<u8>> = (0..n).map(|i| payload(i, len)).collect();
    let items: Vec<_> = data
        .iter()
        .enumerate()
        .map(|(i, p)| (key(i as u64), p.as_slice()))
        .collect();
    d.put_batch(&items)
        .iter()
        .all(|o| *o == kvstore::PutOutcome::Stored)
}

/// Reads blocks `0..n` of `len` bytes back; how many were served (a wrong byte panics).
pub fn read_blocks(d: &DiskTier, n: u64, len: usize) -> usize {
    let keys: Vec<_> = (0..n).map(key).collect();
    let mut served = 0;
    d.get_batch(&keys, |i, p| {
        assert!(p == payload(i as u64, len), "block {i} content differs");
        served += 1;
    });
    served
}

pub fn disk(dir: &Path, capacity: u64, slab: u64, engine: IoEngineChoice) -> DiskTierConfig {
    DiskTierConfig {
        slab_size: slab,
        queue_depth: 8,
        engine,
        ..DiskTierConfig::new(dir, capacity)
    }
}

/// A scratch directory on the same filesystem as the build (not tmpfs), so O_DIRECT works.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kvtier-test-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("scratch dir")
}

/// Runs the `#[ignore]`d test `name` of this test binary as a child process with `env` set.
pub fn spawn_child(name: &str, env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", name, "--ignored", "--nocapture", "--test-threads=1"])
        .env("KVSTORE_TEST_CHILD", name)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Reads an environment variable the parent test set for a child; panics with an explanation
/// when the child half of a test is run on its own.
pub fn child_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} unset: this is the child half of a multi-process test, started by its parent test")
    })
}

pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether tests that need privileges (mounts) must run rather than skip: set by the test
/// script when it runs as root.
pub fn strict() -> bool {
    std::env::var_os("KVSTORE_TEST_STRICT").is_some()
}

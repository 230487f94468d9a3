//! What the transports' tests share: a small store, keys, deterministic payloads, a deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{BlockHash, BlockKey, HostTierConfig, Namespace, StoreConfig, TieredStore};

/// A store of `mib` MiB of host arena and no disk.
pub(crate) fn store(mib: u64) -> Arc<TieredStore> {
    Arc::new(
        TieredStore::open(StoreConfig {
            host: HostTierConfig::new(mib << 20),
            disk: None,
            object: None,
        })
        .expect("a test store"),
    )
}

/// Block `i` of one namespace.
pub(crate) fn key(i: u64) -> BlockKey {
    BlockKey::new(Namespace::builder("m").build(), BlockHash::from_u64(i))
}

/// Deterministic bytes of block `i`.
pub(crate) fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|j| (j as u64 * 31 + i * 7) as u8).collect()
}

/// A deadline no healthy test transfer reaches.
pub(crate) fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

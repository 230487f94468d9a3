//! Per-tier counters, cheap to update from many threads and ready to export as metrics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A level of the cache hierarchy, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum TierLevel {
    /// The shared host-memory arena.
    Host,
    /// Local disk (NVMe) slab files.
    Disk,
    /// The object store (S3), shared by the agents that name the same bucket and prefix.
    Object,
    /// Another node's agent, as the cluster index reports it: only `lookup` answers this (to
    /// protocol 3 clients), and acquiring such a block pulls it first.
    Peer,
}

impl TierLevel {
    /// A short lowercase name for logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Disk => "disk",
            Self::Object => "object",
            Self::Peer => "peer",
        }
    }
}

/// Live counters of one tier.
#[derive(Debug, Default)]
pub struct TierCounters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) stores: AtomicU64,
    pub(crate) not_stored: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) demotions: AtomicU64,
    pub(crate) promotions: AtomicU64,
    pub(crate) removals: AtomicU64,
    pub(crate) checksum_failures: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) checksummed_bytes: AtomicU64,
}

/// A point-in-time copy of one tier's counters and occupancy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Lookups served by this tier.
    pub hits: u64,
    /// Lookups that missed this tier.
    pub misses: u64,
    /// Blocks admitted.
    pub stores: u64,
    /// Blocks refused (no space, I/O error, too large).
    pub not_stored: u64,
    /// Blocks dropped from this tier to make room.
    pub evictions: u64,
    /// Evicted blocks written to the next tier down.
    pub demotions: u64,
    /// Blocks copied up into this tier from a lower one.
    pub promotions: u64,
    /// Blocks removed by request.
    pub removals: u64,
    /// Reads whose checksum or header did not match (each one reported as a miss).
    pub checksum_failures: u64,
    /// Payload bytes written into this tier.
    pub bytes_written: u64,
    /// Payload bytes read out of this tier.
    pub bytes_read: u64,
    /// Payload bytes read only to checksum blocks for peers' grants, at the grant or ahead of it
    /// (host tier): a block whose writer noted its checksum is never read for it, any other
    /// once in its life (again only where two such reads of it run at once).
    pub checksummed_bytes: u64,
    /// Blocks held now.
    pub blocks: u64,
    /// Bytes of slots in use now.
    pub used_bytes: u64,
    /// Bytes this tier may use.
    pub capacity_bytes: u64,
}

impl TierCounters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub(crate) fn snapshot(&self, blocks: u64, used_bytes: u64, capacity_bytes: u64) -> TierStats {
        TierStats {
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            stores: self.stores.load(Relaxed),
            not_stored: self.not_stored.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            demotions: self.demotions.load(Relaxed),
            promotions: self.promotions.load(Relaxed),
            removals: self.removals.load(Relaxed),
            checksum_failures: self.checksum_failures.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            checksummed_bytes: self.checksummed_bytes.load(Relaxed),
            blocks,
            used_bytes,
            capacity_bytes,
        }
    }
}

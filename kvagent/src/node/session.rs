//! One engine connection's view of the store: the calls it makes and the slots it holds. Every
//! reservation and lease taken through a session is remembered there and given back when the
//! session ends, however the connection ended (clean close, kill -9, malformed frame).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use kvstore::wire::{AcquireStatus, ReserveStatus};
use kvstore::{BlockHash, BlockKey, Lease, Namespace, PutOutcome, Reservation, TierLevel, TieredStore};

/// Slots held by one connection.
#[derive(Debug)]
pub(crate) struct Session {
    store: Arc<TieredStore>,
    reservations: HashMap<BlockKey, Reservation>,
    /// A block can be acquired several times by one connection (two requests sharing a
    /// prefix); each acquisition is one lease, released one at a time.
    leases: HashMap<BlockKey, Vec<Lease>>,
}

impl Session {
    pub(crate) fn new(store: Arc<TieredStore>) -> Self {
        Self {
            store,
            reservations: HashMap::new(),
            leases: HashMap::new(),
        }
    }

    /// The tiers of the leading stored blocks. A first lookup of a namespace may wait for the
    /// object tier's first sync of it, for at most most of the time left before `deadline`.
    pub(crate) fn lookup(&self, ns: Namespace, hashes: &[BlockHash], deadline: Instant) -> Vec<TierLevel> {
        let keys = keys(ns, hashes);
        self.store.lookup_prefix_until(&keys, budget(deadline)).tiers
    }

    pub(crate) fn reserve(&mut self, ns: Namespace, items: &[(BlockHash, u64)]) -> Vec<ReserveStatus> {
        let wanted: Vec<(BlockKey, u64)> = items.iter().map(|(h, l)| (BlockKey::new(ns, *h), *l)).collect();
        let mut out = Vec::with_capacity(items.len());
        for ((key, _), r) in wanted.iter().zip(self.store.reserve_batch(&wanted)) {
            out.push(match r {
                Ok(r) => {
                    let offset = r.offset();
                    self.reservations.insert(*key, r);
                    ReserveStatus::Slot { offset }
                }
                Err(PutOutcome::NotStored(kvstore::NotStoredReason::TooLarge)) => ReserveStatus::TooLarge,
                Err(PutOutcome::NotStored(_)) => ReserveStatus::NoSpace,
                Err(_) => ReserveStatus::Exists,
            });
        }
        out
    }

    pub(crate) fn commit(&mut self, ns: Namespace, hashes: &[BlockHash], abort: bool) -> Vec<bool> {
        let mut held = Vec::with_capacity(hashes.len());
        let found = hashes
            .iter()
            .map(|h| {
                let r = self.reservations.remove(&BlockKey::new(ns, *h));
                let found = r.is_some();
                held.extend(r);
                found
            })
            .collect();
        if abort {
            for r in held {
                self.store.abort(r);
            }
        } else {
            self.store.commit_many(held);
        }
        found
    }

    /// Pins blocks for the engine to read, promoting them from lower tiers. Object-store reads
    /// get most of the time left before `deadline`, so that blocks not back in time are misses
    /// in an answer that still arrives, not a whole call past its deadline.
    pub(crate) fn acquire(
        &mut self,
        ns: Namespace,
        hashes: &[BlockHash],
        deadline: Instant,
    ) -> Vec<AcquireStatus> {
        let deadline = budget(deadline);
        let keys = keys(ns, hashes);
        let mut out = Vec::with_capacity(keys.len());
        for (key, got) in keys
            .iter()
            .zip(self.store.acquire_batch_tiered_until(&keys, deadline))
        {
            out.push(match got {
                Some((lease, tier)) => {
                    let status = AcquireStatus::Hit {
                        tier,
                        offset: lease.offset(),
                        len: lease.len(),
                    };
                    self.leases.entry(*key).or_default().push(lease);
                    status
                }
                None => AcquireStatus::Miss,
            });
        }
        out
    }

    pub(crate) fn release(&mut self, ns: Namespace, hashes: &[BlockHash]) -> Vec<bool> {
        hashes
            .iter()
            .map(|h| {
                let key = BlockKey::new(ns, *h);
                let Some(held) = self.leases.get_mut(&key) else {
                    return false;
                };
                let lease = held.pop();
                if held.is_empty() {
                    self.leases.remove(&key);
                }
                lease.map(|l| self.store.release(l)).is_some()
            })
            .collect()
    }

    /// Reservations and leases held now.
    pub(crate) fn held(&self) -> (usize, usize) {
        (self.reservations.len(), self.leases.values().map(Vec::len).sum())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let (reserved, leased) = self.held();
        if reserved + leased > 0 {
            tracing::debug!(
                reserved,
                leased,
                "connection ended holding slots; giving them back"
            );
        }
        for (_, r) in self.reservations.drain() {
            self.store.abort(r);
        }
        for (_, leases) in self.leases.drain() {
            for l in leases {
                self.store.release(l);
            }
        }
    }
}

/// The keys of `hashes` in `ns`.
pub(crate) fn keys(ns: Namespace, hashes: &[BlockHash]) -> Vec<BlockKey> {
    hashes.iter().map(|h| BlockKey::new(ns, *h)).collect()
}

/// The part of a call's remaining time that object-store requests may use: four fifths, so
/// that blocks not back in time are misses in an answer that still arrives before `deadline`.
pub(crate) fn budget(deadline: Instant) -> Instant {
    let now = Instant::now();
    now + deadline.saturating_duration_since(now).mul_f32(0.8)
}

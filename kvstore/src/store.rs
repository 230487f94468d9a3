//! The cascade: host arena over disk, with demotion on eviction and promotion on a disk hit.

use std::collections::HashSet;

use crate::disk::{DiskTier, DiskTierConfig};
use crate::error::{Error, Result};
use crate::host::{HostTier, HostTierConfig, Lease, Reservation, Reserve};
use crate::key::BlockKey;
use crate::outcome::{NotStoredReason, PutOutcome};
use crate::stats::{TierLevel, TierStats};

/// How often a batch retries reservation after evicting, before declaring "no space".
const EVICTION_ROUNDS: usize = 8;

/// Settings of a [`TieredStore`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The host arena tier (always present).
    pub host: HostTierConfig,
    /// The disk tier; `None` disables it (host evictions are then dropped).
    pub disk: Option<DiskTierConfig>,
}

/// Where a requested block was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// The tier that held it.
    pub tier: TierLevel,
    /// Its length in bytes.
    pub len: u64,
}

/// Result of [`TieredStore::lookup_prefix`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrefixMatch {
    /// How many leading keys are stored.
    pub len: usize,
    /// The tier of each of those keys (fastest tier holding it).
    pub tiers: Vec<TierLevel>,
}

impl PrefixMatch {
    /// How many of the matched keys sit in `tier`.
    pub fn count_in(&self, tier: TierLevel) -> usize {
        self.tiers.iter().filter(|t| **t == tier).count()
    }
}

/// Counters of every tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// The host arena.
    pub host: TierStats,
    /// The disk tier, when enabled.
    pub disk: Option<TierStats>,
}

/// The tiered block store. Share it between threads (`Arc<TieredStore>`); every method takes
/// `&self`.
#[derive(Debug)]
pub struct TieredStore {
    host: HostTier,
    disk: Option<DiskTier>,
}

impl TieredStore {
    /// Creates the arena and opens (recovers) the disk tier.
    pub fn open(cfg: StoreConfig) -> Result<Self> {
        let host = HostTier::new(&cfg.host)?;
        let disk = cfg.disk.map(DiskTier::open).transpose()?;
        Ok(Self { host, disk })
    }

    /// The host tier (arena access for zero-copy callers).
    pub fn host(&self) -> &HostTier {
        &self.host
    }

    /// The disk tier, when enabled.
    pub fn disk(&self) -> Option<&DiskTier> {
        self.disk.as_ref()
    }

    /// Stores one block; see [`Self::put_batch`].
    pub fn put(&self, key: &BlockKey, data: &[u8]) -> PutOutcome {
        self.put_batch(&[(*key, data)])[0]
    }

    /// Stores blocks in the host arena, evicting (and demoting to disk) as needed. Blocks that
    /// the host cannot take — larger than a host slab, or everything there pinned — go straight
    /// to disk when it is enabled.
    pub fn put_batch(&self, items: &[(BlockKey, &[u8])]) -> Vec<PutOutcome> {
        let wanted: Vec<(BlockKey, u64)> = items.iter().map(|(k, d)| (*k, d.len() as u64)).collect();
        let reserved = self.reserve_batch(&wanted);
        let mut out = Vec::with_capacity(items.len());
        let mut to_disk = Vec::new();
        let mut written = Vec::new();
        for (i, r) in reserved.into_iter().enumerate() {
            match r {
                Ok(res) => {
                    self.host.write(&res, items[i].1);
                    written.push(res);
                    out.push(PutOutcome::Stored);
                }
                Err(PutOutcome::NotStored(reason)) if self.disk.is_some() => {
                    to_disk.push(i);
                    out.push(PutOutcome::NotStored(reason));
                }
                Err(o) => {
                    if matches!(o, PutOutcome::NotStored(_)) {
                        self.host.count_not_stored(1);
                    }
                    out.push(o);
                }
            }
        }
        self.host.commit_many(written);
        if let (Some(disk), false) = (&self.disk, to_disk.is_empty()) {
            let batch: Vec<_> = to_disk.iter().map(|&i| items[i]).collect();
            for (&i, o) in to_disk.iter().zip(disk.put_batch(&batch)) {
                out[i] = o;
            }
        }
        out
    }

    /// Reserves host slots for every item, evicting least-recently-used blocks (demoting them)
    /// for the ones that do not fit, for a bounded number of rounds. Each slot is then written
    /// (by this process through [`HostTier::write`], or by a client that maps the arena) and
    /// given back with [`Self::commit`] or [`Self::abort`]. An `Err` says why a block gets no
    /// slot: `AlreadyStored` when it is stored or being stored by someone else.
    pub fn reserve_batch(&self, items: &[(BlockKey, u64)]) -> Vec<Result<Reservation, PutOutcome>> {
        let mut out: Vec<Result<Reservation, PutOutcome>> = (0..items.len())
            .map(|_| Err(PutOutcome::NotStored(NotStoredReason::NoSpace)))
            .collect();
        let mut pending: Vec<usize> = (0..items.len()).collect();
        for _ in 0..EVICTION_ROUNDS {
            let mut full = Vec::new();
            let wanted: Vec<(BlockKey, u64)> = pending.iter().map(|&i| items[i]).collect();
            // Without a disk tier there is nothing to demote to: evicting is just dropping,
            // done under the same lock.
            let reserved = self.host.reserve_many(&wanted, self.disk.is_none());
            for (&i, reserved) in pending.iter().zip(reserved) {
                out[i] = match reserved {
                    Reserve::Slot(r) => Ok(r),
                    Reserve::Exists | Reserve::Busy => Err(PutOutcome::AlreadyStored),
                    Reserve::TooLarge => Err(PutOutcome::NotStored(NotStoredReason::TooLarge)),
                    Reserve::Full => {
                        full.push(i);
                        continue;
                    }
                };
            }
            if full.is_empty() {
                break;
            }
            let lens: Vec<u64> = full.iter().map(|&i| items[i].1).collect();
            if !self.evict(&lens) {
                break;
            }
            pending = full;
        }
        out
    }

    /// Evicts host blocks to make room for blocks of `lens`; `false` when nothing could go.
    fn evict(&self, lens: &[u64]) -> bool {
        let victims = self.host.take_victims(lens);
        if victims.is_empty() {
            return false;
        }
        let mut demoted = 0;
        if let Some(disk) = &self.disk {
            let present = disk.contains_many(&victims.iter().map(|v| *v.key()).collect::<Vec<_>>());
            let batch: Vec<(BlockKey, &[u8])> = victims
                .iter()
                .zip(present)
                .filter(|(_, p)| !p)
                .map(|(v, _)| (*v.key(), self.host.victim_data(v)))
                .collect();
            demoted = disk
                .put_batch(&batch)
                .iter()
                .filter(|o| **o == PutOutcome::Stored)
                .count() as u64;
        }
        let removed = self.host.free_victims(victims, demoted);
        if let Some(disk) = &self.disk {
            // Removed while in flight to disk: the removal wins.
            for key in &removed {
                disk.remove(key);
            }
        }
        true
    }

    /// Pins blocks in the host arena for zero-copy reading, promoting them from disk first where
    /// needed. Each `Some` must be given back with [`Self::release`].
    pub fn acquire_batch(&self, keys: &[BlockKey]) -> Vec<Option<Lease>> {
        self.acquire_tiered(keys)
            .0
            .into_iter()
            .map(|l| l.map(|(l, _)| l))
            .collect()
    }

    /// [`Self::acquire_batch`], also telling which tier each block came from, plus the indices
    /// of blocks the disk holds but the host could not take (no slot could be freed).
    fn acquire_tiered(&self, keys: &[BlockKey]) -> (Vec<Option<(Lease, TierLevel)>>, Vec<usize>) {
        let mut out: Vec<Option<(Lease, TierLevel)>> = keys
            .iter()
            .map(|k| self.host.acquire(k).map(|l| (l, TierLevel::Host)))
            .collect();
        let Some(disk) = &self.disk else {
            return (out, Vec::new());
        };
        let missing: Vec<BlockKey> = keys
            .iter()
            .zip(&out)
            .filter(|(_, l)| l.is_none())
            .map(|(k, _)| *k)
            .collect();
        if missing.is_empty() {
            return (out, Vec::new());
        }
        // Hold the disk copies (most recently used, not evictable) while host slots are made
        // for them: the demotions that free them must not evict the very blocks being read.
        let lens = disk.hold(&missing);
        let wanted: Vec<(BlockKey, u64)> = missing
            .iter()
            .zip(&lens)
            .filter_map(|(k, l)| l.map(|l| (*k, l)))
            .collect();
        let mut unpromoted = Vec::new();
        let mut read_keys = Vec::new();
        let mut read_res = Vec::new();
        for ((key, _), r) in wanted.iter().zip(self.reserve_batch(&wanted)) {
            match r {
                Ok(r) => {
                    read_keys.push(*key);
                    read_res.push(r);
                }
                // Committed or being promoted by someone else meanwhile: acquired below, or
                // read directly if not committed yet.
                Err(_) => unpromoted.push(*key),
            }
        }
        let mut written = vec![false; read_res.len()];
        let read_ok = disk.get_batch(&read_keys, |j, payload| {
            if payload.len() as u64 == read_res[j].len() {
                self.host.write(&read_res[j], payload);
                written[j] = true;
            }
        });
        let held: Vec<BlockKey> = wanted.iter().map(|(k, _)| *k).collect();
        disk.unhold(&held);
        for (r, ok) in read_res.into_iter().zip(written) {
            if ok {
                self.host.commit_promoted(r);
            } else {
                self.host.abort(r);
            }
        }
        let on_disk: HashSet<BlockKey> = held.into_iter().collect();
        let unpromoted: HashSet<BlockKey> = unpromoted.into_iter().collect();
        // Keys whose read failed were corrupt (now dropped). A key given twice in one batch
        // reaches the direct path the second time (its second reservation was Busy); reading
        // it again would only count the same miss twice.
        let failed: HashSet<BlockKey> = read_keys
            .iter()
            .zip(read_ok)
            .filter(|(_, ok)| !ok)
            .map(|(k, _)| *k)
            .collect();
        let mut direct = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            if out[i].is_none() && on_disk.contains(key) {
                out[i] = self.host.acquire_quiet(key).map(|l| (l, TierLevel::Disk));
                if out[i].is_none() && unpromoted.contains(key) && !failed.contains(key) {
                    direct.push(i);
                }
            }
        }
        (out, direct)
    }

    /// Makes a written reservation visible in the host tier.
    pub fn commit(&self, r: Reservation) {
        self.host.commit(r);
    }

    /// [`Self::commit`] for many reservations at once.
    pub fn commit_many(&self, rs: Vec<Reservation>) {
        self.host.commit_many(rs);
    }

    /// Gives back a reservation that was not written.
    pub fn abort(&self, r: Reservation) {
        self.host.abort(r);
    }

    /// [`Self::acquire_batch`], also telling which tier each acquired block came from. A block
    /// the disk holds but the host has no free slot for is reported as missing.
    pub fn acquire_batch_tiered(&self, keys: &[BlockKey]) -> Vec<Option<(Lease, TierLevel)>> {
        self.acquire_tiered(keys).0
    }

    /// Unpins a block acquired with [`Self::acquire_batch`].
    pub fn release(&self, lease: Lease) {
        self.host.release(lease);
    }

    /// Copies a block into `buf` (which must hold it); promotes a disk hit to host.
    pub fn get(&self, key: &BlockKey, buf: &mut [u8]) -> Result<Option<Hit>> {
        let mut bufs = [buf];
        self.get_batch(std::slice::from_ref(key), &mut bufs)
            .pop()
            .expect("one result per key")
    }

    /// Copies blocks into the caller's buffers, one per key.
    pub fn get_batch(&self, keys: &[BlockKey], bufs: &mut [&mut [u8]]) -> Vec<Result<Option<Hit>>> {
        assert_eq!(keys.len(), bufs.len(), "one buffer per key");
        let (leases, direct) = self.acquire_tiered(keys);
        let mut out = Vec::with_capacity(keys.len());
        for (i, lease) in leases.into_iter().enumerate() {
            match lease {
                Some((l, tier)) => {
                    let r = if (bufs[i].len() as u64) < l.len() {
                        Err(Error::BufferSize {
                            buf: bufs[i].len(),
                            len: l.len(),
                        })
                    } else {
                        self.host.read(&l, bufs[i]);
                        Ok(Some(Hit { tier, len: l.len() }))
                    };
                    self.host.release(l);
                    out.push(r);
                }
                None => out.push(Ok(None)),
            }
        }
        // Blocks on disk that the host could not take: read them straight into the buffers.
        if let (Some(disk), false) = (&self.disk, direct.is_empty()) {
            let dkeys: Vec<BlockKey> = direct.iter().map(|&i| keys[i]).collect();
            disk.get_batch(&dkeys, |j, payload| {
                let i = direct[j];
                out[i] = if bufs[i].len() < payload.len() {
                    Err(Error::BufferSize {
                        buf: bufs[i].len(),
                        len: payload.len() as u64,
                    })
                } else {
                    bufs[i][..payload.len()].copy_from_slice(payload);
                    Ok(Some(Hit {
                        tier: TierLevel::Disk,
                        len: payload.len() as u64,
                    }))
                };
            });
        }
        out
    }

    /// The fastest tier holding `key`.
    pub fn contains(&self, key: &BlockKey) -> Option<TierLevel> {
        if self.host.contains(key) {
            return Some(TierLevel::Host);
        }
        self.disk
            .as_ref()
            .filter(|d| d.contains(key))
            .map(|_| TierLevel::Disk)
    }

    /// How many leading `keys` are stored, and in which tier each one is. Does not change the
    /// LRU order or the hit counters.
    pub fn lookup_prefix(&self, keys: &[BlockKey]) -> PrefixMatch {
        let in_host = self.host.contains_many(keys);
        let first_gap = in_host.iter().position(|h| !h).unwrap_or(keys.len());
        let in_disk = match &self.disk {
            Some(d) if first_gap < keys.len() => d.contains_many(&keys[first_gap..]),
            _ => Vec::new(),
        };
        let mut m = PrefixMatch::default();
        for (i, &h) in in_host.iter().enumerate() {
            let tier = if h {
                TierLevel::Host
            } else if in_disk.get(i - first_gap).copied().unwrap_or(false) {
                TierLevel::Disk
            } else {
                break;
            };
            m.tiers.push(tier);
        }
        m.len = m.tiers.len();
        m
    }

    /// Pins a block in the fastest tier holding it, so it is never evicted there.
    pub fn pin(&self, key: &BlockKey) -> Option<TierLevel> {
        if self.host.pin(key) {
            return Some(TierLevel::Host);
        }
        self.disk.as_ref().filter(|d| d.pin(key)).map(|_| TierLevel::Disk)
    }

    /// Undoes one [`Self::pin`]; `false` if the block was not pinned.
    pub fn unpin(&self, key: &BlockKey) -> bool {
        self.host.unpin(key) || self.disk.as_ref().is_some_and(|d| d.unpin(key))
    }

    /// Removes a block from every tier (pinned copies stay); `true` if any copy went.
    pub fn remove(&self, key: &BlockKey) -> bool {
        let host = self.host.remove(key);
        let disk = self.disk.as_ref().is_some_and(|d| d.remove(key));
        host || disk
    }

    /// Counters of every tier.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            host: self.host.stats(),
            disk: self.disk.as_ref().map(DiskTier::stats),
        }
    }

    /// Writes every host block the disk tier lacks to disk, oldest first, so that an agent
    /// restarted after a clean stop finds them there (the arena itself does not outlive the
    /// process). Returns how many blocks were written; 0 without a disk tier.
    pub fn persist_host(&self) -> usize {
        const BATCH: usize = 64;
        let Some(disk) = &self.disk else {
            return 0;
        };
        let keys = self.host.keys();
        let present = disk.contains_many(&keys);
        let missing: Vec<BlockKey> = keys
            .into_iter()
            .zip(present)
            .filter(|(_, p)| !p)
            .map(|(k, _)| k)
            .collect();
        let mut written = 0;
        for chunk in missing.chunks(BATCH) {
            let leases: Vec<Lease> = chunk.iter().filter_map(|k| self.host.acquire_quiet(k)).collect();
            let batch: Vec<(BlockKey, &[u8])> = leases
                .iter()
                .map(|l| (*l.key(), self.host.lease_data(l)))
                .collect();
            written += disk
                .put_batch(&batch)
                .iter()
                .filter(|o| **o == PutOutcome::Stored)
                .count();
            for l in leases {
                self.host.release(l);
            }
        }
        written
    }

    /// Persists the disk tier's metadata (also done on drop).
    pub fn flush(&self) -> Result<()> {
        self.disk.as_ref().map_or(Ok(()), DiskTier::flush)
    }
}

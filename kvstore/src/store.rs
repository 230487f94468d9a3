//! The cascade: host arena over disk over the object store, with demotion on eviction and
//! promotion on a hit below the host.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::disk::{DiskTier, DiskTierConfig};
use crate::error::{Error, Result};
use crate::host::{HostTier, HostTierConfig, Lease, Reservation, Reserve, Victim};
use crate::key::BlockKey;
use crate::object::{ObjectTier, ObjectTierConfig};
use crate::outcome::{NotStoredReason, PutOutcome};
use crate::stats::{TierLevel, TierStats};

/// How often a batch retries reservation after evicting, before declaring "no space".
const EVICTION_ROUNDS: usize = 8;

/// Settings of a [`TieredStore`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The host arena tier (always present).
    pub host: HostTierConfig,
    /// The disk tier; `None` disables it (host evictions then go to the object tier, or are
    /// dropped).
    pub disk: Option<DiskTierConfig>,
    /// The object-store tier; `None` disables it (disk evictions are then dropped).
    pub object: Option<ObjectTierConfig>,
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
    /// The object tier, when enabled.
    pub object: Option<TierStats>,
}

/// The tiered block store. Share it between threads (`Arc<TieredStore>`); every method takes
/// `&self`.
#[derive(Debug)]
pub struct TieredStore {
    host: HostTier,
    disk: Option<DiskTier>,
    object: Option<ObjectTier>,
    /// How long an acquire without a deadline may wait for the object store.
    object_wait: Duration,
    /// How long [`Self::flush`] waits for uploads.
    object_flush: Duration,
}

impl TieredStore {
    /// Creates the arena, opens (recovers) the disk tier and starts the object tier.
    pub fn open(cfg: StoreConfig) -> Result<Self> {
        let host = HostTier::new(&cfg.host)?;
        let disk = cfg.disk.map(DiskTier::open).transpose()?;
        let (object_wait, object_flush) = cfg.object.as_ref().map_or((Duration::ZERO, Duration::ZERO), |o| {
            (o.read_timeout, o.retry_timeout + o.request_timeout)
        });
        let object = cfg.object.map(ObjectTier::open).transpose()?;
        Ok(Self {
            host,
            disk,
            object,
            object_wait,
            object_flush,
        })
    }

    /// The host tier (arena access for zero-copy callers).
    pub fn host(&self) -> &HostTier {
        &self.host
    }

    /// The disk tier, when enabled.
    pub fn disk(&self) -> Option<&DiskTier> {
        self.disk.as_ref()
    }

    /// The object tier, when enabled.
    pub fn object(&self) -> Option<&ObjectTier> {
        self.object.as_ref()
    }

    /// Whether evicting from host has somewhere to demote to.
    fn has_lower_tier(&self) -> bool {
        self.disk.is_some() || self.object.is_some()
    }

    /// Writes blocks to disk, first demoting to the object tier the disk blocks that must
    /// leave to make room (the disk would otherwise drop them). `known`: the blocks' checksums
    /// where known, one per block (or empty), written without reading the payloads for them.
    fn disk_put(
        &self,
        disk: &DiskTier,
        batch: &[(BlockKey, &[u8])],
        known: &[Option<u64>],
    ) -> Vec<PutOutcome> {
        if let Some(object) = &self.object {
            let lens: Vec<u64> = batch.iter().map(|(_, d)| d.len() as u64).collect();
            let victims = disk.take_victims(&lens);
            if !victims.is_empty() {
                // Only what the object tier lacks is read and sent.
                let absent: Vec<BlockKey> = victims
                    .iter()
                    .zip(object.contains_many(&victims))
                    .filter(|(_, p)| !p)
                    .map(|(k, _)| *k)
                    .collect();
                let mut demoted = 0;
                // Held: the checksums are the ones the reads verify.
                let sums = disk.checksums(&absent);
                disk.read_held(&absent, |j, payload| {
                    if object.put_batch_known(&[(absent[j], payload)], &sums[j..=j])[0] == PutOutcome::Stored
                    {
                        demoted += 1;
                    }
                });
                disk.evict_held(&victims, demoted);
            }
        }
        disk.put_batch_known(batch, known)
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
                Err(PutOutcome::NotStored(reason)) if self.has_lower_tier() => {
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
        if !to_disk.is_empty() {
            let batch: Vec<_> = to_disk.iter().map(|&i| items[i]).collect();
            let outcomes = match (&self.disk, &self.object) {
                (Some(disk), _) => self.disk_put(disk, &batch, &[]),
                (None, Some(object)) => object.put_batch(&batch),
                (None, None) => unreachable!("only collected with a lower tier"),
            };
            for (&i, o) in to_disk.iter().zip(outcomes) {
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
        self.reserve_batch_or(items, PutOutcome::AlreadyStored)
    }

    /// [`Self::reserve_batch`], with `busy` the answer for a block someone else is storing.
    fn reserve_batch_or(
        &self,
        items: &[(BlockKey, u64)],
        busy: PutOutcome,
    ) -> Vec<Result<Reservation, PutOutcome>> {
        let mut out: Vec<Result<Reservation, PutOutcome>> = (0..items.len())
            .map(|_| Err(PutOutcome::NotStored(NotStoredReason::NoSpace)))
            .collect();
        let mut pending: Vec<usize> = (0..items.len()).collect();
        for _ in 0..EVICTION_ROUNDS {
            let mut full = Vec::new();
            let wanted: Vec<(BlockKey, u64)> = pending.iter().map(|&i| items[i]).collect();
            // Without a lower tier there is nothing to demote to: evicting is just dropping,
            // done under the same lock.
            let reserved = self.host.reserve_many(&wanted, !self.has_lower_tier());
            for (&i, reserved) in pending.iter().zip(reserved) {
                out[i] = match reserved {
                    Reserve::Slot(r) => Ok(r),
                    Reserve::Exists => Err(PutOutcome::AlreadyStored),
                    Reserve::Busy => Err(busy),
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

    /// [`Self::reserve_batch`] for a writer that would rather wait for another than race it: a
    /// block that someone else is storing is waited for (until it is committed or aborted, or
    /// until `deadline`) and then reserved again. So `AlreadyStored` here means the block is
    /// stored, not that a write of it that may yet fail is under way, and a block still being
    /// written at `deadline` is `NotStored(Busy)`. Two peer pulls of one prefix (two requests
    /// sharing a system prompt) need this: the second must not report as held the blocks the
    /// first is still moving, or failing to move. Needs a Tokio runtime with its timer.
    pub async fn reserve_batch_after_writers(
        &self,
        items: &[(BlockKey, u64)],
        deadline: Instant,
    ) -> Vec<Result<Reservation, PutOutcome>> {
        const BUSY: PutOutcome = PutOutcome::NotStored(NotStoredReason::Busy);
        let mut out = self.reserve_batch_or(items, BUSY);
        loop {
            let busy: Vec<usize> = (0..items.len()).filter(|&i| out[i] == Err(BUSY)).collect();
            if busy.is_empty() || Instant::now() >= deadline {
                return out;
            }
            let again: Vec<(BlockKey, u64)> = busy.iter().map(|&i| items[i]).collect();
            let keys: Vec<BlockKey> = again.iter().map(|&(k, _)| k).collect();
            self.host.wait_unreserved(&keys, deadline).await;
            for (&i, r) in busy.iter().zip(self.reserve_batch_or(&again, BUSY)) {
                out[i] = r;
            }
        }
    }

    /// Evicts host blocks to make room for blocks of `lens`; `false` when nothing could go.
    fn evict(&self, lens: &[u64]) -> bool {
        let victims = self.host.take_victims(lens);
        if victims.is_empty() {
            return false;
        }
        let keys: Vec<BlockKey> = victims.iter().map(|v| *v.key()).collect();
        let present = match (&self.disk, &self.object) {
            (Some(disk), _) => disk.contains_many(&keys),
            (None, Some(object)) => object.contains_many(&keys),
            (None, None) => vec![true; keys.len()],
        };
        let leaving: Vec<&Victim> = victims
            .iter()
            .zip(present)
            .filter(|(_, p)| !p)
            .map(|(v, _)| v)
            .collect();
        let batch: Vec<(BlockKey, &[u8])> = leaving
            .iter()
            .map(|v| (*v.key(), self.host.victim_data(v)))
            .collect();
        let known: Vec<Option<u64>> = leaving.iter().map(|v| v.checksum()).collect();
        let outcomes = match (&self.disk, &self.object) {
            (Some(disk), _) => self.disk_put(disk, &batch, &known),
            (None, Some(object)) => object.put_batch_known(&batch, &known),
            (None, None) => Vec::new(),
        };
        let demoted = outcomes.iter().filter(|o| **o == PutOutcome::Stored).count() as u64;
        let removed = self.host.free_victims(victims, demoted);
        // Removed while in flight to a lower tier: the removal wins.
        for key in &removed {
            if let Some(disk) = &self.disk {
                disk.remove(key);
            } else if let Some(object) = &self.object {
                object.remove(key);
            }
        }
        true
    }

    /// Pins blocks in the host arena for zero-copy reading, promoting them from lower tiers
    /// first where needed. Each `Some` must be given back with [`Self::release`].
    pub fn acquire_batch(&self, keys: &[BlockKey]) -> Vec<Option<Lease>> {
        self.acquire_tiered(keys, None)
            .0
            .into_iter()
            .map(|l| l.map(|(l, _)| l))
            .collect()
    }

    /// [`Self::acquire_batch`], also telling which tier each block came from, plus the blocks a
    /// lower tier holds but the host could not take (no slot could be freed), with their tier.
    /// Object-store reads end at `deadline` (else after the tier's read timeout).
    #[expect(
        clippy::type_complexity,
        reason = "one private helper; a struct would only name the pair"
    )]
    fn acquire_tiered(
        &self,
        keys: &[BlockKey],
        deadline: Option<Instant>,
    ) -> (Vec<Option<(Lease, TierLevel)>>, Vec<(usize, TierLevel)>) {
        let mut out: Vec<Option<(Lease, TierLevel)>> = keys
            .iter()
            .map(|k| self.host.acquire(k).map(|l| (l, TierLevel::Host)))
            .collect();
        let mut direct = Vec::new();
        if let Some(disk) = &self.disk {
            self.promote_from_disk(disk, keys, &mut out, &mut direct);
        }
        if let Some(object) = self.object.as_ref().filter(|o| !o.is_paused()) {
            if out.iter().any(Option::is_none) {
                let until = deadline.unwrap_or_else(|| Instant::now() + self.object_wait);
                self.promote_from_object(object, keys, &mut out, &mut direct, until);
            }
        }
        (out, direct)
    }

    /// Promotion from the object store. Unlike the disk step, the blocks are fetched first
    /// and host slots are made for them only once they are here: a slow or failing store then
    /// costs the host nothing — no hot block evicted for a read that misses, no slot held
    /// `Busy` for the whole read against an engine saving that very block meanwhile. Fetched
    /// blocks the host cannot take go to `direct`.
    fn promote_from_object(
        &self,
        object: &ObjectTier,
        keys: &[BlockKey],
        out: &mut [Option<(Lease, TierLevel)>],
        direct: &mut Vec<(usize, TierLevel)>,
        until: Instant,
    ) {
        let done: HashSet<usize> = direct.iter().map(|(i, _)| *i).collect();
        let idx: Vec<usize> = (0..keys.len())
            .filter(|i| out[*i].is_none() && !done.contains(i))
            .collect();
        if idx.is_empty() {
            return;
        }
        let missing: Vec<BlockKey> = idx.iter().map(|&i| keys[i]).collect();
        for ns in missing.iter().map(|k| k.namespace).collect::<HashSet<_>>() {
            object.sync_namespace_until(&ns, until);
        }
        // Each with the checksum it was verified against.
        let mut fetched: Vec<Option<(Vec<u8>, u64)>> = vec![None; missing.len()];
        object.get_batch_with_checksums(&missing, until, |j, payload, sum| {
            fetched[j] = Some((payload.to_vec(), sum));
        });
        let got: Vec<usize> = (0..missing.len()).filter(|j| fetched[*j].is_some()).collect();
        let wanted: Vec<(BlockKey, u64)> = got
            .iter()
            .map(|&j| (missing[j], fetched[j].as_ref().map_or(0, |(d, _)| d.len() as u64)))
            .collect();
        for (&j, r) in got.iter().zip(self.reserve_batch(&wanted)) {
            // Not reserved: committed or being stored by someone else meanwhile (acquired
            // below), or no slot could be freed (read directly).
            if let (Ok(mut r), Some((data, sum))) = (r, &fetched[j]) {
                self.host.write(&r, data);
                r.note_checksum(*sum);
                self.host.commit_promoted(r);
            }
        }
        for &j in &got {
            let i = idx[j];
            out[i] = self.host.acquire_quiet(&keys[i]).map(|l| (l, TierLevel::Object));
            if out[i].is_none() {
                direct.push((i, TierLevel::Object));
            }
        }
    }

    /// The disk step of [`Self::acquire_tiered`]: the keys the host lacks that the disk holds
    /// get host slots (evicting, demoting), are read into them, and are acquired; those with
    /// no slot go to `direct`.
    fn promote_from_disk(
        &self,
        disk: &DiskTier,
        keys: &[BlockKey],
        out: &mut [Option<(Lease, TierLevel)>],
        direct: &mut Vec<(usize, TierLevel)>,
    ) {
        let missing: Vec<BlockKey> = keys
            .iter()
            .zip(out.iter())
            .filter(|(_, l)| l.is_none())
            .map(|(k, _)| *k)
            .collect();
        if missing.is_empty() {
            return;
        }
        // Held (most recently used, not evictable) while host slots are made for them: the
        // demotions that free those must not evict the very blocks being read.
        let lens = disk.hold(&missing);
        let wanted: Vec<(BlockKey, u64)> = missing
            .iter()
            .zip(&lens)
            .filter_map(|(k, l)| l.map(|l| (*k, l)))
            .collect();
        if wanted.is_empty() {
            return;
        }
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
        // Read below, and verified against these: the host keeps them for the blocks' grants.
        for (r, sum) in read_res.iter_mut().zip(disk.checksums(&read_keys)) {
            if let Some(sum) = sum {
                r.note_checksum(sum);
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
        let found: HashSet<BlockKey> = held.into_iter().collect();
        let unpromoted: HashSet<BlockKey> = unpromoted.into_iter().collect();
        // Keys whose read failed were corrupt (now dropped) or late. A key given twice in one
        // batch reaches the direct path the second time (its second reservation was Busy);
        // reading it again would only count the same miss twice.
        let failed: HashSet<BlockKey> = read_keys
            .iter()
            .zip(read_ok)
            .filter(|(_, ok)| !ok)
            .map(|(k, _)| *k)
            .collect();
        for (i, key) in keys.iter().enumerate() {
            if out[i].is_none() && found.contains(key) {
                out[i] = self.host.acquire_quiet(key).map(|l| (l, TierLevel::Disk));
                if out[i].is_none() && unpromoted.contains(key) && !failed.contains(key) {
                    direct.push((i, TierLevel::Disk));
                }
            }
        }
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
        self.acquire_tiered(keys, None).0
    }

    /// [`Self::acquire_batch_tiered`] that gives up on object-store reads at `deadline`
    /// (those blocks are missing).
    pub fn acquire_batch_tiered_until(
        &self,
        keys: &[BlockKey],
        deadline: Instant,
    ) -> Vec<Option<(Lease, TierLevel)>> {
        self.acquire_tiered(keys, Some(deadline)).0
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
        let (leases, direct) = self.acquire_tiered(keys, None);
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
        // Blocks in a lower tier that the host could not take: read them straight into the
        // buffers.
        for tier in [TierLevel::Disk, TierLevel::Object] {
            let idx: Vec<usize> = direct
                .iter()
                .filter(|(_, t)| *t == tier)
                .map(|(i, _)| *i)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let dkeys: Vec<BlockKey> = idx.iter().map(|&i| keys[i]).collect();
            let mut sink = |j: usize, payload: &[u8]| {
                let i = idx[j];
                out[i] = if bufs[i].len() < payload.len() {
                    Err(Error::BufferSize {
                        buf: bufs[i].len(),
                        len: payload.len() as u64,
                    })
                } else {
                    bufs[i][..payload.len()].copy_from_slice(payload);
                    Ok(Some(Hit {
                        tier,
                        len: payload.len() as u64,
                    }))
                };
            };
            match (tier, &self.disk, &self.object) {
                (TierLevel::Disk, Some(disk), _) => {
                    disk.get_batch(&dkeys, &mut sink);
                }
                (TierLevel::Object, _, Some(object)) => {
                    object.get_batch(&dkeys, Instant::now() + self.object_wait, &mut sink);
                }
                _ => {}
            }
        }
        out
    }

    /// The fastest tier holding `key`.
    pub fn contains(&self, key: &BlockKey) -> Option<TierLevel> {
        if self.host.contains(key) {
            return Some(TierLevel::Host);
        }
        if self.disk.as_ref().is_some_and(|d| d.contains(key)) {
            return Some(TierLevel::Disk);
        }
        self.object
            .as_ref()
            .filter(|o| o.contains_many(std::slice::from_ref(key))[0])
            .map(|_| TierLevel::Object)
    }

    /// How many leading `keys` are stored, and in which tier each one is. Does not change the
    /// LRU order or the hit counters.
    pub fn lookup_prefix(&self, keys: &[BlockKey]) -> PrefixMatch {
        self.lookup_prefix_until(keys, Instant::now() + self.object_wait)
    }

    /// [`Self::lookup_prefix`] within a call's deadline: the first lookup of a namespace waits
    /// for the object tier's first sync of it no later than `until`.
    pub fn lookup_prefix_until(&self, keys: &[BlockKey], until: Instant) -> PrefixMatch {
        let in_host = self.host.contains_many(keys);
        let first_gap = in_host.iter().position(|h| !h).unwrap_or(keys.len());
        let mut tiers = vec![TierLevel::Host; first_gap];
        let rest = &keys[first_gap..];
        if !rest.is_empty() {
            let in_disk = match &self.disk {
                Some(d) => d.contains_many(rest),
                None => vec![false; rest.len()],
            };
            let in_object = match &self.object {
                // A paused tier's blocks cannot be read now: reporting them would only turn
                // into misses at acquire.
                Some(o) if !o.is_paused() => {
                    o.sync_namespace_until(&rest[0].namespace, until);
                    o.contains_many(rest)
                }
                _ => vec![false; rest.len()],
            };
            for ((h, d), o) in in_host[first_gap..].iter().zip(in_disk).zip(in_object) {
                tiers.push(match (h, d, o) {
                    (true, _, _) => TierLevel::Host,
                    (_, true, _) => TierLevel::Disk,
                    (_, _, true) => TierLevel::Object,
                    _ => break,
                });
            }
        }
        PrefixMatch {
            len: tiers.len(),
            tiers,
        }
    }

    /// Pins a block in the fastest tier holding it, so it is never evicted there; that tier
    /// and the block's length.
    pub fn pin(&self, key: &BlockKey) -> Option<(TierLevel, u64)> {
        if let Some(len) = self.host.pin(key) {
            return Some((TierLevel::Host, len));
        }
        let len = self.disk.as_ref()?.pin(key)?;
        Some((TierLevel::Disk, len))
    }

    /// Undoes one [`Self::pin`]; `false` if the block was not pinned.
    pub fn unpin(&self, key: &BlockKey) -> bool {
        self.host.unpin(key) || self.disk.as_ref().is_some_and(|d| d.unpin(key))
    }

    /// Removes a block from every tier (pinned copies stay); `true` if any copy went.
    pub fn remove(&self, key: &BlockKey) -> bool {
        let host = self.host.remove(key);
        let disk = self.disk.as_ref().is_some_and(|d| d.remove(key));
        let object = self.object.as_ref().is_some_and(|o| o.remove(key));
        host || disk || object
    }

    /// Counters of every tier.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            host: self.host.stats(),
            disk: self.disk.as_ref().map(DiskTier::stats),
            object: self.object.as_ref().map(ObjectTier::stats),
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
        missing
            .chunks(BATCH)
            .map(|chunk| self.copy_host_blocks(chunk, |batch, known| self.disk_put(disk, batch, known)))
            .sum()
    }

    /// Hands the host's copies of `keys` (those it holds) to `put` — pinned meanwhile, so
    /// they cannot be evicted or rewritten under it — and returns how many `put` stored.
    fn copy_host_blocks(
        &self,
        keys: &[BlockKey],
        put: impl FnOnce(&[(BlockKey, &[u8])], &[Option<u64>]) -> Vec<PutOutcome>,
    ) -> usize {
        let leases: Vec<Lease> = keys.iter().filter_map(|k| self.host.acquire_quiet(k)).collect();
        let batch: Vec<(BlockKey, &[u8])> = leases
            .iter()
            .map(|l| (*l.key(), self.host.lease_data(l)))
            .collect();
        let known: Vec<Option<u64>> = leases.iter().map(|l| self.host.known_checksum(l.key())).collect();
        let stored = put(&batch, &known)
            .iter()
            .filter(|o| **o == PutOutcome::Stored)
            .count();
        for l in leases {
            self.host.release(l);
        }
        stored
    }

    /// Copies blocks the host holds to the object tier (write-through of blocks worth
    /// sharing); returns how many were newly stored there. Blocks not in host are skipped.
    pub fn write_through(&self, keys: &[BlockKey]) -> usize {
        let Some(object) = self.object.as_ref().filter(|o| o.has_room_for_copies()) else {
            return 0;
        };
        let absent: Vec<BlockKey> = keys
            .iter()
            .zip(object.contains_many(keys))
            .filter(|(_, p)| !p)
            .map(|(k, _)| *k)
            .collect();
        self.copy_host_blocks(&absent, |batch, known| object.put_batch_known(batch, known))
    }

    /// Persists the disk tier's metadata (also done on drop), then uploads what the object
    /// tier holds in memory (waiting up to one upload's time limit, `retry_timeout` +
    /// `request_timeout`; what is left then is lost, and logged).
    pub fn flush(&self) -> Result<()> {
        // The disk's metadata first: quick, and not to be lost if the uploads outlast the
        // stop's grace period.
        self.disk.as_ref().map_or(Ok(()), DiskTier::flush)?;
        if let Some(object) = &self.object {
            let left = object.flush(self.object_flush);
            if left > 0 {
                tracing::warn!(
                    store = object.url(),
                    blocks = left,
                    "object tier uploads did not finish in time; those blocks are not stored"
                );
            }
        }
        Ok(())
    }
}

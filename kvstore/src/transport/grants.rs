//! The source side of a transfer: blocks pinned for peers, under unguessable ids, until the
//! puller releases them or they expire; and blocks held for pullers that have not asked yet (a
//! prefill engine's blocks handed to decode engines), until each hand-off has had its pull or
//! the hold expires.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rayon::prelude::*;

use crate::host::Lease;
use crate::key::BlockKey;
use crate::stats::TierLevel;
use crate::store::TieredStore;

/// Bytes of blocks to checksum from which a grant spreads the work over rayon's threads (below
/// it, waking them costs more than it saves).
const PARALLEL_CHECKSUM_BYTES: u64 = 8 << 20;

/// Most blocks one grant may pin.
pub const MAX_GRANT_BLOCKS: usize = 65_536;

/// A grant's id: 128 random bits, so that only a caller the control channel answered can name it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GrantId(pub [u8; 16]);

impl GrantId {
    fn random() -> Self {
        let mut id = [0u8; 16];
        id.copy_from_slice(&super::auth::random_nonce()[..16]);
        Self(id)
    }

    /// Parses the 16 bytes of an id.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        Some(Self(b.try_into().ok()?))
    }
}

impl fmt::Debug for GrantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Half is enough to tell grants apart in logs without handing out the capability.
        write!(
            f,
            "GrantId({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

/// One granted block, as the puller needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantedBlock {
    /// Offset of the block in the source's arena.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// [`checksum`](crate::block::checksum) of its bytes as they were stored.
    pub checksum: u64,
    /// Where the source found it before pinning it in its arena.
    pub tier: TierLevel,
}

/// What [`Grants::grant`] hands out: the longest prefix of the asked keys that the source holds.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The id to pull and release with.
    pub id: GrantId,
    /// One entry per granted key, in the asked order.
    pub blocks: Vec<GrantedBlock>,
    /// How long the source keeps the blocks pinned if nobody releases them.
    pub ttl: Duration,
}

/// Pinned blocks of one grant; the pins go when the last holder (the table, or a data stream
/// still sending) drops it.
#[derive(Debug)]
pub struct GrantEntry {
    store: Arc<TieredStore>,
    leases: Vec<Lease>,
    /// When the grant began to be made.
    made: Instant,
    /// Whether its release ends a wait of its blocks' holds ([`Grants::grant_for`]).
    ends_holds: bool,
    expires: Instant,
}

impl GrantEntry {
    /// The bytes of block `index`, borrowed while the entry lives.
    pub fn block(&self, index: u32) -> Option<&[u8]> {
        let lease = self.leases.get(index as usize)?;
        Some(self.store.host().lease_data(lease))
    }

    /// Where block `index` lies in the source's arena.
    pub fn offset(&self, index: u32) -> Option<u64> {
        self.leases.get(index as usize).map(Lease::offset)
    }

    /// How many blocks the grant holds.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Whether the grant holds no block.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// When the grant expires unless released first: no transfer of its blocks should run on
    /// past it.
    pub fn expires(&self) -> Instant {
        self.expires
    }
}

impl Drop for GrantEntry {
    fn drop(&mut self) {
        for lease in self.leases.drain(..) {
            self.store.release(lease);
        }
    }
}

/// The grant table of one agent.
#[derive(Debug)]
pub struct Grants {
    store: Arc<TieredStore>,
    ttl: Duration,
    max_open: usize,
    table: Mutex<HashMap<GrantId, Arc<GrantEntry>>>,
    /// Grants being made, not in `table` yet.
    making: AtomicUsize,
    holds: Mutex<Holds>,
}

/// How long [`Grants::hold`] keeps blocks, and how much of each tier it may keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldLimits {
    /// A hold ends this long after it was last asked for, unless each hand-off it counts has
    /// had its pull first. Zero: nothing is held.
    pub ttl: Duration,
    /// Most bytes held in the host arena at once.
    pub host_bytes: u64,
    /// Most bytes held on disk at once.
    pub disk_bytes: u64,
}

impl HoldLimits {
    /// Holds nothing.
    pub const NONE: Self = Self {
        ttl: Duration::ZERO,
        host_bytes: 0,
        disk_bytes: 0,
    };
}

/// One held block: pinned in `tier` while hand-offs of it wait for their pulls, and until
/// `expires` at most.
#[derive(Debug, Clone, Copy)]
struct Held {
    tier: TierLevel,
    /// What the block takes in `tier` (its slot or record), counted against the limit.
    bytes: u64,
    /// Hand-offs waiting for a pull: each hold adds one, each pull of the block (a grant made
    /// since the first hold, released) takes one away.
    waiting: u32,
    /// When the block was first held: a grant made before it was not for these hand-offs.
    since: Instant,
    expires: Instant,
}

/// The blocks held now, and their bytes per tier.
#[derive(Debug)]
struct Holds {
    limits: HoldLimits,
    blocks: HashMap<BlockKey, Held>,
    host_bytes: u64,
    disk_bytes: u64,
    /// No hold expires before this (it may be earlier than the first expiry, after renewals):
    /// reaping before it has nothing to do, so a tier at its limit does not scan every hold
    /// on every hold.
    next_expiry: Option<Instant>,
}

impl Holds {
    /// The bytes held in `tier` (host or disk) and that tier's limit.
    fn room(&mut self, tier: TierLevel) -> (&mut u64, u64) {
        if tier == TierLevel::Host {
            (&mut self.host_bytes, self.limits.host_bytes)
        } else {
            (&mut self.disk_bytes, self.limits.disk_bytes)
        }
    }
}

/// What [`Grants::hold`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HoldOutcome {
    /// The tier of each leading stored key, as a lookup answers (held or not).
    pub tiers: Vec<TierLevel>,
    /// How many of them are held now (by this call or an earlier one), from the first: a hold
    /// stops at the first block that would pass its tier's limit.
    pub held: usize,
}

/// Held blocks and bytes, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeldCounts {
    /// Blocks held.
    pub blocks: usize,
    /// Their bytes in the host arena.
    pub host_bytes: u64,
    /// Their bytes on disk.
    pub disk_bytes: u64,
}

/// One grant being made, counted in [`Grants::making`] until dropped.
struct Making<'a>(&'a AtomicUsize);

impl Drop for Making<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why no grant was made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// Too many keys in one request.
    #[error("{asked} keys asked in one grant; at most {MAX_GRANT_BLOCKS}")]
    TooManyKeys {
        /// How many were asked.
        asked: usize,
    },
    /// Too many grants open; old ones must be released or expire first.
    #[error("{open} grants open, the limit; retry after some are released")]
    TooManyGrants {
        /// How many are open.
        open: usize,
    },
}

impl Grants {
    /// A table over `store`, whose grants expire after `ttl`, with at most `max_open` at once.
    /// Holds nothing until [`Self::with_holds`].
    pub fn new(store: Arc<TieredStore>, ttl: Duration, max_open: usize) -> Self {
        Self {
            store,
            ttl,
            max_open,
            table: Mutex::new(HashMap::new()),
            making: AtomicUsize::new(0),
            holds: Mutex::new(Holds {
                limits: HoldLimits::NONE,
                blocks: HashMap::new(),
                host_bytes: 0,
                disk_bytes: 0,
                next_expiry: None,
            }),
        }
    }

    /// The same table, holding blocks within `limits` ([`Self::hold`]).
    #[must_use]
    pub fn with_holds(self, limits: HoldLimits) -> Self {
        self.holds.lock().limits = limits;
        self
    }

    /// The store whose blocks are granted.
    pub fn store(&self) -> &Arc<TieredStore> {
        &self.store
    }

    /// Pins the longest stored prefix of `keys` (promoting disk blocks into the arena) and
    /// checksums it (a block is read for that once in its life at most:
    /// [`HostTier::checksum`](crate::host::HostTier::checksum)). An empty prefix makes no grant
    /// entry but still answers.
    pub fn grant(&self, keys: &[BlockKey]) -> Result<Grant, GrantError> {
        self.grant_for(keys, true)
    }

    /// [`Self::grant`] for a pull that ends a wait of its blocks' holds when released
    /// (`ends_holds`: a decode continuing a request this node prefilled) or none (cross-node
    /// reuse of a prefix the index found here, which may not even move the blocks).
    pub fn grant_for(&self, keys: &[BlockKey], ends_holds: bool) -> Result<Grant, GrantError> {
        let made = Instant::now();
        if keys.len() > MAX_GRANT_BLOCKS {
            return Err(GrantError::TooManyKeys { asked: keys.len() });
        }
        self.expire();
        // Counted as open from here, so that grants made at once cannot pass the limit together.
        let _making = {
            let table = self.table.lock();
            let open = table.len() + self.making.load(Ordering::Acquire);
            if open >= self.max_open {
                return Err(GrantError::TooManyGrants { open });
            }
            self.making.fetch_add(1, Ordering::AcqRel);
            Making(&self.making)
        };
        // Only the stored prefix is acquired: blocks of lower tiers past its end would be
        // promoted (taking the arena's room) for nothing.
        let prefix = self.store.lookup_prefix(keys).len;
        let mut leases = Vec::new();
        let mut tiers = Vec::new();
        let mut acquired = self.store.acquire_batch_tiered(&keys[..prefix]).into_iter();
        for got in acquired.by_ref() {
            let Some((lease, tier)) = got else { break };
            leases.push(lease);
            tiers.push(tier);
        }
        // Hits past the first miss are not part of the prefix.
        for lease in acquired.flatten() {
            self.store.release(lease.0);
        }
        let blocks = leases
            .iter()
            .zip(tiers)
            .zip(self.checksums(&leases))
            .map(|((lease, tier), checksum)| GrantedBlock {
                offset: lease.offset(),
                len: lease.len(),
                checksum,
                tier,
            })
            .collect();
        let id = GrantId::random();
        if !leases.is_empty() {
            let entry = GrantEntry {
                store: Arc::clone(&self.store),
                leases,
                made,
                ends_holds,
                expires: Instant::now() + self.ttl,
            };
            self.table.lock().insert(id, Arc::new(entry));
        }
        Ok(Grant {
            id,
            blocks,
            ttl: self.ttl,
        })
    }

    /// The checksums of leased blocks. Those not known yet are computed on several cores when
    /// they add up to enough bytes: a long prefix of blocks an engine saved is read in full
    /// before the grant answers, and the puller waits for it.
    fn checksums(&self, leases: &[Lease]) -> Vec<u64> {
        let host = self.store.host();
        let unknown: u64 = leases
            .iter()
            .filter(|l| host.known_checksum(l.key()).is_none())
            .map(Lease::len)
            .sum();
        if unknown < PARALLEL_CHECKSUM_BYTES {
            leases.iter().map(|l| host.checksum(l)).collect()
        } else {
            leases.par_iter().map(|l| host.checksum(l)).collect()
        }
    }

    /// The live grant `id`, to read its blocks (they stay pinned while the `Arc` lives).
    pub fn get(&self, id: &GrantId) -> Option<Arc<GrantEntry>> {
        let table = self.table.lock();
        let e = table.get(id)?;
        (e.expires > Instant::now()).then(|| Arc::clone(e))
    }

    /// Unpins a grant; `false` when it was unknown (already released or expired). A hand-off
    /// of each of its blocks that waited for a pull has had it (or its puller gave up): one
    /// fewer keeps the block held.
    pub fn release(&self, id: &GrantId) -> bool {
        // Dropped outside the lock: releasing leases takes the host tier's lock.
        let removed = self.table.lock().remove(id);
        if let Some(entry) = removed.as_ref().filter(|e| e.ends_holds) {
            let mut holds = self.holds.lock();
            for key in entry.leases.iter().map(Lease::key) {
                if let Some(h) = holds.blocks.get_mut(key).filter(|h| h.since <= entry.made) {
                    h.waiting -= 1;
                    if h.waiting == 0 {
                        self.end_hold(&mut holds, key);
                    }
                }
            }
        }
        removed.is_some()
    }

    /// Holds the longest stored prefix of `keys` where it is (host arena or disk) for a puller
    /// that has not asked for it yet (a decode engine continuing a request this node's engine
    /// prefilled). A held block is not evicted from its tier while a hold of it waits for its
    /// pull: each hold counts one wait, each grant of the block released afterwards ends one,
    /// and all end [`HoldLimits::ttl`] after the last hold. Blocks only in the object store
    /// are not held (nothing evicts them there); a hold stops at the first block that would
    /// pass its tier's limit. Blocks in lower tiers are looked for until `until` at most.
    pub fn hold(&self, keys: &[BlockKey], until: Instant) -> HoldOutcome {
        let keys = &keys[..keys.len().min(MAX_GRANT_BLOCKS)];
        let tiers = self.store.lookup_prefix_until(keys, until).tiers;
        let mut holds = self.holds.lock();
        if holds.limits.ttl.is_zero() {
            return HoldOutcome { tiers, held: 0 };
        }
        let now = Instant::now();
        let expires = now + holds.limits.ttl;
        let mut reaped = false;
        let mut held = 0;
        for key in &keys[..tiers.len()] {
            if let Some(h) = holds.blocks.get_mut(key) {
                h.waiting = h.waiting.saturating_add(1);
                h.expires = expires;
                held += 1;
                continue;
            }
            // Pinned before its size is known; unpinned again where it does not fit.
            let Some((tier, len)) = self.store.pin(key).filter(|(t, _)| *t != TierLevel::Object) else {
                break;
            };
            let bytes = match tier {
                TierLevel::Host => crate::alloc::slot_size_for(len),
                _ => crate::disk::record_len(len),
            };
            let fits = |holds: &mut Holds| {
                let (used, limit) = holds.room(tier);
                used.saturating_add(bytes) <= limit
            };
            if !fits(&mut holds) && !reaped {
                // Holds past their time may not have been reaped yet.
                reaped = true;
                self.expire_holds_locked(&mut holds, now);
            }
            if !fits(&mut holds) {
                self.unpin(tier, key);
                break;
            }
            *holds.room(tier).0 += bytes;
            let hold = Held {
                tier,
                bytes,
                waiting: 1,
                since: now,
                expires,
            };
            holds.blocks.insert(*key, hold);
            held += 1;
        }
        if held > 0 {
            holds.next_expiry = Some(holds.next_expiry.map_or(expires, |n| n.min(expires)));
        }
        HoldOutcome { tiers, held }
    }

    /// Ends the hold of `key`, if held.
    fn end_hold(&self, holds: &mut Holds, key: &BlockKey) {
        if let Some(h) = holds.blocks.remove(key) {
            *holds.room(h.tier).0 -= h.bytes;
            self.unpin(h.tier, key);
        }
    }

    fn unpin(&self, tier: TierLevel, key: &BlockKey) {
        match tier {
            TierLevel::Host => self.store.host().unpin(key),
            _ => self.store.disk().is_some_and(|d| d.unpin(key)),
        };
    }

    /// Blocks held now and their bytes.
    pub fn held(&self) -> HeldCounts {
        let holds = self.holds.lock();
        HeldCounts {
            blocks: holds.blocks.len(),
            host_bytes: holds.host_bytes,
            disk_bytes: holds.disk_bytes,
        }
    }

    /// Ends the holds that expired; returns how many.
    pub fn expire_holds(&self) -> usize {
        self.expire_holds_at(Instant::now())
    }

    fn expire_holds_at(&self, now: Instant) -> usize {
        let ended = self.expire_holds_locked(&mut self.holds.lock(), now);
        if ended > 0 {
            tracing::debug!(blocks = ended, "holds for pullers expired unpulled");
        }
        ended
    }

    fn expire_holds_locked(&self, holds: &mut Holds, now: Instant) -> usize {
        if holds.next_expiry.is_none_or(|next| next > now) {
            return 0;
        }
        let mut expired = Vec::new();
        let mut next = None::<Instant>;
        for (key, h) in &holds.blocks {
            if h.expires <= now {
                expired.push(*key);
            } else {
                next = Some(next.map_or(h.expires, |n| n.min(h.expires)));
            }
        }
        holds.next_expiry = next;
        for key in &expired {
            self.end_hold(holds, key);
        }
        expired.len()
    }

    /// Drops expired grants; returns how many.
    pub fn expire(&self) -> usize {
        let now = Instant::now();
        let mut gone = Vec::new();
        self.table.lock().retain(|_, e| {
            let keep = e.expires > now;
            if !keep {
                gone.push(Arc::clone(e));
            }
            keep
        });
        if !gone.is_empty() {
            tracing::debug!(grants = gone.len(), "peer grants expired unreleased");
        }
        gone.len()
    }

    /// How many grants are open.
    pub fn open(&self) -> usize {
        self.table.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::checksum;
    use crate::transport::test_support::{key, payload, store};

    #[test]
    fn grants_pin_a_prefix_until_released_or_expired() {
        let s = store(8);
        for i in [0, 1, 3] {
            s.put(&key(i), &[i as u8; 4096]);
        }
        let g = Grants::new(Arc::clone(&s), Duration::from_secs(60), 4);
        let grant = g.grant(&[key(0), key(1), key(2), key(3)]).unwrap();
        assert_eq!(grant.blocks.len(), 2, "stops at the first missing key");
        assert_eq!(grant.blocks[1].checksum, checksum(&[1u8; 4096]));
        let entry = g.get(&grant.id).unwrap();
        assert_eq!(entry.block(1), Some(&[1u8; 4096][..]));
        assert_eq!(entry.block(2), None);
        drop(entry);
        assert!(g.release(&grant.id));
        assert!(!g.release(&grant.id));
        assert!(g.get(&grant.id).is_none());

        let short = Grants::new(Arc::clone(&s), Duration::ZERO, 1);
        let grant = short.grant(&[key(0)]).unwrap();
        assert!(short.get(&grant.id).is_none(), "expired at once");
        assert_eq!(short.expire(), 1);
        assert_eq!(short.open(), 0);
        // Nothing stored: an answer with no blocks and no entry.
        let none = g.grant(&[key(9)]).unwrap();
        assert!(none.blocks.is_empty() && g.open() == 0);
    }

    #[test]
    fn a_block_is_read_for_its_checksum_once() {
        let s = store(8);
        s.put(&key(0), &[7; 4096]);
        let g = Grants::new(Arc::clone(&s), Duration::from_secs(60), 4);
        let first = g.grant(&[key(0)]).unwrap();
        assert_eq!(first.blocks[0].checksum, checksum(&[7u8; 4096]));
        assert!(g.release(&first.id));
        // The block's bytes change behind the tier's back: the next grant still announces what
        // was stored, so a puller's check catches the change instead of vouching for it.
        // SAFETY: the block's slot, inside the arena; nothing reads or writes it meanwhile.
        unsafe { s.host().arena().write_at(first.blocks[0].offset, &[8; 16]) };
        let second = g.grant(&[key(0)]).unwrap();
        assert_eq!(second.blocks[0].checksum, first.blocks[0].checksum);

        // A writer's noted checksum is what a grant announces: the block is not read for it.
        let mut r = s.reserve_batch(&[(key(1), 4096)]).pop().unwrap().unwrap();
        r.note_checksum(0xfeed);
        s.host().write(&r, &[1; 4096]);
        s.commit(r);
        assert_eq!(g.grant(&[key(1)]).unwrap().blocks[0].checksum, 0xfeed);
    }

    #[test]
    fn a_long_prefix_is_checksummed_in_parallel_in_order() {
        let s = store(64);
        let data: Vec<Vec<u8>> = (0..12).map(|i| payload(i, 1 << 20)).collect();
        for (i, d) in data.iter().enumerate() {
            s.put(&key(i as u64), d);
        }
        let keys: Vec<BlockKey> = (0..12).map(key).collect();
        let g = Grants::new(Arc::clone(&s), Duration::from_secs(60), 4);
        let grant = g.grant(&keys).unwrap();
        const { assert!(12 << 20 >= PARALLEL_CHECKSUM_BYTES) };
        let sums: Vec<u64> = grant.blocks.iter().map(|b| b.checksum).collect();
        assert_eq!(sums, data.iter().map(|d| checksum(d)).collect::<Vec<_>>());
    }

    #[test]
    fn limits_are_enforced() {
        let s = store(8);
        s.put(&key(0), &[0; 4096]);
        let g = Grants::new(Arc::clone(&s), Duration::from_secs(60), 1);
        g.grant(&[key(0)]).unwrap();
        assert_eq!(
            g.grant(&[key(0)]).unwrap_err(),
            GrantError::TooManyGrants { open: 1 }
        );
        let many = vec![key(0); MAX_GRANT_BLOCKS + 1];
        assert!(matches!(g.grant(&many), Err(GrantError::TooManyKeys { .. })));
    }

    /// Grants asked for at once never open more than the limit between them.
    #[test]
    fn the_grant_limit_holds_for_grants_made_at_once() {
        let s = store(64);
        let keys: Vec<BlockKey> = (0..8).map(key).collect();
        for (i, k) in keys.iter().enumerate() {
            s.put(k, &payload(i as u64, 1 << 20));
        }
        for round in 0..5 {
            let g = Grants::new(Arc::clone(&s), Duration::from_secs(60), 3);
            let start = std::sync::Barrier::new(12);
            let made = std::thread::scope(|scope| {
                let tries: Vec<_> = (0..12)
                    .map(|_| {
                        scope.spawn(|| {
                            start.wait();
                            g.grant(&keys).is_ok()
                        })
                    })
                    .collect();
                tries
                    .into_iter()
                    .filter_map(|t| t.join().ok())
                    .filter(|ok| *ok)
                    .count()
            });
            assert_eq!((made, g.open()), (3, 3), "round {round}");
        }
    }

    fn holding(s: &Arc<TieredStore>, ttl: Duration, host_bytes: u64) -> Grants {
        Grants::new(Arc::clone(s), Duration::from_secs(60), 4).with_holds(HoldLimits {
            ttl,
            host_bytes,
            disk_bytes: 64 << 20,
        })
    }

    fn hold(g: &Grants, keys: &[BlockKey]) -> HoldOutcome {
        g.hold(keys, Instant::now() + Duration::from_secs(1))
    }

    /// Fills an 8 MiB arena with blocks the test never asks for again.
    fn pressure(s: &TieredStore, from: u64) {
        for i in from..from + 16 {
            s.put(&key(i), &payload(i, 1 << 20));
        }
    }

    /// A grant of `keys`, pulled and released.
    fn pulled(g: &Grants, keys: &[BlockKey]) {
        let grant = g.grant(keys).unwrap();
        assert!(g.release(&grant.id));
    }

    #[test]
    fn held_blocks_stay_until_a_grant_of_them_is_released() {
        let s = store(8);
        for i in 0..5 {
            s.put(&key(i), &payload(i, 1 << 20));
        }
        let keys: Vec<BlockKey> = (0..4).map(key).collect();
        // A grant made before the hold was not for it.
        let earlier = g_grant_for(&s, &keys);
        let g = earlier.0;
        let out = hold(&g, &keys);
        assert_eq!((out.tiers, out.held), (vec![TierLevel::Host; 4], 4));
        assert!(g.release(&earlier.1));
        assert_eq!(g.held().blocks, 4, "an earlier grant's release ends no hold");
        pressure(&s, 100);
        assert!(s.contains(&key(4)).is_none(), "a block not held was evicted");
        for k in &keys {
            assert_eq!(s.contains(k), Some(TierLevel::Host), "held through the pressure");
        }
        assert_eq!(
            g.held(),
            HeldCounts {
                blocks: 4,
                host_bytes: 4 * crate::alloc::slot_size_for(1 << 20),
                disk_bytes: 0
            }
        );
        // A grant of the first three, released: their holds end, the fourth stays held.
        pulled(&g, &keys[..3]);
        assert_eq!(g.held().blocks, 1);
        pressure(&s, 200);
        for k in &keys[..3] {
            assert!(s.contains(k).is_none(), "no pin left after the release");
        }
        assert_eq!(s.contains(&keys[3]), Some(TierLevel::Host));
        assert_eq!(g.expire_holds_at(Instant::now() + Duration::from_secs(61)), 1);
        assert_eq!(g.held(), HeldCounts::default());
        pressure(&s, 300);
        assert!(s.contains(&keys[3]).is_none(), "no pin left after the expiry");
    }

    /// A grant table and a grant of `keys` made on it before any hold.
    fn g_grant_for(s: &Arc<TieredStore>, keys: &[BlockKey]) -> (Grants, GrantId) {
        let g = holding(s, Duration::from_secs(60), 8 << 20);
        let id = g.grant(keys).unwrap().id;
        (g, id)
    }

    /// Two requests sharing a prefix, handed to two decodes: the prefix stays held until both
    /// have pulled it.
    #[test]
    fn a_block_handed_over_twice_is_held_until_both_pulls() {
        let s = store(8);
        for i in 0..3 {
            s.put(&key(i), &payload(i, 1 << 20));
        }
        let g = holding(&s, Duration::from_secs(60), 8 << 20);
        let (first, second) = ([key(0), key(1)], [key(0), key(2)]);
        assert_eq!(hold(&g, &first).held, 2);
        assert_eq!(hold(&g, &second).held, 2);
        // Another node reusing the prefix is not one of the decodes it was handed to.
        let reuse = g.grant_for(&first, false).unwrap();
        assert!(g.release(&reuse.id));
        assert_eq!(g.held().blocks, 3, "a reuse pull ends no hold");
        pulled(&g, &first);
        assert_eq!(g.held().blocks, 2, "key 0 still waits for the second pull");
        pressure(&s, 100);
        assert_eq!(s.contains(&key(0)), Some(TierLevel::Host));
        assert!(s.contains(&key(1)).is_none());
        pulled(&g, &second);
        assert_eq!(g.held(), HeldCounts::default());
    }

    #[test]
    fn a_hold_stops_at_its_tiers_limit_and_without_a_ttl_holds_nothing() {
        let s = store(8);
        for i in 0..4 {
            s.put(&key(i), &payload(i, 1 << 20));
        }
        let keys: Vec<BlockKey> = (0..6).map(key).collect();
        let off = Grants::new(Arc::clone(&s), Duration::from_secs(60), 4);
        let out = hold(&off, &keys);
        assert_eq!((out.tiers.len(), out.held), (4, 0), "answers like a lookup");
        let g = holding(&s, Duration::from_secs(60), (5 << 20) / 2);
        let out = hold(&g, &keys);
        assert_eq!((out.tiers.len(), out.held), (4, 2));
        assert_eq!(g.expire_holds(), 0, "not expired yet");
        pressure(&s, 100);
        assert_eq!(s.contains(&key(1)), Some(TierLevel::Host));
        assert!(
            s.contains(&key(2)).is_none(),
            "the block past the limit was not left pinned"
        );
        // A tier at its limit: holds that expired make room (no reaping ran since).
        let short = holding(&s, Duration::from_nanos(1), (5 << 20) / 2);
        for i in 10..14 {
            s.put(&key(i), &payload(i, 1 << 20));
        }
        let later: Vec<BlockKey> = (10..14).map(key).collect();
        assert_eq!(hold(&short, &later[..2]).held, 2);
        assert_eq!(hold(&short, &later[2..]).held, 2, "the expired holds made room");
        assert_eq!(short.held().blocks, 2);
    }

    /// A block on disk is held there (not promoted for it); a grant promotes it to the arena,
    /// and its release ends the disk pin.
    #[test]
    fn a_block_on_disk_is_held_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(
            TieredStore::open(crate::store::StoreConfig {
                host: crate::host::HostTierConfig::new(8 << 20),
                disk: Some(crate::disk::DiskTierConfig {
                    slab_size: 4 << 20,
                    direct_io: false,
                    ..crate::disk::DiskTierConfig::new(dir.path(), 64 << 20)
                }),
                object: None,
            })
            .unwrap(),
        );
        s.put(&key(0), &payload(0, 1 << 20));
        pressure(&s, 100);
        assert_eq!(s.contains(&key(0)), Some(TierLevel::Disk), "demoted");
        let g = holding(&s, Duration::from_secs(60), 8 << 20);
        let out = hold(&g, &[key(0)]);
        assert_eq!((out.tiers, out.held), (vec![TierLevel::Disk], 1));
        assert_eq!(g.held().disk_bytes, crate::disk::record_len(1 << 20));
        assert_eq!(s.contains(&key(0)), Some(TierLevel::Disk), "held where it was");
        pulled(&g, &[key(0)]);
        assert_eq!(g.held(), HeldCounts::default());
        assert!(
            !s.disk().unwrap().unpin(&key(0)),
            "the disk pin ended with the hold"
        );
    }
}

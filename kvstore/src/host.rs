//! The host tier: blocks in slots of the shared [`HostArena`], indexed in LRU order.
//!
//! Writers reserve a slot, copy into it (from this process or, later, from an engine process
//! that maps the arena), and commit; readers acquire (pin) a slot, copy out, and release. The
//! index lock is held only to look up, allocate or pin — never during a copy — so many threads
//! move data at once. A slot holds the raw payload so engines can DMA into it; its header (key
//! and length) lives in the index, and its checksum is computed when the block leaves memory
//! (demotion to disk), because RAM is not where corruption is expected and hashing every put
//! would halve the arena's bandwidth.

use std::collections::HashMap;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::alloc::{SizeClasses, SlabAllocator, Slot, slot_size_floor, slot_size_for};
use crate::arena::{HostArena, HugePages};
use crate::error::{Error, Result};
use crate::key::BlockKey;
use crate::slots::{Entry, SlotIndex};
use crate::stats::{TierCounters, TierStats};

/// Settings of a [`HostTier`].
#[derive(Debug, Clone)]
pub struct HostTierConfig {
    /// Bytes of shared memory for blocks.
    pub capacity: u64,
    /// Slab size; the largest block is one slab. `0` picks `capacity / 8` clamped to 4–64 MiB.
    pub slab_size: u64,
    /// Huge page policy.
    pub huge_pages: HugePages,
    /// Allocate every page of the arena at creation (`fallocate`), instead of as blocks are
    /// written. Shared-memory pages are charged to the memory cgroup of the process that first
    /// touches them: preallocating charges the whole arena to the agent (whose limit is sized
    /// for it) rather than to the engine that happens to write a block first, and fails at
    /// start, not later, when the memory is not there.
    pub preallocate: bool,
    /// Name of the memfd (visible in `/proc/<pid>/fd`).
    pub name: String,
}

impl HostTierConfig {
    /// Defaults for an arena of `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            slab_size: 0,
            huge_pages: HugePages::Auto,
            preallocate: false,
            name: "kvtier-arena".into(),
        }
    }

    /// The slab size in use: the configured one (or `capacity / 8` clamped to 4–64 MiB),
    /// rounded down to a slot size so that every block up to it fits one slot.
    fn effective_slab_size(&self) -> u64 {
        let wanted = if self.slab_size != 0 {
            self.slab_size
        } else {
            (self.capacity / 8).clamp(4 << 20, 64 << 20)
        };
        slot_size_floor(wanted)
    }
}

/// A slot reserved for writing one block. Commit or abort it (it is deliberately not `Copy`:
/// the handle is the right to the slot).
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a reservation holds a slot until committed or aborted"]
pub struct Reservation {
    key: BlockKey,
    offset: u64,
    len: u64,
    slot: Slot,
    /// The checksum of what the writer put in the slot, where it knows it without reading the
    /// slot again ([`Reservation::note_checksum`]).
    checksum: Option<u64>,
}

impl Reservation {
    /// Records the [`checksum`](crate::block::checksum) of the bytes this reservation will be
    /// committed with, where the writer has it at no cost (a pulled block verified against its
    /// grant, a block promoted from a tier that verified it): the committed block keeps it, and
    /// a peer's grant of the block need not read it again ([`HostTier::checksum`]). A wrong
    /// value makes no block wrong: a puller that checks finds the mismatch and drops its copy.
    pub fn note_checksum(&mut self, checksum: u64) {
        self.checksum = Some(checksum);
    }
}

/// A pinned, readable block. Release it (not `Copy`: one lease, one release).
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a lease pins its block until released"]
pub struct Lease {
    key: BlockKey,
    offset: u64,
    len: u64,
}

/// A block taken out of the index to make room; its slot stays allocated until freed.
#[derive(Debug)]
#[must_use = "a victim's slot stays allocated until given to free_victims"]
pub struct Victim {
    key: BlockKey,
    offset: u64,
    len: u64,
    slot: Slot,
    /// Its checksum, where the tier knew it.
    checksum: Option<u64>,
}

impl Victim {
    /// The block's [`checksum`](crate::block::checksum), where the tier knew it (see
    /// [`HostTier::known_checksum`]): a lower tier that stores the victim need not compute it.
    pub fn checksum(&self) -> Option<u64> {
        self.checksum
    }
}

/// Read-only views of a handle. The fields are private so that safe code cannot point a handle
/// at a slot it does not own.
macro_rules! handle_accessors {
    ($($t:ty),*) => {$(
        impl $t {
            /// The block.
            pub fn key(&self) -> &BlockKey {
                &self.key
            }
            /// Offset of the block's slot in the arena (where another process that maps the
            /// arena reads or writes it).
            pub fn offset(&self) -> u64 {
                self.offset
            }
            /// Block length in bytes.
            pub fn len(&self) -> u64 {
                self.len
            }
            /// Whether the block is empty (never true for a stored block).
            pub fn is_empty(&self) -> bool {
                self.len == 0
            }
        }
    )*};
}
handle_accessors!(Reservation, Lease, Victim);

/// Result of [`HostTier::reserve`].
#[derive(Debug, PartialEq, Eq)]
pub enum Reserve {
    /// A slot to write.
    Slot(Reservation),
    /// The block is already committed.
    Exists,
    /// Another writer holds a reservation for the block.
    Busy,
    /// No free slot of the right size: evict first.
    Full,
    /// Larger than a slab.
    TooLarge,
}

#[derive(Debug)]
struct HostState {
    alloc: SlabAllocator,
    /// Committed blocks, with their checksum once known (noted at commit, or computed by the
    /// first [`HostTier::checksum`]); a reader is a [`Lease`] holder.
    entries: SlotIndex<Option<u64>>,
    reserved: HashMap<BlockKey, Slot>,
    /// Victims being demoted, with their slots (still allocated); `true` once removed meanwhile
    /// (the lower tier must drop them too).
    limbo: HashMap<BlockKey, (Slot, bool)>,
}

impl HostState {
    /// Blocks to evict for a slot of `size` bytes (see [`victims_for`]).
    fn victims(&self, size: u64) -> Vec<BlockKey> {
        self.entries.victims(size, |slab| {
            self.reserved.values().any(|s| s.slab == slab) || self.limbo.values().any(|(s, _)| s.slab == slab)
        })
    }
}

/// The host-memory tier over one shared arena.
#[derive(Debug)]
pub struct HostTier {
    arena: HostArena,
    slab_size: u64,
    state: Mutex<HostState>,
    counters: TierCounters,
    /// Woken whenever a reservation ends (committed or aborted), for
    /// [`Self::wait_unreserved`].
    settled: Notify,
}

impl HostTier {
    /// Creates the arena and an empty index.
    pub fn new(cfg: &HostTierConfig) -> Result<Self> {
        let slab_size = cfg.effective_slab_size();
        if slab_size < 4096 {
            return Err(Error::InvalidConfig {
                field: "host.slab_size",
                reason: format!("{} is below 4096", cfg.slab_size),
            });
        }
        let slabs = cfg.capacity / slab_size;
        if slabs == 0 {
            return Err(Error::InvalidConfig {
                field: "host.capacity",
                reason: format!("{} is below one slab ({slab_size} bytes)", cfg.capacity),
            });
        }
        let slabs = u32::try_from(slabs).map_err(|_| Error::InvalidConfig {
            field: "host.capacity",
            reason: "too many slabs".into(),
        })?;
        let arena = HostArena::create(&cfg.name, slabs as u64 * slab_size, cfg.huge_pages)?;
        if cfg.preallocate {
            arena.preallocate()?;
        }
        let mut alloc = SlabAllocator::new(SizeClasses::Geometric, slab_size, slabs);
        while alloc.add_slab().is_some() {}
        Ok(Self {
            arena,
            slab_size,
            state: Mutex::new(HostState {
                alloc,
                entries: SlotIndex::new(),
                reserved: HashMap::new(),
                limbo: HashMap::new(),
            }),
            counters: TierCounters::default(),
            settled: Notify::new(),
        })
    }

    /// The shared arena (its fd goes to engine processes).
    pub fn arena(&self) -> &HostArena {
        &self.arena
    }

    /// Largest block the tier can hold (the slab size is a slot size, so a block of exactly
    /// one slab fits).
    pub fn max_block_len(&self) -> u64 {
        self.slab_size
    }

    fn offset(&self, slot: &Slot) -> u64 {
        slot.slab as u64 * self.slab_size + slot.offset_in_slab()
    }

    /// Reserves a slot for `key`. Does not evict: on [`Reserve::Full`] the caller picks victims
    /// with [`Self::take_victims`] (and demotes them) first.
    pub fn reserve(&self, key: BlockKey, len: u64) -> Reserve {
        self.reserve_inner(key, len, false)
    }

    /// Reserves a slot for `key`, dropping least-recently-used unpinned blocks when there is no
    /// room — for a store with no lower tier to demote to. One lock acquisition.
    pub fn reserve_dropping(&self, key: BlockKey, len: u64) -> Reserve {
        self.reserve_inner(key, len, true)
    }

    fn reserve_inner(&self, key: BlockKey, len: u64, drop_lru: bool) -> Reserve {
        self.reserve_many(&[(key, len)], drop_lru)
            .pop()
            .expect("one answer per item")
    }

    /// [`Self::reserve`] (or, with `drop_lru`, [`Self::reserve_dropping`]) for many blocks under
    /// one acquisition of the index lock.
    pub fn reserve_many(&self, items: &[(BlockKey, u64)], drop_lru: bool) -> Vec<Reserve> {
        let mut dropped = 0;
        let mut st = self.state.lock();
        let out = items
            .iter()
            .map(|&(key, len)| self.reserve_locked(&mut st, key, len, drop_lru, &mut dropped))
            .collect();
        drop(st);
        TierCounters::add(&self.counters.evictions, dropped);
        out
    }

    fn reserve_locked(
        &self,
        st: &mut HostState,
        key: BlockKey,
        len: u64,
        drop_lru: bool,
        dropped: &mut u64,
    ) -> Reserve {
        let size = slot_size_for(len);
        if size > self.slab_size {
            return Reserve::TooLarge;
        }
        if st.entries.contains(&key) {
            return Reserve::Exists;
        }
        if st.reserved.contains_key(&key) {
            return Reserve::Busy;
        }
        let slot = loop {
            if let Some(slot) = st.alloc.alloc(len) {
                break Some(slot);
            }
            let victims = if drop_lru { st.victims(size) } else { Vec::new() };
            if victims.is_empty() {
                break None;
            }
            for v in victims {
                if let Some(e) = st.entries.pop(&v) {
                    st.alloc.free(e.slot);
                    *dropped += 1;
                }
            }
        };
        let Some(slot) = slot else {
            return Reserve::Full;
        };
        st.reserved.insert(key, slot);
        Reserve::Slot(Reservation {
            key,
            offset: self.offset(&slot),
            len,
            slot,
            checksum: None,
        })
    }

    /// Copies `data` into a reserved slot.
    ///
    /// # Panics
    /// If `data` is not exactly the reserved length.
    pub fn write(&self, r: &Reservation, data: &[u8]) {
        assert_eq!(data.len() as u64, r.len, "data must match the reservation");
        // SAFETY: the reservation gives its holder the slot exclusively: it is neither in the
        // index (no readers) nor free (no other writer) until commit or abort.
        unsafe { self.arena.write_at(r.offset, data) };
    }

    /// The reserved slot as a mutable slice, to fill in place (a socket read or a copy engine)
    /// instead of through [`Self::write`].
    pub fn reserved_mut<'a>(&'a self, r: &'a mut Reservation) -> &'a mut [u8] {
        // SAFETY: the reservation gives its holder the slot exclusively (see `write`), and the
        // borrow is tied to a unique borrow of the reservation, so no second slice can exist.
        unsafe { self.arena.slice_mut(r.offset, r.len as usize) }
    }

    /// Makes a reserved block visible (most recently used).
    pub fn commit(&self, r: Reservation) {
        let len = r.len;
        self.insert(r);
        TierCounters::add(&self.counters.stores, 1);
        TierCounters::add(&self.counters.bytes_written, len);
    }

    /// Commits a block copied up from a lower tier: counted as a promotion, not a store.
    pub(crate) fn commit_promoted(&self, r: Reservation) {
        self.insert(r);
        TierCounters::add(&self.counters.promotions, 1);
    }

    /// [`Self::commit`] for many reservations under one acquisition of the index lock.
    pub fn commit_many(&self, rs: Vec<Reservation>) {
        let (n, bytes) = (rs.len() as u64, rs.iter().map(|r| r.len).sum());
        let mut st = self.state.lock();
        for r in rs {
            st.reserved.remove(&r.key);
            st.entries.put(r.key, Entry::new(r.slot, r.len, r.checksum));
        }
        drop(st);
        self.settled.notify_waiters();
        TierCounters::add(&self.counters.stores, n);
        TierCounters::add(&self.counters.bytes_written, bytes);
    }

    fn insert(&self, r: Reservation) {
        let mut st = self.state.lock();
        st.reserved.remove(&r.key);
        st.entries.put(r.key, Entry::new(r.slot, r.len, r.checksum));
        drop(st);
        self.settled.notify_waiters();
    }

    /// Gives a reserved slot back unwritten.
    pub fn abort(&self, r: Reservation) {
        let mut st = self.state.lock();
        st.reserved.remove(&r.key);
        st.alloc.free(r.slot);
        drop(st);
        self.settled.notify_waiters();
    }

    /// Waits until no writer holds a reservation for any of `keys` (each was committed or
    /// aborted), or until `deadline`; `false` if some still did then. Needs a Tokio runtime
    /// with its timer.
    pub async fn wait_unreserved(&self, keys: &[BlockKey], deadline: Instant) -> bool {
        loop {
            // Registered before the check, so that a reservation ending between the check and
            // the wait still wakes it.
            let mut ended = std::pin::pin!(self.settled.notified());
            ended.as_mut().enable();
            {
                let st = self.state.lock();
                if !keys.iter().any(|k| st.reserved.contains_key(k)) {
                    return true;
                }
            }
            if tokio::time::timeout_at(deadline.into(), ended).await.is_err() {
                return false;
            }
        }
    }

    /// Pins a block for reading and marks it most recently used; counts a hit or a miss.
    pub fn acquire(&self, key: &BlockKey) -> Option<Lease> {
        let lease = self.acquire_quiet(key);
        let counter = if lease.is_some() {
            &self.counters.hits
        } else {
            &self.counters.misses
        };
        TierCounters::add(counter, 1);
        lease
    }

    /// Copies a leased block into `dst[..len]`.
    ///
    /// # Panics
    /// If `dst` is shorter than the block.
    pub fn read(&self, lease: &Lease, dst: &mut [u8]) {
        let dst = &mut dst[..lease.len as usize];
        // SAFETY: the lease pins the slot: it cannot be evicted, freed or reserved by a writer
        // until released, so nobody writes it during the copy.
        unsafe { self.arena.read_at(lease.offset, dst) };
        TierCounters::add(&self.counters.bytes_read, lease.len);
    }

    /// The bytes of a leased block, borrowed while the lease lives.
    pub fn lease_data<'a>(&'a self, lease: &'a Lease) -> &'a [u8] {
        // SAFETY: the lease pins the slot (no writer until it is released, which needs the
        // lease the borrow is tied to); the range is the block's, inside the arena.
        unsafe { self.arena.slice(lease.offset, lease.len as usize) }
    }

    /// The [`checksum`](crate::block::checksum) of a leased block: the one noted when it was
    /// committed or computed by an earlier call, else computed now (a pass over the block) and
    /// kept. A committed block does not change, so what a grant announces for it is what it
    /// held when it was stored; one changed in memory since then fails a puller's check.
    pub fn checksum(&self, lease: &Lease) -> u64 {
        if let Some(sum) = self.known_checksum(&lease.key) {
            return sum;
        }
        // Outside the lock: the lease keeps the entry (and its slot) in place meanwhile.
        let sum = crate::block::checksum(self.lease_data(lease));
        TierCounters::add(&self.counters.checksummed_bytes, lease.len);
        if let Some(e) = self.state.lock().entries.peek_mut(&lease.key) {
            e.meta = Some(sum);
        }
        sum
    }

    /// Computes and keeps the checksums not known yet of the committed blocks among `keys`
    /// (others are skipped), without counting hits or changing the LRU order: ahead of the
    /// grants that will need them, off the caller's path.
    pub fn fill_checksums(&self, keys: &[BlockKey]) {
        for key in keys {
            let Some(e) = self.state.lock().entries.acquire_in_place(key) else {
                continue;
            };
            let lease = self.lease(key, &e);
            if e.meta.is_none() {
                self.checksum(&lease);
            }
            self.release(lease);
        }
    }

    /// The checksum the tier holds for a committed block without reading it (`None`: not
    /// committed here, or nobody has needed it yet).
    pub fn known_checksum(&self, key: &BlockKey) -> Option<u64> {
        self.state.lock().entries.peek(key).and_then(|e| e.meta)
    }

    /// Keys of the committed blocks, least recently used first.
    pub fn keys(&self) -> Vec<BlockKey> {
        self.state.lock().entries.iter().rev().map(|(k, _)| *k).collect()
    }

    /// Like [`Self::acquire`] but without counting a hit (used right after a promotion, whose
    /// read was already counted by the lower tier).
    pub(crate) fn acquire_quiet(&self, key: &BlockKey) -> Option<Lease> {
        let e = self.state.lock().entries.acquire(key)?;
        Some(self.lease(key, &e))
    }

    /// The lease on `key`'s entry, to which a reader was just added.
    fn lease(&self, key: &BlockKey, e: &Entry<Option<u64>>) -> Lease {
        Lease {
            key: *key,
            offset: self.offset(&e.slot),
            len: e.len,
        }
    }

    /// Unpins a leased block.
    pub fn release(&self, lease: Lease) {
        // The host tier never dooms entries, so releasing never drops one.
        let _ = self.state.lock().entries.release(&lease.key);
    }

    /// Takes least-recently-used unpinned blocks out of the index to make room for blocks of
    /// `lens` (see [`crate::alloc::victims_for`]: a same-size block each, else whole slabs). The victims'
    /// slots stay allocated — read them with [`Self::victim_data`], then
    /// [`Self::free_victims`]. Empty when everything left is pinned.
    pub fn take_victims(&self, lens: &[u64]) -> Vec<Victim> {
        let mut st = self.state.lock();
        let mut out = Vec::new();
        // Slots of each size that victims taken in this call will free beyond the one each was
        // taken for (a reclaimed slab serves several blocks).
        let mut spare: HashMap<u64, u64> = HashMap::new();
        for &len in lens {
            let size = slot_size_for(len);
            if size > self.slab_size {
                // No slot serves it: nothing to make room for.
                continue;
            }
            if let Some(n) = spare.get_mut(&size).filter(|n| **n > 0) {
                *n -= 1;
                continue;
            }
            let keys = st.victims(size);
            if keys.len() > 1 {
                *spare.entry(size).or_default() += self.slab_size / size - 1;
            }
            for k in keys {
                if let Some(e) = st.entries.pop(&k) {
                    st.limbo.entry(k).or_insert((e.slot, false));
                    out.push(Victim {
                        key: k,
                        offset: self.offset(&e.slot),
                        len: e.len,
                        slot: e.slot,
                        checksum: e.meta,
                    });
                }
            }
        }
        drop(st);
        TierCounters::add(&self.counters.evictions, out.len() as u64);
        out
    }

    /// The payload of a victim, readable until it is freed.
    pub fn victim_data<'a>(&'a self, v: &'a Victim) -> &'a [u8] {
        // SAFETY: a victim's slot is out of the index (no new readers or pins) and not free (no
        // writer) until `free_victims`, which takes the victim by value and so cannot run while
        // the returned borrow of it lives; no pins or leases remained when it was taken.
        unsafe { self.arena.slice(v.offset, v.len as usize) }
    }

    /// Frees victims' slots and counts `demoted` of them as written to the next tier. Returns
    /// the victims removed (with [`Self::remove`]) while they were being demoted: the next tier
    /// must drop them too.
    pub fn free_victims(&self, victims: Vec<Victim>, demoted: u64) -> Vec<BlockKey> {
        let mut st = self.state.lock();
        let mut removed = Vec::new();
        for v in victims {
            st.alloc.free(v.slot);
            if st.limbo.remove(&v.key).is_some_and(|(_, removed)| removed) {
                removed.push(v.key);
            }
        }
        drop(st);
        TierCounters::add(&self.counters.demotions, demoted);
        removed
    }

    /// Whether the block is committed here (does not touch the LRU order).
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.state.lock().entries.contains(key)
    }

    /// For each key, whether it is committed here (one lock acquisition).
    pub fn contains_many(&self, keys: &[BlockKey]) -> Vec<bool> {
        self.state.lock().entries.contains_many(keys)
    }

    /// Pins a block without reading it; its length, `None` if absent.
    pub fn pin(&self, key: &BlockKey) -> Option<u64> {
        self.state.lock().entries.pin(key)
    }

    /// Undoes one pin; `false` if the block was not pinned.
    pub fn unpin(&self, key: &BlockKey) -> bool {
        self.state.lock().entries.unpin(key)
    }

    /// Removes a block; `false` if absent, pinned or being read. A block being demoted is
    /// marked so that [`Self::free_victims`] reports it.
    pub fn remove(&self, key: &BlockKey) -> bool {
        let mut st = self.state.lock();
        let in_limbo = st
            .limbo
            .get_mut(key)
            .map(|(_, removed)| *removed = true)
            .is_some();
        // A copy committed while the old one is being demoted goes too.
        let popped = st.entries.pop_evictable(key);
        if let Some(e) = &popped {
            st.alloc.free(e.slot);
        }
        drop(st);
        if popped.is_some() {
            TierCounters::add(&self.counters.removals, 1);
        }
        in_limbo || popped.is_some()
    }

    /// Counts a block that could not be stored.
    pub(crate) fn count_not_stored(&self, n: u64) {
        TierCounters::add(&self.counters.not_stored, n);
    }

    /// Counters and occupancy.
    pub fn stats(&self) -> TierStats {
        let st = self.state.lock();
        self.counters.snapshot(
            st.entries.len() as u64,
            st.alloc.used_bytes(),
            st.alloc.max_slabs() as u64 * self.slab_size,
        )
    }
}

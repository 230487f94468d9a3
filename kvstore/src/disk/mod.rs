//! The disk tier: blocks in slab files on a local directory, written and read with O_DIRECT
//! through an [`IoEngine`] (io_uring, or a pread/pwrite pool as fallback), with a persistent
//! journal so that a reopened tier serves what was committed before.
//!
//! A block's record is one header page ([`BlockHeader`]) followed by the payload, rounded to
//! 4 KiB. Every read checks the header (the key, length and checksum the index expects) and the
//! payload checksum: a torn, stale or corrupted record is a counted miss, and the entry is dropped.
//! When the filesystem runs out of space (ENOSPC on growth or on a write), the tier stops
//! growing, evicts to make room, and the block at hand is reported as not stored.

pub mod engine;
pub mod journal;
pub mod psync;
#[cfg(all(target_os = "linux", feature = "io-uring"))]
pub mod uring;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::alloc::{SizeClasses, SlabAllocator, Slot};
use crate::block::{BlockHeader, HEADER_LEN, checksum};
use crate::error::{Error, Result};
use crate::key::BlockKey;
use crate::outcome::{NotStoredReason, PutOutcome};
use crate::slots::{Entry, SlotIndex};
use crate::stats::{TierCounters, TierStats};
use engine::{AlignedBuf, IO_ALIGN, IoEngine, IoKind, IoPlan};
use journal::{EntryRecord, Journal, Record};

/// Which I/O engine the disk tier uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoEngineChoice {
    /// io_uring with O_DIRECT when the kernel and filesystem allow it, else the pread/pwrite pool.
    #[default]
    Auto,
    /// io_uring or an error.
    IoUring,
    /// The pread/pwrite thread pool.
    Psync,
}

/// Settings of a [`DiskTier`].
#[derive(Debug, Clone)]
pub struct DiskTierConfig {
    /// Directory of slab files and metadata; created if missing, locked while open.
    pub dir: PathBuf,
    /// Bytes the tier may occupy (rounded down to whole slabs, at least one slab).
    pub capacity: u64,
    /// Size of one slab file; the largest block is one slab minus its header page.
    pub slab_size: u64,
    /// Requests in flight per batch (io_uring queue depth, or pool threads). Each io_uring ring
    /// keeps one I/O buffer per queue slot, as large as the largest record it has carried up to
    /// 8 MiB: memory per concurrently used ring is about `queue_depth ×` the record size.
    pub queue_depth: u32,
    /// Engine choice.
    pub engine: IoEngineChoice,
    /// Use O_DIRECT when the filesystem supports it (bypasses the page cache, which would
    /// otherwise hold a second copy of what the host tier already caches).
    pub direct_io: bool,
    /// fdatasync the written slab files and then the journal after each batch, and fsync the
    /// directory when files are created: committed blocks survive power loss, at the cost of
    /// two flushes per batch. Without it they survive process crashes (kill -9) but not power
    /// loss; either way a lost block is a miss, never wrong data.
    pub sync_metadata: bool,
}

impl DiskTierConfig {
    /// Defaults for `dir` with `capacity` bytes: 256 MiB slabs, queue depth 16, auto engine.
    pub fn new(dir: impl Into<PathBuf>, capacity: u64) -> Self {
        Self {
            dir: dir.into(),
            capacity,
            slab_size: 256 << 20,
            queue_depth: 16,
            engine: IoEngineChoice::Auto,
            direct_io: true,
            sync_metadata: false,
        }
    }
}

/// An indexed disk block; its metadata is the payload checksum. Readers are reads in flight
/// and holds ([`DiskTier::hold`]).
type DiskEntry = Entry<u64>;

#[derive(Debug)]
struct DiskState {
    alloc: SlabAllocator,
    entries: SlotIndex<u64>,
    /// Blocks being written: reserved slots, not yet readable.
    pending: HashMap<BlockKey, Slot>,
    journal: Journal,
    full_logged: bool,
}

/// The disk tier. Safe to share between threads: metadata sits behind one short-held lock, and
/// all I/O happens outside it.
#[derive(Debug)]
pub struct DiskTier {
    dir: PathBuf,
    engine: Box<dyn IoEngine>,
    direct: bool,
    slab_size: u64,
    sync_metadata: bool,
    slabs: RwLock<Vec<Arc<File>>>,
    state: Mutex<DiskState>,
    counters: TierCounters,
    _lock: File,
}

/// Bytes a block of `len` occupies on disk: a header page plus the page-rounded payload.
pub fn record_len(len: u64) -> u64 {
    // Saturating: a length read from a damaged file must not overflow; such a record never
    // matches a slot and is dropped at recovery.
    (len.div_ceil(IO_ALIGN as u64) * IO_ALIGN as u64).saturating_add(IO_ALIGN as u64)
}

/// Free space the tier leaves on its filesystem for its metadata, at 96 bytes per block and
/// assuming blocks of at least 64 KiB: a journal of up to twice the live blocks before it is
/// compacted, the snapshot, and a new snapshot being written — four records per block — plus
/// 1 MiB (a journal's minimum before compaction is 4096 records, 384 KiB).
fn metadata_reserve(capacity: u64) -> u64 {
    (1 << 20) + capacity / (64 << 10) * 4 * 96
}

/// Bytes available to this process on the filesystem holding `dir`.
fn available_bytes(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: `statvfs` is plain data, valid when zeroed; the kernel fills it. `c` is a valid
    // NUL-terminated path that outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

fn slab_path(dir: &Path, slab: u32) -> PathBuf {
    dir.join(format!("slab-{slab:05}.dat"))
}

fn is_enospc(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT)
}

fn probe_direct_io(dir: &Path) -> bool {
    let path = dir.join(".direct-probe");
    let ok = (|| -> std::io::Result<()> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)?;
        let mut buf = AlignedBuf::new(IO_ALIGN);
        buf.as_mut_slice()[0] = 1;
        std::os::unix::fs::FileExt::write_all_at(&f, buf.as_slice(), 0)
    })()
    .is_ok();
    let _ = fs::remove_file(&path);
    ok
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join("LOCK");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    // SAFETY: flock on an fd we own; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Locked { path: dir.to_owned() });
    }
    Ok(f)
}

fn choose_engine(cfg: &DiskTierConfig, direct: bool) -> Result<Box<dyn IoEngine>> {
    let psync = || -> Result<Box<dyn IoEngine>> {
        Ok(Box::new(
            psync::PsyncEngine::new(cfg.queue_depth as usize)
                .map_err(|e| Error::io("start I/O threads for", &cfg.dir, e))?,
        ))
    };
    match cfg.engine {
        IoEngineChoice::Psync => psync(),
        #[cfg(all(target_os = "linux", feature = "io-uring"))]
        IoEngineChoice::IoUring => Ok(Box::new(
            uring::UringEngine::new(cfg.queue_depth)
                .map_err(|e| Error::io("io_uring setup for", &cfg.dir, e))?,
        )),
        #[cfg(not(all(target_os = "linux", feature = "io-uring")))]
        IoEngineChoice::IoUring => Err(Error::InvalidConfig {
            field: "disk.engine",
            reason: "this build has no io_uring support".into(),
        }),
        IoEngineChoice::Auto => {
            if !direct {
                tracing::warn!(dir = %cfg.dir.display(), "O_DIRECT unavailable on the disk tier's filesystem; using buffered pread/pwrite threads");
                return psync();
            }
            #[cfg(all(target_os = "linux", feature = "io-uring"))]
            match uring::UringEngine::new(cfg.queue_depth) {
                Ok(e) => return Ok(Box::new(e)),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring unavailable; the disk tier uses pread/pwrite threads");
                }
            }
            psync()
        }
    }
}

impl DiskTier {
    /// Opens (or creates) the tier in `cfg.dir`, recovering every block committed before.
    pub fn open(cfg: DiskTierConfig) -> Result<Self> {
        if cfg.slab_size < 2 * IO_ALIGN as u64 || cfg.slab_size % IO_ALIGN as u64 != 0 {
            return Err(Error::InvalidConfig {
                field: "disk.slab_size",
                reason: format!("{} is not a multiple of 4096 of at least 8192", cfg.slab_size),
            });
        }
        if cfg.capacity < cfg.slab_size {
            return Err(Error::InvalidConfig {
                field: "disk.capacity",
                reason: format!("{} is below one slab ({})", cfg.capacity, cfg.slab_size),
            });
        }
        fs::create_dir_all(&cfg.dir).map_err(|e| Error::io("create", &cfg.dir, e))?;
        let lock = lock_dir(&cfg.dir)?;
        let direct = cfg.direct_io && cfg.engine != IoEngineChoice::Psync && probe_direct_io(&cfg.dir);
        let engine = choose_engine(&cfg, direct)?;
        let direct = direct && engine.name() != "psync";
        tracing::info!(dir = %cfg.dir.display(), engine = %engine.describe(), direct, "disk tier open");

        let max_slabs = u32::try_from(cfg.capacity / cfg.slab_size).unwrap_or(u32::MAX);
        let mut alloc = SlabAllocator::new(SizeClasses::PageExact, cfg.slab_size, max_slabs);
        let mut files = Vec::new();
        for slab in 0u32.. {
            let path = slab_path(&cfg.dir, slab);
            if !path.exists() {
                break;
            }
            if slab >= max_slabs {
                // The capacity shrank: drop slabs beyond it (their entries are dropped below).
                let _ = fs::remove_file(&path);
                continue;
            }
            files.push(Arc::new(Self::open_slab(&path, direct, false, cfg.slab_size)?));
            alloc.add_slab();
        }
        let (journal, recovered) = Journal::open(&cfg.dir, cfg.sync_metadata)?;
        if recovered.torn_records > 0 {
            tracing::warn!(
                torn = recovered.torn_records,
                "disk tier journal ended in a torn record (crash); ignoring it"
            );
        }
        let mut live = Vec::with_capacity(recovered.entries.len());
        // Newest first: if two records claim one slot, the newer write owns it.
        for e in recovered.entries.iter().rev() {
            if e.len <= cfg.slab_size && record_len(e.len) == e.slot.size && alloc.claim(e.slot) {
                live.push(*e);
            }
        }
        let mut entries = SlotIndex::new();
        for e in live.iter().rev() {
            entries.put(e.key, Entry::new(e.slot, e.len, e.checksum));
        }
        tracing::info!(blocks = entries.len(), "disk tier recovered");
        Ok(Self {
            dir: cfg.dir.clone(),
            engine,
            direct,
            slab_size: cfg.slab_size,
            sync_metadata: cfg.sync_metadata,
            slabs: RwLock::new(files),
            state: Mutex::new(DiskState {
                alloc,
                entries,
                pending: HashMap::new(),
                journal,
                full_logged: false,
            }),
            counters: TierCounters::default(),
            _lock: lock,
        })
    }

    fn open_slab(path: &Path, direct: bool, create: bool, size: u64) -> Result<File> {
        let mut o = OpenOptions::new();
        o.read(true).write(true).create(create).truncate(false);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let f = o.open(path).map_err(|e| Error::io("open", path, e))?;
        if create {
            // SAFETY: fallocate on an fd we own; no memory is passed.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as libc::off_t) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    f.set_len(size).map_err(|e| Error::io("size", path, e))?;
                } else {
                    drop(f);
                    let _ = fs::remove_file(path);
                    return Err(Error::io("allocate", path, e));
                }
            }
        }
        Ok(f)
    }

    /// The engine in use (`io_uring` or `psync`).
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// The engine and its options, e.g. `io_uring (fixed buffers)`.
    pub fn engine_description(&self) -> String {
        self.engine.describe()
    }

    /// Whether reads and writes bypass the page cache.
    pub fn direct_io(&self) -> bool {
        self.direct
    }

    /// The tier's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Largest payload a block may have.
    pub fn max_block_len(&self) -> u64 {
        self.slab_size - IO_ALIGN as u64
    }

    /// Grows by one slab file, or caps growth when the filesystem is full.
    fn grow(&self, st: &mut DiskState) -> bool {
        // Growing into the last free bytes would leave no room to journal what is stored.
        let reserve = metadata_reserve(st.alloc.max_slabs() as u64 * self.slab_size);
        if available_bytes(&self.dir).is_some_and(|free| free < self.slab_size + reserve) {
            let err = format!("less than a slab plus {reserve} bytes of metadata reserve free");
            self.cap(st, &err);
            return false;
        }
        let slab = st.alloc.slab_count();
        let path = slab_path(&self.dir, slab);
        match Self::open_slab(&path, self.direct, true, self.slab_size) {
            Ok(f) => {
                if self.sync_metadata {
                    journal::sync_dir(&self.dir);
                }
                self.slabs.write().push(Arc::new(f));
                st.alloc.add_slab();
                true
            }
            Err(e) => {
                self.cap(st, &e);
                false
            }
        }
    }

    fn cap(&self, st: &mut DiskState, err: &dyn std::fmt::Display) {
        let n = st.alloc.slab_count();
        st.alloc.cap_slabs(n);
        if !st.full_logged {
            st.full_logged = true;
            tracing::warn!(dir = %self.dir.display(), slabs = n, error = %err, "disk tier cannot grow; it now evicts to admit new blocks");
        }
    }

    /// Drops least-recently-used unpinned entries to make room for a record of `size` bytes
    /// (one of the same size, else a whole slab: see [`victims_for`]); `false` when everything
    /// is pinned or being read or written.
    fn evict_for(&self, st: &mut DiskState, size: u64, log: &mut Vec<Record>) -> bool {
        let victims = st
            .entries
            .victims(size, |slab| st.pending.values().any(|s| s.slab == slab));
        if victims.is_empty() {
            return false;
        }
        for k in victims {
            if let Some(e) = st.entries.pop(&k) {
                st.alloc.free(e.slot);
                log.push(Record::Remove(k));
                TierCounters::add(&self.counters.evictions, 1);
            }
        }
        true
    }

    fn reserve(&self, st: &mut DiskState, len: u64, log: &mut Vec<Record>) -> Option<Slot> {
        let rec = record_len(len);
        loop {
            if let Some(s) = st.alloc.alloc(rec) {
                return Some(s);
            }
            if st.alloc.can_grow() && self.grow(st) {
                continue;
            }
            if !self.evict_for(st, rec, log) {
                return None;
            }
        }
    }

    fn journal(&self, st: &mut DiskState, log: &[Record]) {
        let failed = st.journal.append(log).is_err_and(|e| {
            tracing::error!(error = %e, "disk tier journal append failed; writing a snapshot instead");
            true
        });
        let DiskState { journal, entries, .. } = st;
        journal.maybe_compact(entries.len() as u64, failed, || {
            entries.iter().rev().map(|(k, e)| entry_record(k, e)).collect()
        });
    }

    /// Writes a batch of blocks, several in flight; each block is copied into its I/O buffer
    /// just before submission, overlapping the writes already in flight.
    pub fn put_batch(&self, items: &[(BlockKey, &[u8])]) -> Vec<PutOutcome> {
        self.put_batch_known(items, &[])
    }

    /// [`Self::put_batch`] where the caller knows some payloads' [`checksum`]s (`known`: one
    /// per item, or empty): those are not read to compute them. A wrong one makes the block's
    /// reads fail verification (a miss), never a wrong block.
    pub fn put_batch_known(&self, items: &[(BlockKey, &[u8])], known: &[Option<u64>]) -> Vec<PutOutcome> {
        let mut out = vec![PutOutcome::AlreadyStored; items.len()];
        let mut todo: Vec<(usize, Slot)> = Vec::with_capacity(items.len());
        {
            let mut st = self.state.lock();
            let mut log = Vec::new();
            for (i, (key, data)) in items.iter().enumerate() {
                if st.entries.contains(key) || st.pending.contains_key(key) {
                    continue;
                }
                if data.len() as u64 > self.max_block_len() {
                    out[i] = PutOutcome::NotStored(NotStoredReason::TooLarge);
                    continue;
                }
                match self.reserve(&mut st, data.len() as u64, &mut log) {
                    Some(slot) => {
                        st.pending.insert(*key, slot);
                        todo.push((i, slot));
                    }
                    None => out[i] = PutOutcome::NotStored(NotStoredReason::NoSpace),
                }
            }
            // Removals are journaled before any of their slots is rewritten.
            self.journal(&mut st, &log);
        }
        let files = self.slabs.read().clone();
        let mut sums = vec![0u64; todo.len()];
        let mut results: Vec<Option<std::io::Result<()>>> = (0..todo.len()).map(|_| None).collect();
        self.engine.run(
            todo.len(),
            &mut |j| {
                let (i, slot) = todo[j];
                IoPlan {
                    file: Arc::clone(&files[slot.slab as usize]),
                    offset: slot.offset_in_slab(),
                    len: record_len(items[i].1.len() as u64) as usize,
                    kind: IoKind::Write,
                }
            },
            &mut |j, b| {
                let (key, data) = items[todo[j].0];
                let header = match known.get(todo[j].0) {
                    Some(&Some(sum)) => BlockHeader::with_checksum(key, data.len() as u64, sum),
                    _ => BlockHeader::for_payload(key, data),
                };
                b[..IO_ALIGN].fill(0);
                header.encode(&mut b[..HEADER_LEN]);
                b[IO_ALIGN..IO_ALIGN + data.len()].copy_from_slice(data);
                b[IO_ALIGN + data.len()..].fill(0);
                sums[j] = header.checksum;
            },
            &mut |j, _, r| results[j] = Some(r),
        );
        if self.sync_metadata {
            // The data must be durable before the journal says it is there (also under O_DIRECT:
            // writes into preallocated extents change filesystem metadata).
            let mut slabs: Vec<u32> = todo.iter().map(|(_, s)| s.slab).collect();
            slabs.sort_unstable();
            slabs.dedup();
            for slab in slabs {
                if let Err(e) = files[slab as usize].sync_data() {
                    tracing::warn!(error = %e, "disk tier fdatasync failed");
                    for r in results.iter_mut().zip(&todo).filter(|(_, t)| t.1.slab == slab) {
                        *r.0 = Some(Err(std::io::Error::new(e.kind(), e.to_string())));
                    }
                }
            }
        }
        let mut st = self.state.lock();
        let mut log = Vec::with_capacity(todo.len());
        let mut written = 0u64;
        for (((i, slot), res), sum) in todo.iter().zip(results).zip(sums) {
            let (key, data) = items[*i];
            st.pending.remove(&key);
            match res.unwrap_or_else(|| Err(std::io::Error::other("not completed"))) {
                Ok(()) => {
                    let e = Entry::new(*slot, data.len() as u64, sum);
                    log.push(Record::Put(entry_record(&key, &e)));
                    st.entries.put(key, e);
                    written += data.len() as u64;
                    out[*i] = PutOutcome::Stored;
                }
                Err(e) => {
                    st.alloc.free(*slot);
                    if is_enospc(&e) {
                        self.cap(&mut st, &e);
                        out[*i] = PutOutcome::NotStored(NotStoredReason::NoSpace);
                    } else {
                        tracing::warn!(error = %e, "disk tier write failed");
                        out[*i] = PutOutcome::NotStored(NotStoredReason::Io);
                    }
                }
            }
        }
        self.journal(&mut st, &log);
        drop(st);
        let stored = out.iter().filter(|o| **o == PutOutcome::Stored).count() as u64;
        let refused = out
            .iter()
            .filter(|o| matches!(o, PutOutcome::NotStored(_)))
            .count() as u64;
        TierCounters::add(&self.counters.stores, stored);
        TierCounters::add(&self.counters.not_stored, refused);
        TierCounters::add(&self.counters.bytes_written, written);
        out
    }

    /// Reads a batch of blocks; `sink(i, payload)` receives each verified hit as its read
    /// completes (in completion order). Returns which keys hit. A record that fails verification
    /// is a miss, counted in `checksum_failures`, and its entry is dropped.
    pub fn get_batch(&self, keys: &[BlockKey], sink: impl FnMut(usize, &[u8])) -> Vec<bool> {
        self.read(keys, true, sink)
    }

    /// Picks the blocks that must leave for records of `lens` to be written — the ones
    /// [`Self::put_batch`] would evict, found the same way (a free slot, else a new slab, else
    /// the least-recently-used victims of that slot size or a whole slab) — and holds them,
    /// readable and not evictable, so a caller can copy them to a lower tier
    /// ([`Self::read_held`]) before they go ([`Self::evict_held`]). None while free slots or
    /// growth suffice.
    pub fn take_victims(&self, lens: &[u64]) -> Vec<BlockKey> {
        let mut st = self.state.lock();
        // Slots taken only to see what fits; given back below.
        let mut trial = Vec::new();
        let mut victims = Vec::new();
        for &len in lens.iter().filter(|l| **l <= self.max_block_len()) {
            let rec = record_len(len);
            loop {
                if let Some(slot) = st.alloc.alloc(rec) {
                    trial.push(slot);
                } else if st.alloc.can_grow() && self.grow(&mut st) {
                    continue;
                } else {
                    // Held blocks have readers, so a later round never picks them again.
                    let more = st
                        .entries
                        .victims(rec, |slab| st.pending.values().any(|s| s.slab == slab));
                    for k in &more {
                        st.entries.acquire(k);
                    }
                    victims.extend(more);
                }
                break;
            }
        }
        for slot in trial {
            st.alloc.free(slot);
        }
        victims
    }

    /// Reads blocks held by [`Self::take_victims`] (like [`Self::get_batch`], without counting
    /// hits or misses: the engine did not ask for them).
    pub fn read_held(&self, keys: &[BlockKey], sink: impl FnMut(usize, &[u8])) -> Vec<bool> {
        self.read(keys, false, sink)
    }

    /// Ends the hold of [`Self::take_victims`] and evicts those blocks (unless pinned
    /// meanwhile); `demoted` of them were copied to the tier below.
    pub fn evict_held(&self, keys: &[BlockKey], demoted: u64) {
        let mut st = self.state.lock();
        let mut gone = Vec::new();
        let mut evicted = 0;
        for k in keys {
            if let Some(e) = st.entries.release(k) {
                gone.push((*k, e));
            } else if let Some(e) = st.entries.pop_evictable(k) {
                gone.push((*k, e));
                evicted += 1;
            }
        }
        self.drop_entries(&mut st, gone);
        TierCounters::add(&self.counters.evictions, evicted);
        TierCounters::add(&self.counters.demotions, demoted);
    }

    fn read(&self, keys: &[BlockKey], count: bool, mut sink: impl FnMut(usize, &[u8])) -> Vec<bool> {
        let mut hit = vec![false; keys.len()];
        let mut todo: Vec<(usize, DiskEntry)> = Vec::new();
        {
            let mut st = self.state.lock();
            for (i, key) in keys.iter().enumerate() {
                if let Some(e) = st.entries.acquire(key) {
                    todo.push((i, e));
                }
            }
        }
        if count {
            TierCounters::add(&self.counters.misses, (keys.len() - todo.len()) as u64);
        }
        if todo.is_empty() {
            return hit;
        }
        let files = self.slabs.read().clone();
        let mut bad = Vec::new();
        let mut read_bytes = 0u64;
        // A panicking `sink` must not leave readers behind (the blocks would never be evictable
        // again): catch it, release, then let it continue.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.engine.run(
                todo.len(),
                &mut |j| {
                    let e = &todo[j].1;
                    IoPlan {
                        file: Arc::clone(&files[e.slot.slab as usize]),
                        offset: e.slot.offset_in_slab(),
                        len: record_len(e.len) as usize,
                        kind: IoKind::Read,
                    }
                },
                &mut |_, _| {},
                &mut |j, b, res| {
                    let (i, e) = &todo[j];
                    let payload = match res {
                        Ok(()) => Self::verify(b, &keys[*i], e),
                        Err(err) => {
                            tracing::warn!(error = %err, "disk tier read failed; reporting a miss");
                            None
                        }
                    };
                    match payload {
                        Some(p) => {
                            sink(*i, p);
                            hit[*i] = true;
                            read_bytes += e.len;
                        }
                        None => bad.push(keys[*i]),
                    }
                },
            )
        }));
        let mut st = self.state.lock();
        let mut gone = Vec::new();
        // Corrupt blocks leave with their last reader (possibly a hold by the caller).
        for k in &bad {
            gone.extend(st.entries.doom(k).map(|e| (*k, e)));
        }
        for (i, _) in &todo {
            gone.extend(st.entries.release(&keys[*i]).map(|e| (keys[*i], e)));
        }
        self.drop_entries(&mut st, gone);
        drop(st);
        if let Err(panic) = run {
            std::panic::resume_unwind(panic);
        }
        if count {
            let hits = hit.iter().filter(|h| **h).count() as u64;
            TierCounters::add(&self.counters.hits, hits);
            TierCounters::add(&self.counters.misses, bad.len() as u64);
            TierCounters::add(&self.counters.bytes_read, read_bytes);
        }
        TierCounters::add(&self.counters.checksum_failures, bad.len() as u64);
        hit
    }

    /// The payload of a record read back, if its header and checksum match what the index
    /// expects for `key`.
    fn verify<'b>(record: &'b [u8], key: &BlockKey, e: &DiskEntry) -> Option<&'b [u8]> {
        let header = BlockHeader::decode(record)?;
        let payload = record.get(IO_ALIGN..IO_ALIGN + usize::try_from(e.len).ok()?)?;
        let valid = header.key == *key
            && header.len == e.len
            && header.checksum == e.meta
            && checksum(payload) == e.meta;
        if !valid {
            tracing::warn!(key = ?key, "disk tier block failed verification; reporting a miss");
        }
        valid.then_some(payload)
    }

    /// Marks blocks most recently used and protects them from eviction until
    /// [`Self::unhold`]; returns each one's length (`None`: not stored, nothing held).
    pub fn hold(&self, keys: &[BlockKey]) -> Vec<Option<u64>> {
        let mut st = self.state.lock();
        keys.iter()
            .map(|k| st.entries.acquire(k).map(|e| e.len))
            .collect()
    }

    /// Each key's [`checksum`], as the index records it (`None`: not stored). For a held block
    /// it is what a read of it verifies against, so a copy that a read passed has this checksum.
    pub fn checksums(&self, keys: &[BlockKey]) -> Vec<Option<u64>> {
        let st = self.state.lock();
        keys.iter().map(|k| st.entries.peek(k).map(|e| e.meta)).collect()
    }

    /// Ends a [`Self::hold`] (keys that were not held are ignored). A held block found corrupt
    /// meanwhile leaves the index here.
    pub fn unhold(&self, keys: &[BlockKey]) {
        let mut st = self.state.lock();
        let gone: Vec<_> = keys
            .iter()
            .filter_map(|k| st.entries.release(k).map(|e| (*k, e)))
            .collect();
        self.drop_entries(&mut st, gone);
    }

    /// Frees and journals entries that left the index.
    fn drop_entries(&self, st: &mut DiskState, gone: Vec<(BlockKey, DiskEntry)>) {
        let mut log = Vec::with_capacity(gone.len());
        for (k, e) in gone {
            st.alloc.free(e.slot);
            log.push(Record::Remove(k));
        }
        self.journal(st, &log);
    }

    /// Keys of the blocks on disk, least recently used first.
    pub fn keys(&self) -> Vec<BlockKey> {
        self.state.lock().entries.iter().rev().map(|(k, _)| *k).collect()
    }

    /// Whether the block is stored (does not touch the LRU order).
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.state.lock().entries.contains(key)
    }

    /// For each key, whether it is stored (one lock acquisition).
    pub fn contains_many(&self, keys: &[BlockKey]) -> Vec<bool> {
        self.state.lock().entries.contains_many(keys)
    }

    /// Pins a block so eviction skips it; its length, `None` if absent.
    pub fn pin(&self, key: &BlockKey) -> Option<u64> {
        self.state.lock().entries.pin(key)
    }

    /// Undoes one [`Self::pin`]; `false` if the block was not pinned.
    pub fn unpin(&self, key: &BlockKey) -> bool {
        self.state.lock().entries.unpin(key)
    }

    /// Removes a block; `false` if absent or pinned.
    pub fn remove(&self, key: &BlockKey) -> bool {
        let mut st = self.state.lock();
        let Some(e) = st.entries.pop_evictable(key) else {
            return false;
        };
        st.alloc.free(e.slot);
        self.journal(&mut st, &[Record::Remove(*key)]);
        TierCounters::add(&self.counters.removals, 1);
        true
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

    /// Writes a snapshot of the metadata so the next open needs no journal replay.
    pub fn flush(&self) -> Result<()> {
        let mut st = self.state.lock();
        let snapshot: Vec<_> = st.entries.iter().rev().map(|(k, e)| entry_record(k, e)).collect();
        st.journal.write_snapshot(&snapshot)
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "disk tier snapshot on close failed; the journal will be replayed");
        }
    }
}

fn entry_record(key: &BlockKey, e: &DiskEntry) -> EntryRecord {
    EntryRecord {
        key: *key,
        slot: e.slot,
        len: e.len,
        checksum: e.meta,
    }
}

//! The object-store tier: S3-compatible capacity shared by every agent that names the same
//! bucket and prefix.
//!
//! Blocks are packed into segments of about [`ObjectTierConfig::target_object_size`] (one
//! request per segment, not per block), each followed by an index object; a block is read
//! back with one ranged GET. Writes never block the caller: a block is copied into the open
//! segment of its namespace and served from memory until its segment is uploaded. Other
//! agents' blocks become visible through their index objects, which a background task lists
//! and reads (see [`layout`] for names and formats).
//!
//! Failure contract: an unreachable, throttling or refusing store, a deleted or corrupt object
//! — each gives a miss or "not stored", a counted reason ([`Failure`]) and a log line, never
//! an error to the engine, and never a wait past the caller's deadline. After repeated
//! outages the tier stops trying for a growing while (1 s up to 60 s), so a dead store costs
//! nothing per request.

mod client;
pub mod layout;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use lru::LruCache;
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, WriteMultipart,
};
use parking_lot::{Condvar, Mutex};

pub use client::Failure;
use client::Location;
use layout::{IndexEntry, SegmentId};

use crate::block;
use crate::error::{Error, Result};
use crate::key::{BlockKey, Namespace};
use crate::outcome::{NotStoredReason, PutOutcome};
use crate::stats::{TierCounters, TierStats};
use layout::PAYLOAD_ALIGN;

/// Index objects are listed again from this far before the newest one seen, so a writer whose
/// clock lags (or whose upload finished late) is still found.
const SYNC_OVERLAP_MS: u64 = 60_000;
/// A namespace not used for this long is no longer synced (until it is used again).
const IDLE_NAMESPACE: Duration = Duration::from_secs(600);
/// Ranges of one segment closer than this are read with one request.
const COALESCE_GAP: u64 = 1 << 20;
/// Longest coalesced read.
const COALESCE_SPAN: u64 = 16 << 20;
/// Consecutive outage failures that stop the tier for a while.
const BREAKER_THRESHOLD: u32 = 3;
/// Smallest part S3 accepts in a multipart upload (except the last).
pub const MIN_PART_SIZE: u64 = 5 << 20;

/// Static S3 credentials. `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ObjectCredentials {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
    /// `AWS_SESSION_TOKEN`, for temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for ObjectCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Settings of an [`ObjectTier`].
#[derive(Debug, Clone)]
pub struct ObjectTierConfig {
    /// `s3://bucket/prefix`, `file:///dir` or `memory://prefix`. Agents with the same URL share
    /// blocks.
    pub url: String,
    /// S3 endpoint for stores other than AWS (`http://host:port`); else `AWS_ENDPOINT_URL_S3`,
    /// `AWS_ENDPOINT_URL` or `AWS_ENDPOINT`, else AWS.
    pub endpoint: Option<String>,
    /// Region; else `AWS_REGION`, `AWS_DEFAULT_REGION`, the credentials profile's, or
    /// `us-east-1`.
    pub region: Option<String>,
    /// Allows plain HTTP; `None`: `AWS_ALLOW_HTTP`, else allowed when the endpoint is
    /// `http://`.
    pub allow_http: Option<bool>,
    /// `https://bucket.host` instead of `https://host/bucket`.
    pub virtual_hosted_style: bool,
    /// Static keys; `None`: the environment, then the shared credentials file (`profile`),
    /// then web identity, container and instance credentials.
    pub credentials: Option<ObjectCredentials>,
    /// Profile of the shared credentials file; `None`: `AWS_PROFILE`, else `default`.
    pub profile: Option<String>,
    /// Writes index objects with `If-None-Match: *`; turn off for stores without conditional
    /// puts (names are unique either way).
    pub conditional_put: bool,
    /// Size at which an open segment is sealed and uploaded.
    pub target_object_size: u64,
    /// Part size of multipart uploads (segments larger than this use them); ≥ 5 MiB.
    pub part_size: u64,
    /// An open segment older than this is sealed even when small.
    pub flush_interval: Duration,
    /// Bytes waiting for upload beyond which new blocks are not stored.
    pub max_pending: u64,
    /// Uploads in flight.
    pub upload_concurrency: usize,
    /// Reads in flight.
    pub read_concurrency: usize,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Longest a read may take (also bounded by each call's deadline).
    pub read_timeout: Duration,
    /// Longest one upload request may take.
    pub request_timeout: Duration,
    /// Retries of a failed upload request (reads retry at most once).
    pub max_retries: usize,
    /// First retry delay.
    pub retry_backoff: Duration,
    /// Longest retry delay.
    pub retry_max_backoff: Duration,
    /// Time after which an upload stops retrying.
    pub retry_timeout: Duration,
    /// How often other agents' index objects are listed; zero: never (own blocks only).
    pub sync_interval: Duration,
    /// How long the first lookup of a namespace waits for that namespace's first sync.
    pub lookup_sync_wait: Duration,
    /// Most blocks remembered (own and other agents').
    pub max_catalog_blocks: usize,
    /// Worker threads of the tier's runtime.
    pub threads: usize,
}

impl ObjectTierConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            endpoint: None,
            region: None,
            allow_http: None,
            virtual_hosted_style: false,
            credentials: None,
            profile: None,
            conditional_put: true,
            target_object_size: 32 << 20,
            part_size: 64 << 20,
            flush_interval: Duration::from_secs(1),
            max_pending: 512 << 20,
            upload_concurrency: 4,
            read_concurrency: 16,
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            max_retries: 3,
            retry_backoff: Duration::from_millis(100),
            retry_max_backoff: Duration::from_secs(5),
            retry_timeout: Duration::from_secs(30),
            sync_interval: Duration::from_secs(2),
            lookup_sync_wait: Duration::from_millis(500),
            max_catalog_blocks: 4_000_000,
            threads: 2,
        }
    }

    /// Refuses settings that cannot work, naming the key (`object.*`).
    pub fn validate(&self) -> Result<()> {
        Location::parse(&self.url)?;
        let bad = |field: &'static str, reason: String| Err(Error::InvalidConfig { field, reason });
        if self.part_size < MIN_PART_SIZE {
            return bad(
                "object.part_size",
                format!("{} is below S3's minimum part of 5 MiB", self.part_size),
            );
        }
        // S3's largest single PUT and largest part.
        const MAX_PUT: u64 = 5 << 30;
        if self.part_size > MAX_PUT || self.target_object_size > MAX_PUT {
            return bad(
                "object.target_object_size",
                "target_object_size and part_size must be at most 5 GiB (S3's largest PUT)".into(),
            );
        }
        if self.flush_interval < Duration::from_millis(10) {
            return bad("object.flush_interval_ms", "must be at least 10 ms".into());
        }
        if self.target_object_size == 0 {
            return bad("object.target_object_size", "must be positive".into());
        }
        for (field, v) in [
            ("object.upload_concurrency", self.upload_concurrency),
            ("object.read_concurrency", self.read_concurrency),
            ("object.threads", self.threads),
        ] {
            if !(1..=64).contains(&v) {
                return bad(field, format!("{v} is outside 1..=64"));
            }
        }
        if self.max_catalog_blocks == 0 {
            return bad("object.max_catalog_blocks", "must be positive".into());
        }
        Ok(())
    }
}

/// Object-tier details beyond the common tier counters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObjectStats {
    /// Segments uploaded (with their index).
    pub segments_uploaded: u64,
    /// Bytes of segments uploaded.
    pub bytes_uploaded: u64,
    /// Bytes waiting in memory for upload.
    pub pending_bytes: u64,
    /// Blocks this agent wrote that are not uploaded yet.
    pub pending_blocks: u64,
    /// Segments sealed and not yet uploaded (or failed).
    pub uploads_in_flight: u64,
    /// Blocks known from other agents' index objects.
    pub remote_blocks: u64,
    /// Index objects of other agents read.
    pub indexes_read: u64,
    /// Whether the tier is pausing after repeated outages.
    pub degraded: bool,
    /// Failed requests by reason, in [`Failure::ALL`] order.
    pub failures: [u64; Failure::ALL.len()],
}

impl ObjectStats {
    /// Failed requests of one reason.
    pub fn failures_of(&self, f: Failure) -> u64 {
        self.failures[f.index()]
    }
}

/// Where a block is in its segment.
#[derive(Debug, Clone, Copy)]
struct Located {
    seg: SegmentId,
    offset: u64,
    len: u64,
    checksum: u64,
    /// Written here and not uploaded yet: served from memory.
    pending: bool,
    /// Written by another agent.
    remote: bool,
}

#[derive(Debug)]
struct OpenSegment {
    id: SegmentId,
    buf: Vec<u8>,
    entries: Vec<IndexEntry>,
    opened: Instant,
}

#[derive(Debug)]
struct Sealed {
    ns: Namespace,
    id: SegmentId,
    buf: Bytes,
    entries: Vec<IndexEntry>,
}

#[derive(Debug, Default)]
struct NamespaceSync {
    /// A lookup has waited for this namespace's first sync (only one ever does).
    waited: bool,
    /// Last stored in, looked up or read here: namespaces idle for long are no longer synced.
    used: Option<Instant>,
    synced: Option<Instant>,
    /// Write time of the newest index read (never ahead of this agent's clock).
    newest_ms: u64,
    /// Indexes already read (or written here), with their write times.
    seen: HashMap<SegmentId, u64>,
}

#[derive(Debug)]
struct Catalog {
    blocks: LruCache<BlockKey, Located>,
    max_blocks: usize,
    open: HashMap<Namespace, OpenSegment>,
    sealed: HashMap<SegmentId, Arc<Sealed>>,
    pending_bytes: u64,
    namespaces: HashMap<Namespace, NamespaceSync>,
    remote_blocks: u64,
    pending_blocks: u64,
}

impl Catalog {
    fn insert(&mut self, key: BlockKey, l: Located) {
        self.count(&l, 1);
        if let Some((_, old)) = self.blocks.push(key, l) {
            self.count(&old, -1);
        }
        while self.blocks.len() > self.max_blocks {
            match self.blocks.pop_lru() {
                Some((_, old)) => self.count(&old, -1),
                None => break,
            }
        }
    }

    fn remove(&mut self, key: &BlockKey) -> Option<Located> {
        let l = self.blocks.pop(key)?;
        self.count(&l, -1);
        Some(l)
    }

    fn count(&mut self, l: &Located, d: i64) {
        if l.remote {
            self.remote_blocks = self.remote_blocks.saturating_add_signed(d);
        }
        if l.pending {
            self.pending_blocks = self.pending_blocks.saturating_add_signed(d);
        }
    }

    /// Drops every block of segment `seg` (deleted underneath, or its upload failed).
    fn drop_segment(&mut self, seg: SegmentId) -> u64 {
        let keys: Vec<BlockKey> = self
            .blocks
            .iter()
            .filter(|(_, l)| l.seg == seg)
            .map(|(k, _)| *k)
            .collect();
        for k in &keys {
            self.remove(k);
        }
        keys.len() as u64
    }
}

/// Pauses the tier after repeated outages, with a doubling pause.
#[derive(Debug, Default)]
struct Breaker {
    consecutive: AtomicU32,
    open_until_ms: AtomicU64,
    pause_ms: AtomicU64,
}

impl Breaker {
    fn is_open(&self) -> bool {
        now_ms() < self.open_until_ms.load(Relaxed)
    }

    fn success(&self) {
        self.consecutive.store(0, Relaxed);
        self.pause_ms.store(0, Relaxed);
    }

    /// Records a failure; `Some(pause)` when the tier pauses now.
    fn failure(&self, f: Failure) -> Option<Duration> {
        if !f.is_outage() {
            return None;
        }
        if self.consecutive.fetch_add(1, Relaxed) + 1 < BREAKER_THRESHOLD || self.is_open() {
            return None;
        }
        let pause = (self.pause_ms.load(Relaxed) * 2).clamp(1_000, 60_000);
        self.pause_ms.store(pause, Relaxed);
        self.open_until_ms.store(now_ms() + pause, Relaxed);
        Some(Duration::from_millis(pause))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug)]
struct Inner {
    cfg: ObjectTierConfig,
    display: String,
    prefix: Path,
    writes: Arc<dyn ObjectStore>,
    reads: Arc<dyn ObjectStore>,
    writer: u64,
    seq: AtomicU32,
    state: Mutex<Catalog>,
    /// Signalled whenever an upload ends (for [`ObjectTier::wait_idle`]).
    idle: Condvar,
    in_flight: AtomicU64,
    uploads: tokio::sync::Semaphore,
    read_slots: tokio::sync::Semaphore,
    counters: TierCounters,
    failures: [AtomicU64; Failure::ALL.len()],
    last_warn_ms: [AtomicU64; Failure::ALL.len()],
    segments_uploaded: AtomicU64,
    bytes_uploaded: AtomicU64,
    indexes_read: AtomicU64,
    breaker: Breaker,
    wake_sync: tokio::sync::Notify,
}

/// The object-store tier. Its methods block the calling thread (they drive the tier's own
/// runtime); call them from plain threads, not from async code.
#[derive(Debug)]
pub struct ObjectTier {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ObjectTier {
    /// Builds the clients and starts the background tasks (sealing, sync). Does not contact
    /// the store: an unreachable store shows in [`Self::probe`] and as misses, never here.
    pub fn open(cfg: ObjectTierConfig) -> Result<Self> {
        cfg.validate()?;
        let location = Location::parse(&cfg.url)?;
        let writes = client::build(&cfg, &location, false)?;
        let reads = match location {
            // In-process stores must be the same instance for both.
            Location::Memory { .. } => Arc::clone(&writes),
            _ => client::build(&cfg, &location, true)?,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.threads)
            .thread_name("kvtier-object")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the object tier's threads for", &cfg.url, e))?;
        let writer = {
            let mut b = [0u8; 8];
            rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty())
                .map_err(|e| Error::io("getrandom for", &cfg.url, e.into()))?;
            u64::from_le_bytes(b)
        };
        let inner = Arc::new(Inner {
            display: cfg.url.clone(),
            prefix: location.prefix(),
            writes,
            reads,
            writer,
            seq: AtomicU32::new(0),
            state: Mutex::new(Catalog {
                // Unbounded, capped by hand: a bounded LruCache allocates its whole table up
                // front (hundreds of MB for millions of blocks).
                blocks: LruCache::unbounded(),
                max_blocks: cfg.max_catalog_blocks,
                open: HashMap::new(),
                sealed: HashMap::new(),
                pending_bytes: 0,
                namespaces: HashMap::new(),
                remote_blocks: 0,
                pending_blocks: 0,
            }),
            idle: Condvar::new(),
            in_flight: AtomicU64::new(0),
            uploads: tokio::sync::Semaphore::new(cfg.upload_concurrency),
            read_slots: tokio::sync::Semaphore::new(cfg.read_concurrency),
            counters: TierCounters::default(),
            failures: Default::default(),
            last_warn_ms: Default::default(),
            segments_uploaded: AtomicU64::new(0),
            bytes_uploaded: AtomicU64::new(0),
            indexes_read: AtomicU64::new(0),
            breaker: Breaker::default(),
            wake_sync: tokio::sync::Notify::new(),
            cfg,
        });
        let weak = Arc::downgrade(&inner);
        runtime.spawn(async move {
            let period = weak.upgrade().map_or(Duration::from_secs(1), |i| {
                (i.cfg.flush_interval / 2).max(Duration::from_millis(10))
            });
            loop {
                tokio::time::sleep(period).await;
                let Some(inner) = weak.upgrade() else { return };
                Inner::seal_old(&inner);
            }
        });
        if !inner.cfg.sync_interval.is_zero() {
            let weak = Arc::downgrade(&inner);
            runtime.spawn(async move {
                loop {
                    let Some(inner) = weak.upgrade() else { return };
                    Inner::sync_all(&inner).await;
                    let interval = inner.cfg.sync_interval;
                    tokio::select! {
                        () = tokio::time::sleep(interval) => {}
                        () = inner.wake_sync.notified() => {}
                    }
                }
            });
        }
        Ok(Self {
            inner,
            runtime: Some(runtime),
        })
    }

    /// The URL the tier writes to (for logs).
    pub fn url(&self) -> &str {
        &self.inner.display
    }

    /// Runs `f` as a task of the tier's runtime and waits for its result. The task, not the
    /// calling thread, polls the requests: every network wake-up then stays on the runtime's
    /// threads, where driving the future from the caller (`Handle::block_on`) paid a hop to
    /// the caller's thread per wake-up — milliseconds per ranged GET of a 256 KiB block.
    fn block_on<F>(&self, f: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime
            .as_ref()
            .expect("runtime lives until drop")
            .spawn(async move {
                let _ = tx.send(f.await);
            });
        rx.recv().expect("an object-tier task panicked")
    }

    /// Lists the bucket once, within the connect and read timeouts: `Err` names why the store
    /// cannot be used (for the agent's start-up log).
    pub fn probe(&self) -> std::result::Result<(), (Failure, String)> {
        let inner = Arc::clone(&self.inner);
        let root = layout::root(&inner.prefix);
        let limit = inner.cfg.read_timeout + inner.cfg.connect_timeout;
        self.block_on(async move {
            match tokio::time::timeout(limit, inner.reads.list_with_delimiter(Some(&root))).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err((Failure::of(&e), e.to_string())),
                Err(_) => Err((Failure::Timeout, format!("no answer within {limit:?}"))),
            }
        })
    }

    /// Stores blocks: each is copied into its namespace's open segment and readable at once;
    /// uploads happen in the background. Never blocks on the store: when too much waits for
    /// upload, or the store is failing, blocks are not stored.
    pub fn put_batch(&self, items: &[(BlockKey, &[u8])]) -> Vec<PutOutcome> {
        self.put_batch_known(items, &[])
    }

    /// [`Self::put_batch`] where the caller knows some payloads' [`checksum`](block::checksum)s
    /// (`known`: one per item, or empty): those are not read to compute them. A wrong one makes
    /// the block's fetches fail verification (a miss), never a wrong block.
    pub fn put_batch_known(&self, items: &[(BlockKey, &[u8])], known: &[Option<u64>]) -> Vec<PutOutcome> {
        let inner = &self.inner;
        let mut out = Vec::with_capacity(items.len());
        if inner.breaker.is_open() {
            TierCounters::add(&inner.counters.not_stored, items.len() as u64);
            return vec![PutOutcome::NotStored(NotStoredReason::Io); items.len()];
        }
        // Checksums still to compute are computed before the state lock is taken, which every
        // read and write of the tier takes: only for blocks not stored when asked, as the
        // others are answered `AlreadyStored` (a block stored in between is checked again).
        let checksums: Vec<Option<u64>> = {
            let stored = {
                let st = inner.state.lock();
                items
                    .iter()
                    .map(|(key, _)| st.blocks.contains(key))
                    .collect::<Vec<_>>()
            };
            items
                .iter()
                .zip(stored)
                .enumerate()
                .map(|(j, ((_, data), stored))| {
                    known
                        .get(j)
                        .copied()
                        .flatten()
                        .or_else(|| (!stored).then(|| block::checksum(data)))
                })
                .collect()
        };
        let mut sealed = Vec::new();
        let mut refused = 0;
        {
            let mut st = inner.state.lock();
            for (j, (key, data)) in items.iter().enumerate() {
                if st.blocks.contains(key) {
                    out.push(PutOutcome::AlreadyStored);
                    continue;
                }
                let open_len = st.open.get(&key.namespace).map_or(0, |o| o.buf.len() as u64);
                let rec = open_len.next_multiple_of(PAYLOAD_ALIGN) - open_len + data.len() as u64;
                if st.pending_bytes + rec > inner.cfg.max_pending {
                    refused += 1;
                    out.push(PutOutcome::NotStored(NotStoredReason::NoSpace));
                    continue;
                }
                let ns = key.namespace;
                let full = st.open.get(&ns).is_some_and(|o| {
                    !o.entries.is_empty() && o.buf.len() as u64 + rec > inner.cfg.target_object_size
                });
                if full {
                    sealed.extend(inner.seal(&mut st, &ns));
                }
                // Known or computed above unless the block was stored when asked and has since
                // gone.
                let checksum = checksums[j].unwrap_or_else(|| block::checksum(data));
                let (seg, rec) = {
                    let open = st.open.entry(ns).or_insert_with(|| inner.new_segment());
                    let before = open.buf.len();
                    let offset = (before as u64).next_multiple_of(PAYLOAD_ALIGN);
                    open.buf.resize(offset as usize, 0);
                    open.buf.extend_from_slice(data);
                    open.entries.push(IndexEntry {
                        hash: key.hash,
                        offset,
                        len: data.len() as u64,
                        checksum,
                    });
                    let located = Located {
                        seg: open.id,
                        offset,
                        len: data.len() as u64,
                        checksum,
                        pending: true,
                        remote: false,
                    };
                    (located, (open.buf.len() - before) as u64)
                };
                st.pending_bytes += rec;
                st.insert(*key, seg);
                st.namespaces.entry(ns).or_default().used = Some(Instant::now());
                if st
                    .open
                    .get(&ns)
                    .is_some_and(|o| o.buf.len() as u64 >= inner.cfg.target_object_size)
                {
                    sealed.extend(inner.seal(&mut st, &ns));
                }
                out.push(PutOutcome::Stored);
            }
        }
        if refused > 0 {
            TierCounters::add(&inner.counters.not_stored, refused);
            inner.warn_limited(
                Failure::Other,
                format_args!("{refused} blocks not stored: more than max_pending bytes wait for upload"),
            );
        }
        for s in sealed {
            self.runtime
                .as_ref()
                .expect("runtime lives until drop")
                .spawn(Inner::upload(Arc::clone(inner), s));
        }
        out
    }

    /// For each key, whether the tier knows the block (no request; see
    /// [`Self::sync_namespace`] for learning other agents' blocks).
    pub fn contains_many(&self, keys: &[BlockKey]) -> Vec<bool> {
        let st = self.inner.state.lock();
        keys.iter().map(|k| st.blocks.contains(k)).collect()
    }

    /// Each key's payload length, if known.
    pub fn lens(&self, keys: &[BlockKey]) -> Vec<Option<u64>> {
        let st = self.inner.state.lock();
        keys.iter().map(|k| st.blocks.peek(k).map(|l| l.len)).collect()
    }

    /// Makes sure `ns` has been synced at least once: the first lookup of a namespace waits
    /// (up to [`ObjectTierConfig::lookup_sync_wait`]) to learn what other agents stored;
    /// later ones rely on the periodic sync. Returns at once when sync is off.
    pub fn sync_namespace(&self, ns: &Namespace) {
        self.sync_namespace_until(ns, Instant::now() + self.inner.cfg.lookup_sync_wait);
    }

    /// [`Self::sync_namespace`], waiting no later than `until` (a call's deadline).
    pub fn sync_namespace_until(&self, ns: &Namespace, until: Instant) {
        let first = {
            let mut st = self.inner.state.lock();
            let sync = st.namespaces.entry(*ns).or_default();
            sync.used = Some(Instant::now());
            let first = sync.synced.is_none() && !sync.waited;
            sync.waited = true;
            first
        };
        if self.inner.cfg.sync_interval.is_zero() || self.inner.breaker.is_open() {
            return;
        }
        let wait = self
            .inner
            .cfg
            .lookup_sync_wait
            .min(until.saturating_duration_since(Instant::now()));
        if first && !wait.is_zero() {
            let inner = Arc::clone(&self.inner);
            let ns = *ns;
            self.block_on(async move {
                let _ = tokio::time::timeout(wait, Inner::sync(&inner, ns)).await;
            });
        }
    }

    /// Whether the tier is pausing after repeated outages: its blocks cannot be read now, so
    /// lookups should not report them.
    pub fn is_paused(&self) -> bool {
        self.inner.breaker.is_open()
    }

    /// Asks the background task to sync every namespace now (does not wait).
    pub fn wake_sync(&self) {
        self.inner.wake_sync.notify_one();
    }

    /// Reads blocks; `sink(i, payload)` receives each verified hit. Returns which keys hit.
    /// Blocks not back by `deadline` are misses. A record that fails verification is a miss,
    /// counted in `checksum_failures`, and forgotten.
    pub fn get_batch(
        &self,
        keys: &[BlockKey],
        deadline: Instant,
        mut sink: impl FnMut(usize, &[u8]),
    ) -> Vec<bool> {
        self.get_batch_with_checksums(keys, deadline, |i, payload, _| sink(i, payload))
    }

    /// [`Self::get_batch`], with each hit's [`checksum`](block::checksum): the one it was
    /// stored with, which a block fetched from the store was just verified against.
    pub fn get_batch_with_checksums(
        &self,
        keys: &[BlockKey],
        deadline: Instant,
        mut sink: impl FnMut(usize, &[u8], u64),
    ) -> Vec<bool> {
        let inner = &self.inner;
        let mut hit = vec![false; keys.len()];
        let mut remote: Vec<(usize, Located)> = Vec::new();
        let mut local: Vec<(usize, Arc<Sealed>, Located)> = Vec::new();
        let mut read_bytes = 0;
        {
            let mut st = inner.state.lock();
            for (i, key) in keys.iter().enumerate() {
                let Some(l) = st.blocks.get(key).copied() else {
                    continue;
                };
                if !l.pending {
                    remote.push((i, l));
                } else if let Some(s) = st.sealed.get(&l.seg) {
                    local.push((i, Arc::clone(s), l));
                } else if let Some(o) = st.open.get(&key.namespace).filter(|o| o.id == l.seg) {
                    let at = l.offset as usize;
                    sink(i, &o.buf[at..at + l.len as usize], l.checksum);
                    hit[i] = true;
                    read_bytes += l.len;
                }
            }
        }
        for (i, s, l) in local {
            let at = l.offset as usize;
            sink(i, &s.buf[at..at + l.len as usize], l.checksum);
            hit[i] = true;
            read_bytes += l.len;
        }
        if !remote.is_empty() {
            if inner.breaker.is_open() {
                remote.clear();
            }
            let groups = coalesce(keys, remote);
            let fetched = {
                let inner = Arc::clone(inner);
                let groups = groups.clone();
                self.block_on(async move { Inner::fetch(&inner, groups, deadline).await })
            };
            let mut bad = Vec::new();
            let mut gone = Vec::new();
            for (g, res) in groups.iter().zip(fetched) {
                let bytes = match res {
                    Some(Ok(b)) => b,
                    Some(Err(Failure::NotFound)) => {
                        gone.push(g.seg);
                        continue;
                    }
                    _ => continue,
                };
                for &(i, l) in &g.members {
                    let at = (l.offset - g.start) as usize;
                    match bytes
                        .get(at..at + l.len as usize)
                        .filter(|p| block::checksum(p) == l.checksum)
                    {
                        Some(payload) => {
                            sink(i, payload, l.checksum);
                            hit[i] = true;
                            read_bytes += l.len;
                        }
                        None => bad.push(keys[i]),
                    }
                }
            }
            if !bad.is_empty() || !gone.is_empty() {
                let mut st = inner.state.lock();
                for k in &bad {
                    st.remove(k);
                }
                for seg in &gone {
                    let n = st.drop_segment(*seg);
                    tracing::warn!(store = %inner.display, segment = %seg, blocks = n, "object tier segment is gone (deleted underneath); its blocks are forgotten");
                }
                drop(st);
                if !bad.is_empty() {
                    inner.count_failure(Failure::Corrupt, bad.len() as u64);
                    TierCounters::add(&inner.counters.checksum_failures, bad.len() as u64);
                    inner.warn_limited(
                        Failure::Corrupt,
                        format_args!("{} blocks failed verification; reported as misses", bad.len()),
                    );
                }
            }
        }
        let hits = hit.iter().filter(|h| **h).count() as u64;
        TierCounters::add(&inner.counters.hits, hits);
        TierCounters::add(&inner.counters.misses, keys.len() as u64 - hits);
        TierCounters::add(&inner.counters.bytes_read, read_bytes);
        hit
    }

    /// Forgets a block here (objects shared with other agents are never deleted; a bucket
    /// lifecycle rule expires them). `true` if it was known.
    pub fn remove(&self, key: &BlockKey) -> bool {
        let gone = self.inner.state.lock().remove(key).is_some();
        if gone {
            TierCounters::add(&self.inner.counters.removals, 1);
        }
        gone
    }

    /// Whether less than half of `max_pending` waits for upload: room for optional copies
    /// (write-through), keeping the rest for demotions, whose blocks exist nowhere else.
    pub fn has_room_for_copies(&self) -> bool {
        self.inner.state.lock().pending_bytes * 2 < self.inner.cfg.max_pending
    }

    /// Counters and occupancy (blocks known; bytes waiting for upload).
    pub fn stats(&self) -> TierStats {
        let st = self.inner.state.lock();
        self.inner.counters.snapshot(
            st.blocks.len() as u64,
            st.pending_bytes,
            self.inner.cfg.max_pending,
        )
    }

    /// Details for metrics.
    pub fn detail(&self) -> ObjectStats {
        let inner = &self.inner;
        let st = inner.state.lock();
        let mut failures = [0; Failure::ALL.len()];
        for (o, c) in failures.iter_mut().zip(&inner.failures) {
            *o = c.load(Relaxed);
        }
        ObjectStats {
            segments_uploaded: inner.segments_uploaded.load(Relaxed),
            bytes_uploaded: inner.bytes_uploaded.load(Relaxed),
            pending_bytes: st.pending_bytes,
            pending_blocks: st.pending_blocks,
            uploads_in_flight: inner.in_flight.load(Relaxed),
            remote_blocks: st.remote_blocks,
            indexes_read: inner.indexes_read.load(Relaxed),
            degraded: inner.breaker.is_open(),
            failures,
        }
    }

    /// Seals every open segment and waits up to `timeout` for all uploads to end. Returns
    /// how many blocks were still waiting when it gave up.
    pub fn flush(&self, timeout: Duration) -> u64 {
        let sealed = {
            let mut st = self.inner.state.lock();
            let nss: Vec<Namespace> = st.open.keys().copied().collect();
            nss.iter()
                .filter_map(|ns| self.inner.seal(&mut st, ns))
                .collect::<Vec<_>>()
        };
        for s in sealed {
            self.runtime
                .as_ref()
                .expect("runtime lives until drop")
                .spawn(Inner::upload(Arc::clone(&self.inner), s));
        }
        self.wait_idle(timeout)
    }

    /// Waits up to `timeout` for uploads in flight (not the open segments) to end; returns
    /// how many blocks still wait.
    pub fn wait_idle(&self, timeout: Duration) -> u64 {
        let until = Instant::now() + timeout;
        let mut st = self.inner.state.lock();
        while self.inner.in_flight.load(Relaxed) > 0
            && !self.inner.idle.wait_until(&mut st, until).timed_out()
        {}
        if self.inner.in_flight.load(Relaxed) > 0 {
            st.pending_blocks
        } else {
            st.open.values().map(|o| o.entries.len() as u64).sum()
        }
    }
}

impl Drop for ObjectTier {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Reads of one segment done as one ranged request.
#[derive(Debug, Clone)]
struct ReadGroup {
    ns: Namespace,
    seg: SegmentId,
    start: u64,
    end: u64,
    members: Vec<(usize, Located)>,
}

/// Groups block reads by segment and merges neighbours into single ranges.
fn coalesce(keys: &[BlockKey], mut reads: Vec<(usize, Located)>) -> Vec<ReadGroup> {
    reads.sort_by_key(|(i, l)| (keys[*i].namespace, l.seg, l.offset));
    let mut out: Vec<ReadGroup> = Vec::new();
    for (i, l) in reads {
        let (start, end) = (l.offset, l.offset + l.len);
        let ns = keys[i].namespace;
        match out.last_mut() {
            Some(g)
                if g.ns == ns
                    && g.seg == l.seg
                    && start <= g.end + COALESCE_GAP
                    && end - g.start <= COALESCE_SPAN =>
            {
                g.end = g.end.max(end);
                g.members.push((i, l));
            }
            _ => out.push(ReadGroup {
                ns,
                seg: l.seg,
                start,
                end,
                members: vec![(i, l)],
            }),
        }
    }
    out
}

impl Inner {
    fn new_segment(&self) -> OpenSegment {
        OpenSegment {
            id: SegmentId {
                unix_ms: now_ms(),
                writer: self.writer,
                seq: self.seq.fetch_add(1, Relaxed),
            },
            // Reserved at once (pages are only touched as blocks arrive): growing by doubling
            // would copy the segment several times over.
            buf: Vec::with_capacity(self.cfg.target_object_size as usize),
            entries: Vec::new(),
            opened: Instant::now(),
        }
    }

    /// Closes `ns`'s open segment for upload.
    fn seal(&self, st: &mut Catalog, ns: &Namespace) -> Option<Arc<Sealed>> {
        let open = st.open.remove(ns)?;
        if open.entries.is_empty() {
            return None;
        }
        let s = Arc::new(Sealed {
            ns: *ns,
            id: open.id,
            buf: Bytes::from(open.buf),
            entries: open.entries,
        });
        st.sealed.insert(s.id, Arc::clone(&s));
        self.in_flight.fetch_add(1, Relaxed);
        Some(s)
    }

    /// Seals segments open longer than the flush interval and uploads them.
    fn seal_old(inner: &Arc<Self>) {
        let sealed: Vec<_> = {
            let mut st = inner.state.lock();
            let old: Vec<Namespace> = st
                .open
                .iter()
                .filter(|(_, o)| o.opened.elapsed() >= inner.cfg.flush_interval)
                .map(|(ns, _)| *ns)
                .collect();
            old.iter().filter_map(|ns| inner.seal(&mut st, ns)).collect()
        };
        for s in sealed {
            tokio::spawn(Self::upload(Arc::clone(inner), s));
        }
    }

    fn count_failure(&self, f: Failure, n: u64) {
        self.failures[f.index()].fetch_add(n, Relaxed);
    }

    /// A warning at most once a second per reason, so a failing store does not flood the log.
    fn warn_limited(&self, f: Failure, msg: std::fmt::Arguments<'_>) {
        let now = now_ms();
        let last = &self.last_warn_ms[f.index()];
        let prev = last.load(Relaxed);
        if now.saturating_sub(prev) >= 1_000 && last.compare_exchange(prev, now, Relaxed, Relaxed).is_ok() {
            tracing::warn!(store = %self.display, reason = f.as_str(), "object tier: {msg}");
        }
    }

    fn failed(&self, f: Failure, what: std::fmt::Arguments<'_>, err: &dyn std::fmt::Display) {
        self.count_failure(f, 1);
        self.warn_limited(f, format_args!("{what}: {err}"));
        if let Some(pause) = self.breaker.failure(f) {
            tracing::warn!(store = %self.display, reason = f.as_str(), pause_ms = pause.as_millis() as u64, "object tier paused after repeated failures: blocks are not stored there and reads miss until it answers again");
        }
    }

    /// Uploads a sealed segment and then its index; on success its blocks are read from the
    /// store from now on, on failure they are forgotten (not stored).
    async fn upload(inner: Arc<Self>, seg: Arc<Sealed>) {
        let result = match inner.uploads.acquire().await {
            Ok(permit) => {
                let limit = inner.cfg.retry_timeout + inner.cfg.request_timeout;
                match tokio::time::timeout(limit, inner.put_segment(&seg, permit)).await {
                    Ok(r) => r,
                    Err(_) => Err((Failure::Timeout, format!("no success within {limit:?}"))),
                }
            }
            Err(_) => Err((Failure::Other, "upload slots closed".into())),
        };
        let n = seg.entries.len() as u64;
        let bytes: u64 = seg.entries.iter().map(|e| e.len).sum();
        // Counters first: a waiter woken below must see them.
        match &result {
            Ok(()) => {
                inner.breaker.success();
                TierCounters::add(&inner.counters.stores, n);
                TierCounters::add(&inner.counters.bytes_written, bytes);
                inner.segments_uploaded.fetch_add(1, Relaxed);
                inner.bytes_uploaded.fetch_add(seg.buf.len() as u64, Relaxed);
            }
            Err((f, e)) => {
                TierCounters::add(&inner.counters.not_stored, n);
                inner.failed(
                    *f,
                    format_args!(
                        "upload of segment {} ({n} blocks) failed; they are not stored",
                        seg.id
                    ),
                    e,
                );
            }
        }
        {
            let mut st = inner.state.lock();
            st.sealed.remove(&seg.id);
            st.pending_bytes -= seg.buf.len() as u64;
            if result.is_ok() {
                for e in &seg.entries {
                    let key = BlockKey::new(seg.ns, e.hash);
                    if let Some(l) = st.blocks.peek_mut(&key).filter(|l| l.seg == seg.id) {
                        l.pending = false;
                        st.pending_blocks -= 1;
                    }
                }
                st.namespaces
                    .entry(seg.ns)
                    .or_default()
                    .seen
                    .insert(seg.id, now_ms());
            } else {
                st.drop_segment(seg.id);
            }
            inner.in_flight.fetch_sub(1, Relaxed);
        }
        inner.idle.notify_all();
    }

    /// Uploads the segment, gives its upload slot back (the index is small: the next segment
    /// need not wait for it), then writes the index.
    async fn put_segment(
        &self,
        seg: &Sealed,
        slot: tokio::sync::SemaphorePermit<'_>,
    ) -> std::result::Result<(), (Failure, String)> {
        let err = |e: object_store::Error| (Failure::of(&e), e.to_string());
        // Names are unique to this writer, so "already exists" means a retried request whose
        // first try succeeded unseen (S3 puts are atomic: the object is whole).
        let created = |r: object_store::Result<object_store::PutResult>| match r {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(err(e)),
        };
        let path = layout::segment_path(&self.prefix, &seg.ns, &seg.id);
        let mode = if self.cfg.conditional_put {
            PutMode::Create
        } else {
            PutMode::Overwrite
        };
        if seg.buf.len() as u64 <= self.cfg.part_size {
            // A plain put: the name is unique to this writer, so a condition would only cost
            // the store a lookup. The index, which makes the segment visible, is conditional.
            created(self.writes.put(&path, seg.buf.clone().into()).await)?;
        } else {
            let upload = self.writes.put_multipart(&path).await.map_err(err)?;
            let part = self.cfg.part_size as usize;
            let mut w = WriteMultipart::new_with_chunk_size(upload, part);
            let mut at = 0;
            while at < seg.buf.len() {
                if let Err(e) = w.wait_for_capacity(self.cfg.upload_concurrency).await {
                    let _ = w.abort().await;
                    return Err(err(e));
                }
                let end = (at + part).min(seg.buf.len());
                w.put(seg.buf.slice(at..end));
                at = end;
            }
            w.finish().await.map_err(err)?;
        }
        drop(slot);
        let idx = layout::encode_index(&seg.ns, seg.buf.len() as u64, &seg.entries);
        let idx_path = layout::index_path(&self.prefix, &seg.ns, &seg.id, now_ms());
        created(
            self.writes
                .put_opts(&idx_path, idx.into(), PutOptions::from(mode))
                .await,
        )
    }

    /// Fetches each group's range, all in parallel (bounded by the read slots), until
    /// `deadline`; `None` for groups not back in time.
    async fn fetch(
        inner: &Arc<Self>,
        groups: Vec<ReadGroup>,
        deadline: Instant,
    ) -> Vec<Option<std::result::Result<Bytes, Failure>>> {
        let mut out: Vec<Option<std::result::Result<Bytes, Failure>>> = vec![None; groups.len()];
        let mut running: FuturesUnordered<_> = groups
            .into_iter()
            .enumerate()
            .map(|(j, g)| {
                let inner = Arc::clone(inner);
                async move {
                    let _slot = inner.read_slots.acquire().await;
                    let path = layout::segment_path(&inner.prefix, &g.ns, &g.seg);
                    let opts = GetOptions {
                        range: Some(GetRange::Bounded(g.start..g.end)),
                        ..Default::default()
                    };
                    let r = match inner.reads.get_opts(&path, opts).await {
                        Ok(r) => r.bytes().await,
                        Err(e) => Err(e),
                    };
                    (j, g.seg, r)
                }
            })
            .collect();
        let sleep = tokio::time::sleep_until(deadline.into());
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                next = running.next() => match next {
                    Some((j, seg, Ok(b))) => {
                        inner.breaker.success();
                        out[j] = Some(Ok(b));
                        let _ = seg;
                    }
                    Some((j, seg, Err(e))) => {
                        let f = Failure::of(&e);
                        inner.failed(f, format_args!("read of segment {seg} failed; reported as misses"), &e);
                        out[j] = Some(Err(f));
                    }
                    None => break,
                },
                () = &mut sleep => {
                    let late = running.len() as u64;
                    inner.count_failure(Failure::Timeout, late);
                    inner.warn_limited(Failure::Timeout, format_args!("{late} reads not back by the request's deadline; reported as misses"));
                    // A store that answers, but too slowly to be of use, pauses like a dead one.
                    if let Some(pause) = inner.breaker.failure(Failure::Timeout) {
                        tracing::warn!(store = %inner.display, pause_ms = pause.as_millis() as u64, "object tier paused: its reads keep missing their deadlines");
                    }
                    break;
                }
            }
        }
        out
    }

    /// Syncs every namespace this agent has used (stored, looked up or read). Other
    /// namespaces in the bucket — other models, adapters, tenants — are never listed: their
    /// blocks would only fill the catalog.
    async fn sync_all(inner: &Arc<Self>) {
        if inner.breaker.is_open() {
            return;
        }
        let nss: Vec<Namespace> = inner
            .state
            .lock()
            .namespaces
            .iter()
            .filter(|(_, s)| s.used.is_some_and(|u| u.elapsed() < IDLE_NAMESPACE))
            .map(|(ns, _)| *ns)
            .collect();
        for ns in nss {
            Self::sync(inner, ns).await;
        }
    }

    /// Reads the index objects of `ns` written since the last sync (by other agents) and adds
    /// their blocks to the catalog.
    async fn sync(inner: &Arc<Self>, ns: Namespace) {
        let dir = layout::dir(&inner.prefix, &ns, "idx");
        let newest = inner.state.lock().namespaces.entry(ns).or_default().newest_ms;
        let offset = dir
            .clone()
            .join(format!("{:013}", newest.saturating_sub(SYNC_OVERLAP_MS)));
        let mut listing = inner.reads.list_with_offset(Some(&dir), &offset);
        let mut new = Vec::new();
        while let Some(item) = listing.next().await {
            match item {
                Ok(meta) => {
                    if let Some((written, id)) = layout::index_id(&meta.location) {
                        new.push((written, id, meta.location));
                    }
                }
                Err(e) => {
                    inner.failed(Failure::of(&e), format_args!("listing {dir} failed"), &e);
                    // Tried: the first lookup waits once, then the periodic sync takes over.
                    inner.state.lock().namespaces.entry(ns).or_default().synced = Some(Instant::now());
                    return;
                }
            }
        }
        inner.breaker.success();
        {
            let st = inner.state.lock();
            let seen = st.namespaces.get(&ns).map(|s| &s.seen);
            new.retain(|(_, id, _)| id.writer != inner.writer && !seen.is_some_and(|s| s.contains_key(id)));
        }
        let reads = futures::stream::iter(new)
            .map(|(written, id, path)| {
                let inner = Arc::clone(inner);
                async move {
                    let r = match inner.reads.get(&path).await {
                        Ok(r) => r.bytes().await,
                        Err(e) => Err(e),
                    };
                    (written, id, path, r)
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await;
        let mut st = inner.state.lock();
        let mut added = Vec::new();
        let mut done = Vec::new();
        for (written, id, path, r) in reads {
            match r {
                Ok(b) => match layout::decode_index(&b).filter(|i| i.namespace == ns) {
                    Some(idx) => {
                        inner.indexes_read.fetch_add(1, Relaxed);
                        for e in &idx.entries {
                            let key = idx.key(e);
                            if !st.blocks.contains(&key) {
                                added.push((
                                    key,
                                    Located {
                                        seg: id,
                                        offset: e.offset,
                                        len: e.len,
                                        checksum: e.checksum,
                                        pending: false,
                                        remote: true,
                                    },
                                ));
                            }
                        }
                        done.push((written, id));
                    }
                    None => {
                        done.push((written, id));
                        inner.failed(
                            Failure::Corrupt,
                            format_args!("index {path} is damaged; skipped"),
                            &"bad checksum or format",
                        );
                    }
                },
                // Deleted between listing and reading: nothing to learn.
                Err(object_store::Error::NotFound { .. }) => done.push((written, id)),
                Err(e) => inner.failed(Failure::of(&e), format_args!("reading index {path} failed"), &e),
            }
        }
        for (k, l) in added {
            st.insert(k, l);
        }
        let sync = st.namespaces.entry(ns).or_default();
        for (written, id) in done {
            // A writer whose clock runs ahead must not push the listing start past indexes
            // that others write now.
            sync.newest_ms = sync.newest_ms.max(written.min(now_ms()));
            sync.seen.insert(id, written);
        }
        let keep_from = sync.newest_ms.saturating_sub(2 * SYNC_OVERLAP_MS);
        sync.seen.retain(|_, written| *written >= keep_from);
        sync.synced = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests;

//! The UCX data plane: blocks move between arenas with UCP's RMA, over whichever transport
//! UCX picks (shared memory and CMA between processes of one host, TCP, or RC/DC verbs in
//! clusters).
//!
//! # Threads
//!
//! One UCP context and one worker per transport, created in `UCS_THREAD_MODE_SINGLE` and
//! driven by one progress thread that the transport owns. Nothing else calls UCP: a pull is a
//! command put in a mailbox, after which the worker is woken with `ucp_worker_signal` (the one
//! call UCX allows from any thread); the answer comes back on a oneshot channel. The thread
//! polls for a short while after any activity and otherwise sleeps on the worker's event fd,
//! so an idle transport costs nothing. Dropping the transport stops the thread, which closes
//! the endpoints, unmaps the arena and destroys the worker and the context, in that order.
//!
//! The whole arena is registered once (`ucp_mem_map` of the existing mapping) and its remote
//! key packed once. Endpoints to peers are created on first use, one per remote worker
//! address, and kept; an endpoint that fails is closed and forgotten, so the next pull makes a
//! new one.
//!
//! # Endpoint
//!
//! What [`Transport::endpoint`] returns (integers little endian):
//!
//! ```text
//! "KVTU" | version u8 (1) | 0 u8 × 3 | arena base u64 | arena length u64
//!        | name length u32 | address length u32 | rkey length u32
//!        | name | worker address | packed rkey
//! ```
//!
//! The name (UCX's worker name, `host:pid`) only labels errors. UCX's worker address lists
//! every interface the worker listens on, so `seen_as` is not needed.
//!
//! # Two ways to move the bytes ([`UcxMode`])
//!
//! * **Get** (one-sided): the puller reads each block with `ucp_get_nbx` from the source's
//!   arena (base + the grant's offset) straight into its slot. The source's CPU does nothing
//!   on RDMA and shared memory, but over TCP UCX emulates a get in software, with a request
//!   and an answer per fragment, and reads run at about a quarter of the speed of writes.
//! * **PutOnRequest**: the puller sends one active message with the grant id, its own worker
//!   address, remote key, arena base and the list of (grant index, length, slot offset); the
//!   source looks the grant up, writes each block into the puller's slot with `ucp_put_nbx`,
//!   flushes the endpoint (so every write has landed) and then answers with one status per
//!   block. Over TCP this runs as fast as a push.
//!
//! [`UcxMode::Auto`] picks from `UCX_TLS` (see [`UcxMode::resolve`]).
//!
//! The request (active message `0x6b76`, sent eagerly as one message):
//!
//! ```text
//! "KVTP" | version u16 (1) | 0 u16 | request id u64 | grant id [16] | boot id [16]
//!        | deadline u64 (ns, CLOCK_MONOTONIC) | budget u64 (ns) | arena base u64
//!        | arena length u64 | address length u32 | rkey length u32 | count u32
//!        | worker address | packed rkey | count × (index u32 | length u64 | slot offset u64)
//! ```
//!
//! and the answer (`0x6b77`): `"KVTA" | version u16 | 0 u16 | request id u64 | count u32 |
//! count × status u8` (0 written, 1 not in the grant, 2 unknown grant, 3 malformed entry,
//! 4 not written before the deadline, 5 the write failed).
//!
//! # Deadlines, and slots that must not be written after a pull returns
//!
//! A caller aborts the slots of a failed pull and the arena hands them out again, so no
//! write may land in a slot once `pull` has returned it. `ucp_request_cancel` cannot give that
//! guarantee (in UCX it only withdraws tag receives; RMA and active-message sends go on), so:
//!
//! * Each transfer keeps at most [`UcxConfig::window`] bytes in flight and issues nothing
//!   after its deadline.
//! * Get: past the deadline the puller waits up to [`UcxConfig::drain`] for the gets in
//!   flight; those still outstanding then are discarded by closing the endpoint with
//!   `UCP_EP_CLOSE_FLAG_FORCE` (late answers to them are dropped, as their request ids no
//!   longer resolve), and the slots go back only once UCX has completed every request. The
//!   force-close is the last resort because UCX may have paired this endpoint with one the
//!   peer created towards this worker (it matches endpoints that two workers create to each
//!   other), and that endpoint then stops working without UCX noticing: the peer's next
//!   transfer to this agent times out before it reconnects.
//! * PutOnRequest: the writes are the source's, so the source enforces the deadline: the
//!   request carries it, as an absolute `CLOCK_MONOTONIC` time that a source on the same host
//!   (same boot id) uses exactly, and as the remaining budget that a source on another host
//!   counts from the request's arrival. The source issues no write after it, flushes what it
//!   issued, and answers. The puller waits for that answer up to `drain` past its deadline: it
//!   proves the writes are over. If the source is found dead instead (endpoint failure),
//!   whatever it sent before dying is processed first.
//! * With error mode NONE (below) an endpoint cannot be force-closed: the puller waits for its
//!   outstanding gets, which over shared memory are copies that finish or fail promptly.
//!
//! What remains is a source (or, with error mode NONE, a get) still silent `drain` after the
//! deadline: the slots are then returned anyway and the case is logged as an error, since a
//! write could in principle still land.
//!
//! # Error handling mode
//!
//! Endpoints are created with `UCP_ERR_HANDLING_MODE_PEER`, so a dead peer fails the
//! operations on it instead of hanging them. UCX's shared-memory transports (posix, sysv)
//! cannot detect a dead peer and UCX refuses PEER mode when they are all it may use
//! (`UCX_TLS=sm`; UCX logs an error for the refusal); the endpoint is then created in mode
//! NONE, as are the transport's later ones. Transfers on such an endpoint are bounded by the
//! deadline like any other, but a peer that dies is noticed only through it.
//!
//! # Security
//!
//! The control channel authenticates peers with the shared secret before it hands out a grant
//! and this endpoint; the data plane itself has no handshake. What a peer can do once it holds
//! an endpoint depends on the transport UCX picks, not on kvtier:
//!
//! * Over TCP (and any transport where UCX emulates RMA with messages) UCX's target side
//!   checks no key at all: a peer that can create a UCP endpoint to this worker, which takes
//!   only the worker address, can read and write **any address of this process** with
//!   `ucp_get_nbx`/`ucp_put_nbx`. The worker address is therefore a credential, and the data
//!   plane must only be reachable by cluster members (a private network, as for RDMA).
//! * Over CMA (shared memory) the kernel's ptrace rules decide: any process of the same user
//!   may read and write this one anyway.
//! * On RDMA hardware the remote key is checked. In Get mode it covers **the whole registered
//!   arena**, not only the granted blocks, for as long as this transport lives, and every peer
//!   that ever received a grant holds it (the usual trade-off of one-sided RDMA). A transport
//!   in PutOnRequest mode leaves the key out of its endpoint, so its arena is read only by its
//!   own writes of blocks whose grant id (128 random bits, the capability) is live; a puller in
//!   Get mode asks such a source for writes instead. A puller in PutOnRequest mode hands its
//!   own key to the sources it asks.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString, c_void};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::mpsc;
use ucx_sys as sys;

use super::grants::{GrantEntry, GrantId, Grants, MAX_GRANT_BLOCKS};
use super::{BoxFuture, PullItem, Pulled, Transport, TransportError, TransportKind, fail_all};
use crate::store::TieredStore;

const ENDPOINT_MAGIC: [u8; 4] = *b"KVTU";
const ENDPOINT_VERSION: u8 = 1;
const ENDPOINT_HEADER: usize = 36;

const AM_REQUEST: u32 = 0x6b76;
const AM_ANSWER: u32 = 0x6b77;
const REQUEST_MAGIC: [u8; 4] = *b"KVTP";
const ANSWER_MAGIC: [u8; 4] = *b"KVTA";
const MESSAGE_VERSION: u16 = 1;
const REQUEST_HEADER: usize = 92;
const REQUEST_ENTRY: usize = 20;
const ANSWER_HEADER: usize = 20;

const STATUS_OK: u8 = 0;
const STATUS_NO_BLOCK: u8 = 1;
const STATUS_UNKNOWN_GRANT: u8 = 2;
const STATUS_MALFORMED: u8 = 3;
const STATUS_TIMED_OUT: u8 = 4;
const STATUS_FAILED: u8 = 5;

/// Longest the progress thread sleeps while operations are in flight: a safety net should a
/// transport fail to signal the worker's event fd.
const IN_FLIGHT_NAP: Duration = Duration::from_millis(10);
/// Longest a stopping worker is progressed for UCX's own operations to finish.
const SHUTDOWN_SETTLE: Duration = Duration::from_millis(200);
/// How long without progress counts as settled.
const SHUTDOWN_QUIET: Duration = Duration::from_millis(5);
/// Progress calls per turn of the progress loop before the mailbox is looked at again.
const PROGRESS_BURST: usize = 64;

/// How a pull moves the bytes (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UcxMode {
    /// [`UcxMode::Get`] or [`UcxMode::PutOnRequest`], by [`UcxMode::resolve`].
    #[default]
    Auto,
    /// The puller reads the source's arena (one-sided).
    Get,
    /// The puller asks the source to write the blocks into its slots.
    PutOnRequest,
}

/// Transports on which UCX does a get in hardware or as one copy: shared memory, CMA, and
/// InfiniBand/RoCE reliable connections. On anything else (TCP, UD) it emulates a get with
/// messages, and a put is much faster.
const ONE_SIDED_TLS: &[&str] = &[
    "self",
    "sm",
    "shm",
    "mm",
    "posix",
    "sysv",
    "xpmem",
    "knem",
    "cma",
    "rc",
    "rc_v",
    "rc_verbs",
    "rc_x",
    "rc_mlx5",
    "dc",
    "dc_x",
    "dc_mlx5",
    "cuda_ipc",
    "cuda_copy",
    "rocm_ipc",
    "rocm_copy",
    "gdr_copy",
];

impl UcxMode {
    /// The concrete mode: `Auto` is [`UcxMode::Get`] when `tls` (the `UCX_TLS` the context is
    /// created with) names only transports from the one-sided list (shared memory, CMA,
    /// RC/DC verbs, GPU copies and `self`), or excludes (`^...`) `tcp`; otherwise, including
    /// when `UCX_TLS` is unset and UCX may use TCP, [`UcxMode::PutOnRequest`].
    pub fn resolve(self, tls: Option<&str>) -> Self {
        if self != Self::Auto {
            return self;
        }
        let Some(tls) = tls.map(str::trim).filter(|t| !t.is_empty()) else {
            return Self::PutOnRequest;
        };
        let names = |list: &str| -> Vec<String> {
            list.split(',')
                .map(|n| n.trim().to_ascii_lowercase())
                .filter(|n| !n.is_empty())
                .collect()
        };
        let one_sided = match tls.strip_prefix('^') {
            Some(excluded) => names(excluded).iter().any(|n| n == "tcp"),
            None => names(tls).iter().all(|n| ONE_SIDED_TLS.contains(&n.as_str())),
        };
        if one_sided { Self::Get } else { Self::PutOnRequest }
    }
}

/// [`UcxConfig::tcp_segment`] by default: UCX's TCP transport emulates RMA with messages
/// cut into segments of 8 KiB by default, which holds a pull near 1 GB/s on loopback; 512 KiB
/// segments bring it to the speed of kvtier's own TCP backend.
pub const TCP_SEGMENT: u64 = 512 << 10;

/// Transports that cannot detect a dead peer (UCX refuses `UCP_ERR_HANDLING_MODE_PEER` when
/// they are all it may use).
const SHM_TLS: &[&str] = &["self", "sm", "shm", "mm", "posix", "sysv", "xpmem", "knem", "cma"];

/// Whether `tls` (a `UCX_TLS` value) names shared-memory transports only.
fn shared_memory_only(tls: Option<&str>) -> bool {
    let Some(tls) = tls
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.starts_with('^'))
    else {
        return false;
    };
    tls.split(',')
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .all(|n| SHM_TLS.contains(&n.as_str()))
}

/// Settings of the UCX data plane.
#[derive(Debug, Clone)]
pub struct UcxConfig {
    /// How pulls move the bytes.
    pub mode: UcxMode,
    /// `UCX_TLS` for this transport's UCX context; `None` keeps the environment's (UCX reads
    /// `UCX_*` variables when the context is created) or, without one, UCX's default (all).
    pub tls: Option<String>,
    /// Further UCX settings for this context, as `ucp_config_modify` takes them; they override
    /// the environment. UCP's own settings go by their variable's name without `UCX_`
    /// (`("NET_DEVICES", "lo")` for `UCX_NET_DEVICES`); a transport's settings also lose the
    /// transport's prefix and apply to every transport that has a setting of that name
    /// (`("TX_SEG_SIZE", "64K")` for `UCX_TCP_TX_SEG_SIZE`).
    pub settings: Vec<(String, String)>,
    /// The send and receive segment size of UCX's TCP transport ([`TCP_SEGMENT`] by default;
    /// `None` keeps UCX's). Left alone where UCX will not load TCP, and when the environment
    /// sets `UCX_TCP_TX_SEG_SIZE` or `UCX_TCP_RX_SEG_SIZE`. A worker receives no segment larger
    /// than its own receive size, so the value must be the same across the cluster; each
    /// connection in use holds a few segments.
    pub tcp_segment: Option<u64>,
    /// Bytes one transfer keeps in flight; past its deadline at most this much is still
    /// landing.
    pub window: u64,
    /// How long the progress thread keeps polling after activity before it sleeps.
    pub spin: Duration,
    /// How long past its deadline a pull waits for the operations it started to be over
    /// (see the module documentation).
    pub drain: Duration,
}

impl Default for UcxConfig {
    fn default() -> Self {
        Self {
            mode: UcxMode::Auto,
            tls: None,
            settings: Vec::new(),
            tcp_segment: Some(TCP_SEGMENT),
            window: 64 << 20,
            spin: Duration::from_micros(50),
            drain: Duration::from_secs(1),
        }
    }
}

/// The UCX backend of [`Transport`].
pub struct UcxTransport {
    store: Arc<TieredStore>,
    mode: UcxMode,
    endpoint: Vec<u8>,
    name: String,
    mailbox: Arc<Mailbox>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for UcxTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UcxTransport")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl UcxTransport {
    /// A transport that pulls into `store`'s arena and serves the grants of `grants` to peers
    /// that ask for writes (`None`: such requests are answered "unknown grant"). Starts the
    /// progress thread; fails with [`TransportError::Unavailable`] when UCX cannot be set up
    /// (no usable transport, a bad setting).
    pub fn new(
        store: Arc<TieredStore>,
        grants: Option<Arc<Grants>>,
        cfg: UcxConfig,
    ) -> Result<Self, TransportError> {
        // UCX itself reads UCX_TLS from the environment when the context is created, just below.
        let env_tls = std::env::var("UCX_TLS").ok();
        let tls = cfg.tls.clone().or(env_tls);
        let mode = cfg.mode.resolve(tls.as_deref());
        let env_segments = ["UCX_TCP_TX_SEG_SIZE", "UCX_TCP_RX_SEG_SIZE"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        let tcp_segment = cfg.tcp_segment.filter(|_| !env_segments);
        let cfg = UcxConfig {
            mode,
            tcp_segment,
            ..cfg
        };
        let mailbox = Arc::new(Mailbox::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = {
            let store = Arc::clone(&store);
            let mailbox = Arc::clone(&mailbox);
            std::thread::Builder::new()
                .name("kvtier-ucx".into())
                .spawn(
                    move || match Engine::open(&store, grants, cfg, tls.as_deref(), mailbox) {
                        Ok(engine) => {
                            let _ = ready_tx.send(Ok((engine.endpoint.clone(), engine.name.clone())));
                            engine.run();
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    },
                )
                .map_err(|e| unavailable(format!("starting the progress thread: {e}")))?
        };
        match ready_rx.recv() {
            Ok(Ok((endpoint, name))) => Ok(Self {
                store,
                mode,
                endpoint,
                name,
                mailbox,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(unavailable(
                    "the progress thread ended while setting up UCX".into(),
                ))
            }
        }
    }

    /// The mode pulls use (`Auto` resolved).
    pub fn mode(&self) -> UcxMode {
        self.mode
    }

    /// This transport's worker name (`host:pid`), as errors on peers and UCX's logs show it.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Stops the progress thread and waits for it: transfers it still serves end (within
/// [`UcxConfig::drain`]), then UCX is torn down. Blocks the dropping thread meanwhile.
impl Drop for UcxTransport {
    fn drop(&mut self) {
        // Refused only when the thread has already closed its mailbox on its way out.
        let _ = self.mailbox.post(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Transport for UcxTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Ucx
    }

    fn endpoint(&self, _seen_as: Option<IpAddr>) -> Vec<u8> {
        self.endpoint.clone()
    }

    fn pull<'a>(
        &'a self,
        endpoint: &'a [u8],
        grant: GrantId,
        items: Vec<PullItem>,
        deadline: Instant,
    ) -> BoxFuture<'a, Vec<Pulled>> {
        Box::pin(async move {
            let mut items = items;
            let remote = match RemoteEndpoint::parse(endpoint) {
                Ok(r) => r,
                Err(e) => return fail_all(items, &e),
            };
            if items.is_empty() {
                return Vec::new();
            }
            if items.len() > MAX_GRANT_BLOCKS {
                let e = TransportError::Protocol {
                    peer: remote.label(),
                    reason: format!("{} blocks in one pull; at most {MAX_GRANT_BLOCKS}", items.len()),
                };
                return fail_all(items, &e);
            }
            if Instant::now() >= deadline {
                return fail_all(items, &TransportError::TimedOut { peer: remote.label() });
            }
            // A block the source's arena cannot hold is refused here, before any operation.
            let mut results: Vec<Option<Result<(), TransportError>>> = items
                .iter()
                .map(|i| {
                    let inside = i
                        .remote_offset
                        .checked_add(i.slot.len())
                        .is_some_and(|end| end <= remote.arena_len);
                    (!inside).then(|| {
                        Err(TransportError::Protocol {
                            peer: remote.label(),
                            reason: format!("block {} lies outside the peer's arena", i.index),
                        })
                    })
                })
                .collect();
            let ops: Vec<OpSpec> = items
                .iter()
                .zip(&results)
                .enumerate()
                .filter(|(_, (_, r))| r.is_none())
                .map(|(n, (i, _))| OpSpec {
                    item: n,
                    index: i.index,
                    len: i.slot.len(),
                    local_offset: i.slot.offset(),
                    remote_offset: i.remote_offset,
                })
                .collect();
            if !ops.is_empty() {
                let (reply, mut settled) = mpsc::unbounded_channel();
                let spec = PullSpec {
                    remote: remote.clone(),
                    grant,
                    // A source that publishes no key only writes.
                    mode: if remote.rkey.is_empty() {
                        UcxMode::PutOnRequest
                    } else {
                        self.mode
                    },
                    ops,
                    deadline,
                    reply,
                };
                if self.mailbox.post(Command::Pull(spec)) {
                    // Each block is verified as soon as it has landed, while later ones are
                    // still moving.
                    while let Some((n, r)) = settled.recv().await {
                        let item = &mut items[n];
                        results[n] = Some(r.and_then(|()| {
                            if super::verify(&self.store, &mut item.slot, item.checksum) {
                                Ok(())
                            } else {
                                Err(TransportError::Checksum {
                                    peer: remote.label(),
                                    index: item.index,
                                })
                            }
                        }));
                    }
                }
                // Unsettled blocks: the progress thread stopped (the transport is being
                // dropped) after issuing nothing more and ending what it had started.
                for r in results.iter_mut().filter(|r| r.is_none()) {
                    *r = Some(Err(TransportError::Io {
                        peer: remote.label(),
                        reason: "the UCX progress thread has stopped".into(),
                    }));
                }
            }
            items
                .into_iter()
                .zip(results)
                .map(|(item, result)| Pulled {
                    index: item.index,
                    slot: item.slot,
                    result: result.unwrap_or_else(|| {
                        Err(TransportError::Protocol {
                            peer: remote.label(),
                            reason: format!("block {} was not transferred", item.index),
                        })
                    }),
                })
                .collect()
        })
    }
}

fn unavailable(reason: String) -> TransportError {
    TransportError::Unavailable {
        transport: TransportKind::Ucx,
        reason,
    }
}

fn status_text(status: sys::ucs_status_t) -> String {
    // SAFETY: ucs_status_string returns a pointer to a static NUL-terminated string for any
    // status value (an "unknown" text for values it does not know).
    let text = unsafe { CStr::from_ptr(sys::ucs_status_string(status)) };
    text.to_string_lossy().into_owned()
}

/// A peer's endpoint, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RemoteEndpoint {
    name: String,
    arena_base: u64,
    arena_len: u64,
    address: Vec<u8>,
    rkey: Vec<u8>,
}

impl RemoteEndpoint {
    fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(ENDPOINT_HEADER + self.name.len() + self.address.len() + self.rkey.len());
        out.extend_from_slice(&ENDPOINT_MAGIC);
        out.extend_from_slice(&[ENDPOINT_VERSION, 0, 0, 0]);
        out.extend_from_slice(&self.arena_base.to_le_bytes());
        out.extend_from_slice(&self.arena_len.to_le_bytes());
        for len in [self.name.len(), self.address.len(), self.rkey.len()] {
            out.extend_from_slice(&(len as u32).to_le_bytes());
        }
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&self.address);
        out.extend_from_slice(&self.rkey);
        out
    }

    fn parse(bytes: &[u8]) -> Result<Self, TransportError> {
        let bad = |reason: &str| TransportError::BadEndpoint {
            endpoint: hex_prefix(bytes),
            reason: reason.into(),
        };
        let mut r = Reader::new(bytes);
        if r.take(4) != Some(&ENDPOINT_MAGIC[..]) {
            return Err(bad("not a kvtier UCX endpoint"));
        }
        let version = r.take(4).ok_or_else(|| bad("truncated"))?;
        if version[0] != ENDPOINT_VERSION {
            return Err(bad(&format!(
                "endpoint version {}, this agent speaks {ENDPOINT_VERSION}",
                version[0]
            )));
        }
        let (Some(arena_base), Some(arena_len), Some(name_len), Some(addr_len), Some(rkey_len)) =
            (r.u64(), r.u64(), r.u32(), r.u32(), r.u32())
        else {
            return Err(bad("truncated"));
        };
        let (Some(name), Some(address), Some(rkey)) = (
            r.take(name_len as usize),
            r.take(addr_len as usize),
            r.take(rkey_len as usize),
        ) else {
            return Err(bad("truncated"));
        };
        if !r.rest().is_empty() {
            return Err(bad("trailing bytes"));
        }
        if address.is_empty() {
            return Err(bad("no worker address"));
        }
        // Every block is checked to lie within the arena, so no address computed from it
        // overflows.
        if arena_base.checked_add(arena_len).is_none() {
            return Err(bad("the arena's range overflows"));
        }
        Ok(Self {
            name: String::from_utf8_lossy(name).into_owned(),
            arena_base,
            arena_len,
            address: address.to_vec(),
            rkey: rkey.to_vec(),
        })
    }

    /// How errors name the peer.
    fn label(&self) -> String {
        format!("ucx:{}", self.name)
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    let shown: String = bytes.iter().take(16).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > 16 {
        format!("{shown}… ({} bytes)", bytes.len())
    } else {
        shown
    }
}

/// Little-endian fields read off a byte slice.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn rest(&self) -> &'a [u8] {
        self.bytes
    }
}

/// One block of a pull, as the progress thread sees it (the slot itself stays with the
/// caller's future).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OpSpec {
    /// Position in the pull's items.
    item: usize,
    index: u32,
    len: u64,
    local_offset: u64,
    remote_offset: u64,
}

/// What the progress thread made of an item (by position), as soon as it is known; the
/// caller verifies checksums. The channel closes when the transfer is over.
type Settled = mpsc::UnboundedSender<(usize, Result<(), TransportError>)>;

/// Fails every op of a transfer that never started.
fn refuse(ops: &[OpSpec], reply: &Settled, e: &TransportError) {
    for o in ops {
        let _ = reply.send((o.item, Err(e.clone())));
    }
}

/// A started pull's results, each sent once.
#[derive(Debug)]
struct Outcome {
    reply: Settled,
    /// Per op: its item's position, and whether its result went out.
    items: Vec<usize>,
    done: Vec<bool>,
}

impl Outcome {
    fn new(reply: Settled, ops: &[OpSpec]) -> Self {
        Self {
            reply,
            items: ops.iter().map(|o| o.item).collect(),
            done: vec![false; ops.len()],
        }
    }

    fn settle(&mut self, op: usize, r: Result<(), TransportError>) {
        if !std::mem::replace(&mut self.done[op], true) {
            let _ = self.reply.send((self.items[op], r));
        }
    }

    /// Settles every op still open with `e`.
    fn settle_rest(&mut self, e: &TransportError) {
        for op in 0..self.done.len() {
            self.settle(op, Err(e.clone()));
        }
    }
}

#[derive(Debug)]
struct PullSpec {
    remote: RemoteEndpoint,
    grant: GrantId,
    mode: UcxMode,
    ops: Vec<OpSpec>,
    deadline: Instant,
    reply: Settled,
}

#[derive(Debug)]
enum Command {
    Pull(PullSpec),
    Stop,
}

/// Where other threads leave commands for the progress thread.
#[derive(Debug, Default)]
struct Mailbox {
    inner: Mutex<MailboxInner>,
}

#[derive(Debug, Default)]
struct MailboxInner {
    commands: Vec<Command>,
    /// The worker to wake; `None` before it exists and once it is being destroyed.
    worker: Option<WorkerWaker>,
}

/// A worker handle that is only ever used to call `ucp_worker_signal`.
#[derive(Debug, Clone, Copy)]
struct WorkerWaker(sys::ucp_worker_h);

// SAFETY: the handle is only used for ucp_worker_signal, which UCX documents as safe from any
// thread whatever the worker's thread mode; the mailbox lock keeps it from being used once the
// progress thread has started destroying the worker (see `Mailbox::close`).
unsafe impl Send for WorkerWaker {}

impl Mailbox {
    /// Leaves a command and wakes the worker; `false` (the command dropped) when the progress
    /// thread is not running.
    #[must_use]
    fn post(&self, cmd: Command) -> bool {
        let mut inner = self.inner.lock();
        let Some(waker) = inner.worker else {
            return false;
        };
        inner.commands.push(cmd);
        // Signalled under the lock, so that the worker cannot be destroyed in between.
        // SAFETY: the worker is alive while the mailbox holds it (it is taken out, under this
        // lock, before ucp_worker_destroy), and ucp_worker_signal is thread-safe.
        let status = unsafe { sys::ucp_worker_signal(waker.0) };
        if status != sys::UCS_OK {
            tracing::warn!(status = %status_text(status), "waking the UCX progress thread");
        }
        true
    }

    fn open(&self, worker: sys::ucp_worker_h) {
        self.inner.lock().worker = Some(WorkerWaker(worker));
    }

    fn take(&self) -> Vec<Command> {
        std::mem::take(&mut self.inner.lock().commands)
    }

    /// Stops accepting commands; returns those not yet taken.
    fn close(&self) -> Vec<Command> {
        let mut inner = self.inner.lock();
        inner.worker = None;
        std::mem::take(&mut inner.commands)
    }
}

/// What UCX callbacks leave for the progress loop (they run inside `ucp_worker_progress`, on
/// the progress thread).
#[derive(Debug, Default)]
struct Inbox {
    requests: Vec<Vec<u8>>,
    answers: Vec<Vec<u8>>,
    /// Endpoints UCX reported as failed (the handle's address, the status).
    failed: Vec<(usize, sys::ucs_status_t)>,
}

/// Borrows the inbox behind a callback's `arg`.
///
/// # Safety
/// `arg` must be the pointer the engine registered: its `Box<RefCell<Inbox>>`, which outlives
/// the worker.
unsafe fn inbox<'a>(arg: *mut c_void) -> &'a RefCell<Inbox> {
    // SAFETY: per the function's contract `arg` points to a live RefCell<Inbox>; callbacks run
    // on the progress thread only, so shared access is not concurrent.
    unsafe { &*arg.cast::<RefCell<Inbox>>() }
}

/// Copies an active message's payload into the inbox.
///
/// # Safety
/// `data`/`length` and `param` as UCX passes them to an active-message handler; `arg` as for
/// [`inbox`].
unsafe fn receive(
    arg: *mut c_void,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
    pick: fn(&mut Inbox) -> &mut Vec<Vec<u8>>,
) -> sys::ucs_status_t {
    // SAFETY: UCX passes a valid parameter struct for the duration of the callback.
    let attr = unsafe { (*param).recv_attr };
    if attr & u64::from(sys::UCP_AM_RECV_ATTR_FLAG_RNDV) != 0 {
        // Messages are sent eagerly; a rendezvous one is not ours to fetch. Refusing it fails
        // the sender's send.
        return sys::UCS_ERR_UNSUPPORTED;
    }
    let bytes = if length == 0 {
        Vec::new()
    } else {
        // SAFETY: without the RNDV flag, `data` points to `length` received bytes that stay
        // valid until the callback returns.
        unsafe { std::slice::from_raw_parts(data.cast::<u8>(), length) }.to_vec()
    };
    // SAFETY: per this function's contract.
    if let Ok(mut inbox) = unsafe { inbox(arg) }.try_borrow_mut() {
        pick(&mut inbox).push(bytes);
    }
    sys::UCS_OK
}

/// UCX's handler of [`AM_REQUEST`] messages.
///
/// # Safety
/// Only for UCX to call, as an active-message handler registered with the engine's inbox as
/// its argument.
unsafe extern "C" fn on_request(
    arg: *mut c_void,
    _header: *const c_void,
    _header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    // SAFETY: UCX calls this handler with the arguments `receive` expects, and `arg` is the
    // inbox registered with the handler.
    unsafe { receive(arg, data, length, param, |i| &mut i.requests) }
}

/// UCX's handler of [`AM_ANSWER`] messages.
///
/// # Safety
/// As for [`on_request`].
unsafe extern "C" fn on_answer(
    arg: *mut c_void,
    _header: *const c_void,
    _header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    // SAFETY: as in `on_request`.
    unsafe { receive(arg, data, length, param, |i| &mut i.answers) }
}

/// UCX's report of a failed endpoint.
///
/// # Safety
/// Only for UCX to call, as an endpoint's error handler registered with the engine's inbox as
/// its argument.
unsafe extern "C" fn on_ep_error(arg: *mut c_void, ep: sys::ucp_ep_h, status: sys::ucs_status_t) {
    // SAFETY: `arg` is the inbox given with the endpoint's error handler.
    if let Ok(mut inbox) = unsafe { inbox(arg) }.try_borrow_mut() {
        inbox.failed.push((ep as usize, status));
    }
}

/// An operation UCX may still be working on, or the status it ended with.
#[derive(Debug)]
enum Req {
    Pending(*mut c_void),
    Done(sys::ucs_status_t),
}

impl Req {
    /// From what a non-blocking call returned.
    fn from_ptr(ptr: sys::ucs_status_ptr_t) -> Self {
        if sys::ucs_ptr_is_ptr(ptr) {
            Self::Pending(ptr)
        } else {
            Self::Done(sys::ucs_ptr_status(ptr))
        }
    }

    /// The final status, once there is one (the request is then freed).
    fn poll(&mut self) -> Option<sys::ucs_status_t> {
        match *self {
            Self::Done(s) => Some(s),
            Self::Pending(p) => {
                // SAFETY: `p` is a request handle UCX returned and that has not been freed (it
                // is freed below, once, when it is replaced by `Done`).
                let s = unsafe { sys::ucp_request_check_status(p) };
                if s == sys::UCS_INPROGRESS {
                    return None;
                }
                // SAFETY: the request has completed; it is released exactly once.
                unsafe { sys::ucp_request_free(p) };
                *self = Self::Done(s);
                Some(s)
            }
        }
    }

    /// Gives up on the request: UCX releases it when it completes. Whatever it reads or writes
    /// must stay valid until then (the caller's problem).
    fn abandon(self) {
        if let Self::Pending(p) = self {
            // SAFETY: `p` is a live request handle; ucp_request_free on an incomplete request
            // lets UCX release it at completion, and the handle is not used again.
            unsafe { sys::ucp_request_free(p) };
        }
    }
}

/// One endpoint to a peer worker.
#[derive(Debug)]
struct Peer {
    ep: sys::ucp_ep_h,
    label: String,
    /// Created in `UCP_ERR_HANDLING_MODE_PEER` (failures detected, force-close possible).
    peer_errors: bool,
    rkeys: HashMap<Vec<u8>, sys::ucp_rkey_h>,
    failed: Option<sys::ucs_status_t>,
    closed: bool,
    /// Transfers using the endpoint (its rkeys are destroyed when the last one is done).
    users: usize,
}

/// A transfer's claim on a peer.
type PeerId = u64;

/// The puller's side of a pull.
#[derive(Debug)]
struct PullJob {
    peer: PeerId,
    label: String,
    deadline: Instant,
    ops: Vec<OpSpec>,
    outcome: Outcome,
    state: PullState,
}

#[derive(Debug)]
enum PullState {
    Get {
        rkey: sys::ucp_rkey_h,
        remote_base: u64,
        next: usize,
        inflight: Vec<(usize, Req)>,
        inflight_bytes: u64,
    },
    Put {
        request_id: u64,
        /// The request message; UCX reads it until `send` completes.
        message: Vec<u8>,
        send: Option<Req>,
        answer: Option<Vec<u8>>,
    },
}

/// The source's side of a put-on-request transfer.
#[derive(Debug)]
struct ServeJob {
    peer: PeerId,
    request_id: u64,
    deadline: Instant,
    /// Keeps the granted blocks pinned while they are written from.
    _pinned: Option<Arc<GrantEntry>>,
    rkey: sys::ucp_rkey_h,
    puts: Vec<PutOp>,
    statuses: Vec<u8>,
    next: usize,
    inflight: Vec<(usize, Req)>,
    inflight_bytes: u64,
    phase: ServePhase,
}

#[derive(Debug)]
struct PutOp {
    /// Position in the request's list.
    entry: usize,
    local: *const u8,
    len: u64,
    remote: u64,
}

#[derive(Debug)]
enum ServePhase {
    Putting,
    Flushing(Req),
    Answering(Req, Vec<u8>),
}

/// A put-on-request message, parsed.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    id: u64,
    grant: GrantId,
    boot_id: [u8; 16],
    deadline_ns: u64,
    budget_ns: u64,
    arena_base: u64,
    arena_len: u64,
    address: Vec<u8>,
    rkey: Vec<u8>,
    /// (grant index, length, slot offset in the puller's arena).
    entries: Vec<(u32, u64, u64)>,
}

impl Request {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            REQUEST_HEADER + self.address.len() + self.rkey.len() + REQUEST_ENTRY * self.entries.len(),
        );
        out.extend_from_slice(&REQUEST_MAGIC);
        out.extend_from_slice(&MESSAGE_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.grant.0);
        out.extend_from_slice(&self.boot_id);
        for v in [self.deadline_ns, self.budget_ns, self.arena_base, self.arena_len] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for len in [self.address.len(), self.rkey.len(), self.entries.len()] {
            out.extend_from_slice(&(len as u32).to_le_bytes());
        }
        out.extend_from_slice(&self.address);
        out.extend_from_slice(&self.rkey);
        for &(index, len, offset) in &self.entries {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        out
    }

    fn parse(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader::new(bytes);
        if r.take(4)? != REQUEST_MAGIC || r.u16()? != MESSAGE_VERSION {
            return None;
        }
        r.u16()?;
        let id = r.u64()?;
        let grant = GrantId::from_slice(r.take(16)?)?;
        let boot_id = r.take(16)?.try_into().ok()?;
        let (deadline_ns, budget_ns, arena_base, arena_len) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        let (addr_len, rkey_len, count) = (r.u32()? as usize, r.u32()? as usize, r.u32()? as usize);
        if count > MAX_GRANT_BLOCKS || r.rest().len() != addr_len + rkey_len + count * REQUEST_ENTRY {
            return None;
        }
        let address = r.take(addr_len)?.to_vec();
        let rkey = r.take(rkey_len)?.to_vec();
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            entries.push((r.u32()?, r.u64()?, r.u64()?));
        }
        Some(Self {
            id,
            grant,
            boot_id,
            deadline_ns,
            budget_ns,
            arena_base,
            arena_len,
            address,
            rkey,
            entries,
        })
    }

    /// When the source must stop writing: the puller's own deadline when both run on one host
    /// (one boot, so one CLOCK_MONOTONIC), else the budget counted from arrival, which ends no
    /// earlier than the puller's deadline by the message's transit time.
    fn local_deadline(&self, own_boot: &[u8; 16], now: Instant, now_ns: u64) -> Instant {
        let left = if *own_boot != [0; 16] && self.boot_id == *own_boot {
            self.deadline_ns.saturating_sub(now_ns)
        } else {
            self.budget_ns
        };
        now + Duration::from_nanos(left)
    }
}

fn encode_answer(request_id: u64, statuses: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ANSWER_HEADER + statuses.len());
    out.extend_from_slice(&ANSWER_MAGIC);
    out.extend_from_slice(&MESSAGE_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(&(statuses.len() as u32).to_le_bytes());
    out.extend_from_slice(statuses);
    out
}

/// (request id, statuses) of an answer.
fn parse_answer(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut r = Reader::new(bytes);
    if r.take(4)? != ANSWER_MAGIC || r.u16()? != MESSAGE_VERSION {
        return None;
    }
    r.u16()?;
    let id = r.u64()?;
    let count = r.u32()? as usize;
    let statuses = r.take(count)?;
    r.rest().is_empty().then_some((id, statuses))
}

/// CLOCK_MONOTONIC in nanoseconds (the clock `Instant` reads on Linux).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// `host:pid`, how peers' errors and UCX's own logs name this worker.
fn worker_name() -> String {
    let mut host = [0u8; 256];
    // SAFETY: gethostname writes at most `host.len()` bytes into the buffer.
    let ok = unsafe { libc::gethostname(host.as_mut_ptr().cast(), host.len()) } == 0;
    let host = if ok {
        let end = host.iter().position(|&b| b == 0).unwrap_or(host.len());
        String::from_utf8_lossy(&host[..end]).into_owned()
    } else {
        "?".into()
    };
    format!("{host}:{}", std::process::id())
}

/// This boot's id (zeros when unknown, which never matches).
fn boot_id() -> [u8; 16] {
    let mut out = [0u8; 16];
    let Ok(text) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") else {
        return out;
    };
    let hex: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
    if hex.len() != 32 {
        return out;
    }
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let digits = std::str::from_utf8(pair).unwrap_or("00");
        *o = u8::from_str_radix(digits, 16).unwrap_or(0);
    }
    out
}

/// All UCX state; lives on (and is only touched by) the progress thread.
#[derive(Debug)]
struct Engine {
    context: sys::ucp_context_h,
    worker: sys::ucp_worker_h,
    memh: sys::ucp_mem_h,
    efd: libc::c_int,
    /// Registered with the worker's handlers; freed after the worker.
    inbox: Box<RefCell<Inbox>>,
    arena_base: *mut u8,
    arena_len: u64,
    address: Vec<u8>,
    rkey: Vec<u8>,
    endpoint: Vec<u8>,
    name: String,
    boot_id: [u8; 16],
    grants: Option<Arc<Grants>>,
    cfg: UcxConfig,
    mailbox: Arc<Mailbox>,
    peers: HashMap<PeerId, Peer>,
    by_address: HashMap<Vec<u8>, PeerId>,
    next_peer: PeerId,
    next_request: u64,
    pulls: Vec<PullJob>,
    serves: Vec<ServeJob>,
    closing: Vec<Req>,
    stopping: bool,
    /// UCX refused `UCP_ERR_HANDLING_MODE_PEER` with the transports it may use.
    no_peer_errors: bool,
    /// Whether the last progress burst ended because the worker had nothing more to do.
    progress_idle: bool,
    /// Keeps the arena mapped while it is registered.
    _store: Arc<TieredStore>,
}

impl Engine {
    /// Creates the context, the worker and the arena's registration. `tls` is the `UCX_TLS`
    /// the context will use.
    fn open(
        store: &Arc<TieredStore>,
        grants: Option<Arc<Grants>>,
        cfg: UcxConfig,
        tls: Option<&str>,
        mailbox: Arc<Mailbox>,
    ) -> Result<Self, TransportError> {
        let arena = store.host().arena();
        let mut engine = Self {
            context: std::ptr::null_mut(),
            worker: std::ptr::null_mut(),
            memh: std::ptr::null_mut(),
            efd: -1,
            inbox: Box::default(),
            arena_base: arena.as_ptr(),
            arena_len: arena.len(),
            address: Vec::new(),
            rkey: Vec::new(),
            endpoint: Vec::new(),
            name: String::new(),
            boot_id: boot_id(),
            grants,
            cfg,
            mailbox,
            peers: HashMap::new(),
            by_address: HashMap::new(),
            next_peer: 0,
            next_request: 0,
            pulls: Vec::new(),
            serves: Vec::new(),
            closing: Vec::new(),
            stopping: false,
            // Known in advance, the refusal (and the error UCX logs for it) is skipped; `init`
            // also reads it as "no TCP transport".
            no_peer_errors: shared_memory_only(tls),
            progress_idle: true,
            _store: Arc::clone(store),
        };
        // Whatever was created before a failure is torn down by Drop.
        engine.init()?;
        engine.mailbox.open(engine.worker);
        Ok(engine)
    }

    fn init(&mut self) -> Result<(), TransportError> {
        let check = |what: &str, status: sys::ucs_status_t| {
            if status == sys::UCS_OK {
                Ok(())
            } else {
                Err(unavailable(format!("{what}: {}", status_text(status))))
            }
        };
        let mut config: *mut sys::ucp_config_t = std::ptr::null_mut();
        // SAFETY: null prefix and file name ask UCX for the defaults plus the UCX_* environment;
        // `config` receives a handle released below.
        check("reading the UCX configuration", unsafe {
            sys::ucp_config_read(std::ptr::null(), std::ptr::null(), &mut config)
        })?;
        let mut settings: Vec<(String, String)> = Vec::new();
        if let Some(tls) = &self.cfg.tls {
            settings.push(("TLS".into(), tls.clone()));
        }
        // Where UCX will not load TCP its settings would only draw a warning that they are
        // unused.
        if let Some(size) = self.cfg.tcp_segment.filter(|_| !self.no_peer_errors) {
            for name in ["TX_SEG_SIZE", "RX_SEG_SIZE"] {
                settings.push((name.into(), size.to_string()));
            }
        }
        settings.extend(self.cfg.settings.iter().cloned());
        let mut result = Ok(());
        for (name, value) in &settings {
            let (Ok(n), Ok(v)) = (CString::new(name.as_str()), CString::new(value.as_str())) else {
                result = Err(unavailable(format!(
                    "UCX setting {name}={value:?} contains a NUL byte"
                )));
                break;
            };
            // SAFETY: `config` is the live handle read above; both strings are NUL-terminated
            // and outlive the call (UCX copies the value).
            let status = unsafe { sys::ucp_config_modify(config, n.as_ptr(), v.as_ptr()) };
            if status != sys::UCS_OK {
                result = Err(unavailable(format!(
                    "UCX setting {name}={value}: {}",
                    status_text(status)
                )));
                break;
            }
        }
        if result.is_ok() {
            let params = sys::ucp_params_t {
                field_mask: u64::from(sys::UCP_PARAM_FIELD_FEATURES),
                features: u64::from(sys::UCP_FEATURE_RMA | sys::UCP_FEATURE_AM | sys::UCP_FEATURE_WAKEUP),
                ..Default::default()
            };
            // SAFETY: `params` and `config` are valid for the call; the version is the one the
            // bindings were generated from (what the header's inline ucp_init passes).
            result = check("creating the UCX context", unsafe {
                sys::ucp_init_version(
                    sys::UCP_API_MAJOR,
                    sys::UCP_API_MINOR,
                    &params,
                    config,
                    &mut self.context,
                )
            });
        }
        // SAFETY: `config` came from ucp_config_read and is released once, here.
        unsafe { sys::ucp_config_release(config) };
        result?;

        self.name = worker_name();
        let name = CString::new(self.name.as_str()).unwrap_or_default();
        let params = sys::ucp_worker_params_t {
            field_mask: u64::from(sys::UCP_WORKER_PARAM_FIELD_THREAD_MODE | sys::UCP_WORKER_PARAM_FIELD_NAME),
            thread_mode: sys::UCS_THREAD_MODE_SINGLE,
            name: name.as_ptr(),
            ..Default::default()
        };
        // SAFETY: the context is live; the worker handle is written into `self.worker`.
        check("creating the UCX worker", unsafe {
            sys::ucp_worker_create(self.context, &params, &mut self.worker)
        })?;
        // SAFETY: live worker; the fd stays owned by the worker.
        check("getting the worker's event fd", unsafe {
            sys::ucp_worker_get_efd(self.worker, &mut self.efd)
        })?;
        let arg: *mut RefCell<Inbox> = &mut *self.inbox;
        let handlers: [(u32, sys::ucp_am_recv_callback_t); 2] =
            [(AM_REQUEST, Some(on_request)), (AM_ANSWER, Some(on_answer))];
        for (id, cb) in handlers {
            let params = sys::ucp_am_handler_param_t {
                field_mask: u64::from(
                    sys::UCP_AM_HANDLER_PARAM_FIELD_ID
                        | sys::UCP_AM_HANDLER_PARAM_FIELD_CB
                        | sys::UCP_AM_HANDLER_PARAM_FIELD_ARG
                        | sys::UCP_AM_HANDLER_PARAM_FIELD_FLAGS,
                ),
                id,
                flags: sys::UCP_AM_FLAG_WHOLE_MSG,
                cb,
                arg: arg.cast(),
            };
            // SAFETY: live worker; `arg` points into the boxed inbox, which is freed only after
            // the worker is destroyed (field order and Drop), and the callbacks match UCX's
            // ucp_am_recv_callback_t.
            check("registering the active-message handlers", unsafe {
                sys::ucp_worker_set_am_recv_handler(self.worker, &params)
            })?;
        }
        let params = sys::ucp_mem_map_params_t {
            field_mask: u64::from(sys::UCP_MEM_MAP_PARAM_FIELD_ADDRESS | sys::UCP_MEM_MAP_PARAM_FIELD_LENGTH),
            address: self.arena_base.cast(),
            length: self.arena_len as usize,
            ..Default::default()
        };
        // SAFETY: the range is the arena's whole mapping, which `_store` keeps alive longer
        // than the registration (unmapped in Drop before the store reference goes).
        check("registering the arena", unsafe {
            sys::ucp_mem_map(self.context, &params, &mut self.memh)
        })?;
        let mut packed: *mut c_void = std::ptr::null_mut();
        let mut packed_len = 0usize;
        // SAFETY: live context and memory handle; UCX allocates the buffer, released below.
        check("packing the arena's remote key", unsafe {
            sys::ucp_rkey_pack(self.context, self.memh, &mut packed, &mut packed_len)
        })?;
        // SAFETY: ucp_rkey_pack returned `packed_len` bytes at `packed`; they are copied and the
        // buffer released once.
        unsafe {
            self.rkey = std::slice::from_raw_parts(packed.cast::<u8>(), packed_len).to_vec();
            sys::ucp_rkey_buffer_release(packed);
        }
        let mut address: *mut sys::ucp_address_t = std::ptr::null_mut();
        let mut address_len = 0usize;
        // SAFETY: live worker; UCX allocates the address, released below.
        check("getting the worker's address", unsafe {
            sys::ucp_worker_get_address(self.worker, &mut address, &mut address_len)
        })?;
        // SAFETY: `address_len` bytes at `address`, copied, then released once.
        unsafe {
            self.address = std::slice::from_raw_parts(address.cast::<u8>(), address_len).to_vec();
            sys::ucp_worker_release_address(self.worker, address);
        }
        self.endpoint = RemoteEndpoint {
            name: self.name.clone(),
            arena_base: self.arena_base as u64,
            arena_len: self.arena_len,
            address: self.address.clone(),
            // Without the key no peer reads the arena one-sidedly where keys are checked (see
            // the module documentation); its pullers ask for writes instead.
            rkey: if self.cfg.mode == UcxMode::PutOnRequest {
                Vec::new()
            } else {
                self.rkey.clone()
            },
        }
        .encode();
        Ok(())
    }

    /// The progress loop, until a stop command and the end of the transfers it cut short.
    fn run(mut self) {
        let mut last_busy = Instant::now();
        loop {
            let busy = self.turn();
            if self.stopping && self.pulls.is_empty() && self.serves.is_empty() {
                break;
            }
            let now = Instant::now();
            if busy {
                last_busy = now;
            } else if now.duration_since(last_busy) < self.cfg.spin {
                std::hint::spin_loop();
            } else {
                self.sleep(now);
            }
        }
    }

    /// One round: commands, deadlines, progress, messages, transfers. Whether anything
    /// happened.
    fn turn(&mut self) -> bool {
        let mut busy = false;
        for cmd in self.mailbox.take() {
            busy = true;
            match cmd {
                Command::Pull(spec) => self.start_pull(spec),
                Command::Stop => self.stop(),
            }
        }
        let mut events = 0;
        // SAFETY: the worker is live and only this thread calls into it.
        while events < PROGRESS_BURST && unsafe { sys::ucp_worker_progress(self.worker) } != 0 {
            events += 1;
        }
        self.progress_idle = events < PROGRESS_BURST;
        busy |= events > 0;
        busy |= self.handle_inbox();
        busy |= self.advance_pulls();
        busy |= self.advance_serves();
        self.reap_peers();
        busy
    }

    /// Sleeps until an event, a command (the mailbox signals the worker) or the next
    /// deadline; while operations are in flight, at most [`IN_FLIGHT_NAP`].
    fn sleep(&mut self, now: Instant) {
        let in_flight = !self.closing.is_empty() || !self.pulls.is_empty() || !self.serves.is_empty();
        let timeout = self.next_timer().map(|t| t.saturating_duration_since(now));
        let timeout = if in_flight {
            Some(timeout.map_or(IN_FLIGHT_NAP, |t| t.min(IN_FLIGHT_NAP)))
        } else {
            timeout
        };
        self.wait_for_events(timeout);
    }

    /// Arms the worker's event fd and waits on it (`None`: without a time limit).
    fn wait_for_events(&mut self, timeout: Option<Duration>) {
        // SAFETY: live worker, this thread.
        let status = unsafe { sys::ucp_worker_arm(self.worker) };
        let timeout = match status {
            sys::UCS_OK => timeout,
            // Events are pending: progress them now.
            sys::UCS_ERR_BUSY => return,
            // The transports cannot signal: poll the worker on a short period instead.
            _ => Some(timeout.map_or(IN_FLIGHT_NAP, |t| t.min(IN_FLIGHT_NAP))),
        };
        let ms = timeout.map_or(-1, |t| {
            t.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
        });
        let mut fd = libc::pollfd {
            fd: self.efd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the fd belongs to the live worker.
        unsafe { libc::poll(&mut fd, 1, ms) };
    }

    /// The earliest deadline (or end of a drain period) of a transfer.
    fn next_timer(&self) -> Option<Instant> {
        let drain = self.cfg.drain;
        let pulls = self.pulls.iter().map(|p| {
            if Instant::now() < p.deadline {
                p.deadline
            } else {
                p.deadline + drain
            }
        });
        let serves = self.serves.iter().map(|s| {
            if Instant::now() < s.deadline {
                s.deadline
            } else {
                s.deadline + drain
            }
        });
        pulls.chain(serves).min()
    }

    fn stop(&mut self) {
        self.stopping = true;
        let now = Instant::now();
        for p in &mut self.pulls {
            p.deadline = p.deadline.min(now);
        }
        for s in &mut self.serves {
            s.deadline = s.deadline.min(now);
        }
        for cmd in self.mailbox.close() {
            if let Command::Pull(spec) = cmd {
                let e = TransportError::Io {
                    peer: spec.remote.label(),
                    reason: "the UCX transport is shutting down".into(),
                };
                refuse(&spec.ops, &spec.reply, &e);
            }
        }
    }

    /// The live endpoint to the worker at `address`, created if needed.
    fn connect(&mut self, address: &[u8], label: &str) -> Result<PeerId, sys::ucs_status_t> {
        if let Some(&id) = self.by_address.get(address) {
            if let Some(p) = self.peers.get_mut(&id) {
                if p.failed.is_none() && !p.closed {
                    p.users += 1;
                    return Ok(id);
                }
            }
        }
        let arg: *mut RefCell<Inbox> = &mut *self.inbox;
        let mut last = sys::UCS_OK;
        let modes: &[sys::ucp_err_handling_mode_t] = if self.no_peer_errors {
            &[sys::UCP_ERR_HANDLING_MODE_NONE]
        } else {
            &[sys::UCP_ERR_HANDLING_MODE_PEER, sys::UCP_ERR_HANDLING_MODE_NONE]
        };
        for &mode in modes {
            let params = sys::ucp_ep_params_t {
                field_mask: u64::from(
                    sys::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
                        | sys::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                        | sys::UCP_EP_PARAM_FIELD_ERR_HANDLER,
                ),
                address: address.as_ptr().cast(),
                err_mode: mode,
                err_handler: sys::ucp_err_handler_t {
                    cb: Some(on_ep_error),
                    arg: arg.cast(),
                },
                ..Default::default()
            };
            let mut ep: sys::ucp_ep_h = std::ptr::null_mut();
            // SAFETY: live worker, this thread; `address` is a worker address received from the
            // peer (UCX validates it while unpacking and reads it only during the call); the
            // error handler's `arg` is the inbox, which outlives every endpoint.
            let status = unsafe { sys::ucp_ep_create(self.worker, &params, &mut ep) };
            if status == sys::UCS_OK {
                if mode == sys::UCP_ERR_HANDLING_MODE_NONE && !self.no_peer_errors {
                    // A property of the transports UCX may use, not of this peer: later
                    // endpoints go straight to NONE (UCX logs an error for each refusal).
                    tracing::info!(
                        peer = label,
                        "UCX may only use transports without peer failure detection (shared \
                         memory): endpoints use error mode NONE"
                    );
                    self.no_peer_errors = true;
                }
                let id = self.next_peer;
                self.next_peer += 1;
                self.peers.insert(
                    id,
                    Peer {
                        ep,
                        label: label.to_owned(),
                        peer_errors: mode == sys::UCP_ERR_HANDLING_MODE_PEER,
                        rkeys: HashMap::new(),
                        failed: None,
                        closed: false,
                        users: 1,
                    },
                );
                self.by_address.insert(address.to_vec(), id);
                return Ok(id);
            }
            last = status;
        }
        Err(last)
    }

    /// The peer's remote key `packed`, unpacked once per endpoint.
    fn rkey(&mut self, peer: PeerId, packed: &[u8]) -> Result<sys::ucp_rkey_h, sys::ucs_status_t> {
        let p = self.peers.get_mut(&peer).ok_or(sys::UCS_ERR_NOT_CONNECTED)?;
        if let Some(&k) = p.rkeys.get(packed) {
            return Ok(k);
        }
        let mut rkey: sys::ucp_rkey_h = std::ptr::null_mut();
        // SAFETY: live endpoint; `packed` is read during the call only (UCX validates it).
        let status = unsafe { sys::ucp_ep_rkey_unpack(p.ep, packed.as_ptr().cast(), &mut rkey) };
        if status != sys::UCS_OK {
            return Err(status);
        }
        p.rkeys.insert(packed.to_vec(), rkey);
        Ok(rkey)
    }

    fn release_peer(&mut self, peer: PeerId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.users = p.users.saturating_sub(1);
        }
    }

    /// Closes an endpoint (force-close when it can, discarding its outstanding operations);
    /// it is forgotten once no transfer uses it.
    fn close_peer(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.closed {
            return;
        }
        p.closed = true;
        let param = sys::ucp_request_param_t {
            op_attr_mask: sys::UCP_OP_ATTR_FIELD_FLAGS,
            flags: if p.peer_errors {
                sys::UCP_EP_CLOSE_FLAG_FORCE
            } else {
                0
            },
            ..Default::default()
        };
        // SAFETY: live endpoint, closed once (the `closed` flag); the close request is polled
        // and freed through `closing`.
        let req = Req::from_ptr(unsafe { sys::ucp_ep_close_nbx(p.ep, &param) });
        self.closing.push(req);
        self.by_address.retain(|_, id| *id != peer);
    }

    /// Forgets closed endpoints no transfer uses any more, and finished close requests.
    fn reap_peers(&mut self) {
        self.closing.retain_mut(|r| r.poll().is_none());
        let done: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.closed && p.users == 0)
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            if let Some(p) = self.peers.remove(&id) {
                for (_, k) in p.rkeys {
                    // SAFETY: the rkey was unpacked on this endpoint and no transfer uses the
                    // endpoint any more, so no operation refers to it; destroyed once.
                    unsafe { sys::ucp_rkey_destroy(k) };
                }
            }
        }
    }

    /// Messages and endpoint failures the callbacks left.
    fn handle_inbox(&mut self) -> bool {
        let (requests, answers, failed) = {
            let mut inbox = self.inbox.borrow_mut();
            (
                std::mem::take(&mut inbox.requests),
                std::mem::take(&mut inbox.answers),
                std::mem::take(&mut inbox.failed),
            )
        };
        let busy = !(requests.is_empty() && answers.is_empty() && failed.is_empty());
        for (ep, status) in failed {
            let hit = self
                .peers
                .iter_mut()
                .find(|(_, p)| p.ep as usize == ep && !p.closed);
            if let Some((&id, p)) = hit {
                tracing::debug!(peer = %p.label, status = %status_text(status), "UCX endpoint failed");
                p.failed = Some(status);
                self.close_peer(id);
            }
        }
        for message in answers {
            let Some((id, statuses)) = parse_answer(&message) else {
                tracing::warn!(bytes = message.len(), "malformed UCX transfer answer ignored");
                continue;
            };
            let job = self
                .pulls
                .iter_mut()
                .find(|p| matches!(p.state, PullState::Put { request_id, .. } if request_id == id));
            if let Some(PullJob {
                state: PullState::Put { answer, .. },
                ..
            }) = job
            {
                *answer = Some(statuses.to_vec());
            }
        }
        for message in requests {
            self.start_serve(&message);
        }
        busy
    }

    fn start_pull(&mut self, spec: PullSpec) {
        let label = spec.remote.label();
        if self.stopping {
            let e = TransportError::Io {
                peer: label,
                reason: "the UCX transport is shutting down".into(),
            };
            return refuse(&spec.ops, &spec.reply, &e);
        }
        let fail = |ops: &[OpSpec], reply: Settled, e: TransportError| refuse(ops, &reply, &e);
        let peer = match self.connect(&spec.remote.address, &label) {
            Ok(p) => p,
            Err(status) => {
                let e = TransportError::Io {
                    peer: label,
                    reason: format!("creating a UCX endpoint: {}", status_text(status)),
                };
                return fail(&spec.ops, spec.reply, e);
            }
        };
        let state = match spec.mode {
            UcxMode::Get | UcxMode::Auto => match self.rkey(peer, &spec.remote.rkey) {
                Ok(rkey) => PullState::Get {
                    rkey,
                    remote_base: spec.remote.arena_base,
                    next: 0,
                    inflight: Vec::new(),
                    inflight_bytes: 0,
                },
                Err(status) => {
                    self.release_peer(peer);
                    let e = TransportError::BadEndpoint {
                        endpoint: hex_prefix(&spec.remote.rkey),
                        reason: format!("the peer's remote key: {}", status_text(status)),
                    };
                    return fail(&spec.ops, spec.reply, e);
                }
            },
            UcxMode::PutOnRequest => {
                let request_id = self.next_request;
                self.next_request += 1;
                let now_ns = monotonic_ns();
                let left = spec.deadline.saturating_duration_since(Instant::now()).as_nanos() as u64;
                let message = Request {
                    id: request_id,
                    grant: spec.grant,
                    boot_id: self.boot_id,
                    deadline_ns: now_ns.saturating_add(left),
                    budget_ns: left,
                    arena_base: self.arena_base as u64,
                    arena_len: self.arena_len,
                    address: self.address.clone(),
                    rkey: self.rkey.clone(),
                    entries: spec
                        .ops
                        .iter()
                        .map(|o| (o.index, o.len, o.local_offset))
                        .collect(),
                }
                .encode();
                let Some(p) = self.peers.get(&peer) else {
                    return fail(
                        &spec.ops,
                        spec.reply,
                        TransportError::Io {
                            peer: label,
                            reason: "endpoint vanished".into(),
                        },
                    );
                };
                let param = sys::ucp_request_param_t {
                    op_attr_mask: sys::UCP_OP_ATTR_FIELD_FLAGS,
                    flags: sys::UCP_AM_SEND_FLAG_EAGER,
                    ..Default::default()
                };
                // SAFETY: live endpoint; `message` is kept in the job, unmoved (a Vec's heap
                // buffer does not move with the Vec), until the send completes or is
                // abandoned with the buffer leaked.
                let send = Req::from_ptr(unsafe {
                    sys::ucp_am_send_nbx(
                        p.ep,
                        AM_REQUEST,
                        std::ptr::null(),
                        0,
                        message.as_ptr().cast(),
                        message.len(),
                        &param,
                    )
                });
                PullState::Put {
                    request_id,
                    message,
                    send: Some(send),
                    answer: None,
                }
            }
        };
        self.pulls.push(PullJob {
            peer,
            label,
            deadline: spec.deadline,
            outcome: Outcome::new(spec.reply, &spec.ops),
            ops: spec.ops,
            state,
        });
    }

    fn advance_pulls(&mut self) -> bool {
        let mut busy = false;
        let mut i = 0;
        while i < self.pulls.len() {
            let (progressed, finished) = self.advance_pull(i);
            busy |= progressed || finished;
            if finished {
                let mut job = self.pulls.swap_remove(i);
                self.release_peer(job.peer);
                job.outcome.settle_rest(&TransportError::TimedOut {
                    peer: job.label.clone(),
                });
            } else {
                i += 1;
            }
        }
        busy
    }

    /// (made progress, finished).
    fn advance_pull(&mut self, i: usize) -> (bool, bool) {
        let now = Instant::now();
        let drain = self.cfg.drain;
        let window = self.cfg.window.max(1);
        let (memh, arena_base, progress_idle) = (self.memh, self.arena_base, self.progress_idle);
        let job = &mut self.pulls[i];
        let expired = now >= job.deadline;
        // `peer_dead`: UCX reported the endpoint failed. `peer_failed` also counts an endpoint
        // closed by this side (another pull's last resort), which stops gets but says nothing
        // about a source's writes, which travel on its own endpoint.
        let (peer_dead, peer_failed, peer_errors, ep) = match self.peers.get(&job.peer) {
            Some(p) => (
                p.failed,
                p.failed.or(p.closed.then_some(sys::UCS_ERR_CANCELED)),
                p.peer_errors,
                p.ep,
            ),
            None => (
                Some(sys::UCS_ERR_NOT_CONNECTED),
                Some(sys::UCS_ERR_NOT_CONNECTED),
                false,
                std::ptr::null_mut(),
            ),
        };
        let label = job.label.clone();
        let io = |status: sys::ucs_status_t| TransportError::Io {
            peer: label.clone(),
            reason: status_text(status),
        };
        let mut progressed = false;
        let mut force_close = false;
        let finished = match &mut job.state {
            PullState::Get {
                rkey,
                remote_base,
                next,
                inflight,
                inflight_bytes,
            } => {
                inflight.retain_mut(|(n, req)| match req.poll() {
                    None => true,
                    Some(status) => {
                        progressed = true;
                        *inflight_bytes -= job.ops[*n].len;
                        job.outcome.settle(
                            *n,
                            match status {
                                sys::UCS_OK => Ok(()),
                                // Discarded by the close at the deadline.
                                _ if expired => Err(TransportError::TimedOut { peer: label.clone() }),
                                _ => Err(io(status)),
                            },
                        );
                        false
                    }
                });
                while !expired && peer_failed.is_none() && *next < job.ops.len() && *inflight_bytes < window {
                    let op = job.ops[*next];
                    let param = sys::ucp_request_param_t {
                        op_attr_mask: sys::UCP_OP_ATTR_FIELD_MEMH,
                        memh,
                        ..Default::default()
                    };
                    // SAFETY: live endpoint and rkey (the job holds a claim on the peer); the
                    // destination is the item's reserved slot, inside the registered arena
                    // (a reservation lies within it), which the caller's future keeps reserved
                    // until this job settles the item, and it settles the item once the
                    // request has completed (or, past the drain period, gives up on it: see the
                    // module documentation).
                    let req = Req::from_ptr(unsafe {
                        sys::ucp_get_nbx(
                            ep,
                            arena_base.add(op.local_offset as usize).cast(),
                            op.len as usize,
                            *remote_base + op.remote_offset,
                            *rkey,
                            &param,
                        )
                    });
                    *next += 1;
                    *inflight_bytes += op.len;
                    inflight.push((*next - 1, req));
                    progressed = true;
                }
                if inflight.is_empty() {
                    let stopped_early = *next < job.ops.len();
                    if stopped_early {
                        let e = match peer_failed {
                            Some(s) if !expired => io(s),
                            _ => TransportError::TimedOut { peer: label.clone() },
                        };
                        job.outcome.settle_rest(&e);
                    }
                    true
                } else if !expired || now < job.deadline + drain {
                    // Past the deadline nothing more is issued, and what is in flight (a window
                    // at most) usually lands within the drain period; waiting for it keeps the
                    // endpoint, and the peer's side of it, intact.
                    false
                } else if peer_errors && peer_failed.is_none() {
                    // The last resort: discards the outstanding gets, whose requests then
                    // complete (with an error) on the next progress calls.
                    force_close = true;
                    false
                } else if peer_errors && now < job.deadline + 2 * drain {
                    false
                } else {
                    tracing::error!(
                        peer = %label,
                        outstanding = inflight.len(),
                        "UCX gets still outstanding {drain:?} past the deadline (on an endpoint that \
                         cannot be force-closed, or after closing it); their slots are returned anyway"
                    );
                    for (_, req) in inflight.drain(..) {
                        req.abandon();
                    }
                    true
                }
            }
            PullState::Put {
                message,
                send,
                answer,
                ..
            } => {
                let mut send_failed = None;
                if let Some(req) = send {
                    if let Some(status) = req.poll() {
                        *send = None;
                        progressed = true;
                        if status != sys::UCS_OK {
                            send_failed = Some(status);
                        }
                    }
                }
                // The answer may be seen before the send's own completion; the message buffer
                // is UCX's until then.
                if let (Some(statuses), None) = (answer.as_ref(), &send) {
                    if statuses.len() == job.ops.len() {
                        for (n, (&s, op)) in statuses.iter().zip(&job.ops).enumerate() {
                            job.outcome.settle(n, answer_status(s, op.index, &label));
                        }
                    } else {
                        let e = TransportError::Protocol {
                            peer: label.clone(),
                            reason: format!("{} statuses for {} blocks", statuses.len(), job.ops.len()),
                        };
                        job.outcome.settle_rest(&e);
                    }
                    true
                } else if let Some(status) = send_failed {
                    job.outcome.settle_rest(&io(status));
                    true
                } else if let (Some(status), true) = (peer_dead, progress_idle) {
                    // The source is gone: whatever it wrote before has been processed by the
                    // progress burst that just went idle.
                    if send.is_some() {
                        // Still not completed after the failure: UCX has discarded it or will;
                        // its buffer stays with UCX.
                        if let Some(req) = send.take() {
                            req.abandon();
                        }
                        std::mem::forget(std::mem::take(message));
                    }
                    let e = if expired {
                        TransportError::TimedOut { peer: label.clone() }
                    } else {
                        io(status)
                    };
                    job.outcome.settle_rest(&e);
                    true
                } else if now >= job.deadline + drain {
                    tracing::error!(
                        peer = %label,
                        "UCX source did not confirm the end of its writes {drain:?} past the deadline; \
                         the slots are returned anyway"
                    );
                    if let Some(req) = send.take() {
                        // Not even the request got out: the connection is wedged, and the next
                        // pull is better off with a new one. (An answered-late source keeps its
                        // endpoint: closing it would break the peer's side of the pair too.)
                        req.abandon();
                        std::mem::forget(std::mem::take(message));
                        force_close = peer_errors;
                    }
                    job.outcome
                        .settle_rest(&TransportError::TimedOut { peer: label.clone() });
                    true
                } else {
                    false
                }
            }
        };
        if force_close {
            let peer = job.peer;
            self.close_peer(peer);
            progressed = true;
        }
        (progressed, finished)
    }

    /// A put-on-request message from a puller.
    fn start_serve(&mut self, message: &[u8]) {
        let Some(req) = Request::parse(message) else {
            tracing::warn!(bytes = message.len(), "malformed UCX transfer request ignored");
            return;
        };
        // A stopping transport answers at once, writing nothing.
        let deadline = if self.stopping {
            Instant::now()
        } else {
            req.local_deadline(&self.boot_id, Instant::now(), monotonic_ns())
        };
        let label = format!("ucx-puller:{:?}", req.grant);
        let peer = match self.connect(&req.address, &label) {
            Ok(p) => p,
            Err(status) => {
                tracing::debug!(status = %status_text(status), "no endpoint back to a UCX puller; request dropped");
                return;
            }
        };
        let entry = self.grants.as_ref().and_then(|g| g.get(&req.grant));
        let mut statuses = vec![STATUS_TIMED_OUT; req.entries.len()];
        let mut puts = Vec::new();
        for (n, &(index, len, offset)) in req.entries.iter().enumerate() {
            let Some(e) = &entry else {
                statuses[n] = STATUS_UNKNOWN_GRANT;
                continue;
            };
            let Some(block) = e.block(index) else {
                statuses[n] = STATUS_NO_BLOCK;
                continue;
            };
            let inside = offset.checked_add(len).is_some_and(|end| end <= req.arena_len);
            let remote = req.arena_base.checked_add(offset);
            let (Some(remote), true, true) = (remote, inside, block.len() as u64 == len) else {
                statuses[n] = STATUS_MALFORMED;
                continue;
            };
            puts.push(PutOp {
                entry: n,
                local: block.as_ptr(),
                len,
                remote,
            });
        }
        let rkey = if puts.is_empty() {
            std::ptr::null_mut()
        } else {
            match self.rkey(peer, &req.rkey) {
                Ok(k) => k,
                Err(status) => {
                    tracing::debug!(status = %status_text(status), "a UCX puller's remote key did not unpack");
                    for p in &puts {
                        statuses[p.entry] = STATUS_FAILED;
                    }
                    puts.clear();
                    std::ptr::null_mut()
                }
            }
        };
        self.serves.push(ServeJob {
            peer,
            request_id: req.id,
            deadline,
            _pinned: entry,
            rkey,
            puts,
            statuses,
            next: 0,
            inflight: Vec::new(),
            inflight_bytes: 0,
            phase: ServePhase::Putting,
        });
    }

    fn advance_serves(&mut self) -> bool {
        let mut busy = false;
        let mut i = 0;
        while i < self.serves.len() {
            let (progressed, finished) = self.advance_serve(i);
            busy |= progressed || finished;
            if finished {
                let job = self.serves.swap_remove(i);
                self.release_peer(job.peer);
            } else {
                i += 1;
            }
        }
        busy
    }

    /// (made progress, finished).
    fn advance_serve(&mut self, i: usize) -> (bool, bool) {
        let now = Instant::now();
        let drain = self.cfg.drain;
        let window = self.cfg.window.max(1);
        let memh = self.memh;
        let (ep, peer_ok, peer_errors) = match self.peers.get(&self.serves[i].peer) {
            Some(p) => (p.ep, p.failed.is_none() && !p.closed, p.peer_errors),
            None => (std::ptr::null_mut(), false, false),
        };
        let job = &mut self.serves[i];
        let expired = now >= job.deadline;
        let given_up = now >= job.deadline + drain;
        let mut progressed = false;
        job.inflight.retain_mut(|(n, req)| match req.poll() {
            None => true,
            Some(status) => {
                progressed = true;
                let put = &job.puts[*n];
                job.inflight_bytes -= put.len;
                job.statuses[put.entry] = if status == sys::UCS_OK {
                    STATUS_OK
                } else {
                    STATUS_FAILED
                };
                false
            }
        });
        if !peer_ok {
            // No answer can reach the puller. The endpoint is closed, so what is outstanding
            // completes (with an error) shortly; past the drain period it is left to UCX.
            let mut reqs: Vec<&mut Req> = job.inflight.iter_mut().map(|(_, r)| r).collect();
            match &mut job.phase {
                ServePhase::Putting => {}
                ServePhase::Flushing(r) | ServePhase::Answering(r, _) => reqs.push(r),
            }
            let open = reqs
                .into_iter()
                .filter_map(|r| r.poll().is_none().then_some(()))
                .count();
            if open > 0 && !given_up {
                return (progressed, false);
            }
            job.abandon();
            return (true, true);
        }
        let mut force_close = false;
        let finished = match &mut job.phase {
            ServePhase::Putting => {
                while !expired && job.next < job.puts.len() && job.inflight_bytes < window {
                    let put = &job.puts[job.next];
                    let param = sys::ucp_request_param_t {
                        op_attr_mask: sys::UCP_OP_ATTR_FIELD_MEMH,
                        memh,
                        ..Default::default()
                    };
                    // SAFETY: live endpoint and the puller's rkey unpacked on it (the job holds
                    // a claim on the peer); the source is a granted block inside the registered
                    // arena, pinned by `job._pinned` until the job ends, which is after the
                    // request completes (or is abandoned past the drain period; the arena
                    // stays mapped, so a late read is still of valid memory).
                    let req = Req::from_ptr(unsafe {
                        sys::ucp_put_nbx(
                            ep,
                            put.local.cast(),
                            put.len as usize,
                            put.remote,
                            job.rkey,
                            &param,
                        )
                    });
                    job.inflight_bytes += put.len;
                    job.inflight.push((job.next, req));
                    job.next += 1;
                    progressed = true;
                }
                if job.next == job.puts.len() || expired {
                    progressed = true;
                    if job.next == 0 {
                        send_answer(ep, job);
                    } else {
                        // Every write issued on the endpoint has landed when this completes.
                        let param = sys::ucp_request_param_t::default();
                        // SAFETY: live endpoint; the request is polled and freed via the phase.
                        let req = Req::from_ptr(unsafe { sys::ucp_ep_flush_nbx(ep, &param) });
                        job.phase = ServePhase::Flushing(req);
                    }
                }
                false
            }
            ServePhase::Flushing(req) => match req.poll() {
                Some(status) if status == sys::UCS_OK && job.inflight.is_empty() => {
                    progressed = true;
                    send_answer(ep, job);
                    false
                }
                Some(status) if status != sys::UCS_OK => {
                    // The endpoint broke: the puller hears of it through its own endpoint.
                    progressed = true;
                    force_close = peer_errors;
                    !peer_errors
                }
                _ if given_up => {
                    force_close = peer_errors;
                    !peer_errors
                }
                _ => false,
            },
            ServePhase::Answering(req, _) => match req.poll() {
                Some(_) => true,
                None if given_up => {
                    force_close = peer_errors;
                    !peer_errors
                }
                None => false,
            },
        };
        if force_close {
            let peer = self.serves[i].peer;
            self.close_peer(peer);
            progressed = true;
        }
        if finished && !force_close {
            self.serves[i].abandon();
        }
        (progressed, finished)
    }
}

impl ServeJob {
    /// Leaves whatever is still outstanding to UCX (which frees the requests when they end;
    /// an answer's buffer it may still read is leaked).
    fn abandon(&mut self) {
        for (_, req) in self.inflight.drain(..) {
            req.abandon();
        }
        match std::mem::replace(&mut self.phase, ServePhase::Putting) {
            ServePhase::Putting => {}
            ServePhase::Flushing(r) => r.abandon(),
            ServePhase::Answering(r, buf) => {
                if matches!(r, Req::Pending(_)) {
                    std::mem::forget(buf);
                }
                r.abandon();
            }
        }
    }
}

/// Sends a serve job's answer (its statuses as they stand) and moves it to answering.
fn send_answer(ep: sys::ucp_ep_h, job: &mut ServeJob) {
    let buf = encode_answer(job.request_id, &job.statuses);
    let param = sys::ucp_request_param_t {
        op_attr_mask: sys::UCP_OP_ATTR_FIELD_FLAGS,
        flags: sys::UCP_AM_SEND_FLAG_EAGER,
        ..Default::default()
    };
    // SAFETY: live endpoint (the job holds a claim on it); `buf` moves into the phase with its
    // heap buffer in place and stays there until the send completes, or is leaked when the
    // send is abandoned.
    let req = Req::from_ptr(unsafe {
        sys::ucp_am_send_nbx(
            ep,
            AM_ANSWER,
            std::ptr::null(),
            0,
            buf.as_ptr().cast(),
            buf.len(),
            &param,
        )
    });
    job.phase = ServePhase::Answering(req, buf);
}

/// What a put-on-request answer's status means for the puller.
fn answer_status(status: u8, index: u32, label: &str) -> Result<(), TransportError> {
    let peer = label.to_owned();
    match status {
        STATUS_OK => Ok(()),
        STATUS_NO_BLOCK => Err(TransportError::Protocol {
            peer,
            reason: format!("block {index} is not in the grant"),
        }),
        STATUS_UNKNOWN_GRANT => Err(TransportError::UnknownGrant { peer }),
        STATUS_MALFORMED => Err(TransportError::Protocol {
            peer,
            reason: format!("the source refused the entry for block {index} (length or slot)"),
        }),
        STATUS_TIMED_OUT => Err(TransportError::TimedOut { peer }),
        STATUS_FAILED => Err(TransportError::Io {
            peer,
            reason: format!("the source's write of block {index} failed"),
        }),
        other => Err(TransportError::Protocol {
            peer,
            reason: format!("answer status {other} for block {index}"),
        }),
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // From here on nobody signals the worker.
        for cmd in self.mailbox.close() {
            if let Command::Pull(spec) = cmd {
                let e = TransportError::Io {
                    peer: spec.remote.label(),
                    reason: "the UCX transport is shutting down".into(),
                };
                refuse(&spec.ops, &spec.reply, &e);
            }
        }
        if !self.worker.is_null() {
            // Transfers still here were cut short without the orderly stop of `run`.
            for mut job in self.pulls.drain(..) {
                match job.state {
                    PullState::Get { inflight, .. } => inflight.into_iter().for_each(|(_, r)| r.abandon()),
                    PullState::Put { message, send, .. } => {
                        if let Some(r) = send {
                            std::mem::forget(message);
                            r.abandon();
                        }
                    }
                }
                let e = TransportError::Io {
                    peer: job.label.clone(),
                    reason: "the UCX transport is shutting down".into(),
                };
                job.outcome.settle_rest(&e);
            }
            for mut job in self.serves.drain(..) {
                job.abandon();
            }
            // UCX's own operations (answers to a peer's emulated gets and puts) finish while
            // the worker is progressed; a worker destroyed under them leaks their requests.
            let until = Instant::now() + self.cfg.drain.min(SHUTDOWN_SETTLE);
            let mut quiet_since = Instant::now();
            while Instant::now() < until && quiet_since.elapsed() < SHUTDOWN_QUIET {
                // SAFETY: live worker, this thread.
                if unsafe { sys::ucp_worker_progress(self.worker) } != 0 {
                    quiet_since = Instant::now();
                }
            }
            let ids: Vec<PeerId> = self.peers.keys().copied().collect();
            for id in ids {
                self.close_peer(id);
            }
            let until = Instant::now() + self.cfg.drain;
            while !self.closing.is_empty() && Instant::now() < until {
                // SAFETY: live worker, this thread.
                unsafe { sys::ucp_worker_progress(self.worker) };
                self.closing.retain_mut(|r| r.poll().is_none());
            }
            for r in self.closing.drain(..) {
                r.abandon();
            }
            for (_, p) in self.peers.drain() {
                for (_, k) in p.rkeys {
                    // SAFETY: unpacked on this worker's endpoint, no operation left that uses
                    // it; destroyed once.
                    unsafe { sys::ucp_rkey_destroy(k) };
                }
            }
        }
        if !self.memh.is_null() {
            // SAFETY: mapped on this context, unmapped once; the arena itself stays mapped
            // (the store outlives this call).
            unsafe { sys::ucp_mem_unmap(self.context, self.memh) };
        }
        if !self.worker.is_null() {
            // SAFETY: created on this thread, destroyed once, after its endpoints; the mailbox
            // no longer hands it out for signalling.
            unsafe { sys::ucp_worker_destroy(self.worker) };
        }
        if !self.context.is_null() {
            // SAFETY: the context's only worker and registration are gone; cleaned up once.
            unsafe { sys::ucp_cleanup(self.context) };
        }
    }
}

#[cfg(test)]
mod tests;

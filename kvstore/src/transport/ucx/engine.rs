//! The engine that owns every UCX object, the lock under which one thread at a time drives it
//! (the progress thread, or a pulling thread running a small pull itself), the mailbox through
//! which other threads reach it, and UCX's callbacks.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::mpsc;
use ucx_sys as sys;

use super::wire::{
    AM_ANSWER, AM_BLOCK, AM_REQUEST, BLOCK_HEADER, RemoteEndpoint, parse_answer, parse_block_header,
};
use super::{UcxConfig, UcxMode, WEDGED_AFTER, shared_memory_only, status_text, tcp_only, unavailable};
use crate::store::TieredStore;
use crate::transport::TransportError;
use crate::transport::grants::{GrantEntry, GrantId, Grants};

mod pull;
mod serve;

/// Longest the progress thread sleeps while operations are in flight: a safety net should a
/// transport fail to signal the worker's event fd.
const IN_FLIGHT_NAP: Duration = Duration::from_millis(10);
/// Longest the progress thread sleeps while idle. UCX's shared-memory transport wakes a
/// sleeping receiver through its FIFO: the receiver marks the FIFO's head as armed before it
/// sleeps, and the next sender, whose claim of an element clears the mark, signals it once it
/// has written the element. A sender killed between its claim and its signal (a puller killed
/// as its pull starts) leaves the receiver asleep with the mark cleared, so no later sender
/// signals either: its messages wait, unread, until something else wakes the worker. Waking
/// every so often bounds that wait; ten times a second costs nothing measurable.
const IDLE_NAP: Duration = Duration::from_millis(100);
/// Longest a stopping worker is progressed for UCX's own operations to finish.
const SHUTDOWN_SETTLE: Duration = Duration::from_millis(200);
/// How long without progress counts as settled.
const SHUTDOWN_QUIET: Duration = Duration::from_millis(5);
/// Progress calls per turn of the progress loop before the mailbox is looked at again.
const PROGRESS_BURST: usize = 64;
/// Bytes of gets, or of receives of sent blocks, that a pull starts per turn of the engine (at
/// least one block). Over shared memory UCX copies a block while it is started or progressed,
/// and the block is checksummed as soon as it is settled, the turn after (by this thread for
/// gets, else by the pulling thread); a few blocks per turn keep each block in cache from its
/// copy to its checksum, where a window copied whole and checked after ran at 11–12 GB/s
/// against 14–16 for one block at a time (CMA, 1–4 MiB blocks). RDMA NICs keep many gets in
/// flight all the same: a turn takes microseconds. Where pulled blocks are not checked
/// ([`UcxConfig::verify`](super::UcxConfig::verify)) the pacing stays, unmeasured without the
/// checks.
const TURN_BYTES: u64 = 256 << 10;

/// One block of a pull, as the progress thread sees it (the slot itself stays with the
/// caller's future).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OpSpec {
    /// Position in the pull's items.
    pub(super) item: usize,
    pub(super) index: u32,
    pub(super) len: u64,
    pub(super) local_offset: u64,
    pub(super) remote_offset: u64,
}

/// What the engine made of an item (by position), as soon as it is known: that its block
/// landed in its slot, with, for gets, the checksum of those bytes (computed by the thread
/// that copied them, right after the copy, while they are in that core's cache), or why it
/// did not. The caller compares the checksum with the grant's, or computes it itself where
/// none came (neither where [`UcxConfig::verify`](super::UcxConfig::verify) is off, and no
/// checksum comes then). The channel closes once every run of the pull (one per lane it went
/// to) is over and the pulling task has dropped its own sender.
///
/// Results go in batches, at most one per pull and turn of the engine: a message per block
/// woke the pulling task (a third thread on two busy cores) once per 64 KiB block.
type Settled = mpsc::UnboundedSender<Vec<Settlement>>;
/// The receiving end of [`Settled`].
pub(super) type Receiver = mpsc::UnboundedReceiver<Vec<Settlement>>;
/// An item's position, and what became of its block (with the checksum, for gets where
/// pulled blocks are checked).
pub(super) type Settlement = (usize, Result<Option<u64>, TransportError>);

/// 64 random bits from the kernel: the id of a put- or send-on-request pull (see
/// `Engine::next_request`).
pub(super) fn random_request_id() -> u64 {
    let [a, b, c, d, e, f, g, h, ..] = crate::transport::auth::random_nonce();
    u64::from_le_bytes([a, b, c, d, e, f, g, h])
}

/// Why the pulls a stopping transport never started fail.
const SHUTTING_DOWN: &str = "the UCX transport is shutting down";

/// The error of a pull the transport never started because it is stopping.
fn shutting_down(spec: &PullSpec) -> TransportError {
    TransportError::Io {
        peer: spec.remote.label(),
        reason: SHUTTING_DOWN.into(),
    }
}

/// Fails every op of a transfer that never started.
fn refuse(ops: &[OpSpec], reply: &Settled, e: &TransportError) {
    let _ = reply.send(ops.iter().map(|o| (o.item, Err(e.clone()))).collect());
}

/// A started pull's results, each sent once.
#[derive(Debug)]
struct Outcome {
    reply: Settled,
    /// Per op: its item's position, and whether its result went out.
    items: Vec<usize>,
    done: Vec<bool>,
    /// Per op: its slot's address and length, when this thread checksums what lands (else
    /// the caller does, or nobody where pulled blocks are not checked).
    slots: Option<Vec<(*const u8, usize)>>,
    /// Settled and not yet sent (see [`Outcome::flush`]).
    pending: Vec<Settlement>,
}

impl Outcome {
    /// `arena_base`: the start of the registered arena the ops' slots lie in, when the engine
    /// checksums what lands (`None`: the caller does, or nobody where pulled blocks are not
    /// checked).
    fn new(reply: Settled, ops: &[OpSpec], arena_base: Option<*const u8>) -> Self {
        Self {
            reply,
            items: ops.iter().map(|o| o.item).collect(),
            done: vec![false; ops.len()],
            // `wrapping_add`: only an address; it is read once the op has landed (see `settle`).
            slots: arena_base.map(|base| {
                ops.iter()
                    .map(|o| (base.wrapping_add(o.local_offset as usize), o.len as usize))
                    .collect()
            }),
            pending: Vec::new(),
        }
    }

    /// Sends what was settled since the last call, in one message.
    fn flush(&mut self) {
        if !self.pending.is_empty() {
            let _ = self.reply.send(std::mem::take(&mut self.pending));
        }
    }

    /// Settles `op`: `Ok` once its block has landed in its slot, which is checksummed here for
    /// gets where pulled blocks are checked (the only outcomes created with slots).
    fn settle(&mut self, op: usize, r: Result<(), TransportError>) {
        if !std::mem::replace(&mut self.done[op], true) {
            let r = r.map(|()| {
                self.slots.as_ref().map(|slots| {
                    let (addr, len) = slots[op];
                    // SAFETY: the op's slot is a reservation inside the mapped arena (`ops`
                    // came from reservations the caller's future holds until this op is
                    // settled, which is now). Slots are kept for gets only, and `Ok` for a get
                    // means its request completed: nothing of this process writes the slot
                    // until the caller has the result.
                    let bytes = unsafe { std::slice::from_raw_parts(addr, len) };
                    crate::block::checksum(bytes)
                })
            });
            self.pending.push((self.items[op], r));
        }
    }

    /// Settles every op still open with `e`.
    fn settle_rest(&mut self, e: &TransportError) {
        for op in 0..self.done.len() {
            self.settle(op, Err(e.clone()));
        }
    }
}

/// Whatever was settled last goes out as the pull ends, on every path.
impl Drop for Outcome {
    fn drop(&mut self) {
        self.flush();
    }
}

#[derive(Debug)]
pub(super) struct PullSpec {
    pub(super) remote: RemoteEndpoint,
    pub(super) grant: GrantId,
    pub(super) mode: UcxMode,
    /// The progress thread sleeps between this pull's arrivals rather than polling (see
    /// [`super::SLEEP_BETWEEN_BLOCKS_FROM`]).
    pub(super) sleeps: bool,
    /// With [`UcxMode::SendOnRequest`]: the source is asked to send small blocks eagerly (see
    /// [`super::EAGER_BLOCKS_UP_TO`]).
    pub(super) eager: bool,
    pub(super) ops: Vec<OpSpec>,
    pub(super) deadline: Instant,
    pub(super) reply: Settled,
}

#[derive(Debug)]
pub(super) enum Command {
    Pull(PullSpec),
    Stop,
}

/// Where other threads leave commands for the progress thread (or for a pulling thread that
/// drives the worker).
#[derive(Debug, Default)]
pub(super) struct Mailbox {
    inner: Mutex<MailboxInner>,
    /// Tests: commands taken by whichever thread drove the worker, read without its lock.
    #[cfg(test)]
    pub(super) taken: AtomicUsize,
}

#[derive(Debug, Default)]
struct MailboxInner {
    commands: Vec<Command>,
    /// The worker to wake; `None` before it exists and once it is being destroyed.
    worker: Option<WorkerWaker>,
    /// A wedged worker is being replaced: commands are kept for the next one.
    paused: bool,
}

/// A worker handle that is only ever used to call `ucp_worker_signal`.
#[derive(Debug, Clone, Copy)]
struct WorkerWaker(sys::ucp_worker_h);

// SAFETY: the handle is only used for ucp_worker_signal, which UCX documents as safe from any
// thread whatever the worker's thread mode; the mailbox lock keeps it from being used once the
// progress thread has started destroying the worker (see `Mailbox::close`).
unsafe impl Send for WorkerWaker {}

impl MailboxInner {
    /// Signals the worker, if it still exists. Called under the mailbox lock, so that the
    /// worker cannot be destroyed in between.
    fn signal(&self) {
        if let Some(waker) = self.worker {
            // SAFETY: the worker is alive while the mailbox holds it (it is taken out, under the
            // mailbox lock that the caller holds, before ucp_worker_destroy), and
            // ucp_worker_signal is thread-safe.
            let status = unsafe { sys::ucp_worker_signal(waker.0) };
            if status != sys::UCS_OK {
                tracing::warn!(status = %status_text(status), "waking the UCX progress thread");
            }
        }
    }
}

impl Mailbox {
    /// Leaves a command and wakes the worker; `false` (the command dropped) when the progress
    /// thread is not running.
    #[must_use]
    pub(super) fn post(&self, cmd: Command) -> bool {
        let mut inner = self.inner.lock();
        if inner.worker.is_none() && !inner.paused {
            return false;
        }
        inner.commands.push(cmd);
        inner.signal();
        true
    }

    /// Wakes the progress thread (to rearm the worker's event fd).
    pub(super) fn wake(&self) {
        self.inner.lock().signal();
    }

    fn open(&self, worker: sys::ucp_worker_h) {
        let mut inner = self.inner.lock();
        inner.worker = Some(WorkerWaker(worker));
        inner.paused = false;
    }

    /// Stops waking the worker, which is about to be destroyed, and keeps the commands that
    /// come meanwhile for the worker that replaces it ([`Mailbox::open`]).
    fn pause(&self) {
        let mut inner = self.inner.lock();
        inner.worker = None;
        inner.paused = true;
    }

    fn take(&self) -> Vec<Command> {
        let commands = std::mem::take(&mut self.inner.lock().commands);
        #[cfg(test)]
        self.taken.fetch_add(commands.len(), Ordering::AcqRel);
        commands
    }

    /// Stops accepting commands, and fails the pulls not yet taken with `error`.
    pub(super) fn close_refusing(&self, error: impl Fn(&PullSpec) -> TransportError) {
        let queued = {
            let mut inner = self.inner.lock();
            inner.worker = None;
            inner.paused = false;
            std::mem::take(&mut inner.commands)
        };
        for cmd in queued {
            if let Command::Pull(spec) = cmd {
                refuse(&spec.ops, &spec.reply, &error(&spec));
            }
        }
    }
}

/// What UCX callbacks leave for the progress loop (they run inside `ucp_worker_progress`, on
/// the thread that holds the engine).
#[derive(Debug, Default)]
struct Inbox {
    requests: Vec<Vec<u8>>,
    answers: Vec<Vec<u8>>,
    blocks: Vec<BlockArrival>,
    /// The engine is being torn down: block messages are refused.
    closed: bool,
    /// Endpoints UCX reported as failed (the handle's address, the status).
    failed: Vec<(usize, sys::ucs_status_t)>,
}

/// A block a source sent on request ([`AM_BLOCK`]).
#[derive(Debug)]
pub(super) struct BlockArrival {
    pub(super) request: u64,
    pub(super) entry: u32,
    pub(super) data: BlockData,
}

#[derive(Debug)]
pub(super) enum BlockData {
    /// A rendezvous descriptor UCX keeps until it is received into a slot
    /// (`ucp_am_recv_data_nbx`) or released (`ucp_am_data_release`); the length is the
    /// block's.
    Rndv(*mut c_void, usize),
    /// The bytes, where UCX sent the block eagerly after all.
    Eager(Vec<u8>),
}

/// Borrows the inbox behind a callback's `arg`.
///
/// # Safety
/// `arg` must be the pointer the engine registered: its `Box<RefCell<Inbox>>`, which outlives
/// the worker.
unsafe fn inbox<'a>(arg: *mut c_void) -> &'a RefCell<Inbox> {
    // SAFETY: per the function's contract `arg` points to a live RefCell<Inbox>; callbacks run
    // inside ucp_worker_progress, on the one thread that holds the engine, so shared access is
    // not concurrent.
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

/// UCX's handler of [`AM_BLOCK`] messages: the block is left in the inbox, a rendezvous one
/// as its descriptor (received or released by the engine after the progress call).
///
/// # Safety
/// As for [`on_request`].
unsafe extern "C" fn on_block(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    // SAFETY: UCX passes a valid parameter struct for the duration of the callback.
    let rndv = unsafe { (*param).recv_attr } & u64::from(sys::UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    // A refused rendezvous message fails the sender's send with the status returned; a
    // refused eager one is dropped.
    let refused = if rndv {
        sys::UCS_ERR_INVALID_PARAM
    } else {
        sys::UCS_OK
    };
    let parsed = if header_length == BLOCK_HEADER && !header.is_null() {
        // SAFETY: UCX passes `header_length` readable header bytes at `header`, valid for the
        // duration of the callback.
        parse_block_header(unsafe { std::slice::from_raw_parts(header.cast::<u8>(), header_length) })
    } else {
        None
    };
    let Some((request, entry)) = parsed else {
        return refused;
    };
    // SAFETY: per this function's contract, `arg` is the registered inbox.
    let Ok(mut inbox) = (unsafe { inbox(arg) }).try_borrow_mut() else {
        return refused;
    };
    if inbox.closed {
        return refused;
    }
    let data = if rndv {
        BlockData::Rndv(data, length)
    } else if length == 0 {
        BlockData::Eager(Vec::new())
    } else {
        // SAFETY: without the RNDV flag, `data` points to `length` received bytes that stay
        // valid until the callback returns.
        BlockData::Eager(unsafe { std::slice::from_raw_parts(data.cast::<u8>(), length) }.to_vec())
    };
    inbox.blocks.push(BlockArrival { request, entry, data });
    if rndv { sys::UCS_INPROGRESS } else { sys::UCS_OK }
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
pub(super) struct PullJob {
    peer: PeerId,
    label: String,
    deadline: Instant,
    /// See [`PullSpec::sleeps`].
    sleeps: bool,
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
    /// Put- or send-on-request: a request, and the source's answer.
    Put {
        request_id: u64,
        /// The request message; UCX reads it until `send` completes.
        message: Vec<u8>,
        send: Option<Req>,
        /// (the blocks were sent rather than written, a status per op).
        answer: Option<(bool, Vec<u8>)>,
        /// Send-on-request: the blocks received into their slots.
        receives: Option<Receives>,
    },
}

/// The blocks of a send-on-request pull, which this side's UCX fetches into their slots.
#[derive(Debug)]
pub(super) struct Receives {
    /// (op, receive) in flight: the op's slot is being written.
    inflight: Vec<(usize, Req)>,
    /// (op, block) that came and are yet to be received, a turn's bytes at a time (see
    /// [`TURN_BYTES`]).
    queued: std::collections::VecDeque<(usize, BlockData)>,
    /// Per op: its block message came (a second one is refused).
    arrived: Vec<bool>,
    /// The source was asked to send the small blocks eagerly.
    eager: bool,
}

/// The source's side of a put- or send-on-request transfer.
#[derive(Debug)]
pub(super) struct ServeJob {
    peer: PeerId,
    request_id: u64,
    deadline: Instant,
    /// Keeps the granted blocks pinned while they are written from.
    _pinned: Option<Arc<GrantEntry>>,
    rkey: sys::ucp_rkey_h,
    puts: Vec<PutOp>,
    /// The puts each write or send covers: runs of [`super::write_runs`] for writes, one
    /// block each for sends.
    runs: Vec<std::ops::Range<usize>>,
    statuses: Vec<u8>,
    /// The next run to issue.
    next: usize,
    /// (run, request) in flight.
    inflight: Vec<(std::ops::Range<usize>, Req)>,
    inflight_bytes: u64,
    phase: ServePhase,
    /// Send-on-request: the [`AM_BLOCK`] header of each op, allocated once so that each
    /// stays in place while UCX may read it.
    headers: Option<Vec<[u8; BLOCK_HEADER]>>,
}

#[derive(Debug)]
struct PutOp {
    /// Position in the request's list.
    entry: usize,
    local: *const u8,
    len: u64,
    remote: u64,
    /// Sent eagerly (the puller asked, and the block is small: see
    /// [`super::EAGER_BLOCKS_UP_TO`]).
    eager: bool,
}

#[derive(Debug)]
enum ServePhase {
    Putting,
    Flushing(Req),
    Answering(Req, Vec<u8>),
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

/// A wait on the worker's event fd, armed while the engine was held and made without it.
#[derive(Debug)]
struct Wait {
    efd: libc::c_int,
    timeout: Option<Duration>,
}

impl Wait {
    fn block(&self) {
        let ms = self.timeout.map_or(-1, |t| {
            t.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
        });
        let mut fd = libc::pollfd {
            fd: self.efd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd. The fd belongs to the worker, which only the progress
        // thread destroys, and not while it waits here.
        unsafe { libc::poll(&mut fd, 1, ms) };
    }
}

/// Tells a wedged worker from a busy one.
///
/// UCX's shared-memory transport (posix, sysv) receives through one FIFO that every peer on
/// the host writes into: a sender claims the next element (an atomic step of the FIFO's head),
/// fills it, then marks it written. A peer killed between the two (a puller killed as its pull
/// starts) leaves an element that is never marked, and the receiver, which reads in order,
/// never gets past it: nothing more arrives over shared memory from any peer, while
/// `ucp_worker_arm` keeps reporting the unread element (the head is ahead of the reader), so
/// the progress thread can neither sleep nor progress and spins. A send queued to a dead
/// peer's full FIFO holds `ucp_worker_arm` the same way. Neither ends by itself, and UCX
/// reports neither (shared memory has no peer failure detection), so a worker that has been
/// unable to sleep for [`WEDGED_AFTER`] while progressing it did nothing is replaced: a new
/// worker has a new FIFO and a new address, which the grants made from then on carry. Only the
/// transfers in flight on the old worker fail (and are recomputed); pulls queued meanwhile go
/// to the new one.
#[derive(Debug, Default)]
pub(super) struct WedgeWatch {
    /// Since when every attempt to sleep found events pending and no turn did anything.
    since: Option<Instant>,
}

impl WedgeWatch {
    /// The worker did something, or slept.
    pub(super) fn clear(&mut self) {
        self.since = None;
    }

    /// A turn did nothing and the worker could not sleep at `now`: whether that has gone on
    /// for [`WEDGED_AFTER`].
    pub(super) fn cannot_sleep(&mut self, now: Instant) -> bool {
        now.saturating_duration_since(*self.since.get_or_insert(now)) >= WEDGED_AFTER
    }
}

/// The engine and who drives it. Whoever holds the lock drives the worker: the progress thread
/// between its waits, or a pulling thread that starts a small pull and progresses the worker
/// until the pull is over (or its budget has passed), which spares the pull the hand-off to
/// the progress thread and the wake-up of the pulling task (two thread wake-ups, most of a
/// one-block shared-memory pull). One pulling thread drives at a time ([`EngineCell::drive`]).
/// The progress thread takes the engine out and drops it when it stops; `None` then.
#[derive(Debug, Default)]
pub(super) struct EngineCell {
    engine: Mutex<Option<Engine>>,
    /// Threads waiting for the lock (pulling threads that are to drive their pulls, or a
    /// test's look at the engine): the progress thread leaves it to them, and a pulling
    /// thread that drives its pull steps aside for them (see [`EngineCell::drive`]).
    waiting: AtomicUsize,
    /// The progress thread is (about to be) waiting on the event fd it armed: a thread that
    /// drove the worker meanwhile may have consumed the events that fd was armed for, and
    /// signals the worker so that the progress thread rearms it.
    asleep: AtomicBool,
    /// A pulling thread stopped driving the worker with pulls still in flight (its own rest,
    /// pulls that came through the mailbox meanwhile, or the progress thread's own): activity,
    /// as far as the progress thread's polling goes.
    handed_off: AtomicBool,
    /// A pulling thread holds the lock to drive the worker (see [`EngineCell::drive`]).
    driving: AtomicBool,
    /// Tests: the worker counts as unable to sleep until it is replaced.
    #[cfg(test)]
    pub(super) fake_wedge: AtomicBool,
    /// Tests: a pulling thread drives its pull past its budget (until it is over or another
    /// thread waits for the lock).
    #[cfg(test)]
    pub(super) drive_past_budget: AtomicBool,
    /// Tests: pulls (or a lane's runs of them) that a pulling thread started to drive itself
    /// ([`driven_inline`](super::driven_inline)), whether or not it drove them to their end;
    /// counted before its first turn, and read without the lock.
    #[cfg(test)]
    pub(super) drives_started: AtomicUsize,
    /// Tests: pulls that were to be driven but came back [`Driven::Busy`], read without the
    /// lock.
    #[cfg(test)]
    pub(super) drives_refused_busy: AtomicUsize,
}

/// What a pulling thread made of driving a pull itself.
#[derive(Debug)]
pub(super) enum Driven {
    /// The pull started on the caller's thread and is over or carried on by the progress
    /// thread; its results come on its channel.
    Started,
    /// The engine has stopped; the spec comes back unstarted.
    Stopped(PullSpec),
    /// Another pulling thread drives the worker, and the caller asked not to wait for it
    /// (`post_if_driven`); the spec comes back unstarted, for the mailbox, whose commands
    /// that thread's turns take (or the progress thread's, once that thread has left).
    Busy(PullSpec),
}

/// [`EngineCell::driving`] while a pulling thread drives the worker: cleared when dropped,
/// which a panic of the driving thread does too (else every later pull that would be driven
/// went to the mailbox).
struct DrivingFlag<'a>(&'a AtomicBool);

impl<'a> DrivingFlag<'a> {
    fn raise(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Release);
        Self(flag)
    }
}

impl Drop for DrivingFlag<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl EngineCell {
    pub(super) fn new(engine: Engine) -> Self {
        Self {
            engine: Mutex::new(Some(engine)),
            ..Self::default()
        }
    }

    /// The progress loop, until a stop command and the end of the transfers it cut short (the
    /// engine is then dropped, on this thread: `None`) or until the worker is found wedged
    /// ([`WedgeWatch`]: the engine, taken out of the cell, for the caller to replace).
    pub(super) fn run(&self) -> Option<Engine> {
        let mut last_busy = Instant::now();
        let mut wedge = WedgeWatch::default();
        loop {
            // A pulling thread that waits for the engine gets it before the next turn (the lock
            // is not fair, and this loop would take it back at once).
            if self.waiting.load(Ordering::Acquire) > 0 {
                std::thread::yield_now();
                continue;
            }
            let mut slot = self.engine.lock();
            let engine = slot.as_mut()?;
            let busy = engine.turn() | self.handed_off.swap(false, Ordering::AcqRel);
            if engine.stopping && engine.pulls.is_empty() && engine.serves.is_empty() {
                let engine = slot.take();
                drop(slot);
                drop(engine);
                return None;
            }
            let now = Instant::now();
            if busy {
                last_busy = now;
                wedge.clear();
            } else if now.duration_since(last_busy) < engine.spin() {
                drop(slot);
                std::hint::spin_loop();
            } else {
                #[cfg(test)]
                if now.duration_since(last_busy) < engine.cfg.spin {
                    engine.early_sleeps += 1;
                }
                let limit = engine.sleep_limit(now);
                let wait = engine.arm(Some(limit));
                #[cfg(test)]
                let wait = wait.filter(|_| !self.fake_wedge.load(Ordering::Acquire));
                if let Some(wait) = wait {
                    wedge.clear();
                    self.asleep.store(true, Ordering::Release);
                    drop(slot);
                    wait.block();
                    self.asleep.store(false, Ordering::Release);
                } else if wedge.cannot_sleep(now) && !engine.stopping {
                    #[cfg(test)]
                    self.fake_wedge.store(false, Ordering::Release);
                    return slot.take();
                }
            }
        }
    }

    /// Puts a new engine in place of the one [`EngineCell::run`] gave back.
    pub(super) fn replace(&self, engine: Engine) {
        *self.engine.lock() = Some(engine);
    }

    /// Whether a pulling thread drives the worker.
    #[cfg(test)]
    pub(super) fn driven(&self) -> bool {
        self.driving.load(Ordering::Acquire)
    }

    /// `f` of the engine, once the progress thread steps aside (the default once it has
    /// ended); a pulling thread that drives its pull meanwhile steps aside too, as for another
    /// pulling thread.
    #[cfg(test)]
    pub(super) fn with<T: Default>(&self, f: impl FnOnce(&Engine) -> T) -> T {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let slot = self.engine.lock();
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        slot.as_ref().map(f).unwrap_or_default()
    }

    /// Starts `spec` on the calling thread and progresses the worker, a turn at least, until
    /// it is over, `budget` has passed or another thread waits for the lock; the progress
    /// thread (or the thread that waits, whose turns progress every pull of the worker)
    /// carries on with whatever is left. Results go to `on_settled` as they come, between
    /// turns (the rest land on `settled` as usual).
    ///
    /// Where another pulling thread drives the worker already, this one waits for it to step
    /// aside after its turn and then drives its own pull, and with it the other's rest, which
    /// that thread's pulling task now gets over its channel; with `post_if_driven`, the spec
    /// comes back instead ([`Driven::Busy`]) for the mailbox, which the driving thread's turns
    /// take it from (the progress thread's, once that thread has left): they progress it with
    /// their own pull until that is over or its budget has passed, and the progress thread
    /// carries on with the rest. Either way one of the two pulls' results cross threads. Four
    /// pulls at once on one transport (`kvbench transfer --pulls-at-once 4`, UCX 1.23, 2-core
    /// VM, runs of each alternated with a build that switched between the two): over shared
    /// memory posting ran one 64 KiB block each at 2.4–2.6 GB/s together against 2.2 waiting,
    /// 16 of them at 7.0–7.6 against 5.0–6.2, one of 1 MiB at 11.4 against 9.6–10.3 (two runs
    /// each); over TCP alone waiting ran single blocks of 64 KiB–1 MiB 4–11 % faster by the
    /// medians of three and four runs (within the spread between runs there), 16 of them
    /// alike. The caller decides by what UCX may use (`UCX_TLS`), not by the peer: where it
    /// may use shared memory, pulls from other nodes, over TCP or RDMA, post too (over RDMA
    /// neither way is measured).
    pub(super) fn drive(
        &self,
        spec: PullSpec,
        budget: Duration,
        post_if_driven: bool,
        mailbox: &Mailbox,
        settled: &mut Receiver,
        on_settled: &mut dyn FnMut(usize, Result<Option<u64>, TransportError>),
    ) -> Driven {
        if post_if_driven && self.driving.load(Ordering::Acquire) {
            #[cfg(test)]
            self.drives_refused_busy.fetch_add(1, Ordering::AcqRel);
            return Driven::Busy(spec);
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let mut slot = self.engine.lock();
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        let Some(engine) = slot.as_mut().filter(|e| !e.stopping) else {
            return Driven::Stopped(spec);
        };
        // Declared after the lock's guard, so lowered before the lock is let go, on a panic
        // too.
        let driving = DrivingFlag::raise(&self.driving);
        let until = Instant::now() + budget;
        let reply = spec.reply.clone();
        engine.start_pull(spec);
        #[cfg(test)]
        self.drives_started.fetch_add(1, Ordering::AcqRel);
        // Over once this lane has no job of this pull's channel (other lanes' runs and the
        // pulling future hold senders too, so the channel itself may stay open).
        let over = |engine: &Engine| !engine.pulls.iter().any(|p| p.outcome.reply.same_channel(&reply));
        #[cfg(not(test))]
        let within_budget = || Instant::now() < until;
        #[cfg(test)]
        let within_budget = || Instant::now() < until || self.drive_past_budget.load(Ordering::Acquire);
        // A turn at least, so that a chain of pulling threads, each arriving while another
        // waits, still moves the worker on.
        loop {
            engine.turn();
            while let Ok(batch) = settled.try_recv() {
                for (n, r) in batch {
                    on_settled(n, r);
                }
            }
            if over(engine) || !within_budget() || self.waiting.load(Ordering::Acquire) > 0 {
                break;
            }
        }
        // This pull's rest, or pulls that came through the mailbox meanwhile.
        let handed_off = !engine.pulls.is_empty();
        drop(reply);
        if handed_off {
            // The progress thread has seen no activity while the pull ran here: without this
            // it would take the rest for an idle worker and sleep between its events.
            self.handed_off.store(true, Ordering::Release);
        }
        drop(driving);
        drop(slot);
        if self.asleep.load(Ordering::Acquire) {
            mailbox.wake();
        }
        Driven::Started
    }
}

/// All UCX state; driven by one thread at a time, whichever holds its [`EngineCell`].
#[derive(Debug)]
pub(super) struct Engine {
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
    pub(super) endpoint: Vec<u8>,
    pub(super) name: String,
    boot_id: [u8; 16],
    grants: Option<Arc<Grants>>,
    cfg: UcxConfig,
    mailbox: Arc<Mailbox>,
    peers: HashMap<PeerId, Peer>,
    by_address: HashMap<Vec<u8>, PeerId>,
    next_peer: PeerId,
    /// The id of this engine's next put- or send-on-request pull. Each id is drawn at random
    /// ([`random_request_id`]), so that a peer cannot name a request it did not see in the
    /// block messages or answers it sends (having seen one tells nothing of the next): where
    /// pulled blocks are not checked ([`UcxConfig::verify`](super::UcxConfig::verify)) the id
    /// is what keeps another peer's messages out of a pull.
    pub(super) next_request: u64,
    pub(super) pulls: Vec<PullJob>,
    pub(super) serves: Vec<ServeJob>,
    closing: Vec<Req>,
    pub(super) stopping: bool,
    /// The worker was found wedged ([`WedgeWatch`]) and another replaces it: commands wait
    /// for that one rather than being refused.
    pub(super) replaced: bool,
    /// UCX refused `UCP_ERR_HANDLING_MODE_PEER` with the transports it may use.
    no_peer_errors: bool,
    /// `UCX_TLS` may let UCX use shared memory (it does not limit UCX to TCP).
    may_use_shared_memory: bool,
    /// Whether the last progress burst ended because the worker had nothing more to do.
    progress_idle: bool,
    /// Block messages given back unreceived.
    #[cfg(test)]
    pub(super) refused_blocks: usize,
    /// Requests this engine served by sending.
    #[cfg(test)]
    pub(super) served_sends: usize,
    /// Blocks this engine set out to send eagerly.
    #[cfg(test)]
    pub(super) served_eager: usize,
    /// Writes (runs of blocks) this engine set out to make as a source.
    #[cfg(test)]
    pub(super) served_writes: usize,
    /// Blocks that came to this engine's pulls eagerly, bytes and all.
    #[cfg(test)]
    pub(super) eager_arrivals: usize,
    /// Times the progress thread slept sooner than [`UcxConfig::spin`](super::UcxConfig::spin)
    /// after activity, for pulls that sleep between their blocks.
    #[cfg(test)]
    pub(super) early_sleeps: usize,
    /// Pulls started that sleep between their blocks ([`PullSpec::sleeps`]).
    #[cfg(test)]
    pub(super) sleeping_pulls: usize,
    /// Keeps the arena mapped while it is registered.
    _store: Arc<TieredStore>,
}

// SAFETY: the worker is created with UCS_THREAD_MODE_SERIALIZED, which lets any thread use it
// and the context's objects as long as one does at a time. Every use goes through
// `&mut Engine`, which only the holder of the `EngineCell` lock has (or the engine's owner
// before it goes into the cell and after it comes out). The inbox's RefCell is borrowed only by
// `handle_inbox` and by UCX's callbacks, which run inside `ucp_worker_progress` on that same
// thread. The slot addresses the pulls' outcomes keep point into the arena, which `_store`
// keeps mapped; they are read only by that same holder.
unsafe impl Send for Engine {}

impl Engine {
    /// Creates the context, the worker and the arena's registration. `tls` is the `UCX_TLS`
    /// the context will use.
    pub(super) fn open(
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
            next_request: random_request_id(),
            pulls: Vec::new(),
            serves: Vec::new(),
            closing: Vec::new(),
            stopping: false,
            replaced: false,
            // Known in advance, the refusal (and the error UCX logs for it) is skipped; `init`
            // also reads it as "no TCP transport".
            no_peer_errors: shared_memory_only(tls),
            may_use_shared_memory: !tcp_only(tls),
            progress_idle: true,
            #[cfg(test)]
            refused_blocks: 0,
            #[cfg(test)]
            served_sends: 0,
            #[cfg(test)]
            served_eager: 0,
            #[cfg(test)]
            served_writes: 0,
            #[cfg(test)]
            eager_arrivals: 0,
            #[cfg(test)]
            early_sleeps: 0,
            #[cfg(test)]
            sleeping_pulls: 0,
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
        // One setting into `config`; why not, if UCX refuses it.
        let modify = |name: &str, value: &str| -> Result<(), String> {
            let (Ok(n), Ok(v)) = (CString::new(name), CString::new(value)) else {
                return Err("contains a NUL byte".into());
            };
            // SAFETY: `config` is the live handle read above; both strings are NUL-terminated
            // and outlive the call (UCX copies the value).
            match unsafe { sys::ucp_config_modify(config, n.as_ptr(), v.as_ptr()) } {
                sys::UCS_OK => Ok(()),
                status => Err(status_text(status)),
            }
        };
        let mut settings: Vec<(String, String)> = Vec::new();
        if let Some(tls) = &self.cfg.tls {
            settings.push(("TLS".into(), tls.clone()));
        }
        // Our tuning of UCX's TCP transport, not the operator's: a UCX that names a setting
        // differently (1.13 takes the transport's own name, later ones the prefixed one) or not
        // at all keeps its default.
        let tune_tcp = |name: &str, value: &str| {
            let taken = [name.to_owned(), format!("TCP_{name}")]
                .iter()
                .any(|n| modify(n, value).is_ok());
            if !taken {
                tracing::debug!(
                    setting = name,
                    value,
                    "this UCX does not take the setting; keeping its default"
                );
            }
        };
        // Where UCX will not load TCP its settings would only draw a warning that they are
        // unused.
        if let Some(size) = self.cfg.tcp_segment.filter(|_| !self.no_peer_errors) {
            for name in ["TX_SEG_SIZE", "RX_SEG_SIZE"] {
                tune_tcp(name, &size.to_string());
            }
        }
        // UCX connects a TCP endpoint with a blocking connect by default. Where the peer's worker
        // goes away during that connect (a source agent stopping as a pull starts), UCX 1.23
        // retries the connection inside the call, fails, and later destroys the endpoint under
        // the requests queued on it: an assertion (`stubs.c`) aborts the pulling process. A
        // non-blocking connect hands the same failure to the endpoint's error handler, which
        // fails the pull. Like the segment size, the environment or `settings` may set it
        // back.
        if !self.no_peer_errors && std::env::var_os("UCX_TCP_CONN_NB").is_none() {
            tune_tcp("CONN_NB", "y");
        }
        // Our default for a UCP setting, where neither the environment nor `settings` (applied
        // after) names it; a UCX that refuses it keeps its own.
        let our_default = |name: &str, value: &str| {
            if std::env::var_os(format!("UCX_{name}")).is_none() && modify(name, value).is_err() {
                tracing::debug!(
                    setting = name,
                    value,
                    "this UCX does not take the setting; keeping its default"
                );
            }
        };
        // kvtier sends small active messages eagerly and moves blocks with RMA or, in
        // send-on-request mode, with messages it flags for rendezvous or eager sending itself
        // (`UCP_AM_SEND_FLAG_RNDV` or `_EAGER`, which the threshold does not govern), so it
        // has no use for the threshold; and while rendezvous is on, later UCX releases (the
        // 1.23 that NIXL's wheel bundles; 1.13 exempts TCP) give an endpoint that reports peer
        // failures RMA lanes only on memory domains that can invalidate registrations, which
        // TCP's cannot: every put and get over TCP was then emulated with active messages
        // (1 MiB blocks at 5.3 GB/s where zero-copy puts run at 6.7). Our tuning, like the
        // segment size: the environment or `settings` may turn it back on.
        our_default("RNDV_THRESH", "inf");
        // UCX's adaptive progress (on by default) leaves an interface out of the worker's
        // progress and out of `ucp_worker_arm` while none of this worker's endpoints use it,
        // and counts on the interface's peers to signal it when they write to it. A peer
        // killed between claiming a slot of a shared-memory interface's receive queue and that
        // signal (a puller killed as its pull starts) then leaves a message that nobody reads:
        // the queue fills, every later request to this worker waits for room in it forever,
        // and neither the idle nap nor the wedge watch sees it, as neither progresses nor arms
        // that interface. Seen on UCX 1.22 with sends over shared memory, about once in 45
        // runs of killing 16 pullers: the source's progress thread asleep with its worker
        // armed, and a fresh puller's request never leaving it. With every interface
        // progressed and armed, such a message is read at the next turn, and a slot claimed
        // and never written shows as a wedged worker, which is replaced. The cost is a poll of
        // each loaded transport per progress call; a worker limited to TCP keeps it on.
        if self.may_use_shared_memory {
            our_default("ADAPTIVE_PROGRESS", "n");
        }
        settings.extend(self.cfg.settings.iter().cloned());
        let mut result = Ok(());
        for (name, value) in &settings {
            if let Err(reason) = modify(name, value) {
                result = Err(unavailable(format!("UCX setting {name}={value:?}: {reason}")));
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
            // One thread at a time, but not always the same one (see `EngineCell`).
            thread_mode: sys::UCS_THREAD_MODE_SERIALIZED,
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
        let handlers: [(u32, sys::ucp_am_recv_callback_t); 3] = [
            (AM_REQUEST, Some(on_request)),
            (AM_ANSWER, Some(on_answer)),
            (AM_BLOCK, Some(on_block)),
        ];
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

    /// One round: commands, deadlines, progress, messages, transfers. Whether anything
    /// happened.
    pub(super) fn turn(&mut self) -> bool {
        let mut busy = false;
        for cmd in self.mailbox.take() {
            busy = true;
            match cmd {
                Command::Pull(spec) => self.start_pull(spec),
                Command::Stop => self.stop(),
            }
        }
        let mut events = 0;
        // SAFETY: the worker is live and only the engine's holder (this thread) calls into it.
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

    /// How long the progress thread polls after activity before it sleeps: not at all while
    /// its only work is pulls that sleep between their blocks ([`PullSpec::sleeps`]), else
    /// [`UcxConfig::spin`](super::UcxConfig::spin).
    fn spin(&self) -> Duration {
        let only_sleepers =
            !self.pulls.is_empty() && self.serves.is_empty() && self.pulls.iter().all(|p| p.sleeps);
        if only_sleepers {
            Duration::ZERO
        } else {
            self.cfg.spin
        }
    }

    /// How long the progress thread may sleep: until the next deadline, and at most
    /// [`IN_FLIGHT_NAP`] while operations are in flight, [`IDLE_NAP`] otherwise.
    fn sleep_limit(&self, now: Instant) -> Duration {
        let in_flight = !self.closing.is_empty() || !self.pulls.is_empty() || !self.serves.is_empty();
        let nap = if in_flight { IN_FLIGHT_NAP } else { IDLE_NAP };
        self.next_timer()
            .map_or(nap, |t| t.saturating_duration_since(now).min(nap))
    }

    /// Arms the worker's event fd for a wait of at most `timeout`: the wait to make, or `None`
    /// when events are already pending (to be progressed at once).
    fn arm(&mut self, timeout: Option<Duration>) -> Option<Wait> {
        // SAFETY: live worker, driven by the thread that holds the engine.
        let status = unsafe { sys::ucp_worker_arm(self.worker) };
        let timeout = match status {
            sys::UCS_OK => timeout,
            sys::UCS_ERR_BUSY => return None,
            // The transports cannot signal: poll the worker on a short period instead.
            _ => Some(timeout.map_or(IN_FLIGHT_NAP, |t| t.min(IN_FLIGHT_NAP))),
        };
        Some(Wait {
            efd: self.efd,
            timeout,
        })
    }

    /// Arms the worker's event fd and waits on it (`None`: without a time limit).
    #[cfg(test)]
    pub(super) fn wait_for_events(&mut self, timeout: Option<Duration>) {
        if let Some(wait) = self.arm(timeout) {
            wait.block();
        }
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
        self.mailbox.close_refusing(shutting_down);
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
            // SAFETY: live worker, driven by this thread; `address` is a worker address received
            // from the peer (UCX validates it while unpacking and reads it only during the
            // call); the error handler's `arg` is the inbox, which outlives every endpoint.
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

    /// Leaves an answer in the inbox, as UCX's handler does.
    #[cfg(test)]
    pub(in crate::transport::ucx) fn receive_answer(&mut self, message: Vec<u8>) {
        self.inbox.borrow_mut().answers.push(message);
    }

    /// Pulls whose request message UCX has not finished sending.
    #[cfg(test)]
    pub(in crate::transport::ucx) fn unsent_requests(&self) -> usize {
        self.pulls
            .iter()
            .filter(|p| matches!(p.state, PullState::Put { send: Some(_), .. }))
            .count()
    }

    /// Messages and endpoint failures the callbacks left.
    fn handle_inbox(&mut self) -> bool {
        let (requests, answers, blocks, failed) = {
            let mut inbox = self.inbox.borrow_mut();
            (
                std::mem::take(&mut inbox.requests),
                std::mem::take(&mut inbox.answers),
                std::mem::take(&mut inbox.blocks),
                std::mem::take(&mut inbox.failed),
            )
        };
        let busy = !(requests.is_empty() && answers.is_empty() && blocks.is_empty() && failed.is_empty());
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
            let Some((id, sent, statuses)) = parse_answer(&message) else {
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
                *answer = Some((sent, statuses.to_vec()));
            }
        }
        for block in blocks {
            self.receive_block(block);
        }
        for message in requests {
            self.start_serve(&message);
        }
        busy
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // From here on nobody signals the worker.
        if self.replaced {
            self.mailbox.pause();
        } else {
            self.mailbox.close_refusing(shutting_down);
        }
        let why = if self.replaced {
            "the UCX worker stopped receiving (a peer died in the middle of a message) and was replaced"
        } else {
            SHUTTING_DOWN
        };
        if !self.worker.is_null() {
            // Transfers still here were cut short without the orderly stop of `run`. Their
            // slots go back to their callers only once the worker has been progressed for the
            // last time below, so that an operation still writing into one ends first.
            let mut cut_short = Vec::new();
            let mut unreceived = Vec::new();
            self.inbox.borrow_mut().closed = true;
            for job in self.pulls.drain(..) {
                match job.state {
                    PullState::Get { inflight, .. } => inflight.into_iter().for_each(|(_, r)| r.abandon()),
                    PullState::Put {
                        message,
                        send,
                        receives,
                        ..
                    } => {
                        if let Some(r) = send {
                            std::mem::forget(message);
                            r.abandon();
                        }
                        if let Some(rx) = receives {
                            for (_, r) in rx.inflight {
                                r.abandon();
                            }
                            unreceived.extend(rx.queued.into_iter().map(|(_, data)| data));
                        }
                    }
                }
                cut_short.push((job.outcome, job.label));
            }
            for mut job in self.serves.drain(..) {
                job.abandon();
            }
            let blocks = std::mem::take(&mut self.inbox.borrow_mut().blocks);
            for data in unreceived.into_iter().chain(blocks.into_iter().map(|b| b.data)) {
                self.release_block(data);
            }
            // UCX's own operations (answers to a peer's emulated gets and puts) finish while
            // the worker is progressed; a worker destroyed under them leaks their requests.
            let until = Instant::now() + self.cfg.drain.min(SHUTDOWN_SETTLE);
            let mut quiet_since = Instant::now();
            while Instant::now() < until && quiet_since.elapsed() < SHUTDOWN_QUIET {
                // SAFETY: live worker, driven by this thread alone.
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
                // SAFETY: live worker, driven by this thread alone.
                unsafe { sys::ucp_worker_progress(self.worker) };
                self.closing.retain_mut(|r| r.poll().is_none());
            }
            for r in self.closing.drain(..) {
                r.abandon();
            }
            // An endpoint that a peer opened to this worker (to pull from it) may still hold its
            // wireup reply, queued behind a TCP connection back to the peer that is under way.
            // Destroying the worker then purges that reply, which UCX 1.13 does not expect: it
            // aborts the process (an assertion in `ucp_request_send_state_ff`, "got REP
            // message"). A worker flush ends once every endpoint has sent what it queued (or
            // failed), so the worker is destroyed only after, or at the end of the drain. It is
            // issued once the closes above have ended, not beside them: a flush issued while the
            // closes were under way aborted UCX 1.13 at once in the tests.
            let param = sys::ucp_request_param_t::default();
            // SAFETY: live worker, driven by this thread alone; the request is polled and freed
            // below, or abandoned (UCX frees it when it completes, and it refers to nothing of
            // ours).
            let mut flush = Req::from_ptr(unsafe { sys::ucp_worker_flush_nbx(self.worker, &param) });
            while flush.poll().is_none() && Instant::now() < until {
                // SAFETY: live worker, driven by this thread alone.
                unsafe { sys::ucp_worker_progress(self.worker) };
            }
            flush.abandon();
            for (mut outcome, peer) in cut_short {
                outcome.settle_rest(&TransportError::Io {
                    peer,
                    reason: why.into(),
                });
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
            // SAFETY: driven by this thread alone now (the engine is being dropped), destroyed
            // once, after its endpoints; the mailbox
            // no longer hands it out for signalling.
            unsafe { sys::ucp_worker_destroy(self.worker) };
        }
        if !self.context.is_null() {
            // SAFETY: the context's only worker and registration are gone; cleaned up once.
            unsafe { sys::ucp_cleanup(self.context) };
        }
    }
}

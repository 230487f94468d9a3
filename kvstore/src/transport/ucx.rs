//! The UCX data plane: blocks move between arenas with UCP's RMA, over whichever transport
//! UCX picks (shared memory and CMA between processes of one host, TCP, or RC/DC verbs in
//! clusters).
//!
//! # Threads
//!
//! One UCP context and one worker per engine (a transport runs one per lane, below), created
//! in `UCS_THREAD_MODE_SERIALIZED` and driven by one thread at a time, whichever holds the
//! engine's lock. A progress thread that
//! the transport owns drives it between its waits: it polls for a short while after any
//! activity and otherwise sleeps on the worker's event fd, so an idle transport costs nothing.
//! A pull of at most [`UcxConfig::inline_bytes`] (four times that for checked pulls of several
//! blocks of [`SEND_BLOCKS_FROM`] or more on average, sent in rendezvous over TCP alone,
//! [`CHECKED_SENDS_INLINE_TIMES`]) is driven by the pulling thread itself: it takes the lock
//! (the progress thread steps aside), issues the pull and progresses the worker until the pull
//! is over, its [`inline_budget`] has passed or another pulling thread waits for the lock, and
//! leaves any rest to the progress thread (or to that other thread, whose turns progress every
//! pull of the worker); over shared memory a one-block pull then involves no other thread at
//! all, where a hand-off costs two thread wake-ups, more than the copy of a 64 KiB block.
//! Where UCX may use shared memory, a pull that another pulling thread would drive while one
//! does goes to the mailbox instead, which the driving thread's turns take commands from. A
//! larger pull is a command put in a mailbox, after which the worker is woken with
//! `ucp_worker_signal`; its results come back on a channel, each block as soon as it has
//! landed. A block that was got is checksummed at once by the thread that copied it, while it
//! is in that core's cache (the lanes below copy in parallel), and the pulling thread compares
//! the sum with the grant's; a block that the source wrote or sent is checksummed by the
//! pulling thread while the progress thread moves the next, or, in a pull that thread drives,
//! between its turns of the worker, right after the block landed. With [`UcxConfig::verify`]
//! off, no block is checksummed. Dropping the transport stops the progress thread, which
//! closes the endpoints, unmaps the arena and destroys the worker and the context, in that
//! order.
//!
//! # Lanes
//!
//! In [`UcxMode::Get`] a transport runs [`UcxConfig::lanes`] such engines (context, worker,
//! registration and progress thread each); the first serves grants and is the one
//! [`Transport::endpoint`] names. A pull of [`SPLIT_FROM_BYTES`] or more is split into that
//! many runs of consecutive blocks with about the same bytes, one per lane; in a pull the
//! pulling thread drives itself (at most [`UcxConfig::inline_bytes`]) it reads the first run.
//! Each run keeps its own [`UcxConfig::window`] in flight. Over shared
//! memory a get is a CMA read by the thread that drives the worker, and one thread's copies
//! and checksums move less than the memory can: on UCX 1.23 on a 2-core VM, two lanes pulled
//! batches of 16 and 256 blocks of 256 KiB–4 MiB at 1.3–1.8 × one lane. The other modes
//! run one engine: their source's progress thread works for every block, and on that VM a
//! second lane (two requests to the same source) made pulls slower, not faster. Where the NIC
//! copies (RDMA) a second lane costs a second registration of the arena for little gain, and
//! `lanes = 1` suits better; a lane after the first that cannot start (a registration refused
//! under a tight locked-memory limit, say) is left out with a warning. The first lane also
//! serves grants, so a peer's request may wait behind that lane's checksums of its run.
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
//! # Three ways to move the bytes ([`UcxMode`])
//!
//! * **Get** (one-sided): the puller reads each block with `ucp_get_nbx` from the source's
//!   arena (base + the grant's offset) straight into its slot. The source's CPU does nothing
//!   on RDMA and shared memory, but over TCP UCX emulates a get in software, with a request
//!   and an answer per fragment, and reads run at about a quarter of the speed of writes.
//! * **PutOnRequest**: the puller sends one active message with the grant id, its own worker
//!   address, remote key, arena base and the list of (grant index, length, slot offset); the
//!   source looks the grant up, writes each block into the puller's slot with `ucp_put_nbx`
//!   (blocks back to back in both arenas as one write, up to [`WRITE_RUN_UP_TO`]), flushes
//!   the endpoint (so every write has landed) and then answers with one status per block.
//!   Over TCP this runs as fast as a push.
//! * **SendOnRequest**: the same request, flagged; the source sends each block as an active
//!   message (`0x6b78`, header `request id u64 | entry u32`) in rendezvous mode, so only a
//!   descriptor travels; the puller's UCX fetches the bytes straight into the slot
//!   (`ucp_am_recv_data_nbx`: over shared memory one CMA read by the puller), and the source
//!   answers once every send has completed, which is once the puller has fetched or refused
//!   each block, so no flush is needed. This is the zero-copy path over shared memory on UCX
//!   releases that use CMA only for rendezvous (Debian 12's 1.13, where a get is emulated
//!   with messages). A source that predates the flag ignores it and writes. A second flag asks
//!   for blocks of at most [`EAGER_BLOCKS_UP_TO`] to be sent eagerly instead, the bytes inside
//!   the message, which the puller copies into the slot as it comes. An eager send completes
//!   once UCX has copied the block out, so the answer may arrive before a block it reports
//!   as sent (UCX does not promise the order of whole messages); the puller then waits for
//!   the block until its deadline. The puller asks for eager sends where UCX may use TCP
//!   alone, in a pull it drives itself whose blocks are all that small. A source that
//!   predates this flag sends in rendezvous.
//!
//! [`UcxMode::Auto`] picks from `UCX_TLS` and the UCX release (see [`UcxMode::resolve`]), and
//! where it picks writes it sends pulls of several blocks of [`SEND_BLOCKS_FROM`] or more,
//! and, over TCP alone, sends small pulls of small blocks eagerly ([`EAGER_BLOCKS_UP_TO`]),
//! except, over TCP alone, pulls that the source writes in long enough runs of blocks back
//! to back ([`RUN_WRITES_FROM`]). A source that predates runs writes block by block.
//!
//! The request (active message `0x6b76`, sent eagerly as one message):
//!
//! ```text
//! "KVTP" | version u16 (1) | flags u16 | request id u64 | grant id [16] | boot id [16]
//!        | deadline u64 (ns, CLOCK_MONOTONIC) | budget u64 (ns) | arena base u64
//!        | arena length u64 | address length u32 | rkey length u32 | count u32
//!        | worker address | packed rkey | count × (index u32 | length u64 | slot offset u64)
//! ```
//!
//! (flags: bit 0 asks for sends rather than writes, bit 1 with it for eager sends of small
//! blocks; the other bits are zero), and the answer
//! (`0x6b77`): `"KVTA" | version u16 | 0 u16 | request id u64 | count u32 |
//! count × status u8` (0 written or sent, 1 not in the grant, 2 unknown grant, 3 malformed
//! entry, 4 not written before the deadline, 5 the write or send failed).
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
//! * SendOnRequest: the slots are written by the puller's own receives, which it starts only
//!   before the deadline (a block that comes later is refused) and waits for as for gets.
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
//! A peer on the same host that dies in the middle of a message can also stop this worker
//! from receiving anything more over shared memory. UCX's shared-memory transport receives
//! through one FIFO that all peers on the host write into: a sender claims an element, fills
//! it and then marks it written, and the receiver reads the elements in order. An element
//! claimed by a sender that was killed before marking it is never read, nor is anything queued
//! behind it, from any peer; and `ucp_worker_arm` reports it as pending for good, so the
//! progress thread cannot sleep either. (Seen with pullers killed as their pulls start: with
//! sends, where the puller acknowledges each block, in about one run in six of a test that
//! kills 16 under load.) A worker that has been unable to sleep for [`WEDGED_AFTER`] while
//! progressing it did nothing is therefore replaced: its transfers fail, commands wait for the
//! new worker, and the grants made from then on carry the new worker's address. A sender
//! killed after writing its element but before waking a receiver that sleeps (the FIFO asks
//! only the first sender after the receiver went to sleep to wake it) leaves messages unread
//! until something else wakes the worker: an idle progress thread sleeps at most 100 ms at a
//! time for that reason. Neither helps where UCX's adaptive progress (on by default) has taken the receiving
//! interface out of the worker's progress and arming until a peer wakes it, which the killed
//! sender never did: the FIFO fills, every later request waits for room in it, and the worker
//! sleeps armed. Adaptive progress is therefore turned off (`ADAPTIVE_PROGRESS=n`) wherever
//! `UCX_TLS` may include shared memory, unless the environment or [`UcxConfig::settings`] sets
//! it.
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
//!   own key to the sources it asks, and so does one in SendOnRequest mode (a source that
//!   predates sends writes instead; one that sends ignores the key). The blocks a source
//!   sends are matched to a pull by request id and position only: a peer that holds this
//!   worker's address can offer a block for a pull in progress, which the checksum then
//!   refuses; a forged answer would settle a put-mode pull whose slots were not written,
//!   which the checksum refuses too. Each pull's request id is drawn at random, so such a peer
//!   must have seen that very request to name it, which is what is left where the check is
//!   off ([`UcxConfig::verify`]); and a puller's key lets the sources it asked write anywhere
//!   in its arena, checked or not.

use std::ffi::CStr;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::mpsc;
use ucx_sys as sys;

use super::grants::{GrantId, Grants, MAX_GRANT_BLOCKS};
use super::{BoxFuture, PullItem, Pulled, Transport, TransportError, TransportKind, fail_all};
use crate::store::TieredStore;
use engine::{Command, Driven, Engine, EngineCell, Mailbox, OpSpec, PullSpec};
use wire::RemoteEndpoint;
#[cfg(test)]
use wire::{
    ANSWER_FLAG_SENT, BLOCK_HEADER, ENDPOINT_HEADER, REQUEST_ENTRY, REQUEST_FLAG_EAGER, REQUEST_FLAG_SEND,
    REQUEST_HEADER, Request, STATUS_OK, STATUS_TIMED_OUT, encode_answer, encode_block_header, parse_answer,
    parse_block_header,
};

mod engine;
mod wire;

/// How a pull moves the bytes (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UcxMode {
    /// [`UcxMode::Get`], [`UcxMode::PutOnRequest`] or [`UcxMode::SendOnRequest`], by
    /// [`UcxMode::resolve`]; where that is `PutOnRequest`, pulls of several blocks of
    /// [`SEND_BLOCKS_FROM`] or more on average go by [`UcxMode::SendOnRequest`], and so do
    /// small pulls of small blocks over TCP alone, sent eagerly ([`EAGER_BLOCKS_UP_TO`]),
    /// except pulls that the source writes in long enough runs over TCP alone
    /// ([`RUN_WRITES_FROM`]).
    #[default]
    Auto,
    /// The puller reads the source's arena (one-sided).
    Get,
    /// The puller asks the source to write the blocks into its slots.
    PutOnRequest,
    /// The puller asks the source to send each block as a rendezvous active message, which
    /// the puller's UCX then fetches straight into the slot: over shared memory a CMA read by
    /// the puller, the one zero-copy path between processes on UCX releases that do not use
    /// CMA for one-sided gets (see [`ONE_SIDED_CMA_SINCE`]). Over TCP alone, small pulls of
    /// small blocks are sent eagerly instead ([`EAGER_BLOCKS_UP_TO`]).
    SendOnRequest,
}

/// Where `Auto` writes ([`UcxMode::PutOnRequest`]: TCP), a pull of several blocks this large
/// on average goes by [`UcxMode::SendOnRequest`] instead, unless it is written in runs
/// ([`RUN_WRITES_FROM`]). Written blocks are checksummed when the source's answer says they
/// have all landed, a tail that grows with the pull; a sent block is checksummed as soon as
/// it lands, while the next one moves, at the price of a rendezvous handshake per block. Over
/// TCP on loopback (UCX 1.13 and 1.23, 2-core VM), sends ran at 1.1–1.5 × writes for 16 and
/// 256 blocks of 256 KiB to 4 MiB, and slower for 64 KiB blocks; single blocks of 1 and 4 MiB
/// were even or slower.
pub const SEND_BLOCKS_FROM: u64 = 256 << 10;

/// The most bytes a source writes with one `ucp_put_nbx`: blocks of a pull that lie back to
/// back in the source's arena, in the order asked for, and whose slots lie back to back in the
/// puller's, are written as one run. UCX's TCP transport reads ahead up to a receive segment
/// ([`TCP_SEGMENT`]) into its own buffer and copies a write's bytes out of it, so a stream of
/// small writes is received twice over, while a long one lands mostly straight in its slots;
/// each write also costs a request and an acknowledgement. Over TCP on loopback
/// (UCX 1.23, 2-core VM, back to back) 16 blocks of 64 KiB written in one run moved at
/// 6.6 GB/s against 3.8 sent eagerly, 256 of them at 4.2–5.1 against 2.9–3.2 written one by
/// one (the same layout, before runs), and 16 of 256 KiB at 5.5–5.8 against 5.2 sent.
pub const WRITE_RUN_UP_TO: u64 = 4 << 20;

/// Where `Auto` writes and UCX carries the bytes over TCP alone, a pull whose blocks the
/// source writes in runs ([`WRITE_RUN_UP_TO`]) of at least two blocks and this many bytes on
/// average is written, rather than sent eagerly ([`EAGER_BLOCKS_UP_TO`]) or in rendezvous
/// ([`SEND_BLOCKS_FROM`]), if its blocks are smaller than [`RUN_BLOCKS_BELOW`] on average and
/// it has at most [`RUN_WRITES_UP_TO`] bytes. Over TCP on loopback (UCX 1.23, 2-core VM, back
/// to back), blocks of 64 KiB back to back: 8 written in one run at 4.8 GB/s against 3.6 sent
/// eagerly, 16 at 6.6 against 3.8, 256 at 4.2–5.1 against 2.9–3.2 written one by one; 4 at
/// 3.1 against 3.3 and 2 at 2.1 against 2.8 (eager sends win below half a megabyte). Blocks of
/// 256 KiB: 2 at 4.9 against 4.0–4.3 sent, 4 at 6.7 against 4.7–4.8.
pub const RUN_WRITES_FROM: u64 = 512 << 10;

/// See [`RUN_WRITES_FROM`]: blocks of 1 MiB were faster sent, each checksummed as it lands, than
/// written in runs (2 at 5.9–6.0 GB/s against 5.4, 4 at 7.9–8.3 against 5.3–5.8).
pub const RUN_BLOCKS_BELOW: u64 = 1 << 20;

/// See [`RUN_WRITES_FROM`]: past this many bytes the check of every written block at the
/// answer outweighs what runs save (256 blocks of 256 KiB written in runs at 3.7–4.2 GB/s
/// against 4.1–4.5 sent).
pub const RUN_WRITES_UP_TO: u64 = 16 << 20;

/// The runs of `pieces` (source address, destination address, length), in order, that lie
/// back to back at both ends, each of at most `cap` bytes (a longer piece is a run of its
/// own): the writes a source makes for them ([`WRITE_RUN_UP_TO`], or the source's window if
/// smaller).
fn write_runs(pieces: impl IntoIterator<Item = (u64, u64, u64)>, cap: u64) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    // (source end, destination end, bytes) of the last run, if another piece may join it.
    let mut last: Option<(u64, u64, u64)> = None;
    for (n, (from, to, len)) in pieces.into_iter().enumerate() {
        // A piece that would end past the address space (a peer's bad request) stands alone
        // and fails where it is written, as it would without runs.
        let ends = from.checked_add(len).zip(to.checked_add(len));
        let joins = |(from_end, to_end, bytes): (u64, u64, u64)| {
            from_end == from && to_end == to && bytes.checked_add(len).is_some_and(|b| b <= cap)
        };
        match (ends, runs.last_mut()) {
            (Some((from_end, to_end)), Some(run)) if last.is_some_and(joins) => {
                run.end = n + 1;
                last = last.map(|(_, _, bytes)| (from_end, to_end, bytes + len));
            }
            _ => {
                runs.push(n..n + 1);
                last = ends.map(|(from_end, to_end)| (from_end, to_end, len));
            }
        }
    }
    runs
}

/// Where a source moves the bytes (writes or sends) and UCX may carry them over TCP, a pull
/// whose blocks average this much or more lets the puller's progress thread sleep between
/// arrivals instead of polling for [`UcxConfig::spin`] after each. A block of this size takes
/// far longer to cross a socket than a wake-up, while a thread that polls takes its share of
/// a core from the threads that move and checksum the bytes (and on loopback from the source,
/// whose CPU runs the receive path). Over TCP on loopback (UCX 1.23, 2-core VM, back to back)
/// sleeping ran 16 and 256 blocks of 4 MiB at 5.3–5.5 GB/s against 4.6–5.0 polling, 3 MiB
/// blocks even or up to 8 % faster, and 16 blocks of 1 MiB 15 % slower (a wake-up per
/// rendezvous handshake). A puller that checks its blocks sleeps from smaller ones
/// ([`SLEEP_BETWEEN_CHECKED_BLOCKS_FROM`]).
pub const SLEEP_BETWEEN_BLOCKS_FROM: u64 = 3 << 20;

/// [`SLEEP_BETWEEN_BLOCKS_FROM`] for a puller that checks each block it pulls
/// ([`UcxConfig::verify`], the default). Its checks are a third busy thread beside the two
/// progress threads that move the bytes, and on two cores a polling progress thread takes the
/// core that the checks need. Over TCP on loopback (UCX 1.23, 2-core VM, blocks scattered, 11
/// runs alternated with a build that slept only from 3 MiB): checked 1 MiB × 16 at a median of
/// 4.7 GB/s against 4.1, at 4.4 or more in 10 runs of 11 where five polling runs fell to
/// 3.2–3.6; 1 MiB × 256 even by the medians (3.4 against 3.3). Four more pairs with this
/// rule: 4.6–4.8 against 3.5–4.3 GB/s, and 3.2–3.6 against 3.0–3.4 for × 256. Without the
/// checks, sleeping from 1 MiB made × 256 12 % slower (4.2 against 4.8), so a pull that does
/// not check keeps the larger threshold.
pub const SLEEP_BETWEEN_CHECKED_BLOCKS_FROM: u64 = 1 << 20;

/// The first UCX release whose gets over shared memory are one-sided CMA copies: 1.16, the
/// first to select protocols with its new logic by default (`UCX_PROTO_ENABLE=y`), which
/// reports "zero-copy cma/memory" for `ucp_get*` there (`UCX_PROTO_INFO=y`, 1.16, 1.22 and
/// 1.23 checked). Older releases select CMA only for rendezvous, so a get is emulated with
/// active messages that the source's progress thread answers: Debian 12's 1.13 at about
/// 2 GB/s on the reference VM against 10–12 for a rendezvous message of the same size, and
/// 1.15 slower than rendezvous sends for batches of large blocks (4 MiB × 16 at 2.4 GB/s
/// against 5.7), where 1.16 got them at 9.0 against 6.2. Those releases get
/// [`UcxMode::SendOnRequest`], which is zero-copy on every release.
pub const ONE_SIDED_CMA_SINCE: (u32, u32) = (1, 16);

/// The first UCX release that survives a peer failing while its endpoint to this process is
/// still being wired up. UCX 1.14 removed an assertion ("UCP/CORE: Remove assertion for
/// checking WIREUP_MSGs when purging") that Debian 12's 1.13, built with its assertions,
/// still has: a peer agent killed in the millisecond in which it connects to this one (a
/// puller as its pull starts) aborts this one too, in `ucp_request_send_state_ff` ("got REP
/// message"), since the reply this process queued to the peer is purged with the failed
/// endpoint. Nothing that kvtier does with UCX avoids it there; a stopping agent's own worker is
/// flushed before it is destroyed, so an orderly stop does not meet it.
pub const SURVIVES_PEER_DEATH_IN_WIREUP_SINCE: (u32, u32) = (1, 14);

/// How long a worker may go unable to sleep (`ucp_worker_arm` reports events pending) while
/// progressing it does nothing, before it is taken for wedged and replaced by a new worker
/// with a new address. The case it is for: a peer on the same host killed in the middle of a
/// message it was writing into this worker's shared-memory FIFO, which this worker then never
/// reads past (see the module documentation).
pub const WEDGED_AFTER: Duration = Duration::from_secs(1);

/// The UCX release this process runs on (major, minor), which may be newer than the headers
/// kvtier was built against.
pub fn ucx_version() -> (u32, u32) {
    let (mut major, mut minor, mut release) = (0, 0, 0);
    // SAFETY: ucp_get_version only writes the three integers it is given.
    unsafe { sys::ucp_get_version(&mut major, &mut minor, &mut release) };
    (major, minor)
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
    /// when `UCX_TLS` is unset and UCX may use TCP, [`UcxMode::PutOnRequest`]. Where `tls`
    /// names shared-memory transports only and UCX is older than [`ONE_SIDED_CMA_SINCE`], it
    /// is [`UcxMode::SendOnRequest`] instead of `Get`.
    pub fn resolve(self, tls: Option<&str>) -> Self {
        self.resolve_on(tls, ucx_version())
    }

    /// [`UcxMode::resolve`] on UCX release `version`.
    fn resolve_on(self, tls: Option<&str>, version: (u32, u32)) -> Self {
        if self != Self::Auto {
            return self;
        }
        let Some(list) = TlsList::parse(tls) else {
            return Self::PutOnRequest;
        };
        let one_sided = if list.excluded {
            list.lists("tcp")
        } else {
            list.names.iter().all(|n| ONE_SIDED_TLS.contains(&n.as_str()))
        };
        if !one_sided {
            Self::PutOnRequest
        } else if list.shared_memory_only() && version < ONE_SIDED_CMA_SINCE {
            Self::SendOnRequest
        } else {
            Self::Get
        }
    }
}

/// [`UcxConfig::tcp_segment`] by default: UCX's TCP transport emulates RMA with messages
/// cut into segments of 8 KiB by default, which holds a pull near 1 GB/s on loopback; 512 KiB
/// segments bring it to the speed of kvtier's own TCP backend.
pub const TCP_SEGMENT: u64 = 512 << 10;

/// Transports that cannot detect a dead peer (UCX refuses `UCP_ERR_HANDLING_MODE_PEER` when
/// they are all it may use).
const SHM_TLS: &[&str] = &["self", "sm", "shm", "mm", "posix", "sysv", "xpmem", "knem", "cma"];

/// A `UCX_TLS` value: the transports it lists (trimmed, lower case), and whether it lists the
/// ones to leave out (`^...`) rather than the ones to use.
struct TlsList {
    excluded: bool,
    names: Vec<String>,
}

impl TlsList {
    /// `None` where the value is unset or empty: UCX then picks among all it has.
    fn parse(tls: Option<&str>) -> Option<Self> {
        let tls = tls.map(str::trim).filter(|t| !t.is_empty())?;
        let (excluded, list) = match tls.strip_prefix('^') {
            Some(list) => (true, list),
            None => (false, tls),
        };
        let names = list
            .split(',')
            .map(|n| n.trim().to_ascii_lowercase())
            .filter(|n| !n.is_empty())
            .collect();
        Some(Self { excluded, names })
    }

    /// Whether the list names `transport`.
    fn lists(&self, transport: &str) -> bool {
        self.names.iter().any(|n| n == transport)
    }

    /// Whether it allows shared-memory transports only.
    fn shared_memory_only(&self) -> bool {
        !self.excluded && self.names.iter().all(|n| SHM_TLS.contains(&n.as_str()))
    }

    /// Whether TCP is the only transport it allows between processes (`self` loops back
    /// within one).
    fn tcp_only(&self) -> bool {
        !self.excluded && self.lists("tcp") && self.names.iter().all(|n| n == "tcp" || n == "self")
    }
}

/// Whether `tls` (a `UCX_TLS` value) names shared-memory transports only.
fn shared_memory_only(tls: Option<&str>) -> bool {
    TlsList::parse(tls).is_some_and(|list| list.shared_memory_only())
}

/// Whether `tls` (a `UCX_TLS` value) limits UCX to its TCP transport ([`EAGER_BLOCKS_UP_TO`]).
fn tcp_only(tls: Option<&str>) -> bool {
    TlsList::parse(tls).is_some_and(|list| list.tcp_only())
}

/// Whether `tls` (a `UCX_TLS` value) lets UCX use its TCP transport: unset, `all`, a list
/// that names `tcp`, or an exclusion (`^...`) that does not.
fn may_use_tcp(tls: Option<&str>) -> bool {
    TlsList::parse(tls).is_none_or(|list| {
        if list.excluded {
            !list.lists("tcp")
        } else {
            list.lists("tcp") || list.lists("all")
        }
    })
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
    /// (`("TX_SEG_SIZE", "64K")` for `UCX_TCP_TX_SEG_SIZE`). Rendezvous is off
    /// (`RNDV_THRESH=inf`) unless set here or in the environment: with it on, later UCX
    /// releases (1.23) emulate RMA over TCP rather than write with zero copy. TCP endpoints
    /// connect without blocking (`TCP_CONN_NB=y`) unless set here or in the environment: with
    /// a blocking connect, UCX 1.23 aborts the process when the peer's worker goes away during
    /// the connect. (The blocks of
    /// [`UcxMode::SendOnRequest`] go by rendezvous, or eagerly, all the same: each send asks
    /// for one or the other.)
    pub settings: Vec<(String, String)>,
    /// The send and receive segment size of UCX's TCP transport ([`TCP_SEGMENT`] by default;
    /// `None` keeps UCX's). Left alone where UCX will not load TCP, and when the environment
    /// sets `UCX_TCP_TX_SEG_SIZE` or `UCX_TCP_RX_SEG_SIZE`. A worker receives no segment larger
    /// than its own receive size, so the value must be the same across the cluster; each
    /// connection in use holds a few segments.
    pub tcp_segment: Option<u64>,
    /// Bytes one transfer (a pull's run on one lane) keeps in flight; past its deadline at most
    /// this much per lane is still landing (or one block, where a block is larger; a source
    /// writes blocks back to back in runs of at most this much).
    pub window: u64,
    /// How long the progress thread keeps polling after activity before it sleeps (default
    /// 500 µs: the next block of a pull, or the next pull, usually comes sooner, and a sleeping
    /// progress thread costs a wake-up on each side; 50 µs left one-block shared-memory pulls
    /// about 40 % slower). Not while a puller's only work is pulls of large blocks that a
    /// source moves over TCP ([`SLEEP_BETWEEN_BLOCKS_FROM`],
    /// [`SLEEP_BETWEEN_CHECKED_BLOCKS_FROM`]).
    pub spin: Duration,
    /// How long past its deadline a pull waits for the operations it started to be over
    /// (see the module documentation).
    pub drain: Duration,
    /// Pulls of at most this many bytes are driven by the pulling thread itself, which is busy
    /// for up to [`inline_budget`] meanwhile, instead of by the progress thread (0: never).
    /// Default 4 MiB, which UCX moves within that budget over shared memory and over TCP on
    /// loopback; each block is then checked right after its copy, while it is in that core's
    /// cache. Checked pulls of several blocks of [`SEND_BLOCKS_FROM`] or more on average that a
    /// source sends over TCP alone are driven up to [`CHECKED_SENDS_INLINE_TIMES`] as many
    /// bytes.
    pub inline_bytes: u64,
    /// UCX workers that read in parallel in [`UcxMode::Get`] (other modes run one), each a UCP
    /// context and worker of its own with its own progress thread (the first also serves this
    /// agent's grants and is the one its endpoint names). A pull of [`SPLIT_FROM_BYTES`] or
    /// more is split across them by bytes. Over shared memory the copies are made by the CPU
    /// of the thread that drives a worker, and one thread's copies and checksums fall short of
    /// what the memory moves; default: 2, or 1 on a single-core machine (at most
    /// [`MAX_LANES`]).
    pub lanes: usize,
    /// Whether the puller checks every block it pulls against the checksum of its grant
    /// (default). The check is a pass of the CPU over every byte, after UCX (or the NIC) has
    /// placed them, which NIXL and Mooncake do not make (what it costs: `docs/benchmarks.md`).
    /// Without it a block that UCX reports delivered is taken as it landed, and the check no
    /// longer catches: a block corrupted on its way or in the source's memory since its grant;
    /// a source's bug (a block written from or into the wrong place); a block message or
    /// answer from another peer that saw the pull's request (request ids are random, see the
    /// module documentation). A get that completes past the pull's deadline fails as late
    /// instead, since it may have read memory the source reused after the grant: the caller
    /// keeps that deadline within the grant's life ([`Transport::verifies`]). Only for
    /// clusters whose fabric, memory and agents are trusted.
    pub verify: bool,
    /// Serve requests for sends by writing, as a source from before send-on-request does.
    #[cfg(test)]
    pub(crate) ignore_send_flag: bool,
    /// Serve requests for eager sends in rendezvous, as a source from before eager sends does.
    #[cfg(test)]
    pub(crate) ignore_eager_flag: bool,
    /// Serve requests as if their deadline were a minute away, as a source whose clock runs
    /// behind would.
    #[cfg(test)]
    pub(crate) ignore_deadline: bool,
}

/// Least time a pulling thread drives the worker for its own pull before it leaves the rest
/// to the progress thread (a pull over TCP waits for the source's writes and answer
/// meanwhile); see [`inline_budget`].
pub const INLINE_BUDGET_MIN: Duration = Duration::from_millis(1);

/// Most time a pulling thread drives the worker for its own pull, whatever
/// [`UcxConfig::inline_bytes`] allows: that thread may be an async runtime's worker, and a
/// silent source holds it for the whole budget (other pulling threads do not wait for it: a
/// driving thread steps aside as soon as one waits for the worker, or, where UCX may use
/// shared memory, their pulls go to the mailbox). 8 ms: about the time the
/// 16 MiB of a checked pull of sent blocks that it drives by default
/// ([`CHECKED_SENDS_INLINE_TIMES`]) take at [`INLINE_PACE`] (7.8 ms), so that a healthy one
/// is not handed over mid-way. Raising it from 4 ms changed the budget of pulls over 8 MiB
/// alone, which by default are such pulls; the trial that chose the rule ran with 4 ms,
/// within which its 16 MiB pulls ended (about 3 ms at 5.7 GB/s).
pub const INLINE_BUDGET_MAX: Duration = Duration::from_millis(8);

/// The pace, in bytes a second, below which a pull the pulling thread drives is handed over
/// to the progress thread ([`inline_budget`]).
pub const INLINE_PACE: u64 = 2 << 30;

/// How long a pulling thread drives the worker for the `bytes` of a pull it drives itself: the
/// time they take at [`INLINE_PACE`], within [`INLINE_BUDGET_MIN`] and [`INLINE_BUDGET_MAX`]
/// (2 ms for the default 4 MiB, 7.8 ms for the 16 MiB of checked sends over TCP). A slow or
/// silent source is what it bounds: a pull handed over mid-way took 2–3 × longer than one
/// driven to its end (UCX over TCP, 1 MiB), so a healthy pull must fit. Loopback TCP moves
/// 3–4 GB/s on the reference VM, and a flat millisecond cut 4 MiB pulls short: 64 blocks of
/// 64 KiB ran at 1.9–2.4 GB/s driven inline against 3.3–3.4 by the progress thread alone
/// (UCX 1.23, writes, back to back).
pub fn inline_budget(bytes: u64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / INLINE_PACE as f64).clamp(INLINE_BUDGET_MIN, INLINE_BUDGET_MAX)
}

/// Where `UCX_TLS` limits UCX to TCP, a pull whose blocks are all at most this large, and
/// that the pulling thread drives itself ([`UcxConfig::inline_bytes`]), is sent eagerly where
/// the source is asked to move the bytes and `Auto` picked writes or sends were configured:
/// each block travels inside its message and is copied into its slot as it comes, with no
/// rendezvous handshake and no flush or serial check of written blocks at the end. Over TCP
/// on loopback (UCX 1.23, 2-core VM, back to back) 16 and 32 blocks of 64 KiB ran at
/// 3.7–3.9 GB/s against 3.2–3.4 written one by one (NIXL's writes: 3.3; blocks back to back
/// are written in runs instead, see [`RUN_WRITES_FROM`]), one 64 KiB block in 33–38 µs
/// against 50; 128 KiB blocks were faster one at a time but erratic in batches (2.2–4.7 GB/s
/// for 8), and 256 KiB blocks slower. Larger pulls of small blocks, left to the progress
/// thread, ran eagerly at 3.7 GB/s or at a third of that from one run to the next, where
/// writes held 2.9–3.3, so they are written. Over shared memory eager sends were slower than
/// rendezvous (UCX 1.23: 16 KiB blocks 7–10 µs against 6, 64 KiB 28–35 against 6–9; 1.13:
/// faster for 4 and 16 KiB, 1.5–4 × slower for 64 KiB), and where UCX may pick either per
/// peer the puller cannot tell which it will (UCX 1.13 does not say), so eager sends are kept
/// to TCP alone.
pub const EAGER_BLOCKS_UP_TO: u64 = 64 << 10;

/// Where UCX carries the bytes over TCP alone and the puller checks its blocks, a pull of
/// several blocks of [`SEND_BLOCKS_FROM`] or more on average that the source sends in
/// rendezvous (as `Auto` has it there, or [`UcxMode::SendOnRequest`] configured) is driven
/// by the pulling thread up to this many times [`UcxConfig::inline_bytes`] (16 MiB by
/// default). Handed to the progress thread, such a pull keeps three threads busy: the
/// source's progress thread sending, the puller's receiving each block into its slot, and
/// the pulling thread checking it on whichever core is free, out of the other core's cache.
/// Driven by the pulling thread, each block is checked by the thread that received it, at
/// once. On UCX 1.23 over loopback TCP (2-core VM, five rounds each, every puller in the
/// same runs), pulls of 8 and 16 MiB in blocks of 256 KiB to 4 MiB ran at 4.9–7.8 GB/s
/// driven against 3.9–6.0 handed over, and 1 MiB × 16 at 5.6–5.8 against 4.3–4.5 in the
/// four runs of the trial (NIXL's writes, in the one with peers: 4.7); pulls that do not
/// check gained nothing beyond the noise, and 64 MiB to 1 GiB pulls driven whole (with a
/// budget raised for the trial) ran no faster with 1 MiB blocks and slower with 4 MiB ones
/// (4.6–4.7 GB/s against 5.1–5.4), where the progress thread sleeps between blocks
/// ([`SLEEP_BETWEEN_CHECKED_BLOCKS_FROM`]) and a driving thread spins.
pub const CHECKED_SENDS_INLINE_TIMES: u64 = 4;

/// Pulls of gets of this many bytes or more are split across the lanes (where the pulling
/// thread drives a pull, it reads one run while the other lanes' progress threads read
/// theirs). Below it, waking another thread costs more than it saves.
pub const SPLIT_FROM_BYTES: u64 = 2 << 20;

/// Most lanes a transport runs ([`UcxConfig::lanes`]).
pub const MAX_LANES: usize = 16;

impl Default for UcxConfig {
    fn default() -> Self {
        Self {
            mode: UcxMode::Auto,
            tls: None,
            settings: Vec::new(),
            tcp_segment: Some(TCP_SEGMENT),
            window: 64 << 20,
            spin: Duration::from_micros(500),
            drain: Duration::from_secs(1),
            inline_bytes: 4 << 20,
            lanes: std::thread::available_parallelism().map_or(1, |n| n.get().min(2)),
            verify: true,
            #[cfg(test)]
            ignore_send_flag: false,
            #[cfg(test)]
            ignore_eager_flag: false,
            #[cfg(test)]
            ignore_deadline: false,
        }
    }
}

/// The UCX backend of [`Transport`].
pub struct UcxTransport {
    store: Arc<TieredStore>,
    mode: UcxMode,
    /// `Auto` resolved to writes: pulls of large blocks go by sends ([`SEND_BLOCKS_FROM`]),
    /// and small pulls of small blocks by eager sends ([`EAGER_BLOCKS_UP_TO`]).
    sends_by_size: bool,
    /// UCX may carry the bytes over TCP ([`SLEEP_BETWEEN_BLOCKS_FROM`]).
    may_use_tcp: bool,
    /// UCX carries the bytes over TCP alone: small pulls of small blocks that a source sends
    /// go eagerly ([`EAGER_BLOCKS_UP_TO`]).
    tcp_only: bool,
    /// The first lane's endpoint; a new one once its worker is replaced.
    endpoint: Arc<Mutex<Vec<u8>>>,
    name: String,
    /// At least one; the first serves grants and is named by `endpoint`.
    lanes: Vec<Lane>,
    inline_bytes: u64,
    /// [`UcxConfig::verify`].
    verify: bool,
}

/// One UCX engine and the progress thread that drives it.
struct Lane {
    mailbox: Arc<Mailbox>,
    engine: Arc<EngineCell>,
    thread: Option<JoinHandle<()>>,
    /// Workers found wedged and replaced ([`WedgeWatch`](engine::WedgeWatch)).
    replaced: Arc<AtomicUsize>,
}

impl fmt::Debug for UcxTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UcxTransport")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("lanes", &self.lanes.len())
            .finish_non_exhaustive()
    }
}

impl UcxTransport {
    /// A transport that pulls into `store`'s arena and serves the grants of `grants` to peers
    /// that ask for writes (`None`: such requests are answered "unknown grant"). Starts the
    /// progress threads; fails with [`TransportError::Unavailable`] when UCX cannot be set up
    /// (no usable transport, a bad setting).
    pub fn new(
        store: Arc<TieredStore>,
        grants: Option<Arc<Grants>>,
        cfg: UcxConfig,
    ) -> Result<Self, TransportError> {
        // UCX itself reads UCX_TLS from the environment when the context is created, just below.
        let env_tls = std::env::var("UCX_TLS").ok();
        let tls = cfg.tls.clone().or(env_tls);
        let auto = cfg.mode == UcxMode::Auto;
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
        let may_use_tcp = may_use_tcp(tls.as_deref());
        let (inline_bytes, verify) = (cfg.inline_bytes, cfg.verify);
        // Only gets are split across lanes (see the module documentation).
        let lane_count = if mode == UcxMode::Get {
            cfg.lanes.clamp(1, MAX_LANES)
        } else {
            1
        };
        let endpoint = Arc::new(Mutex::new(Vec::new()));
        let (first, name) = Lane::start(0, &store, grants, cfg.clone(), tls.clone(), Arc::clone(&endpoint))?;
        let mut lanes = vec![first];
        for n in 1..lane_count {
            // Only the first lane's endpoint is handed out: the others only pull.
            let unused = Arc::new(Mutex::new(Vec::new()));
            match Lane::start(n, &store, None, cfg.clone(), tls.clone(), unused) {
                Ok((lane, ..)) => lanes.push(lane),
                // The lanes that started still pull; this one only added speed.
                Err(e) => {
                    tracing::warn!(lane = n, error = %e, "a further UCX lane did not start; pulling with {}", lanes.len());
                    break;
                }
            }
        }
        Ok(Self {
            store,
            mode,
            sends_by_size: auto && mode == UcxMode::PutOnRequest,
            may_use_tcp,
            tcp_only: tcp_only(tls.as_deref()),
            endpoint,
            name,
            lanes,
            inline_bytes,
            verify,
        })
    }

    /// The mode pulls use (`Auto` resolved; where that writes, pulls of several large blocks
    /// go by sends, and over TCP alone small pulls of small blocks by eager sends: see
    /// [`SEND_BLOCKS_FROM`] and [`EAGER_BLOCKS_UP_TO`]).
    pub fn mode(&self) -> UcxMode {
        self.mode
    }

    /// This transport's worker name (`host:pid`), as errors on peers and UCX's logs show it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Block messages the lanes refused so far (late, unknown or duplicate).
    #[cfg(test)]
    fn refused_blocks(&self) -> usize {
        self.lanes_total(|e| e.refused_blocks)
    }

    /// Requests for sends this transport served.
    #[cfg(test)]
    fn served_sends(&self) -> usize {
        self.lanes_total(|e| e.served_sends)
    }

    /// Blocks this transport, as a source, set out to send eagerly.
    #[cfg(test)]
    fn served_eager(&self) -> usize {
        self.lanes_total(|e| e.served_eager)
    }

    /// Writes (runs of blocks) this transport, as a source, set out to make.
    #[cfg(test)]
    fn served_writes(&self) -> usize {
        self.lanes_total(|e| e.served_writes)
    }

    /// Blocks that came to this transport's pulls eagerly.
    #[cfg(test)]
    fn eager_arrivals(&self) -> usize {
        self.lanes_total(|e| e.eager_arrivals)
    }

    /// Times a progress thread slept early, between the blocks of a pull that sleeps.
    #[cfg(test)]
    fn early_sleeps(&self) -> usize {
        self.lanes_total(|e| e.early_sleeps)
    }

    /// Pulls started that sleep between their blocks.
    #[cfg(test)]
    fn sleeping_pulls(&self) -> usize {
        self.lanes_total(|e| e.sleeping_pulls)
    }

    /// Pulls the pulling thread started to drive itself ([`driven_inline`]).
    #[cfg(test)]
    fn driven_pulls(&self) -> usize {
        self.lanes
            .iter()
            .map(|l| l.engine.drives_started.load(Ordering::Acquire))
            .sum()
    }

    /// A count of every lane's engine, summed.
    #[cfg(test)]
    fn lanes_total(&self, count: fn(&Engine) -> usize) -> usize {
        self.lanes.iter().map(|l| l.engine.with(count)).sum()
    }

    /// Workers that were found wedged and replaced by new ones, over every lane (see
    /// [`WEDGED_AFTER`]).
    pub fn replaced_workers(&self) -> usize {
        self.lanes
            .iter()
            .map(|l| l.replaced.load(Ordering::Relaxed))
            .sum()
    }

    /// How many UCX workers pull in parallel ([`UcxConfig::lanes`] in Get mode, else 1; fewer
    /// where a further lane could not start).
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// The largest pull the pulling thread drives itself ([`UcxConfig::inline_bytes`]; four
    /// times as much for checked pulls of several blocks of [`SEND_BLOCKS_FROM`] or more on
    /// average sent over TCP alone, [`CHECKED_SENDS_INLINE_TIMES`]).
    pub fn inline_bytes(&self) -> u64 {
        self.inline_bytes
    }
}

impl Lane {
    /// Opens an engine on a new progress thread (lane `n`), which writes its endpoint into
    /// `endpoint` (again whenever it replaces a wedged worker); with the worker name.
    fn start(
        n: usize,
        store: &Arc<TieredStore>,
        grants: Option<Arc<Grants>>,
        cfg: UcxConfig,
        tls: Option<String>,
        endpoint: Arc<Mutex<Vec<u8>>>,
    ) -> Result<(Self, String), TransportError> {
        let mailbox = Arc::new(Mailbox::default());
        let replaced = Arc::new(AtomicUsize::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = {
            let store = Arc::clone(store);
            let mailbox = Arc::clone(&mailbox);
            let replaced = Arc::clone(&replaced);
            let open = {
                let mailbox = Arc::clone(&mailbox);
                move || {
                    Engine::open(
                        &store,
                        grants.clone(),
                        cfg.clone(),
                        tls.as_deref(),
                        Arc::clone(&mailbox),
                    )
                }
            };
            std::thread::Builder::new()
                .name(if n == 0 {
                    "kvtier-ucx".into()
                } else {
                    format!("kvtier-ucx-{n}")
                })
                .spawn(move || {
                    let cell = match open() {
                        Ok(engine) => {
                            *endpoint.lock() = engine.endpoint.clone();
                            let name = engine.name.clone();
                            let cell = Arc::new(EngineCell::new(engine));
                            let _ = ready_tx.send(Ok((name, Arc::clone(&cell))));
                            cell
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    while let Some(mut wedged) = cell.run() {
                        tracing::error!(
                            lane = n,
                            worker = %wedged.name,
                            after = ?WEDGED_AFTER,
                            "the UCX worker has stopped receiving (a peer on this host probably \
                             died in the middle of a shared-memory message): replacing it; its \
                             transfers in flight fail"
                        );
                        wedged.replaced = true;
                        drop(wedged);
                        match open() {
                            Ok(engine) => {
                                *endpoint.lock() = engine.endpoint.clone();
                                cell.replace(engine);
                                replaced.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                tracing::error!(lane = n, error = %e, "a new UCX worker did not start; this lane stops");
                                mailbox.close_refusing(|_| e.clone());
                                return;
                            }
                        }
                    }
                })
                .map_err(|e| unavailable(format!("starting the progress thread: {e}")))?
        };
        match ready_rx.recv() {
            Ok(Ok((name, engine))) => Ok((
                Self {
                    mailbox,
                    engine,
                    thread: Some(thread),
                    replaced,
                },
                name,
            )),
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
}

/// Stops the progress threads and waits for them: transfers they still serve end (within
/// [`UcxConfig::drain`]), then UCX is torn down. Blocks the dropping thread meanwhile.
impl Drop for UcxTransport {
    fn drop(&mut self) {
        // All at once, so that their transfers end together rather than one lane after another.
        for lane in &self.lanes {
            let _ = lane.mailbox.post(Command::Stop);
        }
    }
}

/// Stops the progress thread and waits for it: transfers it still serves end (within
/// [`UcxConfig::drain`]), then UCX is torn down. Blocks the dropping thread meanwhile.
impl Drop for Lane {
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
        self.endpoint.lock().clone()
    }

    fn verifies(&self) -> bool {
        self.verify
    }

    fn replaced_data_planes(&self) -> u64 {
        self.replaced_workers() as u64
    }

    fn pull<'a>(
        &'a self,
        endpoint: &'a [u8],
        grant: GrantId,
        mut items: Vec<PullItem>,
        deadline: Instant,
    ) -> BoxFuture<'a, Vec<Pulled>> {
        Box::pin(async move {
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
                let bytes: u64 = ops.iter().map(|o| o.len).sum();
                let shape = PullShape {
                    blocks: ops.len(),
                    bytes,
                    largest: ops.iter().map(|o| o.len).max().unwrap_or(0),
                    within_inline_bytes: bytes <= self.inline_bytes,
                    runs: write_runs(
                        ops.iter().map(|o| (o.remote_offset, o.local_offset, o.len)),
                        WRITE_RUN_UP_TO,
                    )
                    .len(),
                };
                let plan = pull_plan(
                    self.mode,
                    self.sends_by_size,
                    self.tcp_only,
                    remote.rkey.is_empty(),
                    shape,
                );
                let drives = driven_inline(self.inline_bytes, shape, plan, self.tcp_only, self.verify);
                let PullPlan { mode, eager } = plan;
                let sleeps = sleeps_between_blocks(mode, self.may_use_tcp, self.verify, ops.len(), bytes);
                let spec = |ops: Vec<OpSpec>| PullSpec {
                    remote: remote.clone(),
                    grant,
                    mode,
                    sleeps,
                    eager,
                    ops,
                    deadline,
                    reply: reply.clone(),
                };
                // Each block is verified as soon as it has landed (the engine checksums gets),
                // unless verification is off.
                let mut verify = |n: usize, r: Result<Option<u64>, TransportError>| {
                    let item = &mut items[n];
                    results[n] = Some(r.and_then(|sum| {
                        let good = match sum {
                            _ if !self.verify => true,
                            Some(sum) => sum == item.checksum,
                            None => super::verify(&self.store, &mut item.slot, item.checksum),
                        };
                        if good {
                            Ok(())
                        } else {
                            Err(TransportError::Checksum {
                                peer: remote.label(),
                                index: item.index,
                            })
                        }
                    }));
                };
                let parts = if mode == UcxMode::Get && bytes >= SPLIT_FROM_BYTES {
                    self.lanes.len()
                } else {
                    1
                };
                let mut runs = split_by_bytes(ops, parts).into_iter();
                // An inline pull's first run is driven below by this thread on the first lane,
                // after the other lanes have theirs.
                let driven = if drives { runs.next() } else { None };
                let lanes = if drives { &self.lanes[1..] } else { &self.lanes[..] };
                for (lane, ops) in lanes.iter().zip(runs) {
                    // A lane that has stopped drops the spec, and its ops stay unsettled.
                    let _ = lane.mailbox.post(Command::Pull(spec(ops)));
                }
                if let Some(ops) = driven {
                    let budget = inline_budget(ops.iter().map(|o| o.len).sum());
                    let first = &self.lanes[0];
                    // Over TCP alone a pull that finds another driven waits its turn; where UCX
                    // may use shared memory it goes to the mailbox (see `EngineCell::drive`).
                    let post_if_driven = !self.tcp_only;
                    match first.engine.drive(
                        spec(ops),
                        budget,
                        post_if_driven,
                        &first.mailbox,
                        &mut settled,
                        &mut verify,
                    ) {
                        Driven::Started => {}
                        // Busy: the turns of the thread that drives the worker take it (or the
                        // progress thread's, once that thread has left).
                        // Stopped: refused too if the thread is on its way out; the ops stay
                        // unsettled.
                        Driven::Stopped(spec) | Driven::Busy(spec) => {
                            let _ = first.mailbox.post(Command::Pull(spec));
                        }
                    }
                }
                drop(reply);
                // Every spec holds a sender: the channel closes once each is over or dropped.
                while let Some(batch) = settled.recv().await {
                    for (n, r) in batch {
                        verify(n, r);
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

/// What decides how one pull moves its blocks.
#[derive(Debug, Clone, Copy)]
struct PullShape {
    blocks: usize,
    bytes: u64,
    /// The largest block's length.
    largest: u64,
    /// At most [`UcxConfig::inline_bytes`]: the pulling thread drives it, whatever the plan
    /// ([`driven_inline`]).
    within_inline_bytes: bool,
    /// The writes a source makes for the blocks ([`write_runs`]).
    runs: usize,
}

impl PullShape {
    /// Several blocks of [`SEND_BLOCKS_FROM`] or more on average: sent rather than written
    /// where `Auto` writes ([`pull_plan`]).
    fn large_blocks(&self) -> bool {
        self.blocks > 1 && average_at_least(self.blocks, self.bytes, SEND_BLOCKS_FROM)
    }
}

/// How one pull moves its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PullPlan {
    mode: UcxMode,
    /// The source is asked to send the blocks eagerly ([`EAGER_BLOCKS_UP_TO`]).
    eager: bool,
}

/// How one pull of `shape` moves its blocks on a transport in `mode`:
/// * a source that publishes no key (`keyless_source`) is not read one-sidedly but asked to
///   write;
/// * where `Auto` picked writes (`sends_by_size`), several blocks of [`SEND_BLOCKS_FROM`] or
///   more on average are asked for by sends, and, where UCX carries the bytes over TCP alone
///   (`tcp_only`), so are the blocks of a pull the pulling thread drives whose blocks are all
///   [`EAGER_BLOCKS_UP_TO`] or less;
/// * either kind stays written where, over TCP alone, the source writes the pull in runs
///   long enough to be faster ([`RUN_WRITES_FROM`]);
/// * a pull the pulling thread drives over TCP alone whose blocks are all
///   [`EAGER_BLOCKS_UP_TO`] or less is sent eagerly where it is sent, whether `Auto` or the
///   configuration picked sends.
fn pull_plan(
    mode: UcxMode,
    sends_by_size: bool,
    tcp_only: bool,
    keyless_source: bool,
    shape: PullShape,
) -> PullPlan {
    let PullShape {
        blocks,
        bytes,
        largest,
        within_inline_bytes,
        runs,
    } = shape;
    let in_runs = tcp_only
        && blocks >= 2 * runs
        && average_at_least(runs, bytes, RUN_WRITES_FROM)
        && !average_at_least(blocks, bytes, RUN_BLOCKS_BELOW)
        && bytes <= RUN_WRITES_UP_TO;
    let large_blocks = shape.large_blocks();
    let small_inline = tcp_only && within_inline_bytes && blocks > 0 && largest <= EAGER_BLOCKS_UP_TO;
    let mode = match mode {
        UcxMode::Get if keyless_source => UcxMode::PutOnRequest,
        UcxMode::PutOnRequest if sends_by_size && (large_blocks || small_inline) && !in_runs => {
            UcxMode::SendOnRequest
        }
        m => m,
    };
    PullPlan {
        mode,
        eager: mode == UcxMode::SendOnRequest && small_inline,
    }
}

/// Whether the pulling thread drives a pull of `shape` that moves by `plan` itself: up to
/// `inline_bytes` ([`UcxConfig::inline_bytes`]), or up to [`CHECKED_SENDS_INLINE_TIMES`] as
/// many where, over TCP alone (`tcp_only`), the source sends several blocks of
/// [`SEND_BLOCKS_FROM`] or more on average in rendezvous and the puller checks them
/// (`checked`). Smaller blocks were not measured driven past `inline_bytes`: `Auto` writes
/// them there, and only a configured [`UcxMode::SendOnRequest`] sends them in rendezvous (a
/// pull sent eagerly has blocks of [`EAGER_BLOCKS_UP_TO`] or less, so never these).
fn driven_inline(inline_bytes: u64, shape: PullShape, plan: PullPlan, tcp_only: bool, checked: bool) -> bool {
    let checked_sends = tcp_only && checked && shape.large_blocks() && plan.mode == UcxMode::SendOnRequest;
    let limit = if checked_sends {
        inline_bytes.saturating_mul(CHECKED_SENDS_INLINE_TIMES)
    } else {
        inline_bytes
    };
    shape.bytes <= limit
}

/// Whether the puller's progress thread sleeps between the blocks of a pull in `mode` of
/// `blocks` blocks and `bytes` bytes, rather than polling ([`SLEEP_BETWEEN_BLOCKS_FROM`], or
/// [`SLEEP_BETWEEN_CHECKED_BLOCKS_FROM`] where the puller checks its blocks).
fn sleeps_between_blocks(mode: UcxMode, may_use_tcp: bool, checked: bool, blocks: usize, bytes: u64) -> bool {
    let source_moves = matches!(mode, UcxMode::PutOnRequest | UcxMode::SendOnRequest);
    let from = if checked {
        SLEEP_BETWEEN_CHECKED_BLOCKS_FROM
    } else {
        SLEEP_BETWEEN_BLOCKS_FROM
    };
    may_use_tcp && source_moves && blocks > 0 && average_at_least(blocks, bytes, from)
}

/// Whether `blocks` blocks of `bytes` bytes in all average `min` bytes or more.
fn average_at_least(blocks: usize, bytes: u64, min: u64) -> bool {
    bytes >= blocks as u64 * min
}

/// `ops` in at most `parts` runs of consecutive ops with about as many bytes each (none
/// empty), one per lane.
fn split_by_bytes(ops: Vec<OpSpec>, parts: usize) -> Vec<Vec<OpSpec>> {
    let total: u64 = ops.iter().map(|o| o.len).sum();
    let parts = parts.clamp(1, ops.len().max(1)) as u64;
    let mut runs: Vec<Vec<OpSpec>> = Vec::with_capacity(parts as usize);
    let mut run = Vec::new();
    let mut sum = 0u64;
    for op in ops {
        run.push(op);
        sum += op.len;
        // Run k ends once the bytes so far reach k/parts of the total.
        let k = runs.len() as u64 + 1;
        if k < parts && u128::from(sum) * u128::from(parts) >= u128::from(total) * u128::from(k) {
            runs.push(std::mem::take(&mut run));
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
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

#[cfg(test)]
mod tests;

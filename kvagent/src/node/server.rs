//! The local socket server: one thread per engine connection.
//!
//! Why threads and not an async executor: a node has a handful of engine workers (one per GPU),
//! each making small synchronous calls, so a dedicated blocking thread answers with no executor
//! hop (the round trip is the contract in DESIGN §9), and a call that promotes from disk may
//! block its own thread without stalling anyone else. `max_clients` bounds the threads.

use std::collections::HashMap;
use std::io::{self, IoSlice, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kvstore::BlockHash;
use kvstore::TieredStore;
use kvstore::wire::{
    self, AcquireStatus, ErrorCode, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, ReadError, Request, Response,
    Welcome, tier_for_version,
};
use parking_lot::{Condvar, Mutex};

use super::peer::Peers;
use super::publish::Models;
use super::session::Session;
use crate::metrics::Metrics;

/// How long a new connection may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an answer may wait for a client that does not read it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// State shared by the accept loop, the connection threads and the shutdown path.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) store: Arc<TieredStore>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) instance: u64,
    pub(crate) default_deadline: Duration,
    pub(crate) max_clients: u32,
    /// How long a connection thread polls for the next call before sleeping.
    pub(crate) poll: Duration,
    pub(crate) draining: AtomicBool,
    next_conn: AtomicU64,
    /// Open connections, to close idle ones on drain.
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    drained: Condvar,
    /// A duplicate of the listening socket, shut down to wake the accept loop on drain.
    listener: Mutex<Option<std::os::fd::OwnedFd>>,
    /// The models engines announced for their namespaces (for the index publisher).
    pub(crate) models: Arc<Models>,
    /// Transfers with other nodes' agents.
    pub(crate) peers: Arc<Peers>,
    /// Write-through to the object tier of blocks committed in large enough batches.
    write_through: Option<WriteThrough>,
    /// Checksums of committed blocks computed ahead of peers' grants (`peer.checksum_on_commit`
    /// on an agent that serves peers).
    checksums_ahead: Option<AfterCommit>,
}

/// Committed blocks handed to a thread for work the commit itself must not wait for. A full
/// queue drops the batch (the caller decides whether that is worth counting).
#[derive(Debug)]
struct AfterCommit {
    queue: std::sync::mpsc::SyncSender<Vec<kvstore::BlockKey>>,
}

/// Batches an [`AfterCommit`] queue holds before new ones are dropped.
const AFTER_COMMIT_QUEUE: usize = 256;

impl AfterCommit {
    fn start(
        thread: &str,
        mut work: impl FnMut(Vec<kvstore::BlockKey>) + Send + 'static,
    ) -> anyhow::Result<Self> {
        let (queue, rx) = std::sync::mpsc::sync_channel(AFTER_COMMIT_QUEUE);
        std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || rx.into_iter().for_each(&mut work))
            .with_context(|| format!("starting the {thread} thread"))?;
        Ok(Self { queue })
    }

    /// Queues `keys`; `false` when the queue was full and they were dropped.
    fn offer(&self, keys: Vec<kvstore::BlockKey>) -> bool {
        self.queue.try_send(keys).is_ok()
    }
}

/// Commits worth sharing, copied to the object tier by their own thread.
#[derive(Debug)]
struct WriteThrough {
    min_blocks: usize,
    copies: AfterCommit,
}

impl WriteThrough {
    fn start(
        store: &Arc<TieredStore>,
        metrics: &Arc<Metrics>,
        min_blocks: u32,
    ) -> anyhow::Result<Option<Self>> {
        if min_blocks == 0 || store.object().is_none() {
            return Ok(None);
        }
        let store = Arc::clone(store);
        let metrics = Arc::clone(metrics);
        let copies = AfterCommit::start("kvagent-object-wt", move |keys| {
            let n = store.write_through(&keys);
            metrics.write_through_blocks.inc_by(n as u64);
        })?;
        Ok(Some(Self {
            min_blocks: min_blocks as usize,
            copies,
        }))
    }
}

/// What the drain needs to know about one connection.
#[derive(Debug)]
struct ConnState {
    /// A clone of the connection's stream.
    stream: UnixStream,
    /// A call is being served (read, not yet answered).
    busy: AtomicBool,
    /// Reservations the connection holds: it is about to commit them.
    reservations: AtomicUsize,
}

impl ConnState {
    /// Whether the drain may close the connection now without losing a call or a save.
    fn idle(&self) -> bool {
        !self.busy.load(Ordering::SeqCst) && self.reservations.load(Ordering::SeqCst) == 0
    }
}

impl Shared {
    #[expect(
        clippy::too_many_arguments,
        reason = "each is one setting of the server, built once"
    )]
    pub(crate) fn new(
        store: Arc<TieredStore>,
        metrics: Arc<Metrics>,
        instance: u64,
        default_deadline: Duration,
        max_clients: u32,
        poll: Duration,
        peers: Arc<Peers>,
        write_through_min_blocks: u32,
        checksum_on_commit: bool,
    ) -> anyhow::Result<Arc<Self>> {
        let write_through = WriteThrough::start(&store, &metrics, write_through_min_blocks)?;
        let checksums_ahead = if checksum_on_commit {
            let store = Arc::clone(&store);
            Some(AfterCommit::start("kvagent-checksum", move |keys| {
                store.host().fill_checksums(&keys);
            })?)
        } else {
            None
        };
        Ok(Arc::new(Self {
            store,
            metrics,
            instance,
            default_deadline,
            max_clients,
            poll,
            draining: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            conns: Mutex::new(HashMap::new()),
            drained: Condvar::new(),
            listener: Mutex::new(None),
            models: Arc::new(Models::default()),
            peers,
            write_through,
            checksums_ahead,
        }))
    }

    /// Hands committed blocks to the work that follows a commit: write-through when the batch
    /// is large enough, checksums ahead of grants (a full queue leaves those to the grant).
    fn after_commit(&self, ns: kvstore::Namespace, hashes: &[BlockHash], committed: &[bool]) {
        let write_through = self
            .write_through
            .as_ref()
            .filter(|wt| hashes.len() >= wt.min_blocks);
        if write_through.is_none() && self.checksums_ahead.is_none() {
            return;
        }
        let keys: Vec<kvstore::BlockKey> = hashes
            .iter()
            .zip(committed)
            .filter(|(_, c)| **c)
            .map(|(h, _)| kvstore::BlockKey::new(ns, *h))
            .collect();
        if keys.is_empty() {
            return;
        }
        if let Some(ahead) = &self.checksums_ahead {
            // Dropped when the queue is full: the grant computes what is missing.
            ahead.offer(keys.clone());
        }
        if let Some(wt) = write_through {
            let n = keys.len() as u64;
            if !wt.copies.offer(keys) {
                self.metrics.write_through_dropped.inc_by(n);
            }
        }
    }

    /// Starts the drain: no new connections; idle connections are closed now; a connection
    /// serving a call or holding reservations is closed once it has answered and committed (or
    /// aborted) them — new work on it is refused with `ShuttingDown`, giving slots back is not.
    pub(crate) fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        if let Some(fd) = self.listener.lock().as_ref() {
            // Wakes the accept loop (a shut-down listening socket fails `accept`).
            let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Read);
        }
        for c in self.conns.lock().values() {
            if c.idle() {
                let _ = c.stream.shutdown(std::net::Shutdown::Read);
            }
        }
    }

    /// Waits until every connection thread has finished, up to `timeout`; then closes whatever
    /// is left and waits a little more. `false` if connections outlived both.
    pub(crate) fn wait_drained(&self, timeout: Duration) -> bool {
        if self.wait_conns(timeout) {
            return true;
        }
        for c in self.conns.lock().values() {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        self.wait_conns(Duration::from_secs(1))
    }

    fn wait_conns(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut conns = self.conns.lock();
        while !conns.is_empty() {
            if self.drained.wait_until(&mut conns, deadline).timed_out() {
                return conns.is_empty();
            }
        }
        true
    }
}

/// Binds the socket at `path`: creates its directory, replaces a stale socket file left by a
/// dead agent, refuses to start beside a live one or over a file that is not a socket, and sets
/// the mode (and group) engines need to connect.
pub(crate) fn bind(path: &Path, mode: u32, gid: Option<u32>) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                bail!("another kvagent is already listening on {}", path.display());
            }
            tracing::info!(socket = %path.display(), "removing stale socket of a previous agent");
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("giving {} to group {gid}", path.display()))?;
    }
    Ok(listener)
}

/// Accepts connections until the agent drains, each served on its own thread.
pub(crate) fn accept_loop(listener: UnixListener, shared: Arc<Shared>, path: PathBuf) {
    match listener.try_clone() {
        Ok(dup) => *shared.listener.lock() = Some(std::os::fd::OwnedFd::from(dup)),
        Err(e) => tracing::warn!(error = %e, "cannot keep a handle to wake the accept loop"),
    }
    for stream in listener.incoming() {
        if shared.draining.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                // EMFILE and friends: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        // A client that stops reading must not hold a connection thread forever.
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let state = {
            let mut conns = shared.conns.lock();
            if conns.len() >= shared.max_clients as usize {
                drop(conns);
                shared.metrics.error("hello", "too_many_clients");
                tracing::warn!(
                    max = shared.max_clients,
                    "refusing a connection: too many clients"
                );
                let _ = reply_error(
                    &stream,
                    &mut Vec::new(),
                    0,
                    ErrorCode::Internal,
                    "too many clients connected to this agent",
                );
                continue;
            }
            let state = match stream.try_clone() {
                Ok(c) => Arc::new(ConnState {
                    stream: c,
                    busy: AtomicBool::new(false),
                    reservations: AtomicUsize::new(0),
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot track a connection; closing it");
                    continue;
                }
            };
            conns.insert(id, Arc::clone(&state));
            state
        };
        if shared.draining.load(Ordering::SeqCst) {
            // The drain began while this connection was being accepted: close it like the rest.
            let _ = stream.shutdown(std::net::Shutdown::Read);
        }
        shared.metrics.connections.inc();
        shared.metrics.clients.inc();
        let s = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name(format!("kvagent-conn-{id}"))
            .spawn(move || {
                serve(stream, &s, &state, id);
                s.metrics.clients.dec();
                s.conns.lock().remove(&id);
                s.drained.notify_all();
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a connection thread");
            shared.metrics.clients.dec();
            shared.conns.lock().remove(&id);
        }
    }
    tracing::debug!(socket = %path.display(), "accept loop stopped");
}

/// Serves one connection until it closes, fails or the agent drains. The session it creates
/// gives back everything the connection held when this returns.
fn serve(stream: UnixStream, shared: &Shared, state: &ConnState, id: u64) {
    let span = tracing::debug_span!("conn", id);
    let _enter = span.enter();
    let mut body = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    let version = match handshake(&stream, shared, &mut body, &mut out) {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!(error = %e, "handshake failed; closing");
            return;
        }
    };
    let mut session = Session::new(Arc::clone(&shared.store));
    let mut reader = wire::FrameReader::default();
    loop {
        let body = match reader.read_frame(&mut wire::PollingReader::new(&stream, shared.poll)) {
            Ok(body) => body,
            Err(ReadError::Closed) => break,
            Err(ReadError::Io(e)) => {
                tracing::debug!(error = %e, "connection failed");
                shared.metrics.error("frame", "io");
                break;
            }
            Err(ReadError::Wire(e)) => {
                tracing::warn!(error = %e, "bad frame length; closing the connection");
                shared.metrics.error("frame", "malformed");
                let _ = reply_error(&stream, &mut out, 0, ErrorCode::Malformed, &e.to_string());
                break;
            }
        };
        let received = Instant::now();
        state.busy.store(true, Ordering::SeqCst);
        let (header, req) = match Request::decode(body) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "malformed frame; closing the connection");
                shared.metrics.error("frame", "malformed");
                let _ = reply_error(
                    &stream,
                    &mut out,
                    wire::peek_id(body),
                    ErrorCode::Malformed,
                    &e.to_string(),
                );
                break;
            }
        };
        let deadline = received
            + match header.deadline_us {
                0 => shared.default_deadline,
                us => Duration::from_micros(u64::from(us)),
            };
        let verb = req.verb();
        let (resp, blocks) = dispatch(&mut session, shared, req, deadline, version);
        if let Response::Error { code, .. } = &resp {
            shared.metrics.error(verb, error_reason(*code));
        }
        out.clear();
        resp.encode(header.id, &mut out);
        // Recorded before answering, so that a client that scrapes after its call sees it.
        shared.metrics.observe(verb, blocks, received.elapsed());
        let written = wire::send_all(&stream, &out);
        state.reservations.store(session.held().0, Ordering::SeqCst);
        state.busy.store(false, Ordering::SeqCst);
        if let Err(e) = written {
            tracing::debug!(error = %e, "cannot answer; closing");
            break;
        }
        if shared.draining.load(Ordering::SeqCst) && state.idle() {
            // Drained: nothing in flight and nothing left to commit on this connection.
            break;
        }
        if matches!(
            resp,
            Response::Error {
                code: ErrorCode::Unexpected,
                ..
            }
        ) {
            break;
        }
    }
    let (reserved, leased) = session.held();
    tracing::debug!(reserved, leased, "connection closed");
}

fn error_reason(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Malformed => "malformed",
        ErrorCode::UnsupportedVersion => "version",
        ErrorCode::DeadlineExceeded => "deadline",
        ErrorCode::ShuttingDown => "shutting_down",
        ErrorCode::Unexpected => "unexpected",
        ErrorCode::Internal => "internal",
        ErrorCode::LimitReached => "limit",
        ErrorCode::PeerFailed => "peer",
    }
}

/// Answers with an error before the connection is closed. Unread input is discarded first
/// (bounded): closing a Unix socket with unread data resets it, and the client would see the
/// reset instead of the error that explains it.
fn reply_error(
    stream: &UnixStream,
    out: &mut Vec<u8>,
    id: u32,
    code: ErrorCode,
    msg: &str,
) -> io::Result<()> {
    out.clear();
    Response::Error {
        code,
        message: msg.into(),
    }
    .encode(id, out);
    wire::send_all(stream, out)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    stream.set_nonblocking(true)?;
    let mut sink = [0u8; 16 << 10];
    let mut left = 1usize << 20;
    while left > 0 {
        match io::Read::read(&mut &*stream, &mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
    Ok(())
}

/// Reads the hello, checks its version and answers with the welcome and the arena fd.
fn handshake(
    stream: &UnixStream,
    shared: &Shared,
    body: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> anyhow::Result<u16> {
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let read = wire::read_frame(&mut &*stream, body);
    stream.set_read_timeout(None)?;
    if let Err(e) = read {
        if let ReadError::Wire(w) = &e {
            shared.metrics.error("hello", "malformed");
            let _ = reply_error(stream, out, 0, ErrorCode::Malformed, &w.to_string());
        }
        return Err(e.into());
    }
    let (header, client, version) = match Request::decode(body) {
        Ok((h, Request::Hello { version, client }))
            if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) =>
        {
            (h, client, version)
        }
        Ok((h, Request::Hello { version, .. })) => {
            shared.metrics.error("hello", "version");
            let msg = format!(
                "protocol version {version} is not supported; this agent speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
            );
            let _ = reply_error(stream, out, h.id, ErrorCode::UnsupportedVersion, &msg);
            bail!(msg);
        }
        Ok((h, other)) => {
            shared.metrics.error("hello", "unexpected");
            let msg = format!("expected a hello, got {}", other.verb());
            let _ = reply_error(stream, out, h.id, ErrorCode::Unexpected, &msg);
            bail!(msg);
        }
        Err(e) => {
            shared.metrics.error("hello", "malformed");
            let _ = reply_error(
                stream,
                out,
                wire::peek_id(body),
                ErrorCode::Malformed,
                &e.to_string(),
            );
            return Err(e.into());
        }
    };
    let arena = shared.store.host().arena();
    let welcome = Welcome {
        // The client's version: an engine built against an older agent keeps working through
        // a rolling upgrade.
        version,
        arena_len: arena.len(),
        max_block_len: shared.store.host().max_block_len(),
        instance: shared.instance,
    };
    out.clear();
    Response::Welcome(welcome).encode(header.id, out);
    send_with_fd(stream, out, arena.fd())?;
    tracing::debug!(client, version, "engine connected");
    Ok(version)
}

/// Sends `frame` with `fd` attached (SCM_RIGHTS) in one message, so the fd arrives with the
/// frame's first bytes.
fn send_with_fd(stream: &UnixStream, frame: &[u8], fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("control buffer too small for one fd"));
    }
    let sent = loop {
        match sendmsg(
            stream.as_fd(),
            &[IoSlice::new(frame)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    (&*stream).write_all(&frame[sent..])
}

/// Runs one call and returns its answer and the number of blocks it named.
fn dispatch(
    session: &mut Session,
    shared: &Shared,
    req: Request,
    deadline: Instant,
    version: u16,
) -> (Response, usize) {
    if shared.draining.load(Ordering::SeqCst)
        && !matches!(
            req,
            Request::Commit(..) | Request::Abort(..) | Request::Release(..) | Request::Unhold(..)
        )
    {
        // Calls that give slots (or held blocks) back still run while draining; new work is
        // refused.
        return (
            Response::Error {
                code: ErrorCode::ShuttingDown,
                message: "the agent is shutting down".into(),
            },
            0,
        );
    }
    if Instant::now() > deadline {
        return (
            Response::Error {
                code: ErrorCode::DeadlineExceeded,
                message: "the deadline passed before the call ran".into(),
            },
            0,
        );
    }
    match req {
        Request::Hello { .. } => (
            Response::Error {
                code: ErrorCode::Unexpected,
                message: "a second hello on one connection".into(),
            },
            0,
        ),
        Request::Lookup(ns, hashes) => {
            let mut tiers = session.lookup(ns, &hashes, deadline);
            // Protocol 3 knows blocks held by a peer.
            if version >= 3 && tiers.len() < hashes.len() {
                tiers = shared.peers.extend_lookup(&shared.models, ns, &hashes, tiers);
            }
            for t in &mut tiers {
                *t = tier_for_version(*t, version);
            }
            (Response::Lookup(tiers), hashes.len())
        }
        Request::Reserve(ns, items) => (Response::Reserve(session.reserve(ns, &items)), items.len()),
        Request::Commit(ns, hashes) => {
            let committed = session.commit(ns, &hashes, false);
            shared.after_commit(ns, &hashes, &committed);
            (Response::Commit(committed), hashes.len())
        }
        Request::Abort(ns, hashes) => (Response::Abort(session.commit(ns, &hashes, true)), hashes.len()),
        Request::Acquire(ns, hashes) => {
            shared.peers.fetch_for_acquire(ns, &hashes, deadline);
            let mut got = session.acquire(ns, &hashes, deadline);
            for g in &mut got {
                if let AcquireStatus::Hit { tier, .. } = g {
                    *tier = tier_for_version(*tier, version);
                }
            }
            if Instant::now() > deadline {
                // The client has given up (a promotion took too long): don't leave it pins it
                // will never release on this connection.
                let hits: Vec<BlockHash> = hashes
                    .iter()
                    .zip(&got)
                    .filter(|(_, g)| matches!(g, AcquireStatus::Hit { .. }))
                    .map(|(h, _)| *h)
                    .collect();
                session.release(ns, &hits);
                return (
                    Response::Error {
                        code: ErrorCode::DeadlineExceeded,
                        message: "promotion from a lower tier outlasted the deadline".into(),
                    },
                    hashes.len(),
                );
            }
            (Response::Acquire(got), hashes.len())
        }
        Request::Release(ns, hashes) => (Response::Release(session.release(ns, &hashes)), hashes.len()),
        Request::Stats => (Response::Stats(super::stats_json(shared)), 0),
        Request::Pull(peer, ns, hashes, ticket) => {
            match shared
                .peers
                .pull_blocking(&peer, ns, &super::session::keys(ns, &hashes), deadline, ticket)
            {
                Ok(held) => (Response::Pull(held), hashes.len()),
                Err(e) => {
                    tracing::warn!(peer, error = %e, "pull for an engine failed; it recomputes");
                    (
                        Response::Error {
                            code: ErrorCode::PeerFailed,
                            message: e.to_string(),
                        },
                        hashes.len(),
                    )
                }
            }
        }
        Request::Hold(ns, hashes, ticket) => {
            let out = shared.peers.grants().hold(
                &super::session::keys(ns, &hashes),
                super::session::budget(deadline),
                ticket,
            );
            (
                Response::Hold {
                    held: u32::try_from(out.held).unwrap_or(u32::MAX),
                    tiers: out.tiers,
                },
                hashes.len(),
            )
        }
        Request::Unhold(ns, ticket) => {
            let ended = shared.peers.grants().unhold(ns, ticket);
            (Response::Unhold(u32::try_from(ended).unwrap_or(u32::MAX)), 0)
        }
        Request::Announce(ns, model) => {
            if shared.models.announce(ns, &model) {
                (Response::Announce, 0)
            } else {
                (
                    Response::Error {
                        code: ErrorCode::LimitReached,
                        message: format!(
                            "more than {} namespaces announced; {ns} is not reported to the index",
                            Models::MAX
                        ),
                    },
                    0,
                )
            }
        }
    }
}

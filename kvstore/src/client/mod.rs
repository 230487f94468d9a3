//! The one client of the node agent's local socket, behind the C ABI and the Python extension.
//!
//! A [`Client`] holds one connection and the agent's arena, mapped from the fd the agent passes
//! in the handshake. Data never crosses the socket: a save reserves slots, copies into them and
//! commits; a load acquires slots, copies out of them and releases. Each call is bounded by the
//! configured timeout; when the agent is absent or dies, calls fail at once with
//! [`ClientError::Unavailable`] and the next call connects again, so an engine recomputes
//! instead of waiting.
//!
//! The client is blocking and `Send + Sync` (calls on one client are serialised by a mutex); an
//! async caller runs it on a blocking thread (`tokio::task::spawn_blocking`), which the bounded
//! deadline makes safe. Threads that want parallel calls open one client each.

mod handle;
mod socket;

use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

pub use self::handle::{Acquired, LiveHold, Reserved};
use self::handle::{Link, Slot};
use crate::arena::HostArena;
use crate::key::{BlockHash, Namespace};
use crate::stats::TierLevel;
use crate::transport::{HoldOutcome, HoldTicket};
use crate::wire::{
    self, AcquireStatus, ErrorCode, MAX_BATCH, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, ReadError, Request,
    ReserveStatus, Response, Welcome,
};

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/kvtier/agent.sock";

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The agent's socket.
    pub socket: PathBuf,
    /// Bounds each step of a call: connecting, sending, waiting for the answer. A call that
    /// found its connection dead and is retried on a fresh one (lookup, reserve, acquire,
    /// stats) may take up to about twice as long.
    pub timeout: Duration,
    /// Names this client in the agent's logs.
    pub name: String,
    /// How long to poll for an answer before sleeping on the socket (see
    /// [`wire::PollingReader`]); zero never polls.
    pub spin: Duration,
}

/// The environment variable naming the agent's socket, read by [`ClientConfig::from_env`] (and
/// by the C ABI and the Python bindings when no path is given).
pub const SOCKET_ENV: &str = "KVTIER_SOCKET";

impl ClientConfig {
    /// Settings for the socket named by `KVTIER_SOCKET`, else [`DEFAULT_SOCKET`].
    pub fn from_env() -> Self {
        Self::new(std::env::var_os(SOCKET_ENV).map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from))
    }

    /// Settings for `socket` with a 1 s timeout.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: Duration::from_secs(1),
            name: format!("pid-{}", std::process::id()),
            spin: Duration::from_micros(100),
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No agent answers at the socket, or the connection to it broke. The engine should
    /// recompute; the next call tries to connect again.
    #[error("kvtier agent unavailable at {}: {source}", socket.display())]
    Unavailable {
        /// The socket tried.
        socket: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The call did not complete within the timeout; the connection is dropped (the agent then
    /// releases whatever it held for it).
    #[error("kvtier agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent refused the call.
    #[error("kvtier agent refused {verb}: {message} ({code:?})")]
    Refused {
        /// The verb.
        verb: &'static str,
        /// The agent's code.
        code: ErrorCode,
        /// The agent's explanation.
        message: String,
    },
    /// The agent sent something this client does not understand (a version mismatch or a bug).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A handle from an earlier connection (which timed out, or the agent restarted since):
    /// the agent gave its slot back when that connection ended.
    #[error("handle belongs to an earlier connection to the agent; its slot is gone")]
    StaleHandle,
    /// Handles taken by another client: only the client that took them can settle them.
    #[error("handles belong to another client")]
    ForeignHandle,
    /// An argument the protocol cannot carry.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The agent speaks a protocol version that has no such call (it is older than this
    /// client, or restarted older since the call was chosen).
    #[error("the agent speaks protocol {version}, which has no {verb} ({since} or later needed)")]
    Unsupported {
        /// The verb.
        verb: &'static str,
        /// The version the agent speaks.
        version: u16,
        /// The oldest version that has the call.
        since: u16,
    },
    /// More blocks in one call than the protocol allows.
    #[error("{0} blocks in one call; at most {MAX_BATCH}")]
    BatchTooLarge(usize),
    /// A caller's buffer does not match the block.
    #[error("buffer of {buf} bytes does not match the block of {len} bytes")]
    BufferSize {
        /// The caller's buffer length.
        buf: usize,
        /// The block's length.
        len: u64,
    },
    /// The arena received from the agent could not be mapped.
    #[error("cannot map the agent's arena: {0}")]
    Arena(#[from] crate::Error),
    /// A device copy engine could not take the arena.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
}

/// Result alias of the client.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// What a save did with one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveOutcome {
    /// Written and committed.
    Stored,
    /// Already stored (or being stored by another writer): nothing written.
    Exists,
    /// The agent had no room; the block is not cached.
    NoSpace,
    /// Larger than any slot of the arena.
    TooLarge,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    link: Arc<Link>,
    welcome: Welcome,
    buf: Vec<u8>,
    reader: wire::FrameReader,
    next_id: u32,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Before the socket closes (and the agent takes the slots back): no copy through a
        // handle of this connection runs after this.
        self.link.end();
    }
}

/// A connection to the node agent; see the module documentation.
#[derive(Debug)]
pub struct Client {
    cfg: ClientConfig,
    conn: Mutex<Option<Conn>>,
    /// Namespaces announced with their models, sent again on every new connection (a restarted
    /// agent knows none of them).
    announced: Mutex<Vec<(Namespace, String)>>,
}

/// Most announcements a client remembers for its reconnections (the agent's own bound).
const MAX_ANNOUNCED: usize = 4096;

/// Whether a verb may be sent again on a fresh connection after the old one turned out dead:
/// it refers to no state of the old connection and the dead agent took none with it.
fn retryable(req: &Request) -> bool {
    matches!(
        req,
        Request::Lookup(..)
            | Request::Reserve(..)
            | Request::Acquire(..)
            | Request::Stats
            | Request::Announce(..)
            | Request::Pull(..)
    )
}

fn check_batch(n: usize) -> Result<()> {
    if n > MAX_BATCH as usize {
        Err(ClientError::BatchTooLarge(n))
    } else {
        Ok(())
    }
}

impl Client {
    /// Connects to the agent (handshake, arena mapping).
    pub fn connect(cfg: ClientConfig) -> Result<Self> {
        let conn = Self::open(&cfg)?;
        Ok(Self {
            cfg,
            conn: Mutex::new(Some(conn)),
            announced: Mutex::new(Vec::new()),
        })
    }

    /// A client that connects on its first call, so an engine can start before its agent.
    pub fn lazy(cfg: ClientConfig) -> Self {
        Self {
            cfg,
            conn: Mutex::new(None),
            announced: Mutex::new(Vec::new()),
        }
    }

    /// The settings.
    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// Whether a connection is open now (it may still turn out dead on the next call).
    pub fn is_connected(&self) -> bool {
        self.conn.lock().is_some()
    }

    /// The largest block the agent's arena takes; connects if needed.
    pub fn max_block_len(&self) -> Result<u64> {
        let mut guard = self.conn.lock();
        Ok(self.ensure(&mut guard)?.welcome.max_block_len)
    }

    /// Registers the arena mapping of the current connection (connecting if needed) with
    /// `engine`, so that the first device copy does not pay for pinning the whole arena. Copies
    /// through a later connection's mapping register that one when they first need it.
    pub fn register_arena(&self, engine: &std::sync::Arc<dyn crate::device::CopyEngine>) -> Result<()> {
        let link = {
            let mut guard = self.conn.lock();
            Arc::clone(&self.ensure(&mut guard)?.link)
        };
        Ok(link.register_with(engine)?)
    }

    /// The instance number of the agent connected now (it changes when the agent restarts).
    pub fn agent_instance(&self) -> Option<u64> {
        self.conn.lock().as_ref().map(|c| c.link.instance)
    }

    /// Closes the connection now (the agent gives back everything it held); the next call
    /// connects again.
    pub fn disconnect(&self) {
        *self.conn.lock() = None;
    }

    fn unavailable(&self, source: io::Error) -> ClientError {
        ClientError::Unavailable {
            socket: self.cfg.socket.clone(),
            source,
        }
    }

    /// Connects in the newest version the agent speaks: an agent older than this client
    /// refuses a hello of a version it does not know, and is greeted again one version lower
    /// (engines may be upgraded before the agents of their nodes).
    fn open(cfg: &ClientConfig) -> Result<Conn> {
        let mut version = PROTOCOL_VERSION;
        loop {
            match Self::open_at(cfg, version) {
                Err(ClientError::Refused {
                    code: ErrorCode::UnsupportedVersion,
                    ..
                }) if version > MIN_PROTOCOL_VERSION => version -= 1,
                other => return other,
            }
        }
    }

    fn open_at(cfg: &ClientConfig, version: u16) -> Result<Conn> {
        let deadline = Instant::now() + cfg.timeout;
        let stream = socket::connect(&cfg.socket, cfg.timeout).map_err(|e| io_error(cfg, e, deadline))?;
        let mut buf = Vec::with_capacity(4096);
        Request::Hello {
            version,
            client: cfg.name.clone(),
        }
        .encode(0, micros(cfg.timeout), &mut buf);
        let sent = wire::send_all(&stream, &buf);
        // An agent that refuses the connection (too many clients) may answer and close before
        // the hello is sent: its answer is still readable and says why.
        let received = socket::recv_with_fd(&stream);
        let (fd, body) = match (sent, received) {
            (Ok(()), Ok(got)) => got,
            (Err(_), Ok((fd, body)))
                if matches!(Response::decode(&body), Ok((_, Response::Error { .. }))) =>
            {
                (fd, body)
            }
            (Err(e), _) | (Ok(()), Err(e)) => return Err(io_error(cfg, e, deadline)),
        };
        let welcome = match Response::decode(&body) {
            Ok((_, Response::Welcome(w))) if (MIN_PROTOCOL_VERSION..=version).contains(&w.version) => w,
            Ok((_, Response::Welcome(w))) => {
                return Err(ClientError::Protocol(format!(
                    "the agent answered with protocol version {}, this client greeted it in {version}",
                    w.version
                )));
            }
            Ok((_, Response::Error { code, message })) => {
                return Err(ClientError::Refused {
                    verb: "hello",
                    code,
                    message,
                });
            }
            Ok((_, other)) => {
                return Err(ClientError::Protocol(format!(
                    "expected a welcome, got {other:?}"
                )));
            }
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        };
        let fd = fd.ok_or_else(|| ClientError::Protocol("the welcome carried no arena fd".into()))?;
        let arena = HostArena::from_fd(fd, welcome.arena_len)?;
        tracing::debug!(socket = %cfg.socket.display(), instance = welcome.instance, "connected to kvtier agent");
        Ok(Conn {
            stream,
            link: Arc::new(Link::new(arena, welcome.instance)),
            welcome,
            buf,
            reader: wire::FrameReader::default(),
            next_id: 1,
        })
    }

    fn ensure<'a>(&self, guard: &'a mut Option<Conn>) -> Result<&'a mut Conn> {
        if guard.is_none() {
            let mut conn = Self::open(&self.cfg)?;
            if conn.welcome.version >= 2 {
                let announced = self.announced.lock().clone();
                for (ns, model) in announced {
                    // Only I/O errors end the connection: an agent that refuses one (its table
                    // is full) still serves the rest.
                    if let Response::Error { message, .. } =
                        self.exchange(&mut conn, &Request::Announce(ns, model))?
                    {
                        tracing::debug!(%ns, "announcement refused on reconnect: {message}");
                    }
                }
            }
            *guard = Some(conn);
        }
        Ok(guard.as_mut().expect("connection just opened"))
    }

    /// Sends `req` and returns the agent's answer, with the connection's link. A connection that
    /// fails is dropped; a retryable verb that found its connection dead (the agent restarted)
    /// is sent once more on a fresh one. With `on`, the call must go out on that connection
    /// (its handles' slots live there) or fail with [`ClientError::StaleHandle`].
    fn call(&self, req: &Request, on: Option<&Arc<Link>>) -> Result<(Response, Arc<Link>)> {
        let mut guard = self.conn.lock();
        if let Some(link) = on {
            let current = guard.as_ref().map(|c| &c.link);
            if !current.is_some_and(|c| Arc::ptr_eq(c, link)) {
                return Err(ClientError::StaleHandle);
            }
        }
        let had_conn = guard.is_some();
        match self.call_on(&mut guard, req) {
            Err(ClientError::Unavailable { .. }) if had_conn && on.is_none() && retryable(req) => {
                self.call_on(&mut guard, req)
            }
            other => other,
        }
    }

    fn call_on(&self, guard: &mut Option<Conn>, req: &Request) -> Result<(Response, Arc<Link>)> {
        let conn = self.ensure(guard)?;
        // Fitted to the connection it goes out on: the agent may have restarted older since the
        // caller last saw it (a rollback of the DaemonSet).
        let version = conn.welcome.version;
        let Some(req) = req.for_version(version) else {
            return Err(ClientError::Unsupported {
                verb: req.verb(),
                version,
                since: req.oldest(),
            });
        };
        let result = self
            .give_back_orphans(conn)
            .and_then(|()| self.exchange(conn, &req));
        match result {
            Ok(Response::Error { code, message }) => {
                if code == ErrorCode::Malformed || code == ErrorCode::ShuttingDown {
                    *guard = None;
                }
                Err(ClientError::Refused {
                    verb: req.verb(),
                    code,
                    message,
                })
            }
            Ok(resp) => Ok((resp, Arc::clone(&conn.link))),
            Err(e) => {
                // The stream is in an unknown state (half a frame may be in flight): start over.
                *guard = None;
                Err(e)
            }
        }
    }

    /// Aborts and releases the slots of handles dropped unsettled since the last call.
    fn give_back_orphans(&self, conn: &mut Conn) -> Result<()> {
        let orphans = conn.link.take_orphans();
        if orphans.is_empty() {
            return Ok(());
        }
        let mut groups: Vec<(bool, Namespace, Vec<BlockHash>)> = Vec::new();
        for o in orphans {
            match groups
                .iter_mut()
                .find(|(r, ns, _)| *r == o.reserved && *ns == o.ns)
            {
                Some((_, _, hashes)) => hashes.push(o.hash),
                None => groups.push((o.reserved, o.ns, vec![o.hash])),
            }
        }
        for (reserved, ns, hashes) in groups {
            for chunk in hashes.chunks(MAX_BATCH as usize) {
                let req = if reserved {
                    Request::Abort(ns, chunk.to_vec())
                } else {
                    Request::Release(ns, chunk.to_vec())
                };
                // The answers say which were still held; there is nothing more to do either way.
                self.exchange(conn, &req)?;
            }
        }
        Ok(())
    }

    /// One request and its answer on `conn`.
    fn exchange(&self, conn: &mut Conn, req: &Request) -> Result<Response> {
        debug_assert!(
            req.since() <= conn.welcome.version,
            "{req:?} sent unfitted to protocol {}",
            conn.welcome.version
        );
        let deadline = Instant::now() + self.cfg.timeout;
        let id = conn.next_id;
        conn.next_id = conn.next_id.wrapping_add(1);
        conn.buf.clear();
        req.encode(id, micros(self.cfg.timeout), &mut conn.buf);
        let result = wire::send_all(&conn.stream, &conn.buf)
            .map_err(ReadError::from)
            .and_then(|()| {
                let mut src = wire::PollingReader::new(&conn.stream, self.cfg.spin);
                conn.reader.read_frame(&mut src)
            });
        match result {
            Ok(body) => match Response::decode(body) {
                Ok((h, resp)) if h.id == id => Ok(resp),
                // An error about the frame itself may not know the request's id.
                Ok((_, resp @ Response::Error { .. })) => Ok(resp),
                Ok((h, _)) => Err(ClientError::Protocol(format!(
                    "answer to request {} instead of {id}",
                    h.id
                ))),
                Err(e) => Err(ClientError::Protocol(e.to_string())),
            },
            Err(ReadError::Closed) => Err(self.unavailable(io::ErrorKind::ConnectionReset.into())),
            Err(ReadError::Io(e)) => Err(io_error(&self.cfg, e, deadline)),
            Err(ReadError::Wire(e)) => Err(ClientError::Protocol(e.to_string())),
        }
    }

    /// How many leading `hashes` the agent holds, and the tier of each.
    pub fn lookup(&self, ns: &Namespace, hashes: &[BlockHash]) -> Result<Vec<TierLevel>> {
        check_batch(hashes.len())?;
        match self.call(&Request::Lookup(*ns, hashes.to_vec()), None)?.0 {
            Response::Lookup(tiers) if tiers.len() <= hashes.len() => Ok(tiers),
            other => Err(unexpected("lookup", &other)),
        }
    }

    /// Reserves slots for blocks of the given lengths. `Err` entries are blocks that get no
    /// slot ([`SaveOutcome`] tells why).
    pub fn reserve(
        &self,
        ns: &Namespace,
        items: &[(BlockHash, u64)],
    ) -> Result<Vec<Result<Reserved, SaveOutcome>>> {
        check_batch(items.len())?;
        let (resp, link) = self.call(&Request::Reserve(*ns, items.to_vec()), None)?;
        let Response::Reserve(statuses) = resp else {
            return Err(unexpected("reserve", &resp));
        };
        check_len("reserve", statuses.len(), items.len())?;
        let mut out = Vec::with_capacity(items.len());
        let mut bad = None;
        for ((hash, len), status) in items.iter().zip(statuses) {
            out.push(match status {
                ReserveStatus::Slot { offset } => {
                    let slot = Reserved(Slot {
                        ns: *ns,
                        hash: *hash,
                        offset,
                        len: *len,
                        link: Arc::clone(&link),
                        reserved: true,
                        settled: false,
                    });
                    if !link.contains(offset, *len) {
                        bad.get_or_insert((offset, *len));
                    }
                    Ok(slot)
                }
                ReserveStatus::Exists => Err(SaveOutcome::Exists),
                ReserveStatus::NoSpace => Err(SaveOutcome::NoSpace),
                ReserveStatus::TooLarge => Err(SaveOutcome::TooLarge),
            });
        }
        // Dropping `out` hands every slot back (as orphans) before reporting the bad one.
        match bad {
            Some((offset, len)) => Err(outside(offset, len, &link)),
            None => Ok(out),
        }
    }

    /// Copies `data` into a reserved slot.
    pub fn write(&self, slot: &mut Reserved, data: &[u8]) -> Result<()> {
        if data.len() as u64 != slot.len() {
            return Err(ClientError::BufferSize {
                buf: data.len(),
                len: slot.len(),
            });
        }
        slot.with_slot_mut(|s| s.copy_from_slice(data))
            .ok_or(ClientError::StaleHandle)
    }

    /// Publishes written slots. Returns, per slot, whether the agent still held it for this
    /// connection. Fails with [`ClientError::StaleHandle`] when the slots' connection has ended
    /// (their reservations went with it).
    pub fn commit(&self, ns: &Namespace, slots: Vec<Reserved>) -> Result<Vec<bool>> {
        self.finish_slots(ns, slots, false)
    }

    /// Gives reserved slots back unwritten.
    pub fn abort(&self, ns: &Namespace, slots: Vec<Reserved>) -> Result<Vec<bool>> {
        self.finish_slots(ns, slots, true)
    }

    /// Refuses handles of a live connection that is not this client's (they would be neither
    /// settled here nor released by their owner).
    fn check_owner(&self, link: &Arc<Link>) -> Result<()> {
        let mine = self
            .conn
            .lock()
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(&c.link, link));
        if link.is_alive() && !mine {
            return Err(ClientError::ForeignHandle);
        }
        Ok(())
    }

    fn finish_slots(&self, ns: &Namespace, mut slots: Vec<Reserved>, abort: bool) -> Result<Vec<bool>> {
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        check_batch(slots.len())?;
        let link = Arc::clone(&slots[0].0.link);
        self.check_owner(&link)?;
        if slots
            .iter()
            .any(|s| !Arc::ptr_eq(&s.0.link, &link) || s.0.ns != *ns)
        {
            return Err(ClientError::Protocol(
                "slots of one commit must come from one connection and namespace".into(),
            ));
        }
        let hashes: Vec<BlockHash> = slots.iter().map(|s| s.0.hash).collect();
        let req = if abort {
            Request::Abort(*ns, hashes)
        } else {
            Request::Commit(*ns, hashes)
        };
        let result = self.call(&req, Some(&link));
        // Sent, refused or stale: either way these handles have nothing left to give back here
        // (a failed call ended the connection, and the agent then drops its reservations).
        for s in &mut slots {
            s.0.settled = true;
        }
        match result?.0 {
            Response::Commit(v) | Response::Abort(v) if v.len() == slots.len() => Ok(v),
            other => Err(unexpected(req.verb(), &other)),
        }
    }

    /// Pins blocks for reading, promoting them from lower tiers first. `None` is a miss.
    pub fn acquire(&self, ns: &Namespace, hashes: &[BlockHash]) -> Result<Vec<Option<Acquired>>> {
        check_batch(hashes.len())?;
        let (resp, link) = self.call(&Request::Acquire(*ns, hashes.to_vec()), None)?;
        let Response::Acquire(statuses) = resp else {
            return Err(unexpected("acquire", &resp));
        };
        check_len("acquire", statuses.len(), hashes.len())?;
        let mut out = Vec::with_capacity(hashes.len());
        let mut bad = None;
        for (hash, status) in hashes.iter().zip(statuses) {
            out.push(match status {
                AcquireStatus::Hit { tier, offset, len } => {
                    if !link.contains(offset, len) {
                        bad.get_or_insert((offset, len));
                    }
                    Some(Acquired(
                        Slot {
                            ns: *ns,
                            hash: *hash,
                            offset,
                            len,
                            link: Arc::clone(&link),
                            reserved: false,
                            settled: false,
                        },
                        tier,
                    ))
                }
                AcquireStatus::Miss => None,
            });
        }
        match bad {
            Some((offset, len)) => Err(outside(offset, len, &link)),
            None => Ok(out),
        }
    }

    /// Copies an acquired block into `dst`, which must be exactly its length.
    pub fn read(&self, block: &Acquired, dst: &mut [u8]) -> Result<()> {
        if dst.len() as u64 != block.len() {
            return Err(ClientError::BufferSize {
                buf: dst.len(),
                len: block.len(),
            });
        }
        block
            .with_slot(|s| dst.copy_from_slice(s))
            .ok_or(ClientError::StaleHandle)
    }

    /// Unpins acquired blocks. Handles whose connection has ended are dropped quietly: the
    /// agent unpinned them when it ended.
    pub fn release(&self, ns: &Namespace, mut blocks: Vec<Acquired>) -> Result<()> {
        for b in &blocks {
            self.check_owner(&b.0.link)?;
        }
        for b in &mut blocks {
            b.0.settled = true;
        }
        let live: Vec<&Acquired> = blocks.iter().filter(|b| b.is_live()).collect();
        let Some(first) = live.first() else {
            return Ok(());
        };
        let link = Arc::clone(&first.0.link);
        let hashes: Vec<BlockHash> = live
            .iter()
            .filter(|b| Arc::ptr_eq(&b.0.link, &link) && b.0.ns == *ns)
            .map(|b| b.0.hash)
            .collect();
        for chunk in hashes.chunks(MAX_BATCH as usize) {
            match self.call(&Request::Release(*ns, chunk.to_vec()), Some(&link)) {
                Ok((Response::Release(_), _)) => {}
                // The connection ended meanwhile: so did the pins.
                Err(ClientError::StaleHandle) => return Ok(()),
                Ok((other, _)) => return Err(unexpected("release", &other)),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Saves blocks: reserve, copy, commit. One outcome per item.
    pub fn save(&self, ns: &Namespace, items: &[(BlockHash, &[u8])]) -> Result<Vec<SaveOutcome>> {
        let wanted: Vec<(BlockHash, u64)> = items.iter().map(|(h, d)| (*h, d.len() as u64)).collect();
        self.save_with(
            ns,
            &wanted,
            false,
            |i, slot| slot.copy_from_slice(items[i].1),
            || {},
        )
    }

    /// Saves blocks of the given lengths whose bytes `fill(i, slot)` writes into item `i`'s
    /// slot (on the thread pool when `parallel`); `flush` runs after every fill and before the
    /// commit (a device copier waits for its copies there). One outcome per item.
    pub fn save_with(
        &self,
        ns: &Namespace,
        items: &[(BlockHash, u64)],
        parallel: bool,
        fill: impl Fn(usize, &mut [u8]) + Sync,
        flush: impl FnOnce(),
    ) -> Result<Vec<SaveOutcome>> {
        let reserved = self.reserve(ns, items)?;
        let mut out = Vec::with_capacity(items.len());
        let mut jobs = Vec::new();
        for (i, r) in reserved.into_iter().enumerate() {
            match r {
                Ok(slot) => {
                    jobs.push((i, slot, false));
                    out.push(SaveOutcome::Stored);
                }
                Err(o) => out.push(o),
            }
        }
        crate::pages::for_each(parallel, &mut jobs, |(i, slot, filled)| {
            *filled = slot.with_slot_mut(|s| fill(*i, s)).is_some();
        });
        flush();
        if jobs.iter().any(|(_, _, filled)| !filled) {
            // The connection ended during the copies: the reservations went with it.
            return Err(ClientError::StaleHandle);
        }
        let (written, slots): (Vec<usize>, Vec<Reserved>) = jobs.into_iter().map(|(i, s, _)| (i, s)).unzip();
        for (i, ok) in written.into_iter().zip(self.commit(ns, slots)?) {
            if !ok {
                out[i] = SaveOutcome::NoSpace;
            }
        }
        Ok(out)
    }

    /// Loads blocks into the caller's buffers (each exactly the block's length): acquire, copy,
    /// release. Returns the tier of each hit; a buffer of the wrong length is a miss.
    pub fn load(
        &self,
        ns: &Namespace,
        hashes: &[BlockHash],
        bufs: &mut [&mut [u8]],
    ) -> Result<Vec<Option<TierLevel>>> {
        if bufs.len() != hashes.len() {
            return Err(ClientError::Protocol(format!(
                "{} buffers for {} blocks",
                bufs.len(),
                hashes.len()
            )));
        }
        let acquired = self.acquire(ns, hashes)?;
        let mut out = Vec::with_capacity(hashes.len());
        let mut held = Vec::new();
        let mut failed = None;
        for (a, buf) in acquired.into_iter().zip(bufs.iter_mut()) {
            out.push(match a {
                Some(a) => {
                    let tier = match self.read(&a, buf) {
                        Ok(()) => Some(a.tier()),
                        Err(ClientError::BufferSize { .. }) => None,
                        Err(e) => {
                            failed.get_or_insert(e);
                            None
                        }
                    };
                    held.push(a);
                    tier
                }
                None => None,
            });
        }
        self.release(ns, held)?;
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Tells the agent which model `ns`'s blocks belong to, so that it reports them to the
    /// cluster index under that model (the name routers score by: vLLM's served model name).
    /// Remembered and sent again on every new connection.
    pub fn announce(&self, ns: &Namespace, model: &str) -> Result<()> {
        if model.is_empty() || model.len() > usize::from(u16::MAX) {
            return Err(ClientError::InvalidArgument(format!(
                "a model name is 1 to 65535 bytes, not {}",
                model.len()
            )));
        }
        let resp = match self.call(&Request::Announce(*ns, model.to_owned()), None) {
            Ok((resp, _)) => resp,
            // An agent of protocol 1 reports nothing to an index: nothing to tell it.
            Err(ClientError::Unsupported { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        match resp {
            Response::Announce => {
                // Remembered (for reconnections) only once the agent took it.
                let mut announced = self.announced.lock();
                if let Some((_, m)) = announced.iter_mut().find(|(n, _)| n == ns) {
                    *m = model.to_owned();
                } else if announced.len() < MAX_ANNOUNCED {
                    announced.push((*ns, model.to_owned()));
                }
                Ok(())
            }
            other => Err(unexpected("announce", &other)),
        }
    }

    /// Has the agent copy the longest prefix of `hashes` that the agent at `peer` (its peer
    /// address, `host:port`) holds into its own tiers; per hash, whether the agent holds it
    /// now. The agent bounds the transfer by this client's timeout, so a client for pulls is
    /// usually configured with a longer one than a client for local calls. A failed transfer is
    /// `Refused` with [`ErrorCode::PeerFailed`] and costs nothing else.
    pub fn pull(&self, peer: &str, ns: &Namespace, hashes: &[BlockHash]) -> Result<Vec<bool>> {
        self.pull_under(peer, ns, hashes, None)
    }

    /// [`Self::pull`] of blocks a producer held under `ticket` ([`Self::hold_under`]): once
    /// the pull is over, the peer ends that hand-off's holds in `ns`, blocks this agent already
    /// had and pulled none of included. Pass the ticket with no `hashes` when this engine needs
    /// no more of the hand-off (it computes the request, or its cache covers it): the peer then
    /// stops holding its blocks at once, in every namespace (all its ranks; an agent or peer
    /// of an earlier release ends them in `ns` only). A pull whose grant the peer refuses or
    /// does not answer in time, or whose grant expires unreleased, ends every rank's holds
    /// too (again `ns`'s only where either agent is of an earlier release): an engine
    /// computes the whole request when one rank's pull fails. An agent older than protocol 6
    /// pulls without the ticket.
    pub fn pull_under(
        &self,
        peer: &str,
        ns: &Namespace,
        hashes: &[BlockHash],
        ticket: Option<HoldTicket>,
    ) -> Result<Vec<bool>> {
        check_batch(hashes.len())?;
        if peer.is_empty() || peer.len() > usize::from(u16::MAX) {
            return Err(ClientError::InvalidArgument(
                "a peer address is 1 to 65535 bytes".into(),
            ));
        }
        if hashes.is_empty() && ticket.is_none() {
            return Ok(Vec::new());
        }
        match self.call(
            &Request::Pull(peer.to_owned(), *ns, hashes.to_vec(), ticket),
            None,
        ) {
            Ok((Response::Pull(held), _)) if held.len() == hashes.len() => Ok(held),
            Ok((other, _)) => Err(unexpected("pull", &other)),
            // It would only end the ticket's holds, and an agent before tickets holds under none.
            Err(ClientError::Unsupported { .. }) if hashes.is_empty() => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Has the agent keep the longest stored prefix of `hashes` for a peer's pull: a prefill
    /// engine hands those blocks to a decode engine, whose agent pulls them soon. Held blocks are
    /// not evicted until a pull of them ends or the agent's hold time passes (`peer.hold_s`);
    /// the agent holds nothing where it serves no peers, and an agent older than protocol 5
    /// answers as a lookup. The answer is the lookup's, with how many leading blocks are held.
    pub fn hold(&self, ns: &Namespace, hashes: &[BlockHash]) -> Result<HoldOutcome> {
        self.hold_under(ns, hashes, None)
    }

    /// [`Self::hold`] for one hand-off, named by `ticket` (random per request; the decode's
    /// pull passes it back, [`Self::pull_under`]): the pull that names it ends exactly these
    /// holds, and [`Self::unhold`] ends them before. Holding again under the same ticket
    /// renews it. An agent older than protocol 6 holds without it: any pull of the blocks
    /// ends one hand-off's hold then.
    pub fn hold_under(
        &self,
        ns: &Namespace,
        hashes: &[BlockHash],
        ticket: Option<HoldTicket>,
    ) -> Result<HoldOutcome> {
        check_batch(hashes.len())?;
        match self.call(&Request::Hold(*ns, hashes.to_vec(), ticket), None) {
            Ok((Response::Hold { tiers, held }, _)) if tiers.len() <= hashes.len() => Ok(HoldOutcome {
                tiers,
                held: held as usize,
            }),
            Ok((other, _)) => Err(unexpected("hold", &other)),
            Err(ClientError::Unsupported { .. }) => {
                let mut tiers = self.lookup(ns, hashes)?;
                // What another node holds is not this agent's to hand over.
                tiers.truncate(tiers.iter().take_while(|t| **t != TierLevel::Peer).count());
                Ok(HoldOutcome { tiers, held: 0 })
            }
            Err(e) => Err(e),
        }
    }

    /// Ends the holds made under `ticket` in `ns` on this agent now (the producer gave the
    /// hand-off up: a rank's hold failed, or the request will not be decoded elsewhere);
    /// returns how many blocks are no longer held. 0 on an agent older than protocol 6, whose
    /// holds carry no ticket.
    pub fn unhold(&self, ns: &Namespace, ticket: HoldTicket) -> Result<usize> {
        match self.call(&Request::Unhold(*ns, ticket), None) {
            Ok((Response::Unhold(ended), _)) => Ok(ended as usize),
            Ok((other, _)) => Err(unexpected("unhold", &other)),
            Err(ClientError::Unsupported { .. }) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// The agent's counters, as a JSON document.
    pub fn stats(&self) -> Result<String> {
        match self.call(&Request::Stats, None)?.0 {
            Response::Stats(json) => Ok(json),
            other => Err(unexpected("stats", &other)),
        }
    }
}

fn outside(offset: u64, len: u64, link: &Link) -> ClientError {
    ClientError::Protocol(format!(
        "slot {offset}+{len} outside the arena of {} bytes",
        link.arena.len()
    ))
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn unexpected(verb: &'static str, resp: &Response) -> ClientError {
    ClientError::Protocol(format!("unexpected answer to {verb}: {resp:?}"))
}

fn check_len(verb: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(ClientError::Protocol(format!(
            "{verb}: {got} answers for {want} blocks"
        )))
    }
}

fn io_error(cfg: &ClientConfig, e: io::Error, deadline: Instant) -> ClientError {
    let timed_out = matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut);
    if timed_out || Instant::now() >= deadline {
        ClientError::Timeout(cfg.timeout)
    } else {
        ClientError::Unavailable {
            socket: cfg.socket.clone(),
            source: e,
        }
    }
}

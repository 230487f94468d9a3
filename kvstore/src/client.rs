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

use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::arena::HostArena;
use crate::key::{BlockHash, Namespace};
use crate::stats::TierLevel;
use crate::wire::{
    self, AcquireStatus, ErrorCode, PROTOCOL_VERSION, ReadError, Request, ReserveStatus, Response, Welcome,
};

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/kvtier/agent.sock";

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The agent's socket.
    pub socket: PathBuf,
    /// Longest wait for one call (connecting included).
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
    /// A handle from an earlier connection (the agent restarted since): its slot is gone.
    #[error("handle belongs to an earlier agent connection")]
    StaleHandle,
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

/// A slot reserved for writing one block. Write it with [`Client::write`] (or directly through
/// [`Reserved::ptr`]), then commit or abort it; dropping it leaves the slot reserved until the
/// connection closes.
#[derive(Debug)]
pub struct Reserved {
    hash: BlockHash,
    offset: u64,
    len: u64,
    arena: Arc<MappedArena>,
}

/// A block pinned for reading. Read it with [`Client::read`] (or through [`Acquired::ptr`]),
/// then release it.
#[derive(Debug)]
pub struct Acquired {
    hash: BlockHash,
    tier: TierLevel,
    offset: u64,
    len: u64,
    arena: Arc<MappedArena>,
}

macro_rules! slot_accessors {
    ($t:ty) => {
        impl $t {
            /// The block's hash.
            pub fn hash(&self) -> &BlockHash {
                &self.hash
            }

            /// Byte offset of the slot in the arena.
            pub fn offset(&self) -> u64 {
                self.offset
            }

            /// Length of the block in bytes.
            pub fn len(&self) -> u64 {
                self.len
            }

            /// Whether the block is empty (never: blocks hold at least one byte).
            pub fn is_empty(&self) -> bool {
                self.len == 0
            }

            /// Address of the slot in this process, for a DMA engine or a copy kernel. Valid
            /// while this handle lives.
            pub fn ptr(&self) -> *mut u8 {
                // SAFETY: the offset and length came from the agent for this arena and are
                // checked against its size when the handle is made (`MappedArena::check`), so
                // the pointer stays inside the mapping, which the handle keeps alive.
                unsafe { self.arena.map.as_ptr().add(self.offset as usize) }
            }
        }
    };
}
slot_accessors!(Reserved);
slot_accessors!(Acquired);

impl Acquired {
    /// The tier the block was found in.
    pub fn tier(&self) -> TierLevel {
        self.tier
    }
}

/// The agent's arena as mapped here, tagged with the agent instance that owns it.
#[derive(Debug)]
struct MappedArena {
    map: HostArena,
    instance: u64,
}

impl MappedArena {
    fn check(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_some_and(|end| end <= self.map.len()) {
            Ok(())
        } else {
            Err(ClientError::Protocol(format!(
                "slot {offset}+{len} outside the arena of {} bytes",
                self.map.len()
            )))
        }
    }
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    arena: Arc<MappedArena>,
    welcome: Welcome,
    buf: Vec<u8>,
    reader: wire::FrameReader,
    next_id: u32,
}

/// A connection to the node agent; see the module documentation.
#[derive(Debug)]
pub struct Client {
    cfg: ClientConfig,
    conn: Mutex<Option<Conn>>,
}

/// Whether a verb may be sent again on a fresh connection after the old one turned out dead:
/// it refers to no state of the old connection and the dead agent took none with it.
fn retryable(req: &Request) -> bool {
    matches!(
        req,
        Request::Lookup(..) | Request::Reserve(..) | Request::Acquire(..) | Request::Stats
    )
}

impl Client {
    /// Connects to the agent (handshake, arena mapping).
    pub fn connect(cfg: ClientConfig) -> Result<Self> {
        let conn = Self::open(&cfg)?;
        Ok(Self {
            cfg,
            conn: Mutex::new(Some(conn)),
        })
    }

    /// A client that connects on its first call, so an engine can start before its agent.
    pub fn lazy(cfg: ClientConfig) -> Self {
        Self {
            cfg,
            conn: Mutex::new(None),
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

    fn unavailable(&self, source: io::Error) -> ClientError {
        ClientError::Unavailable {
            socket: self.cfg.socket.clone(),
            source,
        }
    }

    fn open(cfg: &ClientConfig) -> Result<Conn> {
        let unavailable = |source| ClientError::Unavailable {
            socket: cfg.socket.clone(),
            source,
        };
        let deadline = Instant::now() + cfg.timeout;
        let stream = UnixStream::connect(&cfg.socket).map_err(unavailable)?;
        stream.set_read_timeout(Some(cfg.timeout)).map_err(unavailable)?;
        stream.set_write_timeout(Some(cfg.timeout)).map_err(unavailable)?;
        let mut buf = Vec::with_capacity(4096);
        Request::Hello {
            version: PROTOCOL_VERSION,
            client: cfg.name.clone(),
        }
        .encode(0, micros(cfg.timeout), &mut buf);
        (&stream)
            .write_all(&buf)
            .map_err(|e| io_error(cfg, e, deadline))?;
        let (fd, body) = recv_with_fd(&stream).map_err(|e| io_error(cfg, e, deadline))?;
        let welcome = match Response::decode(&body) {
            Ok((_, Response::Welcome(w))) => w,
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
        let map = HostArena::from_fd(fd, welcome.arena_len)?;
        tracing::debug!(socket = %cfg.socket.display(), instance = welcome.instance, "connected to kvtier agent");
        Ok(Conn {
            stream,
            arena: Arc::new(MappedArena {
                map,
                instance: welcome.instance,
            }),
            welcome,
            buf,
            reader: wire::FrameReader::default(),
            next_id: 1,
        })
    }

    fn ensure<'a>(&self, guard: &'a mut Option<Conn>) -> Result<&'a mut Conn> {
        if guard.is_none() {
            *guard = Some(Self::open(&self.cfg)?);
        }
        Ok(guard.as_mut().expect("connection just opened"))
    }

    /// Sends `req` and returns the agent's answer, with the arena it refers to. A connection
    /// that fails is dropped; a retryable verb that found its connection dead (the agent
    /// restarted) is sent once more on a fresh one.
    fn call(&self, req: &Request) -> Result<(Response, Arc<MappedArena>)> {
        let mut guard = self.conn.lock();
        let had_conn = guard.is_some();
        match self.call_on(&mut guard, req) {
            Err(ClientError::Unavailable { .. }) if had_conn && retryable(req) => {
                self.call_on(&mut guard, req)
            }
            other => other,
        }
    }

    fn call_on(&self, guard: &mut Option<Conn>, req: &Request) -> Result<(Response, Arc<MappedArena>)> {
        let conn = self.ensure(guard)?;
        let deadline = Instant::now() + self.cfg.timeout;
        let id = conn.next_id;
        conn.next_id = conn.next_id.wrapping_add(1);
        conn.buf.clear();
        req.encode(id, micros(self.cfg.timeout), &mut conn.buf);
        let result = (&conn.stream)
            .write_all(&conn.buf)
            .map_err(ReadError::from)
            .and_then(|()| {
                let mut src = wire::PollingReader::new(&conn.stream, self.cfg.spin);
                conn.reader.read_frame(&mut src)
            });
        let result = match result {
            Ok(body) => match Response::decode(body) {
                Ok((h, resp)) if h.id == id => Ok(resp),
                Ok((h, _)) => Err(ClientError::Protocol(format!(
                    "answer to request {} instead of {id}",
                    h.id
                ))),
                Err(e) => Err(ClientError::Protocol(e.to_string())),
            },
            Err(ReadError::Closed) => Err(self.unavailable(io::ErrorKind::ConnectionReset.into())),
            Err(ReadError::Io(e)) => Err(io_error(&self.cfg, e, deadline)),
            Err(ReadError::Wire(e)) => Err(ClientError::Protocol(e.to_string())),
        };
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
            Ok(resp) => Ok((resp, Arc::clone(&conn.arena))),
            Err(e) => {
                // The stream is in an unknown state (half a frame may be in flight): start over.
                *guard = None;
                Err(e)
            }
        }
    }

    /// How many leading `hashes` the agent holds, and the tier of each.
    pub fn lookup(&self, ns: &Namespace, hashes: &[BlockHash]) -> Result<Vec<TierLevel>> {
        match self.call(&Request::Lookup(*ns, hashes.to_vec()))?.0 {
            Response::Lookup(tiers) if tiers.len() <= hashes.len() => Ok(tiers),
            other => Err(unexpected("lookup", &other)),
        }
    }

    /// Reserves slots for blocks of the given lengths. `Ok(None)` entries are blocks that need
    /// no writing ([`SaveOutcome`] tells why).
    pub fn reserve(
        &self,
        ns: &Namespace,
        items: &[(BlockHash, u64)],
    ) -> Result<Vec<Result<Reserved, SaveOutcome>>> {
        let (resp, arena) = self.call(&Request::Reserve(*ns, items.to_vec()))?;
        let Response::Reserve(statuses) = resp else {
            return Err(unexpected("reserve", &resp));
        };
        check_len("reserve", statuses.len(), items.len())?;
        let mut out = Vec::with_capacity(items.len());
        for ((hash, len), status) in items.iter().zip(statuses) {
            out.push(match status {
                ReserveStatus::Slot { offset } => {
                    arena.check(offset, *len)?;
                    Ok(Reserved {
                        hash: *hash,
                        offset,
                        len: *len,
                        arena: Arc::clone(&arena),
                    })
                }
                ReserveStatus::Exists => Err(SaveOutcome::Exists),
                ReserveStatus::NoSpace => Err(SaveOutcome::NoSpace),
                ReserveStatus::TooLarge => Err(SaveOutcome::TooLarge),
            });
        }
        Ok(out)
    }

    /// Copies `data` into a reserved slot.
    pub fn write(&self, slot: &Reserved, data: &[u8]) -> Result<()> {
        if data.len() as u64 != slot.len {
            return Err(ClientError::BufferSize {
                buf: data.len(),
                len: slot.len,
            });
        }
        // SAFETY: the agent gave this slot to this connection alone until it is committed or
        // aborted, which consumes the handle; the range was checked against the mapping.
        unsafe { slot.arena.map.write_at(slot.offset, data) };
        Ok(())
    }

    /// Publishes written slots. Returns, per slot, whether the agent still held it for this
    /// connection (false after the agent restarted).
    pub fn commit(&self, ns: &Namespace, slots: Vec<Reserved>) -> Result<Vec<bool>> {
        self.finish_slots(ns, slots, false)
    }

    /// Gives reserved slots back unwritten.
    pub fn abort(&self, ns: &Namespace, slots: Vec<Reserved>) -> Result<Vec<bool>> {
        self.finish_slots(ns, slots, true)
    }

    fn finish_slots(&self, ns: &Namespace, slots: Vec<Reserved>, abort: bool) -> Result<Vec<bool>> {
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        let hashes: Vec<BlockHash> = slots.iter().map(|s| s.hash).collect();
        let req = if abort {
            Request::Abort(*ns, hashes)
        } else {
            Request::Commit(*ns, hashes)
        };
        let (resp, arena) = self.call(&req)?;
        if slots.iter().any(|s| s.arena.instance != arena.instance) {
            return Err(ClientError::StaleHandle);
        }
        match resp {
            Response::Commit(v) | Response::Abort(v) if v.len() == slots.len() => Ok(v),
            other => Err(unexpected(req.verb(), &other)),
        }
    }

    /// Pins blocks for reading, promoting them from lower tiers first. `None` is a miss.
    pub fn acquire(&self, ns: &Namespace, hashes: &[BlockHash]) -> Result<Vec<Option<Acquired>>> {
        let (resp, arena) = self.call(&Request::Acquire(*ns, hashes.to_vec()))?;
        let Response::Acquire(statuses) = resp else {
            return Err(unexpected("acquire", &resp));
        };
        check_len("acquire", statuses.len(), hashes.len())?;
        let mut out = Vec::with_capacity(hashes.len());
        for (hash, status) in hashes.iter().zip(statuses) {
            out.push(match status {
                AcquireStatus::Hit { tier, offset, len } => {
                    arena.check(offset, len)?;
                    Some(Acquired {
                        hash: *hash,
                        tier,
                        offset,
                        len,
                        arena: Arc::clone(&arena),
                    })
                }
                AcquireStatus::Miss => None,
            });
        }
        Ok(out)
    }

    /// Copies an acquired block into `dst`, which must be exactly its length.
    pub fn read(&self, block: &Acquired, dst: &mut [u8]) -> Result<()> {
        if dst.len() as u64 != block.len {
            return Err(ClientError::BufferSize {
                buf: dst.len(),
                len: block.len,
            });
        }
        // SAFETY: the agent pins an acquired slot (no writer) until it is released, which
        // consumes the handle; the range was checked against the mapping.
        unsafe { block.arena.map.read_at(block.offset, dst) };
        Ok(())
    }

    /// Unpins acquired blocks. Handles from an earlier connection are dropped quietly: the
    /// agent that pinned them is gone.
    pub fn release(&self, ns: &Namespace, blocks: Vec<Acquired>) -> Result<()> {
        let live = {
            let guard = self.conn.lock();
            guard.as_ref().map(|c| c.arena.instance)
        };
        let hashes: Vec<BlockHash> = blocks
            .iter()
            .filter(|b| Some(b.arena.instance) == live)
            .map(|b| b.hash)
            .collect();
        if hashes.is_empty() {
            return Ok(());
        }
        match self.call(&Request::Release(*ns, hashes))?.0 {
            Response::Release(_) => Ok(()),
            other => Err(unexpected("release", &other)),
        }
    }

    /// Saves blocks: reserve, copy, commit. One outcome per item.
    pub fn save(&self, ns: &Namespace, items: &[(BlockHash, &[u8])]) -> Result<Vec<SaveOutcome>> {
        let wanted: Vec<(BlockHash, u64)> = items.iter().map(|(h, d)| (*h, d.len() as u64)).collect();
        let reserved = self.reserve(ns, &wanted)?;
        let mut out = Vec::with_capacity(items.len());
        let mut slots = Vec::new();
        let mut written = Vec::new();
        for ((_, data), r) in items.iter().zip(reserved) {
            match r {
                Ok(slot) => {
                    self.write(&slot, data)?;
                    written.push(out.len());
                    slots.push(slot);
                    out.push(SaveOutcome::Stored);
                }
                Err(o) => out.push(o),
            }
        }
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
        for (a, buf) in acquired.into_iter().zip(bufs.iter_mut()) {
            out.push(match a {
                Some(a) => {
                    let tier = self.read(&a, buf).ok().map(|()| a.tier);
                    held.push(a);
                    tier
                }
                None => None,
            });
        }
        self.release(ns, held)?;
        Ok(out)
    }

    /// The agent's counters, as a JSON document.
    pub fn stats(&self) -> Result<String> {
        match self.call(&Request::Stats)?.0 {
            Response::Stats(json) => Ok(json),
            other => Err(unexpected("stats", &other)),
        }
    }
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

/// Receives the welcome frame and the fd that travels with it. The agent sends both in one
/// `sendmsg`, so the fd arrives with the first bytes; the rest of the frame, if the kernel
/// split it, is read normally.
fn recv_with_fd(stream: &UnixStream) -> io::Result<(Option<OwnedFd>, Vec<u8>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};

    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut head = [0u8; 256];
    let got = loop {
        match recvmsg(
            stream,
            &mut [io::IoSliceMut::new(&mut head)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(r) => break r.bytes,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    let mut fd = None;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            for f in fds {
                // Keep the first; any extra fd is closed on drop.
                fd.get_or_insert(f);
            }
        }
    }
    if got == 0 {
        return Err(io::ErrorKind::ConnectionReset.into());
    }
    let mut frame = head[..got].to_vec();
    while frame.len() < wire::LEN_PREFIX {
        let mut b = [0u8; wire::LEN_PREFIX];
        let n = io::Read::read(&mut &*stream, &mut b[..wire::LEN_PREFIX - frame.len()])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        frame.extend_from_slice(&b[..n]);
    }
    let prefix: [u8; wire::LEN_PREFIX] = frame[..wire::LEN_PREFIX].try_into().expect("four bytes");
    let len = wire::body_len(prefix).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let total = wire::LEN_PREFIX + len;
    if frame.len() > total {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bytes after the welcome",
        ));
    }
    let have = frame.len();
    frame.resize(total, 0);
    io::Read::read_exact(&mut &*stream, &mut frame[have..])?;
    frame.drain(..wire::LEN_PREFIX);
    Ok((fd, frame))
}

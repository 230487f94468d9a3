//! The local protocol between an engine (through [`crate::client`]) and the node agent: the
//! frame format, the messages and their binary encoding. `docs/protocol.md` describes the same
//! bytes for readers who write another client.
//!
//! Every frame is a little-endian `u32` body length followed by the body. A body starts with a
//! 12-byte header — kind, three zero bytes, request id, deadline in microseconds — and then the
//! message. Decoding never panics and never allocates more than the frame it was given; any
//! violation is a [`WireError`], upon which the agent closes that one connection.

use crate::key::{BlockHash, Namespace};
use crate::stats::TierLevel;
use crate::transport::HoldTicket;

/// The newest protocol version this build speaks. The agent accepts hellos from
/// [`MIN_PROTOCOL_VERSION`] on and answers in the client's version; other hellos are refused.
pub const PROTOCOL_VERSION: u16 = 6;

/// The oldest version still spoken (version 2 added `announce`, version 3 `pull`, version 4 the
/// object tier's code, version 5 `hold`, version 6 hold tickets — an optional last field of
/// `hold` and `pull` — and `unhold`; nothing else changed).
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// The first bytes of a hello, so that a stray connection is recognised at once.
pub const MAGIC: [u8; 4] = *b"KVTR";
/// Largest body accepted (4 MiB): a batch of 65 536 keys of 32 bytes fits with room to spare.
pub const MAX_FRAME: u32 = 4 << 20;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Bytes of the body header (kind, padding, request id, deadline).
pub const HEADER_LEN: usize = 12;
/// Most keys in one batch.
pub const MAX_BATCH: u32 = 65_536;

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The body is shorter than its fields say.
    #[error("frame truncated: needed {needed} more bytes")]
    Truncated {
        /// Bytes missing.
        needed: usize,
    },
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    Oversized(u32),
    /// An unknown message kind.
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    /// A field holds a value it may not.
    #[error("invalid field {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Bytes left over after the message.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> WireError {
    WireError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The header of every body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message kind (see [`Request`] and [`Response`]).
    pub kind: u8,
    /// Chosen by the client, echoed in the response.
    pub id: u32,
    /// Microseconds the client waits for the answer; 0 means the agent's default. The agent
    /// drops a request whose deadline passed before it ran.
    pub deadline_us: u32,
}

/// Error codes carried by [`Response::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame could not be decoded; the connection is closed after this reply.
    Malformed = 1,
    /// The hello named a protocol version the agent does not speak.
    UnsupportedVersion = 2,
    /// The request's deadline passed before it ran.
    DeadlineExceeded = 3,
    /// The agent is shutting down.
    ShuttingDown = 4,
    /// A request came before the hello, or a second hello.
    Unexpected = 5,
    /// The agent failed internally.
    Internal = 6,
    /// A bound of the agent was reached (e.g. the number of announced namespaces).
    LimitReached = 7,
    /// A transfer from another node's agent failed (unreachable, refused, timed out); nothing
    /// was pulled and the engine recomputes.
    PeerFailed = 8,
}

impl ErrorCode {
    /// The code for `v`, if it is one.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Malformed,
            2 => Self::UnsupportedVersion,
            3 => Self::DeadlineExceeded,
            4 => Self::ShuttingDown,
            5 => Self::Unexpected,
            6 => Self::Internal,
            7 => Self::LimitReached,
            8 => Self::PeerFailed,
            _ => return None,
        })
    }
}

/// Outcome of reserving one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveStatus {
    /// A slot at this arena offset is the caller's to write, then commit or abort.
    Slot {
        /// Byte offset of the slot in the arena.
        offset: u64,
    },
    /// The block is stored already, or another writer holds it: nothing to write.
    Exists,
    /// No room could be made (everything pinned or reserved).
    NoSpace,
    /// Larger than any slot of the arena.
    TooLarge,
}

/// Outcome of acquiring one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireStatus {
    /// The block is readable at `offset` until released.
    Hit {
        /// Tier it was found in (disk hits were promoted into the arena first).
        tier: TierLevel,
        /// Byte offset of the block in the arena.
        offset: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// Not stored (or corrupt, which is the same to a reader).
    Miss,
}

/// What the agent says to a hello, besides the arena fd that travels with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The version both sides now speak.
    pub version: u16,
    /// Bytes of the arena whose fd accompanies this message.
    pub arena_len: u64,
    /// Largest block the arena takes.
    pub max_block_len: u64,
    /// Identifies this agent instance (changes on every start), so a client notices a restart.
    pub instance: u64,
}

/// A message from client to agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// First message of a connection.
    Hello {
        /// Protocol version the client speaks.
        version: u16,
        /// Free text naming the client, for logs.
        client: String,
    },
    /// How many leading keys are stored, and where.
    Lookup(Namespace, Vec<BlockHash>),
    /// Slots to write blocks of the given lengths into.
    Reserve(Namespace, Vec<(BlockHash, u64)>),
    /// Publish written reservations.
    Commit(Namespace, Vec<BlockHash>),
    /// Give reservations back unwritten.
    Abort(Namespace, Vec<BlockHash>),
    /// Pin blocks for reading (promoting them from lower tiers first).
    Acquire(Namespace, Vec<BlockHash>),
    /// Unpin acquired blocks.
    Release(Namespace, Vec<BlockHash>),
    /// The agent's counters, as JSON.
    Stats,
    /// Names the model whose blocks a namespace holds, so that the agent can report them to
    /// the cluster index (whose scope is the model an engine serves).
    Announce(Namespace, String),
    /// Copies the longest prefix of the blocks that another node's agent holds (its peer
    /// address first) into this agent's tiers, for a later acquire. A ticket the producer's
    /// hold was made under ends that hold at the peer once the pull is over (also when this
    /// agent finds every block in its own tiers and pulls none).
    Pull(String, Namespace, Vec<BlockHash>, Option<HoldTicket>),
    /// Keeps the longest stored prefix of the blocks for a peer's pull (a decode engine's,
    /// after this node's engine prefilled them): not evicted until a pull of them ends (the
    /// pull that names the ticket, when one is given) or the agent's hold time passes.
    Hold(Namespace, Vec<BlockHash>, Option<HoldTicket>),
    /// Ends the holds made under a ticket in a namespace now.
    Unhold(Namespace, HoldTicket),
}

/// A message from agent to client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Answer to a hello; the arena fd is attached.
    Welcome(Welcome),
    /// The tier of each leading stored key.
    Lookup(Vec<TierLevel>),
    /// One status per reserved block.
    Reserve(Vec<ReserveStatus>),
    /// Per block: whether this client held a reservation that is now committed.
    Commit(Vec<bool>),
    /// Per block: whether this client held a reservation that is now given back.
    Abort(Vec<bool>),
    /// One status per acquired block.
    Acquire(Vec<AcquireStatus>),
    /// Per block: whether this client held a lease that is now released.
    Release(Vec<bool>),
    /// Counters as a JSON document.
    Stats(String),
    /// The announcement is recorded.
    Announce,
    /// Per block: whether this agent holds it now (pulled, or held already).
    Pull(Vec<bool>),
    /// What a hold kept.
    Hold {
        /// The tier of each leading stored key, as a lookup answers.
        tiers: Vec<TierLevel>,
        /// How many of them, from the first, are held for a pull.
        held: u32,
    },
    /// How many blocks an unhold ended the holds of (others still hold the rest).
    Unhold(u32),
    /// The request failed.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// A sentence for logs.
        message: String,
    },
}

mod kind {
    pub(super) const HELLO: u8 = 0x01;
    pub(super) const LOOKUP: u8 = 0x02;
    pub(super) const RESERVE: u8 = 0x03;
    pub(super) const COMMIT: u8 = 0x04;
    pub(super) const ABORT: u8 = 0x05;
    pub(super) const ACQUIRE: u8 = 0x06;
    pub(super) const RELEASE: u8 = 0x07;
    pub(super) const STATS: u8 = 0x08;
    pub(super) const ANNOUNCE: u8 = 0x09;
    pub(super) const PULL: u8 = 0x0a;
    pub(super) const HOLD: u8 = 0x0b;
    pub(super) const UNHOLD: u8 = 0x0c;
    pub(super) const REPLY: u8 = 0x80;
    pub(super) const ERROR: u8 = 0xff;
}

impl Request {
    /// The message kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Self::Hello { .. } => kind::HELLO,
            Self::Lookup(..) => kind::LOOKUP,
            Self::Reserve(..) => kind::RESERVE,
            Self::Commit(..) => kind::COMMIT,
            Self::Abort(..) => kind::ABORT,
            Self::Acquire(..) => kind::ACQUIRE,
            Self::Release(..) => kind::RELEASE,
            Self::Stats => kind::STATS,
            Self::Announce(..) => kind::ANNOUNCE,
            Self::Pull(..) => kind::PULL,
            Self::Hold(..) => kind::HOLD,
            Self::Unhold(..) => kind::UNHOLD,
        }
    }

    /// The verb's name, for logs and metric labels.
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Lookup(..) => "lookup",
            Self::Reserve(..) => "reserve",
            Self::Commit(..) => "commit",
            Self::Abort(..) => "abort",
            Self::Acquire(..) => "acquire",
            Self::Release(..) => "release",
            Self::Stats => "stats",
            Self::Announce(..) => "announce",
            Self::Pull(..) => "pull",
            Self::Hold(..) => "hold",
            Self::Unhold(..) => "unhold",
        }
    }

    /// The oldest protocol version that has this request as it is.
    pub fn since(&self) -> u16 {
        match self {
            Self::Hello { .. }
            | Self::Lookup(..)
            | Self::Reserve(..)
            | Self::Commit(..)
            | Self::Abort(..)
            | Self::Acquire(..)
            | Self::Release(..)
            | Self::Stats => 1,
            Self::Announce(..) => 2,
            Self::Pull(.., None) => 3,
            Self::Hold(.., None) => 5,
            Self::Pull(.., Some(_)) | Self::Hold(.., Some(_)) | Self::Unhold(..) => 6,
        }
    }

    /// This request as an agent of protocol `version` takes it: a hold, or a pull of blocks,
    /// under a ticket goes without the ticket before version 6 (the older agent's holds carry
    /// none). `None` where the version has no form of it.
    pub fn for_version(&self, version: u16) -> Option<std::borrow::Cow<'_, Self>> {
        use std::borrow::Cow;
        if self.since() <= version {
            return Some(Cow::Borrowed(self));
        }
        self.without_ticket()
            .filter(|r| r.since() <= version)
            .map(Cow::Owned)
    }

    /// The oldest protocol version that has this request in some form
    /// ([`Self::for_version`]).
    pub fn oldest(&self) -> u16 {
        self.without_ticket().map_or_else(|| self.since(), |r| r.since())
    }

    /// The request for an agent before tickets: a hold, or a pull of blocks, without its
    /// ticket. `None` for any other (a pull of no block only ends its ticket's holds).
    fn without_ticket(&self) -> Option<Self> {
        match self {
            Self::Pull(peer, ns, hashes, Some(_)) if !hashes.is_empty() => {
                Some(Self::Pull(peer.clone(), *ns, hashes.clone(), None))
            }
            Self::Hold(ns, hashes, Some(_)) => Some(Self::Hold(*ns, hashes.clone(), None)),
            _ => None,
        }
    }

    /// Appends the whole frame (length prefix included) to `out`.
    pub fn encode(&self, id: u32, deadline_us: u32, out: &mut Vec<u8>) {
        let start = begin(out, self.kind(), id, deadline_us);
        match self {
            Self::Hello { version, client } => {
                out.extend_from_slice(&MAGIC);
                put_u16(out, *version);
                put_str(out, client);
            }
            Self::Lookup(ns, hashes)
            | Self::Commit(ns, hashes)
            | Self::Abort(ns, hashes)
            | Self::Acquire(ns, hashes)
            | Self::Release(ns, hashes) => put_batch(out, ns, hashes),
            Self::Hold(ns, hashes, ticket) => {
                put_batch(out, ns, hashes);
                put_ticket(out, *ticket);
            }
            Self::Unhold(ns, ticket) => {
                out.extend_from_slice(ns.as_bytes());
                put_u64(out, ticket.get());
            }
            Self::Reserve(ns, items) => {
                out.extend_from_slice(ns.as_bytes());
                put_u32(out, items.len() as u32);
                for (h, len) in items {
                    put_hash(out, h);
                    put_u64(out, *len);
                }
            }
            Self::Stats => {}
            Self::Announce(ns, model) => {
                out.extend_from_slice(ns.as_bytes());
                put_str(out, model);
            }
            Self::Pull(peer, ns, hashes, ticket) => {
                put_str(out, peer);
                put_batch(out, ns, hashes);
                put_ticket(out, *ticket);
            }
        }
        finish(out, start);
    }

    /// Decodes a body (the bytes after the length prefix).
    pub fn decode(body: &[u8]) -> Result<(Header, Self), WireError> {
        let mut r = Reader::new(body);
        let header = r.header()?;
        let req = match header.kind {
            kind::HELLO => {
                if r.array::<4>()? != MAGIC {
                    return Err(invalid("magic", "not a kvtier hello"));
                }
                let version = r.u16()?;
                let client = r.string()?;
                Self::Hello { version, client }
            }
            kind::LOOKUP => {
                let (ns, n) = r.batch()?;
                Self::Lookup(ns, r.hashes(n)?)
            }
            kind::HOLD => {
                let (ns, n) = r.batch()?;
                Self::Hold(ns, r.hashes(n)?, r.ticket_if_any()?)
            }
            kind::UNHOLD => {
                let ns = Namespace::from_bytes(r.array()?);
                let ticket = HoldTicket::new(r.u64()?).ok_or_else(|| invalid("ticket", "0 is no ticket"))?;
                Self::Unhold(ns, ticket)
            }
            kind::COMMIT => {
                let (ns, n) = r.batch()?;
                Self::Commit(ns, r.hashes(n)?)
            }
            kind::ABORT => {
                let (ns, n) = r.batch()?;
                Self::Abort(ns, r.hashes(n)?)
            }
            kind::ACQUIRE => {
                let (ns, n) = r.batch()?;
                Self::Acquire(ns, r.hashes(n)?)
            }
            kind::RELEASE => {
                let (ns, n) = r.batch()?;
                Self::Release(ns, r.hashes(n)?)
            }
            kind::RESERVE => {
                let (ns, n) = r.batch()?;
                let mut items = Vec::with_capacity(r.capacity_for(n, 10));
                for _ in 0..n {
                    let h = r.hash()?;
                    let len = r.u64()?;
                    if len == 0 {
                        return Err(invalid("len", "a block is at least one byte"));
                    }
                    items.push((h, len));
                }
                Self::Reserve(ns, items)
            }
            kind::STATS => Self::Stats,
            kind::ANNOUNCE => {
                let ns = Namespace::from_bytes(r.array()?);
                let model = r.string()?;
                if model.is_empty() {
                    return Err(invalid("model", "an announcement names a model"));
                }
                Self::Announce(ns, model)
            }
            kind::PULL => {
                let peer = r.string()?;
                if peer.is_empty() {
                    return Err(invalid("peer", "a pull names the peer to pull from"));
                }
                let (ns, n) = r.batch()?;
                Self::Pull(peer, ns, r.hashes(n)?, r.ticket_if_any()?)
            }
            k => return Err(WireError::UnknownKind(k)),
        };
        r.end()?;
        Ok((header, req))
    }
}

impl Response {
    fn kind(&self) -> u8 {
        let request = match self {
            Self::Welcome(_) => kind::HELLO,
            Self::Lookup(_) => kind::LOOKUP,
            Self::Reserve(_) => kind::RESERVE,
            Self::Commit(_) => kind::COMMIT,
            Self::Abort(_) => kind::ABORT,
            Self::Acquire(_) => kind::ACQUIRE,
            Self::Release(_) => kind::RELEASE,
            Self::Stats(_) => kind::STATS,
            Self::Announce => kind::ANNOUNCE,
            Self::Pull(_) => kind::PULL,
            Self::Hold { .. } => kind::HOLD,
            Self::Unhold(_) => kind::UNHOLD,
            Self::Error { .. } => return kind::ERROR,
        };
        request | kind::REPLY
    }

    /// Appends the whole frame (length prefix included) to `out`.
    pub fn encode(&self, id: u32, out: &mut Vec<u8>) {
        let start = begin(out, self.kind(), id, 0);
        match self {
            Self::Welcome(w) => {
                put_u16(out, w.version);
                put_u64(out, w.arena_len);
                put_u64(out, w.max_block_len);
                put_u64(out, w.instance);
            }
            Self::Lookup(tiers) => put_tiers(out, tiers),
            Self::Hold { tiers, held } => {
                put_u32(out, *held);
                put_tiers(out, tiers);
            }
            Self::Reserve(items) => {
                put_u32(out, items.len() as u32);
                for s in items {
                    let (code, offset) = match s {
                        ReserveStatus::Slot { offset } => (0, *offset),
                        ReserveStatus::Exists => (1, 0),
                        ReserveStatus::NoSpace => (2, 0),
                        ReserveStatus::TooLarge => (3, 0),
                    };
                    out.push(code);
                    put_u64(out, offset);
                }
            }
            Self::Commit(v) | Self::Abort(v) | Self::Release(v) | Self::Pull(v) => {
                put_u32(out, v.len() as u32);
                out.extend(v.iter().map(|b| u8::from(*b)));
            }
            Self::Acquire(items) => {
                put_u32(out, items.len() as u32);
                for s in items {
                    match s {
                        AcquireStatus::Hit { tier, offset, len } => {
                            out.push(1);
                            out.push(tier_code(*tier));
                            put_u64(out, *offset);
                            put_u64(out, *len);
                        }
                        AcquireStatus::Miss => {
                            out.extend_from_slice(&[0; 18]);
                        }
                    }
                }
            }
            Self::Stats(json) => put_bytes32(out, json.as_bytes()),
            Self::Announce => {}
            Self::Unhold(ended) => put_u32(out, *ended),
            Self::Error { code, message } => {
                put_u16(out, *code as u16);
                put_str(out, message);
            }
        }
        finish(out, start);
    }

    /// Decodes a body (the bytes after the length prefix).
    pub fn decode(body: &[u8]) -> Result<(Header, Self), WireError> {
        let mut r = Reader::new(body);
        let header = r.header()?;
        let resp = match header.kind {
            k if k == kind::HELLO | kind::REPLY => Self::Welcome(Welcome {
                version: r.u16()?,
                arena_len: r.u64()?,
                max_block_len: r.u64()?,
                instance: r.u64()?,
            }),
            k if k == kind::LOOKUP | kind::REPLY => Self::Lookup(r.tiers()?),
            k if k == kind::HOLD | kind::REPLY => {
                let held = r.u32()?;
                let tiers = r.tiers()?;
                if held as usize > tiers.len() {
                    return Err(invalid("hold", "more blocks held than stored"));
                }
                Self::Hold { tiers, held }
            }
            k if k == kind::RESERVE | kind::REPLY => {
                let n = r.count()?;
                let mut items = Vec::with_capacity(r.capacity_for(n, 9));
                for _ in 0..n {
                    let code = r.u8()?;
                    let offset = r.u64()?;
                    items.push(match code {
                        0 => ReserveStatus::Slot { offset },
                        1 => ReserveStatus::Exists,
                        2 => ReserveStatus::NoSpace,
                        3 => ReserveStatus::TooLarge,
                        c => return Err(invalid("reserve status", format!("unknown code {c}"))),
                    });
                }
                Self::Reserve(items)
            }
            k if k == kind::COMMIT | kind::REPLY => Self::Commit(r.flags()?),
            k if k == kind::ABORT | kind::REPLY => Self::Abort(r.flags()?),
            k if k == kind::RELEASE | kind::REPLY => Self::Release(r.flags()?),
            k if k == kind::ACQUIRE | kind::REPLY => {
                let n = r.count()?;
                let mut items = Vec::with_capacity(r.capacity_for(n, 18));
                for _ in 0..n {
                    let hit = r.u8()?;
                    let tier = r.u8()?;
                    let offset = r.u64()?;
                    let len = r.u64()?;
                    items.push(match hit {
                        0 => AcquireStatus::Miss,
                        1 => AcquireStatus::Hit {
                            tier: tier_from_code(tier)?,
                            offset,
                            len,
                        },
                        c => return Err(invalid("acquire status", format!("unknown code {c}"))),
                    });
                }
                Self::Acquire(items)
            }
            k if k == kind::STATS | kind::REPLY => {
                let bytes = r.bytes32()?;
                let json = String::from_utf8(bytes.to_vec()).map_err(|_| invalid("stats", "not UTF-8"))?;
                Self::Stats(json)
            }
            k if k == kind::ANNOUNCE | kind::REPLY => Self::Announce,
            k if k == kind::PULL | kind::REPLY => Self::Pull(r.flags()?),
            k if k == kind::UNHOLD | kind::REPLY => Self::Unhold(r.u32()?),
            kind::ERROR => {
                let raw = r.u16()?;
                let code = ErrorCode::from_u16(raw).unwrap_or(ErrorCode::Internal);
                Self::Error {
                    code,
                    message: r.string()?,
                }
            }
            k => return Err(WireError::UnknownKind(k)),
        };
        r.end()?;
        Ok((header, resp))
    }
}

/// Reads the length prefix of a frame; refuses lengths that cannot hold a header or exceed
/// [`MAX_FRAME`].
pub fn body_len(prefix: [u8; LEN_PREFIX]) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(prefix);
    if len > MAX_FRAME {
        return Err(WireError::Oversized(len));
    }
    if (len as usize) < HEADER_LEN {
        return Err(WireError::Truncated {
            needed: HEADER_LEN - len as usize,
        });
    }
    Ok(len as usize)
}

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer closed the stream between frames.
    #[error("connection closed")]
    Closed,
    /// The stream failed, or ended inside a frame.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The length prefix is out of bounds.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Reads one frame from `r` into `body` (replacing its contents with the body).
pub fn read_frame(r: &mut impl std::io::Read, body: &mut Vec<u8>) -> Result<(), ReadError> {
    let mut prefix = [0; LEN_PREFIX];
    let mut got = 0;
    while got < LEN_PREFIX {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Err(ReadError::Closed),
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = body_len(prefix)?;
    body.clear();
    body.resize(len, 0);
    r.read_exact(body)?;
    Ok(())
}

/// Reads frames from a stream with one `read` per frame in the common case (a small frame
/// arrives whole), instead of one for the length prefix and one for the body; bytes of the
/// next frame read early are kept for the next call.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// The read buffer a [`FrameReader`] starts with (and shrinks back to).
const DEFAULT_READ_BUF: usize = 64 << 10;

impl Default for FrameReader {
    fn default() -> Self {
        Self {
            buf: vec![0; DEFAULT_READ_BUF],
            start: 0,
            end: 0,
        }
    }
}

impl FrameReader {
    /// Returns the body of the next frame from `r`, valid until the next call.
    pub fn read_frame(&mut self, r: &mut impl std::io::Read) -> Result<&[u8], ReadError> {
        self.shrink();
        loop {
            let have = self.end - self.start;
            let need = if have >= LEN_PREFIX {
                let prefix: [u8; LEN_PREFIX] = self.buf[self.start..self.start + LEN_PREFIX]
                    .try_into()
                    .expect("four bytes");
                let total = LEN_PREFIX + body_len(prefix)?;
                if have >= total {
                    let body = self.start + LEN_PREFIX..self.start + total;
                    self.start += total;
                    return Ok(&self.buf[body]);
                }
                total
            } else {
                LEN_PREFIX
            };
            // Make room for the whole frame after the bytes already held.
            if self.start + need > self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end = have;
                self.start = 0;
                if need > self.buf.len() {
                    self.buf.resize(need, 0);
                }
            }
            match r.read(&mut self.buf[self.end..]) {
                Ok(0) if have == 0 => return Err(ReadError::Closed),
                Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
        }
    }

    /// Gives back memory a large frame made the buffer grow to, once it is consumed.
    fn shrink(&mut self) {
        if self.start == self.end && self.buf.len() > DEFAULT_READ_BUF {
            self.buf = vec![0; DEFAULT_READ_BUF];
            self.start = 0;
            self.end = 0;
        }
    }

    /// Whether bytes of an unfinished frame are held (the peer sent part of a frame).
    pub fn has_partial(&self) -> bool {
        self.end > self.start
    }
}

/// A reader over a Unix socket that first polls for data without sleeping, for up to `spin`,
/// before it blocks.
///
/// Why: a request and its answer are a few microseconds apart, but a thread that sleeps in
/// `read` is woken through the scheduler, which costs tens of microseconds when the core it
/// slept on went idle (and much more on virtual machines). Polling briefly keeps both ends of a
/// burst of calls awake, at a bounded CPU cost per call. A blocking read follows, so the
/// socket's timeout still applies.
#[derive(Debug)]
pub struct PollingReader<'a> {
    stream: &'a std::os::unix::net::UnixStream,
    spin: std::time::Duration,
}

impl<'a> PollingReader<'a> {
    /// Polls `stream` for up to `spin` before each blocking read.
    pub fn new(stream: &'a std::os::unix::net::UnixStream, spin: std::time::Duration) -> Self {
        Self { stream, spin }
    }
}

impl std::io::Read for PollingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.spin.is_zero() {
            let until = std::time::Instant::now() + self.spin;
            loop {
                match rustix::net::recv(self.stream, &mut *buf, rustix::net::RecvFlags::DONTWAIT) {
                    Ok((n, _)) => return Ok(n),
                    Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
                if std::time::Instant::now() >= until {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        std::io::Read::read(&mut &*self.stream, buf)
    }
}

/// Writes all of `buf` with `MSG_NOSIGNAL`: a peer that went away is an error to report, never
/// a SIGPIPE (which would kill an engine whose C host does not ignore it, or the agent). A send
/// timeout (`EAGAIN`) is reported as `TimedOut`.
pub fn send_all(stream: &std::os::unix::net::UnixStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match rustix::net::send(stream, buf, rustix::net::SendFlags::NOSIGNAL) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => return Err(std::io::ErrorKind::TimedOut.into()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads the header of a body whose message could not be decoded, to answer with its id.
pub fn peek_id(body: &[u8]) -> u32 {
    body.get(4..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn tier_code(t: TierLevel) -> u8 {
    match t {
        TierLevel::Host => 1,
        TierLevel::Disk => 2,
        TierLevel::Peer => 3,
        TierLevel::Object => 4,
    }
}

/// The tier as a client speaking `version` knows it: before version 4 there was no object
/// tier, and its blocks are reported as disk blocks (both are "below host, promoted on
/// acquire" to such a client).
pub fn tier_for_version(t: TierLevel, version: u16) -> TierLevel {
    match t {
        TierLevel::Object if version < 4 => TierLevel::Disk,
        t => t,
    }
}

fn tier_from_code(c: u8) -> Result<TierLevel, WireError> {
    match c {
        1 => Ok(TierLevel::Host),
        2 => Ok(TierLevel::Disk),
        3 => Ok(TierLevel::Peer),
        4 => Ok(TierLevel::Object),
        c => Err(invalid("tier", format!("unknown tier {c}"))),
    }
}

fn begin(out: &mut Vec<u8>, kind: u8, id: u32, deadline_us: u32) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    out.extend_from_slice(&[kind, 0, 0, 0]);
    put_u32(out, id);
    put_u32(out, deadline_us);
    start
}

fn finish(out: &mut [u8], start: usize) {
    let len = (out.len() - start - LEN_PREFIX) as u32;
    out[start..start + LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_tiers(out: &mut Vec<u8>, tiers: &[TierLevel]) {
    put_u32(out, tiers.len() as u32);
    out.extend(tiers.iter().map(|t| tier_code(*t)));
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let bytes = &s.as_bytes()[..end];
    put_u16(out, bytes.len() as u16);
    out.extend_from_slice(bytes);
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len() as u32);
    out.extend_from_slice(b);
}

/// A namespace and its hashes, counted.
fn put_batch(out: &mut Vec<u8>, ns: &Namespace, hashes: &[BlockHash]) {
    out.extend_from_slice(ns.as_bytes());
    put_u32(out, hashes.len() as u32);
    for h in hashes {
        put_hash(out, h);
    }
}

/// An optional ticket as a message's last field: left out when there is none.
fn put_ticket(out: &mut Vec<u8>, ticket: Option<HoldTicket>) {
    if let Some(t) = ticket {
        put_u64(out, t.get());
    }
}

fn put_hash(out: &mut Vec<u8>, h: &BlockHash) {
    let b = h.as_bytes();
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

/// A bounds-checked cursor over a body.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated {
                needed: n - self.buf.len(),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn header(&mut self) -> Result<Header, WireError> {
        let kind = self.u8()?;
        if self.array::<3>()? != [0; 3] {
            return Err(invalid("header", "reserved bytes must be zero"));
        }
        Ok(Header {
            kind,
            id: self.u32()?,
            deadline_us: self.u32()?,
        })
    }

    fn string(&mut self) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| invalid("string", "not UTF-8"))
    }

    fn bytes32(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn count(&mut self) -> Result<u32, WireError> {
        let n = self.u32()?;
        if n > MAX_BATCH {
            return Err(invalid(
                "count",
                format!("{n} exceeds the batch limit of {MAX_BATCH}"),
            ));
        }
        Ok(n)
    }

    /// Capacity to preallocate for `n` items of at least `min_bytes` each: never more than the
    /// bytes left could hold, so a lying count cannot make the decoder allocate.
    fn capacity_for(&self, n: u32, min_bytes: usize) -> usize {
        (n as usize).min(self.buf.len() / min_bytes)
    }

    fn batch(&mut self) -> Result<(Namespace, u32), WireError> {
        let ns = Namespace::from_bytes(self.array()?);
        Ok((ns, self.count()?))
    }

    fn hash(&mut self) -> Result<BlockHash, WireError> {
        let n = self.u8()? as usize;
        let b = self.take(n)?;
        BlockHash::new(b).map_err(|e| invalid("hash", e.to_string()))
    }

    /// A ticket as the last field of a message, where it may be left out (before version 6);
    /// 0 is refused: a sender without one leaves the field out.
    fn ticket_if_any(&mut self) -> Result<Option<HoldTicket>, WireError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        HoldTicket::new(self.u64()?)
            .map(Some)
            .ok_or_else(|| invalid("ticket", "0 is no ticket; leave the field out"))
    }

    fn hashes(&mut self, n: u32) -> Result<Vec<BlockHash>, WireError> {
        let mut v = Vec::with_capacity(self.capacity_for(n, 2));
        for _ in 0..n {
            v.push(self.hash()?);
        }
        Ok(v)
    }

    fn tier(&mut self) -> Result<TierLevel, WireError> {
        tier_from_code(self.u8()?)
    }

    fn tiers(&mut self) -> Result<Vec<TierLevel>, WireError> {
        let n = self.count()?;
        let mut tiers = Vec::with_capacity(self.capacity_for(n, 1));
        for _ in 0..n {
            tiers.push(self.tier()?);
        }
        Ok(tiers)
    }

    fn flags(&mut self) -> Result<Vec<bool>, WireError> {
        let n = self.count()?;
        let mut v = Vec::with_capacity(self.capacity_for(n, 1));
        for _ in 0..n {
            v.push(match self.u8()? {
                0 => false,
                1 => true,
                c => return Err(invalid("flag", format!("{c} is neither 0 nor 1"))),
            });
        }
        Ok(v)
    }

    fn end(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ns() -> Namespace {
        Namespace::builder("m").build()
    }

    fn hashes(n: u64) -> Vec<BlockHash> {
        (0..n).map(BlockHash::from_u64).collect()
    }

    fn body(frame: &[u8]) -> &[u8] {
        let len = body_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        &frame[4..]
    }

    fn requests() -> Vec<Request> {
        vec![
            Request::Hello {
                version: PROTOCOL_VERSION,
                client: "worker-0".into(),
            },
            Request::Lookup(ns(), hashes(256)),
            Request::Reserve(ns(), hashes(3).into_iter().map(|h| (h, 4096)).collect()),
            Request::Commit(ns(), hashes(2)),
            Request::Abort(ns(), hashes(1)),
            Request::Acquire(ns(), hashes(5)),
            Request::Release(ns(), vec![]),
            Request::Stats,
            Request::Announce(ns(), "meta-llama/Llama-3.1-8B-Instruct".into()),
            Request::Pull("10.0.0.7:9471".into(), ns(), hashes(4), None),
            Request::Pull("10.0.0.7:9471".into(), ns(), hashes(4), HoldTicket::new(u64::MAX)),
            Request::Hold(ns(), hashes(3), None),
            Request::Hold(ns(), hashes(3), HoldTicket::new(7)),
            Request::Unhold(ns(), HoldTicket::new(7).unwrap()),
        ]
    }

    /// Each request has a form in every version from its oldest on, that form itself from
    /// `since` on (a ticket is left out before 6), and none before its oldest; a new verb
    /// without a version fails here.
    #[test]
    fn requests_take_the_form_each_version_has() {
        for req in requests() {
            assert!(req.oldest() <= req.since(), "{req:?}");
            assert!(req.since() <= PROTOCOL_VERSION, "{req:?}");
            for version in MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION {
                let fitted = req.for_version(version);
                match fitted.as_deref() {
                    None => assert!(version < req.oldest(), "{req:?} in {version}"),
                    Some(f) => {
                        assert!(
                            version >= req.oldest() && f.since() <= version,
                            "{req:?} in {version}"
                        );
                        assert_eq!(f == &req, version >= req.since(), "{req:?} in {version}");
                    }
                }
            }
        }
        let ticket = HoldTicket::new(9);
        let pull = Request::Pull("p:1".into(), ns(), hashes(2), ticket);
        assert_eq!((pull.since(), pull.oldest()), (6, 3));
        assert_eq!(
            pull.for_version(5).as_deref(),
            Some(&Request::Pull("p:1".into(), ns(), hashes(2), None))
        );
        let ends_only = Request::Pull("p:1".into(), ns(), vec![], ticket);
        assert!(
            ends_only.for_version(5).is_none(),
            "a pull of no block only ends a ticket"
        );
        assert_eq!(Request::Hold(ns(), hashes(1), ticket).oldest(), 5);
        assert_eq!(Request::Unhold(ns(), HoldTicket::new(9).unwrap()).oldest(), 6);
        assert_eq!(Request::Announce(ns(), "m".into()).oldest(), 2);
    }

    fn responses() -> Vec<Response> {
        vec![
            Response::Welcome(Welcome {
                version: 1,
                arena_len: 1 << 30,
                max_block_len: 64 << 20,
                instance: 42,
            }),
            Response::Lookup(vec![
                TierLevel::Host,
                TierLevel::Disk,
                TierLevel::Peer,
                TierLevel::Object,
            ]),
            Response::Reserve(vec![
                ReserveStatus::Slot { offset: 4096 },
                ReserveStatus::Exists,
                ReserveStatus::NoSpace,
                ReserveStatus::TooLarge,
            ]),
            Response::Commit(vec![true, false]),
            Response::Abort(vec![true]),
            Response::Acquire(vec![
                AcquireStatus::Hit {
                    tier: TierLevel::Disk,
                    offset: 8192,
                    len: 100,
                },
                AcquireStatus::Miss,
            ]),
            Response::Release(vec![false]),
            Response::Stats("{}".into()),
            Response::Announce,
            Response::Pull(vec![true, true, false]),
            Response::Hold {
                tiers: vec![TierLevel::Host, TierLevel::Disk, TierLevel::Object],
                held: 2,
            },
            Response::Unhold(3),
            Response::Error {
                code: ErrorCode::PeerFailed,
                message: "refused".into(),
            },
            Response::Error {
                code: ErrorCode::DeadlineExceeded,
                message: "late".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for (i, req) in requests().into_iter().enumerate() {
            let mut out = Vec::new();
            req.encode(i as u32, 500, &mut out);
            let (h, back) = Request::decode(body(&out)).unwrap();
            assert_eq!((h.id, h.deadline_us, back), (i as u32, 500, req));
        }
        for (i, resp) in responses().into_iter().enumerate() {
            let mut out = Vec::new();
            resp.encode(i as u32, &mut out);
            let (h, back) = Response::decode(body(&out)).unwrap();
            assert_eq!((h.id, back), (i as u32, resp));
        }
    }

    #[test]
    fn length_prefix_limits() {
        assert_eq!(
            body_len((MAX_FRAME + 1).to_le_bytes()),
            Err(WireError::Oversized(MAX_FRAME + 1))
        );
        assert!(matches!(
            body_len(3u32.to_le_bytes()),
            Err(WireError::Truncated { .. })
        ));
        assert_eq!(body_len(12u32.to_le_bytes()), Ok(12));
    }

    #[test]
    fn every_truncation_of_a_valid_frame_is_an_error() {
        for req in requests() {
            let mut out = Vec::new();
            req.encode(7, 0, &mut out);
            let b = body(&out);
            // A hold or pull without its last field (the ticket) is one without a ticket.
            let untold = match &req {
                Request::Hold(ns, h, Some(_)) => Some(Request::Hold(*ns, h.clone(), None)),
                Request::Pull(p, ns, h, Some(_)) => Some(Request::Pull(p.clone(), *ns, h.clone(), None)),
                _ => None,
            };
            for cut in 0..b.len() {
                match Request::decode(&b[..cut]) {
                    Ok((_, got)) if cut == b.len() - 8 && untold.as_ref() == Some(&got) => {}
                    got => assert!(got.is_err(), "{req:?} cut at {cut}"),
                }
            }
            let mut long = b.to_vec();
            long.push(0);
            match req {
                // The byte starts a ticket, which is cut short.
                Request::Hold(_, _, None) | Request::Pull(_, _, _, None) => {
                    assert_eq!(Request::decode(&long), Err(WireError::Truncated { needed: 7 }))
                }
                _ => assert_eq!(Request::decode(&long), Err(WireError::Trailing(1))),
            }
        }
    }

    #[test]
    fn a_zero_ticket_is_refused() {
        for req in [
            Request::Hold(ns(), hashes(1), None),
            Request::Pull("p:1".into(), ns(), hashes(1), None),
        ] {
            let mut out = Vec::new();
            req.encode(1, 0, &mut out);
            let mut b = body(&out).to_vec();
            b.extend_from_slice(&0u64.to_le_bytes());
            assert!(matches!(
                Request::decode(&b),
                Err(WireError::Invalid { field: "ticket", .. })
            ));
        }
        let mut out = Vec::new();
        Request::Unhold(ns(), HoldTicket::new(1).unwrap()).encode(1, 0, &mut out);
        let mut b = body(&out).to_vec();
        let at = b.len() - 8;
        b[at..].fill(0);
        assert!(matches!(
            Request::decode(&b),
            Err(WireError::Invalid { field: "ticket", .. })
        ));
    }

    #[test]
    fn a_lying_count_does_not_allocate_for_it() {
        let mut out = Vec::new();
        Request::Lookup(ns(), vec![]).encode(1, 0, &mut out);
        let mut b = body(&out).to_vec();
        let at = HEADER_LEN + 16;
        b[at..at + 4].copy_from_slice(&MAX_BATCH.to_le_bytes());
        assert!(matches!(Request::decode(&b), Err(WireError::Truncated { .. })));
        b[at..at + 4].copy_from_slice(&(MAX_BATCH + 1).to_le_bytes());
        assert!(matches!(
            Request::decode(&b),
            Err(WireError::Invalid { field: "count", .. })
        ));
    }

    #[test]
    fn wrong_magic_and_unknown_kinds_are_refused() {
        let mut out = Vec::new();
        Request::Hello {
            version: 1,
            client: String::new(),
        }
        .encode(1, 0, &mut out);
        let mut b = body(&out).to_vec();
        b[HEADER_LEN] = b'X';
        assert!(matches!(
            Request::decode(&b),
            Err(WireError::Invalid { field: "magic", .. })
        ));
        b[0] = 0x42;
        assert_eq!(Request::decode(&b), Err(WireError::UnknownKind(0x42)));
    }

    #[test]
    fn a_hold_answer_holding_more_than_it_found_is_refused() {
        let mut out = Vec::new();
        Response::Hold {
            tiers: vec![TierLevel::Host],
            held: 1,
        }
        .encode(1, &mut out);
        let mut b = body(&out).to_vec();
        assert!(Response::decode(&b).is_ok());
        b[HEADER_LEN] = 2;
        assert!(matches!(
            Response::decode(&b),
            Err(WireError::Invalid { field: "hold", .. })
        ));
    }

    #[test]
    fn frame_reader_splits_and_joins_frames() {
        let mut stream = Vec::new();
        for req in requests() {
            req.encode(9, 0, &mut stream);
        }
        // Delivered one byte at a time, and all at once: the same frames either way.
        struct Trickle<'a>(&'a [u8], usize);
        impl std::io::Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let n = self.1.min(self.0.len()).min(out.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        for chunk in [1, 7, usize::MAX] {
            let mut r = FrameReader::default();
            let mut src = Trickle(&stream, chunk);
            for req in requests() {
                let body = r.read_frame(&mut src).unwrap();
                assert_eq!(Request::decode(body).unwrap().1, req);
            }
            assert!(matches!(r.read_frame(&mut src), Err(ReadError::Closed)));
        }
        let mut r = FrameReader::default();
        let mut cut = Trickle(&stream[..stream.len() - 1], usize::MAX);
        for _ in 0..requests().len() - 1 {
            r.read_frame(&mut cut).unwrap();
        }
        assert!(matches!(r.read_frame(&mut cut), Err(ReadError::Io(_))));
        // Frames larger than the buffer, arriving in pieces that straddle frame boundaries:
        // the buffer grows, keeps the next frame's first bytes, and shrinks back afterwards.
        let mut big = Vec::new();
        for n in [10_000, 3, 20_000] {
            Request::Lookup(ns(), hashes(n)).encode(n as u32, 0, &mut big);
        }
        Request::Stats.encode(4, 0, &mut big);
        let mut r = FrameReader::default();
        let mut src = Trickle(&big, 50_000);
        for n in [10_000u64, 3, 20_000] {
            let body = r.read_frame(&mut src).unwrap();
            assert_eq!(Request::decode(body).unwrap().1, Request::Lookup(ns(), hashes(n)));
        }
        assert_eq!(
            Request::decode(r.read_frame(&mut src).unwrap()).unwrap().1,
            Request::Stats
        );
        assert!(matches!(r.read_frame(&mut src), Err(ReadError::Closed)));
        assert_eq!(
            r.buf.len(),
            DEFAULT_READ_BUF,
            "shrunk back once the large frames were read"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Request::decode(&bytes);
            let _ = Response::decode(&bytes);
        }

        #[test]
        fn mutating_a_valid_frame_never_panics(
            which in 0usize..8,
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut out = Vec::new();
            requests()[which].encode(3, 10, &mut out);
            let mut b = out[LEN_PREFIX..].to_vec();
            for (at, v) in flips {
                let i = at.index(b.len());
                b[i] = v;
            }
            if let Ok((_, req)) = Request::decode(&b) {
                // Whatever decodes re-encodes to the same bytes: no two readings of one frame.
                let mut again = Vec::new();
                req.encode(peek_id(&b), u32::from_le_bytes(b[8..12].try_into().unwrap()), &mut again);
                prop_assert_eq!(&again[LEN_PREFIX..], &b[..]);
            }
        }
    }
}

//! The byte formats of the UCX data plane: the endpoint, and the put- and send-on-request active
//! messages (see the documentation of the parent module).

use std::time::{Duration, Instant};

use crate::transport::TransportError;
use crate::transport::grants::{GrantId, MAX_GRANT_BLOCKS};

pub(super) const ENDPOINT_MAGIC: [u8; 4] = *b"KVTU";
pub(super) const ENDPOINT_VERSION: u8 = 1;
pub(super) const ENDPOINT_HEADER: usize = 36;

pub(super) const AM_REQUEST: u32 = 0x6b76;
pub(super) const AM_ANSWER: u32 = 0x6b77;
pub(super) const AM_BLOCK: u32 = 0x6b78;
pub(super) const REQUEST_MAGIC: [u8; 4] = *b"KVTP";
pub(super) const ANSWER_MAGIC: [u8; 4] = *b"KVTA";
pub(super) const MESSAGE_VERSION: u16 = 1;
pub(super) const REQUEST_HEADER: usize = 92;
pub(super) const REQUEST_ENTRY: usize = 20;
pub(super) const ANSWER_HEADER: usize = 20;
/// The header of an [`AM_BLOCK`] message: request id u64 | entry u32.
pub(super) const BLOCK_HEADER: usize = 12;
/// A request's flag: send the blocks as rendezvous active messages instead of writing them.
/// A source that predates it ignores the flag (the field was zero) and writes.
pub(super) const REQUEST_FLAG_SEND: u16 = 1;
/// A request's flag, with [`REQUEST_FLAG_SEND`]: send blocks of at most
/// [`super::EAGER_BLOCKS_UP_TO`] eagerly, the bytes inside the message, rather than in
/// rendezvous. A source that predates it sends them in rendezvous, which the puller takes too.
pub(super) const REQUEST_FLAG_EAGER: u16 = 2;
/// An answer's flag: the blocks were sent, not written (so an OK block that never came is
/// missing, where a source that wrote it leaves the flag clear).
pub(super) const ANSWER_FLAG_SENT: u16 = 1;

pub(super) const STATUS_OK: u8 = 0;
pub(super) const STATUS_NO_BLOCK: u8 = 1;
pub(super) const STATUS_UNKNOWN_GRANT: u8 = 2;
pub(super) const STATUS_MALFORMED: u8 = 3;
pub(super) const STATUS_TIMED_OUT: u8 = 4;
pub(super) const STATUS_FAILED: u8 = 5;

/// A peer's endpoint, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RemoteEndpoint {
    pub(super) name: String,
    pub(super) arena_base: u64,
    pub(super) arena_len: u64,
    pub(super) address: Vec<u8>,
    pub(super) rkey: Vec<u8>,
}

impl RemoteEndpoint {
    pub(super) fn encode(&self) -> Vec<u8> {
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

    pub(super) fn parse(bytes: &[u8]) -> Result<Self, TransportError> {
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
    pub(super) fn label(&self) -> String {
        format!("ucx:{}", self.name)
    }
}

pub(super) fn hex_prefix(bytes: &[u8]) -> String {
    let shown: String = bytes.iter().take(16).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > 16 {
        format!("{shown}… ({} bytes)", bytes.len())
    } else {
        shown
    }
}

/// Little-endian fields read off a byte slice.
pub(super) struct Reader<'a> {
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

/// A put- or send-on-request message, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Request {
    pub(super) id: u64,
    pub(super) grant: GrantId,
    pub(super) boot_id: [u8; 16],
    pub(super) deadline_ns: u64,
    pub(super) budget_ns: u64,
    pub(super) arena_base: u64,
    pub(super) arena_len: u64,
    pub(super) address: Vec<u8>,
    pub(super) rkey: Vec<u8>,
    /// (grant index, length, slot offset in the puller's arena).
    pub(super) entries: Vec<(u32, u64, u64)>,
    /// Send each block as an [`AM_BLOCK`] message rather than write it.
    pub(super) send: bool,
    /// With `send`: send the small blocks eagerly ([`REQUEST_FLAG_EAGER`]).
    pub(super) eager: bool,
}

impl Request {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            REQUEST_HEADER + self.address.len() + self.rkey.len() + REQUEST_ENTRY * self.entries.len(),
        );
        out.extend_from_slice(&REQUEST_MAGIC);
        out.extend_from_slice(&MESSAGE_VERSION.to_le_bytes());
        let flags = match (self.send, self.eager) {
            (true, true) => REQUEST_FLAG_SEND | REQUEST_FLAG_EAGER,
            (true, false) => REQUEST_FLAG_SEND,
            (false, _) => 0,
        };
        out.extend_from_slice(&flags.to_le_bytes());
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

    pub(super) fn parse(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader::new(bytes);
        if r.take(4)? != REQUEST_MAGIC || r.u16()? != MESSAGE_VERSION {
            return None;
        }
        let flags = r.u16()?;
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
            send: flags & REQUEST_FLAG_SEND != 0,
            eager: flags & REQUEST_FLAG_SEND != 0 && flags & REQUEST_FLAG_EAGER != 0,
        })
    }

    /// When the source must stop writing: the puller's own deadline when both run on one host
    /// (one boot, so one CLOCK_MONOTONIC), else the budget counted from arrival, which ends no
    /// earlier than the puller's deadline by the message's transit time; never past
    /// `not_after` (the grant's expiry), whatever the puller asked for, so that a puller that
    /// stalls cannot hold the source's blocks past their grant.
    pub(super) fn local_deadline(
        &self,
        own_boot: &[u8; 16],
        now: Instant,
        now_ns: u64,
        not_after: Instant,
    ) -> Instant {
        let left = if *own_boot != [0; 16] && self.boot_id == *own_boot {
            self.deadline_ns.saturating_sub(now_ns)
        } else {
            self.budget_ns
        };
        now.checked_add(Duration::from_nanos(left))
            .map_or(not_after, |d| d.min(not_after))
            .max(now)
    }
}

/// The header of the [`AM_BLOCK`] message that carries a request's entry.
pub(super) fn encode_block_header(request_id: u64, entry: u32) -> [u8; BLOCK_HEADER] {
    let mut out = [0; BLOCK_HEADER];
    out[..8].copy_from_slice(&request_id.to_le_bytes());
    out[8..].copy_from_slice(&entry.to_le_bytes());
    out
}

/// (request id, entry) of an [`AM_BLOCK`] message's header.
pub(super) fn parse_block_header(bytes: &[u8]) -> Option<(u64, u32)> {
    let mut r = Reader::new(bytes);
    let parsed = (r.u64()?, r.u32()?);
    r.rest().is_empty().then_some(parsed)
}

/// An answer: the request it answers, whether the source sent the blocks (rather than wrote
/// them: a source that predates sends leaves the flag clear), and a status per entry.
pub(super) fn encode_answer(request_id: u64, sent: bool, statuses: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ANSWER_HEADER + statuses.len());
    out.extend_from_slice(&ANSWER_MAGIC);
    out.extend_from_slice(&MESSAGE_VERSION.to_le_bytes());
    let flags = if sent { ANSWER_FLAG_SENT } else { 0 };
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(&(statuses.len() as u32).to_le_bytes());
    out.extend_from_slice(statuses);
    out
}

/// (request id, sent, statuses) of an answer.
pub(super) fn parse_answer(bytes: &[u8]) -> Option<(u64, bool, &[u8])> {
    let mut r = Reader::new(bytes);
    if r.take(4)? != ANSWER_MAGIC || r.u16()? != MESSAGE_VERSION {
        return None;
    }
    let flags = r.u16()?;
    let id = r.u64()?;
    let count = r.u32()? as usize;
    let statuses = r.take(count)?;
    r.rest()
        .is_empty()
        .then_some((id, flags & ANSWER_FLAG_SENT != 0, statuses))
}

/// What an answer's status means for the puller.
pub(super) fn answer_status(status: u8, index: u32, label: &str) -> Result<(), TransportError> {
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

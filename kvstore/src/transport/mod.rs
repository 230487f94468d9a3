//! Moving blocks between node agents.
//!
//! Every transport follows one model, the one RDMA and UCX make cheapest: the **source** pins the
//! requested blocks in its arena and hands out a [`Grant`] (an unguessable id plus where each
//! block sits, its length and its checksum) over the control channel; the **puller** reserves
//! slots in its own arena and has the transport copy the granted ranges straight into them; the
//! puller verifies every checksum (unless the UCX or RDMA transport was configured not to),
//! commits what arrived intact, and releases the grant. A grant
//! that is never released expires, so a puller that dies cannot pin a source's memory forever.
//!
//! Backends, one module each: [`tcp`] (tokio, several streams per peer, always built), and behind
//! cargo features `ucx` and `rdma`. The control channel (gRPC) lives in `kvagent`; this module is
//! the data plane and the source's grant table.

pub mod auth;
pub mod grants;
pub mod queue;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod tcp;
#[cfg(test)]
mod test_support;
#[cfg(feature = "ucx")]
pub mod ucx;

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Instant;

use crate::host::Reservation;

pub use auth::Secret;
pub use grants::{
    ExpiredCounts, Grant, GrantId, GrantedBlock, Grants, HeldCounts, HoldEnd, HoldLimits, HoldOutcome,
    HoldTicket,
};
pub use queue::{PullQueue, Turn};

/// Which data plane carries a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// Plain TCP streams.
    Tcp,
    /// UCX (UCP), over whichever of its transports `UCX_TLS` allows.
    Ucx,
    /// ibverbs RC queue pairs with one-sided RDMA READ.
    Rdma,
}

impl TransportKind {
    /// The name used in configuration and in the control protocol.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Ucx => "ucx",
            Self::Rdma => "rdma",
        }
    }

    /// Parses [`Self::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "tcp" => Some(Self::Tcp),
            "ucx" => Some(Self::Ucx),
            "rdma" => Some(Self::Rdma),
            _ => None,
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a transfer (or part of it) failed. The puller treats every one as "not pulled": the
/// blocks' reservations are aborted and the engine recomputes.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TransportError {
    /// The peer could not be reached, or the connection broke.
    #[error("peer {peer}: {reason}")]
    Io {
        /// The peer's data endpoint.
        peer: String,
        /// What failed.
        reason: String,
    },
    /// The peer refused the connection's credentials.
    #[error("peer {peer} refused the connection: wrong or missing shared secret")]
    Refused {
        /// The peer's data endpoint.
        peer: String,
    },
    /// The peer no longer holds the grant (released, expired, or the peer restarted).
    #[error("peer {peer} does not know the grant (expired or released)")]
    UnknownGrant {
        /// The peer's data endpoint.
        peer: String,
    },
    /// The peer's answer broke the protocol.
    #[error("peer {peer} broke the protocol: {reason}")]
    Protocol {
        /// The peer's data endpoint.
        peer: String,
        /// What was wrong.
        reason: String,
    },
    /// The endpoint in the grant is not one this transport can use.
    #[error("bad endpoint {endpoint:?}: {reason}")]
    BadEndpoint {
        /// The endpoint as received.
        endpoint: String,
        /// Why it is unusable.
        reason: String,
    },
    /// The backend cannot run on this machine (no device, library missing).
    #[error("{transport} transport unavailable: {reason}")]
    Unavailable {
        /// The backend.
        transport: TransportKind,
        /// Why.
        reason: String,
    },
    /// The block arrived but its bytes do not match the grant's checksum.
    #[error("block {index} from {peer} failed its checksum")]
    Checksum {
        /// The peer's data endpoint.
        peer: String,
        /// The block's grant index.
        index: u32,
    },
    /// The transfer did not finish before its deadline.
    #[error("transfer from {peer} timed out")]
    TimedOut {
        /// The peer's data endpoint.
        peer: String,
    },
}

/// One block to pull: where the source holds it, and the local slot it goes to.
#[derive(Debug)]
pub struct PullItem {
    /// The block's position in its grant.
    pub index: u32,
    /// Where the source's arena holds it (for one-sided transports).
    pub remote_offset: u64,
    /// The grant's checksum of the block: the transport verifies what it wrote against it
    /// (UCX and RDMA unless configured not to: `UcxConfig::verify`, `RdmaConfig::verify`).
    pub checksum: u64,
    /// The local slot, reserved for exactly the block's length.
    pub slot: Reservation,
}

/// What became of one [`PullItem`]: its slot back, and whether the bytes arrived intact
/// (checksum verified, where the transport verifies).
#[derive(Debug)]
pub struct Pulled {
    /// The item's grant index.
    pub index: u32,
    /// The slot, to commit or abort.
    pub slot: Reservation,
    /// `Ok` when the whole block is in the slot and matches its checksum (or, on a UCX or
    /// RDMA transport configured not to verify, when the transport reports it delivered).
    pub result: Result<(), TransportError>,
}

/// A boxed future, so that [`Transport`] stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A data plane between node agents. One value serves this agent's granted blocks to peers and
/// pulls granted blocks from peers into this agent's arena.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> TransportKind;

    /// How peers reach this agent's data plane, as carried in a grant. `seen_as` is this agent's
    /// address as the peer reached its control channel, used when the data plane listens on a
    /// wildcard address.
    fn endpoint(&self, seen_as: Option<IpAddr>) -> Vec<u8>;

    /// Whether each pulled block is checked against its grant's checksum before it is reported
    /// `Ok` (the default; UCX and RDMA can be configured not to). Where it is not, nothing
    /// catches a read of memory the source reused once the grant ended, so the caller must keep
    /// the pull's deadline within the grant's life, with room for the transport's drain.
    fn verifies(&self) -> bool {
        true
    }

    /// Times this transport found its data plane unable to receive and replaced it with a new
    /// one (the UCX backend's workers, wedged by a peer on the same host that died in the middle
    /// of a shared-memory message: its `WEDGED_AFTER`); zero for backends that never do.
    fn replaced_data_planes(&self) -> u64 {
        0
    }

    /// Copies granted blocks from the peer at `endpoint` into the items' slots, giving up at
    /// `deadline`. Every item comes back, whatever happened to the others: a broken stream fails
    /// only the blocks it carried. (Never cancel the future: the slots travel inside it.)
    fn pull<'a>(
        &'a self,
        endpoint: &'a [u8],
        grant: GrantId,
        items: Vec<PullItem>,
        deadline: Instant,
    ) -> BoxFuture<'a, Vec<Pulled>>;
}

/// Whether a slot's bytes match `expected` (every transport verifies this before reporting a
/// block as pulled, unless configured not to: [`Transport::verifies`]; the TCP backend
/// checksums each block piece by piece as it arrives instead, and the UCX backend on the
/// thread that saw the block land, while the bytes are still in cache).
#[cfg(any(feature = "ucx", feature = "rdma"))]
pub(crate) fn verify(store: &crate::TieredStore, slot: &mut Reservation, expected: u64) -> bool {
    crate::block::checksum(store.host().reserved_mut(slot)) == expected
}

/// Every item failed with `err` (a transfer that could not start).
pub(crate) fn fail_all(items: Vec<PullItem>, err: &TransportError) -> Vec<Pulled> {
    items
        .into_iter()
        .map(|i| Pulled {
            index: i.index,
            slot: i.slot,
            result: Err(err.clone()),
        })
        .collect()
}

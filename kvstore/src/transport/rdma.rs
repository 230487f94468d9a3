//! The RDMA data plane: reliable-connected queue pairs (ibverbs, set up with rdmacm) and
//! one-sided RDMA READs straight from the source's arena into the puller's reserved slots.
//!
//! # The wire path
//!
//! **Start.** [`RdmaTransport::new`] lists the host's devices (`ibv_get_device_list`); with none
//! it returns [`TransportError::Unavailable`] ("no RDMA device") and the agent goes on with its
//! other transports. Otherwise it takes the configured device (or the first) in the form rdmacm
//! opened it (`rdma_get_devices`: the protection domain must belong to the same verbs context
//! as the queue pairs rdmacm connects), allocates a protection domain and registers the **whole
//! arena once** as one memory region, for local writes (READ targets) and remote reads (READ
//! sources). Registration pins every page of the arena, as `preallocate` would, so the agent's
//! memlock limit must cover it. A source (one given a grant table) also binds rdmacm to
//! [`RdmaConfig::listen`] and accepts queue pairs on a thread of its own.
//!
//! **Grant.** The control channel hands the puller a grant whose endpoint is an
//! [`RdmaEndpoint`]: the listener's address (a wildcard replaced by the address the puller
//! reached the control channel at), the region's remote key, base address and length, and a
//! random connection token. Each granted block comes with its offset in the arena, its length
//! and its checksum.
//!
//! **Connect.** The puller resolves the address and route (`rdma_resolve_addr`,
//! `rdma_resolve_route`), checks that the route leaves through the device its arena is
//! registered on, creates an RC queue pair with a completion queue of its own, and connects
//! with the token as private data and an initiator depth of
//! [`RdmaConfig::max_outstanding_reads`]. The source accepts a request only with the right token
//! on the right device, creating a queue pair in the region's protection domain; it never posts
//! on it. Pullers keep up to [`RdmaConfig::qps_per_peer`] idle queue pairs per source and reuse
//! them while the source's endpoint is unchanged and rdmacm reports no disconnect.
//!
//! **Pull.** Each block becomes RDMA READs from `base + offset` (the remote key) into its slot
//! (the local key): blocks adjacent in the source's arena share a READ with several scatter
//! entries, blocks longer than the port's largest message are split. READs are posted in chains
//! — one `ibv_post_send` per chain, only its last READ signalled, since a reliable connection
//! completes in order — and at most `max_outstanding_reads` are in flight. The pull polls its
//! completion queue (spinning briefly, then napping) until everything completed or the deadline.
//! Completions name their chain in the work request id, so a failed READ fails exactly the
//! blocks its chain carried; blocks whose chain completed are kept. Every block that arrived is
//! checked against its checksum before it is reported `Ok` (unless [`RdmaConfig::verify`] is
//! off).
//!
//! **Failure.** On an error or at the deadline the queue pair is moved to the error state, the
//! completion queue is drained until every posted chain has reported (bounded by
//! [`RdmaConfig::drain_timeout`]), and the queue pair is destroyed: once `ibv_destroy_qp`
//! returns, the device writes nothing more for it, so no READ can land in a slot after `pull`
//! has handed the slot back. The source's side needs no cleanup: it never knew about the READs.
//!
//! The grant id is not sent: one-sided READs do not pass through the source's software. The
//! grant still matters there — its pins keep the blocks where the grant says until it is
//! released or expires; a puller that reads after that reads whatever the slot holds then, and
//! the checksum rejects it. (Where the check is off, the agent keeps the pull's deadline
//! within the grant's life, and no READ is posted past it.)
//!
//! # Security
//!
//! As in every one-sided RDMA design, the remote key in an endpoint lets a peer read the
//! **whole registered arena**, not just the granted blocks, for as long as the registration
//! lives (until the agent restarts): a remote key cannot be narrowed per grant without
//! registering per grant, which costs more than the transfer. The endpoint is handed out only
//! with a grant, over the control channel, which checks the cluster's shared secret; the
//! listener accepts queue pairs only from pullers that present the endpoint's random token, so
//! hosts that never got a grant cannot even connect. Remote writes are never allowed.

mod cm;
mod conn;
mod device;
mod endpoint;
mod listen;
mod pump;
mod wr;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::auth::random_nonce;
use super::grants::{GrantId, Grants};
use super::{BoxFuture, PullItem, Pulled, Transport, TransportError, TransportKind, fail_all};
use crate::store::TieredStore;
use conn::Conn;
use device::Device;
pub use endpoint::{ENDPOINT_VERSION, EndpointError, RdmaEndpoint, TOKEN_LEN};
use listen::Listener;
use pump::{Fate, fates, fence, run};
use wr::{ReadItem, ReadTracker, plan_reads};

/// Settings of the RDMA data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaConfig {
    /// The device to use (`mlx5_0`); `None` takes the first one listed.
    pub device: Option<String>,
    /// The device port checked at start (rdmacm picks the port of each connection from its
    /// route; this one must exist, and a warning says when it is not active).
    pub port: u8,
    /// Where a source's rdmacm listener binds: an address of an interface on the device (or a
    /// wildcard, then requests that arrive on other devices are rejected); port 0 picks one.
    pub listen: SocketAddr,
    /// Most RDMA READs in flight per queue pair (its initiator depth, `max_rd_atomic`), clamped
    /// to what the device allows.
    pub max_outstanding_reads: u32,
    /// Most scatter entries per READ (blocks adjacent at the source share a READ), clamped to
    /// the device's limit for READs.
    pub max_sge: u32,
    /// Most READs posted with one `ibv_post_send` (at most `max_outstanding_reads`).
    pub wrs_per_post: u32,
    /// Idle queue pairs kept per source for later pulls; pulls beyond that at the same time
    /// connect queue pairs of their own and close them after.
    pub qps_per_peer: usize,
    /// Bound on resolving and connecting to a source.
    pub connect_timeout: Duration,
    /// Bound on draining a failed queue pair before it is destroyed.
    pub drain_timeout: Duration,
    /// Whether the puller checks every block it reads against the checksum of its grant
    /// (default): a pass of the CPU over bytes the NIC placed without one. Without it a block
    /// the NIC reports read is taken as it landed (the link's CRCs still cover the wire), and
    /// the check no longer catches a block corrupted in either host's memory or a source's
    /// bug. No READ is posted past the pull's deadline, which the caller keeps within the
    /// grant's life ([`Transport::verifies`]), after which the source may reuse the memory.
    /// Only for clusters whose fabric, memory and agents are trusted.
    pub verify: bool,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        Self {
            device: None,
            port: 1,
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            max_outstanding_reads: 16,
            max_sge: 4,
            wrs_per_post: 4,
            qps_per_peer: 2,
            connect_timeout: Duration::from_secs(3),
            drain_timeout: Duration::from_secs(2),
            verify: true,
        }
    }
}

/// The RDMA backend of [`Transport`].
#[derive(Debug, Clone)]
pub struct RdmaTransport {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<TieredStore>,
    device: Arc<Device>,
    cfg: RdmaConfig,
    token: [u8; TOKEN_LEN],
    /// Stops (and tears down accepted queue pairs) when the transport goes.
    listener: Option<Listener>,
    /// Idle queue pairs per source.
    pool: Mutex<HashMap<SocketAddr, Vec<Conn>>>,
    /// The table whose pins keep granted blocks in place while peers read them.
    _grants: Option<Arc<Grants>>,
}

impl RdmaTransport {
    /// Opens the RDMA device and registers `store`'s arena; with `grants`, also listens for
    /// pullers on [`RdmaConfig::listen`] (`None`: pull only).
    ///
    /// Returns [`TransportError::Unavailable`] when the host has no usable RDMA device (the
    /// reason says which step failed), never panics.
    pub fn new(
        store: Arc<TieredStore>,
        grants: Option<Arc<Grants>>,
        cfg: RdmaConfig,
    ) -> Result<Self, TransportError> {
        let device = Arc::new(Device::open(Arc::clone(&store), &cfg)?);
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&random_nonce()[..TOKEN_LEN]);
        let listener = match grants {
            Some(_) => Some(Listener::start(Arc::clone(&device), cfg.listen, token)?),
            None => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                device,
                cfg,
                token,
                listener,
                pool: Mutex::new(HashMap::new()),
                _grants: grants,
            }),
        })
    }

    /// Where pullers connect, when this transport serves grants.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.inner.listener.as_ref().map(Listener::addr)
    }
}

impl Transport for RdmaTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn verifies(&self) -> bool {
        self.inner.cfg.verify
    }

    fn endpoint(&self, seen_as: Option<IpAddr>) -> Vec<u8> {
        let Some(listener) = &self.inner.listener else {
            return Vec::new();
        };
        let mut addr = listener.addr();
        if addr.ip().is_unspecified() {
            if let Some(ip) = seen_as {
                addr.set_ip(ip);
            }
        }
        let (base, len) = self.inner.device.region();
        RdmaEndpoint {
            addr,
            rkey: self.inner.device.rkey(),
            base,
            len,
            token: self.inner.token,
        }
        .encode()
    }

    fn pull<'a>(
        &'a self,
        endpoint: &'a [u8],
        _grant: GrantId,
        items: Vec<PullItem>,
        deadline: Instant,
    ) -> BoxFuture<'a, Vec<Pulled>> {
        let inner = Arc::clone(&self.inner);
        let endpoint = endpoint.to_vec();
        Box::pin(async move {
            if items.is_empty() {
                return Vec::new();
            }
            // Posting and polling block the thread; they get one of the runtime's blocking
            // threads rather than stalling its workers.
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                return inner.pull_blocking(&endpoint, items, deadline);
            };
            match rt
                .spawn_blocking(move || inner.pull_blocking(&endpoint, items, deadline))
                .await
            {
                Ok(done) => done,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => {
                    // The runtime is shutting down: the slots went with the task.
                    tracing::warn!(error = %e, "RDMA pull cancelled by the runtime");
                    Vec::new()
                }
            }
        })
    }
}

impl Inner {
    fn pull_blocking(&self, endpoint: &[u8], items: Vec<PullItem>, deadline: Instant) -> Vec<Pulled> {
        let ep = match RdmaEndpoint::decode(endpoint) {
            Ok(ep) => ep,
            Err(e) => {
                let err = TransportError::BadEndpoint {
                    endpoint: shown(endpoint),
                    reason: e.to_string(),
                };
                return fail_all(items, &err);
            }
        };
        let peer = ep.addr.to_string();
        let (local_base, _) = self.device.region();
        let mut fates: Vec<Option<Fate>> = Vec::with_capacity(items.len());
        let mut planned = Vec::new();
        let mut reads = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let len = it.slot.len();
            if it.remote_offset.checked_add(len).is_none_or(|end| end > ep.len) {
                fates.push(Some(Fate::Failed(TransportError::Protocol {
                    peer: peer.clone(),
                    reason: format!(
                        "block {} at {}+{len} lies outside the source's {}-byte arena",
                        it.index, it.remote_offset, ep.len
                    ),
                })));
                continue;
            }
            fates.push(None);
            planned.push(i);
            reads.push(ReadItem {
                remote: ep.base + it.remote_offset,
                local: local_base + it.slot.offset(),
                len,
            });
        }
        if !planned.is_empty() {
            for (i, fate) in planned.into_iter().zip(self.read(&ep, &peer, &reads, deadline)) {
                fates[i] = Some(fate);
            }
        }
        items
            .into_iter()
            .zip(fates)
            .map(|(mut item, fate)| {
                let result = match fate {
                    Some(Fate::Arrived)
                        if !self.cfg.verify || super::verify(&self.store, &mut item.slot, item.checksum) =>
                    {
                        Ok(())
                    }
                    Some(Fate::Arrived) => Err(TransportError::Checksum {
                        peer: peer.clone(),
                        index: item.index,
                    }),
                    Some(Fate::Failed(e)) => Err(e),
                    None => Err(TransportError::Protocol {
                        peer: peer.clone(),
                        reason: "block not read".into(),
                    }),
                };
                Pulled {
                    index: item.index,
                    slot: item.slot,
                    result,
                }
            })
            .collect()
    }

    /// Reads `reads` from the source at `ep`; one fate per read, in order.
    fn read(&self, ep: &RdmaEndpoint, peer: &str, reads: &[ReadItem], deadline: Instant) -> Vec<Fate> {
        let all = |e: TransportError| (0..reads.len()).map(|_| Fate::Failed(e.clone())).collect();
        let mut conn = match self.checkout(ep, deadline) {
            Ok(c) => c,
            Err(e) => return all(e),
        };
        let plan = match plan_reads(reads, conn.limits) {
            Ok(p) => p,
            Err(e) => {
                self.checkin(ep.addr, conn);
                return all(TransportError::Protocol {
                    peer: peer.to_string(),
                    reason: e.to_string(),
                });
            }
        };
        let mut tracker = ReadTracker::new(&plan);
        let describe = conn::wc_status_text;
        let stopped = run(&mut conn, &plan, &mut tracker, ep.rkey, deadline, peer, describe);
        match &stopped {
            None => self.checkin(ep.addr, conn),
            Some(e) => {
                tracing::debug!(%peer, error = %e, "RDMA pull stopped; fencing its queue pair");
                let left = fence(&mut conn, &mut tracker, self.cfg.drain_timeout);
                if left > 0 {
                    tracing::warn!(
                        %peer,
                        reads = left,
                        "RDMA: READs still in flight after the drain; destroying the queue pair fences them"
                    );
                }
                // Destroying the queue pair: after this no READ of it can land in a slot.
                drop(conn);
            }
        }
        fates(tracker.outcomes(), stopped.as_ref(), peer, describe)
    }

    /// An idle queue pair to the source at `ep`, or a new one.
    fn checkout(&self, ep: &RdmaEndpoint, deadline: Instant) -> Result<Conn, TransportError> {
        loop {
            let idle = self.pool.lock().get_mut(&ep.addr).and_then(Vec::pop);
            let Some(mut c) = idle else { break };
            if c.usable_for(ep) {
                return Ok(c);
            }
            // Stale (the source restarted or disconnected): dropped here, outside the lock.
        }
        Conn::connect(Arc::clone(&self.device), ep, &self.cfg, deadline)
    }

    /// Keeps a healthy queue pair for later pulls, or closes it when enough are kept.
    fn checkin(&self, addr: SocketAddr, conn: Conn) {
        let mut pool = self.pool.lock();
        let idle = pool.entry(addr).or_default();
        if idle.len() < self.cfg.qps_per_peer {
            idle.push(conn);
            return;
        }
        drop(pool);
        drop(conn);
    }
}

/// An endpoint as shown in errors: text when it is text (another transport's endpoint), else
/// only its length (it carries a remote key and a token).
fn shown(endpoint: &[u8]) -> String {
    if !endpoint.is_empty() && endpoint.iter().all(|b| b.is_ascii_graphic()) {
        String::from_utf8_lossy(endpoint).into_owned()
    } else {
        format!("<{} bytes>", endpoint.len())
    }
}

#[cfg(test)]
mod tests;

//! Transfers between node agents: the control channel (gRPC `kvtier.peer.v1.Peer`) on which a
//! puller asks a source for a grant, and the pulling itself — reserve local slots, copy over a
//! data transport, verify every checksum (unless `peer.ucx.verify` or `peer.rdma.verify` is
//! off), commit, release the grant. A pull whose blocks are not checked ends within its
//! grant's life (`within_grant`).

mod reuse;
mod service;

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kvstore::transport::tcp::{TcpConfig, TcpTransport};
use kvstore::transport::{
    GrantId, Grants, HoldLimits, HoldTicket, PullItem, PullQueue, Secret, Transport, TransportError,
    TransportKind, Turn,
};
use kvstore::{BlockKey, PutOutcome, TieredStore};
use parking_lot::Mutex;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;

use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::node::publish::Models;
pub(crate) use reuse::Probe;
use reuse::Reuse;

/// The generated protocol.
#[expect(unreachable_pub, clippy::allow_attributes, reason = "generated code")]
pub(crate) mod proto {
    tonic::include_proto!("kvtier.peer.v1");
}

/// Why a pull failed as a whole. Blocks are never half-visible: what did not arrive intact is
/// simply not stored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PullError {
    /// Peer transfers are not configured.
    #[error("peer transfers need the cluster's shared secret (`peer.secret_file`) or `peer.insecure = true`")]
    NoSecret,
    /// The peer address is unusable.
    #[error("bad peer address {0:?}: expected host:port")]
    BadAddress(String),
    /// The control call failed.
    #[error("peer {peer}: {status}")]
    Control {
        /// The peer.
        peer: String,
        /// What it (or the channel) said.
        status: String,
    },
    /// The peer chose a transport this agent does not have.
    #[error("peer {peer} chose transport {transport:?}, which this agent does not offer")]
    Transport {
        /// The peer.
        peer: String,
        /// Its choice.
        transport: String,
    },
    /// The deadline passed before the transfer could start.
    #[error("peer {0}: deadline passed")]
    TimedOut(String),
    /// The deadline passed while the pull waited behind other pulls from the same peer
    /// (`peer.pulls_per_source`).
    #[error("peer {0}: deadline passed while waiting for a turn behind other pulls from it")]
    NoTurn(String),
}

/// What [`Grants::hold`] may keep: `peer.hold_s` and `peer.hold_max_percent` of each tier, on
/// an agent that serves peers (nothing is pulled from any other).
fn hold_limits(cfg: &crate::config::PeerSection, store: &TieredStore) -> HoldLimits {
    if cfg.listen.is_empty() || cfg.hold_s == 0 {
        return HoldLimits::NONE;
    }
    let stats = store.stats();
    let share = |capacity: u64| {
        u64::try_from(u128::from(capacity) * u128::from(cfg.hold_max_percent) / 100).unwrap_or(u64::MAX)
    };
    HoldLimits {
        ttl: Duration::from_secs(u64::from(cfg.hold_s)),
        host_bytes: share(stats.host.capacity_bytes),
        disk_bytes: stats.disk.map_or(0, |d| share(d.capacity_bytes)),
    }
}

/// What a pull is for, which decides whether it may be declined and which of the source's
/// holds it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PullFor {
    /// A decode engine continuing a request the source's engine prefilled, which held the
    /// blocks (under a ticket, when one is known): always pulled, and ends the hand-off's holds.
    HandOff(Option<HoldTicket>),
    /// Reuse of a prefix the cluster index found at the source: pulled only when the reuse
    /// policy expects it to beat recomputing, and ends no hold.
    Reuse,
}

/// Bound of one control call this agent serves.
const CONTROL_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Control calls one connection may have in progress at once on this agent.
const CONTROL_CALLS_PER_CONNECTION: usize = 64;
/// Bound of one try of a best-effort control call: the release a puller sends after its pull,
/// or a hold's end (the grant or hold expires on its own anyway).
const BEST_EFFORT_TRY_TIMEOUT: Duration = Duration::from_secs(5);
/// Tries of a best-effort control call that fails to reach its peer.
const BEST_EFFORT_TRIES: u32 = 3;
/// Pause before a best-effort call's second try, doubled before each later one.
const BEST_EFFORT_PAUSE: Duration = Duration::from_millis(200);
/// How long after its first try a best-effort call may start another, where nothing expires
/// sooner (that try may run its own timeout past it).
const BEST_EFFORT_SPAN: Duration = Duration::from_secs(15);
/// Control channels to peers kept at once.
const MAX_PEER_CHANNELS: usize = 1024;

/// Peer transfers of one agent: serves its blocks (when `peer.listen` is set) and pulls from
/// other agents for its engines.
#[derive(Debug)]
pub(crate) struct Peers {
    store: Arc<TieredStore>,
    metrics: Arc<Metrics>,
    secret: Option<Secret>,
    insecure: bool,
    transports: Vec<Arc<dyn Transport>>,
    /// Pulls from one source run a few at a time, in the order they come.
    pull_queue: PullQueue,
    channels: Mutex<HashMap<String, Channel>>,
    /// The control address other agents reach this one at, if it serves.
    advertise: Option<String>,
    grants: Arc<Grants>,
    /// Cross-node reuse, when configured.
    reuse: Option<Reuse>,
    runtime: tokio::runtime::Runtime,
}

impl Peers {
    /// Starts the transfer runtime and, when `peer.listen` is set, the control and data servers.
    pub(crate) fn start(
        node: &NodeConfig,
        store: Arc<TieredStore>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let cfg = &node.peer;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.threads as usize)
            .thread_name("kvagent-peer")
            .enable_all()
            .build()
            .context("starting the peer transfer runtime")?;
        let secret = cfg.load_secret()?;
        let grants = Arc::new(
            Grants::new(
                Arc::clone(&store),
                Duration::from_secs(u64::from(cfg.grant_ttl_s)),
                cfg.max_grants as usize,
            )
            .with_holds(hold_limits(cfg, &store)),
        );
        let tcp = TcpTransport::new(
            Arc::clone(&store),
            Some(Arc::clone(&grants)),
            secret.clone(),
            TcpConfig {
                streams: match cfg.streams {
                    0 => kvstore::transport::tcp::default_streams(),
                    n => n as usize,
                },
                ..TcpConfig::default()
            },
        );
        let mut transports: Vec<Arc<dyn Transport>> = Vec::new();
        for kind in cfg.transports.iter().filter_map(|t| TransportKind::from_name(t)) {
            let _guard = runtime.enter();
            let built: Result<Arc<dyn Transport>, TransportError> = match kind {
                TransportKind::Tcp => Ok(Arc::new(tcp.clone())),
                #[cfg(feature = "rdma")]
                TransportKind::Rdma => rdma_transport(
                    &cfg.rdma,
                    &store,
                    (!cfg.listen.is_empty()).then(|| Arc::clone(&grants)),
                ),
                #[cfg(feature = "ucx")]
                TransportKind::Ucx => {
                    ucx_transport(cfg, &store, (!cfg.listen.is_empty()).then(|| Arc::clone(&grants)))
                }
                #[cfg(not(all(feature = "rdma", feature = "ucx")))]
                other => Err(TransportError::Unavailable {
                    transport: other,
                    reason: "not built into this agent".into(),
                }),
            };
            match built {
                Ok(t) => transports.push(t),
                Err(e) => {
                    tracing::warn!(transport = %kind, error = %e, "peer transport unavailable; offering the others")
                }
            }
        }
        if transports.is_empty() {
            anyhow::bail!(
                "none of `peer.transports` {:?} can run on this machine",
                cfg.transports
            );
        }
        let mut advertise = None;
        if !cfg.listen.is_empty() {
            let listen: SocketAddr = cfg.listen.parse().context("peer.listen")?;
            let data: SocketAddr = if cfg.data_listen.is_empty() {
                let port = listen
                    .port()
                    .checked_add(1)
                    .context("peer.listen: no port after it for data")?;
                SocketAddr::new(listen.ip(), if listen.port() == 0 { 0 } else { port })
            } else {
                cfg.data_listen.parse().context("peer.data_listen")?
            };
            let (control, data) = runtime.block_on(async {
                let control = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding the peer control channel to {listen}"))?;
                let data = tokio::net::TcpListener::bind(data)
                    .await
                    .with_context(|| format!("binding the peer data plane to {data}"))?;
                anyhow::Ok((control, data))
            })?;
            let control_addr = control.local_addr().context("peer control address")?;
            let data_addr = {
                let _guard = runtime.enter();
                tcp.serve(data).context("serving the peer data plane")?
            };
            let svc = service::PeerService {
                grants: Arc::clone(&grants),
                transports: transports.clone(),
                secret: secret.clone(),
                metrics: Arc::clone(&metrics),
            };
            runtime.spawn(async move {
                // Keepalives find pullers that went away; the timeout bounds a grant (whose
                // first checksums can take a while) and the calls of a peer that stalls.
                let incoming = tonic::transport::server::TcpIncoming::from(control)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(Duration::from_secs(60)));
                if let Err(e) = tonic::transport::Server::builder()
                    .timeout(CONTROL_CALL_TIMEOUT)
                    .http2_keepalive_interval(Some(Duration::from_secs(30)))
                    .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                    .concurrency_limit_per_connection(CONTROL_CALLS_PER_CONNECTION)
                    .add_service(proto::peer_server::PeerServer::new(svc))
                    .serve_with_incoming(incoming)
                    .await
                {
                    tracing::error!(error = %e, "the peer control channel stopped");
                }
            });
            let expiring = Arc::clone(&grants);
            let shortest = match cfg.hold_s {
                0 => cfg.grant_ttl_s,
                hold => cfg.grant_ttl_s.min(hold),
            };
            let period = Duration::from_secs(u64::from(shortest))
                .div_f32(2.0)
                .max(Duration::from_millis(100));
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(period);
                loop {
                    tick.tick().await;
                    // Ending pins takes the tiers' locks, which disk I/O may hold a while: off
                    // the workers that serve control calls.
                    let grants = Arc::clone(&expiring);
                    let Ok(gone) = tokio::task::spawn_blocking(move || {
                        grants.expire_holds();
                        grants.expire()
                    })
                    .await
                    else {
                        continue;
                    };
                    if gone > 0 {
                        tracing::warn!(
                            grants = gone,
                            "peer grants expired unreleased (a puller died or gave up)"
                        );
                    }
                }
            });
            let adv = advertised(&cfg.advertise, control_addr)?;
            tracing::info!(control = %control_addr, data = %data_addr, advertise = %adv,
                secret = secret.is_some(), "serving blocks to peers");
            if secret.is_none() {
                tracing::warn!(
                    "peer transfers run without a shared secret (`peer.insecure`): any host that reaches the ports can read cached blocks"
                );
            }
            advertise = Some(adv);
        }
        let reuse =
            if node.reuse.enabled && !node.publish.index.is_empty() && (secret.is_some() || cfg.insecure) {
                let _guard = runtime.enter();
                let source = crate::index::agent_source(&node.publish.node_name()?);
                Some(Reuse::new(
                    &node.publish.index_uri(),
                    source,
                    advertise.clone(),
                    node.reuse.clone(),
                )?)
            } else {
                None
            };
        Ok(Arc::new(Self {
            reuse,
            store,
            metrics,
            secret,
            insecure: cfg.insecure,
            transports,
            pull_queue: PullQueue::new(match cfg.pulls_per_source {
                0 => kvstore::transport::queue::default_per_source(),
                n => n as usize,
            }),
            channels: Mutex::new(HashMap::new()),
            advertise,
            grants,
            runtime,
        }))
    }

    /// The data transports this agent pulls and serves with.
    pub(crate) fn transports(&self) -> Vec<Arc<dyn Transport>> {
        self.transports.clone()
    }

    /// The control address peers and engines are told, when this agent serves.
    pub(crate) fn advertise(&self) -> Option<&str> {
        self.advertise.as_deref()
    }

    /// The grant table: grants open now, and blocks held for pullers (none on an agent that
    /// serves no peers).
    pub(crate) fn grants(&self) -> &Arc<Grants> {
        &self.grants
    }

    /// [`Self::pull`] of a hand-off from a thread outside the runtime (an engine connection's
    /// thread): blocks of `ns` a producer held under `ticket`, if it says one.
    pub(crate) fn pull_blocking(
        &self,
        peer: &str,
        ns: kvstore::Namespace,
        keys: &[BlockKey],
        deadline: Instant,
        ticket: Option<HoldTicket>,
    ) -> Result<Vec<bool>, PullError> {
        self.runtime
            .block_on(self.pull(peer, ns, keys, deadline, PullFor::HandOff(ticket)))
    }

    /// A lookup's local prefix `tiers` of `hashes`, extended with the blocks a peer holds past
    /// it when cross-node reuse is on (asks the index at most once per prefix and
    /// `reuse.remember_ms`).
    pub(crate) fn extend_lookup(
        &self,
        models: &Models,
        ns: kvstore::Namespace,
        hashes: &[kvstore::BlockHash],
        tiers: Vec<kvstore::TierLevel>,
    ) -> Vec<kvstore::TierLevel> {
        let Some(reuse) = &self.reuse else {
            return tiers;
        };
        let rest = &hashes[tiers.len()..];
        if !reuse.worth_asking(rest.len()) {
            return tiers;
        }
        let Some(model) = models.model_of(&ns) else {
            // Nothing announced for the namespace: the index knows its blocks under no model.
            return tiers;
        };
        match self.runtime.block_on(reuse.probe(ns, &model, rest)) {
            Probe::Peer { blocks, .. } => reuse::with_peer(tiers, blocks.min(rest.len())),
            Probe::Nothing => tiers,
        }
    }

    /// Before an acquire: pulls the blocks past the local prefix that a lookup found at a peer,
    /// when that pays. A failure only means the blocks stay missing.
    pub(crate) fn fetch_for_acquire(
        &self,
        ns: kvstore::Namespace,
        hashes: &[kvstore::BlockHash],
        deadline: Instant,
    ) {
        // Without reuse every acquire passes through here: it costs nothing then.
        let Some(reuse) = &self.reuse else {
            return;
        };
        let keys: Vec<BlockKey> = hashes.iter().map(|h| BlockKey::new(ns, *h)).collect();
        let keys = keys.as_slice();
        let local = self.store.lookup_prefix(keys).len;
        let Some(first) = keys.get(local) else {
            return;
        };
        let Some(Probe::Peer { address, blocks }) = reuse.remembered(first.namespace, first.hash) else {
            return;
        };
        let wanted = &keys[local..(local + blocks).min(keys.len())];
        match self
            .runtime
            .block_on(self.pull(&address, ns, wanted, deadline, PullFor::Reuse))
        {
            Ok(held) if held.iter().all(|h| *h) => {
                tracing::debug!(peer = %address, blocks = wanted.len(), "pulled a prefix a peer held");
            }
            Ok(_) => reuse.declined(first.namespace, first.hash),
            Err(e) => {
                tracing::warn!(peer = %address, error = %e, "pulling a prefix a peer held failed; the engine recomputes it");
                reuse.declined(first.namespace, first.hash);
            }
        }
    }

    /// Copies the longest prefix of `keys` (of namespace `ns`) that `peer` holds (and this agent
    /// does not) into this agent's tiers. Per key: whether this agent holds it afterwards.
    /// Pulls from one peer take turns (`peer.pulls_per_source` at once, first come first
    /// served); one whose deadline passes before its turn fails with [`PullError::NoTurn`].
    ///
    /// For [`PullFor::Reuse`], the transfer only goes ahead if the reuse policy expects it to
    /// beat recomputing (decided once the grant says how many bytes it is). A hand-off under a
    /// ticket whose blocks are all here already asks the peer to end its holds of `ns` instead;
    /// one of no `keys` (its engine pulls no more of it), or whose grant the peer refuses or
    /// does not answer in time, its holds of every namespace (all the hand-off's ranks).
    pub(crate) async fn pull(
        &self,
        peer: &str,
        ns: kvstore::Namespace,
        keys: &[BlockKey],
        deadline: Instant,
        purpose: PullFor,
    ) -> Result<Vec<bool>, PullError> {
        if self.secret.is_none() && !self.insecure {
            return Err(PullError::NoSecret);
        }
        let mut held = vec![false; keys.len()];
        let local = self.store.lookup_prefix(keys).len;
        held[..local].fill(true);
        let want = &keys[local..];
        let ticket = match purpose {
            PullFor::HandOff(ticket) => ticket,
            PullFor::Reuse => None,
        };
        if want.is_empty() {
            if let Some(ticket) = ticket {
                // With keys, only this rank's are here: the next rank's pull may need its own.
                self.end_hold(peer, ns, ticket, keys.is_empty());
            }
            return Ok(held);
        }
        let control = |status: String| PullError::Control {
            peer: peer.to_owned(),
            status,
        };
        let mut client = proto::peer_client::PeerClient::new(self.channel(peer)?);
        let mut req = self.request(proto::GrantRequest {
            namespace: ns.as_bytes().to_vec(),
            hashes: want.iter().map(|k| k.hash.as_bytes().to_vec()).collect(),
            transports: self
                .transports
                .iter()
                .map(|t| t.kind().name().to_owned())
                .collect(),
            reuse: purpose == PullFor::Reuse,
            hold_ticket: ticket.map_or(0, HoldTicket::get),
        });
        // The turn is taken before the grant, so that no grant ages, no source blocks stay
        // pinned and no local slots stay reserved while the pull waits behind others.
        // A pull holding its turn may wait in `pull_granted` for another writer of one of its
        // blocks (an engine, or a pull from another source) and so hold up the next pulls
        // from this peer: such writers end within their own deadlines.
        let turn = self.pull_queue.turn(peer.as_bytes(), deadline).await;
        self.metrics
            .peer_pull_waited(turn.as_ref().map_or_else(|waited| *waited, Turn::waited));
        let remaining = deadline.saturating_duration_since(Instant::now());
        let asked = Instant::now();
        let answer = if turn.is_err() {
            self.metrics.peer_pull_queue_timeout();
            Err(PullError::NoTurn(peer.to_owned()))
        } else if remaining.is_zero() {
            Err(PullError::TimedOut(peer.to_owned()))
        } else {
            req.set_timeout(remaining);
            match tokio::time::timeout(remaining, client.grant(req)).await {
                Ok(Ok(grant)) => Ok(grant.into_inner()),
                Ok(Err(s)) => Err(control(format!("asking for a grant: {}", status_text(&s)))),
                Err(_) => Err(PullError::TimedOut(peer.to_owned())),
            }
        };
        let grant = match answer {
            Ok(grant) => grant,
            Err(e) => {
                // No pull of this hand-off follows, of this rank or a later one (its engine
                // computes): the source need not keep holding the blocks for it.
                if let Some(ticket) = ticket {
                    self.end_hold(peer, ns, ticket, true);
                }
                return Err(e);
            }
        };
        if grant.blocks.is_empty() {
            return Ok(held);
        }
        let id =
            GrantId::from_slice(&grant.grant_id).ok_or_else(|| control("grant id is not 16 bytes".into()))?;
        // More blocks than asked, or a length no slot of this agent holds, is refused before
        // anything is reserved (the grant is still released, below): the peer's layout differs
        // from this node's, or the peer lies.
        let fits = self.store.host().max_block_len();
        let unfit = if grant.blocks.len() > want.len() {
            Some(control(format!(
                "granted {} blocks of {} asked",
                grant.blocks.len(),
                want.len()
            )))
        } else {
            grant.blocks.iter().find(|b| b.len == 0 || b.len > fits).map(|b| {
                control(format!(
                    "granted a block of {} bytes; this agent holds blocks of 1 to {fits}",
                    b.len
                ))
            })
        };
        let bytes: u64 = grant.blocks.iter().map(|b| b.len.min(fits)).sum();
        let pays = purpose != PullFor::Reuse
            || self
                .reuse
                .as_ref()
                .is_none_or(|r| r.pays(grant.blocks.len(), bytes));
        // Where the blocks are not checked nothing else catches a read past the grant.
        let unchecked = self
            .transports
            .iter()
            .any(|t| t.kind().name() == grant.transport && !t.verifies());
        let deadline = if unchecked {
            within_grant(asked, grant.ttl_ms, deadline)
        } else {
            deadline
        };
        let result = if let Some(unfit) = unfit {
            Err(unfit)
        } else if pays {
            self.pull_granted(peer, &grant, id, want, &mut held[local..], deadline)
                .await
        } else {
            tracing::debug!(
                peer,
                blocks = grant.blocks.len(),
                bytes,
                "recomputing is expected to be faster than pulling"
            );
            Ok(())
        };
        // The transfer is over: the next pull from this source may start.
        drop(turn);
        // Best effort: an unreleased grant expires on its own, and retrying after it did is
        // pointless.
        let expires = tokio::time::Instant::now()
            + match grant.ttl_ms {
                0 => BEST_EFFORT_SPAN,
                ttl => Duration::from_millis(u64::from(ttl)).saturating_sub(asked.elapsed()),
            };
        // One token serves every try: they all start within the span, far inside the skew a
        // token is accepted with (two minutes), and agents keep no record of tokens seen.
        let token = self.token();
        let peer_name = peer.to_owned();
        self.runtime.spawn(async move {
            let released = best_effort(expires, || {
                let mut release = with_token(
                    proto::ReleaseRequest {
                        grant_id: id.0.to_vec(),
                    },
                    token.as_ref(),
                );
                release.set_timeout(BEST_EFFORT_TRY_TIMEOUT);
                let mut client = client.clone();
                async move { client.release(release).await }
            })
            .await;
            if let Err(why) = released {
                tracing::debug!(peer = peer_name, error = %why, "releasing a grant failed; it expires");
            }
        });
        result.map(|()| held)
    }

    async fn pull_granted(
        &self,
        peer: &str,
        grant: &proto::GrantResponse,
        id: GrantId,
        want: &[BlockKey],
        held: &mut [bool],
        deadline: Instant,
    ) -> Result<(), PullError> {
        let transport = self
            .transports
            .iter()
            .find(|t| t.kind().name() == grant.transport)
            .ok_or_else(|| PullError::Transport {
                peer: peer.to_owned(),
                transport: grant.transport.clone(),
            })?;
        let wanted: Vec<(BlockKey, u64)> = want.iter().zip(&grant.blocks).map(|(k, b)| (*k, b.len)).collect();
        let mut items = Vec::with_capacity(wanted.len());
        // A block another pull (or an engine) is storing is waited for: held is what this agent
        // holds afterwards, not what another transfer may still fail to land.
        let reserved = self.store.reserve_batch_after_writers(&wanted, deadline).await;
        for (i, r) in reserved.into_iter().enumerate() {
            match r {
                Ok(slot) => items.push(PullItem {
                    index: i as u32,
                    remote_offset: grant.blocks[i].offset,
                    checksum: grant.blocks[i].checksum,
                    slot,
                }),
                // Stored meanwhile: nothing to pull.
                Err(PutOutcome::AlreadyStored) => held[i] = true,
                // No room, or still being written by another at the deadline: the rest of the
                // prefix would be useless without this block.
                Err(_) => break,
            }
        }
        if items.is_empty() {
            return Ok(());
        }
        let pulled = transport.pull(&grant.endpoint, id, items, deadline).await;
        let (mut ok, mut bytes, mut corrupt, mut failed) = (Vec::new(), 0, 0, 0);
        let mut first_error = None;
        // A verifying transport reports a block pulled only once it matched its grant's
        // checksum: the block keeps it, for when this agent grants the block in turn.
        let verified = transport.verifies();
        for mut p in pulled {
            match p.result {
                Ok(()) => {
                    bytes += p.slot.len();
                    held[p.index as usize] = true;
                    if verified {
                        p.slot.note_checksum(grant.blocks[p.index as usize].checksum);
                    }
                    ok.push(p.slot);
                }
                Err(TransportError::Checksum { .. }) => {
                    corrupt += 1;
                    self.store.abort(p.slot);
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                    self.store.abort(p.slot);
                }
            }
        }
        let n = ok.len() as u64;
        self.store.commit_many(ok);
        self.metrics.peer_pulled(n, bytes, corrupt, failed);
        if corrupt > 0 {
            tracing::warn!(
                peer,
                blocks = corrupt,
                "pulled blocks failed their checksum; dropped"
            );
        }
        if let Some(e) = first_error {
            tracing::warn!(peer, pulled = n, failed, error = %e, "a peer transfer failed in part");
        }
        Ok(())
    }

    /// Asks `peer` to end the holds made under `ticket` in `ns` (in every namespace, if
    /// `whole_hand_off`), in the background (best effort: they expire on their own).
    fn end_hold(&self, peer: &str, ns: kvstore::Namespace, ticket: HoldTicket, whole_hand_off: bool) {
        let channel = match self.channel(peer) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(peer, error = %e, "no hold to end at a peer that cannot be reached");
                return;
            }
        };
        let msg = proto::EndHoldRequest {
            namespace: ns.as_bytes().to_vec(),
            ticket: ticket.get(),
            whole_hand_off,
        };
        // One token for every try, as for a release.
        let token = self.token();
        let peer = peer.to_owned();
        let client = proto::peer_client::PeerClient::new(channel);
        self.runtime.spawn(async move {
            let ended = best_effort(tokio::time::Instant::now() + BEST_EFFORT_SPAN, || {
                let mut req = with_token(msg.clone(), token.as_ref());
                req.set_timeout(BEST_EFFORT_TRY_TIMEOUT);
                let mut client = client.clone();
                async move { client.end_hold(req).await }
            })
            .await;
            match ended {
                Ok(()) => {}
                // An agent older than tickets has no such call; its holds carry none anyway.
                Err(Failed::Refused(s)) if s.code() == tonic::Code::Unimplemented => {}
                Err(why) => tracing::debug!(peer, error = %why, "ending a peer's holds failed; they expire"),
            }
        });
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        with_token(msg, self.token().as_ref())
    }

    /// The metadata value that shows this agent's peers it knows the cluster's secret.
    fn token(&self) -> Option<AsciiMetadataValue> {
        self.secret.as_ref().and_then(|s| s.token().parse().ok())
    }

    fn channel(&self, peer: &str) -> Result<Channel, PullError> {
        if let Some(c) = self.channels.lock().get(peer) {
            return Ok(c.clone());
        }
        if !peer.contains(':') || peer.contains('/') {
            return Err(PullError::BadAddress(peer.to_owned()));
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{peer}"))
            .map_err(|_| PullError::BadAddress(peer.to_owned()))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .connect_lazy();
        let mut channels = self.channels.lock();
        // Peers come from engines' pull calls and the index's answers: a bound, past which the
        // channels start over (each reconnects on its next call).
        if channels.len() >= MAX_PEER_CHANNELS {
            channels.clear();
        }
        channels.insert(peer.to_owned(), channel.clone());
        Ok(channel)
    }
}

#[cfg(feature = "rdma")]
fn rdma_transport(
    cfg: &crate::config::RdmaSection,
    store: &Arc<TieredStore>,
    grants: Option<Arc<Grants>>,
) -> Result<Arc<dyn Transport>, TransportError> {
    use kvstore::transport::rdma::{RdmaConfig, RdmaTransport};
    let listen = cfg.listen.parse().map_err(|e| TransportError::Unavailable {
        transport: TransportKind::Rdma,
        reason: format!("peer.rdma.listen: {e}"),
    })?;
    let rdma = RdmaConfig {
        device: (!cfg.device.is_empty()).then(|| cfg.device.clone()),
        port: cfg.port,
        listen,
        max_outstanding_reads: cfg.max_outstanding_reads,
        max_sge: cfg.max_sge,
        wrs_per_post: cfg.wrs_per_post,
        qps_per_peer: cfg.qps_per_peer as usize,
        connect_timeout: Duration::from_millis(u64::from(cfg.connect_timeout_ms)),
        drain_timeout: Duration::from_millis(u64::from(cfg.drain_timeout_ms)),
        verify: cfg.verify,
    };
    Ok(Arc::new(RdmaTransport::new(Arc::clone(store), grants, rdma)?))
}

#[cfg(feature = "ucx")]
fn ucx_transport(
    cfg: &crate::config::PeerSection,
    store: &Arc<TieredStore>,
    grants: Option<Arc<Grants>>,
) -> Result<Arc<dyn Transport>, TransportError> {
    use kvstore::transport::ucx::{UcxConfig, UcxMode, UcxTransport};
    let defaults = UcxConfig::default();
    let ucx = UcxConfig {
        mode: match cfg.ucx.mode.as_str() {
            "get" => UcxMode::Get,
            "put" => UcxMode::PutOnRequest,
            "send" => UcxMode::SendOnRequest,
            _ => UcxMode::Auto,
        },
        tls: (!cfg.ucx.tls.is_empty()).then(|| cfg.ucx.tls.clone()),
        settings: cfg
            .ucx
            .settings
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        inline_bytes: cfg
            .ucx
            .inline_kib
            .map_or(defaults.inline_bytes, |kib| kib.saturating_mul(1024)),
        lanes: cfg.ucx.lanes.unwrap_or(defaults.lanes),
        verify: cfg.ucx.verify,
        ..defaults
    };
    let transport = UcxTransport::new(Arc::clone(store), grants, ucx)?;
    let (major, minor) = kvstore::transport::ucx::ucx_version();
    tracing::info!(
        mode = ?transport.mode(),
        lanes = transport.lanes(),
        inline_kib = transport.inline_bytes() / 1024,
        verify = transport.verifies(),
        ucx = %format!("{major}.{minor}"),
        worker = transport.name(),
        "UCX data plane ready"
    );
    let (fixed_major, fixed_minor) = kvstore::transport::ucx::SURVIVES_PEER_DEATH_IN_WIREUP_SINCE;
    if (major, minor) < (fixed_major, fixed_minor) {
        tracing::warn!(
            ucx = %format!("{major}.{minor}"),
            "this UCX aborts the agent when a peer dies while connecting to it (an assertion \
             UCX {fixed_major}.{fixed_minor} removed); where peers may be killed mid-pull, run \
             a UCX of {fixed_major}.{fixed_minor} or later, or the tcp transport"
        );
    }
    Ok(Arc::new(transport))
}

/// The deadline of a pull whose blocks are not checked (`peer.ucx.verify`,
/// `peer.rdma.verify`), of a grant asked for at `asked` that the source keeps for `ttl_ms`:
/// `deadline`, or three quarters into the grant's life if that comes first (the source counts
/// from when it granted, later than `asked`). The transports start no read at or past it and
/// refuse a get that completes past it, so no block read after the source may have reused
/// its memory is taken; a checked block read then fails its checksum instead. `ttl_ms` 0 (a
/// source that does not say) leaves `deadline` alone.
fn within_grant(asked: Instant, ttl_ms: u32, deadline: Instant) -> Instant {
    if ttl_ms == 0 {
        return deadline;
    }
    let usable = Duration::from_millis(u64::from(ttl_ms)) * 3 / 4;
    deadline.min(asked + usable)
}

/// The advertised control address: `advertise`, else the bound address with a wildcard host
/// replaced by what the host name resolves to.
fn advertised(advertise: &str, bound: SocketAddr) -> anyhow::Result<String> {
    if !advertise.is_empty() {
        return Ok(advertise.to_owned());
    }
    if !bound.ip().is_unspecified() {
        return Ok(bound.to_string());
    }
    let host = crate::config::host_name().context("reading the host name for `peer.advertise`")?;
    let addr = (host.as_str(), bound.port())
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.find(|a| !a.ip().is_loopback() && a.is_ipv4()))
        .with_context(|| {
            format!(
                "`peer.listen` is a wildcard address and the host name {host:?} resolves to no \
                 routable address: set `peer.advertise`"
            )
        })?;
    Ok(addr.to_string())
}

/// A control call of `msg`, with the cluster's `token` where there is one.
fn with_token<T>(msg: T, token: Option<&AsciiMetadataValue>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(token) = token {
        req.metadata_mut().insert(service::TOKEN_HEADER, token.clone());
    }
    req
}

/// Why a best-effort control call did not get through.
#[derive(Debug, thiserror::Error)]
enum Failed {
    /// The peer answered with an error, or the call failed after it may have reached the
    /// peer: not tried again.
    #[error("{}", status_text(.0))]
    Refused(tonic::Status),
    /// No answer within a try's timeout: not tried again, so that a source too slow to answer
    /// is not sent more.
    #[error("no answer within {BEST_EFFORT_TRY_TIMEOUT:?}")]
    TimedOut,
    /// Every try failed to reach the peer; the last one's status.
    #[error("{} ({})", status_text(.last), tried(*.tries))]
    Lost { tries: u32, last: tonic::Status },
}

fn tried(tries: u32) -> String {
    if tries == 1 {
        "tried once".to_owned()
    } else {
        format!("tried {tries} times")
    }
}

/// Makes a best-effort control call (a release, a hold's end), trying again while it fails to
/// reach the peer, up to [`BEST_EFFORT_TRIES`] tries, none but the first after `until`: a lost
/// release leaves its grant to expire, which ends every rank's holds of a hand-off while its
/// later ranks may still pull them.
async fn best_effort<T, F, Fut>(until: tokio::time::Instant, mut call: F) -> Result<(), Failed>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut pause = BEST_EFFORT_PAUSE;
    let mut tries = 0;
    loop {
        tries += 1;
        let last = match tokio::time::timeout(BEST_EFFORT_TRY_TIMEOUT, call()).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(s)) if unreached(&s) => s,
            Ok(Err(s)) => return Err(Failed::Refused(s)),
            Err(_) => return Err(Failed::TimedOut),
        };
        if tries >= BEST_EFFORT_TRIES || tokio::time::Instant::now() + pause > until {
            return Err(Failed::Lost { tries, last });
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
}

/// Whether a failed call may not have reached the peer: tonic reports a connection it could not
/// make, or one that broke, as `Unavailable` or `Unknown` (a stream the peer reset comes as
/// another code, and is not tried again).
fn unreached(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
}

/// What a failed control call said, with the causes tonic keeps out of the message: a
/// connection that broke is only "transport error" without them.
fn status_text(status: &tonic::Status) -> String {
    let mut text = format!("{} (gRPC {:?})", status.message(), status.code());
    let mut last = status.message().to_owned();
    let mut cause = std::error::Error::source(status);
    while let Some(e) = cause {
        let said = e.to_string();
        if said != last {
            text.push_str(": ");
            text.push_str(&said);
            last = said;
        }
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use kvstore::{BlockHash, BlockKey, Namespace, TieredStore};

    use super::{Peers, PullError, proto, status_text, within_grant};
    use crate::config::NodeConfig;
    use crate::metrics::Metrics;

    /// A source that grants one block of the length it is told (or more, or refuses, when told to),
    /// and counts releases and the tickets whose holds it is asked to end (and whether in
    /// every namespace). It answers the first `unavailable` releases and ends as a source
    /// that cannot be reached.
    #[derive(Default)]
    struct LyingSource {
        len: AtomicU64,
        /// Blocks granted more than asked.
        extra: AtomicUsize,
        refuse: AtomicBool,
        unavailable: AtomicUsize,
        release_tries: AtomicUsize,
        released: AtomicUsize,
        ended: AtomicU64,
        ended_everywhere: AtomicBool,
        /// Grant requests received.
        asked: AtomicUsize,
    }

    impl LyingSource {
        /// Whether this call is one of those to fail as if the source could not be reached.
        fn unreachable(&self) -> bool {
            self.unavailable
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        }
    }

    #[tonic::async_trait]
    impl proto::peer_server::Peer for Arc<LyingSource> {
        async fn grant(
            &self,
            _: tonic::Request<proto::GrantRequest>,
        ) -> Result<tonic::Response<proto::GrantResponse>, tonic::Status> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            if self.refuse.load(Ordering::Relaxed) {
                return Err(tonic::Status::resource_exhausted("too many grants open"));
            }
            Ok(tonic::Response::new(proto::GrantResponse {
                grant_id: vec![7; 16],
                transport: "tcp".into(),
                endpoint: b"127.0.0.1:9".to_vec(),
                blocks: vec![
                    proto::GrantedBlock {
                        offset: 0,
                        len: self.len.load(Ordering::Relaxed),
                        checksum: 0,
                    };
                    1 + self.extra.load(Ordering::Relaxed)
                ],
                ttl_ms: 30_000,
            }))
        }

        async fn release(
            &self,
            _: tonic::Request<proto::ReleaseRequest>,
        ) -> Result<tonic::Response<proto::ReleaseResponse>, tonic::Status> {
            self.release_tries.fetch_add(1, Ordering::SeqCst);
            if self.unreachable() {
                return Err(tonic::Status::unavailable("connection refused"));
            }
            self.released.fetch_add(1, Ordering::SeqCst);
            Ok(tonic::Response::new(proto::ReleaseResponse { released: true }))
        }

        async fn end_hold(
            &self,
            req: tonic::Request<proto::EndHoldRequest>,
        ) -> Result<tonic::Response<proto::EndHoldResponse>, tonic::Status> {
            if self.unreachable() {
                return Err(tonic::Status::unavailable("connection refused"));
            }
            let req = req.into_inner();
            self.ended_everywhere.store(req.whole_hand_off, Ordering::SeqCst);
            self.ended.fetch_add(req.ticket, Ordering::SeqCst);
            Ok(tonic::Response::new(proto::EndHoldResponse { ended: 0 }))
        }
    }

    /// The control channels kept for peers stay bounded however many addresses engines and
    /// the index name.
    #[test]
    fn channels_to_peers_are_bounded() {
        let mut cfg = NodeConfig::default();
        cfg.host.size = bytesize::ByteSize::mib(8);
        cfg.peer.insecure = true;
        let store = Arc::new(TieredStore::open(cfg.store_config().unwrap()).unwrap());
        let (metrics, _) = Metrics::new(Arc::clone(&store));
        let peers = Peers::start(&cfg, store, metrics).unwrap();
        let _runtime = peers.runtime.enter();
        for i in 0..super::MAX_PEER_CHANNELS + 10 {
            peers
                .channel(&format!("10.{}.{}.{}:9471", i >> 16, (i >> 8) & 255, i & 255))
                .unwrap();
            assert!(peers.channels.lock().len() <= super::MAX_PEER_CHANNELS);
        }
        assert!(matches!(peers.channel("no-port"), Err(PullError::BadAddress(_))));
    }

    /// A lying source served on its own runtime (kept alive by the caller), its address, and
    /// an agent's peers with a 64 MiB arena that pull from it.
    fn lying_source() -> (
        tokio::runtime::Runtime,
        Arc<LyingSource>,
        String,
        Arc<TieredStore>,
        Arc<Peers>,
    ) {
        let server = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let source = Arc::new(LyingSource::default());
        let listener = server
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        server.spawn(
            tonic::transport::Server::builder()
                .add_service(proto::peer_server::PeerServer::new(Arc::clone(&source)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut cfg = NodeConfig::default();
        cfg.host.size = bytesize::ByteSize::mib(64);
        cfg.peer.insecure = true;
        cfg.peer.pulls_per_source = 1;
        let store = Arc::new(TieredStore::open(cfg.store_config().unwrap()).unwrap());
        let (metrics, _) = Metrics::new(Arc::clone(&store));
        let peers = Peers::start(&cfg, Arc::clone(&store), metrics).unwrap();
        (server, source, addr, store, peers)
    }

    /// Waits (10 s at most) for `source` to be asked to end hand-off `ticket`, every rank's
    /// holds of it.
    fn assert_whole_hand_off_ended(source: &LyingSource, ticket: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while source.ended.load(Ordering::SeqCst) != ticket {
            assert!(Instant::now() < deadline, "the hand-off was not ended");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(source.ended_everywhere.load(Ordering::SeqCst));
    }

    /// Waits (10 s at most) for `source` to have released `grants` grants.
    fn assert_released(source: &LyingSource, grants: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while source.released.load(Ordering::SeqCst) < grants {
            assert!(Instant::now() < deadline, "the grants were not released");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A hand-off pull of one block from `addr`, within 10 s.
    fn pull_one(
        peers: &Peers,
        addr: &str,
        key: BlockKey,
        ticket: Option<kvstore::transport::HoldTicket>,
    ) -> Result<Vec<bool>, PullError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        peers.pull_blocking(addr, key.namespace, &[key], deadline, ticket)
    }

    /// A source that refuses a hand-off's grant is asked to end the hand-off's holds, every
    /// rank's: no pull of it follows.
    #[test]
    fn a_refused_grant_ends_the_hand_off() {
        let (_server, source, addr, _store, peers) = lying_source();
        source.refuse.store(true, Ordering::Relaxed);
        let key = BlockKey::new(Namespace::from_bytes([1; 16]), BlockHash::from_u64(5));
        let err = pull_one(&peers, &addr, key, kvstore::transport::HoldTicket::new(9)).expect_err("refused");
        assert!(
            matches!(&err, PullError::Control { status, .. } if status.contains("too many grants")),
            "{err}"
        );
        assert_whole_hand_off_ended(&source, 9);
    }

    /// A hand-off pull whose deadline passed before its grant request could be sent asks the
    /// source to end the hand-off all the same: its engine computes the request.
    #[test]
    fn a_pull_past_its_deadline_ends_the_hand_off() {
        let (_server, source, addr, _store, peers) = lying_source();
        let key = BlockKey::new(Namespace::from_bytes([1; 16]), BlockHash::from_u64(5));
        let ticket = kvstore::transport::HoldTicket::new(11);
        let err = peers
            .pull_blocking(&addr, key.namespace, &[key], Instant::now(), ticket)
            .expect_err("too late");
        assert!(matches!(err, PullError::TimedOut(_)), "{err}");
        assert_whole_hand_off_ended(&source, 11);
    }

    /// A hand-off pull whose deadline passes while another pull from the same peer holds the
    /// only turn fails without asking for a grant, ends the hand-off at the source, and counts
    /// its wait; once the turn is free, the next pull asks at once.
    #[test]
    fn a_pull_that_waits_past_its_deadline_for_its_turn_ends_the_hand_off() {
        let (_server, source, addr, _store, peers) = lying_source();
        assert_eq!(
            peers.pull_queue.per_source(),
            1,
            "the test source's puller has one turn"
        );
        let key = BlockKey::new(Namespace::from_bytes([1; 16]), BlockHash::from_u64(5));
        let far = Instant::now() + Duration::from_secs(60);
        let held = peers
            .runtime
            .block_on(peers.pull_queue.turn(addr.as_bytes(), far))
            .expect("a free turn");
        let ticket = kvstore::transport::HoldTicket::new(13);
        let deadline = Instant::now() + Duration::from_millis(50);
        let err = peers
            .pull_blocking(&addr, key.namespace, &[key], deadline, ticket)
            .expect_err("no turn before the deadline");
        assert!(matches!(err, PullError::NoTurn(_)), "{err}");
        assert_whole_hand_off_ended(&source, 13);
        assert_eq!(source.asked.load(Ordering::SeqCst), 0, "a grant was asked for");
        assert_eq!(peers.metrics.peer_pull_queue_timeouts.get(), 1);
        drop(held);
        source.len.store(0, Ordering::Relaxed);
        pull_one(&peers, &addr, key, None).expect_err("a block no slot holds");
        assert_eq!(source.asked.load(Ordering::SeqCst), 1);
    }

    /// A grant naming a length no slot holds (0; more than a slab; so large that a slot size
    /// for it would wrap past zero) fails that pull with a control error before anything is
    /// reserved, and the grant is still released; the agent pulls on afterwards.
    #[test]
    fn a_grant_of_lengths_no_slot_holds_fails_the_pull_and_is_released() {
        let (_server, source, addr, store, peers) = lying_source();
        let key = BlockKey::new(Namespace::from_bytes([1; 16]), BlockHash::from_u64(5));
        let slab = store.host().max_block_len();
        let lens = [0, slab + 1, u64::MAX, (15 << 60) + 1];
        for len in lens {
            source.len.store(len, Ordering::Relaxed);
            let err = pull_one(&peers, &addr, key, None).expect_err("a block no slot holds");
            assert!(
                matches!(&err, PullError::Control { status, .. } if status.contains("granted a block of")),
                "{len}: {err}"
            );
            assert_eq!(store.host().stats().used_bytes, 0, "{len}: a slot was taken");
        }
        assert_released(&source, lens.len());
    }

    /// A grant of more blocks than were asked fails the pull, reserving nothing, and is still
    /// released (an unreleased one would expire and end the hand-off's other ranks' holds).
    #[test]
    fn a_grant_of_more_blocks_than_asked_fails_the_pull_and_is_released() {
        let (_server, source, addr, store, peers) = lying_source();
        source.len.store(4096, Ordering::Relaxed);
        source.extra.store(1, Ordering::Relaxed);
        let key = BlockKey::new(Namespace::from_bytes([1; 16]), BlockHash::from_u64(5));
        let err = pull_one(&peers, &addr, key, None).expect_err("more blocks than asked");
        assert!(
            matches!(&err, PullError::Control { status, .. } if status.contains("granted 2 blocks of 1 asked")),
            "{err}"
        );
        assert_eq!(store.host().stats().used_bytes, 0, "a slot was taken");
        assert_released(&source, 1);
    }

    /// A release that does not reach the source is tried again: the grant is released on
    /// the third try.
    #[test]
    fn a_lost_release_is_tried_again() {
        let (_server, source, addr, store, peers) = lying_source();
        source.unavailable.store(2, Ordering::SeqCst);
        source
            .len
            .store(store.host().max_block_len() + 1, Ordering::Relaxed);
        let key = BlockKey::new(Namespace::from_bytes([1; 16]), BlockHash::from_u64(5));
        pull_one(&peers, &addr, key, None).expect_err("a block no slot holds");
        assert_released(&source, 1);
        assert_eq!(source.release_tries.load(Ordering::SeqCst), 3);
    }

    /// Ending a hand-off that does not reach the source is tried again.
    #[test]
    fn a_lost_end_of_a_hand_off_is_tried_again() {
        let (_server, source, addr, _store, peers) = lying_source();
        source.refuse.store(true, Ordering::Relaxed);
        source.unavailable.store(1, Ordering::SeqCst);
        let key = BlockKey::new(Namespace::from_bytes([1; 16]), BlockHash::from_u64(5));
        pull_one(&peers, &addr, key, kvstore::transport::HoldTicket::new(13)).expect_err("refused");
        assert_whole_hand_off_ended(&source, 13);
        assert_eq!(source.unavailable.load(Ordering::SeqCst), 0);
    }

    /// What a best-effort call that fails with `status` each time (or never answers, for
    /// `None`) did, on a paused clock: when each try started, from the first, and the outcome.
    async fn tries(
        status: impl Fn() -> Option<tonic::Status>,
        until: Duration,
    ) -> (Vec<Duration>, Result<(), super::Failed>) {
        let start = tokio::time::Instant::now();
        let started = std::sync::Mutex::new(Vec::new());
        let outcome = super::best_effort(start + until, || {
            started.lock().unwrap().push(start.elapsed());
            let status = status();
            async move {
                match status {
                    Some(s) => Err::<tonic::Response<()>, _>(s),
                    None => std::future::pending().await,
                }
            }
        })
        .await;
        (started.into_inner().unwrap(), outcome)
    }

    /// A best-effort call is tried again, 200 ms and then 400 ms later, only while it fails
    /// to reach its peer, at most three times, and none after its bound; a refusal or a try
    /// that times out (a source too slow to answer) is not tried again.
    #[tokio::test(start_paused = true)]
    async fn best_effort_calls_retry_only_calls_that_did_not_reach_their_peer() {
        let ms = Duration::from_millis;
        let refused = || Some(tonic::Status::unavailable("connection refused"));
        let minute = Duration::from_secs(60);
        let (started, outcome) = tries(refused, minute).await;
        assert_eq!(started, [ms(0), ms(200), ms(600)]);
        assert_eq!(
            outcome.unwrap_err().to_string(),
            "connection refused (gRPC Unavailable) (tried 3 times)"
        );
        let (started, _) = tries(|| Some(tonic::Status::unknown("transport error")), minute).await;
        assert_eq!(started.len(), 3, "a broken connection is tried again");
        let (started, outcome) = tries(refused, ms(300)).await;
        assert_eq!(started, [ms(0), ms(200)], "no try starts after the bound");
        assert!(
            matches!(outcome, Err(super::Failed::Lost { tries: 2, .. })),
            "{outcome:?}"
        );
        let (_, outcome) = tries(refused, Duration::ZERO).await;
        assert_eq!(
            outcome.unwrap_err().to_string(),
            "connection refused (gRPC Unavailable) (tried once)"
        );
        for status in [
            tonic::Status::permission_denied("wrong secret"),
            tonic::Status::unimplemented("no such call"),
            tonic::Status::deadline_exceeded("too slow"),
        ] {
            let code = status.code();
            let (started, outcome) = tries(|| Some(status.clone()), minute).await;
            assert_eq!(started, [ms(0)], "{code:?}");
            assert!(matches!(outcome, Err(super::Failed::Refused(_))), "{outcome:?}");
        }
        let (started, outcome) = tries(|| None, minute).await;
        assert_eq!(started, [ms(0)], "a try that timed out is not repeated");
        assert!(matches!(outcome, Err(super::Failed::TimedOut)), "{outcome:?}");
    }

    /// A release whose first try finds nothing listening at the source's address (a real
    /// connection refused, as tonic reports it) gets through on the next try once the source
    /// listens.
    #[test]
    fn a_call_that_could_not_connect_is_tried_again() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let source = Arc::new(LyingSource::default());
        let calls = AtomicUsize::new(0);
        let outcome = runtime.block_on(async {
            // Bound and not listening: connections are refused, and the port stays this
            // test's until the source listens on it, at the second try.
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = socket.local_addr().unwrap();
            let socket = std::sync::Mutex::new(Some(socket));
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_lazy();
            super::best_effort(tokio::time::Instant::now() + Duration::from_secs(60), || {
                if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                    let socket = socket.lock().unwrap().take().expect("listens once");
                    let listener = socket.listen(64).unwrap();
                    tokio::spawn(
                        tonic::transport::Server::builder()
                            .add_service(proto::peer_server::PeerServer::new(Arc::clone(&source)))
                            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
                    );
                }
                let mut client = proto::peer_client::PeerClient::new(channel.clone());
                async move {
                    client
                        .release(proto::ReleaseRequest {
                            grant_id: vec![7; 16],
                        })
                        .await
                }
            })
            .await
        });
        assert!(outcome.is_ok(), "{outcome:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(source.released.load(Ordering::SeqCst), 1);
    }

    /// A status that a broken connection became names what broke, once.
    #[test]
    fn a_failed_call_says_why() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Transport(#[source] std::io::Error);
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer");
        let status = tonic::Status::from_error(Box::new(Transport(reset)));
        assert_eq!(
            status_text(&status),
            "transport error (gRPC Unknown): connection reset by peer"
        );
        let status = tonic::Status::unavailable("no route");
        assert_eq!(status_text(&status), "no route (gRPC Unavailable)");
    }

    /// A pull ends three quarters into its grant's life at the latest, or at its own deadline
    /// if sooner; a grant of unknown life leaves the deadline alone.
    #[test]
    fn a_pull_ends_within_its_grant() {
        let asked = Instant::now();
        let far = asked + Duration::from_secs(600);
        assert_eq!(
            within_grant(asked, 30_000, far),
            asked + Duration::from_millis(22_500)
        );
        let near = asked + Duration::from_secs(5);
        assert_eq!(within_grant(asked, 30_000, near), near);
        assert_eq!(within_grant(asked, 0, far), far);
        assert_eq!(
            within_grant(asked, u32::MAX, far),
            far.min(asked + Duration::from_millis(u64::from(u32::MAX)) * 3 / 4)
        );
    }
}

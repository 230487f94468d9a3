//! The source side of the control channel: grants and releases for other agents.

use std::sync::Arc;

use kvstore::transport::{Grants, HoldEnd, HoldTicket, Secret, Transport, TransportKind, grants::GrantError};
use kvstore::{BlockHash, BlockKey, Namespace};
use tonic::{Request, Response, Status};

use super::proto::{self, peer_server::Peer};
use crate::metrics::Metrics;

/// Metadata key of the control channel's token.
pub(crate) const TOKEN_HEADER: &str = "x-kvtier-peer-token";

/// The `Peer` gRPC service.
#[derive(Debug)]
pub(crate) struct PeerService {
    pub(crate) grants: Arc<Grants>,
    pub(crate) transports: Vec<Arc<dyn Transport>>,
    pub(crate) secret: Option<Secret>,
    pub(crate) metrics: Arc<Metrics>,
}

impl PeerService {
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(secret) = &self.secret else {
            return Ok(());
        };
        let token = req
            .metadata()
            .get(TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        secret.verify_token(token).map_err(|e| {
            tracing::warn!(peer = ?req.remote_addr(), error = %e, "refused a peer control call");
            Status::unauthenticated(e.to_string())
        })
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn grant(
        &self,
        req: Request<proto::GrantRequest>,
    ) -> Result<Response<proto::GrantResponse>, Status> {
        self.authorize(&req)?;
        let seen_as = req.local_addr().map(|a| a.ip());
        let msg = req.into_inner();
        let ns = namespace(&msg.namespace)?;
        let keys = msg
            .hashes
            .iter()
            .map(|h| BlockHash::new(h).map(|h| BlockKey::new(ns, h)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let transport = msg
            .transports
            .iter()
            .filter_map(|t| TransportKind::from_name(t))
            .find_map(|k| self.transports.iter().find(|t| t.kind() == k))
            .ok_or_else(|| {
                let ours: Vec<&str> = self.transports.iter().map(|t| t.kind().name()).collect();
                Status::failed_precondition(format!(
                    "no common transport: asked {:?}, this agent offers {ours:?}",
                    msg.transports
                ))
            })?;
        let grants = Arc::clone(&self.grants);
        let ends = match (msg.reuse, HoldTicket::new(msg.hold_ticket)) {
            (true, _) => HoldEnd::Nothing,
            (false, Some(ticket)) => HoldEnd::Ticket(ticket),
            (false, None) => HoldEnd::OneWaitPerBlock,
        };
        // Pinning may promote blocks from disk: blocking I/O, off the async workers.
        let grant = tokio::task::spawn_blocking(move || grants.grant_for(&keys, ends))
            .await
            .map_err(|e| Status::internal(format!("grant task failed: {e}")))?
            .map_err(|e| match e {
                GrantError::TooManyKeys { .. } => Status::invalid_argument(e.to_string()),
                GrantError::TooManyGrants { .. } => Status::resource_exhausted(e.to_string()),
            })?;
        let bytes: u64 = grant.blocks.iter().map(|b| b.len).sum();
        self.metrics.peer_grant(grant.blocks.len() as u64, bytes);
        Ok(Response::new(proto::GrantResponse {
            grant_id: if grant.blocks.is_empty() {
                Vec::new()
            } else {
                grant.id.0.to_vec()
            },
            transport: transport.kind().name().into(),
            endpoint: transport.endpoint(seen_as),
            blocks: grant
                .blocks
                .iter()
                .map(|b| proto::GrantedBlock {
                    offset: b.offset,
                    len: b.len,
                    checksum: b.checksum,
                })
                .collect(),
            ttl_ms: u32::try_from(grant.ttl.as_millis()).unwrap_or(u32::MAX),
        }))
    }

    async fn release(
        &self,
        req: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::ReleaseResponse>, Status> {
        self.authorize(&req)?;
        let id = kvstore::transport::GrantId::from_slice(&req.get_ref().grant_id)
            .ok_or_else(|| Status::invalid_argument("grant_id must be 16 bytes"))?;
        let grants = Arc::clone(&self.grants);
        // Unpinning takes the host tier's lock, briefly; still not a thing to do on a worker
        // that other streams wait for.
        let released = tokio::task::spawn_blocking(move || grants.release(&id))
            .await
            .map_err(|e| Status::internal(format!("release task failed: {e}")))?;
        Ok(Response::new(proto::ReleaseResponse { released }))
    }

    async fn end_hold(
        &self,
        req: Request<proto::EndHoldRequest>,
    ) -> Result<Response<proto::EndHoldResponse>, Status> {
        self.authorize(&req)?;
        let msg = req.into_inner();
        let ns = namespace(&msg.namespace)?;
        let ticket =
            HoldTicket::new(msg.ticket).ok_or_else(|| Status::invalid_argument("ticket 0 names no hold"))?;
        let grants = Arc::clone(&self.grants);
        // Unpinning takes the tiers' locks, as a release does.
        let ended = tokio::task::spawn_blocking(move || {
            if msg.whole_hand_off {
                grants.end_hand_off(ticket)
            } else {
                grants.unhold(ns, ticket)
            }
        })
        .await
        .map_err(|e| Status::internal(format!("end-hold task failed: {e}")))?;
        Ok(Response::new(proto::EndHoldResponse {
            ended: u32::try_from(ended).unwrap_or(u32::MAX),
        }))
    }
}

fn namespace(bytes: &[u8]) -> Result<Namespace, Status> {
    let ns: [u8; 16] = bytes
        .try_into()
        .map_err(|_| Status::invalid_argument("namespace must be 16 bytes"))?;
    Ok(Namespace::from_bytes(ns))
}

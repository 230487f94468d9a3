//! The gRPC service `kvtier.index.v1.Index`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use kvstore::index::{Event, Medium};
use kvstore::vllm::{BlockHasher, RequestExtras, event_hash};
use tonic::{Request, Response, Status, Streaming};

use super::State;
use super::metrics::{EventLabel, PodLabel, SourceLabel};
use super::proto::{self, index_server::Index as IndexRpc};

/// The service over the shared state.
#[derive(Debug, Clone)]
pub(crate) struct IndexService {
    state: Arc<State>,
}

impl IndexService {
    pub(crate) fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

pub(crate) fn medium_of(m: i32) -> Result<Medium, Status> {
    match proto::Medium::try_from(m) {
        Ok(proto::Medium::Device) => Ok(Medium::Device),
        Ok(proto::Medium::Host) => Ok(Medium::Host),
        Ok(proto::Medium::Disk) => Ok(Medium::Disk),
        Ok(proto::Medium::Object) => Ok(Medium::Object),
        _ => Err(Status::invalid_argument(format!(
            "medium {m} is not one of DEVICE, HOST, DISK, OBJECT"
        ))),
    }
}

fn medium_to_proto(m: Medium) -> i32 {
    (match m {
        Medium::Device => proto::Medium::Device,
        Medium::Host => proto::Medium::Host,
        Medium::Disk => proto::Medium::Disk,
        Medium::Object => proto::Medium::Object,
    }) as i32
}

impl IndexService {
    /// The prompt's blocks in the 64-bit event form.
    fn prompt_hashes(&self, req: &proto::ScoreRequest) -> Result<Vec<u64>, Status> {
        match &req.prompt {
            Some(proto::score_request::Prompt::Hashes(h)) => Ok(h.hashes.clone()),
            Some(proto::score_request::Prompt::Tokens(t)) => {
                let defaults = &self.state.cfg.hash;
                let hc = req.hash.clone().unwrap_or_default();
                let block_size = if hc.block_size == 0 {
                    defaults.block_size
                } else {
                    hc.block_size
                };
                let algo = if hc.algo.is_empty() {
                    defaults.algo.as_str()
                } else {
                    hc.algo.as_str()
                };
                let seed = hc.seed.as_deref().or(defaults.seed.as_deref());
                let hasher = BlockHasher::new(
                    algo.parse()
                        .map_err(|e| Status::invalid_argument(format!("hash.algo: {e}")))?,
                    block_size as usize,
                    seed,
                )
                .map_err(|e| Status::invalid_argument(format!("hash: {e}")))?;
                let extras = RequestExtras {
                    lora: (!hc.lora_name.is_empty()).then(|| (hc.lora_name.clone(), hc.lora_path.clone())),
                    cache_salt: (!hc.cache_salt.is_empty()).then(|| hc.cache_salt.clone()),
                    ..RequestExtras::default()
                };
                Ok(hasher
                    .block_hashes(&t.ids, &extras)
                    .iter()
                    .map(|h| event_hash(h.as_bytes()))
                    .collect())
            }
            None => Err(Status::invalid_argument("a prompt: tokens or hashes")),
        }
    }
}

#[tonic::async_trait]
impl IndexRpc for IndexService {
    async fn score(
        &self,
        request: Request<proto::ScoreRequest>,
    ) -> Result<Response<proto::ScoreResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        if req.model.is_empty() {
            return Err(Status::invalid_argument("model is required"));
        }
        let hashes = self.prompt_hashes(&req)?;
        let scope = State::scope(&req.model);
        let named = self.state.candidates(&req.model, &req.pods);
        let candidates: Vec<_> = named.iter().map(|(_, c)| c.clone()).collect();
        let scores = self.state.backend.score(scope, &hashes, &candidates).await?;
        let mut out: Vec<proto::PodScore> = named
            .iter()
            .zip(&scores)
            .map(|((name, _), s)| proto::PodScore {
                pod: name.clone(),
                blocks: s.blocks as u32,
                weighted: s.weighted,
            })
            .collect();
        // Stable: equal scores keep the order of the request's pods (a router lists them by
        // its own preference, e.g. load), or of their names.
        out.sort_by(|a, b| b.weighted.total_cmp(&a.weighted).then(b.blocks.cmp(&a.blocks)));
        let m = &self.state.metrics;
        m.prompt_blocks.inc_by(hashes.len() as u64);
        {
            // Per-pod series only for configured pods: callers may send any names.
            let pods = self.state.pods.read();
            for s in out.iter().filter(|s| pods.contains_key(&s.pod)) {
                m.demand
                    .get_or_create(&PodLabel { pod: s.pod.clone() })
                    .inc_by(u64::from(s.blocks));
            }
            if let Some(best) = out.first().filter(|s| pods.contains_key(&s.pod)) {
                if best.blocks > 0 || req.speculate {
                    m.best
                        .get_or_create(&PodLabel {
                            pod: best.pod.clone(),
                        })
                        .inc();
                }
            }
        }
        if let Some(best) = out.first().filter(|s| s.blocks > 0 || req.speculate) {
            // Only for configured pods: callers may send any names.
            if req.speculate && self.state.pods.read().contains_key(&best.pod) {
                if let Err(e) = self.state.backend.speculate(&best.pod, scope, &hashes).await {
                    // The scores stand; the next requests just do not see this one coming.
                    tracing::warn!("speculation not recorded: {e}");
                }
            }
        }
        m.score_duration.observe(started.elapsed().as_secs_f64());
        Ok(Response::new(proto::ScoreResponse {
            scores: out,
            prompt_blocks: hashes.len() as u32,
        }))
    }

    async fn lookup(
        &self,
        request: Request<proto::LookupRequest>,
    ) -> Result<Response<proto::LookupResponse>, Status> {
        let req = request.into_inner();
        let hashes = req.hashes.map(|h| h.hashes).unwrap_or_default();
        let backend = &self.state.backend;
        let found = backend.lookup(State::scope(&req.model), &hashes).await?;
        let mut sources: Vec<String> = found.iter().flatten().map(|(s, _)| s.clone()).collect();
        sources.sort_unstable();
        sources.dedup();
        let addresses: HashMap<String, String> = sources
            .iter()
            .cloned()
            .zip(backend.peer_addresses(&sources).await?)
            .filter_map(|(s, a)| Some((s, a?)))
            .collect();
        let blocks = hashes
            .iter()
            .zip(found)
            .map(|(&hash, holders)| proto::BlockHolders {
                hash,
                holders: holders
                    .into_iter()
                    .map(|(source, media)| proto::Holder {
                        peer_address: addresses.get(&source).cloned().unwrap_or_default(),
                        source,
                        media: media.into_iter().map(medium_to_proto).collect(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(proto::LookupResponse { blocks }))
    }

    async fn publish_events(
        &self,
        request: Request<Streaming<proto::EventBatch>>,
    ) -> Result<Response<proto::PublishAck>, Status> {
        let mut stream = request.into_inner();
        // (source, epoch) -> next sequence number expected on this stream.
        let mut expected: HashMap<String, (u64, u64)> = HashMap::new();
        // source -> the peer address recorded for it from this stream.
        let mut announced: HashMap<String, String> = HashMap::new();
        let mut batches = 0u64;
        let backend = &self.state.backend;
        let resync_epoch = self.state.resync_epoch.load(Ordering::SeqCst);
        while let Some(batch) = stream.message().await? {
            if batch.source.is_empty() || (batch.model.is_empty() && !batch.events.is_empty()) {
                return Err(Status::invalid_argument(
                    "a batch needs a source, and a model when it carries events",
                ));
            }
            if self.state.resync_epoch.load(Ordering::SeqCst) != resync_epoch {
                return Err(Status::failed_precondition(
                    "the index lost its entries (its backend restarted empty): reconnect and resync",
                ));
            }
            match expected.get(&batch.source) {
                _ if batch.resync => {
                    backend.clear(&batch.source).await?;
                }
                Some(&(epoch, seq)) if epoch == batch.epoch && seq == batch.seq => {}
                other => {
                    // A gap, a new epoch without a resync, or a first batch that is not one: the
                    // index cannot know what the source holds. Forget it and ask for a resync.
                    self.state
                        .metrics
                        .gaps
                        .get_or_create(&SourceLabel {
                            source: batch.source.clone(),
                        })
                        .inc();
                    backend.clear(&batch.source).await?;
                    return Err(Status::failed_precondition(format!(
                        "{}: expected {} but got epoch {} seq {} without resync: reconnect and resync",
                        batch.source,
                        other.map_or_else(|| "a resync".to_owned(), |(e, s)| format!("epoch {e} seq {s}")),
                        batch.epoch,
                        batch.seq
                    )));
                }
            }
            let Some(next) = batch.seq.checked_add(1) else {
                return Err(Status::invalid_argument("seq overflows: start a new epoch"));
            };
            let scope = State::scope(&batch.model);
            let mut events = Vec::with_capacity(batch.events.len());
            let mut kinds = Vec::with_capacity(batch.events.len());
            for e in batch.events {
                let (event, kind) = match e.kind {
                    Some(proto::event::Kind::Stored(s)) => (
                        Event::Stored {
                            scope,
                            hashes: s.hashes,
                            medium: medium_of(s.medium)?,
                        },
                        "stored",
                    ),
                    Some(proto::event::Kind::Removed(r)) => (
                        Event::Removed {
                            scope,
                            hashes: r.hashes,
                            medium: medium_of(r.medium)?,
                        },
                        "removed",
                    ),
                    Some(proto::event::Kind::Cleared(_)) => (Event::Cleared, "cleared"),
                    None => continue,
                };
                events.push(event);
                kinds.push(kind);
            }
            // An empty batch is a heartbeat: the source is alive. A batch the backend could not
            // take leaves the source's entries unknown: the publisher must resync.
            if let Err(e) = backend.apply(&batch.source, &events).await {
                // Best effort: the backend is failing, and a resync clears the source anyway.
                let _ = backend.clear(&batch.source).await;
                return Err(e.into());
            }
            // A node agent's peer address, recorded when it first comes or changes on this stream.
            if !batch.peer_address.is_empty() && announced.get(&batch.source) != Some(&batch.peer_address) {
                backend
                    .set_peer_address(&batch.source, &batch.peer_address)
                    .await?;
                announced.insert(batch.source.clone(), batch.peer_address.clone());
            }
            expected.insert(batch.source.clone(), (batch.epoch, next));
            for kind in kinds {
                self.state
                    .metrics
                    .events
                    .get_or_create(&EventLabel {
                        source: batch.source.clone(),
                        kind,
                    })
                    .inc();
            }
            batches += 1;
        }
        Ok(Response::new(proto::PublishAck { batches }))
    }

    async fn stats(&self, _: Request<proto::StatsRequest>) -> Result<Response<proto::StatsResponse>, Status> {
        let stats = self.state.backend.stats().await?;
        Ok(Response::new(proto::StatsResponse {
            blocks: stats.blocks,
            sources: stats
                .sources
                .into_iter()
                .map(|(name, idle_seconds)| proto::SourceStats { name, idle_seconds })
                .collect(),
        }))
    }

    async fn clear_source(
        &self,
        request: Request<proto::ClearSourceRequest>,
    ) -> Result<Response<proto::ClearSourceResponse>, Status> {
        let name = request.into_inner().source;
        let known = self.state.backend.clear(&name).await?;
        if known {
            tracing::info!(source = %name, "source cleared on request");
        }
        Ok(Response::new(proto::ClearSourceResponse { known }))
    }
}

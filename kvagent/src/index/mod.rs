//! `kvagent index`: the cluster KV-cache index. It ingests vLLM engines' own KV events (ZMQ)
//! and node agents' tier events (gRPC `PublishEvents`), and answers routers' `Score` and
//! `Lookup` calls (gRPC, with health and reflection). See `docs/index.md`.

mod backend;
pub mod config;
mod grpc;
mod metrics;
mod vllm_events;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use backend::{Backend, Candidate, memory::MemoryBackend};
use kvstore::index::{IndexConfig as CoreConfig, TierWeights, scope_of};

pub use config::{BackendKind, IndexConfig, IndexFlags, PodConfig, RedisSection};
use metrics::IndexMetrics;

/// Generated gRPC types and services of `kvtier.index.v1`.
#[expect(missing_docs, clippy::allow_attributes, reason = "generated code")]
pub mod proto {
    tonic::include_proto!("kvtier.index.v1");

    /// The descriptor set, for gRPC reflection.
    pub const DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kvtier_index_descriptor");
}

/// An engine pod as the index knows it.
#[derive(Debug, Clone)]
pub(crate) struct Pod {
    pub(crate) model: String,
    pub(crate) node: Option<String>,
    /// Whether the index follows its publisher now (it is live while connected).
    pub(crate) connected: Arc<AtomicBool>,
}

/// Where the engine pods come from. The static list of the configuration is the one source
/// today; a Kubernetes watcher would implement the same.
pub(crate) trait PodDiscovery: Send + Sync {
    /// The pods known now.
    fn pods(&self) -> Vec<PodConfig>;
}

/// Pods listed in the configuration.
#[derive(Debug)]
struct StaticPods(Vec<PodConfig>);

impl PodDiscovery for StaticPods {
    fn pods(&self) -> Vec<PodConfig> {
        self.0.clone()
    }
}

/// What the services share.
pub(crate) struct State {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) pods: parking_lot::RwLock<HashMap<String, Pod>>,
    pub(crate) cfg: IndexConfig,
    pub(crate) metrics: IndexMetrics,
    /// Bumped when the backend lost its entries: every follower and publisher stream resyncs.
    pub(crate) resync_epoch: AtomicU64,
    /// The backend's block and source counts at the last housekeeping, for the gauges.
    pub(crate) last_blocks: AtomicU64,
    pub(crate) last_sources: AtomicU64,
    /// Whether the backend answered the last housekeeping (readiness).
    pub(crate) backend_up: AtomicBool,
    /// This replica, as it claims the pods it follows in a shared backend.
    pub(crate) replica: String,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("pods", &self.pods.read().len())
            .finish_non_exhaustive()
    }
}

/// The source name of the agent of `node`.
pub(crate) fn agent_source(node: &str) -> String {
    format!("agent/{node}")
}

impl State {
    pub(crate) fn new(
        cfg: IndexConfig,
    ) -> anyhow::Result<(Arc<Self>, prometheus_client::registry::Registry)> {
        let w = cfg.weights;
        let weights = TierWeights {
            device: w.device,
            host: w.host,
            disk: w.disk,
            object: w.object,
        };
        let speculative_ttl = Duration::from_millis(cfg.speculative_ttl_ms);
        let backend: Arc<dyn Backend> = match cfg.backend {
            BackendKind::Memory => Arc::new(MemoryBackend::new(CoreConfig {
                shards: cfg.shards,
                weights,
                speculative_ttl,
            })),
            #[cfg(feature = "redis")]
            BackendKind::Redis => Arc::new(backend::redis::RedisBackend::new(
                backend::redis::RedisSettings {
                    url: cfg.redis.url.clone(),
                    prefix: cfg.redis.prefix.clone(),
                    timeout: Duration::from_millis(cfg.redis.timeout_ms),
                    weights,
                    speculative_ttl,
                },
            )?),
            #[cfg(not(feature = "redis"))]
            BackendKind::Redis => {
                anyhow::bail!("`backend = \"redis\"`: this kvagent was built without the `redis` feature")
            }
        };
        let (metrics, mut registry) = IndexMetrics::new();
        let state = Arc::new(Self {
            backend,
            pods: parking_lot::RwLock::new(HashMap::new()),
            cfg,
            metrics,
            resync_epoch: AtomicU64::new(0),
            last_blocks: AtomicU64::new(0),
            last_sources: AtomicU64::new(0),
            backend_up: AtomicBool::new(true),
            replica: format!(
                "{}-{}-{:x}",
                crate::config::host_name().unwrap_or_default(),
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ),
        });
        metrics::register_gauges(&state, &mut registry);
        Ok((state, registry))
    }

    /// Registers a pod (idempotent).
    pub(crate) fn add_pod(&self, p: &PodConfig) -> Pod {
        let pod = Pod {
            model: p.model.clone(),
            node: p.node.clone(),
            connected: Arc::new(AtomicBool::new(false)),
        };
        self.pods.write().insert(p.name.clone(), pod.clone());
        pod
    }

    /// The candidates of a Score call: the named pods, or every pod of the model.
    pub(crate) fn candidates(&self, model: &str, names: &[String]) -> Vec<(String, Candidate)> {
        let pods = self.pods.read();
        // A name the index has never seen holds nothing (callers may send any names) and
        // scores 0; only configured pods have an agent.
        let candidate = |name: &str, pod: Option<&Pod>| Candidate {
            pod: name.to_owned(),
            agent: pod.and_then(|p| p.node.as_deref()).map(agent_source),
        };
        if names.is_empty() {
            let mut all: Vec<(String, Candidate)> = pods
                .iter()
                .filter(|(_, p)| p.model == model)
                .map(|(name, p)| (name.clone(), candidate(name, Some(p))))
                .collect();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            all
        } else {
            names
                .iter()
                .map(|n| (n.clone(), candidate(n, pods.get(n))))
                .collect()
        }
    }

    pub(crate) fn scope(model: &str) -> u64 {
        scope_of(model)
    }
}

/// Runs `kvagent index` until SIGTERM or SIGINT.
pub fn run(cfg: IndexConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("kvagent-index")
        .build()
        .context("starting the runtime")?;
    rt.block_on(serve(cfg))
}

async fn serve(cfg: IndexConfig) -> anyhow::Result<()> {
    let grpc_addr = cfg.grpc_addr;
    let http_addr = cfg.http_addr.clone();
    let discovery: Arc<dyn PodDiscovery> = Arc::new(StaticPods(cfg.pods.clone()));
    let (state, registry) = State::new(cfg)?;
    let ready = Arc::new(AtomicBool::new(false));

    for pod in discovery.pods() {
        let registered = state.add_pod(&pod);
        tokio::spawn(vllm_events::follow(
            Arc::clone(&state),
            pod,
            Arc::clone(&registered.connected),
        ));
    }
    tokio::spawn(housekeeping(Arc::clone(&state)));
    tokio::spawn(watch_backend(Arc::clone(&state)));

    if !http_addr.is_empty() {
        let listener = tokio::net::TcpListener::bind(&http_addr)
            .await
            .with_context(|| format!("binding the HTTP address {http_addr}"))?;
        let flag = Arc::clone(&ready);
        let up = Arc::clone(&state);
        let readiness: crate::http::Readiness =
            Arc::new(move || flag.load(Ordering::SeqCst) && up.backend_up.load(Ordering::SeqCst));
        tokio::spawn(crate::http::serve(listener, registry, readiness));
    }

    let listener = tokio::net::TcpListener::bind(grpc_addr)
        .await
        .with_context(|| format!("binding the gRPC address {grpc_addr}"))?;
    // Tests and scripts read the bound address (the configured port may be 0) from this line.
    tracing::info!(grpc = %listener.local_addr()?, http = %http_addr, "index serving");
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<proto::index_server::IndexServer<grpc::IndexService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC reflection")?;
    ready.store(true, Ordering::SeqCst);
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(proto::index_server::IndexServer::new(grpc::IndexService::new(
            state,
        )))
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY a small answer waits for the client's delayed ACK: ~40 ms
            // per Score instead of tens of microseconds.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown_signal(),
        )
        .await
        .context("gRPC server")?;
    tracing::info!("index stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers; stop the index with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// Ages out silent publishers and returns the memory of entries that no longer count.
async fn housekeeping(state: Arc<State>) {
    let ttl = Duration::from_secs(state.cfg.source_ttl_s.max(1));
    let mut tick = tokio::time::interval(ttl / 4);
    loop {
        tick.tick().await;
        // An engine's events arrive only when its cache changes, so silence says nothing: a
        // pod is live while the index is connected to its publisher.
        let live: Vec<String> = state
            .pods
            .read()
            .iter()
            .filter(|(_, p)| p.connected.load(Ordering::SeqCst))
            .map(|(name, _)| name.clone())
            .collect();
        let pass = async {
            for name in &live {
                state.backend.keep_alive(name).await?;
            }
            for name in state.backend.age_out(ttl).await? {
                tracing::warn!(source = %name, "no events for {ttl:?}: its blocks no longer count");
            }
            let dropped = state.backend.sweep().await?;
            tracing::debug!(dropped, "index sweep");
            Ok::<_, backend::BackendError>(())
        };
        if let Err(e) = pass.await {
            tracing::warn!("housekeeping: {e}");
        }
    }
}

/// Checks the backend every second: readiness, the gauges, and whether it lost its entries
/// (a Redis restarted empty), in which case every source resyncs.
async fn watch_backend(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let check = async {
            if state.backend.lost_state().await? {
                // At once: a failure of the next call must not forget it.
                tracing::warn!(
                    backend = state.backend.name(),
                    "the index backend lost its entries (or restarted): every source resyncs"
                );
                state.resync_epoch.fetch_add(1, Ordering::SeqCst);
            }
            state.backend.stats().await
        };
        match check.await {
            Ok(stats) => {
                if !state.backend_up.swap(true, Ordering::SeqCst) {
                    tracing::info!(backend = state.backend.name(), "the index backend answers again");
                }
                state.last_blocks.store(stats.blocks, Ordering::Relaxed);
                state
                    .last_sources
                    .store(stats.sources.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                if state.backend_up.swap(false, Ordering::SeqCst) {
                    tracing::warn!("{e}; not ready until it answers");
                }
            }
        }
    }
}

//! `kvagent index`: the cluster KV-cache index. It ingests vLLM engines' own KV events (ZMQ)
//! and node agents' tier events (gRPC `PublishEvents`), and answers routers' `Score` and
//! `Lookup` calls (gRPC, with health and reflection). See `docs/index.md`.

pub mod config;
mod grpc;
mod metrics;
mod vllm_events;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use kvstore::index::{Candidate, Index, IndexConfig as CoreConfig, SourceId, TierWeights, scope_of};

pub use config::{IndexConfig, IndexFlags, PodConfig};
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
    pub(crate) source: SourceId,
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
    pub(crate) index: Index,
    pub(crate) pods: parking_lot::RwLock<HashMap<String, Pod>>,
    pub(crate) cfg: IndexConfig,
    pub(crate) metrics: IndexMetrics,
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
    pub(crate) fn new(cfg: IndexConfig) -> (Arc<Self>, prometheus_client::registry::Registry) {
        let w = cfg.weights;
        let index = Index::new(CoreConfig {
            shards: cfg.shards,
            weights: TierWeights {
                device: w.device,
                host: w.host,
                disk: w.disk,
                object: w.object,
            },
            speculative_ttl: Duration::from_millis(cfg.speculative_ttl_ms),
        });
        let (metrics, mut registry) = IndexMetrics::new();
        let state = Arc::new(Self {
            index,
            pods: parking_lot::RwLock::new(HashMap::new()),
            cfg,
            metrics,
        });
        metrics::register_gauges(&state, &mut registry);
        (state, registry)
    }

    /// Registers a pod (idempotent).
    pub(crate) fn add_pod(&self, p: &PodConfig) -> Pod {
        let pod = Pod {
            source: self.index.sources().intern(&p.name),
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
        let sources = self.index.sources();
        // A name the index has never seen holds nothing: it is not registered (callers may send
        // any names), and scores 0.
        let candidate = |name: &str, pod: Option<&Pod>| Candidate {
            pod: pod.map_or_else(|| sources.get(name).unwrap_or(SourceId(u32::MAX)), |p| p.source),
            agent: pod
                .and_then(|p| p.node.as_deref())
                .and_then(|n| sources.get(&agent_source(n))),
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
    let (state, registry) = State::new(cfg);
    let ready = Arc::new(AtomicBool::new(false));

    for pod in discovery.pods() {
        let registered = state.add_pod(&pod);
        tokio::spawn(vllm_events::follow(
            Arc::clone(&state),
            pod,
            registered.source,
            Arc::clone(&registered.connected),
        ));
    }
    tokio::spawn(housekeeping(Arc::clone(&state)));

    if !http_addr.is_empty() {
        let listener = tokio::net::TcpListener::bind(&http_addr)
            .await
            .with_context(|| format!("binding the HTTP address {http_addr}"))?;
        let flag = Arc::clone(&ready);
        let readiness: crate::http::Readiness = Arc::new(move || flag.load(Ordering::SeqCst));
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
        for pod in state
            .pods
            .read()
            .values()
            .filter(|p| p.connected.load(Ordering::SeqCst))
        {
            state.index.sources().keep_alive(pod.source);
        }
        for name in state.index.age_out(ttl) {
            tracing::warn!(source = %name, "no events for {ttl:?}: its blocks no longer count");
        }
        let dropped = state.index.sweep();
        tracing::debug!(dropped, "index sweep");
    }
}

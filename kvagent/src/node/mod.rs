//! `kvagent node`: the per-node daemon. It owns the store (host arena, disk tier, object tier),
//! serves engines on the local socket, exports metrics and health over HTTP, and on SIGTERM or
//! SIGINT drains in-flight calls, persists the disk tier's metadata, uploads what the object
//! tier still holds in memory and exits 0.

mod peer;
mod publish;
mod server;
mod session;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kvstore::TieredStore;

use crate::config::NodeConfig;
use crate::metrics::Metrics;

/// Says which copy engines the node's engine processes can have (same drivers, same devices):
/// the agent itself copies no device memory, but this is where an operator looks first when an
/// engine on a GPU node reports that it recomputes.
fn report_copy_engines(metrics: &Metrics) {
    for (backend, found) in kvstore::device::probe() {
        let label = crate::metrics::BackendLabel {
            backend: backend.name(),
        };
        metrics
            .copy_engines
            .get_or_create(&label)
            .set(i64::from(found.is_ok()));
        match found {
            Ok(device) => tracing::info!(%backend, %device, "copy engine available"),
            Err(e) => tracing::info!(%backend, reason = %e, "copy engine unavailable"),
        }
    }
}

/// Runs the node agent until SIGTERM or SIGINT.
pub fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    // One worker thread of its own, so the HTTP endpoints keep answering (readiness 503,
    // metrics) while the main thread drains.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kvagent-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let mut signals = StopSignals::install(&runtime)?;
    let store = Arc::new(TieredStore::open(cfg.store_config()?).context("opening the store")?);
    let (metrics, mut registry) = Metrics::new(Arc::clone(&store));
    report_copy_engines(&metrics);
    let instance = instance_id();
    let peers = peer::Peers::start(&cfg, Arc::clone(&store), Arc::clone(&metrics))?;
    crate::metrics::register_peers(&mut registry, peers.transports(), Arc::clone(peers.grants()));
    let shared = server::Shared::new(
        Arc::clone(&store),
        metrics,
        instance,
        Duration::from_millis(u64::from(cfg.default_deadline_ms)),
        cfg.max_clients,
        Duration::from_micros(u64::from(cfg.poll_us)),
        Arc::clone(&peers),
        cfg.object.write_through_min_blocks,
        cfg.peer.checksum_on_commit && !cfg.peer.listen.is_empty(),
    )?;
    let listener = server::bind(&cfg.socket, cfg.socket_mode_bits()?, cfg.socket_gid)?;
    let socket_id = file_id(&cfg.socket);
    let http = if cfg.http_addr.is_empty() {
        None
    } else {
        let addr: std::net::SocketAddr = cfg.http_addr.parse().context("http_addr")?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(addr))
            .with_context(|| format!("binding the HTTP server to {addr}"))?;
        let local = listener.local_addr().context("HTTP address")?;
        Some((listener, local))
    };
    let publish = if cfg.publish.index.is_empty() {
        None
    } else {
        Some(publish::PublishSettings {
            index: cfg.publish.index_uri(),
            node: cfg.publish.node_name()?,
            interval: Duration::from_millis(u64::from(cfg.publish.interval_ms)),
            heartbeat: Duration::from_secs(u64::from(cfg.publish.heartbeat_s)),
            peer_address: peers.advertise().map(str::to_owned),
        })
    };
    let disk = store.disk().map(|d| d.engine_description());
    let object = store.object().map(|o| {
        let endpoint = if cfg.object.endpoint.is_empty() {
            "default endpoint"
        } else {
            cfg.object.endpoint.as_str()
        };
        format!("{} @ {endpoint}", o.url())
    });
    if let Some(o) = store.object() {
        // An unusable store is not fatal (the tier only loses its blocks), but say why now.
        match o.probe() {
            Ok(()) => {}
            Err((reason, error)) => tracing::warn!(
                store = o.url(),
                reason = reason.as_str(),
                %error,
                "object tier cannot reach its bucket; blocks will not be stored there until it can"
            ),
        }
    }
    tracing::info!(
        socket = %cfg.socket.display(),
        http = %http.as_ref().map(|(_, a)| a.to_string()).unwrap_or_else(|| "off".into()),
        arena_bytes = store.host().arena().len(),
        huge_pages = store.host().arena().huge_pages(),
        disk = %disk.as_deref().unwrap_or("off"),
        object = %object.as_deref().unwrap_or("off"),
        index = %publish.as_ref().map_or("off", |p| p.index.as_str()),
        startup_ms = started.elapsed().as_millis() as u64,
        "kvagent node ready"
    );
    let accept = {
        let shared = Arc::clone(&shared);
        let path = cfg.socket.clone();
        std::thread::Builder::new()
            .name("kvagent-accept".into())
            .spawn(move || server::accept_loop(listener, shared, path))
            .context("starting the accept thread")?
    };
    runtime.block_on(async {
        if let Some((listener, _)) = http {
            let draining = Arc::clone(&shared);
            let ready: crate::http::Readiness =
                Arc::new(move || !draining.draining.load(std::sync::atomic::Ordering::SeqCst));
            tokio::spawn(crate::http::serve(listener, registry, ready));
        }
        if let Some(p) = publish {
            tokio::spawn(publish::run(
                p,
                Arc::clone(&store),
                Arc::clone(&shared.models),
                instance,
            ));
        }
        signals.wait().await;
    });

    let drain_started = Instant::now();
    tracing::info!("shutting down: draining in-flight calls");
    shared.start_drain();
    let _ = accept.join();
    let timeout = Duration::from_millis(u64::from(cfg.shutdown_timeout_ms));
    if !shared.wait_drained(timeout) {
        tracing::warn!(
            ?timeout,
            "connections still open after the shutdown timeout; exiting anyway"
        );
    }
    // Only our own socket: a new agent may already have replaced it.
    if socket_id.is_some() && socket_id == file_id(&cfg.socket) {
        if let Err(e) = std::fs::remove_file(&cfg.socket) {
            tracing::debug!(error = %e, "removing the socket");
        }
    }
    if cfg.disk.persist_on_shutdown && store.disk().is_some() {
        let started = Instant::now();
        let blocks = store.persist_host();
        tracing::info!(
            blocks,
            ms = started.elapsed().as_millis() as u64,
            "host blocks written to disk"
        );
    }
    store.flush().context("persisting the disk tier's metadata")?;
    drop(runtime);
    tracing::info!(
        drain_ms = drain_started.elapsed().as_millis() as u64,
        "kvagent node stopped"
    );
    Ok(())
}

/// SIGTERM and SIGINT, caught from the moment they are installed (before the agent says it is
/// ready, so a stop request during start-up is not the default "terminate now").
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install(runtime: &tokio::runtime::Runtime) -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let _guard = runtime.enter();
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

/// Device and inode of a file, to recognise it later.
fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// A number that differs between agent starts, so clients notice a restart.
fn instance_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 40)
}

/// The `stats` verb's answer: per-tier counters and the agent's own state, as JSON.
fn stats_json(shared: &server::Shared) -> String {
    let s = shared.store.stats();
    let tier = |t: &kvstore::TierStats| {
        serde_json::json!({
            "hits": t.hits, "misses": t.misses, "stores": t.stores, "not_stored": t.not_stored,
            "evictions": t.evictions, "demotions": t.demotions, "promotions": t.promotions,
            "removals": t.removals, "checksum_failures": t.checksum_failures,
            "bytes_written": t.bytes_written, "bytes_read": t.bytes_read,
            "checksummed_bytes": t.checksummed_bytes,
            "blocks": t.blocks, "used_bytes": t.used_bytes, "capacity_bytes": t.capacity_bytes,
        })
    };
    let grants = shared.peers.grants();
    let expired = grants.expired();
    serde_json::json!({
        "instance": shared.instance,
        "clients": shared.metrics.clients.get(),
        "draining": shared.draining.load(Ordering::Relaxed),
        "announced_namespaces": shared.models.len(),
        "peer": {
            "address": shared.peers.advertise(),
            "grants_open": grants.open(),
            "held_blocks": grants.held().blocks,
            "grants_expired": expired.grants,
            "holds_expired": expired.holds,
        },
        "host": tier(&s.host),
        "disk": s.disk.as_ref().map(tier),
        "object": s.object.as_ref().map(tier),
        "object_detail": shared.store.object().map(|o| {
            let d = o.detail();
            let failures: serde_json::Map<String, serde_json::Value> = kvstore::object::Failure::ALL
                .iter()
                .map(|f| (f.as_str().to_owned(), d.failures_of(*f).into()))
                .collect();
            serde_json::json!({
                "url": o.url(), "segments_uploaded": d.segments_uploaded,
                "bytes_uploaded": d.bytes_uploaded, "pending_bytes": d.pending_bytes,
                "pending_blocks": d.pending_blocks, "remote_blocks": d.remote_blocks,
                "indexes_read": d.indexes_read, "degraded": d.degraded, "failures": failures,
            })
        }),
    })
    .to_string()
}

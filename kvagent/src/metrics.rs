//! Prometheus metrics of the node agent. Per-verb latency and connection counts are recorded as
//! calls happen; tier counters and occupancy are read from the store at scrape time (they live
//! in the store's own atomics, so there is nothing to keep in sync).

use std::sync::Arc;
use std::time::Duration;

use kvstore::transport::{Grants, Transport};
use kvstore::{TierStats, TieredStore};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label of per-verb metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabel {
    /// The verb (`lookup`, `reserve`, ...).
    pub verb: &'static str,
}

/// Label of failed calls.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// The verb, or `frame` when the frame itself was bad.
    pub verb: &'static str,
    /// Why it failed.
    pub reason: &'static str,
}

/// Label of peer transfer counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// `served` (granted to a peer) or `pulled` (from a peer).
    pub direction: &'static str,
    /// For pulls: `ok`, `checksum` (arrived corrupt, dropped) or `failed`; `ok` for grants.
    pub result: &'static str,
}

/// Label of copy-engine metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    /// `cpu`, `cuda` or `hip`.
    pub backend: &'static str,
}

/// Label of per-transport metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: &'static str,
}

/// Label of per-tier metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabel {
    tier: &'static str,
}

/// The agent's live metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Time to serve a call, by verb.
    pub latency: Family<VerbLabel, Histogram>,
    /// Blocks named in calls, by verb.
    pub blocks: Family<VerbLabel, Counter>,
    /// Calls answered with an error or connections closed for a bad frame.
    pub errors: Family<ErrorLabel, Counter>,
    /// Engine connections open now.
    pub clients: Gauge,
    /// Engine connections accepted since start.
    pub connections: Counter,
    /// Blocks moved between agents, by direction and result.
    pub peer_blocks: Family<PeerLabel, Counter>,
    /// Bytes moved between agents, by direction.
    pub peer_bytes: Family<PeerLabel, Counter>,
    /// Time a pull waited behind earlier pulls from the same source (`peer.pulls_per_source`).
    pub peer_pull_wait: Histogram,
    /// Pulls whose deadline passed while they waited for their turn.
    pub peer_pull_queue_timeouts: Counter,
    /// Blocks written through to the object tier at commit.
    pub write_through_blocks: Counter,
    /// Blocks not written through because the queue was full.
    pub write_through_dropped: Counter,
    /// Whether engines on this node can have each backend's copy engine (1) or not (0).
    pub copy_engines: Family<BackendLabel, Gauge>,
}

fn latency_histogram() -> Histogram {
    // 1 µs to ~1 s in factor-2 steps: local calls take microseconds, promotions milliseconds.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1e-6, 2.0, 21,
    ))
}

impl Metrics {
    /// Creates the metrics and a registry exporting them and the store's tier counters.
    pub fn new(store: Arc<TieredStore>) -> (Arc<Self>, Registry) {
        let m = Arc::new(Self {
            latency: Family::new_with_constructor(latency_histogram),
            blocks: Family::default(),
            errors: Family::default(),
            clients: Gauge::default(),
            connections: Counter::default(),
            peer_blocks: Family::default(),
            peer_bytes: Family::default(),
            peer_pull_queue_timeouts: Counter::default(),
            // 1 µs (a free turn) to ~34 s: a pull may wait up to its deadline.
            peer_pull_wait: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                1e-6, 2.0, 26,
            )),
            write_through_blocks: Counter::default(),
            write_through_dropped: Counter::default(),
            copy_engines: Family::default(),
        });
        let mut reg = Registry::with_prefix("kvtier");
        reg.register(
            "request_duration_seconds",
            "Time to serve a local call, by verb",
            m.latency.clone(),
        );
        reg.register(
            "request_blocks",
            "Blocks named in local calls, by verb",
            m.blocks.clone(),
        );
        reg.register(
            "request_errors",
            "Calls that failed and connections closed for bad frames",
            m.errors.clone(),
        );
        reg.register(
            "clients_connected",
            "Engine connections open now",
            m.clients.clone(),
        );
        reg.register(
            "connections",
            "Engine connections accepted",
            m.connections.clone(),
        );
        reg.register(
            "peer_blocks",
            "Blocks granted to other agents (served) and pulled from them, by result",
            m.peer_blocks.clone(),
        );
        reg.register(
            "peer_bytes",
            "Bytes granted to other agents (served) and pulled from them",
            m.peer_bytes.clone(),
        );
        reg.register(
            "peer_pull_queue_wait_seconds",
            "Time a pull from another agent waited behind earlier pulls from the same agent",
            m.peer_pull_wait.clone(),
        );
        reg.register(
            "peer_pull_queue_timeouts",
            "Pulls from another agent whose deadline passed while they waited behind earlier pulls from the same agent",
            m.peer_pull_queue_timeouts.clone(),
        );
        reg.register(
            "object_write_through_blocks",
            "Blocks written through to the object tier when committed",
            m.write_through_blocks.clone(),
        );
        reg.register(
            "object_write_through_dropped",
            "Blocks not written through because the write-through queue was full",
            m.write_through_dropped.clone(),
        );
        reg.register(
            "copy_engine_available",
            "Whether engines on this node get each backend's copy engine (its driver and a device are there)",
            m.copy_engines.clone(),
        );
        reg.register_collector(Box::new(TierCollector { store }));
        (m, reg)
    }

    /// Records a served call.
    pub fn observe(&self, verb: &'static str, blocks: usize, took: Duration) {
        let label = VerbLabel { verb };
        self.latency.get_or_create(&label).observe(took.as_secs_f64());
        self.blocks.get_or_create(&label).inc_by(blocks as u64);
    }

    /// Records blocks granted to a peer.
    pub fn peer_grant(&self, blocks: u64, bytes: u64) {
        let label = PeerLabel {
            direction: "served",
            result: "ok",
        };
        self.peer_blocks.get_or_create(&label).inc_by(blocks);
        self.peer_bytes.get_or_create(&label).inc_by(bytes);
    }

    /// Records the outcome of a pull: blocks stored, their bytes, blocks that arrived corrupt,
    /// and blocks the transport failed to bring.
    pub fn peer_pulled(&self, ok: u64, bytes: u64, corrupt: u64, failed: u64) {
        let label = |result| PeerLabel {
            direction: "pulled",
            result,
        };
        self.peer_blocks.get_or_create(&label("ok")).inc_by(ok);
        self.peer_blocks.get_or_create(&label("checksum")).inc_by(corrupt);
        self.peer_blocks.get_or_create(&label("failed")).inc_by(failed);
        self.peer_bytes.get_or_create(&label("ok")).inc_by(bytes);
    }

    /// Records how long a pull waited for its turn at its source (whether it got it or not).
    pub fn peer_pull_waited(&self, waited: Duration) {
        self.peer_pull_wait.observe(waited.as_secs_f64());
    }

    /// Records a pull whose deadline passed before its turn at its source came.
    pub fn peer_pull_queue_timeout(&self) {
        self.peer_pull_queue_timeouts.inc();
    }

    /// Records a failure.
    pub fn error(&self, verb: &'static str, reason: &'static str) {
        self.errors.get_or_create(&ErrorLabel { verb, reason }).inc();
    }
}

/// Exports the store's per-tier counters and occupancy at scrape time.
#[derive(Debug)]
struct TierCollector {
    store: Arc<TieredStore>,
}

/// Exports what the peer transports count themselves and the grant table's occupancy and
/// expiries, read at scrape time.
#[derive(Debug)]
struct PeerCollector {
    transports: Vec<Arc<dyn Transport>>,
    grants: Arc<Grants>,
}

/// Adds the peer transports' own counters and the grant table's gauges to `reg`.
pub fn register_peers(reg: &mut Registry, transports: Vec<Arc<dyn Transport>>, grants: Arc<Grants>) {
    reg.register_collector(Box::new(PeerCollector { transports, grants }));
}

impl Collector for PeerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        let open = encoder.encode_descriptor(
            "peer_grants_open",
            "Grants open now: blocks pinned for peers' pulls in progress",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        gauge(self.grants.open() as u64).encode(open)?;
        let held = self.grants.held();
        let blocks = encoder.encode_descriptor(
            "peer_held_blocks",
            "Blocks held for a peer's pull that has not begun (a decode engine's, of blocks this \
             node's engine prefilled)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        gauge(held.blocks as u64).encode(blocks)?;
        let mut bytes = encoder.encode_descriptor(
            "peer_held_bytes",
            "Bytes of the blocks held for peers' pulls, by the tier holding them",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (tier, v) in [("host", held.host_bytes), ("disk", held.disk_bytes)] {
            gauge(v).encode(bytes.encode_family(&TierLabel { tier })?)?;
        }
        let expired = self.grants.expired();
        let grants = encoder.encode_descriptor(
            "peer_grants_expired",
            "Grants that expired unreleased: their pullers died or gave up (or every try of \
             the release was lost)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        ConstCounter::new(expired.grants).encode(grants)?;
        let holds_expired = encoder.encode_descriptor(
            "peer_holds_expired",
            "Holds of blocks for a peer's pull that ran out (`peer.hold_s`) with their hand-off \
             still waiting, one per hand-off and block: its decode engine died, or the request \
             never reached one",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        ConstCounter::new(expired.holds).encode(holds_expired)?;
        if self.transports.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "peer_data_plane_replacements",
            "Times a peer transport found its data plane unable to receive (a UCX worker wedged by \
             a peer on this node that died in the middle of a shared-memory message) and replaced it",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for t in &self.transports {
            let label = TransportLabel {
                transport: t.kind().name(),
            };
            ConstCounter::new(t.replaced_data_planes()).encode(family.encode_family(&label)?)?;
        }
        Ok(())
    }
}

type Field = (&'static str, &'static str, fn(&TierStats) -> u64);

const COUNTERS: &[Field] = &[
    ("tier_hits", "Blocks found in the tier", |s| s.hits),
    (
        "tier_misses",
        "Blocks looked for and not found in the tier",
        |s| s.misses,
    ),
    ("tier_stores", "Blocks admitted into the tier", |s| s.stores),
    (
        "tier_not_stored",
        "Blocks the tier refused (full, too large, I/O error)",
        |s| s.not_stored,
    ),
    (
        "tier_evictions",
        "Blocks dropped from the tier to make room",
        |s| s.evictions,
    ),
    (
        "tier_demotions",
        "Evicted blocks written to the next tier down",
        |s| s.demotions,
    ),
    ("tier_promotions", "Blocks copied up into the tier", |s| {
        s.promotions
    }),
    ("tier_removals", "Blocks removed on request", |s| s.removals),
    (
        "tier_checksum_failures",
        "Reads whose checksum failed (served as misses)",
        |s| s.checksum_failures,
    ),
    ("tier_written_bytes", "Payload bytes written into the tier", |s| {
        s.bytes_written
    }),
    ("tier_read_bytes", "Payload bytes read from the tier", |s| {
        s.bytes_read
    }),
    (
        "tier_checksummed_bytes",
        "Payload bytes read only to checksum blocks for peers' grants (once per block at most)",
        |s| s.checksummed_bytes,
    ),
];

const GAUGES: &[Field] = &[
    ("tier_blocks", "Blocks held in the tier now", |s| s.blocks),
    ("tier_used_bytes", "Bytes of slots in use in the tier now", |s| {
        s.used_bytes
    }),
    ("tier_capacity_bytes", "Bytes the tier may use", |s| {
        s.capacity_bytes
    }),
];

impl Collector for TierCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.store.stats();
        let tiers: Vec<(&'static str, TierStats)> = std::iter::once(("host", stats.host))
            .chain(stats.disk.map(|d| ("disk", d)))
            .chain(stats.object.map(|o| ("object", o)))
            .collect();
        for (name, help, get) in COUNTERS {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (tier, s) in &tiers {
                let label = TierLabel { tier };
                ConstCounter::new(get(s)).encode(family.encode_family(&label)?)?;
            }
        }
        for (name, help, get) in GAUGES {
            let mut family =
                encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
            for (tier, s) in &tiers {
                let label = TierLabel { tier };
                let v = i64::try_from(get(s)).unwrap_or(i64::MAX);
                ConstGauge::new(v).encode(family.encode_family(&label)?)?;
            }
        }
        if let Some(object) = self.store.object() {
            encode_object(&mut encoder, &object.detail())?;
        }
        Ok(())
    }
}

/// Label of object-tier failures.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The object tier's own metrics (beyond the common tier counters).
fn encode_object(
    encoder: &mut DescriptorEncoder,
    d: &kvstore::object::ObjectStats,
) -> Result<(), std::fmt::Error> {
    use prometheus_client::metrics::MetricType;
    let mut family = encoder.encode_descriptor(
        "object_failures",
        "Failed object-store requests, by reason (each a miss or a block not stored)",
        None,
        MetricType::Counter,
    )?;
    for f in kvstore::object::Failure::ALL {
        let label = ReasonLabel { reason: f.as_str() };
        ConstCounter::new(d.failures_of(f)).encode(family.encode_family(&label)?)?;
    }
    let counters = [
        (
            "object_segments_uploaded",
            "Segment objects uploaded with their index",
            d.segments_uploaded,
        ),
        (
            "object_uploaded_bytes",
            "Bytes of segment objects uploaded",
            d.bytes_uploaded,
        ),
        (
            "object_indexes_read",
            "Index objects of other agents read",
            d.indexes_read,
        ),
    ];
    for (name, help, v) in counters {
        ConstCounter::new(v).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
    }
    let gauges = [
        (
            "object_pending_bytes",
            "Bytes waiting in memory for upload",
            d.pending_bytes,
        ),
        (
            "object_pending_blocks",
            "Blocks waiting in memory for upload",
            d.pending_blocks,
        ),
        (
            "object_remote_blocks",
            "Blocks known from other agents' uploads",
            d.remote_blocks,
        ),
        (
            "object_degraded",
            "1 while the tier pauses after repeated outages",
            u64::from(d.degraded),
        ),
    ];
    for (name, help, v) in gauges {
        let v = i64::try_from(v).unwrap_or(i64::MAX);
        ConstGauge::new(v).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
    }
    Ok(())
}

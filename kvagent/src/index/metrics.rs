//! Prometheus metrics of `kvagent index`, including per-pod signals a traffic-aware autoscaler
//! can use: the prefix demand that would hit each pod, how often it was the best pod, and how far
//! behind its events are.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::State;

/// Label of per-source metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SourceLabel {
    pub(crate) source: String,
}

/// Label of per-pod metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PodLabel {
    pub(crate) pod: String,
}

/// Label of event counts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EventLabel {
    pub(crate) source: String,
    pub(crate) kind: &'static str,
}

/// The index's live metrics.
#[derive(Debug)]
pub(crate) struct IndexMetrics {
    pub(crate) events: Family<EventLabel, Counter>,
    pub(crate) gaps: Family<SourceLabel, Counter>,
    pub(crate) bad_batches: Family<SourceLabel, Counter>,
    pub(crate) lag: Family<SourceLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub(crate) score_duration: Histogram,
    pub(crate) demand: Family<PodLabel, Counter>,
    pub(crate) best: Family<PodLabel, Counter>,
    pub(crate) prompt_blocks: Counter,
}

impl IndexMetrics {
    pub(crate) fn new() -> (Self, Registry) {
        let m = Self {
            events: Family::default(),
            gaps: Family::default(),
            bad_batches: Family::default(),
            lag: Family::default(),
            score_duration: Histogram::new(exponential_buckets(1e-6, 2.0, 22)),
            demand: Family::default(),
            best: Family::default(),
            prompt_blocks: Counter::default(),
        };
        let mut reg = Registry::with_prefix("kvtier_index");
        reg.register(
            "events",
            "Block events applied, by source and kind",
            m.events.clone(),
        );
        reg.register(
            "event_gaps",
            "Sequence gaps in a source's events (repaired by replay or by a resync)",
            m.gaps.clone(),
        );
        reg.register(
            "bad_batches",
            "Event batches that could not be decoded",
            m.bad_batches.clone(),
        );
        reg.register(
            "event_lag_seconds",
            "Age of a source's last event batch when it was applied",
            m.lag.clone(),
        );
        reg.register(
            "score_duration_seconds",
            "Time to score a prompt",
            m.score_duration.clone(),
        );
        reg.register(
            "prefix_demand_blocks",
            "Blocks of scored prompts each pod could reuse: the demand that would hit it",
            m.demand.clone(),
        );
        reg.register(
            "best_pod",
            "Score calls in which the pod ranked first",
            m.best.clone(),
        );
        reg.register(
            "scored_prompt_blocks",
            "Full blocks of the prompts scored",
            m.prompt_blocks.clone(),
        );
        (m, reg)
    }
}

/// Registers the gauges read from the index at scrape time.
pub(crate) fn register_gauges(state: &Arc<State>, reg: &mut Registry) {
    // The registry is owned by the HTTP server, the state by everyone: a weak reference keeps
    // the registry from holding the state alive.
    reg.register_collector(Box::new(IndexCollector(Arc::downgrade(state))));
}

/// Blocks and sources, as the backend reported them at its last check (every second).
#[derive(Debug)]
struct IndexCollector(Weak<State>);

impl Collector for IndexCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(state) = self.0.upgrade() else {
            return Ok(());
        };
        let blocks = i64::try_from(state.last_blocks.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        ConstGauge::new(blocks).encode(encoder.encode_descriptor(
            "blocks",
            "Blocks in the index",
            None,
            MetricType::Gauge,
        )?)?;
        let sources = i64::try_from(state.last_sources.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        ConstGauge::new(sources).encode(encoder.encode_descriptor(
            "sources",
            "Sources (engine pods, node agents) known to the index",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

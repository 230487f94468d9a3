//! Reports the node's tiers to the cluster index (`kvagent node --index ADDR`).
//!
//! The index scores a pod by what its node's agent holds as well as by its own KV cache, so the
//! agent streams its host and disk tiers to the index's `PublishEvents` as the source
//! `agent/<node>`: the full state when a stream opens (`resync`), then what changed, and an
//! empty batch as a heartbeat when nothing did.
//!
//! Why a diff of snapshots and not a hook at every tier mutation: a block enters or leaves a
//! tier in many places (commit, eviction, demotion, promotion, removal, a checksum failure,
//! recovery at start), and one missed site would leave the index wrong until the next resync;
//! a snapshot is right by construction. It costs O(blocks), taken at most once per interval,
//! when the tiers' counters moved or a heartbeat is due. The copy of a tier's keys holds that
//! tier's lock (a few nanoseconds per block: milliseconds for a million blocks), during which
//! engines' calls to the tier wait; the comparison runs after, on a blocking thread.
//!
//! Blocks are reported under the model their namespace was announced with (the `announce`
//! verb; the vLLM connector sends vLLM's served model name), in the 64-bit form of vLLM's KV
//! events. Blocks of namespaces nobody has announced since the agent started are not reported.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use kvstore::vllm::event_hash;
use kvstore::{BlockKey, Namespace, TierStats, TieredStore};
use parking_lot::RwLock;
use tokio::sync::mpsc;

use crate::index::proto::{self, index_client::IndexClient};

/// The models engines announced for their namespaces.
#[derive(Debug, Default)]
pub(crate) struct Models {
    by_ns: RwLock<HashMap<Namespace, Arc<str>>>,
    /// Bumped by every change, so the publisher notices one without comparing tables.
    version: AtomicU64,
}

impl Models {
    /// Most namespaces the table holds: each client may announce several (one per LoRA
    /// adapter and tenant), but not an unbounded number.
    pub(crate) const MAX: usize = 4096;

    /// Records that `ns`'s blocks belong to `model`; `false` if the table is full.
    pub(crate) fn announce(&self, ns: Namespace, model: &str) -> bool {
        if self.by_ns.read().get(&ns).is_some_and(|m| **m == *model) {
            return true;
        }
        let mut map = self.by_ns.write();
        if !map.contains_key(&ns) && map.len() >= Self::MAX {
            return false;
        }
        map.insert(ns, Arc::from(model));
        self.version.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// Namespaces announced.
    /// The model announced for `ns`.
    pub(crate) fn model_of(&self, ns: &Namespace) -> Option<Arc<str>> {
        self.by_ns.read().get(ns).cloned()
    }

    pub(crate) fn len(&self) -> usize {
        self.by_ns.read().len()
    }

    fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    fn snapshot(&self) -> HashMap<Namespace, Arc<str>> {
        self.by_ns.read().clone()
    }
}

/// Settings of the publisher.
#[derive(Debug, Clone)]
pub(crate) struct PublishSettings {
    /// The index's gRPC address, as a URI.
    pub(crate) index: String,
    /// This node's name: the source is `agent/<node>`, and the index's pods name their node.
    pub(crate) node: String,
    /// How often the tiers are compared with what was reported.
    pub(crate) interval: Duration,
    /// The longest silence before an empty batch tells the index the agent is alive.
    pub(crate) heartbeat: Duration,
    /// Where this agent serves its blocks to other agents (told to the index), if it does.
    pub(crate) peer_address: Option<String>,
}

const HOST: u8 = 1;
const DISK: u8 = 2;

/// Blocks per `Stored`/`Removed` event, and events per batch: well under gRPC's 4 MiB message.
const HASHES_PER_EVENT: usize = 8192;
const EVENTS_PER_BATCH: usize = 16;

/// What the index was told (or is about to be): per (model, 64-bit hash), the tiers holding the
/// block, as `HOST | DISK` bits. Equal hashes of several namespaces of one model (tensor-parallel
/// ranks, say) are one entry.
#[derive(Debug, Default, Clone, PartialEq)]
struct Reported(HashMap<(Arc<str>, u64), u8>);

impl Reported {
    fn add(&mut self, models: &HashMap<Namespace, Arc<str>>, keys: Vec<BlockKey>, tier: u8) {
        for k in keys {
            if let Some(model) = models.get(&k.namespace) {
                *self
                    .0
                    .entry((Arc::clone(model), event_hash(k.hash.as_bytes())))
                    .or_default() |= tier;
            }
        }
    }

    /// The tiers of `store` now, for the announced namespaces.
    fn of(store: &TieredStore, models: &HashMap<Namespace, Arc<str>>) -> Self {
        let mut out = Self::default();
        out.add(models, store.host().keys(), HOST);
        if let Some(disk) = store.disk() {
            out.add(models, disk.keys(), DISK);
        }
        out
    }
}

/// One event to send: blocks of `model` that entered (`stored`) or left a tier.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Change {
    model: Arc<str>,
    stored: bool,
    tier: u8,
    hashes: Vec<u64>,
}

/// What turns `old` into `new`, grouped by model, direction and tier (hashes sorted, groups in
/// a fixed order).
fn diff(old: &Reported, new: &Reported) -> Vec<Change> {
    let mut groups: HashMap<(Arc<str>, bool, u8), Vec<u64>> = HashMap::new();
    let mut push = |model: &Arc<str>, hash: u64, stored: bool, bits: u8| {
        for tier in [HOST, DISK].into_iter().filter(|t| bits & t != 0) {
            groups
                .entry((Arc::clone(model), stored, tier))
                .or_default()
                .push(hash);
        }
    };
    for ((model, hash), &bits) in &new.0 {
        let before = old.0.get(&(Arc::clone(model), *hash)).copied().unwrap_or(0);
        push(model, *hash, true, bits & !before);
    }
    for ((model, hash), &bits) in &old.0 {
        let after = new.0.get(&(Arc::clone(model), *hash)).copied().unwrap_or(0);
        push(model, *hash, false, bits & !after);
    }
    let mut out: Vec<Change> = groups
        .into_iter()
        .map(|((model, stored, tier), mut hashes)| {
            hashes.sort_unstable();
            Change {
                model,
                stored,
                tier,
                hashes,
            }
        })
        .collect();
    // Removals first: a batch never briefly claims a block in two places it is not.
    out.sort_by(|a, b| (&a.model, a.stored, a.tier).cmp(&(&b.model, b.stored, b.tier)));
    out
}

/// Numbers the batches of one stream.
#[derive(Debug)]
struct Stream<'a> {
    source: &'a str,
    epoch: u64,
    seq: u64,
    peer_address: &'a str,
}

impl Stream<'_> {
    fn batch(&mut self, model: &str, resync: bool, events: Vec<proto::Event>) -> proto::EventBatch {
        let seq = self.seq;
        self.seq += 1;
        proto::EventBatch {
            source: self.source.to_owned(),
            model: model.to_owned(),
            epoch: self.epoch,
            seq,
            resync,
            events,
            peer_address: self.peer_address.to_owned(),
        }
    }

    /// The batches carrying `changes`; the first one starts a resync if `resync` (an empty one
    /// when there is nothing to report).
    fn batches(&mut self, changes: Vec<Change>, resync: bool) -> Vec<proto::EventBatch> {
        let mut out = Vec::new();
        let mut pending: Option<(Arc<str>, Vec<proto::Event>)> = None;
        let mut resync_due = resync;
        for c in changes {
            let medium = if c.tier == HOST {
                proto::Medium::Host
            } else {
                proto::Medium::Disk
            } as i32;
            for chunk in c.hashes.chunks(HASHES_PER_EVENT) {
                let hashes = chunk.to_vec();
                let kind = if c.stored {
                    proto::event::Kind::Stored(proto::Stored { hashes, medium })
                } else {
                    proto::event::Kind::Removed(proto::Removed { hashes, medium })
                };
                let full = pending
                    .as_ref()
                    .is_some_and(|(m, ev)| *m != c.model || ev.len() >= EVENTS_PER_BATCH);
                if full && let Some((m, ev)) = pending.take() {
                    out.push(self.batch(&m, std::mem::take(&mut resync_due), ev));
                }
                pending
                    .get_or_insert_with(|| (Arc::clone(&c.model), Vec::new()))
                    .1
                    .push(proto::Event { kind: Some(kind) });
            }
        }
        if let Some((m, ev)) = pending {
            out.push(self.batch(&m, std::mem::take(&mut resync_due), ev));
        }
        if resync_due {
            out.push(self.batch("", true, Vec::new()));
        }
        out
    }
}

/// Moves whenever a block may have entered or left a tier, or a namespace was announced: the
/// tiers' monotonic counters and the announcement table's version.
fn change_mark(store: &TieredStore, models: &Models) -> [u64; 3] {
    let s = store.stats();
    let moves = |t: &TierStats| {
        t.stores + t.evictions + t.demotions + t.promotions + t.removals + t.checksum_failures
    };
    [moves(&s.host), s.disk.as_ref().map_or(0, moves), models.version()]
}

/// Streams the tiers to the index until the process ends, reconnecting (and resyncing) after
/// every failure with a capped backoff.
pub(crate) async fn run(cfg: PublishSettings, store: Arc<TieredStore>, models: Arc<Models>, epoch: u64) {
    let source = crate::index::agent_source(&cfg.node);
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        let Err(e) = stream(&cfg, &store, &models, &source, epoch).await;
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(500);
        }
        tracing::warn!(index = %cfg.index, source = %source, "reporting to the cluster index: {e:#}; retrying in {backoff:?}");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// One stream: connect, resync, then report changes until the stream fails.
async fn stream(
    cfg: &PublishSettings,
    store: &Arc<TieredStore>,
    models: &Arc<Models>,
    source: &str,
    epoch: u64,
) -> anyhow::Result<Infallible> {
    let channel = tonic::transport::Endpoint::from_shared(cfg.index.clone())
        .context("the index address")?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await
        .context("connecting")?;
    let (tx, rx) = mpsc::channel(8);
    let mut call = tokio::spawn(async move {
        IndexClient::new(channel)
            .publish_events(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let mut numbering = Stream {
        source,
        epoch,
        seq: 0,
        peer_address: cfg.peer_address.as_deref().unwrap_or(""),
    };
    let mut reported = Reported::default();
    let mut mark = None;
    let mut last_sent = Instant::now();
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ended = &mut call => {
                return Err(match ended {
                    Ok(Ok(ack)) => anyhow!("the index ended the stream after {} batches", ack.into_inner().batches),
                    Ok(Err(status)) => anyhow!("the index closed the stream: {}", status.message()),
                    Err(e) => anyhow!("the stream's task failed: {e}"),
                });
            }
            _ = tick.tick() => {}
        }
        let now = change_mark(store, models);
        let heartbeat_due = last_sent.elapsed() >= cfg.heartbeat;
        // A snapshot when the counters moved, and at every heartbeat too: a block may leave a
        // tier without moving a counter (a doomed disk block freed by its last reader).
        let mut batches = if mark != Some(now) || heartbeat_due {
            let (st, names) = (Arc::clone(store), models.snapshot());
            let next = tokio::task::spawn_blocking(move || Reported::of(&st, &names))
                .await
                .context("taking a snapshot of the tiers")?;
            let resync = mark.is_none();
            let changes = diff(&reported, &next);
            if resync {
                tracing::info!(source, blocks = next.0.len(), "resyncing with the cluster index");
            }
            reported = next;
            mark = Some(now);
            numbering.batches(changes, resync)
        } else {
            Vec::new()
        };
        // Counters that move without a reportable change (blocks of namespaces nobody
        // announced) must not silence the heartbeat, or the index ages the agent out.
        if batches.is_empty() && heartbeat_due {
            batches.push(numbering.batch("", false, Vec::new()));
        }
        if !batches.is_empty() {
            last_sent = Instant::now();
        }
        for b in batches {
            if tx.send(b).await.is_err() {
                // The call ended; the select above says why.
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reported(entries: &[(&str, u64, u8)]) -> Reported {
        Reported(
            entries
                .iter()
                .map(|&(m, h, bits)| ((Arc::from(m), h), bits))
                .collect(),
        )
    }

    fn change(model: &str, stored: bool, tier: u8, hashes: &[u64]) -> Change {
        Change {
            model: Arc::from(model),
            stored,
            tier,
            hashes: hashes.to_vec(),
        }
    }

    #[test]
    fn a_diff_reports_each_tier_a_block_entered_or_left() {
        let old = reported(&[
            ("m", 1, HOST),
            ("m", 2, HOST | DISK),
            ("m", 3, DISK),
            ("n", 1, HOST),
        ]);
        let new = reported(&[("m", 1, HOST), ("m", 2, DISK), ("m", 4, HOST), ("n", 1, DISK)]);
        assert_eq!(
            diff(&old, &new),
            vec![
                change("m", false, HOST, &[2]),
                change("m", false, DISK, &[3]),
                change("m", true, HOST, &[4]),
                change("n", false, HOST, &[1]),
                change("n", true, DISK, &[1]),
            ]
        );
        assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn a_resync_starts_with_a_resync_batch_even_when_there_is_nothing() {
        let mut s = Stream {
            source: "agent/n1",
            epoch: 7,
            seq: 0,
            peer_address: "",
        };
        let empty = s.batches(Vec::new(), true);
        assert_eq!(empty.len(), 1);
        assert!(empty[0].resync && empty[0].events.is_empty() && empty[0].seq == 0);
        assert!(s.batches(Vec::new(), false).is_empty(), "no changes, no batch");

        let many: Vec<u64> = (0..(HASHES_PER_EVENT * EVENTS_PER_BATCH + 1) as u64).collect();
        let out = s.batches(
            vec![change("a", true, HOST, &many), change("b", true, DISK, &[9])],
            true,
        );
        // a: one full batch of 16 events, one more with the last hash; b: a batch of its own.
        assert_eq!(out.len(), 3);
        assert_eq!(out.iter().map(|b| b.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(
            out.iter().map(|b| b.resync).collect::<Vec<_>>(),
            vec![true, false, false]
        );
        assert_eq!(
            out.iter().map(|b| b.model.as_str()).collect::<Vec<_>>(),
            vec!["a", "a", "b"]
        );
        assert_eq!(out[0].events.len(), EVENTS_PER_BATCH);
        let sent: usize = out[..2]
            .iter()
            .flat_map(|b| &b.events)
            .map(|e| match &e.kind {
                Some(proto::event::Kind::Stored(s)) => s.hashes.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(sent, many.len());
    }

    #[test]
    fn announcements_are_bounded_and_versioned() {
        let m = Models::default();
        let ns = |i: u16| {
            let mut b = [0u8; 16];
            b[..2].copy_from_slice(&i.to_le_bytes());
            Namespace::from_bytes(b)
        };
        assert!(m.announce(ns(0), "a"));
        let v = m.version();
        assert!(m.announce(ns(0), "a"));
        assert_eq!(m.version(), v, "the same announcement again changes nothing");
        assert!(m.announce(ns(0), "b"));
        assert!(m.version() > v);
        for i in 1..Models::MAX as u16 {
            assert!(m.announce(ns(i), "a"));
        }
        assert!(!m.announce(ns(Models::MAX as u16), "a"), "full");
        assert!(m.announce(ns(1), "c"), "a known namespace may change its model");
    }
}

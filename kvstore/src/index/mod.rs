//! The cluster index: which source (an engine pod's own KV cache, or a node agent's tiers) holds
//! each block, and how long a prefix of a prompt each candidate pod could reuse.
//!
//! Blocks are keyed by `(scope, hash)`: the scope is what makes equal hashes mean different
//! bytes across engines (the model, say: [`scope_of`]), the hash the 64-bit form vLLM publishes
//! in its KV events ([`crate::vllm::event_hash`]).
//!
//! Sources are interned ([`SourceId`]). Clearing a source (a resync, a prefix-cache reset, a
//! source that stopped reporting) bumps its generation instead of walking the map: entries of an
//! older generation no longer count and are dropped when next touched. The map is sharded by
//! hash, each shard behind its own `RwLock`, so ingest and scoring of different blocks never
//! contend.
//!
//! Memory, from the layout: one indexed block costs a table slot (its 16-byte key and a 24-byte
//! `Vec`, plus the table's spare capacity) and a heap block of 16 bytes per holder (plus the
//! allocator's overhead) — roughly 100 bytes with one holder, 16 more per further holder.

mod sources;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use sources::Generations;
pub use sources::{SourceId, SourceInfo, Sources};

/// Where a source keeps a block, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Medium {
    /// The engine's own KV cache (GPU memory; "GPU" in vLLM's events, also on the CPU backend).
    Device,
    /// A node agent's host-memory arena (or an engine's CPU offload, "CPU" in events).
    Host,
    /// A node agent's disk tier.
    Disk,
    /// The shared object store.
    Object,
}

impl Medium {
    /// Every medium, fastest first.
    pub const ALL: [Self; 4] = [Self::Device, Self::Host, Self::Disk, Self::Object];

    const fn bit(self) -> u8 {
        1 << self as u8
    }

    /// A lowercase name for metrics and APIs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Host => "host",
            Self::Disk => "disk",
            Self::Object => "object",
        }
    }

    /// The medium of a vLLM KV event's `medium` field (None or "GPU": the device cache).
    pub fn from_vllm(medium: Option<&str>) -> Self {
        match medium.map(str::to_ascii_uppercase).as_deref() {
            Some("CPU") => Self::Host,
            Some("STORAGE" | "DISK") => Self::Disk,
            Some("OBJECT") => Self::Object,
            _ => Self::Device,
        }
    }
}

/// How much a block on each medium is worth to a pod: reusing a block from its own KV cache
/// costs nothing, from host memory a copy, from disk a read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TierWeights {
    /// A block in the pod's own KV cache.
    pub device: f64,
    /// A block in host memory.
    pub host: f64,
    /// A block on disk.
    pub disk: f64,
    /// A block in the object store.
    pub object: f64,
}

impl Default for TierWeights {
    fn default() -> Self {
        Self {
            device: 1.0,
            host: 0.8,
            disk: 0.5,
            object: 0.25,
        }
    }
}

impl TierWeights {
    fn of(&self, m: Medium) -> f64 {
        match m {
            Medium::Device => self.device,
            Medium::Host => self.host,
            Medium::Disk => self.disk,
            Medium::Object => self.object,
        }
    }

    /// The weight of the best medium in `mask`.
    fn best(&self, mask: u8) -> f64 {
        Medium::ALL
            .iter()
            .filter(|m| mask & m.bit() != 0)
            .map(|&m| self.of(m))
            .fold(0.0, f64::max)
    }
}

/// Settings of an [`Index`].
#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// Shards of the block map (rounded up to a power of two).
    pub shards: usize,
    /// Per-medium weights of [`Index::score`].
    pub weights: TierWeights,
    /// How long a speculative entry (a request just routed to a pod) counts.
    pub speculative_ttl: Duration,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            shards: 64,
            weights: TierWeights::default(),
            speculative_ttl: Duration::from_secs(2),
        }
    }
}

/// A 64-bit scope from a name (e.g. the model an engine serves), for [`Key`]s.
pub fn scope_of(name: &str) -> u64 {
    twox_hash::XxHash3_64::oneshot(name.as_bytes())
}

/// A block of the index: `(scope, hash)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    /// What makes equal hashes mean different bytes (see [`scope_of`]).
    pub scope: u64,
    /// The block's 64-bit hash.
    pub hash: u64,
}

/// One source's hold on a block (16 bytes).
#[derive(Debug, Clone, Copy)]
struct Holder {
    source: SourceId,
    generation: u32,
    mask: u8,
    /// For a speculative entry (the request routed there may not have run yet), when it
    /// expires: milliseconds since the index was made, plus one; 0 for a reported entry.
    expires: u32,
}

impl Holder {
    fn expired(&self, now_ms: u32) -> bool {
        self.expires != 0 && self.expires <= now_ms
    }

    /// Whether the entry counts: its source was not cleared since the snapshot `gens`, and it
    /// has not expired.
    fn counts(&self, gens: &Generations, now_ms: u32) -> bool {
        gens.get(self.source) == self.generation && !self.expired(now_ms)
    }

    /// Whether the entry can be dropped: its source was cleared after it was made, or it has
    /// expired. An entry newer than the snapshot `gens` (its source cleared and reported again
    /// since) is kept.
    fn stale(&self, gens: &Generations, now_ms: u32) -> bool {
        let current = gens.get(self.source);
        let older = current != u32::MAX && current.wrapping_sub(self.generation) as i32 > 0;
        older || self.expired(now_ms)
    }
}

/// Keys are hashes already: mixing them once more is all a hasher needs to do.
type Map = HashMap<Key, Vec<Holder>, foldhash::fast::FixedState>;

/// What a source reports about its blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Blocks became available on `medium`.
    Stored {
        /// Their scope.
        scope: u64,
        /// Their hashes.
        hashes: Vec<u64>,
        /// Where they are.
        medium: Medium,
    },
    /// Blocks left `medium`.
    Removed {
        /// Their scope.
        scope: u64,
        /// Their hashes.
        hashes: Vec<u64>,
        /// Where they were.
        medium: Medium,
    },
    /// Everything the source held is gone (a prefix-cache reset, a restart).
    Cleared,
}

/// One candidate of [`Index::score`]: an engine pod, and the node agent it can load from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The engine pod (its own KV cache).
    pub pod: SourceId,
    /// The agent of the pod's node, if any.
    pub agent: Option<SourceId>,
}

/// A candidate's score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// The candidate.
    pub pod: SourceId,
    /// Leading blocks of the prompt the pod could reuse.
    pub blocks: usize,
    /// Those blocks weighted by the best medium each is on.
    pub weighted: f64,
}

/// The cluster index (see the module documentation).
#[derive(Debug)]
pub struct Index {
    shards: Vec<RwLock<Map>>,
    mask: u64,
    sources: Sources,
    cfg: IndexConfig,
    /// Expiry times of speculative entries count from here.
    epoch: Instant,
}

impl Index {
    /// An empty index.
    pub fn new(cfg: IndexConfig) -> Self {
        let n = cfg.shards.clamp(1, 1 << 16).next_power_of_two();
        Self {
            shards: (0..n).map(|_| RwLock::new(Map::default())).collect(),
            mask: n as u64 - 1,
            sources: Sources::default(),
            cfg,
            epoch: Instant::now(),
        }
    }

    /// Milliseconds since the index was made, plus one (0 stays free for "no expiry").
    fn now_ms(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u32::MAX - 1) + 1
    }

    /// The sources table (names, generations, last report).
    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    /// The configuration.
    pub fn config(&self) -> &IndexConfig {
        &self.cfg
    }

    fn shard(&self, key: &Key) -> &RwLock<Map> {
        // The low bits of a block hash are uniform; the scope spreads equal hashes of scopes.
        &self.shards[((key.hash ^ key.scope.rotate_left(17)) & self.mask) as usize]
    }

    /// Applies a source's event.
    pub fn apply(&self, source: SourceId, event: &Event) {
        self.sources.touch(source);
        let gens = self.sources.generations();
        let generation = gens.get(source);
        match event {
            Event::Stored {
                scope,
                hashes,
                medium,
            } => {
                for &hash in hashes {
                    self.add(&gens, Key { scope: *scope, hash }, source, generation, *medium, 0);
                }
            }
            Event::Removed {
                scope,
                hashes,
                medium,
            } => {
                for &hash in hashes {
                    self.remove(&gens, Key { scope: *scope, hash }, source, *medium);
                }
            }
            Event::Cleared => self.sources.clear(source),
        }
    }

    /// Records that requests just routed to `pod` will compute these blocks: they count for the
    /// pod (as its own KV cache) until the speculative TTL passes or the pod reports them.
    pub fn speculate(&self, pod: SourceId, scope: u64, hashes: &[u64]) {
        let gens = self.sources.generations();
        let ttl = u32::try_from(self.cfg.speculative_ttl.as_millis()).unwrap_or(u32::MAX);
        let expires = self.now_ms().saturating_add(ttl).max(1);
        for &hash in hashes {
            self.add(
                &gens,
                Key { scope, hash },
                pod,
                gens.get(pod),
                Medium::Device,
                expires,
            );
        }
    }

    /// Adds `source`'s hold on `key`; `expires` is 0 for a report, else a speculation's expiry.
    fn add(
        &self,
        gens: &Generations,
        key: Key,
        source: SourceId,
        generation: u32,
        medium: Medium,
        expires: u32,
    ) {
        let now = self.now_ms();
        let mut map = self.shard(&key).write();
        let holders = map.entry(key).or_insert_with(|| Vec::with_capacity(1));
        holders.retain(|h| !h.stale(gens, now));
        match holders.iter_mut().find(|h| h.source == source) {
            Some(h) if h.expires != 0 && expires == 0 => {
                // A real report replaces a speculation.
                *h = Holder {
                    source,
                    generation,
                    mask: medium.bit(),
                    expires: 0,
                };
            }
            Some(h) if h.expires == 0 && expires != 0 => {}
            Some(h) if h.generation != generation => {
                // An entry of an older generation that did not count any more.
                *h = Holder {
                    source,
                    generation,
                    mask: medium.bit(),
                    expires,
                };
            }
            Some(h) => {
                h.mask |= medium.bit();
                h.expires = h.expires.max(expires);
            }
            None => holders.push(Holder {
                source,
                generation,
                mask: medium.bit(),
                expires,
            }),
        }
    }

    fn remove(&self, gens: &Generations, key: Key, source: SourceId, medium: Medium) {
        let mut map = self.shard(&key).write();
        let Some(holders) = map.get_mut(&key) else {
            return;
        };
        if let Some(h) = holders.iter_mut().find(|h| h.source == source && h.expires == 0) {
            h.mask &= !medium.bit();
        }
        let now = self.now_ms();
        holders.retain(|h| h.mask != 0 && !h.stale(gens, now));
        if holders.is_empty() {
            map.remove(&key);
        }
    }

    /// Which sources hold each block, on which media (stops at the first block nobody holds).
    pub fn lookup(&self, scope: u64, hashes: &[u64]) -> Vec<Vec<(SourceId, Vec<Medium>)>> {
        let gens = self.sources.generations();
        let now = self.now_ms();
        let mut out = Vec::new();
        for &hash in hashes {
            let key = Key { scope, hash };
            let map = self.shard(&key).read();
            let holders: Vec<(SourceId, Vec<Medium>)> = map
                .get(&key)
                .into_iter()
                .flatten()
                .filter(|h| h.counts(&gens, now))
                .map(|h| {
                    (
                        h.source,
                        Medium::ALL
                            .into_iter()
                            .filter(|m| h.mask & m.bit() != 0)
                            .collect(),
                    )
                })
                .collect();
            if holders.is_empty() {
                break;
            }
            out.push(holders);
        }
        out
    }

    /// For each candidate, the longest run of leading `hashes` it could reuse (from its own KV
    /// cache or its node agent's tiers), and that run weighted per block by the best medium.
    /// Scores come back in the candidates' order.
    ///
    /// The walk costs one map lookup per block and one step per holder of it: candidates that
    /// hold nothing cost nothing, and it stops at the first block no candidate can reuse.
    pub fn score(&self, scope: u64, hashes: &[u64], candidates: &[Candidate]) -> Vec<Score> {
        let gens = self.sources.generations();
        let now = self.now_ms();
        // Source -> (candidate, whether through the candidate's agent), through a dense table
        // indexed by source id: the walk below does this lookup for every holder of every block.
        let mut slot = vec![u32::MAX; gens.len()];
        let mut routes: Vec<Vec<(usize, bool)>> = Vec::new();
        let sides = candidates
            .iter()
            .enumerate()
            .flat_map(|(i, c)| std::iter::once((c.pod, i, false)).chain(c.agent.map(|a| (a, i, true))));
        for (source, i, via_agent) in sides {
            let Some(s) = slot.get_mut(source.0 as usize) else {
                continue;
            };
            if *s == u32::MAX {
                *s = routes.len() as u32;
                routes.push(Vec::new());
            }
            routes[*s as usize].push((i, via_agent));
        }
        let mut reach = vec![0usize; candidates.len()];
        let mut weighted = vec![0.0f64; candidates.len()];
        let mut masks = vec![0u8; candidates.len()];
        let mut touched = Vec::new();
        for (block, &hash) in hashes.iter().enumerate() {
            let key = Key { scope, hash };
            {
                let map = self.shard(&key).read();
                let Some(holders) = map.get(&key) else {
                    break;
                };
                for h in holders {
                    let route = slot.get(h.source.0 as usize).copied().unwrap_or(u32::MAX);
                    if route == u32::MAX || !h.counts(&gens, now) {
                        continue;
                    }
                    for &(c, via_agent) in &routes[route as usize] {
                        // An agent serves its tiers, never another process's device memory.
                        let mask = if via_agent {
                            h.mask & !Medium::Device.bit()
                        } else {
                            h.mask
                        };
                        if reach[c] == block && mask != 0 {
                            if masks[c] == 0 {
                                touched.push(c);
                            }
                            masks[c] |= mask;
                        }
                    }
                }
            }
            if touched.is_empty() {
                break;
            }
            for c in touched.drain(..) {
                reach[c] = block + 1;
                weighted[c] += self.cfg.weights.best(masks[c]);
                masks[c] = 0;
            }
        }
        candidates
            .iter()
            .enumerate()
            .map(|(i, c)| Score {
                pod: c.pod,
                blocks: reach[i],
                weighted: weighted[i],
            })
            .collect()
    }

    /// Blocks in the map, including entries of cleared generations not yet dropped.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Clears sources that have not reported for `ttl` (their entries stop counting); returns
    /// their names.
    pub fn age_out(&self, ttl: Duration) -> Vec<String> {
        self.sources.age_out(ttl)
    }

    /// Drops entries that no longer count (cleared sources, expired speculations), a shard at a
    /// time. Scoring ignores them anyway; this returns their memory.
    pub fn sweep(&self) -> usize {
        let gens = self.sources.generations();
        let now = self.now_ms();
        let mut dropped = 0;
        for shard in &self.shards {
            let mut map = shard.write();
            map.retain(|_, holders| {
                holders.retain(|h| !h.stale(&gens, now));
                let keep = !holders.is_empty();
                dropped += usize::from(!keep);
                keep
            });
        }
        dropped
    }
}

#[cfg(test)]
mod tests;

//! The sources of an index: engine pods and node agents, interned, each with a generation that
//! clearing bumps and the time of its last report.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

/// A source of the index, interned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceId(pub u32);

/// What the index knows of a source.
#[derive(Debug, Clone)]
pub struct SourceInfo {
    /// Its name (a pod name or address, or `agent/<node>`).
    pub name: String,
    /// Bumped by each clear: entries of older generations do not count.
    pub generation: u32,
    /// When it last reported.
    pub last_seen: Instant,
    /// Cleared for silence and silent since.
    pub aged_out: bool,
}

/// The interned sources.
#[derive(Debug, Default)]
pub struct Sources {
    by_name: RwLock<HashMap<String, SourceId>>,
    info: RwLock<Vec<SourceInfo>>,
}

impl Sources {
    /// The id of `name`, registering it on first sight.
    pub fn intern(&self, name: &str) -> SourceId {
        if let Some(&id) = self.by_name.read().get(name) {
            return id;
        }
        let mut by_name = self.by_name.write();
        if let Some(&id) = by_name.get(name) {
            return id;
        }
        let mut info = self.info.write();
        let id = SourceId(info.len() as u32);
        info.push(SourceInfo {
            name: name.to_owned(),
            generation: 0,
            last_seen: Instant::now(),
            aged_out: false,
        });
        by_name.insert(name.to_owned(), id);
        id
    }

    /// The id of `name`, if registered.
    pub fn get(&self, name: &str) -> Option<SourceId> {
        self.by_name.read().get(name).copied()
    }

    /// What is known of `id`.
    pub fn info(&self, id: SourceId) -> Option<SourceInfo> {
        self.info.read().get(id.0 as usize).cloned()
    }

    /// Every source.
    pub fn all(&self) -> Vec<(SourceId, SourceInfo)> {
        self.info
            .read()
            .iter()
            .enumerate()
            .map(|(i, s)| (SourceId(i as u32), s.clone()))
            .collect()
    }

    /// Marks a report from `id`.
    pub(crate) fn touch(&self, id: SourceId) {
        if let Some(s) = self.info.write().get_mut(id.0 as usize) {
            s.last_seen = Instant::now();
            s.aged_out = false;
        }
    }

    /// A snapshot of every source's generation, taken once per operation.
    pub(crate) fn generations(&self) -> Generations {
        Generations(self.info.read().iter().map(|s| s.generation).collect())
    }

    /// Counts as a report from `id` without any change (a source known to be alive).
    pub fn keep_alive(&self, id: SourceId) {
        self.touch(id);
    }

    /// Forgets everything `id` held.
    pub fn clear(&self, id: SourceId) {
        if let Some(s) = self.info.write().get_mut(id.0 as usize) {
            s.generation = s.generation.wrapping_add(1);
        }
    }

    pub(crate) fn age_out(&self, ttl: Duration) -> Vec<String> {
        let now = Instant::now();
        let mut info = self.info.write();
        let mut gone = Vec::new();
        for s in info.iter_mut().filter(|s| !s.aged_out) {
            if now.duration_since(s.last_seen) >= ttl {
                s.generation = s.generation.wrapping_add(1);
                s.aged_out = true;
                gone.push(s.name.clone());
            }
        }
        gone
    }
}

/// Every source's generation at one moment.
#[derive(Debug)]
pub(crate) struct Generations(Vec<u32>);

impl Generations {
    /// The generation of `id` (an unknown source has none that matches: `u32::MAX`).
    pub(crate) fn get(&self, id: SourceId) -> u32 {
        self.0.get(id.0 as usize).copied().unwrap_or(u32::MAX)
    }

    /// How many sources there are.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

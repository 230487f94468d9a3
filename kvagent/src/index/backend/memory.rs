//! The in-memory backend: `kvstore::index::Index` in this process.

use std::time::{Duration, Instant};

use kvstore::index::{self, Event, Index, Medium, SourceId};

use super::{Backend, BackendStats, Candidate, PodScore, Result};

/// The index in this process's memory.
#[derive(Debug)]
pub(crate) struct MemoryBackend {
    index: Index,
    peers: parking_lot::RwLock<std::collections::HashMap<String, String>>,
}

impl MemoryBackend {
    pub(crate) fn new(cfg: index::IndexConfig) -> Self {
        Self {
            index: Index::new(cfg),
            peers: parking_lot::RwLock::default(),
        }
    }

    /// The id of a source by name; a name never seen holds nothing.
    fn known(&self, name: &str) -> SourceId {
        self.index.sources().get(name).unwrap_or(SourceId(u32::MAX))
    }
}

#[tonic::async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn apply(&self, source: &str, events: &[Event]) -> Result<()> {
        let id = self.index.sources().intern(source);
        for e in events {
            self.index.apply(id, e);
        }
        self.index.sources().keep_alive(id);
        Ok(())
    }

    async fn set_peer_address(&self, source: &str, address: &str) -> Result<()> {
        let mut peers = self.peers.write();
        if peers.get(source).map(String::as_str) != Some(address) {
            peers.insert(source.to_owned(), address.to_owned());
        }
        Ok(())
    }

    async fn peer_addresses(&self, sources: &[String]) -> Result<Vec<Option<String>>> {
        let peers = self.peers.read();
        Ok(sources.iter().map(|s| peers.get(s).cloned()).collect())
    }

    async fn keep_alive(&self, source: &str) -> Result<()> {
        let id = self.index.sources().intern(source);
        self.index.sources().keep_alive(id);
        Ok(())
    }

    async fn speculate(&self, pod: &str, scope: u64, hashes: &[u64]) -> Result<()> {
        let id = self.index.sources().intern(pod);
        self.index.speculate(id, scope, hashes);
        Ok(())
    }

    async fn score(&self, scope: u64, hashes: &[u64], candidates: &[Candidate]) -> Result<Vec<PodScore>> {
        let ids: Vec<index::Candidate> = candidates
            .iter()
            .map(|c| index::Candidate {
                pod: self.known(&c.pod),
                agent: c.agent.as_deref().and_then(|a| self.index.sources().get(a)),
            })
            .collect();
        Ok(self
            .index
            .score(scope, hashes, &ids)
            .into_iter()
            .map(|s| PodScore {
                blocks: s.blocks,
                weighted: s.weighted,
            })
            .collect())
    }

    async fn lookup(&self, scope: u64, hashes: &[u64]) -> Result<Vec<Vec<(String, Vec<Medium>)>>> {
        let sources = self.index.sources();
        Ok(self
            .index
            .lookup(scope, hashes)
            .into_iter()
            .map(|holders| {
                holders
                    .into_iter()
                    .map(|(id, media)| (sources.info(id).map(|i| i.name).unwrap_or_default(), media))
                    .collect()
            })
            .collect())
    }

    async fn clear(&self, source: &str) -> Result<bool> {
        let known = self.index.sources().get(source);
        if let Some(id) = known {
            self.index.apply(id, &Event::Cleared);
        }
        Ok(known.is_some())
    }

    async fn age_out(&self, ttl: Duration) -> Result<Vec<String>> {
        Ok(self.index.age_out(ttl))
    }

    async fn sweep(&self) -> Result<usize> {
        Ok(self.index.sweep())
    }

    async fn stats(&self) -> Result<BackendStats> {
        let now = Instant::now();
        Ok(BackendStats {
            blocks: self.index.len() as u64,
            sources: self
                .index
                .sources()
                .all()
                .into_iter()
                .map(|(_, s)| (s.name, now.duration_since(s.last_seen).as_secs_f64()))
                .collect(),
        })
    }
}

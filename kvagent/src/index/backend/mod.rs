//! Where the index keeps its entries: one trait, one file per backend.
//!
//! - [`memory`]: this process's memory (`kvstore::index`), the default: the fastest, and each
//!   replica knows only what it ingested itself.
//! - `redis` (feature `redis`): one Redis or Valkey shared by several index replicas, so that
//!   they answer from one view whichever replica ingested an event.
//!
//! Sources are named here (a pod name, `agent/<node>`): names are what replicas share.

pub(crate) mod memory;
#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(all(test, feature = "redis"))]
mod tests;

use std::time::Duration;

use kvstore::index::{Event, Medium};

/// A failure of the backend itself (never of the caller's input).
#[derive(Debug, thiserror::Error)]
pub(crate) enum BackendError {
    /// The backend cannot be reached or failed to answer; the call changed nothing it can
    /// vouch for.
    #[error("the index backend ({backend}) is unavailable: {message}")]
    Unavailable {
        /// Which backend.
        backend: &'static str,
        /// What went wrong.
        message: String,
    },
}

impl From<BackendError> for tonic::Status {
    fn from(e: BackendError) -> Self {
        tonic::Status::unavailable(e.to_string())
    }
}

pub(crate) type Result<T> = std::result::Result<T, BackendError>;

/// One candidate of a score: an engine pod, and the node agent it can load from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// The pod's source name.
    pub(crate) pod: String,
    /// The source name of its node's agent, if it has one.
    pub(crate) agent: Option<String>,
}

/// A candidate's score, in the candidates' order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PodScore {
    /// Leading blocks of the prompt the pod could reuse.
    pub(crate) blocks: usize,
    /// Those blocks weighted by the best medium each is on.
    pub(crate) weighted: f64,
}

/// What the backend holds.
#[derive(Debug, Clone, Default)]
pub(crate) struct BackendStats {
    /// Indexed blocks (with the memory backend, entries of cleared sources not yet dropped
    /// count too).
    pub(crate) blocks: u64,
    /// Every source, with the seconds since its last report.
    pub(crate) sources: Vec<(String, f64)>,
}

/// Where the index keeps its entries (see the module documentation).
#[tonic::async_trait]
pub(crate) trait Backend: Send + Sync + std::fmt::Debug {
    /// A short name for logs and errors.
    fn name(&self) -> &'static str;

    /// Applies a source's events, in order, and counts them as a report from it.
    async fn apply(&self, source: &str, events: &[Event]) -> Result<()>;

    /// Counts as a report from `source` without any change (a source known to be alive).
    async fn keep_alive(&self, source: &str) -> Result<()>;

    /// Records that `pod` is about to compute these blocks (a speculative entry with a TTL).
    async fn speculate(&self, pod: &str, scope: u64, hashes: &[u64]) -> Result<()>;

    /// For each candidate, the longest run of leading `hashes` it could reuse, and that run
    /// weighted per block by the best medium (see `kvstore::index::Index::score`).
    async fn score(&self, scope: u64, hashes: &[u64], candidates: &[Candidate]) -> Result<Vec<PodScore>>;

    /// Which sources hold each leading block, on which media (stops at the first block nobody
    /// holds).
    async fn lookup(&self, scope: u64, hashes: &[u64]) -> Result<Vec<Vec<(String, Vec<Medium>)>>>;

    /// Records where `source` (a node agent) serves its blocks to other agents.
    async fn set_peer_address(&self, source: &str, address: &str) -> Result<()>;

    /// The recorded peer addresses of `sources` (`None` where unknown).
    async fn peer_addresses(&self, sources: &[String]) -> Result<Vec<Option<String>>>;

    /// Forgets everything `source` reported; whether the source was known.
    async fn clear(&self, source: &str) -> Result<bool>;

    /// Clears sources silent for `ttl`; returns their names.
    async fn age_out(&self, ttl: Duration) -> Result<Vec<String>>;

    /// Returns the memory of entries that no longer count; how many blocks went.
    async fn sweep(&self) -> Result<usize>;

    /// What the backend holds.
    async fn stats(&self) -> Result<BackendStats>;

    /// Claims, or renews, the right to ingest `pod`'s events for `ttl`, as `owner`: with a
    /// shared backend one replica follows each pod, so that replicas never undo each other's
    /// work (a replica's resync would drop what the others rebuilt). A backend private to one
    /// process always grants it.
    async fn claim(&self, _pod: &str, _owner: &str, _ttl: Duration) -> Result<bool> {
        Ok(true)
    }

    /// The last batch of `pod`'s events applied (by any replica), if the backend keeps it: a
    /// replica that takes a pod over continues from there instead of starting it over.
    async fn applied_seq(&self, _pod: &str) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Records that `pod`'s batch `seq` is applied.
    async fn record_seq(&self, _pod: &str, _seq: u64) -> Result<()> {
        Ok(())
    }

    /// Whether the backend lost its entries since the last call (a Redis that restarted
    /// empty): every source must then resync. Also a health check.
    async fn lost_state(&self) -> Result<bool> {
        Ok(false)
    }
}

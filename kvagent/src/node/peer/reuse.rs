//! Cross-node reuse: when a lookup's local prefix stops short, ask the cluster index whether
//! another node's agent holds the next blocks, and pull them on acquire when that beats
//! recomputing.
//!
//! A lookup pays one index round trip (bounded by `reuse.index_timeout_ms`) only when the local
//! prefix ends at least `reuse.min_blocks` before the prompt does, and the answer — a peer, or
//! nobody — is remembered for `reuse.remember_ms` per (namespace, first missing block), so a
//! burst of requests sharing a prefix asks once. Blocks a peer holds are reported to the engine
//! as [`TierLevel::Peer`]; the engine then acquires them (off its scheduler's thread), and the
//! acquire pulls them first, if the transfer is expected to be faster than recomputing: with
//! `B` bytes granted for `n` blocks, pull when `B / peer bandwidth + 1 ms < n × block_tokens /
//! prefill_tokens_per_s`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kvstore::vllm::event_hash;
use kvstore::{BlockHash, Namespace, TierLevel};
use parking_lot::Mutex;
use tonic::transport::Channel;

use crate::config::ReuseSection;
use crate::index::proto::{self, index_client::IndexClient};

/// Most remembered probe answers (oldest dropped first).
const MAX_REMEMBERED: usize = 16_384;

/// What a probe found after a local prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Probe {
    /// `blocks` more blocks are held by the agent at `address`.
    Peer {
        /// Its peer address.
        address: String,
        /// How many consecutive blocks past the local prefix it holds.
        blocks: usize,
    },
    /// Nobody else holds the next block (or the index could not say).
    Nothing,
}

/// The reuse policy and the index client of one agent.
#[derive(Debug)]
pub(crate) struct Reuse {
    index: IndexClient<Channel>,
    /// This agent's own source name, never a peer of itself.
    own_source: String,
    own_address: Option<String>,
    cfg: ReuseSection,
    remembered: Mutex<HashMap<(Namespace, BlockHash), (Probe, Instant)>>,
    /// Until when the index is not asked at all, after it failed to answer: lookups of new
    /// prefixes must not each wait for an index that is down.
    quiet_until: Mutex<Option<Instant>>,
}

impl Reuse {
    /// A policy asking the index at `index_uri` (lazily connected).
    pub(crate) fn new(
        index_uri: &str,
        own_source: String,
        own_address: Option<String>,
        cfg: ReuseSection,
    ) -> anyhow::Result<Self> {
        let channel = tonic::transport::Endpoint::from_shared(index_uri.to_owned())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .connect_lazy();
        let index = IndexClient::new(channel);
        // Connected now, in the background: a first probe that had to connect (TCP and
        // HTTP/2 handshakes) would often miss `index_timeout_ms`, and a miss quiets the probes
        // for `remember_ms`. The answer to an empty lookup does not matter.
        let mut warm = index.clone();
        tokio::spawn(async move {
            if let Err(status) = warm.lookup(proto::LookupRequest::default()).await {
                tracing::debug!(%status, "the cluster index did not answer a first lookup");
            }
        });
        Ok(Self {
            index,
            own_source,
            own_address,
            cfg,
            remembered: Mutex::new(HashMap::new()),
            quiet_until: Mutex::new(None),
        })
    }

    /// Whether a run of `missing` blocks after the local prefix is worth asking about.
    pub(crate) fn worth_asking(&self, missing: usize) -> bool {
        missing >= self.cfg.min_blocks as usize
    }

    /// The remembered answer for the blocks starting at `first`, if still fresh.
    pub(crate) fn remembered(&self, ns: Namespace, first: BlockHash) -> Option<Probe> {
        let map = self.remembered.lock();
        let (probe, until) = map.get(&(ns, first))?;
        (*until > Instant::now()).then(|| probe.clone())
    }

    fn remember(&self, ns: Namespace, first: BlockHash, probe: Probe) {
        let mut map = self.remembered.lock();
        let now = Instant::now();
        if map.len() >= MAX_REMEMBERED {
            map.retain(|_, (_, until)| *until > now);
            if map.len() >= MAX_REMEMBERED {
                map.clear();
            }
        }
        let ttl = Duration::from_millis(u64::from(self.cfg.remember_ms));
        map.insert((ns, first), (probe, now + ttl));
    }

    /// Forgets what was found at `first` and remembers that pulling it did not pay (or failed).
    pub(crate) fn declined(&self, ns: Namespace, first: BlockHash) {
        self.remember(ns, first, Probe::Nothing);
    }

    /// Asks the index who holds `hashes` (the blocks past the local prefix) under `model`; the
    /// best peer's run, remembered.
    pub(crate) async fn probe(&self, ns: Namespace, model: &str, hashes: &[BlockHash]) -> Probe {
        let Some(&first) = hashes.first() else {
            return Probe::Nothing;
        };
        if let Some(p) = self.remembered(ns, first) {
            return p;
        }
        if self.quiet_until.lock().is_some_and(|t| t > Instant::now()) {
            return Probe::Nothing;
        }
        let req = proto::LookupRequest {
            model: model.to_owned(),
            hashes: Some(proto::BlockHashes {
                hashes: hashes.iter().map(|h| event_hash(h.as_bytes())).collect(),
            }),
        };
        let mut client = self.index.clone();
        let bound = Duration::from_millis(u64::from(self.cfg.index_timeout_ms));
        let probe = match tokio::time::timeout(bound, client.lookup(req)).await {
            Ok(Ok(resp)) => self.best(&resp.into_inner()),
            Ok(Err(status)) => {
                tracing::debug!(%status, "the index could not say who holds the blocks");
                self.quiet();
                Probe::Nothing
            }
            Err(_) => {
                tracing::debug!(?bound, "the index did not answer in time");
                self.quiet();
                Probe::Nothing
            }
        };
        // Every block of the run, so that an acquire starting anywhere in it finds the peer.
        match &probe {
            Probe::Peer { address, blocks } => {
                for (i, h) in hashes.iter().take(*blocks).enumerate() {
                    let rest = Probe::Peer {
                        address: address.clone(),
                        blocks: blocks - i,
                    };
                    self.remember(ns, *h, rest);
                }
            }
            Probe::Nothing => self.remember(ns, first, Probe::Nothing),
        }
        probe
    }

    fn quiet(&self) {
        *self.quiet_until.lock() =
            Some(Instant::now() + Duration::from_millis(u64::from(self.cfg.remember_ms)));
    }

    /// The peer holding the longest run from the first block on.
    fn best(&self, resp: &proto::LookupResponse) -> Probe {
        let mut runs: HashMap<&str, usize> = HashMap::new();
        for (i, block) in resp.blocks.iter().enumerate() {
            for h in &block.holders {
                let is_peer = !h.peer_address.is_empty()
                    && h.source != self.own_source
                    && Some(&h.peer_address) != self.own_address.as_ref();
                if is_peer {
                    let run = runs.entry(h.peer_address.as_str()).or_insert(0);
                    if *run == i {
                        *run += 1;
                    }
                }
            }
        }
        match runs
            .into_iter()
            .max_by_key(|(addr, n)| (*n, std::cmp::Reverse(*addr)))
        {
            Some((address, blocks)) if self.worth_asking(blocks) => Probe::Peer {
                address: address.to_owned(),
                blocks,
            },
            _ => Probe::Nothing,
        }
    }

    /// Whether pulling `bytes` for `blocks` blocks is expected to beat recomputing them.
    pub(crate) fn pays(&self, blocks: usize, bytes: u64) -> bool {
        let bandwidth = f64::from(self.cfg.peer_gbit_s.max(1)) * 1e9 / 8.0;
        let transfer = bytes as f64 / bandwidth + 1e-3;
        let recompute = blocks as f64 * f64::from(self.cfg.block_tokens)
            / f64::from(self.cfg.prefill_tokens_per_s.max(1));
        transfer < recompute
    }
}

/// `tiers` (the local prefix) extended with `blocks` peer-held blocks.
pub(crate) fn with_peer(mut tiers: Vec<TierLevel>, blocks: usize) -> Vec<TierLevel> {
    tiers.extend(std::iter::repeat_n(TierLevel::Peer, blocks));
    tiers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reuse(cfg: ReuseSection) -> Reuse {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        Reuse::new(
            "http://127.0.0.1:1",
            "agent/me".into(),
            Some("10.0.0.1:9471".into()),
            cfg,
        )
        .unwrap()
    }

    fn holders(list: &[(&str, &str)]) -> proto::BlockHolders {
        proto::BlockHolders {
            hash: 0,
            holders: list
                .iter()
                .map(|(s, a)| proto::Holder {
                    source: (*s).into(),
                    media: vec![],
                    peer_address: (*a).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn the_longest_run_from_the_first_block_wins_and_never_ourselves() {
        let r = reuse(ReuseSection::default());
        let resp = proto::LookupResponse {
            blocks: vec![
                holders(&[
                    ("agent/a", "10.0.0.2:9471"),
                    ("agent/me", "10.0.0.1:9471"),
                    ("pod-x", ""),
                ]),
                holders(&[("agent/a", "10.0.0.2:9471"), ("agent/b", "10.0.0.3:9471")]),
                holders(&[("agent/b", "10.0.0.3:9471"), ("agent/me", "10.0.0.1:9471")]),
                holders(&[("agent/b", "10.0.0.3:9471")]),
            ],
        };
        // b's run starts at block 1, not at the first missing block: it does not count.
        assert_eq!(
            r.best(&resp),
            Probe::Peer {
                address: "10.0.0.2:9471".into(),
                blocks: 2
            }
        );
        let only_me = proto::LookupResponse {
            blocks: vec![holders(&[("agent/me", "10.0.0.1:9471")]); 4],
        };
        assert_eq!(r.best(&only_me), Probe::Nothing);
        let too_short = proto::LookupResponse {
            blocks: vec![holders(&[("agent/a", "10.0.0.2:9471")])],
        };
        assert_eq!(r.best(&too_short), Probe::Nothing, "below min_blocks");
    }

    #[test]
    fn the_cost_model_weighs_transfer_against_recompute() {
        let r = reuse(ReuseSection {
            peer_gbit_s: 8,
            prefill_tokens_per_s: 10_000,
            block_tokens: 16,
            ..ReuseSection::default()
        });
        // 1 GB/s: 64 blocks of 1 MiB take 67 ms to move, 102 ms to recompute.
        assert!(r.pays(64, 64 << 20));
        // 64 blocks of 4 MiB: 269 ms to move.
        assert!(!r.pays(64, 256 << 20));
        // Two blocks of 4 MiB: 9.4 ms to move, 3.2 ms to recompute.
        assert!(!r.pays(2, 8 << 20));
        // A fast engine and one small block: the fixed cost of a transfer dominates.
        let fast = reuse(ReuseSection {
            prefill_tokens_per_s: 100_000,
            ..ReuseSection::default()
        });
        assert!(!fast.pays(1, 64 << 10));
        assert!(fast.pays(1024, 64 << 20));
    }

    #[tokio::test]
    async fn an_index_that_does_not_answer_is_left_alone_for_a_while() {
        // Port 1 refuses connections: the index is down.
        let cfg = ReuseSection {
            index_timeout_ms: 50,
            remember_ms: 60_000,
            ..ReuseSection::default()
        };
        let r = Reuse::new("http://127.0.0.1:1", "agent/me".into(), None, cfg).unwrap();
        let ns = Namespace::builder("m").build();
        let hashes: Vec<BlockHash> = (0..4).map(BlockHash::from_u64).collect();
        assert_eq!(r.probe(ns, "m", &hashes).await, Probe::Nothing);
        // Another prefix: not asked (it would wait on the dead index again).
        let started = Instant::now();
        assert_eq!(r.probe(ns, "m", &hashes[1..]).await, Probe::Nothing);
        assert!(started.elapsed() < Duration::from_millis(20));
    }

    #[test]
    fn answers_are_remembered_until_they_expire() {
        let r = reuse(ReuseSection {
            remember_ms: 60_000,
            ..ReuseSection::default()
        });
        let ns = Namespace::builder("m").build();
        let h = BlockHash::from_u64(1);
        assert_eq!(r.remembered(ns, h), None);
        r.declined(ns, h);
        assert_eq!(r.remembered(ns, h), Some(Probe::Nothing));
        let brief = reuse(ReuseSection {
            remember_ms: 0,
            ..ReuseSection::default()
        });
        brief.declined(ns, h);
        assert_eq!(brief.remembered(ns, h), None);
    }
}

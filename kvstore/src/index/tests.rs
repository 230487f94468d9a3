use std::collections::{HashMap, HashSet};
use std::time::Duration;

use proptest::prelude::*;

use super::*;

const S: u64 = 7;

fn stored(hashes: &[u64], medium: Medium) -> Event {
    Event::Stored {
        scope: S,
        hashes: hashes.to_vec(),
        medium,
    }
}

fn removed(hashes: &[u64], medium: Medium) -> Event {
    Event::Removed {
        scope: S,
        hashes: hashes.to_vec(),
        medium,
    }
}

fn pod(id: SourceId) -> Candidate {
    Candidate { pod: id, agent: None }
}

fn blocks(scores: &[Score]) -> Vec<usize> {
    scores.iter().map(|s| s.blocks).collect()
}

#[test]
fn score_is_the_longest_consecutive_prefix_per_pod() {
    let idx = Index::new(IndexConfig::default());
    let (a, b, c) = (
        idx.sources().intern("a"),
        idx.sources().intern("b"),
        idx.sources().intern("c"),
    );
    idx.apply(a, &stored(&[1, 2, 3, 4], Medium::Device));
    idx.apply(b, &stored(&[1, 2, 4], Medium::Device));
    let scores = idx.score(S, &[1, 2, 3, 4, 5], &[pod(c), pod(b), pod(a)]);
    assert_eq!(blocks(&scores), vec![0, 2, 4]);
    assert_eq!(scores[2].weighted, 4.0);
    assert_eq!(scores[1].pod, b);
    // Another scope holds nothing of these.
    assert_eq!(blocks(&idx.score(S + 1, &[1, 2], &[pod(a)])), vec![0]);
}

#[test]
fn a_pod_reuses_its_agents_tiers_but_not_another_processes_device_memory() {
    let idx = Index::new(IndexConfig::default());
    let (p, agent, other) = (
        idx.sources().intern("pod"),
        idx.sources().intern("agent/n1"),
        idx.sources().intern("pod-2"),
    );
    idx.apply(p, &stored(&[1], Medium::Device));
    idx.apply(agent, &stored(&[1, 2], Medium::Host));
    idx.apply(agent, &stored(&[3], Medium::Disk));
    idx.apply(agent, &stored(&[4], Medium::Device));
    let with_agent = Candidate {
        pod: p,
        agent: Some(agent),
    };
    let scores = idx.score(
        S,
        &[1, 2, 3, 4],
        &[
            with_agent,
            pod(p),
            Candidate {
                pod: other,
                agent: Some(agent),
            },
        ],
    );
    assert_eq!(blocks(&scores), vec![3, 1, 3]);
    let w = TierWeights::default();
    assert_eq!(scores[0].weighted, w.device + w.host + w.disk);
    assert_eq!(scores[2].weighted, w.host + w.host + w.disk);
}

#[test]
fn removals_and_clears_lower_scores_and_later_reports_count_again() {
    let idx = Index::new(IndexConfig::default());
    let a = idx.sources().intern("a");
    idx.apply(a, &stored(&[1, 2, 3], Medium::Device));
    idx.apply(a, &stored(&[2], Medium::Host));
    idx.apply(a, &removed(&[2], Medium::Device));
    let s = idx.score(S, &[1, 2, 3], &[pod(a)]);
    assert_eq!(s[0].blocks, 3, "block 2 is still on the host medium");
    assert_eq!(s[0].weighted, 2.0 + TierWeights::default().host);
    idx.apply(a, &removed(&[2], Medium::Host));
    assert_eq!(blocks(&idx.score(S, &[1, 2, 3], &[pod(a)])), vec![1]);
    idx.apply(a, &Event::Cleared);
    assert_eq!(blocks(&idx.score(S, &[1, 2, 3], &[pod(a)])), vec![0]);
    assert!(idx.lookup(S, &[1]).is_empty());
    idx.apply(a, &stored(&[1], Medium::Device));
    assert_eq!(blocks(&idx.score(S, &[1, 2, 3], &[pod(a)])), vec![1]);
    assert_eq!(idx.sweep(), 1, "block 3 of the cleared generation is dropped");
    assert_eq!(idx.len(), 1);
}

#[test]
fn speculation_counts_until_its_ttl_and_a_report_replaces_it() {
    let live = Index::new(IndexConfig {
        speculative_ttl: Duration::from_secs(3600),
        ..IndexConfig::default()
    });
    let a = live.sources().intern("a");
    live.speculate(a, S, &[1, 2]);
    assert_eq!(blocks(&live.score(S, &[1, 2], &[pod(a)])), vec![2]);
    live.apply(a, &stored(&[1], Medium::Host));
    assert_eq!(
        live.lookup(S, &[1]),
        vec![vec![(a, vec![Medium::Host])]],
        "the report replaced it"
    );

    let expired = Index::new(IndexConfig {
        speculative_ttl: Duration::ZERO,
        ..IndexConfig::default()
    });
    let a = expired.sources().intern("a");
    expired.speculate(a, S, &[1, 2]);
    assert_eq!(blocks(&expired.score(S, &[1, 2], &[pod(a)])), vec![0]);
    assert_eq!(expired.sweep(), 2);
}

#[test]
fn sources_that_stop_reporting_age_out() {
    let idx = Index::new(IndexConfig::default());
    let a = idx.sources().intern("a");
    idx.apply(a, &stored(&[1], Medium::Device));
    assert!(idx.age_out(Duration::from_secs(3600)).is_empty());
    assert_eq!(idx.age_out(Duration::ZERO), vec!["a".to_owned()]);
    assert_eq!(blocks(&idx.score(S, &[1], &[pod(a)])), vec![0]);
}

proptest! {
    /// The sharded index scores as a plain set per pod would.
    #[test]
    fn scores_match_a_plain_model(ops in prop::collection::vec((0u32..3, 0u64..8, any::<bool>()), 0..200),
                                  prompt in prop::collection::vec(0u64..8, 0..10)) {
        let idx = Index::new(IndexConfig { shards: 4, ..IndexConfig::default() });
        let ids: Vec<SourceId> = (0..3).map(|i| idx.sources().intern(&format!("p{i}"))).collect();
        let mut model: HashMap<u32, HashSet<u64>> = HashMap::new();
        for (p, hash, store) in ops {
            if store {
                idx.apply(ids[p as usize], &stored(&[hash], Medium::Device));
                model.entry(p).or_default().insert(hash);
            } else {
                idx.apply(ids[p as usize], &removed(&[hash], Medium::Device));
                model.entry(p).or_default().remove(&hash);
            }
        }
        let scores = idx.score(S, &prompt, &ids.iter().map(|&i| pod(i)).collect::<Vec<_>>());
        for p in 0..3u32 {
            let held = model.get(&p).cloned().unwrap_or_default();
            let expected = prompt.iter().take_while(|h| held.contains(h)).count();
            prop_assert_eq!(scores[p as usize].blocks, expected);
        }
    }
}

#[test]
fn an_add_with_an_older_snapshot_keeps_entries_reported_since() {
    let idx = Index::new(IndexConfig::default());
    let (a, b) = (idx.sources().intern("a"), idx.sources().intern("b"));
    idx.apply(a, &stored(&[1], Medium::Device));
    // Another writer took its snapshot before `a` was cleared and reported the block again.
    let old = idx.sources().generations();
    idx.apply(a, &Event::Cleared);
    idx.apply(a, &stored(&[1], Medium::Host));
    idx.add(&old, Key { scope: S, hash: 1 }, b, old.get(b), Medium::Device, 0);
    let scores = idx.score(S, &[1], &[pod(a), pod(b)]);
    assert_eq!(blocks(&scores), vec![1, 1], "a's fresh entry survived b's add");
}

//! Criterion benches of the cluster index: event ingest and scoring.
#![expect(
    missing_docs,
    reason = "criterion_group! generates an undocumented public function"
)]

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use kvstore::index::{Candidate, Event, Index, IndexConfig, Medium};

const SCOPE: u64 = 1;

/// 100 pods, each holding 2 000 blocks of its own; pod `p` also holds the first `prefix(p)`
/// blocks of a 512-block prompt.
fn populated(prefix: impl Fn(u64) -> usize) -> (Index, Vec<Candidate>, Vec<u64>) {
    let idx = Index::new(IndexConfig::default());
    let prompt: Vec<u64> = (0..512u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let mut candidates = Vec::new();
    for p in 0..100u64 {
        let id = idx.sources().intern(&format!("pod-{p}"));
        let own: Vec<u64> = (0..2_000u64).map(|i| (p << 32) | i).collect();
        idx.apply(
            id,
            &Event::Stored {
                scope: SCOPE,
                hashes: own,
                medium: Medium::Device,
            },
        );
        let n = prefix(p).min(prompt.len());
        idx.apply(
            id,
            &Event::Stored {
                scope: SCOPE,
                hashes: prompt[..n].to_vec(),
                medium: Medium::Device,
            },
        );
        candidates.push(Candidate { pod: id, agent: None });
    }
    (idx, candidates, prompt)
}

fn score(c: &mut Criterion) {
    // Typical: three pods hold 512, 300 and 100 blocks of the prompt, the others none of it.
    let (idx, candidates, prompt) = populated(|p| [512, 300, 100].get(p as usize).copied().unwrap_or(0));
    c.bench_function("score 512-block prompt, 100 pods, 3 holding it", |b| {
        b.iter(|| black_box(idx.score(SCOPE, black_box(&prompt), &candidates)));
    });
    // Dense: pod p holds 5p blocks of it (a hot system prompt everywhere): ~25 000 holder steps.
    let (idx, candidates, prompt) = populated(|p| 5 * p as usize);
    c.bench_function("score 512-block prompt, 100 pods, all holding some", |b| {
        b.iter(|| black_box(idx.score(SCOPE, black_box(&prompt), &candidates)));
    });
}

fn ingest(c: &mut Criterion) {
    let mut g = c.benchmark_group("ingest");
    let batch: Vec<u64> = (0..1_024u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    g.throughput(Throughput::Elements(batch.len() as u64));
    g.bench_function("BlockStored, 1024 hashes per event", |b| {
        let idx = Index::new(IndexConfig::default());
        let id = idx.sources().intern("pod");
        let stored = Event::Stored {
            scope: SCOPE,
            hashes: batch.clone(),
            medium: Medium::Device,
        };
        let removed = Event::Removed {
            scope: SCOPE,
            hashes: batch.clone(),
            medium: Medium::Device,
        };
        let mut flip = false;
        b.iter(|| {
            flip = !flip;
            idx.apply(id, if flip { &stored } else { &removed });
        });
    });
    g.finish();
}

criterion_group!(benches, score, ingest);
criterion_main!(benches);

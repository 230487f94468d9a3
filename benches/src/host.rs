//! Host arena put/get bandwidth against plain memcpy with the same sizes, threads and access
//! pattern.
//!
//! The machines this runs on are shared, and their memory bandwidth drifts by tens of percent
//! within seconds. So kvtier and the baseline are measured in many short alternating phases on
//! the same threads (~32 MiB per thread per phase, which goes first alternating too), and the
//! reported ratio is the median of the per-pair ratios: both sides of a pair see the same
//! machine. The baseline copies into and out of the very slots the store uses: bandwidth also
//! depends on which physical pages a region got (two fresh regions differ by up to 25 % here),
//! so the same memory on both sides is what isolates kvtier's own cost.

use std::sync::Barrier;
use std::time::Instant;

use anyhow::{Context, Result};
use kvstore::{BlockHash, BlockKey, HostTierConfig, Namespace, StoreConfig, TieredStore};

use crate::report::{Row, paired};

const SIZES: [u64; 4] = [64 << 10, 256 << 10, 1 << 20, 4 << 20];

/// Bytes each thread moves per phase.
const PHASE_BYTES: u64 = 32 << 20;

fn key(ns: Namespace, t: usize, i: u64) -> BlockKey {
    BlockKey::new(ns, BlockHash::from_u64(((t as u64) << 48) | i))
}

struct Case {
    size: u64,
    threads: usize,
    /// Blocks in each thread's working set (64 MiB: beyond the caches, so memory bandwidth).
    blocks: u64,
    /// Pairs of phases (kvtier, baseline).
    pairs: usize,
}

impl Case {
    fn ops_per_phase(&self) -> u64 {
        (PHASE_BYTES / self.size).max(1)
    }
}

/// One operation of thread `t`: its sequence number `i` and the thread's own buffer.
type Op<'a> = dyn Fn(usize, u64, &mut [u8]) + Sync + 'a;

/// Runs `ours` and `base` in alternating phases on `case.threads` threads that live for the
/// whole measurement; returns GB/s of each phase, paired. Each worker stamps its own start and
/// end (a coordinating thread would compete with the workers for the cores and stamp late); a
/// phase lasts from the earliest start to the latest end.
fn phases(case: &Case, ours: &Op<'_>, base: &Op<'_>) -> (Vec<f64>, Vec<f64>) {
    let ops = case.ops_per_phase();
    let barrier = Barrier::new(case.threads);
    let gb = (case.threads as u64 * ops * case.size) as f64 / 1e9;
    let stamps: Vec<Vec<(Instant, Instant)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..case.threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut buf = vec![0u8; case.size as usize];
                    let mut stamps = Vec::with_capacity(2 * case.pairs);
                    for p in 0..case.pairs {
                        for phase in 0..2 {
                            let run = if (p + phase) % 2 == 0 { ours } else { base };
                            barrier.wait();
                            let start = Instant::now();
                            for i in 0..ops {
                                run(t, p as u64 * ops + i, &mut buf);
                            }
                            stamps.push((start, Instant::now()));
                        }
                    }
                    std::hint::black_box(&buf);
                    stamps
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("benchmark thread"))
            .collect()
    });
    let (mut o, mut b) = (Vec::new(), Vec::new());
    for n in 0..2 * case.pairs {
        let start = stamps.iter().map(|s| s[n].0).min().expect("a thread");
        let end = stamps.iter().map(|s| s[n].1).max().expect("a thread");
        let rate = gb / (end - start).as_secs_f64();
        let (p, phase) = (n / 2, n % 2);
        if (p + phase) % 2 == 0 {
            o.push(rate)
        } else {
            b.push(rate)
        }
    }
    (o, b)
}

fn store(case: &Case) -> Result<TieredStore> {
    let capacity = case.threads as u64 * case.blocks * case.size;
    TieredStore::open(StoreConfig {
        host: HostTierConfig {
            slab_size: 16 << 20,
            ..HostTierConfig::new(capacity)
        },
        disk: None,
        object: None,
    })
    .context("creating the host arena")
}

/// The arena offset of every block of every thread (the baseline copies at these offsets).
fn slot_offsets(s: &TieredStore, ns: Namespace, case: &Case) -> Vec<Vec<u64>> {
    (0..case.threads)
        .map(|t| {
            (0..case.blocks)
                .map(|i| {
                    let lease = s.host().acquire(&key(ns, t, i)).expect("warm-up block");
                    let at = lease.offset();
                    s.host().release(lease);
                    at
                })
                .collect()
        })
        .collect()
}

fn put_gbps(case: &Case) -> Result<(f64, f64, f64)> {
    let size = case.size as usize;
    let ns = Namespace::builder("kvbench-put").build();
    let s = store(case)?;
    let src: Vec<Vec<u8>> = (0..case.threads).map(|t| vec![t as u8 + 1; size]).collect();
    // Warm-up: fill the arena once, so the timed phases are in the steady state where every put
    // evicts the least recently used block. Phase keys start after the warm-up's.
    for (t, data) in src.iter().enumerate() {
        for i in 0..case.blocks {
            s.put(&key(ns, t, i), data);
        }
    }
    let offsets = slot_offsets(&s, ns, case);
    let first = case.blocks;
    let ours = |t: usize, i: u64, _: &mut [u8]| {
        s.put(&key(ns, t, first + i), &src[t]);
    };
    let base = |t: usize, i: u64, _: &mut [u8]| {
        let at = offsets[t][(i % case.blocks) as usize];
        // SAFETY: baseline phases never overlap kvtier phases (the threads meet at a barrier
        // between phases), and each thread writes only the slots its own warm-up blocks were
        // given, which are disjoint; what the bytes then mean to the store does not matter here.
        unsafe { s.host().arena().write_at(at, &src[t]) };
    };
    let (o, b) = phases(case, &ours, &base);
    Ok(paired(&o, &b))
}

fn get_gbps(case: &Case) -> Result<(f64, f64, f64)> {
    let ns = Namespace::builder("kvbench-get").build();
    let s = store(case)?;
    let src = vec![7u8; case.size as usize];
    for t in 0..case.threads {
        for i in 0..case.blocks {
            s.put(&key(ns, t, i), &src);
        }
    }
    let offsets = slot_offsets(&s, ns, case);
    let ours = |t: usize, i: u64, buf: &mut [u8]| {
        let hit = s.get(&key(ns, t, i % case.blocks), buf);
        assert!(matches!(hit, Ok(Some(_))), "working set fits the arena");
    };
    let base = |t: usize, i: u64, buf: &mut [u8]| {
        let at = offsets[t][(i % case.blocks) as usize];
        // SAFETY: nothing writes the arena during the get benchmark (no puts, no evictions).
        unsafe { s.host().arena().read_at(at, buf) };
    };
    let (o, b) = phases(case, &ours, &base);
    Ok(paired(&o, &b))
}

/// Host arena rows: put and get for every size at 1 and 2 threads.
pub(crate) fn run(quick: bool, reps: usize) -> Result<Vec<Row>> {
    let working_set: u64 = if quick { 32 << 20 } else { 64 << 20 };
    let pairs = if quick { 4 * reps } else { 12 * reps };
    let mut rows = Vec::new();
    for threads in [1usize, 2] {
        for size in SIZES {
            let case = Case {
                size,
                threads,
                blocks: working_set / size,
                pairs,
            };
            eprintln!("host arena: {} KiB blocks, {threads} thread(s)", size >> 10);
            let (p, pb, pr) = put_gbps(&case)?;
            let t = threads.to_string();
            rows.push(Row::new(
                "host",
                "put",
                size,
                t.clone(),
                p,
                "memcpy",
                pb,
                pr,
                "every put evicts",
            ));
            let (g, gb, gr) = get_gbps(&case)?;
            rows.push(Row::new("host", "get", size, t, g, "memcpy", gb, gr, ""));
        }
    }
    Ok(rows)
}

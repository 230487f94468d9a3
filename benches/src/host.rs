//! Host arena put/get bandwidth against plain memcpy with the same sizes, threads and access
//! pattern.

use std::sync::{Arc, Barrier};
use std::time::Instant;

use anyhow::{Context, Result};
use kvstore::{
    BlockHash, BlockKey, HostArena, HostTierConfig, HugePages, Namespace, StoreConfig, TieredStore,
};

use crate::report::{Row, paired};

const SIZES: [u64; 4] = [64 << 10, 256 << 10, 1 << 20, 4 << 20];

/// Runs `per_thread(t)` on `threads` threads started together; returns the elapsed seconds.
fn timed(threads: usize, per_thread: impl Fn(usize) + Sync) -> f64 {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        for t in 0..threads {
            let barrier = &barrier;
            let per_thread = &per_thread;
            s.spawn(move || {
                barrier.wait();
                per_thread(t);
            });
        }
        barrier.wait();
        let start = Instant::now();
        // The scope joins every thread before returning.
        start
    })
    .elapsed()
    .as_secs_f64()
}

fn key(ns: Namespace, t: usize, i: u64) -> BlockKey {
    BlockKey::new(ns, BlockHash::from_u64(((t as u64) << 48) | i))
}

struct Case {
    size: u64,
    threads: usize,
    /// Blocks in each thread's working set (64 MiB: beyond the caches, so memory bandwidth).
    blocks: u64,
    /// Operations per thread per measurement.
    ops: u64,
}

fn store(case: &Case) -> Result<TieredStore> {
    let capacity = case.threads as u64 * case.blocks * case.size;
    TieredStore::open(StoreConfig {
        host: HostTierConfig {
            slab_size: 16 << 20,
            ..HostTierConfig::new(capacity)
        },
        disk: None,
    })
    .context("creating the host arena")
}

fn put_gbps(case: &Case, reps: usize) -> Result<(f64, f64, f64)> {
    let size = case.size as usize;
    let ns = Namespace::builder("kvbench-put").build();
    let s = store(case)?;
    let src: Vec<Vec<u8>> = (0..case.threads).map(|t| vec![t as u8 + 1; size]).collect();
    let regions = baseline_regions(case)?;
    // Touch the baseline regions as the warm-up below touches the arena.
    for r in &regions {
        for at in (0..r.len()).step_by(4096) {
            // SAFETY: in bounds; no other thread uses the region yet.
            unsafe { r.write_at(at, &[0]) };
        }
    }
    let bytes = (case.threads as u64 * case.ops * case.size) as f64;
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Warm-up: fill the arena once, so the timed runs are in the steady state (every put
    // evicts the least recently used block).
    timed(case.threads, |t| {
        for i in 0..case.blocks {
            s.put(&key(ns, t, i), &src[t]);
        }
    });
    counter.store(case.blocks, std::sync::atomic::Ordering::Relaxed);
    let ours = || {
        let first = counter.fetch_add(case.ops, std::sync::atomic::Ordering::Relaxed);
        bytes
            / timed(case.threads, |t| {
                for i in 0..case.ops {
                    s.put(&key(ns, t, first + i), &src[t]);
                }
            })
    };
    let base = || {
        bytes
            / timed(case.threads, |t| {
                for i in 0..case.ops {
                    let at = (i % case.blocks) * case.size;
                    // SAFETY: each thread writes only its own region.
                    unsafe { regions[t].write_at(at, &src[t]) };
                }
            })
    };
    let out = interleaved(reps, ours, base);
    drop(regions);
    Ok(out)
}

fn get_gbps(case: &Case, reps: usize) -> Result<(f64, f64, f64)> {
    let size = case.size as usize;
    let ns = Namespace::builder("kvbench-get").build();
    let s = store(case)?;
    let src = vec![7u8; size];
    let regions = baseline_regions(case)?;
    for r in &regions {
        for at in (0..r.len()).step_by(4096) {
            // SAFETY: in bounds; no other thread uses the region yet.
            unsafe { r.write_at(at, &[3]) };
        }
    }
    timed(case.threads, |t| {
        for i in 0..case.blocks {
            s.put(&key(ns, t, i), &src);
        }
    });
    let bytes = (case.threads as u64 * case.ops * case.size) as f64;
    let ours = || {
        bytes
            / timed(case.threads, |t| {
                let mut buf = vec![0u8; size];
                for i in 0..case.ops {
                    let hit = s.get(&key(ns, t, i % case.blocks), &mut buf);
                    assert!(matches!(hit, Ok(Some(_))), "working set fits the arena");
                }
                std::hint::black_box(&buf);
            })
    };
    let base = || {
        bytes
            / timed(case.threads, |t| {
                let mut buf = vec![0u8; size];
                for i in 0..case.ops {
                    let at = (i % case.blocks) * case.size;
                    // SAFETY: in bounds; nobody writes the region during the benchmark.
                    unsafe { regions[t].read_at(at, &mut buf) };
                    std::hint::black_box(&buf);
                }
            })
    };
    Ok(interleaved(reps, ours, base))
}

/// The baseline's memory: one memfd mapping per thread, the same kind of shared memory as the
/// arena, so the ratio measures kvtier's layer rather than a difference between memory types.
fn baseline_regions(case: &Case) -> Result<Vec<HostArena>> {
    (0..case.threads)
        .map(|_| {
            HostArena::create("kvbench-baseline", case.blocks * case.size, HugePages::Auto)
                .context("creating a baseline region")
        })
        .collect()
}

/// Alternates the two measurements `reps` times (swapping which goes first each time, so slow
/// drifts of the machine hit both alike); returns the medians in GB/s and the median ratio.
fn interleaved(reps: usize, mut ours: impl FnMut() -> f64, mut base: impl FnMut() -> f64) -> (f64, f64, f64) {
    let (mut o, mut b) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        if rep % 2 == 0 {
            o.push(ours() / 1e9);
            b.push(base() / 1e9);
        } else {
            b.push(base() / 1e9);
            o.push(ours() / 1e9);
        }
    }
    paired(&o, &b)
}

/// Host arena rows: put and get for every size at 1 and 2 threads.
pub(crate) fn run(quick: bool, reps: usize) -> Result<Vec<Row>> {
    let working_set: u64 = if quick { 32 << 20 } else { 64 << 20 };
    // Short measurements, many of them, interleaved: the median resists the machine's noise.
    let per_thread_bytes: u64 = if quick { 128 << 20 } else { 512 << 20 };
    let reps = reps * 4 + 1;
    let mut rows = Vec::new();
    for threads in [1usize, 2] {
        for size in SIZES {
            let case = Case {
                size,
                threads,
                blocks: working_set / size,
                ops: per_thread_bytes / size,
            };
            eprintln!("host arena: {} KiB blocks, {threads} thread(s)", size >> 10);
            let (p, pb, pr) = put_gbps(&case, reps)?;
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
            let (g, gb, gr) = get_gbps(&case, reps)?;
            rows.push(Row::new("host", "get", size, t, g, "memcpy", gb, gr, ""));
        }
    }
    Ok(rows)
}

//! The portable engine: positional reads and writes on a small thread pool.

use std::io;
use std::os::unix::fs::FileExt;

use rayon::prelude::*;

use super::engine::{AlignedBuf, BufferPool, Complete, Fill, IoEngine, IoKind, IoPlan, Plan};

/// pread/pwrite on `threads` worker threads (the queue depth).
#[derive(Debug)]
pub struct PsyncEngine {
    pool: rayon::ThreadPool,
    threads: usize,
    buffers: BufferPool,
}

impl PsyncEngine {
    /// A pool of `threads` I/O threads.
    pub fn new(threads: usize) -> io::Result<Self> {
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("kvtier-psync-{i}"))
            .build()
            .map_err(io::Error::other)?;
        Ok(Self {
            pool,
            threads,
            buffers: BufferPool::new(2 * threads),
        })
    }
}

fn one((plan, buf): &mut (IoPlan, AlignedBuf)) -> io::Result<()> {
    let len = plan.len;
    match plan.kind {
        IoKind::Read => plan
            .file
            .read_exact_at(&mut buf.as_mut_slice()[..len], plan.offset),
        IoKind::Write => plan.file.write_all_at(&buf.as_slice()[..len], plan.offset),
    }
}

impl IoEngine for PsyncEngine {
    fn name(&self) -> &'static str {
        "psync"
    }

    fn run(&self, n: usize, plan: &mut Plan<'_>, fill: &mut Fill<'_>, complete: &mut Complete<'_>) {
        // Waves of one operation per thread: the closures are not shareable across threads, so
        // filling and completion stay on the caller's thread.
        let mut start = 0;
        while start < n {
            let end = (start + self.threads).min(n);
            let mut ops: Vec<(IoPlan, AlignedBuf)> = (start..end)
                .map(|i| {
                    let p = plan(i);
                    let mut buf = self.buffers.take(p.len);
                    if p.kind == IoKind::Write {
                        fill(i, &mut buf.as_mut_slice()[..p.len]);
                    }
                    (p, buf)
                })
                .collect();
            let results: Vec<io::Result<()>> = if ops.len() == 1 {
                vec![one(&mut ops[0])]
            } else {
                self.pool.install(|| ops.par_iter_mut().map(one).collect())
            };
            for (i, ((p, buf), r)) in (start..end).zip(ops.into_iter().zip(results)) {
                complete(i, &buf.as_slice()[..p.len], r);
                self.buffers.give(buf);
            }
            start = end;
        }
    }
}

//! The portable engine: positional reads and writes on a small thread pool.

use std::io;
use std::os::unix::fs::FileExt;

use rayon::prelude::*;

use super::engine::{IoEngine, IoKind, IoOp};

/// pread/pwrite on `threads` worker threads (the queue depth).
#[derive(Debug)]
pub struct PsyncEngine {
    pool: rayon::ThreadPool,
    threads: usize,
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
        Ok(Self { pool, threads })
    }
}

fn one(op: &mut IoOp) -> io::Result<()> {
    let len = op.len;
    match op.kind {
        IoKind::Read => op
            .file
            .read_exact_at(&mut op.buf.as_mut_slice()[..len], op.offset),
        IoKind::Write => op.file.write_all_at(&op.buf.as_slice()[..len], op.offset),
    }
}

impl IoEngine for PsyncEngine {
    fn name(&self) -> &'static str {
        "psync"
    }

    fn run(
        &self,
        n: usize,
        prepare: &mut dyn FnMut(usize) -> IoOp,
        complete: &mut dyn FnMut(usize, IoOp, io::Result<()>),
    ) {
        // Waves of one operation per thread: the closures are not shareable across threads, so
        // preparation and completion stay on the caller's thread.
        let mut start = 0;
        while start < n {
            let end = (start + self.threads).min(n);
            let mut ops: Vec<IoOp> = (start..end).map(&mut *prepare).collect();
            let results: Vec<io::Result<()>> = if ops.len() == 1 {
                vec![one(&mut ops[0])]
            } else {
                self.pool.install(|| ops.par_iter_mut().map(one).collect())
            };
            for (i, (op, r)) in (start..end).zip(ops.into_iter().zip(results)) {
                complete(i, op, r);
            }
            start = end;
        }
    }
}

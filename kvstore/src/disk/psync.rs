//! The portable engine: positional reads and writes on a small thread pool.

use std::io;
use std::os::unix::fs::FileExt;

use rayon::prelude::*;

use super::engine::{IoEngine, IoKind, IoRequest};

/// pread/pwrite on `threads` worker threads (the queue depth).
#[derive(Debug)]
pub struct PsyncEngine {
    pool: rayon::ThreadPool,
}

impl PsyncEngine {
    /// A pool of `threads` I/O threads.
    pub fn new(threads: usize) -> io::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("kvtier-psync-{i}"))
            .build()
            .map_err(io::Error::other)?;
        Ok(Self { pool })
    }
}

fn one(req: &mut IoRequest<'_>) -> io::Result<()> {
    let len = req.len;
    match req.kind {
        IoKind::Read => req
            .file
            .read_exact_at(&mut req.buf.as_mut_slice()[..len], req.offset),
        IoKind::Write => req.file.write_all_at(&req.buf.as_slice()[..len], req.offset),
    }
}

impl IoEngine for PsyncEngine {
    fn name(&self) -> &'static str {
        "psync"
    }

    fn run(&self, reqs: &mut [IoRequest<'_>]) -> Vec<io::Result<()>> {
        if reqs.len() == 1 {
            return vec![one(&mut reqs[0])];
        }
        self.pool.install(|| reqs.par_iter_mut().map(one).collect())
    }
}

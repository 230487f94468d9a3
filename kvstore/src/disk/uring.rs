//! The io_uring engine: one submission carries a whole batch, up to the queue depth in flight.
//!
//! Rings are pooled: a caller takes a ring for its batch and returns it, so concurrent callers
//! never share a submission queue and need no lock while I/O is in flight.

use std::io;
use std::os::fd::AsRawFd;

use io_uring::{IoUring, opcode, types};
use parking_lot::Mutex;

use super::engine::{IoEngine, IoKind, IoRequest, short_transfer};

/// io_uring with `queue_depth` requests in flight per batch.
pub struct UringEngine {
    queue_depth: u32,
    rings: Mutex<Vec<IoUring>>,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("queue_depth", &self.queue_depth)
            .field("idle_rings", &self.rings.lock().len())
            .finish()
    }
}

impl UringEngine {
    /// Creates the engine, failing when the kernel refuses io_uring (old kernel, seccomp,
    /// `kernel.io_uring_disabled`).
    pub fn new(queue_depth: u32) -> io::Result<Self> {
        let queue_depth = queue_depth.clamp(1, 4096).next_power_of_two();
        let ring = IoUring::new(queue_depth)?;
        Ok(Self {
            queue_depth,
            rings: Mutex::new(vec![ring]),
        })
    }

    fn ring(&self) -> io::Result<IoUring> {
        if let Some(r) = self.rings.lock().pop() {
            return Ok(r);
        }
        IoUring::new(self.queue_depth)
    }

    fn sqe(req: &mut IoRequest<'_>, idx: usize, done: usize) -> io_uring::squeue::Entry {
        let fd = types::Fd(req.file.as_raw_fd());
        let remaining = (req.len - done) as u32;
        let ptr = req.buf.as_mut_slice()[done..].as_mut_ptr();
        let off = req.offset + done as u64;
        let e = match req.kind {
            IoKind::Read => opcode::Read::new(fd, ptr, remaining).offset(off).build(),
            IoKind::Write => opcode::Write::new(fd, ptr, remaining).offset(off).build(),
        };
        e.user_data(idx as u64)
    }

    fn run_on(&self, ring: &mut IoUring, reqs: &mut [IoRequest<'_>]) -> Vec<io::Result<()>> {
        let n = reqs.len();
        let mut results: Vec<Option<io::Result<()>>> = (0..n).map(|_| None).collect();
        let mut done = vec![0usize; n];
        let mut queue: std::collections::VecDeque<usize> = (0..n).collect();
        let mut in_flight = 0usize;
        let mut finished = 0usize;
        while finished < n {
            {
                let mut sq = ring.submission();
                while in_flight < self.queue_depth as usize {
                    let Some(i) = queue.pop_front() else { break };
                    let e = Self::sqe(&mut reqs[i], i, done[i]);
                    // SAFETY: the buffer and file referenced by the entry live in `reqs`, which
                    // is borrowed mutably until this function returns, and we do not return
                    // before every submitted entry has completed (the loop waits for them).
                    if unsafe { sq.push(&e) }.is_err() {
                        queue.push_front(i);
                        break;
                    }
                    in_flight += 1;
                }
            }
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    // The ring is unusable; fail what has not completed yet. Entries already in
                    // flight still reference our buffers, so drain them before returning.
                    while in_flight > 0 {
                        if ring.submit_and_wait(in_flight).is_err() {
                            break;
                        }
                        for cqe in ring.completion() {
                            let _ = cqe;
                            in_flight -= 1;
                        }
                    }
                    let kind = e.kind();
                    return results
                        .into_iter()
                        .map(|r| r.unwrap_or_else(|| Err(io::Error::new(kind, e.to_string()))))
                        .collect();
                }
            }
            let cqes: Vec<_> = ring.completion().map(|c| (c.user_data() as usize, c.result())).collect();
            for (i, res) in cqes {
                in_flight -= 1;
                if res == -libc::EAGAIN || res == -libc::EINTR {
                    queue.push_back(i);
                } else if res < 0 {
                    results[i] = Some(Err(io::Error::from_raw_os_error(-res)));
                    finished += 1;
                } else if res == 0 {
                    results[i] = Some(Err(short_transfer(reqs[i].kind, done[i], reqs[i].len)));
                    finished += 1;
                } else {
                    done[i] += res as usize;
                    if done[i] >= reqs[i].len {
                        results[i] = Some(Ok(()));
                        finished += 1;
                    } else {
                        queue.push_back(i);
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(io::Error::other("request not completed"))))
            .collect()
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn run(&self, reqs: &mut [IoRequest<'_>]) -> Vec<io::Result<()>> {
        let mut ring = match self.ring() {
            Ok(r) => r,
            Err(e) => {
                return reqs
                    .iter()
                    .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
                    .collect();
            }
        };
        let out = self.run_on(&mut ring, reqs);
        self.rings.lock().push(ring);
        out
    }
}

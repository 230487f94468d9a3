//! The io_uring engine: operations stream into the submission queue as they are prepared, up to
//! the queue depth in flight, and complete as the kernel finishes them.
//!
//! Rings are pooled: a caller takes a ring for its batch and returns it, so concurrent callers
//! never share a submission queue and need no lock while I/O is in flight.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{IoUring, opcode, types};
use parking_lot::Mutex;

use super::engine::{AlignedBuf, IO_ALIGN, IoEngine, IoKind, IoOp, short_transfer};

/// io_uring with `queue_depth` operations in flight per batch.
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

struct InFlight {
    op: IoOp,
    done: usize,
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

    fn sqe(f: &mut InFlight, idx: usize) -> io_uring::squeue::Entry {
        let fd = types::Fd(f.op.file.as_raw_fd());
        let remaining = (f.op.len - f.done) as u32;
        let ptr = f.op.buf.as_mut_slice()[f.done..].as_mut_ptr();
        let off = f.op.offset + f.done as u64;
        let e = match f.op.kind {
            IoKind::Read => opcode::Read::new(fd, ptr, remaining).offset(off).build(),
            IoKind::Write => opcode::Write::new(fd, ptr, remaining).offset(off).build(),
        };
        e.user_data(idx as u64)
    }

    /// Returns `Err` only when the ring itself failed; every operation in flight has completed
    /// (or been drained) by then, so no buffer is still referenced by the kernel.
    fn run_on(
        &self,
        ring: &mut IoUring,
        n: usize,
        prepare: &mut dyn FnMut(usize) -> IoOp,
        complete: &mut dyn FnMut(usize, IoOp, io::Result<()>),
    ) -> io::Result<()> {
        let qd = self.queue_depth as usize;
        let mut slots: Vec<Option<InFlight>> = (0..n).map(|_| None).collect();
        let mut resubmit: VecDeque<usize> = VecDeque::new();
        let mut next = 0usize;
        let mut in_flight = 0usize;
        let mut finished = 0usize;
        while finished < n {
            // Fill the queue: retries first, then newly prepared operations, each submitted at
            // once so its I/O overlaps the preparation of the next.
            while in_flight < qd {
                let idx = match resubmit.pop_front() {
                    Some(i) => i,
                    None if next < n => {
                        slots[next] = Some(InFlight {
                            op: prepare(next),
                            done: 0,
                        });
                        next += 1;
                        next - 1
                    }
                    None => break,
                };
                let f = slots[idx].as_mut().expect("prepared");
                let e = Self::sqe(f, idx);
                // SAFETY: the entry points into `slots[idx]`'s buffer and file, which stay
                // alive and unmoved (the AlignedBuf's heap allocation does not move with the
                // struct) until its completion is reaped below; `run_on` never returns while
                // entries are in flight.
                if unsafe { ring.submission().push(&e) }.is_err() {
                    resubmit.push_front(idx);
                    break;
                }
                in_flight += 1;
                let more = next < n && in_flight < qd;
                if more
                    && let Err(e) = ring.submit()
                    && !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY))
                {
                    return Err(Self::fail(ring, in_flight, &mut slots, complete, e));
                }
            }
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
                Err(e) => return Err(Self::fail(ring, in_flight, &mut slots, complete, e)),
            }
            let cqes: Vec<(usize, i32)> = ring
                .completion()
                .map(|c| (c.user_data() as usize, c.result()))
                .collect();
            for (i, res) in cqes {
                in_flight -= 1;
                let f = slots[i].as_mut().expect("in flight");
                let outcome = if res == -libc::EAGAIN || res == -libc::EINTR {
                    None
                } else if res < 0 {
                    Some(Err(io::Error::from_raw_os_error(-res)))
                } else if res == 0 {
                    Some(Err(short_transfer(f.op.kind, f.done, f.op.len)))
                } else {
                    f.done += res as usize;
                    (f.done >= f.op.len).then_some(Ok(()))
                };
                match outcome {
                    None => resubmit.push_back(i),
                    Some(r) => {
                        let f = slots[i].take().expect("in flight");
                        finished += 1;
                        complete(i, f.op, r);
                    }
                }
            }
        }
        Ok(())
    }

    /// The ring failed: wait for what is in flight, then complete every prepared operation
    /// with the error. If the kernel cannot even be waited on, the buffers it may still write
    /// are leaked rather than reused.
    fn fail(
        ring: &mut IoUring,
        mut in_flight: usize,
        slots: &mut [Option<InFlight>],
        complete: &mut dyn FnMut(usize, IoOp, io::Result<()>),
        err: io::Error,
    ) -> io::Error {
        while in_flight > 0 && ring.submit_and_wait(1).is_ok() {
            in_flight -= ring.completion().count().min(in_flight);
        }
        for (i, s) in slots.iter_mut().enumerate() {
            if let Some(mut f) = s.take() {
                if in_flight > 0 {
                    std::mem::forget(std::mem::replace(&mut f.op.buf, AlignedBuf::new(IO_ALIGN)));
                }
                complete(i, f.op, Err(io::Error::new(err.kind(), err.to_string())));
            }
        }
        err
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn run(
        &self,
        n: usize,
        prepare: &mut dyn FnMut(usize) -> IoOp,
        complete: &mut dyn FnMut(usize, IoOp, io::Result<()>),
    ) {
        let mut ring = match self.ring() {
            Ok(r) => r,
            Err(e) => {
                for i in 0..n {
                    let op = prepare(i);
                    complete(i, op, Err(io::Error::new(e.kind(), e.to_string())));
                }
                return;
            }
        };
        match self.run_on(&mut ring, n, prepare, complete) {
            Ok(()) => self.rings.lock().push(ring),
            Err(e) => tracing::warn!(error = %e, "io_uring ring failed; discarding it"),
        }
    }
}

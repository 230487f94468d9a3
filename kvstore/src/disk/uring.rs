//! The io_uring engine: operations stream into the submission queue as they are filled, up to
//! the queue depth in flight, and complete as the kernel finishes them.
//!
//! Each ring owns one I/O buffer per queue slot and registers it with the kernel (a sparse fixed
//! buffer table), so reads and writes use `READ_FIXED`/`WRITE_FIXED` and the kernel does not pin
//! and unpin the buffer's pages on every operation — measured with fio on this tier's kind of
//! workload, that is a third to two thirds less system CPU per byte. Buffers grow to the largest
//! record seen and stay with their ring. Where registration is refused (RLIMIT_MEMLOCK without
//! CAP_IPC_LOCK, old kernels) the same buffers are used with plain `READ`/`WRITE`.
//!
//! Rings are pooled: a caller takes a ring for its batch and returns it, so concurrent callers
//! never share a submission queue or buffers and need no lock while I/O is in flight.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Once;

use io_uring::{IoUring, opcode, types};
use parking_lot::Mutex;

use super::engine::{AlignedBuf, Complete, Fill, IO_ALIGN, IoEngine, IoKind, IoPlan, Plan, short_transfer};

/// Bytes of queued operations after which they are submitted without waiting for the queue to
/// fill: large enough to amortize the system call over small blocks, small enough that the device
/// starts on a large block while the next one is being copied.
const SUBMIT_BYTES: usize = 256 << 10;

/// Buffers grow in steps of this size, so records of slightly different lengths share them.
const BUF_GRANULE: usize = 64 << 10;

/// Buffers larger than this are given back after each batch rather than kept with the ring, so
/// an occasional huge block does not pin `queue_depth` huge buffers for good.
const RETAIN_MAX: usize = (8 << 20) + BUF_GRANULE;

/// A ring with its buffers. Field order matters: the ring is dropped (and its registrations
/// released by the kernel) before the buffers it references are freed.
struct Ring {
    ring: IoUring,
    /// One buffer per queue slot; `bufs[i]` is fixed buffer `i` when `registered[i]`.
    bufs: Vec<AlignedBuf>,
    registered: Vec<bool>,
    /// Buffers replaced while their registration could not be withdrawn; freed with the ring.
    retired: Vec<AlignedBuf>,
    fixed: bool,
}

impl Ring {
    fn new(queue_depth: u32) -> io::Result<Self> {
        let ring = IoUring::new(queue_depth)?;
        let fixed = match ring.submitter().register_buffers_sparse(queue_depth) {
            Ok(()) => true,
            Err(e) => {
                static ONCE: Once = Once::new();
                ONCE.call_once(|| tracing::info!(error = %e, "io_uring fixed buffers unavailable; using plain reads and writes"));
                false
            }
        };
        let n = queue_depth as usize;
        Ok(Self {
            ring,
            bufs: (0..n).map(|_| AlignedBuf::new(IO_ALIGN)).collect(),
            registered: vec![false; n],
            retired: Vec::new(),
            fixed,
        })
    }

    /// Makes buffer `slot` at least `len` bytes and registered when possible.
    fn prepare_slot(&mut self, slot: usize, len: usize) {
        let grow = self.bufs[slot].capacity() < len;
        let mut retired_old = false;
        if grow {
            let new = AlignedBuf::new(len.div_ceil(BUF_GRANULE) * BUF_GRANULE);
            let old = std::mem::replace(&mut self.bufs[slot], new);
            if self.registered[slot] {
                // Registering the new buffer below replaces the old entry; if that fails the
                // kernel may still reference the old memory, so keep it alive.
                self.retired.push(old);
                retired_old = true;
            }
            self.registered[slot] = false;
        }
        if self.fixed && !self.registered[slot] {
            // SAFETY: the buffer lives in `self.bufs[slot]` until it is replaced (then retired or
            // re-registered first) or until the ring is dropped, which happens before `bufs`
            // (field order); the kernel thus never holds a registration of freed memory.
            match unsafe { register(&self.ring, slot, &mut self.bufs[slot]) } {
                Ok(()) => {
                    self.registered[slot] = true;
                    if retired_old {
                        // The old buffer's registration was replaced: it can go.
                        self.retired.pop();
                    }
                }
                Err(e) => {
                    static ONCE: Once = Once::new();
                    ONCE.call_once(|| tracing::info!(error = %e, "io_uring buffer registration refused; using plain reads and writes"));
                }
            }
        }
    }

    /// Gives back buffers above [`RETAIN_MAX`] (between batches, when none is in flight).
    fn shrink(&mut self) {
        for slot in 0..self.bufs.len() {
            if self.bufs[slot].capacity() <= RETAIN_MAX {
                continue;
            }
            let mut small = AlignedBuf::new(IO_ALIGN);
            // SAFETY: as in `prepare_slot`: `small` is stored in `bufs[slot]` right below and
            // lives until replaced or the ring is dropped; the large buffer is freed only after
            // the kernel's entry no longer refers to it.
            if self.registered[slot] && unsafe { register(&self.ring, slot, &mut small) }.is_err() {
                continue;
            }
            self.bufs[slot] = small;
        }
    }

    fn sqe(&mut self, slot: usize, plan: &IoPlan, done: usize, idx: usize) -> io_uring::squeue::Entry {
        let fd = types::Fd(plan.file.as_raw_fd());
        let remaining = (plan.len - done) as u32;
        let ptr = self.bufs[slot].as_mut_slice()[done..].as_mut_ptr();
        let off = plan.offset + done as u64;
        let fixed = self.registered[slot];
        let e = match (plan.kind, fixed) {
            (IoKind::Read, true) => opcode::ReadFixed::new(fd, ptr, remaining, slot as u16)
                .offset(off)
                .build(),
            (IoKind::Write, true) => opcode::WriteFixed::new(fd, ptr, remaining, slot as u16)
                .offset(off)
                .build(),
            (IoKind::Read, false) => opcode::Read::new(fd, ptr, remaining).offset(off).build(),
            (IoKind::Write, false) => opcode::Write::new(fd, ptr, remaining).offset(off).build(),
        };
        e.user_data(idx as u64)
    }
}

/// Registers `buf` as fixed buffer `slot` of `ring`, replacing what was registered there.
///
/// # Safety
/// `buf`'s allocation must stay alive until the entry is replaced again or the ring is dropped.
unsafe fn register(ring: &IoUring, slot: usize, buf: &mut AlignedBuf) -> io::Result<()> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.capacity(),
    };
    // SAFETY: `iov` describes a live allocation that the caller keeps alive as required.
    unsafe {
        ring.submitter()
            .register_buffers_update(slot as u32, &[iov], None)
    }
}

/// io_uring with `queue_depth` operations in flight per batch.
pub struct UringEngine {
    queue_depth: u32,
    rings: Mutex<Vec<Ring>>,
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
    plan: IoPlan,
    slot: usize,
    done: usize,
}

impl UringEngine {
    /// Creates the engine, failing when the kernel refuses io_uring (old kernel, seccomp,
    /// `kernel.io_uring_disabled`).
    pub fn new(queue_depth: u32) -> io::Result<Self> {
        let queue_depth = queue_depth.clamp(1, 1024).next_power_of_two();
        let ring = Ring::new(queue_depth)?;
        Ok(Self {
            queue_depth,
            rings: Mutex::new(vec![ring]),
        })
    }

    /// Whether the first ring could register fixed buffers.
    pub fn fixed_buffers(&self) -> bool {
        self.rings.lock().first().is_some_and(|r| r.fixed)
    }

    fn ring(&self) -> io::Result<Ring> {
        if let Some(r) = self.rings.lock().pop() {
            return Ok(r);
        }
        Ring::new(self.queue_depth)
    }

    /// Returns `Err` only when the ring itself failed; every planned operation has been
    /// completed by then.
    fn run_on(
        &self,
        ring: &mut Ring,
        n: usize,
        plan: &mut Plan<'_>,
        fill: &mut Fill<'_>,
        complete: &mut Complete<'_>,
    ) -> io::Result<()> {
        let qd = self.queue_depth as usize;
        let mut ops: Vec<Option<InFlight>> = (0..n).map(|_| None).collect();
        let mut free_slots: Vec<usize> = (0..qd).rev().collect();
        let mut resubmit: VecDeque<usize> = VecDeque::new();
        let (mut next, mut finished, mut unsubmitted) = (0usize, 0usize, 0usize);
        // Owns the ring while operations are in flight: if a callback panics, unwinding waits for
        // the kernel before the buffers can be freed or reused.
        let mut g = InFlightGuard {
            r: ring,
            in_flight: 0,
        };
        while finished < n {
            // Fill the queue: retries first, then new operations, submitted early so their I/O
            // overlaps the filling of the next buffers.
            while g.in_flight < qd {
                let idx = match resubmit.pop_front() {
                    Some(i) => i,
                    None if next < n => {
                        let p = plan(next);
                        let slot = free_slots.pop().expect("a free slot per operation in flight");
                        g.r.prepare_slot(slot, p.len);
                        if p.kind == IoKind::Write {
                            fill(next, &mut g.r.bufs[slot].as_mut_slice()[..p.len]);
                        }
                        ops[next] = Some(InFlight {
                            plan: p,
                            slot,
                            done: 0,
                        });
                        next += 1;
                        next - 1
                    }
                    None => break,
                };
                let f = ops[idx].as_ref().expect("planned");
                let e = g.r.sqe(f.slot, &f.plan, f.done, idx);
                // SAFETY: the entry points into the ring's own buffer `f.slot`, which is neither
                // reused nor freed until this operation's completion is reaped below (its slot
                // returns to `free_slots` only then), and `run_on` does not return while
                // operations are in flight; the file is kept open by `ops[idx].plan`.
                if unsafe { g.r.ring.submission().push(&e) }.is_err() {
                    resubmit.push_front(idx);
                    break;
                }
                g.in_flight += 1;
                unsubmitted += f.plan.len - f.done;
                let more = next < n && g.in_flight < qd;
                if more && unsubmitted >= SUBMIT_BYTES {
                    unsubmitted = 0;
                    if let Err(e) = g.r.ring.submit()
                        && !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY))
                    {
                        return Err(Self::fail(&mut g, &mut ops, complete, e));
                    }
                }
            }
            unsubmitted = 0;
            match g.r.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
                Err(e) => return Err(Self::fail(&mut g, &mut ops, complete, e)),
            }
            let cqes: Vec<(usize, i32)> =
                g.r.ring
                    .completion()
                    .map(|c| (c.user_data() as usize, c.result()))
                    .collect();
            // Reaped: no longer in the kernel's hands, even if a callback below panics.
            g.in_flight -= cqes.len();
            for (i, res) in cqes {
                let f = ops[i].as_mut().expect("in flight");
                let outcome = if res == -libc::EAGAIN || res == -libc::EINTR {
                    None
                } else if res < 0 {
                    Some(Err(io::Error::from_raw_os_error(-res)))
                } else if res == 0 {
                    Some(Err(short_transfer(f.plan.kind, f.done, f.plan.len)))
                } else {
                    f.done += res as usize;
                    (f.done >= f.plan.len).then_some(Ok(()))
                };
                match outcome {
                    None => resubmit.push_back(i),
                    Some(result) => {
                        let f = ops[i].take().expect("in flight");
                        finished += 1;
                        complete(i, &g.r.bufs[f.slot].as_slice()[..f.plan.len], result);
                        free_slots.push(f.slot);
                    }
                }
            }
        }
        Ok(())
    }

    /// The ring failed: wait for what is in flight, then complete every planned operation with
    /// the error. If the kernel cannot even be waited on, the ring's buffers are leaked rather
    /// than freed under it.
    fn fail(
        g: &mut InFlightGuard<'_>,
        ops: &mut [Option<InFlight>],
        complete: &mut Complete<'_>,
        err: io::Error,
    ) -> io::Error {
        g.drain();
        for (i, op) in ops.iter_mut().enumerate() {
            if op.take().is_some() {
                complete(i, &[], Err(io::Error::new(err.kind(), err.to_string())));
            }
        }
        err
    }
}

/// Operations in flight on a ring. Dropped with operations still in flight (a callback
/// panicked, or the ring failed), it waits for them, and leaks the ring's buffers if even that
/// fails, so the kernel never writes into memory that was freed or handed out again.
struct InFlightGuard<'r> {
    r: &'r mut Ring,
    in_flight: usize,
}

impl InFlightGuard<'_> {
    fn drain(&mut self) {
        while self.in_flight > 0 && self.r.ring.submit_and_wait(1).is_ok() {
            self.in_flight -= self.r.ring.completion().count().min(self.in_flight);
        }
        if self.in_flight > 0 {
            for b in self.r.bufs.iter_mut() {
                std::mem::forget(std::mem::replace(b, AlignedBuf::new(IO_ALIGN)));
            }
            // The leaked buffers may still be registered; nothing may use this ring again.
            self.r.registered.fill(false);
            self.r.fixed = false;
            self.in_flight = 0;
        }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.drain();
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn describe(&self) -> String {
        if self.fixed_buffers() {
            "io_uring (fixed buffers)".into()
        } else {
            "io_uring".into()
        }
    }

    fn run(&self, n: usize, plan: &mut Plan<'_>, fill: &mut Fill<'_>, complete: &mut Complete<'_>) {
        let mut ring = match self.ring() {
            Ok(r) => r,
            Err(e) => {
                for i in 0..n {
                    let _ = plan(i);
                    complete(i, &[], Err(io::Error::new(e.kind(), e.to_string())));
                }
                return;
            }
        };
        match self.run_on(&mut ring, n, plan, fill, complete) {
            Ok(()) => {
                ring.shrink();
                self.rings.lock().push(ring);
            }
            Err(e) => tracing::warn!(error = %e, "io_uring ring failed; discarding it"),
        }
    }
}

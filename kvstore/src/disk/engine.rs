//! The I/O engine boundary of the disk tier: batches of aligned reads and writes at file offsets.
//!
//! Two engines: io_uring (default on Linux; several requests in flight from one submission) and
//! a pread/pwrite thread pool for kernels or sandboxes without io_uring, or filesystems without
//! O_DIRECT (tmpfs on old kernels). The tier picks one at open and logs the choice.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use parking_lot::Mutex;

/// Alignment of buffers, offsets and lengths under O_DIRECT.
pub const IO_ALIGN: usize = 4096;

/// Direction of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Fill the buffer from the file.
    Read,
    /// Write the buffer to the file.
    Write,
}

/// One aligned transfer: `len` bytes at `offset` of `file`.
#[derive(Debug, Clone)]
pub struct IoPlan {
    /// The slab file.
    pub file: Arc<File>,
    /// Byte offset in the file (a multiple of [`IO_ALIGN`]).
    pub offset: u64,
    /// Bytes to transfer (a multiple of [`IO_ALIGN`]).
    pub len: usize,
    /// Read or write.
    pub kind: IoKind,
}

/// Plans operation `i` of a batch.
pub type Plan<'a> = dyn FnMut(usize) -> IoPlan + 'a;
/// Writes the bytes operation `i` sends into its buffer.
pub type Fill<'a> = dyn FnMut(usize, &mut [u8]) + 'a;
/// Receives operation `i`'s buffer and result when it finishes.
pub type Complete<'a> = dyn FnMut(usize, &[u8], io::Result<()>) + 'a;

/// Executes batches of transfers through buffers the engine owns (so it can register them with
/// the kernel), streaming: operation `i` is planned and filled just before it is submitted and
/// completed as soon as it finishes, so copies and checksums overlap the I/O in flight.
pub trait IoEngine: Send + Sync + Debug {
    /// Short name for logs and benchmarks (`io_uring`, `psync`).
    fn name(&self) -> &'static str;
    /// The name plus the options in effect (e.g. fixed buffers), for logs and benchmarks.
    fn describe(&self) -> String {
        self.name().to_owned()
    }
    /// Runs operations `0..n`. For each: `plan(i)` says what to transfer; for a write,
    /// `fill(i, buf)` writes the `len` bytes to send; `complete(i, buf, result)` receives the
    /// buffer afterwards (for a read, the bytes read), in completion order. Every planned
    /// operation is completed exactly once before `run` returns. A short transfer is an error.
    fn run(&self, n: usize, plan: &mut Plan<'_>, fill: &mut Fill<'_>, complete: &mut Complete<'_>);
}

/// A zeroed heap buffer aligned to [`IO_ALIGN`], as O_DIRECT requires.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
}

impl AlignedBuf {
    /// Allocates `cap` bytes, rounded up to [`IO_ALIGN`].
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1).div_ceil(IO_ALIGN) * IO_ALIGN;
        let layout = Layout::from_size_align(cap, IO_ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, cap }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Raw pointer for the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of `cap` initialized (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
    }

    /// The whole buffer, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, IO_ALIGN).expect("valid layout");
        // SAFETY: allocated in `new` with this exact layout and not freed before.
        unsafe { dealloc(self.ptr.as_ptr(), layout) };
    }
}

// SAFETY: AlignedBuf exclusively owns its allocation (like a Box<[u8]>); moving it to another
// thread moves that ownership.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only permit reads of the owned bytes.
unsafe impl Sync for AlignedBuf {}

/// Recycles I/O buffers so steady-state I/O allocates nothing.
#[derive(Debug)]
pub struct BufferPool {
    bufs: Mutex<Vec<AlignedBuf>>,
    keep: usize,
}

impl BufferPool {
    /// A pool that keeps at most `keep` idle buffers.
    pub fn new(keep: usize) -> Self {
        Self {
            bufs: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// A buffer of at least `len` bytes.
    pub fn take(&self, len: usize) -> AlignedBuf {
        let mut bufs = self.bufs.lock();
        if let Some(i) = bufs.iter().position(|b| b.capacity() >= len) {
            return bufs.swap_remove(i);
        }
        drop(bufs);
        AlignedBuf::new(len)
    }

    /// Returns a buffer for reuse.
    pub fn give(&self, buf: AlignedBuf) {
        let mut bufs = self.bufs.lock();
        if bufs.len() < self.keep {
            bufs.push(buf);
        } else if let Some(smallest) = bufs.iter_mut().min_by_key(|b| b.capacity()) {
            if smallest.capacity() < buf.capacity() {
                *smallest = buf;
            }
        }
    }
}

pub(crate) fn short_transfer(kind: IoKind, done: usize, want: usize) -> io::Error {
    io::Error::new(
        if kind == IoKind::Read {
            io::ErrorKind::UnexpectedEof
        } else {
            io::ErrorKind::WriteZero
        },
        format!("short {kind:?}: {done} of {want} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;

    /// The contract every engine meets, run against each one.
    fn conformance(engine: &dyn IoEngine, direct: bool) {
        // Under the build directory, not /tmp: O_DIRECT needs a real filesystem.
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-tmp");
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::tempdir_in(base).unwrap();
        let mut o = OpenOptions::new();
        o.read(true).write(true).create(true).truncate(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = Arc::new(o.open(dir.path().join("f")).unwrap());
        file.set_len(64 << 20).unwrap();
        // Growing sizes, so ring buffers are replaced and re-registered along the way.
        let lens: Vec<usize> = (0..40).map(|i| IO_ALIGN * (1 + (i * 37) % 300)).collect();
        let offsets: Vec<u64> = lens
            .iter()
            .scan(0u64, |at, &l| {
                let o = *at;
                *at += l as u64;
                Some(o)
            })
            .collect();
        let plan = |i: usize, kind| IoPlan {
            file: Arc::clone(&file),
            offset: offsets[i],
            len: lens[i],
            kind,
        };
        let mut done = vec![false; lens.len()];
        engine.run(
            lens.len(),
            &mut |i| plan(i, IoKind::Write),
            &mut |i, b| {
                assert_eq!(b.len(), lens[i]);
                b.fill(i as u8 + 1);
            },
            &mut |i, _, r| {
                r.unwrap();
                assert!(!done[i], "completed twice");
                done[i] = true;
            },
        );
        assert!(done.iter().all(|d| *d));
        let mut seen = 0;
        engine.run(
            lens.len(),
            &mut |i| plan(i, IoKind::Read),
            &mut |_, _| panic!("reads are not filled"),
            &mut |i, b, r| {
                r.unwrap();
                assert!(
                    b.len() == lens[i] && b.iter().all(|&x| x == i as u8 + 1),
                    "op {i}"
                );
                seen += 1;
            },
        );
        assert_eq!(seen, lens.len());
        // Reading past the end of the file is a short transfer: an error, not garbage.
        let mut errors = 0;
        engine.run(
            1,
            &mut |_| IoPlan {
                file: Arc::clone(&file),
                offset: 64 << 20,
                len: IO_ALIGN,
                kind: IoKind::Read,
            },
            &mut |_, _| {},
            &mut |_, _, r| errors += usize::from(r.is_err()),
        );
        assert_eq!(errors, 1);
    }

    #[test]
    fn psync_engine_meets_the_contract() {
        conformance(&super::super::psync::PsyncEngine::new(4).unwrap(), false);
    }

    #[cfg(all(target_os = "linux", feature = "io-uring"))]
    #[test]
    fn a_panicking_callback_leaves_no_io_in_flight() {
        let e = super::super::uring::UringEngine::new(8).unwrap();
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-tmp");
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::tempdir_in(base).unwrap();
        let path = dir.path().join("f");
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .unwrap(),
        );
        file.set_len(8 << 20).unwrap();
        let read = |i: usize| IoPlan {
            file: Arc::clone(&file),
            offset: (i * (1 << 20)) as u64,
            len: 1 << 20,
            kind: IoKind::Read,
        };
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            e.run(8, &mut |i| read(i), &mut |_, _| {}, &mut |_, _, _| {
                panic!("caller bug")
            });
        }));
        assert!(panicked.is_err());
        // The engine goes on working (with a fresh ring).
        let mut ok = 0;
        e.run(8, &mut |i| read(i), &mut |_, _| {}, &mut |_, b, r| {
            r.unwrap();
            assert!(b.iter().all(|&x| x == 0));
            ok += 1;
        });
        assert_eq!(ok, 8);
    }

    #[cfg(all(target_os = "linux", feature = "io-uring"))]
    #[test]
    fn io_uring_engine_meets_the_contract_with_fixed_buffers() {
        let e = super::super::uring::UringEngine::new(8).expect("io_uring is available on this kernel");
        conformance(&e, true);
        assert!(e.fixed_buffers(), "root may register fixed buffers");
        assert_eq!(e.describe(), "io_uring (fixed buffers)");
    }
}

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

/// One aligned transfer between `buf[..len]` and `file` at `offset`. The operation owns its
/// buffer while in flight and hands it back on completion, so no borrow outlives the I/O.
#[derive(Debug)]
pub struct IoOp {
    /// The slab file.
    pub file: Arc<File>,
    /// Byte offset in the file (a multiple of [`IO_ALIGN`]).
    pub offset: u64,
    /// The buffer.
    pub buf: AlignedBuf,
    /// Bytes to transfer (a multiple of [`IO_ALIGN`], at most `buf.capacity()`).
    pub len: usize,
    /// Read or write.
    pub kind: IoKind,
}

/// Executes batches of operations, streaming: operation `i` is prepared just before it is
/// submitted and completed as soon as it finishes, so filling and draining buffers (copies,
/// checksums) overlaps the I/O of the other operations in flight.
pub trait IoEngine: Send + Sync + Debug {
    /// Short name for logs and benchmarks (`io_uring`, `psync`).
    fn name(&self) -> &'static str;
    /// Runs operations `0..n`: `prepare(i)` builds operation `i`, `complete(i, op, result)`
    /// receives it back, in completion order. Every prepared operation is completed exactly
    /// once before `run` returns. A short transfer is an error.
    fn run(
        &self,
        n: usize,
        prepare: &mut dyn FnMut(usize) -> IoOp,
        complete: &mut dyn FnMut(usize, IoOp, io::Result<()>),
    );
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

/// Recycles bounce buffers so steady-state I/O allocates nothing.
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

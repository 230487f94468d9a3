//! The CUDA engine: the driver API through `cudarc`, with libcuda loaded at run time.
//!
//! **How pages move.** A batch becomes a list of contiguous pieces ([`plan_pieces`]); one launch
//! of a small copy kernel (`copy_pieces.cu`, shipped as PTX that the driver compiles for its GPU)
//! copies them all, its threads reading device memory and writing the registered arena straight
//! over PCIe, or the other way round. vLLM's pages are small (16 tokens × heads × head size:
//! 16–64 KiB) and a block has one per layer, so one `cuMemcpyAsync` per page would cost a call
//! and a DMA setup per few KiB; torch's per-block copies reach a ninth of the link at 64 KiB on
//! an H200 (`benches/gpu/README.md`). The driver's batched copy (`cuMemcpyBatchAsync`) would also
//! avoid that, but only from CUDA 12.8 drivers; the kernel runs on any driver that can JIT PTX
//! ISA 7.0 (R450 on) and takes a whole batch in one launch. It uses at most one thread block per
//! SM for the length of the copy. Where the kernel cannot be loaded or the arena is not
//! registered, pieces go one `cuMemcpyAsync` each (correct, slower).
//!
//! **Ordering.** Copies run on the engine's own non-blocking stream: an event recorded on the
//! caller's stream orders them after the work queued there (the attention that wrote a layer);
//! a load makes the caller's stream wait for its done-event, so later kernels read loaded pages
//! without the host waiting. The done-event is the [`Fence`].
//!
//! **Guarding the entry.** `cudarc` panics when libcuda or one of its symbols is missing, so
//! [`CudaEngine::open`] looks for the library and every symbol it will call first, and reports
//! each gap as [`DeviceError::Unavailable`].

use std::ffi::{CStr, c_void};
use std::sync::Arc;

use cudarc::driver::sys::{
    self, CUcontext, CUdevice, CUdeviceptr, CUevent, CUfunction, CUmodule, CUresult, CUstream,
};
use parking_lot::Mutex;

use super::{Backend, Completion, CopyEngine, CopyJob, Device, DeviceError, Direction, Fence, plan_pieces};
use crate::pages::LayerPages;

/// The copy kernel, compiled from `copy_pieces.cu` by `ptx.py`.
const PTX: &str = concat!(include_str!("copy_pieces.ptx"), "\0");
/// Longest piece one thread block copies: enough to amortise fetching the piece, short enough to
/// spread a batch of large blocks over the SMs.
const MAX_PIECE: usize = 256 << 10;
/// Threads per thread block of the copy kernel.
const THREADS: u32 = 512;

/// Every driver function this engine calls, checked before the first call.
const SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxSetCurrent",
    "cuStreamCreate",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
    "cuMemHostRegister_v2",
    "cuMemHostUnregister",
    "cuMemHostGetDevicePointer_v2",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemcpyAsync",
    "cuMemcpyHtoDAsync_v2",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuLaunchKernel",
    "cuGetErrorName",
];

fn unavailable(reason: impl Into<String>) -> DeviceError {
    DeviceError::Unavailable {
        backend: Backend::Cuda,
        reason: reason.into(),
    }
}

fn error_name(r: CUresult) -> String {
    let mut s: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: `cuGetErrorName` was found in the library (checked at open) and writes a pointer to
    // a static string, or leaves it null for a code it does not know.
    let ok = unsafe { sys::cuGetErrorName(r, &mut s) } == CUresult::CUDA_SUCCESS;
    if ok && !s.is_null() {
        // SAFETY: the driver's names are NUL-terminated static strings.
        unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
    } else {
        format!("{r:?}")
    }
}

fn check(call: &'static str, r: CUresult) -> Result<(), DeviceError> {
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(DeviceError::Call {
            backend: Backend::Cuda,
            call,
            code: error_name(r),
        })
    }
}

/// Finds libcuda and every driver function this engine calls; the reason if something is
/// missing.
pub fn library() -> Result<(), DeviceError> {
    // SAFETY: loading libcuda runs its initialisers, which is what using CUDA means; no symbol
    // is called here.
    if !unsafe { sys::is_culib_present() } {
        return Err(unavailable(
            "libcuda.so.1 not found (no NVIDIA driver on this machine)",
        ));
    }
    // SAFETY: present (checked above), so `culib` does not panic; looking up a symbol calls nothing.
    let lib = unsafe { sys::culib() };
    for name in SYMBOLS {
        // SAFETY: only the symbol's address is looked up.
        if unsafe { lib.get::<*const c_void>(name.as_bytes()) }.is_err() {
            return Err(unavailable(format!("libcuda lacks {name} (driver too old?)")));
        }
    }
    Ok(())
}

/// A device found by [`probe`].
#[derive(Debug, Clone)]
pub struct Found {
    ordinal: i32,
    device: CUdevice,
    /// The device's name.
    pub name: String,
    /// Its streaming multiprocessors.
    pub sms: u32,
    /// The driver's CUDA version, as 1000 × major + 10 × minor.
    pub driver: i32,
}

impl Found {
    /// One line for logs.
    pub fn describe(&self) -> String {
        format!(
            "cuda:{} {} ({} SMs, driver CUDA {}.{})",
            self.ordinal,
            self.name,
            self.sms,
            self.driver / 1000,
            self.driver % 1000 / 10
        )
    }
}

/// Finds device `ordinal` without making a context (no GPU memory is taken): the library, its
/// symbols, `cuInit`, the device.
pub fn probe(ordinal: u32) -> Result<Found, DeviceError> {
    library()?;
    let ordinal = i32::try_from(ordinal).map_err(|_| unavailable("device ordinal out of range"))?;
    // SAFETY: every function was found in libcuda by `library`; out-pointers point
    // at live locals; the name buffer's length is passed.
    unsafe {
        let r = sys::cuInit(0);
        if r != CUresult::CUDA_SUCCESS {
            return Err(unavailable(format!("cuInit: {}", error_name(r))));
        }
        let mut driver = 0;
        check("cuDriverGetVersion", sys::cuDriverGetVersion(&mut driver))?;
        let mut count = 0;
        check("cuDeviceGetCount", sys::cuDeviceGetCount(&mut count))?;
        if ordinal >= count {
            return Err(unavailable(format!("no device cuda:{ordinal} ({count} visible)")));
        }
        let mut device: CUdevice = 0;
        check("cuDeviceGet", sys::cuDeviceGet(&mut device, ordinal))?;
        let mut name = [0 as std::ffi::c_char; 128];
        check(
            "cuDeviceGetName",
            sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, device),
        )?;
        let name = CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
        let mut sms = 0;
        check(
            "cuDeviceGetAttribute",
            sys::cuDeviceGetAttribute(
                &mut sms,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                device,
            ),
        )?;
        Ok(Found {
            ordinal,
            device,
            name,
            sms: sms.max(1) as u32,
            driver,
        })
    }
}

/// A registered host range.
#[derive(Debug, Clone, Copy)]
struct Registration {
    base: usize,
    len: usize,
    /// Its address as the device sees it.
    device: CUdeviceptr,
}

/// The copy kernel and its piece buffer.
#[derive(Debug)]
struct Kernel {
    function: CUfunction,
    /// Device buffer the pieces of a batch are uploaded into; reused in stream order.
    buffer: CUdeviceptr,
    capacity: usize,
}

/// The CUDA copy engine for one device; see the module documentation.
#[derive(Debug)]
pub struct CudaEngine {
    ordinal: i32,
    device: CUdevice,
    ctx: CUcontext,
    stream: CUstream,
    module: CUmodule,
    /// The kernel, or None when its module would not load (then: one memcpy per piece).
    kernel: Mutex<Option<Kernel>>,
    sms: u32,
    name: String,
    driver: i32,
    registered: Mutex<Vec<Registration>>,
}

// SAFETY: the raw handles are driver objects (context, stream, module, function, device
// memory) that the CUDA driver API lets any thread use; the mutable state sits behind mutexes.
unsafe impl Send for CudaEngine {}
// SAFETY: as above.
unsafe impl Sync for CudaEngine {}

impl CudaEngine {
    /// Opens device `ordinal` (as the engine's process numbers them, after
    /// `CUDA_VISIBLE_DEVICES`) in its primary context, the one torch uses.
    pub fn open(ordinal: u32) -> Result<Self, DeviceError> {
        let found = probe(ordinal)?;
        // SAFETY: every function was found in libcuda by `probe`; out-pointers
        // point at live locals and fields.
        unsafe {
            let (ordinal, device) = (found.ordinal, found.device);
            let mut ctx: CUcontext = std::ptr::null_mut();
            check(
                "cuDevicePrimaryCtxRetain",
                sys::cuDevicePrimaryCtxRetain(&mut ctx, device),
            )?;
            let mut engine = CudaEngine {
                ordinal,
                device,
                ctx,
                stream: std::ptr::null_mut(),
                module: std::ptr::null_mut(),
                kernel: Mutex::new(None),
                sms: found.sms,
                name: found.name,
                driver: found.driver,
                registered: Mutex::new(Vec::new()),
            };
            engine.current()?;
            check(
                "cuStreamCreate",
                sys::cuStreamCreate(
                    &mut engine.stream,
                    sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                ),
            )?;
            match engine.load_kernel() {
                Ok(k) => *engine.kernel.get_mut() = Some(k),
                Err(e) => {
                    tracing::warn!(error = %e, "the CUDA copy kernel did not load; copying one page at a time")
                }
            }
            Ok(engine)
        }
    }

    /// Makes the engine's context current on the calling thread.
    fn current(&self) -> Result<(), DeviceError> {
        // SAFETY: the context was retained at open and is released only on drop.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })
    }

    fn load_kernel(&mut self) -> Result<Kernel, DeviceError> {
        let mut function: CUfunction = std::ptr::null_mut();
        // SAFETY: `PTX` is NUL-terminated; out-pointers point at fields and locals.
        unsafe {
            check(
                "cuModuleLoadData",
                sys::cuModuleLoadData(&mut self.module, PTX.as_ptr().cast()),
            )?;
            check(
                "cuModuleGetFunction",
                sys::cuModuleGetFunction(&mut function, self.module, c"kvtier_copy_pieces".as_ptr()),
            )?;
        }
        Ok(Kernel {
            function,
            buffer: 0,
            capacity: 0,
        })
    }

    /// Whether batches go through the copy kernel.
    pub fn uses_kernel(&self) -> bool {
        self.kernel.lock().is_some()
    }

    /// The device address of host range `[addr, addr + len)`, if it lies in a registered range.
    fn device_addr(&self, addr: usize, len: usize) -> Option<CUdeviceptr> {
        self.registered
            .lock()
            .iter()
            .find(|r| addr >= r.base && addr.saturating_add(len) <= r.base + r.len)
            .map(|r| r.device + (addr - r.base) as u64)
    }

    fn event(&self) -> Result<CudaEvent, DeviceError> {
        let mut e: CUevent = std::ptr::null_mut();
        // SAFETY: the out-pointer points at a local.
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
        })?;
        Ok(CudaEvent {
            event: e,
            ctx: self.ctx,
        })
    }

    /// Enqueues `pieces` on the copy stream after `after` completes; returns the done-event.
    ///
    /// # Safety
    /// Every piece must name memory the device may read (source) and write (destination) until
    /// the returned event completes.
    unsafe fn enqueue(&self, pieces: &[super::Piece], after: CUstream) -> Result<CudaEvent, DeviceError> {
        let ready = self.event()?;
        let done = self.event()?;
        let mut kernel = self.kernel.lock();
        // SAFETY: handles are live; the pieces' memory is the caller's contract;
        // the piece buffer is only rewritten by copies queued on the same stream after the
        // launches that read it, and freed only after the stream is drained.
        unsafe {
            check("cuEventRecord", sys::cuEventRecord(ready.event, after))?;
            check(
                "cuStreamWaitEvent",
                sys::cuStreamWaitEvent(self.stream, ready.event, 0),
            )?;
            match kernel.as_mut() {
                Some(k) if !pieces.is_empty() => {
                    let bytes = std::mem::size_of_val(pieces);
                    if k.capacity < bytes {
                        let want = bytes.next_power_of_two().max(64 << 10);
                        check("cuStreamSynchronize", sys::cuStreamSynchronize(self.stream))?;
                        if k.buffer != 0 {
                            check("cuMemFree_v2", sys::cuMemFree_v2(k.buffer))?;
                            k.buffer = 0;
                            k.capacity = 0;
                        }
                        check("cuMemAlloc_v2", sys::cuMemAlloc_v2(&mut k.buffer, want))?;
                        k.capacity = want;
                    }
                    // From pageable memory the driver stages the bytes before returning, so
                    // `pieces` may go when this returns.
                    check(
                        "cuMemcpyHtoDAsync_v2",
                        sys::cuMemcpyHtoDAsync_v2(k.buffer, pieces.as_ptr().cast(), bytes, self.stream),
                    )?;
                    let mut buffer = k.buffer;
                    let mut count = pieces.len() as u32;
                    let mut params = [
                        (&raw mut buffer).cast::<c_void>(),
                        (&raw mut count).cast::<c_void>(),
                    ];
                    let grid = count.min(self.sms).max(1);
                    check(
                        "cuLaunchKernel",
                        sys::cuLaunchKernel(
                            k.function,
                            grid,
                            1,
                            1,
                            THREADS,
                            1,
                            1,
                            0,
                            self.stream,
                            params.as_mut_ptr(),
                            std::ptr::null_mut(),
                        ),
                    )?;
                }
                _ => {
                    for p in pieces {
                        check(
                            "cuMemcpyAsync",
                            sys::cuMemcpyAsync(p.dst, p.src, p.len as usize, self.stream),
                        )?;
                    }
                }
            }
            check("cuEventRecord", sys::cuEventRecord(done.event, self.stream))?;
        }
        Ok(done)
    }

    /// Plans and enqueues one batch.
    ///
    /// # Safety
    /// As [`CopyEngine::gather`] / [`CopyEngine::scatter`].
    unsafe fn copy(
        &self,
        layers: &[LayerPages],
        jobs: &[CopyJob],
        slot_offset: usize,
        direction: Direction,
        stream: usize,
    ) -> Result<Fence, DeviceError> {
        self.current()?;
        let kernel = self.uses_kernel();
        // The kernel dereferences slot addresses on the device: they must lie in a registered
        // range. Plain copies take any host address (the driver stages unregistered memory).
        let pieces = plan_pieces(
            layers,
            jobs,
            slot_offset,
            direction,
            MAX_PIECE,
            |addr, len| match self.device_addr(addr, len) {
                Some(d) => Ok(d),
                None if !kernel => Ok(addr as u64),
                None => Err(DeviceError::BadCopy(format!(
                    "slot at {addr:#x} lies in no registered arena; register the arena mapping first"
                ))),
            },
        )?;
        let caller = stream as CUstream;
        // SAFETY: the caller's contract covers the pieces' memory.
        let done = unsafe { self.enqueue(&pieces, caller) }?;
        if direction == Direction::Scatter {
            // SAFETY: both handles are live.
            check("cuStreamWaitEvent", unsafe {
                sys::cuStreamWaitEvent(caller, done.event, 0)
            })?;
        }
        Ok(Fence::new(Arc::new(done)))
    }
}

impl CopyEngine for CudaEngine {
    fn device(&self) -> Device {
        Device {
            backend: Backend::Cuda,
            index: self.ordinal as u32,
        }
    }

    fn describe(&self) -> String {
        format!(
            "cuda:{} {} ({} SMs, driver CUDA {}.{}), {}",
            self.ordinal,
            self.name,
            self.sms,
            self.driver / 1000,
            self.driver % 1000 / 10,
            if self.uses_kernel() {
                "copy kernel"
            } else {
                "one memcpy per page"
            }
        )
    }

    fn register(&self, base: usize, len: usize) -> Result<bool, DeviceError> {
        if self.device_addr(base, len).is_some() {
            return Ok(false);
        }
        self.current()?;
        let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
        // SAFETY: the caller hands a mapped range and unregisters it before unmapping it.
        let r = unsafe { sys::cuMemHostRegister_v2(base as *mut c_void, len, flags) };
        if r != CUresult::CUDA_SUCCESS && r != CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED {
            return Err(DeviceError::Call {
                backend: Backend::Cuda,
                call: "cuMemHostRegister",
                code: error_name(r),
            });
        }
        let mut device: CUdeviceptr = 0;
        // SAFETY: the range is registered now; the out-pointer points at a local.
        check("cuMemHostGetDevicePointer_v2", unsafe {
            sys::cuMemHostGetDevicePointer_v2(&mut device, base as *mut c_void, 0)
        })?;
        self.registered.lock().push(Registration { base, len, device });
        tracing::debug!(base, len, "arena registered with CUDA");
        Ok(true)
    }

    fn unregister(&self, base: usize) {
        let mut registered = self.registered.lock();
        let Some(i) = registered.iter().position(|r| r.base == base) else {
            return;
        };
        registered.remove(i);
        drop(registered);
        if self.current().is_err() {
            return;
        }
        // SAFETY: the stream is live; after it drains no copy of ours touches the range, which was
        // registered by `register`.
        unsafe {
            let _ = sys::cuStreamSynchronize(self.stream);
            let _ = sys::cuMemHostUnregister(base as *mut c_void);
        }
    }

    unsafe fn gather(
        &self,
        layers: &[LayerPages],
        jobs: &[CopyJob],
        slot_offset: usize,
        stream: usize,
    ) -> Result<Fence, DeviceError> {
        // SAFETY: the caller's contract.
        unsafe { self.copy(layers, jobs, slot_offset, Direction::Gather, stream) }
    }

    unsafe fn scatter(
        &self,
        layers: &[LayerPages],
        jobs: &[CopyJob],
        stream: usize,
    ) -> Result<Fence, DeviceError> {
        // SAFETY: the caller's contract.
        unsafe { self.copy(layers, jobs, 0, Direction::Scatter, stream) }
    }
}

impl Drop for CudaEngine {
    fn drop(&mut self) {
        if self.current().is_err() {
            return;
        }
        // SAFETY: the handles were made by this engine and nothing else uses them now; the stream
        // is drained before the buffer and the registrations go.
        unsafe {
            let _ = sys::cuStreamSynchronize(self.stream);
            if let Some(k) = self.kernel.get_mut().take()
                && k.buffer != 0
            {
                let _ = sys::cuMemFree_v2(k.buffer);
            }
            for r in self.registered.get_mut().drain(..) {
                let _ = sys::cuMemHostUnregister(r.base as *mut c_void);
            }
            let _ = sys::cuDevicePrimaryCtxRelease_v2(self.device);
        }
    }
}

/// An event of the engine's context: a done-event is a batch's [`Fence`].
#[derive(Debug)]
struct CudaEvent {
    event: CUevent,
    ctx: CUcontext,
}

// SAFETY: CUDA events may be queried, waited for and destroyed from any thread with their
// context current, which `wait` and `is_done` make it.
unsafe impl Send for CudaEvent {}
// SAFETY: as above.
unsafe impl Sync for CudaEvent {}

impl Completion for CudaEvent {
    fn wait(&self) -> Result<(), DeviceError> {
        // SAFETY: the event and its context live as long as `self` (the engine's primary
        // context is retained by the engine and, process-wide, by torch).
        unsafe {
            check("cuCtxSetCurrent", sys::cuCtxSetCurrent(self.ctx))?;
            check("cuEventSynchronize", sys::cuEventSynchronize(self.event))
        }
    }

    fn is_done(&self) -> bool {
        // SAFETY: as in `wait`.
        unsafe {
            sys::cuCtxSetCurrent(self.ctx) != CUresult::CUDA_SUCCESS
                || sys::cuEventQuery(self.event) != CUresult::CUDA_ERROR_NOT_READY
        }
    }
}

impl Drop for CudaEvent {
    fn drop(&mut self) {
        // SAFETY: destroying an event that is still pending is allowed: the driver frees it when
        // it completes.
        unsafe {
            let _ = sys::cuCtxSetCurrent(self.ctx);
            let _ = sys::cuEventDestroy_v2(self.event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_is_shipped_with_its_entry_point() {
        assert!(PTX.contains(".visible .entry kvtier_copy_pieces("));
        assert!(
            PTX.contains(".version 7.0"),
            "the PTX must stay loadable by older drivers"
        );
        assert!(PTX.ends_with('\0'));
        assert_eq!(
            std::mem::size_of::<super::super::Piece>(),
            24,
            "the kernel reads 24-byte pieces"
        );
    }

    #[test]
    fn without_a_driver_opening_is_an_error_not_a_panic() {
        match CudaEngine::open(0) {
            Ok(e) => eprintln!("a CUDA device is present: {}", e.describe()),
            Err(e) => {
                assert!(
                    matches!(
                        e,
                        DeviceError::Unavailable {
                            backend: Backend::Cuda,
                            ..
                        }
                    ),
                    "{e}"
                );
                eprintln!("as expected here: {e}");
            }
        }
    }
}

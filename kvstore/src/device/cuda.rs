//! The CUDA engine: the driver API through `cudarc`, with libcuda loaded at run time.
//!
//! **How pages move.** A batch becomes a list of contiguous pieces ([`plan_pieces`]); one launch of
//! a small copy kernel (`copy_pieces.cu`, shipped as PTX that the driver compiles for its GPU)
//! copies them all, a warp per piece, its threads reading device memory and writing the registered
//! arena straight over PCIe, or the other way round. vLLM's pages are small (16 tokens × heads ×
//! head size: 16–64 KiB) and a block has one per layer, so one `cuMemcpyAsync` per page would cost
//! a call and a DMA setup per few KiB; torch's per-block copies reach an eighth of the link at 64
//! KiB on an H200 (`benches/gpu/README.md`). The driver's batched copy (`cuMemcpyBatchAsync`) would
//! also avoid that, but only from CUDA 12.8 drivers; the kernel runs on any driver that can JIT PTX
//! ISA 7.0 (R450 on) and takes a whole batch in one launch, with at most 16 thread blocks, so that
//! the forward pass keeps nearly all SMs. The piece list itself sits in pinned, device-mapped
//! staging memory that the kernel reads directly (a staging buffer is reused only after the batch
//! that used it completed), so a launch never waits for an upload. Where the kernel cannot be
//! loaded, or is turned off ([`CUDA_COPY_KERNEL_ENV`]), pieces go one `cuMemcpyAsync` each
//! (correct, slower, no SM time).
//!
//! **Ordering.** Copies run on the engine's own non-blocking stream: an event recorded on the
//! caller's stream orders them after the work queued there (the attention that wrote a layer);
//! a load may make the caller's stream wait for its done-event, so later kernels read loaded
//! pages without the host waiting. The done-event is the [`Fence`]; it blocks (does not spin)
//! whoever waits for it. A batch that fails after part of it was queued is waited for before
//! the error returns, so nothing of it runs on after its caller lets go of the slots.
//!
//! **Contexts.** Every call pushes the device's primary context (torch's) and pops it after, so
//! the caller's current context is left as it was.
//!
//! **Guarding the entry.** `cudarc` panics when libcuda or one of its symbols is missing, so
//! [`CudaEngine::open`] looks for the library and every symbol it will call first, and reports
//! each gap as [`DeviceError::Unavailable`].

use std::ffi::{CStr, c_void};
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys::{
    self, CUcontext, CUdevice, CUdeviceptr, CUevent, CUfunction, CUmodule, CUresult, CUstream,
};
use parking_lot::Mutex;

use super::{
    Backend, CUDA_COPY_KERNEL_ENV, Completion, CopyEngine, CopyJob, Device, DeviceError, Direction, Fence,
    plan_pieces,
};
use crate::pages::LayerPages;

/// The copy kernel, compiled from `copy_pieces.cu` by `ptx.py`.
const PTX: &str = concat!(include_str!("copy_pieces.ptx"), "\0");
/// Longest piece one warp of the kernel copies: long enough to amortise fetching the piece
/// (a PCIe round trip), short enough that a single large block still spreads over a hundred
/// warps.
const MAX_PIECE: usize = 32 << 10;
/// Threads per thread block of the copy kernel.
const THREADS: u32 = 512;
/// Most thread blocks of one launch: 16 × 16 warps × 2 KiB in flight keep PCIe busy while
/// leaving the other SMs to the model.
const MAX_GRID: u32 = 16;
/// How long a failed registration of a mapping is remembered before it is tried again (instead
/// of on every layer of every step).
const RETRY_REGISTER: std::time::Duration = std::time::Duration::from_secs(60);

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
    "cuCtxPushCurrent_v2",
    "cuCtxPopCurrent_v2",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
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
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuMemcpyAsync",
    "cuModuleLoadData",
    "cuModuleUnload",
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

/// Whether [`CUDA_COPY_KERNEL_ENV`]'s value leaves the copy kernel on (unset or anything but an
/// explicit no).
fn kernel_wanted(value: Option<&str>) -> bool {
    !value.is_some_and(|v| {
        let v = v.trim();
        ["0", "off", "false", "no"]
            .iter()
            .any(|no| v.eq_ignore_ascii_case(no))
    })
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
    /// Registered by this engine (else by someone else in the process: not unregistered here).
    owned: bool,
}

/// The registered range that holds all of `[addr, addr + len)`.
fn covering(registered: &[Registration], addr: usize, len: usize) -> Option<&Registration> {
    registered
        .iter()
        .find(|r| addr >= r.base && addr.saturating_add(len) <= r.base + r.len)
}

/// Pinned, device-mapped memory holding one batch's piece list for the kernel.
#[derive(Debug)]
struct Staging {
    host: *mut u8,
    device: CUdeviceptr,
    capacity: usize,
    /// The batch that reads it; reusable once that completed.
    busy: Option<Arc<CudaEvent>>,
}

/// Holds the engine's context current on this thread; pops it on drop.
struct Pushed;

impl Drop for Pushed {
    fn drop(&mut self) {
        let mut popped: CUcontext = std::ptr::null_mut();
        // SAFETY: pops the context `push` pushed on this thread.
        let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
    }
}

fn push(ctx: CUcontext) -> Result<Pushed, DeviceError> {
    // SAFETY: the context is retained by its engine for as long as anything refers to it.
    check("cuCtxPushCurrent_v2", unsafe { sys::cuCtxPushCurrent_v2(ctx) })?;
    Ok(Pushed)
}

/// The CUDA copy engine for one device; see the module documentation.
#[derive(Debug)]
pub struct CudaEngine {
    ordinal: i32,
    device: CUdevice,
    ctx: CUcontext,
    stream: CUstream,
    module: CUmodule,
    /// The copy kernel, or None when its module would not load (then: one memcpy per piece).
    kernel: Option<CUfunction>,
    sms: u32,
    name: String,
    driver: i32,
    registered: Mutex<Vec<Registration>>,
    /// Mappings whose registration failed, when, and why.
    failed: Mutex<Vec<(usize, usize, Instant, DeviceError)>>,
    /// Staging buffers of the piece lists; the lock also keeps batches in one order on the stream.
    staging: Mutex<Vec<Staging>>,
}

// SAFETY: the raw handles are driver objects (context, stream, module, function, pinned
// memory) that the CUDA driver API lets any thread use; the mutable state sits behind mutexes.
unsafe impl Send for CudaEngine {}
// SAFETY: as above.
unsafe impl Sync for CudaEngine {}

impl CudaEngine {
    /// Opens device `ordinal` (as the engine's process numbers them, after
    /// `CUDA_VISIBLE_DEVICES`) in its primary context, the one torch uses.
    pub fn open(ordinal: u32) -> Result<Self, DeviceError> {
        let found = probe(ordinal)?;
        let mut ctx: CUcontext = std::ptr::null_mut();
        // SAFETY: every function was found in libcuda by `probe`; the out-pointer points at a local.
        check("cuDevicePrimaryCtxRetain", unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut ctx, found.device)
        })?;
        // From here on, dropping `engine` releases what was made so far.
        let mut engine = CudaEngine {
            ordinal: found.ordinal,
            device: found.device,
            ctx,
            stream: std::ptr::null_mut(),
            module: std::ptr::null_mut(),
            kernel: None,
            sms: found.sms,
            name: found.name,
            driver: found.driver,
            registered: Mutex::new(Vec::new()),
            failed: Mutex::new(Vec::new()),
            staging: Mutex::new(Vec::new()),
        };
        let _ctx = push(ctx)?;
        // SAFETY: the out-pointer points at a field; the context is current.
        check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(
                &mut engine.stream,
                sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
            )
        })?;
        if kernel_wanted(std::env::var(CUDA_COPY_KERNEL_ENV).ok().as_deref()) {
            match engine.load_kernel() {
                Ok(f) => engine.kernel = Some(f),
                Err(e) => {
                    tracing::warn!(error = %e, "the CUDA copy kernel did not load; copying one page at a time")
                }
            }
        } else {
            tracing::info!("{CUDA_COPY_KERNEL_ENV} is off: copying one page at a time");
        }
        Ok(engine)
    }

    fn load_kernel(&mut self) -> Result<CUfunction, DeviceError> {
        let mut function: CUfunction = std::ptr::null_mut();
        // SAFETY: `PTX` is NUL-terminated; out-pointers point at fields and locals; the context is
        // current (pushed by `open`).
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
        Ok(function)
    }

    /// Whether batches go through the copy kernel.
    pub fn uses_kernel(&self) -> bool {
        self.kernel.is_some()
    }

    /// The device address of host range `[addr, addr + len)`, if it lies in a registered range.
    fn device_addr(&self, addr: usize, len: usize) -> Option<CUdeviceptr> {
        covering(&self.registered.lock(), addr, len).map(|r| r.device + (addr - r.base) as u64)
    }

    /// A new event; `blocking`: whoever waits for it sleeps instead of spinning.
    fn event(&self, blocking: bool) -> Result<CudaEvent, DeviceError> {
        let mut flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        if blocking {
            flags |= sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32;
        }
        let mut e: CUevent = std::ptr::null_mut();
        // SAFETY: the out-pointer points at a local; the caller pushed the context.
        check("cuEventCreate", unsafe { sys::cuEventCreate(&mut e, flags) })?;
        Ok(CudaEvent {
            event: e,
            ctx: self.ctx,
        })
    }

    /// A staging buffer of at least `bytes` that no batch in flight reads; allocated if none.
    fn staging_for<'a>(
        &self,
        staging: &'a mut Vec<Staging>,
        bytes: usize,
    ) -> Result<&'a mut Staging, DeviceError> {
        let free = staging
            .iter()
            .position(|s| s.capacity >= bytes && s.busy.as_ref().is_none_or(|e| e.is_done()));
        let i = match free {
            Some(i) => i,
            None => {
                let capacity = bytes.next_power_of_two().max(16 << 10);
                let mut host: *mut c_void = std::ptr::null_mut();
                let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
                // SAFETY: out-pointers point at locals; the caller pushed the context.
                unsafe {
                    check("cuMemHostAlloc", sys::cuMemHostAlloc(&mut host, capacity, flags))?;
                    let mut device: CUdeviceptr = 0;
                    if let Err(e) = check(
                        "cuMemHostGetDevicePointer_v2",
                        sys::cuMemHostGetDevicePointer_v2(&mut device, host, 0),
                    ) {
                        let _ = sys::cuMemFreeHost(host);
                        return Err(e);
                    }
                    staging.push(Staging {
                        host: host.cast(),
                        device,
                        capacity,
                        busy: None,
                    });
                }
                staging.len() - 1
            }
        };
        Ok(&mut staging[i])
    }

    /// Enqueues `pieces` on the copy stream after the work queued on `caller`; `caller_waits`:
    /// work queued on `caller` afterwards waits for the copies. Returns the done-event.
    ///
    /// # Safety
    /// Every piece must name memory the device may read (source) and write (destination) until
    /// the returned event completes. The caller pushed the context.
    unsafe fn enqueue(
        &self,
        pieces: &[super::Piece],
        caller: CUstream,
        caller_waits: bool,
    ) -> Result<Arc<CudaEvent>, DeviceError> {
        let ready = self.event(false)?;
        let done = Arc::new(self.event(true)?);
        let mut staging = self.staging.lock();
        // SAFETY: handles are live; nothing is queued on the copy stream by this call until the
        // wait below succeeds.
        unsafe {
            check("cuEventRecord", sys::cuEventRecord(ready.event, caller))?;
            check(
                "cuStreamWaitEvent",
                sys::cuStreamWaitEvent(self.stream, ready.event, 0),
            )?;
        }
        let queued = (|| -> Result<(), DeviceError> {
            match self.kernel {
                Some(function) if !pieces.is_empty() => {
                    let bytes = std::mem::size_of_val(pieces);
                    let buffer = self.staging_for(&mut staging, bytes)?;
                    // SAFETY: the buffer holds `bytes` and no batch in flight reads it.
                    unsafe {
                        std::ptr::copy_nonoverlapping(pieces.as_ptr().cast::<u8>(), buffer.host, bytes)
                    };
                    buffer.busy = Some(Arc::clone(&done));
                    let mut list = buffer.device;
                    let mut count = pieces.len() as u32;
                    let mut params = [
                        (&raw mut list).cast::<c_void>(),
                        (&raw mut count).cast::<c_void>(),
                    ];
                    let grid = count.div_ceil(THREADS / 32).clamp(1, MAX_GRID);
                    // SAFETY: the parameters match the kernel's (a u64 pointer to the pieces, a
                    // u32 count) and live across the call, which copies them; the piece list
                    // stays untouched until `done` completes (`busy`).
                    check("cuLaunchKernel", unsafe {
                        sys::cuLaunchKernel(
                            function,
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
                        )
                    })?;
                }
                _ => {
                    for p in pieces {
                        // SAFETY: the caller's contract covers the piece's memory.
                        check("cuMemcpyAsync", unsafe {
                            sys::cuMemcpyAsync(p.dst, p.src, p.len as usize, self.stream)
                        })?;
                    }
                }
            }
            // SAFETY: handles are live.
            unsafe {
                check("cuEventRecord", sys::cuEventRecord(done.event, self.stream))?;
                if caller_waits {
                    check("cuStreamWaitEvent", sys::cuStreamWaitEvent(caller, done.event, 0))?;
                }
            }
            Ok(())
        })();
        if let Err(e) = queued {
            // Part of the batch may be queued: let none of it outlive the error, which lets the
            // caller give the slots back.
            // SAFETY: the stream is live.
            let _ = unsafe { sys::cuStreamSynchronize(self.stream) };
            return Err(e);
        }
        Ok(done)
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
        // Held throughout, so that two threads copying through a new mapping register it once.
        let mut registered = self.registered.lock();
        if covering(&registered, base, len).is_some() {
            return Ok(false);
        }
        let mut failed = self.failed.lock();
        failed.retain(|f| f.2.elapsed() < RETRY_REGISTER);
        if let Some(f) = failed.iter().find(|f| f.0 == base && f.1 == len) {
            return Err(f.3.clone());
        }
        let _ctx = push(self.ctx)?;
        let started = Instant::now();
        let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
        // SAFETY: the caller hands a mapped range and unregisters it before unmapping it.
        let r = unsafe { sys::cuMemHostRegister_v2(base as *mut c_void, len, flags) };
        let owned = r == CUresult::CUDA_SUCCESS;
        let mut device: CUdeviceptr = 0;
        let result = if !owned && r != CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED {
            Err(DeviceError::Call {
                backend: Backend::Cuda,
                call: "cuMemHostRegister",
                code: error_name(r),
            })
        } else {
            // SAFETY: the range is registered now; the out-pointer points at a local.
            check("cuMemHostGetDevicePointer_v2", unsafe {
                sys::cuMemHostGetDevicePointer_v2(&mut device, base as *mut c_void, 0)
            })
        };
        if let Err(e) = result {
            if owned {
                // SAFETY: registered just above, used by nothing yet.
                let _ = unsafe { sys::cuMemHostUnregister(base as *mut c_void) };
            }
            tracing::warn!(error = %e, len, "the arena could not be registered with CUDA; device copies need it");
            failed.push((base, len, Instant::now(), e.clone()));
            return Err(e);
        }
        registered.push(Registration {
            base,
            len,
            device,
            owned,
        });
        tracing::info!(
            len,
            owned,
            ms = started.elapsed().as_millis() as u64,
            "arena registered with CUDA"
        );
        Ok(true)
    }

    fn unregister(&self, base: usize) {
        let mut registered = self.registered.lock();
        let Some(i) = registered.iter().position(|r| r.base == base) else {
            return;
        };
        let r = registered.remove(i);
        drop(registered);
        if !r.owned {
            return;
        }
        let Ok(_ctx) = push(self.ctx) else {
            return;
        };
        // SAFETY: the stream is live; after it drains no copy of ours touches the range, which
        // this engine registered.
        unsafe {
            let _ = sys::cuStreamSynchronize(self.stream);
            let _ = sys::cuMemHostUnregister(base as *mut c_void);
        }
    }

    unsafe fn copy(
        &self,
        layers: &[LayerPages],
        jobs: &[CopyJob],
        direction: Direction,
        slot_offset: usize,
        stream: usize,
        stream_waits: bool,
    ) -> Result<Fence, DeviceError> {
        let _ctx = push(self.ctx)?;
        let kernel = self.uses_kernel();
        // The kernel dereferences slot addresses on the device: they must lie in a registered
        // range. Plain copies take any host address (the driver stages unregistered memory,
        // synchronously).
        let pieces = plan_pieces(
            layers,
            jobs,
            slot_offset,
            direction,
            // One memcpy per page: nothing gained by splitting.
            if kernel { MAX_PIECE } else { usize::MAX },
            |addr, len| match self.device_addr(addr, len) {
                Some(d) => Ok(d),
                None if !kernel => Ok(addr as u64),
                None => Err(DeviceError::BadCopy(format!(
                    "slot at {addr:#x} lies in no registered arena; register the arena mapping first"
                ))),
            },
        )?;
        // SAFETY: the caller's contract covers the pieces' memory; the context is pushed.
        let done = unsafe { self.enqueue(&pieces, stream as CUstream, stream_waits) }?;
        Ok(Fence::new(done))
    }
}

impl Drop for CudaEngine {
    fn drop(&mut self) {
        if let Ok(_ctx) = push(self.ctx) {
            // SAFETY: the handles were made by this engine and nothing else uses them now; the
            // stream drains before the buffers, registrations, module and stream go.
            unsafe {
                if !self.stream.is_null() {
                    let _ = sys::cuStreamSynchronize(self.stream);
                }
                for s in self.staging.get_mut().drain(..) {
                    let _ = sys::cuMemFreeHost(s.host.cast());
                }
                for r in self.registered.get_mut().drain(..) {
                    if r.owned {
                        let _ = sys::cuMemHostUnregister(r.base as *mut c_void);
                    }
                }
                if !self.module.is_null() {
                    let _ = sys::cuModuleUnload(self.module);
                }
                if !self.stream.is_null() {
                    let _ = sys::cuStreamDestroy_v2(self.stream);
                }
            }
        }
        // SAFETY: retained once at open.
        let _ = unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.device) };
    }
}

/// An event of the engine's context: a done-event is a batch's [`Fence`].
#[derive(Debug)]
struct CudaEvent {
    event: CUevent,
    ctx: CUcontext,
}

// SAFETY: CUDA events may be queried, waited for and destroyed from any thread with their
// context current, which `wait`, `is_done` and `drop` make it.
unsafe impl Send for CudaEvent {}
// SAFETY: as above.
unsafe impl Sync for CudaEvent {}

impl Completion for CudaEvent {
    fn wait(&self) -> Result<(), DeviceError> {
        let _ctx = push(self.ctx)?;
        // SAFETY: the event lives as long as `self`, its context as long as its engine or torch.
        check("cuEventSynchronize", unsafe {
            sys::cuEventSynchronize(self.event)
        })
    }

    fn is_done(&self) -> bool {
        let Ok(_ctx) = push(self.ctx) else {
            return true;
        };
        // SAFETY: as in `wait`.
        unsafe { sys::cuEventQuery(self.event) != CUresult::CUDA_ERROR_NOT_READY }
    }
}

impl Drop for CudaEvent {
    fn drop(&mut self) {
        let pushed = push(self.ctx);
        // SAFETY: destroying an event that is still pending is allowed: the driver frees it when
        // it completes.
        let _ = unsafe { sys::cuEventDestroy_v2(self.event) };
        drop(pushed);
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
    fn the_stand_in_driver_of_the_tests_exports_every_function_used() {
        let stub = include_str!("../../../tests/stubs/libcuda_stub.c");
        for name in SYMBOLS {
            assert!(
                stub.contains(&format!("FAIL({name})")) || stub.contains(&format!("int {name}(")),
                "tests/stubs/libcuda_stub.c lacks {name}"
            );
        }
    }

    #[test]
    fn the_kernel_is_on_unless_the_environment_says_no() {
        for on in [None, Some(""), Some("1"), Some("on"), Some("yes")] {
            assert!(kernel_wanted(on), "{on:?}");
        }
        for off in ["0", "off", "OFF", "false", "No", " 0 "] {
            assert!(!kernel_wanted(Some(off)), "{off:?}");
        }
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

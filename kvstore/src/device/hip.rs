//! The ROCm engine: HIP runtime through `hip-sys` (cargo feature `hip`, off by default: it
//! links `libamdhip64`, so a build with it needs ROCm's runtime where it runs; on Debian the
//! package `libamdhip64-dev` and `HIP_PATH=/usr` to build).
//!
//! The same shape as the CUDA engine: the arena registered as pinned, device-mapped host memory;
//! copies on the engine's own non-blocking stream, ordered after the caller's stream by an event,
//! a load making the caller's stream wait for its done-event. Pieces go one `hipMemcpyAsync`
//! each: a gather kernel for AMD GPUs would have to ship as a code object per GPU architecture,
//! which needs ROCm's compiler to build; neighbouring pages are merged by [`plan_pieces`] first.

use std::ffi::{CStr, c_void};
use std::sync::Arc;

use hip_sys::hiprt as hip;
use parking_lot::Mutex;

use super::{Backend, Completion, CopyEngine, CopyJob, Device, DeviceError, Direction, Fence, plan_pieces};
use crate::pages::LayerPages;

/// Longest single copy: splitting larger ones buys nothing for DMA.
const MAX_PIECE: usize = usize::MAX;

fn error_name(r: hip::hipError_t) -> String {
    // SAFETY: returns a static NUL-terminated name for any code.
    let s = unsafe { hip::hipGetErrorName(r) };
    if s.is_null() {
        format!("{r:?}")
    } else {
        // SAFETY: as above.
        unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
    }
}

fn check(call: &'static str, r: hip::hipError_t) -> Result<(), DeviceError> {
    if r == hip::hipError_t::hipSuccess {
        Ok(())
    } else {
        Err(DeviceError::Call {
            backend: Backend::Hip,
            call,
            code: error_name(r),
        })
    }
}

fn unavailable(reason: String) -> DeviceError {
    DeviceError::Unavailable {
        backend: Backend::Hip,
        reason,
    }
}

/// Finds device `ordinal`: its description, or why there is none.
pub fn probe(ordinal: u32) -> Result<String, DeviceError> {
    let ordinal = i32::try_from(ordinal).map_err(|_| unavailable("device ordinal out of range".into()))?;
    // SAFETY: out-pointers point at live locals; the name buffer's length is passed.
    unsafe {
        let mut count = 0;
        let r = hip::hipGetDeviceCount(&mut count);
        if r != hip::hipError_t::hipSuccess {
            return Err(unavailable(format!("hipGetDeviceCount: {}", error_name(r))));
        }
        if ordinal >= count {
            return Err(unavailable(format!("no device hip:{ordinal} ({count} visible)")));
        }
        let mut name = [0 as std::ffi::c_char; 128];
        check(
            "hipDeviceGetName",
            hip::hipDeviceGetName(name.as_mut_ptr(), name.len() as i32, ordinal),
        )?;
        Ok(format!(
            "hip:{ordinal} {}",
            CStr::from_ptr(name.as_ptr()).to_string_lossy()
        ))
    }
}

/// Restores the thread's previous HIP device on drop.
struct Selected(i32);

impl Drop for Selected {
    fn drop(&mut self) {
        // SAFETY: the ordinal was current before `select`.
        let _ = unsafe { hip::hipSetDevice(self.0) };
    }
}

fn select(ordinal: i32) -> Result<Selected, DeviceError> {
    let mut previous = 0;
    // SAFETY: the out-pointer points at a local; the ordinal names a device (checked at open).
    unsafe {
        check("hipGetDevice", hip::hipGetDevice(&mut previous))?;
        check("hipSetDevice", hip::hipSetDevice(ordinal))?;
    }
    Ok(Selected(previous))
}

/// The HIP copy engine for one device.
#[derive(Debug)]
pub struct HipEngine {
    ordinal: i32,
    stream: hip::hipStream_t,
    name: String,
    /// Registered ranges: base, length, and whether this engine registered it.
    registered: Mutex<Vec<(usize, usize, bool)>>,
}

// SAFETY: HIP streams may be used from any thread once the device is selected, which every
// entry does first; the registrations sit behind a mutex.
unsafe impl Send for HipEngine {}
// SAFETY: as above.
unsafe impl Sync for HipEngine {}

impl HipEngine {
    /// Opens device `ordinal` (after `HIP_VISIBLE_DEVICES`).
    pub fn open(ordinal: u32) -> Result<Self, DeviceError> {
        let name = probe(ordinal)?;
        let ordinal = ordinal as i32;
        // SAFETY: the ordinal names a device (checked by `probe`); the out-pointer points at a
        // local.
        unsafe {
            check("hipSetDevice", hip::hipSetDevice(ordinal))?;
            let mut stream: hip::hipStream_t = std::ptr::null_mut();
            check(
                "hipStreamCreateWithFlags",
                hip::hipStreamCreateWithFlags(&mut stream, hip::hipStreamNonBlocking),
            )?;
            Ok(HipEngine {
                ordinal,
                stream,
                name,
                registered: Mutex::new(Vec::new()),
            })
        }
    }

    /// Makes the engine's device current on this thread until the guard drops, which restores
    /// the caller's.
    fn select(&self) -> Result<Selected, DeviceError> {
        select(self.ordinal)
    }

    /// A new event; `blocking`: whoever waits for it sleeps instead of spinning.
    fn event(&self, blocking: bool) -> Result<HipEvent, DeviceError> {
        let mut flags = hip::hipEventDisableTiming;
        if blocking {
            flags |= hip::hipEventBlockingSync;
        }
        let mut e: hip::hipEvent_t = std::ptr::null_mut();
        // SAFETY: the out-pointer points at a local.
        check("hipEventCreateWithFlags", unsafe {
            hip::hipEventCreateWithFlags(&mut e, flags)
        })?;
        Ok(HipEvent {
            event: e,
            ordinal: self.ordinal,
        })
    }
}

impl CopyEngine for HipEngine {
    fn device(&self) -> Device {
        Device {
            backend: Backend::Hip,
            index: self.ordinal as u32,
        }
    }

    fn describe(&self) -> String {
        format!(
            "hip:{} {}, one hipMemcpyAsync per page run",
            self.ordinal, self.name
        )
    }

    fn register(&self, base: usize, len: usize) -> Result<bool, DeviceError> {
        let mut registered = self.registered.lock();
        if registered
            .iter()
            .any(|&(b, l, _)| base >= b && base.saturating_add(len) <= b + l)
        {
            return Ok(false);
        }
        let _device = self.select()?;
        let flags = hip::hipHostRegisterPortable | hip::hipHostRegisterMapped;
        // SAFETY: the caller hands a mapped range and unregisters it before unmapping it.
        let r = unsafe { hip::hipHostRegister(base as *mut c_void, len, flags) };
        // Registered by someone else in the process: usable, but not ours to unregister.
        let owned = r == hip::hipError_t::hipSuccess;
        if !owned && r != hip::hipError_t::hipErrorHostMemoryAlreadyRegistered {
            check("hipHostRegister", r)?;
        }
        registered.push((base, len, owned));
        Ok(true)
    }

    fn unregister(&self, base: usize) {
        let mut registered = self.registered.lock();
        let Some(i) = registered.iter().position(|&(b, _, _)| b == base) else {
            return;
        };
        let (_, _, owned) = registered.remove(i);
        if !owned {
            return;
        }
        if let Ok(_device) = self.select() {
            // SAFETY: after the stream drains no copy of ours touches the range.
            unsafe {
                let _ = hip::hipStreamSynchronize(self.stream);
                let _ = hip::hipHostUnregister(base as *mut c_void);
            }
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
        let _device = self.select()?;
        let pieces = plan_pieces(layers, jobs, slot_offset, direction, MAX_PIECE, |a, _| {
            Ok(a as u64)
        })?;
        let caller = stream as hip::hipStream_t;
        let ready = self.event(false)?;
        let done = self.event(true)?;
        // SAFETY: handles are live; nothing is queued on the copy stream until the wait succeeds.
        unsafe {
            check("hipEventRecord", hip::hipEventRecord(ready.event, caller))?;
            check(
                "hipStreamWaitEvent",
                hip::hipStreamWaitEvent(self.stream, ready.event, 0),
            )?;
        }
        // SAFETY: handles are live; the pieces' memory is the caller's contract.
        let queued = (|| unsafe {
            for p in &pieces {
                check(
                    "hipMemcpyAsync",
                    hip::hipMemcpyAsync(
                        p.dst as *mut c_void,
                        p.src as *const c_void,
                        p.len as usize,
                        hip::hipMemcpyKind::hipMemcpyDefault,
                        self.stream,
                    ),
                )?;
            }
            check("hipEventRecord", hip::hipEventRecord(done.event, self.stream))?;
            if stream_waits {
                check(
                    "hipStreamWaitEvent",
                    hip::hipStreamWaitEvent(caller, done.event, 0),
                )?;
            }
            Ok(())
        })();
        if let Err(e) = queued {
            // Let nothing of a half-queued batch outlive the error.
            // SAFETY: the stream is live.
            let _ = unsafe { hip::hipStreamSynchronize(self.stream) };
            return Err(e);
        }
        Ok(Fence::new(Arc::new(done)))
    }
}

impl Drop for HipEngine {
    fn drop(&mut self) {
        let Ok(_device) = self.select() else {
            return;
        };
        // SAFETY: the stream and registrations are this engine's; the stream drains first.
        unsafe {
            let _ = hip::hipStreamSynchronize(self.stream);
            for (base, _, owned) in self.registered.get_mut().drain(..) {
                if owned {
                    let _ = hip::hipHostUnregister(base as *mut c_void);
                }
            }
            let _ = hip::hipStreamDestroy(self.stream);
        }
    }
}

#[derive(Debug)]
struct HipEvent {
    event: hip::hipEvent_t,
    ordinal: i32,
}

// SAFETY: HIP events may be used from any thread with their device selected.
unsafe impl Send for HipEvent {}
// SAFETY: as above.
unsafe impl Sync for HipEvent {}

impl Completion for HipEvent {
    fn wait(&self) -> Result<(), DeviceError> {
        let _device = select(self.ordinal)?;
        // SAFETY: the event lives as long as `self`.
        check("hipEventSynchronize", unsafe {
            hip::hipEventSynchronize(self.event)
        })
    }

    fn is_done(&self) -> bool {
        let Ok(_device) = select(self.ordinal) else {
            return true;
        };
        // SAFETY: as in `wait`.
        unsafe { hip::hipEventQuery(self.event) != hip::hipError_t::hipErrorNotReady }
    }
}

impl Drop for HipEvent {
    fn drop(&mut self) {
        // SAFETY: a pending event may be destroyed; the runtime frees it when it completes.
        unsafe {
            let _ = hip::hipEventDestroy(self.event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_opening_is_an_error_not_a_panic() {
        match HipEngine::open(0) {
            Ok(e) => eprintln!("a HIP device is present: {}", e.describe()),
            Err(e) => {
                assert!(
                    matches!(
                        e,
                        DeviceError::Unavailable {
                            backend: Backend::Hip,
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

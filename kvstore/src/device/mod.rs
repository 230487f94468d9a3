//! Copy engines between an engine's device KV cache and arena slots.
//!
//! An engine keeps its KV cache as one tensor per layer on its accelerator; block `id` of a
//! layer is one page ([`LayerPages`]). Saving a block gathers its pages into one arena slot,
//! loading scatters a slot back. [`CopyEngine`] is the one seam for every accelerator:
//!
//! - [`cpu`]: memcpy on a thread pool, for CPU engines (always built);
//! - `cuda` (cargo feature `cuda`, on by default): the CUDA driver API through `cudarc`, loaded at
//!   run time, so the build needs no CUDA toolkit and a binary runs on machines without a GPU;
//! - `hip` (cargo feature `hip`, off by default: it links ROCm's `libamdhip64`).
//!
//! Device copies are asynchronous. A copy is ordered after the work the engine has queued on its
//! stream so far and runs on the engine's own copy stream; [`CopyEngine::scatter`] may also make
//! the engine's stream wait for the load, so the layers that read the blocks see them without the
//! host waiting. The returned [`Fence`] completes when the bytes are in place: a save must be waited
//! for before its slots are committed, a load before its slots are released.
//!
//! [`open`] picks the backend by the tensors' device; every failure to find a driver, a library
//! or a device is a [`DeviceError::Unavailable`] with the reason, never a panic.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "hip")]
pub mod hip;
mod plan;
mod reaper;

use std::fmt;
use std::sync::Arc;

pub use plan::{CopyJob, Direction, Piece, plan_pieces};
pub use reaper::after;

use crate::pages::LayerPages;

/// Turns the CUDA copy kernel off (`0`, `off`, `false`, `no`): every piece goes as one
/// `cuMemcpyAsync`, which takes no SM time from the model, at the price of a call and a DMA setup
/// per page. An environment variable because the engine lives in the inference engine's workers.
pub const CUDA_COPY_KERNEL_ENV: &str = "KVTIER_CUDA_COPY_KERNEL";

/// The variables the copy engines read, in the inference engine's processes. They share the
/// agent's `KVTIER_` prefix: the agent's configuration leaves them alone.
pub const ENGINE_ENV: &[&str] = &[CUDA_COPY_KERNEL_ENV];

/// An accelerator family a copy engine serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Engine memory is ordinary host memory.
    Cpu,
    /// NVIDIA GPUs through the CUDA driver.
    Cuda,
    /// AMD GPUs through ROCm's HIP runtime.
    Hip,
}

impl Backend {
    /// Every backend, in the order [`probe`] reports them.
    pub const ALL: [Backend; 3] = [Backend::Cpu, Backend::Cuda, Backend::Hip];

    /// The name used in device strings (`cuda:0`), logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::Hip => "hip",
        }
    }

    /// Whether this build contains the backend (its cargo feature was on).
    pub fn is_built(self) -> bool {
        match self {
            Backend::Cpu => true,
            Backend::Cuda => cfg!(feature = "cuda"),
            Backend::Hip => cfg!(feature = "hip"),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a copy engine could not be made or could not copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The device string names no backend.
    #[error("unknown device {0:?} (expected cpu, cuda[:N] or hip[:N])")]
    UnknownDevice(String),
    /// This build lacks the backend.
    #[error("{0} copies are not built into this kvtier (cargo feature `{0}`)")]
    NotBuilt(Backend),
    /// The driver, its library or the device is missing: the engine recomputes instead.
    #[error("{backend} unavailable: {reason}")]
    Unavailable {
        /// The backend asked for.
        backend: Backend,
        /// What is missing, in words (for example "libcuda.so.1 not found").
        reason: String,
    },
    /// A driver call failed.
    #[error("{backend} {call} failed: {code}")]
    Call {
        /// The backend.
        backend: Backend,
        /// The driver function.
        call: &'static str,
        /// The driver's error name.
        code: String,
    },
    /// Slot or page addresses the engine cannot copy (outside every registered arena, say).
    #[error("{0}")]
    BadCopy(String),
}

/// A device as an engine names it: `cpu`, `cuda:0`, `hip:1` (`cuda` alone is device 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Device {
    /// Its accelerator family.
    pub backend: Backend,
    /// Its ordinal among the backend's devices visible to this process.
    pub index: u32,
}

impl std::str::FromStr for Device {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let unknown = || DeviceError::UnknownDevice(s.to_owned());
        let (kind, index) = match s.split_once(':') {
            Some((k, i)) => (k, i.parse::<u32>().map_err(|_| unknown())?),
            None => (s, 0),
        };
        let backend = match kind {
            "cpu" => Backend::Cpu,
            "cuda" => Backend::Cuda,
            "hip" | "rocm" => Backend::Hip,
            _ => return Err(unknown()),
        };
        Ok(Device { backend, index })
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.backend {
            Backend::Cpu => f.write_str("cpu"),
            b => write!(f, "{b}:{}", self.index),
        }
    }
}

/// Completion of an enqueued copy.
pub trait Completion: Send + Sync + fmt::Debug {
    /// Blocks until the copy is done; the error if it failed on the device.
    fn wait(&self) -> Result<(), DeviceError>;
    /// Whether the copy is done (an error counts as done).
    fn is_done(&self) -> bool;
}

/// The end of one batch of copies; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Fence(Option<Arc<dyn Completion>>);

impl Fence {
    /// A fence for copies that completed before it was made (the CPU engine's).
    pub fn done() -> Self {
        Fence(None)
    }

    /// A fence completing with `c`.
    pub fn new(c: Arc<dyn Completion>) -> Self {
        Fence(Some(c))
    }

    /// Blocks until the copies are done.
    pub fn wait(&self) -> Result<(), DeviceError> {
        self.0.as_ref().map_or(Ok(()), |c| c.wait())
    }

    /// Whether the copies are done.
    pub fn is_done(&self) -> bool {
        self.0.as_ref().is_none_or(|c| c.is_done())
    }
}

/// Moves block pages between an engine's memory and arena slots; see the module documentation.
pub trait CopyEngine: Send + Sync + fmt::Debug {
    /// The device this engine copies to and from.
    fn device(&self) -> Device;

    /// One line for logs: device name, driver, copy method.
    fn describe(&self) -> String;

    /// Makes `[base, base + len)` (an arena mapping) a target of device copies, pinning it for
    /// DMA. Idempotent for a range already registered; returns whether it recorded the range
    /// now, in which case [`Self::unregister`] must be called before the range is unmapped.
    fn register(&self, base: usize, len: usize) -> Result<bool, DeviceError>;

    /// Forgets a range registered at `base`, after the copies in flight.
    fn unregister(&self, base: usize);

    /// Enqueues copies between every job's block pages and its slot, the way `direction`
    /// says, at byte `slot_offset` of the block (layer-wise copies of later layers), after the
    /// work queued on `stream` (the engine's stream handle; 0 is the default stream; ignored by
    /// the CPU engine). With `stream_waits`, work queued on `stream` after this call runs after
    /// the copies (a load for the forward pass about to run); without, only the fence says when
    /// they are done. [`Self::gather`] and [`Self::scatter`] are the two uses.
    ///
    /// # Safety
    /// Until the fence completes, the source side of every job (its block's pages, or its slot
    /// range) must stay readable, and the destination side writable and used by nobody else.
    unsafe fn copy(
        &self,
        layers: &[LayerPages],
        jobs: &[CopyJob],
        direction: Direction,
        slot_offset: usize,
        stream: usize,
        stream_waits: bool,
    ) -> Result<Fence, DeviceError>;

    /// Enqueues copies of every job's block pages into its slot, at byte `slot_offset` of the
    /// block, after the work queued on `stream`; `stream` does not wait for them (vLLM waits for
    /// saves in `wait_for_save`).
    ///
    /// # Safety
    /// As [`Self::copy`]: the pages stay readable, the slot ranges writable and unshared, until
    /// the fence completes.
    unsafe fn gather(
        &self,
        layers: &[LayerPages],
        jobs: &[CopyJob],
        slot_offset: usize,
        stream: usize,
    ) -> Result<Fence, DeviceError> {
        // SAFETY: the caller's contract.
        unsafe { self.copy(layers, jobs, Direction::Gather, slot_offset, stream, false) }
    }

    /// Enqueues copies of every job's slot into its block's pages, after the work queued on
    /// `stream`, which waits for them if `stream_waits` (see [`Self::copy`]).
    ///
    /// # Safety
    /// As [`Self::copy`]: the slots stay readable, the pages writable and unshared, until the
    /// fence completes.
    unsafe fn scatter(
        &self,
        layers: &[LayerPages],
        jobs: &[CopyJob],
        stream: usize,
        stream_waits: bool,
    ) -> Result<Fence, DeviceError> {
        // SAFETY: the caller's contract.
        unsafe { self.copy(layers, jobs, Direction::Scatter, 0, stream, stream_waits) }
    }
}

/// Opens the copy engine for `device`.
pub fn open(device: Device) -> Result<Arc<dyn CopyEngine>, DeviceError> {
    match device.backend {
        Backend::Cpu => Ok(Arc::new(cpu::CpuEngine)),
        #[cfg(feature = "cuda")]
        Backend::Cuda => Ok(Arc::new(cuda::CudaEngine::open(device.index)?)),
        #[cfg(feature = "hip")]
        Backend::Hip => Ok(Arc::new(hip::HipEngine::open(device.index)?)),
        #[cfg(not(all(feature = "cuda", feature = "hip")))]
        b => Err(DeviceError::NotBuilt(b)),
    }
}

/// Whether `device` can be opened, without opening it (no context, no GPU memory taken): a
/// description of it, or why not. A scheduler process checks this before promising loads that
/// its workers could not perform.
pub fn check(device: Device) -> Result<String, DeviceError> {
    match device.backend {
        Backend::Cpu => Ok(cpu::CpuEngine.describe()),
        #[cfg(feature = "cuda")]
        Backend::Cuda => cuda::probe(device.index).map(|f| f.describe()),
        #[cfg(feature = "hip")]
        Backend::Hip => hip::probe(device.index),
        #[cfg(not(all(feature = "cuda", feature = "hip")))]
        b => Err(DeviceError::NotBuilt(b)),
    }
}

/// What each backend offers on this machine: its first device, or why there is none. The node
/// agent logs and exports this, so that an operator sees whether engines on the node get DMA
/// copies.
pub fn probe() -> Vec<(Backend, Result<String, DeviceError>)> {
    Backend::ALL
        .into_iter()
        .map(|b| (b, check(Device { backend: b, index: 0 })))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_parse_and_print() {
        let d: Device = "cuda:3".parse().unwrap();
        assert_eq!(
            d,
            Device {
                backend: Backend::Cuda,
                index: 3
            }
        );
        assert_eq!(d.to_string(), "cuda:3");
        assert_eq!("cuda".parse::<Device>().unwrap().index, 0);
        assert_eq!("cpu".parse::<Device>().unwrap().to_string(), "cpu");
        assert_eq!("rocm:1".parse::<Device>().unwrap().backend, Backend::Hip);
        assert!(matches!(
            "tpu:0".parse::<Device>(),
            Err(DeviceError::UnknownDevice(_))
        ));
        assert!(matches!(
            "cuda:x".parse::<Device>(),
            Err(DeviceError::UnknownDevice(_))
        ));
    }

    #[test]
    fn a_backend_left_out_of_the_build_says_so() {
        for b in Backend::ALL {
            if !b.is_built() {
                let e = open(Device { backend: b, index: 0 }).unwrap_err();
                assert_eq!(e, DeviceError::NotBuilt(b));
                assert!(e.to_string().contains("cargo feature"));
            }
        }
        let probed = probe();
        assert_eq!(probed.len(), 3);
        assert!(probed[0].1.is_ok(), "the CPU engine is always there");
    }
}

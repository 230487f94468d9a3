//! The CPU engine: engine memory is host memory, copied with memcpy on the thread pool.

use super::{CopyEngine, CopyJob, Device, DeviceError, Direction, Fence};
use crate::pages::{self, LayerPages};

/// memcpy on the calling thread and the thread pool; copies are done when the call returns.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuEngine;

/// Copies block `id`'s pages into `slot` (at least [`pages::block_len`] bytes).
///
/// # Safety
/// Every page of block `id` must be readable for the duration of the call.
pub unsafe fn gather_block(layers: &[LayerPages], id: usize, slot: &mut [u8]) {
    let mut at = 0;
    for l in layers {
        let src = (l.base + id * l.stride) as *const u8;
        // SAFETY: the page is readable (caller's contract) and the slice bounds check keeps the
        // write inside `slot`.
        unsafe { std::ptr::copy_nonoverlapping(src, slot[at..at + l.page].as_mut_ptr(), l.page) };
        at += l.page;
    }
}

/// Copies `slot` into block `id`'s pages.
///
/// # Safety
/// Every page of block `id` must be writable, and used by nobody else, for the duration of the
/// call.
pub unsafe fn scatter_block(layers: &[LayerPages], id: usize, slot: &[u8]) {
    let mut at = 0;
    for l in layers {
        let dst = (l.base + id * l.stride) as *mut u8;
        // SAFETY: the page is writable and unshared (caller's contract); the slice bounds check
        // keeps the read inside `slot`.
        unsafe { std::ptr::copy_nonoverlapping(slot[at..at + l.page].as_ptr(), dst, l.page) };
        at += l.page;
    }
}

impl CopyEngine for CpuEngine {
    fn device(&self) -> Device {
        Device {
            backend: super::Backend::Cpu,
            index: 0,
        }
    }

    fn describe(&self) -> String {
        format!("cpu: memcpy on {} threads", rayon::current_num_threads())
    }

    fn register(&self, _base: usize, _len: usize) -> Result<bool, DeviceError> {
        Ok(false)
    }

    fn unregister(&self, _base: usize) {}

    unsafe fn copy(
        &self,
        layers: &[LayerPages],
        jobs: &[CopyJob],
        direction: Direction,
        slot_offset: usize,
        _stream: usize,
        _stream_waits: bool,
    ) -> Result<Fence, DeviceError> {
        let len = pages::block_len(layers);
        let mut jobs = jobs.to_vec();
        pages::for_each(true, &mut jobs, |j| {
            let slot = (j.slot + slot_offset) as *mut u8;
            // SAFETY: the source side is readable, the destination side writable and unshared
            // (caller's contract); the slot range is the block's `len` bytes.
            unsafe {
                match direction {
                    Direction::Gather => {
                        gather_block(layers, j.block, std::slice::from_raw_parts_mut(slot, len))
                    }
                    Direction::Scatter => {
                        scatter_block(layers, j.block, std::slice::from_raw_parts(slot, len))
                    }
                }
            }
        });
        Ok(Fence::done())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_then_scatter_round_trips_pages() {
        // Two layers of 4 blocks, pages of 8 and 16 bytes with padding between blocks.
        let mut l0: Vec<u8> = (0..4 * 12).map(|i| i as u8).collect();
        let mut l1: Vec<u8> = (0..4 * 20).map(|i| 100 + i as u8).collect();
        let layers = [
            LayerPages {
                base: l0.as_mut_ptr() as usize,
                stride: 12,
                page: 8,
            },
            LayerPages {
                base: l1.as_mut_ptr() as usize,
                stride: 20,
                page: 16,
            },
        ];
        let mut slots = vec![0u8; 2 * 24];
        let base = slots.as_mut_ptr() as usize;
        let jobs = [
            CopyJob { block: 2, slot: base },
            CopyJob {
                block: 3,
                slot: base + 24,
            },
        ];
        // SAFETY: both layers are live vectors holding 4 blocks; the slots vector holds both slots.
        let fence = unsafe { CpuEngine.gather(&layers, &jobs, 0, 0) }.unwrap();
        assert!(fence.is_done());
        assert_eq!(&slots[..8], &l0[24..32]);
        assert_eq!(&slots[8..24], &l1[40..56]);
        assert_eq!(&slots[24..32], &l0[36..44]);
        let into0 = [CopyJob { block: 0, slot: base }];
        // SAFETY: as above; block 0 is written, nothing else reads it meanwhile.
        unsafe { CpuEngine.scatter(&layers, &into0, 0, true) }
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(&l0[0..8], &l0[24..32]);
        assert_eq!(&l1[0..16], &l1[40..56]);
        assert_eq!(l0[8], 8, "padding untouched");
        // A layer-wise save: only the second layer, at its offset in the block.
        let mut slot = [0u8; 24];
        let one = [CopyJob {
            block: 1,
            slot: slot.as_mut_ptr() as usize,
        }];
        // SAFETY: as above.
        unsafe { CpuEngine.gather(&layers[1..], &one, 8, 0) }.unwrap();
        assert_eq!(&slot[8..], &l1[20..36]);
        assert_eq!(&slot[..8], &[0; 8]);
    }
}

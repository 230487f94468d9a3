//! Copies between an engine's KV-cache pages and arena slots, for the engine-side bindings.
//!
//! An engine's KV cache is one tensor per layer; block `id` of a layer is one page at
//! `base + id * stride`, `page` bytes long. A block in the arena is the concatenation of its
//! pages over all layers, in layer order. The [`Copier`] trait is the seam for device backends:
//! the CPU one copies with memcpy on a thread pool; a CUDA or ROCm one would enqueue
//! asynchronous copies per page and wait for them in [`Copier::finish`].

use rayon::prelude::*;

/// Where one layer keeps its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerPages {
    /// Address of block 0's page.
    pub base: usize,
    /// Bytes from one block's page to the next.
    pub stride: usize,
    /// Bytes of one page.
    pub page: usize,
}

/// Bytes of one block in the arena for this layout.
pub fn block_len(layers: &[LayerPages]) -> usize {
    layers.iter().map(|l| l.page).sum()
}

/// Moves pages between engine memory and slots.
pub trait Copier: Send + Sync {
    /// Copies block `id`'s pages into `slot` (exactly [`block_len`] bytes).
    ///
    /// # Safety
    /// Every page of block `id` must be readable memory for the duration of the call.
    unsafe fn gather(&self, layers: &[LayerPages], id: usize, slot: &mut [u8]);

    /// Copies `slot` into block `id`'s pages.
    ///
    /// # Safety
    /// Every page of block `id` must be writable memory, used by nobody else, for the duration
    /// of the call.
    unsafe fn scatter(&self, layers: &[LayerPages], id: usize, slot: &[u8]);

    /// Whether blocks may be copied from several threads at once.
    fn parallel(&self) -> bool;

    /// Waits for copies still in flight (a device backend's stream); the CPU copies are done
    /// when `gather`/`scatter` return.
    fn finish(&self) {}
}

/// memcpy on the calling threads.
#[derive(Debug)]
pub struct CpuCopier;

impl Copier for CpuCopier {
    unsafe fn gather(&self, layers: &[LayerPages], id: usize, slot: &mut [u8]) {
        let mut at = 0;
        for l in layers {
            let src = (l.base + id * l.stride) as *const u8;
            // SAFETY: the page is readable (caller's contract) and `slot` holds the block,
            // whose length is the sum of the pages (checked by the caller).
            unsafe { std::ptr::copy_nonoverlapping(src, slot[at..at + l.page].as_mut_ptr(), l.page) };
            at += l.page;
        }
    }

    unsafe fn scatter(&self, layers: &[LayerPages], id: usize, slot: &[u8]) {
        let mut at = 0;
        for l in layers {
            let dst = (l.base + id * l.stride) as *mut u8;
            // SAFETY: the page is writable and unshared (caller's contract); `slot` holds the
            // block, whose length is the sum of the pages (checked by the caller).
            unsafe { std::ptr::copy_nonoverlapping(slot[at..at + l.page].as_ptr(), dst, l.page) };
            at += l.page;
        }
    }

    fn parallel(&self) -> bool {
        true
    }
}

/// Runs `f` over `items`, on the thread pool when `parallel` (a copier's
/// [`Copier::parallel`]).
pub fn for_each<T: Send>(parallel: bool, items: &mut [T], f: impl Fn(&mut T) + Sync + Send) {
    if parallel && items.len() > 1 {
        items.par_iter_mut().for_each(f);
    } else {
        items.iter_mut().for_each(f);
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
        let mut slot = vec![0u8; block_len(&layers)];
        // SAFETY: both layers are live vectors holding 4 blocks.
        unsafe { CpuCopier.gather(&layers, 2, &mut slot) };
        assert_eq!(&slot[..8], &l0[24..32]);
        assert_eq!(&slot[8..], &l1[40..56]);
        // SAFETY: as above; block 0 is written, nothing else reads it meanwhile.
        unsafe { CpuCopier.scatter(&layers, 0, &slot) };
        assert_eq!(&l0[0..8], &l0[24..32]);
        assert_eq!(&l1[0..16], &l1[40..56]);
        assert_eq!(l0[8], 8, "padding untouched");
    }
}

//! Copies between an engine's KV-cache pages and arena slots, for the engine-side bindings.
//!
//! An engine's KV cache is one tensor per layer; block `id` of a layer is one page at
//! `base + id * stride`, `page` bytes long. A block in the arena is the concatenation of its
//! pages over all layers, in layer order. The copies themselves are [`crate::device`]'s.

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

/// Runs `f` over `items`, on the thread pool when `parallel` and there is more than one.
pub fn for_each<T: Send>(parallel: bool, items: &mut [T], f: impl Fn(&mut T) + Sync + Send) {
    if parallel && items.len() > 1 {
        items.par_iter_mut().for_each(f);
    } else {
        items.iter_mut().for_each(f);
    }
}

//! Slab allocator shared by the host arena and the disk tier.
//!
//! The space is cut into equal slabs; each slab, when first used, is given to one size class and
//! cut into slots of that size. Slot sizes are page multiples rounded to at most 12.5 % above the
//! request (exact for power-of-two blocks, which is what engines produce), so several block sizes
//! coexist without external fragmentation: a slab that empties returns to the free pool and can
//! serve any class. Not thread-safe by itself; each tier wraps it in its metadata lock.

use std::collections::HashMap;

/// Slot alignment: a page, so slots can be used for O_DIRECT and DMA.
pub const SLOT_ALIGN: u64 = 4096;

/// One allocated slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot {
    /// Slab number.
    pub slab: u32,
    /// Slot number within the slab.
    pub index: u32,
    /// Size of the slot in bytes (≥ the block it holds).
    pub size: u64,
}

impl Slot {
    /// Byte offset of the slot from the start of its slab.
    pub const fn offset_in_slab(&self) -> u64 {
        self.index as u64 * self.size
    }
}

#[derive(Debug)]
struct Slab {
    class: Option<u32>,
    used: u32,
    slots: u32,
    bitmap: Vec<u64>,
    in_partial: bool,
}

#[derive(Debug)]
struct SizeClass {
    slot_size: u64,
    /// Slabs of this class with at least one free slot.
    partial: Vec<u32>,
}

/// The largest slot size not above `len` (a slab of that size holds any block whose slot fits).
pub fn slot_size_floor(len: u64) -> u64 {
    let len = len / SLOT_ALIGN * SLOT_ALIGN;
    if len <= 16 * SLOT_ALIGN {
        return len;
    }
    let step = (1u64 << (63 - len.leading_zeros())) / 8;
    len / step * step
}

/// How far from the least-recently-used end a same-size victim is preferred to reclaiming the
/// oldest slab. Beyond it, the oldest blocks are of other sizes, and skipping them for a younger
/// same-size block would both break LRU order (they would never leave) and make every
/// reservation walk past them.
pub const SAME_SIZE_WINDOW: usize = 32;

/// Chooses blocks to evict so that a slot of `size` bytes can be allocated.
///
/// `lru` lists `(key, slot, evictable)` oldest first. An evictable block among the
/// [`SAME_SIZE_WINDOW`] oldest whose slot has exactly `size` bytes is enough: its slot serves the
/// new block. Otherwise freeing slots of other sizes helps only once a whole slab is empty, so
/// the whole slab of the oldest evictable block is chosen — the first slab, oldest first, in
/// which every block is evictable and `busy(slab)` (slots reserved or in flight) is false. When
/// no slab can go, any evictable same-size block will do. Empty when nothing can go.
pub fn victims_for<K: Copy>(
    lru: impl Iterator<Item = (K, Slot, bool)>,
    size: u64,
    busy: impl Fn(u32) -> bool,
) -> Vec<K> {
    let mut seen = Vec::new();
    for (n, (k, slot, evictable)) in lru.enumerate() {
        if evictable && slot.size == size && n < SAME_SIZE_WINDOW {
            return vec![k];
        }
        seen.push((k, slot.slab, evictable, slot.size == size));
    }
    let mut tried = std::collections::HashSet::new();
    for &(_, slab, evictable, _) in &seen {
        if !evictable || !tried.insert(slab) || busy(slab) {
            continue;
        }
        let members = seen.iter().filter(|m| m.1 == slab);
        if members.clone().all(|m| m.2) {
            return members.map(|m| m.0).collect();
        }
    }
    seen.iter()
        .find(|m| m.2 && m.3)
        .map(|m| vec![m.0])
        .unwrap_or_default()
}

/// How block lengths map to slot sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeClasses {
    /// Page multiples, rounded to eight steps per power of two ([`slot_size_for`]): a bounded
    /// number of classes whatever sizes arrive (the host arena).
    Geometric,
    /// The exact page-rounded length: no wasted space, one class per distinct length (the disk
    /// tier, where engines write few distinct record sizes and space is the scarce resource).
    PageExact,
}

impl SizeClasses {
    /// The slot size serving a block of `len` bytes.
    pub fn slot_size(self, len: u64) -> u64 {
        match self {
            Self::Geometric => slot_size_for(len),
            Self::PageExact => len.max(1).div_ceil(SLOT_ALIGN) * SLOT_ALIGN,
        }
    }
}

/// Size-classed slab allocator over `max_slabs × slab_size` bytes.
#[derive(Debug)]
pub struct SlabAllocator {
    policy: SizeClasses,
    slab_size: u64,
    max_slabs: u32,
    slabs: Vec<Slab>,
    free_slabs: Vec<u32>,
    classes: Vec<SizeClass>,
    class_by_size: HashMap<u64, u32>,
    used_bytes: u64,
}

/// The slot size serving a block of `len` bytes; `u64::MAX`, larger than any slab, for a
/// length whose slot size would not fit in a `u64` (a length from a peer or client that lies).
pub fn slot_size_for(len: u64) -> u64 {
    let Some(len) = len.max(1).checked_next_multiple_of(SLOT_ALIGN) else {
        return u64::MAX;
    };
    if len <= 16 * SLOT_ALIGN {
        return len;
    }
    let pow = 1u64 << (63 - len.leading_zeros());
    let step = pow / 8;
    len.checked_next_multiple_of(step).unwrap_or(u64::MAX)
}

impl SlabAllocator {
    /// An allocator with no slabs yet; [`Self::add_slab`] makes them available.
    pub fn new(policy: SizeClasses, slab_size: u64, max_slabs: u32) -> Self {
        assert!(slab_size >= SLOT_ALIGN && slab_size % SLOT_ALIGN == 0);
        Self {
            policy,
            slab_size,
            max_slabs,
            slabs: Vec::new(),
            free_slabs: Vec::new(),
            classes: Vec::new(),
            class_by_size: HashMap::new(),
            used_bytes: 0,
        }
    }

    /// Slab size in bytes.
    pub fn slab_size(&self) -> u64 {
        self.slab_size
    }

    /// Number of slabs created so far.
    pub fn slab_count(&self) -> u32 {
        self.slabs.len() as u32
    }

    /// Most slabs this allocator may create.
    pub fn max_slabs(&self) -> u32 {
        self.max_slabs
    }

    /// Caps the number of slabs (e.g. when the disk filled up); existing slabs stay.
    pub fn cap_slabs(&mut self, max: u32) {
        self.max_slabs = max.max(self.slab_count());
    }

    /// Whether another slab may be added.
    pub fn can_grow(&self) -> bool {
        self.slab_count() < self.max_slabs
    }

    /// Adds a slab to the free pool and returns its number, or `None` at `max_slabs`.
    pub fn add_slab(&mut self) -> Option<u32> {
        if !self.can_grow() {
            return None;
        }
        let id = self.slab_count();
        self.slabs.push(Slab {
            class: None,
            used: 0,
            slots: 0,
            bitmap: Vec::new(),
            in_partial: false,
        });
        self.free_slabs.push(id);
        Some(id)
    }

    /// Bytes of slots in use.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// Largest block length that fits a slot.
    pub fn max_block_len(&self) -> u64 {
        self.slab_size
    }

    fn class_id(&mut self, slot_size: u64) -> u32 {
        if let Some(&id) = self.class_by_size.get(&slot_size) {
            return id;
        }
        let id = self.classes.len() as u32;
        self.classes.push(SizeClass {
            slot_size,
            partial: Vec::new(),
        });
        self.class_by_size.insert(slot_size, id);
        id
    }

    fn assign(&mut self, slab: u32, class: u32) {
        let slot_size = self.classes[class as usize].slot_size;
        let slots = (self.slab_size / slot_size) as u32;
        let s = &mut self.slabs[slab as usize];
        s.class = Some(class);
        s.used = 0;
        s.slots = slots;
        s.bitmap = vec![0; slots.div_ceil(64) as usize];
        s.in_partial = true;
        self.classes[class as usize].partial.push(slab);
    }

    /// Allocates a slot for a block of `len` bytes; `None` when no slab has room (evict, grow, or
    /// give up). Blocks larger than a slab never fit: check [`Self::max_block_len`] first.
    pub fn alloc(&mut self, len: u64) -> Option<Slot> {
        let slot_size = self.policy.slot_size(len);
        if slot_size > self.slab_size {
            return None;
        }
        let class = self.class_id(slot_size);
        let slab = loop {
            match self.classes[class as usize].partial.last().copied() {
                Some(id) => {
                    let s = &self.slabs[id as usize];
                    if s.class == Some(class) && s.used < s.slots {
                        break id;
                    }
                    self.classes[class as usize].partial.pop();
                    self.slabs[id as usize].in_partial = false;
                }
                None => {
                    let id = self.free_slabs.pop()?;
                    self.assign(id, class);
                    break id;
                }
            }
        };
        let s = &mut self.slabs[slab as usize];
        let (word, bit) = s
            .bitmap
            .iter()
            .enumerate()
            .find_map(|(w, bits)| (!bits != 0).then(|| (w, (!bits).trailing_zeros())))?;
        let index = word as u32 * 64 + bit;
        debug_assert!(index < s.slots);
        s.bitmap[word] |= 1 << bit;
        s.used += 1;
        if s.used == s.slots {
            s.in_partial = false;
            self.classes[class as usize].partial.retain(|&id| id != slab);
        }
        self.used_bytes += slot_size;
        Some(Slot {
            slab,
            index,
            size: slot_size,
        })
    }

    /// Marks a specific slot as used (recovery of persisted state). Returns `false` when the slot
    /// conflicts with the slab's class or is already taken.
    pub fn claim(&mut self, slot: Slot) -> bool {
        if slot.slab >= self.slab_count()
            || self.policy.slot_size(slot.size) != slot.size
            || slot.size > self.slab_size
        {
            return false;
        }
        let class = self.class_id(slot.size);
        let s = &self.slabs[slot.slab as usize];
        match s.class {
            None => {
                self.free_slabs.retain(|&id| id != slot.slab);
                self.assign(slot.slab, class);
            }
            Some(c) if c == class => {}
            Some(_) => return false,
        }
        let s = &mut self.slabs[slot.slab as usize];
        if slot.index >= s.slots {
            return false;
        }
        let (w, b) = ((slot.index / 64) as usize, slot.index % 64);
        if s.bitmap[w] & (1 << b) != 0 {
            return false;
        }
        s.bitmap[w] |= 1 << b;
        s.used += 1;
        if s.used == s.slots && s.in_partial {
            s.in_partial = false;
            self.classes[class as usize].partial.retain(|&id| id != slot.slab);
        }
        self.used_bytes += slot.size;
        true
    }

    /// Frees a slot. A slab whose last slot is freed returns to the free pool for any class.
    pub fn free(&mut self, slot: Slot) {
        let s = &mut self.slabs[slot.slab as usize];
        let (w, b) = ((slot.index / 64) as usize, slot.index % 64);
        debug_assert!(s.bitmap[w] & (1 << b) != 0, "double free of {slot:?}");
        if s.bitmap[w] & (1 << b) == 0 {
            return;
        }
        s.bitmap[w] &= !(1 << b);
        s.used -= 1;
        self.used_bytes -= slot.size;
        let class = s.class.expect("allocated slab has a class");
        if s.used == 0 {
            s.class = None;
            s.bitmap = Vec::new();
            s.in_partial = false;
            self.classes[class as usize].partial.retain(|&id| id != slot.slab);
            self.free_slabs.push(slot.slab);
        } else if !s.in_partial {
            s.in_partial = true;
            self.classes[class as usize].partial.push(slot.slab);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_bound_waste() {
        assert_eq!(slot_size_for(1), 4096);
        assert_eq!(slot_size_for(4096), 4096);
        assert_eq!(slot_size_for(65536), 65536);
        assert_eq!(slot_size_for(1 << 20), 1 << 20);
        assert_eq!(slot_size_for((1 << 20) + 1), (1 << 20) + (1 << 17));
        // A length no slot can serve saturates rather than wrapping to a small (or zero) size.
        for huge in [u64::MAX, u64::MAX - SLOT_ALIGN, (15 << 60) + 1] {
            assert_eq!(slot_size_for(huge), u64::MAX, "{huge}");
        }
        for len in (1..10_000_000u64).step_by(9973) {
            let s = slot_size_for(len);
            assert!(s >= len && s % SLOT_ALIGN == 0);
            assert!(
                s <= (len + SLOT_ALIGN).max(len + len / 8 + SLOT_ALIGN),
                "{len} -> {s}"
            );
        }
    }

    #[test]
    fn mixed_sizes_reuse_empty_slabs() {
        let mut a = SlabAllocator::new(SizeClasses::Geometric, 1 << 20, 4);
        for _ in 0..4 {
            a.add_slab();
        }
        // Fill everything with 64 KiB slots.
        let small: Vec<_> = (0..64).map(|_| a.alloc(65536).unwrap()).collect();
        assert!(a.alloc(65536).is_none());
        assert!(a.alloc(1 << 20).is_none());
        // Free one whole slab's worth: a 1 MiB block now fits.
        for s in small.iter().filter(|s| s.slab == small[0].slab) {
            a.free(*s);
        }
        let big = a.alloc(1 << 20).unwrap();
        assert_eq!(big.slab, small[0].slab);
        assert_eq!(a.used_bytes(), 48 * 65536 + (1 << 20));
    }

    #[test]
    fn claim_rebuilds_state() {
        let mut a = SlabAllocator::new(SizeClasses::Geometric, 1 << 20, 2);
        a.add_slab();
        a.add_slab();
        let s = Slot {
            slab: 1,
            index: 3,
            size: 65536,
        };
        assert!(a.claim(s));
        assert!(!a.claim(s), "double claim");
        assert!(!a.claim(Slot { size: 131072, ..s }), "class conflict");
        let others: Vec<_> = std::iter::from_fn(|| a.alloc(65536)).collect();
        assert_eq!(others.len(), 31);
        assert!(!others.contains(&s));
    }

    #[test]
    fn slot_size_floor_is_a_class_boundary() {
        for len in (4096..50_000_000u64).step_by(77_777) {
            let f = slot_size_floor(len);
            assert!(f <= len && slot_size_for(f) == f, "{len} -> {f}");
            assert!(
                slot_size_for(f + 1) > len || f + 1 > len,
                "{len}: {f} is the largest"
            );
        }
        assert_eq!(slot_size_floor(12_800 << 10), 12 << 20);
    }

    #[test]
    fn victims_prefer_a_same_size_slot_then_a_whole_slab() {
        let s = |slab, index, size| Slot { slab, index, size };
        // Oldest first: key 1 (slab 0, pinned), 2 (slab 1), 3 (slab 0), 4 (slab 1, 8 KiB).
        let lru = || {
            vec![
                (1, s(0, 0, 4096), false),
                (2, s(1, 0, 4096), true),
                (3, s(0, 1, 4096), true),
                (4, s(1, 1, 8192), true),
            ]
            .into_iter()
        };
        assert_eq!(victims_for(lru(), 8192, |_| false), vec![4]);
        // No 64 KiB slot anywhere: slab 0 holds a pinned block, so all of slab 1 goes.
        assert_eq!(victims_for(lru(), 65536, |_| false), vec![2, 4]);
        assert!(victims_for(lru(), 65536, |slab| slab == 1).is_empty());
    }

    #[test]
    fn old_blocks_of_another_size_go_before_a_young_same_size_one() {
        let s = |slab, index, size| Slot { slab, index, size };
        // Many old 4 KiB blocks in slab 0, then one 8 KiB block in slab 1.
        let n = SAME_SIZE_WINDOW as u32 + 8;
        let lru = || {
            (0..n)
                .map(move |i| (i, s(0, i, 4096), true))
                .chain(std::iter::once((n, s(1, 0, 8192), true)))
        };
        let v = victims_for(lru(), 8192, |_| false);
        assert_eq!(
            v,
            (0..n).collect::<Vec<_>>(),
            "the oldest slab goes, not the young block"
        );
        // If that slab cannot go, the young same-size block still can.
        assert_eq!(victims_for(lru(), 8192, |slab| slab == 0), vec![n]);
    }

    #[test]
    fn too_large_never_fits() {
        let mut a = SlabAllocator::new(SizeClasses::PageExact, 1 << 20, 1);
        a.add_slab();
        assert!(a.alloc((1 << 20) + 1).is_none());
    }
}

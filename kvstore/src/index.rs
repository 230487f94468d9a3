//! The per-tier block index: blocks in LRU order with their slots and pins. Shared by the host
//! and disk tiers, which differ in what an entry carries but not in how it is found, pinned or
//! chosen for eviction.

use std::ops::{Deref, DerefMut};

use lru::LruCache;

use crate::alloc::{Slot, victims_for};
use crate::key::BlockKey;

/// What the index needs to know of a tier's entry.
pub(crate) trait IndexEntry {
    /// The slot holding the block.
    fn slot(&self) -> Slot;
    /// User pins ([`SlotIndex::pin`]).
    fn pins_mut(&mut self) -> &mut u32;
    /// Whether nothing (user pin, reader) holds the block.
    fn evictable(&self) -> bool;
}

/// Blocks of one tier, least recently used last. Dereferences to the LRU map for the
/// tier-specific operations.
#[derive(Debug)]
pub(crate) struct SlotIndex<E> {
    entries: LruCache<BlockKey, E>,
}

impl<E: IndexEntry> SlotIndex<E> {
    pub(crate) fn new() -> Self {
        Self {
            entries: LruCache::unbounded(),
        }
    }

    /// For each key, whether it is indexed (without touching the LRU order).
    pub(crate) fn contains_many(&self, keys: &[BlockKey]) -> Vec<bool> {
        keys.iter().map(|k| self.entries.contains(k)).collect()
    }

    /// Adds a user pin; `false` if absent.
    pub(crate) fn pin(&mut self, key: &BlockKey) -> bool {
        self.entries.peek_mut(key).map(|e| *e.pins_mut() += 1).is_some()
    }

    /// Drops one user pin; `false` if the block had none.
    pub(crate) fn unpin(&mut self, key: &BlockKey) -> bool {
        match self.entries.peek_mut(key).map(|e| e.pins_mut()) {
            Some(pins) if *pins > 0 => {
                *pins -= 1;
                true
            }
            _ => false,
        }
    }

    /// Takes an evictable block out of the index; `None` if absent, pinned or being read.
    pub(crate) fn pop_evictable(&mut self, key: &BlockKey) -> Option<E> {
        if self.entries.peek(key).is_none_or(|e| !e.evictable()) {
            return None;
        }
        self.entries.pop(key)
    }

    /// Blocks to evict for a slot of `size` bytes (see [`victims_for`]); `busy(slab)` tells
    /// slabs with slots reserved or in flight.
    pub(crate) fn victims(&self, size: u64, busy: impl Fn(u32) -> bool) -> Vec<BlockKey> {
        let lru = self
            .entries
            .iter()
            .rev()
            .map(|(k, e)| (*k, e.slot(), e.evictable()));
        victims_for(lru, size, busy)
    }
}

impl<E> Deref for SlotIndex<E> {
    type Target = LruCache<BlockKey, E>;
    fn deref(&self) -> &Self::Target {
        &self.entries
    }
}

impl<E> DerefMut for SlotIndex<E> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.entries
    }
}

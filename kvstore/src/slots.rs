//! The per-tier block index: blocks in LRU order with their slots, pins and readers. Shared by
//! the host and disk tiers, which differ only in the metadata an entry carries (`M`).

use std::ops::{Deref, DerefMut};

use lru::LruCache;

use crate::alloc::{Slot, victims_for};
use crate::key::BlockKey;

/// One indexed block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry<M> {
    /// Where the block lives in the tier.
    pub(crate) slot: Slot,
    /// Payload length.
    pub(crate) len: u64,
    /// User pins ([`SlotIndex::pin`]).
    pub(crate) pins: u32,
    /// Readers ([`SlotIndex::acquire`]), counted apart from user pins so that an unbalanced
    /// `unpin` can never take a reader's protection away.
    pub(crate) readers: u32,
    /// Tier-specific metadata.
    pub(crate) meta: M,
    /// Found corrupt: no new readers; dropped when the last reader leaves.
    pub(crate) doomed: bool,
}

impl<M> Entry<M> {
    pub(crate) fn new(slot: Slot, len: u64, meta: M) -> Self {
        Self {
            slot,
            len,
            pins: 0,
            readers: 0,
            meta,
            doomed: false,
        }
    }

    /// Whether nothing (user pin, reader) holds the block.
    pub(crate) fn evictable(&self) -> bool {
        self.pins == 0 && self.readers == 0
    }
}

/// Blocks of one tier, least recently used last. Dereferences to the LRU map for the
/// tier-specific operations.
#[derive(Debug)]
pub(crate) struct SlotIndex<M> {
    entries: LruCache<BlockKey, Entry<M>>,
}

impl<M: Copy> SlotIndex<M> {
    pub(crate) fn new() -> Self {
        Self {
            entries: LruCache::unbounded(),
        }
    }

    /// For each key, whether it is indexed (without touching the LRU order).
    pub(crate) fn contains_many(&self, keys: &[BlockKey]) -> Vec<bool> {
        keys.iter().map(|k| self.entries.contains(k)).collect()
    }

    /// Marks a block most recently used and adds a reader; a copy of its entry.
    pub(crate) fn acquire(&mut self, key: &BlockKey) -> Option<Entry<M>> {
        self.entries.get_mut(key).filter(|e| !e.doomed).map(|e| {
            e.readers += 1;
            *e
        })
    }

    /// Adds a reader like [`Self::acquire`] but leaves the LRU order as it is (a read on the
    /// tier's own behalf, not a use of the block).
    pub(crate) fn acquire_in_place(&mut self, key: &BlockKey) -> Option<Entry<M>> {
        self.entries.peek_mut(key).filter(|e| !e.doomed).map(|e| {
            e.readers += 1;
            *e
        })
    }

    /// Drops a reader added by [`Self::acquire`] (absent keys are ignored). Returns the entry
    /// when it was doomed and this was its last reader: it is out of the index now, and its slot
    /// is the caller's to free.
    pub(crate) fn release(&mut self, key: &BlockKey) -> Option<Entry<M>> {
        let e = self.entries.peek_mut(key)?;
        e.readers = e.readers.saturating_sub(1);
        if e.doomed && e.readers == 0 {
            return self.entries.pop(key);
        }
        None
    }

    /// Marks a block corrupt: no new readers, and it leaves the index with its last reader
    /// (user pins do not keep it: there is no data left to protect). Returns the entry if it
    /// left the index now.
    pub(crate) fn doom(&mut self, key: &BlockKey) -> Option<Entry<M>> {
        let e = self.entries.peek_mut(key)?;
        e.doomed = true;
        if e.readers == 0 {
            return self.entries.pop(key);
        }
        None
    }

    /// Adds a user pin; the block's length, `None` if absent.
    pub(crate) fn pin(&mut self, key: &BlockKey) -> Option<u64> {
        self.entries.peek_mut(key).map(|e| {
            e.pins += 1;
            e.len
        })
    }

    /// Drops one user pin; `false` if the block had none.
    pub(crate) fn unpin(&mut self, key: &BlockKey) -> bool {
        match self.entries.peek_mut(key) {
            Some(e) if e.pins > 0 => {
                e.pins -= 1;
                true
            }
            _ => false,
        }
    }

    /// Takes an evictable block out of the index; `None` if absent, pinned or being read.
    pub(crate) fn pop_evictable(&mut self, key: &BlockKey) -> Option<Entry<M>> {
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
            .map(|(k, e)| (*k, e.slot, e.evictable()));
        victims_for(lru, size, busy)
    }
}

impl<M> Deref for SlotIndex<M> {
    type Target = LruCache<BlockKey, Entry<M>>;
    fn deref(&self) -> &Self::Target {
        &self.entries
    }
}

impl<M> DerefMut for SlotIndex<M> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.entries
    }
}

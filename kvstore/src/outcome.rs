//! Results of storing a block: a cache may always decline.

/// What happened to a block handed to a tier or the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The block is stored now.
    Stored,
    /// The block was already stored (or being stored by another caller); nothing was written.
    AlreadyStored,
    /// The block was declined; the caller loses nothing but the cache entry.
    NotStored(NotStoredReason),
}

impl PutOutcome {
    /// Whether the block is present after the call.
    pub fn is_present(self) -> bool {
        matches!(self, Self::Stored | Self::AlreadyStored)
    }
}

/// Why a block was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotStoredReason {
    /// No space could be freed (everything left is pinned, or the disk is full).
    NoSpace,
    /// The block is larger than the tier's largest slot.
    TooLarge,
    /// The write failed; the error was logged and counted.
    Io,
    /// Another writer was still storing the block when the caller stopped waiting for it
    /// ([`TieredStore::reserve_batch_after_writers`](crate::TieredStore::reserve_batch_after_writers)).
    Busy,
}

//! Handles to arena slots held through one connection, and the connection's lifetime they are
//! tied to.
//!
//! The agent gives back every slot of a connection when the connection ends. A handle must then
//! stop touching its slot, which the agent may already have handed to someone else: every copy
//! through a handle holds the connection's `alive` lock for reading, and ending a connection
//! takes it for writing (waiting for copies in flight) before the socket closes. A handle that
//! is dropped without being committed, aborted or released is remembered as an orphan and given
//! back on the connection's next call, so a forgotten handle does not hold its slot for the
//! connection's whole life.

use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::arena::HostArena;
use crate::key::{BlockHash, Namespace};
use crate::stats::TierLevel;

/// One connection to the agent as its handles see it.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) arena: HostArena,
    /// The agent instance that owns the arena.
    pub(super) instance: u64,
    alive: Arc<RwLock<bool>>,
    orphans: Mutex<Vec<Orphan>>,
    /// Run before the arena is unmapped (a device engine forgetting its registration).
    unmap_hooks: Mutex<Vec<UnmapHook>>,
}

struct UnmapHook(Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for UnmapHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnmapHook")
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for hook in self.unmap_hooks.get_mut().drain(..) {
            (hook.0)();
        }
    }
}

/// Keeps a connection from ending, and its arena mapped, while a device copy through its slots
/// is in flight; see [`Reserved::hold`].
#[derive(Debug)]
pub struct LiveHold {
    // Field order: the lock is let go before the link (and maybe the mapping) is.
    _alive: parking_lot::ArcRwLockReadGuard<parking_lot::RawRwLock, bool>,
    _link: Arc<Link>,
}

/// A handle dropped while still holding its slot.
#[derive(Debug, Clone, Copy)]
pub(super) struct Orphan {
    pub(super) ns: Namespace,
    pub(super) hash: BlockHash,
    /// A reservation (to abort) or a lease (to release).
    pub(super) reserved: bool,
}

impl Link {
    pub(super) fn new(arena: HostArena, instance: u64) -> Self {
        Self {
            arena,
            instance,
            alive: Arc::new(RwLock::new(true)),
            orphans: Mutex::new(Vec::new()),
            unmap_hooks: Mutex::new(Vec::new()),
        }
    }

    /// Marks the connection ended, after any copy in flight through its handles.
    pub(super) fn end(&self) {
        *self.alive.write() = false;
        self.orphans.lock().clear();
    }

    pub(super) fn is_alive(&self) -> bool {
        *self.alive.read()
    }

    /// Makes the arena mapping a target of `engine`'s copies (once per mapping), undone just
    /// before the mapping goes.
    pub(super) fn register_with(
        &self,
        engine: &Arc<dyn crate::device::CopyEngine>,
    ) -> Result<(), crate::device::DeviceError> {
        let (base, len) = (self.arena.as_ptr() as usize, self.arena.len() as usize);
        if engine.register(base, len)? {
            let engine = Arc::downgrade(engine);
            let hook = move || {
                if let Some(e) = engine.upgrade() {
                    e.unregister(base);
                }
            };
            self.unmap_hooks.lock().push(UnmapHook(Box::new(hook)));
        }
        Ok(())
    }

    pub(super) fn take_orphans(&self) -> Vec<Orphan> {
        std::mem::take(&mut *self.orphans.lock())
    }

    /// Whether `offset..offset + len` lies inside the arena.
    pub(super) fn contains(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.arena.len())
    }

    /// Runs `copy` while the connection is known to be alive; `false` if it had ended.
    pub(super) fn with_live<R>(&self, copy: impl FnOnce(&HostArena) -> R) -> Option<R> {
        let alive = self.alive.read();
        alive.then(|| copy(&self.arena))
    }

    fn orphan(&self, o: Orphan) {
        if self.is_alive() {
            self.orphans.lock().push(o);
        }
    }
}

/// What every slot handle carries.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) ns: Namespace,
    pub(super) hash: BlockHash,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) link: Arc<Link>,
    /// A reservation (aborted if dropped unsettled) or a lease (released).
    pub(super) reserved: bool,
    /// Committed, aborted or released: nothing to give back on drop.
    pub(super) settled: bool,
}

/// A slot reserved for writing one block. Write it with [`super::Client::write`] (or through
/// [`Reserved::ptr`]), then commit or abort it. Dropped unsettled, it is aborted on the
/// connection's next call.
#[derive(Debug)]
pub struct Reserved(pub(super) Slot);

/// A block pinned for reading. Read it with [`super::Client::read`] (or through
/// [`Acquired::ptr`]), then release it. Dropped unreleased, it is released on the connection's
/// next call.
#[derive(Debug)]
pub struct Acquired(pub(super) Slot, pub(super) TierLevel);

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.settled {
            self.link.orphan(Orphan {
                ns: self.ns,
                hash: self.hash,
                reserved: self.reserved,
            });
        }
    }
}

macro_rules! slot_accessors {
    ($t:ty) => {
        impl $t {
            /// The block's namespace.
            pub fn namespace(&self) -> &Namespace {
                &self.0.ns
            }

            /// The block's hash.
            pub fn hash(&self) -> &BlockHash {
                &self.0.hash
            }

            /// Byte offset of the slot in the arena.
            pub fn offset(&self) -> u64 {
                self.0.offset
            }

            /// Length of the block in bytes.
            pub fn len(&self) -> u64 {
                self.0.len
            }

            /// Whether the block is empty (never: blocks hold at least one byte).
            pub fn is_empty(&self) -> bool {
                self.0.len == 0
            }

            /// Whether the connection that holds the slot is still open: once it is not, the
            /// slot may belong to someone else and must not be touched.
            pub fn is_live(&self) -> bool {
                self.0.link.is_alive()
            }

            /// Holds the connection open, and the arena mapped, until the hold is dropped;
            /// `None` when the connection has ended. For an asynchronous copy (a device DMA)
            /// through [`Self::ptr`]: ending the connection waits for every hold, so a hold must
            /// be let go when the copy completes (`device::after`), not when a caller gets round
            /// to it.
            pub fn hold(&self) -> Option<LiveHold> {
                let alive = self.0.link.alive.read_arc();
                (*alive).then(|| LiveHold {
                    _alive: alive,
                    _link: Arc::clone(&self.0.link),
                })
            }

            /// Makes this slot's arena mapping a target of `engine`'s copies (once per
            /// mapping), undone when the mapping goes.
            pub fn register_with(
                &self,
                engine: &Arc<dyn crate::device::CopyEngine>,
            ) -> Result<(), crate::device::DeviceError> {
                self.0.link.register_with(engine)
            }

            /// Whether this slot lies in the same arena mapping as `other`'s.
            pub fn same_mapping(&self, other: &Self) -> bool {
                Arc::ptr_eq(&self.0.link, &other.0.link)
            }
        }
    };
}
slot_accessors!(Reserved);
slot_accessors!(Acquired);

impl Reserved {
    /// Runs `fill` on the slot's bytes while the connection is held open; `None` (and `fill`
    /// not run) when the connection has ended. Safe to run for many handles on many threads:
    /// each slot is its holder's alone.
    pub fn with_slot_mut<R>(&mut self, fill: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        let (offset, len) = (self.0.offset, self.0.len as usize);
        self.0.link.with_live(|arena| {
            // SAFETY: the agent gave this slot to this connection alone until it is committed or
            // aborted (which consumes the handle, borrowed mutably here); the connection stays
            // open while the `alive` lock is held; the range was checked against the mapping
            // when the handle was made.
            let slot = unsafe { std::slice::from_raw_parts_mut(arena.as_ptr().add(offset as usize), len) };
            fill(slot)
        })
    }

    /// Address of the slot in this process, for a DMA engine or a copy kernel to write the
    /// block. Valid while the handle lives and [`Self::is_live`] holds; a copy that may outlast
    /// the connection (a call on another thread timing out ends it) must go through
    /// [`super::Client::write`] instead, which holds the connection open for the copy.
    pub fn ptr(&self) -> *mut u8 {
        // SAFETY: the offset and length were checked against the arena when the handle was
        // made (`Link::contains`), so the pointer stays inside the mapping, which the handle's
        // link keeps alive.
        unsafe { self.0.link.arena.as_ptr().add(self.0.offset as usize) }
    }
}

impl Acquired {
    /// The tier the block was found in.
    pub fn tier(&self) -> TierLevel {
        self.1
    }

    /// Runs `read` on the block's bytes while the connection is held open; `None` (and `read`
    /// not run) when the connection has ended.
    pub fn with_slot<R>(&self, read: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let (offset, len) = (self.0.offset, self.0.len as usize);
        self.0.link.with_live(|arena| {
            // SAFETY: the agent pins an acquired block (no writer) until it is released, which
            // consumes the handle; the connection (whose end would unpin it) stays open while
            // the `alive` lock is held; the range was checked against the mapping.
            read(unsafe { arena.slice(offset, len) })
        })
    }

    /// Address of the block in this process, for reading only (other readers share it). Valid
    /// as for [`Reserved::ptr`].
    pub fn ptr(&self) -> *const u8 {
        // SAFETY: as in `Reserved::ptr`.
        unsafe { self.0.link.arena.as_ptr().add(self.0.offset as usize) }
    }
}

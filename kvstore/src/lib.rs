//! `kvstore`: kvtier's tiered KV-cache block store.
//!
//! Blocks are addressed by [`BlockKey`] = ([`Namespace`], [`BlockHash`]) and kept in tiers:
//! a shared host-memory arena ([`host::HostTier`]) that engine processes can map, and local disk
//! slab files ([`disk::DiskTier`]) written with io_uring and O_DIRECT, and an S3-compatible
//! object store ([`object::ObjectTier`]) shared between nodes. [`TieredStore`] composes them:
//! LRU per tier, eviction demotes to the next tier down, a hit in a lower tier promotes back to
//! host, and pinned blocks are never evicted. A cache may always decline: when space runs out a block is
//! "not stored", never an error for the engine.
//!
//! ```
//! use kvstore::{BlockHash, BlockKey, Namespace, StoreConfig, TieredStore, HostTierConfig};
//!
//! let store = TieredStore::open(StoreConfig {
//!     host: HostTierConfig::new(64 << 20),
//!     disk: None,
//!     object: None,
//! })?;
//! let ns = Namespace::builder("my-model").kv_dtype("bfloat16").block_size(16).build();
//! let key = BlockKey::new(ns, BlockHash::new(b"block-0")?);
//! store.put(&key, &[7u8; 4096]);
//! let mut out = vec![0u8; 4096];
//! assert!(store.get(&key, &mut out)?.is_some());
//! # Ok::<(), kvstore::Error>(())
//! ```

pub mod alloc;
pub mod arena;
pub mod block;
pub mod client;
pub mod device;
pub mod disk;
pub mod error;
pub mod host;
pub mod index;
pub mod key;
pub mod object;
pub mod outcome;
pub mod pages;
mod slots;
pub mod stats;
pub mod store;
pub mod transport;
pub mod vllm;
pub mod wire;

pub use arena::{HostArena, HugePages};
pub use disk::{DiskTier, DiskTierConfig, IoEngineChoice};
pub use error::{Error, KeyError, Result};
pub use host::{HostTier, HostTierConfig, Lease, Reservation};
pub use key::{BlockHash, BlockKey, Namespace, NamespaceBuilder};
pub use object::{ObjectTier, ObjectTierConfig};
pub use outcome::{NotStoredReason, PutOutcome};
pub use stats::{TierLevel, TierStats};
pub use store::{PrefixMatch, StoreConfig, StoreStats, TieredStore};

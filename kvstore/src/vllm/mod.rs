//! Compatibility with vLLM's own block hashes and KV events, so that a router holding only token
//! ids, and an index fed by vLLM's event stream, speak about the same blocks as the engines.

pub mod events;
pub mod hash;

pub use events::{EventError, KvEvent, KvEventBatch, decode_batch};
pub use hash::{BlockHasher, ExtraKey, HashAlgo, HashError, MmItem, RequestExtras, event_hash};

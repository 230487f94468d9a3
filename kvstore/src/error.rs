//! Typed errors of the block store.

use std::io;
use std::path::PathBuf;

/// A malformed key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// A block hash must be 1..=32 bytes.
    #[error("block hash is {len} bytes; it must be 1 to 32 bytes")]
    HashLength {
        /// The length given.
        len: usize,
    },
}

/// Errors of the store, its tiers and the arena.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range.
    #[error("invalid configuration `{field}`: {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// The block is larger than the largest slot the tier can hold.
    #[error("block of {len} bytes exceeds the tier's largest slot of {max} bytes")]
    BlockTooLarge {
        /// The block's length.
        len: u64,
        /// The largest storable length.
        max: u64,
    },
    /// A caller's buffer does not match the stored block's length.
    #[error("buffer of {buf} bytes cannot hold a block of {len} bytes")]
    BufferSize {
        /// The caller's buffer length.
        buf: usize,
        /// The block's length.
        len: u64,
    },
    /// The shared host arena could not be created or mapped.
    #[error("host arena: {op}: {source}")]
    Arena {
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An I/O error on a tier's files.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the disk tier's directory.
    #[error("disk tier directory {} is locked by another process", path.display())]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// The disk tier's metadata is from an incompatible version.
    #[error("disk tier metadata {} has unsupported version {version}", path.display())]
    MetadataVersion {
        /// The metadata file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },
    /// A key was malformed.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Result alias for the store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

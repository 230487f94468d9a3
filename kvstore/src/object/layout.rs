//! Names and formats of what the object tier writes to a bucket.
//!
//! ```text
//! <prefix>/v1/<namespace>/seg/<segment>.kvseg   payloads, each at a multiple of 4 KiB
//! <prefix>/v1/<namespace>/idx/<written>-<segment>.kvidx   its index, written after it
//! segment = <unix ms, 13 digits>-<writer, 16 hex>-<sequence, 8 hex>
//! written = when the index was written, unix ms, 13 digits
//! ```
//!
//! A segment name is never reused (the writer id is random per start), so two agents never
//! write the same object. An index name starts with the time it was written (not when its
//! segment was opened, which may be long before a slow upload ends), so listings come out in
//! the order indexes appeared and a sync can start shortly before the newest one it has seen.
//!
//! A segment holds bare payloads: everything that identifies and verifies a block (key, offset,
//! length, checksum) is in the index, itself checksummed, and a segment is only ever read
//! through its index. So a read is one ranged GET of exactly the payload — page-aligned and of
//! the block's own size, which S3 servers serve fastest (a range of payload plus an 80-byte
//! header, ending off the page, took SeaweedFS two to three times as long for 256 KiB blocks). Readers trust a segment only through its index,
//! and the index is written only once the segment is complete, so a segment cut short by a
//! crash is never read.

use object_store::path::Path;

use crate::block;
use crate::key::{BlockHash, BlockKey, MAX_HASH_LEN, NAMESPACE_LEN, Namespace};

/// Version of the bucket layout (the `v1` path component).
pub const LAYOUT_DIR: &str = "v1";

/// Alignment of payloads in a segment.
pub const PAYLOAD_ALIGN: u64 = 4096;

const IDX_MAGIC: &[u8; 4] = b"KVTI";
const IDX_VERSION: u16 = 1;
const IDX_HEAD: usize = 4 + 2 + 2 + NAMESPACE_LEN + 4 + 8;
const IDX_ENTRY: usize = 1 + MAX_HASH_LEN + 8 + 8 + 8;

/// The name of a segment (without directory or extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentId {
    /// When the segment was opened, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The writer: random per start of an object tier.
    pub writer: u64,
    /// The writer's sequence number.
    pub seq: u32,
}

impl std::fmt::Display for SegmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:013}-{:016x}-{:08x}", self.unix_ms, self.writer, self.seq)
    }
}

impl SegmentId {
    /// Parses a name written by [`Display`](std::fmt::Display); `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split('-');
        let (ms, writer, seq) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || ms.len() != 13 || writer.len() != 16 || seq.len() != 8 {
            return None;
        }
        Some(Self {
            unix_ms: ms.parse().ok()?,
            writer: u64::from_str_radix(writer, 16).ok()?,
            seq: u32::from_str_radix(seq, 16).ok()?,
        })
    }
}

/// `<prefix>/v1`: where every namespace of this layout lives.
pub fn root(prefix: &Path) -> Path {
    prefix.clone().join(LAYOUT_DIR)
}

/// The directory of one namespace's segments (`seg`) or indexes (`idx`).
pub fn dir(prefix: &Path, ns: &Namespace, kind: &str) -> Path {
    root(prefix).join(ns.to_string()).join(kind)
}

/// The object holding a segment's blocks.
pub fn segment_path(prefix: &Path, ns: &Namespace, id: &SegmentId) -> Path {
    dir(prefix, ns, "seg").join(format!("{id}.kvseg"))
}

/// The object holding a segment's index, written at `written_ms`.
pub fn index_path(prefix: &Path, ns: &Namespace, id: &SegmentId, written_ms: u64) -> Path {
    dir(prefix, ns, "idx").join(format!("{written_ms:013}-{id}.kvidx"))
}

/// When an index object was written and which segment it describes, from its name.
pub fn index_id(path: &Path) -> Option<(u64, SegmentId)> {
    let name = path.filename()?.strip_suffix(".kvidx")?;
    let (written, seg) = name.split_once('-')?;
    if written.len() != 13 {
        return None;
    }
    Some((written.parse().ok()?, SegmentId::parse(seg)?))
}

/// The segment object an index object describes.
pub fn segment_of_index(prefix: &Path, ns: &Namespace, index: &Path) -> Option<Path> {
    index_id(index).map(|(_, id)| segment_path(prefix, ns, &id))
}

/// A namespace from its directory name (32 hex digits).
pub fn parse_namespace(s: &str) -> Option<Namespace> {
    if s.len() != NAMESPACE_LEN * 2 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; NAMESPACE_LEN];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(Namespace::from_bytes(out))
}

/// Where one block sits in its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// The block's hash (the namespace is the segment's).
    pub hash: BlockHash,
    /// Offset of the payload in the segment (a multiple of [`PAYLOAD_ALIGN`]).
    pub offset: u64,
    /// Payload length.
    pub len: u64,
    /// [`block::checksum`] of the payload.
    pub checksum: u64,
}

/// Encodes a segment's index: a header, fixed-size entries, and an XXH3 of all of it, so a
/// damaged index is refused whole.
pub fn encode_index(ns: &Namespace, segment_len: u64, entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(IDX_HEAD + entries.len() * IDX_ENTRY + 8);
    out.extend_from_slice(IDX_MAGIC);
    out.extend_from_slice(&IDX_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(ns.as_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&segment_len.to_le_bytes());
    for e in entries {
        let hash = e.hash.as_bytes();
        out.push(hash.len() as u8);
        out.extend_from_slice(hash);
        out.extend(std::iter::repeat_n(0u8, MAX_HASH_LEN - hash.len()));
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
        out.extend_from_slice(&e.checksum.to_le_bytes());
    }
    let sum = block::checksum(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// A decoded index: its namespace, the segment's length and the entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// The namespace of every block in the segment.
    pub namespace: Namespace,
    /// Length of the segment object.
    pub segment_len: u64,
    /// Where each block is.
    pub entries: Vec<IndexEntry>,
}

impl Index {
    /// The key of entry `e`.
    pub fn key(&self, e: &IndexEntry) -> BlockKey {
        BlockKey::new(self.namespace, e.hash)
    }
}

/// Decodes an index; `None` when it is damaged, of another version, or describes payloads
/// that do not fit the segment.
pub fn decode_index(buf: &[u8]) -> Option<Index> {
    let (body, sum) = buf.split_at_checked(buf.len().checked_sub(8)?)?;
    if u64::from_le_bytes(sum.try_into().ok()?) != block::checksum(body) {
        return None;
    }
    let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    if body.get(..4)? != IDX_MAGIC || u16::from_le_bytes(body[4..6].try_into().ok()?) != IDX_VERSION {
        return None;
    }
    let mut ns = [0u8; NAMESPACE_LEN];
    ns.copy_from_slice(body.get(8..8 + NAMESPACE_LEN)?);
    let at = 8 + NAMESPACE_LEN;
    let count = u32::from_le_bytes(body.get(at..at + 4)?.try_into().ok()?) as usize;
    let segment_len = le64(body.get(at + 4..at + 12)?);
    let rest = body.get(IDX_HEAD..)?;
    if rest.len() != count.checked_mul(IDX_ENTRY)? {
        return None;
    }
    let mut entries = Vec::with_capacity(count);
    for e in rest.chunks_exact(IDX_ENTRY) {
        let hash_len = e[0] as usize;
        let hash = BlockHash::new(e.get(1..1 + hash_len)?).ok()?;
        let at = 1 + MAX_HASH_LEN;
        let entry = IndexEntry {
            hash,
            offset: le64(&e[at..at + 8]),
            len: le64(&e[at + 8..at + 16]),
            checksum: le64(&e[at + 16..at + 24]),
        };
        if entry.offset.checked_add(entry.len)? > segment_len {
            return None;
        }
        entries.push(entry);
    }
    Some(Index {
        namespace: Namespace::from_bytes(ns),
        segment_len,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ns() -> Namespace {
        Namespace::builder("m").build()
    }

    #[test]
    fn segment_ids_round_trip_and_sort_by_time() {
        let a = SegmentId {
            unix_ms: 1_700_000_000_000,
            writer: 0xdead_beef,
            seq: 7,
        };
        let b = SegmentId {
            unix_ms: a.unix_ms + 1,
            ..a
        };
        assert_eq!(SegmentId::parse(&a.to_string()), Some(a));
        assert!(a.to_string() < b.to_string());
        assert_eq!(SegmentId::parse("1-2-3"), None);
        let p = index_path(&Path::from("kv/t"), &ns(), &a, 1_700_000_000_005);
        assert_eq!(index_id(&p), Some((1_700_000_000_005, a)));
        assert_eq!(
            segment_of_index(&Path::from("kv/t"), &ns(), &p),
            Some(segment_path(&Path::from("kv/t"), &ns(), &a))
        );
        assert!(p.as_ref().starts_with("kv/t/v1/"));
        assert_eq!(parse_namespace(&ns().to_string()), Some(ns()));
    }

    #[test]
    fn an_index_round_trips_and_any_damage_is_refused() {
        let entries: Vec<IndexEntry> = (0..5u64)
            .map(|i| IndexEntry {
                hash: BlockHash::from_u64(i),
                offset: i * 200,
                len: 100,
                checksum: i * 31,
            })
            .collect();
        let buf = encode_index(&ns(), 1000, &entries);
        let idx = decode_index(&buf).expect("decodes");
        assert_eq!(idx.entries, entries);
        assert_eq!(idx.namespace, ns());
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 1;
            assert_eq!(decode_index(&bad), None, "flipped byte {i}");
        }
        assert_eq!(decode_index(&buf[..buf.len() - 1]), None);
        // Payloads that would run past the segment's end are refused even with a valid checksum.
        assert_eq!(decode_index(&encode_index(&ns(), 899, &entries)), None);
        assert!(decode_index(&encode_index(&ns(), 900, &entries)).is_some());
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_index(&buf);
            let _ = SegmentId::parse(&String::from_utf8_lossy(&buf));
            let _ = parse_namespace(&String::from_utf8_lossy(&buf));
        }
    }
}

//! Persistent metadata of the disk tier: an append-only journal plus a snapshot.
//!
//! Every committed block is a `Put` record appended *after* its data write completed; every
//! eviction or removal is a `Remove` record appended *before* its slot can be reused. Records are
//! fixed-size with their own checksum, so a record torn by a crash (kill -9 mid-append) ends the
//! replay there. Reads verify each block's header and checksum anyway, so even a stale record can
//! only produce a miss, never wrong data.
//!
//! A clean shutdown (and compaction, when the journal grows past a few times the live entries)
//! writes a snapshot of every live entry, tagged with the journal generation it covers, via a
//! temporary file, fsync and rename; the journals it covers are then deleted. Opening loads the
//! snapshot and replays the journals of later generations, oldest first.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::alloc::Slot;
use crate::block::checksum;
use crate::error::{Error, Result};
use crate::key::{BlockHash, BlockKey, NAMESPACE_LEN, Namespace};

const RECORD_LEN: usize = 96;
const FILE_HEADER_LEN: usize = 16;
const JOURNAL_MAGIC: &[u8; 4] = b"KVTJ";
const SNAPSHOT_MAGIC: &[u8; 4] = b"KVTS";
const VERSION: u32 = 1;
const SNAPSHOT: &str = "snapshot.bin";

/// A live block as the metadata records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRecord {
    /// The block.
    pub key: BlockKey,
    /// Where its record lives.
    pub slot: Slot,
    /// Payload length.
    pub len: u64,
    /// Payload checksum.
    pub checksum: u64,
}

/// One journal record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// A block was committed.
    Put(EntryRecord),
    /// A block was dropped; its slot may be reused after this record.
    Remove(BlockKey),
}

impl Record {
    fn encode(&self, out: &mut [u8; RECORD_LEN]) {
        out.fill(0);
        let (op, key) = match self {
            Record::Put(e) => (1u8, e.key),
            Record::Remove(k) => (2u8, *k),
        };
        out[0] = op;
        out[1..17].copy_from_slice(key.namespace.as_bytes());
        let h = key.hash.as_bytes();
        out[17] = h.len() as u8;
        out[18..18 + h.len()].copy_from_slice(h);
        if let Record::Put(e) = self {
            out[50..54].copy_from_slice(&e.slot.slab.to_le_bytes());
            out[54..58].copy_from_slice(&e.slot.index.to_le_bytes());
            out[58..66].copy_from_slice(&e.slot.size.to_le_bytes());
            out[66..74].copy_from_slice(&e.len.to_le_bytes());
            out[74..82].copy_from_slice(&e.checksum.to_le_bytes());
        }
        let c = checksum(&out[..88]);
        out[88..96].copy_from_slice(&c.to_le_bytes());
    }

    fn decode(buf: &[u8]) -> Option<Self> {
        let buf: &[u8; RECORD_LEN] = buf.try_into().ok()?;
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
        if u64_at(88) != checksum(&buf[..88]) {
            return None;
        }
        let mut ns = [0u8; NAMESPACE_LEN];
        ns.copy_from_slice(&buf[1..17]);
        let hash = BlockHash::new(buf.get(18..18 + buf[17] as usize)?).ok()?;
        let key = BlockKey::new(Namespace::from_bytes(ns), hash);
        match buf[0] {
            1 => Some(Record::Put(EntryRecord {
                key,
                slot: Slot {
                    slab: u32_at(50),
                    index: u32_at(54),
                    size: u64_at(58),
                },
                len: u64_at(66),
                checksum: u64_at(74),
            })),
            2 => Some(Record::Remove(key)),
            _ => None,
        }
    }
}

fn file_header(magic: &[u8; 4], generation: u64) -> [u8; FILE_HEADER_LEN] {
    let mut h = [0u8; FILE_HEADER_LEN];
    h[0..4].copy_from_slice(magic);
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&generation.to_le_bytes());
    h
}

fn parse_header(path: &Path, buf: &[u8], magic: &[u8; 4]) -> Result<Option<u64>> {
    if buf.len() < FILE_HEADER_LEN || &buf[0..4] != magic {
        return Ok(None);
    }
    let version = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(Error::MetadataVersion {
            path: path.to_owned(),
            version,
        });
    }
    Ok(Some(u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"))))
}

fn journal_name(generation: u64) -> String {
    format!("journal-{generation:016x}.log")
}

fn journal_generation(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("journal-")?.strip_suffix(".log")?;
    u64::from_str_radix(hex, 16).ok()
}

/// Journals shorter than this are never compacted.
const COMPACT_MIN: u64 = 4096;

/// Makes a directory's entries (created, renamed files) durable; best effort.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The open journal of a disk tier.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    file: File,
    generation: u64,
    records: u64,
    sync: bool,
    /// Record count above which [`Self::maybe_compact`] compacts.
    compact_at: u64,
}

/// State recovered from a directory: live entries in LRU order (oldest first).
#[derive(Debug, Default)]
pub struct Recovered {
    /// Live entries, least recently written first.
    pub entries: Vec<EntryRecord>,
    /// Records that failed their checksum and ended a journal's replay (torn tails).
    pub torn_records: u64,
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(|e| Error::io("read", path, e))?;
    Ok(buf)
}

impl Journal {
    /// Loads the snapshot and journals of `dir` and opens a new journal generation for appends.
    pub fn open(dir: &Path, sync: bool) -> Result<(Self, Recovered)> {
        let mut live: lru::LruCache<BlockKey, EntryRecord> = lru::LruCache::unbounded();
        let mut rec = Recovered::default();
        let mut covered = 0u64;
        let snap_path = dir.join(SNAPSHOT);
        if snap_path.exists() {
            let buf = read_file(&snap_path)?;
            if let Some(generation) = parse_header(&snap_path, &buf, SNAPSHOT_MAGIC)? {
                let body = &buf[FILE_HEADER_LEN..];
                if body.len() >= 8 {
                    let (records, sum) = body.split_at(body.len() - 8);
                    let valid = records.len() % RECORD_LEN == 0
                        && u64::from_le_bytes(sum.try_into().expect("8 bytes")) == checksum(records);
                    if valid {
                        covered = generation;
                        for r in records.chunks_exact(RECORD_LEN) {
                            if let Some(Record::Put(e)) = Record::decode(r) {
                                live.put(e.key, e);
                            }
                        }
                    } else {
                        tracing::warn!(path = %snap_path.display(), "disk tier snapshot is corrupt; ignoring it");
                    }
                }
            }
        }
        let mut journals: Vec<(u64, PathBuf)> = fs::read_dir(dir)
            .map_err(|e| Error::io("list", dir, e))?
            .filter_map(|d| {
                let d = d.ok()?;
                let g = journal_generation(d.file_name().to_str()?)?;
                Some((g, d.path()))
            })
            .collect();
        journals.sort();
        let mut last = covered;
        for (generation, path) in &journals {
            last = last.max(*generation);
            if *generation <= covered {
                let _ = fs::remove_file(path);
                continue;
            }
            let buf = read_file(path)?;
            if parse_header(path, &buf, JOURNAL_MAGIC)?.is_none() {
                continue;
            }
            for r in buf[FILE_HEADER_LEN..].chunks(RECORD_LEN) {
                match Record::decode(r) {
                    Some(Record::Put(e)) => {
                        live.put(e.key, e);
                    }
                    Some(Record::Remove(k)) => {
                        live.pop(&k);
                    }
                    None => {
                        rec.torn_records += 1;
                        break;
                    }
                }
            }
        }
        // Oldest first, as the LRU rebuilds it.
        rec.entries = live.iter().rev().map(|(_, e)| *e).collect();
        let generation = last.checked_add(1).ok_or_else(|| Error::MetadataVersion {
            path: dir.to_owned(),
            version: u32::MAX,
        })?;
        let mut journal = Self::create(dir, generation, sync)?;
        // Compact what was replayed. If that fails (a full filesystem), the old journals stay
        // and are replayed again next time, before the new one: nothing is lost.
        if let Err(e) = journal.write_snapshot(&rec.entries) {
            tracing::warn!(error = %e, "disk tier could not compact its journal at open; continuing");
        }
        Ok((journal, rec))
    }

    fn create(dir: &Path, generation: u64, sync: bool) -> Result<Self> {
        let path = dir.join(journal_name(generation));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("create", &path, e))?;
        if let Err(e) = file.write_all(&file_header(JOURNAL_MAGIC, generation)) {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(Error::io("write", &path, e));
        }
        if sync {
            sync_dir(dir);
        }
        Ok(Self {
            dir: dir.to_owned(),
            file,
            generation,
            records: 0,
            sync,
            compact_at: COMPACT_MIN,
        })
    }

    /// Appends records with one write; with `sync`, also waits for the disk (fdatasync).
    pub fn append(&mut self, records: &[Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = vec![0u8; records.len() * RECORD_LEN];
        for (r, out) in records.iter().zip(buf.chunks_exact_mut(RECORD_LEN)) {
            r.encode(out.try_into().expect("record-sized chunk"));
        }
        let path = || self.dir.join(journal_name(self.generation));
        if let Err(e) = self.file.write_all(&buf) {
            // Cut a partly written record off, so later appends are not hidden behind it.
            let good = (FILE_HEADER_LEN + self.records as usize * RECORD_LEN) as u64;
            let _ = self.file.set_len(good);
            let _ = self.file.seek(SeekFrom::Start(good));
            return Err(Error::io("append", path(), e));
        }
        // Counted before the sync: the records are in the file whatever the sync says, and a
        // later cut-off of a failed append must not remove them.
        self.records += records.len() as u64;
        if self.sync {
            self.file
                .sync_data()
                .map_err(|e| Error::io("fdatasync", path(), e))?;
        }
        Ok(())
    }

    /// Records appended to the current generation.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Compacts when the journal has grown past twice the `live` entries (at least 4096
    /// records), or when `force`d (an append failed: the snapshot then records what the journal
    /// could not); `entries` lists them, oldest first. A failed compaction is retried only after
    /// the journal doubles again.
    pub fn maybe_compact(&mut self, live: u64, force: bool, entries: impl FnOnce() -> Vec<EntryRecord>) {
        if !force && self.records <= self.compact_at.max(2 * live) {
            return;
        }
        if let Err(e) = self.write_snapshot(&entries()) {
            self.compact_at = 2 * self.records;
            tracing::warn!(error = %e, "disk tier journal compaction failed; retrying later");
        }
    }

    /// Writes a snapshot of `entries` (oldest first) covering everything appended so far,
    /// switches to a new journal generation and deletes the old journals. On failure nothing
    /// changes: appends continue in the current journal.
    pub fn write_snapshot(&mut self, entries: &[EntryRecord]) -> Result<()> {
        // The next journal first: if it cannot be created, the old state is untouched.
        let next = Self::create(&self.dir, self.generation + 1, self.sync)?;
        let next_path = self.dir.join(journal_name(next.generation));
        if let Err(e) = self.write_snapshot_file(entries) {
            drop(next);
            let _ = fs::remove_file(next_path);
            return Err(e);
        }
        let covered = self.generation;
        *self = next;
        // Every journal up to the covered generation is in the snapshot now.
        if let Ok(dir) = fs::read_dir(&self.dir) {
            for d in dir.flatten() {
                let g = d.file_name().to_str().and_then(journal_generation);
                if g.is_some_and(|g| g <= covered) {
                    let _ = fs::remove_file(d.path());
                }
            }
        }
        Ok(())
    }

    fn write_snapshot_file(&self, entries: &[EntryRecord]) -> Result<()> {
        let tmp = self.dir.join("snapshot.tmp");
        let mut buf = Vec::with_capacity(FILE_HEADER_LEN + entries.len() * RECORD_LEN + 8);
        buf.extend_from_slice(&file_header(SNAPSHOT_MAGIC, self.generation));
        let mut rec = [0u8; RECORD_LEN];
        for e in entries {
            Record::Put(*e).encode(&mut rec);
            buf.extend_from_slice(&rec);
        }
        let sum = checksum(&buf[FILE_HEADER_LEN..]);
        buf.extend_from_slice(&sum.to_le_bytes());
        let written = File::create(&tmp).and_then(|mut f| {
            f.write_all(&buf)?;
            f.sync_all()
        });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io("write", &tmp, e));
        }
        let snap = self.dir.join(SNAPSHOT);
        fs::rename(&tmp, &snap).map_err(|e| Error::io("rename", &snap, e))?;
        sync_dir(&self.dir);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> EntryRecord {
        EntryRecord {
            key: BlockKey::new(Namespace::builder("m").build(), BlockHash::from_u64(i)),
            slot: Slot {
                slab: (i % 3) as u32,
                index: i as u32,
                size: 8192,
            },
            len: 5000 + i,
            checksum: i * 7,
        }
    }

    #[test]
    fn records_round_trip_and_reject_damage() {
        let mut buf = [0u8; RECORD_LEN];
        for r in [Record::Put(entry(5)), Record::Remove(entry(6).key)] {
            r.encode(&mut buf);
            assert_eq!(Record::decode(&buf), Some(r));
            buf[20] ^= 1;
            assert_eq!(Record::decode(&buf), None);
        }
    }

    #[test]
    fn replay_applies_puts_and_removes_in_order_and_stops_at_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut j, rec) = Journal::open(dir.path(), false).unwrap();
            assert!(rec.entries.is_empty());
            j.append(&[
                Record::Put(entry(1)),
                Record::Put(entry(2)),
                Record::Put(entry(3)),
            ])
            .unwrap();
            j.append(&[Record::Remove(entry(2).key)]).unwrap();
            // A torn half record at the end, as a crash mid-append leaves it.
            let mut half = [0u8; RECORD_LEN];
            Record::Put(entry(4)).encode(&mut half);
            j.file.write_all(&half[..40]).unwrap();
        }
        let (mut j, rec) = Journal::open(dir.path(), false).unwrap();
        assert_eq!(rec.entries, vec![entry(1), entry(3)]);
        assert_eq!(rec.torn_records, 1);
        j.write_snapshot(&[entry(3)]).unwrap();
        drop(j);
        let (_, rec) = Journal::open(dir.path(), false).unwrap();
        assert_eq!(rec.entries, vec![entry(3)]);
        let journals = fs::read_dir(dir.path())
            .unwrap()
            .filter(|d| {
                d.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("journal-")
            })
            .count();
        assert_eq!(journals, 1, "covered journals are deleted");
    }
}

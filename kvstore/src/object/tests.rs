//! The object tier over in-process and local-file stores (the S3 server tests are in
//! `tests/object.rs`).

use super::*;
use crate::key::BlockHash;

fn ns() -> Namespace {
    Namespace::builder("object-tests").build()
}

fn key(i: u64) -> BlockKey {
    BlockKey::new(ns(), BlockHash::from_u64(i))
}

fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i as usize * 131 + j * 7) as u8).collect()
}

fn cfg(url: &str) -> ObjectTierConfig {
    let mut c = ObjectTierConfig::new(url);
    c.target_object_size = 256 << 10;
    c.part_size = MIN_PART_SIZE;
    c.flush_interval = Duration::from_secs(3600);
    c.sync_interval = Duration::from_millis(50);
    c
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// Reads `keys` into fresh buffers: `Some(payload)` per hit.
fn read(t: &ObjectTier, keys: &[BlockKey]) -> Vec<Option<Vec<u8>>> {
    let mut out = vec![None; keys.len()];
    t.get_batch(keys, far(), |i, p| out[i] = Some(p.to_vec()));
    out
}

fn put_all(t: &ObjectTier, keys: std::ops::Range<u64>, len: usize) {
    let data: Vec<(BlockKey, Vec<u8>)> = keys.map(|i| (key(i), payload(i, len))).collect();
    let items: Vec<(BlockKey, &[u8])> = data.iter().map(|(k, d)| (*k, d.as_slice())).collect();
    assert!(t.put_batch(&items).iter().all(|o| *o == PutOutcome::Stored));
}

#[test]
fn blocks_are_readable_before_and_after_upload() {
    let t = ObjectTier::open(cfg("memory://p")).unwrap();
    put_all(&t, 0..10, 50_000);
    let keys: Vec<BlockKey> = (0..10).map(key).collect();
    // Before the upload: from the open or sealed segment in memory.
    for (i, got) in read(&t, &keys).into_iter().enumerate() {
        assert_eq!(got.as_deref(), Some(payload(i as u64, 50_000).as_slice()));
    }
    assert_eq!(t.flush(Duration::from_secs(10)), 0);
    let d = t.detail();
    // 10 × 50 000 bytes, each at a multiple of 4 KiB (every 53 248 bytes) in segments sealed
    // at 256 KiB: a fifth block would end at 262 992, so four fill a segment: 4 + 4 + 2.
    assert_eq!(d.segments_uploaded, 3);
    assert_eq!((d.pending_bytes, d.pending_blocks), (0, 0));
    assert_eq!(t.stats().stores, 10);
    for (i, got) in read(&t, &keys).into_iter().enumerate() {
        assert_eq!(got.as_deref(), Some(payload(i as u64, 50_000).as_slice()));
    }
    assert_eq!(
        t.put_batch(&[(key(3), &payload(3, 10))]),
        vec![PutOutcome::AlreadyStored]
    );
    assert_eq!(read(&t, &[key(99)]), vec![None]);
    let s = t.stats();
    assert_eq!((s.hits, s.misses), (20, 1));
}

#[test]
fn a_block_larger_than_the_target_gets_its_own_multipart_segment() {
    let t = ObjectTier::open(cfg("memory://p")).unwrap();
    let big = payload(1, (MIN_PART_SIZE as usize) * 2 + 12_345);
    put_all(&t, 0..1, 1000);
    assert_eq!(t.put_batch(&[(key(1), &big)]), vec![PutOutcome::Stored]);
    assert_eq!(t.flush(Duration::from_secs(30)), 0);
    assert_eq!(t.detail().segments_uploaded, 2);
    assert_eq!(read(&t, &[key(1)])[0].as_deref(), Some(big.as_slice()));
}

#[test]
fn pending_bytes_are_bounded() {
    let mut c = cfg("memory://p");
    c.max_pending = 200_000;
    c.target_object_size = 1 << 30;
    let t = ObjectTier::open(c).unwrap();
    let data = payload(0, 60_000);
    let items: Vec<(BlockKey, &[u8])> = (0..5).map(|i| (key(i), data.as_slice())).collect();
    let out = t.put_batch(&items);
    assert_eq!(out.iter().filter(|o| **o == PutOutcome::Stored).count(), 3);
    assert_eq!(out[3], PutOutcome::NotStored(NotStoredReason::NoSpace));
    assert_eq!(t.stats().not_stored, 2);
}

/// Two tiers on one directory: the second learns the first's blocks from its index objects,
/// and what fails verification or disappears is a miss, never wrong data.
#[test]
fn agents_sharing_a_location_see_each_other_and_damage_is_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let a = ObjectTier::open(cfg(&url)).unwrap();
    put_all(&a, 0..12, 40_000);
    assert_eq!(a.flush(Duration::from_secs(10)), 0);
    let b = ObjectTier::open(cfg(&url)).unwrap();
    let keys: Vec<BlockKey> = (0..12).map(key).collect();
    assert!(
        b.contains_many(&keys).iter().all(|c| !c),
        "nothing known before a sync"
    );
    b.sync_namespace(&ns());
    assert!(b.contains_many(&keys).iter().all(|c| *c));
    assert_eq!(b.detail().remote_blocks, 12);
    for (i, got) in read(&b, &keys).into_iter().enumerate() {
        assert_eq!(got.as_deref(), Some(payload(i as u64, 40_000).as_slice()));
    }

    // Flip one payload byte of block 0 (first record of the first segment).
    let segs = layout::dir(&Path::default(), &ns(), "seg");
    let seg_dir = dir.path().join(segs.as_ref());
    let mut files: Vec<_> = std::fs::read_dir(&seg_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut bytes = std::fs::read(&files[0]).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&files[0], &bytes).unwrap();
    assert_eq!(read(&b, &[key(0)]), vec![None]);
    assert_eq!(b.stats().checksum_failures, 1);
    assert_eq!(b.detail().failures_of(Failure::Corrupt), 1);
    assert!(!b.contains_many(&[key(0)])[0], "a corrupt block is forgotten");
    assert!(read(&b, &[key(1)])[0].is_some(), "its neighbours still verify");

    // Delete the second segment underneath: its blocks miss and are forgotten.
    std::fs::remove_file(&files[1]).unwrap();
    let last = *keys.last().unwrap();
    assert_eq!(read(&b, &[last]), vec![None]);
    assert_eq!(b.detail().failures_of(Failure::NotFound), 1);
    assert!(!b.contains_many(&[last])[0]);
}

/// A store that refuses connections: uploads fail (not stored), reads end by their deadline,
/// and after repeated failures the tier pauses instead of trying per request.
#[cfg(feature = "s3")]
#[test]
fn an_unreachable_store_means_not_stored_and_bounded_misses() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut c = cfg("s3://bucket/p");
    c.endpoint = Some(format!("http://127.0.0.1:{port}"));
    c.credentials = Some(ObjectCredentials {
        access_key_id: "k".into(),
        secret_access_key: "s".into(),
        session_token: None,
    });
    c.max_retries = 1;
    c.retry_timeout = Duration::from_secs(1);
    c.sync_interval = Duration::ZERO;
    let t = ObjectTier::open(c).unwrap();
    assert!(
        matches!(t.probe(), Err((Failure::Unreachable, _))),
        "{:?}",
        t.probe()
    );
    for round in 0..3 {
        put_all(&t, round * 10..round * 10 + 5, 1000);
        assert!(t.flush(Duration::from_secs(20)) == 0);
    }
    let s = t.stats();
    assert_eq!((s.stores, s.not_stored), (0, 15));
    let d = t.detail();
    // Refused connections; on a loaded machine the connect may time out instead.
    assert_eq!(
        d.failures_of(Failure::Unreachable) + d.failures_of(Failure::Timeout),
        3,
        "{d:?}"
    );
    assert!(t.detail().degraded, "three outages pause the tier");
    assert_eq!(
        t.put_batch(&[(key(100), &[1, 2, 3])]),
        vec![PutOutcome::NotStored(NotStoredReason::Io)]
    );
    assert_eq!(read(&t, &[key(0)]), vec![None]);
}

#[test]
fn reads_of_neighbouring_blocks_are_coalesced() {
    let l = |seg: u32, offset: u64| Located {
        seg: SegmentId {
            unix_ms: 1,
            writer: 2,
            seq: seg,
        },
        offset,
        len: 100,
        checksum: 0,
        pending: false,
        remote: false,
    };
    let keys: Vec<BlockKey> = (0..4).map(key).collect();
    let groups = coalesce(
        &keys,
        vec![(0, l(0, 0)), (1, l(1, 0)), (2, l(0, 180)), (3, l(0, 40 << 20))],
    );
    let shape: Vec<(u32, u64, u64, usize)> = groups
        .iter()
        .map(|g| (g.seg.seq, g.start, g.end, g.members.len()))
        .collect();
    assert_eq!(
        shape,
        vec![(0, 0, 280, 2), (0, 40 << 20, (40 << 20) + 100, 1), (1, 0, 100, 1)]
    );
}

#[test]
fn invalid_settings_are_refused_with_their_key() {
    let mut c = cfg("memory://p");
    c.part_size = 1 << 20;
    assert!(
        ObjectTier::open(c)
            .unwrap_err()
            .to_string()
            .contains("object.part_size")
    );
    let mut c = cfg("memory://p");
    c.read_concurrency = 0;
    assert!(
        ObjectTier::open(c)
            .unwrap_err()
            .to_string()
            .contains("object.read_concurrency")
    );
    assert!(
        ObjectTier::open(cfg("ftp://x"))
            .unwrap_err()
            .to_string()
            .contains("object.url")
    );
}

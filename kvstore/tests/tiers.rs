//! The tier cascade on real files, real io_uring and a real memfd arena.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use kvstore::{DiskTier, IoEngineChoice, NotStoredReason, PutOutcome, StoreConfig, TierLevel, TieredStore};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const BLOCK: usize = 64 * 1024;

fn store(dir: &std::path::Path, engine: IoEngineChoice) -> TieredStore {
    // Host: 8 slabs of 1 MiB = 128 slots of 64 KiB.
    TieredStore::open(StoreConfig {
        host: host(8 * MIB, MIB),
        disk: Some(disk(dir, 64 * MIB, 4 * MIB, engine)),
        object: None,
    })
    .expect("open store")
}

fn check(store: &TieredStore, i: u64) -> Option<TierLevel> {
    let mut buf = vec![0u8; BLOCK];
    let hit = store.get(&key(i), &mut buf).expect("get")?;
    assert_eq!(hit.len as usize, BLOCK);
    assert!(buf == payload(i, BLOCK), "block {i} content differs");
    Some(hit.tier)
}

fn demote_promote_reopen(engine: IoEngineChoice, expect_engine: &str) {
    let dir = scratch();
    {
        let s = store(dir.path(), engine);
        assert_eq!(s.disk().unwrap().engine_name(), expect_engine);
        for i in 0..200 {
            assert_eq!(s.put(&key(i), &payload(i, BLOCK)), PutOutcome::Stored);
        }
        let st = s.stats();
        let d = st.disk.unwrap();
        assert_eq!((st.host.stores, st.host.blocks), (200, 128));
        assert_eq!((st.host.evictions, st.host.demotions), (72, 72));
        assert_eq!((d.stores, d.blocks), (72, 72));
        assert_eq!(
            s.lookup_prefix(&(0..200).map(key).collect::<Vec<_>>())
                .count_in(TierLevel::Disk),
            72
        );

        // The oldest ten were demoted: reading them promotes each back, demoting one more each.
        for i in 0..10 {
            assert_eq!(check(&s, i), Some(TierLevel::Disk));
        }
        let st = s.stats();
        let d = st.disk.unwrap();
        assert_eq!((st.host.promotions, st.host.misses, st.host.hits), (10, 10, 0));
        assert_eq!((st.host.evictions, st.host.demotions), (82, 82));
        assert_eq!((d.hits, d.stores, d.blocks), (10, 82, 82));
        assert_eq!(check(&s, 0), Some(TierLevel::Host));
        assert_eq!(s.stats().host.hits, 1);

        // Evict the whole host: the ten promoted blocks are still on disk and are not rewritten.
        for i in 1000..1128 {
            assert_eq!(s.put(&key(i), &payload(i, BLOCK)), PutOutcome::Stored);
        }
        let st = s.stats();
        assert_eq!((st.host.evictions, st.host.demotions), (82 + 128, 82 + 118));
        assert_eq!(st.disk.unwrap().blocks, 200);
    }
    // Clean shutdown, reopen: everything that reached disk is served from disk.
    let s = store(dir.path(), engine);
    assert_eq!(s.stats().disk.unwrap().blocks, 200);
    for i in 0..200 {
        assert_eq!(check(&s, i), Some(TierLevel::Disk), "block {i}");
    }
    for i in 1000..1128 {
        assert_eq!(check(&s, i), None, "host-only block {i} cannot survive a restart");
    }
}

#[test]
fn demotion_promotion_and_reopen_io_uring() {
    demote_promote_reopen(IoEngineChoice::IoUring, "io_uring");
}

#[test]
fn demotion_promotion_and_reopen_psync() {
    demote_promote_reopen(IoEngineChoice::Psync, "psync");
}

#[test]
fn thousands_of_blocks_round_trip_through_host_and_disk() {
    let dir = scratch();
    let s = TieredStore::open(StoreConfig {
        host: host(8 * MIB, MIB),
        disk: Some(disk(dir.path(), 256 * MIB, 4 * MIB, IoEngineChoice::Auto)),
        object: None,
    })
    .unwrap();
    let sizes = [4096usize, 16 * 1024, 64 * 1024, 100_000];
    let n = 3000u64;
    for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
        let data: Vec<Vec<u8>> = chunk.iter().map(|&i| payload(i, sizes[i as usize % 4])).collect();
        let items: Vec<_> = chunk
            .iter()
            .zip(&data)
            .map(|(&i, d)| (key(i), d.as_slice()))
            .collect();
        for o in s.put_batch(&items) {
            assert_eq!(o, PutOutcome::Stored);
        }
    }
    let st = s.stats();
    assert!(st.host.evictions > 0 && st.disk.unwrap().stores > 0);
    let keys: Vec<_> = (0..n).map(key).collect();
    let m = s.lookup_prefix(&keys);
    assert_eq!(m.len, n as usize, "everything fits host + disk");
    let mut bufs: Vec<Vec<u8>> = vec![vec![0u8; 100_000]; 64];
    for chunk in keys.chunks(64) {
        let mut views: Vec<&mut [u8]> = bufs
            .iter_mut()
            .take(chunk.len())
            .map(|b| b.as_mut_slice())
            .collect();
        let res = s.get_batch(chunk, &mut views);
        for (k, (r, b)) in chunk.iter().zip(res.into_iter().zip(&bufs)) {
            let i = u64::from_le_bytes(k.hash.as_bytes().try_into().unwrap());
            let hit = r.unwrap().expect("hit");
            let want = payload(i, sizes[i as usize % 4]);
            assert_eq!(hit.len as usize, want.len());
            assert!(b[..want.len()] == want[..], "block {i}");
        }
    }
}

#[test]
fn flipped_byte_on_disk_is_a_counted_miss() {
    let dir = scratch();
    let cfg = disk(dir.path(), 8 * MIB, MIB, IoEngineChoice::Auto);
    {
        let d = DiskTier::open(cfg.clone()).unwrap();
        let items = [
            (key(1), &payload(1, 10_000)[..]),
            (key(2), &payload(2, 10_000)[..]),
        ];
        assert_eq!(d.put_batch(&items), vec![PutOutcome::Stored; 2]);
    }
    // Both records sit in slab 0; flip one payload byte of the first record (after its header
    // page), whichever slot it landed in, by finding its payload bytes in the file.
    let slab = dir.path().join("slab-00000.dat");
    let mut bytes = std::fs::read(&slab).unwrap();
    let needle = &payload(1, 10_000)[..64];
    let at = bytes
        .windows(64)
        .position(|w| w == needle)
        .expect("payload on disk");
    bytes[at + 5000] ^= 0x01;
    std::fs::write(&slab, &bytes).unwrap();

    let d = DiskTier::open(cfg).unwrap();
    let mut got = Vec::new();
    let hits = d.get_batch(&[key(1), key(2)], |i, p| got.push((i, p.to_vec())));
    assert_eq!(hits, vec![false, true]);
    assert_eq!(got, vec![(1, payload(2, 10_000))]);
    let st = d.stats();
    assert_eq!((st.checksum_failures, st.misses, st.hits), (1, 1, 1));
    assert!(!d.contains(&key(1)), "a corrupt block is dropped");
}

#[test]
fn pinned_blocks_are_never_evicted() {
    let dir = scratch();
    let s = store(dir.path(), IoEngineChoice::Auto);
    for i in 0..10 {
        s.put(&key(i), &payload(i, BLOCK));
        assert_eq!(s.pin(&key(i)), Some((TierLevel::Host, BLOCK as u64)));
    }
    for i in 10..400 {
        assert!(s.put(&key(i), &payload(i, BLOCK)).is_present());
    }
    for i in 0..10 {
        assert_eq!(
            s.contains(&key(i)),
            Some(TierLevel::Host),
            "pinned block {i} stayed in host"
        );
        assert!(s.unpin(&key(i)));
    }
    assert!(!s.unpin(&key(0)), "unpin without pin");
}

/// A length that a client or peer gets wrong, however large (a slot size for it would wrap past
/// zero), is refused as too large: no slot is taken, and the tier stores on.
#[test]
fn a_reservation_of_any_length_beyond_a_slab_is_too_large() {
    let s = host_only(2 * MIB, MIB);
    for len in [MIB + 1, u64::MAX >> 1, (15 << 60) + 1, u64::MAX - 4096, u64::MAX] {
        let r = s.reserve_batch(&[(key(1), len), (key(2), len)]);
        assert!(
            r.iter()
                .all(|r| matches!(r, Err(PutOutcome::NotStored(NotStoredReason::TooLarge)))),
            "{len}: {r:?}"
        );
    }
    assert_eq!(s.stats().host.used_bytes, 0);
    assert_eq!(s.put(&key(3), &payload(3, BLOCK)), PutOutcome::Stored);
}

#[test]
fn host_only_store_drops_evictions_and_declines_when_all_pinned() {
    let s = host_only(2 * MIB, MIB);
    for i in 0..32 {
        assert_eq!(s.put(&key(i), &payload(i, BLOCK)), PutOutcome::Stored);
        s.pin(&key(i));
    }
    assert_eq!(
        s.put(&key(99), &payload(99, BLOCK)),
        PutOutcome::NotStored(NotStoredReason::NoSpace)
    );
    assert_eq!(s.put(&key(0), &payload(0, BLOCK)), PutOutcome::AlreadyStored);
    assert_eq!(
        s.put(&key(98), &vec![0u8; 2 * MIB as usize]),
        PutOutcome::NotStored(NotStoredReason::TooLarge)
    );
    for i in 0..32 {
        s.unpin(&key(i));
    }
    assert_eq!(s.put(&key(99), &payload(99, BLOCK)), PutOutcome::Stored);
    assert_eq!(s.stats().host.evictions, 1);
    assert_eq!(s.contains(&key(0)), None, "the LRU block went");
}

#[test]
fn remove_drops_every_copy() {
    let dir = scratch();
    let s = store(dir.path(), IoEngineChoice::Auto);
    for i in 0..200 {
        s.put(&key(i), &payload(i, BLOCK));
    }
    check(&s, 0); // now in host and on disk
    assert!(s.remove(&key(0)));
    assert_eq!(s.contains(&key(0)), None);
    assert!(!s.remove(&key(0)));
    let keys: Vec<_> = (0..5).map(key).collect();
    assert_eq!(s.lookup_prefix(&keys).len, 0);
    assert_eq!(s.lookup_prefix(&keys[1..]).len, 4);
}

#[test]
fn concurrent_callers_get_correct_data() {
    let dir = scratch();
    let s = Arc::new(store(dir.path(), IoEngineChoice::Auto));
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(4);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let s = Arc::clone(&s);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut x = t + 1;
                let mut buf = vec![0u8; BLOCK];
                let mut ops = 0u64;
                while ops < 3000 && !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let i = x % 300;
                    match x % 7 {
                        0..=2 => {
                            s.put(&key(i), &payload(i, BLOCK));
                        }
                        3..=4 => {
                            if let Some(_hit) = s.get(&key(i), &mut buf).unwrap() {
                                assert!(buf == payload(i, BLOCK), "block {i} corrupted under concurrency");
                            }
                        }
                        5 => {
                            if s.pin(&key(i)).is_some() {
                                s.unpin(&key(i));
                            }
                            s.lookup_prefix(&[key(i), key(i + 1)]);
                        }
                        _ => {
                            s.remove(&key(i));
                        }
                    }
                    ops += 1;
                }
                ops
            })
        })
        .collect();
    let total: u64 = threads
        .into_iter()
        .map(|t| t.join().expect("worker panicked"))
        .sum();
    stop.store(true, Ordering::Relaxed);
    assert!(total > 1000, "only {total} operations ran");
    // Afterwards every stored block is intact and accounting is consistent.
    let st = s.stats();
    assert_eq!(st.host.used_bytes, st.host.blocks * BLOCK as u64);
    for i in 0..300 {
        if s.contains(&key(i)).is_some() {
            assert!(check(&s, i).is_some());
        }
    }
}

#[test]
fn promotion_never_evicts_the_block_it_reads() {
    let dir = scratch();
    // Host: 32 slots of 64 KiB. Disk: two 1 MiB slabs of 15 records of 68 KiB = 30 blocks.
    let s = TieredStore::open(StoreConfig {
        host: host(2 * MIB, MIB),
        disk: Some(disk(dir.path(), 2 * MIB, MIB, IoEngineChoice::Auto)),
        object: None,
    })
    .unwrap();
    for i in 0..62 {
        assert_eq!(s.put(&key(i), &payload(i, BLOCK)), PutOutcome::Stored);
    }
    assert_eq!(s.stats().disk.unwrap().blocks, 30);
    // Block 0 is the oldest on a full disk. Promoting it demotes a host block, which makes the
    // disk evict: not block 0, which is being read.
    assert_eq!(check(&s, 0), Some(TierLevel::Disk));
    assert_eq!(s.contains(&key(1)), None, "the next oldest went instead");
}

#[test]
fn a_new_size_class_reclaims_a_whole_slab() {
    let s = host_only(4 * MIB, MIB);
    for i in 0..64 {
        assert_eq!(s.put(&key(i), &payload(i, BLOCK)), PutOutcome::Stored);
    }
    assert_eq!(s.put(&key(100), &payload(100, 256 << 10)), PutOutcome::Stored);
    let st = s.stats();
    assert_eq!(st.host.evictions, 16, "exactly one slab of 64 KiB blocks");
    for i in 0..16 {
        assert_eq!(s.contains(&key(i)), None, "the oldest slab went");
    }
    for i in 16..64 {
        assert_eq!(s.contains(&key(i)), Some(TierLevel::Host));
    }
}

#[test]
fn a_reader_lease_is_independent_of_user_pins() {
    let s = host_only(2 * MIB, MIB);
    s.put(&key(0), &payload(0, BLOCK));
    let lease = s.acquire_batch(&[key(0)]).pop().flatten().expect("stored");
    assert!(
        !s.unpin(&key(0)),
        "an unpin without a pin cannot release a reader"
    );
    assert!(!s.remove(&key(0)), "a block being read is not removed");
    for i in 1..100 {
        s.put(&key(i), &payload(i, BLOCK));
    }
    assert_eq!(
        s.contains(&key(0)),
        Some(TierLevel::Host),
        "a leased block is never evicted"
    );
    let mut buf = vec![0u8; BLOCK];
    s.host().read(&lease, &mut buf);
    assert!(buf == payload(0, BLOCK));
    s.release(lease);
    for i in 100..200 {
        s.put(&key(i), &payload(i, BLOCK));
    }
    assert_eq!(s.contains(&key(0)), None, "released, it is evictable again");
}

#[test]
fn durable_metadata_mode_round_trips_and_reopens() {
    let dir = scratch();
    let cfg = kvstore::DiskTierConfig {
        sync_metadata: true,
        ..disk(dir.path(), 16 * MIB, MIB, IoEngineChoice::Auto)
    };
    {
        let d = DiskTier::open(cfg.clone()).unwrap();
        assert!(put_blocks(&d, 40, 20_000));
    }
    let d = DiskTier::open(cfg).unwrap();
    assert_eq!(read_blocks(&d, 40, 20_000), 40);
}

#[test]
fn a_corrupt_block_read_through_the_store_is_dropped_after_one_miss() {
    let dir = scratch();
    {
        let s = store(dir.path(), IoEngineChoice::Auto);
        for i in 0..200 {
            s.put(&key(i), &payload(i, BLOCK));
        }
        assert_eq!(s.contains(&key(0)), Some(TierLevel::Disk));
    }
    let slab = dir.path().join("slab-00000.dat");
    let mut bytes = std::fs::read(&slab).unwrap();
    let at = bytes
        .windows(64)
        .position(|w| w == &payload(0, BLOCK)[..64])
        .expect("block 0 on disk");
    bytes[at + 1000] ^= 0x40;
    std::fs::write(&slab, &bytes).unwrap();

    let s = store(dir.path(), IoEngineChoice::Auto);
    assert_eq!(check(&s, 0), None, "a corrupt block is a miss");
    assert_eq!(s.stats().disk.unwrap().checksum_failures, 1);
    assert_eq!(s.contains(&key(0)), None, "and it is gone");
    assert_eq!(check(&s, 0), None);
    assert_eq!(
        s.stats().disk.unwrap().checksum_failures,
        1,
        "read once, not on every get"
    );
    assert_eq!(check(&s, 1), Some(TierLevel::Disk), "its neighbours are intact");
}

#[test]
fn persisting_the_host_tier_writes_only_what_disk_lacks() {
    let dir = scratch();
    {
        let s = store(dir.path(), IoEngineChoice::Auto);
        for i in 0..10 {
            assert_eq!(s.put(&key(i), &payload(i, BLOCK)), kvstore::PutOutcome::Stored);
        }
        assert_eq!(s.stats().disk.unwrap().blocks, 0, "nothing evicted yet");
        assert_eq!(s.persist_host(), 10);
        assert_eq!(s.persist_host(), 0, "already on disk");
        assert_eq!(s.stats().host.blocks, 10, "the host keeps its copies");
    }
    let s = store(dir.path(), IoEngineChoice::Auto);
    for i in 0..10 {
        assert_eq!(check(&s, i), Some(TierLevel::Disk), "block {i} after reopen");
    }
}

#[test]
fn mixed_sizes_persist_and_promote() {
    let dir = scratch();
    let lens = [16 << 10, 32 << 10, (48 << 10) + 5];
    {
        let s = store(dir.path(), IoEngineChoice::Auto);
        for i in 0..9u64 {
            assert_eq!(
                s.put(&key(i), &payload(i, lens[i as usize % 3])),
                kvstore::PutOutcome::Stored
            );
        }
        assert_eq!(s.persist_host(), 9);
    }
    let s = store(dir.path(), IoEngineChoice::Auto);
    for i in 0..9u64 {
        let len = lens[i as usize % 3];
        let mut buf = vec![0u8; len];
        let hit = s.get(&key(i), &mut buf).expect("get");
        assert_eq!(
            hit.map(|h| h.tier),
            Some(TierLevel::Disk),
            "block {i} of {len} bytes"
        );
        assert!(buf == payload(i, len));
    }
}

#[test]
fn a_block_keeps_the_checksum_a_promotion_verified_or_a_grant_computed() {
    let dir = scratch();
    let s = store(dir.path(), IoEngineChoice::Auto);
    for i in 0..200 {
        assert_eq!(s.put(&key(i), &payload(i, BLOCK)), PutOutcome::Stored);
    }
    let sum = |i| kvstore::block::checksum(&payload(i, BLOCK));
    // Stored by a writer that noted nothing: unknown until someone needs it, then kept.
    let lease = s.host().acquire(&key(199)).expect("block 199 in the host tier");
    assert_eq!(s.host().known_checksum(&key(199)), None);
    assert_eq!(s.host().checksum(&lease), sum(199));
    assert_eq!(s.host().known_checksum(&key(199)), Some(sum(199)));
    s.release(lease);
    // Block 0 went down to disk, whose read verifies it: promoted, it comes with that checksum.
    assert_eq!(s.host().known_checksum(&key(0)), None);
    let got = s.acquire_batch_tiered(&[key(0)]);
    let Some((lease, TierLevel::Disk)) = got.into_iter().next().flatten() else {
        panic!("block 0 is promoted from disk");
    };
    assert_eq!(s.host().known_checksum(&key(0)), Some(sum(0)));
    s.release(lease);
}

#[test]
fn checksums_filled_ahead_leave_the_lru_order_and_the_counts_alone() {
    let dir = scratch();
    let s = store(dir.path(), IoEngineChoice::Auto);
    for i in 0..4 {
        assert_eq!(s.put(&key(i), &payload(i, BLOCK)), PutOutcome::Stored);
    }
    let (order, before) = (s.host().keys(), s.stats().host);
    // Block 9 was never stored: skipped.
    s.host().fill_checksums(&[key(0), key(2), key(9)]);
    for i in [0, 2] {
        assert_eq!(
            s.host().known_checksum(&key(i)),
            Some(kvstore::block::checksum(&payload(i, BLOCK)))
        );
    }
    assert_eq!(s.host().known_checksum(&key(1)), None);
    assert_eq!(
        s.host().keys(),
        order,
        "the oldest block is still the first to go"
    );
    let after = s.stats().host;
    assert_eq!((after.hits, after.misses), (before.hits, before.misses));
    assert_eq!(after.checksummed_bytes, 2 * BLOCK as u64);
    // Known now: not read again.
    s.host().fill_checksums(&[key(0)]);
    assert_eq!(s.stats().host.checksummed_bytes, 2 * BLOCK as u64);
}

#[test]
fn a_demoted_block_goes_to_disk_with_the_checksum_the_host_knew() {
    let dir = scratch();
    let s = store(dir.path(), IoEngineChoice::Auto);
    // Block 1000's noted checksum is wrong, block 1001's right: the disk takes both as given.
    for (i, sum) in [
        (1000, 0xfeed),
        (1001, kvstore::block::checksum(&payload(1001, BLOCK))),
    ] {
        let mut r = s.reserve_batch(&[(key(i), BLOCK as u64)]).pop().unwrap().unwrap();
        r.note_checksum(sum);
        s.host().write(&r, &payload(i, BLOCK));
        s.commit(r);
    }
    for i in 0..200 {
        assert_eq!(s.put(&key(i), &payload(i, BLOCK)), PutOutcome::Stored);
    }
    let disk = s.disk().unwrap();
    assert!(
        disk.contains(&key(1000)) && disk.contains(&key(1001)),
        "both demoted"
    );
    assert_eq!(check(&s, 1001), Some(TierLevel::Disk));
    // Not read to checksum it on the way down: the wrong checksum went with it, and its read
    // is a counted miss rather than a block vouched for again.
    let mut buf = vec![0u8; BLOCK];
    assert_eq!(s.get(&key(1000), &mut buf).unwrap(), None);
    assert_eq!(s.stats().disk.unwrap().checksum_failures, 1);
}

/// The slots of a `reserve_batch_after_writers` answer: `Ok` where a slot was reserved, else
/// the outcome.
/// A grant reads and promotes only the prefix it grants: disk blocks past the first missing
/// key stay on disk, and the host's blocks stay in place.
#[test]
fn a_grant_promotes_only_the_prefix_it_grants() {
    let dir = scratch();
    let s = Arc::new(store(dir.path(), IoEngineChoice::Psync));
    // Blocks 1..=8 on disk only (stored, then pushed out of the host by 128 others).
    for i in 1..=8 {
        assert_eq!(s.put(&key(i), &payload(i, BLOCK)), PutOutcome::Stored);
    }
    for i in 100..228 {
        assert_eq!(s.put(&key(i), &payload(i, BLOCK)), PutOutcome::Stored);
    }
    let keys: Vec<_> = (0..=8).map(key).collect();
    assert_eq!(s.lookup_prefix(&keys[1..]).count_in(TierLevel::Disk), 8);
    let before = s.stats();
    let grants = kvstore::transport::Grants::new(Arc::clone(&s), Duration::from_secs(30), 4);
    let grant = grants.grant(&keys).unwrap();
    assert!(grant.blocks.is_empty(), "block 0 is missing: nothing to grant");
    let after = s.stats();
    assert_eq!(
        after.host.promotions, before.host.promotions,
        "promoted past the prefix"
    );
    assert_eq!(after.host.evictions, before.host.evictions);
    assert_eq!(s.lookup_prefix(&keys[1..]).count_in(TierLevel::Disk), 8);
    // With block 0 back, the whole prefix is granted, promoted from disk.
    assert_eq!(s.put(&key(0), &payload(0, BLOCK)), PutOutcome::Stored);
    let grant = grants.grant(&keys).unwrap();
    assert_eq!(grant.blocks.len(), 9);
    assert_eq!(s.stats().host.promotions, before.host.promotions + 8);
}

fn outcomes(out: &[Result<kvstore::Reservation, PutOutcome>]) -> Vec<Result<(), PutOutcome>> {
    out.iter()
        .map(|r| r.as_ref().map(|_| ()).map_err(|e| *e))
        .collect()
}

#[tokio::test]
async fn a_writer_that_waits_sees_a_block_another_writer_commits_as_stored() {
    let s = host_only(2 * MIB, MIB);
    let len = BLOCK as u64;
    let mut first = s.reserve_batch(&[(key(0), len)]).pop().unwrap().expect("a slot");
    let items = [(key(0), len), (key(1), len)];
    let waiting = s.reserve_batch_after_writers(&items, Instant::now() + Duration::from_secs(60));
    let mut waiting = std::pin::pin!(waiting);
    // Block 0 is being written: the second writer waits rather than answer "stored".
    assert!(futures::poll!(waiting.as_mut()).is_pending());
    s.host()
        .reserved_mut(&mut first)
        .copy_from_slice(&payload(0, BLOCK));
    s.commit(first);
    let out = waiting.await;
    assert_eq!(outcomes(&out), vec![Err(PutOutcome::AlreadyStored), Ok(())]);
    for r in out.into_iter().flatten() {
        s.abort(r);
    }
    let mut buf = vec![0u8; BLOCK];
    let hit = s.get(&key(0), &mut buf).expect("get").expect("block 0 stored");
    assert_eq!(hit.tier, TierLevel::Host);
    assert!(buf == payload(0, BLOCK));
}

#[tokio::test]
async fn a_writer_that_waits_stores_a_block_another_writer_gave_up() {
    let s = host_only(2 * MIB, MIB);
    let len = BLOCK as u64;
    let first = s.reserve_batch(&[(key(0), len)]).pop().unwrap().expect("a slot");
    let items = [(key(0), len)];
    let waiting = s.reserve_batch_after_writers(&items, Instant::now() + Duration::from_secs(60));
    let mut waiting = std::pin::pin!(waiting);
    assert!(futures::poll!(waiting.as_mut()).is_pending());
    s.abort(first);
    // Without the wait, block 0 would have been reported stored, and never have been.
    let out = waiting.await;
    assert_eq!(outcomes(&out), vec![Ok(())]);
    for r in out.into_iter().flatten() {
        s.abort(r);
    }
}

#[tokio::test]
async fn a_writer_that_waits_gives_up_on_a_block_still_being_written_at_its_deadline() {
    let s = host_only(2 * MIB, MIB);
    let len = BLOCK as u64;
    let first = s.reserve_batch(&[(key(0), len)]).pop().unwrap().expect("a slot");
    let deadline = Instant::now() + Duration::from_millis(50);
    let out = s
        .reserve_batch_after_writers(&[(key(0), len), (key(1), len)], deadline)
        .await;
    assert!(Instant::now() >= deadline);
    assert_eq!(
        outcomes(&out),
        vec![Err(PutOutcome::NotStored(NotStoredReason::Busy)), Ok(())]
    );
    for r in out.into_iter().flatten() {
        s.abort(r);
    }
    s.abort(first);
}

//! The object tier against a real S3 server (SeaweedFS on loopback, started per test).
#![cfg(feature = "s3")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::weed::WeedServer;
use common::*;
use kvstore::object::{Failure, ObjectCredentials, ObjectTier, ObjectTierConfig};
use kvstore::{BlockKey, PutOutcome, StoreConfig, TierLevel, TieredStore};
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const BLOCK: usize = 64 * 1024;

fn s3(w: &WeedServer, prefix: &str) -> ObjectTierConfig {
    let mut c = ObjectTierConfig::new(format!("s3://{}/{prefix}", WeedServer::BUCKET));
    c.endpoint = Some(w.endpoint());
    c.credentials = Some(ObjectCredentials {
        access_key_id: WeedServer::ACCESS_KEY.into(),
        secret_access_key: WeedServer::SECRET_KEY.into(),
        session_token: None,
    });
    c.target_object_size = MIB;
    c.part_size = 5 * MIB;
    c.flush_interval = Duration::from_secs(3600);
    c.sync_interval = Duration::from_millis(100);
    c.retry_timeout = Duration::from_secs(5);
    c
}

/// A raw client on the same bucket, for looking underneath the tier.
fn raw(w: &WeedServer) -> Arc<dyn ObjectStore> {
    Arc::new(
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(WeedServer::BUCKET)
            .with_endpoint(w.endpoint())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id(WeedServer::ACCESS_KEY)
            .with_secret_access_key(WeedServer::SECRET_KEY)
            .build()
            .expect("raw client"),
    )
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Every object under `prefix`, sorted.
fn list(w: &WeedServer, prefix: &str) -> Vec<object_store::path::Path> {
    use futures::TryStreamExt as _;
    let store = raw(w);
    let p = object_store::path::Path::from(prefix);
    let mut all: Vec<_> = block_on(
        store
            .list(Some(&p))
            .map_ok(|m| m.location)
            .try_collect::<Vec<_>>(),
    )
    .expect("list");
    all.sort();
    all
}

fn put_range(t: &ObjectTier, range: std::ops::Range<u64>, len: usize) {
    let data: Vec<(BlockKey, Vec<u8>)> = range.map(|i| (key(i), payload(i, len))).collect();
    let items: Vec<(BlockKey, &[u8])> = data.iter().map(|(k, d)| (*k, d.as_slice())).collect();
    assert!(t.put_batch(&items).iter().all(|o| *o == PutOutcome::Stored));
}

/// Reads blocks through `t`: how many came back (a wrong byte panics).
fn read_exact(t: &ObjectTier, range: std::ops::Range<u64>, len: usize) -> usize {
    let keys: Vec<BlockKey> = range.clone().map(key).collect();
    let mut n = 0;
    t.get_batch(&keys, Instant::now() + Duration::from_secs(10), |i, p| {
        let id = range.start + i as u64;
        assert!(p == payload(id, len), "block {id} content differs");
        n += 1;
    });
    n
}

#[test]
fn round_trip_through_a_real_s3_server() {
    let Some(w) = WeedServer::start() else { return };
    let a = ObjectTier::open(s3(&w, "rt")).unwrap();
    assert_eq!(a.probe(), Ok(()));
    // 20 × 100 KiB fill two segments of 1 MiB; a 12 MiB block goes up in 5 MiB parts.
    put_range(&a, 0..20, 100 * KIB as usize);
    let big = payload(1000, 12 * MIB as usize);
    assert_eq!(a.put_batch(&[(key(1000), &big)]), vec![PutOutcome::Stored]);
    assert_eq!(a.flush(Duration::from_secs(60)), 0);
    let d = a.detail();
    assert_eq!(d.segments_uploaded, 3);
    assert_eq!(a.stats().stores, 21);
    let objects = list(&w, "rt");
    assert_eq!(
        objects.iter().filter(|p| p.as_ref().ends_with(".kvseg")).count(),
        3
    );
    assert_eq!(
        objects.iter().filter(|p| p.as_ref().ends_with(".kvidx")).count(),
        3
    );

    // A second tier on the same bucket and prefix (a fresh agent) learns and reads them all.
    let b = ObjectTier::open(s3(&w, "rt")).unwrap();
    b.sync_namespace(&ns());
    assert_eq!(read_exact(&b, 0..20, 100 * KIB as usize), 20);
    let mut got = None;
    b.get_batch(&[key(1000)], Instant::now() + Duration::from_secs(10), |_, p| {
        got = Some(p.to_vec())
    });
    assert!(
        got.as_deref() == Some(big.as_slice()),
        "the multipart block differs"
    );
    assert_eq!(b.detail().remote_blocks, 21);
    // A different prefix shares nothing.
    let c = ObjectTier::open(s3(&w, "other")).unwrap();
    c.sync_namespace(&ns());
    assert_eq!(read_exact(&c, 0..20, 100 * KIB as usize), 0);
}

fn cascade(w: &WeedServer, prefix: &str, with_disk: bool) -> (TieredStore, Option<tempfile::TempDir>) {
    let dir = with_disk.then(scratch);
    // Host: 128 slots of 64 KiB. Disk: 4 slabs of 1 MiB, 15 records of 68 KiB each = 60 blocks.
    let s = TieredStore::open(StoreConfig {
        host: host(8 * MIB, MIB),
        disk: dir
            .as_ref()
            .map(|d| disk(d.path(), 4 * MIB, MIB, kvstore::IoEngineChoice::Auto)),
        object: Some(s3(w, prefix)),
    })
    .expect("open store");
    (s, dir)
}

fn check(store: &TieredStore, i: u64) -> Option<TierLevel> {
    let mut buf = vec![0u8; BLOCK];
    let hit = store.get(&key(i), &mut buf).expect("get")?;
    assert!(buf == payload(i, BLOCK), "block {i} content differs");
    Some(hit.tier)
}

#[test]
fn disk_evictions_demote_to_s3_and_hits_promote_back() {
    let Some(w) = WeedServer::start() else { return };
    let (s, _dir) = cascade(&w, "cascade", true);
    for i in 0..300 {
        assert_eq!(s.put(&key(i), &payload(i, BLOCK)), PutOutcome::Stored);
    }
    let object = s.object().unwrap();
    assert_eq!(object.flush(Duration::from_secs(60)), 0);
    let st = s.stats();
    let (d, o) = (st.disk.unwrap(), st.object.unwrap());
    assert_eq!(
        (st.host.blocks, st.host.evictions, st.host.demotions),
        (128, 172, 172)
    );
    assert_eq!(
        (d.stores, d.blocks, d.evictions, d.demotions),
        (172, 60, 112, 112)
    );
    assert_eq!((o.stores, o.blocks, o.not_stored), (112, 112, 0));
    let m = s.lookup_prefix(&(0..300).map(key).collect::<Vec<_>>());
    assert_eq!(m.len, 300);
    assert_eq!(
        (
            m.count_in(TierLevel::Host),
            m.count_in(TierLevel::Disk),
            m.count_in(TierLevel::Object)
        ),
        (128, 60, 112)
    );

    // The oldest ten are in S3 only: each read promotes it to host, which pushes one block down
    // each tier.
    for i in 0..10 {
        assert_eq!(check(&s, i), Some(TierLevel::Object), "block {i}");
        // With the checksum its fetch was verified against, for a peer's grant.
        let sum = kvstore::block::checksum(&payload(i, BLOCK));
        assert_eq!(s.host().known_checksum(&key(i)), Some(sum), "block {i}");
    }
    assert_eq!(object.flush(Duration::from_secs(60)), 0);
    let st = s.stats();
    let (d, o) = (st.disk.unwrap(), st.object.unwrap());
    assert_eq!((o.hits, o.misses), (10, 0));
    assert_eq!((st.host.promotions, st.host.demotions), (10, 182));
    assert_eq!((d.demotions, o.stores), (122, 122));
    assert_eq!(check(&s, 0), Some(TierLevel::Host));
    // Nothing went missing on the way: every block is somewhere.
    let m = s.lookup_prefix(&(0..300).map(key).collect::<Vec<_>>());
    assert_eq!(m.len, 300);
}

#[test]
fn without_a_disk_tier_host_evictions_go_to_s3() {
    let Some(w) = WeedServer::start() else { return };
    let (s, _) = cascade(&w, "hostonly", false);
    for i in 0..160 {
        assert_eq!(s.put(&key(i), &payload(i, BLOCK)), PutOutcome::Stored);
    }
    assert_eq!(s.object().unwrap().flush(Duration::from_secs(60)), 0);
    let st = s.stats();
    assert_eq!((st.host.evictions, st.host.demotions), (32, 32));
    assert_eq!(st.object.unwrap().stores, 32);
    for i in 0..32 {
        assert_eq!(check(&s, i), Some(TierLevel::Object), "block {i}");
    }
    assert_eq!(st.host.promotions + 32, s.stats().host.promotions);
}

/// Two agents on one bucket: what one wrote through is found by the other's lookup and read
/// from S3, with no peer connection between them.
#[test]
fn two_stores_share_a_bucket() {
    let Some(w) = WeedServer::start() else { return };
    let (a, _) = cascade(&w, "shared", false);
    let keys: Vec<BlockKey> = (0..40).map(key).collect();
    for i in 0..40 {
        a.put(&key(i), &payload(i, BLOCK));
    }
    assert_eq!(a.write_through(&keys), 40);
    assert_eq!(a.write_through(&keys), 0, "already there");
    a.flush().unwrap();
    let (b, _) = cascade(&w, "shared", false);
    let m = b.lookup_prefix(&keys);
    assert_eq!((m.len, m.count_in(TierLevel::Object)), (40, 40));
    for i in 0..40 {
        assert_eq!(check(&b, i), Some(TierLevel::Object), "block {i}");
    }
    assert_eq!(b.stats().object.unwrap().hits, 40);
}

/// Four writers store the same blocks at once: every object in the bucket decodes and every
/// record in it verifies (nothing torn or mixed), and readers get exact data.
#[test]
fn concurrent_writers_of_the_same_blocks_never_tear_an_object() {
    let Some(w) = WeedServer::start() else { return };
    let writers: Vec<ObjectTier> = (0..4)
        .map(|_| ObjectTier::open(s3(&w, "race")).unwrap())
        .collect();
    std::thread::scope(|sc| {
        for t in &writers {
            sc.spawn(|| {
                put_range(t, 0..30, 100 * KIB as usize);
                assert_eq!(t.flush(Duration::from_secs(60)), 0);
            });
        }
    });
    let store = raw(&w);
    let objects = list(&w, "race");
    let idx: Vec<_> = objects
        .iter()
        .filter(|p| p.as_ref().ends_with(".kvidx"))
        .collect();
    assert_eq!(
        idx.len(),
        4 * 3,
        "each writer: 30 × 100 KiB in 1 MiB segments = 3 segments"
    );
    for p in idx {
        let bytes = block_on(async { store.get(p).await?.bytes().await }).unwrap();
        let index = kvstore::object::layout::decode_index(&bytes).expect("index decodes");
        let seg_path =
            kvstore::object::layout::segment_of_index(&object_store::path::Path::from("race"), &ns(), p)
                .expect("an index name names its segment");
        let seg = block_on(async { store.get(&seg_path).await?.bytes().await }).unwrap();
        assert_eq!(seg.len() as u64, index.segment_len);
        for e in &index.entries {
            assert_eq!(e.offset % kvstore::object::layout::PAYLOAD_ALIGN, 0);
            let payload = &seg[e.offset as usize..(e.offset + e.len) as usize];
            assert_eq!(
                kvstore::block::checksum(payload),
                e.checksum,
                "block {:?}",
                index.key(e)
            );
        }
    }
    let reader = ObjectTier::open(s3(&w, "race")).unwrap();
    reader.sync_namespace(&ns());
    assert_eq!(read_exact(&reader, 0..30, 100 * KIB as usize), 30);
}

/// The server dies while a large segment is uploading: the blocks are not stored (within the
/// retry timeout), no index names the half-written segment, other reads end by their deadline,
/// and after a restart uploads work again.
#[test]
fn server_killed_mid_upload() {
    let Some(mut w) = WeedServer::start() else { return };
    let mut c = s3(&w, "kill");
    c.target_object_size = 64 * MIB;
    c.part_size = 5 * MIB;
    c.upload_concurrency = 1;
    c.retry_timeout = Duration::from_secs(2);
    c.max_retries = 2;
    let t = ObjectTier::open(c).unwrap();
    put_range(&t, 0..1, 1000);
    assert_eq!(t.flush(Duration::from_secs(30)), 0);
    put_range(&t, 100..164, MIB as usize);
    let sealed_and_running = std::thread::scope(|sc| {
        let h = sc.spawn(|| t.flush(Duration::from_secs(60)));
        // Kill while the 64 MiB segment is uploading.
        let until = Instant::now() + Duration::from_secs(30);
        while t.detail().uploads_in_flight == 0 {
            assert!(Instant::now() < until, "the upload never started");
            std::thread::yield_now();
        }
        w.kill9();
        h.join().unwrap()
    });
    assert_eq!(
        sealed_and_running, 0,
        "the failed upload ended within its timeouts"
    );
    let st = t.stats();
    assert_eq!((st.stores, st.not_stored), (1, 64));
    let d = t.detail();
    assert!(d.failures.iter().sum::<u64>() >= 1, "{d:?}");
    assert_eq!(
        read_exact(&t, 100..164, MIB as usize),
        0,
        "not stored means a miss"
    );
    let started = Instant::now();
    let deadline = started + Duration::from_millis(300);
    t.get_batch(&[key(0)], deadline, |_, _| panic!("the server is dead"));
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "read took {:?}",
        started.elapsed()
    );
    w.restart();
    let idx = list(&w, "kill")
        .into_iter()
        .filter(|p| p.as_ref().ends_with(".kvidx"))
        .count();
    assert_eq!(idx, 1, "only the first, complete segment has an index");
    // The failures paused the tier (the background sync kept failing too); once the pause
    // ends it answers again and uploads go through.
    let until = Instant::now() + Duration::from_secs(70);
    while t.detail().degraded {
        assert!(Instant::now() < until, "the tier never resumed");
        std::thread::sleep(Duration::from_millis(20));
    }
    put_range(&t, 200..201, 1000);
    assert_eq!(t.flush(Duration::from_secs(30)), 0);
    assert_eq!(t.stats().stores, 2);
}

#[test]
fn wrong_credentials_mean_not_stored_and_a_clear_reason() {
    let Some(w) = WeedServer::start() else { return };
    let mut c = s3(&w, "creds");
    c.credentials = Some(ObjectCredentials {
        access_key_id: WeedServer::ACCESS_KEY.into(),
        secret_access_key: "not-the-secret".into(),
        session_token: None,
    });
    let t = ObjectTier::open(c).unwrap();
    match t.probe() {
        Err((Failure::Credentials, msg)) => assert!(!msg.is_empty()),
        other => panic!("expected a credentials failure, got {other:?}"),
    }
    let started = Instant::now();
    put_range(&t, 0..5, 1000);
    assert_eq!(t.flush(Duration::from_secs(30)), 0);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let st = t.stats();
    assert_eq!((st.stores, st.not_stored), (0, 5));
    assert!(t.detail().failures_of(Failure::Credentials) >= 1);
    assert!(list(&w, "creds").is_empty());
}

/// A byte flipped in a stored segment is a miss (and counted), never wrong data; an object
/// deleted underneath is a miss and its blocks are forgotten.
#[test]
fn a_corrupted_or_deleted_object_is_a_miss() {
    let Some(w) = WeedServer::start() else { return };
    let a = ObjectTier::open(s3(&w, "corrupt")).unwrap();
    put_range(&a, 0..20, 100 * KIB as usize);
    assert_eq!(a.flush(Duration::from_secs(30)), 0);
    let store = raw(&w);
    let segs: Vec<_> = list(&w, "corrupt")
        .into_iter()
        .filter(|p| p.as_ref().ends_with(".kvseg"))
        .collect();
    assert_eq!(segs.len(), 2);
    let mut bytes = block_on(async { store.get(&segs[0]).await?.bytes().await })
        .unwrap()
        .to_vec();
    bytes[7] ^= 0x55;
    block_on(store.put(&segs[0], PutPayload::from(bytes))).unwrap();

    let b = ObjectTier::open(s3(&w, "corrupt")).unwrap();
    b.sync_namespace(&ns());
    let mut got = 0;
    b.get_batch(
        &[key(0), key(1)],
        Instant::now() + Duration::from_secs(10),
        |i, p| {
            assert!(p == payload(i as u64, 100 * KIB as usize));
            got += 1;
        },
    );
    assert_eq!(got, 1, "block 0 is corrupt, block 1 intact");
    assert_eq!(b.stats().checksum_failures, 1);
    assert_eq!(b.detail().failures_of(Failure::Corrupt), 1);

    block_on(store.delete(&segs[1])).unwrap();
    assert_eq!(read_exact(&b, 19..20, 100 * KIB as usize), 0);
    assert_eq!(b.detail().failures_of(Failure::NotFound), 1);
    assert!(
        !b.contains_many(&[key(19)])[0],
        "the deleted segment's blocks are forgotten"
    );
}

/// An endpoint that answers every request with 503 SlowDown: after retries, the block is not
/// stored, counted as throttled.
#[test]
fn a_throttling_store_means_not_stored() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            listener.set_nonblocking(true).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => answer_503(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        })
    };
    let mut c = ObjectTierConfig::new("s3://b/p");
    c.endpoint = Some(format!("http://127.0.0.1:{port}"));
    c.credentials = Some(ObjectCredentials {
        access_key_id: "k".into(),
        secret_access_key: "s".into(),
        session_token: None,
    });
    c.max_retries = 2;
    c.retry_backoff = Duration::from_millis(10);
    c.retry_timeout = Duration::from_secs(2);
    c.sync_interval = Duration::ZERO;
    let t = ObjectTier::open(c).unwrap();
    put_range(&t, 0..3, 1000);
    assert_eq!(t.flush(Duration::from_secs(30)), 0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap();
    assert_eq!(t.stats().not_stored, 3);
    assert_eq!(t.detail().failures_of(Failure::Throttled), 1, "{:?}", t.detail());
}

fn answer_503(mut s: std::net::TcpStream) {
    use std::io::{Read as _, Write as _};
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let _ = s.read(&mut buf);
    let body = "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
    let _ = write!(
        s,
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Disk slabs that waste space at their end (here 2 records of 1.5 MiB + 4 KiB in 4 MiB) must
/// still demote every disk eviction, not drop it: the victims are found the way the disk's own
/// eviction finds them, not by counting free bytes.
#[test]
fn disk_evictions_demote_even_when_slabs_waste_space() {
    let dir = scratch();
    let mut object = ObjectTierConfig::new("memory://waste");
    object.sync_interval = Duration::ZERO;
    let s = TieredStore::open(StoreConfig {
        host: host(16 * MIB, 4 * MIB),
        disk: Some(disk(dir.path(), 16 * MIB, 4 * MIB, kvstore::IoEngineChoice::Auto)),
        object: Some(object),
    })
    .expect("open store");
    let len = (3 * MIB / 2) as usize;
    for i in 0..40 {
        assert_eq!(s.put(&key(i), &payload(i, len)), PutOutcome::Stored, "block {i}");
    }
    let st = s.stats();
    let d = st.disk.unwrap();
    assert!(d.evictions > 0, "the disk filled: {d:?}");
    assert_eq!(
        d.demotions, d.evictions,
        "every disk eviction went to the object tier: {d:?}"
    );
    let m = s.lookup_prefix(&(0..40).map(key).collect::<Vec<_>>());
    assert_eq!(m.len, 40, "no block was lost on the way down");
    for i in 0..40 {
        let mut buf = vec![0u8; len];
        assert!(s.get(&key(i), &mut buf).unwrap().is_some(), "block {i}");
        assert!(buf == payload(i, len), "block {i} differs");
    }
}

/// The servers' ports (here SeaweedFS's) come from below the kernel's ephemeral range, where no
/// outgoing connection can take one between its pick and the server's bind, and none is handed
/// out twice, to this process or (by its lock file) to another.
#[test]
fn server_ports_are_distinct_reserved_and_below_the_ephemeral_range() {
    use common::ports::{ephemeral_range, free_port, free_port_and, reserve};
    let (low, _) = ephemeral_range();
    let picked: Vec<u16> = (0..20).map(|_| free_port()).collect();
    let mut distinct = picked.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        picked.len(),
        "a port handed out twice: {picked:?}"
    );
    if low > 12_000 {
        assert!(
            picked.iter().all(|&p| u32::from(p) < low),
            "{picked:?} not below {low}"
        );
    }
    assert!(!reserve(picked[0]), "a reserved port was reserved again");
    let (port, other) = free_port_and(10_000);
    assert_eq!(other, port + 10_000);
    assert!(!picked.contains(&port) && !picked.contains(&other));
}

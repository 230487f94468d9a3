use super::*;
use crate::BlockKey;
use crate::block::checksum;
use crate::transport::test_support::{key, payload, soon, store};

/// A hand-written source for failure tests: accepts a connection and greets it without a
/// secret; the stream, its handshake done.
async fn accept_handshake(listener: &TcpListener) -> TcpStream {
    let (mut s, _) = listener.accept().await.unwrap();
    let mut hello = [0u8; HELLO_LEN];
    hello[..4].copy_from_slice(&MAGIC);
    hello[4..6].copy_from_slice(&VERSION.to_le_bytes());
    s.write_all(&hello).await.unwrap();
    let mut answer = [0u8; MAC_LEN];
    s.read_exact(&mut answer).await.unwrap();
    s.write_all(&[0]).await.unwrap();
    s
}

/// [`accept_handshake`], then reads one request; the stream and the requested grant indices.
async fn accept_request(listener: &TcpListener) -> (TcpStream, Vec<u32>) {
    let mut s = accept_handshake(listener).await;
    let mut head = [0u8; 20];
    s.read_exact(&mut head).await.unwrap();
    let count = u32::from_le_bytes(head[16..20].try_into().unwrap()) as usize;
    let mut idx = vec![0u8; 4 * count];
    s.read_exact(&mut idx).await.unwrap();
    let indices = idx
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (s, indices)
}

/// Connections the puller has opened.
fn opened(t: &TcpTransport) -> usize {
    t.inner.opened.load(std::sync::atomic::Ordering::Relaxed)
}

/// Idle connections the puller keeps, over all sources.
fn kept(t: &TcpTransport) -> usize {
    t.inner.pool.lock().values().map(Vec::len).sum()
}

/// An item for block `i` of `len` bytes, in a fresh slot of `store`.
fn item(store: &TieredStore, i: u32, len: usize, checksum: u64) -> PullItem {
    PullItem {
        index: i,
        remote_offset: 0,
        checksum,
        slot: store
            .reserve_batch(&[(key(u64::from(i)), len as u64)])
            .pop()
            .unwrap()
            .unwrap(),
    }
}

/// A source with `n` blocks of `len` bytes, serving on loopback.
async fn source(n: u64, len: usize, secret: Option<&[u8]>) -> (Arc<Grants>, TcpTransport, SocketAddr) {
    let s = store(64);
    for i in 0..n {
        assert_eq!(s.put(&key(i), &payload(i, len)), crate::PutOutcome::Stored);
    }
    let grants = Arc::new(Grants::new(Arc::clone(&s), Duration::from_secs(30), 16));
    let t = TcpTransport::new(
        s,
        Some(Arc::clone(&grants)),
        secret.and_then(Secret::new),
        TcpConfig::default(),
    );
    let addr = t.serve(TcpListener::bind("127.0.0.1:0").await.unwrap()).unwrap();
    (grants, t, addr)
}

fn puller(secret: Option<&[u8]>, streams: usize) -> (Arc<TieredStore>, TcpTransport) {
    let s = store(64);
    let cfg = TcpConfig {
        streams,
        io_timeout: Duration::from_secs(5),
        ..TcpConfig::default()
    };
    let t = TcpTransport::new(Arc::clone(&s), None, secret.and_then(Secret::new), cfg);
    (s, t)
}

/// Reserves local slots for the granted blocks and pulls them; returns what came back.
async fn pull(
    store: &TieredStore,
    t: &TcpTransport,
    endpoint: &[u8],
    grant: &crate::transport::Grant,
    keys: &[BlockKey],
) -> Vec<Pulled> {
    let wanted: Vec<(BlockKey, u64)> = keys.iter().zip(&grant.blocks).map(|(k, b)| (*k, b.len)).collect();
    let items = store
        .reserve_batch(&wanted)
        .into_iter()
        .enumerate()
        .map(|(i, r)| PullItem {
            index: i as u32,
            remote_offset: grant.blocks[i].offset,
            checksum: grant.blocks[i].checksum,
            slot: r.expect("slot"),
        })
        .collect();
    t.pull(endpoint, grant.id, items, soon()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_are_byte_exact_over_several_streams_and_reuse_connections() {
    let len = 96 * 1024 + 3;
    let (grants, src, _) = source(40, len, Some(b"s3cret")).await;
    let (dst, t) = puller(Some(b"s3cret"), 4);
    let keys: Vec<BlockKey> = (0..40).map(key).collect();
    let endpoint = src.endpoint(None);
    for round in 0..2 {
        let grant = grants.grant(&keys).unwrap();
        assert_eq!(grant.blocks.len(), 40);
        let pulled = pull(&dst, &t, &endpoint, &grant, &keys).await;
        assert_eq!(pulled.len(), 40);
        for p in pulled {
            assert_eq!(p.result, Ok(()), "round {round}");
            let mut slot = p.slot;
            let got = dst.host().reserved_mut(&mut slot).to_vec();
            assert_eq!(checksum(&got), grant.blocks[p.index as usize].checksum);
            assert_eq!(got, payload(u64::from(p.index), len));
            dst.abort(slot);
        }
        assert!(grants.release(&grant.id));
    }
    // A connection is opened only while every kept one is busy, so two pulls of at most four
    // streams each open at most four (eight without reuse). A chunk that starts after another
    // finished may take that one's connection, so fewer is fine.
    let opened = opened(&t);
    assert!(
        (1..=4).contains(&opened),
        "{opened} connections for two pulls of four streams: the second did not reuse the first's"
    );
    let idle = kept(&t);
    assert_eq!(idle, opened, "every connection went back to the pool");
}

/// A connection per pull in flight at once goes back to the pool, up to
/// [`KEPT_CONNECTIONS_PER_PEER`] of them per source (20 in use at once, 16 kept), and the
/// pulls after take those rather than connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_at_once_keep_their_connections_for_the_next() {
    let len = 64 * 1024;
    let (grants, src, _) = source(1, len, None).await;
    let (dst, t) = puller(None, 1);
    let endpoint = src.endpoint(None);
    let peer = parse_endpoint(&endpoint).unwrap();
    // Twenty connections in use at once, as twenty pulls at once hold, then done with.
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(t.inner.connect(peer, soon()).await.unwrap());
    }
    for stream in streams {
        t.inner.keep(peer, stream);
    }
    assert_eq!((opened(&t), kept(&t)), (20, KEPT_CONNECTIONS_PER_PEER));
    let keys = vec![key(0)];
    for _ in 0..KEPT_CONNECTIONS_PER_PEER {
        let grant = grants.grant(&keys).unwrap();
        for p in pull(&dst, &t, &endpoint, &grant, &keys).await {
            assert_eq!(p.result, Ok(()));
            dst.abort(p.slot);
        }
        assert!(grants.release(&grant.id));
    }
    assert_eq!(
        opened(&t),
        20,
        "a pull connected anew while connections were kept"
    );
    assert_eq!(kept(&t), KEPT_CONNECTIONS_PER_PEER);
}

/// A one-block request of a large block leaves the source with `sendfile` (straight from the
/// arena's memfd); the bytes are the same, and the source keeps using it. An arena on
/// reserved huge pages (hugetlbfs, which `sendfile` cannot read) is sent with copies instead,
/// the bytes the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_single_block_is_sent_from_the_arena_file() {
    let len = 3 * (SENDFILE_MIN as usize) + 5;
    let (grants, src, _) = source(3, len, None).await;
    let (dst, t) = puller(None, 2);
    let endpoint = src.endpoint(None);
    for i in 0..3 {
        let keys = [key(i)];
        let grant = grants.grant(&keys).unwrap();
        let pulled = pull(&dst, &t, &endpoint, &grant, &keys).await;
        let [p] = &pulled[..] else {
            panic!("{} results", pulled.len())
        };
        assert_eq!(p.result, Ok(()));
        let mut slot = pulled.into_iter().next().unwrap().slot;
        assert_eq!(dst.host().reserved_mut(&mut slot), &payload(i, len)[..]);
        dst.abort(slot);
        assert!(grants.release(&grant.id));
    }
    let huge = grants.store().host().arena().huge_pages();
    assert_eq!(
        src.inner.sendfile.load(Ordering::Relaxed),
        !huge,
        "sendfile is used unless the arena is on huge pages (here: {huge})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_secret_is_refused() {
    let (grants, src, _) = source(2, 4096, Some(b"right")).await;
    let keys = [key(0), key(1)];
    let grant = grants.grant(&keys).unwrap();
    for secret in [Some(&b"wrong"[..]), None] {
        let (dst, t) = puller(secret, 2);
        for p in pull(&dst, &t, &src.endpoint(None), &grant, &keys).await {
            assert!(
                matches!(p.result, Err(TransportError::Refused { .. })),
                "{:?}",
                p.result
            );
            dst.abort(p.slot);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_grant_and_bad_endpoint_fail_cleanly() {
    let (grants, src, _) = source(2, 4096, None).await;
    let keys = [key(0), key(1)];
    let grant = grants.grant(&keys).unwrap();
    assert!(grants.release(&grant.id));
    let (dst, t) = puller(None, 1);
    for p in pull(&dst, &t, &src.endpoint(None), &grant, &keys).await {
        assert!(
            matches!(p.result, Err(TransportError::UnknownGrant { .. })),
            "{:?}",
            p.result
        );
        dst.abort(p.slot);
    }
    for p in pull(&dst, &t, b"not-an-address", &grant, &keys).await {
        assert!(matches!(p.result, Err(TransportError::BadEndpoint { .. })));
        dst.abort(p.slot);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_closes_only_its_connection() {
    let (grants, src, addr) = source(1, 4096, None).await;
    let mut bad = handshake(addr).await;
    // A request for zero blocks is malformed: the server hangs up on this connection.
    bad.write_all(&[0u8; 20]).await.unwrap();
    let mut rest = Vec::new();
    assert_eq!(bad.read_to_end(&mut rest).await.unwrap(), 0);

    let (dst, t) = puller(None, 1);
    let grant = grants.grant(&[key(0)]).unwrap();
    let pulled = pull(&dst, &t, &src.endpoint(None), &grant, &[key(0)]).await;
    assert_eq!(pulled[0].result, Ok(()));
}

/// A block the grant does not hold fails with the source's reason, next to blocks that arrive
/// whole on the same stream, which stays in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_outside_the_grant_fails_alone_and_says_so() {
    let len = 8192;
    let (grants, src, _) = source(2, len, None).await;
    let (dst, t) = puller(None, 1);
    let grant = grants.grant(&[key(0), key(1)]).unwrap();
    let endpoint = src.endpoint(None);
    for round in 0..2 {
        let items = vec![
            item(&dst, 0, len, grant.blocks[0].checksum),
            item(&dst, 7, len, 0),
            item(&dst, 1, len, grant.blocks[1].checksum),
        ];
        let mut pulled = t.pull(&endpoint, grant.id, items, soon()).await;
        pulled.sort_by_key(|p| p.index);
        let results: Vec<_> = pulled.iter().map(|p| (p.index, p.result.clone())).collect();
        assert_eq!(results[0], (0, Ok(())), "round {round}");
        assert_eq!(results[1], (1, Ok(())), "round {round}");
        assert!(
            matches!(&results[2], (7, Err(TransportError::Protocol { reason, .. })) if reason.contains("not in the grant")),
            "round {round}: {:?}",
            results[2]
        );
        for p in pulled {
            dst.abort(p.slot);
        }
    }
}

/// Connects to `addr` and completes the handshake of a source without a secret.
async fn handshake(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut hello = [0u8; HELLO_LEN];
    s.read_exact(&mut hello).await.unwrap();
    s.write_all(&[0u8; MAC_LEN]).await.unwrap();
    let mut status = [9u8];
    s.read_exact(&mut status).await.unwrap();
    assert_eq!(status[0], 0);
    s
}

/// A puller that goes quiet (connected and sending nothing, half a request, or never reading
/// the answer) holds nothing of the source for longer than the source's bounds: the connection
/// is closed and the blocks an answer pinned are free once their grant is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puller_that_goes_quiet_is_dropped_and_pins_nothing() {
    let len = 4 << 20;
    let s = store(16);
    assert_eq!(s.put(&key(0), &payload(0, len)), crate::PutOutcome::Stored);
    let grants = Arc::new(Grants::new(Arc::clone(&s), Duration::from_secs(30), 16));
    let cfg = TcpConfig {
        io_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(300),
        ..TcpConfig::default()
    };
    let src = TcpTransport::new(Arc::clone(&s), Some(Arc::clone(&grants)), None, cfg);
    let addr = src
        .serve(TcpListener::bind("127.0.0.1:0").await.unwrap())
        .unwrap();
    let closed = |mut c: TcpStream| async move {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
            .await
            .expect("the source kept a quiet connection open")
            .map(|_| rest.len())
    };
    // Connected, and no request.
    let idle = handshake(addr).await;
    assert_eq!(closed(idle).await.unwrap(), 0);
    // A request head for four blocks, and two of their indices.
    let grant = grants.grant(&[key(0)]).unwrap();
    let mut half = handshake(addr).await;
    let mut head = [0u8; 20];
    head[..16].copy_from_slice(&grant.id.0);
    head[16..].copy_from_slice(&4u32.to_le_bytes());
    half.write_all(&head).await.unwrap();
    half.write_all(&[0u8; 8]).await.unwrap();
    assert_eq!(closed(half).await.unwrap(), 0);
    // The block 64 times over (256 MiB, far beyond the sockets' buffers), never read.
    let mut stalled = handshake(addr).await;
    head[16..].copy_from_slice(&64u32.to_le_bytes());
    stalled.write_all(&head).await.unwrap();
    stalled.write_all(&[0u8; 4 * 64]).await.unwrap();
    assert!(grants.release(&grant.id));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.host().remove(&key(0)) {
        assert!(
            Instant::now() < deadline,
            "the stalled answer still pins its block"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(stalled);
}

/// A peer that dies after sending part of a block: the blocks on that stream fail, the
/// others arrive, and the puller's transport keeps working for the next pull.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_dying_mid_block_fails_only_its_stream() {
    let len = 1 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        // Two connections (two streams): the first sends its blocks whole, the second half of
        // one block and then vanishes. Both are accepted before either is answered, so neither
        // stream can finish and lend its connection to the other.
        let first = accept_request(&listener).await;
        let second = accept_request(&listener).await;
        for (conn, (mut s, indices)) in [first, second].into_iter().enumerate() {
            for i in indices {
                let mut h = [0u8; REPLY_HEADER];
                h[1..].copy_from_slice(&(len as u64).to_le_bytes());
                s.write_all(&h).await.unwrap();
                let data = payload(u64::from(i), len);
                if conn == 1 {
                    s.write_all(&data[..len / 2]).await.unwrap();
                    break;
                }
                s.write_all(&data).await.unwrap();
            }
            if conn == 1 {
                drop(s);
            } else {
                // Keep the healthy stream open until the test is over.
                tokio::spawn(async move {
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                });
            }
        }
    });
    let (dst, t) = puller(None, 2);
    let items: Vec<PullItem> = (0..4u32)
        .map(|i| item(&dst, i, len, checksum(&payload(u64::from(i), len))))
        .collect();
    let pulled = t
        .pull(addr.to_string().as_bytes(), GrantId([1; 16]), items, soon())
        .await;
    server.await.unwrap();
    let ok: Vec<u32> = pulled
        .iter()
        .filter(|p| p.result.is_ok())
        .map(|p| p.index)
        .collect();
    // Which stream the server accepted first is up to the scheduler.
    assert!(
        ok == [0, 1] || ok == [2, 3],
        "the healthy stream's blocks arrived, the dead one's did not: {ok:?}"
    );
    for p in pulled {
        if let Err(e) = &p.result {
            assert!(matches!(e, TransportError::Io { .. }), "{e:?}");
        } else {
            let mut slot = p.slot;
            assert_eq!(
                dst.host().reserved_mut(&mut slot),
                &payload(u64::from(p.index), len)[..]
            );
            dst.abort(slot);
            continue;
        }
        dst.abort(p.slot);
    }
    assert_eq!(kept(&t), 1, "only the healthy stream is kept");
}

#[test]
fn streams_get_contiguous_runs_of_about_equal_bytes() {
    let s = store(16);
    let items: Vec<PullItem> = (0..10u32).map(|i| item(&s, i, 4096, 0)).collect();
    let runs = split_by_bytes(items, 4);
    let sizes: Vec<usize> = runs.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![3, 2, 3, 2]);
    let order: Vec<u32> = runs.iter().flatten().map(|i| i.index).collect();
    assert_eq!(order, (0..10).collect::<Vec<_>>());
    for item in runs.into_iter().flatten() {
        s.abort(item.slot);
    }
}

/// A block whose bytes do not match the grant's checksum is reported as such, alone; the
/// stream stays in step for the blocks after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_failing_its_checksum_fails_alone() {
    let (grants, src, _) = source(3, 8192, None).await;
    let keys = [key(0), key(1), key(2)];
    let mut grant = grants.grant(&keys).unwrap();
    grant.blocks[1].checksum ^= 1;
    let (dst, t) = puller(None, 1);
    let pulled = pull(&dst, &t, &src.endpoint(None), &grant, &keys).await;
    let results: Vec<_> = pulled.iter().map(|p| p.result.clone()).collect();
    assert_eq!(results[0], Ok(()));
    assert!(
        matches!(results[1], Err(TransportError::Checksum { index: 1, .. })),
        "{results:?}"
    );
    assert_eq!(results[2], Ok(()));
    for p in pulled {
        dst.abort(p.slot);
    }
}

/// Kept connections that the source closed (as it closes idle ones) cost one failed try in
/// all: the first pull that finds one closed goes again on a fresh connection and drops the
/// others kept for that source, which the next pulls would each have found closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_connections_the_source_closed_are_dropped_together() {
    let len = 8192;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(accept_handshake(&listener).await);
        }
        drop(idle);
        closed_tx.send(()).unwrap();
        let (mut s, indices) = accept_request(&listener).await;
        let mut h = [0u8; REPLY_HEADER];
        h[1..].copy_from_slice(&(len as u64).to_le_bytes());
        s.write_all(&h).await.unwrap();
        s.write_all(&payload(u64::from(indices[0]), len)).await.unwrap();
        // Open until the puller has read the answer and kept the connection.
        let mut end = [0u8; 1];
        let _ = s.read(&mut end).await;
    });
    let (dst, t) = puller(None, 1);
    for _ in 0..3 {
        let stream = t.inner.connect(addr, soon()).await.unwrap();
        t.inner.keep(addr, stream);
    }
    closed.await.unwrap();
    let item = item(&dst, 0, len, checksum(&payload(0, len)));
    let mut pulled = t
        .pull(addr.to_string().as_bytes(), GrantId([2; 16]), vec![item], soon())
        .await;
    let p = pulled.pop().unwrap();
    assert_eq!(p.result, Ok(()));
    dst.abort(p.slot);
    assert_eq!(
        (opened(&t), kept(&t)),
        (4, 1),
        "three kept and closed, one fresh: only the fresh one is kept"
    );
    drop(t);
    server.await.unwrap();
}

/// A kept connection that the source closed meanwhile (it restarted) costs nothing: the pull
/// goes again on a fresh connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_the_source_closed_is_replaced() {
    let len = 8192;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        // Each connection serves one request, then the "source" goes away and comes back.
        for _ in 0..2 {
            let (mut s, indices) = accept_request(&listener).await;
            let mut h = [0u8; REPLY_HEADER];
            h[1..].copy_from_slice(&(len as u64).to_le_bytes());
            s.write_all(&h).await.unwrap();
            s.write_all(&payload(u64::from(indices[0]), len)).await.unwrap();
            drop(s);
        }
    });
    let (dst, t) = puller(None, 1);
    for round in 0..2u32 {
        let item = item(&dst, round, len, checksum(&payload(u64::from(round), len)));
        let mut pulled = t
            .pull(addr.to_string().as_bytes(), GrantId([2; 16]), vec![item], soon())
            .await;
        let p = pulled.pop().unwrap();
        assert_eq!(p.result, Ok(()), "round {round}");
        dst.abort(p.slot);
    }
    server.await.unwrap();
}

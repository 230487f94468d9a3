//! `kvagent index` over gRPC: what publishers report is what Score and Lookup answer; sequence
//! gaps, bad input and unreproducible hash settings get clear errors; a real `kvagent node`
//! reports its tiers and resyncs after the index restarts.

mod common;

use std::time::{Duration, Instant};

use common::IndexProc;

use kvagent::index::proto::{self, index_client::IndexClient};
use kvstore::vllm::{BlockHasher, HashAlgo, RequestExtras, event_hash};
use tonic::Code;

fn stored(hashes: &[u64], medium: proto::Medium) -> proto::Event {
    proto::Event {
        kind: Some(proto::event::Kind::Stored(proto::Stored {
            hashes: hashes.to_vec(),
            medium: medium as i32,
        })),
    }
}

fn removed(hashes: &[u64], medium: proto::Medium) -> proto::Event {
    proto::Event {
        kind: Some(proto::event::Kind::Removed(proto::Removed {
            hashes: hashes.to_vec(),
            medium: medium as i32,
        })),
    }
}

fn batch(source: &str, seq: u64, resync: bool, events: Vec<proto::Event>) -> proto::EventBatch {
    proto::EventBatch {
        source: source.into(),
        model: "m".into(),
        epoch: 1,
        seq,
        resync,
        events,
        peer_address: String::new(),
    }
}

fn by_hashes(hashes: &[u64]) -> proto::ScoreRequest {
    proto::ScoreRequest {
        model: "m".into(),
        prompt: Some(proto::score_request::Prompt::Hashes(proto::BlockHashes {
            hashes: hashes.to_vec(),
        })),
        ..Default::default()
    }
}

async fn scores(
    c: &mut IndexClient<tonic::transport::Channel>,
    req: proto::ScoreRequest,
) -> Vec<(String, u32, f64)> {
    let resp = c.score(req).await.expect("Score").into_inner();
    resp.scores
        .into_iter()
        .map(|s| (s.pod, s.blocks, s.weighted))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_tiers_count_for_the_pods_of_their_node() {
    // p1 runs on n1; its events endpoint is never up, which the index tolerates.
    let idx = IndexProc::start(&[
        "--pod",
        "p1=m@tcp://127.0.0.1:9,node=n1",
        "--pod",
        "p2=m@tcp://127.0.0.1:9",
    ]);
    let mut c = idx.client().await;
    let stream = tokio_stream::iter(vec![
        batch("agent/n1", 0, true, vec![stored(&[1, 2, 3], proto::Medium::Host)]),
        batch("agent/n1", 1, false, vec![removed(&[3], proto::Medium::Host)]),
        batch("agent/n1", 2, false, vec![]),
    ]);
    let ack = c
        .publish_events(stream)
        .await
        .expect("PublishEvents")
        .into_inner();
    assert_eq!(ack.batches, 3);
    let got = scores(&mut c, by_hashes(&[1, 2, 3])).await;
    assert_eq!(got, vec![("p1".into(), 2, 1.6), ("p2".into(), 0, 0.0)]);

    let lookup = c
        .lookup(proto::LookupRequest {
            model: "m".into(),
            hashes: Some(proto::BlockHashes {
                hashes: vec![1, 2, 3],
            }),
        })
        .await
        .expect("Lookup")
        .into_inner();
    assert_eq!(lookup.blocks.len(), 2, "block 3 was removed");
    assert_eq!(lookup.blocks[0].holders[0].source, "agent/n1");
    assert_eq!(
        lookup.blocks[0].holders[0].media,
        vec![proto::Medium::Host as i32]
    );

    // Another model's blocks never count.
    let mut other = by_hashes(&[1, 2]);
    other.model = "other".into();
    assert!(scores(&mut c, other).await.is_empty(), "no pod serves that model");

    // A stream that does not start with a resync is refused, and the source is forgotten.
    let gap = tokio_stream::iter(vec![batch("agent/n1", 7, false, vec![])]);
    let err = c.publish_events(gap).await.expect_err("a gap");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("resync"), "{}", err.message());
    assert_eq!(scores(&mut c, by_hashes(&[1])).await[0].1, 0);

    // A medium out of range is a clear error.
    let bad = tokio_stream::iter(vec![batch(
        "agent/n1",
        0,
        true,
        vec![stored(&[1], proto::Medium::Unspecified)],
    )]);
    let err = c.publish_events(bad).await.expect_err("a bad medium");
    assert_eq!(err.code(), Code::InvalidArgument);

    let stats = c.stats(proto::StatsRequest {}).await.expect("Stats").into_inner();
    let names: Vec<_> = stats.sources.iter().map(|s| s.name.as_str()).collect();
    // Sources are those that reported: p1's publisher was never up.
    assert_eq!(names, vec!["agent/n1"]);
    let cleared = c
        .clear_source(proto::ClearSourceRequest {
            source: "nobody".into(),
        })
        .await
        .expect("ClearSource")
        .into_inner();
    assert!(!cleared.known);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_given_as_tokens_are_hashed_as_vllm_does() {
    let idx = IndexProc::start(&["--pod", "p1=m@tcp://127.0.0.1:9"]);
    let mut c = idx.client().await;
    let tokens: Vec<u32> = (0..100).collect();
    let hasher = BlockHasher::new(HashAlgo::Sha256Cbor, 16, None).unwrap();
    let hashes: Vec<u64> = hasher
        .block_hashes(&tokens, &RequestExtras::default())
        .iter()
        .map(|h| event_hash(h.as_bytes()))
        .collect();
    assert_eq!(hashes.len(), 6);
    // The pod itself publishes (as an engine with its own publisher would), four blocks.
    let stream = tokio_stream::iter(vec![batch(
        "p1",
        0,
        true,
        vec![stored(&hashes[..4], proto::Medium::Device)],
    )]);
    c.publish_events(stream).await.expect("PublishEvents");
    let req = proto::ScoreRequest {
        model: "m".into(),
        prompt: Some(proto::score_request::Prompt::Tokens(proto::TokenIds {
            ids: tokens.clone(),
        })),
        hash: Some(proto::HashConfig {
            block_size: 16,
            ..Default::default()
        }),
        ..Default::default()
    };
    let resp = c.score(req.clone()).await.expect("Score").into_inner();
    assert_eq!(resp.prompt_blocks, 6);
    assert_eq!((resp.scores[0].pod.as_str(), resp.scores[0].blocks), ("p1", 4));

    // A salted request hashes differently: no hit.
    let mut salted = req.clone();
    if let Some(h) = salted.hash.as_mut() {
        h.cache_salt = "tenant".into();
    }
    assert_eq!(
        c.score(salted).await.expect("Score").into_inner().scores[0].blocks,
        0
    );

    // Settings that cannot reproduce vLLM's hashes say so.
    let mut pickle = req.clone();
    if let Some(h) = pickle.hash.as_mut() {
        h.algo = "sha256".into();
    }
    let err = c.score(pickle).await.expect_err("sha256 is pickle-based");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("sha256_cbor"), "{}", err.message());
    let mut nameless = req;
    nameless.model.clear();
    assert_eq!(
        c.score(nameless).await.expect_err("no model").code(),
        Code::InvalidArgument
    );
}

/// The holders of each leading block of `hashes` in model `m`, as (source, media) pairs.
async fn holders(
    c: &mut IndexClient<tonic::transport::Channel>,
    hashes: &[u64],
) -> Vec<Vec<(String, Vec<i32>)>> {
    let resp = c
        .lookup(proto::LookupRequest {
            model: "m".into(),
            hashes: Some(proto::BlockHashes {
                hashes: hashes.to_vec(),
            }),
        })
        .await
        .expect("Lookup")
        .into_inner();
    resp.blocks
        .into_iter()
        .map(|b| b.holders.into_iter().map(|h| (h.source, h.media)).collect())
        .collect()
}

/// Polls the index (a fresh connection each time: it may be restarting) until `want` holds
/// the lookup of `hashes`, or fails after `limit`.
async fn wait_for_holders(
    url: &str,
    hashes: &[u64],
    limit: Duration,
    want: impl Fn(&[Vec<(String, Vec<i32>)>]) -> bool,
) -> Vec<Vec<(String, Vec<i32>)>> {
    let deadline = Instant::now() + limit;
    let mut last = Vec::new();
    while Instant::now() < deadline {
        if let Ok(mut c) = IndexClient::connect(url.to_owned()).await {
            last = holders(&mut c, hashes).await;
            if want(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the index never showed what the agent holds; last lookup: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_agent_reports_its_tiers_and_resyncs_after_an_index_restart() {
    // A fixed port, so that the restarted index is where the agent reports to.
    let port = common::ports::free_port();
    let addr = format!("127.0.0.1:{port}");
    let pod = ["--pod", "p1=m@tcp://127.0.0.1:9,node=n1"];
    let idx = IndexProc::start_at(&addr, &pod);
    let dir = common::socket_dir();
    let agent = common::Agent::start(
        &dir.path().join("a.sock"),
        &["--index", &addr, "--node-name", "n1"],
    );
    let client = agent.client();
    let data = vec![7u8; 4096];
    let save = |ns: &kvstore::Namespace, seed: u64| {
        let items: Vec<_> = (0..8).map(|i| (common::hash(seed, i), data.as_slice())).collect();
        let out = client.save(ns, &items).expect("save");
        assert!(
            out.iter().all(|o| *o == kvstore::client::SaveOutcome::Stored),
            "{out:?}"
        );
        (0..8)
            .map(|i| event_hash(common::hash(seed, i).as_bytes()))
            .collect::<Vec<u64>>()
    };
    let unannounced = save(&common::ns("other"), 2);
    client.announce(&common::ns("m"), "m").expect("announce");
    let reported = save(&common::ns("m"), 1);

    let on_host = |b: &[Vec<(String, Vec<i32>)>]| {
        b.len() == 8
            && b.iter()
                .all(|h| *h == [("agent/n1".to_owned(), vec![proto::Medium::Host as i32])])
    };
    wait_for_holders(&idx.url, &reported, Duration::from_secs(15), on_host).await;
    let mut c = idx.client().await;
    assert!(
        holders(&mut c, &unannounced).await.is_empty(),
        "blocks of a namespace nobody announced are not reported"
    );
    // The pod on node n1 can reuse what its agent holds, at the host tier's weight.
    let mut req = by_hashes(&reported);
    req.pods = vec!["p1".into()];
    let got = scores(&mut c, req).await;
    assert_eq!((got[0].0.as_str(), got[0].1), ("p1", 8), "{got:?}");
    assert!((got[0].2 - 8.0 * 0.8).abs() < 1e-9, "host weight: {got:?}");

    // A restarted index knows nothing until the agent reconnects and resyncs.
    drop(c);
    drop(idx);
    let idx = IndexProc::start_at(&addr, &pod);
    wait_for_holders(&idx.url, &reported, Duration::from_secs(30), on_host).await;
    // Later blocks arrive as changes on the new stream.
    let more = save(&common::ns("m"), 3);
    wait_for_holders(&idx.url, &more, Duration::from_secs(15), on_host).await;
}

/// Scores of pod p1 for `hashes` on every replica.
async fn p1_on_each(urls: &[&str], hashes: &[u64]) -> Vec<std::result::Result<(u32, f64), tonic::Status>> {
    let mut out = Vec::new();
    for url in urls {
        let mut c = IndexClient::connect(url.to_string()).await.expect("connect");
        let mut req = by_hashes(hashes);
        req.pods = vec!["p1".into()];
        out.push(c.score(req).await.map(|r| {
            let s = &r.into_inner().scores[0];
            (s.blocks, s.weighted)
        }));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_redis_answer_alike_and_survive_its_restart() {
    let port = common::ports::free_port();
    let Some(redis) = common::redis::RedisServer::start(port) else {
        return;
    };
    let url = redis.url();
    let args = [
        "--backend",
        "redis",
        "--redis-url",
        &url,
        "--pod",
        "p1=m@tcp://127.0.0.1:9,node=n1",
    ];
    let a = IndexProc::start(&args);
    let b = IndexProc::start(&args);
    let urls = [a.url.as_str(), b.url.as_str()];

    // The agent of n1 publishes to replica a; p1's own blocks arrive through replica b.
    let mut ca = a.client().await;
    ca.publish_events(tokio_stream::iter(vec![batch(
        "agent/n1",
        0,
        true,
        vec![stored(&[1, 2, 3, 4], proto::Medium::Host)],
    )]))
    .await
    .expect("PublishEvents to a");
    let mut cb = b.client().await;
    cb.publish_events(tokio_stream::iter(vec![
        batch("p1", 0, true, vec![stored(&[1, 2], proto::Medium::Device)]),
        batch("p1", 1, false, vec![removed(&[2], proto::Medium::Device)]),
    ]))
    .await
    .expect("PublishEvents to b");
    let want = 1.0 + 3.0 * 0.8;
    for got in p1_on_each(&urls, &[1, 2, 3, 4, 5]).await {
        let (blocks, weighted) = got.expect("Score");
        assert_eq!(blocks, 4);
        assert!(
            (weighted - want).abs() < 1e-9,
            "device, then three host blocks: {weighted}"
        );
    }
    let look = holders(&mut cb, &[1]).await;
    assert_eq!(
        look,
        vec![vec![
            ("agent/n1".to_owned(), vec![proto::Medium::Host as i32]),
            ("p1".to_owned(), vec![proto::Medium::Device as i32]),
        ]]
    );

    // A speculation made through one replica counts on the other.
    let mut spec = by_hashes(&[70, 71]);
    spec.pods = vec!["p1".into()];
    spec.speculate = true;
    cb.score(spec).await.expect("Score with speculate");
    assert_eq!(
        p1_on_each(&urls[..1], &[70, 71]).await[0]
            .as_ref()
            .expect("Score")
            .0,
        2
    );

    // A publisher's stream that stays open across what follows.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(batch(
        "agent/n2",
        0,
        true,
        vec![stored(&[9], proto::Medium::Host)],
    ))
    .await
    .expect("queued");
    let mut open = a.client().await;
    let stream = tokio::spawn(async move {
        open.publish_events(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });

    wait_for_holders(&b.url, &[9], Duration::from_secs(10), |h| !h.is_empty()).await;

    // Redis goes away: calls fail fast with an error that says so, on both replicas.
    drop(redis);
    let started = Instant::now();
    for got in p1_on_each(&urls, &[1]).await {
        let e = got.expect_err("no backend");
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().contains("redis"), "{}", e.message());
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let e = ca
        .publish_events(tokio_stream::iter(vec![batch("agent/n1", 0, true, vec![])]))
        .await
        .expect_err("no backend");
    assert_eq!(e.code(), Code::Unavailable);

    // It comes back empty: the replicas answer again (nothing is held), and a publisher that
    // resyncs is counted on both.
    let _redis = common::redis::RedisServer::start(port).expect("redis-server restarts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while p1_on_each(&urls, &[1]).await.iter().any(|r| r.is_err()) {
        assert!(
            Instant::now() < deadline,
            "the replicas never reconnected to Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for got in p1_on_each(&urls, &[1, 2, 3]).await {
        assert_eq!(got.expect("Score").0, 0, "a Redis restarted empty holds nothing");
    }
    // The replica notices the loss and ends the open stream, asking for a resync.
    let mut seq = 1;
    while !stream.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the open stream was never told to resync"
        );
        let _ = tx.send(batch("agent/n2", seq, false, vec![])).await;
        seq += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ended = stream
        .await
        .expect("the stream task")
        .expect_err("told to resync");
    assert_eq!(ended.code(), Code::FailedPrecondition, "{}", ended.message());
    assert!(ended.message().contains("resync"), "{}", ended.message());
    ca.publish_events(tokio_stream::iter(vec![batch(
        "agent/n1",
        0,
        true,
        vec![stored(&[1, 2, 3], proto::Medium::Disk)],
    )]))
    .await
    .expect("a resync after the restart");
    for got in p1_on_each(&urls, &[1, 2, 3]).await {
        let (blocks, weighted) = got.expect("Score");
        assert_eq!(blocks, 3);
        assert!((weighted - 3.0 * 0.5).abs() < 1e-9, "{weighted}");
    }
}

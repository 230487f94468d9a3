//! `kvagent index` over gRPC: what publishers report is what Score and Lookup answer; sequence
//! gaps, bad input and unreproducible hash settings get clear errors; a real `kvagent node`
//! reports its tiers and resyncs after the index restarts.

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvagent::index::proto::{self, index_client::IndexClient};
use kvstore::vllm::{BlockHasher, HashAlgo, RequestExtras, event_hash};
use tonic::Code;

/// A running `kvagent index`, killed when dropped.
struct IndexProc {
    child: Child,
    url: String,
}

impl IndexProc {
    fn start(extra: &[&str]) -> Self {
        Self::start_at("127.0.0.1:0", extra)
    }

    fn start_at(grpc_addr: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvagent"))
            .args([
                "index",
                "--grpc-addr",
                grpc_addr,
                "--http-addr",
                "",
                "--log-format",
                "json",
            ])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .expect("kvagent index starts");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the index logs its address")
                .expect("a log line");
            let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
            if v["message"] == "index serving" {
                break v["grpc"].as_str().expect("grpc address").to_owned();
            }
        };
        // Keep draining the log so the index never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self {
            child,
            url: format!("http://{addr}"),
        }
    }

    async fn client(&self) -> IndexClient<tonic::transport::Channel> {
        IndexClient::connect(self.url.clone()).await.expect("connect")
    }
}

impl Drop for IndexProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    assert!(names.contains(&"agent/n1") && names.contains(&"p1"), "{names:?}");
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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
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

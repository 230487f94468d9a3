//! Two real agents sharing one real S3 bucket (SeaweedFS on loopback): a prefix saved on one
//! node is found and read on another with no peer connection between them.

mod common;

use std::io::Write as _;

use common::weed::WeedServer;
use common::*;
use kvstore::TierLevel;
use kvstore::wire::{self, Request, Response};

fn object_toml(w: &WeedServer, dir: &std::path::Path, secret: &str) -> std::path::PathBuf {
    let path = dir.join("agent.toml");
    let text = format!(
        "[object]\nenabled = true\nurl = \"s3://{}/agents\"\nendpoint = \"{}\"\n\
         access_key_id = \"{}\"\nsecret_access_key = \"{secret}\"\nflush_interval_ms = 50\n\
         write_through_min_blocks = 1\nsync_interval_ms = 100\n",
        WeedServer::BUCKET,
        w.endpoint(),
        WeedServer::ACCESS_KEY,
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// Saves blocks `0..n` of writer `seed` through `agent`: their hashes and contents.
fn save(agent: &Agent, seed: u64, n: u64) -> (Vec<kvstore::BlockHash>, Vec<Vec<u8>>) {
    let hashes: Vec<_> = (0..n).map(|i| hash(seed, i)).collect();
    let data: Vec<Vec<u8>> = (0..n).map(|i| payload(seed, i)).collect();
    let items: Vec<_> = hashes
        .iter()
        .copied()
        .zip(data.iter().map(Vec::as_slice))
        .collect();
    agent.client().save(&ns("m"), &items).expect("save");
    (hashes, data)
}

/// A lookup in protocol `version` over a raw connection: the tier codes answered.
fn raw_lookup(socket: &std::path::Path, version: u16, hashes: Vec<kvstore::BlockHash>) -> Vec<TierLevel> {
    let s = raw_handshake_at(socket, version);
    let mut out = Vec::new();
    Request::Lookup(ns("m"), hashes).encode(2, 0, &mut out);
    (&s).write_all(&out).unwrap();
    let mut body = Vec::new();
    wire::read_frame(&mut &s, &mut body).unwrap();
    match Response::decode(&body).unwrap().1 {
        Response::Lookup(t) => t,
        other => panic!("expected a lookup answer, got {other:?}"),
    }
}

#[test]
fn a_prefix_saved_on_one_node_is_read_from_s3_on_another() {
    let Some(w) = WeedServer::start() else { return };
    let dir = socket_dir();
    let cfg = object_toml(&w, dir.path(), WeedServer::SECRET_KEY);
    let cfg = cfg.to_str().unwrap();
    let a = Agent::start(&dir.path().join("a.sock"), &["--config", cfg]);
    let (hashes, data) = save(&a, 7, 8);
    // Written through at commit, uploaded after the flush interval.
    a.wait_for("the write-through upload", |s| s["object"]["stores"] == 8);

    let b = Agent::start(&dir.path().join("b.sock"), &["--config", cfg]);
    let client = b.client();
    assert_eq!(
        client.lookup(&ns("m"), &hashes).unwrap(),
        vec![TierLevel::Object; 8]
    );
    // An engine built for protocol 3 sees the same blocks as disk blocks.
    assert_eq!(raw_lookup(&b.socket, 3, hashes.clone()), vec![TierLevel::Disk; 8]);
    let got = client.acquire(&ns("m"), &hashes).unwrap();
    let mut blocks = Vec::new();
    for (i, g) in got.into_iter().enumerate() {
        let g = g.unwrap_or_else(|| panic!("block {i} missing"));
        assert_eq!(g.tier(), TierLevel::Object);
        let mut buf = vec![0u8; g.len() as usize];
        client.read(&g, &mut buf).unwrap();
        assert!(buf == data[i], "block {i} differs");
        blocks.push(g);
    }
    client.release(&ns("m"), blocks).unwrap();
    let stats = b.stats();
    assert_eq!(stats["object"]["hits"], 8);
    assert_eq!(stats["host"]["promotions"], 8);
    assert_eq!(stats["object_detail"]["remote_blocks"], 8);
    // Promoted: now a host hit.
    assert_eq!(
        client.lookup(&ns("m"), &hashes).unwrap(),
        vec![TierLevel::Host; 8]
    );
    let (status, metrics) = b.http_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("kvtier_tier_hits_total{tier=\"object\"} 8"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kvtier_object_failures_total{reason=\"credentials\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("kvtier_object_degraded 0"), "{metrics}");
}

/// Wrong credentials do not stop the agent: it serves from host, says why the bucket is
/// unusable, and counts the refusals.
#[test]
fn an_agent_with_wrong_credentials_still_serves() {
    let Some(w) = WeedServer::start() else { return };
    let dir = socket_dir();
    let cfg = object_toml(&w, dir.path(), "not-the-secret");
    let a = Agent::start(&dir.path().join("a.sock"), &["--config", cfg.to_str().unwrap()]);
    let (hashes, _) = save(&a, 9, 4);
    a.wait_for("the refused upload", |s| s["object"]["not_stored"] == 4);
    let stats = a.stats();
    assert!(
        stats["object_detail"]["failures"]["credentials"]
            .as_u64()
            .unwrap()
            >= 1,
        "{stats}"
    );
    assert_eq!(stats["object"]["stores"], 0);
    assert_eq!(
        a.client().lookup(&ns("m"), &hashes).unwrap(),
        vec![TierLevel::Host; 4]
    );
}

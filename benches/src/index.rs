//! `kvbench index`: the cluster index in process — event ingest rate, and `score` latency of a
//! 512-block prompt over 100 pods with a million indexed blocks — and through the real
//! `kvagent index` over gRPC (the `Score` round trip, with the in-memory backend and with the
//! Redis backend on a `redis-server` of its own), next to Dynamo's KV-router radix tree on the
//! same workload in the same run, when its Python package is installed
//! (`benches/dynamo/setup.sh`).

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use kvagent::index::proto::{self, index_client::IndexClient};
use kvstore::index::{Candidate, Event, Index, IndexConfig, Medium, scope_of};
use serde::Serialize;

use crate::local::{Latency, agent_binary, percentiles, script_in_repo};

/// Options of `kvbench index`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct IndexArgs {
    /// A short run for smoke tests (1 000 blocks per pod, fewer calls).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// The `kvagent` binary [default: next to this one].
    #[arg(long)]
    pub(crate) agent: Option<PathBuf>,
    /// Python of a venv with `ai-dynamo-runtime` [default: target/venv-dynamo/bin/python when
    /// it exists; `benches/dynamo/setup.sh` makes it].
    #[arg(long)]
    pub(crate) dynamo_python: Option<PathBuf>,
    /// The Dynamo benchmark script, from the working directory.
    #[arg(long, default_value = "benches/dynamo/radix_bench.py")]
    pub(crate) dynamo_script: PathBuf,
    /// Skip the Dynamo comparison.
    #[arg(long)]
    pub(crate) no_dynamo: bool,
    /// Skip the Redis backend (it runs when `redis-server` is on the PATH).
    #[arg(long)]
    pub(crate) no_redis: bool,
}

const PODS: usize = 100;
const PROMPT_BLOCKS: usize = 512;
/// Leading prompt blocks held by pods 0, 1 and 2.
const HELD: [usize; 3] = [512, 300, 100];
const MODEL: &str = "kvbench";
/// Blocks per ingest event, as vLLM publishes a long prompt's blocks.
const EVENT_BLOCKS: usize = 1024;

struct Workload {
    own_blocks: usize,
    ingest_pairs: usize,
    score_iters: usize,
}

impl Workload {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                own_blocks: 1_000,
                ingest_pairs: 200,
                score_iters: 500,
            }
        } else {
            Self {
                own_blocks: 10_000,
                ingest_pairs: 2_000,
                score_iters: 5_000,
            }
        }
    }
}

fn prompt() -> Vec<u64> {
    (0..PROMPT_BLOCKS as u64).map(|i| 0xFFFF << 48 | i).collect()
}

/// Pod `p`'s own blocks: a chain nobody else holds.
fn own(p: usize, n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| (p as u64 + 1) << 32 | i).collect()
}

/// What pod `p` holds: its own blocks and, for the first three, a prefix of the prompt.
fn holdings(p: usize, own_blocks: usize, prompt: &[u64]) -> Vec<u64> {
    let mut blocks = own(p, own_blocks);
    if let Some(&n) = HELD.get(p) {
        blocks.extend_from_slice(&prompt[..n]);
    }
    blocks
}

fn check_scores(blocks: &[usize]) -> Result<()> {
    for (p, &b) in blocks.iter().enumerate() {
        let want = HELD.get(p).copied().unwrap_or(0);
        if b != want {
            bail!("pod {p} scored {b} blocks, expected {want}");
        }
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct InProcess {
    ingest_block_events_per_s: f64,
    score: Latency,
    indexed_blocks: usize,
}

fn in_process(w: &Workload) -> Result<InProcess> {
    let index = Index::new(IndexConfig::default());
    let scope = scope_of(MODEL);
    let prompt = prompt();
    let mut candidates = Vec::with_capacity(PODS);
    for p in 0..PODS {
        let source = index.sources().intern(&format!("pod-{p}"));
        for chunk in holdings(p, w.own_blocks, &prompt).chunks(EVENT_BLOCKS) {
            index.apply(
                source,
                &Event::Stored {
                    scope,
                    hashes: chunk.to_vec(),
                    medium: Medium::Device,
                },
            );
        }
        candidates.push(Candidate {
            pod: source,
            agent: None,
        });
    }
    let indexed_blocks = index.len();

    let ingester = index.sources().intern("ingest");
    let hashes: Vec<u64> = (0..EVENT_BLOCKS as u64).map(|i| 0xEEEE << 48 | i).collect();
    let stored = Event::Stored {
        scope,
        hashes: hashes.clone(),
        medium: Medium::Device,
    };
    let removed = Event::Removed {
        scope,
        hashes,
        medium: Medium::Device,
    };
    let started = Instant::now();
    for _ in 0..w.ingest_pairs {
        index.apply(ingester, &stored);
        index.apply(ingester, &removed);
    }
    let ingest = (2 * w.ingest_pairs * EVENT_BLOCKS) as f64 / started.elapsed().as_secs_f64();

    let scores = index.score(scope, &prompt, &candidates);
    check_scores(&scores.iter().map(|s| s.blocks).collect::<Vec<_>>())?;
    let mut samples = Vec::with_capacity(w.score_iters);
    for _ in 0..w.score_iters / 10 {
        std::hint::black_box(index.score(scope, &prompt, &candidates));
    }
    for _ in 0..w.score_iters {
        let t = Instant::now();
        std::hint::black_box(index.score(scope, std::hint::black_box(&prompt), &candidates));
        samples.push(t.elapsed());
    }
    Ok(InProcess {
        ingest_block_events_per_s: ingest,
        score: percentiles(samples),
        indexed_blocks,
    })
}

/// A running `kvagent index`, killed when dropped.
struct IndexProc {
    child: Child,
    url: String,
}

impl Drop for IndexProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_index(binary: &Path, extra: &[&str]) -> Result<IndexProc> {
    let mut child = Command::new(binary)
        .args([
            "index",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "",
            "--log-format",
            "json",
        ])
        .args(extra)
        .env_remove("KVTIER_INDEX_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stderr = child.stderr.take().context("the index's stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let Some(line) = lines.next().transpose()? else {
            bail!("kvagent index exited before serving: {:?}", child.wait()?);
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["message"] == "index serving" {
            break v["grpc"].as_str().context("the grpc field")?.to_owned();
        }
    };
    // Drain the log so the index never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok(IndexProc {
        child,
        url: format!("http://{addr}"),
    })
}

#[derive(Debug, Serialize)]
struct OverGrpc {
    score: Latency,
    publish_block_events_per_s: f64,
}

async fn over_grpc(url: &str, w: &Workload) -> Result<OverGrpc> {
    let mut client = IndexClient::connect(url.to_owned()).await.context("connecting")?;
    let prompt = prompt();
    let mut batches = Vec::new();
    for p in 0..PODS {
        for (seq, chunk) in holdings(p, w.own_blocks, &prompt)
            .chunks(EVENT_BLOCKS)
            .enumerate()
        {
            batches.push(proto::EventBatch {
                source: format!("pod-{p}"),
                model: MODEL.into(),
                epoch: 1,
                seq: seq as u64,
                resync: seq == 0,
                events: vec![proto::Event {
                    kind: Some(proto::event::Kind::Stored(proto::Stored {
                        hashes: chunk.to_vec(),
                        medium: proto::Medium::Device as i32,
                    })),
                }],
                peer_address: String::new(),
            });
        }
    }
    let events: usize = batches
        .iter()
        .flat_map(|b| &b.events)
        .map(|e| match &e.kind {
            Some(proto::event::Kind::Stored(s)) => s.hashes.len(),
            _ => 0,
        })
        .sum();
    let started = Instant::now();
    client
        .publish_events(tokio_stream::iter(batches))
        .await
        .context("PublishEvents")?;
    let publish = events as f64 / started.elapsed().as_secs_f64();

    let request = proto::ScoreRequest {
        model: MODEL.into(),
        prompt: Some(proto::score_request::Prompt::Hashes(proto::BlockHashes {
            hashes: prompt,
        })),
        pods: (0..PODS).map(|p| format!("pod-{p}")).collect(),
        ..Default::default()
    };
    let answer = client.score(request.clone()).await.context("Score")?.into_inner();
    let mut blocks = vec![0; PODS];
    for s in &answer.scores {
        let p: usize = s.pod.trim_start_matches("pod-").parse().context("a pod name")?;
        blocks[p] = s.blocks as usize;
    }
    check_scores(&blocks)?;
    let iters = w.score_iters.min(2_000);
    for _ in 0..iters / 10 {
        client.score(request.clone()).await?;
    }
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let req = request.clone();
        let t = Instant::now();
        client.score(req).await?;
        samples.push(t.elapsed());
    }
    Ok(OverGrpc {
        score: percentiles(samples),
        publish_block_events_per_s: publish,
    })
}

/// A `redis-server` of the bench's own (loopback, no persistence), killed when dropped.
struct RedisProc {
    child: Child,
    port: u16,
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis() -> Result<Option<RedisProc>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = match Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Redis backend skipped: redis-server cannot run ({e})");
            return Ok(None);
        }
    };
    let server = RedisProc { child, port };
    let until = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > until {
            bail!("redis-server did not start within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some(server))
}

fn dynamo(args: &IndexArgs) -> Result<Option<serde_json::Value>> {
    if args.no_dynamo {
        return Ok(None);
    }
    let python = match &args.dynamo_python {
        Some(p) => p.clone(),
        None => {
            let p = PathBuf::from("target/venv-dynamo/bin/python");
            if !p.is_file() {
                eprintln!(
                    "Dynamo comparison skipped: {} not found (run benches/dynamo/setup.sh)",
                    p.display()
                );
                return Ok(None);
            }
            p
        }
    };
    let script = &args.dynamo_script;
    script_in_repo(script, "--dynamo-script")?;
    let mut cmd = Command::new(&python);
    cmd.arg(script).stderr(Stdio::inherit());
    if args.quick {
        cmd.arg("--quick");
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    if !out.status.success() {
        bail!("the Dynamo bench failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().context("the Dynamo bench printed nothing")?;
    Ok(Some(
        serde_json::from_str(line).context("the Dynamo bench's JSON line")?,
    ))
}

#[derive(Debug, Serialize)]
struct IndexReport {
    command: String,
    quick: bool,
    pods: usize,
    prompt_blocks: usize,
    in_process: InProcess,
    grpc: OverGrpc,
    grpc_redis: Option<OverGrpc>,
    dynamo: Option<serde_json::Value>,
}

pub(crate) fn run(args: &IndexArgs) -> Result<()> {
    let w = Workload::new(args.quick);
    let local = in_process(&w)?;
    let binary = agent_binary(args.agent.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a runtime")?;
    let measure = |extra: &[&str]| -> Result<OverGrpc> {
        let index = start_index(&binary, extra)?;
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(600), over_grpc(&index.url, &w))
                .await
                .context("the gRPC part timed out")?
        })
    };
    let grpc = measure(&[])?;
    let redis = if args.no_redis { None } else { start_redis()? };
    let grpc_redis = match &redis {
        Some(r) => {
            let url = format!("redis://127.0.0.1:{}/0", r.port);
            Some(measure(&["--backend", "redis", "--redis-url", &url])?)
        }
        None => None,
    };
    drop(redis);
    let dynamo = dynamo(args)?;

    let num = |v: &serde_json::Value, k: &str| v[k].as_f64().map_or("—".into(), |x| format!("{x:.1}"));
    let (d_ingest, d_p50, d_p99, d_floor) = match &dynamo {
        Some(d) => (
            d["ingest_block_events_per_s"]
                .as_f64()
                .map_or("—".into(), |x| format!("{:.1} M/s", x / 1e6)),
            num(d, "score_p50_us"),
            num(d, "score_p99_us"),
            num(d, "empty_tree_find_matches_p50_us"),
        ),
        None => (
            "not run".into(),
            "not run".into(),
            "not run".into(),
            "not run".into(),
        ),
    };
    println!(
        "{PODS} pods, {} indexed blocks, a {PROMPT_BLOCKS}-block prompt held 512/300/100 deep by three pods",
        local.indexed_blocks
    );
    println!();
    println!("| measure | kvtier | Dynamo radix tree (from Python) |");
    println!("| --- | --- | --- |");
    println!(
        "| ingest, block events/s, one core | {:.1} M/s | {d_ingest} |",
        local.ingest_block_events_per_s / 1e6
    );
    println!(
        "| score p50 / p99, µs, in process | {:.1} / {:.1} | {d_p50} / {d_p99} (a call on an empty tree: {d_floor}) |",
        local.score.p50_us, local.score.p99_us
    );
    println!(
        "| Score p50 / p99, µs, gRPC round trip (loopback) | {:.1} / {:.1} | — |",
        grpc.score.p50_us, grpc.score.p99_us
    );
    println!(
        "| PublishEvents ingest over gRPC, block events/s | {:.1} M/s | — |",
        grpc.publish_block_events_per_s / 1e6
    );
    if let Some(r) = &grpc_redis {
        println!(
            "| Score p50 / p99, µs, gRPC, Redis backend (redis-server on loopback) | {:.1} / {:.1} | — |",
            r.score.p50_us, r.score.p99_us
        );
        println!(
            "| PublishEvents ingest over gRPC into Redis, block events/s | {:.2} M/s | — |",
            r.publish_block_events_per_s / 1e6
        );
    }
    if let Some(path) = &args.json {
        let r = IndexReport {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            quick: args.quick,
            pods: PODS,
            prompt_blocks: PROMPT_BLOCKS,
            in_process: local,
            grpc,
            grpc_redis,
            dynamo,
        };
        std::fs::write(path, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

//! `kvbench transfer`: blocks pulled from another process's arena over loopback by kvtier's
//! transports, next to Mooncake Transfer Engine (TCP) and NIXL (UCX over TCP and shared memory)
//! moving the same blocks in the same run (`benches/peers/`).
//!
//! kvtier's data planes (`--transports`): its TCP backend, and (built with the `ucx` feature)
//! its UCX backend twice, like NIXL's rows: over UCX's TCP transport on loopback (`UCX_TLS=tcp`,
//! where kvtier asks the source to write) and over shared memory (`UCX_TLS=sm`, where it reads
//! with CMA). Every configuration pulls the same granted blocks.
//!
//! kvtier's side runs two processes like the peers: this one pulls, and a child (`kvbench
//! transfer --serve`) is the source, holding the blocks in its arena and answering grant
//! requests on a pipe. A timed batch is what a decode agent does after the control call:
//! reserve a slot per block, have the transport copy the blocks into them, and verify every
//! block's checksum (`--ucx-unverified` adds UCX pullers that skip it, as the peers do, and
//! checks their blocks after each timed pull instead). The grant (pinning and checksumming on
//! the source, one control round trip) is made once per configuration, outside the timed
//! loop, as the peers prepare their descriptors once; its cost is printed separately, with
//! that of a second grant of the same blocks (their checksums known by then).

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use kvstore::transport::tcp::{TcpConfig, TcpTransport};
#[cfg(feature = "ucx")]
use kvstore::transport::ucx::{
    CHECKED_SENDS_INLINE_TIMES, SEND_BLOCKS_FROM, UcxConfig, UcxMode, UcxTransport,
};
use kvstore::transport::{Grant, GrantId, Grants, PullItem, PullQueue, Pulled, Secret, Transport};
use kvstore::{BlockHash, BlockKey, HostTierConfig, Namespace, StoreConfig, TieredStore};
use serde::{Deserialize, Serialize};

/// Options of `kvbench transfer`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct TransferArgs {
    /// Fewer and shorter timed loops (same matrix unless narrowed).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Block sizes in KiB.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024,4096")]
    pub(crate) block_kib: Vec<u64>,
    /// Blocks per batch.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    pub(crate) batches: Vec<usize>,
    /// Parallel TCP streams per pull (default: the agent's, one per four cores, 1–4).
    #[arg(long, default_value_t = kvstore::transport::tcp::default_streams())]
    pub(crate) streams: usize,
    /// kvtier's data planes to measure.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_TRANSPORTS)]
    pub(crate) transports: Vec<Plane>,
    /// kvtier's UCX fabrics to measure (`tcp`: `UCX_TLS=tcp`, `shm`: `UCX_TLS=sm`).
    #[arg(long, value_delimiter = ',', default_value = "tcp,shm")]
    pub(crate) ucx_fabrics: Vec<String>,
    /// How kvtier's UCX pulls move the bytes (auto: writes on request over TCP, gets over
    /// shared memory).
    #[arg(long, value_enum, default_value_t = UcxModeArg::Auto)]
    pub(crate) ucx_mode: UcxModeArg,
    /// Largest UCX pull, in KiB, that the pulling thread drives itself rather than the
    /// progress thread (0: none; default: the transport's; four times as much for checked
    /// pulls of several blocks of 256 KiB or more on average, sent over UCX-TCP). Several
    /// values measure one UCX
    /// puller each, in the same run; the second and later ones are labelled with the value
    /// (`shm inline 0`).
    #[arg(long, value_delimiter = ',')]
    pub(crate) ucx_inline_kib: Vec<u64>,
    /// UCX workers that a get-mode pull of 2 MiB or more is split across
    /// (default: the transport's). Several values measure one UCX puller each, in the same
    /// run, labelled as for `--ucx-inline-kib` (`shm lanes 1`); the other modes run one
    /// worker, and are measured for the first value only.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..=16))]
    pub(crate) ucx_lanes: Vec<u16>,
    /// Also measure, in the same run, each UCX puller with its checks of pulled blocks off
    /// (`peer.ucx.verify = false`), labelled `unverified`: the work Mooncake and NIXL do,
    /// which check nothing (kvbench checks every block such a puller pulled, untimed).
    #[arg(long)]
    pub(crate) ucx_unverified: bool,
    /// Pulls in flight at once on one kvtier transport, as an agent pulls for several decode
    /// requests at a time (default 1). Several values measure each kvtier puller once per
    /// value, on the same transport, in the same run, labelled `N at once` where N > 1 (and
    /// with their `--pulls-per-source`). Each timed iteration starts N pulls of the
    /// configuration's blocks, each in its own task, and ends when the last is over. Each pull
    /// takes its turn at the source, then reserves its own slots, then pulls. GB/s and
    /// per-block time count the blocks of all N, and each pull's own time, from when it is
    /// asked for (its task not yet started) to its end, goes to `pull_p50_us` (the median
    /// over every pull). A lone pull runs on the bench's task, as in an agent; pulls at once
    /// also pay the wake-up that joins each task. The puller's arena holds N of the matrix's
    /// largest pull: narrow the matrix for a large N.
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = clap::value_parser!(u16).range(1..=16))]
    pub(crate) pulls_at_once: Vec<u16>,
    /// Pulls from the source a kvtier puller lets run at once, the others waiting their turn
    /// in the order they came, as an agent's pulls do (`peer.pulls_per_source`; 0: no limit;
    /// default: the agent's, one per four cores, 1–4). Several values measure each puller
    /// with pulls at once once per value, in the same run. Pulls at once are labelled with
    /// their limit (`4 at once 1 per source`, `4 at once unqueued` for 0).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u16).range(0..=16))]
    pub(crate) pulls_per_source: Option<Vec<u16>>,
    /// Times to go over the whole matrix (every system, interleaved per configuration); each
    /// figure reported is the median over the rounds. This machine's speed drifts over
    /// minutes, and several rounds minutes apart keep one slow spell from deciding a row.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub(crate) rounds: u32,
    /// Skip Mooncake and NIXL (they run when their venvs exist: `benches/peers/setup-*.sh`).
    #[arg(long)]
    pub(crate) no_peers: bool,
    /// Lay kvtier's blocks back to back, in the order pulled, in both arenas, instead of in a
    /// random order on each side. The peers' benchmarks place their blocks at random slots, so
    /// that no system merges a batch into larger copies; this shows what kvtier's merging of
    /// back-to-back blocks saves, and skips the peers.
    #[arg(long)]
    pub(crate) back_to_back: bool,
    /// Run as the source process (internal).
    #[arg(long, hide = true)]
    pub(crate) serve: bool,
    /// Arena bytes of each process (internal, for `--serve`).
    #[arg(long, hide = true, default_value_t = 0)]
    pub(crate) arena: u64,
}

/// A data plane of kvtier's.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plane {
    /// The TCP backend.
    Tcp,
    /// The UCX backend, over UCX's TCP transport and over shared memory.
    Ucx,
}

/// `--ucx-mode`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UcxModeArg {
    /// From UCX_TLS.
    Auto,
    /// One-sided reads.
    Get,
    /// The source writes on request.
    Put,
    /// The source sends rendezvous messages on request, which the puller fetches.
    Send,
}

#[cfg(feature = "ucx")]
const DEFAULT_TRANSPORTS: &str = "tcp,ucx";
#[cfg(not(feature = "ucx"))]
const DEFAULT_TRANSPORTS: &str = "tcp";

/// One of UCX's transports that the UCX rows run over.
#[cfg(feature = "ucx")]
struct Fabric {
    /// The rows' transport column (NIXL's labels).
    label: &'static str,
    tls: &'static str,
    /// Further UCX settings.
    settings: &'static [(&'static str, &'static str)],
}

#[cfg(feature = "ucx")]
const UCX_FABRICS: [Fabric; 2] = [
    Fabric {
        label: "tcp",
        tls: "tcp",
        settings: &[("NET_DEVICES", "lo")],
    },
    Fabric {
        label: "shm",
        tls: "sm",
        settings: &[],
    },
];

#[cfg(feature = "ucx")]
impl Fabric {
    fn config(&self, mode: UcxMode) -> UcxConfig {
        let mut cfg = UcxConfig {
            mode,
            tls: Some(self.tls.into()),
            ..UcxConfig::default()
        };
        cfg.settings.extend(
            self.settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        cfg
    }
}

/// One of kvtier's transports on the pulling side, before the pullers measured on it.
struct TransportUnderTest {
    system: &'static str,
    label: String,
    endpoint: Vec<u8>,
    transport: Arc<dyn Transport>,
}

impl TransportUnderTest {
    /// One puller per `--pulls-at-once` value (each once) and, for pulls at once, per
    /// `--pulls-per-source` value, all on this transport, labelled with both (`tcp 4 at once
    /// 1 per source`, `... unqueued` for no limit). A lone pull goes through a queue of the
    /// first `--pulls-per-source` value, in which it never waits.
    fn pullers(self, at_once: &[u16], per_source: &[u16]) -> Vec<Puller> {
        let tested = Arc::new(self);
        let per_source = dedup(per_source);
        let mut made = Vec::new();
        for n in dedup(at_once) {
            let queues = if n > 1 {
                &per_source[..]
            } else {
                &per_source[..1.min(per_source.len())]
            };
            for &k in queues {
                let label = match (n, k) {
                    (1, _) => tested.label.clone(),
                    (n, 0) => format!("{} {n} at once unqueued", tested.label),
                    (n, k) => format!("{} {n} at once {k} per source", tested.label),
                };
                made.push(Puller {
                    tested: Arc::clone(&tested),
                    label,
                    at_once: usize::from(n),
                    queue: Arc::new(PullQueue::new(usize::from(k))),
                });
            }
        }
        made
    }
}

/// `values` without repeats, in their order.
fn dedup(values: &[u16]) -> Vec<u16> {
    let mut seen = Vec::new();
    for &v in values {
        if !seen.contains(&v) {
            seen.push(v);
        }
    }
    seen
}

/// One of kvtier's data planes on the pulling side, as measured: its transport, how many
/// pulls it has in flight at once, and the queue they go through, as an agent's pulls do.
struct Puller {
    /// Shared by the pullers made on it.
    tested: Arc<TransportUnderTest>,
    /// The transport's label, with the pulls at once and their limit.
    label: String,
    /// Pulls in flight at once (`--pulls-at-once`).
    at_once: usize,
    /// Pulls from the source let run at once, the others waiting their turn
    /// (`--pulls-per-source`).
    queue: Arc<PullQueue>,
}

const SECRET: &[u8] = b"kvbench-transfer";

fn namespace() -> Namespace {
    Namespace::builder("kvbench-transfer").build()
}

fn key(tag: u64, i: u64) -> BlockKey {
    BlockKey::new(namespace(), BlockHash::from_u64(tag << 32 | i))
}

/// The puller's key for block `i` of pull `pull` among those in flight at once: each pull
/// fills its own slots, and a key has one slot at a time.
fn pull_key(tag: u64, pull: usize, i: u64) -> BlockKey {
    // `--pulls-at-once` is at most 16 and a batch under 2^24 blocks (`run` checks): both fit
    // the 32 bits below the tag.
    key(tag, (pull as u64) << 24 | i)
}

/// A request on the control pipe.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Ask {
    /// Store `batch` blocks of `block` bytes under `tag` (dropping the previous tag's), in a
    /// random order unless `back_to_back`.
    Fill {
        tag: u64,
        block: u64,
        batch: u64,
        back_to_back: bool,
    },
    /// Grant the tag's blocks.
    Grant { tag: u64, batch: u64 },
    /// Release a grant.
    Release { id: Vec<u8> },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct GrantAnswer {
    id: Vec<u8>,
    blocks: Vec<(u64, u64, u64)>,
    /// The first grant of the blocks, which reads each to checksum it.
    grant_us: f64,
    /// A second grant of the same blocks right after, which finds their checksums known.
    regrant_us: f64,
}

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub(crate) system: String,
    pub(crate) transport: String,
    pub(crate) op: String,
    pub(crate) block_bytes: u64,
    pub(crate) batch: usize,
    pub(crate) iters: usize,
    pub(crate) gbps: Option<f64>,
    pub(crate) per_block_us: Option<f64>,
    pub(crate) grant_us: Option<f64>,
    pub(crate) regrant_us: Option<f64>,
    pub(crate) verified: bool,
    /// Pulls in flight at once (`--pulls-at-once`; 1 for the peers).
    pub(crate) pulls_at_once: usize,
    /// Pulls from the source let run at once (`--pulls-per-source`, 0: no limit; kvtier's
    /// pulls at once only).
    pub(crate) pulls_per_source: Option<usize>,
    /// The median time of one pull among those in flight at once (kvtier's pulls only).
    pub(crate) pull_p50_us: Option<f64>,
}

impl Row {
    /// Where the row goes in the table: system, transport, op (its column), block bytes and
    /// batch (its row).
    fn cell(&self) -> (&str, &str, &str, u64, usize) {
        (
            &self.system,
            &self.transport,
            &self.op,
            self.block_bytes,
            self.batch,
        )
    }
}

/// Room for the largest pull of the matrix, `at_once` times over (the puller's arena, where
/// several pulls are in flight at once; the source holds one batch at a time).
fn arena_bytes(args: &TransferArgs, at_once: u16) -> u64 {
    let largest = args
        .block_kib
        .iter()
        .flat_map(|b| args.batches.iter().map(move |n| b * 1024 * *n as u64))
        .max()
        .unwrap_or(0)
        * u64::from(at_once);
    // Slabs of one size class each: room for the batch plus a slab of every other class.
    largest + largest / 4 + (64 << 20)
}

pub(crate) fn run(args: &TransferArgs) -> Result<()> {
    if args.serve {
        return serve(args.arena, &args.transports);
    }
    if cfg!(not(feature = "ucx")) && args.transports.contains(&Plane::Ucx) {
        bail!("--transports ucx: this kvbench was built without the `ucx` feature");
    }
    if let Some(b) = args.batches.iter().find(|&&b| b >= 1 << 24) {
        bail!("--batches {b}: at most {} blocks a batch", (1 << 24) - 1);
    }
    #[cfg(feature = "ucx")]
    if let Some(l) = args
        .ucx_fabrics
        .iter()
        .find(|l| !UCX_FABRICS.iter().any(|f| f.label == l.as_str()))
    {
        let known = UCX_FABRICS.map(|f| f.label).join(", ");
        bail!("--ucx-fabrics {l}: not one of {known}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let at_once = args.pulls_at_once.iter().copied().max().unwrap_or(1);
    let arena = arena_bytes(args, at_once);
    let mut source = Source::spawn(arena_bytes(args, 1), &args.transports)?;
    let store = Arc::new(open_store(arena)?);
    // The peers' pools are numpy arrays, which get transparent huge pages; kvtier's arena gets
    // huge pages where the node reserves them (`vm.nr_hugepages`), as an agent's does.
    let huge_pages = store.host().arena().huge_pages();
    eprintln!(
        "kvtier arenas: {} MiB each, {} pages",
        arena >> 20,
        if huge_pages {
            "2 MiB (reserved huge)"
        } else {
            "4 KiB"
        }
    );
    let per_source = args
        .pulls_per_source
        .clone()
        .unwrap_or_else(|| vec![u16::try_from(kvstore::transport::queue::default_per_source()).unwrap_or(1)]);
    let mut planes: Vec<Arc<Puller>> = Vec::new();
    if args.transports.contains(&Plane::Tcp) {
        let tcp = TcpTransport::new(
            Arc::clone(&store),
            None,
            Secret::new(SECRET),
            TcpConfig {
                streams: args.streams,
                ..TcpConfig::default()
            },
        );
        let tested = TransportUnderTest {
            system: "kvtier",
            label: "tcp".into(),
            endpoint: source.endpoint.clone().into_bytes(),
            transport: Arc::new(tcp),
        };
        planes.extend(
            tested
                .pullers(&args.pulls_at_once, &per_source)
                .into_iter()
                .map(Arc::new),
        );
    }
    #[cfg(feature = "ucx")]
    if args.transports.contains(&Plane::Ucx) {
        let mode = match args.ucx_mode {
            UcxModeArg::Auto => UcxMode::Auto,
            UcxModeArg::Get => UcxMode::Get,
            UcxModeArg::Put => UcxMode::PutOnRequest,
            UcxModeArg::Send => UcxMode::SendOnRequest,
        };
        let inline = if args.ucx_inline_kib.is_empty() {
            vec![UcxConfig::default().inline_bytes / 1024]
        } else {
            args.ucx_inline_kib.clone()
        };
        let lanes: Vec<usize> = if args.ucx_lanes.is_empty() {
            vec![UcxConfig::default().lanes]
        } else {
            args.ucx_lanes.iter().map(|&n| usize::from(n)).collect()
        };
        for fabric in UCX_FABRICS
            .iter()
            .filter(|f| args.ucx_fabrics.iter().any(|l| l == f.label))
        {
            let label = fabric.label;
            let Some(endpoint) = source.ucx.get(label) else {
                eprintln!("kvtier ucx {label}: skipped (the source has no UCX endpoint for it)");
                continue;
            };
            let checks: &[bool] = if args.ucx_unverified {
                &[true, false]
            } else {
                &[true]
            };
            let variants = inline.iter().enumerate().flat_map(|(i, &inline_kib)| {
                lanes.iter().enumerate().flat_map(move |(l, &lanes)| {
                    checks
                        .iter()
                        .map(move |&verify| (i, inline_kib, l, lanes, verify))
                })
            });
            for (i, inline_kib, l, lanes, verify) in variants {
                let mut label = label.to_owned();
                if i > 0 {
                    label.push_str(&format!(" inline {inline_kib}"));
                }
                if l > 0 {
                    if mode.resolve(Some(fabric.tls)) != UcxMode::Get {
                        // Only gets are split across lanes: this puller would repeat the first.
                        eprintln!("kvtier ucx {label} lanes {lanes}: skipped (only gets use lanes)");
                        continue;
                    }
                    label.push_str(&format!(" lanes {lanes}"));
                }
                if !verify {
                    label.push_str(" unverified");
                }
                let cfg = UcxConfig {
                    inline_bytes: inline_kib.saturating_mul(1024),
                    lanes,
                    verify,
                    ..fabric.config(mode)
                };
                match UcxTransport::new(Arc::clone(&store), None, cfg) {
                    Ok(t) => {
                        let sends = if fabric.tls == "tcp" && verify && t.inline_bytes() > 0 {
                            format!(
                                " ({} KiB for sends of blocks of {} KiB or more)",
                                t.inline_bytes().saturating_mul(CHECKED_SENDS_INLINE_TIMES) / 1024,
                                SEND_BLOCKS_FROM / 1024
                            )
                        } else {
                            String::new()
                        };
                        eprintln!(
                            "kvtier ucx {label}: UCX_TLS={}, {:?}, {} lanes, pulls up to {} KiB driven by the pulling thread{sends}",
                            fabric.tls,
                            t.mode(),
                            t.lanes(),
                            t.inline_bytes() / 1024,
                        );
                        let tested = TransportUnderTest {
                            system: "kvtier-ucx",
                            label,
                            endpoint: endpoint.clone(),
                            transport: Arc::new(t),
                        };
                        planes.extend(
                            tested
                                .pullers(&args.pulls_at_once, &per_source)
                                .into_iter()
                                .map(Arc::new),
                        );
                    }
                    Err(e) => eprintln!("kvtier ucx {label}: skipped ({e})"),
                }
            }
        }
    }
    let mut rows = Vec::new();
    let mut peers = Peers::default();
    let mut tag = 0;
    for round in 1..=args.rounds {
        if args.rounds > 1 {
            eprintln!("round {round} of {}", args.rounds);
        }
        for &kib in &args.block_kib {
            for &batch in &args.batches {
                tag += 1;
                let block = kib * 1024;
                source.ask::<serde_json::Value>(&Ask::Fill {
                    tag,
                    block,
                    batch: batch as u64,
                    back_to_back: args.back_to_back,
                })?;
                let grant: GrantAnswer = source.ask(&Ask::Grant {
                    tag,
                    batch: batch as u64,
                })?;
                eprintln!(
                    "kvtier grant {kib:>5} KiB x {batch:>3}: {:>8.1} us, {:>8.1} us granted again",
                    grant.grant_us, grant.regrant_us
                );
                for puller in &planes {
                    let (system, label) = (puller.tested.system, &puller.label);
                    let mut row = runtime
                        .block_on(measure(
                            &store,
                            puller,
                            &grant,
                            tag,
                            block,
                            batch,
                            args.quick,
                            args.back_to_back,
                        ))
                        .with_context(|| format!("{system} {label} pull {kib} KiB x {batch}"))?;
                    row.system = system.into();
                    row.transport = label.clone();
                    eprintln!(
                        "{system} {label} pull {:>5} KiB x {:>3}: {:>6.2} GB/s, {:>8.1} us/block, {:>9.1} us/pull",
                        kib,
                        batch,
                        row.gbps.unwrap_or(0.0),
                        row.per_block_us.unwrap_or(0.0),
                        row.pull_p50_us.unwrap_or(0.0),
                    );
                    rows.push(row);
                }
                source.ask::<serde_json::Value>(&Ask::Release { id: grant.id.clone() })?;
                if !args.no_peers && !args.back_to_back {
                    // The peers measure each configuration right after kvtier: this machine's speed
                    // drifts over minutes, and a whole matrix per system would compare different
                    // minutes.
                    let cell = TransferArgs {
                        block_kib: vec![kib],
                        batches: vec![batch],
                        ..args.clone()
                    };
                    rows.extend(peers.run(&cell));
                }
            }
        }
    }
    // The pulling transports go before the source they pull from.
    drop(planes);
    drop(source);
    let peers = peers.records;
    let all_verified = rows.iter().all(|r| r.verified);
    let rounds = rows;
    let rows = median_over_rounds(&rounds);
    print_table(&rows, args);
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "bench": "transfer",
            "quick": args.quick,
            "streams": args.streams,
            "transports": args.transports.iter().map(|p| format!("{p:?}").to_lowercase()).collect::<Vec<_>>(),
            "ucx_mode": format!("{:?}", args.ucx_mode).to_lowercase(),
            "ucx_inline_kib": &args.ucx_inline_kib,
            "ucx_unverified": args.ucx_unverified,
            "ucx_lanes": &args.ucx_lanes,
            "pulls_at_once": &args.pulls_at_once,
            "pulls_per_source": args.pulls_at_once.iter().any(|&n| n > 1).then_some(&per_source),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "rounds": args.rounds,
            "huge_pages": huge_pages,
            "back_to_back": args.back_to_back,
            "rows": rows,
            "round_rows": if args.rounds > 1 { serde_json::to_value(&rounds)? } else { serde_json::Value::Null },
            "peers": peers,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
        eprintln!("wrote {}", path.display());
    }
    if !all_verified {
        let mut failed: Vec<String> = Vec::new();
        for r in rounds.iter().filter(|r| !r.verified) {
            let named = format!(
                "{} {} {} KiB x {}",
                r.system,
                r.transport,
                r.block_bytes / 1024,
                r.batch
            );
            // Once, however many rounds it failed in.
            if !failed.contains(&named) {
                failed.push(named);
            }
        }
        bail!(
            "a configuration moved wrong bytes or failed (above, as it happened): {}",
            failed.join(", ")
        );
    }
    Ok(())
}

#[expect(clippy::too_many_arguments, reason = "one configuration's parameters")]
async fn measure(
    store: &Arc<TieredStore>,
    puller: &Arc<Puller>,
    grant: &GrantAnswer,
    tag: u64,
    block: u64,
    batch: usize,
    quick: bool,
    back_to_back: bool,
) -> Result<Row> {
    let id = GrantId::from_slice(&grant.id).context("grant id")?;
    if grant.blocks.len() != batch {
        bail!("the source granted {} of {batch} blocks", grant.blocks.len());
    }
    let (warmup, min_iters, min_time, max_time) = if quick {
        (1, 3, Duration::from_millis(200), Duration::from_secs(2))
    } else {
        (2, 5, Duration::from_secs(1), Duration::from_secs(5))
    };
    // Slots reserved in a random order (the source's is another one) lie in that order.
    let order = layout(batch, !tag, back_to_back);
    let wanted: Vec<Vec<(BlockKey, u64)>> = (0..puller.at_once)
        .map(|k| {
            order
                .iter()
                .map(|&j| (pull_key(tag, k, j as u64), block))
                .collect()
        })
        .collect();
    // What the tasks of pulls at once share.
    let (shared_order, shared_grant) = (Arc::new(order.clone()), Arc::new(grant.clone()));
    let mut times = Vec::new();
    let mut pull_times = Vec::new();
    let started = Instant::now();
    // What went wrong first, said at once: a failed configuration ends the run only after the
    // whole matrix.
    let mut failure = None;
    let mut i = 0;
    loop {
        let t0 = Instant::now();
        let mut outcomes = Vec::with_capacity(puller.at_once);
        if let [wanted] = wanted.as_slice() {
            // A lone pull runs on this task, as a lone pull does in an agent: no hand-off to
            // another task (a wake-up) inside the timed loop.
            let pulled = pull_in_turn(puller, store, wanted, &order, grant, id).await?;
            outcomes.push((pulled, t0.elapsed()));
        } else {
            let mut tasks = tokio::task::JoinSet::new();
            for wanted in &wanted {
                // Each pull's own time runs from when it is asked for, as the N requests come
                // together, to its end: its task's start, its turn and its slots included.
                let started = Instant::now();
                let (puller, store, wanted) = (Arc::clone(puller), Arc::clone(store), wanted.clone());
                let (order, grant) = (Arc::clone(&shared_order), Arc::clone(&shared_grant));
                tasks.spawn(async move {
                    let pulled = pull_in_turn(&puller, &store, &wanted, &order, &grant, id).await;
                    pulled.map(|p| (p, started.elapsed()))
                });
            }
            // A pull's task that panicked ends the run; dropping the set aborts the others,
            // whose slots are then freed with the store as the process exits.
            while let Some(done) = tasks.join_next().await {
                outcomes.push(done.context("a pull's task")??);
            }
        }
        let took = t0.elapsed();
        let mut slots = Vec::with_capacity(batch * outcomes.len());
        let mut each = Vec::with_capacity(outcomes.len());
        for (pulled, pull_took) in outcomes {
            each.push(pull_took);
            for p in pulled {
                // The transport verified each block's checksum as it arrived, where it verifies.
                if let Err(e) = &p.result {
                    failure.get_or_insert_with(|| format!("block {}: {e}", p.index));
                }
                slots.push((p.index, p.slot));
            }
        }
        for (index, mut slot) in slots {
            if !puller.tested.transport.verifies() {
                // Checked here, untimed, so that a puller that skips its checks is still
                // measured moving the right bytes.
                let sum = kvstore::block::checksum(store.host().reserved_mut(&mut slot));
                if grant.blocks.get(index as usize).is_none_or(|b| b.2 != sum) {
                    failure.get_or_insert_with(|| {
                        format!("block {index}: wrong bytes (checked after the pull)")
                    });
                }
            }
            store.abort(slot);
        }
        if failure.is_some() {
            break;
        }
        i += 1;
        if i > warmup {
            times.push(took);
            pull_times.extend(each);
        }
        let elapsed = started.elapsed();
        if (times.len() >= min_iters && elapsed >= min_time) || elapsed >= max_time {
            break;
        }
    }
    if let Some(failure) = &failure {
        eprintln!(
            "{} {} pull {:>5} KiB x {batch:>3}: FAILED, {failure}",
            puller.tested.system,
            puller.label,
            block / 1024
        );
    }
    times.sort_unstable();
    pull_times.sort_unstable();
    let p50 = times.get(times.len() / 2).copied();
    let bytes = block * batch as u64 * puller.at_once as u64;
    Ok(Row {
        system: "kvtier".into(),
        transport: "tcp".into(),
        op: "pull".into(),
        block_bytes: block,
        batch,
        iters: times.len(),
        gbps: p50.map(|t| bytes as f64 / t.as_secs_f64() / 1e9),
        per_block_us: p50.map(|t| t.as_secs_f64() * 1e6 / (batch * puller.at_once) as f64),
        grant_us: Some(grant.grant_us),
        regrant_us: Some(grant.regrant_us),
        verified: failure.is_none() && !times.is_empty(),
        pulls_at_once: puller.at_once,
        pulls_per_source: (puller.at_once > 1).then(|| puller.queue.per_source()),
        pull_p50_us: pull_times
            .get(pull_times.len() / 2)
            .map(|t| t.as_secs_f64() * 1e6),
    })
}

/// One pull of `wanted` as an agent makes it: its turn at the source (`--pulls-per-source`), then
/// its slots, then the transfer.
async fn pull_in_turn(
    puller: &Puller,
    store: &TieredStore,
    wanted: &[(BlockKey, u64)],
    order: &[usize],
    grant: &GrantAnswer,
    id: GrantId,
) -> Result<Vec<Pulled>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let tested = &puller.tested;
    let turn = puller
        .queue
        .turn(&tested.endpoint, deadline)
        .await
        .map_err(|waited| anyhow::anyhow!("no turn at the source after waiting {waited:?}"))?;
    let items = pull_items(store, wanted, order, grant)?;
    let pulled = tested.transport.pull(&tested.endpoint, id, items, deadline).await;
    drop(turn);
    Ok(pulled)
}

/// A slot reserved for each of `wanted` (laid out in `order`), as items of the grant's blocks in
/// the grant's order, as a decode agent asks for a prefix.
fn pull_items(
    store: &TieredStore,
    wanted: &[(BlockKey, u64)],
    order: &[usize],
    grant: &GrantAnswer,
) -> Result<Vec<PullItem>> {
    let mut items: Vec<PullItem> = store
        .reserve_batch(wanted)
        .into_iter()
        .zip(order)
        .map(|(r, &j)| {
            Ok(PullItem {
                index: j as u32,
                remote_offset: grant.blocks[j].0,
                checksum: grant.blocks[j].2,
                slot: r.map_err(|o| anyhow::anyhow!("no local slot: {o:?}"))?,
            })
        })
        .collect::<Result<_>>()?;
    items.sort_by_key(|i| i.index);
    Ok(items)
}

fn open_store(arena: u64) -> Result<TieredStore> {
    let mut host = HostTierConfig::new(arena);
    host.slab_size = 64 << 20;
    // As a node agent runs (deploy sets `host.preallocate`), and as the peers' pools are
    // touched before their timed loops: a first write to each page is not what is measured.
    host.preallocate = true;
    Ok(TieredStore::open(StoreConfig {
        host,
        disk: None,
        object: None,
    })?)
}

/// The source child process and its control pipe.
struct Source {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The TCP backend's `ip:port`.
    endpoint: String,
    /// The UCX backend's endpoints, by fabric label.
    #[cfg_attr(
        not(feature = "ucx"),
        expect(dead_code, reason = "filled only with the ucx feature")
    )]
    ucx: std::collections::HashMap<String, Vec<u8>>,
}

impl Source {
    fn spawn(arena: u64, planes: &[Plane]) -> Result<Self> {
        let planes: Vec<String> = planes.iter().map(|p| format!("{p:?}").to_lowercase()).collect();
        let mut child = Command::new(std::env::current_exe()?)
            .args(["transfer", "--serve", "--arena", &arena.to_string()])
            .args(["--transports", &planes.join(",")])
            // UCX logs to stdout unless told otherwise, which would break the control pipe.
            .env(
                "UCX_LOG_FILE",
                std::env::var_os("UCX_LOG_FILE").unwrap_or_else(|| "stderr".into()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the source process")?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let ready: serde_json::Value = serde_json::from_str(&line).context("the source's first line")?;
        let endpoint = ready["endpoint"].as_str().context("endpoint")?.to_owned();
        let mut ucx = std::collections::HashMap::new();
        for (label, hex) in ready["ucx"].as_object().into_iter().flatten() {
            match hex.as_str() {
                Some(hex) => {
                    ucx.insert(label.clone(), unhex(hex).context("the source's UCX endpoint")?);
                }
                None => eprintln!("kvtier ucx {label}: the source has none ({hex})"),
            }
        }
        Ok(Self {
            child,
            stdin,
            stdout,
            endpoint,
            ucx,
        })
    }

    fn ask<T: for<'de> Deserialize<'de>>(&mut self, ask: &Ask) -> Result<T> {
        writeln!(self.stdin, "{}", serde_json::to_string(ask)?)?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the source process exited");
        }
        serde_json::from_str(&line).with_context(|| format!("the source's answer {line:?}"))
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The source process: holds blocks, grants them, serves them over TCP and (asked for UCX)
/// over UCX. Its first line is its endpoints: `{"endpoint": "ip:port", "ucx": {label: hex or
/// {"error": ...}}}`.
fn serve(arena: u64, planes: &[Plane]) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let store = Arc::new(open_store(arena)?);
    let grants = Arc::new(Grants::new(Arc::clone(&store), Duration::from_secs(600), 16));
    let transport = TcpTransport::new(
        Arc::clone(&store),
        Some(Arc::clone(&grants)),
        Secret::new(SECRET),
        TcpConfig::default(),
    );
    let addr = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        transport.serve(listener)
    })?;
    // Kept alive for as long as the process serves.
    let (ucx, _ucx_transports) = serve_ucx(&store, &grants, planes);
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}",
        serde_json::json!({ "endpoint": addr.to_string(), "ucx": ucx })
    )?;
    out.flush()?;
    let pattern: Vec<u8> = {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        (0..(8 << 20))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let mut filled: Vec<BlockKey> = Vec::new();
    for line in std::io::stdin().lines() {
        let ask: Ask = serde_json::from_str(&line?)?;
        let answer = match ask {
            Ask::Fill {
                tag,
                block,
                batch,
                back_to_back,
            } => {
                for k in filled.drain(..) {
                    store.remove(&k);
                }
                // Stored in a random order, the blocks lie in the arena in that order.
                for i in layout(batch as usize, tag, back_to_back)
                    .into_iter()
                    .map(|i| i as u64)
                {
                    let start = (i as usize * 4099 + tag as usize * 131) % (pattern.len() - block as usize);
                    let k = key(tag, i);
                    let stored = store.put(&k, &pattern[start..start + block as usize]);
                    if stored != kvstore::PutOutcome::Stored {
                        bail!("the source arena took no block {i} of {batch} ({stored:?})");
                    }
                    filled.push(k);
                }
                serde_json::json!({ "ok": true })
            }
            Ask::Grant { tag, batch } => {
                let keys: Vec<BlockKey> = (0..batch).map(|i| key(tag, i)).collect();
                let t0 = Instant::now();
                let Grant { id, blocks, .. } = grants.grant(&keys)?;
                let grant_us = t0.elapsed().as_secs_f64() * 1e6;
                // What a second puller of the same prefix costs the source: the checksums are
                // known now, so only the pinning remains.
                let t1 = Instant::now();
                let again = grants.grant(&keys)?;
                let regrant_us = t1.elapsed().as_secs_f64() * 1e6;
                grants.release(&again.id);
                serde_json::to_value(GrantAnswer {
                    id: id.0.to_vec(),
                    blocks: blocks.iter().map(|b| (b.offset, b.len, b.checksum)).collect(),
                    grant_us,
                    regrant_us,
                })?
            }
            Ask::Release { id } => {
                let id = GrantId::from_slice(&id).context("grant id")?;
                serde_json::json!({ "released": grants.release(&id) })
            }
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}

/// The order in which one side stores or reserves a batch of `n` blocks: `0..n` where
/// `back_to_back`, else [`shuffled`] by `seed`.
fn layout(n: usize, seed: u64, back_to_back: bool) -> Vec<usize> {
    if back_to_back {
        (0..n).collect()
    } else {
        shuffled(n, seed)
    }
}

/// `0..n` in a random order that `seed` fixes (Fisher–Yates over xorshift64*: the benchmark
/// needs a spread, not a statistically strong generator).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        v.swap(i, (r % (i as u64 + 1)) as usize);
    }
    v
}

/// The source's UCX transports (when asked for) and their endpoints by fabric label.
#[cfg(feature = "ucx")]
fn serve_ucx(
    store: &Arc<TieredStore>,
    grants: &Arc<Grants>,
    planes: &[Plane],
) -> (serde_json::Map<String, serde_json::Value>, Vec<UcxTransport>) {
    let mut endpoints = serde_json::Map::new();
    let mut transports = Vec::new();
    if planes.contains(&Plane::Ucx) {
        for fabric in &UCX_FABRICS {
            // Get mode: its endpoint carries the key, so pullers may read or ask for writes.
            let cfg = fabric.config(UcxMode::Get);
            match UcxTransport::new(Arc::clone(store), Some(Arc::clone(grants)), cfg) {
                Ok(t) => {
                    endpoints.insert(fabric.label.into(), hex(&t.endpoint(None)).into());
                    transports.push(t);
                }
                Err(e) => {
                    endpoints.insert(fabric.label.into(), serde_json::json!({ "error": e.to_string() }));
                }
            }
        }
    }
    (endpoints, transports)
}

#[cfg(not(feature = "ucx"))]
fn serve_ucx(
    _: &Arc<TieredStore>,
    _: &Arc<Grants>,
    _: &[Plane],
) -> (serde_json::Map<String, serde_json::Value>, Vec<()>) {
    (serde_json::Map::new(), Vec::new())
}

#[cfg(feature = "ucx")]
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Result<Vec<u8>> {
    if text.len() % 2 != 0 {
        bail!("odd number of hex digits");
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).context("not hex"))
        .collect()
}

/// Runs a peer's benchmark script with the same matrix; its JSON record and rows.
/// The peer systems measured next to kvtier, and what each reported so far.
#[derive(Default)]
struct Peers {
    /// Per peer: its first report, with the results of every later run appended, or why it
    /// was skipped.
    records: serde_json::Map<String, serde_json::Value>,
}

impl Peers {
    const ALL: [(&'static str, &'static str, &'static str); 2] = [
        (
            "mooncake",
            "target/venv-mooncake",
            "benches/peers/mooncake_bench.py",
        ),
        ("nixl", "target/venv-nixl", "benches/peers/nixl_bench.py"),
    ];

    /// Runs every peer not yet skipped on the configurations of `args`; their rows.
    fn run(&mut self, args: &TransferArgs) -> Vec<Row> {
        let mut rows = Vec::new();
        for (name, venv, script) in Self::ALL {
            if self.records.get(name).is_some_and(|r| r.get("skipped").is_some()) {
                continue;
            }
            match run_peer(name, Path::new(venv), Path::new(script), args) {
                Ok((record, peer_rows)) => {
                    rows.extend(peer_rows);
                    match self.records.get_mut(name) {
                        Some(first) => {
                            let more = record["results"].as_array().cloned().unwrap_or_default();
                            if let Some(results) = first["results"].as_array_mut() {
                                results.extend(more);
                            }
                        }
                        None => {
                            self.records.insert(name.into(), record);
                        }
                    }
                }
                Err(e) => {
                    eprintln!("{name}: skipped ({e:#})");
                    self.records
                        .insert(name.into(), serde_json::json!({ "skipped": format!("{e:#}") }));
                }
            }
        }
        rows
    }
}

fn run_peer(
    name: &str,
    venv: &Path,
    script: &Path,
    args: &TransferArgs,
) -> Result<(serde_json::Value, Vec<Row>)> {
    let python = venv.join("bin/python");
    if !python.is_file() {
        bail!(
            "{} is missing: run benches/peers/setup-{name}.sh",
            python.display()
        );
    }
    let sizes: Vec<String> = args.block_kib.iter().map(|k| format!("{k}K")).collect();
    let batches: Vec<String> = args.batches.iter().map(ToString::to_string).collect();
    let mut cmd = Command::new(&python);
    cmd.arg(script)
        .args(["--block-sizes", &sizes.join(","), "--batches", &batches.join(",")])
        .stderr(Stdio::inherit());
    if args.quick {
        cmd.arg("--quick");
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().context("no output")?;
    let record: serde_json::Value = serde_json::from_str(last).context("the last line is not JSON")?;
    let mut rows = Vec::new();
    for r in record["results"].as_array().into_iter().flatten() {
        rows.push(Row {
            system: name.into(),
            transport: r["transport"].as_str().unwrap_or("?").into(),
            op: r["op"].as_str().unwrap_or("?").into(),
            block_bytes: r["block_bytes"].as_u64().unwrap_or(0),
            batch: r["batch"].as_u64().unwrap_or(0) as usize,
            iters: r["iters"].as_u64().unwrap_or(0) as usize,
            gbps: r["gbps"].as_f64(),
            per_block_us: r["per_block_us"].as_f64(),
            grant_us: None,
            regrant_us: None,
            verified: r["verified"].as_bool().unwrap_or(false),
            pulls_at_once: 1,
            pulls_per_source: None,
            pull_p50_us: None,
        });
    }
    if !out.status.success() {
        eprintln!("{name}: exit {} (some configurations failed)", out.status);
    }
    Ok((record, rows))
}

/// One row per system and configuration: the median round's figures (rows of one round pass
/// through). A configuration is verified only if every round of it was.
fn median_over_rounds(rows: &[Row]) -> Vec<Row> {
    let mut out: Vec<Row> = Vec::new();
    for r in rows {
        if out.iter().any(|o| o.cell() == r.cell()) {
            continue;
        }
        let group: Vec<&Row> = rows.iter().filter(|o| o.cell() == r.cell()).collect();
        let mut timed: Vec<&Row> = group.iter().copied().filter(|o| o.gbps.is_some()).collect();
        timed.sort_by(|a, b| a.gbps.partial_cmp(&b.gbps).unwrap_or(std::cmp::Ordering::Equal));
        let mut row = timed
            .get(timed.len() / 2)
            .map_or_else(|| r.clone(), |m| (*m).clone());
        row.iters = group.iter().map(|o| o.iters).sum();
        row.verified = group.iter().all(|o| o.verified);
        out.push(row);
    }
    out
}

fn print_table(rows: &[Row], args: &TransferArgs) {
    let mut columns: Vec<(String, String, String)> = Vec::new();
    for r in rows {
        let c = (r.system.clone(), r.transport.clone(), r.op.clone());
        if !columns.contains(&c) {
            columns.push(c);
        }
    }
    if args.rounds > 1 {
        println!("median over {} rounds of each round's median batch", args.rounds);
    }
    println!(
        "GB/s (per-block us), median batch; kvtier pulls include checksum verification, except those labelled unverified"
    );
    print!("{:>9} {:>5}", "block", "batch");
    for (s, t, o) in &columns {
        print!(" {:>20}", format!("{s} {t} {o}"));
    }
    println!();
    for &kib in &args.block_kib {
        for &batch in &args.batches {
            print!("{:>5} KiB {:>5}", kib, batch);
            for (s, t, o) in &columns {
                let cell = rows
                    .iter()
                    .find(|r| r.cell() == (s.as_str(), t.as_str(), o.as_str(), kib * 1024, batch))
                    .and_then(|r| Some(format!("{:.2} ({:.0})", r.gbps?, r.per_block_us?)))
                    .unwrap_or_else(|| "-".into());
                print!(" {cell:>20}");
            }
            println!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(system: &str, batch: usize, gbps: Option<f64>, verified: bool) -> Row {
        Row {
            system: system.into(),
            transport: "tcp".into(),
            op: "pull".into(),
            block_bytes: 65536,
            batch,
            iters: 3,
            gbps,
            per_block_us: gbps.map(|g| 100.0 / g),
            grant_us: None,
            regrant_us: None,
            verified,
            pulls_at_once: 1,
            pulls_per_source: None,
            pull_p50_us: None,
        }
    }

    /// The scattered layout is a permutation that the seed fixes, and it leaves almost no two
    /// blocks back to back in the order pulled (what kvtier would merge into one copy).
    #[test]
    fn shuffled_is_a_fixed_permutation_with_few_neighbours_in_order() {
        for n in [0, 1, 16, 256] {
            let mut v = shuffled(n, 7);
            assert_eq!(v, shuffled(n, 7));
            v.sort_unstable();
            assert_eq!(v, (0..n).collect::<Vec<_>>());
        }
        let v = shuffled(256, 7);
        assert_ne!(v, shuffled(256, 8));
        let in_order = v.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(in_order < 8, "{in_order} of 255 neighbours in order");
    }

    #[test]
    fn rounds_reduce_to_the_median_round_per_system_and_configuration() {
        let rounds = vec![
            row("kvtier", 1, Some(5.0), true),
            row("nixl", 1, Some(1.0), true),
            row("kvtier", 1, Some(2.0), true),
            row("nixl", 1, None, false),
            row("kvtier", 1, Some(9.0), true),
            row("kvtier", 16, Some(4.0), true),
        ];
        let rows = median_over_rounds(&rounds);
        assert_eq!(rows.len(), 3, "one row per system and configuration");
        let kvtier = &rows[0];
        assert_eq!((kvtier.system.as_str(), kvtier.batch), ("kvtier", 1));
        assert_eq!(kvtier.gbps, Some(5.0), "the middle of 2, 5 and 9");
        assert_eq!(kvtier.per_block_us, Some(20.0), "the median round's own figures");
        assert_eq!(kvtier.iters, 9, "iterations of every round");
        assert!(kvtier.verified);
        let nixl = &rows[1];
        assert_eq!(nixl.gbps, Some(1.0), "an untimed round is not a figure");
        assert!(!nixl.verified, "one failed round fails the configuration");
        assert_eq!((rows[2].batch, rows[2].gbps), (16, Some(4.0)));
    }
}

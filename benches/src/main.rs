//! `kvbench`: reproducible kvtier benchmarks. Every figure is printed next to a baseline
//! measured in the same run on the same machine (memcpy, fio), because absolute numbers on
//! shared machines mean little; the ratio is what the performance contract is about.

mod disk;
mod e2e;
mod gpu;
mod host;
mod index;
mod local;
mod object;
mod report;
mod transfer;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "kvbench",
    version,
    about = "kvtier benchmarks with same-run baselines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Host arena put/get vs memcpy, and disk tier write/read vs fio.
    Tiers(TiersArgs),
    /// An engine's calls to a real `kvagent node`: lookup latency, save/load bandwidth vs memcpy.
    Local(local::LocalArgs),
    /// Real vLLM: TTFT with a 2k-token prefix from kvtier vs full recompute.
    E2e(e2e::E2eArgs),
    /// The cluster index: ingest and score in process and over gRPC, next to Dynamo's radix tree.
    Index(index::IndexArgs),
    /// Blocks pulled between two processes over loopback, next to Mooncake and NIXL.
    Transfer(transfer::TransferArgs),
    /// The CUDA copy engine between device KV caches and the arena, next to torch's copies.
    Gpu(gpu::GpuArgs),
}

/// Options of `kvbench tiers`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct TiersArgs {
    /// A short run (seconds) for smoke tests; figures are noisier.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Directory for the disk tier and fio files (must not be tmpfs to measure O_DIRECT).
    #[arg(long, default_value = "target/kvbench")]
    pub(crate) dir: PathBuf,
    /// I/O queue depth for the disk tier and fio.
    #[arg(long, default_value_t = 16)]
    pub(crate) queue_depth: u32,
    /// Repetitions of each measurement; the median is reported.
    #[arg(long)]
    pub(crate) reps: Option<usize>,
    /// Skip the host arena part.
    #[arg(long)]
    pub(crate) no_host: bool,
    /// Skip the disk part.
    #[arg(long)]
    pub(crate) no_disk: bool,
    /// Skip the object-store part (otherwise a SeaweedFS S3 server is started from
    /// `$SEAWEEDFS_BIN` or target/venv-s3, unless `--s3-endpoint` names one).
    #[arg(long)]
    pub(crate) no_object: bool,
    /// An S3 endpoint to measure instead of a local SeaweedFS (e.g. http://minio:9000).
    #[arg(long, value_name = "URL")]
    pub(crate) s3_endpoint: Option<String>,
    /// Bucket on `--s3-endpoint`.
    #[arg(long)]
    pub(crate) s3_bucket: Option<String>,
    /// Access key for `--s3-endpoint`.
    #[arg(long)]
    pub(crate) s3_access_key: Option<String>,
    /// Secret key for `--s3-endpoint` (or `KVBENCH_S3_SECRET_KEY`).
    #[arg(long, env = "KVBENCH_S3_SECRET_KEY", hide_env_values = true)]
    pub(crate) s3_secret_key: Option<String>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Tiers(args) => tiers(&args),
        Command::Local(args) => local::run(&args),
        Command::E2e(args) => e2e::run(&args),
        Command::Index(args) => index::run(&args),
        Command::Transfer(args) => transfer::run(&args),
        Command::Gpu(args) => gpu::run(&args),
    }
}

fn tiers(args: &TiersArgs) -> Result<()> {
    let mut rows = Vec::new();
    let reps = args.reps.unwrap_or(if args.quick { 2 } else { 5 });
    if !args.no_host {
        rows.extend(host::run(args.quick, reps)?);
    }
    if !args.no_disk {
        rows.extend(disk::run(args, reps)?);
    }
    if !args.no_object {
        rows.extend(object::run(args, reps)?);
    }
    report::print(&rows);
    if let Some(path) = &args.json {
        report::write_json(path, &rows, args)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

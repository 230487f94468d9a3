//! The `kvagent` command line.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kvagent::config::{self, LogFormat, NodeFlags};

/// kvtier's agent: KV-cache tiers for LLM inference engines.
#[derive(Debug, Parser)]
#[command(name = "kvagent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the per-node agent (one per node: a DaemonSet). With no arguments and no config
    /// file it listens on /run/kvtier/agent.sock with a 4 GiB host arena and no disk tier.
    Node(NodeArgs),
    /// Runs the cluster KV-cache index (a Deployment): ingests vLLM engines' KV events and node
    /// agents' tier events, and answers routers' Score calls over gRPC (default :9480).
    Index(IndexArgs),
    /// An OpenAI-compatible proxy that sends each request to the vLLM server holding the longest
    /// prefix of its prompt (per the index), else to the least loaded one.
    Route(kvagent::route::RouteArgs),
    /// Asks an index which pods hold the longest prefix of a prompt (as a router would).
    Score(kvagent::score::ScoreArgs),
    /// Prints the block hashes vLLM computes for a prompt (token ids, or text with a tokenizer):
    /// what to compare when the hit rate is 0 %.
    Hash(kvagent::hash::HashArgs),
}

#[derive(Debug, clap::Args)]
struct NodeArgs {
    /// TOML configuration file [default: $KVTIER_CONFIG, else /etc/kvtier/agent.toml if present].
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Prints the effective configuration as TOML and exits.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    flags: NodeFlags,
}

#[derive(Debug, clap::Args)]
struct IndexArgs {
    /// TOML configuration file [default: $KVTIER_INDEX_CONFIG, else /etc/kvtier/index.toml if present].
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Prints the effective configuration as TOML and exits.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    flags: kvagent::index::IndexFlags,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvagent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node(args) => {
            let cfg = config::load(args.config.as_deref(), &args.flags)?;
            if args.print_config {
                print!("{}", cfg.to_toml()?);
                return Ok(());
            }
            init_tracing(cfg.log_format, &cfg.log_level)?;
            kvagent::node::run(cfg)
        }
        Command::Index(args) => {
            let cfg = kvagent::index::config::load(args.config.as_deref(), &args.flags)?;
            if args.print_config {
                print!("{}", cfg.to_toml()?);
                return Ok(());
            }
            init_tracing(cfg.log_format, &cfg.log_level)?;
            kvagent::index::run(cfg)
        }
        Command::Hash(args) => kvagent::hash::run(&args),
        Command::Score(args) => kvagent::score::run(&args),
        Command::Route(args) => {
            init_tracing(kvagent::config::LogFormat::Text, "info")?;
            kvagent::route::run(args)
        }
    }
}

fn init_tracing(format: LogFormat, level: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(level).context("log_level")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
    Ok(())
}

//! `kvagent score`: asks an index which pods hold the longest prefix of a prompt — what a router
//! does on every request, from the command line.

use std::path::PathBuf;

use anyhow::Context as _;
use serde::Serialize;

use crate::index::proto::{self, index_client::IndexClient};

/// Arguments of `kvagent score`.
#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
    /// The index's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:9480")]
    pub index: String,
    /// The model the engines serve.
    #[arg(long)]
    pub model: String,
    /// Token ids (a JSON array, or integers separated by spaces, commas or newlines); `-` or
    /// nothing reads standard input.
    #[arg(value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Tokens per block [default: the index's `hash.block_size`].
    #[arg(long)]
    pub block_size: Option<u32>,
    /// The engines' hash algorithm [default: the index's `hash.algo`].
    #[arg(long)]
    pub algo: Option<String>,
    /// The engines' PYTHONHASHSEED [default: the index's `hash.seed`].
    #[arg(long)]
    pub seed: Option<String>,
    /// The request's LoRA adapter name and path.
    #[arg(long, requires = "lora_path")]
    pub lora_name: Option<String>,
    /// The request's LoRA adapter path.
    #[arg(long, requires = "lora_name")]
    pub lora_path: Option<String>,
    /// The request's cache_salt.
    #[arg(long)]
    pub cache_salt: Option<String>,
    /// Candidate pods [default: every pod of the model].
    #[arg(long = "pod")]
    pub pods: Vec<String>,
    /// Prints the index's statistics instead of scoring.
    #[arg(long, conflicts_with = "input")]
    pub stats: bool,
}

#[derive(Debug, Serialize)]
struct Scored {
    prompt_blocks: u32,
    scores: Vec<PodScore>,
}

#[derive(Debug, Serialize)]
struct PodScore {
    pod: String,
    blocks: u32,
    weighted: f64,
}

/// Runs `kvagent score`, printing JSON to standard output.
pub fn run(args: &ScoreArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let mut client = IndexClient::connect(args.index.clone())
            .await
            .with_context(|| format!("connecting to the index at {}", args.index))?;
        if args.stats {
            let stats = client
                .stats(proto::StatsRequest {})
                .await
                .context("Stats")?
                .into_inner();
            let sources: Vec<_> = stats
                .sources
                .iter()
                .map(|s| serde_json::json!({"name": s.name, "idle_seconds": s.idle_seconds}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"blocks": stats.blocks, "sources": sources})
            );
            return Ok(());
        }
        let tokens = crate::hash::read_token_input(args.input.as_deref())?;
        let request = proto::ScoreRequest {
            model: args.model.clone(),
            prompt: Some(proto::score_request::Prompt::Tokens(proto::TokenIds {
                ids: tokens,
            })),
            hash: Some(proto::HashConfig {
                block_size: args.block_size.unwrap_or(0),
                algo: args.algo.clone().unwrap_or_default(),
                seed: args.seed.clone(),
                lora_name: args.lora_name.clone().unwrap_or_default(),
                lora_path: args.lora_path.clone().unwrap_or_default(),
                cache_salt: args.cache_salt.clone().unwrap_or_default(),
            }),
            pods: args.pods.clone(),
            speculate: false,
        };
        let resp = client.score(request).await.context("Score")?.into_inner();
        let out = Scored {
            prompt_blocks: resp.prompt_blocks,
            scores: resp
                .scores
                .into_iter()
                .map(|s| PodScore {
                    pod: s.pod,
                    blocks: s.blocks,
                    weighted: s.weighted,
                })
                .collect(),
        };
        println!("{}", serde_json::to_string(&out)?);
        Ok(())
    })
}

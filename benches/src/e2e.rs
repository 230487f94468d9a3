//! `kvbench e2e`: time to first token of a prompt whose 2k-token prefix comes from kvtier,
//! against full recompute in the same engine. The engine is real vLLM, so the measurement runs
//! in Python (`tests/e2e/bench_ttft.py`, in the venv that `tests/e2e/setup-vllm.sh` builds);
//! this subcommand runs it.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// Options of `kvbench e2e`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct E2eArgs {
    /// The Python of the vLLM venv.
    #[arg(long, default_value = "target/venv-vllm/bin/python")]
    pub(crate) python: PathBuf,
    /// The benchmark script.
    #[arg(long, default_value = "tests/e2e/bench_ttft.py")]
    pub(crate) script: PathBuf,
    /// Requests of each kind (p50 reported).
    #[arg(long, default_value_t = 10)]
    pub(crate) requests: u32,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

/// Runs the benchmark script; its table goes to stdout.
pub(crate) fn run(args: &E2eArgs) -> Result<()> {
    if !args.python.is_file() {
        bail!(
            "{} not found: run tests/e2e/setup-vllm.sh from the repository root first",
            args.python.display()
        );
    }
    let mut cmd = Command::new(&args.python);
    cmd.arg(&args.script)
        .args(["--requests", &args.requests.to_string()]);
    if let Some(json) = &args.json {
        cmd.arg("--json").arg(json);
    }
    let status = cmd
        .status()
        .with_context(|| format!("running {}", args.script.display()))?;
    if !status.success() {
        bail!("{} failed: {status}", args.script.display());
    }
    Ok(())
}

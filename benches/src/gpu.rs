//! `kvbench gpu`: the CUDA copy engine between device KV caches and a real agent's arena, next to
//! torch's pinned-memory copies in the same run (`benches/gpu/kvbench_gpu.py` does the copies:
//! the device tensors are torch's, as in vLLM, and the engine is reached through the same Python
//! bindings the connector uses).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use kvstore::device::{self, Backend, Device};

use crate::local::{agent_binary, script_in_repo, start_agent};

/// Options of `kvbench gpu`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct GpuArgs {
    /// The `kvagent` binary [default: next to this one].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// A Python with torch (CUDA) and kvtier importable (the wheel installed, or
    /// `maturin develop` in its environment).
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// The benchmark script.
    #[arg(long, default_value = "benches/gpu/kvbench_gpu.py")]
    script: PathBuf,
    /// Blocks per copy batch.
    #[arg(long, default_value_t = 64)]
    batch: u32,
    /// Pages per block (vLLM: one per layer).
    #[arg(long, default_value_t = 8)]
    layers: u32,
    /// Repetitions of each measurement; the median is reported.
    #[arg(long, default_value_t = 20)]
    reps: u32,
    /// The agent's arena (must hold one batch of the largest blocks).
    #[arg(long, default_value = "2GiB")]
    arena: String,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub(crate) fn run(args: &GpuArgs) -> Result<()> {
    let cuda = Device {
        backend: Backend::Cuda,
        index: 0,
    };
    match device::check(cuda) {
        Ok(what) => eprintln!("kvbench gpu: {what}"),
        Err(e) => {
            // Not a failure: the bench stays runnable where a GPU is.
            println!("kvbench gpu: skipped: {e}");
            return Ok(());
        }
    }
    script_in_repo(&args.script, "--script")?;
    let agent = start_agent(&agent_binary(args.agent.as_deref())?, &args.arena)?;
    let out = Command::new(&args.python)
        .arg(&args.script)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["--batch", &args.batch.to_string()])
        .args(["--layers", &args.layers.to_string()])
        .args(["--reps", &args.reps.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", args.python.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    if out.status.code() == Some(3) {
        // The script's "nothing to measure here" (no torch, no kvtier, no device for torch).
        println!("kvbench gpu: skipped (see above)");
        return Ok(());
    }
    if !out.status.success() {
        bail!("the GPU bench failed ({})", out.status);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, stdout.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

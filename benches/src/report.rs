//! Result rows: a table for people and JSON for tools.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::TiersArgs;

/// One measured figure next to its same-run baseline.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    /// `host` or `disk`.
    pub(crate) tier: &'static str,
    /// `put`, `get`, `write`, `read`.
    pub(crate) op: &'static str,
    /// Block size in bytes.
    pub(crate) block_size: u64,
    /// Threads (host) or queue depth (disk).
    pub(crate) parallelism: String,
    /// kvtier's bandwidth in GB/s (10^9 bytes of payload per second).
    pub(crate) kvtier_gbps: f64,
    /// What the baseline is (`memcpy`, `fio io_uring O_DIRECT`).
    pub(crate) baseline: String,
    /// The baseline's bandwidth in GB/s.
    pub(crate) baseline_gbps: f64,
    /// Median of the per-repetition ratios kvtier / baseline (each pair measured back to back,
    /// so drifts of a shared machine cancel out).
    pub(crate) ratio: f64,
    /// Extra facts (engine, direct I/O).
    pub(crate) note: String,
}

impl Row {
    #[expect(clippy::too_many_arguments, reason = "a flat record built in two places")]
    pub(crate) fn new(
        tier: &'static str,
        op: &'static str,
        block_size: u64,
        parallelism: String,
        kvtier_gbps: f64,
        baseline: impl Into<String>,
        baseline_gbps: f64,
        ratio: f64,
        note: impl Into<String>,
    ) -> Self {
        Self {
            tier,
            op,
            block_size,
            parallelism,
            kvtier_gbps,
            baseline: baseline.into(),
            baseline_gbps,
            ratio,
            note: note.into(),
        }
    }
}

fn size(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{} MiB", b >> 20)
    } else {
        format!("{} KiB", b >> 10)
    }
}

/// Prints the rows as a Markdown table (pasteable into docs/benchmarks.md).
pub(crate) fn print(rows: &[Row]) {
    println!("| tier | op | block | threads / QD | kvtier GB/s | baseline | baseline GB/s | ratio | note |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {:.2} | {} | {:.2} | {:.0} % | {} |",
            r.tier,
            r.op,
            size(r.block_size),
            r.parallelism,
            r.kvtier_gbps,
            r.baseline,
            r.baseline_gbps,
            r.ratio * 100.0,
            r.note
        );
    }
}

#[derive(Serialize)]
struct Report<'a> {
    command: String,
    machine: Machine,
    quick: bool,
    queue_depth: u32,
    results: &'a [Row],
}

#[derive(Serialize)]
struct Machine {
    cpu: String,
    cores: usize,
    kernel: String,
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel,
    }
}

/// Writes the rows with the machine and the command line as JSON.
pub(crate) fn write_json(path: &Path, rows: &[Row], args: &TiersArgs) -> Result<()> {
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine(),
        quick: args.quick,
        queue_depth: args.queue_depth,
        results: rows,
    };
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

/// Medians of paired samples: (median of `ours`, median of `base`, median of the pairwise ratios).
pub(crate) fn paired(ours: &[f64], base: &[f64]) -> (f64, f64, f64) {
    let ratios = ours.iter().zip(base).map(|(o, b)| o / b).collect();
    (median(ours.to_vec()), median(base.to_vec()), median(ratios))
}

/// The median of `xs` (which must not be empty).
pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

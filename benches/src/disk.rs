//! Disk tier write/read bandwidth against fio (io_uring, O_DIRECT) with the same block size,
//! queue depth and directory.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use kvstore::{BlockHash, BlockKey, DiskTier, DiskTierConfig, IoEngineChoice, Namespace, PutOutcome};

use crate::TiersArgs;
use crate::report::{Row, paired};

/// fio's bandwidth (bytes/s) for one sequential job.
fn fio(dir: &Path, rw: &str, bs: u64, qd: u32, size: u64) -> Result<f64> {
    let out = Command::new("fio")
        .arg("--name=kvbench")
        .arg(format!("--directory={}", dir.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={qd}"))
        .arg(format!("--size={size}"))
        .args([
            "--ioengine=io_uring",
            "--direct=1",
            "--numjobs=1",
            "--output-format=json",
        ])
        .output()
        .context("running fio (install it: apt-get install fio)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing fio's JSON")?;
    let side = if rw.contains("read") { "read" } else { "write" };
    v["jobs"][0][side]["bw_bytes"]
        .as_f64()
        .context("fio JSON has no bw_bytes")
}

fn ours(dir: &Path, bs: u64, qd: u32, total: u64) -> Result<(f64, f64, String)> {
    let _ = std::fs::remove_dir_all(dir);
    let n = total / bs;
    let slab = 256u64 << 20;
    let capacity = (n * kvstore::disk::record_len(bs)).div_ceil(slab) * slab + slab;
    let tier = DiskTier::open(DiskTierConfig {
        slab_size: slab,
        queue_depth: qd,
        engine: IoEngineChoice::Auto,
        ..DiskTierConfig::new(dir, capacity)
    })?;
    let note = format!(
        "{}{}",
        tier.engine_description(),
        if tier.direct_io() {
            ", O_DIRECT"
        } else {
            ", buffered"
        }
    );
    let ns = Namespace::builder("kvbench-disk").build();
    let keys: Vec<BlockKey> = (0..n)
        .map(|i| BlockKey::new(ns, BlockHash::from_u64(i)))
        .collect();
    let data = vec![0x5au8; bs as usize];
    // Batches of 64 MiB: large enough that the queue stays full, as an engine's save of a long
    // prompt's blocks would.
    let batch = ((64u64 << 20) / bs).max(qd as u64 * 2) as usize;
    let start = Instant::now();
    for chunk in keys.chunks(batch) {
        let items: Vec<_> = chunk.iter().map(|k| (*k, data.as_slice())).collect();
        for o in tier.put_batch(&items) {
            if o != PutOutcome::Stored {
                bail!("disk tier declined a block during the benchmark: {o:?}");
            }
        }
    }
    let write = (n * bs) as f64 / start.elapsed().as_secs_f64();
    let mut dst = vec![0u8; bs as usize];
    let start = Instant::now();
    let mut hits = 0u64;
    for chunk in keys.chunks(batch) {
        tier.get_batch(chunk, |_, p| {
            dst.copy_from_slice(p);
            hits += 1;
        });
    }
    let read = (n * bs) as f64 / start.elapsed().as_secs_f64();
    std::hint::black_box(&dst);
    if hits != n {
        bail!("disk tier served {hits} of {n} blocks");
    }
    drop(tier);
    let _ = std::fs::remove_dir_all(dir);
    Ok((write, read, note))
}

/// Disk rows: write and read per block size.
pub(crate) fn run(args: &TiersArgs, reps: usize) -> Result<Vec<Row>> {
    let sizes: &[u64] = if args.quick {
        &[1 << 20]
    } else {
        &[256 << 10, 1 << 20, 4 << 20]
    };
    let total: u64 = if args.quick { 512 << 20 } else { 2 << 30 };
    let qd = args.queue_depth;
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let fio_dir = args.dir.join("fio");
    let our_dir = args.dir.join("kvtier");
    std::fs::create_dir_all(&fio_dir)?;
    let mut rows = Vec::new();
    for &bs in sizes {
        eprintln!("disk: {} KiB blocks, QD {qd}", bs >> 10);
        let (mut w, mut r, mut fw, mut fr) = (vec![], vec![], vec![], vec![]);
        let mut note = String::new();
        for _ in 0..reps {
            let (ow, or, n) = ours(&our_dir, bs, qd, total)?;
            note = n;
            w.push(ow / 1e9);
            r.push(or / 1e9);
            let _ = std::fs::remove_dir_all(&fio_dir);
            std::fs::create_dir_all(&fio_dir)?;
            fw.push(fio(&fio_dir, "write", bs, qd, total)? / 1e9);
            fr.push(fio(&fio_dir, "read", bs, qd, total)? / 1e9);
        }
        let _ = std::fs::remove_dir_all(&fio_dir);
        let qd_s = format!("QD {qd}");
        let base = "fio io_uring O_DIRECT";
        let (w, fw, wr) = paired(&w, &fw);
        let (r, fr, rr) = paired(&r, &fr);
        rows.push(Row::new(
            "disk",
            "write",
            bs,
            qd_s.clone(),
            w,
            base,
            fw,
            wr,
            note.clone(),
        ));
        rows.push(Row::new("disk", "read", bs, qd_s, r, base, fr, rr, note));
    }
    Ok(rows)
}

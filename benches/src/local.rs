//! `kvbench local`: the engine's path to its node agent, through the real `kvagent` binary and
//! the real client. Round-trip latency of `lookup` (256 keys) next to a bare Unix-socket echo
//! of the same bytes, and save/load bandwidth through the client next to memcpy of the same
//! blocks, each measured in the same run.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use kvstore::client::{Client, ClientConfig, SaveOutcome};
use kvstore::wire::{self, Request};
use kvstore::{BlockHash, Namespace};
use serde::Serialize;

use crate::report::{self, Row};

/// Options of `kvbench local`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct LocalArgs {
    /// A short run for smoke tests; figures are noisier.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// The `kvagent` binary [default: next to this one].
    #[arg(long)]
    pub(crate) agent: Option<PathBuf>,
    /// Paired repetitions of each bandwidth measurement; the median ratio is reported.
    #[arg(long)]
    pub(crate) reps: Option<usize>,
}

/// Keys per lookup, as in the performance contract (a 4k-token prompt of 16-token blocks).
const LOOKUP_KEYS: usize = 256;
/// Payload bytes per bandwidth phase.
const PHASE_BYTES: u64 = 64 << 20;
const ARENA: &str = "512MiB";
const ARENA_BYTES: u64 = 512 << 20;
/// The agent's default `poll_us`, used by the echo baseline's server side too.
const AGENT_POLL: Duration = Duration::from_micros(50);

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Latency {
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
}

pub(crate) fn percentiles(mut samples: Vec<Duration>) -> Latency {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    Latency {
        p50_us: at(0.50),
        p99_us: at(0.99),
        p999_us: at(0.999),
    }
}

pub(crate) struct Agent {
    child: Child,
    pub(crate) socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks that a script given relative to the working directory (the repository's root by
/// default) is there; `flag` names the option that points elsewhere.
pub(crate) fn script_in_repo(script: &Path, flag: &str) -> Result<()> {
    if !script.is_file() {
        bail!(
            "{} not found: run kvbench from the repository's root, or pass {flag}",
            script.display()
        );
    }
    Ok(())
}

pub(crate) fn agent_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("kvbench has no directory")?
            .join("kvagent"),
    };
    if !path.is_file() {
        bail!(
            "{} not found: build it (cargo build --release -p kvagent) or pass --agent",
            path.display()
        );
    }
    Ok(path)
}

pub(crate) fn start_agent(binary: &Path, arena: &str) -> Result<Agent> {
    let dir = tempfile::Builder::new().prefix("kvbench-").tempdir()?;
    let socket = dir.path().join("agent.sock");
    let child = Command::new(binary)
        .args([
            "node",
            "--http-addr",
            "",
            "--log-level",
            "warn",
            "--host-size",
            arena,
            "--socket",
        ])
        .arg(&socket)
        .env_remove("KVTIER_CONFIG")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut agent = Agent {
        child,
        socket,
        _dir: dir,
    };
    let until = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&agent.socket).is_err() {
        if let Some(status) = agent.child.try_wait()? {
            bail!("kvagent exited: {status}");
        }
        if Instant::now() > until {
            bail!("kvagent did not start within 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(agent)
}

fn hashes(tag: u64, n: usize) -> Vec<BlockHash> {
    (0..n as u64)
        .map(|i| BlockHash::from_u64(tag << 40 | i))
        .collect()
}

/// Round trips of `lookup` with 256 stored keys through the client.
fn lookup_latency(client: &Client, ns: &Namespace, iters: usize) -> Result<Latency> {
    let keys = hashes(1, LOOKUP_KEYS);
    let block = vec![7u8; 4096];
    let items: Vec<_> = keys.iter().map(|h| (*h, block.as_slice())).collect();
    client.save(ns, &items)?;
    for _ in 0..iters / 10 {
        client.lookup(ns, &keys)?;
    }
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let m = client.lookup(ns, &keys)?;
        samples.push(t.elapsed());
        if m.len() != LOOKUP_KEYS {
            bail!("lookup matched {} of {LOOKUP_KEYS} keys", m.len());
        }
    }
    Ok(percentiles(samples))
}

/// The same request and answer sizes bounced off a thread over a Unix socket pair, with the same
/// polling as the client and the agent: the floor any local agent pays (kernel and wake-ups).
fn echo_latency(ns: &Namespace, iters: usize) -> Result<Latency> {
    let mut req = Vec::new();
    Request::Lookup(*ns, hashes(1, LOOKUP_KEYS)).encode(1, 0, &mut req);
    let answer_len = wire::LEN_PREFIX + wire::HEADER_LEN + 4 + LOOKUP_KEYS;
    let (mut a, b) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut reader = wire::FrameReader::default();
        let answer = vec![1u8; answer_len];
        loop {
            match reader.read_frame(&mut wire::PollingReader::new(&b, AGENT_POLL)) {
                Ok(_) => (&b).write_all(&answer)?,
                Err(_) => return Ok(()),
            }
        }
    });
    let mut answer = vec![0u8; answer_len];
    let mut samples = Vec::with_capacity(iters);
    let client_poll = ClientConfig::new("").spin;
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        a.write_all(&req)?;
        wire::PollingReader::new(&a, client_poll).read_exact(&mut answer)?;
        if i >= iters / 10 {
            samples.push(t.elapsed());
        }
    }
    drop(a);
    echo.join().expect("echo thread")?;
    Ok(percentiles(samples))
}

/// The engine's side of one phase: blocks in its own memory, filled (so touched).
fn blocks(size: u64) -> Vec<Vec<u8>> {
    let n = (PHASE_BYTES / size).max(4) as usize;
    (0..n).map(|i| vec![(i % 251) as u8 + 1; size as usize]).collect()
}

fn gbps(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e9
}

/// memcpy between the engine's blocks and the arena slots of `hs` (pinned for the copy, not
/// timed): the baseline copies to and from the very slots the client uses, because on this kind
/// of machine two regions of equal size can differ by a quarter in copy bandwidth depending on
/// the physical pages behind them.
fn memcpy_slots(
    client: &Client,
    ns: &Namespace,
    hs: &[BlockHash],
    blocks: &mut [Vec<u8>],
    into_arena: bool,
) -> Result<f64> {
    let held: Vec<_> = client.acquire(ns, hs)?.into_iter().flatten().collect();
    if held.len() != hs.len() {
        bail!("baseline: {} of {} blocks acquired", held.len(), hs.len());
    }
    let bytes: u64 = held.iter().map(|a| a.len()).sum();
    let t = Instant::now();
    for (a, b) in held.iter().zip(blocks.iter_mut()) {
        assert_eq!(a.len(), b.len() as u64, "slot and block lengths differ");
        if into_arena {
            // SAFETY: the benchmark is the arena's only user: nobody reads these pinned slots
            // while it overwrites them with bytes of the same length.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), a.ptr().cast_mut(), b.len()) };
        } else {
            // SAFETY: the slot is pinned (no writer) and holds `b.len()` bytes.
            unsafe { std::ptr::copy_nonoverlapping(a.ptr(), b.as_mut_ptr(), b.len()) };
        }
    }
    let rate = gbps(bytes, t.elapsed());
    std::hint::black_box(&blocks);
    client.release(ns, held)?;
    Ok(rate)
}

/// Save bandwidth through the client (reserve + copy + commit) vs memcpy into the same slots,
/// in alternating phases.
fn save_vs_memcpy(client: &Client, ns: &Namespace, size: u64, pairs: usize, tag: &mut u64) -> Result<Row> {
    let mut src = blocks(size);
    let bytes = src.len() as u64 * size;
    let save = |src: &[Vec<u8>], tag: u64| -> Result<(f64, Vec<BlockHash>)> {
        let hs = hashes(tag, src.len());
        let items: Vec<_> = hs.iter().zip(src).map(|(h, d)| (*h, d.as_slice())).collect();
        let t = Instant::now();
        let out = client.save(ns, &items)?;
        let took = t.elapsed();
        if out.iter().any(|o| *o != SaveOutcome::Stored) {
            bail!("save of {size}-byte blocks: {out:?}");
        }
        Ok((gbps(bytes, took), hs))
    };
    // Warm-up: write the whole arena once (first-touch page faults are a one-time cost).
    for _ in 0..ARENA_BYTES / bytes + 1 {
        *tag += 1;
        save(&src, *tag)?;
    }
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for p in 0..pairs {
        // The save, then memcpy into the slots it just filled, or the other way round.
        *tag += 1;
        let (rate, hs) = if p % 2 == 0 {
            save(&src, *tag)?
        } else {
            let (_, prev) = save(&src, *tag)?;
            base.push(memcpy_slots(client, ns, &prev, &mut src, true)?);
            *tag += 1;
            let (rate, _) = save(&src, *tag)?;
            ours.push(rate);
            continue;
        };
        ours.push(rate);
        base.push(memcpy_slots(client, ns, &hs, &mut src, true)?);
    }
    let (o, b, r) = report::paired(&ours, &base);
    Ok(Row::new(
        "local",
        "save",
        size,
        "1 client".into(),
        o,
        "memcpy into the same slots",
        b,
        r,
        "reserve + copy + commit",
    ))
}

/// Load bandwidth through the client (acquire + copy + release) vs memcpy out of the same
/// slots, in alternating phases.
fn load_vs_memcpy(client: &Client, ns: &Namespace, size: u64, pairs: usize, tag: &mut u64) -> Result<Row> {
    let src = blocks(size);
    let mut dst = blocks(size);
    for d in &mut dst {
        d.fill(0xee);
    }
    let bytes = src.len() as u64 * size;
    *tag += 1;
    let hs = hashes(*tag, src.len());
    let items: Vec<_> = hs.iter().zip(&src).map(|(h, d)| (*h, d.as_slice())).collect();
    client.save(ns, &items)?;
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for p in 0..pairs + 1 {
        for half in 0..2 {
            if (p + half) % 2 == 0 {
                let mut bufs: Vec<&mut [u8]> = dst.iter_mut().map(|d| d.as_mut_slice()).collect();
                let t = Instant::now();
                let got = client.load(ns, &hs, &mut bufs)?;
                let took = t.elapsed();
                if got.iter().any(Option::is_none) {
                    bail!("load of {size}-byte blocks missed");
                }
                if p > 0 {
                    ours.push(gbps(bytes, took));
                }
            } else {
                let rate = memcpy_slots(client, ns, &hs, &mut dst, false)?;
                if p > 0 {
                    base.push(rate);
                }
            }
        }
    }
    if dst.iter().zip(&src).any(|(d, s)| d != s) {
        bail!("loaded bytes differ from saved bytes");
    }
    let (o, b, r) = report::paired(&ours, &base);
    Ok(Row::new(
        "local",
        "load",
        size,
        "1 client".into(),
        o,
        "memcpy out of the same slots",
        b,
        r,
        "acquire + copy + release",
    ))
}

#[derive(Serialize)]
struct LocalReport<'a> {
    command: String,
    quick: bool,
    lookup_256_keys: Latency,
    unix_socket_echo: Latency,
    bandwidth: &'a [Row],
}

/// Runs the benchmark and prints its figures.
pub(crate) fn run(args: &LocalArgs) -> Result<()> {
    let agent = start_agent(&agent_binary(args.agent.as_deref())?, ARENA)?;
    let client = Client::connect(ClientConfig {
        timeout: Duration::from_secs(10),
        ..ClientConfig::new(&agent.socket)
    })?;
    let ns = Namespace::builder("kvbench").block_size(16).build();
    let iters = if args.quick { 2_000 } else { 50_000 };
    let lookup = lookup_latency(&client, &ns, iters)?;
    let echo = echo_latency(&ns, iters)?;
    println!("| round trip | p50 µs | p99 µs | p99.9 µs |");
    println!("| --- | --- | --- | --- |");
    for (name, l) in [
        ("lookup, 256 keys (client → kvagent)", lookup),
        ("Unix socket echo, same bytes", echo),
    ] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            l.p50_us, l.p99_us, l.p999_us
        );
    }
    println!();
    let pairs = args.reps.unwrap_or(if args.quick { 2 } else { 7 });
    let sizes: &[u64] = if args.quick {
        &[256 << 10, 4 << 20]
    } else {
        &[64 << 10, 256 << 10, 1 << 20, 4 << 20]
    };
    let mut rows = Vec::new();
    let mut tag = 1;
    for &size in sizes {
        rows.push(save_vs_memcpy(&client, &ns, size, pairs, &mut tag)?);
        rows.push(load_vs_memcpy(&client, &ns, size, pairs, &mut tag)?);
    }
    report::print(&rows);
    if let Some(path) = &args.json {
        let r = LocalReport {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            quick: args.quick,
            lookup_256_keys: lookup,
            unix_socket_echo: echo,
            bandwidth: &rows,
        };
        std::fs::write(path, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

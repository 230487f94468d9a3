//! Object tier put/get bandwidth against the raw `object_store` S3 client doing the same
//! transfers on the same server in the same run: the ratio is the cost of kvtier's layer
//! (packing, index objects, verification, the catalog).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use kvstore::object::{ObjectCredentials, ObjectTier, ObjectTierConfig};
use kvstore::{BlockHash, BlockKey, Namespace, PutOutcome};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _};

use crate::TiersArgs;
use crate::report::{Row, median, paired};

/// The tests' port picker, which the server launcher below uses.
#[path = "../../kvstore/tests/common/ports.rs"]
mod ports;
#[path = "../../kvstore/tests/common/weed.rs"]
mod weed;

/// Size of the objects both sides write: the tier's default `target_object_size`.
const OBJECT: u64 = 32 << 20;
/// Uploads, and reads, in flight on both sides.
const CONCURRENCY: usize = 4;

/// Where the S3 server is: one this run starts, or one named on the command line.
struct Server {
    endpoint: String,
    bucket: String,
    access_key: String,
    secret_key: String,
    _weed: Option<weed::WeedServer>,
}

fn server(args: &TiersArgs) -> Result<Option<Server>> {
    if let Some(endpoint) = &args.s3_endpoint {
        return Ok(Some(Server {
            endpoint: endpoint.clone(),
            bucket: args
                .s3_bucket
                .clone()
                .context("--s3-endpoint needs --s3-bucket")?,
            access_key: args.s3_access_key.clone().unwrap_or_default(),
            secret_key: args.s3_secret_key.clone().unwrap_or_default(),
            _weed: None,
        }));
    }
    let Some(w) = weed::WeedServer::start() else {
        return Ok(None);
    };
    Ok(Some(Server {
        endpoint: w.endpoint(),
        bucket: weed::WeedServer::BUCKET.into(),
        access_key: weed::WeedServer::ACCESS_KEY.into(),
        secret_key: weed::WeedServer::SECRET_KEY.into(),
        _weed: Some(w),
    }))
}

fn tier_config(s: &Server, prefix: &str) -> ObjectTierConfig {
    let mut c = ObjectTierConfig::new(format!("s3://{}/{prefix}", s.bucket));
    c.endpoint = Some(s.endpoint.clone());
    c.credentials = Some(ObjectCredentials {
        access_key_id: s.access_key.clone(),
        secret_access_key: s.secret_key.clone(),
        session_token: None,
    });
    c.target_object_size = OBJECT;
    c.upload_concurrency = CONCURRENCY;
    c.read_concurrency = CONCURRENCY;
    c.read_timeout = Duration::from_secs(30);
    // The whole run is handed over at once, as the raw side holds it all in memory too.
    c.max_pending = 2 << 30;
    c.flush_interval = Duration::from_secs(3600);
    c.sync_interval = Duration::ZERO;
    c
}

fn raw_client(s: &Server) -> Result<Arc<dyn ObjectStore>> {
    Ok(Arc::new(
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&s.bucket)
            .with_endpoint(&s.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id(&s.access_key)
            .with_secret_access_key(&s.secret_key)
            .build()
            .context("building the raw S3 client")?,
    ))
}

fn payload(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64).wrapping_mul(seed | 1) as u8)
        .collect()
}

/// Runs the object rows; none (with the reason on stderr) when no server can be had.
pub(crate) fn run(args: &TiersArgs, reps: usize) -> Result<Vec<Row>> {
    let Some(server) = server(args)? else {
        eprintln!(
            "object: skipped (no S3 server: install it with scripts/lib.sh's ensure_weed, or pass --s3-endpoint)"
        );
        return Ok(Vec::new());
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the raw client's runtime")?;
    let raw = raw_client(&server)?;
    let total: u64 = if args.quick { 32 << 20 } else { 512 << 20 };
    let mut rows = Vec::new();
    for bs in [256u64 << 10, 1 << 20, 4 << 20] {
        let n = (total / bs) as usize;
        let blocks: Vec<Vec<u8>> = (0..n).map(|i| payload(bs as usize, i as u64)).collect();
        let (mut put_k, mut put_r, mut get_k, mut get_r) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut lat_k, mut lat_r) = (Vec::new(), Vec::new());
        for rep in 0..reps {
            let prefix = format!("bench-{bs}-{rep}");
            let ns = Namespace::builder(format!("kvbench-{bs}-{rep}")).build();
            let keys: Vec<BlockKey> = (0..n as u64)
                .map(|i| BlockKey::new(ns, BlockHash::from_u64(i)))
                .collect();
            // Alternate which side goes first, so a drift of the machine favours neither.
            let ours_first = rep % 2 == 0;
            for side in [ours_first, !ours_first] {
                if side {
                    let tier = ObjectTier::open(tier_config(&server, &prefix))?;
                    let items: Vec<(BlockKey, &[u8])> = keys
                        .iter()
                        .zip(&blocks)
                        .map(|(k, b)| (*k, b.as_slice()))
                        .collect();
                    let t = Instant::now();
                    if tier.put_batch(&items).iter().any(|o| *o != PutOutcome::Stored) {
                        bail!("the object tier refused blocks (max_pending)");
                    }
                    if tier.flush(Duration::from_secs(300)) > 0 || tier.stats().stores != n as u64 {
                        bail!("object tier uploads failed: {:?}", tier.detail());
                    }
                    put_k.push(total as f64 / t.elapsed().as_secs_f64() / 1e9);
                    let (gbps, lat) = tier_reads(&tier, &keys, bs)?;
                    get_k.push(gbps);
                    lat_k.push(lat);
                } else {
                    let prefix = Path::from(format!("raw-{prefix}"));
                    let (put, get, lat) = rt.block_on(raw_run(&raw, &prefix, &blocks, bs))?;
                    put_r.push(put);
                    get_r.push(get);
                    lat_r.push(lat);
                }
            }
        }
        let base = "object_store S3 client";
        let par = format!("{CONCURRENCY} in flight");
        let (k, r, ratio) = paired(&put_k, &put_r);
        rows.push(Row::new(
            "object",
            "put",
            bs,
            par.clone(),
            k,
            base,
            r,
            ratio,
            format!("{} MiB objects", OBJECT >> 20),
        ));
        let (k, r, ratio) = paired(&get_k, &get_r);
        let note = format!(
            "one block per GET; p50 at 1 in flight {:.0} µs vs {:.0} µs",
            median(lat_k) * 1e6,
            median(lat_r) * 1e6
        );
        rows.push(Row::new("object", "get", bs, par, k, base, r, ratio, note));
    }
    Ok(rows)
}

/// Random single-block reads through the tier, `CONCURRENCY` threads at once (GB/s), and the
/// median latency of one read at a time (seconds). Each read is verified.
fn tier_reads(tier: &ObjectTier, keys: &[BlockKey], bs: u64) -> Result<(f64, f64)> {
    let order = shuffled(keys.len());
    let t = Instant::now();
    let ok = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for part in order.chunks(order.len().div_ceil(CONCURRENCY)) {
            let ok = &ok;
            s.spawn(move || {
                for &i in part {
                    let hit =
                        tier.get_batch(&keys[i..=i], Instant::now() + Duration::from_secs(30), |_, _| {});
                    ok.fetch_add(usize::from(hit[0]), std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let gbps = (keys.len() as u64 * bs) as f64 / t.elapsed().as_secs_f64() / 1e9;
    if ok.into_inner() != keys.len() {
        bail!("object tier reads missed");
    }
    let mut lat = Vec::new();
    for &i in order.iter().take(32) {
        let t = Instant::now();
        tier.get_batch(&keys[i..=i], Instant::now() + Duration::from_secs(30), |_, _| {});
        lat.push(t.elapsed().as_secs_f64());
    }
    Ok((gbps, median(lat)))
}

/// The same transfers with the raw client: the blocks packed into objects of the same size
/// (timed: the tier pays that copy too), uploaded `CONCURRENCY` at a time; then one ranged GET
/// per block.
async fn raw_run(
    raw: &Arc<dyn ObjectStore>,
    prefix: &Path,
    blocks: &[Vec<u8>],
    bs: u64,
) -> Result<(f64, f64, f64)> {
    let per_object = (OBJECT / bs).max(1) as usize;
    let total = (blocks.len() as u64 * bs) as f64;
    // Packing the blocks into objects is part of the transfer on both sides (the tier copies
    // each block into its segment the same way).
    let t = Instant::now();
    let objects: Vec<Vec<u8>> = blocks.chunks(per_object).map(|c| c.concat()).collect();
    let results: Vec<_> = futures::stream::iter(objects.into_iter().enumerate())
        .map(|(i, o)| {
            let raw = Arc::clone(raw);
            let path = prefix.clone().join(format!("{i}"));
            async move { raw.put(&path, o.into()).await }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    for r in results {
        r.context("raw put")?;
    }
    let put = total / t.elapsed().as_secs_f64() / 1e9;
    let order = shuffled(blocks.len());
    let range = |i: usize| {
        let (obj, at) = (i / per_object, (i % per_object) as u64 * bs);
        (prefix.clone().join(format!("{obj}")), at..at + bs)
    };
    let t = Instant::now();
    let results: Vec<_> = futures::stream::iter(order.iter().copied())
        .map(|i| {
            let raw = Arc::clone(raw);
            let (path, r) = range(i);
            async move { raw.get_range(&path, r).await }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    for r in results {
        r.context("raw get")?;
    }
    let get = total / t.elapsed().as_secs_f64() / 1e9;
    let mut lat = Vec::new();
    for &i in order.iter().take(32) {
        let (path, r) = range(i);
        let t = Instant::now();
        raw.get_range(&path, r).await.context("raw get")?;
        lat.push(t.elapsed().as_secs_f64());
    }
    Ok((put, get, median(lat)))
}

/// `0..n` in a fixed pseudo-random order (the same for both sides).
fn shuffled(n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

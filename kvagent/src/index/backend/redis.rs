//! The Redis (or Valkey) backend: several index replicas share one view.
//!
//! Layout, under a configurable prefix `P` (default `kvtier:`):
//!
//! - `P b:<scope>:<hash>` (hex): a hash whose fields are the sources holding the block, each
//!   valued `mask:generation` for a report or `mask:generation:expiry_ms` for a speculation
//!   (`mask`: bit 0 device, 1 host, 2 disk, 3 object). A key holding a report has no TTL
//!   (sources report a block once, and it counts until removed or cleared); a key holding
//!   only speculations expires with them. Fields of cleared sources are dropped when their
//!   block is next written, and by the sweep, which walks the keys a page at a time;
//! - `P gen`: source → generation. Clearing a source bumps it; entries of another generation
//!   no longer count (as in the memory backend, clearing never walks the blocks);
//! - `P seen`: source → last report (unix ms); `P aged`: the sources aged out;
//! - `P peers`: node agent source → its peer address;
//! - `P owner:<pod>`: the replica that follows the pod (a lease, renewed every second);
//!   `P seq:<pod>`: the last of its batches applied, from which a replica taking over goes on;
//! - `P epoch`: a token written by the first replica that finds it missing. When it vanishes
//!   (Redis restarted without its data), or the server's run id changes (a restart or a
//!   failover, which may have kept only an older copy), replicas make every source resync.
//!   Redis must not evict keys (`maxmemory-policy noeviction`, or a `volatile-*` policy).
//!
//! Writes are Lua scripts (one per event, atomic per event), reads pipelined `HGETALL`s in
//! chunks along the prompt, so a score costs a few round trips, not one per block. One Redis
//! or Valkey (or a primary with replicas) is supported; Redis Cluster is not (a script touches
//! keys of many slots).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvstore::index::{Event, Medium, TierWeights};
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Backend, BackendError, BackendStats, Candidate, PodScore, Result};
use crate::index::config::redact;

/// Settings of the Redis backend.
#[derive(Debug, Clone)]
pub(crate) struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://`).
    pub(crate) url: String,
    /// Prefix of every key.
    pub(crate) prefix: String,
    /// Bound of each command (connecting, answering).
    pub(crate) timeout: Duration,
    /// Per-medium weights.
    pub(crate) weights: TierWeights,
    /// How long a speculation counts.
    pub(crate) speculative_ttl: Duration,
}

/// SCAN pages (of about 2 000 keys) one sweep cleans.
const SWEEP_PAGES: usize = 16;

/// Blocks per pipelined read while scoring: one round trip for prompts up to 512 blocks (a
/// larger first read costs Redis less than another round trip).
const CHUNK: usize = 512;

const ADD: &str = r"
local gen = tonumber(redis.call('HGET', ARGV[1], ARGV[2]) or '0')
local bitv = tonumber(ARGV[3])
local exp = tonumber(ARGV[4])
local now = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
for _, key in ipairs(KEYS) do
  local mask, e = bitv, exp
  local left = redis.call('PTTL', key)
  local cur = redis.call('HGET', key, ARGV[2])
  if cur then
    local m, g, x = string.match(cur, '^(%d+):(%d+):?(%d*)$')
    m = tonumber(m); g = tonumber(g); x = tonumber(x) or 0
    if g == gen and (x == 0 or x > now) then
      if x ~= 0 and exp == 0 then
        mask, e = bitv, 0
      elseif x == 0 and exp ~= 0 then
        mask, e = m, 0
      else
        mask, e = bit.bor(m, bitv), math.max(x, exp)
      end
    end
  end
  local v = mask .. ':' .. gen
  if e ~= 0 then v = v .. ':' .. e end
  redis.call('HSET', key, ARGV[2], v)
  if exp == 0 then
    redis.call('PERSIST', key)
  elseif left == -2 or (left >= 0 and left < ttl) then
    redis.call('PEXPIRE', key, ttl)
  end
end
return #KEYS
";

const REMOVE: &str = r"
for _, key in ipairs(KEYS) do
  local cur = redis.call('HGET', key, ARGV[1])
  if cur then
    local m, g, x = string.match(cur, '^(%d+):(%d+):?(%d*)$')
    if x == '' then
      local left = bit.band(tonumber(m), bit.bnot(tonumber(ARGV[2])))
      if left == 0 then
        redis.call('HDEL', key, ARGV[1])
      else
        redis.call('HSET', key, ARGV[1], left .. ':' .. g)
      end
    end
  end
end
return #KEYS
";

/// Takes or renews the lease `KEYS[1]` for owner `ARGV[1]` for `ARGV[2]` ms.
const CLAIM: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Ages source `ARGV[1]` out if it has not reported since `ARGV[2]` (unix ms) and is not aged
/// out already: bumps its generation (`KEYS[2]`) and marks it (`KEYS[3]`).
const AGE: &str = r"
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if last >= tonumber(ARGV[2]) or redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then
  return 0
end
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('SADD', KEYS[3], ARGV[1])
return 1
";

/// Drops the fields of `KEYS` that no longer count; returns how many keys went.
const SWEEP: &str = r"
local gens = {}
local now = tonumber(ARGV[2])
local gone = 0
for _, key in ipairs(KEYS) do
  local fields = redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    local src, v = fields[i], fields[i + 1]
    if gens[src] == nil then gens[src] = tonumber(redis.call('HGET', ARGV[1], src) or '0') end
    local m, g, x = string.match(v, '^(%d+):(%d+):?(%d*)$')
    x = tonumber(x) or 0
    if tonumber(g) ~= gens[src] or (x ~= 0 and x <= now) then
      redis.call('HDEL', key, src)
    end
  end
  if redis.call('EXISTS', key) == 0 then gone = gone + 1 end
end
return gone
";

fn medium_bit(m: Medium) -> u8 {
    1 << m as u8
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One source's hold on a block, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    mask: u8,
    generation: u64,
    /// Unix ms for a speculation, 0 for a report.
    expires: u64,
}

impl Entry {
    fn parse(v: &str) -> Option<Self> {
        let mut parts = v.split(':');
        let mask = parts.next()?.parse().ok()?;
        let generation = parts.next()?.parse().ok()?;
        let expires = match parts.next() {
            Some(x) => x.parse().ok()?,
            None => 0,
        };
        Some(Self {
            mask,
            generation,
            expires,
        })
    }

    fn counts(&self, current: u64, now: u64) -> bool {
        self.generation == current && (self.expires == 0 || self.expires > now)
    }
}

/// The holders of one block: source -> stored value.
type Holders = HashMap<String, String>;

/// The score walk over blocks read so far (the same rules as the memory backend's): extends
/// `reach`/`weighted` and says whether any candidate extended its run through every block.
fn walk(
    blocks: &[Holders],
    first: usize,
    gens: &HashMap<String, u64>,
    candidates: &[Candidate],
    weights: &TierWeights,
    now: u64,
    out: &mut [PodScore],
) -> bool {
    let mask_of = |holders: &Holders, source: &str| -> u8 {
        holders
            .get(source)
            .and_then(|v| Entry::parse(v))
            .filter(|e| e.counts(gens.get(source).copied().unwrap_or(0), now))
            .map_or(0, |e| e.mask)
    };
    for (i, holders) in blocks.iter().enumerate() {
        let block = first + i;
        let mut any = false;
        for (c, score) in candidates.iter().zip(out.iter_mut()) {
            if score.blocks != block {
                continue;
            }
            // An agent serves its tiers, never another process's device memory.
            let mask = mask_of(holders, &c.pod)
                | c.agent
                    .as_deref()
                    .map_or(0, |a| mask_of(holders, a) & !medium_bit(Medium::Device));
            if mask != 0 {
                score.blocks = block + 1;
                score.weighted += Medium::ALL
                    .iter()
                    .filter(|m| mask & medium_bit(**m) != 0)
                    .map(|m| weight(weights, *m))
                    .fold(0.0, f64::max);
                any = true;
            }
        }
        if !any {
            return false;
        }
    }
    true
}

fn weight(w: &TierWeights, m: Medium) -> f64 {
    match m {
        Medium::Device => w.device,
        Medium::Host => w.host,
        Medium::Disk => w.disk,
        Medium::Object => w.object,
    }
}

/// The Redis backend (see the module documentation).
pub(crate) struct RedisBackend {
    conn: ConnectionManager,
    cfg: RedisSettings,
    add: redis::Script,
    remove: redis::Script,
    sweep: redis::Script,
    claim: redis::Script,
    age: redis::Script,
    /// The epoch token this replica last saw (None before the first check).
    epoch: Mutex<Option<String>>,
    /// Where the incremental sweep's SCAN goes on.
    cursor: Mutex<u64>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("url", &redact(&self.cfg.url))
            .field("prefix", &self.cfg.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// A backend that connects on first use and reconnects by itself: the index starts, and
    /// answers with clear errors, while Redis is down.
    pub(crate) fn new(cfg: RedisSettings) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let client = redis::Client::open(cfg.url.as_str())
            .with_context(|| format!("`redis.url` {:?}", redact(&cfg.url)))?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, manager)
            .context("setting up the Redis connection")?;
        Ok(Self {
            conn,
            cfg,
            add: redis::Script::new(ADD),
            remove: redis::Script::new(REMOVE),
            sweep: redis::Script::new(SWEEP),
            claim: redis::Script::new(CLAIM),
            age: redis::Script::new(AGE),
            epoch: Mutex::new(None),
            cursor: Mutex::new(0),
        })
    }

    fn key(&self, scope: u64, hash: u64) -> String {
        format!("{}b:{scope:016x}:{hash:016x}", self.cfg.prefix)
    }

    fn meta(&self, name: &str) -> String {
        format!("{}{name}", self.cfg.prefix)
    }

    fn fail(&self, e: &redis::RedisError) -> BackendError {
        BackendError::Unavailable {
            backend: "redis",
            message: format!("{} ({})", e, redact(&self.cfg.url)),
        }
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Adds `source`'s hold on the blocks: a report (`expires` 0) or a speculation until
    /// `expires` (unix ms).
    async fn add(&self, source: &str, scope: u64, hashes: &[u64], bit: u8, expires: u64) -> Result<()> {
        // A key that holds only speculations lives as long as they count (plus a second for
        // clock differences between replicas).
        let spec_ttl = self.cfg.speculative_ttl.as_millis() as u64 + 1000;
        let mut conn = self.conn();
        for chunk in hashes.chunks(1024) {
            let mut inv = self.add.prepare_invoke();
            for &h in chunk {
                inv.key(self.key(scope, h));
            }
            inv.arg(self.meta("gen"))
                .arg(source)
                .arg(bit)
                .arg(expires)
                .arg(now_ms())
                .arg(spec_ttl);
            inv.invoke_async::<i64>(&mut conn)
                .await
                .map_err(|e| self.fail(&e))?;
        }
        Ok(())
    }

    async fn touch(&self, source: &str) -> Result<()> {
        redis::pipe()
            .hset(self.meta("seen"), source, now_ms())
            .ignore()
            .srem(self.meta("aged"), source)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(|e| self.fail(&e))
    }

    async fn generations(&self) -> Result<HashMap<String, u64>> {
        redis::cmd("HGETALL")
            .arg(self.meta("gen"))
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.fail(&e))
    }

    async fn read_blocks(&self, scope: u64, hashes: &[u64]) -> Result<Vec<Holders>> {
        let mut pipe = redis::pipe();
        for &h in hashes {
            pipe.cmd("HGETALL").arg(self.key(scope, h));
        }
        pipe.query_async(&mut self.conn())
            .await
            .map_err(|e| self.fail(&e))
    }
}

#[tonic::async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn apply(&self, source: &str, events: &[Event]) -> Result<()> {
        for e in events {
            match e {
                Event::Stored {
                    scope,
                    hashes,
                    medium,
                } => self.add(source, *scope, hashes, medium_bit(*medium), 0).await?,
                Event::Removed {
                    scope,
                    hashes,
                    medium,
                } => {
                    let mut conn = self.conn();
                    for chunk in hashes.chunks(1024) {
                        let mut inv = self.remove.prepare_invoke();
                        for &h in chunk {
                            inv.key(self.key(*scope, h));
                        }
                        inv.arg(source).arg(medium_bit(*medium));
                        inv.invoke_async::<i64>(&mut conn)
                            .await
                            .map_err(|e| self.fail(&e))?;
                    }
                }
                Event::Cleared => {
                    self.clear(source).await?;
                }
            }
        }
        self.touch(source).await
    }

    async fn keep_alive(&self, source: &str) -> Result<()> {
        self.touch(source).await
    }

    async fn set_peer_address(&self, source: &str, address: &str) -> Result<()> {
        let _: () = redis::cmd("HSET")
            .arg(self.meta("peers"))
            .arg(source)
            .arg(address)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.fail(&e))?;
        Ok(())
    }

    async fn peer_addresses(&self, sources: &[String]) -> Result<Vec<Option<String>>> {
        if sources.is_empty() {
            return Ok(Vec::new());
        }
        redis::cmd("HMGET")
            .arg(self.meta("peers"))
            .arg(sources)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.fail(&e))
    }

    async fn speculate(&self, pod: &str, scope: u64, hashes: &[u64]) -> Result<()> {
        let ttl = self.cfg.speculative_ttl.as_millis() as u64;
        self.add(
            pod,
            scope,
            hashes,
            medium_bit(Medium::Device),
            now_ms() + ttl.max(1),
        )
        .await
    }

    async fn score(&self, scope: u64, hashes: &[u64], candidates: &[Candidate]) -> Result<Vec<PodScore>> {
        let mut out = vec![
            PodScore {
                blocks: 0,
                weighted: 0.0
            };
            candidates.len()
        ];
        if candidates.is_empty() {
            return Ok(out);
        }
        let gens = self.generations().await?;
        let now = now_ms();
        for (i, chunk) in hashes.chunks(CHUNK).enumerate() {
            let blocks = self.read_blocks(scope, chunk).await?;
            if !walk(
                &blocks,
                i * CHUNK,
                &gens,
                candidates,
                &self.cfg.weights,
                now,
                &mut out,
            ) {
                break;
            }
        }
        Ok(out)
    }

    async fn lookup(&self, scope: u64, hashes: &[u64]) -> Result<Vec<Vec<(String, Vec<Medium>)>>> {
        let gens = self.generations().await?;
        let now = now_ms();
        let mut out = Vec::new();
        for chunk in hashes.chunks(CHUNK) {
            for holders in self.read_blocks(scope, chunk).await? {
                let mut found: Vec<(String, Vec<Medium>)> = holders
                    .iter()
                    .filter_map(|(source, v)| {
                        let e = Entry::parse(v)?;
                        e.counts(gens.get(source).copied().unwrap_or(0), now).then(|| {
                            let media = Medium::ALL
                                .into_iter()
                                .filter(|m| e.mask & medium_bit(*m) != 0)
                                .collect();
                            (source.clone(), media)
                        })
                    })
                    .collect();
                if found.is_empty() {
                    return Ok(out);
                }
                found.sort();
                out.push(found);
            }
        }
        Ok(out)
    }

    async fn clear(&self, source: &str) -> Result<bool> {
        let (known, _): (bool, i64) = redis::pipe()
            .hexists(self.meta("seen"), source)
            .hincr(self.meta("gen"), source, 1)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.fail(&e))?;
        Ok(known)
    }

    async fn age_out(&self, ttl: Duration) -> Result<Vec<String>> {
        let (seen, aged): (HashMap<String, u64>, Vec<String>) = redis::pipe()
            .hgetall(self.meta("seen"))
            .smembers(self.meta("aged"))
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.fail(&e))?;
        let now = now_ms();
        let mut gone = Vec::new();
        for (source, last) in seen {
            if aged.contains(&source) || now.saturating_sub(last) < ttl.as_millis() as u64 {
                continue;
            }
            // Checked again inside the script: a report that arrived meanwhile (through any
            // replica) keeps the source.
            let aged: i64 = self
                .age
                .key(self.meta("seen"))
                .key(self.meta("gen"))
                .key(self.meta("aged"))
                .arg(&source)
                .arg(now.saturating_sub(ttl.as_millis() as u64))
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| self.fail(&e))?;
            if aged == 1 {
                gone.push(source);
            }
        }
        Ok(gone)
    }

    async fn sweep(&self) -> Result<usize> {
        // Up to SWEEP_PAGES pages of the keyspace per call, each cleaned by one script: the
        // whole keyspace is walked every few housekeeping ticks without a long script.
        let mut gone = 0usize;
        for _ in 0..SWEEP_PAGES {
            let cursor = *self.cursor.lock();
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}b:*", self.cfg.prefix))
                .arg("COUNT")
                .arg(2000)
                .query_async(&mut self.conn())
                .await
                .map_err(|e| self.fail(&e))?;
            *self.cursor.lock() = next;
            if !keys.is_empty() {
                let mut inv = self.sweep.prepare_invoke();
                for k in &keys {
                    inv.key(k);
                }
                inv.arg(self.meta("gen")).arg(now_ms());
                let n: i64 = inv
                    .invoke_async(&mut self.conn())
                    .await
                    .map_err(|e| self.fail(&e))?;
                gone += usize::try_from(n).unwrap_or(0);
            }
            if next == 0 {
                break;
            }
        }
        Ok(gone)
    }

    async fn stats(&self) -> Result<BackendStats> {
        let (size, seen): (u64, HashMap<String, u64>) = redis::pipe()
            .cmd("DBSIZE")
            .hgetall(self.meta("seen"))
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.fail(&e))?;
        let now = now_ms();
        let mut sources: Vec<(String, f64)> = seen
            .into_iter()
            .map(|(s, last)| (s, now.saturating_sub(last) as f64 / 1000.0))
            .collect();
        sources.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(BackendStats {
            // Keys of the database: the blocks, and a few bookkeeping keys (four, and two per
            // followed pod). Give the index a database of its own.
            blocks: size.saturating_sub(4),
            sources,
        })
    }

    async fn claim(&self, pod: &str, owner: &str, ttl: Duration) -> Result<bool> {
        let granted: i64 = self
            .claim
            .key(self.meta(&format!("owner:{pod}")))
            .arg(owner)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| self.fail(&e))?;
        Ok(granted == 1)
    }

    async fn applied_seq(&self, pod: &str) -> Result<Option<u64>> {
        redis::cmd("GET")
            .arg(self.meta(&format!("seq:{pod}")))
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.fail(&e))
    }

    async fn record_seq(&self, pod: &str, seq: u64) -> Result<()> {
        redis::cmd("SET")
            .arg(self.meta(&format!("seq:{pod}")))
            .arg(seq)
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(|e| self.fail(&e))
    }

    async fn lost_state(&self) -> Result<bool> {
        let key = self.meta("epoch");
        let mine = format!("{:016x}", now_ms() ^ u64::from(std::process::id()) << 40);
        // Written only if missing, then read back (whoever wrote it first wins); and the
        // server's run id, which changes on every restart and failover, even one that kept
        // (or restored an older copy of) the data.
        let (token, info): (String, String) = redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg(&mine)
            .arg("NX")
            .ignore()
            .get(&key)
            .cmd("INFO")
            .arg("server")
            .query_async(&mut self.conn())
            .await
            .map_err(|e| self.fail(&e))?;
        let run_id = info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let current = format!("{token}/{run_id}");
        let mut seen = self.epoch.lock();
        let lost = seen.as_ref().is_some_and(|s| *s != current);
        *seen = Some(current);
        Ok(lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holders(entries: &[(&str, &str)]) -> Holders {
        entries
            .iter()
            .map(|(s, v)| ((*s).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn entries_parse_and_count_by_generation_and_expiry() {
        assert_eq!(
            Entry::parse("3:7"),
            Some(Entry {
                mask: 3,
                generation: 7,
                expires: 0
            })
        );
        let spec = Entry::parse("1:0:5000").expect("a speculation");
        assert!(spec.counts(0, 4999) && !spec.counts(0, 5000) && !spec.counts(1, 0));
        assert_eq!(Entry::parse("x:1"), None);
        assert_eq!(Entry::parse("1"), None);
    }

    #[test]
    fn the_walk_scores_pods_and_their_agents_like_the_memory_backend() {
        let cands = vec![
            Candidate {
                pod: "a".into(),
                agent: Some("agent/n1".into()),
            },
            Candidate {
                pod: "b".into(),
                agent: None,
            },
        ];
        let gens: HashMap<String, u64> = [("b".to_owned(), 2)].into_iter().collect();
        let blocks = vec![
            // a on device; b's entry of an old generation does not count.
            holders(&[("a", "1:0"), ("b", "1:1")]),
            // only a's agent, on host.
            holders(&[("agent/n1", "2:0")]),
            // a's agent on device only: an agent never serves device memory.
            holders(&[("agent/n1", "1:0")]),
        ];
        let mut out = vec![
            PodScore {
                blocks: 0,
                weighted: 0.0
            };
            2
        ];
        let w = TierWeights::default();
        assert!(!walk(&blocks, 0, &gens, &cands, &w, 0, &mut out));
        assert_eq!(out[0].blocks, 2);
        assert!((out[0].weighted - (w.device + w.host)).abs() < 1e-12);
        assert_eq!(out[1].blocks, 0);
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redact("redis://user:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
    }
}

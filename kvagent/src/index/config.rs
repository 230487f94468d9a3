//! Configuration of `kvagent index`: built-in defaults, overridden by a TOML file
//! (`--config`, `$KVTIER_INDEX_CONFIG`, or `/etc/kvtier/index.toml` when present), overridden by
//! `KVTIER_INDEX_*` environment variables, overridden by flags.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::config::{Layers, LogFormat, ServiceFlags, layered};

/// Where the TOML file is looked for when neither `--config` nor `KVTIER_INDEX_CONFIG` names one.
pub const DEFAULT_INDEX_CONFIG_PATH: &str = "/etc/kvtier/index.toml";
/// Prefix of the variables that override the index's keys.
pub const ENV_PREFIX: &str = "KVTIER_INDEX_";

/// Effective configuration of `kvagent index`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexConfig {
    /// Address of the gRPC service (Score, Lookup, PublishEvents, health, reflection).
    pub grpc_addr: SocketAddr,
    /// Address for /metrics, /healthz and /readyz; "" disables.
    pub http_addr: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter (tracing's EnvFilter syntax).
    pub log_level: String,
    /// Where the entries live: `memory` (this process; the default) or `redis` (one Redis or
    /// Valkey shared by several index replicas).
    pub backend: BackendKind,
    /// The Redis backend.
    pub redis: RedisSection,
    /// Shards of the block map (memory backend).
    pub shards: usize,
    /// How long the best pod of a `Score` with `speculate` counts as holding the prompt.
    pub speculative_ttl_ms: u64,
    /// Sources that publish through gRPC (node agents) and stay silent this long are forgotten;
    /// agents send a heartbeat batch more often than this.
    pub source_ttl_s: u64,
    /// Defaults for prompts scored by token ids.
    pub hash: HashDefaults,
    /// Per-medium weights of a reusable block.
    pub weights: Weights,
    /// The engine pods whose vLLM KV events the index ingests (a static list; a discovery of
    /// pods from Kubernetes would fill the same list).
    pub pods: Vec<PodConfig>,
}

/// Where the index keeps its entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// This process's memory.
    Memory,
    /// One Redis or Valkey shared by several index replicas.
    Redis,
}

/// `[redis]`: the Redis backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSection {
    /// `redis://[user:password@]host:port[/db]` or `rediss://...`; give the index a database
    /// of its own.
    pub url: String,
    /// Prefix of every key.
    pub prefix: String,
    /// Bound of each command (connecting, answering), in milliseconds.
    pub timeout_ms: u64,
}

impl Default for RedisSection {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/0".into(),
            prefix: "kvtier:".into(),
            timeout_ms: 500,
        }
    }
}

/// How engines hash prompts, unless a request says otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HashDefaults {
    /// vLLM's --block-size.
    pub block_size: u32,
    /// vLLM's --prefix-caching-hash-algo (sha256_cbor or xxhash_cbor).
    pub algo: String,
    /// The engines' PYTHONHASHSEED, if set (`KVTIER_INDEX_HASH__SEED=0` is read as text).
    #[serde(default, deserialize_with = "crate::config::optional_text")]
    pub seed: Option<String>,
}

impl Default for HashDefaults {
    fn default() -> Self {
        Self {
            block_size: 16,
            algo: "sha256_cbor".into(),
            seed: None,
        }
    }
}

/// Weights of a reusable block by where it is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    /// In the pod's own KV cache.
    pub device: f64,
    /// In its node agent's host memory.
    pub host: f64,
    /// On its node agent's disk.
    pub disk: f64,
    /// In the object store.
    pub object: f64,
}

impl Default for Weights {
    fn default() -> Self {
        let w = kvstore::index::TierWeights::default();
        Self {
            device: w.device,
            host: w.host,
            disk: w.disk,
            object: w.object,
        }
    }
}

/// One engine pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodConfig {
    /// Its name in Score requests and answers (a pod name, or the address a router uses).
    pub name: String,
    /// The model it serves.
    pub model: String,
    /// Its vLLM KV-event publisher, e.g. `tcp://10.0.0.5:5557` (vLLM binds; the index connects).
    pub events: String,
    /// Its replay endpoint (`replay_endpoint` of vLLM's KVEventsConfig), for filling gaps.
    #[serde(default)]
    pub replay: Option<String>,
    /// The ZMQ topic it publishes on (vLLM's `topic`, "" by default).
    #[serde(default)]
    pub topic: String,
    /// The node it runs on: blocks of that node's agent count for it.
    #[serde(default)]
    pub node: Option<String>,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([0, 0, 0, 0], 9480)),
            http_addr: "0.0.0.0:9481".into(),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            backend: BackendKind::Memory,
            redis: RedisSection::default(),
            shards: 64,
            speculative_ttl_ms: 2000,
            source_ttl_s: 60,
            hash: HashDefaults::default(),
            weights: Weights::default(),
            pods: Vec::new(),
        }
    }
}

/// Flags of `kvagent index` that override configuration keys.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct IndexFlags {
    /// Address of the gRPC service (`grpc_addr`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_addr: Option<SocketAddr>,
    /// `http_addr`, `log_format`, `log_level`.
    #[command(flatten)]
    #[serde(flatten)]
    pub service: ServiceFlags,
    /// An engine pod: `NAME=MODEL@EVENTS[,replay=ENDPOINT][,node=NODE][,topic=TOPIC]`; repeat for
    /// several (added to `pods`).
    #[arg(long = "pod", value_name = "SPEC")]
    #[serde(skip)]
    pub pods: Vec<String>,
    /// Where the entries live (`backend`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
    /// The Redis URL (`redis.url`).
    #[arg(long, value_name = "URL")]
    #[serde(skip)]
    pub redis_url: Option<String>,
}

/// A Redis URL without its password, for logs and printed configurations.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// Parses a `--pod` spec.
pub fn parse_pod(spec: &str) -> anyhow::Result<PodConfig> {
    let (name, rest) = spec
        .split_once('=')
        .context("--pod: expected NAME=MODEL@EVENTS")?;
    let (model, rest) = rest
        .split_once('@')
        .context("--pod: expected NAME=MODEL@EVENTS")?;
    let mut parts = rest.split(',');
    let events = parts.next().unwrap_or_default();
    let mut pod = PodConfig {
        name: name.into(),
        model: model.into(),
        events: events.into(),
        replay: None,
        topic: String::new(),
        node: None,
    };
    for part in parts {
        match part.split_once('=') {
            Some(("replay", v)) => pod.replay = Some(v.into()),
            Some(("node", v)) => pod.node = Some(v.into()),
            Some(("topic", v)) => pod.topic = v.into(),
            _ => bail!("--pod {spec:?}: unknown option {part:?} (replay=, node=, topic=)"),
        }
    }
    Ok(pod)
}

/// Resolves the configuration of `kvagent index`.
pub fn load(file: Option<&Path>, flags: &IndexFlags) -> anyhow::Result<IndexConfig> {
    let mut overrides = figment::value::Value::serialize(flags)
        .context("encoding flags")?
        .into_dict()
        .unwrap_or_default();
    if let Some(url) = &flags.redis_url {
        let mut redis = figment::value::Dict::new();
        redis.insert("url".into(), url.clone().into());
        overrides.insert("redis".into(), redis.into());
    }
    let mut cfg: IndexConfig = layered(
        IndexConfig::default(),
        Layers {
            file,
            file_env: "KVTIER_INDEX_CONFIG",
            default_path: DEFAULT_INDEX_CONFIG_PATH,
            env_prefix: ENV_PREFIX,
            others: &[],
        },
        overrides,
    )?;
    for spec in &flags.pods {
        cfg.pods.push(parse_pod(spec)?);
    }
    cfg.validate()?;
    Ok(cfg)
}

impl IndexConfig {
    /// Refuses values that parse but cannot work, naming the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=1 << 16).contains(&self.shards) {
            bail!("`shards` must be between 1 and 65536");
        }
        if self.speculative_ttl_ms > 3_600_000 {
            bail!("`speculative_ttl_ms` must be at most an hour (3600000)");
        }
        if self.source_ttl_s == 0 {
            bail!("`source_ttl_s` must be positive");
        }
        if self.backend == BackendKind::Redis {
            if !(self.redis.url.starts_with("redis://") || self.redis.url.starts_with("rediss://")) {
                bail!("`redis.url` must start with redis:// or rediss://");
            }
            if self.redis.timeout_ms == 0 {
                bail!("`redis.timeout_ms` must be positive");
            }
        }
        let w = self.weights;
        for (key, v) in [
            ("device", w.device),
            ("host", w.host),
            ("disk", w.disk),
            ("object", w.object),
        ] {
            if !v.is_finite() || v < 0.0 {
                bail!("`weights.{key}` must be a finite number ≥ 0, not {v}");
            }
        }
        kvstore::vllm::BlockHasher::new(
            self.hash.algo.parse().context("`hash.algo`")?,
            self.hash.block_size as usize,
            self.hash.seed.as_deref(),
        )
        .context("`hash`")?;
        let mut names = std::collections::HashSet::new();
        for pod in &self.pods {
            if !names.insert(&pod.name) {
                bail!("`pods`: {:?} is listed twice", pod.name);
            }
            for endpoint in std::iter::once(&pod.events).chain(&pod.replay) {
                if !endpoint.starts_with("tcp://") {
                    bail!(
                        "`pods`: {:?}: endpoint {endpoint:?} is not tcp://HOST:PORT",
                        pod.name
                    );
                }
            }
        }
        Ok(())
    }

    /// The configuration as TOML, the Redis password left out.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        let mut shown = self.clone();
        shown.redis.url = redact(&shown.redis.url);
        toml::to_string(&shown).context("encoding the configuration")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_specs_parse_and_bad_ones_say_why() {
        let pod = parse_pod("p1=llama@tcp://10.0.0.1:5557,replay=tcp://10.0.0.1:5558,node=n1").unwrap();
        assert_eq!(pod.name, "p1");
        assert_eq!(pod.model, "llama");
        assert_eq!(pod.events, "tcp://10.0.0.1:5557");
        assert_eq!(pod.replay.as_deref(), Some("tcp://10.0.0.1:5558"));
        assert_eq!(pod.node.as_deref(), Some("n1"));
        assert!(parse_pod("p1").is_err());
        assert!(
            parse_pod("p1=m@tcp://x:1,colour=red")
                .unwrap_err()
                .to_string()
                .contains("colour")
        );
    }

    #[test]
    fn defaults_are_valid_and_mistakes_are_refused() {
        IndexConfig::default().validate().unwrap();
        let mut cfg = IndexConfig::default();
        cfg.hash.algo = "sha256".into();
        assert!(format!("{:#}", cfg.validate().unwrap_err()).contains("sha256_cbor"));
        let cfg = IndexConfig {
            pods: vec![parse_pod("a=m@ipc:///x").unwrap()],
            ..IndexConfig::default()
        };
        assert!(cfg.validate().unwrap_err().to_string().contains("tcp://"));
    }

    /// vLLM's hash seed is PYTHONHASHSEED, digits that figment reads from a variable as a
    /// number.
    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment's Jail fixes the closure's error type"
    )]
    fn a_hash_seed_of_digits_comes_from_the_environment_as_text() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("KVTIER_INDEX_HASH__SEED", "0");
            let cfg = load(None, &IndexFlags::default()).unwrap();
            assert_eq!(cfg.hash.seed.as_deref(), Some("0"));
            jail.set_env("KVTIER_INDEX_HASH__SEED", "0042");
            let cfg = load(None, &IndexFlags::default()).unwrap();
            assert_eq!(cfg.hash.seed.as_deref(), Some("0042"));
            Ok(())
        });
    }
}

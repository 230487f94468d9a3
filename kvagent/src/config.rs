//! Configuration of `kvagent node`: built-in defaults, overridden by a TOML file, overridden by
//! `KVTIER_*` environment variables, overridden by flags. Unknown keys and invalid values are
//! refused at start with a message naming the key. `docs/configuration.md` lists every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytesize::ByteSize;
use figment::Figment;
use figment::providers::{Env, Format as _, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Where the TOML file is looked for when neither `--config` nor `KVTIER_CONFIG` names one.
/// Missing is fine: the defaults run without any file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kvtier/agent.toml";

/// Prefix of the environment variables that override the file. Nested keys use a double
/// underscore: `KVTIER_HOST__SIZE=8GiB` sets `host.size`.
pub const ENV_PREFIX: &str = "KVTIER_";

/// Effective configuration of `kvagent node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Path of the local socket engines connect to.
    pub socket: PathBuf,
    /// Permission bits of the socket, in octal (`"0660"`: owner and group). Also accepted as
    /// a number whose digits are read as octal (`660`), as environment variables arrive.
    #[serde(deserialize_with = "octal_digits")]
    pub socket_mode: String,
    /// Group id given to the socket, so engine pods running as another user can connect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_gid: Option<u32>,
    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz`; empty disables it.
    pub http_addr: String,
    /// Most engine connections at once; more are refused with a clear error.
    pub max_clients: u32,
    /// Microseconds a connection polls for the next call before sleeping (0: never polls).
    /// Polling saves the scheduler's wake-up latency on bursts of calls, at a bounded CPU cost.
    pub poll_us: u32,
    /// Deadline of a call whose client sent none, in milliseconds.
    pub default_deadline_ms: u32,
    /// Longest wait for in-flight calls on SIGTERM before exiting anyway, in milliseconds.
    pub shutdown_timeout_ms: u32,
    /// `text` (human) or `json` (one object per line, for log collectors).
    pub log_format: LogFormat,
    /// A `tracing` filter such as `info` or `kvagent=debug,info`.
    pub log_level: String,
    /// The shared host-memory arena.
    pub host: HostSection,
    /// The local disk tier.
    pub disk: DiskSection,
    /// Reporting the tiers to the cluster index.
    pub publish: PublishSection,
    /// Transfers with other nodes' agents.
    pub peer: PeerSection,
    /// Pulling prefixes other nodes' agents hold.
    pub reuse: ReuseSection,
    /// The object-store (S3) tier shared between nodes.
    pub object: ObjectSection,
}

/// `[object]`: the S3-compatible object tier, below disk (or below host when there is no disk
/// tier). Agents with the same `url` share blocks through it. See `docs/object-store.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectSection {
    /// Whether the tier exists (off by default: it needs a bucket).
    pub enabled: bool,
    /// `s3://bucket/prefix` (also `file:///dir` for a shared file system).
    pub url: String,
    /// Endpoint of an S3-compatible store (`http://minio:9000`); empty: `AWS_ENDPOINT_URL_S3`,
    /// `AWS_ENDPOINT_URL` or `AWS_ENDPOINT`, else AWS.
    pub endpoint: String,
    /// Region; empty: `AWS_REGION`, `AWS_DEFAULT_REGION`, the credentials profile's, else
    /// `us-east-1`.
    pub region: String,
    /// Allows plain HTTP; unset: `AWS_ALLOW_HTTP`, else allowed when the endpoint starts with
    /// `http://`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_http: Option<bool>,
    /// Virtual-hosted-style requests (`bucket.host`) instead of path style.
    pub virtual_hosted_style: bool,
    /// Access key; empty: `AWS_ACCESS_KEY_ID`, the credentials file, or the pod's role (web
    /// identity, EKS pod identity, instance metadata).
    #[serde(deserialize_with = "text")]
    pub access_key_id: String,
    /// Secret key (prefer `secret_access_key_file` or `AWS_SECRET_ACCESS_KEY`). Hidden by
    /// `--print-config`.
    #[serde(deserialize_with = "text")]
    pub secret_access_key: String,
    /// File holding the secret key (a mounted Kubernetes Secret).
    pub secret_access_key_file: PathBuf,
    /// Session token of temporary credentials.
    #[serde(deserialize_with = "text")]
    pub session_token: String,
    /// Profile of the AWS credentials file; empty: `AWS_PROFILE`, else `default`.
    pub profile: String,
    /// Writes index objects with `If-None-Match: *` (off for stores without conditional puts).
    pub conditional_put: bool,
    /// Blocks are packed into objects of about this size.
    pub target_object_size: ByteSize,
    /// Part size of multipart uploads (at least 5 MiB); segments up to this size go up in one
    /// PUT, which costs the store less than an upload of parts.
    pub part_size: ByteSize,
    /// A partly filled object is uploaded after this many milliseconds.
    pub flush_interval_ms: u32,
    /// Bytes waiting for upload beyond which new blocks are not stored there.
    pub max_pending: ByteSize,
    /// Uploads in flight (1–64).
    pub upload_concurrency: u32,
    /// Reads in flight (1–64).
    pub read_concurrency: u32,
    /// TCP connect timeout, in milliseconds.
    pub connect_timeout_ms: u32,
    /// Longest a read may take, in milliseconds (also bounded by the engine call's deadline).
    pub read_timeout_ms: u32,
    /// Longest one upload request may take, in milliseconds.
    pub request_timeout_ms: u32,
    /// Retries of a failed upload request.
    pub max_retries: u32,
    /// First retry delay, in milliseconds (doubling).
    pub retry_backoff_ms: u32,
    /// Longest retry delay, in milliseconds.
    pub retry_max_backoff_ms: u32,
    /// An upload gives up after this many milliseconds of retrying.
    pub retry_timeout_ms: u32,
    /// Write-through: blocks committed in a batch of at least this many blocks (a prompt's
    /// prefix saved at once) are also written to the object tier at once, so other nodes can
    /// reuse them before they are evicted here. 0: off (blocks arrive only by demotion).
    pub write_through_min_blocks: u32,
    /// How often other agents' blocks are learned from the bucket, in milliseconds; 0: never.
    pub sync_interval_ms: u32,
    /// How long the first lookup of a namespace (model, adapter, tenant) waits for its first
    /// sync, in milliseconds (once per namespace).
    pub lookup_sync_wait_ms: u32,
    /// Most blocks remembered (own and other agents'), about 150 bytes of memory each.
    pub max_catalog_blocks: u64,
    /// Threads of the tier's I/O runtime.
    pub threads: u32,
}

impl Default for ObjectSection {
    fn default() -> Self {
        Self {
            enabled: false,
            url: String::new(),
            endpoint: String::new(),
            region: String::new(),
            allow_http: None,
            virtual_hosted_style: false,
            access_key_id: String::new(),
            secret_access_key: String::new(),
            secret_access_key_file: PathBuf::new(),
            session_token: String::new(),
            profile: String::new(),
            conditional_put: true,
            target_object_size: ByteSize::mib(32),
            part_size: ByteSize::mib(64),
            flush_interval_ms: 1000,
            max_pending: ByteSize::mib(512),
            upload_concurrency: 4,
            read_concurrency: 16,
            connect_timeout_ms: 1000,
            read_timeout_ms: 2000,
            request_timeout_ms: 30_000,
            max_retries: 3,
            retry_backoff_ms: 100,
            retry_max_backoff_ms: 5000,
            retry_timeout_ms: 30_000,
            write_through_min_blocks: 0,
            sync_interval_ms: 2000,
            lookup_sync_wait_ms: 500,
            max_catalog_blocks: 4_000_000,
            threads: 2,
        }
    }
}

impl ObjectSection {
    /// The tier's settings; reads `secret_access_key_file`.
    pub fn tier_config(&self) -> anyhow::Result<kvstore::ObjectTierConfig> {
        let ms = |v: u32| Duration::from_millis(u64::from(v));
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let mut c = kvstore::ObjectTierConfig::new(self.url.clone());
        c.endpoint = nonempty(&self.endpoint);
        c.region = nonempty(&self.region);
        c.allow_http = self.allow_http;
        c.virtual_hosted_style = self.virtual_hosted_style;
        c.profile = nonempty(&self.profile);
        let secret = if self.secret_access_key_file.as_os_str().is_empty() {
            self.secret_access_key.clone()
        } else {
            std::fs::read_to_string(&self.secret_access_key_file)
                .with_context(|| {
                    format!(
                        "reading `object.secret_access_key_file` {}",
                        self.secret_access_key_file.display()
                    )
                })?
                .trim()
                .to_owned()
        };
        // One half of a key pair given here pairs with the other half from the environment.
        let key_id = if self.access_key_id.is_empty() && !secret.is_empty() {
            std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default()
        } else {
            self.access_key_id.clone()
        };
        let secret = if secret.is_empty() && !self.access_key_id.is_empty() {
            std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default()
        } else {
            secret
        };
        if key_id.is_empty() != secret.is_empty() {
            bail!(
                "invalid configuration `object.access_key_id`/`object.secret_access_key(_file)`: \
                 one is set without the other (the key id may also come from AWS_ACCESS_KEY_ID)"
            );
        }
        if !key_id.is_empty() {
            c.credentials = Some(kvstore::object::ObjectCredentials {
                access_key_id: key_id,
                secret_access_key: secret,
                session_token: nonempty(&self.session_token),
            });
        }
        c.conditional_put = self.conditional_put;
        c.target_object_size = self.target_object_size.as_u64();
        c.part_size = self.part_size.as_u64();
        c.flush_interval = ms(self.flush_interval_ms);
        c.max_pending = self.max_pending.as_u64();
        c.upload_concurrency = self.upload_concurrency as usize;
        c.read_concurrency = self.read_concurrency as usize;
        c.connect_timeout = ms(self.connect_timeout_ms);
        c.read_timeout = ms(self.read_timeout_ms);
        c.request_timeout = ms(self.request_timeout_ms);
        c.max_retries = self.max_retries as usize;
        c.retry_backoff = ms(self.retry_backoff_ms);
        c.retry_max_backoff = ms(self.retry_max_backoff_ms);
        c.retry_timeout = ms(self.retry_timeout_ms);
        c.sync_interval = ms(self.sync_interval_ms);
        c.lookup_sync_wait = ms(self.lookup_sync_wait_ms);
        c.max_catalog_blocks = usize::try_from(self.max_catalog_blocks).unwrap_or(usize::MAX);
        c.threads = self.threads as usize;
        Ok(c)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        if self.url.is_empty() {
            bail!(
                "invalid configuration `object.url`: the object tier is enabled but has no url (s3://bucket/prefix)"
            );
        }
        if self.endpoint.starts_with("http://") && self.allow_http == Some(false) {
            bail!(
                "invalid configuration `object.endpoint`: {:?} is plain HTTP but `object.allow_http` is false",
                self.endpoint
            );
        }
        if self.read_timeout_ms == 0 || self.request_timeout_ms == 0 || self.connect_timeout_ms == 0 {
            bail!("invalid configuration `object.*_timeout_ms`: must be at least 1");
        }
        // The tier's own checks (URL, part size, concurrency), with the key in the message.
        let mut probe = self.tier_config()?;
        probe.credentials = None;
        probe.validate().map_err(anyhow::Error::from)
    }
}

/// `[reuse]`: cross-node reuse. When a lookup's local prefix stops short and the cluster index
/// (`publish.index`) says another node's agent holds the next blocks, they are reported to the
/// engine as held by a peer, and pulled when the engine acquires them — if the transfer is
/// expected to beat recomputing (see `docs/disaggregation.md`). Needs peer transfers configured
/// (`peer.secret_file` or `peer.insecure`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReuseSection {
    /// Whether to look for prefixes at peers (only with `publish.index` and peer transfers).
    pub enabled: bool,
    /// Fewest blocks a peer must hold past the local prefix to be worth a pull.
    pub min_blocks: u32,
    /// Bandwidth expected from a peer, in Gbit/s (the nodes' network).
    pub peer_gbit_s: u32,
    /// Prefill throughput of the node's engines, in tokens/s: the cost of recomputing.
    pub prefill_tokens_per_s: u32,
    /// Tokens per block (the engines' `--block-size`).
    pub block_tokens: u32,
    /// Bound of the index query a lookup makes, in milliseconds.
    pub index_timeout_ms: u32,
    /// How long an answer of the index (a peer, or nobody) is reused, in milliseconds.
    pub remember_ms: u32,
}

impl Default for ReuseSection {
    fn default() -> Self {
        Self {
            enabled: true,
            min_blocks: 2,
            peer_gbit_s: 25,
            prefill_tokens_per_s: 10_000,
            block_tokens: 16,
            index_timeout_ms: 20,
            remember_ms: 2000,
        }
    }
}

/// `[peer]`: block transfers between node agents (prefill to decode, cross-node reuse).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerSection {
    /// Address of this agent's peer control channel (gRPC), e.g. `0.0.0.0:9471`; empty: this
    /// agent serves no blocks to peers (it can still pull from them).
    pub listen: String,
    /// Address of the TCP data plane; empty: the control channel's host, port + 1.
    pub data_listen: String,
    /// The control address other agents and engines are told (`host:port`); empty: `listen`,
    /// with a wildcard host replaced by the address the host name resolves to. In Kubernetes
    /// set it from `status.hostIP` (or `status.podIP` without host networking).
    pub advertise: String,
    /// File holding the cluster's shared secret (a mounted Kubernetes Secret). Agents prove
    /// they hold it on every control call and data connection; the secret never travels.
    pub secret_file: PathBuf,
    /// The shared secret itself (prefer `secret_file`, or `KVTIER_PEER__SECRET`). Hidden by
    /// `--print-config`.
    #[serde(deserialize_with = "text")]
    pub secret: String,
    /// Runs peer transfers with no secret: any host that reaches the ports can read cached
    /// blocks. Must be set explicitly; only for trusted networks and tests.
    pub insecure: bool,
    /// Data transports this agent offers and asks for, preferred first (`tcp`).
    pub transports: Vec<String>,
    /// Parallel TCP streams per pull; 0: one per four cores, 1–4.
    pub streams: u32,
    /// Pulls from one source agent allowed to run at once, on any transport; later ones wait
    /// their turn, first come first served. 0: one per four cores, 1–4.
    pub pulls_per_source: u32,
    /// How long a source keeps blocks pinned for a puller that never releases them, seconds.
    pub grant_ttl_s: u32,
    /// Most grants open at once on this agent.
    pub max_grants: u32,
    /// On an agent that serves peers: how long blocks a prefill engine hands to a decode
    /// engine are kept for its pull, seconds (the decode's pull of them ends the hold sooner).
    /// Held blocks are not evicted from the arena or disk; 0: nothing is held.
    pub hold_s: u32,
    /// Most of each tier (host arena, disk) that held blocks may take, percent (at most 90):
    /// blocks past it are handed over unheld.
    pub hold_max_percent: u8,
    /// Worker threads of the transfer runtime.
    pub threads: u32,
    /// On an agent that serves peers (`listen` set): checksum blocks engines commit on a
    /// background thread, so that the grant of a prefix a puller asks for soon after (a decode
    /// pulling what a prefill just saved) finds the checksums ready instead of reading every
    /// block first. Off: the first grant of a block reads it.
    pub checksum_on_commit: bool,
    /// The RDMA verbs transport (agents built with the `rdma` feature).
    pub rdma: RdmaSection,
    /// The UCX transport (agents built with the `ucx` feature).
    pub ucx: UcxSection,
}

/// Most UCX lanes an agent runs: each is a UCX context with its own registration of the arena
/// and a progress thread.
const MAX_UCX_LANES: usize = 16;

/// `[peer.ucx]`: the UCX data plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UcxSection {
    /// `auto`, `get` (one-sided reads of the source's arena), `put` (the source writes into
    /// the puller's slots on request) or `send` (the source sends each block and the puller's
    /// UCX fetches it into its slot); `auto` reads where UCX does it in hardware or as one
    /// copy (shared memory, CMA, InfiniBand/RoCE), asks for writes over TCP, where UCX would
    /// emulate reads several times slower (and for sends there when a pull has several blocks
    /// of 256 KiB or more, or, where `tls` is `tcp` alone, for eager sends of small pulls of
    /// blocks of 64 KiB or less), and asks for sends over shared memory on UCX releases
    /// before 1.16, which emulate reads there.
    pub mode: String,
    /// `UCX_TLS` for the agent's UCX context; empty: the environment's, else UCX's default.
    pub tls: String,
    /// Further UCX settings (names without the `UCX_` prefix, upper-cased on loading), e.g.
    /// `{ NET_DEVICES = "mlx5_0:1" }`.
    #[serde(deserialize_with = "ucx_settings")]
    pub settings: std::collections::BTreeMap<String, String>,
    /// Pulls of at most this many KiB are driven by the pulling thread itself rather than
    /// handed to the transport's progress thread (0: never; unset: the transport's default,
    /// 4096), one pulling thread at a time (where UCX may use shared memory, a pull that
    /// comes meanwhile is taken by the one driving and progressed with its own pull until
    /// that is over, then by the progress thread; over TCP alone the one driving steps aside
    /// for it); four times as many where `tls` limits UCX to TCP, `verify` is on and the
    /// source sends the blocks (several of 256 KiB or more on average). A one-block pull over
    /// shared memory then wakes no other thread, and a sent block is checked by the thread
    /// that received it.
    pub inline_kib: Option<u64>,
    /// UCX workers (each with its own progress thread) that a pull of 2 MiB or more in `get`
    /// mode is split across (unset: 2, or 1 on a single-core node); over shared memory each
    /// copies with its own core. Other modes run one; with RDMA NICs 1 is enough.
    pub lanes: Option<usize>,
    /// Whether pulled blocks are checked against their grant's checksums (default `true`).
    /// The check is a CPU pass over every byte UCX placed; `false` takes a block UCX reports
    /// delivered as it landed, so a block corrupted on its way or in the source's memory, a
    /// source's bug, or a block message from another peer that saw the request would reach the
    /// engine: only for clusters whose fabric, memory and agents are trusted.
    pub verify: bool,
}

impl Default for UcxSection {
    fn default() -> Self {
        Self {
            mode: "auto".into(),
            tls: String::new(),
            settings: std::collections::BTreeMap::new(),
            inline_kib: None,
            lanes: None,
            verify: true,
        }
    }
}

/// `[peer.rdma]`: the RDMA verbs data plane (one-sided READs over RC queue pairs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RdmaSection {
    /// The device (`mlx5_0`); empty: the first one.
    pub device: String,
    /// The device port checked at start.
    pub port: u8,
    /// Where the rdmacm listener of a serving agent binds: an address of an interface on the
    /// device (a wildcard accepts requests arriving on that device only); port 0 picks one.
    pub listen: String,
    /// Most RDMA READs in flight per queue pair (clamped to the device's limit).
    pub max_outstanding_reads: u32,
    /// Most scatter entries per READ (clamped to the device's limit).
    pub max_sge: u32,
    /// Most READs posted with one call.
    pub wrs_per_post: u32,
    /// Idle queue pairs kept per source.
    pub qps_per_peer: u32,
    /// Bound on resolving and connecting to a source, in milliseconds.
    pub connect_timeout_ms: u32,
    /// Bound on draining a failed queue pair, in milliseconds.
    pub drain_timeout_ms: u32,
    /// Whether blocks read are checked against their grant's checksums (default `true`); see
    /// `peer.ucx.verify`.
    pub verify: bool,
}

impl Default for RdmaSection {
    fn default() -> Self {
        Self {
            device: String::new(),
            port: 1,
            listen: "0.0.0.0:0".into(),
            max_outstanding_reads: 16,
            max_sge: 4,
            wrs_per_post: 4,
            qps_per_peer: 2,
            connect_timeout_ms: 3000,
            drain_timeout_ms: 2000,
            verify: true,
        }
    }
}

impl Default for PeerSection {
    fn default() -> Self {
        Self {
            listen: String::new(),
            data_listen: String::new(),
            advertise: String::new(),
            secret_file: PathBuf::new(),
            secret: String::new(),
            insecure: false,
            transports: vec!["tcp".into()],
            streams: 0,
            pulls_per_source: 0,
            grant_ttl_s: 30,
            max_grants: 1024,
            hold_s: 120,
            hold_max_percent: 50,
            threads: 2,
            checksum_on_commit: true,
            rdma: RdmaSection::default(),
            ucx: UcxSection::default(),
        }
    }
}

impl PeerSection {
    /// The shared secret from `secret_file` or `secret`; `None` when neither is set.
    pub fn load_secret(&self) -> anyhow::Result<Option<kvstore::transport::Secret>> {
        let bytes = if !self.secret_file.as_os_str().is_empty() {
            std::fs::read(&self.secret_file)
                .with_context(|| format!("reading `peer.secret_file` {}", self.secret_file.display()))?
        } else {
            self.secret.clone().into_bytes()
        };
        if bytes.is_empty() {
            return Ok(None);
        }
        match kvstore::transport::Secret::new(&bytes) {
            Some(s) => Ok(Some(s)),
            None => bail!("invalid configuration `peer.secret_file`/`peer.secret`: the secret is blank"),
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        let addr = |key: &str, v: &str| -> anyhow::Result<()> {
            if !v.is_empty() {
                v.parse::<SocketAddr>()
                    .with_context(|| format!("invalid configuration `peer.{key}`: {v:?} is not ip:port"))?;
            }
            Ok(())
        };
        addr("listen", &self.listen)?;
        addr("data_listen", &self.data_listen)?;
        if !self.advertise.is_empty() && !self.advertise.contains(':') {
            bail!(
                "invalid configuration `peer.advertise`: {:?} is not host:port",
                self.advertise
            );
        }
        if self.transports.is_empty() {
            bail!("invalid configuration `peer.transports`: name at least one (\"tcp\")");
        }
        for t in &self.transports {
            use kvstore::transport::TransportKind;
            let built = match TransportKind::from_name(t) {
                Some(TransportKind::Tcp) => true,
                Some(TransportKind::Rdma) => cfg!(feature = "rdma"),
                Some(TransportKind::Ucx) => cfg!(feature = "ucx"),
                None => {
                    bail!("invalid configuration `peer.transports`: unknown transport {t:?} (tcp, ucx, rdma)")
                }
            };
            if !built {
                bail!(
                    "invalid configuration `peer.transports`: {t} is not built into this agent \
                     (build kvagent with `--features {t}`)"
                );
            }
        }
        if !matches!(self.ucx.mode.as_str(), "auto" | "get" | "put" | "send") {
            bail!(
                "invalid configuration `peer.ucx.mode`: {:?} (auto, get, put, send)",
                self.ucx.mode
            );
        }
        if let Some(lanes) = self.ucx.lanes.filter(|n| !(1..=MAX_UCX_LANES).contains(n)) {
            bail!("invalid configuration `peer.ucx.lanes`: {lanes} (1 to {MAX_UCX_LANES})");
        }
        self.rdma.listen.parse::<SocketAddr>().with_context(|| {
            format!(
                "invalid configuration `peer.rdma.listen`: {:?} is not ip:port",
                self.rdma.listen
            )
        })?;
        if self.streams > 64 {
            bail!("invalid configuration `peer.streams`: must be 0 (automatic) to 64");
        }
        if self.pulls_per_source > 64 {
            bail!("invalid configuration `peer.pulls_per_source`: must be 0 (automatic) to 64");
        }
        if !(1..=64).contains(&self.threads) {
            bail!("invalid configuration `peer.threads`: must be 1–64");
        }
        if self.grant_ttl_s == 0 || self.max_grants == 0 {
            bail!("invalid configuration `peer.grant_ttl_s`/`peer.max_grants`: must be at least 1");
        }
        if self.hold_max_percent > 90 {
            // Held blocks cannot be evicted: a tier full of them would take no new block.
            bail!("invalid configuration `peer.hold_max_percent`: must be 0–90");
        }
        let has_secret = !self.secret_file.as_os_str().is_empty() || !self.secret.is_empty();
        if !self.listen.is_empty() && !has_secret && !self.insecure {
            bail!(
                "`peer.listen` is set but no shared secret is: set `peer.secret_file` (or \
                 `KVTIER_PEER__SECRET`), or `peer.insecure = true` to serve blocks to anyone \
                 who reaches the port"
            );
        }
        Ok(())
    }
}

/// `[publish]`: reporting the host and disk tiers to the cluster index (`kvagent index`), so
/// that routers count what this node's agent holds for the pods on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishSection {
    /// The index's gRPC address (`http://kvagent-index.kvtier.svc:9480`, or `host:port`); empty: off.
    pub index: String,
    /// This node's name, as the index's pods name their node (`[[pods]] node`). Empty: the
    /// host name — in Kubernetes set it from `spec.nodeName`, since a pod's host name is its
    /// own name.
    #[serde(deserialize_with = "text")]
    pub node: String,
    /// How often the tiers are compared with what the index was told, in milliseconds.
    pub interval_ms: u32,
    /// The longest silence, in seconds, before an empty batch tells the index the agent is
    /// alive (keep it well under the index's `source_ttl_s`).
    pub heartbeat_s: u32,
}

impl Default for PublishSection {
    fn default() -> Self {
        Self {
            index: String::new(),
            node: String::new(),
            interval_ms: 500,
            heartbeat_s: 10,
        }
    }
}

impl PublishSection {
    /// The index address as a URI (`http://` added when no scheme is given).
    pub fn index_uri(&self) -> String {
        if self.index.contains("://") {
            self.index.clone()
        } else {
            format!("http://{}", self.index)
        }
    }

    /// The node name: `node`, else the host name.
    pub fn node_name(&self) -> anyhow::Result<String> {
        if !self.node.is_empty() {
            return Ok(self.node.clone());
        }
        let host = host_name().context("reading the host name for `publish.node` (set it instead)")?;
        if host.is_empty() {
            bail!("the host name is empty: set `publish.node`");
        }
        Ok(host)
    }
}

/// This machine's host name (a pod's own name in Kubernetes).
pub(crate) fn host_name() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_owned())
}

/// `[host]`: the shared host-memory arena.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostSection {
    /// Bytes of shared memory for blocks (allocated as they are used, not up front).
    pub size: ByteSize,
    /// Slab size; the largest block is one slab. `0` picks size / 8 clamped to 4–64 MiB.
    pub slab_size: ByteSize,
    /// `off` (default), `auto` (use reserved huge pages when there are enough) or `require`.
    /// Off by default: hugetlb pages are charged to the process that faults them, and a
    /// Kubernetes pod without a `hugepages-2Mi` limit that faults one is killed with SIGBUS.
    pub huge_pages: HugePagesSetting,
    /// Allocate the whole arena at start, charged to the agent's memory cgroup, instead of page
    /// by page as engines write (charged to whichever process touches a page first).
    pub preallocate: bool,
}

/// `[disk]`: the local disk tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiskSection {
    /// Whether the tier exists. Off by default: the agent should not take disk space nobody
    /// granted it.
    pub enabled: bool,
    /// Directory of slab files and metadata (created if missing, locked while the agent runs).
    pub dir: PathBuf,
    /// Bytes the tier may occupy.
    pub size: ByteSize,
    /// Size of one slab file; the largest block on disk is a slab minus a 4 KiB header.
    pub slab_size: ByteSize,
    /// I/O engine: `auto` (io_uring when available), `io-uring` or `psync`.
    pub engine: EngineSetting,
    /// Requests in flight per batch.
    pub queue_depth: u32,
    /// Bypass the page cache (O_DIRECT) where the filesystem allows it.
    pub direct_io: bool,
    /// Flush data and journal after each batch (power-loss durability, slower writes).
    pub sync_metadata: bool,
    /// On a clean stop, write host blocks the disk lacks to disk, so the restarted agent
    /// serves them (the arena does not outlive the process).
    pub persist_on_shutdown: bool,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Huge page policy of the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HugePagesSetting {
    /// Huge pages when the system has enough reserved, else normal pages.
    Auto,
    /// Normal pages.
    Off,
    /// Huge pages or refuse to start.
    Require,
}

/// I/O engine of the disk tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineSetting {
    /// io_uring when the kernel allows it, else the thread pool.
    Auto,
    /// io_uring or refuse to start.
    IoUring,
    /// The pread/pwrite thread pool.
    Psync,
}

/// A text setting that may arrive as a number or a boolean: figment parses an environment
/// variable's value, so `KVTIER_PEER__SECRET=123456` or `KVTIER_INDEX_HASH__SEED=0` arrives as
/// an integer, which a plain `String` refuses. Used through [`text`], [`optional_text`] and
/// [`ucx_settings`].
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("text")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Text, E> {
                Ok(Text(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A text setting, also from a variable whose value looks like a number ([`Text`]).
pub(crate) fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Text::deserialize(d).map(|t| t.0)
}

/// An optional text setting, also from a variable whose value looks like a number ([`Text`]).
pub(crate) fn optional_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<Text>::deserialize(d)?.map(|t| t.0))
}

/// `peer.ucx.settings`: UCX's names are upper case and matched by case, while a variable's key
/// arrives lower case (`KVTIER_PEER__UCX__SETTINGS__NET_DEVICES` as `net_devices`), so names are
/// upper-cased; values are text ([`Text`]: `RNDV_THRESH=8192` arrives as a number).
fn ucx_settings<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, String>, D::Error> {
    let raw = std::collections::BTreeMap::<String, Text>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| (k.to_ascii_uppercase(), v.0))
        .collect())
}

/// Reads `socket_mode` from a string or from a number whose decimal digits are the octal mode
/// (figment parses `KVTIER_SOCKET_MODE=0660` as the integer 660).
fn octal_digits<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mode {
        Text(String),
        Digits(u32),
    }
    Ok(match Mode::deserialize(d)? {
        Mode::Text(s) => s,
        Mode::Digits(n) => format!("0{n}"),
    })
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(kvstore::client::DEFAULT_SOCKET),
            socket_mode: "0660".into(),
            socket_gid: None,
            http_addr: "0.0.0.0:9470".into(),
            max_clients: 256,
            poll_us: 50,
            default_deadline_ms: 1000,
            shutdown_timeout_ms: 10_000,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            host: HostSection::default(),
            disk: DiskSection::default(),
            publish: PublishSection::default(),
            peer: PeerSection::default(),
            reuse: ReuseSection::default(),
            object: ObjectSection::default(),
        }
    }
}

impl Default for HostSection {
    fn default() -> Self {
        Self {
            size: ByteSize::gib(4),
            slab_size: ByteSize::b(0),
            huge_pages: HugePagesSetting::Off,
            preallocate: false,
        }
    }
}

impl Default for DiskSection {
    fn default() -> Self {
        Self {
            enabled: false,
            dir: PathBuf::from("/var/lib/kvtier/disk"),
            size: ByteSize::gib(64),
            slab_size: ByteSize::mib(256),
            engine: EngineSetting::Auto,
            queue_depth: 16,
            direct_io: true,
            sync_metadata: false,
            persist_on_shutdown: true,
        }
    }
}

/// Flags every long-running `kvagent` command has (`http_addr`, `log_format`, `log_level`).
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct ServiceFlags {
    /// Address for /metrics, /healthz and /readyz; "" disables (`http_addr`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
    /// Log format (`log_format`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// Log filter (`log_level`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
}

/// Flags of `kvagent node` that override configuration keys. Each is `None` unless given.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct NodeFlags {
    /// Path of the local socket (`socket`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// `http_addr`, `log_format`, `log_level`.
    #[command(flatten)]
    #[serde(flatten)]
    pub service: ServiceFlags,
    /// Size of the shared host arena, e.g. 16GiB (`host.size`).
    #[arg(long, value_name = "SIZE")]
    #[serde(skip)]
    pub host_size: Option<String>,
    /// Enables the disk tier in this directory (`disk.enabled`, `disk.dir`).
    #[arg(long, value_name = "DIR")]
    #[serde(skip)]
    pub disk_dir: Option<PathBuf>,
    /// Size of the disk tier, e.g. 200GiB (`disk.size`).
    #[arg(long, value_name = "SIZE")]
    #[serde(skip)]
    pub disk_size: Option<String>,
    /// Reports the tiers to the cluster index at this gRPC address (`publish.index`).
    #[arg(long, value_name = "ADDR")]
    #[serde(skip)]
    pub index: Option<String>,
    /// This node's name for the index (`publish.node`).
    #[arg(long, value_name = "NAME")]
    #[serde(skip)]
    pub node_name: Option<String>,
    /// Serves blocks to other nodes' agents on this address (`peer.listen`).
    #[arg(long, value_name = "ADDR")]
    #[serde(skip)]
    pub peer_listen: Option<String>,
    /// File with the cluster's shared secret for peer transfers (`peer.secret_file`).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub peer_secret_file: Option<PathBuf>,
    /// Enables the object tier at this URL, e.g. s3://bucket/kvtier (`object.enabled`,
    /// `object.url`).
    #[arg(long, value_name = "URL")]
    #[serde(skip)]
    pub object_url: Option<String>,
    /// Endpoint of an S3-compatible store, e.g. http://minio:9000 (`object.endpoint`).
    #[arg(long, value_name = "URL")]
    #[serde(skip)]
    pub object_endpoint: Option<String>,
}

impl NodeFlags {
    /// The flags as a partial configuration document, nested like the TOML file.
    fn as_overrides(&self) -> anyhow::Result<figment::value::Dict> {
        let value = figment::value::Value::serialize(self).context("encoding flags")?;
        let mut dict = value.into_dict().unwrap_or_default();
        let mut host = figment::value::Dict::new();
        if let Some(s) = &self.host_size {
            host.insert("size".into(), s.clone().into());
        }
        let mut disk = figment::value::Dict::new();
        if let Some(d) = &self.disk_dir {
            disk.insert("enabled".into(), true.into());
            disk.insert("dir".into(), d.display().to_string().into());
        }
        if let Some(s) = &self.disk_size {
            disk.insert("size".into(), s.clone().into());
        }
        let mut publish = figment::value::Dict::new();
        if let Some(a) = &self.index {
            publish.insert("index".into(), a.clone().into());
        }
        if let Some(n) = &self.node_name {
            publish.insert("node".into(), n.clone().into());
        }
        if !publish.is_empty() {
            dict.insert("publish".into(), publish.into());
        }
        let mut peer = figment::value::Dict::new();
        if let Some(a) = &self.peer_listen {
            peer.insert("listen".into(), a.clone().into());
        }
        if let Some(f) = &self.peer_secret_file {
            peer.insert("secret_file".into(), f.display().to_string().into());
        }
        if !peer.is_empty() {
            dict.insert("peer".into(), peer.into());
        }
        let mut object = figment::value::Dict::new();
        if let Some(u) = &self.object_url {
            object.insert("enabled".into(), true.into());
            object.insert("url".into(), u.clone().into());
        }
        if let Some(e) = &self.object_endpoint {
            object.insert("endpoint".into(), e.clone().into());
        }
        if !object.is_empty() {
            dict.insert("object".into(), object.into());
        }
        if !host.is_empty() {
            dict.insert("host".into(), host.into());
        }
        if !disk.is_empty() {
            dict.insert("disk".into(), disk.into());
        }
        Ok(dict)
    }
}

/// Resolves the configuration: defaults, then the file (`file` if given, else `KVTIER_CONFIG`,
/// else [`DEFAULT_CONFIG_PATH`] when it exists), then the environment, then `flags`.
pub fn load(file: Option<&Path>, flags: &NodeFlags) -> anyhow::Result<NodeConfig> {
    // Under the node's prefix but read by others: the index and the copy engines in the
    // inference engine's processes.
    let others: Vec<&str> = std::iter::once(crate::index::config::ENV_PREFIX)
        .chain(kvstore::device::ENGINE_ENV.iter().copied())
        .collect();
    let cfg: NodeConfig = layered(
        NodeConfig::default(),
        Layers {
            file,
            file_env: "KVTIER_CONFIG",
            default_path: DEFAULT_CONFIG_PATH,
            env_prefix: ENV_PREFIX,
            others: &others,
        },
        flags.as_overrides()?,
    )?;
    cfg.validate()?;
    Ok(cfg)
}

/// Where a command's configuration comes from, besides its defaults and flags.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layers<'a> {
    /// The file named on the command line.
    pub file: Option<&'a Path>,
    /// The variable naming a file when the command line does not.
    pub file_env: &'a str,
    /// The file read, when it exists, if neither names one.
    pub default_path: &'a str,
    /// Prefix of the variables that override keys (`__` nests).
    pub env_prefix: &'a str,
    /// Variables under that prefix that other kvtier programs read (a name, or a prefix ending
    /// in `_`): a shell or pod that sets them for those does not stop this one.
    pub others: &'a [&'a str],
}

/// Defaults, then the file, then the environment, then `overrides` (the flags), extracted with
/// errors that name the key and where its value came from.
pub(crate) fn layered<T: Serialize + serde::de::DeserializeOwned>(
    defaults: T,
    layers: Layers<'_>,
    overrides: figment::value::Dict,
) -> anyhow::Result<T> {
    let env_file = std::env::var_os(layers.file_env).map(PathBuf::from);
    let path = match (layers.file, env_file) {
        (Some(p), _) => Some(p.to_path_buf()),
        (None, Some(p)) => Some(p),
        (None, None) => Some(PathBuf::from(layers.default_path)).filter(|p| p.exists()),
    };
    let mut fig = Figment::from(Serialized::defaults(defaults));
    if let Some(path) = &path {
        if !path.is_file() {
            bail!("config file {} does not exist", path.display());
        }
        fig = fig.merge(Toml::file_exact(path));
    }
    // Owned: figment keeps the filter.
    let prefix = layers.env_prefix.to_owned();
    let skipped: Vec<String> = std::iter::once(layers.file_env)
        .chain(layers.others.iter().copied())
        .map(str::to_owned)
        .collect();
    let env = Env::prefixed(layers.env_prefix).filter(move |key| {
        let var = format!("{prefix}{key}").to_ascii_uppercase();
        !skipped
            .iter()
            .any(|o| var == *o || (o.ends_with('_') && var.starts_with(o.as_str())))
    });
    fig = fig
        .merge(Variables(env.split("__")))
        .merge(Serialized::defaults(overrides));
    fig.extract().map_err(|e| {
        let msgs: Vec<String> = e.into_iter().map(|e| describe(&e)).collect();
        anyhow::anyhow!("invalid configuration: {}", msgs.join("; "))
    })
}

/// The variables, read as figment's `Env` reads them (a value in TOML's syntax: a number, a
/// boolean, `[a, b]`, `{k = v}`, else text), except that a value whose number would not write
/// back as the same text stays text: figment would read `0123` as 123, so a secret or a hash
/// seed of digits would lose its leading zeros. Numeric keys then refuse such a value instead of
/// taking a different one.
struct Variables(Env);

impl figment::Provider for Variables {
    fn metadata(&self) -> figment::Metadata {
        self.0.metadata()
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        let mut dict = figment::value::Dict::new();
        for (key, raw) in self.0.iter() {
            nest_into(&mut dict, key.as_str(), variable_value(&raw));
        }
        Ok(figment::Profile::Default.collect(dict))
    }
}

/// A variable's value: figment's reading of it, or the text where a number would change it.
fn variable_value(raw: &str) -> figment::value::Value {
    use figment::value::Value;
    let parsed: Value = match raw.parse() {
        Ok(v) => v,
        Err(never) => match never {},
    };
    match &parsed {
        Value::Num(_, n) => {
            let written = n
                .to_u128()
                .map(|u| u.to_string())
                .or_else(|| n.to_i128().map(|i| i.to_string()))
                .or_else(|| n.to_f64().map(|f| f.to_string()));
            if written.as_deref() == Some(raw) {
                parsed
            } else {
                Value::from(raw.to_owned())
            }
        }
        _ => parsed,
    }
}

/// Puts `value` at the dotted `path` of `dict` (a later variable wins where two name one key).
fn nest_into(dict: &mut figment::value::Dict, path: &str, value: figment::value::Value) {
    use figment::value::Value;
    match path.split_once('.') {
        None => {
            dict.insert(path.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_owned())
                .or_insert_with(|| figment::value::Dict::new().into());
            if !matches!(entry, Value::Dict(..)) {
                *entry = figment::value::Dict::new().into();
            }
            if let Value::Dict(_, inner) = entry {
                nest_into(inner, rest, value);
            }
        }
    }
}

/// One figment error as a sentence naming the key and where its value came from.
fn describe(e: &figment::Error) -> String {
    let key = if e.path.is_empty() {
        String::new()
    } else {
        format!("`{}`: ", e.path.join("."))
    };
    let source = e
        .metadata
        .as_ref()
        .map(|m| match &m.source {
            Some(s) => format!(" (from {} {s})", m.name),
            None => format!(" (from {})", m.name),
        })
        .unwrap_or_default();
    format!("{key}{}{source}", e.kind)
}

impl NodeConfig {
    /// Refuses values that parse but cannot work, naming the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.socket_mode_bits()?;
        if self.socket.as_os_str().is_empty() {
            bail!("invalid configuration `socket`: empty path");
        }
        if !self.http_addr.is_empty() {
            self.http_addr
                .parse::<SocketAddr>()
                .with_context(|| format!("invalid configuration `http_addr`: {:?}", self.http_addr))?;
        }
        if self.max_clients == 0 {
            bail!("invalid configuration `max_clients`: must be at least 1");
        }
        if self.poll_us > 10_000 {
            bail!("invalid configuration `poll_us`: at most 10000 (10 ms of polling per call)");
        }
        if self.default_deadline_ms == 0 {
            bail!("invalid configuration `default_deadline_ms`: must be at least 1");
        }
        if !self.publish.index.is_empty() {
            let uri = self.publish.index_uri();
            uri.parse::<tonic::codegen::http::Uri>()
                .ok()
                .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
                .with_context(|| {
                    format!(
                        "invalid configuration `publish.index`: {:?} is not host:port or an http(s) URI",
                        self.publish.index
                    )
                })?;
            if self.publish.interval_ms < 10 {
                bail!("invalid configuration `publish.interval_ms`: at least 10");
            }
            if self.publish.heartbeat_s == 0 {
                bail!("invalid configuration `publish.heartbeat_s`: at least 1");
            }
        }
        self.peer.validate()?;
        self.object.validate()?;
        if self.reuse.min_blocks == 0 || self.reuse.block_tokens == 0 || self.reuse.prefill_tokens_per_s == 0
        {
            bail!(
                "invalid configuration `reuse.min_blocks`/`reuse.block_tokens`/`reuse.prefill_tokens_per_s`: \
                 must be at least 1"
            );
        }
        if self.host.size.as_u64() < 16 << 20 {
            bail!(
                "invalid configuration `host.size`: {} is below the minimum of 16 MiB",
                self.host.size
            );
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_level)
            .with_context(|| format!("invalid configuration `log_level`: {:?}", self.log_level))?;
        if self.disk.enabled {
            if self.disk.queue_depth == 0 || self.disk.queue_depth > 4096 {
                bail!("invalid configuration `disk.queue_depth`: must be 1–4096");
            }
            // Each slab holds blocks of one size class: a tier of fewer slabs than the model
            // has block sizes cannot hold them all.
            if self.disk.size.as_u64() < 4 * self.disk.slab_size.as_u64() {
                bail!(
                    "invalid configuration `disk.size`: {} holds fewer than 4 slabs of `disk.slab_size` ({})",
                    self.disk.size,
                    self.disk.slab_size
                );
            }
        }
        Ok(())
    }

    /// The socket mode as permission bits.
    pub fn socket_mode_bits(&self) -> anyhow::Result<u32> {
        let digits = self.socket_mode.trim_start_matches("0o");
        match u32::from_str_radix(digits, 8) {
            Ok(bits) if bits <= 0o777 => Ok(bits),
            _ => bail!(
                "invalid configuration `socket_mode`: {:?} is not an octal mode like \"0660\"",
                self.socket_mode
            ),
        }
    }

    /// The store settings this configuration describes (reads the object tier's secret file).
    pub fn store_config(&self) -> anyhow::Result<kvstore::StoreConfig> {
        let mut host = kvstore::HostTierConfig::new(self.host.size.as_u64());
        host.slab_size = self.host.slab_size.as_u64();
        host.preallocate = self.host.preallocate;
        host.huge_pages = match self.host.huge_pages {
            HugePagesSetting::Auto => kvstore::HugePages::Auto,
            HugePagesSetting::Off => kvstore::HugePages::Off,
            HugePagesSetting::Require => kvstore::HugePages::Require,
        };
        let disk = self.disk.enabled.then(|| {
            let mut d = kvstore::DiskTierConfig::new(&self.disk.dir, self.disk.size.as_u64());
            d.slab_size = self.disk.slab_size.as_u64();
            d.queue_depth = self.disk.queue_depth;
            d.direct_io = self.disk.direct_io;
            d.sync_metadata = self.disk.sync_metadata;
            d.engine = match self.disk.engine {
                EngineSetting::Auto => kvstore::IoEngineChoice::Auto,
                EngineSetting::IoUring => kvstore::IoEngineChoice::IoUring,
                EngineSetting::Psync => kvstore::IoEngineChoice::Psync,
            };
            d
        });
        let object = self
            .object
            .enabled
            .then(|| self.object.tier_config())
            .transpose()?;
        Ok(kvstore::StoreConfig { host, disk, object })
    }

    /// The configuration as TOML, as `--print-config` shows it.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        let mut shown = self.clone();
        if !shown.peer.secret.is_empty() {
            shown.peer.secret = "***".into();
        }
        if !shown.object.secret_access_key.is_empty() {
            shown.object.secret_access_key = "***".into();
        }
        if !shown.object.session_token.is_empty() {
            shown.object.session_token = "***".into();
        }
        toml::to_string_pretty(&shown).context("encoding the configuration as TOML")
    }
}

#[cfg(test)]
mod tests {
    use figment::Jail;

    use super::*;

    /// Runs `f` in a figment jail: a private working directory and an environment holding only
    /// what the test sets (restored afterwards).
    #[expect(
        clippy::result_large_err,
        reason = "figment's Jail fixes the closure's error type"
    )]
    fn jailed(f: impl FnOnce(&mut Jail)) {
        Jail::expect_with(|jail| {
            jail.clear_env();
            f(jail);
            Ok(())
        });
    }

    fn load_file(jail: &Jail, text: &str, flags: &NodeFlags) -> anyhow::Result<NodeConfig> {
        jail.create_file("agent.toml", text).expect("write config");
        load(Some(Path::new("agent.toml")), flags)
    }

    #[test]
    fn defaults_validate_and_round_trip_through_toml() {
        jailed(|jail| {
            let cfg = load(None, &NodeFlags::default()).unwrap();
            assert_eq!(cfg, NodeConfig::default());
            let again = load_file(jail, &cfg.to_toml().unwrap(), &NodeFlags::default()).unwrap();
            assert_eq!(again, cfg);
        });
    }

    #[test]
    fn flags_override_env_which_overrides_file() {
        jailed(|jail| {
            jail.set_env("KVTIER_MAX_CLIENTS", "7");
            jail.set_env("KVTIER_HOST__SIZE", "2GiB");
            let flags = NodeFlags {
                host_size: Some("3GiB".into()),
                disk_dir: Some("/tmp/d".into()),
                ..NodeFlags::default()
            };
            let text = "socket = \"/tmp/file.sock\"\nmax_clients = 3\n[host]\nsize = \"1GiB\"\n";
            let cfg = load_file(jail, text, &flags).unwrap();
            assert_eq!(cfg.socket, PathBuf::from("/tmp/file.sock"));
            assert_eq!(cfg.max_clients, 7);
            assert_eq!(cfg.host.size, ByteSize::gib(3));
            assert!(cfg.disk.enabled);
            assert_eq!(cfg.disk.dir, PathBuf::from("/tmp/d"));
        });
    }

    #[test]
    fn ucx_tunings_come_from_the_file_and_the_environment() {
        jailed(|jail| {
            let text = "[peer.ucx]\ninline_kib = 0\nsettings = { RNDV_THRESH = \"auto\" }\n";
            let cfg = load_file(jail, text, &NodeFlags::default()).unwrap();
            assert_eq!(cfg.peer.ucx.inline_kib, Some(0));
            assert!(cfg.peer.ucx.verify && cfg.peer.rdma.verify, "checked by default");
            let unchecked = format!("{text}verify = false\n[peer.rdma]\nverify = false\n");
            let cfg = load_file(jail, &unchecked, &NodeFlags::default()).unwrap();
            assert!(!cfg.peer.ucx.verify && !cfg.peer.rdma.verify);
            assert_eq!(
                cfg.peer.ucx.settings.get("RNDV_THRESH").map(String::as_str),
                Some("auto")
            );
            jail.set_env("KVTIER_PEER__UCX__INLINE_KIB", "64");
            jail.set_env("KVTIER_PEER__UCX__MODE", "send");
            let cfg = load_file(jail, text, &NodeFlags::default()).unwrap();
            assert_eq!(cfg.peer.ucx.inline_kib, Some(64));
            assert_eq!(cfg.peer.ucx.mode, "send");
            jail.set_env("KVTIER_PEER__UCX__LANES", "3");
            let cfg = load_file(jail, text, &NodeFlags::default()).unwrap();
            assert_eq!(cfg.peer.ucx.lanes, Some(3));
            jail.set_env("KVTIER_PEER__UCX__LANES", "0");
            let err = load_file(jail, text, &NodeFlags::default()).unwrap_err();
            assert!(format!("{err:#}").contains("peer.ucx.lanes"), "{err:#}");
            jail.set_env("KVTIER_PEER__UCX__LANES", "2");
            // A variable's key arrives lowercased and an all-digit value as a number: UCX
            // matches names by case, and a setting's value is text.
            jail.set_env("KVTIER_PEER__UCX__SETTINGS__RNDV_THRESH", "8192");
            let cfg = load_file(jail, text, &NodeFlags::default()).unwrap();
            assert_eq!(
                cfg.peer.ucx.settings.get("RNDV_THRESH").map(String::as_str),
                Some("8192"),
                "{:?}",
                cfg.peer.ucx.settings
            );
            jail.set_env("KVTIER_PEER__UCX__MODE", "rendezvous");
            let err = load_file(jail, text, &NodeFlags::default()).unwrap_err();
            assert!(format!("{err:#}").contains("peer.ucx.mode"), "{err:#}");
        });
    }

    #[test]
    fn text_settings_take_all_digit_values_from_the_environment() {
        jailed(|jail| {
            jail.set_env("KVTIER_PEER__SECRET", "12345678901234567890");
            jail.set_env("KVTIER_PUBLISH__NODE", "7");
            jail.set_env("KVTIER_OBJECT__ACCESS_KEY_ID", "1234");
            jail.set_env("KVTIER_OBJECT__SECRET_ACCESS_KEY", "5678");
            jail.set_env("KVTIER_OBJECT__SESSION_TOKEN", "true");
            let cfg = load(None, &NodeFlags::default()).unwrap();
            assert_eq!(cfg.peer.secret, "12345678901234567890");
            assert_eq!(cfg.publish.node, "7");
            assert_eq!(
                (
                    cfg.object.access_key_id.as_str(),
                    cfg.object.secret_access_key.as_str(),
                    cfg.object.session_token.as_str()
                ),
                ("1234", "5678", "true")
            );
            jail.set_env("KVTIER_PEER__SECRET", "0123456789");
            jail.set_env("KVTIER_PUBLISH__NODE", "+7");
            let cfg = load(None, &NodeFlags::default()).unwrap();
            assert_eq!(
                (cfg.peer.secret.as_str(), cfg.publish.node.as_str()),
                ("0123456789", "+7")
            );
            jail.set_env("KVTIER_MAX_CLIENTS", "007");
            let err = format!("{:#}", load(None, &NodeFlags::default()).unwrap_err());
            assert!(err.contains("max_clients") && err.contains("KVTIER_"), "{err}");
            jail.set_env("KVTIER_MAX_CLIENTS", "7");
            jail.set_env("KVTIER_PEER__SECRET", "[1, 2]");
            let err = load(None, &NodeFlags::default()).unwrap_err();
            assert!(format!("{err:#}").contains("peer.secret"), "{err:#}");
            jail.set_env("KVTIER_PEER__SECRET", "s");
            jail.set_env("KVTIER_NO_SUCH_KEY", "1");
            let err = format!("{:#}", load(None, &NodeFlags::default()).unwrap_err());
            assert!(err.contains("no_such_key"), "{err}");
        });
    }

    #[test]
    fn socket_mode_from_the_environment_is_octal() {
        jailed(|jail| {
            jail.set_env("KVTIER_SOCKET_MODE", "0600");
            let cfg = load(None, &NodeFlags::default()).unwrap();
            assert_eq!(cfg.socket_mode_bits().unwrap(), 0o600);
        });
    }

    #[test]
    fn config_file_from_the_environment() {
        jailed(|jail| {
            jail.create_file("other.toml", "max_clients = 9\n")
                .expect("write config");
            jail.set_env("KVTIER_CONFIG", "other.toml");
            assert_eq!(load(None, &NodeFlags::default()).unwrap().max_clients, 9);
            jail.set_env("KVTIER_CONFIG", "missing.toml");
            let err = load(None, &NodeFlags::default()).unwrap_err();
            assert!(format!("{err:#}").contains("missing.toml"), "{err:#}");
        });
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        jailed(|jail| {
            let err = load_file(jail, "[disk]\nenabeld = true\n", &NodeFlags::default()).unwrap_err();
            assert!(format!("{err:#}").contains("enabeld"), "{err:#}");
            // Variables of the index and of the engine-side copy engines are not the node's.
            jail.set_env("KVTIER_INDEX_GRPC_ADDR", "[::1]:1");
            jail.set_env("KVTIER_CUDA_COPY_KERNEL", "off");
            assert!(load(None, &NodeFlags::default()).is_ok());
            jail.set_env("KVTIER_SOKET", "/x");
            let err = load(None, &NodeFlags::default()).unwrap_err();
            assert!(format!("{err:#}").contains("soket"), "{err:#}");
        });
    }

    #[test]
    fn invalid_values_are_refused_by_name() {
        jailed(|jail| {
            for (text, key) in [
                ("socket_mode = \"rw\"", "socket_mode"),
                ("max_clients = 0", "max_clients"),
                ("http_addr = \"nowhere\"", "http_addr"),
                ("[host]\nsize = \"1MiB\"", "host.size"),
                ("[host]\nsize = \"lots\"", "host.size"),
                ("[host]\nhuge_pages = \"maybe\"", "host.huge_pages"),
                ("log_format = \"xml\"", "log_format"),
                ("max_clients = \"many\"", "max_clients"),
                ("[peer]\nhold_max_percent = 95", "peer.hold_max_percent"),
            ] {
                let err = load_file(jail, text, &NodeFlags::default()).unwrap_err();
                assert!(format!("{err:#}").contains(key), "{text}: {err:#}");
            }
        });
    }

    #[test]
    fn the_object_tier_from_file_env_and_flags() {
        jailed(|jail| {
            jail.create_file("s3-secret", "from-file\n")
                .expect("write secret");
            jail.set_env("KVTIER_OBJECT__REGION", "eu-west-1");
            let text = "[object]\nurl = \"s3://file-bucket/p\"\naccess_key_id = \"AK\"\n\
                        secret_access_key_file = \"s3-secret\"\nwrite_through_min_blocks = 4\n";
            let flags = NodeFlags {
                object_url: Some("s3://flag-bucket/kv".into()),
                object_endpoint: Some("http://127.0.0.1:9000".into()),
                ..NodeFlags::default()
            };
            let cfg = load_file(jail, text, &flags).unwrap();
            assert!(cfg.object.enabled);
            assert_eq!(cfg.object.url, "s3://flag-bucket/kv");
            assert_eq!(cfg.object.region, "eu-west-1");
            assert_eq!(cfg.object.write_through_min_blocks, 4);
            let store = cfg.store_config().unwrap();
            let o = store.object.expect("object tier configured");
            assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
            let creds = o.credentials.expect("static keys");
            assert_eq!(
                (creds.access_key_id.as_str(), creds.secret_access_key.as_str()),
                ("AK", "from-file")
            );
            assert!(
                !format!("{creds:?}").contains("from-file"),
                "Debug hides the secret"
            );
        });
    }

    #[test]
    fn object_settings_are_checked_and_the_secret_is_hidden() {
        jailed(|jail| {
            for (text, key) in [
                ("[object]\nenabled = true\n", "object.url"),
                ("[object]\nenabled = true\nurl = \"gs://b\"\n", "object.url"),
                (
                    "[object]\nenabled = true\nurl = \"s3://b\"\npart_size = \"1MiB\"\n",
                    "object.part_size",
                ),
                (
                    "[object]\nenabled = true\nurl = \"s3://b\"\nread_concurrency = 0\n",
                    "object.read_concurrency",
                ),
                (
                    "[object]\nenabled = true\nurl = \"s3://b\"\naccess_key_id = \"AK\"\n",
                    "object.access_key_id",
                ),
                ("[object]\nbucket = \"b\"\n", "bucket"),
            ] {
                let err = load_file(jail, text, &NodeFlags::default()).unwrap_err();
                assert!(format!("{err:#}").contains(key), "{text}: {err:#}");
            }
            let text = "[object]\nenabled = true\nurl = \"s3://b\"\naccess_key_id = \"AK\"\nsecret_access_key = \"hunter2\"\n";
            let shown = load_file(jail, text, &NodeFlags::default())
                .unwrap()
                .to_toml()
                .unwrap();
            assert!(!shown.contains("hunter2") && shown.contains("***"), "{shown}");
        });
    }
}

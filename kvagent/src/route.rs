//! `kvagent route`: a small OpenAI-compatible reverse proxy in front of several vLLM servers. For
//! each completion request it asks the index which backend holds the longest prefix of the
//! prompt and sends the request there (ties, and prompts nobody holds, go to the least loaded
//! backend). Responses, streamed ones included, pass through unchanged. It is the reference
//! router and the demonstration of prefix-aware routing; production routers (llm-d's endpoint
//! picker) call the index's `Score` the same way.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_stream::StreamExt as _;

use crate::index::proto::{self, index_client::IndexClient};

/// How `kvagent route` picks a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// The backend holding the longest prefix (per the index), else the least loaded.
    Prefix,
    /// The backend with the fewest requests in flight.
    LeastLoaded,
    /// Each backend in turn (the baseline prefix-aware routing is measured against).
    RoundRobin,
}

/// Arguments of `kvagent route`.
#[derive(Debug, clap::Args)]
pub struct RouteArgs {
    /// Address to serve the OpenAI API on.
    #[arg(long, default_value = "0.0.0.0:8000")]
    pub listen: String,
    /// A vLLM server: NAME=URL (NAME as the index knows the pod); repeat for each.
    #[arg(long = "backend", required = true, value_name = "NAME=URL")]
    pub backends: Vec<String>,
    /// The index's gRPC address; without it, routing is by load only.
    #[arg(long)]
    pub index: Option<String>,
    /// The model name the index knows the backends by [default: the request's "model"].
    #[arg(long)]
    pub model: Option<String>,
    /// A Hugging Face tokenizer.json to tokenize text prompts (token-id prompts need none).
    /// Chat requests are rendered with the model's chat template, found beside it
    /// (`chat_template.jinja` or `tokenizer_config.json`), as vLLM renders them.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The chat template to render chat requests with, if not the one beside the tokenizer
    /// (as vLLM's `--chat-template`).
    #[arg(long, value_name = "FILE", requires = "tokenizer")]
    pub chat_template: Option<PathBuf>,
    /// Tokens per block of the engines [default: the index's].
    #[arg(long)]
    pub block_size: Option<u32>,
    /// How to pick a backend.
    #[arg(long, value_enum, default_value = "prefix")]
    pub policy: Policy,
    /// Bound of one Score call; past it the request is routed by load.
    #[arg(long, default_value_t = 50)]
    pub score_timeout_ms: u64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    backend: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
}

#[derive(Debug)]
struct Backend {
    name: String,
    url: String,
    in_flight: Arc<AtomicUsize>,
    /// Until when (milliseconds since the router started) it is skipped: a connection to it
    /// was refused.
    down_until: AtomicU64,
}

/// How long a backend that refused a connection is skipped.
const DOWN_FOR: Duration = Duration::from_secs(5);

/// Headers of one hop (RFC 9110 §7.6.1), not forwarded in either direction.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn end_to_end(name: &header::HeaderName) -> bool {
    !HOP_BY_HOP.contains(&name.as_str()) && name != header::HOST && name != header::CONTENT_LENGTH
}

struct RouteState {
    backends: Vec<Backend>,
    index: Option<IndexClient<tonic::transport::Channel>>,
    tokenizer: Option<crate::tokenizer::Tokenizer>,
    chat: Option<crate::chat::ChatTemplate>,
    args: RouteArgs,
    http: reqwest::Client,
    next: AtomicU64,
    started: std::time::Instant,
    routed: Family<RouteLabel, Counter>,
    prefix_blocks: Counter,
    in_flight: Family<BackendLabel, Gauge>,
    registry: Registry,
}

type Shared = Arc<RouteState>;

/// Runs `kvagent route` until SIGTERM or SIGINT.
pub fn run(args: RouteArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(serve(args))
}

fn parse_backend(spec: &str) -> anyhow::Result<Backend> {
    let Some((name, url)) = spec.split_once('=') else {
        bail!("--backend {spec:?}: expected NAME=URL");
    };
    if !url.starts_with("http://") && !url.starts_with("https://") {
        bail!("--backend {spec:?}: the URL must start with http:// or https://");
    }
    Ok(Backend {
        name: name.to_owned(),
        url: url.trim_end_matches('/').to_owned(),
        in_flight: Arc::new(AtomicUsize::new(0)),
        down_until: AtomicU64::new(0),
    })
}

async fn serve(args: RouteArgs) -> anyhow::Result<()> {
    let backends = args
        .backends
        .iter()
        .map(|b| parse_backend(b))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tokenizer = args
        .tokenizer
        .as_deref()
        .map(crate::tokenizer::load)
        .transpose()?;
    let chat = match &args.tokenizer {
        Some(t) => crate::chat::ChatTemplate::load(t, args.chat_template.as_deref())?,
        None => None,
    };
    if args.tokenizer.is_some() && chat.is_none() {
        tracing::warn!("the model has no chat template: chat requests are routed by load");
    }
    let index = match &args.index {
        // Connected lazily: the router starts (and routes by load) before the index is up.
        Some(url) => Some(IndexClient::new(
            tonic::transport::Endpoint::from_shared(url.clone())
                .with_context(|| format!("--index {url}"))?
                .connect_timeout(Duration::from_secs(1))
                .connect_lazy(),
        )),
        None => None,
    };
    let mut registry = Registry::with_prefix("kvtier_route");
    let routed = Family::<RouteLabel, Counter>::default();
    let prefix_blocks = Counter::default();
    let in_flight = Family::<BackendLabel, Gauge>::default();
    registry.register(
        "requests",
        "Requests routed, by backend and reason",
        routed.clone(),
    );
    registry.register(
        "prefix_blocks",
        "Prompt blocks the chosen backend held, per the index",
        prefix_blocks.clone(),
    );
    registry.register("in_flight", "Requests in flight per backend", in_flight.clone());
    let listen = args.listen.clone();
    let shared: Shared = Arc::new(RouteState {
        backends,
        index,
        tokenizer,
        chat,
        args,
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("HTTP client")?,
        next: AtomicU64::new(0),
        started: std::time::Instant::now(),
        routed,
        prefix_blocks,
        in_flight,
        registry,
    });
    let app = Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .fallback(proxy)
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    // Tests and scripts read the bound address (the configured port may be 0) from this line.
    tracing::info!(listen = %listener.local_addr()?, "router serving");
    // Streamed tokens are small writes: without TCP_NODELAY each waits for the client's ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(crate::index::shutdown_signal())
        .await
        .context("HTTP server")
}

async fn metrics(State(r): State<Shared>) -> Response {
    crate::http::render_metrics(&r.registry)
}

impl RouteState {
    /// The prompt's token ids, when the request's prompt can be read as vLLM would tokenize it.
    fn prompt_tokens(&self, body: &serde_json::Value) -> Option<Vec<u32>> {
        let as_ids = |v: &serde_json::Value| -> Option<Vec<u32>> {
            v.as_array()?
                .iter()
                .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                .collect()
        };
        if body.get("messages").is_some() {
            // A chat: the template's text, tokenized without special tokens (the template
            // writes them), as vLLM does.
            let text = match self.chat.as_ref()?.render(body) {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!("chat request routed by load: {e:#}");
                    return None;
                }
            };
            return crate::tokenizer::encode(self.tokenizer.as_ref()?, &text, false).ok();
        }
        match body.get("prompt")? {
            serde_json::Value::String(text) => {
                crate::tokenizer::encode(self.tokenizer.as_ref()?, text, true).ok()
            }
            // One prompt as ids, or a batch whose first prompt decides.
            v @ serde_json::Value::Array(items) => as_ids(v).or_else(|| {
                let first = items.first()?;
                first.as_str().map_or_else(
                    || as_ids(first),
                    |text| crate::tokenizer::encode(self.tokenizer.as_ref()?, text, true).ok(),
                )
            }),
            _ => None,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn is_down(&self, i: usize) -> bool {
        self.backends[i].down_until.load(Ordering::Relaxed) > self.now_ms()
    }

    fn mark_down(&self, i: usize) {
        let until = self.now_ms().saturating_add(DOWN_FOR.as_millis() as u64);
        self.backends[i].down_until.store(until, Ordering::Relaxed);
    }

    /// The least loaded backend among `among` that is up (any, if none is up).
    fn least_loaded(&self, among: impl Iterator<Item = usize>) -> usize {
        among
            .min_by_key(|&i| {
                (
                    self.is_down(i),
                    self.backends[i].in_flight.load(Ordering::Relaxed),
                    i,
                )
            })
            .unwrap_or(0)
    }

    /// The backend for a request, and why.
    async fn pick(&self, body: Option<&serde_json::Value>) -> (usize, &'static str) {
        let n = self.backends.len();
        match self.args.policy {
            Policy::RoundRobin => {
                return (
                    (self.next.fetch_add(1, Ordering::Relaxed) as usize) % n,
                    "round_robin",
                );
            }
            Policy::LeastLoaded => return (self.least_loaded(0..n), "load"),
            Policy::Prefix => {}
        }
        let (Some(index), Some(body)) = (&self.index, body) else {
            return (self.least_loaded(0..n), "load");
        };
        let Some(tokens) = self.prompt_tokens(body) else {
            return (self.least_loaded(0..n), "load");
        };
        let model = self
            .args
            .model
            .clone()
            .or_else(|| body.get("model").and_then(|m| m.as_str()).map(str::to_owned))
            .unwrap_or_default();
        // The candidates in order of preference: fewest requests in flight, then in turn. The
        // index keeps this order among equal scores and speculates on its first pod, which is
        // the one chosen here, so a new prefix is spread and then followed.
        let turn = self.next.fetch_add(1, Ordering::Relaxed) as usize;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| {
            (
                self.backends[i].in_flight.load(Ordering::Relaxed),
                (i + n - turn % n) % n,
            )
        });
        let request = proto::ScoreRequest {
            model,
            prompt: Some(proto::score_request::Prompt::Tokens(proto::TokenIds {
                ids: tokens,
            })),
            hash: Some(proto::HashConfig {
                block_size: self.args.block_size.unwrap_or(0),
                cache_salt: body
                    .get("cache_salt")
                    .and_then(|s| s.as_str())
                    .unwrap_or_default()
                    .to_owned(),
                ..Default::default()
            }),
            pods: order.iter().map(|&i| self.backends[i].name.clone()).collect(),
            speculate: true,
        };
        let mut client = index.clone();
        let call = client.score(request);
        let scores = match tokio::time::timeout(Duration::from_millis(self.args.score_timeout_ms), call).await
        {
            Ok(Ok(r)) => r.into_inner().scores,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "Score failed: routing by load");
                return (order[0], "fallback");
            }
            Err(_) => return (order[0], "fallback"),
        };
        let Some(best) = scores.first() else {
            return (order[0], "fallback");
        };
        let Some(i) = self.backends.iter().position(|b| b.name == best.pod) else {
            return (order[0], "fallback");
        };
        if best.blocks == 0 {
            return (i, "load");
        }
        self.prefix_blocks.inc_by(u64::from(best.blocks));
        (i, "prefix")
    }
}

/// Decrements a backend's in-flight count when the response body is done (or dropped).
struct InFlight {
    count: Arc<AtomicUsize>,
    gauge: Gauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

async fn proxy(State(r): State<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes: Bytes = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("request body (64 MiB at most): {e}\n"),
            )
                .into_response();
        }
    };
    let is_completion =
        parts.method == axum::http::Method::POST && parts.uri.path().ends_with("/completions");
    let json: Option<serde_json::Value> = is_completion
        .then(|| serde_json::from_slice(&bytes).ok())
        .flatten();
    let (i, reason) = if is_completion {
        r.pick(json.as_ref()).await
    } else {
        (
            (r.next.fetch_add(1, Ordering::Relaxed) as usize) % r.backends.len(),
            "round_robin",
        )
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    // A backend that refuses the connection never saw the request: mark it down and send the
    // request to the next one (once per backend).
    let mut tried = vec![false; r.backends.len()];
    let mut i = i;
    let mut reason = reason;
    let (resp, guard) = loop {
        tried[i] = true;
        let backend = &r.backends[i];
        r.routed
            .get_or_create(&RouteLabel {
                backend: backend.name.clone(),
                reason,
            })
            .inc();
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        let gauge = r
            .in_flight
            .get_or_create(&BackendLabel {
                backend: backend.name.clone(),
            })
            .clone();
        gauge.inc();
        let guard = InFlight {
            count: Arc::clone(&backend.in_flight),
            gauge,
        };
        let mut out = r
            .http
            .request(parts.method.clone(), format!("{}{path}", backend.url))
            .body(bytes.clone());
        for (name, value) in parts.headers.iter().filter(|(n, _)| end_to_end(n)) {
            out = out.header(name, value);
        }
        match out.send().await {
            Ok(resp) => break (resp, guard),
            Err(e) if e.is_connect() && tried.iter().any(|t| !t) => {
                tracing::warn!(backend = %backend.name, error = %e, "backend refused the connection: trying another");
                r.mark_down(i);
                drop(guard);
                i = r.least_loaded((0..r.backends.len()).filter(|&j| !tried[j]));
                reason = "retry";
            }
            Err(e) => {
                tracing::warn!(backend = %backend.name, error = %e, "backend failed");
                if e.is_connect() {
                    r.mark_down(i);
                }
                return (
                    StatusCode::BAD_GATEWAY,
                    format!("backend {}: {e}\n", backend.name),
                )
                    .into_response();
            }
        }
    };
    let backend = &r.backends[i];
    let status = resp.status();
    let mut headers = HeaderMap::new();
    for (name, value) in resp.headers().iter().filter(|(n, _)| end_to_end(n)) {
        headers.append(name.clone(), value.clone());
    }
    headers.insert(
        "x-kvtier-backend",
        backend
            .name
            .parse()
            .unwrap_or(axum::http::HeaderValue::from_static("?")),
    );
    // Streamed through: server-sent events reach the client as the backend sends them.
    let stream = resp.bytes_stream().map(move |chunk| {
        let _held = &guard;
        chunk
    });
    (status, headers, Body::from_stream(stream)).into_response()
}

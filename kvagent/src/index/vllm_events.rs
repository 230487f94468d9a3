//! Follows one vLLM engine's KV events: a ZMQ SUB socket connected to its publisher (vLLM binds,
//! the index connects), frames `[topic, seq (8 bytes, big-endian), msgpack batch]`.
//!
//! Sequence numbers are tracked per pod. A gap is filled through the pod's replay endpoint when
//! one is configured (a DEALER sends the first missing sequence number; the publisher answers
//! with every buffered batch from there, then an end marker); without one, the pod's entries are
//! dropped and rebuilt from the events that follow. A sequence number that goes back means the
//! engine restarted: its old entries are dropped.
//!
//! Whenever the connection to the publisher is made — first contact, or again after the engine
//! went away (the socket reconnects by itself; its monitor says when) — the pod's entries are
//! dropped and, with a replay endpoint, rebuilt from vLLM's whole buffer (`buffer_steps`
//! batches): a restarted index or engine never counts blocks that may be gone. A pod counts as
//! live (and is not aged out) only while connected.
//!
//! When the backend fails to take a batch (Redis down), or reports that it lost its entries,
//! the pod is resynced once the backend answers again: its entries cannot be vouched for.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kvstore::index::{Event, Medium};
use kvstore::vllm::{KvEvent, decode_batch};
use tokio_stream::StreamExt as _;
use zeromq::{
    DealerSocket, Socket as _, SocketEvent, SocketOptions, SocketRecv as _, SocketSend as _, SubSocket,
    ZmqMessage,
};

use super::State;
use super::config::PodConfig;
use super::metrics::{EventLabel, SourceLabel};

/// How long a replica's claim on a pod lasts without renewal (renewed every second): the
/// longest a pod goes unfollowed when the replica following it dies.
const LEASE: Duration = Duration::from_secs(5);

/// How long one replay may take before it is abandoned (the pod is then rebuilt instead).
const REPLAY_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound of one connection attempt. The socket's own retries back off up to 30 s, too slow for
/// an engine that starts a few seconds after the index; this loop retries every second instead.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

fn options() -> SocketOptions {
    let mut o = SocketOptions::default();
    o.connect_timeout(CONNECT_TIMEOUT);
    o
}

/// Per-pod progress.
#[derive(Debug)]
struct Follower {
    state: Arc<State>,
    pod: PodConfig,
    scope: u64,
    /// The sequence number expected next; None before the first batch.
    next: Option<u64>,
    /// Live batches below this were applied by a replay already (the backlog queued while it
    /// ran); 0 once a live batch past it arrives.
    replayed_below: u64,
    /// Whether the publisher is connected (the pod is live).
    connected: Arc<std::sync::atomic::AtomicBool>,
    /// The backend failed to take something since the last resync.
    backend_failed: bool,
    /// The state's resync epoch at the last resync.
    resync_epoch: u64,
}

/// Follows the pod until the process ends, reconnecting with a bounded backoff.
pub(crate) async fn follow(state: Arc<State>, pod: PodConfig, connected: Arc<std::sync::atomic::AtomicBool>) {
    let scope = State::scope(&pod.model);
    let mut f = Follower {
        resync_epoch: state.resync_epoch.load(std::sync::atomic::Ordering::SeqCst),
        state,
        pod,
        scope,
        next: None,
        replayed_below: 0,
        connected,
        backend_failed: false,
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        // With a backend shared by replicas, only the one holding the pod's lease follows it.
        if f.claim().await != Some(true) {
            f.set_connected(false);
            tokio::time::sleep(LEASE / 3).await;
            continue;
        }
        tracing::debug!(pod = %f.pod.name, endpoint = %f.pod.events, "connecting to KV events");
        let mut sub = SubSocket::with_options(options());
        let mut monitor = sub.monitor();
        match connect(&mut sub, &f.pod).await {
            Ok(()) => {
                tracing::info!(pod = %f.pod.name, endpoint = %f.pod.events, "following KV events");
                backoff = Duration::from_millis(100);
                f.start().await;
                // The monitor reports the first connection too: only one after a disconnect
                // means the publisher may have restarted.
                let mut lost = false;
                let mut check = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = check.tick() => {
                            // A backend that does not answer takes no lease away: the pod
                            // resyncs once it answers (and this replica may find it lost).
                            if f.claim().await == Some(false) {
                                tracing::info!(pod = %f.pod.name, "another replica follows the pod now");
                                break;
                            }
                            let epoch = f.state.resync_epoch.load(std::sync::atomic::Ordering::SeqCst);
                            let up = f.state.backend_up.load(std::sync::atomic::Ordering::SeqCst);
                            if !lost && up && (f.backend_failed || epoch != f.resync_epoch) {
                                tracing::info!(pod = %f.pod.name, "resyncing after a backend failure or loss");
                                f.resync().await;
                            }
                        }
                        msg = sub.recv() => match msg {
                            Ok(msg) => f.on_message(msg).await,
                            Err(e) => {
                                tracing::warn!(pod = %f.pod.name, error = %e, "KV event stream failed; reconnecting");
                                break;
                            }
                        },
                        event = monitor.next() => match event {
                            Some(SocketEvent::Disconnected(_)) => {
                                tracing::warn!(pod = %f.pod.name, "KV event publisher went away");
                                f.set_connected(false);
                                lost = true;
                            }
                            Some(SocketEvent::Connected(..)) if lost => {
                                tracing::info!(pod = %f.pod.name, "KV event publisher is back: resyncing");
                                lost = false;
                                f.resync().await;
                            }
                            Some(_) => {}
                            None => break,
                        },
                    }
                }
            }
            Err(e) => tracing::debug!(pod = %f.pod.name, error = %e, "cannot follow KV events yet"),
        }
        f.set_connected(false);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(CONNECT_TIMEOUT);
    }
}

async fn connect(sub: &mut SubSocket, pod: &PodConfig) -> Result<(), zeromq::ZmqError> {
    sub.connect(&pod.events).await?;
    sub.subscribe(&pod.topic).await
}

fn seq_of(frame: Option<&Bytes>) -> Option<u64> {
    let b: [u8; 8] = frame?.as_ref().try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

impl Follower {
    fn set_connected(&self, live: bool) {
        self.connected.store(live, std::sync::atomic::Ordering::SeqCst);
    }

    /// Claims (or renews) the pod's lease: whether it is this replica's; `None` when the
    /// backend does not answer.
    async fn claim(&mut self) -> Option<bool> {
        match self
            .state
            .backend
            .claim(&self.pod.name, &self.state.replica, LEASE)
            .await
        {
            Ok(granted) => Some(granted),
            Err(e) => {
                self.failed(&e);
                None
            }
        }
    }

    /// Begins following: from the last batch applied (by whichever replica followed the pod
    /// before) when the backend recorded one and the publisher can replay, else from scratch.
    async fn start(&mut self) {
        let applied = match self.state.backend.applied_seq(&self.pod.name).await {
            Ok(seq) => seq,
            Err(e) => {
                self.failed(&e);
                None
            }
        };
        match applied.and_then(|s| s.checked_add(1)) {
            Some(next) if self.pod.replay.is_some() && !self.backend_failed => {
                tracing::info!(pod = %self.pod.name, from = next, "going on from the last batch applied");
                self.set_connected(true);
                self.resync_epoch = self.state.resync_epoch.load(std::sync::atomic::Ordering::SeqCst);
                self.next = Some(next);
                self.replayed_below = 0;
                // A replay that starts past `next` (the buffer moved on) starts the pod over;
                // an engine that restarted meanwhile shows as a sequence that goes back.
                self.replay(next).await;
            }
            _ => self.resync().await,
        }
    }

    /// Starts the pod over: drops its entries and, with a replay endpoint, rebuilds them from
    /// the publisher's buffer.
    async fn resync(&mut self) {
        self.set_connected(true);
        self.backend_failed = false;
        self.resync_epoch = self.state.resync_epoch.load(std::sync::atomic::Ordering::SeqCst);
        self.clear().await;
        self.next = None;
        self.replayed_below = 0;
        self.replay(0).await;
    }

    async fn on_message(&mut self, msg: ZmqMessage) {
        let Some(seq) = seq_of(msg.get(1)) else {
            self.bad("a message without an 8-byte sequence number");
            return;
        };
        let payload = msg.get(2).cloned().unwrap_or_default();
        match self.next {
            Some(next) if seq == next => {}
            Some(_) if seq < self.replayed_below => return,
            Some(next) if seq > next => {
                self.gap(next, seq).await;
                if self.next.is_some_and(|n| seq < n) {
                    return;
                }
            }
            Some(next) => {
                tracing::info!(pod = %self.pod.name, seq, expected = next, "sequence went back: the engine restarted");
                self.clear().await;
            }
            None => {}
        }
        self.apply(seq, &payload).await;
        // The first live batch past the replayed ones closes the window of duplicates.
        self.replayed_below = 0;
    }

    async fn gap(&mut self, next: u64, seq: u64) {
        self.state
            .metrics
            .gaps
            .get_or_create(&SourceLabel {
                source: self.pod.name.clone(),
            })
            .inc();
        tracing::warn!(pod = %self.pod.name, expected = next, got = seq, "gap in KV events");
        if self.pod.replay.is_some() {
            self.replay(next).await;
            if self.next.is_some_and(|n| n >= seq) {
                return;
            }
        }
        // Nothing can tell what the missed batches changed: start the pod over.
        tracing::warn!(pod = %self.pod.name, "rebuilding the pod's entries from the events that follow");
        self.clear().await;
    }

    /// Drops the pod's entries.
    async fn clear(&mut self) {
        if let Err(e) = self.state.backend.clear(&self.pod.name).await {
            self.failed(&e);
        }
    }

    fn failed(&mut self, e: &super::backend::BackendError) {
        if !self.backend_failed {
            tracing::warn!(pod = %self.pod.name, "{e}: the pod resyncs once it answers");
        }
        self.backend_failed = true;
    }

    fn bad(&self, why: &str) {
        self.state
            .metrics
            .bad_batches
            .get_or_create(&SourceLabel {
                source: self.pod.name.clone(),
            })
            .inc();
        tracing::warn!(pod = %self.pod.name, "dropping a KV event batch: {why}");
    }

    /// Applies batch `seq`; a batch that does not decode is counted and skipped.
    async fn apply(&mut self, seq: u64, payload: &[u8]) {
        self.next = seq.checked_add(1);
        if self.backend_failed {
            // The resync that follows the backend's recovery replaces whatever this would add.
            return;
        }
        let batch = match decode_batch(payload) {
            Ok(b) => b,
            Err(e) => return self.bad(&e.to_string()),
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let label = SourceLabel {
            source: self.pod.name.clone(),
        };
        self.state
            .metrics
            .lag
            .get_or_create(&label)
            .set((now - batch.ts).max(0.0));
        let mut events = Vec::with_capacity(batch.events.len());
        for e in batch.events {
            let (event, kind) = match e {
                KvEvent::BlockStored { hashes, medium, .. } => (
                    Event::Stored {
                        scope: self.scope,
                        hashes,
                        medium: Medium::from_vllm(medium.as_deref()),
                    },
                    "stored",
                ),
                KvEvent::BlockRemoved { hashes, medium } => (
                    Event::Removed {
                        scope: self.scope,
                        hashes,
                        medium: Medium::from_vllm(medium.as_deref()),
                    },
                    "removed",
                ),
                KvEvent::AllBlocksCleared => (Event::Cleared, "cleared"),
            };
            events.push(event);
            self.state
                .metrics
                .events
                .get_or_create(&EventLabel {
                    source: self.pod.name.clone(),
                    kind,
                })
                .inc();
        }
        let applied = match self.state.backend.apply(&self.pod.name, &events).await {
            Ok(()) => self.state.backend.record_seq(&self.pod.name, seq).await,
            Err(e) => Err(e),
        };
        if let Err(e) = applied {
            self.failed(&e);
        }
    }

    /// Asks the pod's replay endpoint for every buffered batch from `from` on and applies them.
    async fn replay(&mut self, from: u64) {
        let Some(endpoint) = self.pod.replay.clone() else {
            return;
        };
        match tokio::time::timeout(REPLAY_TIMEOUT, self.fetch_replay(&endpoint, from)).await {
            Ok(Ok(n)) => tracing::info!(pod = %self.pod.name, from, batches = n, "replayed KV events"),
            Ok(Err(e)) => tracing::warn!(pod = %self.pod.name, error = %e, "KV event replay failed"),
            Err(_) => tracing::warn!(pod = %self.pod.name, "KV event replay timed out"),
        }
        // Whatever was applied, live batches queued meanwhile below this are duplicates.
        self.replayed_below = self.next.unwrap_or(0);
    }

    async fn fetch_replay(&mut self, endpoint: &str, from: u64) -> Result<usize, zeromq::ZmqError> {
        let mut dealer = DealerSocket::with_options(options());
        dealer.connect(endpoint).await?;
        let request: ZmqMessage = vec![Bytes::new(), Bytes::copy_from_slice(&from.to_be_bytes())]
            .try_into()
            .map_err(|_| zeromq::ZmqError::Other("empty replay request"))?;
        dealer.send(request).await?;
        let mut n = 0;
        loop {
            // [b"", topic, seq, payload]; the end marker has seq -1.
            let msg = dealer.recv().await?;
            let Some(seq) = seq_of(msg.get(2)) else {
                self.bad("a replay message without a sequence number");
                continue;
            };
            if seq == u64::MAX {
                return Ok(n);
            }
            if self.next.is_none_or(|next| seq >= next) {
                if let Some(next) = self.next.filter(|&next| seq > next) {
                    tracing::warn!(pod = %self.pod.name, expected = next, got = seq, "replay starts past the gap");
                    self.clear().await;
                }
                let payload = msg.get(3).cloned().unwrap_or_default();
                self.apply(seq, &payload).await;
                n += 1;
            }
        }
    }
}

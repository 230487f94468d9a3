//! The TCP data plane: several streams per peer, each block sent straight from the source's
//! arena slot and received straight into the puller's reserved slot.
//!
//! On a new connection the server sends `"KVTD" | version u16 | flags u16 | nonce[32]`; the
//! client answers with the shared secret's MAC of the nonce (zeros without a secret) and the
//! server says `0` (accepted) or `1` (refused, then closes). A request is
//! `grant_id[16] | count u32 | index u32 × count`; the answer is, per index in order,
//! `status u8 | len u64` followed by `len` payload bytes (status 0 = the block, 1 = no such
//! block in the grant, 2 = unknown grant). All integers are little endian. Connections are kept
//! and reused for later pulls from the same peer; any error drops the connection.

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use self::data::DataStream;
use super::auth::{MAC_LEN, Secret, random_nonce};
use super::grants::{GrantId, Grants, MAX_GRANT_BLOCKS};
use super::{BoxFuture, PullItem, Pulled, Transport, TransportError, TransportKind, fail_all};
use crate::block::ChecksumStream;
use crate::store::TieredStore;

const MAGIC: [u8; 4] = *b"KVTD";
const VERSION: u16 = 1;
const HELLO_LEN: usize = 8 + MAC_LEN;
const FLAG_SECRET: u16 = 1;
const REPLY_HEADER: usize = 9;
/// Blocks per gather write on the source.
const WRITE_BATCH: usize = 64;
/// A request for one block from this size on is answered with `sendfile`: the socket takes
/// references to the arena's pages instead of a copy, so the only copy is the puller's (a
/// 1 MiB block arrived in 160 µs instead of 240 on loopback). A run of blocks goes out in
/// gather writes instead: the source's copy of one block then overlaps the puller's read of
/// the one before, and the puller reading the source's cold pages (what `sendfile` leaves it)
/// measured 10–30 % slower than reading the source's fresh copies.
const SENDFILE_MIN: u64 = 256 << 10;
/// Bytes of a block received before they are checksummed: small enough to be checksummed from
/// the core's own cache, large enough that a read brings many segments at once.
const HASH_PIECE: usize = 256 << 10;
/// Bytes below which a pull is not spread over another stream.
const MIN_STREAM_BYTES: u64 = 1 << 20;

const STATUS_OK: u8 = 0;
const STATUS_NO_BLOCK: u8 = 1;
const STATUS_UNKNOWN_GRANT: u8 = 2;

/// Settings of the TCP data plane.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// Parallel streams one pull is spread over (each carries a contiguous run of blocks).
    /// Each stream keeps a thread busy on both sides, so the default is one per four cores of
    /// this machine, 1–4 ([`default_streams`]).
    pub streams: usize,
    /// Bound on connecting and on the handshake.
    pub connect_timeout: Duration,
    /// Bound on one stream's share of a pull: a peer that stops sending fails its blocks then.
    /// A source bounds each answer by it too, so a puller that stops reading (or the rest of
    /// its request) releases the blocks the answer pins.
    pub io_timeout: Duration,
    /// How long a source keeps a data connection that brings no request open: pullers keep
    /// theirs for the next pull, and replace one the source closed.
    pub idle_timeout: Duration,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            streams: default_streams(),
            connect_timeout: Duration::from_secs(3),
            io_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// One stream per four cores, 1–4: a stream moves about 5 GB/s and keeps a core busy on each
/// side, so more streams than cores only take turns (on 2 cores, two streams ran 20–40 % below
/// one).
pub fn default_streams() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    (cores / 4).clamp(1, 4)
}

/// Idle data connections a puller keeps per source for its next pulls (twice
/// [`TcpConfig::streams`] where that is more). Each pull in flight takes a connection of its
/// own (one per stream), since an agent pulls for several decode requests at once; a pull
/// that found none kept connects anew, handshake and all, and with two kept the third and
/// fourth of four pulls at once did so every time and dropped the connection after (four
/// 64 KiB pulls at once over loopback on a 2-core VM: 0.89 GB/s together with two kept,
/// 1.0–1.9 with these). Each kept connection holds a socket on both sides and a serving task on
/// the source until it is reused or has been idle for [`TcpConfig::idle_timeout`], when the
/// source closes it; the first pull that finds one closed drops the others kept for that
/// source.
pub const KEPT_CONNECTIONS_PER_PEER: usize = 16;

/// The TCP backend of [`Transport`].
#[derive(Debug, Clone)]
pub struct TcpTransport {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<TieredStore>,
    grants: Option<Arc<Grants>>,
    secret: Option<Secret>,
    cfg: TcpConfig,
    listen: Mutex<Option<SocketAddr>>,
    /// Idle connections per peer.
    pool: Mutex<HashMap<SocketAddr, Vec<DataStream>>>,
    /// Whether blocks can still be sent with `sendfile` (cleared the first time the arena
    /// turns out not to support it).
    sendfile: AtomicBool,
    /// Connections this side has opened, for the tests of connection reuse.
    #[cfg(test)]
    opened: std::sync::atomic::AtomicUsize,
}

impl TcpTransport {
    /// A transport that pulls into `store`'s arena and, once [`Self::serve`] runs, serves the
    /// grants of `grants` (`None`: pull only). Without a secret it neither proves nor checks one.
    pub fn new(
        store: Arc<TieredStore>,
        grants: Option<Arc<Grants>>,
        secret: Option<Secret>,
        cfg: TcpConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                grants,
                secret,
                cfg,
                listen: Mutex::new(None),
                pool: Mutex::new(HashMap::new()),
                sendfile: AtomicBool::new(true),
                #[cfg(test)]
                opened: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }

    /// Serves grants to peers on `listener` until the runtime shuts down. Call it from a tokio
    /// runtime; it returns at once.
    pub fn serve(&self, listener: TcpListener) -> std::io::Result<SocketAddr> {
        let addr = listener.local_addr()?;
        *self.inner.listen.lock() = Some(addr);
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let inner = Arc::clone(&inner);
                        tokio::spawn(async move {
                            match inner.serve_connection(stream).await {
                                Ok(()) => {}
                                // A puller that breaks the protocol or its time bounds: worth
                                // an operator's look, unlike one that went away.
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::InvalidData | std::io::ErrorKind::TimedOut
                                    ) =>
                                {
                                    tracing::warn!(%peer, error = %e, "closed a peer data connection");
                                }
                                Err(e) => tracing::debug!(%peer, error = %e, "peer data connection ended"),
                            }
                        });
                    }
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting a peer data connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(addr)
    }
}

impl Transport for TcpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn endpoint(&self, seen_as: Option<IpAddr>) -> Vec<u8> {
        let Some(mut addr) = *self.inner.listen.lock() else {
            return Vec::new();
        };
        if addr.ip().is_unspecified() {
            if let Some(ip) = seen_as {
                addr.set_ip(ip);
            }
        }
        addr.to_string().into_bytes()
    }

    fn pull<'a>(
        &'a self,
        endpoint: &'a [u8],
        grant: GrantId,
        items: Vec<PullItem>,
        deadline: Instant,
    ) -> BoxFuture<'a, Vec<Pulled>> {
        Box::pin(async move {
            let peer = match parse_endpoint(endpoint) {
                Ok(p) => p,
                Err(e) => return fail_all(items, &e),
            };
            if items.is_empty() {
                return Vec::new();
            }
            let total: u64 = items.iter().map(|i| i.slot.len()).sum();
            // A stream per MIN_STREAM_BYTES at most: a small pull gains nothing from more
            // streams and pays their wake-ups.
            let streams = self
                .inner
                .cfg
                .streams
                .clamp(1, total.div_ceil(MIN_STREAM_BYTES).max(1) as usize);
            let mut chunks = split_by_bytes(items, streams).into_iter();
            // The first stream runs on this task, with no hop to another worker; the others on
            // tasks of their own.
            let first = chunks.next().unwrap_or_default();
            let mut tasks = Vec::new();
            for chunk in chunks {
                let inner = Arc::clone(&self.inner);
                tasks.push(tokio::spawn(async move {
                    inner.pull_chunk(peer, grant, chunk, deadline).await
                }));
            }
            let mut out = self.inner.pull_chunk(peer, grant, first, deadline).await;
            for t in tasks {
                match t.await {
                    Ok(done) => out.extend(done),
                    // The chunk's slots are lost with the panicked task (their reservations are
                    // dropped unsettled); re-raise rather than report a partial answer.
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                }
            }
            out
        })
    }
}

impl Inner {
    async fn serve_connection(&self, mut s: TcpStream) -> std::io::Result<()> {
        s.set_nodelay(true)?;
        let nonce = random_nonce();
        let mut hello = [0u8; HELLO_LEN];
        hello[..4].copy_from_slice(&MAGIC);
        hello[4..6].copy_from_slice(&VERSION.to_le_bytes());
        let flags = if self.secret.is_some() { FLAG_SECRET } else { 0 };
        hello[6..8].copy_from_slice(&flags.to_le_bytes());
        hello[8..].copy_from_slice(&nonce);
        s.write_all(&hello).await?;
        let mut answer = [0u8; MAC_LEN];
        tokio::time::timeout(self.cfg.connect_timeout, s.read_exact(&mut answer))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if let Some(secret) = &self.secret {
            if !secret.check_answer(&nonce, &answer) {
                tracing::warn!(peer = ?s.peer_addr().ok(), "refused a peer data connection: wrong shared secret");
                s.write_all(&[1]).await?;
                return Ok(());
            }
        }
        s.write_all(&[0]).await?;
        let mut s = DataStream::new(s)?;
        let mut indices = Vec::new();
        loop {
            let mut head = [0u8; 20];
            let waited =
                tokio::time::timeout(self.cfg.idle_timeout, s.read_exact(&mut head, SERVE_SPIN)).await;
            match waited {
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(Err(e)) => return Err(e),
                // Idle: closed, as the puller's pool expects of any source.
                Err(_) => return Ok(()),
            }
            let grant = GrantId(head[..16].try_into().expect("16 bytes"));
            let count = u32::from_le_bytes(head[16..20].try_into().expect("4 bytes")) as usize;
            if count == 0 || count > MAX_GRANT_BLOCKS {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("request for {count} blocks"),
                ));
            }
            tokio::time::timeout(
                self.cfg.io_timeout,
                self.answer(&mut s, grant, count, &mut indices),
            )
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the puller did not send its request or read the answer in time",
                )
            })??;
        }
    }

    /// Reads the `count` block indices of a request for `grant` and writes their answer.
    async fn answer(
        &self,
        s: &mut DataStream,
        grant: GrantId,
        count: usize,
        indices: &mut Vec<u32>,
    ) -> std::io::Result<()> {
        let mut raw = vec![0u8; 4 * count];
        s.read_exact(&mut raw, SERVE_SPIN).await?;
        indices.clear();
        indices.extend(
            raw.chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))),
        );
        let entry = self.grants.as_ref().and_then(|g| g.get(&grant));
        if let (Some(e), Some(g)) = (&entry, &self.grants) {
            if self.sendfile.load(Ordering::Relaxed)
                && let [only] = indices[..]
                && let Some((offset, data)) = e.offset(only).zip(e.block(only))
                && data.len() as u64 >= SENDFILE_MIN
            {
                return self
                    .send_file(s, g.store().host().arena().fd(), offset, data)
                    .await;
            }
        }
        // Several blocks per system call: their headers and payloads as one gather list.
        for group in indices.chunks(WRITE_BATCH) {
            let mut headers = [[0u8; REPLY_HEADER]; WRITE_BATCH];
            let mut datas: [&[u8]; WRITE_BATCH] = [&[]; WRITE_BATCH];
            for (j, &i) in group.iter().enumerate() {
                let (status, data) = match &entry {
                    None => (STATUS_UNKNOWN_GRANT, &[][..]),
                    Some(e) => e.block(i).map_or((STATUS_NO_BLOCK, &[][..]), |d| (STATUS_OK, d)),
                };
                headers[j][0] = status;
                headers[j][1..].copy_from_slice(&(data.len() as u64).to_le_bytes());
                datas[j] = data;
            }
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 * group.len());
            for (h, d) in headers.iter().zip(&datas).take(group.len()) {
                slices.push(IoSlice::new(h));
                if !d.is_empty() {
                    slices.push(IoSlice::new(d));
                }
            }
            s.write_all_vectored(&mut slices).await?;
        }
        Ok(())
    }

    /// Sends a granted block, `data` at `offset` in the arena `arena`, after its header with
    /// `sendfile`; falls back to copies for good if the arena cannot be sent so (hugetlbfs, on
    /// some kernels).
    async fn send_file(
        &self,
        s: &mut DataStream,
        arena: BorrowedFd<'_>,
        offset: u64,
        data: &[u8],
    ) -> std::io::Result<()> {
        let mut header = [0u8; REPLY_HEADER];
        header[0] = STATUS_OK;
        header[1..].copy_from_slice(&(data.len() as u64).to_le_bytes());
        // Not held back for the payload (MSG_MORE): after a long run of writes that left the
        // connection corked a one-block answer then waited tens of microseconds.
        s.write_all(&header).await?;
        if !s.send_file(arena, offset, data.len()).await? {
            if self.sendfile.swap(false, Ordering::Relaxed) {
                tracing::info!("the host arena cannot be sent with sendfile; peers get copies");
            }
            s.write_all(data).await?;
        }
        Ok(())
    }

    /// Keeps a connection to `peer` that a pull has done with for the next pull, unless
    /// [`KEPT_CONNECTIONS_PER_PEER`] are kept already (it is closed then).
    fn keep(&self, peer: SocketAddr, stream: DataStream) {
        let mut pool = self.pool.lock();
        let idle = pool.entry(peer).or_default();
        if idle.len() < KEPT_CONNECTIONS_PER_PEER.max(2 * self.cfg.streams) {
            idle.push(stream);
        }
    }

    async fn connect(&self, peer: SocketAddr, deadline: Instant) -> Result<DataStream, TransportError> {
        let io = |e: std::io::Error| TransportError::Io {
            peer: peer.to_string(),
            reason: e.to_string(),
        };
        #[cfg(test)]
        self.opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let handshake = async {
            let mut s = TcpStream::connect(peer).await.map_err(io)?;
            s.set_nodelay(true).map_err(io)?;
            let mut hello = [0u8; HELLO_LEN];
            s.read_exact(&mut hello).await.map_err(io)?;
            if hello[..4] != MAGIC || u16::from_le_bytes([hello[4], hello[5]]) != VERSION {
                return Err(TransportError::Protocol {
                    peer: peer.to_string(),
                    reason: "not a kvtier data port, or another version".into(),
                });
            }
            let nonce: [u8; MAC_LEN] = hello[8..].try_into().expect("32 bytes");
            let answer = self.secret.as_ref().map_or([0u8; MAC_LEN], |s| s.answer(&nonce));
            s.write_all(&answer).await.map_err(io)?;
            let mut status = [0u8; 1];
            match s.read_exact(&mut status).await {
                Ok(_) if status[0] == 0 => DataStream::new(s).map_err(io),
                Ok(_) => Err(TransportError::Refused {
                    peer: peer.to_string(),
                }),
                // A refusing server may close before we read its answer.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(TransportError::Refused {
                    peer: peer.to_string(),
                }),
                Err(e) => Err(io(e)),
            }
        };
        let bound = self
            .cfg
            .connect_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        tokio::time::timeout(bound, handshake)
            .await
            .map_err(|_| TransportError::TimedOut {
                peer: peer.to_string(),
            })?
    }

    async fn pull_chunk(
        &self,
        peer: SocketAddr,
        grant: GrantId,
        mut items: Vec<PullItem>,
        deadline: Instant,
    ) -> Vec<Pulled> {
        let mut done: Vec<Option<Result<(), TransportError>>> = vec![None; items.len()];
        let mut idle = self.pool.lock().get_mut(&peer).and_then(Vec::pop);
        let (stream, result) = loop {
            let pooled = idle.is_some();
            let mut stream = match idle.take() {
                Some(s) => s,
                None => match self.connect(peer, deadline).await {
                    Ok(s) => s,
                    Err(e) => return fail_all(items, &e),
                },
            };
            let transfer = self.receive(&mut stream, peer, grant, &mut items, &mut done);
            let bound = self
                .cfg
                .io_timeout
                .min(deadline.saturating_duration_since(Instant::now()));
            let result = match tokio::time::timeout(bound, transfer).await {
                Ok(r) => r,
                Err(_) => Err(TransportError::TimedOut {
                    peer: peer.to_string(),
                }),
            };
            // A kept connection the peer closed meanwhile (it restarted, or dropped idle
            // connections) fails before anything arrives: once more on a fresh one.
            let stale = pooled
                && matches!(result, Err(TransportError::Io { .. }))
                && done.iter().all(Option::is_none);
            if !stale {
                break (stream, result);
            }
            // The others kept with it have most likely been closed too (a source closes
            // connections idle for as long): dropped, rather than a failed try each.
            self.pool.lock().remove(&peer);
        };
        let err = match result {
            Ok(()) => {
                self.keep(peer, stream);
                None
            }
            Err(e) => Some(e),
        };
        items
            .into_iter()
            .zip(done)
            .map(|(item, outcome)| Pulled {
                index: item.index,
                slot: item.slot,
                result: match (outcome, &err) {
                    (Some(r), _) => r,
                    (None, Some(e)) => Err(e.clone()),
                    (None, None) => Err(TransportError::Protocol {
                        peer: peer.to_string(),
                        reason: "block not sent".into(),
                    }),
                },
            })
            .collect()
    }

    /// Sends one request for `items` and reads every answer; `done[i]` is set for each block
    /// received whole. An `Err` means the stream is no longer usable.
    async fn receive(
        &self,
        s: &mut DataStream,
        peer: SocketAddr,
        grant: GrantId,
        items: &mut [PullItem],
        done: &mut [Option<Result<(), TransportError>>],
    ) -> Result<(), TransportError> {
        let io = |e: std::io::Error| TransportError::Io {
            peer: peer.to_string(),
            reason: e.to_string(),
        };
        let mut req = Vec::with_capacity(20 + 4 * items.len());
        req.extend_from_slice(&grant.0);
        req.extend_from_slice(&(items.len() as u32).to_le_bytes());
        for it in items.iter() {
            req.extend_from_slice(&it.index.to_le_bytes());
        }
        s.write_all(&req).await.map_err(io)?;
        let mut header = [0u8; REPLY_HEADER];
        // Bytes of the current header already read along with the previous payload.
        let mut have = 0;
        let last = items.len().saturating_sub(1);
        for (n, (item, done)) in items.iter_mut().zip(done.iter_mut()).enumerate() {
            s.read_exact(&mut header[have..], PULL_SPIN).await.map_err(io)?;
            have = 0;
            let len = u64::from_le_bytes(header[1..].try_into().expect("8 bytes"));
            match header[0] {
                STATUS_OK if len == item.slot.len() => {
                    let dst = self.store.host().reserved_mut(&mut item.slot);
                    let mut next = [0u8; REPLY_HEADER];
                    let next_len = if n < last { REPLY_HEADER } else { 0 };
                    // Checksummed piece by piece as the pieces land, while each is still in
                    // the cache the copy left it in.
                    let mut sum = ChecksumStream::default();
                    let mut pieces = dst.chunks_mut(HASH_PIECE).peekable();
                    while let Some(piece) = pieces.next() {
                        if pieces.peek().is_some() {
                            s.read_exact(piece, PULL_SPIN).await.map_err(io)?;
                        } else {
                            have = s
                                .read_with_next(piece, &mut next[..next_len], PULL_SPIN)
                                .await
                                .map_err(io)?;
                        }
                        sum.update(piece);
                    }
                    header[..have].copy_from_slice(&next[..have]);
                    *done = Some(if sum.finish() == item.checksum {
                        Ok(())
                    } else {
                        Err(TransportError::Checksum {
                            peer: peer.to_string(),
                            index: item.index,
                        })
                    });
                }
                STATUS_OK => {
                    return Err(TransportError::Protocol {
                        peer: peer.to_string(),
                        reason: format!(
                            "block {} is {len} bytes, the grant said {}",
                            item.index,
                            item.slot.len()
                        ),
                    });
                }
                // A refused block leaves the stream in step: the connection is still good, and
                // the block fails with the source's reason.
                STATUS_NO_BLOCK if len == 0 => {
                    *done = Some(Err(TransportError::Protocol {
                        peer: peer.to_string(),
                        reason: format!("block {} is not in the grant", item.index),
                    }));
                }
                STATUS_UNKNOWN_GRANT if len == 0 => {
                    *done = Some(Err(TransportError::UnknownGrant {
                        peer: peer.to_string(),
                    }));
                }
                other => {
                    return Err(TransportError::Protocol {
                        peer: peer.to_string(),
                        reason: format!("reply status {other} with length {len}"),
                    });
                }
            }
        }
        Ok(())
    }
}

/// How long a source polls a connection for its next request before sleeping. The next request
/// of a pull usually comes within tens of microseconds, and waking a sleeping thread costs
/// about as much again.
const SERVE_SPIN: Duration = Duration::from_micros(50);

/// How long a puller polls its socket without progress before sleeping. Its answer is on the
/// way, and parking costs two wake-ups (the I/O driver's thread, then this one) that would
/// double the time of a small pull.
const PULL_SPIN: Duration = Duration::from_millis(1);

fn parse_endpoint(endpoint: &[u8]) -> Result<SocketAddr, TransportError> {
    let text = String::from_utf8_lossy(endpoint);
    text.parse().map_err(|e| TransportError::BadEndpoint {
        endpoint: text.to_string(),
        reason: format!("not ip:port ({e})"),
    })
}

/// Splits items into at most `n` contiguous runs of about equal bytes (one per stream).
fn split_by_bytes(items: Vec<PullItem>, n: usize) -> Vec<Vec<PullItem>> {
    let total: u64 = items.iter().map(|i| i.slot.len()).sum();
    let n = n.min(items.len()).max(1) as u64;
    let mut out: Vec<Vec<PullItem>> = Vec::with_capacity(n as usize);
    let mut cur = Vec::new();
    let mut bytes = 0;
    for item in items {
        bytes += item.slot.len();
        cur.push(item);
        // Cut where the running total crosses the next n-th of the whole.
        if (out.len() as u64 + 1) < n && bytes * n >= (out.len() as u64 + 1) * total {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

mod data;
#[cfg(test)]
mod tests;

//! `kvtier._native`: Python bindings of `kvstore::client`. Every call releases the GIL; block
//! copies between an engine's KV-cache pages (given as addresses) and arena slots run in Rust,
//! batched, on a thread pool for CPU memory. The pure-Python package `kvtier` wraps this module
//! with types and documentation; protocol logic lives only in Rust.

use std::time::Duration;

use kvstore::client::{Acquired, Client as RustClient, ClientConfig, ClientError, Reserved, SaveOutcome};
use kvstore::pages::{self, Copier, CpuCopier, LayerPages};
use kvstore::{BlockHash, Namespace, NamespaceBuilder, TierLevel};
use parking_lot::Mutex;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

create_exception!(
    _native,
    KvtierError,
    PyException,
    "A call to the kvtier agent failed."
);
create_exception!(
    _native,
    AgentUnavailable,
    KvtierError,
    "No kvtier agent answers at the socket (the engine should recompute)."
);
create_exception!(
    _native,
    AgentTimeout,
    KvtierError,
    "The kvtier agent did not answer in time."
);
create_exception!(
    _native,
    StaleHandle,
    KvtierError,
    "A lease or reservation of a connection that has ended."
);

fn to_py(e: ClientError) -> PyErr {
    match e {
        ClientError::Unavailable { .. } => AgentUnavailable::new_err(e.to_string()),
        ClientError::Timeout(_) => AgentTimeout::new_err(e.to_string()),
        ClientError::StaleHandle => StaleHandle::new_err(e.to_string()),
        ClientError::InvalidArgument(_) => PyValueError::new_err(e.to_string()),
        e => KvtierError::new_err(e.to_string()),
    }
}

fn ns_of(ns: &[u8]) -> PyResult<Namespace> {
    let bytes: [u8; 16] = ns
        .try_into()
        .map_err(|_| PyValueError::new_err(format!("a namespace is 16 bytes, got {}", ns.len())))?;
    Ok(Namespace::from_bytes(bytes))
}

fn hashes_of(hashes: &[Vec<u8>]) -> PyResult<Vec<BlockHash>> {
    hashes
        .iter()
        .enumerate()
        .map(|(i, h)| BlockHash::new(h).map_err(|e| PyValueError::new_err(format!("hash {i}: {e}"))))
        .collect()
}

fn layers_of(layers: &[(usize, usize, usize)]) -> PyResult<Vec<LayerPages>> {
    if layers.is_empty() {
        return Err(PyValueError::new_err("at least one layer"));
    }
    layers
        .iter()
        .map(|&(base, stride, page)| {
            if base == 0 || page == 0 {
                Err(PyValueError::new_err(
                    "a layer needs a non-null base and a non-empty page",
                ))
            } else {
                Ok(LayerPages { base, stride, page })
            }
        })
        .collect()
}

/// Tier codes as Python sees them (ints, not bytes): 0 miss, 1 host, 2 disk, 3 another node's
/// agent (lookup only: acquiring pulls it), 4 the shared object store.
fn tier_code(t: Option<TierLevel>) -> u32 {
    match t {
        None => 0,
        Some(TierLevel::Host) => 1,
        Some(TierLevel::Peer) => 3,
        Some(TierLevel::Object) => 4,
        // Disk, and any lower tier a newer library adds: below the arena, promoted to read.
        Some(_) => 2,
    }
}

fn outcome_name(o: SaveOutcome) -> &'static str {
    match o {
        SaveOutcome::Stored => "stored",
        SaveOutcome::Exists => "exists",
        SaveOutcome::NoSpace => "no_space",
        SaveOutcome::TooLarge => "too_large",
    }
}

/// A connection to the node agent.
#[pyclass(module = "kvtier._native", frozen)]
struct Client {
    inner: RustClient,
}

#[pymethods]
impl Client {
    /// Connects to the agent at `socket` (None: `$KVTIER_SOCKET`, else the default path).
    /// With `lazy`, connects on the first call instead, so an engine may start first.
    #[new]
    #[pyo3(signature = (socket=None, timeout_ms=1000, name=None, lazy=true))]
    fn new(
        py: Python<'_>,
        socket: Option<String>,
        timeout_ms: u64,
        name: Option<String>,
        lazy: bool,
    ) -> PyResult<Self> {
        let mut cfg = socket.map_or_else(ClientConfig::from_env, ClientConfig::new);
        if timeout_ms == 0 {
            return Err(PyValueError::new_err("timeout_ms must be positive"));
        }
        cfg.timeout = Duration::from_millis(timeout_ms);
        if let Some(name) = name {
            cfg.name = name;
        }
        let inner = if lazy {
            RustClient::lazy(cfg)
        } else {
            py.detach(|| RustClient::connect(cfg)).map_err(to_py)?
        };
        Ok(Self { inner })
    }

    /// The socket path.
    #[getter]
    fn socket(&self) -> String {
        self.inner.config().socket.display().to_string()
    }

    /// Whether a connection is open now.
    #[getter]
    fn connected(&self) -> bool {
        self.inner.is_connected()
    }

    /// Closes the connection (the agent gives back whatever it held); the next call reconnects.
    fn disconnect(&self) {
        self.inner.disconnect();
    }

    /// Tier codes (1 host, 2 disk, 3 peer, 4 object store) of the leading stored blocks; its
    /// length is the match.
    fn lookup(&self, py: Python<'_>, ns: &[u8], hashes: Vec<Vec<u8>>) -> PyResult<Vec<u32>> {
        let (ns, hashes) = (ns_of(ns)?, hashes_of(&hashes)?);
        let tiers = py.detach(|| self.inner.lookup(&ns, &hashes)).map_err(to_py)?;
        Ok(tiers.into_iter().map(|t| tier_code(Some(t))).collect())
    }

    /// Saves blocks given as bytes; one outcome per block: "stored", "exists", "no_space" or
    /// "too_large".
    fn save(
        &self,
        py: Python<'_>,
        ns: &[u8],
        hashes: Vec<Vec<u8>>,
        data: Vec<Vec<u8>>,
    ) -> PyResult<Vec<&'static str>> {
        if hashes.len() != data.len() {
            return Err(PyValueError::new_err("one payload per hash"));
        }
        let (ns, hashes) = (ns_of(ns)?, hashes_of(&hashes)?);
        let items: Vec<(BlockHash, &[u8])> = hashes
            .iter()
            .copied()
            .zip(data.iter().map(Vec::as_slice))
            .collect();
        let out = py.detach(|| self.inner.save(&ns, &items)).map_err(to_py)?;
        Ok(out.into_iter().map(outcome_name).collect())
    }

    /// Loads blocks as bytes; None for a miss.
    fn load<'py>(
        &self,
        py: Python<'py>,
        ns: &[u8],
        hashes: Vec<Vec<u8>>,
    ) -> PyResult<Vec<Option<Bound<'py, PyBytes>>>> {
        let (ns, hashes) = (ns_of(ns)?, hashes_of(&hashes)?);
        let blocks: Vec<Option<Vec<u8>>> = py
            .detach(|| -> Result<_, ClientError> {
                let held = self.inner.acquire(&ns, &hashes)?;
                let mut out = Vec::with_capacity(held.len());
                for a in &held {
                    out.push(a.as_ref().and_then(|a| a.with_slot(<[u8]>::to_vec)));
                }
                self.inner.release(&ns, held.into_iter().flatten().collect())?;
                Ok(out)
            })
            .map_err(to_py)?;
        Ok(blocks
            .into_iter()
            .map(|b| b.map(|b| PyBytes::new(py, &b)))
            .collect())
    }

    /// Saves blocks straight from an engine's KV-cache pages: block `i` is `block_ids[i]`'s page
    /// of every layer, `layers` being `(base address, block stride, page bytes)` per layer.
    /// Returns one outcome per block, as `save`. The pages must stay valid during the call.
    fn save_pages(
        &self,
        py: Python<'_>,
        ns: &[u8],
        hashes: Vec<Vec<u8>>,
        block_ids: Vec<usize>,
        layers: Vec<(usize, usize, usize)>,
    ) -> PyResult<Vec<&'static str>> {
        if hashes.len() != block_ids.len() {
            return Err(PyValueError::new_err("one block id per hash"));
        }
        let (ns, hashes, layers) = (ns_of(ns)?, hashes_of(&hashes)?, layers_of(&layers)?);
        let len = pages::block_len(&layers) as u64;
        let copier = CpuCopier;
        let wanted: Vec<(BlockHash, u64)> = hashes.iter().map(|h| (*h, len)).collect();
        let out = py
            .detach(|| {
                self.inner.save_with(
                    &ns,
                    &wanted,
                    copier.parallel(),
                    // SAFETY: the caller promised the pages readable for the call.
                    |i, slot| unsafe { copier.gather(&layers, block_ids[i], slot) },
                    || copier.finish(),
                )
            })
            .map_err(to_py)?;
        Ok(out.into_iter().map(outcome_name).collect())
    }

    /// Reserves a slot of `block_bytes` for each block, to be filled with
    /// `Reservation.write_pages` (layer by layer, if the engine saves that way) and then
    /// committed or aborted. Blocks the agent holds already get no slot.
    fn reserve_pages(
        &self,
        py: Python<'_>,
        ns: &[u8],
        hashes: Vec<Vec<u8>>,
        block_bytes: u64,
    ) -> PyResult<Reservation> {
        let (ns, hashes) = (ns_of(ns)?, hashes_of(&hashes)?);
        let items: Vec<(BlockHash, u64)> = hashes.iter().map(|h| (*h, block_bytes)).collect();
        let reserved = py.detach(|| self.inner.reserve(&ns, &items)).map_err(to_py)?;
        let mut outcomes = Vec::with_capacity(reserved.len());
        let slots = reserved
            .into_iter()
            .map(|r| match r {
                Ok(slot) => {
                    outcomes.push(SaveOutcome::Stored);
                    Some(slot)
                }
                Err(o) => {
                    outcomes.push(o);
                    None
                }
            })
            .collect();
        Ok(Reservation {
            ns,
            block_bytes: block_bytes as usize,
            slots: Mutex::new(Some(slots)),
            outcomes,
        })
    }

    /// Publishes the filled slots of `reservation`; one outcome per requested block, as
    /// `save` ("no_space" where the agent could not keep a written block).
    fn commit(&self, py: Python<'_>, reservation: &Reservation) -> PyResult<Vec<&'static str>> {
        let (idx, slots) = py.detach(|| reservation.take())?;
        let mut out = reservation.outcomes.clone();
        let kept = py
            .detach(|| self.inner.commit(&reservation.ns, slots))
            .map_err(to_py)?;
        for (i, ok) in idx.into_iter().zip(kept) {
            if !ok {
                out[i] = SaveOutcome::NoSpace;
            }
        }
        Ok(out.into_iter().map(outcome_name).collect())
    }

    /// Gives the slots of `reservation` back unwritten.
    fn abort(&self, py: Python<'_>, reservation: &Reservation) -> PyResult<()> {
        let (_, slots) = py.detach(|| reservation.take())?;
        py.detach(|| self.inner.abort(&reservation.ns, slots))
            .map(drop)
            .map_err(to_py)
    }

    /// Pins blocks for loading later (the pins survive the agent's death: the mapped arena
    /// stays readable). Returns a `Leases` handle.
    fn acquire(&self, py: Python<'_>, ns: &[u8], hashes: Vec<Vec<u8>>) -> PyResult<Leases> {
        let (ns, hashes) = (ns_of(ns)?, hashes_of(&hashes)?);
        let held = py.detach(|| self.inner.acquire(&ns, &hashes)).map_err(to_py)?;
        Ok(Leases {
            ns,
            held: Mutex::new(held),
        })
    }

    /// Loads blocks straight into an engine's KV-cache pages (layout as `save_pages`): acquire,
    /// copy, release. Returns a tier code per block (0: miss, pages untouched).
    fn load_pages(
        &self,
        py: Python<'_>,
        ns: &[u8],
        hashes: Vec<Vec<u8>>,
        block_ids: Vec<usize>,
        layers: Vec<(usize, usize, usize)>,
    ) -> PyResult<Vec<u32>> {
        let leases = self.acquire(py, ns, hashes)?;
        let tiers = leases.load_pages(py, block_ids, layers, 0)?;
        leases.release(py, self)?;
        Ok(tiers)
    }

    /// Releases the blocks of `leases`.
    fn release(&self, py: Python<'_>, leases: &Leases) -> PyResult<()> {
        leases.release(py, self)
    }

    /// Tells the agent which model ``ns``'s blocks belong to (the name routers score by), so
    /// that it reports them to the cluster index; sent again on every new connection.
    fn announce(&self, py: Python<'_>, ns: &[u8], model: &str) -> PyResult<()> {
        let ns = ns_of(ns)?;
        py.detach(|| self.inner.announce(&ns, model)).map_err(to_py)
    }

    /// Has the agent copy the longest prefix of ``hashes`` that the agent at ``peer`` (its peer
    /// address, ``host:port``) holds into its own tiers; per hash, whether the agent holds it
    /// now. Bounded by this client's timeout; a failed transfer raises ``KvtierError``.
    fn pull(&self, py: Python<'_>, peer: &str, ns: &[u8], hashes: Vec<Vec<u8>>) -> PyResult<Vec<bool>> {
        let ns = ns_of(ns)?;
        let hashes = hashes_of(&hashes)?;
        py.detach(|| self.inner.pull(peer, &ns, &hashes)).map_err(to_py)
    }

    /// The agent's counters as a JSON string.
    fn stats(&self, py: Python<'_>) -> PyResult<String> {
        py.detach(|| self.inner.stats()).map_err(to_py)
    }
}

/// Blocks pinned by `Client.acquire`, readable until released.
#[pyclass(module = "kvtier._native", frozen)]
struct Leases {
    ns: Namespace,
    held: Mutex<Vec<Option<Acquired>>>,
}

#[pymethods]
impl Leases {
    /// Tier code per requested block (0: not held).
    fn tiers(&self, py: Python<'_>) -> Vec<u32> {
        py.detach(|| {
            self.held
                .lock()
                .iter()
                .map(|a| tier_code(a.as_ref().map(Acquired::tier)))
                .collect()
        })
    }

    /// How many leading blocks are held.
    fn prefix_len(&self, py: Python<'_>) -> usize {
        py.detach(|| self.held.lock().iter().take_while(|a| a.is_some()).count())
    }

    /// Copies held blocks into the engine's pages: `block_ids[i]` receives requested block
    /// `start + i` (so a load can skip blocks the engine has already). Returns a tier code per
    /// id; 0 where the block is not held, its length does not match the layout, or its
    /// connection has ended.
    #[pyo3(signature = (block_ids, layers, start=0))]
    fn load_pages(
        &self,
        py: Python<'_>,
        block_ids: Vec<usize>,
        layers: Vec<(usize, usize, usize)>,
        start: usize,
    ) -> PyResult<Vec<u32>> {
        let layers = layers_of(&layers)?;
        let len = pages::block_len(&layers) as u64;
        let copier = CpuCopier;
        // The lock is taken with the GIL released: a thread holding it while waiting for the
        // GIL would deadlock with one holding the GIL while waiting for it (a release from
        // Python during a copy).
        py.detach(|| {
            let held = self.held.lock();
            if start.saturating_add(block_ids.len()) > held.len() {
                return Err(PyValueError::new_err("more block ids than leased blocks"));
            }
            let mut jobs: Vec<(Option<&Acquired>, usize, u32)> = held[start..]
                .iter()
                .zip(&block_ids)
                .map(|(a, &id)| (a.as_ref(), id, 0))
                .collect();
            pages::for_each(copier.parallel(), &mut jobs, |(a, id, tier)| {
                if let Some(a) = a.filter(|a| a.len() == len) {
                    // SAFETY: the caller promised the pages writable and unshared for the call.
                    let copied = a.with_slot(|s| unsafe { copier.scatter(&layers, *id, s) });
                    *tier = if copied.is_some() {
                        tier_code(Some(a.tier()))
                    } else {
                        0
                    };
                }
            });
            copier.finish();
            Ok(jobs.into_iter().map(|j| j.2).collect())
        })
    }

    /// Unpins every held block (after any copy in flight from them).
    fn release(&self, py: Python<'_>, client: &Client) -> PyResult<()> {
        py.detach(|| {
            let held: Vec<Acquired> = std::mem::take(&mut *self.held.lock())
                .into_iter()
                .flatten()
                .collect();
            client.inner.release(&self.ns, held)
        })
        .map_err(to_py)
    }
}

/// Slots reserved by `Client.reserve_pages`: filled by `write_pages`, then committed or
/// aborted through the client. Dropped unsettled, they are aborted on the client's next call.
#[pyclass(module = "kvtier._native", frozen)]
struct Reservation {
    ns: Namespace,
    block_bytes: usize,
    /// One entry per requested block: its slot, or None where it got none.
    /// None once committed or aborted.
    slots: Mutex<Option<Vec<Option<Reserved>>>>,
    /// Per requested block: `Stored` where a slot was reserved, else why not.
    outcomes: Vec<SaveOutcome>,
}

impl Reservation {
    /// Takes the slots out, with the index of the requested block each belongs to; once.
    fn take(&self) -> PyResult<(Vec<usize>, Vec<Reserved>)> {
        let slots = self
            .slots
            .lock()
            .take()
            .ok_or_else(|| PyValueError::new_err("the reservation was committed or aborted already"))?;
        Ok(slots
            .into_iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (i, s)))
            .unzip())
    }
}

#[pymethods]
impl Reservation {
    /// How many requested blocks got a slot.
    fn reserved(&self, py: Python<'_>) -> usize {
        py.detach(|| self.slots.lock().iter().flatten().flatten().count())
    }

    /// Per requested block: "stored" where a slot was reserved, else "exists", "no_space" or
    /// "too_large".
    fn outcomes(&self) -> Vec<&'static str> {
        self.outcomes.iter().copied().map(outcome_name).collect()
    }

    /// Copies the pages of `layers` of engine block `block_ids[i]` into requested block `i`'s
    /// slot, from byte `offset` of the slot on (the block's earlier layers). Blocks without a
    /// slot are skipped. The pages must stay valid during the call.
    #[pyo3(signature = (block_ids, layers, offset=0))]
    fn write_pages(
        &self,
        py: Python<'_>,
        block_ids: Vec<usize>,
        layers: Vec<(usize, usize, usize)>,
        offset: usize,
    ) -> PyResult<()> {
        let layers = layers_of(&layers)?;
        let end = offset.saturating_add(pages::block_len(&layers));
        if end > self.block_bytes {
            return Err(PyValueError::new_err(format!(
                "pages up to byte {end} of a {}-byte block",
                self.block_bytes
            )));
        }
        let copier = CpuCopier;
        // The lock is taken with the GIL released (see `Leases.load_pages`).
        py.detach(|| {
            let mut guard = self.slots.lock();
            let Some(slots) = guard.as_mut() else {
                return Err(PyValueError::new_err(
                    "the reservation was committed or aborted already",
                ));
            };
            if block_ids.len() != slots.len() {
                return Err(PyValueError::new_err("one block id per requested block"));
            }
            let mut jobs: Vec<(&mut Reserved, usize, bool)> = slots
                .iter_mut()
                .zip(&block_ids)
                .filter_map(|(s, &id)| s.as_mut().map(|s| (s, id, false)))
                .collect();
            pages::for_each(copier.parallel(), &mut jobs, |(slot, id, written)| {
                *written = slot
                    // SAFETY: the caller promised the pages readable for the call; the range
                    // lies in the slot (checked above against the reserved length).
                    .with_slot_mut(|s| unsafe { copier.gather(&layers, *id, &mut s[offset..end]) })
                    .is_some();
            });
            copier.finish();
            if jobs.iter().all(|j| j.2) {
                Ok(())
            } else {
                Err(StaleHandle::new_err(ClientError::StaleHandle.to_string()))
            }
        })
    }
}

/// The 16-byte namespace digest of these fields (unset differs from any value).
#[pyfunction]
#[pyo3(signature = (model, *, revision=None, kv_dtype=None, kv_layout=None, block_size=None, tp_rank=0, tp_world=None, pp_stage=None, kv_group=None, lora=None, tenant=None, cache_salt=None))]
#[expect(clippy::too_many_arguments, reason = "keyword arguments of a Python function")]
fn namespace<'py>(
    py: Python<'py>,
    model: &str,
    revision: Option<&str>,
    kv_dtype: Option<&str>,
    kv_layout: Option<&str>,
    block_size: Option<u32>,
    tp_rank: u32,
    tp_world: Option<u32>,
    pp_stage: Option<u32>,
    kv_group: Option<u32>,
    lora: Option<&str>,
    tenant: Option<&str>,
    cache_salt: Option<&str>,
) -> PyResult<Bound<'py, PyBytes>> {
    if tp_world.is_some_and(|world| tp_rank >= world) {
        return Err(PyValueError::new_err("tp_rank must be below tp_world"));
    }
    let b = NamespaceBuilder {
        model_id: model.into(),
        revision: revision.map(Into::into),
        kv_dtype: kv_dtype.map(Into::into),
        kv_layout: kv_layout.map(Into::into),
        block_size,
        tp_rank: if tp_world.is_some() { tp_rank } else { 0 },
        tp_world: tp_world.unwrap_or(0),
        pp_stage: pp_stage.unwrap_or(0),
        kv_group: kv_group.unwrap_or(0),
        lora: lora.map(Into::into),
        tenant: tenant.map(Into::into),
        cache_salt: cache_salt.map(Into::into),
    };
    Ok(PyBytes::new(py, b.build().as_bytes()))
}

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Client>()?;
    m.add_class::<Leases>()?;
    m.add_class::<Reservation>()?;
    m.add_function(wrap_pyfunction!(namespace, m)?)?;
    let py = m.py();
    m.add("KvtierError", py.get_type::<KvtierError>())?;
    m.add("AgentUnavailable", py.get_type::<AgentUnavailable>())?;
    m.add("AgentTimeout", py.get_type::<AgentTimeout>())?;
    m.add("StaleHandle", py.get_type::<StaleHandle>())?;
    m.add("TIER_MISS", 0u32)?;
    m.add("TIER_HOST", 1u32)?;
    m.add("TIER_DISK", 2u32)?;
    m.add("TIER_PEER", 3u32)?;
    m.add("TIER_OBJECT", 4u32)?;
    Ok(())
}

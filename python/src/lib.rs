//! `kvtier._native`: Python bindings of `kvstore::client`. Every call releases the GIL; block
//! copies between an engine's KV-cache pages (given as addresses) and arena slots run in Rust
//! through a `kvstore::device` copy engine: memcpy on a thread pool for CPU memory, batched
//! asynchronous DMA on the engine's stream for GPUs. The pure-Python package `kvtier` wraps this
//! module with types and documentation; protocol logic lives only in Rust.

use std::sync::Arc;
use std::time::Duration;

use kvstore::client::{
    Acquired, Client as RustClient, ClientConfig, ClientError, LiveHold, Reserved, SaveOutcome,
};
use kvstore::device::{self, CopyJob, DeviceError, Fence};
use kvstore::pages::{self, LayerPages};
use kvstore::transport::HoldTicket;
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

create_exception!(
    _native,
    DeviceUnavailable,
    KvtierError,
    "No copy engine for the device: its driver, library or device is missing (or this build lacks the backend)."
);

fn device_err(e: DeviceError) -> PyErr {
    match e {
        DeviceError::UnknownDevice(_) => PyValueError::new_err(e.to_string()),
        DeviceError::NotBuilt(_) | DeviceError::Unavailable { .. } => {
            DeviceUnavailable::new_err(e.to_string())
        }
        e => KvtierError::new_err(e.to_string()),
    }
}

fn stale() -> PyErr {
    StaleHandle::new_err(ClientError::StaleHandle.to_string())
}

/// Device copies through a handle's slots still in flight. A `Leases` or `Reservation` declares
/// it before its slots, so that when one is dropped unsettled this waits for the copies before
/// the slots go back (on the connection's next call) and may be handed out again.
#[derive(Default)]
struct Copies(Mutex<Vec<Fence>>);

impl Copies {
    /// Runs `copy` (which enqueues device copies through the slots `hold` keeps reachable) and
    /// tracks its fence; the hold is let go when the copies complete.
    fn start(&self, hold: LiveHold, copy: impl FnOnce() -> Result<Fence, DeviceError>) -> PyResult<()> {
        Self::start_shared(&[self], hold, copy)
    }

    /// `start` for copies into the slots of several holders at once: each tracks the fence.
    fn start_shared(
        all: &[&Self],
        hold: LiveHold,
        copy: impl FnOnce() -> Result<Fence, DeviceError>,
    ) -> PyResult<()> {
        let fence = copy().map_err(device_err)?;
        for copies in all {
            copies.0.lock().push(fence.clone());
        }
        device::after(fence, Box::new(hold));
        Ok(())
    }

    /// Waits for every copy in flight (all of them, even after a failure); the first failure.
    fn settle(&self) -> Result<(), DeviceError> {
        let mut first = Ok(());
        for f in std::mem::take(&mut *self.0.lock()) {
            if let Err(e) = f.wait() {
                first = first.and(Err(e));
            }
        }
        first
    }
}

impl Drop for Copies {
    fn drop(&mut self) {
        let _ = self.settle();
    }
}

/// A copy engine for one device, chosen by the device of the engine's KV-cache tensors.
#[pyclass(module = "kvtier._native", frozen, name = "CopyEngine")]
struct PyCopyEngine {
    inner: Arc<dyn device::CopyEngine>,
}

#[pymethods]
impl PyCopyEngine {
    /// Opens the engine for `device` ("cpu", "cuda:N", "hip:N"). Raises `DeviceUnavailable`
    /// (with the reason) when its driver, library or device is missing.
    #[new]
    fn new(py: Python<'_>, device: &str) -> PyResult<Self> {
        let d: device::Device = device.parse().map_err(device_err)?;
        let inner = py.detach(|| device::open(d)).map_err(device_err)?;
        Ok(Self { inner })
    }

    /// The device, as "cpu", "cuda:N" or "hip:N".
    #[getter]
    fn device(&self) -> String {
        self.inner.device().to_string()
    }

    /// Whether copies are asynchronous on a device stream (false: done when a call returns).
    #[getter]
    fn asynchronous(&self) -> bool {
        self.inner.device().backend != device::Backend::Cpu
    }

    /// One line for logs: the device, its driver and how pages are copied.
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// The copy engine to use: the given one, or the CPU one.
fn engine_of(engine: Option<&PyCopyEngine>) -> Arc<dyn device::CopyEngine> {
    engine.map_or_else(
        || Arc::new(device::cpu::CpuEngine) as Arc<dyn device::CopyEngine>,
        |e| e.inner.clone(),
    )
}

/// Whether `device` could be opened, without opening it: `(True, description)` or
/// `(False, reason)`. Cheap; takes no GPU memory (a scheduler process asks this).
#[pyfunction]
fn check_device(py: Python<'_>, device: &str) -> PyResult<(bool, String)> {
    let d: device::Device = device.parse().map_err(device_err)?;
    Ok(match py.detach(|| device::check(d)) {
        Ok(what) => (true, what),
        Err(e) => (false, e.to_string()),
    })
}

/// Per backend ("cpu", "cuda", "hip"): whether this machine offers it, and its first device or
/// why not.
#[pyfunction]
fn probe_devices(py: Python<'_>) -> Vec<(String, bool, String)> {
    py.detach(device::probe)
        .into_iter()
        .map(|(b, r)| match r {
            Ok(what) => (b.name().to_owned(), true, what),
            Err(e) => (b.name().to_owned(), false, e.to_string()),
        })
        .collect()
}

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
    /// Returns one outcome per block, as `save`. The pages must stay valid until the call
    /// returns (it waits for device copies, which follow the work queued on `stream`).
    #[pyo3(signature = (ns, hashes, block_ids, layers, engine=None, stream=0))]
    #[expect(clippy::too_many_arguments, reason = "keyword arguments of a Python method")]
    fn save_pages(
        &self,
        py: Python<'_>,
        ns: &[u8],
        hashes: Vec<Vec<u8>>,
        block_ids: Vec<usize>,
        layers: Vec<(usize, usize, usize)>,
        engine: Option<&PyCopyEngine>,
        stream: usize,
    ) -> PyResult<Vec<&'static str>> {
        if hashes.len() != block_ids.len() {
            return Err(PyValueError::new_err("one block id per hash"));
        }
        let len = pages::block_len(&layers_of(&layers)?) as u64;
        let reservation = self.reserve_pages(py, ns, hashes, len)?;
        if let Err(e) = reservation.write_pages(py, block_ids, layers, 0, engine, stream) {
            let _ = self.abort(py, &reservation);
            return Err(e);
        }
        self.commit(py, &reservation)
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
            copies: Copies::default(),
            slots: Mutex::new(Some(slots)),
            outcomes,
        })
    }

    /// Publishes the filled slots of `reservation`; one outcome per requested block, as
    /// `save` ("no_space" where the agent could not keep a written block).
    fn commit(&self, py: Python<'_>, reservation: &Reservation) -> PyResult<Vec<&'static str>> {
        // Taken first, so that no copy into the slots starts after the wait below.
        let (idx, slots) = py.detach(|| reservation.take())?;
        if let Err(e) = py.detach(|| reservation.copies.settle()) {
            // A block whose copy failed must not be published.
            let _ = py.detach(|| self.inner.abort(&reservation.ns, slots));
            return Err(device_err(e));
        }
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
        let _ = py.detach(|| reservation.copies.settle());
        py.detach(|| self.inner.abort(&reservation.ns, slots))
            .map(drop)
            .map_err(to_py)
    }

    /// Registers the agent's arena with `engine` now (connecting if needed), so that the first
    /// device copy does not pay for pinning it. Raises `DeviceUnavailable` or `KvtierError`.
    fn register_arena(&self, py: Python<'_>, engine: &PyCopyEngine) -> PyResult<()> {
        py.detach(|| self.inner.register_arena(&engine.inner))
            .map_err(|e| match e {
                ClientError::Device(d) => device_err(d),
                e => to_py(e),
            })
    }

    /// Pins blocks for loading later (the pins survive the agent's death: the mapped arena
    /// stays readable). Returns a `Leases` handle.
    fn acquire(&self, py: Python<'_>, ns: &[u8], hashes: Vec<Vec<u8>>) -> PyResult<Leases> {
        let (ns, hashes) = (ns_of(ns)?, hashes_of(&hashes)?);
        let held = py.detach(|| self.inner.acquire(&ns, &hashes)).map_err(to_py)?;
        Ok(Leases {
            ns,
            copies: Copies::default(),
            held: Mutex::new(held),
        })
    }

    /// Loads blocks straight into an engine's KV-cache pages (layout as `save_pages`): acquire,
    /// copy, release (after the copies). Returns a tier code per block (0: miss, pages
    /// untouched).
    #[pyo3(signature = (ns, hashes, block_ids, layers, engine=None, stream=0))]
    #[expect(clippy::too_many_arguments, reason = "keyword arguments of a Python method")]
    fn load_pages(
        &self,
        py: Python<'_>,
        ns: &[u8],
        hashes: Vec<Vec<u8>>,
        block_ids: Vec<usize>,
        layers: Vec<(usize, usize, usize)>,
        engine: Option<&PyCopyEngine>,
        stream: usize,
    ) -> PyResult<Vec<u32>> {
        let leases = self.acquire(py, ns, hashes)?;
        let tiers = leases.load_pages(py, block_ids, layers, 0, engine, stream, true);
        leases.release(py, self)?;
        tiers
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
    /// now. Bounded by this client's timeout; a failed transfer raises ``KvtierError``, as does
    /// an agent older than protocol 3, which has no pull. With the ``ticket`` the producer held
    /// the blocks under, the peer ends that hand-off's holds in ``ns`` once the pull is over;
    /// with the ticket and no hashes (the engine needs no more of the hand-off), it ends them in
    /// every namespace, all the hand-off's ranks, as it does when the peer refuses the pull's
    /// grant or does not answer in time (the engine is expected to compute the whole request
    /// then).
    #[pyo3(signature = (peer, ns, hashes, ticket=None))]
    fn pull(
        &self,
        py: Python<'_>,
        peer: &str,
        ns: &[u8],
        hashes: Vec<Vec<u8>>,
        ticket: Option<u64>,
    ) -> PyResult<Vec<bool>> {
        let ns = ns_of(ns)?;
        let hashes = hashes_of(&hashes)?;
        let ticket = ticket_of(ticket)?;
        py.detach(|| self.inner.pull_under(peer, &ns, &hashes, ticket))
            .map_err(to_py)
    }

    /// Has the agent keep the longest stored prefix of ``hashes`` for a peer's pull (blocks a
    /// prefill engine hands to a decode engine): the lookup's tier codes, and how many leading
    /// blocks are held until a pull of them ends (the pull that passes ``ticket``, when one is
    /// given) or the agent's ``peer.hold_s`` passes.
    #[pyo3(signature = (ns, hashes, ticket=None))]
    fn hold(
        &self,
        py: Python<'_>,
        ns: &[u8],
        hashes: Vec<Vec<u8>>,
        ticket: Option<u64>,
    ) -> PyResult<(Vec<u32>, usize)> {
        let (ns, hashes, ticket) = (ns_of(ns)?, hashes_of(&hashes)?, ticket_of(ticket)?);
        let out = py
            .detach(|| self.inner.hold_under(&ns, &hashes, ticket))
            .map_err(to_py)?;
        Ok((
            out.tiers.into_iter().map(|t| tier_code(Some(t))).collect(),
            out.held,
        ))
    }

    /// Ends the holds made under ``ticket`` in ``ns`` on this agent now; how many blocks are no
    /// longer held.
    fn unhold(&self, py: Python<'_>, ns: &[u8], ticket: u64) -> PyResult<usize> {
        let ns = ns_of(ns)?;
        let ticket = HoldTicket::new(ticket).ok_or_else(|| PyValueError::new_err(TICKET_NOT_ZERO))?;
        py.detach(|| self.inner.unhold(&ns, ticket)).map_err(to_py)
    }

    /// The agent's counters as a JSON string.
    fn stats(&self, py: Python<'_>) -> PyResult<String> {
        py.detach(|| self.inner.stats()).map_err(to_py)
    }
}

/// Why a ticket of 0 is refused.
const TICKET_NOT_ZERO: &str = "a hold ticket is not 0 (None is no ticket)";

/// A hold ticket from Python: `None` for none; 0 is refused (it names no hold).
fn ticket_of(ticket: Option<u64>) -> PyResult<Option<HoldTicket>> {
    ticket
        .map(|t| HoldTicket::new(t).ok_or_else(|| PyValueError::new_err(TICKET_NOT_ZERO)))
        .transpose()
}

/// Blocks pinned by `Client.acquire`, readable until released.
#[pyclass(module = "kvtier._native", frozen)]
struct Leases {
    ns: Namespace,
    /// Before `held`: dropped first (see `Copies`).
    copies: Copies,
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
    /// connection has ended. With a device `engine` the copies are enqueued after the work on
    /// `stream`; with `stream_waits`, the work queued there afterwards waits for them (the host
    /// does not), else only `wait` tells when they are done. The leases are released after them.
    #[pyo3(signature = (block_ids, layers, start=0, engine=None, stream=0, stream_waits=true))]
    #[expect(clippy::too_many_arguments, reason = "keyword arguments of a Python method")]
    fn load_pages(
        &self,
        py: Python<'_>,
        block_ids: Vec<usize>,
        layers: Vec<(usize, usize, usize)>,
        start: usize,
        engine: Option<&PyCopyEngine>,
        stream: usize,
        stream_waits: bool,
    ) -> PyResult<Vec<u32>> {
        let layers = layers_of(&layers)?;
        let len = pages::block_len(&layers) as u64;
        let engine = engine_of(engine);
        // The lock is taken with the GIL released: a thread holding it while waiting for the
        // GIL would deadlock with one holding the GIL while waiting for it (a release from
        // Python during a copy).
        py.detach(|| {
            let held = self.held.lock();
            if start.saturating_add(block_ids.len()) > held.len() {
                return Err(PyValueError::new_err("more block ids than leased blocks"));
            }
            let mut tiers = vec![0; block_ids.len()];
            let mut jobs = Vec::with_capacity(block_ids.len());
            let mut first: Option<&Acquired> = None;
            for (i, (a, &id)) in held[start..].iter().zip(&block_ids).enumerate() {
                let Some(a) = a.as_ref().filter(|a| a.len() == len) else {
                    continue;
                };
                if first.is_some_and(|f| !f.same_mapping(a)) {
                    return Err(PyValueError::new_err("leases of two connections"));
                }
                first.get_or_insert(a);
                tiers[i] = tier_code(Some(a.tier()));
                jobs.push(CopyJob {
                    block: id,
                    slot: a.ptr() as usize,
                });
            }
            let Some(first) = first else {
                return Ok(tiers);
            };
            let Some(hold) = first.hold() else {
                // The connection has ended: its blocks may be someone else's now.
                return Ok(vec![0; block_ids.len()]);
            };
            first.register_with(&engine).map_err(device_err)?;
            // SAFETY: the leases pin their slots (no writer) until released, which waits for
            // these copies (`settle`); the hold keeps the connection, whose end would unpin them,
            // open until the copies complete; the caller promised the pages writable and
            // unshared until the copies complete.
            self.copies.start(hold, || unsafe {
                engine.scatter(&layers, &jobs, stream, stream_waits)
            })?;
            Ok(tiers)
        })
    }

    /// Waits for the copies out of these leases (a device engine's; a no-op otherwise).
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.copies.settle()).map_err(device_err)
    }

    /// Unpins every held block (after any copy in flight from them). Raises the device's error
    /// if a copy out of them failed (they are released all the same).
    fn release(&self, py: Python<'_>, client: &Client) -> PyResult<()> {
        py.detach(|| {
            // Taken first, so that no copy out of the slots starts after the wait below.
            let held: Vec<Acquired> = std::mem::take(&mut *self.held.lock())
                .into_iter()
                .flatten()
                .collect();
            let copied = self.copies.settle();
            client.inner.release(&self.ns, held).map_err(to_py)?;
            copied.map_err(device_err)
        })
    }
}

/// Slots reserved by `Client.reserve_pages`: filled by `write_pages`, then committed or
/// aborted through the client. Dropped unsettled, they are aborted on the client's next call.
#[pyclass(module = "kvtier._native", frozen)]
struct Reservation {
    ns: Namespace,
    block_bytes: usize,
    /// Before `slots`: dropped first (see `Copies`).
    copies: Copies,
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
    /// slot are skipped. With a device `engine` the copies are enqueued after the work on
    /// `stream` and this returns at once; commit waits for them. The pages must stay valid
    /// until then (vLLM's `wait_for_save`).
    #[pyo3(signature = (block_ids, layers, offset=0, engine=None, stream=0))]
    fn write_pages(
        &self,
        py: Python<'_>,
        block_ids: Vec<usize>,
        layers: Vec<(usize, usize, usize)>,
        offset: usize,
        engine: Option<&PyCopyEngine>,
        stream: usize,
    ) -> PyResult<()> {
        write_pages_of(py, &[self], vec![block_ids], layers, offset, engine, stream)
    }

    /// Waits for the copies into these slots (a device engine's; a no-op otherwise).
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.copies.settle()).map_err(device_err)
    }
}

/// `Reservation.write_pages` for several reservations of one client in one batch (one kernel
/// launch on a device): `block_ids[k]` are the engine blocks of `reservations[k]`, whose slots
/// all take the pages of `layers` at byte `offset`. A connector that saves layer by layer for
/// many requests makes one call per layer instead of one per layer and request.
#[pyfunction]
#[pyo3(signature = (reservations, block_ids, layers, offset=0, engine=None, stream=0))]
fn write_pages_many(
    py: Python<'_>,
    reservations: Vec<Bound<'_, Reservation>>,
    block_ids: Vec<Vec<usize>>,
    layers: Vec<(usize, usize, usize)>,
    offset: usize,
    engine: Option<&PyCopyEngine>,
    stream: usize,
) -> PyResult<()> {
    let reservations: Vec<&Reservation> = reservations.iter().map(Bound::get).collect();
    write_pages_of(py, &reservations, block_ids, layers, offset, engine, stream)
}

/// Copies pages into the slots of `reservations` (see `write_pages_many`).
fn write_pages_of(
    py: Python<'_>,
    reservations: &[&Reservation],
    block_ids: Vec<Vec<usize>>,
    layers: Vec<(usize, usize, usize)>,
    offset: usize,
    engine: Option<&PyCopyEngine>,
    stream: usize,
) -> PyResult<()> {
    if reservations.len() != block_ids.len() {
        return Err(PyValueError::new_err("one list of block ids per reservation"));
    }
    let layers = layers_of(&layers)?;
    let end = offset.saturating_add(pages::block_len(&layers));
    if let Some(r) = reservations.iter().find(|r| end > r.block_bytes) {
        return Err(PyValueError::new_err(format!(
            "pages up to byte {end} of a {}-byte block",
            r.block_bytes
        )));
    }
    // Locked in address order, so that two threads writing into the same reservations cannot
    // deadlock; a reservation named twice would lock itself.
    let mut order: Vec<usize> = (0..reservations.len()).collect();
    order.sort_by_key(|&k| std::ptr::from_ref(reservations[k]) as usize);
    if order
        .windows(2)
        .any(|w| std::ptr::eq(reservations[w[0]], reservations[w[1]]))
    {
        return Err(PyValueError::new_err("a reservation named twice"));
    }
    let engine = engine_of(engine);
    // The locks are taken with the GIL released (see `Leases.load_pages`).
    py.detach(|| {
        let mut guards: Vec<_> = reservations.iter().map(|_| None).collect();
        for &k in &order {
            guards[k] = Some(reservations[k].slots.lock());
        }
        let mut jobs = Vec::new();
        let mut first: Option<&Reserved> = None;
        for (guard, ids) in guards.iter().zip(&block_ids) {
            let Some(slots) = guard.as_ref().and_then(|g| g.as_ref()) else {
                return Err(PyValueError::new_err(
                    "the reservation was committed or aborted already",
                ));
            };
            if ids.len() != slots.len() {
                return Err(PyValueError::new_err("one block id per requested block"));
            }
            for (slot, &id) in slots.iter().zip(ids) {
                let Some(slot) = slot else { continue };
                if first.is_some_and(|f| !f.same_mapping(slot)) {
                    return Err(PyValueError::new_err("reservations of two connections"));
                }
                first.get_or_insert(slot);
                jobs.push(CopyJob {
                    block: id,
                    slot: slot.ptr() as usize,
                });
            }
        }
        let Some(first) = first else {
            return Ok(());
        };
        first.register_with(&engine).map_err(device_err)?;
        let hold = first.hold().ok_or_else(stale)?;
        let copies: Vec<&Copies> = reservations.iter().map(|r| &r.copies).collect();
        // SAFETY: the agent gave these slots (checked against the mapping, each `block_bytes`
        // long, so `offset..end` lies inside) to these reservations alone until they are
        // committed or aborted, both of which wait for these copies (`settle`); the hold keeps
        // the connection, whose end would hand them out again, open until the copies complete;
        // the caller promised the pages readable until then.
        Copies::start_shared(&copies, hold, || unsafe {
            engine.gather(&layers, &jobs, offset, stream)
        })
    })
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
    m.add_class::<PyCopyEngine>()?;
    m.add_function(wrap_pyfunction!(namespace, m)?)?;
    m.add_function(wrap_pyfunction!(write_pages_many, m)?)?;
    m.add_function(wrap_pyfunction!(check_device, m)?)?;
    m.add_function(wrap_pyfunction!(probe_devices, m)?)?;
    let py = m.py();
    m.add("KvtierError", py.get_type::<KvtierError>())?;
    m.add("AgentUnavailable", py.get_type::<AgentUnavailable>())?;
    m.add("AgentTimeout", py.get_type::<AgentTimeout>())?;
    m.add("StaleHandle", py.get_type::<StaleHandle>())?;
    m.add("DeviceUnavailable", py.get_type::<DeviceUnavailable>())?;
    m.add("TIER_MISS", 0u32)?;
    m.add("TIER_HOST", 1u32)?;
    m.add("TIER_DISK", 2u32)?;
    m.add("TIER_PEER", 3u32)?;
    m.add("TIER_OBJECT", 4u32)?;
    Ok(())
}

//! `libkvtier`: the C ABI of kvtier's local client (`kvstore::client`).
//!
//! Conventions, for C callers:
//! - Every function returns a [`kvtier_status`] (0 is success). On failure, a message for the
//!   calling thread is available from [`kvtier_last_error`] until that thread's next call.
//! - Handles are opaque pointers created and destroyed only by this library.
//! - No Rust panic crosses the boundary: one is caught and reported as
//!   [`kvtier_status::KVTIER_ERR_PANIC`].
//! - A client may be used from several threads (calls are serialised); blocks are copied by
//!   the calling thread.
//!
//! The header `include/kvtier.h` is generated from this file by cbindgen; a test fails when the
//! committed header differs from what the code generates.

#![expect(non_camel_case_types, reason = "C naming for the C ABI")]

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use kvstore::client::{Acquired, Client, ClientConfig, ClientError, Reserved, SaveOutcome};
use kvstore::transport::HoldTicket;
use kvstore::{BlockHash, Namespace, NamespaceBuilder, TierLevel};

/// Version of this ABI; grows when functions or types change incompatibly.
pub const KVTIER_ABI_VERSION: u32 = 1;

/// Largest block hash in bytes (a SHA-256 digest).
pub const KVTIER_HASH_MAX: usize = 32;

/// Outcome of a call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum kvtier_status {
    /// Success.
    KVTIER_OK = 0,
    /// A null pointer, a bad length or a malformed string was passed.
    KVTIER_ERR_INVALID_ARGUMENT = 1,
    /// No agent answers at the socket (or the connection broke): recompute; a later call
    /// reconnects.
    KVTIER_ERR_UNAVAILABLE = 2,
    /// The agent did not answer within the timeout.
    KVTIER_ERR_TIMEOUT = 3,
    /// The agent refused the call (shutting down, version mismatch, ...).
    KVTIER_ERR_REFUSED = 4,
    /// The agent's answer made no sense to this library.
    KVTIER_ERR_PROTOCOL = 5,
    /// Slots from before an agent restart.
    KVTIER_ERR_STALE = 6,
    /// A buffer does not match the block's length.
    KVTIER_ERR_BUFFER = 7,
    /// A bug inside the library (a caught panic).
    KVTIER_ERR_PANIC = 8,
}

use kvtier_status::*;

/// Tier codes reported per block: where it was found.
pub const KVTIER_TIER_MISS: u8 = 0;
/// Found in the host-memory arena.
pub const KVTIER_TIER_HOST: u8 = 1;
/// Found on the node's disk tier (promoted to the arena to be read).
pub const KVTIER_TIER_DISK: u8 = 2;
/// Held by another node's agent, as the cluster index says (lookup only: acquiring pulls it).
pub const KVTIER_TIER_PEER: u8 = 3;
/// Found in the object store (S3) that agents share (promoted to the arena to be read).
pub const KVTIER_TIER_OBJECT: u8 = 4;

/// Per-block outcome of a save.
pub const KVTIER_SAVE_STORED: u8 = 0;
/// The block was stored already (or is being stored by another writer).
pub const KVTIER_SAVE_EXISTS: u8 = 1;
/// The agent had no room.
pub const KVTIER_SAVE_NO_SPACE: u8 = 2;
/// Larger than any slot of the arena.
pub const KVTIER_SAVE_TOO_LARGE: u8 = 3;

/// A block hash: `len` (1–32) significant bytes, as the engine computed them.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvtier_hash {
    /// Significant bytes in `bytes`.
    pub len: u8,
    /// The hash.
    pub bytes: [u8; KVTIER_HASH_MAX],
}

/// A namespace digest: everything that makes equal hashes mean different bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvtier_namespace {
    /// The digest.
    pub bytes: [u8; 16],
}

/// Fields of a namespace. Strings may be NULL (unset); `block_size` and `tp_world` 0 mean
/// unset; `pp_stage` and `kv_group` -1 mean unset. Unset differs from any value.
#[repr(C)]
#[derive(Debug)]
pub struct kvtier_namespace_spec {
    /// Model id, e.g. "meta-llama/Llama-3.1-8B-Instruct" (required).
    pub model: *const c_char,
    /// Model revision.
    pub revision: *const c_char,
    /// KV-cache dtype, e.g. "bfloat16".
    pub kv_dtype: *const c_char,
    /// KV-cache layout, e.g. "NHD".
    pub kv_layout: *const c_char,
    /// Tokens per block.
    pub block_size: u32,
    /// Tensor-parallel rank.
    pub tp_rank: u32,
    /// Tensor-parallel world size.
    pub tp_world: u32,
    /// Pipeline stage.
    pub pp_stage: i32,
    /// KV-cache group.
    pub kv_group: i32,
    /// LoRA adapter.
    pub lora: *const c_char,
    /// Tenant.
    pub tenant: *const c_char,
    /// Cache salt.
    pub cache_salt: *const c_char,
}

/// A connection to the node agent.
#[derive(Debug)]
pub struct kvtier_client {
    inner: Client,
}

/// Slots of one reserve or acquire call, for zero-copy access; consumed by commit, abort or
/// release.
#[derive(Debug)]
pub struct kvtier_slots {
    ns: Namespace,
    kind: SlotsKind,
}

#[derive(Debug)]
enum SlotsKind {
    Reserved(Vec<Result<Reserved, SaveOutcome>>),
    Acquired(Vec<Option<Acquired>>),
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: impl std::fmt::Display) {
    let text = msg.to_string().replace('\0', " ");
    let c = CString::new(text).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn client_status(e: &ClientError) -> kvtier_status {
    match e {
        ClientError::Unavailable { .. } => KVTIER_ERR_UNAVAILABLE,
        ClientError::Timeout(_) => KVTIER_ERR_TIMEOUT,
        // An agent whose version has no such call refuses it in all but name.
        ClientError::Refused { .. } | ClientError::Unsupported { .. } => KVTIER_ERR_REFUSED,
        ClientError::StaleHandle => KVTIER_ERR_STALE,
        ClientError::BufferSize { .. } => KVTIER_ERR_BUFFER,
        ClientError::InvalidArgument(_) => KVTIER_ERR_INVALID_ARGUMENT,
        _ => KVTIER_ERR_PROTOCOL,
    }
}

/// A failed call: its status and message.
struct Failure(kvtier_status, String);

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Self(client_status(&e), e.to_string())
    }
}

fn invalid(msg: impl Into<String>) -> Failure {
    Failure(KVTIER_ERR_INVALID_ARGUMENT, msg.into())
}

/// Runs `f`, turning failures and panics into a status and the thread's last error (cleared
/// first, so it always describes the latest call).
fn guard(f: impl FnOnce() -> Result<(), Failure>) -> kvtier_status {
    LAST_ERROR.with(|e| {
        let mut e = e.borrow_mut();
        if !e.as_bytes().is_empty() {
            *e = CString::default();
        }
    });
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => KVTIER_OK,
        Ok(Err(Failure(status, msg))) => {
            set_error(msg);
            status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(format!("internal error in libkvtier: {what}"));
            KVTIER_ERR_PANIC
        }
    }
}

/// Borrows `n` elements at `ptr`; NULL is allowed only when `n` is 0.
///
/// # Safety
/// `ptr` must be valid for reading `n` elements for the returned lifetime.
unsafe fn slice<'a, T>(ptr: *const T, n: usize, what: &str) -> Result<&'a [T], Failure> {
    if n == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-null and, by the caller's contract, valid for `n` reads.
    Ok(unsafe { std::slice::from_raw_parts(ptr, n) })
}

/// Borrows `n` elements at `ptr` mutably; NULL is allowed only when `n` is 0.
///
/// # Safety
/// `ptr` must be valid for writing `n` elements, unaliased, for the returned lifetime.
unsafe fn slice_mut<'a, T>(ptr: *mut T, n: usize, what: &str) -> Result<&'a mut [T], Failure> {
    if n == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-null and, by the caller's contract, valid and unaliased for `n` writes.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, n) })
}

/// Reads an optional C string.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string valid for the call.
unsafe fn opt_str(p: *const c_char, what: &str) -> Result<Option<String>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|_| invalid(format!("{what} is not UTF-8")))
}

fn hashes_of(raw: &[kvtier_hash]) -> Result<Vec<BlockHash>, Failure> {
    raw.iter()
        .enumerate()
        .map(|(i, h)| {
            let bytes = h.bytes.get(..h.len as usize).unwrap_or(&[]);
            BlockHash::new(bytes).map_err(|e| invalid(format!("hash {i}: {e}")))
        })
        .collect()
}

/// # Safety
/// `client` is NULL or a live handle from [`kvtier_connect`].
unsafe fn client_ref<'a>(client: *const kvtier_client) -> Result<&'a Client, Failure> {
    if client.is_null() {
        return Err(invalid("client is NULL"));
    }
    // SAFETY: a live handle by the caller's contract; handles are only ever shared (`&`).
    Ok(unsafe { &(*client).inner })
}

/// # Safety
/// `ns` is NULL or points to a namespace.
unsafe fn ns_of(ns: *const kvtier_namespace) -> Result<Namespace, Failure> {
    if ns.is_null() {
        return Err(invalid("namespace is NULL"));
    }
    // SAFETY: non-null, and points to a namespace by the caller's contract.
    Ok(Namespace::from_bytes(unsafe { (*ns).bytes }))
}

fn tier_code(t: Option<TierLevel>) -> u8 {
    match t {
        None => KVTIER_TIER_MISS,
        Some(TierLevel::Host) => KVTIER_TIER_HOST,
        Some(TierLevel::Peer) => KVTIER_TIER_PEER,
        Some(TierLevel::Object) => KVTIER_TIER_OBJECT,
        // Disk, and any lower tier a newer library adds: below the arena, promoted to read.
        Some(_) => KVTIER_TIER_DISK,
    }
}

fn save_code(o: SaveOutcome) -> u8 {
    match o {
        SaveOutcome::Stored => KVTIER_SAVE_STORED,
        SaveOutcome::Exists => KVTIER_SAVE_EXISTS,
        SaveOutcome::NoSpace => KVTIER_SAVE_NO_SPACE,
        SaveOutcome::TooLarge => KVTIER_SAVE_TOO_LARGE,
    }
}

/// The ABI version of this library ([`KVTIER_ABI_VERSION`]); compare it with the header's.
#[unsafe(no_mangle)]
pub extern "C" fn kvtier_abi_version() -> u32 {
    KVTIER_ABI_VERSION
}

/// The message of the calling thread's latest call: empty after a success, the reason after a
/// failure. Valid until the thread's next call into the library; never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn kvtier_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Computes a namespace digest from its fields.
///
/// # Safety
/// `spec` points to a valid spec whose strings are NULL or NUL-terminated; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_namespace_build(
    spec: *const kvtier_namespace_spec,
    out: *mut kvtier_namespace,
) -> kvtier_status {
    guard(|| {
        if spec.is_null() || out.is_null() {
            return Err(invalid("spec or out is NULL"));
        }
        // SAFETY: non-null, valid by the caller's contract.
        let spec = unsafe { &*spec };
        // SAFETY: each string is NULL or NUL-terminated (caller's contract).
        let model = unsafe { opt_str(spec.model, "model")? }.ok_or_else(|| invalid("model is required"))?;
        if spec.tp_world != 0 && spec.tp_rank >= spec.tp_world {
            return Err(invalid("tp_rank must be below tp_world"));
        }
        // SAFETY: each string is NULL or NUL-terminated (caller's contract).
        let b = unsafe {
            NamespaceBuilder {
                model_id: model,
                revision: opt_str(spec.revision, "revision")?,
                kv_dtype: opt_str(spec.kv_dtype, "kv_dtype")?,
                kv_layout: opt_str(spec.kv_layout, "kv_layout")?,
                block_size: (spec.block_size != 0).then_some(spec.block_size),
                tp_rank: if spec.tp_world != 0 { spec.tp_rank } else { 0 },
                tp_world: spec.tp_world,
                pp_stage: u32::try_from(spec.pp_stage).unwrap_or(0),
                kv_group: u32::try_from(spec.kv_group).unwrap_or(0),
                lora: opt_str(spec.lora, "lora")?,
                tenant: opt_str(spec.tenant, "tenant")?,
                cache_salt: opt_str(spec.cache_salt, "cache_salt")?,
            }
        };
        let bytes = *b.build().as_bytes();
        // SAFETY: `out` is non-null and writable (caller's contract).
        unsafe { (*out).bytes = bytes };
        Ok(())
    })
}

/// Connects to the agent at `socket` (NULL: `$KVTIER_SOCKET`, else /run/kvtier/agent.sock).
/// Every call waits at most `timeout_ms` (0: 1000). With `lazy` non-zero the connection is
/// made on the first call, so an engine may start before its agent. On success `*out` holds a
/// handle to free with [`kvtier_close`].
///
/// # Safety
/// `socket` is NULL or NUL-terminated; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_connect(
    socket: *const c_char,
    timeout_ms: u32,
    lazy: i32,
    out: *mut *mut kvtier_client,
) -> kvtier_status {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: NULL or NUL-terminated (caller's contract).
        let mut cfg = match unsafe { opt_str(socket, "socket")? } {
            Some(path) => ClientConfig::new(path),
            None => ClientConfig::from_env(),
        };
        if timeout_ms != 0 {
            cfg.timeout = Duration::from_millis(u64::from(timeout_ms));
        }
        let inner = if lazy != 0 {
            Client::lazy(cfg)
        } else {
            Client::connect(cfg)?
        };
        let handle = Box::into_raw(Box::new(kvtier_client { inner }));
        // SAFETY: `out` is non-null and writable (caller's contract).
        unsafe { *out = handle };
        Ok(())
    })
}

/// Closes a connection: the agent releases every slot it still holds for it. NULL is ignored.
///
/// # Safety
/// `client` is NULL or a handle from [`kvtier_connect`] not closed before, and no other thread
/// uses it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_close(client: *mut kvtier_client) {
    if !client.is_null() {
        // SAFETY: a handle we boxed, closed once (caller's contract).
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(client) })));
    }
}

/// How many leading `hashes` the agent holds: `*matched` is set, and `tiers` (if not NULL,
/// `n` bytes) receives each block's tier code (KVTIER_TIER_MISS past the match).
///
/// # Safety
/// Pointers valid for `n` elements; `matched` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_lookup(
    client: *const kvtier_client,
    ns: *const kvtier_namespace,
    hashes: *const kvtier_hash,
    n: usize,
    matched: *mut usize,
    tiers: *mut u8,
) -> kvtier_status {
    guard(|| {
        // SAFETY: the caller's contract for each pointer.
        let (client, ns, raw) = unsafe { (client_ref(client)?, ns_of(ns)?, slice(hashes, n, "hashes")?) };
        if matched.is_null() {
            return Err(invalid("matched is NULL"));
        }
        let found = client.lookup(&ns, &hashes_of(raw)?)?;
        // SAFETY: `matched` is non-null and writable (caller's contract).
        unsafe { *matched = found.len() };
        if !tiers.is_null() {
            // SAFETY: `tiers` holds `n` bytes (caller's contract).
            let out = unsafe { slice_mut(tiers, n, "tiers")? };
            for (i, t) in out.iter_mut().enumerate() {
                *t = tier_code(found.get(i).copied());
            }
        }
        Ok(())
    })
}

/// Tells the agent that `ns`'s blocks belong to `model` (a NUL-terminated UTF-8 string: the
/// name routers score by, e.g. vLLM's served model name), so that it reports them to the
/// cluster index. The client sends it again on every new connection.
///
/// # Safety
/// `model` a valid NUL-terminated string; the other pointers as for every call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_announce(
    client: *const kvtier_client,
    ns: *const kvtier_namespace,
    model: *const c_char,
) -> kvtier_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let (client, ns) = unsafe { (client_ref(client)?, ns_of(ns)?) };
        if model.is_null() {
            return Err(invalid("model is NULL"));
        }
        // SAFETY: non-null and NUL-terminated (caller's contract).
        let model = unsafe { std::ffi::CStr::from_ptr(model) }
            .to_str()
            .map_err(|_| invalid("model is not UTF-8"))?;
        client.announce(&ns, model)?;
        Ok(())
    })
}

/// Has the agent copy the longest prefix of `hashes` that another node's agent holds into its
/// own tiers. `peer` is that agent's peer address (`host:port`, NUL-terminated), as a prefill
/// engine's `kv_transfer_params` name it. `held` (n bytes, may be NULL) receives 1 for each block
/// the agent now holds, else 0; `*matched` (may be NULL) the number of leading blocks held. A
/// failed transfer is KVTIER_ERR_REFUSED and costs nothing else: the engine recomputes; so is a
/// pull from an agent older than protocol 3, which has none. The transfer is bounded by the
/// client's timeout.
///
/// # Safety
/// `peer` a valid NUL-terminated string; `hashes` valid for `n` elements; `held` NULL or
/// writable for `n` bytes; `matched` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_pull(
    client: *const kvtier_client,
    peer: *const c_char,
    ns: *const kvtier_namespace,
    hashes: *const kvtier_hash,
    n: usize,
    held: *mut u8,
    matched: *mut usize,
) -> kvtier_status {
    // SAFETY: the caller's contract, which is kvtier_pull_under's with no ticket.
    unsafe { kvtier_pull_under(client, peer, ns, hashes, n, 0, held, matched) }
}

/// [`kvtier_pull`] of blocks the producer held under `ticket` (from its `kv_transfer_params`;
/// 0: none): once the pull is over the peer ends that hand-off's holds in `ns`, blocks this
/// node already had included. Call it with `n` = 0 when the engine needs no more of the
/// hand-off, so that the peer stops holding its blocks at once, in every namespace (all its
/// ranks). A pull whose grant the peer refuses or does not answer in time ends every rank's
/// holds too: the engine is expected to compute the whole request when one rank fails.
///
/// # Safety
/// As for [`kvtier_pull`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_pull_under(
    client: *const kvtier_client,
    peer: *const c_char,
    ns: *const kvtier_namespace,
    hashes: *const kvtier_hash,
    n: usize,
    ticket: u64,
    held: *mut u8,
    matched: *mut usize,
) -> kvtier_status {
    guard(|| {
        // SAFETY: the caller's contract for each pointer.
        let (client, ns, raw) = unsafe { (client_ref(client)?, ns_of(ns)?, slice(hashes, n, "hashes")?) };
        if peer.is_null() {
            return Err(invalid("peer is NULL"));
        }
        // SAFETY: non-null and NUL-terminated (caller's contract).
        let peer = unsafe { std::ffi::CStr::from_ptr(peer) }
            .to_str()
            .map_err(|_| invalid("peer is not UTF-8"))?;
        let got = client.pull_under(peer, &ns, &hashes_of(raw)?, HoldTicket::new(ticket))?;
        if !held.is_null() {
            // SAFETY: `held` holds `n` bytes (caller's contract).
            let out = unsafe { slice_mut(held, n, "held")? };
            for (o, h) in out.iter_mut().zip(&got) {
                *o = u8::from(*h);
            }
        }
        if !matched.is_null() {
            // SAFETY: non-null and writable (caller's contract).
            unsafe { *matched = got.iter().take_while(|h| **h).count() };
        }
        Ok(())
    })
}

/// Has the agent keep the longest stored prefix of `hashes` for another node's pull (blocks a
/// prefill engine hands to a decode engine): `*matched` is set to the stored prefix's length,
/// as [`kvtier_lookup`] finds it, and `*held` (may be NULL) to how many of its leading blocks
/// the agent keeps (not evicted until a pull of them ends or its `peer.hold_s` passes; 0 on an
/// agent that serves no peers).
///
/// # Safety
/// `hashes` valid for `n` elements; `matched` writable; `held` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_hold(
    client: *const kvtier_client,
    ns: *const kvtier_namespace,
    hashes: *const kvtier_hash,
    n: usize,
    matched: *mut usize,
    held: *mut usize,
) -> kvtier_status {
    // SAFETY: the caller's contract, which is kvtier_hold_under's with no ticket.
    unsafe { kvtier_hold_under(client, ns, hashes, n, 0, matched, held) }
}

/// [`kvtier_hold`] for one hand-off, named by `ticket` (random per request, not 0; passed to
/// the decode engine with the block hashes): the decode's [`kvtier_pull_under`] with it ends
/// exactly these holds, and [`kvtier_unhold`] ends them before. `ticket` 0 is [`kvtier_hold`].
///
/// # Safety
/// As for [`kvtier_hold`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_hold_under(
    client: *const kvtier_client,
    ns: *const kvtier_namespace,
    hashes: *const kvtier_hash,
    n: usize,
    ticket: u64,
    matched: *mut usize,
    held: *mut usize,
) -> kvtier_status {
    guard(|| {
        // SAFETY: the caller's contract for each pointer.
        let (client, ns, raw) = unsafe { (client_ref(client)?, ns_of(ns)?, slice(hashes, n, "hashes")?) };
        if matched.is_null() {
            return Err(invalid("matched is NULL"));
        }
        let out = client.hold_under(&ns, &hashes_of(raw)?, HoldTicket::new(ticket))?;
        // SAFETY: `matched` is non-null and writable (caller's contract).
        unsafe { *matched = out.tiers.len() };
        if !held.is_null() {
            // SAFETY: non-null and writable (caller's contract).
            unsafe { *held = out.held };
        }
        Ok(())
    })
}

/// Ends the holds made under `ticket` (not 0) in `ns` on this node's agent now (the engine
/// gave the hand-off up); `*ended` (may be NULL) receives how many blocks are no longer held.
///
/// # Safety
/// `ended` NULL or writable; the other pointers as for every call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_unhold(
    client: *const kvtier_client,
    ns: *const kvtier_namespace,
    ticket: u64,
    ended: *mut usize,
) -> kvtier_status {
    guard(|| {
        // SAFETY: the caller's contract for each pointer.
        let (client, ns) = unsafe { (client_ref(client)?, ns_of(ns)?) };
        let ticket = HoldTicket::new(ticket).ok_or_else(|| invalid("ticket 0 names no hold"))?;
        let n = client.unhold(&ns, ticket)?;
        if !ended.is_null() {
            // SAFETY: non-null and writable (caller's contract).
            unsafe { *ended = n };
        }
        Ok(())
    })
}

/// Saves `n` blocks: block `i` is `lens[i]` bytes at `data[i]`. `outcomes` (n bytes, may be
/// NULL) receives a KVTIER_SAVE_* code per block. Blocks the agent cannot take are not an
/// error: the call succeeds and their outcome says why.
///
/// # Safety
/// Pointers valid for `n` elements; each `data[i]` valid for `lens[i]` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_save(
    client: *const kvtier_client,
    ns: *const kvtier_namespace,
    hashes: *const kvtier_hash,
    data: *const *const c_void,
    lens: *const usize,
    n: usize,
    outcomes: *mut u8,
) -> kvtier_status {
    guard(|| {
        // SAFETY: the caller's contract for each pointer.
        let (client, ns, raw, ptrs, lens) = unsafe {
            (
                client_ref(client)?,
                ns_of(ns)?,
                slice(hashes, n, "hashes")?,
                slice(data, n, "data")?,
                slice(lens, n, "lens")?,
            )
        };
        let hashes = hashes_of(raw)?;
        let mut items = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: `data[i]` is valid for `lens[i]` bytes (caller's contract).
            let bytes = unsafe { slice(ptrs[i].cast::<u8>(), lens[i], "data[i]")? };
            if bytes.is_empty() {
                return Err(invalid(format!("block {i} is empty")));
            }
            items.push((hashes[i], bytes));
        }
        let result = client.save(&ns, &items)?;
        if !outcomes.is_null() {
            // SAFETY: `outcomes` holds `n` bytes (caller's contract).
            let out = unsafe { slice_mut(outcomes, n, "outcomes")? };
            for (o, r) in out.iter_mut().zip(result) {
                *o = save_code(r);
            }
        }
        Ok(())
    })
}

/// Loads `n` blocks into `bufs[i]` (each exactly `lens[i]` bytes, the block's length). `tiers`
/// (n bytes, required) receives each block's tier code; a miss, or a buffer whose length
/// differs from the block, is KVTIER_TIER_MISS.
///
/// # Safety
/// Pointers valid for `n` elements; each `bufs[i]` writable for `lens[i]` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_load(
    client: *const kvtier_client,
    ns: *const kvtier_namespace,
    hashes: *const kvtier_hash,
    bufs: *const *mut c_void,
    lens: *const usize,
    n: usize,
    tiers: *mut u8,
) -> kvtier_status {
    guard(|| {
        // SAFETY: the caller's contract for each pointer.
        let (client, ns, raw, ptrs, lens, tiers) = unsafe {
            (
                client_ref(client)?,
                ns_of(ns)?,
                slice(hashes, n, "hashes")?,
                slice(bufs, n, "bufs")?,
                slice(lens, n, "lens")?,
                slice_mut(tiers, n, "tiers")?,
            )
        };
        let hashes = hashes_of(raw)?;
        let mut dsts = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: `bufs[i]` is writable for `lens[i]` bytes and distinct buffers do not
            // overlap (caller's contract).
            dsts.push(unsafe { slice_mut(ptrs[i].cast::<u8>(), lens[i], "bufs[i]")? });
        }
        let got = client.load(&ns, &hashes, &mut dsts)?;
        for (t, g) in tiers.iter_mut().zip(got) {
            *t = tier_code(g);
        }
        Ok(())
    })
}

/// Reserves arena slots for `n` blocks of `lens[i]` bytes, for zero-copy writing through
/// [`kvtier_slots_ptr`]. Then [`kvtier_commit`] publishes them or [`kvtier_abort`] gives them
/// back; either frees `*out`.
///
/// # Safety
/// Pointers valid for `n` elements; `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_reserve(
    client: *const kvtier_client,
    ns: *const kvtier_namespace,
    hashes: *const kvtier_hash,
    lens: *const usize,
    n: usize,
    out: *mut *mut kvtier_slots,
) -> kvtier_status {
    guard(|| {
        // SAFETY: the caller's contract for each pointer.
        let (client, nsv, raw, lens) = unsafe {
            (
                client_ref(client)?,
                ns_of(ns)?,
                slice(hashes, n, "hashes")?,
                slice(lens, n, "lens")?,
            )
        };
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        if let Some(i) = lens.iter().position(|l| *l == 0) {
            return Err(invalid(format!("block {i} is empty")));
        }
        let items: Vec<(BlockHash, u64)> = hashes_of(raw)?
            .into_iter()
            .zip(lens.iter().map(|l| *l as u64))
            .collect();
        let reserved = client.reserve(&nsv, &items)?;
        let slots = Box::new(kvtier_slots {
            ns: nsv,
            kind: SlotsKind::Reserved(reserved),
        });
        // SAFETY: `out` is non-null and writable (caller's contract).
        unsafe { *out = Box::into_raw(slots) };
        Ok(())
    })
}

/// Acquires `n` blocks for zero-copy reading through [`kvtier_slots_ptr`] (promoting them from
/// disk first where needed). [`kvtier_release`] unpins them and frees `*out`.
///
/// # Safety
/// Pointers valid for `n` elements; `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_acquire(
    client: *const kvtier_client,
    ns: *const kvtier_namespace,
    hashes: *const kvtier_hash,
    n: usize,
    out: *mut *mut kvtier_slots,
) -> kvtier_status {
    guard(|| {
        // SAFETY: the caller's contract for each pointer.
        let (client, nsv, raw) = unsafe { (client_ref(client)?, ns_of(ns)?, slice(hashes, n, "hashes")?) };
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let acquired = client.acquire(&nsv, &hashes_of(raw)?)?;
        let slots = Box::new(kvtier_slots {
            ns: nsv,
            kind: SlotsKind::Acquired(acquired),
        });
        // SAFETY: `out` is non-null and writable (caller's contract).
        unsafe { *out = Box::into_raw(slots) };
        Ok(())
    })
}

/// Number of blocks in `slots` (0 for NULL).
///
/// # Safety
/// `slots` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_slots_count(slots: *const kvtier_slots) -> usize {
    if slots.is_null() {
        return 0;
    }
    // SAFETY: a live handle (caller's contract).
    match unsafe { &(*slots).kind } {
        SlotsKind::Reserved(v) => v.len(),
        SlotsKind::Acquired(v) => v.len(),
    }
}

/// Address of block `i`'s slot in this process, or NULL when block `i` got no slot (see
/// [`kvtier_slots_info`]). Valid until the slots are committed, aborted or released.
///
/// # Safety
/// `slots` is NULL or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_slots_ptr(slots: *const kvtier_slots, i: usize) -> *mut c_void {
    if slots.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: a live handle (caller's contract).
    let ptr = match unsafe { &(*slots).kind } {
        SlotsKind::Reserved(v) => v.get(i).and_then(|r| r.as_ref().ok()).map(Reserved::ptr),
        SlotsKind::Acquired(v) => v.get(i).and_then(Option::as_ref).map(|a| a.ptr().cast_mut()),
    };
    ptr.map_or(std::ptr::null_mut(), |p| p.cast())
}

/// Block `i`'s length (0 without a slot) and code: a KVTIER_SAVE_* code for reserved slots
/// (KVTIER_SAVE_STORED means "slot granted"), a KVTIER_TIER_* code for acquired ones.
///
/// # Safety
/// `slots` is NULL or a live handle; `len` and `code` are NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_slots_info(
    slots: *const kvtier_slots,
    i: usize,
    len: *mut usize,
    code: *mut u8,
) -> kvtier_status {
    guard(|| {
        if slots.is_null() {
            return Err(invalid("slots is NULL"));
        }
        // SAFETY: a live handle (caller's contract).
        let (l, c) = match unsafe { &(*slots).kind } {
            SlotsKind::Reserved(v) => match v.get(i).ok_or_else(|| invalid("index out of range"))? {
                Ok(r) => (r.len() as usize, KVTIER_SAVE_STORED),
                Err(o) => (0, save_code(*o)),
            },
            SlotsKind::Acquired(v) => match v.get(i).ok_or_else(|| invalid("index out of range"))? {
                Some(a) => (a.len() as usize, tier_code(Some(a.tier()))),
                None => (0, KVTIER_TIER_MISS),
            },
        };
        // SAFETY: each is NULL or writable (caller's contract).
        unsafe {
            if !len.is_null() {
                *len = l;
            }
            if !code.is_null() {
                *code = c;
            }
        }
        Ok(())
    })
}

/// Takes back ownership of a slots handle of the expected kind; a handle of the other kind is
/// left untouched (still the caller's) and reported.
///
/// # Safety
/// `slots` is NULL or a live handle not consumed before.
unsafe fn take_slots(slots: *mut kvtier_slots, reserved: bool) -> Result<kvtier_slots, Failure> {
    if slots.is_null() {
        return Err(invalid("slots is NULL"));
    }
    // SAFETY: a live handle (caller's contract), only read here.
    let is_reserved = matches!(unsafe { &(*slots).kind }, SlotsKind::Reserved(_));
    match (reserved, is_reserved) {
        (true, false) => Err(invalid("these slots were acquired, not reserved: release them")),
        (false, true) => Err(invalid(
            "these slots were reserved, not acquired: commit or abort them",
        )),
        // SAFETY: a handle we boxed, consumed once (caller's contract).
        _ => Ok(*unsafe { Box::from_raw(slots) }),
    }
}

fn finish_reserved(
    client: &Client,
    slots: kvtier_slots,
    commit: bool,
    flags: Option<&mut [u8]>,
) -> Result<(), Failure> {
    let SlotsKind::Reserved(v) = slots.kind else {
        return Err(invalid("these slots were acquired, not reserved"));
    };
    let granted_at: Vec<usize> = (0..v.len()).filter(|&i| v[i].is_ok()).collect();
    let granted: Vec<Reserved> = v.into_iter().filter_map(Result::ok).collect();
    let done = if commit {
        client.commit(&slots.ns, granted)?
    } else {
        client.abort(&slots.ns, granted)?
    };
    if let Some(flags) = flags {
        flags.fill(0);
        for (i, ok) in granted_at.into_iter().zip(done) {
            flags[i] = u8::from(ok);
        }
    }
    Ok(())
}

/// Publishes written reserved slots and frees `slots` (also when the call fails). `committed`
/// (NULL, or [`kvtier_slots_count`] bytes) receives 1 for each block now stored, 0 for blocks
/// that got no slot or whose reservation the agent no longer held. When the slots' connection
/// has ended (a timeout, an agent restart) the call fails with KVTIER_ERR_STALE.
///
/// # Safety
/// `client` live; `slots` a live handle from [`kvtier_reserve`], not used afterwards;
/// `committed` NULL or writable for the count.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_commit(
    client: *const kvtier_client,
    slots: *mut kvtier_slots,
    committed: *mut u8,
) -> kvtier_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let n = unsafe { kvtier_slots_count(slots) };
        // SAFETY: the caller's contract.
        let (slots, client) = unsafe { (take_slots(slots, true)?, client_ref(client)?) };
        let flags = if committed.is_null() {
            None
        } else {
            // SAFETY: writable for the count (caller's contract).
            Some(unsafe { slice_mut(committed, n, "committed")? })
        };
        finish_reserved(client, slots, true, flags)
    })
}

/// Gives reserved slots back unwritten; frees `slots`.
///
/// # Safety
/// `client` live; `slots` a live handle from [`kvtier_reserve`], not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_abort(
    client: *const kvtier_client,
    slots: *mut kvtier_slots,
) -> kvtier_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let (slots, client) = unsafe { (take_slots(slots, true)?, client_ref(client)?) };
        finish_reserved(client, slots, false, None)
    })
}

/// Unpins acquired slots; frees `slots`. Reserved slots are refused and left to the caller.
///
/// # Safety
/// `client` live; `slots` a live handle from [`kvtier_acquire`], not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_release(
    client: *const kvtier_client,
    slots: *mut kvtier_slots,
) -> kvtier_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let (slots, client) = unsafe { (take_slots(slots, false)?, client_ref(client)?) };
        let SlotsKind::Acquired(v) = slots.kind else {
            return Err(invalid("these slots were reserved, not acquired"));
        };
        client.release(&slots.ns, v.into_iter().flatten().collect())?;
        Ok(())
    })
}

/// Frees slots without a call to the agent: reserved slots are aborted and acquired ones
/// released on the client's next call (or when its connection closes). NULL is ignored. For
/// error paths, and for slots whose client was closed.
///
/// # Safety
/// `slots` is NULL or a live handle, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_slots_free(slots: *mut kvtier_slots) {
    if !slots.is_null() {
        // SAFETY: a handle we boxed, freed once (caller's contract).
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(slots) })));
    }
}

/// Writes the agent's counters as a NUL-terminated JSON document into `buf` (`cap` bytes).
/// `*needed` (if not NULL) receives the size including the NUL; when `cap` is too small the
/// call fails with KVTIER_ERR_BUFFER and writes nothing.
///
/// # Safety
/// `buf` writable for `cap` bytes (may be NULL when `cap` is 0); `needed` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvtier_stats(
    client: *const kvtier_client,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> kvtier_status {
    guard(|| {
        // SAFETY: the caller's contract.
        let client = unsafe { client_ref(client)? };
        let json = client.stats()?;
        let size = json.len() + 1;
        if !needed.is_null() {
            // SAFETY: writable (caller's contract).
            unsafe { *needed = size };
        }
        if cap < size {
            return Err(Failure(
                KVTIER_ERR_BUFFER,
                format!("stats need {size} bytes, buffer has {cap}"),
            ));
        }
        // SAFETY: `buf` is writable for `cap >= size` bytes (caller's contract).
        let out = unsafe { slice_mut(buf.cast::<u8>(), size, "buf")? };
        out[..json.len()].copy_from_slice(json.as_bytes());
        out[json.len()] = 0;
        Ok(())
    })
}

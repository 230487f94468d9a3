//! The RDMA device: found with `ibv_get_device_list`, opened through rdmacm (so that the
//! protection domain and the arena's registration belong to the same verbs context as the
//! queue pairs rdmacm connects), with the whole arena registered once.

use std::ffi::CStr;
use std::io;
use std::os::raw::c_int;
use std::ptr;
use std::sync::Arc;

use rdma_sys as sys;

use super::RdmaConfig;
use super::cm::last_error;
use crate::store::TieredStore;
use crate::transport::{TransportError, TransportKind};

/// [`TransportError::Unavailable`] for this transport.
pub(crate) fn unavailable(reason: impl Into<String>) -> TransportError {
    TransportError::Unavailable {
        transport: TransportKind::Rdma,
        reason: reason.into(),
    }
}

/// Picks the device to use from what `ibv_get_device_list` returned: the device names, or the
/// errno of a failed call. `wanted` names one; `None` takes the first.
pub(crate) fn pick_device(
    listed: Result<Vec<String>, i32>,
    wanted: Option<&str>,
) -> Result<String, TransportError> {
    let names = match listed {
        Ok(names) => names,
        Err(0) => return Err(unavailable("no RDMA device (ibv_get_device_list failed)")),
        Err(errno) => {
            // libibverbs says ENOSYS when the kernel exposes no verbs devices at all.
            let context = if errno == libc::ENOSYS {
                "no RDMA support in this kernel; "
            } else {
                ""
            };
            return Err(unavailable(format!(
                "no RDMA device ({context}ibv_get_device_list failed: {})",
                io::Error::from_raw_os_error(errno)
            )));
        }
    };
    let Some(first) = names.first() else {
        return Err(unavailable("no RDMA device (ibv_get_device_list found none)"));
    };
    match wanted {
        None => Ok(first.clone()),
        Some(w) => names.iter().find(|n| *n == w).cloned().ok_or_else(|| {
            unavailable(format!(
                "RDMA device {w:?} not found; this host has {}",
                names.join(", ")
            ))
        }),
    }
}

/// The names of the host's RDMA devices, or the errno of a failed `ibv_get_device_list`.
pub(crate) fn list_devices() -> Result<Vec<String>, i32> {
    let mut n: c_int = 0;
    // SAFETY: the out-pointer is valid; the returned array is ours until ibv_free_device_list.
    let list = unsafe { sys::ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Err(last_error().raw_os_error().unwrap_or(0));
    }
    let mut names = Vec::new();
    for i in 0..usize::try_from(n).unwrap_or(0) {
        // SAFETY: the array has `n` entries before its NULL terminator.
        let dev = unsafe { *list.add(i) };
        if dev.is_null() {
            break;
        }
        // SAFETY: `dev` belongs to the list, which is still held.
        names.push(unsafe { device_name(dev) });
    }
    // SAFETY: freed once; no pointer from the list is kept.
    unsafe { sys::ibv_free_device_list(list) };
    Ok(names)
}

/// A device's kernel name (`mlx5_0`, `rxe0`).
///
/// # Safety
/// `dev` must point to a live `ibv_device` (from a device list still held, or a context's).
unsafe fn device_name(dev: *mut sys::ibv_device) -> String {
    // SAFETY: the caller passes a live device.
    let p = unsafe { sys::ibv_get_device_name(dev) };
    if p.is_null() {
        return String::new();
    }
    // SAFETY: a NUL-terminated string inside the device, which outlives this call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// What the device allows, from `ibv_query_device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeviceLimits {
    /// Most WRs in one queue.
    pub(crate) max_qp_wr: u32,
    /// Most SGEs in one RDMA READ.
    pub(crate) max_read_sge: u32,
    /// Most entries in one completion queue.
    pub(crate) max_cqe: u32,
    /// Most READs a queue pair may have outstanding as the reader.
    pub(crate) max_init_rd_atom: u32,
    /// Most READs a queue pair may serve at once as the target.
    pub(crate) max_rd_atom: u32,
}

impl DeviceLimits {
    fn from_attr(a: &sys::ibv_device_attr) -> Self {
        let n = |v: c_int| u32::try_from(v).unwrap_or(0);
        // iWARP devices read into one SGE only and say so in `max_sge_rd`; some devices leave it
        // 0, which promises nothing beyond one either.
        let max_read_sge = n(a.max_sge).min(n(a.max_sge_rd)).max(1);
        Self {
            max_qp_wr: n(a.max_qp_wr),
            max_read_sge,
            max_cqe: n(a.max_cqe),
            max_init_rd_atom: n(a.max_qp_init_rd_atom),
            max_rd_atom: n(a.max_qp_rd_atom),
        }
    }
}

/// The open device with the arena registered on it. Queue pairs and listeners hold it in an
/// `Arc`, so it is torn down after them.
#[derive(Debug)]
pub(crate) struct Device {
    name: String,
    /// rdmacm's device contexts (`rdma_get_devices`), held so that `ctx` stays open.
    cm_list: *mut *mut sys::ibv_context,
    ctx: *mut sys::ibv_context,
    pd: *mut sys::ibv_pd,
    mr: *mut sys::ibv_mr,
    lkey: u32,
    rkey: u32,
    base: u64,
    len: u64,
    limits: DeviceLimits,
    /// Keeps the arena mapped for as long as it is registered.
    _store: Arc<TieredStore>,
}

// SAFETY: the pointers are verbs objects, which libibverbs lets any thread use concurrently
// (its calls lock what they share); this struct never writes through them, and the fields it
// reads after `open` (keys, addresses) are never changed by the library.
unsafe impl Send for Device {}
// SAFETY: as for Send: only thread-safe library calls and immutable fields are reached through
// `&Device`.
unsafe impl Sync for Device {}

impl Device {
    /// Opens the configured (or first) device, checks its port, allocates a protection domain
    /// and registers the whole arena of `store` for local writes and remote reads.
    pub(crate) fn open(store: Arc<TieredStore>, cfg: &RdmaConfig) -> Result<Self, TransportError> {
        let name = pick_device(list_devices(), cfg.device.as_deref())?;
        let mut n: c_int = 0;
        // SAFETY: valid out-pointer; the list is released in Drop with rdma_free_devices.
        let cm_list = unsafe { sys::rdma_get_devices(&mut n) };
        if cm_list.is_null() {
            return Err(unavailable(format!(
                "rdmacm cannot open the RDMA devices: {}",
                last_error()
            )));
        }
        let arena = store.host().arena();
        let (base, len) = (arena.as_ptr() as u64, arena.len());
        let mut dev = Self {
            name,
            cm_list,
            ctx: ptr::null_mut(),
            pd: ptr::null_mut(),
            mr: ptr::null_mut(),
            lkey: 0,
            rkey: 0,
            base,
            len,
            limits: DeviceLimits::from_attr(&zeroed_device_attr()),
            _store: Arc::clone(&store),
        };
        // From here on, Drop releases whatever was taken if a step fails.
        for i in 0..usize::try_from(n).unwrap_or(0) {
            // SAFETY: the list has `n` entries before its NULL terminator.
            let ctx = unsafe { *cm_list.add(i) };
            if ctx.is_null() {
                break;
            }
            // SAFETY: rdmacm keeps the context open while the list is held.
            if unsafe { device_name((*ctx).device) } == dev.name {
                dev.ctx = ctx;
                break;
            }
        }
        if dev.ctx.is_null() {
            return Err(unavailable(format!(
                "rdmacm does not list RDMA device {}",
                dev.name
            )));
        }
        let mut attr = zeroed_device_attr();
        // SAFETY: a live context and a valid out-struct.
        if unsafe { sys::ibv_query_device(dev.ctx, &mut attr) } != 0 {
            return Err(unavailable(format!("querying {}: {}", dev.name, last_error())));
        }
        dev.limits = DeviceLimits::from_attr(&attr);
        if dev.limits.max_init_rd_atom == 0 {
            return Err(unavailable(format!("{} cannot issue RDMA READs", dev.name)));
        }
        match dev.port(cfg.port) {
            Ok(p) if p.state != sys::ibv_port_state::IBV_PORT_ACTIVE => {
                tracing::warn!(device = %dev.name, port = cfg.port, "RDMA port is not active yet");
            }
            Ok(_) => {}
            Err(e) => return Err(unavailable(format!("port {} of {}: {e}", cfg.port, dev.name))),
        }
        // SAFETY: a live context.
        dev.pd = unsafe { sys::ibv_alloc_pd(dev.ctx) };
        if dev.pd.is_null() {
            return Err(unavailable(format!(
                "allocating a protection domain on {}: {}",
                dev.name,
                last_error()
            )));
        }
        let access =
            sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ;
        // SAFETY: the range is the arena's mapping, which stays mapped while `_store` (held by
        // this struct) lives, and the registration is removed in Drop before that.
        dev.mr = unsafe {
            sys::ibv_reg_mr(
                dev.pd,
                arena.as_ptr().cast(),
                usize::try_from(len).unwrap_or(usize::MAX),
                access.0 as c_int,
            )
        };
        if dev.mr.is_null() {
            let err = last_error();
            let hint = if err.raw_os_error() == Some(libc::ENOMEM) || err.raw_os_error() == Some(libc::EPERM)
            {
                " (the memlock limit must allow pinning the whole arena)"
            } else {
                ""
            };
            return Err(unavailable(format!(
                "registering the {len}-byte arena on {}: {err}{hint}",
                dev.name
            )));
        }
        // SAFETY: a live registration; its keys never change.
        (dev.lkey, dev.rkey) = unsafe { ((*dev.mr).lkey, (*dev.mr).rkey) };
        tracing::info!(device = %dev.name, bytes = len, "RDMA: arena registered");
        Ok(dev)
    }

    /// `ibv_query_port` of port `port`.
    pub(crate) fn port(&self, port: u8) -> io::Result<sys::ibv_port_attr> {
        // SAFETY: plain C data; all zeros is valid.
        let mut attr: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
        // The exported symbol fills the older, shorter layout, a prefix of `ibv_port_attr`;
        // <infiniband/verbs.h> makes the same cast when a provider has no newer entry.
        // SAFETY: a live context and a zeroed out-struct at least as large as what is written.
        let rc = unsafe { sys::ibv_query_port(self.ctx, port, (&raw mut attr).cast()) };
        if rc != 0 {
            // Returns the error number rather than setting errno.
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(attr)
    }

    /// The device's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The verbs context (rdmacm's) the arena is registered on.
    pub(crate) fn ctx(&self) -> *mut sys::ibv_context {
        self.ctx
    }

    /// The protection domain of the registration.
    pub(crate) fn pd(&self) -> *mut sys::ibv_pd {
        self.pd
    }

    /// The registration's local key (the READs' destination SGEs).
    pub(crate) fn lkey(&self) -> u32 {
        self.lkey
    }

    /// The registration's remote key, handed to peers in the endpoint.
    pub(crate) fn rkey(&self) -> u32 {
        self.rkey
    }

    /// The arena's address in this process and its length: the registered region.
    pub(crate) fn region(&self) -> (u64, u64) {
        (self.base, self.len)
    }

    /// What the device allows.
    pub(crate) fn limits(&self) -> DeviceLimits {
        self.limits
    }

    /// The name of the device behind `ctx`.
    ///
    /// # Safety
    /// `ctx` must be a live verbs context (an rdmacm id's `verbs`).
    pub(crate) unsafe fn name_of(ctx: *mut sys::ibv_context) -> String {
        if ctx.is_null() {
            return "none".into();
        }
        // SAFETY: the caller passes a live context, whose device outlives it.
        unsafe { device_name((*ctx).device) }
    }
}

fn zeroed_device_attr() -> sys::ibv_device_attr {
    // SAFETY: plain C data (integers and byte arrays); all zeros is valid.
    unsafe { std::mem::zeroed() }
}

impl Drop for Device {
    fn drop(&mut self) {
        if !self.mr.is_null() {
            // SAFETY: registered by `open`, deregistered once; every queue pair that used it
            // holds an `Arc` of this device and is gone.
            let rc = unsafe { sys::ibv_dereg_mr(self.mr) };
            if rc != 0 {
                tracing::warn!(error = %io::Error::from_raw_os_error(rc), "RDMA: deregistering the arena");
            }
        }
        if !self.pd.is_null() {
            // SAFETY: allocated by `open`, released once, after its only registration.
            unsafe { sys::ibv_dealloc_pd(self.pd) };
        }
        // SAFETY: returned by rdma_get_devices in `open`, freed once, after the last object on
        // its contexts.
        unsafe { sys::rdma_free_devices(self.cm_list) };
    }
}

//! The puller's side: one reliable-connected queue pair to a source, with its own completion
//! queue, set up through rdmacm; posting chains of READs and polling their completions.

use std::io;
use std::mem::size_of;
use std::os::raw::c_int;
use std::ptr;
use std::sync::Arc;
use std::time::Instant;

use rdma_sys as sys;
use sys::rdma_cm_event_type as ev;

use super::RdmaConfig;
use super::cm::{Channel, last_error, ms_until, sockaddr, status_text};
use super::device::Device;
use super::endpoint::{HELLO_LEN, RdmaEndpoint, hello};
use super::pump::{PostError, ReadQueue};
use super::wr::{ReadLimits, ReadWr};
use crate::transport::TransportError;

// The work request and completion layouts are written by hand in rdma-sys (bindgen cannot
// express their unions); these are their sizes in <infiniband/verbs.h> on 64-bit targets.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(size_of::<sys::ibv_send_wr>() == 128 && size_of::<sys::ibv_wc>() == 48);

/// Completions taken per poll.
const POLL_BATCH: usize = 16;

// The device-independent code names these two statuses without the bindings.
const _: () = assert!(
    sys::ibv_wc_status::IBV_WC_SUCCESS == super::wr::WC_SUCCESS
        && sys::ibv_wc_status::IBV_WC_WR_FLUSH_ERR == super::pump::WC_FLUSHED
);

/// A work completion status as text, with what it usually means for a READ from a source.
pub(crate) fn wc_status_text(status: u32) -> String {
    // SAFETY: ibv_wc_status_str takes any value and returns a static string.
    let p = unsafe { sys::ibv_wc_status_str(status) };
    let name = if p.is_null() {
        format!("status {status}")
    } else {
        // SAFETY: a NUL-terminated static string owned by the library.
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned()
    };
    let hint = match status {
        sys::ibv_wc_status::IBV_WC_REM_ACCESS_ERR => {
            " (the source refused the read: it restarted since the grant, or the range is not registered)"
        }
        sys::ibv_wc_status::IBV_WC_RETRY_EXC_ERR => " (the source stopped answering)",
        _ => "",
    };
    format!("{name}{hint}")
}

/// A connected queue pair to one source.
#[derive(Debug)]
pub(crate) struct Conn {
    device: Arc<Device>,
    id: *mut sys::rdma_cm_id,
    qp: *mut sys::ibv_qp,
    cq: *mut sys::ibv_cq,
    connected: bool,
    /// The endpoint it was made for: a source that restarted has a new registration, and this
    /// queue pair is then stale.
    endpoint: RdmaEndpoint,
    /// Limits of the READs posted on it.
    pub(crate) limits: ReadLimits,
    /// Most READ WRs in flight at once (the send queue's depth and the initiator depth).
    pub(crate) window: usize,
    /// Last, after the id (see Drop).
    channel: Channel,
}

// SAFETY: the id, queue pair and completion queue are owned by this value alone, and used by
// one thread at a time (a pull takes the connection out of the pool); libibverbs and librdmacm
// have no thread affinity.
unsafe impl Send for Conn {}

impl Conn {
    /// Connects to the source at `ep`, giving up at `deadline` or after the configured connect
    /// timeout.
    pub(crate) fn connect(
        device: Arc<Device>,
        ep: &RdmaEndpoint,
        cfg: &RdmaConfig,
        deadline: Instant,
    ) -> Result<Self, TransportError> {
        let peer = ep.addr.to_string();
        let fail = |what: &str, e: io::Error| TransportError::Io {
            peer: peer.clone(),
            reason: format!("{what}: {e}"),
        };
        let until = deadline.min(Instant::now() + cfg.connect_timeout);
        let channel = Channel::new().map_err(|e| fail("rdma_create_event_channel", e))?;
        let id = channel.create_id().map_err(|e| fail("rdma_create_id", e))?;
        let mut conn = Self {
            device,
            id,
            qp: ptr::null_mut(),
            cq: ptr::null_mut(),
            connected: false,
            endpoint: ep.clone(),
            limits: ReadLimits {
                max_msg: 1,
                max_sge: 1,
                max_chain: 1,
            },
            window: 1,
            channel,
        };
        // From here on, Drop releases whatever was set up if a step fails.
        let mut dst = sockaddr(ep.addr);
        // SAFETY: a live id; `dst` is a valid socket address that outlives the call (librdmacm
        // copies it).
        if unsafe { sys::rdma_resolve_addr(id, ptr::null_mut(), (&raw mut dst).cast(), ms_until(until)) } != 0
        {
            return Err(fail("rdma_resolve_addr", last_error()));
        }
        conn.expect(ev::RDMA_CM_EVENT_ADDR_RESOLVED, until, &peer)?;
        // SAFETY: resolving the address bound the id to a device; `verbs` is that context.
        let verbs = unsafe { (*id).verbs };
        if verbs != conn.device.ctx() {
            // SAFETY: a resolved id's context is live while the id is.
            let other = unsafe { Device::name_of(verbs) };
            return Err(TransportError::Io {
                peer,
                reason: format!(
                    "the route to it leaves through RDMA device {other}; the arena is registered on {}",
                    conn.device.name()
                ),
            });
        }
        // SAFETY: a live id whose address is resolved.
        if unsafe { sys::rdma_resolve_route(id, ms_until(until)) } != 0 {
            return Err(fail("rdma_resolve_route", last_error()));
        }
        conn.expect(ev::RDMA_CM_EVENT_ROUTE_RESOLVED, until, &peer)?;
        // SAFETY: the resolved id's port is set; reading a plain field.
        let port = unsafe { (*id).port_num };
        let max_msg = match conn
            .device
            .port(port)
            .map_err(|e| fail(&format!("querying port {port}"), e))?
            .max_msg_sz
        {
            // A provider that states no limit gets the largest message an SGE can describe
            // (and says so with an error completion if that is too much), not one-byte READs.
            0 => u32::MAX,
            n => n,
        };

        let lim = conn.device.limits();
        let window = cfg.max_outstanding_reads.clamp(
            1,
            lim.max_init_rd_atom
                .min(lim.max_qp_wr)
                .clamp(1, u32::from(u8::MAX)),
        );
        let max_sge = cfg.max_sge.clamp(1, lim.max_read_sge);
        // Every WR in flight may complete (in error, unsignalled ones too) before one is polled.
        let cqe = (2 * window + 1).min(lim.max_cqe.max(1));
        // SAFETY: a live context; no completion channel (the puller polls).
        conn.cq = unsafe {
            sys::ibv_create_cq(
                conn.device.ctx(),
                cqe as c_int,
                ptr::null_mut(),
                ptr::null_mut(),
                0,
            )
        };
        if conn.cq.is_null() {
            return Err(fail("ibv_create_cq", last_error()));
        }
        // SAFETY: plain C data; all zeros is valid (null pointers, zero counts).
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = conn.cq;
        init.recv_cq = conn.cq;
        init.cap.max_send_wr = window;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = max_sge;
        init.cap.max_recv_sge = 1;
        init.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        // SAFETY: a live id bound to the context of `pd` (checked above), a live CQ of that
        // context, and a valid attribute struct; the QP is destroyed in Drop.
        if unsafe { sys::rdma_create_qp(id, conn.device.pd(), &mut init) } != 0 {
            return Err(fail("rdma_create_qp", last_error()));
        }
        // SAFETY: rdma_create_qp set the id's `qp`.
        conn.qp = unsafe { (*id).qp };

        let data = hello(&ep.token);
        let lim_rd = u8::try_from(lim.max_rd_atom).unwrap_or(u8::MAX);
        // SAFETY: plain C data; all zeros is valid.
        let mut param: sys::rdma_conn_param = unsafe { std::mem::zeroed() };
        param.private_data = data.as_ptr().cast();
        param.private_data_len = HELLO_LEN as u8;
        param.initiator_depth = u8::try_from(window).unwrap_or(u8::MAX);
        // The source never reads from this side; one keeps providers that dislike zero happy.
        param.responder_resources = lim_rd.min(1);
        param.flow_control = 1;
        param.retry_count = 7;
        param.rnr_retry_count = 7;
        // SAFETY: a live id with a QP; `param` and the private data it points to outlive the
        // call (librdmacm copies them).
        if unsafe { sys::rdma_connect(id, &mut param) } != 0 {
            return Err(fail("rdma_connect", last_error()));
        }
        conn.expect(ev::RDMA_CM_EVENT_ESTABLISHED, until, &peer)?;
        conn.connected = true;
        conn.window = window as usize;
        conn.limits = ReadLimits {
            max_msg: u64::from(max_msg),
            max_sge: max_sge as usize,
            max_chain: cfg.wrs_per_post.clamp(1, window) as usize,
        };
        tracing::debug!(%peer, window, max_sge, max_msg, "RDMA: connected");
        Ok(conn)
    }

    /// Waits for event `want` on this connection's channel.
    fn expect(&self, want: u32, until: Instant, peer: &str) -> Result<(), TransportError> {
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let event = self.channel.next_event(left).map_err(|e| TransportError::Io {
                peer: peer.to_string(),
                reason: format!("rdma_get_cm_event: {e}"),
            })?;
            let Some(event) = event else {
                return Err(TransportError::TimedOut {
                    peer: peer.to_string(),
                });
            };
            if event.id != self.id {
                continue;
            }
            if event.kind == want && event.status == 0 {
                return Ok(());
            }
            let reason = match event.kind {
                ev::RDMA_CM_EVENT_REJECTED => {
                    "the source rejected the connection (it restarted since the grant, or is out of \
                     queue pairs)"
                        .to_string()
                }
                _ => format!(
                    "{} while waiting for {}: {}",
                    event.name(),
                    super::cm::event_name(want),
                    status_text(event.status)
                ),
            };
            return Err(TransportError::Io {
                peer: peer.to_string(),
                reason,
            });
        }
    }

    /// Whether this connection was made for `ep` and the source has not dropped it since.
    pub(crate) fn usable_for(&mut self, ep: &RdmaEndpoint) -> bool {
        if !self.endpoint.same_registration(ep) {
            return false;
        }
        loop {
            match self.channel.next_event(std::time::Duration::ZERO) {
                Ok(None) => return true,
                Ok(Some(e)) => match e.kind {
                    ev::RDMA_CM_EVENT_DISCONNECTED
                    | ev::RDMA_CM_EVENT_DEVICE_REMOVAL
                    | ev::RDMA_CM_EVENT_TIMEWAIT_EXIT
                    | ev::RDMA_CM_EVENT_CONNECT_ERROR
                    | ev::RDMA_CM_EVENT_UNREACHABLE => return false,
                    _ => {}
                },
                Err(_) => return false,
            }
        }
    }
}

impl ReadQueue for Conn {
    fn window(&self) -> usize {
        self.window
    }

    /// Posts `wrs` (one chain) with a single `ibv_post_send`, reading with `rkey` into the
    /// device's registration.
    fn post(&mut self, wrs: &[ReadWr], rkey: u32) -> Result<(), PostError> {
        if wrs.is_empty() {
            return Ok(());
        }
        let lkey = self.device.lkey();
        let mut sges: Vec<sys::ibv_sge> = wrs
            .iter()
            .flat_map(|w| w.sges.iter())
            .map(|s| sys::ibv_sge {
                addr: s.addr,
                length: s.len,
                lkey,
            })
            .collect();
        let sge_base = sges.as_mut_ptr();
        let mut raw: Vec<sys::ibv_send_wr> = Vec::with_capacity(wrs.len());
        let mut at = 0;
        for w in wrs {
            // SAFETY: plain C data (integers, raw pointers and unions of them); all zeros is
            // valid and means "no flags, no next".
            let mut r: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
            r.wr_id = w.wr_id;
            r.sg_list = sge_base.wrapping_add(at);
            r.num_sge = w.sges.len() as c_int;
            r.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_READ;
            r.send_flags = if w.signaled {
                sys::ibv_send_flags::IBV_SEND_SIGNALED.0
            } else {
                0
            };
            r.wr.rdma = sys::rdma_t {
                remote_addr: w.remote,
                rkey,
            };
            at += w.sges.len();
            raw.push(r);
        }
        let n = raw.len();
        let base = raw.as_mut_ptr();
        for i in 0..n - 1 {
            // SAFETY: `i` and `i + 1` are inside `raw`, which is neither moved nor resized while
            // these pointers exist.
            unsafe { (*base.add(i)).next = base.add(i + 1) };
        }
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: a live QP; the WR list and its SGE arrays are valid for the call (the provider
        // copies them into the send queue before returning); every SGE lies in the registered
        // arena inside a slot the pull holds (the caller planned them from its reservations).
        let rc = unsafe { post_send(self.qp, base, &mut bad) };
        drop(sges);
        if rc == 0 {
            return Ok(());
        }
        let posted = if bad.is_null() {
            // Unknown: count none, the fence (destroying the QP) covers any that went.
            0
        } else {
            (bad as usize).saturating_sub(base as usize) / size_of::<sys::ibv_send_wr>()
        };
        Err(PostError {
            error: io::Error::from_raw_os_error(rc),
            posted: posted.min(n),
        })
    }

    /// Takes the completions queued now: `(wr_id, status)` pairs appended to `out`.
    fn poll(&mut self, out: &mut Vec<(u64, u32)>) -> io::Result<usize> {
        // SAFETY: plain C data; all zeros is valid.
        let mut wcs: [sys::ibv_wc; POLL_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: a live CQ and room for POLL_BATCH completions.
        let n = unsafe { poll_cq(self.cq, POLL_BATCH as c_int, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(io::Error::other(format!("ibv_poll_cq returned {n}")));
        }
        let n = (n as usize).min(POLL_BATCH);
        out.extend(wcs[..n].iter().map(|wc| (wc.wr_id, wc.status)));
        Ok(n)
    }

    /// Moves the queue pair to the error state: nothing more is started, and everything posted
    /// completes (flushed) so that it can be drained.
    fn to_error(&mut self) -> io::Result<()> {
        // SAFETY: plain C data; all zeros is valid.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = sys::ibv_qp_state::IBV_QPS_ERR;
        // SAFETY: a live QP and a valid attribute struct; only the state is changed.
        let rc =
            unsafe { sys::ibv_modify_qp(self.qp, &mut attr, sys::ibv_qp_attr_mask::IBV_QP_STATE.0 as c_int) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }
}

/// `ibv_post_send`, an inline function in C: the provider's entry in the context's ops.
///
/// # Safety
/// `qp` must be a live QP; `wr` a valid WR list; `bad` a valid out-pointer.
unsafe fn post_send(
    qp: *mut sys::ibv_qp,
    wr: *mut sys::ibv_send_wr,
    bad: *mut *mut sys::ibv_send_wr,
) -> c_int {
    // SAFETY: a live QP points at its live context.
    let op = unsafe { (*(*qp).context).ops.post_send };
    match op {
        // SAFETY: the provider's own entry, called with the caller's valid arguments.
        Some(f) => unsafe { f(qp, wr, bad) },
        None => libc::EOPNOTSUPP,
    }
}

/// `ibv_poll_cq`, an inline function in C: the provider's entry in the context's ops.
///
/// # Safety
/// `cq` must be a live CQ and `wc` must have room for `n` completions.
unsafe fn poll_cq(cq: *mut sys::ibv_cq, n: c_int, wc: *mut sys::ibv_wc) -> c_int {
    // SAFETY: a live CQ points at its live context.
    let op = unsafe { (*(*cq).context).ops.poll_cq };
    match op {
        // SAFETY: the provider's own entry, called with the caller's valid arguments.
        Some(f) => unsafe { f(cq, n, wc) },
        None => -libc::EOPNOTSUPP,
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.connected {
            // Tells the source, and moves the QP to the error state if it is not there yet.
            // SAFETY: a live, connected id.
            unsafe { sys::rdma_disconnect(self.id) };
        }
        if !self.qp.is_null() {
            // Destroying the QP is the last word on its READs: once it returns, the device
            // writes nothing more for it into the arena.
            // SAFETY: created on this id by rdma_create_qp, destroyed once; no other reference
            // to it exists.
            let rc = unsafe { sys::ibv_destroy_qp(self.qp) };
            if rc != 0 {
                tracing::error!(
                    error = %io::Error::from_raw_os_error(rc),
                    "RDMA: destroying a queue pair failed; its reads may still land"
                );
            }
            // SAFETY: the id is live; rdmacm must not find the destroyed QP on it.
            unsafe { (*self.id).qp = ptr::null_mut() };
        }
        if !self.cq.is_null() {
            // SAFETY: created by `connect`, destroyed once, after the only QP that used it.
            unsafe { sys::ibv_destroy_cq(self.cq) };
        }
        if !self.id.is_null() {
            // Every event of it was acknowledged as it was read, so this does not wait.
            // SAFETY: created by `connect`, destroyed once, before its channel (a field, dropped
            // after this body).
            unsafe { sys::rdma_destroy_id(self.id) };
        }
    }
}

//! The source's side: an rdmacm listener on a thread of its own that accepts pullers' queue
//! pairs. The source posts nothing on them — the pullers' READs are served by the device alone —
//! so a queue pair here only has to exist, in the right protection domain, until its puller
//! disconnects.

use std::net::SocketAddr;
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rdma_sys as sys;
use sys::rdma_cm_event_type as ev;

use super::cm::{Channel, CmEvent, last_error, sockaddr, status_text};
use super::device::{Device, unavailable};
use super::endpoint::{TOKEN_LEN, hello_matches};
use crate::transport::TransportError;

/// How often the listener thread looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);
/// Most connection requests queued before rdmacm refuses more.
const BACKLOG: i32 = 128;
/// Most pullers' queue pairs kept at once. A puller that exits disconnects (its kernel does it
/// for a crashed process), but one whose host died never does: past this many, the oldest
/// connection is closed to make room (a live puller sees the disconnect and connects again).
const MAX_ACCEPTED: usize = 4096;

/// A running listener; dropping it stops the thread and destroys every accepted queue pair.
#[derive(Debug)]
pub(crate) struct Listener {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Binds rdmacm to `addr` and starts accepting connections that carry `token`.
    pub(crate) fn start(
        device: Arc<Device>,
        addr: SocketAddr,
        token: [u8; TOKEN_LEN],
    ) -> Result<Self, TransportError> {
        let channel = Channel::new().map_err(|e| unavailable(format!("rdma_create_event_channel: {e}")))?;
        let id = channel
            .create_id()
            .map_err(|e| unavailable(format!("rdma_create_id: {e}")))?;
        let state = State {
            device,
            token,
            listen: id,
            accepted: Vec::new(),
            channel,
        };
        let mut sa = sockaddr(addr);
        // SAFETY: a live id and a valid socket address (copied by librdmacm).
        if unsafe { sys::rdma_bind_addr(id, (&raw mut sa).cast()) } != 0 {
            return Err(unavailable(format!("binding rdmacm to {addr}: {}", last_error())));
        }
        // SAFETY: a bound id: `verbs` is its device's context, or NULL for a wildcard address.
        let verbs = unsafe { (*id).verbs };
        if !verbs.is_null() && verbs != state.device.ctx() {
            // SAFETY: the bound id's context is live while the id is.
            let other = unsafe { Device::name_of(verbs) };
            return Err(unavailable(format!(
                "{addr} belongs to RDMA device {other}; the arena is registered on {}",
                state.device.name()
            )));
        }
        // SAFETY: a live, bound id.
        if unsafe { sys::rdma_listen(id, BACKLOG) } != 0 {
            return Err(unavailable(format!("rdma_listen on {addr}: {}", last_error())));
        }
        // SAFETY: a live, listening id.
        let port = u16::from_be(unsafe { sys::rdma_get_src_port(id) });
        let bound = SocketAddr::new(addr.ip(), port);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("kvtier-rdma-cm".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || state.run(&stop)
            })
            .map_err(|e| unavailable(format!("starting the rdmacm thread: {e}")))?;
        tracing::info!(addr = %bound, "RDMA: serving grants");
        Ok(Self {
            addr: bound,
            stop,
            thread: Some(thread),
        })
    }

    /// The address pullers connect to (the port filled in when 0 was asked).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("RDMA: the rdmacm thread panicked");
            }
        }
    }
}

/// What the listener thread owns.
struct State {
    device: Arc<Device>,
    token: [u8; TOKEN_LEN],
    listen: *mut sys::rdma_cm_id,
    /// Ids of accepted connections, each with a QP, oldest first.
    accepted: Vec<*mut sys::rdma_cm_id>,
    /// Last, after every id on it (see Drop).
    channel: Channel,
}

// SAFETY: the ids and their QPs are created and used only by the thread that owns `State`
// (moved to it whole); librdmacm has no thread affinity.
unsafe impl Send for State {}

impl State {
    fn run(mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            match self.channel.next_event(STOP_POLL) {
                Ok(None) => {}
                Ok(Some(e)) => {
                    if !self.handle(e) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "RDMA: reading rdmacm events; no longer serving");
                    break;
                }
            }
        }
    }

    /// Acts on one event; `false` when the listener must stop.
    fn handle(&mut self, e: CmEvent) -> bool {
        match e.kind {
            ev::RDMA_CM_EVENT_CONNECT_REQUEST => self.on_request(&e),
            ev::RDMA_CM_EVENT_ESTABLISHED => tracing::debug!("RDMA: a puller connected"),
            ev::RDMA_CM_EVENT_DISCONNECTED
            | ev::RDMA_CM_EVENT_CONNECT_ERROR
            | ev::RDMA_CM_EVENT_UNREACHABLE
            | ev::RDMA_CM_EVENT_REJECTED => {
                if e.kind != ev::RDMA_CM_EVENT_DISCONNECTED {
                    tracing::debug!(event = %e.name(), status = %status_text(e.status), "RDMA: a puller's connection failed");
                }
                if let Some(at) = self.accepted.iter().position(|&id| id == e.id) {
                    self.accepted.remove(at);
                    // SAFETY: an accepted id this thread created a QP on, just taken out of the
                    // list; its event was acknowledged, and it is not used again.
                    unsafe { destroy_accepted(e.id) };
                }
            }
            ev::RDMA_CM_EVENT_DEVICE_REMOVAL => {
                tracing::error!(device = %self.device.name(), "RDMA: the device was removed; no longer serving");
                return false;
            }
            _ => {}
        }
        true
    }

    fn on_request(&mut self, e: &CmEvent) {
        let child = e.id;
        let reject = |why: &str| {
            tracing::warn!(reason = why, "RDMA: rejected a puller's connection");
            // SAFETY: a new id from a connect request, not yet accepted; destroyed right after
            // (its event is already acknowledged).
            unsafe {
                sys::rdma_reject(child, ptr::null(), 0);
                sys::rdma_destroy_id(child);
            }
        };
        let Some(conn) = &e.conn else {
            return reject("no connection parameters");
        };
        if !hello_matches(&conn.private_data, &self.token) {
            return reject("no or wrong connection token (not a kvtier puller, or a stale grant)");
        }
        if self.accepted.len() >= MAX_ACCEPTED {
            let oldest = self.accepted.remove(0);
            tracing::info!("RDMA: {MAX_ACCEPTED} pullers connected; closing the oldest connection");
            // SAFETY: an accepted id, just taken out of the list, with no pending event.
            unsafe { destroy_accepted(oldest) };
        }
        // SAFETY: the request's id is bound to the device it arrived on.
        if unsafe { (*child).verbs } != self.device.ctx() {
            return reject("arrived on another RDMA device than the arena's");
        }
        // SAFETY: plain C data; all zeros is valid.
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        // Completion queues are left to rdmacm: nothing is ever posted here.
        init.cap.max_send_wr = 1;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        init.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        // SAFETY: a live id on the context of the device's PD (checked above) and a valid
        // attribute struct.
        if unsafe { sys::rdma_create_qp(child, self.device.pd(), &mut init) } != 0 {
            return reject(&format!("rdma_create_qp: {}", last_error()));
        }
        let max_rd = u8::try_from(self.device.limits().max_rd_atom).unwrap_or(u8::MAX);
        // SAFETY: plain C data; all zeros is valid.
        let mut param: sys::rdma_conn_param = unsafe { std::mem::zeroed() };
        // As many READs at once as the puller asked for, as far as the device serves them.
        param.responder_resources = conn.responder_resources.min(max_rd);
        param.initiator_depth = 0;
        param.rnr_retry_count = 7;
        // SAFETY: a live id with a QP and a valid parameter struct.
        if unsafe { sys::rdma_accept(child, &mut param) } != 0 {
            let err = last_error();
            // SAFETY: the QP was created on this id above; the id is destroyed by `reject`.
            unsafe { sys::rdma_destroy_qp(child) };
            return reject(&format!("rdma_accept: {err}"));
        }
        self.accepted.push(child);
    }
}

/// Tears down an accepted connection.
///
/// # Safety
/// `id` must be a live id this listener accepted (with a QP created by `rdma_create_qp`), with
/// no unacknowledged event, and not used afterwards.
unsafe fn destroy_accepted(id: *mut sys::rdma_cm_id) {
    // SAFETY: the caller's contract; the QP (and the CQs rdmacm made for it) go before the id.
    unsafe {
        sys::rdma_disconnect(id);
        sys::rdma_destroy_qp(id);
        sys::rdma_destroy_id(id);
    }
}

impl Drop for State {
    fn drop(&mut self) {
        for id in self.accepted.drain(..) {
            // SAFETY: each entry is a live accepted id (taken out of the list when destroyed),
            // and every event was acknowledged as it was read.
            unsafe { destroy_accepted(id) };
        }
        // SAFETY: created in `start`, destroyed once, before the channel (a field, dropped
        // after this body).
        unsafe { sys::rdma_destroy_id(self.listen) };
    }
}

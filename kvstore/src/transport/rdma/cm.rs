//! rdmacm plumbing shared by both sides: event channels that never block past a deadline,
//! events copied out and acknowledged at once, socket addresses in C form.

use std::ffi::CStr;
use std::io;
use std::net::SocketAddr;
use std::os::raw::c_int;
use std::ptr;
use std::time::{Duration, Instant};

use rdma_sys as sys;
use sys::rdma_cm_event_type as ev;

/// The calling thread's `errno` as an error.
pub(crate) fn last_error() -> io::Error {
    io::Error::last_os_error()
}

/// An rdmacm event channel, non-blocking, destroyed on drop (after every id on it: the owner
/// destroys its ids first).
#[derive(Debug)]
pub(crate) struct Channel(*mut sys::rdma_event_channel);

// SAFETY: an event channel is a file descriptor wrapped by librdmacm; the library has no
// thread affinity, and each `Channel` is used by one thread at a time (its owner).
unsafe impl Send for Channel {}

impl Channel {
    /// A new channel whose reads return at once when no event is queued.
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: no arguments; returns an owned channel or NULL with errno set.
        let raw = unsafe { sys::rdma_create_event_channel() };
        if raw.is_null() {
            return Err(last_error());
        }
        let channel = Self(raw);
        // SAFETY: `raw` is a live channel (just created) whose `fd` field the library set.
        let fd = unsafe { (*raw).fd };
        // SAFETY: fcntl on a descriptor this channel owns, with integer arguments only.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(last_error());
        }
        Ok(channel)
    }

    /// A new TCP-port-space id on this channel; the caller owns it and destroys it (with
    /// `rdma_destroy_id`) before the channel.
    pub(crate) fn create_id(&self) -> io::Result<*mut sys::rdma_cm_id> {
        let mut id: *mut sys::rdma_cm_id = std::ptr::null_mut();
        // SAFETY: a live channel (owned by `self`) and a valid out-pointer.
        let rc = unsafe {
            sys::rdma_create_id(
                self.0,
                &mut id,
                std::ptr::null_mut(),
                sys::rdma_port_space::RDMA_PS_TCP,
            )
        };
        if rc != 0 {
            return Err(last_error());
        }
        Ok(id)
    }

    fn fd(&self) -> c_int {
        // SAFETY: the channel lives as long as `self`.
        unsafe { (*self.0).fd }
    }

    /// The next event, waiting at most `wait` for one; `None` when none came.
    pub(crate) fn next_event(&self, wait: Duration) -> io::Result<Option<CmEvent>> {
        let until = Instant::now() + wait;
        loop {
            let mut raw: *mut sys::rdma_cm_event = ptr::null_mut();
            // SAFETY: a live channel and a valid out-pointer; on success the event is ours until
            // acknowledged, which `CmEvent::take` does before returning.
            if unsafe { sys::rdma_get_cm_event(self.0, &mut raw) } == 0 {
                // SAFETY: `raw` is the event just returned, not yet acknowledged.
                return Ok(Some(unsafe { CmEvent::take(raw) }));
            }
            let err = last_error();
            match err.kind() {
                io::ErrorKind::WouldBlock => {}
                io::ErrorKind::Interrupted => continue,
                _ => return Err(err),
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd {
                fd: self.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // Rounded up so that a wait of a few microseconds still sleeps instead of spinning.
            let ms = c_int::try_from(left.as_millis().max(1)).unwrap_or(c_int::MAX);
            // SAFETY: one valid pollfd, count 1.
            if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
                let err = last_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // SAFETY: the channel was created by `new`, is destroyed once, and its owner destroyed
        // every id on it before dropping it.
        unsafe { sys::rdma_destroy_event_channel(self.0) };
    }
}

/// What an event said, copied out so that it could be acknowledged at once (an id cannot be
/// destroyed while an event of it is unacknowledged).
#[derive(Debug)]
pub(crate) struct CmEvent {
    /// `rdma_cm_event_type`.
    pub(crate) kind: u32,
    /// 0, or a negative errno (or a transport's reject reason for `REJECTED`).
    pub(crate) status: c_int,
    /// The id the event is about (a new one for `CONNECT_REQUEST`).
    pub(crate) id: *mut sys::rdma_cm_id,
    /// For connection events: the peer's requested depths and its private data.
    pub(crate) conn: Option<ConnEvent>,
}

/// The connection parameters of a connection event, from this side's point of view.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnEvent {
    /// READs the peer wants to have outstanding against this side.
    pub(crate) responder_resources: u8,
    /// The peer's private data (zero-padded by some transports).
    pub(crate) private_data: Vec<u8>,
}

impl CmEvent {
    /// Copies `raw` out and acknowledges it.
    ///
    /// # Safety
    /// `raw` must be an event returned by `rdma_get_cm_event` and not yet acknowledged.
    unsafe fn take(raw: *mut sys::rdma_cm_event) -> Self {
        // SAFETY: the caller passes a live, unacknowledged event.
        let e = unsafe { &*raw };
        let conn = matches!(
            e.event,
            ev::RDMA_CM_EVENT_CONNECT_REQUEST | ev::RDMA_CM_EVENT_ESTABLISHED | ev::RDMA_CM_EVENT_REJECTED
        )
        .then(|| {
            // SAFETY: connection events on RDMA_PS_TCP ids (the only kind this transport
            // creates) carry `param.conn`; the union is plain data either way.
            let c = unsafe { &e.param.conn };
            let private_data = if c.private_data.is_null() || c.private_data_len == 0 {
                Vec::new()
            } else {
                // SAFETY: librdmacm points `private_data` at `private_data_len` bytes inside the
                // event, valid until it is acknowledged (below).
                unsafe {
                    std::slice::from_raw_parts(c.private_data.cast::<u8>(), usize::from(c.private_data_len))
                }
                .to_vec()
            };
            ConnEvent {
                responder_resources: c.responder_resources,
                private_data,
            }
        });
        let out = Self {
            kind: e.event,
            status: e.status,
            id: e.id,
            conn,
        };
        // SAFETY: acknowledged once; nothing borrowed from it outlives this call (`e` is not
        // used after this line).
        unsafe { sys::rdma_ack_cm_event(raw) };
        out
    }

    /// The event's name, for messages.
    pub(crate) fn name(&self) -> String {
        event_name(self.kind)
    }
}

/// librdmacm's name of an event type.
pub(crate) fn event_name(kind: u32) -> String {
    // SAFETY: rdma_event_str takes any value and returns a static string (or NULL).
    let p = unsafe { sys::rdma_event_str(kind) };
    if p.is_null() {
        return format!("event {kind}");
    }
    // SAFETY: a NUL-terminated static string owned by the library.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// An event's status as text: a negative errno, else the raw number.
pub(crate) fn status_text(status: c_int) -> String {
    if status < 0 {
        io::Error::from_raw_os_error(-status).to_string()
    } else {
        format!("status {status}")
    }
}

/// `addr` as a C socket address.
pub(crate) fn sockaddr(addr: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain data; all zeros is a valid (unspecified) address.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for every sockaddr type.
            unsafe { ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo().to_be(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above.
            unsafe { ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
        }
    }
    storage
}

/// Milliseconds left until `until`, as rdmacm's resolve calls take them (at least 1).
pub(crate) fn ms_until(until: Instant) -> c_int {
    let left = until.saturating_duration_since(Instant::now()).as_millis().max(1);
    c_int::try_from(left).unwrap_or(c_int::MAX)
}

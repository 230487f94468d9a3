//! The puller's side of a transfer, as the progress thread drives it.

use std::collections::VecDeque;
use std::time::Instant;

use ucx_sys as sys;

use super::{
    BlockArrival, BlockData, Engine, OpSpec, Outcome, PullJob, PullSpec, PullState, Receives, Req, Settled,
    TURN_BYTES, monotonic_ns, refuse,
};
use crate::transport::TransportError;
use crate::transport::ucx::wire::{AM_REQUEST, Request, STATUS_OK, answer_status, hex_prefix};
use crate::transport::ucx::{UcxMode, status_text};

impl Engine {
    pub(in crate::transport::ucx) fn start_pull(&mut self, spec: PullSpec) {
        let label = spec.remote.label();
        if self.stopping {
            let e = TransportError::Io {
                peer: label,
                reason: "the UCX transport is shutting down".into(),
            };
            return refuse(&spec.ops, &spec.reply, &e);
        }
        let fail = |ops: &[OpSpec], reply: Settled, e: TransportError| refuse(ops, &reply, &e);
        let peer = match self.connect(&spec.remote.address, &label) {
            Ok(p) => p,
            Err(status) => {
                let e = TransportError::Io {
                    peer: label,
                    reason: format!("creating a UCX endpoint: {}", status_text(status)),
                };
                return fail(&spec.ops, spec.reply, e);
            }
        };
        let state = match spec.mode {
            UcxMode::Get | UcxMode::Auto => match self.rkey(peer, &spec.remote.rkey) {
                Ok(rkey) => PullState::Get {
                    rkey,
                    remote_base: spec.remote.arena_base,
                    next: 0,
                    inflight: Vec::new(),
                    inflight_bytes: 0,
                },
                Err(status) => {
                    self.release_peer(peer);
                    let e = TransportError::BadEndpoint {
                        endpoint: hex_prefix(&spec.remote.rkey),
                        reason: format!("the peer's remote key: {}", status_text(status)),
                    };
                    return fail(&spec.ops, spec.reply, e);
                }
            },
            UcxMode::PutOnRequest | UcxMode::SendOnRequest => {
                let sending = spec.mode == UcxMode::SendOnRequest;
                let request_id = self.next_request;
                self.next_request = super::random_request_id();
                let now_ns = monotonic_ns();
                let left = spec.deadline.saturating_duration_since(Instant::now()).as_nanos() as u64;
                let message = Request {
                    id: request_id,
                    grant: spec.grant,
                    boot_id: self.boot_id,
                    deadline_ns: now_ns.saturating_add(left),
                    budget_ns: left,
                    arena_base: self.arena_base as u64,
                    arena_len: self.arena_len,
                    address: self.address.clone(),
                    rkey: self.rkey.clone(),
                    entries: spec
                        .ops
                        .iter()
                        .map(|o| (o.index, o.len, o.local_offset))
                        .collect(),
                    send: sending,
                    eager: sending && spec.eager,
                }
                .encode();
                let Some(p) = self.peers.get(&peer) else {
                    return fail(
                        &spec.ops,
                        spec.reply,
                        TransportError::Io {
                            peer: label,
                            reason: "endpoint vanished".into(),
                        },
                    );
                };
                let param = sys::ucp_request_param_t {
                    op_attr_mask: sys::UCP_OP_ATTR_FIELD_FLAGS,
                    flags: sys::UCP_AM_SEND_FLAG_EAGER,
                    ..Default::default()
                };
                // SAFETY: live endpoint; `message` is kept in the job, unmoved (a Vec's heap
                // buffer does not move with the Vec), until the send completes or is
                // abandoned with the buffer leaked.
                let send = Req::from_ptr(unsafe {
                    sys::ucp_am_send_nbx(
                        p.ep,
                        AM_REQUEST,
                        std::ptr::null(),
                        0,
                        message.as_ptr().cast(),
                        message.len(),
                        &param,
                    )
                });
                PullState::Put {
                    request_id,
                    message,
                    send: Some(send),
                    answer: None,
                    receives: sending.then(|| Receives {
                        inflight: Vec::new(),
                        queued: VecDeque::new(),
                        arrived: vec![false; spec.ops.len()],
                        eager: spec.eager,
                    }),
                }
            }
        };
        #[cfg(test)]
        if spec.sleeps {
            self.sleeping_pulls += 1;
        }
        self.pulls.push(PullJob {
            peer,
            label,
            deadline: spec.deadline,
            sleeps: spec.sleeps,
            // Gets are checksummed by the thread that copied them, as the lanes that split a
            // pull copy in parallel; a source's writes and sends are checksummed by the
            // pulling thread while this one moves the next (neither without verification).
            outcome: Outcome::new(
                spec.reply,
                &spec.ops,
                (spec.mode == UcxMode::Get && self.cfg.verify).then_some(self.arena_base.cast_const()),
            ),
            ops: spec.ops,
            state,
        });
    }

    pub(super) fn advance_pulls(&mut self) -> bool {
        let mut busy = false;
        let mut i = 0;
        while i < self.pulls.len() {
            let (progressed, finished) = self.advance_pull(i);
            busy |= progressed || finished;
            // A finished job's outcome flushes as it drops.
            self.pulls[i].outcome.flush();
            if finished {
                let mut job = self.pulls.swap_remove(i);
                self.release_peer(job.peer);
                // Queued blocks keep a pull open until the deadline gives them back, so none is
                // left here today; one that were would stay UCX's until the worker is destroyed.
                if let PullState::Put {
                    receives: Some(rx), ..
                } = &mut job.state
                {
                    for (_, data) in std::mem::take(&mut rx.queued) {
                        self.release_block(data);
                    }
                }
                job.outcome.settle_rest(&TransportError::TimedOut {
                    peer: job.label.clone(),
                });
            } else {
                i += 1;
            }
        }
        busy
    }

    /// Sends what every pull settled since its last batch (the progress loop does this at
    /// each turn).
    #[cfg(test)]
    pub(in crate::transport::ucx) fn flush_settled(&mut self) {
        for p in &mut self.pulls {
            p.outcome.flush();
        }
    }

    /// (made progress, finished).
    fn advance_pull(&mut self, i: usize) -> (bool, bool) {
        let now = Instant::now();
        let (drain, verify) = (self.cfg.drain, self.cfg.verify);
        let window = self.cfg.window.max(1);
        let (into, progress_idle) = (self.landing(), self.progress_idle);
        let job = &mut self.pulls[i];
        let expired = now >= job.deadline;
        // `peer_dead`: UCX reported the endpoint failed. `peer_failed` also counts an endpoint
        // closed by this side (another pull's last resort), which stops gets but says nothing
        // about a source's writes, which travel on its own endpoint.
        let (peer_dead, peer_failed, peer_errors, ep) = match self.peers.get(&job.peer) {
            Some(p) => (
                p.failed,
                p.failed.or(p.closed.then_some(sys::UCS_ERR_CANCELED)),
                p.peer_errors,
                p.ep,
            ),
            None => (
                Some(sys::UCS_ERR_NOT_CONNECTED),
                Some(sys::UCS_ERR_NOT_CONNECTED),
                false,
                std::ptr::null_mut(),
            ),
        };
        let label = job.label.clone();
        let io = |status: sys::ucs_status_t| TransportError::Io {
            peer: label.clone(),
            reason: status_text(status),
        };
        let late = Late {
            now,
            deadline: job.deadline,
            drain,
            peer_errors,
            peer_failed,
        };
        let mut progressed = false;
        let mut force_close = false;
        let finished = match &mut job.state {
            PullState::Get {
                rkey,
                remote_base,
                next,
                inflight,
                inflight_bytes,
            } => {
                let ops = &job.ops;
                let late_from = (!verify).then_some(job.deadline);
                progressed |= settle_completed(inflight, &mut job.outcome, expired, late_from, &label, |n| {
                    *inflight_bytes -= ops[n].len;
                });
                let mut issued = 0;
                while !expired
                    && peer_failed.is_none()
                    && *next < job.ops.len()
                    && *inflight_bytes < window
                    && issued < TURN_BYTES
                {
                    let op = job.ops[*next];
                    issued += op.len.max(1);
                    let param = sys::ucp_request_param_t {
                        op_attr_mask: sys::UCP_OP_ATTR_FIELD_MEMH,
                        memh: into.memh,
                        ..Default::default()
                    };
                    // SAFETY: live endpoint and rkey (the job holds a claim on the peer); the
                    // destination is the item's reserved slot, inside the registered arena
                    // (a reservation lies within it), which the caller's future keeps reserved
                    // until this job settles the item, and it settles the item once the
                    // request has completed (or, past the drain period, gives up on it: see the
                    // module documentation).
                    let req = Req::from_ptr(unsafe {
                        sys::ucp_get_nbx(
                            ep,
                            into.arena_base.add(op.local_offset as usize).cast(),
                            op.len as usize,
                            *remote_base + op.remote_offset,
                            *rkey,
                            &param,
                        )
                    });
                    *next += 1;
                    *inflight_bytes += op.len;
                    inflight.push((*next - 1, req));
                    progressed = true;
                }
                if inflight.is_empty() {
                    let stopped_early = *next < job.ops.len();
                    if stopped_early {
                        let e = match peer_failed {
                            Some(s) if !expired => io(s),
                            _ => TransportError::TimedOut { peer: label.clone() },
                        };
                        job.outcome.settle_rest(&e);
                    }
                    true
                } else {
                    late.wait_or_give_up(inflight, &mut force_close, &label, "gets")
                }
            }
            PullState::Put {
                message,
                send,
                answer,
                receives,
                ..
            } => {
                if let Some(rx) = receives.as_mut() {
                    progressed |=
                        // The source holds its grant's pins until it has answered.
                        settle_completed(&mut rx.inflight, &mut job.outcome, expired, None, &label, |_| {});
                    progressed |= rx.start_queued(into, &job.ops, expired);
                }
                let mut send_failed = None;
                if let Some(req) = send {
                    if let Some(status) = req.poll() {
                        *send = None;
                        progressed = true;
                        if status != sys::UCS_OK {
                            send_failed = Some(status);
                        }
                    }
                }
                let receiving = receives
                    .as_ref()
                    .is_some_and(|rx| !(rx.inflight.is_empty() && rx.queued.is_empty()));
                if receiving {
                    // A slot is being written: nothing is settled until that is over. Past the
                    // deadline no more blocks are received, and these are waited for as gets are.
                    let inflight = receives.as_mut().map(|rx| &mut rx.inflight);
                    let gave_up = inflight
                        .is_some_and(|r| late.wait_or_give_up(r, &mut force_close, &label, "receives"));
                    if gave_up {
                        if let Some(req) = send.take() {
                            // UCX may still read the request message.
                            req.abandon();
                            std::mem::forget(std::mem::take(message));
                        }
                    }
                    gave_up
                } else if !expired
                    && (peer_dead.is_none() || !progress_idle)
                    && answer
                        .as_ref()
                        .zip(receives.as_ref())
                        .is_some_and(|((sent, statuses), rx)| *sent && rx.still_coming(statuses))
                {
                    // An eager send completes at the source once UCX has copied the block out,
                    // and UCX does not promise that whole messages arrive in the order they
                    // were sent (one that came in fragments is handed over once reassembled),
                    // so the answer may overtake a block: it is waited for until the
                    // deadline, or until a dead source's last bytes have been processed.
                    false
                // The answer may be seen before the send's own completion; the message buffer
                // is UCX's until then.
                } else if let (Some((sent, statuses)), None) = (answer.as_ref(), &send) {
                    if statuses.len() == job.ops.len() {
                        for (n, (&s, op)) in statuses.iter().zip(&job.ops).enumerate() {
                            let result = answer_status(s, op.index, &label);
                            // A source that predates sends wrote the blocks (its answer is not
                            // marked as sent), as in put mode.
                            match receives.as_ref().filter(|_| *sent).map(|rx| rx.arrived[n]) {
                                // Put: the answer says it all.
                                None => job.outcome.settle(n, result),
                                // Send: settled when its receive ended (or, given back
                                // unreceived at the deadline, as late when the pull ends).
                                Some(true) => {}
                                // Refused past the deadline, or never sent.
                                Some(false) => job.outcome.settle(
                                    n,
                                    result.and_then(|()| {
                                        Err(if expired {
                                            TransportError::TimedOut { peer: label.clone() }
                                        } else {
                                            TransportError::Protocol {
                                                peer: label.clone(),
                                                reason: format!(
                                                    "block {} was reported sent but never came",
                                                    op.index
                                                ),
                                            }
                                        })
                                    }),
                                ),
                            }
                        }
                    } else {
                        let e = TransportError::Protocol {
                            peer: label.clone(),
                            reason: format!("{} statuses for {} blocks", statuses.len(), job.ops.len()),
                        };
                        job.outcome.settle_rest(&e);
                    }
                    true
                } else if let Some(status) = send_failed {
                    job.outcome.settle_rest(&io(status));
                    true
                } else if let (Some(status), true) = (peer_dead, progress_idle) {
                    // The source is gone: whatever it wrote before has been processed by the
                    // progress burst that just went idle.
                    if send.is_some() {
                        // Still not completed after the failure: UCX has discarded it or will;
                        // its buffer stays with UCX.
                        if let Some(req) = send.take() {
                            req.abandon();
                        }
                        std::mem::forget(std::mem::take(message));
                    }
                    let e = if expired {
                        TransportError::TimedOut { peer: label.clone() }
                    } else {
                        io(status)
                    };
                    job.outcome.settle_rest(&e);
                    true
                } else if now >= job.deadline + drain {
                    tracing::error!(
                        peer = %label,
                        request_sent = send.is_none(),
                        "UCX source did not confirm the end of its writes {drain:?} past the deadline; \
                         the slots are returned anyway"
                    );
                    if let Some(req) = send.take() {
                        // Not even the request got out: the endpoint is wedged, and the next
                        // pull is better off with a new one. Where the endpoint cannot be
                        // force-closed (shared memory, error mode NONE) its close waits for the
                        // stuck send, and is left to UCX: what matters is that it is forgotten.
                        // (An answered-late source keeps its endpoint: closing it would break
                        // the peer's side of the pair too.)
                        req.abandon();
                        std::mem::forget(std::mem::take(message));
                        force_close = true;
                    }
                    job.outcome
                        .settle_rest(&TransportError::TimedOut { peer: label.clone() });
                    true
                } else {
                    false
                }
            }
        };
        if force_close {
            let peer = job.peer;
            self.close_peer(peer);
            progressed = true;
        }
        (progressed, finished)
    }
}

/// What a pull knows, at one turn, of its deadline and its endpoint.
struct Late {
    now: Instant,
    deadline: Instant,
    drain: std::time::Duration,
    /// The endpoint reports peer failures (and can be force-closed).
    peer_errors: bool,
    /// Why the endpoint no longer works, if it does not.
    peer_failed: Option<sys::ucs_status_t>,
}

impl Late {
    /// What becomes of operations (`what`: gets or receives) still writing into slots. Past
    /// the deadline nothing more is started, and what is in flight (a window at most) usually
    /// lands within the drain period; waiting for it keeps the endpoint, and the peer's side of
    /// it, intact. After that the endpoint is force-closed where its error mode allows (sets
    /// `force_close`; the requests then complete with an error on the next progress calls),
    /// and what is still outstanding a drain period later (or at once, without that mode) is
    /// given up on: its slots are returned anyway. Whether it was given up on.
    fn wait_or_give_up(
        &self,
        inflight: &mut Vec<(usize, Req)>,
        force_close: &mut bool,
        label: &str,
        what: &str,
    ) -> bool {
        let drain = self.drain;
        if self.now < self.deadline + drain {
            false
        } else if self.peer_errors && self.peer_failed.is_none() {
            *force_close = true;
            false
        } else if self.peer_errors && self.now < self.deadline + 2 * drain {
            false
        } else {
            tracing::error!(
                peer = %label,
                outstanding = inflight.len(),
                "UCX {what} still outstanding {drain:?} past the deadline (on an endpoint that cannot \
                 be force-closed, or after closing it); their slots are returned anyway"
            );
            for (_, req) in inflight.drain(..) {
                req.abandon();
            }
            true
        }
    }
}

/// Settles the ops whose operation (a get, or a receive of a sent block) has completed, calls
/// `landed` with each, and drops them from `inflight`; whether any had. `late_from`: where
/// pulled blocks are not checked, a get that completes at or past this instant (the pull's
/// deadline, which the agent keeps within the grant's life) fails as late, as it may have read
/// memory the source reused after the grant; a checked one is caught by its checksum instead.
fn settle_completed(
    inflight: &mut Vec<(usize, Req)>,
    outcome: &mut Outcome,
    expired: bool,
    late_from: Option<Instant>,
    label: &str,
    mut landed: impl FnMut(usize),
) -> bool {
    let mut any = false;
    inflight.retain_mut(|(n, req)| match req.poll() {
        None => true,
        Some(status) => {
            any = true;
            landed(*n);
            let peer = label.to_owned();
            let late = late_from.is_some_and(|t| Instant::now() >= t);
            outcome.settle(
                *n,
                match status {
                    sys::UCS_OK if late => Err(TransportError::TimedOut { peer }),
                    sys::UCS_OK => Ok(()),
                    // Discarded by the close at the deadline.
                    _ if expired => Err(TransportError::TimedOut { peer }),
                    _ => Err(TransportError::Io {
                        peer,
                        reason: status_text(status),
                    }),
                },
            );
            false
        }
    });
    any
}

impl Engine {
    /// A block a source sent for a send-on-request pull: received into its slot (a large one
    /// queued for a later turn, one that came whole copied at once), or refused (late,
    /// unknown, twice, or of the wrong length).
    pub(in crate::transport::ucx) fn receive_block(&mut self, block: BlockArrival) {
        #[cfg(test)]
        {
            self.eager_arrivals += usize::from(matches!(block.data, BlockData::Eager(_)));
        }
        let now = Instant::now();
        let into = self.landing();
        let n = block.entry as usize;
        let job = self.pulls.iter_mut().find(|p| match &p.state {
            PullState::Put {
                request_id,
                receives: Some(_),
                ..
            } => *request_id == block.request,
            _ => false,
        });
        let Some(job) = job.filter(|j| now < j.deadline && n < j.ops.len()) else {
            return self.release_block(block.data);
        };
        let PullState::Put {
            receives: Some(rx), ..
        } = &mut job.state
        else {
            return self.release_block(block.data);
        };
        if std::mem::replace(&mut rx.arrived[n], true) {
            return self.release_block(block.data);
        }
        let op = job.ops[n];
        let len = match &block.data {
            BlockData::Rndv(_, len) => *len as u64,
            BlockData::Eager(bytes) => bytes.len() as u64,
        };
        if len != op.len {
            job.outcome.settle(
                n,
                Err(TransportError::Protocol {
                    peer: job.label.clone(),
                    reason: format!("block {} came with {len} bytes, not {}", op.index, op.len),
                }),
            );
            return self.release_block(block.data);
        }
        match block.data {
            // A large block is received by the job, a turn's bytes at a time, so that each is
            // checksummed while still in cache (the pacing stays where blocks are not checked,
            // unmeasured without the checks); a small one at once, as turns cost more than
            // that saves (64 KiB blocks ran at half the speed a turn's bytes at a time).
            data @ BlockData::Rndv(_, len) if len as u64 >= TURN_BYTES => rx.queued.push_back((n, data)),
            BlockData::Rndv(desc, len) => rx.start_receive(into, &job.ops, n, desc, len),
            BlockData::Eager(bytes) => {
                // SAFETY: the destination is the op's reserved slot, `op.len` bytes (which
                // `bytes` is) inside the registered arena, which the caller's future keeps
                // reserved until the job settles the op, as it does just below.
                unsafe {
                    let slot = into.arena_base.add(op.local_offset as usize);
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), slot, bytes.len());
                }
                job.outcome.settle(n, Ok(()));
            }
        }
    }

    /// Where this engine's pulls land their blocks.
    fn landing(&self) -> Landing {
        Landing {
            worker: self.worker,
            memh: self.memh,
            arena_base: self.arena_base,
        }
    }

    /// Gives a block message back to UCX unreceived (its sender's send then ends).
    pub(super) fn release_block(&mut self, data: BlockData) {
        #[cfg(test)]
        {
            self.refused_blocks += 1;
        }
        release(self.worker, data);
    }
}

/// [`Engine::release_block`], for callers that hold a part of the engine.
fn release(worker: sys::ucp_worker_h, data: BlockData) {
    if let BlockData::Rndv(desc, _) = data {
        // SAFETY: a descriptor UCX handed to `on_block` on this live worker and that was
        // neither received nor released.
        unsafe { sys::ucp_am_data_release(worker, desc) };
    }
}

impl Receives {
    /// Whether a block sent eagerly that the answer's `statuses` report as sent has not come
    /// yet (a rendezvous send completes only once the block was received or refused).
    fn still_coming(&self, statuses: &[u8]) -> bool {
        self.eager
            && statuses.len() == self.arrived.len()
            && statuses
                .iter()
                .zip(&self.arrived)
                .any(|(&status, &arrived)| status == STATUS_OK && !arrived)
    }

    /// Starts receiving the queued blocks, [`TURN_BYTES`] at most (at least one block), or
    /// past the deadline gives them all back unreceived; whether it did either.
    fn start_queued(&mut self, into: Landing, ops: &[OpSpec], expired: bool) -> bool {
        if self.queued.is_empty() {
            return false;
        }
        if expired {
            // Their ops settle as not received in time when the pull ends.
            for (_, data) in self.queued.drain(..) {
                release(into.worker, data);
            }
            return true;
        }
        let mut started = 0;
        while started < TURN_BYTES {
            let Some((n, data)) = self.queued.pop_front() else {
                break;
            };
            let BlockData::Rndv(desc, len) = data else {
                // Eager blocks are copied as they come and never queued.
                continue;
            };
            started += (len as u64).max(1);
            self.start_receive(into, ops, n, desc, len);
        }
        true
    }

    /// Starts receiving op `n`'s block, of `len` bytes (checked against the op when it came),
    /// from the rendezvous descriptor `desc`, which UCX handed to `on_block` on `worker` and
    /// which is received once (it came once per op, and leaves the queue or was never queued).
    fn start_receive(
        &mut self,
        into: Landing,
        ops: &[OpSpec],
        n: usize,
        desc: *mut std::ffi::c_void,
        len: usize,
    ) {
        let param = sys::ucp_request_param_t {
            op_attr_mask: sys::UCP_OP_ATTR_FIELD_MEMH,
            memh: into.memh,
            ..Default::default()
        };
        // SAFETY: `desc` as above, kept by `on_block` (UCS_INPROGRESS). The destination is op
        // `n`'s reserved slot, `len` bytes inside the registered arena, which the caller's
        // future keeps reserved until the job settles the op, and the job settles it only once
        // the receive is over (or, past the drain period, gives up on it: see the module
        // documentation).
        let req = Req::from_ptr(unsafe {
            let slot = into.arena_base.add(ops[n].local_offset as usize);
            sys::ucp_am_recv_data_nbx(into.worker, desc, slot.cast(), len, &param)
        });
        self.inflight.push((n, req));
    }
}

/// Where a pull's received blocks land: the worker that receives them and the registered
/// arena their slots lie in.
#[derive(Clone, Copy)]
struct Landing {
    worker: sys::ucp_worker_h,
    memh: sys::ucp_mem_h,
    arena_base: *mut u8,
}

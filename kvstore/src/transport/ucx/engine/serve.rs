//! The source's side of a put- or send-on-request transfer, as the progress thread drives it.

use std::time::Instant;

use ucx_sys as sys;

use super::{Engine, PutOp, Req, ServeJob, ServePhase, monotonic_ns};
use crate::transport::ucx::wire::{
    AM_ANSWER, AM_BLOCK, BLOCK_HEADER, Request, STATUS_FAILED, STATUS_MALFORMED, STATUS_NO_BLOCK, STATUS_OK,
    STATUS_TIMED_OUT, STATUS_UNKNOWN_GRANT, encode_answer, encode_block_header,
};
use crate::transport::ucx::{EAGER_BLOCKS_UP_TO, WRITE_RUN_UP_TO, status_text, write_runs};

/// The longest a request for a grant this source does not know may stay open (it is answered
/// at once in practice; the bound only keeps a puller's deadline from holding it).
const UNGRANTED_ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

impl Engine {
    /// A put- or send-on-request message from a puller.
    pub(super) fn start_serve(&mut self, message: &[u8]) {
        let Some(req) = Request::parse(message) else {
            tracing::warn!(bytes = message.len(), "malformed UCX transfer request ignored");
            return;
        };
        let entry = self.grants.as_ref().and_then(|g| g.get(&req.grant));
        let now = Instant::now();
        // A stopping transport answers at once, writing nothing. A grant unknown here pins
        // nothing, and is answered as such at once.
        let deadline = if self.stopping {
            now
        } else {
            let not_after = entry
                .as_ref()
                .map_or(now + UNGRANTED_ANSWER_WITHIN, |e| e.expires());
            req.local_deadline(&self.boot_id, now, monotonic_ns(), not_after)
        };
        #[cfg(test)]
        let deadline = if self.cfg.ignore_deadline {
            Instant::now() + std::time::Duration::from_secs(60)
        } else {
            deadline
        };
        let label = format!("ucx-puller:{:?}", req.grant);
        let peer = match self.connect(&req.address, &label) {
            Ok(p) => p,
            Err(status) => {
                // The puller's pull times out ("did not confirm the end of its writes"): say why
                // here, where it is known.
                tracing::warn!(
                    puller = %label,
                    status = %status_text(status),
                    "no UCX endpoint back to a puller; its request is dropped"
                );
                return;
            }
        };
        #[cfg(test)]
        let req = Request {
            send: req.send && !self.cfg.ignore_send_flag,
            eager: req.eager && !self.cfg.ignore_send_flag && !self.cfg.ignore_eager_flag,
            ..req
        };
        #[cfg(test)]
        {
            self.served_sends += usize::from(req.send);
        }
        let mut statuses = vec![STATUS_TIMED_OUT; req.entries.len()];
        let mut puts = Vec::new();
        for (n, &(index, len, offset)) in req.entries.iter().enumerate() {
            let Some(e) = &entry else {
                statuses[n] = STATUS_UNKNOWN_GRANT;
                continue;
            };
            let Some(block) = e.block(index) else {
                statuses[n] = STATUS_NO_BLOCK;
                continue;
            };
            let inside = offset.checked_add(len).is_some_and(|end| end <= req.arena_len);
            let remote = req.arena_base.checked_add(offset);
            let (Some(remote), true, true) = (remote, inside, block.len() as u64 == len) else {
                statuses[n] = STATUS_MALFORMED;
                continue;
            };
            puts.push(PutOp {
                entry: n,
                local: block.as_ptr(),
                len,
                remote,
                eager: req.eager && len <= EAGER_BLOCKS_UP_TO,
            });
        }
        #[cfg(test)]
        {
            self.served_eager += puts.iter().filter(|p| p.eager).count();
        }
        // Sends need no key of the puller's.
        let rkey = if puts.is_empty() || req.send {
            std::ptr::null_mut()
        } else {
            match self.rkey(peer, &req.rkey) {
                Ok(k) => k,
                Err(status) => {
                    tracing::warn!(
                        puller = %label,
                        status = %status_text(status),
                        "a UCX puller's remote key did not unpack; its blocks fail"
                    );
                    for p in &puts {
                        statuses[p.entry] = STATUS_FAILED;
                    }
                    puts.clear();
                    std::ptr::null_mut()
                }
            }
        };
        let runs = if req.send {
            (0..puts.len()).map(|n| n..n + 1).collect()
        } else {
            let cap = WRITE_RUN_UP_TO.min(self.cfg.window.max(1));
            write_runs(puts.iter().map(|p| (p.local as u64, p.remote, p.len)), cap)
        };
        #[cfg(test)]
        {
            self.served_writes += if req.send { 0 } else { runs.len() };
        }
        let headers = req.send.then(|| {
            puts.iter()
                .map(|p| encode_block_header(req.id, p.entry as u32))
                .collect()
        });
        self.serves.push(ServeJob {
            peer,
            request_id: req.id,
            deadline,
            _pinned: entry,
            rkey,
            puts,
            runs,
            statuses,
            next: 0,
            inflight: Vec::new(),
            inflight_bytes: 0,
            phase: ServePhase::Putting,
            headers,
        });
    }

    pub(super) fn advance_serves(&mut self) -> bool {
        let mut busy = false;
        let mut i = 0;
        while i < self.serves.len() {
            let (progressed, finished) = self.advance_serve(i);
            busy |= progressed || finished;
            if finished {
                let job = self.serves.swap_remove(i);
                self.release_peer(job.peer);
            } else {
                i += 1;
            }
        }
        busy
    }

    /// (made progress, finished).
    fn advance_serve(&mut self, i: usize) -> (bool, bool) {
        let now = Instant::now();
        let drain = self.cfg.drain;
        let window = self.cfg.window.max(1);
        let memh = self.memh;
        let (ep, peer_ok, peer_errors) = match self.peers.get(&self.serves[i].peer) {
            Some(p) => (p.ep, p.failed.is_none() && !p.closed, p.peer_errors),
            None => (std::ptr::null_mut(), false, false),
        };
        let job = &mut self.serves[i];
        let expired = now >= job.deadline;
        let given_up = now >= job.deadline + drain;
        let mut progressed = false;
        job.inflight.retain_mut(|(run, req)| match req.poll() {
            None => true,
            Some(status) => {
                progressed = true;
                for put in &job.puts[run.clone()] {
                    job.inflight_bytes -= put.len;
                    job.statuses[put.entry] = if status == sys::UCS_OK {
                        STATUS_OK
                    } else {
                        STATUS_FAILED
                    };
                }
                false
            }
        });
        if !peer_ok {
            // No answer can reach the puller. The endpoint is closed, so what is outstanding
            // completes (with an error) shortly; past the drain period it is left to UCX.
            let mut reqs: Vec<&mut Req> = job.inflight.iter_mut().map(|(_, r)| r).collect();
            match &mut job.phase {
                ServePhase::Putting => {}
                ServePhase::Flushing(r) | ServePhase::Answering(r, _) => reqs.push(r),
            }
            let open = reqs
                .into_iter()
                .filter_map(|r| r.poll().is_none().then_some(()))
                .count();
            if open > 0 && !given_up {
                return (progressed, false);
            }
            job.abandon();
            return (true, true);
        }
        let mut force_close = false;
        let finished = match &mut job.phase {
            ServePhase::Putting => {
                while !expired && job.next < job.runs.len() && job.inflight_bytes < window {
                    let run = job.runs[job.next].clone();
                    let put = &job.puts[run.start];
                    let len: u64 = job.puts[run.clone()].iter().map(|p| p.len).sum();
                    let req = if let Some(headers) = &job.headers {
                        // A send's run is its one block.
                        let header: &[u8; BLOCK_HEADER] = &headers[run.start];
                        // An eager send completes once UCX has copied the block out.
                        let flags = if put.eager {
                            sys::UCP_AM_SEND_FLAG_EAGER
                        } else {
                            sys::UCP_AM_SEND_FLAG_RNDV
                        };
                        let param = sys::ucp_request_param_t {
                            op_attr_mask: sys::UCP_OP_ATTR_FIELD_MEMH | sys::UCP_OP_ATTR_FIELD_FLAGS,
                            flags,
                            memh,
                            ..Default::default()
                        };
                        // SAFETY: live endpoint (the job holds a claim on the peer); the header
                        // lives in `job.headers`, allocated once and kept until the job ends (or
                        // leaked by `abandon` while a send may still read it); the block is a
                        // granted one inside the registered arena, pinned by `job._pinned` until
                        // the job ends, which is after the send completes (or is abandoned past
                        // the drain period; the arena stays mapped, so a late read is still of
                        // valid memory).
                        Req::from_ptr(unsafe {
                            sys::ucp_am_send_nbx(
                                ep,
                                AM_BLOCK,
                                header.as_ptr().cast(),
                                BLOCK_HEADER,
                                put.local.cast(),
                                put.len as usize,
                                &param,
                            )
                        })
                    } else {
                        let param = sys::ucp_request_param_t {
                            op_attr_mask: sys::UCP_OP_ATTR_FIELD_MEMH,
                            memh,
                            ..Default::default()
                        };
                        // SAFETY: live endpoint and the puller's rkey unpacked on it (the job
                        // holds a claim on the peer); the source is a run of granted blocks
                        // that lie back to back inside the registered arena (`write_runs`),
                        // so one range of it, pinned by `job._pinned` until the job ends, which
                        // is after the request completes (or is abandoned past the drain
                        // period; the arena stays mapped, so a late read is still of valid
                        // memory). The destination is the puller's slots for those blocks,
                        // back to back as well.
                        Req::from_ptr(unsafe {
                            sys::ucp_put_nbx(ep, put.local.cast(), len as usize, put.remote, job.rkey, &param)
                        })
                    };
                    job.inflight_bytes += len;
                    job.inflight.push((run, req));
                    job.next += 1;
                    progressed = true;
                }
                let issued = job.next == job.runs.len() || expired;
                if issued && job.headers.is_some() {
                    // A rendezvous send completes once the puller has fetched the block (or
                    // refused it), an eager one once UCX has copied it out: no flush is needed
                    // before the answer, which the puller matches against the blocks it has.
                    if job.inflight.is_empty() {
                        progressed = true;
                        send_answer(ep, job);
                        false
                    } else if given_up {
                        force_close = peer_errors;
                        !peer_errors
                    } else {
                        false
                    }
                } else if issued {
                    progressed = true;
                    if job.next == 0 {
                        send_answer(ep, job);
                    } else {
                        // Every write issued on the endpoint has landed when this completes.
                        let param = sys::ucp_request_param_t::default();
                        // SAFETY: live endpoint; the request is polled and freed via the phase.
                        let req = Req::from_ptr(unsafe { sys::ucp_ep_flush_nbx(ep, &param) });
                        job.phase = ServePhase::Flushing(req);
                    }
                    false
                } else {
                    false
                }
            }
            ServePhase::Flushing(req) => match req.poll() {
                Some(status) if status == sys::UCS_OK && job.inflight.is_empty() => {
                    progressed = true;
                    send_answer(ep, job);
                    false
                }
                Some(status) if status != sys::UCS_OK => {
                    // The endpoint broke: the puller hears of it through its own endpoint.
                    progressed = true;
                    force_close = peer_errors;
                    !peer_errors
                }
                _ if given_up => {
                    force_close = peer_errors;
                    !peer_errors
                }
                _ => false,
            },
            ServePhase::Answering(req, _) => match req.poll() {
                Some(_) => true,
                None if given_up => {
                    force_close = peer_errors;
                    !peer_errors
                }
                None => false,
            },
        };
        if force_close {
            let peer = self.serves[i].peer;
            self.close_peer(peer);
            progressed = true;
        }
        if finished && !force_close {
            self.serves[i].abandon();
        }
        (progressed, finished)
    }
}

impl ServeJob {
    /// Leaves whatever is still outstanding to UCX (which frees the requests when they end;
    /// an answer's buffer or block headers it may still read are leaked).
    pub(super) fn abandon(&mut self) {
        if self.inflight.iter().any(|(_, r)| matches!(r, Req::Pending(_))) {
            if let Some(headers) = self.headers.take() {
                std::mem::forget(headers);
            }
        }
        for (_, req) in self.inflight.drain(..) {
            req.abandon();
        }
        match std::mem::replace(&mut self.phase, ServePhase::Putting) {
            ServePhase::Putting => {}
            ServePhase::Flushing(r) => r.abandon(),
            ServePhase::Answering(r, buf) => {
                if matches!(r, Req::Pending(_)) {
                    std::mem::forget(buf);
                }
                r.abandon();
            }
        }
    }
}

/// Sends a serve job's answer (its statuses as they stand) and moves it to answering.
fn send_answer(ep: sys::ucp_ep_h, job: &mut ServeJob) {
    let buf = encode_answer(job.request_id, job.headers.is_some(), &job.statuses);
    let param = sys::ucp_request_param_t {
        op_attr_mask: sys::UCP_OP_ATTR_FIELD_FLAGS,
        flags: sys::UCP_AM_SEND_FLAG_EAGER,
        ..Default::default()
    };
    // SAFETY: live endpoint (the job holds a claim on it); `buf` moves into the phase with its
    // heap buffer in place and stays there until the send completes, or is leaked when the
    // send is abandoned.
    let req = Req::from_ptr(unsafe {
        sys::ucp_am_send_nbx(
            ep,
            AM_ANSWER,
            std::ptr::null(),
            0,
            buf.as_ptr().cast(),
            buf.len(),
            &param,
        )
    });
    job.phase = ServePhase::Answering(req, buf);
}

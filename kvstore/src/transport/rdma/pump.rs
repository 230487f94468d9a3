//! Driving a plan through a queue pair: posting chains within the window, polling completions
//! until done or the deadline, fencing a queue pair whose pull stopped, and turning outcomes
//! into errors. Written against [`ReadQueue`] so that it runs in tests against a simulated
//! queue pair.

use std::io;
use std::time::{Duration, Instant};

use super::wr::{ItemOutcome, ReadPlan, ReadTracker, ReadWr, WC_SUCCESS};
use crate::transport::TransportError;

/// The status of a READ flushed because the queue pair went to the error state
/// (`IBV_WC_WR_FLUSH_ERR`).
pub(crate) const WC_FLUSHED: u32 = 5;

/// How long a pull spins on its completion queue after the last completion before napping:
/// a READ of a block takes tens to hundreds of microseconds, about what waking a sleeping
/// thread costs.
const SPIN: Duration = Duration::from_micros(50);
/// A nap between polls once spinning stopped paying.
const NAP: Duration = Duration::from_micros(20);

/// `ibv_post_send` failed; `posted` WRs of the chain (its first ones) went to the device anyway.
#[derive(Debug)]
pub(crate) struct PostError {
    /// What the provider returned.
    pub(crate) error: io::Error,
    /// How many WRs of the chain were posted before the failing one.
    pub(crate) posted: usize,
}

/// What a pull needs of a queue pair.
pub(crate) trait ReadQueue {
    /// Most READ WRs in flight at once.
    fn window(&self) -> usize;
    /// Posts one chain with a single call, reading with `rkey`.
    fn post(&mut self, wrs: &[ReadWr], rkey: u32) -> Result<(), PostError>;
    /// Appends the completions queued now as `(wr_id, status)`; returns how many.
    fn poll(&mut self, out: &mut Vec<(u64, u32)>) -> io::Result<usize>;
    /// Moves the queue pair to the error state: nothing more starts, everything posted
    /// completes (flushed).
    fn to_error(&mut self) -> io::Result<()>;
}

/// Posts the plan's chains within the window and polls until all completed; `None` when they
/// all did, else why the pull stopped (the caller must [`fence`] the queue pair then). Nothing
/// is posted at or past `deadline`, which the agent keeps within the grant's life: a READ the
/// source's memory answers later may read what the source put there after the grant.
pub(crate) fn run(
    qp: &mut impl ReadQueue,
    plan: &ReadPlan,
    tracker: &mut ReadTracker,
    rkey: u32,
    deadline: Instant,
    peer: &str,
    describe: fn(u32) -> String,
) -> Option<TransportError> {
    let io = |reason: String| TransportError::Io {
        peer: peer.to_string(),
        reason,
    };
    let mut wcs = Vec::new();
    let mut last_progress = Instant::now();
    loop {
        if Instant::now() >= deadline && !tracker.is_finished() {
            return Some(TransportError::TimedOut {
                peer: peer.to_string(),
            });
        }
        while let Some(c) = tracker.next_to_post(qp.window()) {
            let wrs = &plan.chains[c].wrs;
            if let Err(e) = qp.post(wrs, rkey) {
                return Some(io(format!(
                    "ibv_post_send: {} ({} of the chain's {} READs posted)",
                    e.error,
                    e.posted,
                    wrs.len()
                )));
            }
            tracker.posted(c);
        }
        if tracker.is_finished() {
            return None;
        }
        wcs.clear();
        if let Err(e) = qp.poll(&mut wcs) {
            return Some(io(format!("polling completions: {e}")));
        }
        let mut stop = None;
        for &(id, status) in &wcs {
            if let Err(e) = tracker.complete(id, status) {
                stop.get_or_insert(TransportError::Protocol {
                    peer: peer.to_string(),
                    reason: e.to_string(),
                });
            } else if status != WC_SUCCESS {
                stop.get_or_insert(io(format!("RDMA READ failed: {}", describe(status))));
            }
        }
        if stop.is_some() {
            return stop;
        }
        let now = Instant::now();
        if !wcs.is_empty() {
            last_progress = now;
        } else if now >= deadline {
            return Some(TransportError::TimedOut {
                peer: peer.to_string(),
            });
        } else if now.duration_since(last_progress) < SPIN {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(NAP);
        }
    }
}

/// Stops a queue pair whose pull stopped and drains what it still had in flight, for at most
/// `bound`, so that the items' outcomes are final. Destroying the queue pair afterwards fences
/// whatever a drain that ran out of time left behind. Returns the READs left in flight.
pub(crate) fn fence(qp: &mut impl ReadQueue, tracker: &mut ReadTracker, bound: Duration) -> usize {
    if let Err(e) = qp.to_error() {
        tracing::warn!(error = %e, "RDMA: moving a queue pair to the error state");
    }
    let until = Instant::now() + bound;
    let mut wcs = Vec::new();
    while tracker.in_flight() > 0 && Instant::now() < until {
        wcs.clear();
        if qp.poll(&mut wcs).is_err() {
            break;
        }
        for &(id, status) in &wcs {
            // Completions of a chain that was only partly posted are not tracked; destroying
            // the queue pair fences those READs.
            if tracker.complete(id, status).is_err() {
                tracing::debug!(wr_id = id, status, "RDMA: untracked completion while draining");
            }
        }
        if wcs.is_empty() {
            std::thread::sleep(NAP);
        }
    }
    tracker.in_flight()
}

/// What became of one read before its checksum is looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fate {
    /// It arrived whole: verify it.
    Arrived,
    /// It did not.
    Failed(TransportError),
}

/// The fate of each item from its outcome and, when the pull stopped early, why it stopped.
pub(crate) fn fates(
    outcomes: Vec<ItemOutcome>,
    stopped: Option<&TransportError>,
    peer: &str,
    describe: fn(u32) -> String,
) -> Vec<Fate> {
    let not_read = || TransportError::Protocol {
        peer: peer.to_string(),
        reason: "block not read".into(),
    };
    outcomes
        .into_iter()
        .map(|o| match o {
            ItemOutcome::Done => Fate::Arrived,
            // Flushed behind the READ that failed first (or the deadline): that is the cause.
            ItemOutcome::Failed { status } if status == WC_FLUSHED => {
                Fate::Failed(stopped.cloned().unwrap_or_else(not_read))
            }
            ItemOutcome::Failed { status } => Fate::Failed(TransportError::Io {
                peer: peer.to_string(),
                reason: format!("RDMA READ failed: {}", describe(status)),
            }),
            ItemOutcome::Unfinished => Fate::Failed(stopped.cloned().unwrap_or_else(not_read)),
        })
        .collect()
}

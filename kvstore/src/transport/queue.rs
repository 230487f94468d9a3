//! Pulls from one source taken in the order they come, a few at a time.
//!
//! An agent pulls for several decode requests at once, and pulls in flight from the same
//! source share its bandwidth: each ends about when the last does, so the first request waits
//! about as long as all of them together. A [`PullQueue`] lets at most
//! [`PullQueue::per_source`] pulls from one source run at a time (a pull holds its [`Turn`]
//! from before it asks for its grant to the end of its transfer) and starts the
//! others as those end, first come first served, so the first request's pull no longer shares
//! the source with the later ones. Pulls from different sources do not wait for each other.
//!
//! Measured over loopback on a 2-core VM (`kvbench transfer --pulls-at-once 1,4
//! --pulls-per-source 1,0`, five rounds, two runs; `docs/benchmarks.md`), one pull per source
//! against all four at once: the median pull of 16 blocks of 256 KiB or 1 MiB ended 10–54 %
//! sooner over every transport; the four together moved 1.04–1.77 × as much over kvtier's
//! TCP, 0.72–1.38 × over UCX-TCP and 0.75–1.03 × over UCX's shared memory; pulls of a single
//! block over UCX-TCP ended sooner or later from one run to the next, and single 64 KiB blocks
//! over shared memory 4–20 % later.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Pulls in flight per source by default: one per four cores, 1–4, as the TCP transport's
/// streams ([`super::tcp::default_streams`]): a pull keeps a core busy on each side, and more
/// pulls than that only take turns.
pub fn default_per_source() -> usize {
    super::tcp::default_streams()
}

/// Admits pulls per source, first come first served (see the module documentation).
#[derive(Debug)]
pub struct PullQueue {
    per_source: usize,
    /// The turns of each source with pulls in flight or waiting; an entry goes when the last
    /// [`Turn`] at it does.
    sources: Mutex<HashMap<Vec<u8>, Arc<Semaphore>>>,
}

/// A pull's turn at its source, from [`PullQueue::turn`]: the next waiting pull may start once
/// it is dropped.
#[derive(Debug)]
pub struct Turn<'a> {
    queue: &'a PullQueue,
    source: Vec<u8>,
    /// `None` where the queue sets no limit.
    turns: Option<Arc<Semaphore>>,
    permit: Option<OwnedSemaphorePermit>,
    waited: Duration,
}

impl Turn<'_> {
    /// How long the pull waited behind earlier pulls from the same source.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        if let Some(turns) = self.turns.take() {
            self.queue.forget_if_unused(&self.source, turns);
        }
    }
}

impl PullQueue {
    /// A queue letting `per_source` pulls from one source run at once (0: no limit, every pull
    /// starts at once).
    pub fn new(per_source: usize) -> Self {
        Self {
            per_source,
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// Pulls from one source allowed in flight at once (0: no limit).
    pub fn per_source(&self) -> usize {
        self.per_source
    }

    /// Waits until fewer than [`Self::per_source`] earlier turns at `source` are still held,
    /// first come first served. `source` names the agent pulled from (its address): only
    /// pulls from the same source wait for each other. `Err` with the time waited if
    /// `deadline` passes first.
    pub async fn turn(&self, source: &[u8], deadline: Instant) -> Result<Turn<'_>, Duration> {
        let asked = Instant::now();
        let mut turn = Turn {
            queue: self,
            source: source.to_vec(),
            turns: (self.per_source > 0).then(|| self.turns(source)),
            permit: None,
            waited: Duration::ZERO,
        };
        if let Some(turns) = &turn.turns {
            // A wait given up (the deadline, or the caller dropping this future) drops the
            // awaited future, which owns the acquire and its handle on the turns, before
            // `turn`, whose drop then finds the handle gone. (Were it not so, the entry would
            // only linger until the source's next turn.)
            let acquire = Arc::clone(turns).acquire_owned();
            match tokio::time::timeout_at(deadline.into(), acquire).await {
                Ok(Ok(permit)) => turn.permit = Some(permit),
                // The semaphore is never closed; a closed one could give no turn at all.
                Ok(Err(_closed)) => return Err(asked.elapsed()),
                Err(_elapsed) => return Err(asked.elapsed()),
            }
        }
        turn.waited = asked.elapsed();
        Ok(turn)
    }

    /// The turns of `source`, made on its first pull.
    fn turns(&self, source: &[u8]) -> Arc<Semaphore> {
        let mut sources = self.sources.lock();
        Arc::clone(
            sources
                .entry(source.to_vec())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_source))),
        )
    }

    /// A turn at `source` is over (or was given up): forgets the source when no other pull
    /// holds or waits for a turn there.
    fn forget_if_unused(&self, source: &[u8], turns: Arc<Semaphore>) {
        let mut sources = self.sources.lock();
        drop(turns);
        // Under the lock no pull can take a new handle on the entry, so a count of one (the
        // map's) means no pull runs or waits at this source.
        if sources.get(source).is_some_and(|t| Arc::strong_count(t) == 1) {
            sources.remove(source);
        }
    }

    /// Sources with pulls in flight or waiting.
    #[cfg(test)]
    fn sources(&self) -> usize {
        self.sources.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Notify;

    /// Pulls that hold their turn until the test lets them end, one at a time, recording the
    /// order in which they got it and how many held one at once.
    #[derive(Debug, Default)]
    struct Pulls {
        started: Mutex<Vec<u32>>,
        running: AtomicUsize,
        most_at_once: AtomicUsize,
        end_one: Notify,
    }

    impl Pulls {
        async fn pull(&self, queue: &PullQueue, source: &[u8], n: u32) {
            let turn = queue
                .turn(source, far())
                .await
                .expect("a turn before the deadline");
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_at_once.fetch_max(now, Ordering::SeqCst);
            self.started.lock().push(n);
            self.end_one.notified().await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            drop(turn);
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    /// Runs `pulls` of (source, number) through `queue`: each reaches the queue (and takes its
    /// turn, where it may) before the next is made; then the pulls holding turns are let end
    /// one at a time until all are over. Returns the order they got their turns in and the
    /// most that held one at once.
    async fn run(queue: PullQueue, pulls: &[(&'static [u8], u32)]) -> (Vec<u32>, usize) {
        let (queue, state) = (Arc::new(queue), Arc::new(Pulls::default()));
        let mut tasks = Vec::new();
        for &(source, n) in pulls {
            let (queue, state) = (Arc::clone(&queue), Arc::clone(&state));
            tasks.push(tokio::spawn(async move { state.pull(&queue, source, n).await }));
            tokio::task::yield_now().await;
        }
        while !tasks.iter().all(tokio::task::JoinHandle::is_finished) {
            state.end_one.notify_one();
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.expect("pull task");
        }
        assert_eq!(queue.sources(), 0, "a source with no pulls left is forgotten");
        let started = state.started.lock().clone();
        (started, state.most_at_once.load(Ordering::SeqCst))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_per_source_runs_pulls_one_after_another_in_the_order_they_came() {
        let pulls: Vec<(&[u8], u32)> = (1..=6).map(|n| (&b"a"[..], n)).collect();
        assert_eq!(run(PullQueue::new(1), &pulls).await, (vec![1, 2, 3, 4, 5, 6], 1));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn pulls_from_different_sources_do_not_wait_for_each_other() {
        let (order, most) = run(PullQueue::new(1), &[(b"a", 1), (b"b", 2), (b"a", 3), (b"b", 4)]).await;
        assert_eq!((order, most), (vec![1, 2, 3, 4], 2));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_limit_and_no_limit() {
        let pulls: Vec<(&[u8], u32)> = (1..=6).map(|n| (&b"a"[..], n)).collect();
        assert_eq!(run(PullQueue::new(2), &pulls).await, (vec![1, 2, 3, 4, 5, 6], 2));
        assert_eq!(run(PullQueue::new(0), &pulls).await.1, 6);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_wait_past_its_deadline_gets_no_turn_and_a_given_up_wait_leaves_nothing_behind() {
        let queue = PullQueue::new(1);
        let first = queue.turn(b"a", far()).await.expect("a free turn");
        assert!(first.waited() < Duration::from_secs(1));
        let t0 = Instant::now();
        let waited = queue
            .turn(b"a", t0 + Duration::from_millis(20))
            .await
            .expect_err("no turn before the deadline");
        assert!(t0.elapsed() >= Duration::from_millis(20));
        assert!(waited <= t0.elapsed());
        // A wait dropped before its turn came.
        let gave_up = tokio::time::timeout(Duration::from_millis(5), queue.turn(b"a", far())).await;
        assert!(gave_up.is_err());
        assert_eq!(queue.sources(), 1, "the first turn still holds the source");
        drop(first);
        assert_eq!(queue.sources(), 0);
        let next = queue.turn(b"a", far()).await.expect("the source is free again");
        assert!(next.waited() < Duration::from_secs(1));
    }

    /// A waiter whose turn was handed to it while it was not being polled, then dropped: the
    /// turn goes back and the source is forgotten.
    #[tokio::test(flavor = "current_thread")]
    async fn a_wait_dropped_after_its_turn_came_gives_the_turn_back() {
        let queue = PullQueue::new(1);
        let first = queue.turn(b"a", far()).await.expect("a free turn");
        let mut waiting = Box::pin(queue.turn(b"a", far()));
        assert!(poll_once(waiting.as_mut()).await.is_none(), "the second waits");
        drop(first);
        drop(waiting);
        assert_eq!(queue.sources(), 0);
        let again = queue.turn(b"a", Instant::now() + Duration::from_millis(50)).await;
        assert!(again.is_ok(), "the turn came back");
    }

    /// Polls `fut` once: its output if it was ready.
    async fn poll_once<F: std::future::Future + Unpin>(fut: F) -> Option<F::Output> {
        let mut fut = fut;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut fut).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}

//! Pulls from one source taken in the order they come, a few at a time.
//!
//! An agent pulls for several decode requests at once, and pulls in flight from the same
//! source share its bandwidth: each ends about when the last does, so the first request waits
//! about as long as all of them together. A [`PullQueue`] lets at most
//! [`PullQueue::per_source`] pulls from one source endpoint run at a time and starts the
//! others as those end, first come first served, so the first request's blocks arrive about
//! as fast as if it were alone. Pulls from different sources do not wait for each other.
//!
//! Measured over loopback on a 2-core VM (`kvbench transfer --pulls-at-once 4
//! --pulls-per-source 1,0`, five rounds; `docs/benchmarks.md`), one pull per source against
//! all four at once: the median pull of 16 blocks of 256 KiB or 1 MiB took 14–41 % less time
//! over every transport; the four together moved up to 1.4 × as much over kvtier's TCP and
//! about as much over UCX-TCP, but up to a quarter less over UCX's shared memory; pulls of a
//! single 64 KiB block took longer in turn than together over UCX (14 % over TCP, 21 % over
//! shared memory).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Semaphore;

use super::{GrantId, PullItem, Pulled, Transport, TransportError, fail_all};

/// Pulls in flight per source by default: one per four cores, 1–4, as the TCP transport's
/// streams ([`super::tcp::default_streams`]): a pull keeps a core busy on each side, and more
/// pulls than that only take turns.
pub fn default_per_source() -> usize {
    super::tcp::default_streams()
}

/// What a queued pull gave: the transport's answer, and how long the pull waited for its turn.
#[derive(Debug)]
pub struct QueuedPull {
    /// Every item of the pull, as [`Transport::pull`] gives them back.
    pub pulled: Vec<Pulled>,
    /// Time spent waiting behind other pulls from the same source.
    pub waited: Duration,
}

/// Admits pulls per source endpoint, first come first served (see the module documentation).
#[derive(Debug)]
pub struct PullQueue {
    per_source: usize,
    /// The turns of each source with pulls in flight or waiting; an entry goes when its last
    /// pull ends.
    sources: Mutex<HashMap<Vec<u8>, Arc<Semaphore>>>,
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

    /// [`Transport::pull`] once fewer than [`Self::per_source`] earlier pulls from `endpoint`
    /// are still running. A pull whose deadline passes while it waits fails every item with
    /// [`TransportError::TimedOut`], as one that started would have.
    pub async fn pull(
        &self,
        transport: &dyn Transport,
        endpoint: &[u8],
        grant: GrantId,
        items: Vec<PullItem>,
        deadline: Instant,
    ) -> QueuedPull {
        if self.per_source == 0 {
            return QueuedPull {
                pulled: transport.pull(endpoint, grant, items, deadline).await,
                waited: Duration::ZERO,
            };
        }
        let turns = self.turns(endpoint);
        let asked = Instant::now();
        // The semaphore is never closed, so acquiring fails only by the deadline. Its waiters
        // are served in the order they came.
        let admitted = tokio::time::timeout_at(deadline.into(), Arc::clone(&turns).acquire_owned()).await;
        let waited = asked.elapsed();
        let pulled = match admitted {
            Ok(Ok(turn)) => {
                let pulled = transport.pull(endpoint, grant, items, deadline).await;
                drop(turn);
                pulled
            }
            _ => {
                let peer = String::from_utf8_lossy(endpoint).into_owned();
                fail_all(items, &TransportError::TimedOut { peer })
            }
        };
        self.done(endpoint, turns);
        QueuedPull { pulled, waited }
    }

    /// The turns of `endpoint`, made on its first pull.
    fn turns(&self, endpoint: &[u8]) -> Arc<Semaphore> {
        let mut sources = self.sources.lock();
        Arc::clone(
            sources
                .entry(endpoint.to_vec())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_source))),
        )
    }

    /// A pull from `endpoint` is over: forgets the source when no other pull holds its turns.
    fn done(&self, endpoint: &[u8], turns: Arc<Semaphore>) {
        let mut sources = self.sources.lock();
        drop(turns);
        // Under the lock no pull can take a new handle on the entry, so a count of one (the
        // map's) means no pull runs or waits for this source.
        if sources.get(endpoint).is_some_and(|t| Arc::strong_count(t) == 1) {
            sources.remove(endpoint);
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
    use crate::transport::{BoxFuture, TransportKind};
    use std::net::IpAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Notify;

    /// A transport whose pulls run until the test lets them end, one by one, recording the
    /// order in which they started and how many ran at once.
    #[derive(Debug, Default)]
    struct Gated {
        started: Mutex<Vec<u32>>,
        running: AtomicUsize,
        most_at_once: AtomicUsize,
        proceed: Notify,
        began: Notify,
    }

    impl Transport for Gated {
        fn kind(&self) -> TransportKind {
            TransportKind::Tcp
        }

        fn endpoint(&self, _seen_as: Option<IpAddr>) -> Vec<u8> {
            Vec::new()
        }

        fn pull<'a>(
            &'a self,
            _endpoint: &'a [u8],
            grant: GrantId,
            items: Vec<PullItem>,
            _deadline: Instant,
        ) -> BoxFuture<'a, Vec<Pulled>> {
            Box::pin(async move {
                let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.most_at_once.fetch_max(now, Ordering::SeqCst);
                self.started.lock().push(u32::from(grant.0[0]));
                self.began.notify_one();
                self.proceed.notified().await;
                self.running.fetch_sub(1, Ordering::SeqCst);
                items
                    .into_iter()
                    .map(|i| Pulled {
                        index: i.index,
                        slot: i.slot,
                        result: Ok(()),
                    })
                    .collect()
            })
        }
    }

    fn grant(n: u8) -> GrantId {
        let mut id = [0; 16];
        id[0] = n;
        GrantId(id)
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    /// Runs `pulls` of (source, grant) through `queue` on `gated`: each pull reaches the queue
    /// (and starts, where it may) before the next is made; then the running pulls are let end
    /// one at a time until all are over.
    async fn run(queue: &Arc<PullQueue>, gated: &Arc<Gated>, pulls: &[(&'static [u8], u8)]) {
        let mut tasks = Vec::new();
        for &(source, n) in pulls {
            let (queue, gated) = (Arc::clone(queue), Arc::clone(gated));
            tasks.push(tokio::spawn(async move {
                queue
                    .pull(gated.as_ref(), source, grant(n), Vec::new(), far())
                    .await
            }));
            tokio::task::yield_now().await;
        }
        while !tasks.iter().all(tokio::task::JoinHandle::is_finished) {
            gated.proceed.notify_one();
            tokio::task::yield_now().await;
        }
        for t in tasks {
            assert!(t.await.expect("pull task").pulled.is_empty());
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_per_source_runs_pulls_one_after_another_in_the_order_they_came() {
        let (queue, gated) = (Arc::new(PullQueue::new(1)), Arc::new(Gated::default()));
        run(&queue, &gated, &[(b"a", 1), (b"a", 2), (b"a", 3), (b"a", 4)]).await;
        assert_eq!(*gated.started.lock(), vec![1, 2, 3, 4]);
        assert_eq!(gated.most_at_once.load(Ordering::SeqCst), 1);
        assert_eq!(queue.sources(), 0, "a source with no pulls left is forgotten");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn pulls_from_different_sources_do_not_wait_for_each_other() {
        let (queue, gated) = (Arc::new(PullQueue::new(1)), Arc::new(Gated::default()));
        run(&queue, &gated, &[(b"a", 1), (b"b", 2), (b"a", 3), (b"b", 4)]).await;
        assert_eq!(gated.most_at_once.load(Ordering::SeqCst), 2);
        assert_eq!(*gated.started.lock(), vec![1, 2, 3, 4]);
        assert_eq!(queue.sources(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_limit_and_no_limit() {
        for (per_source, most) in [(2, 2), (0, 4)] {
            let (queue, gated) = (Arc::new(PullQueue::new(per_source)), Arc::new(Gated::default()));
            run(&queue, &gated, &[(b"a", 1), (b"a", 2), (b"a", 3), (b"a", 4)]).await;
            assert_eq!(
                gated.most_at_once.load(Ordering::SeqCst),
                most,
                "per source {per_source}"
            );
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_pull_whose_deadline_passes_in_the_queue_fails_its_items_without_reaching_the_transport() {
        let store = crate::transport::test_support::store(8);
        let queue = Arc::new(PullQueue::new(1));
        let gated = Arc::new(Gated::default());
        let first = {
            let (queue, gated) = (Arc::clone(&queue), Arc::clone(&gated));
            tokio::spawn(async move {
                queue
                    .pull(gated.as_ref(), b"a", grant(1), Vec::new(), far())
                    .await
            })
        };
        gated.began.notified().await;
        let slot = store
            .reserve_batch(&[(crate::transport::test_support::key(7), 4096)])
            .pop()
            .expect("one answer")
            .expect("a slot");
        let item = PullItem {
            index: 3,
            remote_offset: 0,
            checksum: 0,
            slot,
        };
        let late = queue
            .pull(
                gated.as_ref(),
                b"a",
                grant(2),
                vec![item],
                Instant::now() + Duration::from_millis(20),
            )
            .await;
        assert_eq!(late.pulled.len(), 1);
        assert_eq!(late.pulled[0].index, 3);
        assert!(matches!(
            late.pulled[0].result,
            Err(TransportError::TimedOut { .. })
        ));
        assert!(late.waited >= Duration::from_millis(20));
        assert_eq!(
            *gated.started.lock(),
            vec![1],
            "the late pull never reached the transport"
        );
        for p in late.pulled {
            store.abort(p.slot);
        }
        gated.proceed.notify_one();
        let first = first.await.expect("first pull");
        assert!(first.pulled.is_empty());
        assert_eq!(queue.sources(), 0);
    }
}

//! The two backends answer alike: one script of events, speculations and clears applied to the
//! memory backend and to the Redis backend on a real `redis-server`, with `score` and `lookup`
//! compared after every step.

use std::time::Duration;

use kvstore::index::{Event, IndexConfig, Medium, TierWeights, scope_of};

use super::memory::MemoryBackend;
use super::redis::{RedisBackend, RedisSettings};
use super::{Backend, Candidate};

/// The integration tests' port picker, shared by path.
#[path = "../../../../kvstore/tests/common/ports.rs"]
mod ports;
/// The integration tests' launcher, shared by path.
#[path = "../../../tests/common/redis.rs"]
mod redis_server;

fn stored(scope: u64, hashes: &[u64], medium: Medium) -> Event {
    Event::Stored {
        scope,
        hashes: hashes.to_vec(),
        medium,
    }
}

fn removed(scope: u64, hashes: &[u64], medium: Medium) -> Event {
    Event::Removed {
        scope,
        hashes: hashes.to_vec(),
        medium,
    }
}

enum Step {
    Apply(&'static str, Vec<Event>),
    Speculate(&'static str, Vec<u64>),
    Clear(&'static str),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_redis_answer_alike() {
    let port = ports::free_port();
    let Some(server) = redis_server::RedisServer::start(port) else {
        return;
    };
    let ttl = Duration::from_secs(60);
    let memory = MemoryBackend::new(IndexConfig {
        speculative_ttl: ttl,
        ..IndexConfig::default()
    });
    let redis = RedisBackend::new(RedisSettings {
        url: server.url(),
        prefix: "t:".into(),
        timeout: Duration::from_secs(2),
        weights: TierWeights::default(),
        speculative_ttl: ttl,
    })
    .expect("a Redis backend");
    let (m, other) = (scope_of("m"), scope_of("other"));
    let prompt: Vec<u64> = (1..=6).collect();
    let candidates = [
        Candidate {
            pod: "p1".into(),
            agent: Some("agent/n1".into()),
        },
        Candidate {
            pod: "p2".into(),
            agent: None,
        },
        Candidate {
            pod: "unknown".into(),
            agent: Some("agent/unknown".into()),
        },
    ];
    let steps = vec![
        Step::Apply("p1", vec![stored(m, &[1, 2, 3], Medium::Device)]),
        Step::Apply(
            "agent/n1",
            vec![
                stored(m, &[1, 2, 3, 4], Medium::Host),
                stored(m, &[4], Medium::Disk),
            ],
        ),
        Step::Speculate("p2", vec![1, 2, 3, 4, 5]),
        Step::Apply("p1", vec![removed(m, &[2], Medium::Device)]),
        // A report replaces a speculation; a removal leaves speculations alone.
        Step::Apply(
            "p2",
            vec![stored(m, &[1], Medium::Device), removed(m, &[2], Medium::Device)],
        ),
        Step::Apply("agent/n1", vec![removed(m, &[4], Medium::Host)]),
        Step::Clear("agent/n1"),
        Step::Apply("agent/n1", vec![stored(m, &[1, 2], Medium::Disk)]),
        Step::Apply("p1", vec![Event::Cleared, stored(m, &[1], Medium::Host)]),
        // Blocks of another model never count.
        Step::Apply("p2", vec![stored(other, &[2, 3], Medium::Device)]),
        // A speculation never downgrades a report.
        Step::Speculate("p1", vec![1, 2]),
    ];
    for (i, step) in steps.iter().enumerate() {
        for backend in [&memory as &dyn Backend, &redis] {
            match step {
                Step::Apply(source, events) => backend.apply(source, events).await,
                Step::Speculate(pod, hashes) => backend.speculate(pod, m, hashes).await,
                Step::Clear(source) => backend.clear(source).await.map(drop),
            }
            .expect("the step applies");
        }
        let (a, b) = (
            memory.score(m, &prompt, &candidates).await.expect("memory score"),
            redis.score(m, &prompt, &candidates).await.expect("redis score"),
        );
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.blocks, y.blocks, "step {i}: {a:?} vs {b:?}");
            assert!((x.weighted - y.weighted).abs() < 1e-9, "step {i}: {a:?} vs {b:?}");
        }
        let sorted = |mut l: Vec<Vec<(String, Vec<Medium>)>>| {
            l.iter_mut().for_each(|h| h.sort());
            l
        };
        assert_eq!(
            sorted(memory.lookup(m, &prompt).await.expect("memory lookup")),
            sorted(redis.lookup(m, &prompt).await.expect("redis lookup")),
            "step {i}"
        );
    }
    // The script reached states worth comparing: at the end p1 holds block 1 on host (and a
    // speculation of 1-2 that does not replace it), its agent blocks 1-2 on disk.
    let end = memory.score(m, &prompt, &candidates).await.expect("score");
    assert_eq!(end[0].blocks, 2);
    assert!(end[1].blocks >= 1);

    // Ageing out: sources silent for longer than the TTL go, in both, and only they. (The
    // pause is the silence under test.)
    tokio::time::sleep(Duration::from_millis(60)).await;
    for backend in [&memory as &dyn Backend, &redis] {
        backend.keep_alive("p2").await.expect("keep alive");
    }
    let mut gone_m = memory.age_out(Duration::from_millis(40)).await.expect("age out");
    let mut gone_r = redis.age_out(Duration::from_millis(40)).await.expect("age out");
    gone_m.sort();
    gone_r.sort();
    assert_eq!(gone_m, vec!["agent/n1".to_owned(), "p1".to_owned()]);
    assert_eq!(gone_m, gone_r);
    assert!(
        redis
            .age_out(Duration::from_millis(40))
            .await
            .expect("again")
            .is_empty(),
        "once"
    );
    let (a, b) = (
        memory.score(m, &prompt, &candidates).await.expect("memory score"),
        redis.score(m, &prompt, &candidates).await.expect("redis score"),
    );
    assert_eq!(a[0].blocks, 0, "p1 and its agent no longer count");
    assert_eq!(
        a.iter().map(|s| s.blocks).collect::<Vec<_>>(),
        b.iter().map(|s| s.blocks).collect::<Vec<_>>()
    );
}

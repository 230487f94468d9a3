//! The real `kvagent node` binary with real client processes: concurrent byte-exact saves and
//! loads, restart onto the disk tier, dead clients and dead agents, bad frames, metrics and
//! shutdown.

mod common;

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use kvstore::TierLevel;
use kvstore::client::{Client, ClientConfig, ClientError, SaveOutcome};
use kvstore::wire::{self, ErrorCode, PROTOCOL_VERSION, Request, Response};

const BLOCKS_PER_WRITER: u64 = 48;
const WRITERS: u64 = 4;

fn save_range(client: &Client, seed: u64, range: std::ops::Range<u64>) -> Vec<SaveOutcome> {
    let data: Vec<Vec<u8>> = range.clone().map(|i| payload(seed, i)).collect();
    let items: Vec<_> = range
        .zip(&data)
        .map(|(i, d)| (hash(seed, i), d.as_slice()))
        .collect();
    client.save(&ns("m"), &items).expect("save")
}

/// Loads blocks `range` of `seed` and checks every byte; returns the tiers they came from.
fn load_and_check(client: &Client, seed: u64, range: std::ops::Range<u64>) -> Vec<Option<TierLevel>> {
    let expected: Vec<Vec<u8>> = range.clone().map(|i| payload(seed, i)).collect();
    let mut bufs: Vec<Vec<u8>> = expected.iter().map(|e| vec![0; e.len()]).collect();
    let hashes: Vec<_> = range.map(|i| hash(seed, i)).collect();
    let mut slices: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    let tiers = client.load(&ns("m"), &hashes, &mut slices).expect("load");
    for (i, t) in tiers.iter().enumerate() {
        if t.is_some() {
            assert!(bufs[i] == expected[i], "block {i} of writer {seed} differs");
        }
    }
    tiers
}

#[test]
fn concurrent_client_processes_save_and_load_byte_exact() {
    let dir = socket_dir();
    let agent = Agent::start(&dir.path().join("a.sock"), &[]);
    let mut children: Vec<_> = (0..WRITERS)
        .map(|seed| {
            spawn_child(
                "child_writer",
                &[
                    ("KVAGENT_TEST_SOCKET", agent.socket.display().to_string()),
                    ("KVAGENT_TEST_SEED", seed.to_string()),
                ],
            )
        })
        .collect();
    for c in &mut children {
        assert!(c.wait().expect("child").success(), "a writer failed");
    }
    // Every writer's blocks, read by another process, byte for byte.
    let client = agent.client();
    for seed in 0..WRITERS {
        let tiers = load_and_check(&client, seed, 0..BLOCKS_PER_WRITER);
        assert!(
            tiers.iter().all(|t| *t == Some(TierLevel::Host)),
            "writer {seed}: {tiers:?}"
        );
    }
    let lookup = client
        .lookup(
            &ns("m"),
            &(0..BLOCKS_PER_WRITER).map(|i| hash(1, i)).collect::<Vec<_>>(),
        )
        .unwrap();
    assert_eq!(lookup.len() as u64, BLOCKS_PER_WRITER);
}

#[test]
#[ignore = "child half of concurrent_client_processes_save_and_load_byte_exact"]
fn child_writer() {
    let socket = child_env("KVAGENT_TEST_SOCKET");
    let seed: u64 = child_env("KVAGENT_TEST_SEED").parse().unwrap();
    let client = Client::connect(config(socket.as_ref())).expect("connect");
    // In batches, interleaved with the other writers, then a second save that finds them all.
    for start in (0..BLOCKS_PER_WRITER).step_by(8) {
        let out = save_range(&client, seed, start..start + 8);
        assert!(out.iter().all(|o| *o == SaveOutcome::Stored), "{out:?}");
        load_and_check(&client, seed, 0..start + 8);
    }
    let again = save_range(&client, seed, 0..BLOCKS_PER_WRITER);
    assert!(again.iter().all(|o| *o == SaveOutcome::Exists), "{again:?}");
}

#[test]
fn restart_with_a_disk_tier_serves_blocks_from_disk() {
    let dir = socket_dir();
    let disk = scratch();
    let disk_dir = disk.path().join("tier").display().to_string();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "[disk]\nslab_size = \"16MiB\"\n").unwrap();
    let cfg = cfg.display().to_string();
    let flags = ["--config", &cfg, "--disk-dir", &disk_dir, "--disk-size", "256MiB"];
    let mut agent = Agent::start(&dir.path().join("a.sock"), &flags);
    {
        let client = agent.client();
        let out = save_range(&client, 7, 0..40);
        assert!(out.iter().all(|o| *o == SaveOutcome::Stored));
    }
    assert!(agent.terminate().success(), "SIGTERM must exit 0");
    assert!(!agent.socket.exists(), "a clean stop removes its socket");
    agent.restart();
    let client = agent.client();
    // The host arena is new and empty: everything comes back from disk, promoted on acquire.
    let tiers = load_and_check(&client, 7, 0..40);
    assert!(tiers.iter().all(|t| *t == Some(TierLevel::Disk)), "{tiers:?}");
    let tiers = load_and_check(&client, 7, 0..40);
    assert!(
        tiers.iter().all(|t| *t == Some(TierLevel::Host)),
        "promoted: {tiers:?}"
    );
}

#[test]
fn a_killed_client_loses_its_pins_and_reservations() {
    let dir = socket_dir();
    // 16 MiB arena of 4 MiB slabs: the child pins every block it can, leaving no room.
    let agent = Agent::start(&dir.path().join("a.sock"), &["--host-size", "16MiB"]);
    let mut child = spawn_child(
        "child_holder",
        &[("KVAGENT_TEST_SOCKET", agent.socket.display().to_string())],
    );
    let line = wait_line(&mut child, "held ");
    let pinned: u64 = line["held ".len()..].parse().unwrap();
    assert!(pinned > 0);
    let client = agent.client();
    // While the child lives: its reservation makes the key busy, its pins make the arena full.
    let reserved = client.reserve(&ns("m"), &[(hash(99, 0), 4096)]).unwrap();
    assert!(
        matches!(reserved[0], Err(SaveOutcome::Exists)),
        "reserved by the child"
    );
    let big = vec![7u8; 1 << 20];
    let out = client.save(&ns("m"), &[(hash(50, 0), &big)]).unwrap();
    assert_eq!(out[0], SaveOutcome::NoSpace, "every slot pinned by the child");

    let _ = child.kill();
    let _ = child.wait();
    // Open now: this test's client and the one the stats poll opens.
    agent.wait_for("the dead client's connection to close", |s| s["clients"] == 2);
    let out = client.save(&ns("m"), &[(hash(50, 0), &big)]).unwrap();
    assert_eq!(out[0], SaveOutcome::Stored, "pins released with the connection");
    let reserved = client.reserve(&ns("m"), &[(hash(99, 0), 4096)]).unwrap();
    let slot = reserved
        .into_iter()
        .next()
        .unwrap()
        .expect("reservation released");
    client.abort(&ns("m"), vec![slot]).unwrap();
}

#[test]
#[ignore = "child half of a_killed_client_loses_its_pins_and_reservations"]
fn child_holder() {
    let socket = child_env("KVAGENT_TEST_SOCKET");
    let client = Client::connect(config(socket.as_ref())).expect("connect");
    // The reservation first: once the pins fill the arena there is no slot left for it.
    let slot = client.reserve(&ns("m"), &[(hash(99, 0), 4096)]).unwrap();
    assert!(slot[0].is_ok());
    let block = vec![1u8; 1 << 20];
    let hashes: Vec<_> = (0..32).map(|i| hash(98, i)).collect();
    let items: Vec<_> = hashes.iter().map(|h| (*h, block.as_slice())).collect();
    client.save(&ns("m"), &items).unwrap();
    let held: Vec<_> = client
        .acquire(&ns("m"), &hashes)
        .unwrap()
        .into_iter()
        .flatten()
        .collect();
    println!("held {}", held.len());
    std::io::stdout().flush().unwrap();
    // Hold everything until killed; the parent's kill ends this.
    loop {
        std::thread::park();
    }
}

#[test]
fn clients_fail_fast_while_the_agent_is_gone_and_recover_after_restart() {
    let dir = socket_dir();
    let mut agent = Agent::start(&dir.path().join("a.sock"), &[]);
    let client = Client::connect(ClientConfig {
        timeout: Duration::from_millis(500),
        ..config(&agent.socket)
    })
    .unwrap();
    save_range(&client, 3, 0..4);
    agent.kill9();
    for _ in 0..3 {
        let started = Instant::now();
        let err = client.lookup(&ns("m"), &[hash(3, 0)]).unwrap_err();
        assert!(matches!(err, ClientError::Unavailable { .. }), "{err}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "failed fast: {:?}",
            started.elapsed()
        );
    }
    // kill -9 left the socket file behind; the new agent replaces it.
    assert!(agent.socket.exists());
    agent.restart();
    let out = save_range(&client, 3, 0..4);
    assert!(
        out.iter().all(|o| *o == SaveOutcome::Stored),
        "a fresh arena: {out:?}"
    );
    assert_eq!(load_and_check(&client, 3, 0..4), vec![Some(TierLevel::Host); 4]);
}

#[test]
fn a_hung_agent_costs_a_client_its_deadline_and_no_more() {
    let dir = socket_dir();
    let agent = Agent::start(&dir.path().join("a.sock"), &[]);
    let timeout = Duration::from_millis(300);
    let client = Client::connect(ClientConfig {
        timeout,
        ..config(&agent.socket)
    })
    .unwrap();
    agent.stop();
    let started = Instant::now();
    let err = client.lookup(&ns("m"), &[hash(1, 0)]).unwrap_err();
    let took = started.elapsed();
    agent.signal(libc::SIGCONT);
    assert!(matches!(err, ClientError::Timeout(_)), "{err}");
    assert!(took >= timeout && took < timeout * 3, "{took:?}");
    // The timed-out connection was dropped; the next call reconnects.
    assert_eq!(client.lookup(&ns("m"), &[hash(1, 0)]).unwrap(), vec![]);
}

/// Opens a raw connection and completes the handshake (the arena fd is received and dropped).
fn raw_handshake(socket: &std::path::Path) -> UnixStream {
    raw_handshake_at(socket, PROTOCOL_VERSION)
}

#[test]
fn clients_of_the_previous_protocol_version_are_served() {
    let dir = socket_dir();
    let agent = Agent::start(&dir.path().join("a.sock"), &[]);
    let s = raw_handshake_at(&agent.socket, wire::MIN_PROTOCOL_VERSION);
    let mut out = Vec::new();
    Request::Lookup(ns("m"), vec![hash(1, 0)]).encode(2, 0, &mut out);
    (&s).write_all(&out).unwrap();
    let mut body = Vec::new();
    wire::read_frame(&mut &s, &mut body).unwrap();
    assert_eq!(Response::decode(&body).unwrap().1, Response::Lookup(vec![]));
}

/// Reads what the agent says before it closes: the error code, then EOF.
fn expect_error_then_close(s: &UnixStream, code: ErrorCode) {
    let mut body = Vec::new();
    wire::read_frame(&mut &*s, &mut body).expect("an error frame");
    match Response::decode(&body).unwrap().1 {
        Response::Error { code: c, .. } => assert_eq!(c, code),
        other => panic!("expected an error, got {other:?}"),
    }
    let mut rest = Vec::new();
    (&*s).read_to_end(&mut rest).expect("EOF");
    assert!(rest.is_empty());
}

#[test]
fn bad_frames_close_only_their_own_connection() {
    let dir = socket_dir();
    let agent = Agent::start(&dir.path().join("a.sock"), &[]);
    let good = agent.client();
    save_range(&good, 5, 0..4);
    let held = good.acquire(&ns("m"), &[hash(5, 0)]).unwrap();

    // Malformed: a lookup whose count exceeds the limit.
    let s = raw_handshake(&agent.socket);
    let mut frame = Vec::new();
    Request::Lookup(ns("m"), vec![]).encode(2, 0, &mut frame);
    let at = wire::LEN_PREFIX + wire::HEADER_LEN + 16;
    frame[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    (&s).write_all(&frame).unwrap();
    expect_error_then_close(&s, ErrorCode::Malformed);

    // Unknown kind.
    let s = raw_handshake(&agent.socket);
    let mut frame = Vec::new();
    Request::Stats.encode(3, 0, &mut frame);
    frame[wire::LEN_PREFIX] = 0x6f;
    (&s).write_all(&frame).unwrap();
    expect_error_then_close(&s, ErrorCode::Malformed);

    // Oversized length prefix.
    let s = raw_handshake(&agent.socket);
    (&s).write_all(&(wire::MAX_FRAME + 1).to_le_bytes()).unwrap();
    expect_error_then_close(&s, ErrorCode::Malformed);

    // Truncated: half a frame, then the client goes away.
    let s = raw_handshake(&agent.socket);
    let mut frame = Vec::new();
    Request::Lookup(ns("m"), vec![hash(5, 0); 10]).encode(4, 0, &mut frame);
    (&s).write_all(&frame[..frame.len() / 2]).unwrap();
    drop(s);

    // Wrong version in the hello: refused before any fd is passed.
    let s = UnixStream::connect(&agent.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    Request::Hello {
        version: PROTOCOL_VERSION + 1,
        client: "future".into(),
    }
    .encode(1, 0, &mut out);
    (&s).write_all(&out).unwrap();
    expect_error_then_close(&s, ErrorCode::UnsupportedVersion);

    // Garbage instead of a hello.
    let s = UnixStream::connect(&agent.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&s).write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    expect_error_then_close(&s, ErrorCode::Malformed);

    // The good client kept its connection, its lease and its data.
    agent.wait_for("bad connections to close", |s| s["clients"] == 2);
    assert_eq!(load_and_check(&good, 5, 0..4), vec![Some(TierLevel::Host); 4]);
    good.release(&ns("m"), held.into_iter().flatten().collect())
        .unwrap();
    let (_, metrics) = agent.http_get("/metrics");
    assert!(
        metrics.contains("kvtier_request_errors_total{verb=\"frame\",reason=\"malformed\"} 3"),
        "{metrics}"
    );
}

#[test]
fn metrics_health_and_readiness() {
    let dir = socket_dir();
    let mut agent = Agent::start(&dir.path().join("a.sock"), &[]);
    let mode = std::fs::metadata(&agent.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    assert_eq!(agent.http_get("/healthz").0, 200);
    assert_eq!(agent.http_get("/readyz").0, 200);
    let client = agent.client();
    save_range(&client, 2, 0..3);
    load_and_check(&client, 2, 0..5);
    let (status, body) = agent.http_get("/metrics");
    assert_eq!(status, 200);
    for needle in [
        "kvtier_request_duration_seconds_count{verb=\"reserve\"} 1",
        "kvtier_request_duration_seconds_count{verb=\"commit\"} 1",
        "kvtier_request_duration_seconds_count{verb=\"release\"} 1",
        "kvtier_request_duration_seconds_count{verb=\"acquire\"} 1",
        "kvtier_request_blocks_total{verb=\"acquire\"} 5",
        "kvtier_tier_hits_total{tier=\"host\"} 3",
        "kvtier_tier_misses_total{tier=\"host\"} 2",
        "kvtier_tier_stores_total{tier=\"host\"} 3",
        "kvtier_tier_capacity_bytes{tier=\"host\"} 67108864",
        "kvtier_clients_connected 1",
    ] {
        assert!(body.contains(needle), "missing {needle}:\n{body}");
    }
    drop(client);
    assert!(agent.terminate().success());
}

#[test]
fn sigterm_drains_and_exits_zero_with_clients_connected() {
    let dir = socket_dir();
    let mut agent = Agent::start(&dir.path().join("a.sock"), &["--log-level", "debug"]);
    let client = agent.client();
    save_range(&client, 4, 0..2);
    let _held = client.acquire(&ns("m"), &[hash(4, 0)]).unwrap();
    let started = Instant::now();
    assert!(agent.terminate().success());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let err = client.lookup(&ns("m"), &[hash(4, 0)]).unwrap_err();
    assert!(matches!(err, ClientError::Unavailable { .. }), "{err}");
}

#[test]
fn a_second_agent_on_a_live_socket_refuses_to_start() {
    let dir = socket_dir();
    let agent = Agent::start(&dir.path().join("a.sock"), &[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvagent"))
        .args(["node", "--http-addr", "", "--host-size", "16MiB", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already listening"), "{err}");
    // And the first one is untouched.
    assert_eq!(agent.client().lookup(&ns("m"), &[hash(1, 1)]).unwrap(), vec![]);
}

#[test]
fn bad_configuration_is_refused_naming_the_key() {
    let dir = socket_dir();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "[host]\nsize = \"64MiB\"\nhugepages = \"on\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvagent"))
        .args(["node", "--print-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hugepages"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvagent"))
        .args(["node", "--print-config"])
        .env("KVTIER_DISK__QUEUE_DEPTH", "lots")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("disk.queue_depth"), "{err}");
}

#[test]
fn a_dropped_handle_is_given_back_on_the_next_call() {
    let dir = socket_dir();
    let agent = Agent::start(&dir.path().join("a.sock"), &[]);
    let (a, b) = (agent.client(), agent.client());
    let slot = a
        .reserve(&ns("m"), &[(hash(60, 0), 4096)])
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    drop(slot);
    // Until `a` calls again, the agent still holds the reservation for it.
    let busy = b.reserve(&ns("m"), &[(hash(60, 0), 4096)]).unwrap();
    assert!(matches!(busy[0], Err(SaveOutcome::Exists)));
    a.lookup(&ns("m"), &[hash(60, 0)]).unwrap();
    let free = b
        .reserve(&ns("m"), &[(hash(60, 0), 4096)])
        .unwrap()
        .pop()
        .unwrap();
    b.abort(&ns("m"), vec![free.expect("given back by a's next call")])
        .unwrap();
}

#[test]
fn handles_of_an_ended_connection_are_stale_and_never_touch_the_arena() {
    let dir = socket_dir();
    let agent = Agent::start(&dir.path().join("a.sock"), &[]);
    let client = agent.client();
    save_range(&client, 61, 0..1);
    let mut slot = client
        .reserve(&ns("m"), &[(hash(61, 1), 4096)])
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    let held = client
        .acquire(&ns("m"), &[hash(61, 0)])
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    let first = client.agent_instance();
    client.disconnect();
    // The agent gave both slots back with the connection; the handles know it.
    assert!(!slot.is_live() && !held.is_live());
    assert!(matches!(
        client.write(&mut slot, &[0; 4096]),
        Err(ClientError::StaleHandle)
    ));
    let mut buf = vec![0; held.len() as usize];
    assert!(matches!(
        client.read(&held, &mut buf),
        Err(ClientError::StaleHandle)
    ));
    // Reconnected to the same agent, the old handles still belong to the old connection.
    assert_eq!(client.lookup(&ns("m"), &[hash(61, 0)]).unwrap().len(), 1);
    assert_eq!(client.agent_instance(), first);
    assert!(matches!(
        client.commit(&ns("m"), vec![slot]),
        Err(ClientError::StaleHandle)
    ));
    client.release(&ns("m"), vec![held]).unwrap();
    // The agent ends the old connection on its own thread: once only the new one (and the
    // stats call's own) are left, nothing of the old one is held any more, and another client
    // can reserve the key.
    agent.wait_for("the old connection to end", |s| s["clients"] == 2);
    let other = agent.client();
    let again = other
        .reserve(&ns("m"), &[(hash(61, 1), 4096)])
        .unwrap()
        .pop()
        .unwrap();
    other
        .abort(&ns("m"), vec![again.expect("the stale reservation is gone")])
        .unwrap();
}

#[test]
fn the_drain_lets_a_pending_save_commit_and_reports_not_ready() {
    let dir = socket_dir();
    let mut agent = Agent::start(&dir.path().join("a.sock"), &["--log-level", "debug"]);
    let writer = agent.client();
    let idle = agent.client();
    let data = payload(62, 0);
    let mut slot = writer
        .reserve(&ns("m"), &[(hash(62, 0), data.len() as u64)])
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    agent.signal(libc::SIGTERM);
    // Not ready while draining; the HTTP server keeps answering.
    let until = Instant::now() + AGENT_WAIT;
    while agent.http_get("/readyz").0 != 503 {
        assert!(Instant::now() < until, "readyz never turned 503");
        std::thread::sleep(Duration::from_millis(10));
    }
    // New work is refused; the pending save completes.
    let err = idle.lookup(&ns("m"), &[hash(62, 0)]).unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Refused {
                code: ErrorCode::ShuttingDown,
                ..
            } | ClientError::Unavailable { .. }
        ),
        "{err}"
    );
    writer.write(&mut slot, &data).unwrap();
    assert_eq!(writer.commit(&ns("m"), vec![slot]).unwrap(), vec![true]);
    assert!(agent.wait().success(), "exits 0 once the save is committed");
}

#[test]
fn connections_beyond_max_clients_are_refused_with_a_reason() {
    let dir = socket_dir();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "max_clients = 2\n").unwrap();
    let agent = Agent::start(&dir.path().join("a.sock"), &["--config", cfg.to_str().unwrap()]);
    let (_a, _b) = (agent.client(), agent.client());
    let err = Client::connect(config(&agent.socket)).unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused { message, .. } if message.contains("too many clients")),
        "{err}"
    );
}

#[test]
fn an_oversized_batch_is_refused_by_the_client_without_losing_the_connection() {
    let dir = socket_dir();
    let agent = Agent::start(&dir.path().join("a.sock"), &[]);
    let client = agent.client();
    let held = client.acquire(&ns("m"), &[]).unwrap();
    assert!(held.is_empty());
    let too_many: Vec<_> = (0..=u64::from(wire::MAX_BATCH)).map(|i| hash(63, i)).collect();
    let err = client.lookup(&ns("m"), &too_many).unwrap_err();
    assert!(
        matches!(err, ClientError::BatchTooLarge(n) if n == too_many.len()),
        "{err}"
    );
    assert_eq!(
        agent.stats()["clients"],
        2,
        "the client's connection is still open"
    );
    assert_eq!(client.lookup(&ns("m"), &too_many[..10]).unwrap(), vec![]);
}

#[test]
fn handles_can_only_be_settled_by_the_client_that_took_them() {
    let dir = socket_dir();
    let agent = Agent::start(&dir.path().join("a.sock"), &[]);
    let (owner, other) = (agent.client(), agent.client());
    save_range(&owner, 64, 0..1);
    let held = owner.acquire(&ns("m"), &[hash(64, 0)]).unwrap();
    let err = other
        .release(&ns("m"), held.into_iter().flatten().collect())
        .unwrap_err();
    assert!(matches!(err, ClientError::ForeignHandle), "{err}");
    let slot = owner
        .reserve(&ns("m"), &[(hash(64, 1), 4096)])
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    let err = other.commit(&ns("m"), vec![slot]).unwrap_err();
    assert!(matches!(err, ClientError::ForeignHandle), "{err}");
    // The refused handles went back to their owner, who gives them back on its next call.
    owner.lookup(&ns("m"), &[hash(64, 0)]).unwrap();
    let again = other
        .reserve(&ns("m"), &[(hash(64, 1), 4096)])
        .unwrap()
        .pop()
        .unwrap();
    other
        .abort(
            &ns("m"),
            vec![again.expect("the owner's reservation was given back")],
        )
        .unwrap();
}

#[test]
fn a_full_announcement_table_is_an_error_that_never_costs_the_connection() {
    let dir = socket_dir();
    let agent = Agent::start(&dir.path().join("a.sock"), &[]);
    let client = agent.client();
    for i in 0..4096 {
        client.announce(&ns(&format!("m{i}")), "m").expect("announce");
    }
    match client.announce(&ns("one-too-many"), "m") {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, ErrorCode::LimitReached),
        other => panic!("expected LimitReached, got {other:?}"),
    }
    assert_eq!(agent.stats()["announced_namespaces"], 4096);
    // A new connection replays what the client remembered (the agent still has them all)
    // and works; the refused one was not remembered.
    client.disconnect();
    assert_eq!(save_range(&client, 3, 0..2), vec![SaveOutcome::Stored; 2]);
    assert!(
        client.announce(&ns("m0"), "m2").is_ok(),
        "a known namespace may change model"
    );
}

/// A GPU node whose driver reports no device (a stand-in libcuda from `tests/stubs`): the agent
/// starts, serves, and reports the CUDA copy engine unavailable; without libcuda at all, the
/// same.
#[test]
fn a_node_without_usable_gpus_reports_the_copy_engine_unavailable() {
    let stub = scratch();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/stubs/libcuda_stub.c");
    let out = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(stub.path().join("libcuda.so.1"))
        .arg(&src)
        .output()
        .expect("a C compiler (cc) to build the stand-in libcuda");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The driver tries libcuda.so before libcuda.so.1: both must be the stand-in.
    std::fs::copy(stub.path().join("libcuda.so.1"), stub.path().join("libcuda.so")).unwrap();
    let cuda = kvstore::device::Device {
        backend: kvstore::device::Backend::Cuda,
        index: 0,
    };
    if kvstore::device::check(cuda).is_ok() {
        eprintln!("skipped: this machine has a working CUDA driver, which the agent would find");
        return;
    }
    let empty = scratch();
    for lib_dir in [stub.path(), empty.path()] {
        let dir = socket_dir();
        let env = format!("LD_LIBRARY_PATH={}", lib_dir.display());
        let agent = Agent::start_in(&["env", &env], &dir.path().join("a.sock"), &[]);
        let client = agent.client();
        save_range(&client, 3, 0..2);
        load_and_check(&client, 3, 0..2);
        let (_, body) = agent.http_get("/metrics");
        assert!(
            body.contains("kvtier_copy_engine_available{backend=\"cpu\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("kvtier_copy_engine_available{backend=\"cuda\"} 0"),
            "{body}"
        );
    }
}

/// A completion a test opens by hand.
#[derive(Debug, Default)]
struct Gate(parking_lot::Mutex<bool>, parking_lot::Condvar);

impl kvstore::device::Completion for Gate {
    fn wait(&self) -> Result<(), kvstore::device::DeviceError> {
        let mut open = self.0.lock();
        while !*open {
            self.1.wait(&mut open);
        }
        Ok(())
    }
    fn is_done(&self) -> bool {
        *self.0.lock()
    }
}

/// A device copy through a slot holds its connection open: ending the connection (a timeout on
/// another thread, a disconnect) waits until the copy completes, so the agent never hands the
/// slot to someone else while DMA may still write it.
#[test]
fn a_connection_ends_only_after_device_copies_through_it_complete() {
    let dir = socket_dir();
    let agent = Agent::start(&dir.path().join("a.sock"), &[]);
    let client = std::sync::Arc::new(agent.client());
    let ns = ns("hold");
    let mut reserved = client.reserve(&ns, &[(hash(9, 0), 4096)]).unwrap();
    let slot = reserved.remove(0).expect("a slot");
    let gate = std::sync::Arc::new(Gate::default());
    let hold = slot.hold().expect("the connection is open");
    kvstore::device::after(kvstore::device::Fence::new(gate.clone()), Box::new(hold));
    let (tx, rx) = std::sync::mpsc::channel();
    let ending = std::sync::Arc::clone(&client);
    std::thread::spawn(move || {
        ending.disconnect();
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the connection ended while a copy through it was in flight"
    );
    *gate.0.lock() = true;
    gate.1.notify_all();
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the connection ends once the copy completed");
    assert!(!slot.is_live());
    assert!(slot.hold().is_none(), "no new copy through an ended connection");
}

//! Tests that need a second process: the arena shared across processes, and a writer killed
//! with SIGKILL in the middle of disk writes.

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;

use common::*;
use kvstore::host::Reserve;
use kvstore::{DiskTier, HostArena, IoEngineChoice, PutOutcome, TierLevel};

const MIB: u64 = 1 << 20;
/// The fd number under which the child finds the arena.
const CHILD_FD: i32 = 3;

#[test]
fn second_process_reads_and_writes_the_arena() {
    let s = host_only(8 * MIB, MIB);
    let data = payload(7, 100_000);
    assert_eq!(s.put(&key(7), &data), PutOutcome::Stored);
    let lease = s.acquire_batch(&[key(7)]).pop().flatten().expect("stored");
    let Reserve::Slot(res) = s.host().reserve(key(8), 50_000) else {
        panic!("reservation")
    };
    let arena_fd = s.host().arena().fd().as_raw_fd();
    let mut cmd = spawn_child(
        "arena_child",
        &[
            ("ARENA_LEN", s.host().arena().len().to_string()),
            ("READ_AT", format!("{}:{}", lease.offset(), lease.len())),
            ("WRITE_AT", format!("{}:{}", res.offset(), res.len())),
        ],
    );
    // SAFETY: between fork and exec only dup2 and fcntl run, both async-signal-safe; they
    // install the arena fd as CHILD_FD without CLOEXEC so the child inherits it (dup2 onto
    // itself keeps the flag, hence the explicit clear).
    unsafe {
        cmd.pre_exec(move || {
            if arena_fd != CHILD_FD && libc::dup2(arena_fd, CHILD_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::fcntl(CHILD_FD, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stderr(std::process::Stdio::piped());
    let out = cmd.output().expect("spawn child");
    assert!(
        out.status.success(),
        "child failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    s.release(lease);
    s.host().commit(res);
    let mut buf = vec![0u8; 50_000];
    let hit = s.get(&key(8), &mut buf).unwrap().expect("committed by the child");
    assert_eq!(hit.tier, TierLevel::Host);
    assert!(
        buf == payload(8, 50_000),
        "the child's write is visible to the owner"
    );
}

fn range(var: &str) -> (u64, usize) {
    let v = child_env(var);
    let (o, l) = v.split_once(':').expect("offset:len");
    (o.parse().unwrap(), l.parse().unwrap())
}

#[test]
#[ignore = "child half of second_process_reads_and_writes_the_arena"]
fn arena_child() {
    let len: u64 = child_env("ARENA_LEN").parse().unwrap();
    // SAFETY: the parent installed the arena fd as CHILD_FD before exec; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(CHILD_FD) };
    let arena = HostArena::from_fd(fd, len).expect("map the arena from the fd");
    let (ro, rl) = range("READ_AT");
    let (wo, wl) = range("WRITE_AT");
    let mut buf = vec![0u8; rl];
    // SAFETY: the parent holds a lease on the read range and a reservation on the write range,
    // so nobody else writes either while we use them.
    unsafe {
        arena.read_at(ro, &mut buf);
        assert!(buf == payload(7, rl), "child sees the parent's block");
        arena.write_at(wo, &payload(8, wl));
    }
}

#[test]
fn kill_dash_nine_during_writes_never_serves_a_torn_block() {
    let dir = scratch();
    let mut child = spawn_child(
        "crash_writer_child",
        &[("DISK_DIR", dir.path().display().to_string())],
    )
    .spawn()
    .expect("spawn writer");
    let stdout = child.stdout.take().unwrap();
    let mut committed = 0u64;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("child output");
        if let Some(n) = line.strip_prefix("committed ") {
            committed = n.trim().parse().unwrap();
            if committed >= 400 {
                break;
            }
        }
    }
    assert!(committed >= 400, "writer died early");
    // The writer is mid-batch (it never pauses): kill it without warning.
    kill(&mut child);

    let d =
        DiskTier::open(disk(dir.path(), 16 * MIB, MIB, IoEngineChoice::Auto)).expect("reopen after crash");
    let keys: Vec<_> = (0..committed + 64).map(key).collect();
    let mut served = 0;
    d.get_batch(&keys, |i, p| {
        let len = 20_000 + (i % 7) * 3000;
        assert!(p == payload(i as u64, len), "block {i} served with wrong content");
        served += 1;
    });
    assert!(served > 0, "blocks committed before the crash are served");
}

#[test]
#[ignore = "child half of kill_dash_nine_during_writes_never_serves_a_torn_block"]
fn crash_writer_child() {
    let dir = child_env("DISK_DIR");
    // Small capacity so slots are constantly reused by other blocks.
    let d = DiskTier::open(disk(dir.as_ref(), 16 * MIB, MIB, IoEngineChoice::Auto)).unwrap();
    let mut next = 0u64;
    loop {
        let ids: Vec<u64> = (next..next + 8).collect();
        let data: Vec<Vec<u8>> = ids
            .iter()
            .map(|&i| payload(i, 20_000 + (i as usize % 7) * 3000))
            .collect();
        let items: Vec<_> = ids
            .iter()
            .zip(&data)
            .map(|(&i, p)| (key(i), p.as_slice()))
            .collect();
        d.put_batch(&items);
        if next >= 64 {
            for i in next - 64..next - 56 {
                d.remove(&key(i));
            }
        }
        next += 8;
        println!("committed {next}");
    }
}

/// Installs a seccomp filter that makes `io_uring_setup` fail with ENOSYS, as container runtimes'
/// default profiles do. Runs between fork and exec.
#[cfg(target_arch = "x86_64")]
fn deny_io_uring() -> std::io::Result<()> {
    let ins = |code: u16, k: u32, jt: u8, jf: u8| libc::sock_filter { code, jt, jf, k };
    let filter = [
        // Load the syscall number (offset 0 of struct seccomp_data).
        ins((libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, 0, 0, 0),
        ins(
            (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            libc::SYS_io_uring_setup as u32,
            0,
            1,
        ),
        ins(
            (libc::BPF_RET | libc::BPF_K) as u16,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
            0,
            0,
        ),
        ins(
            (libc::BPF_RET | libc::BPF_K) as u16,
            libc::SECCOMP_RET_ALLOW,
            0,
            0,
        ),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with integer arguments, then with a pointer to a filter program that lives
    // on this stack frame for the duration of the call; both are async-signal-safe syscalls.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[test]
fn without_io_uring_the_disk_tier_falls_back_to_the_thread_pool() {
    let dir = scratch();
    let mut cmd = spawn_child(
        "uring_denied_child",
        &[("DISK_DIR", dir.path().display().to_string())],
    );
    cmd.stderr(std::process::Stdio::piped());
    // SAFETY: the hook only issues prctl system calls (async-signal-safe) in the forked child.
    unsafe { cmd.pre_exec(deny_io_uring) };
    let out = cmd.output().expect("spawn child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child failed: {}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        stderr.matches("io_uring unavailable").count(),
        1,
        "the fallback is logged exactly once: {stderr}"
    );
}

#[test]
#[ignore = "child half of without_io_uring_the_disk_tier_falls_back_to_the_thread_pool"]
fn uring_denied_child() {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let dir = child_env("DISK_DIR");
    let d = DiskTier::open(disk(dir.as_ref(), 16 * MIB, MIB, IoEngineChoice::Auto))
        .expect("open without io_uring");
    assert_eq!(d.engine_name(), "psync");
    assert!(put_blocks(&d, 50, 30_000));
    assert_eq!(read_blocks(&d, 50, 30_000), 50);
    assert!(
        DiskTier::open(disk(
            format!("{dir}/explicit").as_ref(),
            16 * MIB,
            MIB,
            IoEngineChoice::IoUring
        ))
        .is_err(),
        "asking for io_uring explicitly is an error when it is unavailable"
    );
}

//! Builds the C test program against `libkvtier` and `kvtier.h` with the system C compiler and
//! runs it against a real `kvagent node`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>`, where cargo put this test's sibling artifacts.
fn artifact_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    // target/<profile>/deps/<test>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Builds the agent binary and the shared library (a no-op when they are fresh): the test
/// harness builds neither for this crate's tests.
fn build_artifacts(dir: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "kvagent", "-p", "kvtier-ffi"]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "building kvagent and libkvtier failed");
}

#[test]
fn c_program_saves_and_loads_through_the_agent() {
    let dir = artifact_dir();
    build_artifacts(&dir);
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::Builder::new()
        .prefix("kvt-c-")
        .tempdir()
        .expect("temp dir");
    let exe = work.path().join("roundtrip");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fsanitize=address,undefined",
            "-o",
        ])
        .arg(&exe)
        .arg(crate_dir.join("tests/c/roundtrip.c"))
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg(dir.join("libkvtier.so"))
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .output()
        .expect("run the C compiler");
    assert!(
        out.status.success(),
        "{cc} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let socket = work.path().join("a.sock");
    let mut agent = Command::new(dir.join("kvagent"))
        .args(["node", "--http-addr", "", "--host-size", "64MiB", "--socket"])
        .arg(&socket)
        .env_remove("KVTIER_CONFIG")
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start kvagent");
    // The agent binds before it logs "ready"; poll for the socket to accept, bounded.
    let until = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < until, "kvagent did not start");
        assert!(agent.try_wait().expect("poll agent").is_none(), "kvagent exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let run = Command::new(&exe)
        .arg(&socket)
        .output()
        .expect("run the C program");
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        run.status.success(),
        "C checks failed:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stdout).contains("all C checks passed"));
}

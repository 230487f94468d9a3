//! The CUDA engine on machines without a GPU: no libcuda at all, a libcuda that reports no
//! device (a stand-in built from `tests/stubs/libcuda_stub.c`), and one lacking symbols. Each
//! must be a clear "unavailable", never a panic, and the CPU engine must still work.
//!
//! The library is found through `LD_LIBRARY_PATH`, which is read when a process starts, so each
//! case runs this test binary again as a child with the variable set.

use std::path::{Path, PathBuf};
use std::process::Command;

use kvstore::device::{self, Backend, Device, DeviceError};

const CHILD: &str = "DEVICE_TEST_CHILD";

fn stub_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/stubs/libcuda_stub.c")
}

/// Builds the stand-in libcuda.so.1 into a fresh directory.
fn build_stub(dir: &Path, missing_symbols: bool) -> PathBuf {
    let mut cc = Command::new("cc");
    cc.args(["-shared", "-fPIC", "-o"])
        .arg(dir.join("libcuda.so.1"))
        .arg(stub_source());
    if missing_symbols {
        cc.arg("-DKVTIER_STUB_MISSING_SYMBOLS");
    }
    let out = cc.output().expect("a C compiler (cc) to build the stub libcuda");
    assert!(
        out.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::copy(dir.join("libcuda.so.1"), dir.join("libcuda.so")).unwrap();
    dir.to_path_buf()
}

/// Runs `child_reports_the_cuda_engine` in a child with `lib_dir` first on the library path;
/// returns its output.
fn run_child(lib_dir: Option<&Path>) -> String {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "child_reports_the_cuda_engine",
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd.env(CHILD, "1");
    match lib_dir {
        Some(d) => cmd.env("LD_LIBRARY_PATH", d),
        None => cmd.env("LD_LIBRARY_PATH", "/nonexistent"),
    };
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    text
}

/// In a child: opens cuda:0 and prints what happened, then checks the CPU engine still works.
#[test]
fn child_reports_the_cuda_engine() {
    if std::env::var_os(CHILD).is_none() {
        return; // only meaningful as a child of the tests below
    }
    let cuda = Device {
        backend: Backend::Cuda,
        index: 0,
    };
    match device::open(cuda) {
        Ok(e) => println!("OPENED {}", e.describe()),
        Err(e) => println!("REFUSED {e}"),
    }
    match device::check(cuda) {
        Ok(e) => println!("CHECK ok {e}"),
        Err(e) => println!("CHECK {e}"),
    }
    let cpu = device::open(Device {
        backend: Backend::Cpu,
        index: 0,
    })
    .unwrap();
    println!("CPU {}", cpu.describe());
}

fn refused(out: &str) -> &str {
    out.lines()
        .find_map(|l| l.split_once("REFUSED ").map(|(_, why)| why))
        .unwrap_or_else(|| panic!("the child did not report a refusal:\n{out}"))
}

#[test]
fn no_libcuda_means_unavailable() {
    if std::env::var_os(CHILD).is_some() || !Backend::Cuda.is_built() {
        return;
    }
    let out = run_child(None);
    let why = refused(&out);
    if why.contains("libcuda.so.1 not found") {
        assert!(
            out.contains("CHECK cuda unavailable: libcuda.so.1 not found"),
            "{out}"
        );
    } else {
        // A machine with a real driver in the default search path.
        eprintln!("libcuda is installed system-wide here; the child said: {why}");
    }
    assert!(out.contains("CPU cpu: memcpy"), "{out}");
}

#[test]
fn a_libcuda_without_devices_means_unavailable_with_the_drivers_reason() {
    if std::env::var_os(CHILD).is_some() || !Backend::Cuda.is_built() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = run_child(Some(&build_stub(dir.path(), false)));
    assert_eq!(
        refused(&out),
        "cuda unavailable: cuInit: CUDA_ERROR_NO_DEVICE",
        "{out}"
    );
    assert!(
        out.contains("CHECK cuda unavailable: cuInit: CUDA_ERROR_NO_DEVICE"),
        "{out}"
    );
    assert!(out.contains("CPU cpu: memcpy"), "{out}");
}

#[test]
fn a_libcuda_missing_symbols_means_unavailable_not_a_panic() {
    if std::env::var_os(CHILD).is_some() || !Backend::Cuda.is_built() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = run_child(Some(&build_stub(dir.path(), true)));
    assert_eq!(
        refused(&out),
        "cuda unavailable: libcuda lacks cuDriverGetVersion (driver too old?)",
        "{out}"
    );
}

#[test]
fn a_build_without_the_backend_says_which_feature() {
    if Backend::Hip.is_built() {
        return;
    }
    let e = device::open(Device {
        backend: Backend::Hip,
        index: 0,
    })
    .unwrap_err();
    assert_eq!(e, DeviceError::NotBuilt(Backend::Hip));
    assert_eq!(
        e.to_string(),
        "hip copies are not built into this kvtier (cargo feature `hip`)"
    );
}

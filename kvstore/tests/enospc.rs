//! A disk tier on a filesystem that fills up: it stops growing, evicts, and declines — nothing
//! else fails.

mod common;

use std::process::Command;

use common::*;
use kvstore::{DiskTier, IoEngineChoice, NotStoredReason, PutOutcome};

const MIB: u64 = 1 << 20;

/// A 6 MiB tmpfs mounted for the test's lifetime.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount() -> Result<Self, String> {
        let dir = scratch();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=6m", "kvtier-enospc"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self { dir })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn full_filesystem_caps_the_tier_evicts_and_declines() {
    let fs = match SmallFs::mount() {
        Ok(fs) => fs,
        Err(why) if !strict() => {
            eprintln!("SKIPPED full_filesystem_caps_the_tier_evicts_and_declines: {why} (needs root)");
            return;
        }
        Err(why) => panic!("cannot set up a small filesystem: {why}"),
    };
    let path = fs.dir.path().join("tier");
    // Configured for 64 MiB on a 6 MiB filesystem.
    let d = DiskTier::open(disk(&path, 64 * MIB, MIB, IoEngineChoice::Auto)).unwrap();
    let len = 60_000usize;
    let mut present = Vec::new();
    for batch in (0..200u64).collect::<Vec<_>>().chunks(10) {
        let data: Vec<Vec<u8>> = batch.iter().map(|&i| payload(i, len)).collect();
        let items: Vec<_> = batch
            .iter()
            .zip(&data)
            .map(|(&i, p)| (key(i), p.as_slice()))
            .collect();
        for (&i, o) in batch.iter().zip(d.put_batch(&items)) {
            match o {
                PutOutcome::Stored => present.push(i),
                PutOutcome::NotStored(NotStoredReason::NoSpace) => {}
                other => panic!("block {i}: unexpected {other:?}"),
            }
        }
    }
    let st = d.stats();
    assert!(
        st.capacity_bytes < 6 * MIB,
        "the tier capped itself at {} bytes",
        st.capacity_bytes
    );
    assert!(st.evictions > 0, "it evicted to admit new blocks");
    assert!(
        present.len() > 150,
        "most blocks were admitted by evicting older ones"
    );
    // The newest blocks are there and intact.
    let newest: Vec<_> = (190..200).map(key).collect();
    let mut ok = 0;
    d.get_batch(&newest, |i, p| {
        assert!(p == payload(190 + i as u64, len));
        ok += 1;
    });
    assert_eq!(ok, 10);
    // With everything pinned, a new block is declined, not an error.
    for i in 0..200 {
        d.pin(&key(i));
    }
    assert_eq!(
        d.put_batch(&[(key(999), &payload(999, len)[..])]),
        vec![PutOutcome::NotStored(NotStoredReason::NoSpace)]
    );
    let blocks = d.stats().blocks;
    drop(d);
    // The tier left room for its metadata: it reopens on the full filesystem with every block.
    let d = DiskTier::open(disk(&path, 64 * MIB, MIB, IoEngineChoice::Auto)).expect("reopen when full");
    assert_eq!(d.stats().blocks, blocks);
    let mut ok = 0;
    d.get_batch(&newest, |i, p| {
        assert!(p == payload(190 + i as u64, len));
        ok += 1;
    });
    assert_eq!(ok, 10);
}

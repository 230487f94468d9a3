//! The shared host arena: one memfd-backed region that the node agent owns and engine workers map.
//!
//! Why memfd rather than a file under `/dev/shm`: the region has no name to collide on or to leak
//! after a crash, its lifetime is that of the processes holding the fd, and the fd is what the
//! local socket hands to workers (SCM_RIGHTS) anyway. A restarted agent therefore starts with an
//! empty arena and comes back warm from the disk tier, whose metadata is persistent.
//!
//! The size is sealed (`F_SEAL_SHRINK | F_SEAL_GROW`) so that no process holding the fd can
//! truncate it under the others (which would turn their accesses into SIGBUS).
//!
//! Huge pages: with [`HugePages::Auto`] the arena is first created on hugetlbfs
//! (`MFD_HUGETLB`, 2 MiB pages — fewer TLB misses and cheaper DMA registration); when no huge
//! pages are reserved on the node it falls back to normal pages, asks for transparent huge pages
//! with `madvise`, and logs once.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Once;

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};

/// Huge page policy for the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugePages {
    /// Normal pages only.
    Off,
    /// Huge pages when the node has them reserved, else normal pages.
    #[default]
    Auto,
    /// Huge pages or an error.
    Require,
}

const HUGE_PAGE: u64 = 2 << 20;

/// A shared-memory region mapped read-write into this process.
#[derive(Debug)]
pub struct HostArena {
    map: MmapRaw,
    fd: OwnedFd,
    len: u64,
    huge: bool,
}

fn last_os_error(op: &'static str) -> Error {
    Error::Arena {
        op,
        source: std::io::Error::last_os_error(),
    }
}

fn memfd(name: &str, huge: bool) -> Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(|_| Error::InvalidConfig {
        field: "arena.name",
        reason: "contains a NUL byte".into(),
    })?;
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if huge {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(last_os_error("memfd_create"));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl HostArena {
    /// Creates an arena of at least `len` bytes (rounded up to 2 MiB).
    pub fn create(name: &str, len: u64, huge_pages: HugePages) -> Result<Self> {
        if len == 0 {
            return Err(Error::InvalidConfig {
                field: "arena.size",
                reason: "must be greater than zero".into(),
            });
        }
        let len = len.div_ceil(HUGE_PAGE) * HUGE_PAGE;
        if huge_pages != HugePages::Off {
            match Self::create_with(name, len, true) {
                Ok(a) => return Ok(a),
                Err(e) if huge_pages == HugePages::Require => return Err(e),
                Err(e) => {
                    static ONCE: Once = Once::new();
                    ONCE.call_once(|| {
                        tracing::info!(error = %e, "huge pages unavailable for the host arena; using normal pages");
                    });
                }
            }
        }
        Self::create_with(name, len, false)
    }

    fn create_with(name: &str, len: u64, huge: bool) -> Result<Self> {
        let fd = memfd(name, huge)?;
        let file = File::from(fd);
        file.set_len(len).map_err(|source| Error::Arena {
            op: "ftruncate",
            source,
        })?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: plain fcntl on an fd we own; no pointers involved.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(last_os_error("seal"));
        }
        let arena = Self::map(OwnedFd::from(file), len, huge)?;
        if !huge {
            // Best effort: only effective where shmem THP is enabled.
            let _ = arena.map.advise(memmap2::Advice::HugePage);
        }
        Ok(arena)
    }

    /// Maps an arena received from its owner (e.g. over the local socket). `len` must not exceed
    /// the region's size, and the region must be size-sealed (as [`HostArena::create`] makes
    /// it): an unsealed fd could be truncated by any holder and fault every mapping.
    pub fn from_fd(fd: OwnedFd, len: u64) -> Result<Self> {
        // SAFETY: plain fcntl on an fd we own; no pointers involved.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        let needed = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        if seals < 0 || seals & needed != needed {
            return Err(Error::InvalidConfig {
                field: "arena.fd",
                reason: "the region is not size-sealed (F_SEAL_SHRINK | F_SEAL_GROW)".into(),
            });
        }
        let file = File::from(fd);
        let size = file
            .metadata()
            .map_err(|source| Error::Arena { op: "fstat", source })?
            .len();
        if len == 0 || len > size {
            return Err(Error::InvalidConfig {
                field: "arena.len",
                reason: format!("{len} bytes requested from a region of {size} bytes"),
            });
        }
        Self::map(OwnedFd::from(file), len, false)
    }

    fn map(fd: OwnedFd, len: u64, huge: bool) -> Result<Self> {
        let map_len = usize::try_from(len).map_err(|_| Error::InvalidConfig {
            field: "arena.size",
            reason: "larger than the address space".into(),
        })?;
        let map = MmapOptions::new()
            .len(map_len)
            .map_raw(&fd)
            .map_err(|source| Error::Arena { op: "mmap", source })?;
        Ok(Self { map, fd, len, huge })
    }

    /// Allocates every page of the region now (charged to this process's memory cgroup).
    pub fn preallocate(&self) -> Result<()> {
        let len = libc::off_t::try_from(self.len).map_err(|_| Error::InvalidConfig {
            field: "arena.size",
            reason: "larger than a file offset".into(),
        })?;
        // SAFETY: plain fallocate on an fd we own; no pointers involved.
        if unsafe { libc::fallocate(self.fd.as_raw_fd(), 0, 0, len) } < 0 {
            return Err(last_os_error("fallocate"));
        }
        // Maps the pages into this process too: otherwise the first write to each page still
        // takes a fault (one per 4 KiB page of every slot a pull fills), which slowed a node's
        // first pulls of 4 MiB blocks by up to half. Kernels before 5.14 lack the advice; the
        // pages are then mapped as they are touched, as before.
        // SAFETY: the range is exactly this mapping, which lives as long as `self`; populating
        // writes no bytes (the pages are the memfd's, already allocated and zeroed above).
        if unsafe { libc::madvise(self.as_ptr().cast(), self.map.len(), libc::MADV_POPULATE_WRITE) } < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(Error::Arena {
                    op: "madvise(MADV_POPULATE_WRITE)",
                    source: err,
                });
            }
        }
        Ok(())
    }

    /// Size of the mapping in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the arena has no bytes (never true for a created arena).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the region is backed by huge pages.
    pub fn huge_pages(&self) -> bool {
        self.huge
    }

    /// The memfd, to hand to another process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Base address of the mapping in this process.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    fn check(&self, offset: u64, len: usize) {
        assert!(
            offset.checked_add(len as u64).is_some_and(|end| end <= self.len),
            "arena access {offset}+{len} outside {} bytes",
            self.len
        );
    }

    /// Copies `src` into the arena at `offset`.
    ///
    /// # Safety
    /// No other thread or process may read or write `offset..offset + src.len()` during the call;
    /// the tiers guarantee this by handing out a range only to its one writer (a reservation).
    ///
    /// # Panics
    /// If the range is outside the arena.
    pub unsafe fn write_at(&self, offset: u64, src: &[u8]) {
        self.check(offset, src.len());
        // SAFETY: the range is inside the mapping (checked above) and exclusively ours for the
        // duration of the copy (caller's contract); `src` cannot overlap a range we own
        // exclusively.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.as_ptr().add(offset as usize), src.len()) };
    }

    /// Copies `dst.len()` bytes from the arena at `offset` into `dst`.
    ///
    /// # Safety
    /// No thread or process may write `offset..offset + dst.len()` during the call; the tiers
    /// guarantee this by pinning a slot while it is read.
    ///
    /// # Panics
    /// If the range is outside the arena.
    pub unsafe fn read_at(&self, offset: u64, dst: &mut [u8]) {
        self.check(offset, dst.len());
        // SAFETY: in bounds (checked above); nobody writes the range during the copy (caller's
        // contract), and `dst` is a distinct exclusive borrow.
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(offset as usize), dst.as_mut_ptr(), dst.len())
        };
    }

    /// Borrows `len` bytes at `offset` as a slice.
    ///
    /// # Safety
    /// Nobody may write the range while the slice lives (the slot must be pinned).
    ///
    /// # Panics
    /// If the range is outside the arena.
    pub unsafe fn slice(&self, offset: u64, len: usize) -> &[u8] {
        self.check(offset, len);
        // SAFETY: in bounds (checked above), and the caller guarantees no writer while the
        // borrow lives; the mapping outlives `&self`.
        unsafe { std::slice::from_raw_parts(self.as_ptr().add(offset as usize), len) }
    }

    /// Borrows `len` bytes at `offset` as a mutable slice, to receive a block straight into its
    /// slot (a socket read, a DMA target) with no intermediate buffer.
    ///
    /// # Safety
    /// Nobody else may read or write the range while the slice lives (the slot must be reserved
    /// by the caller).
    ///
    /// # Panics
    /// If the range is outside the arena.
    #[expect(
        clippy::mut_from_ref,
        reason = "exclusivity comes from the caller's reservation"
    )]
    pub unsafe fn slice_mut(&self, offset: u64, len: usize) -> &mut [u8] {
        self.check(offset, len);
        // SAFETY: in bounds (checked above); the caller holds the range exclusively while the
        // borrow lives; the mapping outlives `&self`.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr().add(offset as usize), len) }
    }
}

// SAFETY: the mapping is plain shared memory addressed through a raw pointer; all access goes
// through the unsafe methods above, whose contracts (one writer or many readers per range, as the
// tiers enforce with reservations and pins) make concurrent use from several threads sound.
unsafe impl Sync for HostArena {}
// SAFETY: nothing in the arena is tied to the creating thread; the mapping and fd may move.
unsafe impl Send for HostArena {}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn allocated_bytes(a: &HostArena) -> u64 {
        let f = File::from(a.fd.try_clone().unwrap());
        f.metadata().unwrap().blocks() * 512
    }

    /// Bytes of `a`'s mapping that this process has mapped in (its `Rss` in smaps).
    fn resident_bytes(a: &HostArena) -> u64 {
        let start = format!("{:x}-", a.as_ptr() as usize);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start)).skip(1);
        let rss = lines
            .find_map(|l| l.strip_prefix("Rss:"))
            .expect("the mapping's Rss line");
        rss.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
    }

    #[test]
    fn preallocation_allocates_and_maps_every_page_up_front() {
        let a = HostArena::create("kvtier-test", 8 << 20, HugePages::Off).unwrap();
        assert_eq!(allocated_bytes(&a), 0, "pages come as they are touched");
        assert_eq!(resident_bytes(&a), 0);
        a.preallocate().unwrap();
        assert_eq!(allocated_bytes(&a), a.len());
        assert_eq!(
            resident_bytes(&a),
            a.len(),
            "a pull's first write to a page takes no fault"
        );
    }

    #[test]
    fn create_write_read() {
        let a = HostArena::create("kvtier-test", 3 << 20, HugePages::Auto).unwrap();
        assert_eq!(a.len(), 4 << 20);
        let data: Vec<u8> = (0..8192).map(|i| i as u8).collect();
        let mut out = vec![0; 8192];
        // SAFETY: single-threaded test, nobody else touches the arena.
        unsafe {
            a.write_at(4096, &data);
            a.read_at(4096, &mut out);
        }
        assert_eq!(data, out);
    }

    #[test]
    fn huge_pages_are_used_when_reserved_and_refused_cleanly_when_not() {
        let free: u64 = std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        let required = HostArena::create("kvtier-test", 2 << 20, HugePages::Require);
        let auto = HostArena::create("kvtier-test", 2 << 20, HugePages::Auto).unwrap();
        if free == 0 {
            assert!(
                matches!(required, Err(Error::Arena { .. })),
                "no huge pages: a clear error"
            );
            assert!(!auto.huge_pages(), "no huge pages: Auto falls back");
        } else {
            assert!(required.unwrap().huge_pages());
        }
        let off = HostArena::create("kvtier-test", 2 << 20, HugePages::Off).unwrap();
        assert!(!off.huge_pages());
    }

    #[test]
    fn size_is_sealed() {
        let a = HostArena::create("kvtier-test", 2 << 20, HugePages::Off).unwrap();
        let f = File::from(a.fd().try_clone_to_owned().unwrap());
        assert!(
            f.set_len(4096).is_err(),
            "a holder of the fd must not shrink the arena"
        );
    }

    #[test]
    fn second_mapping_sees_writes() {
        let a = HostArena::create("kvtier-test", 2 << 20, HugePages::Off).unwrap();
        let b = HostArena::from_fd(a.fd().try_clone_to_owned().unwrap(), a.len()).unwrap();
        // SAFETY: single-threaded test; the two writes and the reads do not overlap in time.
        unsafe {
            a.write_at(100, b"hello");
            assert_eq!(b.slice(100, 5), b"hello");
        }
        assert!(HostArena::from_fd(a.fd().try_clone_to_owned().unwrap(), a.len() + 1).is_err());
        let unsealed = memfd("kvtier-test", false).unwrap();
        File::from(unsealed.try_clone().unwrap()).set_len(4096).unwrap();
        assert!(matches!(
            HostArena::from_fd(unsealed, 4096),
            Err(Error::InvalidConfig {
                field: "arena.fd",
                ..
            })
        ));
    }
}

//! A connection in its data phase: polled with plain non-blocking system calls, and handed to
//! tokio's reactor only while it has to sleep.
//!
//! A socket registered with the reactor wakes one of the runtime's threads on every arrival
//! (its edge-triggered readiness), even while the task that owns the socket is polling it
//! itself. On a small machine those wake-ups land on the core of the peer's sending thread
//! and doubled the time of a one-block pull; a socket registered only while a task sleeps on
//! it costs two `epoll_ctl` calls per sleep instead, and sleeps are the slow path.

use std::io::{IoSlice, IoSliceMut, Read as _, Write as _};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Longest a reader or writer keeps its runtime thread before letting other tasks (and
/// timers, such as the deadline around it) run.
const YIELD_AFTER: Duration = Duration::from_millis(1);

/// How long a writer polls a full send buffer before sleeping until the peer has read.
const WRITE_SPIN: Duration = Duration::from_micros(200);

/// A connected, non-blocking TCP stream outside tokio's reactor.
#[derive(Debug)]
pub(super) struct DataStream(TcpStream);

/// The descriptor alone, registered with the reactor for one sleep (dropping it deregisters
/// without closing).
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl DataStream {
    /// Takes a connection out of tokio's reactor (it stays non-blocking).
    pub(super) fn new(s: tokio::net::TcpStream) -> std::io::Result<Self> {
        Ok(Self(s.into_std()?))
    }

    /// Sleeps until the socket is ready for `interest`.
    async fn wait(&self, interest: Interest) -> std::io::Result<()> {
        // SAFETY: the descriptor is `self.0`'s, which stays open and unchanged while `&self` is
        // borrowed; the `AsyncFd` lives only within this call and deregisters (without closing)
        // when it is dropped at its end.
        let fd = unsafe { AsyncFd::register_with_interest(Fd(self.0.as_raw_fd()), interest) }
            .map_err(std::io::Error::from)?;
        // Registering reports readiness that is already there, so nothing is missed between
        // the last "would block" and this.
        let _ready = fd.ready(interest).await?;
        Ok(())
    }

    /// Fills `buf`, polling for up to `spin` without progress before sleeping.
    pub(super) async fn read_exact(&mut self, buf: &mut [u8], spin: Duration) -> std::io::Result<()> {
        self.read_with_next(buf, &mut [], spin).await.map(|_| ())
    }

    /// Fills `a` and reads what else has arrived into `b`; returns how many bytes of `b` were
    /// filled. Reading the next block's header with the end of this block's payload saves a
    /// system call per block.
    pub(super) async fn read_with_next(
        &mut self,
        a: &mut [u8],
        b: &mut [u8],
        spin: Duration,
    ) -> std::io::Result<usize> {
        let mut got_b = 0;
        let want = a.len();
        self.drive(want, Interest::READABLE, spin, |mut s, got_a| {
            let mut bufs = [IoSliceMut::new(&mut a[got_a..]), IoSliceMut::new(&mut b[got_b..])];
            let n = s.read_vectored(&mut bufs)?;
            got_b += n.saturating_sub(want - got_a);
            Ok(n.min(want - got_a))
        })
        .await?;
        Ok(got_b)
    }

    /// Writes all of `buf`.
    pub(super) async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.write_all_vectored(&mut [IoSlice::new(buf)]).await
    }

    /// Sends `len` bytes of `file` from `offset` with `sendfile`: the socket takes references
    /// to the file's pages instead of a copy of them. `Ok(false)`: this file cannot be sent so
    /// (nothing was sent).
    pub(super) async fn send_file(
        &mut self,
        file: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> std::io::Result<bool> {
        let mut unsupported = false;
        let sent = self
            .drive(len, Interest::WRITABLE, WRITE_SPIN, |s, done| {
                let mut at = offset + done as u64;
                match rustix::fs::sendfile(s, file, Some(&mut at), len - done) {
                    Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) if done == 0 => {
                        unsupported = true;
                        Ok(len)
                    }
                    // The file ended early: it cannot be shorter than the block it holds, so
                    // this is a broken source, not a transfer to retry.
                    Ok(0) => Err(std::io::ErrorKind::UnexpectedEof.into()),
                    r => r.map_err(Into::into),
                }
            })
            .await;
        sent.map(|()| !unsupported)
    }

    /// Drives `op` until it has moved `total` bytes: `op` reads or writes from its second
    /// argument (the bytes done so far) on and returns how many it moved. While the socket is
    /// not ready for `interest` it polls for `spin` without progress, then sleeps until it is.
    /// Returns `UnexpectedEof` (reading) or `WriteZero` (writing) when `op` moves nothing.
    async fn drive(
        &mut self,
        total: usize,
        interest: Interest,
        spin: Duration,
        mut op: impl FnMut(&TcpStream, usize) -> std::io::Result<usize>,
    ) -> std::io::Result<()> {
        let mut done = 0;
        let mut progress = Instant::now();
        let mut held_since = progress;
        while done < total {
            if held_since.elapsed() >= YIELD_AFTER {
                tokio::task::yield_now().await;
                held_since = Instant::now();
            }
            match op(&self.0, done) {
                Ok(0) if interest == Interest::READABLE => {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    done += n;
                    progress = Instant::now();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if progress.elapsed() < spin {
                        std::hint::spin_loop();
                    } else {
                        self.wait(interest).await?;
                        progress = Instant::now();
                        held_since = progress;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes every slice, with as few system calls as the kernel allows.
    pub(super) async fn write_all_vectored(&mut self, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
        let total = slices.iter().map(|s| s.len()).sum();
        let mut advanced = 0;
        self.drive(total, Interest::WRITABLE, WRITE_SPIN, |mut s, done| {
            IoSlice::advance_slices(&mut slices, done - advanced);
            advanced = done;
            s.write_vectored(slices)
        })
        .await
    }
}

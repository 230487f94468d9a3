//! Socket plumbing of the client: connecting with a deadline, sending without SIGPIPE, and
//! receiving the welcome with the arena fd.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::wire;

/// Connects to `path` within `timeout`. A Unix `connect` blocks while the listener's backlog is
/// full (an agent that stopped accepting); the send timeout, set before connecting, bounds it.
pub(super) fn connect(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let addr = SocketAddrUnix::new(path)?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    use rustix::net::sockopt::{Timeout, set_socket_timeout};
    set_socket_timeout(&fd, Timeout::Send, Some(timeout))?;
    set_socket_timeout(&fd, Timeout::Recv, Some(timeout))?;
    rustix::net::connect(&fd, &addr).map_err(|e| match e {
        rustix::io::Errno::AGAIN => {
            io::Error::new(io::ErrorKind::TimedOut, "the agent's connection queue is full")
        }
        e => e.into(),
    })?;
    Ok(UnixStream::from(fd))
}

/// Receives the welcome frame and the fd that travels with it. The agent sends both in one
/// `sendmsg`, so the fd arrives with the first bytes; the rest of the frame, if the kernel
/// split it, is read normally.
pub(super) fn recv_with_fd(stream: &UnixStream) -> io::Result<(Option<OwnedFd>, Vec<u8>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut head = [0u8; 256];
    let got = loop {
        match recvmsg(
            stream,
            &mut [io::IoSliceMut::new(&mut head)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(r) => break r.bytes,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    let mut fd = None;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            for f in fds {
                // Keep the first; any extra fd is closed on drop.
                fd.get_or_insert(f);
            }
        }
    }
    if got == 0 {
        return Err(io::ErrorKind::ConnectionReset.into());
    }
    let mut frame = head[..got].to_vec();
    while frame.len() < wire::LEN_PREFIX {
        let mut b = [0u8; wire::LEN_PREFIX];
        let n = io::Read::read(&mut &*stream, &mut b[..wire::LEN_PREFIX - frame.len()])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        frame.extend_from_slice(&b[..n]);
    }
    let prefix: [u8; wire::LEN_PREFIX] = frame[..wire::LEN_PREFIX].try_into().expect("four bytes");
    let len = wire::body_len(prefix).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let total = wire::LEN_PREFIX + len;
    if frame.len() > total {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bytes after the welcome",
        ));
    }
    let have = frame.len();
    frame.resize(total, 0);
    io::Read::read_exact(&mut &*stream, &mut frame[have..])?;
    frame.drain(..wire::LEN_PREFIX);
    Ok((fd, frame))
}

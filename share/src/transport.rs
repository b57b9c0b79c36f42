//! Sending and receiving §11's datagrams with their descriptors. Both ends
//! use these, so the framing (one datagram per message, descriptors in one
//! `SCM_RIGHTS` message) is written once.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::net::{
    self, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use crate::wire::{MAX_OBJECTS, MAX_REPLY_LEN, REQUEST_LEN};

/// A connected socket to a mount's layout service.
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let sock = net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    net::connect(&sock, &SocketAddrUnix::new(path)?)?;
    Ok(sock)
}

/// A listening socket at `path` (replacing a stale one), mode 0666.
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let sock = net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    net::bind(&sock, &SocketAddrUnix::new(path)?)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    }
    net::listen(&sock, 64)?;
    Ok(sock)
}

/// Accept one connection.
pub fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    Ok(net::accept_with(listener, SocketFlags::CLOEXEC)?)
}

/// Send one datagram with `fds` attached.
pub fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_OBJECTS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    let sent = net::sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if sent != bytes.len() {
        return Err(io::Error::other("datagram sent in part"));
    }
    Ok(())
}

/// Receive one datagram of at most `max` bytes and its descriptors (close
/// on exec). Ok(None): the peer closed the connection.
pub fn recv(sock: BorrowedFd<'_>, max: usize) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; max + 1];
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_OBJECTS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    if msg.flags.contains(net::ReturnFlags::TRUNC) || msg.flags.contains(net::ReturnFlags::CTRUNC) {
        return Err(io::Error::other("message or its descriptors truncated"));
    }
    buf.truncate(msg.bytes);
    Ok(Some((buf, fds)))
}

/// Receive a request: its bytes and the one descriptor it must carry.
pub fn recv_request(sock: BorrowedFd<'_>) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    recv(sock, REQUEST_LEN)
}

/// Receive a reply.
pub fn recv_reply(sock: BorrowedFd<'_>) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    recv(sock, MAX_REPLY_LEN)
}

/// The descriptors of `fds`, borrowed.
pub fn borrow_all<F: AsFd>(fds: &[F]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

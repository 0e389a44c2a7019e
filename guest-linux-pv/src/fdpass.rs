//! Passing file descriptors between processes over Unix sockets (`SCM_RIGHTS`): `vmctl exec`
//! hands the agent its program file and its standard streams, and PID 1 hands a Lavender
//! process's streams to the delegation server. Shared by the agent and vmctl
//! (`#[path]`-included by vmctl).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 4;

/// Sends `bytes` with `fds` attached, in one message.
pub fn send(socket: &impl AsRawFd, bytes: &[u8], fds: &[RawFd]) -> nix::Result<usize> {
    let iov = [IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(socket.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
}

/// Receives one message into `buffer`: its length and the descriptors that came with it
/// (owned from here on; more than [`MAX_FDS`] are closed by the kernel, `MSG_CTRUNC`).
pub fn receive(socket: &impl AsRawFd, buffer: &mut [u8]) -> nix::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buffer)];
    let message = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            for fd in received {
                // SAFETY: the kernel just installed `fd` in this process for this message;
                // nothing else knows it, so it is owned here.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((message.bytes, fds))
}

//! Sending and receiving file descriptors over Unix sockets (SCM_RIGHTS).

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The most descriptors one message may carry. Bounded so a receive buffer can be sized once.
pub const MAX_FDS: usize = 32;

/// Sends `data` with `fds` attached to its first byte. Returns the bytes sent, which may be
/// fewer than `data.len()` (as with `write`); the fds travel with the first call only.
pub fn send_with_fds(
    socket: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("at most {MAX_FDS} fds per message"),
        ));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other("control buffer too small"));
    }
    Ok(rustix::net::sendmsg(
        socket,
        &[IoSlice::new(data)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
}

/// Receives into `buf`, appending any descriptors that arrived to `fds` (close-on-exec).
/// Returns the bytes received; 0 means the peer closed the connection.
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if msg.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("peer sent more than {MAX_FDS} file descriptors"),
        ));
    }
    Ok(msg.bytes)
}

/// Sends all of `data`, attaching `fds` to the first byte. A call a signal interrupts is
/// repeated, as `write_all` does: an interrupted `sendmsg` sent nothing, descriptors included.
pub fn send_all_with_fds(
    socket: impl AsFd,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    let socket = socket.as_fd();
    let mut sent = 0;
    let mut fds = fds;
    while sent < data.len() {
        match send_with_fds(socket, &data[sent..], fds) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                sent += n;
                fds = &[];
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    extern "C" fn ignore(_: libc::c_int) {}

    /// Surfaced by the `vmm_messages` fuzz target: its fake VMM blocked in a send (a harness
    /// bug, since fixed) and libFuzzer's timer signal, which has no `SA_RESTART`, interrupted
    /// it; the whole send failed with EINTR instead of going on, as `write_all` would. Any
    /// such signal while a frame waits for buffer space lost the frame for nothing.
    #[test]
    fn a_send_interrupted_by_a_signal_goes_on() {
        // SAFETY: installs a handler that does nothing for SIGUSR2, which nothing else in the
        // test process uses; the sigaction struct is fully initialised (zeroed, then set).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = 0; // no SA_RESTART: the blocked sendmsg returns EINTR
            assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
        }
        let (a, mut b) = UnixStream::pair().unwrap();
        let data = vec![7u8; 4 << 20]; // far more than a socket buffer holds
        // SAFETY: pthread_self has no preconditions.
        let sender_thread = unsafe { libc::pthread_self() };
        let reader = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            for _ in 0..3 {
                // SAFETY: the sending thread is alive until this thread is joined, and the
                // handler for SIGUSR2 is installed above.
                unsafe { libc::pthread_kill(sender_thread, libc::SIGUSR2) };
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        send_all_with_fds(&a, &data, &[]).expect("a signal does not end the send");
        drop(a);
        assert_eq!(reader.join().unwrap(), data);
    }

    #[test]
    fn fds_cross_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let memfd = rustix::fs::memfd_create("x", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::io::write(&memfd, b"through").unwrap();
        send_all_with_fds(&a, b"hi", &[memfd.as_fd()]).unwrap();
        let mut buf = [0u8; 2];
        let mut fds = Vec::new();
        assert_eq!(recv_with_fds(b.as_fd(), &mut buf, &mut fds).unwrap(), 2);
        assert_eq!(fds.len(), 1);
        let mut f = std::fs::File::from(fds.pop().unwrap());
        let mut s = String::new();
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "through");
    }
}

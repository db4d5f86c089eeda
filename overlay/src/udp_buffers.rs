//! Kernel buffer sizes for the overlay's UDP sockets.
//!
//! With 40-datagram GSO batches and UDP GRO, one burst from a peer can be a few hundred KiB of
//! coalesced datagrams. The kernel's default receive buffer (`net.core.rmem_default`, 208 KiB on
//! Debian) overflows at that and drops whole coalesced batches (`RcvbufErrors` in
//! `/proc/net/snmp`), which the inner TCP sees as loss. wireguard-go and Tailscale size their
//! sockets for the same reason; shoal asks for the same 7 MiB.

use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use tracing::{debug, warn};

/// Receive and send buffer asked for each overlay UDP socket.
pub const SOCKET_BUFFER_BYTES: usize = 7 << 20;

/// The buffer sizes a socket ended up with (as the kernel reports them: twice what was set, for
/// its bookkeeping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSizes {
    pub receive: usize,
    pub send: usize,
}

/// Sizes `socket`'s buffers to [`SOCKET_BUFFER_BYTES`]. With `CAP_NET_ADMIN` (agents and the
/// controller run as root) the `*FORCE` options pass `net.core.{r,w}mem_max`; without it the
/// plain options give what the sysctl allows. Never fails: a socket with default buffers still
/// works, only slower under bursts, so a refusal is logged and the sizes are returned as they are.
pub fn size_socket_buffers(socket: &impl AsFd) -> BufferSizes {
    let fd = socket.as_fd();
    if let Err(e) = setsockopt(&fd, sockopt::RcvBufForce, &SOCKET_BUFFER_BYTES) {
        debug!(cause = %e, "SO_RCVBUFFORCE refused; asking within net.core.rmem_max");
        if let Err(e) = setsockopt(&fd, sockopt::RcvBuf, &SOCKET_BUFFER_BYTES) {
            warn!(cause = %e, "could not size the UDP receive buffer");
        }
    }
    if let Err(e) = setsockopt(&fd, sockopt::SndBufForce, &SOCKET_BUFFER_BYTES) {
        debug!(cause = %e, "SO_SNDBUFFORCE refused; asking within net.core.wmem_max");
        if let Err(e) = setsockopt(&fd, sockopt::SndBuf, &SOCKET_BUFFER_BYTES) {
            warn!(cause = %e, "could not size the UDP send buffer");
        }
    }
    let sizes = BufferSizes {
        receive: getsockopt(&fd, sockopt::RcvBuf).unwrap_or(0),
        send: getsockopt(&fd, sockopt::SndBuf).unwrap_or(0),
    };
    debug!(
        receive = sizes.receive,
        send = sizes.send,
        "overlay UDP socket buffers"
    );
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As root (the force options) the full size is granted; otherwise at least what the plain
    /// options allow, never less than the kernel default the socket started with.
    #[test]
    fn buffers_grow_to_the_asked_size_or_the_sysctl_cap() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = getsockopt(&socket.as_fd(), sockopt::RcvBuf).unwrap();
        let sizes = size_socket_buffers(&socket);
        assert!(sizes.receive >= before, "{sizes:?} < {before}");
        if nix::unistd::Uid::effective().is_root() {
            // The kernel doubles the value it was given.
            assert_eq!(sizes.receive, 2 * SOCKET_BUFFER_BYTES);
            assert_eq!(sizes.send, 2 * SOCKET_BUFFER_BYTES);
        }
    }
}

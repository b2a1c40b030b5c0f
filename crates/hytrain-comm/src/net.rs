//! Socket helpers shared by the store's server and the ring's links.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};

/// Listens on every interface, IPv6 and IPv4 where the kernel allows a dual-stack socket.
pub(crate) fn bind_any(port: u16) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let dual_stack = || -> io::Result<TcpListener> {
        let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
        // Explicitly, since net.ipv6.bindv6only=1 would otherwise shut out IPv4 peers.
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        // Every rank of a large job connects at once; a short backlog would drop some of them for a while.
        s.listen(4096)?;
        Ok(s.into())
    };
    match dual_stack() {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(e),
        // Kernels or containers without IPv6 refuse the v6 socket; plain IPv4 then.
        Err(_) => TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)),
    }
}

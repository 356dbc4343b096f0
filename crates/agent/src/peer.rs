//! Which OS user is on the other end of a local connection. The agent serves its ports on
//! loopback, so the peer socket is on this machine; on a shared host (a jump box, a dev VM, a CI
//! runner) another user could otherwise connect to 127.0.0.1:PORT and ride the session.
//!
//! On Linux the owner comes from the kernel's socket diagnostics (`NETLINK_SOCK_DIAG`, one
//! `inet_diag` request for the exact 4-tuple: a few microseconds), else from `/proc/net/tcp`
//! and `/proc/net/tcp6`. A peer socket that no process holds any more (closed before the agent
//! accepted it, or a time-wait remnant) reports no owner, and is refused like any unknown one.
//! Other systems have no such check: [`OwnerCheck::supported`] is false there and every
//! connection is served (macOS and Windows keep loopback ports open to every local user).

use std::net::SocketAddr;

/// Why the owner of a peer socket could not be found.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// Neither the kernel's socket diagnostics nor `/proc` know a live socket with that address.
    #[error(
        "no live socket from {peer} to {local} is known to the kernel (it may have closed already)"
    )]
    NotFound {
        /// The peer's address.
        peer: SocketAddr,
        /// The agent's end.
        local: SocketAddr,
    },
    /// Asking the kernel failed.
    #[error("cannot ask the kernel who owns the connection: {0}")]
    Io(#[from] std::io::Error),
    /// This system has no way to tell.
    #[error("this system cannot tell which user owns a local connection")]
    Unsupported,
}

/// Finds the OS user owning the peer socket of a local connection. Keeps one diagnostics
/// socket open between lookups, so a lookup is one request and one answer.
pub struct OwnerCheck {
    own_uid: Option<u32>,
    #[cfg(target_os = "linux")]
    diag: Option<linux::Diag>,
}

impl OwnerCheck {
    /// Whether this system can tell who owns a local connection (Linux only).
    pub const fn supported() -> bool {
        cfg!(target_os = "linux")
    }

    /// A check for the user running the agent.
    pub fn new() -> Self {
        Self {
            own_uid: own_uid(),
            #[cfg(target_os = "linux")]
            diag: None,
        }
    }

    /// The user running the agent (the owner of `/proc/self`), when the system says.
    pub fn own_uid(&self) -> Option<u32> {
        self.own_uid
    }

    /// The user owning the socket at `peer` connected to the agent's `local` address: from the
    /// kernel's socket diagnostics, else from `/proc`.
    pub fn owner(&mut self, peer: SocketAddr, local: SocketAddr) -> Result<u32, OwnerError> {
        #[cfg(target_os = "linux")]
        {
            match self.owner_by_netlink(peer, local) {
                Ok(uid) => Ok(uid),
                Err(e) => {
                    // A broken diagnostics socket is made anew next time.
                    if matches!(e, OwnerError::Io(_)) {
                        self.diag = None;
                    }
                    tracing::debug!(error = %e, "socket diagnostics failed; reading /proc");
                    linux::owner_from_proc(peer, local)
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (peer, local);
            Err(OwnerError::Unsupported)
        }
    }

    /// The owner by the kernel's socket diagnostics only.
    #[cfg(target_os = "linux")]
    pub fn owner_by_netlink(
        &mut self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<u32, OwnerError> {
        let diag = match &mut self.diag {
            Some(d) => d,
            None => self.diag.insert(linux::Diag::open()?),
        };
        diag.owner(peer, local)
    }

    /// The owner by `/proc/net/tcp` and `/proc/net/tcp6` only.
    #[cfg(target_os = "linux")]
    pub fn owner_by_proc(peer: SocketAddr, local: SocketAddr) -> Result<u32, OwnerError> {
        linux::owner_from_proc(peer, local)
    }
}

impl Default for OwnerCheck {
    fn default() -> Self {
        Self::new()
    }
}

/// The user running this process (the owner of `/proc/self`), where the system says.
#[cfg(unix)]
pub(crate) fn own_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

#[cfg(not(unix))]
pub(crate) fn own_uid() -> Option<u32> {
    None
}

#[cfg(target_os = "linux")]
mod linux {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_sock_diag::{
        SockDiagMessage,
        constants::{AF_INET, AF_INET6, IPPROTO_TCP},
        inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    };
    use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

    use super::OwnerError;

    /// "Any socket": the kernel checks a cookie in the request unless it is all ones.
    const NO_COOKIE: [u8; 8] = [0xff; 8];

    /// TCP_TIME_WAIT in `/proc/net/tcp`'s state column.
    const TIME_WAIT: u8 = 6;

    pub(super) struct Diag {
        socket: Socket,
        buf: Vec<u8>,
        seq: u32,
    }

    impl Diag {
        pub(super) fn open() -> std::io::Result<Self> {
            let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
            socket.bind_auto()?;
            socket.connect(&NetlinkAddr::new(0, 0))?;
            // The kernel answers a diagnostics request while it is being sent, so the answer is
            // queued when `send` returns; a non-blocking read never waits.
            socket.set_non_blocking(true)?;
            Ok(Self {
                socket,
                buf: Vec::with_capacity(8192),
                seq: 0,
            })
        }

        pub(super) fn owner(
            &mut self,
            peer: SocketAddr,
            local: SocketAddr,
        ) -> Result<u32, OwnerError> {
            // Both ends of a loopback connection have the same family; a v6 socket talking to
            // a v4 address is hashed under its v4 addresses and found by this request too.
            let (peer, local) = (canonical(peer), canonical(local));
            let family = if peer.is_ipv4() { AF_INET } else { AF_INET6 };
            self.seq = self.seq.wrapping_add(1);
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST;
            header.sequence_number = self.seq;
            let mut request = NetlinkMessage::new(
                header,
                SockDiagMessage::InetRequest(InetRequest {
                    family,
                    protocol: IPPROTO_TCP,
                    extensions: ExtensionFlags::empty(),
                    states: StateFlags::all(),
                    // The peer's socket: its own address is the peer, its remote is our end.
                    socket_id: SocketId {
                        source_port: peer.port(),
                        destination_port: local.port(),
                        source_address: peer.ip(),
                        destination_address: local.ip(),
                        interface_id: 0,
                        cookie: NO_COOKIE,
                    },
                })
                .into(),
            );
            request.finalize();
            let mut out = vec![0u8; request.buffer_len()];
            request.serialize(&mut out);
            self.socket.send(&out, 0)?;
            // An answer to an earlier lookup that failed half-way may come first: skip it.
            for _ in 0..4 {
                self.buf.clear();
                self.socket.recv(&mut self.buf, 0)?;
                let answer =
                    NetlinkMessage::<SockDiagMessage>::deserialize(&self.buf).map_err(|e| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
                    })?;
                if answer.header.sequence_number != self.seq {
                    continue;
                }
                return match answer.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        // A socket no process holds (orphaned, time-wait) has no inode and
                        // reports uid 0 whoever opened it: its owner is unknown.
                        if r.header.inode == 0 {
                            Err(OwnerError::NotFound { peer, local })
                        } else {
                            Ok(r.header.uid)
                        }
                    }
                    NetlinkPayload::Error(e) if e.raw_code().abs() == ENOENT => {
                        Err(OwnerError::NotFound { peer, local })
                    }
                    NetlinkPayload::Error(e) => Err(OwnerError::Io(e.to_io())),
                    other => Err(OwnerError::Io(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("unexpected socket diagnostics answer: {other:?}"),
                    ))),
                };
            }
            Err(OwnerError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "no socket diagnostics answer to this request",
            )))
        }
    }

    /// The kernel's answer for a 4-tuple it does not know.
    const ENOENT: i32 = 2;
    /// A v4-mapped IPv6 address as the IPv4 address it stands for.
    fn canonical(a: SocketAddr) -> SocketAddr {
        match a.ip() {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
                None => a,
            },
            IpAddr::V4(_) => a,
        }
    }

    /// The owner from `/proc/net/tcp` and `/proc/net/tcp6` (a v6 socket talking to a v4
    /// address shows there with v4-mapped addresses).
    pub(super) fn owner_from_proc(peer: SocketAddr, local: SocketAddr) -> Result<u32, OwnerError> {
        let (peer, local) = (canonical(peer), canonical(local));
        let files: &[&str] = if peer.is_ipv4() {
            &["/proc/net/tcp", "/proc/net/tcp6"]
        } else {
            &["/proc/net/tcp6"]
        };
        for file in files {
            let text = std::fs::read_to_string(file)?;
            if let Some(uid) = find_owner(&text, peer, local) {
                return uid.ok_or(OwnerError::NotFound { peer, local });
            }
        }
        Err(OwnerError::NotFound { peer, local })
    }

    /// The uid of the line for the socket at `peer` connected to `local`: `Some(None)` when
    /// the socket is there but no process holds it.
    pub(super) fn find_owner(
        text: &str,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Option<Option<u32>> {
        for line in text.lines().skip(1) {
            let mut f = line.split_whitespace();
            let (Some(_sl), Some(own), Some(rem), Some(state)) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            if parse_addr(own).map(canonical) != Some(peer)
                || parse_addr(rem).map(canonical) != Some(local)
            {
                continue;
            }
            // tx_queue:rx_queue, tr:tm->when, retrnsmt, uid, timeout, inode
            let rest: Vec<&str> = f.collect();
            let (Some(uid), Some(inode)) = (rest.get(3), rest.get(5)) else {
                return Some(None);
            };
            let state = u8::from_str_radix(state, 16).unwrap_or(TIME_WAIT);
            if state == TIME_WAIT || *inode == "0" {
                return Some(None);
            }
            return Some(uid.parse().ok());
        }
        None
    }

    /// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), each 32-bit word as the
    /// kernel holds it in memory (so in this machine's byte order).
    fn parse_addr(s: &str) -> Option<SocketAddr> {
        let (ip, port) = s.split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        let word = |i: usize| -> Option<[u8; 4]> {
            Some(
                u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16)
                    .ok()?
                    .to_ne_bytes(),
            )
        };
        let ip = match ip.len() {
            8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
            32 => {
                let mut b = [0u8; 16];
                for i in 0..4 {
                    b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
                }
                IpAddr::V6(Ipv6Addr::from(b))
            }
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn proc_lines_are_read_in_this_machines_byte_order() {
            let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
            let le = cfg!(target_endian = "little");
            let (peer, local) = if le {
                ("0100007F:A000", "0100007F:1F91")
            } else {
                ("7F000001:A000", "7F000001:1F91")
            };
            let text = format!(
                "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                 0: {local} {peer} 01 00000000:00000000 00:00000000 00000000  1000        0 111 1 0 20 4 30 10 -1\n\
                 1: {peer} {local} 01 00000000:00000000 00:00000000 00000000  1001        0 222 1 0 20 4 30 10 -1\n\
                 2: {peer} 0100007F:0050 06 00000000:00000000 03:00000000 00000000     0        0 0 3\n"
            );
            // The line for the peer's socket, not the agent's own end of the connection.
            assert_eq!(
                find_owner(&text, a("127.0.0.1:40960"), a("127.0.0.1:8081")),
                Some(Some(1001))
            );
            assert_eq!(
                find_owner(&text, a("127.0.0.1:40961"), a("127.0.0.1:8081")),
                None
            );
            if le {
                // A time-wait remnant has no owner.
                assert_eq!(
                    find_owner(&text, a("127.0.0.1:40960"), a("127.0.0.1:80")),
                    Some(None)
                );
            }
            let v6 = "  sl  local_address                         remote_address                        st\n\
                 0: 0000000000000000FFFF00000100007F:A000 0000000000000000FFFF00000100007F:1F91 01 00000000:00000000 00:00000000 00000000  1002        0 333 1\n";
            if le {
                assert_eq!(
                    find_owner(v6, a("127.0.0.1:40960"), a("127.0.0.1:8081")),
                    Some(Some(1002))
                );
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// A loopback connection this test makes: the owner of the connecting end is this process's
    /// user, by either way of asking.
    #[test]
    fn the_owner_of_a_loopback_connection_made_here_is_this_user() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, peer) = listener.accept().expect("accept");
        let local = server.local_addr().expect("local");
        assert_eq!(peer, client.local_addr().expect("client addr"));

        let mut check = OwnerCheck::new();
        let me = check.own_uid().expect("own uid");
        assert_eq!(check.owner(peer, local).expect("owner"), me);
        assert_eq!(check.owner_by_netlink(peer, local).expect("netlink"), me);
        // The socket is kept: a second lookup on it works too.
        assert_eq!(
            check.owner_by_netlink(peer, local).expect("netlink again"),
            me
        );
        assert_eq!(OwnerCheck::owner_by_proc(peer, local).expect("proc"), me);

        // An address nobody holds has no owner.
        let gone = SocketAddr::from(([127, 0, 0, 1], 1));
        assert!(matches!(
            check.owner(gone, local),
            Err(OwnerError::NotFound { .. })
        ));
        drop(client);
    }
}

//! A delay relay for `scripts/bench`'s network profile. The kernel the benchmark runs on may
//! have no netem, so a round-trip time is made in userspace instead: a relay sits on each path
//! between the client's side and the server's side (QUIC's UDP, the carrier's TCP, ssh's TCP,
//! the direct TCP) and holds everything for the same one-way delay in each direction.
//!
//! What it models, and what it does not:
//! - **UDP** (QUIC): every batch the kernel hands over (one datagram, or several of one flow
//!   coalesced by GRO) is stamped on arrival and sent on at arrival + delay, in order, from a
//!   queue: a late datagram never waits for an earlier one's delay, and each keeps its own time
//!   (a sending thread per direction, sleeping to the microsecond). Nothing is dropped and the
//!   queue has no bound of its own, so QUIC sees delay, never loss; what is in it is bounded by
//!   QUIC's windows. The sockets ask for 8 MiB buffers so the kernel does not drop either
//!   (it grants at most `net.core.rmem_max`).
//! - **TCP** (the carrier, ssh, direct): a TCP relay splits the connection in two loopback
//!   connections, which would hide the round trip from both ends' TCP. So the relay plays the
//!   path's TCP itself: the far side's connection is opened one delay after the near side's
//!   (the SYN's trip), the client's bytes leave no earlier than one round trip after it
//!   connected (its SYN-ACK), each chunk read is delivered one delay later, and the bytes a
//!   direction holds are limited to `window`, freed one delay after they were delivered (the
//!   ACK's trip back). A direction therefore moves at most `window` per round trip, as a TCP
//!   connection with that receive window does, and the window is also all the relay ever
//!   buffers per direction: the bottleneck queue, if anything upstream of it is slower. The
//!   default is what this kernel lets a TCP receive buffer grow to (the last field of
//!   `net.ipv4.tcp_rmem`). Not modelled: slow start (the window is open from the first byte)
//!   and loss. The loopback sockets' own buffers come on top, as a host's socket buffers do.
//!
//! TCP's timers tick in milliseconds, so its delays are rounded up to the next millisecond and
//! the chunks due in one tick leave together, into a socket buffer that absorbs them.

use std::{
    collections::HashMap,
    io::IoSliceMut,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Semaphore, mpsc},
    time::Instant,
};

/// `touchgate-bench relay`: what to relay, from where to where, with which delay.
#[derive(clap::Args)]
pub struct Relay {
    /// Relay UDP datagrams (QUIC).
    #[arg(long, required_unless_present = "tcp")]
    udp: bool,
    /// Relay TCP connections. With --udp too, both listen on the same port, as the gateway
    /// serves QUIC and the carrier on one.
    #[arg(long)]
    tcp: bool,
    /// Where to listen.
    #[arg(long)]
    listen: SocketAddr,
    /// Where to relay to.
    #[arg(long)]
    to: SocketAddr,
    /// The delay added in each direction (half the round-trip time), e.g. 15ms.
    #[arg(long, value_parser = humantime::parse_duration)]
    delay: Duration,
    /// TCP: bytes a direction may have on the way before one round trip frees them (the path's
    /// receive window). Default: the largest receive buffer of this kernel's TCP.
    #[arg(long)]
    window: Option<usize>,
}

/// Runs the relay until killed; prints one JSON line with its settings once it listens.
pub async fn relay(args: &Relay) -> anyhow::Result<()> {
    let window = match args.window {
        Some(w) => w,
        None => kernel_tcp_window(),
    }
    .max(CHUNK);
    let tcp = match args.tcp {
        true => Some(
            TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("cannot listen on tcp/{}", args.listen))?,
        ),
        false => None,
    };
    let udp = match args.udp {
        true => Some(
            UdpSocket::bind(args.listen)
                .await
                .with_context(|| format!("cannot listen on udp/{}", args.listen))?,
        ),
        false => None,
    };
    println!(
        "{}",
        serde_json::json!({
            "listen": args.listen.to_string(),
            "to": args.to.to_string(),
            "delay_ms": args.delay.as_secs_f64() * 1000.0,
            "tcp_window_bytes": args.tcp.then_some(window),
        })
    );
    let (to, delay) = (args.to, args.delay);
    let tcp = async move {
        match tcp {
            Some(l) => tcp_relay(l, to, delay, window).await,
            None => std::future::pending().await,
        }
    };
    let udp = async move {
        match udp {
            Some(s) => udp_relay(s, to, delay).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = tcp => r,
        r = udp => r,
    }
}

/// The most a TCP direction reads at once: small enough that the window is freed in steps
/// near a segment's, large enough to move gigabits with few wake-ups.
const CHUNK: usize = 64 * 1024;

/// What a UDP socket of the relay asks the kernel for, on both sides: enough for a QUIC burst
/// while the relay is busy elsewhere.
const UDP_BUFFER: usize = 8 * 1024 * 1024;

/// The last field of `net.ipv4.tcp_rmem` (Linux), else Linux's default of 6 MiB.
fn kernel_tcp_window() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(6 * 1024 * 1024)
}

/// One received batch of datagrams, to be sent on at `at`: one datagram, or several of
/// `stride` bytes each (the last may be shorter).
struct Batch {
    at: std::time::Instant,
    data: Bytes,
    stride: usize,
}

/// A UDP socket and quinn's state for it (GRO on receive, GSO on send).
struct Udp {
    socket: UdpSocket,
    state: UdpSocketState,
}

impl Udp {
    fn new(socket: UdpSocket) -> anyhow::Result<Arc<Self>> {
        let state = UdpSocketState::new((&socket).into())?;
        // Best effort: the kernel caps both at its maxima.
        let _ = state.set_recv_buffer_size((&socket).into(), UDP_BUFFER);
        let _ = state.set_send_buffer_size((&socket).into(), UDP_BUFFER);
        Ok(Arc::new(Self { socket, state }))
    }

    /// Receives batches and hands each, stamped, to `deliver` (by source address); ends when
    /// the socket fails.
    async fn receive(&self, delay: Duration, mut deliver: impl FnMut(SocketAddr, Batch)) {
        let mut storage = vec![[0u8; 65536]; quinn::udp::BATCH_SIZE];
        let mut meta = vec![RecvMeta::default(); quinn::udp::BATCH_SIZE];
        loop {
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let got = self
                .socket
                .async_io(tokio::io::Interest::READABLE, || {
                    self.state.recv((&self.socket).into(), &mut bufs, &mut meta)
                })
                .await;
            let at = std::time::Instant::now() + delay;
            let n = match got {
                Ok(n) => n,
                // An ICMP error for an earlier send (the far side not listening yet) is not
                // the relay's to act on.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(_) => return,
            };
            for (m, b) in meta.iter().zip(&bufs).take(n) {
                let data = Bytes::copy_from_slice(&b[..m.len]);
                let stride = if m.stride == 0 { m.len } else { m.stride };
                deliver(m.addr, Batch { at, data, stride });
            }
        }
    }

    /// Sends each batch to `to` at its time, in order, until `queue` closes. A thread of its
    /// own, not a task: tokio's timers tick in milliseconds, so every datagram due within one
    /// tick would leave in one burst, several times the burst the sender made, and overflow
    /// the receiver's socket buffer (a loss no real path would have caused). A thread's sleep
    /// keeps each batch's own time, to tens of microseconds.
    fn send(self: Arc<Self>, to: SocketAddr, mut queue: mpsc::UnboundedReceiver<Batch>) {
        std::thread::spawn(move || {
            while let Some(b) = queue.blocking_recv() {
                let wait = b.at.saturating_duration_since(std::time::Instant::now());
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
                // GSO sends at most so many datagrams at once; without it, one at a time.
                let per_send = b.stride * self.state.max_gso_segments().max(1);
                for part in b.data.chunks(per_send) {
                    let t = Transmit {
                        destination: to,
                        ecn: None,
                        contents: part,
                        segment_size: (part.len() > b.stride).then_some(b.stride),
                        src_ip: None,
                    };
                    // A full send buffer: wait for it to drain rather than drop.
                    while let Err(e) = self.state.send((&self.socket).into(), &t) {
                        if e.kind() != std::io::ErrorKind::WouldBlock {
                            break;
                        }
                        std::thread::sleep(Duration::from_micros(20));
                    }
                }
            }
        });
    }
}

/// Relays datagrams between clients of `front` and `to`, each client from a socket of its own
/// so that answers find their way back.
async fn udp_relay(front: UdpSocket, to: SocketAddr, delay: Duration) -> anyhow::Result<()> {
    let front = Udp::new(front)?;
    let mut clients: HashMap<SocketAddr, mpsc::UnboundedSender<Batch>> = HashMap::new();
    let mut failed = None;
    front
        .receive(delay, |from, batch| {
            let tx = match clients.get(&from) {
                Some(tx) => tx.clone(),
                None => match udp_client(&front, from, to, delay) {
                    Ok(tx) => {
                        clients.insert(from, tx.clone());
                        tx
                    }
                    Err(e) => {
                        failed.get_or_insert(e);
                        return;
                    }
                },
            };
            let _ = tx.send(batch);
        })
        .await;
    Err(failed.unwrap_or_else(|| anyhow::anyhow!("the UDP socket failed")))
}

/// A socket towards `to` for the client at `from`: returns where that client's datagrams go,
/// and sends what comes back to the client through `front`.
fn udp_client(
    front: &Arc<Udp>,
    from: SocketAddr,
    to: SocketAddr,
    delay: Duration,
) -> anyhow::Result<mpsc::UnboundedSender<Batch>> {
    let any = match to {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.set_nonblocking(true)?;
    let back = Udp::new(UdpSocket::from_std(socket)?)?;
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    back.clone().send(to, out_rx);
    let b = back.clone();
    tokio::spawn(async move {
        b.receive(delay, |src, batch| {
            if src == to {
                let _ = in_tx.send(batch);
            }
        })
        .await;
    });
    front.clone().send(from, in_rx);
    Ok(out_tx)
}

/// Relays every connection accepted on `listener` to `to`.
async fn tcp_relay(
    listener: TcpListener,
    to: SocketAddr,
    delay: Duration,
    window: usize,
) -> anyhow::Result<()> {
    loop {
        let (near, _) = listener.accept().await?;
        let connected = Instant::now();
        tokio::spawn(async move {
            // The SYN's trip: the far side sees the connection one delay later.
            tokio::time::sleep_until(connected + delay).await;
            let Ok(far) = TcpStream::connect(to).await else {
                // Dropping `near` closes it, as a refused connection would end.
                return;
            };
            let _ = near.set_nodelay(true);
            let _ = far.set_nodelay(true);
            let (near_r, near_w) = near.into_split();
            let (far_r, far_w) = far.into_split();
            // The client's first bytes could not leave before its SYN-ACK came back.
            direction(near_r, far_w, delay, window, connected + 2 * delay);
            direction(far_r, near_w, delay, window, connected + delay);
        });
    }
}

/// One direction of a relayed connection: a reader that stamps chunks while the window has
/// room, a writer that delivers each at its time, and the ACKs that free the window one delay
/// after delivery.
fn direction(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    window: usize,
    not_before: Instant,
) {
    let room = Arc::new(Semaphore::new(window));
    // Unbounded in type; bounded by `room` in bytes.
    let (chunks_tx, mut chunks) = mpsc::unbounded_channel::<(Instant, Bytes)>();
    let (acks_tx, mut acks) = mpsc::unbounded_channel::<(Instant, usize)>();
    let r = room.clone();
    tokio::spawn(async move {
        loop {
            let Ok(permit) = r.acquire_many(CHUNK as u32).await else {
                return;
            };
            let mut buf = BytesMut::with_capacity(CHUNK);
            // A reset ends the direction as an orderly close would: the benchmark's clients
            // do not tell the two apart.
            let n: usize = from.read_buf(&mut buf).await.unwrap_or_default();
            permit.forget();
            r.add_permits(CHUNK - n);
            let at = Instant::now().max(not_before) + delay;
            // An empty chunk is the FIN.
            if chunks_tx.send((at, buf.freeze())).is_err() || n == 0 {
                return;
            }
        }
    });
    let r = room.clone();
    tokio::spawn(async move {
        while let Some((at, n)) = acks.recv().await {
            tokio::time::sleep_until(at).await;
            r.add_permits(n);
        }
    });
    tokio::spawn(async move {
        while let Some((at, chunk)) = chunks.recv().await {
            tokio::time::sleep_until(at).await;
            if chunk.is_empty() {
                let _ = to.shutdown().await;
                return;
            }
            if to.write_all(&chunk).await.is_err() {
                // The reader stops at its next chunk.
                room.close();
                return;
            }
            let _ = acks_tx.send((Instant::now() + delay, chunk.len()));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn relay_to(to: SocketAddr, delay: Duration, udp: bool) -> SocketAddr {
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        if udp {
            let s = UdpSocket::bind(listen).await.expect("bind");
            let addr = s.local_addr().expect("addr");
            tokio::spawn(async move { udp_relay(s, to, delay).await });
            addr
        } else {
            let l = TcpListener::bind(listen).await.expect("bind");
            let addr = l.local_addr().expect("addr");
            tokio::spawn(async move { tcp_relay(l, to, delay, 1 << 20).await });
            addr
        }
    }

    #[tokio::test]
    async fn udp_datagrams_come_back_in_order_after_a_round_trip() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let echo_addr = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        let relay = relay_to(echo_addr, Duration::from_millis(20), true).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");

        let started = Instant::now();
        for i in 0u16..200 {
            client.send_to(&i.to_be_bytes(), relay).await.expect("send");
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while got.len() < 200 {
            let (n, _) = client.recv_from(&mut buf).await.expect("recv");
            assert_eq!(n, 2);
            got.push(u16::from_be_bytes([buf[0], buf[1]]));
        }

        assert!(started.elapsed() >= Duration::from_millis(40));
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_eq!(got, (0..200).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn tcp_first_answer_takes_two_round_trips_and_bytes_arrive_whole() {
        let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server_addr = server.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.expect("accept");
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = s.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).await.expect("write");
            }
        });
        let relay = relay_to(server_addr, Duration::from_millis(20), false).await;

        let started = Instant::now();
        let mut c = TcpStream::connect(relay).await.expect("connect");
        c.write_all(b"x").await.expect("write");
        let mut one = [0u8; 1];
        c.read_exact(&mut one).await.expect("read");
        let first = started.elapsed();
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = c.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.expect("write");
            w.shutdown().await.expect("shutdown");
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.expect("read");
        writer.await.expect("writer");

        // Handshake, then the byte there and back: four one-way delays.
        assert!(first >= Duration::from_millis(80), "{first:?}");
        assert!(first < Duration::from_millis(400), "{first:?}");
        assert_eq!(back, data);
    }

    #[tokio::test]
    async fn tcp_direction_moves_about_a_window_per_round_trip() {
        let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server_addr = server.local_addr().expect("addr");
        let (done_tx, done) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.expect("accept");
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
            let _ = done_tx.send((Instant::now(), sink.len()));
        });
        // A 1 MiB window (`relay_to`) and a 20 ms round trip: about 50 MiB/s.
        let relay = relay_to(server_addr, Duration::from_millis(10), false).await;
        let mut c = TcpStream::connect(relay).await.expect("connect");
        let data = vec![7u8; 10 << 20];

        let started = Instant::now();
        c.write_all(&data).await.expect("write");
        c.shutdown().await.expect("shutdown");
        let (finished, len) = done.await.expect("server");
        let took = finished - started;

        // 10 MiB is ten windows: at least nine round trips after the first delivery, and not
        // much more, or the relay would be a rate limit rather than a window.
        assert_eq!(len, data.len());
        assert!(took >= Duration::from_millis(180), "{took:?}");
        assert!(took < Duration::from_millis(600), "{took:?}");
    }
}

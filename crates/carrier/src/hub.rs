//! A [`quinn::AsyncUdpSocket`] over WebSocket connections.

use std::{
    collections::HashMap,
    fmt,
    io::{self, IoSliceMut},
    net::{Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use quinn::udp::{RecvMeta, Transmit};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::mpsc,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};

use crate::{MAX_DATAGRAM, MIN_DATAGRAM};

/// What one carrier may send and how long it may stay silent.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A carrier with no message for this long is closed (QUIC's keep-alives keep a live one
    /// busy).
    pub idle: Duration,
    /// Messages a carrier may send per second, on average over a second; a flood beyond it
    /// closes the carrier.
    pub messages_per_second: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(60),
            // Bulk transfers at the carrier's datagram size stay far below this; tiny messages
            // at this rate are only abuse.
            messages_per_second: 50_000,
        }
    }
}

/// How a carrier ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The other side closed it, or the connection ended.
    Closed,
    /// Nothing came for [`Limits::idle`].
    Idle,
    /// The other side broke the carrier's rules (a text message, a message too small or too
    /// large, a flood, a broken WebSocket): what it did.
    Refused(String),
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Closed => f.write_str("closed"),
            Ended::Idle => f.write_str("idle"),
            Ended::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

/// Datagrams waiting for QUIC, from every carrier; more are dropped, as a full socket buffer
/// drops them (QUIC takes it as loss).
const INBOUND_QUEUE: usize = 8192;
/// Of [`INBOUND_QUEUE`], what one carrier may fill: one busy (or hostile) carrier cannot make
/// QUIC drop every other carrier's datagrams.
const INBOUND_PER_CARRIER: usize = 256;
/// How long one write to a carrier may wait for its peer to take it: a peer that stops
/// reading is ended instead of holding the carrier (and its memory) forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A datagram waiting for QUIC: where it came from, and its carrier's count of datagrams
/// waiting.
type Inbound = (SocketAddr, Bytes, Arc<AtomicUsize>);
/// Datagrams waiting to go out on one carrier.
const OUTBOUND_QUEUE: usize = 1024;

/// A socket whose peers are WebSocket connections, each known to QUIC by an address the hub
/// makes for it (in `fd74:6763::/32`, never routed).
pub struct Hub {
    local: SocketAddr,
    inbound: Mutex<mpsc::Receiver<Inbound>>,
    inbound_tx: mpsc::Sender<Inbound>,
    peers: RwLock<HashMap<SocketAddr, mpsc::Sender<Bytes>>>,
    next: AtomicU64,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub").field("local", &self.local).finish()
    }
}

/// Whether `addr` is one a hub makes for its carriers (in `fd74:6763::/32`).
pub fn is_carrier_addr(addr: SocketAddr) -> bool {
    matches!(addr.ip(), std::net::IpAddr::V6(ip) if ip.segments()[..2] == [0xfd74, 0x6763])
}

/// The address the hub gives its `n`th carrier.
fn carrier_addr(n: u64) -> SocketAddr {
    let [a, b, c, d] = [
        (n >> 48) as u16,
        (n >> 32) as u16,
        (n >> 16) as u16,
        n as u16,
    ];
    SocketAddr::new(Ipv6Addr::new(0xfd74, 0x6763, 0, 0, a, b, c, d).into(), 443)
}

impl Hub {
    /// A hub with no carrier yet. It says it is at `[fd74:6763::]:443` (QUIC wants a local
    /// address of the family of its peers').
    pub fn new() -> Arc<Self> {
        let local = carrier_addr(0);
        let (inbound_tx, inbound) = mpsc::channel(INBOUND_QUEUE);
        Arc::new(Self {
            local,
            inbound: Mutex::new(inbound),
            inbound_tx,
            peers: RwLock::default(),
            next: AtomicU64::new(1),
        })
    }

    /// Attaches a carrier: its datagrams reach QUIC from the returned address, and what QUIC
    /// sends to that address goes out on it. The second value ends with the carrier, saying
    /// how.
    pub fn attach<S>(
        self: &Arc<Self>,
        ws: WebSocketStream<S>,
        limits: Limits,
    ) -> (SocketAddr, impl Future<Output = Ended> + Send + 'static)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let addr = carrier_addr(self.next.fetch_add(1, Relaxed));
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        self.peers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, tx);
        let hub = self.clone();
        let run = async move {
            let ended = pump(ws, addr, hub.inbound_tx.clone(), rx, limits).await;
            hub.peers
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&addr);
            ended
        };
        (addr, run)
    }

    /// How many carriers are attached.
    pub fn carriers(&self) -> usize {
        self.peers.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Moves datagrams between one WebSocket and the hub until either side ends.
async fn pump<S>(
    ws: WebSocketStream<S>,
    addr: SocketAddr,
    inbound: mpsc::Sender<Inbound>,
    mut outbound: mpsc::Receiver<Bytes>,
    limits: Limits,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let mut window = tokio::time::Instant::now();
    let mut in_window = 0u32;
    // Only datagrams keep a carrier alive; WebSocket pings and pongs do not.
    let mut idle_at = tokio::time::Instant::now() + limits.idle;
    let waiting = Arc::new(AtomicUsize::new(0));
    let ended = loop {
        tokio::select! {
            next = tokio::time::timeout_at(idle_at, stream.next()) => {
                let msg = match next {
                    Err(_) => break Ended::Idle,
                    Ok(None) => break Ended::Closed,
                    Ok(Some(Err(e))) => break refused_by_library(e),
                    Ok(Some(Ok(m))) => m,
                };
                // Every message counts against the rate, control frames included (each ping
                // costs a pong).
                let now = tokio::time::Instant::now();
                if now.duration_since(window) >= Duration::from_secs(1) {
                    (window, in_window) = (now, 0);
                }
                in_window += 1;
                if in_window > limits.messages_per_second {
                    break Ended::Refused(format!(
                        "more than {} messages in a second",
                        limits.messages_per_second
                    ));
                }
                let data = match msg {
                    Message::Binary(b) => b,
                    Message::Close(_) => break Ended::Closed,
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                    Message::Text(_) => break Ended::Refused("a text message".into()),
                };
                if data.len() < MIN_DATAGRAM {
                    break Ended::Refused(format!(
                        "a {}-byte message: too small for a QUIC packet",
                        data.len()
                    ));
                }
                idle_at = now + limits.idle;
                // A full queue (or this carrier's share of it) drops the datagram, as a full
                // socket buffer would.
                if waiting.load(Relaxed) < INBOUND_PER_CARRIER
                    && inbound.try_send((addr, data, waiting.clone())).is_ok()
                {
                    waiting.fetch_add(1, Relaxed);
                }
            }
            out = outbound.recv() => {
                let Some(first) = out else { break Ended::Closed };
                let write = async {
                    sink.feed(Message::Binary(first)).await?;
                    // Whatever else is queued goes in the same flush (fewer TLS records).
                    while let Ok(more) = outbound.try_recv() {
                        sink.feed(Message::Binary(more)).await?;
                    }
                    sink.flush().await
                };
                match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break Ended::Closed,
                    Err(_) => break Ended::Refused(format!(
                        "not reading: nothing it was sent was taken for {}s",
                        WRITE_TIMEOUT.as_secs()
                    )),
                }
            }
        }
    };
    let (code, reason) = match &ended {
        Ended::Refused(_) => (CloseCode::Policy, "refused"),
        Ended::Idle => (CloseCode::Away, "idle"),
        Ended::Closed => (CloseCode::Normal, ""),
    };
    // A peer that does not read does not get to hold the carrier for its close either.
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        sink.send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))),
    )
    .await;
    ended
}

/// A WebSocket error on a carrier: a size or protocol rule broken is the peer's doing.
fn refused_by_library(e: tokio_tungstenite::tungstenite::Error) -> Ended {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::ConnectionClosed | E::AlreadyClosed | E::Io(_) => Ended::Closed,
        E::Capacity(c) => Ended::Refused(format!(
            "a message larger than a datagram may be ({MAX_DATAGRAM} bytes): {c}"
        )),
        other => Ended::Refused(format!("a broken WebSocket: {other}")),
    }
}

impl quinn::AsyncUdpSocket for Hub {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        // To a carrier that has gone, or one whose queue is full: dropped, as UDP would.
        if let Some(tx) = peers.get(&transmit.destination) {
            let size = transmit
                .segment_size
                .unwrap_or(transmit.contents.len())
                .max(1);
            for datagram in transmit.contents.chunks(size) {
                let _ = tx.try_send(Bytes::copy_from_slice(datagram));
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut inbound = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let next = if n == 0 {
                match inbound.poll_recv(cx) {
                    Poll::Ready(next) => next,
                    Poll::Pending => return Poll::Pending,
                }
            } else {
                match inbound.try_recv() {
                    Ok(next) => Some(next),
                    Err(_) => break,
                }
            };
            // The hub holds a sender itself, so the queue never closes.
            let Some((from, data, waiting)) = next else {
                break;
            };
            waiting.fetch_sub(1, Relaxed);
            let len = data.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&data[..len]);
            meta[n] = RecvMeta {
                addr: from,
                len,
                stride: len,
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

/// Sends never wait: a full queue drops the datagram instead (one slow carrier must not hold
/// up every other one on the hub).
#[derive(Debug)]
struct AlwaysWritable;

impl quinn::UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

//! A UDP relay between one agent and the gateway, for faults the gateway cannot fake by itself:
//! [`UdpRelay::blackhole`] drops every datagram both ways, as a killed gateway or a dead network
//! path would, so the agent hears no CONNECTION_CLOSE and must notice by its idle timeout;
//! [`UdpRelay::retarget`] sends what follows to another gateway, as a load balancer does when
//! the replica behind an address changes.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
};

use tokio::net::UdpSocket;

/// A running relay.
pub struct UdpRelay {
    /// Where agents send to.
    pub addr: SocketAddr,
    back: Arc<UdpSocket>,
    blackhole: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl UdpRelay {
    /// Relays datagrams between the first client that writes and `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        back.connect(target).await?;
        let addr = front.local_addr()?;
        let blackhole = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (f, b, hole, c) = (
            front.clone(),
            back.clone(),
            blackhole.clone(),
            client.clone(),
        );
        let up = async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = f.recv_from(&mut buf).await {
                if let Ok(mut g) = c.lock() {
                    *g = Some(from);
                }
                if !hole.load(Relaxed) {
                    let _ = b.send(&buf[..n]).await;
                }
            }
        };
        let (f, b, hole, c) = (front, back.clone(), blackhole.clone(), client);
        let down = async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = b.recv(&mut buf).await {
                let to = c.lock().ok().and_then(|g| *g);
                if let Some(to) = to
                    && !hole.load(Relaxed)
                {
                    let _ = f.send_to(&buf[..n], to).await;
                }
            }
        };
        let task = tokio::spawn(async move {
            tokio::join!(up, down);
        });
        Ok(Self {
            addr,
            back,
            blackhole,
            task,
        })
    }

    /// Drops (`true`) or passes (`false`) every datagram, both ways.
    pub fn blackhole(&self, on: bool) {
        self.blackhole.store(on, Relaxed);
    }

    /// Relays to `target` from now on (from the same relay address, both ways).
    pub async fn retarget(&self, target: SocketAddr) -> anyhow::Result<()> {
        Ok(self.back.connect(target).await?)
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

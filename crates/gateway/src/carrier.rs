//! The gateway's side of the TCP carrier (`touchgate-carrier`): QUIC connections that arrive
//! as WebSocket messages instead of UDP datagrams — on TCP at `listen` with TLS (the same
//! certificate as QUIC), and on `listen_ws` without TLS, behind a front end that terminates it
//! (Cloud Run). Every carrier feeds one QUIC endpoint, which serves exactly as the UDP one does:
//! the QUIC connection and its TLS run end to end inside the carrier, whoever terminates the
//! outer TLS.
//!
//! The carrier's public HTTP side also serves the keys that verify `X-Touchgate-Assertion`
//! (`GET /.well-known/jwks.json`), so that a service on Cloud Run can fetch them.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use tokio::net::TcpListener;
use touchgate_carrier::{
    Ended, Hub, Limits,
    server::{ClientAddr, Routes},
};

use crate::{
    Gateway, GatewayError,
    audit::{AuditEvent, AuditKind},
};

/// The carriers' shared state: the hub every carrier feeds, and the peer each came from.
pub(crate) struct Carriers {
    pub(crate) hub: Arc<Hub>,
    /// The TCP peer of each carrier, by the address QUIC knows it by.
    peers: Mutex<HashMap<SocketAddr, SocketAddr>>,
    /// Carrier connections open, over every listener ([`MAX_CARRIERS`]).
    open: Arc<tokio::sync::Semaphore>,
}

impl Carriers {
    pub(crate) fn new() -> Self {
        Self {
            hub: Hub::new(),
            peers: Mutex::default(),
            open: Arc::new(tokio::sync::Semaphore::new(MAX_CARRIERS)),
        }
    }

    /// The real peer behind `addr`: the TCP peer of a carrier, or `addr` itself (UDP);
    /// `None` for a carrier's address whose carrier has ended (nobody to answer, nobody to
    /// count it against).
    pub(crate) fn peer_of(&self, addr: SocketAddr) -> Option<SocketAddr> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        match peers.get(&addr) {
            Some(peer) => Some(*peer),
            None if touchgate_carrier::is_carrier_addr(addr) => None,
            None => Some(addr),
        }
    }

    /// The peer of a connection for logs and the audit: [`Carriers::peer_of`], else `addr`.
    pub(crate) fn shown_peer(&self, addr: SocketAddr) -> SocketAddr {
        self.peer_of(addr).unwrap_or(addr)
    }

    /// How many carriers are open from `ip`.
    fn open_from(&self, ip: std::net::IpAddr) -> usize {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.values().filter(|p| p.ip() == ip).count()
    }
}

/// The carrier's HTTP side, answered by the gateway.
struct GatewayRoutes(Arc<Gateway>);

/// Carriers open at once on one gateway, over every listener; more are closed at once.
const MAX_CARRIERS: usize = 20_000;
/// Carriers open at once from one source address (a developer's machine, or an office behind
/// one NAT); more are refused with 429.
const MAX_CARRIERS_PER_SOURCE: usize = 512;

impl Routes for GatewayRoutes {
    fn admit(&self, peer: SocketAddr) -> Result<(), String> {
        let open = self.0.carriers.open_from(peer.ip());
        if open >= MAX_CARRIERS_PER_SOURCE {
            return Err(format!(
                "{open} carriers are open from {} already (at most {MAX_CARRIERS_PER_SOURCE})",
                peer.ip()
            ));
        }
        Ok(())
    }

    fn get(&self, path: &str) -> Option<Response<Full<Bytes>>> {
        (path == "/.well-known/jwks.json").then(|| {
            let mut r = Response::new(Full::new(Bytes::from(self.0.signer.jwks().to_string())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            );
            r
        })
    }

    fn opened(&self, addr: SocketAddr, peer: SocketAddr) {
        self.0
            .carriers
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, peer);
        tracing::debug!(%peer, %addr, "carrier opened");
    }

    fn ended(&self, addr: SocketAddr, peer: SocketAddr, how: &Ended) {
        self.0
            .carriers
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr);
        if let Ended::Refused(why) = how
            && self.0.audit.allow_refusal(Some(peer))
        {
            self.0.audit.record(AuditEvent {
                peer: Some(peer.to_string()),
                outcome: Some("carrier_refused".into()),
                reason: Some(format!("carrier closed: {why}")),
                ..AuditEvent::new(AuditKind::ConnectionRefused)
            });
        }
        tracing::debug!(%peer, %how, "carrier ended");
    }

    fn refused(&self, peer: SocketAddr, status: StatusCode, why: &str) {
        if self.0.audit.allow_refusal(Some(peer)) {
            self.0.audit.record(AuditEvent {
                peer: Some(peer.to_string()),
                outcome: Some(format!("http_{}", status.as_u16())),
                reason: Some(format!("carrier: {why}")),
                ..AuditEvent::new(AuditKind::ConnectionRefused)
            });
        }
    }
}

impl Gateway {
    /// The QUIC endpoint every carrier feeds: the gateway's certificate and keys, as the UDP
    /// endpoint, with the carrier's larger datagrams.
    pub fn carrier_endpoint(&self) -> Result<quinn::Endpoint, GatewayError> {
        let mut server = self.quic_server_config(touchgate_carrier::tune_transport)?;
        // An agent never moves a connection from one carrier to another: it opens a new one.
        server.migration(false);
        let mut config = self.endpoint_config_for(b"touchgate carrier endpoint");
        let _ = config.max_udp_payload_size(touchgate_carrier::MAX_DATAGRAM as u16);
        let runtime = quinn::default_runtime().ok_or_else(|| GatewayError::Listen {
            addr: "carrier".into(),
            source: std::io::Error::other("no async runtime"),
        })?;
        quinn::Endpoint::new_with_abstract_socket(
            config,
            Some(server),
            self.carriers.hub.clone(),
            runtime,
        )
        .map_err(|source| GatewayError::Listen {
            addr: "carrier".into(),
            source,
        })
    }

    /// Serves carriers on `listener` until the task is dropped: with TLS (the gateway's
    /// certificate) when `tls`, else plain HTTP for a front end that terminates TLS.
    pub async fn serve_carrier(
        self: Arc<Self>,
        listener: TcpListener,
        tls: bool,
    ) -> Result<(), GatewayError> {
        let acceptor = if tls {
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                self.carrier_tls_config()?,
            )))
        } else {
            None
        };
        let routes: Arc<dyn Routes> = Arc::new(GatewayRoutes(self.clone()));
        let limits = Limits::default();
        let open = self.carriers.open.clone();
        // A front end's word on the client only on the plain listener behind it.
        let client = if !tls && self.cfg.listen_ws_trusts_x_forwarded_for {
            ClientAddr::LastForwardedFor
        } else {
            ClientAddr::Peer
        };
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: wait rather than spin.
                    tracing::warn!(error = %e, "cannot accept a carrier connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = open.clone().try_acquire_owned() else {
                self.refuse_tls(peer, format!("{MAX_CARRIERS} carriers are open already"));
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let gw = self.clone();
            let (hub, routes, acceptor) =
                (self.carriers.hub.clone(), routes.clone(), acceptor.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match acceptor {
                    Some(a) => match tokio::time::timeout(
                        touchgate_carrier::server::HEAD_TIMEOUT,
                        a.accept(tcp),
                    )
                    .await
                    {
                        Ok(Ok(tls)) => {
                            touchgate_carrier::server::serve(tls, peer, client, hub, limits, routes)
                                .await
                        }
                        Ok(Err(e)) => gw.refuse_tls(peer, format!("TLS failed: {e}")),
                        Err(_) => gw.refuse_tls(peer, "no TLS handshake within 10 s".into()),
                    },
                    None => {
                        touchgate_carrier::server::serve(tcp, peer, client, hub, limits, routes)
                            .await
                    }
                }
            });
        }
    }

    /// A carrier connection closed before its HTTP side, audited (under the per-source limit
    /// on refusal lines).
    fn refuse_tls(&self, peer: SocketAddr, why: String) {
        tracing::debug!(%peer, %why, "carrier connection refused");
        if self.audit.allow_refusal(Some(peer)) {
            self.audit.record(AuditEvent {
                peer: Some(peer.to_string()),
                outcome: Some("carrier_refused".into()),
                reason: Some(format!("carrier: {why}")),
                ..AuditEvent::new(AuditKind::ConnectionRefused)
            });
        }
    }

    /// TLS for the carrier's TCP side: the gateway's certificate, HTTP/1.1.
    fn carrier_tls_config(&self) -> Result<rustls::ServerConfig, GatewayError> {
        let certs = crate::tls::load_certs(&self.cfg.tls.cert)?;
        let key = crate::tls::load_key(&self.cfg.tls.key)?;
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| GatewayError::Tls(crate::tls::TlsError::Quic(e.to_string())))?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tls)
    }
}

/// How often a fresh gateway tries another UDP port whose number was taken on TCP.
const PORT_ATTEMPTS: usize = 20;

/// The QUIC socket (UDP) and the carrier's listener (TCP, TLS) on one address. With port 0 the
/// system picks the UDP port, whose number TCP may already use elsewhere on the machine: other
/// picks are tried before giving up.
pub fn bind_quic_and_carrier(
    addr: SocketAddr,
) -> anyhow::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    use anyhow::Context;
    let mut attempt = 1;
    loop {
        let udp = std::net::UdpSocket::bind(addr)
            .with_context(|| format!("cannot bind UDP {addr} for QUIC"))?;
        let at = udp.local_addr()?;
        match std::net::TcpListener::bind(at) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 && attempt < PORT_ATTEMPTS => {
                tracing::debug!(error = %e, %at, "UDP port taken on TCP, trying another");
                attempt += 1;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot bind TCP {at} for the carrier"));
            }
        }
    }
}

#[cfg(test)]
mod tests;

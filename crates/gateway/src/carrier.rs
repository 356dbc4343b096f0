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
}

impl Carriers {
    pub(crate) fn new() -> Self {
        Self {
            hub: Hub::new(),
            peers: Mutex::default(),
        }
    }

    /// The real peer behind `addr`: the TCP peer of a carrier, or `addr` itself (UDP).
    pub(crate) fn peer_of(&self, addr: SocketAddr) -> SocketAddr {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .copied()
            .unwrap_or(addr)
    }
}

/// The carrier's HTTP side, answered by the gateway.
struct GatewayRoutes(Arc<Gateway>);

impl Routes for GatewayRoutes {
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
        let server = self.quic_server_config(touchgate_carrier::tune_transport)?;
        let mut config = self.endpoint_config();
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
        // A front end's word on the client only on the plain listener behind it.
        let client = if !tls && self.cfg.listen_ws_trusts_x_forwarded_for {
            ClientAddr::LastForwardedFor
        } else {
            ClientAddr::Peer
        };
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (hub, routes, acceptor) =
                (self.carriers.hub.clone(), routes.clone(), acceptor.clone());
            tokio::spawn(async move {
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
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "carrier TLS failed"),
                        Err(_) => tracing::debug!(%peer, "carrier TLS handshake too slow"),
                    },
                    None => {
                        touchgate_carrier::server::serve(tcp, peer, client, hub, limits, routes)
                            .await
                    }
                }
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

#[cfg(test)]
mod tests;

//! The gateway's side of the carrier: an HTTP/1.1 server on a TCP connection (TLS or not, the
//! caller decides) that turns exactly one kind of request into a carrier — `GET` [`PATH`] with
//! a WebSocket upgrade naming [`SUBPROTOCOL`] — hands other `GET`s to the caller's routes
//! (the gateway's public keys), and refuses the rest. Request heads are bounded in size and in
//! time by hyper.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{handshake::derive_accept_key, protocol::Role},
};

use crate::{Ended, Hub, Limits, PATH, SUBPROTOCOL, ws_config};

/// The largest request head the carrier's HTTP side reads.
pub const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What the gateway does with a carrier's HTTP side.
pub trait Routes: Send + Sync + 'static {
    /// The answer to a `GET` of another path, if the gateway serves it (e.g. its public keys);
    /// `None` is a 404.
    fn get(&self, path: &str) -> Option<Response<Full<Bytes>>>;
    /// Whether a carrier from `peer` may open now; why not, in words (answered 429).
    fn admit(&self, _peer: SocketAddr) -> Result<(), String> {
        Ok(())
    }
    /// A carrier opened from `peer` (the TCP peer, or the client a trusted front end named) is
    /// known to QUIC as `addr`.
    fn opened(&self, addr: SocketAddr, peer: SocketAddr);
    /// The carrier at `addr` ended, and how.
    fn ended(&self, addr: SocketAddr, peer: SocketAddr, how: &Ended);
    /// A request that is not a carrier nor a route was refused with `status`.
    fn refused(&self, peer: SocketAddr, status: StatusCode, why: &str);
}

fn answer(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Whether a header's comma-separated values include `want` (in any case).
fn lists(req: &Request<Incoming>, name: header::HeaderName, want: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(want)))
    })
}

/// Where the client of a request is taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddr {
    /// The TCP peer.
    Peer,
    /// The address a front end put last in `X-Forwarded-For` (the one it saw; those before it
    /// are the client's own word), else the TCP peer. Only where nothing but that front end
    /// reaches the listener.
    LastForwardedFor,
}

impl ClientAddr {
    /// The client of `req`, which came from `peer`.
    fn of(self, req: &Request<Incoming>, peer: SocketAddr) -> SocketAddr {
        if self == Self::Peer {
            return peer;
        }
        req.headers()
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
            .map_or(peer, |ip| SocketAddr::new(ip, 0))
    }
}

/// Serves one TCP connection (after any TLS) from `peer` until it ends: a carrier on `hub`, a
/// route, or a refusal; the client is `client` says.
pub async fn serve<I>(
    io: I,
    peer: SocketAddr,
    client: ClientAddr,
    hub: Arc<Hub>,
    limits: Limits,
    routes: Arc<dyn Routes>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let routes_on_error = routes.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (hub, routes) = (hub.clone(), routes.clone());
        let peer = client.of(&req, peer);
        async move { Ok::<_, std::convert::Infallible>(handle(req, peer, hub, limits, routes)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "carrier HTTP connection ended");
        // What hyper answered (or dropped) itself is a refusal too.
        let refused = if e.is_parse_too_large() {
            Some((
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "a request head over 16 KiB",
            ))
        } else if e.is_parse() {
            Some((StatusCode::BAD_REQUEST, "not an HTTP/1.1 request"))
        } else if e.is_timeout() {
            Some((StatusCode::REQUEST_TIMEOUT, "no request head within 10 s"))
        } else {
            None
        };
        if let Some((status, why)) = refused {
            routes_on_error.refused(peer, status, why);
        }
    }
}

fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    hub: Arc<Hub>,
    limits: Limits,
    routes: Arc<dyn Routes>,
) -> Response<Full<Bytes>> {
    let refuse = |status: StatusCode, why: &str| {
        routes.refused(peer, status, why);
        answer(status, why)
    };
    if req.method() != Method::GET {
        let mut r = refuse(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    if req.uri().path() != PATH {
        return match routes.get(req.uri().path()) {
            Some(r) => r,
            None => refuse(StatusCode::NOT_FOUND, "not found"),
        };
    }
    // A browser's WebSocket always names the page's origin; the agent names none. A page must
    // not open carriers from the developer's machine (they would count against its limits).
    if req.headers().contains_key(header::ORIGIN) || req.headers().contains_key("sec-fetch-mode") {
        return refuse(
            StatusCode::FORBIDDEN,
            "a browser's request: the carrier is for touchgate's agent only",
        );
    }
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let upgrade =
        lists(&req, header::CONNECTION, "upgrade") && lists(&req, header::UPGRADE, "websocket");
    let (Some(key), true) = (key, upgrade) else {
        return refuse(
            StatusCode::UPGRADE_REQUIRED,
            "this is touchgate's carrier: a WebSocket upgrade only",
        );
    };
    if req.headers().get(header::SEC_WEBSOCKET_VERSION) != Some(&HeaderValue::from_static("13")) {
        let mut r = refuse(StatusCode::UPGRADE_REQUIRED, "WebSocket version 13 only");
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    }
    if !lists(&req, header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the carrier speaks one subprotocol, touchgate-quic.v1",
        );
    }
    if let Err(why) = routes.admit(peer) {
        return refuse(StatusCode::TOO_MANY_REQUESTS, &why);
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let io = match on_upgrade.await {
            Ok(io) => TokioIo::new(io),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "carrier upgrade failed");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config())).await;
        let (addr, run) = hub.attach(ws, limits);
        routes.opened(addr, peer);
        let ended = run.await;
        routes.ended(addr, peer, &ended);
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    r
}

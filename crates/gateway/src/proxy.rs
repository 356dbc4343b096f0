//! The data path: HTTP served on each tunnel stream and proxied to the upstream, or raw bytes
//! spliced to a TCP upstream. Bodies stream through; nothing here buffers a whole body.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header,
    uri::PathAndQuery,
};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{
    audit::{AuditEvent, AuditLog},
    browser::{BrowserPolicy, BrowserRefusal},
    config::{LimitsConfig, ServiceConfig},
    idtoken::IdTokens,
    metrics::Metrics,
    tokens::TokenSigner,
};

/// Header carrying the Google ID token that Cloud Run checks.
pub const SERVERLESS_AUTH: HeaderName = HeaderName::from_static("x-serverless-authorization");
/// Header naming the signed-in user.
pub const USER_HEADER: HeaderName = HeaderName::from_static("x-touchgate-user");
/// Header carrying the gateway-signed identity assertion (a JWT; keys at the JWKS endpoint).
pub const ASSERTION_HEADER: HeaderName = HeaderName::from_static("x-touchgate-assertion");

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Who is calling which service on one stream, with what every request on it needs worked out
/// once when the stream opens: the upstream URL and `Host`, the user header, and the identity
/// assertion (kept here, so a request on a stream takes no shared lock for it).
pub struct StreamContext {
    /// The signed-in user.
    pub user: String,
    /// The service.
    pub service: Arc<ServiceConfig>,
    /// Who may use the agent's port from a browser.
    browser: BrowserPolicy,
    /// The agent's address, for the audit log.
    peer: Option<String>,
    audience: String,
    upstream: Result<Upstream, String>,
    user_header: Option<HeaderValue>,
    assertion: std::sync::Mutex<Option<(HeaderValue, u64)>>,
    /// The stream's own upstream connection (plain-HTTP upstreams, HTTP/1 callers): taken
    /// from the idle set at the first request, kept for the stream's life, given back after.
    own: std::sync::Mutex<Option<Http1Sender>>,
}

type Http1Sender = hyper::client::conn::http1::SendRequest<ProxyBody>;

/// The parsed upstream base URL.
struct Upstream {
    base: Uri,
    /// The base path without its trailing `/` (empty for none), prefixed to every request path.
    prefix: String,
    host: Option<HeaderValue>,
    /// `host:port` for a plain-HTTP upstream, which streams reach over connections of their
    /// own; `None` for HTTPS (the shared pool, with HTTP/2 where the upstream offers it).
    plain: Option<String>,
}

impl StreamContext {
    /// The context of a stream of `user` to `service`, whose local port allows `browser`.
    pub fn new(user: &str, service: Arc<ServiceConfig>, browser: BrowserPolicy) -> Self {
        let upstream = service
            .upstream
            .parse::<Uri>()
            .map(|base| Upstream {
                prefix: base.path().trim_end_matches('/').to_owned(),
                host: base
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
                plain: (base.scheme() == Some(&http::uri::Scheme::HTTP))
                    .then(|| {
                        base.host()
                            .map(|h| format!("{h}:{}", base.port_u16().unwrap_or(80)))
                    })
                    .flatten(),
                base,
            })
            .map_err(|e| {
                format!(
                    "touchgate: service upstream {:?} is not a URL: {e}",
                    service.upstream
                )
            });
        Self {
            user: user.to_owned(),
            browser,
            peer: None,
            audience: service.audience(),
            upstream,
            user_header: HeaderValue::from_str(user).ok(),
            assertion: Default::default(),
            own: Default::default(),
            service,
        }
    }
}

impl StreamContext {
    /// Names the agent's address in the stream's audit lines.
    pub fn with_peer(mut self, peer: String) -> Self {
        self.peer = Some(peer);
        self
    }
}

/// The HTTP proxy shared by all streams.
pub struct Proxy {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>,
    id_tokens: Arc<IdTokens>,
    signer: TokenSigner,
    metrics: Arc<Metrics>,
    audit: AuditLog,
    limits: LimitsConfig,
    assertions: std::sync::Mutex<std::collections::HashMap<(String, String), (HeaderValue, u64)>>,
    idle: Arc<IdleConns>,
}

impl Proxy {
    /// Builds the proxy. Upstream TLS uses the Mozilla root set.
    pub fn new(
        id_tokens: Arc<IdTokens>,
        signer: TokenSigner,
        metrics: Arc<Metrics>,
        audit: AuditLog,
        limits: LimitsConfig,
    ) -> Result<Self, rustls::Error> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        Ok(Self {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(https),
            id_tokens,
            signer,
            metrics,
            audit,
            limits,
            assertions: Default::default(),
            idle: Arc::default(),
        })
    }

    /// Serves HTTP/1.1 or h2 (detected) on one tunnel stream until the agent closes it.
    pub async fn serve_http<IO>(self: Arc<Self>, io: IO, ctx: StreamContext)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limits = self.limits.clone();
        let ctx = Arc::new(ctx);
        let (proxy, stream) = (self.clone(), ctx.clone());
        let svc = hyper::service::service_fn(move |req| {
            let proxy = self.clone();
            let ctx = ctx.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.forward(req, &ctx).await) }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192));
        builder
            .http2()
            .timer(hyper_util::rt::TokioTimer::new())
            .max_header_list_size(limits.max_header_bytes as u32);
        if let Err(e) = builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc)
            .await
        {
            tracing::debug!(error = %e, "tunnel HTTP connection ended with an error");
        }
        // The stream is done with its upstream connection: the next stream may have it.
        let own = stream.own.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let (
            Some(conn),
            Ok(Upstream {
                plain: Some(addr), ..
            }),
        ) = (own, &stream.upstream)
        {
            proxy.idle.put_when_ready(IdleConns::key(addr), conn);
        }
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        ctx: &StreamContext,
    ) -> Response<ProxyBody> {
        let svc = &ctx.service;
        if let Err(r) = check_browser(&ctx.browser, &req) {
            return self.browser_refused(ctx, &req, r);
        }
        let upgrade = wants_upgrade(req.headers(), &svc.upgrade_protocols);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let upstream = match &ctx.upstream {
            Ok(u) => u,
            Err(msg) => return plain(StatusCode::BAD_GATEWAY, msg),
        };
        let path = match upstream_path(&upstream.prefix, req.uri()) {
            Ok(p) => p,
            Err(msg) => return plain(StatusCode::BAD_REQUEST, &msg),
        };
        // On a connection of the stream's own the request names only the path (origin form;
        // `Host` is set below); the pooled client takes the whole URL.
        let own = upstream
            .plain
            .as_deref()
            .filter(|_| req.version() != http::Version::HTTP_2);
        let uri = match own {
            Some(_) => Uri::from(path),
            None => match absolute(&upstream.base, path) {
                Ok(u) => u,
                Err(msg) => return plain(StatusCode::BAD_GATEWAY, &msg),
            },
        };
        let audience = &ctx.audience;
        let bearer = match self.id_tokens.bearer(audience).await {
            Ok(t) => t,
            Err(e) => {
                return self.failed(
                    ctx,
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "touchgate: cannot get an ID token for service {}: {e}",
                        svc.name
                    ),
                );
            }
        };
        let assertion = match self.assertion(ctx) {
            Ok(a) => a,
            Err(e) => {
                return plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("touchgate: {e}"),
                );
            }
        };
        let (mut parts, body) = req.into_parts();
        sanitise_request_headers(&mut parts.headers, upgrade);
        // The upstream request is framed by what hyper read, never by a header it did not use
        // (hyper drops Content-Length when Transfer-Encoding is present, and re-frames).
        if hyper::body::Body::size_hint(&body).exact().is_none() {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        if let Some(host) = &upstream.host {
            parts.headers.insert(header::HOST, host.clone());
        }
        if let Some(v) = bearer {
            parts.headers.insert(SERVERLESS_AUTH, v);
        }
        if let Some(v) = &ctx.user_header {
            parts.headers.insert(USER_HEADER, v.clone());
        }
        parts.headers.insert(ASSERTION_HEADER, assertion);
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        // Trailers are headers too: a caller must not smuggle identity headers in them.
        let body = body.map_frame(clean_trailers);
        let out = Request::from_parts(parts, body.boxed());
        let sent = match own {
            Some(addr) => tokio::time::timeout(svc.timeout, self.send_own(ctx, addr, out)).await,
            _ => {
                tokio::time::timeout(svc.timeout, async {
                    self.client.request(out).await.map_err(|e| {
                        std::error::Error::source(&e)
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| e.to_string())
                    })
                })
                .await
            }
        };
        let mut resp = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(detail)) => {
                return self.failed(
                    ctx,
                    StatusCode::BAD_GATEWAY,
                    format!("touchgate: service {} is unreachable: {detail}", svc.name),
                );
            }
            Err(_) => {
                return self.failed(
                    ctx,
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "touchgate: service {} did not answer within {}",
                        svc.name,
                        humantime::format_duration(svc.timeout)
                    ),
                );
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((c, u)) => {
                        let mut c = TokioIo::new(c);
                        let mut u = TokioIo::new(u);
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
        } else {
            strip_hop_by_hop(resp.headers_mut(), false);
        }
        resp.map(|b| b.boxed())
    }
}

impl Proxy {
    /// The identity assertion for the stream's user on its service, signed once and reused
    /// until a minute before it expires (signing per request would cost more than the rest of
    /// the proxying): from the stream's own copy, else from the gateway-wide cache (a new
    /// stream of the same user), else freshly signed.
    fn assertion(&self, ctx: &StreamContext) -> Result<HeaderValue, String> {
        let now = crate::store::now_secs();
        let usable = |c: Option<&(HeaderValue, u64)>| c.filter(|(_, exp)| *exp > now + 60).cloned();
        let mut mine = ctx.assertion.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((v, _)) = usable(mine.as_ref()) {
            return Ok(v);
        }
        let (user, service) = (ctx.user.as_str(), ctx.service.name.as_str());
        let key = (user.to_owned(), service.to_owned());
        let shared = self
            .assertions
            .lock()
            .ok()
            .and_then(|cache| usable(cache.get(&key)));
        if let Some((v, exp)) = shared {
            *mine = Some((v.clone(), exp));
            return Ok(v);
        }
        let jwt = self
            .signer
            .identity_assertion(user, service, &ctx.audience)
            .map_err(|e| e.to_string())?;
        let v = HeaderValue::from_str(&jwt).map_err(|e| e.to_string())?;
        let exp = now + crate::tokens::ASSERTION_TTL_SECS;
        *mine = Some((v.clone(), exp));
        if let Ok(mut cache) = self.assertions.lock() {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(key, (v.clone(), exp));
        }
        Ok(v)
    }

    /// Sends `req` on the stream's own HTTP/1 connection to `addr` (its own from an earlier
    /// request, else an idle one, else a new one). A kept connection the upstream has closed
    /// meanwhile is replaced once, if the request had not gone out on it.
    async fn send_own(
        &self,
        ctx: &StreamContext,
        addr: &str,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, String> {
        let kept = ctx
            .own
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .filter(|c| !c.is_closed())
            .or_else(|| self.take_idle(addr));
        let (mut conn, mut reused) = match kept {
            Some(c) => (c, true),
            None => (connect_http1(addr, &self.metrics).await?, false),
        };
        loop {
            // Ready once the previous response on it has been read to the end; a failure
            // hands back the request if it had not gone out.
            let outcome = match conn.ready().await {
                Ok(()) => conn
                    .try_send_request(req)
                    .await
                    .map_err(|mut e| (e.take_message(), e.into_error())),
                Err(e) => Err((Some(req), e)),
            };
            match outcome {
                Ok(resp) => {
                    *ctx.own.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
                    return Ok(resp);
                }
                Err((Some(unsent), e)) if reused => {
                    tracing::debug!(error = %e, "kept upstream connection closed; reconnecting");
                    req = unsent;
                    conn = connect_http1(addr, &self.metrics).await?;
                    reused = false;
                }
                Err((_, e)) => return Err(e.to_string()),
            }
        }
    }

    /// An idle connection to `addr`, if there is one. Whenever this leaves none (or found
    /// none), one more is opened in the background for the next stream, so that a new local
    /// connection does not wait for an upstream connect behind one that just closed (the
    /// closing stream gives its connection back a moment after the next one asks).
    fn take_idle(&self, addr: &str) -> Option<Http1Sender> {
        let key = IdleConns::key(addr);
        let (conn, refill) = self.idle.take(&key);
        if refill {
            let (idle, metrics) = (self.idle.clone(), self.metrics.clone());
            tokio::spawn(async move {
                match connect_http1(&key.0, &metrics).await {
                    Ok(c) => idle.put(key.clone(), c),
                    Err(e) => tracing::debug!(error = %e, "no spare upstream connection"),
                }
                idle.refilled(&key);
            });
        }
        conn
    }

    /// Answers a request a browser was made to send with 403, before anything reaches the
    /// upstream, and counts, logs and audits it.
    fn browser_refused<B>(
        &self,
        ctx: &StreamContext,
        req: &Request<B>,
        r: BrowserRefusal,
    ) -> Response<ProxyBody> {
        Metrics::inc(&self.metrics.browser_refused_total);
        let msg = r.message(&ctx.service.name);
        if self.audit.allow_refusal(ctx.peer.as_deref()) {
            tracing::warn!(service = %ctx.service.name, reason = %msg, "browser request refused");
            self.audit.record(AuditEvent {
                event: "browser_request_refused",
                user: Some(ctx.user.clone()),
                service: Some(ctx.service.name.clone()),
                peer: ctx.peer.clone(),
                method: Some(req.method().to_string()),
                outcome: Some("403".into()),
                reason: Some(msg.clone()),
                ..Default::default()
            });
        }
        plain(StatusCode::FORBIDDEN, &msg)
    }

    /// Answers the caller with a short plain-text reason, and counts, logs and audits it.
    fn failed(&self, ctx: &StreamContext, status: StatusCode, msg: String) -> Response<ProxyBody> {
        Metrics::inc(&self.metrics.upstream_errors_total);
        tracing::warn!(service = %ctx.service.name, status = status.as_u16(), reason = %msg, "upstream failed");
        self.audit.record(AuditEvent {
            event: "upstream_error",
            user: Some(ctx.user.clone()),
            service: Some(ctx.service.name.clone()),
            outcome: Some(status.as_u16().to_string()),
            reason: Some(msg.clone()),
            ..Default::default()
        });
        plain(status, &msg)
    }
}

/// Checks a request's `Host` (and the h2 `:authority` or absolute-form target) and its
/// browser marks against the port's policy.
fn check_browser<B>(policy: &BrowserPolicy, req: &Request<B>) -> Result<(), BrowserRefusal> {
    let hosts = req.headers().get_all(header::HOST);
    if hosts.iter().count() > 1 {
        return Err(BrowserRefusal {
            what: "more than one Host header".into(),
            setting: None,
        });
    }
    let host = hosts
        .iter()
        .next()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    policy.check(host.as_deref(), req.headers())?;
    match req.uri().authority() {
        Some(a) if host.as_deref() != Some(a.as_str()) => {
            policy.check(Some(a.as_str()), &HeaderMap::new())
        }
        _ => Ok(()),
    }
}

/// Whether the request asks for a protocol upgrade the service allows (`websocket` unless it
/// lists others); any other `Upgrade` (`h2c` above all) is dropped and the request is served
/// as a plain one.
fn wants_upgrade(h: &HeaderMap, allowed: &[String]) -> bool {
    let protocols_allowed = !h.get_all(header::UPGRADE).iter().any(|v| {
        v.to_str().map_or(true, |s| {
            s.split(',').any(|p| {
                let name = p.trim().split('/').next().unwrap_or_default();
                !allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
            })
        })
    });
    h.contains_key(header::UPGRADE)
        && protocols_allowed
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .map(|s| {
                    s.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
                })
                .unwrap_or(false)
        })
}

const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| {
            s.split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in listed {
        if !(keep_upgrade && n == header::UPGRADE) {
            h.remove(n);
        }
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::UPGRADE);
    }
}

/// Removes hop-by-hop headers and every header a caller must not set itself: the Cloud Run
/// token header and the gateway's identity headers. The caller's own `Authorization` stays.
fn sanitise_request_headers(h: &mut HeaderMap, upgrade: bool) {
    strip_hop_by_hop(h, upgrade);
    remove_identity_headers(h);
}

/// A body frame with any trailers cleaned like headers: a caller must not smuggle identity
/// headers in them (h2 and chunked HTTP/1 carry trailers).
fn clean_trailers(f: hyper::body::Frame<Bytes>) -> hyper::body::Frame<Bytes> {
    match f.into_trailers() {
        Ok(mut t) => {
            remove_identity_headers(&mut t);
            hyper::body::Frame::trailers(t)
        }
        Err(f) => f,
    }
}

/// Removes the Cloud Run token header and the gateway's own `x-touchgate-*` headers.
fn remove_identity_headers(h: &mut HeaderMap) {
    h.remove(SERVERLESS_AUTH);
    let own: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("x-touchgate-"))
        .cloned()
        .collect();
    for k in own {
        h.remove(k);
    }
}

/// The request's path and query under the upstream's base path `prefix` (without its trailing
/// `/`); with no prefix the request's own is reused as it is. Under a base path, a path that
/// could step out of it once the upstream normalises it (`..` or `.` segments, also
/// percent-encoded, or an encoded `/` or `\\`) is refused.
fn upstream_path(prefix: &str, req: &Uri) -> Result<PathAndQuery, String> {
    if !prefix.is_empty() && escapes_base(req.path()) {
        return Err(format!(
            "touchgate: the request path {} has dot segments or encoded slashes, which could \
             leave the service's base path {prefix}",
            crate::browser::untrusted(req.path())
        ));
    }
    match (prefix, req.path_and_query()) {
        ("", Some(pq)) if pq.as_str().starts_with('/') => Ok(pq.clone()),
        (_, pq) => format!("{prefix}{}", pq.map_or("/", |p| p.as_str()))
            .parse()
            .map_err(|e| format!("touchgate: bad request path: {e}")),
    }
}

/// Whether `path` has a `.` or `..` segment (also as `%2e`) or an encoded `/` or `\\`.
fn escapes_base(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains('\\') {
        return true;
    }
    lower
        .replace("%2e", ".")
        .split('/')
        .any(|seg| seg == "." || seg == "..")
}

/// The upstream base URL with `path` in place of its own.
fn absolute(base: &Uri, path: PathAndQuery) -> Result<Uri, String> {
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(path);
    Uri::from_parts(parts).map_err(|e| format!("touchgate: cannot build upstream URL: {e}"))
}

/// Joins the upstream base URL (whose path without the trailing `/` is `prefix`) and the
/// request's path and query.
#[cfg(test)]
fn upstream_uri(base: &Uri, prefix: &str, req: &Uri) -> Result<Uri, String> {
    absolute(base, upstream_path(prefix, req)?)
}

/// A short plain-text answer from the gateway itself.
fn plain(status: StatusCode, msg: &str) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A new HTTP/1 connection to a plain-HTTP upstream, driven by a task of its own.
async fn connect_http1(addr: &str, metrics: &Metrics) -> Result<Http1Sender, String> {
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| format!("no connection to {addr} within 10s"))?
    .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Metrics::inc(&metrics.upstream_connections_total);
    Ok(sender)
}

/// Idle HTTP/1 connections to plain-HTTP upstreams, for the next stream to the same upstream.
/// Kept per thread as well as per upstream: a connection's task runs where it was made, and a
/// stream on the same thread (shard) then uses it without crossing threads.
#[derive(Default)]
struct IdleConns {
    conns: std::sync::Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    conns: IdleMap,
    /// Upstreams (and threads) with a spare connection being opened.
    refilling: std::collections::HashSet<IdleKey>,
}

/// Idle connections (newest last, with the time each became idle) by upstream and thread.
type IdleMap = std::collections::HashMap<IdleKey, Vec<(Instant, Http1Sender)>>;

/// An upstream's `host:port` and the thread whose connections these are.
type IdleKey = (String, std::thread::ThreadId);

impl IdleConns {
    /// How long a connection may wait unused (upstreams close idle ones themselves, often
    /// after a minute or more; one closed meanwhile is replaced on first use).
    const IDLE_FOR: Duration = Duration::from_secs(30);
    /// Idle connections kept per upstream and thread.
    const MAX: usize = 64;

    /// The set for `addr` on this thread. Taken by the caller, so that work it hands to
    /// another task (a spare, a connection not yet ready) lands in the same set even on a
    /// runtime whose tasks move between threads.
    fn key(addr: &str) -> IdleKey {
        (addr.to_owned(), std::thread::current().id())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection, and whether a spare should be opened (none is left, and none is
    /// being opened).
    fn take(&self, key: &IdleKey) -> (Option<Http1Sender>, bool) {
        let mut idle = self.lock();
        let list = idle.conns.entry(key.clone()).or_default();
        let mut found = None;
        while let Some((since, c)) = list.pop() {
            if since.elapsed() < Self::IDLE_FOR && !c.is_closed() {
                found = Some(c);
                break;
            }
        }
        let refill = list.is_empty() && idle.refilling.insert(key.clone());
        (found, refill)
    }

    /// The spare connection for `key` is open (or failed).
    fn refilled(&self, key: &IdleKey) {
        self.lock().refilling.remove(key);
    }

    /// Puts `conn` back once it can take a request: at once if its task has already seen the
    /// end of its last response, else when it has (a stream that ended on an unfinished
    /// response leaves a connection that closes instead).
    fn put_when_ready(self: &Arc<Self>, key: IdleKey, mut conn: Http1Sender) {
        if conn.is_ready() || conn.is_closed() {
            return self.put(key, conn);
        }
        let idle = self.clone();
        tokio::spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(5), conn.ready()).await {
                idle.put(key, conn);
            }
        });
    }

    fn put(&self, key: IdleKey, conn: Http1Sender) {
        if conn.is_closed() {
            return;
        }
        let mut idle = self.lock();
        let list = idle.conns.entry(key).or_default();
        list.retain(|(since, c)| since.elapsed() < Self::IDLE_FOR && !c.is_closed());
        if list.len() < Self::MAX {
            list.push((Instant::now(), conn));
        }
    }
}

/// Wraps a stream and counts the bytes read from and written to it.
pub struct Counted<T> {
    inner: T,
    /// Bytes read (from the agent).
    pub read: Arc<AtomicU64>,
    /// Bytes written (to the agent).
    pub written: Arc<AtomicU64>,
}

impl<T> Counted<T> {
    /// Wraps `inner` with fresh counters.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            read: Arc::default(),
            written: Arc::default(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Relaxed);
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.written.fetch_add(n as u64, Relaxed);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_cannot_set_identity_headers_but_keeps_authorization() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer mine"),
        );
        h.insert(SERVERLESS_AUTH, HeaderValue::from_static("Bearer forged"));
        h.insert(USER_HEADER, HeaderValue::from_static("root"));
        h.insert("x-touchgate-assertion", HeaderValue::from_static("forged"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        sanitise_request_headers(&mut h, false);
        assert_eq!(
            h.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
            Some(&b"Bearer mine"[..])
        );
        assert!(h.get(SERVERLESS_AUTH).is_none());
        assert!(h.get(USER_HEADER).is_none());
        assert!(h.get("x-touchgate-assertion").is_none());
        assert!(h.get("x-secret").is_none());
        assert!(h.get(header::CONNECTION).is_none());
    }

    #[test]
    fn upstream_path_prefix_is_kept() {
        let join = |base: &str, req: &str| {
            let base: Uri = base.parse().expect("uri");
            let prefix = base.path().trim_end_matches('/').to_owned();
            upstream_uri(&base, &prefix, &req.parse().expect("uri"))
                .expect("joined")
                .to_string()
        };
        assert_eq!(
            join("https://svc.a.run.app/base/", "/v1/items?x=1"),
            "https://svc.a.run.app/base/v1/items?x=1"
        );
        assert_eq!(join("http://127.0.0.1:8080", "/"), "http://127.0.0.1:8080/");
        assert_eq!(
            join("http://127.0.0.1:8080/", "/a/b?c=%20d"),
            "http://127.0.0.1:8080/a/b?c=%20d"
        );
        // An absolute-form request target keeps only its path and query.
        assert_eq!(
            join("http://127.0.0.1:8080/base", "http://other.example/x?y"),
            "http://127.0.0.1:8080/base/x?y"
        );
        assert_eq!(
            join("http://127.0.0.1:8080", "http://other.example/x?y"),
            "http://127.0.0.1:8080/x?y"
        );
    }

    #[test]
    fn identity_headers_in_trailers_are_removed() {
        let mut t = HeaderMap::new();
        t.insert(USER_HEADER, HeaderValue::from_static("root@example.com"));
        t.insert(SERVERLESS_AUTH, HeaderValue::from_static("Bearer forged"));
        t.insert("x-touchgate-assertion", HeaderValue::from_static("forged"));
        t.insert("grpc-status", HeaderValue::from_static("0"));
        let cleaned = clean_trailers(hyper::body::Frame::trailers(t))
            .into_trailers()
            .expect("still trailers");
        assert_eq!(cleaned.len(), 1);
        assert_eq!(
            cleaned.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
        let data = clean_trailers(hyper::body::Frame::data(Bytes::from_static(b"x")));
        assert_eq!(data.into_data().ok(), Some(Bytes::from_static(b"x")));
    }

    #[test]
    fn h2c_and_unlisted_upgrades_are_not_relayed() {
        let ws = ["websocket".to_owned()];
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAAP__"),
        );
        assert!(!wants_upgrade(&h, &ws));
        sanitise_request_headers(&mut h, false);
        assert!(h.get(header::UPGRADE).is_none());
        assert!(h.get("http2-settings").is_none());
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket, h2c"));
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        assert!(!wants_upgrade(&h, &ws));
        h.insert(header::UPGRADE, HeaderValue::from_static("custom/2"));
        assert!(wants_upgrade(&h, &["custom".to_owned()]));
    }

    #[test]
    fn a_request_path_cannot_step_out_of_the_base_path() {
        for bad in [
            "/../admin",
            "/a/../../admin",
            "/%2e%2e/admin",
            "/%2E./admin",
            "/.%2e/admin",
            "/a%2f..%2fadmin",
            "/a%5c..",
            "/./x",
        ] {
            let req: Uri = bad.parse().expect("uri");
            assert!(upstream_path("/base", &req).is_err(), "{bad}");
            // Without a base path there is nothing to leave: passed as it is.
            assert!(upstream_path("", &req).is_ok(), "{bad}");
        }
        for good in ["/v1/items", "/a..b/c", "/.well-known/x", "/%2e%2efoo"] {
            let req: Uri = good.parse().expect("uri");
            assert!(upstream_path("/base", &req).is_ok(), "{good}");
        }
    }

    #[test]
    fn websocket_upgrade_is_detected() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(wants_upgrade(&h, &["websocket".to_owned()]));
        sanitise_request_headers(&mut h, true);
        assert_eq!(
            h.get(header::UPGRADE).map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(
            h.get(header::CONNECTION).map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
    }
}

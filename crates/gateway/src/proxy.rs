//! The data path: HTTP served on each tunnel stream and proxied to the upstream, or raw bytes
//! spliced to a TCP upstream. Bodies stream through; nothing here buffers a whole body.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header,
    uri::PathAndQuery,
};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use tokio::io::{AsyncRead, AsyncWrite};

mod audited;
mod error;
mod expect;
mod headers;
mod rewrite;
mod upstream;

pub use error::ProxyError;
pub use upstream::UPSTREAM_CONNECT_TIMEOUT;

pub use crate::counted::Counted;
use audited::{AuditedBody, RequestLine};
use headers::{
    check_browser, clean_trailers, is_grpc, sanitise_request_headers, strip_hop_by_hop,
    wants_trailers, wants_upgrade,
};
use rewrite::{
    UpstreamOrigins, remove_forwarding_headers, rewrite_request_origin, rewrite_response,
};
use upstream::{IdleConns, absolute, connect_http1, upstream_path};

use crate::{
    audit::{AuditEvent, AuditLog},
    browser::{BrowserPolicy, BrowserRefusal},
    config::AuditConfig,
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
/// Header naming the delegate (a grant's label) acting for the user in `X-Touchgate-User`.
pub const DELEGATE_HEADER: HeaderName = HeaderName::from_static("x-touchgate-delegate");

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
    peer: Option<std::net::SocketAddr>,
    audience: String,
    /// The upstream's own origins, for rewriting `Origin`, `Location` and cookies.
    origins: UpstreamOrigins,
    upstream: Result<Upstream, String>,
    user_header: Option<HeaderValue>,
    assertion: std::sync::Mutex<Option<(HeaderValue, u64)>>,
    /// The delegated grant the stream is used under, if any: checked on every request.
    delegation: Option<Delegation>,
    /// Each request's audit line starts as this (user, service, key, session, grant); none
    /// when `[audit] requests = false`.
    request_line: Option<crate::audit::Prefix>,
    /// The stream's own upstream connection (plain-HTTP upstreams, HTTP/1 callers): taken
    /// from the idle set at the first request, kept for the stream's life, given back after.
    own: std::sync::Mutex<Option<Http1Sender>>,
}

type Http1Sender = hyper::client::conn::http1::SendRequest<ProxyBody>;

/// What a delegated grant allows on a stream's requests.
struct Delegation {
    label: String,
    header: Option<HeaderValue>,
    methods: Vec<String>,
    paths: Vec<String>,
}

impl Delegation {
    /// Whether the grant allows `method` on `path` (the caller's path, before the service's
    /// base path) with `headers`; the refusal's words say what it allows instead.
    fn check(
        &self,
        method: &http::Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<(), ProxyError> {
        let refuse = |why: String| ProxyError::Delegation {
            label: self.label.clone(),
            why,
        };
        if !self.methods.is_empty() {
            let allowed = |m: &str| self.methods.iter().any(|a| a.eq_ignore_ascii_case(m));
            if !allowed(method.as_str()) {
                return Err(refuse(format!(
                    "method {method} (it allows {})",
                    self.methods.join(", ")
                )));
            }
            // Frameworks that honour a method override would turn an allowed POST into a
            // DELETE: an override must name an allowed method too.
            for h in METHOD_OVERRIDES {
                for v in headers.get_all(h) {
                    let m = v.to_str().unwrap_or("?").trim();
                    if !allowed(m) {
                        return Err(refuse(format!(
                            "{h}: {} (it allows {})",
                            crate::browser::untrusted(m),
                            self.methods.join(", ")
                        )));
                    }
                }
            }
        }
        if self.paths.is_empty() {
            return Ok(());
        }
        // Checked on the path as an upstream may read it: anything that could walk out of a
        // prefix once decoded (once or more) or normalised there (`..;`, an encoded slash)
        // is refused rather than normalised here.
        if upstream::escapes_base(path) {
            return Err(refuse(
                "a path with dot segments or an encoded slash under a path-limited grant".into(),
            ));
        }
        let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
        // `;parameters` are dropped by some servers before routing: matched without them.
        let plain: String = decoded
            .split('/')
            .map(|seg| seg.split(';').next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("/");
        if self.paths.iter().any(|p| under_prefix(&plain, p)) {
            Ok(())
        } else {
            Err(refuse(format!(
                "path {} (it allows paths under {})",
                crate::browser::untrusted(&decoded),
                self.paths.join(", ")
            )))
        }
    }
}

/// Headers some frameworks take as the request's real method.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Whether `path` is `prefix` or under it, on a segment boundary: `/v1` covers `/v1` and
/// `/v1/items`, not `/v10` or `/v1-internal`; `/v1/` covers what starts with it.
fn under_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

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
            .map_err(|e| format!("service upstream {:?} is not a URL: {e}", service.upstream));
        Self {
            user: user.to_owned(),
            browser,
            peer: None,
            audience: service.audience(),
            origins: UpstreamOrigins::new(&service.upstream, &service.audience()),
            upstream,
            user_header: HeaderValue::from_str(user).ok(),
            assertion: Default::default(),
            delegation: None,
            request_line: None,
            own: Default::default(),
            service,
        }
    }
}

impl StreamContext {
    /// Names the agent's address in the stream's audit lines.
    pub fn with_peer(mut self, peer: std::net::SocketAddr) -> Self {
        self.peer = Some(peer);
        self
    }

    /// Uses the stream under the delegated grant `scope`, labelled `label`: each request is
    /// checked against it, and the upstream is told who acts for the user.
    pub fn with_delegation(mut self, label: &str, scope: &crate::tokens::DelegatedScope) -> Self {
        self.delegation = Some(Delegation {
            label: label.to_owned(),
            header: HeaderValue::from_str(label).ok(),
            methods: scope.methods.clone(),
            paths: scope.paths.clone(),
        });
        self
    }

    /// Audits each request on the stream, starting its line as `template`.
    pub fn with_request_audit(mut self, template: AuditEvent) -> Self {
        self.request_line = Some(template.prefix());
        self
    }
}

/// How long the pooled client keeps an idle upstream connection (HTTPS upstreams).
const POOL_IDLE: Duration = Duration::from_secs(60);

/// The HTTP proxy shared by all streams.
pub struct Proxy {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>,
    /// HTTP/2 only: h2c with prior knowledge to plain-HTTP upstreams, ALPN h2 to HTTPS ones
    /// (gRPC, and services with `http2 = true`).
    h2: Client<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>,
    id_tokens: Arc<IdTokens>,
    signer: TokenSigner,
    metrics: Arc<Metrics>,
    audit: AuditLog,
    /// Whether request lines keep the query string.
    audit_query: bool,
    limits: LimitsConfig,
    /// Signed assertions by user, service and delegate (empty for none), with their expiry.
    assertions: std::sync::Mutex<std::collections::HashMap<AssertionKey, (HeaderValue, u64)>>,
    idle: Arc<IdleConns>,
    /// Clients (any protocol, HTTP/2 only) that trust a service's `upstream_ca`, by its path.
    private_ca: std::sync::Mutex<
        std::collections::HashMap<std::path::PathBuf, (PooledClient, PooledClient)>,
    >,
}

/// User, service, and delegate (empty for none).
type AssertionKey = (String, String, String);

type PooledClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>;

/// The HTTP and HTTPS connector for a service with its own CA: TLS with `tls`, ALPN h2 and
/// http/1.1.
fn connector(tls: rustls::ClientConfig) -> hyper_rustls::HttpsConnector<HttpConnector> {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http_connector())
}

/// TCP connections to upstreams: any scheme (TLS is layered on top), no Nagle, a connect
/// timeout.
fn http_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(upstream::UPSTREAM_CONNECT_TIMEOUT));
    http
}

/// A pooled client and its HTTP/2-only twin over `https`.
fn clients(https: hyper_rustls::HttpsConnector<HttpConnector>) -> (PooledClient, PooledClient) {
    (
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(https.clone()),
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .http2_only(true)
            .build(https),
    )
}

/// TLS trusting `roots`, TLS 1.2 and 1.3, ring.
pub(crate) fn tls_with(
    roots: rustls::RootCertStore,
) -> Result<rustls::ClientConfig, rustls::Error> {
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

impl Proxy {
    /// Builds the proxy. Upstream TLS uses the Mozilla root set.
    pub fn new(
        id_tokens: Arc<IdTokens>,
        signer: TokenSigner,
        metrics: Arc<Metrics>,
        audit: AuditLog,
        audit_cfg: AuditConfig,
        limits: LimitsConfig,
    ) -> Result<Self, rustls::Error> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http_connector());
        let (client, h2) = clients(https);
        Ok(Self {
            client,
            h2,
            id_tokens,
            signer,
            metrics,
            audit,
            audit_query: audit_cfg.query,
            limits,
            assertions: Default::default(),
            idle: Arc::default(),
            private_ca: Default::default(),
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

    async fn forward(&self, req: Request<Incoming>, ctx: &StreamContext) -> Response<ProxyBody> {
        let method = req.method().clone();
        let mut line = ctx.request_line.as_ref().map(|prefix| {
            let uri = req.uri();
            let path = match (self.audit_query, uri.path_and_query()) {
                (true, Some(pq)) => pq.as_str().to_owned(),
                _ => uri.path().to_owned(),
            };
            RequestLine::start(&self.audit, prefix, &method, path)
        });
        let resp = match self.try_forward(req, ctx, &mut line).await {
            Ok(resp) => resp,
            Err(e) => self.fail(ctx, &method, e, &mut line),
        };
        match line {
            Some(line) => {
                let status = resp.status().as_u16();
                resp.map(|b| AuditedBody::new(b, line, status).boxed())
            }
            None => resp,
        }
    }

    /// Forwards one request; counts its body's bytes into `line`, and takes `line` to write
    /// when an upgraded connection closes.
    async fn try_forward(
        &self,
        mut req: Request<Incoming>,
        ctx: &StreamContext,
        line: &mut Option<RequestLine>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let svc = &ctx.service;
        if let Some(d) = &ctx.delegation {
            d.check(req.method(), req.uri().path(), req.headers())?;
        }
        check_browser(&ctx.browser, &req).map_err(|refusal| ProxyError::Browser {
            service: svc.name.clone(),
            refusal,
        })?;
        let upgrade = wants_upgrade(req.headers(), &svc.upgrade_protocols);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let upstream = ctx
            .upstream
            .as_ref()
            .map_err(|msg| ProxyError::BadUpstream(msg.clone()))?;
        let path = upstream_path(&upstream.prefix, req.uri()).map_err(ProxyError::BadPath)?;
        // On a connection of the stream's own the request names only the path (origin form;
        // `Host` is set below); the pooled client takes the whole URL.
        // gRPC (HTTP/2 with an application/grpc content type) goes out as HTTP/2 as it came,
        // with its `TE: trailers`; so does every request of a service with `http2 = true`.
        let h2 = svc.http2 || (req.version() == http::Version::HTTP_2 && is_grpc(req.headers()));
        let te_trailers = h2 && wants_trailers(req.headers());
        let own = upstream
            .plain
            .as_deref()
            .filter(|_| req.version() != http::Version::HTTP_2 && !h2);
        let uri = match own {
            Some(_) => Uri::from(path),
            None => absolute(&upstream.base, path).map_err(ProxyError::BadUpstream)?,
        };
        let bearer =
            self.id_tokens
                .bearer(&ctx.audience)
                .await
                .map_err(|e| ProxyError::IdToken {
                    service: svc.name.clone(),
                    reason: e.to_string(),
                })?;
        let assertion = self.assertion(ctx).map_err(ProxyError::Assertion)?;
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .map(str::to_owned);
        let local_origin = ctx.browser.local_origin(host.as_deref());
        let (mut parts, body) = req.into_parts();
        sanitise_request_headers(&mut parts.headers, upgrade);
        remove_forwarding_headers(&mut parts.headers);
        rewrite_request_origin(
            &mut parts.headers,
            &ctx.browser,
            host.as_deref(),
            &ctx.origins,
        );
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
        if let Some(v) = ctx.delegation.as_ref().and_then(|d| d.header.clone()) {
            parts.headers.insert(DELEGATE_HEADER, v);
        }
        parts.headers.insert(ASSERTION_HEADER, assertion);
        parts.uri = uri;
        parts.version = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        if te_trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        // Trailers are headers too: a caller must not smuggle identity headers in them.
        let body = match line.as_ref().map(|l| l.up.clone()) {
            Some(up) => body
                .map_frame(move |f| {
                    if let Some(d) = f.data_ref() {
                        up.fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    clean_trailers(f)
                })
                .boxed(),
            None => body.map_frame(clean_trailers).boxed(),
        };
        let continues = expect::expects_continue(&parts.headers);
        let mut out = Request::from_parts(parts, body);
        if continues {
            // HTTP/1 upstreams (plain or TLS) report their 100; over HTTP/2 hyper has no 1xx,
            // so the upstream's final answer or the wait decides.
            expect::hold_until_continue(&mut out);
        }
        let sent = match own {
            Some(addr) => tokio::time::timeout(svc.timeout, self.send_own(ctx, addr, out)).await,
            _ => {
                let (client, h2_client) = match &svc.upstream_ca {
                    Some(ca) => self.private_ca_clients(ca)?,
                    None => (self.client.clone(), self.h2.clone()),
                };
                let client = if h2 { h2_client } else { client };
                tokio::time::timeout(svc.timeout, async {
                    client.request(out).await.map_err(|e| {
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
                return Err(ProxyError::Unreachable {
                    service: svc.name.clone(),
                    detail,
                });
            }
            Err(_) => {
                return Err(ProxyError::Timeout {
                    service: svc.name.clone(),
                    timeout: svc.timeout,
                });
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            // The request's line covers the upgraded connection: written when it closes.
            let line = line.take();
            tokio::spawn(async move {
                let (copied, outcome) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((c, u)) => {
                        let mut c = TokioIo::new(c);
                        let mut u = TokioIo::new(u);
                        match tokio::io::copy_bidirectional(&mut c, &mut u).await {
                            Ok(n) => (n, "ok".to_owned()),
                            Err(e) => ((0, 0), format!("error: {e}")),
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "upgrade failed");
                        ((0, 0), format!("error: {e}"))
                    }
                };
                if let Some(line) = line {
                    line.finish(101, copied.0, copied.1, outcome);
                }
            });
        } else {
            strip_hop_by_hop(resp.headers_mut(), false);
        }
        rewrite_response(resp.headers_mut(), &ctx.origins, &local_origin);
        Ok(resp.map(|b| b.boxed()))
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
        let delegate = ctx.delegation.as_ref().map(|d| d.label.as_str());
        let key = (
            user.to_owned(),
            service.to_owned(),
            delegate.unwrap_or_default().to_owned(),
        );
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
            .identity_assertion(user, service, &ctx.audience, delegate)
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

    /// The clients that trust the CA in `path` (made at the first request of a service that
    /// names it, then kept).
    fn private_ca_clients(
        &self,
        path: &std::path::Path,
    ) -> Result<(PooledClient, PooledClient), ProxyError> {
        let mut cache = self.private_ca.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(path) {
            return Ok(c.clone());
        }
        let bad =
            |e: String| ProxyError::BadUpstream(format!("upstream_ca {}: {e}", path.display()));
        let mut roots = rustls::RootCertStore::empty();
        for cert in crate::tls::load_certs(path).map_err(|e| bad(e.to_string()))? {
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
        let made = clients(connector(tls_with(roots).map_err(|e| bad(e.to_string()))?));
        cache.insert(path.to_owned(), made.clone());
        Ok(made)
    }

    /// The one failure path: answers the caller with the error's status and words, counts it,
    /// and logs and audits it (what a caller caused is limited per source, so a page or a peer
    /// cannot flood the log).
    fn fail(
        &self,
        ctx: &StreamContext,
        method: &http::Method,
        e: ProxyError,
        line: &mut Option<RequestLine>,
    ) -> Response<ProxyBody> {
        let status = e.status();
        let msg = e.to_string();
        match &e {
            ProxyError::Browser { .. } => Metrics::inc(&self.metrics.browser_refused_total),
            ProxyError::BadPath(_) => Metrics::inc(&self.metrics.requests_refused_total),
            _ => Metrics::inc(&self.metrics.upstream_errors_total),
        }
        if !e.caused_by_caller() || self.audit.allow_refusal(ctx.peer) {
            tracing::warn!(service = %ctx.service.name, status = status.as_u16(), reason = %msg, "request answered by the gateway");
            self.audit.record(AuditEvent {
                user: Some(ctx.user.clone()),
                service: Some(ctx.service.name.clone()),
                peer: ctx.peer.map(|p| p.to_string()),
                method: Some(method.to_string()),
                delegate: ctx.delegation.as_ref().map(|d| d.label.clone()),
                outcome: Some(status.as_u16().to_string()),
                reason: Some(msg.clone()),
                ..AuditEvent::new(e.event())
            });
        } else {
            // Over the per-source limit for what callers cause: no request line either.
            *line = None;
        }
        plain(status, &msg)
    }
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

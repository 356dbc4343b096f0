//! The SCIM 2.0 provisioning endpoint (RFC 7643/7644): the organisation's identity provider
//! (Okta, Entra ID, …) pushes users and groups here, so a leaver loses access within seconds
//! and `allow_groups` follows the directory's groups.
//!
//! It has a listener of its own (`[scim] listen`), HTTPS with the `[tls]` certificate unless
//! `insecure_plain_http` is set on a loopback address, and one bearer token read from
//! `[scim] token_file` (kept only as its SHA-256, compared in constant time). A user's `active`
//! is the account's disabled flag, a `DELETE` is `touchgate-gateway remove`, and group
//! memberships land in the store, whose `user_groups` the revocation poller reloads every
//! second: changes reach live sessions and the next stream through that poll, as an admin
//! command from another process does.
//!
//! `scim/parse` reads what clients send (pure), `scim/render` writes the resources (pure),
//! `scim/handlers` routes a request to the store and the audit log; this file is the HTTP
//! shell: TLS, the token, limits and timeouts.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};

use crate::{
    Gateway,
    audit::{AuditEvent, AuditKind},
    browser::untrusted,
    config::{ScimConfig, TlsConfig},
};

mod handlers;
pub mod parse;
pub mod render;

/// The shortest bearer token accepted (characters): a token guessed or brute-forced would
/// let its holder disable or remove every user.
pub const MIN_TOKEN_LEN: usize = 32;

/// Where the endpoint lives: every path is under it.
pub const PREFIX: &str = "/scim/v2";

/// SCIM connections served at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 64;
/// Time a client has for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a request head, and then its body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection is asked to close after this long (gracefully: requests in flight finish).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// Largest request head.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// A SCIM request's failure, as the client is told it (RFC 7644 §3.12).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScimError {
    /// The body is not JSON of the expected shape.
    #[error("{0}")]
    InvalidSyntax(String),
    /// A value is of the wrong type or out of range.
    #[error("{0}")]
    InvalidValue(String),
    /// The filter is not one this endpoint understands.
    #[error("{0}")]
    InvalidFilter(String),
    /// A PATCH path names nothing this endpoint understands.
    #[error("{0}")]
    InvalidPath(String),
    /// A PATCH `remove` without a path.
    #[error("{0}")]
    NoTarget(String),
    /// An attribute that cannot change.
    #[error("{0}")]
    Mutability(String),
    /// The name is taken.
    #[error("{0}")]
    Uniqueness(String),
    /// No such resource or endpoint.
    #[error("{0}")]
    NotFound(String),
    /// The bearer token is missing or wrong.
    #[error(
        "a valid bearer token is required: send `Authorization: Bearer` with the token in [scim] token_file"
    )]
    Unauthorized,
    /// The body is larger than `[scim] max_body_bytes`.
    #[error(
        "the body is larger than {0} bytes: send fewer changes per request, or raise [scim] max_body_bytes"
    )]
    TooLarge(usize),
    /// The body did not arrive in time.
    #[error("the request body did not arrive within {0} seconds")]
    Timeout(u64),
    /// The method is not served on this path.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// A SCIM feature this endpoint does not offer (bulk, sorting, `.search`).
    #[error("{0}")]
    NotImplemented(String),
    /// The store failed.
    #[error("the gateway could not complete the change: {0}")]
    Internal(String),
}

impl ScimError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidSyntax(_)
            | Self::InvalidValue(_)
            | Self::InvalidFilter(_)
            | Self::InvalidPath(_)
            | Self::NoTarget(_)
            | Self::Mutability(_) => StatusCode::BAD_REQUEST,
            Self::Uniqueness(_) => StatusCode::CONFLICT,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `scimType` RFC 7644 gives a 400 or 409 of this kind.
    pub fn scim_type(&self) -> Option<&'static str> {
        Some(match self {
            Self::InvalidSyntax(_) => "invalidSyntax",
            Self::InvalidValue(_) => "invalidValue",
            Self::InvalidFilter(_) => "invalidFilter",
            Self::InvalidPath(_) => "invalidPath",
            Self::NoTarget(_) => "noTarget",
            Self::Mutability(_) => "mutability",
            Self::Uniqueness(_) => "uniqueness",
            _ => return None,
        })
    }
}

/// Why the SCIM endpoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ScimSetupError {
    /// The token file is unusable.
    #[error("[scim] token_file: {0}")]
    Token(String),
    /// The `[tls]` certificate or key is unusable for HTTPS.
    #[error("[scim] cannot serve HTTPS with the [tls] certificate: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// The SHA-256 of the bearer token: the token itself is not kept.
#[derive(Clone)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    /// Whether `presented` is the token, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let other: [u8; 32] = Sha256::digest(presented).into();
        other
            .iter()
            .zip(self.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenDigest(…)")
    }
}

/// Reads the bearer token from `path`: trimmed, at least [`MIN_TOKEN_LEN`] characters, in a
/// file other users can neither read nor write.
pub fn read_token(path: &Path) -> Result<TokenDigest, String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o007 != 0 {
            return Err(format!(
                "{} is open to every user (mode {:o}): it holds the SCIM bearer token; run chmod 600 on it",
                path.display(),
                mode & 0o777
            ));
        }
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let token = text.trim();
    if token.chars().count() < MIN_TOKEN_LEN {
        return Err(format!(
            "the token in {} is shorter than {MIN_TOKEN_LEN} characters: make a long random one, e.g. `openssl rand -hex 32`",
            path.display()
        ));
    }
    Ok(TokenDigest(Sha256::digest(token.as_bytes()).into()))
}

/// The endpoint's settings and TLS, made when the gateway starts.
pub struct Scim {
    cfg: ScimConfig,
    token: TokenDigest,
    tls: Option<tokio_rustls::TlsAcceptor>,
    connections: Arc<tokio::sync::Semaphore>,
}

impl Scim {
    /// Reads the token and, unless `insecure_plain_http`, the `[tls]` certificate and key.
    pub fn new(cfg: &ScimConfig, tls: &TlsConfig) -> Result<Self, ScimSetupError> {
        let token = read_token(&cfg.token_file).map_err(ScimSetupError::Token)?;
        let tls = if cfg.insecure_plain_http {
            None
        } else {
            Some(https_acceptor(tls)?)
        };
        Ok(Self {
            cfg: cfg.clone(),
            token,
            tls,
            connections: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        })
    }

    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        self.cfg.scheme()
    }
}

/// A TLS 1.2/1.3 acceptor with the gateway's certificate, offering HTTP/2 and HTTP/1.1.
fn https_acceptor(tls: &TlsConfig) -> Result<tokio_rustls::TlsAcceptor, crate::tls::TlsError> {
    let certs = crate::tls::load_certs(&tls.cert)?;
    let key = crate::tls::load_key(&tls.key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// What a handler answers: a status, a SCIM body, and the `Location` of a new resource.
pub(crate) struct Answer {
    status: StatusCode,
    body: Option<serde_json::Value>,
    location: Option<String>,
}

impl Gateway {
    /// Serves the SCIM endpoint on `listener` until the task is dropped; returns at once when
    /// the config has no `[scim]`.
    pub async fn serve_scim(self: Arc<Self>, listener: TcpListener) {
        let Some(scim) = self.scim.clone() else {
            tracing::warn!("no [scim] in the config: not serving SCIM");
            return;
        };
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: give others a moment.
                    tracing::warn!(error = %e, "cannot accept a SCIM connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = scim.connections.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "{MAX_CONNECTIONS} SCIM connections open: closing a new one");
                continue;
            };
            let (gw, scim) = (self.clone(), scim.clone());
            tokio::spawn(async move {
                let _permit = permit;
                gw.scim_connection(scim, stream, peer).await;
            });
        }
    }

    async fn scim_connection(
        self: Arc<Self>,
        scim: Arc<Scim>,
        stream: TcpStream,
        peer: SocketAddr,
    ) {
        let _ = stream.set_nodelay(true);
        match scim.tls.clone() {
            Some(acceptor) => {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => self.serve_scim_http(scim, TokioIo::new(tls), peer).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "SCIM TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "SCIM TLS handshake timed out"),
                }
            }
            None => self.serve_scim_http(scim, TokioIo::new(stream), peer).await,
        }
    }

    async fn serve_scim_http<I>(self: Arc<Self>, scim: Arc<Scim>, io: I, peer: SocketAddr)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let svc = hyper::service::service_fn(move |req| {
            let (gw, scim) = (self.clone(), scim.clone());
            async move { Ok::<_, Infallible>(gw.scim_request(&scim, req, peer).await) }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(REQUEST_TIMEOUT)
            .max_buf_size(MAX_HEADER_BYTES);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .max_concurrent_streams(16);
        let conn = builder.serve_connection(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "SCIM connection ended with an error");
                }
            }
            () = tokio::time::sleep(CONNECTION_LIFETIME) => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, conn).await;
            }
        }
    }

    async fn scim_request(
        self: &Arc<Self>,
        scim: &Scim,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        match self.scim_answer(scim, req, peer).await {
            Ok(a) => {
                tracing::info!(%peer, %method, path = %untrusted(&path), status = a.status.as_u16(), ms = started.elapsed().as_millis() as u64, "SCIM request");
                let body = a.body.map(|b| b.to_string()).unwrap_or_default();
                let mut r = response(a.status, body);
                if let Some(l) = a.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
                    r.headers_mut().insert(header::LOCATION, l);
                }
                r
            }
            Err(e) => {
                self.scim_refused(peer, &method, &path, &e);
                let mut r = response(e.status(), render::error(&e).to_string());
                if e == ScimError::Unauthorized {
                    r.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"touchgate SCIM\""),
                    );
                }
                r
            }
        }
    }

    async fn scim_answer(
        self: &Arc<Self>,
        scim: &Scim,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Answer, ScimError> {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()));
        if !presented.is_some_and(|t| scim.token.matches(t)) {
            return Err(ScimError::Unauthorized);
        }
        let path = req.uri().path().trim_end_matches('/');
        let Some(rest) = path
            .strip_prefix(PREFIX)
            .filter(|r| r.is_empty() || r.starts_with('/'))
        else {
            return Err(ScimError::NotFound(format!(
                "no endpoint at {}: SCIM is served under {PREFIX}",
                untrusted(path)
            )));
        };
        let call = handlers::Call {
            method: req.method().clone(),
            path: rest.trim_start_matches('/').to_owned(),
            query: req.uri().query().unwrap_or_default().to_owned(),
            base: base_url(scim, &req),
            peer,
            body: None,
        };
        let body = if matches!(call.method, Method::POST | Method::PUT | Method::PATCH) {
            Some(read_json(req.into_body(), scim.cfg.max_body_bytes).await?)
        } else {
            None
        };
        handlers::route(self, handlers::Call { body, ..call }).await
    }

    /// Audits a refused request, within the per-source limit on refusal lines.
    fn scim_refused(&self, peer: SocketAddr, method: &Method, path: &str, e: &ScimError) {
        tracing::info!(%peer, %method, path = %untrusted(path), status = e.status().as_u16(), reason = %e, "SCIM request refused");
        if !self.audit.allow_refusal(Some(peer)) {
            return;
        }
        let outcome = e
            .scim_type()
            .map(str::to_owned)
            .unwrap_or_else(|| e.status().as_u16().to_string());
        self.audit.record(AuditEvent {
            peer: Some(peer.to_string()),
            method: Some(method.to_string()),
            outcome: Some(outcome),
            reason: Some(format!("{} {}: {e}", e.status().as_u16(), untrusted(path))),
            ..AuditEvent::new(AuditKind::ScimRefused)
        });
    }
}

/// The token of an `Authorization: Bearer …` value.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// `https://HOST/scim/v2`, with the host the client asked for (HTTP/2's `:authority` or
/// HTTP/1's `Host`), or the listen address.
fn base_url(scim: &Scim, req: &Request<Incoming>) -> String {
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<http::uri::Authority>().ok())
                .map(|a| a.as_str().to_owned())
        })
        .unwrap_or_else(|| scim.cfg.listen.to_string());
    format!("{}://{host}{PREFIX}", scim.scheme())
}

/// Reads a JSON body of at most `max` bytes within [`REQUEST_TIMEOUT`].
async fn read_json(body: Incoming, max: usize) -> Result<serde_json::Value, ScimError> {
    use hyper::body::Body as _;
    if body.size_hint().lower() > max as u64 {
        return Err(ScimError::TooLarge(max));
    }
    let bytes = match tokio::time::timeout(REQUEST_TIMEOUT, Limited::new(body, max).collect()).await
    {
        Err(_) => return Err(ScimError::Timeout(REQUEST_TIMEOUT.as_secs())),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ScimError::TooLarge(max));
        }
        Ok(Err(e)) => {
            return Err(ScimError::InvalidSyntax(format!(
                "the body could not be read: {e}"
            )));
        }
        Ok(Ok(b)) => b.to_bytes(),
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| ScimError::InvalidSyntax(format!("the body is not valid JSON: {e}")))
}

fn response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if status != StatusCode::NO_CONTENT {
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/scim+json"),
        );
    }
    r
}

#[cfg(test)]
mod tests;

//! Test helpers that speak the real protocols: a fake GCE metadata server that mints
//! Google-style ID tokens, and a Cloud-Run-like upstream that refuses requests without a valid
//! ID token for its audience. Every server binds the address it is given (tests use
//! 127.0.0.1 port 0) and runs until its task is dropped.
//!
//! The RSA key in this crate signs fake tokens only; it is not a secret and guards nothing.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

pub mod gateway_process;
pub mod hardware;
pub mod http_proxy;
pub mod idp;
pub mod lab;
pub mod netns;
pub mod nginx;
pub mod postgres;
mod programs;
pub mod relay;

/// Issuer of Google ID tokens.
pub const GOOGLE_ISSUER: &str = "https://accounts.google.com";
/// The service account the fake metadata server speaks for.
pub const FAKE_SERVICE_ACCOUNT: &str = "touchgate-gateway@demo-project.iam.gserviceaccount.com";

/// An RSA key (PEM) the tests sign with: the fake Google's, and any key no real provider publishes.
pub const FAKE_GOOGLE_KEY: &str = include_str!("fake_google_key.pem");
const FAKE_GOOGLE_PUB: &str = include_str!("fake_google_pub.pem");

type Body = BoxBody<Bytes, Infallible>;

/// Claims of a Google ID token, as the metadata server issues them with `format=full`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GoogleIdClaims {
    /// Issuer.
    pub iss: String,
    /// Audience (the Cloud Run service URL or a custom audience).
    pub aud: String,
    /// Authorised party.
    pub azp: String,
    /// Subject: the service account's unique id.
    pub sub: String,
    /// The service account's email.
    pub email: String,
    /// Always true for service accounts.
    pub email_verified: bool,
    /// Issued at.
    pub iat: u64,
    /// Expires at.
    pub exp: u64,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Mints an ID token for `audience` as Google would (RS256, one hour).
pub fn mint_id_token(audience: &str) -> anyhow::Result<String> {
    let iat = now();
    let claims = GoogleIdClaims {
        iss: GOOGLE_ISSUER.into(),
        aud: audience.into(),
        azp: "104857600000000000001".into(),
        sub: "104857600000000000001".into(),
        email: FAKE_SERVICE_ACCOUNT.into(),
        email_verified: true,
        iat,
        exp: iat + 3600,
    };
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("fake-google-1".into());
    let key = EncodingKey::from_rsa_pem(FAKE_GOOGLE_KEY.as_bytes())?;
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}

/// Verifies an ID token as a Cloud Run service with `audience` would.
pub fn verify_id_token(token: &str, audience: &str) -> Result<GoogleIdClaims, String> {
    let key = DecodingKey::from_rsa_pem(FAKE_GOOGLE_PUB.as_bytes()).map_err(|e| e.to_string())?;
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&[audience]);
    v.set_issuer(&[GOOGLE_ISSUER]);
    jsonwebtoken::decode::<GoogleIdClaims>(token, &key, &v)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

/// A running fake server.
pub struct FakeServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests served.
    pub requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests served so far.
    pub fn request_count(&self) -> u64 {
        self.requests.load(Relaxed)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve<F, Fut>(listener: TcpListener, handler: F) -> FakeServer
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    counter.fetch_add(1, Relaxed);
                    let h = handler.clone();
                    async move { Ok::<_, Infallible>(h(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    FakeServer {
        addr,
        requests,
        task,
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

/// Starts a fake GCE metadata server: `GET /computeMetadata/v1/instance/service-accounts/default/identity?audience=AUD`
/// with `Metadata-Flavor: Google` answers a signed ID token for AUD.
pub async fn start_metadata_server(listener: TcpListener) -> FakeServer {
    serve(listener, |req: Request<Incoming>| async move {
        if req
            .headers()
            .get("metadata-flavor")
            .and_then(|v| v.to_str().ok())
            != Some("Google")
        {
            return text(
                StatusCode::FORBIDDEN,
                "Missing Metadata-Flavor:Google header.\n",
            );
        }
        if req.uri().path() != "/computeMetadata/v1/instance/service-accounts/default/identity" {
            return text(StatusCode::NOT_FOUND, "Not found\n");
        }
        let Some((_, aud)) = query(&req).into_iter().find(|(k, _)| k == "audience") else {
            return text(
                StatusCode::BAD_REQUEST,
                "non-empty audience parameter required\n",
            );
        };
        match mint_id_token(&aud) {
            Ok(t) => {
                let mut r = text(StatusCode::OK, t);
                r.headers_mut().insert(
                    "metadata-flavor",
                    header::HeaderValue::from_static("Google"),
                );
                r
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    })
    .await
}

/// Byte `i` of the deterministic bulk pattern served by `/bytes`.
pub fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 11)) as u8
}

/// SHA-256 (hex) of the first `n` bytes of the bulk pattern.
pub fn pattern_sha256(n: u64) -> String {
    let mut h = Sha256::new();
    let mut i = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while i < n {
        let len = (n - i).min(buf.len() as u64) as usize;
        for (j, b) in buf[..len].iter_mut().enumerate() {
            *b = pattern_byte(i + j as u64);
        }
        h.update(&buf[..len]);
        i += len as u64;
    }
    hex::encode(h.finalize())
}

/// Starts a Cloud-Run-like upstream for `audience`. Like Cloud Run with IAM on, it refuses a
/// request without a valid Google ID token for its audience (from `X-Serverless-Authorization`,
/// or `Authorization` when that is absent) and passes `Authorization` to the app untouched.
///
/// - `GET /bytes?n=N` streams N bytes of the bulk pattern;
/// - `GET /slow?ms=N` answers after N milliseconds;
/// - `POST /upload` streams the body in and answers its length and SHA-256;
/// - `GET /redirect` sets a cookie for the service's own domain and redirects to its own
///   absolute URL of `GET /landing`, an HTML page showing the request's headers and, by script,
///   the address the browser is on;
/// - `GET /app` is a page of an app that checks `Origin` against `Host` as web frameworks do:
///   its `POST /app/submit` and WebSocket `/app/ws` answer 403 to another origin;
/// - a request with `Upgrade: echo` is switched to a raw echo of bytes;
/// - anything else answers a JSON echo of method, path, headers and the token's claims.
pub async fn start_cloud_run(listener: TcpListener, audience: &str) -> FakeServer {
    let audience: Arc<str> = audience.into();
    serve(listener, move |req: Request<Incoming>| {
        let audience = audience.clone();
        async move { cloud_run(req, &audience).await }
    })
    .await
}

/// A private CA and a server certificate it signed for `localhost` and 127.0.0.1: what an
/// internal service behind a company CA has.
pub struct PrivateCa {
    /// The CA certificate, PEM (what `upstream_ca` names).
    pub ca_pem: String,
    /// The server's certificate, DER.
    pub leaf: rustls::pki_types::CertificateDer<'static>,
    /// The server's key, PKCS#8 DER.
    pub leaf_key: Vec<u8>,
    /// The server's certificate and key, PEM (for servers started as other programs).
    pub leaf_pem: (String, String),
}

impl PrivateCa {
    /// A fresh CA and server certificate.
    pub fn new() -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key)?;
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?
            .signed_by(&leaf_key, &rcgen::Issuer::from_params(&ca_params, &ca_key))?;
        Ok(Self {
            ca_pem: ca.pem(),
            leaf: leaf.der().clone(),
            leaf_key: leaf_key.serialize_der(),
            leaf_pem: (leaf.pem(), leaf_key.serialize_pem()),
        })
    }
}

/// A TLS client that trusts only the certificates in the PEM file at `ca_path` (a test CA's, or
/// a self-signed server's) and offers HTTP/1.1 by ALPN, as a WebSocket client does.
pub fn tls_connector(ca_path: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", ca_path.display()))?
    {
        roots.add(cert.map_err(|e| anyhow::anyhow!("{}: {e}", ca_path.display()))?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// [`start_cloud_run`] over HTTPS, with a certificate for `localhost` and 127.0.0.1 signed by
/// a private CA made here: what an internal service behind a company CA looks like. Returns
/// the server and the CA's PEM.
pub async fn start_cloud_run_private_ca(
    listener: TcpListener,
    audience: &str,
) -> anyhow::Result<(FakeServer, String)> {
    let ca = PrivateCa::new()?;
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(
        vec![ca.leaf.clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(ca.leaf_key.clone().into()),
    )?;
    let mut tls = tls;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let addr = listener.local_addr()?;
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    let audience: Arc<str> = audience.into();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, counter, audience) =
                (acceptor.clone(), counter.clone(), audience.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    counter.fetch_add(1, Relaxed);
                    let audience = audience.clone();
                    async move { Ok::<_, Infallible>(cloud_run(req, &audience).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((
        FakeServer {
            addr,
            requests,
            task,
        },
        ca.ca_pem,
    ))
}

async fn cloud_run(mut req: Request<Incoming>, audience: &str) -> Response<Body> {
    let h = req.headers();
    let bearer = h
        .get("x-serverless-authorization")
        .or_else(|| h.get(header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let Some(bearer) = bearer else {
        return text(
            StatusCode::UNAUTHORIZED,
            "Your client does not have permission to the requested URL (no ID token).\n",
        );
    };
    let claims = match verify_id_token(&bearer, audience) {
        Ok(c) => c,
        Err(e) => {
            return text(
                StatusCode::FORBIDDEN,
                format!(
                    "Your client does not have permission to get URL (ID token refused: {e}).\n"
                ),
            );
        }
    };
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if upgrade.as_deref() == Some("websocket") && req.uri().path() == "/app/ws" {
        return app_websocket(req);
    }
    if upgrade.as_deref() == Some("echo") {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()).boxed());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert(header::UPGRADE, header::HeaderValue::from_static("echo"));
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
        return r;
    }
    match (req.method().as_str(), req.uri().path()) {
        // Refuses at once, without reading the body (as a size or auth check would).
        ("PUT", "/too-large") => text(StatusCode::PAYLOAD_TOO_LARGE, "too large\n"),
        ("GET", "/redirect") => {
            // Where a real service would send the caller: its own absolute URL.
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("localhost")
                .to_owned();
            let name = host.split(':').next().unwrap_or_default().to_owned();
            let mut r = text(StatusCode::FOUND, "moved\n");
            if let (Ok(loc), Ok(cookie)) = (
                header::HeaderValue::from_str(&format!("http://{host}/landing?from=redirect")),
                header::HeaderValue::from_str(&format!("sid=abc; Path=/; Domain={name}; HttpOnly")),
            ) {
                r.headers_mut().insert(header::LOCATION, loc);
                r.headers_mut().insert(header::SET_COOKIE, cookie);
            }
            r
        }
        ("GET", "/landing") => {
            // Escaped for HTML: a header value may hold `<` or `&`.
            let seen = headers_json(&req)
                .to_string()
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;");
            html(LANDING_PAGE.replace("__REQUEST__", &seen))
        }
        ("GET", "/app") => html(APP_PAGE),
        ("POST", "/app/submit") => match origin_of_host(&req) {
            Ok(origin) => text(StatusCode::OK, format!("accepted from {origin}")),
            Err(refusal) => text(StatusCode::FORBIDDEN, refusal),
        },
        ("GET", "/slow") => {
            let ms: u64 = query(&req)
                .into_iter()
                .find(|(k, _)| k == "ms")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(1000);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            text(StatusCode::OK, "finally\n")
        }
        ("GET", "/bytes") => {
            let n: u64 = query(&req)
                .into_iter()
                .find(|(k, _)| k == "n")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let stream = futures_util::stream::unfold(0u64, move |i| async move {
                if i >= n {
                    return None;
                }
                let len = (n - i).min(64 * 1024);
                let chunk: Vec<u8> = (i..i + len).map(pattern_byte).collect();
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))),
                    i + len,
                ))
            });
            let mut r = Response::new(StreamBody::new(stream).boxed());
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, header::HeaderValue::from(n));
            r
        }
        ("POST", "/upload") => {
            let mut body = req.into_body();
            let mut h = Sha256::new();
            let mut len = 0u64;
            let mut trailers = serde_json::Map::new();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            len += d.len() as u64;
                            h.update(d);
                        }
                        if let Some(t) = f.trailers_ref() {
                            for (k, v) in t {
                                trailers.insert(k.to_string(), v.to_str().unwrap_or("").into());
                            }
                        }
                    }
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("body error: {e}")),
                }
            }
            json(&serde_json::json!({
                "len": len,
                "sha256": hex::encode(h.finalize()),
                "trailers": trailers,
            }))
        }
        _ => json(&serde_json::json!({
            "service": "fake-cloud-run",
            "method": req.method().as_str(),
            "path": req.uri().path(),
            "version": format!("{:?}", req.version()),
            "headers": headers_json(&req),
            "id_token": { "aud": claims.aud, "email": claims.email, "iss": claims.iss },
        })),
    }
}

/// A request's headers as a JSON object.
fn headers_json(req: &Request<Incoming>) -> serde_json::Value {
    req.headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").into()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn html(body: impl Into<String>) -> Response<Body> {
    let mut r = text(StatusCode::OK, body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

/// Where `/redirect` sends the caller. `#url` shows the address the browser ended on.
const LANDING_PAGE: &str = r#"<!doctype html>
<html><head><title>landing</title></head><body>
<p id="landed">landed</p>
<pre id="request">__REQUEST__</pre>
<p id="url"></p>
<script>document.getElementById("url").textContent = location.href;</script>
</body></html>
"#;

/// The origin-checking app's page: it posts to `/app/submit` and opens `/app/ws`, writes each
/// outcome into `#submit` and `#ws`, then sets the title to `done`. With `?hold=ORIGIN` its
/// load event (when a headless browser prints the page) waits for `ORIGIN/hold`, which a test's
/// own site answers once the page has asked for `ORIGIN/finished`.
const APP_PAGE: &str = r#"<!doctype html>
<html><head><title>running</title></head><body>
<img id="hold" alt="">
<p id="submit"></p>
<p id="ws"></p>
<script>
const hold = new URLSearchParams(location.search).get("hold");
if (hold) document.getElementById("hold").src = hold + "/hold";
const show = (id, what) => { document.getElementById(id).textContent = what; };
async function run() {
  try {
    const r = await fetch("/app/submit", { method: "POST", body: "hello" });
    show("submit", r.status + " " + (await r.text()));
  } catch (e) { show("submit", "failed " + e); }
  await new Promise((done) => {
    const ws = new WebSocket("ws://" + location.host + "/app/ws");
    ws.onopen = () => ws.send("hello");
    ws.onmessage = (e) => { show("ws", "message " + e.data); done(); };
    ws.onclose = (e) => {
      if (!document.getElementById("ws").textContent) show("ws", "closed " + e.code);
      done();
    };
  });
  document.title = "done";
  if (hold) await fetch(hold + "/finished", { mode: "no-cors" });
}
run();
</script></body></html>
"#;

/// The request's `Origin` when it names the host and port of its `Host`, the check frameworks
/// make against cross-site requests (gorilla/websocket's default `CheckOrigin`, for one); else
/// why not.
fn origin_of_host(req: &Request<Incoming>) -> Result<String, String> {
    let h = req.headers();
    let origin = h
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    match url::Url::parse(origin) {
        Ok(u)
            if u[url::Position::BeforeHost..url::Position::AfterPort]
                .eq_ignore_ascii_case(host) =>
        {
            Ok(origin.to_owned())
        }
        _ => Err(format!("refused: Origin {origin:?} is not Host {host:?}\n")),
    }
}

/// The app's WebSocket: refused to another origin; else accepted (RFC 6455 handshake), and
/// once the browser's first message has arrived the app sends one text message back. The
/// browser's frames are masked and are not decoded: hearing bytes is enough for the test.
fn app_websocket(mut req: Request<Incoming>) -> Response<Body> {
    use base64::Engine as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if let Err(refusal) = origin_of_host(&req) {
        return text(StatusCode::FORBIDDEN, refusal);
    }
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return text(StatusCode::BAD_REQUEST, "no Sec-WebSocket-Key\n");
    };
    let accept = <sha1::Sha1 as sha1::Digest>::digest(
        [key.as_bytes(), b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"].concat(),
    );
    let Ok(accept) =
        header::HeaderValue::from_str(&base64::engine::general_purpose::STANDARD.encode(accept))
    else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "bad accept key\n");
    };
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(up) = on.await else { return };
        let mut io = TokioIo::new(up);
        let mut first = [0u8; 1024];
        if matches!(io.read(&mut first).await, Ok(n) if n > 0) {
            // One unmasked, final text frame (RFC 6455 section 5.2).
            let message = b"heard you";
            let mut frame = vec![0x81, message.len() as u8];
            frame.extend_from_slice(message);
            let _ = io.write_all(&frame).await;
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_for_their_audience_only() {
        let t = mint_id_token("https://svc.a.run.app").expect("mint");
        assert_eq!(
            verify_id_token(&t, "https://svc.a.run.app")
                .expect("valid")
                .email,
            FAKE_SERVICE_ACCOUNT
        );
        assert!(verify_id_token(&t, "https://other.a.run.app").is_err());
    }

    #[test]
    fn pattern_hash_is_stable() {
        assert_eq!(pattern_sha256(0), hex::encode(Sha256::digest(b"")));
        let bytes: Vec<u8> = (0..100_000).map(pattern_byte).collect();
        assert_eq!(pattern_sha256(100_000), hex::encode(Sha256::digest(&bytes)));
    }
}

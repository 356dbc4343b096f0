//! The agent's side of the TCP carrier (`touchgate-carrier`): when UDP does not get through,
//! the same QUIC connection runs over a WebSocket on TCP — to the gateway's own TLS listener at
//! its QUIC address, or to a front end that terminates TLS (`wss://` addresses), directly or
//! through an HTTP proxy (CONNECT). The outer TLS is only the carrier's: to the gateway itself
//! it is checked like the inner one (pin or CA), to a front end against the system's roots
//! (`SSL_CERT_FILE` included) and `gateway_ca`. The inner QUIC TLS, with the session key's
//! certificate and the channel binding, is the same as over UDP.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use http::{HeaderValue, Uri};
use hyper_util::{client::proxy::matcher::Matcher, rt::TokioIo};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use touchgate_carrier::Ended;

use super::{Candidate, TunnelError};
use crate::config::{AgentConfig, GatewayAddr};

/// How long the carrier's TCP connection, its proxy's CONNECT, its TLS and its WebSocket
/// handshake may take together, before QUIC's own handshake.
const OPEN_TIMEOUT: Duration = Duration::from_secs(8);

/// How a connection reaches the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Link {
    /// QUIC on UDP.
    #[default]
    Quic,
    /// QUIC over the TCP carrier.
    Tcp {
        /// Why TCP.
        why: Why,
        /// The HTTP proxy it goes through (`host:port`), if any.
        proxy: Option<String>,
    },
}

/// Why a connection went over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// QUIC got no answer in time: UDP seems blocked.
    UdpBlocked,
    /// `transport = "tcp"`.
    Configured,
    /// The address is a front end's `wss://` URL.
    FrontEnd,
}

impl Link {
    /// The transport in words, for `touchgate status` and the tray: `QUIC`, or
    /// `TCP: UDP seems blocked on this network` and the like.
    pub fn describe(&self) -> String {
        match self {
            Self::Quic => "QUIC".into(),
            Self::Tcp { why, proxy } => {
                let why = match why {
                    Why::UdpBlocked => "TCP: UDP seems blocked on this network",
                    Why::Configured => "TCP (transport = \"tcp\")",
                    Why::FrontEnd => "TCP through the gateway's front end",
                };
                match proxy {
                    Some(p) => format!("{why}, through the proxy {p}"),
                    None => why.to_owned(),
                }
            }
        }
    }

    /// Whether this is the carrier.
    pub fn is_tcp(&self) -> bool {
        matches!(self, Self::Tcp { .. })
    }
}

/// The `proxy` setting.
#[derive(Debug, Clone)]
pub enum ProxySetting {
    /// `HTTPS_PROXY` / `https_proxy` (or `ALL_PROXY`), honouring `NO_PROXY`.
    Environment,
    /// `"none"`: never a proxy.
    Never,
    /// This proxy, honouring `NO_PROXY`.
    Url(String),
}

impl ProxySetting {
    /// Reads a `proxy` value: `none`, or `http://[user:password@]host:port`.
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.eq_ignore_ascii_case("none") {
            return Ok(Self::Never);
        }
        let uri: Uri = value
            .parse()
            .map_err(|e| format!("is not a URL ({e}): write http://[user:password@]host:port"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "is a {other}:// URL: only an http:// proxy (CONNECT) is supported"
                ));
            }
            None => return Err("has no scheme: write http://[user:password@]host:port".into()),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err("has no host: write http://[user:password@]host:port".into());
        }
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err("has a path: write http://[user:password@]host:port".into());
        }
        Ok(Self::Url(value.to_owned()))
    }

    /// The setting of `cfg`: its `proxy`, else the environment.
    pub fn of(cfg: &AgentConfig) -> Result<Self, TunnelError> {
        match &cfg.proxy {
            None => Ok(Self::Environment),
            Some(p) => Self::parse(p).map_err(|e| TunnelError::Tls(format!("proxy {e}"))),
        }
    }

    fn matcher(&self) -> Option<Matcher> {
        match self {
            Self::Never => None,
            Self::Environment => Some(Matcher::from_env()),
            Self::Url(url) => {
                let no = ["NO_PROXY", "no_proxy"]
                    .iter()
                    .find_map(|k| std::env::var(k).ok())
                    .unwrap_or_default();
                Some(Matcher::builder().https(url.clone()).no(no).build())
            }
        }
    }
}

/// Where one carrier goes.
#[derive(Debug, Clone)]
pub struct Target {
    /// The configured address it comes from.
    pub configured: String,
    /// The host and port the TCP connection (or the proxy's CONNECT) goes to.
    pub host: String,
    /// The port.
    pub port: u16,
    /// The address to connect to, when already resolved (no proxy).
    pub addr: Option<SocketAddr>,
    /// The WebSocket URL.
    pub url: String,
    /// The inner (QUIC) TLS name of the gateway.
    pub server_name: String,
    /// Whether a front end terminates the carrier's TLS (a `wss://` address).
    pub front_end: bool,
}

impl Target {
    /// The carrier to a configured address: to the gateway's own TLS listener at the QUIC
    /// `host:port` (the resolved `addr` when given), or the `wss://` URL of a front end.
    pub fn of(cfg: &AgentConfig, configured: &str, addr: Option<SocketAddr>) -> Option<Self> {
        let server_name = cfg.server_name_for(configured);
        match GatewayAddr::parse(configured).ok()? {
            GatewayAddr::Direct { host, port } => Some(Self {
                configured: configured.to_owned(),
                host: host.to_owned(),
                port,
                addr,
                url: format!("wss://{}:{port}{}", url_host(host), touchgate_carrier::PATH),
                server_name,
                front_end: false,
            }),
            GatewayAddr::FrontEnd { url, host, port } => Some(Self {
                configured: configured.to_owned(),
                host,
                port,
                addr: None,
                url: url.to_owned(),
                server_name,
                front_end: true,
            }),
        }
    }
}

/// Opens carriers and QUIC connections over them.
pub struct CarrierDialer {
    /// The QUIC client settings, tuned for the carrier.
    client: quinn::ClientConfig,
    /// The outer TLS to the gateway's own listener: checked like the inner one.
    direct_tls: Arc<rustls::ClientConfig>,
    /// The outer TLS to a front end: the system's roots and `gateway_ca`; made when first
    /// needed (reading the system's roots takes a moment).
    front_tls: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
    gateway_ca: Option<std::path::PathBuf>,
    proxy: Option<Matcher>,
}

/// A QUIC connection over a carrier, and what keeps the carrier going.
pub struct Opened {
    /// The connection.
    pub conn: quinn::Connection,
    /// The endpoint on the carrier (one per carrier).
    pub endpoint: quinn::Endpoint,
    /// The peer of the TCP connection (the gateway, the front end or the proxy).
    pub peer: SocketAddr,
    /// The proxy's `host:port`, when there is one.
    pub proxy: Option<String>,
}

/// Aborts the carrier's task when an attempt is given up before its connection is handed on.
struct AbortOnDrop(Option<tokio::task::JoinHandle<Ended>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

impl CarrierDialer {
    /// The carrier dialer of `cfg`, presenting `key` on the inner connection.
    pub fn new(cfg: &AgentConfig, key: &super::SessionKey) -> Result<Self, TunnelError> {
        let client = super::client_config_for(cfg, key, true)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TunnelError::Tls(e.to_string()))?;
        let mut direct = super::verified_gateway(builder, cfg, &provider)?.with_no_client_auth();
        direct.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            client,
            direct_tls: Arc::new(direct),
            front_tls: std::sync::OnceLock::new(),
            gateway_ca: cfg.gateway_ca.clone(),
            proxy: ProxySetting::of(cfg)?.matcher(),
        })
    }

    fn front_tls(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        self.front_tls
            .get_or_init(|| front_end_tls(self.gateway_ca.as_deref()).map(Arc::new))
            .clone()
    }

    /// Whether the carrier to `target` goes through a proxy.
    pub fn proxied(&self, target: &Target) -> bool {
        proxy_for(self.proxy.as_ref(), target).is_some()
    }

    /// Opens a carrier to `target` and a QUIC connection over it.
    pub fn connect(
        &self,
        target: &Target,
    ) -> Pin<Box<dyn Future<Output = Result<Opened, String>> + Send + 'static>> {
        let proxy = proxy_for(self.proxy.as_ref(), target);
        let tls = if target.front_end {
            self.front_tls()
        } else {
            Ok(self.direct_tls.clone())
        };
        let (client, target) = (self.client.clone(), target.clone());
        Box::pin(async move {
            let tls = tls?;
            let proxy_name = proxy.as_ref().map(|(u, _)| proxy_shown(u));
            let (carrier, peer) = tokio::time::timeout(OPEN_TIMEOUT, open(&target, proxy, tls))
                .await
                .map_err(|_| {
                    format!(
                        "no carrier within {}s (the gateway's TCP port, or the proxy, does not answer)",
                        OPEN_TIMEOUT.as_secs()
                    )
                })??;
            let mut guard = AbortOnDrop(Some(carrier.ended));
            let endpoint = quinn::Endpoint::new_with_abstract_socket(
                touchgate_carrier::endpoint_config(),
                None,
                carrier.hub,
                Arc::new(quinn::TokioRuntime),
            )
            .map_err(|e| e.to_string())?;
            let conn = endpoint
                .connect_with(client, carrier.gateway, &target.server_name)
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            if let Some(ended) = guard.0.take() {
                tokio::spawn(watch(endpoint.clone(), ended));
            }
            Ok(Opened {
                conn,
                endpoint,
                peer,
                proxy: proxy_name,
            })
        })
    }
}

/// The proxy to `target` and its credentials, if one applies (`NO_PROXY` honoured).
fn proxy_for(m: Option<&Matcher>, target: &Target) -> Option<(Uri, Option<HeaderValue>)> {
    let dst: Uri = format!("https://{}:{}", url_host(&target.host), target.port)
        .parse()
        .ok()?;
    let i = m?.intercept(&dst)?;
    Some((i.uri().clone(), i.basic_auth().cloned()))
}

/// Refuses a proxy this agent cannot speak to safely: only `http://` (a `CONNECT` in plain
/// HTTP). An `https://` or `socks5://` one from the environment is refused before anything is
/// sent, so that its credentials never go out in the clear.
fn check_proxy_scheme(proxy: &Uri) -> Result<(), String> {
    match proxy.scheme_str() {
        Some("http") => Ok(()),
        other => Err(format!(
            "through the proxy {}: a {}:// proxy is not supported (only http://, with CONNECT): \
             set proxy = \"http://…\" in the config, or \"none\"",
            proxy_shown(proxy),
            other.unwrap_or("schemeless")
        )),
    }
}

/// A host as a URL writes it (an IPv6 address in brackets).
fn url_host(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// Keeps a carrier until its QUIC connection is over, and ends the connection at once when
/// the carrier ends first (a proxy or front end cut it), so the agent reconnects without
/// waiting for QUIC to notice the silence.
async fn watch(endpoint: quinn::Endpoint, mut ended: tokio::task::JoinHandle<Ended>) {
    tokio::select! {
        () = endpoint.wait_idle() => ended.abort(),
        how = &mut ended => {
            let how = how.map_or_else(|e| e.to_string(), |h| h.to_string());
            tracing::info!(%how, "the TCP carrier ended");
            endpoint.close(
                touchgate_proto::close::AGENT_DONE.into(),
                b"the carrier ended",
            );
        }
    }
}

/// A byte stream the carrier runs on: a TCP connection, or a tunnel through a proxy.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// The TCP connection (through the proxy when given), the outer TLS and the WebSocket.
async fn open(
    target: &Target,
    proxy: Option<(Uri, Option<HeaderValue>)>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(touchgate_carrier::client::Carrier, SocketAddr), String> {
    let (io, peer): (Box<dyn Io>, SocketAddr) = match proxy {
        Some((proxy, auth)) => through_proxy(target, &proxy, auth).await?,
        None => {
            let tcp = match target.addr {
                Some(a) => TcpStream::connect(a).await,
                None => TcpStream::connect((target.host.as_str(), target.port)).await,
            }
            .map_err(|e| format!("cannot connect: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let peer = tcp.peer_addr().map_err(|e| e.to_string())?;
            (Box::new(tcp), peer)
        }
    };
    // The outer TLS name: the front end's host, or the gateway's own name.
    let name = if target.front_end {
        target.host.clone()
    } else {
        target.server_name.clone()
    };
    let name = ServerName::try_from(name.clone())
        .map_err(|_| format!("{name:?} is not a TLS server name"))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, io)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let carrier = touchgate_carrier::client::open(stream, &target.url)
        .await
        .map_err(|e| e.to_string())?;
    Ok((carrier, peer))
}

/// A tunnel to `target` through the HTTP `proxy`: `CONNECT host:port`, with the Basic
/// credentials of the proxy's URL when it has them (hyper writes the request and reads the
/// answer).
async fn through_proxy(
    target: &Target,
    proxy: &Uri,
    auth: Option<HeaderValue>,
) -> Result<(Box<dyn Io>, SocketAddr), String> {
    check_proxy_scheme(proxy)?;
    let shown = proxy_shown(proxy);
    let fail = |what: String| format!("through the proxy {shown}: {what}");
    let host = proxy.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((host, proxy.port_u16().unwrap_or(80)))
        .await
        .map_err(|e| fail(format!("cannot connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let peer = tcp.peer_addr().map_err(|e| fail(e.to_string()))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| fail(e.to_string()))?;
    tokio::spawn(conn.with_upgrades());
    let authority = format!("{}:{}", url_host(&target.host), target.port);
    let mut req = http::Request::connect(authority.as_str()).header(http::header::HOST, &authority);
    if let Some(auth) = auth {
        req = req.header(http::header::PROXY_AUTHORIZATION, auth);
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let status = resp.status();
    if !status.is_success() {
        let hint = match status.as_u16() {
            // tinyproxy says 401.
            401 | 407 => ": check the user and password in the proxy setting or HTTPS_PROXY",
            403 => {
                ": the proxy does not allow this destination (ask whoever runs it to allow CONNECT to the gateway's port)"
            }
            _ => "",
        };
        return Err(fail(format!("it refused the tunnel with {status}{hint}")));
    }
    let upgraded = hyper::upgrade::on(resp)
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok((Box::new(TokioIo::new(upgraded)), peer))
}

/// A proxy as shown to people: `host:port`, never its credentials.
fn proxy_shown(proxy: &Uri) -> String {
    proxy
        .authority()
        .map(|a| a.as_str().rsplit('@').next().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

/// The outer TLS settings for a front end: the system's roots (`SSL_CERT_FILE` and
/// `SSL_CERT_DIR` honoured) and `gateway_ca`.
fn front_end_tls(gateway_ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if let Some(ca) = gateway_ca {
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("cannot read gateway_ca {}: {e}", ca.display()))?;
        for c in certs {
            let c = c.map_err(|e| format!("bad certificate in {}: {e}", ca.display()))?;
            roots.add(c).map_err(|e| e.to_string())?;
        }
    }
    if roots.is_empty() {
        let why = found
            .errors
            .first()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(format!(
            "no trusted root certificates to check the front end with{why} \
             (install the system's CA certificates, set SSL_CERT_FILE, or set gateway_ca)"
        ));
    }
    tracing::debug!(system_roots = added, "front end roots loaded");
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// The candidate a won carrier attempt stands for.
pub fn candidate(target: &Target, opened: &Opened, why: Why) -> Candidate {
    Candidate {
        configured: target.configured.clone(),
        addr: opened.peer,
        server_name: target.server_name.clone(),
        link: Link::Tcp {
            why: if target.front_end { Why::FrontEnd } else { why },
            proxy: opened.proxy.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_setting_is_an_http_url_or_none() {
        assert!(matches!(
            ProxySetting::parse("none"),
            Ok(ProxySetting::Never)
        ));
        assert!(matches!(
            ProxySetting::parse("http://user:pw@proxy.corp.example:3128"),
            Ok(ProxySetting::Url(_))
        ));
        for (bad, words) in [
            ("https://proxy.corp.example:3128", "only an http:// proxy"),
            ("socks5://proxy.corp.example:1080", "only an http:// proxy"),
            ("proxy.corp.example:3128", "scheme"),
            ("http://proxy.corp.example:3128/path", "has a path"),
            ("http://", "not a URL"),
        ] {
            let e = ProxySetting::parse(bad).expect_err(bad);
            assert!(e.contains(words), "{bad}: {e}");
        }
    }

    #[test]
    fn no_proxy_names_hosts_that_go_direct() {
        let m = Matcher::builder()
            .https("http://u:p@proxy.corp.example:3128")
            .no(".internal.example, 10.0.0.0/8")
            .build();
        let dialer = |host: &str| {
            let t = Target {
                configured: format!("{host}:443"),
                host: host.into(),
                port: 443,
                addr: None,
                url: String::new(),
                server_name: host.into(),
                front_end: false,
            };
            proxy_for(Some(&m), &t)
        };
        let (uri, auth) = dialer("gw.corp.example").expect("through the proxy");
        check_proxy_scheme(&uri).expect("http");
        let https: Uri = "https://u:p@proxy.corp.example:3128".parse().expect("uri");
        let e = check_proxy_scheme(&https).expect_err("https proxy");
        assert!(e.contains("a https:// proxy is not supported"), "{e}");
        assert!(!e.contains("u:p"), "no credentials shown: {e}");
        assert_eq!(
            uri.authority().map(|a| a.host()),
            Some("proxy.corp.example")
        );
        assert_eq!(
            auth.as_ref().and_then(|a| a.to_str().ok()),
            Some("Basic dTpw")
        );
        assert!(dialer("gw.internal.example").is_none());
        assert!(dialer("10.1.2.3").is_none());
    }

    #[test]
    fn the_transport_is_told_in_words() {
        assert_eq!(Link::Quic.describe(), "QUIC");
        assert_eq!(
            Link::Tcp {
                why: Why::UdpBlocked,
                proxy: None
            }
            .describe(),
            "TCP: UDP seems blocked on this network"
        );
        assert_eq!(
            Link::Tcp {
                why: Why::FrontEnd,
                proxy: Some("proxy.corp.example:3128".into())
            }
            .describe(),
            "TCP through the gateway's front end, through the proxy proxy.corp.example:3128"
        );
    }
}

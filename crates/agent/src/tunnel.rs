//! The QUIC connection to the gateway: TLS with the in-memory session key, the control stream,
//! and data streams.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{
        CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime, pem::PemObject,
    },
};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use touchgate_proto::{
    ClientMsg, EXPORTER_LABEL, EXPORTER_LEN, Refusal, ServerMsg, SessionInfo, StreamOpen,
    StreamReply,
};
use webauthn_rs_proto::{CreationChallengeResponse, RequestChallengeResponse};

use crate::{
    authenticator::{Authenticator, AuthnError, Ceremony, client_data_json},
    config::{AgentConfig, normalise_fingerprint},
};
use touchgate_common::wire::{WireError, read_frame, write_frame};

pub mod carrier;
pub mod dial;

pub use carrier::Link;
pub use dial::{Candidate, Dialer, Order};

/// How often the agent pings a quiet connection. The gateway's answers are what tell the agent
/// it is still there.
pub const KEEP_ALIVE: Duration = Duration::from_millis(500);

/// How long the agent hears nothing from the gateway before it takes the connection as lost and
/// resumes the session on another gateway (or the same one, back): two keep-alive intervals, in
/// which QUIC also resends an unanswered ping at each of its probe timeouts, so one lost packet
/// costs nothing. QUIC never gives up sooner than three probe timeouts, so on a slow path this
/// stretches by itself. The gateway takes the shorter of its own idle timeout and this one.
pub const DEAD_AFTER: Duration = Duration::from_secs(1);

/// Where the user finishes a device enrolment (RFC 8628), as the gateway relays it.
#[derive(Debug, Clone)]
pub struct DeviceCode {
    /// The provider as users know it.
    pub name: String,
    /// The page to open on any device.
    pub verification_uri: String,
    /// The same page with the code filled in, if the provider has one.
    pub verification_uri_complete: Option<String>,
    /// The code to enter.
    pub user_code: String,
    /// Seconds until the code expires.
    pub expires_in: u64,
}

/// Errors talking to the gateway.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The gateway could not be reached or the handshake failed.
    #[error("cannot connect to the gateway at {addr}: {reason}")]
    Connect {
        /// The gateway address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The gateway refused the request.
    #[error("the gateway refused: {0}")]
    Refused(#[from] Refusal),
    /// The sign-in with the identity provider in the browser failed.
    #[error("signing in with your organisation failed: {0}")]
    Idp(String),
    /// The gateway answered something unexpected.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection failed.
    #[error("the connection to the gateway was lost: {0}")]
    Lost(String),
    /// The authenticator failed.
    #[error(transparent)]
    Authenticator(#[from] AuthnError),
    /// Local TLS setup failed.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The gateway asked the key to sign for another site than this agent's own (a wrong or
    /// impersonated gateway relaying a sign-in); the key was not asked.
    #[error(
        "the gateway asked to sign for {asked}, but this agent signs only for {expected} ({setting}): \
         you may be talking to the wrong gateway — check the gateway address with your admin"
    )]
    ForeignSite {
        /// What the gateway's challenge named (an rp id, or an origin).
        asked: String,
        /// What this agent signs for.
        expected: String,
        /// The agent setting that says so (`rp_id` or `origin`).
        setting: &'static str,
    },
    /// The gateway's sign-in options name no credential, so any key's credential for the site
    /// would do; the key was not asked.
    #[error(
        "the gateway asked for a sign-in without naming which key may answer (an empty allowCredentials): \
         this agent answers only challenges for the keys enrolled with its gateway — check the gateway address with your admin"
    )]
    NoAllowedCredentials,
}

impl TunnelError {
    /// The gateway's refusal, if that is what this is.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            Self::Refused(r) => Some(r),
            _ => None,
        }
    }
}

impl From<WireError> for TunnelError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Io(e) => Self::Lost(e.to_string()),
            WireError::Frame(e) => Self::Protocol(e.to_string()),
        }
    }
}

/// The agent's session key: a fresh P-256 key and self-signed certificate, in memory only.
pub struct SessionKey {
    cert: CertificateDer<'static>,
    key_pkcs8: Vec<u8>,
}

impl SessionKey {
    /// Makes a new session key.
    pub fn generate() -> Result<Self, TunnelError> {
        let (cert, kp) = self_signed("touchgate-session").map_err(TunnelError::Tls)?;
        Ok(Self {
            cert: cert.der().clone(),
            key_pkcs8: kp.serialize_der(),
        })
    }

    /// A session key from a certificate and its private key (PKCS#8 DER): a delegate's.
    pub fn from_parts(cert: CertificateDer<'static>, key_pkcs8: Vec<u8>) -> Self {
        Self { cert, key_pkcs8 }
    }

    /// The certificate's thumbprint as the gateway's `cnf` claim names it.
    pub fn thumbprint(&self) -> String {
        cert_thumbprint(&self.cert)
    }
}

/// A fresh P-256 key and a self-signed certificate for it, named `name`.
pub(crate) fn self_signed(name: &str) -> Result<(rcgen::Certificate, rcgen::KeyPair), String> {
    let kp =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let params = rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(|e| e.to_string())?;
    let cert = params.self_signed(&kp).map_err(|e| e.to_string())?;
    Ok((cert, kp))
}

/// A certificate's thumbprint as the gateway's `cnf` claim names it: base64url SHA-256 of its
/// DER.
pub fn cert_thumbprint(cert_der: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(cert_der))
}

/// Builds a QUIC client endpoint whose connections present `key` and verify the gateway as the
/// config says (pinned fingerprint or CA).
pub fn client_endpoint(
    cfg: &AgentConfig,
    key: &SessionKey,
) -> Result<quinn::Endpoint, TunnelError> {
    let client = client_config(cfg, key)?;
    let v4 = SocketAddr::from(([0, 0, 0, 0], 0));
    let socket = if only_ipv4(cfg) {
        udp_socket(v4)
    } else {
        // One dual-stack socket reaches IPv6 and IPv4 addresses alike, whatever a name
        // resolves to; a machine without IPv6 gets an IPv4 socket, and IPv6 addresses are then
        // skipped with a reason.
        udp_socket(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)))
            .or_else(|_| udp_socket(v4))
    };
    let fail = |e: std::io::Error| TunnelError::Tls(format!("cannot open a UDP socket: {e}"));
    let runtime =
        quinn::default_runtime().ok_or_else(|| fail(std::io::Error::other("no async runtime")))?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.map_err(fail)?,
        runtime,
    )
    .map_err(fail)?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// What the agent's UDP socket asks the kernel to buffer: a download at tens of milliseconds of
/// round trip brings more than the usual 208 KiB between two reads of a busy agent, and each
/// datagram the kernel drops halves QUIC's congestion window. The kernel caps it at
/// `net.core.rmem_max`.
const UDP_RECEIVE_BUFFER: usize = 4 * 1024 * 1024;

/// A UDP socket on `addr` (dual-stack for `[::]`), with a receive buffer of
/// [`UDP_RECEIVE_BUFFER`] where the kernel allows it.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(false)?;
    }
    // Best effort: a smaller buffer is still a working socket.
    let _ = s.set_recv_buffer_size(UDP_RECEIVE_BUFFER);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// The QUIC client settings of a connection to the gateway: TLS 1.3 presenting `key`, the
/// gateway verified as the config says (pinned fingerprint or CA), the agent's keep-alive and
/// give-up time. For endpoints on other sockets and for tools.
pub fn client_config(
    cfg: &AgentConfig,
    key: &SessionKey,
) -> Result<quinn::ClientConfig, TunnelError> {
    client_config_for(cfg, key, false)
}

/// [`client_config`], tuned for the TCP carrier when `over_carrier`.
pub(crate) fn client_config_for(
    cfg: &AgentConfig,
    key: &SessionKey,
    over_carrier: bool,
) -> Result<quinn::ClientConfig, TunnelError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TunnelError::Tls(e.to_string()))?;
    let builder = verified_gateway(builder, cfg, &provider)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.key_pkcs8.clone()));
    let mut tls = builder
        .with_client_auth_cert(vec![key.cert.clone()], key_der)
        .map_err(|e| TunnelError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![touchgate_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TunnelError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = touchgate_common::transport_config(0);
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(DEAD_AFTER).map_err(|e| TunnelError::Tls(e.to_string()))?,
    ));
    if over_carrier {
        touchgate_carrier::tune_transport(&mut transport);
    }
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// `builder` checking the gateway's certificate as the config says: its pinned fingerprint,
/// or `gateway_ca`.
pub(crate) fn verified_gateway(
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>,
    cfg: &AgentConfig,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, TunnelError>
{
    if let Some(pin) = &cfg.gateway_cert_sha256 {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert {
                sha256: normalise_fingerprint(pin),
                algs: provider.signature_verification_algorithms,
            })));
    }
    let Some(ca) = &cfg.gateway_ca else {
        return Err(TunnelError::Tls(
            "no gateway_cert_sha256 or gateway_ca configured".into(),
        ));
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .map_err(|e| TunnelError::Tls(format!("cannot read gateway_ca {}: {e}", ca.display())))?;
    for c in certs {
        let c =
            c.map_err(|e| TunnelError::Tls(format!("bad certificate in {}: {e}", ca.display())))?;
        roots.add(c).map_err(|e| TunnelError::Tls(e.to_string()))?;
    }
    Ok(builder.with_root_certificates(roots))
}

/// Whether every gateway address is an IPv4 address: the agent then needs no IPv6 socket.
fn only_ipv4(cfg: &AgentConfig) -> bool {
    cfg.gateway
        .iter()
        .all(|a| a.parse::<std::net::SocketAddrV4>().is_ok())
}

/// Verifies the gateway by the SHA-256 fingerprint of its certificate.
#[derive(Debug)]
struct PinnedCert {
    sha256: String,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if hex::encode(Sha256::digest(end_entity)) == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the gateway's certificate does not match gateway_cert_sha256: check the fingerprint, \
                 or someone is intercepting the connection"
                    .into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

struct Control {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// The site this agent signs for. Every challenge the gateway sends is checked against it
/// before the authenticator is asked for anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignFor {
    /// The WebAuthn relying party id.
    pub rp_id: String,
    /// The origin that goes into `clientDataJSON`.
    pub origin: String,
    /// The identity provider the agent may send the browser to (`idp_issuer`), if pinned.
    pub idp_issuer: Option<String>,
}

impl SignFor {
    /// What `cfg` signs for: `rp_id` (default: the gateway's TLS name) and `origin` (default:
    /// `https://{rp_id}`).
    pub fn of(cfg: &AgentConfig) -> Self {
        Self {
            rp_id: cfg.rp_id(),
            origin: cfg.expected_origin(),
            idp_issuer: cfg.idp_issuer.clone(),
        }
    }

    /// Checks an enrolment challenge: its relying party and origin must be ours.
    pub fn check_creation(
        &self,
        options: &CreationChallengeResponse,
        origin: &str,
    ) -> Result<(), TunnelError> {
        self.check_rp_id(&options.public_key.rp.id)?;
        self.check_origin(origin)
    }

    /// Checks a sign-in challenge: its relying party and origin must be ours, and it must name
    /// the credentials that may answer.
    pub fn check_request(
        &self,
        options: &RequestChallengeResponse,
        origin: &str,
    ) -> Result<(), TunnelError> {
        self.check_rp_id(&options.public_key.rp_id)?;
        self.check_origin(origin)?;
        if options.public_key.allow_credentials.is_empty() {
            return Err(TunnelError::NoAllowedCredentials);
        }
        Ok(())
    }

    fn check_rp_id(&self, asked: &str) -> Result<(), TunnelError> {
        if asked == self.rp_id {
            return Ok(());
        }
        Err(TunnelError::ForeignSite {
            asked: asked.to_owned(),
            expected: self.rp_id.clone(),
            setting: "rp_id",
        })
    }

    fn check_origin(&self, asked: &str) -> Result<(), TunnelError> {
        if asked == self.origin {
            return Ok(());
        }
        Err(TunnelError::ForeignSite {
            asked: format!("origin {asked}"),
            expected: format!("origin {}", self.origin),
            setting: "origin",
        })
    }
}

/// One QUIC connection to the gateway, with its control stream.
pub struct Tunnel {
    conn: quinn::Connection,
    /// The endpoint the connection is on: the agent's UDP one, or its carrier's.
    endpoint: quinn::Endpoint,
    control: Mutex<Control>,
    binding: [u8; EXPORTER_LEN],
    sign_for: SignFor,
    gateway: Candidate,
}

impl Tunnel {
    /// Resolves the gateway's addresses, connects to the first that answers over QUIC on
    /// UDP (trying them in a random order, see [`dial`]) and opens the control stream.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        cfg: &AgentConfig,
    ) -> Result<Self, TunnelError> {
        Self::connect_in(endpoint, cfg, Order::random()).await
    }

    /// [`Tunnel::connect`], trying the addresses in `order`.
    pub async fn connect_in(
        endpoint: &quinn::Endpoint,
        cfg: &AgentConfig,
        order: Order,
    ) -> Result<Self, TunnelError> {
        let (candidates, mut failed) = dial::resolve(cfg).await;
        match dial::race(endpoint, &order.arrange(candidates)).await {
            Ok((conn, gateway)) => Self::on(conn, endpoint.clone(), gateway, cfg).await,
            Err(more) => {
                failed.extend(more);
                Err(connect_error(cfg, &failed))
            }
        }
    }

    /// Connects as `dialer`'s transport says: QUIC on UDP, the TCP carrier when QUIC gets no
    /// answer (`transport = "auto"`), or the carrier alone; and opens the control stream.
    pub async fn dial(
        dialer: &Dialer,
        cfg: &AgentConfig,
        order: Order,
    ) -> Result<Self, TunnelError> {
        match dialer.dial(cfg, order).await {
            Ok(won) => Self::on_won(won, cfg).await,
            Err(failed) => Err(connect_error(cfg, &failed)),
        }
    }

    /// Opens the control stream on a connection that won a [`Dialer`]'s race.
    pub async fn on_won(won: dial::Won, cfg: &AgentConfig) -> Result<Self, TunnelError> {
        Self::on(won.conn, won.endpoint, won.gateway, cfg).await
    }

    /// Opens the control stream on a connection to `gateway`.
    async fn on(
        conn: quinn::Connection,
        endpoint: quinn::Endpoint,
        gateway: Candidate,
        cfg: &AgentConfig,
    ) -> Result<Self, TunnelError> {
        let err = |reason: String| TunnelError::Connect {
            addr: cfg.gateway.to_string(),
            reason: format!("{gateway}: {reason}"),
        };
        let mut binding = [0u8; EXPORTER_LEN];
        conn.export_keying_material(&mut binding, EXPORTER_LABEL, b"")
            .map_err(|_| err("no TLS exporter".into()))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| err(e.to_string()))?;
        tracing::debug!(%gateway, "connected to the gateway");
        Ok(Self {
            conn,
            endpoint,
            control: Mutex::new(Control { send, recv }),
            binding,
            sign_for: SignFor::of(cfg),
            gateway,
        })
    }

    /// Closes the connection and waits (briefly) until the gateway has heard it.
    pub async fn close(self, reason: &[u8]) {
        self.conn
            .close(touchgate_proto::close::AGENT_DONE.into(), reason);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    /// How this tunnel reaches the gateway.
    pub fn link(&self) -> &Link {
        &self.gateway.link
    }

    /// The gateway address this tunnel is connected to.
    pub fn gateway(&self) -> &Candidate {
        &self.gateway
    }

    /// The QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// This connection's channel-binding value.
    pub fn binding(&self) -> &[u8] {
        &self.binding
    }

    /// Sends one control message and waits for the answer.
    pub async fn request(&self, msg: &ClientMsg) -> Result<ServerMsg, TunnelError> {
        let mut c = self.control.lock().await;
        write_frame(&mut c.send, msg)
            .await
            .map_err(|e| TunnelError::Lost(e.to_string()))?;
        match read_frame::<ServerMsg, _>(&mut c.recv).await? {
            Some(ServerMsg::Error(r)) => Err(TunnelError::Refused(r)),
            Some(m) => Ok(m),
            None => Err(TunnelError::Lost(
                "the gateway closed the control stream".into(),
            )),
        }
    }

    /// Enrols the authenticator with an invite code; returns the new credential id.
    pub async fn enroll(
        &self,
        authn: &Arc<std::sync::Mutex<Box<dyn Authenticator>>>,
        user: &str,
        invite_code: &str,
        origin_override: Option<&str>,
    ) -> Result<String, TunnelError> {
        let software_ca_pem = lock(authn).software_ca_pem();
        let begin = ClientMsg::EnrollBegin {
            user: user.to_owned(),
            invite_code: invite_code.trim().to_owned(),
            software_ca_pem,
        };
        self.register(authn, &begin, origin_override)
            .await
            .map(|(id, _)| id)
    }

    /// Enrols through the organisation's identity provider: the gateway says where to sign
    /// in (with a nonce for this connection), `browser` is shown the URL (the system browser,
    /// or a test's driver), the browser comes back to a loopback listener with the code, and
    /// the gateway redeems it and asks for the key's registration. Returns the credential id
    /// and the user the provider named.
    pub async fn enroll_with_idp(
        &self,
        authn: &Arc<std::sync::Mutex<Box<dyn Authenticator>>>,
        origin_override: Option<&str>,
        browser: &(dyn Fn(&str) -> Result<(), String> + Send + Sync),
    ) -> Result<(String, String), TunnelError> {
        let back = self.idp_sign_in(browser).await?;
        let software_ca_pem = lock(authn).software_ca_pem();
        let begin = ClientMsg::EnrollWithIdp {
            code: back.code,
            code_verifier: back.code_verifier,
            redirect_uri: back.redirect_uri,
            software_ca_pem,
        };
        self.register(authn, &begin, origin_override).await
    }

    /// Asks the gateway where to sign in (with a nonce for this connection) and does the
    /// browser step; returns what the browser brought back.
    async fn idp_sign_in(
        &self,
        browser: &(dyn Fn(&str) -> Result<(), String> + Send + Sync),
    ) -> Result<crate::idp::SignedIn, TunnelError> {
        let reply = self.request(&ClientMsg::IdpBegin).await?;
        let ServerMsg::IdpStart {
            name,
            authorization_endpoint,
            client_id,
            scopes,
            nonce,
        } = reply
        else {
            return Err(TunnelError::Protocol(format!(
                "expected where to sign in, got {reply:?}"
            )));
        };
        crate::idp::check_sign_in_page(
            &authorization_endpoint,
            &scopes,
            self.sign_for.idp_issuer.as_deref(),
        )?;
        crate::idp::sign_in(
            &name,
            &authorization_endpoint,
            &client_id,
            &scopes,
            &nonce,
            browser,
        )
        .await
    }

    /// After the gateway asked for a fresh check with the identity provider (the key's answer
    /// already verified): signs in there in the browser and gets the session.
    pub async fn idp_recheck(
        &self,
        browser: &(dyn Fn(&str) -> Result<(), String> + Send + Sync),
    ) -> Result<SessionInfo, TunnelError> {
        let back = self.idp_sign_in(browser).await?;
        match self
            .request(&ClientMsg::IdpRecheck {
                code: back.code,
                code_verifier: back.code_verifier,
                redirect_uri: back.redirect_uri,
            })
            .await?
        {
            ServerMsg::Session(s) => Ok(s),
            other => Err(TunnelError::Protocol(format!(
                "expected a session, got {other:?}"
            ))),
        }
    }

    /// Enrols through the identity provider with the device flow (RFC 8628), for a machine
    /// without a browser: `show` tells the user where to go and what code to enter (on any
    /// device); the agent then polls until they have, and the key is registered.
    pub async fn enroll_with_device(
        &self,
        authn: &Arc<std::sync::Mutex<Box<dyn Authenticator>>>,
        origin_override: Option<&str>,
        show: &(dyn Fn(&DeviceCode) + Send + Sync),
    ) -> Result<(String, String), TunnelError> {
        let software_ca_pem = lock(authn).software_ca_pem();
        let reply = self
            .request(&ClientMsg::EnrollWithDevice { software_ca_pem })
            .await?;
        let ServerMsg::DeviceCode {
            name,
            verification_uri,
            verification_uri_complete,
            user_code,
            expires_in,
            mut interval,
        } = reply
        else {
            return Err(TunnelError::Protocol(format!(
                "expected a device code, got {reply:?}"
            )));
        };
        // Shown on a terminal: no control characters, and only web pages.
        let shown = |s: String| s.chars().filter(|c| !c.is_control()).collect::<String>();
        let https = |u: &str| crate::idp::web_page(u).is_some();
        if !https(&verification_uri) {
            return Err(TunnelError::Idp(format!(
                "the gateway named a sign-in page that is not https: {}",
                shown(verification_uri)
            )));
        }
        show(&DeviceCode {
            name: shown(name),
            verification_uri: shown(verification_uri),
            verification_uri_complete: verification_uri_complete.filter(|u| https(u)).map(shown),
            user_code: shown(user_code),
            expires_in,
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(expires_in);
        loop {
            tokio::time::sleep(Duration::from_secs(interval.clamp(1, 60))).await;
            if tokio::time::Instant::now() >= deadline {
                return Err(TunnelError::Idp(
                    "the code expired before the sign-in finished: start again".into(),
                ));
            }
            match self.request(&ClientMsg::DevicePoll).await? {
                ServerMsg::DevicePending { interval: next } => interval = next,
                reply @ ServerMsg::EnrollChallenge { .. } => {
                    return self
                        .answer_registration(authn, reply, origin_override)
                        .await;
                }
                other => {
                    return Err(TunnelError::Protocol(format!(
                        "expected the sign-in's progress, got {other:?}"
                    )));
                }
            }
        }
    }

    /// Sends `begin`, has the authenticator answer the registration challenge it brings, and
    /// returns the new credential's id and the user it is for.
    async fn register(
        &self,
        authn: &Arc<std::sync::Mutex<Box<dyn Authenticator>>>,
        begin: &ClientMsg,
        origin_override: Option<&str>,
    ) -> Result<(String, String), TunnelError> {
        let reply = self.request(begin).await?;
        self.answer_registration(authn, reply, origin_override)
            .await
    }

    /// Has the authenticator answer the registration challenge in `reply` and sends it.
    async fn answer_registration(
        &self,
        authn: &Arc<std::sync::Mutex<Box<dyn Authenticator>>>,
        reply: ServerMsg,
        origin_override: Option<&str>,
    ) -> Result<(String, String), TunnelError> {
        let ServerMsg::EnrollChallenge { options, origin } = reply else {
            return Err(TunnelError::Protocol(format!(
                "expected an enrolment challenge, got {reply:?}"
            )));
        };
        let ccr: CreationChallengeResponse = serde_json::from_value(options)
            .map_err(|e| TunnelError::Protocol(format!("bad creation options: {e}")))?;
        self.sign_for.check_creation(&ccr, &origin)?;
        let user = ccr.public_key.user.name.clone();
        let origin = origin_override.map(str::to_owned).unwrap_or(origin);
        let cdj = client_data_json(
            Ceremony::Create,
            ccr.public_key.challenge.as_ref(),
            &origin,
            &self.binding,
        );
        let authn = authn.clone();
        let cred =
            tokio::task::spawn_blocking(move || lock(&authn).register(&ccr.public_key, &cdj))
                .await
                .map_err(|e| TunnelError::Protocol(e.to_string()))??;
        let credential =
            serde_json::to_value(&cred).map_err(|e| TunnelError::Protocol(e.to_string()))?;
        match self
            .request(&ClientMsg::EnrollFinish { credential })
            .await?
        {
            ServerMsg::Enrolled { credential_id } => Ok((credential_id, user)),
            other => Err(TunnelError::Protocol(format!(
                "expected enrolment result, got {other:?}"
            ))),
        }
    }

    /// Asks for a sign-in challenge and has the authenticator answer it; returns the assertion
    /// (as sent) without sending it, so callers can send it with [`Tunnel::finish_login`].
    pub async fn make_assertion(
        &self,
        authn: &Arc<std::sync::Mutex<Box<dyn Authenticator>>>,
        user: &str,
        origin_override: Option<&str>,
    ) -> Result<serde_json::Value, TunnelError> {
        let reply = self
            .request(&ClientMsg::LoginBegin {
                user: user.to_owned(),
            })
            .await?;
        let ServerMsg::LoginChallenge { options, origin } = reply else {
            return Err(TunnelError::Protocol(format!(
                "expected a sign-in challenge, got {reply:?}"
            )));
        };
        let rcr: RequestChallengeResponse = serde_json::from_value(options)
            .map_err(|e| TunnelError::Protocol(format!("bad request options: {e}")))?;
        self.sign_for.check_request(&rcr, &origin)?;
        let origin = origin_override.map(str::to_owned).unwrap_or(origin);
        let cdj = client_data_json(
            Ceremony::Get,
            rcr.public_key.challenge.as_ref(),
            &origin,
            &self.binding,
        );
        let authn = authn.clone();
        let cred =
            tokio::task::spawn_blocking(move || lock(&authn).authenticate(&rcr.public_key, &cdj))
                .await
                .map_err(|e| TunnelError::Protocol(e.to_string()))??;
        serde_json::to_value(&cred).map_err(|e| TunnelError::Protocol(e.to_string()))
    }

    /// Sends an assertion; on success the session is live on this connection.
    pub async fn finish_login(
        &self,
        credential: serde_json::Value,
    ) -> Result<SessionInfo, TunnelError> {
        match self.request(&ClientMsg::LoginFinish { credential }).await? {
            ServerMsg::Session(s) => Ok(s),
            other => Err(TunnelError::Protocol(format!(
                "expected a session, got {other:?}"
            ))),
        }
    }

    /// Signs in with one touch.
    pub async fn login(
        &self,
        authn: &Arc<std::sync::Mutex<Box<dyn Authenticator>>>,
        user: &str,
        origin_override: Option<&str>,
    ) -> Result<SessionInfo, TunnelError> {
        let cred = self.make_assertion(authn, user, origin_override).await?;
        self.finish_login(cred).await
    }

    /// [`Tunnel::login`], then the identity provider in `browser` when the gateway says its
    /// last check is too old.
    pub async fn login_or_recheck(
        &self,
        authn: &Arc<std::sync::Mutex<Box<dyn Authenticator>>>,
        user: &str,
        origin_override: Option<&str>,
        browser: &(dyn Fn(&str) -> Result<(), String> + Send + Sync),
    ) -> Result<SessionInfo, TunnelError> {
        match self.login(authn, user, origin_override).await {
            Err(TunnelError::Refused(r))
                if r.code == touchgate_proto::RefusalCode::IdpCheckNeeded =>
            {
                tracing::info!("{}", r.message);
                self.idp_recheck(browser).await
            }
            done => done,
        }
    }

    /// Resumes a session with its token (no touch).
    pub async fn resume(&self, token: &str) -> Result<SessionInfo, TunnelError> {
        match self
            .request(&ClientMsg::Resume {
                token: token.to_owned(),
            })
            .await?
        {
            ServerMsg::Session(s) => Ok(s),
            other => Err(TunnelError::Protocol(format!(
                "expected a session, got {other:?}"
            ))),
        }
    }

    /// Opens a data stream to `service`; after `Ok` the streams carry the application's bytes.
    pub async fn open_stream(
        &self,
        service: &str,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), TunnelError> {
        open_stream(&self.conn, service).await
    }
}

/// Opens a data stream to `service` on `conn`.
pub async fn open_stream(
    conn: &quinn::Connection,
    service: &str,
) -> Result<(quinn::SendStream, quinn::RecvStream), TunnelError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| TunnelError::Lost(e.to_string()))?;
    write_frame(
        &mut send,
        &StreamOpen {
            service: service.to_owned(),
            local: None,
        },
    )
    .await
    .map_err(|e| TunnelError::Lost(e.to_string()))?;
    match read_frame::<StreamReply, _>(&mut recv).await? {
        Some(StreamReply::Accepted) => Ok((send, recv)),
        Some(StreamReply::Refused(r)) => Err(TunnelError::Refused(r)),
        None => Err(TunnelError::Lost("the gateway closed the stream".into())),
    }
}

/// The error of a connection that reached no gateway, naming each address tried.
fn connect_error(cfg: &AgentConfig, failed: &[dial::Failed]) -> TunnelError {
    TunnelError::Connect {
        addr: cfg.gateway.to_string(),
        reason: dial::describe(&cfg.gateway.to_string(), failed),
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours() -> SignFor {
        SignFor {
            rp_id: "gw.corp.example".into(),
            origin: "https://gw.corp.example".into(),
            idp_issuer: None,
        }
    }

    fn request(rp_id: &str, allowed: usize) -> RequestChallengeResponse {
        let allow: Vec<_> = (0..allowed)
            .map(|_| serde_json::json!({"type": "public-key", "id": "AAECAw"}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "publicKey": {
                "challenge": "AAECAwQFBgcICQoLDA0ODw",
                "rpId": rp_id,
                "allowCredentials": allow,
                "userVerification": "discouraged"
            }
        }))
        .expect("request options")
    }

    fn creation(rp_id: &str) -> CreationChallengeResponse {
        serde_json::from_value(serde_json::json!({
            "publicKey": {
                "rp": {"name": "touchgate", "id": rp_id},
                "user": {"id": "AAECAw", "name": "alice", "displayName": "alice"},
                "challenge": "AAECAwQFBgcICQoLDA0ODw",
                "pubKeyCredParams": [{"type": "public-key", "alg": -7}]
            }
        }))
        .expect("creation options")
    }

    #[test]
    fn a_challenge_for_this_agents_own_site_passes() {
        ours()
            .check_request(&request("gw.corp.example", 1), "https://gw.corp.example")
            .expect("ours");
        ours()
            .check_creation(&creation("gw.corp.example"), "https://gw.corp.example")
            .expect("ours");
    }

    #[test]
    fn a_sign_in_for_another_site_is_refused_naming_both() {
        let e = ours()
            .check_request(&request("github.com", 1), "https://gw.corp.example")
            .expect_err("another site");
        assert!(
            matches!(
                e,
                TunnelError::ForeignSite {
                    setting: "rp_id",
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "the gateway asked to sign for github.com, but this agent signs only for gw.corp.example (rp_id): \
             you may be talking to the wrong gateway — check the gateway address with your admin"
        );
    }

    #[test]
    fn an_enrolment_for_another_site_is_refused() {
        let e = ours()
            .check_creation(&creation("login.okta.example"), "https://gw.corp.example")
            .expect_err("another site");
        assert!(e.to_string().starts_with("the gateway asked to sign for login.okta.example, but this agent signs only for gw.corp.example (rp_id)"), "{e}");
    }

    #[test]
    fn a_challenge_with_another_origin_is_refused() {
        for origin in [
            "https://github.com",
            "http://gw.corp.example",
            "https://gw.corp.example:8443",
        ] {
            let e = ours()
                .check_request(&request("gw.corp.example", 1), origin)
                .expect_err("another origin");
            assert!(
                matches!(
                    e,
                    TunnelError::ForeignSite {
                        setting: "origin",
                        ..
                    }
                ),
                "{e:?}"
            );
            assert!(
                e.to_string().starts_with(&format!(
                    "the gateway asked to sign for origin {origin}, but this agent signs only for origin https://gw.corp.example (origin)"
                )),
                "{e}"
            );
            let e = ours()
                .check_creation(&creation("gw.corp.example"), origin)
                .expect_err("another origin");
            assert!(
                matches!(
                    e,
                    TunnelError::ForeignSite {
                        setting: "origin",
                        ..
                    }
                ),
                "{e:?}"
            );
        }
    }

    #[test]
    fn sign_in_options_that_name_no_credential_are_refused() {
        let e = ours()
            .check_request(&request("gw.corp.example", 0), "https://gw.corp.example")
            .expect_err("no allow list");
        assert!(matches!(e, TunnelError::NoAllowedCredentials), "{e:?}");
        assert!(e.to_string().contains("empty allowCredentials"), "{e}");
    }
}

//! touchgate's identity-aware gateway.
//!
//! The gateway is the WebAuthn relying party, terminates agents' QUIC tunnels, enforces the
//! access policy, writes the audit log, and proxies each tunnel stream to a Cloud Run service
//! with a Google-signed ID token (or splices it to a TCP service).
//!
//! Listeners are passed in ([`Gateway::serve_quic`], [`Gateway::serve_admin`],
//! [`Gateway::serve_scim`]), so tests bind 127.0.0.1 port 0 and a binary binds the configured
//! addresses. The binary runs connections thread-per-core ([`shards`],
//! [`Gateway::serve_quic_on`]).

pub mod admin;
pub mod audit;
pub mod browser;
pub mod carrier;
pub mod config;
pub mod counted;
pub mod idtoken;
pub mod limits;
pub mod metrics;
pub mod oidc;
pub mod proxy;
pub mod report;
pub mod rp;
pub mod scim;
pub mod server;
pub mod shards;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod users;

use std::sync::Arc;

use rand::Rng;

pub use config::GatewayConfig;

/// Errors starting the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The store could not be opened.
    #[error("cannot open the database {path}: {source}")]
    Store {
        /// The database path.
        path: String,
        /// The error.
        source: store::StoreError,
    },
    /// Signing keys could not be loaded or made.
    #[error(transparent)]
    Keys(#[from] tokens::KeyError),
    /// The relying party could not be set up.
    #[error(transparent)]
    Rp(#[from] rp::RpSetupError),
    /// TLS material is missing or wrong.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The audit log could not be opened.
    #[error("cannot open the audit log {path}: {source}")]
    Audit {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// `[oidc]` is unusable (its issuer, or its secret file).
    #[error("[oidc]: {0}")]
    Oidc(String),
    /// `[scim]` is unusable (its token file, or the certificate for HTTPS).
    #[error(transparent)]
    Scim(#[from] scim::ScimSetupError),
    /// The upstream TLS client could not be built.
    #[error("cannot build the upstream TLS client: {0}")]
    UpstreamTls(#[from] rustls::Error),
    /// The UDP socket could not be set up.
    #[error("cannot listen for QUIC on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
}

/// The gateway: shared state of every connection.
pub struct Gateway {
    cfg: Arc<GatewayConfig>,
    store: Arc<store::Store>,
    rp: rp::RelyingParty,
    signer: tokens::TokenSigner,
    audit: audit::AuditLog,
    metrics: Arc<metrics::Metrics>,
    proxy: Arc<proxy::Proxy>,
    activity: server::Activity,
    revocations: server::Revocations,
    limiter: server::RateLimiter,
    reset_key: Vec<u8>,
    /// The organisation's provider, when `[oidc]` is set.
    oidc: Option<Arc<oidc::Oidc>>,
    /// The provisioning endpoint, when `[scim]` is set.
    scim: Option<Arc<scim::Scim>>,
    /// QUIC over the TCP carrier: the hub every carrier feeds.
    carriers: carrier::Carriers,
}

impl Gateway {
    /// Opens the store, loads keys and builds the relying party.
    pub fn new(cfg: GatewayConfig) -> Result<Arc<Self>, GatewayError> {
        let store = store::Store::open_with(&cfg.database, cfg.database_password_file.as_deref())
            .map_err(|source| GatewayError::Store {
            path: cfg.database_shown(),
            source,
        })?;
        let signer = tokens::TokenSigner::load(&store, &cfg.origin())?;
        let rp = rp::RelyingParty::new(&cfg)?;
        let audit = audit::AuditLog::open(cfg.audit_log.as_deref()).map_err(|source| {
            GatewayError::Audit {
                path: cfg.audit_log.clone().unwrap_or_default(),
                source,
            }
        })?;
        let reset_key = store
            .secret("quic_stateless_reset_key", || {
                rand::rng().random::<[u8; 32]>().to_vec()
            })
            .map_err(|source| GatewayError::Store {
                path: cfg.database_shown(),
                source,
            })?;
        let revocations = server::Revocations::default();
        let store_err = |source| GatewayError::Store {
            path: cfg.database_shown(),
            source,
        };
        revocations.set_epochs(store.epochs().map_err(store_err)?);
        revocations.set_disabled(store.disabled_users().map_err(store_err)?);
        revocations.set_revoked_delegations(store.revoked_delegations().map_err(store_err)?);
        revocations.set_groups(store.user_groups(cfg.group_source()).map_err(store_err)?);
        let oidc = match &cfg.oidc {
            Some(o) => {
                let secret = o.secret().map_err(|e| {
                    GatewayError::Oidc(format!("cannot read client_secret_file: {e}"))
                })?;
                Some(
                    oidc::Oidc::new(o.clone(), secret)
                        .map_err(|e| GatewayError::Oidc(e.to_string()))?,
                )
            }
            None => None,
        };
        let scim = match &cfg.scim {
            Some(s) => Some(Arc::new(scim::Scim::new(s, &cfg.tls)?)),
            None => None,
        };
        let metrics = Arc::new(metrics::Metrics::default());
        let id_tokens = Arc::new(idtoken::IdTokens::new(&cfg.id_tokens));
        let proxy = Arc::new(proxy::Proxy::new(
            id_tokens,
            signer.clone(),
            metrics.clone(),
            audit.clone(),
            cfg.audit,
            cfg.limits.clone(),
        )?);
        Ok(Arc::new(Self {
            cfg: Arc::new(cfg),
            store: Arc::new(store),
            rp,
            signer,
            audit,
            metrics,
            proxy,
            activity: server::Activity::default(),
            revocations,
            limiter: server::RateLimiter::default(),
            reset_key,
            oidc,
            scim,
            carriers: carrier::Carriers::new(),
        }))
    }

    /// The config in force.
    pub fn config(&self) -> &GatewayConfig {
        &self.cfg
    }

    /// The metrics.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// Waits until every audit line recorded so far is written.
    pub fn flush_audit(&self) {
        self.audit.flush();
    }

    /// The token signer (for tools and tests that mint or inspect tokens).
    pub fn signer(&self) -> &tokens::TokenSigner {
        &self.signer
    }

    /// Builds the QUIC endpoint on an already bound UDP socket, with the configured certificate.
    pub fn endpoint(&self, socket: std::net::UdpSocket) -> Result<quinn::Endpoint, GatewayError> {
        let server = self.quic_server_config(|_| {})?;
        let addr = socket
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let runtime = quinn::default_runtime().ok_or_else(|| GatewayError::Listen {
            addr: addr.clone(),
            source: std::io::Error::other("no async runtime"),
        })?;
        quinn::Endpoint::new(self.endpoint_config(), Some(server), socket, runtime)
            .map_err(|source| GatewayError::Listen { addr, source })
    }

    /// The QUIC server settings: the configured certificate, the transport `tune`d.
    fn quic_server_config(
        &self,
        tune: fn(&mut quinn::TransportConfig),
    ) -> Result<quinn::ServerConfig, GatewayError> {
        let certs = tls::load_certs(&self.cfg.tls.cert)?;
        let key = tls::load_key(&self.cfg.tls.key)?;
        Ok(tls::quic_server_config_with(
            certs,
            key,
            self.cfg.limits.max_streams_per_connection,
            tune,
        )?)
    }

    /// The endpoint settings every QUIC endpoint of the gateway shares.
    fn endpoint_config(&self) -> quinn::EndpointConfig {
        Self::endpoint_config_with(&self.reset_key)
    }

    /// [`Gateway::endpoint_config`] under keys derived for `purpose` (the carrier's endpoint):
    /// a connection ID seen on one endpoint then gets no stateless reset from the other.
    fn endpoint_config_for(&self, purpose: &[u8]) -> quinn::EndpointConfig {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.reset_key);
        Self::endpoint_config_with(ring::hmac::sign(&key, purpose).as_ref())
    }

    fn endpoint_config_with(reset_key: &[u8]) -> quinn::EndpointConfig {
        // Stateless resets use a key kept in the database: a restarted (or killed and
        // restarted) gateway can then tell agents at once that their old connection is gone,
        // instead of leaving them to wait for their idle timeout.
        // Connection IDs carry a check value under a key that must survive the restart too,
        // or the new gateway drops the old connection's packets as invalid instead of
        // resetting them.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(key));
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&reset_key[..8]);
        let cid_key = u64::from_le_bytes(cid_key);
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        endpoint_config
    }

    /// Creates a one-time invite for `user` and returns its code (stored only as a hash).
    pub fn create_invite(&self, user: &str) -> Result<String, store::StoreError> {
        create_invite(&self.store, &self.audit, user, self.cfg.invite.ttl)
    }

    /// Creates a one-time invite valid for `ttl`.
    pub fn create_invite_with_ttl(
        &self,
        user: &str,
        ttl: std::time::Duration,
    ) -> Result<String, store::StoreError> {
        create_invite(&self.store, &self.audit, user, ttl)
    }
}

/// Creates an invite directly in a store (the `invite` command, which runs beside a serving
/// gateway on the same database).
pub fn create_invite(
    store: &store::Store,
    audit: &audit::AuditLog,
    user: &str,
    ttl: std::time::Duration,
) -> Result<String, store::StoreError> {
    let bytes: [u8; 20] = rand::rng().random();
    let code = data_encoding_code(&bytes);
    let expires = store::now_secs() + ttl.as_secs();
    store.ensure_user(user)?;
    store.add_invite(user, &code, expires)?;
    audit.record(audit::AuditEvent {
        user: Some(user.to_owned()),
        expires_at: Some(expires),
        ..audit::AuditEvent::new(audit::AuditKind::InviteCreated)
    });
    Ok(code)
}

/// Invite codes: groups of lowercase base32 letters, easy to read out and paste.
fn data_encoding_code(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut out = String::new();
    let mut acc: u32 = 0;
    let mut bits = 0;
    for b in bytes {
        acc = (acc << 8) | u32::from(*b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
            if out.len() % 9 == 8 {
                out.push('-');
            }
        }
    }
    out.trim_end_matches('-').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invite_codes_are_long_and_readable() {
        let code = data_encoding_code(&[0xffu8; 20]);
        assert_eq!(code.chars().filter(|c| *c != '-').count(), 32);
        assert!(
            code.chars()
                .all(|c| c == '-' || c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert_ne!(data_encoding_code(&[1u8; 20]), code);
    }
}

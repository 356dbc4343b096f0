//! The gateway's TOML configuration.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
use touchgate_proto::ServiceKind;

mod scim;
pub use scim::ScimConfig;

/// Errors loading or checking a gateway config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read gateway config {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("gateway config {path} is invalid: {source}")]
    Parse {
        /// The path.
        path: PathBuf,
        /// The parse error.
        source: Box<toml::de::Error>,
    },
    /// The config parsed, but does not make sense.
    #[error("gateway config is invalid: {0}")]
    Invalid(String),
}

/// The whole gateway config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// UDP address of the QUIC tunnel endpoint.
    pub listen: SocketAddr,
    /// TCP address serving the carrier (QUIC in WebSocket messages) over plain HTTP, for a
    /// gateway behind a front end that terminates TLS (Cloud Run); when it is not set, `$PORT`
    /// (when set) means `0.0.0.0:$PORT`. The carrier with TLS is always on TCP at `listen`.
    #[serde(default)]
    pub listen_ws: Option<SocketAddr>,
    /// Take a carrier's client at `listen_ws` from the address its front end put last in
    /// `X-Forwarded-For`, for rate limits and the audit (else every agent behind the front end
    /// is one client, the front end). Only where nothing but that front end reaches
    /// `listen_ws`, as on Cloud Run: anyone else could name any address.
    #[serde(default)]
    pub listen_ws_trusts_x_forwarded_for: bool,
    /// TCP address of the admin HTTP endpoint (`/healthz`, `/metrics`, JWKS). Keep it on loopback.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// WebAuthn relying party id (a host name).
    pub rp_id: String,
    /// WebAuthn origin; defaults to `https://{rp_id}`.
    #[serde(default)]
    pub origin: Option<String>,
    /// Where the gateway keeps its state, created and migrated on start: a SQLite file's path
    /// (one gateway), or a PostgreSQL URL, `postgres://USER@HOST:PORT/DB?sslmode=verify-full`
    /// (replicas sharing one database).
    pub database: PathBuf,
    /// A file holding the PostgreSQL password, when the URL has none (else `PGPASSWORD`).
    #[serde(default)]
    pub database_password_file: Option<PathBuf>,
    /// Path of the audit log (JSON lines), or `"-"` for stdout.
    #[serde(default)]
    pub audit_log: Option<String>,
    /// What the audit log keeps besides security events.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Certificate and key of the QUIC endpoint.
    pub tls: TlsConfig,
    /// Which authenticators may enrol.
    #[serde(default)]
    pub attestation: AttestationConfig,
    /// Where Google ID tokens for upstreams come from.
    #[serde(default)]
    pub id_tokens: IdTokenConfig,
    /// Session lifetimes.
    #[serde(default)]
    pub session: SessionConfig,
    /// Grants users delegate to scripts, CI jobs and AI agents.
    #[serde(default)]
    pub delegation: DelegationConfig,
    /// Invites.
    #[serde(default)]
    pub invite: InviteConfig,
    /// The organisation's OpenID provider, for enrolment through it.
    #[serde(default)]
    pub oidc: Option<OidcConfig>,
    /// The SCIM 2.0 provisioning endpoint the identity provider pushes users and groups to.
    #[serde(default)]
    pub scim: Option<ScimConfig>,
    /// Size and rate limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The services behind the gateway.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

/// `[audit]`: what the audit log keeps besides security events.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// One line per HTTP request (user, delegate, key, service, method, path, status, bytes,
    /// duration). Off for gateways that must not keep them; sign-ins, streams and refusals are
    /// audited either way.
    #[serde(default = "yes")]
    pub requests: bool,
    /// Keep a request's query string in its line (dropped by default: queries carry tokens
    /// and personal data more often than paths do).
    #[serde(default)]
    pub query: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            requests: true,
            query: false,
        }
    }
}

/// TLS files of the QUIC endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Attestation policy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationConfig {
    /// Accept touchgate's software keys. For demos, tests and bots only: a software key proves
    /// nothing about hardware.
    #[serde(default)]
    pub allow_software: bool,
    /// Trusted attestation roots: each entry a PEM CA and the AAGUIDs it vouches for.
    #[serde(default, rename = "trusted")]
    pub trusted: Vec<TrustedRoot>,
    /// If not empty, only these authenticator models may enrol, whatever their root.
    #[serde(default)]
    pub allowed_aaguids: Vec<uuid::Uuid>,
    /// Whether sign-in needs user verification (PIN or biometrics) besides the touch.
    #[serde(default)]
    pub user_verification: UserVerification,
}

/// The user-verification policy, as WebAuthn names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserVerification {
    /// Every enrolment and sign-in must verify the user (PIN or built-in UV).
    Required,
    /// Verify the user when the key can (built-in UV, or a PIN that is set).
    #[default]
    Preferred,
    /// Touch only.
    Discouraged,
}

/// One trusted attestation CA.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedRoot {
    /// PEM file of the CA.
    pub ca: PathBuf,
    /// AAGUIDs this CA vouches for.
    pub aaguids: Vec<uuid::Uuid>,
    /// A name for logs and messages.
    #[serde(default)]
    pub description: Option<String>,
}

/// ID token source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdTokenConfig {
    /// `"metadata"` (the GCE/GKE/Cloud Run metadata server) or `"none"` (no token).
    #[serde(default = "default_id_source")]
    pub source: IdTokenSource,
    /// Base URL of the metadata server.
    #[serde(default = "default_metadata_url")]
    pub metadata_url: String,
}

impl Default for IdTokenConfig {
    fn default() -> Self {
        Self {
            source: default_id_source(),
            metadata_url: default_metadata_url(),
        }
    }
}

/// Where ID tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdTokenSource {
    /// The metadata server protocol.
    Metadata,
    /// Send no ID token (plain upstreams).
    None,
}

/// Session lifetimes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// Longest a session lives after the touch.
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// A session with no connection for this long ends.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long a sign-in challenge stays valid.
    #[serde(default = "default_challenge_ttl", with = "humantime_serde")]
    pub challenge_ttl: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_age: default_max_age(),
            idle_timeout: default_idle_timeout(),
            challenge_ttl: default_challenge_ttl(),
        }
    }
}

/// `[delegation]`: what users may delegate (`touchgate delegate`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationConfig {
    /// Whether users may delegate at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The longest a grant may last (a longer `--ttl` is refused, with this limit named).
    #[serde(default = "default_delegation_max_ttl", with = "humantime_serde")]
    pub max_ttl: Duration,
    /// When not empty, only these services may be delegated.
    #[serde(default)]
    pub services: Vec<String>,
}

impl Default for DelegationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_ttl: default_delegation_max_ttl(),
            services: Vec::new(),
        }
    }
}

fn default_delegation_max_ttl() -> Duration {
    Duration::from_secs(8 * 3600)
}

/// Size and rate limits against hostile or broken clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Time a client has to send a whole HTTP request head (slowloris defence).
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest HTTP request head, in bytes; larger ones get 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Sign-in and enrolment attempts per source address each minute, and failed sign-ins
    /// per user and source address.
    #[serde(default = "default_signin_per_minute")]
    pub signin_attempts_per_minute: u32,
    /// New QUIC connections per source address each minute.
    #[serde(default = "default_connections_per_minute")]
    pub connections_per_minute: u32,
    /// Streams (local TCP connections) one agent may have open at once; more wait for a slot.
    #[serde(default = "default_max_streams")]
    pub max_streams_per_connection: u32,
    /// How long a connection may stay without a session (signing in, enrolling) before it is
    /// closed.
    #[serde(default = "default_signin_deadline", with = "humantime_serde")]
    pub signin_deadline: Duration,
}

fn default_signin_deadline() -> Duration {
    Duration::from_secs(60)
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: default_header_read_timeout(),
            max_header_bytes: default_max_header_bytes(),
            signin_attempts_per_minute: default_signin_per_minute(),
            connections_per_minute: default_connections_per_minute(),
            max_streams_per_connection: default_max_streams(),
            signin_deadline: default_signin_deadline(),
        }
    }
}

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_signin_per_minute() -> u32 {
    20
}
fn default_connections_per_minute() -> u32 {
    600
}
/// Each stream a peer may open costs the connection state up front (about 100 bytes a
/// stream in quinn): 256 keeps a signed-in agent near 66 KiB, so one replica holds 10,000
/// under 1 GiB (docs/scale.md), and is more local connections at once than a developer's
/// tools open; more wait for a slot rather than fail.
fn default_max_streams() -> u32 {
    256
}

/// Invite settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteConfig {
    /// How long an invite stays valid.
    #[serde(default = "default_invite_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// Whether invites enrol at all (turn off once everyone enrols through `[oidc]`; keep on
    /// as a break-glass path otherwise).
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for InviteConfig {
    fn default() -> Self {
        Self {
            ttl: default_invite_ttl(),
            enabled: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// `[oidc]`: the organisation's OpenID provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The issuer; its discovery document is at `{issuer}/.well-known/openid-configuration`.
    pub issuer: String,
    /// This gateway's client id at the provider.
    pub client_id: String,
    /// A confidential client's secret (prefer `client_secret_file`; a public client with
    /// PKCE needs none).
    #[serde(default)]
    pub client_secret: Option<String>,
    /// A file holding the client secret.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Scopes asked for.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// The ID token claim that names the touchgate user (an `email` must be verified).
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    /// The ID token claim that lists the user's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Only accounts of these domains (the email's, or Google's `hd`); empty: any.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// How old the last check with the provider may be before a sign-in needs it again.
    #[serde(default = "default_idp_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// The provider's name as users know it ("Example Corp Google account").
    #[serde(default)]
    pub display_name: Option<String>,
    /// Clock difference allowed when checking an ID token's times.
    #[serde(default = "default_clock_skew", with = "humantime_serde")]
    pub clock_skew: Duration,
    /// Enrolment with the device flow (RFC 8628) for machines without a browser. Off by
    /// default: anyone can start one and send a user the code to enter ("device code
    /// phishing"); turn it on where your people need it.
    #[serde(default)]
    pub device_flow: bool,
}

impl OidcConfig {
    /// The defaults for `issuer` and `client_id`.
    pub fn new(issuer: &str, client_id: &str) -> Self {
        Self {
            issuer: issuer.to_owned(),
            client_id: client_id.to_owned(),
            client_secret: None,
            client_secret_file: None,
            scopes: default_scopes(),
            user_claim: default_user_claim(),
            groups_claim: default_groups_claim(),
            allowed_domains: Vec::new(),
            max_age: default_idp_max_age(),
            display_name: None,
            clock_skew: default_clock_skew(),
            device_flow: false,
        }
    }

    /// The name users see: `display_name`, else the issuer's host.
    pub fn name(&self) -> String {
        self.display_name.clone().unwrap_or_else(|| {
            url::Url::parse(&self.issuer)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_else(|| self.issuer.clone())
        })
    }

    /// The client secret, from the file (resolved against the config's folder) or the config.
    pub fn secret(&self) -> std::io::Result<Option<String>> {
        match &self.client_secret_file {
            Some(f) => Ok(Some(std::fs::read_to_string(f)?.trim().to_owned())),
            None => Ok(self.client_secret.clone()),
        }
    }
}

fn default_scopes() -> Vec<String> {
    ["openid", "email", "profile"].map(String::from).to_vec()
}

fn default_user_claim() -> String {
    "email".into()
}

fn default_groups_claim() -> String {
    "groups".into()
}

fn default_clock_skew() -> Duration {
    Duration::from_secs(60)
}

fn default_idp_max_age() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

/// One service behind the gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Name the agent asks for.
    pub name: String,
    /// `http` (upstream is a URL) or `tcp` (upstream is `host:port`).
    pub kind: ServiceKind,
    /// Where requests go.
    pub upstream: String,
    /// Audience of the ID token; defaults to the upstream URL without its path.
    #[serde(default)]
    pub audience: Option<String>,
    /// Users allowed to use it; `"*"` allows every enrolled user.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Groups allowed to use it, as the organisation's identity provider names them (its
    /// groups claim, or SCIM); a user may use the service when `allow` or this matches.
    #[serde(default)]
    pub allow_groups: Vec<String>,
    /// How long an HTTP upstream may take to start answering before the caller gets a 504.
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Protocols a caller may switch to with `Upgrade` (WebSocket by default); any other
    /// upgrade, `h2c` above all, is dropped and the request served as a plain one.
    #[serde(default = "default_upgrade_protocols")]
    pub upgrade_protocols: Vec<String>,
    /// Send every request over HTTP/2: h2c with prior knowledge to an `http://` upstream
    /// (Cloud Run's "end-to-end HTTP/2"), ALPN h2 to an `https://` one. gRPC requests go out
    /// as HTTP/2 without it.
    #[serde(default)]
    pub http2: bool,
    /// A PEM file of the CA(s) that sign an `https://` upstream's certificate, for internal
    /// services behind a private CA; only these are trusted for this service (without it, the
    /// public web roots).
    #[serde(default)]
    pub upstream_ca: Option<PathBuf>,
}

fn default_upgrade_protocols() -> Vec<String> {
    vec!["websocket".into()]
}

impl ServiceConfig {
    /// What lets `user`, in `groups`, use this service: `"user"` (named in `allow`),
    /// `"everyone"` (`"*"`) or `"group:NAME"`; `None` when nothing does. Names match exactly.
    pub fn grant(&self, user: &str, groups: &[String]) -> Option<String> {
        if self.allow.iter().any(|a| a == user) {
            return Some("user".into());
        }
        if let Some(g) = self.allow_groups.iter().find(|g| groups.contains(g)) {
            return Some(format!("group:{g}"));
        }
        self.allow
            .iter()
            .any(|a| a == "*")
            .then(|| "everyone".into())
    }

    /// Whether `user`, in `groups`, may use this service.
    pub fn allows(&self, user: &str, groups: &[String]) -> bool {
        self.grant(user, groups).is_some()
    }

    /// The ID token audience for this service.
    pub fn audience(&self) -> String {
        self.audience
            .clone()
            .unwrap_or_else(|| match url::Url::parse(&self.upstream) {
                Ok(u) => u.origin().ascii_serialization(),
                Err(_) => self.upstream.clone(),
            })
    }
}

/// The environment variable that overrides `database`.
pub const DATABASE_ENV: &str = "TOUCHGATE_GATEWAY_DATABASE";

impl GatewayConfig {
    /// `database` for messages: a PostgreSQL URL without its password.
    pub fn database_shown(&self) -> String {
        crate::store::shown(&self.database)
    }

    /// Reads and checks a config file; relative paths in it are taken from the file's folder.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let cfg = Self::parse(path)?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Reads a config file without checking it (see [`GatewayConfig::problems`]).
    pub fn parse(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg: GatewayConfig =
            toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source: Box::new(source),
            })?;
        // The environment names the database for every command (`serve`, `check`, the admin
        // commands), as a container or a secret manager sets it.
        if let Some(d) = std::env::var_os(DATABASE_ENV).filter(|d| !d.is_empty()) {
            cfg.database = d.into();
        }
        let base = path.parent().unwrap_or(std::path::Path::new("."));
        cfg.resolve_paths(base);
        Ok(cfg)
    }

    /// The WebAuthn origin in force.
    pub fn origin(&self) -> String {
        self.origin
            .clone()
            .unwrap_or_else(|| format!("https://{}", self.rp_id))
    }

    fn resolve_paths(&mut self, base: &std::path::Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if crate::store::not_a_file(&self.database).is_none()
            && !crate::store::is_postgres(&self.database)
        {
            fix(&mut self.database);
        }
        if let Some(f) = &mut self.database_password_file {
            fix(f);
        }
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        for t in &mut self.attestation.trusted {
            fix(&mut t.ca);
        }
        for s in &mut self.services {
            if let Some(ca) = &mut s.upstream_ca {
                fix(ca);
            }
        }
        if let Some(f) = self
            .oidc
            .as_mut()
            .and_then(|o| o.client_secret_file.as_mut())
        {
            fix(f);
        }
        if let Some(s) = &mut self.scim {
            fix(&mut s.token_file);
        }
        if let Some(a) = &mut self.audit_log
            && a != "-"
            && std::path::Path::new(a).is_relative()
        {
            *a = base.join(&*a).to_string_lossy().into_owned();
        }
    }

    /// Checks what serde cannot: every problem is reported at once.
    pub fn check(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("; ")))
        }
    }

    /// Everything wrong with the config's values, each in words.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for s in &self.services {
            if !seen.insert(&s.name) {
                problems.push(format!("service {:?} is defined twice", s.name));
            }
            match s.kind {
                ServiceKind::Http => {
                    if url::Url::parse(&s.upstream)
                        .map(|u| !matches!(u.scheme(), "http" | "https"))
                        .unwrap_or(true)
                    {
                        problems.push(format!(
                            "service {:?}: upstream {:?} is not an http(s) URL",
                            s.name, s.upstream
                        ));
                    }
                }
                ServiceKind::Tcp => {
                    if s.upstream
                        .rsplit_once(':')
                        .is_none_or(|(_, p)| p.parse::<u16>().is_err())
                    {
                        problems.push(format!(
                            "service {:?}: upstream {:?} is not host:port",
                            s.name, s.upstream
                        ));
                    }
                }
            }
        }
        let origin = self.origin();
        match url::Url::parse(&origin) {
            Ok(u) if u.host_str() == Some(self.rp_id.as_str()) => {}
            Ok(u)
                if u.host_str()
                    .is_some_and(|h| h.ends_with(&format!(".{}", self.rp_id))) => {}
            _ => problems.push(format!(
                "origin {origin:?} must be a URL whose host is rp_id {:?} or a subdomain of it",
                self.rp_id
            )),
        }
        if self.session.max_age.is_zero() {
            problems.push("session.max_age must be more than zero".into());
        }
        for d in &self.delegation.services {
            if self.service(d).is_none() {
                problems.push(format!(
                    "delegation.services names {d:?}, which is not a service of this gateway"
                ));
            }
        }
        if self.delegation.max_ttl < Duration::from_secs(60) {
            problems.push("delegation.max_ttl must be at least 1m".into());
        }
        problems.extend(crate::store::not_a_file(&self.database));
        if let Some(o) = &self.oidc {
            if let Err(e) = crate::oidc::check_issuer(&o.issuer) {
                problems.push(format!("oidc.issuer: {e}"));
            }
            if o.client_secret.is_some() && o.client_secret_file.is_some() {
                problems.push("oidc: set client_secret or client_secret_file, not both".into());
            }
            if !o.scopes.iter().any(|s| s == "openid") {
                problems.push("oidc.scopes must include openid".into());
            }
            // An empty list would let every account of the provider enrol (any Google
            // account, at accounts.google.com): the admin must say so.
            if o.allowed_domains.is_empty() {
                problems.push(
                    "oidc.allowed_domains is empty: list your domains (e.g. [\"example.com\"]), or [\"*\"] to take every account the provider has"
                        .into(),
                );
            }
        } else if !self.invite.enabled {
            problems.push("invite.enabled = false without [oidc]: nobody could enrol a key".into());
        }
        if let Some(s) = &self.scim {
            problems.extend(s.problems(self.admin_listen));
        }
        problems
    }

    /// What [`GatewayConfig::problems`] cannot see without the files: the TLS certificate and
    /// key, the attestation CAs, and the folders of the database and the audit log.
    pub fn file_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match crate::tls::load_certs(&self.tls.cert) {
            Ok(c) if c.is_empty() => problems.push(format!(
                "tls.cert {}: no certificate in the file",
                self.tls.cert.display()
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("tls.cert: {e}")),
        }
        if let Err(e) = crate::tls::load_key(&self.tls.key) {
            problems.push(format!("tls.key: {e}"));
        }
        for s in &self.services {
            if let Some(ca) = &s.upstream_ca
                && let Err(e) = crate::tls::load_certs(ca)
            {
                problems.push(format!("service {} upstream_ca: {e}", s.name));
            }
        }
        for t in &self.attestation.trusted {
            match crate::tls::load_certs(&t.ca) {
                Ok(c) if !c.is_empty() => {}
                Ok(_) => problems.push(format!(
                    "attestation.trusted ca {}: no certificate in the file",
                    t.ca.display()
                )),
                Err(e) => problems.push(format!("attestation.trusted ca: {e}")),
            }
        }
        let folder_of = |what: &str, p: &std::path::Path, problems: &mut Vec<String>| {
            let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
            if let Some(dir) = dir
                && !dir.is_dir()
            {
                problems.push(format!(
                    "{what} {}: the folder {} does not exist",
                    p.display(),
                    dir.display()
                ));
            }
        };
        if let Some(f) = self
            .oidc
            .as_ref()
            .and_then(|o| o.client_secret_file.as_ref())
            && let Err(e) = std::fs::read_to_string(f)
        {
            problems.push(format!("oidc.client_secret_file {}: {e}", f.display()));
        }
        if let Some(s) = &self.scim
            && let Err(e) = crate::scim::read_token(&s.token_file)
        {
            problems.push(format!("scim.token_file: {e}"));
        }
        if crate::store::is_postgres(&self.database) {
            if let Some(f) = &self.database_password_file
                && let Err(e) = std::fs::read_to_string(f)
            {
                problems.push(format!("database_password_file {}: {e}", f.display()));
            }
        } else {
            folder_of("database", &self.database, &mut problems);
        }
        if let Some(a) = self.audit_log.as_deref().filter(|a| *a != "-") {
            folder_of("audit_log", std::path::Path::new(a), &mut problems);
        }
        problems
    }

    /// Settings that weaken the defaults: allowed, but said out loud.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.attestation.allow_software {
            w.push(
                "attestation.allow_software = true: software keys can enrol; for development and demos only"
                    .to_owned(),
            );
        }
        if !self.admin_listen.ip().is_loopback() {
            w.push(format!(
                "admin_listen {} is not on loopback: /metrics and /healthz are reachable from the network",
                self.admin_listen
            ));
        }
        if self.services.is_empty() {
            w.push("no [[service]] is defined: signed-in users can reach nothing".to_owned());
        }
        if self
            .oidc
            .as_ref()
            .is_some_and(|o| o.client_secret.is_some())
        {
            w.push(
                "oidc.client_secret is in the config file: prefer client_secret_file (mode 0600)"
                    .to_owned(),
            );
        }
        if self.oidc.is_none() && self.scim.is_none() {
            for s in self.services.iter().filter(|s| !s.allow_groups.is_empty()) {
                w.push(format!(
                    "service {} has allow_groups but there is neither [oidc] nor [scim]: groups come from the identity provider",
                    s.name
                ));
            }
        }
        // Off loopback it is a problem, not a warning.
        if let Some(s) = self
            .scim
            .as_ref()
            .filter(|s| s.insecure_plain_http && s.listen.ip().is_loopback())
        {
            w.push(format!(
                "scim.insecure_plain_http = true: SCIM on {} is plain HTTP; keep a TLS-terminating proxy in front of it",
                s.listen
            ));
        }
        w
    }

    /// Where users' groups come from: SCIM alone when it is on.
    pub fn group_source(&self) -> crate::store::GroupSource {
        if self.scim.is_some() {
            crate::store::GroupSource::Scim
        } else {
            crate::store::GroupSource::IdpAndScim
        }
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }
}

fn default_upstream_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_id_source() -> IdTokenSource {
    IdTokenSource::Metadata
}
fn default_metadata_url() -> String {
    "http://metadata.google.internal".into()
}
fn default_max_age() -> Duration {
    Duration::from_secs(12 * 3600)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_challenge_ttl() -> Duration {
    Duration::from_secs(120)
}
fn default_invite_ttl() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> GatewayConfig {
        toml::from_str(text).expect("valid toml")
    }

    const BASE: &str = r#"
        listen = "127.0.0.1:4433"
        rp_id = "gw.example.com"
        database = "state.db"
        [tls]
        cert = "cert.pem"
        key = "key.pem"
    "#;

    #[test]
    fn defaults_are_safe() {
        let cfg = parse(BASE);
        assert!(!cfg.attestation.allow_software);
        assert_eq!(cfg.origin(), "https://gw.example.com");
        assert_eq!(cfg.id_tokens.source, IdTokenSource::Metadata);
        assert!(cfg.admin_listen.ip().is_loopback());
        cfg.check().expect("base config is valid");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let cfg = parse(&format!(
            "origin = \"https://evil.test\"\n{BASE}\n[[service]]\nname=\"a\"\nkind=\"http\"\nupstream=\"nope\"\n[[service]]\nname=\"a\"\nkind=\"tcp\"\nupstream=\"db\"\n"
        ));
        let msg = cfg.check().expect_err("invalid").to_string();
        assert!(msg.contains("defined twice"), "{msg}");
        assert!(msg.contains("not an http(s) URL"), "{msg}");
        assert!(msg.contains("not host:port"), "{msg}");
        assert!(msg.contains("origin"), "{msg}");
    }

    #[test]
    fn an_identity_provider_must_be_https_and_say_which_domains_it_takes() {
        let oidc = |extra: &str| {
            parse(&format!(
                "{BASE}\n[oidc]\nissuer = \"https://accounts.google.com\"\nclient_id = \"c\"\n{extra}"
            ))
        };
        let msg = oidc("").check().expect_err("no domains").to_string();
        assert!(msg.contains("oidc.allowed_domains is empty"), "{msg}");
        oidc("allowed_domains = [\"example.com\"]")
            .check()
            .expect("domains");
        oidc("allowed_domains = [\"*\"]")
            .check()
            .expect("everyone, said out loud");
        let msg = parse(&format!(
            "{BASE}\n[oidc]\nissuer = \"http://idp.example.com\"\nclient_id = \"c\"\nallowed_domains = [\"*\"]\n"
        ))
        .check()
        .expect_err("plain http")
        .to_string();
        assert!(msg.contains("not https://"), "{msg}");
        assert!(
            !oidc("allowed_domains = [\"*\"]")
                .oidc
                .expect("oidc")
                .device_flow
        );
        let msg = parse(&format!("{BASE}\n[invite]\nenabled = false\n"))
            .check()
            .expect_err("nobody could enrol")
            .to_string();
        assert!(msg.contains("nobody could enrol"), "{msg}");
    }

    #[test]
    fn audience_defaults_to_the_upstream_origin() {
        let s = ServiceConfig {
            name: "api".into(),
            kind: ServiceKind::Http,
            upstream: "https://api-xyz.a.run.app/v1".into(),
            audience: None,
            timeout: default_upstream_timeout(),
            allow: vec!["*".into()],
            allow_groups: Vec::new(),
            upgrade_protocols: default_upgrade_protocols(),
            http2: false,
            upstream_ca: None,
        };
        assert_eq!(s.audience(), "https://api-xyz.a.run.app");
        assert!(s.allows("anyone", &[]));
    }

    #[test]
    fn users_groups_and_everyone_each_grant_and_say_so() {
        let s: ServiceConfig = toml::from_str(
            "name = \"api\"\nkind = \"http\"\nupstream = \"https://a.run.app\"\nallow = [\"bob@example.com\"]\nallow_groups = [\"eng@example.com\", \"oncall\"]\n",
        )
        .expect("service");
        let groups = |g: &[&str]| g.iter().map(|g| g.to_string()).collect::<Vec<_>>();
        assert_eq!(s.grant("bob@example.com", &[]).as_deref(), Some("user"));
        assert_eq!(
            s.grant("alice@example.com", &groups(&["staff", "oncall"]))
                .as_deref(),
            Some("group:oncall")
        );
        assert_eq!(s.grant("alice@example.com", &groups(&["staff"])), None);
        // Names match exactly: no case folding, no prefixes.
        assert_eq!(
            s.grant("alice@example.com", &groups(&["OnCall", "eng"])),
            None
        );
    }
}

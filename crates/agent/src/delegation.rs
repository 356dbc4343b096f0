//! Delegated grants: a narrow, expiring grant of the user's access that a script, a CI job or
//! an AI agent uses without a security key.
//!
//! The user approves a grant with one touch ([`delegate`]): the assertion's channel binding is
//! [`Grant::binding`], so the key signs the scope itself, and the gateway records exactly what
//! was signed. The gateway answers a token bound (`cnf`) to a key made for the grant (or one
//! the delegate made on its own machine: [`DelegateKey`]); the [`DelegationFile`] holds the
//! token, that key, and what a headless agent needs to reach the gateway.
//! [`load_headless`] turns a file back into an agent config, the key and the token, for
//! [`crate::RunningAgent::start_delegated`].

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, pem::PemObject};
use serde::{Deserialize, Serialize};
use touchgate_proto::{ClientMsg, DelegationInfo, Grant, ServerMsg, ServiceInfo};
use webauthn_rs_proto::RequestChallengeResponse;

use crate::{
    AgentConfig, SharedAuthn,
    authenticator::{Ceremony, client_data_json},
    tunnel::{SessionKey, TunnelError},
};

/// The file format's version.
pub const FORMAT: u32 = 1;

/// What the user grants: services, and for HTTP services the methods and path prefixes.
#[derive(Debug, Clone)]
pub struct GrantRequest {
    /// Who it is for, in words.
    pub label: String,
    /// The services.
    pub services: Vec<String>,
    /// HTTP methods (empty: any).
    pub methods: Vec<String>,
    /// Path prefixes (empty: any).
    pub path_prefixes: Vec<String>,
    /// How long it lasts.
    pub ttl: Duration,
}

/// A delegate's key: a P-256 key and its self-signed certificate (whose thumbprint a grant
/// names), as PEM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelegateKey {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key (PKCS#8), PEM; absent in a grant made for a key held elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_pem: Option<String>,
}

impl DelegateKey {
    /// A new key and certificate.
    pub fn generate() -> Result<Self, DelegationError> {
        let (cert, kp) =
            crate::tunnel::self_signed("touchgate-delegate").map_err(DelegationError::Key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: Some(kp.serialize_pem()),
        })
    }

    /// A key held elsewhere, from its certificate's PEM text (the `.crt` that
    /// `touchgate delegation-key` made on the delegate's machine). Text holding a private key
    /// is refused: that key should never have left the delegate.
    pub fn from_certificate_pem(text: &str) -> Result<Self, String> {
        if PrivatePkcs8KeyDer::from_pem_slice(text.as_bytes()).is_ok()
            || text.contains("PRIVATE KEY")
        {
            return Err(
                "that text holds a private key: paste only the certificate (the .crt); the key stays with the delegate"
                    .into(),
            );
        }
        let cert = CertificateDer::from_pem_slice(text.as_bytes()).map_err(|_| {
            "not a certificate: paste the .crt that `touchgate delegation-key` made".to_owned()
        })?;
        let k = Self {
            cert_pem: pem("CERTIFICATE", &cert),
            key_pem: None,
        };
        k.thumbprint().map_err(|e| e.to_string())?;
        Ok(k)
    }

    /// Reads a key file: a certificate, and the private key when there is one.
    pub fn read(path: &Path) -> Result<Self, DelegationError> {
        let text = std::fs::read_to_string(path).map_err(|e| DelegationError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let cert =
            CertificateDer::from_pem_slice(text.as_bytes()).map_err(|e| DelegationError::File {
                path: path.to_owned(),
                reason: format!(
                    "no certificate in it ({e}): make one with `touchgate delegation-key`"
                ),
            })?;
        let key = PrivatePkcs8KeyDer::from_pem_slice(text.as_bytes()).ok();
        if key.is_some() {
            check_private(path)?;
        }
        Ok(Self {
            cert_pem: pem("CERTIFICATE", &cert),
            key_pem: key.map(|k| pem("PRIVATE KEY", k.secret_pkcs8_der())),
        })
    }

    /// The certificate's thumbprint, as a grant's `key` and the token's `cnf` name it.
    pub fn thumbprint(&self) -> Result<String, DelegationError> {
        let cert = self.cert_der()?;
        Ok(crate::tunnel::cert_thumbprint(&cert))
    }

    fn cert_der(&self) -> Result<CertificateDer<'static>, DelegationError> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| DelegationError::Key(format!("unreadable certificate: {e}")))
    }

    /// The session key a headless agent presents.
    pub fn session_key(&self) -> Result<SessionKey, DelegationError> {
        let Some(key) = &self.key_pem else {
            return Err(DelegationError::NoPrivateKey);
        };
        let key = PrivatePkcs8KeyDer::from_pem_slice(key.as_bytes())
            .map_err(|e| DelegationError::Key(format!("unreadable private key: {e}")))?;
        Ok(SessionKey::from_parts(
            self.cert_der()?,
            key.secret_pkcs8_der().to_vec(),
        ))
    }

    /// The PEM text of the file `touchgate delegation-key` writes: certificate, then key.
    pub fn to_pem(&self) -> String {
        format!(
            "{}{}",
            self.cert_pem,
            self.key_pem.as_deref().unwrap_or_default()
        )
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    der::pem::encode_string(label, der::pem::LineEnding::LF, der).unwrap_or_default()
}

/// What a delegate needs: the grant's token and key, and how to reach the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelegationFile {
    /// [`FORMAT`].
    pub format: u32,
    /// The grant as the gateway recorded it.
    pub grant: DelegationInfo,
    /// The delegation token.
    pub token: String,
    /// The services granted, with their kinds.
    pub services: Vec<ServiceInfo>,
    /// The delegate's key.
    pub key: DelegateKey,
    /// The gateway's addresses, as in the agent config.
    pub gateway: Vec<String>,
    /// Its TLS server name, when the config sets one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Its certificate's pinned fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_cert_sha256: Option<String>,
    /// The CA that signs its certificate, PEM (instead of a pin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_ca_pem: Option<String>,
}

/// Errors of delegation, worded for the user.
#[derive(Debug, thiserror::Error)]
pub enum DelegationError {
    /// Talking to the gateway failed, or it refused.
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    /// A file could not be read, written or understood.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A key could not be made or read.
    #[error("delegate key: {0}")]
    Key(String),
    /// The file holds no private key and none was given.
    #[error(
        "this grant was made for a key held elsewhere: give its key file with --key (made by `touchgate delegation-key`)"
    )]
    NoPrivateKey,
    /// The key given is not the one the grant names.
    #[error("the key given is not the one this grant was made for")]
    WrongKey,
    /// The grant has expired.
    #[error("the grant {label:?} expired at {at}: ask its owner for a new one")]
    Expired {
        /// Its label.
        label: String,
        /// When, in words.
        at: String,
    },
}

/// Asks the gateway for a grant of `cfg.user`'s access and has the key approve it with one
/// touch; the grant is bound to `key`.
pub async fn delegate(
    cfg: &AgentConfig,
    authn: &SharedAuthn,
    request: &GrantRequest,
    key: DelegateKey,
) -> Result<DelegationFile, DelegationError> {
    let c = crate::OneOff::open(cfg).await?;
    let made = delegate_on(&c.tunnel, cfg, authn, request, key).await;
    c.close().await;
    made
}

/// [`delegate`] on a connection already open (a running agent's).
pub(crate) async fn delegate_on(
    tunnel: &crate::tunnel::Tunnel,
    cfg: &AgentConfig,
    authn: &SharedAuthn,
    request: &GrantRequest,
    key: DelegateKey,
) -> Result<DelegationFile, DelegationError> {
    let grant = Grant {
        label: request.label.clone(),
        services: request.services.clone(),
        methods: request.methods.clone(),
        path_prefixes: request.path_prefixes.clone(),
        expires_at: crate::unix_now() + request.ttl.as_secs(),
        key: key.thumbprint()?,
    }
    .normalised();
    let (grant, token, services) = approve(tunnel, cfg, authn, &grant).await?;
    Ok(DelegationFile {
        format: FORMAT,
        grant,
        token,
        services,
        key,
        gateway: cfg.gateway.iter().map(str::to_owned).collect(),
        server_name: cfg.server_name.clone(),
        gateway_cert_sha256: cfg.gateway_cert_sha256.clone(),
        gateway_ca_pem: match &cfg.gateway_ca {
            Some(p) => Some(
                std::fs::read_to_string(p).map_err(|e| DelegationError::File {
                    path: p.clone(),
                    reason: e.to_string(),
                })?,
            ),
            None => None,
        },
    })
}

/// The ceremony on one connection: the challenge for the grant, the key's assertion with the
/// grant's binding, the gateway's token.
async fn approve(
    tunnel: &crate::tunnel::Tunnel,
    cfg: &AgentConfig,
    authn: &SharedAuthn,
    grant: &Grant,
) -> Result<(DelegationInfo, String, Vec<ServiceInfo>), DelegationError> {
    let reply = tunnel
        .request(&ClientMsg::DelegateBegin {
            user: cfg.user.clone(),
            grant: grant.clone(),
        })
        .await?;
    let ServerMsg::LoginChallenge { options, origin } = reply else {
        return Err(TunnelError::Protocol(format!("expected a challenge, got {reply:?}")).into());
    };
    let rcr: RequestChallengeResponse = serde_json::from_value(options)
        .map_err(|e| TunnelError::Protocol(format!("bad request options: {e}")))?;
    crate::tunnel::SignFor::of(cfg).check_request(&rcr, &origin)?;
    let origin = cfg.origin.clone().unwrap_or(origin);
    let cdj = client_data_json(
        Ceremony::Get,
        rcr.public_key.challenge.as_ref(),
        &origin,
        &grant.binding(tunnel.binding()),
    );
    let authn = authn.clone();
    let cred = tokio::task::spawn_blocking(move || {
        authn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .authenticate(&rcr.public_key, &cdj)
    })
    .await
    .map_err(|e| TunnelError::Protocol(e.to_string()))?
    .map_err(TunnelError::from)?;
    let credential =
        serde_json::to_value(&cred).map_err(|e| TunnelError::Protocol(e.to_string()))?;
    match tunnel
        .request(&ClientMsg::DelegateFinish { credential })
        .await?
    {
        ServerMsg::Delegated {
            info,
            token,
            services,
        } => {
            if info.grant != *grant || info.user != cfg.user || !grant_id_ok(&info.id) {
                return Err(TunnelError::Protocol(
                    "the gateway recorded another grant than the one approved".into(),
                )
                .into());
            }
            Ok((info, token, services))
        }
        other => Err(TunnelError::Protocol(format!("expected the grant, got {other:?}")).into()),
    }
}

/// Whether `id` has the shape the gateway gives grant ids (`dlg-` and 16 hex digits): it
/// names a file of the agent's, so nothing else is taken.
pub(crate) fn grant_id_ok(id: &str) -> bool {
    id.strip_prefix("dlg-")
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Fails unless only the owner can read `path` (it holds a private key).
fn check_private(path: &Path) -> Result<(), DelegationError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(|e| DelegationError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        if meta.mode() & 0o077 != 0 {
            return Err(DelegationError::File {
                path: path.to_owned(),
                reason: format!(
                    "it holds a private key and others may read it (mode {:o}): chmod 600 {}",
                    meta.mode() & 0o777,
                    path.display()
                ),
            });
        }
    }
    Ok(())
}

/// Writes `text` to `path`, readable by its owner only (mode 0600), replacing what was there.
pub fn write_private(path: &Path, text: &str) -> Result<(), DelegationError> {
    write_private_as(path, text, false)
}

/// [`write_private`] to a file that must not exist yet (nor be a link to one).
fn write_private_as(path: &Path, text: &str, new: bool) -> Result<(), DelegationError> {
    let fail = |e: std::io::Error| DelegationError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let mut opts = std::fs::OpenOptions::new();
    if new {
        // O_CREAT|O_EXCL: fails on anything there, a symbolic link included.
        opts.write(true).create_new(true);
    } else {
        opts.write(true).create(true).truncate(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(fail)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(fail)?;
    }
    f.write_all(text.as_bytes()).map_err(fail)?;
    f.sync_all().map_err(fail)
}

impl DelegationFile {
    /// Writes the file (mode 0600: it holds the token and, usually, the key).
    pub fn write(&self, path: &Path) -> Result<(), DelegationError> {
        self.write_as(path, false)
    }

    /// [`DelegationFile::write`] to a new file: nothing may be at `path` yet.
    pub fn write_new(&self, path: &Path) -> Result<(), DelegationError> {
        self.write_as(path, true)
    }

    fn write_as(&self, path: &Path, new: bool) -> Result<(), DelegationError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| DelegationError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        write_private_as(path, &format!("{text}\n"), new)
    }

    /// Reads a file; refuses one others may read.
    pub fn read(path: &Path) -> Result<Self, DelegationError> {
        check_private(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| DelegationError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let file: Self = serde_json::from_str(&text).map_err(|e| DelegationError::File {
            path: path.to_owned(),
            reason: format!("not a delegation file ({e})"),
        })?;
        if file.format != FORMAT {
            return Err(DelegationError::File {
                path: path.to_owned(),
                reason: format!(
                    "format {} is not one this touchgate reads ({FORMAT}): update touchgate",
                    file.format
                ),
            });
        }
        Ok(file)
    }
}

/// What a headless agent runs on: its config, its key, the token.
pub struct Headless {
    /// The agent config: the gateway from the file, the services on their ports.
    pub cfg: AgentConfig,
    /// The grant's key.
    pub key: SessionKey,
    /// The delegation token.
    pub token: String,
    /// The grant.
    pub grant: DelegationInfo,
    /// A file holding the gateway's CA, kept for the agent's life.
    _ca: Option<tempfile::NamedTempFile>,
}

/// Turns a delegation file into a headless agent's config: every granted service on its port
/// from `ports` (0, a free one, when not named), `key` when the file holds none, its own
/// status socket (`socket`, by default one named after the grant in the runtime folder), so
/// it runs beside the user's own agent.
pub fn load_headless(
    file: &DelegationFile,
    key: Option<&DelegateKey>,
    ports: &[(String, u16)],
    socket: Option<PathBuf>,
) -> Result<Headless, DelegationError> {
    if !grant_id_ok(&file.grant.id) {
        return Err(DelegationError::Key(format!(
            "the file names a grant id of an unknown shape ({:?})",
            file.grant.id
        )));
    }
    let now = crate::unix_now();
    if file.grant.grant.expires_at <= now {
        return Err(DelegationError::Expired {
            label: file.grant.grant.label.clone(),
            at: humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_secs(file.grant.grant.expires_at),
            )
            .to_string(),
        });
    }
    let key = match (key, &file.key.key_pem) {
        (Some(k), _) => {
            if k.thumbprint()? != file.grant.grant.key {
                return Err(DelegationError::WrongKey);
            }
            k.session_key()?
        }
        (None, Some(_)) => file.key.session_key()?,
        (None, None) => return Err(DelegationError::NoPrivateKey),
    };
    for (name, _) in ports {
        if !file.services.iter().any(|s| s.name == *name) {
            return Err(DelegationError::File {
                path: PathBuf::from("--port"),
                reason: format!(
                    "the grant has no service {name:?} (it has {})",
                    file.services
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
    }
    let ca = match &file.gateway_ca_pem {
        Some(pem) => {
            let mut f =
                tempfile::NamedTempFile::new().map_err(|e| DelegationError::Key(e.to_string()))?;
            f.write_all(pem.as_bytes())
                .map_err(|e| DelegationError::Key(e.to_string()))?;
            Some(f)
        }
        None => None,
    };
    let mut table = toml::Table::new();
    table.insert(
        "gateway".into(),
        toml::Value::Array(
            file.gateway
                .iter()
                .cloned()
                .map(toml::Value::String)
                .collect(),
        ),
    );
    table.insert("user".into(), file.grant.user.clone().into());
    if let Some(n) = &file.server_name {
        table.insert("server_name".into(), n.clone().into());
    }
    if let Some(p) = &file.gateway_cert_sha256 {
        table.insert("gateway_cert_sha256".into(), p.clone().into());
    }
    if let Some(f) = &ca {
        table.insert(
            "gateway_ca".into(),
            f.path().to_string_lossy().into_owned().into(),
        );
    }
    let services = file
        .services
        .iter()
        .map(|s| {
            let port = ports
                .iter()
                .find(|(n, _)| *n == s.name)
                .map_or(0, |(_, p)| *p);
            let mut t = toml::Table::new();
            t.insert("name".into(), s.name.clone().into());
            t.insert("local_port".into(), i64::from(port).into());
            toml::Value::Table(t)
        })
        .collect();
    table.insert("service".into(), toml::Value::Array(services));
    let mut cfg =
        AgentConfig::from_table(table).map_err(|e| DelegationError::Key(e.to_string()))?;
    cfg.control_socket = Some(match socket {
        Some(s) => s,
        None => cfg
            .control_socket()
            .with_file_name(format!("delegation-{}.sock", file.grant.id)),
    });
    cfg.check()
        .map_err(|e| DelegationError::Key(e.to_string()))?;
    Ok(Headless {
        cfg,
        key,
        token: file.token.clone(),
        grant: file.grant.clone(),
        _ca: ca,
    })
}

/// Signs in on a connection of its own (one touch) and lists the user's grants.
pub async fn list(
    cfg: &AgentConfig,
    authn: &SharedAuthn,
) -> Result<Vec<DelegationInfo>, DelegationError> {
    let c = crate::OneOff::open(cfg).await?;
    let done = async {
        c.tunnel
            .login(authn, &cfg.user, cfg.origin.as_deref())
            .await?;
        list_on(&c.tunnel).await
    }
    .await;
    c.close().await;
    Ok(done?)
}

/// Signs in on a connection of its own (one touch) and revokes the user's grant `id` (its id
/// or label); returns its id.
pub async fn revoke(
    cfg: &AgentConfig,
    authn: &SharedAuthn,
    id: &str,
) -> Result<String, DelegationError> {
    let c = crate::OneOff::open(cfg).await?;
    let done = async {
        c.tunnel
            .login(authn, &cfg.user, cfg.origin.as_deref())
            .await?;
        revoke_on(&c.tunnel, id).await
    }
    .await;
    c.close().await;
    Ok(done?)
}

/// The user's grants, asked on `tunnel`'s session.
pub(crate) async fn list_on(
    tunnel: &crate::tunnel::Tunnel,
) -> Result<Vec<DelegationInfo>, TunnelError> {
    match tunnel.request(&ClientMsg::ListDelegations).await? {
        ServerMsg::Delegations { grants } => Ok(grants),
        other => Err(TunnelError::Protocol(format!(
            "expected the grants, got {other:?}"
        ))),
    }
}

/// Revokes the user's grant `id` (id or label) on `tunnel`'s session; returns its id.
pub(crate) async fn revoke_on(
    tunnel: &crate::tunnel::Tunnel,
    id: &str,
) -> Result<String, TunnelError> {
    match tunnel
        .request(&ClientMsg::RevokeDelegation { id: id.to_owned() })
        .await?
    {
        ServerMsg::DelegationRevoked { id } => Ok(id),
        other => Err(TunnelError::Protocol(format!(
            "expected the revocation, got {other:?}"
        ))),
    }
}

/// The environment variable `touchgate run` exports a service's URL in:
/// `TOUCHGATE_<NAME>_URL`, the name upper case with anything but letters and digits as `_`.
pub fn url_variable(service: &str) -> String {
    let name: String = service
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("TOUCHGATE_{name}_URL")
}

/// One line per grant, for `touchgate delegations` and the admin's list.
pub fn describe(d: &DelegationInfo, now: u64) -> String {
    let g = &d.grant;
    let state = match d.revoked_at {
        Some(_) => "revoked".to_owned(),
        None if g.expires_at <= now => "expired".to_owned(),
        None => format!(
            "{} left",
            humantime::format_duration(Duration::from_secs(
                ((g.expires_at - now) / 60).max(1) * 60
            ))
        ),
    };
    let any = |v: &[String], all: &str| {
        if v.is_empty() {
            all.to_owned()
        } else {
            v.join(",")
        }
    };
    let used = match d.last_used_at {
        Some(t) => format!(
            "last used {}",
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t))
        ),
        None => "never used".to_owned(),
    };
    printable(&format!(
        "{}  {:?}  services {}  methods {}  paths {}  {state}  {used}",
        d.id,
        g.label,
        g.services.join(","),
        any(&g.methods, "any"),
        any(&g.path_prefixes, "any"),
    ))
}

/// `s` without control characters: what a gateway says goes to a terminal as text, never as
/// escape sequences.
pub fn printable(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_gateways_grant_ids_are_taken() {
        assert!(grant_id_ok("dlg-3f9c0d41a2b7e815"));
        for bad in [
            "dlg-3f9c0d41a2b7e81",
            "dlg-../../../tmp/x",
            "x-3f9c0d41a2b7e815",
            "",
        ] {
            assert!(!grant_id_ok(bad), "{bad}");
        }
    }

    #[test]
    fn url_variables_are_shell_names() {
        assert_eq!(url_variable("api"), "TOUCHGATE_API_URL");
        assert_eq!(url_variable("billing-db.v2"), "TOUCHGATE_BILLING_DB_V2_URL");
    }

    #[test]
    fn a_key_file_round_trips_and_is_refused_when_others_may_read_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = DelegateKey::generate().expect("key");
        let path = dir.path().join("bot.key");
        write_private(&path, &key.to_pem()).expect("write");
        let back = DelegateKey::read(&path).expect("read");
        assert_eq!(
            back.thumbprint().expect("thumb"),
            key.thumbprint().expect("thumb")
        );
        assert!(back.session_key().is_ok());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let e = DelegateKey::read(&path).expect_err("refused");
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
        // The certificate alone (what the grantor gets) holds no key.
        let crt = dir.path().join("bot.crt");
        std::fs::write(&crt, &key.cert_pem).expect("write");
        let public = DelegateKey::read(&crt).expect("read");
        assert!(public.key_pem.is_none());
        assert!(matches!(
            public.session_key(),
            Err(DelegationError::NoPrivateKey)
        ));
    }
}

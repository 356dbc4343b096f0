//! The agent's TOML configuration.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors loading an agent config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read agent config {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("agent config {path} is invalid: {source}")]
    Parse {
        /// The path.
        path: PathBuf,
        /// The parse error.
        source: Box<toml::de::Error>,
    },
    /// The config parsed but does not make sense.
    #[error("agent config is invalid: {0}")]
    Invalid(String),
    /// No config path was given and the platform has no config directory.
    #[error("no config file given and no platform config directory found: pass --config")]
    NoConfigDir,
}

/// The agent config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The gateway's address, `host:port` (UDP), or a list of the addresses of its replicas:
    /// the agent connects to one and, when it loses it, resumes its session on another.
    pub gateway: GatewayAddrs,
    /// TLS server name of the gateway; defaults to the host part of each `gateway` address.
    #[serde(default)]
    pub server_name: Option<String>,
    /// SHA-256 fingerprint (hex) of the gateway's certificate, pinned.
    #[serde(default)]
    pub gateway_cert_sha256: Option<String>,
    /// A PEM CA file that signs the gateway's certificate (instead of a pin).
    #[serde(default)]
    pub gateway_ca: Option<PathBuf>,
    /// The user, as enrolled on the gateway.
    pub user: String,
    /// `"hid"` for a USB security key, or `"soft:PATH"` for a software key stored at PATH.
    #[serde(default = "default_authenticator")]
    pub authenticator: String,
    /// Which security key to use when several are plugged in: a part of its path or product
    /// name (see `touchgate keys`). By default the one that holds a credential for this gateway.
    #[serde(default)]
    pub device: Option<String>,
    /// How long to wait for a touch on a security key.
    #[serde(default = "default_touch_timeout", with = "humantime_serde")]
    pub touch_timeout: std::time::Duration,
    /// End the session when the key that signed in is unplugged.
    #[serde(default)]
    pub lock_on_key_removal: bool,
    /// The WebAuthn origin this agent signs for; by default `https://{rp_id}`. A challenge
    /// that names another origin is refused before the key is asked.
    #[serde(default)]
    pub origin: Option<String>,
    /// The WebAuthn relying party this agent signs for; by default the gateway's TLS server
    /// name. A challenge for any other site is refused before the key is asked, so a gateway
    /// that is not ours cannot relay a sign-in to another site.
    #[serde(default)]
    pub rp_id: Option<String>,
    /// The organisation's identity provider (its issuer URL) this agent signs in with when it
    /// enrols without an invite. Set in the managed file, it pins the provider: a gateway
    /// that sends the browser anywhere else is refused. Unset, any https page the gateway
    /// names is taken.
    #[serde(default)]
    pub idp_issuer: Option<String>,
    /// Serve connections from other OS users of this machine too. Off by default: on Linux a
    /// local connection whose socket belongs to another user is closed before it reaches the
    /// gateway (other systems have no such check).
    #[serde(default)]
    pub allow_other_users: bool,
    /// Path of the local status socket; defaults to the platform runtime directory.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Services to expose on localhost.
    #[serde(default, rename = "service")]
    pub services: Vec<LocalService>,
    /// One more local port that serves every HTTP service the user may use by name, at
    /// `http://NAME.localhost:PORT/` (0 picks a free port). Off when absent.
    #[serde(default)]
    pub router_port: Option<u16>,
    /// How long before the session ends the front ends warn and offer to renew it.
    #[serde(default = "default_renew_reminder", with = "humantime_serde")]
    pub renew_reminder: std::time::Duration,
    /// Tray app: start when the user logs in.
    #[serde(default)]
    pub autostart: bool,
    /// Tray app: ask for a touch as soon as it starts, instead of waiting for "Sign in…".
    #[serde(default)]
    pub sign_in_on_launch: bool,
    /// How to reach the gateway: `"auto"` (QUIC on UDP, and the TCP carrier when QUIC gets no
    /// answer), `"quic"` or `"tcp"`. A `wss://` gateway address is always reached over TCP.
    #[serde(default)]
    pub transport: Transport,
    /// The HTTP proxy the TCP carrier goes through, `http://[user:password@]host:port`; by
    /// default `HTTPS_PROXY` (or `https_proxy`), honouring `NO_PROXY`. `"none"`: never a proxy.
    #[serde(default)]
    pub proxy: Option<String>,
    /// While on TCP because QUIC got no answer, how often QUIC is tried again; the agent moves
    /// back as soon as it answers.
    #[serde(default = "default_quic_retry", with = "humantime_serde")]
    pub quic_retry: std::time::Duration,
    /// How long one TCP carrier is used before the agent moves to a fresh one (front ends end
    /// long requests: Cloud Run at 60 minutes); requests in flight finish on the old one.
    #[serde(default = "default_carrier_max_age", with = "humantime_serde")]
    pub carrier_max_age: std::time::Duration,
}

/// How the agent reaches the gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// QUIC on UDP first; the TCP carrier when no QUIC handshake finishes within
    /// about two seconds (UDP blocked), and back to QUIC when it answers again.
    #[default]
    Auto,
    /// QUIC on UDP only.
    Quic,
    /// The TCP carrier only.
    Tcp,
}

/// One configured gateway address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayAddr<'a> {
    /// `host:port`: QUIC on UDP, and the carrier over TLS on TCP at the same port.
    Direct {
        /// The host (an IPv6 address without brackets).
        host: &'a str,
        /// The port.
        port: u16,
    },
    /// `wss://host[:port]/path`: the carrier only, through a front end that terminates TLS.
    FrontEnd {
        /// The URL as configured.
        url: &'a str,
        /// The URL's host.
        host: String,
        /// Its port (443 by default).
        port: u16,
    },
}

impl<'a> GatewayAddr<'a> {
    /// Reads a configured address; says what is wrong when it is neither shape.
    pub fn parse(addr: &'a str) -> Result<Self, String> {
        if addr.contains("://") {
            let url = url::Url::parse(addr).map_err(|e| format!("is not a URL ({e})"))?;
            if url.scheme() != "wss" {
                return Err(format!(
                    "is a {}:// URL: write host:port, or wss://host/path for a gateway behind a front end",
                    url.scheme()
                ));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err("has credentials in it: a gateway URL has none".into());
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err("has a query or fragment: write wss://host[:port]/path".into());
            }
            let host = match url.host() {
                Some(url::Host::Domain(d)) => d.to_owned(),
                Some(url::Host::Ipv4(ip)) => ip.to_string(),
                Some(url::Host::Ipv6(ip)) => ip.to_string(),
                None => return Err("has no host".into()),
            };
            let port = url.port_or_known_default().unwrap_or(443);
            return Ok(Self::FrontEnd {
                url: addr,
                host,
                port,
            });
        }
        let (host, port) = gateway_host_port(addr).map_err(str::to_owned)?;
        Ok(Self::Direct { host, port })
    }

    /// The host the gateway's name is taken from.
    pub fn host(&self) -> &str {
        match self {
            Self::Direct { host, .. } => host,
            Self::FrontEnd { host, .. } => host,
        }
    }
}

/// The gateway's addresses, `host:port` each, in the order the config lists them. The file
/// may give one string or a list; an empty list and a duplicate are refused by
/// [`AgentConfig::check`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "OneOrMany")]
pub struct GatewayAddrs(Vec<String>);

/// The shapes `gateway` may take in the file.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a gateway address \"host:port\", or a list of them such as [\"gw-a.example:443\", \"gw-b.example:443\"]"
)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl From<OneOrMany> for GatewayAddrs {
    fn from(v: OneOrMany) -> Self {
        match v {
            OneOrMany::One(a) => Self(vec![a]),
            OneOrMany::Many(l) => Self(l),
        }
    }
}

impl From<String> for GatewayAddrs {
    fn from(addr: String) -> Self {
        Self(vec![addr])
    }
}

impl From<&str> for GatewayAddrs {
    fn from(addr: &str) -> Self {
        Self(vec![addr.to_owned()])
    }
}

impl From<Vec<String>> for GatewayAddrs {
    fn from(addrs: Vec<String>) -> Self {
        Self(addrs)
    }
}

impl GatewayAddrs {
    /// The addresses, as configured.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    /// The first address, if there is one.
    pub fn first(&self) -> Option<&str> {
        self.0.first().map(String::as_str)
    }

    /// How many addresses there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The addresses as people read them: `gw-a.example:443, gw-b.example:443`.
impl std::fmt::Display for GatewayAddrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

/// Splits a configured gateway address, `host:port`, into the host (brackets of an IPv6
/// address removed) and the port; says what is wrong when it is not that. Stricter than
/// `touchgate_common::host::split_host_port`, which reads `Host` headers leniently.
fn gateway_host_port(addr: &str) -> Result<(&str, u16), &'static str> {
    let (host, port) = addr.rsplit_once(':').ok_or("must be host:port")?;
    let port = port.parse::<u16>().map_err(|_| "must be host:port")?;
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    match bare {
        Some(ip) if ip.parse::<std::net::Ipv6Addr>().is_ok() => Ok((ip, port)),
        Some(_) => Err("has brackets around something that is not an IPv6 address"),
        None if host.contains(':') => {
            Err("has an IPv6 address without brackets: write it as [ADDRESS]:PORT")
        }
        None if host.is_empty() => Err("must be host:port"),
        None => Ok((host, port)),
    }
}

/// One service exposed on localhost.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalService {
    /// The gateway's name for the service.
    pub name: String,
    /// The local TCP port on 127.0.0.1 (0 picks a free one).
    pub local_port: u16,
    /// Host names (or IPs) besides the loopback ones that browsers may name in `Host`, e.g. a
    /// name mapped to 127.0.0.1 in /etc/hosts. Bare names: no scheme, port or path.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Web origins besides the port's own that may call the service from a browser, e.g. a
    /// local front end at `http://localhost:3000`.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

impl LocalService {
    /// What the gateway is told about browser access to this service, on local `port` (the
    /// bound one, which differs from `local_port` when that is 0).
    pub fn access(&self, port: u16) -> touchgate_proto::LocalAccess {
        touchgate_proto::LocalAccess {
            port,
            allowed_hosts: self.allowed_hosts.clone(),
            allowed_origins: self.allowed_origins.clone(),
            name_host: None,
        }
    }
}

/// Which authenticator to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthenticatorChoice {
    /// A USB security key.
    Hid,
    /// A software key in a file.
    Soft(PathBuf),
}

fn default_touch_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

fn default_quic_retry() -> std::time::Duration {
    std::time::Duration::from_secs(3 * 60)
}

fn default_carrier_max_age() -> std::time::Duration {
    std::time::Duration::from_secs(55 * 60)
}

fn default_renew_reminder() -> std::time::Duration {
    std::time::Duration::from_secs(10 * 60)
}

fn default_authenticator() -> String {
    "hid".into()
}

impl AgentConfig {
    /// Reads a config file; a relative soft-key path is taken from the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source: Box::new(source),
            })?;
        resolve_relative_paths(&mut table, path.parent().unwrap_or(Path::new(".")));
        let cfg = Self::from_table(table).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Builds a config from a parsed TOML table (paths already absolute).
    pub fn from_table(table: toml::Table) -> Result<Self, toml::de::Error> {
        toml::Value::Table(table).try_into()
    }

    /// The default config path: `<platform config dir>/agent.toml`.
    pub fn default_path() -> Result<PathBuf, ConfigError> {
        directories::ProjectDirs::from("dev", "touchgate", "touchgate")
            .map(|d| d.config_dir().join("agent.toml"))
            .ok_or(ConfigError::NoConfigDir)
    }

    /// Checks what serde cannot, reporting every problem at once.
    pub fn check(&self) -> Result<(), ConfigError> {
        let mut problems = self.gateway_problems();
        if self.gateway_cert_sha256.is_none() && self.gateway_ca.is_none() {
            problems.push(
                "set gateway_cert_sha256 (the gateway certificate's fingerprint) or gateway_ca: \
                 the agent never trusts a gateway it cannot verify"
                    .into(),
            );
        }
        if let Some(pin) = &self.gateway_cert_sha256
            && (normalise_fingerprint(pin).len() != 64
                || !normalise_fingerprint(pin)
                    .chars()
                    .all(|c| c.is_ascii_hexdigit()))
        {
            problems.push("gateway_cert_sha256 must be 64 hex digits".into());
        }
        if let Err(e) = self.authenticator_choice() {
            problems.push(e);
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.services {
            if !seen.insert(&s.name) {
                problems.push(format!("service {:?} is listed twice", s.name));
            }
            for h in &s.allowed_hosts {
                if let Err(e) = check_host(h) {
                    problems.push(format!(
                        "service {:?}: allowed_hosts entry {h:?} {e}: write a bare host name or IP such as \"myapp.test\"",
                        s.name
                    ));
                }
            }
            for o in &s.allowed_origins {
                if let Err(e) = check_origin(o) {
                    problems.push(format!(
                        "service {:?}: allowed_origins entry {o:?} {e}: write scheme, host and port only, such as \"http://localhost:3000\"",
                        s.name
                    ));
                }
            }
        }
        if let Some(rp) = &self.rp_id
            && let Err(e) = check_host(rp)
        {
            problems.push(format!(
                "rp_id {rp:?} {e}: write the gateway's WebAuthn relying party id, a bare host name such as \"gw.corp.example\""
            ));
        }
        if let Some(o) = &self.origin
            && let Err(e) = check_origin(o)
        {
            problems.push(format!(
                "origin {o:?} {e}: write scheme and host only, such as \"https://gw.corp.example\""
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("; ")))
        }
    }

    /// The authenticator selected by `authenticator`.
    pub fn authenticator_choice(&self) -> Result<AuthenticatorChoice, String> {
        match self.authenticator.as_str() {
            "hid" => Ok(AuthenticatorChoice::Hid),
            s if s.starts_with("soft:") && s.len() > 5 => {
                Ok(AuthenticatorChoice::Soft(PathBuf::from(&s[5..])))
            }
            other => Err(format!(
                "authenticator {other:?} is not known: use \"hid\" or \"soft:PATH\""
            )),
        }
    }

    /// The TLS server name of the gateway: `server_name`, else the host of the first address
    /// (every address has the same host unless `server_name` or `rp_id` is set, see
    /// [`AgentConfig::check`]).
    pub fn server_name(&self) -> String {
        self.server_name_for(self.gateway.first().unwrap_or_default())
    }

    /// The TLS server name for the gateway address `addr` (one of `gateway`): `server_name`,
    /// else the host part of `addr`. Never the resolved IP: the certificate is checked against
    /// the configured name whichever address answers.
    pub fn server_name_for(&self, addr: &str) -> String {
        if let Some(name) = &self.server_name {
            return name.clone();
        }
        match GatewayAddr::parse(addr) {
            Ok(a) => a.host().to_owned(),
            Err(_) => addr.to_owned(),
        }
    }

    /// What is wrong with `gateway`: an empty list, an address that is not `host:port`, one
    /// listed twice, or several hosts with nothing to say which names the site signed for.
    fn gateway_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.gateway.is_empty() {
            problems.push(
                "gateway is an empty list: name at least one gateway address, such as \"gw.example.com:443\""
                    .to_owned(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        let mut hosts = std::collections::BTreeSet::new();
        for addr in self.gateway.iter() {
            match GatewayAddr::parse(addr) {
                Ok(a) => {
                    hosts.insert(a.host().to_ascii_lowercase());
                }
                Err(e) => problems.push(format!("gateway {addr:?} {e}")),
            }
            if !seen.insert(addr.to_ascii_lowercase()) {
                problems.push(format!(
                    "gateway {addr:?} is listed twice: list each address once"
                ));
            }
        }
        if self.transport == Transport::Quic
            && let Some(url) = self
                .gateway
                .iter()
                .find(|a| matches!(GatewayAddr::parse(a), Ok(GatewayAddr::FrontEnd { .. })))
        {
            problems.push(format!(
                "gateway {url:?} is reached over TCP only, but transport is \"quic\": set transport = \"auto\" or \"tcp\""
            ));
        }
        let day = std::time::Duration::from_secs(24 * 3600);
        if self.quic_retry < std::time::Duration::from_secs(1) || self.quic_retry > day {
            problems.push("quic_retry must be between 1s and 24h (default 3m)".into());
        }
        if self.carrier_max_age > day {
            problems.push("carrier_max_age must be at most 24h (default 55m)".into());
        }
        if self.carrier_max_age < std::time::Duration::from_secs(30) {
            problems.push(
                "carrier_max_age must be at least 30s (default 55m, below Cloud Run's 60-minute request limit)"
                    .into(),
            );
        }
        if let Some(proxy) = &self.proxy
            && let Err(e) = crate::tunnel::carrier::ProxySetting::parse(proxy)
        {
            problems.push(format!("proxy {e}"));
        }
        if hosts.len() > 1 && self.rp_id.is_none() && self.server_name.is_none() {
            let hosts = hosts.into_iter().collect::<Vec<_>>().join(", ");
            problems.push(format!(
                "gateway lists several hosts ({hosts}), so the agent cannot tell which names the site it signs for: \
                 set rp_id to the relying party the gateways share (ask your admin), or server_name when they share one TLS name"
            ));
        }
        problems
    }

    /// The WebAuthn relying party id this agent signs for: `rp_id`, else the TLS server name.
    pub fn rp_id(&self) -> String {
        self.rp_id.clone().unwrap_or_else(|| self.server_name())
    }

    /// The WebAuthn origin this agent signs for: `origin`, else `https://{rp_id}`.
    pub fn expected_origin(&self) -> String {
        self.origin
            .clone()
            .unwrap_or_else(|| format!("https://{}", self.rp_id()))
    }

    /// The status socket path.
    pub fn control_socket(&self) -> PathBuf {
        if let Some(p) = &self.control_socket {
            return p.clone();
        }
        let dirs = directories::ProjectDirs::from("dev", "touchgate", "touchgate");
        let dir = dirs
            .as_ref()
            .and_then(|d| d.runtime_dir().map(Path::to_owned))
            .or_else(|| dirs.as_ref().map(|d| d.cache_dir().to_owned()))
            .unwrap_or_else(std::env::temp_dir);
        dir.join("agent.sock")
    }
}

/// Makes the file paths in a config table (a soft key, a CA file) absolute, taken from `base`,
/// the folder of the file they were written in.
pub fn resolve_relative_paths(table: &mut toml::Table, base: &Path) {
    if let Some(toml::Value::String(a)) = table.get_mut("authenticator")
        && let Some(p) = a.strip_prefix("soft:")
        && !p.is_empty()
        && Path::new(p).is_relative()
    {
        *a = format!("soft:{}", base.join(p).display());
    }
    if let Some(toml::Value::String(ca)) = table.get_mut("gateway_ca")
        && Path::new(ca.as_str()).is_relative()
    {
        *ca = base.join(&*ca).display().to_string();
    }
}

/// Checks a bare host name or IP address (no scheme, port or path); says what is wrong.
pub fn check_host(host: &str) -> Result<(), &'static str> {
    if host.is_empty() {
        return Err("is empty");
    }
    if host.contains("://") {
        return Err("has a scheme");
    }
    if host.contains(['/', '?', '#']) {
        return Err("has a path");
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    if host.contains(':') {
        return Err("has a port");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if host.len() > 253 || !host.trim_end_matches('.').split('.').all(label_ok) {
        return Err("is not a host name");
    }
    Ok(())
}

/// Checks a web origin, `http(s)://host[:port]` with no path; says what is wrong.
pub fn check_origin(origin: &str) -> Result<(), &'static str> {
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return Err("does not start with http:// or https://");
    };
    if rest.contains(['/', '?', '#']) {
        return Err("has a path");
    }
    let (host, port) = match rest.rsplit_once(':') {
        // A bracketed IPv6 address without a port has its colons inside the brackets.
        Some((h, p)) if !p.ends_with(']') => (h, Some(p)),
        _ => (rest, None),
    };
    if let Some(p) = port
        && p.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err("has a bad port");
    }
    if host.contains(':') && !host.starts_with('[') {
        return Err("has an IPv6 address without brackets");
    }
    check_host(host)
}

/// Lowercase hex without separators.
pub fn normalise_fingerprint(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, ':' | ' ' | '-'))
        .collect::<String>()
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_without_pin_or_ca_is_refused() {
        let cfg: AgentConfig = toml::from_str(
            "gateway = \"gw.example.com:4433\"\nuser = \"alice\"\nauthenticator = \"floppy\"\n",
        )
        .expect("toml");
        let msg = cfg.check().expect_err("invalid").to_string();
        assert!(msg.contains("gateway_cert_sha256"), "{msg}");
        assert!(msg.contains("\"floppy\" is not known"), "{msg}");
        assert_eq!(cfg.server_name(), "gw.example.com");
    }

    fn gateway(value: &str, extra: &str) -> Result<AgentConfig, String> {
        let cfg: AgentConfig = toml::from_str(&format!(
            "gateway = {value}\nuser = \"alice\"\ngateway_cert_sha256 = \"{}\"\n{extra}",
            "ab".repeat(32)
        ))
        .map_err(|e| e.to_string())?;
        cfg.check().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    #[test]
    fn the_gateway_is_one_address_or_a_list_of_them() {
        let one = gateway("\"gw.corp.example:443\"", "").expect("one");
        assert_eq!(one.gateway, GatewayAddrs::from("gw.corp.example:443"));
        assert_eq!(one.gateway.to_string(), "gw.corp.example:443");
        let list = gateway(
            "[\"gw-a.corp.example:443\", \"[2001:db8::7]:443\"]",
            "rp_id = \"corp.example\"",
        )
        .expect("list");
        assert_eq!(
            list.gateway.iter().collect::<Vec<_>>(),
            ["gw-a.corp.example:443", "[2001:db8::7]:443"]
        );
        assert_eq!(
            list.gateway.to_string(),
            "gw-a.corp.example:443, [2001:db8::7]:443"
        );
        // Each address is checked under its own configured host, never an IP it resolves to.
        assert_eq!(
            list.server_name_for("gw-a.corp.example:443"),
            "gw-a.corp.example"
        );
        assert_eq!(list.server_name_for("[2001:db8::7]:443"), "2001:db8::7");
        assert_eq!(list.server_name(), "gw-a.corp.example");
        let named = gateway(
            "[\"10.0.0.1:443\", \"10.0.0.2:443\"]",
            "server_name = \"gw.corp.example\"",
        )
        .expect("list");
        assert_eq!(named.server_name_for("10.0.0.2:443"), "gw.corp.example");
        assert_eq!(named.rp_id(), "gw.corp.example");
        // A list of one is the same as the address alone.
        let single = gateway("[\"gw.corp.example:443\"]", "").expect("list of one");
        assert_eq!(single.gateway, one.gateway);
    }

    /// Checks that `gateway = value` (with `extra` lines) is refused, saying each of `want`.
    fn refused(value: &str, extra: &str, want: &[&str]) {
        let e = gateway(value, extra).expect_err("refused");
        for w in want {
            assert!(e.contains(w), "{w:?} not in {e}");
        }
    }

    #[test]
    fn an_empty_gateway_list_is_refused_saying_what_to_write() {
        refused(
            "[]",
            "",
            &["gateway is an empty list: name at least one gateway address"],
        );
    }

    #[test]
    fn a_gateway_listed_twice_is_refused() {
        refused(
            "[\"gw.corp.example:443\", \"GW.corp.example:443\"]",
            "",
            &["gateway \"GW.corp.example:443\" is listed twice"],
        );
        // Two names that reach one address are not refused: they are one candidate.
        gateway("[\"gw.corp.example:443\", \"gw.corp.example:4433\"]", "").expect("two ports");
    }

    #[test]
    fn a_gateway_that_is_neither_an_address_nor_a_list_says_what_it_takes() {
        refused(
            "4433",
            "",
            &["a gateway address \"host:port\", or a list of them"],
        );
        refused(
            "[\"gw.corp.example\", \"2001:db8::7:443\", \"[gw]:443\"]",
            "rp_id = \"corp.example\"",
            &[
                "gateway \"gw.corp.example\" must be host:port",
                "gateway \"2001:db8::7:443\" has an IPv6 address without brackets",
                "gateway \"[gw]:443\" has brackets around something that is not an IPv6 address",
            ],
        );
    }

    #[test]
    fn gateways_on_several_hosts_need_to_be_told_the_site_they_share() {
        refused(
            "[\"gw-a.corp.example:443\", \"gw-b.corp.example:443\"]",
            "",
            &[
                "gateway lists several hosts (gw-a.corp.example, gw-b.corp.example)",
                "set rp_id",
            ],
        );
        let cfg = gateway(
            "[\"gw-a.corp.example:443\", \"gw-b.corp.example:443\"]",
            "rp_id = \"corp.example\"",
        )
        .expect("rp_id says");
        assert_eq!(cfg.expected_origin(), "https://corp.example");
    }

    #[test]
    fn relative_soft_key_path_is_next_to_the_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            format!(
                "gateway = \"127.0.0.1:4433\"\nuser = \"a\"\nauthenticator = \"soft:key.tgk\"\ngateway_cert_sha256 = \"{}\"\n[[service]]\nname = \"api\"\nlocal_port = 8081\n",
                "ab".repeat(32)
            ),
        )
        .expect("write");
        let cfg = AgentConfig::load(&path).expect("load");
        assert_eq!(
            cfg.authenticator_choice().expect("soft"),
            AuthenticatorChoice::Soft(dir.path().join("key.tgk"))
        );
        assert_eq!(cfg.services[0].local_port, 8081);
    }

    fn with(extra: &str) -> AgentConfig {
        toml::from_str(&format!(
            "gateway = \"gw.corp.example:4433\"\nuser = \"alice\"\ngateway_cert_sha256 = \"{}\"\n{extra}",
            "ab".repeat(32)
        ))
        .expect("toml")
    }

    #[test]
    fn a_front_end_gateway_is_a_wss_url_and_goes_over_tcp() {
        let cfg = gateway("\"wss://gw-xyz.a.run.app/touchgate/carrier\"", "").expect("valid");
        assert_eq!(cfg.server_name(), "gw-xyz.a.run.app");
        assert_eq!(cfg.rp_id(), "gw-xyz.a.run.app");
        assert_eq!(cfg.transport, Transport::Auto);
        assert_eq!(
            GatewayAddr::parse("wss://[2001:db8::1]:8443/c").expect("url"),
            GatewayAddr::FrontEnd {
                url: "wss://[2001:db8::1]:8443/c",
                host: "2001:db8::1".into(),
                port: 8443
            }
        );
        for (bad, words) in [
            ("\"https://gw.corp.example/\"", "is a https:// URL"),
            ("\"ws://gw.corp.example/c\"", "is a ws:// URL"),
            ("\"wss://u:p@gw.corp.example/c\"", "has credentials"),
            ("\"wss://gw.corp.example/c?x=1\"", "has a query"),
        ] {
            let e = gateway(bad, "").expect_err(bad);
            assert!(e.contains(words), "{bad}: {e}");
        }
        let e = gateway(
            "\"wss://gw.corp.example/touchgate/carrier\"",
            "transport = \"quic\"\n",
        )
        .expect_err("quic only");
        assert!(e.contains("reached over TCP only"), "{e}");
        let e =
            gateway("\"gw.corp.example:443\"", "proxy = \"socks5://p:1080\"\n").expect_err("socks");
        assert!(e.contains("proxy is a socks5:// URL"), "{e}");
        let e = gateway(
            "\"gw.corp.example:443\"",
            "quic_retry = \"0s\"\ncarrier_max_age = \"5s\"\n",
        )
        .expect_err("too short");
        assert!(e.contains("quic_retry must be between 1s and 24h"), "{e}");
        assert!(e.contains("carrier_max_age must be at least 30s"), "{e}");
        let e = gateway("\"gw.corp.example:443\"", "transport = \"udp\"\n")
            .expect_err("unknown transport");
        assert!(e.contains("unknown variant `udp`"), "{e}");
    }

    #[test]
    fn the_carrier_settings_have_defaults() {
        let cfg = with("");
        assert_eq!(cfg.proxy, None);
        assert_eq!(cfg.quic_retry, std::time::Duration::from_secs(180));
        assert_eq!(cfg.carrier_max_age, std::time::Duration::from_secs(55 * 60));
        let cfg = with(
            "transport = \"tcp\"\nquic_retry = \"30s\"\ncarrier_max_age = \"50m\"\nproxy = \"http://proxy.corp.example:3128\"\n",
        );
        cfg.check().expect("valid");
        assert_eq!(cfg.transport, Transport::Tcp);
        assert_eq!(cfg.quic_retry, std::time::Duration::from_secs(30));
    }

    #[test]
    fn browser_access_settings_take_bare_hosts_and_plain_origins() {
        let cfg = with(
            "[[service]]\nname = \"api\"\nlocal_port = 8081\nallowed_hosts = [\"myapp.test\", \"10.0.0.1\", \"::1\", \"[::1]\"]\n\
             allowed_origins = [\"http://localhost:3000\", \"https://app.corp.example\", \"http://[::1]:5173\"]\n",
        );
        cfg.check().expect("valid");
        let access = cfg.services[0].access(40000);
        assert_eq!(access.port, 40000);
        assert_eq!(access.allowed_hosts.len(), 4);
        assert_eq!(access.allowed_origins[0], "http://localhost:3000");
        // Both default to empty.
        let plain = with("[[service]]\nname = \"api\"\nlocal_port = 8081\n");
        assert_eq!(
            plain.services[0].access(1),
            touchgate_proto::LocalAccess {
                port: 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_bad_browser_access_value_is_a_clear_config_error() {
        let cfg = with(
            "[[service]]\nname = \"api\"\nlocal_port = 8081\n\
             allowed_hosts = [\"http://myapp.test\", \"myapp.test:8081\", \"myapp.test/x\", \"\"]\n\
             allowed_origins = [\"localhost:3000\", \"http://localhost:3000/\", \"http://localhost:0\", \"https://a b\"]\n",
        );
        let msg = cfg.check().expect_err("invalid").to_string();
        for want in [
            "allowed_hosts entry \"http://myapp.test\" has a scheme",
            "allowed_hosts entry \"myapp.test:8081\" has a port",
            "allowed_hosts entry \"myapp.test/x\" has a path",
            "allowed_hosts entry \"\" is empty",
            "allowed_origins entry \"localhost:3000\" does not start with http:// or https://",
            "allowed_origins entry \"http://localhost:3000/\" has a path",
            "allowed_origins entry \"http://localhost:0\" has a bad port",
            "allowed_origins entry \"https://a b\" is not a host name",
            "such as \"http://localhost:3000\"",
        ] {
            assert!(msg.contains(want), "{want:?} not in {msg}");
        }
    }

    #[test]
    fn the_agent_signs_for_the_gateways_tls_name_unless_told_otherwise() {
        let cfg = with("");
        assert_eq!(cfg.rp_id(), "gw.corp.example");
        assert_eq!(cfg.expected_origin(), "https://gw.corp.example");
        assert!(!cfg.allow_other_users);
        let cfg = with("server_name = \"localhost\"\n");
        assert_eq!(cfg.rp_id(), "localhost");
        let cfg = with(
            "rp_id = \"corp.example\"\norigin = \"https://login.corp.example\"\nallow_other_users = true\n",
        );
        cfg.check().expect("valid");
        assert_eq!(cfg.rp_id(), "corp.example");
        assert_eq!(cfg.expected_origin(), "https://login.corp.example");
        assert!(cfg.allow_other_users);
        let msg = with("rp_id = \"https://corp.example\"\n")
            .check()
            .expect_err("a URL is no rp id")
            .to_string();
        assert!(
            msg.contains("rp_id \"https://corp.example\" has a scheme"),
            "{msg}"
        );
    }
}

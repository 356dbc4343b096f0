//! `[scim]`: where the SCIM provisioning endpoint listens, its token, and what is wrong with them.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

/// `[scim]`: the SCIM 2.0 endpoint (RFC 7643/7644) provisioning clients such as Okta and
/// Entra ID push users and groups to, on a listener of its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScimConfig {
    /// TCP address of the SCIM endpoint (not the admin port).
    pub listen: SocketAddr,
    /// A file holding the bearer token the provisioning client sends: at least
    /// [`crate::scim::MIN_TOKEN_LEN`] characters, readable by the gateway only.
    pub token_file: PathBuf,
    /// Serve plain HTTP instead of HTTPS with the `[tls]` certificate. Accepted only on a
    /// loopback `listen` (behind a TLS-terminating proxy on the same host, or in tests): the
    /// bearer token and the directory's changes must not cross a network in clear.
    #[serde(default)]
    pub insecure_plain_http: bool,
    /// Largest request body, in bytes (a group's whole member list comes in one `PUT`).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
}

fn default_max_body() -> usize {
    1024 * 1024
}

impl ScimConfig {
    /// `https`, or `http` with `insecure_plain_http`.
    pub fn scheme(&self) -> &'static str {
        if self.insecure_plain_http {
            "http"
        } else {
            "https"
        }
    }

    /// What is wrong with `[scim]` besides its token file, each in words.
    pub(super) fn problems(&self, admin_listen: SocketAddr) -> Vec<String> {
        let mut problems = Vec::new();
        if self.insecure_plain_http && !self.listen.ip().is_loopback() {
            problems.push(format!(
                "scim.insecure_plain_http is accepted only on a loopback listen address, not {}: \
                 the bearer token and every change would cross the network in clear; \
                 remove it to serve HTTPS with the [tls] certificate",
                self.listen
            ));
        }
        let same_ip = self.listen.ip() == admin_listen.ip()
            || self.listen.ip().is_unspecified()
            || admin_listen.ip().is_unspecified();
        if self.listen.port() != 0 && self.listen.port() == admin_listen.port() && same_ip {
            problems.push(format!(
                "scim.listen {} is the admin port: give SCIM a port of its own",
                self.listen
            ));
        }
        if self.max_body_bytes < 4096 {
            problems.push("scim.max_body_bytes must be at least 4096".into());
        }
        problems
    }
}

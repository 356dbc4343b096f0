//! touchgate agent core: authenticators, the hardware-bound session, the QUIC tunnel and the
//! local listeners. The CLI and the tray app are two front ends of this crate.

pub mod agent;
pub mod authenticator;
pub mod config;
pub mod controller;
pub mod delegation;
pub mod idp;
pub mod peer;
pub mod settings;
pub mod status;
pub mod tunnel;

pub use agent::{AgentState, RunningAgent, SharedAuthn};
pub use config::AgentConfig;

use std::sync::{Arc, Mutex};

/// Seconds since the Unix epoch now (0 if the clock is before it): the one wall-clock reading
/// of the agent and its front ends; session expiry is said in these.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Opens the configured authenticator and wraps it for sharing between tasks.
pub fn shared_authenticator(
    cfg: &AgentConfig,
    create_soft: bool,
    prompter: Arc<dyn authenticator::hid::Prompter>,
) -> Result<SharedAuthn, authenticator::AuthnError> {
    let choice = cfg
        .authenticator_choice()
        .map_err(authenticator::AuthnError::Device)?;
    let hid = authenticator::HidOptions {
        device: cfg.device.clone(),
        touch_timeout: cfg.touch_timeout,
        prompter,
    };
    Ok(Arc::new(Mutex::new(authenticator::open(
        &choice,
        create_soft,
        hid,
    )?)))
}

/// A connection for one request (an enrolment), over QUIC or the TCP carrier as the config
/// says, closed cleanly afterwards.
pub(crate) struct OneOff {
    pub(crate) tunnel: tunnel::Tunnel,
}

impl OneOff {
    pub(crate) async fn open(cfg: &AgentConfig) -> Result<Self, tunnel::TunnelError> {
        let key = tunnel::SessionKey::generate()?;
        let dialer = tunnel::Dialer::new(cfg, &key)?;
        let tunnel = tunnel::Tunnel::dial(&dialer, cfg, tunnel::Order::random()).await?;
        Ok(Self { tunnel })
    }

    pub(crate) async fn close(self) {
        self.tunnel.close(b"done").await;
    }
}

/// Enrols the configured authenticator with an invite code, on a fresh connection.
pub async fn enroll(
    cfg: &AgentConfig,
    authn: &SharedAuthn,
    code: &str,
) -> Result<String, tunnel::TunnelError> {
    let c = OneOff::open(cfg).await?;
    let done = c
        .tunnel
        .enroll(authn, &cfg.user, code, cfg.origin.as_deref())
        .await;
    c.close().await;
    done
}

/// Enrols the configured authenticator through the organisation's identity provider (the
/// gateway's `[oidc]`): `browser` opens the sign-in page. Returns the credential id and the
/// user the provider named.
pub async fn enroll_with_idp(
    cfg: &AgentConfig,
    authn: &SharedAuthn,
    browser: &(dyn Fn(&str) -> Result<(), String> + Send + Sync),
) -> Result<(String, String), tunnel::TunnelError> {
    let c = OneOff::open(cfg).await?;
    let done = c
        .tunnel
        .enroll_with_idp(authn, cfg.origin.as_deref(), browser)
        .await;
    c.close().await;
    done
}

/// Asks the gateway whether it enrols through the organisation's identity provider: its name,
/// or `None` when it has none.
pub async fn identity_provider(cfg: &AgentConfig) -> Result<Option<String>, tunnel::TunnelError> {
    let c = OneOff::open(cfg).await?;
    let found = c
        .tunnel
        .request(&touchgate_proto::ClientMsg::IdpBegin)
        .await;
    c.close().await;
    match found {
        Ok(touchgate_proto::ServerMsg::IdpStart { name, .. }) => Ok(Some(name)),
        Ok(other) => Err(tunnel::TunnelError::Protocol(format!(
            "expected where to sign in, got {other:?}"
        ))),
        Err(tunnel::TunnelError::Refused(r))
            if r.code == touchgate_proto::RefusalCode::NoIdentityProvider =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Enrols through the identity provider's device flow, for a machine without a browser:
/// `show` tells the user where to sign in and the code to enter. Returns the credential id
/// and the user the provider named.
pub async fn enroll_with_device(
    cfg: &AgentConfig,
    authn: &SharedAuthn,
    show: &(dyn Fn(&tunnel::DeviceCode) + Send + Sync),
) -> Result<(String, String), tunnel::TunnelError> {
    let c = OneOff::open(cfg).await?;
    let done = c
        .tunnel
        .enroll_with_device(authn, cfg.origin.as_deref(), show)
        .await;
    c.close().await;
    done
}

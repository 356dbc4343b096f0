//! Authenticators behind one trait: a USB security key (`hid`) and a software key (`soft`).
//!
//! The agent builds `clientDataJSON` itself (see [`client_data_json`]) and hands the exact bytes
//! to the authenticator, which signs `authData ‖ SHA-256(clientDataJSON)` as WebAuthn defines.
//! Calls block (a hardware key waits for a touch); the agent runs them on a blocking thread.

pub mod hid;
pub mod soft;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use touchgate_proto::CLIENT_DATA_BINDING_KEY;
use webauthn_rs_proto::{
    PublicKeyCredential, PublicKeyCredentialCreationOptions, PublicKeyCredentialRequestOptions,
    RegisterPublicKeyCredential,
};

use crate::config::AuthenticatorChoice;

/// Errors from an authenticator, each worded for the user.
#[derive(Debug, thiserror::Error)]
pub enum AuthnError {
    /// No security key is plugged in.
    #[error("no security key found: plug one in and try again")]
    NoDevice,
    /// More than one key is plugged in.
    #[error("several security keys are plugged in: leave only one and try again")]
    SeveralDevices,
    /// The key refused or failed the operation.
    #[error("the security key refused the operation: {0}")]
    Device(String),
    /// The software key file could not be read or written.
    #[error("software key {path}: {reason}")]
    SoftKeyFile {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The software key does not exist yet (enrol first).
    #[error("software key {0} does not exist yet: run `touchgate enroll` first")]
    SoftKeyMissing(String),
    /// The key produced a response that could not be encoded.
    #[error("cannot encode the key's response: {0}")]
    Encoding(String),
}

/// One authenticator. Implementations block; call them from a blocking thread.
pub trait Authenticator: Send {
    /// A short description for prompts ("software key /path", "YubiKey 5 NFC").
    fn describe(&self) -> String;

    /// For software keys, the attestation CA (PEM) to declare when enrolling.
    fn software_ca_pem(&self) -> Option<String> {
        None
    }

    /// Makes a credential; `client_data_json` is the exact bytes the key must hash.
    fn register(
        &mut self,
        options: &PublicKeyCredentialCreationOptions,
        client_data_json: &[u8],
    ) -> Result<RegisterPublicKeyCredential, AuthnError>;

    /// Makes an assertion; `client_data_json` is the exact bytes the key must hash.
    fn authenticate(
        &mut self,
        options: &PublicKeyCredentialRequestOptions,
        client_data_json: &[u8],
    ) -> Result<PublicKeyCredential, AuthnError>;
}

/// Opens the configured authenticator. A software key is created on first use when
/// `create_soft` is set (enrolment), and must exist otherwise.
pub fn open(
    choice: &AuthenticatorChoice,
    create_soft: bool,
) -> Result<Box<dyn Authenticator>, AuthnError> {
    match choice {
        AuthenticatorChoice::Hid => Ok(Box::new(hid::HidKey::open()?)),
        AuthenticatorChoice::Soft(path) => {
            if create_soft {
                Ok(Box::new(soft::SoftKey::open_or_create(path)?))
            } else {
                Ok(Box::new(soft::SoftKey::open(path)?))
            }
        }
    }
}

/// The WebAuthn ceremony a `clientDataJSON` is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ceremony {
    /// Registration (`webauthn.create`).
    Create,
    /// Authentication (`webauthn.get`).
    Get,
}

/// Builds `clientDataJSON` with the challenge, the origin, and this connection's channel binding
/// (a TLS exporter of the QUIC connection) under [`CLIENT_DATA_BINDING_KEY`].
pub fn client_data_json(
    ceremony: Ceremony,
    challenge: &[u8],
    origin: &str,
    binding: &[u8],
) -> Vec<u8> {
    let ty = match ceremony {
        Ceremony::Create => "webauthn.create",
        Ceremony::Get => "webauthn.get",
    };
    serde_json::json!({
        "type": ty,
        "challenge": URL_SAFE_NO_PAD.encode(challenge),
        "origin": origin,
        "crossOrigin": false,
        CLIENT_DATA_BINDING_KEY: URL_SAFE_NO_PAD.encode(binding),
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_data_carries_challenge_origin_and_binding() {
        let cdj = client_data_json(Ceremony::Get, b"chal", "https://gw.test", &[1, 2, 3]);
        let v: serde_json::Value = serde_json::from_slice(&cdj).expect("json");
        assert_eq!(v["type"], "webauthn.get");
        assert_eq!(v["challenge"], URL_SAFE_NO_PAD.encode(b"chal"));
        assert_eq!(v["origin"], "https://gw.test");
        assert_eq!(v["crossOrigin"], false);
        assert_eq!(
            v[CLIENT_DATA_BINDING_KEY],
            URL_SAFE_NO_PAD.encode([1, 2, 3])
        );
    }
}

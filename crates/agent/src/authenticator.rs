//! Authenticators behind one trait: a USB security key (`hid`) and a software key (`soft`).
//!
//! The agent builds `clientDataJSON` itself (see [`client_data_json`]) and hands the exact bytes
//! to the authenticator, which signs `authData ‖ SHA-256(clientDataJSON)` as WebAuthn defines.
//! Calls block (a hardware key waits for a touch); the agent runs them on a blocking thread.

pub mod device;
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
    /// Wrong PIN.
    #[error("wrong PIN{}", match retries { Some(n) => format!(": {n} tries left before the key blocks its PIN"), None => String::new() })]
    PinWrong {
        /// Tries left, when the key says.
        retries: Option<i32>,
    },
    /// The PIN is blocked.
    #[error(
        "the key's PIN is blocked after too many wrong tries: reset the key with its vendor's tool (this erases its credentials) and enrol it again"
    )]
    PinBlocked,
    /// Three wrong PINs in a row.
    #[error("three wrong PINs in a row: unplug the key, plug it back in, and try again")]
    PinAuthBlocked,
    /// User verification is required but the key has no PIN.
    #[error(
        "the gateway requires user verification and this key has no PIN: set one with the key vendor's tool (for a YubiKey: ykman fido access change-pin) and try again"
    )]
    PinNotSet,
    /// User verification is required but the key cannot do it.
    #[error(
        "the gateway requires user verification (PIN or fingerprint), which this key does not support"
    )]
    UvUnsupported,
    /// Nobody touched the key in time.
    #[error("no touch within {0}s: try again, and touch the key when it blinks")]
    Timeout(u64),
    /// The user cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The key was unplugged during the operation.
    #[error("the security key was removed during the operation: plug it back in and try again")]
    Removed,
    /// The USB layer refused access.
    #[error(transparent)]
    List(#[from] device::ListError),
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

    /// Whether the key that signed last is still plugged in (`None`: not a removable key).
    fn present(&self) -> Option<bool> {
        None
    }
}

/// Settings of the hardware-key authenticator.
#[derive(Clone)]
pub struct HidOptions {
    /// Config `device`: pick a key by a part of its path or product name.
    pub device: Option<String>,
    /// How long to wait for a touch.
    pub touch_timeout: std::time::Duration,
    /// Who asks the user for a touch or a PIN.
    pub prompter: std::sync::Arc<dyn hid::Prompter>,
}

/// Opens the configured authenticator. A software key is created on first use when
/// `create_soft` is set (enrolment), and must exist otherwise.
pub fn open(
    choice: &AuthenticatorChoice,
    create_soft: bool,
    hid_options: HidOptions,
) -> Result<Box<dyn Authenticator>, AuthnError> {
    match choice {
        AuthenticatorChoice::Hid => {
            let devices = device::list_hid_devices()?
                .into_iter()
                .map(|d| d as std::sync::Arc<dyn device::FidoDevice>)
                .collect();
            Ok(Box::new(hid::HidAuthenticator::new(
                devices,
                hid_options.device,
                hid_options.prompter,
                hid_options.touch_timeout,
            )?))
        }
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

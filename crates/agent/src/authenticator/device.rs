//! FIDO2 devices behind a trait, so the HID authenticator's decisions (PIN or built-in UV,
//! retries, timeouts, cancel, key selection) are tested with fake devices. The real device is
//! ctap-hid-fido2 over USB HID.

use std::sync::Arc;

use ctap_hid_fido2::{
    FidoKeyHid, HidParam, LibCfg,
    fidokey::{GetAssertionArgsBuilder, MakeCredentialArgsBuilder},
};

/// What a key says about itself (`authenticatorGetInfo`), plus its retry counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Product name from USB.
    pub product: String,
    /// Where it is (hidraw path).
    pub path: String,
    /// AAGUID, as a UUID string.
    pub aaguid: String,
    /// `clientPin`: `Some(true)` a PIN is set, `Some(false)` supported but not set, `None` no PIN support.
    pub client_pin: Option<bool>,
    /// `uv`: built-in user verification (fingerprint) is configured.
    pub builtin_uv: bool,
    /// `alwaysUv`: the key verifies the user on every operation.
    pub always_uv: bool,
    /// PIN/UV auth protocol 2 supported.
    pub pin_protocol_2: bool,
    /// PIN retries left, if a PIN is set.
    pub pin_retries: Option<i32>,
}

/// How the user is verified for one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UvMethod {
    /// Touch only.
    None,
    /// The key's own biometrics.
    BuiltIn,
    /// A PIN entered by the user.
    Pin,
}

/// One `authenticatorMakeCredential`.
pub struct MakeCredential<'a> {
    /// Relying party id.
    pub rp_id: &'a str,
    /// The exact `clientDataJSON`; the library hashes it.
    pub client_data_json: &'a [u8],
    /// Credentials that must not be made again.
    pub exclude: &'a [Vec<u8>],
    /// User verification.
    pub uv: UvMethod,
    /// The PIN, when `uv` is `Pin`.
    pub pin: Option<&'a str>,
}

/// One `authenticatorGetAssertion`.
pub struct GetAssertion<'a> {
    /// Relying party id.
    pub rp_id: &'a str,
    /// The exact `clientDataJSON`; the library hashes it.
    pub client_data_json: &'a [u8],
    /// Allowed credentials.
    pub allow: &'a [Vec<u8>],
    /// User verification.
    pub uv: UvMethod,
    /// The PIN, when `uv` is `Pin`.
    pub pin: Option<&'a str>,
    /// Ask for user presence (false for a silent probe).
    pub up: bool,
}

/// The parts of an attestation the library returns (it keeps no raw attestation object).
#[derive(Debug, Clone)]
pub struct Attested {
    /// Attestation format (`packed`, `none`, …).
    pub fmt: String,
    /// Raw authenticator data.
    pub auth_data: Vec<u8>,
    /// `attStmt.alg`.
    pub alg: i32,
    /// `attStmt.sig`.
    pub sig: Vec<u8>,
    /// `attStmt.x5c`.
    pub x5c: Vec<Vec<u8>>,
    /// The new credential's id.
    pub credential_id: Vec<u8>,
}

/// The parts of an assertion.
#[derive(Debug, Clone)]
pub struct Asserted {
    /// Raw authenticator data.
    pub auth_data: Vec<u8>,
    /// The signature.
    pub signature: Vec<u8>,
    /// The credential used (may be empty with a one-entry allow list).
    pub credential_id: Vec<u8>,
}

/// What went wrong on the device, as CTAP2 status codes say it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Wrong PIN (`CTAP2_ERR_PIN_INVALID`).
    #[error("wrong PIN")]
    PinInvalid,
    /// PIN blocked after too many wrong tries (`CTAP2_ERR_PIN_BLOCKED`).
    #[error("PIN blocked")]
    PinBlocked,
    /// Three wrong PINs in a row: unplug and replug (`CTAP2_ERR_PIN_AUTH_BLOCKED`).
    #[error("PIN temporarily blocked")]
    PinAuthBlocked,
    /// The operation needs a PIN (`CTAP2_ERR_PIN_REQUIRED`).
    #[error("PIN required")]
    PinRequired,
    /// No PIN is set (`CTAP2_ERR_PIN_NOT_SET`).
    #[error("no PIN set")]
    PinNotSet,
    /// Built-in UV blocked (`CTAP2_ERR_UV_BLOCKED`).
    #[error("user verification blocked")]
    UvBlocked,
    /// The user refused, or the wait for a touch was cancelled (`CTAP2_ERR_KEEPALIVE_CANCEL`,
    /// `CTAP2_ERR_OPERATION_DENIED`).
    #[error("cancelled")]
    Cancelled,
    /// No touch in time (`CTAP2_ERR_USER_ACTION_TIMEOUT`).
    #[error("timed out waiting for a touch")]
    Timeout,
    /// The key holds no credential for this request (`CTAP2_ERR_NO_CREDENTIALS`).
    #[error("no credentials for this gateway on the key")]
    NoCredentials,
    /// The credential already exists (`CTAP2_ERR_CREDENTIAL_EXCLUDED`).
    #[error("this key is already enrolled")]
    Excluded,
    /// The key went away.
    #[error("the key was removed")]
    Removed,
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl DeviceError {
    /// Classifies an error of ctap-hid-fido2, which reports CTAP2 status codes as text
    /// beginning `0xNN`.
    pub fn from_library(e: &anyhow::Error) -> Self {
        let text = format!("{e:#}");
        let code = text
            .find("0x")
            .and_then(|i| text.get(i + 2..i + 4))
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match code {
            Some(0x31) => Self::PinInvalid,
            Some(0x32) => Self::PinBlocked,
            Some(0x34) => Self::PinAuthBlocked,
            Some(0x35) => Self::PinNotSet,
            Some(0x36) => Self::PinRequired,
            Some(0x3C) => Self::UvBlocked,
            Some(0x2D) | Some(0x27) => Self::Cancelled,
            Some(0x2F) => Self::Timeout,
            Some(0x2E) => Self::NoCredentials,
            Some(0x19) => Self::Excluded,
            _ if text.contains("No such device") || text.contains("device disconnected") => {
                Self::Removed
            }
            _ => Self::Other(text),
        }
    }
}

/// A FIDO2 key. Calls block while the key waits for a touch; `cancel` may be called from
/// another thread and makes a waiting call return [`DeviceError::Cancelled`].
pub trait FidoDevice: Send + Sync {
    /// `authenticatorGetInfo` and the PIN retry counter.
    fn info(&self) -> Result<KeyInfo, DeviceError>;
    /// `authenticatorMakeCredential`.
    fn make_credential(&self, req: &MakeCredential<'_>) -> Result<Attested, DeviceError>;
    /// `authenticatorGetAssertion`.
    fn get_assertion(&self, req: &GetAssertion<'_>) -> Result<Asserted, DeviceError>;
    /// Sends CTAPHID_CANCEL.
    fn cancel(&self);
    /// Whether the key is still plugged in.
    fn present(&self) -> bool;
}

/// A USB security key through ctap-hid-fido2.
pub struct HidDevice {
    key: FidoKeyHid,
    param: HidParam,
    product: String,
}

/// Why keys could not be listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    /// hidraw devices exist but this user may not open them.
    #[error(
        "permission denied on {0}: this user may not use USB security keys. Install the udev rule \
         from packaging/udev/70-touchgate-security-keys.rules (see its header), then unplug and \
         replug the key"
    )]
    PermissionDenied(String),
    /// The HID layer failed.
    #[error("cannot open USB security keys: {0}")]
    Hid(String),
}

/// The plugged-in FIDO keys.
pub fn list_hid_devices() -> Result<Vec<Arc<HidDevice>>, ListError> {
    // hidapi can panic when it cannot initialise; keep that from taking the agent down.
    let found = std::panic::catch_unwind(ctap_hid_fido2::get_fidokey_devices)
        .map_err(|_| ListError::Hid("the HID library could not start".into()))?;
    if found.is_empty() {
        denied_hidraw()?;
    }
    let mut cfg = LibCfg::init();
    // The library prints its own "touch the sensor" line to stdout; the agent prompts itself.
    cfg.enable_keep_alive_msg = false;
    cfg.keep_alive_msg = String::new();
    let mut out = Vec::new();
    for d in found {
        match FidoKeyHid::new(std::slice::from_ref(&d.param), &cfg) {
            Ok(mut key) => {
                // PIN/UV auth protocol 2 where the key offers it (the library defaults to 1).
                if key
                    .get_info()
                    .is_ok_and(|i| i.pin_uv_auth_protocols.contains(&2))
                {
                    let _ = key.set_pin_uv_auth_protocol_two();
                }
                let product = if d.product_string.is_empty() {
                    "security key".into()
                } else {
                    d.product_string.clone()
                };
                out.push(Arc::new(HidDevice {
                    key,
                    param: d.param.clone(),
                    product,
                }));
            }
            Err(e) => tracing::warn!(device = %d.info, error = %e, "cannot open a FIDO key"),
        }
    }
    Ok(out)
}

/// When no key is visible, tells apart "none plugged in" from "not allowed to open them".
fn denied_hidraw() -> Result<(), ListError> {
    #[cfg(target_os = "linux")]
    if let Ok(dir) = std::fs::read_dir("/dev") {
        for e in dir.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with("hidraw")
                && let Err(err) = std::fs::File::open(e.path())
                && err.kind() == std::io::ErrorKind::PermissionDenied
            {
                return Err(ListError::PermissionDenied(e.path().display().to_string()));
            }
        }
    }
    Ok(())
}

fn hid_path(p: &HidParam) -> String {
    match p {
        HidParam::Path(s) => s.clone(),
        HidParam::VidPid { vid, pid } => format!("{vid:04x}:{pid:04x}"),
    }
}

fn map(e: anyhow::Error) -> DeviceError {
    DeviceError::from_library(&e)
}

impl FidoDevice for HidDevice {
    fn info(&self) -> Result<KeyInfo, DeviceError> {
        let info = self.key.get_info().map_err(map)?;
        let opt = |name: &str| {
            info.options
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| *v)
        };
        let client_pin = opt("clientPin");
        let pin_retries = if client_pin == Some(true) {
            self.key.get_pin_retries().ok()
        } else {
            None
        };
        Ok(KeyInfo {
            product: self.product.clone(),
            path: hid_path(&self.param),
            aaguid: format_aaguid(&info.aaguid),
            client_pin,
            builtin_uv: opt("uv") == Some(true),
            always_uv: opt("alwaysUv") == Some(true),
            pin_protocol_2: info.pin_uv_auth_protocols.contains(&2),
            pin_retries,
        })
    }

    fn make_credential(&self, req: &MakeCredential<'_>) -> Result<Attested, DeviceError> {
        let mut b = MakeCredentialArgsBuilder::new(req.rp_id, req.client_data_json);
        b = match (req.uv, req.pin) {
            (UvMethod::Pin, Some(pin)) => b.pin(pin),
            (UvMethod::BuiltIn, _) => b,
            _ => b.without_pin_and_uv(),
        };
        for id in req.exclude {
            b = b.exclude_authenticator(id);
        }
        let a = self
            .key
            .make_credential_with_args(&b.build())
            .map_err(map)?;
        Ok(Attested {
            fmt: a.fmt,
            auth_data: a.auth_data,
            alg: a.attstmt_alg,
            sig: a.attstmt_sig,
            x5c: a.attstmt_x5c,
            credential_id: a.credential_descriptor.id,
        })
    }

    fn get_assertion(&self, req: &GetAssertion<'_>) -> Result<Asserted, DeviceError> {
        let mut b = GetAssertionArgsBuilder::new(req.rp_id, req.client_data_json);
        b = match (req.uv, req.pin) {
            (UvMethod::Pin, Some(pin)) => b.pin(pin),
            (UvMethod::BuiltIn, _) => b,
            _ => b.without_pin_and_uv(),
        };
        if !req.up {
            b = b.without_up();
        }
        for id in req.allow {
            b = b.add_credential_id(id);
        }
        let mut all = self.key.get_assertion_with_args(&b.build()).map_err(map)?;
        if all.is_empty() {
            return Err(DeviceError::NoCredentials);
        }
        let a = all.swap_remove(0);
        Ok(Asserted {
            auth_data: a.auth_data,
            signature: a.signature,
            credential_id: a.credential_id,
        })
    }

    fn cancel(&self) {
        let _ = self.key.cancel_selection();
    }

    fn present(&self) -> bool {
        let path = hid_path(&self.param);
        std::panic::catch_unwind(ctap_hid_fido2::get_fidokey_devices)
            .map(|devs| devs.iter().any(|d| hid_path(&d.param) == path))
            .unwrap_or(false)
    }
}

/// Formats 16 bytes as a UUID string.
pub fn format_aaguid(b: &[u8]) -> String {
    if b.len() != 16 {
        return hex::encode(b);
    }
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_errors_are_classified_by_ctap_status() {
        let e = |s: &str| DeviceError::from_library(&anyhow::anyhow!(s.to_owned()));
        assert_eq!(
            e("0x31 CTAP2_ERR_PIN_INVALID   PIN Invalid."),
            DeviceError::PinInvalid
        );
        assert_eq!(
            e("get_assertion failed: 0x32 CTAP2_ERR_PIN_BLOCKED PIN Blocked."),
            DeviceError::PinBlocked
        );
        assert_eq!(e("0x2D CTAP2_ERR_KEEPALIVE_CANCEL"), DeviceError::Cancelled);
        assert_eq!(
            e("0x2E CTAP2_ERR_NO_CREDENTIALS"),
            DeviceError::NoCredentials
        );
        assert!(matches!(e("something odd"), DeviceError::Other(_)));
    }

    #[test]
    fn aaguid_is_formatted_as_a_uuid() {
        let b = [
            0xee, 0x88, 0x28, 0x79, 0x72, 0x1c, 0x49, 0x13, 0x97, 0x75, 0x3d, 0xfc, 0xce, 0x97,
            0x07, 0x2a,
        ];
        assert_eq!(format_aaguid(&b), "ee882879-721c-4913-9775-3dfcce97072a");
    }
}

//! The USB security-key authenticator: picks the key, decides between built-in UV, a PIN or
//! touch only from the key's getInfo and the gateway's policy, prompts through a [`Prompter`],
//! bounds every wait with a timeout that really cancels, and turns CTAP2 errors into words.
//!
//! ctap-hid-fido2 hashes the bytes it is given as the "challenge", so the agent passes the exact
//! `clientDataJSON`. It keeps no raw attestation object: [`attestation_object`] re-encodes
//! `{fmt, attStmt, authData}` as CBOR for the gateway.

use std::{
    sync::{Arc, mpsc},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ciborium::Value;
use secrecy::{ExposeSecret, SecretString};
use webauthn_rs_proto::{
    AuthenticatorAssertionResponseRaw, AuthenticatorAttestationResponseRaw, PublicKeyCredential,
    PublicKeyCredentialCreationOptions, PublicKeyCredentialRequestOptions,
    RegisterPublicKeyCredential, UserVerificationPolicy,
};

use super::{
    Authenticator, AuthnError,
    device::{Asserted, DeviceError, FidoDevice, GetAssertion, KeyInfo, MakeCredential, UvMethod},
};

/// How many wrong PINs the agent lets the user retry in one operation before giving up (the
/// key itself blocks after three in a row until it is replugged).
const PIN_ATTEMPTS: usize = 3;

/// Asks the user for what the key needs. The CLI prints to the terminal; the tray shows windows.
pub trait Prompter: Send + Sync {
    /// The key is waiting for a touch.
    fn touch(&self, key: &str);
    /// The key needs its PIN; `retries` says how many tries the key has left, when known.
    /// `None` means the user cancelled.
    fn pin(&self, key: &str, retries: Option<i32>) -> Option<SecretString>;
    /// Whether the user asked to stop waiting (a Cancel button); polled while the key blinks.
    fn cancelled(&self) -> bool {
        false
    }
}

/// A prompter for programs with nobody to ask: it never gives a PIN.
pub struct NoPrompt;

impl Prompter for NoPrompt {
    fn touch(&self, _key: &str) {}
    fn pin(&self, _key: &str, _retries: Option<i32>) -> Option<SecretString> {
        None
    }
}

/// A key and what it said about itself.
type Candidate = (Arc<dyn FidoDevice>, KeyInfo);

/// A security key, or a choice among several.
pub struct HidAuthenticator {
    devices: Vec<Arc<dyn FidoDevice>>,
    preferred: Option<String>,
    prompter: Arc<dyn Prompter>,
    timeout: Duration,
    chosen: Option<Candidate>,
}

impl HidAuthenticator {
    /// Builds the authenticator over `devices`. `preferred` (config `device`) picks a key by a
    /// part of its path or product name; `timeout` bounds each wait for a touch.
    pub fn new(
        devices: Vec<Arc<dyn FidoDevice>>,
        preferred: Option<String>,
        prompter: Arc<dyn Prompter>,
        timeout: Duration,
    ) -> Result<Self, AuthnError> {
        if devices.is_empty() {
            return Err(AuthnError::NoDevice);
        }
        Ok(Self {
            devices,
            preferred,
            prompter,
            timeout,
            chosen: None,
        })
    }

    /// The key chosen for the last operation.
    pub fn chosen(&self) -> Option<&KeyInfo> {
        self.chosen.as_ref().map(|(_, i)| i)
    }

    fn infos(&self) -> Result<Vec<Candidate>, AuthnError> {
        let mut out = Vec::new();
        for d in &self.devices {
            out.push((d.clone(), d.info().map_err(user_error_simple)?));
        }
        if let Some(p) = &self.preferred {
            out.retain(|(_, i)| i.path.contains(p.as_str()) || i.product.contains(p.as_str()));
            if out.is_empty() {
                return Err(AuthnError::Device(format!(
                    "no plugged-in key matches device = {p:?} in the agent config (see `touchgate keys`)"
                )));
            }
        }
        Ok(out)
    }

    /// For enrolment: exactly one candidate key.
    fn pick_for_register(&mut self) -> Result<Candidate, AuthnError> {
        let mut all = self.infos()?;
        if all.len() > 1 {
            return Err(AuthnError::SeveralDevices);
        }
        all.pop().ok_or(AuthnError::NoDevice)
    }

    /// For sign-in: the only key, or the first that holds one of `allow` (silent probe).
    fn pick_for_auth(&mut self, rp_id: &str, allow: &[Vec<u8>]) -> Result<Candidate, AuthnError> {
        let mut all = self.infos()?;
        if all.len() == 1 {
            return all.pop().ok_or(AuthnError::NoDevice);
        }
        for (d, info) in all.iter() {
            let probe = d.get_assertion(&GetAssertion {
                rp_id,
                client_data_json: b"touchgate-probe",
                allow,
                uv: UvMethod::None,
                pin: None,
                up: false,
            });
            if probe.is_ok() {
                return Ok((d.clone(), info.clone()));
            }
        }
        Err(AuthnError::Device(format!(
            "none of the {} plugged-in keys holds a credential for this gateway: use the key you enrolled",
            all.len()
        )))
    }

    /// Runs `op` on `device` with the PIN flow, the touch prompt and the timeout.
    fn run<T>(
        &self,
        device: &Arc<dyn FidoDevice>,
        info: &KeyInfo,
        uv: UvMethod,
        op: impl Fn(Option<&str>) -> Result<T, DeviceError>,
    ) -> Result<T, AuthnError> {
        let name = info.product.as_str();
        let mut retries = info.pin_retries;
        let mut pin = None;
        for attempt in 0..PIN_ATTEMPTS {
            if uv == UvMethod::Pin {
                if retries == Some(0) {
                    return Err(AuthnError::PinBlocked);
                }
                pin = Some(
                    self.prompter
                        .pin(name, retries)
                        .ok_or(AuthnError::Cancelled)?,
                );
            }
            self.prompter.touch(name);
            match with_timeout(device, self.timeout, &*self.prompter, || {
                op(pin.as_ref().map(|p| p.expose_secret()))
            }) {
                Ok(v) => return Ok(v),
                Err(Waited::TimedOut) => return Err(AuthnError::Timeout(self.timeout.as_secs())),
                Err(Waited::Cancelled) => return Err(AuthnError::Cancelled),
                Err(Waited::Failed(DeviceError::PinInvalid)) => {
                    retries = device.info().ok().and_then(|i| i.pin_retries);
                    if attempt + 1 == PIN_ATTEMPTS || retries == Some(0) {
                        return Err(AuthnError::PinWrong { retries });
                    }
                }
                Err(Waited::Failed(e)) => return Err(user_error(e, uv)),
            }
        }
        Err(AuthnError::PinWrong { retries })
    }
}

/// Chooses how the user is verified, from the relying party's policy and the key's getInfo.
pub fn decide_uv(policy: &UserVerificationPolicy, info: &KeyInfo) -> Result<UvMethod, AuthnError> {
    let can = |i: &KeyInfo| {
        if i.builtin_uv {
            Some(UvMethod::BuiltIn)
        } else if i.client_pin == Some(true) {
            Some(UvMethod::Pin)
        } else {
            None
        }
    };
    match policy {
        UserVerificationPolicy::Required => can(info).ok_or(if info.client_pin == Some(false) {
            AuthnError::PinNotSet
        } else {
            AuthnError::UvUnsupported
        }),
        UserVerificationPolicy::Preferred => Ok(can(info).unwrap_or(UvMethod::None)),
        _ if info.always_uv => can(info).ok_or(AuthnError::PinNotSet),
        _ => Ok(UvMethod::None),
    }
}

enum Waited {
    TimedOut,
    Cancelled,
    Failed(DeviceError),
}

/// How often the watchdog looks at the prompter's cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// Runs a blocking device call; after `timeout`, or when the user cancels, a watchdog sends
/// CTAPHID_CANCEL, so the call returns instead of hanging.
fn with_timeout<T>(
    device: &Arc<dyn FidoDevice>,
    timeout: Duration,
    prompter: &dyn Prompter,
    op: impl FnOnce() -> Result<T, DeviceError>,
) -> Result<T, Waited> {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let (fired_tx, fired_rx) = mpsc::channel::<bool>();
    let d = device.clone();
    std::thread::scope(|scope| {
        let watchdog = scope.spawn(move || {
            let deadline = std::time::Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match done_rx.recv_timeout(left.min(CANCEL_POLL)) {
                    Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                        let _ = fired_tx.send(false);
                        d.cancel();
                        return;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) if prompter.cancelled() => {
                        let _ = fired_tx.send(true);
                        d.cancel();
                        return;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            }
        });
        let res = op();
        let _ = done_tx.send(());
        let _ = watchdog.join();
        match (res, fired_rx.try_recv().ok()) {
            (Ok(v), _) => Ok(v),
            (Err(_), Some(true)) => Err(Waited::Cancelled),
            (Err(_), Some(false)) | (Err(DeviceError::Timeout), None) => Err(Waited::TimedOut),
            (Err(e), None) => Err(Waited::Failed(e)),
        }
    })
}

fn user_error_simple(e: DeviceError) -> AuthnError {
    user_error(e, UvMethod::None)
}

fn user_error(e: DeviceError, uv: UvMethod) -> AuthnError {
    match e {
        DeviceError::PinInvalid => AuthnError::PinWrong { retries: None },
        DeviceError::PinBlocked => AuthnError::PinBlocked,
        DeviceError::PinAuthBlocked => AuthnError::PinAuthBlocked,
        DeviceError::PinNotSet => AuthnError::PinNotSet,
        DeviceError::PinRequired if uv != UvMethod::Pin => AuthnError::PinNotSet,
        DeviceError::UvBlocked => AuthnError::Device(
            "the key's fingerprint check is blocked after too many failures: use its PIN, or re-enrol a fingerprint".into(),
        ),
        DeviceError::Cancelled => AuthnError::Cancelled,
        DeviceError::Timeout => AuthnError::Timeout(0),
        DeviceError::Removed => AuthnError::Removed,
        DeviceError::NoCredentials => AuthnError::Device(
            "this key holds no credential for this gateway: use the key you enrolled, or enrol this one".into(),
        ),
        DeviceError::Excluded => AuthnError::Device("this key is already enrolled for this user".into()),
        other => AuthnError::Device(other.to_string()),
    }
}

impl Authenticator for HidAuthenticator {
    fn describe(&self) -> String {
        match &self.chosen {
            Some((_, i)) => i.product.clone(),
            None => match self.devices.first().and_then(|d| d.info().ok()) {
                Some(i) if self.devices.len() == 1 => i.product,
                _ => format!("one of {} security keys", self.devices.len()),
            },
        }
    }

    fn register(
        &mut self,
        options: &PublicKeyCredentialCreationOptions,
        client_data_json: &[u8],
    ) -> Result<RegisterPublicKeyCredential, AuthnError> {
        let (device, info) = self.pick_for_register()?;
        let policy = options
            .authenticator_selection
            .as_ref()
            .map(|s| s.user_verification)
            .unwrap_or(UserVerificationPolicy::Preferred);
        let uv = decide_uv(&policy, &info)?;
        let excluded: Vec<Vec<u8>> = options
            .exclude_credentials
            .iter()
            .flatten()
            .map(|c| c.id.to_vec())
            .collect();
        let att = self.run(&device, &info, uv, |pin| {
            device.make_credential(&MakeCredential {
                rp_id: &options.rp.id,
                client_data_json,
                exclude: &excluded,
                uv,
                pin,
            })
        })?;
        self.chosen = Some((device, info));
        let object = attestation_object(&att.fmt, att.alg, &att.sig, &att.x5c, &att.auth_data)?;
        let id = att.credential_id;
        Ok(RegisterPublicKeyCredential {
            id: URL_SAFE_NO_PAD.encode(&id),
            raw_id: id,
            response: AuthenticatorAttestationResponseRaw {
                attestation_object: object,
                client_data_json: client_data_json.to_vec(),
                transports: None,
            },
            type_: "public-key".into(),
            extensions: Default::default(),
        })
    }

    fn authenticate(
        &mut self,
        options: &PublicKeyCredentialRequestOptions,
        client_data_json: &[u8],
    ) -> Result<PublicKeyCredential, AuthnError> {
        let allowed: Vec<Vec<u8>> = options
            .allow_credentials
            .iter()
            .map(|c| c.id.to_vec())
            .collect();
        let (device, info) = self.pick_for_auth(&options.rp_id, &allowed)?;
        let uv = decide_uv(&options.user_verification, &info)?;
        let a: Asserted = self.run(&device, &info, uv, |pin| {
            device.get_assertion(&GetAssertion {
                rp_id: &options.rp_id,
                client_data_json,
                allow: &allowed,
                uv,
                pin,
                up: true,
            })
        })?;
        self.chosen = Some((device, info));
        // With a one-entry allow list the key may leave the credential id out.
        let id = if a.credential_id.is_empty() {
            allowed.first().cloned().unwrap_or_default()
        } else {
            a.credential_id
        };
        Ok(PublicKeyCredential {
            id: URL_SAFE_NO_PAD.encode(&id),
            raw_id: id,
            response: AuthenticatorAssertionResponseRaw {
                authenticator_data: a.auth_data,
                client_data_json: client_data_json.to_vec(),
                signature: a.signature,
                user_handle: None,
            },
            extensions: Default::default(),
            type_: "public-key".into(),
        })
    }

    fn present(&self) -> Option<bool> {
        self.chosen.as_ref().map(|(d, _)| d.present())
    }
}

/// Encodes a WebAuthn attestation object `{fmt, attStmt, authData}` from the parts
/// ctap-hid-fido2 returns.
pub fn attestation_object(
    fmt: &str,
    alg: i32,
    sig: &[u8],
    x5c: &[Vec<u8>],
    auth_data: &[u8],
) -> Result<Vec<u8>, AuthnError> {
    let att_stmt = if fmt == "none" {
        Value::Map(vec![])
    } else {
        let mut m = vec![
            (Value::Text("alg".into()), Value::Integer(alg.into())),
            (Value::Text("sig".into()), Value::Bytes(sig.to_vec())),
        ];
        if !x5c.is_empty() {
            m.push((
                Value::Text("x5c".into()),
                Value::Array(x5c.iter().map(|c| Value::Bytes(c.clone())).collect()),
            ));
        }
        Value::Map(m)
    };
    let obj = Value::Map(vec![
        (Value::Text("fmt".into()), Value::Text(fmt.into())),
        (Value::Text("attStmt".into()), att_stmt),
        (
            Value::Text("authData".into()),
            Value::Bytes(auth_data.to_vec()),
        ),
    ]);
    let mut out = Vec::new();
    ciborium::into_writer(&obj, &mut out).map_err(|e| AuthnError::Encoding(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests;

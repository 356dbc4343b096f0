//! The WebAuthn relying party (webauthn-rs), the attestation policy, and the channel binding.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use touchgate_proto::{Refusal, RefusalCode};
use webauthn_rs::prelude::{
    AttestationCaListBuilder, AuthenticationResult, CreationChallengeResponse, PublicKeyCredential,
    RegisterPublicKeyCredential, RequestChallengeResponse, SecurityKey, SecurityKeyAuthentication,
    SecurityKeyRegistration, Url, Uuid, Webauthn, WebauthnBuilder, WebauthnError,
};

use crate::config::{GatewayConfig, UserVerification};
use webauthn_rs_proto::UserVerificationPolicy;

/// AAGUID of touchgate's software key (the soft token of webauthn-authenticator-rs).
pub const SOFTWARE_AAGUID: Uuid = Uuid::from_u128(0x0fb9bcbc_a0d4_4042_bbb0_559bc1631e28);

/// Errors building the relying party.
#[derive(Debug, thiserror::Error)]
pub enum RpSetupError {
    /// webauthn-rs refused the rp id or origin.
    #[error("invalid WebAuthn settings (rp_id {rp_id:?}, origin {origin:?}): {source:?}")]
    Webauthn {
        /// The rp id.
        rp_id: String,
        /// The origin.
        origin: String,
        /// The error.
        source: WebauthnError,
    },
    /// A trusted root could not be read.
    #[error("cannot read attestation root {path}: {reason}")]
    Root {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// What entitles a user to enrol a key.
#[derive(Debug, Clone)]
pub enum EnrolSource {
    /// A one-time invite code an admin made.
    Invite(String),
    /// The organisation's identity provider vouched for the user on this connection.
    Idp(crate::oidc::Identity),
}

/// A registration in progress on one connection.
pub struct PendingEnrol {
    /// The user.
    pub user: String,
    /// What entitles the user to enrol (checked again when storing).
    pub source: EnrolSource,
    state: SecurityKeyRegistration,
    issued: Instant,
}

/// A sign-in in progress on one connection.
pub struct PendingLogin {
    /// The user.
    pub user: String,
    /// `None` for a decoy challenge (a user with no key): every answer fails.
    state: Option<SecurityKeyAuthentication>,
    issued: Instant,
}

/// An enrolled credential, ready to store.
pub struct Enrolled {
    /// The webauthn-rs credential.
    pub key: SecurityKey,
    /// Base64url credential id.
    pub cred_id: String,
    /// The authenticator model.
    pub aaguid: Uuid,
}

/// The relying party.
pub struct RelyingParty {
    webauthn: Webauthn,
    rp_id: String,
    origin: String,
    roots: Vec<(Vec<u8>, Vec<Uuid>, String)>,
    allow_software: bool,
    allowed_aaguids: Vec<Uuid>,
    user_verification: UserVerification,
    challenge_ttl: Duration,
    /// Model names the attestation trust list gives, by AAGUID.
    models: crate::users::ModelNames,
}

impl RelyingParty {
    /// Builds the relying party from the gateway config, reading the trusted roots.
    pub fn new(cfg: &GatewayConfig) -> Result<Self, RpSetupError> {
        let origin = cfg.origin();
        let setup_err = |source| RpSetupError::Webauthn {
            rp_id: cfg.rp_id.clone(),
            origin: origin.clone(),
            source,
        };
        let url = Url::parse(&origin).map_err(|_| setup_err(WebauthnError::Configuration))?;
        let webauthn = WebauthnBuilder::new(&cfg.rp_id, &url)
            .map_err(setup_err)?
            .rp_name("touchgate")
            .timeout(cfg.session.challenge_ttl)
            .build()
            .map_err(setup_err)?;
        let mut roots = Vec::new();
        for t in &cfg.attestation.trusted {
            let pem = std::fs::read(&t.ca).map_err(|e| RpSetupError::Root {
                path: t.ca.display().to_string(),
                reason: e.to_string(),
            })?;
            let desc = t
                .description
                .clone()
                .unwrap_or_else(|| t.ca.display().to_string());
            roots.push((pem, t.aaguids.clone(), desc));
        }
        Ok(Self {
            webauthn,
            rp_id: cfg.rp_id.clone(),
            origin,
            roots,
            allow_software: cfg.attestation.allow_software,
            allowed_aaguids: cfg.attestation.allowed_aaguids.clone(),
            user_verification: cfg.attestation.user_verification,
            challenge_ttl: cfg.session.challenge_ttl,
            models: crate::users::ModelNames::from_config(&cfg.attestation),
        })
    }

    /// The name of the authenticator model `aaguid`, where the trust list gives one (an
    /// entry's `description`), and for touchgate's software key.
    pub fn model_name(&self, aaguid: &str) -> Option<String> {
        self.models.name(aaguid).map(str::to_owned)
    }

    /// The origin agents must put in `clientDataJSON`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Starts a registration. `software_ca_pem` is the CA a software key declares for itself;
    /// it is trusted for the software AAGUID only, and only when the policy allows software keys.
    pub fn begin_enrol(
        &self,
        user: &str,
        user_id: Uuid,
        source: EnrolSource,
        existing: Vec<Vec<u8>>,
        software_ca_pem: Option<&str>,
    ) -> Result<(CreationChallengeResponse, PendingEnrol), Refusal> {
        if software_ca_pem.is_some() && !self.allow_software {
            return Err(software_refused());
        }
        let mut list = AttestationCaListBuilder::new();
        let mut entries = 0;
        for (pem, aaguids, desc) in &self.roots {
            for a in aaguids {
                list.insert_device_pem(pem, *a, desc.clone(), BTreeMap::new())
                    .map_err(|e| internal(format!("attestation root {desc} is unusable: {e:?}")))?;
                entries += 1;
            }
        }
        if let Some(pem) = software_ca_pem {
            list.insert_device_pem(
                pem.as_bytes(),
                SOFTWARE_AAGUID,
                "touchgate software key".into(),
                BTreeMap::new(),
            )
            .map_err(|e| {
                Refusal::new(
                    RefusalCode::AttestationRefused,
                    format!("the software key's CA certificate is unusable: {e:?}"),
                )
            })?;
            entries += 1;
        }
        if entries == 0 {
            return Err(Refusal::new(
                RefusalCode::AttestationRefused,
                "this gateway trusts no authenticator models yet: the admin must list trusted \
                 attestation roots under [attestation] in the gateway config",
            ));
        }
        let exclude = if existing.is_empty() {
            None
        } else {
            Some(existing.into_iter().collect())
        };
        let (mut ccr, state) = self
            .webauthn
            .start_securitykey_registration(user_id, user, user, exclude, Some(list.build()), None)
            .map_err(|e| internal(format!("cannot start registration: {e:?}")))?;
        // The security-key ceremony leaves UV to the relying party: ask for what the policy
        // says, and check the UV flag ourselves when it is required.
        if let Some(sel) = ccr.public_key.authenticator_selection.as_mut() {
            sel.user_verification = self.uv_policy();
        }
        Ok((
            ccr,
            PendingEnrol {
                user: user.to_owned(),
                source,
                state,
                issued: Instant::now(),
            },
        ))
    }

    /// Verifies a registration response against its pending state and this connection's binding.
    pub fn finish_enrol(
        &self,
        pending: PendingEnrol,
        credential: serde_json::Value,
        binding: &[u8],
    ) -> Result<Enrolled, Refusal> {
        self.check_fresh(pending.issued)?;
        let reg: RegisterPublicKeyCredential = serde_json::from_value(credential).map_err(|e| {
            Refusal::new(
                RefusalCode::BadRequest,
                format!("malformed registration response: {e}"),
            )
        })?;
        check_binding(&reg.response.client_data_json, binding)?;
        let aaguid = attestation_aaguid(&reg.response.attestation_object);
        let key = self
            .webauthn
            .finish_securitykey_registration(&reg, &pending.state)
            .map_err(|e| self.enrol_refusal(e, aaguid))?;
        // Defence in depth: whatever webauthn-rs accepted, a software AAGUID needs the policy.
        if aaguid == Some(SOFTWARE_AAGUID) && !self.allow_software {
            return Err(software_refused());
        }
        let model = aaguid.unwrap_or_default();
        if !self.allowed_aaguids.is_empty()
            && model != SOFTWARE_AAGUID
            && !self.allowed_aaguids.contains(&model)
        {
            return Err(Refusal::new(
                RefusalCode::AttestationRefused,
                format!(
                    "authenticator model {model} is not on this gateway's list of allowed models \
                     ([attestation] allowed_aaguids): ask your admin which security keys are accepted"
                ),
            ));
        }
        if self.user_verification == UserVerification::Required
            && !auth_data_flag(&reg.response.attestation_object, FLAG_UV)
        {
            return Err(uv_missing());
        }
        let cred_id = URL_SAFE_NO_PAD.encode(key.cred_id().as_ref() as &[u8]);
        Ok(Enrolled {
            key,
            cred_id,
            aaguid: aaguid.unwrap_or_default(),
        })
    }

    fn enrol_refusal(&self, e: WebauthnError, aaguid: Option<Uuid>) -> Refusal {
        use WebauthnError as W;
        match e {
            W::AttestationTrustFailure
            | W::AttestationChainNotTrusted(_)
            | W::AttestationUntrustedAaguid
            | W::AttestationCertificateTrustStoreEmpty
            | W::AttestationNotVerifiable
            | W::AttestationCertificateAAGUIDMismatch
            | W::AttestationFormatMissingAaguid => {
                let model = match aaguid {
                    Some(a) if a == SOFTWARE_AAGUID => {
                        return software_refused();
                    }
                    Some(a) => format!("authenticator model {a}"),
                    None => "this authenticator".into(),
                };
                Refusal::new(
                    RefusalCode::AttestationRefused,
                    format!(
                        "{model} is not on this gateway's list of trusted security keys ({e:?})"
                    ),
                )
            }
            other => verification_refusal(other),
        }
    }

    /// Starts a sign-in with the user's credentials.
    pub fn begin_login(
        &self,
        user: &str,
        keys: &[SecurityKey],
    ) -> Result<(RequestChallengeResponse, PendingLogin), Refusal> {
        let (mut rcr, state) = self
            .webauthn
            .start_securitykey_authentication(keys)
            .map_err(|e| internal(format!("cannot start sign-in: {e:?}")))?;
        rcr.public_key.user_verification = self.uv_policy();
        Ok((
            rcr,
            PendingLogin {
                user: user.to_owned(),
                state: Some(state),
                issued: Instant::now(),
            },
        ))
    }

    /// A sign-in challenge for a user with no key that looks like a real one: the same
    /// options, for one credential whose id is derived from `secret` and the name (the same
    /// on every ask, as a real one would be). Its answer fails like a wrong key's.
    pub fn begin_decoy_login(
        &self,
        user: &str,
        secret: &[u8],
    ) -> Result<(RequestChallengeResponse, PendingLogin), Refusal> {
        use rand::Rng;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let id: Vec<u8> = [1u8, 2]
            .iter()
            .flat_map(|i| {
                let mut msg = format!("touchgate decoy credential {i}\0").into_bytes();
                msg.extend_from_slice(user.as_bytes());
                ring::hmac::sign(&key, &msg).as_ref().to_vec()
            })
            .collect();
        let challenge: [u8; 32] = rand::rng().random();
        let options = serde_json::json!({
            "publicKey": {
                "challenge": URL_SAFE_NO_PAD.encode(challenge),
                // What the builder was given (`challenge_ttl`); a test compares a real and a
                // decoy challenge.
                "timeout": u32::try_from(self.challenge_ttl.as_millis()).unwrap_or(u32::MAX),
                "rpId": self.rp_id,
                "allowCredentials": [{
                    "type": "public-key",
                    "id": URL_SAFE_NO_PAD.encode(id),
                    "transports": ["usb"],
                }],
                "userVerification": self.uv_policy(),
                "hints": ["security-key"],
            }
        });
        let rcr = serde_json::from_value(options)
            .map_err(|e| internal(format!("cannot build a sign-in challenge: {e}")))?;
        Ok((
            rcr,
            PendingLogin {
                user: user.to_owned(),
                state: None,
                issued: Instant::now(),
            },
        ))
    }

    /// Verifies an assertion against its pending state and this connection's binding.
    pub fn finish_login(
        &self,
        pending: PendingLogin,
        credential: serde_json::Value,
        binding: &[u8],
    ) -> Result<AuthenticationResult, Refusal> {
        self.check_fresh(pending.issued)?;
        let cred: PublicKeyCredential = serde_json::from_value(credential).map_err(|e| {
            Refusal::new(RefusalCode::BadRequest, format!("malformed assertion: {e}"))
        })?;
        check_binding(&cred.response.client_data_json, binding)?;
        let Some(state) = &pending.state else {
            return Err(verification_refusal(WebauthnError::CredentialNotFound));
        };
        let result = self
            .webauthn
            .finish_securitykey_authentication(&cred, state)
            .map_err(verification_refusal)?;
        if self.user_verification == UserVerification::Required && !result.user_verified() {
            return Err(uv_missing());
        }
        Ok(result)
    }

    fn uv_policy(&self) -> UserVerificationPolicy {
        match self.user_verification {
            UserVerification::Required => UserVerificationPolicy::Required,
            UserVerification::Preferred => UserVerificationPolicy::Preferred,
            UserVerification::Discouraged => UserVerificationPolicy::Discouraged_DO_NOT_USE,
        }
    }

    fn check_fresh(&self, issued: Instant) -> Result<(), Refusal> {
        if issued.elapsed() >= self.challenge_ttl {
            return Err(Refusal::new(
                RefusalCode::ChallengeExpired,
                format!(
                    "the challenge expired (challenges are valid for {}): start again",
                    humantime::format_duration(self.challenge_ttl)
                ),
            ));
        }
        Ok(())
    }
}

fn uv_missing() -> Refusal {
    Refusal::new(
        RefusalCode::VerificationFailed,
        "this gateway requires user verification: the key must check your PIN or fingerprint \
         (set a PIN on the key, e.g. with its vendor's tool, and try again)",
    )
}

/// The user-present flag of authenticator data.
pub const FLAG_UP: u8 = 0x01;
/// The user-verified flag of authenticator data.
pub const FLAG_UV: u8 = 0x04;

fn auth_data_flag(attestation_object: &[u8], flag: u8) -> bool {
    auth_data(attestation_object)
        .and_then(|a| a.get(32).copied())
        .is_some_and(|f| f & flag != 0)
}

fn software_refused() -> Refusal {
    Refusal::new(
        RefusalCode::AttestationRefused,
        format!(
            "this gateway does not accept software keys (AAGUID {SOFTWARE_AAGUID}): enrol a \
             hardware security key, or ask the admin to set [attestation] allow_software = true \
             for test or bot gateways"
        ),
    )
}

fn internal(msg: String) -> Refusal {
    Refusal::new(RefusalCode::Internal, msg)
}

fn verification_refusal(e: WebauthnError) -> Refusal {
    use WebauthnError as W;
    let (code, msg) = match &e {
        W::CredentialPossibleCompromise => (
            RefusalCode::CounterNotRising,
            "the key's signature counter did not rise: this credential may have been cloned, \
             so it is refused — contact your admin"
                .to_owned(),
        ),
        W::InvalidRPOrigin => (
            RefusalCode::VerificationFailed,
            "the assertion names another origin than this gateway's".to_owned(),
        ),
        W::InvalidRPIDHash => (
            RefusalCode::VerificationFailed,
            "the assertion was made for another relying party id".to_owned(),
        ),
        W::MismatchedChallenge | W::ChallengeNotFound => (
            RefusalCode::ChallengeExpired,
            "the assertion answers another challenge".to_owned(),
        ),
        W::UserNotPresent => (
            RefusalCode::VerificationFailed,
            "the key did not confirm user presence (touch)".to_owned(),
        ),
        W::UserNotVerified => (
            RefusalCode::VerificationFailed,
            "the key did not verify the user (PIN or biometrics)".to_owned(),
        ),
        W::CredentialNotFound => (
            RefusalCode::VerificationFailed,
            "the key used a credential that is not enrolled for this user".to_owned(),
        ),
        _ => (
            RefusalCode::VerificationFailed,
            format!("the WebAuthn response did not verify ({e:?})"),
        ),
    };
    Refusal::new(code, msg)
}

/// Checks that `clientDataJSON` carries this connection's channel-binding value.
pub fn check_binding(client_data_json: &[u8], binding: &[u8]) -> Result<(), Refusal> {
    // Only the binding member is read here (webauthn-rs parses the rest); a typed parse skips
    // the other members instead of building a map of them.
    #[derive(serde::Deserialize)]
    struct BindingOnly<'a> {
        #[serde(rename = "touchgateBinding", borrow, default)]
        binding: Option<std::borrow::Cow<'a, str>>,
    }
    let v: BindingOnly<'_> = serde_json::from_slice(client_data_json).map_err(|e| {
        Refusal::new(
            RefusalCode::BadRequest,
            format!("clientDataJSON is not a JSON object: {e}"),
        )
    })?;
    let expected = URL_SAFE_NO_PAD.encode(binding);
    match v.binding.as_deref() {
        Some(b) if b == expected => Ok(()),
        Some(_) => Err(Refusal::new(
            RefusalCode::BindingMismatch,
            "the assertion was made for another connection: a captured assertion cannot be reused",
        )),
        None => Err(Refusal::new(
            RefusalCode::BindingMismatch,
            "the assertion carries no channel binding for this connection",
        )),
    }
}

fn auth_data(attestation_object: &[u8]) -> Option<Vec<u8>> {
    let v: ciborium::Value = ciborium::from_reader(attestation_object).ok()?;
    v.as_map()?.iter().find_map(|(k, v)| {
        (k.as_text() == Some("authData"))
            .then(|| v.as_bytes().cloned())
            .flatten()
    })
}

/// The AAGUID inside an attestation object, if it parses.
pub fn attestation_aaguid(attestation_object: &[u8]) -> Option<Uuid> {
    let auth_data = auth_data(attestation_object)?;
    // rpIdHash (32) | flags (1) | signCount (4) | AAGUID (16) | ...
    let bytes: [u8; 16] = auth_data.get(37..53)?.try_into().ok()?;
    Some(Uuid::from_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use touchgate_proto::CLIENT_DATA_BINDING_KEY;

    #[test]
    fn the_binding_member_name_is_the_protocols() {
        assert_eq!(CLIENT_DATA_BINDING_KEY, "touchgateBinding");
    }

    #[test]
    fn binding_must_match_this_connection() {
        let cdj = serde_json::json!({
            "type": "webauthn.get",
            CLIENT_DATA_BINDING_KEY: URL_SAFE_NO_PAD.encode([7u8; 32]),
        })
        .to_string();
        check_binding(cdj.as_bytes(), &[7u8; 32]).expect("same connection");
        let err = check_binding(cdj.as_bytes(), &[8u8; 32]).expect_err("other connection");
        assert_eq!(err.code, RefusalCode::BindingMismatch);
        let err = check_binding(b"{}", &[7u8; 32]).expect_err("missing");
        assert_eq!(err.code, RefusalCode::BindingMismatch);
        let err = check_binding(b"not json", &[7u8; 32]).expect_err("garbage");
        assert_eq!(err.code, RefusalCode::BadRequest);
    }

    #[test]
    fn aaguid_is_read_from_auth_data() {
        let mut auth_data = vec![0u8; 37];
        auth_data.extend_from_slice(SOFTWARE_AAGUID.as_bytes());
        auth_data.extend_from_slice(&[0, 0]);
        let obj = ciborium::Value::Map(vec![
            (
                ciborium::Value::Text("fmt".into()),
                ciborium::Value::Text("packed".into()),
            ),
            (
                ciborium::Value::Text("authData".into()),
                ciborium::Value::Bytes(auth_data),
            ),
        ]);
        let mut buf = Vec::new();
        ciborium::into_writer(&obj, &mut buf).expect("encode");
        assert_eq!(attestation_aaguid(&buf), Some(SOFTWARE_AAGUID));
        assert_eq!(attestation_aaguid(b"\x00"), None);
    }
}

//! USB security keys through ctap-hid-fido2.
//!
//! ctap-hid-fido2 hashes the bytes it is given as the "challenge", so the agent passes the exact
//! `clientDataJSON`. It keeps no raw attestation object: [`attestation_object`] re-encodes
//! `{fmt, attStmt, authData}` as CBOR for the gateway. PIN entry and key selection come with
//! the hardware-key work; today a key with built-in UV uses it, others sign with presence only.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ciborium::Value;
use ctap_hid_fido2::{
    FidoKeyHid, FidoKeyHidFactory, LibCfg,
    fidokey::{GetAssertionArgsBuilder, MakeCredentialArgsBuilder},
};
use webauthn_rs_proto::{
    AuthenticatorAssertionResponseRaw, AuthenticatorAttestationResponseRaw, PublicKeyCredential,
    PublicKeyCredentialCreationOptions, PublicKeyCredentialRequestOptions,
    RegisterPublicKeyCredential,
};

use super::{Authenticator, AuthnError};

/// A USB security key.
pub struct HidKey {
    device: FidoKeyHid,
    name: String,
    builtin_uv: bool,
}

impl HidKey {
    /// Opens the one plugged-in FIDO key.
    pub fn open() -> Result<Self, AuthnError> {
        let devices = ctap_hid_fido2::get_fidokey_devices();
        match devices.len() {
            0 => return Err(AuthnError::NoDevice),
            1 => {}
            _ => return Err(AuthnError::SeveralDevices),
        }
        let name = devices
            .first()
            .map(|d| d.product_string.clone())
            .unwrap_or_else(|| "security key".into());
        let mut cfg = LibCfg::init();
        // The library prints its own "touch the sensor" line to stdout; the agent prompts itself.
        cfg.enable_keep_alive_msg = false;
        cfg.keep_alive_msg = String::new();
        let device =
            FidoKeyHidFactory::create(&cfg).map_err(|e| AuthnError::Device(e.to_string()))?;
        let info = device
            .get_info()
            .map_err(|e| AuthnError::Device(e.to_string()))?;
        let builtin_uv = info.options.iter().any(|(k, v)| k == "uv" && *v);
        Ok(Self {
            device,
            name,
            builtin_uv,
        })
    }
}

impl Authenticator for HidKey {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn register(
        &mut self,
        options: &PublicKeyCredentialCreationOptions,
        client_data_json: &[u8],
    ) -> Result<RegisterPublicKeyCredential, AuthnError> {
        let mut builder = MakeCredentialArgsBuilder::new(&options.rp.id, client_data_json);
        if !self.builtin_uv {
            builder = builder.without_pin_and_uv();
        }
        let excluded: Vec<Vec<u8>> = options
            .exclude_credentials
            .iter()
            .flatten()
            .map(|c| c.id.to_vec())
            .collect();
        for id in &excluded {
            builder = builder.exclude_authenticator(id);
        }
        let att = self
            .device
            .make_credential_with_args(&builder.build())
            .map_err(|e| AuthnError::Device(e.to_string()))?;
        let object = attestation_object(
            &att.fmt,
            att.attstmt_alg,
            &att.attstmt_sig,
            &att.attstmt_x5c,
            &att.auth_data,
        )?;
        let id = att.credential_descriptor.id.clone();
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
        let mut builder = GetAssertionArgsBuilder::new(&options.rp_id, client_data_json);
        if !self.builtin_uv {
            builder = builder.without_pin_and_uv();
        }
        let allowed: Vec<Vec<u8>> = options
            .allow_credentials
            .iter()
            .map(|c| c.id.to_vec())
            .collect();
        for id in &allowed {
            builder = builder.add_credential_id(id);
        }
        let assertions = self
            .device
            .get_assertion_with_args(&builder.build())
            .map_err(|e| AuthnError::Device(e.to_string()))?;
        let a = assertions
            .into_iter()
            .next()
            .ok_or_else(|| AuthnError::Device("the key returned no assertion".into()))?;
        // With a one-entry allow list the key may leave the credential id out.
        let id = if a.credential_id.is_empty() {
            allowed.first().cloned().unwrap_or_default()
        } else {
            a.credential_id.clone()
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
mod tests {
    use super::*;

    #[test]
    fn attestation_object_has_the_webauthn_shape() {
        let obj = attestation_object("packed", -7, b"sig", &[b"cert".to_vec()], b"authdata")
            .expect("encode");
        let v: Value = ciborium::from_reader(obj.as_slice()).expect("cbor");
        let m = v.as_map().expect("map");
        let get = |k: &str| {
            m.iter()
                .find(|(key, _)| key.as_text() == Some(k))
                .map(|(_, v)| v)
        };
        assert_eq!(get("fmt").and_then(|v| v.as_text()), Some("packed"));
        assert_eq!(
            get("authData")
                .and_then(|v| v.as_bytes())
                .map(|b| b.as_slice()),
            Some(&b"authdata"[..])
        );
        let stmt = get("attStmt").and_then(|v| v.as_map()).expect("attStmt");
        assert_eq!(stmt.len(), 3);
        let none = attestation_object("none", 0, b"", &[], b"a").expect("encode");
        let v: Value = ciborium::from_reader(none.as_slice()).expect("cbor");
        assert!(v.as_map().is_some_and(|m| m.len() == 3));
    }
}

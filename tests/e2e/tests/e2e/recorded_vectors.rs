//! Real responses of hardware keys, recorded by another project and published in its test suite
//! (source in `vectors/recorded-yubikeys.json`), verified by webauthn-rs against Yubico's root:
//! as recorded, after going through the agent's HID re-encoding of the attestation object, and
//! tampered (which must fail). The ceremony's challenge is set to the recorded one by rewriting
//! the serialised ceremony state, which is the only way to replay a fixed challenge.

use std::{collections::BTreeMap, time::Duration};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use ciborium::Value;
use webauthn_rs_core::{
    WebauthnCore,
    proto::{
        AttestationCaList, AttestationCaListBuilder, AttestationConveyancePreference,
        AuthenticatorAssertionResponseRaw, AuthenticatorAttestationResponseRaw, Credential,
        PublicKeyCredential, RegisterPublicKeyCredential, UserVerificationPolicy,
    },
};

fn vectors() -> serde_json::Value {
    let text = include_str!("../../vectors/recorded-yubikeys.json");
    serde_json::from_str(text).expect("vector file is JSON")
}

fn b64(s: &str) -> Vec<u8> {
    let t = s.trim_end_matches('=');
    URL_SAFE_NO_PAD
        .decode(t)
        .or_else(|_| STANDARD.decode(s))
        .expect("base64 in the vector file")
}

fn core(rp_id: &str, origin: &str) -> WebauthnCore {
    let origin = url::Url::parse(origin).expect("origin URL");
    WebauthnCore::new_unsafe_experts_only(
        "test",
        rp_id,
        vec![origin],
        Duration::from_secs(60),
        None,
        None,
    )
}

fn yubico_roots(v: &serde_json::Value, aaguid: &str) -> AttestationCaList {
    let mut b = AttestationCaListBuilder::new();
    b.insert_device_pem(
        v["yubico_u2f_root_ca_pem"]
            .as_str()
            .expect("root")
            .as_bytes(),
        uuid::Uuid::parse_str(aaguid).expect("aaguid"),
        "YubiKey 5".into(),
        BTreeMap::new(),
    )
    .expect("Yubico root parses");
    b.build()
}

/// Replaces every occurrence of the generated challenge in a serialised ceremony state with the
/// recorded one.
fn with_challenge<S: serde::Serialize + serde::de::DeserializeOwned>(
    state: &S,
    generated: &[u8],
    recorded: &[u8],
) -> S {
    fn walk(v: &mut serde_json::Value, from: &serde_json::Value, to: &serde_json::Value) -> usize {
        if v == from {
            *v = to.clone();
            return 1;
        }
        match v {
            serde_json::Value::Array(a) => a.iter_mut().map(|x| walk(x, from, to)).sum(),
            serde_json::Value::Object(m) => m.values_mut().map(|x| walk(x, from, to)).sum(),
            _ => 0,
        }
    }
    let mut json = serde_json::to_value(state).expect("state serialises");
    let mut replaced = 0;
    for (from, to) in [
        (
            serde_json::json!(URL_SAFE_NO_PAD.encode(generated)),
            serde_json::json!(URL_SAFE_NO_PAD.encode(recorded)),
        ),
        (serde_json::json!(generated), serde_json::json!(recorded)),
    ] {
        replaced += walk(&mut json, &from, &to);
    }
    assert!(
        replaced > 0,
        "the challenge was not found in the serialised state: {json}"
    );
    serde_json::from_value(json).expect("state deserialises")
}

fn recorded_challenge(client_data_json: &str) -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_str(client_data_json).expect("client data JSON");
    b64(v["challenge"].as_str().expect("challenge"))
}

fn register(
    ex: &serde_json::Value,
    attestation_object: Vec<u8>,
    cas: &AttestationCaList,
) -> Result<Credential, String> {
    let core = core(
        ex["rp_id"].as_str().expect("rp"),
        ex["origin"].as_str().expect("origin"),
    );
    let builder = core
        .new_challenge_register_builder(b"user_id", "test@example.org", "A. User")
        .map_err(|e| format!("{e:?}"))?
        .attestation(AttestationConveyancePreference::Direct)
        .user_verification_policy(UserVerificationPolicy::Discouraged_DO_NOT_USE);
    let (ccr, state) = core
        .generate_challenge_register(builder)
        .map_err(|e| format!("{e:?}"))?;
    let cdj = ex["registration"]["client_data_json"]
        .as_str()
        .expect("cdj");
    let state = with_challenge(&state, &ccr.public_key.challenge, &recorded_challenge(cdj));
    let auth_data = auth_data(&attestation_object);
    let cred_len = u16::from_be_bytes([auth_data[53], auth_data[54]]) as usize;
    let cred_id = auth_data[55..55 + cred_len].to_vec();
    let reg = RegisterPublicKeyCredential {
        id: URL_SAFE_NO_PAD.encode(&cred_id),
        raw_id: cred_id,
        response: AuthenticatorAttestationResponseRaw {
            attestation_object,
            client_data_json: cdj.as_bytes().to_vec(),
            transports: None,
        },
        type_: "public-key".into(),
        extensions: Default::default(),
    };
    core.register_credential(&reg, &state, Some(cas))
        .map_err(|e| format!("{e:?}"))
}

fn auth_data(attestation_object: &[u8]) -> Vec<u8> {
    let v: Value = ciborium::from_reader(attestation_object).expect("CBOR");
    v.as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_text() == Some("authData")))
        .and_then(|(_, v)| v.as_bytes().cloned())
        .expect("authData")
}

/// Takes a recorded attestation object apart into what ctap-hid-fido2 returns, and builds it
/// again with the agent's encoder.
fn reencoded(attestation_object: &[u8]) -> Vec<u8> {
    let v: Value = ciborium::from_reader(attestation_object).expect("CBOR");
    let m = v.as_map().expect("map");
    let get = |k: &str| {
        m.iter()
            .find(|(key, _)| key.as_text() == Some(k))
            .map(|(_, v)| v.clone())
            .expect("member")
    };
    let fmt = get("fmt").as_text().expect("fmt").to_owned();
    let stmt = get("attStmt");
    let s = stmt.as_map().expect("attStmt map");
    let sget = |k: &str| {
        s.iter()
            .find(|(key, _)| key.as_text() == Some(k))
            .map(|(_, v)| v.clone())
    };
    let alg: i32 = sget("alg")
        .and_then(|a| a.as_integer())
        .and_then(|i| i32::try_from(i).ok())
        .expect("alg");
    let sig = sget("sig")
        .and_then(|b| b.as_bytes().cloned())
        .expect("sig");
    let x5c: Vec<Vec<u8>> = sget("x5c")
        .and_then(|a| a.as_array().cloned())
        .map(|a| {
            a.into_iter()
                .filter_map(|c| c.as_bytes().cloned())
                .collect()
        })
        .unwrap_or_default();
    let auth = get("authData").as_bytes().cloned().expect("authData");
    touchgate_agent::authenticator::hid::attestation_object(&fmt, alg, &sig, &x5c, &auth)
        .expect("encodes")
}

/// Registers an example's recorded attestation as recorded.
fn registered(
    v: &serde_json::Value,
    ex: &serde_json::Value,
) -> (String, AttestationCaList, Vec<u8>, Credential) {
    let name = ex["name"].as_str().expect("name").to_owned();
    let cas = yubico_roots(v, ex["aaguid"].as_str().expect("aaguid"));
    let att = b64(ex["registration"]["attestation_object"]
        .as_str()
        .expect("att"));
    let cred = register(ex, att.clone(), &cas).unwrap_or_else(|e| panic!("{name}: {e}"));
    (name, cas, att, cred)
}

#[test]
fn recorded_yubikey_attestations_verify_as_recorded_and_after_hid_reencoding() {
    let v = vectors();
    for ex in v["examples"].as_array().expect("examples") {
        let (name, cas, att, cred) = registered(&v, ex);
        assert!(cred.counter > 0, "{name}");
        let cred2 = register(ex, reencoded(&att), &cas)
            .unwrap_or_else(|e| panic!("{name} re-encoded: {e}"));
        assert_eq!(cred.cred_id, cred2.cred_id);
    }
}

#[test]
fn recorded_yubikey_assertions_verify_against_their_registration() {
    let v = vectors();
    for ex in v["examples"].as_array().expect("examples") {
        let (name, _, _, cred) = registered(&v, ex);
        let core = core(
            ex["rp_id"].as_str().expect("rp"),
            ex["origin"].as_str().expect("origin"),
        );
        let builder = core
            .new_challenge_authenticate_builder(
                vec![cred],
                Some(UserVerificationPolicy::Discouraged_DO_NOT_USE),
            )
            .expect("builder");
        let (rcr, state) = core
            .generate_challenge_authenticate(builder)
            .expect("challenge");
        let a = &ex["assertion"];
        let cdj = a["client_data_json"].as_str().expect("cdj");
        let state = with_challenge(&state, &rcr.public_key.challenge, &recorded_challenge(cdj));
        let id = b64(a["credential_id"].as_str().expect("id"));
        let rsp = PublicKeyCredential {
            id: URL_SAFE_NO_PAD.encode(&id),
            raw_id: id,
            response: AuthenticatorAssertionResponseRaw {
                authenticator_data: b64(a["authenticator_data"].as_str().expect("ad")),
                client_data_json: cdj.as_bytes().to_vec(),
                signature: b64(a["signature"].as_str().expect("sig")),
                user_handle: None,
            },
            extensions: Default::default(),
            type_: "public-key".into(),
        };
        let res = core
            .authenticate_credential(&rsp, &state)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert!(res.counter() > 0, "{name}");
    }
}

#[test]
fn tampered_recorded_attestation_and_unknown_roots_are_refused() {
    let v = vectors();
    let ex = &v["examples"][0];
    let aaguid = ex["aaguid"].as_str().expect("aaguid");
    let att = b64(ex["registration"]["attestation_object"]
        .as_str()
        .expect("att"));

    // Flip a byte inside the signature value (after "sig", a 2-byte CBOR length and the DER header).
    let pos = att
        .windows(3)
        .position(|w| w == b"sig")
        .expect("sig member")
        + 20;
    let mut tampered = att.clone();
    tampered[pos] ^= 0x01;
    assert!(
        register(ex, tampered, &yubico_roots(&v, aaguid)).is_err(),
        "tampered signature"
    );

    // The same key against a list that trusts another vendor only.
    let other = touchgate_testkit::hardware::Vendor::new("Other").expect("vendor");
    let mut b = AttestationCaListBuilder::new();
    b.insert_device_pem(
        other.ca_pem().as_bytes(),
        uuid::Uuid::parse_str(aaguid).expect("uuid"),
        "other".into(),
        BTreeMap::new(),
    )
    .expect("pem");
    assert!(
        register(ex, att.clone(), &b.build()).is_err(),
        "unknown root"
    );

    // Yubico's root, but listed for another model.
    let wrong_model = yubico_roots(&v, "00000000-0000-0000-0000-000000000001");
    assert!(
        register(ex, att, &wrong_model).is_err(),
        "AAGUID not listed under the root"
    );
}

//! Every way an assertion or attestation can be wrong, each refused with a precise reason and an
//! audit line: wrong rpIdHash, user presence clear, a signature over other data, truncated
//! authenticator data, an unknown credential, another user's credential, an oversized
//! clientDataJSON, and an attestation object that is not CBOR.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use touchgate_agent::{
    SharedAuthn,
    authenticator::{
        Ceremony, client_data_json,
        device::{FidoDevice, MakeCredential, UvMethod},
        hid::{HidAuthenticator, NoPrompt},
    },
    tunnel::{SessionKey, Tunnel, TunnelError, client_endpoint},
};
use touchgate_proto::{ClientMsg, RefusalCode, ServerMsg};
use touchgate_testkit::{
    hardware::{FakeHardwareKey, Tamper, Vendor},
    lab::{Lab, LabOptions},
};

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const MODEL: [u8; 16] = *b"touchgate-modelA";

struct Setup {
    lab: Lab,
    _ca_dir: tempfile::TempDir,
    vendor: Vendor,
    cfg: touchgate_agent::AgentConfig,
}

async fn setup() -> anyhow::Result<Setup> {
    let vendor = Vendor::new("Acme")?;
    let ca_dir = tempfile::tempdir()?;
    let ca = ca_dir.path().join("root.pem");
    std::fs::write(&ca, vendor.ca_pem())?;
    let lab = Lab::start(LabOptions {
        allow_software: false,
        attestation: format!(
            "[[attestation.trusted]]\nca = {:?}\naaguids = [{:?}]\n",
            ca.display().to_string(),
            touchgate_agent::authenticator::device::format_aaguid(&MODEL)
        ),
        ..Default::default()
    })
    .await?;
    let cfg = lab.agent_config(ALICE, &lab.dir.path().join("unused"), &[])?;
    Ok(Setup {
        lab,
        _ca_dir: ca_dir,
        vendor,
        cfg,
    })
}

fn hid(key: &Arc<FakeHardwareKey>) -> anyhow::Result<SharedAuthn> {
    let dev: Arc<dyn FidoDevice> = key.clone();
    Ok(Arc::new(Mutex::new(Box::new(HidAuthenticator::new(
        vec![dev],
        None,
        Arc::new(NoPrompt),
        Duration::from_secs(5),
    )?))))
}

async fn tunnel(cfg: &touchgate_agent::AgentConfig) -> anyhow::Result<(quinn::Endpoint, Tunnel)> {
    let key = SessionKey::generate()?;
    let endpoint = client_endpoint(cfg, &key)?;
    let t = Tunnel::connect(&endpoint, cfg).await?;
    Ok((endpoint, t))
}

fn refusal<T: std::fmt::Debug>(r: Result<T, TunnelError>) -> touchgate_proto::Refusal {
    match r {
        Err(TunnelError::Refused(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn enrolled_key(
    s: &Setup,
    user: &str,
) -> anyhow::Result<(Arc<FakeHardwareKey>, SharedAuthn)> {
    let key = Arc::new(s.vendor.make_key("Acme Key", MODEL, None)?);
    let authn = hid(&key)?;
    let mut cfg = s.cfg.clone();
    cfg.user = user.into();
    touchgate_agent::enroll(&cfg, &authn, &s.lab.invite(user)?).await?;
    Ok((key, authn))
}

#[tokio::test]
async fn tampered_assertions_are_each_refused_with_a_reason() -> anyhow::Result<()> {
    let s = setup().await?;
    let (key, authn) = enrolled_key(&s, ALICE).await?;
    let cases = [
        (Tamper::OtherRpId, "another relying party id"),
        (Tamper::NoUserPresence, "user presence"),
        (Tamper::SignOtherData, "did not verify"),
        (Tamper::TruncateAuthData, "did not verify"),
    ];
    for (tamper, words) in cases {
        key.set_tamper(tamper);
        let (_ep, t) = tunnel(&s.cfg).await?;
        let r = refusal(t.login(&authn, ALICE, None).await);
        assert_eq!(
            r.code,
            RefusalCode::VerificationFailed,
            "{tamper:?}: {}",
            r.message
        );
        assert!(r.message.contains(words), "{tamper:?}: {}", r.message);
    }
    key.set_tamper(Tamper::None);
    let (_ep, t) = tunnel(&s.cfg).await?;
    t.login(&authn, ALICE, None).await?;
    let refused = s.lab.audit_events("challenge_refused");
    assert_eq!(
        refused
            .iter()
            .filter(|e| e["outcome"] == "verification_failed")
            .count(),
        4
    );
    Ok(())
}

#[tokio::test]
async fn unknown_credential_and_another_users_credential_are_refused() -> anyhow::Result<()> {
    let s = setup().await?;
    let (alice_key, alice) = enrolled_key(&s, ALICE).await?;
    let (bob_key, _bob) = enrolled_key(&s, BOB).await?;

    // A credential the key made but never enrolled.
    alice_key.make_credential(&MakeCredential {
        rp_id: "localhost",
        client_data_json: b"{}",
        exclude: &[],
        uv: UvMethod::None,
        pin: None,
    })?;
    alice_key.set_tamper(Tamper::UseNewestCredential);
    let (_ep, t) = tunnel(&s.cfg).await?;
    let r = refusal(t.login(&alice, ALICE, None).await);
    assert_eq!(r.code, RefusalCode::VerificationFailed, "{}", r.message);

    // Bob's key, with Bob's enrolled credential, answering Alice's sign-in.
    bob_key.set_tamper(Tamper::UseNewestCredential);
    let (_ep, t) = tunnel(&s.cfg).await?;
    let r = refusal(t.login(&hid(&bob_key)?, ALICE, None).await);
    assert_eq!(r.code, RefusalCode::VerificationFailed, "{}", r.message);
    assert_eq!(
        s.lab
            .audit_events("challenge_refused")
            .iter()
            .filter(|e| e["user"] == ALICE)
            .count(),
        2
    );
    Ok(())
}

#[tokio::test]
async fn oversized_client_data_is_refused_by_the_frame_limit() -> anyhow::Result<()> {
    let s = setup().await?;
    let (_key, authn) = enrolled_key(&s, ALICE).await?;
    let (_ep, t) = tunnel(&s.cfg).await?;
    let mut assertion = t.make_assertion(&authn, ALICE, None).await?;
    let huge = "x".repeat(100 * 1024);
    assertion["response"]["clientDataJSON"] = serde_json::Value::String(huge);
    let r = refusal(
        t.request(&ClientMsg::LoginFinish {
            credential: assertion,
        })
        .await,
    );
    assert_eq!(r.code, RefusalCode::BadRequest);
    assert!(r.message.contains("larger than the limit"), "{}", r.message);
    assert_eq!(s.lab.audit_events("frame_refused").len(), 1);
    Ok(())
}

#[tokio::test]
async fn attestation_object_that_is_not_cbor_is_refused() -> anyhow::Result<()> {
    let s = setup().await?;
    let (_ep, t) = tunnel(&s.cfg).await?;
    let code = s.lab.invite(ALICE)?;
    let reply = t
        .request(&ClientMsg::EnrollBegin {
            user: ALICE.into(),
            invite_code: code.clone(),
            software_ca_pem: None,
        })
        .await?;
    let ServerMsg::EnrollChallenge { options, origin } = reply else {
        anyhow::bail!("expected a challenge, got {reply:?}");
    };
    let challenge = options["publicKey"]["challenge"]
        .as_str()
        .unwrap_or_default();
    let challenge = base64_decode(challenge);
    let cdj = client_data_json(Ceremony::Create, &challenge, &origin, t.binding());
    let credential = serde_json::json!({
        "id": "AAAA",
        "rawId": "AAAA",
        "type": "public-key",
        "response": {
            "attestationObject": "bm90IGNib3I",
            "clientDataJSON": base64_encode(&cdj),
        },
        "extensions": {},
    });
    let r = refusal(t.request(&ClientMsg::EnrollFinish { credential }).await);
    assert!(
        matches!(
            r.code,
            RefusalCode::VerificationFailed | RefusalCode::BadRequest
        ),
        "{r:?}"
    );
    assert_eq!(s.lab.audit_events("enrol_refused").len(), 1);
    // The invite was not used up by the failed attempt.
    let (_ep2, t2) = tunnel(&s.cfg).await?;
    let key = Arc::new(s.vendor.make_key("Acme Key", MODEL, None)?);
    t2.enroll(&hid(&key)?, ALICE, &code, None).await?;
    Ok(())
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .unwrap_or_default()
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

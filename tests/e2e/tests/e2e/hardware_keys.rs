//! Hardware keys through the production HID path (UV decision, prompts, attestation-object
//! encoding) against the real relying party and its attestation policy, with fake keys that
//! make real packed attestations under test vendor CAs.

use std::{sync::Arc, time::Duration};

use secrecy::SecretString;
use touchgate_agent::{
    AgentState, RunningAgent,
    authenticator::hid::{NoPrompt, Prompter},
    tunnel::TunnelError,
};
use touchgate_e2e::{get, hid, lab_trusting, wait_for_state};
use touchgate_proto::RefusalCode;
use touchgate_testkit::hardware::Vendor;

const ALICE: &str = "alice@example.com";
const MODEL_A: [u8; 16] = *b"touchgate-modelA";
const MODEL_B: [u8; 16] = *b"touchgate-modelB";

fn uuid(b: [u8; 16]) -> String {
    touchgate_agent::authenticator::device::format_aaguid(&b)
}

struct Pin(&'static str);

impl Prompter for Pin {
    fn touch(&self, _key: &str) {}
    fn pin(&self, _key: &str, _retries: Option<i32>) -> Option<SecretString> {
        Some(SecretString::from(self.0))
    }
}

fn refusal<T: std::fmt::Debug>(r: Result<T, TunnelError>) -> touchgate_proto::Refusal {
    match r {
        Err(TunnelError::Refused(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn key_from_a_trusted_root_enrols_and_signs_in() -> anyhow::Result<()> {
    let vendor = Vendor::new("Acme")?;
    let key = Arc::new(vendor.make_key("Acme Key", MODEL_A, None)?);
    let (_d, lab) = lab_trusting(&vendor, &[MODEL_A], "").await?;
    let cfg = lab.agent_config(ALICE, &lab.dir.path().join("unused"), &[])?;
    let authn = hid(&key, Arc::new(NoPrompt))?;
    touchgate_agent::enroll(&cfg, &authn, &lab.invite(ALICE)?).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let answer = get(agent.local_addr("api").expect("api"), "/hw", &[]).await?;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()?["headers"]["x-touchgate-user"], ALICE);
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn key_from_an_unknown_root_is_refused_naming_its_model() -> anyhow::Result<()> {
    let trusted = Vendor::new("Acme")?;
    let forger = Vendor::new("Forgery Inc")?;
    let key = Arc::new(forger.make_key("Fake Acme", MODEL_A, None)?);
    let (_d, lab) = lab_trusting(&trusted, &[MODEL_A], "").await?;
    let cfg = lab.agent_config(ALICE, &lab.dir.path().join("unused"), &[])?;
    let r = refusal(
        touchgate_agent::enroll(&cfg, &hid(&key, Arc::new(NoPrompt))?, &lab.invite(ALICE)?).await,
    );
    assert_eq!(r.code, RefusalCode::AttestationRefused);
    assert!(r.message.contains(&uuid(MODEL_A)), "{}", r.message);
    assert_eq!(lab.audit_events("enrol_refused").len(), 1);
    Ok(())
}

#[tokio::test]
async fn model_outside_the_aaguid_allowlist_is_refused() -> anyhow::Result<()> {
    let vendor = Vendor::new("Acme")?;
    let key = Arc::new(vendor.make_key("Acme Key B", MODEL_B, None)?);
    let allow = format!("allowed_aaguids = [{:?}]", uuid(MODEL_A));
    let (_d, lab) = lab_trusting(&vendor, &[MODEL_A, MODEL_B], &allow).await?;
    let cfg = lab.agent_config(ALICE, &lab.dir.path().join("unused"), &[])?;
    let r = refusal(
        touchgate_agent::enroll(&cfg, &hid(&key, Arc::new(NoPrompt))?, &lab.invite(ALICE)?).await,
    );
    assert_eq!(r.code, RefusalCode::AttestationRefused);
    assert!(
        r.message.contains("allowed models") && r.message.contains(&uuid(MODEL_B)),
        "{}",
        r.message
    );
    Ok(())
}

#[tokio::test]
async fn required_user_verification_uses_the_pin_and_refuses_a_key_that_skips_it()
-> anyhow::Result<()> {
    let vendor = Vendor::new("Acme")?;
    let key = Arc::new(vendor.make_key("Acme Key", MODEL_A, Some("246810"))?);
    let (_d, lab) = lab_trusting(&vendor, &[MODEL_A], "user_verification = \"required\"").await?;
    let cfg = lab.agent_config(ALICE, &lab.dir.path().join("unused"), &[])?;
    let authn = hid(&key, Arc::new(Pin("246810")))?;
    touchgate_agent::enroll(&cfg, &authn, &lab.invite(ALICE)?).await?;
    let agent = RunningAgent::start(cfg.clone(), authn.clone()).await?;
    agent.shutdown().await;

    key.set_drop_uv(true);
    let r = refusal(touchgate_agent::enroll(&cfg, &authn, &lab.invite(ALICE)?).await);
    assert_eq!(r.code, RefusalCode::VerificationFailed);
    assert!(
        r.message.contains("requires user verification"),
        "{}",
        r.message
    );

    // Without a PIN on the key, the agent says what to do before asking the key anything.
    let bare = Arc::new(vendor.make_key("Acme Key (no PIN)", MODEL_A, None)?);
    let err = touchgate_agent::enroll(&cfg, &hid(&bare, Arc::new(NoPrompt))?, &lab.invite(ALICE)?)
        .await
        .expect_err("no PIN set");
    assert!(
        err.to_string()
            .contains("set one with the key vendor's tool"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn unplugging_the_key_ends_the_session_when_the_policy_asks() -> anyhow::Result<()> {
    let vendor = Vendor::new("Acme")?;
    let key = Arc::new(vendor.make_key("Acme Key", MODEL_A, None)?);
    let (_d, lab) = lab_trusting(&vendor, &[MODEL_A], "").await?;
    let mut cfg = lab.agent_config(ALICE, &lab.dir.path().join("unused"), &[])?;
    cfg.lock_on_key_removal = true;
    let authn = hid(&key, Arc::new(NoPrompt))?;
    touchgate_agent::enroll(&cfg, &authn, &lab.invite(ALICE)?).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    key.set_plugged(false);
    wait_for_state(&agent, Duration::from_secs(10), |s| {
        matches!(s, AgentState::KeyRemoved)
    })
    .await?;
    assert!(agent.session().is_none());
    assert!(agent.connection().is_none());
    agent.shutdown().await;
    Ok(())
}

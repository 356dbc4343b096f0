//! Every refusal of the sign-in and stream path: the user gets a precise message, the audit
//! log gets a line with the reason.

use std::time::Duration;

use touchgate_agent::{
    RunningAgent,
    tunnel::{SessionKey, Tunnel, TunnelError, client_endpoint},
};
use touchgate_e2e::{enrolled, soft_authn};
use touchgate_proto::{RefusalCode, ServiceKind};
use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";

fn refusal(r: Result<impl std::fmt::Debug, TunnelError>) -> touchgate_proto::Refusal {
    match r {
        Err(TunnelError::Refused(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn tunnel(
    cfg: &touchgate_agent::AgentConfig,
) -> anyhow::Result<(quinn::Endpoint, Tunnel, SessionKey)> {
    let key = SessionKey::generate()?;
    let endpoint = client_endpoint(cfg, &key)?;
    let t = Tunnel::connect(&endpoint, cfg).await?;
    Ok((endpoint, t, key))
}

fn audited(lab: &Lab, event: &str, outcome: &str) -> usize {
    lab.audit_events(event)
        .iter()
        .filter(|e| e["outcome"] == outcome && e["reason"].as_str().is_some_and(|r| !r.is_empty()))
        .count()
}

#[tokio::test]
async fn unknown_and_forbidden_services_are_refused_on_their_stream_only() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let (_ep, t, _) = tunnel(&cfg).await?;
    let session = t.login(&authn, ALICE, None).await?;
    assert!(
        session
            .services
            .iter()
            .any(|s| s.name == "api" && s.kind == ServiceKind::Http)
    );
    assert!(
        !session.services.iter().any(|s| s.name == "billing"),
        "billing is not offered to alice"
    );

    let r = refusal(t.open_stream("nosuch").await);
    assert_eq!(r.code, RefusalCode::UnknownService);
    assert!(
        r.message.contains("no service named \"nosuch\""),
        "{}",
        r.message
    );

    let r = refusal(t.open_stream("billing").await);
    assert_eq!(r.code, RefusalCode::Forbidden);
    assert!(
        r.message
            .contains("alice@example.com may not use service \"billing\""),
        "{}",
        r.message
    );

    // The connection survives both refusals.
    t.open_stream("echo").await?;
    assert_eq!(audited(&lab, "stream_refused", "unknown_service"), 1);
    assert_eq!(audited(&lab, "stream_refused", "forbidden"), 1);
    Ok(())
}

#[tokio::test]
async fn streams_before_sign_in_are_refused() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, _, _) = enrolled(&lab, ALICE, &[]).await?;
    let (_ep, t, _) = tunnel(&cfg).await?;
    let r = refusal(t.open_stream("api").await);
    assert_eq!(r.code, RefusalCode::Unauthenticated);
    assert_eq!(audited(&lab, "stream_refused", "unauthenticated"), 1);
    Ok(())
}

#[tokio::test]
async fn replayed_assertion_is_refused_on_the_same_and_on_another_connection() -> anyhow::Result<()>
{
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let (_ep, a, _) = tunnel(&cfg).await?;
    let assertion = a.make_assertion(&authn, ALICE, None).await?;
    a.finish_login(assertion.clone()).await?;

    let r = refusal(a.finish_login(assertion.clone()).await);
    assert_eq!(r.code, RefusalCode::ChallengeExpired);
    assert!(r.message.contains("single-use"), "{}", r.message);

    // A thief replays it on their own connection, after asking for a challenge there.
    let (_ep2, b, _) = tunnel(&cfg).await?;
    let _ = b.make_assertion(&authn, ALICE, None).await?;
    let r = refusal(b.finish_login(assertion).await);
    assert_eq!(r.code, RefusalCode::BindingMismatch);
    assert_eq!(audited(&lab, "challenge_refused", "challenge_expired"), 1);
    assert_eq!(audited(&lab, "challenge_refused", "binding_mismatch"), 1);
    Ok(())
}

#[tokio::test]
async fn assertion_made_for_another_connection_is_refused() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let (_ep, a, _) = tunnel(&cfg).await?;
    let (_ep2, b, _) = tunnel(&cfg).await?;
    // Both connections have a live challenge; the key answers a's, which is sent on b.
    let for_a = a.make_assertion(&authn, ALICE, None).await?;
    let _for_b = b.make_assertion(&authn, ALICE, None).await?;
    let r = refusal(b.finish_login(for_a).await);
    assert_eq!(r.code, RefusalCode::BindingMismatch);
    assert!(r.message.contains("another connection"), "{}", r.message);
    assert_eq!(audited(&lab, "challenge_refused", "binding_mismatch"), 1);
    Ok(())
}

#[tokio::test]
async fn wrong_origin_is_refused() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let (_ep, t, _) = tunnel(&cfg).await?;
    let r = refusal(t.login(&authn, ALICE, Some("https://phish.example")).await);
    assert_eq!(r.code, RefusalCode::VerificationFailed);
    assert!(r.message.contains("origin"), "{}", r.message);
    assert_eq!(audited(&lab, "challenge_refused", "verification_failed"), 1);
    Ok(())
}

#[tokio::test]
async fn counter_that_does_not_rise_is_refused_as_a_possible_clone() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, _, key_path) = enrolled(&lab, ALICE, &[]).await?;
    let clone_path = lab.dir.path().join("cloned.softkey");
    std::fs::copy(&key_path, &clone_path)?;

    let (_ep, t, _) = tunnel(&cfg).await?;
    t.login(&soft_authn(&key_path)?, ALICE, None).await?;
    // The clone still has the old counter.
    let (_ep2, t2, _) = tunnel(&cfg).await?;
    let r = refusal(t2.login(&soft_authn(&clone_path)?, ALICE, None).await);
    assert_eq!(r.code, RefusalCode::CounterNotRising);
    assert!(r.message.contains("cloned"), "{}", r.message);
    assert_eq!(audited(&lab, "challenge_refused", "counter_not_rising"), 1);
    Ok(())
}

#[tokio::test]
async fn expired_challenge_is_refused() -> anyhow::Result<()> {
    let mut lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    lab.reconfigure("challenge_ttl = \"1m\"", "challenge_ttl = \"0s\"")
        .await?;
    let (_ep, t, _) = tunnel(&cfg).await?;
    let r = refusal(t.login(&authn, ALICE, None).await);
    assert_eq!(r.code, RefusalCode::ChallengeExpired);
    assert!(r.message.contains("expired"), "{}", r.message);
    assert_eq!(audited(&lab, "challenge_refused", "challenge_expired"), 1);
    Ok(())
}

#[tokio::test]
async fn expired_session_token_is_refused() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, _, _) = enrolled(&lab, ALICE, &[]).await?;
    let (_ep, t, key) = tunnel(&cfg).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let (token, _) =
        lab.gateway
            .signer()
            .issue_session(ALICE, &key.thumbprint(), now - 60, now - 1)?;
    let r = refusal(t.resume(&token).await);
    assert_eq!(r.code, RefusalCode::SessionExpired);
    assert!(r.message.contains("touch your key"), "{}", r.message);
    assert_eq!(audited(&lab, "session_refused", "session_expired"), 1);
    Ok(())
}

#[tokio::test]
async fn token_presented_with_another_session_key_is_refused() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg.clone(), authn).await?;
    let stolen = agent.session().expect("session").token;
    // The thief has the token but not the agent's in-memory key.
    let (_ep, t, _) = tunnel(&cfg).await?;
    let r = refusal(t.resume(&stolen).await);
    assert_eq!(r.code, RefusalCode::WrongSessionKey);
    let r = refusal(t.open_stream("api").await);
    assert_eq!(r.code, RefusalCode::Unauthenticated);
    assert_eq!(audited(&lab, "session_refused", "wrong_session_key"), 1);
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn used_and_expired_invites_are_refused() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let code = lab.invite(ALICE)?;
    touchgate_agent::enroll(&cfg, &authn, &code).await?;
    let r = refusal(touchgate_agent::enroll(&cfg, &authn, &code).await);
    assert_eq!(r.code, RefusalCode::InvalidInvite);
    assert!(r.message.contains("already been used"), "{}", r.message);

    let old = lab.gateway.create_invite_with_ttl(ALICE, Duration::ZERO)?;
    let r = refusal(touchgate_agent::enroll(&cfg, &authn, &old).await);
    assert_eq!(r.code, RefusalCode::InvalidInvite);
    assert!(r.message.contains("expired"), "{}", r.message);
    assert_eq!(audited(&lab, "enrol_refused", "invalid_invite"), 2);
    Ok(())
}

#[tokio::test]
async fn software_key_is_refused_unless_the_policy_allows_it() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions {
        allow_software: false,
        ..Default::default()
    })
    .await?;
    let key_path = lab.dir.path().join("bot.softkey");
    let cfg = lab.agent_config(ALICE, &key_path, &[])?;
    let code = lab.invite(ALICE)?;
    let r = refusal(touchgate_agent::enroll(&cfg, &soft_authn(&key_path)?, &code).await);
    assert_eq!(r.code, RefusalCode::AttestationRefused);
    assert!(
        r.message.contains("does not accept software keys"),
        "{}",
        r.message
    );
    assert_eq!(audited(&lab, "enrol_refused", "attestation_refused"), 1);
    // Nothing was lost: the invite is still usable once the admin allows software keys.
    let mut lab = lab;
    lab.reconfigure("allow_software = false", "allow_software = true")
        .await?;
    touchgate_agent::enroll(&cfg, &soft_authn(&key_path)?, &code).await?;
    Ok(())
}

#[tokio::test]
async fn every_step_of_a_run_is_audited_exactly_once() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let (_ep, t, key) = tunnel(&cfg).await?;
    let assertion = t.make_assertion(&authn, ALICE, None).await?;
    let session = t.finish_login(assertion.clone()).await?;
    let _ = refusal(t.finish_login(assertion).await);
    let _ = refusal(t.open_stream("nosuch").await);
    let _ = refusal(t.open_stream("billing").await);
    let (_ep2, t2, _) = tunnel(&cfg).await?;
    let _ = refusal(t2.resume(&session.token).await);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let (expired, _) =
        lab.gateway
            .signer()
            .issue_session(ALICE, &key.thumbprint(), now - 9, now - 1)?;
    let _ = refusal(t.resume(&expired).await);
    t.open_stream("echo").await?;

    let count = |event: &str| lab.audit_events(event).len();
    let expected = [
        ("invite_created", 1),
        ("enrol_challenge_issued", 1),
        ("invite_used", 1),
        ("challenge_issued", 1),
        ("challenge_verified", 1),
        ("session_issued", 1),
        ("challenge_refused", 1),
        ("stream_refused", 2),
        ("session_refused", 2),
        ("stream_opened", 1),
    ];
    for (event, n) in expected {
        assert_eq!(count(event), n, "{event}");
    }
    // Every refusal carries its reason and outcome.
    for e in lab.audit() {
        let event = e["event"].as_str().unwrap_or_default();
        if event.ends_with("_refused") {
            assert!(e["reason"].as_str().is_some_and(|r| !r.is_empty()), "{e}");
            assert!(e["outcome"].as_str().is_some_and(|o| o != "ok"), "{e}");
        }
    }
    Ok(())
}

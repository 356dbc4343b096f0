//! Leavers: `disable` ends a user's sessions within seconds and refuses sign-in, resume and
//! invites until `enable`; `remove` makes them enrol again. And a peer that only names a user
//! cannot tell whether that user exists.

use std::time::Duration;

use touchgate_agent::tunnel::{SessionKey, Tunnel, TunnelError, client_endpoint};
use touchgate_e2e::enrolled;
use touchgate_gateway::store::Store;
use touchgate_proto::{ClientMsg, RefusalCode, ServerMsg};
use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";

async fn tunnel(cfg: &touchgate_agent::AgentConfig) -> anyhow::Result<(quinn::Endpoint, Tunnel)> {
    let key = SessionKey::generate()?;
    let endpoint = client_endpoint(cfg, &key)?;
    let t = Tunnel::connect(&endpoint, cfg).await?;
    Ok((endpoint, t))
}

fn refusal(r: Result<impl std::fmt::Debug, TunnelError>) -> touchgate_proto::Refusal {
    match r {
        Err(TunnelError::Refused(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_disabled_user_loses_the_session_and_cannot_sign_in_resume_or_enrol_until_enabled()
-> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let key = SessionKey::generate()?;
    let endpoint = client_endpoint(&cfg, &key)?;
    let live = Tunnel::connect(&endpoint, &cfg).await?;
    let session = live.login(&authn, ALICE, None).await?;
    // An invite an admin made earlier, for a second key.
    let invite = lab.invite(ALICE)?;

    // As `touchgate-gateway disable` does, from another process on the same database.
    let store = Store::open(&lab.dir.path().join("gateway.db"))?;
    store.set_disabled(ALICE, true)?;

    let reason = tokio::time::timeout(Duration::from_secs(10), live.connection().closed()).await?;
    assert!(reason.to_string().contains("account disabled"), "{reason}");
    // The same session key cannot bring the session back.
    let again = Tunnel::connect(&endpoint, &cfg).await?;
    let r = refusal(again.resume(&session.token).await);
    assert_eq!(r.code, RefusalCode::AccountDisabled);
    assert!(r.message.contains("ask your admin"), "{}", r.message);
    // A touch does not help either (told only after the key proved itself).
    let r = refusal(again.login(&authn, ALICE, None).await);
    assert_eq!(r.code, RefusalCode::AccountDisabled);
    // Nor the invite made before the disable.
    let second = touchgate_e2e::soft_authn(&lab.dir.path().join("second.softkey"))?;
    let r = refusal(touchgate_agent::enroll(&cfg, &second, &invite).await);
    assert_eq!(r.code, RefusalCode::AccountDisabled);
    assert_eq!(lab.audit_events("session_disabled").len(), 1);

    store.set_disabled(ALICE, false)?;
    let (_ep, t) = tunnel(&cfg).await?;
    assert_eq!(t.login(&authn, ALICE, None).await?.user, ALICE);
    Ok(())
}

#[tokio::test]
async fn a_removed_user_must_enrol_again() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let store = Store::open(&lab.dir.path().join("gateway.db"))?;
    store.remove_user(ALICE)?;
    let (_ep, t) = tunnel(&cfg).await?;
    // The gateway's challenge names a credential that does not exist: the key cannot answer.
    assert!(t.login(&authn, ALICE, None).await.is_err());
    // A new invite brings them back with a fresh enrolment.
    let code = lab.invite(ALICE)?;
    touchgate_agent::enroll(&cfg, &authn, &code).await?;
    let (_ep, t) = tunnel(&cfg).await?;
    assert_eq!(t.login(&authn, ALICE, None).await?.user, ALICE);
    Ok(())
}

#[tokio::test]
async fn a_sign_in_for_an_unknown_user_looks_like_one_for_a_known_user() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, _authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let (_ep, t) = tunnel(&cfg).await?;
    let options = |user: &str| {
        let t = &t;
        let user = user.to_owned();
        async move {
            match t.request(&ClientMsg::LoginBegin { user }).await? {
                ServerMsg::LoginChallenge { options, origin } => {
                    Ok::<_, anyhow::Error>((options, origin))
                }
                other => anyhow::bail!("not a challenge: {other:?}"),
            }
        }
    };
    let (known, known_origin) = options(ALICE).await?;
    let (unknown, unknown_origin) = options("mallory@example.com").await?;
    let (unknown_again, _) = options("mallory@example.com").await?;
    assert_eq!(known_origin, unknown_origin);
    // The same members with the same kinds of values, down to the credential list.
    fn shape(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => m
                .iter()
                .map(|(k, v)| (k.clone(), shape(v)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
            serde_json::Value::Array(a) => a.iter().map(shape).collect(),
            serde_json::Value::String(_) => "string".into(),
            other => other.clone(),
        }
    }
    assert_eq!(shape(&known), shape(&unknown), "{known:#}\n{unknown:#}");
    let creds = |v: &serde_json::Value| v["publicKey"]["allowCredentials"].clone();
    assert_ne!(creds(&known), creds(&unknown));
    // Stable per name, as a real credential list would be.
    assert_eq!(creds(&unknown), creds(&unknown_again));
    assert!(
        lab.audit_events("challenge_refused").is_empty(),
        "{:?}",
        lab.audit()
    );
    Ok(())
}

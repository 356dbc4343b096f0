//! The agent signs only for its own gateway. A gateway that asks the key to sign for another
//! site (a malicious or impersonated gateway relaying a sign-in to github.com or the company's
//! identity provider) is refused before the key is asked for anything.
//!
//! The lab's gateway signs for `localhost`; an agent configured for another relying party or
//! origin sees exactly what it would see from a gateway relaying for that other site.

use std::sync::atomic::Ordering;

use crate::counting_key::counting;
use touchgate_agent::{RunningAgent, agent::AgentError, tunnel::TunnelError};
use touchgate_e2e::enrolled;
use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";

#[tokio::test]
async fn a_gateway_asking_to_sign_for_another_site_gets_no_touch() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, _, key_path) = enrolled(&lab, ALICE, &[]).await?;
    // The lab's gateway and the agent's default agree (its TLS name).
    assert_eq!(cfg.rp_id(), "localhost");

    let (authn, asked) = counting(&key_path)?;
    let mut elsewhere = cfg.clone();
    elsewhere.rp_id = Some("github.com".into());
    elsewhere.origin = Some("https://github.com".into());
    let e = start_error(RunningAgent::start(elsewhere, authn.clone()).await)?;
    assert!(
        matches!(&e, TunnelError::ForeignSite { setting: "rp_id", asked, expected }
            if asked == "localhost" && expected == "github.com"),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("you may be talking to the wrong gateway"),
        "{e}"
    );
    assert_eq!(asked.load(Ordering::SeqCst), 0, "the key was asked");

    // Same relying party, another origin: refused too.
    let mut other_origin = cfg.clone();
    other_origin.origin = Some("https://login.localhost".into());
    let e = start_error(RunningAgent::start(other_origin, authn.clone()).await)?;
    assert!(
        matches!(
            &e,
            TunnelError::ForeignSite {
                setting: "origin",
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(asked.load(Ordering::SeqCst), 0, "the key was asked");

    // An enrolment for another site is refused the same way.
    let code = lab.invite("bob@example.com")?;
    let mut bob = lab.agent_config("bob@example.com", &key_path, &[])?;
    bob.rp_id = Some("github.com".into());
    let e = touchgate_agent::enroll(&bob, &authn, &code)
        .await
        .expect_err("an enrolment for another site");
    assert!(
        matches!(
            &e,
            TunnelError::ForeignSite {
                setting: "rp_id",
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(asked.load(Ordering::SeqCst), 0, "the key was asked");

    // With its own site the same key signs in (one touch).
    let agent = RunningAgent::start(cfg, authn).await?;
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    agent.shutdown().await;
    Ok(())
}

fn start_error(r: Result<RunningAgent, AgentError>) -> anyhow::Result<TunnelError> {
    match r {
        Err(AgentError::Tunnel(e)) => Ok(e),
        Err(other) => anyhow::bail!("expected a tunnel error, got {other}"),
        Ok(_) => anyhow::bail!("the agent signed in for another site"),
    }
}

//! When an admin disables a user, the agent stops: it shows signed out with the gateway's
//! reason, does not reconnect, and asks for no touch, whether it was signed in (the gateway
//! closes its connection) or signs in afterwards (the gateway refuses the sign-in).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use crate::counting_key::counting;
use touchgate_agent::{
    AgentState, RunningAgent,
    agent::{ACCOUNT_DISABLED, AgentError},
};
use touchgate_e2e::{enrolled, wait_for_state};
use touchgate_gateway::store::Store;
use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";

#[tokio::test]
async fn a_disabled_users_agent_stops_without_reconnecting_or_asking_for_a_touch()
-> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, _, key_path) = enrolled(&lab, ALICE, &[]).await?;
    let (authn, asked) = counting(&key_path)?;
    // The CLI's agent, which signs in again by itself when a session ends: not this time.
    let agent = RunningAgent::start(cfg.clone(), authn.clone()).await?;
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    let conn = agent.connection().expect("connected");

    let store = Store::open(&lab.dir.path().join("gateway.db"))?;
    store.set_disabled(ALICE, true)?;

    wait_for_state(&agent, Duration::from_secs(10), |s| {
        matches!(s, AgentState::SignedOut { .. })
    })
    .await?;
    assert_eq!(
        *agent.state().borrow(),
        AgentState::SignedOut {
            reason: ACCOUNT_DISABLED.into()
        }
    );
    assert!(agent.account_disabled());
    assert!(conn.close_reason().is_some());
    assert!(agent.connection().is_none(), "the agent reconnected");
    assert!(agent.session().is_none());
    assert_eq!(asked.load(Ordering::SeqCst), 1, "a touch was asked");
    agent.shutdown().await;

    // A new sign-in is refused with the same words and leaves nothing running.
    match RunningAgent::start(cfg, authn).await {
        Err(AgentError::Tunnel(e)) => {
            assert_eq!(
                touchgate_agent::agent::disabled_reason(&e).as_deref(),
                Some(ACCOUNT_DISABLED),
                "{e}"
            );
        }
        Err(other) => anyhow::bail!("expected the gateway's refusal, got {other}"),
        Ok(_) => anyhow::bail!("a disabled user signed in"),
    }
    Ok(())
}

/// The tray app's and the CLI's core: signed out with the gateway's words, and a notice that
/// says the account is disabled (the CLI stops on it instead of signing in again).
#[tokio::test]
async fn the_controller_shows_a_disabled_account_as_signed_out_with_the_reason()
-> anyhow::Result<()> {
    use touchgate_agent::controller::{Controller, Notice, Phase, Request};
    let lab = Lab::start(LabOptions::default()).await?;
    let (_, _, key_path) = enrolled(&lab, ALICE, &[]).await?;
    let user = lab.dir.path().join("alice.toml");
    std::fs::write(
        &user,
        format!(
            "gateway = \"{}\"\nserver_name = \"localhost\"\ngateway_cert_sha256 = \"{}\"\nuser = \"{ALICE}\"\nauthenticator = \"soft:{}\"\n[[service]]\nname = \"api\"\nlocal_port = 0\n",
            lab.quic_addr,
            lab.fingerprint,
            key_path.display()
        ),
    )?;
    let ui = Arc::new(touchgate_e2e::FakeUi::default());
    let c = Controller::new(
        touchgate_agent::settings::ConfigPaths {
            user,
            managed: None,
        },
        ui.clone(),
    );
    c.handle(Request::SignIn).await?;
    Store::open(&lab.dir.path().join("gateway.db"))?.set_disabled(ALICE, true)?;
    let v = ui
        .wait_for(Duration::from_secs(10), "signed out", |v| {
            matches!(v.phase, Phase::SignedOut { .. })
        })
        .await?;
    assert_eq!(
        v.phase,
        Phase::SignedOut {
            reason: Some(ACCOUNT_DISABLED.into())
        }
    );
    assert!(v.session.is_none());
    assert!(
        ui.notices().contains(&Notice::AccountDisabled {
            reason: ACCOUNT_DISABLED.into()
        }),
        "{:?}",
        ui.notices()
    );
    // Signing in again is refused with the same words, and shows signed out, not an error.
    let e = c.handle(Request::SignIn).await.expect_err("disabled");
    assert_eq!(e.to_string(), ACCOUNT_DISABLED);
    assert_eq!(
        c.view().phase,
        Phase::SignedOut {
            reason: Some(ACCOUNT_DISABLED.into())
        }
    );
    c.shutdown().await;
    Ok(())
}

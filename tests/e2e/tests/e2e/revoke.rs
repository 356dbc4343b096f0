//! `touchgate-gateway revoke USER` ends every session of the user within seconds, from another
//! process on the same database: open connections are closed, the old token is refused, and the
//! next sign-in needs the key again.

use std::time::Duration;

use touchgate_agent::{
    AgentState, RunningAgent,
    tunnel::{SessionKey, Tunnel, TunnelError, client_endpoint},
};
use touchgate_e2e::{enrolled, get, wait_for_state};
use touchgate_gateway::store::Store;
use touchgate_proto::RefusalCode;
use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";

#[tokio::test]
async fn revoking_a_user_closes_their_sessions_and_refuses_their_tokens() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let (bob_cfg, bob_authn, _) = enrolled(&lab, "bob@example.com", &[]).await?;
    let agent = RunningAgent::start(cfg.clone(), authn).await?;
    let bob = RunningAgent::start(bob_cfg, bob_authn).await?;
    let old_token = agent.session().expect("session").token;
    let old_conn = agent.connection().expect("connected");

    // As the `revoke` command does: another handle on the same database.
    let store = Store::open(&lab.dir.path().join("gateway.db"))?;
    assert_eq!(store.revoke_user(ALICE)?, Some(1));

    let reason = tokio::time::timeout(Duration::from_secs(10), old_conn.closed()).await?;
    assert!(reason.to_string().contains("session revoked"), "{reason}");
    // The agent's stored token is refused, so it signs in again with the key (a soft key here).
    // The state channel keeps only the newest value, so wait for a connected state with a new
    // session rather than for each step.
    wait_for_state(&agent, Duration::from_secs(20), |s| {
        matches!(s, AgentState::Connected { .. })
            && agent.session().is_some_and(|s| s.token != old_token)
    })
    .await?;
    assert_ne!(agent.session().expect("new session").token, old_token);
    assert_eq!(
        get(agent.local_addr("api").expect("api"), "/again", &[])
            .await?
            .status,
        200
    );

    // Bob was not touched.
    assert!(bob.connection().is_some_and(|c| c.close_reason().is_none()));
    let revoked = lab.audit_events("session_revoked");
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0]["reason"], "session revoked by an admin");
    let refused = lab.audit_events("session_refused");
    assert!(
        refused.iter().any(|e| e["outcome"] == "session_revoked"),
        "{refused:?}"
    );

    // The old token stays refused on any new connection.
    let key = SessionKey::generate()?;
    let endpoint = client_endpoint(&cfg, &key)?;
    let t = Tunnel::connect(&endpoint, &cfg).await?;
    match t.resume(&old_token).await {
        Err(TunnelError::Refused(r)) => assert!(
            matches!(
                r.code,
                RefusalCode::WrongSessionKey | RefusalCode::SessionRevoked
            ),
            "{r:?}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    agent.shutdown().await;
    bob.shutdown().await;
    Ok(())
}

//! The gateway is unreachable for a while: the agent says it is reconnecting, local
//! connections opened meanwhile wait a bounded time and are closed (never hang), and once the
//! gateway is back new connections work with the same session.

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use touchgate_agent::{AgentState, RunningAgent, agent::LOCAL_WAIT};
use touchgate_e2e::{enrolled, get};
use touchgate_testkit::lab::{Lab, LabOptions};

#[tokio::test]
async fn local_connections_during_an_outage_fail_in_bounded_time_then_work_again()
-> anyhow::Result<()> {
    let mut lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, "alice@example.com", &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").expect("api");
    let mut state = agent.state();

    lab.stop_gateway().await;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            state.changed().await?;
            if matches!(*state.borrow_and_update(), AgentState::Reconnecting { .. }) {
                return Ok::<_, anyhow::Error>(());
            }
        }
    })
    .await??;

    let started = Instant::now();
    let mut local = tokio::net::TcpStream::connect(api).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(
        LOCAL_WAIT + Duration::from_secs(10),
        local.read_to_end(&mut buf),
    )
    .await??;
    let waited = started.elapsed();
    assert!(buf.is_empty(), "no bytes from a dead tunnel");
    assert!(
        waited >= LOCAL_WAIT - Duration::from_secs(1),
        "closed too early: {waited:?}"
    );

    lab.start_gateway().await?;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if matches!(*state.borrow_and_update(), AgentState::Connected { .. }) {
                return Ok::<_, anyhow::Error>(());
            }
            state.changed().await?;
        }
    })
    .await??;
    assert_eq!(get(api, "/back", &[]).await?.status, 200);
    assert_eq!(
        lab.audit_events("challenge_issued").len(),
        1,
        "no new touch"
    );
    agent.shutdown().await;
    Ok(())
}

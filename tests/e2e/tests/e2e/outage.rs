//! The gateway is unreachable for a while: the agent says it is reconnecting, local
//! connections opened meanwhile wait a bounded time and are closed (never hang), and once the
//! gateway is back new connections work with the same session.

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use touchgate_agent::{AgentState, RunningAgent, agent::LOCAL_WAIT};
use touchgate_e2e::{connected_anew, enrolled, get, wait_for_state};
use touchgate_testkit::lab::{Lab, LabOptions};

#[tokio::test]
async fn local_connections_during_an_outage_fail_in_bounded_time_then_work_again()
-> anyhow::Result<()> {
    let mut lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, "alice@example.com", &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").expect("api");

    lab.stop_gateway().await;
    wait_for_state(&agent, Duration::from_secs(30), |s| {
        matches!(s, AgentState::Reconnecting { .. })
    })
    .await?;

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
    wait_for_state(&agent, Duration::from_secs(30), |s| {
        matches!(s, AgentState::Connected { .. })
    })
    .await?;
    assert_eq!(get(api, "/back", &[]).await?.status, 200);
    assert_eq!(
        lab.audit_events("challenge_issued").len(),
        1,
        "no new touch"
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn agent_notices_a_silently_dead_gateway_and_resumes_on_its_successor() -> anyhow::Result<()>
{
    let lab = Lab::start(LabOptions::default()).await?;
    let (mut cfg, authn, _) = enrolled(&lab, "alice@example.com", &[]).await?;
    let relay = touchgate_testkit::relay::UdpRelay::start(lab.quic_addr).await?;
    cfg.gateway = relay.addr.to_string().into();
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").expect("api");
    let old = agent.connection().expect("connected");
    let successor = lab.start_replica("successor").await?;

    // The gateway dies without a word (its CONNECTION_CLOSE is lost), and its address now leads
    // to its successor, as a restart in place or a load balancer moving the address does.
    relay.blackhole(true);
    relay.retarget(successor.quic_addr).await?;
    relay.blackhole(false);
    // The agent's next keep-alive reaches a gateway that does not know the connection; it shares
    // the stateless-reset and connection-ID keys (kept in the database), so it resets the old
    // connection at once instead of leaving the agent to its idle timeout.
    let reason = tokio::time::timeout(Duration::from_secs(60), old.closed()).await?;
    assert_eq!(reason, quinn::ConnectionError::Reset, "{reason}");
    wait_for_state(&agent, Duration::from_secs(30), |s| {
        connected_anew(&agent, s, old.stable_id())
    })
    .await?;
    assert_eq!(get(api, "/after-crash", &[]).await?.status, 200);
    assert_eq!(successor.audit_events("session_resumed").len(), 1);
    assert!(
        successor.audit_events("challenge_issued").is_empty(),
        "no new touch"
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn keep_alives_hold_a_silent_tunnel_open_past_the_idle_timeout() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, "alice@example.com", &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let conn = agent.connection().expect("connected");
    // Silence for longer than the gateway's 15 s QUIC idle timeout (the agent's own is shorter
    // still): only keep-alives cross the tunnel.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    assert_eq!(
        agent.connection().map(|c| c.stable_id()),
        Some(conn.stable_id())
    );
    assert_eq!(
        get(agent.local_addr("api").expect("api"), "/after-silence", &[])
            .await?
            .status,
        200
    );
    agent.shutdown().await;
    Ok(())
}

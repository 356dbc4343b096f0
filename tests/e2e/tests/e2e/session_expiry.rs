//! A session's end holds on open streams: a kept-alive HTTP connection or a long TCP stream
//! does not outlive the session, and a renewal on the live connection moves the deadline so
//! an honest user loses nothing. (The waits here are the scenario — time passing — not
//! synchronisation.)

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use touchgate_agent::{RunningAgent, agent::OnSessionEnd};
use touchgate_e2e::{enrolled, http1};
use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn request(sender: &mut Sender) -> anyhow::Result<u16> {
    let req = hyper::Request::get("/v1/items")
        .header("host", "localhost")
        .body(Empty::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

async fn echo_round(s: &mut tokio::net::TcpStream) -> anyhow::Result<()> {
    s.write_all(b"ping").await?;
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await??;
    anyhow::ensure!(&back == b"ping", "echo answered {back:?}");
    Ok(())
}

async fn started() -> anyhow::Result<(Lab, RunningAgent)> {
    let lab = Lab::start(LabOptions {
        max_age: Duration::from_secs(6),
        ..Default::default()
    })
    .await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start_with(cfg, authn, OnSessionEnd::Stop).await?;
    Ok((lab, agent))
}

/// Uses both connections every 400 ms for `span` (so neither is ever idle), and returns how
/// long after the start the first failure came, if one did.
async fn keep_using(
    http: &mut Sender,
    tcp: &mut tokio::net::TcpStream,
    span: Duration,
) -> Option<Duration> {
    let start = tokio::time::Instant::now();
    while start.elapsed() < span {
        let ok = matches!(request(http).await, Ok(200)) && echo_round(tcp).await.is_ok();
        if !ok {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    None
}

#[tokio::test]
async fn kept_alive_connections_and_tcp_streams_end_with_the_session() -> anyhow::Result<()> {
    let (lab, agent) = started().await?;
    let mut http = http1(agent.local_addr("api").expect("api")).await?;
    let mut tcp = tokio::net::TcpStream::connect(agent.local_addr("echo").expect("echo")).await?;

    // The session (max_age 6 s) started just before; the connections are never idle.
    let failed = keep_using(&mut http, &mut tcp, Duration::from_secs(9)).await;
    let failed = failed.expect("the connections kept working after the session expired");
    assert!(
        failed > Duration::from_secs(4) && failed < Duration::from_millis(7500),
        "the first failure came {failed:?} after the start"
    );
    let ended = lab.audit_events("session_ended");
    assert!(
        ended
            .iter()
            .any(|e| e["outcome"] == "session_expired" && e["user"] == ALICE),
        "{ended:?}"
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_renewal_on_the_live_connection_keeps_open_streams_working() -> anyhow::Result<()> {
    let (lab, agent) = started().await?;
    let mut http = http1(agent.local_addr("api").expect("api")).await?;
    let mut tcp = tokio::net::TcpStream::connect(agent.local_addr("echo").expect("echo")).await?;

    let (used, renewed) = tokio::join!(
        keep_using(&mut http, &mut tcp, Duration::from_millis(7500)),
        async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            agent.renew().await
        }
    );
    renewed?;
    // Past the first session's end (6 s), inside the renewed one (8 to 9 s: expiry is in
    // whole seconds).
    assert_eq!(used, None, "audit: {:#?}", lab.audit());
    assert!(lab.audit_events("session_ended").is_empty());
    agent.shutdown().await;
    Ok(())
}

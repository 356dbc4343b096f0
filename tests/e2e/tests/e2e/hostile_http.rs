//! Hostile HTTP through the tunnel: smuggling attempts, malformed heads, oversized headers and
//! slowloris are each refused or cut off before anything reaches the upstream.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use touchgate_agent::RunningAgent;
use touchgate_e2e::enrolled;
use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";

/// Sends raw bytes on a new connection and returns the status code of the answer (0 when the
/// connection was closed without one).
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> anyhow::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request).await?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    Ok(text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

async fn setup() -> anyhow::Result<(Lab, RunningAgent, std::net::SocketAddr)> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").expect("api");
    Ok((lab, agent, api))
}

#[tokio::test]
async fn smuggling_and_malformed_heads_are_refused_before_the_upstream() -> anyhow::Result<()> {
    let (lab, agent, api) = setup().await?;
    let cases: [(&str, &[u8]); 3] = [
        (
            "obs-fold",
            b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Folded: a\r\n b\r\n\r\n",
        ),
        (
            "bare CR",
            b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Bad: a\rb\r\n\r\n",
        ),
        (
            "two Content-Lengths",
            b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ),
    ];
    for (what, req) in cases {
        let status = raw(api, req).await?;
        assert_eq!(status, 400, "{what}");
    }
    assert_eq!(
        lab.upstream.request_count(),
        0,
        "nothing reached the upstream"
    );

    // Content-Length and Transfer-Encoding together: the chunked framing wins (RFC 9112), the
    // upstream gets one re-framed request, and the connection closes, so the request hidden
    // behind it never reaches the upstream.
    let status = raw(
        api,
        b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await?;
    assert!(status == 200 || status == 400, "status {status}");
    assert!(
        lab.upstream.request_count() <= 1,
        "the smuggled request reached the upstream"
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn oversized_headers_get_431() -> anyhow::Result<()> {
    let (lab, agent, api) = setup().await?;
    let big = format!(
        "GET /x HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    assert_eq!(raw(api, big.as_bytes()).await?, 431);
    assert_eq!(lab.upstream.request_count(), 0);
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn slowloris_is_cut_off_after_the_header_timeout() -> anyhow::Result<()> {
    let (lab, agent, api) = setup().await?;
    let mut s = tokio::net::TcpStream::connect(api).await?;
    s.write_all(b"GET /x HTTP/1.1\r\nHost: localhost\r\n")
        .await?;
    // Never finish the head; the gateway closes the stream after header_read_timeout (2s here).
    let mut buf = Vec::new();
    let done = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf)).await;
    assert!(done.is_ok(), "the connection was not closed");
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert_eq!(lab.upstream.request_count(), 0);
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn sign_in_attempts_are_rate_limited_per_source_address() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions {
        limits: "signin_attempts_per_minute = 3".into(),
        ..Default::default()
    })
    .await?;
    // Enrolment is one attempt; two sign-ins make three; the fourth is refused.
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let key = touchgate_agent::tunnel::SessionKey::generate()?;
    let endpoint = touchgate_agent::tunnel::client_endpoint(&cfg, &key)?;
    let t = touchgate_agent::tunnel::Tunnel::connect(&endpoint, &cfg).await?;
    t.login(&authn, ALICE, None).await?;
    t.login(&authn, ALICE, None).await?;
    match t.login(&authn, ALICE, None).await {
        Err(touchgate_agent::tunnel::TunnelError::Refused(r)) => {
            assert_eq!(r.code, touchgate_proto::RefusalCode::RateLimited);
            assert!(r.message.contains("wait a minute"), "{}", r.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let refused = lab.audit_events("challenge_refused");
    assert!(
        refused.iter().any(|e| e["outcome"] == "rate_limited"),
        "{refused:?}"
    );
    Ok(())
}

#[tokio::test]
async fn new_connections_are_rate_limited_per_source_address() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions {
        limits: "connections_per_minute = 3".into(),
        ..Default::default()
    })
    .await?;
    let cfg = lab.agent_config(ALICE, &lab.dir.path().join("k"), &[])?;
    let key = touchgate_agent::tunnel::SessionKey::generate()?;
    let endpoint = touchgate_agent::tunnel::client_endpoint(&cfg, &key)?;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(touchgate_agent::tunnel::Tunnel::connect(&endpoint, &cfg).await?);
    }
    let err = touchgate_agent::tunnel::Tunnel::connect(&endpoint, &cfg)
        .await
        .err()
        .expect("the fourth connection in a minute is refused");
    assert!(err.to_string().contains("refused"), "{err}");
    let refused = lab.audit_events("connection_refused");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["outcome"], "rate_limited");
    Ok(())
}

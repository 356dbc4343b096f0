//! Nothing a peer without a session sends can exhaust the gateway or lock a user out: streams
//! before sign-in cost a few bytes each, control frames are small, a connection that never
//! signs in is closed, sign-in floods in someone's name count against the flooder, and
//! refusal lines are rate-limited per source.

use std::{sync::Arc, time::Duration};

use touchgate_agent::tunnel::{SessionKey, Tunnel, TunnelError, client_endpoint};
use touchgate_e2e::enrolled;
use touchgate_proto::{ClientMsg, RefusalCode, ServerMsg};
use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";

/// A tunnel whose UDP socket is bound to `source` (another loopback address is another peer
/// to the gateway).
async fn tunnel_from(
    cfg: &touchgate_agent::AgentConfig,
    source: &str,
) -> anyhow::Result<(quinn::Endpoint, Tunnel)> {
    let key = SessionKey::generate()?;
    let endpoint = client_endpoint(cfg, &key)?;
    endpoint.rebind(std::net::UdpSocket::bind((source, 0))?)?;
    let t = Tunnel::connect(&endpoint, cfg).await?;
    Ok((endpoint, t))
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn thousands_of_streams_announcing_large_frames_before_sign_in_cost_almost_nothing()
-> anyhow::Result<()> {
    // Measures the process's memory: alone in its process (see `alone`).
    if let Some(alone) = crate::alone::unless_alone(
        "pre_sign_in::thousands_of_streams_announcing_large_frames_before_sign_in_cost_almost_nothing",
    ) {
        return alone;
    }
    let lab = Lab::start(LabOptions::default()).await?;
    let cfg = lab.agent_config(ALICE, &lab.dir.path().join("k"), &[])?;
    let (_ep, t) = tunnel_from(&cfg, "127.0.0.1").await?;
    let conn = t.connection().clone();
    let before = rss_kib();
    // Each stream announces a 64 KiB header frame and sends 16 KiB of it, then waits.
    let chunk: Arc<Vec<u8>> = Arc::new(
        [
            &(64u32 * 1024).to_be_bytes()[..],
            &vec![b'x'; 16 * 1024 - 4],
        ]
        .concat(),
    );
    let mut tasks = Vec::new();
    for _ in 0..4096 {
        let conn = conn.clone();
        let chunk = chunk.clone();
        tasks.push(tokio::spawn(async move {
            let (mut send, recv) = tokio::time::timeout(Duration::from_secs(3), conn.open_bi())
                .await
                .ok()?
                .ok()?;
            let _ = tokio::time::timeout(Duration::from_secs(3), send.write_all(&chunk)).await;
            Some((send, recv))
        }));
    }
    let mut open = Vec::new();
    for t in tasks {
        if let Some(s) = t.await? {
            open.push(s);
        }
    }
    // The gateway grants a peer without a session a few streams and a small window: the
    // rest of the 4,096 could not even be opened.
    assert!(
        open.len() < 16,
        "{} streams were opened before sign-in",
        open.len()
    );
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "the process grew by {grown} KiB with 4,096 hostile streams tried (64 MiB would be \
         held if the gateway took them all and read their headers)"
    );
    // The connection itself is fine, and refusals were logged at most 20 a minute.
    assert!(conn.close_reason().is_none());
    let refused = lab.audit_events("stream_refused");
    assert_eq!(refused.len(), open.len(), "{refused:?}");
    drop(open);
    Ok(())
}

#[tokio::test]
async fn a_large_control_frame_before_sign_in_is_refused() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let cfg = lab.agent_config(ALICE, &lab.dir.path().join("k"), &[])?;
    let (_ep, t) = tunnel_from(&cfg, "127.0.0.1").await?;
    let big = ClientMsg::EnrollBegin {
        user: ALICE.into(),
        invite_code: "x".repeat(20 * 1024),
        software_ca_pem: None,
    };
    match t.request(&big).await {
        Err(TunnelError::Refused(r)) => {
            assert_eq!(r.code, RefusalCode::BadRequest);
            assert!(r.message.contains("16384"), "{}", r.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_connection_that_never_signs_in_is_closed_at_the_deadline() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions {
        limits: "signin_deadline = \"1s\"".into(),
        ..Default::default()
    })
    .await?;
    let cfg = lab.agent_config(ALICE, &lab.dir.path().join("k"), &[])?;
    let (_ep, t) = tunnel_from(&cfg, "127.0.0.1").await?;
    // The tunnel uses streams only: the gateway takes no datagrams to buffer.
    assert_eq!(t.connection().max_datagram_size(), None);
    let reason = tokio::time::timeout(Duration::from_secs(10), t.connection().closed()).await?;
    assert!(
        reason.to_string().contains("no sign-in within 1s"),
        "{reason}"
    );
    let closed = lab.audit_events("connection_closed");
    assert_eq!(closed.len(), 1, "{closed:?}");
    Ok(())
}

#[tokio::test]
async fn a_sign_in_flood_in_alices_name_from_elsewhere_does_not_lock_her_out() -> anyhow::Result<()>
{
    let lab = Lab::start(LabOptions {
        limits: "signin_attempts_per_minute = 5".into(),
        ..Default::default()
    })
    .await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    // The attacker asks for alice's challenges and answers them with garbage, from another
    // address, until the gateway stops answering them.
    let (_ep, attacker) = tunnel_from(&cfg, "127.0.0.2").await?;
    let mut limited = false;
    for _ in 0..20 {
        let begin = attacker
            .request(&ClientMsg::LoginBegin { user: ALICE.into() })
            .await;
        match begin {
            Ok(ServerMsg::LoginChallenge { .. }) => {
                let _ = attacker
                    .request(&ClientMsg::LoginFinish {
                        credential: serde_json::json!({"id": "AAAA", "garbage": true}),
                    })
                    .await;
            }
            Err(TunnelError::Refused(r)) if r.code == RefusalCode::RateLimited => {
                assert!(r.message.contains("127.0.0.2"), "{}", r.message);
                limited = true;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(limited, "the flood was never limited");
    // Alice, from her own address, signs in at once.
    let (_ep, t) = tunnel_from(&cfg, "127.0.0.1").await?;
    let session = t.login(&authn, ALICE, None).await?;
    assert_eq!(session.user, ALICE);
    Ok(())
}

#[tokio::test]
async fn a_user_name_that_is_too_long_is_refused_and_logged_escaped() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let cfg = lab.agent_config(ALICE, &lab.dir.path().join("k"), &[])?;
    let (_ep, t) = tunnel_from(&cfg, "127.0.0.1").await?;
    let long = format!("evil\n{{\"event\":\"forged\"}}{}", "a".repeat(10_000));
    match t.request(&ClientMsg::LoginBegin { user: long }).await {
        Err(TunnelError::Refused(r)) => assert_eq!(r.code, RefusalCode::BadRequest),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let refused = lab.audit_events("challenge_refused");
    assert_eq!(refused.len(), 1);
    let user = refused[0]["user"].as_str().unwrap_or_default();
    assert!(user.len() < 120 && !user.contains('\n'), "{user}");
    assert!(lab.audit_events("forged").is_empty());
    Ok(())
}

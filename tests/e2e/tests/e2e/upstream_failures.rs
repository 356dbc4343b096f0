//! Upstream failures: the caller gets a 502 or 504 with a short plain-text reason, the audit log
//! records it, and other services are unaffected.

use touchgate_agent::RunningAgent;
use touchgate_e2e::{enrolled, get};
use touchgate_proto::RefusalCode;
use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";

#[tokio::test]
async fn unreachable_slow_and_healthy_upstreams_each_get_the_right_answer() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &["down", "slow", "reset"]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;

    let reset = get(agent.local_addr("reset").expect("reset"), "/x", &[]).await?;
    assert_eq!(reset.status, 502);
    let text = String::from_utf8_lossy(&reset.body);
    assert!(
        text.starts_with("touchgate: service reset is unreachable"),
        "{text}"
    );

    let down = get(agent.local_addr("down").expect("down"), "/x", &[]).await?;
    assert_eq!(down.status, 502);
    let text = String::from_utf8_lossy(&down.body);
    assert!(
        text.starts_with("touchgate: service down is unreachable"),
        "{text}"
    );

    let slow = get(
        agent.local_addr("slow").expect("slow"),
        "/slow?ms=5000",
        &[],
    )
    .await?;
    assert_eq!(slow.status, 504);
    let text = String::from_utf8_lossy(&slow.body);
    assert!(text.contains("did not answer within 300ms"), "{text}");

    // The same upstream answers in time on a path that is not slow, and other services work.
    assert_eq!(
        get(agent.local_addr("slow").expect("slow"), "/fast", &[])
            .await?
            .status,
        200
    );
    assert_eq!(
        get(agent.local_addr("api").expect("api"), "/ok", &[])
            .await?
            .status,
        200
    );

    let errors = lab.audit_events("upstream_error");
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e["service"] == "reset" && e["outcome"] == "502")
    );
    assert!(
        errors
            .iter()
            .any(|e| e["service"] == "down" && e["outcome"] == "502")
    );
    assert!(
        errors
            .iter()
            .any(|e| e["service"] == "slow" && e["outcome"] == "504")
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn unreachable_tcp_upstream_is_refused_on_the_stream() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let key = touchgate_agent::tunnel::SessionKey::generate()?;
    let endpoint = touchgate_agent::tunnel::client_endpoint(&cfg, &key)?;
    let t = touchgate_agent::tunnel::Tunnel::connect(&endpoint, &cfg).await?;
    t.login(&authn, ALICE, None).await?;
    match t.open_stream("down-tcp").await {
        Err(touchgate_agent::tunnel::TunnelError::Refused(r)) => {
            assert_eq!(r.code, RefusalCode::UpstreamUnavailable);
            assert!(
                r.message.contains("down-tcp is unreachable"),
                "{}",
                r.message
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    t.open_stream("echo").await?;
    assert_eq!(lab.audit_events("stream_refused").len(), 1);
    Ok(())
}

//! The data path end to end: local port → QUIC tunnel → gateway → Cloud-Run-like upstream.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use touchgate_agent::RunningAgent;
use touchgate_e2e::{connected_anew, enrolled, get, wait_for_state};
use touchgate_testkit::{
    lab::{API_AUDIENCE, Lab, LabOptions},
    verify_id_token,
};

const ALICE: &str = "alice@example.com";

#[tokio::test]
async fn request_reaches_cloud_run_with_id_token_and_gateway_identity_headers() -> anyhow::Result<()>
{
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").expect("api listener");

    let answer = get(
        api,
        "/v1/items?limit=2",
        &[
            ("authorization", "Bearer callers-own-token"),
            ("x-serverless-authorization", "Bearer forged"),
            ("x-touchgate-user", "root@example.com"),
            ("x-touchgate-assertion", "forged"),
        ],
    )
    .await?;

    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let echo = answer.json()?;
    assert_eq!(echo["path"], "/v1/items");
    assert_eq!(echo["id_token"]["aud"], API_AUDIENCE);
    let h = &echo["headers"];
    assert_eq!(h["authorization"], "Bearer callers-own-token");
    assert_eq!(h["x-touchgate-user"], ALICE);
    let id_token = h["x-serverless-authorization"]
        .as_str()
        .and_then(|v| v.strip_prefix("Bearer "))
        .expect("id token");
    assert_eq!(
        verify_id_token(id_token, API_AUDIENCE)
            .map_err(anyhow::Error::msg)?
            .aud,
        API_AUDIENCE
    );

    // The identity assertion verifies with the gateway's published keys, and names alice.
    let assertion = h["x-touchgate-assertion"].as_str().expect("assertion");
    let jwks = get(lab.admin_addr, "/.well-known/jwks.json", &[])
        .await?
        .json()?;
    let jwk = &jwks["keys"][0];
    let key = jsonwebtoken::DecodingKey::from_ec_components(
        jwk["x"].as_str().expect("x"),
        jwk["y"].as_str().expect("y"),
    )?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&[API_AUDIENCE]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(assertion, &key, &v)?.claims;
    assert_eq!(claims["sub"], ALICE);
    assert_eq!(claims["svc"], "api");

    // Session and stream are in the audit log.
    assert_eq!(lab.audit_events("session_issued").len(), 1);
    assert_eq!(lab.audit_events("stream_opened")[0]["service"], "api");
    let health = get(lab.admin_addr, "/healthz", &[]).await?;
    assert_eq!(health.status, 200);
    let metrics = String::from_utf8(get(lab.admin_addr, "/metrics", &[]).await?.body.to_vec())?;
    assert!(
        metrics.contains("touchgate_sessions_issued_total 1"),
        "{metrics}"
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn tcp_service_is_spliced_byte_for_byte() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let mut s = tokio::net::TcpStream::connect(agent.local_addr("echo").expect("echo")).await?;
    s.write_all(b"ping over raw tcp").await?;
    let mut buf = [0u8; 17];
    s.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"ping over raw tcp");
    drop(s);
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn two_hundred_concurrent_local_connections_are_each_answered() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").expect("api");
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(200));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = touchgate_e2e::http1(api).await?;
            // All 200 connections are open before any request is sent.
            barrier.wait().await;
            let req = hyper::Request::get(format!("/item/{i}"))
                .header("host", "localhost")
                .body(http_body_util::Empty::<Bytes>::new())?;
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let body: serde_json::Value =
                serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())?;
            anyhow::ensure!(status == 200, "request {i}: HTTP {status}");
            anyhow::ensure!(
                body["path"] == format!("/item/{i}"),
                "request {i} got {body}"
            );
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    assert_eq!(lab.audit_events("stream_opened").len(), 200);
    // 200 requests for one audience share one ID token fetch (single flight, then cached).
    assert_eq!(lab.metadata.request_count(), 1);
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn websocket_style_upgrade_passes_through() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let stream = tokio::net::TcpStream::connect(agent.local_addr("api").expect("api")).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn.with_upgrades());
    let req = hyper::Request::get("/ws")
        .header("host", "localhost")
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(http_body_util::Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    assert_eq!(resp.status(), 101);
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await?);
    io.write_all(b"hello through the upgrade").await?;
    let mut buf = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(10), io.read_exact(&mut buf)).await??;
    assert_eq!(&buf, b"hello through the upgrade");
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn agent_reconnects_after_gateway_restart_without_a_new_touch() -> anyhow::Result<()> {
    let mut lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").expect("api");
    assert_eq!(get(api, "/before", &[]).await?.status, 200);
    let old = agent.connection().expect("connected").stable_id();

    lab.restart_gateway().await?;

    wait_for_state(&agent, Duration::from_secs(30), |s| {
        connected_anew(&agent, s, old)
    })
    .await?;
    let after = get(api, "/after", &[]).await?;
    assert_eq!(after.status, 200);
    assert_eq!(lab.audit_events("session_resumed").len(), 1);
    assert_eq!(
        lab.audit_events("challenge_issued").len(),
        1,
        "no second touch"
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn h2_with_prior_knowledge_is_served_on_the_tunnel_stream() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let stream = tokio::net::TcpStream::connect(agent.local_addr("api").expect("api")).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut answers = Vec::new();
    for i in 0..3 {
        let req = hyper::Request::get(format!("http://localhost/h2/{i}"))
            .header("authorization", "Bearer mine")
            .body(http_body_util::Empty::<Bytes>::new())?;
        answers.push(sender.send_request(req));
    }
    for (i, a) in answers.into_iter().enumerate() {
        let resp = a.await?;
        assert_eq!(resp.status(), 200);
        let v: serde_json::Value =
            serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())?;
        assert_eq!(v["path"], format!("/h2/{i}"));
        assert_eq!(v["headers"]["authorization"], "Bearer mine");
    }
    // Three multiplexed h2 requests, one tunnel stream.
    assert_eq!(lab.audit_events("stream_opened").len(), 1);
    agent.shutdown().await;
    Ok(())
}

/// Waits until the gateway has no data stream open (the last one's upstream connection is then
/// back in the idle set).
async fn streams_closed(lab: &Lab) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    for _ in 0..200 {
        if lab.gateway.metrics().streams_open.load(Relaxed) == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("streams still open after 2s")
}

#[tokio::test]
async fn new_local_connections_reuse_one_upstream_connection() -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").expect("api listener");
    let opened = || {
        lab.gateway
            .metrics()
            .upstream_connections_total
            .load(Relaxed)
    };
    for i in 0..5 {
        let answer = get(api, &format!("/n/{i}"), &[]).await?;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        streams_closed(&lab).await?;
    }
    // Five streams one after another: the first opened one upstream connection for itself and
    // one spare for the next stream; then each hands its connection on.
    assert_eq!(opened(), 2);
    // Two at once (each answered after 200 ms) take both; taking the last opens a new spare.
    let (a, b) = tokio::join!(get(api, "/slow?ms=200", &[]), get(api, "/slow?ms=200", &[]));
    assert_eq!((a?.status, b?.status), (200, 200));
    assert_eq!(opened(), 3);
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_upstream_that_drops_each_connection_still_answers_every_request() -> anyhow::Result<()>
{
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &["oneshot"]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let addr = agent.local_addr("oneshot").expect("oneshot listener");
    // New local connections, each after the upstream dropped the previous one's connection.
    for _ in 0..3 {
        let answer = get(addr, "/", &[]).await?;
        assert_eq!((answer.status, &answer.body[..]), (200, &b"oneshot"[..]));
        streams_closed(&lab).await?;
    }
    // Several requests on one keep-alive local connection: each goes out on a fresh upstream
    // connection once the last one is gone.
    let mut sender = touchgate_e2e::http1(addr).await?;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let resp = sender
            .send_request(
                hyper::Request::get("/")
                    .header("host", "localhost")
                    .body(http_body_util::Empty::<Bytes>::new())?,
            )
            .await?;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            &resp.into_body().collect().await?.to_bytes()[..],
            b"oneshot"
        );
    }
    assert!(lab.audit_events("upstream_error").is_empty());
    agent.shutdown().await;
    Ok(())
}

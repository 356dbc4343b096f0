//! Every request in the audit log, traced to the security key behind it: one `request` line
//! per HTTP request (HTTP/1.1, h2, an upgraded connection) with the user, the credential and
//! its model, method, path, status, bytes and duration; the credential on sign-in and stream
//! lines too; `[audit] query` and `[audit] requests` as configured.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use touchgate_agent::RunningAgent;
use touchgate_e2e::{enrolled, get, http2, request};
use touchgate_gateway::store::Store;
use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";
/// The software key's AAGUID, as the gateway records it.
const SOFT_AAGUID: &str = "0fb9bcbc-a0d4-4042-bbb0-559bc1631e28";

async fn lab_with(tables: &str) -> anyhow::Result<(Lab, RunningAgent, String)> {
    let lab = Lab::start(LabOptions {
        tables: tables.into(),
        ..LabOptions::default()
    })
    .await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let store = Store::open(&lab.dir.path().join("gateway.db"))?;
    let creds = store.credentials(ALICE)?;
    assert_eq!(creds.len(), 1);
    Ok((lab, agent, creds[0].cred_id.clone()))
}

/// The request lines, once `n` are written (a line is written when its answer's body has
/// gone out, which may be a moment after the client read it).
async fn request_lines(lab: &Lab, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..100 {
        let lines = lab.audit_events("request");
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lab.audit_events("request")
}

#[tokio::test]
async fn each_http_request_is_one_line_naming_the_user_and_the_key() -> anyhow::Result<()> {
    let (lab, agent, cred) = lab_with("").await?;
    let api = agent.local_addr("api").expect("api");

    let a = get(api, "/v1/items?token=secret-in-query", &[]).await?;
    assert_eq!(a.status, 200);
    // A POST with a body: bytes up are the body's.
    let mut sender = touchgate_e2e::http1(api).await?;
    let body = vec![7u8; 100_000];
    let req = hyper::Request::post("/upload")
        .header("host", "localhost")
        .body(Full::new(Bytes::from(body)))?;
    let resp = sender.send_request(req).await?;
    assert_eq!(resp.status(), 200);
    let answer = resp.into_body().collect().await?.to_bytes();
    // A request the gateway answers itself (a page of another site) has its line too.
    let refused = request(
        api,
        "DELETE",
        "/v1/items/7",
        "localhost",
        &[("origin", "https://evil.example")],
    )
    .await?;
    assert_eq!(refused.status, 403);

    let lines = request_lines(&lab, 3).await;
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["user"], ALICE);
        assert_eq!(l["service"], "api");
        assert_eq!(l["credential"], cred.as_str());
        assert_eq!(l["aaguid"], SOFT_AAGUID);
        assert_eq!(l["model"], "software key");
        assert_eq!(l["granted_by"], "everyone");
        assert!(l["session"].as_str().is_some_and(|s| !s.is_empty()), "{l}");
        assert!(l["duration_ms"].as_u64().is_some(), "{l}");
        assert!(l.get("delegate").is_none(), "{l}");
    }
    let get_line = &lines[0];
    assert_eq!(get_line["method"], "GET");
    // The query string is dropped by default: it may carry a secret.
    assert_eq!(get_line["path"], "/v1/items");
    assert!(!serde_json::to_string(&lines)?.contains("secret-in-query"));
    assert_eq!(get_line["status"], 200);
    assert_eq!(get_line["bytes_down"], a.body.len() as u64);
    assert_eq!(get_line["outcome"], "ok");
    let post = &lines[1];
    assert_eq!(
        (post["method"].as_str(), post["path"].as_str()),
        (Some("POST"), Some("/upload"))
    );
    assert_eq!(post["bytes_up"], 100_000);
    assert_eq!(post["bytes_down"], answer.len() as u64);
    assert_eq!(lines[2]["method"], "DELETE");
    assert_eq!(lines[2]["status"], 403);
    assert_eq!(lines[2]["bytes_down"], refused.body.len() as u64);

    // The sign-in and the stream name the same key.
    let signed_in = lab.audit_events("challenge_verified");
    assert_eq!(signed_in[0]["credential"], cred.as_str());
    assert_eq!(signed_in[0]["model"], "software key");
    assert_eq!(
        lab.audit_events("session_issued")[0]["credential"],
        cred.as_str()
    );
    let opened = lab.audit_events("stream_opened");
    assert!(opened.iter().all(|l| l["credential"] == cred.as_str()));
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn h2_requests_on_one_connection_are_a_line_each() -> anyhow::Result<()> {
    let (lab, agent, cred) = lab_with("").await?;
    let api = agent.local_addr("api").expect("api");
    let mut sender = http2::<http_body_util::Empty<Bytes>>(api).await?;
    for i in 0..5 {
        let req = hyper::Request::get(format!("http://localhost/h2/{i}"))
            .body(http_body_util::Empty::new())?;
        let resp = sender.send_request(req).await?;
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await?;
    }
    let lines = request_lines(&lab, 5).await;
    let paths: Vec<_> = lines.iter().map(|l| l["path"].as_str()).collect();
    assert_eq!(
        paths,
        (0..5)
            .map(|i| format!("/h2/{i}"))
            .collect::<Vec<_>>()
            .iter()
            .map(|p| Some(p.as_str()))
            .collect::<Vec<_>>()
    );
    assert!(lines.iter().all(|l| l["credential"] == cred.as_str()
        && l["status"] == 200
        && l["bytes_down"].as_u64().unwrap_or(0) > 0));
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_upgraded_connection_is_one_line_written_when_it_closes() -> anyhow::Result<()> {
    let (lab, agent, cred) = lab_with("").await?;
    let api = agent.local_addr("api").expect("api");
    let mut s = tokio::net::TcpStream::connect(api).await?;
    s.write_all(
        format!(
            "GET /ws?room=1 HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n",
            api.port()
        )
        .as_bytes(),
    )
    .await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    for _ in 0..10 {
        s.write_all(b"0123456789").await?;
        let mut back = [0u8; 10];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back)).await??;
        assert_eq!(&back, b"0123456789");
    }
    // Open, the connection has no line yet: it is written with the whole exchange's bytes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(lab.audit_events("request").is_empty());
    s.shutdown().await?;
    drop(s);

    let lines = request_lines(&lab, 1).await;
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let l = &lines[0];
    assert_eq!(l["status"], 101);
    assert_eq!(l["path"], "/ws");
    assert_eq!(l["credential"], cred.as_str());
    assert_eq!(
        (l["bytes_up"].as_u64(), l["bytes_down"].as_u64()),
        (Some(100), Some(100))
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_query_is_kept_only_when_configured_and_lines_can_be_turned_off() -> anyhow::Result<()>
{
    let (lab, agent, _) = lab_with("[audit]\nquery = true\n").await?;
    let api = agent.local_addr("api").expect("api");
    assert_eq!(get(api, "/search?q=touch", &[]).await?.status, 200);
    let lines = request_lines(&lab, 1).await;
    assert_eq!(lines[0]["path"], "/search?q=touch");
    agent.shutdown().await;
    drop(lab);

    let (lab, agent, cred) = lab_with("[audit]\nrequests = false\n").await?;
    let api = agent.local_addr("api").expect("api");
    for _ in 0..3 {
        assert_eq!(get(api, "/v1/items", &[]).await?.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(lab.audit_events("request").is_empty());
    // Streams and sign-ins are audited either way, with the key.
    let closed = lab.audit_events("stream_closed");
    assert!(!closed.is_empty());
    assert!(closed.iter().all(|l| l["credential"] == cred.as_str()));
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_websocket_is_one_line_with_the_whole_conversations_bytes() -> anyhow::Result<()> {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest as _};
    let (lab, agent, cred) = lab_with("").await?;
    let api = agent.local_addr("api").expect("api");
    // The app's own page talking to its WebSocket: same origin, as a browser would send it.
    let mut req = format!("ws://{api}/app/ws").into_client_request()?;
    req.headers_mut()
        .insert("origin", format!("http://{api}").parse()?);
    let (mut ws, resp) =
        tokio_tungstenite::client_async(req, tokio::net::TcpStream::connect(api).await?).await?;
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello from a tool")).await?;
    let heard = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await?
        .expect("a message")?;
    assert_eq!(heard.into_text()?.as_str(), "heard you");
    drop(ws);

    let lines = request_lines(&lab, 1).await;
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let l = &lines[0];
    assert_eq!(
        (l["method"].as_str(), l["path"].as_str()),
        (Some("GET"), Some("/app/ws"))
    );
    assert_eq!(l["status"], 101);
    assert_eq!(l["credential"], cred.as_str());
    // The client's masked frame went up, the app's answer came down.
    assert!(l["bytes_up"].as_u64().is_some_and(|n| n >= 17 + 6), "{l}");
    assert_eq!(l["bytes_down"], 2 + 9);
    agent.shutdown().await;
    Ok(())
}

//! The by-name port (`router_port`): every web service at `http://NAME.localhost:PORT/` on one
//! port, beside the per-service ports. Two services by name, an unknown name (the list), a
//! rebinding name, a keep-alive connection that switches names, origins by name, an upgrade
//! and a WebSocket by name, and curl by name.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use touchgate_agent::RunningAgent;
use touchgate_e2e::{enrolled, http1, request};
use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";

/// The lab, and alice's agent with the by-name port on a free port.
async fn agent_by_name(lab: &Lab) -> anyhow::Result<(RunningAgent, std::net::SocketAddr)> {
    let (mut cfg, authn, _) = enrolled(lab, ALICE, &[]).await?;
    cfg.router_port = Some(0);
    let agent = RunningAgent::start(cfg, authn).await?;
    let router = agent.router_addr().expect("the by-name port is on");
    Ok((agent, router))
}

#[tokio::test]
async fn services_answer_by_name_on_one_port_and_other_names_get_the_list() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (agent, router) = agent_by_name(&lab).await?;
    let port = router.port();

    // Two services by name: `api` is configured with a port of its own, `slow` is not (the
    // by-name port serves every web service the gateway offers).
    for name in ["api", "slow"] {
        let a = request(
            router,
            "GET",
            "/hello",
            &format!("{name}.localhost:{port}"),
            &[],
        )
        .await?;
        assert_eq!(
            a.status,
            200,
            "{name}: {}",
            String::from_utf8_lossy(&a.body)
        );
        let echo = a.json()?;
        assert_eq!(echo["path"], "/hello");
        assert_eq!(echo["headers"]["x-touchgate-user"], ALICE);
    }
    let opened: Vec<_> = lab
        .audit_events("stream_opened")
        .iter()
        .map(|e| e["service"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(opened, ["api", "slow"]);

    // An unknown name, the bare port and a TCP service's name: the agent's own list.
    let before = lab.upstream.request_count();
    let unknown = request(router, "GET", "/", &format!("nope.localhost:{port}"), &[]).await?;
    let text = String::from_utf8_lossy(&unknown.body);
    assert_eq!(unknown.status, 404, "{text}");
    assert!(
        text.contains("there is no web service named nope"),
        "{text}"
    );
    for listed in [
        format!("api: http://api.localhost:{port}/"),
        format!("slow: http://slow.localhost:{port}/"),
    ] {
        assert!(text.contains(&listed), "{listed} missing from\n{text}");
    }
    let tcp = request(
        router,
        "GET",
        "/",
        &format!("down-tcp.localhost:{port}"),
        &[],
    )
    .await?;
    let text = String::from_utf8_lossy(&tcp.body);
    assert_eq!(tcp.status, 404, "{text}");
    assert!(text.contains("down-tcp is a TCP service"), "{text}");
    let html = request(
        router,
        "GET",
        "/",
        &format!("localhost:{port}"),
        &[("accept", "text/html")],
    )
    .await?;
    let page = String::from_utf8_lossy(&html.body);
    assert_eq!(html.status, 200, "{page}");
    assert!(
        page.contains(&format!("<a href=\"http://api.localhost:{port}/\">api</a>")),
        "{page}"
    );

    // DNS rebinding: another site's name pointed here gets neither a service nor the list.
    let rebound = request(router, "GET", "/", &format!("attacker.example:{port}"), &[]).await?;
    let text = String::from_utf8_lossy(&rebound.body);
    assert_eq!(rebound.status, 403, "{text}");
    assert!(!text.contains("api"), "{text}");
    assert_eq!(
        lab.upstream.request_count(),
        before,
        "the agent answered these itself"
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_connection_stays_with_the_name_it_was_opened_for() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (agent, router) = agent_by_name(&lab).await?;
    let port = router.port();
    let mut sender = http1(router).await?;
    let get = |host: String| {
        hyper::Request::get("/again")
            .header("host", host)
            .body(Empty::<Bytes>::new())
    };
    let first = sender
        .send_request(get(format!("api.localhost:{port}"))?)
        .await?;
    assert_eq!(first.status(), 200);
    first.into_body().collect().await?;
    let before = lab.upstream.request_count();
    // Another name on the same keep-alive connection would reach `api` under the wrong name.
    let second = sender
        .send_request(get(format!("slow.localhost:{port}"))?)
        .await?;
    let status = second.status();
    let body = second.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("opened for api.localhost"), "{text}");
    assert_eq!(lab.upstream.request_count(), before);
    assert!(
        lab.audit_events("browser_request_refused")
            .iter()
            .any(|e| e["service"] == "api"),
        "{:?}",
        lab.audit()
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn origins_by_name_are_each_services_own() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (agent, router) = agent_by_name(&lab).await?;
    let port = router.port();
    let host = format!("api.localhost:{port}");
    // A page of `api` itself, opened by name: same-origin, and the app sees its own origin.
    let own = format!("http://api.localhost:{port}");
    let a = request(
        router,
        "POST",
        "/form",
        &host,
        &[("origin", &own), ("sec-fetch-site", "same-origin")],
    )
    .await?;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let echo = a.json()?;
    let upstream = lab.upstream.url();
    assert_eq!(
        echo["headers"]["origin"],
        upstream.trim_end_matches('/'),
        "{echo}"
    );
    // A page of another service by name, or of the list, is another site.
    for other in [
        format!("http://slow.localhost:{port}"),
        format!("http://127.0.0.1:{port}"),
    ] {
        let a = request(router, "POST", "/form", &host, &[("origin", &other)]).await?;
        assert_eq!(
            a.status,
            403,
            "{other}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    // A redirect to the upstream's own URL comes back to the name the caller used.
    let mut sender = http1(router).await?;
    let r = sender
        .send_request(
            hyper::Request::get("/redirect")
                .header("host", &host)
                .body(Empty::<Bytes>::new())?,
        )
        .await?;
    assert!(r.status().is_redirection(), "{}", r.status());
    let location = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(location.starts_with(&format!("{own}/")), "{location}");
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_upgrade_by_name_passes_through() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (agent, router) = agent_by_name(&lab).await?;
    let stream = tokio::net::TcpStream::connect(router).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn.with_upgrades());
    let req = hyper::Request::get("/ws")
        .header("host", format!("api.localhost:{}", router.port()))
        .header("origin", format!("http://api.localhost:{}", router.port()))
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    assert_eq!(resp.status(), 101);
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await?);
    io.write_all(b"hello by name").await?;
    let mut buf = [0u8; 13];
    tokio::time::timeout(std::time::Duration::from_secs(10), io.read_exact(&mut buf)).await??;
    assert_eq!(&buf, b"hello by name");
    agent.shutdown().await;
    Ok(())
}

/// A WebSocket opened by name from the service's own page (`Origin:
/// http://api.localhost:PORT`) reaches an app that checks its Origin against its Host: the
/// handshake is the app's own (its `Sec-WebSocket-Accept`), and its message comes back.
#[tokio::test]
async fn a_websocket_by_name_reaches_an_origin_checking_app() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (agent, router) = agent_by_name(&lab).await?;
    let port = router.port();
    let stream = tokio::net::TcpStream::connect(router).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn.with_upgrades());
    let req = hyper::Request::get("/app/ws")
        .header("host", format!("api.localhost:{port}"))
        .header("origin", format!("http://api.localhost:{port}"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    assert_eq!(resp.status(), 101);
    // RFC 6455's own example key and answer.
    assert_eq!(
        resp.headers()
            .get("sec-websocket-accept")
            .map(|v| v.as_bytes()),
        Some(&b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="[..])
    );
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await?);
    // A masked text frame "hi" (RFC 6455 section 5.3), then the app's answer.
    io.write_all(&[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2])
        .await?;
    let mut frame = [0u8; 11];
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        io.read_exact(&mut frame),
    )
    .await??;
    assert_eq!(&frame[2..], b"heard you");
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn curl_reaches_a_service_by_name_and_follows_its_redirect_there() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (agent, router) = agent_by_name(&lab).await?;
    let base = format!("http://api.localhost:{}", router.port());
    // curl resolves `*.localhost` to loopback itself (RFC 6761): no hosts file, no option.
    let url = format!("{base}/redirect");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "-L", "-w", "\n%{url_effective}", &url])
            .output()
    })
    .await?
    .map_err(|e| anyhow::anyhow!("curl is needed for this test (apt-get install curl): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (page, last) = text.rsplit_once('\n').unwrap_or_default();
    assert_eq!(last, format!("{base}/landing?from=redirect"));
    assert!(
        page.contains(ALICE),
        "the landing page saw the user: {page}"
    );
    agent.shutdown().await;
    Ok(())
}

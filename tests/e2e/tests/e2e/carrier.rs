//! The agent over the TCP carrier, with real parts: a network namespace whose firewall drops
//! UDP (the agent falls back to TCP by itself, and returns to QUIC when UDP gets through
//! again), tinyproxy as a company's HTTP proxy (CONNECT, with and without credentials), and
//! nginx terminating TLS in front of the gateway's plain carrier, as Cloud Run's front end does
//! (enrolment, sign-in, a replayed assertion, the front end cutting the carrier).

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use touchgate_agent::{
    AgentConfig, AgentState, RunningAgent,
    config::Transport,
    tunnel::{Dialer, Order, SessionKey, Tunnel},
};
use touchgate_e2e::{enrolled, get, soft_authn, wait_for_state};
use touchgate_proto::RefusalCode;
use touchgate_testkit::{
    PrivateCa,
    http_proxy::HttpProxy,
    lab::{Lab, LabOptions},
    netns,
    nginx::Nginx,
};

const ALICE: &str = "alice@example.com";
const UDP_BLOCKED: &str = "TCP: UDP seems blocked on this network";

/// Sends `line` on the echo service's local connection and reads it back.
async fn echo(s: &mut tokio::net::TcpStream, line: &str) -> anyhow::Result<()> {
    s.write_all(line.as_bytes()).await?;
    let mut back = vec![0u8; line.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back)).await??;
    assert_eq!(String::from_utf8_lossy(&back), line);
    Ok(())
}

#[tokio::test]
async fn with_udp_dropped_the_agent_comes_up_over_tcp_and_returns_to_quic_when_it_can()
-> anyhow::Result<()> {
    let Some(ns) = netns::reexec_in_own_namespace(
        "carrier::with_udp_dropped_the_agent_comes_up_over_tcp_and_returns_to_quic_when_it_can",
    )?
    else {
        return Ok(());
    };
    let lab = Lab::start(LabOptions::default()).await?;
    ns.drop_udp(true)?;
    // Enrolment too finds its way over TCP.
    let (mut cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    assert_eq!(cfg.transport, Transport::Auto, "the default");
    cfg.quic_retry = Duration::from_secs(2);

    let started = Instant::now();
    let agent = RunningAgent::start(cfg, authn).await?;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "up over TCP in {took:?}");
    assert_eq!(agent.transport().as_deref(), Some(UDP_BLOCKED));
    assert!(
        agent.gateway().is_some_and(|g| g.ends_with("over TCP")),
        "{:?}",
        agent.gateway()
    );
    let api = agent.local_addr("api").context("api")?;
    assert_eq!(get(api, "/over-tcp", &[]).await?.status, 200);
    let mut stream =
        tokio::net::TcpStream::connect(agent.local_addr("echo").context("echo")?).await?;
    echo(&mut stream, "opened over TCP\n").await?;
    let touches = lab.audit_events("challenge_issued").len();

    // UDP gets through again: within the retry interval the agent is back on QUIC, with no
    // touch, and no request fails meanwhile.
    ns.drop_udp(false)?;
    let freed = Instant::now();
    let mut requests = 0;
    while agent.transport().as_deref() != Some("QUIC") {
        assert!(
            freed.elapsed() < Duration::from_secs(15),
            "still on {:?} after {:?}",
            agent.transport(),
            freed.elapsed()
        );
        let answer = get(api, &format!("/while-moving-{requests}"), &[]).await?;
        assert_eq!(answer.status, 200, "request {requests} while moving");
        requests += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let moved = freed.elapsed();
    assert!(
        moved < Duration::from_secs(2 + 10),
        "back on QUIC after {moved:?}"
    );
    assert!(requests > 0, "requests were made while moving");
    assert_eq!(get(api, "/over-quic", &[]).await?.status, 200);
    // The connection opened over TCP finishes there.
    echo(&mut stream, "still there after the move\n").await?;
    drop(stream);
    assert_eq!(
        lab.audit_events("challenge_issued").len(),
        touches,
        "no touch"
    );
    assert!(!lab.audit_events("session_resumed").is_empty());
    println!(
        "over TCP in {took:?}; back on QUIC {moved:?} after UDP was let through, {requests} requests meanwhile"
    );
    agent.shutdown().await;
    Ok(())
}

/// The enrolled config, made to use only the carrier, through `proxy`.
fn through(cfg: &AgentConfig, proxy: &str) -> AgentConfig {
    let mut cfg = cfg.clone();
    cfg.transport = Transport::Tcp;
    cfg.proxy = Some(proxy.to_owned());
    cfg
}

#[tokio::test]
async fn over_tcp_through_an_http_proxy_with_and_without_credentials() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    for credentials in [None, Some(("alice", "s3cret-pw"))] {
        let proxy = HttpProxy::start(credentials).await?;
        let agent = RunningAgent::start(through(&cfg, &proxy.url()), authn.clone()).await?;
        let transport = agent.transport().unwrap_or_default();
        assert_eq!(
            transport,
            format!(
                "TCP (transport = \"tcp\"), through the proxy {}",
                proxy.addr
            ),
            "credentials: {credentials:?}"
        );
        let api = agent.local_addr("api").context("api")?;
        assert_eq!(get(api, "/through-the-proxy", &[]).await?.status, 200);
        assert!(
            proxy
                .connects()
                .iter()
                .any(|c| c.ends_with(&format!(":{}", lab.quic_addr.port()))),
            "the proxy tunnelled to the gateway: {:?}",
            proxy.connects()
        );
        agent.shutdown().await;
    }

    // Wrong credentials: the proxy's refusal, in words.
    let proxy = HttpProxy::start(Some(("alice", "right"))).await?;
    let wrong = proxy.url().replace("right", "wrong");
    let e = RunningAgent::start(through(&cfg, &wrong), authn.clone())
        .await
        .err()
        .context("a proxy refusing the credentials")?
        .to_string();
    assert!(e.contains("through the proxy"), "{e}");
    assert!(
        e.contains("refused the tunnel with 401 Unauthorized"),
        "{e}"
    );
    assert!(e.contains("user and password"), "{e}");
    assert!(!e.contains("wrong"), "the password is not shown: {e}");
    Ok(())
}

/// The lab's gateway behind nginx, which terminates TLS with a certificate of another CA than
/// the gateway's own; the agent reaches it at `wss://localhost:PORT/touchgate/carrier`.
async fn behind_nginx(
    lab: &Lab,
) -> anyhow::Result<(Nginx, AgentConfig, touchgate_agent::SharedAuthn)> {
    let nginx = Nginx::start(lab.ws_addr, &PrivateCa::new()?).await?;
    let key_path = lab.dir.path().join("alice-front.softkey");
    let mut cfg = lab.agent_config(ALICE, &key_path, &[])?;
    cfg.gateway = format!(
        "wss://localhost:{}{}",
        nginx.addr.port(),
        touchgate_carrier::PATH
    )
    .into();
    // The front end's certificate is checked against the system's roots and gateway_ca; the
    // gateway's own, inside, against the pin as ever.
    cfg.gateway_ca = Some(nginx.ca_path());
    cfg.check()?;
    let authn = soft_authn(&key_path)?;
    touchgate_agent::enroll(&cfg, &authn, &lab.invite(ALICE)?).await?;
    Ok((nginx, cfg, authn))
}

#[tokio::test]
async fn through_a_tls_terminating_front_end_a_cut_carrier_resumes_without_a_touch()
-> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (mut nginx, cfg, authn) = behind_nginx(&lab).await?;
    assert_eq!(
        lab.audit_events("invite_used").len(),
        1,
        "enrolled through nginx"
    );
    let agent = RunningAgent::start(cfg, authn).await?;
    assert_eq!(
        agent.transport().as_deref(),
        Some("TCP through the gateway's front end")
    );
    let api = agent.local_addr("api").context("api")?;
    assert_eq!(get(api, "/through-nginx", &[]).await?.status, 200);
    let touches = lab.audit_events("challenge_issued").len();
    let old = agent.connection().context("connected")?.stable_id();

    // A download is under way when the front end cuts every connection.
    let download = tokio::spawn(async move { get(api, "/bytes?n=200000000", &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    nginx.restart().await?;
    wait_for_state(&agent, Duration::from_secs(20), |s| {
        matches!(s, AgentState::Connected { .. })
            && agent.connection().is_some_and(|c| c.stable_id() != old)
    })
    .await?;
    assert_eq!(get(api, "/after-the-cut", &[]).await?.status, 200);
    assert_eq!(
        lab.audit_events("challenge_issued").len(),
        touches,
        "no touch"
    );
    assert!(!lab.audit_events("session_resumed").is_empty());
    // The cut download ends (it cannot finish: its carrier is gone) instead of hanging.
    let cut = tokio::time::timeout(Duration::from_secs(30), download).await??;
    assert!(
        cut.map_or(true, |a| a.body.len() < 200_000_000),
        "the download was cut"
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_assertion_captured_through_the_front_end_is_refused_on_another_carrier()
-> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (_nginx, cfg, authn) = behind_nginx(&lab).await?;
    let dial = || async {
        let dialer = Dialer::new(&cfg, &SessionKey::generate()?)?;
        let t = Tunnel::dial(&dialer, &cfg, Order::random()).await?;
        anyhow::Ok((dialer, t))
    };
    let (_a, first) = dial().await?;
    let (_b, second) = dial().await?;
    assert!(first.link().is_tcp() && second.link().is_tcp());
    // Whoever holds the front end (or sits behind it) captures the assertion made on the first
    // carrier and presents it on a second one, where a challenge is pending.
    let captured = first.make_assertion(&authn, ALICE, None).await?;
    let _ = second.make_assertion(&authn, ALICE, None).await?;
    let r = second
        .finish_login(captured)
        .await
        .err()
        .and_then(|e| e.refusal().cloned())
        .context("the replayed assertion must be refused")?;
    assert_eq!(r.code, RefusalCode::BindingMismatch, "{}", r.message);
    let refused = lab.audit_events("challenge_refused");
    assert!(
        refused.iter().any(|e| e["outcome"] == "binding_mismatch"),
        "{refused:?}"
    );
    Ok(())
}

/// A TLS connection to the lab gateway's carrier port, trusting its certificate.
async fn carrier_tls(
    lab: &Lab,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(lab.cert_path())? {
        roots.add(c?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(lab.carrier_addr()).await?;
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect("localhost".try_into()?, tcp)
        .await?)
}

/// A WebSocket to the lab's carrier, upgraded as a carrier (no size limits of our own: the
/// gateway's are what is tested).
async fn raw_carrier(
    lab: &Lab,
) -> anyhow::Result<
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut req = lab.carrier_url().into_client_request()?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        http::HeaderValue::from_static(touchgate_carrier::SUBPROTOCOL),
    );
    let (ws, _) = tokio_tungstenite::client_async(req, carrier_tls(lab).await?).await?;
    Ok(ws)
}

#[tokio::test]
async fn hostile_carriers_are_refused_and_audited_while_an_agent_on_the_same_port_carries_on()
-> anyhow::Result<()> {
    use futures_util::SinkExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let lab = Lab::start(LabOptions::default()).await?;
    let (mut cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    cfg.transport = Transport::Tcp;
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").context("api")?;
    let conn = agent.connection().context("connected")?.stable_id();

    // Bytes that are no WebSocket frame, after a good upgrade.
    let ws = raw_carrier(&lab).await?;
    let mut tls = ws.into_inner();
    tls.write_all(b"\xff\xff\xff\xffGET / HTTP/1.1 and other garbage\r\n\r\n")
        .await?;
    tls.flush().await?;
    // A message far larger than a datagram.
    let mut big = raw_carrier(&lab).await?;
    let _ = big.send(Message::binary(vec![0u8; 1 << 20])).await;
    // A message too small to be a QUIC packet.
    let mut tiny = raw_carrier(&lab).await?;
    let _ = tiny.send(Message::binary(vec![0u8; 3])).await;
    // A flood of messages, each the size of the smallest QUIC packet.
    let mut flood = raw_carrier(&lab).await?;
    let flooding = tokio::spawn(async move {
        for _ in 0..200_000 {
            if flood.feed(Message::binary(vec![0u8; 21])).await.is_err() {
                return;
            }
        }
        let _ = flood.flush().await;
    });
    // Meanwhile the agent's requests, on a carrier at the same port, all work.
    for i in 0..20 {
        assert_eq!(
            get(api, &format!("/under-attack-{i}"), &[]).await?.status,
            200
        );
    }
    tokio::time::timeout(Duration::from_secs(60), flooding).await??;

    let mut reasons = Vec::new();
    for _ in 0..300 {
        reasons = lab
            .audit_events("connection_refused")
            .iter()
            .filter(|e| e["outcome"] == "carrier_refused")
            .filter_map(|e| e["reason"].as_str().map(str::to_owned))
            .collect();
        if reasons.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for words in [
        "a broken WebSocket",
        "a message larger than a datagram may be",
        "too small for a QUIC packet",
        "messages in a second",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(words)),
            "{words:?} not among {reasons:?}"
        );
    }
    // The agent's own connection was never touched.
    assert_eq!(agent.connection().map(|c| c.stable_id()), Some(conn));
    assert_eq!(get(api, "/after-the-attack", &[]).await?.status, 200);
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn before_its_maximum_age_the_carrier_is_replaced_and_a_request_in_flight_finishes()
-> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (mut cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    cfg.transport = Transport::Tcp;
    // The shortest allowed: a front end that ends requests after a minute would want this.
    cfg.carrier_max_age = Duration::from_secs(30);
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").context("api")?;
    let first = agent.connection().context("connected")?.stable_id();
    let touches = lab.audit_events("challenge_issued").len();
    // A slow request that is still in flight when the carrier reaches its age.
    tokio::time::sleep(Duration::from_secs(25)).await;
    let slow = tokio::spawn(async move { get(api, "/slow?ms=10000", &[]).await });
    wait_for_state(&agent, Duration::from_secs(20), |s| {
        matches!(s, AgentState::Connected { .. })
            && agent.connection().is_some_and(|c| c.stable_id() != first)
    })
    .await?;
    let answer = tokio::time::timeout(Duration::from_secs(30), slow).await???;
    assert_eq!(
        answer.status, 200,
        "the request in flight finished on the old carrier"
    );
    assert_eq!(get(api, "/on-the-fresh-carrier", &[]).await?.status, 200);
    assert_eq!(
        lab.audit_events("challenge_issued").len(),
        touches,
        "no touch"
    );
    assert!(!lab.audit_events("session_resumed").is_empty());
    agent.shutdown().await;
    Ok(())
}

//! The parts the carrier's tests stand on, with the real gateway: the lab's carriers (with TLS at
//! the QUIC port, plain at `ws_addr`) across a restart and a replica's kill, nginx terminating
//! TLS in front of the plain carrier (as Cloud Run's front end), tinyproxy tunnelling to the
//! carrier with TLS (as a company's HTTP proxy), and a network namespace whose firewall drops
//! UDP. Through each, a QUIC connection with the gateway runs inside the carrier, and the gateway
//! answers a sign-in's first request on it.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
};
use touchgate_carrier::{Ended, client::Carrier};
use touchgate_proto::{ClientMsg, ServerMsg};
use touchgate_testkit::{
    PrivateCa,
    http_proxy::HttpProxy,
    lab::{Lab, LabOptions},
    netns,
    nginx::Nginx,
};

#[tokio::test]
async fn the_lab_serves_both_carriers_again_on_the_same_ports_after_a_restart() -> anyhow::Result<()>
{
    let mut lab = Lab::start(LabOptions::default()).await?;
    let (carrier_addr, ws_addr) = (lab.carrier_addr(), lab.ws_addr);
    assert_eq!(carrier_addr, lab.quic_addr, "TCP at the QUIC port");
    let open = carrier_with_tls(&lab).await?;
    let (_endpoint, before) = quic_handshake(&lab, &open).await?;

    lab.restart_gateway().await?;

    // The stopping gateway's close frame came through the carrier, and then the carrier ended,
    // as a process's TCP connections do.
    match before.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(&c.reason[..], b"gateway restarting");
        }
        other => panic!("the QUIC connection ended with {other:?}"),
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), open.ended)
        .await
        .context("a carrier outlived its gateway")??;
    assert_eq!(ended, Ended::Closed);
    assert_eq!((lab.carrier_addr(), lab.ws_addr), (carrier_addr, ws_addr));
    let _quic = quic_handshake(&lab, &carrier_with_tls(&lab).await?).await?;
    let plain =
        touchgate_carrier::client::open(TcpStream::connect(lab.ws_addr).await?, &lab.ws_url())
            .await?;
    let _quic = quic_handshake(&lab, &plain).await?;

    // A replica serves its own carriers, which end when it is killed.
    let mut replica = lab.start_replica("r").await?;
    let tcp = TcpStream::connect(replica.carrier_addr()).await?;
    let url = format!(
        "wss://localhost:{}{}",
        replica.carrier_addr().port(),
        touchgate_carrier::PATH
    );
    let on_replica =
        touchgate_carrier::client::open(tls_over(tcp, &lab.cert_path()).await?, &url).await?;
    let _quic = quic_handshake(&lab, &on_replica).await?;
    let plain = touchgate_carrier::client::open(
        TcpStream::connect(replica.ws_addr).await?,
        &format!("ws://{}{}", replica.ws_addr, touchgate_carrier::PATH),
    )
    .await?;
    let _quic = quic_handshake(&lab, &plain).await?;
    replica.kill().await;
    tokio::time::timeout(Duration::from_secs(5), on_replica.ended)
        .await
        .context("a carrier outlived its killed replica")??;
    Ok(())
}

#[tokio::test]
async fn through_nginx_the_carrier_upgrades_and_the_public_keys_are_served() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let ca = PrivateCa::new()?;
    let nginx = Nginx::start(lab.ws_addr, &ca).await?;

    let carrier = touchgate_carrier::client::open(
        tls(nginx.addr, &nginx.ca_path()).await?,
        &format!(
            "wss://localhost:{}{}",
            nginx.addr.port(),
            touchgate_carrier::PATH
        ),
    )
    .await
    .context("the carrier's upgrade through nginx")?;
    let _quic = quic_handshake(&lab, &carrier)
        .await
        .context("QUIC inside the carrier through nginx")?;

    let mut s = tls(nginx.addr, &nginx.ca_path()).await?;
    s.write_all(
        b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("Server: nginx"),
        "not through nginx: {answer}"
    );
    let (_, body) = answer.split_once("\r\n\r\n").context("no body")?;
    let keys: serde_json::Value = serde_json::from_str(body)?;
    let admin = touchgate_e2e::get(lab.admin_addr, "/.well-known/jwks.json", &[]).await?;
    assert_eq!(
        keys,
        admin.json()?,
        "the gateway's keys, as its admin endpoint has them"
    );
    assert!(
        keys["keys"].as_array().is_some_and(|k| !k.is_empty()),
        "{keys}"
    );
    Ok(())
}

#[tokio::test]
async fn through_an_http_proxy_the_carrier_with_tls_reaches_the_gateway() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let proxy = HttpProxy::start(None).await?;

    let (answer, tcp) = proxy_connect(&proxy, lab.carrier_addr(), None).await?;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let carrier =
        touchgate_carrier::client::open(tls_over(tcp, &lab.cert_path()).await?, &lab.carrier_url())
            .await
            .context("the carrier's upgrade through the proxy")?;
    let _quic = quic_handshake(&lab, &carrier)
        .await
        .context("QUIC inside the carrier through the proxy")?;
    assert_eq!(proxy.tunnels(), 1, "{}", proxy.log());
    assert_eq!(proxy.connects(), vec![lab.carrier_addr().to_string()]);
    Ok(())
}

#[tokio::test]
async fn an_http_proxy_with_credentials_tunnels_only_with_them() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let proxy = HttpProxy::start(Some(("alice", "s3cret"))).await?;

    let (refused, _) = proxy_connect(&proxy, lab.carrier_addr(), None).await?;
    assert!(
        refused.starts_with("HTTP/1.0 407") && refused.contains("Proxy-Authenticate: Basic"),
        "{refused}"
    );
    // tinyproxy 1.11 answers wrong credentials 401 (see touchgate_testkit::http_proxy).
    let wrong = Some("Basic YWxpY2U6d3Jvbmc="); // alice:wrong
    let (refused, _) = proxy_connect(&proxy, lab.carrier_addr(), wrong).await?;
    assert!(
        refused.starts_with("HTTP/1.0 407") || refused.starts_with("HTTP/1.0 401"),
        "{refused}"
    );
    assert_eq!(
        proxy.tunnels(),
        0,
        "refused, yet tunnelled: {}",
        proxy.log()
    );

    let authorization = proxy.authorization();
    let (answer, tcp) = proxy_connect(&proxy, lab.carrier_addr(), authorization.as_deref()).await?;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let carrier =
        touchgate_carrier::client::open(tls_over(tcp, &lab.cert_path()).await?, &lab.carrier_url())
            .await?;
    let _quic = quic_handshake(&lab, &carrier).await?;
    assert_eq!(proxy.tunnels(), 1, "{}", proxy.log());
    assert_eq!(proxy.connects().len(), 3);
    Ok(())
}

#[tokio::test]
async fn in_its_own_namespace_a_test_drops_udp_and_keeps_tcp() -> anyhow::Result<()> {
    let Some(ns) = netns::reexec_in_own_namespace(
        "front_ends::in_its_own_namespace_a_test_drops_udp_and_keeps_tcp",
    )?
    else {
        return Ok(());
    };
    let udp_echo = UdpSocket::bind("127.0.0.1:0").await?;
    let udp_addr = udp_echo.local_addr()?;
    tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = udp_echo.recv_from(&mut buf).await {
            let _ = udp_echo.send_to(&buf[..n], from).await;
        }
    });
    let tcp_echo = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let tcp_addr = tcp_echo.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = tcp_echo.accept().await {
            let (mut r, mut w) = s.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut r, &mut w).await });
        }
    });
    assert!(udp_round_trip(udp_addr).await?, "UDP before the firewall");

    ns.drop_udp(true)?;
    assert!(ns.ruleset()?.contains("udp drop"), "{}", ns.ruleset()?);
    assert!(
        !udp_round_trip(udp_addr).await?,
        "a UDP datagram got through"
    );
    let mut tcp = TcpStream::connect(tcp_addr).await?;
    tcp.write_all(b"tcp").await?;
    let mut got = [0u8; 3];
    tcp.read_exact(&mut got).await?;
    assert_eq!(&got, b"tcp");

    // QUIC to the gateway's UDP port fails; inside the carrier, over TCP, it does not.
    let lab = Lab::start(LabOptions::default()).await?;
    let mut udp_client = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    udp_client.set_default_client_config(quic_client_config(&lab, false)?);
    let over_udp = tokio::time::timeout(
        Duration::from_secs(2),
        udp_client.connect(lab.quic_addr, "localhost")?,
    )
    .await;
    assert!(
        !matches!(over_udp, Ok(Ok(_))),
        "QUIC over UDP connected: {over_udp:?}"
    );
    let carrier = touchgate_carrier::client::open(
        tls(lab.carrier_addr(), &lab.cert_path()).await?,
        &lab.carrier_url(),
    )
    .await?;
    let _quic = quic_handshake(&lab, &carrier).await?;

    ns.drop_udp(false)?;
    assert!(!ns.ruleset()?.contains("udp drop"), "{}", ns.ruleset()?);
    assert!(udp_round_trip(udp_addr).await?, "UDP after the firewall");
    Ok(())
}

/// A carrier with TLS to the lab's gateway, straight.
async fn carrier_with_tls(lab: &Lab) -> anyhow::Result<Carrier> {
    Ok(touchgate_carrier::client::open(
        tls(lab.carrier_addr(), &lab.cert_path()).await?,
        &lab.carrier_url(),
    )
    .await?)
}

/// Whether a datagram sent to the echo at `addr` comes back within half a second (a send the
/// firewall refuses counts as lost).
async fn udp_round_trip(addr: SocketAddr) -> anyhow::Result<bool> {
    let s = UdpSocket::bind("127.0.0.1:0").await?;
    if s.send_to(b"ping", addr).await.is_err() {
        return Ok(false);
    }
    let mut buf = [0u8; 8];
    match tokio::time::timeout(Duration::from_millis(500), s.recv_from(&mut buf)).await {
        Ok(Ok((4, from))) => Ok(from == addr && &buf[..4] == b"ping"),
        _ => Ok(false),
    }
}

/// `CONNECT target` through `proxy`, with `authorization` when given: the answer's head, and
/// the stream (the tunnel, when the answer is 200).
async fn proxy_connect(
    proxy: &HttpProxy,
    target: SocketAddr,
    authorization: Option<&str>,
) -> anyhow::Result<(String, TcpStream)> {
    let mut s = TcpStream::connect(proxy.addr).await?;
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(a) = authorization {
        head.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    // Byte by byte: nothing of the tunnel is read with the head.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") && s.read(&mut byte).await? == 1 {
        answer.push(byte[0]);
    }
    Ok((String::from_utf8_lossy(&answer).into_owned(), s))
}

/// TLS over TCP to `addr`, trusting the PEM at `ca`, for `localhost`.
async fn tls(
    addr: SocketAddr,
    ca: &std::path::Path,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    tls_over(TcpStream::connect(addr).await?, ca).await
}

/// TLS over `stream`, trusting the PEM at `ca`, for `localhost`.
async fn tls_over<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    ca: &std::path::Path,
) -> anyhow::Result<tokio_rustls::client::TlsStream<S>> {
    Ok(touchgate_testkit::tls_connector(ca)?
        .connect(
            rustls::pki_types::ServerName::try_from("localhost")?,
            stream,
        )
        .await?)
}

/// A QUIC connection to the lab's gateway inside `carrier`, as an agent's: the gateway's own
/// certificate and a client certificate, end to end through whatever carries the carrier; then
/// a sign-in's first request on the control stream, which the gateway answers with a
/// challenge. Returns the connection, with its endpoint, for the caller to keep open as an
/// agent would.
async fn quic_handshake(
    lab: &Lab,
    carrier: &Carrier,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
        touchgate_carrier::endpoint_config(),
        None,
        carrier.hub.clone(),
        Arc::new(quinn::TokioRuntime),
    )?;
    endpoint.set_default_client_config(quic_client_config(lab, true)?);
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        endpoint.connect(carrier.gateway, "localhost")?,
    )
    .await
    .context("no QUIC handshake within 10 s")??;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&touchgate_proto::encode(&ClientMsg::LoginBegin {
        user: "alice@example.com".into(),
    }))
    .await?;
    let mut len = [0u8; 4];
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        recv.read_exact(&mut len).await?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        recv.read_exact(&mut body).await?;
        anyhow::Ok(touchgate_proto::decode::<ServerMsg>(&body)?)
    })
    .await
    .context("no answer on the control stream within 10 s")??;
    anyhow::ensure!(
        matches!(answer, ServerMsg::LoginChallenge { .. }),
        "{answer:?}"
    );
    Ok((endpoint, conn))
}

/// QUIC client settings trusting the lab's certificate, with a throwaway client certificate
/// (the session key's place), tuned for the carrier when `over_carrier`.
fn quic_client_config(lab: &Lab, over_carrier: bool) -> anyhow::Result<quinn::ClientConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = rcgen::CertificateParams::new(vec!["agent".into()])?.self_signed(&key)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(lab.cert_path())? {
        roots.add(c?)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )?;
    tls.alpn_protocols = vec![touchgate_proto::ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    if over_carrier {
        let mut t = quinn::TransportConfig::default();
        touchgate_carrier::tune_transport(&mut t);
        config.transport_config(Arc::new(t));
    }
    Ok(config)
}

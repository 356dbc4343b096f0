//! The gateway's carrier on a real socket: its public keys over HTTPS, a QUIC handshake
//! through a carrier with the gateway's own TLS inside, and a hostile carrier in the audit log.

use std::{path::Path, sync::Arc};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::GatewayConfig;

/// A gateway with the carrier (TLS) on 127.0.0.1 port 0 and the QUIC endpoint behind it.
async fn gateway(dir: &Path) -> (Arc<Gateway>, SocketAddr) {
    let cert = crate::tls::generate_dev_cert(&["localhost".into()]).expect("cert");
    crate::tls::write_dev_cert(dir, &cert).expect("write cert");
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:0\"\nrp_id = \"localhost\"\ndatabase = \"gw.db\"\n\
         audit_log = \"audit.jsonl\"\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
         [id_tokens]\nsource = \"none\"\n",
    )
    .expect("config");
    let gw = Gateway::new(GatewayConfig::load(&path).expect("config")).expect("gateway");
    let endpoint = gw.carrier_endpoint().expect("carrier endpoint");
    tokio::spawn(
        gw.clone()
            .serve_more_quic(endpoint, Arc::new(crate::shards::Shards::current())),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(gw.clone().serve_carrier(listener, true));
    (gw, addr)
}

fn roots(dir: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in crate::tls::load_certs(&dir.join("cert.pem")).expect("certs") {
        roots.add(c).expect("root");
    }
    roots
}

/// TLS to the carrier's TCP side, trusting the gateway's certificate.
async fn tls(
    dir: &Path,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots(dir))
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").expect("name"),
            tcp,
        )
        .await
        .expect("TLS")
}

#[tokio::test]
async fn the_public_keys_are_served_on_the_carriers_https_side() {
    let dir = tempfile::tempdir().expect("dir");
    let (gw, addr) = gateway(dir.path()).await;
    let mut s = tls(dir.path(), addr).await;
    s.write_all(
        b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let body = out.split("\r\n\r\n").nth(1).expect("body");
    let keys: serde_json::Value = serde_json::from_str(body).expect("json");
    assert_eq!(
        keys,
        gw.signer.jwks(),
        "the same keys as the admin endpoint"
    );
}

#[tokio::test]
async fn quic_reaches_the_gateway_through_a_carrier_and_abuse_is_audited() {
    let dir = tempfile::tempdir().expect("dir");
    let (gw, addr) = gateway(dir.path()).await;
    let carrier = touchgate_carrier::client::open(
        tls(dir.path(), addr).await,
        &format!("wss://localhost{}", touchgate_carrier::PATH),
    )
    .await
    .expect("carrier");
    // The QUIC handshake inside, with the gateway's certificate and a session key's
    // certificate, as an agent makes it.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let cert = rcgen::CertificateParams::new(vec!["agent".into()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let mut quic_tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .with_root_certificates(roots(dir.path()))
    .with_client_auth_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("client cert");
    quic_tls.alpn_protocols = vec![touchgate_proto::ALPN.to_vec()];
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(quic_tls).expect("quic tls"),
    ));
    let mut t = quinn::TransportConfig::default();
    touchgate_carrier::tune_transport(&mut t);
    client.transport_config(Arc::new(t));
    let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
        touchgate_carrier::endpoint_config(),
        None,
        carrier.hub.clone(),
        Arc::new(quinn::TokioRuntime),
    )
    .expect("endpoint");
    endpoint.set_default_client_config(client);
    let conn = endpoint
        .connect(carrier.gateway, "localhost")
        .expect("connect")
        .await
        .expect("QUIC handshake with the gateway over the carrier");
    let (mut send, _recv) = conn.open_bi().await.expect("control stream");
    send.write_all(b"\x00").await.expect("write");
    assert!(
        conn.close_reason().is_none(),
        "served like a UDP connection"
    );

    // A carrier that sends text is closed and audited with the TCP peer's address.
    use futures_util::SinkExt as _;
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let mut req = format!("wss://localhost{}", touchgate_carrier::PATH)
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        http::HeaderValue::from_static(touchgate_carrier::SUBPROTOCOL),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls(dir.path(), addr).await)
        .await
        .expect("handshake");
    ws.send(Message::text("not a datagram"))
        .await
        .expect("send");
    let mut refused = Vec::new();
    for _ in 0..200 {
        let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap_or_default();
        refused = audit
            .lines()
            .filter(|l| l.contains("carrier_refused"))
            .map(str::to_owned)
            .collect();
        if !refused.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        refused
            .iter()
            .any(|l| l.contains("a text message") && l.contains("127.0.0.1:")),
        "{refused:?}"
    );
    drop(gw);
}

/// The audit lines of `dir`'s gateway with `words` in them, waiting a little for them.
async fn audited(dir: &Path, words: &str) -> Vec<String> {
    for _ in 0..200 {
        let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap_or_default();
        let found: Vec<String> = audit
            .lines()
            .filter(|l| l.contains(words))
            .map(str::to_owned)
            .collect();
        if !found.is_empty() {
            return found;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Vec::new()
}

#[tokio::test]
async fn too_many_carriers_from_one_source_and_failed_tls_are_refused_and_audited() {
    let dir = tempfile::tempdir().expect("dir");
    let (gw, addr) = gateway(dir.path()).await;
    // Not TLS at all: audited.
    let mut plain = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    plain
        .write_all(b"GET /touchgate/carrier HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let tls_failed = audited(dir.path(), "carrier: TLS failed").await;
    assert!(
        tls_failed
            .iter()
            .any(|l| l.contains("carrier_refused") && l.contains("127.0.0.1:")),
        "{tls_failed:?}"
    );
    // As many carriers open from 127.0.0.1 as one source may have.
    {
        let mut peers = gw.carriers.peers.lock().expect("lock");
        for n in 0..MAX_CARRIERS_PER_SOURCE as u16 {
            peers.insert(
                SocketAddr::from((
                    std::net::Ipv6Addr::new(0xfd74, 0x6763, 9, 9, 0, 0, 0, n),
                    443,
                )),
                SocketAddr::from(([127, 0, 0, 1], 40000 + n)),
            );
        }
    }
    let mut s = tls(dir.path(), addr).await;
    s.write_all(
        format!(
            "GET {} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Protocol: {}\r\n\r\n",
            touchgate_carrier::PATH,
            touchgate_carrier::SUBPROTOCOL
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.expect("answer");
    assert_eq!(&head, b"HTTP/1.1 429");
    let refused = audited(dir.path(), "http_429").await;
    assert!(
        refused
            .iter()
            .any(|l| l.contains("512 carriers are open from 127.0.0.1")),
        "{refused:?}"
    );
    // A carrier's address whose carrier is gone counts against nobody, and is not served.
    let gone = SocketAddr::from((
        std::net::Ipv6Addr::new(0xfd74, 0x6763, 0, 0, 0, 0, 7, 7),
        443,
    ));
    assert_eq!(gw.carriers.peer_of(gone), None);
    let udp: SocketAddr = "192.0.2.1:4433".parse().expect("addr");
    assert_eq!(gw.carriers.peer_of(udp), Some(udp));
}

#[test]
fn quic_and_the_carrier_share_one_port_and_a_taken_one_is_named() {
    let (udp, tcp) =
        super::bind_quic_and_carrier("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let port = udp.local_addr().expect("udp").port();
    assert_ne!(port, 0);
    assert_eq!(tcp.local_addr().expect("tcp").port(), port);
    // A fixed port whose TCP side is taken (its UDP side free): said, with the address.
    drop(udp);
    let e = super::bind_quic_and_carrier(tcp.local_addr().expect("tcp"))
        .map(|_| ())
        .expect_err("taken");
    assert!(
        format!("{e:#}").contains(&format!("cannot bind TCP 127.0.0.1:{port} for the carrier")),
        "{e:#}"
    );
}

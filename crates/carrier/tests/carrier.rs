//! QUIC over the carrier on loopback, and what the carrier's HTTP side refuses.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures_util::SinkExt as _;
use http_body_util::Full;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest, http::HeaderValue};
use touchgate_carrier::{Ended, Hub, Limits, PATH, SUBPROTOCOL, client, server};

/// What the gateway's routes saw.
#[derive(Default)]
struct Seen {
    opened: Mutex<Vec<SocketAddr>>,
    ended: Mutex<Vec<Ended>>,
    refused: Mutex<Vec<(u16, String)>>,
}

impl server::Routes for Seen {
    fn get(&self, path: &str) -> Option<http::Response<Full<Bytes>>> {
        (path == "/.well-known/jwks.json")
            .then(|| http::Response::new(Full::new(Bytes::from_static(b"{\"keys\":[]}"))))
    }
    fn opened(&self, _addr: SocketAddr, peer: SocketAddr) {
        self.opened.lock().expect("lock").push(peer);
    }
    fn ended(&self, _addr: SocketAddr, _peer: SocketAddr, how: &Ended) {
        self.ended.lock().expect("lock").push(how.clone());
    }
    fn refused(&self, _peer: SocketAddr, status: http::StatusCode, why: &str) {
        self.refused
            .lock()
            .expect("lock")
            .push((status.as_u16(), why.to_owned()));
    }
}

/// A carrier server on 127.0.0.1 (plain TCP: TLS is the caller's layer) feeding `hub`.
async fn carrier_server(hub: Arc<Hub>, limits: Limits) -> (SocketAddr, Arc<Seen>) {
    carrier_server_taking(hub, limits, server::ClientAddr::Peer).await
}

/// [`carrier_server`], taking the client as `client` says.
async fn carrier_server_taking(
    hub: Arc<Hub>,
    limits: Limits,
    client: server::ClientAddr,
) -> (SocketAddr, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Seen::default());
    let routes: Arc<dyn server::Routes> = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            tokio::spawn(server::serve(
                tcp,
                peer,
                client,
                hub.clone(),
                limits,
                routes.clone(),
            ));
        }
    });
    (addr, seen)
}

fn quic_configs() -> (quinn::ServerConfig, quinn::ClientConfig) {
    let ck = rcgen::generate_simple_self_signed(vec!["gw.test".into()]).expect("cert");
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server =
        quinn::ServerConfig::with_single_cert(vec![cert.clone()], key).expect("server");
    let mut t = quinn::TransportConfig::default();
    touchgate_carrier::tune_transport(&mut t);
    server.transport_config(Arc::new(t));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("root");
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls"),
    ));
    let mut t = quinn::TransportConfig::default();
    touchgate_carrier::tune_transport(&mut t);
    client.transport_config(Arc::new(t));
    (server, client)
}

#[tokio::test]
async fn quic_runs_over_the_carrier_both_ways() {
    let (server_cfg, client_cfg) = quic_configs();
    let hub = Hub::new();
    let server = quinn::Endpoint::new_with_abstract_socket(
        touchgate_carrier::endpoint_config(),
        Some(server_cfg),
        hub.clone(),
        Arc::new(quinn::TokioRuntime),
    )
    .expect("server endpoint");
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            tokio::spawn(async move {
                let conn = incoming.await.expect("handshake");
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(Some(n)) = recv.read(&mut buf).await {
                            send.write_all(&buf[..n]).await.expect("echo");
                        }
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    let (addr, seen) = carrier_server(hub.clone(), Limits::default()).await;

    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let carrier = client::open(tcp, &format!("ws://gw.test{PATH}"))
        .await
        .expect("carrier");
    let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
        touchgate_carrier::endpoint_config(),
        None,
        carrier.hub.clone(),
        Arc::new(quinn::TokioRuntime),
    )
    .expect("client endpoint");
    endpoint.set_default_client_config(client_cfg);
    let conn = tokio::time::timeout(
        Duration::from_secs(20),
        endpoint
            .connect(carrier.gateway, "gw.test")
            .expect("connect"),
    )
    .await
    .expect("the handshake ends")
    .expect("QUIC handshake over the carrier");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let data: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        send.write_all(&sent).await.expect("write");
        send.finish().expect("finish");
    });
    let back = tokio::time::timeout(Duration::from_secs(60), recv.read_to_end(8 * 1024 * 1024))
        .await
        .expect("the echo ends")
        .expect("read");
    writer.await.expect("writer");
    assert_eq!(back, data, "4 MiB echoed intact over the carrier");
    assert_eq!(seen.opened.lock().expect("lock").len(), 1);
    assert!(
        conn.stats().path.current_mtu > 1500,
        "large datagrams on the carrier"
    );
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
}

/// A raw WebSocket to the carrier, as a hostile client would open it.
async fn raw_ws(addr: SocketAddr) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let mut req = format!("ws://gw.test{PATH}")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("handshake")
        .0
}

async fn ended_with(seen: &Seen, n: usize) -> Vec<Ended> {
    for _ in 0..200 {
        let e = seen.ended.lock().expect("lock").clone();
        if e.len() >= n {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the carriers did not end");
}

#[tokio::test]
async fn hostile_carriers_are_refused_with_the_reason_and_others_keep_going() {
    let hub = Hub::new();
    let limits = Limits {
        idle: Duration::from_millis(500),
        messages_per_second: 100,
    };
    let (addr, seen) = carrier_server(hub.clone(), limits).await;
    // A well-behaved carrier stays open while the others misbehave.
    let mut good = raw_ws(addr).await;

    let mut text = raw_ws(addr).await;
    text.send(Message::text("hello")).await.expect("send");
    let mut tiny = raw_ws(addr).await;
    tiny.send(Message::binary(vec![0u8; 3]))
        .await
        .expect("send");
    let mut huge = raw_ws(addr).await;
    let _ = huge
        .send(Message::binary(vec![
            0u8;
            touchgate_carrier::MAX_DATAGRAM + 1
        ]))
        .await;
    let mut flood = raw_ws(addr).await;
    for _ in 0..200 {
        if flood.send(Message::binary(vec![0x40u8; 30])).await.is_err() {
            break;
        }
    }
    let mut ended = ended_with(&seen, 4).await;
    ended.sort_by_key(ToString::to_string);
    let words: Vec<String> = ended.iter().map(ToString::to_string).collect();
    assert!(
        words.iter().any(|w| w.contains("a text message")),
        "{words:?}"
    );
    assert!(words.iter().any(|w| w.contains("too small")), "{words:?}");
    assert!(
        words.iter().any(|w| w.contains("larger than a datagram")),
        "{words:?}"
    );
    assert!(
        words.iter().any(|w| w.contains("messages in a second")),
        "{words:?}"
    );
    good.send(Message::binary(vec![0x40u8; 40]))
        .await
        .expect("the good carrier still takes messages");

    // Silence ends a carrier.
    let ended = ended_with(&seen, 5).await;
    assert!(ended.contains(&Ended::Idle), "{ended:?}");
}

#[tokio::test]
async fn the_http_side_serves_the_upgrade_and_its_routes_only() {
    let hub = Hub::new();
    let (addr, seen) = carrier_server(hub, Limits::default()).await;
    let ask = |request: &'static str| async move {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
        tcp.write_all(request.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let keys =
        ask("GET /.well-known/jwks.json HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").await;
    assert!(
        keys.starts_with("HTTP/1.1 200") && keys.contains("{\"keys\":[]}"),
        "{keys}"
    );
    let plain =
        ask("GET /touchgate/carrier HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").await;
    assert!(plain.starts_with("HTTP/1.1 426"), "{plain}");
    let post = ask("POST /touchgate/carrier HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let other = ask("GET /admin HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    let no_protocol = ask(
        "GET /touchgate/carrier HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(no_protocol.starts_with("HTTP/1.1 400"), "{no_protocol}");
    let huge_head = format!(
        "GET / HTTP/1.1\r\nHost: gw\r\nX-Fill: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let leaked: &'static str = Box::leak(huge_head.into_boxed_str());
    let huge = ask(leaked).await;
    assert!(
        huge.starts_with("HTTP/1.1 431") || huge.is_empty(),
        "{huge}"
    );
    // A browser's WebSocket (it always sends Origin) is refused: a page must not open carriers.
    let from_a_page = ask(
        "GET /touchgate/carrier HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: touchgate-quic.v1\r\nOrigin: https://evil.example\r\n\r\n",
    )
    .await;
    assert!(from_a_page.starts_with("HTTP/1.1 403"), "{from_a_page}");
    let garbage = ask("\x16\x03\x01 not http at all\r\n\r\n").await;
    assert!(
        garbage.starts_with("HTTP/1.1 400") || garbage.is_empty(),
        "{garbage}"
    );
    let refused = seen.refused.lock().expect("lock").clone();
    let statuses: Vec<u16> = refused.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        statuses,
        [426, 405, 404, 400, 431, 403, 400],
        "each refusal reported, hyper's own too: {refused:?}"
    );
}

#[tokio::test]
async fn the_client_is_the_tcp_peer_unless_the_front_end_is_trusted_to_name_it() {
    let upgrade = |addr: SocketAddr| async move {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
        tcp.write_all(
            b"GET /touchgate/carrier HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Protocol: touchgate-quic.v1\r\n\
              X-Forwarded-For: 192.0.2.66\r\nX-Forwarded-For: 198.51.100.7, 203.0.113.9\r\n\r\n",
        )
        .await
        .expect("write");
        let mut head = [0u8; 12];
        tcp.read_exact(&mut head).await.expect("answer");
        assert_eq!(&head, b"HTTP/1.1 101");
        tcp
    };
    let opened = |seen: Arc<Seen>| async move {
        for _ in 0..200 {
            if let Some(p) = seen.opened.lock().expect("lock").first() {
                return *p;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no carrier opened");
    };
    // By default a header is only a claim: the TCP peer is the client.
    let (addr, seen) = carrier_server(Hub::new(), Limits::default()).await;
    let _c = upgrade(addr).await;
    assert!(opened(seen).await.ip().is_loopback());
    // Behind a trusted front end: the address it added, last, not the ones the client wrote.
    let (addr, seen) = carrier_server_taking(
        Hub::new(),
        Limits::default(),
        server::ClientAddr::LastForwardedFor,
    )
    .await;
    let _c = upgrade(addr).await;
    assert_eq!(opened(seen).await, "203.0.113.9:0".parse().expect("addr"));
}

/// A carrier on one end of an in-memory pipe, the other end a WebSocket client.
async fn piped(
    limits: Limits,
) -> (
    Arc<Hub>,
    SocketAddr,
    tokio::task::JoinHandle<Ended>,
    tokio_tungstenite::WebSocketStream<tokio::io::DuplexStream>,
) {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let hub = Hub::new();
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        ours,
        Role::Server,
        Some(touchgate_carrier::ws_config()),
    )
    .await;
    let (addr, run) = hub.attach(ws, limits);
    let peer =
        tokio_tungstenite::WebSocketStream::from_raw_socket(theirs, Role::Client, None).await;
    (hub, addr, tokio::spawn(run), peer)
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_is_ended_instead_of_holding_the_carrier() {
    use quinn::AsyncUdpSocket as _;
    let (hub, addr, run, _peer_never_reads) = piped(Limits::default()).await;
    // QUIC sends to the carrier far more than the pipe holds; nobody reads the other end.
    let datagram = [7u8; 1200];
    for _ in 0..200 {
        hub.try_send(&quinn::udp::Transmit {
            destination: addr,
            ecn: None,
            contents: &datagram,
            segment_size: None,
            src_ip: None,
        })
        .expect("send");
        tokio::task::yield_now().await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("ended in time")
        .expect("join");
    assert!(
        matches!(&ended, Ended::Refused(why) if why.contains("not reading")),
        "{ended:?}"
    );
    assert_eq!(hub.carriers(), 0, "the carrier is gone from the hub");
}

#[tokio::test(start_paused = true)]
async fn pings_neither_keep_a_carrier_alive_nor_escape_the_rate() {
    let limits = Limits {
        idle: Duration::from_secs(1),
        messages_per_second: 100,
    };
    // Pings every 400 ms, and no datagram: idle all the same.
    let (_hub, _addr, run, mut peer) = piped(limits).await;
    let pinger = tokio::spawn(async move {
        loop {
            if peer
                .send(Message::Ping(Bytes::from_static(b"hi")))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    });
    let ended = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("ended")
        .expect("join");
    assert_eq!(ended, Ended::Idle);
    pinger.abort();
    // A flood of pings is a flood.
    let (_hub, _addr, run, mut peer) = piped(limits).await;
    for _ in 0..500 {
        if peer.feed(Message::Ping(Bytes::new())).await.is_err() {
            break;
        }
    }
    let _ = peer.flush().await;
    let ended = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("ended")
        .expect("join");
    assert!(
        matches!(&ended, Ended::Refused(why) if why.contains("messages in a second")),
        "{ended:?}"
    );
}

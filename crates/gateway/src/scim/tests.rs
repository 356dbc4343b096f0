//! The endpoint's HTTP shell on a real socket: HTTPS with the gateway's certificate by default,
//! the bearer token, body limits, and the config checks of `[scim]`.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::*;
use crate::GatewayConfig;

const TOKEN: &str = "0123456789abcdef0123456789abcdef-test-token";

/// A gateway config in `dir` with `[scim]` (`extra` lines in it) and a token file of `mode`.
fn config(dir: &Path, extra: &str, mode: u32) -> std::path::PathBuf {
    let cert = crate::tls::generate_dev_cert(&["localhost".into()]).expect("cert");
    crate::tls::write_dev_cert(dir, &cert).expect("write cert");
    let token = dir.join("scim.token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    #[cfg(not(unix))]
    let _ = mode;
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\nrp_id = \"localhost\"\ndatabase = \"gw.db\"\n\
             [tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n[id_tokens]\nsource = \"none\"\n\
             [scim]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"scim.token\"\n{extra}"
        ),
    )
    .expect("config");
    path
}

/// A gateway serving SCIM on 127.0.0.1 port 0, over HTTPS, with `extra` lines in `[scim]`.
async fn https_gateway(dir: &Path, extra: &str) -> SocketAddr {
    let cfg = GatewayConfig::load(&config(dir, extra, 0o600)).expect("config");
    let gw = Gateway::new(cfg).expect("gateway");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(gw.serve_scim(listener));
    addr
}

/// One HTTPS request trusting only the certificate in `dir`.
async fn https(
    dir: &Path,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, http::HeaderMap, Value) {
    let mut roots = rustls::RootCertStore::empty();
    for c in crate::tls::load_certs(&dir.join("cert.pem")).expect("certs") {
        roots.add(c).expect("root");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the gateway's certificate");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http");
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, format!("localhost:{}", addr.port()))
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/scim+json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (parts.status, parts.headers, v)
}

#[tokio::test]
async fn scim_is_served_over_https_with_the_gateways_certificate_by_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = https_gateway(dir.path(), "").await;
    let d = dir.path();

    let user = json!({"userName": "alice@example.com", "active": true});
    let (status, headers, v) = https(d, addr, "POST", "/scim/v2/Users", TOKEN, Some(user)).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let location = format!(
        "https://localhost:{}/scim/v2/Users/{}",
        addr.port(),
        v["id"].as_str().expect("id")
    );
    assert_eq!(v["meta"]["location"], location.as_str());
    assert_eq!(headers[header::LOCATION], location.as_str());
    assert_eq!(headers[header::CONTENT_TYPE], "application/scim+json");

    let (status, headers, v) = https(d, addr, "GET", "/scim/v2/Users", "not-the-token", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers.contains_key(header::WWW_AUTHENTICATE));
    assert_eq!(v["status"], "401");

    let (status, _, v) = https(
        d,
        addr,
        "GET",
        "/scim/v2/ServiceProviderConfig",
        TOKEN,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["bulk"]["supported"], false);
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = https_gateway(dir.path(), "max_body_bytes = 4096\n").await;
    let big = json!({"userName": "alice@example.com", "displayName": "x".repeat(8 * 1024)});
    let (status, _, v) = https(dir.path(), addr, "POST", "/scim/v2/Users", TOKEN, Some(big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        v["detail"]
            .as_str()
            .is_some_and(|d| d.contains("max_body_bytes")),
        "{v}"
    );
}

/// The problems of a `[scim]` config with `extra` lines, once `change` is made to it.
fn problems_with(extra: &str, change: impl FnOnce(&mut GatewayConfig)) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = GatewayConfig::parse(&config(dir.path(), extra, 0o600)).expect("parse");
    change(&mut cfg);
    cfg.problems()
}

#[test]
fn plain_http_is_refused_off_loopback_and_said_out_loud_on_it() {
    let plain = "insecure_plain_http = true\n";
    assert_eq!(problems_with(plain, |_| {}), Vec::<String>::new());
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = GatewayConfig::parse(&config(dir.path(), plain, 0o600)).expect("parse");
    assert!(
        cfg.warnings()
            .iter()
            .any(|w| w.contains("insecure_plain_http"))
    );

    let problems = problems_with(plain, |cfg| {
        if let Some(s) = cfg.scim.as_mut() {
            s.listen = "0.0.0.0:8443".parse().expect("addr");
        }
    });
    assert!(
        problems
            .iter()
            .any(|p| p.contains("only on a loopback listen address")),
        "{problems:?}"
    );
}

#[test]
fn scim_on_the_admin_port_is_a_problem() {
    let problems = problems_with("", |cfg| {
        let admin = cfg.admin_listen;
        if let Some(s) = cfg.scim.as_mut() {
            s.listen = admin;
        }
    });
    assert!(
        problems.iter().any(|p| p.contains("admin port")),
        "{problems:?}"
    );
}

#[cfg(unix)]
#[test]
fn a_token_file_others_can_read_or_a_short_token_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = GatewayConfig::parse(&config(dir.path(), "", 0o644)).expect("parse");
    let problems = cfg.file_problems();
    assert!(
        problems.iter().any(|p| p.contains("chmod 600")),
        "{problems:?}"
    );
    let Err(e) = Gateway::new(cfg) else {
        panic!("a gateway started with a world-readable token file")
    };
    assert!(e.to_string().contains("[scim] token_file"), "{e}");

    let token = dir.path().join("scim.token");
    std::fs::write(&token, "short").expect("write");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    assert!(
        read_token(&token)
            .expect_err("short")
            .contains("openssl rand")
    );
    std::fs::remove_file(&token).expect("rm");
    assert!(
        read_token(&token)
            .expect_err("missing")
            .contains("cannot read")
    );
}

#[test]
fn the_token_matches_itself_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    config(dir.path(), "", 0o600);
    let t = read_token(&dir.path().join("scim.token")).expect("token");
    assert!(t.matches(TOKEN.as_bytes()));
    assert!(!t.matches(b""));
    assert!(!t.matches(&TOKEN.as_bytes()[1..]));
    assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
    assert_eq!(bearer(b"Basic abc"), None);
    assert_eq!(format!("{t:?}"), "TokenDigest(…)");
}

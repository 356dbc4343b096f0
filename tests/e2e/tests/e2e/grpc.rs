//! gRPC through the tunnel with a real third-party stack (grpcio, Debian's python3-grpcio): a
//! server behind the gateway, a client on the agent's local port. Unary with trailing metadata,
//! server streaming, bidirectional streaming, an error with details and trailing metadata, and
//! a deadline all behave as against the server directly, over h2c and over TLS behind a
//! company CA (`upstream_ca`, HTTP/2 by ALPN).

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, Command, Stdio},
    time::Duration,
};

use touchgate_agent::{RunningAgent, config::Transport};
use touchgate_e2e::enrolled;
use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";
const PYTHON: &str = "/usr/bin/python3";

fn peer_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc/peer.py")
}

/// The grpcio server, stopped when dropped (its stdin closes).
struct GrpcServer {
    child: Child,
    port: u16,
}

impl GrpcServer {
    /// Plain HTTP/2 (h2c), or TLS with the certificate and key PEM files in `tls`.
    fn start(tls: Option<(&std::path::Path, &std::path::Path)>) -> anyhow::Result<Self> {
        let mut child = Command::new(PYTHON)
            .arg(peer_script())
            .arg("server")
            .args(tls.into_iter().flat_map(|(c, k)| [c, k]))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot start {PYTHON} (this test needs Debian's python3-grpcio; the test command installs it): {e}"
                )
            })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let port = line.trim().parse().map_err(|_| {
            anyhow::anyhow!(
                "the grpcio server did not print its port (is python3-grpcio installed?): {line:?}"
            )
        })?;
        Ok(Self { child, port })
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        drop(self.child.stdin.take().map(|mut s| s.flush()));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the grpcio client against `target` and returns what it saw.
async fn client(target: String) -> anyhow::Result<serde_json::Value> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            Command::new(PYTHON)
                .arg(peer_script())
                .arg("client")
                .arg(target)
                .output()
        }),
    )
    .await???;
    anyhow::ensure!(
        out.status.success(),
        "the grpcio client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[tokio::test]
async fn a_grpcio_client_reaches_a_grpcio_server_through_the_tunnel() -> anyhow::Result<()> {
    let server = GrpcServer::start(None)?;
    // The `api` service now points at the gRPC server (plain HTTP: h2c behind the gateway).
    every_call_works(
        &format!("upstream = \"http://127.0.0.1:{}\"", server.port),
        None,
        Transport::Auto,
    )
    .await
}

#[tokio::test]
async fn a_grpcio_client_reaches_a_grpcio_server_over_the_tcp_carrier_too() -> anyhow::Result<()> {
    let server = GrpcServer::start(None)?;
    every_call_works(
        &format!("upstream = \"http://127.0.0.1:{}\"", server.port),
        None,
        Transport::Tcp,
    )
    .await
}

#[tokio::test]
async fn a_grpcio_server_over_tls_behind_a_company_ca_is_reached_too() -> anyhow::Result<()> {
    let ca = touchgate_testkit::PrivateCa::new()?;
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::write(&cert, &ca.leaf_pem.0)?;
    std::fs::write(&key, &ca.leaf_pem.1)?;
    let server = GrpcServer::start(Some((&cert, &key)))?;
    // HTTPS to the server, HTTP/2 chosen by ALPN, its certificate checked against the CA.
    every_call_works(
        &format!(
            "upstream = \"https://localhost:{}\"\nupstream_ca = \"company-ca.pem\"",
            server.port
        ),
        Some(&ca.ca_pem),
        Transport::Auto,
    )
    .await
}

/// Points `api` at the gRPC server with `upstream` (TOML lines), writes `ca_pem` beside the
/// gateway config, and checks every kind of call through the agent's port, the agent reaching
/// the gateway over `transport`.
async fn every_call_works(
    upstream: &str,
    ca_pem: Option<&str>,
    transport: Transport,
) -> anyhow::Result<()> {
    let mut lab = Lab::start(LabOptions::default()).await?;
    if let Some(pem) = ca_pem {
        std::fs::write(lab.dir.path().join("company-ca.pem"), pem)?;
    }
    let fake = lab.upstream.url();
    lab.reconfigure(
        &format!("name = \"api\"\nkind = \"http\"\nupstream = \"{fake}\""),
        &format!("name = \"api\"\nkind = \"http\"\n{upstream}"),
    )
    .await?;
    let (mut cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    cfg.transport = transport;
    let agent = RunningAgent::start(cfg, authn).await?;
    assert_eq!(
        agent.transport().is_some_and(|t| t.starts_with("TCP")),
        transport == Transport::Tcp
    );
    let api = agent.local_addr("api").expect("api");

    let seen = client(format!("127.0.0.1:{}", api.port())).await?;
    assert_eq!(seen["unary"]["echo"], "hello", "{seen}");
    // The service learns who called from the gateway, and a forged assertion never arrives.
    assert_eq!(seen["unary"]["user"], ALICE, "{seen}");
    assert_eq!(seen["unary"]["forged_assertion"], false, "{seen}");
    assert_eq!(seen["unary_trailer"], "peer.py", "{seen}");
    assert_eq!(
        seen["server_stream"],
        serde_json::json!(["n-0", "n-1", "n-2"])
    );
    assert_eq!(
        seen["bidi"],
        serde_json::json!(["echo:a", "echo:b", "echo:c"])
    );
    assert_eq!(seen["not_found"]["code"], "NOT_FOUND", "{seen}");
    assert_eq!(
        seen["not_found"]["details"], "no such item: item-7",
        "{seen}"
    );
    assert_eq!(seen["not_found"]["why"], "gone", "{seen}");
    assert_eq!(seen["deadline"]["code"], "DEADLINE_EXCEEDED", "{seen}");
    assert!(
        seen["deadline"]["seconds"]
            .as_f64()
            .is_some_and(|s| s < 1.5),
        "{seen}"
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_service_with_http2_gets_every_request_over_h2c() -> anyhow::Result<()> {
    let mut lab = Lab::start(LabOptions::default()).await?;
    let upstream = lab.upstream.url();
    let api = format!("name = \"api\"\nkind = \"http\"\nupstream = \"{upstream}\"");
    lab.reconfigure(&api, &format!("{api}\nhttp2 = true"))
        .await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    // A plain HTTP/1.1 tool; the gateway speaks HTTP/2 to the upstream.
    let seen = touchgate_e2e::get(agent.local_addr("api").expect("api"), "/v1", &[])
        .await?
        .json()?;
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    assert_eq!(seen["headers"]["x-touchgate-user"], ALICE);
    agent.shutdown().await;
    Ok(())
}

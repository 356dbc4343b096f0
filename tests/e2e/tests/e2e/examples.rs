//! The example configs in the README work together.

use std::{convert::Infallible, path::Path};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use touchgate_agent::{AgentConfig, RunningAgent};
use touchgate_e2e::{get, soft_authn};
use touchgate_gateway::{Gateway, GatewayConfig, tls};

async fn plain_upstream() -> anyhow::Result<std::net::SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                TokioIo::new(s),
                hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"hello from examples",
                    ))))
                }),
            ));
        }
    });
    Ok(addr)
}

#[tokio::test]
async fn example_gateway_and_agent_configs_work_together() -> anyhow::Result<()> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let dir = tempfile::tempdir()?;
    let cert = tls::generate_dev_cert(&["localhost".into()])?;
    tls::write_dev_cert(dir.path(), &cert)?;
    std::fs::copy(
        examples.join("gateway.toml"),
        dir.path().join("gateway.toml"),
    )?;
    let agent_text = std::fs::read_to_string(examples.join("agent.toml"))?.replace(
        "REPLACE-WITH-THE-64-HEX-DIGITS-FROM-GEN-CERT",
        &cert.fingerprint,
    );
    std::fs::write(dir.path().join("agent.toml"), agent_text)?;

    // The examples name fixed ports; a test binds port 0 and its own upstream.
    let mut gw_cfg = GatewayConfig::load(&dir.path().join("gateway.toml"))?;
    gw_cfg.listen = "127.0.0.1:0".parse()?;
    gw_cfg.services[0].upstream = format!("http://{}", plain_upstream().await?);
    let gateway = Gateway::new(gw_cfg)?;
    let endpoint = gateway.endpoint(std::net::UdpSocket::bind("127.0.0.1:0")?)?;
    let quic = endpoint.local_addr()?;
    tokio::spawn(gateway.clone().serve_quic(endpoint.clone()));

    let mut cfg = AgentConfig::load(&dir.path().join("agent.toml"))?;
    cfg.gateway = quic.to_string().into();
    cfg.services[0].local_port = 0;
    let key_path = match cfg.authenticator_choice().map_err(anyhow::Error::msg)? {
        touchgate_agent::config::AuthenticatorChoice::Soft(p) => p,
        other => anyhow::bail!("example agent should use a software key, has {other:?}"),
    };
    let authn = soft_authn(&key_path)?;
    touchgate_agent::enroll(&cfg, &authn, &gateway.create_invite(&cfg.user)?).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let answer = get(agent.local_addr("web").expect("web"), "/", &[]).await?;
    assert_eq!(answer.status, 200);
    assert_eq!(&answer.body[..], b"hello from examples");
    agent.shutdown().await;
    endpoint.close(0u32.into(), b"done");
    Ok(())
}

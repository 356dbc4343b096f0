//! The demo's story: a [`Lab`] (gateway, metadata server, Cloud-Run-like service), a software
//! key enrolled with a fresh invite, the agent, and one request through the tunnel, each step
//! printed as it happens.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use touchgate_agent::{RunningAgent, authenticator::soft::SoftKey, config::AgentConfig};
use touchgate_testkit::lab::{Lab, LabOptions};

const DEMO_USER: &str = "demo@touchgate.dev";

pub async fn run(once: bool, port: u16) -> anyhow::Result<std::process::ExitCode> {
    println!(
        "touchgate demo: gateway, Cloud-Run-like service, software key and agent, all on this machine\n"
    );
    let lab = Lab::start(LabOptions::default())
        .await
        .context("cannot start the demo gateway")?;
    println!(
        "  gateway      QUIC on udp/{} (self-signed certificate, SHA-256 {}…)",
        lab.quic_addr,
        &lab.fingerprint[..16]
    );
    println!(
        "               the same over TCP at tcp/{} (TLS), for networks that drop UDP",
        lab.carrier_addr()
    );
    println!("               admin http://{}/metrics", lab.admin_addr);
    println!(
        "  metadata     {} (mints Google-style ID tokens)",
        lab.metadata.url()
    );
    println!(
        "  service api  {} (like Cloud Run: refuses calls without an ID token)",
        lab.upstream.url()
    );

    let direct = get(&format!("{}/hello", lab.upstream.url())).await?;
    println!(
        "               a direct call without a token gets: HTTP {}",
        direct.0
    );

    let code = lab.invite(DEMO_USER)?;
    let key_path = lab.dir.path().join("demo-soft-key.json");
    let mut cfg = lab.agent_config(DEMO_USER, &key_path, &[])?;
    cfg.services.retain(|s| s.name == "api");
    cfg.services[0].local_port = pick_port(port).await;
    cfg.control_socket = Some(lab.dir.path().join("agent.sock"));
    let key = SoftKey::open_or_create(&key_path)?;
    let authn: touchgate_agent::SharedAuthn = Arc::new(Mutex::new(Box::new(key)));
    let cred = touchgate_agent::enroll(&cfg, &authn, &code)
        .await
        .context("enrolment failed")?;
    println!(
        "\n  enrolled     a software key for {DEMO_USER} with a one-time invite (credential {}…)",
        &cred[..12.min(cred.len())]
    );

    let agent = start_agent(cfg, authn).await?;
    let addr = agent
        .local_addr("api")
        .context("no local listener for api")?;
    if let Some(s) = agent.session() {
        println!(
            "  signed in    one touch, session bound to this agent's in-memory key for {}",
            touchgate_agent::controller::time_left(s.expires_at, touchgate_agent::unix_now())
        );
    }
    if let Some(transport) = agent.transport() {
        println!("  connected    over {transport}");
    }
    println!("\n  service api on http://{addr}\n");
    println!("  try it:  curl -s http://{addr}/hello\n");

    let (status, body) = get(&format!("http://{addr}/hello")).await?;
    let ok = status == 200;
    println!("  request through the tunnel: HTTP {status}");
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
        println!(
            "    upstream saw user      {}",
            v["headers"]["x-touchgate-user"].as_str().unwrap_or("?")
        );
        println!(
            "    upstream saw ID token  aud {} from {}",
            v["id_token"]["aud"].as_str().unwrap_or("?"),
            v["id_token"]["email"].as_str().unwrap_or("?")
        );
        println!(
            "    identity assertion     {} bytes, verifiable with http://{}/.well-known/jwks.json",
            v["headers"]["x-touchgate-assertion"]
                .as_str()
                .map(str::len)
                .unwrap_or(0),
            lab.admin_addr
        );
    } else {
        println!("    {}", String::from_utf8_lossy(&body));
    }
    if once {
        agent.shutdown().await;
        return Ok(if ok {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        });
    }
    println!("\nServing until Ctrl-C.");
    let _ = tokio::signal::ctrl_c().await;
    agent.shutdown().await;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn start_agent(
    cfg: AgentConfig,
    authn: touchgate_agent::SharedAuthn,
) -> anyhow::Result<RunningAgent> {
    RunningAgent::start(cfg, authn)
        .await
        .context("sign-in failed")
}

async fn pick_port(port: u16) -> u16 {
    match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(_) => port,
        Err(_) => {
            eprintln!("  (port {port} is taken; using a free port instead)");
            0
        }
    }
}

async fn get(url: &str) -> anyhow::Result<(u16, Bytes)> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: hyper::Uri = url.parse()?;
    let resp = tokio::time::timeout(Duration::from_secs(15), client.get(uri))
        .await
        .context("request timed out")?
        .context("request failed")?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

//! Another OS user of the same machine cannot ride the session through the agent's local port
//! (Linux): their connection is closed before any stream is opened, while the agent's own user
//! is served on the same port; `allow_other_users = true` serves both.
//!
//! The other user is `nobody` (uid 65534), reached with `setpriv`, so these tests need root
//! (CI runs as root). Run as another user they fail and say so.

#![cfg(target_os = "linux")]

use std::{net::SocketAddr, time::Duration};

use touchgate_agent::RunningAgent;
use touchgate_e2e::{enrolled, get};
use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";
const NOBODY: u32 = 65534;

#[tokio::test]
async fn another_users_connection_is_closed_while_the_own_users_is_served() -> anyhow::Result<()> {
    needs_root()?;
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    assert!(
        !cfg.allow_other_users,
        "the default serves only the agent's own user"
    );
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").expect("api");

    let before = lab.upstream.request_count();
    let theirs = request_as_nobody(api).await?;
    assert!(
        theirs.is_empty(),
        "another user's request was answered:\n{theirs}"
    );
    assert_eq!(
        lab.upstream.request_count(),
        before,
        "another user's request reached the service"
    );
    let ours = get(api, "/mine", &[]).await?;
    assert_eq!(ours.status, 200);
    assert_eq!(ours.json()?["headers"]["x-touchgate-user"], ALICE);
    assert_eq!(lab.upstream.request_count(), before + 1);
    agent.shutdown().await;
    Ok(())
}

/// The by-name port is the agent's too: another user naming a service there gets nothing
/// (not even the list), while the agent's own user is served by name.
#[tokio::test]
async fn another_user_cannot_use_the_by_name_port_either() -> anyhow::Result<()> {
    needs_root()?;
    let lab = Lab::start(LabOptions::default()).await?;
    let (mut cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    cfg.router_port = Some(0);
    let agent = RunningAgent::start(cfg, authn).await?;
    let router = agent.router_addr().expect("by-name port");
    let before = lab.upstream.request_count();
    for host in ["api.localhost", "localhost"] {
        let theirs = request_as_nobody_to(router, host).await?;
        assert!(
            theirs.is_empty(),
            "{host}: another user was answered:\n{theirs}"
        );
    }
    assert_eq!(lab.upstream.request_count(), before);
    let host = format!("api.localhost:{}", router.port());
    let ours = touchgate_e2e::request(router, "GET", "/mine", &host, &[]).await?;
    assert_eq!(ours.status, 200);
    assert_eq!(ours.json()?["headers"]["x-touchgate-user"], ALICE);
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn with_allow_other_users_another_users_connection_is_served() -> anyhow::Result<()> {
    needs_root()?;
    let lab = Lab::start(LabOptions::default()).await?;
    let (mut cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    cfg.allow_other_users = true;
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").expect("api");

    let theirs = request_as_nobody(api).await?;
    assert!(theirs.starts_with("HTTP/1.1 200"), "{theirs}");
    assert!(theirs.contains(ALICE), "{theirs}");
    assert_eq!(get(api, "/mine", &[]).await?.status, 200);
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn another_user_cannot_take_the_ipv6_side_of_the_port() -> anyhow::Result<()> {
    needs_root()?;
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let port = agent.local_addr("api").expect("api").port();
    // `localhost` may resolve to ::1 first: the agent holds that side too, and serves it.
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    assert_eq!(get(v6, "/over-v6", &[]).await?.status, 200);
    let bind = as_nobody(&format!(
        "exec perl -MIO::Socket::IP -e 'IO::Socket::IP->new(LocalHost => q(::1), LocalPort => {port}, Listen => 1, ReuseAddr => 1) or exit 7; exit 0'"
    ))
    .await?;
    assert_eq!(
        bind.status.code(),
        Some(7),
        "user nobody could listen on [::1]:{port} beside the agent: {}",
        String::from_utf8_lossy(&bind.stderr)
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_agent_refuses_to_start_when_the_ipv6_side_of_its_port_is_taken() -> anyhow::Result<()>
{
    let lab = Lab::start(LabOptions::default()).await?;
    let (mut cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    // Someone already listens on [::1]:PORT (here: this test).
    let squatter = std::net::TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 0))?;
    let port = squatter.local_addr()?.port();
    cfg.services.retain(|s| s.name == "api");
    cfg.services[0].local_port = port;
    let err = match RunningAgent::start(cfg, authn).await {
        Ok(_) => anyhow::bail!("the agent started beside a program holding [::1]:{port}"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!("[::1]:{port}")) && err.contains("localhost"),
        "{err}"
    );
    Ok(())
}

/// Runs a shell command as user nobody; its output.
async fn as_nobody(script: &str) -> anyhow::Result<std::process::Output> {
    let uid = NOBODY.to_string();
    let script = script.to_owned();
    Ok(tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("setpriv")
                .args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    "bash",
                    "-c",
                    &script,
                ])
                .output()
        }),
    )
    .await???)
}

/// Fails the test, saying why, unless it runs as root (it must become another user).
fn needs_root() -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self")?.uid();
    anyhow::ensure!(
        uid == 0,
        "this test needs root (it runs as uid {uid}): it connects as user nobody through setpriv; run it as root, as CI does"
    );
    Ok(())
}

/// Sends one HTTP request to `addr` from a process running as `nobody`, and returns what came
/// back (empty when the connection was closed without an answer).
async fn request_as_nobody(addr: SocketAddr) -> anyhow::Result<String> {
    request_as_nobody_to(addr, "localhost").await
}

/// [`request_as_nobody`] naming `host` in the request.
async fn request_as_nobody_to(addr: SocketAddr, host: &str) -> anyhow::Result<String> {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} || exit 3; \
         printf 'GET /theirs HTTP/1.1\\r\\nhost: {host}\\r\\nconnection: close\\r\\n\\r\\n' >&3; \
         cat <&3",
        port = addr.port()
    );
    let out = as_nobody(&script).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // `cat` ends with "connection reset" when the agent closes at once; that is the refusal.
    anyhow::ensure!(
        out.status.code() != Some(3),
        "user nobody could not connect to {addr}: {stderr}"
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

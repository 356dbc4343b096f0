//! Helpers for touchgate's end-to-end tests: enrolled agents and plain HTTP clients on real
//! loopback sockets.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use touchgate_agent::{AgentConfig, SharedAuthn, authenticator::soft::SoftKey};
use touchgate_testkit::lab::Lab;

/// An agent config and software key for `user`, enrolled with a fresh invite.
pub async fn enrolled(
    lab: &Lab,
    user: &str,
    extra: &[&str],
) -> anyhow::Result<(AgentConfig, SharedAuthn, PathBuf)> {
    let key_path = lab
        .dir
        .path()
        .join(format!("{}.softkey", user.replace('@', "_")));
    let cfg = lab.agent_config(user, &key_path, extra)?;
    let authn = soft_authn(&key_path)?;
    let code = lab.invite(user)?;
    touchgate_agent::enroll(&cfg, &authn, &code).await?;
    Ok((cfg, authn, key_path))
}

/// Opens (or creates) the software key at `path`.
pub fn soft_authn(path: &std::path::Path) -> anyhow::Result<SharedAuthn> {
    Ok(Arc::new(Mutex::new(Box::new(SoftKey::open_or_create(
        path,
    )?))))
}

/// A response, fully read.
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_slice(&self.body)?)
    }
}

/// A new HTTP/1.1 client connection to `addr` (driven by a background task).
pub async fn http1<B>(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One HTTP/1.1 request on a new TCP connection to `addr`, with extra headers.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Answer> {
    let mut sender = http1(addr).await?;
    let mut req = hyper::Request::get(path).header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new())?)
        .await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Answer { status, body })
}

/// Starts `GET /bytes?n=N` (the upstream's bulk pattern) on a new connection to `addr` and
/// returns the streaming response body.
pub async fn bulk_download(addr: SocketAddr, n: u64) -> anyhow::Result<hyper::body::Incoming> {
    let mut sender = http1(addr).await?;
    let req = hyper::Request::get(format!("/bytes?n={n}"))
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())?;
    Ok(sender.send_request(req).await?.into_body())
}

/// Waits (at most `within`) until the agent's state satisfies `done`; the current state counts.
/// The state channel keeps only the newest value, so wait for a lasting state, not a step.
pub async fn wait_for_state(
    agent: &touchgate_agent::RunningAgent,
    within: std::time::Duration,
    mut done: impl FnMut(&touchgate_agent::AgentState) -> bool,
) -> anyhow::Result<()> {
    let mut state = agent.state();
    tokio::time::timeout(within, async {
        loop {
            if done(&state.borrow_and_update()) {
                return Ok(());
            }
            state.changed().await?;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("the agent did not reach the expected state within {within:?}"))?
}

/// True when the agent is connected on another QUIC connection than `old` (a stable id).
pub fn connected_anew(
    agent: &touchgate_agent::RunningAgent,
    state: &touchgate_agent::AgentState,
    old: usize,
) -> bool {
    matches!(state, touchgate_agent::AgentState::Connected { .. })
        && agent.connection().is_some_and(|c| c.stable_id() != old)
}

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

/// One HTTP/1.1 request on a new TCP connection to `addr`, with extra headers.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Answer> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
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
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(format!("/bytes?n={n}"))
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())?;
    Ok(sender.send_request(req).await?.into_body())
}

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
use std::time::Duration;

use touchgate_agent::{
    AgentConfig, SharedAuthn,
    authenticator::{
        device::FidoDevice,
        hid::{HidAuthenticator, Prompter},
        soft::SoftKey,
    },
    controller::{Notice, Ui, View},
};
use touchgate_testkit::{
    hardware::{FakeHardwareKey, Vendor},
    lab::{Lab, LabOptions},
};

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
    request(addr, "GET", path, "localhost", headers).await
}

/// A new HTTP/2 (prior knowledge) client connection to `addr`, driven by a background task.
pub async fn http2<B>(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http2::SendRequest<B>>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One HTTP/1.1 request with `method`, `Host` and extra headers on a new TCP connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Answer> {
    let mut sender = http1(addr).await?;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
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

/// A HID authenticator over one fake hardware key.
pub fn hid(key: &Arc<FakeHardwareKey>, prompter: Arc<dyn Prompter>) -> anyhow::Result<SharedAuthn> {
    let dev: Arc<dyn FidoDevice> = key.clone();
    let a = HidAuthenticator::new(vec![dev], None, prompter, Duration::from_secs(10))?;
    Ok(Arc::new(Mutex::new(Box::new(a))))
}

/// A lab whose gateway trusts `vendor`'s root for the models `aaguids` (software keys refused);
/// `extra` goes into the `[attestation]` table.
pub async fn lab_trusting(
    vendor: &Vendor,
    aaguids: &[[u8; 16]],
    extra: &str,
) -> anyhow::Result<(tempfile::TempDir, Lab)> {
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("vendor-root.pem");
    std::fs::write(&ca, vendor.ca_pem())?;
    let list = aaguids
        .iter()
        .map(|a| {
            format!(
                "{:?}",
                touchgate_agent::authenticator::device::format_aaguid(a)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let lab = Lab::start(LabOptions {
        allow_software: false,
        attestation: format!(
            "{extra}\n[[attestation.trusted]]\nca = {:?}\naaguids = [{list}]\ndescription = \"Test Vendor\"\n",
            ca.display().to_string()
        ),
        ..Default::default()
    })
    .await?;
    Ok((dir, lab))
}

/// A front end that records every view and notice, for controller tests.
pub struct FakeUi {
    views: Mutex<Vec<View>>,
    notices: Mutex<Vec<Notice>>,
    changed: tokio::sync::watch::Sender<usize>,
}

impl Default for FakeUi {
    fn default() -> Self {
        Self {
            views: Mutex::new(Vec::new()),
            notices: Mutex::new(Vec::new()),
            changed: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Ui for FakeUi {
    fn show(&self, view: &View) {
        self.views
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(view.clone());
        self.changed.send_modify(|n| *n += 1);
    }

    fn notify(&self, notice: &Notice) {
        self.notices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(notice.clone());
        self.changed.send_modify(|n| *n += 1);
    }
}

impl FakeUi {
    /// The phases shown so far, by kind (`"connected"`), repeats folded; a touch or PIN prompt
    /// carries its purpose (`"waiting_for_touch:renew"`).
    pub fn phases(&self) -> Vec<String> {
        let views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<String> = Vec::new();
        for v in views.iter() {
            let j = serde_json::to_value(&v.phase).unwrap_or_default();
            let mut kind = j["kind"].as_str().unwrap_or("?").to_owned();
            if let Some(p) = j["purpose"].as_str() {
                kind = format!("{kind}:{p}");
            }
            if out.last() != Some(&kind) {
                out.push(kind);
            }
        }
        out
    }

    /// The notices so far.
    pub fn notices(&self) -> Vec<Notice> {
        self.notices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The last view shown.
    pub fn last(&self) -> Option<View> {
        self.views
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .cloned()
    }

    /// Waits until the last view satisfies `done`.
    pub async fn wait_for(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&View) -> bool,
    ) -> anyhow::Result<View> {
        let mut rx = self.changed.subscribe();
        tokio::time::timeout(within, async {
            loop {
                if let Some(v) = self.last().filter(|v| done(v)) {
                    return Ok(v);
                }
                rx.changed().await?;
            }
        })
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the controller did not show {what} within {within:?}; phases: {:?}",
                self.phases()
            )
        })?
    }
}

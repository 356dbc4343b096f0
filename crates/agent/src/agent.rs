//! The running agent: signs in, keeps the QUIC connection up (reconnecting with the same
//! session, no new touch), and serves each configured service on a localhost port.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use touchgate_proto::{RefusalCode, SessionInfo};
use tracing::Instrument;

use touchgate_common::wire::read_frame;
use touchgate_proto::{StreamOpen, StreamReply, encode};

mod local;
mod router;

use local::{Local, bind_local, serve_local};
use router::{Router, serve_router};

use crate::{
    authenticator::Authenticator,
    config::AgentConfig,
    peer::OwnerCheck,
    tunnel::{Candidate, Dialer, Order, SessionKey, Tunnel, TunnelError},
};

/// An authenticator shared between the agent's tasks (calls are serialised by the mutex).
pub type SharedAuthn = Arc<Mutex<Box<dyn Authenticator>>>;

/// How often the agent checks that the signing key is still plugged in.
pub const KEY_POLL: Duration = Duration::from_secs(1);

/// Copy buffer per direction of a local connection: large enough that a bulk transfer moves in
/// few, big writes into the QUIC stream (tokio's default is 8 KiB).
const COPY_BUF: usize = 64 * 1024;

/// How long a local connection waits for the tunnel before it is closed.
pub const LOCAL_WAIT: Duration = Duration::from_secs(10);

/// What the agent says when the gateway refuses the user because an admin disabled the account
/// (unless the gateway's own message says so).
pub const ACCOUNT_DISABLED: &str = "your account is disabled on this gateway; ask your admin";

/// The QUIC close reason with which the gateway ends the connections of a user an admin
/// disabled.
const DISABLED_CLOSE: &str = "account disabled";

/// What the agent is doing, for front ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AgentState {
    /// Starting up.
    Starting,
    /// Waiting for the user to touch the key.
    WaitingForTouch {
        /// Which key.
        authenticator: String,
    },
    /// Connected with a live session.
    Connected {
        /// The user.
        user: String,
        /// Session expiry, seconds since the epoch.
        expires_at: u64,
        /// Services offered by the gateway.
        services: Vec<String>,
        /// Those of them that are TCP services.
        #[serde(default)]
        tcp: Vec<String>,
        /// The gateway address in use: `gw-a.example:443 (192.0.2.7:443)`.
        #[serde(default)]
        gateway: String,
        /// How it is reached, in words: `QUIC`, `TCP: UDP seems blocked on this network`…
        #[serde(default)]
        transport: String,
    },
    /// The connection dropped; reconnecting with the same session.
    Reconnecting {
        /// Attempt number (0: just lost, no attempt yet).
        attempt: u32,
        /// Why the last attempt failed.
        reason: String,
    },
    /// Signed out (session ended or refused).
    SignedOut {
        /// Why.
        reason: String,
    },
    /// The key that signed in was unplugged and `lock_on_key_removal` ended the session.
    KeyRemoved,
}

/// Errors starting the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A local port could not be bound.
    #[error(
        "cannot listen on 127.0.0.1:{port} for {service}: {source} (is another program using the port? change {setting} in the agent config)"
    )]
    Bind {
        /// What the port is for: "service NAME", or the by-name port.
        service: String,
        /// The setting that chooses the port.
        setting: &'static str,
        /// The port.
        port: u16,
        /// The error.
        source: std::io::Error,
    },
    /// Another program holds the IPv6 loopback side of a service's port.
    #[error(
        "another program holds [::1]:{port}, the IPv6 side of the local port of {service}: it would get what tools send to localhost:{port}. Stop it (see `ss -ltnp 'sport = :{port}'`), or change {setting} in the agent config"
    )]
    BindV6Taken {
        /// What the port is for.
        service: String,
        /// The setting that chooses the port.
        setting: &'static str,
        /// The port.
        port: u16,
    },
    /// Talking to the gateway failed.
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
}

/// What the agent does when the gateway ends its session (expired, revoked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSessionEnd {
    /// Ask for a touch and sign in again (the CLI: the terminal says so).
    SignInAgain,
    /// Stop in [`AgentState::SignedOut`] and let the front end ask the user (the tray app).
    Stop,
}

/// A running agent.
pub struct RunningAgent {
    listeners: Vec<(String, SocketAddr)>,
    router: Option<SocketAddr>,
    state: watch::Receiver<AgentState>,
    conn: watch::Receiver<Option<quinn::Connection>>,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    cfg: AgentConfig,
    authn: SharedAuthn,
    /// QUIC on UDP, and the TCP carrier.
    dialer: Dialer,
    state: watch::Sender<AgentState>,
    conn: watch::Sender<Option<quinn::Connection>>,
    session: Arc<Mutex<Option<SessionInfo>>>,
    tunnel: tokio::sync::Mutex<Option<Arc<Tunnel>>>,
    /// The gateway address of the live connection, for status.
    gateway: Mutex<Option<Candidate>>,
    /// The order this agent tries the gateway's addresses in.
    order: Order,
    locked: std::sync::atomic::AtomicBool,
    /// The gateway refused the user as disabled: the agent has stopped for good.
    disabled: std::sync::atomic::AtomicBool,
    on_session_end: OnSessionEnd,
    /// Shows the identity provider's sign-in page when the gateway asks for a fresh check.
    browser: crate::idp::Browser,
}

impl RunningAgent {
    /// Binds the local ports, signs in (one touch), and starts serving; signs in again when
    /// the gateway ends the session.
    pub async fn start(cfg: AgentConfig, authn: SharedAuthn) -> Result<Self, AgentError> {
        Self::start_with(cfg, authn, OnSessionEnd::SignInAgain).await
    }

    /// [`RunningAgent::start`], choosing what happens when the gateway ends the session.
    pub async fn start_with(
        cfg: AgentConfig,
        authn: SharedAuthn,
        on_session_end: OnSessionEnd,
    ) -> Result<Self, AgentError> {
        let browser: crate::idp::Browser = Arc::new(|url: &str| {
            // Said in the log too, for a machine where no browser opens.
            tracing::warn!("sign in with your organisation in the browser: {url}");
            crate::idp::system_browser(url)
        });
        Self::start_with_browser(cfg, authn, on_session_end, browser).await
    }

    /// [`RunningAgent::start_with`], showing the identity provider's sign-in page (when the
    /// gateway wants a fresh check with it) through `browser` instead of the system browser.
    pub async fn start_with_browser(
        cfg: AgentConfig,
        authn: SharedAuthn,
        on_session_end: OnSessionEnd,
        browser: crate::idp::Browser,
    ) -> Result<Self, AgentError> {
        let key = SessionKey::generate()?;
        Self::launch(cfg, authn, key, on_session_end, browser, None).await
    }

    /// Starts a headless agent on a delegated grant: no security key and no touch. Its
    /// session is the grant's token, resumed on every connection; when the gateway ends it
    /// (expired, revoked, the user disabled) the agent stops in [`AgentState::SignedOut`].
    pub async fn start_delegated(h: crate::delegation::Headless) -> Result<Self, AgentError> {
        let label = h.grant.grant.label.clone();
        let authn: SharedAuthn = Arc::new(Mutex::new(Box::new(NoKey(label))));
        let browser: crate::idp::Browser =
            Arc::new(|_: &str| Err("a delegated agent signs in with nobody's browser".to_owned()));
        let crate::delegation::Headless {
            cfg, key, token, ..
        } = h;
        Self::launch(cfg, authn, key, OnSessionEnd::Stop, browser, Some(token)).await
    }

    /// Binds the ports, starts the session (a sign-in with a touch, or `resume` of a token),
    /// and serves.
    async fn launch(
        cfg: AgentConfig,
        authn: SharedAuthn,
        key: SessionKey,
        on_session_end: OnSessionEnd,
        browser: crate::idp::Browser,
        resume: Option<String>,
    ) -> Result<Self, AgentError> {
        let dialer = Dialer::new(&cfg, &key)?;
        let mut bound = Vec::new();
        for s in &cfg.services {
            let what = format!("service {}", s.name);
            let (l, l6) = bind_local(&what, "local_port", s.local_port).await?;
            bound.push((s.name.clone(), l, l6));
        }
        let router = match cfg.router_port {
            Some(port) => Some(bind_local("the by-name port", "router_port", port).await?),
            None => None,
        };
        let (state_tx, state_rx) = watch::channel(AgentState::Starting);
        let (conn_tx, conn_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            cfg,
            authn,
            dialer,
            state: state_tx,
            conn: conn_tx,
            session: Arc::new(Mutex::new(None)),
            tunnel: tokio::sync::Mutex::new(None),
            gateway: Mutex::new(None),
            order: Order::random(),
            locked: std::sync::atomic::AtomicBool::new(false),
            disabled: std::sync::atomic::AtomicBool::new(false),
            on_session_end,
            browser,
        });
        match resume {
            None => shared.sign_in().await?,
            Some(token) => shared.resume_first(&token).await?,
        }
        let mut tasks = Vec::new();
        let mut listeners = Vec::new();
        for ((name, l, l6), svc) in bound.into_iter().zip(&shared.cfg.services) {
            let addr = l.local_addr().map_err(|source| AgentError::Bind {
                service: format!("service {name}"),
                setting: "local_port",
                port: 0,
                source,
            })?;
            listeners.push((name.clone(), addr));
            let local = Local {
                // The stream's first frame is the same for every connection: made once here.
                open: encode(&StreamOpen {
                    service: name.clone(),
                    local: Some(svc.access(addr.port())),
                })
                .into(),
                service: name.clone(),
                check_owner: !shared.cfg.allow_other_users && OwnerCheck::supported(),
            };
            let local = Arc::new(local);
            for l in std::iter::once(l).chain(l6) {
                let rx = conn_rx.clone();
                tasks.push(tokio::spawn(
                    serve_local(l, local.clone(), rx)
                        .instrument(tracing::info_span!("service", name = %name)),
                ));
            }
        }
        let mut router_addr = None;
        if let Some((l, l6)) = router {
            router_addr = l.local_addr().ok();
            let router = Arc::new(Router {
                port: router_addr.map_or(0, |a| a.port()),
                session: shared.session.clone(),
                services: shared.cfg.services.clone(),
                ports: listeners
                    .iter()
                    .map(|(n, a): &(String, SocketAddr)| (n.clone(), a.port()))
                    .collect(),
                check_owner: !shared.cfg.allow_other_users && OwnerCheck::supported(),
            });
            for l in std::iter::once(l).chain(l6) {
                tasks.push(tokio::spawn(
                    serve_router(l, router.clone(), conn_rx.clone())
                        .instrument(tracing::info_span!("router")),
                ));
            }
        }
        let s = shared.clone();
        tasks.push(tokio::spawn(async move { s.supervise().await }));
        if shared.cfg.lock_on_key_removal {
            let s = shared.clone();
            tasks.push(tokio::spawn(async move { s.watch_key().await }));
        }
        Ok(Self {
            listeners,
            router: router_addr,
            state: state_rx,
            conn: conn_rx,
            shared,
            tasks,
        })
    }

    /// The local address of each service.
    pub fn listeners(&self) -> &[(String, SocketAddr)] {
        &self.listeners
    }

    /// The by-name port's address (`router_port`), when it is on.
    pub fn router_addr(&self) -> Option<SocketAddr> {
        self.router
    }

    /// The local address of `service`.
    pub fn local_addr(&self, service: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == service)
            .map(|(_, a)| *a)
    }

    /// Watches the agent's state.
    pub fn state(&self) -> watch::Receiver<AgentState> {
        self.state.clone()
    }

    /// The current session, if any.
    pub fn session(&self) -> Option<SessionInfo> {
        self.shared
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The current QUIC connection, if any.
    pub fn connection(&self) -> Option<quinn::Connection> {
        self.conn.borrow().clone()
    }

    /// Moves the tunnel to a new UDP socket (a network change); the QUIC connection migrates
    /// and open streams carry on. The socket must be of the family in use: an IPv6 socket
    /// (dual-stack) unless every gateway address is an IPv4 one.
    pub fn rebind(&self, socket: std::net::UdpSocket) -> std::io::Result<()> {
        let endpoint = self.shared.dialer.udp();
        let (now, new) = (endpoint.local_addr()?, socket.local_addr()?);
        if now.is_ipv6() && new.is_ipv4() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the tunnel uses a dual-stack IPv6 socket ({now}), which an IPv4 one ({new}) cannot replace: bind [::]:0 instead"
                ),
            ));
        }
        endpoint.rebind(socket)
    }

    /// Whether the agent stopped because the gateway said the user's account is disabled (it
    /// is then [`AgentState::SignedOut`] and neither reconnects nor asks for a touch).
    pub fn account_disabled(&self) -> bool {
        self.shared
            .disabled
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The name of the key that signed in ("YubiKey 5 NFC", "software key PATH").
    pub fn key_name(&self) -> String {
        self.shared.key_name()
    }

    /// The gateway address the agent is connected to (`gw-a.example:443 (192.0.2.7:443)`), or
    /// `None` while it is not.
    pub fn gateway(&self) -> Option<String> {
        self.in_use().map(|g| g.to_string())
    }

    /// How the agent reaches the gateway, in words (`QUIC`, `TCP: UDP seems blocked on this
    /// network`…), or `None` while it is not connected.
    pub fn transport(&self) -> Option<String> {
        self.in_use().map(|g| g.link.describe())
    }

    fn in_use(&self) -> Option<Candidate> {
        let live = self
            .connection()
            .is_some_and(|c| c.close_reason().is_none());
        let gateway = self
            .shared
            .gateway
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        gateway.clone().filter(|_| live)
    }

    /// Renews the session on the live connection with a new touch: a fresh session with a
    /// fresh expiry, while open streams carry on. On failure the current session stays.
    pub async fn renew(&self) -> Result<SessionInfo, TunnelError> {
        self.shared.renew().await
    }

    /// The live tunnel, or why there is none.
    async fn live_tunnel(&self) -> Result<Arc<Tunnel>, TunnelError> {
        self.shared
            .tunnel
            .lock()
            .await
            .clone()
            .filter(|t| t.connection().close_reason().is_none())
            .ok_or_else(|| {
                TunnelError::Protocol(
                    "not connected to the gateway: wait for the connection to come back".into(),
                )
            })
    }

    /// The user's delegated grants, asked on the live session: no touch.
    pub async fn delegations(&self) -> Result<Vec<touchgate_proto::DelegationInfo>, TunnelError> {
        crate::delegation::list_on(&*self.live_tunnel().await?).await
    }

    /// Revokes one of the user's grants (its id or label) on the live session: no touch.
    pub async fn revoke_delegation(&self, id: &str) -> Result<String, TunnelError> {
        crate::delegation::revoke_on(&*self.live_tunnel().await?, id).await
    }

    /// Approves a grant with a touch of this agent's key, on the live connection; the grant
    /// is bound to `key`.
    pub async fn delegate(
        &self,
        request: &crate::delegation::GrantRequest,
        key: crate::delegation::DelegateKey,
    ) -> Result<crate::delegation::DelegationFile, crate::delegation::DelegationError> {
        let tunnel = self.live_tunnel().await?;
        crate::delegation::delegate_on(&tunnel, &self.shared.cfg, &self.shared.authn, request, key)
            .await
    }

    /// Closes the tunnel cleanly and stops every task.
    pub async fn shutdown(&self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(c) = self.shared.conn.send_replace(None) {
            // On a carrier, the connection is on an endpoint of its own.
            c.close(touchgate_proto::close::AGENT_DONE.into(), b"agent quitting");
        }
        let endpoint = self.shared.dialer.udp();
        endpoint.close(touchgate_proto::close::AGENT_DONE.into(), b"agent quitting");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
}

impl Shared {
    async fn sign_in(&self) -> Result<(), TunnelError> {
        let tunnel = Tunnel::dial(&self.dialer, &self.cfg, self.order).await?;
        self.login_on(tunnel).await
    }

    /// Starts on a session token made elsewhere (a delegated grant's).
    async fn resume_first(&self, token: &str) -> Result<(), TunnelError> {
        let tunnel = Tunnel::dial(&self.dialer, &self.cfg, self.order).await?;
        match tunnel.resume(token).await {
            Ok(session) => {
                self.live(tunnel, session).await;
                Ok(())
            }
            Err(e) => {
                tunnel.close(b"refused").await;
                Err(e)
            }
        }
    }

    fn key_name(&self) -> String {
        self.authn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .describe()
    }

    fn waiting_for_touch(&self) {
        self.state.send_replace(AgentState::WaitingForTouch {
            authenticator: self.key_name(),
        });
    }

    /// Asks for a touch and signs in on `tunnel`.
    async fn login_on(&self, tunnel: Tunnel) -> Result<(), TunnelError> {
        self.waiting_for_touch();
        let session = tunnel
            .login_or_recheck(
                &self.authn,
                &self.cfg.user,
                self.cfg.origin.as_deref(),
                &*self.browser,
            )
            .await?;
        self.live(tunnel, session).await;
        Ok(())
    }

    async fn renew(&self) -> Result<SessionInfo, TunnelError> {
        let tunnel = self.tunnel.lock().await.clone();
        let current = self.state.borrow().clone();
        let Some(tunnel) = tunnel.filter(|t| t.connection().close_reason().is_none()) else {
            return Err(TunnelError::Protocol(
                "not connected to the gateway: wait for the connection to come back, or sign in again".into(),
            ));
        };
        self.waiting_for_touch();
        match tunnel
            .login_or_recheck(
                &self.authn,
                &self.cfg.user,
                self.cfg.origin.as_deref(),
                &*self.browser,
            )
            .await
        {
            Ok(session) => {
                self.state.send_replace(connected_state(&session, &tunnel));
                *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(session.clone());
                Ok(session)
            }
            Err(e) => {
                match disabled_reason(&e) {
                    Some(reason) => self.stop_disabled(reason),
                    None => {
                        self.state.send_replace(current);
                    }
                }
                Err(e)
            }
        }
    }

    async fn live(&self, tunnel: Tunnel, session: SessionInfo) {
        for s in &self.cfg.services {
            if !session.services.iter().any(|o| o.name == s.name) {
                tracing::warn!(service = %s.name, "the gateway does not offer this service to you (unknown, or not allowed): connections to it will be refused");
            }
        }
        tracing::info!(gateway = %tunnel.gateway(), transport = %tunnel.link().describe(), "connected to the gateway");
        self.state.send_replace(connected_state(&session, &tunnel));
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(session);
        *self.gateway.lock().unwrap_or_else(|e| e.into_inner()) = Some(tunnel.gateway().clone());
        self.conn.send_replace(Some(tunnel.connection().clone()));
        *self.tunnel.lock().await = Some(Arc::new(tunnel));
    }

    /// Waits for the connection to drop, then reconnects with jittered backoff, resuming the
    /// session; signs in again only when the gateway refuses the session.
    /// Ends the session when the key that signed in is unplugged (`lock_on_key_removal`).
    async fn watch_key(self: Arc<Self>) {
        loop {
            tokio::time::sleep(KEY_POLL).await;
            let authn = self.authn.clone();
            let present = tokio::task::spawn_blocking(move || {
                authn.lock().unwrap_or_else(|e| e.into_inner()).present()
            })
            .await
            .ok()
            .flatten();
            if present == Some(false) {
                tracing::warn!("the security key was unplugged: ending the session");
                self.locked.store(true, std::sync::atomic::Ordering::SeqCst);
                *self.session.lock().unwrap_or_else(|e| e.into_inner()) = None;
                let conn = self.conn.send_replace(None);
                if let Some(c) = conn {
                    c.close(
                        touchgate_proto::close::AGENT_DONE.into(),
                        b"security key removed",
                    );
                }
                self.state.send_replace(AgentState::KeyRemoved);
                return;
            }
        }
    }

    /// Stops for good: the gateway refused the user as disabled. No reconnect, no touch.
    fn stop_disabled(&self, reason: String) {
        tracing::warn!(%reason, "the gateway disabled this account; stopping");
        self.disabled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.locked.store(true, std::sync::atomic::Ordering::SeqCst);
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(c) = self.conn.send_replace(None) {
            c.close(
                touchgate_proto::close::AGENT_DONE.into(),
                b"account disabled",
            );
        }
        self.state.send_replace(AgentState::SignedOut { reason });
    }

    async fn supervise(self: Arc<Self>) {
        loop {
            let mut changed = self.conn.subscribe();
            let conn = changed.borrow_and_update().clone();
            let Some(conn) = conn else { return };
            let link = self.tunnel.lock().await.as_ref().map(|t| t.link().clone());
            let on_tcp = link.as_ref().is_some_and(|l| l.is_tcp());
            // Over TCP because UDP seemed blocked: QUIC is tried again now and then.
            let retry_quic = matches!(
                link,
                Some(crate::tunnel::Link::Tcp {
                    why: crate::tunnel::carrier::Why::UdpBlocked,
                    ..
                })
            );
            let carrier_deadline = tokio::time::Instant::now() + self.cfg.carrier_max_age;
            let reason = tokio::select! {
                reason = conn.closed() => reason,
                // Another connection took over (back to QUIC, a fresh carrier): watch that one.
                _ = changed.changed() => continue,
                () = tokio::time::sleep(self.cfg.quic_retry), if retry_quic => {
                    drop(conn);
                    self.move_to_quic().await;
                    continue;
                }
                () = tokio::time::sleep_until(carrier_deadline), if on_tcp => {
                    drop(conn);
                    self.fresh_carrier().await;
                    continue;
                }
            };
            if self.locked.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            if closed_as_disabled(&reason) {
                self.stop_disabled(ACCOUNT_DISABLED.to_owned());
                return;
            }
            // The gateway just lost is tried last: with replicas, the session resumes on
            // another one at once.
            let lost = self
                .gateway
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let order = match &lost {
                Some(g) => self.order.after_losing(g.addr),
                None => self.order,
            };
            let gateway = lost.map(|g| g.to_string()).unwrap_or_default();
            tracing::warn!(%reason, %gateway, "connection to the gateway lost; reconnecting");
            self.state.send_replace(AgentState::Reconnecting {
                attempt: 0,
                reason: format!("connection lost: {reason}"),
            });
            let mut attempt = 0u32;
            let mut delay = Duration::from_millis(100);
            loop {
                attempt += 1;
                match self.reconnect(order).await {
                    Ok(()) if self.locked.load(std::sync::atomic::Ordering::SeqCst) => return,
                    Ok(()) => {
                        tracing::info!(attempt, "reconnected to the gateway");
                        break;
                    }
                    Err(e) => {
                        if let Some(reason) = disabled_reason(&e) {
                            self.stop_disabled(reason);
                            return;
                        }
                        tracing::info!(attempt, error = %e, "reconnect failed");
                        self.state.send_replace(AgentState::Reconnecting {
                            attempt,
                            reason: e.to_string(),
                        });
                    }
                }
                let jitter = rand::rng().random_range(0.8..1.2);
                tokio::time::sleep(delay.mul_f64(jitter)).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }

    /// Tries QUIC on UDP while on TCP: when it answers, the session resumes on it (no touch)
    /// and new local connections go there; those open on the carrier finish on it.
    async fn move_to_quic(&self) {
        let Ok(won) = self.dialer.dial_quic(&self.cfg, self.order).await else {
            tracing::debug!("QUIC still gets no answer: staying on TCP");
            return;
        };
        match self.take_over(Tunnel::on_won(won, &self.cfg).await).await {
            Ok(()) => tracing::info!("UDP gets through again: moved back to QUIC"),
            Err(e) => {
                tracing::info!(error = %e, "QUIC answered, but the session did not resume on it: staying on TCP")
            }
        }
    }

    /// Moves to a fresh carrier before a front end ends the old one (`carrier_max_age`);
    /// requests open on the old one finish on it.
    async fn fresh_carrier(&self) {
        let tunnel = Tunnel::dial(&self.dialer, &self.cfg, self.order).await;
        match self.take_over(tunnel).await {
            Ok(()) => {
                tracing::info!("moved to a fresh connection before the carrier's maximum age")
            }
            Err(e) => {
                tracing::info!(error = %e, "no fresh connection yet: staying on the current one until it ends")
            }
        }
    }

    /// Resumes the session on `tunnel` and makes it the live one. The old connection is only
    /// let go: it closes by itself when the last stream on it ends.
    async fn take_over(&self, tunnel: Result<Tunnel, TunnelError>) -> Result<(), TunnelError> {
        let tunnel = tunnel?;
        if self.locked.load(std::sync::atomic::Ordering::SeqCst) {
            // The key was unplugged (or the account disabled) meanwhile: the session is over.
            tunnel.close(b"session ended").await;
            return Err(TunnelError::Protocol("the session ended meanwhile".into()));
        }
        let token = self
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|s| s.token.clone())
            .ok_or_else(|| TunnelError::Protocol("no session to resume".into()))?;
        match tunnel.resume(&token).await {
            Ok(_) if self.locked.load(std::sync::atomic::Ordering::SeqCst) => {
                tunnel.close(b"session ended").await;
                Err(TunnelError::Protocol("the session ended meanwhile".into()))
            }
            Ok(session) => {
                self.live(tunnel, session).await;
                Ok(())
            }
            Err(e) => {
                tunnel.close(b"not needed").await;
                Err(e)
            }
        }
    }

    async fn reconnect(&self, order: Order) -> Result<(), TunnelError> {
        let token = self
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|s| s.token.clone());
        let tunnel = Tunnel::dial(&self.dialer, &self.cfg, order).await?;
        if let Some(token) = token {
            match tunnel.resume(&token).await {
                Ok(session) => {
                    self.live(tunnel, session).await;
                    return Ok(());
                }
                Err(TunnelError::Refused(r))
                    if matches!(
                        r.code,
                        RefusalCode::SessionExpired
                            | RefusalCode::SessionRevoked
                            | RefusalCode::InvalidToken
                            | RefusalCode::WrongSessionKey
                    ) =>
                {
                    *self.session.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    self.state.send_replace(AgentState::SignedOut {
                        reason: r.message.clone(),
                    });
                    if self.on_session_end == OnSessionEnd::Stop {
                        tracing::warn!(reason = %r, "the session ended");
                        self.locked.store(true, std::sync::atomic::Ordering::SeqCst);
                        self.conn.send_replace(None);
                        tunnel
                            .connection()
                            .close(touchgate_proto::close::AGENT_DONE.into(), b"session ended");
                        return Ok(());
                    }
                    tracing::warn!(reason = %r, "the session ended; signing in again");
                }
                Err(e) => return Err(e),
            }
        }
        self.login_on(tunnel).await
    }
}

/// The words to show when `e` is the gateway refusing a disabled account: its own message when
/// it says so, else [`ACCOUNT_DISABLED`].
pub fn disabled_reason(e: &TunnelError) -> Option<String> {
    let r = e
        .refusal()
        .filter(|r| r.code == RefusalCode::AccountDisabled)?;
    Some(if r.message.contains("disabled") {
        r.message.clone()
    } else {
        ACCOUNT_DISABLED.to_owned()
    })
}

/// Whether the gateway closed the connection because an admin disabled the account.
fn closed_as_disabled(reason: &quinn::ConnectionError) -> bool {
    matches!(reason, quinn::ConnectionError::ApplicationClosed(c)
        if c.error_code == touchgate_proto::close::ACCOUNT_DISABLED.into()
            // A gateway from before the close codes said it in words only.
            || String::from_utf8_lossy(&c.reason).contains(DISABLED_CLOSE))
}

/// The authenticator of a delegated agent: there is no key, and nothing asks for one (its
/// session ends instead of signing in again).
struct NoKey(String);

impl crate::authenticator::Authenticator for NoKey {
    fn describe(&self) -> String {
        format!("the delegated grant {:?} (no security key)", self.0)
    }

    fn register(
        &mut self,
        _: &webauthn_rs_proto::PublicKeyCredentialCreationOptions,
        _: &[u8],
    ) -> Result<webauthn_rs_proto::RegisterPublicKeyCredential, crate::authenticator::AuthnError>
    {
        Err(crate::authenticator::AuthnError::NoDevice)
    }

    fn authenticate(
        &mut self,
        _: &webauthn_rs_proto::PublicKeyCredentialRequestOptions,
        _: &[u8],
    ) -> Result<webauthn_rs_proto::PublicKeyCredential, crate::authenticator::AuthnError> {
        Err(crate::authenticator::AuthnError::NoDevice)
    }
}

fn connected_state(session: &SessionInfo, tunnel: &Tunnel) -> AgentState {
    AgentState::Connected {
        user: session.user.clone(),
        expires_at: session.expires_at,
        services: session.services.iter().map(|s| s.name.clone()).collect(),
        tcp: crate::controller::tcp_services(session),
        gateway: tunnel.gateway().to_string(),
        transport: tunnel.link().describe(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use touchgate_proto::Refusal;

    #[test]
    fn a_disabled_account_is_told_in_the_gateways_words_or_ours() {
        let said = TunnelError::Refused(Refusal::new(
            RefusalCode::AccountDisabled,
            "your account is disabled on gw.corp.example; ask it-help@corp.example",
        ));
        assert_eq!(
            disabled_reason(&said).as_deref(),
            Some("your account is disabled on gw.corp.example; ask it-help@corp.example")
        );
        let terse = TunnelError::Refused(Refusal::new(RefusalCode::AccountDisabled, "no"));
        assert_eq!(disabled_reason(&terse).as_deref(), Some(ACCOUNT_DISABLED));
        let revoked = TunnelError::Refused(Refusal::new(
            RefusalCode::SessionRevoked,
            "account disabled? no, revoked",
        ));
        assert_eq!(disabled_reason(&revoked), None);
        assert_eq!(disabled_reason(&TunnelError::Lost("gone".into())), None);
    }

    #[test]
    fn only_the_gateways_disable_close_stops_the_agent() {
        let closed = |reason: &'static [u8]| {
            quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: 0u32.into(),
                reason: reason.into(),
            })
        };
        assert!(closed_as_disabled(&closed(b"account disabled by an admin")));
        assert!(closed_as_disabled(
            &quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: touchgate_proto::close::ACCOUNT_DISABLED.into(),
                reason: b"".as_slice().into(),
            })
        ));
        assert!(!closed_as_disabled(&closed(b"session revoked")));
        assert!(!closed_as_disabled(&quinn::ConnectionError::TimedOut));
    }
}

//! The QUIC tunnel endpoint: connections, the control stream (enrol, sign in, resume) and data
//! streams.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;
use touchgate_proto::{
    ClientMsg, EXPORTER_LABEL, EXPORTER_LEN, Refusal, RefusalCode, ServerMsg, ServiceInfo,
    SessionInfo, StreamOpen, StreamReply,
};
use tracing::Instrument;

use crate::{
    Gateway,
    audit::AuditEvent,
    browser::{BrowserPolicy, untrusted},
    limits::WindowCounter,
    metrics::Metrics,
    proxy::{Counted, StreamContext},
    rp::{PendingEnrol, PendingLogin},
    shards::Shards,
    store::{StoredCredential, now_secs},
    tokens::{SessionClaims, TokenError, cert_thumbprint},
};
use touchgate_common::wire::{WireError, read_frame_limited, write_frame};

/// How long an agent has to send the first frame of a data stream.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest control frame before the connection has a session: enrolment and sign-in
/// messages (with an attestation certificate chain) fit in a few KiB.
pub const PRE_SESSION_FRAME_MAX: usize = 16 * 1024;

/// Largest stream header (`StreamOpen`: a service name and the port's browser policy).
const STREAM_OPEN_MAX: usize = 8 * 1024;

/// Data streams a connection without a session may have waiting for their refusal at once;
/// further ones are reset without a word.
const PRE_SESSION_STREAMS: usize = 4;

/// Longest user name the gateway accepts (bytes).
pub const MAX_USER_LEN: usize = 256;

/// Per-session last-activity times, for the idle timeout (kept in memory: a restart forgets
/// them, which only makes an idle session last longer, never past its `exp`).
#[derive(Default)]
pub(crate) struct Activity {
    last: Mutex<HashMap<String, Instant>>,
}

impl Activity {
    fn touch(&self, jti: &str) {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(jti.to_owned(), Instant::now());
    }

    fn idle_for(&self, jti: &str) -> Option<Duration> {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(jti)
            .map(|t| t.elapsed())
    }
}

/// Revocation epochs (refreshed from the store, so a `revoke` run by another process takes
/// effect within [`REVOCATION_POLL`]) and the live sessions they apply to.
#[derive(Default)]
pub(crate) struct Revocations {
    epochs: std::sync::RwLock<HashMap<String, u64>>,
    disabled: std::sync::RwLock<std::collections::HashSet<String>>,
    live: Mutex<HashMap<u64, (Arc<SessionClaims>, quinn::Connection)>>,
}

/// How often the gateway reloads revocation epochs.
pub const REVOCATION_POLL: Duration = Duration::from_secs(1);

impl Revocations {
    pub(crate) fn set_epochs(&self, e: HashMap<String, u64>) {
        *self.epochs.write().unwrap_or_else(|e| e.into_inner()) = e;
    }

    pub(crate) fn set_disabled(&self, d: std::collections::HashSet<String>) {
        *self.disabled.write().unwrap_or_else(|e| e.into_inner()) = d;
    }

    fn disabled(&self, user: &str) -> bool {
        self.disabled
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(user)
    }

    fn epoch(&self, user: &str) -> u64 {
        self.epochs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .copied()
            .unwrap_or(0)
    }

    fn revoked(&self, c: &SessionClaims) -> bool {
        c.epoch < self.epoch(&c.sub)
    }

    fn add(&self, conn_id: u64, claims: Arc<SessionClaims>, conn: quinn::Connection) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn_id, (claims, conn));
    }

    fn remove(&self, conn_id: u64) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&conn_id);
    }

    /// Takes out the live sessions that are now revoked.
    fn take_revoked(&self) -> Vec<(u64, Arc<SessionClaims>, quinn::Connection)> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<u64> = live
            .iter()
            .filter(|(_, (c, _))| self.revoked(c))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| live.remove(&id).map(|(c, conn)| (id, c, conn)))
            .collect()
    }
}

fn disabled_refusal() -> Refusal {
    Refusal::new(
        RefusalCode::AccountDisabled,
        "your account is disabled on this gateway; ask your admin",
    )
}

fn revoked_refusal() -> Refusal {
    Refusal::new(
        RefusalCode::SessionRevoked,
        "an admin ended your sessions: touch your key to sign in again",
    )
}

/// Counts attempts per key in one-minute windows, in fixed memory ([`WindowCounter`]).
pub(crate) struct RateLimiter {
    counter: WindowCounter,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self {
            counter: WindowCounter::new(1 << 16),
        }
    }
}

impl RateLimiter {
    /// Counts one event for `key`; false when the key is over `per_minute` in this window.
    fn allow(&self, key: &impl std::hash::Hash, per_minute: u32) -> bool {
        self.counter.hit(key).count <= per_minute
    }

    /// Whether `key` has reached `per_minute` in this window, without counting.
    fn reached(&self, key: &impl std::hash::Hash, per_minute: u32) -> bool {
        self.counter.peek(key) >= per_minute
    }
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Gateway {
    /// Accepts QUIC connections on `endpoint` until it is closed, running them on the
    /// caller's runtime.
    pub async fn serve_quic(self: Arc<Self>, endpoint: quinn::Endpoint) {
        self.serve_quic_on(endpoint, Arc::new(Shards::current()))
            .await;
    }

    /// Accepts QUIC connections on `endpoint` until it is closed, each on one of `shards`
    /// (the one with the fewest connections).
    pub async fn serve_quic_on(self: Arc<Self>, endpoint: quinn::Endpoint, shards: Arc<Shards>) {
        let gw = self.clone();
        // Aborted when serving ends or the serving task itself is aborted.
        let _revocations = AbortOnDrop(tokio::spawn(async move { gw.enforce_revocations().await }));
        self.accept_loop(endpoint, &shards).await;
    }

    /// Reloads revocation epochs and closes the connections of revoked sessions.
    async fn enforce_revocations(self: Arc<Self>) {
        loop {
            tokio::time::sleep(REVOCATION_POLL).await;
            match self
                .store
                .epochs()
                .and_then(|e| Ok((e, self.store.disabled_users()?)))
            {
                Ok((e, d)) => {
                    self.revocations.set_epochs(e);
                    self.revocations.set_disabled(d);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot reload revocations");
                    continue;
                }
            }
            for (conn_id, claims, conn) in self.revocations.take_revoked() {
                let (event, why): (_, &[u8]) = if self.revocations.disabled(&claims.sub) {
                    ("session_disabled", b"account disabled by an admin")
                } else {
                    ("session_revoked", b"session revoked by an admin")
                };
                tracing::info!(user = %claims.sub, conn = conn_id, event, "closing the connection");
                conn.close(2u32.into(), why);
                self.audit.record(AuditEvent {
                    event,
                    user: Some(claims.sub.clone()),
                    session: Some(claims.jti.clone()),
                    conn: Some(conn_id),
                    peer: Some(conn.remote_address().to_string()),
                    ..Default::default()
                });
            }
        }
    }

    async fn accept_loop(self: Arc<Self>, endpoint: quinn::Endpoint, shards: &Shards) {
        while let Some(incoming) = endpoint.accept().await {
            let ip = incoming.remote_address().ip();
            if !self
                .limiter
                .allow(&("conn", ip), self.cfg.limits.connections_per_minute)
            {
                Metrics::inc(&self.metrics.auth_refused_total);
                let peer = incoming.remote_address().to_string();
                if !self.audit.allow_refusal(Some(&peer)) {
                    incoming.refuse();
                    continue;
                }
                self.audit.record(AuditEvent {
                    event: "connection_refused",
                    peer: Some(incoming.remote_address().to_string()),
                    outcome: Some("rate_limited".into()),
                    reason: Some(format!(
                        "more than {} new connections a minute from {ip}",
                        self.cfg.limits.connections_per_minute
                    )),
                    ..Default::default()
                });
                incoming.refuse();
                continue;
            }
            let gw = self.clone();
            let id = NEXT_CONN.fetch_add(1, Relaxed);
            let span = tracing::info_span!("conn", id, peer = %incoming.remote_address());
            // Accepted on its shard, so quinn spawns the connection's driver there too.
            shards.spawn(
                async move {
                    match incoming.await {
                        Ok(conn) => gw.handle_connection(conn, id).await,
                        Err(e) => tracing::info!(error = %e, "handshake failed"),
                    }
                }
                .instrument(span),
            );
        }
    }

    async fn handle_connection(self: Arc<Self>, conn: quinn::Connection, id: u64) {
        let peer = conn.remote_address();
        let Some(thumb) = peer_thumbprint(&conn) else {
            conn.close(1u32.into(), b"a client certificate is required");
            return;
        };
        let mut binding = [0u8; EXPORTER_LEN];
        if conn
            .export_keying_material(&mut binding, EXPORTER_LABEL, b"")
            .is_err()
        {
            conn.close(1u32.into(), b"no keying material");
            return;
        }
        Metrics::inc(&self.metrics.connections_total);
        Metrics::inc(&self.metrics.connections_open);
        tracing::debug!("connection established");
        let (session_tx, session_rx) = watch::channel::<Option<Arc<SessionClaims>>>(None);
        let ctl = ConnCtx {
            gw: self.clone(),
            id,
            peer,
            thumb,
            binding,
            conn: conn.clone(),
            open_streams: Default::default(),
            pre_session_streams: Default::default(),
        };
        let ctl = Arc::new(ctl);
        // Ends the connection at the sign-in deadline, at session expiry and when idle.
        let _watch = {
            let c = ctl.clone();
            let rx = session_rx.clone();
            AbortOnDrop(tokio::spawn(
                async move { c.watch_session(rx).await }.in_current_span(),
            ))
        };
        // The first bidirectional stream is the control stream.
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let c = ctl.clone();
                tokio::spawn(
                    async move { c.control_loop(send, recv, session_tx).await }.in_current_span(),
                );
            }
            Err(e) => {
                tracing::debug!(error = %e, "connection closed before the control stream");
                Metrics::dec(&self.metrics.connections_open);
                return;
            }
        }
        loop {
            match conn.accept_bi().await {
                Ok((send, recv)) if session_rx.borrow().is_none() => {
                    ctl.refuse_pre_session_stream(send, recv);
                }
                Ok((send, recv)) => {
                    let c = ctl.clone();
                    let s = session_rx.clone();
                    let sid = send.id().index();
                    tokio::spawn(
                        async move { c.data_stream(send, recv, s).await }
                            .instrument(tracing::debug_span!("stream", id = sid)),
                    );
                }
                Err(e) => {
                    tracing::debug!(error = %e, "connection closed");
                    break;
                }
            }
        }
        if let Some(s) = &*session_rx.borrow() {
            self.activity.touch(&s.jti);
        }
        self.revocations.remove(id);
        Metrics::dec(&self.metrics.connections_open);
    }
}

struct ConnCtx {
    gw: Arc<Gateway>,
    id: u64,
    peer: SocketAddr,
    thumb: String,
    binding: [u8; EXPORTER_LEN],
    conn: quinn::Connection,
    /// Data streams being served now (the session is not idle while any is open).
    open_streams: std::sync::atomic::AtomicUsize,
    /// Streams opened before a session, waiting for their refusal to be written.
    pre_session_streams: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts an open data stream of a connection while alive.
struct OpenStream<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> OpenStream<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, Relaxed);
        Self(n)
    }
}

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[derive(Default)]
struct Pending {
    enrol: Option<PendingEnrol>,
    login: Option<PendingLogin>,
}

impl ConnCtx {
    fn event(&self, event: &'static str) -> AuditEvent {
        AuditEvent {
            event,
            peer: Some(self.peer.to_string()),
            conn: Some(self.id),
            ..Default::default()
        }
    }

    fn refused(&self, event: &'static str, user: Option<&str>, r: &Refusal) {
        Metrics::inc(&self.gw.metrics.auth_refused_total);
        if !self.gw.audit.allow_refusal(Some(&self.peer.to_string())) {
            return;
        }
        let user = user.map(untrusted_user);
        tracing::info!(event, user, code = ?r.code, reason = %r.message, "refused");
        self.gw.audit.record(AuditEvent {
            user,
            outcome: Some(code_name(r.code)),
            reason: Some(r.message.clone()),
            ..self.event(event)
        });
    }

    async fn control_loop(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        session: watch::Sender<Option<Arc<SessionClaims>>>,
    ) {
        let mut pending = Pending::default();
        loop {
            let max = if session.borrow().is_some() {
                touchgate_proto::MAX_FRAME_LEN
            } else {
                PRE_SESSION_FRAME_MAX
            };
            let msg = match read_frame_limited::<ClientMsg, _>(&mut recv, max).await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(WireError::Io(_)) => break,
                Err(WireError::Frame(e)) => {
                    let r = Refusal::new(RefusalCode::BadRequest, format!("control stream: {e}"));
                    self.refused("frame_refused", None, &r);
                    let _ = write_frame(&mut send, &ServerMsg::Error(r)).await;
                    // After a bad length the stream cannot be resynchronised.
                    if matches!(e, touchgate_proto::FrameError::Malformed(_)) {
                        continue;
                    }
                    break;
                }
            };
            let reply = self.handle_control(msg, &mut pending, &session).await;
            if write_frame(&mut send, &reply).await.is_err() {
                break;
            }
        }
        let _ = send.finish();
    }

    async fn handle_control(
        &self,
        msg: ClientMsg,
        pending: &mut Pending,
        session: &watch::Sender<Option<Arc<SessionClaims>>>,
    ) -> ServerMsg {
        let gw = &self.gw;
        if let ClientMsg::EnrollBegin { user, .. } | ClientMsg::LoginBegin { user } = &msg
            && (user.is_empty() || user.len() > MAX_USER_LEN)
        {
            let r = Refusal::new(
                RefusalCode::BadRequest,
                format!("a user name must have 1 to {MAX_USER_LEN} bytes"),
            );
            self.refused("challenge_refused", Some(user), &r);
            return ServerMsg::Error(r);
        }
        match msg {
            ClientMsg::EnrollBegin {
                user,
                invite_code,
                software_ca_pem,
            } => match self
                .rate_limit(&user)
                .and_then(|()| self.enrol_begin(&user, &invite_code, software_ca_pem.as_deref()))
            {
                Ok((options, p)) => {
                    pending.enrol = Some(p);
                    gw.audit.record(AuditEvent {
                        user: Some(user),
                        ..self.event("enrol_challenge_issued")
                    });
                    ServerMsg::EnrollChallenge {
                        options,
                        origin: gw.rp.origin().to_owned(),
                    }
                }
                Err(r) => {
                    self.refused("enrol_refused", Some(&user), &r);
                    ServerMsg::Error(r)
                }
            },
            ClientMsg::EnrollFinish { credential } => {
                let Some(p) = pending.enrol.take() else {
                    let r = Refusal::new(
                        RefusalCode::ChallengeExpired,
                        "no enrolment is in progress on this connection (challenges are single-use)",
                    );
                    self.refused("enrol_refused", None, &r);
                    return ServerMsg::Error(r);
                };
                let user = p.user.clone();
                match self
                    .enrol_finish(p, credential)
                    .inspect_err(|_| self.count_failure(&user))
                {
                    Ok(cred_id) => {
                        Metrics::inc(&gw.metrics.enrolments_total);
                        gw.audit.record(AuditEvent {
                            user: Some(user),
                            outcome: Some("ok".into()),
                            ..self.event("invite_used")
                        });
                        ServerMsg::Enrolled {
                            credential_id: cred_id,
                        }
                    }
                    Err(r) => {
                        self.refused("enrol_refused", Some(&user), &r);
                        ServerMsg::Error(r)
                    }
                }
            }
            ClientMsg::LoginBegin { user } => match self
                .rate_limit(&user)
                .and_then(|()| self.login_begin(&user))
            {
                Ok((options, p)) => {
                    pending.login = Some(p);
                    gw.audit.record(AuditEvent {
                        user: Some(user),
                        ..self.event("challenge_issued")
                    });
                    ServerMsg::LoginChallenge {
                        options,
                        origin: gw.rp.origin().to_owned(),
                    }
                }
                Err(r) => {
                    self.refused("challenge_refused", Some(&user), &r);
                    ServerMsg::Error(r)
                }
            },
            ClientMsg::LoginFinish { credential } => {
                let Some(p) = pending.login.take() else {
                    let r = Refusal::new(
                        RefusalCode::ChallengeExpired,
                        "no sign-in is in progress on this connection: challenges are single-use, \
                         so a replayed assertion is refused",
                    );
                    self.refused("challenge_refused", None, &r);
                    return ServerMsg::Error(r);
                };
                let user = p.user.clone();
                match self.login_finish(p, credential).inspect_err(|r| {
                    if r.code != RefusalCode::AccountDisabled {
                        self.count_failure(&user);
                    }
                }) {
                    Ok(claims_token) => {
                        let (token, claims) = claims_token;
                        gw.audit.record(AuditEvent {
                            user: Some(user.clone()),
                            outcome: Some("ok".into()),
                            ..self.event("challenge_verified")
                        });
                        Metrics::inc(&gw.metrics.sessions_issued_total);
                        gw.audit.record(AuditEvent {
                            user: Some(user),
                            session: Some(claims.jti.clone()),
                            expires_at: Some(claims.exp),
                            ..self.event("session_issued")
                        });
                        self.start_session(token, claims, session)
                    }
                    Err(r) => {
                        self.refused("challenge_refused", Some(&user), &r);
                        ServerMsg::Error(r)
                    }
                }
            }
            ClientMsg::Resume { token } => match self.resume(&token) {
                Ok(claims) => {
                    Metrics::inc(&gw.metrics.sessions_resumed_total);
                    gw.audit.record(AuditEvent {
                        user: Some(claims.sub.clone()),
                        session: Some(claims.jti.clone()),
                        expires_at: Some(claims.exp),
                        ..self.event("session_resumed")
                    });
                    self.start_session(token, claims, session)
                }
                Err(r) => {
                    self.refused("session_refused", None, &r);
                    ServerMsg::Error(r)
                }
            },
        }
    }

    fn start_session(
        &self,
        token: String,
        claims: SessionClaims,
        session: &watch::Sender<Option<Arc<SessionClaims>>>,
    ) -> ServerMsg {
        let gw = &self.gw;
        gw.activity.touch(&claims.jti);
        let services = gw
            .cfg
            .services
            .iter()
            .filter(|s| s.allows(&claims.sub))
            .map(|s| ServiceInfo {
                name: s.name.clone(),
                kind: s.kind,
            })
            .collect();
        let info = SessionInfo {
            token,
            user: claims.sub.clone(),
            expires_at: claims.exp,
            services,
        };
        let claims = Arc::new(claims);
        // The room a signed-in agent needs (see `tls::quic_server_config`).
        self.conn
            .set_max_concurrent_bi_streams(gw.cfg.limits.max_streams_per_connection.into());
        self.conn
            .set_receive_window(touchgate_common::RECEIVE_WINDOW.into());
        gw.revocations
            .add(self.id, claims.clone(), self.conn.clone());
        session.send_replace(Some(claims));
        ServerMsg::Session(info)
    }

    /// Sign-in and enrolment attempts per source address, and failed ones per user and
    /// source address. Only failures count against a user, and only from the address they
    /// came from: a peer elsewhere that asks for challenges in someone's name, or sends
    /// garbage answers, cannot lock that person out.
    fn rate_limit(&self, user: &str) -> Result<(), Refusal> {
        let gw = &self.gw;
        let per = gw.cfg.limits.signin_attempts_per_minute;
        let ip = self.peer.ip();
        let who = if !gw.limiter.allow(&("attempt", ip), per) {
            format!("sign-in attempts from {ip}")
        } else if gw.limiter.reached(&("failed", user, ip), per) {
            format!("failed sign-ins for {} from {ip}", untrusted_user(user))
        } else {
            return Ok(());
        };
        Err(Refusal::new(
            RefusalCode::RateLimited,
            format!("too many {who} (more than {per} a minute): wait a minute and try again"),
        ))
    }

    /// Counts a failed enrolment or sign-in against the user from this source address.
    fn count_failure(&self, user: &str) {
        self.gw
            .limiter
            .allow(&("failed", user, self.peer.ip()), u32::MAX);
    }

    fn enrol_begin(
        &self,
        user: &str,
        code: &str,
        software_ca_pem: Option<&str>,
    ) -> Result<(serde_json::Value, PendingEnrol), Refusal> {
        let gw = &self.gw;
        invite_ok(gw.store.check_invite(user, code).map_err(db_refusal)?)?;
        let user_id = gw.store.ensure_user(user).map_err(db_refusal)?;
        let existing = gw
            .store
            .credentials(user)
            .map_err(db_refusal)?
            .iter()
            .filter_map(|c| base64_decode(&c.cred_id))
            .collect();
        let (ccr, p) = gw
            .rp
            .begin_enrol(user, user_id, code, existing, software_ca_pem)?;
        let v = serde_json::to_value(&ccr)
            .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))?;
        Ok((v, p))
    }

    fn enrol_finish(
        &self,
        p: PendingEnrol,
        credential: serde_json::Value,
    ) -> Result<String, Refusal> {
        let gw = &self.gw;
        let user = p.user.clone();
        let code = p.invite_code.clone();
        let enrolled = gw.rp.finish_enrol(p, credential, &self.binding)?;
        let key_json = serde_json::to_string(&enrolled.key)
            .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))?;
        let cred = StoredCredential {
            cred_id: enrolled.cred_id.clone(),
            user,
            key_json,
            aaguid: enrolled.aaguid.to_string(),
        };
        invite_ok(gw.store.enrol(&code, &cred).map_err(db_refusal)?)?;
        Ok(enrolled.cred_id)
    }

    /// A sign-in challenge. A user with no key (unknown, or removed) gets a challenge that
    /// looks the same, for a credential that does not exist (its id derived from a gateway
    /// secret, so it is stable per name): a peer cannot tell who is enrolled, and the
    /// answer fails as a wrong key's would.
    fn login_begin(&self, user: &str) -> Result<(serde_json::Value, PendingLogin), Refusal> {
        let gw = &self.gw;
        let keys = load_keys(&gw.store.credentials(user).map_err(db_refusal)?)?;
        let (rcr, p) = if keys.is_empty() {
            gw.rp.begin_decoy_login(user, &gw.reset_key)?
        } else {
            gw.rp.begin_login(user, &keys)?
        };
        let v = serde_json::to_value(&rcr)
            .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))?;
        Ok((v, p))
    }

    fn login_finish(
        &self,
        p: PendingLogin,
        credential: serde_json::Value,
    ) -> Result<(String, SessionClaims), Refusal> {
        let gw = &self.gw;
        let user = p.user.clone();
        let result = gw.rp.finish_login(p, credential, &self.binding)?;
        // Persist the new counter before the session exists, so a clone cannot race it.
        let stored = gw.store.credentials(&user).map_err(db_refusal)?;
        let mut updated = None;
        for c in &stored {
            let mut key: webauthn_rs::prelude::SecurityKey = serde_json::from_str(&c.key_json)
                .map_err(|e| {
                    Refusal::new(
                        RefusalCode::Internal,
                        format!("stored credential unreadable: {e}"),
                    )
                })?;
            if key.update_credential(&result).is_some() {
                let json = serde_json::to_string(&key)
                    .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))?;
                gw.store
                    .update_credential(&c.cred_id, &json)
                    .map_err(db_refusal)?;
                updated = Some(c.cred_id.clone());
            }
        }
        let Some(cred_id) = updated else {
            return Err(Refusal::new(
                RefusalCode::VerificationFailed,
                "the assertion's credential is not enrolled for this user",
            ));
        };
        // Told only to someone who just proved they hold the key: a disabled account is not
        // revealed to a peer that merely names it.
        if gw.store.is_disabled(&user).map_err(db_refusal)? {
            return Err(disabled_refusal());
        }
        gw.store
            .record_sign_in(&user, &cred_id, now_secs())
            .map_err(|e| {
                tracing::warn!(error = %e, "the credential was removed during the sign-in");
                Refusal::new(
                    RefusalCode::NotEnrolled,
                    "this key was removed from your account during the sign-in: ask your admin",
                )
            })?;
        let now = now_secs();
        let exp = now + gw.cfg.session.max_age.as_secs();
        let epoch = gw.revocations.epoch(&user);
        gw.signer
            .issue_session_at_epoch(&user, &self.thumb, now, exp, epoch)
            .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))
    }

    fn resume(&self, token: &str) -> Result<SessionClaims, Refusal> {
        let gw = &self.gw;
        let claims = gw
            .signer
            .verify_session(token, &self.thumb)
            .map_err(|e| match e {
                TokenError::Expired => Refusal::new(
                    RefusalCode::SessionExpired,
                    "your session has expired: touch your key to sign in again",
                ),
                TokenError::WrongKey => Refusal::new(
                    RefusalCode::WrongSessionKey,
                    "this session token belongs to another session key: a token is valid only from \
                 the agent that signed in",
                ),
                TokenError::Invalid(why) => Refusal::new(
                    RefusalCode::InvalidToken,
                    format!("the session token is not valid ({why}): sign in again"),
                ),
            })?;
        if gw.revocations.disabled(&claims.sub) {
            return Err(disabled_refusal());
        }
        if gw.revocations.revoked(&claims) {
            return Err(revoked_refusal());
        }
        if let Some(idle) = gw.activity.idle_for(&claims.jti)
            && idle > gw.cfg.session.idle_timeout
        {
            return Err(Refusal::new(
                RefusalCode::SessionExpired,
                format!(
                    "your session ended after {} without a connection: touch your key to sign in again",
                    humantime::format_duration(Duration::from_secs(idle.as_secs()))
                ),
            ));
        }
        Ok(claims)
    }

    async fn data_stream(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        session: watch::Receiver<Option<Arc<SessionClaims>>>,
    ) {
        let gw = &self.gw;
        let open = match tokio::time::timeout(
            STREAM_OPEN_TIMEOUT,
            read_frame_limited::<StreamOpen, _>(&mut recv, STREAM_OPEN_MAX),
        )
        .await
        {
            Ok(Ok(Some(o))) => o,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                let r = Refusal::new(RefusalCode::BadRequest, format!("stream header: {e}"));
                self.stream_refused(&mut send, None, None, r).await;
                return;
            }
            Err(_) => {
                let r = Refusal::new(RefusalCode::BadRequest, "no stream header within 10s");
                self.stream_refused(&mut send, None, None, r).await;
                return;
            }
        };
        let claims = session.borrow().clone();
        let Some(claims) = claims else {
            let r = Refusal::new(
                RefusalCode::Unauthenticated,
                "sign in (or resume the session) on the control stream before opening streams",
            );
            self.stream_refused(&mut send, None, Some(&open.service), r)
                .await;
            return;
        };
        let user = claims.sub.as_str();
        if claims.exp <= now_secs() {
            let r = Refusal::new(
                RefusalCode::SessionExpired,
                "your session has expired: touch your key to sign in again",
            );
            self.stream_refused(&mut send, Some(user), Some(&open.service), r)
                .await;
            return;
        }
        if gw.revocations.revoked(&claims) {
            self.stream_refused(
                &mut send,
                Some(user),
                Some(&open.service),
                revoked_refusal(),
            )
            .await;
            return;
        }
        let Some(svc) = gw.cfg.service(&open.service) else {
            let r = Refusal::new(
                RefusalCode::UnknownService,
                format!(
                    "this gateway has no service named {:?}: check the service names in your agent config",
                    open.service
                ),
            );
            self.stream_refused(&mut send, Some(user), Some(&open.service), r)
                .await;
            return;
        };
        if !svc.allows(user) {
            let r = Refusal::new(
                RefusalCode::Forbidden,
                format!(
                    "{user} may not use service {:?}: ask your admin for access",
                    svc.name
                ),
            );
            self.stream_refused(&mut send, Some(user), Some(&open.service), r)
                .await;
            return;
        }
        let svc = Arc::new(svc.clone());
        let tcp = match svc.kind {
            touchgate_proto::ServiceKind::Tcp => {
                match tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio::net::TcpStream::connect(&svc.upstream),
                )
                .await
                {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        Some(s)
                    }
                    Ok(Err(e)) => {
                        let r = Refusal::new(
                            RefusalCode::UpstreamUnavailable,
                            format!("service {} is unreachable: {e}", svc.name),
                        );
                        self.stream_refused(&mut send, Some(user), Some(&svc.name), r)
                            .await;
                        return;
                    }
                    Err(_) => {
                        let r = Refusal::new(
                            RefusalCode::UpstreamUnavailable,
                            format!(
                                "service {} did not accept a connection within 10s",
                                svc.name
                            ),
                        );
                        self.stream_refused(&mut send, Some(user), Some(&svc.name), r)
                            .await;
                        return;
                    }
                }
            }
            touchgate_proto::ServiceKind::Http => None,
        };
        if write_frame(&mut send, &StreamReply::Accepted)
            .await
            .is_err()
        {
            return;
        }
        gw.activity.touch(&claims.jti);
        let _open = OpenStream::new(&self.open_streams);
        Metrics::inc(&gw.metrics.streams_total);
        Metrics::inc(&gw.metrics.streams_open);
        gw.audit.record(AuditEvent {
            user: Some(user.to_owned()),
            service: Some(svc.name.clone()),
            session: Some(claims.jti.clone()),
            ..self.event("stream_opened")
        });
        let started = Instant::now();
        let io = Counted::new(tokio::io::join(recv, send));
        let (up, down) = (io.read.clone(), io.written.clone());
        let browser = BrowserPolicy::new(open.local.as_ref());
        let outcome = match tcp {
            Some(mut upstream) => {
                let refusal = Arc::new(std::sync::OnceLock::new());
                let mut io = FirstBytesGuard::new(io, browser, refusal.clone());
                let copied = tokio::io::copy_bidirectional_with_sizes(
                    &mut io,
                    &mut upstream,
                    64 * 1024,
                    64 * 1024,
                )
                .await;
                match (copied, refusal.get()) {
                    (_, Some(r)) => {
                        self.tcp_browser_refused(user, &svc.name, r);
                        "browser_refused".to_owned()
                    }
                    (Ok(_), None) => "ok".to_owned(),
                    (Err(e), None) => format!("error: {e}"),
                }
            }
            None => {
                let ctx =
                    StreamContext::new(user, svc.clone(), browser).with_peer(self.peer.to_string());
                gw.proxy.clone().serve_http(io, ctx).await;
                "ok".to_owned()
            }
        };
        let (up, down) = (up.load(Relaxed), down.load(Relaxed));
        gw.metrics.bytes_up_total.fetch_add(up, Relaxed);
        gw.metrics.bytes_down_total.fetch_add(down, Relaxed);
        Metrics::dec(&gw.metrics.streams_open);
        gw.activity.touch(&claims.jti);
        gw.audit.record(AuditEvent {
            user: Some(user.to_owned()),
            service: Some(svc.name.clone()),
            session: Some(claims.jti.clone()),
            outcome: Some(outcome),
            bytes_up: Some(up),
            bytes_down: Some(down),
            duration_ms: Some(started.elapsed().as_millis() as u64),
            ..self.event("stream_closed")
        });
    }

    /// A TCP service's stream whose first bytes were a browser's HTTP request: closed
    /// before anything was forwarded; counted, logged and audited.
    fn tcp_browser_refused(&self, user: &str, service: &str, r: &crate::browser::BrowserRefusal) {
        Metrics::inc(&self.gw.metrics.browser_refused_total);
        if !self.gw.audit.allow_refusal(Some(&self.peer.to_string())) {
            return;
        }
        let msg = r.message(service);
        tracing::warn!(service, reason = %msg, "browser connection to a TCP service refused");
        self.gw.audit.record(AuditEvent {
            user: Some(user.to_owned()),
            service: Some(service.to_owned()),
            outcome: Some("refused".into()),
            reason: Some(msg),
            ..self.event("browser_request_refused")
        });
    }

    /// Refuses a data stream opened before the connection has a session, without reading
    /// it: at most [`PRE_SESSION_STREAMS`] refusals are written at once, further streams
    /// are reset, so a peer that opens thousands of streams announcing large frames costs
    /// a few bytes each.
    fn refuse_pre_session_stream(&self, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let gw = &self.gw;
        Metrics::inc(&gw.metrics.streams_refused_total);
        let _ = recv.stop(0u32.into());
        let r = Refusal::new(
            RefusalCode::Unauthenticated,
            "sign in (or resume the session) on the control stream before opening streams",
        );
        if gw.audit.allow_refusal(Some(&self.peer.to_string())) {
            tracing::info!(code = ?r.code, "stream refused before sign-in");
            gw.audit.record(AuditEvent {
                outcome: Some(code_name(r.code)),
                reason: Some(r.message.clone()),
                ..self.event("stream_refused")
            });
        }
        let pending = self.pre_session_streams.clone();
        if pending.fetch_add(1, Relaxed) >= PRE_SESSION_STREAMS {
            pending.fetch_sub(1, Relaxed);
            let _ = send.reset(0u32.into());
            return;
        }
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                write_frame(&mut send, &StreamReply::Refused(r)),
            )
            .await;
            let _ = send.finish();
            pending.fetch_sub(1, Relaxed);
        });
    }

    /// Closes the connection when it has no session by the sign-in deadline, when its
    /// session expires (a renewal on the connection moves that), and when the session has
    /// been idle — no stream open — for the idle timeout. Every stream of the connection
    /// ends with it, so a kept-alive HTTP connection or a long TCP stream cannot outlive
    /// the session.
    async fn watch_session(&self, mut session: watch::Receiver<Option<Arc<SessionClaims>>>) {
        let gw = &self.gw;
        let deadline = tokio::time::Instant::now() + gw.cfg.limits.signin_deadline;
        loop {
            let claims = session.borrow_and_update().clone();
            let wake = match &claims {
                None => deadline,
                Some(c) => {
                    let to_exp = Duration::from_secs(c.exp).saturating_sub(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default(),
                    );
                    let to_idle = if self.open_streams.load(Relaxed) > 0 {
                        gw.cfg.session.idle_timeout
                    } else {
                        let idle = gw.activity.idle_for(&c.jti).unwrap_or_default();
                        gw.cfg.session.idle_timeout.saturating_sub(idle)
                    };
                    tokio::time::Instant::now() + to_exp.min(to_idle)
                }
            };
            tokio::select! {
                changed = session.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
                () = tokio::time::sleep_until(wake) => {}
            }
            let (event, code, why): (_, u32, String) = match &claims {
                None => {
                    Metrics::inc(&gw.metrics.signin_deadline_closed_total);
                    (
                        "connection_closed",
                        4,
                        format!(
                            "no sign-in within {}",
                            humantime::format_duration(gw.cfg.limits.signin_deadline)
                        ),
                    )
                }
                Some(c) if c.exp <= now_secs() => ("session_ended", 3, "session expired".into()),
                Some(c) => {
                    let idle = gw.activity.idle_for(&c.jti).unwrap_or_default();
                    if self.open_streams.load(Relaxed) > 0 || idle < gw.cfg.session.idle_timeout {
                        continue;
                    }
                    ("session_ended", 3, "session idle".into())
                }
            };
            tracing::info!(reason = %why, "closing the connection");
            let c = claims.as_deref();
            gw.audit.record(AuditEvent {
                user: c.map(|c| c.sub.clone()),
                session: c.map(|c| c.jti.clone()),
                outcome: Some(why.replace(' ', "_")),
                reason: Some(why.clone()),
                ..self.event(event)
            });
            self.conn.close(code.into(), why.as_bytes());
            return;
        }
    }

    async fn stream_refused(
        &self,
        send: &mut quinn::SendStream,
        user: Option<&str>,
        service: Option<&str>,
        r: Refusal,
    ) {
        Metrics::inc(&self.gw.metrics.streams_refused_total);
        tracing::info!(user, service, code = ?r.code, reason = %r.message, "stream refused");
        self.gw.audit.record(AuditEvent {
            user: user.map(str::to_owned),
            service: service.map(str::to_owned),
            outcome: Some(code_name(r.code)),
            reason: Some(r.message.clone()),
            ..self.event("stream_refused")
        });
        let _ = write_frame(send, &StreamReply::Refused(r)).await;
        let _ = send.finish();
    }
}

/// A user name as sent by a peer, safe to log (truncated, escaped).
fn untrusted_user(user: &str) -> String {
    if user.len() <= 64 && user.chars().all(|c| c.is_ascii_graphic()) {
        user.to_owned()
    } else {
        untrusted(user)
    }
}

/// Lets a TCP service's first bytes through only once they are known not to be a browser's
/// HTTP request that the port's policy refuses ([`BrowserPolicy::check_first_bytes`]). Until
/// then it holds what it has read; the other direction flows meanwhile, so protocols where
/// the server speaks first are not held up. A refusal fails the read, which ends the splice
/// before anything reached the upstream.
struct FirstBytesGuard<T> {
    inner: T,
    policy: Option<BrowserPolicy>,
    held: Vec<u8>,
    released: usize,
    refusal: Arc<std::sync::OnceLock<crate::browser::BrowserRefusal>>,
}

impl<T> FirstBytesGuard<T> {
    fn new(
        inner: T,
        policy: BrowserPolicy,
        refusal: Arc<std::sync::OnceLock<crate::browser::BrowserRefusal>>,
    ) -> Self {
        Self {
            inner,
            policy: Some(policy),
            held: Vec::new(),
            released: 0,
            refusal,
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FirstBytesGuard<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use crate::browser::{FirstBytes, MAX_SNIFF};
        use std::task::Poll;
        let this = &mut *self;
        while let Some(policy) = &this.policy {
            let mut chunk = [0u8; 2048];
            let mut rb = tokio::io::ReadBuf::new(&mut chunk);
            std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let eof = rb.filled().is_empty();
            this.held.extend_from_slice(rb.filled());
            match policy.check_first_bytes(&this.held[..this.held.len().min(MAX_SNIFF)]) {
                Ok(FirstBytes::NeedMore) if !eof => continue,
                Ok(_) => this.policy = None,
                Err(r) => {
                    let _ = this.refusal.set(r);
                    this.policy = None;
                    this.held.clear();
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        "a browser's request to a TCP service was refused",
                    )));
                }
            }
        }
        if this.released < this.held.len() {
            let n = (this.held.len() - this.released).min(buf.remaining());
            buf.put_slice(&this.held[this.released..this.released + n]);
            this.released += n;
            if this.released == this.held.len() {
                this.held = Vec::new();
                this.released = 0;
            }
            return Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FirstBytesGuard<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn peer_thumbprint(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| cert_thumbprint(c))
}

fn invite_ok(r: Result<(), crate::store::InviteProblem>) -> Result<(), Refusal> {
    r.map_err(|p| match p {
        crate::store::InviteProblem::UserDisabled => disabled_refusal(),
        p => Refusal::new(
            RefusalCode::InvalidInvite,
            format!("{p}: ask your admin for a new invite (touchgate-gateway invite USER)"),
        ),
    })
}

fn db_refusal(e: crate::store::StoreError) -> Refusal {
    tracing::error!(error = %e, "store failure");
    Refusal::new(
        RefusalCode::Internal,
        "the gateway's database failed; try again later",
    )
}

fn load_keys(
    creds: &[StoredCredential],
) -> Result<Vec<webauthn_rs::prelude::SecurityKey>, Refusal> {
    creds
        .iter()
        .map(|c| {
            serde_json::from_str(&c.key_json).map_err(|e| {
                Refusal::new(
                    RefusalCode::Internal,
                    format!("stored credential unreadable: {e}"),
                )
            })
        })
        .collect()
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
}

/// The snake_case name of a refusal code, as in the wire format and the audit log.
pub fn code_name(c: RefusalCode) -> String {
    serde_json::to_value(c)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{c:?}"))
}

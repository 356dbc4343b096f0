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
    metrics::Metrics,
    proxy::{Counted, StreamContext},
    rp::{PendingEnrol, PendingLogin},
    shards::Shards,
    store::{StoredCredential, now_secs},
    tokens::{SessionClaims, TokenError, cert_thumbprint},
};
use touchgate_common::wire::{WireError, read_frame, write_frame};

/// How long an agent has to send the first frame of a data stream.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

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
    live: Mutex<HashMap<u64, (Arc<SessionClaims>, quinn::Connection)>>,
}

/// How often the gateway reloads revocation epochs.
pub const REVOCATION_POLL: Duration = Duration::from_secs(1);

impl Revocations {
    pub(crate) fn set_epochs(&self, e: HashMap<String, u64>) {
        *self.epochs.write().unwrap_or_else(|e| e.into_inner()) = e;
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

fn revoked_refusal() -> Refusal {
    Refusal::new(
        RefusalCode::SessionRevoked,
        "an admin ended your sessions: touch your key to sign in again",
    )
}

/// Counts events per key in fixed one-minute windows.
#[derive(Default)]
pub(crate) struct RateLimiter {
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl RateLimiter {
    /// Counts one event for `key`; false when the key is over `per_minute` in this window.
    fn allow(&self, key: &str, per_minute: u32) -> bool {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if w.len() > 100_000 {
            w.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
        }
        let entry = w.entry(key.to_owned()).or_insert((now, 0));
        if now.duration_since(entry.0) >= Duration::from_secs(60) {
            *entry = (now, 0);
        }
        entry.1 += 1;
        entry.1 <= per_minute
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
            match self.store.epochs() {
                Ok(e) => self.revocations.set_epochs(e),
                Err(e) => {
                    tracing::error!(error = %e, "cannot reload revocations");
                    continue;
                }
            }
            for (conn_id, claims, conn) in self.revocations.take_revoked() {
                tracing::info!(user = %claims.sub, conn = conn_id, "session revoked; closing its connection");
                conn.close(2u32.into(), b"session revoked by an admin");
                self.audit.record(AuditEvent {
                    event: "session_revoked",
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
            if !self.limiter.allow(
                &format!("conn:{ip}"),
                self.cfg.limits.connections_per_minute,
            ) {
                Metrics::inc(&self.metrics.auth_refused_total);
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
        };
        let ctl = Arc::new(ctl);
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
        tracing::info!(event, user, code = ?r.code, reason = %r.message, "refused");
        self.gw.audit.record(AuditEvent {
            user: user.map(str::to_owned),
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
            let msg = match read_frame::<ClientMsg, _>(&mut recv).await {
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
                match self.enrol_finish(p, credential) {
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
                match self.login_finish(p, credential) {
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
        gw.revocations
            .add(self.id, claims.clone(), self.conn.clone());
        session.send_replace(Some(claims));
        ServerMsg::Session(info)
    }

    /// Sign-in and enrolment attempts, per user and per source address.
    fn rate_limit(&self, user: &str) -> Result<(), Refusal> {
        let gw = &self.gw;
        let per = gw.cfg.limits.signin_attempts_per_minute;
        let by_user = gw.limiter.allow(&format!("user:{user}"), per);
        let by_ip = gw.limiter.allow(&format!("ip:{}", self.peer.ip()), per);
        if by_user && by_ip {
            return Ok(());
        }
        let who = if by_user {
            format!("from {}", self.peer.ip())
        } else {
            format!("for {user}")
        };
        Err(Refusal::new(
            RefusalCode::RateLimited,
            format!(
                "too many sign-in attempts {who} (more than {per} a minute): wait a minute and try again"
            ),
        ))
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

    fn login_begin(&self, user: &str) -> Result<(serde_json::Value, PendingLogin), Refusal> {
        let gw = &self.gw;
        let keys = load_keys(&gw.store.credentials(user).map_err(db_refusal)?)?;
        if keys.is_empty() {
            return Err(Refusal::new(
                RefusalCode::NotEnrolled,
                format!(
                    "{user} has no enrolled security key on this gateway: ask your admin for an invite and run `touchgate enroll`"
                ),
            ));
        }
        let (rcr, p) = gw.rp.begin_login(user, &keys)?;
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
        let mut updated = false;
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
                updated = true;
            }
        }
        if !updated {
            return Err(Refusal::new(
                RefusalCode::VerificationFailed,
                "the assertion's credential is not enrolled for this user",
            ));
        }
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
        let open =
            match tokio::time::timeout(STREAM_OPEN_TIMEOUT, read_frame::<StreamOpen, _>(&mut recv))
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
        let outcome = match tcp {
            Some(mut upstream) => {
                let mut io = io;
                match tokio::io::copy_bidirectional_with_sizes(
                    &mut io,
                    &mut upstream,
                    64 * 1024,
                    64 * 1024,
                )
                .await
                {
                    Ok(_) => "ok".to_owned(),
                    Err(e) => format!("error: {e}"),
                }
            }
            None => {
                let ctx = StreamContext::new(user, svc.clone());
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

fn peer_thumbprint(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| cert_thumbprint(c))
}

fn invite_ok(r: Result<(), crate::store::InviteProblem>) -> Result<(), Refusal> {
    r.map_err(|p| {
        Refusal::new(
            RefusalCode::InvalidInvite,
            format!("{p}: ask your admin for a new invite (touchgate-gateway invite USER)"),
        )
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

//! Session lifetimes: idle tracking, revocation epochs and disabled accounts reloaded from the
//! store, and the per-connection watch that closes a connection when its session ends.

use super::*;
use touchgate_proto::close;

/// Per-session last-activity times, for the idle timeout (kept in memory: a restart forgets
/// them, which only makes an idle session last longer, never past its `exp`).
#[derive(Default)]
pub(crate) struct Activity {
    last: Mutex<HashMap<String, Instant>>,
}

impl Activity {
    pub(super) fn touch(&self, jti: &str) {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(jti.to_owned(), Instant::now());
    }

    /// Forgets sessions last active longer ago than `max_age`: every such session has
    /// expired (a session lives at most `max_age`), so nothing needs its idle time any more.
    pub(super) fn prune(&self, max_age: Duration) {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, t| t.elapsed() <= max_age);
    }

    pub(super) fn idle_for(&self, jti: &str) -> Option<Duration> {
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
    /// Each user's groups (identity provider or SCIM), for `allow_groups`.
    groups: std::sync::RwLock<HashMap<String, Arc<[String]>>>,
    /// Delegated grants revoked before their expiry.
    revoked_delegations: std::sync::RwLock<std::collections::HashSet<String>>,
    /// When each grant's last use was written to the store.
    delegation_use: Mutex<HashMap<String, Instant>>,
    live: Mutex<HashMap<u64, (Arc<SessionClaims>, quinn::Connection)>>,
}

/// How often a grant's last use is written to the store, at most.
const DELEGATION_USE_EVERY: Duration = Duration::from_secs(60);

/// How often the gateway reloads revocation epochs.
pub const REVOCATION_POLL: Duration = Duration::from_secs(1);
/// How often a gateway on PostgreSQL reads revocations while its change listener is up (each
/// change wakes it at once; this catches anything a notification could miss).
const LISTENING_POLL: Duration = Duration::from_secs(10);
/// The least time between two reloads of revocations.
const MIN_RELOAD_GAP: Duration = Duration::from_millis(250);
/// How long a reload may take before the gateway says the database is stuck (and tries again).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a running gateway checks whether the signing key is due for rotation.
const KEY_ROTATION_CHECK: Duration = Duration::from_secs(3600);
/// How often the record of sessions' last activity drops sessions past their maximum age.
const ACTIVITY_PRUNE: Duration = Duration::from_secs(60);

impl Revocations {
    pub(crate) fn set_epochs(&self, e: HashMap<String, u64>) {
        *self.epochs.write().unwrap_or_else(|e| e.into_inner()) = e;
    }

    pub(crate) fn set_disabled(&self, d: std::collections::HashSet<String>) {
        *self.disabled.write().unwrap_or_else(|e| e.into_inner()) = d;
    }

    pub(crate) fn set_revoked_delegations(&self, d: std::collections::HashSet<String>) {
        *self
            .revoked_delegations
            .write()
            .unwrap_or_else(|e| e.into_inner()) = d;
    }

    /// Marks grant `id` revoked at once (the store has it too; the next reload agrees).
    pub(super) fn revoke_delegation(&self, id: &str) {
        self.revoked_delegations
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned());
    }

    pub(super) fn delegation_revoked(&self, id: &str) -> bool {
        self.revoked_delegations
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    /// Whether a use of grant `id` is to be written now: at most once a minute per grant.
    pub(super) fn note_delegation_use(&self, id: &str) -> bool {
        let mut used = self
            .delegation_use
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if used.len() > 100_000 {
            used.retain(|_, t| t.elapsed() < DELEGATION_USE_EVERY);
        }
        match used.get(id) {
            Some(t) if t.elapsed() < DELEGATION_USE_EVERY => false,
            _ => {
                used.insert(id.to_owned(), Instant::now());
                true
            }
        }
    }

    pub(crate) fn set_groups(&self, g: HashMap<String, Vec<String>>) {
        *self.groups.write().unwrap_or_else(|e| e.into_inner()) =
            g.into_iter().map(|(u, g)| (u, g.into())).collect();
    }

    /// Sets one user's groups at once (the store has them too; the next reload agrees).
    pub(super) fn set_user_groups(&self, user: &str, groups: Vec<String>) {
        self.groups
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(user.to_owned(), groups.into());
    }

    /// `user`'s groups as last loaded (none for a user without any).
    pub(super) fn groups(&self, user: &str) -> Arc<[String]> {
        self.groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .cloned()
            .unwrap_or_else(|| Arc::from(Vec::new()))
    }

    pub(super) fn disabled(&self, user: &str) -> bool {
        self.disabled
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(user)
    }

    pub(super) fn epoch(&self, user: &str) -> u64 {
        self.epochs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .copied()
            .unwrap_or(0)
    }

    /// Whether an admin ended the session: its user's epoch moved past it, or the user is
    /// disabled (which also covers a sign-in that raced the disable past the epoch reload).
    pub(super) fn revoked(&self, c: &SessionClaims) -> bool {
        c.epoch < self.epoch(&c.sub)
            || self.disabled(&c.sub)
            || c.dlg
                .as_ref()
                .is_some_and(|d| self.delegation_revoked(&d.id))
    }

    pub(super) fn add(&self, conn_id: u64, claims: Arc<SessionClaims>, conn: quinn::Connection) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn_id, (claims, conn));
    }

    pub(super) fn remove(&self, conn_id: u64) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&conn_id);
    }

    /// Takes out the live sessions that are now revoked.
    pub(super) fn take_revoked(&self) -> Vec<(u64, Arc<SessionClaims>, quinn::Connection)> {
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

pub(super) fn disabled_refusal() -> Refusal {
    Refusal::new(
        RefusalCode::AccountDisabled,
        "your account is disabled on this gateway; ask your admin",
    )
}

pub(super) fn revoked_refusal() -> Refusal {
    Refusal::new(
        RefusalCode::SessionRevoked,
        "an admin ended your sessions: touch your key to sign in again",
    )
}

impl Gateway {
    /// Reloads revocation epochs and closes the connections of revoked sessions.
    pub(super) async fn enforce_revocations(self: Arc<Self>) {
        let changes = self.store.changes();
        let mut next_prune = tokio::time::Instant::now() + ACTIVITY_PRUNE;
        let mut next_rotation = tokio::time::Instant::now() + KEY_ROTATION_CHECK;
        let mut last_reload = tokio::time::Instant::now();
        loop {
            match &changes {
                // PostgreSQL: woken by every change any replica commits; polled as well, less
                // often while the listener is up, every second while it is down.
                Some(l) => {
                    let poll = if l.listening() {
                        LISTENING_POLL
                    } else {
                        REVOCATION_POLL
                    };
                    tokio::select! {
                        () = l.changed() => {}
                        () = tokio::time::sleep(poll) => {}
                    }
                }
                None => tokio::time::sleep(REVOCATION_POLL).await,
            }
            if tokio::time::Instant::now() >= next_prune {
                next_prune += ACTIVITY_PRUNE;
                self.activity.prune(self.cfg.session.max_age);
            }
            // A flood of notifications (any role of the database may send them) costs at most
            // a few reloads a second.
            tokio::time::sleep_until(last_reload + MIN_RELOAD_GAP).await;
            last_reload = tokio::time::Instant::now();
            let (store, groups, signer) = (
                self.store.clone(),
                self.cfg.group_source(),
                self.signer.clone(),
            );
            if last_reload >= next_rotation {
                next_rotation += KEY_ROTATION_CHECK;
                // On its own thread: a rotation waiting for another replica's lock must not
                // hold up the reload of revocations.
                let (store, signer) = (store.clone(), signer.clone());
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = signer.rotate_if_due(&store) {
                        tracing::error!(error = %e, "cannot rotate the signing key");
                    }
                });
            }
            let loaded = tokio::time::timeout(
                RELOAD_TIMEOUT,
                tokio::task::spawn_blocking(move || {
                    // Signing keys another replica made.
                    if let Err(e) = store
                        .signing_keys()
                        .map_err(crate::tokens::KeyError::from)
                        .and_then(|k| signer.reload(&k))
                    {
                        tracing::error!(error = %e, "cannot reload the signing keys");
                    }
                    store.epochs().and_then(|e| {
                        Ok((
                            e,
                            store.disabled_users()?,
                            store.user_groups(groups)?,
                            store.revoked_delegations()?,
                        ))
                    })
                }),
            )
            .await;
            let Ok(loaded) = loaded else {
                tracing::error!(
                    "reloading revocations took more than {}s: the database is slow or stuck",
                    RELOAD_TIMEOUT.as_secs()
                );
                continue;
            };
            match loaded {
                Ok(Ok((e, d, g, r))) => {
                    self.revocations.set_epochs(e);
                    self.revocations.set_disabled(d);
                    self.revocations.set_groups(g);
                    self.revocations.set_revoked_delegations(r);
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot reload revocations");
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "the revocation reload task failed");
                    continue;
                }
            }
            for (conn_id, claims, conn) in self.revocations.take_revoked() {
                let grant_ended = claims
                    .dlg
                    .as_ref()
                    .is_some_and(|d| self.revocations.delegation_revoked(&d.id));
                let (event, code, why): (_, _, &[u8]) = if self.revocations.disabled(&claims.sub) {
                    (
                        AuditKind::SessionDisabled,
                        close::ACCOUNT_DISABLED,
                        b"account disabled by an admin",
                    )
                } else if grant_ended {
                    (
                        AuditKind::SessionRevoked,
                        close::SESSION_REVOKED,
                        b"delegated grant revoked",
                    )
                } else {
                    (
                        AuditKind::SessionRevoked,
                        close::SESSION_REVOKED,
                        b"session revoked by an admin",
                    )
                };
                tracing::info!(user = %claims.sub, conn = conn_id, event = event.as_str(), "closing the connection");
                conn.close(code.into(), why);
                self.audit.record(AuditEvent {
                    user: Some(claims.sub.clone()),
                    session: Some(claims.jti.clone()),
                    conn: Some(conn_id),
                    peer: Some(self.carriers.shown_peer(conn.remote_address()).to_string()),
                    delegate: claims.act.as_ref().map(|a| a.sub.clone()),
                    reason: Some(String::from_utf8_lossy(why).into_owned()),
                    ..AuditEvent::new(event)
                });
            }
        }
    }
}

impl ConnCtx {
    /// Closes the connection when it has no session by the sign-in deadline, when its
    /// session expires (a renewal on the connection moves that), and when the session has
    /// been idle — no stream open — for the idle timeout. Every stream of the connection
    /// ends with it, so a kept-alive HTTP connection or a long TCP stream cannot outlive
    /// the session.
    pub(super) async fn watch_session(
        &self,
        mut session: watch::Receiver<Option<Arc<SessionClaims>>>,
    ) {
        let gw = &self.gw;
        let start = tokio::time::Instant::now();
        // Read again at every wake: an identity provider step started meanwhile extends it.
        let deadline = || {
            start
                + if self.idp_step.load(Relaxed) {
                    gw.cfg
                        .limits
                        .signin_deadline
                        .max(super::IDP_SIGNIN_DEADLINE)
                } else {
                    gw.cfg.limits.signin_deadline
                }
        };
        loop {
            let claims = session.borrow_and_update().clone();
            let wake = match &claims {
                None => deadline(),
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
                None if tokio::time::Instant::now() < deadline() => continue,
                None => {
                    Metrics::inc(&gw.metrics.signin_deadline_closed_total);
                    (
                        AuditKind::ConnectionClosed,
                        close::NO_SIGN_IN,
                        format!(
                            "no sign-in within {}",
                            humantime::format_duration(gw.cfg.limits.signin_deadline)
                        ),
                    )
                }
                Some(c) if c.exp <= now_secs() => (
                    AuditKind::SessionEnded,
                    close::SESSION_ENDED,
                    "session expired".into(),
                ),
                Some(c) => {
                    let idle = gw.activity.idle_for(&c.jti).unwrap_or_default();
                    if self.open_streams.load(Relaxed) > 0 || idle < gw.cfg.session.idle_timeout {
                        continue;
                    }
                    (
                        AuditKind::SessionEnded,
                        close::SESSION_ENDED,
                        "session idle".into(),
                    )
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
}

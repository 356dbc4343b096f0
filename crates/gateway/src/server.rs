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
    audit::{AuditEvent, AuditKind},
    browser::{BrowserPolicy, untrusted},
    metrics::Metrics,
    proxy::{Counted, StreamContext},
    rp::{PendingEnrol, PendingLogin},
    shards::Shards,
    store::{StoredCredential, now_secs},
    tokens::{KeyUsed, SessionClaims, TokenError, cert_thumbprint},
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

mod control;
mod delegation;
mod sessions;
mod splice;
mod streams;

pub(crate) use crate::limits::RateLimiter;
pub use sessions::REVOCATION_POLL;
pub(crate) use sessions::{Activity, Revocations};
use sessions::{disabled_refusal, revoked_refusal};
use splice::FirstBytesGuard;

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

    /// Accepts QUIC connections on a further endpoint (the carrier's) beside the one
    /// [`Gateway::serve_quic_on`] serves, which keeps the revocations for both.
    pub async fn serve_more_quic(self: Arc<Self>, endpoint: quinn::Endpoint, shards: Arc<Shards>) {
        self.accept_loop(endpoint, &shards).await;
    }

    async fn accept_loop(self: Arc<Self>, endpoint: quinn::Endpoint, shards: &Shards) {
        while let Some(incoming) = endpoint.accept().await {
            // Over the carrier, the TCP peer (QUIC sees an address the hub made).
            let Some(peer) = self.carriers.peer_of(incoming.remote_address()) else {
                incoming.ignore();
                continue;
            };
            let ip = peer.ip();
            if !self
                .limiter
                .connection(ip, self.cfg.limits.connections_per_minute)
            {
                Metrics::inc(&self.metrics.auth_refused_total);
                if !self.audit.allow_refusal(Some(peer)) {
                    incoming.refuse();
                    continue;
                }
                self.audit.record(AuditEvent {
                    peer: Some(peer.to_string()),
                    outcome: Some("rate_limited".into()),
                    reason: Some(format!(
                        "more than {} new connections a minute from {ip}",
                        self.cfg.limits.connections_per_minute
                    )),
                    ..AuditEvent::new(AuditKind::ConnectionRefused)
                });
                incoming.refuse();
                continue;
            }
            let gw = self.clone();
            let id = NEXT_CONN.fetch_add(1, Relaxed);
            let span = tracing::info_span!("conn", id, %peer);
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
        let peer = self.carriers.shown_peer(conn.remote_address());
        let Some(thumb) = peer_thumbprint(&conn) else {
            conn.close(
                touchgate_proto::close::UNUSABLE.into(),
                b"a client certificate is required",
            );
            return;
        };
        let mut binding = [0u8; EXPORTER_LEN];
        if conn
            .export_keying_material(&mut binding, EXPORTER_LABEL, b"")
            .is_err()
        {
            conn.close(
                touchgate_proto::close::UNUSABLE.into(),
                b"no keying material",
            );
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
            idp_step: Default::default(),
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
    /// A step with the identity provider was started (a browser sign-in with password and
    /// MFA, or a device code typed elsewhere): the sign-in deadline is [`IDP_SIGNIN_DEADLINE`].
    idp_step: std::sync::atomic::AtomicBool,
}

/// How long a connection may wait for a sign-in once a step with the identity provider has
/// started on it (at least `[limits] signin_deadline`).
pub const IDP_SIGNIN_DEADLINE: Duration = Duration::from_secs(600);

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

impl Gateway {
    /// Runs a store call on a blocking thread, off the connection's (single-threaded) shard,
    /// and turns a store failure into the refusal a peer gets.
    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::store::Store) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, Refusal> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Refusal::new(RefusalCode::Internal, format!("store task failed: {e}")))?
            .map_err(control::db_refusal)
    }
}

impl ConnCtx {
    fn event(&self, event: AuditKind) -> AuditEvent {
        AuditEvent {
            peer: Some(self.peer.to_string()),
            conn: Some(self.id),
            ..AuditEvent::new(event)
        }
    }

    fn refused(&self, event: AuditKind, user: Option<&str>, r: &Refusal) {
        Metrics::inc(&self.gw.metrics.auth_refused_total);
        if !self.gw.audit.allow_refusal(Some(self.peer)) {
            return;
        }
        let user = user.map(untrusted_user);
        tracing::info!(event = event.as_str(), user, code = ?r.code, reason = %r.message, "refused");
        self.gw.audit.record(AuditEvent {
            user,
            outcome: Some(code_name(r.code)),
            reason: Some(r.message.clone()),
            ..self.event(event)
        });
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

fn peer_thumbprint(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| cert_thumbprint(c))
}

/// The snake_case name of a refusal code, as in the wire format and the audit log.
pub fn code_name(c: RefusalCode) -> String {
    serde_json::to_value(c)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{c:?}"))
}

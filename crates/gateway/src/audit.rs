//! The audit log: one JSON line per security-relevant event, and per request.
//!
//! Lines are formatted by whoever records them and queued; a thread of the log's own writes
//! what has queued up every few milliseconds, in one call: a request pays for formatting its
//! line and a short lock, not for a system call or a thread woken per line. Security events
//! (sign-ins, sessions, refusals, admin changes) wait until they are written; request and
//! stream lines go with the next batch, and are dropped, counted, when the writer falls more
//! than 64 MiB behind.
//! [`AuditLog::flush`] waits until everything recorded so far is written (the gateway flushes
//! when it stops); the last clone of a log flushes when it is dropped.

use std::{
    io::Write,
    sync::{Arc, Condvar, Mutex},
    time::Duration,
};

use serde::Serialize;

use crate::limits::WindowCounter;

/// Where audit lines go.
#[derive(Clone)]
pub struct AuditLog {
    /// The writing thread; `None` when no audit log is configured (events are not even
    /// formatted).
    writer: Option<Arc<Writer>>,
    refusals: Arc<WindowCounter>,
}

/// Refusal lines written per source address each minute; more are counted, and reported in
/// one `refusals_suppressed` line when the source is next refused.
pub const REFUSAL_LINES_PER_MINUTE: u32 = 20;

/// How long [`AuditLog::flush`] waits for the writing thread.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// How often the writing thread writes what has queued up (sooner when much has, or when
/// asked to flush).
const TICK: Duration = Duration::from_millis(10);
/// What makes the writing thread write before its tick.
const BATCH_MAX: usize = 256 * 1024;
/// The most the queue holds: when the sink stalls (a full disk, a stuck pipe), request and
/// stream lines past it are counted and dropped, and one `audit_lines_dropped` line says how
/// many; security events are always kept.
const QUEUE_MAX: usize = 64 * 1024 * 1024;

/// Lines waiting for the writing thread, and the flushes asked for and done.
#[derive(Default)]
struct Queue {
    buf: Vec<u8>,
    asked: u64,
    done: u64,
    closed: bool,
    /// Lines dropped since the last write.
    dropped: u64,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writing thread before its tick.
    wake: Condvar,
    /// Tells flushes their lines are written.
    written: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The queue of the writing thread; dropping the last one flushes and ends the thread.
struct Writer {
    shared: Arc<Shared>,
    /// The most the queue holds for lines that may be dropped ([`QUEUE_MAX`]).
    queue_max: usize,
}

impl Writer {
    fn start(mut sink: Sink, queue_max: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            wake: Condvar::new(),
            written: Condvar::new(),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || {
                let mut spare = Vec::new();
                loop {
                    let (target, closed) = {
                        let mut q = s.lock();
                        if q.asked == q.done && !q.closed && q.buf.len() < BATCH_MAX {
                            q = s
                                .wake
                                .wait_timeout(q, TICK)
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                        }
                        std::mem::swap(&mut q.buf, &mut spare);
                        if q.dropped > 0 {
                            spare.extend_from_slice(&dropped_line(std::mem::take(&mut q.dropped)));
                        }
                        (q.asked, q.closed)
                    };
                    if !spare.is_empty() {
                        if let Err(e) = sink.write(&spare) {
                            tracing::error!(error = %e, "cannot write the audit log");
                        }
                        spare.clear();
                    }
                    let mut q = s.lock();
                    q.done = q.done.max(target);
                    s.written.notify_all();
                    if closed && q.buf.is_empty() {
                        return;
                    }
                }
            })?;
        Ok(Self { shared, queue_max })
    }

    /// Queues `line`; a `durable` one is written before this returns, any other may be
    /// dropped when the queue is full.
    fn push(&self, line: &[u8], durable: bool) {
        {
            let mut q = self.shared.lock();
            if !durable && q.buf.len() + line.len() > self.queue_max {
                q.dropped += 1;
                return;
            }
            q.buf.extend_from_slice(line);
            if q.buf.len() >= BATCH_MAX && !durable {
                self.shared.wake.notify_one();
            }
        }
        if durable {
            self.flush();
        }
    }

    fn flush(&self) {
        let mut q = self.shared.lock();
        q.asked += 1;
        let want = q.asked;
        self.shared.wake.notify_one();
        let deadline = std::time::Instant::now() + FLUSH_WAIT;
        while q.done < want {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::error!("the audit log's writer did not catch up within {FLUSH_WAIT:?}");
                return;
            }
            q = self
                .shared
                .written
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.flush();
    }
}

enum Sink {
    File(std::fs::File),
    Stdout,
    /// Whatever a test writes to (one that stalls, as a full disk).
    #[cfg(test)]
    Test(Box<dyn Write + Send>),
}

impl Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::File(f) => f.write_all(bytes),
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            #[cfg(test)]
            Sink::Test(w) => w.write_all(bytes),
        }
    }
}

/// What an audit line records; written as its snake_case name in the line's `event`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AuditKind {
    /// A request (or TCP connection) a browser was made to send was refused.
    BrowserRequestRefused,
    /// A sign-in challenge was sent.
    ChallengeIssued,
    /// A sign-in was refused.
    ChallengeRefused,
    /// A sign-in assertion verified.
    ChallengeVerified,
    /// The gateway closed a connection (no sign-in by the deadline).
    ConnectionClosed,
    /// A new connection was refused (rate limit).
    ConnectionRefused,
    /// An enrolment challenge was sent.
    EnrolChallengeIssued,
    /// An enrolment was refused.
    EnrolRefused,
    /// A control frame could not be read.
    FrameRefused,
    /// A key was enrolled on the word of the organisation's identity provider.
    IdpEnrolled,
    /// An identity provider step was refused (its answer, its token or its identity).
    IdpRefused,
    /// The identity provider's ID token verified for this connection.
    IdpVerified,
    /// An admin made an invite.
    InviteCreated,
    /// An invite was used: a key was enrolled.
    InviteUsed,
    /// An admin removed one key of a user.
    KeyRemoved,
    /// Refusal lines from one source were left out (over the per-minute limit).
    RefusalsSuppressed,
    /// Request or stream lines were not written: the log's writer fell too far behind.
    AuditLinesDropped,
    /// An HTTP request was answered (one line per request; `[audit] requests`).
    Request,
    /// A request was refused for its own shape (a path leaving the base path).
    RequestRefused,
    /// A user approved a delegated grant with a touch.
    DelegationGranted,
    /// A delegation was refused: asked for beyond the policy, or a request or stream
    /// outside its grant.
    DelegationRefused,
    /// A delegated grant was revoked (by its user or an admin).
    DelegationRevoked,
    /// The identity provider created a group over SCIM.
    ScimGroupCreated,
    /// A SCIM group changed: a member added or removed (one line per user), renamed.
    ScimGroupChanged,
    /// The identity provider deleted a group over SCIM.
    ScimGroupRemoved,
    /// A SCIM request was refused (bearer token, body, filter, unknown id, conflict).
    ScimRefused,
    /// The identity provider changed a user's other attributes over SCIM.
    ScimUserChanged,
    /// The identity provider created (provisioned) a user over SCIM.
    ScimUserCreated,
    /// The identity provider deactivated a user over SCIM: as `disable`.
    ScimUserDisabled,
    /// The identity provider reactivated a user over SCIM: as `enable`.
    ScimUserEnabled,
    /// The identity provider deleted a user over SCIM: as `remove`.
    ScimUserRemoved,
    /// A live session ended because an admin disabled the account.
    SessionDisabled,
    /// A live session ended: expired or idle.
    SessionEnded,
    /// A session was issued after a verified sign-in.
    SessionIssued,
    /// A resume was refused.
    SessionRefused,
    /// A session was resumed on a new connection.
    SessionResumed,
    /// A live session ended because an admin revoked it.
    SessionRevoked,
    /// A data stream closed (bytes each way, duration, outcome).
    StreamClosed,
    /// A data stream was opened.
    StreamOpened,
    /// A data stream was refused.
    StreamRefused,
    /// The upstream failed, or the gateway could not call it.
    UpstreamError,
    /// An admin disabled a user.
    UserDisabled,
    /// An admin enabled a user.
    UserEnabled,
    /// An admin removed a user.
    UserRemoved,
    /// An admin revoked a user's sessions.
    UserRevoked,
}

impl AuditKind {
    /// Every kind, for documentation and tests.
    pub const ALL: [AuditKind; 45] = [
        Self::BrowserRequestRefused,
        Self::ChallengeIssued,
        Self::ChallengeRefused,
        Self::ChallengeVerified,
        Self::ConnectionClosed,
        Self::ConnectionRefused,
        Self::EnrolChallengeIssued,
        Self::EnrolRefused,
        Self::FrameRefused,
        Self::IdpEnrolled,
        Self::IdpRefused,
        Self::IdpVerified,
        Self::InviteCreated,
        Self::InviteUsed,
        Self::KeyRemoved,
        Self::RefusalsSuppressed,
        Self::AuditLinesDropped,
        Self::Request,
        Self::RequestRefused,
        Self::DelegationGranted,
        Self::DelegationRefused,
        Self::DelegationRevoked,
        Self::ScimGroupCreated,
        Self::ScimGroupChanged,
        Self::ScimGroupRemoved,
        Self::ScimRefused,
        Self::ScimUserChanged,
        Self::ScimUserCreated,
        Self::ScimUserDisabled,
        Self::ScimUserEnabled,
        Self::ScimUserRemoved,
        Self::SessionDisabled,
        Self::SessionEnded,
        Self::SessionIssued,
        Self::SessionRefused,
        Self::SessionResumed,
        Self::SessionRevoked,
        Self::StreamClosed,
        Self::StreamOpened,
        Self::StreamRefused,
        Self::UpstreamError,
        Self::UserDisabled,
        Self::UserEnabled,
        Self::UserRemoved,
        Self::UserRevoked,
    ];

    /// The name written in the audit line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BrowserRequestRefused => "browser_request_refused",
            Self::ChallengeIssued => "challenge_issued",
            Self::ChallengeRefused => "challenge_refused",
            Self::ChallengeVerified => "challenge_verified",
            Self::ConnectionClosed => "connection_closed",
            Self::ConnectionRefused => "connection_refused",
            Self::EnrolChallengeIssued => "enrol_challenge_issued",
            Self::EnrolRefused => "enrol_refused",
            Self::FrameRefused => "frame_refused",
            Self::IdpEnrolled => "idp_enrolled",
            Self::IdpRefused => "idp_refused",
            Self::IdpVerified => "idp_verified",
            Self::InviteCreated => "invite_created",
            Self::InviteUsed => "invite_used",
            Self::KeyRemoved => "key_removed",
            Self::RefusalsSuppressed => "refusals_suppressed",
            Self::AuditLinesDropped => "audit_lines_dropped",
            Self::Request => "request",
            Self::RequestRefused => "request_refused",
            Self::DelegationGranted => "delegation_granted",
            Self::DelegationRefused => "delegation_refused",
            Self::DelegationRevoked => "delegation_revoked",
            Self::ScimGroupCreated => "scim_group_created",
            Self::ScimGroupChanged => "scim_group_changed",
            Self::ScimGroupRemoved => "scim_group_removed",
            Self::ScimRefused => "scim_refused",
            Self::ScimUserChanged => "scim_user_changed",
            Self::ScimUserCreated => "scim_user_created",
            Self::ScimUserDisabled => "scim_user_disabled",
            Self::ScimUserEnabled => "scim_user_enabled",
            Self::ScimUserRemoved => "scim_user_removed",
            Self::SessionDisabled => "session_disabled",
            Self::SessionEnded => "session_ended",
            Self::SessionIssued => "session_issued",
            Self::SessionRefused => "session_refused",
            Self::SessionResumed => "session_resumed",
            Self::SessionRevoked => "session_revoked",
            Self::StreamClosed => "stream_closed",
            Self::StreamOpened => "stream_opened",
            Self::StreamRefused => "stream_refused",
            Self::UpstreamError => "upstream_error",
            Self::UserDisabled => "user_disabled",
            Self::UserEnabled => "user_enabled",
            Self::UserRemoved => "user_removed",
            Self::UserRevoked => "user_revoked",
        }
    }
}

impl std::fmt::Display for AuditKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One audit event. Fields not relevant to an event are left out of its line.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    /// What happened.
    pub event: AuditKind,
    /// The user, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The service, for stream events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The group, for SCIM group events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The peer's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Connection id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn: Option<u64>,
    /// Session id (never the token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Outcome: `ok` or a refusal code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Why, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Bytes from the agent to the service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_up: Option<u64>,
    /// Bytes from the service to the agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_down: Option<u64>,
    /// Duration in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Session or invite expiry, seconds since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// What let the user use the service: `user`, `everyone` or `group:NAME`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granted_by: Option<String>,
    /// Who used a delegated grant: its label (the user is the person who approved it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delegate: Option<String>,
    /// The credential (base64url id) whose touch began the session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// That key's authenticator model (AAGUID).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aaguid: Option<String>,
    /// The model's name, where the attestation trust list names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// HTTP method, for request events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The request's path (its query string only with `[audit] query = true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The HTTP status answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// How many lines like this one were left out (`refusals_suppressed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
}

impl AuditEvent {
    /// An event of `kind` with no other field set.
    pub fn new(kind: AuditKind) -> Self {
        Self {
            event: kind,
            user: None,
            service: None,
            group: None,
            peer: None,
            conn: None,
            session: None,
            outcome: None,
            reason: None,
            bytes_up: None,
            bytes_down: None,
            duration_ms: None,
            expires_at: None,
            granted_by: None,
            delegate: None,
            credential: None,
            aaguid: None,
            model: None,
            method: None,
            path: None,
            status: None,
            suppressed: None,
        }
    }

    /// Names the security key that signed in: its credential, its model's AAGUID and name.
    pub fn with_key(mut self, rp: &crate::rp::RelyingParty, key: &crate::tokens::KeyUsed) -> Self {
        self.credential = Some(key.cred.clone());
        self.model = rp.model_name(&key.aaguid);
        self.aaguid = Some(key.aaguid.clone());
        self
    }

    /// Names the key behind a session (sessions from before keys were recorded name none),
    /// and the delegate acting under a grant.
    pub fn with_claims(
        self,
        rp: &crate::rp::RelyingParty,
        claims: &crate::tokens::SessionClaims,
    ) -> Self {
        let mut e = match &claims.key {
            Some(k) => self.with_key(rp, k),
            None => self,
        };
        e.delegate = claims.act.as_ref().map(|a| a.sub.clone());
        e
    }
}

/// The line that says `n` lines were dropped.
fn dropped_line(n: u64) -> Vec<u8> {
    let event = AuditEvent {
        suppressed: Some(n),
        reason: Some(format!(
            "the audit log's writer fell behind: {n} request or stream lines were not written"
        )),
        ..AuditEvent::new(AuditKind::AuditLinesDropped)
    };
    let mut line = serde_json::to_vec(&Line {
        ts: now_rfc3339(),
        event: &event,
    })
    .unwrap_or_default();
    line.push(b'\n');
    line
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// The fields an event has in common with many others (a stream's user, key and service),
/// formatted once as JSON members, to which each line adds its own ([`LineBuilder`]).
#[derive(Debug, Clone)]
pub struct Prefix(Arc<str>);

impl AuditEvent {
    /// This event's fields, formatted once, for lines that each add a few of their own.
    pub fn prefix(&self) -> Prefix {
        let json = serde_json::to_string(self).unwrap_or_else(|_| "{}".into());
        let inner = json
            .strip_prefix('{')
            .and_then(|j| j.strip_suffix('}'))
            .unwrap_or_default();
        Prefix(inner.into())
    }
}

/// One line: a [`Prefix`] and the fields of this line only (which the prefix must not have).
pub struct LineBuilder(Vec<u8>);

impl LineBuilder {
    /// A line stamped now, starting with `prefix`'s fields.
    pub fn new(prefix: &Prefix) -> Self {
        let mut s = Vec::with_capacity(prefix.0.len() + 224);
        let _ = write!(
            s,
            "{{\"ts\":\"{}\"",
            humantime::format_rfc3339_millis(std::time::SystemTime::now())
        );
        if !prefix.0.is_empty() {
            s.push(b',');
            s.extend_from_slice(prefix.0.as_bytes());
        }
        Self(s)
    }

    /// Adds a text field.
    pub fn text(mut self, name: &str, value: &str) -> Self {
        let _ = write!(self.0, ",\"{name}\":");
        if serde_json::to_writer(&mut self.0, value).is_err() {
            self.0.extend_from_slice(b"null");
        }
        self
    }

    /// Adds a number field.
    pub fn number(mut self, name: &str, value: u64) -> Self {
        let _ = write!(self.0, ",\"{name}\":{value}");
        self
    }
}

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    #[serde(flatten)]
    event: &'a AuditEvent,
}

impl AuditLog {
    /// Opens the audit log: a file path (appended to), `"-"` for stdout, or `None` to discard.
    pub fn open(target: Option<&str>) -> std::io::Result<Self> {
        let sink = match target {
            None => None,
            Some("-") => Some(Sink::Stdout),
            Some(path) => {
                if let Some(dir) = std::path::Path::new(path).parent()
                    && !dir.as_os_str().is_empty()
                {
                    std::fs::create_dir_all(dir)?;
                }
                Some(Sink::File(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)?,
                ))
            }
        };
        Ok(Self {
            writer: sink
                .map(|s| Writer::start(s, QUEUE_MAX))
                .transpose()?
                .map(Arc::new),
            refusals: Arc::new(WindowCounter::new(1 << 16)),
        })
    }

    /// A log writing to `sink` whose queue holds at most `queue_max` bytes of lines that may
    /// be dropped (instead of [`QUEUE_MAX`]).
    #[cfg(test)]
    fn with_sink(sink: Box<dyn Write + Send>, queue_max: usize) -> std::io::Result<Self> {
        Ok(Self {
            writer: Some(Arc::new(Writer::start(Sink::Test(sink), queue_max)?)),
            refusals: Arc::new(WindowCounter::new(1 << 16)),
        })
    }

    /// Whether a refusal of a request from `peer` should be logged and audited:
    /// at most [`REFUSAL_LINES_PER_MINUTE`] per source address, so a peer cannot fill the
    /// disk or bury other lines. Writes a `refusals_suppressed` line when a source that went
    /// over the limit is refused again in a later minute, and one when it first goes over.
    pub fn allow_refusal(&self, peer: Option<std::net::SocketAddr>) -> bool {
        let source = peer.map(|a| crate::limits::source(a.ip()));
        let hit = self.refusals.hit(&source);
        let limit = REFUSAL_LINES_PER_MINUTE;
        let note = |suppressed: Option<u64>, reason: String| {
            self.record(AuditEvent {
                peer: source.map(|s| s.to_string()),
                suppressed,
                reason: Some(reason),
                ..AuditEvent::new(AuditKind::RefusalsSuppressed)
            });
        };
        if hit.previous > limit {
            let n = u64::from(hit.previous - limit);
            tracing::warn!(source = ?source, suppressed = n, "refusal lines were suppressed");
            note(
                Some(n),
                format!("{n} more refusals from this source in an earlier minute were not logged"),
            );
        }
        if hit.count == limit + 1 {
            tracing::warn!(source = ?source, "more than {limit} refusals a minute from one source: counting, not logging, the rest of this minute");
            note(
                None,
                format!(
                    "more than {limit} refusals a minute from this source: the rest of this minute is counted, not logged"
                ),
            );
        }
        hit.count <= limit
    }

    /// Records one event as one line. Failing to write is reported in the process log; it
    /// does not fail the request.
    pub fn record(&self, event: AuditEvent) {
        let Some(w) = &self.writer else { return };
        let line = Line {
            ts: now_rfc3339(),
            event: &event,
        };
        let Ok(mut text) = serde_json::to_string(&line) else {
            return;
        };
        text.push('\n');
        // Security events are on disk before the caller goes on; the frequent stream lines
        // are written with the next batch.
        let durable = !matches!(
            event.event,
            AuditKind::StreamOpened | AuditKind::StreamClosed
        );
        w.push(text.as_bytes(), durable);
    }

    /// Whether lines are kept at all (an audit log is configured).
    pub fn keeps(&self) -> bool {
        self.writer.is_some()
    }

    /// Records a line made by [`LineBuilder`].
    pub fn record_built(&self, line: LineBuilder) {
        if let Some(w) = &self.writer {
            let mut text = line.0;
            text.extend_from_slice(b"}\n");
            w.push(&text, false);
        }
    }

    /// Waits until every line recorded so far is written (at most a few seconds).
    pub fn flush(&self) {
        if let Some(w) = &self.writer {
            w.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_written_under_its_name_and_names_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for k in AuditKind::ALL {
            assert_eq!(serde_json::to_value(k).expect("json"), k.as_str());
            assert!(seen.insert(k.as_str()), "{k} twice");
        }
    }

    #[test]
    fn refusal_lines_are_limited_per_source_with_one_note_when_the_limit_is_passed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(Some(path.to_str().expect("utf8 path"))).expect("open");
        let allowed = (0..100)
            .filter(|i| {
                log.allow_refusal(Some(std::net::SocketAddr::from(([192, 0, 2, 7], 1000 + i))))
            })
            .count();
        assert_eq!(allowed, REFUSAL_LINES_PER_MINUTE as usize);
        // Another source is not held back by the first.
        assert!(log.allow_refusal(Some(std::net::SocketAddr::from(([198, 51, 100, 1], 443)))));
        log.flush();
        let text = std::fs::read_to_string(&path).expect("read");
        let notes: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(notes.len(), 1, "{text}");
        assert_eq!(notes[0]["event"], "refusals_suppressed");
        assert_eq!(notes[0]["peer"], "192.0.2.7");
    }

    /// A sink that takes nothing until the test opens it (a full disk, a stuck pipe), and says
    /// when the writing thread is stuck in it.
    #[derive(Clone, Default)]
    struct Stuck(Arc<(Mutex<StuckState>, Condvar)>);

    #[derive(Default)]
    struct StuckState {
        open: bool,
        writing: bool,
        out: Vec<u8>,
    }

    impl Stuck {
        fn state(&self) -> std::sync::MutexGuard<'_, StuckState> {
            self.0.0.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// Waits (at most ten seconds) until the writing thread is inside `write`.
        fn wait_writing(&self) {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut s = self.state();
            while !s.writing {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                assert!(!left.is_zero(), "the writing thread never wrote");
                s = self.0.1.wait_timeout(s, left).expect("wait").0;
            }
        }

        fn open(&self) {
            self.state().open = true;
            self.0.1.notify_all();
        }

        fn lines(&self) -> Vec<serde_json::Value> {
            String::from_utf8(self.state().out.clone())
                .expect("utf8")
                .lines()
                .map(|l| serde_json::from_str(l).expect("json line"))
                .collect()
        }
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut s = self.state();
            s.writing = true;
            self.0.1.notify_all();
            while !s.open {
                s = self.0.1.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.out.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn request_and_stream_lines_past_the_backlog_bound_are_dropped_and_counted_not_security_events()
    {
        const BOUND: usize = 4096;
        let sink = Stuck::default();
        let log = AuditLog::with_sink(Box::new(sink.clone()), BOUND).expect("log");
        let writer = log.writer.clone().expect("a writer");
        let prefix = AuditEvent {
            user: Some("alice@example.com".into()),
            service: Some("api".into()),
            ..AuditEvent::new(AuditKind::Request)
        }
        .prefix();
        let request = |i: u64| {
            log.record_built(
                LineBuilder::new(&prefix)
                    .text("method", "GET")
                    .text("path", "/v1/items")
                    .number("status", 200 + i % 10),
            );
        };
        let stream = || {
            log.record(AuditEvent {
                user: Some("alice@example.com".into()),
                service: Some("db".into()),
                ..AuditEvent::new(AuditKind::StreamOpened)
            });
        };
        let queued = || writer.shared.lock().buf.len();

        // The writing thread takes the first line and sticks in the sink with it.
        request(0);
        sink.wait_writing();
        assert_eq!(queued(), 0, "the thread took the first line");

        // The backlog grows to the bound and no further: the lines past it are counted.
        let (mut sent, mut longest) = (0u64, 0usize);
        for i in 0..200 {
            let before = queued();
            if i % 2 == 0 {
                request(i);
            } else {
                stream();
            }
            sent += 1;
            longest = longest.max(queued() - before);
            assert!(queued() <= BOUND, "{} queued past the bound", queued());
        }
        let dropped = writer.shared.lock().dropped;
        assert!(dropped > 100, "{dropped} of {sent} dropped");
        let kept = sent - dropped;
        assert!(kept > 10, "{kept} kept");
        assert!(BOUND - queued() < longest, "the queue was filled");

        // A security event is queued past the bound, and is on disk before its caller goes on.
        let security = std::thread::scope(|s| {
            let caller = s.spawn(|| {
                log.record(AuditEvent {
                    user: Some("alice@example.com".into()),
                    session: Some("dlg-0123456789abcdef".into()),
                    delegate: Some("ci-nightly".into()),
                    reason: Some("delegated grant revoked while the log was stuck".into()),
                    ..AuditEvent::new(AuditKind::SessionRevoked)
                });
                String::from_utf8_lossy(&sink.state().out).contains("\"session_revoked\"")
            });
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !String::from_utf8_lossy(&writer.shared.lock().buf).contains("session_revoked") {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the security event was not queued"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(
                queued() > BOUND,
                "the security event was kept past the bound"
            );
            // Still full: one more request line is dropped.
            request(1);
            assert_eq!(writer.shared.lock().dropped, dropped + 1);
            sink.open();
            caller.join().expect("the caller")
        });
        assert!(
            security,
            "record returned before the security event was written"
        );

        let lines = sink.lines();
        let count = |event: &str| lines.iter().filter(|l| l["event"] == event).count();
        assert_eq!(
            (count("request") + count("stream_opened")) as u64,
            1 + kept,
            "{lines:#?}"
        );
        assert_eq!(count("session_revoked"), 1);
        let notes: Vec<_> = lines
            .iter()
            .filter(|l| l["event"] == "audit_lines_dropped")
            .collect();
        assert_eq!(notes.len(), 1, "{lines:#?}");
        assert_eq!(notes[0]["suppressed"], dropped + 1);
        let reason = notes[0]["reason"].as_str().expect("reason");
        assert!(
            reason.contains(&format!(
                "{} request or stream lines were not written",
                dropped + 1
            )),
            "{reason}"
        );
        // The note comes after what was kept: it is written with the batch that catches up.
        assert_eq!(
            lines.last().map(|l| &l["event"]),
            Some(&"audit_lines_dropped".into())
        );

        // Caught up, the queue takes request lines again, and nothing more is counted.
        request(2);
        stream();
        log.flush();
        let lines = sink.lines();
        let tail: Vec<_> = lines[lines.len() - 2..]
            .iter()
            .map(|l| l["event"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(tail, ["request", "stream_opened"]);
        assert_eq!(writer.shared.lock().dropped, 0);
    }

    #[test]
    fn each_event_is_one_json_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(Some(path.to_str().expect("utf8 path"))).expect("open");
        log.record(AuditEvent {
            user: Some("alice".into()),
            service: Some("db".into()),
            outcome: Some("forbidden".into()),
            ..AuditEvent::new(AuditKind::StreamRefused)
        });
        log.record(AuditEvent {
            ..AuditEvent::new(AuditKind::SessionIssued)
        });
        log.flush();
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "stream_refused");
        assert_eq!(lines[0]["service"], "db");
        assert!(lines[0]["ts"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert!(lines[1].get("user").is_none());
    }
}

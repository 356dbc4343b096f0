//! The audit log: one JSON line per security-relevant event.

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use serde::Serialize;

use crate::limits::WindowCounter;

/// Where audit lines go.
#[derive(Clone)]
pub struct AuditLog {
    sink: Arc<Mutex<Sink>>,
    refusals: Arc<WindowCounter>,
}

/// Refusal lines written per source address each minute; more are counted, and reported in
/// one `refusals_suppressed` line when the source is next refused.
pub const REFUSAL_LINES_PER_MINUTE: u32 = 20;

enum Sink {
    File(std::fs::File),
    Stdout,
    Discard,
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
    /// A request was refused for its own shape (a path leaving the base path).
    RequestRefused,
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
    pub const ALL: [AuditKind; 40] = [
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
        Self::RequestRefused,
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
            Self::RequestRefused => "request_refused",
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
    /// HTTP method, for request events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
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
            method: None,
            suppressed: None,
        }
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
            None => Sink::Discard,
            Some("-") => Sink::Stdout,
            Some(path) => {
                if let Some(dir) = std::path::Path::new(path).parent()
                    && !dir.as_os_str().is_empty()
                {
                    std::fs::create_dir_all(dir)?;
                }
                Sink::File(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)?,
                )
            }
        };
        Ok(Self {
            sink: Arc::new(Mutex::new(sink)),
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

    /// Writes one event as one line. Failing to write is reported in the process log; it does
    /// not fail the request.
    pub fn record(&self, event: AuditEvent) {
        let line = Line {
            ts: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            event: &event,
        };
        let Ok(mut text) = serde_json::to_string(&line) else {
            return;
        };
        text.push('\n');
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        let res = match &mut *sink {
            Sink::File(f) => f.write_all(text.as_bytes()),
            Sink::Stdout => std::io::stdout().lock().write_all(text.as_bytes()),
            Sink::Discard => Ok(()),
        };
        if let Err(e) = res {
            tracing::error!(error = %e, "cannot write the audit log");
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
        let text = std::fs::read_to_string(&path).expect("read");
        let notes: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(notes.len(), 1, "{text}");
        assert_eq!(notes[0]["event"], "refusals_suppressed");
        assert_eq!(notes[0]["peer"], "192.0.2.7");
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

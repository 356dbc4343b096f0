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

/// One audit event. Fields not relevant to an event are left out of its line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditEvent {
    /// What happened: `invite_created`, `invite_used`, `challenge_issued`, `challenge_verified`,
    /// `challenge_refused`, `enrol_refused`, `session_issued`, `session_resumed`,
    /// `session_refused`, `stream_opened`, `stream_closed`, `stream_refused`.
    pub event: &'static str,
    /// The user, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The service, for stream events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
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
    /// HTTP method, for request events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// How many lines like this one were left out (`refusals_suppressed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
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

    /// Whether a refusal of a request from `peer` (`ip:port`) should be logged and audited:
    /// at most [`REFUSAL_LINES_PER_MINUTE`] per source address, so a peer cannot fill the
    /// disk or bury other lines. Writes a `refusals_suppressed` line when a source that went
    /// over the limit is refused again in a later minute, and one when it first goes over.
    pub fn allow_refusal(&self, peer: Option<&str>) -> bool {
        let source = peer.map(|p| {
            p.parse::<std::net::SocketAddr>()
                .map(|a| crate::limits::source(a.ip()).to_string())
                .unwrap_or_else(|_| p.to_owned())
        });
        let hit = self.refusals.hit(&source);
        let limit = REFUSAL_LINES_PER_MINUTE;
        let note = |suppressed: Option<u64>, reason: String| {
            self.record(AuditEvent {
                event: "refusals_suppressed",
                peer: source.clone(),
                suppressed,
                reason: Some(reason),
                ..Default::default()
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
    fn refusal_lines_are_limited_per_source_with_one_note_when_the_limit_is_passed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(Some(path.to_str().expect("utf8 path"))).expect("open");
        let allowed = (0..100)
            .filter(|i| log.allow_refusal(Some(&format!("192.0.2.7:{}", 1000 + i))))
            .count();
        assert_eq!(allowed, REFUSAL_LINES_PER_MINUTE as usize);
        // Another source is not held back by the first.
        assert!(log.allow_refusal(Some("198.51.100.1:443")));
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
            event: "stream_refused",
            user: Some("alice".into()),
            service: Some("db".into()),
            outcome: Some("forbidden".into()),
            ..Default::default()
        });
        log.record(AuditEvent {
            event: "session_issued",
            ..Default::default()
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

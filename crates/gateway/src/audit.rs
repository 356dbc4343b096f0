//! The audit log: one JSON line per security-relevant event.

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use serde::Serialize;

/// Where audit lines go.
#[derive(Clone)]
pub struct AuditLog {
    sink: Arc<Mutex<Sink>>,
}

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
        })
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

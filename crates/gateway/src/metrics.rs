//! Gateway counters, exposed in Prometheus text format on the admin port.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The gateway's counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    /// QUIC connections accepted.
    pub connections_total: AtomicU64,
    /// QUIC connections open now.
    pub connections_open: AtomicU64,
    /// Sessions issued after a verified assertion.
    pub sessions_issued_total: AtomicU64,
    /// Sessions resumed on a new connection with a token.
    pub sessions_resumed_total: AtomicU64,
    /// Sign-in or resume attempts refused.
    pub auth_refused_total: AtomicU64,
    /// Credentials enrolled.
    pub enrolments_total: AtomicU64,
    /// Data streams accepted.
    pub streams_total: AtomicU64,
    /// Data streams open now.
    pub streams_open: AtomicU64,
    /// Data streams refused.
    pub streams_refused_total: AtomicU64,
    /// Bytes from agents to services.
    pub bytes_up_total: AtomicU64,
    /// Bytes from services to agents.
    pub bytes_down_total: AtomicU64,
    /// Upstream requests that failed.
    pub upstream_errors_total: AtomicU64,
    /// HTTP/1 connections opened to plain-HTTP upstreams (each serves many streams in turn).
    pub upstream_connections_total: AtomicU64,
    /// Requests (or TCP connections) a browser was made to send, refused.
    pub browser_refused_total: AtomicU64,
    /// Requests refused for their own shape (a path leaving the service's base path).
    pub requests_refused_total: AtomicU64,
    /// Connections closed because they had no session by the sign-in deadline.
    pub signin_deadline_closed_total: AtomicU64,
}

impl Metrics {
    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let rows: [(&str, &str, &str, &AtomicU64); 16] = [
            (
                "touchgate_requests_refused_total",
                "counter",
                "requests refused for their own shape (e.g. a path leaving the base path)",
                &self.requests_refused_total,
            ),
            (
                "touchgate_browser_refused_total",
                "counter",
                "requests from web pages (cross-site, rebound host) refused",
                &self.browser_refused_total,
            ),
            (
                "touchgate_signin_deadline_closed_total",
                "counter",
                "connections closed without a session at the sign-in deadline",
                &self.signin_deadline_closed_total,
            ),
            (
                "touchgate_connections_total",
                "counter",
                "QUIC connections accepted",
                &self.connections_total,
            ),
            (
                "touchgate_connections_open",
                "gauge",
                "QUIC connections open",
                &self.connections_open,
            ),
            (
                "touchgate_sessions_issued_total",
                "counter",
                "sessions issued after a verified assertion",
                &self.sessions_issued_total,
            ),
            (
                "touchgate_sessions_resumed_total",
                "counter",
                "sessions resumed with a token",
                &self.sessions_resumed_total,
            ),
            (
                "touchgate_auth_refused_total",
                "counter",
                "sign-in, enrolment or resume attempts refused",
                &self.auth_refused_total,
            ),
            (
                "touchgate_enrolments_total",
                "counter",
                "credentials enrolled",
                &self.enrolments_total,
            ),
            (
                "touchgate_streams_total",
                "counter",
                "data streams accepted",
                &self.streams_total,
            ),
            (
                "touchgate_streams_open",
                "gauge",
                "data streams open",
                &self.streams_open,
            ),
            (
                "touchgate_streams_refused_total",
                "counter",
                "data streams refused",
                &self.streams_refused_total,
            ),
            (
                "touchgate_bytes_up_total",
                "counter",
                "bytes from agents to services",
                &self.bytes_up_total,
            ),
            (
                "touchgate_bytes_down_total",
                "counter",
                "bytes from services to agents",
                &self.bytes_down_total,
            ),
            (
                "touchgate_upstream_errors_total",
                "counter",
                "upstream requests that failed",
                &self.upstream_errors_total,
            ),
            (
                "touchgate_upstream_connections_total",
                "counter",
                "HTTP/1 connections opened to plain-HTTP upstreams",
                &self.upstream_connections_total,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, v) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n",
                v.load(Relaxed)
            ));
        }
        out
    }

    /// Adds one to a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    /// Subtracts one from a gauge.
    pub fn dec(c: &AtomicU64) {
        c.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_prometheus_text() {
        let m = Metrics::default();
        Metrics::inc(&m.streams_total);
        Metrics::inc(&m.streams_total);
        let text = m.render();
        assert!(
            text.contains("# TYPE touchgate_streams_total counter\ntouchgate_streams_total 2\n")
        );
        assert!(text.lines().filter(|l| l.starts_with("# HELP")).count() == 16);
    }
}

//! One audit line per HTTP request (`[audit] requests`): who (user, delegate, key), what
//! (service, method, path), and how it went (status, bytes each way, duration). The line is
//! written when the answer's body has gone out (or the caller went away), or, for an upgrade
//! (WebSocket), when the upgraded connection closes, so bytes and duration are the whole
//! exchange's.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::ProxyBody;
use crate::audit::{AuditLog, LineBuilder, Prefix};

/// A request's line in the making.
pub(super) struct RequestLine {
    audit: AuditLog,
    /// The stream's fields (user, key, service, session, grant), formatted once per stream.
    prefix: Prefix,
    method: http::Method,
    path: String,
    started: Instant,
    /// Bytes of the request's body (or, after an upgrade, from the caller).
    pub(super) up: Arc<AtomicU64>,
}

impl RequestLine {
    /// Starts the line of a request to `path` (query already kept or dropped) with `method`,
    /// after the stream's `prefix`.
    pub(super) fn start(
        audit: &AuditLog,
        prefix: &Prefix,
        method: &http::Method,
        path: String,
    ) -> Self {
        Self {
            audit: audit.clone(),
            prefix: prefix.clone(),
            method: method.clone(),
            path,
            started: Instant::now(),
            up: Arc::default(),
        }
    }

    /// Writes the line: the answer's `status`, `down` bytes to the caller, and `outcome`
    /// (`ok`, `incomplete` when the caller went away before the end, or the error).
    pub(super) fn finish(self, status: u16, up: u64, down: u64, outcome: String) {
        let line = LineBuilder::new(&self.prefix)
            .text("method", self.method.as_str())
            .text("path", &self.path)
            .number("status", u64::from(status))
            .number("bytes_up", up)
            .number("bytes_down", down)
            .number("duration_ms", self.started.elapsed().as_millis() as u64)
            .text("outcome", &outcome);
        self.audit.record_built(line);
    }
}

/// An answer's body that counts what goes out and writes the request's line at its end.
pub(super) struct AuditedBody {
    inner: ProxyBody,
    line: Option<(RequestLine, u16)>,
    down: u64,
}

impl AuditedBody {
    pub(super) fn new(inner: ProxyBody, line: RequestLine, status: u16) -> Self {
        Self {
            inner,
            line: Some((line, status)),
            down: 0,
        }
    }

    fn finish(&mut self, outcome: &str) {
        if let Some((line, status)) = self.line.take() {
            let up = line.up.load(Relaxed);
            line.finish(status, up, self.down, outcome.to_owned());
        }
    }
}

impl Body for AuditedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.down += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish("ok");
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let outcome = format!("error: {e}");
                self.finish(&outcome);
            }
            Poll::Ready(None) => self.finish("ok"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for AuditedBody {
    fn drop(&mut self) {
        // Dropped before its end was polled: complete if hyper knew it was (an empty body, or
        // one whose length was reached), else the caller went away.
        let outcome = if self.inner.is_end_stream() {
            "ok"
        } else {
            "incomplete"
        };
        self.finish(outcome);
    }
}

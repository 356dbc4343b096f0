//! `Expect: 100-continue` decided by the upstream, not the gateway. hyper answers a caller's
//! expectation with `100 Continue` as soon as the request body is first read, so the body is
//! held back until the upstream itself says `100 Continue` (or a second passes, as a client
//! may stop waiting): an upstream that refuses at once (413, 401) is heard before the caller
//! sends a byte of the body. HTTP/1 upstreams, plain or TLS, report their `100` through
//! hyper's informational callback; hyper's HTTP/2 client has no 1xx, so there the upstream's
//! final answer (a refusal) or the wait decides, as curl's own one-second wait would.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use super::*;

/// How long the body waits for the upstream's `100 Continue` before it is sent anyway.
const CONTINUE_WAIT: Duration = Duration::from_secs(1);

/// Whether the request carries `Expect: 100-continue`.
pub(super) fn expects_continue(h: &HeaderMap) -> bool {
    h.get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
}

/// Holds `body` back until the upstream answers `req` with `100 Continue` (seen through
/// hyper's informational callback on an HTTP/1 client connection) or [`CONTINUE_WAIT`] passes.
pub(super) fn hold_until_continue(req: &mut Request<ProxyBody>) {
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    hyper::ext::on_informational(req, move |res| {
        if res.status() == StatusCode::CONTINUE {
            tx.send_replace(true);
        }
    });
    let opened = Box::pin(async move {
        let _ = tokio::time::timeout(CONTINUE_WAIT, async move {
            if rx.wait_for(|go| *go).await.is_err() {
                // The callback is gone: an HTTP/2 connection drops it with the request's
                // extensions (it has no 1xx). The final answer or the wait decides.
                std::future::pending::<()>().await;
            }
        })
        .await;
    });
    let body = std::mem::replace(
        req.body_mut(),
        Empty::new().map_err(|never| match never {}).boxed(),
    );
    *req.body_mut() = Held {
        opened: Some(opened),
        inner: body,
    }
    .boxed();
}

/// A body that yields nothing until `opened` resolves.
struct Held {
    opened: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    inner: ProxyBody,
}

impl hyper::body::Body for Held {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        if let Some(opened) = &mut self.opened {
            std::task::ready!(opened.as_mut().poll(cx));
            self.opened = None;
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.opened.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_100_continue_expectation_is_recognised() {
        let mut h = HeaderMap::new();
        assert!(!expects_continue(&h));
        h.insert(header::EXPECT, HeaderValue::from_static("100-Continue"));
        assert!(expects_continue(&h));
        h.insert(header::EXPECT, HeaderValue::from_static("something-else"));
        assert!(!expects_continue(&h));
    }
}

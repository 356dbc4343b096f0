//! The TCP splice of a data stream, behind a guard that refuses a browser's HTTP request made
//! to a TCP service before any byte of it is forwarded.

use super::*;

/// Lets a TCP service's first bytes through only once they are known not to be a browser's
/// HTTP request that the port's policy refuses ([`BrowserPolicy::check_first_bytes`]). Until
/// then it holds what it has read; the other direction flows meanwhile, so protocols where
/// the server speaks first are not held up. A refusal fails the read, which ends the splice
/// before anything reached the upstream.
pub(super) struct FirstBytesGuard<T> {
    inner: T,
    policy: Option<BrowserPolicy>,
    held: Vec<u8>,
    released: usize,
    refusal: Arc<std::sync::OnceLock<crate::browser::BrowserRefusal>>,
}

impl<T> FirstBytesGuard<T> {
    pub(super) fn new(
        inner: T,
        policy: BrowserPolicy,
        refusal: Arc<std::sync::OnceLock<crate::browser::BrowserRefusal>>,
    ) -> Self {
        Self {
            inner,
            policy: Some(policy),
            held: Vec::new(),
            released: 0,
            refusal,
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FirstBytesGuard<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use crate::browser::{FirstBytes, MAX_SNIFF};
        use std::task::Poll;
        let this = &mut *self;
        while let Some(policy) = &this.policy {
            let mut chunk = [0u8; 2048];
            let mut rb = tokio::io::ReadBuf::new(&mut chunk);
            std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let eof = rb.filled().is_empty();
            this.held.extend_from_slice(rb.filled());
            match policy.check_first_bytes(&this.held[..this.held.len().min(MAX_SNIFF)]) {
                Ok(FirstBytes::NeedMore) if !eof => continue,
                Ok(_) => this.policy = None,
                Err(r) => {
                    let _ = this.refusal.set(r);
                    this.policy = None;
                    this.held.clear();
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        "a browser's request to a TCP service was refused",
                    )));
                }
            }
        }
        if this.released < this.held.len() {
            let n = (this.held.len() - this.released).min(buf.remaining());
            buf.put_slice(&this.held[this.released..this.released + n]);
            this.released += n;
            if this.released == this.held.len() {
                this.held = Vec::new();
                this.released = 0;
            }
            return Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FirstBytesGuard<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

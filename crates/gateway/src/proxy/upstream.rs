//! Upstreams: joining a request's path under the service's base path, and the idle HTTP/1
//! connections to plain-HTTP upstreams that streams take and give back.

use super::*;

/// The request's path and query under the upstream's base path `prefix` (without its trailing
/// `/`); with no prefix the request's own is reused as it is. Under a base path, a path that
/// could step out of it once the upstream normalises it (`..` or `.` segments, also
/// percent-encoded, or an encoded `/` or `\\`) is refused.
pub(super) fn upstream_path(prefix: &str, req: &Uri) -> Result<PathAndQuery, String> {
    if !prefix.is_empty() && escapes_base(req.path()) {
        return Err(format!(
            "the request path {} has dot segments or encoded slashes, which could \
             leave the service's base path {prefix}",
            crate::browser::untrusted(req.path())
        ));
    }
    match (prefix, req.path_and_query()) {
        ("", Some(pq)) if pq.as_str().starts_with('/') => Ok(pq.clone()),
        (_, pq) => format!("{prefix}{}", pq.map_or("/", |p| p.as_str()))
            .parse()
            .map_err(|e| format!("bad request path: {e}")),
    }
}

/// Whether `path` could name something outside the base path once an upstream normalises it:
/// a `.` or `..` segment, also percent-encoded (once or more) or with `;parameters` (which
/// some servers strip: `/..;/admin`), or an encoded `/` or `\\`.
pub(super) fn escapes_base(path: &str) -> bool {
    let mut decoded = path.to_owned();
    // Decode until nothing changes, so `%252e%252e` is seen as `..` too; an encoded `/` or
    // `\\` at any level is refused.
    for _ in 0..4 {
        let lower = decoded.to_ascii_lowercase();
        if lower.contains("%2f") || lower.contains("%5c") {
            return true;
        }
        let next = percent_encoding::percent_decode_str(&decoded)
            .decode_utf8_lossy()
            .into_owned();
        if next == decoded {
            break;
        }
        decoded = next;
    }
    decoded.contains('\\')
        || decoded.split('/').any(|seg| {
            let seg = seg.split(';').next().unwrap_or_default();
            seg == "." || seg == ".."
        })
}

/// The upstream base URL with `path` in place of its own.
pub(super) fn absolute(base: &Uri, path: PathAndQuery) -> Result<Uri, String> {
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(path);
    Uri::from_parts(parts).map_err(|e| format!("cannot build upstream URL: {e}"))
}

/// Joins the upstream base URL (whose path without the trailing `/` is `prefix`) and the
/// request's path and query.
#[cfg(test)]
fn upstream_uri(base: &Uri, prefix: &str, req: &Uri) -> Result<Uri, String> {
    absolute(base, upstream_path(prefix, req)?)
}

/// How long the gateway waits for a TCP connection to an upstream (HTTP or TCP service).
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stream's upstream connection may take to finish its last response before it
/// is given back to the idle set (else it is dropped).
const HAND_BACK_WAIT: Duration = Duration::from_secs(5);

/// A new HTTP/1 connection to a plain-HTTP upstream, driven by a task of its own.
pub(super) async fn connect_http1(addr: &str, metrics: &Metrics) -> Result<Http1Sender, String> {
    let tcp = tokio::time::timeout(
        UPSTREAM_CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| {
        format!(
            "no connection to {addr} within {}",
            humantime::format_duration(UPSTREAM_CONNECT_TIMEOUT)
        )
    })?
    .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Metrics::inc(&metrics.upstream_connections_total);
    Ok(sender)
}

/// Idle HTTP/1 connections to plain-HTTP upstreams, for the next stream to the same upstream.
/// Kept per thread as well as per upstream: a connection's task runs where it was made, and a
/// stream on the same thread (shard) then uses it without crossing threads.
#[derive(Default)]
pub(super) struct IdleConns {
    conns: std::sync::Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    conns: IdleMap,
    /// Upstreams (and threads) with a spare connection being opened.
    refilling: std::collections::HashSet<IdleKey>,
}

/// Idle connections (newest last, with the time each became idle) by upstream and thread.
type IdleMap = std::collections::HashMap<IdleKey, Vec<(Instant, Http1Sender)>>;

/// An upstream's `host:port` and the thread whose connections these are.
type IdleKey = (String, std::thread::ThreadId);

impl IdleConns {
    /// How long a connection may wait unused (upstreams close idle ones themselves, often
    /// after a minute or more; one closed meanwhile is replaced on first use).
    const IDLE_FOR: Duration = Duration::from_secs(30);
    /// Idle connections kept per upstream and thread.
    const MAX: usize = 64;

    /// The set for `addr` on this thread. Taken by the caller, so that work it hands to
    /// another task (a spare, a connection not yet ready) lands in the same set even on a
    /// runtime whose tasks move between threads.
    pub(super) fn key(addr: &str) -> IdleKey {
        (addr.to_owned(), std::thread::current().id())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection, and whether a spare should be opened (none is left, and none is
    /// being opened).
    pub(super) fn take(&self, key: &IdleKey) -> (Option<Http1Sender>, bool) {
        let mut idle = self.lock();
        let list = idle.conns.entry(key.clone()).or_default();
        let mut found = None;
        while let Some((since, c)) = list.pop() {
            if since.elapsed() < Self::IDLE_FOR && !c.is_closed() {
                found = Some(c);
                break;
            }
        }
        let refill = list.is_empty() && idle.refilling.insert(key.clone());
        (found, refill)
    }

    /// The spare connection for `key` is open (or failed).
    pub(super) fn refilled(&self, key: &IdleKey) {
        self.lock().refilling.remove(key);
    }

    /// Puts `conn` back once it can take a request: at once if its task has already seen the
    /// end of its last response, else when it has (a stream that ended on an unfinished
    /// response leaves a connection that closes instead).
    pub(super) fn put_when_ready(self: &Arc<Self>, key: IdleKey, mut conn: Http1Sender) {
        if conn.is_ready() || conn.is_closed() {
            return self.put(key, conn);
        }
        let idle = self.clone();
        tokio::spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(HAND_BACK_WAIT, conn.ready()).await {
                idle.put(key, conn);
            }
        });
    }

    pub(super) fn put(&self, key: IdleKey, conn: Http1Sender) {
        if conn.is_closed() {
            return;
        }
        let mut idle = self.lock();
        let list = idle.conns.entry(key).or_default();
        list.retain(|(since, c)| since.elapsed() < Self::IDLE_FOR && !c.is_closed());
        if list.len() < Self::MAX {
            list.push((Instant::now(), conn));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_path_prefix_is_kept() {
        let join = |base: &str, req: &str| {
            let base: Uri = base.parse().expect("uri");
            let prefix = base.path().trim_end_matches('/').to_owned();
            upstream_uri(&base, &prefix, &req.parse().expect("uri"))
                .expect("joined")
                .to_string()
        };
        assert_eq!(
            join("https://svc.a.run.app/base/", "/v1/items?x=1"),
            "https://svc.a.run.app/base/v1/items?x=1"
        );
        assert_eq!(join("http://127.0.0.1:8080", "/"), "http://127.0.0.1:8080/");
        assert_eq!(
            join("http://127.0.0.1:8080/", "/a/b?c=%20d"),
            "http://127.0.0.1:8080/a/b?c=%20d"
        );
        // An absolute-form request target keeps only its path and query.
        assert_eq!(
            join("http://127.0.0.1:8080/base", "http://other.example/x?y"),
            "http://127.0.0.1:8080/base/x?y"
        );
        assert_eq!(
            join("http://127.0.0.1:8080", "http://other.example/x?y"),
            "http://127.0.0.1:8080/x?y"
        );
    }

    #[test]
    fn a_request_path_cannot_step_out_of_the_base_path() {
        for bad in [
            "/../admin",
            "/a/../../admin",
            "/%2e%2e/admin",
            "/%2E./admin",
            "/.%2e/admin",
            "/a%2f..%2fadmin",
            "/a%5c..",
            "/./x",
            "/..;/admin",
            "/.;/x",
            "/%2e%2e;/admin",
            "/%252e%252e/admin",
            "/a%252f..",
        ] {
            let req: Uri = bad.parse().expect("uri");
            assert!(upstream_path("/base", &req).is_err(), "{bad}");
            // Without a base path there is nothing to leave: passed as it is.
            assert!(upstream_path("", &req).is_ok(), "{bad}");
        }
        for good in ["/v1/items", "/a..b/c", "/.well-known/x", "/%2e%2efoo"] {
            let req: Uri = good.parse().expect("uri");
            assert!(upstream_path("/base", &req).is_ok(), "{good}");
        }
    }
}

//! The by-name port (`router_port`): every HTTP service the user may use at
//! `http://NAME.localhost:PORT/`, beside the per-service ports. Browsers and curl resolve
//! `*.localhost` to loopback themselves (RFC 6761), so nothing needs configuring, and each
//! service gets an origin of its own (its cookies and storage stay apart).
//!
//! The agent reads a connection's first request head only to find the service from `Host`,
//! then carries the connection like a service port's, head first. The stream tells the gateway
//! the name the connection was opened for, and the gateway refuses a later request on it that
//! names another (see `LocalAccess::name_host`). A name that is no HTTP service gets a short
//! page listing those that are.

use super::*;
use crate::config::LocalService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use touchgate_common::host::{is_loopback_name, split_host_port};
use touchgate_proto::{LocalAccess, ServiceKind};

use super::local::{Local, handle_local};

/// Largest request head the by-name port reads to find the service.
const MAX_HEAD: usize = 16 * 1024;

/// What the by-name port knows to route a connection.
pub(super) struct Router {
    /// The port it listens on.
    pub(super) port: u16,
    /// The services the gateway offers, with their kinds (from the live session).
    pub(super) session: Arc<Mutex<Option<SessionInfo>>>,
    /// The configured services (their browser settings, and names before the first session).
    pub(super) services: Vec<LocalService>,
    /// Each configured service's bound port, for the list.
    pub(super) ports: Vec<(String, u16)>,
    pub(super) check_owner: bool,
}

/// Where a connection goes.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// To this service.
    Service(String),
    /// An answer from the agent itself: status and the reason, then the list is shown.
    Answer(u16, String),
}

impl Router {
    /// The HTTP services by name, and the TCP ones, as the gateway last said (before the first
    /// session: the configured names, all taken as HTTP).
    fn offered(&self) -> (Vec<String>, Vec<String>) {
        let session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        match session.as_ref() {
            Some(s) => {
                let (web, tcp): (Vec<_>, Vec<_>) =
                    s.services.iter().partition(|s| s.kind == ServiceKind::Http);
                let names = |v: Vec<&touchgate_proto::ServiceInfo>| {
                    v.into_iter().map(|s| s.name.clone()).collect()
                };
                (names(web), names(tcp))
            }
            None => (
                self.services.iter().map(|s| s.name.clone()).collect(),
                Vec::new(),
            ),
        }
    }

    /// Decides where a request with `host` goes.
    fn route(&self, host: Option<&str>) -> Route {
        let Some(host) = host else {
            return Route::Answer(400, "the request names no host".into());
        };
        let (name, _) = split_host_port(host);
        if !is_loopback_name(&name) {
            // DNS rebinding: a page of another site whose name now points here. It gets
            // neither a service nor the list.
            return Route::Answer(403, format!("{name} is not a name of this computer"));
        }
        let Some(wanted) = name.strip_suffix(".localhost") else {
            return Route::Answer(200, String::new());
        };
        let (web, tcp) = self.offered();
        if let Some(s) = web.iter().find(|s| s.eq_ignore_ascii_case(wanted)) {
            return Route::Service(s.clone());
        }
        if tcp.iter().any(|s| s.eq_ignore_ascii_case(wanted)) {
            return Route::Answer(
                404,
                format!("{wanted} is a TCP service: it has its own port, shown below"),
            );
        }
        Route::Answer(404, format!("there is no web service named {wanted}"))
    }

    /// The stream's first frame for `service` reached as `service.localhost`.
    fn open(&self, service: &str) -> Local {
        let configured = self.services.iter().find(|s| s.name == service);
        let access = LocalAccess {
            port: self.port,
            allowed_hosts: Vec::new(),
            allowed_origins: configured
                .map(|s| s.allowed_origins.clone())
                .unwrap_or_default(),
            name_host: Some(format!("{}.localhost", service.to_ascii_lowercase())),
        };
        Local {
            open: encode(&StreamOpen {
                service: service.to_owned(),
                local: Some(access),
            })
            .into(),
            service: service.to_owned(),
            check_owner: self.check_owner,
        }
    }

    /// The agent's own answer: `why` and the services there are, as HTML for a browser and
    /// as text for anything else.
    fn answer(&self, status: u16, why: &str, html: bool, head_only: bool) -> Vec<u8> {
        let (web, tcp) = if status == 403 {
            (Vec::new(), Vec::new())
        } else {
            self.offered()
        };
        let port = self.port;
        let tcp: Vec<String> = tcp
            .iter()
            .map(|name| match self.ports.iter().find(|(n, _)| n == name) {
                Some((_, p)) => format!("{name}: 127.0.0.1:{p}"),
                None => format!("{name}: no local port configured"),
            })
            .collect();
        let body = if html {
            let mut b = String::from(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>touchgate</title></head><body><h1>touchgate</h1>",
            );
            if !why.is_empty() {
                b += &format!("<p>{}.</p>", escape(why));
            }
            if !web.is_empty() {
                b += "<p>Your services, by name:</p><ul>";
                for s in &web {
                    let url = escape(&format!(
                        "http://{}.localhost:{port}/",
                        s.to_ascii_lowercase()
                    ));
                    b += &format!("<li><a href=\"{url}\">{}</a> — {url}</li>", escape(s));
                }
                b += "</ul>";
            }
            if !tcp.is_empty() {
                b += "<p>TCP services, each on its own port:</p><ul>";
                for t in &tcp {
                    b += &format!("<li>{}</li>", escape(t));
                }
                b += "</ul>";
            }
            b + "</body></html>\n"
        } else {
            let mut b = String::from("touchgate");
            if !why.is_empty() {
                b += &format!(": {why}");
            }
            b += "\n";
            for s in &web {
                b += &format!("{s}: http://{}.localhost:{port}/\n", s.to_ascii_lowercase());
            }
            for t in &tcp {
                b += &format!("{t} (TCP)\n");
            }
            b
        };
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            403 => "Forbidden",
            _ => "Not Found",
        };
        let kind = if html { "text/html" } else { "text/plain" };
        let mut out = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: {kind}; charset=utf-8\r\ncontent-length: {}\r\n\
             cache-control: no-store\r\nx-content-type-options: nosniff\r\n\
             content-security-policy: default-src 'none'\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        if !head_only {
            out.extend_from_slice(body.as_bytes());
        }
        out
    }
}

/// Serves the by-name port.
pub(super) async fn serve_router(
    listener: TcpListener,
    router: Arc<Router>,
    conn: watch::Receiver<Option<quinn::Connection>>,
) {
    let check_owner = router.check_owner;
    super::local::accept_loop(listener, "router", check_owner, move |tcp| {
        let (router, conn) = (router.clone(), conn.clone());
        async move { route_connection(tcp, &router, conn).await }
    })
    .await
}

/// A request head read off a connection to the by-name port.
struct Head {
    /// Every byte read so far (the head, and maybe the start of a body).
    bytes: Vec<u8>,
    host: Option<String>,
    html: bool,
    head_only: bool,
}

async fn route_connection(
    mut tcp: tokio::net::TcpStream,
    router: &Router,
    conn: watch::Receiver<Option<quinn::Connection>>,
) {
    let head = match tokio::time::timeout(LOCAL_WAIT, read_head(&mut tcp)).await {
        Ok(Ok(h)) => h,
        Ok(Err(why)) => {
            let text = format!(
                "touchgate: {why}. This port serves HTTP/1.1 by service name (http://NAME.localhost:{}/); \
                 for HTTP/2 without TLS (gRPC) use the service's own port\n",
                router.port
            );
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
            let _ = tcp.write_all(answer.as_bytes()).await;
            let _ = tcp.shutdown().await;
            return;
        }
        // A connection that sends nothing: nothing to answer.
        Err(_) => return,
    };
    match router.route(head.host.as_deref()) {
        Route::Service(service) => {
            let local = router.open(&service);
            handle_local(tcp, &local, &head.bytes, conn)
                .instrument(tracing::debug_span!("by name", %service))
                .await;
        }
        Route::Answer(status, why) => {
            tracing::debug!(status, %why, "by-name port answered itself");
            let _ = tcp
                .write_all(&router.answer(status, &why, head.html, head.head_only))
                .await;
            let _ = tcp.shutdown().await;
        }
    }
}

/// Reads until a whole HTTP/1 request head is in; the error says what was wrong.
async fn read_head(tcp: &mut tokio::net::TcpStream) -> Result<Head, String> {
    let mut bytes = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the connection closed before a whole request head".into());
        }
        bytes.extend_from_slice(&chunk[..n]);
        let mut hs = [httparse::EMPTY_HEADER; 100];
        let mut req = httparse::Request::new(&mut hs);
        match req.parse(&bytes) {
            Ok(httparse::Status::Complete(_)) => {
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).into_owned())
                };
                let host = header("host");
                let html = header("accept").is_some_and(|a| a.contains("text/html"));
                let head_only = req.method == Some("HEAD");
                return Ok(Head {
                    bytes,
                    host,
                    html,
                    head_only,
                });
            }
            Ok(httparse::Status::Partial) if bytes.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(format!("a request head of more than {MAX_HEAD} bytes"));
            }
            Err(e) => return Err(format!("not an HTTP/1 request ({e})")),
        }
    }
}

/// Text made safe inside HTML.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use touchgate_proto::ServiceInfo;

    fn router(session: Option<Vec<(&str, ServiceKind)>>) -> Router {
        let info = session.map(|s| SessionInfo {
            token: String::new(),
            user: "alice".into(),
            expires_at: 0,
            services: s
                .into_iter()
                .map(|(name, kind)| ServiceInfo {
                    name: name.into(),
                    kind,
                })
                .collect(),
        });
        Router {
            port: 8080,
            session: Arc::new(Mutex::new(info)),
            services: vec![LocalService {
                name: "api".into(),
                local_port: 8081,
                allowed_hosts: vec!["api.dev.test".into()],
                allowed_origins: vec!["http://localhost:3000".into()],
            }],
            ports: vec![("db".into(), 5432)],
            check_owner: false,
        }
    }

    #[test]
    fn names_pick_web_services_and_everything_else_gets_the_list() {
        let r = router(Some(vec![
            ("api", ServiceKind::Http),
            ("Web", ServiceKind::Http),
            ("db", ServiceKind::Tcp),
        ]));
        assert_eq!(
            r.route(Some("api.localhost:8080")),
            Route::Service("api".into())
        );
        assert_eq!(
            r.route(Some("WEB.localhost.")),
            Route::Service("Web".into())
        );
        assert_eq!(
            r.route(Some("localhost:8080")),
            Route::Answer(200, String::new())
        );
        assert_eq!(
            r.route(Some("127.0.0.1:8080")),
            Route::Answer(200, String::new())
        );
        assert!(
            matches!(r.route(Some("db.localhost:8080")), Route::Answer(404, w) if w.contains("TCP"))
        );
        assert!(matches!(
            r.route(Some("nope.localhost:8080")),
            Route::Answer(404, _)
        ));
        assert!(matches!(
            r.route(Some("evil.example:8080")),
            Route::Answer(403, _)
        ));
        assert!(matches!(r.route(None), Route::Answer(400, _)));
        // Before the first session the configured names are all there is.
        assert_eq!(
            router(None).route(Some("api.localhost")),
            Route::Service("api".into())
        );
    }

    #[test]
    fn the_stream_names_the_host_and_keeps_the_services_origins() {
        let r = router(None);
        let local = r.open("api");
        let open: StreamOpen = touchgate_proto::decode(&local.open[4..]).expect("frame");
        let access = open.local.expect("local");
        assert_eq!(access.port, 8080);
        assert_eq!(access.name_host.as_deref(), Some("api.localhost"));
        assert_eq!(access.allowed_origins, ["http://localhost:3000"]);
        // Another name on the by-name port is not a host this service may be reached by.
        assert!(access.allowed_hosts.is_empty());
    }

    #[test]
    fn the_list_escapes_what_the_caller_sent() {
        let r = router(Some(vec![
            ("api", ServiceKind::Http),
            ("db", ServiceKind::Tcp),
        ]));
        let page =
            String::from_utf8(r.answer(404, "there is no web service named <script>", true, false))
                .expect("utf-8");
        assert!(page.starts_with("HTTP/1.1 404 Not Found\r\n"), "{page}");
        assert!(
            page.contains("&lt;script&gt;") && !page.contains("<script>"),
            "{page}"
        );
        assert!(
            page.contains("href=\"http://api.localhost:8080/\""),
            "{page}"
        );
        assert!(page.contains("db: 127.0.0.1:5432"), "{page}");
        let text = String::from_utf8(r.answer(200, "", false, false)).expect("utf-8");
        assert!(
            text.ends_with(
                "touchgate\napi: http://api.localhost:8080/\ndb: 127.0.0.1:5432 (TCP)\n"
            ),
            "{text}"
        );
        let refused = String::from_utf8(r.answer(403, "x", false, false)).expect("utf-8");
        assert!(
            !refused.contains("api"),
            "a rebinding page must not learn the services: {refused}"
        );
        let head = String::from_utf8(r.answer(200, "", true, true)).expect("utf-8");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
    }
}

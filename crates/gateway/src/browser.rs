//! Keeps web pages off the agent's localhost ports.
//!
//! A page the developer visits can make the browser send requests to `127.0.0.1:PORT` (a
//! no-cors `fetch`, a form, a WebSocket, which CORS does not gate) or, by DNS rebinding, read
//! the answers as same-origin. Every such request carries a mark a tool does not send: a
//! non-loopback `Host`, an `Origin` of another site, or `Sec-Fetch-Site`. The gateway parses
//! the HTTP the agent carries, so it refuses those here, before anything reaches the upstream,
//! against the policy the agent sent for its port ([`LocalAccess`]). Pure decisions: no IO.

use http::HeaderMap;
use touchgate_common::host::{is_loopback_name, split_host_port};
use touchgate_proto::LocalAccess;

/// The browser access allowed on one local port.
#[derive(Debug, Clone, Default)]
pub struct BrowserPolicy {
    /// The agent's local port; `None` (an older agent) takes it from `Host`.
    port: Option<u16>,
    /// Extra host names, lower case.
    hosts: Vec<String>,
    /// Extra origins, normalised (`scheme://host:port`).
    origins: Vec<String>,
    /// The by-name port's `NAME.localhost`, lower case: the only `Host` accepted, and the
    /// host of the port's own origin.
    named: Option<String>,
}

/// Why a request was refused: what was wrong, and the agent setting that would allow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrowserRefusal {
    /// What the request carried (host or origin text, truncated and escaped).
    pub what: String,
    /// The agent setting that would allow it, if any can.
    pub setting: Option<&'static str>,
}

impl BrowserRefusal {
    /// The text the caller gets with the 403.
    pub fn message(&self, service: &str) -> String {
        match self.setting {
            Some(setting) => format!(
                "touchgate: refused a browser request to service {service}: {}. If you trust it, \
                 add it to `{setting}` of service {service} in your agent config",
                self.what
            ),
            None => format!(
                "touchgate: refused a browser request to service {service}: {}",
                self.what
            ),
        }
    }
}

impl BrowserPolicy {
    /// The policy an agent sent (or the defaults, for an agent that sent none).
    pub fn new(local: Option<&LocalAccess>) -> Self {
        let Some(l) = local else {
            return Self::default();
        };
        Self {
            port: Some(l.port),
            hosts: l
                .allowed_hosts
                .iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            origins: l
                .allowed_origins
                .iter()
                .filter_map(|o| normalise_origin(o))
                .collect(),
            named: l
                .name_host
                .as_ref()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase()),
        }
    }

    /// Checks one HTTP request head: its `Host` (or h2 `:authority`, passed as `host`),
    /// `Origin` and `Sec-Fetch-Site`.
    pub fn check(&self, host: Option<&str>, headers: &HeaderMap) -> Result<(), BrowserRefusal> {
        if let Some(named) = &self.named {
            // One connection to the by-name port carries one service: a request naming
            // another (or none) would reach this service under the wrong name.
            if host.is_none_or(|h| split_host_port(h).0 != *named) {
                return Err(BrowserRefusal {
                    what: format!(
                        "Host {} on a connection opened for {named} (open a new connection for another name)",
                        untrusted(host.unwrap_or_default())
                    ),
                    setting: None,
                });
            }
        } else if let Some(h) = host {
            let (name, _) = split_host_port(h);
            if !is_loopback_name(&name) && !self.hosts.contains(&name) {
                return Err(BrowserRefusal {
                    what: format!("Host {} is not a loopback name", untrusted(h)),
                    setting: Some("allowed_hosts"),
                });
            }
        }
        // An Origin the port accepts (its own or a listed one) decides; `Sec-Fetch-Site`
        // matters only without one (a no-cors GET: an image, a followed link). Note that
        // `localhost` and `127.0.0.1` are different sites to a browser.
        let mut origin_ok = false;
        let origins: Vec<_> = headers.get_all(http::header::ORIGIN).iter().collect();
        if origins.len() > 1 {
            return Err(BrowserRefusal {
                what: "more than one Origin header".into(),
                setting: None,
            });
        }
        if let Some(v) = origins.first() {
            let text = String::from_utf8_lossy(v.as_bytes());
            if text.trim() == "null" {
                return Err(BrowserRefusal {
                    what: "Origin null (a sandboxed frame, a file or a redirected request) cannot be allowed".into(),
                    setting: None,
                });
            }
            origin_ok = self.is_own_origin(&text, host)
                || normalise_origin(&text).is_some_and(|o| self.origins.contains(&o));
            if !origin_ok {
                return Err(BrowserRefusal {
                    what: format!("Origin {} is another site", untrusted(&text)),
                    setting: Some("allowed_origins"),
                });
            }
        }
        let site = headers
            .get("sec-fetch-site")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase());
        match site.as_deref() {
            Some("cross-site" | "same-site") if !origin_ok => Err(BrowserRefusal {
                what: format!(
                    "the browser marked it Sec-Fetch-Site: {} with no Origin",
                    untrusted(site.as_deref().unwrap_or_default()),
                ),
                setting: Some("allowed_origins"),
            }),
            _ => Ok(()),
        }
    }
}

impl BrowserPolicy {
    /// Whether `origin` is the port's own (a page the service itself served through the
    /// port), with the port taken from `host` when the agent did not say it.
    pub fn is_own_origin(&self, origin: &str, host: Option<&str>) -> bool {
        let own_port = self
            .port
            .or_else(|| host.and_then(|h| split_host_port(h).1))
            .unwrap_or(80);
        parse_origin(origin).is_some_and(|(scheme, name, port)| {
            let own_name = match &self.named {
                // `127.0.0.1:PORT` on the by-name port is the agent's list, not this service.
                Some(named) => name == *named,
                None => is_own_host(&name),
            };
            scheme == "http" && own_name && port == own_port
        })
    }

    /// The origin the caller reached the service on: `http://` and the request's `Host`
    /// (already checked), else the port's own on 127.0.0.1.
    pub fn local_origin(&self, host: Option<&str>) -> String {
        let port = self.port.unwrap_or(80);
        if let Some(named) = &self.named {
            return format!("http://{named}:{port}");
        }
        match host {
            // A `Host` without a port means 80; a tool that left it out still came in on the
            // port.
            Some(h) if !h.is_empty() && split_host_port(h).1.is_none() && port != 80 => {
                format!("http://{h}:{port}")
            }
            Some(h) if !h.is_empty() => format!("http://{h}"),
            _ => format!("http://127.0.0.1:{port}"),
        }
    }
}

/// What the first bytes of a TCP service's stream are.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstBytes {
    /// Not an HTTP request head: a protocol of its own, to pass through.
    NotHttp,
    /// The start of what may be an HTTP request head: read more.
    NeedMore,
    /// A whole HTTP request head that passes the policy.
    HttpAllowed,
}

/// Largest request head [`BrowserPolicy::check_first_bytes`] waits for.
pub const MAX_SNIFF: usize = 16 * 1024;

impl BrowserPolicy {
    /// Looks at the first bytes a client sent to a TCP service: a browser made to talk to a
    /// database or cache port (the cross-protocol attack on Redis and Memcached) sends an
    /// HTTP request head, which is checked like a request to an HTTP service.
    pub fn check_first_bytes(&self, buf: &[u8]) -> Result<FirstBytes, BrowserRefusal> {
        // Browsers send only the standard methods (any other needs a CORS preflight, which
        // is an OPTIONS): anything else is decided at once, so a protocol whose client sends
        // a short word and waits for the answer is never held.
        const METHODS: [&[u8]; 9] = [
            b"GET ",
            b"POST ",
            b"PUT ",
            b"DELETE ",
            b"HEAD ",
            b"OPTIONS ",
            b"PATCH ",
            b"CONNECT ",
            b"TRACE ",
        ];
        let n = buf.len();
        if !METHODS
            .iter()
            .any(|m| m[..n.min(m.len())] == buf[..n.min(m.len())])
        {
            return Ok(FirstBytes::NotHttp);
        }
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut hs);
        match req.parse(buf) {
            Ok(httparse::Status::Partial) if buf.len() >= MAX_SNIFF => Err(BrowserRefusal {
                what: format!("an HTTP request head of more than {MAX_SNIFF} bytes"),
                setting: None,
            }),
            Ok(httparse::Status::Partial) => Ok(FirstBytes::NeedMore),
            Ok(httparse::Status::Complete(_)) => {
                let mut headers = HeaderMap::new();
                let mut host = None;
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("host") {
                        host = Some(String::from_utf8_lossy(h.value).into_owned());
                    } else if let (Ok(n), Ok(v)) = (
                        http::HeaderName::from_bytes(h.name.as_bytes()),
                        http::HeaderValue::from_bytes(h.value),
                    ) {
                        headers.append(n, v);
                    }
                }
                self.check(host.as_deref(), &headers)
                    .map(|()| FirstBytes::HttpAllowed)
            }
            // Too many headers for a tool's request: a browser's attack looks like this too.
            Err(httparse::Error::TooManyHeaders) => Err(BrowserRefusal {
                what: "an HTTP request head with more than 64 headers".into(),
                setting: None,
            }),
            Err(_) => Ok(FirstBytes::NotHttp),
        }
    }
}

/// Whether a page at `http://NAME:PORT` is served by the agent's own port: only the addresses
/// the agent holds (127.0.0.1 and [::1], both bound by the agent) and `localhost`. Another
/// loopback address or a `*.localhost` name on the same port number could be another OS
/// user's server, whose pages must not count as the service's own.
fn is_own_host(name: &str) -> bool {
    matches!(name, "127.0.0.1" | "::1" | "localhost")
}

/// `scheme://host[:port]` → (scheme, host, port with the scheme's default); `None` for
/// anything else (a path, userinfo, an unknown scheme).
fn parse_origin(o: &str) -> Option<(String, String, u16)> {
    let (scheme, rest) = o.trim().split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    if rest.is_empty() || rest.contains(['/', '@', '?', '#']) {
        return None;
    }
    let (name, port) = split_host_port(rest);
    Some((scheme, name, port.unwrap_or(default)))
}

fn normalise_origin(o: &str) -> Option<String> {
    parse_origin(o).map(|(s, h, p)| {
        if h.contains(':') {
            format!("{s}://[{h}]:{p}")
        } else {
            format!("{s}://{h}:{p}")
        }
    })
}

/// An attacker-supplied string made safe to show and log: at most 100 characters, control
/// and non-ASCII characters escaped, quoted.
pub fn untrusted(s: &str) -> String {
    const MAX: usize = 100;
    let mut out = String::with_capacity(s.len().min(MAX) + 8);
    out.push('"');
    for (i, c) in s.chars().enumerate() {
        if i == MAX {
            out.push('…');
            break;
        }
        if (c.is_ascii_graphic() && c != '"' && c != '\\') || c == ' ' {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn policy(port: u16, hosts: &[&str], origins: &[&str]) -> BrowserPolicy {
        BrowserPolicy::new(Some(&LocalAccess {
            port,
            allowed_hosts: hosts.iter().map(|s| s.to_string()).collect(),
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            name_host: None,
        }))
    }

    fn named(port: u16, name: &str) -> BrowserPolicy {
        BrowserPolicy::new(Some(&LocalAccess {
            port,
            name_host: Some(name.into()),
            ..Default::default()
        }))
    }

    #[test]
    fn the_by_name_port_takes_only_its_own_name_and_origin() {
        let p = named(8080, "api.localhost");
        let none = HeaderMap::new();
        assert!(p.check(Some("api.localhost:8080"), &none).is_ok());
        assert!(p.check(Some("API.localhost."), &none).is_ok());
        for other in [
            "web.localhost:8080",
            "localhost:8080",
            "127.0.0.1:8080",
            "evil.example",
        ] {
            let e = p.check(Some(other), &none).expect_err("refused");
            assert!(
                e.what.contains("opened for api.localhost"),
                "{other}: {e:?}"
            );
        }
        assert!(p.check(None, &none).is_err());
        let own = headers(&[
            ("origin", "http://api.localhost:8080"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert!(p.check(Some("api.localhost:8080"), &own).is_ok());
        // Another service behind the same port is another site.
        let web = headers(&[("origin", "http://web.localhost:8080")]);
        assert!(p.check(Some("api.localhost:8080"), &web).is_err());
        let list = headers(&[("origin", "http://127.0.0.1:8080")]);
        assert!(p.check(Some("api.localhost:8080"), &list).is_err());
        assert_eq!(
            p.local_origin(Some("api.localhost:8080")),
            "http://api.localhost:8080"
        );
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn tools_without_origin_pass_on_every_loopback_host() {
        let p = policy(8081, &[], &[]);
        for host in [
            "127.0.0.1",
            "127.0.0.1:8081",
            "localhost",
            "LOCALHOST:8081",
            "[::1]:8081",
            "[::1]",
            "api.localhost:8081",
            "localhost.:8081",
            "127.1.2.3:8081",
        ] {
            assert_eq!(p.check(Some(host), &HeaderMap::new()), Ok(()), "{host}");
        }
        assert_eq!(p.check(None, &HeaderMap::new()), Ok(()));
    }

    #[test]
    fn a_rebound_host_name_is_refused_unless_allowed() {
        let p = policy(8081, &[], &[]);
        for host in [
            "evil.example:8081",
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.nip.io:8081",
            "[::2]:8081",
            "10.0.0.1",
            "[::1]evil.example",
            "[::1]evil.example:8081",
        ] {
            let r = p.check(Some(host), &HeaderMap::new()).expect_err(host);
            assert_eq!(r.setting, Some("allowed_hosts"), "{host}");
        }
        let p = policy(8081, &["API.dev.test"], &[]);
        assert_eq!(
            p.check(Some("api.dev.test:8081"), &HeaderMap::new()),
            Ok(())
        );
    }

    #[test]
    fn the_ports_own_origin_passes_and_other_sites_do_not() {
        let p = policy(8081, &[], &[]);
        for o in [
            "http://127.0.0.1:8081",
            "http://localhost:8081",
            "http://LOCALHOST:8081",
            "http://[::1]:8081",
        ] {
            let h = headers(&[("origin", o), ("sec-fetch-site", "same-origin")]);
            assert_eq!(p.check(Some("127.0.0.1:8081"), &h), Ok(()), "{o}");
        }
        for o in [
            "https://evil.example",
            "http://localhost:3000",
            "https://127.0.0.1:8081",
            "http://127.0.0.1",
            "null",
            "file://",
            "http://127.0.0.1:8081/path",
            // Another loopback address or a *.localhost name on the same port number may be
            // another user's server.
            "http://127.0.0.2:8081",
            "http://127.8.9.10:8081",
            "http://foo.localhost:8081",
        ] {
            let h = headers(&[("origin", o)]);
            assert!(p.check(Some("127.0.0.1:8081"), &h).is_err(), "{o}");
        }
    }

    #[test]
    fn null_origin_and_cross_site_fetches_are_refused() {
        let p = policy(8081, &[], &["http://localhost:3000"]);
        let r = p
            .check(Some("127.0.0.1:8081"), &headers(&[("origin", "null")]))
            .expect_err("null");
        assert_eq!(r.setting, None);
        // A no-cors GET (an image, a link followed from another site) sends no Origin.
        for site in ["cross-site", "same-site"] {
            let h = headers(&[("sec-fetch-site", site)]);
            assert!(p.check(Some("127.0.0.1:8081"), &h).is_err(), "{site}");
        }
        for site in ["none", "same-origin"] {
            let h = headers(&[("sec-fetch-site", site)]);
            assert_eq!(p.check(Some("127.0.0.1:8081"), &h), Ok(()), "{site}");
        }
    }

    #[test]
    fn an_allowed_origin_passes_even_when_marked_cross_site() {
        let p = policy(8081, &[], &["HTTP://LocalHost:3000/"]);
        // The trailing slash makes the listed value invalid, so it allows nothing…
        let h = headers(&[
            ("origin", "http://localhost:3000"),
            ("sec-fetch-site", "same-site"),
        ]);
        assert!(p.check(Some("127.0.0.1:8081"), &h).is_err());
        // …while a well-formed one does, in any case, with the default port implied.
        let p = policy(8081, &[], &["HTTP://LocalHost:3000", "https://app.corp"]);
        assert_eq!(p.check(Some("127.0.0.1:8081"), &h), Ok(()));
        let h = headers(&[
            ("origin", "https://app.corp:443"),
            ("sec-fetch-site", "cross-site"),
        ]);
        assert_eq!(p.check(Some("localhost:8081"), &h), Ok(()));
    }

    #[test]
    fn without_a_policy_the_port_comes_from_host() {
        let p = BrowserPolicy::new(None);
        let h = headers(&[("origin", "http://localhost:8081")]);
        assert_eq!(p.check(Some("127.0.0.1:8081"), &h), Ok(()));
        assert!(p.check(Some("127.0.0.1:9000"), &h).is_err());
    }

    #[test]
    fn two_origin_headers_are_refused() {
        let p = policy(8081, &[], &[]);
        let h = headers(&[
            ("origin", "http://127.0.0.1:8081"),
            ("origin", "https://evil.example"),
        ]);
        assert!(p.check(Some("127.0.0.1:8081"), &h).is_err());
    }

    #[test]
    fn a_browser_talking_http_to_a_tcp_port_is_refused_and_other_protocols_pass() {
        let p = policy(6379, &[], &[]);
        let attack = b"POST / HTTP/1.1\r\nHost: 127.0.0.1:6379\r\nOrigin: https://evil.example\r\nContent-Type: text/plain\r\n\r\nSET x y\r\n";
        assert!(p.check_first_bytes(attack).is_err());
        let rebound = b"GET / HTTP/1.1\r\nHost: evil.example:6379\r\n\r\n";
        assert!(p.check_first_bytes(rebound).is_err());
        assert_eq!(
            p.check_first_bytes(b"POST / HTTP/1.1\r\nHost: 127.0.0.1:6379\r\n"),
            Ok(FirstBytes::NeedMore)
        );
        assert_eq!(
            p.check_first_bytes(b"GET / HTTP/1.1\r\nHost: localhost:6379\r\n\r\n"),
            Ok(FirstBytes::HttpAllowed)
        );
        // Redis inline and RESP commands, the PostgreSQL startup message, SSH's banner.
        for other in [
            &b"PING\r\n"[..],
            b"ping",
            b"GETX",
            b"SET key value\r\n",
            b"*1\r\n$4\r\nPING\r\n",
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
            b"SSH-2.0-OpenSSH_9.2\r\n",
        ] {
            assert_eq!(p.check_first_bytes(other), Ok(FirstBytes::NotHttp));
        }
        let huge = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; MAX_SNIFF]].concat();
        assert!(p.check_first_bytes(&huge).is_err());
    }

    #[test]
    fn refusal_text_names_the_setting_and_escapes_what_was_sent() {
        let p = policy(8081, &[], &[]);
        let r = p
            .check(Some("evil\r\nx: y.example"), &HeaderMap::new())
            .expect_err("refused");
        let m = r.message("api");
        assert!(m.contains("allowed_hosts"), "{m}");
        assert!(!m.contains('\r') && !m.contains('\n'), "{m}");
        let long = "a".repeat(5000);
        assert!(untrusted(&long).chars().count() < 110);
    }
}

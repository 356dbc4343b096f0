//! Making a tool's conversation with the service look as if it were direct: the request's
//! `Origin` and `Referer` name the upstream when they name the local port, forwarding headers a
//! caller sent are dropped, and in the answer, redirects to the upstream come back to the local
//! origin and cookies lose a `Domain` that would not match localhost.

use super::*;

/// What a stream knows about the upstream's own origins: its base URL's, and (for Cloud Run)
/// the ID-token audience's, e.g. the `*.run.app` URL behind a custom domain.
pub struct UpstreamOrigins {
    /// The base URL's origin, e.g. `https://api-xyz.a.run.app`.
    pub main: Option<String>,
    /// Every origin that is the upstream's, normalised (`scheme://host:port`).
    all: Vec<String>,
    /// The upstream's host names, lower case.
    hosts: Vec<String>,
}

impl UpstreamOrigins {
    /// The origins of `upstream` and `audience` (either may be no URL at all).
    pub fn new(upstream: &str, audience: &str) -> Self {
        let urls: Vec<url::Url> = [upstream, audience]
            .iter()
            .filter_map(|u| url::Url::parse(u).ok())
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .collect();
        let main = urls.first().map(|u| u.origin().ascii_serialization());
        let mut all = Vec::new();
        let mut hosts = Vec::new();
        for u in &urls {
            all.push(normalised(u));
            if let Some(h) = u.host_str() {
                hosts.push(h.to_ascii_lowercase());
            }
        }
        Self { main, all, hosts }
    }

    fn owns(&self, u: &url::Url) -> bool {
        self.all.contains(&normalised(u))
    }
}

fn normalised(u: &url::Url) -> String {
    format!(
        "{}://{}:{}",
        u.scheme(),
        u.host_str().unwrap_or_default().to_ascii_lowercase(),
        u.port_or_known_default().unwrap_or(0)
    )
}

/// Removes the forwarding headers a caller sent (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`):
/// an upstream that logs or rate-limits by them would believe whatever a caller wrote. The
/// gateway adds none of its own: the user is in `X-Touchgate-User`, and the only address it
/// could give is the gateway's view of the agent, not the user's.
pub(super) fn remove_forwarding_headers(h: &mut HeaderMap) {
    let names: Vec<HeaderName> = h
        .keys()
        .filter(|k| {
            let k = k.as_str();
            k == "forwarded" || k == "x-real-ip" || k.starts_with("x-forwarded-")
        })
        .cloned()
        .collect();
    for n in names {
        h.remove(n);
    }
}

/// Rewrites an `Origin` that is the local port's own (the service's page opened through the
/// tunnel) to the upstream's origin, and a `Referer` on it likewise, so an app that checks
/// `Origin` against its `Host` sees the same-origin request it is. Other origins reach this
/// point only when the user allowed them, and are left as they are.
pub(super) fn rewrite_request_origin(
    h: &mut HeaderMap,
    policy: &BrowserPolicy,
    host: Option<&str>,
    upstream: &UpstreamOrigins,
) {
    let Some(main) = &upstream.main else { return };
    if let Some(origin) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok())
        && policy.is_own_origin(origin, host)
        && let Ok(v) = HeaderValue::from_str(main)
    {
        h.insert(header::ORIGIN, v);
    }
    if let Some(referer) = h.get(header::REFERER).and_then(|v| v.to_str().ok())
        && let Ok(u) = url::Url::parse(referer)
        && policy.is_own_origin(&u.origin().ascii_serialization(), host)
    {
        let rest = &u[url::Position::BeforePath..];
        if let Ok(v) = HeaderValue::from_str(&format!("{main}{rest}")) {
            h.insert(header::REFERER, v);
        }
    }
}

/// Rewrites, in an upstream's answer, an absolute `Location` or `Content-Location` that points
/// at the upstream to the local origin the request came in on (so `curl -L` and browsers stay
/// in the tunnel), and drops a cookie's `Domain` that names the upstream (so the cookie is
/// kept for localhost). Other origins and domains are left alone.
pub(super) fn rewrite_response(h: &mut HeaderMap, upstream: &UpstreamOrigins, local: &str) {
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        if let Some(v) = h.get(&name).and_then(|v| v.to_str().ok())
            && let Ok(u) = url::Url::parse(v)
            && upstream.owns(&u)
            && let Ok(v) =
                HeaderValue::from_str(&format!("{local}{}", &u[url::Position::BeforePath..]))
        {
            h.insert(name, v);
        }
    }
    let cookies: Vec<HeaderValue> = h.get_all(header::SET_COOKIE).iter().cloned().collect();
    if cookies.is_empty() {
        return;
    }
    h.remove(header::SET_COOKIE);
    for c in cookies {
        let v = c
            .to_str()
            .ok()
            .map(|s| without_upstream_domain(s, &upstream.hosts))
            .and_then(|s| HeaderValue::from_str(&s).ok())
            .unwrap_or(c);
        h.append(header::SET_COOKIE, v);
    }
}

/// A `Set-Cookie` value without a `Domain` attribute naming one of `hosts` (a cookie value and
/// its attributes are separated by `;`, which a cookie value cannot contain).
fn without_upstream_domain(cookie: &str, hosts: &[String]) -> String {
    cookie
        .split(';')
        .filter(|part| {
            let Some((name, value)) = part.split_once('=') else {
                return true;
            };
            !(name.trim().eq_ignore_ascii_case("domain")
                && hosts.contains(&value.trim().trim_start_matches('.').to_ascii_lowercase()))
        })
        .collect::<Vec<_>>()
        .join(";")
}

#[cfg(test)]
mod tests {
    use super::*;
    use touchgate_proto::LocalAccess;

    fn policy() -> BrowserPolicy {
        BrowserPolicy::new(Some(&LocalAccess {
            port: 8081,
            ..Default::default()
        }))
    }

    fn cloud_run() -> UpstreamOrigins {
        UpstreamOrigins::new(
            "https://api.corp.example/base",
            "https://api-xyz-uc.a.run.app",
        )
    }

    #[test]
    fn forwarding_headers_from_the_caller_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil"));
        h.insert("forwarded", HeaderValue::from_static("for=1.2.3.4"));
        h.insert("x-real-ip", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-request-id", HeaderValue::from_static("keep"));
        remove_forwarding_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-request-id"));
    }

    #[test]
    fn the_local_origin_becomes_the_upstreams_and_other_origins_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://localhost:8081"),
        );
        h.insert(
            header::REFERER,
            HeaderValue::from_static("http://localhost:8081/app/page?x=1"),
        );
        rewrite_request_origin(&mut h, &policy(), Some("localhost:8081"), &cloud_run());
        assert_eq!(h[header::ORIGIN], "https://api.corp.example");
        assert_eq!(h[header::REFERER], "https://api.corp.example/app/page?x=1");
        let mut h = HeaderMap::new();
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://localhost:3000"),
        );
        rewrite_request_origin(&mut h, &policy(), Some("localhost:8081"), &cloud_run());
        assert_eq!(h[header::ORIGIN], "http://localhost:3000");
    }

    #[test]
    fn redirects_to_the_upstream_come_back_to_the_local_port() {
        let local = "http://127.0.0.1:8081";
        for (from, to) in [
            (
                "https://api.corp.example/dir/",
                "http://127.0.0.1:8081/dir/",
            ),
            (
                "https://api-xyz-uc.a.run.app/x?y=1#z",
                "http://127.0.0.1:8081/x?y=1#z",
            ),
            ("https://API.corp.example:443/", "http://127.0.0.1:8081/"),
            (
                "https://accounts.google.com/o/oauth2",
                "https://accounts.google.com/o/oauth2",
            ),
            ("http://api.corp.example/", "http://api.corp.example/"),
            ("/relative", "/relative"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                header::LOCATION,
                HeaderValue::from_str(from).expect("value"),
            );
            rewrite_response(&mut h, &cloud_run(), local);
            assert_eq!(h[header::LOCATION], to, "{from}");
        }
    }

    #[test]
    fn a_cookie_for_the_upstreams_domain_is_kept_for_localhost() {
        let mut h = HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("sid=abc; Path=/; Domain=.api.corp.example; HttpOnly"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("other=1; Domain=corp.example"),
        );
        rewrite_response(&mut h, &cloud_run(), "http://127.0.0.1:8081");
        let cookies: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(cookies[0], "sid=abc; Path=/; HttpOnly");
        assert_eq!(cookies[1], "other=1; Domain=corp.example");
    }
}

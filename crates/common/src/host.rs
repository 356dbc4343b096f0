//! Host names as `Host` headers carry them: splitting off the port, and telling loopback names
//! (which the agent's ports answer to) from others.

use std::net::IpAddr;

/// Whether `u` names this machine's loopback: an IPv4 or IPv6 loopback address, or exactly
/// `localhost` (not `*.localhost`, which a resolver may send elsewhere).
pub fn is_loopback_url(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// Whether a host name (without port, brackets removed) names this machine: a loopback IP
/// literal, `localhost`, or a name under `.localhost` (which browsers resolve to loopback
/// themselves, RFC 6761).
pub fn is_loopback_name(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    if let Ok(ip) = name.parse::<IpAddr>() {
        return ip.is_loopback();
    }
    name.eq_ignore_ascii_case("localhost")
        || name
            .get(name.len().saturating_sub(".localhost".len())..)
            .is_some_and(|t| t.eq_ignore_ascii_case(".localhost"))
}

/// Splits `host[:port]` / `[v6][:port]` into a lower-case name (brackets removed, trailing
/// dot dropped) and the port.
pub fn split_host_port(h: &str) -> (String, Option<u16>) {
    let h = h.trim();
    let (name, port) = if let Some(rest) = h.strip_prefix('[') {
        match rest.split_once(']') {
            Some((name, "")) => (name, None),
            Some((name, tail)) => match tail.strip_prefix(':') {
                Some(port) => (name, Some(port)),
                // `[::1]evil.example`: not a host; never a loopback one.
                None => (h, None),
            },
            None => (rest, None),
        }
    } else {
        match h.rsplit_once(':') {
            Some((name, port)) if !name.contains(':') => (name, Some(port)),
            _ => (h, None),
        }
    };
    (
        name.trim_end_matches('.').to_ascii_lowercase(),
        port.and_then(|p| p.parse().ok()),
    )
}

//! Header rules of the proxy: what a caller may not send (identity headers, hop-by-hop
//! headers, upgrades other than the service's, the same in trailers), and the browser check
//! of `Host` and the h2 `:authority`.

use super::*;

/// Checks a request's `Host` (and the h2 `:authority` or absolute-form target) and its
/// browser marks against the port's policy.
pub(super) fn check_browser<B>(
    policy: &BrowserPolicy,
    req: &Request<B>,
) -> Result<(), BrowserRefusal> {
    let hosts = req.headers().get_all(header::HOST);
    if hosts.iter().count() > 1 {
        return Err(BrowserRefusal {
            what: "more than one Host header".into(),
            setting: None,
        });
    }
    let host = hosts
        .iter()
        .next()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    policy.check(host.as_deref(), req.headers())?;
    match req.uri().authority() {
        Some(a) if host.as_deref() != Some(a.as_str()) => {
            policy.check(Some(a.as_str()), &HeaderMap::new())
        }
        _ => Ok(()),
    }
}

/// Whether a request is gRPC: its content type is `application/grpc` or `application/grpc+…`
/// (not gRPC-Web, which is HTTP/1-friendly).
pub(super) fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|v| {
            v == "application/grpc"
                || v.starts_with("application/grpc+")
                || v.starts_with("application/grpc;")
        })
}

/// Whether the caller said it accepts trailers (`TE: trailers`), which HTTP/2 upstreams such
/// as gRPC servers expect to see.
pub(super) fn wants_trailers(h: &HeaderMap) -> bool {
    h.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    })
}

/// Whether the request asks for a protocol upgrade the service allows (`websocket` unless it
/// lists others); any other `Upgrade` (`h2c` above all) is dropped and the request is served
/// as a plain one.
pub(super) fn wants_upgrade(h: &HeaderMap, allowed: &[String]) -> bool {
    let protocols_allowed = !h.get_all(header::UPGRADE).iter().any(|v| {
        v.to_str().map_or(true, |s| {
            s.split(',').any(|p| {
                let name = p.trim().split('/').next().unwrap_or_default();
                !allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
            })
        })
    });
    h.contains_key(header::UPGRADE)
        && protocols_allowed
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .map(|s| {
                    s.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
                })
                .unwrap_or(false)
        })
}

const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

pub(super) fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| {
            s.split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in listed {
        if !(keep_upgrade && n == header::UPGRADE) {
            h.remove(n);
        }
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::UPGRADE);
    }
}

/// Removes hop-by-hop headers and every header a caller must not set itself: the Cloud Run
/// token header and the gateway's identity headers. The caller's own `Authorization` stays.
pub(super) fn sanitise_request_headers(h: &mut HeaderMap, upgrade: bool) {
    strip_hop_by_hop(h, upgrade);
    remove_identity_headers(h);
}

/// A body frame with any trailers cleaned like headers: a caller must not smuggle identity
/// headers in them (h2 and chunked HTTP/1 carry trailers).
pub(super) fn clean_trailers(f: hyper::body::Frame<Bytes>) -> hyper::body::Frame<Bytes> {
    match f.into_trailers() {
        Ok(mut t) => {
            remove_identity_headers(&mut t);
            hyper::body::Frame::trailers(t)
        }
        Err(f) => f,
    }
}

/// Removes the Cloud Run token header and the gateway's own `x-touchgate-*` headers.
fn remove_identity_headers(h: &mut HeaderMap) {
    h.remove(SERVERLESS_AUTH);
    let own: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("x-touchgate-"))
        .cloned()
        .collect();
    for k in own {
        h.remove(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_cannot_set_identity_headers_but_keeps_authorization() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer mine"),
        );
        h.insert(SERVERLESS_AUTH, HeaderValue::from_static("Bearer forged"));
        h.insert(USER_HEADER, HeaderValue::from_static("root"));
        h.insert("x-touchgate-assertion", HeaderValue::from_static("forged"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        sanitise_request_headers(&mut h, false);
        assert_eq!(
            h.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
            Some(&b"Bearer mine"[..])
        );
        assert!(h.get(SERVERLESS_AUTH).is_none());
        assert!(h.get(USER_HEADER).is_none());
        assert!(h.get("x-touchgate-assertion").is_none());
        assert!(h.get("x-secret").is_none());
        assert!(h.get(header::CONNECTION).is_none());
    }

    #[test]
    fn grpc_requests_are_recognised_and_grpc_web_is_not() {
        let h = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            h
        };
        assert!(is_grpc(&h("application/grpc")));
        assert!(is_grpc(&h("application/grpc+proto")));
        assert!(!is_grpc(&h("application/grpc-web+proto")));
        assert!(!is_grpc(&h("application/json")));
        let mut te = HeaderMap::new();
        te.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        assert!(wants_trailers(&te));
        assert!(!wants_trailers(&HeaderMap::new()));
    }

    #[test]
    fn identity_headers_in_trailers_are_removed() {
        let mut t = HeaderMap::new();
        t.insert(USER_HEADER, HeaderValue::from_static("root@example.com"));
        t.insert(SERVERLESS_AUTH, HeaderValue::from_static("Bearer forged"));
        t.insert("x-touchgate-assertion", HeaderValue::from_static("forged"));
        t.insert("grpc-status", HeaderValue::from_static("0"));
        let cleaned = clean_trailers(hyper::body::Frame::trailers(t))
            .into_trailers()
            .expect("still trailers");
        assert_eq!(cleaned.len(), 1);
        assert_eq!(
            cleaned.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
        let data = clean_trailers(hyper::body::Frame::data(Bytes::from_static(b"x")));
        assert_eq!(data.into_data().ok(), Some(Bytes::from_static(b"x")));
    }

    #[test]
    fn h2c_and_unlisted_upgrades_are_not_relayed() {
        let ws = ["websocket".to_owned()];
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAAP__"),
        );
        assert!(!wants_upgrade(&h, &ws));
        sanitise_request_headers(&mut h, false);
        assert!(h.get(header::UPGRADE).is_none());
        assert!(h.get("http2-settings").is_none());
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket, h2c"));
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        assert!(!wants_upgrade(&h, &ws));
        h.insert(header::UPGRADE, HeaderValue::from_static("custom/2"));
        assert!(wants_upgrade(&h, &["custom".to_owned()]));
    }

    #[test]
    fn websocket_upgrade_is_detected() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(wants_upgrade(&h, &["websocket".to_owned()]));
        sanitise_request_headers(&mut h, true);
        assert_eq!(
            h.get(header::UPGRADE).map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(
            h.get(header::CONNECTION).map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
    }
}

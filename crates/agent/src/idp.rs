//! The browser half of enrolling through the organisation's identity provider (RFC 8252, OAuth
//! for native apps): PKCE, the authorization URL, and the loopback listener the browser comes
//! back to with the code. The agent never sees a token: it hands the code to the gateway over
//! the connection whose nonce the URL carries.

use std::{convert::Infallible, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::{net::TcpListener, sync::mpsc};

use crate::tunnel::TunnelError;

/// How long the browser has to come back.
pub const CALLBACK_WAIT: Duration = Duration::from_secs(300);

/// The page the browser ends on.
const DONE_PAGE: &str = "<!doctype html><html><head><meta charset=\"utf-8\"><title>touchgate</title></head>\
<body><h1>Signed in</h1><p>You can close this tab and go back to touchgate: it asks for a touch of your security key next.</p></body></html>\n";

/// PKCE (RFC 7636, S256) and the `state` of one sign-in.
pub struct Pkce {
    /// Sent to the gateway with the code.
    pub verifier: String,
    /// In the URL: SHA-256 of the verifier.
    pub challenge: String,
    /// In the URL, and checked on the way back.
    pub state: String,
}

impl Pkce {
    /// Fresh random values.
    pub fn new() -> Self {
        let verifier = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        Self {
            verifier,
            challenge,
            state: URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>()),
        }
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Self::new()
    }
}

/// The scopes a sign-in may ask for: who the user is and their groups, nothing that reaches
/// their other data (a hostile gateway could otherwise name another app's client and scopes
/// and get tokens for the user's cloud account through this browser step).
const SCOPES: [&str; 4] = ["openid", "email", "profile", "groups"];

/// Checks the sign-in page the gateway named before the browser is sent there: `https://`
/// (plain `http://` on this machine only), on the pinned provider's host when `idp_issuer` is
/// set, asking for no more than [`SCOPES`].
pub fn check_sign_in_page(
    endpoint: &str,
    scopes: &[String],
    pinned_issuer: Option<&str>,
) -> Result<(), TunnelError> {
    let refuse = |why: String| {
        Err(TunnelError::Idp(format!(
            "the gateway's sign-in page {why}: refused"
        )))
    };
    let Some(u) = web_page(endpoint) else {
        return refuse(format!("{endpoint:?} is not https://"));
    };
    if let Some(issuer) = pinned_issuer {
        let pinned = url::Url::parse(issuer)
            .ok()
            .and_then(|i| i.host_str().map(str::to_owned));
        if pinned.as_deref() != u.host_str() {
            return refuse(format!(
                "{endpoint} is not at the identity provider this agent is set up for ({issuer})"
            ));
        }
    }
    if let Some(extra) = scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
        return refuse(format!(
            "asks for the scope {extra:?}, which touchgate never needs"
        ));
    }
    Ok(())
}

/// `url` parsed, when it is a page the agent may show: `https://`, or `http://` on this
/// machine's loopback (a provider run beside the gateway, as in tests).
pub fn web_page(url: &str) -> Option<url::Url> {
    let u = url::Url::parse(url).ok()?;
    let loopback = touchgate_common::host::is_loopback_url(&u);
    (u.scheme() == "https" || (u.scheme() == "http" && loopback)).then_some(u)
}

/// The authorization URL (code flow with PKCE, the gateway's nonce).
pub fn authorization_url(
    endpoint: &str,
    client_id: &str,
    scopes: &[String],
    redirect_uri: &str,
    pkce: &Pkce,
    nonce: &str,
) -> Result<String, TunnelError> {
    let mut u = url::Url::parse(endpoint).map_err(|e| {
        TunnelError::Protocol(format!("the gateway named no usable sign-in page: {e}"))
    })?;
    if !matches!(u.scheme(), "https" | "http") {
        return Err(TunnelError::Protocol(format!(
            "the gateway named a sign-in page that is not a web page: {endpoint}"
        )));
    }
    u.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", client_id)
        .append_pair("redirect_uri", redirect_uri)
        .append_pair("scope", &scopes.join(" "))
        .append_pair("state", &pkce.state)
        .append_pair("nonce", nonce)
        .append_pair("code_challenge", &pkce.challenge)
        .append_pair("code_challenge_method", "S256");
    Ok(u.into())
}

/// A way to show the user a web page: the system browser, or a test's driver.
pub type Browser = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Opens `url` in the system browser.
pub fn system_browser(url: &str) -> Result<(), String> {
    open::that_detached(url).map_err(|e| format!("cannot open a browser ({e}): open {url}"))
}

/// What the browser brought back, ready for the gateway.
pub struct SignedIn {
    /// The authorization code.
    pub code: String,
    /// The PKCE verifier that goes with it.
    pub code_verifier: String,
    /// The redirect URI the code was issued for.
    pub redirect_uri: String,
}

/// The browser step: a loopback listener, PKCE, the URL shown in `browser`, and the code it
/// brings back.
pub async fn sign_in(
    name: &str,
    authorization_endpoint: &str,
    client_id: &str,
    scopes: &[String],
    nonce: &str,
    browser: &(dyn Fn(&str) -> Result<(), String> + Send + Sync),
) -> Result<SignedIn, TunnelError> {
    let callback = Callback::bind().await?;
    let pkce = Pkce::new();
    let url = authorization_url(
        authorization_endpoint,
        client_id,
        scopes,
        &callback.redirect_uri,
        &pkce,
        nonce,
    )?;
    tracing::info!(provider = %name, "signing in with {name} in the browser");
    browser(&url).map_err(TunnelError::Idp)?;
    let redirect_uri = callback.redirect_uri.clone();
    let code = callback.code(&pkce.state).await?;
    Ok(SignedIn {
        code,
        code_verifier: pkce.verifier,
        redirect_uri,
    })
}

/// What came back to the loopback listener with this sign-in's `state`.
type Arrival = Vec<(String, String)>;

/// The loopback listener the browser is sent back to: `http://127.0.0.1:PORT/callback`.
pub struct Callback {
    /// The redirect URI to put in the URL.
    pub redirect_uri: String,
    listener: TcpListener,
}

impl Callback {
    /// Listens on a free port of 127.0.0.1.
    pub async fn bind() -> Result<Self, TunnelError> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.map_err(|e| {
            TunnelError::Idp(format!("cannot listen on 127.0.0.1 for the browser: {e}"))
        })?;
        let port = listener
            .local_addr()
            .map_err(|e| TunnelError::Idp(e.to_string()))?
            .port();
        Ok(Self {
            redirect_uri: format!("http://127.0.0.1:{port}/callback"),
            listener,
        })
    }

    /// Waits for the browser's return and gives the code, once: the listener closes after
    /// the first request to `/callback` with this sign-in's `state`, so a second one finds
    /// nobody. A request with another `state` (a page that sent the browser here with a code
    /// of its own, or another local user) is answered 400 and changes nothing; the
    /// provider's error ends the sign-in.
    pub async fn code(self, state: &str) -> Result<String, TunnelError> {
        let (tx, mut rx) = mpsc::channel::<Arrival>(1);
        let state: Arc<str> = state.into();
        let accept = async {
            loop {
                let Ok((tcp, _)) = self.listener.accept().await else {
                    continue;
                };
                let (tx, state) = (tx.clone(), state.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (tx, state) = (tx.clone(), state.clone());
                        async move { Ok::<_, Infallible>(arrive(req, &state, &tx)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        };
        let pairs = tokio::select! {
            got = rx.recv() => got,
            () = accept => None,
            () = tokio::time::sleep(CALLBACK_WAIT) => {
                return Err(TunnelError::Idp(format!(
                    "the browser did not come back within {} minutes",
                    CALLBACK_WAIT.as_secs() / 60
                )));
            }
        };
        let pairs =
            pairs.ok_or_else(|| TunnelError::Idp("the browser did not come back".into()))?;
        let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        if let Some(e) = get("error") {
            let why = get("error_description").unwrap_or_default();
            return Err(TunnelError::Idp(format!("the provider said {e} {why}")));
        }
        get("code").ok_or_else(|| TunnelError::Idp("the provider sent no code".into()))
    }
}

/// Answers one request to the loopback listener and passes a callback on.
fn arrive(
    req: Request<Incoming>,
    state: &str,
    tx: &mpsc::Sender<Arrival>,
) -> Response<Full<Bytes>> {
    if req.uri().path() != "/callback" {
        return page(StatusCode::NOT_FOUND, "not here\n", "text/plain");
    }
    let pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    if !pairs.iter().any(|(k, v)| k == "state" && v == state) {
        // Only this sign-in's return goes on: a flood of others cannot crowd it out.
        tracing::warn!(
            "refused a request to the sign-in's loopback address with another sign-in's state (a web page trying to sign you in as someone else?)"
        );
        return page(
            StatusCode::BAD_REQUEST,
            "touchgate: this sign-in was not started here; nothing was done\n",
            "text/plain",
        );
    }
    if tx.try_send(pairs).is_ok() {
        page(StatusCode::OK, DONE_PAGE, "text/html; charset=utf-8")
    } else {
        page(
            StatusCode::CONFLICT,
            "touchgate: this sign-in has already come back\n",
            "text/plain",
        )
    }
}

fn page(status: StatusCode, body: &'static str, kind: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_carries_pkce_state_and_the_gateways_nonce() {
        let p = Pkce::new();
        assert_eq!(p.verifier.len(), 43);
        let url = authorization_url(
            "https://idp.example.com/auth?prompt=login",
            "touchgate",
            &["openid".into(), "email".into()],
            "http://127.0.0.1:5000/callback",
            &p,
            "n0nce",
        )
        .expect("url");
        let u = url::Url::parse(&url).expect("parses");
        let q: std::collections::HashMap<_, _> = u.query_pairs().into_owned().collect();
        assert_eq!(q["prompt"], "login", "the provider's own parameters stay");
        assert_eq!(q["scope"], "openid email");
        assert_eq!(q["nonce"], "n0nce");
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(
            q["code_challenge"],
            URL_SAFE_NO_PAD.encode(Sha256::digest(p.verifier.as_bytes()))
        );
        assert_eq!(q["state"], p.state);
        assert!(authorization_url("javascript:alert(1)", "c", &[], "r", &p, "n").is_err());
    }

    #[test]
    fn the_gateways_sign_in_page_must_be_https_the_pinned_provider_and_ask_for_little() {
        let scopes = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ok = scopes(&["openid", "email", "profile", "groups"]);
        let google = "https://accounts.google.com/o/oauth2/v2/auth";
        assert!(check_sign_in_page(google, &ok, None).is_ok());
        assert!(check_sign_in_page(google, &ok, Some("https://accounts.google.com")).is_ok());
        assert!(check_sign_in_page("http://127.0.0.1:4000/auth", &ok, None).is_ok());
        for (page, s, pinned, why) in [
            ("http://idp.example.com/auth", ok.clone(), None, "not https"),
            ("file:///etc/passwd", ok.clone(), None, "not https"),
            (
                "https://evil.example/auth",
                ok.clone(),
                Some("https://accounts.google.com"),
                "not at the identity provider",
            ),
            (
                google,
                scopes(&["openid", "https://www.googleapis.com/auth/cloud-platform"]),
                None,
                "never needs",
            ),
        ] {
            let e = check_sign_in_page(page, &s, pinned)
                .expect_err(page)
                .to_string();
            assert!(e.contains(why), "{page}: {e}");
        }
    }
}

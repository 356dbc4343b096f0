//! A real OpenID Provider for the tests of sign-in through a company IdP: panva's certified
//! `oidc-provider` (npm), run by `tests/idp/server.mjs` in a child `node` process on 127.0.0.1,
//! so tests meet the same discovery, PKCE, nonce, consent and device-flow behaviour as a real
//! IdP, not a fake's idea of it.
//!
//! [`Idp::authorize`] and [`Idp::approve_device`] play the user's browser: they follow the
//! redirects, keep the cookies and fill in the IdP's sign-in, consent and device pages. Each call
//! is a fresh browser (no session from an earlier call).
//!
//! Needs Node.js 20.19 or later and the packages of `tests/idp` (`npm ci` there; the test command
//! installs them).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use base64::Engine as _;
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, ChildStdin, Command},
};
use url::Url;

/// The public native client the agent is registered as.
pub const CLIENT_ID: &str = "touchgate";
/// A second public native client of the same shape, for tokens issued to another app.
pub const OTHER_CLIENT_ID: &str = "other";
/// The redirect URI both clients are registered with; any port on it is accepted (RFC 8252
/// section 7.3), so `http://127.0.0.1:PORT/callback` is what a client sends.
pub const REDIRECT_URI: &str = "http://127.0.0.1/callback";

/// How long the IdP may take to start (node, the packages, an RSA key).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Redirects and form posts one browser flow may take before it is called a loop.
const MAX_STEPS: usize = 20;
/// The title of the page `server.mjs` shows when a device was approved (`successSource`).
const DEVICE_APPROVED_TITLE: &str = "Signed in";

/// A user of the IdP, as its directory would hold them.
#[derive(Debug, Clone, Serialize)]
pub struct IdpUser {
    /// Subject: the IdP's stable id for the user.
    pub sub: String,
    /// Email, also the login name.
    pub email: String,
    /// Whether the IdP vouches for the email.
    pub email_verified: bool,
    /// Display name.
    pub name: String,
    /// Group memberships (the `groups` claim).
    pub groups: Vec<String>,
    /// Hosted domain, as Google Workspace puts it in `hd`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hd: Option<String>,
    /// The password the sign-in page accepts.
    pub password: String,
}

impl IdpUser {
    /// `alice@example.com`: verified, in `eng@example.com` and `oncall`, hosted domain
    /// `example.com`. Password `alice-password`.
    pub fn alice() -> Self {
        Self {
            sub: "alice".into(),
            email: "alice@example.com".into(),
            email_verified: true,
            name: "Alice Example".into(),
            groups: vec!["eng@example.com".into(), "oncall".into()],
            hd: Some("example.com".into()),
            password: "alice-password".into(),
        }
    }

    /// `bob@example.com`, whose email is NOT verified. Password `bob-password`.
    pub fn bob() -> Self {
        Self {
            sub: "bob".into(),
            email: "bob@example.com".into(),
            email_verified: false,
            name: "Bob Example".into(),
            groups: vec!["eng@example.com".into()],
            hd: Some("example.com".into()),
            password: "bob-password".into(),
        }
    }

    /// `carol@other.example`: verified, in no group, no hosted domain. Password
    /// `carol-password`.
    pub fn carol() -> Self {
        Self {
            sub: "carol".into(),
            email: "carol@other.example".into(),
            email_verified: true,
            name: "Carol Other".into(),
            groups: Vec::new(),
            hd: None,
            password: "carol-password".into(),
        }
    }
}

/// What the IdP is started with.
#[derive(Debug, Clone)]
pub struct IdpConfig {
    /// Who can sign in.
    pub users: Vec<IdpUser>,
    /// Client registrations (oidc-provider client metadata) besides [`CLIENT_ID`] and
    /// [`OTHER_CLIENT_ID`]; one with the same `client_id` replaces that default.
    pub clients: Vec<serde_json::Value>,
    /// How long an ID token is valid (whole seconds).
    pub id_token_ttl: Duration,
}

impl Default for IdpConfig {
    /// Alice, Bob and Carol; the two default clients; ID tokens valid for an hour.
    fn default() -> Self {
        Self {
            users: vec![IdpUser::alice(), IdpUser::bob(), IdpUser::carol()],
            clients: Vec::new(),
            id_token_ttl: Duration::from_secs(3600),
        }
    }
}

/// A running IdP. The `node` process is killed when this is dropped.
pub struct Idp {
    /// `http://127.0.0.1:PORT`, the issuer its tokens carry.
    pub issuer: String,
    _child: Child,
    // The IdP exits when its stdin closes: held open for as long as this lives.
    _stdin: ChildStdin,
}

impl Idp {
    /// Starts the IdP with [`IdpConfig::default`].
    pub async fn start_default() -> anyhow::Result<Self> {
        Self::start(&IdpConfig::default()).await
    }

    /// Starts the IdP and waits until it listens.
    pub async fn start(config: &IdpConfig) -> anyhow::Result<Self> {
        let dir = idp_dir();
        if !dir.join("node_modules/oidc-provider/package.json").exists() {
            bail!(
                "the test IdP's npm packages are missing from {}: run `npm ci` in tests/idp \
                 (the test command, scripts/test, installs them)",
                dir.join("node_modules").display()
            );
        }
        let config = serde_json::json!({
            "users": config.users,
            "clients": config.clients,
            "id_token_ttl": config.id_token_ttl.as_secs(),
        });
        let mut child = Command::new("node")
            .arg(dir.join("server.mjs"))
            .arg(config.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => anyhow::anyhow!(
                    "cannot start the test IdP: `node` is not on PATH; install Node.js 20.19 or \
                     later (scripts/test installs it with the system packages)"
                ),
                _ => anyhow::Error::new(e).context("cannot start the test IdP (`node`)"),
            })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            bail!("the test IdP's standard streams were not piped");
        };
        let log = tokio::spawn(forward_log(stderr));
        let mut stdout = BufReader::new(stdout).lines();
        let line = match tokio::time::timeout(START_TIMEOUT, stdout.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => Err("exited before it was ready".to_owned()),
            Ok(Err(e)) => Err(format!("could not be read: {e}")),
            Err(_) => Err(format!("did not start within {START_TIMEOUT:?}")),
        };
        let line = match line {
            Ok(line) => line,
            Err(what) => {
                let _ = child.start_kill();
                let log = tokio::time::timeout(Duration::from_secs(5), log)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                bail!("the test IdP {what}; its stderr:\n{log}");
            }
        };
        let issuer = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v.get("issuer")?.as_str().map(str::to_owned))
            .with_context(|| {
                format!("the test IdP's ready line is not {{\"issuer\":…}}: {line}")
            })?;
        Ok(Self {
            issuer,
            _child: child,
            _stdin: stdin,
        })
    }

    /// `ISSUER/.well-known/openid-configuration`.
    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.issuer)
    }

    /// Does in a fresh browser what the user does after the client opened `authorization_url`:
    /// follows the redirects, signs in as `login` with `password`, consents if asked. Returns
    /// the URL the IdP finally redirects to on the client's `redirect_uri` (with `code` and
    /// `state`, or `error`), without fetching it.
    pub async fn authorize(
        &self,
        authorization_url: &str,
        login: &str,
        password: &str,
    ) -> anyhow::Result<String> {
        let start = Url::parse(authorization_url).context("the authorization URL")?;
        let redirect_uri = start
            .query_pairs()
            .find(|(k, _)| k == "redirect_uri")
            .map(|(_, v)| Url::parse(&v))
            .context("the authorization URL has no redirect_uri")?
            .context("the authorization URL's redirect_uri")?;
        let answers = Answers {
            login,
            password,
            user_code: None,
        };
        match self.browse(start, &answers, Some(&redirect_uri)).await? {
            End::Redirected(url) => Ok(url.into()),
            End::Page(title) => bail!(
                "the IdP ended on its page {title:?} instead of redirecting to {redirect_uri}"
            ),
        }
    }

    /// Does in a fresh browser what the user of a device-flow client does: opens the IdP's
    /// verification page, enters `user_code`, confirms, signs in as `login` with `password` and
    /// consents. The pending device authorization is then approved.
    pub async fn approve_device(
        &self,
        user_code: &str,
        login: &str,
        password: &str,
    ) -> anyhow::Result<()> {
        let start = Url::parse(&format!("{}/device", self.issuer))?;
        let answers = Answers {
            login,
            password,
            user_code: Some(user_code),
        };
        match self.browse(start, &answers, None).await? {
            End::Page(title) if title == DEVICE_APPROVED_TITLE => Ok(()),
            End::Page(title) => bail!("the device flow ended on the IdP's page {title:?}"),
            End::Redirected(url) => bail!("the device flow redirected away from the IdP: {url}"),
        }
    }

    /// Follows redirects and submits forms from `start` until a redirect to `stop_at` (same
    /// origin and path) or a page with no form.
    async fn browse(
        &self,
        start: Url,
        answers: &Answers<'_>,
        stop_at: Option<&Url>,
    ) -> anyhow::Result<End> {
        let issuer = Url::parse(&self.issuer)?;
        let browser = reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        let mut request = browser.get(start.clone());
        let mut at = start;
        for _ in 0..MAX_STEPS {
            let response = request
                .send()
                .await
                .with_context(|| format!("the IdP did not answer at {at}"))?;
            let status = response.status();
            if status.is_redirection() {
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .with_context(|| format!("{status} without Location at {at}"))?;
                let next = at
                    .join(location)
                    .with_context(|| format!("bad Location {location:?} at {at}"))?;
                if stop_at.is_some_and(|stop| same_endpoint(&next, stop)) {
                    return Ok(End::Redirected(next));
                }
                if next.origin() != issuer.origin() {
                    bail!("the IdP redirected away from itself: {next}");
                }
                request = browser.get(next.clone());
                at = next;
                continue;
            }
            let page = response.text().await.context("the IdP's page")?;
            // The IdP shows a refused user code again with its error, as a 200.
            let error = page_error(&page);
            if !status.is_success() || error.is_some() {
                let error = error.unwrap_or_else(|| page.chars().take(300).collect());
                bail!("the IdP answered {status} at {at}: {error}");
            }
            let Some(form) = first_form(&page) else {
                return Ok(End::Page(title(&page)));
            };
            let action = at
                .join(&form.action)
                .with_context(|| format!("bad form action {:?} at {at}", form.action))?;
            if action.origin() != issuer.origin() {
                bail!("the IdP's page posts away from itself, to {action}");
            }
            let mut fields = form.hidden;
            for name in form.to_fill {
                let value = answers
                    .get(&name)
                    .with_context(|| format!("the IdP asks for {name:?} at {at}"))?;
                fields.push((name, value.to_owned()));
            }
            request = browser.post(action.clone()).form(&fields);
            at = action;
        }
        bail!("the IdP flow took more than {MAX_STEPS} steps, last at {at}")
    }
}

/// The payload of a JWT (an ID token), its signature NOT verified.
pub fn jwt_payload(jwt: &str) -> anyhow::Result<serde_json::Value> {
    let payload = jwt.split('.').nth(1).context("not a JWT: no payload")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .context("the JWT payload is not base64url")?;
    serde_json::from_slice(&bytes).context("the JWT payload is not JSON")
}

/// `tests/idp` in the workspace.
fn idp_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2);
    workspace.unwrap_or(Path::new(".")).join("tests/idp")
}

/// Passes the IdP's stderr on to the test's (where the harness captures it) and returns its
/// first 16 KiB once it closes.
async fn forward_log(stderr: impl AsyncRead + Unpin) -> String {
    let mut kept = String::new();
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("idp: {line}");
        if kept.len() < 16 * 1024 {
            kept.push_str(&line);
            kept.push('\n');
        }
    }
    kept
}

/// How a browser flow ended.
enum End {
    /// Redirected to the client's redirect URI.
    Redirected(Url),
    /// On a page with no form: its title.
    Page(String),
}

/// What the user types into the IdP's pages.
struct Answers<'a> {
    login: &'a str,
    password: &'a str,
    user_code: Option<&'a str>,
}

impl Answers<'_> {
    /// The value for an input named `name` in `server.mjs`'s and oidc-provider's forms.
    fn get(&self, name: &str) -> Option<&str> {
        match name {
            "login" => Some(self.login),
            "password" => Some(self.password),
            "user_code" => self.user_code,
            _ => None,
        }
    }
}

/// The first form of a page.
struct Form {
    action: String,
    /// Hidden inputs, with their values.
    hidden: Vec<(String, String)>,
    /// The names of the inputs a user fills in.
    to_fill: Vec<String>,
}

/// Reads the first form of one of the IdP's pages. The pages are `server.mjs`'s own plain
/// markup and oidc-provider's device forms (`user_code_form.js`): one form, `<input>` tags with
/// double-quoted attributes. Not a general HTML parser.
fn first_form(page: &str) -> Option<Form> {
    let start = page.find("<form")?;
    let body = &page[start..];
    let body = &body[..body.find("</form>").unwrap_or(body.len())];
    let action = attribute(tag_at(body), "action").unwrap_or_default();
    let mut hidden = Vec::new();
    let mut to_fill = Vec::new();
    for (i, _) in body.match_indices("<input") {
        let tag = tag_at(&body[i..]);
        let Some(name) = attribute(tag, "name") else {
            continue;
        };
        if attribute(tag, "type").as_deref() == Some("hidden") {
            hidden.push((name, attribute(tag, "value").unwrap_or_default()));
        } else {
            to_fill.push(name);
        }
    }
    Some(Form {
        action,
        hidden,
        to_fill,
    })
}

/// The tag that `text` starts with, up to its `>`.
fn tag_at(text: &str) -> &str {
    &text[..text.find('>').unwrap_or(text.len())]
}

/// The unescaped value of attribute `name="…"` in `tag`.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let needle = format!("{name}=\"");
    let start = tag
        .match_indices(&needle)
        .find(|(i, _)| tag[..*i].ends_with(char::is_whitespace))?
        .0
        + needle.len();
    let value = &tag[start..start + tag[start..].find('"')?];
    Some(unescape(value))
}

/// Undoes the escaping of oidc-provider's `htmlSafe` and `server.mjs`'s `escape`.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';') else { break };
        let decoded = match &rest[1..end] {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            entity => entity
                .strip_prefix('#')
                .and_then(|n| n.parse().ok())
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A page's `<title>`.
fn title(page: &str) -> String {
    between(page, "<title>", "</title>").map_or_else(String::new, unescape)
}

/// The error a page of the IdP shows (`<p class="error">`), if any.
fn page_error(page: &str) -> Option<String> {
    between(page, "<p class=\"error\">", "</p>").map(unescape)
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let len = text[start..].find(close)?;
    Some(&text[start..start + len])
}

/// Whether `url` is on the endpoint `endpoint` names: scheme, host, port and path.
fn same_endpoint(url: &Url, endpoint: &Url) -> bool {
    url.origin() == endpoint.origin() && url.path() == endpoint.path()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    const VERIFIER: &str = "a-code-verifier-of-at-least-forty-three-characters";

    async fn discovery(idp: &Idp) -> serde_json::Value {
        let response = reqwest::get(idp.discovery_url())
            .await
            .expect("discovery answers");
        assert_eq!(response.status(), 200);
        serde_json::from_str(&response.text().await.expect("a body")).expect("discovery is JSON")
    }

    async fn post_form(
        url: &str,
        form: &[(&str, &str)],
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let response = reqwest::Client::new()
            .post(url)
            .form(form)
            .send()
            .await
            .expect("the IdP answers");
        let status = response.status();
        let body = response.text().await.expect("a body");
        (status, serde_json::from_str(&body).expect("a JSON answer"))
    }

    fn endpoint(discovery: &serde_json::Value, name: &str) -> String {
        discovery[name].as_str().expect(name).to_owned()
    }

    /// Signs `user` in to `client_id` with the code flow, as a native app on a loopback port
    /// does, and returns the ID token's claims.
    async fn code_flow(
        idp: &Idp,
        client_id: &str,
        scope: &str,
        user: &IdpUser,
    ) -> serde_json::Value {
        let discovery = discovery(idp).await;
        assert_eq!(discovery["issuer"], idp.issuer.as_str());
        // A port the app listens on: any loopback port is accepted.
        let callback = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let redirect_uri = format!(
            "http://127.0.0.1:{}/callback",
            callback.local_addr().expect("addr").port()
        );
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(Sha256::digest(VERIFIER.as_bytes()));
        let mut authorization =
            Url::parse(&endpoint(&discovery, "authorization_endpoint")).expect("url");
        authorization.query_pairs_mut().extend_pairs([
            ("client_id", client_id),
            ("response_type", "code"),
            ("scope", scope),
            ("redirect_uri", &redirect_uri),
            ("state", "the-state"),
            ("nonce", "the-nonce"),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
        ]);

        let back = idp
            .authorize(authorization.as_str(), &user.email, &user.password)
            .await
            .expect("the user authorizes");

        let back = Url::parse(&back).expect("a URL");
        assert!(back.as_str().starts_with(&redirect_uri), "{back}");
        let query: std::collections::HashMap<_, _> = back.query_pairs().into_owned().collect();
        assert_eq!(query.get("state").map(String::as_str), Some("the-state"));
        assert_eq!(query.get("iss"), Some(&idp.issuer));
        let code = query.get("code").expect("a code");
        let (status, tokens) = post_form(
            &endpoint(&discovery, "token_endpoint"),
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", &redirect_uri),
                ("client_id", client_id),
                ("code_verifier", VERIFIER),
            ],
        )
        .await;
        assert_eq!(status, 200, "{tokens}");
        jwt_payload(tokens["id_token"].as_str().expect("an ID token")).expect("claims")
    }

    fn lifetime(claims: &serde_json::Value) -> u64 {
        claims["exp"].as_u64().expect("exp") - claims["iat"].as_u64().expect("iat")
    }

    #[tokio::test]
    async fn code_flow_gives_an_id_token_with_the_users_claims() {
        let idp = Idp::start_default().await.expect("the IdP starts");

        let claims = code_flow(
            &idp,
            CLIENT_ID,
            "openid email profile groups",
            &IdpUser::alice(),
        )
        .await;

        eprintln!("ID token claims: {claims}");
        assert_eq!(claims["iss"], idp.issuer.as_str());
        assert_eq!(claims["aud"], CLIENT_ID);
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["nonce"], "the-nonce");
        assert_eq!(claims["email"], "alice@example.com");
        assert_eq!(claims["email_verified"], true);
        assert_eq!(claims["name"], "Alice Example");
        assert_eq!(
            claims["groups"],
            serde_json::json!(["eng@example.com", "oncall"])
        );
        assert_eq!(claims["hd"], "example.com");
        assert_eq!(lifetime(&claims), 3600);
    }

    #[tokio::test]
    async fn another_client_gets_tokens_for_its_own_audience_and_scopes() {
        let idp = Idp::start_default().await.expect("the IdP starts");

        let claims = code_flow(&idp, OTHER_CLIENT_ID, "openid email", &IdpUser::bob()).await;

        assert_eq!(claims["aud"], OTHER_CLIENT_ID);
        assert_eq!(claims["email"], "bob@example.com");
        assert_eq!(claims["email_verified"], false);
        // Not asked for: no profile, no groups.
        assert!(claims.get("name").is_none(), "{claims}");
        assert!(claims.get("groups").is_none(), "{claims}");
    }

    #[tokio::test]
    async fn an_authorization_without_pkce_is_refused() {
        let idp = Idp::start_default().await.expect("the IdP starts");
        let url = format!(
            "{}/auth?client_id={CLIENT_ID}&response_type=code&scope=openid&redirect_uri=http%3A%2F%2F127.0.0.1%3A9%2Fcallback",
            idp.issuer
        );

        let back = idp
            .authorize(&url, "alice@example.com", "alice-password")
            .await
            .expect("the IdP answers the client");

        let back = Url::parse(&back).expect("a URL");
        let query: std::collections::HashMap<_, _> = back.query_pairs().into_owned().collect();
        assert_eq!(query["error"], "invalid_request", "{back}");
        assert!(query["error_description"].contains("PKCE"), "{back}");
    }

    #[tokio::test]
    async fn a_wrong_password_is_refused() {
        let idp = Idp::start_default().await.expect("the IdP starts");
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(Sha256::digest(VERIFIER.as_bytes()));
        let url = format!(
            "{}/auth?client_id={CLIENT_ID}&response_type=code&scope=openid&redirect_uri=http%3A%2F%2F127.0.0.1%3A9%2Fcallback&code_challenge={challenge}&code_challenge_method=S256",
            idp.issuer
        );

        let refused = idp
            .authorize(&url, "alice@example.com", "not-her-password")
            .await;

        let error = format!("{:#}", refused.expect_err("refused"));
        assert!(
            error.contains("401") && error.contains("Wrong email or password"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn device_flow_gives_an_id_token_once_the_user_approves() {
        let idp = Idp::start(&IdpConfig {
            id_token_ttl: Duration::from_secs(60),
            ..IdpConfig::default()
        })
        .await
        .expect("the IdP starts");
        let discovery = discovery(&idp).await;
        let token_endpoint = endpoint(&discovery, "token_endpoint");
        let (status, device) = post_form(
            &endpoint(&discovery, "device_authorization_endpoint"),
            &[("client_id", CLIENT_ID), ("scope", "openid email groups")],
        )
        .await;
        assert_eq!(status, 200, "{device}");
        let device_code = device["device_code"].as_str().expect("a device code");
        let user_code = device["user_code"].as_str().expect("a user code");
        let poll = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code),
            ("client_id", CLIENT_ID),
        ];
        let (status, pending) = post_form(&token_endpoint, &poll).await;
        assert_eq!(
            (status.as_u16(), &pending["error"]),
            (400, &serde_json::json!("authorization_pending"))
        );

        let alice = IdpUser::alice();
        idp.approve_device(user_code, &alice.email, &alice.password)
            .await
            .expect("alice approves");

        let (status, tokens) = post_form(&token_endpoint, &poll).await;
        assert_eq!(status, 200, "{tokens}");
        let claims =
            jwt_payload(tokens["id_token"].as_str().expect("an ID token")).expect("claims");
        assert_eq!(claims["iss"], idp.issuer.as_str());
        assert_eq!(claims["aud"], CLIENT_ID);
        assert_eq!(claims["email"], "alice@example.com");
        assert_eq!(claims["email_verified"], true);
        assert_eq!(
            claims["groups"],
            serde_json::json!(["eng@example.com", "oncall"])
        );
        assert_eq!(lifetime(&claims), 60);
    }

    #[tokio::test]
    async fn a_wrong_user_code_is_refused() {
        let idp = Idp::start_default().await.expect("the IdP starts");

        let refused = idp
            .approve_device("BCDF-GHJK", "alice@example.com", "alice-password")
            .await;

        let error = format!("{:#}", refused.expect_err("refused"));
        assert!(error.contains("BCDF-GHJK"), "{error}");
    }

    #[test]
    fn forms_are_read_with_hidden_values_unescaped() {
        let page = r#"<p>x</p><form id="op.deviceConfirmForm" method="post" action="/device">
<input type="hidden" name="xsrf" value="a&amp;b&#39;c"/>
<input
    type="text" name="user_code" placeholder="Enter code" autofocus></input>
</form>"#;

        let form = first_form(page).expect("a form");

        assert_eq!(form.action, "/device");
        assert_eq!(form.hidden, vec![("xsrf".to_owned(), "a&b'c".to_owned())]);
        assert_eq!(form.to_fill, vec!["user_code".to_owned()]);
    }
}

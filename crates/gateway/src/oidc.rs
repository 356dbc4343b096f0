//! The organisation's OpenID provider (`[oidc]`): discovery, its signing keys, redeeming an
//! authorization code, and checking an ID token down to the nonce this gateway issued for one
//! QUIC connection. The gateway is the OIDC client (the agent only carries the browser's code
//! to it), so an ID token is never accepted from a peer: it comes from the provider's token
//! endpoint, over TLS, for this gateway's `client_id`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use jsonwebtoken::{DecodingKey, Validation, jwk::JwkSet};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::config::OidcConfig;

/// How long a call to the provider may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the discovery document and keys are kept before they are fetched again.
const CACHE_FOR: Duration = Duration::from_secs(3600);
/// The keys are fetched again for an unknown `kid` at most this often (a peer cannot make the
/// gateway hammer the provider with made-up key ids).
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_secs(10);
/// Largest answer read from the provider.
const MAX_ANSWER: usize = 1024 * 1024;

/// Why an IdP step failed, in words for the user and the audit log.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The provider could not be reached or answered nonsense.
    #[error("the identity provider could not be used: {0}")]
    Provider(String),
    /// The provider refused the code (used, expired, another client's, wrong verifier).
    #[error("the identity provider refused the sign-in: {0}")]
    Refused(String),
    /// The ID token failed a check.
    #[error("the identity provider's ID token was refused: {0}")]
    Token(String),
    /// The identity is not one this gateway takes.
    #[error("{0}")]
    Identity(String),
}

/// Where the provider's endpoints are (its discovery document).
#[derive(Debug, Clone, Deserialize)]
pub struct Provider {
    /// The issuer, exactly as its tokens name it.
    pub issuer: String,
    /// Where the browser signs in.
    pub authorization_endpoint: String,
    /// Where codes are redeemed.
    pub token_endpoint: String,
    /// The signing keys.
    pub jwks_uri: String,
    /// Where a device authorization starts (RFC 8628), if the provider has it.
    #[serde(default)]
    pub device_authorization_endpoint: Option<String>,
}

/// Who the provider says signed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The touchgate user name (the `user_claim`, lower case for an email).
    pub user: String,
    /// The provider's stable subject (`sub`).
    pub subject: String,
    /// The groups claim, as given.
    pub groups: Vec<String>,
}

/// The nonce an ID token must carry.
#[derive(Clone, Copy)]
enum Nonce<'a> {
    /// This one (the code flow: the gateway put it in the authorization request).
    Required(&'a str),
    /// This one or none (the device flow, where providers may leave it out).
    IfPresent(&'a str),
}

/// What the token endpoint answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenAnswer {
    /// The ID token.
    IdToken(String),
    /// Device flow: the user has not finished yet.
    Pending,
    /// Device flow: not yet, and poll less often (RFC 8628 §3.5: five seconds more).
    SlowDown,
}

/// The answer of a device authorization request (RFC 8628 §3.2).
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceAuthorization {
    /// Polled at the token endpoint.
    pub device_code: String,
    /// What the user types.
    pub user_code: String,
    /// Where the user goes.
    pub verification_uri: String,
    /// The same with the code in it, if the provider gives one.
    #[serde(default)]
    pub verification_uri_complete: Option<String>,
    /// Seconds until the codes expire.
    pub expires_in: u64,
    /// Seconds between polls.
    #[serde(default)]
    pub interval: Option<u64>,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Default)]
struct Cache {
    provider: Option<(Provider, Instant)>,
    keys: Option<(JwkSet, Instant)>,
}

/// The gateway's client of the organisation's provider.
pub struct Oidc {
    cfg: OidcConfig,
    secret: Option<String>,
    http: HttpsClient,
    cache: Mutex<Cache>,
    /// Calls to the provider at once: peers cannot make the gateway hammer it (and exhaust an
    /// organisation-wide rate limit every re-check needs).
    calls: tokio::sync::Semaphore,
}

/// How many calls to the provider may be in flight at once.
const MAX_CALLS: usize = 16;

impl Oidc {
    /// A client for `cfg` (nothing is fetched yet). `secret` is the client secret, if any.
    pub fn new(cfg: OidcConfig, secret: Option<String>) -> Result<Arc<Self>, OidcError> {
        check_issuer(&cfg.issuer)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Arc::new(Self {
            cfg,
            secret,
            http: Client::builder(TokioExecutor::new()).build(https),
            cache: Mutex::new(Cache::default()),
            calls: tokio::sync::Semaphore::new(MAX_CALLS),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &OidcConfig {
        &self.cfg
    }

    /// The provider's endpoints, from its discovery document (cached for an hour).
    pub async fn provider(&self) -> Result<Provider, OidcError> {
        let mut cache = self.cache.lock().await;
        if let Some((p, at)) = &cache.provider
            && at.elapsed() < CACHE_FOR
        {
            return Ok(p.clone());
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.cfg.issuer.trim_end_matches('/')
        );
        let p: Provider = serde_json::from_slice(&self.get(&url).await?)
            .map_err(|e| OidcError::Provider(format!("its discovery document {url}: {e}")))?;
        // OpenID Connect Discovery §4.3: the document must name the issuer it was asked for.
        if p.issuer != self.cfg.issuer {
            return Err(OidcError::Provider(format!(
                "its discovery document names issuer {} instead of {}",
                p.issuer, self.cfg.issuer
            )));
        }
        for (what, url) in [
            ("authorization_endpoint", Some(&p.authorization_endpoint)),
            ("token_endpoint", Some(&p.token_endpoint)),
            ("jwks_uri", Some(&p.jwks_uri)),
            (
                "device_authorization_endpoint",
                p.device_authorization_endpoint.as_ref(),
            ),
        ] {
            if let Some(url) = url {
                check_endpoint(what, url)?;
            }
        }
        cache.provider = Some((p.clone(), Instant::now()));
        Ok(p)
    }

    /// What `touchgate-gateway check` says about the provider: fetches its discovery document
    /// and keys.
    pub async fn describe(&self) -> Result<String, OidcError> {
        let p = self.provider().await?;
        let keys = self.fetch_keys().await?;
        Ok(format!(
            "oidc: {} ({}): sign-in at {}, codes redeemed at {}, {keys} signing key{}, device sign-in {}",
            self.cfg.name(),
            self.cfg.issuer,
            p.authorization_endpoint,
            p.token_endpoint,
            if keys == 1 { "" } else { "s" },
            if p.device_authorization_endpoint.is_some() {
                "offered"
            } else {
                "not offered"
            },
        ))
    }

    /// Fetches the provider's signing keys into the cache; returns how many there are.
    pub async fn fetch_keys(&self) -> Result<usize, OidcError> {
        let p = self.provider().await?;
        let set: JwkSet = serde_json::from_slice(&self.get(&p.jwks_uri).await?)
            .map_err(|e| OidcError::Provider(format!("its keys {}: {e}", p.jwks_uri)))?;
        let n = set.keys.len();
        self.cache.lock().await.keys = Some((set, Instant::now()));
        Ok(n)
    }

    /// Redeems an authorization code the browser brought back (PKCE: with the verifier the
    /// agent made) and returns the ID token.
    pub async fn redeem(
        &self,
        code: &str,
        code_verifier: &str,
        redirect_uri: &str,
    ) -> Result<String, OidcError> {
        let p = self.provider().await?;
        self.token_request(
            &p.token_endpoint,
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("code_verifier", code_verifier),
                ("redirect_uri", redirect_uri),
            ],
        )
        .await
        .and_then(|t| match t {
            TokenAnswer::IdToken(t) => Ok(t),
            _ => Err(OidcError::Refused("no ID token in the answer".into())),
        })
    }

    /// Starts a device authorization (RFC 8628) for the configured scopes, with `nonce` for
    /// the ID token (an OpenID extension providers honour; the device code itself never leaves
    /// the gateway, which binds the flow to one connection anyway).
    pub async fn device_begin(&self, nonce: &str) -> Result<DeviceAuthorization, OidcError> {
        let p = self.provider().await?;
        let url = p.device_authorization_endpoint.ok_or_else(|| {
            OidcError::Provider("it does not offer the device authorization grant".into())
        })?;
        let scopes = self.cfg.scopes.join(" ");
        let mut form = vec![
            ("client_id", self.cfg.client_id.as_str()),
            ("scope", scopes.as_str()),
            ("nonce", nonce),
        ];
        if let Some(s) = &self.secret {
            form.push(("client_secret", s));
        }
        let body = self.post_form(&url, &form).await?;
        serde_json::from_slice(&body)
            .map_err(|e| OidcError::Provider(format!("its device authorization answer: {e}")))
    }

    /// Polls for a device authorization.
    pub async fn device_poll(&self, device_code: &str) -> Result<TokenAnswer, OidcError> {
        let p = self.provider().await?;
        self.token_request(
            &p.token_endpoint,
            &[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", device_code),
            ],
        )
        .await
    }

    /// Checks an ID token from the token endpoint: signature by a key of the provider,
    /// `iss`, `aud` (and `azp`), `exp`, the `nonce` issued for this connection, a verified
    /// email, an allowed domain. Returns who it names.
    pub async fn verify(&self, id_token: &str, nonce: &str) -> Result<Identity, OidcError> {
        self.check(id_token, Nonce::Required(nonce)).await
    }

    /// [`Oidc::verify`] for the device flow, which has no nonce of its own (RFC 8628): the
    /// device code never left the gateway, which binds the flow to the connection; a nonce
    /// the provider did carry must still be this one.
    pub async fn verify_device(&self, id_token: &str, nonce: &str) -> Result<Identity, OidcError> {
        self.check(id_token, Nonce::IfPresent(nonce)).await
    }

    async fn check(&self, id_token: &str, nonce: Nonce<'_>) -> Result<Identity, OidcError> {
        let header = jsonwebtoken::decode_header(id_token)
            .map_err(|e| OidcError::Token(format!("not a JWT: {e}")))?;
        let kid = header.kid.clone().unwrap_or_default();
        let key = self.key(&kid).await?;
        let mut v = Validation::new(header.alg);
        v.leeway = self.cfg.clock_skew.as_secs();
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&[&self.cfg.client_id]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(id_token, &key, &v)
            .map_err(|e| OidcError::Token(token_problem(&e)))?;
        self.identity(&data.claims, nonce)
    }

    /// The checks after the signature, on the claims.
    fn identity(&self, c: &serde_json::Value, nonce: Nonce<'_>) -> Result<Identity, OidcError> {
        let nonce_ok = match nonce {
            Nonce::Required(n) => c["nonce"].as_str() == Some(n),
            Nonce::IfPresent(n) => c["nonce"].is_null() || c["nonce"].as_str() == Some(n),
        };
        if !nonce_ok {
            return Err(OidcError::Token(
                "its nonce is not the one issued for this connection (a token from another sign-in)"
                    .into(),
            ));
        }
        // OpenID Connect Core §3.1.3.7: with several audiences, `azp` must be this client.
        if c["aud"].is_array()
            && c["aud"].as_array().is_some_and(|a| a.len() > 1)
            && c["azp"].as_str() != Some(self.cfg.client_id.as_str())
        {
            return Err(OidcError::Token(
                "it names several audiences and another authorized party".into(),
            ));
        }
        let subject = c["sub"].as_str().unwrap_or_default().to_owned();
        let claim = self.cfg.user_claim.as_str();
        let value = c[claim].as_str().unwrap_or_default().trim();
        if value.is_empty() {
            return Err(OidcError::Identity(format!(
                "the identity provider did not say the {claim} of this account (check the scopes: {})",
                self.cfg.scopes.join(" ")
            )));
        }
        let user = if claim == "email" {
            if c["email_verified"] != serde_json::Value::Bool(true) {
                return Err(OidcError::Identity(format!(
                    "the identity provider has not verified the email address {value}"
                )));
            }
            value.to_ascii_lowercase()
        } else {
            value.to_owned()
        };
        // `["*"]`: every account of the provider (the config check refuses an empty list).
        let any = self.cfg.allowed_domains.is_empty() || self.cfg.allowed_domains == ["*"];
        if !any {
            // Google names the Workspace domain in `hd`; a consumer account that merely uses
            // a company address has none, and must not pass for the company's.
            let google = self.cfg.issuer == "https://accounts.google.com";
            let domain = c["hd"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| {
                    (!google)
                        .then(|| user.rsplit_once('@').map(|(_, d)| d.to_owned()))
                        .flatten()
                })
                .unwrap_or_default()
                .to_ascii_lowercase();
            if !self
                .cfg
                .allowed_domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(&domain))
            {
                return Err(OidcError::Identity(format!(
                    "accounts of {domain:?} may not use this gateway (allowed: {})",
                    self.cfg.allowed_domains.join(", ")
                )));
            }
        }
        let groups = match &c[self.cfg.groups_claim.as_str()] {
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|g| g.as_str().map(str::to_owned))
                .collect(),
            serde_json::Value::String(s) => vec![s.clone()],
            _ => Vec::new(),
        };
        Ok(Identity {
            user,
            subject,
            groups,
        })
    }

    /// The provider's key `kid`, fetching the key set again (at most every
    /// [`REFRESH_AT_MOST_EVERY`]) when it is not known: providers rotate keys.
    async fn key(&self, kid: &str) -> Result<DecodingKey, OidcError> {
        let mut refreshed = false;
        loop {
            let stale = {
                let cache = self.cache.lock().await;
                match &cache.keys {
                    // Keys the provider has since rotated out must not stay trusted: a set
                    // older than CACHE_FOR is fetched again before it is used.
                    Some((_, at)) if at.elapsed() >= CACHE_FOR && !refreshed => true,
                    Some((set, at)) => {
                        if let Some(jwk) = set.find(kid).or_else(|| {
                            // A token without `kid` from a provider with one key.
                            (kid.is_empty() && set.keys.len() == 1).then(|| &set.keys[0])
                        }) {
                            return DecodingKey::from_jwk(jwk).map_err(|e| {
                                OidcError::Provider(format!("its key {kid:?} is unusable: {e}"))
                            });
                        }
                        at.elapsed() >= REFRESH_AT_MOST_EVERY
                    }
                    None => true,
                }
            };
            if refreshed || !stale {
                return Err(OidcError::Token(format!(
                    "it is signed with key {kid:?}, which the identity provider does not publish"
                )));
            }
            self.fetch_keys().await?;
            refreshed = true;
        }
    }

    /// A token endpoint request: the ID token, the device flow's "not yet", or the
    /// provider's refusal in words.
    async fn token_request(
        &self,
        url: &str,
        form: &[(&str, &str)],
    ) -> Result<TokenAnswer, OidcError> {
        #[derive(Deserialize)]
        struct Answer {
            id_token: Option<String>,
            error: Option<String>,
            error_description: Option<String>,
        }
        let mut form = form.to_vec();
        form.push(("client_id", &self.cfg.client_id));
        if let Some(s) = &self.secret {
            form.push(("client_secret", s));
        }
        let (status, body) = self.post_form_status(url, &form).await?;
        let a: Answer = serde_json::from_slice(&body).map_err(|e| {
            OidcError::Provider(format!("its token endpoint answered {status} and {e}"))
        })?;
        match (a.id_token, a.error) {
            (Some(t), None) if status.is_success() => Ok(TokenAnswer::IdToken(t)),
            (_, Some(e)) if e == "authorization_pending" => Ok(TokenAnswer::Pending),
            (_, Some(e)) if e == "slow_down" => Ok(TokenAnswer::SlowDown),
            (_, Some(e)) => Err(OidcError::Refused(match a.error_description {
                Some(d) => format!("{e}: {d}"),
                None => e,
            })),
            _ => Err(OidcError::Refused(format!(
                "its token endpoint answered {status} without an ID token"
            ))),
        }
    }

    async fn post_form(&self, url: &str, form: &[(&str, &str)]) -> Result<Bytes, OidcError> {
        let (status, body) = self.post_form_status(url, form).await?;
        if !status.is_success() {
            return Err(OidcError::Provider(format!(
                "{url} answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )));
        }
        Ok(body)
    }

    async fn post_form_status(
        &self,
        url: &str,
        form: &[(&str, &str)],
    ) -> Result<(StatusCode, Bytes), OidcError> {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let req = Request::post(url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| OidcError::Provider(format!("{url}: {e}")))?;
        self.call(url, req).await
    }

    async fn get(&self, url: &str) -> Result<Bytes, OidcError> {
        let req = Request::get(url)
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| OidcError::Provider(format!("{url}: {e}")))?;
        let (status, body) = self.call(url, req).await?;
        if !status.is_success() {
            return Err(OidcError::Provider(format!("{url} answered {status}")));
        }
        Ok(body)
    }

    async fn call(
        &self,
        url: &str,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), OidcError> {
        let unreachable = |e: String| OidcError::Provider(format!("{url}: {e}"));
        let _turn = tokio::time::timeout(CALL_TIMEOUT, self.calls.acquire())
            .await
            .map_err(|_| unreachable("too many sign-ins at once; try again".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| unreachable(format!("no answer within {}s", CALL_TIMEOUT.as_secs())))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }
}

/// The issuer must be `https://`, or `http://` on this machine's loopback (a provider run
/// beside the gateway, as in tests).
pub fn check_issuer(issuer: &str) -> Result<(), OidcError> {
    check_endpoint("issuer", issuer)
}

fn check_endpoint(what: &str, url: &str) -> Result<(), OidcError> {
    let u = url::Url::parse(url)
        .map_err(|e| OidcError::Provider(format!("its {what} {url:?} is not a URL: {e}")))?;
    let loopback = touchgate_common::host::is_loopback_url(&u);
    match u.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(OidcError::Provider(format!(
            "its {what} {url} is not https:// (plain http is taken on the loopback only)"
        ))),
    }
}

/// A JWT check failure in words.
fn token_problem(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "it has expired".into(),
        K::InvalidSignature => "its signature does not verify".into(),
        K::InvalidIssuer => "it was issued by another provider".into(),
        K::InvalidAudience => "it was issued for another client".into(),
        K::ImmatureSignature => "it is not valid yet".into(),
        K::InvalidAlgorithm => "its algorithm does not match the key".into(),
        K::MissingRequiredClaim(c) => format!("it has no {c} claim"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oidc(allowed_domains: &[&str]) -> Arc<Oidc> {
        let cfg = OidcConfig {
            allowed_domains: allowed_domains.iter().map(|d| d.to_string()).collect(),
            ..OidcConfig::new("https://idp.example.com", "touchgate")
        };
        Oidc::new(cfg, None).expect("oidc")
    }

    #[test]
    fn only_https_issuers_or_loopback_http_ones_are_taken() {
        assert!(check_issuer("https://accounts.google.com").is_ok());
        assert!(check_issuer("http://127.0.0.1:4000").is_ok());
        assert!(check_issuer("http://localhost:4000").is_ok());
        assert!(check_issuer("http://idp.example.com").is_err());
        assert!(check_issuer("ftp://idp.example.com").is_err());
        assert!(check_issuer("idp.example.com").is_err());
    }

    #[test]
    fn claims_name_the_user_and_refuse_what_the_gateway_does_not_take() {
        let o = oidc(&["example.com"]);
        let ok = serde_json::json!({"sub": "s1", "nonce": "n", "email": "Alice@Example.com",
            "email_verified": true, "groups": ["eng", "oncall"]});
        assert_eq!(
            o.identity(&ok, Nonce::Required("n")).expect("ok"),
            Identity {
                user: "alice@example.com".into(),
                subject: "s1".into(),
                groups: vec!["eng".into(), "oncall".into()],
            }
        );
        let wrong_nonce = o
            .identity(&ok, Nonce::Required("other"))
            .expect_err("nonce");
        assert!(wrong_nonce.to_string().contains("nonce"), "{wrong_nonce}");
        let mut unverified = ok.clone();
        unverified["email_verified"] = false.into();
        assert!(o.identity(&unverified, Nonce::Required("n")).is_err());
        let mut other_domain = ok.clone();
        other_domain["email"] = "carol@other.example".into();
        let e = o
            .identity(&other_domain, Nonce::Required("n"))
            .expect_err("domain");
        assert!(e.to_string().contains("other.example"), "{e}");
        // Google's `hd` names the Workspace domain, whatever the address.
        let mut hd = other_domain.clone();
        hd["hd"] = "example.com".into();
        assert!(o.identity(&hd, Nonce::Required("n")).is_ok());
        // At Google, only `hd` counts: a consumer account with a company address is not in.
        let google = Oidc::new(
            OidcConfig {
                allowed_domains: vec!["example.com".into()],
                ..OidcConfig::new("https://accounts.google.com", "touchgate")
            },
            None,
        )
        .expect("oidc");
        assert!(google.identity(&ok, Nonce::Required("n")).is_err());
        let mut workspace = ok.clone();
        workspace["hd"] = "example.com".into();
        assert!(google.identity(&workspace, Nonce::Required("n")).is_ok());
        let anyone = oidc(&["*"]);
        assert!(anyone.identity(&other_domain, Nonce::Required("n")).is_ok());
        // The device flow: no nonce is fine, another one is not.
        let mut no_nonce = ok.clone();
        no_nonce["nonce"] = serde_json::Value::Null;
        assert!(o.identity(&no_nonce, Nonce::IfPresent("n")).is_ok());
        assert!(o.identity(&no_nonce, Nonce::Required("n")).is_err());
        assert!(o.identity(&ok, Nonce::IfPresent("other")).is_err());
        let mut azp = ok.clone();
        azp["aud"] = serde_json::json!(["touchgate", "other"]);
        azp["azp"] = "other".into();
        assert!(o.identity(&azp, Nonce::Required("n")).is_err());
    }
}

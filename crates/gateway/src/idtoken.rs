//! Google-signed ID tokens for upstream calls, from the metadata server, cached per audience.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::Client, client::legacy::connect::HttpConnector, rt::TokioExecutor,
};

use crate::{
    config::{IdTokenConfig, IdTokenSource},
    store::now_secs,
};

/// Refresh a cached token when it has less than this left.
pub const REFRESH_MARGIN_SECS: u64 = 300;

/// Errors getting an ID token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdTokenError {
    /// The metadata server could not be reached.
    #[error("the metadata server at {url} is unreachable: {reason}")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// Why.
        reason: String,
    },
    /// The metadata server answered with an error.
    #[error(
        "the metadata server refused an ID token for audience {audience}: HTTP {status}: {body}"
    )]
    Refused {
        /// The audience asked for.
        audience: String,
        /// HTTP status.
        status: u16,
        /// Start of the body.
        body: String,
    },
    /// The answer is not a JWT with an expiry.
    #[error("the metadata server's answer is not an ID token: {0}")]
    Malformed(String),
}

/// A token as the header value that carries it (`Bearer …`, marked sensitive), built once per
/// token rather than per request.
#[derive(Clone)]
struct Cached {
    bearer: HeaderValue,
    exp: u64,
}

/// One audience's token, and the lock that makes concurrent refreshes one fetch.
#[derive(Default)]
struct Slot {
    current: Option<Cached>,
    refresh: Arc<tokio::sync::Mutex<()>>,
}

/// Fetches and caches ID tokens.
pub struct IdTokens {
    source: IdTokenSource,
    metadata_url: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    cache: Mutex<HashMap<String, Slot>>,
}

impl IdTokens {
    /// Builds the provider from config.
    pub fn new(cfg: &IdTokenConfig) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        http.set_nodelay(true);
        Self {
            source: cfg.source,
            metadata_url: cfg.metadata_url.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build(http),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The `Authorization`-style value (`Bearer <ID token>`) for `audience`, or `None` when
    /// the source is `none`. A fresh cached token costs one uncontended lock; concurrent
    /// callers for one audience share one fetch.
    pub async fn bearer(&self, audience: &str) -> Result<Option<HeaderValue>, IdTokenError> {
        if self.source == IdTokenSource::None {
            return Ok(None);
        }
        let refresh = match self.fresh(audience) {
            Ok(bearer) => return Ok(Some(bearer)),
            Err(refresh) => refresh,
        };
        let _refreshing = refresh.lock().await;
        // Another caller may have fetched it while this one waited.
        if let Ok(bearer) = self.fresh(audience) {
            return Ok(Some(bearer));
        }
        let fresh = self.fetch(audience).await?;
        let bearer = fresh.bearer.clone();
        self.lock().entry(audience.to_owned()).or_default().current = Some(fresh);
        Ok(Some(bearer))
    }

    /// The cached value if it is fresh, else the lock to refresh it under.
    fn fresh(&self, audience: &str) -> Result<HeaderValue, Arc<tokio::sync::Mutex<()>>> {
        let mut cache = self.lock();
        if let Some(slot) = cache.get(audience) {
            if let Some(c) = &slot.current
                && c.exp > now_secs() + REFRESH_MARGIN_SECS
            {
                return Ok(c.bearer.clone());
            }
            return Err(slot.refresh.clone());
        }
        Err(cache
            .entry(audience.to_owned())
            .or_default()
            .refresh
            .clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn fetch(&self, audience: &str) -> Result<Cached, IdTokenError> {
        let url = format!(
            "{}/computeMetadata/v1/instance/service-accounts/default/identity?audience={}&format=full",
            self.metadata_url,
            url::form_urlencoded::byte_serialize(audience.as_bytes()).collect::<String>()
        );
        let unreachable = |reason: String| IdTokenError::Unreachable {
            url: self.metadata_url.clone(),
            reason,
        };
        let req = http::Request::get(&url)
            .header("Metadata-Flavor", "Google")
            .body(Empty::new())
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| unreachable("timed out after 10s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).trim().to_owned();
        if !status.is_success() {
            return Err(IdTokenError::Refused {
                audience: audience.to_owned(),
                status: status.as_u16(),
                body: text.chars().take(200).collect(),
            });
        }
        let exp = jwt_exp(&text)
            .ok_or_else(|| IdTokenError::Malformed("no readable exp claim".into()))?;
        let mut bearer = HeaderValue::from_str(&format!("Bearer {text}"))
            .map_err(|_| IdTokenError::Malformed("not a valid header value".into()))?;
        bearer.set_sensitive(true);
        Ok(Cached { bearer, exp })
    }
}

/// The `exp` claim of a JWT, read without verifying it (the gateway is not the audience).
fn jwt_exp(jwt: &str) -> Option<u64> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("exp")?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_read_from_the_payload() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"aud":"x","exp":1234}"#);
        assert_eq!(jwt_exp(&format!("h.{payload}.s")), Some(1234));
        assert_eq!(jwt_exp("garbage"), None);
    }

    #[tokio::test]
    async fn source_none_sends_no_token() {
        let t = IdTokens::new(&IdTokenConfig {
            source: IdTokenSource::None,
            metadata_url: "http://127.0.0.1:1".into(),
        });
        assert!(t.bearer("https://svc").await.expect("no fetch").is_none());
    }

    #[tokio::test]
    async fn unreachable_metadata_server_is_a_clear_error() {
        let t = IdTokens::new(&IdTokenConfig {
            source: IdTokenSource::Metadata,
            metadata_url: "http://127.0.0.1:1".into(),
        });
        let err = t
            .bearer("https://svc")
            .await
            .expect_err("nothing listens on port 1");
        assert!(err.to_string().contains("unreachable"), "{err}");
    }
}

//! Session tokens and identity assertions: ES256 JWTs signed with the gateway's rotating keys.
//!
//! A session token is valid only together with the TLS client certificate of the session key it
//! names in `cnf` (`x5t#S256`, RFC 8705): a stolen token is worthless without the key, which
//! never leaves the agent's memory. Tokens are checked without a database lookup, so gateway
//! replicas that share the signing keys scale horizontally.

use std::{collections::HashMap, sync::Arc};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError, StoredSigningKey, now_secs};

/// Audience of session tokens.
pub const SESSION_AUDIENCE: &str = "touchgate-session";

/// Audience of a delegated grant's token: one of its own, so that a gateway that knows no
/// grants (an older replica during an upgrade) refuses it instead of taking it for the user's
/// whole session.
pub const DELEGATION_AUDIENCE: &str = "touchgate-delegation";

/// How long an identity assertion is valid for the upstream.
pub const ASSERTION_TTL_SECS: u64 = 300;

/// How old the current signing key may get before a new one is made.
pub const KEY_ROTATION_SECS: u64 = 7 * 24 * 3600;

/// Errors verifying a session token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Bad signature, unknown key, wrong issuer or audience, or not a JWT.
    #[error("the session token is not valid: {0}")]
    Invalid(String),
    /// Past its expiry.
    #[error("the session has expired")]
    Expired,
    /// Presented on a connection whose client certificate is another key.
    #[error("the session token belongs to another session key")]
    WrongKey,
}

/// Errors managing keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Key generation or parsing failed.
    #[error("signing key error: {0}")]
    Key(String),
}

/// The `cnf` claim: the session key's certificate thumbprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// base64url SHA-256 of the client certificate (DER).
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

/// Claims of a session token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionClaims {
    /// The gateway's origin.
    pub iss: String,
    /// The user.
    pub sub: String,
    /// Always [`SESSION_AUDIENCE`].
    pub aud: String,
    /// Issued at.
    pub iat: u64,
    /// Expires at.
    pub exp: u64,
    /// Session id.
    pub jti: String,
    /// Binding to the session key.
    pub cnf: Confirmation,
    /// The user's revocation epoch when the session began; a revoke bumps it.
    #[serde(default)]
    pub epoch: u64,
    /// The security key whose touch began the session, for the audit: every request names
    /// the physical key behind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyUsed>,
    /// For a delegated grant's token: who acts on the user's behalf (RFC 8693's `act`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
    /// For a delegated grant's token: what the grant allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dlg: Option<DelegatedScope>,
}

/// The actor of a delegated grant: its label (RFC 8693 `act`, whose `sub` names the actor).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The grant's label.
    pub sub: String,
}

/// What a delegated grant allows, as its token carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelegatedScope {
    /// The grant's id (what a revoke names).
    pub id: String,
    /// The services granted.
    pub services: Vec<String>,
    /// The HTTP methods allowed; empty for any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// The path prefixes allowed; empty for any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// A credential that signed in: its id and its authenticator model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUsed {
    /// The base64url credential id.
    pub cred: String,
    /// The authenticator's AAGUID (its model).
    pub aaguid: String,
}

/// Claims of the identity assertion sent to upstreams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityClaims {
    /// The gateway's origin.
    pub iss: String,
    /// The user.
    pub sub: String,
    /// The service's audience.
    pub aud: String,
    /// The service name.
    pub svc: String,
    /// Issued at.
    pub iat: u64,
    /// Expires at.
    pub exp: u64,
    /// A delegate acting for the user (RFC 8693's `act`: `{"sub": LABEL}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
}

/// The thumbprint of a certificate as used in `cnf`.
pub fn cert_thumbprint(cert_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(cert_der))
}

struct VerifyKey {
    key: DecodingKey,
    jwk: serde_json::Value,
}

/// How old a new signing key must be before it signs: long enough for every replica to have
/// read it from the store (they reload at each change they hear of, and every few seconds),
/// so none ever meets a token signed with a key it does not know yet.
pub const KEY_PUBLISH_SECS: u64 = 120;

/// The keys in use at one time: the one that signs and every one that verifies.
struct KeySet {
    current_kid: String,
    current: EncodingKey,
    verify: HashMap<String, VerifyKey>,
}

/// Signs and verifies the gateway's JWTs. Clones share the keys, which [`TokenSigner::reload`]
/// replaces when the store's change (another replica rotated).
#[derive(Clone)]
pub struct TokenSigner {
    issuer: String,
    keys: Arc<std::sync::RwLock<Arc<KeySet>>>,
}

/// The key that signs among `keys` (newest first): the newest one old enough to be known to
/// every replica ([`KEY_PUBLISH_SECS`]), else the newest (a new store has only one).
fn signing_key(keys: &[StoredSigningKey], now: u64) -> Option<&StoredSigningKey> {
    keys.iter()
        .find(|k| now.saturating_sub(k.created) >= KEY_PUBLISH_SECS)
        .or(keys.first())
}

fn key_set(keys: &[StoredSigningKey]) -> Result<KeySet, KeyError> {
    let mut verify = HashMap::new();
    for k in keys {
        let kp = rcgen::KeyPair::try_from(k.pkcs8.as_slice())
            .map_err(|e| KeyError::Key(e.to_string()))?;
        let raw = kp.public_key_raw();
        if raw.len() != 65 || raw[0] != 4 {
            return Err(KeyError::Key(format!(
                "key {} is not an uncompressed P-256 key",
                k.kid
            )));
        }
        let x = URL_SAFE_NO_PAD.encode(&raw[1..33]);
        let y = URL_SAFE_NO_PAD.encode(&raw[33..]);
        let key =
            DecodingKey::from_ec_components(&x, &y).map_err(|e| KeyError::Key(e.to_string()))?;
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "x": x, "y": y,
            "kid": k.kid, "alg": "ES256", "use": "sig",
        });
        verify.insert(k.kid.clone(), VerifyKey { key, jwk });
    }
    let signing = signing_key(keys, now_secs())
        .ok_or_else(|| KeyError::Key("the store holds no signing key".into()))?;
    Ok(KeySet {
        current_kid: signing.kid.clone(),
        current: EncodingKey::from_ec_der(&signing.pkcs8),
        verify,
    })
}

fn new_key() -> Result<StoredSigningKey, KeyError> {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| KeyError::Key(e.to_string()))?;
    let kid = URL_SAFE_NO_PAD.encode(&Sha256::digest(kp.public_key_raw())[..12]);
    Ok(StoredSigningKey {
        kid,
        pkcs8: kp.serialize_der(),
        created: now_secs(),
    })
}

impl TokenSigner {
    /// Loads the signing keys from the store, making a new one when there is none or when the
    /// newest is older than [`KEY_ROTATION_SECS`] (once, however many replicas start
    /// together). Older keys keep verifying.
    pub fn load(store: &Store, issuer: &str) -> Result<Self, KeyError> {
        let keys = Self::rotated(store)?;
        Ok(Self {
            issuer: issuer.to_owned(),
            keys: Arc::new(std::sync::RwLock::new(Arc::new(key_set(&keys)?))),
        })
    }

    fn rotated(store: &Store) -> Result<Vec<StoredSigningKey>, KeyError> {
        store.signing_keys_rotated::<KeyError>(
            |newest| now_secs().saturating_sub(newest.created) > KEY_ROTATION_SECS,
            new_key,
        )
    }

    /// Makes a new key when the newest is due for rotation (see [`TokenSigner::load`]), then
    /// [`TokenSigner::reload`]s: what a long-running gateway calls now and then.
    pub fn rotate_if_due(&self, store: &Store) -> Result<bool, KeyError> {
        let keys = Self::rotated(store)?;
        self.reload(&keys)
    }

    /// Takes the store's keys (newest first) when they differ from those in use, or when a new
    /// key has become old enough to sign; whether anything changed.
    pub fn reload(&self, keys: &[StoredSigningKey]) -> Result<bool, KeyError> {
        let now = self.current();
        let same_keys =
            keys.len() == now.verify.len() && keys.iter().all(|k| now.verify.contains_key(&k.kid));
        let same_signer = signing_key(keys, now_secs()).is_some_and(|k| k.kid == now.current_kid);
        if same_keys && same_signer {
            return Ok(false);
        }
        let set = Arc::new(key_set(keys)?);
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = set;
        Ok(true)
    }

    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The published verification keys, as a JWK Set.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = self
            .current()
            .verify
            .values()
            .map(|v| v.jwk.clone())
            .collect();
        serde_json::json!({ "keys": keys })
    }

    /// The key id of the current signing key.
    pub fn current_kid(&self) -> String {
        self.current().current_kid.clone()
    }

    fn sign<T: Serialize>(&self, claims: &T) -> Result<String, KeyError> {
        let keys = self.current();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(keys.current_kid.clone());
        jsonwebtoken::encode(&header, claims, &keys.current)
            .map_err(|e| KeyError::Key(e.to_string()))
    }

    /// Issues a session token for `user`, bound to the certificate with `thumbprint`.
    pub fn issue_session(
        &self,
        user: &str,
        thumbprint: &str,
        iat: u64,
        exp: u64,
    ) -> Result<(String, SessionClaims), KeyError> {
        self.issue_session_at_epoch(user, thumbprint, iat, exp, 0, None)
    }

    /// Issues a session token that carries the user's revocation `epoch` and the `key` that
    /// signed in.
    pub fn issue_session_at_epoch(
        &self,
        user: &str,
        thumbprint: &str,
        iat: u64,
        exp: u64,
        epoch: u64,
        key: Option<KeyUsed>,
    ) -> Result<(String, SessionClaims), KeyError> {
        let claims = SessionClaims {
            epoch,
            key,
            act: None,
            dlg: None,
            iss: self.issuer.clone(),
            sub: user.to_owned(),
            aud: SESSION_AUDIENCE.to_owned(),
            iat,
            exp,
            jti: uuid::Uuid::new_v4().to_string(),
            cnf: Confirmation {
                x5t_s256: thumbprint.to_owned(),
            },
        };
        Ok((self.sign(&claims)?, claims))
    }

    /// Verifies a session token presented on a connection whose client certificate has
    /// `thumbprint`.
    pub fn verify_session(
        &self,
        token: &str,
        thumbprint: &str,
    ) -> Result<SessionClaims, TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        if header.alg != Algorithm::ES256 {
            return Err(TokenError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| TokenError::Invalid("no key id".into()))?;
        let keys = self.current();
        let key = keys
            .verify
            .get(&kid)
            .ok_or_else(|| TokenError::Invalid("signed by an unknown or retired key".into()))?;
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&[SESSION_AUDIENCE, DELEGATION_AUDIENCE]);
        v.set_issuer(&[&self.issuer]);
        v.leeway = 0;
        v.set_required_spec_claims(&["exp", "iat", "aud", "iss", "sub"]);
        let data =
            jsonwebtoken::decode::<SessionClaims>(token, &key.key, &v).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                    _ => TokenError::Invalid(e.to_string()),
                }
            })?;
        // jsonwebtoken compares `exp` with a leeway and at second granularity; be exact.
        if data.claims.exp <= now_secs() {
            return Err(TokenError::Expired);
        }
        // Clocks of replicas may differ a little; a token from further in the future is forged
        // or from a broken clock.
        if data.claims.iat > now_secs() + 60 {
            return Err(TokenError::Invalid(
                "issued in the future (not yet valid)".into(),
            ));
        }
        // A grant's token says so twice, in its audience and its scope; either alone is forged.
        if (data.claims.aud == DELEGATION_AUDIENCE) != data.claims.dlg.is_some() {
            return Err(TokenError::Invalid(
                "the audience and the delegated scope disagree".into(),
            ));
        }
        if data.claims.cnf.x5t_s256 != thumbprint {
            return Err(TokenError::WrongKey);
        }
        Ok(data.claims)
    }

    /// Signs the identity assertion that tells an upstream who is calling.
    pub fn identity_assertion(
        &self,
        user: &str,
        service: &str,
        audience: &str,
        delegate: Option<&str>,
    ) -> Result<String, KeyError> {
        let iat = now_secs();
        self.sign(&IdentityClaims {
            iss: self.issuer.clone(),
            sub: user.to_owned(),
            aud: audience.to_owned(),
            svc: service.to_owned(),
            iat,
            exp: iat + ASSERTION_TTL_SECS,
            act: delegate.map(|d| Actor { sub: d.to_owned() }),
        })
    }

    /// Issues the token of a delegated grant `info` (approved by its user with `key`), bound
    /// to the delegate's certificate, carrying the user's revocation `epoch`: revoking or
    /// disabling the user ends the grant too.
    pub fn issue_delegation(
        &self,
        info: &touchgate_proto::DelegationInfo,
        key: KeyUsed,
        epoch: u64,
    ) -> Result<(String, SessionClaims), KeyError> {
        let g = &info.grant;
        let claims = SessionClaims {
            iss: self.issuer.clone(),
            sub: info.user.clone(),
            aud: DELEGATION_AUDIENCE.to_owned(),
            iat: info.created_at,
            exp: g.expires_at,
            jti: info.id.clone(),
            cnf: Confirmation {
                x5t_s256: g.key.clone(),
            },
            epoch,
            key: Some(key),
            act: Some(Actor {
                sub: g.label.clone(),
            }),
            dlg: Some(DelegatedScope {
                id: info.id.clone(),
                services: g.services.clone(),
                methods: g.methods.clone(),
                paths: g.path_prefixes.clone(),
            }),
        };
        Ok((self.sign(&claims)?, claims))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> (tempfile::TempDir, Store, TokenSigner) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("gw.db")).expect("open");
        let signer = TokenSigner::load(&store, "https://gw.test").expect("signer");
        (dir, store, signer)
    }

    #[test]
    fn session_token_verifies_only_with_its_key() {
        let (_d, _s, signer) = signer();
        let now = now_secs();
        let (token, _) = signer
            .issue_session("alice", "thumb-a", now, now + 60)
            .expect("issue");
        let claims = signer.verify_session(&token, "thumb-a").expect("valid");
        assert_eq!(claims.sub, "alice");
        assert_eq!(
            signer.verify_session(&token, "thumb-b"),
            Err(TokenError::WrongKey)
        );
    }

    #[test]
    fn a_grants_token_has_its_own_audience_and_says_so_twice() {
        let (_d, _s, signer) = signer();
        let now = now_secs();
        let info = touchgate_proto::DelegationInfo {
            id: "dlg-0123456789abcdef".into(),
            user: "alice".into(),
            grant: touchgate_proto::Grant {
                label: "bot".into(),
                services: vec!["api".into()],
                methods: vec!["GET".into()],
                path_prefixes: vec![],
                expires_at: now + 600,
                key: "k".into(),
            },
            created_at: now,
            last_used_at: None,
            revoked_at: None,
        };
        let key = KeyUsed {
            cred: "c".into(),
            aaguid: "a".into(),
        };
        let (token, claims) = signer.issue_delegation(&info, key, 0).expect("issue");
        assert_eq!(claims.aud, DELEGATION_AUDIENCE);
        let back = signer.verify_session(&token, "k").expect("valid");
        assert_eq!(
            back.dlg.as_ref().map(|d| d.id.as_str()),
            Some("dlg-0123456789abcdef")
        );
        assert_eq!(back.act.as_ref().map(|a| a.sub.as_str()), Some("bot"));

        // A gateway that knows only sessions (an older replica) refuses it.
        let keys = signer.current();
        let kid = jsonwebtoken::decode_header(&token)
            .expect("header")
            .kid
            .expect("kid");
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&[SESSION_AUDIENCE]);
        v.set_issuer(&["https://gw.test"]);
        let old = jsonwebtoken::decode::<serde_json::Value>(&token, &keys.verify[&kid].key, &v);
        assert!(old.is_err(), "an older gateway took a grant's token");

        // A scope under the session audience, or the grant audience without a scope, is forged.
        let forged = SessionClaims {
            aud: SESSION_AUDIENCE.into(),
            ..claims.clone()
        };
        let t = signer.sign(&forged).expect("sign");
        assert!(matches!(
            signer.verify_session(&t, "k"),
            Err(TokenError::Invalid(_))
        ));
        let forged = SessionClaims {
            dlg: None,
            ..claims
        };
        let t = signer.sign(&forged).expect("sign");
        assert!(matches!(
            signer.verify_session(&t, "k"),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn expired_session_token_is_refused() {
        let (_d, _s, signer) = signer();
        let now = now_secs();
        let (token, _) = signer
            .issue_session("alice", "t", now - 20, now - 10)
            .expect("issue");
        assert_eq!(signer.verify_session(&token, "t"), Err(TokenError::Expired));
    }

    #[test]
    fn tampered_token_is_refused() {
        let (_d, _s, signer) = signer();
        let now = now_secs();
        let (token, _) = signer
            .issue_session("alice", "t", now, now + 60)
            .expect("issue");
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let forged = serde_json::json!({
            "iss": "https://gw.test", "sub": "root", "aud": SESSION_AUDIENCE,
            "iat": now, "exp": now + 60, "jti": "x", "cnf": {"x5t#S256": "t"}
        });
        parts[1] = URL_SAFE_NO_PAD.encode(forged.to_string());
        let err = signer
            .verify_session(&parts.join("."), "t")
            .expect_err("forged");
        assert!(matches!(err, TokenError::Invalid(_)), "{err:?}");
    }

    fn header_and_claims(token: &str) -> (serde_json::Value, String, String) {
        let parts: Vec<&str> = token.split('.').collect();
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).expect("b64")).expect("json");
        (header, parts[1].to_owned(), parts[2].to_owned())
    }

    #[test]
    fn unknown_kid_is_refused() {
        let (_d, _s, signer) = signer();
        let now = now_secs();
        let (token, _) = signer
            .issue_session("alice", "t", now, now + 60)
            .expect("issue");
        let (mut header, claims, sig) = header_and_claims(&token);
        header["kid"] = "someone-elses-key".into();
        let forged = format!(
            "{}.{claims}.{sig}",
            URL_SAFE_NO_PAD.encode(header.to_string())
        );
        let err = signer
            .verify_session(&forged, "t")
            .expect_err("unknown kid");
        assert_eq!(
            err,
            TokenError::Invalid("signed by an unknown or retired key".into())
        );
    }

    #[test]
    fn alg_confusion_with_hmac_over_the_public_key_is_refused() {
        let (_d, _s, signer) = signer();
        let now = now_secs();
        let claims = serde_json::json!({
            "iss": "https://gw.test", "sub": "root", "aud": SESSION_AUDIENCE,
            "iat": now, "exp": now + 60, "jti": "x", "cnf": {"x5t#S256": "t"}
        });
        let public = signer.jwks().to_string();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(signer.current_kid().to_owned());
        let forged = jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(public.as_bytes()),
        )
        .expect("hmac token");
        let err = signer
            .verify_session(&forged, "t")
            .expect_err("alg confusion");
        assert!(
            matches!(err, TokenError::Invalid(ref m) if m.contains("not accepted")),
            "{err:?}"
        );
    }

    #[test]
    fn token_of_a_key_rotated_out_is_refused() {
        let (_d1, _s1, old) = signer();
        let (_d2, _s2, new) = signer();
        let now = now_secs();
        let (token, _) = old
            .issue_session("alice", "t", now, now + 60)
            .expect("issue");
        assert!(matches!(
            new.verify_session(&token, "t"),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn token_not_yet_valid_is_refused() {
        let (_d, _s, signer) = signer();
        let now = now_secs();
        let (token, _) = signer
            .issue_session("alice", "t", now + 3600, now + 7200)
            .expect("issue");
        let err = signer.verify_session(&token, "t").expect_err("future");
        assert!(
            matches!(err, TokenError::Invalid(ref m) if m.contains("not yet valid")),
            "{err:?}"
        );
    }

    #[test]
    fn keys_survive_restart_and_are_published() {
        let (_d, store, signer) = signer();
        let now = now_secs();
        let (token, _) = signer
            .issue_session("alice", "t", now, now + 60)
            .expect("issue");
        let again = TokenSigner::load(&store, "https://gw.test").expect("reload");
        assert_eq!(again.current_kid(), signer.current_kid());
        again
            .verify_session(&token, "t")
            .expect("still valid after reload");
        let jwks = again.jwks();
        assert_eq!(jwks["keys"][0]["kid"], signer.current_kid());
        assert_eq!(jwks["keys"][0]["alg"], "ES256");
    }

    #[test]
    fn a_key_signs_only_once_every_replica_can_know_it() {
        let key = |kid: &str, age: u64| StoredSigningKey {
            kid: kid.into(),
            pkcs8: Vec::new(),
            created: 1_000_000 - age,
        };
        let keys = [key("new", 30), key("old", 8 * 24 * 3600)];
        assert_eq!(
            signing_key(&keys, 1_000_000).map(|k| k.kid.as_str()),
            Some("old")
        );
        let keys = [key("new", KEY_PUBLISH_SECS), key("old", 8 * 24 * 3600)];
        assert_eq!(
            signing_key(&keys, 1_000_000).map(|k| k.kid.as_str()),
            Some("new")
        );
        let keys = [key("only", 0)];
        assert_eq!(
            signing_key(&keys, 1_000_000).map(|k| k.kid.as_str()),
            Some("only")
        );
    }

    /// Another replica rotated: this one takes the new key from the store, signs with it once
    /// it is old enough, and keeps verifying the tokens of the old one.
    #[test]
    fn a_key_rotated_by_another_replica_is_taken_from_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("gw.db")).expect("open");
        let now = now_secs();
        let mut first = new_key().expect("key");
        first.created = now - 3 * 24 * 3600;
        store.add_signing_key(&first).expect("add");
        let signer = TokenSigner::load(&store, "https://gw.test").expect("signer");
        let (old_token, _) = signer
            .issue_session("alice", "t", now, now + 60)
            .expect("issue");
        let old_kid = signer.current_kid();
        let fresh = new_key().expect("key");
        store.add_signing_key(&fresh).expect("add");
        let keys = store.signing_keys().expect("keys");
        assert!(
            signer.reload(&keys).expect("reload"),
            "a new key to verify with"
        );
        assert_eq!(signer.current_kid(), old_kid, "too new to sign yet");
        assert!(!signer.reload(&keys).expect("again"), "nothing changed");

        let mut later = new_key().expect("key");
        later.created = now - KEY_PUBLISH_SECS - 1;
        store.add_signing_key(&later).expect("add");
        let keys = store.signing_keys().expect("keys");
        assert!(signer.reload(&keys).expect("reload"));
        // The newest key old enough to be known everywhere signs.
        assert_eq!(signer.current_kid(), later.kid);
        signer
            .verify_session(&old_token, "t")
            .expect("the old key still verifies");
        let (token, _) = signer
            .issue_session("alice", "t", now, now + 60)
            .expect("issue");
        let other = TokenSigner::load(&store, "https://gw.test").expect("another replica");
        other
            .verify_session(&token, "t")
            .expect("every replica verifies it");
    }
}

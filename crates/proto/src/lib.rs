//! The touchgate wire protocol: message types and length-prefixed framing.
//!
//! This crate is the only place that knows the wire format. It does no IO: callers read a
//! [`FRAME_HEADER_LEN`]-byte header, ask [`frame_len`] how long the body is, read that many bytes
//! and hand them to [`decode`]. Writers call [`encode`].
//!
//! One QUIC connection carries:
//! - a **control stream** (the first bidirectional stream the agent opens), carrying
//!   [`ClientMsg`] frames from the agent and [`ServerMsg`] frames from the gateway: enrolment,
//!   sign-in, and resuming a session on a new connection;
//! - one **data stream** per local TCP connection: the agent sends one [`StreamOpen`] frame, the
//!   gateway answers one [`StreamReply`] frame, and after an accept the stream carries the
//!   application's bytes unchanged.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// ALPN protocol id of touchgate's QUIC tunnel.
pub const ALPN: &[u8] = b"touchgate/1";

/// Label of the TLS exporter that binds a WebAuthn assertion to one QUIC connection.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-touchgate-channel-binding";

/// Length in bytes of the channel-binding exporter value.
pub const EXPORTER_LEN: usize = 32;

/// Name of the `clientDataJSON` member that carries the channel binding (base64url, no padding).
pub const CLIENT_DATA_BINDING_KEY: &str = "touchgateBinding";

/// QUIC application close codes, so each end can tell why the other closed a connection
/// without reading its words.
pub mod close {
    /// The agent is quitting, or ending a connection it no longer needs.
    pub const AGENT_DONE: u32 = 0;
    /// The connection cannot be used: no client certificate, no keying material.
    pub const UNUSABLE: u32 = 1;
    /// An admin ended the user's sessions (`touchgate-gateway revoke`).
    pub const SESSION_REVOKED: u32 = 2;
    /// The session expired or was idle too long.
    pub const SESSION_ENDED: u32 = 3;
    /// No sign-in within the gateway's sign-in deadline.
    pub const NO_SIGN_IN: u32 = 4;
    /// An admin disabled the user's account: signing in again will not help.
    pub const ACCOUNT_DISABLED: u32 = 5;
    /// The gateway is shutting down.
    pub const GATEWAY_SHUTDOWN: u32 = 6;
}

/// Size of a frame header: a big-endian `u32` body length.
pub const FRAME_HEADER_LEN: usize = 4;

/// Largest frame body accepted by default (64 KiB): ample for WebAuthn payloads.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Errors from decoding a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The header announced a body larger than the limit.
    #[error("frame of {len} bytes is larger than the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit in force.
        max: usize,
    },
    /// The header announced an empty body.
    #[error("empty frame")]
    Empty,
    /// The body is not a valid message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Encodes one message as a frame: 4-byte big-endian length, then the JSON body.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising these plain data types cannot fail: no maps with non-string keys, no
    // fallible Serialize impls.
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Reads a frame header and returns the body length, refusing bodies above `max`.
pub fn frame_len(header: [u8; FRAME_HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes a frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(body)?)
}

/// A message from the agent on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// Start enrolling a new authenticator with a one-time invite code.
    EnrollBegin {
        /// The user the invite was made for.
        user: String,
        /// The invite code an admin handed out.
        invite_code: String,
        /// For software keys only: the key's own attestation CA (PEM), which the gateway trusts
        /// for the software AAGUID only, and only when its policy allows software keys.
        #[serde(default)]
        software_ca_pem: Option<String>,
    },
    /// The authenticator's answer to [`ServerMsg::EnrollChallenge`].
    EnrollFinish {
        /// A WebAuthn `RegisterPublicKeyCredential`, as JSON.
        credential: serde_json::Value,
    },
    /// Start signing in.
    LoginBegin {
        /// The user signing in.
        user: String,
    },
    /// The authenticator's answer to [`ServerMsg::LoginChallenge`].
    LoginFinish {
        /// A WebAuthn `PublicKeyCredential`, as JSON.
        credential: serde_json::Value,
    },
    /// Ask how to enrol through the organisation's identity provider; the gateway answers
    /// [`ServerMsg::IdpStart`] with a nonce for this connection only.
    IdpBegin,
    /// Start enrolling with the authorization code the browser brought back from the
    /// provider (the gateway redeems it and checks the ID token against this connection's
    /// nonce); the answer is [`ServerMsg::EnrollChallenge`] for the identity it names.
    EnrollWithIdp {
        /// The authorization code.
        code: String,
        /// The PKCE verifier the agent made for this sign-in.
        code_verifier: String,
        /// The loopback redirect URI the browser was sent back to.
        redirect_uri: String,
        /// As in [`ClientMsg::EnrollBegin`].
        #[serde(default)]
        software_ca_pem: Option<String>,
    },
    /// Start enrolling through the identity provider on a machine without a browser (RFC 8628):
    /// the gateway answers [`ServerMsg::DeviceCode`] for the user to enter elsewhere.
    EnrollWithDevice {
        /// As in [`ClientMsg::EnrollBegin`].
        #[serde(default)]
        software_ca_pem: Option<String>,
    },
    /// Has the user finished at the provider? The answer is [`ServerMsg::DevicePending`] or
    /// the registration challenge ([`ServerMsg::EnrollChallenge`]).
    DevicePoll,
    /// After [`RefusalCode::IdpCheckNeeded`]: the code of a fresh sign-in with the identity
    /// provider (with this connection's nonce, from [`ClientMsg::IdpBegin`]); the gateway
    /// checks it names the same account and issues the session the key already earned.
    IdpRecheck {
        /// The authorization code.
        code: String,
        /// The PKCE verifier.
        code_verifier: String,
        /// The loopback redirect URI.
        redirect_uri: String,
    },
    /// Present an existing session token on a new connection (reconnect, no new touch).
    Resume {
        /// The session token issued earlier.
        token: String,
    },
    /// Ask for a delegated grant of `user`'s access: the gateway checks the scope against its
    /// policy and answers [`ServerMsg::LoginChallenge`]; the key's assertion must carry the
    /// binding [`Grant::binding`] makes for this connection, so what is touched is what is
    /// granted.
    DelegateBegin {
        /// The user approving the grant.
        user: String,
        /// What is granted, to which key.
        grant: Grant,
    },
    /// The key's answer to the delegation's challenge; the answer is [`ServerMsg::Delegated`].
    DelegateFinish {
        /// A WebAuthn `PublicKeyCredential`, as JSON.
        credential: serde_json::Value,
    },
    /// List the signed-in user's delegated grants ([`ServerMsg::Delegations`]). Needs the
    /// user's own session on this connection (not a delegated one).
    ListDelegations,
    /// End one of the signed-in user's grants, by id or label ([`ServerMsg::DelegationRevoked`]).
    RevokeDelegation {
        /// The grant's id, or its label.
        id: String,
    },
}

/// A delegated grant's scope, as asked for and as recorded: which services, which methods and
/// path prefixes (HTTP services; empty for any), until when, for whom (`label`), and to which
/// key (`key`: the `x5t#S256` thumbprint of the delegate's certificate, whose connection alone
/// can use the grant).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Who the grant is for, in words ("ci-nightly", "coding-assistant").
    pub label: String,
    /// The services granted.
    pub services: Vec<String>,
    /// The HTTP methods allowed, upper case; empty for any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// The path prefixes allowed (each starting with `/`); empty for any.
    #[serde(default)]
    pub path_prefixes: Vec<String>,
    /// Expiry, in seconds since the Unix epoch.
    pub expires_at: u64,
    /// The delegate's certificate thumbprint (`x5t#S256`, base64url of SHA-256 of its DER).
    pub key: String,
}

impl Grant {
    /// The same grant in one canonical form: methods upper case, every list sorted and without
    /// duplicates. Both ends bind and compare this form.
    pub fn normalised(&self) -> Self {
        fn tidy(v: &[String], f: impl Fn(&str) -> String) -> Vec<String> {
            let mut v: Vec<String> = v.iter().map(|s| f(s.trim())).collect();
            v.sort();
            v.dedup();
            v
        }
        Self {
            label: self.label.trim().to_owned(),
            services: tidy(&self.services, str::to_owned),
            methods: tidy(&self.methods, str::to_ascii_uppercase),
            path_prefixes: tidy(&self.path_prefixes, str::to_owned),
            expires_at: self.expires_at,
            key: self.key.clone(),
        }
    }

    /// The channel binding a delegation's assertion carries in `clientDataJSON` instead of the
    /// bare exporter: SHA-256 over a label, the connection's exporter and the canonical grant,
    /// so the key's signature covers the scope and is good on this connection only.
    pub fn binding(&self, exporter: &[u8]) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        let grant = serde_json::to_vec(&self.normalised()).unwrap_or_default();
        let mut h = Sha256::new();
        h.update(b"touchgate-delegation\0");
        h.update((exporter.len() as u32).to_be_bytes());
        h.update(exporter);
        h.update(&grant);
        h.finalize().to_vec()
    }
}

/// A delegated grant as the gateway keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelegationInfo {
    /// The grant's id.
    pub id: String,
    /// The user who approved it.
    pub user: String,
    /// Its scope.
    pub grant: Grant,
    /// When it was made, seconds since the Unix epoch.
    pub created_at: u64,
    /// When a delegate last used it, if ever.
    #[serde(default)]
    pub last_used_at: Option<u64>,
    /// When it was revoked, if it was.
    #[serde(default)]
    pub revoked_at: Option<u64>,
}

/// A message from the gateway on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// WebAuthn creation options (`CreationChallengeResponse`, as JSON) and the origin to use.
    EnrollChallenge {
        /// The creation options.
        options: serde_json::Value,
        /// The origin the agent must put in `clientDataJSON`.
        origin: String,
    },
    /// Enrolment succeeded.
    Enrolled {
        /// The new credential's id (base64url).
        credential_id: String,
    },
    /// WebAuthn request options (`RequestChallengeResponse`, as JSON) and the origin to use.
    LoginChallenge {
        /// The request options.
        options: serde_json::Value,
        /// The origin the agent must put in `clientDataJSON`.
        origin: String,
    },
    /// How to sign in with the organisation's identity provider.
    IdpStart {
        /// The provider as users know it.
        name: String,
        /// Where the browser goes.
        authorization_endpoint: String,
        /// The gateway's client id there.
        client_id: String,
        /// The scopes to ask for.
        scopes: Vec<String>,
        /// The nonce the ID token must carry: made for this connection.
        nonce: String,
    },
    /// Where the user signs in for a device enrolment, and the code to enter there.
    DeviceCode {
        /// The provider as users know it.
        name: String,
        /// The page to open on any device.
        verification_uri: String,
        /// The same page with the code filled in, if the provider has one.
        verification_uri_complete: Option<String>,
        /// The code to enter.
        user_code: String,
        /// Seconds until the code expires.
        expires_in: u64,
        /// Seconds to wait between polls.
        interval: u64,
    },
    /// The user has not finished at the provider yet: poll again after `interval` seconds.
    DevicePending {
        /// Seconds to wait.
        interval: u64,
    },
    /// A session is live on this connection.
    Session(SessionInfo),
    /// The delegated grant is made: its token, good only with the grant's key, until its
    /// expiry.
    Delegated {
        /// The grant as recorded.
        info: DelegationInfo,
        /// The delegation token (presented with [`ClientMsg::Resume`] by the delegate).
        token: String,
        /// The services granted, with their kinds.
        services: Vec<ServiceInfo>,
    },
    /// The signed-in user's grants, live and recently ended.
    Delegations {
        /// The grants, newest first.
        grants: Vec<DelegationInfo>,
    },
    /// The grant is revoked: its delegate's connections close within seconds.
    DelegationRevoked {
        /// The grant's id.
        id: String,
    },
    /// The request was refused.
    Error(Refusal),
}

/// A live session, as told to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The session token, valid only together with this agent's session key.
    pub token: String,
    /// The signed-in user.
    pub user: String,
    /// Expiry, in seconds since the Unix epoch.
    pub expires_at: u64,
    /// Services this user may reach.
    pub services: Vec<ServiceInfo>,
}

/// A service offered to the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Service name, as in the gateway's config.
    pub name: String,
    /// What the stream carries.
    pub kind: ServiceKind,
}

/// What a service's streams carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceKind {
    /// HTTP/1.1 or h2, proxied by the gateway.
    Http,
    /// Raw bytes spliced to `host:port`.
    Tcp,
}

/// The first frame on a data stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOpen {
    /// The service this stream is for.
    pub service: String,
    /// Who may use the agent's local port from a browser (HTTP services: `Host`, `Origin`,
    /// `Sec-Fetch-Site`; TCP services: a first HTTP request head). Absent from older agents:
    /// the gateway then applies the defaults with the port taken from `Host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalAccess>,
}

/// The agent's local port of a service and the browser access its user allowed on it. The
/// gateway enforces it, because it is the end that parses HTTP; requests it refuses never
/// reach the upstream and are audited.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LocalAccess {
    /// The local TCP port the agent serves the service on.
    pub port: u16,
    /// Host names besides loopback ones (`127.0.0.1`, `[::1]`, `localhost`, `*.localhost`)
    /// accepted in `Host` / `:authority`, with or without a port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
    /// Origins besides the port's own (`http://127.0.0.1:PORT`, `http://localhost:PORT`)
    /// allowed to call the service from a browser, e.g. `http://localhost:3000`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
    /// Set when the stream came in on the agent's by-name port (`router_port`) for
    /// `http://NAME.localhost:PORT/`: the name (`NAME.localhost`, lower case) every request's
    /// `Host` must carry, and the host of the port's own origin. Another name on the same
    /// connection would be another service; plain loopback names are not this service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_host: Option<String>,
}

/// The gateway's answer to [`StreamOpen`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamReply {
    /// The stream is connected to the service; application bytes follow.
    Accepted,
    /// The stream is refused; the gateway closes it.
    Refused(Refusal),
}

/// A refusal: a machine-readable code and a message for the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// What went wrong, for programs.
    pub code: RefusalCode,
    /// What went wrong and what to do, for people.
    pub message: String,
}

impl Refusal {
    /// Builds a refusal.
    pub fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Machine-readable refusal codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// The frame could not be decoded or was not expected now.
    BadRequest,
    /// The invite code is unknown, used or expired.
    InvalidInvite,
    /// The authenticator's attestation is not trusted by the gateway's policy.
    AttestationRefused,
    /// The user has no enrolled credential.
    NotEnrolled,
    /// The WebAuthn assertion or attestation did not verify.
    VerificationFailed,
    /// No valid challenge for this response (missing, used or expired).
    ChallengeExpired,
    /// The assertion was made for another connection.
    BindingMismatch,
    /// The signature counter did not rise: the credential may be cloned.
    CounterNotRising,
    /// The session token is invalid.
    InvalidToken,
    /// The session token has expired or the session was idle too long.
    SessionExpired,
    /// The session token belongs to another session key.
    WrongSessionKey,
    /// An admin ended the user's sessions.
    SessionRevoked,
    /// An admin disabled the user's account: no sign-in until an admin enables it again.
    AccountDisabled,
    /// Too many attempts; wait and try again.
    RateLimited,
    /// A data stream was opened before a session was established.
    Unauthenticated,
    /// The service is not configured on the gateway.
    UnknownService,
    /// The user may not use this service.
    Forbidden,
    /// The upstream could not be reached.
    UpstreamUnavailable,
    /// Something failed inside the gateway.
    Internal,
    /// The organisation's identity provider refused the sign-in, or its identity is not one
    /// this gateway takes.
    IdpRefused,
    /// The key's answer verified, but the last check with the organisation's identity
    /// provider is older than the gateway allows: sign in there again on this connection
    /// ([`ClientMsg::IdpRecheck`]).
    IdpCheckNeeded,
    /// This gateway has no identity provider: enrol with an invite.
    NoIdentityProvider,
    /// The delegated grant does not allow this (service, method, path, or delegating at all).
    DelegationRefused,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: T) {
        let frame = encode(&msg);
        let mut header = [0u8; FRAME_HEADER_LEN];
        header.copy_from_slice(&frame[..FRAME_HEADER_LEN]);
        let len = frame_len(header, MAX_FRAME_LEN).expect("length within limit");
        assert_eq!(len, frame.len() - FRAME_HEADER_LEN);
        let back: T = decode(&frame[FRAME_HEADER_LEN..]).expect("decodes");
        assert_eq!(back, msg);
    }

    #[test]
    fn every_message_kind_round_trips() {
        roundtrip(ClientMsg::EnrollBegin {
            user: "alice@corp".into(),
            invite_code: "abc".into(),
            software_ca_pem: None,
        });
        roundtrip(ClientMsg::Resume { token: "t".into() });
        roundtrip(ServerMsg::Session(SessionInfo {
            token: "t".into(),
            user: "alice".into(),
            expires_at: 17,
            services: vec![ServiceInfo {
                name: "api".into(),
                kind: ServiceKind::Http,
            }],
        }));
        roundtrip(ServerMsg::Error(Refusal::new(RefusalCode::Forbidden, "no")));
        roundtrip(StreamOpen {
            service: "api".into(),
            local: None,
        });
        roundtrip(StreamOpen {
            service: "api".into(),
            local: Some(LocalAccess {
                port: 8081,
                allowed_hosts: vec!["api.dev.test".into()],
                allowed_origins: vec!["http://localhost:3000".into()],
                name_host: Some("api.localhost".into()),
            }),
        });
        roundtrip(StreamReply::Refused(Refusal::new(
            RefusalCode::UnknownService,
            "unknown service",
        )));
        roundtrip(StreamReply::Accepted);
    }

    #[test]
    fn oversized_frame_header_is_refused() {
        let header = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(
            frame_len(header, MAX_FRAME_LEN),
            Err(FrameError::TooLarge { len, .. }) if len == MAX_FRAME_LEN + 1
        ));
    }

    #[test]
    fn empty_frame_is_refused() {
        assert!(matches!(
            frame_len([0; 4], MAX_FRAME_LEN),
            Err(FrameError::Empty)
        ));
    }

    #[test]
    fn malformed_body_is_a_typed_error() {
        let err = decode::<ClientMsg>(b"{\"type\":\"launch_missiles\"}").expect_err("unknown type");
        assert!(matches!(err, FrameError::Malformed(_)));
        let err = decode::<StreamOpen>(b"\xff\xfe").expect_err("not json");
        assert!(err.to_string().starts_with("malformed frame"));
    }
}

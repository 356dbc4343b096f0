//! Everything that can stop the proxy from forwarding a request, with the status the caller
//! gets and how it is counted and audited.

use http::StatusCode;

use crate::{audit::AuditKind, browser::BrowserRefusal};

/// Why a request was answered by the gateway instead of the upstream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// A browser made the request for another site, or with a rebound host name.
    #[error("{}", .refusal.message(.service))]
    Browser {
        /// The service.
        service: String,
        /// What was refused, and the setting that would allow it.
        refusal: BrowserRefusal,
    },
    /// The request's path could step out of the service's base path.
    #[error("touchgate: {0}")]
    BadPath(String),
    /// The delegated grant the request came under does not allow it.
    #[error("touchgate: the grant {label:?} does not allow this: {why}")]
    Delegation {
        /// The grant's label.
        label: String,
        /// What it does not allow, and what it does.
        why: String,
    },
    /// The service's upstream URL is not usable (a config error).
    #[error("touchgate: {0}")]
    BadUpstream(String),
    /// No Google ID token could be had for the service's audience.
    #[error("touchgate: cannot get an ID token for service {service}: {reason}")]
    IdToken {
        /// The service.
        service: String,
        /// Why.
        reason: String,
    },
    /// The identity assertion could not be signed.
    #[error("touchgate: cannot sign the identity assertion: {0}")]
    Assertion(String),
    /// The upstream could not be reached, or failed before answering.
    #[error("touchgate: service {service} is unreachable: {detail}")]
    Unreachable {
        /// The service.
        service: String,
        /// What the connection said.
        detail: String,
    },
    /// The upstream did not start answering in time.
    #[error("touchgate: service {service} did not answer within {}", humantime::format_duration(*.timeout))]
    Timeout {
        /// The service.
        service: String,
        /// The service's `timeout`.
        timeout: std::time::Duration,
    },
}

impl ProxyError {
    /// The status the caller gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Browser { .. } | Self::Delegation { .. } => StatusCode::FORBIDDEN,
            Self::BadPath(_) => StatusCode::BAD_REQUEST,
            Self::Assertion(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::BadUpstream(_) | Self::IdToken { .. } | Self::Unreachable { .. } => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// The audit event it is written as.
    pub fn event(&self) -> AuditKind {
        match self {
            Self::Browser { .. } => AuditKind::BrowserRequestRefused,
            Self::BadPath(_) => AuditKind::RequestRefused,
            Self::Delegation { .. } => AuditKind::DelegationRefused,
            _ => AuditKind::UpstreamError,
        }
    }

    /// Whether the caller (or a page in its browser) caused it, rather than the gateway or
    /// the upstream: such lines are limited per source.
    pub fn caused_by_caller(&self) -> bool {
        matches!(
            self,
            Self::Browser { .. } | Self::BadPath(_) | Self::Delegation { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_its_status_and_words() {
        let e = ProxyError::Timeout {
            service: "api".into(),
            timeout: std::time::Duration::from_secs(60),
        };
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            e.to_string(),
            "touchgate: service api did not answer within 1m"
        );
        let e = ProxyError::Assertion("no key".into());
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.event(), AuditKind::UpstreamError);
        let e = ProxyError::Browser {
            service: "api".into(),
            refusal: BrowserRefusal {
                what: "Origin \"https://evil.example\" is another site".into(),
                setting: Some("allowed_origins"),
            },
        };
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert!(e.to_string().contains("allowed_origins"));
        assert!(e.caused_by_caller());
    }
}

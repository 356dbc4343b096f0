//! Why a request failed, as a kind a front end can match and words for the user. The window
//! receives it as `{ kind, message }` (see the TypeScript bindings), so it checks a kind, never
//! the words.

use serde::{Serialize, Serializer};
use ts_rs::TS;

/// A request that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControllerError {
    /// The user cancelled the wait for the key (or signed out meanwhile).
    #[error("cancelled")]
    Cancelled,
    /// Another request is waiting for the key.
    #[error("already waiting for the key: touch it, or cancel first")]
    Busy,
    /// The settings cannot be used yet; the words say what is missing.
    #[error("{problem}")]
    NotConfigured {
        /// What is wrong, in words.
        problem: String,
    },
    /// The gateway refused the user because an admin disabled the account.
    #[error("{reason}")]
    AccountDisabled {
        /// The gateway's words.
        reason: String,
    },
    /// A PIN came while the key was not asking for one.
    #[error("the key is not asking for a PIN now")]
    NoPinAsked,
    /// An enrolment without an invite code.
    #[error("enter the invite code your admin sent you")]
    NoInviteCode,
    /// A port change for a service the settings do not have.
    #[error("there is no service named {service:?} in your settings")]
    UnknownService {
        /// The name asked for.
        service: String,
    },
    /// Grants are made, listed and revoked on a live session.
    #[error("sign in first: grants are made and listed on your live session")]
    NotSignedIn,
    /// A grant the delegate window asked for cannot be made; the words say why.
    #[error("{problem}")]
    BadGrant {
        /// What is wrong, in words.
        problem: String,
    },
    /// The settings were not saved (a locked key, an unusable value, a file that cannot be
    /// written); the words say which.
    #[error("{message}")]
    NotSaved {
        /// What happened, in words.
        message: String,
    },
    /// Sign-in, renewal or enrolment failed, or the front end asked for something it may not
    /// (a URL that is not a live service's).
    #[error("{message}")]
    Failed {
        /// What happened and what to do, in words.
        message: String,
    },
}

/// The kind of a [`ControllerError`], as the window matches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, TS)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`ControllerError::Cancelled`].
    Cancelled,
    /// [`ControllerError::Busy`].
    Busy,
    /// [`ControllerError::NotConfigured`].
    NotConfigured,
    /// [`ControllerError::AccountDisabled`].
    AccountDisabled,
    /// [`ControllerError::NoPinAsked`].
    NoPinAsked,
    /// [`ControllerError::NoInviteCode`].
    NoInviteCode,
    /// [`ControllerError::UnknownService`].
    UnknownService,
    /// [`ControllerError::NotSignedIn`].
    NotSignedIn,
    /// [`ControllerError::BadGrant`].
    BadGrant,
    /// [`ControllerError::NotSaved`].
    NotSaved,
    /// [`ControllerError::Failed`].
    Failed,
}

impl ControllerError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Cancelled => ErrorKind::Cancelled,
            Self::Busy => ErrorKind::Busy,
            Self::NotConfigured { .. } => ErrorKind::NotConfigured,
            Self::AccountDisabled { .. } => ErrorKind::AccountDisabled,
            Self::NoPinAsked => ErrorKind::NoPinAsked,
            Self::NoInviteCode => ErrorKind::NoInviteCode,
            Self::UnknownService { .. } => ErrorKind::UnknownService,
            Self::NotSignedIn => ErrorKind::NotSignedIn,
            Self::BadGrant { .. } => ErrorKind::BadGrant,
            Self::NotSaved { .. } => ErrorKind::NotSaved,
            Self::Failed { .. } => ErrorKind::Failed,
        }
    }

    /// [`ControllerError::Failed`] with `e`'s words.
    pub fn failed(e: impl std::fmt::Display) -> Self {
        Self::Failed {
            message: e.to_string(),
        }
    }

    /// What the window receives.
    pub fn wire(&self) -> WireError {
        WireError {
            kind: self.kind(),
            message: self.to_string(),
        }
    }
}

/// A [`ControllerError`] as the window receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS)]
#[ts(rename = "ControllerError")]
pub struct WireError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What happened and what to do, in words.
    pub message: String,
}

impl Serialize for ControllerError {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.wire().serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_reaches_the_window_as_kind_and_message() {
        let json = serde_json::to_value(ControllerError::Cancelled).expect("json");
        assert_eq!(
            json,
            serde_json::json!({ "kind": "cancelled", "message": "cancelled" })
        );
        let e = ControllerError::NotSaved {
            message: "gateway is set by your organisation and cannot be changed here".into(),
        };
        let json = serde_json::to_value(&e).expect("json");
        assert_eq!(json["kind"], "not_saved");
        assert_eq!(json["message"], e.to_string());
    }
}

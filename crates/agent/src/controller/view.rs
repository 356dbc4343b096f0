//! What crosses the seam between the controller and a front end: the [`Request`]s a front end
//! sends, the [`View`] it draws and the [`Notice`]s it tells the user, each with its words. The
//! words are written here once; the front ends show them and do not word the state again.

use serde::{Deserialize, Serialize};
use ts_rs::TS;

use crate::settings::Settings;

/// What a front end asks the controller to do.
#[derive(Clone, Deserialize, Serialize, TS)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Request {
    /// Sign in with a touch and serve every service on its local port.
    SignIn,
    /// Renew the session with a touch, keeping every connection open.
    Renew,
    /// Close the tunnel and every local port.
    SignOut,
    /// Stop waiting for a touch or a PIN.
    Cancel,
    /// The PIN the key asked for.
    SubmitPin {
        /// The PIN (never logged).
        pin: String,
    },
    /// Enrol the configured key with an invite code.
    Enrol {
        /// The code from the admin.
        code: String,
    },
    /// Enrol the configured key by signing in with the organisation's identity provider in
    /// the browser (gateways with `[oidc]`).
    EnrolWithOrganisation,
    /// Ask the gateway whether it enrols through an identity provider, and its name
    /// ([`View::organisation`]).
    FindOrganisation,
    /// Change one service's local port.
    SetServicePort {
        /// The service.
        service: String,
        /// The new port on 127.0.0.1.
        port: u16,
    },
    /// Save the settings window.
    SaveSettings {
        /// The new values.
        settings: Settings,
    },
    /// Grant a delegate (a script, a CI job, an AI agent) narrow access to the user's
    /// services with a touch, on the live session; the grant's file is written to the grants
    /// folder ([`View::granted`]).
    Delegate {
        /// What to grant.
        grant: GrantForm,
    },
    /// Ask the gateway for the user's live grants ([`View::delegations`]); no touch.
    ListDelegations,
    /// End one of the user's grants within seconds; no touch.
    RevokeDelegation {
        /// The grant's id.
        id: String,
    },
}

/// A grant as the delegate window asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, TS)]
pub struct GrantForm {
    /// Who it is for, in words ("nightly CI", "coding assistant").
    pub label: String,
    /// The services.
    pub services: Vec<String>,
    /// HTTP methods (empty: any).
    pub methods: Vec<String>,
    /// Path prefixes, such as `/v1/` (empty: any path).
    pub path_prefixes: Vec<String>,
    /// How long it lasts, in minutes (the gateway caps it).
    pub minutes: u32,
    /// The delegate's certificate (PEM), for a key held elsewhere; empty: a key is made here
    /// and goes into the grant's file.
    #[serde(default)]
    pub certificate: String,
}

/// One of the user's live grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, TS)]
pub struct GrantView {
    /// The grant's id (`dlg-…`).
    pub id: String,
    /// Who it is for.
    pub label: String,
    /// What it allows, in words: `api, billing · GET, HEAD · paths /v1/`.
    pub scope: String,
    /// When it ends, seconds since the epoch.
    #[ts(type = "number")]
    pub expires_at: u64,
    /// How long it has left, in words (kept current like the session's).
    pub time_left: String,
    /// When a delegate last used it, seconds since the epoch.
    #[ts(type = "number | null")]
    pub last_used_at: Option<u64>,
}

impl GrantView {
    /// The view of a grant the gateway listed.
    pub fn of(d: &touchgate_proto::DelegationInfo) -> Self {
        let g = &d.grant;
        let or_any = |v: &[String], any: &str| {
            if v.is_empty() {
                any.to_owned()
            } else {
                v.join(", ")
            }
        };
        let paths = if g.path_prefixes.is_empty() {
            "any path".to_owned()
        } else {
            format!("paths {}", g.path_prefixes.join(", "))
        };
        Self {
            id: d.id.clone(),
            label: g.label.clone(),
            scope: format!(
                "{} · {} · {paths}",
                g.services.join(", "),
                or_any(&g.methods, "any method"),
            ),
            expires_at: g.expires_at,
            time_left: String::new(),
            last_used_at: d.last_used_at,
        }
    }
}

/// The grant made last in this run of the app: where its file is, and how a delegate uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, TS)]
pub struct GrantedView {
    /// The grant's id.
    pub id: String,
    /// Who it is for.
    pub label: String,
    /// The grant's file (mode 0600: it holds the delegate's key and token).
    pub file: String,
    /// The command that runs a program on the grant.
    pub run: String,
    /// Whether the grant is for a key held elsewhere: the file holds no private key, and the
    /// delegate runs it with its own (`--key`).
    pub for_key: bool,
    /// When it ends, seconds since the epoch.
    #[ts(type = "number")]
    pub expires_at: u64,
}

impl std::fmt::Debug for Request {
    // By hand, so that a PIN or an invite code never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SignIn => f.write_str("SignIn"),
            Self::Renew => f.write_str("Renew"),
            Self::SignOut => f.write_str("SignOut"),
            Self::Cancel => f.write_str("Cancel"),
            Self::SubmitPin { .. } => f.write_str("SubmitPin"),
            Self::Enrol { .. } => f.write_str("Enrol"),
            Self::EnrolWithOrganisation => f.write_str("EnrolWithOrganisation"),
            Self::FindOrganisation => f.write_str("FindOrganisation"),
            Self::SetServicePort { service, port } => f
                .debug_struct("SetServicePort")
                .field("service", service)
                .field("port", port)
                .finish(),
            Self::SaveSettings { .. } => f.write_str("SaveSettings"),
            Self::Delegate { grant } => f.debug_struct("Delegate").field("grant", grant).finish(),
            Self::ListDelegations => f.write_str("ListDelegations"),
            Self::RevokeDelegation { id } => {
                f.debug_struct("RevokeDelegation").field("id", id).finish()
            }
        }
    }
}

/// What a touch is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// Signing in.
    SignIn,
    /// Renewing a live session.
    Renew,
    /// Enrolling the key.
    Enrol,
    /// Approving a delegated grant.
    Delegate,
}

/// Where the agent is, for the tray icon, the menu and the windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Phase {
    /// The settings are incomplete (first start): the settings window says what is missing.
    NotConfigured {
        /// What is missing, in words.
        problem: String,
    },
    /// No session.
    SignedOut {
        /// Why the last session ended, when it did not end by the user's choice.
        reason: Option<String>,
    },
    /// Reaching the gateway.
    Connecting {
        /// What for.
        purpose: Purpose,
    },
    /// The key is blinking.
    WaitingForTouch {
        /// The key's name.
        key: String,
        /// What for.
        purpose: Purpose,
    },
    /// The key wants its PIN: answer with [`Request::SubmitPin`].
    PinNeeded {
        /// The key's name.
        key: String,
        /// Tries left before the key blocks its PIN, when it says.
        retries: Option<i32>,
        /// What for.
        purpose: Purpose,
    },
    /// Signed in; every service is live.
    Connected,
    /// Signed in, and the session ends within the reminder time.
    ExpiringSoon,
    /// The connection dropped; reconnecting with the same session (no touch).
    Reconnecting {
        /// Attempt number.
        attempt: u32,
        /// Why the last attempt failed.
        reason: String,
    },
    /// The key that signed in was unplugged, which ended the session.
    KeyRemoved,
    /// The last sign-in failed.
    Error {
        /// Why, in words.
        message: String,
    },
}

/// The live session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, TS)]
pub struct SessionView {
    /// The user.
    pub user: String,
    /// When it ends, seconds since the epoch.
    #[ts(type = "number")]
    pub expires_at: u64,
}

/// One service as the front ends show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, TS)]
pub struct ServiceView {
    /// The gateway's name for it.
    pub name: String,
    /// Its port on 127.0.0.1 (0: a free port is picked at sign-in).
    pub local_port: u16,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Whether it answers now (signed in, and offered by the gateway).
    pub live: bool,
    /// `http://NAME.localhost:PORT/` on the by-name port (empty: not served by name).
    pub by_name: String,
}

impl ServiceView {
    /// The service `name` on `port`, live or not.
    pub fn new(name: &str, port: u16, live: bool) -> Self {
        Self {
            name: name.to_owned(),
            local_port: port,
            url: if port == 0 {
                String::new()
            } else {
                format!("http://127.0.0.1:{port}")
            },
            live,
            by_name: String::new(),
        }
    }

    /// Where to open it: by name when it is served by name (an origin of its own), else its
    /// port.
    pub fn best_url(&self) -> &str {
        if self.by_name.is_empty() {
            &self.url
        } else {
            &self.by_name
        }
    }
}

/// Whether the gateway enrols through the organisation's identity provider.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Organisation {
    /// Not asked yet (or the gateway could not be reached).
    #[default]
    Unknown,
    /// The gateway has none: enrol with an invite.
    None,
    /// The gateway enrols through this provider.
    Named {
        /// Its name, as users know it.
        name: String,
    },
}

/// Everything a front end draws.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, TS)]
pub struct View {
    /// Where the agent is.
    pub phase: Phase,
    /// The state in words, as every front end says it (tray tooltip, status window,
    /// `touchgate status`); kept current to the minute while a session is live.
    pub summary: String,
    /// The live session, if any.
    pub session: Option<SessionView>,
    /// How long the session has left, in words ("2 h 05 min"), while there is one.
    pub time_left: Option<String>,
    /// The configured services.
    pub services: Vec<ServiceView>,
    /// The gateway: while connected, the address in use (`gw-a.example:443 (192.0.2.7:443)`);
    /// else the configured address, or the list of them.
    pub gateway: String,
    /// While connected, how the gateway is reached, in words: `QUIC`, or `TCP: UDP seems
    /// blocked on this network` and the like; empty otherwise.
    pub transport: String,
    /// The configured user.
    pub user: String,
    /// The last request that failed while a session stayed up (a failed renewal), in words.
    pub error: Option<String>,
    /// Whether the gateway enrols through an identity provider (the enrol window asks).
    pub organisation: Organisation,
    /// The user's grants that have not ended, as the gateway last listed them (while signed
    /// in).
    pub delegations: Vec<GrantView>,
    /// The grant made last in this run of the app.
    pub granted: Option<GrantedView>,
}

impl Default for View {
    fn default() -> Self {
        let mut v = Self {
            phase: Phase::SignedOut { reason: None },
            summary: String::new(),
            session: None,
            time_left: None,
            services: Vec::new(),
            gateway: String::new(),
            transport: String::new(),
            user: String::new(),
            error: None,
            organisation: Organisation::Unknown,
            delegations: Vec::new(),
            granted: None,
        };
        v.set_words(0);
        v
    }
}

impl View {
    /// Words [`View::summary`] and [`View::time_left`] for `now` (seconds since the epoch).
    pub fn set_words(&mut self, now: u64) {
        self.time_left = self.session.as_ref().map(|s| time_left(s.expires_at, now));
        for g in &mut self.delegations {
            g.time_left = time_left(g.expires_at, now);
        }
        let left = self.time_left.as_deref().unwrap_or_default();
        let user = self.session.as_ref().map(|s| s.user.as_str()).unwrap_or("");
        let over = if self.transport.starts_with("TCP") {
            " over TCP"
        } else {
            ""
        };
        self.summary = match &self.phase {
            Phase::NotConfigured { .. } => "Not set up yet: open Settings".to_owned(),
            Phase::SignedOut { reason: None } => "Signed out".to_owned(),
            Phase::SignedOut { reason: Some(r) } => format!("Signed out: {r}"),
            Phase::Connecting { .. } => "Connecting to the gateway…".to_owned(),
            Phase::WaitingForTouch {
                key,
                purpose: Purpose::Delegate,
            } => format!("Touch your security key to approve the grant ({key})"),
            Phase::WaitingForTouch { key, .. } => format!("Touch your security key ({key})"),
            Phase::PinNeeded { .. } => "Enter your key's PIN".to_owned(),
            Phase::Connected => format!("Connected as {user}{over} — {left} left"),
            Phase::ExpiringSoon => format!("Session ends in {left}: renew it"),
            Phase::Reconnecting { .. } => "Connection lost — reconnecting…".to_owned(),
            Phase::KeyRemoved => "Signed out: the security key was unplugged".to_owned(),
            Phase::Error { message } => format!("Sign-in failed: {message}"),
        };
    }
}

/// "2 h 05 min", "4 min", "less than a minute" from `now` until `at` (seconds since the epoch).
pub fn time_left(at: u64, now: u64) -> String {
    let left = at.saturating_sub(now);
    if left < 60 {
        return "less than a minute".into();
    }
    let (h, m) = (left / 3600, (left % 3600) / 60);
    if h > 0 {
        format!("{h} h {m:02} min")
    } else {
        format!("{m} min")
    }
}

/// When the words of [`time_left`] until `at` next change after `now` (None: not before `at`).
pub(crate) fn time_left_changes(at: u64, now: u64) -> Option<u64> {
    let minutes = at.saturating_sub(now) / 60;
    (minutes > 0).then(|| at - 60 * minutes + 1)
}

/// Something to tell the user once (a desktop notification, a line on the terminal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Notice {
    /// The session ends soon; offer to renew.
    ExpiringSoon {
        /// Minutes left.
        #[ts(type = "number")]
        minutes_left: u64,
    },
    /// The session ended without the user asking.
    SessionEnded {
        /// Why.
        reason: String,
    },
    /// The connection to the gateway dropped.
    ConnectionLost {
        /// Why.
        reason: String,
    },
    /// The connection came back (same session, no touch).
    ConnectionRestored,
    /// A key was enrolled.
    Enrolled {
        /// Which.
        key: String,
    },
    /// The gateway refused the user because an admin disabled the account; the agent stopped
    /// and does not sign in again by itself.
    AccountDisabled {
        /// The gateway's words.
        reason: String,
    },
}

impl Notice {
    /// A short title.
    pub fn title(&self) -> &'static str {
        match self {
            Self::ExpiringSoon { .. } => "touchgate session ending soon",
            Self::SessionEnded { .. } => "touchgate signed out",
            Self::ConnectionLost { .. } => "touchgate connection lost",
            Self::ConnectionRestored => "touchgate connection restored",
            Self::Enrolled { .. } => "Security key enrolled",
            Self::AccountDisabled { .. } => "touchgate account disabled",
        }
    }

    /// The text under the title.
    pub fn body(&self) -> String {
        match self {
            Self::ExpiringSoon { minutes_left } => format!(
                "Your session ends in {minutes_left} min. Choose Renew session and touch your key to keep your services up."
            ),
            Self::SessionEnded { reason } => {
                format!("{reason} Sign in again to use your services.")
            }
            Self::ConnectionLost { reason } => {
                format!("Reconnecting with the same session, no touch needed ({reason}).")
            }
            Self::ConnectionRestored => "Your services are reachable again.".into(),
            Self::Enrolled { key } => format!("{key} is enrolled: you can sign in with it now."),
            Self::AccountDisabled { reason } => format!("Signed out: {reason}."),
        }
    }

    /// Whether the notice offers to renew the session (where the platform has actions).
    pub fn offers_renew(&self) -> bool {
        matches!(self, Self::ExpiringSoon { .. })
    }

    /// The notice with its words, as the window receives it.
    pub fn shown(&self) -> ShownNotice {
        ShownNotice {
            notice: self.clone(),
            title: self.title().to_owned(),
            body: self.body(),
        }
    }
}

/// A [`Notice`] with its words, for the window (the words are made here, not in the window).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS)]
pub struct ShownNotice {
    /// What happened.
    pub notice: Notice,
    /// [`Notice::title`].
    pub title: String,
    /// [`Notice::body`].
    pub body: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_say_what_happened_in_words() {
        let n = Notice::ExpiringSoon { minutes_left: 9 };
        assert!(n.offers_renew());
        assert!(n.body().contains("9 min"), "{}", n.body());
        let ended = Notice::SessionEnded {
            reason: "The security key was unplugged, which ended your session.".into(),
        };
        assert!(!ended.offers_renew());
        assert!(
            ended
                .body()
                .ends_with("Sign in again to use your services.")
        );
    }

    #[test]
    fn time_left_is_worded_to_the_minute_and_says_when_it_changes() {
        assert_eq!(
            time_left(10_000 + 2 * 3600 + 5 * 60 + 30, 10_000),
            "2 h 05 min"
        );
        assert_eq!(time_left(10_000 + 299, 10_000), "4 min");
        assert_eq!(time_left(10_000 + 59, 10_000), "less than a minute");
        assert_eq!(time_left(5, 10_000), "less than a minute");
        // 4 min 59 s left: the words change when 3 min 59 s are left.
        let next = time_left_changes(10_299, 10_000).expect("a change");
        assert_eq!(next, 10_060);
        assert_eq!(time_left(10_299, next - 1), "4 min");
        assert_eq!(time_left(10_299, next), "3 min");
        assert_eq!(time_left_changes(10_059, 10_000), None);
    }

    #[test]
    fn the_summary_words_the_phase_and_the_time_left() {
        let mut v = View {
            phase: Phase::Connected,
            session: Some(SessionView {
                user: "alice".into(),
                expires_at: 10_000 + 3 * 3600 + 7 * 60,
            }),
            ..View::default()
        };
        v.set_words(10_000);
        assert_eq!(v.summary, "Connected as alice — 3 h 07 min left");
        assert_eq!(v.time_left.as_deref(), Some("3 h 07 min"));
        v.phase = Phase::SignedOut { reason: None };
        v.session = None;
        v.set_words(10_000);
        assert_eq!((v.summary.as_str(), v.time_left), ("Signed out", None));
    }
}

//! What goes into [`ControllerState::handle`] and what comes out: events, effects, timers.

use secrecy::SecretString;

#[cfg(doc)]
use super::ControllerState;
use crate::{
    AgentConfig, AgentState,
    controller::{GrantForm, GrantedView, Notice, Request, View, error::ControllerError},
    settings::{Layered, Settings},
};

/// Something that happened, for [`ControllerState::handle`].
#[derive(Debug)]
pub enum Event {
    /// A front end asks.
    Request(Request),
    /// The flow's key was opened ([`Effect::OpenAuthenticator`]); its name.
    AuthenticatorOpened {
        /// "YubiKey 5 NFC", "software key PATH".
        key: String,
    },
    /// The agent signed in and serves its ports ([`Effect::StartAgent`]).
    AgentStarted {
        /// The shell's id for this agent; its later [`Event::Agent`]s carry it.
        agent: u64,
        /// The session (always there once the agent has started).
        session: Option<Session>,
        /// Each service's local port.
        listeners: Vec<(String, u16)>,
        /// The by-name port (`router_port`), when it is on.
        router: Option<u16>,
    },
    /// The running agent renewed its session ([`Effect::Renew`]).
    Renewed(Session),
    /// The key was enrolled ([`Effect::Enrol`]).
    Enrolled,
    /// The running agent's key approved a grant and its file was written
    /// ([`Effect::Delegate`]).
    Delegated(Box<GrantedView>),
    /// The gateway listed the user's grants ([`Effect::ListDelegations`]), or why it could
    /// not.
    DelegationsListed {
        /// The grants, or why not, in words.
        grants: Result<Vec<touchgate_proto::DelegationInfo>, String>,
        /// Whether a request waits for this list.
        answer: bool,
    },
    /// The gateway revoked a grant ([`Effect::RevokeDelegation`]): its id, or why not.
    DelegationRevoked(Result<String, String>),
    /// The flow's IO step failed.
    FlowFailed(Failure),
    /// The gateway said whether it enrols through an identity provider
    /// ([`Effect::FindOrganisation`]): its name, none, or why it could not be asked.
    OrganisationFound(Result<Option<String>, String>),
    /// The settings were written and read back ([`Effect::Save`]), or why not.
    Saved(Result<Layered, String>),
    /// The key asks for a touch.
    TouchNeeded {
        /// The key's name.
        key: String,
    },
    /// The key asks for its PIN; answer with [`Effect::AnswerPin`].
    PinNeeded {
        /// The key's name.
        key: String,
        /// Tries left, when the key says.
        retries: Option<i32>,
    },
    /// The running agent's state changed.
    Agent {
        /// Which agent ([`Event::AgentStarted`]); a stopped one's news is ignored.
        agent: u64,
        /// Its new state.
        state: AgentState,
        /// Whether it stopped because the gateway disabled the account.
        account_disabled: bool,
    },
    /// A timer set by [`Effect::SetTimer`] is due.
    Timer(Timer),
}

/// Something for the shell to do, in the order given.
#[derive(Debug)]
pub enum Effect {
    /// Draw this view.
    Show(Box<View>),
    /// Tell the user once.
    Notify(Notice),
    /// Open the configured key for the flow; answer with [`Event::AuthenticatorOpened`] or
    /// [`Event::FlowFailed`]. Its prompts come as [`Event::TouchNeeded`] and
    /// [`Event::PinNeeded`], and it asks [`ControllerState::cancelled`].
    OpenAuthenticator {
        /// The checked config.
        config: Box<AgentConfig>,
        /// Create a software key file if there is none (enrolment).
        create_soft: bool,
    },
    /// Start the agent with the opened key; answer with [`Event::AgentStarted`] or
    /// [`Event::FlowFailed`].
    StartAgent {
        /// The checked config.
        config: Box<AgentConfig>,
    },
    /// Renew on the running agent; answer with [`Event::Renewed`] or [`Event::FlowFailed`].
    Renew,
    /// Enrol the opened key; answer with [`Event::Enrolled`] or [`Event::FlowFailed`].
    Enrol {
        /// The checked config.
        config: Box<AgentConfig>,
        /// The invite code (a secret: kept out of logs); empty to enrol by signing in with
        /// the organisation's identity provider in the browser instead.
        code: SecretString,
    },
    /// Approve `grant` with a touch of the running agent's key and write its file; answer
    /// with [`Event::Delegated`] or [`Event::FlowFailed`].
    Delegate {
        /// What to grant (checked).
        grant: Box<GrantForm>,
    },
    /// Ask the running agent's session for the user's grants; answer with
    /// [`Event::DelegationsListed`].
    ListDelegations {
        /// Whether a request waits for the list.
        answer: bool,
    },
    /// Revoke the user's grant `id` on the running agent's session; answer with
    /// [`Event::DelegationRevoked`].
    RevokeDelegation {
        /// The grant's id.
        id: String,
    },
    /// Ask the gateway about its identity provider; answer with [`Event::OrganisationFound`].
    FindOrganisation {
        /// The checked config.
        config: Box<AgentConfig>,
    },
    /// Stop the running agent and close its ports.
    StopAgent,
    /// Write `settings` over `layers`; answer with [`Event::Saved`].
    Save {
        /// The layers the values were read from.
        layers: Box<Layered>,
        /// The new values.
        settings: Box<Settings>,
    },
    /// Answer the key's PIN prompt (None: give up).
    AnswerPin(Option<SecretString>),
    /// Fire [`Event::Timer`] at `at` (seconds since the epoch), replacing the timer's last
    /// setting.
    SetTimer {
        /// Which.
        timer: Timer,
        /// When.
        at: u64,
    },
    /// Forget a timer.
    ClearTimer(Timer),
    /// The request being handled is done.
    Reply(Result<(), ControllerError>),
}

impl Effect {
    /// Whether the effect starts IO that answers with an event, or answers the request.
    pub(super) fn waits(&self) -> bool {
        matches!(
            self,
            Self::OpenAuthenticator { .. }
                | Self::StartAgent { .. }
                | Self::Renew
                | Self::Enrol { .. }
                | Self::FindOrganisation { .. }
                | Self::Delegate { .. }
                | Self::ListDelegations { .. }
                | Self::RevokeDelegation { .. }
                | Self::Save { .. }
                | Self::Reply(_)
        )
    }
}

/// The controller's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timer {
    /// The reminder before the session ends.
    Warn,
    /// The session's end.
    End,
    /// A PIN prompt nobody answered.
    PinWait,
    /// The time left changes its words.
    Tick,
}

/// Why a flow's IO step failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The user cancelled the wait for the key.
    Cancelled,
    /// The gateway refused the user as disabled (its words).
    Disabled(String),
    /// Anything else, in words.
    Error(String),
}

/// A session as the controller needs it (no token).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// The user.
    pub user: String,
    /// When it ends, seconds since the epoch.
    pub expires_at: u64,
    /// The services the gateway offers.
    pub services: Vec<String>,
    /// Those of them that are TCP services (not served by name).
    pub tcp: Vec<String>,
    /// The gateway address in use (empty: not known here, as after a renewal on the same
    /// connection).
    pub gateway: String,
    /// How the gateway is reached, in words (empty: not known here).
    pub transport: String,
}

impl From<&touchgate_proto::SessionInfo> for Session {
    fn from(s: &touchgate_proto::SessionInfo) -> Self {
        Self {
            user: s.user.clone(),
            expires_at: s.expires_at,
            services: s.services.iter().map(|s| s.name.clone()).collect(),
            tcp: tcp_services(s),
            gateway: String::new(),
            transport: String::new(),
        }
    }
}

/// The names of the TCP services a session offers.
pub(crate) fn tcp_services(s: &touchgate_proto::SessionInfo) -> Vec<String> {
    s.services
        .iter()
        .filter(|s| s.kind == touchgate_proto::ServiceKind::Tcp)
        .map(|s| s.name.clone())
        .collect()
}

//! The controller's logic as a state machine with no IO, in the way of quinn-proto's
//! connection and firezone's `ClientState`: [`ControllerState::handle`] takes one [`Event`] (a
//! front end's request, the result of an IO step, a prompt from the key, a change of the
//! agent's state, a timer) and the time, and returns the [`Effect`]s to carry out. It reads no
//! clock, opens no key and starts nothing; the async [`super::Controller`] does that and feeds
//! the results back as events.
//!
//! Sign-in, renewal and enrolment are one [`Flow`]: the busy check, Connecting, opening the
//! key, the touch and PIN prompts and the mapping of failures are written once, and only the
//! step that needs the key and the ending differ by [`Purpose`]. While a flow runs its prompt is
//! shown over the base phase (what the agent and the session say), which comes back when it
//! ends.

mod events;

use std::{collections::BTreeMap, time::Duration};

use secrecy::SecretString;

pub(crate) use events::tcp_services;
pub use events::{Effect, Event, Failure, Session, Timer};

use super::error::ControllerError;
use super::{
    GrantForm, GrantView, Notice, Organisation, Phase, Purpose, Request, ServiceView, SessionView,
    View, view::time_left_changes,
};
use crate::{AgentConfig, AgentState, settings::Layered};

/// How long a PIN prompt waits for an answer before it gives up.
pub const PIN_WAIT: Duration = Duration::from_secs(300);

/// What [`AgentState::KeyRemoved`] and the end of a session tell the user.
const KEY_UNPLUGGED: &str = "The security key was unplugged, which ended your session.";
const SESSION_END: &str = "Your session reached its end.";

/// The controller's state.
pub struct ControllerState {
    layers: Result<Layered, String>,
    /// What the view shows besides the phase and its words.
    view: View,
    /// The gateway as configured, which the view shows when no connection is live.
    configured_gateway: String,
    /// The phase when no flow runs.
    base: Phase,
    flow: Option<Flow>,
    agent: Option<Running>,
    /// The connection dropped and has not come back (one notice each way).
    lost: bool,
    pin_asked: bool,
    timers: BTreeMap<Timer, u64>,
    shown: Option<View>,
}

/// The one sign-in, renewal or enrolment in progress.
struct Flow {
    purpose: Purpose,
    step: Step,
    cancelled: bool,
    /// The config it started with (sign-in and enrolment).
    config: Option<AgentConfig>,
    code: String,
    key: String,
}

enum Step {
    Connecting,
    Touch { key: String },
    Pin { key: String, retries: Option<i32> },
}

struct Running {
    id: u64,
    key: String,
    reminder: u64,
    /// The session end the reminder was given for.
    warned_for: Option<u64>,
    /// The by-name port, when it is on.
    router: Option<u16>,
}

impl ControllerState {
    /// Signed out over `layers` (an unreadable config: why), and the first view to show.
    pub fn new(layers: Result<Layered, String>, now: u64) -> (Self, Vec<Effect>) {
        let mut s = Self {
            layers,
            view: View::default(),
            configured_gateway: String::new(),
            base: Phase::SignedOut { reason: None },
            flow: None,
            agent: None,
            lost: false,
            pin_asked: false,
            timers: BTreeMap::new(),
            shown: None,
        };
        s.show_configured(true);
        let mut out = Vec::new();
        s.render(now, &mut out);
        (s, out)
    }

    /// What the front ends draw now.
    pub fn view(&self) -> View {
        self.shown.clone().unwrap_or_default()
    }

    /// The layers of settings, or why they cannot be read.
    pub fn layers(&self) -> Result<&Layered, ControllerError> {
        self.layers
            .as_ref()
            .map_err(|problem| ControllerError::NotConfigured {
                problem: problem.clone(),
            })
    }

    /// The merged config, checked.
    pub fn config(&self) -> Result<AgentConfig, ControllerError> {
        self.layers()?
            .config()
            .map_err(|e| ControllerError::NotConfigured {
                problem: e.to_string(),
            })
    }

    /// Whether the key should stop waiting: the user cancelled the flow in progress.
    pub fn cancelled(&self) -> bool {
        self.flow.as_ref().is_some_and(|f| f.cancelled)
    }

    /// Takes in `event` at `now` (seconds since the epoch); returns what to do.
    pub fn handle(&mut self, event: Event, now: u64) -> Vec<Effect> {
        let mut out = Vec::new();
        let mut notices = Vec::new();
        match event {
            Event::Request(r) => self.request(r, &mut out, &mut notices),
            Event::AuthenticatorOpened { key } => self.opened(key, &mut out, &mut notices),
            Event::AgentStarted {
                agent,
                session,
                listeners,
                router,
            } => self.started(
                agent,
                session.as_ref(),
                (&listeners, router),
                now,
                &mut out,
                &mut notices,
            ),
            Event::Renewed(session) => {
                if self.take_flow(Purpose::Renew, &mut out).is_some() {
                    self.show_session(&session, now, &mut out, &mut notices);
                    out.push(Effect::Reply(Ok(())));
                }
            }
            Event::Enrolled => {
                if let Some(f) = self.take_flow(Purpose::Enrol, &mut out) {
                    notices.push(Notice::Enrolled { key: f.key });
                    out.push(Effect::Reply(Ok(())));
                }
            }
            Event::Delegated(granted) => {
                if self.take_flow(Purpose::Delegate, &mut out).is_some() {
                    self.view.granted = Some(*granted);
                    out.push(Effect::ListDelegations { answer: false });
                    out.push(Effect::Reply(Ok(())));
                }
            }
            Event::DelegationsListed { grants, answer } => {
                let r = match grants {
                    Ok(list) => {
                        if self.agent.is_some() {
                            self.show_grants(&list, now);
                        }
                        Ok(())
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot list the grants");
                        Err(ControllerError::Failed {
                            message: format!("The grants could not be listed: {e}"),
                        })
                    }
                };
                if answer {
                    out.push(Effect::Reply(r));
                }
            }
            Event::DelegationRevoked(Ok(id)) => {
                self.view.delegations.retain(|g| g.id != id);
                if self.view.granted.as_ref().is_some_and(|g| g.id == id) {
                    self.view.granted = None;
                }
                out.push(Effect::ListDelegations { answer: false });
                out.push(Effect::Reply(Ok(())));
            }
            Event::DelegationRevoked(Err(e)) => {
                out.push(Effect::Reply(Err(ControllerError::Failed {
                    message: format!("The grant was not revoked: {e}"),
                })))
            }
            Event::FlowFailed(failure) => self.failed(failure, &mut out, &mut notices),
            Event::OrganisationFound(found) => {
                self.view.organisation = match found {
                    Ok(Some(name)) => Organisation::Named { name },
                    Ok(None) => Organisation::None,
                    // Said nowhere: the enrol window still offers both ways.
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot ask the gateway about its identity provider");
                        Organisation::Unknown
                    }
                };
                out.push(Effect::Reply(Ok(())));
            }
            Event::Saved(Ok(layers)) => {
                if self.view.session.is_none() {
                    self.layers = Ok(layers);
                    self.show_configured(false);
                } else {
                    // The view keeps the gateway in use; the new one shows once it ends.
                    self.configured_gateway = layers.view().values.gateway;
                    self.layers = Ok(layers);
                }
                out.push(Effect::Reply(Ok(())));
            }
            Event::Saved(Err(message)) => {
                out.push(Effect::Reply(Err(ControllerError::NotSaved { message })));
            }
            Event::TouchNeeded { key } => {
                if let Some(f) = &mut self.flow {
                    f.step = Step::Touch { key };
                }
            }
            Event::PinNeeded { key, retries } => match &mut self.flow {
                Some(f) if !f.cancelled => {
                    f.step = Step::Pin { key, retries };
                    self.pin_asked = true;
                    self.arm(Timer::PinWait, Some(now + PIN_WAIT.as_secs()), &mut out);
                }
                _ => out.push(Effect::AnswerPin(None)),
            },
            Event::Agent {
                agent,
                state,
                account_disabled,
            } => {
                if self.agent.as_ref().is_some_and(|a| a.id == agent) {
                    self.agent_state(state, account_disabled, now, &mut out, &mut notices);
                }
            }
            Event::Timer(t) => self.timer(t, now, &mut out, &mut notices),
        }
        // The view and the notices first, then what waits for IO: "Connecting" shows before
        // the key is opened; a stopped agent has closed its ports before "Signed out" shows.
        let (later, mut out): (Vec<_>, Vec<_>) = out.into_iter().partition(Effect::waits);
        self.render(now, &mut out);
        out.extend(notices.into_iter().map(Effect::Notify));
        out.extend(later);
        out
    }

    fn request(&mut self, request: Request, out: &mut Vec<Effect>, notices: &mut Vec<Notice>) {
        let reply = |out: &mut Vec<Effect>, r| out.push(Effect::Reply(r));
        match request {
            Request::SignIn => self.begin(Purpose::SignIn, String::new(), None, out),
            Request::Renew => self.begin(Purpose::Renew, String::new(), None, out),
            Request::Enrol { code } => {
                let code = code.trim();
                if code.is_empty() {
                    return reply(out, Err(ControllerError::NoInviteCode));
                }
                self.begin(Purpose::Enrol, code.to_owned(), None, out);
            }
            // No code: the shell enrols through the identity provider (see `Effect::Enrol`).
            Request::EnrolWithOrganisation => {
                self.begin(Purpose::Enrol, String::new(), None, out);
            }
            Request::Delegate { grant } => match self.checked_grant(grant) {
                Ok(grant) => self.begin(Purpose::Delegate, String::new(), Some(grant), out),
                Err(e) => reply(out, Err(e)),
            },
            Request::ListDelegations => match &self.agent {
                Some(_) => out.push(Effect::ListDelegations { answer: true }),
                None => reply(out, Err(ControllerError::NotSignedIn)),
            },
            Request::RevokeDelegation { id } => match &self.agent {
                Some(_) => out.push(Effect::RevokeDelegation { id }),
                None => reply(out, Err(ControllerError::NotSignedIn)),
            },
            Request::FindOrganisation => match self.config() {
                Ok(config) => out.push(Effect::FindOrganisation {
                    config: Box::new(config),
                }),
                Err(e) => reply(out, Err(e)),
            },
            Request::Cancel => {
                self.cancel(out);
                reply(out, Ok(()));
            }
            Request::SignOut => {
                self.cancel(out);
                let phase = match &self.base {
                    p @ Phase::NotConfigured { .. } => p.clone(),
                    _ => Phase::SignedOut { reason: None },
                };
                self.end_session(phase, None, out, notices);
                reply(out, Ok(()));
            }
            Request::SubmitPin { pin } => {
                if !self.pin_asked {
                    return reply(out, Err(ControllerError::NoPinAsked));
                }
                self.pin_asked = false;
                self.arm(Timer::PinWait, None, out);
                out.push(Effect::AnswerPin(Some(SecretString::from(pin))));
                reply(out, Ok(()));
            }
            Request::SetServicePort { service, port } => {
                let layers = match self.layers() {
                    Ok(l) => l.clone(),
                    Err(e) => return reply(out, Err(e)),
                };
                let mut settings = layers.view().values;
                let Some(s) = settings.services.iter_mut().find(|s| s.name == service) else {
                    return reply(out, Err(ControllerError::UnknownService { service }));
                };
                s.local_port = port;
                out.push(Effect::Save {
                    layers: Box::new(layers),
                    settings: Box::new(settings),
                });
            }
            Request::SaveSettings { settings } => match self.layers() {
                Ok(l) => out.push(Effect::Save {
                    layers: Box::new(l.clone()),
                    settings: Box::new(settings),
                }),
                Err(e) => reply(out, Err(e)),
            },
        }
    }

    /// Starts a flow: one at a time; the key is opened unless the running agent holds it
    /// (renewal, and a grant: `grant`).
    fn begin(
        &mut self,
        purpose: Purpose,
        code: String,
        grant: Option<GrantForm>,
        out: &mut Vec<Effect>,
    ) {
        let reply = |out: &mut Vec<Effect>, r| out.push(Effect::Reply(r));
        if self.flow.is_some() {
            return reply(out, Err(ControllerError::Busy));
        }
        let purpose = match (purpose, &self.agent) {
            (Purpose::SignIn, Some(_)) => return reply(out, Ok(())),
            (Purpose::Renew, None) => Purpose::SignIn,
            (Purpose::Delegate, None) => return reply(out, Err(ControllerError::NotSignedIn)),
            (p, _) => p,
        };
        if purpose != Purpose::Delegate {
            self.view.error = None;
        }
        if let (Purpose::Renew | Purpose::Delegate, Some(a)) = (purpose, &self.agent) {
            self.flow = Some(Flow {
                purpose,
                step: Step::Touch { key: a.key.clone() },
                cancelled: false,
                config: None,
                code,
                key: a.key.clone(),
            });
            return out.push(match grant {
                Some(grant) => Effect::Delegate {
                    grant: Box::new(grant),
                },
                None => Effect::Renew,
            });
        }
        let config = match self.config() {
            Ok(c) => c,
            Err(e) => return reply(out, Err(e)),
        };
        out.push(Effect::OpenAuthenticator {
            config: Box::new(config.clone()),
            create_soft: purpose == Purpose::Enrol,
        });
        self.flow = Some(Flow {
            purpose,
            step: Step::Connecting,
            cancelled: false,
            config: Some(config),
            code,
            key: String::new(),
        });
    }

    fn opened(&mut self, key: String, out: &mut Vec<Effect>, notices: &mut Vec<Notice>) {
        let Some(f) = &mut self.flow else { return };
        if f.cancelled {
            return self.failed(Failure::Cancelled, out, notices);
        }
        f.key = key.clone();
        f.step = Step::Touch { key };
        let Some(config) = f.config.clone().map(Box::new) else {
            return;
        };
        out.push(match f.purpose {
            Purpose::Enrol => Effect::Enrol {
                config,
                code: SecretString::from(f.code.clone()),
            },
            Purpose::SignIn | Purpose::Renew => Effect::StartAgent { config },
            // A grant uses the running agent's key, which is open already.
            Purpose::Delegate => return,
        });
    }

    fn started(
        &mut self,
        agent: u64,
        session: Option<&Session>,
        (listeners, router): (&[(String, u16)], Option<u16>),
        now: u64,
        out: &mut Vec<Effect>,
        notices: &mut Vec<Notice>,
    ) {
        let Some(f) = self.take_flow(Purpose::SignIn, out) else {
            // Nobody is waiting for this agent.
            return out.push(Effect::StopAgent);
        };
        if f.cancelled {
            out.push(Effect::StopAgent);
            self.base = Phase::SignedOut { reason: None };
            return out.push(Effect::Reply(Err(ControllerError::Cancelled)));
        }
        let reminder = f.config.as_ref().map(|c| c.renew_reminder.as_secs());
        self.agent = Some(Running {
            id: agent,
            key: f.key,
            reminder: reminder.unwrap_or_default(),
            warned_for: None,
            router,
        });
        self.lost = false;
        self.view.services = listeners
            .iter()
            .map(|(name, port)| ServiceView::new(name, *port, false))
            .collect();
        if let Some(session) = session {
            self.show_session(session, now, out, notices);
        }
        out.push(Effect::Reply(Ok(())));
        // The tray lists the user's live grants, with Revoke.
        out.push(Effect::ListDelegations { answer: false });
    }

    /// Checks a grant the window asks for before the key is asked: a name, services the
    /// session offers, a duration, methods and path prefixes in their shape. (The gateway
    /// checks it again, with its own limits.)
    fn checked_grant(&self, g: GrantForm) -> Result<GrantForm, ControllerError> {
        let bad = |problem: String| Err(ControllerError::BadGrant { problem });
        if self.agent.is_none() {
            return Err(ControllerError::NotSignedIn);
        }
        let label = g.label.trim().to_owned();
        if label.is_empty() {
            return bad("name the grant: who or what is it for (\"nightly CI\")?".into());
        }
        if g.services.is_empty() {
            return bad("choose at least one service".into());
        }
        if let Some(s) = g
            .services
            .iter()
            .find(|s| !self.view.services.iter().any(|v| v.live && v.name == **s))
        {
            return bad(format!("{s:?} is not a live service of your session"));
        }
        if g.minutes == 0 {
            return bad("choose how long the grant lasts".into());
        }
        let methods: Vec<String> = g
            .methods
            .iter()
            .map(|m| m.trim().to_ascii_uppercase())
            .filter(|m| !m.is_empty())
            .collect();
        if let Some(m) = methods
            .iter()
            .find(|m| !m.bytes().all(|b| b.is_ascii_alphabetic()))
        {
            return bad(format!("{m:?} is not an HTTP method"));
        }
        let path_prefixes: Vec<String> = g
            .path_prefixes
            .iter()
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        if let Some(p) = path_prefixes.iter().find(|p| !p.starts_with('/')) {
            return bad(format!("a path prefix starts with /: {p:?}"));
        }
        let certificate = g.certificate.trim().to_owned();
        if !certificate.is_empty() {
            crate::delegation::DelegateKey::from_certificate_pem(&certificate)
                .map_err(|problem| ControllerError::BadGrant { problem })?;
        }
        Ok(GrantForm {
            label,
            services: g.services,
            methods,
            path_prefixes,
            minutes: g.minutes,
            certificate,
        })
    }

    /// Shows the user's grants that have not ended, the soonest to end first.
    fn show_grants(&mut self, list: &[touchgate_proto::DelegationInfo], now: u64) {
        let mut grants: Vec<GrantView> = list
            .iter()
            .filter(|d| d.revoked_at.is_none() && d.grant.expires_at > now)
            .filter(|d| crate::delegation::grant_id_ok(&d.id))
            .map(GrantView::of)
            .collect();
        grants.sort_by(|a, b| (a.expires_at, &a.id).cmp(&(b.expires_at, &b.id)));
        // The grant just made is offered while it lives (its file goes when it ends).
        if let Some(g) = &self.view.granted
            && !grants.iter().any(|l| l.id == g.id)
        {
            self.view.granted = None;
        }
        self.view.delegations = grants;
    }

    /// Ends the flow of `purpose` (a stale answer for another is dropped).
    fn take_flow(&mut self, purpose: Purpose, out: &mut Vec<Effect>) -> Option<Flow> {
        if self.flow.as_ref().map(|f| f.purpose) != Some(purpose) {
            return None;
        }
        if std::mem::take(&mut self.pin_asked) {
            out.push(Effect::AnswerPin(None));
        }
        self.arm(Timer::PinWait, None, out);
        self.flow.take()
    }

    /// The one place a failed flow is worded and shown.
    fn failed(&mut self, failure: Failure, out: &mut Vec<Effect>, notices: &mut Vec<Notice>) {
        let Some(purpose) = self.flow.as_ref().map(|f| f.purpose) else {
            return;
        };
        self.take_flow(purpose, out);
        let error = match (purpose, failure) {
            (Purpose::SignIn, Failure::Cancelled) => {
                self.base = Phase::SignedOut { reason: None };
                ControllerError::Cancelled
            }
            (_, Failure::Cancelled) => ControllerError::Cancelled,
            (Purpose::SignIn, Failure::Disabled(reason)) => {
                self.base = Phase::SignedOut {
                    reason: Some(reason.clone()),
                };
                notices.push(Notice::AccountDisabled {
                    reason: reason.clone(),
                });
                ControllerError::AccountDisabled { reason }
            }
            // The agent has stopped; its SignedOut state shows it, with the reason.
            (Purpose::Renew, Failure::Disabled(reason)) => {
                ControllerError::AccountDisabled { reason }
            }
            (Purpose::SignIn, Failure::Error(message)) => {
                self.base = Phase::Error {
                    message: message.clone(),
                };
                ControllerError::Failed { message }
            }
            (Purpose::Renew, Failure::Error(m)) => {
                let message = format!("The session was not renewed: {m}");
                self.view.error = Some(message.clone());
                ControllerError::Failed { message }
            }
            (Purpose::Enrol, Failure::Error(m) | Failure::Disabled(m)) => {
                let message = format!("The key was not enrolled: {m}");
                self.view.error = Some(message.clone());
                ControllerError::Failed { message }
            }
            // Said in the delegate window only: the session is as it was.
            (Purpose::Delegate, Failure::Error(m) | Failure::Disabled(m)) => {
                ControllerError::Failed {
                    message: format!("The grant was not made: {m}"),
                }
            }
        };
        out.push(Effect::Reply(Err(error)));
    }

    /// Stops any wait for the key: the key sees [`ControllerState::cancelled`], a pending
    /// PIN prompt gets none.
    fn cancel(&mut self, out: &mut Vec<Effect>) {
        if let Some(f) = &mut self.flow {
            f.cancelled = true;
        }
        if std::mem::take(&mut self.pin_asked) {
            out.push(Effect::AnswerPin(None));
        }
        self.arm(Timer::PinWait, None, out);
    }

    fn agent_state(
        &mut self,
        state: AgentState,
        account_disabled: bool,
        now: u64,
        out: &mut Vec<Effect>,
        notices: &mut Vec<Notice>,
    ) {
        match state {
            AgentState::Starting => {}
            AgentState::Connected {
                user,
                expires_at,
                services,
                tcp,
                gateway,
                transport,
            } => {
                if std::mem::take(&mut self.lost) {
                    notices.push(Notice::ConnectionRestored);
                }
                let session = Session {
                    user,
                    expires_at,
                    services,
                    tcp,
                    gateway,
                    transport,
                };
                self.show_session(&session, now, out, notices);
            }
            AgentState::WaitingForTouch { authenticator } => {
                if let Some(f) = &mut self.flow {
                    f.step = Step::Touch { key: authenticator };
                }
            }
            AgentState::Reconnecting { attempt, reason } => {
                if !std::mem::replace(&mut self.lost, true) {
                    notices.push(Notice::ConnectionLost {
                        reason: reason.clone(),
                    });
                }
                self.base = Phase::Reconnecting { attempt, reason };
                self.view.services.iter_mut().for_each(|s| s.live = false);
                self.view.gateway = self.configured_gateway.clone();
                self.view.transport.clear();
            }
            AgentState::SignedOut { reason } => {
                let notice = if account_disabled {
                    Notice::AccountDisabled {
                        reason: reason.clone(),
                    }
                } else {
                    Notice::SessionEnded {
                        reason: reason.clone(),
                    }
                };
                let phase = Phase::SignedOut {
                    reason: Some(reason),
                };
                self.end_session(phase, Some(notice), out, notices);
            }
            AgentState::KeyRemoved => {
                let notice = Notice::SessionEnded {
                    reason: KEY_UNPLUGGED.into(),
                };
                self.end_session(Phase::KeyRemoved, Some(notice), out, notices);
            }
        }
    }

    fn timer(&mut self, t: Timer, now: u64, out: &mut Vec<Effect>, notices: &mut Vec<Notice>) {
        let Some(&at) = self.timers.get(&t) else {
            return;
        };
        if now < at {
            // Woken early (the wall clock and the timer's clock differ): wait again.
            return out.push(Effect::SetTimer { timer: t, at });
        }
        self.timers.remove(&t);
        match t {
            Timer::Warn => self.warn(now, notices),
            Timer::End => {
                let notice = Notice::SessionEnded {
                    reason: SESSION_END.into(),
                };
                let phase = Phase::SignedOut {
                    reason: Some(SESSION_END.into()),
                };
                self.end_session(phase, Some(notice), out, notices);
            }
            Timer::PinWait => {
                if std::mem::take(&mut self.pin_asked) {
                    out.push(Effect::AnswerPin(None));
                }
            }
            // The words are made again below.
            Timer::Tick => {}
        }
    }

    /// Shows a live session: the services the gateway offers are live; the reminder and the
    /// end are set for its expiry.
    fn show_session(
        &mut self,
        session: &Session,
        now: u64,
        out: &mut Vec<Effect>,
        notices: &mut Vec<Notice>,
    ) {
        let Some(a) = &self.agent else { return };
        let exp = session.expires_at;
        self.base = if exp.saturating_sub(now) <= a.reminder {
            Phase::ExpiringSoon
        } else {
            Phase::Connected
        };
        let warned = a.warned_for == Some(exp);
        let warn_at = exp.saturating_sub(a.reminder);
        self.view.session = Some(SessionView {
            user: session.user.clone(),
            expires_at: exp,
        });
        if !session.gateway.is_empty() {
            self.view.gateway = session.gateway.clone();
        }
        if !session.transport.is_empty() {
            self.view.transport = session.transport.clone();
        }
        for s in &mut self.view.services {
            s.live = session.services.contains(&s.name);
            s.by_name = by_name_url(a.router, &s.name, session).unwrap_or_default();
        }
        // The by-name port serves every web service offered, configured or not.
        for name in &session.services {
            if let Some(url) = by_name_url(a.router, name, session)
                && !self.view.services.iter().any(|s| s.name == *name)
            {
                let mut s = ServiceView::new(name, 0, true);
                s.by_name = url;
                self.view.services.push(s);
            }
        }
        if warned {
            self.arm(Timer::Warn, None, out);
        } else if now >= warn_at {
            self.warn(now, notices);
        } else {
            self.arm(Timer::Warn, Some(warn_at), out);
        }
        self.arm(Timer::End, Some(exp), out);
    }

    fn warn(&mut self, now: u64, notices: &mut Vec<Notice>) {
        let (Some(a), Some(s)) = (&mut self.agent, &self.view.session) else {
            return;
        };
        a.warned_for = Some(s.expires_at);
        self.timers.remove(&Timer::Warn);
        if self.base == Phase::Connected {
            self.base = Phase::ExpiringSoon;
        }
        notices.push(Notice::ExpiringSoon {
            minutes_left: s.expires_at.saturating_sub(now).div_ceil(60),
        });
    }

    /// Ends the session (if any) and shows `phase`.
    fn end_session(
        &mut self,
        phase: Phase,
        notice: Option<Notice>,
        out: &mut Vec<Effect>,
        notices: &mut Vec<Notice>,
    ) {
        if self.agent.take().is_some() {
            out.push(Effect::StopAgent);
        }
        self.base = phase;
        self.lost = false;
        self.view.session = None;
        self.view.delegations.clear();
        self.view.granted = None;
        self.view.services.iter_mut().for_each(|s| s.live = false);
        self.view.gateway = self.configured_gateway.clone();
        self.view.transport.clear();
        for t in [Timer::Warn, Timer::End] {
            self.arm(t, None, out);
        }
        notices.extend(notice);
    }

    /// Shows the configured services and user while signed out; `first` also sets the phase.
    fn show_configured(&mut self, first: bool) {
        // One view of the layers gives both the values and the problem (one config check).
        let (problem, values) = match &self.layers {
            Ok(l) => {
                let view = l.view();
                (view.problem, Some(view.values))
            }
            Err(e) => (Some(e.clone()), None),
        };
        if let Some(values) = values {
            self.configured_gateway = values.gateway;
            self.view.gateway = self.configured_gateway.clone();
            self.view.user = values.user;
            self.view.services = values
                .services
                .iter()
                .map(|s| ServiceView::new(&s.name, s.local_port, false))
                .collect();
        }
        match (problem, &self.base) {
            (Some(problem), _) => self.base = Phase::NotConfigured { problem },
            (None, Phase::NotConfigured { .. }) => self.base = Phase::SignedOut { reason: None },
            (None, _) if first => self.base = Phase::SignedOut { reason: None },
            _ => {}
        }
    }

    /// Sets, moves or clears `timer` (nothing when it is already so).
    fn arm(&mut self, timer: Timer, at: Option<u64>, out: &mut Vec<Effect>) {
        if self.timers.get(&timer).copied() == at {
            return;
        }
        match at {
            Some(at) => {
                self.timers.insert(timer, at);
                out.push(Effect::SetTimer { timer, at });
            }
            None => {
                self.timers.remove(&timer);
                out.push(Effect::ClearTimer(timer));
            }
        }
    }

    /// Words the view for `now` and shows it when it changed; keeps the time left current.
    fn render(&mut self, now: u64, out: &mut Vec<Effect>) {
        let mut v = self.view.clone();
        v.phase = match &self.flow {
            None => self.base.clone(),
            Some(f) => {
                let purpose = f.purpose;
                match &f.step {
                    Step::Connecting => Phase::Connecting { purpose },
                    Step::Touch { key } => Phase::WaitingForTouch {
                        key: key.clone(),
                        purpose,
                    },
                    Step::Pin { key, retries } => Phase::PinNeeded {
                        key: key.clone(),
                        retries: *retries,
                        purpose,
                    },
                }
            }
        };
        // A grant that ended since the gateway listed it is gone.
        v.delegations.retain(|g| g.expires_at > now);
        if v.granted.as_ref().is_some_and(|g| g.expires_at <= now) {
            v.granted = None;
        }
        v.set_words(now);
        let grants = v
            .delegations
            .iter()
            .flat_map(|g| [time_left_changes(g.expires_at, now), Some(g.expires_at)]);
        let tick = v
            .session
            .as_ref()
            .map(|s| time_left_changes(s.expires_at, now))
            .into_iter()
            .chain(grants)
            .flatten()
            .min();
        self.arm(Timer::Tick, tick, out);
        if self.shown.as_ref() != Some(&v) {
            self.shown = Some(v.clone());
            out.push(Effect::Show(Box::new(v)));
        }
    }
}

#[cfg(test)]
mod tests;

/// `http://NAME.localhost:PORT/` for a web service `name` of `session` on the by-name port.
fn by_name_url(router: Option<u16>, name: &str, session: &Session) -> Option<String> {
    let port = router?;
    (session.services.iter().any(|s| s == name) && !session.tcp.iter().any(|s| s == name))
        .then(|| format!("http://{}.localhost:{port}/", name.to_ascii_lowercase()))
}

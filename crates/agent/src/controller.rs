//! The controller: the one agent core that both front ends drive. A front end sends typed
//! [`Request`]s and implements [`Ui`], which receives every new [`View`] (what to draw) and
//! every [`Notice`] (what to tell the user once). The tray app draws windows and a tray menu,
//! the CLI prints lines; the behaviour lives here and is tested with a fake UI.

use std::{
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use ts_rs::TS;

use crate::{
    AgentConfig, AgentState, RunningAgent, SharedAuthn,
    agent::OnSessionEnd,
    authenticator::{AuthnError, hid::Prompter},
    settings::{ConfigPaths, Layered, Settings, SettingsView},
    tunnel::TunnelError,
};

/// The answer to a second request that needs the key while one is waiting for it.
const BUSY: &str = "already waiting for the key: touch it, or cancel first";

/// How long a PIN prompt waits for an answer before it gives up.
const PIN_WAIT: Duration = Duration::from_secs(300);

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
}

/// Everything a front end draws.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, TS)]
pub struct View {
    /// Where the agent is.
    pub phase: Phase,
    /// The live session, if any.
    pub session: Option<SessionView>,
    /// The configured services.
    pub services: Vec<ServiceView>,
    /// The gateway address.
    pub gateway: String,
    /// The configured user.
    pub user: String,
    /// The last request that failed while a session stayed up (a failed renewal), in words.
    pub error: Option<String>,
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

/// The state in words, as every front end says it (tray tooltip, `touchgate status`).
pub fn describe(view: &View, now: u64) -> String {
    let left = view
        .session
        .as_ref()
        .map(|s| time_left(s.expires_at, now))
        .unwrap_or_default();
    let user = view.session.as_ref().map(|s| s.user.as_str()).unwrap_or("");
    match &view.phase {
        Phase::NotConfigured { .. } => "Not set up yet: open Settings".to_owned(),
        Phase::SignedOut { reason: None } => "Signed out".to_owned(),
        Phase::SignedOut { reason: Some(r) } => format!("Signed out: {r}"),
        Phase::Connecting { .. } => "Connecting to the gateway…".to_owned(),
        Phase::WaitingForTouch { key, .. } => format!("Touch your security key ({key})"),
        Phase::PinNeeded { .. } => "Enter your key's PIN".to_owned(),
        Phase::Connected => format!("Connected as {user} — {left} left"),
        Phase::ExpiringSoon => format!("Session ends in {left}: renew it"),
        Phase::Reconnecting { .. } => "Connection lost — reconnecting…".to_owned(),
        Phase::KeyRemoved => "Signed out: the security key was unplugged".to_owned(),
        Phase::Error { message } => format!("Sign-in failed: {message}"),
    }
}

/// Opens the configured authenticator: `(config, create_soft_key, prompter)`. The default is
/// [`crate::shared_authenticator`]; tests put fake hardware keys behind it.
pub type Opener = Arc<
    dyn Fn(&AgentConfig, bool, Arc<dyn Prompter>) -> Result<SharedAuthn, AuthnError> + Send + Sync,
>;

/// The front end's side of the seam.
pub trait Ui: Send + Sync + 'static {
    /// Draw `view`. Called on every change, in order; keep it quick.
    fn show(&self, view: &View);
    /// Tell the user `notice` once.
    fn notify(&self, notice: &Notice);
}

/// What a [`ChannelUi`] hands on.
#[derive(Debug, Clone)]
pub enum Shown {
    /// A new view.
    View(Box<View>),
    /// A notice.
    Notice(Notice),
}

/// A UI that hands every view and notice to a channel, so the controller never waits for a
/// window or a terminal; the front end's main loop reads the other end.
pub struct ChannelUi(tokio::sync::mpsc::UnboundedSender<Shown>);

impl ChannelUi {
    /// The UI and the receiving end of its channel.
    pub fn new() -> (Arc<Self>, tokio::sync::mpsc::UnboundedReceiver<Shown>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Arc::new(Self(tx)), rx)
    }
}

impl Ui for ChannelUi {
    fn show(&self, view: &View) {
        let _ = self.0.send(Shown::View(Box::new(view.clone())));
    }

    fn notify(&self, notice: &Notice) {
        let _ = self.0.send(Shown::Notice(notice.clone()));
    }
}

/// A request that failed, in words for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ControllerError(pub String);

impl ControllerError {
    fn from_display(e: impl std::fmt::Display) -> Self {
        Self(e.to_string())
    }
}

/// The controller. Cheap to clone; every clone drives the same agent.
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

struct Inner {
    layers: Mutex<Result<Layered, String>>,
    board: Arc<Board>,
    prompts: Arc<Prompts>,
    live: tokio::sync::Mutex<Option<Live>>,
    busy: tokio::sync::Mutex<()>,
    opener: Opener,
}

struct Live {
    agent: Arc<RunningAgent>,
    watcher: JoinHandle<()>,
}

/// The current view and the UI it is shown on.
struct Board {
    ui: Arc<dyn Ui>,
    view: Mutex<View>,
}

impl Board {
    fn update(&self, f: impl FnOnce(&mut View)) {
        let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        let before = v.clone();
        f(&mut v);
        if *v != before {
            // Shown under the lock so that views arrive in the order they were made.
            self.ui.show(&v);
        }
    }

    fn get(&self) -> View {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What the prompter shares with the controller: the PIN answer slot and the cancel flag.
struct Prompts {
    board: Arc<Board>,
    purpose: Mutex<Purpose>,
    cancel: AtomicBool,
    pin: Mutex<Option<mpsc::Sender<Option<SecretString>>>>,
}

impl Prompts {
    fn begin(&self, purpose: Purpose) {
        *self.purpose.lock().unwrap_or_else(|e| e.into_inner()) = purpose;
        self.cancel.store(false, Ordering::SeqCst);
    }

    /// Stops any wait for the key: the watchdog sees the flag, a pending PIN prompt gets none.
    fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.answer(None);
    }

    fn purpose(&self) -> Purpose {
        *self.purpose.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn answer(&self, pin: Option<SecretString>) -> bool {
        match self.pin.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(tx) => tx.send(pin).is_ok(),
            None => false,
        }
    }
}

struct ControllerPrompter(Arc<Prompts>);

impl Prompter for ControllerPrompter {
    fn touch(&self, key: &str) {
        let purpose = self.0.purpose();
        self.0.board.update(|v| {
            v.phase = Phase::WaitingForTouch {
                key: key.to_owned(),
                purpose,
            }
        });
    }

    fn pin(&self, key: &str, retries: Option<i32>) -> Option<SecretString> {
        if self.cancelled() {
            return None;
        }
        let (tx, rx) = mpsc::channel();
        *self.0.pin.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        let purpose = self.0.purpose();
        self.0.board.update(|v| {
            v.phase = Phase::PinNeeded {
                key: key.to_owned(),
                retries,
                purpose,
            }
        });
        let deadline = std::time::Instant::now() + PIN_WAIT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(pin) => return pin,
                Err(mpsc::RecvTimeoutError::Timeout)
                    if !self.cancelled() && std::time::Instant::now() < deadline => {}
                Err(_) => return None,
            }
        }
    }

    fn cancelled(&self) -> bool {
        self.0.cancel.load(Ordering::SeqCst)
    }
}

impl Controller {
    /// A controller over the config layers at `paths`, drawing on `ui`. Signed out; an
    /// unreadable or incomplete config shows as [`Phase::NotConfigured`].
    pub fn new(paths: ConfigPaths, ui: Arc<dyn Ui>) -> Self {
        Self::with_opener(paths, ui, Arc::new(crate::shared_authenticator))
    }

    /// [`Controller::new`] with another way to open the authenticator.
    pub fn with_opener(paths: ConfigPaths, ui: Arc<dyn Ui>, opener: Opener) -> Self {
        let layers = Layered::load(&paths).map_err(|e| e.to_string());
        let board = Arc::new(Board {
            ui,
            view: Mutex::new(View {
                phase: Phase::SignedOut { reason: None },
                session: None,
                services: Vec::new(),
                gateway: String::new(),
                user: String::new(),
                error: None,
            }),
        });
        let prompts = Arc::new(Prompts {
            board: board.clone(),
            purpose: Mutex::new(Purpose::SignIn),
            cancel: AtomicBool::new(false),
            pin: Mutex::new(None),
        });
        let this = Self {
            inner: Arc::new(Inner {
                layers: Mutex::new(layers),
                board,
                prompts,
                live: tokio::sync::Mutex::new(None),
                busy: tokio::sync::Mutex::new(()),
                opener,
            }),
        };
        this.show_configured(true);
        this
    }

    /// What the front ends draw now.
    pub fn view(&self) -> View {
        self.inner.board.get()
    }

    /// The settings with what the organisation fixed.
    pub fn settings(&self) -> Result<SettingsView, ControllerError> {
        self.layers().map(|l| l.view())
    }

    /// The merged config, checked.
    pub fn config(&self) -> Result<AgentConfig, ControllerError> {
        self.layers()?
            .config()
            .map_err(ControllerError::from_display)
    }

    /// The running agent, when signed in.
    pub async fn agent(&self) -> Option<Arc<RunningAgent>> {
        self.inner
            .live
            .lock()
            .await
            .as_ref()
            .map(|l| l.agent.clone())
    }

    /// Carries out `request`; returns when it is done (a sign-in returns after the touch).
    /// Failures come back in words, and show in the view.
    pub async fn handle(&self, request: Request) -> Result<(), ControllerError> {
        match request {
            Request::SignIn => self.sign_in().await,
            Request::Renew => self.renew().await,
            Request::SignOut => {
                self.inner.prompts.cancel();
                self.stop(None).await;
                Ok(())
            }
            Request::Cancel => {
                self.inner.prompts.cancel();
                Ok(())
            }
            Request::SubmitPin { pin } => {
                if self.inner.prompts.answer(Some(SecretString::from(pin))) {
                    Ok(())
                } else {
                    Err(ControllerError(
                        "the key is not asking for a PIN now".into(),
                    ))
                }
            }
            Request::Enrol { code } => self.enrol(code.trim()).await,
            Request::SetServicePort { service, port } => {
                let mut values = self.layers()?.view().values;
                let Some(s) = values.services.iter_mut().find(|s| s.name == service) else {
                    return Err(ControllerError(format!(
                        "there is no service named {service:?} in your settings"
                    )));
                };
                s.local_port = port;
                self.save(values)
            }
            Request::SaveSettings { settings } => self.save(settings),
        }
    }

    /// Signs out and stops every task (Quit).
    pub async fn shutdown(&self) {
        self.inner.prompts.cancel();
        self.stop(None).await;
    }

    fn layers(&self) -> Result<Layered, ControllerError> {
        self.inner
            .layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .map_err(ControllerError)
    }

    /// Shows the configured services and user while signed out; `first` also sets the phase.
    fn show_configured(&self, first: bool) {
        // One view of the layers gives both the values and the problem (one config check).
        let (problem, values) = match self.layers() {
            Ok(l) => {
                let view = l.view();
                (view.problem, Some(view.values))
            }
            Err(e) => (Some(e.0), None),
        };
        self.inner.board.update(|v| {
            if let Some(values) = &values {
                v.gateway = values.gateway.clone();
                v.user = values.user.clone();
                v.services = values
                    .services
                    .iter()
                    .map(|s| service_view(&s.name, s.local_port, false))
                    .collect();
            }
            match (&problem, &v.phase) {
                (Some(p), _) => {
                    v.phase = Phase::NotConfigured { problem: p.clone() };
                }
                (None, Phase::NotConfigured { .. }) => v.phase = Phase::SignedOut { reason: None },
                _ if first => v.phase = Phase::SignedOut { reason: None },
                _ => {}
            }
        });
    }

    fn save(&self, settings: Settings) -> Result<(), ControllerError> {
        let layers = self.layers()?;
        let saved = layers
            .save(&settings)
            .map_err(ControllerError::from_display)?;
        *self.inner.layers.lock().unwrap_or_else(|e| e.into_inner()) = Ok(saved);
        let signed_in = self.inner.board.get().session.is_some();
        if !signed_in {
            self.show_configured(false);
        }
        Ok(())
    }

    async fn sign_in(&self) -> Result<(), ControllerError> {
        let Ok(_busy) = self.inner.busy.try_lock() else {
            return Err(ControllerError(BUSY.into()));
        };
        if self.inner.live.lock().await.is_some() {
            return Ok(());
        }
        let cfg = self.config()?;
        self.inner.prompts.begin(Purpose::SignIn);
        self.inner.board.update(|v| {
            v.phase = Phase::Connecting {
                purpose: Purpose::SignIn,
            };
            v.error = None;
        });
        let result = async {
            let authn = self.open_authenticator(&cfg, false).await?;
            let key = key_name(&authn);
            self.inner.board.update(|v| {
                v.phase = Phase::WaitingForTouch {
                    key,
                    purpose: Purpose::SignIn,
                }
            });
            RunningAgent::start_with(cfg.clone(), authn, OnSessionEnd::Stop)
                .await
                .map_err(|e| match e {
                    crate::agent::AgentError::Tunnel(t) => failure(t),
                    other => Failure::Error(other.to_string()),
                })
        }
        .await;
        match result {
            Ok(agent) => {
                let agent = Arc::new(agent);
                let listeners = agent.listeners().to_vec();
                self.inner.board.update(|v| {
                    v.services = listeners
                        .iter()
                        .map(|(name, addr)| service_view(name, addr.port(), false))
                        .collect();
                });
                if let Some(session) = agent.session() {
                    show_session(&self.inner.board, &session, cfg.renew_reminder);
                }
                let watcher = tokio::spawn(watch(
                    Arc::downgrade(&self.inner),
                    agent.state(),
                    cfg.renew_reminder,
                ));
                *self.inner.live.lock().await = Some(Live { agent, watcher });
                Ok(())
            }
            Err(Failure::Cancelled) => {
                self.inner
                    .board
                    .update(|v| v.phase = Phase::SignedOut { reason: None });
                Err(ControllerError("cancelled".into()))
            }
            Err(Failure::Disabled(reason)) => {
                self.inner.board.update(|v| {
                    v.phase = Phase::SignedOut {
                        reason: Some(reason.clone()),
                    }
                });
                self.inner.board.ui.notify(&Notice::AccountDisabled {
                    reason: reason.clone(),
                });
                Err(ControllerError(reason))
            }
            Err(Failure::Error(message)) => {
                self.inner.board.update(|v| {
                    v.phase = Phase::Error {
                        message: message.clone(),
                    }
                });
                Err(ControllerError(message))
            }
        }
    }

    async fn renew(&self) -> Result<(), ControllerError> {
        let agent = self.agent().await;
        let Some(agent) = agent else {
            return self.sign_in().await;
        };
        let Ok(_busy) = self.inner.busy.try_lock() else {
            return Err(ControllerError(BUSY.into()));
        };
        self.inner.prompts.begin(Purpose::Renew);
        let key = agent.key_name();
        self.inner.board.update(|v| {
            v.error = None;
            v.phase = Phase::WaitingForTouch {
                key,
                purpose: Purpose::Renew,
            };
        });
        match agent.renew().await {
            Ok(session) => {
                let reminder = self.config().map(|c| c.renew_reminder).unwrap_or_default();
                show_session(&self.inner.board, &session, reminder);
                Ok(())
            }
            Err(e) => {
                let message = match failure(e) {
                    Failure::Cancelled => return Err(ControllerError("cancelled".into())),
                    // The agent has stopped; its watcher shows it signed out with the reason.
                    Failure::Disabled(reason) => return Err(ControllerError(reason)),
                    Failure::Error(m) => format!("The session was not renewed: {m}"),
                };
                self.inner.board.update(|v| v.error = Some(message.clone()));
                Err(ControllerError(message))
            }
        }
    }

    async fn enrol(&self, code: &str) -> Result<(), ControllerError> {
        if code.is_empty() {
            return Err(ControllerError(
                "enter the invite code your admin sent you".into(),
            ));
        }
        let Ok(_busy) = self.inner.busy.try_lock() else {
            return Err(ControllerError(BUSY.into()));
        };
        let cfg = self.config()?;
        self.inner.prompts.begin(Purpose::Enrol);
        let before = self.inner.board.get().phase;
        self.inner.board.update(|v| {
            v.phase = Phase::Connecting {
                purpose: Purpose::Enrol,
            };
            v.error = None;
        });
        let result = async {
            let authn = self.open_authenticator(&cfg, true).await?;
            let key = key_name(&authn);
            self.inner.board.update(|v| {
                v.phase = Phase::WaitingForTouch {
                    key: key.clone(),
                    purpose: Purpose::Enrol,
                }
            });
            crate::enroll(&cfg, &authn, code)
                .await
                .map(|_| key)
                .map_err(failure)
        }
        .await;
        match result {
            Ok(key) => {
                self.inner.board.update(|v| v.phase = before);
                self.inner.board.ui.notify(&Notice::Enrolled { key });
                Ok(())
            }
            Err(Failure::Cancelled) => {
                self.inner.board.update(|v| v.phase = before);
                Err(ControllerError("cancelled".into()))
            }
            Err(Failure::Error(m) | Failure::Disabled(m)) => {
                let message = format!("The key was not enrolled: {m}");
                self.inner.board.update(|v| {
                    v.phase = before;
                    v.error = Some(message.clone());
                });
                Err(ControllerError(message))
            }
        }
    }

    async fn open_authenticator(
        &self,
        cfg: &AgentConfig,
        create_soft: bool,
    ) -> Result<SharedAuthn, Failure> {
        let prompter: Arc<dyn Prompter> = Arc::new(ControllerPrompter(self.inner.prompts.clone()));
        let cfg = cfg.clone();
        let opener = self.inner.opener.clone();
        tokio::task::spawn_blocking(move || opener(&cfg, create_soft, prompter))
            .await
            .map_err(|e| Failure::Error(e.to_string()))?
            .map_err(|e| failure(TunnelError::Authenticator(e)))
    }

    /// Ends the session: stops the agent and shows `reason` (None: the user asked).
    async fn stop(&self, reason: Option<(Phase, Notice)>) {
        let live = self.inner.live.lock().await.take();
        if let Some(live) = live {
            live.watcher.abort();
            live.agent.shutdown().await;
        }
        end_view(&self.inner, reason);
    }
}

enum Failure {
    Cancelled,
    /// The gateway refused the user as disabled (its words).
    Disabled(String),
    Error(String),
}

fn failure(e: TunnelError) -> Failure {
    if let Some(reason) = crate::agent::disabled_reason(&e) {
        return Failure::Disabled(reason);
    }
    match e {
        TunnelError::Authenticator(AuthnError::Cancelled) => Failure::Cancelled,
        other => Failure::Error(other.to_string()),
    }
}

fn key_name(authn: &SharedAuthn) -> String {
    authn.lock().unwrap_or_else(|e| e.into_inner()).describe()
}

fn service_view(name: &str, port: u16, live: bool) -> ServiceView {
    ServiceView {
        name: name.to_owned(),
        local_port: port,
        url: if port == 0 {
            String::new()
        } else {
            format!("http://127.0.0.1:{port}")
        },
        live,
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The instant `at` (seconds since the epoch) falls on.
fn instant_at(at: u64) -> tokio::time::Instant {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let left = Duration::from_secs(at).saturating_sub(now);
    tokio::time::Instant::now() + left
}

fn end_view(inner: &Inner, reason: Option<(Phase, Notice)>) {
    let (phase, notice) = match reason {
        Some((p, n)) => (p, Some(n)),
        None => (Phase::SignedOut { reason: None }, None),
    };
    inner.board.update(|v| {
        v.phase = phase;
        v.session = None;
        for s in &mut v.services {
            s.live = false;
        }
    });
    if let Some(n) = notice {
        inner.board.ui.notify(&n);
    }
}

/// Shows a live session: services offered by the gateway are live.
fn show_connected(board: &Board, user: &str, exp: u64, offered: &[String], reminder: Duration) {
    let soon = exp.saturating_sub(now_secs()) <= reminder.as_secs();
    board.update(|v| {
        v.phase = if soon {
            Phase::ExpiringSoon
        } else {
            Phase::Connected
        };
        v.session = Some(SessionView {
            user: user.to_owned(),
            expires_at: exp,
        });
        for sv in &mut v.services {
            sv.live = offered.contains(&sv.name);
        }
    });
}

fn show_session(board: &Board, session: &touchgate_proto::SessionInfo, reminder: Duration) {
    let offered: Vec<String> = session.services.iter().map(|s| s.name.clone()).collect();
    show_connected(board, &session.user, session.expires_at, &offered, reminder);
}

/// Follows the running agent: maps its states onto the view, warns before the session ends,
/// and ends it at its expiry.
async fn watch(
    inner: Weak<Inner>,
    mut state: tokio::sync::watch::Receiver<AgentState>,
    reminder: Duration,
) {
    let mut lost = false;
    let mut warned_for = None;
    let mut expires_at = None;
    loop {
        let Some(this) = inner.upgrade() else { return };
        let s = state.borrow_and_update().clone();
        let board = &this.board;
        match s {
            AgentState::Starting => {}
            AgentState::Connected {
                user,
                expires_at: exp,
                services,
            } => {
                if lost {
                    lost = false;
                    board.ui.notify(&Notice::ConnectionRestored);
                }
                expires_at = Some(exp);
                show_connected(board, &user, exp, &services, reminder);
            }
            AgentState::WaitingForTouch { authenticator } => {
                let purpose = this.prompts.purpose();
                board.update(|v| {
                    v.phase = Phase::WaitingForTouch {
                        key: authenticator,
                        purpose,
                    }
                });
            }
            AgentState::Reconnecting { attempt, reason } => {
                if !lost {
                    lost = true;
                    board.ui.notify(&Notice::ConnectionLost {
                        reason: reason.clone(),
                    });
                }
                board.update(|v| {
                    v.phase = Phase::Reconnecting { attempt, reason };
                    for sv in &mut v.services {
                        sv.live = false;
                    }
                });
            }
            AgentState::SignedOut { reason } => {
                let disabled = this
                    .live
                    .lock()
                    .await
                    .as_ref()
                    .is_some_and(|l| l.agent.account_disabled());
                let notice = if disabled {
                    Notice::AccountDisabled {
                        reason: reason.clone(),
                    }
                } else {
                    Notice::SessionEnded {
                        reason: reason.clone(),
                    }
                };
                end_live(
                    &this,
                    Phase::SignedOut {
                        reason: Some(reason),
                    },
                    notice,
                )
                .await;
                return;
            }
            AgentState::KeyRemoved => {
                end_live(
                    &this,
                    Phase::KeyRemoved,
                    Notice::SessionEnded {
                        reason: "The security key was unplugged, which ended your session.".into(),
                    },
                )
                .await;
                return;
            }
        }
        let warn_at = expires_at
            .filter(|e| warned_for != Some(*e))
            .map(|e| instant_at(e.saturating_sub(reminder.as_secs())));
        let end_at = expires_at.map(instant_at);
        drop(this);
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            () = sleep_until(warn_at) => {
                let Some(this) = inner.upgrade() else { return };
                warned_for = expires_at;
                let left = expires_at.unwrap_or(0).saturating_sub(now_secs());
                this.board.update(|v| {
                    if matches!(v.phase, Phase::Connected) {
                        v.phase = Phase::ExpiringSoon;
                    }
                });
                this.board.ui.notify(&Notice::ExpiringSoon { minutes_left: left.div_ceil(60) });
            }
            () = sleep_until(end_at) => {
                let Some(this) = inner.upgrade() else { return };
                let reason = "Your session reached its end.".to_owned();
                end_live(&this, Phase::SignedOut { reason: Some(reason.clone()) }, Notice::SessionEnded { reason }).await;
                return;
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Ends the session from the watcher (which must not abort itself).
async fn end_live(inner: &Inner, phase: Phase, notice: Notice) {
    let live = inner.live.lock().await.take();
    if let Some(live) = live {
        live.agent.shutdown().await;
    }
    end_view(inner, Some((phase, notice)));
}

/// The TypeScript declarations of every type that crosses the seam, for the tray app's web
/// front end (`ui/src/bindings.ts`; a test keeps the file current).
pub fn typescript_bindings() -> String {
    let cfg = ts_rs::Config::default();
    let decls = [
        Request::decl(&cfg),
        Purpose::decl(&cfg),
        Phase::decl(&cfg),
        SessionView::decl(&cfg),
        ServiceView::decl(&cfg),
        View::decl(&cfg),
        Notice::decl(&cfg),
        crate::settings::ServiceSetting::decl(&cfg),
        Settings::decl(&cfg),
        SettingsView::decl(&cfg),
    ];
    let mut out = String::from(
        "// Generated from the Rust types in crates/agent (controller and settings): do not edit.\n\
         // Regenerate with: TOUCHGATE_BLESS=1 cargo test -p touchgate-agent bindings\n\n",
    );
    for d in decls {
        out.push_str("export ");
        out.push_str(&d);
        out.push_str("\n\n");
    }
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The web front end's types come from these declarations; the committed file must be
    /// what they generate today, so the two cannot drift.
    #[test]
    fn ui_bindings_are_current() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ui/src/bindings.ts");
        let want = typescript_bindings();
        if std::env::var_os("TOUCHGATE_BLESS").is_some() {
            std::fs::write(&path, &want).expect("write bindings");
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} is out of date with the Rust types: run TOUCHGATE_BLESS=1 cargo test -p touchgate-agent bindings",
            path.display()
        );
        assert!(want.contains("export type Request ="), "{want}");
        assert!(want.contains("\"kind\": \"submit_pin\""), "{want}");
    }

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
}

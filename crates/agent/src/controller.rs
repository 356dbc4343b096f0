//! The controller: the one agent core that both front ends drive. A front end sends typed
//! [`Request`]s and implements [`Ui`], which receives every new [`View`] (what to draw) and
//! every [`Notice`] (what to tell the user once). The tray app draws windows and a tray menu,
//! the CLI prints lines.
//!
//! The behaviour lives in [`state::ControllerState`], a state machine with no IO that is tested
//! with a fake clock. [`Controller`] is its thin async shell: it feeds it events (requests, the
//! agent's state, the key's prompts, timers) and carries out the [`state::Effect`]s it returns
//! (open the key, start or stop the agent, show, notify, set a timer, save the settings).

mod error;
mod seam;
pub mod state;
mod view;

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use secrecy::{ExposeSecret, SecretString};
use tokio::task::JoinHandle;

pub use error::{ControllerError, ErrorKind, WireError};
pub use seam::{AppInfo, NAVIGATE_EVENT, NOTICE_EVENT, Route, VIEW_EVENT, typescript_bindings};
pub use view::{
    GrantForm, GrantView, GrantedView, Notice, Organisation, Phase, Purpose, Request, ServiceView,
    SessionView, ShownNotice, View, time_left,
};

use crate::{
    AgentConfig, AgentState, RunningAgent, SharedAuthn,
    agent::{AgentError, OnSessionEnd},
    authenticator::{AuthnError, hid::Prompter},
    delegation::{DelegateKey, DelegationError, GrantRequest},
    settings::{ConfigPaths, Layered, SettingsView},
    tunnel::TunnelError,
    unix_now,
};
pub(crate) use state::tcp_services;
use state::{ControllerState, Effect, Event, Failure, Session, Timer};

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

/// The controller. Cheap to clone; every clone drives the same agent.
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
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
        let grants = paths.grants_dir();
        // The path the window shows and copies works from any folder.
        let grants = std::path::absolute(&grants).unwrap_or(grants);
        let (state, first) = ControllerState::new(layers, unix_now());
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            ui,
            shown: Mutex::new(None),
            opener,
            live: tokio::sync::Mutex::new(None),
            authn: Mutex::new(None),
            pin: Mutex::new(None),
            timers: Mutex::new(HashMap::new()),
            agents: AtomicU64::new(0),
            grants,
        });
        inner.perform_now(first);
        Self { inner }
    }

    /// What the front ends draw now.
    pub fn view(&self) -> View {
        lock(&self.inner.state).view()
    }

    /// The settings with what the organisation fixed.
    pub fn settings(&self) -> Result<SettingsView, ControllerError> {
        lock(&self.inner.state).layers().map(|l| l.view())
    }

    /// The merged config, checked.
    pub fn config(&self) -> Result<AgentConfig, ControllerError> {
        lock(&self.inner.state).config()
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

    /// Serves the status socket at `socket` until the task is dropped: the view for
    /// `touchgate status`, and the user's grants listed and revoked for `touchgate delegations`.
    /// A socket that cannot be served is logged, not fatal.
    #[cfg(unix)]
    pub async fn serve_status(&self, socket: std::path::PathBuf) {
        let c = self.clone();
        let report = move || crate::status::StatusReport { view: c.view() };
        if let Err(e) = crate::status::serve(socket, report, Ok(self.status_commands())).await {
            tracing::warn!(error = %e, "status socket unavailable");
        }
    }

    /// What the status socket carries out for `touchgate delegations`: the user's grants
    /// listed and revoked on the live session, with no touch.
    fn status_commands(&self) -> crate::status::Commands {
        let c = self.clone();
        Arc::new(move |command| {
            let c = c.clone();
            Box::pin(async move { c.command(command).await })
        })
    }

    async fn command(&self, command: crate::status::Command) -> crate::status::Answer {
        use crate::status::{Answer, Command};
        // The gateway's refusal is the answer; anything else (no session, no connection just
        // now) lets the asker sign in on its own.
        let said = |e: TunnelError| match e {
            TunnelError::Refused(r) => Answer::Failed { message: r.message },
            other => Answer::Unavailable {
                message: other.to_string(),
            },
        };
        let Some(agent) = self.agent().await else {
            return Answer::Unavailable {
                message: "not signed in".into(),
            };
        };
        match command {
            Command::ListDelegations => match agent.delegations().await {
                Ok(grants) => Answer::Delegations { grants },
                Err(e) => said(e),
            },
            Command::RevokeDelegation { id } => match agent.revoke_delegation(&id).await {
                Ok(id) => {
                    // The tray's list follows.
                    let _ = self.handle(Request::ListDelegations).await;
                    Answer::Revoked { id }
                }
                Err(e) => said(e),
            },
        }
    }

    /// Carries out `request`; returns when it is done (a sign-in returns after the touch).
    /// Failures come back as a [`ControllerError`], and show in the view.
    pub async fn handle(&self, request: Request) -> Result<(), ControllerError> {
        self.inner.run(Event::Request(request)).await
    }

    /// Signs out and stops every task (Quit).
    pub async fn shutdown(&self) {
        let _ = self.handle(Request::SignOut).await;
        let timers: Vec<_> = lock(&self.inner.timers).drain().collect();
        for (_, t) in timers {
            abort_unless_current(&t);
        }
    }
}

struct Inner {
    state: Mutex<ControllerState>,
    ui: Arc<dyn Ui>,
    /// The last view given to the UI: each Show effect shows the newest view, so a slow task
    /// never shows an older view over a newer one.
    shown: Mutex<Option<View>>,
    opener: Opener,
    live: tokio::sync::Mutex<Option<Live>>,
    /// The key a flow opened, until the agent or the enrolment takes it.
    authn: Mutex<Option<SharedAuthn>>,
    /// Where the answer to the key's pending PIN prompt goes.
    pin: Mutex<Option<mpsc::Sender<Option<SecretString>>>>,
    timers: Mutex<HashMap<Timer, JoinHandle<()>>>,
    agents: AtomicU64,
    /// Where the grants the user makes are written ([`ConfigPaths::grants_dir`]).
    grants: std::path::PathBuf,
}

struct Live {
    id: u64,
    agent: Arc<RunningAgent>,
    watcher: Option<JoinHandle<()>>,
}

impl Inner {
    fn feed(&self, event: Event) -> Vec<Effect> {
        lock(&self.state).handle(event, unix_now())
    }

    /// Feeds `event` and everything its IO leads to; returns the answer to the request that
    /// started it (if it was one).
    async fn run(self: &Arc<Self>, event: Event) -> Result<(), ControllerError> {
        let mut reply = Ok(());
        let mut queue = VecDeque::from([event]);
        while let Some(event) = queue.pop_front() {
            let started = match &event {
                Event::AgentStarted { agent, .. } => Some(*agent),
                _ => None,
            };
            for effect in self.feed(event) {
                let effect = match self.perform_sync(effect) {
                    Ok(()) => continue,
                    Err(e) => e,
                };
                let next = match effect {
                    Effect::Reply(r) => {
                        reply = r;
                        continue;
                    }
                    Effect::OpenAuthenticator {
                        config,
                        create_soft,
                    } => self.open(*config, create_soft).await,
                    Effect::StartAgent { config } => self.start_agent(*config).await,
                    Effect::Renew => self.renew().await,
                    Effect::Enrol { config, code } => {
                        self.enrol(&config, code.expose_secret()).await
                    }
                    Effect::Delegate { grant } => self.delegate(*grant).await,
                    Effect::ListDelegations { answer } => {
                        let grants = match self.live_agent().await {
                            Some(a) => a.delegations().await.map_err(|e| e.to_string()),
                            None => Err("not signed in".into()),
                        };
                        if let Ok(list) = &grants {
                            self.sweep_grant_files(list);
                        }
                        Event::DelegationsListed { grants, answer }
                    }
                    Effect::RevokeDelegation { id } => {
                        let revoked = match self.live_agent().await {
                            Some(a) => a.revoke_delegation(&id).await.map_err(|e| e.to_string()),
                            None => Err("not signed in".into()),
                        };
                        if let Ok(id) = &revoked {
                            self.remove_grant_file(id);
                        }
                        Event::DelegationRevoked(revoked)
                    }
                    Effect::FindOrganisation { config } => Event::OrganisationFound(
                        crate::identity_provider(&config)
                            .await
                            .map_err(|e| e.to_string()),
                    ),
                    Effect::Save { layers, settings } => {
                        Event::Saved(layers.save(&settings).map_err(|e| e.to_string()))
                    }
                    Effect::StopAgent => {
                        self.stop_agent().await;
                        continue;
                    }
                    other => {
                        tracing::debug!(effect = ?other, "effect left undone");
                        continue;
                    }
                };
                queue.push_back(next);
            }
            if let Some(id) = started {
                self.watch(id).await;
            }
        }
        reply
    }

    /// Carries out the effects that need no waiting; hands back the others.
    fn perform_sync(self: &Arc<Self>, effect: Effect) -> Result<(), Effect> {
        match effect {
            Effect::Show(_) => {
                let mut shown = lock(&self.shown);
                let view = lock(&self.state).view();
                if shown.as_ref() != Some(&view) {
                    // Shown under the lock so that views arrive in the order they were made.
                    self.ui.show(&view);
                    *shown = Some(view);
                }
            }
            Effect::Notify(n) => self.ui.notify(&n),
            Effect::AnswerPin(pin) => {
                if let Some(tx) = lock(&self.pin).take() {
                    let _ = tx.send(pin);
                }
            }
            Effect::SetTimer { timer, at } => self.set_timer(timer, at),
            Effect::ClearTimer(timer) => {
                if let Some(t) = lock(&self.timers).remove(&timer) {
                    abort_unless_current(&t);
                }
            }
            other => return Err(other),
        }
        Ok(())
    }

    /// Feeds an event from the key's prompter (a blocking thread), whose effects never wait.
    fn perform_now(self: &Arc<Self>, effects: Vec<Effect>) {
        for effect in effects {
            if let Err(other) = self.perform_sync(effect) {
                tracing::debug!(effect = ?other, "effect left undone");
            }
        }
    }

    fn set_timer(self: &Arc<Self>, timer: Timer, at: u64) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(?timer, "no runtime for the controller's timer");
            return;
        };
        let inner = Arc::downgrade(self);
        let task = rt.spawn(async move {
            tokio::time::sleep_until(instant_at(at)).await;
            if let Some(this) = inner.upgrade() {
                let _ = this.run(Event::Timer(timer)).await;
            }
        });
        if let Some(old) = lock(&self.timers).insert(timer, task) {
            abort_unless_current(&old);
        }
    }

    async fn open(self: &Arc<Self>, config: AgentConfig, create_soft: bool) -> Event {
        let prompter: Arc<dyn Prompter> = Arc::new(ShellPrompter(Arc::downgrade(self)));
        let opener = self.opener.clone();
        match tokio::task::spawn_blocking(move || opener(&config, create_soft, prompter)).await {
            Err(e) => Event::FlowFailed(Failure::Error(e.to_string())),
            Ok(Err(e)) => Event::FlowFailed(failure(TunnelError::Authenticator(e))),
            Ok(Ok(authn)) => {
                let key = lock(&authn).describe();
                *lock(&self.authn) = Some(authn);
                Event::AuthenticatorOpened { key }
            }
        }
    }

    fn opened_key(&self) -> Result<SharedAuthn, Failure> {
        lock(&self.authn)
            .take()
            .ok_or_else(|| Failure::Error("the security key is not open".into()))
    }

    async fn start_agent(&self, config: AgentConfig) -> Event {
        let authn = match self.opened_key() {
            Ok(a) => a,
            Err(f) => return Event::FlowFailed(f),
        };
        match RunningAgent::start_with(config, authn, OnSessionEnd::Stop).await {
            Ok(agent) => {
                let id = self.agents.fetch_add(1, Ordering::Relaxed) + 1;
                let session = agent.session().as_ref().map(|s| Session {
                    gateway: agent.gateway().unwrap_or_default(),
                    transport: agent.transport().unwrap_or_default(),
                    ..Session::from(s)
                });
                let listeners = agent
                    .listeners()
                    .iter()
                    .map(|(name, addr)| (name.clone(), addr.port()))
                    .collect();
                let router = agent.router_addr().map(|a| a.port());
                *self.live.lock().await = Some(Live {
                    id,
                    agent: Arc::new(agent),
                    watcher: None,
                });
                Event::AgentStarted {
                    agent: id,
                    session,
                    listeners,
                    router,
                }
            }
            Err(AgentError::Tunnel(e)) => Event::FlowFailed(failure(e)),
            Err(e) => Event::FlowFailed(Failure::Error(e.to_string())),
        }
    }

    async fn live_agent(&self) -> Option<Arc<RunningAgent>> {
        self.live.lock().await.as_ref().map(|l| l.agent.clone())
    }

    async fn renew(&self) -> Event {
        let Some(agent) = self.live_agent().await else {
            return Event::FlowFailed(Failure::Error("not signed in".into()));
        };
        match agent.renew().await {
            Ok(s) => Event::Renewed(Session::from(&s)),
            Err(e) => Event::FlowFailed(failure(e)),
        }
    }

    /// Approves `form` with a touch of the running agent's key, on a key pair made for the
    /// grant, and writes the grant's file (0600) into the grants folder (0700).
    async fn delegate(&self, form: GrantForm) -> Event {
        let Some(agent) = self.live_agent().await else {
            return Event::FlowFailed(Failure::Error("not signed in".into()));
        };
        // The folder first: a grant is not asked for if its file cannot be kept.
        if let Err(e) = private_dir(&self.grants) {
            return Event::FlowFailed(Failure::Error(format!(
                "cannot make {}: {e}",
                self.grants.display()
            )));
        }
        let request = GrantRequest {
            label: form.label,
            services: form.services,
            methods: form.methods,
            path_prefixes: form.path_prefixes,
            ttl: Duration::from_secs(u64::from(form.minutes) * 60),
        };
        // The touch has its own time limit; this one is for a gateway that stops answering.
        let key = if form.certificate.is_empty() {
            DelegateKey::generate()
        } else {
            DelegateKey::from_certificate_pem(&form.certificate).map_err(DelegationError::Key)
        };
        let made = match key {
            Ok(key) => tokio::time::timeout(DELEGATE_WAIT, agent.delegate(&request, key))
                .await
                .unwrap_or_else(|_| {
                    Err(DelegationError::Tunnel(TunnelError::Protocol(format!(
                        "the gateway did not answer within {} s",
                        DELEGATE_WAIT.as_secs()
                    ))))
                }),
            Err(e) => Err(e),
        };
        let file = match made {
            Ok(f) => f,
            Err(DelegationError::Tunnel(e)) => return Event::FlowFailed(failure(e)),
            Err(e) => return Event::FlowFailed(Failure::Error(e.to_string())),
        };
        let g = &file.grant;
        // The id has the gateway's shape (checked when the grant came back).
        let path = self.grants.join(format!("{}.json", g.id));
        if let Err(e) = file.write_new(&path) {
            return Event::FlowFailed(Failure::Error(format!(
                "the grant {} was made but its file was not written ({e}): revoke it",
                g.id
            )));
        }
        let shown = path.display().to_string();
        let quoted = shlex::try_quote(&shown).map_or_else(|_| shown.clone(), |q| q.into_owned());
        tracing::info!(grant = %g.id, label = %g.grant.label, file = %shown, "grant made");
        let for_key = file.key.key_pem.is_none();
        let key = if for_key { " --key KEY" } else { "" };
        Event::Delegated(Box::new(GrantedView {
            id: g.id.clone(),
            label: g.grant.label.clone(),
            run: format!("touchgate run --delegation {quoted}{key} -- COMMAND"),
            file: shown,
            for_key,
            expires_at: g.grant.expires_at,
        }))
    }

    /// Removes the files of the user's grants that ended (revoked or expired): a grant's file
    /// holds its key, and is kept no longer than the grant.
    fn sweep_grant_files(&self, list: &[touchgate_proto::DelegationInfo]) {
        let now = unix_now();
        for d in list {
            if d.revoked_at.is_some() || d.grant.expires_at <= now {
                self.remove_grant_file(&d.id);
            }
        }
    }

    fn remove_grant_file(&self, id: &str) {
        // Only names of the gateway's shape: a hostile gateway cannot name another file.
        if !crate::delegation::grant_id_ok(id) {
            return;
        }
        let path = self.grants.join(format!("{id}.json"));
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(file = %path.display(), "ended grant's file removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove an ended grant's file")
            }
        }
    }

    async fn enrol(&self, config: &AgentConfig, code: &str) -> Event {
        let authn = match self.opened_key() {
            Ok(a) => a,
            Err(f) => return Event::FlowFailed(f),
        };
        let done = if code.is_empty() {
            crate::enroll_with_idp(config, &authn, &crate::idp::system_browser)
                .await
                .map(|_| ())
        } else {
            crate::enroll(config, &authn, code).await.map(|_| ())
        };
        match done {
            Ok(()) => Event::Enrolled,
            Err(e) => Event::FlowFailed(failure(e)),
        }
    }

    async fn stop_agent(&self) {
        let live = self.live.lock().await.take();
        if let Some(live) = live {
            if let Some(w) = &live.watcher {
                abort_unless_current(w);
            }
            live.agent.shutdown().await;
        }
    }

    /// Follows the agent `id`'s state from now on.
    async fn watch(self: &Arc<Self>, id: u64) {
        let mut live = self.live.lock().await;
        let Some(l) = live.as_mut().filter(|l| l.id == id && l.watcher.is_none()) else {
            return;
        };
        let (inner, agent, state) = (
            Arc::downgrade(self),
            Arc::downgrade(&l.agent),
            l.agent.state(),
        );
        l.watcher = Some(tokio::spawn(watch(inner, id, agent, state)));
    }
}

/// Feeds every state of the agent `id` to the controller until it stops. (Boxed: the
/// controller's own future starts it, so its type cannot name itself.)
fn watch(
    inner: Weak<Inner>,
    id: u64,
    agent: Weak<RunningAgent>,
    mut state: tokio::sync::watch::Receiver<AgentState>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        loop {
            let s = state.borrow_and_update().clone();
            let done = matches!(s, AgentState::SignedOut { .. } | AgentState::KeyRemoved);
            let account_disabled = done && agent.upgrade().is_some_and(|a| a.account_disabled());
            let Some(this) = inner.upgrade() else { return };
            let event = Event::Agent {
                agent: id,
                state: s,
                account_disabled,
            };
            let _ = this.run(event).await;
            drop(this);
            if done || state.changed().await.is_err() {
                return;
            }
        }
    })
}

/// The key's prompts, fed to the controller from the blocking thread that talks to the key.
struct ShellPrompter(Weak<Inner>);

impl Prompter for ShellPrompter {
    fn touch(&self, key: &str) {
        if let Some(inner) = self.0.upgrade() {
            let effects = inner.feed(Event::TouchNeeded {
                key: key.to_owned(),
            });
            inner.perform_now(effects);
        }
    }

    fn pin(&self, key: &str, retries: Option<i32>) -> Option<SecretString> {
        let inner = self.0.upgrade()?;
        let (tx, rx) = mpsc::channel();
        *lock(&inner.pin) = Some(tx);
        let effects = inner.feed(Event::PinNeeded {
            key: key.to_owned(),
            retries,
        });
        inner.perform_now(effects);
        drop(inner);
        // Answered by the user, a cancel, or the controller's PIN timer; or the controller is
        // gone and the sender with it.
        rx.recv().ok().flatten()
    }

    fn cancelled(&self) -> bool {
        self.0
            .upgrade()
            .is_none_or(|inner| lock(&inner.state).cancelled())
    }
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

/// Makes `dir` (and its parents) if needed; the folder itself must be a folder (not a link)
/// of this user's, and is made 0700 if it was wider.
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::symlink_metadata(dir)?;
        let other = |why: &str| {
            Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{} {why}", dir.display()),
            ))
        };
        if !meta.file_type().is_dir() {
            return other("is not a folder (a link?)");
        }
        if crate::peer::own_uid().is_some_and(|me| meta.uid() != me) {
            return other("belongs to another user");
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

/// How long a grant waits for the gateway, the touch included.
const DELEGATE_WAIT: Duration = Duration::from_secs(120);

/// The instant `at` (seconds since the epoch) falls on.
fn instant_at(at: u64) -> tokio::time::Instant {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    tokio::time::Instant::now() + Duration::from_secs(at).saturating_sub(now)
}

/// Stops a task, unless it is the one running this (a timer's or the watcher's own work
/// ends with it stopping or replacing itself; aborting would cut that work short).
fn abort_unless_current(task: &JoinHandle<()>) {
    if tokio::task::try_id() != Some(task.id()) {
        task.abort();
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

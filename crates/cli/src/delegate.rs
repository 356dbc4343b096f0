//! Delegated grants on the command line: `touchgate delegate` (approve one with a touch),
//! `touchgate delegation-key` (a delegate's own key), `touchgate up --delegation` and
//! `touchgate run --delegation` (a headless agent on a grant), `touchgate delegations`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use touchgate_agent::{
    AgentConfig, AgentState, RunningAgent,
    controller::{Phase, ServiceView, SessionView, View},
    delegation::{self, DelegateKey, DelegationFile, GrantRequest},
};

/// `SERVICE=PORT` of `--port`.
pub fn parse_port(s: &str) -> Result<(String, u16), String> {
    let (name, port) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not SERVICE=PORT"))?;
    let port = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port number (0 to 65535)"))?;
    Ok((name.to_owned(), port))
}

/// `touchgate delegate`: one touch approves the grant; FILE gets the token and key.
#[allow(clippy::too_many_arguments)]
pub async fn delegate(
    cfg: AgentConfig,
    authn: touchgate_agent::SharedAuthn,
    services: Vec<String>,
    ttl: Duration,
    label: Option<String>,
    methods: Vec<String>,
    path_prefixes: Vec<String>,
    for_key: Option<PathBuf>,
    out: PathBuf,
) -> anyhow::Result<ExitCode> {
    let key = match &for_key {
        Some(p) => {
            let k = DelegateKey::read(p)?;
            // Only the certificate goes into the grant's file: the key stays where it is.
            DelegateKey {
                cert_pem: k.cert_pem,
                key_pem: None,
            }
        }
        None => DelegateKey::generate()?,
    };
    let label = label.unwrap_or_else(|| format!("delegate of {}", cfg.user));
    let request = GrantRequest {
        label,
        services,
        methods,
        path_prefixes,
        ttl,
    };
    eprintln!(
        "touch your security key to grant {:?} access to {} for {}",
        request.label,
        request.services.join(", "),
        humantime::format_duration(ttl)
    );
    let file = delegation::delegate(&cfg, &authn, &request, key).await?;
    file.write(&out)?;
    let g = &file.grant;
    println!(
        "granted {:?} ({}) until {}; written to {} (mode 0600)",
        g.grant.label,
        g.id,
        when(g.grant.expires_at),
        out.display()
    );
    if for_key.is_some() {
        println!(
            "the file holds no private key: the delegate runs `touchgate up --delegation {} --key KEY`",
            out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn when(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// `touchgate delegation-key --out NAME`: NAME.key (key and certificate, 0600) for the
/// delegate, NAME.crt (the certificate) for whoever grants it access with `--for-key`.
pub fn delegation_key(out: PathBuf) -> anyhow::Result<ExitCode> {
    let key = DelegateKey::generate()?;
    let (k, c) = (out.with_extension("key"), out.with_extension("crt"));
    delegation::write_private(&k, &key.to_pem())?;
    std::fs::write(&c, &key.cert_pem).with_context(|| format!("cannot write {}", c.display()))?;
    println!("key {} (keep it here, mode 0600)", k.display());
    println!(
        "certificate {} (give it to whoever grants access: touchgate delegate --for-key {})",
        c.display(),
        c.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// A headless agent on a grant, with its status socket.
struct Delegated {
    agent: RunningAgent,
    socket: PathBuf,
    status: Option<tokio::task::JoinHandle<()>>,
}

async fn start(
    file: &std::path::Path,
    key: Option<PathBuf>,
    ports: &[(String, u16)],
) -> anyhow::Result<Delegated> {
    let f = DelegationFile::read(file)?;
    let key = key.map(|p| DelegateKey::read(&p)).transpose()?;
    let h = delegation::load_headless(&f, key.as_ref(), ports, None)?;
    let socket = h.cfg.control_socket();
    let (label, user, expires) = (
        h.grant.grant.label.clone(),
        h.grant.user.clone(),
        h.grant.grant.expires_at,
    );
    let agent = RunningAgent::start_delegated(h)
        .await
        .context("the gateway did not take the grant")?;
    eprintln!(
        "using the grant {label:?} of {user} until {}",
        when(expires)
    );
    #[cfg(unix)]
    let status = {
        let listeners = agent.listeners().to_vec();
        let state = agent.state();
        let (label, user) = (label.clone(), user.clone());
        let socket = socket.clone();
        Some(tokio::spawn(async move {
            let report = move || touchgate_agent::status::StatusReport {
                view: view(&label, &user, expires, &listeners, &state.borrow()),
            };
            let refusal = "this agent runs on a grant: it cannot list or revoke grants".to_owned();
            if let Err(e) = touchgate_agent::status::serve(socket, report, Err(refusal)).await {
                tracing::warn!(error = %e, "status socket unavailable");
            }
        }))
    };
    #[cfg(not(unix))]
    let status = None;
    Ok(Delegated {
        agent,
        socket,
        status,
    })
}

/// What `touchgate status` shows of a headless agent.
fn view(
    label: &str,
    user: &str,
    expires: u64,
    listeners: &[(String, std::net::SocketAddr)],
    state: &AgentState,
) -> View {
    let mut v = View {
        user: user.to_owned(),
        services: listeners
            .iter()
            .map(|(n, a)| {
                ServiceView::new(n, a.port(), matches!(state, AgentState::Connected { .. }))
            })
            .collect(),
        ..View::default()
    };
    match state {
        AgentState::Connected {
            gateway, transport, ..
        } => {
            v.phase = Phase::Connected;
            v.session = Some(SessionView {
                user: user.to_owned(),
                expires_at: expires,
            });
            v.gateway = gateway.clone();
            v.transport = transport.clone();
        }
        AgentState::SignedOut { reason } => {
            v.phase = Phase::SignedOut {
                reason: Some(reason.clone()),
            };
        }
        _ => {}
    }
    v.set_words(touchgate_agent::unix_now());
    v.summary = format!("Delegated grant {label:?} of {user}: {}", v.summary);
    v
}

impl Delegated {
    /// Waits for the grant to end (revoked, expired, the user disabled) or `stop`; the words
    /// of its end, if it ended.
    async fn until_ended(&self, stop: impl std::future::Future<Output = ()>) -> Option<String> {
        let mut state = self.agent.state();
        tokio::pin!(stop);
        loop {
            if let AgentState::SignedOut { reason } = &*state.borrow_and_update() {
                return Some(reason.clone());
            }
            tokio::select! {
                () = &mut stop => return None,
                changed = state.changed() => if changed.is_err() { return None },
            }
        }
    }

    async fn shutdown(self) {
        if let Some(t) = self.status {
            t.abort();
            let _ = std::fs::remove_file(&self.socket);
        }
        self.agent.shutdown().await;
    }
}

/// `touchgate up --delegation FILE`: serves the granted services until Ctrl-C, or until the
/// grant ends (exit 6).
pub async fn up(
    file: PathBuf,
    key: Option<PathBuf>,
    ports: Vec<(String, u16)>,
) -> anyhow::Result<ExitCode> {
    let d = start(&file, key, &ports).await?;
    for (name, addr) in d.agent.listeners() {
        println!("service {name} on {addr}");
    }
    let ended = d.until_ended(touchgate_common::shutdown_signal()).await;
    eprintln!("closing tunnels…");
    d.shutdown().await;
    match ended {
        Some(reason) => {
            eprintln!("the grant ended: {reason}");
            Ok(ExitCode::from(6))
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

/// `touchgate run --delegation FILE -- CMD ARGS…`: the tunnels up, `TOUCHGATE_<SERVICE>_URL`
/// exported, CMD run; the tunnels end with it, and its exit code is ours.
pub async fn run(
    file: PathBuf,
    key: Option<PathBuf>,
    ports: Vec<(String, u16)>,
    cmd: Vec<String>,
) -> anyhow::Result<ExitCode> {
    let d = start(&file, key, &ports).await?;
    let (program, args) = cmd.split_first().context("no command to run")?;
    let mut command = std::process::Command::new(program);
    command.args(args);
    let tcp: Vec<String> = match &*d.agent.state().borrow() {
        AgentState::Connected { tcp, .. } => tcp.clone(),
        _ => Vec::new(),
    };
    for (name, addr) in d.agent.listeners() {
        let scheme = if tcp.contains(name) { "tcp" } else { "http" };
        command.env(delegation::url_variable(name), format!("{scheme}://{addr}"));
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            d.shutdown().await;
            anyhow::bail!("cannot run {program}: {e}");
        }
    };
    let stop = touchgate_common::shutdown_signal();
    tokio::pin!(stop);
    let mut state = d.agent.state();
    let mut ended = false;
    let status = loop {
        if let Some(s) = child.try_wait().context("waiting for the command")? {
            break Some(s);
        }
        // The grant ended (revoked, expired, the user disabled): the ports close at once, so
        // the command's next connection is refused rather than held, and it is told why.
        let gone = match &*state.borrow_and_update() {
            AgentState::SignedOut { reason } if !ended => Some(reason.clone()),
            _ => None,
        };
        if let Some(reason) = gone {
            ended = true;
            eprintln!("the grant ended: {reason}; its local ports are closed");
            d.agent.shutdown().await;
        }
        tokio::select! {
            () = &mut stop => break None,
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    };
    let code = match status {
        Some(s) => s
            .code()
            .map_or(ExitCode::FAILURE, |c| ExitCode::from(c as u8)),
        None => {
            // Stopped ourselves: Ctrl-C reached the command too; it has a few seconds to end
            // before it is killed, then the tunnels go.
            for _ in 0..100 {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            ExitCode::from(130)
        }
    };
    d.shutdown().await;
    Ok(code)
}

/// `touchgate delegations [revoke ID]`: one touch signs in to list (or revoke) your grants.
pub async fn delegations(
    cfg: AgentConfig,
    open_key: impl FnOnce() -> anyhow::Result<touchgate_agent::SharedAuthn>,
    revoke: Option<String>,
) -> anyhow::Result<ExitCode> {
    use touchgate_agent::status::{self, Answer, Command};
    // The user's running agent (`touchgate up`, the tray app) asks on its live session: no
    // touch. Otherwise, or when it cannot, sign in on a connection of our own.
    let command = match &revoke {
        Some(id) => Command::RevokeDelegation { id: id.clone() },
        None => Command::ListDelegations,
    };
    // Only an agent of this config's user and gateway is asked (another config may share
    // the socket's default place).
    let fits = |r: &status::StatusReport| {
        let v = &r.view;
        if v.user == cfg.user && cfg.gateway.iter().any(|g| v.gateway.contains(g)) {
            Ok(())
        } else {
            Err(format!(
                "it is {}'s on {}, not {}'s on {}",
                v.user,
                v.gateway,
                cfg.user,
                cfg.gateway.iter().collect::<Vec<_>>().join(", ")
            ))
        }
    };
    let answer = match status::command(&cfg.control_socket(), &command, fits).await {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(error = %e, "cannot ask the running agent");
            None
        }
    };
    let (grants, revoked) = match answer {
        Some(Answer::Delegations { grants }) => (grants, None),
        Some(Answer::Revoked { id }) => (Vec::new(), Some(id)),
        Some(Answer::Failed { message }) => {
            anyhow::bail!("{}", delegation::printable(&message))
        }
        other => {
            if let Some(Answer::Unavailable { message }) = other {
                eprintln!("the running agent cannot ({message}): signing in on its own");
            }
            let authn = open_key()?;
            eprintln!("touch your security key to sign in");
            match &revoke {
                Some(id) => (
                    Vec::new(),
                    Some(delegation::revoke(&cfg, &authn, id).await?),
                ),
                None => (delegation::list(&cfg, &authn).await?, None),
            }
        }
    };
    if let Some(id) = revoked {
        println!(
            "revoked {}: its delegate's connections close within seconds",
            delegation::printable(&id)
        );
        return Ok(ExitCode::SUCCESS);
    }
    if grants.is_empty() {
        println!("no grants");
    }
    let now = touchgate_agent::unix_now();
    for d in &grants {
        println!("{}", delegation::describe(d, now));
    }
    Ok(ExitCode::SUCCESS)
}

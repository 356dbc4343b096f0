//! `touchgate`: the command-line agent. Enrol a key, sign in and expose services on localhost,
//! ask a running agent for its status, or run the whole system on this machine (`demo`).

mod demo;
mod prompt;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use touchgate_agent::{AgentConfig, AgentState, RunningAgent, shared_authenticator};

/// Reach private Cloud Run services from localhost with one touch of a security key.
#[derive(Parser)]
#[command(name = "touchgate", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Enrol the configured security key (or software key) with an invite code.
    Enroll {
        /// The agent config file (default: the platform config folder's agent.toml).
        #[arg(long, env = "TOUCHGATE_CONFIG")]
        config: Option<PathBuf>,
        /// The invite code from your admin.
        #[arg(long, env = "TOUCHGATE_INVITE_CODE")]
        code: String,
        #[command(flatten)]
        pin: PinArgs,
    },
    /// Sign in with one touch and serve every configured service on 127.0.0.1 until Ctrl-C.
    Up {
        /// The agent config file (default: the platform config folder's agent.toml).
        #[arg(long, env = "TOUCHGATE_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        pin: PinArgs,
    },
    /// List the plugged-in security keys: name, AAGUID, PIN, built-in UV, PIN retries.
    Keys,
    /// Say whether an agent is running and what its session is doing.
    Status {
        /// The agent config file (default: the platform config folder's agent.toml).
        #[arg(long, env = "TOUCHGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run gateway, Cloud-Run-like service, software key and agent on this machine, make one
    /// request through the tunnel, and keep serving until Ctrl-C.
    Demo {
        /// Exit after the first request (0 if it succeeded).
        #[arg(long)]
        once: bool,
        /// Local port for the demo service (falls back to a free port when taken).
        #[arg(long, default_value_t = 8081, env = "TOUCHGATE_DEMO_PORT")]
        port: u16,
    },
}

/// Where a security key's PIN comes from when it needs one (default: asked on the terminal).
#[derive(clap::Args)]
struct PinArgs {
    /// Read the PIN from the first line of this file, e.g. /dev/fd/3 (less safe than typing it).
    #[arg(long, env = "TOUCHGATE_PIN_FILE")]
    pin_file: Option<PathBuf>,
}

impl PinArgs {
    fn prompter(&self) -> std::sync::Arc<dyn touchgate_agent::authenticator::hid::Prompter> {
        // TOUCHGATE_PIN is read here, not through clap, so that it never shows in --help output.
        let source = match (&self.pin_file, std::env::var("TOUCHGATE_PIN")) {
            (Some(p), _) => prompt::PinSource::File(p.clone()),
            (None, Ok(v)) if !v.is_empty() => prompt::PinSource::Value(v.into()),
            _ => prompt::PinSource::Terminal,
        };
        std::sync::Arc::new(prompt::TerminalPrompter::new(source))
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.cmd {
        Cmd::Demo { .. } => "warn",
        _ => "info",
    };
    touchgate_common::init_logging(default_level);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("touchgate: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("touchgate: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<PathBuf>) -> anyhow::Result<AgentConfig> {
    let path = match path {
        Some(p) => p,
        None => AgentConfig::default_path()?,
    };
    Ok(AgentConfig::load(&path)?)
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.cmd {
        Cmd::Enroll { config, code, pin } => {
            let cfg = load_config(config)?;
            let authn = shared_authenticator(&cfg, true, pin.prompter())?;
            let what = authn.lock().map(|a| a.describe()).unwrap_or_default();
            let id = touchgate_agent::enroll(&cfg, &authn, &code).await?;
            println!("enrolled {what} for {} (credential {id})", cfg.user);
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Up { config, pin } => up(load_config(config)?, pin.prompter()).await,
        Cmd::Keys => keys(),
        Cmd::Status { config } => {
            let cfg = load_config(config)?;
            match touchgate_agent::status::query(&cfg.control_socket()).await? {
                None => {
                    println!(
                        "not running (no agent answers on {})",
                        cfg.control_socket().display()
                    );
                    Ok(std::process::ExitCode::from(3))
                }
                Some(report) => {
                    match serde_json::from_value::<AgentState>(report.state.clone()) {
                        Ok(state) => println!("{}", describe_state(&state)),
                        Err(_) => println!("{}", report.state),
                    }
                    for (name, addr) in report.services {
                        println!("service {name} on {addr}");
                    }
                    Ok(std::process::ExitCode::SUCCESS)
                }
            }
        }
        Cmd::Demo { once, port } => demo::run(once, port).await,
    }
}

fn keys() -> anyhow::Result<std::process::ExitCode> {
    use touchgate_agent::authenticator::device::{FidoDevice, list_hid_devices};
    let devices = list_hid_devices()?;
    if devices.is_empty() {
        println!("no security key found: plug one in and try again");
        return Ok(std::process::ExitCode::from(3));
    }
    for d in devices {
        match d.info() {
            Ok(i) => {
                let pin = match i.client_pin {
                    Some(true) => "PIN set",
                    Some(false) => "no PIN set",
                    None => "no PIN support",
                };
                let retries = i
                    .pin_retries
                    .map(|r| format!(", {r} PIN retries left"))
                    .unwrap_or_default();
                let uv = if i.builtin_uv { ", built-in UV" } else { "" };
                println!(
                    "{}  {}  AAGUID {}  {pin}{uv}{retries}",
                    i.product, i.path, i.aaguid
                );
            }
            Err(e) => println!("a key that does not answer: {e}"),
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn up(
    cfg: AgentConfig,
    prompter: std::sync::Arc<dyn touchgate_agent::authenticator::hid::Prompter>,
) -> anyhow::Result<std::process::ExitCode> {
    let authn = shared_authenticator(&cfg, false, prompter)?;
    let socket = cfg.control_socket();
    let agent = RunningAgent::start(cfg, authn)
        .await
        .context("sign-in failed")?;
    if let Some(s) = agent.session() {
        eprintln!(
            "signed in as {} until {}",
            s.user,
            format_time(s.expires_at)
        );
    }
    for (name, addr) in agent.listeners() {
        println!("service {name} on {addr}");
    }
    #[cfg(unix)]
    let status_task = {
        let state = agent.state();
        let listeners = agent.listeners().to_vec();
        let socket = socket.clone();
        tokio::spawn(async move {
            if let Err(e) = touchgate_agent::status::serve(socket, state, listeners).await {
                tracing::warn!(error = %e, "status socket unavailable");
            }
        })
    };
    let mut state = agent.state();
    let printer = tokio::spawn(async move {
        while state.changed().await.is_ok() {
            let s = state.borrow_and_update().clone();
            eprintln!("{}", describe_state(&s));
            if matches!(s, AgentState::KeyRemoved) {
                return true;
            }
        }
        false
    });
    let key_removed = tokio::select! {
        _ = touchgate_common::shutdown_signal() => false,
        removed = printer => removed.unwrap_or(false),
    };
    eprintln!("closing tunnels…");
    #[cfg(unix)]
    {
        status_task.abort();
        let _ = std::fs::remove_file(&socket);
    }
    agent.shutdown().await;
    if key_removed {
        return Ok(std::process::ExitCode::from(4));
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn describe_state(s: &AgentState) -> String {
    match s {
        AgentState::Starting => "starting".into(),
        AgentState::WaitingForTouch { authenticator } => {
            format!("waiting for a touch on {authenticator}")
        }
        AgentState::Connected {
            user,
            expires_at,
            services,
        } => format!(
            "connected as {user}, session until {}, services: {}",
            format_time(*expires_at),
            services.join(", ")
        ),
        AgentState::Reconnecting { attempt: 0, reason } => format!("{reason}; reconnecting"),
        AgentState::Reconnecting { attempt, reason } => {
            format!("reconnecting (attempt {attempt}): {reason}")
        }
        AgentState::SignedOut { reason } => format!("signed out: {reason}"),
        AgentState::KeyRemoved => "the security key was unplugged, so the session ended: plug it back in and run `touchgate up` again".into(),
    }
}

fn format_time(expires_at: u64) -> String {
    format!("{} from now", time_left(expires_at))
}

/// Time from now until `expires_at` (seconds since the epoch), as `3h07m`.
fn time_left(expires_at: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let secs = expires_at.saturating_sub(now);
    format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
}

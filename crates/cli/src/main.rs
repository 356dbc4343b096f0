//! `touchgate`: the command-line agent. Enrol a key, sign in and expose services on localhost,
//! ask a running agent for its status, or change the settings. The demo is a program of its own
//! (`crates/demo`), so that this binary links no test fake and no gateway.

mod delegate;
mod prompt;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use touchgate_agent::{
    AgentConfig,
    controller::{ChannelUi, Controller, Notice, Phase, Request, Shown, View},
    settings::{ConfigPaths, Layered},
    shared_authenticator,
};

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
        /// The invite code from your admin. Without it, touchgate asks for it (typing is not
        /// shown), or reads one line from standard input when that is not a terminal:
        /// `touchgate enroll < code.txt`. A code on the command line can be read by other
        /// users of this machine (in `ps`).
        #[arg(long, env = "TOUCHGATE_INVITE_CODE", hide_env_values = true)]
        code: Option<String>,
        /// Enrol by signing in with your organisation's account in the browser instead of an
        /// invite (gateways with an identity provider). Without `--code`, on a terminal, this
        /// is tried first anyway.
        #[arg(long, conflicts_with = "code")]
        org: bool,
        /// For a machine without a browser: sign in with your organisation on any other
        /// device, with a code this prints.
        #[arg(long, conflicts_with = "code")]
        device: bool,
        #[command(flatten)]
        pin: PinArgs,
    },
    /// Sign in with one touch and serve every configured service on 127.0.0.1 until Ctrl-C;
    /// with --delegation, serve a delegated grant's services instead, without a key.
    Up {
        /// The agent config file (default: the platform config folder's agent.toml).
        #[arg(long, env = "TOUCHGATE_CONFIG", conflicts_with = "delegation")]
        config: Option<PathBuf>,
        #[command(flatten)]
        pin: PinArgs,
        #[command(flatten)]
        grant: GrantArgs,
    },
    /// Run a command with a delegated grant's services on localhost: exports
    /// TOUCHGATE_<SERVICE>_URL for each, and ends the tunnels when the command exits.
    Run {
        #[command(flatten)]
        grant: GrantArgs,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Grant a script, CI job or AI agent narrow, expiring access of yours, with one touch:
    /// writes FILE (mode 0600) for `touchgate up --delegation FILE` or `touchgate run`.
    Delegate {
        /// The agent config file (default: the platform config folder's agent.toml).
        #[arg(long, env = "TOUCHGATE_CONFIG")]
        config: Option<PathBuf>,
        /// The services granted, comma-separated.
        #[arg(long = "service", value_delimiter = ',', required = true)]
        services: Vec<String>,
        /// How long the grant lasts (the gateway caps it: 8h unless its admin says otherwise).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Who it is for, in words: the upstream sees it in X-Touchgate-Delegate.
        #[arg(long)]
        name: Option<String>,
        /// HTTP methods allowed, comma-separated (default: any).
        #[arg(long, value_delimiter = ',')]
        methods: Vec<String>,
        /// A path prefix allowed, e.g. /v1/ (repeat for more; default: any path).
        #[arg(long = "path-prefix")]
        path_prefixes: Vec<String>,
        /// Grant to a key made elsewhere (`touchgate delegation-key` on the delegate's
        /// machine): its certificate file. FILE then holds no private key.
        #[arg(long)]
        for_key: Option<PathBuf>,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        pin: PinArgs,
    },
    /// Make a delegate's own key: NAME.key (mode 0600) stays with the delegate, NAME.crt goes to
    /// whoever grants it access (`touchgate delegate --for-key NAME.crt`).
    DelegationKey {
        /// NAME (the files are NAME.key and NAME.crt).
        #[arg(long)]
        out: PathBuf,
    },
    /// List your delegated grants, or revoke one: through your running agent with no touch,
    /// else with one.
    Delegations {
        /// The agent config file (default: the platform config folder's agent.toml).
        #[arg(long, env = "TOUCHGATE_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        cmd: Option<DelegationsCmd>,
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
    /// Show the settings in force, and which ones your organisation set.
    Config {
        /// The agent config file (default: the platform config folder's agent.toml).
        #[arg(long, env = "TOUCHGATE_CONFIG")]
        config: Option<PathBuf>,
        #[command(subcommand)]
        cmd: Option<ConfigCmd>,
    },
    /// The demo (gateway, Cloud-Run-like service and software key on this machine) is a program
    /// of its own in development builds: this only says how to run it.
    Demo {
        /// Whatever follows `demo` (the demo program takes `--once` and `--port`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DelegationsCmd {
    /// End a grant within seconds, by its id or label.
    Revoke {
        /// The grant's id or label.
        id: String,
    },
}

/// A delegated grant to run on.
#[derive(clap::Args)]
struct GrantArgs {
    /// The file `touchgate delegate` wrote.
    #[arg(long, env = "TOUCHGATE_DELEGATION")]
    delegation: Option<PathBuf>,
    /// The delegate's key file, when the grant was made for a key held here (--for-key).
    #[arg(long, requires = "delegation")]
    key: Option<PathBuf>,
    /// A service's local port, SERVICE=PORT (repeat; default: a free port each).
    #[arg(long = "port", value_parser = delegate::parse_port, requires = "delegation")]
    ports: Vec<(String, u16)>,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the merged settings (the default).
    Show,
    /// Change the local port of one service in your config file.
    SetPort {
        /// The service.
        service: String,
        /// The new port on 127.0.0.1 (0: a free one at each sign-in).
        port: u16,
    },
    /// Check an organisation's managed file before shipping it (exit 1 on a problem).
    CheckManaged {
        /// The managed TOML file.
        file: PathBuf,
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
    touchgate_common::init_logging("info");
    // One thread: a tunnel is one QUIC connection, driven by one task, so more threads only
    // add wake-ups between them; and on one thread the connection driver runs after the local
    // connections that woke it, and sends what they wrote in one datagram instead of one each.
    // (Key and PIN prompts run on the blocking pool.)
    let rt = match tokio::runtime::Builder::new_current_thread()
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

/// The config layers: the user's file (given or the platform default) under the admin's
/// managed file.
fn config_paths(path: Option<PathBuf>) -> anyhow::Result<ConfigPaths> {
    Ok(match path {
        Some(p) => ConfigPaths::with_user(p),
        None => ConfigPaths::platform()?,
    })
}

fn load_config(path: Option<PathBuf>) -> anyhow::Result<AgentConfig> {
    Ok(Layered::load(&config_paths(path)?)?.config()?)
}

/// The config and its (enrolled) key, for commands that ask for a touch.
fn with_key(
    path: Option<PathBuf>,
    pin: &PinArgs,
) -> anyhow::Result<(AgentConfig, touchgate_agent::SharedAuthn)> {
    let cfg = load_config(path)?;
    let authn = shared_authenticator(&cfg, false, pin.prompter())?;
    Ok((cfg, authn))
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.cmd {
        Cmd::Enroll {
            config,
            code,
            org,
            device,
            pin,
        } => enroll(load_config(config)?, code, org, device, pin).await,
        Cmd::Up {
            grant:
                GrantArgs {
                    delegation: Some(file),
                    key,
                    ports,
                },
            ..
        } => delegate::up(file, key, ports).await,
        Cmd::Up { config, pin, .. } => up(config_paths(config)?, pin.prompter()).await,
        Cmd::Run { grant, cmd } => {
            let file = grant
                .delegation
                .context("touchgate run needs --delegation FILE (or TOUCHGATE_DELEGATION)")?;
            delegate::run(file, grant.key, grant.ports, cmd).await
        }
        Cmd::Delegate {
            config,
            services,
            ttl,
            name,
            methods,
            path_prefixes,
            for_key,
            out,
            pin,
        } => {
            let (cfg, authn) = with_key(config, &pin)?;
            delegate::delegate(
                cfg,
                authn,
                services,
                ttl,
                name,
                methods,
                path_prefixes,
                for_key,
                out,
            )
            .await
        }
        Cmd::DelegationKey { out } => delegate::delegation_key(out),
        Cmd::Delegations { config, cmd, pin } => {
            let cfg = load_config(config.clone())?;
            let revoke = cmd.map(|DelegationsCmd::Revoke { id }| id);
            delegate::delegations(cfg, || Ok(with_key(config, &pin)?.1), revoke).await
        }
        Cmd::Config { config, cmd } => config_cmd(config_paths(config)?, cmd),
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
                    println!("{}", report.view.summary);
                    if report.view.session.is_some() {
                        println!("gateway {}", report.view.gateway);
                        if !report.view.transport.is_empty() {
                            println!("transport {}", report.view.transport);
                        }
                    }
                    print_services(&report.view);
                    Ok(std::process::ExitCode::SUCCESS)
                }
            }
        }
        Cmd::Demo { .. } => {
            eprintln!("{DEMO_ELSEWHERE}");
            Ok(std::process::ExitCode::from(2))
        }
    }
}

/// What `touchgate demo` says: the demo runs on test fakes and the whole gateway, which the
/// installed CLI does not carry.
const DEMO_ELSEWHERE: &str = "touchgate: the demo is not part of the installed touchgate; it is a program of its own \
in development builds: from a checkout of the source, run ./scripts/demo (or cargo run -p touchgate-demo)";

/// The invite code: from `--code` (with a warning when it was on the command line), else asked
/// without echo on a terminal, else the first line of standard input.
fn invite_code(given: Option<String>) -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal};
    if let Some(code) = given {
        if std::env::args().any(|a| a == "--code" || a.starts_with("--code=")) {
            eprintln!(
                "touchgate: warning: other users of this machine can read a command line (in `ps`): \
                 next time leave out --code and type the code when asked, or pipe it in: \
                 touchgate enroll < code.txt"
            );
        }
        return Ok(code);
    }
    let code = if std::io::stdin().is_terminal() {
        rpassword::prompt_password("Invite code from your admin (not shown): ")
            .context("cannot read the invite code from the terminal")?
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the invite code from standard input")?;
        line
    };
    let code = code.trim().to_owned();
    anyhow::ensure!(
        !code.is_empty(),
        "no invite code given: type the code your admin sent you when asked, or pipe it in (touchgate enroll < code.txt)"
    );
    Ok(code)
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

fn print_services(view: &View) {
    for s in &view.services {
        let at = match (s.local_port, s.by_name.as_str()) {
            (0, "") => "on a free port at sign-in".to_owned(),
            (0, by_name) => format!("at {by_name}"),
            (port, "") => format!("on 127.0.0.1:{port}"),
            (port, by_name) => format!("on 127.0.0.1:{port} and at {by_name}"),
        };
        let live = if s.live { "" } else { " (not live)" };
        println!("service {} {at}{live}", s.name);
    }
}

/// `touchgate up`: the controller with terminal prompts; signs in again with a touch when the
/// gateway ends the session, and stops when the key is unplugged (exit 4) or the gateway says
/// the account is disabled (exit 5).
async fn up(
    paths: ConfigPaths,
    prompter: std::sync::Arc<dyn touchgate_agent::authenticator::hid::Prompter>,
) -> anyhow::Result<std::process::ExitCode> {
    let (ui, mut rx) = ChannelUi::new();
    let controller = Controller::with_opener(
        paths,
        ui,
        std::sync::Arc::new(move |cfg, create, _controller_prompter| {
            shared_authenticator(cfg, create, prompter.clone())
        }),
    );
    let cfg = controller.config()?;
    let socket = cfg.control_socket();
    controller
        .handle(Request::SignIn)
        .await
        .context("sign-in failed")?;
    let view = controller.view();
    if let (Some(s), Some(left)) = (&view.session, &view.time_left) {
        eprintln!("signed in as {} until {left} from now", s.user);
    }
    print_services(&view);
    #[cfg(unix)]
    let status_task = {
        let c = controller.clone();
        let socket = socket.clone();
        tokio::spawn(async move { c.serve_status(socket).await })
    };
    let mut last_phase = std::mem::discriminant(&view.phase);
    // One listener for the whole run: one made anew on each turn of the loop would miss a
    // SIGTERM that arrives while a view is being printed (and then nothing would stop us).
    let shutdown = touchgate_common::shutdown_signal();
    tokio::pin!(shutdown);
    let code = loop {
        let shown = tokio::select! {
            _ = &mut shutdown => break 0,
            shown = rx.recv() => shown,
        };
        match shown {
            None => break 0,
            Some(Shown::View(v)) => {
                if matches!(v.phase, Phase::KeyRemoved) {
                    eprintln!(
                        "the security key was unplugged, so the session ended: plug it back in and run `touchgate up` again"
                    );
                    break 4;
                }
                // Changes of state, not every change of the time left.
                let phase = std::mem::discriminant(&v.phase);
                if phase != last_phase {
                    eprintln!("{}", v.summary);
                    last_phase = phase;
                }
            }
            Some(Shown::Notice(Notice::ExpiringSoon { minutes_left })) => eprintln!(
                "your session ends in {minutes_left} min; then touchgate asks for a touch to sign in again"
            ),
            Some(Shown::Notice(Notice::AccountDisabled { reason })) => {
                eprintln!("signed out: {reason}");
                break 5;
            }
            Some(Shown::Notice(Notice::SessionEnded { reason })) => {
                eprintln!("{reason} Touch your key to sign in again.");
                let c = controller.clone();
                tokio::spawn(async move {
                    if let Err(e) = c.handle(Request::SignIn).await {
                        eprintln!("sign-in failed: {e}");
                    }
                });
            }
            Some(Shown::Notice(n)) => eprintln!("{}", n.body()),
        }
    };
    eprintln!("closing tunnels…");
    #[cfg(unix)]
    {
        status_task.abort();
        let _ = std::fs::remove_file(&socket);
    }
    controller.shutdown().await;
    Ok(std::process::ExitCode::from(code))
}

/// `touchgate config`: the merged settings, with what the organisation set marked; `set-port`
/// changes the user's file unless the organisation fixed that service.
fn config_cmd(
    paths: ConfigPaths,
    cmd: Option<ConfigCmd>,
) -> anyhow::Result<std::process::ExitCode> {
    if let Some(ConfigCmd::CheckManaged { file }) = &cmd {
        return match touchgate_agent::settings::check_managed(file) {
            Ok(locked) => {
                println!(
                    "{}: OK; sets and locks: {}",
                    file.display(),
                    locked.join(", ")
                );
                Ok(std::process::ExitCode::SUCCESS)
            }
            Err(e) => {
                println!("{}: {e}", file.display());
                Ok(std::process::ExitCode::FAILURE)
            }
        };
    }
    let layers = Layered::load(&paths)?;
    match cmd.unwrap_or(ConfigCmd::Show) {
        ConfigCmd::CheckManaged { .. } => unreachable!("handled above"),
        ConfigCmd::Show => {
            print!("{}", show_settings(&layers));
            Ok(std::process::ExitCode::SUCCESS)
        }
        ConfigCmd::SetPort { service, port } => {
            let mut values = layers.view().values;
            let Some(s) = values.services.iter_mut().find(|s| s.name == service) else {
                anyhow::bail!("there is no service named {service:?} in your settings");
            };
            s.local_port = port;
            match layers.save(&values) {
                Ok(_) => {
                    println!(
                        "service {service} now uses 127.0.0.1:{port} (from the next `touchgate up`)"
                    );
                    Ok(std::process::ExitCode::SUCCESS)
                }
                Err(touchgate_agent::settings::SaveError::Locked(what)) => {
                    eprintln!(
                        "touchgate: {what} is set by your organisation and cannot be changed"
                    );
                    Ok(std::process::ExitCode::from(2))
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// The settings as `touchgate config` prints them.
fn show_settings(layers: &Layered) -> String {
    let v = layers.view();
    let mark = |key: &str| {
        if layers.is_locked(key) {
            "  (set by your organisation)"
        } else {
            ""
        }
    };
    let s = &v.values;
    let mut out = String::new();
    for (k, val) in [
        ("gateway", s.gateway.clone()),
        ("gateway_cert_sha256", s.gateway_cert_sha256.clone()),
        ("user", s.user.clone()),
        ("authenticator", s.authenticator.clone()),
        ("lock_on_key_removal", s.lock_on_key_removal.to_string()),
        (
            "renew_reminder",
            format!("{} min", s.renew_reminder_minutes),
        ),
        ("autostart", s.autostart.to_string()),
        ("sign_in_on_launch", s.sign_in_on_launch.to_string()),
        (
            "rp_id",
            if s.rp_id.is_empty() {
                "(the gateway's TLS name)".to_owned()
            } else {
                s.rp_id.clone()
            },
        ),
        ("allow_other_users", s.allow_other_users.to_string()),
    ] {
        out.push_str(&format!("{k:<22}{val}{}\n", mark(k)));
    }
    for svc in &s.services {
        out.push_str(&format!(
            "service {:<14}127.0.0.1:{}{}\n",
            svc.name,
            svc.local_port,
            mark(&format!("service.{}", svc.name))
        ));
        for (what, list) in [
            ("allowed_hosts", &svc.allowed_hosts),
            ("allowed_origins", &svc.allowed_origins),
        ] {
            if !list.is_empty() {
                out.push_str(&format!("  {what:<20}{}\n", list.join(", ")));
            }
        }
    }
    if layers.is_locked(touchgate_agent::settings::SERVICES_LOCK) {
        out.push_str("(your organisation chooses the services)\n");
    }
    out.push_str(&format!("your file: {}\n", v.user_file));
    if let Some(m) = &v.managed_file {
        out.push_str(&format!("organisation's file: {m}\n"));
    }
    if let Some(p) = &v.problem {
        out.push_str(&format!("not usable yet: {p}\n"));
    }
    out
}

/// `touchgate enroll`: through the organisation's identity provider when asked (`--org`,
/// `--device`) or when no invite was given on a terminal and the gateway has one; else with
/// the invite code.
async fn enroll(
    cfg: touchgate_agent::AgentConfig,
    code: Option<String>,
    org: bool,
    device: bool,
    pin: PinArgs,
) -> anyhow::Result<std::process::ExitCode> {
    use touchgate_agent::tunnel::TunnelError;
    let authn = shared_authenticator(&cfg, true, pin.prompter())?;
    let what = authn.lock().map(|a| a.describe()).unwrap_or_default();
    let try_org =
        org || device || (code.is_none() && std::io::IsTerminal::is_terminal(&std::io::stdin()));
    if try_org {
        let done = if device {
            touchgate_agent::enroll_with_device(&cfg, &authn, &show_device_code).await
        } else {
            touchgate_agent::enroll_with_idp(&cfg, &authn, &open_browser).await
        };
        match done {
            Ok((id, user)) => {
                println!("enrolled {what} for {user} (credential {id})");
                if user != cfg.user {
                    eprintln!(
                        "your organisation names you {user}: set user = \"{user}\" in the agent config"
                    );
                }
                return Ok(std::process::ExitCode::SUCCESS);
            }
            // The gateway has no identity provider: an invite it is, unless one was asked for.
            Err(TunnelError::Refused(r))
                if r.code == touchgate_proto::RefusalCode::NoIdentityProvider
                    && !org
                    && !device => {}
            Err(e) => return Err(e.into()),
        }
    }
    let code = invite_code(code)?;
    let id = touchgate_agent::enroll(&cfg, &authn, &code).await?;
    println!("enrolled {what} for {} (credential {id})", cfg.user);
    Ok(std::process::ExitCode::SUCCESS)
}

/// Tells the user where to finish a device enrolment.
fn show_device_code(d: &touchgate_agent::tunnel::DeviceCode) {
    eprintln!(
        "Sign in with {} on any device: open {} and enter the code {} (within {} minutes).",
        d.name,
        d.verification_uri,
        d.user_code,
        d.expires_in / 60
    );
    if let Some(full) = &d.verification_uri_complete {
        eprintln!("(or open {full})");
    }
}

/// Shows the sign-in page: in the system browser when there is one, and always on the
/// terminal (the loopback address it returns to must be reached from this computer).
fn open_browser(url: &str) -> Result<(), String> {
    eprintln!("Sign in with your organisation in the browser:\n  {url}");
    if let Err(e) = touchgate_agent::idp::system_browser(url) {
        eprintln!("({e}: open the address above on this computer)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_marks_what_the_organisation_set_and_refuses_to_change_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = ConfigPaths {
            user: dir.path().join("agent.toml"),
            managed: Some(dir.path().join("managed.toml")),
        };
        std::fs::write(
            &paths.user,
            "user = \"alice\"\n[[service]]\nname = \"mine\"\nlocal_port = 7000\n",
        )
        .expect("user");
        std::fs::write(
            paths.managed.as_ref().expect("managed"),
            format!(
                "gateway = \"gw.corp.example:4433\"\ngateway_cert_sha256 = \"{}\"\nallow_other_users = false\n[[service]]\nname = \"api\"\nlocal_port = 8081\nallowed_origins = [\"http://localhost:3000\"]\n",
                "ab".repeat(32)
            ),
        )
        .expect("managed");
        let layers = Layered::load(&paths).expect("load");
        let shown = show_settings(&layers);
        assert!(
            shown.contains(
                "gateway               gw.corp.example:4433  (set by your organisation)\n"
            ),
            "{shown}"
        );
        assert!(shown.contains("user                  alice\n"), "{shown}");
        assert!(
            shown.contains("service api           127.0.0.1:8081  (set by your organisation)\n"),
            "{shown}"
        );
        assert!(
            shown.contains("service mine          127.0.0.1:7000\n"),
            "{shown}"
        );
        assert!(
            shown.contains("  allowed_origins     http://localhost:3000\n"),
            "{shown}"
        );
        assert!(
            shown.contains("allow_other_users     false  (set by your organisation)\n"),
            "{shown}"
        );
        assert!(
            shown.contains("rp_id                 (the gateway's TLS name)\n"),
            "{shown}"
        );
        let code = config_cmd(
            paths.clone(),
            Some(ConfigCmd::SetPort {
                service: "api".into(),
                port: 9000,
            }),
        )
        .expect("runs");
        assert_eq!(code, std::process::ExitCode::from(2));
        let code = config_cmd(
            paths.clone(),
            Some(ConfigCmd::SetPort {
                service: "mine".into(),
                port: 7001,
            }),
        )
        .expect("runs");
        assert_eq!(code, std::process::ExitCode::SUCCESS);
        let text = std::fs::read_to_string(&paths.user).expect("read");
        assert!(
            text.contains("local_port = 7001") && !text.contains("8081"),
            "{text}"
        );
    }
}

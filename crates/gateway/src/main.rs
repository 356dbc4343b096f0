//! `touchgate-gateway`: run the gateway; manage users (invite, list, revoke, disable, enable,
//! remove) beside a serving gateway on the same database; report on access from the audit log;
//! make development certificates.

/// mimalloc: the proxy allocates and frees many small buffers per request; glibc malloc took
/// ~10% of the gateway's CPU under 64-connection load. (Not in the agent: it raised the agent's
/// peak RSS from ~23 to ~49 MiB for little gain there.)
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use touchgate_gateway::{
    Gateway, GatewayConfig,
    audit::{AuditEvent, AuditKind, AuditLog},
    report,
    store::{Store, StoreError},
    tls, users,
};

/// The identity-aware gateway in front of Cloud Run.
#[derive(Parser)]
#[command(name = "touchgate-gateway", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve QUIC tunnels, the admin endpoint and, with `[scim]`, SCIM provisioning.
    Serve {
        /// The gateway config file.
        #[arg(long, env = "TOUCHGATE_GATEWAY_CONFIG")]
        config: PathBuf,
        /// Override `listen` (UDP address for QUIC).
        #[arg(long, env = "TOUCHGATE_GATEWAY_LISTEN")]
        listen: Option<SocketAddr>,
        /// Override `admin_listen` (TCP address for /healthz and /metrics).
        #[arg(long, env = "TOUCHGATE_GATEWAY_ADMIN_LISTEN")]
        admin_listen: Option<SocketAddr>,
        /// Override `database` (keep a PostgreSQL password out of it: process arguments are
        /// public on the machine; use `database_password_file` or `PGPASSWORD`).
        #[arg(long, env = "TOUCHGATE_GATEWAY_DATABASE", hide_env_values = true)]
        database: Option<PathBuf>,
        /// Override `audit_log` (a path, or - for stdout).
        #[arg(long, env = "TOUCHGATE_GATEWAY_AUDIT_LOG")]
        audit_log: Option<String>,
    },
    /// Check a config file and the files it names; prints every problem at once (exit 1 if any).
    Check {
        /// The gateway config file.
        #[arg(long, env = "TOUCHGATE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Create a one-time invite for USER; prints the code as the last line.
    Invite {
        /// The user (usually an email address).
        user: String,
        /// The gateway config file.
        #[arg(long, env = "TOUCHGATE_GATEWAY_CONFIG")]
        config: PathBuf,
        /// How long the invite stays valid (default from config, 7 days).
        #[arg(long, env = "TOUCHGATE_INVITE_TTL", value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// End every session of USER within seconds (the next sign-in needs a touch).
    Revoke {
        /// The user.
        user: String,
        /// The gateway config file.
        #[arg(long, env = "TOUCHGATE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// List delegated grants, live and ended in the last week: id, user, label, scope,
    /// expiry, last use.
    Delegations {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
        /// The gateway config file.
        #[arg(long, env = "TOUCHGATE_GATEWAY_CONFIG")]
        config: PathBuf,
        /// Print JSON (times in seconds since the epoch) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// End the delegated grant ID within seconds (its delegate's connections close).
    RevokeDelegation {
        /// The grant's id (see `delegations`).
        id: String,
        /// The gateway config file.
        #[arg(long, env = "TOUCHGATE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// List every user: state, enrolled keys, last sign-in, open invites.
    Users {
        /// The gateway config file.
        #[arg(long, env = "TOUCHGATE_GATEWAY_CONFIG")]
        config: PathBuf,
        /// Print JSON (whole credential ids; times in seconds since the epoch) instead of a table.
        #[arg(long, env = "TOUCHGATE_GATEWAY_USERS_JSON")]
        json: bool,
    },
    /// Disable USER: end their sessions within seconds and refuse their sign-in, resume and
    /// invites until `enable USER`.
    Disable {
        /// The user.
        user: String,
        /// The gateway config file.
        #[arg(long, env = "TOUCHGATE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Enable a disabled USER: their enrolled keys sign in again.
    Enable {
        /// The user.
        user: String,
        /// The gateway config file.
        #[arg(long, env = "TOUCHGATE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Remove USER's keys and invites and end their sessions; to come back they enrol again with
    /// a new invite.
    Remove {
        /// The user.
        user: String,
        /// The gateway config file.
        #[arg(long, env = "TOUCHGATE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Remove one key of USER (a lost key), named by the start of its credential id as `users`
    /// shows it; ends the user's sessions.
    RemoveKey {
        /// The user.
        user: String,
        /// The start of the key's credential id (the KEY column of `users`).
        credential_prefix: String,
        /// The gateway config file.
        #[arg(long, env = "TOUCHGATE_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Who used which service in a period, with which keys and delegates, and what was refused,
    /// from the audit log (its rotated and gzipped files included); with --access-review, every
    /// user's grants and whether they were used.
    Report(ReportArgs),
    /// Write a self-signed certificate and key for development (DIR/cert.pem, DIR/key.pem);
    /// prints the SHA-256 fingerprint as the last line.
    GenCert {
        /// Host name the certificate is for (repeatable).
        #[arg(long, required = true)]
        name: Vec<String>,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
}

/// `report`'s flags.
#[derive(clap::Args)]
struct ReportArgs {
    /// The gateway config file: its `audit_log` is read and, with --access-review, its database
    /// and services.
    #[arg(long, env = "TOUCHGATE_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// An audit log to read instead of the config's (repeatable); its rotated files beside it
    /// (FILE.1, FILE.2.gz, FILE-20261201) are read too.
    #[arg(long, value_name = "FILE")]
    audit: Vec<PathBuf>,
    /// The start of the period: a duration back from now (7d, 12h) or a UTC time
    /// (2026-12-01T00:00:00Z, or 2026-12-01).
    #[arg(long, default_value = "7d", env = "TOUCHGATE_GATEWAY_REPORT_SINCE")]
    since: report::When,
    /// The end of the period (not included; default now): a UTC time or a duration back from now.
    #[arg(long, env = "TOUCHGATE_GATEWAY_REPORT_UNTIL")]
    until: Option<report::When>,
    /// Only this user's lines.
    #[arg(long)]
    user: Option<String>,
    /// Only this service's lines.
    #[arg(long)]
    service: Option<String>,
    /// How to write the report.
    #[arg(long, value_enum, default_value_t = report::Format::Table, env = "TOUCHGATE_GATEWAY_REPORT_FORMAT")]
    format: report::Format,
    /// Every user the store knows and every service the config lets them use: what grants it,
    /// the last use in the period, and whether it went unused.
    #[arg(long)]
    access_review: bool,
}

fn main() -> std::process::ExitCode {
    touchgate_common::init_logging("info");
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::Check { config } => return check(config),
        Cmd::Report(args) => return run_report(args),
        _ => {}
    }
    // A single-threaded runtime: the QUIC endpoint, the admin endpoint and the connections
    // placed on it; `serve` adds one more such runtime per core for connections (shards).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("touchgate-gateway: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("touchgate-gateway: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `check`: every problem of the config and of the files it names, one per line.
fn check(path: &std::path::Path) -> std::process::ExitCode {
    let cfg = match GatewayConfig::parse(path) {
        Ok(c) => c,
        Err(e) => {
            println!("problem: {e}");
            println!("{}: 1 problem", path.display());
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut problems = cfg.problems();
    problems.extend(cfg.file_problems());
    // Described whatever else is wrong: it changes nothing, and a database that cannot be
    // reached is worth knowing with the rest.
    match touchgate_gateway::store::describe(&cfg.database, cfg.database_password_file.as_deref()) {
        Ok(found) => println!("{found}"),
        Err(e) => problems.push(e),
    }
    if let Some(o) = cfg.oidc.clone().filter(|_| problems.is_empty()) {
        match check_oidc(o) {
            Ok(found) => println!("{found}"),
            Err(e) => problems.push(format!("oidc: {e}")),
        }
    }
    for p in &problems {
        println!("problem: {p}");
    }
    for w in cfg.warnings() {
        println!("warning: {w}");
    }
    if let Some(s) = cfg.scim.as_ref().filter(|_| problems.is_empty()) {
        println!(
            "scim: {}://{}{} with the bearer token in {}",
            s.scheme(),
            s.listen,
            touchgate_gateway::scim::PREFIX,
            s.token_file.display()
        );
    }
    if problems.is_empty() {
        println!(
            "{}: OK ({} service{}, rp_id {}, QUIC on {})",
            path.display(),
            cfg.services.len(),
            if cfg.services.len() == 1 { "" } else { "s" },
            cfg.rp_id,
            cfg.listen
        );
        std::process::ExitCode::SUCCESS
    } else {
        println!(
            "{}: {} problem{}",
            path.display(),
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
        std::process::ExitCode::FAILURE
    }
}

/// `report`: exit status 2 for what the command line or the config asks wrongly, as for clap's
/// own errors; 1 when something fails.
fn run_report(args: &ReportArgs) -> std::process::ExitCode {
    match report_text(args) {
        Ok(text) => {
            print!("{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("touchgate-gateway: error: {e:#}");
            let usage = e.chain().any(|c| {
                c.downcast_ref::<report::ReportError>()
                    .is_some_and(report::ReportError::is_usage)
            });
            std::process::ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

fn report_text(args: &ReportArgs) -> anyhow::Result<String> {
    use report::ReportError;
    let now = std::time::SystemTime::now();
    let period = report::Period::new(args.since.at(now), args.until.map_or(now, |u| u.at(now)))?;
    let filter = report::Filter {
        period,
        user: args.user.clone(),
        service: args.service.clone(),
    };
    let cfg = args
        .config
        .as_deref()
        .map(GatewayConfig::load)
        .transpose()?;
    let logs: Vec<PathBuf> = if !args.audit.is_empty() {
        args.audit.clone()
    } else {
        let cfg = cfg.as_ref().ok_or(ReportError::NothingToRead)?;
        // Where `serve` writes when the environment overrides the config.
        let log = std::env::var(AUDIT_LOG_ENV)
            .ok()
            .filter(|l| !l.is_empty())
            .or_else(|| cfg.audit_log.clone());
        match log.as_deref() {
            None => return Err(ReportError::NoAuditLog("not set").into()),
            Some("-") => return Err(ReportError::NoAuditLog("\"-\" (standard output)").into()),
            Some(path) => vec![PathBuf::from(path)],
        }
    };
    let mut files = report::LogFiles::default();
    for log in &logs {
        files.extend(report::log_files(log)?);
    }
    for f in &files.not_read {
        eprintln!(
            "touchgate-gateway: not read: {} (of rotated files, only gzipped ones are read: \
             decompress it beside the log to include it)",
            f.display()
        );
    }
    let found = report::read_files(filter, &files.read)?;
    for m in found.skip_messages() {
        eprintln!("{m}");
    }
    if !args.access_review {
        return Ok(report::render(&found, args.format)?);
    }
    let cfg = cfg.as_ref().ok_or(ReportError::ReviewNeedsConfig)?;
    let store = Store::open_with(&cfg.database, cfg.database_password_file.as_deref())
        .with_context(|| format!("cannot open the database {}", cfg.database_shown()))?;
    let people = store.list_users().context("cannot read the users")?;
    let groups = store
        .user_groups(cfg.group_source())
        .context("cannot read the users' groups")?;
    let grants = report::access_review(&found, &people, &groups, &cfg.services);
    Ok(report::render_review(&found, &grants, args.format)?)
}

/// The environment variable that overrides `audit_log` for `serve` (and so for `report`).
const AUDIT_LOG_ENV: &str = "TOUCHGATE_GATEWAY_AUDIT_LOG";

/// Fetches the provider's discovery document and keys, and says what it found.
fn check_oidc(o: touchgate_gateway::config::OidcConfig) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let secret = o.secret().map_err(|e| e.to_string())?;
        let oidc = touchgate_gateway::oidc::Oidc::new(o, secret).map_err(|e| e.to_string())?;
        oidc.describe().await.map_err(|e| e.to_string())
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Check { .. } | Cmd::Report(_) => unreachable!("handled before the runtime starts"),
        Cmd::Serve {
            config,
            listen,
            admin_listen,
            database,
            audit_log,
        } => {
            let mut cfg = GatewayConfig::load(&config)?;
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(a) = admin_listen {
                cfg.admin_listen = a;
            }
            if let Some(d) = database {
                cfg.database = d;
            }
            if let Some(a) = audit_log {
                cfg.audit_log = Some(a);
            }
            serve(cfg).await
        }
        Cmd::Invite { user, config, ttl } => {
            let (cfg, store) = open_store(&config)?;
            if store.is_disabled(&user).context("cannot read the user")? {
                anyhow::bail!(
                    "{user} is disabled on this gateway: run `touchgate-gateway enable {user}` first"
                );
            }
            let audit = open_audit(&cfg)?;
            let ttl = ttl.unwrap_or(cfg.invite.ttl);
            let code = touchgate_gateway::create_invite(&store, &audit, &user, ttl)
                .context("cannot store the invite")?;
            println!(
                "Invite for {user}, valid for {}. Give them this code for `touchgate enroll --code`:",
                humantime::format_duration(ttl)
            );
            println!("{code}");
            Ok(())
        }
        Cmd::Revoke { user, config } => {
            let (cfg, store) = open_store(&config)?;
            let audit = open_audit(&cfg)?;
            match store
                .revoke_user(&user)
                .context("cannot store the revocation")?
            {
                Some(epoch) => {
                    audit.record(AuditEvent {
                        user: Some(user.clone()),
                        reason: Some(format!("revocation epoch {epoch}")),
                        ..AuditEvent::new(AuditKind::UserRevoked)
                    });
                    println!(
                        "revoked every session of {user}: running gateways on this database close them within {}",
                        poll()
                    );
                    Ok(())
                }
                None => {
                    anyhow::bail!("no user {user:?} on this gateway (see the invites you made)")
                }
            }
        }
        Cmd::Delegations { user, config, json } => {
            let (_, store) = open_store(&config)?;
            let list = store
                .delegations(user.as_deref())
                .context("cannot read the grants")?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).context("cannot write JSON")?
                );
                return Ok(());
            }
            if list.is_empty() {
                println!("no grants");
            }
            let now = touchgate_gateway::store::now_secs();
            for d in &list {
                let g = &d.grant;
                let state = match d.revoked_at {
                    Some(_) => "revoked".to_owned(),
                    None if g.expires_at <= now => "expired".to_owned(),
                    None => format!("{}s left", g.expires_at - now),
                };
                let any = |v: &[String]| {
                    if v.is_empty() {
                        "any".to_owned()
                    } else {
                        v.join(",")
                    }
                };
                println!(
                    "{}  {}  {}  services {}  methods {}  paths {}  {state}  {}",
                    d.id,
                    users::printable(&d.user),
                    users::printable(&format!("{:?}", g.label)),
                    g.services.join(","),
                    any(&g.methods),
                    any(&g.path_prefixes),
                    d.last_used_at
                        .map_or("never used".to_owned(), |t| format!("last used {}", at(t))),
                );
            }
            Ok(())
        }
        Cmd::RevokeDelegation { id, config } => {
            let (cfg, store) = open_store(&config)?;
            let audit = open_audit(&cfg)?;
            let Some(d) = store
                .revoke_delegation_by_id(&id)
                .context("cannot store the revocation")?
            else {
                anyhow::bail!(
                    "no live grant {id:?} on this gateway: it is unknown, expired or already revoked (see `touchgate-gateway delegations`)"
                );
            };
            audit.record(AuditEvent {
                user: Some(d.user.clone()),
                delegate: Some(d.grant.label.clone()),
                session: Some(d.id.clone()),
                outcome: Some("ok".into()),
                reason: Some("revoked by an admin".into()),
                ..AuditEvent::new(AuditKind::DelegationRevoked)
            });
            println!(
                "revoked {} ({:?} of {}): running gateways on this database close its connections within {}",
                d.id,
                d.grant.label,
                d.user,
                poll()
            );
            Ok(())
        }
        Cmd::Users { config, json } => {
            let (cfg, store) = open_store(&config)?;
            let list = store.list_users().context("cannot read the users")?;
            let models = users::ModelNames::from_config(&cfg.attestation);
            if json {
                let text = serde_json::to_string_pretty(&users::views(&list, &models))
                    .context("cannot write JSON")?;
                println!("{text}");
            } else {
                print!("{}", users::table(&list, &models));
            }
            Ok(())
        }
        Cmd::Disable { user, config } => {
            let (cfg, store) = open_store(&config)?;
            store
                .set_disabled(&user, true)
                .map_err(|e| user_error(e, "cannot store the change"))?;
            open_audit(&cfg)?.record(AuditEvent {
                user: Some(user.clone()),
                ..AuditEvent::new(AuditKind::UserDisabled)
            });
            println!(
                "disabled {user}: running gateways on this database end their sessions within {}; \
                 sign-in, resume and invites are refused until `touchgate-gateway enable {user}`",
                poll()
            );
            Ok(())
        }
        Cmd::Enable { user, config } => {
            let (cfg, store) = open_store(&config)?;
            let was_disabled = store.is_disabled(&user).context("cannot read the user")?;
            store
                .set_disabled(&user, false)
                .map_err(|e| user_error(e, "cannot store the change"))?;
            open_audit(&cfg)?.record(AuditEvent {
                user: Some(user.clone()),
                ..AuditEvent::new(AuditKind::UserEnabled)
            });
            let keys = store
                .credentials(&user)
                .context("cannot read the user's keys")?
                .len();
            let how = if keys == 0 {
                format!(
                    "they have no key: make an invite (`touchgate-gateway invite {user}`) to enrol one"
                )
            } else {
                "they can sign in again with their enrolled keys".to_owned()
            };
            if was_disabled {
                println!("enabled {user}: {how}");
            } else {
                println!("{user} was not disabled: {how}");
            }
            Ok(())
        }
        Cmd::Remove { user, config } => {
            let (cfg, store) = open_store(&config)?;
            let removed = store
                .remove_user(&user)
                .map_err(|e| user_error(e, "cannot remove the user"))?;
            let what = format!(
                "{} and {}",
                plural(removed.credentials, "key"),
                plural(removed.invites, "invite")
            );
            open_audit(&cfg)?.record(AuditEvent {
                user: Some(user.clone()),
                reason: Some(format!(
                    "deleted {what}; revocation epoch {}",
                    removed.epoch
                )),
                ..AuditEvent::new(AuditKind::UserRemoved)
            });
            println!(
                "removed {user}: deleted {what}; running gateways on this database end their \
                 sessions within {}. To let them back in, make an invite \
                 (`touchgate-gateway invite {user}`): they must enrol again",
                poll()
            );
            Ok(())
        }
        Cmd::RemoveKey {
            user,
            credential_prefix,
            config,
        } => {
            let (cfg, store) = open_store(&config)?;
            let removed = store
                .remove_key(&user, &credential_prefix)
                .map_err(|e| user_error(e, "cannot remove the key"))?;
            let model = users::ModelNames::from_config(&cfg.attestation)
                .name(&removed.aaguid)
                .map(|m| format!("{m}, "))
                .unwrap_or_default();
            open_audit(&cfg)?.record(AuditEvent {
                user: Some(user.clone()),
                reason: Some(format!(
                    "credential {}, AAGUID {}; {} left; revocation epoch {}",
                    removed.cred_id,
                    removed.aaguid,
                    plural(removed.keys_left, "key"),
                    removed.epoch
                )),
                ..AuditEvent::new(AuditKind::KeyRemoved)
            });
            let left = if removed.keys_left == 0 {
                format!(
                    "they have no key left: make an invite (`touchgate-gateway invite {user}`) to enrol a new one"
                )
            } else {
                format!("{} left to sign in with", plural(removed.keys_left, "key"))
            };
            println!(
                "removed key {} of {user} ({model}AAGUID {}); running gateways on this database \
                 end their sessions within {}; {left}",
                removed.cred_id,
                removed.aaguid,
                poll()
            );
            Ok(())
        }
        Cmd::GenCert { name, out } => {
            let cert = tls::generate_dev_cert(&name)?;
            tls::write_dev_cert(&out, &cert)?;
            println!(
                "wrote {} and {}",
                out.join("cert.pem").display(),
                out.join("key.pem").display()
            );
            println!("SHA-256 fingerprint (use as gateway_cert_sha256 in agent configs):");
            println!("{}", cert.fingerprint);
            Ok(())
        }
    }
}

/// Loads the config and opens its database, for the admin commands.
fn open_store(config: &std::path::Path) -> anyhow::Result<(GatewayConfig, Store)> {
    let cfg = GatewayConfig::load(config)?;
    let store = Store::open_with(&cfg.database, cfg.database_password_file.as_deref())
        .with_context(|| format!("cannot open the database {}", cfg.database_shown()))?;
    Ok((cfg, store))
}

fn open_audit(cfg: &GatewayConfig) -> anyhow::Result<AuditLog> {
    AuditLog::open(cfg.audit_log.as_deref()).context("cannot open the audit log")
}

/// A store error of a user command, worded for the admin: an unknown user or key says where to
/// look; anything else keeps its cause under `doing`.
fn user_error(e: StoreError, doing: &'static str) -> anyhow::Error {
    match e {
        StoreError::UnknownUser(_) | StoreError::UnknownKey { .. } => {
            anyhow::anyhow!("{e}: see `touchgate-gateway users`")
        }
        StoreError::AmbiguousKey { .. } => anyhow::anyhow!(
            "{e}: give more of the id (`touchgate-gateway users --json` shows whole ids)"
        ),
        other => anyhow::Error::new(other).context(doing),
    }
}

/// How soon running gateways act on a change, e.g. "1s".
/// A time in seconds since the epoch, in RFC 3339.
fn at(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn poll() -> humantime::FormattedDuration {
    humantime::format_duration(touchgate_gateway::server::REVOCATION_POLL)
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// The QUIC socket's receive buffer the gateway asks for: thousands of agents' keep-alives
/// overflow the kernel's usual 208 KiB (docs/scale.md).
const UDP_RECEIVE_BUFFER: usize = 8 * 1024 * 1024;

/// Asks for [`UDP_RECEIVE_BUFFER`] on `socket`; says what to change when the kernel caps it.
fn widen_receive_buffer(socket: &std::net::UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    let _ = sock.set_recv_buffer_size(UDP_RECEIVE_BUFFER);
    // Linux reports twice what it grants.
    match sock.recv_buffer_size() {
        Ok(reported) if reported / 2 < UDP_RECEIVE_BUFFER => tracing::info!(
            granted = reported / 2,
            wanted = UDP_RECEIVE_BUFFER,
            "the QUIC socket's receive buffer is smaller than asked for: for thousands of \
             agents, raise net.core.rmem_max (sysctl) to at least {UDP_RECEIVE_BUFFER}"
        ),
        _ => {}
    }
}

/// Serves carriers on `listener`, saying why when it cannot.
async fn serve_carrier(gw: Arc<Gateway>, listener: tokio::net::TcpListener, tls: bool) {
    if let Err(e) = gw.serve_carrier(listener, tls).await {
        tracing::error!(error = %e, "cannot serve the carrier");
    }
}

async fn serve(cfg: GatewayConfig) -> anyhow::Result<()> {
    let listen = cfg.listen;
    // Cloud Run's convention: the port to serve on comes in `$PORT` — unless the config names
    // `listen_ws` itself (a `PORT` set for something else must not open a public listener).
    let listen_ws = match (cfg.listen_ws, std::env::var("PORT")) {
        (Some(addr), _) => Some(addr),
        (None, Ok(p)) => Some(SocketAddr::from((
            [0, 0, 0, 0],
            p.parse::<u16>()
                .with_context(|| format!("PORT={p} is not a port number"))?,
        ))),
        (None, Err(_)) => None,
    };
    let admin_listen = cfg.admin_listen;
    let scim_listen = cfg.scim.as_ref().map(|s| (s.listen, s.scheme()));
    let gw = Gateway::new(cfg)?;
    let (socket, tcp) = touchgate_gateway::carrier::bind_quic_and_carrier(listen)?;
    widen_receive_buffer(&socket);
    let endpoint = gw.endpoint(socket)?;
    let admin = tokio::net::TcpListener::bind(admin_listen)
        .await
        .with_context(|| format!("cannot bind TCP {admin_listen} for the admin endpoint"))?;
    let quic_addr = endpoint.local_addr().context("no local address")?;
    let admin_addr = admin.local_addr().context("no local address")?;
    tracing::info!(quic = %quic_addr, admin = %admin_addr, "gateway listening");
    println!("touchgate-gateway listening: QUIC on udp/{quic_addr}, admin on http://{admin_addr}");
    let shards =
        Arc::new(touchgate_gateway::shards::Shards::per_core().context("cannot start threads")?);
    tracing::info!(threads = shards.len(), "connections run thread-per-core");
    let quic = tokio::spawn(gw.clone().serve_quic_on(endpoint.clone(), shards.clone()));
    // The carrier: TLS on TCP at the QUIC address, and plain HTTP at `listen_ws`.
    let carrier_endpoint = gw.carrier_endpoint()?;
    let mut carrier_tasks = vec![tokio::spawn(
        gw.clone()
            .serve_more_quic(carrier_endpoint.clone(), shards.clone()),
    )];
    tcp.set_nonblocking(true)
        .context("cannot set up the carrier's socket")?;
    let tcp = tokio::net::TcpListener::from_std(tcp).context("cannot serve the carrier")?;
    println!(
        "carrier on tcp/{} (TLS)",
        tcp.local_addr().context("no local address")?
    );
    carrier_tasks.push(tokio::spawn(serve_carrier(gw.clone(), tcp, true)));
    if let Some(addr) = listen_ws {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind TCP {addr} for the carrier (listen_ws)"))?;
        println!(
            "carrier on http://{}{} (no TLS: behind a front end that terminates it)",
            l.local_addr().context("no local address")?,
            touchgate_carrier::PATH
        );
        carrier_tasks.push(tokio::spawn(serve_carrier(gw.clone(), l, false)));
    }
    let admin_task = tokio::spawn(gw.clone().serve_admin(admin));
    let scim_task = match scim_listen {
        Some((addr, scheme)) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind TCP {addr} for SCIM ([scim] listen)"))?;
            let addr = l.local_addr().context("no local address")?;
            tracing::info!(scim = %addr, scheme, "SCIM provisioning listening");
            println!(
                "SCIM provisioning on {scheme}://{addr}{}",
                touchgate_gateway::scim::PREFIX
            );
            Some(tokio::spawn(gw.clone().serve_scim(l)))
        }
        None => None,
    };
    touchgate_common::shutdown_signal().await;
    tracing::info!("shutting down");
    endpoint.close(
        touchgate_proto::close::GATEWAY_SHUTDOWN.into(),
        b"gateway shutting down",
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
    carrier_endpoint.close(
        touchgate_proto::close::GATEWAY_SHUTDOWN.into(),
        b"gateway shutting down",
    );
    quic.abort();
    for t in carrier_tasks {
        t.abort();
    }
    admin_task.abort();
    if let Some(t) = scim_task {
        t.abort();
    }
    gw.flush_audit();
    Ok(())
}

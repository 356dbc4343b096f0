//! `touchgate-gateway`: run the gateway, create invites, make development certificates.

/// mimalloc: the proxy allocates and frees many small buffers per request; glibc malloc took
/// ~10% of the gateway's CPU under 64-connection load. (Not in the agent: it raised the agent's
/// peak RSS from ~23 to ~49 MiB for little gain there.)
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use touchgate_gateway::{Gateway, GatewayConfig, audit::AuditLog, store::Store, tls};

/// The identity-aware gateway in front of Cloud Run.
#[derive(Parser)]
#[command(name = "touchgate-gateway", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve QUIC tunnels and the admin endpoint.
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
        /// Override `database`.
        #[arg(long, env = "TOUCHGATE_GATEWAY_DATABASE")]
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

fn main() -> std::process::ExitCode {
    touchgate_common::init_logging("info");
    let cli = Cli::parse();
    if let Cmd::Check { config } = &cli.cmd {
        return check(config);
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
    for p in &problems {
        println!("problem: {p}");
    }
    for w in cfg.warnings() {
        println!("warning: {w}");
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Check { .. } => unreachable!("handled before the runtime starts"),
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
            let cfg = GatewayConfig::load(&config)?;
            let store = Store::open(&cfg.database)
                .with_context(|| format!("cannot open the database {}", cfg.database.display()))?;
            let audit =
                AuditLog::open(cfg.audit_log.as_deref()).context("cannot open the audit log")?;
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
            let cfg = GatewayConfig::load(&config)?;
            let store = Store::open(&cfg.database)
                .with_context(|| format!("cannot open the database {}", cfg.database.display()))?;
            let audit =
                AuditLog::open(cfg.audit_log.as_deref()).context("cannot open the audit log")?;
            match store
                .revoke_user(&user)
                .context("cannot store the revocation")?
            {
                Some(epoch) => {
                    audit.record(touchgate_gateway::audit::AuditEvent {
                        event: "user_revoked",
                        user: Some(user.clone()),
                        reason: Some(format!("revocation epoch {epoch}")),
                        ..Default::default()
                    });
                    println!(
                        "revoked every session of {user}: running gateways on this database close them within {}s",
                        touchgate_gateway::server::REVOCATION_POLL.as_secs()
                    );
                    Ok(())
                }
                None => {
                    anyhow::bail!("no user {user:?} on this gateway (see the invites you made)")
                }
            }
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

async fn serve(cfg: GatewayConfig) -> anyhow::Result<()> {
    let listen = cfg.listen;
    let admin_listen = cfg.admin_listen;
    let gw = Gateway::new(cfg)?;
    let socket = std::net::UdpSocket::bind(listen)
        .with_context(|| format!("cannot bind UDP {listen} for QUIC"))?;
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
    let admin_task = tokio::spawn(gw.clone().serve_admin(admin));
    touchgate_common::shutdown_signal().await;
    tracing::info!("shutting down");
    endpoint.close(0u32.into(), b"gateway shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
    quic.abort();
    admin_task.abort();
    Ok(())
}

//! A whole touchgate system on loopback: a gateway with a self-signed certificate and SQLite in
//! a temporary folder, the fake metadata server, a Cloud-Run-like upstream and a TCP echo
//! service. The demo and the end-to-end tests both run on it.
//!
//! The gateway serves QUIC on UDP and, as the binary does, the TCP carrier: with TLS on TCP at
//! the QUIC port ([`Lab::carrier_addr`]) and as plain HTTP on a port of its own
//! ([`Lab::ws_addr`], the `listen_ws` a TLS-terminating front end forwards to). The carriers'
//! TCP side runs on a thread of its own ([`CarrierThread`]), so that stopping the gateway ends
//! every carrier's TCP connection, as the end of a gateway process does.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::net::TcpListener;
use touchgate_agent::AgentConfig;
use touchgate_gateway::{Gateway, GatewayConfig, shards::Shards, tls};

use crate::{FakeServer, start_cloud_run, start_metadata_server};

mod replica;

pub use replica::Replica;

/// Settings a test may change.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// `[attestation] allow_software`.
    pub allow_software: bool,
    /// `[session] max_age`.
    pub max_age: Duration,
    /// `[session] challenge_ttl`.
    pub challenge_ttl: Duration,
    /// Users allowed on the `api` service.
    pub api_users: Vec<String>,
    /// Groups allowed on the `api` service (`allow_groups`).
    pub api_groups: Vec<String>,
    /// Extra TOML lines for the `[attestation]` table (plain keys first, then any
    /// `[[attestation.trusted]]` tables).
    pub attestation: String,
    /// TOML lines for the `[limits]` table.
    pub limits: String,
    /// Whole extra tables (e.g. `[oidc]`), placed before the services.
    pub tables: String,
    /// A SCIM bearer token: when set, the gateway serves `[scim]` with it (in `scim.token`,
    /// mode 0600) over plain HTTP on loopback, at [`Lab::scim_addr`].
    pub scim_token: Option<String>,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            allow_software: true,
            max_age: Duration::from_secs(3600),
            challenge_ttl: Duration::from_secs(60),
            api_users: vec!["*".into()],
            api_groups: Vec::new(),
            attestation: String::new(),
            limits: "header_read_timeout = \"2s\"".into(),
            tables: String::new(),
            scim_token: None,
        }
    }
}

/// The running system.
pub struct Lab {
    /// Temporary folder with the gateway's files (removed on drop).
    pub dir: tempfile::TempDir,
    /// The gateway config file.
    pub gateway_config_path: PathBuf,
    /// The gateway.
    pub gateway: Arc<Gateway>,
    /// The gateway's QUIC address (UDP); the carrier with TLS is at the same port on TCP.
    pub quic_addr: SocketAddr,
    /// The gateway's plain-HTTP carrier (`listen_ws`), for a front end that terminates TLS.
    pub ws_addr: SocketAddr,
    /// The gateway's admin address.
    pub admin_addr: SocketAddr,
    /// The gateway's SCIM address, with [`LabOptions::scim_token`].
    pub scim_addr: Option<SocketAddr>,
    /// SHA-256 fingerprint of the gateway certificate.
    pub fingerprint: String,
    /// The fake metadata server.
    pub metadata: FakeServer,
    /// The Cloud-Run-like upstream behind service `api`.
    pub upstream: FakeServer,
    /// The TCP echo upstream behind service `echo`.
    pub tcp_echo: SocketAddr,
    /// What serves the gateway while it runs.
    serving: Option<Serving>,
    echo_task: tokio::task::JoinHandle<()>,
    /// Where the gateway runs connections: the test's runtime and one more thread, as the
    /// binary runs them thread-per-core (the first connection lands on the test's runtime, a
    /// second one open at the same time on the other thread).
    shards: Arc<Shards>,
}

/// The audience the `api` upstream expects (a custom audience, as Cloud Run allows).
pub const API_AUDIENCE: &str = "https://api-demo-uc.a.run.app";

impl Lab {
    /// Starts everything on 127.0.0.1, port 0.
    pub async fn start(opts: LabOptions) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("cannot make a temporary folder")?;
        let cert = tls::generate_dev_cert(&["localhost".into()])?;
        tls::write_dev_cert(dir.path(), &cert)?;
        let metadata = start_metadata_server(TcpListener::bind("127.0.0.1:0").await?).await;
        let upstream = start_cloud_run(TcpListener::bind("127.0.0.1:0").await?, API_AUDIENCE).await;
        let echo = TcpListener::bind("127.0.0.1:0").await?;
        let tcp_echo = echo.local_addr()?;
        // An upstream that accepts and resets every connection at once.
        let resetter = TcpListener::bind("127.0.0.1:0").await?;
        let reset_addr = resetter.local_addr()?;
        // An HTTP upstream that answers one request per connection and then drops it without
        // saying so (no `Connection: close`), as one restarting or with a short keep-alive does.
        let oneshot = TcpListener::bind("127.0.0.1:0").await?;
        let oneshot_addr = oneshot.local_addr()?;
        let echo_task = tokio::spawn(async move {
            let echoes = async {
                while let Ok((s, _)) = echo.accept().await {
                    tokio::spawn(async move {
                        let (mut r, mut w) = s.into_split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    });
                }
            };
            let resets = async {
                while let Ok((s, _)) = resetter.accept().await {
                    // Linger 0 turns the close into a TCP RST.
                    let _ = s.set_zero_linger();
                    drop(s);
                }
            };
            let oneshots = async {
                while let Ok((mut s, _)) = oneshot.accept().await {
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\noneshot")
                            .await;
                    });
                }
            };
            tokio::join!(echoes, resets, oneshots);
        });
        let (users, groups) = (toml_list(&opts.api_users), toml_list(&opts.api_groups));
        let mut tables = opts.tables.clone();
        if let Some(token) = &opts.scim_token {
            write_private(&dir.path().join("scim.token"), token)?;
            tables.push_str(
                "\n[scim]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"scim.token\"\ninsecure_plain_http = true\n",
            );
        }
        let text = format!(
            r#"# touchgate gateway config written by the lab
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
rp_id = "localhost"
origin = "https://localhost"
database = "gateway.db"
audit_log = "audit.jsonl"

[tls]
cert = "cert.pem"
key = "key.pem"

[attestation]
allow_software = {allow_software}
{attestation}

[id_tokens]
source = "metadata"
metadata_url = "{metadata}"

[limits]
{limits}

[session]
max_age = "{max_age}"
idle_timeout = "1h"
challenge_ttl = "{challenge_ttl}"

{tables}

[[service]]
name = "api"
kind = "http"
upstream = "{upstream}"
audience = "{API_AUDIENCE}"
allow = [{users}]
allow_groups = [{groups}]
upgrade_protocols = ["websocket", "echo"]

[[service]]
name = "billing"
kind = "http"
upstream = "{upstream}"
audience = "{API_AUDIENCE}"
allow = ["finance@example.com"]

[[service]]
name = "slow"
kind = "http"
upstream = "{upstream}"
audience = "{API_AUDIENCE}"
allow = ["*"]
timeout = "300ms"

[[service]]
name = "down"
kind = "http"
upstream = "http://127.0.0.1:1"
allow = ["*"]

[[service]]
name = "reset"
kind = "http"
upstream = "http://{reset_addr}"
allow = ["*"]

[[service]]
name = "oneshot"
kind = "http"
upstream = "http://{oneshot_addr}"
allow = ["*"]

[[service]]
name = "down-tcp"
kind = "tcp"
upstream = "127.0.0.1:1"
allow = ["*"]

[[service]]
name = "echo"
kind = "tcp"
upstream = "{tcp_echo}"
allow = ["*"]
"#,
            allow_software = opts.allow_software,
            attestation = opts.attestation,
            reset_addr = reset_addr,
            oneshot_addr = oneshot_addr,
            limits = opts.limits,
            tables = tables,
            metadata = metadata.url(),
            max_age = humantime::format_duration(opts.max_age),
            challenge_ttl = humantime::format_duration(opts.challenge_ttl),
            upstream = upstream.url(),
        );
        let gateway_config_path = dir.path().join("gateway.toml");
        std::fs::write(&gateway_config_path, text)?;
        let cfg = GatewayConfig::load(&gateway_config_path)?;
        let shards = Arc::new(Shards::start(2).context("cannot start a shard thread")?);
        let launched = launch(cfg, None, shards.clone()).await?;
        Ok(Self {
            dir,
            gateway_config_path,
            gateway: launched.gateway,
            quic_addr: launched.addrs.quic,
            ws_addr: launched.addrs.ws,
            admin_addr: launched.addrs.admin,
            scim_addr: launched.addrs.scim,
            fingerprint: cert.fingerprint,
            metadata,
            upstream,
            tcp_echo,
            serving: Some(launched.serving),
            echo_task,
            shards,
        })
    }

    /// An agent config for `user` with a software key at `key_path`, exposing `api` and `echo`
    /// (and any `extra` service names) on free local ports.
    pub fn agent_config(
        &self,
        user: &str,
        key_path: &std::path::Path,
        extra: &[&str],
    ) -> anyhow::Result<AgentConfig> {
        let mut text = format!(
            "gateway = \"{}\"\nserver_name = \"localhost\"\ngateway_cert_sha256 = \"{}\"\nuser = \"{user}\"\nauthenticator = \"soft:{}\"\n",
            self.quic_addr,
            self.fingerprint,
            key_path.display()
        );
        for name in ["api", "echo"].iter().chain(extra) {
            text.push_str(&format!("[[service]]\nname = \"{name}\"\nlocal_port = 0\n"));
        }
        toml_agent(&text)
    }

    /// The carrier with TLS: TCP at the QUIC port, with the gateway's certificate.
    pub fn carrier_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// `wss://localhost:PORT/touchgate/carrier`: the carrier with TLS, by the name in the
    /// gateway's certificate.
    pub fn carrier_url(&self) -> String {
        format!(
            "wss://localhost:{}{}",
            self.quic_addr.port(),
            touchgate_carrier::PATH
        )
    }

    /// `ws://ADDR/touchgate/carrier`: the plain-HTTP carrier at [`Lab::ws_addr`].
    pub fn ws_url(&self) -> String {
        format!("ws://{}{}", self.ws_addr, touchgate_carrier::PATH)
    }

    /// The gateway's certificate (PEM), self-signed for `localhost`: what a client of the
    /// carrier with TLS trusts.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// A one-time invite for `user`.
    pub fn invite(&self, user: &str) -> anyhow::Result<String> {
        Ok(self.gateway.create_invite(user)?)
    }

    /// Stops the gateway (closing connections) and starts a new one on the same ports (UDP and
    /// the carrier's TCP ones) with the same database and keys, as a deploy or restart would.
    pub async fn restart_gateway(&mut self) -> anyhow::Result<()> {
        self.stop_gateway().await;
        self.start_gateway().await
    }

    /// Stops the gateway, closing its connections (as a deploy or a crash would): QUIC ones
    /// with a close frame, and every carrier's TCP connection.
    pub async fn stop_gateway(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.stop().await;
        }
    }

    /// Starts the gateway again on its old ports (UDP, and TCP for the carriers), with the
    /// same database and keys.
    pub async fn start_gateway(&mut self) -> anyhow::Result<()> {
        let cfg = GatewayConfig::load(&self.gateway_config_path)?;
        let ports = Ports {
            quic: self.quic_addr,
            ws: self.ws_addr,
        };
        // The old endpoint's socket closes once its connection tasks have seen the close; give
        // them a moment, as a restarting process would wait for its old port.
        let mut tries = 0;
        let launched = loop {
            match launch(cfg.clone(), Some(ports), self.shards.clone()).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    tracing::debug!(error = %e, "old gateway socket still open");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.gateway = launched.gateway;
        self.quic_addr = launched.addrs.quic;
        self.ws_addr = launched.addrs.ws;
        self.admin_addr = launched.addrs.admin;
        self.scim_addr = launched.addrs.scim;
        self.serving = Some(launched.serving);
        Ok(())
    }

    /// Edits the gateway config file (replacing `from` with `to`) and restarts the gateway.
    pub async fn reconfigure(&mut self, from: &str, to: &str) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(&self.gateway_config_path)?;
        anyhow::ensure!(text.contains(from), "gateway config has no {from:?}");
        std::fs::write(&self.gateway_config_path, text.replace(from, to))?;
        self.restart_gateway().await
    }

    /// The audit log, one JSON value per line.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.gateway.flush_audit();
        read_audit(&self.dir.path().join("audit.jsonl"))
    }

    /// Audit lines with `event`.
    pub fn audit_events(&self, event: &str) -> Vec<serde_json::Value> {
        with_event(self.audit(), event)
    }
}

/// The audit log at `path`, one JSON value per line (none when there is no file yet).
pub(crate) fn read_audit(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The lines of `audit` with `event`.
pub(crate) fn with_event(audit: Vec<serde_json::Value>, event: &str) -> Vec<serde_json::Value> {
    audit.into_iter().filter(|v| v["event"] == event).collect()
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(serving) = &self.serving {
            serving.close(b"lab stopped");
        }
        self.echo_task.abort();
    }
}

fn toml_agent(text: &str) -> anyhow::Result<AgentConfig> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("agent.toml");
    std::fs::write(&p, text)?;
    Ok(AgentConfig::load(&p)?)
}

/// Where a gateway listens.
#[derive(Debug, Clone, Copy)]
struct Addrs {
    /// QUIC (UDP), and the carrier with TLS (TCP) at the same address.
    quic: SocketAddr,
    /// The plain-HTTP carrier.
    ws: SocketAddr,
    admin: SocketAddr,
    scim: Option<SocketAddr>,
}

/// The ports a restarted gateway takes again.
#[derive(Debug, Clone, Copy)]
struct Ports {
    quic: SocketAddr,
    ws: SocketAddr,
}

/// A gateway [`launch`] started.
struct Launched {
    gateway: Arc<Gateway>,
    addrs: Addrs,
    serving: Serving,
}

/// What serves one gateway: its QUIC endpoints (UDP, and the one the carriers feed), the tasks
/// on the caller's runtime, and the carriers' thread.
struct Serving {
    endpoint: quinn::Endpoint,
    carrier_endpoint: quinn::Endpoint,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    carriers: CarrierThread,
}

impl Serving {
    /// Closes every QUIC connection with a close frame and stops serving, at once (the
    /// carriers' thread is told to stop when it is dropped).
    fn close(&self, reason: &[u8]) {
        self.close_endpoints(reason);
        for t in &self.tasks {
            t.abort();
        }
    }

    fn close_endpoints(&self, reason: &[u8]) {
        for e in [&self.endpoint, &self.carrier_endpoint] {
            e.close(0u32.into(), reason);
        }
    }

    /// Closes every QUIC connection and waits until the close frames went out (over the
    /// carriers too, which are still up meanwhile), then stops serving and waits until every
    /// task and every carrier's TCP connection has ended.
    async fn stop(self) {
        self.close_endpoints(b"gateway restarting");
        let Self {
            endpoint,
            carrier_endpoint,
            tasks,
            mut carriers,
        } = self;
        endpoint.wait_idle().await;
        carrier_endpoint.wait_idle().await;
        // First, so that the endpoints' drivers end (and the UDP socket closes) while the
        // tasks are awaited below: a restart binds the same port next.
        drop((endpoint, carrier_endpoint));
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        let _ = tokio::task::spawn_blocking(move || carriers.join()).await;
    }
}

/// The carriers' TCP side of one gateway, on a runtime of its own thread. The gateway spawns a
/// task per carrier connection that no serving task owns; ending this runtime drops them all,
/// which closes their TCP connections as the end of a gateway process would (the lab's
/// gateways otherwise share the test's runtime, which lives on).
struct CarrierThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CarrierThread {
    /// Serves `tls` (the carrier with TLS) and `plain` (without) for `gateway`.
    fn start(
        gateway: Arc<Gateway>,
        tls: std::net::TcpListener,
        plain: std::net::TcpListener,
    ) -> anyhow::Result<Self> {
        for l in [&tls, &plain] {
            l.set_nonblocking(true)?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot make the carriers' runtime")?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("lab-carriers".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::select! {
                        _ = serve_carrier(gateway.clone(), tls, true) => {}
                        _ = serve_carrier(gateway, plain, false) => {}
                        _ = stopped => {}
                    }
                });
                // Every carrier connection's task is dropped unpolled: its TCP connection closes.
                rt.shutdown_background();
            })
            .context("cannot start the carriers' thread")?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops serving carriers and waits until every carrier connection is closed (blocking).
    fn join(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves carriers on `listener` (with TLS or not) until the task is dropped, saying why when
/// it cannot.
async fn serve_carrier(gateway: Arc<Gateway>, listener: std::net::TcpListener, with_tls: bool) {
    let served = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => gateway
            .serve_carrier(l, with_tls)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(error) = served {
        tracing::error!(%error, with_tls, "the lab cannot serve the carrier");
    }
}

impl Drop for CarrierThread {
    fn drop(&mut self) {
        // The thread ends on its own once told; nothing waits for it here.
        drop(self.stop.take());
    }
}

/// Starts a gateway with `cfg` on the tasks' runtime and `shards`: QUIC on `cfg.listen` (or
/// `ports`, a restart's old ones), the carrier with TLS on TCP at the same address, the plain
/// carrier on `ports.ws` (else a free port of the QUIC address's IP), admin and SCIM on free
/// ports of 127.0.0.1.
async fn launch(
    cfg: GatewayConfig,
    ports: Option<Ports>,
    shards: Arc<Shards>,
) -> anyhow::Result<Launched> {
    let quic_bind = ports.map_or(cfg.listen, |p| p.quic);
    let (socket, carrier_tls) = touchgate_gateway::carrier::bind_quic_and_carrier(quic_bind)?;
    let quic_addr = socket.local_addr()?;
    let ws_bind = ports.map_or(SocketAddr::new(quic_addr.ip(), 0), |p| p.ws);
    let carrier_plain = std::net::TcpListener::bind(ws_bind)
        .with_context(|| format!("cannot bind TCP {ws_bind} for the plain carrier"))?;
    let ws_addr = carrier_plain.local_addr()?;
    let scim = match &cfg.scim {
        Some(_) => Some(TcpListener::bind("127.0.0.1:0").await?),
        None => None,
    };
    let scim_addr = scim.as_ref().map(|l| l.local_addr()).transpose()?;
    let gateway = Gateway::new(cfg)?;
    let endpoint = gateway.endpoint(socket)?;
    let carrier_endpoint = gateway.carrier_endpoint()?;
    let admin = TcpListener::bind("127.0.0.1:0").await?;
    let admin_addr = admin.local_addr()?;
    let mut tasks = vec![
        tokio::spawn(
            gateway
                .clone()
                .serve_quic_on(endpoint.clone(), shards.clone()),
        ),
        tokio::spawn(
            gateway
                .clone()
                .serve_more_quic(carrier_endpoint.clone(), shards),
        ),
        tokio::spawn(gateway.clone().serve_admin(admin)),
    ];
    tasks.extend(scim.map(|l| tokio::spawn(gateway.clone().serve_scim(l))));
    let carriers = CarrierThread::start(gateway.clone(), carrier_tls, carrier_plain)?;
    Ok(Launched {
        gateway,
        addrs: Addrs {
            quic: quic_addr,
            ws: ws_addr,
            admin: admin_addr,
            scim: scim_addr,
        },
        serving: Serving {
            endpoint,
            carrier_endpoint,
            tasks,
            carriers,
        },
    })
}

/// Writes `text` to a new file only its owner can read.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// `"a", "b"`: the items of a TOML array of strings.
fn toml_list(items: &[String]) -> String {
    items
        .iter()
        .map(|i| format!("{i:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

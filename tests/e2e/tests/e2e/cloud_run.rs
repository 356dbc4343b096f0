//! The gateway on Cloud Run as `packaging/cloudrun` ships it: the service YAML and the gateway
//! config agree with each other and with the gateway, and `touchgate-gateway serve`, run with
//! the YAML's arguments and `$PORT` set as Cloud Run sets it, serves the carrier and the public
//! keys on that port (a real QUIC handshake and sign-in challenge through it), reaches its
//! PostgreSQL by a Unix socket as it would Cloud SQL's, and writes its audit log to stdout as
//! JSON lines.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    sync::mpsc,
};
use touchgate_agent::{AgentConfig, tunnel::SessionKey};
use touchgate_e2e::get;
use touchgate_gateway::GatewayConfig;
use touchgate_proto::{ClientMsg, ServerMsg};
use touchgate_testkit::{gateway_process::gateway_program, postgres::Postgres};

/// How long the gateway process may take to start or answer on a busy machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// The shipped files: the service YAML (as JSON values), the config's text and the config as
/// the gateway reads it.
struct Shipped {
    yaml: Value,
    toml: String,
    config: GatewayConfig,
}

impl Shipped {
    fn read() -> anyhow::Result<Self> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/cloudrun");
        let yaml = std::fs::read_to_string(dir.join("gateway.yaml"))?;
        Ok(Self {
            yaml: serde_norway::from_str(&yaml).context("gateway.yaml is not valid YAML")?,
            toml: std::fs::read_to_string(dir.join("gateway.toml"))?,
            config: GatewayConfig::load(&dir.join("gateway.toml"))?,
        })
    }

    /// The config's `database`, a URL.
    fn database(&self) -> anyhow::Result<&str> {
        self.config
            .database
            .to_str()
            .context("the database is not a URL")
    }

    fn template(&self) -> &Value {
        &self.yaml["spec"]["template"]
    }

    fn annotation(&self, name: &str) -> Option<&str> {
        self.template()["metadata"]["annotations"][name].as_str()
    }

    fn container(&self) -> &Value {
        &self.template()["spec"]["containers"][0]
    }

    /// The container's command line: command, then args.
    fn command_line(&self) -> Vec<String> {
        let c = self.container();
        let words = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|w| w.as_str().map(str::to_owned))
                .collect()
        };
        [words(&c["command"]), words(&c["args"])].concat()
    }

    /// Where the secret volume `name` puts its one file in the container.
    fn mounted_file(&self, name: &str) -> Option<PathBuf> {
        let mount = self.container()["volumeMounts"]
            .as_array()?
            .iter()
            .find(|m| m["name"] == name)?["mountPath"]
            .as_str()?;
        let volume = self.template()["spec"]["volumes"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == name)?;
        let items = volume["secret"]["items"].as_array()?;
        (items.len() == 1).then_some(())?;
        Some(Path::new(mount).join(items[0]["path"].as_str()?))
    }
}

#[test]
fn the_cloud_run_service_runs_the_gateway_as_the_config_expects() -> anyhow::Result<()> {
    let shipped = Shipped::read()?;
    let y = &shipped.yaml;
    assert_eq!(y["apiVersion"], "serving.knative.dev/v1");
    assert_eq!(y["kind"], "Service");
    assert_eq!(
        y["metadata"]["annotations"]["run.googleapis.com/ingress"],
        "all"
    );
    let spec = &shipped.template()["spec"];
    assert_eq!(spec["timeoutSeconds"], 3600, "Cloud Run's longest request");
    assert!(
        spec["containerConcurrency"].as_u64().unwrap_or(80) > 80,
        "each agent holds a request open: more than Cloud Run's default per instance"
    );
    assert!(
        spec["serviceAccountName"]
            .as_str()
            .is_some_and(|s| s.ends_with(".iam.gserviceaccount.com")),
        "the service account that signs the ID tokens"
    );
    let scale = |name: &str| -> anyhow::Result<u32> {
        let v = shipped
            .annotation(name)
            .with_context(|| format!("no {name}"))?;
        Ok(v.parse()?)
    };
    let (min, max) = (
        scale("autoscaling.knative.dev/minScale")?,
        scale("autoscaling.knative.dev/maxScale")?,
    );
    assert!(min >= 1 && max >= min, "min {min}, max {max}");
    assert_eq!(
        shipped.annotation("run.googleapis.com/cpu-throttling"),
        Some("false"),
        "CPU between requests: keep-alives, session timers, revocation reloads"
    );

    let c = shipped.container();
    let port = &c["ports"][0];
    assert_eq!(
        port["name"], "http1",
        "HTTP/1.1: the carrier's WebSocket upgrade"
    );
    assert_eq!(port["containerPort"], 8080);
    assert_eq!(c["startupProbe"]["httpGet"]["port"], port["containerPort"]);

    // The command runs `touchgate-gateway serve` on the config the YAML mounts.
    let line = shipped.command_line();
    assert!(
        line[0].ends_with("/touchgate-gateway") && line[1] == "serve",
        "{line:?}"
    );
    let config_arg = line
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| PathBuf::from(&w[1]))
        .context("no --config")?;
    assert_eq!(Some(config_arg), shipped.mounted_file("config"));

    // The config names what the YAML provides: the TLS file it mounts, the Cloud SQL
    // instance's socket, the password in PGPASSWORD, the audit log on stdout, no UDP to rely on.
    let cfg = &shipped.config;
    let tls_file = shipped.mounted_file("tls").context("no tls volume")?;
    assert_eq!((&cfg.tls.cert, &cfg.tls.key), (&tls_file, &tls_file));
    let instance = shipped
        .annotation("run.googleapis.com/cloudsql-instances")
        .context("no Cloud SQL instance")?;
    let database = url::Url::parse(shipped.database()?)?;
    let host = database
        .query_pairs()
        .find(|(k, _)| k == "host")
        .map(|(_, v)| v.into_owned());
    assert_eq!(host, Some(format!("/cloudsql/{instance}")));
    assert!(database.password().is_none(), "no password in the config");
    let password = c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "PGPASSWORD")
        .context("no PGPASSWORD")?;
    assert!(password["valueFrom"]["secretKeyRef"]["name"].is_string());
    assert_eq!(cfg.audit_log.as_deref(), Some("-"));
    assert!(
        cfg.listen_ws.is_none(),
        "the carrier's port comes from $PORT"
    );
    assert!(!cfg.attestation.allow_software);
    Ok(())
}

/// The config as the container sees it, with this machine's files: the TLS file in `dir`, the
/// database at the test server's Unix socket (as Cloud SQL's is).
fn adapted_config(
    shipped: &Shipped,
    pg: &Postgres,
    dir: &Path,
) -> anyhow::Result<(PathBuf, String)> {
    let cert = touchgate_gateway::tls::generate_dev_cert(&["gw.example.com".into()])?;
    let tls_file = shipped.mounted_file("tls").context("no tls volume")?;
    let tls_here = dir.join("tls.pem");
    std::fs::write(&tls_here, format!("{}{}", cert.cert_pem, cert.key_pem))?;
    let socket_dir = pg
        .data_dir()
        .parent()
        .context("no socket folder")?
        .to_owned();
    let database = shipped.database()?;
    let instance = shipped
        .annotation("run.googleapis.com/cloudsql-instances")
        .context("no Cloud SQL instance")?;
    let here = database.replace(
        &format!("host=/cloudsql/{instance}"),
        &format!("host={}&port={}", socket_dir.display(), pg.port),
    );
    assert_ne!(here, database, "the URL names the instance's socket");
    let text = shipped
        .toml
        .replace(
            &tls_file.display().to_string(),
            &tls_here.display().to_string(),
        )
        .replace(database, &here);
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text)?;
    Ok((path, cert.fingerprint))
}

/// The test server's password, for PGPASSWORD (the config's URL has none, as on Cloud Run).
fn pg_password(pg: &Postgres) -> anyhow::Result<String> {
    Ok(url::Url::parse(&pg.url)?
        .password()
        .context("no password")?
        .to_owned())
}

/// A free TCP port on this machine, for `$PORT`.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// What the gateway process prints, line by line, kept for the end of the test.
struct Stdout {
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Stdout {
    /// Waits for the first line (from those not seen yet) for which `want` is true.
    async fn wait_for(
        &mut self,
        what: &str,
        want: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        tokio::time::timeout(PATIENCE, async {
            while let Some(line) = self.lines.recv().await {
                self.seen.push(line.clone());
                if want(&line) {
                    return Ok(line);
                }
            }
            anyhow::bail!("the gateway's stdout ended before {what}")
        })
        .await
        .with_context(|| format!("no {what} on the gateway's stdout: {:#?}", self.seen))?
    }

    /// Waits for an audit line whose `event` is `event` and for which `want` is true.
    async fn wait_for_audit(
        &mut self,
        event: &str,
        want: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let line = self
            .wait_for(event, |l| {
                serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == event && want(&v))
            })
            .await?;
        Ok(serde_json::from_str(&line)?)
    }
}

#[tokio::test]
async fn on_cloud_run_the_carrier_and_the_keys_answer_on_port_and_the_audit_goes_to_stdout()
-> anyhow::Result<()> {
    let shipped = Shipped::read()?;
    let pg = Postgres::start().await?;
    let dir = tempfile::tempdir()?;
    let (config, fingerprint) = adapted_config(&shipped, &pg, dir.path())?;
    let password = pg_password(&pg)?;
    let gateway = |args: &[&str]| {
        let mut c = tokio::process::Command::new(gateway_program()?);
        c.args(args)
            .env("PGPASSWORD", &password)
            .env_remove("TOUCHGATE_GATEWAY_DATABASE")
            .env_remove("PORT")
            .kill_on_drop(true);
        anyhow::Ok(c)
    };

    // The gateway's own check accepts the config, database and all.
    let config_arg = config.display().to_string();
    let check = gateway(&["check", "--config", &config_arg])?
        .output()
        .await?;
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{said}");
    assert!(said.contains("PostgreSQL"), "{said}");

    // `serve` as the YAML runs it, with Cloud Run's $PORT. The QUIC and admin addresses of
    // the config are fixed ports inside a container; here the system picks them.
    let port = free_port()?;
    let mut args: Vec<String> = shipped.command_line()[1..].to_vec();
    let at = args
        .iter()
        .position(|a| a == "--config")
        .context("--config")?
        + 1;
    args[at] = config_arg;
    args.extend(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = gateway(&args)?
        .env("PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut stdout = Stdout {
        lines: rx,
        seen: Vec::new(),
    };
    let listening = stdout
        .wait_for("the listening line", |l| {
            l.starts_with("touchgate-gateway listening:")
        })
        .await?;
    let admin: SocketAddr = listening
        .rsplit("admin on http://")
        .next()
        .context("no admin address")?
        .parse()?;
    let plain = format!(
        "carrier on http://0.0.0.0:{port}{}",
        touchgate_carrier::PATH
    );
    stdout
        .wait_for("the carrier on $PORT", |l| l.starts_with(&plain))
        .await?;
    let at_port = SocketAddr::from(([127, 0, 0, 1], port));

    // The public keys on $PORT, where the startup probe asks for them: the admin endpoint's.
    let probe = shipped.container()["startupProbe"]["httpGet"]["path"]
        .as_str()
        .context("probe path")?;
    let keys = get(at_port, probe, &[]).await?;
    assert_eq!(keys.status, 200);
    let keys = keys.json()?;
    assert_eq!(keys["keys"][0]["alg"], "ES256");
    assert_eq!(
        keys,
        get(admin, "/.well-known/jwks.json", &[]).await?.json()?
    );

    // The carrier's WebSocket upgrade, exactly as Cloud Run's front end forwards it.
    let mut ws = tokio::net::TcpStream::connect(at_port).await?;
    ws.write_all(
        format!(
            "GET {} HTTP/1.1\r\nHost: touchgate-gateway-xyz.a.run.app\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
            touchgate_carrier::PATH,
            touchgate_carrier::SUBPROTOCOL
        )
        .as_bytes(),
    )
    .await?;
    let head = read_head(&mut ws).await?;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: touchgate-quic.v1"),
        "{head}"
    );
    // A text message is not a QUIC datagram: the carrier is refused, and audited on stdout.
    ws.write_all(&masked_text_frame(b"not a datagram")).await?;
    let refused = stdout
        .wait_for_audit("connection_refused", |v| v["outcome"] == "carrier_refused")
        .await?;
    assert!(
        refused["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{refused}"
    );
    // A request that is not an upgrade gets 426, audited too.
    // It comes through Cloud Run's front end, which added the address it saw last to
    // X-Forwarded-For (the client wrote the first one): the audit names the last, the one the
    // config trusts (listen_ws_trusts_x_forwarded_for).
    let not_upgrade = get(
        at_port,
        touchgate_carrier::PATH,
        &[("X-Forwarded-For", "192.0.2.66, 203.0.113.9")],
    )
    .await?;
    assert_eq!(not_upgrade.status, 426);
    let refused = stdout
        .wait_for_audit("connection_refused", |v| v["outcome"] == "http_426")
        .await?;
    assert_eq!(refused["peer"], "203.0.113.9:0", "{refused}");

    // QUIC through the carrier on $PORT: the agent's TLS settings with the pinned certificate
    // (the combined PEM file), and a sign-in begun on the control stream.
    let challenge = sign_in_challenge_through(at_port, dir.path(), &fingerprint).await?;
    assert!(
        matches!(challenge, ServerMsg::LoginChallenge { .. }),
        "{challenge:?}"
    );
    let issued = stdout
        .wait_for_audit("challenge_issued", |v| v["user"] == "alice@example.com")
        .await?;
    assert!(
        issued["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "the TCP peer, not the carrier's made-up address: {issued}"
    );
    assert!(issued["ts"].is_string(), "{issued}");

    // Every line is an audit line in JSON, but for the few the gateway says on starting.
    child.start_kill()?;
    let _ = child.wait().await;
    while let Some(l) = stdout.lines.recv().await {
        stdout.seen.push(l);
    }
    for l in &stdout.seen {
        let json = serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"].is_string());
        let said_on_start = ["touchgate-gateway listening:", "carrier on "]
            .iter()
            .any(|p| l.starts_with(p));
        assert!(json || said_on_start, "stdout line {l:?}");
    }
    Ok(())
}

/// Reads an HTTP response head, byte by byte (nothing after it is consumed).
async fn read_head(s: &mut tokio::net::TcpStream) -> anyhow::Result<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(head.len() < 16 * 1024, "no end of the head");
        let b = tokio::time::timeout(PATIENCE, s.read_u8()).await??;
        head.push(b);
    }
    Ok(String::from_utf8(head)?)
}

/// One WebSocket text frame from a client (masked, as RFC 6455 wants), shorter than 126 bytes.
fn masked_text_frame(text: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(text.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Opens a carrier to `addr` (plain HTTP, as behind Cloud Run's TLS), makes the QUIC handshake
/// inside it as an agent does (pinning `fingerprint`) and begins a sign-in: the gateway's
/// answer.
async fn sign_in_challenge_through(
    addr: SocketAddr,
    dir: &Path,
    fingerprint: &str,
) -> anyhow::Result<ServerMsg> {
    let agent = dir.join("agent.toml");
    std::fs::write(
        &agent,
        format!(
            "gateway = \"{addr}\"\nserver_name = \"gw.example.com\"\n\
             gateway_cert_sha256 = \"{fingerprint}\"\nuser = \"alice@example.com\"\n\
             authenticator = \"soft:{}\"\n",
            dir.join("alice.softkey").display()
        ),
    )?;
    let cfg = AgentConfig::load(&agent)?;
    let key = SessionKey::generate()?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let carrier = touchgate_carrier::client::open(
        tcp,
        &format!(
            "ws://touchgate-gateway-xyz.a.run.app{}",
            touchgate_carrier::PATH
        ),
    )
    .await?;
    let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
        touchgate_carrier::endpoint_config(),
        None,
        carrier.hub.clone(),
        Arc::new(quinn::TokioRuntime),
    )?;
    endpoint.set_default_client_config(touchgate_agent::tunnel::client_config(&cfg, &key)?);
    let conn = tokio::time::timeout(
        PATIENCE,
        endpoint.connect(carrier.gateway, "gw.example.com")?,
    )
    .await??;
    let (mut send, mut recv) = conn.open_bi().await?;
    touchgate_common::wire::write_frame(
        &mut send,
        &ClientMsg::LoginBegin {
            user: "alice@example.com".into(),
        },
    )
    .await?;
    let answer = tokio::time::timeout(
        PATIENCE,
        touchgate_common::wire::read_frame::<ServerMsg, _>(&mut recv),
    )
    .await??
    .context("the gateway closed the control stream")?;
    conn.close(0u32.into(), b"done");
    Ok(answer)
}

//! The figures behind `scripts/scale`: how many signed-in agents one gateway holds open and its
//! memory per connection, and how many sign-ins a second it completes on each store.
//!
//! A simulated agent is what a real one is on the wire: its own session key and client
//! certificate, a QUIC connection signed in with a software key's WebAuthn assertion through the
//! agent's own tunnel code, then idle but for the agent's keep-alives. They all share one UDP
//! socket (one quinn endpoint; each connection gets its own client certificate through a handle
//! of its own on that endpoint), so thousands of them cost the bench little beside the gateway.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio::task::JoinSet;
use touchgate_agent::{
    AgentConfig, SharedAuthn,
    authenticator::hid::NoPrompt,
    tunnel::{self, Tunnel},
};

use crate::{percentile, rss_kib};

/// The gateway the simulated agents sign in to.
#[derive(clap::Args)]
pub struct Target {
    /// The gateway's QUIC address.
    #[arg(long)]
    gateway: SocketAddr,
    /// The gateway's self-signed certificate for `localhost` (PEM), trusted as its CA.
    #[arg(long)]
    gateway_cert: PathBuf,
    /// Folder of the users' software keys, `USER.softkey` each (`enrol` makes them).
    #[arg(long)]
    keys: PathBuf,
}

/// The flags of `touchgate-bench agents`.
#[derive(clap::Args)]
pub struct Agents {
    #[command(flatten)]
    target: Target,
    /// Connections to hold open at each step, ascending.
    #[arg(long, value_delimiter = ',', default_value = "1000,2500,5000,10000")]
    ladder: Vec<usize>,
    /// The gateway's process id (its memory, CPU time and files are read from /proc).
    #[arg(long)]
    gateway_pid: u32,
    /// Service the sampled agents send a request to.
    #[arg(long)]
    service: String,
    /// How long every connection stays idle at the top before the check.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Agents that send a request at the end.
    #[arg(long, default_value_t = 100)]
    sample: usize,
    /// How often each agent pings a quiet connection (default: as the agent does).
    #[arg(long, value_parser = humantime::parse_duration)]
    keep_alive: Option<Duration>,
    /// How long an agent hears nothing before it takes the connection as lost (default: as the
    /// agent does).
    #[arg(long, value_parser = humantime::parse_duration)]
    dead_after: Option<Duration>,
}

/// The flags of `touchgate-bench signins`.
#[derive(clap::Args)]
pub struct Signins {
    #[command(flatten)]
    target: Target,
    /// How long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The gateway's process id (its CPU time is read from /proc).
    #[arg(long)]
    gateway_pid: u32,
}

/// A software key's file name ends so; the rest is the user it is enrolled for.
const KEY_SUFFIX: &str = ".softkey";
/// How long the gateway is left alone after a step before its memory is read: connections just
/// signed in may still be sending their last packets.
const SETTLE: Duration = Duration::from_secs(2);
/// How long a sample request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The request a sampled agent sends through its tunnel, and what the bench upstream answers.
const REQUEST: &[u8] = b"GET /small HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
const ANSWER: &[u8] = b"hello, world\n";
/// Clock ticks a second in `/proc/PID/stat` and `/proc/stat` (`USER_HZ`, 100 on Linux's every
/// architecture).
const TICKS_PER_S: f64 = 100.0;

impl Target {
    /// The agent config of `user`, with its software key in [`Target::keys`].
    fn agent_config(&self, user: &str) -> anyhow::Result<AgentConfig> {
        let key = self.keys.join(format!("{user}{KEY_SUFFIX}"));
        let mut table = toml::Table::new();
        table.insert("gateway".into(), self.gateway.to_string().into());
        table.insert("server_name".into(), "localhost".into());
        table.insert(
            "gateway_ca".into(),
            self.gateway_cert.display().to_string().into(),
        );
        table.insert("user".into(), user.into());
        table.insert(
            "authenticator".into(),
            format!("soft:{}", key.display()).into(),
        );
        AgentConfig::from_table(table).context("agent config")
    }

    /// One signer per software key in [`Target::keys`], in the order of their users' names.
    fn signers(&self) -> anyhow::Result<Vec<Arc<Signer>>> {
        let mut users = Vec::new();
        for entry in std::fs::read_dir(&self.keys)
            .with_context(|| format!("cannot read the keys in {}", self.keys.display()))?
        {
            if let Some(user) = entry?
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(KEY_SUFFIX))
            {
                users.push(user.to_owned());
            }
        }
        anyhow::ensure!(
            !users.is_empty(),
            "no software keys in {}: enrol users first (touchgate-bench enrol)",
            self.keys.display()
        );
        users.sort();
        users
            .iter()
            .map(|user| Ok(Arc::new(Signer::open(self.agent_config(user)?, false)?)))
            .collect()
    }
}

/// A user and their software key. Its sign-ins must not overlap: the gateway refuses a
/// signature counter that is not above the last one it stored, so one user's sign-ins run one
/// after another, as a key's touches do.
struct Signer {
    cfg: AgentConfig,
    authn: SharedAuthn,
}

impl Signer {
    fn open(cfg: AgentConfig, create: bool) -> anyhow::Result<Self> {
        let authn = touchgate_agent::shared_authenticator(&cfg, create, Arc::new(NoPrompt))?;
        Ok(Self { cfg, authn })
    }
}

/// Enrols a new software key for each `USER CODE` line of standard input (invites made with
/// `touchgate-gateway invite`), into [`Target::keys`].
pub async fn enrol(target: &Target) -> anyhow::Result<()> {
    let mut enrolled = 0;
    for line in std::io::stdin().lines() {
        let line = line?;
        let Some((user, code)) = line.trim().split_once(' ') else {
            anyhow::bail!("expected `USER CODE` on each line, got {line:?}");
        };
        let signer = Signer::open(target.agent_config(user)?, true)?;
        touchgate_agent::enroll(&signer.cfg, &signer.authn, code.trim())
            .await
            .with_context(|| format!("cannot enrol {user}"))?;
        enrolled += 1;
    }
    println!("{}", serde_json::json!({ "enrolled": enrolled }));
    Ok(())
}

/// Signed-in agents held open: opens connections up to each count of the ladder in turn (every
/// user signing in its share, the users at the same time), reads the gateway's memory at each,
/// then leaves them all idle for a while and checks that every one is still open and that a
/// sample of them still gets an answer from the service. Also says how busy the gateway, this
/// process (the agents) and the whole machine were while the agents idled, in cores.
pub async fn agents(args: &Agents) -> anyhow::Result<()> {
    let Agents {
        target,
        ladder,
        gateway_pid,
        service,
        hold,
        sample,
        keep_alive,
        dead_after,
    } = args;
    let (gateway_pid, hold, sample) = (*gateway_pid, *hold, *sample);
    let keep_alive = keep_alive.unwrap_or(tunnel::KEEP_ALIVE);
    let dead_after = dead_after.unwrap_or(tunnel::DEAD_AFTER);
    let client = Arc::new(Client::new(keep_alive, dead_after)?);
    let signers = target.signers()?;
    let baseline = rss_kib(gateway_pid, "VmRSS:")?;
    let baseline_fds = open_files(gateway_pid)?;
    let mut open: Vec<Tunnel> = Vec::new();
    let mut steps = Vec::new();
    let mut stopped_by = None;
    for &goal in ladder {
        let started = Instant::now();
        let (more, failed) = sign_in_many(&client, &signers, goal.saturating_sub(open.len())).await;
        let seconds = started.elapsed().as_secs_f64();
        let opened = more.len();
        open.extend(more);
        tokio::time::sleep(SETTLE).await;
        let rss = rss_kib(gateway_pid, "VmRSS:")?;
        steps.push(serde_json::json!({
            "connections": open.len(),
            "gateway_rss_kib": rss,
            "kib_per_connection": rss.saturating_sub(baseline) as f64 / open.len().max(1) as f64,
            "sign_ins_per_s": opened as f64 / seconds,
        }));
        eprintln!(
            "  {} agents signed in, gateway RSS {} MiB",
            open.len(),
            rss / 1024
        );
        if let Some(e) = failed {
            stopped_by = Some(format!("{e:#}"));
            break;
        }
    }
    let fds = open_files(gateway_pid)?;
    let drops_filling = client.drops(target.gateway)?;
    let me = std::process::id();
    let before = [
        cpu_ticks(gateway_pid)?,
        cpu_ticks(me)?,
        machine_busy_ticks()?,
    ];
    tokio::time::sleep(hold).await;
    let after = [
        cpu_ticks(gateway_pid)?,
        cpu_ticks(me)?,
        machine_busy_ticks()?,
    ];
    let [gateway_cpu, agents_cpu, machine_cpu] =
        std::array::from_fn(|i| (after[i] - before[i]) as f64 / TICKS_PER_S / hold.as_secs_f64());
    let drops = client.drops(target.gateway)?;
    let alive = open
        .iter()
        .filter(|t| t.connection().close_reason().is_none())
        .count();
    let picked: Vec<_> = open
        .iter()
        .step_by((open.len() / sample.max(1)).max(1))
        .take(sample)
        .collect();
    let mut answered = 0;
    let mut sample_error = None;
    for t in &picked {
        match request(t, service).await {
            Ok(()) => answered += 1,
            Err(e) => sample_error = Some(format!("{e:#}")),
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "baseline_rss_kib": baseline,
            "steps": steps,
            "reached": open.len(),
            "baseline_fds": baseline_fds,
            "gateway_fds": fds,
            "stopped_by": stopped_by,
            "held_s": hold.as_secs_f64(),
            "keep_alive_s": keep_alive.as_secs_f64(),
            "dead_after_s": dead_after.as_secs_f64(),
            "idle_cpu_cores": { "gateway": gateway_cpu, "agents": agents_cpu, "machine": machine_cpu },
            "udp_drops": {
                "gateway_filling": drops_filling.0,
                "gateway_idle": drops.0 - drops_filling.0,
                "agents_filling": drops_filling.1,
                "agents_idle": drops.1 - drops_filling.1,
            },
            "alive": alive,
            "sampled": picked.len(),
            "sample_answered": answered,
            "sample_error": sample_error,
        })
    );
    for t in &open {
        t.connection()
            .close(touchgate_proto::close::AGENT_DONE.into(), b"done");
    }
    client.endpoint.wait_idle().await;
    Ok(())
}

/// Sign-ins per second: each user signs in once on a connection of its own, as an agent that
/// starts, then again and again on it for `duration` (a renewal is the same sign-in: a
/// challenge, the key's assertion, its verification, the counter's update and a new session
/// token), all users at the same time. Also says how busy the gateway `gateway_pid` and the
/// whole machine were meanwhile, in cores.
pub async fn signins(args: &Signins) -> anyhow::Result<()> {
    let Signins {
        target,
        duration,
        gateway_pid,
    } = args;
    let (duration, gateway_pid) = (*duration, *gateway_pid);
    let client = Arc::new(Client::new(tunnel::KEEP_ALIVE, tunnel::DEAD_AFTER)?);
    let signers = target.signers()?;
    let ready = Arc::new(tokio::sync::Barrier::new(signers.len() + 1));
    let mut tasks = JoinSet::new();
    for s in &signers {
        let (client, s, ready) = (client.clone(), s.clone(), ready.clone());
        tasks.spawn(async move {
            let tunnel = client.sign_in(&s).await;
            ready.wait().await;
            let tunnel = tunnel?;
            let deadline = Instant::now() + duration;
            let mut took = Vec::new();
            while Instant::now() < deadline {
                let started = Instant::now();
                tunnel.login(&s.authn, &s.cfg.user, None).await?;
                took.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(took)
        });
    }
    ready.wait().await;
    let started = Instant::now();
    let (gateway_before, machine_before) = (cpu_ticks(gateway_pid)?, machine_busy_ticks()?);
    let mut took = Vec::new();
    while let Some(done) = tasks.join_next().await {
        took.extend(done??);
    }
    let seconds = started.elapsed().as_secs_f64();
    let cores = |ticks: u64| ticks as f64 / TICKS_PER_S / seconds;
    let gateway_cpu = cores(cpu_ticks(gateway_pid)? - gateway_before);
    let machine_cpu = cores(machine_busy_ticks()? - machine_before);
    took.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "sign_ins_per_s": took.len() as f64 / seconds,
            "p50_ms": percentile(&took, 0.5),
            "p99_ms": percentile(&took, 0.99),
            "sign_ins": took.len(),
            "signers": signers.len(),
            "seconds": seconds,
            "gateway_cpu_cores": gateway_cpu,
            "machine_busy_cores": machine_cpu,
        })
    );
    Ok(())
}

/// Starts a PostgreSQL for the run (Debian's, in a temporary directory, on a free port of
/// 127.0.0.1), prints its URL and keeps it until Ctrl-C or SIGTERM, then stops it and removes
/// its directory.
pub async fn postgres() -> anyhow::Result<()> {
    let pg = touchgate_testkit::postgres::Postgres::start().await?;
    // The tests' cluster skips fsync; SQLite syncs every commit, and so does a real server.
    pg.psql("ALTER SYSTEM SET fsync = on").await?;
    pg.psql("SELECT pg_reload_conf()").await?;
    println!("{}", pg.url);
    touchgate_common::shutdown_signal().await;
    drop(pg);
    Ok(())
}

/// Signs in `count` new agents, each user its share at the same time as the others; returns
/// those signed in, and the first failure, which stops the rest.
async fn sign_in_many(
    client: &Arc<Client>,
    signers: &[Arc<Signer>],
    count: usize,
) -> (Vec<Tunnel>, Option<anyhow::Error>) {
    let mut tasks = JoinSet::new();
    for (i, s) in signers.iter().enumerate() {
        let share = count / signers.len() + usize::from(i < count % signers.len());
        let (client, s) = (client.clone(), s.clone());
        tasks.spawn(async move {
            let mut opened = Vec::with_capacity(share);
            for _ in 0..share {
                match client.sign_in(&s).await {
                    Ok(t) => opened.push(t),
                    Err(e) => return (opened, Some(e)),
                }
            }
            (opened, None)
        });
    }
    let mut all = Vec::with_capacity(count);
    let mut first_failure = None;
    while let Some(done) = tasks.join_next().await {
        let (opened, failed) = match done {
            Ok(done) => done,
            Err(e) => (Vec::new(), Some(e.into())),
        };
        all.extend(opened);
        first_failure = first_failure.or(failed);
    }
    (all, first_failure)
}

/// Opens a data stream to `service` and sends one HTTP request through it.
async fn request(t: &Tunnel, service: &str) -> anyhow::Result<()> {
    let (mut send, mut recv) = t.open_stream(service).await?;
    send.write_all(REQUEST).await?;
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, recv.read_to_end(64 * 1024))
        .await
        .context("no answer in time")??;
    anyhow::ensure!(
        answer.starts_with(b"HTTP/1.1 200") && answer.ends_with(ANSWER),
        "unexpected answer: {}",
        String::from_utf8_lossy(&answer)
    );
    Ok(())
}

/// Datagrams the kernel dropped for a full receive buffer on the UDP socket bound to `port` of
/// 127.0.0.1 (`/proc/net/udp`).
fn udp_drops(port: u16) -> anyhow::Result<u64> {
    let table = std::fs::read_to_string("/proc/net/udp")?;
    let local = format!("0100007F:{port:04X}");
    // sl local_address rem_address … drops
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1) == Some(&local.as_str()))
        .and_then(|f| f.last()?.parse().ok())
        .with_context(|| format!("no UDP socket on 127.0.0.1:{port}"))
}

/// How many files (sockets included) the process `pid` has open.
fn open_files(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// CPU time the process `pid` has used, user and system, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command's name in parentheses: state, then 10 fields, then utime and stime.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let tick = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i)
            .with_context(|| format!("short /proc/{pid}/stat"))?
            .parse()?)
    };
    Ok(tick(11)? + tick(12)?)
}

/// The whole machine's CPU time spent on anything but idling and waiting for the disk
/// (`/proc/stat`), in clock ticks.
fn machine_busy_ticks() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    // cpu user nice system idle iowait irq softirq steal …
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let (idle, iowait) = (ticks.get(3).copied(), ticks.get(4).copied());
    let (Some(idle), Some(iowait)) = (idle, iowait) else {
        anyhow::bail!("short cpu line in /proc/stat");
    };
    Ok(ticks.iter().sum::<u64>() - idle - iowait)
}

/// The one UDP socket of every simulated agent, and their keep-alive settings.
struct Client {
    endpoint: quinn::Endpoint,
    transport: Arc<quinn::TransportConfig>,
}

impl Client {
    /// A client whose agents (trusting the gateway as their configs say) ping a quiet
    /// connection every `keep_alive` and take it as lost after `dead_after` of silence (the
    /// gateway agrees to the shorter of its idle timeout and this).
    fn new(keep_alive: Duration, dead_after: Duration) -> anyhow::Result<Self> {
        // The agent's transport settings.
        let mut transport = touchgate_common::transport_config(0);
        transport.keep_alive_interval(Some(keep_alive));
        transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(dead_after)?));
        Ok(Self {
            endpoint: quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?,
            transport: Arc::new(transport),
        })
    }

    /// Datagrams dropped so far for a full receive buffer, on the gateway's socket and on this
    /// client's.
    fn drops(&self, gateway: SocketAddr) -> anyhow::Result<(u64, u64)> {
        Ok((
            udp_drops(gateway.port())?,
            udp_drops(self.endpoint.local_addr()?.port())?,
        ))
    }

    /// A new agent: a fresh session key, a connection presenting it, and a sign-in with the
    /// signer's key through the agent's tunnel code.
    async fn sign_in(&self, s: &Signer) -> anyhow::Result<Tunnel> {
        let endpoint = self.endpoint_for_new_agent(&s.cfg)?;
        let tunnel = Tunnel::connect(&endpoint, &s.cfg).await?;
        tunnel.login(&s.authn, &s.cfg.user, None).await?;
        Ok(tunnel)
    }

    /// A handle on the shared endpoint whose connections present a new session key (the
    /// agent's own client settings, with this run's keep-alive): a handle's default client
    /// config is its own, the socket and its driver are shared.
    fn endpoint_for_new_agent(&self, cfg: &AgentConfig) -> anyhow::Result<quinn::Endpoint> {
        let mut config = tunnel::client_config(cfg, &tunnel::SessionKey::generate()?)?;
        config.transport_config(self.transport.clone());
        let mut endpoint = self.endpoint.clone();
        endpoint.set_default_client_config(config);
        Ok(endpoint)
    }
}

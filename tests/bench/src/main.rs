//! Benchmark tools for `scripts/bench`: a fast local upstream, HTTP figures measured against any
//! base URL (so direct, `ssh -L` and touchgate are measured the same way), and figures only
//! touchgate has (assertion verifications per second, gateway memory per open stream, the
//! agent's per-connection check of who owns a local connection), a delay relay that gives
//! each path the same round-trip time (module `relay`), and for `scripts/scale`, the signed-in
//! agents one gateway holds open and sign-ins per second on each store (module `scale`).
//! Every figure is printed as one JSON object on stdout.

mod relay;
mod scale;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;

#[derive(Parser)]
#[command(about = "touchgate benchmark tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a port of 127.0.0.1 free on both TCP and UDP (the gateway, and a relay in front
    /// of it, take the same port on both).
    FreePort,
    /// Serve `/small` (13 bytes) and `/bulk?n=N` (N bytes) over HTTP/1.1.
    Upstream {
        /// Where to listen.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Bulk download throughput: `conns` parallel downloads of `bytes` each.
    Bulk {
        /// Base URL (http://host:port).
        #[arg(long)]
        url: String,
        /// Parallel connections.
        #[arg(long, default_value_t = 1)]
        conns: usize,
        /// Bytes per download.
        #[arg(long, default_value_t = 512 * 1024 * 1024)]
        bytes: u64,
    },
    /// Latency of `/small` at a fixed request rate, measured from each request's scheduled time.
    Latency {
        /// Base URL.
        #[arg(long)]
        url: String,
        /// Requests per second in all.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Keep-alive connections sharing the rate.
        #[arg(long, default_value_t = 8)]
        conns: u64,
        /// How long.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// New connection to first byte of `/small`, sequentially.
    Connect {
        /// Base URL.
        #[arg(long)]
        url: String,
        /// How many connections.
        #[arg(long, default_value_t = 300)]
        count: usize,
    },
    /// Sign-in assertions verified per second by the gateway's relying party (soft key).
    Verify {
        /// Assertions to verify, on one thread and again on all threads.
        #[arg(long, default_value_t = 2000)]
        count: usize,
        /// Threads for the second run (default: one per core, as the gateway runs one shard per
        /// core and sign-ins on different connections are verified on their own shards).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// The agent's per-connection cost of finding the OS user owning a local connection
    /// (Linux): `count` loopback connections accepted without the lookup, then with it.
    Owner {
        /// Loopback connections per pass.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
    },
    /// Gateway memory per open stream: opens `count` streams on one connection and reads the
    /// gateway's RSS before and after.
    Streams {
        /// Agent config (soft key, enrolled).
        #[arg(long)]
        config: PathBuf,
        /// Service to open streams to.
        #[arg(long)]
        service: String,
        /// Streams to hold open.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// The gateway's process id.
        #[arg(long)]
        gateway_pid: u32,
    },
    /// Relay UDP datagrams or TCP connections (or both, on one port) to another address,
    /// adding a fixed delay in each direction: a round-trip time without netem.
    Relay(relay::Relay),
    /// Start a PostgreSQL for a run (Debian's, in a temporary directory, on a free port of
    /// 127.0.0.1); print its URL and keep it until Ctrl-C or SIGTERM.
    Postgres,
    /// Enrol a new software key for each `USER CODE` line of standard input.
    Enrol {
        #[command(flatten)]
        target: scale::Target,
    },
    /// Signed-in agents one gateway holds open: its memory at each step of `ladder`, then
    /// whether every connection is still open after `hold` and a sample still gets answers.
    Agents(scale::Agents),
    /// Sign-ins per second: every enrolled user signs in again and again on a connection of
    /// its own, all at the same time.
    Signins(scale::Signins),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::FreePort => free_port(),
        Cmd::Upstream { listen } => upstream(listen).await,
        Cmd::Bulk { url, conns, bytes } => bulk(&url, conns, bytes).await,
        Cmd::Latency {
            url,
            rate,
            conns,
            duration,
        } => latency(&url, rate, conns, duration).await,
        Cmd::Connect { url, count } => connect(&url, count).await,
        Cmd::Verify { count, threads } => verify(count, threads).await,
        Cmd::Owner { count } => owner(count),
        Cmd::Streams {
            config,
            service,
            count,
            gateway_pid,
        } => streams(&config, &service, count, gateway_pid).await,
        Cmd::Relay(args) => relay::relay(&args).await,
        Cmd::Postgres => scale::postgres().await,
        Cmd::Enrol { target } => scale::enrol(&target).await,
        Cmd::Agents(args) => scale::agents(&args).await,
        Cmd::Signins(args) => scale::signins(&args).await,
    }
}

fn free_port() -> anyhow::Result<()> {
    for _ in 0..100 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            println!("{port}");
            return Ok(());
        }
    }
    anyhow::bail!("no port of 127.0.0.1 free on both TCP and UDP in 100 tries")
}

type Body = BoxBody<Bytes, Infallible>;

async fn upstream(listen: SocketAddr) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(listen).await?;
    let chunk = Bytes::from(vec![0x5au8; 256 * 1024]);
    loop {
        let (s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        let chunk = chunk.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let chunk = chunk.clone();
                    async move {
                        let resp: hyper::Response<Body> = if req.uri().path() == "/bulk" {
                            let n: u64 = req
                                .uri()
                                .query()
                                .and_then(|q| q.strip_prefix("n="))
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0);
                            let stream = futures_util::stream::unfold(0u64, move |sent| {
                                let chunk = chunk.clone();
                                async move {
                                    if sent >= n {
                                        return None;
                                    }
                                    let len = (n - sent).min(chunk.len() as u64) as usize;
                                    Some((
                                        Ok::<_, Infallible>(Frame::data(chunk.slice(..len))),
                                        sent + len as u64,
                                    ))
                                }
                            });
                            let mut r = hyper::Response::new(StreamBody::new(stream).boxed());
                            r.headers_mut()
                                .insert(hyper::header::CONTENT_LENGTH, n.into());
                            r
                        } else {
                            hyper::Response::new(
                                Full::new(Bytes::from_static(b"hello, world\n")).boxed(),
                            )
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

fn addr_of(url: &str) -> anyhow::Result<String> {
    let u: hyper::Uri = url.parse()?;
    let a = u.authority().context("URL has no host:port")?;
    Ok(a.to_string())
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn open(addr: &str) -> anyhow::Result<Sender> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// GETs `path` from `host` (the URL's `host:port`, as a browser or curl would send it: the agent
/// refuses other names in `Host`) and counts the body's bytes.
async fn get_all(sender: &mut Sender, host: &str, path: &str) -> anyhow::Result<u64> {
    sender.ready().await?;
    let req = hyper::Request::get(path)
        .header("host", host)
        .body(Empty::new())?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::bail!(
            "{path} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(f) = body.frame().await {
        if let Some(d) = f?.data_ref() {
            n += d.len() as u64;
        }
    }
    Ok(n)
}

async fn bulk(url: &str, conns: usize, bytes: u64) -> anyhow::Result<()> {
    let addr = addr_of(url)?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = open(&addr).await?;
            get_all(&mut s, &addr, &format!("/bulk?n={bytes}")).await
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        total == bytes * conns as u64,
        "short download: {total} bytes"
    );
    println!(
        "{}",
        serde_json::json!({ "gbit_s": total as f64 * 8.0 / secs / 1e9, "bytes": total, "seconds": secs })
    );
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn latency(url: &str, rate: u64, conns: u64, duration: Duration) -> anyhow::Result<()> {
    let addr = addr_of(url)?;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let per_conn = Duration::from_secs_f64(conns as f64 / rate as f64);
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let addr = addr.clone();
        let samples = samples.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = open(&addr).await?;
            let offset = per_conn.mul_f64(c as f64 / conns as f64);
            let mut k = 0u32;
            loop {
                let scheduled = start + offset + per_conn * k;
                if scheduled > start + duration {
                    break;
                }
                tokio::time::sleep_until(scheduled.into()).await;
                get_all(&mut s, &addr, "/small").await?;
                let ms = scheduled.elapsed().as_secs_f64() * 1000.0;
                samples
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .push(ms);
                k += 1;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let mut v = samples
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    v.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{}",
        serde_json::json!({ "p50_ms": percentile(&v, 0.5), "p99_ms": percentile(&v, 0.99), "requests": v.len() })
    );
    Ok(())
}

async fn connect(url: &str, count: usize) -> anyhow::Result<()> {
    let addr = addr_of(url)?;
    let mut v = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        let mut s = open(&addr).await?;
        s.ready().await?;
        let req = hyper::Request::get("/small")
            .header("host", &addr)
            .body(Empty::new())?;
        let resp = s.send_request(req).await?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
        let _ = resp.into_body().collect().await;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{}",
        serde_json::json!({ "p50_ms": percentile(&v, 0.5), "p99_ms": percentile(&v, 0.99), "connections": v.len() })
    );
    Ok(())
}

async fn verify(count: usize, threads: Option<usize>) -> anyhow::Result<()> {
    use touchgate_agent::authenticator::{
        Authenticator, Ceremony, client_data_json, soft::SoftKey,
    };
    use touchgate_gateway::rp::RelyingParty;
    let dir = tempfile::tempdir()?;
    let cfg: touchgate_gateway::GatewayConfig = toml::from_str(
        "listen = \"127.0.0.1:0\"\nrp_id = \"localhost\"\ndatabase = \"x\"\n[tls]\ncert = \"c\"\nkey = \"k\"\n[attestation]\nallow_software = true\nuser_verification = \"discouraged\"\n",
    )?;
    let rp = RelyingParty::new(&cfg)?;
    let mut key = SoftKey::open_or_create(&dir.path().join("bench.softkey"))?;
    let binding = [7u8; 32];
    let ca = key.software_ca_pem();
    let (ccr, pending) = rp
        .begin_enrol(
            "bench",
            uuid::Uuid::new_v4(),
            touchgate_gateway::rp::EnrolSource::Invite("code".into()),
            vec![],
            ca.as_deref(),
        )
        .map_err(|r| anyhow::anyhow!("{r}"))?;
    let cdj = client_data_json(
        Ceremony::Create,
        &ccr.public_key.challenge,
        rp.origin(),
        &binding,
    );
    let reg = key.register(&ccr.public_key, &cdj)?;
    let enrolled = rp
        .finish_enrol(pending, serde_json::to_value(&reg)?, &binding)
        .map_err(|r| anyhow::anyhow!("{r}"))?;
    let threads = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let mut work = Vec::with_capacity(2 * count);
    for _ in 0..2 * count {
        let (rcr, pending) = rp
            .begin_login("bench", std::slice::from_ref(&enrolled.key))
            .map_err(|r| anyhow::anyhow!("{r}"))?;
        let cdj = client_data_json(
            Ceremony::Get,
            &rcr.public_key.challenge,
            rp.origin(),
            &binding,
        );
        let cred = key.authenticate(&rcr.public_key, &cdj)?;
        work.push((pending, serde_json::to_value(&cred)?));
    }
    let run = |batch: Vec<_>| {
        let mut ok = 0usize;
        for (pending, cred) in batch {
            if rp.finish_login(pending, cred, &binding).is_ok() {
                ok += 1;
            }
        }
        ok
    };
    let parallel = work.split_off(count);
    let started = Instant::now();
    let ok = run(work);
    let one = count as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(ok == count, "only {ok} of {count} verified on one thread");
    let mut batches: Vec<Vec<_>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, item) in parallel.into_iter().enumerate() {
        batches[i % threads].push(item);
    }
    let started = Instant::now();
    let ok: usize = std::thread::scope(|s| {
        let handles: Vec<_> = batches.into_iter().map(|b| s.spawn(|| run(b))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let all = count as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        ok == count,
        "only {ok} of {count} verified on {threads} threads"
    );
    println!(
        "{}",
        serde_json::json!({
            "verifications_per_s": all,
            "threads": threads,
            "per_thread_alone": one,
            "count": count,
        })
    );
    Ok(())
}

/// Accepts `count` loopback connections one after another, with `lookup` run on each accepted
/// one; returns the microseconds per connection (connect, accept, lookup, close) and per lookup.
fn accept_loop(
    count: usize,
    mut lookup: impl FnMut(SocketAddr, SocketAddr) -> anyhow::Result<()>,
) -> anyhow::Result<(f64, f64)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut in_lookup = Duration::ZERO;
    let start = Instant::now();
    for _ in 0..count {
        let client = std::net::TcpStream::connect(addr)?;
        let (server, peer) = listener.accept()?;
        let local = server.local_addr()?;
        let t = Instant::now();
        lookup(peer, local)?;
        in_lookup += t.elapsed();
        // The accepting side closes first, so the time-wait remnants stay off the client's
        // ephemeral ports.
        drop(server);
        drop(client);
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / count as f64;
    Ok((per(start.elapsed()), per(in_lookup)))
}

#[cfg(target_os = "linux")]
fn owner(count: usize) -> anyhow::Result<()> {
    use touchgate_agent::peer::OwnerCheck;
    let mut check = OwnerCheck::new();
    let me = check.own_uid().context("own uid")?;
    let (accept_us, _) = accept_loop(count, |_, _| Ok(()))?;
    let (with_lookup_us, lookup_us) = accept_loop(count, |peer, local| {
        anyhow::ensure!(check.owner(peer, local)? == me, "another owner");
        Ok(())
    })?;
    // The fallback reads the whole table, so it grows with the machine's sockets (the passes
    // above left thousands in time-wait): fewer connections do.
    let proc_count = (count / 10).max(1);
    let (_, proc_us) = accept_loop(proc_count, |peer, local| {
        anyhow::ensure!(
            OwnerCheck::owner_by_proc(peer, local)? == me,
            "another owner"
        );
        Ok(())
    })?;
    println!(
        "{}",
        serde_json::json!({
            "connections": count,
            "accept_us": accept_us,
            "accept_with_lookup_us": with_lookup_us,
            "lookup_us": lookup_us,
            "proc_fallback_us": proc_us,
            "proc_fallback_connections": proc_count,
        })
    );
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn owner(_count: usize) -> anyhow::Result<()> {
    anyhow::bail!("the owner check exists on Linux only")
}

fn rss_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} for process {pid}"))
}

async fn streams(
    config: &std::path::Path,
    service: &str,
    count: usize,
    gateway_pid: u32,
) -> anyhow::Result<()> {
    use touchgate_agent::tunnel::{SessionKey, Tunnel, client_endpoint};
    let cfg = touchgate_agent::AgentConfig::load(config)?;
    let authn = touchgate_agent::shared_authenticator(
        &cfg,
        false,
        Arc::new(touchgate_agent::authenticator::hid::NoPrompt),
    )?;
    let key = SessionKey::generate()?;
    let endpoint = client_endpoint(&cfg, &key)?;
    let t = Tunnel::connect(&endpoint, &cfg).await?;
    t.login(&authn, &cfg.user, None).await?;
    // Let the gateway settle after the sign-in before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(gateway_pid, "VmRSS:")?;
    let mut open = Vec::with_capacity(count);
    for _ in 0..count {
        open.push(t.open_stream(service).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(gateway_pid, "VmRSS:")?;
    println!(
        "{}",
        serde_json::json!({
            "streams": open.len(),
            "gateway_rss_before_kib": before,
            "gateway_rss_after_kib": after,
            "kib_per_stream": (after.saturating_sub(before)) as f64 / count as f64,
        })
    );
    drop(open);
    Ok(())
}

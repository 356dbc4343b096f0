//! Soak: mixed load through a whole system on loopback for a while, with the gateway restarted
//! every few minutes. Reports requests, failures by kind, and whether any byte was corrupted.
//! Run with `scripts/soak` (10 minutes, restart every 2 minutes).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use touchgate_agent::RunningAgent;
use touchgate_e2e::{bulk_download, enrolled, get};
use touchgate_testkit::{
    lab::{Lab, LabOptions},
    pattern_sha256,
};

/// Soak test of touchgate on loopback.
#[derive(Parser)]
struct Args {
    /// How long to run.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Restart the gateway this often.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    restart_every: Duration,
    /// Concurrent workers.
    #[arg(long, default_value_t = 16)]
    workers: usize,
}

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    failed: AtomicU64,
    corrupted: AtomicU64,
    bytes: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    touchgate_common::init_logging("warn");
    let mut lab = Lab::start(LabOptions {
        limits: "signin_attempts_per_minute = 1000".into(),
        ..Default::default()
    })
    .await?;
    let (cfg, authn, _) = enrolled(&lab, "soak@example.com", &[]).await?;
    let agent = Arc::new(RunningAgent::start(cfg, authn).await?);
    let api = agent
        .local_addr("api")
        .ok_or_else(|| anyhow::anyhow!("no api listener"))?;
    let echo = agent
        .local_addr("echo")
        .ok_or_else(|| anyhow::anyhow!("no echo listener"))?;
    let counts = Arc::new(Counts::default());
    let deadline = Instant::now() + args.duration;
    let mut workers = Vec::new();
    for w in 0..args.workers {
        let counts = counts.clone();
        workers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let (ok, intact, bytes) = match (w + i as usize) % 4 {
                    0 | 1 => small(api).await,
                    2 => download(api, 1024 * 1024).await,
                    _ => echo_bytes(echo, 64 * 1024).await,
                };
                counts.requests.fetch_add(1, Relaxed);
                counts.bytes.fetch_add(bytes, Relaxed);
                if !ok {
                    counts.failed.fetch_add(1, Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if !intact {
                    counts.corrupted.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    let mut restarts = 0;
    let started = Instant::now();
    while Instant::now() + args.restart_every < deadline {
        tokio::time::sleep(args.restart_every).await;
        lab.restart_gateway().await?;
        restarts += 1;
        eprintln!(
            "{:>6.0}s  gateway restarted ({restarts}); requests {} failed {}",
            started.elapsed().as_secs_f64(),
            counts.requests.load(Relaxed),
            counts.failed.load(Relaxed)
        );
    }
    for w in workers {
        let _ = w.await;
    }
    let report = serde_json::json!({
        "duration_s": started.elapsed().as_secs(),
        "gateway_restarts": restarts,
        "requests": counts.requests.load(Relaxed),
        "failed": counts.failed.load(Relaxed),
        "corrupted": counts.corrupted.load(Relaxed),
        "bytes": counts.bytes.load(Relaxed),
        "sessions_issued": lab.audit_events("session_issued").len(),
        "sessions_resumed": lab.audit_events("session_resumed").len(),
    });
    println!("| figure | value |\n|---|---|");
    if let Some(m) = report.as_object() {
        for (k, v) in m {
            println!("| {k} | {v} |");
        }
    }
    println!("{report}");
    if counts.corrupted.load(Relaxed) > 0 {
        anyhow::bail!("corrupted bytes seen");
    }
    Ok(())
}

async fn small(addr: std::net::SocketAddr) -> (bool, bool, u64) {
    match get(addr, "/soak", &[]).await {
        Ok(a) => (a.status == 200, true, a.body.len() as u64),
        Err(_) => (false, true, 0),
    }
}

async fn download(addr: std::net::SocketAddr, n: u64) -> (bool, bool, u64) {
    let Ok(mut body) = bulk_download(addr, n).await else {
        return (false, true, 0);
    };
    let mut h = Sha256::new();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    got += d.len() as u64;
                    h.update(d);
                }
            }
            Err(_) => return (false, true, got),
        }
    }
    // A download cut short by a restart is a failure, not corruption; complete bytes must match.
    if got != n {
        return (false, true, got);
    }
    (true, hex::encode(h.finalize()) == pattern_sha256(n), got)
}

async fn echo_bytes(addr: std::net::SocketAddr, n: usize) -> (bool, bool, u64) {
    let data: Vec<u8> = (0..n as u64).map(touchgate_testkit::pattern_byte).collect();
    let Ok(s) = tokio::net::TcpStream::connect(addr).await else {
        return (false, true, 0);
    };
    let (mut r, mut w) = s.into_split();
    let send = async {
        w.write_all(&data).await?;
        w.shutdown().await
    };
    let mut back = Vec::with_capacity(n);
    let recv = tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut back));
    let (sent, got) = tokio::join!(send, recv);
    match (sent, got) {
        (Ok(()), Ok(Ok(_))) if back.len() == n => (true, back == data, n as u64),
        _ => (false, true, back.len() as u64),
    }
}

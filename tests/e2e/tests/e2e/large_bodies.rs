//! Large bodies through the tunnel, byte-identical and in bounded memory. The peak-memory
//! check must see this test alone in its process: nextest gives every test its own, and under
//! `cargo test` the test runs itself again alone (`alone`).

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use sha2::{Digest, Sha256};
use touchgate_agent::RunningAgent;
use touchgate_e2e::enrolled;
use touchgate_testkit::{
    lab::{Lab, LabOptions},
    pattern_sha256,
};

const ALICE: &str = "alice@example.com";

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn download_sha256(addr: std::net::SocketAddr, n: u64) -> anyhow::Result<(u64, String)> {
    let mut body = touchgate_e2e::bulk_download(addr, n).await?;
    let mut h = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            len += d.len() as u64;
            h.update(d);
        }
    }
    Ok((len, hex::encode(h.finalize())))
}

async fn upload(addr: std::net::SocketAddr, n: u64) -> anyhow::Result<serde_json::Value> {
    let mut sender = touchgate_e2e::http1(addr).await?;
    let chunks = futures_util::stream::iter((0..n).step_by(64 * 1024)).map(move |i| {
        let len = (n - i).min(64 * 1024);
        let chunk: Vec<u8> = (i..i + len).map(touchgate_testkit::pattern_byte).collect();
        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(chunk)))
    });
    let req = hyper::Request::post("/upload")
        .header("host", "localhost")
        .body(StreamBody::new(chunks))?;
    let resp = sender.send_request(req).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

#[tokio::test]
async fn large_bodies_cross_the_tunnel_byte_identical_in_bounded_memory() -> anyhow::Result<()> {
    // Measures the process's peak memory: alone in its process (see `alone`).
    if let Some(alone) = crate::alone::unless_alone(
        "large_bodies::large_bodies_cross_the_tunnel_byte_identical_in_bounded_memory",
    ) {
        return alone;
    }
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").expect("api");

    // Warm up every buffer and window with a smaller transfer, then measure the peak.
    let small = 8 * 1024 * 1024;
    assert_eq!(
        download_sha256(api, small).await?,
        (small, pattern_sha256(small))
    );
    let before = peak_rss_kib();

    let big: u64 = 64 * 1024 * 1024;
    let (len, sha) = download_sha256(api, big).await?;
    assert_eq!(len, big);
    assert_eq!(sha, pattern_sha256(big));
    let up = upload(api, big).await?;
    assert_eq!(up["len"], big);
    assert_eq!(up["sha256"], pattern_sha256(big));

    // Client, agent, gateway and upstream share this process: had any of them buffered a
    // body, the peak would have grown by at least 64 MiB.
    if let (Some(b), Some(a)) = (before, peak_rss_kib()) {
        let growth_mib = a.saturating_sub(b) / 1024;
        assert!(
            growth_mib < 48,
            "peak RSS grew by {growth_mib} MiB for 64 MiB bodies"
        );
    }
    agent.shutdown().await;
    Ok(())
}

//! A network path change in the middle of a download: the agent's UDP socket moves to a new
//! port, the QUIC connection migrates, and the download completes byte-identical.

use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use touchgate_agent::RunningAgent;
use touchgate_e2e::enrolled;
use touchgate_testkit::{
    lab::{Lab, LabOptions},
    pattern_sha256,
};

#[tokio::test]
async fn download_survives_a_udp_rebind_byte_identical() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, "alice@example.com", &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let before = agent.connection().expect("connected");
    let old_local = agent.connection().map(|c| c.stable_id());

    let n: u64 = 32 * 1024 * 1024;
    let mut body = touchgate_e2e::bulk_download(agent.local_addr("api").expect("api"), n).await?;
    let mut h = Sha256::new();
    let mut got = 0u64;
    let mut rebound = false;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            got += d.len() as u64;
            h.update(d);
        }
        if !rebound && got >= n / 4 {
            agent.rebind(std::net::UdpSocket::bind("127.0.0.1:0")?)?;
            rebound = true;
        }
    }
    assert!(rebound);
    assert_eq!(got, n);
    assert_eq!(hex::encode(h.finalize()), pattern_sha256(n));
    // The same connection carried on: no reconnect, no new session.
    assert_eq!(agent.connection().map(|c| c.stable_id()), old_local);
    assert!(before.close_reason().is_none());
    assert_eq!(lab.audit_events("session_resumed").len(), 0);
    agent.shutdown().await;
    Ok(())
}

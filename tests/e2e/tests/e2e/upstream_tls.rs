//! HTTPS upstreams behind a company CA: `upstream_ca` trusts that CA for the service, and
//! without it the gateway refuses the certificate and says so.

use touchgate_agent::RunningAgent;
use touchgate_e2e::enrolled;
use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";

#[tokio::test]
async fn an_https_service_behind_a_private_ca_is_reached_with_upstream_ca_and_refused_without()
-> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (internal, ca_pem) = touchgate_testkit::start_cloud_run_private_ca(
        listener,
        touchgate_testkit::lab::API_AUDIENCE,
    )
    .await?;
    let mut lab = Lab::start(LabOptions::default()).await?;
    std::fs::write(lab.dir.path().join("internal-ca.pem"), ca_pem)?;
    let upstream = lab.upstream.url();
    let https = format!("https://localhost:{}", internal.addr.port());
    lab.reconfigure(
        &format!("name = \"api\"\nkind = \"http\"\nupstream = \"{upstream}\""),
        &format!("name = \"api\"\nkind = \"http\"\nupstream = \"{https}\"\nupstream_ca = \"internal-ca.pem\""),
    )
    .await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg.clone(), authn.clone()).await?;
    let api = agent.local_addr("api").expect("api");
    let seen = touchgate_e2e::get(api, "/internal", &[]).await?;
    assert_eq!(seen.status, 200, "{}", String::from_utf8_lossy(&seen.body));
    assert_eq!(seen.json()?["headers"]["x-touchgate-user"], ALICE);
    // `Expect: 100-continue` to an HTTPS service (HTTP/2 by ALPN here, which has no 1xx in
    // hyper): a refusal is still the first thing the caller hears, and an accepted upload
    // goes through.
    let (_s, head) = super::faithful::first_answer_to_expect(api, "PUT", "/too-large").await?;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    let (mut s, head) = super::faithful::first_answer_to_expect(api, "POST", "/upload").await?;
    assert!(head.starts_with("HTTP/1.1 100"), "{head}");
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"hello").await?;
        let mut rest = vec![0u8; 4096];
        let n =
            tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut rest)).await??;
        let rest = String::from_utf8_lossy(&rest[..n]);
        assert!(
            rest.starts_with("HTTP/1.1 200") && rest.contains("\"len\":5"),
            "{rest}"
        );
    }
    agent.shutdown().await;

    // Without the setting the public roots do not know the company CA: 502, said in words.
    lab.reconfigure("upstream_ca = \"internal-ca.pem\"", "")
        .await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let refused =
        touchgate_e2e::get(agent.local_addr("api").expect("api"), "/internal", &[]).await?;
    assert_eq!(refused.status, 502);
    let text = String::from_utf8_lossy(&refused.body);
    assert!(text.contains("unreachable"), "{text}");
    // The three requests above, and none since: the refused certificate ended the call.
    assert_eq!(internal.request_count(), 3);
    agent.shutdown().await;
    Ok(())
}

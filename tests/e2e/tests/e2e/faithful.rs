//! Tools behave as if they talked to the service: a redirect to the service's own URL stays
//! in the tunnel, its cookie is kept for localhost, the service's own page is seen as
//! same-origin, and forwarding headers a caller forged never arrive. Shown with a raw client
//! and with Debian's `curl` (without it a test fails); `real_browser.rs` shows it in Chromium.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use touchgate_agent::RunningAgent;
use touchgate_e2e::{enrolled, get, http1};
use touchgate_testkit::lab::{Lab, LabOptions};

pub(super) const ALICE: &str = "alice@example.com";

/// A lab and a running agent for Alice, enrolled with a software key.
pub(super) async fn started() -> anyhow::Result<(Lab, RunningAgent)> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    Ok((lab, agent))
}

#[tokio::test]
async fn a_redirect_to_the_service_comes_back_to_the_local_port_with_its_cookie()
-> anyhow::Result<()> {
    let (_lab, agent) = started().await?;
    let api = agent.local_addr("api").expect("api");
    let mut sender = http1(api).await?;
    let host = format!("127.0.0.1:{}", api.port());
    let resp = sender
        .send_request(
            hyper::Request::get("/redirect")
                .header("host", &host)
                .body(Empty::<Bytes>::new())?,
        )
        .await?;
    assert_eq!(resp.status(), 302);
    let location = resp.headers()["location"].to_str()?.to_owned();
    assert_eq!(location, format!("http://{host}/landing?from=redirect"));
    let cookie = resp.headers()["set-cookie"].to_str()?.to_owned();
    assert_eq!(cookie, "sid=abc; Path=/; HttpOnly");
    resp.into_body().collect().await?;
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn curl_follows_a_redirect_to_the_service_back_to_the_local_port_without_its_forged_header()
-> anyhow::Result<()> {
    let (_lab, agent) = started().await?;
    let local = format!(
        "http://127.0.0.1:{}",
        agent.local_addr("api").expect("api").port()
    );
    let mut curl = std::process::Command::new("curl");
    // `-q` first: no `.curlrc`; no proxy from the environment.
    curl.args(["-q", "-sS", "-L", "--noproxy", "*", "--max-time", "20"])
        .args(["-H", "X-Forwarded-For: 1.2.3.4", "-w", "\n%{url_effective}"])
        .arg(format!("{local}/redirect"));

    let out = tokio::task::spawn_blocking(move || curl.output()).await?;
    let out = out.map_err(|e| {
        anyhow::anyhow!(
            "cannot run curl ({e}): install Debian's curl (scripts/lib/system-packages.sh does)"
        )
    })?;

    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "curl {}: {stderr}\n{stdout}",
        out.status
    );
    let (page, url) = stdout.rsplit_once('\n').unwrap_or_default();
    assert_eq!(url, format!("{local}/landing?from=redirect"), "{stdout}");
    assert!(page.contains(r#"<p id="landed">landed</p>"#), "{page}");
    assert!(page.contains(r#""user-agent":"curl/"#), "{page}");
    assert!(
        !page.contains("x-forwarded-for") && !page.contains("1.2.3.4"),
        "the forged header reached the service: {page}"
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_services_own_page_is_same_origin_and_forged_forwarding_headers_are_dropped()
-> anyhow::Result<()> {
    let (lab, agent) = started().await?;
    let api = agent.local_addr("api").expect("api");
    let own = format!("http://localhost:{}", api.port());
    let seen = get(
        api,
        "/form",
        &[
            ("origin", own.as_str()),
            ("referer", &format!("{own}/page?x=1")),
            ("x-forwarded-for", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
        ],
    )
    .await?
    .json()?;
    let upstream = lab.upstream.url();
    let upstream = upstream.trim_end_matches('/');
    let h = &seen["headers"];
    assert_eq!(h["origin"], upstream, "{seen}");
    assert_eq!(h["referer"], format!("{upstream}/page?x=1"), "{seen}");
    assert_eq!(h["host"], upstream.trim_start_matches("http://"), "{seen}");
    for forged in ["x-forwarded-for", "forwarded", "x-real-ip"] {
        assert!(
            h.get(forged).is_none(),
            "{forged} reached the service: {seen}"
        );
    }
    agent.shutdown().await;
    Ok(())
}

/// Sends a request head with `Expect: 100-continue` and returns the first response head.
pub(super) async fn first_answer_to_expect(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
) -> anyhow::Result<(tokio::net::TcpStream, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
            addr.port()
        )
        .as_bytes(),
    )
    .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n =
            tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut byte)).await??;
        anyhow::ensure!(n == 1, "closed before an answer");
        head.push(byte[0]);
    }
    Ok((s, String::from_utf8_lossy(&head).into_owned()))
}

#[tokio::test]
async fn an_upstream_that_refuses_at_once_is_heard_before_the_body_is_sent() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_lab, agent) = started().await?;
    let api = agent.local_addr("api").expect("api");
    // Refused: the first thing the client hears is the upstream's 413, not a 100 from the
    // gateway, so it never sends the body.
    let (_s, head) = first_answer_to_expect(api, "PUT", "/too-large").await?;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    // Accepted: the upstream's 100 comes through, then the body, then the answer.
    let (mut s, head) = first_answer_to_expect(api, "POST", "/upload").await?;
    assert!(head.starts_with("HTTP/1.1 100"), "{head}");
    s.write_all(b"hello").await?;
    let mut rest = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut rest)).await??;
    let rest = String::from_utf8_lossy(&rest[..n]);
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    assert!(rest.contains("\"len\":5"), "{rest}");
    agent.shutdown().await;
    Ok(())
}

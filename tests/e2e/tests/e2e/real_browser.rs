//! The browser attack on the agent's localhost port, made by a real browser: a page on another
//! site (127.0.0.2) has Chromium send a no-cors POST, a CORS GET, a WebSocket and a form POST
//! to the `api` port. The header tests in `browsers.rs` assume what a browser sends; this one
//! checks that what Chromium really sends is refused before the upstream, and that a
//! navigation the user types still reaches the service.
//!
//! And the service's own pages in that browser, as if it talked to the service directly: a
//! redirect to the service's absolute URL keeps it on the local port with the cookie the
//! service set for its own domain, and an app that checks `Origin` against `Host` accepts the
//! page's POST and WebSocket. The browser opens `localhost`, not the upstream's 127.0.0.1, so a
//! cookie `Domain` left in place would be refused.
//!
//! Needs Debian's `chromium` (`CHROMIUM` names another binary); without it the test fails.

use std::{io::Read, net::SocketAddr, path::Path, process::Stdio, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use touchgate_e2e::request;
use touchgate_testkit::{lab::API_AUDIENCE, mint_id_token};

use super::faithful::{ALICE, started};

/// Longest a Chromium run may take before it is killed.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_page_on_another_site_cannot_reach_the_service_through_a_real_browser()
-> anyhow::Result<()> {
    let (lab, agent) = started().await?;
    let api = agent.local_addr("api").expect("api");
    let target = format!("127.0.0.1:{}", api.port());
    // The attacker's page is served on another loopback address but the same port number as
    // the service (another OS user could do that): its origin must not pass as the port's own.
    let attacker = Site::start(
        ATTACK_PAGE.replace("__TARGET__", &target),
        ("127.0.0.2", api.port()),
    )
    .await?;
    let attacker_origin = format!("http://{}", attacker.addr);
    let before = lab.upstream.request_count();

    let page = run_chromium(
        &lab.dir.path().join("attack"),
        &format!("{attacker_origin}/"),
    )
    .await?;

    assert!(
        page.dom.contains("<title>done</title>"),
        "the attacker page did not finish\n{}",
        page.details()
    );
    // What the page could learn: nothing readable.
    let seen: Vec<&str> = page.text_of("log").lines().collect();
    for expected in ["no-cors=opaque", "cors=failed", "ws=closed", "form=loaded"] {
        assert!(
            seen.iter().any(|l| l.starts_with(expected)),
            "{expected}\n{}",
            page.details()
        );
    }
    assert_eq!(
        lab.upstream.request_count(),
        before,
        "a request from the attacker page reached the service\n{}",
        page.details()
    );
    let refused = lab.audit_events("browser_request_refused");
    assert!(
        refused.len() >= 4,
        "one refusal for each of the four requests: {refused:#?}\n{}",
        page.details()
    );
    let named_origin = format!("Origin \"{attacker_origin}\" is another site");
    for e in &refused {
        assert_eq!(e["user"], ALICE, "{e}");
        assert_eq!(e["service"], "api", "{e}");
        assert_eq!(e["outcome"], "403", "{e}");
        assert!(
            e["reason"]
                .as_str()
                .is_some_and(|r| r.contains(&named_origin)),
            "{e}"
        );
    }
    for method in ["GET", "POST"] {
        assert!(
            refused.iter().any(|e| e["method"] == method),
            "no {method} refused: {refused:#?}"
        );
    }

    // The control: the same browser, the user typing the service's address, gets through.
    let before = lab.upstream.request_count();
    let page = run_chromium(
        &lab.dir.path().join("control"),
        &format!("http://{target}/v1/items"),
    )
    .await?;
    assert!(
        page.dom.contains(r#""service":"fake-cloud-run""#)
            && page.dom.contains(r#""path":"/v1/items""#),
        "the service's answer is not on the page\n{}",
        page.details()
    );
    assert!(
        page.dom.contains(r#""sec-fetch-site":"none""#),
        "{}",
        page.details()
    );
    // Chromium may also ask the page's origin for `/favicon.ico`, a same-origin request
    // that is let through as well.
    let reached = lab.upstream.request_count() - before;
    assert!(
        (1..=2).contains(&reached),
        "{reached} requests reached the service\n{}",
        page.details()
    );
    assert_eq!(
        lab.audit_events("browser_request_refused").len(),
        refused.len(),
        "the typed navigation was refused\n{}",
        page.details()
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_redirect_to_the_services_own_url_keeps_a_real_browser_on_the_local_port_with_its_cookie()
-> anyhow::Result<()> {
    let (lab, agent) = started().await?;
    let local = format!(
        "http://localhost:{}",
        agent.local_addr("api").expect("api").port()
    );

    // `/redirect` answers `Location: http://127.0.0.1:UPSTREAM/landing?from=redirect` and
    // `Set-Cookie: sid=abc; Path=/; Domain=127.0.0.1; HttpOnly`.
    let page = run_chromium(
        &lab.dir.path().join("redirect"),
        &format!("{local}/redirect"),
    )
    .await?;

    assert_eq!(
        page.text_of("url"),
        format!("{local}/landing?from=redirect"),
        "the browser did not end on the local port\n{}",
        page.details()
    );
    assert_eq!(page.text_of("landed"), "landed", "{}", page.details());
    assert!(
        page.text_of("request").contains(r#""cookie":"sid=abc""#),
        "the cookie did not come back\n{}",
        page.details()
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_app_that_checks_origin_accepts_a_real_browsers_post_and_websocket() -> anyhow::Result<()>
{
    let (lab, agent) = started().await?;
    let local = format!(
        "http://localhost:{}",
        agent.local_addr("api").expect("api").port()
    );
    let hold = Site::start(String::new(), ("127.0.0.1", 0)).await?;

    let page = run_chromium(
        &lab.dir.path().join("app"),
        &format!("{local}/app?hold=http://{}", hold.addr),
    )
    .await?;

    assert!(
        page.dom.contains("<title>done</title>"),
        "the app page did not finish\n{}",
        page.details()
    );
    // The app saw its own origin: the gateway put the upstream's in place of the local one.
    assert_eq!(
        page.text_of("submit"),
        format!("200 accepted from {}", lab.upstream.url()),
        "{}",
        page.details()
    );
    assert_eq!(
        page.text_of("ws"),
        "message heard you",
        "{}",
        page.details()
    );

    // The app's check is real: what Chromium sent, were it passed on as it was, is refused.
    let upstream = lab.upstream.addr.to_string();
    let bearer = format!("Bearer {}", mint_id_token(API_AUDIENCE)?);
    let as_sent = [
        ("authorization", bearer.as_str()),
        ("origin", local.as_str()),
    ];
    let post = request(
        lab.upstream.addr,
        "POST",
        "/app/submit",
        &upstream,
        &as_sent,
    )
    .await?;
    assert_eq!(post.status, 403, "{:?}", post.body);
    let handshake = [
        ("upgrade", "websocket"),
        ("connection", "upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let ws = request(
        lab.upstream.addr,
        "GET",
        "/app/ws",
        &upstream,
        &[as_sent.as_slice(), &handshake].concat(),
    )
    .await?;
    assert_eq!(ws.status, 403, "{:?}", ws.body);
    agent.shutdown().await;
    Ok(())
}

/// The attacker's page. It writes what it saw into `#log`, sets the title to `done` once
/// every attempt has settled, and then tells its site, which releases the `/hold` image: the
/// page's load event (when `--dump-dom` prints) waits for the attacks, in real time.
/// `__TARGET__` is the agent's `host:port`.
const ATTACK_PAGE: &str = r#"<!doctype html>
<html><head><title>running</title></head><body>
<img src="/hold" alt="">
<pre id="log"></pre>
<iframe name="sink" id="sink"></iframe>
<form id="form" method="POST" action="http://__TARGET__/v1/items" target="sink"
      enctype="text/plain"><input name="a" value="b"></form>
<script>
const target = "http://__TARGET__";
const log = document.getElementById("log");
const note = (what) => { log.textContent += what + "\n"; };
async function attack() {
  try {
    const r = await fetch(target + "/v1/items", { mode: "no-cors", method: "POST", body: "x" });
    note("no-cors=" + r.type);
  } catch (e) { note("no-cors=failed " + e); }
  try {
    const r = await fetch(target + "/v1/items");
    note("cors=read " + r.status + " " + (await r.text()));
  } catch (e) { note("cors=failed " + e); }
  await new Promise((done) => {
    const ws = new WebSocket("ws://__TARGET__/ws");
    ws.onopen = () => { note("ws=open"); ws.close(); };
    ws.onclose = (e) => { note("ws=closed " + e.code); done(); };
  });
  await new Promise((done) => {
    const sink = document.getElementById("sink");
    sink.onload = () => { note("form=loaded"); done(); };
    document.getElementById("form").submit();
  });
  document.title = "done";
  await fetch("/finished");
}
attack();
</script></body></html>
"#;

/// A site of the test's own: serves `page` at `/`, and holds `/hold` until a page has asked
/// for `/finished`.
struct Site {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Site {
    async fn start(page: String, addr: (&str, u16)) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let page = Bytes::from(page);
        let (finished, _) = tokio::sync::watch::channel(false);
        let finished = Arc::new(finished);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let page = page.clone();
                let finished = finished.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let page = page.clone();
                    let finished = finished.clone();
                    async move {
                        let empty =
                            |status| Response::builder().status(status).body(Full::default());
                        match req.uri().path() {
                            "/" => Response::builder()
                                .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
                                .body(Full::new(page)),
                            "/hold" => {
                                // Ends with an error only when the site is stopped.
                                let _ = finished.subscribe().wait_for(|done| *done).await;
                                empty(204)
                            }
                            "/finished" => {
                                finished.send_replace(true);
                                empty(204)
                            }
                            _ => empty(404),
                        }
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one Chromium run left behind.
struct BrowserRun {
    /// The DOM after the page settled (`--dump-dom`).
    dom: String,
    /// Whether Chromium exited by itself within [`BROWSER_TIMEOUT`].
    finished: bool,
    status: std::process::ExitStatus,
    stderr: String,
}

impl BrowserRun {
    /// The text of the element with `id` (holding no other element), as the DOM shows it.
    fn text_of(&self, id: &str) -> &str {
        self.dom
            .split_once(&format!(" id=\"{id}\">"))
            .and_then(|(_, rest)| rest.split_once("</"))
            .map(|(text, _)| text)
            .unwrap_or_default()
    }

    /// Everything worth showing when an assertion fails.
    fn details(&self) -> String {
        format!(
            "chromium {} ({}); DOM:\n{}\nstderr:\n{}",
            self.status,
            if self.finished {
                "exited"
            } else {
                "killed after the timeout"
            },
            self.dom,
            self.stderr
        )
    }
}

/// Opens `url` in headless Chromium with a fresh profile under `dir` and returns the DOM it
/// printed when the page loaded (or after 15 s).
async fn run_chromium(dir: &Path, url: &str) -> anyhow::Result<BrowserRun> {
    let home = dir.join("home");
    std::fs::create_dir_all(&home)?;
    let stderr_path = dir.join("stderr.txt");
    let chromium = std::env::var_os("CHROMIUM").unwrap_or_else(|| "chromium".into());
    let mut child = std::process::Command::new(&chromium)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--no-proxy-server",
            // Loopback only: every other host name fails to resolve.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE 127.0.0.2, \
             EXCLUDE localhost",
            "--dump-dom",
            // Prints the DOM even if the page never finishes loading.
            "--timeout=15000",
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .arg(url)
        // Keep Chromium's files out of the real home.
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path)?)
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot start {} ({e}): this test drives a real browser; install Debian's \
                 chromium (scripts/lib/system-packages.sh does) or name the binary in CHROMIUM",
                chromium.to_string_lossy()
            )
        })?;
    // The end of stdout is the event: Chromium and its helpers have exited.
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("chromium's stdout was not captured"))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut dom = String::new();
        let read = stdout.read_to_string(&mut dom).map(|_| dom);
        let _ = tx.send(read);
    });
    let (dom, finished) = match tokio::time::timeout(BROWSER_TIMEOUT, rx).await {
        Ok(read) => (read??, true),
        Err(_) => {
            child.kill()?;
            (String::new(), false)
        }
    };
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    Ok(BrowserRun {
        dom,
        finished,
        status,
        stderr,
    })
}

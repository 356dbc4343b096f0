//! The `touchgate` binary as users run it.

use std::process::Command;

/// The installed CLI carries no demo (it runs on test fakes): it says which command does.
#[test]
fn demo_says_which_program_runs_it_and_exits_two() {
    let out = Command::new(env!("CARGO_BIN_EXE_touchgate"))
        .args(["demo", "--once", "--port", "0"])
        .output()
        .expect("run touchgate demo");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("run ./scripts/demo (or cargo run -p touchgate-demo)"),
        "{err}"
    );
}

#[test]
fn status_without_a_running_agent_says_not_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "gateway = \"127.0.0.1:4433\"\nuser = \"a@b\"\nauthenticator = \"soft:k\"\ngateway_cert_sha256 = \"{}\"\ncontrol_socket = \"{}\"\n",
            "0".repeat(64),
            dir.path().join("agent.sock").display()
        ),
    )
    .expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_touchgate"))
        .args(["status", "--config"])
        .arg(&cfg)
        .output()
        .expect("run touchgate status");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("not running"));
}

#[test]
fn a_bad_config_is_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "gateway = \"nowhere\"\nuser = \"a@b\"\n").expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_touchgate"))
        .args(["up", "--config"])
        .arg(&cfg)
        .output()
        .expect("run touchgate up");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must be host:port"), "{err}");
    assert!(err.contains("gateway_cert_sha256"), "{err}");
}

/// `touchgate enroll`, `up`, `status` and `config set-port` as a user runs them, against a
/// gateway on loopback with a software key.
#[tokio::test(flavor = "multi_thread")]
async fn up_serves_the_services_and_status_tells_what_it_does() {
    use std::io::BufRead;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut lab = touchgate_testkit::lab::Lab::start(Default::default())
        .await
        .expect("lab");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("agent.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    std::fs::write(
        &cfg,
        format!(
            "# my settings\ngateway = \"{}\"\nserver_name = \"localhost\"\ngateway_cert_sha256 = \"{}\"\nuser = \"bob@example.com\"\n\
             authenticator = \"soft:bob.softkey\"\ncontrol_socket = \"{}\"\n\n[[service]]\nname = \"api\"\nlocal_port = {port}\n",
            lab.quic_addr,
            lab.fingerprint,
            dir.path().join("agent.sock").display()
        ),
    )
    .expect("write config");
    let bin = env!("CARGO_BIN_EXE_touchgate");
    // The invite code comes on standard input, never on the command line.
    let out = enroll_with_stdin(
        bin,
        &cfg,
        &format!("{}\n", lab.invite("bob@example.com").expect("invite")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("warning"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("enrolled software key"));

    let mut up = Command::new(bin)
        .args(["up", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("up");
    let mut lines = std::io::BufReader::new(up.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("utf-8");
    assert_eq!(first, format!("service api on 127.0.0.1:{port}"));

    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.write_all(b"GET /from-the-cli HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("bob@example.com"), "{answer}");

    let status = Command::new(bin)
        .args(["status", "--config"])
        .arg(&cfg)
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert!(
        text.starts_with("Connected as bob@example.com — 0 h 59 min left")
            || text.starts_with("Connected as bob@example.com — 1 h 00 min left"),
        "{text}"
    );
    assert!(
        text.contains(&format!("service api on 127.0.0.1:{port}\n")),
        "{text}"
    );
    // It names the gateway address in use.
    assert!(
        text.contains(&format!("\ngateway {}\ntransport QUIC\n", lab.quic_addr)),
        "{text}"
    );

    // A port change goes to the user's file, comments kept.
    let set = Command::new(bin)
        .args(["config", "--config"])
        .arg(&cfg)
        .args(["set-port", "api", "0"])
        .output()
        .expect("config set-port");
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let file = std::fs::read_to_string(&cfg).expect("read config");
    assert!(
        file.starts_with("# my settings\n") && file.contains("local_port = 0"),
        "{file}"
    );

    // SIGTERM while the gateway has just gone away (the agent busy saying so) still stops it.
    let pid = up.id().to_string();
    let term = async {
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
    };
    tokio::join!(lab.stop_gateway(), term);
    let mut code = None;
    for _ in 0..100 {
        code = up.try_wait().expect("wait");
        if code.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let Some(code) = code else {
        let _ = up.kill();
        panic!("`touchgate up` did not stop within 10 s of SIGTERM");
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut up.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(code.success(), "{code}: {err}");
    assert!(err.contains("signed in as bob@example.com until"), "{err}");
    assert!(err.contains("closing tunnels…"), "{err}");
    assert!(
        !dir.path().join("agent.sock").exists(),
        "the status socket is removed"
    );
}

/// `touchgate enroll` with the code piped on standard input.
fn enroll_with_stdin(bin: &str, cfg: &std::path::Path, input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(bin)
        .args(["enroll", "--config"])
        .arg(cfg)
        .env_remove("TOUCHGATE_INVITE_CODE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("enroll");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write the code");
    child.wait_with_output().expect("enroll output")
}

/// A software-key agent config for `user` against `lab`.
fn lab_config(
    lab: &touchgate_testkit::lab::Lab,
    dir: &std::path::Path,
    user: &str,
) -> std::path::PathBuf {
    let cfg = dir.join(format!("{user}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "gateway = \"{}\"\nserver_name = \"localhost\"\ngateway_cert_sha256 = \"{}\"\nuser = \"{user}\"\nauthenticator = \"soft:{user}.softkey\"\ncontrol_socket = \"{}\"\n",
            lab.quic_addr,
            lab.fingerprint,
            dir.join(format!("{user}.sock")).display(),
        ),
    )
    .expect("write config");
    cfg
}

/// `user` enrolled on `lab`, with a config in `dir` serving `api`; the config's path.
fn enrolled(
    lab: &touchgate_testkit::lab::Lab,
    dir: &std::path::Path,
    user: &str,
) -> std::path::PathBuf {
    let bin = env!("CARGO_BIN_EXE_touchgate");
    let cfg = lab_config(lab, dir, user);
    let mut text = std::fs::read_to_string(&cfg).expect("read config");
    text.push_str("[[service]]\nname = \"api\"\nlocal_port = 0\n");
    std::fs::write(&cfg, text).expect("write config");
    let out = enroll_with_stdin(bin, &cfg, &lab.invite(user).expect("invite"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cfg
}

/// `touchgate delegate` with one touch: `api`, any method, as `label`, written to `grant`.
fn granted(cfg: &std::path::Path, grant: &std::path::Path, label: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_touchgate"))
        .args(["delegate", "--service", "api", "--name", label, "--out"])
        .arg(grant)
        .arg("--config")
        .arg(cfg)
        .output()
        .expect("delegate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `user` [`enrolled`], and `touchgate up` for them, signed in and serving (its first line
/// read; the rest of its stdout stays open).
fn enrolled_up(
    lab: &touchgate_testkit::lab::Lab,
    dir: &std::path::Path,
    user: &str,
) -> (
    std::path::PathBuf,
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
) {
    let bin = env!("CARGO_BIN_EXE_touchgate");
    let cfg = enrolled(lab, dir, user);
    let mut up = Command::new(bin)
        .args(["up", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("up");
    // The first line on stdout comes once it is signed in and serving.
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(up.stdout.take().expect("stdout")));
    let first = lines.next().expect("a line").expect("utf-8");
    assert!(first.starts_with("service api on 127.0.0.1:"), "{first}");
    (cfg, up, lines)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invite_code_on_the_command_line_works_with_a_warning_and_an_empty_one_is_explained() {
    let lab = touchgate_testkit::lab::Lab::start(Default::default())
        .await
        .expect("lab");
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_touchgate");
    let cfg = lab_config(&lab, dir.path(), "carol@example.com");
    let out = Command::new(bin)
        .args(["enroll", "--config"])
        .arg(&cfg)
        .args(["--code", &lab.invite("carol@example.com").expect("invite")])
        .output()
        .expect("enroll");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: other users of this machine can read a command line (in `ps`)"),
        "{err}"
    );
    assert!(err.contains("touchgate enroll < code.txt"), "{err}");

    let cfg = lab_config(&lab, dir.path(), "dave@example.com");
    let out = enroll_with_stdin(bin, &cfg, "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no invite code given"), "{err}");
}

/// An admin disables the user while `touchgate up` runs: it stops with the gateway's words and a
/// non-zero exit, instead of asking for a touch again.
#[tokio::test(flavor = "multi_thread")]
async fn up_stops_with_a_non_zero_exit_when_the_account_is_disabled() {
    let lab = touchgate_testkit::lab::Lab::start(Default::default())
        .await
        .expect("lab");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_cfg, mut up, _stdout) = enrolled_up(&lab, dir.path(), "erin@example.com");

    touchgate_gateway::store::Store::open(&lab.dir.path().join("gateway.db"))
        .expect("store")
        .set_disabled("erin@example.com", true)
        .expect("disable");
    let status = tokio::task::spawn_blocking(move || {
        let status = up.wait().expect("wait");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut up.stderr.take().expect("stderr"), &mut err)
            .expect("stderr");
        (status, err)
    });
    let (status, err) = tokio::time::timeout(std::time::Duration::from_secs(20), status)
        .await
        .expect("`touchgate up` did not stop within 20 s of the disable")
        .expect("join");
    assert_eq!(status.code(), Some(5), "{err}");
    assert!(
        err.contains("signed out: your account is disabled on this gateway; ask your admin"),
        "{err}"
    );
}

/// `touchgate delegate`, `run --delegation` and `up --delegation` as a user and a script run
/// them: one touch makes the grant file (0600); `run` exports the service's URL to the command,
/// passes its exit status on and leaves no tunnel behind; `up` prints the ports and stops with
/// exit 6 when the user revokes the grant with `touchgate delegations revoke`.
#[tokio::test(flavor = "multi_thread")]
async fn a_grant_is_made_with_one_touch_and_used_by_run_and_up() {
    use std::io::BufRead;
    let lab = touchgate_testkit::lab::Lab::start(Default::default())
        .await
        .expect("lab");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = lab_config(&lab, dir.path(), "dana@example.com");
    let bin = env!("CARGO_BIN_EXE_touchgate");
    let out = enroll_with_stdin(
        bin,
        &cfg,
        &format!("{}\n", lab.invite("dana@example.com").expect("invite")),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let grant = dir.path().join("bot.grant");
    let out = Command::new(bin)
        .args([
            "delegate",
            "--service",
            "api",
            "--methods",
            "GET",
            "--ttl",
            "10m",
        ])
        .args(["--name", "nightly-report", "--out"])
        .arg(&grant)
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("delegate");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.starts_with("granted \"nightly-report\" (dlg-"),
        "{said}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&grant)
            .expect("grant file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // `run`: the command sees the URL, reaches the service through it, and its status is ours.
    let script = "curl -sf \"$TOUCHGATE_API_URL/v1/report\" -o /dev/null -w '%{http_code}' \
                  && curl -s -X POST \"$TOUCHGATE_API_URL/v1/report\" -o /dev/null -w ' %{http_code}'; \
                  echo \" $TOUCHGATE_API_URL\"; exit 7";
    let out = Command::new(bin)
        .args(["run", "--delegation"])
        .arg(&grant)
        .args(["--", "sh", "-c", script])
        .output()
        .expect("run");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut parts = said.split_whitespace();
    assert_eq!(parts.next(), Some("200"), "{said}");
    assert_eq!(parts.next(), Some("403"), "{said}");
    let url = parts.next().expect("the URL");
    assert!(url.starts_with("http://127.0.0.1:"), "{said}");
    // The tunnels ended with the command: nothing listens on its port any more.
    let addr = url.trim_start_matches("http://");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "{addr} still open"
    );

    // `up`: the port as asked, until the user revokes the grant.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut up = Command::new(bin)
        .args(["up", "--delegation"])
        .arg(&grant)
        .args(["--port", &format!("api={port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("up");
    let mut lines = std::io::BufReader::new(up.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("utf-8");
    assert_eq!(first, format!("service api on 127.0.0.1:{port}"));
    let out = Command::new(bin)
        .args(["delegations", "revoke", "nightly-report", "--config"])
        .arg(&cfg)
        .output()
        .expect("revoke");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            if let Some(s) = up.try_wait().expect("wait") {
                return s.code();
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("up stopped");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut up.stderr.take().expect("stderr"), &mut err).expect("read");
    assert_eq!(code, Some(6), "{err}");
    assert!(err.contains("the grant ended"), "{err}");
    assert!(err.contains("revoked"), "{err}");

    // The list shows it revoked.
    let out = Command::new(bin)
        .args(["delegations", "--config"])
        .arg(&cfg)
        .output()
        .expect("list");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("\"nightly-report\"") && said.contains("revoked"),
        "{said}"
    );
}

/// With the user's `touchgate up` running, `touchgate delegations` lists and revokes through
/// its status socket on the live session: no touch, no new challenge. A grant the gateway does
/// not know is an error in its words, not a second try with a touch.
#[tokio::test(flavor = "multi_thread")]
async fn delegations_ask_the_running_agent_without_a_touch() {
    let lab = touchgate_testkit::lab::Lab::start(Default::default())
        .await
        .expect("lab");
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_touchgate");
    let (cfg, mut up, _stdout) = enrolled_up(&lab, dir.path(), "fay@example.com");
    granted(&cfg, &dir.path().join("bot.grant"), "weekly-export");
    let asked = lab.audit_events("challenge_issued").len();

    let delegations = |args: &[&str]| {
        Command::new(bin)
            .arg("delegations")
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .expect("delegations")
    };
    let out = delegations(&[]);
    let (said, err) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "{err}");
    assert!(
        said.contains("\"weekly-export\"") && said.contains("never used"),
        "{said}"
    );
    assert!(!err.contains("touch"), "asked for a touch: {err}");

    let out = delegations(&["revoke", "no-such-grant"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success());
    assert!(!err.contains("touch your security key"), "{err}");
    assert!(
        err.contains("you have no live grant with the id or label"),
        "{err}"
    );

    let out = delegations(&["revoke", "weekly-export"]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.starts_with("revoked dlg-"), "{said}");
    assert_eq!(
        lab.audit_events("challenge_issued").len(),
        asked,
        "no sign-in: the running agent's session did it"
    );
    assert_eq!(lab.audit_events("delegation_revoked").len(), 1);
    let _ = up.kill();
    let _ = up.wait();
}

/// A grant revoked while `touchgate run` runs its command: the ports close at once (the
/// command's next connection is refused, not held), it is told why, and its exit status is
/// still the command's.
#[tokio::test(flavor = "multi_thread")]
async fn run_closes_the_ports_when_the_grant_ends() {
    let lab = touchgate_testkit::lab::Lab::start(Default::default())
        .await
        .expect("lab");
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_touchgate");
    let cfg = enrolled(&lab, dir.path(), "gus@example.com");
    let grant = dir.path().join("bot.grant");
    granted(&cfg, &grant, "nightly");

    let (ready, go) = (dir.path().join("ready"), dir.path().join("go"));
    let script = format!(
        "curl -sf \"$TOUCHGATE_API_URL/v1/a\" -o /dev/null -w '%{{http_code}}'; touch {ready}; \
         while [ ! -f {go} ]; do sleep 0.1; done; \
         curl -s --max-time 5 \"$TOUCHGATE_API_URL/v1/b\" -o /dev/null; echo \" $?\"; exit 3",
        ready = ready.display(),
        go = go.display()
    );
    let run = Command::new(bin)
        .args(["run", "--delegation"])
        .arg(&grant)
        .args(["--", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    for _ in 0..200 {
        if ready.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(ready.exists(), "the command's first request did not end");
    let out = Command::new(bin)
        .args(["delegations", "revoke", "nightly", "--config"])
        .arg(&cfg)
        .output()
        .expect("revoke");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The gateway closes the delegate's connection within seconds; then the command goes on.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    std::fs::write(&go, "").expect("go");
    let out = tokio::task::spawn_blocking(move || run.wait_with_output().expect("wait"))
        .await
        .expect("join");
    let (said, err) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert_eq!(out.status.code(), Some(3), "{said}{err}");
    // 200 before; then curl's 7: connection refused (a held connection would be 28, timed out).
    assert_eq!(said.trim(), "200 7", "{err}");
    assert!(
        err.contains("the grant ended:") && err.contains("revoked"),
        "{err}"
    );
}

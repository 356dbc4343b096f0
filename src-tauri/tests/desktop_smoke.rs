//! The real `touchgate-desktop` under Xvfb, with a D-Bus session and a tray host (trayer),
//! against a local gateway with a software key: it signs in at launch, a request through its
//! service port reaches the Cloud-Run-like upstream, and screenshots of the window and the
//! tray are saved (`target/screenshots/`, or `TOUCHGATE_SCREENSHOTS`). SIGTERM closes the
//! tunnel cleanly and exits 0.
//!
//! Needs `Xvfb`, `dbus-daemon`, `trayer`, `xwininfo` and ImageMagick's `import` (the test
//! command installs them); without them the test fails and names what is missing.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";

/// Child processes killed when the test ends, however it ends.
struct Procs(Vec<(&'static str, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in self.0.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn need(tools: &[&str]) {
    let missing: Vec<_> = tools
        .iter()
        .filter(|t| {
            !std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
                .unwrap_or(false)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the desktop smoke test needs {missing:?} (Debian: xvfb dbus-x11 trayer x11-utils xdotool imagemagick); ./scripts/test installs them when run as root"
    );
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts Xvfb on a free display; returns the display name.
fn xvfb(procs: &mut Procs) -> String {
    let n = (90..190)
        .find(|n| {
            !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
                && !Path::new(&format!("/tmp/.X{n}-lock")).exists()
        })
        .expect("a free X display number");
    let display = format!(":{n}");
    let child = Command::new("Xvfb")
        .args([&display, "-screen", "0", "1024x768x24", "-nolisten", "tcp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start Xvfb");
    procs.0.push(("Xvfb", child));
    wait_until("Xvfb", Duration::from_secs(10), || {
        Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
    });
    display
}

/// Starts a D-Bus session bus; returns its address.
fn dbus(procs: &mut Procs) -> String {
    let mut child = Command::new("dbus-daemon")
        .args(["--session", "--nofork", "--print-address=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dbus-daemon");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the bus address");
    procs.0.push(("dbus-daemon", child));
    line.trim().to_owned()
}

fn window_id(display: &str, name: &str) -> Option<String> {
    let out = Command::new("xwininfo")
        .args(["-display", display, "-name", name])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.split("Window id: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_owned)
}

fn screenshot(display: &str, window: &str, to: &Path) {
    let status = Command::new("import")
        .args([
            "-display",
            display,
            "-window",
            window,
            &to.display().to_string(),
        ])
        .status()
        .expect("run import");
    assert!(status.success(), "import {window} → {}", to.display());
    let png = std::fs::read(to).expect("read the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 200,
        "{} is not a real PNG",
        to.display()
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn screenshots_dir() -> PathBuf {
    std::env::var_os("TOUCHGATE_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tray_app_signs_in_and_serves_a_request() -> anyhow::Result<()> {
    need(&[
        "Xvfb",
        "dbus-daemon",
        "trayer",
        "xwininfo",
        "xdotool",
        "import",
    ]);
    let lab = Lab::start(LabOptions::default()).await?;
    let home = tempfile::tempdir()?;
    let key = home.path().join("alice.softkey");
    let port = free_port();
    let config = home.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "gateway = \"{}\"\nserver_name = \"localhost\"\ngateway_cert_sha256 = \"{}\"\nuser = \"{ALICE}\"\n\
             authenticator = \"soft:{}\"\nsign_in_on_launch = true\nautostart = true\ncontrol_socket = \"{}\"\n\n[[service]]\nname = \"api\"\nlocal_port = {port}\n",
            lab.quic_addr,
            lab.fingerprint,
            key.display(),
            home.path().join("agent.sock").display()
        ),
    )?;
    let cfg = touchgate_agent::AgentConfig::load(&config)?;
    let authn = touchgate_e2e::soft_authn(&key)?;
    touchgate_agent::enroll(&cfg, &authn, &lab.invite(ALICE)?).await?;

    let mut procs = Procs(Vec::new());
    let display = xvfb(&mut procs);
    let bus = dbus(&mut procs);
    let env = |c: &mut Command| {
        c.env("DISPLAY", &display)
            .env("DBUS_SESSION_BUS_ADDRESS", &bus)
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", home.path().join("config"))
            .env("XDG_DATA_HOME", home.path().join("data"))
            .env("XDG_CACHE_HOME", home.path().join("cache"))
            .env("XDG_RUNTIME_DIR", home.path())
            .env_remove("XDG_CURRENT_DESKTOP")
            .env_remove("WAYLAND_DISPLAY");
    };
    let mut tray_host = Command::new("trayer");
    tray_host
        .args([
            "--edge",
            "top",
            "--align",
            "right",
            "--widthtype",
            "request",
            "--height",
            "32",
            "--transparent",
            "false",
            "--SetDockType",
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    env(&mut tray_host);
    procs.0.push(("trayer", tray_host.spawn()?));
    wait_until("trayer's window", Duration::from_secs(10), || {
        window_id(&display, "panel").is_some()
    });

    let mut app = Command::new(env!("CARGO_BIN_EXE_touchgate-desktop"));
    app.env("TOUCHGATE_CONFIG", &config)
        .env("TOUCHGATE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    env(&mut app);
    let mut child = app.spawn()?;
    let stderr = child.stderr.take().expect("stderr");
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(mut l) = sink.lock() {
                l.push_str(&line);
                l.push('\n');
            }
        }
    });
    procs.0.push(("touchgate-desktop", child));
    let log_text = || log.lock().map(|l| l.clone()).unwrap_or_default();

    // Signed in at launch: the service port answers through the tunnel.
    let mut answer = None;
    let end = Instant::now() + Duration::from_secs(60);
    while answer.is_none() {
        assert!(
            Instant::now() < end,
            "no answer on 127.0.0.1:{port}; app log:\n{}",
            log_text()
        );
        if let Ok(a) =
            touchgate_e2e::get(([127, 0, 0, 1], port).into(), "/from-the-tray-app", &[]).await
        {
            answer = Some(a);
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let answer = answer.expect("answer");
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let seen = answer.json()?;
    assert_eq!(seen["headers"]["x-touchgate-user"], ALICE);
    assert_eq!(seen["path"], "/from-the-tray-app");

    // `touchgate status` and `touchgate delegations` ask the tray app as they ask `up`.
    let socket = home.path().join("agent.sock");
    let report = touchgate_agent::status::query(&socket)
        .await?
        .expect("the tray app answers on its status socket");
    assert!(
        report
            .view
            .summary
            .starts_with("Connected as alice@example.com"),
        "{}",
        report.view.summary
    );
    let listed = touchgate_agent::status::command(
        &socket,
        &touchgate_agent::status::Command::ListDelegations,
        |_| Ok(()),
    )
    .await?;
    assert_eq!(
        listed,
        Some(touchgate_agent::status::Answer::Delegations { grants: Vec::new() })
    );

    // The window shows the signed-in state; the tray shows its icon in trayer.
    let dir = screenshots_dir();
    std::fs::create_dir_all(&dir)?;
    wait_until("the touchgate window", Duration::from_secs(20), || {
        window_id(&display, "touchgate").is_some()
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let window = window_id(&display, "touchgate").expect("window");
    screenshot(&display, &window, &dir.join("desktop-window.png"));
    let panel = window_id(&display, "panel").expect("panel");
    screenshot(&display, &panel, &dir.join("desktop-tray.png"));
    screenshot(&display, "root", &dir.join("desktop-screen.png"));

    // A click on the tray icon opens its menu (a new top-level popup window).
    let windows = || {
        Command::new("xwininfo")
            .args(["-display", &display, "-root", "-children"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0)
    };
    let before = windows();
    let geometry = Command::new("xdotool")
        .env("DISPLAY", &display)
        .args([
            "search",
            "--name",
            "^panel$",
            "getwindowgeometry",
            "--shell",
        ])
        .output()?;
    let geo = String::from_utf8_lossy(&geometry.stdout).to_string();
    let field = |k: &str| -> i64 {
        geo.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let (x, y) = (
        field("X") + field("WIDTH") / 2,
        field("Y") + field("HEIGHT") / 2,
    );
    Command::new("xdotool")
        .env("DISPLAY", &display)
        .args(["mousemove", &x.to_string(), &y.to_string(), "click", "1"])
        .status()?;
    wait_until("the tray menu", Duration::from_secs(10), || {
        windows() > before
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    screenshot(&display, "root", &dir.join("desktop-menu.png"));
    Command::new("xdotool")
        .env("DISPLAY", &display)
        .args(["key", "Escape"])
        .status()?;

    // A second launch hands over to the first (which shows its window) and exits at once.
    let mut second = Command::new(env!("CARGO_BIN_EXE_touchgate-desktop"));
    second
        .env("TOUCHGATE_CONFIG", &config)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    env(&mut second);
    let mut second = second.spawn()?;
    let end = Instant::now() + Duration::from_secs(20);
    let second_status = loop {
        if let Some(s) = second.try_wait()? {
            break s;
        }
        assert!(
            Instant::now() < end,
            "a second launch did not hand over to the first"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(second_status.success(), "second launch: {second_status}");
    assert_eq!(
        touchgate_e2e::get(([127, 0, 0, 1], port).into(), "/still-one-app", &[])
            .await?
            .status,
        200
    );

    // Autostart (on in the config) is a login entry that starts in the tray only; the log is in
    // the platform data folder.
    let entry = std::fs::read_to_string(home.path().join(".config/autostart/touchgate.desktop"))
        .map_err(|e| anyhow::anyhow!("autostart entry: {e}; log:\n{}", log_text()))?;
    assert!(entry.contains("--minimized"), "{entry}");
    let file_log = std::fs::read_to_string(home.path().join("data/touchgate/logs/desktop.log"))?;
    assert!(file_log.contains("touchgate-desktop started"), "{file_log}");

    // SIGTERM: tunnels closed, exit 0.
    let (_, mut child) = procs.0.pop().expect("the app is the last process");
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status()?;
    let end = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        assert!(
            Instant::now() < end,
            "the app did not exit after SIGTERM; log:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        log_text()
    );
    assert!(
        log_text().contains("tunnels closed; quitting"),
        "{}",
        log_text()
    );
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "the service port is closed after quitting"
    );
    Ok(())
}

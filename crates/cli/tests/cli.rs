//! The `touchgate` binary as users run it.

use std::process::Command;

#[test]
fn demo_once_makes_a_real_request_through_the_tunnel_and_exits_zero() {
    let out = Command::new(env!("CARGO_BIN_EXE_touchgate"))
        .args(["demo", "--once", "--port", "0"])
        .output()
        .expect("run touchgate demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("request through the tunnel: HTTP 200"),
        "{stdout}"
    );
    assert!(
        stdout.contains("a direct call without a token gets: HTTP 401"),
        "{stdout}"
    );
    assert!(
        stdout.contains("upstream saw user      demo@touchgate.dev"),
        "{stdout}"
    );
    assert!(stdout.contains("curl -s http://127.0.0.1:"), "{stdout}");
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

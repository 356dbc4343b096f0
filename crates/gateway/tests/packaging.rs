//! The gateway's deployment files in `packaging/` work as shipped: the systemd unit passes
//! `systemd-analyze verify` and keeps its hardening, and the example production config passes
//! `touchgate-gateway check` once its folders and certificate exist.

use std::{path::Path, process::Command};

fn packaging(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../packaging")
        .join(file)
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit =
        std::fs::read_to_string(packaging("systemd/touchgate-gateway.service")).expect("unit");
    for want in [
        "User=touchgate",
        "ExecStartPre=/usr/bin/touchgate-gateway check --config /etc/touchgate/gateway.toml",
        "StateDirectory=touchgate-gateway",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=\n",
        "MemoryDenyWriteExecute=yes",
        "SystemCallFilter=@system-service",
    ] {
        assert!(unit.contains(want), "the unit lost {want:?}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("touchgate-gateway.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/bin/touchgate-gateway",
            env!("CARGO_BIN_EXE_touchgate-gateway"),
        ),
    )
    .expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(
        !said.contains("touchgate-gateway.service"),
        "systemd-analyze has remarks on the unit:\n{said}"
    );
}

#[test]
fn the_production_example_passes_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(packaging("systemd/gateway.toml")).expect("config");
    assert!(text.contains("allow_software = false"));
    let state = dir.path().join("state");
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&state).expect("state");
    std::fs::create_dir_all(&logs).expect("logs");
    let text = text
        .replace("/var/lib/touchgate-gateway", &state.display().to_string())
        .replace("/var/log/touchgate-gateway", &logs.display().to_string());
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(&cfg, text).expect("write");
    let bin = env!("CARGO_BIN_EXE_touchgate-gateway");
    let gen_cert = Command::new(bin)
        .args(["gen-cert", "--name", "gw.example.com", "--out"])
        .arg(dir.path())
        .output()
        .expect("gen-cert");
    assert!(gen_cert.status.success());
    let out = Command::new(bin)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("check");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains(": OK (1 service, rp_id gw.example.com"),
        "{said}"
    );
    assert!(
        !said.contains("warning:"),
        "the production example weakens a default:\n{said}"
    );
}

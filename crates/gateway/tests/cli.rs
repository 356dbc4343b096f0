//! The `touchgate-gateway` binary as admins run it.

use std::process::Command;

fn gateway() -> Command {
    Command::new(env!("CARGO_BIN_EXE_touchgate-gateway"))
}

/// A gateway config with only what `invite` and `revoke` need.
fn minimal_config(dir: &std::path::Path) -> std::path::PathBuf {
    let cfg = dir.join("gateway.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\nrp_id = \"localhost\"\ndatabase = \"gw.db\"\naudit_log = \"audit.jsonl\"\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n",
    )
    .expect("write config");
    cfg
}

fn last_line(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn gen_cert_writes_files_and_prints_the_fingerprint_last() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = gateway()
        .args(["gen-cert", "--name", "gw.example.com", "--out"])
        .arg(dir.path())
        .output()
        .expect("run gen-cert");
    assert!(out.status.success());
    let fp = last_line(&out);
    assert_eq!(fp.len(), 64);
    assert!(fp.chars().all(|c| c.is_ascii_hexdigit()));
    let certs = touchgate_gateway::tls::load_certs(&dir.path().join("cert.pem")).expect("cert");
    assert_eq!(touchgate_gateway::tls::fingerprint(&certs[0]), fp);
}

#[test]
fn invite_prints_a_code_that_is_stored_only_hashed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = minimal_config(dir.path());
    let out = gateway()
        .args(["invite", "alice@corp", "--config"])
        .arg(&cfg)
        .output()
        .expect("run invite");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code = last_line(&out);
    assert!(code.len() >= 32, "{code}");
    let store = touchgate_gateway::store::Store::open(&dir.path().join("gw.db")).expect("db");
    assert_eq!(store.check_invite("alice@corp", &code).expect("db"), Ok(()));
    let db = std::fs::read(dir.path().join("gw.db")).expect("read db");
    assert!(!db.windows(code.len()).any(|w| w == code.as_bytes()));
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).expect("audit");
    assert!(audit.contains("\"invite_created\""));
    assert!(
        !audit.contains(&code),
        "the audit log must not hold the code"
    );
}

#[test]
fn invalid_config_lists_every_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\nrp_id = \"localhost\"\norigin = \"https://evil.test\"\ndatabase = \"gw.db\"\n[tls]\ncert = \"c\"\nkey = \"k\"\n[[service]]\nname = \"db\"\nkind = \"tcp\"\nupstream = \"nope\"\n",
    )
    .expect("write config");
    let out = gateway()
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .expect("run serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not host:port") && err.contains("origin"),
        "{err}"
    );
}

#[test]
fn revoke_bumps_the_users_epoch_and_refuses_unknown_users() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = minimal_config(dir.path());
    let out = gateway()
        .args(["revoke", "nobody@corp", "--config"])
        .arg(&cfg)
        .output()
        .expect("run revoke");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no user \"nobody@corp\""));
    let invite = gateway()
        .args(["invite", "alice@corp", "--config"])
        .arg(&cfg)
        .output()
        .expect("invite");
    assert!(invite.status.success());
    let out = gateway()
        .args(["revoke", "alice@corp", "--config"])
        .arg(&cfg)
        .output()
        .expect("run revoke");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = touchgate_gateway::store::Store::open(&dir.path().join("gw.db")).expect("db");
    assert_eq!(store.epochs().expect("epochs")["alice@corp"], 1);
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).expect("audit");
    assert!(audit.contains("\"user_revoked\""));
}

#[test]
fn check_prints_every_problem_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        "listen = \"0.0.0.0:4433\"\nadmin_listen = \"0.0.0.0:9090\"\nrp_id = \"gw.example.com\"\norigin = \"https://evil.example.net\"\n\
         database = \"state/gw.db\"\n[tls]\ncert = \"missing-cert.pem\"\nkey = \"missing-key.pem\"\n\
         [attestation]\nallow_software = true\n\
         [[service]]\nname = \"api\"\nkind = \"http\"\nupstream = \"ftp://api\"\n[[service]]\nname = \"api\"\nkind = \"http\"\nupstream = \"https://api-xyz.a.run.app\"\n",
    )
    .expect("write config");
    let out = gateway()
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("run check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for want in [
        "problem: service \"api\" is defined twice",
        "problem: service \"api\": upstream \"ftp://api\" is not an http(s) URL",
        "problem: origin \"https://evil.example.net\" must be a URL whose host is rp_id",
        "problem: tls.cert: ",
        "problem: tls.key: ",
        "does not exist",
        "warning: attestation.allow_software = true",
        "warning: admin_listen 0.0.0.0:9090 is not on loopback",
        ": 6 problems",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    // Fixed, it passes and says what it found.
    let out = gateway()
        .args(["gen-cert", "--name", "gw.example.com", "--out"])
        .arg(dir.path())
        .output()
        .expect("gen-cert");
    assert!(out.status.success());
    std::fs::write(
        &cfg,
        "listen = \"0.0.0.0:4433\"\nrp_id = \"gw.example.com\"\ndatabase = \"gw.db\"\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
         [[service]]\nname = \"api\"\nkind = \"http\"\nupstream = \"https://api-xyz.a.run.app\"\n",
    )
    .expect("write config");
    let out = gateway()
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("run check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.trim_end()
            .ends_with(": OK (1 service, rp_id gw.example.com, QUIC on 0.0.0.0:4433)"),
        "{text}"
    );

    // Not TOML of the right shape: the parse error, and exit 1.
    std::fs::write(&cfg, "listen = 4433\n").expect("write config");
    let out = gateway()
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("run check");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("problem: gateway config"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

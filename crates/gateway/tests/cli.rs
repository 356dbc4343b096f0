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

/// A PostgreSQL URL in `database` (or `--database`) is refused in words, and no file named
/// `postgres:` appears beside the config.
#[test]
fn a_database_url_is_not_taken_for_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = minimal_config(dir.path());
    let text = std::fs::read_to_string(&cfg).expect("config");
    // Nothing listens on port 1.
    let url = "postgres://gw:hunter2@127.0.0.1:1/touchgate";
    let line = text
        .lines()
        .find(|l| l.starts_with("database"))
        .expect("a database line")
        .to_owned();
    std::fs::write(&cfg, text.replace(&line, &format!("database = \"{url}\""))).expect("write");
    let out = gateway()
        .arg("check")
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("check");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("the gateway cannot reach its database"),
        "{said}"
    );
    assert!(
        !said.contains("hunter2"),
        "the password stays out of messages: {said}"
    );
    std::fs::write(&cfg, text).expect("write");
    let out = gateway()
        .args(["serve", "--database", url, "--config"])
        .arg(&cfg)
        .output()
        .expect("serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the gateway cannot reach its database"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    assert!(!dir.path().join("postgres:").exists());
    let out = gateway()
        .args(["serve", "--database", "mysql://db/x", "--config"])
        .arg(&cfg)
        .output()
        .expect("serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a mysql:// URL; give a SQLite file's path or a postgres:// URL"),
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
         [[service]]\nname = \"api\"\nkind = \"http\"\nupstream = \"ftp://api\"\n[[service]]\nname = \"api\"\nkind = \"http\"\nupstream = \"https://api-xyz.a.run.app\"\nupstream_ca = \"missing-ca.pem\"\n",
    )
    .expect("write config");
    let (out, text) = run_check(&cfg);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for want in [
        "problem: service \"api\" is defined twice",
        "problem: service \"api\": upstream \"ftp://api\" is not an http(s) URL",
        "problem: origin \"https://evil.example.net\" must be a URL whose host is rp_id",
        "problem: tls.cert: ",
        "problem: tls.key: ",
        "does not exist",
        "problem: service api upstream_ca: ",
        "warning: attestation.allow_software = true",
        "warning: admin_listen 0.0.0.0:9090 is not on loopback",
        ": 7 problems",
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
    let (out, text) = run_check(&cfg);
    assert!(out.status.success(), "{text}");
    assert!(
        text.trim_end()
            .ends_with(": OK (1 service, rp_id gw.example.com, QUIC on 0.0.0.0:4433)"),
        "{text}"
    );
    // The database, without making it: not there yet; then, once a command made it, its
    // versions; and a file made by a newer gateway is a problem.
    assert!(text.contains("gw.db: not created yet"), "{text}");
    assert!(
        !dir.path().join("gw.db").exists(),
        "check made the database"
    );
    let made = gateway()
        .args(["users", "--config"])
        .arg(&cfg)
        .output()
        .expect("users");
    assert!(made.status.success());
    let (out, text) = run_check(&cfg);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("gw.db: SQLite 3."), "{text}");
    assert!(text.contains("(current)"), "{text}");
    let db = rusqlite_version_bump(&dir.path().join("gw.db"));
    let (out, text) = run_check(&cfg);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("schema version {db} was made by a newer gateway")),
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

// ---- users, disable, enable, remove, remove-key ----

use touchgate_gateway::store::{Store, StoredCredential};

/// An authenticator model the test config's trust list names.
const NAMED_AAGUID: &str = "cb69481e-8ff7-4039-93ec-0a2729a154a8";

/// [`minimal_config`] plus a trust list that names [`NAMED_AAGUID`].
fn config_with_trust_list(dir: &std::path::Path) -> std::path::PathBuf {
    let cfg = minimal_config(dir);
    let mut text = std::fs::read_to_string(&cfg).expect("read config");
    text.push_str(&format!(
        "[[attestation.trusted]]\nca = \"yubico.pem\"\naaguids = [\"{NAMED_AAGUID}\"]\ndescription = \"YubiKey 5\"\n"
    ));
    std::fs::write(&cfg, text).expect("write config");
    cfg
}

/// Runs `touchgate-gateway ARGS --config CFG`.
fn admin(cfg: &std::path::Path, args: &[&str]) -> std::process::Output {
    gateway()
        .args(args)
        .arg("--config")
        .arg(cfg)
        .output()
        .expect("run touchgate-gateway")
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Invites `user` with the CLI and enrols one credential per id through the store, as a
/// sign-in would leave it.
fn enrol(cfg: &std::path::Path, user: &str, keys: &[(&str, &str)]) {
    let db = cfg.with_file_name("gw.db");
    for (cred_id, aaguid) in keys {
        let out = admin(cfg, &["invite", user]);
        assert!(out.status.success(), "{}", stderr(&out));
        let store = Store::open(&db).expect("db");
        let cred = StoredCredential {
            cred_id: (*cred_id).to_owned(),
            user: user.to_owned(),
            key_json: "{}".into(),
            aaguid: (*aaguid).to_owned(),
        };
        store
            .enrol(&last_line(&out), &cred)
            .expect("db")
            .expect("enrolled");
    }
}

fn audit_events(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

fn last_event(dir: &std::path::Path) -> serde_json::Value {
    audit_events(dir).pop().expect("an audit line")
}

#[test]
fn users_lists_every_user_with_keys_models_sign_ins_and_open_invites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config_with_trust_list(dir.path());
    let software = touchgate_gateway::rp::SOFTWARE_AAGUID.to_string();
    enrol(
        &cfg,
        "alice@corp",
        &[
            ("yubiYUBIyubi-1", NAMED_AAGUID),
            ("softSOFTsoft-2", &software),
        ],
    );
    Store::open(&dir.path().join("gw.db"))
        .expect("db")
        // 2026-12-05 16:20:00 UTC.
        .record_sign_in("alice@corp", "yubiYUBIyubi-1", 1_796_487_600)
        .expect("sign-in");
    assert!(admin(&cfg, &["invite", "bob@corp"]).status.success());
    assert!(admin(&cfg, &["disable", "bob@corp"]).status.success());

    let out = admin(&cfg, &["users"]);

    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(lines[0].starts_with("USER"), "{text}");
    assert!(
        lines[1].starts_with("alice@corp  active    2026-12-05 16:20Z  -"),
        "{text}"
    );
    assert!(lines[1].contains("  yubiYUBI  "), "{text}");
    assert!(
        lines[1].ends_with(&format!("YubiKey 5 ({NAMED_AAGUID})")),
        "{text}"
    );
    assert!(lines[2].contains("  softSOFT  "), "{text}");
    assert!(lines[2].contains("never"), "{text}");
    assert!(
        lines[2].ends_with(&format!("software key ({software})")),
        "{text}"
    );
    assert!(
        lines[3].starts_with("bob@corp    disabled  never"),
        "{text}"
    );
    assert!(lines[3].contains("until "), "bob's invite is open: {text}");
    assert_eq!(lines[4], "2 users: 1 active, 1 disabled");

    let out = admin(&cfg, &["users", "--json"]);

    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v[0]["user"], "alice@corp");
    assert_eq!(v[0]["last_sign_in"], 1_796_487_600u64);
    assert_eq!(v[0]["keys"][0]["credential_id"], "yubiYUBIyubi-1");
    assert_eq!(v[0]["keys"][0]["model"], "YubiKey 5");
    assert_eq!(v[0]["keys"][0]["last_used"], 1_796_487_600u64);
    assert_eq!(v[0]["keys"][1]["model"], "software key");
    assert_eq!(v[1]["state"], "disabled");
    assert_eq!(v[1]["open_invites"].as_array().map(Vec::len), Some(1));
}

#[test]
fn disable_ends_sessions_and_refuses_invites_until_enable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = minimal_config(dir.path());
    let invite = admin(&cfg, &["invite", "alice@corp"]);
    assert!(invite.status.success());
    let code = last_line(&invite);

    let out = admin(&cfg, &["disable", "alice@corp"]);

    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("end their sessions within 1s"), "{text}");
    assert!(
        text.contains("refused until `touchgate-gateway enable alice@corp`"),
        "{text}"
    );
    assert_eq!(last_event(dir.path())["event"], "user_disabled");
    assert_eq!(last_event(dir.path())["user"], "alice@corp");
    {
        let store = Store::open(&dir.path().join("gw.db")).expect("db");
        assert!(store.is_disabled("alice@corp").expect("db"));
        assert_eq!(store.epochs().expect("epochs")["alice@corp"], 1);
        assert!(
            store
                .check_invite("alice@corp", &code)
                .expect("db")
                .is_err()
        );
    }
    let again = admin(&cfg, &["invite", "alice@corp"]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("alice@corp is disabled on this gateway: run `touchgate-gateway enable alice@corp` first"),
        "{}",
        stderr(&again)
    );

    let out = admin(&cfg, &["enable", "alice@corp"]);

    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("enabled alice@corp: they have no key"));
    assert_eq!(last_event(dir.path())["event"], "user_enabled");
    let store = Store::open(&dir.path().join("gw.db")).expect("db");
    assert!(!store.is_disabled("alice@corp").expect("db"));
    assert_eq!(store.check_invite("alice@corp", &code).expect("db"), Ok(()));
}

#[test]
fn remove_deletes_keys_and_invites_and_says_the_user_must_enrol_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = minimal_config(dir.path());
    enrol(&cfg, "alice@corp", &[("AAAAAAAAAA", NAMED_AAGUID)]);
    assert!(admin(&cfg, &["invite", "alice@corp"]).status.success());

    let out = admin(&cfg, &["remove", "alice@corp"]);

    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("removed alice@corp: deleted 1 key and 2 invites"),
        "{text}"
    );
    assert!(text.contains("they must enrol again"), "{text}");
    let event = last_event(dir.path());
    assert_eq!(event["event"], "user_removed");
    assert_eq!(event["user"], "alice@corp");
    let store = Store::open(&dir.path().join("gw.db")).expect("db");
    assert!(store.credentials("alice@corp").expect("creds").is_empty());
    assert_eq!(store.epochs().expect("epochs")["alice@corp"], 1);
    let list = store.list_users().expect("list");
    assert!(list[0].open_invites.is_empty());
}

#[test]
fn remove_key_takes_a_unique_prefix_of_the_credential_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = minimal_config(dir.path());
    enrol(
        &cfg,
        "alice@corp",
        &[("lost_key_1", NAMED_AAGUID), ("lost_key_2", NAMED_AAGUID)],
    );

    let ambiguous = admin(&cfg, &["remove-key", "alice@corp", "lost_"]);

    assert!(!ambiguous.status.success());
    assert!(
        stderr(&ambiguous)
            .contains("2 keys of alice@corp have ids starting with \"lost_\": give more of the id"),
        "{}",
        stderr(&ambiguous)
    );
    let none = admin(&cfg, &["remove-key", "alice@corp", "found"]);
    assert!(!none.status.success());
    assert!(
        stderr(&none).contains("no key of alice@corp"),
        "{}",
        stderr(&none)
    );
    assert!(
        audit_events(dir.path())
            .iter()
            .all(|e| e["event"] != "key_removed")
    );

    let out = admin(&cfg, &["remove-key", "alice@corp", "lost_key_2"]);

    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("removed key lost_key_2 of alice@corp"),
        "{text}"
    );
    assert!(text.contains("1 key left"), "{text}");
    let event = last_event(dir.path());
    assert_eq!(event["event"], "key_removed");
    assert!(
        event["reason"]
            .as_str()
            .is_some_and(|r| r.contains("lost_key_2")),
        "{event}"
    );
    let store = Store::open(&dir.path().join("gw.db")).expect("db");
    let left: Vec<_> = store
        .credentials("alice@corp")
        .expect("creds")
        .into_iter()
        .map(|c| c.cred_id)
        .collect();
    assert_eq!(left, ["lost_key_1"]);
    assert_eq!(store.epochs().expect("epochs")["alice@corp"], 1);
}

#[test]
fn user_commands_refuse_unknown_users_and_write_no_audit_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = minimal_config(dir.path());
    for args in [
        &["disable", "nobody@corp"][..],
        &["enable", "nobody@corp"],
        &["remove", "nobody@corp"],
        &["remove-key", "nobody@corp", "abc"],
    ] {
        let out = admin(&cfg, args);

        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out)
                .contains("no user nobody@corp on this gateway: see `touchgate-gateway users`"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(audit_events(dir.path()).is_empty());
    let store = Store::open(&dir.path().join("gw.db")).expect("db");
    assert!(
        store.list_users().expect("list").is_empty(),
        "no user was made"
    );
}

#[cfg(unix)]
#[test]
fn a_new_database_and_its_folder_are_private_under_a_permissive_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\nrp_id = \"localhost\"\ndatabase = \"state/gw.db\"\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n",
    )
    .expect("write config");

    // The umask is set in a shell for the child only: the test threads share this process's.
    let out = Command::new("sh")
        .args(["-c", "umask 000 && exec \"$@\"", "sh"])
        .arg(env!("CARGO_BIN_EXE_touchgate-gateway"))
        .args(["invite", "alice@corp", "--config"])
        .arg(&cfg)
        .output()
        .expect("run invite");

    assert!(out.status.success(), "{}", stderr(&out));
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("state")), 0o700);
    assert_eq!(mode(&dir.path().join("state/gw.db")), 0o600);
}

/// A `serve` child, killed when dropped.
struct Serving(std::process::Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn user_commands_work_beside_a_serving_gateway_on_the_same_database() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = gateway()
        .args(["gen-cert", "--name", "localhost", "--out"])
        .arg(dir.path())
        .output()
        .expect("gen-cert");
    assert!(out.status.success());
    let cfg = minimal_config(dir.path());
    let mut text = std::fs::read_to_string(&cfg).expect("read config");
    text = text.replace("rp_id", "admin_listen = \"127.0.0.1:0\"\nrp_id");
    text.push_str("[id_tokens]\nsource = \"none\"\n");
    std::fs::write(&cfg, text).expect("write config");
    let mut child = gateway()
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("serve");
    let stdout_pipe = child.stdout.take().expect("stdout");
    let _serving = Serving(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout_pipe)
        .read_line(&mut line)
        .expect("read");
    assert!(line.starts_with("touchgate-gateway listening"), "{line:?}");

    for args in [
        &["invite", "alice@corp"][..],
        &["disable", "alice@corp"],
        &["users"],
        &["enable", "alice@corp"],
        &["remove", "alice@corp"],
    ] {
        let out = admin(&cfg, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let events: Vec<_> = audit_events(dir.path())
        .into_iter()
        .map(|e| e["event"].as_str().unwrap_or_default().to_owned())
        .collect();
    for want in ["user_disabled", "user_enabled", "user_removed"] {
        assert!(events.iter().any(|e| e == want), "{want} in {events:?}");
    }
}

/// Sets the schema version of the database at `path` one past what this gateway knows, as a
/// newer gateway would leave it; returns the new version.
fn rusqlite_version_bump(path: &std::path::Path) -> i64 {
    let conn = rusqlite::Connection::open(path).expect("open");
    let v: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    conn.pragma_update(None, "user_version", v + 1)
        .expect("bump");
    v + 1
}

/// `check --config CFG`: the process output and what it printed.
fn run_check(cfg: &std::path::Path) -> (std::process::Output, String) {
    let out = gateway()
        .args(["check", "--config"])
        .arg(cfg)
        .output()
        .expect("run check");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, text)
}

/// The admin commands on PostgreSQL, named by the environment as a container would: `check`
/// reports without creating anything, `invite`, `users` and `revoke` work from this "machine",
/// and the password in the URL never shows.
#[test]
fn admin_commands_work_against_postgres_named_by_the_environment() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = rt
        .block_on(touchgate_testkit::postgres::Postgres::start())
        .expect("PostgreSQL");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = minimal_config(dir.path());
    let password = pg.url.split(':').nth(2).and_then(|p| p.split('@').next());
    let password = password.expect("a password in the URL").to_owned();
    let run = |args: &[&str]| {
        let out = gateway()
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .env("TOUCHGATE_GATEWAY_DATABASE", &pg.url)
            .output()
            .expect("run");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(&password), "the password shows: {text}");
        (out, text)
    };
    let (_, said) = run(&["check"]);
    assert!(
        said.contains("PostgreSQL 1") && said.contains("not set up yet"),
        "{said}"
    );
    let (out, said) = run(&["invite", "alice@example.com"]);
    assert!(out.status.success(), "{said}");
    let (out, said) = run(&["users"]);
    assert!(
        out.status.success() && said.contains("alice@example.com"),
        "{said}"
    );
    let (out, said) = run(&["revoke", "alice@example.com"]);
    assert!(out.status.success(), "{said}");
    let (_, said) = run(&["check"]);
    assert!(said.contains("schema version 2 of 2 (current)"), "{said}");
    assert!(
        !dir.path().join("gw.db").exists(),
        "no SQLite file was made"
    );
    let epoch = rt
        .block_on(pg.psql("SELECT epoch FROM users WHERE name = 'alice@example.com'"))
        .expect("psql");
    assert_eq!(epoch, "1");
}

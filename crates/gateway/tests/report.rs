//! `touchgate-gateway report` on a recorded audit log with a known answer: three days of two
//! users on three services (`tests/data/report`), with a delegate, refusals, a line cut short,
//! an event of a newer gateway, and a last line without its end of line; the rotated `.1` as
//! text and the `.2.gz` gzipped here from the fixture's text.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

const PERIOD: [&str; 4] = [
    "--since",
    "2026-12-01T00:00:00Z",
    "--until",
    "2026-12-04T00:00:00Z",
];

fn gateway() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_touchgate-gateway"));
    for var in [
        "TOUCHGATE_GATEWAY_CONFIG",
        "TOUCHGATE_GATEWAY_AUDIT_LOG",
        "TOUCHGATE_GATEWAY_DATABASE",
        "TOUCHGATE_GATEWAY_REPORT_SINCE",
        "TOUCHGATE_GATEWAY_REPORT_UNTIL",
        "TOUCHGATE_GATEWAY_REPORT_FORMAT",
    ] {
        c.env_remove(var);
    }
    c
}

/// The recorded log in `dir`: `audit.jsonl`, `audit.jsonl.1` and `audit.jsonl.2.gz`.
fn recorded_log(dir: &Path) -> PathBuf {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/report");
    for name in ["audit.jsonl", "audit.jsonl.1"] {
        std::fs::copy(data.join(name), dir.join(name)).expect("copy the fixture");
    }
    let text = std::fs::read(data.join("audit.jsonl.2")).expect("read the fixture");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&text).expect("gzip");
    std::fs::write(dir.join("audit.jsonl.2.gz"), gz.finish().expect("gzip")).expect("write");
    dir.join("audit.jsonl")
}

fn report(args: &[&str], extra: &[&std::ffi::OsStr]) -> Output {
    gateway()
        .arg("report")
        .args(PERIOD)
        .args(args)
        .args(extra)
        .output()
        .expect("run report")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The files as the title names them.
fn files(log: &Path) -> String {
    let d = log.display();
    format!("{d}, {d}.1, {d}.2.gz")
}

fn cut_short(log: &Path) -> String {
    format!(
        "{}:2: skipped: cut short: the line ends inside its JSON (written as the gateway stopped?)\n",
        log.display()
    )
}

#[test]
fn the_table_of_a_recorded_log_has_the_known_figures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = recorded_log(dir.path());
    let out = report(&[], &["--audit".as_ref(), log.as_os_str()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), cut_short(&log));
    let expected = format!(
        "Use of services from 2026-12-01 00:00Z to 2026-12-04 00:00Z, read from {}\n{TABLE}",
        files(&log)
    );
    assert_eq!(stdout(&out), expected);
}

const TABLE: &str = "\
USER                SERVICE  REQUESTS  STREAMS  FIRST USE          LAST USE                 UP       DOWN  KEYS                                                                  DELEGATES  REFUSALS\n\
alice@corp.example  api             3        2  2026-12-02 08:00Z  2026-12-02 13:00Z   3.4 KiB      620 B  YubiKey 5 Series (q1Z3mK9x)                                           ci-deploy  502: 1, delegation_scope: 1\n\
alice@corp.example  wiki            3        2  2026-12-01 09:00Z  2026-12-03 16:45Z       0 B   11.0 KiB  Google Titan Security Key v2 (Hn4vW8sL), YubiKey 5 Series (q1Z3mK9x)  -          -\n\
bob@corp.example    db              0        2  2026-12-01 10:15Z  2026-12-03 09:30Z  14.0 KiB  264.0 KiB  ee882879-721c-4913-9775-3dfcce97072a (Pd7cXe2J)                       -          -\n\
bob@corp.example    reports         0        0  -                  -                       0 B        0 B  -                                                                     -          unknown_service: 1\n\
bob@corp.example    wiki            0        0  -                  -                       0 B        0 B  -                                                                     -          forbidden: 1\n\
bob@corp.example    -               0        0  -                  -                       0 B        0 B  -                                                                     -          verification_failed: 1\n\
-                   -               0        0  -                  -                       0 B        0 B  -                                                                     -          rate_limited: 1, suppressed: 3\n\
7 rows; 28 lines read, 1 skipped (named on stderr)\n";

#[test]
fn the_csv_of_a_recorded_log_has_the_known_figures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = recorded_log(dir.path());
    let out = report(&["--format", "csv"], &["--audit".as_ref(), log.as_os_str()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), cut_short(&log));
    assert_eq!(
        stdout(&out),
        "user,service,requests,streams,first_use,last_use,bytes_up,bytes_down,keys,delegates,refused,refusals\n\
         alice@corp.example,api,3,2,2026-12-02T08:00:00.000Z,2026-12-02T13:00:01.000Z,3500,620,YubiKey 5 Series (q1Z3mK9x),ci-deploy,2,\"502: 1, delegation_scope: 1\"\n\
         alice@corp.example,wiki,3,2,2026-12-01T09:00:01.000Z,2026-12-03T16:45:00.400Z,0,11264,\"Google Titan Security Key v2 (Hn4vW8sL), YubiKey 5 Series (q1Z3mK9x)\",,0,\n\
         bob@corp.example,db,0,2,2026-12-01T10:15:00.000Z,2026-12-03T09:30:00.000Z,14336,270336,ee882879-721c-4913-9775-3dfcce97072a (Pd7cXe2J),,0,\n\
         bob@corp.example,reports,0,0,,,0,0,,,1,unknown_service: 1\n\
         bob@corp.example,wiki,0,0,,,0,0,,,1,forbidden: 1\n\
         bob@corp.example,,0,0,,,0,0,,,1,verification_failed: 1\n\
         ,,0,0,,,0,0,,,4,\"rate_limited: 1, suppressed: 3\"\n"
    );
}

#[test]
fn the_json_of_a_recorded_log_has_the_known_figures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = recorded_log(dir.path());
    let out = report(
        &["--format", "json"],
        &["--audit".as_ref(), log.as_os_str()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), cut_short(&log));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["report"], "usage");
    assert_eq!(
        json["period"],
        serde_json::json!({"since": "2026-12-01T00:00:00.000Z", "until": "2026-12-04T00:00:00.000Z"})
    );
    let d = log.display().to_string();
    assert_eq!(
        json["files"],
        serde_json::json!([d, format!("{d}.1"), format!("{d}.2.gz")])
    );
    assert_eq!(json["lines_read"], 28);
    assert_eq!(json["skipped_lines"], 1);
    let rows = json["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 7);
    assert_eq!(
        rows[0],
        serde_json::json!({
            "user": "alice@corp.example",
            "service": "api",
            "requests": 3,
            "streams": 2,
            "first_use": "2026-12-02T08:00:00.000Z",
            "last_use": "2026-12-02T13:00:01.000Z",
            "bytes_up": 3500,
            "bytes_down": 620,
            "keys": [{
                "credential": "q1Z3mK9xTQ2b7uV0cJpR4w",
                "aaguid": "cb69481e-8ff7-4039-93ec-0a2729a154a8",
                "model": "YubiKey 5 Series"
            }],
            "delegates": ["ci-deploy"],
            "refusals": {"502": 1, "delegation_scope": 1}
        })
    );
    assert_eq!(rows[2]["service"], "db");
    assert_eq!(rows[2]["bytes_down"], 270336);
    assert_eq!(rows[2]["keys"][0]["model"], serde_json::Value::Null);
    assert_eq!(rows[6]["user"], serde_json::Value::Null);
    assert_eq!(
        rows[6]["refusals"],
        serde_json::json!({"rate_limited": 1, "suppressed": 3})
    );
}

#[test]
fn filters_keep_one_users_lines_of_one_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = recorded_log(dir.path());
    let out = report(
        &[
            "--user",
            "alice@corp.example",
            "--service",
            "wiki",
            "--format",
            "csv",
        ],
        &["--audit".as_ref(), log.as_os_str()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[1].starts_with("alice@corp.example,wiki,3,2,2026-12-01T09:00:01.000Z,"),
        "{text}"
    );
    // Before the period: only the line of 2026-11-28 is read then.
    let out = gateway()
        .args(["report", "--since", "2026-11-28", "--until", "2026-11-29"])
        .args(["--format", "csv", "--audit"])
        .arg(&log)
        .output()
        .expect("run report");
    assert!(
        stdout(&out).ends_with("alice@corp.example,wiki,1,0,2026-11-28T09:00:00.000Z,2026-11-28T09:00:00.000Z,0,5120,YubiKey 5 Series (q1Z3mK9x),,0,\n"),
        "{}",
        stdout(&out)
    );
}

/// A gateway config in `dir` whose services allow a user, a group and everyone, with the
/// audit log `audit_log` (`None`: none).
fn config(dir: &Path, audit_log: Option<&str>) -> PathBuf {
    let cfg = dir.join("gateway.toml");
    let audit = audit_log.map_or(String::new(), |a| format!("audit_log = \"{a}\"\n"));
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nrp_id = \"localhost\"\ndatabase = \"gw.db\"\n{audit}\
             [tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
             [[service]]\nname = \"wiki\"\nkind = \"http\"\nupstream = \"https://wiki-abc123-ew.a.run.app\"\nallow = [\"alice@corp.example\"]\n\
             [[service]]\nname = \"db\"\nkind = \"tcp\"\nupstream = \"10.0.0.5:5432\"\nallow_groups = [\"dba\"]\n\
             [[service]]\nname = \"api\"\nkind = \"http\"\nupstream = \"https://api-abc123-ew.a.run.app\"\nallow = [\"*\"]\n"
        ),
    )
    .expect("write config");
    cfg
}

#[test]
fn the_config_names_the_log_and_its_rotated_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = recorded_log(dir.path());
    let cfg = config(dir.path(), Some("audit.jsonl"));
    let by_config = report(
        &["--format", "csv"],
        &["--config".as_ref(), cfg.as_os_str()],
    );
    assert!(by_config.status.success(), "{}", stderr(&by_config));
    let by_file = report(&["--format", "csv"], &["--audit".as_ref(), log.as_os_str()]);
    assert_eq!(stdout(&by_config), stdout(&by_file));
    assert_eq!(stderr(&by_config), cut_short(&log));
}

#[test]
fn a_log_on_stdout_or_none_is_a_usage_error_that_says_to_pass_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (audit_log, says) in [
        (Some("-"), "audit_log is \"-\" (standard output)"),
        (None, "audit_log is not set"),
    ] {
        let cfg = config(dir.path(), audit_log);
        let out = report(&[], &["--config".as_ref(), cfg.as_os_str()]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(says) && err.contains("--audit FILE"), "{err}");
        assert!(out.stdout.is_empty());
    }
    let out = report(
        &[],
        &[
            "--audit".as_ref(),
            dir.path().join("nothing.jsonl").as_os_str(),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no audit log at"), "{}", stderr(&out));
    let out = report(&[], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--config FILE"), "{}", stderr(&out));
}

#[test]
fn an_unknown_format_is_refused_by_the_command_line() {
    let out = gateway()
        .args(["report", "--format", "xml", "--audit", "audit.jsonl"])
        .output()
        .expect("run report");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("invalid value 'xml'") && err.contains("table, csv, json"),
        "{err}"
    );
}

#[test]
fn the_access_review_lists_every_users_grants_from_the_store_and_the_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    recorded_log(dir.path());
    let cfg = config(dir.path(), Some("audit.jsonl"));
    {
        let store = touchgate_gateway::store::Store::open(&dir.path().join("gw.db")).expect("db");
        for (user, cred_id) in [
            ("alice@corp.example", "q1Z3mK9xTQ2b7uV0cJpR4w"),
            ("alice@corp.example", "Hn4vW8sLr0Yq5GkE1tBzAg"),
            ("bob@corp.example", "Pd7cXe2JfUo9sQwA3mNbVw"),
        ] {
            enrol(&store, user, cred_id);
        }
        let bob = store.ensure_user("bob@corp.example").expect("bob");
        store.ensure_user("carol@corp.example").expect("carol");
        store
            .set_disabled("carol@corp.example", true)
            .expect("disable carol");
        store
            .scim_create_group("dba", None, &[bob.to_string()])
            .expect("db")
            .expect("the group");
    }
    let out = report(
        &["--access-review"],
        &["--config".as_ref(), cfg.as_os_str()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let log = dir.path().join("audit.jsonl");
    assert_eq!(
        stdout(&out),
        format!(
            "Access review from 2026-12-01 00:00Z to 2026-12-04 00:00Z, read from {}\n{REVIEW}",
            files(&log)
        )
    );

    let out = report(
        &["--access-review", "--format", "csv"],
        &["--config".as_ref(), cfg.as_os_str()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "user,state,keys,service,granted_by,requests,streams,last_use,unused\n\
         alice@corp.example,active,2,api,everyone,3,2,2026-12-02T13:00:01.000Z,false\n\
         alice@corp.example,active,2,wiki,user,3,2,2026-12-03T16:45:00.400Z,false\n\
         bob@corp.example,active,1,api,everyone,0,0,,true\n\
         bob@corp.example,active,1,db,group:dba,0,2,2026-12-03T09:30:00.000Z,false\n\
         carol@corp.example,disabled,0,api,everyone,0,0,,true\n"
    );

    let out = report(
        &[
            "--access-review",
            "--format",
            "json",
            "--user",
            "carol@corp.example",
        ],
        &["--config".as_ref(), cfg.as_os_str()],
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["report"], "access_review");
    assert_eq!(
        json["rows"],
        serde_json::json!([{
            "user": "carol@corp.example",
            "disabled": true,
            "keys": 0,
            "service": "api",
            "granted_by": "everyone",
            "requests": 0,
            "streams": 0,
            "last_use": null,
            "unused": true
        }])
    );
}

const REVIEW: &str = "\
USER                STATE     KEYS  SERVICE  GRANTED BY  REQUESTS  STREAMS  LAST USE           FLAG\n\
alice@corp.example  active       2  api      everyone           3        2  2026-12-02 13:00Z\n\
alice@corp.example  active       2  wiki     user               3        2  2026-12-03 16:45Z\n\
bob@corp.example    active       1  api      everyone           0        0  never              unused\n\
bob@corp.example    active       1  db       group:dba          0        2  2026-12-03 09:30Z\n\
carol@corp.example  disabled     0  api      everyone           0        0  never              unused\n\
5 grants to 3 users; unused in the period: 2; held by disabled users: 1\n\
28 lines read, 1 skipped (named on stderr)\n";

/// Enrols a key `cred_id` for `user` through a one-time invite, as an enrolment leaves it.
fn enrol(store: &touchgate_gateway::store::Store, user: &str, cred_id: &str) {
    let code = format!("invite-for-{cred_id}");
    let expires = touchgate_gateway::store::now_secs() + 3600;
    store.ensure_user(user).expect("user");
    store.add_invite(user, &code, expires).expect("invite");
    let cred = touchgate_gateway::store::StoredCredential {
        cred_id: cred_id.to_owned(),
        user: user.to_owned(),
        key_json: "{}".into(),
        aaguid: "cb69481e-8ff7-4039-93ec-0a2729a154a8".into(),
    };
    store.enrol(&code, &cred).expect("db").expect("enrolled");
}

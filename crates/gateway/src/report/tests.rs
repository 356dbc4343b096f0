use super::*;
use crate::audit::AuditKind;

fn t(s: &str) -> SystemTime {
    humantime::parse_rfc3339(s).expect("a time")
}

fn period() -> Period {
    Period::new(t("2026-12-01T00:00:00Z"), t("2026-12-04T00:00:00Z")).expect("a period")
}

fn report_of(filter: Filter, text: &str) -> Report {
    let mut tally = Tally::new(filter);
    tally.read("audit.jsonl", text.as_bytes());
    tally.finish()
}

fn report(text: &str) -> Report {
    report_of(Filter::period(period()), text)
}

fn row<'a>(r: &'a Report, user: &str, service: &str) -> &'a Row {
    r.row(user, service)
        .unwrap_or_else(|| panic!("no row for {user} and {service}: {:#?}", r.rows))
}

const HTTP_USE: &str = r#"{"ts":"2026-12-01T09:00:01.000Z","event":"stream_opened","user":"ann","service":"wiki","credential":"q1Z3mK9xTQ2b7uV0cJpR4w","aaguid":"ee882879-721c-4913-9775-3dfcce97072a","model":"YubiKey 5 Series","granted_by":"user"}
{"ts":"2026-12-01T09:00:01.200Z","event":"request","user":"ann","service":"wiki","credential":"q1Z3mK9xTQ2b7uV0cJpR4w","aaguid":"ee882879-721c-4913-9775-3dfcce97072a","model":"YubiKey 5 Series","method":"GET","path":"/","status":200,"bytes_up":10,"bytes_down":5120}
{"ts":"2026-12-02T10:00:00.000Z","event":"request","user":"ann","service":"wiki","credential":"Zx81kLm2","aaguid":"cb69481e-8ff7-4039-93ec-0a2729a154a8","method":"POST","path":"/edit","status":201,"bytes_up":300,"bytes_down":20}
{"ts":"2026-12-02T10:00:05.000Z","event":"stream_closed","user":"ann","service":"wiki","bytes_up":999,"bytes_down":99999}
"#;

#[test]
fn requests_streams_times_keys_and_bytes_are_counted_per_user_and_service() {
    let r = report(HTTP_USE);
    assert_eq!(r.rows.len(), 1);
    let wiki = row(&r, "ann", "wiki");
    assert_eq!((wiki.requests, wiki.streams), (2, 1));
    assert_eq!(wiki.first_use, Some(t("2026-12-01T09:00:01Z")));
    assert_eq!(wiki.last_use, Some(t("2026-12-02T10:00:00Z")));
    // An HTTP service's bytes are its requests'; its streams carry the same bytes again.
    assert_eq!((wiki.bytes_up, wiki.bytes_down), (310, 5140));
    let keys: Vec<String> = wiki.keys.iter().map(KeyUse::label).collect();
    assert_eq!(
        keys,
        [
            "YubiKey 5 Series (q1Z3mK9x)",
            "cb69481e-8ff7-4039-93ec-0a2729a154a8 (Zx81kLm2)"
        ]
    );
    assert!(wiki.delegates.is_empty() && wiki.refusals.is_empty());
    assert_eq!((r.lines, r.skipped), (4, 0));
}

#[test]
fn a_tcp_services_bytes_come_from_its_closed_streams() {
    let r = report(
        r#"{"ts":"2026-12-01T10:15:00.000Z","event":"stream_opened","user":"bo","service":"db","aaguid":"ee882879-721c-4913-9775-3dfcce97072a"}
{"ts":"2026-12-01T11:15:00.000Z","event":"stream_closed","user":"bo","service":"db","bytes_up":10240,"bytes_down":204800}
{"ts":"2026-12-02T11:15:00.000Z","event":"stream_closed","user":"bo","service":"db","bytes_up":1,"bytes_down":2}
"#,
    );
    let db = row(&r, "bo", "db");
    assert_eq!((db.requests, db.streams), (0, 1));
    assert_eq!((db.bytes_up, db.bytes_down), (10241, 204802));
    assert_eq!(db.last_use, Some(t("2026-12-01T10:15:00Z")));
    // No credential on the line: the key is named by its model alone.
    assert_eq!(db.keys[0].label(), "ee882879-721c-4913-9775-3dfcce97072a");
}

#[test]
fn refusals_are_counted_by_outcome_and_a_delegates_403_is_out_of_scope() {
    let r = report(
        r#"{"ts":"2026-12-02T13:00:00.000Z","event":"stream_opened","user":"ann","service":"api","delegate":"ci-deploy","credential":"q1Z3mK9xTQ2b7uV0cJpR4w"}
{"ts":"2026-12-02T13:00:00.300Z","event":"request","user":"ann","service":"api","delegate":"ci-deploy","status":201,"bytes_up":1500,"bytes_down":200}
{"ts":"2026-12-02T13:00:01.000Z","event":"request","user":"ann","service":"api","delegate":"ci-deploy","status":403,"bytes_up":0,"bytes_down":120}
{"ts":"2026-12-02T13:00:02.000Z","event":"request","user":"ann","service":"api","status":403,"bytes_up":0,"bytes_down":10}
{"ts":"2026-12-02T13:00:03.000Z","event":"upstream_error","user":"ann","service":"api","outcome":"502","reason":"the upstream answered 502"}
{"ts":"2026-12-02T14:00:00.000Z","event":"stream_refused","user":"bo","service":"api","outcome":"forbidden","reason":"bo may not use api"}
{"ts":"2026-12-02T14:00:01.000Z","event":"stream_refused","user":"bo","service":"api","outcome":"forbidden","reason":"bo may not use api"}
{"ts":"2026-12-02T14:30:00.000Z","event":"challenge_refused","user":"bo","outcome":"verification_failed"}
{"ts":"2026-12-02T15:00:00.000Z","event":"connection_refused","peer":"192.0.2.7","outcome":"rate_limited"}
{"ts":"2026-12-02T15:01:00.000Z","event":"refusals_suppressed","peer":"192.0.2.7","suppressed":3}
{"ts":"2026-12-02T15:01:00.000Z","event":"refusals_suppressed","peer":"192.0.2.7"}
{"ts":"2026-12-02T15:02:00.000Z","event":"future_refused","user":"bo","service":"api"}
"#,
    );
    let api = row(&r, "ann", "api");
    assert_eq!(api.requests, 3, "a refused request is still a request line");
    assert_eq!(api.delegates, ["ci-deploy"]);
    assert_eq!(
        api.refusals,
        BTreeMap::from([("502".to_owned(), 1), (DELEGATION_SCOPE.to_owned(), 1)]),
        "a 403 without a delegate is the service's own answer, not a refusal of the gateway"
    );
    let bo = row(&r, "bo", "api");
    assert_eq!(
        bo.refusals,
        BTreeMap::from([
            ("forbidden".to_owned(), 2),
            ("future_refused".to_owned(), 1)
        ]),
        "a refusal without an outcome counts under its event"
    );
    assert_eq!((bo.requests, bo.streams, bo.last_use), (0, 0, None));
    let names: Vec<(Option<&str>, Option<&str>)> = r
        .rows
        .iter()
        .map(|r| (r.user.as_deref(), r.service.as_deref()))
        .collect();
    assert_eq!(
        names,
        [
            (Some("ann"), Some("api")),
            (Some("bo"), Some("api")),
            (Some("bo"), None),
            (None, None)
        ],
        "sorted by user then service, unnamed last"
    );
    assert_eq!(
        r.rows[3].refusals,
        BTreeMap::from([("rate_limited".to_owned(), 1), ("suppressed".to_owned(), 3)])
    );
}

#[test]
fn lines_outside_the_period_or_the_filter_are_not_counted() {
    let text = r#"{"ts":"2026-11-30T23:59:59.999Z","event":"request","user":"ann","service":"wiki","bytes_up":1}
{"ts":"2026-12-01T00:00:00.000Z","event":"request","user":"ann","service":"wiki","bytes_up":2}
{"ts":"2026-12-03T23:59:59.999Z","event":"request","user":"ann","service":"wiki","bytes_up":4}
{"ts":"2026-12-04T00:00:00.000Z","event":"request","user":"ann","service":"wiki","bytes_up":8}
{"ts":"2026-12-02T00:00:00.000Z","event":"request","user":"bo","service":"wiki","bytes_up":16}
{"ts":"2026-12-02T00:00:00.000Z","event":"request","user":"ann","service":"api","bytes_up":32}
"#;
    let all = report(text);
    assert_eq!(
        row(&all, "ann", "wiki").bytes_up,
        2 + 4,
        "since included, until not"
    );
    let ann_wiki = report_of(
        Filter {
            period: period(),
            user: Some("ann".into()),
            service: Some("wiki".into()),
        },
        text,
    );
    assert_eq!(ann_wiki.rows.len(), 1);
    assert_eq!(ann_wiki.rows[0].requests, 2);
}

#[test]
fn a_service_is_counted_by_requests_even_when_a_filtered_out_user_made_them() {
    // Bo's streams to wiki carry the bytes of requests that are in the log (Ann's are): the
    // service is counted by requests whoever is shown.
    let text = r#"{"ts":"2026-12-02T00:00:00.000Z","event":"request","user":"ann","service":"wiki","bytes_up":1}
{"ts":"2026-12-02T00:00:01.000Z","event":"stream_closed","user":"bo","service":"wiki","bytes_up":500}
"#;
    let bo = report_of(
        Filter {
            user: Some("bo".into()),
            ..Filter::period(period())
        },
        text,
    );
    assert_eq!(bo.rows.len(), 1);
    assert_eq!(bo.rows[0].bytes_up, 0);
}

#[test]
fn bad_lines_are_skipped_with_their_number_and_unknown_events_are_passed_over() {
    let text = "{\"ts\":\"2026-12-02T00:00:00.000Z\",\"event\":\"request\",\"user\":\"ann\",\"service\":\"wiki\"}\n\
        not json\n\
        \n\
        {\"event\":\"request\",\"user\":\"ann\"}\n\
        {\"ts\":\"yesterday\",\"event\":\"request\"}\n\
        [1,2]\n\
        {\"ts\":\"2026-12-02T00:00:01.000Z\",\"event\":\"request\",\"status\":\"ok\"}\n\
        {\"ts\":\"2026-12-02T00:00:02.000Z\",\"event\":\"stream_clo\n\
        {\"ts\":\"2026-12-02T00:00:03.000Z\",\"event\":\"quota_exceeded\",\"user\":\"ann\",\"service\":\"wiki\"}\r\n\
        {\"ts\":\"2026-12-02T00:00:04.000Z\",\"event\":\"request\",\"user\":\"ann\",\"service\":\"wiki\"}";
    let r = report(text);
    assert_eq!(
        r.skip_messages(),
        [
            "audit.jsonl:2: skipped: not JSON (expected ident)",
            "audit.jsonl:4: skipped: missing field `ts`",
            "audit.jsonl:5: skipped: `ts` is not a UTC RFC 3339 time: \"yesterday\"",
            "audit.jsonl:6: skipped: JSON, but not an object",
            "audit.jsonl:7: skipped: invalid type: string \"ok\", expected u16",
            "audit.jsonl:8: skipped: cut short: the line ends inside its JSON (written as the gateway stopped?)",
        ]
    );
    assert_eq!(
        (r.lines, r.skipped),
        (9, 6),
        "the blank line is not a line read"
    );
    // The last line has no end of line: it is read all the same.
    assert_eq!(row(&r, "ann", "wiki").requests, 2);
    assert_eq!(r.rows.len(), 1, "an unknown event makes no row");
}

#[test]
fn only_the_first_skipped_lines_are_named_then_the_rest_counted() {
    let text = "garbage\n".repeat(SKIP_MESSAGES + 5);
    let r = report(&text);
    let messages = r.skip_messages();
    assert_eq!(messages.len(), SKIP_MESSAGES + 1);
    assert_eq!(
        messages[SKIP_MESSAGES - 1],
        format!("audit.jsonl:{SKIP_MESSAGES}: skipped: not JSON (expected value)")
    );
    assert_eq!(
        messages[SKIP_MESSAGES],
        format!("5 more lines skipped ({} in all)", SKIP_MESSAGES + 5)
    );
    assert_eq!(r.skipped, SKIP_MESSAGES as u64 + 5);
}

#[test]
fn an_over_long_line_is_skipped_and_the_next_one_read() {
    let long = format!("{{\"ts\":\"{}\"}}\n", "x".repeat(MAX_LINE + 10));
    let text = format!(
        "{long}{}",
        r#"{"ts":"2026-12-02T00:00:00.000Z","event":"request","user":"ann","service":"wiki"}"#
    );
    let r = report(&text);
    assert_eq!(
        r.skip_messages(),
        [format!(
            "audit.jsonl:1: skipped: longer than {MAX_LINE} bytes"
        )]
    );
    assert_eq!(row(&r, "ann", "wiki").requests, 1);
}

#[test]
fn a_file_that_breaks_off_is_read_up_to_the_break() {
    struct Broken<'a>(&'a [u8]);
    impl Read for Broken<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Err(std::io::Error::other("corrupt deflate stream"));
            }
            let n = self.0.read(buf)?;
            Ok(n)
        }
    }
    let mut tally = Tally::new(Filter::period(period()));
    let text = b"{\"ts\":\"2026-12-02T00:00:00.000Z\",\"event\":\"request\",\"user\":\"ann\",\"service\":\"wiki\"}\n";
    tally.read("audit.jsonl.2.gz", BufReader::new(Broken(text)));
    let r = tally.finish();
    assert_eq!(row(&r, "ann", "wiki").requests, 1);
    assert_eq!(
        r.skip_messages(),
        [
            "audit.jsonl.2.gz:2: skipped: the rest of the file cannot be read: corrupt deflate stream"
        ]
    );
}

#[test]
fn the_events_counted_are_audit_kinds_and_every_refused_kind_is_a_refusal() {
    let names: Vec<&str> = AuditKind::ALL.iter().map(|k| k.as_str()).collect();
    for counted in [
        "request",
        "stream_opened",
        "stream_closed",
        "refusals_suppressed",
        "upstream_error",
    ] {
        assert!(names.contains(&counted), "{counted} is no audit event");
        assert!(Kind::of(counted).is_some(), "{counted}");
    }
    for name in names {
        if name.ends_with("_refused") {
            assert_eq!(Kind::of(name), Some(Kind::Refusal), "{name}");
        }
    }
    assert_eq!(Kind::of("session_issued"), None);
    assert_eq!(Kind::of("stream_opened"), Some(Kind::StreamOpened));
}

#[test]
fn times_on_the_command_line_are_durations_back_or_utc_times() {
    let now = t("2026-12-08T12:00:00Z");
    let at = |s: &str| s.parse::<When>().map(|w| w.at(now));
    assert_eq!(at("7d"), Ok(t("2026-12-01T12:00:00Z")));
    assert_eq!(at("36h"), Ok(t("2026-12-07T00:00:00Z")));
    assert_eq!(at("2026-12-01T08:30:00Z"), Ok(t("2026-12-01T08:30:00Z")));
    assert_eq!(at("2026-12-01 08:30:00"), Ok(t("2026-12-01T08:30:00Z")));
    assert_eq!(at("2026-12-01"), Ok(t("2026-12-01T00:00:00Z")));
    let err = at("last tuesday").expect_err("not a time");
    assert!(err.contains("neither a duration"), "{err}");
    assert!(at("2026-12-01T08:30:00+02:00").is_err(), "UTC only");
    let empty =
        Period::new(t("2026-12-02T00:00:00Z"), t("2026-12-01T00:00:00Z")).expect_err("backwards");
    assert!(empty.is_usage());
    assert_eq!(
        empty.to_string(),
        "--since (2026-12-02T00:00:00.000Z) is not before --until (2026-12-01T00:00:00.000Z): the period is empty"
    );
}

#[test]
fn rotated_files_beside_the_log_are_found_and_other_compression_left_unread() {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in [
        "audit.jsonl",
        "audit.jsonl.1",
        "audit.jsonl.2.gz",
        "audit.jsonl-20261201",
        "audit.jsonl.3.zst",
        "audit.jsonlx",
        "other.jsonl.1",
    ] {
        std::fs::write(dir.path().join(name), "").expect("write");
    }
    std::fs::create_dir(dir.path().join("audit.jsonl.d")).expect("mkdir");
    let found = log_files(&dir.path().join("audit.jsonl")).expect("files");
    let names = |v: &[PathBuf]| -> Vec<String> {
        v.iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(&found.read),
        [
            "audit.jsonl",
            "audit.jsonl-20261201",
            "audit.jsonl.1",
            "audit.jsonl.2.gz"
        ]
    );
    assert_eq!(names(&found.not_read), ["audit.jsonl.3.zst"]);

    // Just rotated: the log itself is gone, its rotated files are read.
    std::fs::remove_file(dir.path().join("audit.jsonl")).expect("rm");
    assert_eq!(
        log_files(&dir.path().join("audit.jsonl"))
            .expect("files")
            .read
            .len(),
        3
    );
    let missing = log_files(&dir.path().join("nothing.jsonl")).expect_err("missing");
    assert!(matches!(missing, ReportError::NotFound(_)) && missing.is_usage());

    // The same file named twice is read once.
    let mut all = log_files(&dir.path().join("audit.jsonl.1")).expect("files");
    all.extend(log_files(&dir.path().join("audit.jsonl")).expect("files"));
    assert_eq!(all.read.len(), 3);
}

#[test]
fn a_gzipped_file_is_read_through_every_member() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl.2.gz");
    // Two gzip members one after the other, as `cat a.gz b.gz` makes.
    let mut bytes = Vec::new();
    for user in ["ann", "bo"] {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        writeln!(
            gz,
            r#"{{"ts":"2026-12-02T00:00:00.000Z","event":"request","user":"{user}","service":"wiki"}}"#
        )
        .expect("gzip");
        bytes.extend(gz.finish().expect("gzip"));
    }
    std::fs::write(&path, bytes).expect("write");
    let r = read_files(Filter::period(period()), &[path]).expect("report");
    assert_eq!(r.rows.len(), 2);
    assert_eq!(r.skipped, 0);
}

fn service(toml_text: &str) -> ServiceConfig {
    toml::from_str(toml_text).expect("a service")
}

fn user(name: &str, disabled: bool, keys: usize) -> UserSummary {
    UserSummary {
        name: name.into(),
        disabled,
        created: 0,
        last_sign_in: None,
        credentials: (0..keys)
            .map(|i| crate::store::CredentialSummary {
                cred_id: format!("cred{i}"),
                aaguid: String::new(),
                enrolled_at: 0,
                last_used: None,
            })
            .collect(),
        open_invites: Vec::new(),
    }
}

fn services() -> Vec<ServiceConfig> {
    vec![
        service(
            "name = \"wiki\"\nkind = \"http\"\nupstream = \"https://wiki.example\"\nallow = [\"ann\"]\n",
        ),
        service(
            "name = \"db\"\nkind = \"tcp\"\nupstream = \"db.internal:5432\"\nallow_groups = [\"dba\"]\n",
        ),
        service(
            "name = \"api\"\nkind = \"http\"\nupstream = \"https://api.example\"\nallow = [\"*\"]\n",
        ),
    ]
}

#[test]
fn the_access_review_lists_every_grant_with_its_last_use() {
    let r = report(HTTP_USE);
    let people = [user("ann", false, 2), user("bo", true, 1)];
    let groups = HashMap::from([("bo".to_owned(), vec!["dba".to_owned()])]);
    let grants = access_review(&r, &people, &groups, &services());
    // User, service, granted by, disabled, unused.
    type Seen<'a> = (&'a str, Option<&'a str>, Option<&'a str>, bool, bool);
    let seen: Vec<Seen<'_>> = grants
        .iter()
        .map(|g| {
            (
                g.user.as_str(),
                g.service.as_deref(),
                g.granted_by.as_deref(),
                g.disabled,
                g.unused,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("ann", Some("api"), Some("everyone"), false, true),
            ("ann", Some("wiki"), Some("user"), false, false),
            ("bo", Some("api"), Some("everyone"), true, true),
            ("bo", Some("db"), Some("group:dba"), true, true),
        ]
    );
    assert_eq!(grants[1].last_use, Some(t("2026-12-02T10:00:00Z")));
    assert_eq!((grants[1].requests, grants[1].streams), (2, 1));
    assert_eq!(grants[0].keys, 2);
}

#[test]
fn a_user_without_any_grant_has_a_row_saying_so() {
    let r = report("");
    let only_wiki = &services()[..1];
    let grants = access_review(&r, &[user("cy", false, 0)], &HashMap::new(), only_wiki);
    assert_eq!(grants.len(), 1);
    assert_eq!(
        (grants[0].service.as_deref(), grants[0].unused),
        (None, false)
    );
    let table = render_review(&r, &grants, Format::Table).expect("table");
    assert!(
        table.contains("cy    active     0  -        nothing"),
        "{table}"
    );
}

#[test]
fn the_table_aligns_columns_under_a_title_naming_the_period_and_files() {
    let r = report(&format!("{HTTP_USE}not json\n"));
    let table = render(&r, Format::Table).expect("table");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines,
        [
            "Use of services from 2026-12-01 00:00Z to 2026-12-04 00:00Z, read from audit.jsonl",
            "USER  SERVICE  REQUESTS  STREAMS  FIRST USE          LAST USE              UP     DOWN  KEYS                                                                          DELEGATES  REFUSALS",
            "ann   wiki            2        1  2026-12-01 09:00Z  2026-12-02 10:00Z  310 B  5.0 KiB  YubiKey 5 Series (q1Z3mK9x), cb69481e-8ff7-4039-93ec-0a2729a154a8 (Zx81kLm2)  -          -",
            "1 row; 5 lines read, 1 skipped (named on stderr)",
        ]
    );
}

#[test]
fn csv_and_json_carry_exact_figures() {
    let r = report(HTTP_USE);
    let csv = render(&r, Format::Csv).expect("csv");
    assert_eq!(
        csv,
        "user,service,requests,streams,first_use,last_use,bytes_up,bytes_down,keys,delegates,refused,refusals\n\
         ann,wiki,2,1,2026-12-01T09:00:01.000Z,2026-12-02T10:00:00.000Z,310,5140,\"YubiKey 5 Series (q1Z3mK9x), cb69481e-8ff7-4039-93ec-0a2729a154a8 (Zx81kLm2)\",,0,\n"
    );
    let json: serde_json::Value =
        serde_json::from_str(&render(&r, Format::Json).expect("json")).expect("valid JSON");
    assert_eq!(json["report"], "usage");
    assert_eq!(json["period"]["since"], "2026-12-01T00:00:00.000Z");
    assert_eq!(json["files"], serde_json::json!(["audit.jsonl"]));
    assert_eq!(json["skipped_lines"], 0);
    assert_eq!(json["rows"][0]["bytes_down"], 5140);
    assert_eq!(
        json["rows"][0]["keys"][0]["credential"],
        "q1Z3mK9xTQ2b7uV0cJpR4w"
    );
    assert_eq!(json["rows"][0]["first_use"], "2026-12-01T09:00:01.000Z");
}

#[test]
fn sizes_read_as_people_read_them() {
    use super::render::size;
    assert_eq!(size(0), "0 B");
    assert_eq!(size(1023), "1023 B");
    assert_eq!(size(3500), "3.4 KiB");
    assert_eq!(size(270_336), "264.0 KiB");
    assert_eq!(size(5 * 1024 * 1024 * 1024), "5.0 GiB");
}

#[test]
fn control_characters_from_the_log_do_not_reach_the_terminal() {
    let r = report(
        "{\"ts\":\"2026-12-02T00:00:00.000Z\",\"event\":\"request\",\"user\":\"ann\\u001b[31m\",\"service\":\"wiki\"}\n",
    );
    let table = render(&r, Format::Table).expect("table");
    assert!(!table.contains('\u{1b}'), "{table}");
    assert!(table.contains("ann\\u{1b}[31m"), "{table}");
}

//! `touchgate-gateway report`: who used which service in a period, when, with which keys and
//! delegates, and what the gateway refused them — read back from the audit log, rotated and
//! gzipped files included. With `--access-review`, every grant the config gives each user the
//! store knows, and whether it was used: what a SOC 2 or ISO 27001 access review asks for.
//!
//! The audit log is input from the past: lines of older and newer gateways, a line cut short by
//! a crash, a disk's garbage. Nothing in it fails the report: a bad line is skipped and named
//! ([`Skip`]), an event this version does not know is passed over. Reading ([`Tally`]) and
//! writing ([`render`], [`render_review`]) are pure, so they are tested on logs in memory; only
//! [`log_files`] and [`Tally::read_file`] touch the disk.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    str::FromStr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize, Serializer};

use crate::{config::ServiceConfig, store::UserSummary, users};

mod files;
mod render;

pub use files::{LogFiles, log_files};
pub use render::{Format, render, render_review};

/// How many skipped lines are named one by one; the rest are counted.
pub const SKIP_MESSAGES: usize = 20;

/// The longest line read, in bytes; a longer one is skipped (audit lines are a few hundred).
pub const MAX_LINE: usize = 1 << 20;

/// The refusal a request line stands for when a delegate's request was answered 403: the
/// gateway refused it for the scope of the delegated grant.
pub const DELEGATION_SCOPE: &str = "delegation_scope";

/// Why a report cannot be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The config names no audit log file to read.
    #[error(
        "the config's audit_log is {0}, so there is no file to read: pass the files the log is \
         collected in with --audit FILE"
    )]
    NoAuditLog(&'static str),
    /// Neither a config nor `--audit` says what to read.
    #[error(
        "no audit log named: pass the gateway config (--config FILE or TOUCHGATE_GATEWAY_CONFIG) \
         or the log itself (--audit FILE)"
    )]
    NothingToRead,
    /// `--access-review` without a config.
    #[error(
        "--access-review needs the gateway config for its users and services: pass --config FILE \
         (or set TOUCHGATE_GATEWAY_CONFIG)"
    )]
    ReviewNeedsConfig,
    /// Neither the log nor a rotated file beside it exists.
    #[error(
        "no audit log at {}, nor rotated files beside it: check the path (--audit FILE, or \
         audit_log in the config)",
        .0.display()
    )]
    NotFound(PathBuf),
    /// A file or folder could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `--since` is not before `--until`.
    #[error("--since ({since}) is not before --until ({until}): the period is empty")]
    EmptyPeriod {
        /// The start, as RFC 3339.
        since: String,
        /// The end, as RFC 3339.
        until: String,
    },
    /// The CSV could not be written.
    #[error("cannot write CSV: {0}")]
    Csv(#[from] csv::Error),
    /// The JSON could not be written.
    #[error("cannot write JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl ReportError {
    /// Whether the command line or the config asked for what cannot be (exit status 2, as for
    /// clap's errors), rather than something failing on the machine (1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::NoAuditLog(_)
                | Self::NothingToRead
                | Self::ReviewNeedsConfig
                | Self::NotFound(_)
                | Self::EmptyPeriod { .. }
        )
    }
}

/// A time on the command line: a duration back from now (`7d`, `12h`), or a UTC time
/// (`2026-12-01T00:00:00Z`, `2026-12-01 08:00:00`, or a date, `2026-12-01`, for its midnight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// This long before now.
    Ago(Duration),
    /// This time.
    At(SystemTime),
}

impl When {
    /// The time this stands for, when it is `now`.
    pub fn at(self, now: SystemTime) -> SystemTime {
        match self {
            Self::Ago(d) => now.checked_sub(d).unwrap_or(UNIX_EPOCH),
            Self::At(t) => t,
        }
    }
}

impl FromStr for When {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(d) = humantime::parse_duration(s) {
            return Ok(Self::Ago(d));
        }
        if let Ok(t) = humantime::parse_rfc3339_weak(s) {
            return Ok(Self::At(t));
        }
        if s.len() == "2026-12-01".len()
            && let Ok(t) = humantime::parse_rfc3339(&format!("{s}T00:00:00Z"))
        {
            return Ok(Self::At(t));
        }
        Err(format!(
            "{s:?} is neither a duration back from now (7d, 12h) nor a UTC time \
             (2026-12-01T00:00:00Z, or 2026-12-01)"
        ))
    }
}

/// The period a report covers: from `since` up to, not including, `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Period {
    /// The start (included).
    #[serde(serialize_with = "time_text")]
    pub since: SystemTime,
    /// The end (not included).
    #[serde(serialize_with = "time_text")]
    pub until: SystemTime,
}

impl Period {
    /// The period from `since` to `until`, which must come later.
    pub fn new(since: SystemTime, until: SystemTime) -> Result<Self, ReportError> {
        if since >= until {
            return Err(ReportError::EmptyPeriod {
                since: rfc3339(since),
                until: rfc3339(until),
            });
        }
        Ok(Self { since, until })
    }

    /// Whether `t` falls in the period.
    pub fn contains(&self, t: SystemTime) -> bool {
        self.since <= t && t < self.until
    }
}

/// Which lines a report counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// Lines of this period.
    pub period: Period,
    /// Only lines of this user, when set.
    pub user: Option<String>,
    /// Only lines of this service, when set.
    pub service: Option<String>,
}

impl Filter {
    /// Every line of `period`.
    pub fn period(period: Period) -> Self {
        Self {
            period,
            user: None,
            service: None,
        }
    }

    fn matches(&self, user: Option<&str>, service: Option<&str>) -> bool {
        let fits = |want: &Option<String>, got: Option<&str>| {
            want.as_deref().is_none_or(|w| got == Some(w))
        };
        fits(&self.user, user) && fits(&self.service, service)
    }
}

/// Reads `files` (gzip undone) into a report of `filter`'s lines.
pub fn read_files(filter: Filter, files: &[PathBuf]) -> Result<Report, ReportError> {
    let mut tally = Tally::new(filter);
    for f in files {
        tally.read_file(f)?;
    }
    Ok(tally.finish())
}

/// A report in the making: lines go in, [`Tally::finish`] gives the [`Report`].
#[derive(Debug)]
pub struct Tally {
    filter: Filter,
    files: Vec<String>,
    lines: u64,
    skipped: u64,
    skips: Vec<Skip>,
    rows: BTreeMap<(Option<String>, Option<String>), Acc>,
    /// Services with request lines in the period, whoever made them: their bytes are counted
    /// from those, not from their streams (which carry the same bytes).
    requested: HashSet<String>,
}

impl Tally {
    /// An empty tally of `filter`'s lines.
    pub fn new(filter: Filter) -> Self {
        Self {
            filter,
            files: Vec::new(),
            lines: 0,
            skipped: 0,
            skips: Vec::new(),
            rows: BTreeMap::new(),
            requested: HashSet::new(),
        }
    }

    /// Reads the file at `path`, plain or gzipped (told by its first bytes). A file that cannot
    /// be opened is an error; one that breaks off while being read is a skipped line.
    pub fn read_file(&mut self, path: &Path) -> Result<(), ReportError> {
        let read_err = |source| ReportError::Read {
            path: path.to_owned(),
            source,
        };
        let mut input = BufReader::new(std::fs::File::open(path).map_err(read_err)?);
        let gzipped = input
            .fill_buf()
            .map_err(read_err)?
            .starts_with(&[0x1f, 0x8b]);
        let name = path.display().to_string();
        if gzipped {
            self.read(
                &name,
                BufReader::new(flate2::bufread::MultiGzDecoder::new(input)),
            );
        } else {
            self.read(&name, input);
        }
        Ok(())
    }

    /// Reads the lines of the file called `file` from `input`. A line that cannot be used is
    /// skipped; a read error skips the rest of the file.
    pub fn read(&mut self, file: &str, mut input: impl BufRead) {
        self.files.push(file.to_owned());
        let mut buf = Vec::new();
        let mut number = 0;
        loop {
            buf.clear();
            number += 1;
            match next_line(&mut input, &mut buf) {
                Ok(Next::End) => break,
                Ok(Next::Line) => self.line(file, number, &buf),
                Ok(Next::TooLong) => {
                    self.lines += 1;
                    self.skip(file, number, format!("longer than {MAX_LINE} bytes"));
                }
                Err(e) => {
                    self.lines += 1;
                    self.skip(
                        file,
                        number,
                        format!("the rest of the file cannot be read: {e}"),
                    );
                    break;
                }
            }
        }
    }

    /// Takes line `number` of `file` (its end of line may be there or not).
    pub fn line(&mut self, file: &str, number: u64, bytes: &[u8]) {
        let text = bytes.trim_ascii();
        if text.is_empty() {
            return;
        }
        self.lines += 1;
        // serde would take an array for the fields in order, and say so strangely.
        if !text.starts_with(b"{") {
            let why = match serde_json::from_slice::<serde::de::IgnoredAny>(text) {
                Ok(_) => "JSON, but not an object".to_owned(),
                Err(e) => why(&e),
            };
            return self.skip(file, number, why);
        }
        let line: Line = match serde_json::from_slice(text) {
            Ok(l) => l,
            Err(e) => return self.skip(file, number, why(&e)),
        };
        match humantime::parse_rfc3339_weak(&line.ts) {
            Ok(at) => self.add(at, line),
            Err(_) => self.skip(
                file,
                number,
                format!("`ts` is not a UTC RFC 3339 time: {:?}", line.ts),
            ),
        }
    }

    /// The report of what was read.
    pub fn finish(self) -> Report {
        let requested = self.requested;
        let mut rows: Vec<Row> = self
            .rows
            .into_iter()
            .map(|((user, service), a)| {
                let by_requests = service.as_ref().is_some_and(|s| requested.contains(s));
                let (bytes_up, bytes_down) = if by_requests {
                    (a.request_up, a.request_down)
                } else {
                    (a.stream_up, a.stream_down)
                };
                let mut keys: Vec<KeyUse> = a.keys.into_values().collect();
                keys.sort_by_key(KeyUse::label);
                Row {
                    user,
                    service,
                    requests: a.requests,
                    streams: a.streams,
                    first_use: a.first_use,
                    last_use: a.last_use,
                    bytes_up,
                    bytes_down,
                    keys,
                    delegates: a.delegates.into_iter().collect(),
                    refusals: a.refusals,
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            named_first(&a.user, &b.user).then(named_first(&a.service, &b.service))
        });
        Report {
            filter: self.filter,
            files: self.files,
            lines: self.lines,
            skipped: self.skipped,
            skips: self.skips,
            rows,
        }
    }

    fn skip(&mut self, file: &str, line: u64, why: String) {
        self.skipped += 1;
        if self.skips.len() < SKIP_MESSAGES {
            self.skips.push(Skip {
                file: file.to_owned(),
                line,
                why,
            });
        }
    }

    fn add(&mut self, at: SystemTime, line: Line) {
        if !self.filter.period.contains(at) {
            return;
        }
        let Some(kind) = Kind::of(&line.event) else {
            return;
        };
        if kind == Kind::Request
            && let Some(s) = &line.service
        {
            self.requested.insert(s.clone());
        }
        if !self
            .filter
            .matches(line.user.as_deref(), line.service.as_deref())
        {
            return;
        }
        if kind == Kind::Suppressed && line.suppressed.unwrap_or(0) == 0 {
            return;
        }
        let acc = self
            .rows
            .entry((line.user.clone(), line.service.clone()))
            .or_default();
        match kind {
            Kind::Request => {
                acc.requests += 1;
                acc.used(at, &line);
                acc.request_up = acc.request_up.saturating_add(line.bytes_up.unwrap_or(0));
                acc.request_down = acc
                    .request_down
                    .saturating_add(line.bytes_down.unwrap_or(0));
                if line.status == Some(403) && line.delegate.is_some() {
                    acc.refused(DELEGATION_SCOPE, 1);
                }
            }
            Kind::StreamOpened => {
                acc.streams += 1;
                acc.used(at, &line);
            }
            Kind::StreamClosed => {
                acc.stream_up = acc.stream_up.saturating_add(line.bytes_up.unwrap_or(0));
                acc.stream_down = acc.stream_down.saturating_add(line.bytes_down.unwrap_or(0));
            }
            Kind::Refusal => {
                let outcome = line.outcome.as_deref().unwrap_or(&line.event);
                acc.refused(outcome, 1);
            }
            Kind::Suppressed => acc.refused("suppressed", line.suppressed.unwrap_or(0)),
        }
    }
}

/// A report: one row per user and service, sorted by user then service (lines without a user
/// or service last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Which lines it counts.
    pub filter: Filter,
    /// The files read, in order.
    pub files: Vec<String>,
    /// Lines read (blank ones aside), skipped ones included.
    pub lines: u64,
    /// Lines skipped.
    pub skipped: u64,
    /// The first [`SKIP_MESSAGES`] skipped lines.
    pub skips: Vec<Skip>,
    /// The rows.
    pub rows: Vec<Row>,
}

impl Report {
    /// What to say on stderr about skipped lines: the first [`SKIP_MESSAGES`] one by one, then
    /// how many more.
    pub fn skip_messages(&self) -> Vec<String> {
        let mut out: Vec<String> = self.skips.iter().map(Skip::to_string).collect();
        let more = self.skipped.saturating_sub(self.skips.len() as u64);
        if more > 0 {
            out.push(format!(
                "{more} more {} skipped ({} in all)",
                lines(more),
                self.skipped
            ));
        }
        out
    }

    /// The row of `user` and `service`.
    pub fn row(&self, user: &str, service: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.user.as_deref() == Some(user) && r.service.as_deref() == Some(service))
    }
}

/// A line the report could not use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skip {
    /// The file, as named on the command line or in the config.
    pub file: String,
    /// The line's number in the file (of a gzipped file: in its text), from 1.
    pub line: u64,
    /// Why, in words.
    pub why: String,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: skipped: {}", self.file, self.line, self.why)
    }
}

/// What one user did with one service in the period. Lines without a user (refusals before
/// sign-in) or a service (refused sign-ins) have their own rows, with `None` there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    /// The user (for a delegate's lines, the person who approved the delegation).
    pub user: Option<String>,
    /// The service.
    pub service: Option<String>,
    /// `request` lines: HTTP requests.
    pub requests: u64,
    /// `stream_opened` lines: tunnel streams (a TCP service has only these).
    pub streams: u64,
    /// The first request or stream.
    #[serde(serialize_with = "opt_time_text")]
    pub first_use: Option<SystemTime>,
    /// The last request or stream.
    #[serde(serialize_with = "opt_time_text")]
    pub last_use: Option<SystemTime>,
    /// Bytes to the service: of the requests, or for a service without request lines (TCP),
    /// of the closed streams.
    pub bytes_up: u64,
    /// Bytes from the service, counted as `bytes_up` is.
    pub bytes_down: u64,
    /// The security keys whose touch began the sessions used.
    pub keys: Vec<KeyUse>,
    /// Labels of the delegated grants used.
    pub delegates: Vec<String>,
    /// Refusals by outcome (a refusal code, an HTTP status, or [`DELEGATION_SCOPE`]).
    pub refusals: BTreeMap<String, u64>,
}

impl Row {
    /// Refusals of every outcome.
    pub fn refused(&self) -> u64 {
        self.refusals.values().sum()
    }
}

/// A security key named in the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyUse {
    /// Its credential id (base64url).
    pub credential: Option<String>,
    /// Its model's AAGUID.
    pub aaguid: Option<String>,
    /// Its model's name, when the trust list names it.
    pub model: Option<String>,
}

impl KeyUse {
    /// The model's name (else its AAGUID), then the credential id's first characters as
    /// `users` shows them: `YubiKey 5 Series (q1Z3mK9x)`.
    pub fn label(&self) -> String {
        let model = self
            .model
            .as_deref()
            .or(self.aaguid.as_deref())
            .unwrap_or("unknown model");
        match &self.credential {
            Some(c) => {
                let prefix: String = c.chars().take(users::KEY_PREFIX_LEN).collect();
                format!("{model} ({prefix})")
            }
            None => model.to_owned(),
        }
    }
}

/// One grant in an access review: a user, a service the config lets them use, and their use of
/// it in the period. A user with no grant has one entry with no service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    /// The user.
    pub user: String,
    /// Whether an admin (or SCIM) disabled the user.
    pub disabled: bool,
    /// How many keys the user has enrolled.
    pub keys: usize,
    /// The service, or `None` when the user may use none.
    pub service: Option<String>,
    /// What grants it: `user` (named in `allow`), `everyone` (`"*"`) or `group:NAME`.
    pub granted_by: Option<String>,
    /// Requests in the period.
    pub requests: u64,
    /// Streams in the period.
    pub streams: u64,
    /// The last request or stream in the period.
    #[serde(serialize_with = "opt_time_text")]
    pub last_use: Option<SystemTime>,
    /// Granted, and not used in the period.
    pub unused: bool,
}

/// The access review: for every user of `users` (the store's, by name), every service of
/// `services` whose policy lets them in with their `groups`, and `report`'s use of it. The
/// report's user and service filters apply.
pub fn access_review(
    report: &Report,
    users: &[UserSummary],
    groups: &HashMap<String, Vec<String>>,
    services: &[ServiceConfig],
) -> Vec<Grant> {
    let filter = &report.filter;
    let mut services: Vec<&ServiceConfig> = services
        .iter()
        .filter(|s| filter.service.as_deref().is_none_or(|f| f == s.name))
        .collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Vec::new();
    for u in users {
        if filter.user.as_deref().is_some_and(|f| f != u.name) {
            continue;
        }
        let none = Vec::new();
        let their_groups = groups.get(&u.name).unwrap_or(&none);
        let before = out.len();
        for s in &services {
            let Some(granted_by) = s.grant(&u.name, their_groups) else {
                continue;
            };
            let used = report.row(&u.name, &s.name);
            let last_use = used.and_then(|r| r.last_use);
            out.push(Grant {
                user: u.name.clone(),
                disabled: u.disabled,
                keys: u.credentials.len(),
                service: Some(s.name.clone()),
                granted_by: Some(granted_by),
                requests: used.map_or(0, |r| r.requests),
                streams: used.map_or(0, |r| r.streams),
                last_use,
                unused: last_use.is_none(),
            });
        }
        if out.len() == before && filter.service.is_none() {
            out.push(Grant {
                user: u.name.clone(),
                disabled: u.disabled,
                keys: u.credentials.len(),
                service: None,
                granted_by: None,
                requests: 0,
                streams: 0,
                last_use: None,
                unused: false,
            });
        }
    }
    out
}

// ---- reading ----

/// The fields of an audit line the report uses; others are passed over.
#[derive(Deserialize)]
struct Line {
    ts: String,
    event: String,
    user: Option<String>,
    service: Option<String>,
    outcome: Option<String>,
    delegate: Option<String>,
    credential: Option<String>,
    aaguid: Option<String>,
    model: Option<String>,
    status: Option<u16>,
    bytes_up: Option<u64>,
    bytes_down: Option<u64>,
    suppressed: Option<u64>,
}

/// What a line counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request,
    StreamOpened,
    StreamClosed,
    /// `*_refused` and `upstream_error`.
    Refusal,
    /// `refusals_suppressed`: refusals counted, not written.
    Suppressed,
}

impl Kind {
    /// `None` for events the report does not count, among them those of newer gateways. The
    /// names are [`crate::audit::AuditKind`]'s (a test holds them to it).
    fn of(event: &str) -> Option<Self> {
        Some(match event {
            "request" => Self::Request,
            "stream_opened" => Self::StreamOpened,
            "stream_closed" => Self::StreamClosed,
            "refusals_suppressed" => Self::Suppressed,
            "upstream_error" => Self::Refusal,
            e if e.ends_with("_refused") => Self::Refusal,
            _ => return None,
        })
    }
}

#[derive(Debug, Default)]
struct Acc {
    requests: u64,
    streams: u64,
    first_use: Option<SystemTime>,
    last_use: Option<SystemTime>,
    request_up: u64,
    request_down: u64,
    stream_up: u64,
    stream_down: u64,
    /// By credential id (else AAGUID, else model name).
    keys: BTreeMap<String, KeyUse>,
    delegates: BTreeSet<String>,
    refusals: BTreeMap<String, u64>,
}

impl Acc {
    /// A request or a stream at `at`: its time, key and delegate.
    fn used(&mut self, at: SystemTime, line: &Line) {
        self.first_use = Some(self.first_use.map_or(at, |t| t.min(at)));
        self.last_use = Some(self.last_use.map_or(at, |t| t.max(at)));
        if let Some(d) = &line.delegate {
            self.delegates.insert(d.clone());
        }
        let id = match (&line.credential, &line.aaguid, &line.model) {
            (Some(c), _, _) => format!("c:{c}"),
            (None, Some(a), _) => format!("a:{a}"),
            (None, None, Some(m)) => format!("m:{m}"),
            (None, None, None) => return,
        };
        let key = self.keys.entry(id).or_insert_with(|| KeyUse {
            credential: line.credential.clone(),
            aaguid: None,
            model: None,
        });
        // A line of an older gateway, or before the trust list named the model, may lack them.
        if key.aaguid.is_none() {
            key.aaguid.clone_from(&line.aaguid);
        }
        if key.model.is_none() {
            key.model.clone_from(&line.model);
        }
    }

    fn refused(&mut self, outcome: &str, n: u64) {
        let count = self.refusals.entry(outcome.to_owned()).or_default();
        *count = count.saturating_add(n);
    }
}

enum Next {
    Line,
    TooLong,
    End,
}

/// Reads one line (up to [`MAX_LINE`] bytes, with its end of line if it has one) into `buf`;
/// a longer line is read past and reported as such.
fn next_line(input: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Next> {
    let limit = MAX_LINE as u64 + 1;
    if input.by_ref().take(limit).read_until(b'\n', buf)? == 0 {
        return Ok(Next::End);
    }
    if buf.len() <= MAX_LINE || buf.last() == Some(&b'\n') {
        return Ok(Next::Line);
    }
    loop {
        let available = input.fill_buf()?;
        if available.is_empty() {
            break;
        }
        match available.iter().position(|b| *b == b'\n') {
            Some(i) => {
                input.consume(i + 1);
                break;
            }
            None => {
                let n = available.len();
                input.consume(n);
            }
        }
    }
    Ok(Next::TooLong)
}

/// Why a line is not an audit line, without serde's position (the report names the line).
fn why(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let message = text
        .rsplit_once(" at line ")
        .map_or(text.as_str(), |(m, _)| m);
    match e.classify() {
        serde_json::error::Category::Eof => {
            "cut short: the line ends inside its JSON (written as the gateway stopped?)".to_owned()
        }
        serde_json::error::Category::Syntax => format!("not JSON ({message})"),
        serde_json::error::Category::Data | serde_json::error::Category::Io => message.to_owned(),
    }
}

/// `Some` before `None`, names in order.
fn named_first(a: &Option<String>, b: &Option<String>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => a.cmp(b),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

// ---- times and words ----

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn lines(n: u64) -> &'static str {
    if n == 1 { "line" } else { "lines" }
}

/// As the audit log writes times: RFC 3339, UTC, milliseconds.
fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn time_text<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

fn opt_time_text<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(*t)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests;

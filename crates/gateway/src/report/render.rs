//! Writing a report: aligned columns for people, CSV, or JSON.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    time::SystemTime,
};

use serde::Serialize;

use super::{Grant, KeyUse, Period, Report, ReportError, lines, rfc3339, secs};
use crate::users;

/// How a report is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people, under a title naming the period and the files read.
    Table,
    /// One header row, then one row per line of the table.
    Csv,
    /// One object: the period, the files, the rows and how many lines were skipped.
    Json,
}

/// The report of use, written in `format`.
pub fn render(report: &Report, format: Format) -> Result<String, ReportError> {
    match format {
        Format::Table => Ok(usage_table(report)),
        Format::Csv => csv_text(
            &[
                "user",
                "service",
                "requests",
                "streams",
                "first_use",
                "last_use",
                "bytes_up",
                "bytes_down",
                "keys",
                "delegates",
                "refused",
                "refusals",
            ],
            report.rows.iter().map(|r| {
                vec![
                    r.user.clone().unwrap_or_default(),
                    r.service.clone().unwrap_or_default(),
                    r.requests.to_string(),
                    r.streams.to_string(),
                    r.first_use.map(rfc3339).unwrap_or_default(),
                    r.last_use.map(rfc3339).unwrap_or_default(),
                    r.bytes_up.to_string(),
                    r.bytes_down.to_string(),
                    keys_text(&r.keys),
                    r.delegates.join(", "),
                    r.refused().to_string(),
                    refusals_text(&r.refusals),
                ]
            }),
        ),
        Format::Json => json_text(report, "usage", &report.rows),
    }
}

/// The access review of `grants` (from [`super::access_review`] on `report`), written in
/// `format`.
pub fn render_review(
    report: &Report,
    grants: &[Grant],
    format: Format,
) -> Result<String, ReportError> {
    match format {
        Format::Table => Ok(review_table(report, grants)),
        Format::Csv => csv_text(
            &[
                "user",
                "state",
                "keys",
                "service",
                "granted_by",
                "requests",
                "streams",
                "last_use",
                "unused",
            ],
            grants.iter().map(|g| {
                vec![
                    g.user.clone(),
                    state(g.disabled).to_owned(),
                    g.keys.to_string(),
                    g.service.clone().unwrap_or_default(),
                    g.granted_by.clone().unwrap_or_default(),
                    g.requests.to_string(),
                    g.streams.to_string(),
                    g.last_use.map(rfc3339).unwrap_or_default(),
                    g.unused.to_string(),
                ]
            }),
        ),
        Format::Json => json_text(report, "access_review", grants),
    }
}

fn usage_table(report: &Report) -> String {
    let mut out = title(report, "Use of services");
    if report.rows.is_empty() {
        out.push_str("no use and no refusal in this period\n");
    } else {
        let mut rows = vec![
            [
                "USER",
                "SERVICE",
                "REQUESTS",
                "STREAMS",
                "FIRST USE",
                "LAST USE",
                "UP",
                "DOWN",
                "KEYS",
                "DELEGATES",
                "REFUSALS",
            ]
            .map(str::to_owned),
        ];
        for r in &report.rows {
            rows.push([
                name_or_dash(r.user.as_deref()),
                name_or_dash(r.service.as_deref()),
                r.requests.to_string(),
                r.streams.to_string(),
                time_or_dash(r.first_use),
                time_or_dash(r.last_use),
                size(r.bytes_up),
                size(r.bytes_down),
                dash_if_empty(users::printable(&keys_text(&r.keys))),
                dash_if_empty(users::printable(&r.delegates.join(", "))),
                dash_if_empty(users::printable(&refusals_text(&r.refusals))),
            ]);
        }
        let right = [
            false, false, true, true, false, false, true, true, false, false, false,
        ];
        out.push_str(&aligned(&rows, &right));
    }
    let _ = writeln!(out, "{}", footer(report, report.rows.len(), "row"));
    out
}

fn review_table(report: &Report, grants: &[Grant]) -> String {
    let mut out = title(report, "Access review");
    if grants.is_empty() {
        out.push_str("no user on this gateway matches\n");
        return out;
    }
    let mut rows = vec![
        [
            "USER",
            "STATE",
            "KEYS",
            "SERVICE",
            "GRANTED BY",
            "REQUESTS",
            "STREAMS",
            "LAST USE",
            "FLAG",
        ]
        .map(str::to_owned),
    ];
    for g in grants {
        let (service, granted_by, last_use) = match &g.service {
            Some(s) => (
                users::printable(s),
                users::printable(g.granted_by.as_deref().unwrap_or("")),
                users::time_or_never(g.last_use.map(secs)),
            ),
            None => ("-".to_owned(), "nothing".to_owned(), "-".to_owned()),
        };
        rows.push([
            users::printable(&g.user),
            state(g.disabled).to_owned(),
            g.keys.to_string(),
            service,
            granted_by,
            g.requests.to_string(),
            g.streams.to_string(),
            last_use,
            if g.unused { "unused" } else { "" }.to_owned(),
        ]);
    }
    let right = [false, false, true, false, false, true, true, false, false];
    out.push_str(&aligned(&rows, &right));
    let held = grants.iter().filter(|g| g.service.is_some());
    let count = held.clone().count();
    let unused = held.clone().filter(|g| g.unused).count();
    let disabled = held.filter(|g| g.disabled).count();
    let people: BTreeSet<&str> = grants.iter().map(|g| g.user.as_str()).collect();
    let _ = writeln!(
        out,
        "{count} grant{} to {} user{}; unused in the period: {unused}; held by disabled users: {disabled}",
        plural(count as u64),
        people.len(),
        plural(people.len() as u64),
    );
    let _ = writeln!(out, "{}", footer(report, 0, ""));
    out
}

/// "Use of services from 2026-12-01 00:00Z to 2026-12-04 00:00Z, read from a, b".
fn title(report: &Report, what: &str) -> String {
    let f = &report.filter;
    let mut out = format!(
        "{what} from {} to {}",
        users::format_time(secs(f.period.since)),
        users::format_time(secs(f.period.until)),
    );
    if let Some(u) = &f.user {
        let _ = write!(out, ", user {}", users::printable(u));
    }
    if let Some(s) = &f.service {
        let _ = write!(out, ", service {}", users::printable(s));
    }
    let files: Vec<String> = report.files.iter().map(|f| users::printable(f)).collect();
    let _ = writeln!(out, ", read from {}", files.join(", "));
    out
}

/// "4 rows; 27 lines read, 2 skipped (named on stderr)".
fn footer(report: &Report, rows: usize, row: &str) -> String {
    let mut out = String::new();
    if !row.is_empty() {
        let _ = write!(out, "{rows} {row}{}; ", plural(rows as u64));
    }
    let _ = write!(out, "{} {} read", report.lines, lines(report.lines));
    if report.skipped > 0 {
        let _ = write!(out, ", {} skipped (named on stderr)", report.skipped);
    }
    out
}

fn aligned<const N: usize>(rows: &[[String; N]], right: &[bool; N]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let w = widths[i];
            if right[i] {
                let _ = write!(line, "{cell:>w$}");
            } else {
                let _ = write!(line, "{cell:<w$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn csv_text(
    header: &[&str],
    rows: impl Iterator<Item = Vec<String>>,
) -> Result<String, ReportError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(header)?;
    for r in rows {
        w.write_record(&r)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| ReportError::Csv(e.into_error().into()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn json_text<R: Serialize>(
    report: &Report,
    kind: &'static str,
    rows: &[R],
) -> Result<String, ReportError> {
    #[derive(Serialize)]
    struct Out<'a, R> {
        report: &'static str,
        period: Period,
        user: Option<&'a str>,
        service: Option<&'a str>,
        files: &'a [String],
        lines_read: u64,
        skipped_lines: u64,
        rows: &'a [R],
    }
    let mut text = serde_json::to_string_pretty(&Out {
        report: kind,
        period: report.filter.period,
        user: report.filter.user.as_deref(),
        service: report.filter.service.as_deref(),
        files: &report.files,
        lines_read: report.lines,
        skipped_lines: report.skipped,
        rows,
    })?;
    text.push('\n');
    Ok(text)
}

fn keys_text(keys: &[KeyUse]) -> String {
    keys.iter()
        .map(KeyUse::label)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `403: 1, forbidden: 2`.
fn refusals_text(refusals: &BTreeMap<String, u64>) -> String {
    refusals
        .iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bytes for people: `512 B`, `3.4 KiB`, `264.0 KiB`, `1.2 GiB`.
pub(super) fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn state(disabled: bool) -> &'static str {
    if disabled { "disabled" } else { "active" }
}

fn name_or_dash(name: Option<&str>) -> String {
    name.map_or_else(|| "-".to_owned(), users::printable)
}

fn dash_if_empty(s: String) -> String {
    if s.is_empty() { "-".to_owned() } else { s }
}

fn time_or_dash(t: Option<SystemTime>) -> String {
    t.map_or_else(|| "-".to_owned(), |t| users::format_time(secs(t)))
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

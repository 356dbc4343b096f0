//! Finding an audit log's files: the log and the rotated files beside it.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use super::ReportError;

/// The files of one audit log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogFiles {
    /// The files to read: the log first, then its rotated files by name.
    pub read: Vec<PathBuf>,
    /// Rotated files compressed other than with gzip, which are not read.
    pub not_read: Vec<PathBuf>,
}

impl LogFiles {
    /// Adds `other`'s files that are not here yet (the same file named twice is read once).
    pub fn extend(&mut self, other: LogFiles) {
        let key = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
        let mut seen: HashSet<PathBuf> = self.read.iter().map(|p| key(p)).collect();
        for p in other.read {
            if seen.insert(key(&p)) {
                self.read.push(p);
            }
        }
        for p in other.not_read {
            if !self.not_read.contains(&p) {
                self.not_read.push(p);
            }
        }
    }
}

/// The audit log at `log` and its rotated files: those beside it whose names are the log's
/// followed by `.` or `-` (`audit.jsonl.1`, `audit.jsonl.2.gz`, `audit.jsonl-20261201`). The
/// log itself may be missing (just rotated away); an error when nothing is found.
pub fn log_files(log: &Path) -> Result<LogFiles, ReportError> {
    let name = log
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| ReportError::NotFound(log.to_owned()))?;
    let dir = match log.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut found = LogFiles::default();
    if log.is_file() {
        found.read.push(log.to_owned());
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ReportError::NotFound(log.to_owned()));
        }
        Err(source) => {
            return Err(ReportError::Read {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut rotated: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let file_name = e.file_name();
            let n = file_name.to_string_lossy().into_owned();
            let rest = n.strip_prefix(&name)?;
            (rest.starts_with('.') || rest.starts_with('-')).then_some(())?;
            // Named as the log is (`audit.jsonl.1`, not `./audit.jsonl.1`).
            let path = log.with_file_name(file_name);
            path.is_file().then_some((n, path))
        })
        .collect();
    rotated.sort();
    for (n, path) in rotated {
        if UNREAD_COMPRESSION.iter().any(|ext| n.ends_with(ext)) {
            found.not_read.push(path);
        } else {
            found.read.push(path);
        }
    }
    if found.read.is_empty() && found.not_read.is_empty() {
        return Err(ReportError::NotFound(log.to_owned()));
    }
    Ok(found)
}

/// Compression of rotated files the report does not undo (gzip is found by its first bytes).
const UNREAD_COMPRESSION: [&str; 5] = [".bz2", ".xz", ".zst", ".lz4", ".zip"];

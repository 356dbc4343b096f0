//! Logs to stderr and to a file in the platform's data folder ("Open log" opens it). The file
//! is moved to `desktop.log.old` when it passes 10 MiB at start.

use std::path::PathBuf;

use tracing_subscriber::{EnvFilter, Layer, fmt, layer::SubscriberExt, util::SubscriberInitExt};

const MAX_LOG: u64 = 10 * 1024 * 1024;

/// Sets up logging (level from `TOUCHGATE_LOG`, default info); returns the log file's path.
pub fn init() -> std::io::Result<PathBuf> {
    let dir = directories::ProjectDirs::from("dev", "touchgate", "touchgate")
        .map(|d| d.data_local_dir().join("logs"))
        .unwrap_or_else(|| std::env::temp_dir().join("touchgate-logs"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("desktop.log");
    if std::fs::metadata(&path).is_ok_and(|m| m.len() > MAX_LOG) {
        let _ = std::fs::rename(&path, dir.join("desktop.log.old"));
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let filter =
        || EnvFilter::try_from_env("TOUCHGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(
            fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
                .with_filter(filter()),
        )
        .with(
            fmt::layer()
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .with_filter(filter()),
        )
        .try_init();
    Ok(path)
}

//! The local status socket: `touchgate status` asks the running agent what it is doing.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::controller::View;

/// What the status socket answers: the controller's view.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// What the front ends draw.
    pub view: View,
}

/// Serves status reports (`report()` at each connection) on a Unix socket at `path` until the
/// task is dropped. A stale socket file from a dead agent is replaced.
#[cfg(unix)]
pub async fn serve(
    path: PathBuf,
    report: impl Fn() -> StatusReport + Send + Sync + 'static,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(&path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "another agent is running (status socket {})",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    loop {
        let (mut s, _) = listener.accept().await?;
        let mut line = serde_json::to_vec(&report()).unwrap_or_default();
        line.push(b'\n');
        let _ = s.write_all(&line).await;
    }
}

/// Asks the agent behind `path`; `Ok(None)` when no agent is running.
#[cfg(unix)]
pub async fn query(path: &Path) -> std::io::Result<Option<StatusReport>> {
    use tokio::io::AsyncReadExt;
    let mut s = match tokio::net::UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    serde_json::from_slice(&buf)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Status needs Unix sockets; other platforms report no agent.
#[cfg(not(unix))]
pub async fn query(_path: &Path) -> std::io::Result<Option<StatusReport>> {
    Ok(None)
}

//! The gateway as its own process — `touchgate-gateway serve`, the program admins run — for
//! tests that need what only a process has: being killed with SIGKILL (no close frame, no
//! goodbye to the database), and replicas that share nothing but their database.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long a gateway may take to print that it listens (migrations on a busy machine).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `touchgate-gateway serve`. Dropping it kills the process.
pub struct GatewayProcess {
    child: tokio::process::Child,
    /// Its QUIC address (UDP, 127.0.0.1).
    pub quic_addr: SocketAddr,
    /// Its admin endpoint (TCP, 127.0.0.1).
    pub admin_addr: SocketAddr,
    /// Its audit log (JSON lines).
    pub audit_log: PathBuf,
}

/// The `touchgate-gateway` program of this build: beside the test's own program's folder (the
/// workspace's target folder), built with cargo when it is not there yet.
pub fn gateway_program() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("where is this test program?")?;
    // target/debug/deps/<test> → target/debug/touchgate-gateway
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test program is in no target folder")?;
    let program = dir.join(format!("touchgate-gateway{}", std::env::consts::EXE_SUFFIX));
    if !program.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--locked", "-q", "-p", "touchgate-gateway"])
            .status()
            .context("cannot run cargo to build touchgate-gateway")?;
        if !status.success() || !program.exists() {
            bail!(
                "{} is missing and cargo could not build it ({status})",
                program.display()
            );
        }
    }
    Ok(program)
}

impl GatewayProcess {
    /// Starts `touchgate-gateway serve --config CONFIG` on `database` (a path or a URL), on
    /// ports of 127.0.0.1 picked by the system, writing its audit log to `audit_log`; returns
    /// once it listens.
    pub async fn start(config: &Path, database: &str, audit_log: &Path) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(gateway_program()?)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--database")
            .arg(database)
            .arg("--audit-log")
            .arg(audit_log)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start touchgate-gateway")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let listening = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addrs) = parse_listening(&line) {
                    return Ok(addrs);
                }
            }
            bail!("touchgate-gateway ended before it listened")
        })
        .await
        .context("touchgate-gateway did not listen in time")??;
        // Keep reading its output, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            quic_addr: listening.0,
            admin_addr: listening.1,
            audit_log: audit_log.to_owned(),
        })
    }

    /// Kills the process with SIGKILL, as a crash or an evicted pod: no connection is closed
    /// politely, packets to it just go unanswered.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child
            .kill()
            .await
            .context("cannot kill touchgate-gateway")
    }

    /// Its audit events called `event`, in order.
    pub fn audit_events(&self, event: &str) -> Vec<serde_json::Value> {
        crate::lab::with_event(crate::lab::read_audit(&self.audit_log), event)
    }
}

/// The addresses in "touchgate-gateway listening: QUIC on udp/ADDR, admin on http://ADDR".
fn parse_listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.strip_prefix("touchgate-gateway listening: QUIC on udp/")?;
    let (quic, rest) = rest.split_once(", admin on http://")?;
    let admin = rest.split([',', ' ']).next()?;
    Some((quic.parse().ok()?, admin.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_gives_both_addresses() {
        let (q, a) = parse_listening(
            "touchgate-gateway listening: QUIC on udp/127.0.0.1:4433, admin on http://127.0.0.1:9090",
        )
        .expect("parsed");
        assert_eq!((q.port(), a.port()), (4433, 9090));
        assert!(parse_listening("something else").is_none());
    }
}

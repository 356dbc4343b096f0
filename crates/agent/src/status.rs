//! The local status socket: `touchgate status` asks the running agent what it is doing, and
//! `touchgate delegations` asks it to list or revoke the user's grants on its live session (no
//! touch). The socket is the user's own (mode 0600, in the user's runtime folder).
//!
//! On each connection the agent writes one line, its [`StatusReport`]; a client with a
//! [`Command`] then writes it as one line and reads one [`Answer`] line.

use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use touchgate_proto::DelegationInfo;

use crate::controller::View;

/// What the status socket answers: the controller's view.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// What the front ends draw.
    pub view: View,
}

/// What a client may ask the running agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// The user's grants, as the gateway lists them.
    ListDelegations,
    /// End one of the user's grants (its id or label).
    RevokeDelegation {
        /// Its id or label.
        id: String,
    },
}

/// The agent's answer to a [`Command`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    /// The user's grants.
    Delegations {
        /// Every grant, live, expired or revoked.
        grants: Vec<DelegationInfo>,
    },
    /// The grant was revoked.
    Revoked {
        /// Its id.
        id: String,
    },
    /// The agent cannot do it here (not signed in, running on a grant, a command it does not
    /// know): ask elsewhere.
    Unavailable {
        /// Why, in words.
        message: String,
    },
    /// The agent asked and the gateway refused, or could not be reached.
    Failed {
        /// Why, in words.
        message: String,
    },
}

/// Carries out a [`Command`] for the socket.
pub type Commands =
    Arc<dyn Fn(Command) -> Pin<Box<dyn Future<Output = Answer> + Send>> + Send + Sync>;

/// A command line is small: past this the socket stops reading.
const COMMAND_MAX: u64 = 4096;

/// How long the socket waits for a command after its report, and for each write.
const COMMAND_WAIT: Duration = Duration::from_secs(5);
/// How long a command may take (the gateway's answer included) before the agent gives up and
/// says so; the client waits a little longer.
const COMMAND_RUN: Duration = Duration::from_secs(20);
/// Connections served at once; more are closed at once.
const CONNECTIONS_MAX: usize = 16;

/// Serves status reports (`report()` at each connection) on a Unix socket at `path` until the
/// task is dropped, and carries out [`Command`]s with `commands` (`Err(words)`: each is
/// answered [`Answer::Unavailable`] with them). A stale socket file from a dead agent is
/// replaced.
#[cfg(unix)]
pub async fn serve(
    path: PathBuf,
    report: impl Fn() -> StatusReport + Send + Sync + 'static,
    commands: Result<Commands, String>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
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
    // Only the user may connect, whatever the folder's mode: it revokes the user's grants.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let commands = Arc::new(commands);
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    let me = crate::peer::own_uid();
    loop {
        let s = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: wait, and serve again.
                tracing::warn!(error = %e, "status socket cannot accept");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        // The user's own programs only, whatever the socket's or its folder's mode.
        if let (Some(me), Ok(peer)) = (me, s.peer_cred())
            && peer.uid() != me
        {
            tracing::warn!(
                uid = peer.uid(),
                "status socket: another user's connection refused"
            );
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let Ok(line) = json_line(&report()) else {
            continue;
        };
        let commands = commands.clone();
        tokio::spawn(async move {
            connection(s, line, commands).await;
            drop(slot);
        });
    }
}

#[cfg(unix)]
async fn connection(
    mut s: tokio::net::UnixStream,
    report: Vec<u8>,
    commands: Arc<Result<Commands, String>>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    if !matches!(
        tokio::time::timeout(COMMAND_WAIT, s.write_all(&report)).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let (read, mut write) = s.split();
    let mut line = String::new();
    // A status client reads its line and goes; a command client writes one line.
    let mut read = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, COMMAND_MAX));
    match tokio::time::timeout(COMMAND_WAIT, read.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return,
    }
    let answer = match (serde_json::from_str::<Command>(&line), &*commands) {
        (Err(e), _) => Answer::Unavailable {
            message: format!("not a command this agent knows ({e})"),
        },
        (Ok(_), Err(refusal)) => Answer::Unavailable {
            message: refusal.clone(),
        },
        (Ok(c), Ok(run)) => tokio::time::timeout(COMMAND_RUN, run(c))
            .await
            .unwrap_or_else(|_| Answer::Unavailable {
                message: format!(
                    "the gateway did not answer within {} s",
                    COMMAND_RUN.as_secs()
                ),
            }),
    };
    if let Ok(out) = json_line(&answer) {
        let _ = tokio::time::timeout(COMMAND_WAIT, write.write_all(&out)).await;
    }
}

/// `value` as one line of JSON.
#[cfg(unix)]
fn json_line(value: &impl Serialize) -> std::io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    Ok(line)
}

/// `io` within `wait`, else a time-out error saying the agent did not answer.
#[cfg(unix)]
async fn within<T>(
    wait: Duration,
    io: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(wait, io).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "the agent did not answer")
    })?
}

/// Asks the agent behind `path`; `Ok(None)` when no agent is running.
#[cfg(unix)]
pub async fn query(path: &Path) -> std::io::Result<Option<StatusReport>> {
    let Some((report, _)) = connect(path).await? else {
        return Ok(None);
    };
    Ok(Some(report))
}

/// Asks the agent behind `path` to carry out `command`, once `fits` says its report is the
/// agent meant (the same user and gateway: another config may share the socket's default
/// place), else answers [`Answer::Unavailable`] without asking; `Ok(None)` when no agent is
/// running.
#[cfg(unix)]
pub async fn command(
    path: &Path,
    command: &Command,
    fits: impl FnOnce(&StatusReport) -> Result<(), String>,
) -> std::io::Result<Option<Answer>> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let Some((report, mut s)) = connect(path).await? else {
        return Ok(None);
    };
    if let Err(message) = fits(&report) {
        return Ok(Some(Answer::Unavailable { message }));
    }
    s.get_mut().write_all(&json_line(command)?).await?;
    let mut answer = String::new();
    within(COMMAND_RUN + COMMAND_WAIT, s.read_line(&mut answer)).await?;
    serde_json::from_str(&answer)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Connects and reads the report line.
#[cfg(unix)]
async fn connect(
    path: &Path,
) -> std::io::Result<Option<(StatusReport, tokio::io::BufReader<tokio::net::UnixStream>)>> {
    use tokio::io::AsyncBufReadExt;
    let s = match tokio::net::UnixStream::connect(path).await {
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
    // An agent of this user only: anyone else's answers are not taken.
    if let (Some(me), Ok(peer)) = (crate::peer::own_uid(), s.peer_cred())
        && peer.uid() != me
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "the status socket {} belongs to another user (uid {})",
                path.display(),
                peer.uid()
            ),
        ));
    }
    let mut s = tokio::io::BufReader::new(s);
    let mut line = String::new();
    within(COMMAND_WAIT, s.read_line(&mut line)).await?;
    let report = serde_json::from_str(&line)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(Some((report, s)))
}

/// Status needs Unix sockets; other platforms report no agent.
#[cfg(not(unix))]
pub async fn query(_path: &Path) -> std::io::Result<Option<StatusReport>> {
    Ok(None)
}

/// Commands need Unix sockets; other platforms have no agent to ask.
#[cfg(not(unix))]
pub async fn command(
    _path: &Path,
    _command: &Command,
    _fits: impl FnOnce(&StatusReport) -> Result<(), String>,
) -> std::io::Result<Option<Answer>> {
    Ok(None)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn report() -> StatusReport {
        StatusReport {
            view: View::default(),
        }
    }

    async fn wait_for(path: &Path) {
        for _ in 0..200 {
            if path.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no socket at {}", path.display());
    }

    #[tokio::test]
    async fn the_socket_reports_carries_out_commands_and_is_the_users_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = asked.clone();
        let commands: Commands = Arc::new(move |c: Command| {
            seen.lock().expect("lock").push(c.clone());
            Box::pin(async move {
                match c {
                    Command::ListDelegations => Answer::Delegations { grants: Vec::new() },
                    Command::RevokeDelegation { id } => Answer::Revoked { id },
                }
            })
        });
        let task = tokio::spawn(serve(path.clone(), report, Ok(commands)));
        wait_for(&path).await;
        let mode = std::fs::metadata(&path)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let r = query(&path).await.expect("query").expect("an agent");
        assert_eq!(r.view.summary, "Signed out");
        let a = command(&path, &Command::ListDelegations, |_| Ok(()))
            .await
            .expect("ask");
        assert_eq!(a, Some(Answer::Delegations { grants: Vec::new() }));
        let a = command(
            &path,
            &Command::RevokeDelegation { id: "ci".into() },
            |_| Ok(()),
        )
        .await
        .expect("ask");
        assert_eq!(a, Some(Answer::Revoked { id: "ci".into() }));
        assert_eq!(
            *asked.lock().expect("lock"),
            [
                Command::ListDelegations,
                Command::RevokeDelegation { id: "ci".into() }
            ]
        );

        // A line that is not a command is refused in words; nothing is carried out.
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let s = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        let mut s = tokio::io::BufReader::new(s);
        let mut line = String::new();
        s.read_line(&mut line).await.expect("report");
        s.get_mut()
            .write_all(b"{\"command\":\"shutdown\"}\n")
            .await
            .expect("write");
        line.clear();
        s.read_line(&mut line).await.expect("answer");
        let a: Answer = serde_json::from_str(&line).expect("json");
        assert!(
            matches!(&a, Answer::Unavailable { message } if message.starts_with("not a command this agent knows")),
            "{a:?}"
        );
        assert_eq!(asked.lock().expect("lock").len(), 2);
        // An agent of another account is not asked at all.
        let a = command(&path, &Command::RevokeDelegation { id: "ci".into() }, |r| {
            Err(format!("the running agent is {:?}'s", r.view.user))
        })
        .await
        .expect("ask");
        assert!(matches!(a, Some(Answer::Unavailable { .. })), "{a:?}");
        assert_eq!(asked.lock().expect("lock").len(), 2);
        task.abort();
    }

    #[tokio::test]
    async fn an_agent_without_commands_refuses_them_in_its_words() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let task = tokio::spawn(serve(
            path.clone(),
            report,
            Err("this agent runs on a grant: it cannot list or revoke grants".into()),
        ));
        wait_for(&path).await;
        let a = command(&path, &Command::ListDelegations, |_| Ok(()))
            .await
            .expect("ask");
        assert_eq!(
            a,
            Some(Answer::Unavailable {
                message: "this agent runs on a grant: it cannot list or revoke grants".into()
            })
        );
        task.abort();
        assert_eq!(
            command(
                &dir.path().join("none.sock"),
                &Command::ListDelegations,
                |_| Ok(()),
            )
            .await
            .expect("no agent"),
            None
        );
    }
}

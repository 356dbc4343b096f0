//! What the helpers that run the system's own programs (PostgreSQL, nginx, tinyproxy) share: a
//! free port, a program run in the foreground and killed with its test, and the words of a
//! failed command or of a log for an error. Whether a program listens is read from Linux's
//! `/proc`.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// How long a program may take to accept connections after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a starting program is looked at.
const READY_POLL: Duration = Duration::from_millis(10);

/// A port of 127.0.0.1 free a moment ago (the program binds it soon after; a race lost to
/// another process is retried with another port).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("cannot find a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// A failed command's status, standard output and error, for an error message.
pub(crate) fn output_text(out: &Output) -> String {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_owned();
    let mut s = out.status.to_string();
    for stream in [text(&out.stdout), text(&out.stderr)] {
        if !stream.is_empty() {
            s.push('\n');
            s.push_str(&stream);
        }
    }
    s
}

/// The last `max` bytes of the file at `path` (empty when there is none).
pub(crate) fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&text[text.len().saturating_sub(max)..]).into_owned()
}

/// A program running in the foreground as a child of the test, its standard output and error
/// in a file. Dropping it kills it (SIGKILL) and waits for it, so that it never outlives the
/// test and its ports and sockets are closed once it is gone.
pub(crate) struct Foreground {
    child: Option<Child>,
}

/// Why a program did not come to accept connections.
pub(crate) enum NotReady {
    /// It ended, with this status.
    Exited(std::process::ExitStatus),
    /// It still runs (it was killed) but accepted nothing in time.
    TimedOut,
}

impl Foreground {
    /// Starts `command` with no standard input, its output appended to `output`.
    pub(crate) fn spawn(mut command: Command, output: &Path) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(output)
            .with_context(|| format!("cannot open {}", output.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {:?}", command.get_program()))?;
        Ok(Self { child: Some(child) })
    }

    /// Waits until the program listens on TCP at `addr`'s port: a socket of its own, not just
    /// anything that accepts there (a program that cannot bind a taken port may retry for a
    /// while before it gives up). When it ends first, or does not listen within a while, it is
    /// killed and the caller told which.
    pub(crate) async fn wait_listening(&mut self, addr: SocketAddr) -> Result<(), NotReady> {
        let started = Instant::now();
        loop {
            let Some(child) = &mut self.child else {
                return Err(NotReady::TimedOut);
            };
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(NotReady::Exited(status));
            }
            if listens(child.id(), addr.port()) {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                self.kill();
                return Err(NotReady::TimedOut);
            }
            // An external program says nothing when it is ready: look again shortly.
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// Kills the program (SIGKILL) and waits until it is gone.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        self.kill();
    }
}

impl NotReady {
    /// The words for an error: "exited with …" or "accepted nothing in 20s".
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Exited(status) => format!("exited ({status})"),
            Self::TimedOut => format!(
                "accepted no connection within {}s (killed)",
                READY_TIMEOUT.as_secs()
            ),
        }
    }
}

/// Whether the process `pid` holds a TCP socket listening on `port` (IPv4 or IPv6): its
/// inode among the listening sockets of `/proc/net/tcp*` and among the process's files.
fn listens(pid: u32, port: u16) -> bool {
    // `sl local_address rem_address st … inode`, addresses as `HEXIP:HEXPORT`; state 0A is
    // LISTEN.
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields.get(1)?.rsplit_once(':')?.1;
                    let listening = *fields.get(3)? == "0A";
                    let inode = fields.get(9)?;
                    (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                        .then(|| format!("socket:[{inode}]"))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
}

/// Fails unless `program` exists, saying which Debian package brings it.
pub(crate) fn require(program: &Path, package: &str) -> anyhow::Result<()> {
    if !program.is_file() {
        bail!(
            "{} is not installed: install Debian's `{package}` package (`apt-get install \
             {package}`; the test command, scripts/test, installs it when run as root)",
            program.display()
        );
    }
    Ok(())
}

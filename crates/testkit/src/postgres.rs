//! A real PostgreSQL server for the tests of the gateway on PostgreSQL: Debian's own server
//! binaries (`/usr/lib/postgresql/<version>/bin`, the newest version present), a fresh cluster in
//! a temporary directory per [`Postgres`], listening on 127.0.0.1 only, on a port picked for it.
//! Tests meet the real server's locking, errors and crash recovery, not a fake's idea of them;
//! several can run side by side (each has its own directory and port).
//!
//! `initdb` refuses to run as root, and the tests may run as root (containers, CI): then the
//! server runs as the unprivileged `postgres` OS user that Debian's package creates (through
//! `runuser`), and owns the temporary directory. Run as any other user, the server runs as that
//! user. The client side ([`Postgres::psql`], and the code under test) runs as the test.
//!
//! The cluster asks for a password (SCRAM-SHA-256) rather than trusting local connections: it
//! costs nothing, keeps other local users out of a test's database on a shared machine, and a
//! client under test that loses the password on the way is refused as it would be in production.
//! The password is made afresh per server and is in [`Postgres::url`].
//!
//! Needs Debian's `postgresql` package (the test command, scripts/test, installs it).

// Runs Debian's binaries, as another OS user when root: Unix only.
#![cfg(unix)]

use std::{
    io::Write as _,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::programs::{free_port, output_text};

/// The superuser the cluster is made with, and the user in [`Postgres::url`].
pub const USER: &str = "touchgate";
/// The database made for the tests, the one in [`Postgres::url`].
pub const DATABASE: &str = "touchgate";

/// Where Debian installs each major version's server binaries.
const DEBIAN_VERSIONS: &str = "/usr/lib/postgresql";
/// The OS user Debian's package creates and the server runs as when the tests run as root.
const SERVER_OS_USER: &str = "postgres";
/// How long `pg_ctl` waits for the server to start or stop (seconds); generous for a busy machine.
const PG_CTL_WAIT_SECS: &str = "60";
/// Ports tried when the one picked was taken before the server could bind it.
const PORT_ATTEMPTS: usize = 5;
/// The words of the server's log when its port was taken (the server's messages are not
/// translated: the cluster is made with the C locale).
const PORT_TAKEN: &str = "Address already in use";
/// The server's log, in the temporary directory (beside the cluster, not in it).
const LOG_FILE: &str = "server.log";
/// How much of the server's log an error shows.
const LOG_TAIL: usize = 4000;

/// A running PostgreSQL server with a database for the tests. Dropping it stops the server
/// (`pg_ctl -m immediate stop`) and removes its directory.
pub struct Postgres {
    /// `postgres://touchgate:PASSWORD@127.0.0.1:PORT/touchgate?sslmode=disable`: the database
    /// [`DATABASE`] as the superuser [`USER`].
    pub url: String,
    /// The port on 127.0.0.1, the same across [`Postgres::restart`].
    pub port: u16,
    password: String,
    /// The server binaries' directory.
    bin: PathBuf,
    /// Whom `initdb` and `pg_ctl` run as.
    server_user: ServerUser,
    /// Whether the server may be running (so [`Drop`] stops it).
    running: bool,
    /// Last: removed after [`Drop`] has stopped the server.
    dir: TempDir,
}

/// Whom the server's programs run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerUser {
    /// The test's own user (not root).
    Current,
    /// The `postgres` OS user, through `runuser` (the test runs as root).
    Postgres,
}

impl Postgres {
    /// Makes a cluster in a new temporary directory, starts it on a free port of 127.0.0.1 and
    /// creates the database [`DATABASE`]. Fails with what to install or do when Debian's
    /// PostgreSQL is missing, or when run as root without the `postgres` OS user.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = server_bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("touchgate-pg-")
            .tempdir()
            .context("cannot make a temporary directory for PostgreSQL")?;
        // The directory is made by, and owned by, the test's effective user.
        let as_root = std::fs::metadata(dir.path())?.uid() == 0;
        let server_user = if as_root {
            let (uid, gid) = postgres_os_user()?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).with_context(|| {
                format!(
                    "cannot give {} to the `{SERVER_OS_USER}` OS user",
                    dir.path().display()
                )
            })?;
            ServerUser::Postgres
        } else {
            ServerUser::Current
        };
        let mut pg = Self {
            url: String::new(),
            port: 0,
            password: hex::encode(rand::random::<[u8; 16]>()),
            bin,
            server_user,
            running: false,
            dir,
        };
        pg.init().await?;
        pg.start_on_a_free_port().await?;
        pg.psql_as(
            &pg.password,
            "postgres",
            &format!("CREATE DATABASE {DATABASE}"),
        )
        .await
        .context("cannot create the tests' database")?;
        pg.url = format!(
            "postgres://{USER}:{}@127.0.0.1:{}/{DATABASE}?sslmode=disable",
            pg.password, pg.port
        );
        tracing::debug!(port = pg.port, dir = %pg.dir.path().display(), "PostgreSQL started");
        Ok(pg)
    }

    /// Stops the server at once, as a crash would (`pg_ctl -m immediate stop`): clients'
    /// connections drop, no checkpoint is made, and the next start recovers from the write-ahead
    /// log. The data directory and the port are kept for [`Postgres::restart`].
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if !self.running {
            return Ok(());
        }
        let out = tokio::process::Command::from(self.stop_command())
            .output()
            .await
            .context("cannot run pg_ctl stop")?;
        if !out.status.success() {
            bail!(
                "pg_ctl could not stop PostgreSQL: {}{}",
                output_text(&out),
                self.log_since(0)
            );
        }
        self.running = false;
        Ok(())
    }

    /// Starts the server again on the same data and port, stopping it first if it runs.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.start_server().await.map_err(|e| {
            anyhow::anyhow!(
                "PostgreSQL did not start again on port {} (another process may have taken it \
                 while it was stopped): {e:#}",
                self.port
            )
        })
    }

    /// Whether the server runs (it was started and not stopped since).
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Runs `sql` with `psql` in the tests' database as [`USER`] and returns what it printed:
    /// unaligned rows without headers, fields separated by `|`, one row a line, with no final
    /// newline. Of several statements separated by `;`, only the last one's rows are printed.
    /// Fails with `psql`'s error when a statement fails or the server is not running.
    pub async fn psql(&self, sql: &str) -> anyhow::Result<String> {
        self.psql_as(&self.password, DATABASE, sql).await
    }

    /// [`Postgres::psql`] in the database `database` (one made by [`Postgres::database`]).
    pub async fn psql_in(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        self.psql_as(&self.password, database, sql).await
    }

    /// Creates another database, `name` (letters, digits and `_`), and returns its URL, as
    /// [`Postgres::url`] is for [`DATABASE`]: a fresh database per test case on one server.
    pub async fn database(&self, name: &str) -> anyhow::Result<String> {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            bail!("database name {name:?}: letters, digits and _ only");
        }
        self.psql_as(
            &self.password,
            "postgres",
            &format!("CREATE DATABASE {name}"),
        )
        .await
        .with_context(|| format!("cannot create the database {name}"))?;
        Ok(format!(
            "postgres://{USER}:{}@127.0.0.1:{}/{name}?sslmode=disable",
            self.password, self.port
        ))
    }

    /// The cluster's data directory (inside the temporary directory that is removed on drop).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `initdb`: the cluster, with the superuser [`USER`] and its password.
    async fn init(&self) -> anyhow::Result<()> {
        let pwfile = self.dir.path().join("password");
        self.write_server_file(&pwfile, &self.password)?;
        let out = tokio::process::Command::from(self.server_command("initdb", |c| {
            c.arg("--pgdata")
                .arg(self.data_dir())
                .args(["--username", USER])
                .arg(format!("--pwfile={}", pwfile.display()))
                .args(["--auth", "scram-sha-256"])
                // The C locale: the same sorting and (English) messages everywhere.
                .args(["--encoding", "UTF8", "--no-locale"])
                // A test cluster is thrown away, never recovered from a power cut.
                .arg("--no-sync");
        }))
        .output()
        .await
        .context("cannot run initdb")?;
        let _ = std::fs::remove_file(&pwfile);
        if !out.status.success() {
            let hint = match self.server_user {
                ServerUser::Postgres => format!(
                    " (as root the server runs as the `{SERVER_OS_USER}` OS user, which must be \
                     able to reach {}: point TMPDIR at a directory it can enter, like /tmp)",
                    self.dir.path().display()
                ),
                ServerUser::Current => String::new(),
            };
            bail!("initdb failed{hint}: {}", output_text(&out));
        }
        let socket_dir = self.dir.path().to_string_lossy().replace('\'', "''");
        let settings = format!(
            "\n# touchgate tests\n\
             listen_addresses = '127.0.0.1'\n\
             # The Unix socket (pg_ctl waits on it) in the test's own directory, not /var/run.\n\
             unix_socket_directories = '{socket_dir}'\n\
             # The tests stop the server as a crash would, never the machine: what the OS has\n\
             # been handed survives, so waiting for the disk only slows the tests down.\n\
             fsync = off\n"
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(self.data_dir().join("postgresql.conf"))
            .and_then(|mut f| f.write_all(settings.as_bytes()))
            .context("cannot write the test settings into postgresql.conf")
    }

    /// Starts the server on a port free a moment ago, and on another one if that was taken
    /// meanwhile.
    async fn start_on_a_free_port(&mut self) -> anyhow::Result<()> {
        let mut attempt = 1;
        loop {
            self.port = free_port()?;
            match self.start_server().await {
                Err(e) if attempt < PORT_ATTEMPTS && format!("{e:#}").contains(PORT_TAKEN) => {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// `pg_ctl -w start` on [`Postgres::port`]; on failure, the server's log says why.
    async fn start_server(&mut self) -> anyhow::Result<()> {
        let log = self.dir.path().join(LOG_FILE);
        let log_start = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        // Set first: a server that started without pg_ctl seeing it is still stopped on drop.
        self.running = true;
        let port = self.port;
        let out = tokio::process::Command::from(self.server_command("pg_ctl", |c| {
            c.arg("--pgdata")
                .arg(self.data_dir())
                .arg("--log")
                .arg(&log)
                .args(["--wait", "--timeout", PG_CTL_WAIT_SECS])
                .arg(format!("--options=-p {port}"))
                .arg("start");
        }))
        .output()
        .await;
        let failure = match out {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => output_text(&out),
            Err(e) => format!("cannot run pg_ctl: {e}"),
        };
        // A server that did not come up in time may yet: it must not outlive the test.
        let _ = tokio::process::Command::from(self.stop_command())
            .output()
            .await;
        self.running = false;
        bail!(
            "PostgreSQL did not start on 127.0.0.1:{port}: {failure}{}",
            self.log_since(log_start)
        )
    }

    /// Runs `psql` as the test's user against `database` with `password`.
    async fn psql_as(&self, password: &str, database: &str, sql: &str) -> anyhow::Result<String> {
        let out = tokio::process::Command::new(self.bin.join("psql"))
            .env_clear()
            .env("LC_ALL", "C")
            // Not on the command line, where any local user could read it.
            .env("PGPASSWORD", password)
            .args(["--no-psqlrc", "--no-align", "--tuples-only", "--quiet"])
            .args(["--set", "ON_ERROR_STOP=1"])
            .arg("--dbname")
            .arg(format!(
                "host=127.0.0.1 port={} user={USER} dbname={database} sslmode=disable \
                 connect_timeout=10",
                self.port
            ))
            .arg("--command")
            .arg(sql)
            .output()
            .await
            .context("cannot run psql")?;
        if !out.status.success() {
            bail!("psql failed on {sql:?}: {}", output_text(&out));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.strip_suffix('\n').unwrap_or(&text).to_owned())
    }

    /// `pg_ctl -m immediate stop`, as a blocking command (for [`Drop`] too).
    fn stop_command(&self) -> Command {
        self.server_command("pg_ctl", |c| {
            c.arg("--pgdata")
                .arg(self.data_dir())
                .args(["--mode", "immediate"])
                .args(["--wait", "--timeout", PG_CTL_WAIT_SECS])
                .arg("stop");
        })
    }

    /// One of the server's programs, run as [`ServerUser`], with no variables of the test's
    /// environment (`PGDATA`, `PGPORT`, a locale) but `PATH`.
    fn server_command(&self, program: &str, args: impl FnOnce(&mut Command)) -> Command {
        let program = self.bin.join(program);
        let mut c = match self.server_user {
            ServerUser::Current => Command::new(program),
            ServerUser::Postgres => {
                let mut c = Command::new("runuser");
                c.args(["-u", SERVER_OS_USER, "--"]).arg(program);
                c
            }
        };
        c.env_clear()
            .envs(std::env::var_os("PATH").map(|p| ("PATH", p)))
            .env("LC_ALL", "C")
            // A directory the server's user may enter (the test's may be private to root).
            .current_dir(self.dir.path());
        args(&mut c);
        c
    }

    /// Writes a file only the server's user can read.
    fn write_server_file(&self, path: &Path, text: &str) -> anyhow::Result<()> {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        if self.server_user == ServerUser::Postgres {
            let dir = std::fs::metadata(self.dir.path())?;
            std::os::unix::fs::chown(path, Some(dir.uid()), Some(dir.gid()))?;
        }
        Ok(())
    }

    /// The end of what the server logged from byte `start` on, as the tail of an error.
    fn log_since(&self, start: u64) -> String {
        let log = std::fs::read(self.dir.path().join(LOG_FILE)).unwrap_or_default();
        let new = log.get(start as usize..).unwrap_or_default();
        let tail = &new[new.len().saturating_sub(LOG_TAIL)..];
        if tail.is_empty() {
            return String::new();
        }
        format!("\nthe server's log:\n{}", String::from_utf8_lossy(tail))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            match self.stop_command().output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!("pg_ctl could not stop PostgreSQL: {}", output_text(&out)),
                Err(e) => eprintln!("cannot run pg_ctl stop: {e}"),
            }
        }
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` with the server's programs in it.
fn server_bin_dir() -> anyhow::Result<PathBuf> {
    let newest = std::fs::read_dir(DEBIAN_VERSIONS)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str().and_then(parse_version)?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max();
    match newest {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "PostgreSQL's server is not installed (no {DEBIAN_VERSIONS}/<version>/bin/initdb): \
             install Debian's `postgresql` package (`apt-get install postgresql`; the test \
             command, scripts/test, installs it when run as root)"
        ),
    }
}

/// `15` → (15, 0); `9.6` → (9, 6).
fn parse_version(name: &str) -> Option<(u32, u32)> {
    let (major, minor) = name.split_once('.').unwrap_or((name, "0"));
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The uid and gid of the `postgres` OS user, with what to do when there is none.
fn postgres_os_user() -> anyhow::Result<(u32, u32)> {
    let missing = || {
        anyhow::anyhow!(
            "the tests run as root, where initdb refuses to run, so PostgreSQL runs as the \
             `{SERVER_OS_USER}` OS user, and there is none: install Debian's `postgresql` \
             package (it creates that user), or run the tests as an unprivileged user"
        )
    };
    let out = Command::new("getent")
        .args(["passwd", SERVER_OS_USER])
        .output()
        .context("cannot run getent to look up the `postgres` OS user")?;
    if !out.status.success() {
        return Err(missing());
    }
    // name:password:uid:gid:…
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut fields = line.split(':').skip(2);
    let (Some(Ok(uid)), Some(Ok(gid))) =
        (fields.next().map(str::parse), fields.next().map(str::parse))
    else {
        return Err(missing());
    };
    let runuser = Command::new("runuser").arg("--version").output();
    if !runuser.is_ok_and(|o| o.status.success()) {
        bail!(
            "the tests run as root, so PostgreSQL runs as the `{SERVER_OS_USER}` OS user through \
             `runuser`, which was not found: install util-linux, or run the tests as an \
             unprivileged user"
        );
    }
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, TcpListener},
        time::Instant,
    };

    use super::*;

    #[tokio::test]
    async fn postgres_keeps_its_data_across_a_restart_and_is_gone_once_dropped() {
        let started = Instant::now();
        let mut pg = Postgres::start().await.expect("start PostgreSQL");
        eprintln!("PostgreSQL started in {:?}", started.elapsed());
        assert!(
            pg.url.starts_with(&format!(
                "postgres://{USER}:{}@127.0.0.1:{}/{DATABASE}?",
                pg.password, pg.port
            )),
            "{}",
            pg.url
        );

        let version = pg.psql("SELECT version()").await.expect("version");
        assert!(version.starts_with("PostgreSQL "), "{version}");
        pg.psql("CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL)")
            .await
            .expect("create table");
        pg.psql("INSERT INTO notes VALUES (1, 'kept across restarts')")
            .await
            .expect("insert");
        let read = "SELECT id, body FROM notes";
        assert_eq!(pg.psql(read).await.expect("read"), "1|kept across restarts");

        let port = pg.port;
        pg.stop().await.expect("stop");
        assert!(!pg.is_running());
        assert!(pg.psql(read).await.is_err(), "a stopped server answered");
        pg.restart().await.expect("restart");
        assert_eq!(pg.port, port);
        assert_eq!(
            pg.psql(read).await.expect("read after restart"),
            "1|kept across restarts"
        );
        // A restart of a running server too.
        pg.restart().await.expect("restart while running");
        assert_eq!(
            pg.psql("SELECT count(*) FROM notes").await.expect("count"),
            "1"
        );

        let data = pg.data_dir();
        assert!(data.join("PG_VERSION").is_file());
        drop(pg);
        assert!(!data.exists(), "{} outlived its server", data.display());
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("the server's port is free");
    }

    #[tokio::test]
    async fn postgres_refuses_a_client_without_the_password() {
        let pg = Postgres::start().await.expect("start PostgreSQL");
        let refused = pg
            .psql_as("not-the-password", DATABASE, "SELECT 1")
            .await
            .expect_err("a wrong password was accepted");
        assert!(
            format!("{refused:#}").contains("password authentication failed"),
            "{refused:#}"
        );
        assert_eq!(pg.psql("SELECT 1").await.expect("with the password"), "1");
    }

    #[tokio::test]
    async fn postgres_says_so_when_its_port_was_taken_while_it_was_stopped() {
        let mut pg = Postgres::start().await.expect("start PostgreSQL");
        pg.stop().await.expect("stop");
        let _taken = TcpListener::bind((Ipv4Addr::LOCALHOST, pg.port)).expect("take the port");
        let refused = pg.restart().await.expect_err("started on a taken port");
        let refused = format!("{refused:#}");
        assert!(refused.contains(&format!("port {}", pg.port)), "{refused}");
        assert!(refused.contains(PORT_TAKEN), "{refused}");
        assert!(!pg.is_running());
    }

    #[tokio::test]
    async fn postgres_servers_started_together_are_separate() {
        let (a, b) = tokio::join!(Postgres::start(), Postgres::start());
        let (a, b) = (a.expect("start the first"), b.expect("start the second"));
        assert_ne!(a.port, b.port);
        assert_ne!(a.data_dir(), b.data_dir());
        a.psql("CREATE TABLE only_in_a (x int)")
            .await
            .expect("create in the first");
        let found = "SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'";
        assert_eq!(b.psql(found).await.expect("look in the second"), "0");
        assert_eq!(a.psql(found).await.expect("look in the first"), "1");
    }
}

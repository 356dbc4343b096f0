//! The store on PostgreSQL, for gateway replicas sharing one database.
//!
//! The store's interface is synchronous (the gateway calls it on blocking threads), and so is
//! this side of it: the connections' sockets are driven by a small runtime of the store's own
//! ([`DbRuntime`]), and each statement waits for its answer with a plain executor. That works
//! from any thread, a runtime's or not, so admin commands, tests and the gateway's blocking
//! threads all use it the same way. [`r2d2`] keeps the pool: a connection is checked before
//! use (a database restarted meanwhile costs a reconnect, not an error) and one that broke is
//! dropped.
//!
//! Replicas agree through the database itself: migrations, secrets and signing-key rotation
//! run under advisory locks, the signature counter and invites are conditional updates, and a
//! trigger announces revocations, disabled users, group changes and new signing keys on the
//! channel
//! [`CHANNEL`], which every replica listens to ([`Listener`]).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio_postgres::{
    AsyncMessage, Client, Config, Statement,
    config::{Host, SslMode},
    types::Type,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    StoreError,
    sql::{Arg, Row, pg_sql},
};

/// The notification channel of changes that end sessions or change access.
pub(crate) const CHANNEL: &str = "touchgate_changed";
/// Pooled connections per gateway: the store's callers are the blocking threads of sign-ins,
/// admin requests and the revocation reload, each one statement or transaction at a time.
const POOL_SIZE: u32 = 16;
/// How long a caller waits for a connection (and a new connection for the server) before the
/// database counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The schema the gateway's tables live in: made by, and owned by, the gateway's role, so
/// no other role of the database can put tables or functions where the gateway looks.
pub(crate) const SCHEMA: &str = "touchgate";
/// How long a statement waits for a lock (another session holding the lock of first-start
/// work, or a row) before failing; migrations wait longer (see [`MIGRATION_LOCK_TIMEOUT`]).
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a migration waits for another replica's.
const MIGRATION_LOCK_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest a statement may run.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the listener waits before connecting again after losing its connection.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// Advisory lock keys (`pg_advisory_xact_lock`), one per kind of first-start or rotation work.
pub(crate) mod locks {
    /// Running migrations.
    pub const MIGRATE: i64 = 0x746f_7563_6867_0001;
    /// Making a named secret.
    pub const SECRET: i64 = 0x746f_7563_6867_0002;
    /// Rotating the token signing key.
    pub const SIGNING_KEY: i64 = 0x746f_7563_6867_0003;
}

/// The schema, version by version. A database at version N has run the first N; each runs in
/// one transaction with the migration lock held, so replicas starting together take turns.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        uuid TEXT NOT NULL,
        created BIGINT NOT NULL,
        epoch BIGINT NOT NULL DEFAULT 0,
        disabled BIGINT NOT NULL DEFAULT 0,
        last_sign_in BIGINT,
        idp_subject TEXT,
        idp_groups TEXT,
        idp_checked BIGINT,
        idp_blocked BIGINT NOT NULL DEFAULT 0,
        scim_external_id TEXT,
        scim_display_name TEXT,
        scim_modified BIGINT,
        scim_deleted BIGINT
    );
    CREATE INDEX users_disabled ON users(name) WHERE disabled <> 0;
    CREATE INDEX users_uuid ON users(uuid);
    CREATE INDEX users_name_lower ON users(lower(name));
    CREATE TABLE invites (
        code_hash TEXT PRIMARY KEY,
        "user" TEXT NOT NULL,
        created BIGINT NOT NULL,
        expires BIGINT NOT NULL,
        used BIGINT
    );
    CREATE INDEX invites_user ON invites("user");
    CREATE TABLE credentials (
        cred_id TEXT PRIMARY KEY,
        "user" TEXT NOT NULL REFERENCES users(name),
        key_json TEXT NOT NULL,
        aaguid TEXT NOT NULL,
        created BIGINT NOT NULL,
        last_used BIGINT,
        counter BIGINT NOT NULL DEFAULT 0,
        seq BIGSERIAL
    );
    CREATE INDEX credentials_user ON credentials("user");
    CREATE TABLE signing_keys (
        kid TEXT PRIMARY KEY,
        pkcs8 BYTEA NOT NULL,
        created BIGINT NOT NULL
    );
    CREATE TABLE secrets (
        name TEXT PRIMARY KEY,
        value BYTEA NOT NULL
    );
    CREATE TABLE scim_groups (
        id TEXT PRIMARY KEY,
        display_name TEXT NOT NULL,
        external_id TEXT,
        created BIGINT NOT NULL,
        modified BIGINT NOT NULL
    );
    CREATE UNIQUE INDEX scim_groups_name ON scim_groups(lower(display_name));
    CREATE TABLE scim_members (
        group_id TEXT NOT NULL REFERENCES scim_groups(id) ON DELETE CASCADE,
        "user" TEXT NOT NULL REFERENCES users(name),
        PRIMARY KEY (group_id, "user")
    );
    CREATE INDEX scim_members_user ON scim_members("user");

    -- Every replica listens: a revocation, a disabled user or a group change reaches them all
    -- at the commit, not at their next poll.
    -- Qualified, and with a fixed search path: no function of another schema can stand in
    -- for pg_notify when the trigger runs in the gateway's session.
    CREATE FUNCTION touchgate_changed() RETURNS trigger LANGUAGE plpgsql
        SET search_path = pg_catalog, pg_temp AS $$
    BEGIN
        PERFORM pg_catalog.pg_notify('touchgate_changed', TG_TABLE_NAME::text);
        RETURN NULL;
    END $$;
    CREATE TRIGGER users_changed AFTER UPDATE OF epoch, disabled, idp_groups ON users
        FOR EACH STATEMENT EXECUTE FUNCTION touchgate_changed();
    CREATE TRIGGER members_changed AFTER INSERT OR UPDATE OR DELETE ON scim_members
        FOR EACH STATEMENT EXECUTE FUNCTION touchgate_changed();
    CREATE TRIGGER groups_changed AFTER UPDATE OF display_name OR DELETE ON scim_groups
        FOR EACH STATEMENT EXECUTE FUNCTION touchgate_changed();
    CREATE TRIGGER keys_changed AFTER INSERT ON signing_keys
        FOR EACH STATEMENT EXECUTE FUNCTION touchgate_changed();
"#,
    // Delegated grants; a revoke is announced like a user's.
    r#"
    CREATE TABLE delegations (
        id TEXT PRIMARY KEY,
        "user" TEXT NOT NULL REFERENCES users(name),
        label TEXT NOT NULL,
        scope TEXT NOT NULL,
        cred_id TEXT NOT NULL,
        created BIGINT NOT NULL,
        expires BIGINT NOT NULL,
        last_used BIGINT,
        revoked BIGINT
    );
    CREATE INDEX delegations_user ON delegations("user");
    CREATE INDEX delegations_revoked ON delegations(expires) WHERE revoked IS NOT NULL;
    CREATE TRIGGER delegations_changed AFTER UPDATE OF revoked ON delegations
        FOR EACH STATEMENT EXECUTE FUNCTION touchgate_changed();
"#,
];

/// Whether `database` is a PostgreSQL URL.
pub fn is_url(database: &str) -> bool {
    let lower = database.trim_start().to_ascii_lowercase();
    lower.starts_with("postgres://") || lower.starts_with("postgresql://")
}

/// Where the PostgreSQL store is and how to reach it, parsed from `database` without
/// connecting.
#[derive(Clone)]
pub struct Target {
    config: Config,
    tls: bool,
    /// The URL without its password, for messages.
    shown: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl Target {
    /// Parses `url` (`postgres://user@host:port/db?sslmode=…`). The password comes from the URL,
    /// else from `password_file`, else from `PGPASSWORD`. TLS: always verified against the
    /// system's public roots and `sslrootcert` (a PEM file) when given, whatever `sslmode` says
    /// (`require`, `verify-ca` and `verify-full` all mean a verified certificate of the host);
    /// without `sslmode`, on for every host but this machine's own (loopback, a Unix socket —
    /// where Cloud SQL's proxy listens); `sslmode=disable` is refused for another machine,
    /// since the connection carries the token signing keys.
    pub fn parse(
        url: &str,
        password_file: Option<&Path>,
    ) -> Result<(Self, Option<PathBuf>), String> {
        let parsed = url::Url::parse(url.trim()).map_err(|e| {
            format!("database URL: {e} (expected postgres://user@host:port/database)")
        })?;
        let shown = shown_url(&parsed);
        let (mut sslmode, mut root) = (None, None);
        let mut rest = parsed.clone();
        rest.set_query(None);
        {
            let mut q = rest.query_pairs_mut();
            for (k, v) in parsed.query_pairs() {
                match &*k {
                    "sslmode" => sslmode = Some(v.into_owned()),
                    "sslrootcert" => root = Some(PathBuf::from(v.into_owned())),
                    _ => {
                        q.append_pair(&k, &v);
                    }
                }
            }
        }
        let mut text = rest.to_string();
        if text.ends_with('?') {
            text.pop();
        }
        let mut config: Config = text.parse().map_err(|e| format!("database {shown}: {e}"))?;
        if config.get_password().is_none() {
            let password = match password_file {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .map_err(|e| format!("database password_file {}: {e}", f.display()))?
                        .trim_end_matches(['\r', '\n'])
                        .to_owned(),
                ),
                None => std::env::var("PGPASSWORD").ok(),
            };
            if let Some(p) = password {
                config.password(p);
            }
        }
        if config.get_user().is_none() {
            return Err(format!(
                "database {shown}: no user in the URL (postgres://USER@host/database)"
            ));
        }
        let local = is_local(&config);
        let tls = match sslmode.as_deref() {
            None => !local,
            Some("disable") if !local => {
                return Err(format!(
                    "database {shown}: sslmode=disable would send the token signing keys and the \
                     password in the clear to another machine; use TLS (sslmode=verify-full), or \
                     a proxy on this machine (such as the Cloud SQL Auth Proxy)"
                ));
            }
            Some("disable") => false,
            Some("allow" | "prefer" | "require" | "verify-ca" | "verify-full") => true,
            Some(other) => {
                return Err(format!(
                    "database {shown}: unknown sslmode {other:?} (disable or verify-full)"
                ));
            }
        };
        config
            .ssl_mode(if tls {
                SslMode::Require
            } else {
                SslMode::Disable
            })
            .connect_timeout(CONNECT_TIMEOUT)
            // A database that stops answering (a dead peer, packets dropped on the way) is
            // given up on in seconds, not after the kernel's quarter of an hour.
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(15))
            .application_name("touchgate-gateway");
        let options = format!(
            "{} -c search_path={SCHEMA} -c lock_timeout={}s -c statement_timeout={}s",
            config.get_options().unwrap_or_default(),
            LOCK_TIMEOUT.as_secs(),
            STATEMENT_TIMEOUT.as_secs()
        );
        config.options(options.trim_start());
        Ok((Self { config, tls, shown }, root))
    }
}

/// `url` for messages: its password, in the user part or as a parameter, masked.
pub(crate) fn shown_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    if url.query_pairs().any(|(k, _)| k == "password") {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "password" {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        shown.query_pairs_mut().clear().extend_pairs(pairs);
    }
    shown.to_string()
}

/// Whether every place `config` may connect to is this machine: a loopback address, exactly
/// `localhost`, or a Unix socket — and any `hostaddr` loopback too (it is where the
/// connection goes). Names merely ending in `.localhost` go to DNS here, so they do not count.
fn is_local(config: &Config) -> bool {
    let hosts = config.get_hosts();
    !hosts.is_empty()
        && hosts.iter().all(|h| match h {
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            #[cfg(unix)]
            Host::Unix(_) => true,
        })
        && config.get_hostaddrs().iter().all(|ip| ip.is_loopback())
}

/// Owns the small runtime that drives the store's connections; stopped without waiting when
/// the store goes (it may be dropped on a runtime's thread).
struct DbRuntime(Option<tokio::runtime::Runtime>);

impl DbRuntime {
    fn handle(&self) -> tokio::runtime::Handle {
        self.0
            .as_ref()
            .map(|rt| rt.handle().clone())
            .expect("the runtime lives until dropped")
    }
}

impl Drop for DbRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Waits for `fut` on this thread, whatever thread it is.
fn wait<F: std::future::Future>(fut: F) -> F::Output {
    futures_executor::block_on(fut)
}

/// One pooled connection and its prepared statements.
pub(crate) struct PgConn {
    client: Client,
    statements: Mutex<HashMap<(String, Vec<Type>), Statement>>,
    /// Set while a transaction is open, so a connection given back mid-transaction (a panic)
    /// counts as broken.
    in_tx: AtomicBool,
}

/// A failed statement: the database refusing it, or the way to the database broken.
fn pg_err(e: tokio_postgres::Error) -> StoreError {
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    // SQLSTATE class 08 (connection exception) and 57P (the server shutting down, crashed,
    // or starting): the database is going away, not refusing the statement.
    let going = e
        .code()
        .is_some_and(|c| c.code().starts_with("08") || c.code().starts_with("57P"));
    if e.is_closed() || io || going {
        StoreError::Unreachable(e.to_string())
    } else {
        StoreError::Postgres(e)
    }
}

impl PgConn {
    fn statement(&self, sql: &str, args: &[Arg<'_>]) -> Result<Statement, StoreError> {
        let types: Vec<Type> = args.iter().map(Arg::pg_type).collect();
        let key = (sql.to_owned(), types);
        if let Some(s) = self
            .statements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(s.clone());
        }
        let s = wait(self.client.prepare_typed(&pg_sql(sql), &key.1)).map_err(pg_err)?;
        self.statements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, s.clone());
        Ok(s)
    }

    fn params<'b>(args: &'b [Arg<'b>]) -> Vec<&'b (dyn tokio_postgres::types::ToSql + Sync)> {
        args.iter()
            .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect()
    }

    pub(crate) fn execute(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64, StoreError> {
        let s = self.statement(sql, args)?;
        wait(self.client.execute(&s, &Self::params(args))).map_err(pg_err)
    }

    pub(crate) fn query(&self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, StoreError> {
        let s = self.statement(sql, args)?;
        wait(self.client.query(&s, &Self::params(args)))
            .map_err(pg_err)?
            .iter()
            .map(Row::from_pg)
            .collect()
    }

    pub(crate) fn batch(&self, sql: &str) -> Result<(), StoreError> {
        wait(self.client.batch_execute(sql)).map_err(pg_err)
    }
}

/// Makes and checks the pool's connections.
struct Manager {
    target: Target,
    tls: MakeRustlsConnect,
    rt: tokio::runtime::Handle,
}

impl r2d2::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = StoreError;

    fn connect(&self) -> Result<PgConn, StoreError> {
        let (config, tls) = (self.target.config.clone(), self.tls.clone());
        let connected = wait(self.rt.spawn(async move {
            let (client, conn) = config.connect(tls).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "a database connection ended");
                }
            });
            Ok::<_, tokio_postgres::Error>(client)
        }));
        let client = match connected {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(StoreError::Unreachable(describe_error(&e))),
            // The store is going away.
            Err(e) => return Err(StoreError::Unreachable(e.to_string())),
        };
        Ok(PgConn {
            client,
            statements: Mutex::default(),
            in_tx: AtomicBool::new(false),
        })
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), StoreError> {
        wait(conn.client.simple_query("")).map(drop).map_err(pg_err)
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.client.is_closed() || conn.in_tx.load(Relaxed)
    }
}

/// The PostgreSQL side of the store.
pub(crate) struct PgStore {
    pool: r2d2::Pool<Manager>,
    target: Target,
    changes: Arc<Listener>,
    // Last: the runtime outlives the pool's connections.
    _rt: DbRuntime,
}

/// The replica's ear on [`CHANNEL`]: woken by every change another replica (or an admin
/// command) commits, and whether it is listening now (when not, the gateway polls).
#[derive(Default)]
pub struct Listener {
    notify: tokio::sync::Notify,
    listening: AtomicBool,
}

impl Listener {
    /// Waits for the next change announced (or for the listener to reconnect, after which
    /// changes made meanwhile must be read).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// Whether notifications arrive now.
    pub fn listening(&self) -> bool {
        self.listening.load(Relaxed)
    }
}

/// TLS trusting `root` alone when given (a private CA, as Cloud SQL's), else the public roots.
fn tls_config(root: Option<&Path>) -> Result<rustls::ClientConfig, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    if root.is_none() {
        roots.roots = webpki_roots::TLS_SERVER_ROOTS.to_vec();
    }
    if let Some(path) = root {
        for cert in crate::tls::load_certs(path)
            .map_err(|e| StoreError::Unreachable(format!("sslrootcert: {e}")))?
        {
            roots.add(cert).map_err(|e| {
                StoreError::Unreachable(format!("sslrootcert {}: {e}", path.display()))
            })?;
        }
    }
    crate::proxy::tls_with(roots).map_err(|e| StoreError::Unreachable(e.to_string()))
}

impl PgStore {
    /// Connects (waiting up to [`CONNECT_TIMEOUT`] for the database) and brings the schema up
    /// to date.
    pub(crate) fn open(url: &str, password_file: Option<&Path>) -> Result<Self, StoreError> {
        let (target, root) = Target::parse(url, password_file).map_err(StoreError::NotAFile)?;
        let rt = DbRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("touchgate-db")
                .enable_all()
                .build()
                .map_err(|e| {
                    StoreError::Unreachable(format!("cannot start the database runtime: {e}"))
                })?,
        ));
        let handle = rt.handle();
        let tls = MakeRustlsConnect::new(tls_config(root.as_deref())?);
        let manager = Manager {
            target: target.clone(),
            tls: tls.clone(),
            rt: handle.clone(),
        };
        let pool = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(1))
            .connection_timeout(CONNECT_TIMEOUT)
            .error_handler(Box::new(LogErrors))
            .build(manager)
            .map_err(|e| unreachable_error(&target, e))?;
        let changes = Arc::new(Listener::default());
        handle.spawn(listen(target.clone(), tls, changes.clone()));
        let store = Self {
            pool,
            target,
            changes,
            _rt: rt,
        };
        store.migrate()?;
        Ok(store)
    }

    /// The change listener.
    pub(crate) fn listener(&self) -> Arc<Listener> {
        self.changes.clone()
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<Manager>, StoreError> {
        self.pool
            .get()
            .map_err(|e| unreachable_error(&self.target, e))
    }

    /// Runs `f` on a pooled connection, outside a transaction (each statement commits alone).
    pub(crate) fn read<T>(
        &self,
        f: impl FnOnce(&PgConn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        f(&*self.conn()?)
    }

    /// Runs `f` in a transaction, first taking the advisory lock `lock` when given; commits
    /// when `f` returns `Ok`, rolls back otherwise.
    pub(crate) fn write<T>(
        &self,
        lock: Option<i64>,
        f: impl FnOnce(&PgConn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.transaction("BEGIN", lock, f)
    }

    /// Runs `f` in a read-only transaction that sees one snapshot of the database throughout.
    pub(crate) fn snapshot<T>(
        &self,
        f: impl FnOnce(&PgConn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.transaction("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", None, f)
    }

    fn transaction<T>(
        &self,
        begin: &str,
        lock: Option<i64>,
        f: impl FnOnce(&PgConn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.conn()?;
        conn.batch(begin)?;
        conn.in_tx.store(true, Relaxed);
        let done = lock
            .map(|key| {
                conn.execute("SELECT pg_advisory_xact_lock(?1)", &[Arg::Int(Some(key))])
                    .map(drop)
            })
            .unwrap_or(Ok(()))
            .and_then(|()| f(&conn));
        let end = conn.batch(if done.is_ok() { "COMMIT" } else { "ROLLBACK" });
        if end.is_ok() {
            conn.in_tx.store(false, Relaxed);
        }
        let value = done?;
        end?;
        Ok(value)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        self.write(None, |c| {
            // Waits longer than other statements for the lock: another replica may be
            // migrating.
            c.batch(&format!(
                "SET LOCAL lock_timeout = '{}s'",
                MIGRATION_LOCK_TIMEOUT.as_secs()
            ))?;
            c.execute(
                "SELECT pg_advisory_xact_lock(?1)",
                &[Arg::Int(Some(locks::MIGRATE))],
            )?;
            c.batch(&format!("CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))?;
            let owned: bool = c
                .query(
                    "SELECT n.nspowner = r.oid FROM pg_catalog.pg_namespace n, pg_catalog.pg_roles r \
                     WHERE n.nspname = ?1 AND r.rolname = current_user",
                    &[Arg::Text(Some(SCHEMA))],
                )?
                .first()
                .map(|r| r.get(0))
                .transpose()?
                .unwrap_or(false);
            if !owned {
                return Err(StoreError::Untrusted(format!(
                    "database: the schema {SCHEMA} belongs to another role: the gateway keeps its tables \
                     only in a schema its own role owns (drop it, or make the gateway's role own it)"
                )));
            }
            c.batch("CREATE TABLE IF NOT EXISTS touchgate_schema (version BIGINT NOT NULL)")?;
            let version: i64 = match c
                .query("SELECT version FROM touchgate_schema", &[])?
                .first()
            {
                Some(r) => r.get(0)?,
                None => {
                    c.execute("INSERT INTO touchgate_schema (version) VALUES (0)", &[])?;
                    0
                }
            };
            if version > MIGRATIONS.len() as i64 {
                return Err(StoreError::Newer {
                    found: version,
                    known: MIGRATIONS.len() as i64,
                });
            }
            for sql in &MIGRATIONS[version as usize..] {
                c.batch(sql)?;
            }
            c.execute(
                "UPDATE touchgate_schema SET version = ?1",
                &[Arg::Int(Some(MIGRATIONS.len() as i64))],
            )?;
            Ok(())
        })
    }
}

/// What `touchgate-gateway check` says of the PostgreSQL database at `url`, without changing it.
pub(crate) fn describe(url: &str, password_file: Option<&Path>) -> Result<String, String> {
    let (target, root) = Target::parse(url, password_file)?;
    let tls = MakeRustlsConnect::new(tls_config(root.as_deref()).map_err(|e| e.to_string())?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let config = target.config.clone();
    let found = std::thread::spawn(move || {
        rt.block_on(async move {
            let (client, conn) = config.connect(tls).await?;
            tokio::spawn(conn);
            let server: String = client.query_one("SHOW server_version", &[]).await?.get(0);
            let version = client
                .query_opt(
                    "SELECT version FROM touchgate_schema WHERE to_regclass('touchgate_schema') IS NOT NULL",
                    &[],
                )
                .await;
            // The table missing makes the query itself fail: a database not set up yet.
            Ok::<_, tokio_postgres::Error>((server, version.ok().flatten().map(|r| r.get::<_, i64>(0))))
        })
    })
    .join()
    .map_err(|_| "the database check failed".to_owned())?;
    let (server, version) = found.map_err(|e| {
        format!(
            "database {target}: the gateway cannot reach its database: {}",
            describe_error(&e)
        )
    })?;
    let known = MIGRATIONS.len() as i64;
    let tls = if target.tls {
        "TLS"
    } else {
        "no TLS (this machine)"
    };
    match version {
        None => Ok(format!(
            "database {target}: PostgreSQL {server}, {tls}; not set up yet (the schema is made at the first start)"
        )),
        Some(v) if v > known => Err(format!(
            "database {target}: schema version {v} was made by a newer gateway (this one knows {known})"
        )),
        Some(v) => Ok(format!(
            "database {target}: PostgreSQL {server}, {tls}, schema version {v} of {known} ({})",
            if v == known {
                "current".to_owned()
            } else {
                format!("{} migration(s) to run at the next start", known - v)
            }
        )),
    }
}

/// An error's words with its cause (tokio-postgres keeps the interesting part there).
fn describe_error(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let more = inner.to_string();
        if !s.contains(&more) {
            s.push_str(": ");
            s.push_str(&more);
        }
        source = inner.source();
    }
    s
}

fn unreachable_error(target: &Target, e: r2d2::Error) -> StoreError {
    StoreError::Unreachable(format!("{target}: {}", describe_error(&e)))
}

/// r2d2's connection errors, to the log (once per failed attempt).
#[derive(Debug)]
struct LogErrors;

impl r2d2::HandleError<StoreError> for LogErrors {
    fn handle_error(&self, error: StoreError) {
        tracing::warn!(%error, "cannot connect to the database");
    }
}

/// Keeps a connection listening on [`CHANNEL`], reconnecting after [`LISTEN_RETRY`] when it
/// drops; every notification, and every (re)connection, wakes the gateway's reload.
async fn listen(target: Target, tls: MakeRustlsConnect, changes: Arc<Listener>) {
    loop {
        match target.config.connect(tls.clone()).await {
            Ok((client, mut conn)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                        match m {
                            Ok(AsyncMessage::Notification(_)) => {
                                if tx.send(()).is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "the database change listener lost its connection");
                                break;
                            }
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => {
                        changes.listening.store(true, Relaxed);
                        // Changes made while not listening: read them now.
                        changes.notify.notify_one();
                        while rx.recv().await.is_some() {
                            changes.notify.notify_one();
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot listen for database changes"),
                }
                changes.listening.store(false, Relaxed);
                driver.abort();
            }
            Err(e) => {
                tracing::debug!(error = %describe_error(&e), "the database change listener cannot connect");
            }
        }
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_their_password_out_of_messages_and_tls_depends_on_the_host() {
        let (t, root) = Target::parse(
            "postgres://gw:s3cret@127.0.0.1:5432/touchgate?sslmode=disable&sslrootcert=/ca.pem",
            None,
        )
        .expect("loopback, plain");
        assert!(!t.tls);
        assert_eq!(root, Some(PathBuf::from("/ca.pem")));
        assert!(!t.to_string().contains("s3cret"), "{t}");
        assert_eq!(t.config.get_password(), Some(&b"s3cret"[..]));

        let (t, _) = Target::parse("postgresql://gw@db.internal/touchgate", None).expect("remote");
        assert!(t.tls, "TLS is on for another machine by default");

        let e = Target::parse("postgres://gw@db.internal/touchgate?sslmode=disable", None)
            .expect_err("plain to another machine");
        assert!(e.contains("in the clear"), "{e}");
        let e = Target::parse("postgres://db.internal/touchgate", None).expect_err("no user");
        assert!(e.contains("no user"), "{e}");
        let e = Target::parse("postgres://gw@db/x?sslmode=sometimes", None).expect_err("mode");
        assert!(e.contains("sometimes"), "{e}");
    }

    /// Plain PostgreSQL only to this machine, decided by where the connection really goes.
    #[test]
    fn only_this_machine_may_be_reached_without_tls() {
        for url in [
            "postgres://gw@127.0.0.1/db",
            "postgres://gw@localhost:5433/db",
            "postgres://gw@[::1]/db",
            "postgres://gw@%2Frun%2Fcloudsql/db",
        ] {
            let (t, _) = Target::parse(url, None).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(!t.tls, "{url} is this machine");
        }
        for url in [
            // A name under .localhost goes to DNS here, not to loopback.
            "postgres://gw@db.localhost/db",
            // hostaddr is where the connection goes, whatever the name.
            "postgres://gw@localhost/db?hostaddr=203.0.113.5",
            "postgres:///db?user=gw&hostaddr=203.0.113.5",
        ] {
            if let Ok((t, _)) = Target::parse(url, None) {
                assert!(t.tls, "{url} is not this machine");
            }
            let plain = format!(
                "{url}{}sslmode=disable",
                if url.contains('?') { '&' } else { '?' }
            );
            let e = Target::parse(&plain, None).expect_err("plain to another machine");
            assert!(
                e.contains("in the clear") || e.contains("no user"),
                "{plain}: {e}"
            );
        }
    }

    #[test]
    fn a_password_given_as_a_parameter_is_masked_too() {
        let (t, _) = Target::parse(
            "postgres://gw@127.0.0.1/db?password=hunter2&application_name=x",
            None,
        )
        .expect("parse");
        assert!(!t.to_string().contains("hunter2"), "{t}");
        assert_eq!(t.config.get_password(), Some(&b"hunter2"[..]));
    }

    #[test]
    fn the_password_comes_from_its_file_when_the_url_has_none() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").expect("write");
        let (t, _) =
            Target::parse("postgres://gw@localhost/touchgate", Some(&file)).expect("parse");
        assert_eq!(t.config.get_password(), Some(&b"from-file"[..]));
    }
}

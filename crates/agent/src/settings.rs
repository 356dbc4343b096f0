//! The agent's settings in layers: the user's config file, with the admin's managed config
//! merged over it. Managed keys win and are locked: both front ends show them as set by the
//! organisation, and a save that changes one is refused.
//!
//! Merge rules: a top-level key in the managed file replaces the user's and locks that key.
//! Services merge by name: a managed `[[service]]` replaces the user's entry of that name and
//! locks it (`service.NAME`). `allow_user_services = false` in the managed file drops the
//! user's own services and locks the list (`services`).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use ts_rs::TS;

use crate::config::{AgentConfig, ConfigError, resolve_relative_paths};

mod fields;

/// The managed-file key that says whether users may add services of their own.
pub const ALLOW_USER_SERVICES: &str = "allow_user_services";

/// The lock name of the service list itself (adding and removing services).
pub const SERVICES_LOCK: &str = "services";

/// Where the two layers live.
#[derive(Debug, Clone)]
pub struct ConfigPaths {
    /// The user's config file (it may not exist yet).
    pub user: PathBuf,
    /// The admin's managed file, when this platform has one (it may not exist).
    pub managed: Option<PathBuf>,
}

impl ConfigPaths {
    /// The platform's places: the user's config folder, and the managed file
    /// (`/etc/touchgate/managed.toml` on Linux, `/Library/Application Support/touchgate/managed.toml`
    /// on macOS, `%ProgramData%\touchgate\managed.toml` on Windows).
    pub fn platform() -> Result<Self, ConfigError> {
        Ok(Self {
            user: AgentConfig::default_path()?,
            managed: managed_path(),
        })
    }

    /// A user config at `user` with the platform's managed file over it.
    pub fn with_user(user: PathBuf) -> Self {
        Self {
            user,
            managed: managed_path(),
        }
    }

    /// Where the tray app writes the grants the user makes: `grants/` beside the user's
    /// config file (made with mode 0700; each file is 0600).
    pub fn grants_dir(&self) -> PathBuf {
        self.user
            .parent()
            .map_or_else(|| PathBuf::from("grants"), |d| d.join("grants"))
    }
}

/// The platform's managed config path.
pub fn managed_path() -> Option<PathBuf> {
    if cfg!(target_os = "macos") {
        Some(PathBuf::from(
            "/Library/Application Support/touchgate/managed.toml",
        ))
    } else if cfg!(windows) {
        std::env::var_os("ProgramData")
            .map(|d| PathBuf::from(d).join("touchgate").join("managed.toml"))
    } else {
        Some(PathBuf::from("/etc/touchgate/managed.toml"))
    }
}

/// One service as the settings window edits it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, TS)]
pub struct ServiceSetting {
    /// The gateway's name for the service.
    pub name: String,
    /// The port on 127.0.0.1 (0 picks a free one at each sign-in).
    pub local_port: u16,
    /// Host names besides the loopback ones that browsers may use for it (`allowed_hosts`).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Web origins besides the port's own that may call it from a browser (`allowed_origins`).
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

/// The values a user can edit (unless the organisation set them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, TS)]
pub struct Settings {
    /// Gateway address, `host:port`; the addresses of several replicas separated by commas
    /// (a list in the file).
    pub gateway: String,
    /// The gateway certificate's SHA-256 fingerprint (empty: none, a CA file is used).
    pub gateway_cert_sha256: String,
    /// The user, as enrolled.
    pub user: String,
    /// `hid`, or `soft:PATH`.
    pub authenticator: String,
    /// End the session when the key is unplugged.
    pub lock_on_key_removal: bool,
    /// Start the tray app at login.
    pub autostart: bool,
    /// Ask for a touch as soon as the tray app starts.
    pub sign_in_on_launch: bool,
    /// Minutes before the session ends that the warning comes.
    pub renew_reminder_minutes: u32,
    /// The WebAuthn relying party the agent signs for (empty: the gateway's TLS name).
    #[serde(default)]
    pub rp_id: String,
    /// Serve local connections from other OS users of this machine too (Linux checks).
    #[serde(default)]
    pub allow_other_users: bool,
    /// The port that serves every web service by name at `http://NAME.localhost:PORT/`
    /// (0: off).
    #[serde(default)]
    pub router_port: u16,
    /// How the gateway is reached: `auto`, `quic` or `tcp`.
    #[serde(default = "auto")]
    pub transport: String,
    /// The HTTP proxy for the TCP carrier, `http://host:port` (empty: `HTTPS_PROXY`).
    #[serde(default)]
    pub proxy: String,
    /// Services and their local ports.
    pub services: Vec<ServiceSetting>,
}

fn auto() -> String {
    "auto".into()
}

/// The settings with what the organisation fixed, for the front ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS)]
pub struct SettingsView {
    /// The merged values.
    pub values: Settings,
    /// Keys set by the managed config: config keys (`gateway`, `renew_reminder`, …),
    /// `service.NAME` for a managed service, and `services` when users may not add their own.
    pub locked: Vec<String>,
    /// The managed file in force, if any.
    pub managed_file: Option<String>,
    /// The user's config file.
    pub user_file: String,
    /// Why the merged config cannot be used yet (first start, a missing value), in words.
    pub problem: Option<String>,
}

/// Errors saving settings.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The change touches a key the organisation set.
    #[error("{0} is set by your organisation and cannot be changed here")]
    Locked(String),
    /// The new values do not make a working config.
    #[error("{0}")]
    Invalid(String),
    /// The file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Both layers, read and merged.
#[derive(Debug, Clone)]
pub struct Layered {
    paths: ConfigPaths,
    user_text: String,
    managed: Option<(PathBuf, String)>,
    merged: toml::Table,
    locked: BTreeSet<String>,
}

impl Layered {
    /// Reads both files (a missing file is an empty layer) and merges them.
    pub fn load(paths: &ConfigPaths) -> Result<Self, ConfigError> {
        let user_text = read_optional(&paths.user)?.unwrap_or_default();
        let managed = match &paths.managed {
            Some(p) => read_optional(p)?.map(|text| (p.clone(), text)),
            None => None,
        };
        Self::from_texts(paths, user_text, managed)
    }

    fn from_texts(
        paths: &ConfigPaths,
        user_text: String,
        managed: Option<(PathBuf, String)>,
    ) -> Result<Self, ConfigError> {
        let mut user = parse(&paths.user, &user_text)?;
        resolve_relative_paths(&mut user, parent(&paths.user));
        let managed_table = match &managed {
            Some((p, text)) => {
                let mut t = parse(p, text)?;
                resolve_relative_paths(&mut t, parent(p));
                Some(t)
            }
            None => None,
        };
        let (merged, locked) = merge(user, managed_table);
        Ok(Self {
            paths: paths.clone(),
            user_text,
            managed,
            merged,
            locked,
        })
    }

    /// The merged config, checked.
    pub fn config(&self) -> Result<AgentConfig, ConfigError> {
        let cfg =
            AgentConfig::from_table(self.merged.clone()).map_err(|source| ConfigError::Parse {
                path: self.paths.user.clone(),
                source: Box::new(source),
            })?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Whether `key` (see [`SettingsView::locked`]) is set by the organisation.
    pub fn is_locked(&self, key: &str) -> bool {
        self.locked.contains(key)
    }

    /// The keys set by the organisation.
    pub fn locked(&self) -> impl Iterator<Item = &str> {
        self.locked.iter().map(String::as_str)
    }

    /// The settings for the front ends.
    pub fn view(&self) -> SettingsView {
        let mut values = self.values();
        // A proxy's password is not shown: the window (and whoever looks at it) sees a mask,
        // which a save puts back as it was.
        values.proxy = mask_password(&values.proxy);
        SettingsView {
            values,
            locked: self.locked.iter().cloned().collect(),
            managed_file: self.managed.as_ref().map(|(p, _)| p.display().to_string()),
            user_file: self.paths.user.display().to_string(),
            problem: self.config().err().map(|e| e.to_string()),
        }
    }

    fn values(&self) -> Settings {
        let t = &self.merged;
        let mut values = fields::read(t);
        values.services = services_of(t)
            .iter()
            .filter_map(|v| {
                let list = |k: &str| {
                    v.get(k)
                        .and_then(|l| l.as_array())
                        .map(|l| {
                            l.iter()
                                .filter_map(|x| x.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                Some(ServiceSetting {
                    name: v.get("name")?.as_str()?.to_owned(),
                    local_port: u16::try_from(v.get("local_port")?.as_integer()?).ok()?,
                    allowed_hosts: list("allowed_hosts"),
                    allowed_origins: list("allowed_origins"),
                })
            })
            .collect();
        values
    }

    /// Writes `new` to the user's file, keeping its comments and layout; refuses any change
    /// to a locked key, and any set of values that would not make a working config (the file
    /// is left as it was). Returns the reloaded layers.
    pub fn save(&self, new: &Settings) -> Result<Layered, SaveError> {
        let old = self.values();
        let mut new = new.clone();
        new.proxy = unmask_password(&new.proxy, &old.proxy);
        let new = &new;
        let mut doc: toml_edit::DocumentMut = self
            .user_text
            .parse()
            .map_err(|e: toml_edit::TomlError| SaveError::Invalid(e.to_string()))?;
        fields::write(&mut doc, &old, new, |key| self.is_locked(key))?;
        self.set_services(&mut doc, &old.services, &new.services)?;

        let text = doc.to_string();
        let candidate = Layered::from_texts(&self.paths, text.clone(), self.managed.clone())
            .map_err(|e| SaveError::Invalid(e.to_string()))?;
        if let Err(e) = candidate.config() {
            return Err(SaveError::Invalid(e.to_string()));
        }
        write_atomically(&self.paths.user, text.as_bytes()).map_err(|source| SaveError::Write {
            path: self.paths.user.clone(),
            source,
        })?;
        Ok(candidate)
    }

    fn set_services(
        &self,
        doc: &mut toml_edit::DocumentMut,
        old: &[ServiceSetting],
        new: &[ServiceSetting],
    ) -> Result<(), SaveError> {
        if old == new {
            return Ok(());
        }
        let names = |l: &[ServiceSetting]| l.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        if self.is_locked(SERVICES_LOCK) {
            let (mut a, mut b) = (names(old), names(new));
            a.sort();
            b.sort();
            if a != b {
                return Err(SaveError::Locked("the list of services".into()));
            }
        }
        for o in old {
            let key = format!("service.{}", o.name);
            if self.is_locked(&key) && !new.contains(o) {
                return Err(SaveError::Locked(format!("service {}", o.name)));
            }
        }
        let mut seen = BTreeSet::new();
        let mut list = toml_edit::ArrayOfTables::new();
        for s in new {
            if !seen.insert(s.name.as_str()) {
                return Err(SaveError::Invalid(format!(
                    "service {:?} is listed twice",
                    s.name
                )));
            }
            if self.is_locked(&format!("service.{}", s.name)) {
                continue;
            }
            let mut t = toml_edit::Table::new();
            t["name"] = toml_edit::value(s.name.as_str());
            t["local_port"] = toml_edit::value(i64::from(s.local_port));
            for (key, values) in [
                ("allowed_hosts", &s.allowed_hosts),
                ("allowed_origins", &s.allowed_origins),
            ] {
                if !values.is_empty() {
                    t[key] = toml_edit::value(values.iter().collect::<toml_edit::Array>());
                }
            }
            list.push(t);
        }
        if list.is_empty() {
            doc.remove("service");
        } else {
            doc["service"] = toml_edit::Item::ArrayOfTables(list);
        }
        Ok(())
    }
}

/// Checks an admin's managed file the way the agent reads it, before it is shipped: it must
/// parse, hold only keys the agent knows, and make a working config with any user's name.
/// Returns the keys it locks.
pub fn check_managed(path: &Path) -> Result<Vec<String>, ConfigError> {
    let text = read_optional(path)?.ok_or_else(|| ConfigError::Read {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
    })?;
    let mut user = toml::Table::new();
    user.insert(
        "user".into(),
        toml::Value::String("someone@example.com".into()),
    );
    let mut managed = parse(path, &text)?;
    resolve_relative_paths(&mut managed, parent(path));
    let (merged, locked) = merge(user, Some(managed));
    let cfg = AgentConfig::from_table(merged).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    cfg.check()?;
    Ok(locked.into_iter().collect())
}

fn parent(p: &Path) -> &Path {
    p.parent().unwrap_or(Path::new("."))
}

fn read_optional(path: &Path) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConfigError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn parse(path: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

fn services_of(t: &toml::Table) -> Vec<toml::Table> {
    t.get("service")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_table().cloned()).collect())
        .unwrap_or_default()
}

fn service_name(t: &toml::Table) -> Option<&str> {
    t.get("name").and_then(|v| v.as_str())
}

/// Merges `managed` over `user`; returns the merged table and the locked keys.
fn merge(mut user: toml::Table, managed: Option<toml::Table>) -> (toml::Table, BTreeSet<String>) {
    let mut locked = BTreeSet::new();
    let Some(mut managed) = managed else {
        return (user, locked);
    };
    let allow_user_services = managed
        .remove(ALLOW_USER_SERVICES)
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let managed_services = services_of(&managed);
    managed.remove("service");
    let mut services = if allow_user_services {
        services_of(&user)
    } else {
        locked.insert(SERVICES_LOCK.to_owned());
        Vec::new()
    };
    for m in managed_services {
        let Some(name) = service_name(&m).map(str::to_owned) else {
            continue;
        };
        services.retain(|u| service_name(u) != Some(name.as_str()));
        locked.insert(format!("service.{name}"));
        services.push(m);
    }
    for (k, v) in managed {
        locked.insert(k.clone());
        user.insert(k, v);
    }
    if services.is_empty() {
        user.remove("service");
    } else {
        user.insert(
            "service".into(),
            toml::Value::Array(services.into_iter().map(toml::Value::Table).collect()),
        );
    }
    (user, locked)
}

/// What a proxy's password is shown as.
const MASK: &str = "********";

/// `proxy` with its password (if any) shown as [`MASK`].
fn mask_password(proxy: &str) -> String {
    match url::Url::parse(proxy) {
        Ok(mut u) if u.password().is_some() => {
            if u.set_password(Some(MASK)).is_err() {
                return String::new();
            }
            u.to_string()
        }
        _ => proxy.to_owned(),
    }
}

/// `new` as the user meant it: the mask left in place stands for `old`'s password.
fn unmask_password(new: &str, old: &str) -> String {
    if new == mask_password(old) {
        return old.to_owned();
    }
    let (Ok(mut n), Ok(o)) = (url::Url::parse(new), url::Url::parse(old)) else {
        return new.to_owned();
    };
    match (n.password(), o.password()) {
        (Some(MASK), Some(p)) => {
            let p = p.to_owned();
            if n.set_password(Some(&p)).is_err() {
                return new.to_owned();
            }
            n.to_string()
        }
        _ => new.to_owned(),
    }
}

/// Writes the user's file in one step, readable by its owner only: it may hold a proxy's
/// password (`proxy = "http://user:password@…"`).
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("toml.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    std::io::Write::write_all(&mut options.open(&tmp)?, bytes)?;
    #[cfg(unix)]
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "abababababababababababababababababababababababababababababababab";

    fn layers(user: &str, managed: Option<&str>) -> (tempfile::TempDir, ConfigPaths) {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = ConfigPaths {
            user: dir.path().join("user/agent.toml"),
            managed: Some(dir.path().join("etc/managed.toml")),
        };
        std::fs::create_dir_all(dir.path().join("user")).expect("mkdir");
        std::fs::write(&paths.user, user).expect("write user");
        if let Some(m) = managed {
            std::fs::create_dir_all(dir.path().join("etc")).expect("mkdir");
            std::fs::write(paths.managed.as_ref().expect("managed"), m).expect("write managed");
        }
        (dir, paths)
    }

    const USER: &str = "# my own settings\ngateway = \"old.example.com:4433\"\nuser = \"alice\"\n\
        authenticator = \"soft:key.tgk\"\n\n# the API, where my tools expect it\n[[service]]\nname = \"api\"\nlocal_port = 1000\n\n\
        [[service]]\nname = \"mine\"\nlocal_port = 1001\n";

    fn managed(extra: &str) -> String {
        format!(
            "gateway = \"gw.corp.example:4433\"\ngateway_cert_sha256 = \"{PIN}\"\n{extra}\n[[service]]\nname = \"api\"\nlocal_port = 8081\n"
        )
    }

    #[test]
    fn managed_keys_win_and_are_locked() {
        let (_dir, paths) = layers(USER, Some(&managed("lock_on_key_removal = true")));
        let l = Layered::load(&paths).expect("load");
        let cfg = l.config().expect("config");
        assert_eq!(cfg.gateway, "gw.corp.example:4433".into());
        assert!(cfg.lock_on_key_removal);
        let ports: Vec<_> = cfg
            .services
            .iter()
            .map(|s| (s.name.as_str(), s.local_port))
            .collect();
        assert_eq!(ports, [("mine", 1001), ("api", 8081)]);
        let locked: Vec<_> = l.locked().collect();
        assert_eq!(
            locked,
            [
                "gateway",
                "gateway_cert_sha256",
                "lock_on_key_removal",
                "service.api"
            ]
        );
        let view = l.view();
        assert_eq!(view.problem, None);
        assert!(
            view.managed_file
                .expect("managed")
                .ends_with("managed.toml")
        );
        // The soft key path is taken from the user's folder, not the managed one.
        assert_eq!(
            cfg.authenticator,
            format!(
                "soft:{}",
                paths.user.parent().expect("dir").join("key.tgk").display()
            )
        );
    }

    #[test]
    fn a_save_that_touches_a_managed_key_is_refused_and_loses_nothing() {
        let (_dir, paths) = layers(USER, Some(&managed("")));
        let l = Layered::load(&paths).expect("load");
        let mut s = l.view().values;
        s.gateway = "evil.example.com:4433".into();
        let e = l.save(&s).expect_err("locked");
        assert_eq!(
            e.to_string(),
            "gateway is set by your organisation and cannot be changed here"
        );
        let mut s = l.view().values;
        s.services.iter_mut().for_each(|s| s.local_port = 9999);
        let e = l.save(&s).expect_err("locked");
        assert!(
            e.to_string()
                .starts_with("service api is set by your organisation"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&paths.user).expect("read"), USER);
    }

    #[test]
    fn a_save_keeps_the_users_comments_and_changes_only_what_changed() {
        let (_dir, paths) = layers(USER, Some(&managed("")));
        let l = Layered::load(&paths).expect("load");
        let mut s = l.view().values;
        s.services
            .iter_mut()
            .filter(|s| s.name == "mine")
            .for_each(|s| s.local_port = 2002);
        s.renew_reminder_minutes = 15;
        let saved = l.save(&s).expect("save");
        let text = std::fs::read_to_string(&paths.user).expect("read");
        assert!(text.starts_with("# my own settings\n"), "{text}");
        assert!(text.contains("renew_reminder = \"15m\""), "{text}");
        assert!(text.contains("local_port = 2002"), "{text}");
        // The user's own value for the managed service stays in their file, unused.
        assert!(
            text.contains("gateway = \"old.example.com:4433\""),
            "{text}"
        );
        let cfg = saved.config().expect("config");
        assert_eq!(cfg.renew_reminder, std::time::Duration::from_secs(900));
        assert!(
            cfg.services
                .iter()
                .any(|s| s.name == "mine" && s.local_port == 2002)
        );
    }

    #[test]
    fn without_user_services_the_list_is_the_organisations() {
        let (_dir, paths) = layers(USER, Some(&managed("allow_user_services = false")));
        let l = Layered::load(&paths).expect("load");
        let names: Vec<_> = l
            .config()
            .expect("config")
            .services
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["api"]);
        assert!(l.is_locked(SERVICES_LOCK));
        let mut s = l.view().values;
        s.services.push(ServiceSetting {
            name: "extra".into(),
            local_port: 3000,
            ..Default::default()
        });
        let e = l.save(&s).expect_err("locked");
        assert!(
            e.to_string()
                .starts_with("the list of services is set by your organisation"),
            "{e}"
        );
    }

    #[test]
    fn browser_access_and_other_users_flow_through_the_layers_and_lock() {
        let managed = format!(
            "gateway = \"gw.corp.example:4433\"\ngateway_cert_sha256 = \"{PIN}\"\nallow_other_users = false\nrp_id = \"gw.corp.example\"\n\
             [[service]]\nname = \"api\"\nlocal_port = 8081\nallowed_origins = [\"http://localhost:3000\"]\n"
        );
        let user = format!("{USER}allowed_hosts = [\"mine.test\"]\n");
        let (_dir, paths) = layers(&user, Some(&managed));
        let l = Layered::load(&paths).expect("load");
        let cfg = l.config().expect("config");
        let api = cfg.services.iter().find(|s| s.name == "api").expect("api");
        assert_eq!(api.allowed_origins, ["http://localhost:3000"]);
        let mine = cfg
            .services
            .iter()
            .find(|s| s.name == "mine")
            .expect("mine");
        assert_eq!(mine.allowed_hosts, ["mine.test"]);
        assert!(!cfg.allow_other_users);
        assert_eq!(cfg.rp_id(), "gw.corp.example");
        for key in ["allow_other_users", "rp_id", "service.api"] {
            assert!(l.is_locked(key), "{key} is not locked");
        }
        let view = l.view().values;
        let api = view.services.iter().find(|s| s.name == "api").expect("api");
        assert_eq!(api.allowed_origins, ["http://localhost:3000"]);

        // The organisation's choices cannot be changed; the user's own lists are saved.
        let mut s = view.clone();
        s.allow_other_users = true;
        let e = l.save(&s).expect_err("locked").to_string();
        assert!(
            e.starts_with("allow_other_users is set by your organisation"),
            "{e}"
        );
        let mut s = view.clone();
        s.services
            .iter_mut()
            .filter(|s| s.name == "api")
            .for_each(|s| s.allowed_origins.push("http://evil.example".into()));
        let e = l.save(&s).expect_err("locked").to_string();
        assert!(
            e.starts_with("service api is set by your organisation"),
            "{e}"
        );
        let mut s = view;
        s.services
            .iter_mut()
            .filter(|s| s.name == "mine")
            .for_each(|s| s.allowed_origins = vec!["http://localhost:5173".into()]);
        let saved = l.save(&s).expect("save").config().expect("config");
        let mine = saved
            .services
            .iter()
            .find(|s| s.name == "mine")
            .expect("mine");
        assert_eq!(mine.allowed_origins, ["http://localhost:5173"]);
        assert_eq!(mine.allowed_hosts, ["mine.test"]);
        // A bad value is refused and not written.
        let mut s = l.view().values;
        s.services
            .iter_mut()
            .filter(|s| s.name == "mine")
            .for_each(|s| s.allowed_origins = vec!["localhost:5173".into()]);
        let e = l.save(&s).expect_err("invalid").to_string();
        assert!(e.contains("does not start with http:// or https://"), "{e}");
    }

    fn repo(file: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(file)
    }

    #[test]
    fn the_shipped_managed_example_checks_and_locks_what_it_sets() {
        let locked = check_managed(&repo("packaging/managed/org.example.toml")).expect("example");
        for key in [
            "gateway",
            "gateway_cert_sha256",
            "autostart",
            "renew_reminder",
            "services",
            "service.api",
            "service.billing",
            "rp_id",
            "allow_other_users",
        ] {
            assert!(
                locked.iter().any(|l| l == key),
                "{key} not locked: {locked:?}"
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "gateway = \"gw:4433\"\ngatway_cert_sha256 = \"ab\"\n")
            .expect("write");
        let e = check_managed(&bad).expect_err("unknown key").to_string();
        assert!(e.contains("unknown field `gatway_cert_sha256`"), "{e}");
    }

    #[test]
    fn the_organisation_can_set_a_list_of_gateways() {
        let (_dir, paths) = layers(
            "gateway = \"mine.example.com:4433\"\nuser = \"alice\"\n",
            Some(&format!(
                "gateway = [\"gw-a.corp.example:4433\", \"gw-b.corp.example:4433\"]\nrp_id = \"corp.example\"\ngateway_cert_sha256 = \"{PIN}\"\n"
            )),
        );
        let l = Layered::load(&paths).expect("load");
        let cfg = l.config().expect("config");
        assert_eq!(
            cfg.gateway.iter().collect::<Vec<_>>(),
            ["gw-a.corp.example:4433", "gw-b.corp.example:4433"]
        );
        assert!(l.is_locked("gateway"));
        let view = l.view();
        assert_eq!(
            view.values.gateway,
            "gw-a.corp.example:4433, gw-b.corp.example:4433"
        );
        // Saving other settings leaves the organisation's list alone.
        let mut s = view.values.clone();
        s.autostart = true;
        l.save(&s).expect("save").config().expect("config");
        s.gateway = "gw-a.corp.example:4433".into();
        let e = l.save(&s).expect_err("locked").to_string();
        assert!(e.contains("gateway is set by your organisation"), "{e}");
    }

    /// The JSON Schema shipped for admins names exactly the keys the agent reads from a managed
    /// file, with example values the agent accepts.
    #[test]
    fn the_managed_schema_matches_what_the_agent_reads() {
        let schema: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(repo("packaging/managed/managed.schema.json"))
                .expect("schema"),
        )
        .expect("json");
        let props = schema["properties"].as_object().expect("properties");
        let mut managed = toml::Table::new();
        for (key, p) in props {
            let example = &p["examples"][0];
            let value: toml::Value = serde_json::from_value(example.clone()).expect("toml value");
            managed.insert(key.clone(), value);
        }
        // The fingerprint and the CA are alternatives; the example has both, which the agent allows.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("managed.toml");
        std::fs::write(&file, toml::to_string(&managed).expect("toml")).expect("write");
        let locked = check_managed(&file).expect("every schema key is accepted");
        assert!(locked.len() >= props.len() - 1, "{locked:?}");
        let example: toml::Table = toml::from_str(
            &std::fs::read_to_string(repo("packaging/managed/org.example.toml")).expect("example"),
        )
        .expect("toml");
        for key in example.keys() {
            assert!(props.contains_key(key), "the schema lacks {key}");
        }
        let item = &props["service"]["items"]["properties"];
        for key in ["name", "local_port", "allowed_hosts", "allowed_origins"] {
            assert!(item.get(key).is_some(), "the schema's service lacks {key}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_saved_file_is_for_its_owner_only_as_it_may_hold_a_proxy_password() {
        use std::os::unix::fs::PermissionsExt as _;
        let (_dir, paths) = layers(
            &format!(
                "gateway = \"gw.example.com:4433\"\nuser = \"alice\"\ngateway_cert_sha256 = \"{PIN}\"\n"
            ),
            None,
        );
        let l = Layered::load(&paths).expect("load");
        let mut s = l.view().values;
        s.proxy = "http://alice:s3cret@proxy.example.com:3128".into();
        l.save(&s).expect("save");
        let mode = std::fs::metadata(&paths.user)
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert!(
            std::fs::read_to_string(&paths.user)
                .expect("read")
                .contains("proxy = \"http://alice:s3cret@proxy.example.com:3128\"")
        );
    }

    #[test]
    fn a_proxy_password_is_masked_in_the_view_and_kept_by_a_save() {
        let (_dir, paths) = layers(
            &format!(
                "gateway = \"gw.example.com:4433\"\nuser = \"alice\"\ngateway_cert_sha256 = \"{PIN}\"\nproxy = \"http://alice:s3cret@proxy.example.com:3128\"\n"
            ),
            None,
        );
        let l = Layered::load(&paths).expect("load");
        let mut s = l.view().values;
        assert_eq!(s.proxy, "http://alice:********@proxy.example.com:3128/");
        // Saved untouched (another field changed): the password is as it was.
        s.user = "alice2".into();
        let l = l.save(&s).expect("save");
        let text = std::fs::read_to_string(&paths.user).expect("read");
        assert!(
            text.contains("proxy = \"http://alice:s3cret@proxy.example.com:3128\""),
            "{text}"
        );
        // Another host with the mask left in: the same password, at the new host.
        let mut s = l.view().values;
        s.proxy = "http://alice:********@proxy2.example.com:3128".into();
        let l = l.save(&s).expect("save");
        assert!(
            std::fs::read_to_string(&paths.user)
                .expect("read")
                .contains("proxy = \"http://alice:s3cret@proxy2.example.com:3128/\"")
        );
        // A new password replaces it; an address without one has none.
        let mut s = l.view().values;
        s.proxy = "http://bob:hunter2@proxy.example.com:3128".into();
        let l = l.save(&s).expect("save");
        assert!(
            std::fs::read_to_string(&paths.user)
                .expect("read")
                .contains("bob:hunter2@")
        );
        let mut s = l.view().values;
        s.proxy = "http://proxy.example.com:3128".into();
        l.save(&s).expect("save");
        let text = std::fs::read_to_string(&paths.user).expect("read");
        assert!(
            text.contains("proxy = \"http://proxy.example.com:3128\""),
            "{text}"
        );
    }

    #[test]
    fn a_first_start_without_files_says_what_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = ConfigPaths {
            user: dir.path().join("agent.toml"),
            managed: Some(dir.path().join("none.toml")),
        };
        let l = Layered::load(&paths).expect("load");
        let problem = l.view().problem.expect("a problem");
        assert!(problem.contains("gateway"), "{problem}");
        // An invalid save is refused and writes nothing.
        let mut s = l.view().values;
        s.gateway = "gw.example.com:4433".into();
        s.user = "alice".into();
        let e = l.save(&s).expect_err("no pin");
        assert!(e.to_string().contains("gateway_cert_sha256"), "{e}");
        assert!(!paths.user.exists());
        s.gateway_cert_sha256 = PIN.into();
        l.save(&s).expect("save").config().expect("config");
        assert!(paths.user.exists());
    }
}

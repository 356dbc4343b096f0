//! The one place where [`Settings`] and the keys of the TOML file are matched: each setting
//! but the services, with its key, how it is written and its default, for reading the layers
//! and for saving.

use super::{SaveError, Settings};

/// The settings' values from a merged table (the services are read by the caller).
pub(super) fn read(t: &toml::Table) -> Settings {
    let mut values = Settings::default();
    for f in FIELDS {
        let v = t.get(f.key);
        match f.kind {
            Kind::Text(at, default) => {
                *at(&mut values) = v.and_then(|v| v.as_str()).unwrap_or(default).to_owned();
            }
            Kind::Addresses(at) => *at(&mut values) = v.map(read_addresses).unwrap_or_default(),
            Kind::Flag(at) => *at(&mut values) = v.and_then(|v| v.as_bool()).unwrap_or(false),
            Kind::Port(at) => {
                *at(&mut values) = v
                    .and_then(|v| v.as_integer())
                    .and_then(|p| u16::try_from(p).ok())
                    .unwrap_or(0);
            }
            Kind::Minutes(at, default) => {
                *at(&mut values) = v
                    .and_then(|v| v.as_str())
                    .and_then(|v| humantime::parse_duration(v).ok())
                    .map(|d| (d.as_secs() / 60) as u32)
                    .unwrap_or(default);
            }
        }
    }
    values
}

/// Writes into `doc` each setting that differs between `old` and `new`; refuses a change to a
/// key `locked` says the organisation set. An empty optional value leaves no key.
pub(super) fn write(
    doc: &mut toml_edit::DocumentMut,
    old: &Settings,
    new: &Settings,
    locked: impl Fn(&str) -> bool,
) -> Result<(), SaveError> {
    let (mut old, mut new) = (old.clone(), new.clone());
    for f in FIELDS {
        let value: toml_edit::Value = match f.kind {
            Kind::Text(at, _) if at(&mut old) != at(&mut new) => at(&mut new).as_str().into(),
            Kind::Addresses(at) if at(&mut old) != at(&mut new) => write_addresses(at(&mut new)),
            Kind::Flag(at) if at(&mut old) != at(&mut new) => (*at(&mut new)).into(),
            Kind::Port(at) if at(&mut old) != at(&mut new) => i64::from(*at(&mut new)).into(),
            Kind::Minutes(at, _) if at(&mut old) != at(&mut new) => {
                format!("{}m", at(&mut new)).into()
            }
            _ => continue,
        };
        if locked(f.key) {
            return Err(SaveError::Locked(f.key.to_owned()));
        }
        doc[f.key] = toml_edit::value(value);
    }
    for f in FIELDS.iter().filter(|f| f.optional) {
        let v = doc.get(f.key);
        if v.and_then(|v| v.as_str()) == Some("") || v.and_then(|v| v.as_integer()) == Some(0) {
            doc.remove(f.key);
        }
    }
    Ok(())
}

/// Each setting but the services, in the order the file is written.
const FIELDS: &[Field] = &[
    Field {
        key: "gateway",
        kind: Kind::Addresses(|s| &mut s.gateway),
        optional: false,
    },
    Field::optional("gateway_cert_sha256", |s| &mut s.gateway_cert_sha256),
    Field::text("user", |s| &mut s.user),
    Field {
        key: "authenticator",
        kind: Kind::Text(|s| &mut s.authenticator, "hid"),
        optional: false,
    },
    Field::flag("lock_on_key_removal", |s| &mut s.lock_on_key_removal),
    Field::flag("autostart", |s| &mut s.autostart),
    Field::flag("sign_in_on_launch", |s| &mut s.sign_in_on_launch),
    Field {
        key: "renew_reminder",
        kind: Kind::Minutes(|s| &mut s.renew_reminder_minutes, 10),
        optional: false,
    },
    Field::optional("rp_id", |s| &mut s.rp_id),
    Field::flag("allow_other_users", |s| &mut s.allow_other_users),
    Field {
        key: "router_port",
        kind: Kind::Port(|s| &mut s.router_port),
        optional: true,
    },
    Field {
        key: "transport",
        kind: Kind::Text(|s| &mut s.transport, "auto"),
        optional: false,
    },
    Field::optional("proxy", |s| &mut s.proxy),
];

/// One setting and its TOML key.
struct Field {
    key: &'static str,
    kind: Kind,
    /// Saved as no key at all when empty.
    optional: bool,
}

/// How a setting is written in TOML, where it is in [`Settings`], and its default.
enum Kind {
    /// A string.
    Text(fn(&mut Settings) -> &mut String, &'static str),
    /// One `host:port` or a list of them in the file; in the settings one text, the
    /// addresses separated by commas.
    Addresses(fn(&mut Settings) -> &mut String),
    /// A boolean (default false).
    Flag(fn(&mut Settings) -> &mut bool),
    /// A humantime duration in the file, whole minutes in the settings.
    Minutes(fn(&mut Settings) -> &mut u32, u32),
    /// A TCP port (default 0: off).
    Port(fn(&mut Settings) -> &mut u16),
}

/// `"gw:443"`, or `["gw-a:443", "gw-b:443"]` as `gw-a:443, gw-b:443`.
fn read_addresses(v: &toml::Value) -> String {
    match v {
        toml::Value::Array(list) => list
            .iter()
            .filter_map(|a| a.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        other => other.as_str().unwrap_or_default().to_owned(),
    }
}

/// One address as a string, several (separated by commas) as a list.
fn write_addresses(text: &str) -> toml_edit::Value {
    let list: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    match list.as_slice() {
        [one] => (*one).into(),
        _ if !text.contains(',') => text.into(),
        many => many.iter().copied().collect::<toml_edit::Array>().into(),
    }
}

impl Field {
    const fn text(key: &'static str, at: fn(&mut Settings) -> &mut String) -> Self {
        Self {
            key,
            kind: Kind::Text(at, ""),
            optional: false,
        }
    }

    const fn optional(key: &'static str, at: fn(&mut Settings) -> &mut String) -> Self {
        Self {
            key,
            kind: Kind::Text(at, ""),
            optional: true,
        }
    }

    const fn flag(key: &'static str, at: fn(&mut Settings) -> &mut bool) -> Self {
        Self {
            key,
            kind: Kind::Flag(at),
            optional: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is saved is what is read back, key for key, for every setting.
    #[test]
    fn every_setting_is_read_back_as_it_was_written() {
        let values = Settings {
            gateway: "gw.example.com:4433".into(),
            gateway_cert_sha256: "ab".repeat(32),
            user: "alice".into(),
            authenticator: "soft:key.tgk".into(),
            lock_on_key_removal: true,
            autostart: true,
            sign_in_on_launch: true,
            renew_reminder_minutes: 25,
            rp_id: "example.com".into(),
            allow_other_users: true,
            router_port: 8080,
            transport: "tcp".into(),
            proxy: "http://proxy.example.com:3128".into(),
            services: Vec::new(),
        };
        let mut doc = toml_edit::DocumentMut::new();
        write(&mut doc, &read(&toml::Table::new()), &values, |_| false).expect("write");
        let table: toml::Table = toml::from_str(&doc.to_string()).expect("toml");
        assert_eq!(read(&table), values);
        assert_eq!(table["renew_reminder"].as_str(), Some("25m"));

        // Empty optional values leave no key; a locked key is refused by its name.
        let mut cleared = values.clone();
        cleared.rp_id.clear();
        cleared.router_port = 0;
        write(&mut doc, &values, &cleared, |_| false).expect("write");
        assert!(doc.get("rp_id").is_none(), "{doc}");
        assert!(doc.get("router_port").is_none(), "{doc}");
        let e = write(&mut doc, &cleared, &values, |k| k == "rp_id").expect_err("locked");
        assert_eq!(
            e.to_string(),
            "rp_id is set by your organisation and cannot be changed here"
        );
    }

    #[test]
    fn a_list_of_gateways_is_edited_as_one_text_with_commas() {
        let table: toml::Table =
            toml::from_str("gateway = [\"gw-a.example:443\", \"gw-b.example:443\"]\n")
                .expect("toml");
        let old = read(&table);
        assert_eq!(old.gateway, "gw-a.example:443, gw-b.example:443");
        let mut doc: toml_edit::DocumentMut =
            toml::to_string(&table).expect("toml").parse().expect("doc");
        let mut new = old.clone();
        new.gateway = "gw-a.example:443,gw-c.example:443 , ".into();
        write(&mut doc, &old, &new, |_| false).expect("write");
        let back: toml::Table = toml::from_str(&doc.to_string()).expect("toml");
        assert_eq!(
            back["gateway"].as_array().map(|a| a.len()),
            Some(2),
            "{doc}"
        );
        assert_eq!(read(&back).gateway, "gw-a.example:443, gw-c.example:443");
        // One address is written as a string, as before.
        let one = Settings {
            gateway: "gw.example:443".into(),
            ..new.clone()
        };
        write(&mut doc, &new, &one, |_| false).expect("write");
        assert!(
            doc.to_string().contains("gateway = \"gw.example:443\""),
            "{doc}"
        );
    }

    #[test]
    fn an_empty_file_reads_as_the_defaults() {
        let v = read(&toml::Table::new());
        assert_eq!(
            (v.authenticator.as_str(), v.renew_reminder_minutes),
            ("hid", 10)
        );
        assert!(!v.autostart && v.gateway.is_empty());
    }
}

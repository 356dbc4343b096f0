//! What `touchgate-gateway users` shows: every user with their keys and open invites, as a table
//! for people or JSON for scripts.
//!
//! Pure functions of the store's [`UserSummary`]s and the attestation trust list, so the output
//! is tested without a database or a terminal.

use std::{
    collections::HashMap,
    fmt::Write as _,
    time::{Duration, UNIX_EPOCH},
};

use serde::Serialize;
use uuid::Uuid;

use crate::{
    config::AttestationConfig,
    rp::SOFTWARE_AAGUID,
    store::{CredentialSummary, UserSummary},
};

/// How many characters of a credential id the table shows (enough for `remove-key`).
pub const KEY_PREFIX_LEN: usize = 8;

/// Names of authenticator models by AAGUID, from the trust list's descriptions.
#[derive(Debug, Clone, Default)]
pub struct ModelNames(HashMap<Uuid, String>);

impl ModelNames {
    /// The names the config gives: each trusted root's `description` names the AAGUIDs it
    /// vouches for; touchgate's software key is always "software key".
    pub fn from_config(cfg: &AttestationConfig) -> Self {
        let mut names = HashMap::new();
        for root in &cfg.trusted {
            if let Some(d) = &root.description {
                for a in &root.aaguids {
                    names.entry(*a).or_insert_with(|| d.clone());
                }
            }
        }
        names.insert(SOFTWARE_AAGUID, "software key".to_owned());
        Self(names)
    }

    /// The model name of a stored AAGUID, when the trust list names it.
    pub fn name(&self, aaguid: &str) -> Option<&str> {
        let id = Uuid::parse_str(aaguid).ok()?;
        self.0.get(&id).map(String::as_str)
    }
}

/// One user as `users --json` prints it. Times are seconds since the Unix epoch.
#[derive(Debug, Clone, Serialize)]
pub struct UserView {
    /// The user name.
    pub user: String,
    /// `active` or `disabled`.
    pub state: &'static str,
    /// When the user was first invited.
    pub created_at: u64,
    /// The last successful sign-in, or null.
    pub last_sign_in: Option<u64>,
    /// Enrolled keys, oldest first.
    pub keys: Vec<KeyView>,
    /// Open invites, soonest expiry first.
    pub open_invites: Vec<InviteView>,
}

/// One enrolled key as `users --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct KeyView {
    /// The whole base64url credential id.
    pub credential_id: String,
    /// The authenticator model's AAGUID.
    pub aaguid: String,
    /// The model's name, when the trust list names it.
    pub model: Option<String>,
    /// When it was enrolled.
    pub enrolled_at: u64,
    /// When it last signed in, or null.
    pub last_used: Option<u64>,
}

/// One open invite as `users --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct InviteView {
    /// When it was made.
    pub created_at: u64,
    /// When it expires.
    pub expires_at: u64,
}

/// The views of `users`, in the store's order (by name).
pub fn views(users: &[UserSummary], models: &ModelNames) -> Vec<UserView> {
    users
        .iter()
        .map(|u| UserView {
            user: u.name.clone(),
            state: state(u),
            created_at: u.created,
            last_sign_in: u.last_sign_in,
            keys: u
                .credentials
                .iter()
                .map(|c| KeyView {
                    credential_id: c.cred_id.clone(),
                    aaguid: c.aaguid.clone(),
                    model: models.name(&c.aaguid).map(str::to_owned),
                    enrolled_at: c.enrolled_at,
                    last_used: c.last_used,
                })
                .collect(),
            open_invites: u
                .open_invites
                .iter()
                .map(|i| InviteView {
                    created_at: i.created,
                    expires_at: i.expires,
                })
                .collect(),
        })
        .collect()
}

/// The `users` table: one row per key (a user without keys gets one row), the user's own
/// columns on their first row, then a count line.
pub fn table(users: &[UserSummary], models: &ModelNames) -> String {
    if users.is_empty() {
        return "no users on this gateway yet: invite one with `touchgate-gateway invite USER`\n"
            .to_owned();
    }
    let mut rows: Vec<[String; 8]> = vec![
        [
            "USER",
            "STATE",
            "LAST SIGN-IN",
            "OPEN INVITES",
            "KEY",
            "ENROLLED",
            "LAST USED",
            "MODEL (AAGUID)",
        ]
        .map(str::to_owned),
    ];
    for u in users {
        let user_cols = [
            printable(&u.name),
            state(u).to_owned(),
            time_or_never(u.last_sign_in),
            invites(u),
        ];
        if u.credentials.is_empty() {
            let [a, b, c, d] = user_cols;
            rows.push([
                a,
                b,
                c,
                d,
                "-".into(),
                String::new(),
                String::new(),
                String::new(),
            ]);
            continue;
        }
        for (n, c) in u.credentials.iter().enumerate() {
            let [a, b, cc, d] = if n == 0 {
                user_cols.clone()
            } else {
                Default::default()
            };
            let [e, f, g, h] = key_cols(c, models);
            rows.push([a, b, cc, d, e, f, g, h]);
        }
    }
    let mut widths = [0usize; 8];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let _ = write!(line, "{cell:<w$}");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let disabled = users.iter().filter(|u| u.disabled).count();
    let _ = writeln!(
        out,
        "{} user{}: {} active, {disabled} disabled",
        users.len(),
        if users.len() == 1 { "" } else { "s" },
        users.len() - disabled,
    );
    out
}

/// A time as the admin commands print it: UTC to the minute, e.g. `2026-12-05 16:20Z`.
pub fn format_time(secs: u64) -> String {
    // humantime formats years up to 9999 only.
    const LAST: u64 = 253_402_300_799;
    if secs > LAST {
        return "after 9999".to_owned();
    }
    let full = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs));
    // "2026-12-05T16:20:00Z" → "2026-12-05 16:20Z"
    let full = full.to_string();
    format!("{} {}Z", &full[..10], &full[11..16])
}

/// [`format_time`], or `never`.
pub fn time_or_never(secs: Option<u64>) -> String {
    secs.map_or_else(|| "never".to_owned(), format_time)
}

fn state(u: &UserSummary) -> &'static str {
    if u.disabled { "disabled" } else { "active" }
}

fn invites(u: &UserSummary) -> String {
    match u.open_invites.as_slice() {
        [] => "-".to_owned(),
        [one] => format!("until {}", format_time(one.expires)),
        many => {
            let last = many.iter().map(|i| i.expires).max().unwrap_or_default();
            format!("{}, last until {}", many.len(), format_time(last))
        }
    }
}

fn key_cols(c: &CredentialSummary, models: &ModelNames) -> [String; 4] {
    let prefix: String = c.cred_id.chars().take(KEY_PREFIX_LEN).collect();
    let model = match models.name(&c.aaguid) {
        Some(name) => format!("{} ({})", printable(name), printable(&c.aaguid)),
        None => format!("unnamed model ({})", printable(&c.aaguid)),
    };
    [
        printable(&prefix),
        format_time(c.enrolled_at),
        time_or_never(c.last_used),
        model,
    ]
}

/// Control characters escaped, so a stored name (or a line of the audit log) cannot drive the
/// admin's terminal.
pub fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::TrustedRoot, store::InviteSummary};

    const YUBIKEY: &str = "cb69481e-8ff7-4039-93ec-0a2729a154a8";
    /// 2026-12-05 16:20:00 UTC.
    const T: u64 = 1_796_487_600;

    fn models() -> ModelNames {
        ModelNames::from_config(&AttestationConfig {
            trusted: vec![TrustedRoot {
                ca: "yubico.pem".into(),
                aaguids: vec![Uuid::parse_str(YUBIKEY).expect("uuid")],
                description: Some("YubiKey 5".into()),
            }],
            ..Default::default()
        })
    }

    fn key(id: &str, aaguid: &str, last_used: Option<u64>) -> CredentialSummary {
        CredentialSummary {
            cred_id: id.into(),
            aaguid: aaguid.into(),
            enrolled_at: T - 86_400,
            last_used,
        }
    }

    fn users() -> Vec<UserSummary> {
        vec![
            UserSummary {
                name: "alice@corp".into(),
                disabled: false,
                created: T - 90_000,
                last_sign_in: Some(T),
                credentials: vec![
                    key("3q2-7xAbLONGERID", YUBIKEY, Some(T)),
                    key("Zk9_ab12MORE", &SOFTWARE_AAGUID.to_string(), None),
                ],
                open_invites: vec![],
            },
            UserSummary {
                name: "bob@corp".into(),
                disabled: true,
                created: T - 90_000,
                last_sign_in: None,
                credentials: vec![key("b0b", "00000000-0000-0000-0000-000000000001", None)],
                open_invites: vec![],
            },
            UserSummary {
                name: "carol@corp".into(),
                disabled: false,
                created: T,
                last_sign_in: None,
                credentials: vec![],
                open_invites: vec![InviteSummary {
                    created: T,
                    expires: T + 7 * 86_400,
                }],
            },
        ]
    }

    #[test]
    fn times_read_as_utc_minutes() {
        assert_eq!(format_time(T), "2026-12-05 16:20Z");
        assert_eq!(format_time(0), "1970-01-01 00:00Z");
        assert_eq!(time_or_never(None), "never");
        assert_eq!(format_time(u64::MAX), "after 9999");
    }

    #[test]
    fn the_table_has_a_row_per_key_with_model_names_from_the_trust_list() {
        let text = table(&users(), &models());
        let lines: Vec<&str> = text.lines().collect();

        assert_eq!(lines.len(), 6, "{text}");
        assert!(lines[0].starts_with("USER"), "{text}");
        assert!(
            lines[1].starts_with("alice@corp  active    2026-12-05 16:20Z  -"),
            "{text}"
        );
        assert!(lines[1].contains("3q2-7xAb  2026-12-04 16:20Z  2026-12-05 16:20Z"));
        assert!(
            lines[1].ends_with(&format!("YubiKey 5 ({YUBIKEY})")),
            "{text}"
        );
        assert!(lines[2].trim_start().starts_with("Zk9_ab12"), "{text}");
        assert!(lines[2].contains("never"));
        assert!(lines[2].ends_with(&format!("software key ({SOFTWARE_AAGUID})")));
        assert!(
            lines[3].starts_with("bob@corp    disabled  never"),
            "{text}"
        );
        assert!(lines[3].ends_with("unnamed model (00000000-0000-0000-0000-000000000001)"));
        assert!(lines[4].contains("until 2026-12-12 16:20Z"), "{text}");
        assert!(
            lines[4].trim_end().ends_with('-'),
            "carol has no key: {text}"
        );
        assert_eq!(lines[5], "3 users: 2 active, 1 disabled");
    }

    #[test]
    fn an_empty_gateway_says_how_to_add_a_user() {
        assert!(table(&[], &models()).contains("touchgate-gateway invite USER"));
    }

    #[test]
    fn control_characters_in_names_are_escaped() {
        let mut u = users();
        u[0].name = "evil\u{1b}[2J".into();
        let text = table(&u, &models());
        assert!(!text.contains('\u{1b}'));
        assert!(text.contains("evil\\u{1b}[2J"));
    }

    #[test]
    fn json_views_keep_whole_ids_and_seconds() {
        let v = serde_json::to_value(views(&users(), &models())).expect("json");

        assert_eq!(v[0]["user"], "alice@corp");
        assert_eq!(v[0]["state"], "active");
        assert_eq!(v[0]["last_sign_in"], T);
        assert_eq!(v[0]["keys"][0]["credential_id"], "3q2-7xAbLONGERID");
        assert_eq!(v[0]["keys"][0]["model"], "YubiKey 5");
        assert_eq!(v[0]["keys"][1]["last_used"], serde_json::Value::Null);
        assert_eq!(v[1]["state"], "disabled");
        assert_eq!(v[1]["keys"][0]["model"], serde_json::Value::Null);
        assert_eq!(v[2]["open_invites"][0]["expires_at"], T + 7 * 86_400);
    }
}

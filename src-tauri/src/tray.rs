//! What the tray shows for a view: the icon, the tooltip and the menu, as plain data. The
//! Tauri side turns it into a real tray (see `shell.rs`); the rules live here and are tested
//! without a window.

use touchgate_agent::controller::{Phase, View};

/// The five tray icons (each drawn for light and dark panels, in `icons/tray`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Icon {
    /// No session.
    SignedOut,
    /// The key is blinking, or wants its PIN.
    Waiting,
    /// Services are live.
    Connected,
    /// The connection dropped; coming back.
    Reconnecting,
    /// Sign-in failed, or the key was unplugged.
    Error,
}

impl Icon {
    /// The PNG for a light or a dark panel.
    pub fn png(self, dark_panel: bool) -> &'static [u8] {
        macro_rules! pair {
            ($name:literal) => {
                if dark_panel {
                    include_bytes!(concat!("../../icons/tray/", $name, "-dark.png")).as_slice()
                } else {
                    include_bytes!(concat!("../../icons/tray/", $name, "-light.png")).as_slice()
                }
            };
        }
        match self {
            Self::SignedOut => pair!("signed-out"),
            Self::Waiting => pair!("waiting"),
            Self::Connected => pair!("connected"),
            Self::Reconnecting => pair!("reconnecting"),
            Self::Error => pair!("error"),
        }
    }
}

/// A menu action, as the id of its menu item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open the sign-in window and ask for a touch.
    SignIn,
    /// Renew the session with a touch.
    Renew,
    /// Sign out.
    SignOut,
    /// Stop waiting for the key.
    Cancel,
    /// Copy a service's URL.
    CopyUrl(String),
    /// Open a service's URL in the browser.
    OpenUrl(String),
    /// Open the delegate window.
    Delegate,
    /// Revoke the user's grant (its id).
    Revoke(String),
    /// Open the enrolment window.
    Enrol,
    /// Open the settings window.
    Settings,
    /// Open the status window.
    Status,
    /// Open the log file.
    OpenLog,
    /// Close the tunnels and quit.
    Quit,
}

impl Action {
    /// The menu item id.
    pub fn id(&self) -> String {
        match self {
            Self::SignIn => "sign-in".into(),
            Self::Renew => "renew".into(),
            Self::SignOut => "sign-out".into(),
            Self::Cancel => "cancel".into(),
            Self::CopyUrl(s) => format!("copy-url:{s}"),
            Self::OpenUrl(s) => format!("open-url:{s}"),
            Self::Delegate => "delegate".into(),
            Self::Revoke(id) => format!("revoke:{id}"),
            Self::Enrol => "enrol".into(),
            Self::Settings => "settings".into(),
            Self::Status => "status".into(),
            Self::OpenLog => "open-log".into(),
            Self::Quit => "quit".into(),
        }
    }

    /// The action of a menu item id.
    pub fn from_id(id: &str) -> Option<Self> {
        Some(match id {
            "sign-in" => Self::SignIn,
            "renew" => Self::Renew,
            "sign-out" => Self::SignOut,
            "cancel" => Self::Cancel,
            "delegate" => Self::Delegate,
            "enrol" => Self::Enrol,
            "settings" => Self::Settings,
            "status" => Self::Status,
            "open-log" => Self::OpenLog,
            "quit" => Self::Quit,
            other => {
                if let Some(s) = other.strip_prefix("copy-url:") {
                    Self::CopyUrl(s.to_owned())
                } else if let Some(s) = other.strip_prefix("open-url:") {
                    Self::OpenUrl(s.to_owned())
                } else if let Some(s) = other.strip_prefix("revoke:") {
                    Self::Revoke(s.to_owned())
                } else {
                    return None;
                }
            }
        })
    }
}

/// One entry of the tray menu.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A line of text that does nothing (the state).
    Label(String),
    /// A clickable entry.
    Action {
        /// What it says.
        text: String,
        /// What it does.
        action: Action,
        /// Whether it can be clicked now.
        enabled: bool,
    },
    /// An entry with a submenu: a service (Copy URL, Open in browser), a grant (Revoke).
    Submenu {
        /// `api — http://127.0.0.1:8081`.
        text: String,
        /// Its entries.
        items: Vec<Item>,
    },
    /// A line between groups.
    Separator,
}

/// The whole tray.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tray {
    /// The icon.
    pub icon: Icon,
    /// The state in words (tooltip, and the first menu line).
    pub tooltip: String,
    /// The menu.
    pub items: Vec<Item>,
}

fn action(text: &str, action: Action) -> Item {
    Item::Action {
        text: text.into(),
        action,
        enabled: true,
    }
}

/// How many grants the menu lists; the delegate window lists them all.
const MAX_GRANTS: usize = 8;

/// The tray for `view`; its words are the view's own summary.
pub fn tray(view: &View) -> Tray {
    let state = view.summary.clone();
    let icon = match &view.phase {
        Phase::SignedOut { .. } => Icon::SignedOut,
        Phase::Connecting { .. } | Phase::WaitingForTouch { .. } | Phase::PinNeeded { .. } => {
            Icon::Waiting
        }
        Phase::Connected | Phase::ExpiringSoon => Icon::Connected,
        Phase::Reconnecting { .. } => Icon::Reconnecting,
        Phase::NotConfigured { .. } | Phase::KeyRemoved | Phase::Error { .. } => Icon::Error,
    };
    let mut items = vec![Item::Label(state.clone()), Item::Separator];
    match &view.phase {
        Phase::Connected | Phase::ExpiringSoon | Phase::Reconnecting { .. } => {
            items.push(action("Renew session", Action::Renew));
            items.push(action("Sign out", Action::SignOut));
        }
        Phase::Connecting { .. } | Phase::WaitingForTouch { .. } | Phase::PinNeeded { .. } => {
            items.push(action("Cancel", Action::Cancel));
        }
        Phase::NotConfigured { .. } => items.push(Item::Action {
            text: "Sign in…".into(),
            action: Action::SignIn,
            enabled: false,
        }),
        Phase::SignedOut { .. } | Phase::KeyRemoved | Phase::Error { .. } => {
            items.push(action("Sign in…", Action::SignIn));
        }
    }
    if !view.services.is_empty() {
        items.push(Item::Separator);
    }
    for s in &view.services {
        let where_ = match (s.url.is_empty(), s.by_name.is_empty()) {
            (true, true) => "a free port at sign-in".to_owned(),
            (true, false) => s.by_name.clone(),
            (false, true) => s.url.clone(),
            (false, false) => format!("{} (port {})", s.by_name, s.local_port),
        };
        let text = if s.live {
            format!("{} — {where_}", s.name)
        } else {
            format!("{} — {where_} (not live)", s.name)
        };
        items.push(Item::Submenu {
            text,
            items: vec![
                Item::Action {
                    text: "Copy URL".into(),
                    action: Action::CopyUrl(s.name.clone()),
                    enabled: s.live,
                },
                Item::Action {
                    text: "Open in browser".into(),
                    action: Action::OpenUrl(s.name.clone()),
                    enabled: s.live,
                },
            ],
        });
    }
    // Delegated access: while signed in, a grant is one touch away, and each live grant can
    // be revoked from here.
    let signed_in = matches!(view.phase, Phase::Connected | Phase::ExpiringSoon);
    items.push(Item::Separator);
    items.push(Item::Action {
        text: "Delegate access…".into(),
        action: Action::Delegate,
        enabled: signed_in,
    });
    // A long list stays in the window (a gateway decides how many there are).
    for g in view.delegations.iter().take(MAX_GRANTS) {
        items.push(Item::Submenu {
            text: format!("Grant: {} — {} left", g.label, g.time_left),
            items: vec![
                Item::Label(g.scope.clone()),
                action("Revoke", Action::Revoke(g.id.clone())),
            ],
        });
    }
    if view.delegations.len() > MAX_GRANTS {
        items.push(action(
            &format!("{} more grants…", view.delegations.len() - MAX_GRANTS),
            Action::Delegate,
        ));
    }
    items.extend([
        Item::Separator,
        action("Enrol a key…", Action::Enrol),
        action("Settings…", Action::Settings),
        action("Status…", Action::Status),
        action("Open log", Action::OpenLog),
        Item::Separator,
        action("Quit touchgate", Action::Quit),
    ]);
    Tray {
        icon,
        tooltip: format!("touchgate: {state}"),
        items,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use touchgate_agent::controller::{GrantView, Purpose, ServiceView, SessionView};

    /// The view of `phase` as the controller words it at 10,000 s after the epoch.
    fn view(phase: Phase, live: bool) -> View {
        let mut v = View {
            phase,
            session: live.then(|| SessionView {
                user: "alice@example.com".into(),
                expires_at: 10_000 + 3 * 3600 + 7 * 60,
            }),
            services: vec![ServiceView::new("api", 8081, live)],
            gateway: "gw:4433".into(),
            user: "alice@example.com".into(),
            ..View::default()
        };
        v.set_words(10_000);
        v
    }

    fn texts(t: &Tray) -> Vec<String> {
        t.items
            .iter()
            .map(|i| match i {
                Item::Label(s) => format!("[{s}]"),
                Item::Action { text, enabled, .. } => {
                    format!("{text}{}", if *enabled { "" } else { " (disabled)" })
                }
                Item::Submenu { text, .. } => format!("> {text}"),
                Item::Separator => "---".into(),
            })
            .collect()
    }

    #[test]
    fn connected_shows_time_left_services_renew_and_sign_out() {
        let t = tray(&view(Phase::Connected, true));
        assert_eq!(t.icon, Icon::Connected);
        assert_eq!(
            t.tooltip,
            "touchgate: Connected as alice@example.com — 3 h 07 min left"
        );
        assert_eq!(
            texts(&t),
            [
                "[Connected as alice@example.com — 3 h 07 min left]",
                "---",
                "Renew session",
                "Sign out",
                "---",
                "> api — http://127.0.0.1:8081",
                "---",
                "Delegate access…",
                "---",
                "Enrol a key…",
                "Settings…",
                "Status…",
                "Open log",
                "---",
                "Quit touchgate",
            ]
        );
        let Item::Submenu { items, .. } = &t.items[5] else {
            panic!("service item")
        };
        assert_eq!(
            items,
            &[
                Item::Action {
                    text: "Copy URL".into(),
                    action: Action::CopyUrl("api".into()),
                    enabled: true
                },
                Item::Action {
                    text: "Open in browser".into(),
                    action: Action::OpenUrl("api".into()),
                    enabled: true
                },
            ]
        );
    }

    #[test]
    fn services_served_by_name_show_their_name_url() {
        let mut v = view(Phase::Connected, true);
        v.services[0].by_name = "http://api.localhost:8080/".into();
        let mut web = ServiceView::new("web", 0, true);
        web.by_name = "http://web.localhost:8080/".into();
        v.services.push(web);
        let shown: Vec<_> = texts(&tray(&v))
            .into_iter()
            .filter(|t| t.starts_with("> "))
            .collect();
        assert_eq!(
            shown,
            [
                "> api — http://api.localhost:8080/ (port 8081)",
                "> web — http://web.localhost:8080/",
            ]
        );
    }

    #[test]
    fn every_state_has_its_own_icon_and_words() {
        let cases = [
            (
                Phase::SignedOut { reason: None },
                Icon::SignedOut,
                "Signed out",
                "Sign in…",
            ),
            (
                Phase::SignedOut {
                    reason: Some(touchgate_agent::agent::ACCOUNT_DISABLED.into()),
                },
                Icon::SignedOut,
                "Signed out: your account is disabled on this gateway; ask your admin",
                "Sign in…",
            ),
            (
                Phase::WaitingForTouch {
                    key: "YubiKey 5".into(),
                    purpose: Purpose::SignIn,
                },
                Icon::Waiting,
                "Touch your security key (YubiKey 5)",
                "Cancel",
            ),
            (
                Phase::Reconnecting {
                    attempt: 2,
                    reason: "timed out".into(),
                },
                Icon::Reconnecting,
                "Connection lost — reconnecting…",
                "Renew session",
            ),
            (
                Phase::Error {
                    message: "no touch within 30s".into(),
                },
                Icon::Error,
                "Sign-in failed: no touch within 30s",
                "Sign in…",
            ),
            (
                Phase::NotConfigured {
                    problem: "no gateway".into(),
                },
                Icon::Error,
                "Not set up yet: open Settings",
                "Sign in… (disabled)",
            ),
        ];
        for (phase, icon, words, first_action) in cases {
            let t = tray(&view(phase.clone(), false));
            assert_eq!(t.icon, icon, "{phase:?}");
            assert_eq!(t.tooltip, format!("touchgate: {words}"));
            assert_eq!(texts(&t)[2], first_action, "{phase:?}");
            assert!(
                texts(&t).contains(&"> api — http://127.0.0.1:8081 (not live)".to_owned()),
                "{phase:?}"
            );
        }
    }

    #[test]
    fn expiring_soon_says_how_long_is_left() {
        let mut v = view(Phase::ExpiringSoon, true);
        v.session.as_mut().expect("session").expires_at = 10_000 + 299;
        v.set_words(10_000);
        let t = tray(&v);
        assert_eq!(t.tooltip, "touchgate: Session ends in 4 min: renew it");
    }

    #[test]
    fn live_grants_are_listed_with_revoke_and_delegating_needs_a_session() {
        let mut v = view(Phase::Connected, true);
        let info = touchgate_proto::DelegationInfo {
            id: "dlg-00000000000000aa".into(),
            user: "alice@example.com".into(),
            grant: touchgate_proto::Grant {
                label: "nightly CI".into(),
                services: vec!["api".into()],
                methods: vec!["GET".into()],
                path_prefixes: Vec::new(),
                expires_at: 10_000 + 25 * 60,
                key: "k".into(),
            },
            created_at: 9_000,
            last_used_at: None,
            revoked_at: None,
        };
        v.delegations = vec![GrantView::of(&info)];
        v.set_words(10_000);
        let t = tray(&v);
        let shown = texts(&t);
        let at = shown
            .iter()
            .position(|t| t == "Delegate access…")
            .expect("the entry");
        assert_eq!(shown[at + 1], "> Grant: nightly CI — 25 min left");
        let Item::Submenu { items, .. } = &t.items[at + 1] else {
            panic!("a grant's submenu")
        };
        assert_eq!(
            items,
            &[
                Item::Label("api · GET · any path".into()),
                action("Revoke", Action::Revoke("dlg-00000000000000aa".into())),
            ]
        );
        // Many grants: the menu lists the first few and sends the rest to the window.
        v.delegations = (0..20)
            .map(|i| {
                let mut g = GrantView::of(&info);
                g.id = format!("dlg-{i:016x}");
                g
            })
            .collect();
        let shown = texts(&tray(&v));
        assert_eq!(
            shown.iter().filter(|t| t.starts_with("> Grant:")).count(),
            8
        );
        assert!(shown.contains(&"12 more grants…".to_owned()), "{shown:?}");
        // Signed out: the entry is there, greyed.
        let t = tray(&view(Phase::SignedOut { reason: None }, false));
        assert!(texts(&t).contains(&"Delegate access… (disabled)".to_owned()));
    }

    #[test]
    fn menu_ids_round_trip() {
        for a in [
            Action::SignIn,
            Action::Renew,
            Action::SignOut,
            Action::Cancel,
            Action::CopyUrl("api".into()),
            Action::OpenUrl("billing-v2".into()),
            Action::Delegate,
            Action::Revoke("dlg-00000000000000aa".into()),
            Action::Enrol,
            Action::Settings,
            Action::Status,
            Action::OpenLog,
            Action::Quit,
        ] {
            assert_eq!(Action::from_id(&a.id()), Some(a));
        }
        assert_eq!(Action::from_id("nonsense"), None);
    }

    #[test]
    fn every_icon_is_a_png() {
        for i in [
            Icon::SignedOut,
            Icon::Waiting,
            Icon::Connected,
            Icon::Reconnecting,
            Icon::Error,
        ] {
            for dark in [false, true] {
                assert!(i.png(dark).starts_with(b"\x89PNG"), "{i:?}");
            }
        }
        assert_ne!(Icon::Connected.png(true), Icon::Connected.png(false));
    }
}

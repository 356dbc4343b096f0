//! The tray window's side of the seam: the names of the events the window listens to, its
//! routes, what it is told about the app, and the TypeScript declarations of every type that
//! crosses (`ui/src/bindings.ts`, kept current by a test). The window takes these from here
//! and writes none of them itself.

use serde::{Deserialize, Serialize};
use ts_rs::TS;

use super::{
    ErrorKind, GrantForm, GrantView, GrantedView, Notice, Organisation, Phase, Purpose, Request,
    ServiceView, SessionView, ShownNotice, View, WireError,
};
use crate::settings::{ServiceSetting, Settings, SettingsView};

/// The event that carries each new [`View`] to the window.
pub const VIEW_EVENT: &str = "touchgate://view";
/// The event that carries each [`ShownNotice`] to the window (the desktop notification is
/// shown by the app).
pub const NOTICE_EVENT: &str = "touchgate://notice";
/// The event that asks the window to show a [`Route`].
pub const NAVIGATE_EVENT: &str = "touchgate://navigate";

/// The window's views, one route each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Sign in, renew, sign out; the touch and PIN prompts.
    SignIn,
    /// Enrol a key with an invite code.
    Enrol,
    /// The settings, with what the organisation set.
    Settings,
    /// The state, the session and the services.
    Status,
    /// Grant a delegate access with a touch; the user's live grants, with Revoke.
    Delegate,
}

impl Route {
    /// Every route.
    pub const ALL: [Route; 5] = [
        Self::SignIn,
        Self::Enrol,
        Self::Settings,
        Self::Status,
        Self::Delegate,
    ];

    /// The route's name in the window's address (`#signin`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SignIn => "signin",
            Self::Enrol => "enrol",
            Self::Settings => "settings",
            Self::Status => "status",
            Self::Delegate => "delegate",
        }
    }
}

/// What the window knows about the app besides the view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS)]
pub struct AppInfo {
    /// The app's version.
    pub version: String,
    /// The log file ("Open log").
    pub log_file: String,
    /// The view the tray last asked for (the window may have loaded after the event).
    pub route: Route,
}

/// The TypeScript declarations of every type that crosses the seam, and the event names and
/// routes as constants, for the tray app's web front end (`ui/src/bindings.ts`).
pub fn typescript_bindings() -> String {
    let cfg = ts_rs::Config::default();
    let decls = [
        Request::decl(&cfg),
        Purpose::decl(&cfg),
        Phase::decl(&cfg),
        SessionView::decl(&cfg),
        ServiceView::decl(&cfg),
        Organisation::decl(&cfg),
        GrantForm::decl(&cfg),
        GrantView::decl(&cfg),
        GrantedView::decl(&cfg),
        View::decl(&cfg),
        Notice::decl(&cfg),
        ShownNotice::decl(&cfg),
        ErrorKind::decl(&cfg),
        WireError::decl(&cfg),
        Route::decl(&cfg),
        AppInfo::decl(&cfg),
        ServiceSetting::decl(&cfg),
        Settings::decl(&cfg),
        SettingsView::decl(&cfg),
    ];
    let mut out = String::from(
        "// Generated from the Rust types in crates/agent (controller and settings): do not edit.\n\
         // Regenerate with: TOUCHGATE_BLESS=1 cargo test -p touchgate-agent bindings\n\n",
    );
    for d in decls {
        out.push_str("export ");
        out.push_str(&d);
        out.push_str("\n\n");
    }
    let routes: Vec<String> = Route::ALL
        .iter()
        .map(|r| format!("{:?}", r.as_str()))
        .collect();
    out.push_str(&format!(
        "/** The window's routes, one view each. */\nexport const ROUTES: readonly Route[] = [{}];\n\n",
        routes.join(", ")
    ));
    out.push_str(&format!(
        "/** The events the window listens to. */\nexport const EVENTS = {{ view: {VIEW_EVENT:?}, notice: {NOTICE_EVENT:?}, navigate: {NAVIGATE_EVENT:?} }} as const;\n"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The web front end's types come from these declarations; the committed file must be
    /// what they generate today, so the two cannot drift.
    #[test]
    fn ui_bindings_are_current() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ui/src/bindings.ts");
        let want = typescript_bindings();
        if std::env::var_os("TOUCHGATE_BLESS").is_some() {
            std::fs::write(&path, &want).expect("write bindings");
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} is out of date with the Rust types: run TOUCHGATE_BLESS=1 cargo test -p touchgate-agent bindings",
            path.display()
        );
        assert!(want.contains("export type Request ="), "{want}");
        assert!(want.contains("\"kind\": \"submit_pin\""), "{want}");
        assert!(want.contains("export type ControllerError = { "), "{want}");
        assert!(want.contains("\"touchgate://view\""), "{want}");
    }

    #[test]
    fn routes_serialise_as_their_names() {
        for r in Route::ALL {
            assert_eq!(
                serde_json::to_value(r).expect("json"),
                serde_json::json!(r.as_str())
            );
        }
    }
}

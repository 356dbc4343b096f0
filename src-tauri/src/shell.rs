//! The Tauri side of the seam: [`TauriUi`] receives the controller's views and notices and
//! turns them into window events, the tray and desktop notifications; the commands only
//! forward to the controller.

use std::{path::PathBuf, sync::Arc};

use tauri::{
    AppHandle, Emitter, Manager, Runtime,
    image::Image,
    menu::{IsMenuItem, Menu, MenuItem, PredefinedMenuItem, Submenu},
    tray::{TrayIcon, TrayIconBuilder},
};
use tauri_plugin_autostart::ManagerExt as _;
use tauri_plugin_clipboard_manager::ClipboardExt as _;
use tauri_plugin_notification::NotificationExt as _;
use tauri_plugin_opener::OpenerExt as _;
use tokio::sync::mpsc;
use touchgate_agent::{
    controller::{
        AppInfo, Controller, ControllerError, NAVIGATE_EVENT, NOTICE_EVENT, Request, Route, Shown,
        VIEW_EVENT, View,
    },
    settings::SettingsView,
};

use crate::tray::{self, Action, Item};

/// The id of the tray icon.
const TRAY_ID: &str = "touchgate";

/// What the app keeps in Tauri's state.
pub struct Desk {
    /// The one controller.
    pub controller: Controller,
    /// The log file ("Open log").
    pub log_file: PathBuf,
    /// The view the window was last asked to show (read by the window when it loads, in case
    /// it missed the event).
    pub route: std::sync::Mutex<Route>,
}

/// Whether the panel the tray sits on is dark. GNOME's top bar is dark in every theme;
/// elsewhere the system theme decides.
fn dark_panel<R: Runtime>(app: &AppHandle<R>) -> bool {
    let desktop = std::env::var("XDG_CURRENT_DESKTOP").unwrap_or_default();
    if cfg!(target_os = "linux") && desktop.to_ascii_uppercase().contains("GNOME") {
        return true;
    }
    app.get_webview_window("main")
        .and_then(|w| w.theme().ok())
        .is_none_or(|t| t == tauri::Theme::Dark)
}

fn menu_item<R: Runtime>(app: &AppHandle<R>, item: &Item) -> tauri::Result<Box<dyn IsMenuItem<R>>> {
    Ok(match item {
        Item::Label(text) => Box::new(MenuItem::with_id(app, "state", text, false, None::<&str>)?),
        Item::Action {
            text,
            action,
            enabled,
        } => Box::new(MenuItem::with_id(
            app,
            action.id(),
            text,
            *enabled,
            None::<&str>,
        )?),
        Item::Submenu { text, items } => {
            let children = items
                .iter()
                .map(|i| menu_item(app, i))
                .collect::<tauri::Result<Vec<_>>>()?;
            let refs: Vec<&dyn IsMenuItem<R>> = children.iter().map(|c| c.as_ref()).collect();
            Box::new(Submenu::with_items(app, text, true, &refs)?)
        }
        Item::Separator => Box::new(PredefinedMenuItem::separator(app)?),
    })
}

fn menu<R: Runtime>(app: &AppHandle<R>, t: &tray::Tray) -> tauri::Result<Menu<R>> {
    let items = t
        .items
        .iter()
        .map(|i| menu_item(app, i))
        .collect::<tauri::Result<Vec<_>>>()?;
    let refs: Vec<&dyn IsMenuItem<R>> = items.iter().map(|c| c.as_ref()).collect();
    Menu::with_items(app, &refs)
}

/// Makes the tray icon for the first view.
pub fn build_tray<R: Runtime>(app: &AppHandle<R>, view: &View) -> tauri::Result<TrayIcon<R>> {
    let t = tray::tray(view);
    TrayIconBuilder::with_id(TRAY_ID)
        .icon(Image::from_bytes(t.icon.png(dark_panel(app)))?)
        .tooltip(&t.tooltip)
        .menu(&menu(app, &t)?)
        .show_menu_on_left_click(true)
        .on_menu_event(|app, event| {
            if let Some(action) = Action::from_id(event.id().as_ref()) {
                on_action(app, action);
            }
        })
        .build(app)
}

/// Draws `view` on the tray; skipped when nothing it shows changed.
fn draw_tray<R: Runtime>(app: &AppHandle<R>, view: &View, last: &mut Option<tray::Tray>) {
    let t = tray::tray(view);
    if last.as_ref() == Some(&t) {
        return;
    }
    let Some(icon) = app.tray_by_id(TRAY_ID) else {
        return;
    };
    let result = (|| -> tauri::Result<()> {
        if last.as_ref().map(|l| l.icon) != Some(t.icon) {
            icon.set_icon(Some(Image::from_bytes(t.icon.png(dark_panel(app)))?))?;
        }
        icon.set_tooltip(Some(&t.tooltip))?;
        icon.set_menu(Some(menu(app, &t)?))?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot update the tray");
    }
    *last = Some(t);
}

/// The app's main loop for the UI: views go to the window and the tray, notices become
/// desktop notifications. (The controller sends a new view when the time left changes its
/// words, so the tray needs no clock of its own.)
pub async fn run_ui<R: Runtime>(app: AppHandle<R>, mut rx: mpsc::UnboundedReceiver<Shown>) {
    let mut last_tray = None;
    while let Some(msg) = rx.recv().await {
        match msg {
            Shown::View(view) => {
                let _ = app.emit(VIEW_EVENT, &*view);
                draw_tray(&app, &view, &mut last_tray);
            }
            Shown::Notice(notice) => {
                let shown = notice.shown();
                let _ = app.emit(NOTICE_EVENT, &shown);
                // Desktop notifications on Linux and Windows have no action buttons here:
                // the body says to choose Renew session, which is the tray's second entry.
                if let Err(e) = app
                    .notification()
                    .builder()
                    .title(&shown.title)
                    .body(&shown.body)
                    .show()
                {
                    tracing::info!(error = %e, "no desktop notification (is a notification service running?)");
                }
                tracing::info!(title = %shown.title, body = %shown.body, "notice");
            }
        }
    }
}

/// Shows the window at `route` and brings it to the front.
pub fn show_window<R: Runtime>(app: &AppHandle<R>, route: Route) {
    if let Some(d) = app.try_state::<Arc<Desk>>() {
        *d.route.lock().unwrap_or_else(|e| e.into_inner()) = route;
    }
    let _ = app.emit(NAVIGATE_EVENT, route);
    if let Some(w) = app.get_webview_window("main") {
        let _ = w.show();
        let _ = w.unminimize();
        let _ = w.set_focus();
    }
}

fn desk<R: Runtime>(app: &AppHandle<R>) -> tauri::State<'_, Arc<Desk>> {
    app.state::<Arc<Desk>>()
}

fn send<R: Runtime>(app: &AppHandle<R>, request: Request) {
    let controller = desk(app).controller.clone();
    tauri::async_runtime::spawn(async move {
        if let Err(e) = controller.handle(request).await {
            tracing::info!(error = %e, "request from the tray failed");
        }
    });
}

fn service_url<R: Runtime>(app: &AppHandle<R>, name: &str) -> Option<String> {
    desk(app)
        .controller
        .view()
        .services
        .into_iter()
        .find(|s| s.name == name && s.live && !s.best_url().is_empty())
        .map(|s| s.best_url().to_owned())
}

fn on_action<R: Runtime>(app: &AppHandle<R>, action: Action) {
    match action {
        Action::SignIn => {
            show_window(app, Route::SignIn);
            send(app, Request::SignIn);
        }
        Action::Renew => {
            show_window(app, Route::SignIn);
            send(app, Request::Renew);
        }
        Action::SignOut => send(app, Request::SignOut),
        Action::Cancel => send(app, Request::Cancel),
        Action::CopyUrl(name) => {
            if let Some(url) = service_url(app, &name)
                && let Err(e) = app.clipboard().write_text(url)
            {
                tracing::warn!(error = %e, "cannot copy to the clipboard");
            }
        }
        Action::OpenUrl(name) => {
            if let Some(url) = service_url(app, &name)
                && let Err(e) = app.opener().open_url(url, None::<&str>)
            {
                tracing::warn!(error = %e, "cannot open the browser");
            }
        }
        Action::Delegate => show_window(app, Route::Delegate),
        Action::Revoke(id) => send(app, Request::RevokeDelegation { id }),
        Action::Enrol => show_window(app, Route::Enrol),
        Action::Settings => show_window(app, Route::Settings),
        Action::Status => show_window(app, Route::Status),
        Action::OpenLog => open_log_file(app),
        Action::Quit => quit(app),
    }
}

fn open_log_file<R: Runtime>(app: &AppHandle<R>) {
    let path = desk(app).log_file.clone();
    if let Err(e) = app
        .opener()
        .open_path(path.display().to_string(), None::<&str>)
    {
        tracing::warn!(error = %e, "cannot open the log file");
    }
}

/// Closes every tunnel cleanly, then exits.
pub fn quit<R: Runtime>(app: &AppHandle<R>) {
    let app = app.clone();
    tauri::async_runtime::spawn(async move {
        desk(&app).controller.shutdown().await;
        tracing::info!("tunnels closed; quitting");
        app.exit(0);
    });
}

/// Whether the status socket is served (it starts once the settings are usable).
static STATUS_SERVED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `touchgate status` and `touchgate delegations` ask this app as they ask `touchgate up`:
/// the status socket reports the view and lists or revokes the user's grants on the live
/// session. Started once, when the settings are usable (the socket's place is one of them).
pub fn serve_status(controller: &Controller) {
    #[cfg(unix)]
    {
        use std::sync::atomic::Ordering;
        let Ok(cfg) = controller.config() else {
            return;
        };
        if STATUS_SERVED.swap(true, Ordering::SeqCst) {
            return;
        }
        let c = controller.clone();
        tauri::async_runtime::spawn(async move { c.serve_status(cfg.control_socket()).await });
    }
    #[cfg(not(unix))]
    let _ = controller;
}

/// Turns autostart on or off as the settings say.
pub fn apply_autostart<R: Runtime>(app: &AppHandle<R>, want: bool) {
    let launcher = app.autolaunch();
    // Without an autostart folder yet, asking fails: that is "not enabled".
    let result = match (want, launcher.is_enabled().unwrap_or(false)) {
        (true, false) => {
            // The autostart library makes only the last folder of ~/.config/autostart.
            if cfg!(target_os = "linux")
                && let Some(home) = directories::BaseDirs::new().map(|b| b.home_dir().to_owned())
            {
                let _ = std::fs::create_dir_all(home.join(".config"));
            }
            launcher.enable()
        }
        (false, true) => launcher.disable(),
        _ => Ok(()),
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot change autostart");
    }
}

// ---- commands: each forwards to the controller --------------------------------------------

/// Carries out a request (sign in, renew, enrol, save settings, …).
#[tauri::command]
pub async fn request<R: Runtime>(
    app: AppHandle<R>,
    state: tauri::State<'_, Arc<Desk>>,
    request: Request,
) -> Result<(), ControllerError> {
    let saving = matches!(request, Request::SaveSettings { .. });
    state.controller.handle(request).await?;
    if saving && let Ok(s) = state.controller.settings() {
        apply_autostart(&app, s.values.autostart);
        // First-run setup done: the status socket starts now rather than at the next launch.
        serve_status(&state.controller);
    }
    Ok(())
}

/// The current view.
#[tauri::command]
pub fn view(state: tauri::State<'_, Arc<Desk>>) -> View {
    state.controller.view()
}

/// The settings, with what the organisation fixed.
#[tauri::command]
pub fn settings(state: tauri::State<'_, Arc<Desk>>) -> Result<SettingsView, ControllerError> {
    state.controller.settings()
}

/// Version and log file, for the status view.
#[tauri::command]
pub fn app_info(state: tauri::State<'_, Arc<Desk>>) -> AppInfo {
    AppInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        log_file: state.log_file.display().to_string(),
        route: *state.route.lock().unwrap_or_else(|e| e.into_inner()),
    }
}

fn live_url(state: &Desk, url: &str) -> Result<(), ControllerError> {
    if state
        .controller
        .view()
        .services
        .iter()
        .any(|s| s.live && (s.url == url || s.by_name == url))
    {
        Ok(())
    } else {
        Err(ControllerError::failed(format!(
            "{url} is not the address of a live service"
        )))
    }
}

/// Opens a live service's URL in the browser (nothing else).
#[tauri::command]
pub fn open_url<R: Runtime>(
    app: AppHandle<R>,
    state: tauri::State<'_, Arc<Desk>>,
    url: String,
) -> Result<(), ControllerError> {
    live_url(&state, &url)?;
    app.opener()
        .open_url(url, None::<&str>)
        .map_err(ControllerError::failed)
}

/// Copies a live service's URL, or the file or command of the grant just made (nothing else).
#[tauri::command]
pub fn copy_text<R: Runtime>(
    app: AppHandle<R>,
    state: tauri::State<'_, Arc<Desk>>,
    text: String,
) -> Result<(), ControllerError> {
    let granted = state
        .controller
        .view()
        .granted
        .is_some_and(|g| text == g.file || text == g.run);
    if !granted {
        live_url(&state, &text)?;
    }
    app.clipboard()
        .write_text(text)
        .map_err(ControllerError::failed)
}

/// Opens the log file.
#[tauri::command]
pub fn open_log<R: Runtime>(app: AppHandle<R>) {
    open_log_file(&app);
}

//! `touchgate-desktop`: the tray app. A developer clicks the tray icon, touches the key, and
//! every service is live on its localhost port. The agent runs in this process, behind the
//! same controller as the CLI; this binary is only its front end.
//!
//! Options: `--minimized` (started at login: tray only, no window). `TOUCHGATE_CONFIG` names
//! another user config file; the admin's managed file is always read from the platform place.

#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

mod logging;
mod shell;
mod tray;

use std::sync::Arc;

use tauri::{Manager, RunEvent, WindowEvent};
use touchgate_agent::{
    controller::{ChannelUi, Controller, Request, Route},
    settings::ConfigPaths,
};

fn main() -> std::process::ExitCode {
    let minimized = std::env::args().any(|a| a == "--minimized");
    let log_file = match logging::init() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("touchgate: cannot open the log file: {e}");
            std::env::temp_dir().join("touchgate-desktop.log")
        }
    };
    let paths = match std::env::var_os("TOUCHGATE_CONFIG") {
        Some(p) => Ok(ConfigPaths::with_user(p.into())),
        None => ConfigPaths::platform(),
    };
    let paths = match paths {
        Ok(p) => p,
        Err(e) => {
            eprintln!("touchgate: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Err(e) = start_runtime() {
        eprintln!("touchgate: cannot start the async runtime: {e}");
        return std::process::ExitCode::FAILURE;
    }
    match run(paths, log_file, minimized) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "touchgate-desktop failed");
            eprintln!("touchgate: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the tunnels, and Tauri's own async work, on one thread of their own, as the CLI does:
/// a tunnel is one QUIC connection driven by one task, so more threads only add wake-ups
/// between them, and on one thread the connection driver sends what several local
/// connections wrote in one datagram. (Key and PIN prompts run on the blocking pool.)
fn start_runtime() -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("tunnels".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    tauri::async_runtime::set(handle);
    Ok(())
}

fn run(paths: ConfigPaths, log_file: std::path::PathBuf, minimized: bool) -> tauri::Result<()> {
    let app = tauri::Builder::default()
        // First: a second launch shows this one's window instead of starting again.
        .plugin(tauri_plugin_single_instance::init(|app, _argv, _cwd| {
            shell::show_window(app, Route::Status);
        }))
        .plugin(tauri_plugin_notification::init())
        .plugin(tauri_plugin_autostart::init(
            tauri_plugin_autostart::MacosLauncher::LaunchAgent,
            Some(vec!["--minimized"]),
        ))
        .plugin(tauri_plugin_opener::init())
        .plugin(tauri_plugin_clipboard_manager::init())
        .invoke_handler(tauri::generate_handler![
            shell::request,
            shell::view,
            shell::settings,
            shell::app_info,
            shell::open_url,
            shell::copy_text,
            shell::open_log,
        ])
        .setup(move |app| {
            let (ui, rx) = ChannelUi::new();
            let controller = Controller::new(paths.clone(), ui);
            app.manage(Arc::new(shell::Desk {
                controller: controller.clone(),
                log_file: log_file.clone(),
                route: std::sync::Mutex::new(Route::Status),
            }));
            shell::build_tray(app.handle(), &controller.view())?;
            shell::serve_status(&controller);
            tauri::async_runtime::spawn(shell::run_ui(app.handle().clone(), rx));
            if let Some(w) = app.get_webview_window("main") {
                let hide = w.clone();
                w.on_window_event(move |e| {
                    // Closing the window keeps the app (and the tunnels) in the tray.
                    if let WindowEvent::CloseRequested { api, .. } = e {
                        api.prevent_close();
                        let _ = hide.hide();
                    }
                });
            }
            let settings = controller.settings().ok();
            if let Some(s) = &settings {
                shell::apply_autostart(app.handle(), s.values.autostart);
            }
            let sign_in =
                settings.is_some_and(|s| s.values.sign_in_on_launch && s.problem.is_none());
            if !minimized {
                let route = if sign_in {
                    Route::SignIn
                } else {
                    Route::Status
                };
                shell::show_window(app.handle(), route);
            }
            if sign_in {
                tauri::async_runtime::spawn(async move {
                    if let Err(e) = controller.handle(Request::SignIn).await {
                        tracing::info!(error = %e, "sign-in at launch failed");
                    }
                });
            }
            // A logout or `kill` closes the tunnels as cleanly as Quit does.
            let handle = app.handle().clone();
            tauri::async_runtime::spawn(async move {
                touchgate_common::shutdown_signal().await;
                shell::quit(&handle);
            });
            tracing::info!(config = %paths.user.display(), "touchgate-desktop started");
            Ok(())
        })
        .build(tauri::generate_context!())?;
    app.run(|app, event| {
        if let RunEvent::ExitRequested { api, code, .. } = event {
            // Closing the last window is not quitting: only Quit (which passes a code) is.
            if code.is_none() {
                api.prevent_exit();
            }
        }
        let _ = app;
    });
    Ok(())
}

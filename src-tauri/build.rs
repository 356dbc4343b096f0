//! Generates the app's context (config, icons, the built web front end) and the permissions of
//! its own commands, which the capability file grants to the main window and nothing else.

fn main() {
    let commands = &[
        "request",
        "view",
        "settings",
        "app_info",
        "open_url",
        "copy_text",
        "open_log",
    ];
    tauri_build::try_build(
        tauri_build::Attributes::new()
            .app_manifest(tauri_build::AppManifest::new().commands(commands)),
    )
    .expect("tauri build step failed");
}

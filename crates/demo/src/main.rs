//! `touchgate-demo`: the whole system on this machine, with no setup and no hardware key. It
//! runs on the test fakes, so it is its own program, built from a checkout (`./scripts/demo`)
//! and never installed: the shipped `touchgate` links no fake and no gateway.

mod demo;

use clap::Parser;

/// Run gateway, Cloud-Run-like service, software key and agent on this machine, make one
/// request through the tunnel, and keep serving until Ctrl-C.
#[derive(Parser)]
#[command(name = "touchgate-demo", version, about)]
struct Cli {
    /// Exit after the first request (0 if it succeeded).
    #[arg(long, env = "TOUCHGATE_DEMO_ONCE")]
    once: bool,
    /// Local port for the demo service (falls back to a free port when taken).
    #[arg(long, default_value_t = 8081, env = "TOUCHGATE_DEMO_PORT")]
    port: u16,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; log lines would only interleave with it.
    touchgate_common::init_logging("warn");
    // One thread, as the CLI's agent runs.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("touchgate-demo: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(demo::run(cli.once, cli.port)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("touchgate-demo: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! Runtime pieces shared by the agent and the gateway: reading and writing protocol frames on
//! async streams, the QUIC transport settings both ends use, and the one place that sets up
//! logging for the binaries.

pub mod host;
pub mod wire;

use std::time::Duration;

/// Bytes a peer may have in flight towards this end over all streams of a connection.
pub const RECEIVE_WINDOW: u32 = 64 * 1024 * 1024;

/// Transport settings for both ends of the tunnel: large stream windows for bulk transfers,
/// many concurrent streams (one per local TCP connection), and keep-alives well inside the
/// idle timeout so quiet tunnels stay open. `max_streams` is how many bidirectional streams the
/// peer may have open towards this end at once (the gateway accepts many; the agent none).
pub fn transport_config(max_streams: u32) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(max_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window((8u32 * 1024 * 1024).into());
    t.receive_window(RECEIVE_WINDOW.into());
    t.send_window(64 * 1024 * 1024);
    // The tunnel uses streams only: no buffer for datagrams a peer might send.
    t.datagram_receive_buffer_size(None);
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    if let Ok(idle) = Duration::from_secs(15).try_into() {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// Sets up logging to stderr: level from `TOUCHGATE_LOG` (`info`, `touchgate_agent=debug`, …)
/// or `default_level`; colours only on a terminal. Secrets are never logged above DEBUG.
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOUCHGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Resolves on Ctrl-C, or on SIGTERM where there are Unix signals.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

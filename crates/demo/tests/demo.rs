//! The `touchgate-demo` binary as `./scripts/demo` runs it.

use std::process::Command;

#[test]
fn demo_once_makes_a_real_request_through_the_tunnel_and_exits_zero() {
    let out = Command::new(env!("CARGO_BIN_EXE_touchgate-demo"))
        .args(["--once", "--port", "0"])
        .output()
        .expect("run touchgate-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("request through the tunnel: HTTP 200"),
        "{stdout}"
    );
    assert!(
        stdout.contains("a direct call without a token gets: HTTP 401"),
        "{stdout}"
    );
    assert!(
        stdout.contains("upstream saw user      demo@touchgate.dev"),
        "{stdout}"
    );
    assert!(stdout.contains("curl -s http://127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("  connected    over QUIC\n"), "{stdout}");
    assert!(
        stdout.contains("(TLS), for networks that drop UDP"),
        "{stdout}"
    );
}

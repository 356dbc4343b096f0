//! Running a test alone in its process. A few tests measure the process they run in (its
//! memory) or set something for all of it (the global log subscriber), so they must have it to
//! themselves. Under `cargo nextest`, which `./scripts/test` uses when it is installed, every
//! test already runs in a process of its own; under `cargo test` the tests of this binary are
//! threads of one process, so such a test runs itself again, alone, in a child process of this
//! binary, and passes or fails with it.

use std::process::Command;

/// Set in the child process that runs one test alone.
const ALONE: &str = "TOUCHGATE_E2E_ALONE";

/// `None` when the test can go on: this process is its own (nextest, or the child made here).
/// Otherwise the outcome of the test `name` (its path in this binary, `module::test`) run
/// alone in a child process, for the caller to return.
pub fn unless_alone(name: &str) -> Option<anyhow::Result<()>> {
    let nextest =
        std::env::var_os("NEXTEST_EXECUTION_MODE").is_some_and(|mode| mode == "process-per-test");
    if nextest || std::env::var_os(ALONE).is_some() {
        return None;
    }
    Some(run_alone(name))
}

fn run_alone(name: &str) -> anyhow::Result<()> {
    let out = Command::new(std::env::current_exe()?)
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(ALONE, "1")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // "1 passed" also catches a name that matches no test (0 passed, exit 0).
    anyhow::ensure!(
        out.status.success() && stdout.contains("1 passed"),
        "{name}, run alone in a child process, failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

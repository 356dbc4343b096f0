//! Terminal prompts for the security key: "touch your key", and the PIN read without echo.
//!
//! For automation the PIN can come from `--pin-file PATH` (for example `/dev/fd/3`) or the
//! `TOUCHGATE_PIN` environment variable. Both are less safe than typing it: other processes of
//! the same user can read a process's environment, and files outlive the run.

use std::path::PathBuf;

use secrecy::SecretString;
use touchgate_agent::authenticator::hid::Prompter;

/// Where the PIN comes from.
pub enum PinSource {
    /// Ask on the terminal, without echo.
    Terminal,
    /// The first line of a file (or file descriptor path).
    File(PathBuf),
    /// A fixed value (from `TOUCHGATE_PIN`).
    Value(SecretString),
}

/// Prompts on stderr.
pub struct TerminalPrompter {
    source: PinSource,
}

impl TerminalPrompter {
    /// A prompter reading the PIN from `source`.
    pub fn new(source: PinSource) -> Self {
        Self { source }
    }
}

impl Prompter for TerminalPrompter {
    fn touch(&self, key: &str) {
        eprintln!("Touch your security key ({key}) now…");
    }

    fn pin(&self, key: &str, retries: Option<i32>) -> Option<SecretString> {
        let left = retries
            .map(|r| format!(" ({r} tries left)"))
            .unwrap_or_default();
        match &self.source {
            PinSource::Value(v) => Some(v.clone()),
            PinSource::File(p) => match std::fs::read_to_string(p) {
                Ok(text) => Some(SecretString::from(
                    text.lines().next().unwrap_or("").to_owned(),
                )),
                Err(e) => {
                    eprintln!("cannot read the PIN from {}: {e}", p.display());
                    None
                }
            },
            PinSource::Terminal => rpassword::prompt_password(format!("PIN for {key}{left}: "))
                .ok()
                .filter(|p| !p.is_empty())
                .map(SecretString::from),
        }
    }
}

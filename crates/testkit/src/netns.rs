//! A test in a network namespace of its own, where UDP can really be dropped: the way to test
//! what an agent does on a network that lets no UDP through (QUIC refused, the TCP carrier
//! taken instead) without touching the machine's own firewall.
//!
//! A test starts with [`reexec_in_own_namespace`]. Run as usual, it runs the same test again in
//! a child process of the same test binary, inside a new network namespace (`unshare --net`,
//! or `unshare --map-root-user --net` in a user namespace when not root), and passes or fails
//! with it. Inside, it gets a [`NetNs`]: loopback is up and nothing else is there, and
//! [`NetNs::drop_udp`] adds or removes an nftables table that drops every UDP datagram (IPv4
//! and IPv6, in and out, loopback included). The namespace, and its firewall, end with the
//! child.
//!
//! ```no_run
//! # async fn a_test() -> anyhow::Result<()> {
//! let Some(ns) = touchgate_testkit::netns::reexec_in_own_namespace("module::a_test")? else {
//!     return Ok(()); // the child ran the test inside its namespace, and passed
//! };
//! ns.drop_udp(true)?;
//! // … QUIC fails here, TCP works …
//! # Ok(()) }
//! ```
//!
//! The child is the same libtest binary, run as `BINARY NAME --exact --nocapture` (the way
//! nextest runs a test): under `cargo nextest` the parent is already a process for this one
//! test, under `cargo test` the child runs just this test of the binary. As root a namespace
//! must be possible, and a test fails when it is not; as another user a test is skipped, saying
//! so, only where the system allows no user namespace (or no firewall inside one).
//!
//! Needs `unshare` (util-linux), `ip` (iproute2) and `nft` (nftables); Linux only.

#![cfg(target_os = "linux")]

use std::{
    io::Write as _,
    process::{Command, Output, Stdio},
};

use anyhow::{Context, bail};

/// Set in the child that runs a test inside its own namespace, to the parent's network
/// namespace (`net:[INODE]`), so that the child can check that it is not in that one before it
/// changes any firewall.
const PARENT_NAMESPACE: &str = "TOUCHGATE_TEST_PARENT_NETNS";

/// The nftables table [`NetNs::drop_udp`] adds.
const TABLE: &str = "touchgate_test_drop_udp";

/// Inside a network namespace of this test's own, made by [`reexec_in_own_namespace`]:
/// loopback up, no other interface, no route out. Only this value changes a firewall, so a test
/// cannot drop the UDP of the machine it runs on.
#[derive(Debug)]
pub struct NetNs {
    _inside: (),
}

/// Runs the test `name` (its path in the test binary, `module::test`) inside a network
/// namespace of its own, and returns:
///
/// - `Ok(Some(_))` in that namespace: the test goes on there;
/// - `Ok(None)` outside it, once the test passed in a child process inside the namespace (or,
///   when not root and the system allows no user namespace, once that was printed): the test
///   returns at once;
/// - an error when the child failed (with its output), or, as root, when no namespace could be
///   made.
pub fn reexec_in_own_namespace(name: &str) -> anyhow::Result<Option<NetNs>> {
    if let Some(parent) = std::env::var_os(PARENT_NAMESPACE) {
        return enter(&parent.to_string_lossy()).map(Some);
    }
    let unshare: &[&str] = if running_as_root()? {
        &["--net"]
    } else {
        // A user namespace first, in which this user is root and may make a network namespace
        // and set its firewall. Where the system allows none, there is no way: skip, saying so.
        let probe = Command::new("unshare")
            .args(["--map-root-user", "--net", "--", "nft", "list", "ruleset"])
            .output();
        match probe {
            Ok(out) if out.status.success() => {}
            probe => {
                let why = match probe {
                    Ok(out) => output_text(&out),
                    Err(e) => format!("cannot run unshare: {e}"),
                };
                eprintln!(
                    "SKIPPED {name}: it needs a network namespace with a firewall of its own, and \
                     as a user other than root that takes a user namespace, which this system \
                     does not allow (`unshare --map-root-user --net nft list ruleset`: {why}); \
                     run the tests as root, or allow user namespaces \
                     (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0)"
                );
                return Ok(None);
            }
        }
        &["--map-root-user", "--net"]
    };
    let exe = std::env::current_exe().context("cannot find this test binary")?;
    let out = Command::new("unshare")
        .args(unshare)
        .arg("--")
        .arg(&exe)
        // The test alone, as nextest runs one; an ignored test the parent was asked to run is
        // run too.
        .args([name, "--exact", "--nocapture", "--include-ignored"])
        .args(["--test-threads", "1"])
        .env(PARENT_NAMESPACE, current_namespace()?)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "cannot run `unshare {}` (install util-linux)",
                unshare.join(" ")
            )
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // "1 passed" also catches a name that matches no test (0 passed, exit 0).
    if !out.status.success() || !stdout.contains("1 passed") {
        let hint = if stderr.contains("unshare failed") {
            "; unshare could not make the namespace: the tests run as root need \
             CAP_SYS_ADMIN (a container started without it cannot make network namespaces)"
        } else {
            ""
        };
        bail!(
            "{name}, run again in a network namespace of its own (`unshare {} {} {name} \
             --exact`), failed ({}){hint}:\n{stdout}\n{stderr}",
            unshare.join(" "),
            exe.display(),
            out.status
        );
    }
    // What the test printed, where the parent's own output goes.
    eprint!("{stderr}");
    print!("{stdout}");
    Ok(None)
}

impl NetNs {
    /// With `true`, drops every UDP datagram in this namespace, both ways, on every interface
    /// (loopback too): an nftables table (family `inet`, so IPv4 and IPv6) with a drop rule
    /// on the input and the output hooks. A sender's `send` to another address of this host
    /// fails at once with "operation not permitted" (the output hook refuses the datagram), as
    /// with a host firewall; a datagram that came in is never seen. TCP is untouched. With
    /// `false`, removes the table: UDP flows again. Either may be repeated.
    pub fn drop_udp(&self, drop: bool) -> anyhow::Result<()> {
        // Declaring the table first makes deleting it succeed when it is not there.
        let mut script = format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n");
        if drop {
            script.push_str(&format!(
                "table inet {TABLE} {{\n\
                 \tchain input {{ type filter hook input priority filter; policy accept; meta l4proto udp drop; }}\n\
                 \tchain output {{ type filter hook output priority filter; policy accept; meta l4proto udp drop; }}\n\
                 }}\n"
            ));
        }
        nft(&script).with_context(|| {
            format!(
                "cannot {} the table that drops UDP",
                if drop { "add" } else { "remove" }
            )
        })
    }

    /// The namespace's nftables rules, as `nft list ruleset` prints them.
    pub fn ruleset(&self) -> anyhow::Result<String> {
        let out = Command::new("nft")
            .args(["list", "ruleset"])
            .output()
            .context("cannot run nft (install nftables)")?;
        if !out.status.success() {
            bail!("nft list ruleset failed: {}", output_text(&out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// In the child: checks that this is a namespace other than the parent's, and brings loopback
/// up (a new namespace's is down).
fn enter(parent: &str) -> anyhow::Result<NetNs> {
    let here = current_namespace()?;
    if here == parent {
        bail!(
            "{PARENT_NAMESPACE} is set, but this process is in the same network namespace as the \
             test that set it ({here}): refusing to change this namespace's firewall"
        );
    }
    let out = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .output()
        .context("cannot run ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "cannot bring loopback up in the test's network namespace: {}",
            output_text(&out)
        );
    }
    Ok(NetNs { _inside: () })
}

/// `net:[INODE]`: which network namespace this process is in.
fn current_namespace() -> anyhow::Result<String> {
    let link = std::fs::read_link("/proc/self/ns/net")
        .context("cannot read /proc/self/ns/net (network namespaces need Linux with /proc)")?;
    Ok(link.to_string_lossy().into_owned())
}

/// Whether this process runs as root (effective user id 0).
fn running_as_root() -> anyhow::Result<bool> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    // Uid: real effective saved filesystem
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no Uid line in /proc/self/status")?;
    Ok(effective == "0")
}

/// Runs an nftables script (`nft -f -`).
fn nft(script: &str) -> anyhow::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run nft (install nftables)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .context("cannot write to nft")?;
    }
    let out = child.wait_with_output().context("cannot run nft")?;
    if !out.status.success() {
        bail!("nft failed: {}\nthe script:\n{script}", output_text(&out));
    }
    Ok(())
}

/// A failed command's status, standard output and error, for an error message.
fn output_text(out: &Output) -> String {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_owned();
    let mut s = out.status.to_string();
    for stream in [text(&out.stdout), text(&out.stderr)] {
        if !stream.is_empty() {
            s.push('\n');
            s.push_str(&stream);
        }
    }
    s
}

//! Debian's tinyproxy as the HTTP proxy of a company network: `CONNECT` to any port (tinyproxy
//! allows every port when its configuration has no `ConnectPort` line, and this one has none),
//! from 127.0.0.1 only, with Basic credentials when asked for. Its log says what it tunnelled
//! ([`HttpProxy::connects`], [`HttpProxy::tunnels`]), so a test can show that its traffic went
//! through the proxy.
//!
//! Debian 12's tinyproxy (1.11.1) answers a request without credentials `407 Proxy
//! Authentication Required` (with `Proxy-Authenticate`), but one with wrong credentials `401
//! Unauthorized`, where a proxy should answer 407 again (tinyproxy's issue 532, fixed after
//! 1.11). A client must take both as the proxy refusing its credentials; tests see what
//! tinyproxy does.
//!
//! tinyproxy runs in the foreground (`-d`) as the test's user, with its configuration, log and
//! PID file in a temporary directory of its own. Needs Debian's `tinyproxy` package.

// Runs a program of the system, and reads in Linux's /proc when it listens.
#![cfg(target_os = "linux")]

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::programs::{Foreground, free_port, require, tail};

/// Debian's tinyproxy.
const TINYPROXY: &str = "/usr/bin/tinyproxy";
/// Ports tried when the one picked was taken before tinyproxy could bind it.
const PORT_ATTEMPTS: usize = 5;
/// How much of the log an error shows.
const LOG_TAIL: usize = 4000;
/// How long a connection may be silent before tinyproxy closes it (seconds).
const IDLE_TIMEOUT_SECS: u32 = 3600;
/// tinyproxy's log line for each request it read: `… Request (file descriptor N): CONNECT
/// host:port HTTP/1.1`.
const REQUEST: &str = "Request (file descriptor ";
/// tinyproxy's log line for each connection it opened to where a client asked.
const ESTABLISHED: &str = "Established connection to host ";

/// A running tinyproxy on a port of 127.0.0.1. Dropping it kills it and removes its directory.
pub struct HttpProxy {
    /// `127.0.0.1:PORT`.
    pub addr: SocketAddr,
    credentials: Option<(String, String)>,
    process: Option<Foreground>,
    dir: TempDir,
}

impl HttpProxy {
    /// Starts tinyproxy on a free port of 127.0.0.1, asking for Basic `credentials` (user and
    /// password: letters, digits and `-._~`, so that [`HttpProxy::url`] needs no escaping) when
    /// given. Returns once it accepts connections; fails with its log when it cannot start, or
    /// with what to install when it is missing.
    pub async fn start(credentials: Option<(&str, &str)>) -> anyhow::Result<Self> {
        require(Path::new(TINYPROXY), "tinyproxy")?;
        if let Some((user, password)) = credentials {
            for word in [user, password] {
                if word.is_empty()
                    || !word
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
                {
                    bail!("proxy credential {word:?}: letters, digits and -._~ only");
                }
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("touchgate-tinyproxy-")
            .tempdir()
            .context("cannot make a temporary directory for tinyproxy")?;
        let mut proxy = Self {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
            process: None,
            dir,
        };
        let mut attempt = 1;
        loop {
            proxy.addr.set_port(free_port()?);
            std::fs::write(proxy.config_path(), proxy.config())
                .context("cannot write tinyproxy's configuration")?;
            let mut command = Command::new(TINYPROXY);
            command
                .arg("-d")
                .arg("-c")
                .arg(proxy.config_path())
                .current_dir(proxy.dir.path());
            let mut process = Foreground::spawn(command, &proxy.dir.path().join("output.log"))?;
            match process.wait_listening(proxy.addr).await {
                Ok(()) => {
                    proxy.process = Some(process);
                    return Ok(proxy);
                }
                // tinyproxy's own words vary; a port someone else now holds says enough.
                Err(_)
                    if attempt < PORT_ATTEMPTS
                        && std::net::TcpListener::bind(proxy.addr).is_err() =>
                {
                    attempt += 1;
                }
                Err(why) => bail!(
                    "tinyproxy did not start on {}: it {}; what it printed:\n{}\nits log:\n{}",
                    proxy.addr,
                    why.describe(),
                    tail(&proxy.dir.path().join("output.log"), LOG_TAIL),
                    proxy.log()
                ),
            }
        }
    }

    /// `http://[user:password@]127.0.0.1:PORT`: the proxy as a client's setting names it.
    pub fn url(&self) -> String {
        match &self.credentials {
            Some((user, password)) => format!("http://{user}:{password}@{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    /// The `Proxy-Authorization` header value for the proxy's credentials, if it asks for any.
    pub fn authorization(&self) -> Option<String> {
        use base64::Engine as _;
        self.credentials.as_ref().map(|(user, password)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )
        })
    }

    /// The targets (`host:port`) of every `CONNECT` request tinyproxy read, in order, the
    /// refused ones (no or wrong credentials) included.
    pub fn connects(&self) -> Vec<String> {
        self.log_lines()
            .iter()
            .filter_map(|l| {
                let request = &l[l.find(REQUEST)?..];
                let target = request.split_once("): CONNECT ")?.1;
                Some(target.split_whitespace().next()?.to_owned())
            })
            .collect()
    }

    /// How many connections tinyproxy opened to where its clients asked: each `CONNECT` it let
    /// through is one (the tests send it nothing else).
    pub fn tunnels(&self) -> usize {
        self.log_lines()
            .iter()
            .filter(|l| l.contains(ESTABLISHED))
            .count()
    }

    /// tinyproxy's log, the end of it.
    pub fn log(&self) -> String {
        tail(&self.log_path(), LOG_TAIL)
    }

    fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("tinyproxy.log")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("tinyproxy.conf")
    }

    /// The whole configuration. No `ConnectPort` line: `CONNECT` to any port.
    fn config(&self) -> String {
        let d = self.dir.path().display();
        let mut text = format!(
            "# tinyproxy for touchgate's tests: a company's HTTP proxy.\n\
             Listen 127.0.0.1\n\
             Port {port}\n\
             Timeout {IDLE_TIMEOUT_SECS}\n\
             MaxClients 100\n\
             Allow 127.0.0.1\n\
             DisableViaHeader Yes\n\
             LogFile \"{d}/tinyproxy.log\"\n\
             # Each request and each connection made, and no more.\n\
             LogLevel Connect\n\
             PidFile \"{d}/tinyproxy.pid\"\n",
            port = self.addr.port()
        );
        if let Some((user, password)) = &self.credentials {
            text.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        text
    }
}

impl Drop for HttpProxy {
    fn drop(&mut self) {
        // Before the directory goes: tinyproxy is killed and reaped first.
        drop(self.process.take());
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// Sends `CONNECT target` through `proxy` with `authorization`, and returns the answer's
    /// head and the stream.
    async fn connect(
        proxy: &HttpProxy,
        target: SocketAddr,
        authorization: Option<&str>,
    ) -> anyhow::Result<(String, TcpStream)> {
        let mut s = TcpStream::connect(proxy.addr).await?;
        let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(a) = authorization {
            head.push_str(&format!("Proxy-Authorization: {a}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await?;
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\n") && s.read(&mut byte).await? == 1 {
            answer.push(byte[0]);
        }
        Ok((String::from_utf8_lossy(&answer).into_owned(), s))
    }

    #[tokio::test]
    async fn tinyproxy_tunnels_to_any_port_with_the_credentials_only() -> anyhow::Result<()> {
        let target = TcpListener::bind("127.0.0.1:0").await?;
        let target_addr = target.local_addr()?;
        let proxy = HttpProxy::start(Some(("alice", "s3cret"))).await?;
        assert_eq!(proxy.url(), format!("http://alice:s3cret@{}", proxy.addr));

        let (refused, _) = connect(&proxy, target_addr, None).await?;
        assert!(
            refused.starts_with("HTTP/1.0 407") && refused.contains("Proxy-Authenticate: Basic"),
            "{refused}"
        );
        let (refused, _) = connect(&proxy, target_addr, Some("Basic YWxpY2U6d3Jvbmc=")).await?;
        assert!(
            refused.starts_with("HTTP/1.0 401") || refused.starts_with("HTTP/1.0 407"),
            "{refused}"
        );
        assert_eq!(proxy.tunnels(), 0, "{}", proxy.log());

        let authorization = proxy.authorization();
        let (answer, mut s) = connect(&proxy, target_addr, authorization.as_deref()).await?;
        assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
        let (mut server, _) = target.accept().await?;
        s.write_all(b"through").await?;
        let mut got = [0u8; 7];
        server.read_exact(&mut got).await?;
        assert_eq!(&got, b"through");

        assert_eq!(proxy.tunnels(), 1, "{}", proxy.log());
        assert_eq!(proxy.connects(), vec![target_addr.to_string(); 3]);
        Ok(())
    }

    #[tokio::test]
    async fn tinyproxy_without_credentials_tunnels_anyone_on_loopback() -> anyhow::Result<()> {
        let target = TcpListener::bind("127.0.0.1:0").await?;
        let proxy = HttpProxy::start(None).await?;
        assert_eq!(proxy.url(), format!("http://{}", proxy.addr));
        assert_eq!(proxy.authorization(), None);
        let (answer, _s) = connect(&proxy, target.local_addr()?, None).await?;
        assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
        assert_eq!(proxy.tunnels(), 1, "{}", proxy.log());
        Ok(())
    }
}

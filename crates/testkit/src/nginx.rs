//! Debian's nginx as a TLS-terminating WebSocket reverse proxy in front of a plain-HTTP
//! upstream: what Cloud Run's front end is to a gateway serving the carrier at `listen_ws`. The
//! client speaks TLS (a certificate for `localhost` and 127.0.0.1 signed by a test CA) and
//! HTTP/1.1 to nginx; nginx passes requests, WebSocket upgrades included, to the upstream over
//! plain HTTP/1.1, with `X-Forwarded-For` and `X-Forwarded-Proto` as Cloud Run adds them, and
//! keeps an upgraded connection open for an hour of silence.
//!
//! [`Nginx::restart`] cuts every open connection, as Cloud Run does when a request (a
//! WebSocket included) reaches its timeout: nginx is killed, which closes every client's and
//! upstream's TCP connection at once, and started again on the same port. Reloading would
//! not do it: a reload (`SIGHUP`) leaves the old worker serving its upgraded connections until
//! they end.
//!
//! nginx runs in the foreground as one process (`master_process off`), as the test's user,
//! with its configuration, certificate, PID file, logs and temporary files in a temporary
//! directory of its own. Needs Debian's `nginx` package.

// Runs a program of the system, and reads in Linux's /proc when it listens.
#![cfg(target_os = "linux")]

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::{
    PrivateCa,
    programs::{Foreground, free_port, require, tail},
};

/// Debian's nginx.
const NGINX: &str = "/usr/sbin/nginx";
/// Ports tried when the one picked was taken before nginx could bind it.
const PORT_ATTEMPTS: usize = 5;
/// nginx's words when its port is taken.
const PORT_TAKEN: &str = "Address already in use";
/// How much of the error log an error shows.
const LOG_TAIL: usize = 4000;
/// How long an upgraded connection may be silent, either way, before nginx closes it (Cloud
/// Run's longest request timeout).
const IDLE_TIMEOUT: &str = "3600s";

/// nginx in front of an upstream, with TLS, on a port of 127.0.0.1. Dropping it kills nginx and
/// removes its directory.
pub struct Nginx {
    /// `127.0.0.1:PORT`, where it takes TLS; the same across [`Nginx::restart`].
    pub addr: SocketAddr,
    process: Option<Foreground>,
    dir: TempDir,
}

impl Nginx {
    /// Starts nginx on a free port of 127.0.0.1, with TLS under a certificate `ca` signed for
    /// `localhost` and 127.0.0.1 ([`PrivateCa::leaf_pem`]), passing every request to `upstream`
    /// over plain HTTP. Returns once nginx accepts connections; fails with its error log when
    /// it cannot start, or with what to install when nginx is missing.
    pub async fn start(upstream: SocketAddr, ca: &PrivateCa) -> anyhow::Result<Self> {
        require(Path::new(NGINX), "nginx")?;
        let dir = tempfile::Builder::new()
            .prefix("touchgate-nginx-")
            .tempdir()
            .context("cannot make a temporary directory for nginx")?;
        let (cert, key) = &ca.leaf_pem;
        std::fs::write(dir.path().join("cert.pem"), cert)?;
        std::fs::write(dir.path().join("key.pem"), key)?;
        std::fs::write(dir.path().join("ca.pem"), &ca.ca_pem)?;
        let mut nginx = Self {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            process: None,
            dir,
        };
        let mut attempt = 1;
        loop {
            nginx.addr.set_port(free_port()?);
            std::fs::write(nginx.config_path(), nginx.config(upstream))
                .context("cannot write nginx's configuration")?;
            match nginx.run().await {
                Err(e) if attempt < PORT_ATTEMPTS && format!("{e:#}").contains(PORT_TAKEN) => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
                Ok(()) => return Ok(nginx),
            }
        }
    }

    /// `https://localhost:PORT`: nginx by the name in its certificate.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// The test CA's certificate (PEM), which a client trusts to reach nginx.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Cuts every open connection, upgraded WebSockets included, as Cloud Run does at its
    /// request timeout: kills nginx (its clients and the upstream see their TCP connections
    /// close, with no WebSocket close frame) and starts it again on the same port and
    /// configuration. Returns once it accepts connections again.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.run().await.map_err(|e| {
            anyhow::anyhow!(
                "nginx did not start again on {} (another process may have taken the port \
                 while it was stopped): {e:#}",
                self.addr
            )
        })
    }

    /// Kills nginx: every connection through it closes, and nothing answers at its port until
    /// [`Nginx::restart`].
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Whether nginx runs (it was started and not stopped since).
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// nginx's error log (and what it printed), the end of it.
    pub fn error_log(&self) -> String {
        tail(&self.dir.path().join("error.log"), LOG_TAIL)
    }

    /// Runs nginx with the configuration written and waits until it accepts connections.
    async fn run(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let mut command = Command::new(NGINX);
        command
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(self.config_path())
            // Where nginx writes before it has read the configuration (else a path under
            // /var/log, which the test's user may not write).
            .arg("-e")
            .arg(d.join("error.log"))
            .current_dir(d);
        let mut process = Foreground::spawn(command, &d.join("error.log"))?;
        match process.wait_listening(self.addr).await {
            Ok(()) => {
                self.process = Some(process);
                Ok(())
            }
            Err(why) => bail!(
                "nginx did not start on {}: it {}; its error log:\n{}",
                self.addr,
                why.describe(),
                self.error_log()
            ),
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("nginx.conf")
    }

    /// The whole configuration: one server, with TLS, on [`Nginx::addr`], passing everything to
    /// `upstream`.
    fn config(&self, upstream: SocketAddr) -> String {
        let d = self.dir.path().display();
        let listen = self.addr;
        format!(
            r#"# nginx for touchgate's tests: a TLS-terminating WebSocket front end, as Cloud Run's.
daemon off;
master_process off;
worker_processes 1;
pid "{d}/nginx.pid";
error_log "{d}/error.log" info;

events {{
    worker_connections 1024;
}}

http {{
    access_log "{d}/access.log";
    client_body_temp_path "{d}/client_body";
    proxy_temp_path "{d}/proxy";
    fastcgi_temp_path "{d}/fastcgi";
    uwsgi_temp_path "{d}/uwsgi";
    scgi_temp_path "{d}/scgi";

    # An upgrade is passed on as one; any other request asks the upstream to close after it.
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    server {{
        listen {listen} ssl;
        server_name localhost;
        ssl_certificate "{d}/cert.pem";
        ssl_certificate_key "{d}/key.pem";
        ssl_protocols TLSv1.2 TLSv1.3;

        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
            proxy_read_timeout {IDLE_TIMEOUT};
            proxy_send_timeout {IDLE_TIMEOUT};
            proxy_buffering off;
        }}
    }}
}}
"#
        )
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Before the directory goes: nginx is killed and reaped first.
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// An upstream that answers every request with `101 Switching Protocols` and then echoes.
    async fn echoing_upgrades() -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if read_head(&mut s).await.is_none() {
                        return;
                    }
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                              Connection: Upgrade\r\n\r\n",
                        )
                        .await;
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Ok(addr)
    }

    /// Reads up to the end of an HTTP head; `None` when the stream ends first.
    async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<String> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return None,
            }
        }
        Some(String::from_utf8_lossy(&head).into_owned())
    }

    /// TLS to nginx, trusting only the test CA.
    async fn tls(
        nginx: &Nginx,
    ) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = TcpStream::connect(nginx.addr).await?;
        Ok(crate::tls_connector(&nginx.ca_path())?
            .connect(rustls::pki_types::ServerName::try_from("localhost")?, tcp)
            .await?)
    }

    /// An upgraded connection through nginx, echoing.
    async fn upgraded(
        nginx: &Nginx,
    ) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let mut s = tls(nginx).await?;
        s.write_all(
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await?;
        let head = read_head(&mut s).await.context("no answer")?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 101"), "{head}");
        s.write_all(b"ping").await?;
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo).await?;
        anyhow::ensure!(&echo == b"ping", "echoed {echo:?}");
        Ok(s)
    }

    #[tokio::test]
    async fn nginx_passes_upgrades_and_its_restart_cuts_the_open_ones() -> anyhow::Result<()> {
        let upstream = echoing_upgrades().await?;
        let ca = PrivateCa::new()?;
        let mut nginx = Nginx::start(upstream, &ca).await?;
        let port = nginx.addr.port();
        let mut open = upgraded(&nginx).await?;

        nginx.restart().await?;

        // The open connection ends (EOF or an error), with nothing more read from it.
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            open.read_to_end(&mut rest),
        )
        .await
        .context("the open connection outlived nginx's restart")?;
        assert!(rest.is_empty(), "{ended:?} {rest:?}");
        assert_eq!(nginx.addr.port(), port);
        let again = upgraded(&nginx).await?;
        drop(again);

        nginx.stop();
        assert!(!nginx.is_running());
        assert!(
            TcpStream::connect(nginx.addr).await.is_err(),
            "a stopped nginx answered"
        );
        Ok(())
    }

    #[tokio::test]
    async fn nginx_says_why_it_did_not_start() -> anyhow::Result<()> {
        let ca = PrivateCa::new()?;
        let mut nginx = Nginx::start(SocketAddr::from(([127, 0, 0, 1], 9)), &ca).await?;
        nginx.stop();
        let _taken = std::net::TcpListener::bind(nginx.addr)?;
        let refused = nginx
            .restart()
            .await
            .expect_err("nginx started on a taken port");
        let refused = format!("{refused:#}");
        assert!(refused.contains(PORT_TAKEN), "{refused}");
        assert!(refused.contains(&nginx.addr.to_string()), "{refused}");
        Ok(())
    }
}

//! More gateways of a lab's system: replicas on the same SQLite file, certificate and config,
//! each with ports and an audit log of its own, and each on a runtime of its own thread so that
//! [`Replica::kill`] can end it the way SIGKILL ends a process: every task gone at once, no
//! close frame sent, its UDP port answering nothing, its carriers' TCP connections closed.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Instant};

use anyhow::Context;
use touchgate_gateway::{Gateway, GatewayConfig, shards::Shards};

use super::{Lab, launch, read_audit, with_event};

/// A gateway replica started by [`Lab::start_replica`].
pub struct Replica {
    /// The replica's gateway.
    pub gateway: Arc<Gateway>,
    /// Its QUIC address (UDP); the carrier with TLS is at the same port on TCP.
    pub quic_addr: SocketAddr,
    /// Its plain-HTTP carrier (`listen_ws`).
    pub ws_addr: SocketAddr,
    audit_path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Lab {
    /// Starts another gateway on this lab's database, certificate and config, on a free UDP
    /// port of 127.0.0.1 and with its own audit log (`audit-NAME.jsonl`), as a second replica
    /// of one deployment would run.
    pub async fn start_replica(&self, name: &str) -> anyhow::Result<Replica> {
        self.start_replica_on(name, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
    }

    /// [`Lab::start_replica`] listening on `listen` (`[::1]:0` for one reached over IPv6).
    pub async fn start_replica_on(
        &self,
        name: &str,
        listen: SocketAddr,
    ) -> anyhow::Result<Replica> {
        let text = std::fs::read_to_string(&self.gateway_config_path)?;
        let audit = format!("audit-{name}.jsonl");
        let own = text.replace(
            "audit_log = \"audit.jsonl\"",
            &format!("audit_log = \"{audit}\""),
        );
        anyhow::ensure!(own != text, "the lab's gateway config names no audit log");
        let path = self.dir.path().join(format!("gateway-{name}.toml"));
        std::fs::write(&path, own)?;
        let mut cfg = GatewayConfig::load(&path)?;
        cfg.listen = listen;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("replica-{name}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                        return;
                    }
                };
                let launched = rt.block_on(async move {
                    match launch(cfg, None, Arc::new(Shards::current())).await {
                        Ok(launched) => {
                            let _ = ready_tx.send(Ok((launched.gateway.clone(), launched.addrs)));
                            // The endpoints and every task live until the runtime goes.
                            let _ = stopped.await;
                            Some(launched)
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            None
                        }
                    }
                });
                // A current-thread runtime runs nothing outside `block_on`: from here no task
                // of this gateway is polled again, so nothing more is sent, and its tasks are
                // dropped without being woken. Its carriers' TCP connections close.
                if let Some(mut launched) = launched {
                    launched.serving.carriers.join();
                }
                rt.shutdown_background();
            })
            .context("cannot start a replica thread")?;
        let (gateway, addrs) = ready_rx.await.context("the replica thread ended")??;
        Ok(Replica {
            gateway,
            quic_addr: addrs.quic,
            ws_addr: addrs.ws,
            audit_path: self.dir.path().join(audit),
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Replica {
    /// Its carrier with TLS: TCP at the QUIC port.
    pub fn carrier_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// Ends the replica as SIGKILL would: its runtime stops at once, so no QUIC connection is
    /// closed and no packet is answered any more, and its carriers' TCP connections close (as
    /// the kernel closes a killed process's). Returns, once it has stopped, the moment it was
    /// told to.
    pub async fn kill(&mut self) -> Instant {
        drop(self.stop.take());
        let killed = Instant::now();
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        killed
    }

    /// The replica's audit log, one JSON value per line.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.gateway.flush_audit();
        read_audit(&self.audit_path)
    }

    /// Its audit lines with `event`.
    pub fn audit_events(&self, event: &str) -> Vec<serde_json::Value> {
        with_event(self.audit(), event)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        // The thread ends on its own once told; nothing waits for it here.
        drop(self.stop.take());
    }
}

//! The local ports: binding each service's port on both loopbacks, refusing other OS users'
//! connections, and carrying each accepted connection over a stream of the tunnel.

use super::*;

/// Binds a service's local port on 127.0.0.1 and, with the same number, on [::1]:
/// `localhost` may resolve to ::1 first, and a port left free there could be taken by another
/// user, who would then get what tools and browsers send to localhost:PORT. A port picked by
/// the system (`local_port = 0`) is picked again when its IPv6 twin is taken.
pub(super) async fn bind_local(
    name: &str,
    setting: &'static str,
    local_port: u16,
) -> Result<(TcpListener, Option<TcpListener>), AgentError> {
    let mut tries = 0;
    loop {
        let l = TcpListener::bind(("127.0.0.1", local_port))
            .await
            .map_err(|source| AgentError::Bind {
                service: name.to_owned(),
                setting,
                port: local_port,
                source,
            })?;
        let port = l.local_addr().map(|a| a.port()).unwrap_or(local_port);
        match TcpListener::bind(("::1", port)).await {
            Ok(l6) => return Ok((l, Some(l6))),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                tries += 1;
                if local_port != 0 || tries == 5 {
                    return Err(AgentError::BindV6Taken {
                        service: name.to_owned(),
                        setting,
                        port,
                    });
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "no IPv6 loopback: serving 127.0.0.1 only");
                return Ok((l, None));
            }
        }
    }
}

/// One service's local port, as its accept loop serves it.
pub(super) struct Local {
    pub(super) service: String,
    /// The encoded `StreamOpen` frame every stream of this service starts with.
    pub(super) open: Arc<[u8]>,
    /// Close connections from other OS users (Linux, unless `allow_other_users`).
    pub(super) check_owner: bool,
}

/// How often a refused local connection is logged at most, per service; the rest are counted.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Serves one service's local port: each connection is carried over a stream of the tunnel.
pub(super) async fn serve_local(
    listener: TcpListener,
    local: Arc<Local>,
    conn: watch::Receiver<Option<quinn::Connection>>,
) {
    let (name, check_owner) = (local.service.clone(), local.check_owner);
    accept_loop(listener, &name, check_owner, move |tcp| {
        let (local, conn) = (local.clone(), conn.clone());
        async move { handle_local(tcp, &local, &[], conn).await }
    })
    .await
}

/// Accepts connections on a local port and hands each one of this OS user to `handle`, on a
/// task of its own. `name` (a service, or the by-name port) is for the log.
pub(super) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    name: &str,
    check_owner: bool,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut owners = OwnerCheck::new();
    let mut refusals = RefusalLog::default();
    if check_owner && owners.own_uid().is_none() {
        tracing::warn!(service = %name, "cannot tell which OS user this agent runs as, so every local connection will be refused (set allow_other_users = true to serve them all)");
    }
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if check_owner && let Err(why) = same_user(&mut owners, &tcp, peer) {
            // Closed before any stream is opened: the gateway never hears of it.
            drop(tcp);
            refusals.note(name, peer, why);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        tokio::spawn(handle(tcp).instrument(tracing::debug_span!("local", %peer)));
    }
}

/// Why a local connection was refused.
enum NotOurs {
    /// Another OS user owns the peer socket.
    OtherUser(u32),
    /// The owner could not be found.
    Unknown(String),
}

/// Checks that the OS user owning the peer socket of `tcp` is the agent's own.
fn same_user(
    owners: &mut OwnerCheck,
    tcp: &tokio::net::TcpStream,
    peer: SocketAddr,
) -> Result<(), NotOurs> {
    let own = owners
        .own_uid()
        .ok_or_else(|| NotOurs::Unknown("the agent's own user is not known".into()))?;
    let local = tcp
        .local_addr()
        .map_err(|e| NotOurs::Unknown(e.to_string()))?;
    match owners.owner(peer, local) {
        Ok(uid) if uid == own => Ok(()),
        Ok(uid) => Err(NotOurs::OtherUser(uid)),
        Err(e) => Err(NotOurs::Unknown(e.to_string())),
    }
}

/// Logs refused local connections at most once per [`REFUSAL_LOG_EVERY`], so a flood of them
/// does not flood the log; the next line says how many were not logged.
#[derive(Default)]
struct RefusalLog {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl RefusalLog {
    fn note(&mut self, service: &str, peer: SocketAddr, why: NotOurs) {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|at| now.duration_since(at) < REFUSAL_LOG_EVERY)
        {
            self.suppressed += 1;
            return;
        }
        self.last = Some(now);
        let suppressed = std::mem::take(&mut self.suppressed);
        match why {
            NotOurs::OtherUser(uid) => tracing::warn!(
                %service, uid, %peer, suppressed,
                "refused a local connection from another user of this machine (set allow_other_users = true to serve other users)"
            ),
            NotOurs::Unknown(reason) => tracing::warn!(
                %service, %peer, %reason, suppressed,
                "refused a local connection whose user could not be found (set allow_other_users = true to serve connections without this check)"
            ),
        }
    }
}

/// Carries one local connection over a stream, `head` (bytes already read from it) first.
pub(super) async fn handle_local(
    tcp: tokio::net::TcpStream,
    local: &Local,
    head: &[u8],
    mut conn: watch::Receiver<Option<quinn::Connection>>,
) {
    let service = local.service.as_str();
    let deadline = tokio::time::Instant::now() + LOCAL_WAIT;
    loop {
        let current = conn.borrow_and_update().clone();
        if let Some(c) = current.filter(|c| c.close_reason().is_none()) {
            match tokio::time::timeout_at(deadline, c.open_bi()).await {
                Ok(Ok((mut send, recv))) => {
                    if send.write_all(&local.open).await.is_ok()
                        && send.write_all(head).await.is_ok()
                    {
                        pipe(tcp, send, recv, service).await;
                        return;
                    }
                    tracing::debug!("stream failed; waiting for the tunnel");
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "stream failed; waiting for the tunnel");
                }
                Err(_) => break,
            }
        }
        if tokio::time::timeout_at(deadline, conn.changed())
            .await
            .is_err()
        {
            break;
        }
    }
    tracing::warn!(
        "service {service}: no connection to the gateway within {}s; closing the local connection",
        LOCAL_WAIT.as_secs()
    );
}

/// Carries a local connection over a freshly opened stream. The application's first bytes go
/// out right behind the `StreamOpen` frame, without waiting for the gateway's answer (which
/// saves a round trip on every new connection); the answer is read before any byte is passed
/// back, and a refusal closes the local connection.
async fn pipe(
    tcp: tokio::net::TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    service: &str,
) {
    use tokio::io::AsyncWriteExt;
    let (tr, mut tw) = tcp.into_split();
    let up = async move {
        let mut tr = tokio::io::BufReader::with_capacity(COPY_BUF, tr);
        let n = tokio::io::copy_buf(&mut tr, &mut send).await;
        let _ = send.finish();
        n
    };
    let down = async move {
        match tokio::time::timeout(LOCAL_WAIT, read_frame::<StreamReply, _>(&mut recv)).await {
            Ok(Ok(Some(StreamReply::Accepted))) => {
                let mut recv = tokio::io::BufReader::with_capacity(COPY_BUF, recv);
                let n = tokio::io::copy_buf(&mut recv, &mut tw).await;
                let _ = tw.shutdown().await;
                Ok(n)
            }
            Ok(Ok(Some(StreamReply::Refused(r)))) => Err(format!("{r} ({:?})", r.code)),
            Ok(Ok(None)) => Err("the gateway closed the stream".to_owned()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "the gateway did not answer within {}s",
                LOCAL_WAIT.as_secs()
            )),
        }
    };
    tokio::pin!(up);
    tokio::pin!(down);
    let mut up_done = false;
    loop {
        tokio::select! {
            d = &mut down => {
                match d {
                    Ok(down) => {
                        // The gateway has finished; let the local side finish too.
                        if !up_done {
                            let _ = (&mut up).await;
                        }
                        tracing::debug!(?down, "local connection closed");
                    }
                    // Refused or lost: whatever the local side still sends goes nowhere.
                    Err(reason) => tracing::warn!("service {service}: {reason}"),
                }
                return;
            }
            // The local side finished sending (half-close); the answer may still be coming.
            _ = &mut up, if !up_done => up_done = true,
        }
    }
}

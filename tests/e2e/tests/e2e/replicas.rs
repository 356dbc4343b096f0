//! Two gateway replicas — two `touchgate-gateway serve` processes — on one real PostgreSQL:
//! they serve the same users, an agent moves from one to the other with no touch when its own
//! is killed, a revoke made anywhere closes the user's connection on whichever replica holds
//! it, a delegated grant revoked on one replica ends its delegate on the other, races through
//! both keep invites and signature counters to their rules, and the database going away spares
//! open sessions.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use touchgate_agent::{
    AgentConfig, AgentState, RunningAgent, SharedAuthn,
    delegation::{self, DelegateKey, GrantRequest},
    tunnel::{SessionKey, Tunnel, TunnelError, client_endpoint},
};
use touchgate_e2e::{get, request, soft_authn, wait_for_state};
use touchgate_proto::{RefusalCode, close};
use touchgate_testkit::{
    gateway_process::{GatewayProcess, gateway_program},
    lab::{Lab, LabOptions},
    postgres::Postgres,
};

/// The lab (its config, certificate, fake Google and Cloud Run), PostgreSQL, and replicas A
/// and B serving the lab's config on it.
struct Replicas {
    lab: Lab,
    pg: Postgres,
    a: GatewayProcess,
    b: GatewayProcess,
}

impl Replicas {
    async fn start() -> anyhow::Result<Self> {
        let lab = Lab::start(LabOptions::default()).await?;
        let pg = Postgres::start().await?;
        let dir = lab.dir.path();
        let config = lab.gateway_config_path.clone();
        // Started together: the first start's migrations and keys must be agreed on.
        let (audit_a, audit_b) = (dir.join("audit-a.jsonl"), dir.join("audit-b.jsonl"));
        let (a, b) = tokio::join!(
            GatewayProcess::start(&config, &pg.url, &audit_a),
            GatewayProcess::start(&config, &pg.url, &audit_b),
        );
        Ok(Self {
            lab,
            pg,
            a: a?,
            b: b?,
        })
    }

    /// `touchgate-gateway invite USER`, run as an admin would on any machine that reaches the
    /// database: the code.
    fn invite(&self, user: &str) -> anyhow::Result<String> {
        let out = self.admin(&["invite", user])?;
        Ok(out.lines().last().unwrap_or_default().trim().to_owned())
    }

    /// An admin command on the shared database; what it printed.
    fn admin(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = std::process::Command::new(gateway_program()?)
            .args(args)
            .arg("--config")
            .arg(&self.lab.gateway_config_path)
            .env("TOUCHGATE_GATEWAY_DATABASE", &self.pg.url)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An agent config for `user` with a soft key of its own, pointing at `gateways`.
    fn agent(
        &self,
        user: &str,
        gateways: &[SocketAddr],
    ) -> anyhow::Result<(AgentConfig, SharedAuthn, PathBuf)> {
        let key = self
            .lab
            .dir
            .path()
            .join(format!("{}.softkey", user.replace('@', "_")));
        let mut cfg = self.lab.agent_config(user, &key, &[])?;
        cfg.gateway = gateways
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .into();
        let authn = soft_authn(&key)?;
        Ok((cfg, authn, key))
    }

    /// `user` enrolled through `via` with an invite made by the admin command.
    async fn enrolled(
        &self,
        user: &str,
        via: SocketAddr,
    ) -> anyhow::Result<(AgentConfig, SharedAuthn, PathBuf)> {
        let (cfg, authn, key) = self.agent(user, &[via])?;
        touchgate_agent::enroll(&cfg, &authn, &self.invite(user)?).await?;
        Ok((cfg, authn, key))
    }
}

/// The replica at `addr`, and the other one.
fn which(r: &mut Replicas, addr: SocketAddr) -> (&mut GatewayProcess, &GatewayProcess) {
    if r.a.quic_addr == addr {
        (&mut r.a, &r.b)
    } else {
        (&mut r.b, &r.a)
    }
}

/// Starts a large download through `local` and reads a little of it: a transfer in flight.
async fn download_in_flight(local: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let mut s = tokio::net::TcpStream::connect(local).await?;
    s.write_all(b"GET /bytes?n=1000000000 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < 256 * 1024 {
        let n = s.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "the download ended early");
        got += n;
    }
    Ok(s)
}

#[tokio::test]
async fn an_agent_moves_to_the_other_replica_with_no_touch_and_revokes_reach_it()
-> anyhow::Result<()> {
    let mut r = Replicas::start().await?;
    let user = "alice@example.com";
    // Enrolled through A with an invite the admin made on the database (as from B's machine).
    r.enrolled(user, r.a.quic_addr).await?;
    let (cfg, authn, _) = r.agent(user, &[r.a.quic_addr, r.b.quic_addr])?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").expect("api port");
    assert_eq!(get(api, "/first", &[]).await?.status, 200);
    let first = agent.connection().expect("connected").remote_address();
    let (mine, other) = which(&mut r, first);
    let challenges_before = other.audit_events("challenge_issued").len();

    let mut download = download_in_flight(api).await?;
    mine.kill().await?;
    let killed = Instant::now();
    // New requests go through the other replica, with no touch.
    let mut tries = 0;
    loop {
        tries += 1;
        if let Ok(Ok(a)) =
            tokio::time::timeout(Duration::from_secs(2), get(api, "/after", &[])).await
            && a.status == 200
        {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no answer after the kill"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = killed.elapsed();
    eprintln!("first answer {recovered:?} after the kill ({tries} tries)");
    assert!(
        recovered < Duration::from_secs(2),
        "new requests wait at most 2 s: {recovered:?}"
    );
    let now = agent
        .connection()
        .expect("connected again")
        .remote_address();
    assert_eq!(now, other.quic_addr, "on the other replica");
    let resumed = other.audit_events("session_resumed");
    assert!(resumed.iter().any(|e| e["user"] == user), "{resumed:?}");
    assert_eq!(
        other.audit_events("challenge_issued").len(),
        challenges_before,
        "no new challenge: the session moved without a touch"
    );
    // The download that was in flight on the killed replica ends instead of hanging.
    let mut rest = Vec::new();
    let ended =
        tokio::time::timeout(Duration::from_secs(10), download.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the interrupted download hangs");

    // A revoke made through the database (any admin machine) closes the connection the
    // surviving replica holds, at its commit.
    let conn = agent.connection().expect("connected");
    let revoked = Instant::now();
    r.admin(&["revoke", user])?;
    tokio::time::timeout(Duration::from_secs(2), conn.closed())
        .await
        .map_err(|_| anyhow::anyhow!("the revoke did not reach the replica within 2 s"))?;
    eprintln!("connection closed {:?} after the revoke", revoked.elapsed());
    agent.shutdown().await;
    Ok(())
}

/// A grant approved through replica A, used by a headless delegate connected to replica B, and
/// revoked by its owner through A: B hears it from the database (its change notification) and
/// closes the delegate's connection within two seconds of the revoke's commit, cutting a
/// download in flight; the delegate cannot come back, and B's audit log says both.
#[tokio::test]
async fn a_grant_revoked_on_one_replica_ends_its_delegate_on_the_other_within_seconds()
-> anyhow::Result<()> {
    let r = Replicas::start().await?;
    let user = "alice@example.com";
    let label = "ci-nightly";
    // Alice enrols, delegates and revokes through A only.
    let (cfg, authn, _) = r.enrolled(user, r.a.quic_addr).await?;
    let grant = GrantRequest {
        label: label.into(),
        services: vec!["api".into()],
        methods: vec!["GET".into()],
        path_prefixes: vec!["/v1/".into(), "/bytes".into()],
        ttl: Duration::from_secs(600),
    };
    let mut file = delegation::delegate(&cfg, &authn, &grant, DelegateKey::generate()?).await?;
    assert_eq!(file.gateway, [r.a.quic_addr.to_string()]);
    let granted = r.a.audit_events("delegation_granted");
    assert_eq!(granted.len(), 1, "{granted:?}");
    assert_eq!(granted[0]["session"], file.grant.id.as_str());
    assert_eq!(granted[0]["delegate"], label);

    // The delegate runs elsewhere and reaches B alone (B knows the grant only from the
    // database, and its token only by the signing keys the replicas share).
    file.gateway = vec![r.b.quic_addr.to_string()];
    let sock = |name: &str| Some(r.lab.dir.path().join(format!("{name}.sock")));
    let bot =
        RunningAgent::start_delegated(delegation::load_headless(&file, None, &[], sock("bot"))?)
            .await?;
    let conn = bot.connection().expect("connected");
    assert_eq!(conn.remote_address(), r.b.quic_addr, "the delegate is on B");
    let api = bot.local_addr("api").expect("api port");
    let ok = get(api, "/v1/items", &[]).await?;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    let echo = ok.json()?;
    assert_eq!(echo["headers"]["x-touchgate-user"], user);
    assert_eq!(echo["headers"]["x-touchgate-delegate"], label);
    // B holds the grant to its scope.
    assert_eq!(
        request(api, "POST", "/v1/items", "localhost", &[])
            .await?
            .status,
        403
    );
    let resumed = r.b.audit_events("session_resumed");
    assert!(
        resumed
            .iter()
            .any(|e| e["user"] == user && e["delegate"] == label),
        "{resumed:?}"
    );
    let mut download = download_in_flight(api).await?;

    // Alice revokes the grant through A (a touch on a sign-in of its own there). The revoke's
    // commit lies between asking and the answer: B's end is timed from the asking.
    let asked = std::time::SystemTime::now();
    assert_eq!(
        delegation::revoke(&cfg, &authn, label).await?,
        file.grant.id
    );
    let why = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .map_err(|_| anyhow::anyhow!("the delegate's connection to B outlived the revoke"))?;
    eprintln!(
        "the delegate saw its connection end {:?} after the revoke was asked on A",
        asked.elapsed().unwrap_or_default()
    );
    match why {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, close::SESSION_REVOKED.into(), "{c:?}");
            assert_eq!(&c.reason[..], b"delegated grant revoked");
        }
        // The close frame goes out once: lost (in the flood of the download in flight), the
        // agent's next packet finds the connection gone and is answered with a stateless reset
        // (or, that lost too, the agent's idle timeout ends it). When and why B ended it are
        // then in B's audit log and its refusal of the resume, below.
        quinn::ConnectionError::Reset | quinn::ConnectionError::TimedOut => {
            eprintln!("the close frame was lost: {why:?}");
        }
        other => panic!("the delegate's connection ended otherwise: {other:?}"),
    }
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), download.read_to_end(&mut rest))
        .await
        .map_err(|_| anyhow::anyhow!("the download outlived the grant"))??;
    wait_for_state(
        &bot,
        Duration::from_secs(10),
        |s| matches!(s, AgentState::SignedOut { reason } if reason.contains("revoked")),
    )
    .await?;

    // B ended the delegate's session for the revoke, within two seconds of its asking (by the
    // one machine's clock): on its change notification, not its ten-second poll.
    let ended = r.b.audit_events("session_revoked");
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0]["user"], user);
    assert_eq!(ended[0]["delegate"], label);
    assert_eq!(ended[0]["reason"], "delegated grant revoked");
    let at = humantime::parse_rfc3339(ended[0]["ts"].as_str().unwrap_or_default())?;
    let took = at.duration_since(asked).unwrap_or_default();
    eprintln!("B ended the delegate's session {took:?} after the revoke was asked on A");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // The delegate cannot come back on B: refused with the reason, and B's log says so.
    match RunningAgent::start_delegated(delegation::load_headless(
        &file,
        None,
        &[],
        sock("bot-again"),
    )?)
    .await
    {
        Err(e) => assert!(
            e.to_string().contains("this delegated grant was revoked"),
            "{e}"
        ),
        Ok(_) => panic!("a revoked grant started again on B"),
    }
    let refused: Vec<_> =
        r.b.audit_events("session_refused")
            .into_iter()
            .filter(|e| e["outcome"] == "session_revoked")
            .collect();
    assert!(
        !refused.is_empty(),
        "{:?}",
        r.b.audit_events("session_refused")
    );
    for e in &refused {
        assert_eq!(
            e["reason"],
            "this delegated grant was revoked: ask its owner for a new one"
        );
    }
    // A recorded the owner's revoke; only B had a session to end.
    let by_owner = r.a.audit_events("delegation_revoked");
    assert_eq!(by_owner.len(), 1, "{by_owner:?}");
    assert_eq!(by_owner[0]["reason"], "revoked by its owner");
    assert_eq!(by_owner[0]["session"], file.grant.id.as_str());
    assert!(r.a.audit_events("session_revoked").is_empty());
    bot.shutdown().await;
    Ok(())
}

/// Of two racing attempts, exactly one succeeded (`what`) and the other was refused with `code`.
fn one_wins(answers: &[Result<(), TunnelError>], code: RefusalCode, what: &str) {
    assert_eq!(
        answers.iter().filter(|a| a.is_ok()).count(),
        1,
        "{what}: {answers:?}"
    );
    assert!(
        answers.iter().any(|a| matches!(
            a,
            Err(TunnelError::Refused(r)) if r.code == code
        )),
        "{answers:?}"
    );
}

#[tokio::test]
async fn races_through_two_replicas_keep_invites_and_counters() -> anyhow::Result<()> {
    let r = Replicas::start().await?;

    // One invite, two agents, one through each replica, at the same moment.
    let code = r.invite("bob@example.com")?;
    let (cfg_a, key_a, _) = r.agent("bob@example.com", &[r.a.quic_addr])?;
    let mut cfg_b = cfg_a.clone();
    cfg_b.gateway = r.b.quic_addr.to_string().into();
    let key_b = soft_authn(&r.lab.dir.path().join("bob-second.softkey"))?;
    let (x, y) = tokio::join!(
        touchgate_agent::enroll(&cfg_a, &key_a, &code),
        touchgate_agent::enroll(&cfg_b, &key_b, &code),
    );
    one_wins(
        &[x.map(drop), y.map(drop)],
        RefusalCode::InvalidInvite,
        "one enrolment uses the invite",
    );

    // A cloned key: two copies with the same counter sign in through both replicas at once.
    let (cfg, _, key_path) = r.enrolled("carol@example.com", r.a.quic_addr).await?;
    let clone_path = r.lab.dir.path().join("carol-clone.softkey");
    std::fs::copy(&key_path, &clone_path)?;
    let (original, clone) = (soft_authn(&key_path)?, soft_authn(&clone_path)?);
    let mut cfg_b = cfg.clone();
    cfg_b.gateway = r.b.quic_addr.to_string().into();
    let (ka, kb) = (SessionKey::generate()?, SessionKey::generate()?);
    let (ea, eb) = (client_endpoint(&cfg, &ka)?, client_endpoint(&cfg_b, &kb)?);
    let (ta, tb) = (
        Tunnel::connect(&ea, &cfg).await?,
        Tunnel::connect(&eb, &cfg_b).await?,
    );
    let ca = ta
        .make_assertion(&original, "carol@example.com", None)
        .await?;
    let cb = tb.make_assertion(&clone, "carol@example.com", None).await?;
    let (x, y) = tokio::join!(ta.finish_login(ca), tb.finish_login(cb));
    one_wins(
        &[x.map(drop), y.map(drop)],
        RefusalCode::CounterNotRising,
        "one of two sign-ins with the same counter passes",
    );
    Ok(())
}

#[tokio::test]
async fn the_database_going_away_spares_open_sessions_and_comes_back() -> anyhow::Result<()> {
    let mut r = Replicas::start().await?;
    let (cfg, authn, _) = r.enrolled("dave@example.com", r.a.quic_addr).await?;
    let (cfg2, authn2, _) = r.enrolled("erin@example.com", r.b.quic_addr).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").expect("api port");
    assert_eq!(get(api, "/before", &[]).await?.status, 200);

    r.pg.stop().await?;
    // Requests on the open session keep flowing: tokens are checked without the database.
    for i in 0..20 {
        let a = get(api, &format!("/during/{i}"), &[]).await?;
        assert_eq!(a.status, 200, "request {i} while the database is down");
    }
    // A sign-in needs the database, and says so.
    let key = SessionKey::generate()?;
    let endpoint = client_endpoint(&cfg2, &key)?;
    let t = Tunnel::connect(&endpoint, &cfg2).await?;
    match t.login(&authn2, "erin@example.com", None).await {
        Err(TunnelError::Refused(refusal)) => assert!(
            refusal.message.contains("cannot reach its database"),
            "{refusal:?}"
        ),
        other => panic!("expected a refusal naming the database, got {other:?}"),
    }

    r.pg.restart().await?;
    // Everything comes back on its own; nothing written before is lost.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let t = Tunnel::connect(&endpoint, &cfg2).await?;
        match t.login(&authn2, "erin@example.com", None).await {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < until, "no sign-in after the restart: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    assert_eq!(get(api, "/after", &[]).await?.status, 200);
    let users = r.admin(&["users"])?;
    assert!(
        users.contains("dave@example.com") && users.contains("erin@example.com"),
        "{users}"
    );
    agent.shutdown().await;
    Ok(())
}

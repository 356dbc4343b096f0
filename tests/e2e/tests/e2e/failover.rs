//! Gateway replicas on one database: an agent configured with several addresses connects to
//! the first that answers, and when the gateway it uses dies without a word (SIGKILL), it
//! resumes its session on another one within about a second — no new touch, its local ports
//! open all along.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use http_body_util::BodyExt;
use touchgate_agent::{
    AgentConfig, AgentState, RunningAgent,
    tunnel::{Candidate, Order, SessionKey, Tunnel, client_endpoint},
};
use touchgate_e2e::{bulk_download, enrolled, get};
use touchgate_testkit::lab::{Lab, LabOptions};

use crate::counting_key::counting;

const ALICE: &str = "alice@example.com";

/// The promise: requests work again through the other replica this soon after the kill.
const FAILOVER_WITHIN: Duration = Duration::from_secs(2);

#[tokio::test]
async fn a_killed_gateway_is_left_for_its_replica_with_no_new_touch() -> anyhow::Result<()> {
    fail_over_between(["127.0.0.1:0", "127.0.0.1:0"]).await
}

#[tokio::test]
async fn replicas_on_ipv6_and_ipv4_take_over_from_each_other() -> anyhow::Result<()> {
    fail_over_between(["[::1]:0", "127.0.0.1:0"]).await
}

#[tokio::test]
async fn every_address_must_show_the_pinned_certificate() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    // A gateway with a certificate of its own: not one of ours, whatever it answers.
    let impostor = Lab::start(LabOptions::default()).await?;
    let mut cfg = lab.agent_config(ALICE, &lab.dir.path().join("k"), &[])?;
    let theirs = impostor.quic_addr.to_string();
    cfg.gateway = vec![theirs.clone(), lab.quic_addr.to_string()].into();
    let endpoint = client_endpoint(&cfg, &SessionKey::generate()?)?;
    let tunnel = Tunnel::connect_in(&endpoint, &cfg, order_starting_with(&cfg, &theirs)).await?;
    assert_eq!(tunnel.gateway().addr, lab.quic_addr);

    cfg.gateway = theirs.clone().into();
    let e = Tunnel::connect(&endpoint, &cfg)
        .await
        .err()
        .expect("the impostor alone is refused")
        .to_string();
    assert!(
        e.contains(&theirs) && e.contains("does not match gateway_cert_sha256"),
        "{e}"
    );
    Ok(())
}

#[tokio::test]
async fn a_first_gateway_that_never_answers_costs_only_a_quarter_second() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let mut cfg = lab.agent_config(ALICE, &lab.dir.path().join("k"), &[])?;
    // A UDP port that takes packets and answers none.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let dead = silent.local_addr()?.to_string();
    cfg.gateway = vec![dead.clone(), lab.quic_addr.to_string()].into();
    let order = order_starting_with(&cfg, &dead);

    let endpoint = client_endpoint(&cfg, &SessionKey::generate()?)?;
    let started = Instant::now();
    let tunnel = Tunnel::connect_in(&endpoint, &cfg, order).await?;
    let took = started.elapsed();
    eprintln!(
        "connected past a silent first gateway in {} ms",
        took.as_millis()
    );
    assert_eq!(tunnel.gateway().addr, lab.quic_addr);
    assert!(took < Duration::from_secs(1), "took {took:?}");
    Ok(())
}

/// Two replicas listening on `listen`, an agent configured with both: the one it uses is
/// killed in the middle of a download, and the session moves to the other.
async fn fail_over_between(listen: [&str; 2]) -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (mut cfg, _, key_path) = enrolled(&lab, ALICE, &[]).await?;
    let mut replicas = [
        lab.start_replica_on("a", listen[0].parse()?).await?,
        lab.start_replica_on("b", listen[1].parse()?).await?,
    ];
    cfg.gateway = replicas
        .iter()
        .map(|r| r.quic_addr.to_string())
        .collect::<Vec<_>>()
        .into();
    let (authn, asked) = counting(&key_path)?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").expect("api");
    assert_eq!(get(api, "/before", &[]).await?.status, 200);
    let touches = asked.load(Ordering::SeqCst);
    assert_eq!(touches, 1, "one touch to sign in");

    // The agent says which replica it uses; that one dies in the middle of a download.
    let used = agent.gateway().expect("connected");
    let dying = replicas
        .iter()
        .position(|r| r.quic_addr.to_string() == used)
        .expect("the agent names one of the replicas");
    let survivor = 1 - dying;
    let mut download = bulk_download(api, 1 << 40).await?;
    let mut received = 0usize;
    while received < 4 << 20 {
        let frame = download.frame().await.expect("more of the download")?;
        received += frame.data_ref().map_or(0, |d| d.len());
    }
    let probe = PortProbe::start(api);
    // The agent's first change of state after the kill is its noticing the loss.
    let mut state = agent.state();
    state.borrow_and_update();
    let noticed = tokio::spawn(async move {
        let _ = state.changed().await;
        Instant::now()
    });
    let killed = replicas[dying].kill().await;

    // Requests opened before the loss is noticed go down with the connection (as the download
    // does); the first one after it succeeds through the survivor.
    let mut failed = 0;
    let answered = loop {
        anyhow::ensure!(
            killed.elapsed() < 3 * FAILOVER_WITHIN,
            "no request succeeded within {:?} of the kill",
            3 * FAILOVER_WITHIN
        );
        match tokio::time::timeout(FAILOVER_WITHIN, get(api, "/after", &[])).await {
            Ok(Ok(a)) if a.status == 200 => break killed.elapsed(),
            _ => failed += 1,
        }
    };
    let noticed = noticed.await?.duration_since(killed);
    eprintln!(
        "failover between {listen:?}: loss noticed {} ms after the kill, first request answered through the other gateway {} ms after it ({failed} failed before)",
        noticed.as_millis(),
        answered.as_millis(),
    );
    assert!(
        answered < FAILOVER_WITHIN,
        "requests worked again only {answered:?} after the kill"
    );

    // The download did not survive its connection, but it ended; it did not hang.
    let rest = tokio::time::timeout(Duration::from_secs(10), download.collect()).await?;
    assert!(rest.is_err(), "the download cannot have finished");

    let now_used = agent.gateway().expect("connected again");
    assert_eq!(now_used, replicas[survivor].quic_addr.to_string());
    assert!(
        matches!(&*agent.state().borrow(), AgentState::Connected { gateway, .. } if *gateway == now_used)
    );
    let resumed = replicas[survivor].audit_events("session_resumed");
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0]["user"], ALICE);
    assert!(
        replicas[survivor]
            .audit_events("challenge_issued")
            .is_empty()
    );
    assert_eq!(asked.load(Ordering::SeqCst), touches, "no new touch");
    assert_eq!(agent.local_addr("api"), Some(api));
    let (probes, refused) = probe.stop().await;
    assert!(probes > 10, "the port was probed {probes} times");
    assert_eq!(
        refused, 0,
        "the local port refused {refused} of {probes} connections"
    );
    assert_eq!(get(api, "/later", &[]).await?.status, 200);
    agent.shutdown().await;
    Ok(())
}

/// An order that tries `first` (one of `cfg`'s addresses, an IP) before the others, as some
/// agents' orders do.
fn order_starting_with(cfg: &AgentConfig, first: &str) -> Order {
    let candidates: Vec<Candidate> = cfg
        .gateway
        .iter()
        .map(|a| Candidate {
            configured: a.to_owned(),
            addr: a.parse().expect("an address"),
            server_name: cfg.server_name_for(a),
            link: Default::default(),
        })
        .collect();
    (0..)
        .map(Order::seeded)
        .find(|o| o.arrange(candidates.clone())[0].configured == first)
        .expect("some order starts there")
}

/// Connects to a local port over and over until stopped, counting connections the port
/// refused: a listener that closed, even for a moment, would show here.
struct PortProbe {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, usize)>,
}

impl PortProbe {
    fn start(addr: std::net::SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut probes, mut refused) = (0, 0);
            while !flag.load(Ordering::SeqCst) {
                probes += 1;
                if tokio::net::TcpStream::connect(addr).await.is_err() {
                    refused += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (probes, refused)
        });
        Self { stop, task }
    }

    async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap_or_default()
    }
}

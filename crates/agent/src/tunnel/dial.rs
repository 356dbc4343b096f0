//! Finding a gateway among its addresses. Each configured `host:port` is resolved (a name with
//! several addresses gives several candidates), the candidates are put in this agent's order,
//! and they are raced happy-eyeballs style (RFC 8305): the first attempt starts at once, the
//! next one [`STAGGER`] later or as soon as an earlier one fails, and the first QUIC+TLS
//! handshake to finish wins; the others are abandoned. Every candidate is verified the same
//! way (the one pin or CA of the config) under its configured host name, never its IP.
//!
//! With `transport = "auto"` the TCP carrier joins the race when no QUIC handshake has
//! finished after [`FALLBACK_AFTER`] (or every QUIC attempt has failed): the same candidates
//! over TCP, or through the HTTP proxy; `wss://` addresses are raced over TCP from the start.

use std::{
    collections::HashSet,
    fmt,
    future::Future,
    hash::{Hash, Hasher},
    net::SocketAddr,
    pin::Pin,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tokio::{task::JoinSet, time::Instant};

use super::{
    SessionKey, TunnelError,
    carrier::{CarrierDialer, Link, Target, Why},
};
use crate::config::{AgentConfig, GatewayAddr, Transport};

/// How long an attempt has to itself before the next candidate is tried too (RFC 8305's
/// recommended connection attempt delay).
pub const STAGGER: Duration = Duration::from_millis(250);

/// How long connecting may take in all, over every candidate, before it gives up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// With `transport = "auto"`, how long QUIC has before the TCP carrier joins the race: a
/// QUIC handshake takes one round trip, so on any path that carries UDP it is long done.
pub const FALLBACK_AFTER: Duration = Duration::from_secs(2);

/// One address to try: where to send, and the name the gateway's certificate is checked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The configured address it came from (`gw-a.example:443`).
    pub configured: String,
    /// The address it resolved to.
    pub addr: SocketAddr,
    /// The TLS server name: `server_name`, else the configured host.
    pub server_name: String,
    /// QUIC on UDP, or the TCP carrier (then `addr` is the TCP peer: the gateway, its front
    /// end, or the proxy).
    pub link: Link,
}

/// `gw-a.example:443 (192.0.2.7:443)`, or the address alone when it was configured so; a
/// carrier says so (`over TCP`, `through the proxy proxy.corp.example:3128`).
impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.link {
            Link::Tcp { proxy: Some(p), .. } => {
                return write!(f, "{} over TCP through the proxy {p}", self.configured);
            }
            _ if self.configured == self.addr.to_string() => write!(f, "{}", self.addr)?,
            _ => write!(f, "{} ({})", self.configured, self.addr)?,
        }
        if self.link.is_tcp() {
            f.write_str(" over TCP")?;
        }
        Ok(())
    }
}

/// An address that could not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    /// The candidate, or the configured address that did not resolve.
    pub what: String,
    /// Why, in words.
    pub reason: String,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.reason)
    }
}

/// The order in which one agent tries the gateway's addresses: random, but the same for this
/// agent every time (so agents spread over the replicas and each keeps to its own), with the
/// address it just lost put last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Order {
    seed: u64,
    last: Option<SocketAddr>,
}

impl Order {
    /// A fresh random order.
    pub fn random() -> Self {
        Self::seeded(rand::random())
    }

    /// The order that `seed` picks.
    pub fn seeded(seed: u64) -> Self {
        Self { seed, last: None }
    }

    /// The same order with `lost` (the address whose connection was just lost) tried last.
    pub fn after_losing(self, lost: SocketAddr) -> Self {
        Self {
            last: Some(lost),
            ..self
        }
    }

    /// Puts `candidates` in this order. The address families then take turns, starting with
    /// the first candidate's (RFC 8305), so that a broken IPv6 (or IPv4) path costs one
    /// [`STAGGER`] rather than one per address; the lost address stays last.
    pub fn arrange(&self, mut candidates: Vec<Candidate>) -> Vec<Candidate> {
        candidates.sort_by_key(|c| self.rank(c.addr));
        let lost_at = candidates.iter().position(|c| Some(c.addr) == self.last);
        let lost = lost_at.map(|i| candidates.remove(i));
        let mut out = interleave_families(candidates);
        out.extend(lost);
        out
    }

    fn rank(&self, addr: SocketAddr) -> u64 {
        // SipHash with fixed keys: the same seed gives the same order on every run.
        let mut h = std::hash::DefaultHasher::new();
        (self.seed, addr).hash(&mut h);
        h.finish()
    }
}

/// How long one name may take to resolve.
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Resolves every address of `cfg.gateway` (at the same time, each for at most
/// [`LOOKUP_TIMEOUT`]); a name with several addresses
/// gives a candidate for each, and an address reached twice is kept once. Returns the
/// candidates in the config's order, and the addresses that did not resolve.
pub async fn resolve(cfg: &AgentConfig) -> (Vec<Candidate>, Vec<Failed>) {
    let mut lookups = JoinSet::new();
    let direct = cfg
        .gateway
        .iter()
        .filter(|a| matches!(GatewayAddr::parse(a), Ok(GatewayAddr::Direct { .. })));
    for (i, configured) in direct.enumerate() {
        let configured = configured.to_owned();
        lookups.spawn(async move {
            // A name whose answer is slow or withheld must not hold up the others.
            let found = match tokio::time::timeout(
                LOOKUP_TIMEOUT,
                tokio::net::lookup_host(configured.clone()),
            )
            .await
            {
                Ok(found) => found,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no answer from the name service within {}s",
                        LOOKUP_TIMEOUT.as_secs()
                    ),
                )),
            };
            (i, configured, found.map(Iterator::collect::<Vec<_>>))
        });
    }
    let mut found = Vec::new();
    while let Some(done) = lookups.join_next().await {
        // A lookup task cannot panic; one that did is only a missing answer.
        if let Ok(done) = done {
            found.push(done);
        }
    }
    found.sort_by_key(|(i, _, _)| *i);
    let mut seen = HashSet::new();
    let (mut candidates, mut failed) = (Vec::new(), Vec::new());
    for (_, configured, addrs) in found {
        match addrs {
            Ok(addrs) if addrs.is_empty() => failed.push(Failed {
                what: configured,
                reason: "the name has no address".into(),
            }),
            Ok(addrs) => {
                let server_name = cfg.server_name_for(&configured);
                for addr in addrs.into_iter().filter(|a| seen.insert(*a)) {
                    candidates.push(Candidate {
                        configured: configured.clone(),
                        addr,
                        server_name: server_name.clone(),
                        link: Link::Quic,
                    });
                }
            }
            Err(e) => failed.push(Failed {
                what: configured,
                reason: format!("cannot resolve: {e}"),
            }),
        }
    }
    (candidates, failed)
}

/// A connection that won a race: on the agent's UDP endpoint or a carrier's.
pub struct Won {
    /// The connection.
    pub conn: quinn::Connection,
    /// The endpoint it is on.
    pub endpoint: quinn::Endpoint,
    /// The address it reached.
    pub gateway: Candidate,
}

/// Connects to `candidates` over QUIC on `endpoint`, in their order, happy-eyeballs style;
/// returns the connection of the first handshake to finish and its candidate, or why each
/// one failed. The losers are closed: a handshake still running is dropped, one that finished
/// too is closed with [`touchgate_proto::close::AGENT_DONE`].
pub async fn race(
    endpoint: &quinn::Endpoint,
    candidates: &[Candidate],
) -> Result<(quinn::Connection, Candidate), Vec<Failed>> {
    let attempts = candidates
        .iter()
        .map(|c| quic_attempt(endpoint, c))
        .collect();
    race_all(attempts, candidates.len(), None)
        .await
        .map(|w| (w.conn, w.gateway))
}

/// Connects as `transport` says: QUIC on the UDP endpoint, the TCP carrier, or both (the
/// carrier joining after [`FALLBACK_AFTER`]).
pub struct Dialer {
    udp: quinn::Endpoint,
    carrier: CarrierDialer,
    transport: Transport,
    /// The last connection went over TCP because QUIC got no answer: the next race starts the
    /// carrier at once, beside QUIC, instead of waiting [`FALLBACK_AFTER`] again.
    fell_back: AtomicBool,
}

impl Dialer {
    /// The dialer of `cfg`, presenting `key`.
    pub fn new(cfg: &AgentConfig, key: &SessionKey) -> Result<Self, TunnelError> {
        Ok(Self {
            udp: super::client_endpoint(cfg, key)?,
            carrier: CarrierDialer::new(cfg, key)?,
            transport: cfg.transport,
            fell_back: AtomicBool::new(false),
        })
    }

    /// The UDP endpoint.
    pub fn udp(&self) -> &quinn::Endpoint {
        &self.udp
    }

    /// Races the gateway's addresses as the transport says.
    pub async fn dial(&self, cfg: &AgentConfig, order: Order) -> Result<Won, Vec<Failed>> {
        let (candidates, mut failed) = resolve(cfg).await;
        let arranged = order.arrange(candidates);
        let mut attempts = Vec::new();
        if self.transport != Transport::Tcp {
            attempts.extend(arranged.iter().map(|c| quic_attempt(&self.udp, c)));
        }
        let quic = attempts.len();
        let why = match self.transport {
            Transport::Tcp => Why::Configured,
            _ => Why::UdpBlocked,
        };
        let mut targets = Vec::new();
        for configured in cfg.gateway.iter() {
            let Some(t) = Target::of(cfg, configured, None) else {
                continue;
            };
            let direct_here = !t.front_end && !self.carrier.proxied(&t);
            if !direct_here {
                targets.push(t);
            } else if self.transport != Transport::Quic {
                // Straight to the gateway: each of its addresses, in this agent's order.
                targets.extend(
                    arranged
                        .iter()
                        .filter(|c| c.configured == configured)
                        .filter_map(|c| Target::of(cfg, configured, Some(c.addr))),
                );
            }
        }
        if self.transport == Transport::Quic {
            targets.retain(|t| t.front_end);
        }
        attempts.extend(targets.iter().map(|t| self.carrier_attempt(t, why)));
        let carrier_at = match self.transport {
            Transport::Auto if !self.fell_back.load(Ordering::Relaxed) => FALLBACK_AFTER,
            _ => Duration::ZERO,
        };
        let won = race_all(attempts, quic, Some(carrier_at)).await;
        match &won {
            Ok(w) => {
                let fell_back = matches!(
                    w.gateway.link,
                    Link::Tcp {
                        why: Why::UdpBlocked,
                        ..
                    }
                );
                self.fell_back.store(fell_back, Ordering::Relaxed);
            }
            Err(more) => failed.extend(more.iter().cloned()),
        }
        won.map_err(|_| failed)
    }

    /// Races the gateway's addresses over QUIC on UDP only (to see whether UDP works again).
    pub async fn dial_quic(&self, cfg: &AgentConfig, order: Order) -> Result<Won, Vec<Failed>> {
        let (candidates, mut failed) = resolve(cfg).await;
        let arranged = order.arrange(candidates);
        let attempts = arranged
            .iter()
            .map(|c| quic_attempt(&self.udp, c))
            .collect();
        let won = race_all(attempts, arranged.len(), None).await;
        if won.is_ok() {
            self.fell_back.store(false, Ordering::Relaxed);
        }
        won.map_err(|more| {
            failed.extend(more);
            failed
        })
    }

    fn carrier_attempt(&self, target: &Target, why: Why) -> Attempt {
        let connect = self.carrier.connect(target);
        let target = target.clone();
        Attempt {
            name: match target.addr {
                Some(a) if a.to_string() != target.configured => {
                    format!("{} ({a}) over TCP", target.configured)
                }
                _ => format!("{} over TCP", target.configured),
            },
            timeout: "no carrier over TCP in time",
            start: Box::new(move || {
                Ok(Box::pin(async move {
                    let opened = connect.await?;
                    let gateway = super::carrier::candidate(&target, &opened, why);
                    Ok(Won {
                        conn: opened.conn,
                        endpoint: opened.endpoint,
                        gateway,
                    })
                }) as AttemptFuture)
            }),
        }
    }
}

type AttemptFuture = Pin<Box<dyn Future<Output = Result<Won, String>> + Send>>;

/// Starts an attempt, or says why it cannot start.
type Start = Box<dyn FnOnce() -> Result<AttemptFuture, String> + Send>;

/// One way to one address, started when its turn comes.
struct Attempt {
    /// The address, as an error names it.
    name: String,
    /// What an attempt still running when time runs out is told.
    timeout: &'static str,
    start: Start,
}

fn quic_attempt(endpoint: &quinn::Endpoint, c: &Candidate) -> Attempt {
    let (endpoint, c) = (endpoint.clone(), c.clone());
    Attempt {
        name: c.to_string(),
        timeout: "no answer in time (is UDP to the gateway blocked?)",
        start: Box::new(move || {
            let connecting = endpoint
                .connect(c.addr, &c.server_name)
                .map_err(|e| connect_error(&e))?;
            Ok(Box::pin(async move {
                let conn = connecting.await.map_err(|e| handshake_error(&e))?;
                Ok(Won {
                    conn,
                    endpoint,
                    gateway: c,
                })
            }) as AttemptFuture)
        }),
    }
}

/// The attempts `[0, quic)` (QUIC) and `[quic, ..)` (the carrier) in two lanes, each
/// happy-eyeballs style; the carrier lane opens `carrier_at` after the start, or as soon as
/// every QUIC attempt has failed. The first to connect wins; the others are abandoned.
async fn race_all(
    attempts: Vec<Attempt>,
    quic: usize,
    carrier_at: Option<Duration>,
) -> Result<Won, Vec<Failed>> {
    let started = Instant::now();
    let deadline = started + CONNECT_TIMEOUT;
    let n = attempts.len();
    let mut names = Vec::with_capacity(n);
    let mut timeouts = Vec::with_capacity(n);
    let mut starts = Vec::with_capacity(n);
    for a in attempts {
        names.push(a.name);
        timeouts.push(a.timeout);
        starts.push(Some(a.start));
    }
    let mut r = Race {
        starts,
        running: JoinSet::new(),
        in_flight: HashSet::new(),
        failed: Vec::new(),
        lanes: [
            Lane {
                next: 0,
                end: quic,
                open: true,
                at: started,
            },
            Lane {
                next: quic,
                end: n,
                open: false,
                at: started + carrier_at.unwrap_or(CONNECT_TIMEOUT),
            },
        ],
    };
    loop {
        if r.running.is_empty() && !r.start_next(0) {
            // QUIC has nothing left to try: the carrier, at once.
            r.lanes[1].open = true;
            if !r.start_next(1) {
                break;
            }
        }
        let [quic_lane, carrier_lane] = r.lanes;
        tokio::select! {
            Some(Ok((i, outcome))) = r.running.join_next() => {
                r.in_flight.remove(&i);
                match outcome {
                    Ok(won) => {
                        abandon(std::mem::take(&mut r.running));
                        return Ok(won);
                    }
                    Err(e) => {
                        r.failed.push((i, e));
                        let lane = usize::from(i >= quic);
                        r.start_next(lane);
                    }
                }
            }
            () = tokio::time::sleep_until(quic_lane.at), if quic_lane.has_more() => {
                r.start_next(0);
            }
            () = tokio::time::sleep_until(carrier_lane.at), if carrier_lane.has_more() => {
                r.lanes[1].open = true;
                r.start_next(1);
            }
            () = tokio::time::sleep_until(deadline) => {
                r.failed.extend(r.in_flight.iter().map(|&i| (i, timeouts[i].to_owned())));
                for lane in r.lanes {
                    if lane.open {
                        r.failed.extend((lane.next..lane.end).map(|i| (i, "not tried: time ran out".to_owned())));
                    }
                }
                break;
            }
        }
    }
    r.failed.sort_by_key(|(i, _)| *i);
    Err(r
        .failed
        .into_iter()
        .map(|(i, reason)| Failed {
            what: names[i].clone(),
            reason,
        })
        .collect())
}

/// One lane of a [`race_all`]: the attempts `[next, end)` still to start, whether the lane is
/// open, and when its next attempt starts anyway.
#[derive(Clone, Copy)]
struct Lane {
    next: usize,
    end: usize,
    open: bool,
    at: Instant,
}

impl Lane {
    fn has_more(&self) -> bool {
        self.next < self.end
    }
}

/// The attempts of one [`race_all`].
struct Race {
    starts: Vec<Option<Start>>,
    running: JoinSet<(usize, Result<Won, String>)>,
    in_flight: HashSet<usize>,
    failed: Vec<(usize, String)>,
    lanes: [Lane; 2],
}

impl Race {
    /// Starts the next attempt of `lane` that can be started (the lane's next one then waits
    /// [`STAGGER`]); false when the lane is closed or has none left.
    fn start_next(&mut self, lane: usize) -> bool {
        let l = &mut self.lanes[lane];
        if !l.open {
            return false;
        }
        while l.next < l.end {
            let i = l.next;
            l.next += 1;
            let Some(start) = self.starts[i].take() else {
                continue;
            };
            match start() {
                Ok(attempt) => {
                    l.at = Instant::now() + STAGGER;
                    self.in_flight.insert(i);
                    self.running.spawn(async move { (i, attempt.await) });
                    return true;
                }
                Err(e) => self.failed.push((i, e)),
            }
        }
        false
    }
}

/// Why connecting to the gateway at `configured` (the config's addresses, as one string)
/// failed, as one message naming each address tried.
pub fn describe(configured: &str, failed: &[Failed]) -> String {
    match failed {
        [] => "the gateway has no address to try".into(),
        [one] if one.what == configured => one.reason.clone(),
        [one] => one.to_string(),
        many => format!(
            "tried {} addresses: {}",
            many.len(),
            many.iter()
                .map(Failed::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

/// Puts the candidates of the two address families in turns, starting with the first's.
fn interleave_families(candidates: Vec<Candidate>) -> Vec<Candidate> {
    let Some(first_v6) = candidates.first().map(|c| c.addr.is_ipv6()) else {
        return candidates;
    };
    let (mut first, mut other): (Vec<_>, Vec<_>) = candidates
        .into_iter()
        .partition(|c| c.addr.is_ipv6() == first_v6);
    let mut out = Vec::with_capacity(first.len() + other.len());
    let (mut first, mut other) = (first.drain(..), other.drain(..));
    loop {
        match (first.next(), other.next()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
}

/// Drops the attempts still running (quinn abandons their handshakes, a carrier being opened
/// is closed) and closes any that finished meanwhile.
fn abandon(mut attempts: JoinSet<(usize, Result<Won, String>)>) {
    attempts.abort_all();
    while let Some(done) = attempts.try_join_next() {
        if let Ok((_, Ok(Won { conn, .. }))) = done {
            conn.close(
                touchgate_proto::close::AGENT_DONE.into(),
                b"another gateway answered first",
            );
        }
    }
}

fn connect_error(e: &quinn::ConnectError) -> String {
    match e {
        quinn::ConnectError::InvalidRemoteAddress(a) if a.is_ipv6() => {
            "this machine has no IPv6 socket to reach it".into()
        }
        other => other.to_string(),
    }
}

fn handshake_error(e: &quinn::ConnectionError) -> String {
    let text = e.to_string();
    match e {
        quinn::ConnectionError::TimedOut => {
            "no answer (is UDP to the gateway blocked, or the gateway down?)".into()
        }
        _ if text.contains("refused to accept a new connection") => format!(
            "{text} (the gateway is refusing new connections from this address for now, \
             e.g. too many in a minute: try again shortly)"
        ),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(addr: &str) -> Candidate {
        Candidate {
            configured: "gw.corp.example:443".into(),
            addr: addr.parse().expect("an address"),
            server_name: "gw.corp.example".into(),
            link: Link::Quic,
        }
    }

    fn addrs(list: &[Candidate]) -> Vec<String> {
        list.iter().map(|c| c.addr.to_string()).collect()
    }

    const V4: [&str; 3] = ["192.0.2.1:443", "192.0.2.2:443", "192.0.2.3:443"];

    #[test]
    fn each_agent_keeps_one_order_and_agents_spread_over_the_gateways() {
        let three: Vec<_> = V4.iter().map(|a| candidate(a)).collect();
        let order = Order::seeded(7);
        assert_eq!(
            addrs(&order.arrange(three.clone())),
            addrs(&order.arrange(three.iter().rev().cloned().collect())),
            "the same agent tries the same order, however the addresses were listed"
        );
        let mut first = std::collections::HashMap::new();
        for seed in 0..600 {
            let arranged = Order::seeded(seed).arrange(three.clone());
            *first.entry(arranged[0].addr).or_insert(0) += 1;
        }
        assert_eq!(first.len(), 3, "{first:?}");
        assert!(first.values().all(|&n| n > 120), "{first:?}");
    }

    #[test]
    fn the_gateway_just_lost_is_tried_last() {
        let three: Vec<_> = V4.iter().map(|a| candidate(a)).collect();
        for seed in 0..50 {
            let order = Order::seeded(seed);
            let before = order.arrange(three.clone());
            let lost = before[0].addr;
            let after = order.after_losing(lost).arrange(three.clone());
            assert_eq!(after.last().map(|c| c.addr), Some(lost));
            // The others keep their order.
            assert_eq!(addrs(&after[..2]), addrs(&before[1..]));
        }
        // A lost address that is no longer listed changes nothing.
        let order = Order::seeded(1);
        assert_eq!(
            addrs(
                &order
                    .after_losing("198.51.100.9:443".parse().expect("addr"))
                    .arrange(three.clone())
            ),
            addrs(&order.arrange(three))
        );
    }

    #[test]
    fn address_families_take_turns_from_the_first_ones() {
        let mixed: Vec<_> = [
            "192.0.2.1:443",
            "192.0.2.2:443",
            "192.0.2.3:443",
            "[2001:db8::1]:443",
            "[2001:db8::2]:443",
        ]
        .iter()
        .map(|a| candidate(a))
        .collect();
        for seed in 0..50 {
            let arranged = Order::seeded(seed).arrange(mixed.clone());
            let v6: Vec<bool> = arranged.iter().map(|c| c.addr.is_ipv6()).collect();
            // Turns while both families last; the third IPv4 address comes at the end.
            let want = if v6[0] {
                [true, false, true, false, false]
            } else {
                [false, true, false, true, false]
            };
            assert_eq!(v6, want, "seed {seed}: {:?}", addrs(&arranged));
        }
    }

    #[test]
    fn a_failure_names_each_address_tried() {
        let failed = vec![
            Failed {
                what: candidate("192.0.2.1:443").to_string(),
                reason: "no answer".into(),
            },
            Failed {
                what: "gw-b.corp.example:443".into(),
                reason: "cannot resolve: no such host".into(),
            },
        ];
        assert_eq!(
            describe("gw.corp.example:443, gw-b.corp.example:443", &failed),
            "tried 2 addresses: gw.corp.example:443 (192.0.2.1:443): no answer; \
             gw-b.corp.example:443: cannot resolve: no such host"
        );
        // One address alone is not named twice.
        let one = Failed {
            what: "192.0.2.1:443".into(),
            reason: "no answer".into(),
        };
        assert_eq!(describe("192.0.2.1:443", &[one]), "no answer");
    }

    #[tokio::test]
    async fn when_no_gateway_answers_one_error_names_every_address() {
        // UDP ports that take packets and answer none, one per family where there is IPv6.
        let silent_v4 = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let silent_v6 = std::net::UdpSocket::bind("[::1]:0").ok();
        let mut list = vec![silent_v4.local_addr().expect("addr").to_string()];
        list.extend(
            silent_v6
                .iter()
                .filter_map(|s| s.local_addr().ok())
                .map(|a| a.to_string()),
        );
        let cfg: AgentConfig = toml::from_str(&format!(
            "gateway = {list:?}\nserver_name = \"localhost\"\nuser = \"alice\"\ngateway_cert_sha256 = \"{}\"\n",
            "ab".repeat(32)
        ))
        .expect("config");
        let key = crate::tunnel::SessionKey::generate().expect("key");
        let endpoint = crate::tunnel::client_endpoint(&cfg, &key).expect("endpoint");
        let started = std::time::Instant::now();
        let e = crate::tunnel::Tunnel::connect(&endpoint, &cfg)
            .await
            .err()
            .expect("nothing answers")
            .to_string();
        assert!(
            started.elapsed() < CONNECT_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        assert!(e.starts_with("cannot connect to the gateway at "), "{e}");
        for addr in &list {
            assert!(
                e.contains(&format!("{addr}: no answer")),
                "{addr} not in {e}"
            );
        }
    }

    #[tokio::test]
    async fn a_name_with_several_addresses_gives_a_candidate_for_each() {
        let cfg: AgentConfig = toml::from_str(&format!(
            "gateway = [\"localhost:4433\", \"127.0.0.1:4433\", \"[::1]:4433\"]\nserver_name = \"gw.corp.example\"\nuser = \"alice\"\ngateway_cert_sha256 = \"{}\"\n",
            "ab".repeat(32)
        ))
        .expect("config");
        let (candidates, failed) = resolve(&cfg).await;
        assert!(failed.is_empty(), "{failed:?}");
        // Every address of the name, then the literals it did not already give, each once.
        let mut want: Vec<SocketAddr> = Vec::new();
        let localhost = tokio::net::lookup_host("localhost:4433")
            .await
            .expect("localhost resolves");
        let literals = ["127.0.0.1:4433", "[::1]:4433"].map(|a| a.parse().expect("addr"));
        for a in localhost.chain(literals) {
            if !want.contains(&a) {
                want.push(a);
            }
        }
        assert_eq!(candidates.iter().map(|c| c.addr).collect::<Vec<_>>(), want);
        assert!(
            candidates
                .iter()
                .all(|c| c.server_name == "gw.corp.example")
        );
        assert_eq!(candidates[0].configured, "localhost:4433");
    }
}

//! The controller's transitions, driven by hand with a fake clock: no key, no gateway, no
//! sleeping. Each test feeds events as the shell would and checks the effects and the view.

use super::*;
use crate::{controller::GrantedView, settings::ConfigPaths};

const PIN: &str = "abababababababababababababababababababababababababababababababab";
/// The fake clock's start, seconds since the epoch.
const T0: u64 = 1_700_000_000;
const HOUR: u64 = 3600;
/// The config's reminder: ten minutes.
const REMINDER: u64 = 600;

fn layers(text: &str) -> (tempfile::TempDir, Result<Layered, String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = ConfigPaths {
        user: dir.path().join("agent.toml"),
        managed: None,
    };
    std::fs::write(&paths.user, text).expect("write");
    let l = Layered::load(&paths).map_err(|e| e.to_string());
    (dir, l)
}

fn config_text() -> String {
    format!(
        "gateway = \"gw.example.com:4433\"\ngateway_cert_sha256 = \"{PIN}\"\nuser = \"alice\"\n\
         authenticator = \"soft:key.tgk\"\nrenew_reminder = \"10m\"\n\
         [[service]]\nname = \"api\"\nlocal_port = 8081\n[[service]]\nname = \"billing\"\nlocal_port = 8082\n"
    )
}

/// A controller state and its fake clock.
struct Rig {
    s: ControllerState,
    now: u64,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Self {
        let (dir, l) = layers(&config_text());
        let (s, _) = ControllerState::new(l, T0);
        Self {
            s,
            now: T0,
            _dir: dir,
        }
    }

    fn feed(&mut self, e: Event) -> Vec<Effect> {
        self.s.handle(e, self.now)
    }

    fn ask(&mut self, r: Request) -> Vec<Effect> {
        self.feed(Event::Request(r))
    }

    fn phase(&self) -> Phase {
        self.s.view().phase
    }

    /// Signs in with a session of `length` seconds; returns the effects of the last step.
    fn signed_in(&mut self, length: u64) -> Vec<Effect> {
        self.ask(Request::SignIn);
        self.feed(Event::AuthenticatorOpened {
            key: "YubiKey 5".into(),
        });
        self.feed(Event::AgentStarted {
            agent: 1,
            session: Some(session(self.now + length)),
            listeners: vec![("api".into(), 8081), ("billing".into(), 8082)],
            router: None,
        })
    }

    fn agent(&mut self, state: AgentState) -> Vec<Effect> {
        self.feed(Event::Agent {
            agent: 1,
            state,
            account_disabled: false,
        })
    }

    /// Moves the clock to `at` and fires `timer`.
    fn fire_at(&mut self, timer: Timer, at: u64) -> Vec<Effect> {
        self.now = at;
        self.feed(Event::Timer(timer))
    }
}

/// The gateway address the agent reports in use, one of the configured name's addresses.
const IN_USE: &str = "gw.example.com:4433 (192.0.2.7:4433)";

fn session(expires_at: u64) -> Session {
    Session {
        user: "alice".into(),
        expires_at,
        services: vec!["api".into()],
        tcp: Vec::new(),
        gateway: IN_USE.into(),
        transport: "QUIC".into(),
    }
}

fn reply(effects: &[Effect]) -> Option<Result<(), ControllerError>> {
    effects.iter().find_map(|e| match e {
        Effect::Reply(r) => Some(r.clone()),
        _ => None,
    })
}

fn notices(effects: &[Effect]) -> Vec<Notice> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Notify(n) => Some(n.clone()),
            _ => None,
        })
        .collect()
}

fn timer_at(effects: &[Effect], timer: Timer) -> Option<u64> {
    effects.iter().find_map(|e| match e {
        Effect::SetTimer { timer: t, at } if *t == timer => Some(*at),
        _ => None,
    })
}

fn stops(effects: &[Effect]) -> bool {
    effects.iter().any(|e| matches!(e, Effect::StopAgent))
}

fn pin_answer(effects: &[Effect]) -> Option<Option<String>> {
    use secrecy::ExposeSecret;
    effects.iter().find_map(|e| match e {
        Effect::AnswerPin(p) => Some(p.as_ref().map(|p| p.expose_secret().to_owned())),
        _ => None,
    })
}

#[test]
fn a_first_start_shows_the_configured_services_signed_out() {
    let (_dir, l) = layers(&config_text());
    let (s, effects) = ControllerState::new(l, T0);
    let v = s.view();
    assert!(matches!(&effects[..], [Effect::Show(shown)] if **shown == v));
    assert_eq!(v.phase, Phase::SignedOut { reason: None });
    assert_eq!(v.summary, "Signed out");
    assert_eq!(v.services[0], ServiceView::new("api", 8081, false));
    assert_eq!(
        (v.gateway.as_str(), v.user.as_str()),
        ("gw.example.com:4433", "alice")
    );
}

#[test]
fn an_unusable_config_shows_not_configured_and_refuses_to_sign_in() {
    let (_dir, l) = layers("gateway = \"nowhere\"\nuser = \"a\"\n");
    let (mut s, _) = ControllerState::new(l, T0);
    assert!(
        matches!(s.view().phase, Phase::NotConfigured { problem } if problem.contains("host:port"))
    );
    let effects = s.handle(Event::Request(Request::SignIn), T0);
    assert!(
        matches!(reply(&effects), Some(Err(ControllerError::NotConfigured { problem })) if problem.contains("host:port"))
    );
    assert!(
        !effects
            .iter()
            .any(|e| matches!(e, Effect::OpenAuthenticator { .. }))
    );
}

#[test]
fn sign_in_opens_the_key_starts_the_agent_and_shows_the_session() {
    let mut r = Rig::new();
    let e = r.ask(Request::SignIn);
    assert!(matches!(
        e.last().expect("effects"),
        Effect::OpenAuthenticator {
            create_soft: false,
            ..
        }
    ));
    assert_eq!(
        r.phase(),
        Phase::Connecting {
            purpose: Purpose::SignIn
        }
    );
    assert_eq!(reply(&e), None, "the request waits for the key");

    let e = r.feed(Event::AuthenticatorOpened {
        key: "YubiKey 5".into(),
    });
    assert!(matches!(
        e.last().expect("effects"),
        Effect::StartAgent { .. }
    ));
    assert_eq!(
        r.phase(),
        Phase::WaitingForTouch {
            key: "YubiKey 5".into(),
            purpose: Purpose::SignIn
        }
    );
    assert_eq!(r.s.view().summary, "Touch your security key (YubiKey 5)");

    let e = r.feed(Event::AgentStarted {
        agent: 1,
        session: Some(session(T0 + 8 * HOUR)),
        listeners: vec![("api".into(), 8081), ("billing".into(), 8082)],
        router: None,
    });
    assert_eq!(reply(&e), Some(Ok(())));
    let v = r.s.view();
    assert_eq!(v.phase, Phase::Connected);
    assert_eq!(v.summary, "Connected as alice — 8 h 00 min left");
    assert_eq!(v.time_left.as_deref(), Some("8 h 00 min"));
    // Only the services the gateway offers are live.
    assert_eq!(
        v.services.iter().map(|s| s.live).collect::<Vec<_>>(),
        [true, false]
    );
    assert_eq!(timer_at(&e, Timer::Warn), Some(T0 + 8 * HOUR - REMINDER));
    assert_eq!(timer_at(&e, Timer::End), Some(T0 + 8 * HOUR));
    assert_eq!(
        timer_at(&e, Timer::Tick),
        Some(T0 + 1),
        "8 h 00 min becomes 7 h 59 min"
    );
    // Signing in again while signed in does nothing.
    assert_eq!(reply(&r.ask(Request::SignIn)), Some(Ok(())));
}

#[test]
fn a_second_request_for_the_key_is_busy() {
    let mut r = Rig::new();
    r.ask(Request::SignIn);
    for again in [
        Request::SignIn,
        Request::Renew,
        Request::Enrol {
            code: "K7Q2".into(),
        },
    ] {
        assert_eq!(reply(&r.ask(again)), Some(Err(ControllerError::Busy)));
    }
    assert_eq!(
        r.phase(),
        Phase::Connecting {
            purpose: Purpose::SignIn
        }
    );
}

#[test]
fn cancel_at_the_pin_prompt_gives_the_key_no_pin_and_signs_out() {
    let mut r = Rig::new();
    r.ask(Request::SignIn);
    r.feed(Event::AuthenticatorOpened {
        key: "Acme Key".into(),
    });
    let e = r.feed(Event::PinNeeded {
        key: "Acme Key".into(),
        retries: Some(8),
    });
    assert_eq!(timer_at(&e, Timer::PinWait), Some(T0 + PIN_WAIT.as_secs()));
    assert_eq!(
        r.phase(),
        Phase::PinNeeded {
            key: "Acme Key".into(),
            retries: Some(8),
            purpose: Purpose::SignIn
        }
    );
    assert!(!r.s.cancelled());

    let e = r.ask(Request::Cancel);
    assert_eq!(pin_answer(&e), Some(None));
    assert_eq!(reply(&e), Some(Ok(())));
    assert!(r.s.cancelled(), "the key's watchdog sees the cancel");
    let e = r.feed(Event::FlowFailed(Failure::Cancelled));
    assert_eq!(reply(&e), Some(Err(ControllerError::Cancelled)));
    assert_eq!(r.phase(), Phase::SignedOut { reason: None });
    assert_eq!(
        reply(&r.ask(Request::SubmitPin { pin: "4321".into() })),
        Some(Err(ControllerError::NoPinAsked))
    );
}

#[test]
fn each_pin_prompt_takes_one_pin_and_shows_the_tries_left() {
    let mut r = Rig::new();
    r.ask(Request::SignIn);
    r.feed(Event::AuthenticatorOpened {
        key: "Acme Key".into(),
    });
    r.feed(Event::PinNeeded {
        key: "Acme Key".into(),
        retries: Some(3),
    });
    let e = r.ask(Request::SubmitPin { pin: "0000".into() });
    assert_eq!(pin_answer(&e), Some(Some("0000".into())));
    assert!(
        e.iter()
            .any(|e| matches!(e, Effect::ClearTimer(Timer::PinWait)))
    );
    // The same prompt is not answered twice.
    assert_eq!(
        reply(&r.ask(Request::SubmitPin { pin: "1111".into() })),
        Some(Err(ControllerError::NoPinAsked))
    );
    // The key refused it and asks again, with a try fewer.
    r.feed(Event::TouchNeeded {
        key: "Acme Key".into(),
    });
    r.feed(Event::PinNeeded {
        key: "Acme Key".into(),
        retries: Some(2),
    });
    assert!(matches!(
        r.phase(),
        Phase::PinNeeded {
            retries: Some(2),
            ..
        }
    ));
    assert_eq!(r.s.view().summary, "Enter your key's PIN");
    let e = r.ask(Request::SubmitPin { pin: "4321".into() });
    assert_eq!(pin_answer(&e), Some(Some("4321".into())));
    let e = r.feed(Event::AgentStarted {
        agent: 1,
        session: Some(session(T0 + HOUR)),
        listeners: vec![("api".into(), 8081)],
        router: None,
    });
    assert_eq!(reply(&e), Some(Ok(())));
    assert_eq!(r.phase(), Phase::Connected);
}

#[test]
fn an_unanswered_pin_prompt_gives_up_after_its_wait() {
    let mut r = Rig::new();
    r.ask(Request::SignIn);
    r.feed(Event::AuthenticatorOpened {
        key: "Acme Key".into(),
    });
    r.feed(Event::PinNeeded {
        key: "Acme Key".into(),
        retries: None,
    });
    let e = r.fire_at(Timer::PinWait, T0 + PIN_WAIT.as_secs());
    assert_eq!(pin_answer(&e), Some(None));
    assert_eq!(
        reply(&r.ask(Request::SubmitPin { pin: "4321".into() })),
        Some(Err(ControllerError::NoPinAsked))
    );
}

#[test]
fn a_pin_prompt_after_a_cancel_is_answered_with_none_at_once() {
    let mut r = Rig::new();
    r.ask(Request::SignIn);
    r.ask(Request::Cancel);
    let e = r.feed(Event::PinNeeded {
        key: "Acme Key".into(),
        retries: None,
    });
    assert_eq!(pin_answer(&e), Some(None));
    // The key opened after the cancel: nothing more is asked of it.
    let e = r.feed(Event::AuthenticatorOpened {
        key: "Acme Key".into(),
    });
    assert!(!e.iter().any(|e| matches!(e, Effect::StartAgent { .. })));
    assert_eq!(reply(&e), Some(Err(ControllerError::Cancelled)));
}

#[test]
fn sign_out_during_sign_in_stops_the_agent_that_starts_after() {
    let mut r = Rig::new();
    r.ask(Request::SignIn);
    r.feed(Event::AuthenticatorOpened {
        key: "YubiKey 5".into(),
    });
    assert_eq!(reply(&r.ask(Request::SignOut)), Some(Ok(())));
    let e = r.feed(Event::AgentStarted {
        agent: 1,
        session: Some(session(T0 + HOUR)),
        listeners: vec![],
        router: None,
    });
    assert!(stops(&e));
    assert_eq!(reply(&e), Some(Err(ControllerError::Cancelled)));
    assert_eq!(r.phase(), Phase::SignedOut { reason: None });
}

#[test]
fn a_failed_sign_in_shows_the_error_in_words() {
    let mut r = Rig::new();
    r.ask(Request::SignIn);
    let e = r.feed(Event::FlowFailed(Failure::Error(
        "no key enrolled: run `touchgate enroll` first".into(),
    )));
    let message = "no key enrolled: run `touchgate enroll` first".to_owned();
    assert_eq!(
        reply(&e),
        Some(Err(ControllerError::Failed {
            message: message.clone()
        }))
    );
    assert_eq!(
        r.phase(),
        Phase::Error {
            message: message.clone()
        }
    );
    assert_eq!(r.s.view().summary, format!("Sign-in failed: {message}"));
}

#[test]
fn enrolment_goes_back_to_where_it_was_and_tells_the_key() {
    let mut r = Rig::new();
    assert_eq!(
        reply(&r.ask(Request::Enrol { code: "  ".into() })),
        Some(Err(ControllerError::NoInviteCode))
    );
    let e = r.ask(Request::Enrol {
        code: " K7Q2-MX4P ".into(),
    });
    assert!(matches!(
        e.last().expect("effects"),
        Effect::OpenAuthenticator {
            create_soft: true,
            ..
        }
    ));
    assert_eq!(
        r.phase(),
        Phase::Connecting {
            purpose: Purpose::Enrol
        }
    );
    let e = r.feed(Event::AuthenticatorOpened {
        key: "software key".into(),
    });
    assert!(
        matches!(e.last().expect("effects"), Effect::Enrol { code, .. } if secrecy::ExposeSecret::expose_secret(code) == "K7Q2-MX4P")
    );
    let e = r.feed(Event::Enrolled);
    assert_eq!(reply(&e), Some(Ok(())));
    assert_eq!(
        notices(&e),
        [Notice::Enrolled {
            key: "software key".into()
        }]
    );
    assert_eq!(r.phase(), Phase::SignedOut { reason: None });
    // A refused invite is said on the view, and the phase stays.
    r.ask(Request::Enrol {
        code: "used".into(),
    });
    r.feed(Event::AuthenticatorOpened {
        key: "software key".into(),
    });
    let e = r.feed(Event::FlowFailed(Failure::Error(
        "the gateway refused".into(),
    )));
    let message = "The key was not enrolled: the gateway refused".to_owned();
    assert_eq!(
        reply(&e),
        Some(Err(ControllerError::Failed {
            message: message.clone()
        }))
    );
    assert_eq!(r.s.view().error, Some(message));
    assert_eq!(r.phase(), Phase::SignedOut { reason: None });
}

#[test]
fn settings_are_saved_through_the_shell_and_a_port_of_an_unknown_service_is_refused() {
    let mut r = Rig::new();
    let e = r.ask(Request::SetServicePort {
        service: "nope".into(),
        port: 9,
    });
    assert_eq!(
        reply(&e),
        Some(Err(ControllerError::UnknownService {
            service: "nope".into()
        }))
    );
    let e = r.ask(Request::SetServicePort {
        service: "api".into(),
        port: 9000,
    });
    let Some(Effect::Save { layers, settings }) = e.into_iter().next() else {
        panic!("a save")
    };
    assert_eq!(settings.services[0].local_port, 9000);
    let saved = layers.save(&settings).map_err(|e| e.to_string());
    let e = r.feed(Event::Saved(saved));
    assert_eq!(reply(&e), Some(Ok(())));
    assert_eq!(r.s.view().services[0].url, "http://127.0.0.1:9000");
    let e = r.feed(Event::Saved(Err(
        "gateway is set by your organisation".into()
    )));
    assert!(matches!(
        reply(&e),
        Some(Err(ControllerError::NotSaved { .. }))
    ));
}

/// A live session: its reminder, end, renewal, and what the agent reports.
mod session;

#[test]
fn the_by_name_port_names_every_web_service_offered() {
    let mut r = Rig::new();
    r.ask(Request::SignIn);
    r.feed(Event::AuthenticatorOpened {
        key: "YubiKey 5".into(),
    });
    let offered = Session {
        user: "alice".into(),
        expires_at: T0 + HOUR,
        services: vec!["api".into(), "Web".into(), "db".into()],
        tcp: vec!["db".into()],
        gateway: String::new(),
        transport: String::new(),
    };
    r.feed(Event::AgentStarted {
        agent: 1,
        session: Some(offered),
        listeners: vec![("api".into(), 8081), ("db".into(), 5432)],
        router: Some(8080),
    });
    let v = r.s.view();
    let shown: Vec<_> = v
        .services
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.local_port,
                s.by_name.as_str(),
                s.best_url(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            (
                "api",
                8081,
                "http://api.localhost:8080/",
                "http://api.localhost:8080/"
            ),
            // A TCP service has its own port only.
            ("db", 5432, "", "http://127.0.0.1:5432"),
            // Offered but not configured: reachable by name alone.
            (
                "Web",
                0,
                "http://web.localhost:8080/",
                "http://web.localhost:8080/"
            ),
        ]
    );
}

#[test]
fn enrolling_with_the_organisation_asks_the_shell_for_the_browser_sign_in() {
    let mut r = Rig::new();
    let e = r.ask(Request::EnrolWithOrganisation);
    assert!(matches!(
        e.last().expect("effects"),
        Effect::OpenAuthenticator {
            create_soft: true,
            ..
        }
    ));
    let e = r.feed(Event::AuthenticatorOpened {
        key: "YubiKey 5".into(),
    });
    // No invite code: the shell signs in with the identity provider instead.
    assert!(
        matches!(e.last().expect("effects"), Effect::Enrol { code, .. } if secrecy::ExposeSecret::expose_secret(code).is_empty())
    );
    let e = r.feed(Event::Enrolled);
    assert_eq!(reply(&e), Some(Ok(())));
}

#[test]
fn the_enrol_window_learns_whether_the_gateway_has_an_identity_provider() {
    let mut r = Rig::new();
    assert_eq!(r.s.view().organisation, Organisation::Unknown);
    let e = r.ask(Request::FindOrganisation);
    assert!(matches!(
        e.last().expect("effects"),
        Effect::FindOrganisation { .. }
    ));
    let e = r.feed(Event::OrganisationFound(Ok(Some("Example Corp".into()))));
    assert_eq!(reply(&e), Some(Ok(())));
    assert_eq!(
        r.s.view().organisation,
        Organisation::Named {
            name: "Example Corp".into()
        }
    );
    r.ask(Request::FindOrganisation);
    r.feed(Event::OrganisationFound(Ok(None)));
    assert_eq!(r.s.view().organisation, Organisation::None);
    // A gateway that cannot be reached says nothing either way.
    r.ask(Request::FindOrganisation);
    r.feed(Event::OrganisationFound(Err("unreachable".into())));
    assert_eq!(r.s.view().organisation, Organisation::Unknown);
}

fn grant_info(id: &str, label: &str, expires_at: u64) -> touchgate_proto::DelegationInfo {
    touchgate_proto::DelegationInfo {
        id: id.into(),
        user: "alice".into(),
        grant: touchgate_proto::Grant {
            label: label.into(),
            services: vec!["api".into()],
            methods: vec!["GET".into(), "HEAD".into()],
            path_prefixes: vec!["/v1/".into()],
            expires_at,
            key: "thumbprint".into(),
        },
        created_at: T0,
        last_used_at: None,
        revoked_at: None,
    }
}

fn form(label: &str, services: &[&str]) -> GrantForm {
    GrantForm {
        label: label.into(),
        services: services.iter().map(|s| (*s).to_owned()).collect(),
        methods: vec![" get".into(), "head ".into()],
        path_prefixes: vec!["/v1/".into(), " ".into()],
        minutes: 60,
        certificate: String::new(),
    }
}

#[test]
fn a_grant_is_refused_before_the_key_unless_signed_in_and_in_shape() {
    let mut r = Rig::new();
    let e = r.ask(Request::Delegate {
        grant: form("ci", &["api"]),
    });
    assert_eq!(reply(&e), Some(Err(ControllerError::NotSignedIn)));
    for ask in [
        Request::ListDelegations,
        Request::RevokeDelegation { id: "dlg-1".into() },
    ] {
        assert_eq!(reply(&r.ask(ask)), Some(Err(ControllerError::NotSignedIn)));
    }
    r.signed_in(8 * HOUR);
    let cases = [
        (form("  ", &["api"]), "name the grant"),
        (form("ci", &[]), "at least one service"),
        // The session offers api only; billing is configured but not live.
        (
            form("ci", &["billing"]),
            "\"billing\" is not a live service",
        ),
        (
            GrantForm {
                minutes: 0,
                ..form("ci", &["api"])
            },
            "how long",
        ),
        (
            GrantForm {
                methods: vec!["GET /x".into()],
                ..form("ci", &["api"])
            },
            "not an HTTP method",
        ),
        (
            GrantForm {
                path_prefixes: vec!["v1/".into()],
                ..form("ci", &["api"])
            },
            "starts with /",
        ),
        (
            GrantForm {
                certificate: "hello".into(),
                ..form("ci", &["api"])
            },
            "not a certificate",
        ),
        (
            GrantForm {
                certificate: crate::delegation::DelegateKey::generate()
                    .expect("key")
                    .to_pem(),
                ..form("ci", &["api"])
            },
            "holds a private key",
        ),
    ];
    for (grant, words) in cases {
        let e = r.ask(Request::Delegate { grant });
        assert!(
            matches!(reply(&e), Some(Err(ControllerError::BadGrant { problem })) if problem.contains(words)),
            "{words}: {e:?}"
        );
        assert!(!e.iter().any(|e| matches!(e, Effect::Delegate { .. })));
        assert_eq!(r.phase(), Phase::Connected);
    }
}

#[test]
fn a_grant_asks_the_running_agents_key_then_shows_its_file_and_the_list() {
    let mut r = Rig::new();
    let e = r.signed_in(8 * HOUR + 50);
    assert!(
        e.iter()
            .any(|e| matches!(e, Effect::ListDelegations { answer: false })),
        "the tray lists the grants after sign-in: {e:?}"
    );
    let e = r.ask(Request::Delegate {
        grant: form(" nightly CI ", &["api"]),
    });
    // Checked and tidied before the key is asked; the touch is on the running agent's key.
    let Some(Effect::Delegate { grant }) = e.last() else {
        panic!("{e:?}")
    };
    assert_eq!(grant.label, "nightly CI");
    assert_eq!(grant.methods, ["GET", "HEAD"]);
    assert_eq!(grant.path_prefixes, ["/v1/"]);
    assert_eq!(reply(&e), None, "the request waits for the touch");
    assert_eq!(
        r.phase(),
        Phase::WaitingForTouch {
            key: "YubiKey 5".into(),
            purpose: Purpose::Delegate
        }
    );
    assert_eq!(
        r.s.view().summary,
        "Touch your security key to approve the grant (YubiKey 5)"
    );
    // One flow at a time.
    assert_eq!(
        reply(&r.ask(Request::Renew)),
        Some(Err(ControllerError::Busy))
    );

    let granted = GrantedView {
        id: "dlg-00000000000000aa".into(),
        label: "nightly CI".into(),
        file: "/home/alice/.config/touchgate/grants/dlg-00000000000000aa.json".into(),
        run: "touchgate run --delegation /home/alice/.config/touchgate/grants/dlg-00000000000000aa.json -- COMMAND".into(),
        for_key: false,
        expires_at: r.now + HOUR,
    };
    let e = r.feed(Event::Delegated(Box::new(granted.clone())));
    assert_eq!(reply(&e), Some(Ok(())));
    assert!(
        e.iter()
            .any(|e| matches!(e, Effect::ListDelegations { answer: false }))
    );
    assert_eq!(r.phase(), Phase::Connected);
    assert_eq!(r.s.view().granted, Some(granted));

    // The list shows live grants only, the soonest to end first, with their words.
    let mut revoked = grant_info("dlg-00000000000000cc", "old", r.now + HOUR);
    revoked.revoked_at = Some(r.now - 5);
    let list = vec![
        grant_info("dlg-00000000000000aa", "nightly CI", r.now + HOUR + 50),
        grant_info("dlg-00000000000000bb", "assistant", r.now + 10 * 60 + 30),
        revoked,
        grant_info("dlg-00000000000000dd", "ended", r.now - 1),
    ];
    let e = r.feed(Event::DelegationsListed {
        grants: Ok(list),
        answer: true,
    });
    assert_eq!(reply(&e), Some(Ok(())));
    let v = r.s.view();
    let shown: Vec<_> = v
        .delegations
        .iter()
        .map(|g| (g.label.as_str(), g.scope.as_str(), g.time_left.as_str()))
        .collect();
    assert_eq!(
        shown,
        [
            ("assistant", "api · GET, HEAD · paths /v1/", "10 min"),
            ("nightly CI", "api · GET, HEAD · paths /v1/", "1 h 00 min"),
        ]
    );
    // The words change with the clock, and a grant that ends leaves the list by itself.
    let tick = timer_at(&e, Timer::Tick).expect("a tick for the grants' words");
    assert_eq!(tick, r.now + 31, "the assistant's 10 min become 9 min");
    r.fire_at(Timer::Tick, tick);
    assert_eq!(r.s.view().delegations[0].time_left, "9 min");
    let end = r.now + 10 * 60;
    r.fire_at(Timer::Tick, end);
    let labels: Vec<_> =
        r.s.view()
            .delegations
            .iter()
            .map(|g| g.label.clone())
            .collect();
    assert_eq!(labels, ["nightly CI"]);

    // Revoked: gone from the list at once, and the list is asked again.
    let e = r.ask(Request::RevokeDelegation {
        id: "dlg-00000000000000aa".into(),
    });
    assert!(
        matches!(e.last(), Some(Effect::RevokeDelegation { id }) if id == "dlg-00000000000000aa")
    );
    let e = r.feed(Event::DelegationRevoked(Ok("dlg-00000000000000aa".into())));
    assert_eq!(reply(&e), Some(Ok(())));
    assert!(r.s.view().delegations.is_empty());
    assert_eq!(r.s.view().granted, None, "a revoked grant is not offered");
    let e = r.feed(Event::DelegationRevoked(Err("no such grant".into())));
    assert!(
        matches!(reply(&e), Some(Err(ControllerError::Failed { message })) if message == "The grant was not revoked: no such grant")
    );

    // A list from a hostile gateway shows only ids of the gateway's shape (they name files
    // and menu entries).
    let mut odd = grant_info("dlg-00000000000000ee", "x", r.now + HOUR);
    odd.id = "../../.bashrc".into();
    r.feed(Event::DelegationsListed {
        grants: Ok(vec![
            odd,
            grant_info("dlg-00000000000000ee", "x", r.now + HOUR),
        ]),
        answer: false,
    });
    let ids: Vec<_> =
        r.s.view()
            .delegations
            .iter()
            .map(|g| g.id.clone())
            .collect();
    assert_eq!(ids, ["dlg-00000000000000ee"]);
    // Signing out clears the list and the grant offered: both are the session's.
    r.s.view.granted = Some(GrantedView {
        id: "dlg-00000000000000ee".into(),
        label: "x".into(),
        file: "f".into(),
        run: "r".into(),
        for_key: false,
        expires_at: r.now + HOUR,
    });
    r.ask(Request::SignOut);
    assert!(r.s.view().delegations.is_empty());
    assert_eq!(r.s.view().granted, None);
}

#[test]
fn a_refused_or_cancelled_grant_leaves_the_session_as_it_was() {
    let mut r = Rig::new();
    r.signed_in(8 * HOUR);
    r.ask(Request::Delegate {
        grant: form("ci", &["api"]),
    });
    let e = r.feed(Event::FlowFailed(Failure::Error(
        "the gateway refused: delegation is off on this gateway".into(),
    )));
    assert!(
        matches!(reply(&e), Some(Err(ControllerError::Failed { message })) if message == "The grant was not made: the gateway refused: delegation is off on this gateway")
    );
    let v = r.s.view();
    assert_eq!(v.phase, Phase::Connected);
    assert_eq!(v.error, None, "the sign-in window does not show it");
    assert!(v.session.is_some());

    r.ask(Request::Delegate {
        grant: form("ci", &["api"]),
    });
    r.ask(Request::Cancel);
    let e = r.feed(Event::FlowFailed(Failure::Cancelled));
    assert_eq!(reply(&e), Some(Err(ControllerError::Cancelled)));
    assert_eq!(r.phase(), Phase::Connected);
    // A list that cannot be had is said to the request that asked, and only to it.
    let e = r.feed(Event::DelegationsListed {
        grants: Err("timed out".into()),
        answer: false,
    });
    assert_eq!(reply(&e), None);
    let e = r.feed(Event::DelegationsListed {
        grants: Err("timed out".into()),
        answer: true,
    });
    assert!(
        matches!(reply(&e), Some(Err(ControllerError::Failed { message })) if message.contains("timed out"))
    );
}

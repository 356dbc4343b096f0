//! A live session's transitions: the reminder, the end, renewal, and the agent's news
//! (reconnecting, key removed, signed out by the gateway).

use super::*;

#[test]
fn the_expiry_warning_comes_the_reminder_before_the_end_and_once() {
    let mut r = Rig::new();
    let e = r.signed_in(HOUR);
    let warn_at = timer_at(&e, Timer::Warn).expect("warn timer");
    assert_eq!(warn_at, T0 + HOUR - REMINDER);

    let e = r.fire_at(Timer::Warn, warn_at);
    assert_eq!(notices(&e), [Notice::ExpiringSoon { minutes_left: 10 }]);
    assert_eq!(r.phase(), Phase::ExpiringSoon);
    assert_eq!(r.s.view().summary, "Session ends in 10 min: renew it");
    // A late or repeated wake-up warns no more.
    assert!(notices(&r.fire_at(Timer::Warn, warn_at + 5)).is_empty());
    // The same session seen again (a reconnect) is not warned again either.
    let e = r.agent(AgentState::Connected {
        user: "alice".into(),
        expires_at: T0 + HOUR,
        services: vec!["api".into()],
        tcp: Vec::new(),
        gateway: IN_USE.into(),
        transport: "QUIC".into(),
    });
    assert!(notices(&e).is_empty());
    assert_eq!(r.phase(), Phase::ExpiringSoon);
}

#[test]
fn a_session_that_starts_within_the_reminder_is_warned_at_once() {
    let mut r = Rig::new();
    let e = r.signed_in(5 * 60);
    assert_eq!(r.phase(), Phase::ExpiringSoon);
    assert_eq!(notices(&e), [Notice::ExpiringSoon { minutes_left: 5 }]);
    assert_eq!(timer_at(&e, Timer::Warn), None);
}

#[test]
fn a_timer_that_wakes_early_is_set_again() {
    let mut r = Rig::new();
    let e = r.signed_in(HOUR);
    let end = timer_at(&e, Timer::End).expect("end timer");
    let e = r.fire_at(Timer::End, end - 1);
    assert_eq!(timer_at(&e, Timer::End), Some(end));
    assert_eq!(r.phase(), Phase::Connected);
}

#[test]
fn the_session_ends_at_its_expiry_with_a_notice_and_the_agent_stops() {
    let mut r = Rig::new();
    r.signed_in(HOUR);
    let e = r.fire_at(Timer::End, T0 + HOUR);
    assert!(stops(&e));
    let stop = e.iter().position(|e| matches!(e, Effect::StopAgent));
    let show = e.iter().position(|e| matches!(e, Effect::Show(_)));
    assert!(
        stop < show,
        "the ports close before the view says signed out: {e:?}"
    );
    assert_eq!(
        notices(&e),
        [Notice::SessionEnded {
            reason: "Your session reached its end.".into()
        }]
    );
    let v = r.s.view();
    assert_eq!(
        v.phase,
        Phase::SignedOut {
            reason: Some("Your session reached its end.".into())
        }
    );
    assert!(v.session.is_none() && v.time_left.is_none());
    assert!(v.services.iter().all(|s| !s.live));
    // The stopped agent's last words change nothing.
    let e = r.agent(AgentState::Reconnecting {
        attempt: 1,
        reason: "closed".into(),
    });
    assert!(e.is_empty(), "{e:?}");
}

#[test]
fn renew_asks_for_a_touch_and_moves_the_reminder_and_the_end() {
    let mut r = Rig::new();
    r.signed_in(HOUR);
    r.fire_at(Timer::Warn, T0 + HOUR - REMINDER);
    let e = r.ask(Request::Renew);
    assert!(
        matches!(e.last().expect("effects"), Effect::Renew),
        "the running agent's key, not a new one: {e:?}"
    );
    assert_eq!(
        r.phase(),
        Phase::WaitingForTouch {
            key: "YubiKey 5".into(),
            purpose: Purpose::Renew
        }
    );
    r.now += 30;
    let new_end = r.now + 8 * HOUR;
    let e = r.feed(Event::Renewed(session(new_end)));
    assert_eq!(reply(&e), Some(Ok(())));
    assert_eq!(r.phase(), Phase::Connected);
    assert_eq!(timer_at(&e, Timer::Warn), Some(new_end - REMINDER));
    assert_eq!(timer_at(&e, Timer::End), Some(new_end));
    // The new session is warned about in its turn.
    let e = r.fire_at(Timer::Warn, new_end - REMINDER);
    assert_eq!(notices(&e), [Notice::ExpiringSoon { minutes_left: 10 }]);
}

#[test]
fn a_failed_renewal_keeps_the_session_and_says_why() {
    let mut r = Rig::new();
    r.signed_in(HOUR);
    r.ask(Request::Renew);
    let e = r.feed(Event::FlowFailed(Failure::Error(
        "no touch within 30s".into(),
    )));
    let message = "The session was not renewed: no touch within 30s".to_owned();
    assert_eq!(
        reply(&e),
        Some(Err(ControllerError::Failed {
            message: message.clone()
        }))
    );
    let v = r.s.view();
    assert_eq!(v.phase, Phase::Connected);
    assert_eq!(v.error, Some(message));
    assert!(!stops(&e));
    // A cancelled renewal just goes back.
    r.ask(Request::Renew);
    assert_eq!(r.s.view().error, None);
    r.ask(Request::Cancel);
    let e = r.feed(Event::FlowFailed(Failure::Cancelled));
    assert_eq!(reply(&e), Some(Err(ControllerError::Cancelled)));
    assert_eq!(r.phase(), Phase::Connected);
}

#[test]
fn renew_while_signed_out_signs_in() {
    let mut r = Rig::new();
    let e = r.ask(Request::Renew);
    assert!(matches!(
        e.last().expect("effects"),
        Effect::OpenAuthenticator { .. }
    ));
    assert_eq!(
        r.phase(),
        Phase::Connecting {
            purpose: Purpose::SignIn
        }
    );
}

#[test]
fn key_removal_ends_the_session_and_says_so() {
    let mut r = Rig::new();
    r.signed_in(HOUR);
    let e = r.agent(AgentState::KeyRemoved);
    assert!(stops(&e));
    assert_eq!(
        notices(&e),
        [Notice::SessionEnded {
            reason: "The security key was unplugged, which ended your session.".into()
        }]
    );
    assert!(
        e.iter()
            .any(|e| matches!(e, Effect::ClearTimer(Timer::End)))
    );
    let v = r.s.view();
    assert_eq!(v.phase, Phase::KeyRemoved);
    assert_eq!(v.summary, "Signed out: the security key was unplugged");
    assert!(v.services.iter().all(|s| !s.live));
}

#[test]
fn a_lost_connection_is_told_once_and_so_is_its_return() {
    let mut r = Rig::new();
    r.signed_in(HOUR);
    assert_eq!(r.s.view().gateway, IN_USE);
    let e = r.agent(AgentState::Reconnecting {
        attempt: 0,
        reason: "connection lost".into(),
    });
    assert_eq!(
        notices(&e),
        [Notice::ConnectionLost {
            reason: "connection lost".into()
        }]
    );
    let e = r.agent(AgentState::Reconnecting {
        attempt: 1,
        reason: "timed out".into(),
    });
    assert!(notices(&e).is_empty());
    let v = r.s.view();
    assert_eq!(
        v.phase,
        Phase::Reconnecting {
            attempt: 1,
            reason: "timed out".into()
        }
    );
    assert_eq!(v.summary, "Connection lost — reconnecting…");
    assert!(v.services.iter().all(|s| !s.live));
    // No address is in use while reconnecting: the view shows the configured one.
    assert_eq!(v.gateway, "gw.example.com:4433");
    let e = r.agent(AgentState::Connected {
        user: "alice".into(),
        expires_at: T0 + HOUR,
        services: vec!["api".into()],
        tcp: Vec::new(),
        gateway: "gw.example.com:4433 (192.0.2.8:4433) over TCP".into(),
        transport: "TCP: UDP seems blocked on this network".into(),
    });
    assert_eq!(notices(&e), [Notice::ConnectionRestored]);
    assert_eq!(r.phase(), Phase::Connected);
    assert!(r.s.view().services[0].live);
    // The status says where the session now lives, and how it is reached.
    assert_eq!(
        r.s.view().gateway,
        "gw.example.com:4433 (192.0.2.8:4433) over TCP"
    );
    assert_eq!(
        r.s.view().transport,
        "TCP: UDP seems blocked on this network"
    );
    assert!(
        r.s.view()
            .summary
            .starts_with("Connected as alice over TCP — "),
        "{}",
        r.s.view().summary
    );
    // Lost again: no transport is claimed while reconnecting.
    r.agent(AgentState::Reconnecting {
        attempt: 0,
        reason: "timed out".into(),
    });
    assert_eq!(r.s.view().transport, "");
}

#[test]
fn a_disabled_account_signs_out_with_the_gateways_words() {
    let reason = crate::agent::ACCOUNT_DISABLED.to_owned();
    // The agent stops while signed in.
    let mut r = Rig::new();
    r.signed_in(HOUR);
    let e = r.feed(Event::Agent {
        agent: 1,
        state: AgentState::SignedOut {
            reason: reason.clone(),
        },
        account_disabled: true,
    });
    assert!(stops(&e));
    assert_eq!(
        notices(&e),
        [Notice::AccountDisabled {
            reason: reason.clone()
        }]
    );
    assert_eq!(
        r.phase(),
        Phase::SignedOut {
            reason: Some(reason.clone())
        }
    );
    // Signing in again is refused: signed out with the reason, not an error.
    r.ask(Request::SignIn);
    r.feed(Event::AuthenticatorOpened {
        key: "YubiKey 5".into(),
    });
    let e = r.feed(Event::FlowFailed(Failure::Disabled(reason.clone())));
    assert_eq!(
        reply(&e),
        Some(Err(ControllerError::AccountDisabled {
            reason: reason.clone()
        }))
    );
    assert_eq!(
        notices(&e),
        [Notice::AccountDisabled {
            reason: reason.clone()
        }]
    );
    assert_eq!(
        r.phase(),
        Phase::SignedOut {
            reason: Some(reason)
        }
    );
}

#[test]
fn a_session_the_gateway_ends_is_told_as_ended() {
    let mut r = Rig::new();
    r.signed_in(HOUR);
    let e = r.agent(AgentState::SignedOut {
        reason: "Your session was revoked.".into(),
    });
    assert!(stops(&e));
    assert_eq!(
        notices(&e),
        [Notice::SessionEnded {
            reason: "Your session was revoked.".into()
        }]
    );
}

#[test]
fn the_time_left_is_worded_again_when_it_changes() {
    let mut r = Rig::new();
    let e = r.signed_in(2 * HOUR + 30);
    assert_eq!(r.s.view().time_left.as_deref(), Some("2 h 00 min"));
    let tick = timer_at(&e, Timer::Tick).expect("tick");
    let e = r.fire_at(Timer::Tick, tick);
    assert!(
        matches!(&e[..], [.., Effect::Show(v)] if v.time_left.as_deref() == Some("1 h 59 min")),
        "{e:?}"
    );
    assert_eq!(timer_at(&e, Timer::Tick), Some(tick + 60));
    assert_eq!(r.s.view().summary, "Connected as alice — 1 h 59 min left");
}

#[test]
fn sign_out_stops_the_agent_and_clears_the_timers() {
    let mut r = Rig::new();
    r.signed_in(HOUR);
    let e = r.ask(Request::SignOut);
    assert!(stops(&e));
    for t in [Timer::Warn, Timer::End, Timer::Tick] {
        assert!(
            e.iter()
                .any(|e| matches!(e, Effect::ClearTimer(x) if *x == t)),
            "{t:?}: {e:?}"
        );
    }
    assert!(notices(&e).is_empty(), "the user asked: no notice");
    assert_eq!(r.phase(), Phase::SignedOut { reason: None });
    // A timer that was already on its way finds nothing to do.
    assert!(r.fire_at(Timer::End, T0 + HOUR).is_empty());
}

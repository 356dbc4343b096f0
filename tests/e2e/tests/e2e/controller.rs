//! The controller that both front ends drive, with a fake UI that records every view and
//! notice: the state sequences of enrolment, sign-in, expiry warning, renewal, reconnection,
//! expiry and sign-out, and the PIN and cancel flow of a hardware key, against a real gateway.

use std::{path::Path, sync::Arc, time::Duration};

use touchgate_agent::{
    AgentState, RunningAgent,
    controller::{Controller, ControllerError, GrantForm, Notice, Phase, Purpose, Request},
    delegation::{self, DelegationFile},
    settings::ConfigPaths,
};
use touchgate_e2e::{FakeUi, get, hid, lab_trusting, wait_for_state};
use touchgate_testkit::{
    hardware::Vendor,
    lab::{Lab, LabOptions},
};

const ALICE: &str = "alice@example.com";
const WAIT: Duration = Duration::from_secs(15);

/// Writes the user's config for `lab` (soft key in the lab folder) and returns its paths,
/// with a managed file that does not exist.
fn user_config(lab: &Lab, authenticator: &str, extra: &str) -> anyhow::Result<ConfigPaths> {
    let user = lab.dir.path().join("user/agent.toml");
    std::fs::create_dir_all(user.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(
        &user,
        format!(
            "gateway = \"{}\"\nserver_name = \"localhost\"\ngateway_cert_sha256 = \"{}\"\nuser = \"{ALICE}\"\n\
             authenticator = \"{authenticator}\"\n{extra}\n[[service]]\nname = \"api\"\nlocal_port = 0\n",
            lab.quic_addr, lab.fingerprint
        ),
    )?;
    Ok(ConfigPaths {
        user,
        managed: Some(lab.dir.path().join("no-managed.toml")),
    })
}

/// A controller over `lab` with a freshly enrolled software key (extra config lines in
/// `extra`), and the fake UI it draws on.
async fn enrolled(lab: &Lab, extra: &str) -> anyhow::Result<(Arc<FakeUi>, Controller)> {
    let paths = user_config(lab, "soft:alice.softkey", extra)?;
    let ui = Arc::new(FakeUi::default());
    let c = Controller::new(paths, ui.clone());
    c.handle(Request::Enrol {
        code: lab.invite(ALICE)?,
    })
    .await?;
    Ok((ui, c))
}

fn api_port(c: &Controller) -> u16 {
    c.view()
        .services
        .iter()
        .find(|s| s.name == "api")
        .map(|s| s.local_port)
        .unwrap_or(0)
}

#[tokio::test]
async fn enrol_sign_in_warning_renew_and_sign_out_come_in_order() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions {
        max_age: Duration::from_secs(8),
        ..Default::default()
    })
    .await?;
    let (ui, c) = enrolled(&lab, "renew_reminder = \"5s\"").await?;
    assert!(
        matches!(&ui.notices()[..], [Notice::Enrolled { key }] if key.starts_with("software key")),
        "{:?}",
        ui.notices()
    );

    c.handle(Request::SignIn).await?;
    let v = c.view();
    assert_eq!(v.phase, Phase::Connected);
    let first_expiry = v.session.as_ref().expect("session").expires_at;
    assert!(v.services[0].live, "{v:?}");
    assert_eq!(
        v.services[0].url,
        format!("http://127.0.0.1:{}", api_port(&c))
    );
    let port = api_port(&c);
    let answer = get(([127, 0, 0, 1], port).into(), "/through-the-tray", &[]).await?;
    assert_eq!(answer.status, 200);
    let conn = c.agent().await.and_then(|a| a.connection()).expect("conn");

    // Eight-second sessions and a five-second reminder: the warning comes after about three.
    ui.wait_for(WAIT, "expiring_soon", |v| v.phase == Phase::ExpiringSoon)
        .await?;
    assert!(
        ui.notices()
            .iter()
            .any(|n| matches!(n, Notice::ExpiringSoon { minutes_left: 1 })),
        "{:?}",
        ui.notices()
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.handle(Request::Renew).await?;
    let v = c.view();
    assert_eq!(v.phase, Phase::Connected);
    assert!(v.session.expect("session").expires_at > first_expiry);
    // Same port, same QUIC connection: renewing closed nothing.
    assert_eq!(api_port(&c), port);
    let again = c.agent().await.and_then(|a| a.connection()).expect("conn");
    assert_eq!(again.stable_id(), conn.stable_id());
    assert_eq!(
        get(([127, 0, 0, 1], port).into(), "/after-renew", &[])
            .await?
            .status,
        200
    );
    assert_eq!(lab.audit_events("session_issued").len(), 2);

    c.handle(Request::SignOut).await?;
    assert_eq!(c.view().phase, Phase::SignedOut { reason: None });
    assert!(c.view().session.is_none());
    assert!(!c.view().services[0].live);
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "the service port is closed after sign-out"
    );
    assert_eq!(
        ui.phases(),
        [
            "signed_out",
            "connecting:enrol",
            "waiting_for_touch:enrol",
            "signed_out",
            "connecting:sign_in",
            "waiting_for_touch:sign_in",
            "connected",
            "expiring_soon",
            "waiting_for_touch:renew",
            "connected",
            "signed_out",
        ]
    );
    Ok(())
}

#[tokio::test]
async fn a_lost_connection_is_shown_and_comes_back_without_a_touch() -> anyhow::Result<()> {
    let mut lab = Lab::start(LabOptions::default()).await?;
    let (ui, c) = enrolled(&lab, "").await?;
    c.handle(Request::SignIn).await?;
    let port = api_port(&c);

    lab.stop_gateway().await;
    let v = ui
        .wait_for(WAIT, "reconnecting", |v| {
            matches!(v.phase, Phase::Reconnecting { .. })
        })
        .await?;
    assert!(!v.services[0].live, "{v:?}");
    assert!(
        matches!(ui.notices().last(), Some(Notice::ConnectionLost { .. })),
        "{:?}",
        ui.notices()
    );
    lab.start_gateway().await?;
    ui.wait_for(Duration::from_secs(30), "connected", |v| {
        v.phase == Phase::Connected
    })
    .await?;
    assert_eq!(ui.notices().last(), Some(&Notice::ConnectionRestored));
    assert_eq!(
        get(([127, 0, 0, 1], port).into(), "/restored", &[])
            .await?
            .status,
        200
    );
    // Resumed, not signed in again: one challenge in the whole run.
    assert_eq!(lab.audit_events("challenge_issued").len(), 1);
    assert_eq!(lab.audit_events("session_resumed").len(), 1);
    c.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_session_ends_at_its_expiry_with_a_notice() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions {
        max_age: Duration::from_secs(3),
        ..Default::default()
    })
    .await?;
    let (ui, c) = enrolled(&lab, "renew_reminder = \"1s\"").await?;
    c.handle(Request::SignIn).await?;
    let port = api_port(&c);
    let v = ui
        .wait_for(WAIT, "signed_out with a reason", |v| {
            matches!(&v.phase, Phase::SignedOut { reason: Some(_) })
        })
        .await?;
    assert!(v.session.is_none());
    let ended: Vec<_> = ui
        .notices()
        .into_iter()
        .filter(|n| matches!(n, Notice::ExpiringSoon { .. } | Notice::SessionEnded { .. }))
        .collect();
    assert!(
        matches!(&ended[..], [Notice::ExpiringSoon { .. }, Notice::SessionEnded { reason }] if reason.contains("end")),
        "{ended:?}"
    );
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn a_hardware_key_asks_for_its_pin_through_the_ui_and_can_be_cancelled() -> anyhow::Result<()>
{
    let vendor = Vendor::new("Acme")?;
    let model = *b"touchgate-modelA";
    let key = Arc::new(vendor.make_key("Acme Key", model, Some("4321"))?);
    let (_d, lab) = lab_trusting(&vendor, &[model], "user_verification = \"required\"").await?;
    let paths = user_config(&lab, "hid", "")?;
    let ui = Arc::new(FakeUi::default());
    let k = key.clone();
    let c = Controller::with_opener(
        paths,
        ui.clone(),
        Arc::new(move |_cfg, _create, prompter| {
            hid(&k, prompter)
                .map_err(|e| touchgate_agent::authenticator::AuthnError::Device(e.to_string()))
        }),
    );
    let pin_needed = |purpose: Purpose| move |v: &touchgate_agent::controller::View| matches!(&v.phase, Phase::PinNeeded { key, purpose: p, .. } if key == "Acme Key" && *p == purpose);

    // Enrol: the key asks for its PIN, the UI answers.
    let code = lab.invite(ALICE)?;
    let enrol = tokio::spawn({
        let c = c.clone();
        async move { c.handle(Request::Enrol { code }).await }
    });
    ui.wait_for(WAIT, "pin_needed for enrolment", pin_needed(Purpose::Enrol))
        .await?;
    c.handle(Request::SubmitPin { pin: "4321".into() }).await?;
    enrol.await??;

    // Sign in, then cancel at the PIN prompt: signed out, nothing asked of the gateway.
    let sign_in = tokio::spawn({
        let c = c.clone();
        async move { c.handle(Request::SignIn).await }
    });
    ui.wait_for(WAIT, "pin_needed for sign-in", pin_needed(Purpose::SignIn))
        .await?;
    c.handle(Request::Cancel).await?;
    let e = sign_in.await?.expect_err("cancelled");
    assert_eq!(e.to_string(), "cancelled");
    assert_eq!(c.view().phase, Phase::SignedOut { reason: None });
    let e = c
        .handle(Request::SubmitPin { pin: "4321".into() })
        .await
        .expect_err("nobody asks");
    assert_eq!(e.to_string(), "the key is not asking for a PIN now");

    // A wrong PIN is asked again; the right one signs in.
    let sign_in = tokio::spawn({
        let c = c.clone();
        async move { c.handle(Request::SignIn).await }
    });
    ui.wait_for(WAIT, "pin_needed", pin_needed(Purpose::SignIn))
        .await?;
    let asked = ui.phases().len();
    c.handle(Request::SubmitPin { pin: "0000".into() }).await?;
    ui.wait_for(WAIT, "pin_needed again", |v| {
        matches!(v.phase, Phase::PinNeeded { .. })
    })
    .await?;
    tokio::time::timeout(WAIT, async {
        while ui.phases().len() == asked {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?;
    c.handle(Request::SubmitPin { pin: "4321".into() }).await?;
    sign_in.await??;
    assert_eq!(c.view().phase, Phase::Connected);
    assert_eq!(
        get(([127, 0, 0, 1], api_port(&c)).into(), "/pin", &[])
            .await?
            .status,
        200
    );
    c.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn failures_are_shown_in_words() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let paths = user_config(&lab, "soft:nobody.softkey", "")?;
    let ui = Arc::new(FakeUi::default());
    let c = Controller::new(paths.clone(), ui.clone());
    // No key enrolled yet.
    let e = c.handle(Request::SignIn).await.expect_err("no key");
    assert!(
        e.to_string().contains("run `touchgate enroll` first"),
        "{e}"
    );
    assert_eq!(
        c.view().phase,
        Phase::Error {
            message: e.to_string()
        }
    );
    // A used invite.
    let code = lab.invite(ALICE)?;
    c.handle(Request::Enrol { code: code.clone() }).await?;
    let e = c.handle(Request::Enrol { code }).await.expect_err("used");
    assert!(
        e.to_string()
            .starts_with("The key was not enrolled: the gateway refused"),
        "{e}"
    );
    assert_eq!(c.view().error, Some(e.to_string()));
    // An unknown service port, and a port change that works.
    let e = c
        .handle(Request::SetServicePort {
            service: "nope".into(),
            port: 9,
        })
        .await
        .expect_err("unknown");
    assert_eq!(
        e.to_string(),
        "there is no service named \"nope\" in your settings"
    );
    c.handle(Request::SetServicePort {
        service: "api".into(),
        port: 0,
    })
    .await?;
    // A user config the controller cannot use shows what is wrong.
    std::fs::write(&paths.user, "gateway = \"nowhere\"\nuser = \"a\"\n")?;
    let c = Controller::new(paths, ui.clone());
    match c.view().phase {
        Phase::NotConfigured { problem } => {
            assert!(problem.contains("must be host:port"), "{problem}");
            assert!(problem.contains("gateway_cert_sha256"), "{problem}");
        }
        other => panic!("expected not_configured, got {other:?}"),
    }
    let e = c.handle(Request::SignIn).await.expect_err("not configured");
    assert!(e.to_string().contains("must be host:port"), "{e}");
    Ok(())
}

/// The tray's "Delegate access…": one touch on the signed-in key makes a grant whose file is
/// written 0600 in a 0700 folder beside the config; the view lists it, a headless agent uses
/// it, and Revoke ends it with no touch.
#[tokio::test]
async fn the_tray_grants_with_a_touch_writes_a_private_file_lists_and_revokes() -> anyhow::Result<()>
{
    let lab = Lab::start(LabOptions::default()).await?;
    let (ui, c) = enrolled(&lab, "").await?;
    // Not signed in: nothing is asked of the key.
    let form = GrantForm {
        label: "nightly CI".into(),
        services: vec!["api".into()],
        methods: vec!["get".into()],
        path_prefixes: vec!["/v1/".into()],
        minutes: 30,
        certificate: String::new(),
    };
    let e = c
        .handle(Request::Delegate {
            grant: form.clone(),
        })
        .await;
    assert_eq!(e, Err(ControllerError::NotSignedIn));
    c.handle(Request::SignIn).await?;
    assert!(c.view().delegations.is_empty());
    let asked = lab.audit_events("challenge_issued").len();

    // A service the session does not offer is refused before the key is asked.
    let e = c
        .handle(Request::Delegate {
            grant: GrantForm {
                services: vec!["billing".into()],
                ..form.clone()
            },
        })
        .await;
    assert!(
        matches!(&e, Err(ControllerError::BadGrant { problem }) if problem.contains("billing")),
        "{e:?}"
    );
    assert_eq!(lab.audit_events("challenge_issued").len(), asked);

    // A grants folder left open to others is closed before a key goes into it.
    let grants_dir = lab.dir.path().join("user/grants");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&grants_dir)?;
        std::fs::set_permissions(&grants_dir, std::fs::Permissions::from_mode(0o755))?;
    }
    c.handle(Request::Delegate {
        grant: form.clone(),
    })
    .await?;
    assert!(
        ui.phases()
            .contains(&"waiting_for_touch:delegate".to_owned()),
        "{:?}",
        ui.phases()
    );
    let v = c.view();
    assert_eq!(v.phase, Phase::Connected);
    let granted = v.granted.clone().expect("the grant just made");
    let file = std::path::PathBuf::from(&granted.file);
    assert_eq!(file, grants_dir.join(format!("{}.json", granted.id)));
    assert_eq!(
        granted.run,
        format!("touchgate run --delegation {} -- COMMAND", granted.file)
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode(&file)?, 0o600);
        assert_eq!(mode(&grants_dir)?, 0o700);
    }
    let listed: Vec<_> = v
        .delegations
        .iter()
        .map(|g| (g.id.as_str(), g.label.as_str(), g.scope.as_str()))
        .collect();
    assert_eq!(
        listed,
        [(granted.id.as_str(), "nightly CI", "api · GET · paths /v1/")]
    );
    assert_eq!(lab.audit_events("delegation_granted").len(), 1);

    // The file is what a delegate needs: a headless agent serves the grant's scope.
    let f = DelegationFile::read(&file)?;
    let bot = RunningAgent::start_delegated(delegation::load_headless(
        &f,
        None,
        &[],
        Some(lab.dir.path().join("bot.sock")),
    )?)
    .await?;
    let bot_addr = bot.listeners()[0].1;
    assert_eq!(get(bot_addr, "/v1/items", &[]).await?.status, 200);
    assert_eq!(get(bot_addr, "/admin", &[]).await?.status, 403);

    // Revoke: no touch; the list empties and the delegate's session ends within seconds.
    let challenges = lab.audit_events("challenge_issued").len();
    c.handle(Request::RevokeDelegation {
        id: granted.id.clone(),
    })
    .await?;
    assert!(c.view().delegations.is_empty());
    assert!(
        !file.exists(),
        "a revoked grant's file (its key) is removed"
    );
    assert_eq!(c.view().granted, None);
    wait_for_state(&bot, WAIT, |s| matches!(s, AgentState::SignedOut { .. })).await?;
    assert_eq!(lab.audit_events("challenge_issued").len(), challenges);
    let e = c
        .handle(Request::RevokeDelegation {
            id: "dlg-0000000000000000".into(),
        })
        .await;
    assert!(
        matches!(&e, Err(ControllerError::Failed { message }) if message.starts_with("The grant was not revoked")),
        "{e:?}"
    );
    bot.shutdown().await;

    // For a key held elsewhere: the certificate goes in, the file holds no private key, and
    // the delegate runs it with its own key.
    let held = delegation::DelegateKey::generate()?;
    c.handle(Request::Delegate {
        grant: GrantForm {
            label: "build farm".into(),
            certificate: held.cert_pem.clone(),
            ..form
        },
    })
    .await?;
    let granted = c.view().granted.expect("the grant just made");
    assert!(granted.for_key);
    assert!(
        granted.run.ends_with(" --key KEY -- COMMAND"),
        "{}",
        granted.run
    );
    let f = DelegationFile::read(std::path::Path::new(&granted.file))?;
    assert_eq!(f.key.key_pem, None, "no private key in the file");
    let farm = RunningAgent::start_delegated(delegation::load_headless(
        &f,
        Some(&held),
        &[],
        Some(lab.dir.path().join("farm.sock")),
    )?)
    .await?;
    assert_eq!(
        get(farm.listeners()[0].1, "/v1/builds", &[]).await?.status,
        200
    );
    farm.shutdown().await;
    c.shutdown().await;
    Ok(())
}

//! Delegated grants end to end, with the software key: one touch approves a narrow grant, a
//! headless agent uses it without a key, the upstream sees both the person and the delegate,
//! and whatever the grant does not allow is refused before the upstream. Revoking (by the user
//! or an admin), disabling the user and the grant's expiry end it; a tampered token, a token
//! with another key, and an assertion signed for another scope are refused.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use touchgate_agent::{
    AgentState, RunningAgent,
    authenticator::{Ceremony, client_data_json},
    delegation::{self, DelegateKey, DelegationFile, GrantRequest, Headless},
    tunnel::{Order, SessionKey, Tunnel, TunnelError},
};
use touchgate_e2e::{enrolled, get, request, wait_for_state};
use touchgate_gateway::store::Store;
use touchgate_proto::{ClientMsg, Grant, RefusalCode, ServerMsg, ServiceInfo, ServiceKind};
use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";

fn narrow(ttl: Duration) -> GrantRequest {
    GrantRequest {
        label: "ci-nightly".into(),
        services: vec!["api".into()],
        methods: vec!["GET".into()],
        path_prefixes: vec!["/v1/".into()],
        ttl,
    }
}

fn headless(lab: &Lab, file: &DelegationFile, name: &str) -> anyhow::Result<Headless> {
    Ok(delegation::load_headless(
        file,
        None,
        &[],
        Some(lab.dir.path().join(format!("{name}.sock"))),
    )?)
}

/// The claims of the identity assertion the upstream got (its signature is checked by the
/// tunnel tests; here what it says).
fn assertion_claims(echo: &serde_json::Value) -> serde_json::Value {
    use base64::Engine;
    let jwt = echo["headers"]["x-touchgate-assertion"]
        .as_str()
        .expect("assertion");
    let payload = jwt.split('.').nth(1).expect("payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64");
    serde_json::from_slice(&bytes).expect("json")
}

#[tokio::test]
async fn a_grant_serves_exactly_its_scope_and_names_both_the_person_and_the_delegate()
-> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let file = delegation::delegate(
        &cfg,
        &authn,
        &narrow(Duration::from_secs(600)),
        DelegateKey::generate()?,
    )
    .await?;
    assert_eq!(file.grant.grant.methods, vec!["GET"]);
    assert_eq!(file.services.len(), 1);
    let bot = RunningAgent::start_delegated(headless(&lab, &file, "bot")?).await?;
    // Only the granted service has a port.
    assert!(bot.local_addr("echo").is_none());
    let api = bot.local_addr("api").expect("api");

    let ok = get(api, "/v1/items?x=1", &[("x-touchgate-delegate", "forged")]).await?;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    let echo = ok.json()?;
    assert_eq!(echo["headers"]["x-touchgate-user"], ALICE);
    assert_eq!(echo["headers"]["x-touchgate-delegate"], "ci-nightly");
    let claims = assertion_claims(&echo);
    assert_eq!(claims["sub"], ALICE);
    assert_eq!(claims["act"]["sub"], "ci-nightly");

    // Outside the grant: refused by the gateway, never reaching the upstream.
    let before = lab.upstream.request_count();
    let post = request(api, "POST", "/v1/items", "localhost", &[]).await?;
    assert_eq!(post.status, 403);
    let said = String::from_utf8_lossy(&post.body);
    assert!(said.contains("method POST (it allows GET)"), "{said}");
    let paths = [
        "/admin",
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1%2fadmin",
        "/v2/items",
        // What some servers normalise after the check: `;parameters`, double encoding.
        "/v1/..;/admin",
        "/v1/%252e%252e/admin",
        "/v1/%252fadmin",
    ];
    for path in paths {
        let a = get(api, path, &[]).await?;
        assert_eq!(
            a.status,
            403,
            "{path}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    // A method override naming a method the grant does not allow.
    let a = get(api, "/v1/items", &[("x-http-method-override", "DELETE")]).await?;
    assert_eq!(a.status, 403);
    let said = String::from_utf8_lossy(&a.body);
    assert!(
        said.contains("x-http-method-override") && said.contains("DELETE"),
        "{said}"
    );
    assert_eq!(lab.upstream.request_count(), before);

    // Every request line names the person, the delegate and the key that approved it.
    lab.gateway.flush_audit();
    let lines = lab.audit_events("request");
    assert_eq!(lines.len(), 2 + paths.len() + 1, "{lines:#?}");
    let store = Store::open(&lab.dir.path().join("gateway.db"))?;
    let cred = store.credentials(ALICE)?[0].cred_id.clone();
    for l in &lines {
        assert_eq!(l["user"], ALICE);
        assert_eq!(l["delegate"], "ci-nightly");
        assert_eq!(l["credential"], cred.as_str());
    }
    let refusals = 1 + paths.len() + 1;
    assert_eq!(
        lines.iter().filter(|l| l["status"] == 403).count(),
        refusals
    );
    let refused = lab.audit_events("delegation_refused");
    assert_eq!(refused.len(), refusals, "{refused:#?}");
    let granted = lab.audit_events("delegation_granted");
    assert_eq!(granted.len(), 1);
    assert_eq!(granted[0]["credential"], cred.as_str());
    assert_eq!(granted[0]["delegate"], "ci-nightly");
    assert_eq!(granted[0]["method"], "GET");
    assert_eq!(granted[0]["path"], "/v1/");

    // The grant is listed with its last use.
    let listed = store.delegations(Some(ALICE))?;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].last_used_at.is_some());
    bot.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_service_outside_the_grant_is_refused_at_the_stream() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let mut file = delegation::delegate(
        &cfg,
        &authn,
        &narrow(Duration::from_secs(600)),
        DelegateKey::generate()?,
    )
    .await?;
    // A delegate that lists a service it was not granted still cannot open it.
    file.services.push(ServiceInfo {
        name: "echo".into(),
        kind: ServiceKind::Tcp,
    });
    let bot = RunningAgent::start_delegated(headless(&lab, &file, "bot")?).await?;
    let echo = bot.local_addr("echo").expect("echo port");
    let mut s = tokio::net::TcpStream::connect(echo).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = s.write_all(b"hello").await;
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await?
        .unwrap_or(0);
    assert_eq!(n, 0, "the refused stream carried bytes");
    let refused = lab.audit_events("stream_refused");
    assert!(
        refused
            .iter()
            .any(|l| l["outcome"] == "delegation_refused" && l["service"] == "echo"),
        "{refused:#?}"
    );
    bot.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn revoking_by_the_user_by_an_admin_or_disabling_the_user_ends_the_grant()
-> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let grant = |label: &str| GrantRequest {
        label: label.into(),
        ..narrow(Duration::from_secs(600))
    };
    let by_user =
        delegation::delegate(&cfg, &authn, &grant("by-user"), DelegateKey::generate()?).await?;
    let by_admin =
        delegation::delegate(&cfg, &authn, &grant("by-admin"), DelegateKey::generate()?).await?;
    let a = RunningAgent::start_delegated(headless(&lab, &by_user, "a")?).await?;
    let b = RunningAgent::start_delegated(headless(&lab, &by_admin, "b")?).await?;
    assert_eq!(
        get(a.local_addr("api").expect("api"), "/v1/a", &[])
            .await?
            .status,
        200
    );

    // The user, with a touch, by label.
    let id = delegation::revoke(&cfg, &authn, "by-user").await?;
    assert_eq!(id, by_user.grant.id);
    wait_for_state(&a, Duration::from_secs(10), |s| {
        matches!(s, AgentState::SignedOut { .. })
    })
    .await?;
    // B carries on.
    assert_eq!(
        get(b.local_addr("api").expect("api"), "/v1/b", &[])
            .await?
            .status,
        200
    );
    // The revoked grant cannot start again.
    let again = RunningAgent::start_delegated(headless(&lab, &by_user, "a2")?).await;
    match again {
        Err(e) => assert!(e.to_string().contains("revoked"), "{e}"),
        Ok(_) => panic!("a revoked grant started"),
    }

    // An admin, from another process on the database.
    let store = Store::open(&lab.dir.path().join("gateway.db"))?;
    store.revoke_delegation(None, &by_admin.grant.id)?;
    wait_for_state(&b, Duration::from_secs(10), |s| {
        matches!(s, AgentState::SignedOut { .. })
    })
    .await?;

    // Disabling the user ends a third grant too.
    let third =
        delegation::delegate(&cfg, &authn, &grant("third"), DelegateKey::generate()?).await?;
    let c = RunningAgent::start_delegated(headless(&lab, &third, "c")?).await?;
    store.set_disabled(ALICE, true)?;
    wait_for_state(&c, Duration::from_secs(10), |s| {
        matches!(s, AgentState::SignedOut { .. })
    })
    .await?;
    assert_eq!(lab.audit_events("delegation_revoked").len(), 1);
    for agent in [a, b, c] {
        agent.shutdown().await;
    }
    Ok(())
}

#[tokio::test]
async fn a_grant_ends_at_its_expiry_and_cannot_outlast_the_gateways_limit() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let too_long = delegation::delegate(
        &cfg,
        &authn,
        &narrow(Duration::from_secs(9 * 3600)),
        DelegateKey::generate()?,
    )
    .await;
    let e = too_long.expect_err("refused");
    assert!(e.to_string().contains("at most 8h"), "{e}");

    let file = delegation::delegate(
        &cfg,
        &authn,
        &narrow(Duration::from_secs(3)),
        DelegateKey::generate()?,
    )
    .await?;
    let bot = RunningAgent::start_delegated(headless(&lab, &file, "bot")?).await?;
    wait_for_state(&bot, Duration::from_secs(15), |s| {
        matches!(s, AgentState::SignedOut { .. })
    })
    .await?;
    let e = delegation::load_headless(&file, None, &[], None)
        .err()
        .expect("expired");
    assert!(e.to_string().contains("expired"), "{e}");
    bot.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_tampered_token_or_another_key_is_refused() -> anyhow::Result<()> {
    use base64::Engine;
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let file = delegation::delegate(
        &cfg,
        &authn,
        &narrow(Duration::from_secs(600)),
        DelegateKey::generate()?,
    )
    .await?;

    // Widen the token's scope: its signature no longer verifies.
    let mut tampered = file.clone();
    let parts: Vec<&str> = file.token.split('.').collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: serde_json::Value = serde_json::from_slice(&b64.decode(parts[1])?)?;
    claims["dlg"]["methods"] = serde_json::json!(["GET", "POST"]);
    tampered.token = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(serde_json::to_vec(&claims)?),
        parts[2]
    );
    match RunningAgent::start_delegated(headless(&lab, &tampered, "t")?).await {
        Err(e) => assert!(e.to_string().contains("not valid"), "{e}"),
        Ok(_) => panic!("a tampered token was taken"),
    }

    // The token with another key: the connection's certificate is not the grant's.
    let mut stolen = file.clone();
    stolen.key = DelegateKey::generate()?;
    match RunningAgent::start_delegated(headless(&lab, &stolen, "s")?).await {
        Err(e) => assert!(e.to_string().contains("another session key"), "{e}"),
        Ok(_) => panic!("a token was taken with another key"),
    }
    // A key file that is not the grant's is refused before connecting.
    let other = DelegateKey::generate()?;
    let e = delegation::load_headless(&file, Some(&other), &[], None)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("not the one"), "{e}");
    Ok(())
}

#[tokio::test]
async fn the_key_signs_the_scope_so_an_assertion_for_get_cannot_grant_post() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let key = DelegateKey::generate()?;
    let get_only = Grant {
        label: "bot".into(),
        services: vec!["api".into()],
        methods: vec!["GET".into()],
        path_prefixes: vec![],
        expires_at: touchgate_agent::unix_now() + 600,
        key: key.thumbprint()?,
    };
    let post_too = Grant {
        methods: vec!["GET".into(), "POST".into()],
        ..get_only.clone()
    };
    // Ask for the wider grant, but have the key sign the narrow one (what a user would have
    // seen approved): the gateway compares the signed binding with the grant it was asked.
    let dialer = touchgate_agent::tunnel::Dialer::new(&cfg, &SessionKey::generate()?)?;
    let t = Tunnel::dial(&dialer, &cfg, Order::random()).await?;
    let ServerMsg::LoginChallenge { options, origin } = t
        .request(&ClientMsg::DelegateBegin {
            user: ALICE.into(),
            grant: post_too,
        })
        .await?
    else {
        panic!("no challenge");
    };
    let rcr: webauthn_rs_proto::RequestChallengeResponse = serde_json::from_value(options)?;
    let cdj = client_data_json(
        Ceremony::Get,
        rcr.public_key.challenge.as_ref(),
        &origin,
        &get_only.binding(t.binding()),
    );
    let cred = authn
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .authenticate(&rcr.public_key, &cdj)?;
    match t
        .request(&ClientMsg::DelegateFinish {
            credential: serde_json::to_value(&cred)?,
        })
        .await
    {
        Err(TunnelError::Refused(r)) => assert_eq!(r.code, RefusalCode::BindingMismatch, "{r:?}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    t.close(b"done").await;
    assert!(
        Store::open(&lab.dir.path().join("gateway.db"))?
            .delegations(Some(ALICE))?
            .is_empty()
    );
    Ok(())
}

#[tokio::test]
async fn a_grant_for_a_key_held_elsewhere_needs_that_key() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let bots_key = DelegateKey::generate()?;
    let public = DelegateKey {
        cert_pem: bots_key.cert_pem.clone(),
        key_pem: None,
    };
    let file =
        delegation::delegate(&cfg, &authn, &narrow(Duration::from_secs(600)), public).await?;
    assert!(file.key.key_pem.is_none());
    let path = lab.dir.path().join("grant.json");
    file.write(&path)?;
    let back = DelegationFile::read(&path)?;
    assert!(matches!(
        delegation::load_headless(&back, None, &[], None),
        Err(delegation::DelegationError::NoPrivateKey)
    ));
    let h = delegation::load_headless(
        &back,
        Some(&bots_key),
        &[("api".into(), 0)],
        Some(lab.dir.path().join("bot.sock")),
    )?;
    let bot = RunningAgent::start_delegated(h).await?;
    let mut sender = touchgate_e2e::http1(bot.local_addr("api").expect("api")).await?;
    let resp = sender
        .send_request(
            hyper::Request::get("/v1/whoami")
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))?,
        )
        .await?;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await?.to_bytes();
    let echo: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(echo["headers"]["x-touchgate-delegate"], "ci-nightly");
    bot.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_users_running_agent_delegates_with_a_touch_and_lists_and_revokes_without_one()
-> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let file = agent
        .delegate(&narrow(Duration::from_secs(600)), DelegateKey::generate()?)
        .await?;
    let bot = RunningAgent::start_delegated(headless(&lab, &file, "bot")?).await?;
    let asked = lab.audit_events("challenge_issued").len();

    // Listing and revoking happen on the agent's live session: no new challenge, no touch.
    let grants = agent.delegations().await?;
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].id, file.grant.id);
    assert_eq!(grants[0].grant.label, "ci-nightly");
    assert_eq!(agent.revoke_delegation("ci-nightly").await?, file.grant.id);
    wait_for_state(&bot, Duration::from_secs(10), |s| {
        matches!(s, AgentState::SignedOut { .. })
    })
    .await?;
    assert_eq!(lab.audit_events("challenge_issued").len(), asked);
    let listed = agent.delegations().await?;
    assert!(listed[0].revoked_at.is_some());

    // The delegate's own session may do none of this.
    let bot2_file = agent
        .delegate(
            &GrantRequest {
                label: "second".into(),
                ..narrow(Duration::from_secs(600))
            },
            DelegateKey::generate()?,
        )
        .await?;
    let bot2 = RunningAgent::start_delegated(headless(&lab, &bot2_file, "bot2")?).await?;
    match bot2.delegations().await {
        Err(TunnelError::Refused(r)) => assert_eq!(r.code, RefusalCode::DelegationRefused),
        other => panic!("a delegate listed grants: {other:?}"),
    }
    match bot2.revoke_delegation("ci-nightly").await {
        Err(TunnelError::Refused(r)) => assert_eq!(r.code, RefusalCode::DelegationRefused),
        other => panic!("a delegate revoked a grant: {other:?}"),
    }
    for a in [agent, bot, bot2] {
        a.shutdown().await;
    }
    Ok(())
}

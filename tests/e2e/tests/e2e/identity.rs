//! Enrolment through the organisation's identity provider, against a real OpenID provider
//! (oidc-provider, started by the test): the loopback flow end to end with a group granting
//! the service, and each refusal with its audit line: a verified email is needed, a domain
//! must be allowed, a code is good only on the connection whose nonce it carries and only for
//! the gateway's client, the browser's `state` must match, and a second callback finds
//! nobody. Past `[oidc] max_age` a sign-in, and a delegation, wait for the provider again.

use std::sync::Arc;

use touchgate_agent::{RunningAgent, agent::OnSessionEnd, tunnel::Tunnel};
use touchgate_e2e::{get, request, soft_authn};
use touchgate_proto::{ClientMsg, ServerMsg};
use touchgate_testkit::{
    idp::{Idp, IdpConfig, IdpUser, OTHER_CLIENT_ID},
    lab::{Lab, LabOptions},
};

const ALICE_EMAIL: &str = "alice@example.com";

/// A lab whose gateway enrols through `idp` (accounts of example.com only) and whose `api`
/// service is for the `oncall` group and no one by name.
async fn lab_with(idp: &Idp) -> anyhow::Result<Lab> {
    Lab::start(LabOptions {
        api_users: Vec::new(),
        api_groups: vec!["oncall".into()],
        tables: oidc_table(idp, ""),
        ..LabOptions::default()
    })
    .await
}

/// The default IdP, a lab on it, and Alice's agent config and key path (not enrolled).
async fn alice_at_lab() -> anyhow::Result<(
    Arc<Idp>,
    Lab,
    IdpUser,
    std::path::PathBuf,
    touchgate_agent::AgentConfig,
)> {
    let idp = Arc::new(Idp::start_default().await?);
    let lab = lab_with(&idp).await?;
    let alice = IdpUser::alice();
    let key_path = lab.dir.path().join("alice.softkey");
    let cfg = lab.agent_config(&alice.email, &key_path, &[])?;
    Ok((idp, lab, alice, key_path, cfg))
}

/// Alice's agent config and software key on `lab`, enrolled by signing in at `idp` in the
/// browser.
async fn enrol_alice(
    idp: &Arc<Idp>,
    lab: &Lab,
) -> anyhow::Result<(
    IdpUser,
    touchgate_agent::AgentConfig,
    touchgate_agent::SharedAuthn,
)> {
    let alice = IdpUser::alice();
    let key_path = lab.dir.path().join("alice.softkey");
    let cfg = lab.agent_config(&alice.email, &key_path, &[])?;
    let authn = soft_authn(&key_path)?;
    let (open, _) = browser(idp.clone(), alice.clone(), as_is);
    touchgate_agent::enroll_with_idp(&cfg, &authn, &open).await?;
    Ok((alice, cfg, authn))
}

/// The gateway's `[oidc]` for `idp`: accounts of example.com, groups asked for, and `extra`.
fn oidc_table(idp: &Idp, extra: &str) -> String {
    format!(
        "[oidc]\nissuer = \"{}\"\nclient_id = \"touchgate\"\nallowed_domains = [\"example.com\"]\n\
         display_name = \"Example Corp\"\nscopes = [\"openid\", \"email\", \"profile\", \"groups\"]\n{extra}",
        idp.issuer
    )
}

/// What the test's browser does with the IdP's final redirect to the agent's loopback
/// listener: the URLs to open, in order.
type Deliver = fn(String) -> Vec<String>;

/// The statuses the agent's loopback listener answered the test's browser.
type Statuses = tokio::sync::oneshot::Receiver<anyhow::Result<Vec<u16>>>;

/// A browser for `enroll_with_idp`: signs in at the IdP as `who`, then opens what `deliver`
/// makes of the redirect. The statuses the loopback listener answered (0: no one listened)
/// come back through the handle.
fn browser(
    idp: Arc<Idp>,
    who: IdpUser,
    deliver: Deliver,
) -> (impl Fn(&str) -> Result<(), String> + Send + Sync, Statuses) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let open = move |url: &str| {
        let (idp, who, url) = (idp.clone(), who.clone(), url.to_owned());
        let tx = tx.lock().ok().and_then(|mut t| t.take());
        tokio::spawn(async move {
            let done = async {
                let back = idp.authorize(&url, &who.email, &who.password).await?;
                let mut statuses = Vec::new();
                for u in deliver(back) {
                    statuses.push(open_loopback(&u).await);
                }
                Ok(statuses)
            }
            .await;
            if let Some(tx) = tx {
                let _ = tx.send(done);
            }
        });
        Ok(())
    };
    (open, rx)
}

/// Opens `url` on the agent's loopback listener; 0 when nothing listens there.
async fn open_loopback(url: &str) -> u16 {
    let Ok(u) = url::Url::parse(url) else {
        return 0;
    };
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], u.port().unwrap_or(80)));
    let path = format!("{}?{}", u.path(), u.query().unwrap_or_default());
    match request(
        addr,
        "GET",
        &path,
        &format!("127.0.0.1:{}", addr.port()),
        &[],
    )
    .await
    {
        Ok(a) => a.status,
        Err(_) => 0,
    }
}

/// Signs in at the IdP as `who` from `url` and returns the code it sends back.
async fn code_as(idp: &Idp, url: &str, who: &IdpUser) -> anyhow::Result<String> {
    let back = url::Url::parse(&idp.authorize(url, &who.email, &who.password).await?)?;
    back.query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| anyhow::anyhow!("no code in {back}"))
}

fn as_is(url: String) -> Vec<String> {
    vec![url]
}

#[tokio::test]
async fn a_developer_enrols_with_the_company_account_and_a_group_grants_the_service()
-> anyhow::Result<()> {
    let (idp, lab, alice, key_path, cfg) = alice_at_lab().await?;
    let authn = soft_authn(&key_path)?;
    // What the enrol window asks first: the gateway names its provider.
    assert_eq!(
        touchgate_agent::identity_provider(&cfg).await?.as_deref(),
        Some("Example Corp")
    );
    let (open, seen) = browser(idp.clone(), alice.clone(), as_is);

    let (_cred, user) = touchgate_agent::enroll_with_idp(&cfg, &authn, &open).await?;
    assert_eq!(user, alice.email);
    assert_eq!(seen.await??, [200], "the browser ends on the agent's page");
    let verified = lab.audit_events("idp_verified");
    assert_eq!(verified.len(), 1, "{:?}", lab.audit());
    assert_eq!(verified[0]["user"], alice.email);
    assert_eq!(verified[0]["outcome"], "groups: eng@example.com, oncall");
    assert_eq!(lab.audit_events("idp_enrolled").len(), 1);
    assert!(lab.audit_events("invite_used").is_empty());

    // The key signs in as usual; `api` is Alice's through her `oncall` group.
    let agent = RunningAgent::start(cfg.clone(), authn).await?;
    let api = agent.local_addr("api").expect("api");
    let answer = get(api, "/hello", &[]).await?;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()?["headers"]["x-touchgate-user"], alice.email);
    let opened = lab.audit_events("stream_opened");
    assert_eq!(opened[0]["granted_by"], "group:oncall", "{opened:?}");
    agent.shutdown().await;

    // The provider's word enrols a first key only: another key (someone who phished a sign-in)
    // is refused for an account that has one.
    let other_key = lab.dir.path().join("other.softkey");
    let (open, _) = browser(idp.clone(), alice.clone(), as_is);
    let e = touchgate_agent::enroll_with_idp(&cfg, &soft_authn(&other_key)?, &open)
        .await
        .expect_err("refused")
        .to_string();
    assert!(e.contains("already has a security key"), "{e}");
    assert_eq!(lab.audit_events("idp_enrolled").len(), 1);

    // An admin removes Alice: the provider's word alone does not bring her back; a new
    // invite does (and then she may enrol either way).
    let store = touchgate_gateway::store::Store::open(&lab.dir.path().join("gateway.db"))?;
    store.remove_user(ALICE_EMAIL)?;
    let (open, _) = browser(idp.clone(), alice.clone(), as_is);
    let e = touchgate_agent::enroll_with_idp(&cfg, &soft_authn(&other_key)?, &open)
        .await
        .expect_err("removed")
        .to_string();
    assert!(e.contains("an admin removed this account"), "{e}");
    lab.invite(ALICE_EMAIL)?;
    let (open, _) = browser(idp.clone(), alice.clone(), as_is);
    touchgate_agent::enroll_with_idp(&cfg, &soft_authn(&other_key)?, &open).await?;
    assert_eq!(lab.audit_events("idp_enrolled").len(), 2);
    Ok(())
}

#[tokio::test]
async fn the_gateway_takes_only_verified_accounts_of_allowed_domains() -> anyhow::Result<()> {
    let idp = Arc::new(Idp::start_default().await?);
    let lab = lab_with(&idp).await?;
    for (who, why) in [
        (
            IdpUser::bob(),
            "has not verified the email address bob@example.com",
        ),
        (
            IdpUser::carol(),
            "accounts of \"other.example\" may not use this gateway",
        ),
    ] {
        let key_path = lab.dir.path().join(format!("{}.softkey", who.sub));
        let cfg = lab.agent_config(&who.email, &key_path, &[])?;
        let (open, seen) = browser(idp.clone(), who.clone(), as_is);
        let e = touchgate_agent::enroll_with_idp(&cfg, &soft_authn(&key_path)?, &open)
            .await
            .expect_err("refused")
            .to_string();
        assert!(e.contains(why), "{}: {e}", who.email);
        assert_eq!(seen.await??, [200]);
    }
    let refused = lab.audit_events("idp_refused");
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(lab.audit_events("idp_enrolled").is_empty());
    let store = touchgate_gateway::store::Store::open(&lab.dir.path().join("gateway.db"))?;
    assert!(store.credentials("bob@example.com")?.is_empty());
    Ok(())
}

#[tokio::test]
async fn the_browser_must_come_back_with_its_own_state_and_only_once() -> anyhow::Result<()> {
    let (idp, lab, alice, key_path, cfg) = alice_at_lab().await?;

    // A page (or another local user) sends the browser to the listener with a state of its
    // own: refused, and the sign-in waits on. Then the real return, then the same again.
    let (open, seen) = browser(idp.clone(), alice.clone(), |url| {
        vec![url.replace("state=", "state=forged"), url.clone(), url]
    });
    let (_, user) = touchgate_agent::enroll_with_idp(&cfg, &soft_authn(&key_path)?, &open).await?;
    assert_eq!(user, alice.email);
    let statuses = seen.await??;
    assert_eq!(statuses[..2], [400, 200]);
    assert_ne!(statuses[2], 200, "a second callback must not be taken");
    // One code reached the gateway: the forged one never left the agent.
    assert_eq!(lab.audit_events("idp_verified").len(), 1);
    assert_eq!(lab.audit_events("idp_enrolled").len(), 1);
    Ok(())
}

/// A code obtained with another connection's nonce, or for another client, is refused by
/// the gateway: what an attacker who phished a code, or a page that ran its own flow, has.
#[tokio::test]
async fn a_code_is_good_only_on_its_own_connection_and_for_the_gateways_client()
-> anyhow::Result<()> {
    let (idp, lab, alice, _, cfg) = alice_at_lab().await?;
    let key = touchgate_agent::tunnel::SessionKey::generate()?;
    let endpoint = touchgate_agent::tunnel::client_endpoint(&cfg, &key)?;
    let first = Tunnel::connect(&endpoint, &cfg).await?;
    let second = Tunnel::connect(&endpoint, &cfg).await?;
    let start = |reply: ServerMsg| match reply {
        ServerMsg::IdpStart {
            authorization_endpoint,
            client_id,
            scopes,
            nonce,
            name,
        } => Ok((authorization_endpoint, client_id, scopes, nonce, name)),
        other => Err(anyhow::anyhow!("expected IdpStart, got {other:?}")),
    };
    let (endpoint_url, client_id, scopes, nonce, name) =
        start(first.request(&ClientMsg::IdpBegin).await?)?;
    assert_eq!(name, "Example Corp");
    start(second.request(&ClientMsg::IdpBegin).await?)?;

    for (client, what) in [
        (
            client_id.as_str(),
            "its nonce is not the one issued for this connection",
        ),
        (OTHER_CLIENT_ID, "the identity provider refused the sign-in"),
    ] {
        // A flow run with the first connection's nonce (and, second, another client).
        let pkce = touchgate_agent::idp::Pkce::new();
        let redirect = "http://127.0.0.1:9/callback";
        let url = touchgate_agent::idp::authorization_url(
            &endpoint_url,
            client,
            &scopes,
            redirect,
            &pkce,
            &nonce,
        )?;
        let code = code_as(&idp, &url, &alice).await?;
        // … presented on the second connection.
        let reply = second
            .request(&ClientMsg::EnrollWithIdp {
                code,
                code_verifier: pkce.verifier.clone(),
                redirect_uri: redirect.into(),
                software_ca_pem: None,
            })
            .await;
        let e = reply.expect_err("refused").to_string();
        assert!(e.contains(what), "{client}: {e}");
        // Each connection's nonce is single-use: ask for a fresh one for the next round.
        start(second.request(&ClientMsg::IdpBegin).await?)?;
    }
    assert_eq!(
        lab.audit_events("idp_refused").len(),
        2,
        "{:?}",
        lab.audit()
    );
    assert!(lab.audit_events("idp_verified").is_empty());
    Ok(())
}

/// Past `[oidc] max_age` a sign-in needs the identity provider again: the key's answer
/// verifies, the browser step follows on the same connection, and the session comes without a
/// second touch; a check as another account is refused.
#[tokio::test]
async fn a_sign_in_after_max_age_checks_with_the_identity_provider_again() -> anyhow::Result<()> {
    let dave = IdpUser {
        sub: "dave".into(),
        email: "dave@example.com".into(),
        name: "Dave Example".into(),
        password: "dave-password".into(),
        ..IdpUser::alice()
    };
    let idp = Arc::new(
        Idp::start(&IdpConfig {
            users: vec![IdpUser::alice(), dave.clone()],
            ..IdpConfig::default()
        })
        .await?,
    );
    let lab = Lab::start(LabOptions {
        tables: oidc_table(&idp, "max_age = \"2s\"\n"),
        ..LabOptions::default()
    })
    .await?;
    let (alice, cfg, authn) = enrol_alice(&idp, &lab).await?;
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;

    // Someone else's account in the browser: the key's answer is not enough.
    let (open, _) = browser(idp.clone(), dave, as_is);
    let refused = RunningAgent::start_with_browser(
        cfg.clone(),
        authn.clone(),
        OnSessionEnd::Stop,
        Arc::new(open),
    )
    .await;
    let e = refused.err().expect("refused").to_string();
    assert!(
        e.contains("as dave@example.com, not as alice@example.com"),
        "{e}"
    );

    let (open, seen) = browser(idp.clone(), alice.clone(), as_is);
    let agent =
        RunningAgent::start_with_browser(cfg, authn, OnSessionEnd::Stop, Arc::new(open)).await?;
    assert_eq!(seen.await??, [200]);
    let api = agent.local_addr("api").expect("api");
    assert_eq!(get(api, "/after-recheck", &[]).await?.status, 200);
    // The session ends when the check runs out, not at `[session] max_age` (an hour here).
    let session = agent.session().expect("session");
    assert!(
        session.expires_at <= touchgate_agent::unix_now() + 2,
        "{}",
        session.expires_at
    );
    let needed: Vec<_> = lab
        .audit_events("idp_refused")
        .into_iter()
        .filter(|e| e["outcome"] == "idp_check_needed")
        .collect();
    assert_eq!(needed.len(), 2, "{:?}", lab.audit());
    // The provider vouched three times: the enrolment, Dave (then refused as not Alice), and
    // the recheck that passed.
    let vouched: Vec<_> = lab
        .audit_events("idp_verified")
        .iter()
        .map(|e| e["user"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(vouched, [ALICE_EMAIL, "dave@example.com", ALICE_EMAIL]);
    assert_eq!(lab.audit_events("session_issued").len(), 1);
    agent.shutdown().await;
    Ok(())
}

/// Delegating needs the identity provider's word within `[oidc] max_age`, as a sign-in does:
/// within it a grant is made (and may not outlast it); past it the key's touch is not enough
/// and the refusal says what to do; once a sign-in has checked with the provider again
/// (`touchgate up`), delegating works again. The provider's check ages by time passing, as in
/// use: `max_age` is a few seconds here.
#[tokio::test]
async fn delegating_past_max_age_waits_for_the_identity_provider_again() -> anyhow::Result<()> {
    use std::time::Duration;
    use touchgate_agent::{
        delegation::{self, DelegateKey, DelegationError, DelegationFile, GrantRequest},
        tunnel::TunnelError,
    };
    use touchgate_proto::{Refusal, RefusalCode};
    const MAX_AGE: u64 = 8;
    let idp = Arc::new(Idp::start_default().await?);
    let lab = Lab::start(LabOptions {
        tables: oidc_table(&idp, &format!("max_age = \"{MAX_AGE}s\"\n")),
        ..LabOptions::default()
    })
    .await?;
    let (alice, cfg, authn) = enrol_alice(&idp, &lab).await?;
    let store = touchgate_gateway::store::Store::open(&lab.dir.path().join("gateway.db"))?;
    // When the provider last vouched for Alice (read, never written, by the test).
    let checked = || -> anyhow::Result<u64> {
        Ok(store
            .idp_state_of(ALICE_EMAIL)?
            .ok_or_else(|| anyhow::anyhow!("Alice is not the provider's"))?
            .1)
    };
    let enrolled_at = checked()?;
    let grant = |label: &str, ttl: u64| GrantRequest {
        label: label.into(),
        services: vec!["api".into()],
        methods: vec!["GET".into()],
        path_prefixes: vec!["/v1/".into()],
        ttl: Duration::from_secs(ttl),
    };
    let refusal = |r: Result<DelegationFile, DelegationError>| -> Refusal {
        match r {
            Err(DelegationError::Tunnel(TunnelError::Refused(r))) => r,
            Err(e) => panic!("expected the gateway's refusal, got {e}"),
            Ok(f) => panic!("expected a refusal, got grant {}", f.grant.id),
        }
    };

    // Within max_age: a grant that ends within the check is made …
    let fresh =
        delegation::delegate(&cfg, &authn, &grant("fresh", 3), DelegateKey::generate()?).await?;
    assert!(
        fresh.grant.grant.expires_at <= enrolled_at + MAX_AGE,
        "{} > {}",
        fresh.grant.grant.expires_at,
        enrolled_at + MAX_AGE
    );
    // … one that would outlast it is refused, saying how long the check still holds.
    let r = refusal(
        delegation::delegate(
            &cfg,
            &authn,
            &grant("too-long", 3600),
            DelegateKey::generate()?,
        )
        .await,
    );
    assert_eq!(r.code, RefusalCode::DelegationRefused, "{r:?}");
    assert!(
        r.message
            .contains("your organisation's sign-in is good for")
            && r.message
                .ends_with("more: ask for a grant that ends by then"),
        "{}",
        r.message
    );

    // Past max_age, the same key's touch is not enough, and the refusal says what to do.
    let stale_at = std::time::UNIX_EPOCH + Duration::from_secs(enrolled_at + MAX_AGE + 1);
    if let Ok(wait) = stale_at.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    let r = refusal(
        delegation::delegate(&cfg, &authn, &grant("stale", 3), DelegateKey::generate()?).await,
    );
    assert_eq!(r.code, RefusalCode::DelegationRefused, "{r:?}");
    assert_eq!(
        r.message,
        format!(
            "sign in with Example Corp again: the last check is more than {MAX_AGE}s old — \
             sign in with your organisation again (touchgate up), then delegate"
        )
    );
    let labels = |store: &touchgate_gateway::store::Store| -> anyhow::Result<Vec<String>> {
        let mut l: Vec<String> = store
            .delegations(Some(ALICE_EMAIL))?
            .into_iter()
            .map(|d| d.grant.label)
            .collect();
        l.sort();
        Ok(l)
    };
    assert_eq!(labels(&store)?, ["fresh"], "a refused grant was recorded");
    let refused = lab.audit_events("delegation_refused");
    assert_eq!(refused.len(), 2, "{refused:#?}");
    assert!(refused.iter().all(|e| e["outcome"] == "delegation_refused"));
    // Refused after the key answered: the line names the user the key verified.
    assert!(
        refused.iter().all(|e| e["user"] == ALICE_EMAIL),
        "{refused:#?}"
    );
    assert!(
        refused[1]["reason"]
            .as_str()
            .is_some_and(|w| w.contains(&format!("the last check is more than {MAX_AGE}s old"))),
        "{refused:#?}"
    );
    // The key itself verified each time: it is the provider's word that was missing.
    assert!(lab.audit_events("challenge_refused").is_empty());

    // `touchgate up`: the sign-in checks with the provider again in the browser; the running
    // agent then delegates with a touch.
    let (open, seen) = browser(idp.clone(), alice.clone(), as_is);
    let agent = RunningAgent::start_with_browser(
        cfg.clone(),
        authn.clone(),
        OnSessionEnd::Stop,
        Arc::new(open),
    )
    .await?;
    assert_eq!(seen.await??, [200]);
    let rechecked = checked()?;
    assert!(rechecked > enrolled_at + MAX_AGE, "{rechecked}");
    let again = agent
        .delegate(&grant("after-recheck", 3), DelegateKey::generate()?)
        .await?;
    assert!(again.grant.grant.expires_at <= rechecked + MAX_AGE);
    assert_eq!(labels(&store)?, ["after-recheck", "fresh"]);
    let granted = lab.audit_events("delegation_granted");
    assert_eq!(granted.len(), 2, "{granted:#?}");
    assert!(granted.iter().all(|e| e["user"] == ALICE_EMAIL));
    agent.shutdown().await;
    Ok(())
}

/// The gateway's checks of an ID token from the token endpoint, on real tokens of the real
/// provider: one that verifies, then the same with its payload changed, with another
/// connection's nonce, signed with a key the provider does not publish (after refreshing its
/// keys), and once it has expired.
#[tokio::test]
async fn id_tokens_that_fail_a_check_are_refused() -> anyhow::Result<()> {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    use touchgate_gateway::{config::OidcConfig, oidc::Oidc};
    let idp = Idp::start(&IdpConfig {
        id_token_ttl: std::time::Duration::from_secs(1),
        ..IdpConfig::default()
    })
    .await?;
    let oidc = Oidc::new(
        OidcConfig {
            clock_skew: std::time::Duration::ZERO,
            ..OidcConfig::new(&idp.issuer, "touchgate")
        },
        None,
    )?;
    let provider = oidc.provider().await?;
    let pkce = touchgate_agent::idp::Pkce::new();
    let redirect = "http://127.0.0.1:9/callback";
    let url = touchgate_agent::idp::authorization_url(
        &provider.authorization_endpoint,
        "touchgate",
        &oidc.config().scopes,
        redirect,
        &pkce,
        "nonce-1",
    )?;
    let code = code_as(&idp, &url, &IdpUser::alice()).await?;
    let token = oidc.redeem(&code, &pkce.verifier, redirect).await?;
    assert_eq!(oidc.verify(&token, "nonce-1").await?.user, ALICE_EMAIL);
    let refused = |r: Result<_, touchgate_gateway::oidc::OidcError>| match r {
        Ok(id) => format!("accepted {id:?}"),
        Err(e) => e.to_string(),
    };

    // Another account's name in the payload, the provider's signature kept.
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1])?)?;
    claims["email"] = "mallory@example.com".into();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?),
        parts[2]
    );
    let e = refused(oidc.verify(&forged, "nonce-1").await);
    assert!(e.contains("signature does not verify"), "{e}");

    let e = refused(oidc.verify(&token, "nonce-2").await);
    assert!(e.contains("nonce is not the one issued"), "{e}");

    // The same claims signed by a key the provider never published.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("rotated-away".into());
    let key =
        jsonwebtoken::EncodingKey::from_rsa_pem(touchgate_testkit::FAKE_GOOGLE_KEY.as_bytes())?;
    let original: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1])?)?;
    let unknown = jsonwebtoken::encode(&header, &original, &key)?;
    let e = refused(oidc.verify(&unknown, "nonce-1").await);
    assert!(
        e.contains("which the identity provider does not publish"),
        "{e}"
    );

    // One second later (the provider's token lifetime here, no clock skew allowed).
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let e = refused(oidc.verify(&token, "nonce-1").await);
    assert!(e.contains("has expired"), "{e}");
    Ok(())
}

/// A machine without a browser: the agent prints a code, the user enters it at the provider on
/// another device, and the key is enrolled for the account that signed in there.
#[tokio::test]
async fn a_machine_without_a_browser_enrols_with_the_device_flow() -> anyhow::Result<()> {
    let (idp, mut lab, alice, key_path, cfg) = alice_at_lab().await?;
    // Off unless the admin turns it on: anyone can start one and phish a user with the code.
    let e = touchgate_agent::enroll_with_device(&cfg, &soft_authn(&key_path)?, &|_| {})
        .await
        .expect_err("off by default")
        .to_string();
    assert!(e.contains("[oidc] device_flow"), "{e}");
    lab.reconfigure("[oidc]\n", "[oidc]\ndevice_flow = true\n")
        .await?;
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    let tx = std::sync::Mutex::new(Some(tx));
    let show = move |d: &touchgate_agent::tunnel::DeviceCode| {
        if let Some(tx) = tx.lock().ok().and_then(|mut t| t.take()) {
            let _ = tx.send(d.user_code.clone());
        }
    };
    let (user, provider) = (alice.clone(), idp.clone());
    let other_device = tokio::spawn(async move {
        let code = rx.await?;
        provider
            .approve_device(&code, &user.email, &user.password)
            .await
    });
    let authn = soft_authn(&key_path)?;
    let (_, enrolled) = touchgate_agent::enroll_with_device(&cfg, &authn, &show).await?;
    other_device.await??;
    assert_eq!(enrolled, alice.email);
    assert_eq!(
        lab.audit_events("idp_enrolled").len(),
        1,
        "{:?}",
        lab.audit()
    );
    // The key signs in, and the group from the device sign-in grants `api`.
    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").expect("api");
    assert_eq!(get(api, "/by-device", &[]).await?.status, 200);
    agent.shutdown().await;
    Ok(())
}

/// What `touchgate-gateway check` says about the provider, from its real discovery document
/// and keys; and a provider that is not there, said in words.
#[tokio::test]
async fn check_reports_what_the_provider_offers() -> anyhow::Result<()> {
    use touchgate_gateway::{config::OidcConfig, oidc::Oidc};
    let idp = Idp::start_default().await?;
    let found = Oidc::new(OidcConfig::new(&idp.issuer, "touchgate"), None)?
        .describe()
        .await?;
    let host = idp.issuer.trim_start_matches("http://").to_owned();
    assert_eq!(
        found,
        format!(
            // No display_name: the issuer's host names it.
            "oidc: 127.0.0.1 ({0}): sign-in at {0}/auth, codes redeemed at {0}/token, 1 signing key, device sign-in offered",
            idp.issuer
        )
    );
    drop(idp);
    let gone = Oidc::new(
        OidcConfig::new(&format!("http://{host}"), "touchgate"),
        None,
    )?
    .describe()
    .await
    .expect_err("no provider")
    .to_string();
    assert!(
        gone.starts_with("the identity provider could not be used: "),
        "{gone}"
    );
    // A gateway without `[oidc]` says so: the enrol window offers the invite alone.
    let lab = Lab::start(LabOptions::default()).await?;
    let cfg = lab.agent_config(ALICE_EMAIL, &lab.dir.path().join("k"), &[])?;
    assert_eq!(touchgate_agent::identity_provider(&cfg).await?, None);
    Ok(())
}

/// SCIM and the identity provider name the same person: Okta provisions
/// `Alice@Example.com`, Alice enrols with her company account (which names her in lower case)
/// — one user. With SCIM on, SCIM's groups decide `allow_groups`: the copy the last ID token
/// left does not keep a group SCIM took away; and SCIM's deactivation ends her session.
#[tokio::test]
async fn scim_and_the_identity_provider_name_the_same_person() -> anyhow::Result<()> {
    use super::scim::{TOKEN, scim};
    use serde_json::json;
    let idp = Arc::new(Idp::start_default().await?);
    let lab = Lab::start(LabOptions {
        api_users: Vec::new(),
        api_groups: vec!["oncall".into()],
        tables: oidc_table(&idp, ""),
        scim_token: Some(TOKEN.into()),
        ..LabOptions::default()
    })
    .await?;
    let (status, created) = scim(
        &lab,
        "POST",
        "/scim/v2/Users",
        Some(
            json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": "Alice@Example.com", "active": true}),
        ),
    )
    .await?;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["userName"], ALICE_EMAIL);
    let id = created["id"].as_str().unwrap_or_default().to_owned();
    let (status, group) = scim(
        &lab,
        "POST",
        "/scim/v2/Groups",
        Some(
            json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
            "displayName": "oncall", "members": [{"value": id}]}),
        ),
    )
    .await?;
    assert_eq!(status, 201, "{group}");
    let group_id = group["id"].as_str().unwrap_or_default().to_owned();

    let (_alice, cfg, authn) = enrol_alice(&idp, &lab).await?;
    let store = touchgate_gateway::store::Store::open(&lab.dir.path().join("gateway.db"))?;
    let alices = store
        .list_users()?
        .into_iter()
        .filter(|u| u.name.eq_ignore_ascii_case(ALICE_EMAIL))
        .count();
    assert_eq!(alices, 1, "one row for Alice");

    let agent = RunningAgent::start(cfg, authn).await?;
    let api = agent.local_addr("api").expect("api");
    assert_eq!(get(api, "/by-scim-group", &[]).await?.status, 200);

    // Okta takes her out of `oncall`: her ID token still said `oncall`, but SCIM decides.
    let (status, _) = scim(
        &lab,
        "PATCH",
        &format!("/scim/v2/Groups/{group_id}"),
        Some(
            json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "remove", "path": format!("members[value eq \"{id}\"]")}]}),
        ),
    )
    .await?;
    assert_eq!(status, 204);
    let refused = wait_until(|| async {
        touchgate_e2e::get(api, "/after-removal", &[])
            .await
            .map(|a| a.status != 200)
            .unwrap_or(true)
    })
    .await;
    assert!(refused, "api still granted after SCIM removed the group");

    // Deactivated in SCIM: the session ends.
    let (status, _) = scim(
        &lab,
        "PATCH",
        &format!("/scim/v2/Users/{id}"),
        Some(
            json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "replace", "value": {"active": false}}]}),
        ),
    )
    .await?;
    assert_eq!(status, 200);
    let ended = wait_until(|| async {
        agent
            .connection()
            .is_none_or(|c| c.close_reason().is_some())
    })
    .await;
    assert!(ended, "the session outlived the deactivation");
    agent.shutdown().await;
    Ok(())
}

/// Polls `done` every 100 ms for up to five seconds.
async fn wait_until<F, Fut>(mut done: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..50 {
        if done().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

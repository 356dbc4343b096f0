//! SCIM provisioning as Okta and Entra ID do it, against the gateway's `[scim]` endpoint: a
//! user created, deactivated (their live session ends within seconds and sign-in is refused),
//! reactivated (the key signs in again) and deleted; group pushes that grant `allow_groups`
//! services and take them away at the next stream; and every refusal with its SCIM error.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use touchgate_agent::tunnel::{SessionKey, Tunnel, TunnelError, client_endpoint};
use touchgate_e2e::enrolled;
use touchgate_proto::RefusalCode;
use touchgate_testkit::lab::{Lab, LabOptions};

const ALICE: &str = "alice@example.com";
pub(super) const TOKEN: &str = "e2e-scim-bearer-token-0123456789abcdef0123456789";
/// How long a change may take to reach a live session or the next stream.
const WITHIN: Duration = Duration::from_secs(5);

/// A lab with SCIM, whose `api` service is for the `oncall` group and no one by name.
async fn lab() -> anyhow::Result<Lab> {
    Lab::start(LabOptions {
        api_users: Vec::new(),
        api_groups: vec!["oncall".into()],
        scim_token: Some(TOKEN.into()),
        ..LabOptions::default()
    })
    .await
}

/// One SCIM request with `token` and a raw `body`: the status and the JSON answer (`null`
/// for none).
async fn send(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<(u16, Value)> {
    let mut sender = touchgate_e2e::http1::<Full<Bytes>>(addr).await?;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/scim+json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(body.unwrap_or_default())))?)
        .await?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)?
    };
    Ok((status, v))
}

/// A request with the right token and a JSON body.
pub(super) async fn scim(
    lab: &Lab,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let addr = lab.scim_addr.expect("the lab serves SCIM");
    send(addr, Some(TOKEN), method, path, body.map(|b| b.to_string())).await
}

/// `/scim/v2/{resource}?filter=ATTR eq "VALUE"`, encoded.
fn filtered(resource: &str, attr: &str, value: &str, extra: &str) -> String {
    let f: String =
        url::form_urlencoded::byte_serialize(format!("{attr} eq \"{value}\"").as_bytes()).collect();
    format!("/scim/v2/{resource}?filter={f}{extra}")
}

async fn tunnel(cfg: &touchgate_agent::AgentConfig) -> anyhow::Result<(quinn::Endpoint, Tunnel)> {
    let key = SessionKey::generate()?;
    let endpoint = client_endpoint(cfg, &key)?;
    let t = Tunnel::connect(&endpoint, cfg).await?;
    Ok((endpoint, t))
}

/// Opens streams to `service` until one is accepted (`accepted`) or refused as forbidden;
/// how long that took.
async fn until_stream(t: &Tunnel, service: &str, accepted: bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let done = match t.open_stream(service).await {
            Ok(_) => accepted,
            Err(TunnelError::Refused(r)) if r.code == RefusalCode::Forbidden => !accepted,
            Err(e) => anyhow::bail!("unexpected answer to a stream for {service}: {e}"),
        };
        if done {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < WITHIN,
            "{service} was still {} after {WITHIN:?}",
            if accepted { "refused" } else { "accepted" }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the gateway to close `t`'s connection; how long it took and why.
async fn closed(t: &Tunnel) -> anyhow::Result<(Duration, String)> {
    let start = Instant::now();
    let reason = tokio::time::timeout(WITHIN, t.connection().closed()).await?;
    Ok((start.elapsed(), reason.to_string()))
}

fn refusal(r: Result<impl std::fmt::Debug, TunnelError>) -> touchgate_proto::Refusal {
    match r {
        Err(TunnelError::Refused(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn audited(lab: &Lab, event: &str, user: &str) -> Vec<Value> {
    lab.audit_events(event)
        .into_iter()
        .filter(|e| e["user"] == user)
        .collect()
}

#[tokio::test]
async fn okta_creates_deactivates_reactivates_and_deletes_a_user_and_the_live_session_ends_within_seconds()
-> anyhow::Result<()> {
    let lab = lab().await?;
    // Okta looks the user up before it creates them.
    let (status, v) = scim(&lab, "GET", &filtered("Users", "userName", ALICE, ""), None).await?;
    assert_eq!((status, &v["totalResults"]), (200, &json!(0)), "{v}");
    let okta_user = |active: bool| {
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": ALICE,
            "name": {"givenName": "Alice", "familyName": "Liddell"},
            "emails": [{"primary": true, "value": ALICE, "type": "work"}],
            "displayName": "Alice Liddell",
            "locale": "en-US",
            "externalId": "00u1abcd",
            "groups": [],
            "password": "Okta sends one; touchgate keeps none",
            "active": active
        })
    };
    let (status, created) = scim(&lab, "POST", "/scim/v2/Users", Some(okta_user(true))).await?;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["userName"], ALICE);
    assert_eq!(created["active"], true);
    assert_eq!(created["emails"][0]["value"], ALICE);
    assert_eq!(created["meta"]["resourceType"], "User");
    let user_url = format!("/scim/v2/Users/{id}");
    assert!(
        created["meta"]["location"]
            .as_str()
            .is_some_and(|l| l.ends_with(&user_url)),
        "{created}"
    );
    assert_eq!(audited(&lab, "scim_user_created", ALICE).len(), 1);

    // They enrol a key (through the IdP in production; an invite here) and sign in.
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let (_ep, live) = tunnel(&cfg).await?;
    live.login(&authn, ALICE, None).await?;
    live.open_stream("echo").await?;

    // Okta deactivates with a PUT of the whole user.
    let (status, v) = scim(&lab, "PUT", &user_url, Some(okta_user(false))).await?;
    assert_eq!((status, &v["active"]), (200, &json!(false)), "{v}");
    let (took, reason) = closed(&live).await?;
    eprintln!("deactivation (Okta PUT) ended the live session after {took:?}");
    assert!(reason.contains("account disabled"), "{reason}");
    assert_eq!(audited(&lab, "scim_user_disabled", ALICE).len(), 1);
    assert_eq!(audited(&lab, "session_disabled", ALICE).len(), 1);
    let (_ep, again) = tunnel(&cfg).await?;
    let r = refusal(again.login(&authn, ALICE, None).await);
    assert_eq!(r.code, RefusalCode::AccountDisabled);

    // Okta reactivates with a PATCH without a path; the key signs in again.
    let on = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "replace", "value": {"active": true}}]
    });
    let (status, v) = scim(&lab, "PATCH", &user_url, Some(on)).await?;
    assert_eq!((status, &v["active"]), (200, &json!(true)), "{v}");
    assert_eq!(audited(&lab, "scim_user_enabled", ALICE).len(), 1);
    let (_ep, back) = tunnel(&cfg).await?;
    assert_eq!(back.login(&authn, ALICE, None).await?.user, ALICE);

    // Deleted: the session ends, the key is gone, SCIM no longer knows the id.
    let (status, _) = scim(&lab, "DELETE", &user_url, None).await?;
    assert_eq!(status, 204);
    let (took, _) = closed(&back).await?;
    eprintln!("deletion ended the live session after {took:?}");
    let (status, v) = scim(&lab, "GET", &user_url, None).await?;
    assert_eq!((status, &v["status"]), (404, &json!("404")), "{v}");
    let removed = audited(&lab, "scim_user_removed", ALICE);
    assert_eq!(removed.len(), 1);
    assert!(
        removed[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("1 key")),
        "{removed:?}"
    );
    let (_ep, gone) = tunnel(&cfg).await?;
    assert!(gone.login(&authn, ALICE, None).await.is_err());
    Ok(())
}

#[tokio::test]
async fn entra_group_pushes_grant_and_take_away_a_service_at_the_next_stream_and_false_strings_deactivate()
-> anyhow::Result<()> {
    let lab = lab().await?;
    // Entra's connection test: a user that does not exist.
    let probe = filtered("Users", "userName", "3f2c8b1e-unknown@example.com", "");
    let (status, v) = scim(&lab, "GET", &probe, None).await?;
    assert_eq!((status, &v["totalResults"]), (200, &json!(0)), "{v}");
    let entra_user = json!({
        "schemas": [
            "urn:ietf:params:scim:schemas:core:2.0:User",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
        ],
        "externalId": "alice",
        "userName": ALICE,
        "active": true,
        "displayName": "Alice Liddell",
        "emails": [{"primary": true, "type": "work", "value": ALICE}],
        "meta": {"resourceType": "User"},
        "name": {"formatted": "Alice Liddell", "familyName": "Liddell", "givenName": "Alice"},
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"department": "R&D"}
    });
    let (status, v) = scim(&lab, "POST", "/scim/v2/Users", Some(entra_user)).await?;
    assert_eq!(status, 201, "{v}");
    let alice_id = v["id"].as_str().expect("id").to_owned();
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let (_ep, t) = tunnel(&cfg).await?;
    t.login(&authn, ALICE, None).await?;
    let r = refusal(t.open_stream("api").await);
    assert_eq!(r.code, RefusalCode::Forbidden, "api is for oncall only");

    // Entra looks the group up, creates it empty, then adds the member.
    let lookup = filtered(
        "Groups",
        "displayName",
        "oncall",
        "&excludedAttributes=members",
    );
    let (status, v) = scim(&lab, "GET", &lookup, None).await?;
    assert_eq!((status, &v["totalResults"]), (200, &json!(0)), "{v}");
    let group = json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "externalId": "8e5b9c3a-group",
        "displayName": "oncall",
        "members": []
    });
    let (status, v) = scim(&lab, "POST", "/scim/v2/Groups", Some(group)).await?;
    assert_eq!(status, 201, "{v}");
    let group_url = format!("/scim/v2/Groups/{}", v["id"].as_str().expect("id"));
    let add = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "Add", "path": "members", "value": [{"value": alice_id}]}]
    });
    let (status, _) = scim(&lab, "PATCH", &group_url, Some(add)).await?;
    assert_eq!(status, 204);
    let took = until_stream(&t, "api", true).await?;
    eprintln!("the group grant reached the next stream after {took:?}");
    let opened = audited(&lab, "stream_opened", ALICE);
    assert!(
        opened
            .iter()
            .any(|e| e["service"] == "api" && e["granted_by"] == "group:oncall"),
        "{opened:?}"
    );
    let changed = audited(&lab, "scim_group_changed", ALICE);
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(
        (&changed[0]["group"], &changed[0]["outcome"]),
        (&json!("oncall"), &json!("member_added"))
    );
    let (status, v) = scim(&lab, "GET", &group_url, None).await?;
    assert_eq!((status, &v["members"][0]["value"]), (200, &json!(alice_id)));

    // The member removed as Okta and Entra both send it: refused at the next stream.
    let remove = json!({"Operations": [{"op": "Remove", "path": format!("members[value eq \"{alice_id}\"]")}]});
    let (status, _) = scim(&lab, "PATCH", &group_url, Some(remove)).await?;
    assert_eq!(status, 204);
    let took = until_stream(&t, "api", false).await?;
    eprintln!("the group removal reached the next stream after {took:?}");
    assert_eq!(audited(&lab, "scim_group_changed", ALICE).len(), 2);

    // Entra deactivates with a pathless Replace and a "False" string.
    let user_url = format!("/scim/v2/Users/{alice_id}");
    let off = json!({"Operations": [{"op": "Replace", "value": {"active": "False"}}]});
    let (status, v) = scim(&lab, "PATCH", &user_url, Some(off)).await?;
    assert_eq!((status, &v["active"]), (200, &json!(false)), "{v}");
    let (took, reason) = closed(&t).await?;
    eprintln!("deactivation (Entra PATCH) ended the live session after {took:?}");
    assert!(reason.contains("account disabled"), "{reason}");
    let on = json!({"Operations": [{"op": "Replace", "path": "active", "value": "True"}]});
    let (status, _) = scim(&lab, "PATCH", &user_url, Some(on)).await?;
    assert_eq!(status, 200);
    let (_ep, back) = tunnel(&cfg).await?;
    assert_eq!(back.login(&authn, ALICE, None).await?.user, ALICE);

    let (status, _) = scim(&lab, "DELETE", &group_url, None).await?;
    assert_eq!(status, 204);
    assert_eq!(lab.audit_events("scim_group_removed").len(), 1);
    Ok(())
}

#[tokio::test]
async fn bad_tokens_malformed_payloads_unknown_ids_and_duplicates_get_scim_errors()
-> anyhow::Result<()> {
    let lab = lab().await?;
    let addr = lab.scim_addr.expect("scim");
    let error = |v: &Value, status: &str| {
        assert_eq!(
            v["schemas"],
            json!(["urn:ietf:params:scim:api:messages:2.0:Error"]),
            "{v}"
        );
        assert_eq!(v["status"], status, "{v}");
        assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "{v}");
    };
    let user = json!({"userName": ALICE}).to_string();

    for token in [None, Some("wrong"), Some(&TOKEN[1..])] {
        let (status, v) = send(addr, token, "POST", "/scim/v2/Users", Some(user.clone())).await?;
        assert_eq!(status, 401, "{token:?}");
        error(&v, "401");
    }
    let (status, v) = scim(&lab, "GET", "/scim/v2/Users", None).await?;
    assert_eq!(
        (status, &v["totalResults"]),
        (200, &json!(0)),
        "no user was made: {v}"
    );

    let broken = Some("{\"userName\": ".to_owned());
    let (status, v) = send(addr, Some(TOKEN), "POST", "/scim/v2/Users", broken).await?;
    assert_eq!((status, &v["scimType"]), (400, &json!("invalidSyntax")));
    error(&v, "400");
    let cases = [
        (
            "POST",
            "/scim/v2/Users".to_owned(),
            json!({"active": true}),
            "invalidValue",
        ),
        (
            "POST",
            "/scim/v2/Users".to_owned(),
            json!({"userName": ["a"]}),
            "invalidValue",
        ),
        (
            "POST",
            "/scim/v2/Groups".to_owned(),
            json!({"members": []}),
            "invalidValue",
        ),
        (
            "POST",
            "/scim/v2/Users".to_owned(),
            json!([1, 2]),
            "invalidSyntax",
        ),
    ];
    for (method, path, body, kind) in cases {
        let (status, v) = scim(&lab, method, &path, Some(body.clone())).await?;
        assert_eq!((status, &v["scimType"]), (400, &json!(kind)), "{body}: {v}");
        error(&v, "400");
    }
    let (status, v) = scim(
        &lab,
        "GET",
        "/scim/v2/Users?filter=userName%20sw%20%22a%22",
        None,
    )
    .await?;
    assert_eq!(
        (status, &v["scimType"]),
        (400, &json!("invalidFilter")),
        "{v}"
    );

    let (status, created) = scim(
        &lab,
        "POST",
        "/scim/v2/Users",
        Some(json!({"userName": ALICE})),
    )
    .await?;
    assert_eq!(status, 201);
    let user_url = format!("/scim/v2/Users/{}", created["id"].as_str().expect("id"));
    let bad_active = json!({"Operations": [{"op": "replace", "path": "active", "value": "maybe"}]});
    let (status, v) = scim(&lab, "PATCH", &user_url, Some(bad_active)).await?;
    assert_eq!(
        (status, &v["scimType"]),
        (400, &json!("invalidValue")),
        "{v}"
    );
    let rename =
        json!({"Operations": [{"op": "replace", "path": "userName", "value": "eve@example.com"}]});
    let (status, v) = scim(&lab, "PATCH", &user_url, Some(rename)).await?;
    assert_eq!((status, &v["scimType"]), (400, &json!("mutability")), "{v}");
    let again = json!({"userName": "Alice@Example.com"});
    let (status, v) = scim(&lab, "POST", "/scim/v2/Users", Some(again)).await?;
    assert_eq!((status, &v["scimType"]), (409, &json!("uniqueness")), "{v}");
    error(&v, "409");
    let unknown_member = json!({"displayName": "oncall", "members": [{"value": "00000000-0000-4000-8000-000000000000"}]});
    let (status, v) = scim(&lab, "POST", "/scim/v2/Groups", Some(unknown_member)).await?;
    assert_eq!(
        (status, &v["scimType"]),
        (400, &json!("invalidValue")),
        "{v}"
    );

    let nobody = "/scim/v2/Users/00000000-0000-4000-8000-000000000000";
    let off = json!({"Operations": [{"op": "replace", "value": {"active": false}}]});
    for (method, body) in [("GET", None), ("PATCH", Some(off)), ("DELETE", None)] {
        let (status, v) = scim(&lab, method, nobody, body).await?;
        assert_eq!(status, 404, "{method}: {v}");
        error(&v, "404");
    }
    let (status, v) = scim(&lab, "GET", "/scim/v2/Groups/not-a-group", None).await?;
    assert_eq!(status, 404, "{v}");

    let refused = lab.audit_events("scim_refused");
    let outcome = |o: &str| refused.iter().filter(|e| e["outcome"] == o).count();
    assert_eq!(outcome("401"), 3, "{refused:?}");
    assert_eq!(outcome("invalidSyntax"), 2, "{refused:?}");
    assert_eq!(outcome("uniqueness"), 1, "{refused:?}");
    assert_eq!(outcome("404"), 4, "{refused:?}");
    assert!(
        refused
            .iter()
            .all(|e| e["peer"].is_string() && e["reason"].is_string())
    );
    // The one user is untouched by it all.
    let (_, v) = scim(&lab, "GET", &user_url, None).await?;
    assert_eq!(
        (&v["userName"], &v["active"]),
        (&json!(ALICE), &json!(true))
    );
    Ok(())
}

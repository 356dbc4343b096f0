//! `examples/verify-assertion/verify.py`, what a service runs to check `X-Touchgate-Assertion`
//! (PyJWT, Debian's python3-jwt), against a real gateway: an assertion as the upstream
//! receives it through the tunnel verifies with the keys the carrier's public HTTP side serves
//! (where a service on Cloud Run fetches them), and names the user; one tampered with, expired,
//! for another service or issuer, signed by another key or by no key at all is refused.

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Context;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use touchgate_agent::RunningAgent;
use touchgate_e2e::{enrolled, get};
use touchgate_gateway::{store::Store, tokens::TokenSigner};
use touchgate_testkit::lab::{API_AUDIENCE, Lab, LabOptions};

const ALICE: &str = "alice@example.com";
const PYTHON: &str = "/usr/bin/python3";
/// The lab gateway's origin: the issuer of its assertions.
const ISSUER: &str = "https://localhost";

fn script() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/verify-assertion/verify.py")
}

/// What `verify.py` did with `tokens`: its exit status, one JSON value per token, and stderr.
struct Verified {
    success: bool,
    results: Vec<Value>,
    stderr: String,
}

/// How `verify.py` is run: the service's settings.
struct Service<'a> {
    jwks: &'a str,
    issuer: &'a str,
    audience: &'a str,
    /// `--dangerous-allow-plain-http`.
    allow_http: bool,
}

/// Runs `verify.py` for `service`, the tokens on its standard input.
async fn verify_py(service: &Service<'_>, tokens: &[&str]) -> anyhow::Result<Verified> {
    let mut args: Vec<String> = [
        "--jwks",
        service.jwks,
        "--issuer",
        service.issuer,
        "--audience",
        service.audience,
    ]
    .map(String::from)
    .to_vec();
    if service.allow_http {
        args.push("--dangerous-allow-plain-http".into());
    }
    let input: String = tokens.iter().map(|t| format!("{t}\n")).collect();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            let mut child = Command::new(PYTHON)
                .arg(script())
                .args(&args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context(
                    "cannot start python3 (this test needs Debian's python3-jwt; the test command installs it)",
                )?;
            child
                .stdin
                .take()
                .context("no stdin")?
                .write_all(input.as_bytes())?;
            anyhow::Ok(child.wait_with_output()?)
        }),
    )
    .await???;
    let results = String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<Vec<Value>, _>>()?;
    Ok(Verified {
        success: out.status.success(),
        results,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// A JWT's parts: header and claims as JSON, and the signature as it was.
fn parts(token: &str) -> anyhow::Result<(Value, Value, String)> {
    let mut it = token.split('.');
    let mut json_part = || -> anyhow::Result<Value> {
        Ok(serde_json::from_slice(
            &URL_SAFE_NO_PAD.decode(it.next().context("too few parts")?)?,
        )?)
    };
    let (header, claims) = (json_part()?, json_part()?);
    Ok((
        header,
        claims,
        it.next().context("no signature")?.to_owned(),
    ))
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// `claims` signed with the PKCS#8 P-256 key `pkcs8`, under the key id `kid`.
fn es256(claims: &Value, pkcs8: &[u8], kid: &str) -> anyhow::Result<String> {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    Ok(jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_ec_der(pkcs8),
    )?)
}

#[tokio::test]
async fn a_service_verifies_the_gateways_assertion_and_refuses_every_other() -> anyhow::Result<()> {
    let lab = Lab::start(LabOptions::default()).await?;
    let (cfg, authn, _) = enrolled(&lab, ALICE, &[]).await?;
    let agent = RunningAgent::start(cfg, authn).await?;
    let echo = get(agent.local_addr("api").expect("api"), "/whoami", &[])
        .await?
        .json()?;
    let genuine = echo["headers"]["x-touchgate-assertion"]
        .as_str()
        .context("the upstream got no assertion")?
        .to_owned();
    agent.shutdown().await;

    // The keys where a service finds them: the carrier's public HTTP side (plain here, as
    // behind Cloud Run's TLS).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let jwks = format!("http://{}/.well-known/jwks.json", listener.local_addr()?);
    let serving = tokio::spawn(lab.gateway.clone().serve_carrier(listener, false));

    // Assertions that must not pass, made as an attacker, or a careless setup, would.
    let (header, claims, signature) = parts(&genuine)?;
    let kid = header["kid"].as_str().context("no kid")?;
    let mut as_root = claims.clone();
    as_root["sub"] = json!("root@example.com");
    let tampered = format!("{}.{}.{signature}", b64(&header), b64(&as_root));
    let gateway_key = Store::open(&lab.dir.path().join("gateway.db"))?
        .signing_keys()?
        .into_iter()
        .find(|k| k.kid == kid)
        .context("the signing key is not in the store")?;
    let now = touchgate_gateway::store::now_secs();
    let mut old = claims.clone();
    old["iat"] = json!(now - 900);
    old["exp"] = json!(now - 600);
    let expired = es256(&old, &gateway_key.pkcs8, kid)?;
    // Another gateway (a staging one, say) with keys of its own.
    let other_dir = tempfile::tempdir()?;
    let other_store = Store::open(&other_dir.path().join("other.db"))?;
    let other_gateway = TokenSigner::load(&other_store, ISSUER)?.identity_assertion(
        ALICE,
        "api",
        API_AUDIENCE,
        None,
    )?;
    let other_key = other_store
        .signing_keys()?
        .into_iter()
        .next()
        .context("no key")?;
    let other_key_same_kid = es256(&claims, &other_key.pkcs8, kid)?;
    // Algorithm confusion: HMAC with the public key as the secret, and no signature at all.
    let public_key = body_of(&jwks).await?;
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some(kid.to_owned());
    let hmac = jsonwebtoken::encode(
        &hs,
        &claims,
        &EncodingKey::from_secret(public_key.as_bytes()),
    )?;
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": kid, "typ": "JWT"})),
        b64(&claims)
    );

    let api = Service {
        jwks: &jwks,
        issuer: ISSUER,
        audience: API_AUDIENCE,
        allow_http: true,
    };
    let run = verify_py(
        &api,
        &[
            &genuine,
            &tampered,
            &expired,
            &other_gateway,
            &other_key_same_kid,
            &hmac,
            &none,
        ],
    )
    .await?;
    assert!(run.success, "{}", run.stderr);
    let r = &run.results;
    assert_eq!(r.len(), 7, "{r:?}");
    assert_eq!(
        r[0],
        json!({"user": ALICE, "service": "api", "expires_at": claims["exp"]}),
        "the genuine assertion names alice"
    );
    for (i, what) in [
        "tampered",
        "expired",
        "from another gateway",
        "signed by another key under the gateway's key id",
        "HS256 with the public key",
        "alg none",
    ]
    .iter()
    .enumerate()
    {
        assert!(r[i + 1]["refused"].is_string(), "{what}: {}", r[i + 1]);
    }
    let said = |i: usize| r[i]["refused"].as_str().unwrap_or_default().to_lowercase();
    assert!(said(2).contains("expired"), "{}", said(2));
    assert!(said(5).contains("alg"), "{}", said(5));

    // The genuine assertion is refused by another service, and by a service expecting
    // another gateway.
    for (service, word) in [
        (
            Service {
                audience: "https://billing-xyz-uc.a.run.app",
                ..api
            },
            "audience",
        ),
        (
            Service {
                issuer: "https://gw.other.example",
                ..api
            },
            "issuer",
        ),
    ] {
        let run = verify_py(&service, &[&genuine]).await?;
        assert!(
            run.results[0]["refused"]
                .as_str()
                .is_some_and(|s| s.to_lowercase().contains(word)),
            "{word}: {:?}",
            run.results
        );
    }

    // Keys over plain HTTP only when the test says so.
    let plain = Service {
        allow_http: false,
        ..api
    };
    let run = verify_py(&plain, &[&genuine]).await?;
    assert!(!run.success && run.results.is_empty());
    assert!(run.stderr.contains("https"), "{}", run.stderr);
    serving.abort();
    Ok(())
}

/// The body of `GET url` (plain HTTP on loopback).
async fn body_of(url: &str) -> anyhow::Result<String> {
    let url = url::Url::parse(url)?;
    let addr = url
        .socket_addrs(|| None)?
        .into_iter()
        .next()
        .context("no address")?;
    let answer = get(addr, url.path(), &[]).await?;
    anyhow::ensure!(answer.status == 200, "GET {url}: {}", answer.status);
    Ok(String::from_utf8(answer.body.to_vec())?)
}

//! No secret (session token, invite code, assertion, software key state) appears in the process
//! log at INFO or above, or in the audit log, over a full run: enrol, sign in, requests, a
//! refused replay, a gateway restart and a revoke.

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use touchgate_agent::RunningAgent;
use touchgate_e2e::{get, soft_authn};
use touchgate_testkit::lab::{Lab, LabOptions};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_full_run_logs_no_secret_at_info_or_above() -> anyhow::Result<()> {
    // Sets the process's log subscriber and reads everything logged: alone in its process (see `alone`).
    if let Some(alone) =
        crate::alone::unless_alone("no_secrets_in_logs::a_full_run_logs_no_secret_at_info_or_above")
    {
        return alone;
    }
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let mut lab = Lab::start(LabOptions::default()).await?;
    let user = "alice@example.com";
    let key_path = lab.dir.path().join("alice.softkey");
    let cfg = lab.agent_config(user, &key_path, &["nosuch"])?;
    let authn = soft_authn(&key_path)?;
    let code = lab.invite(user)?;
    touchgate_agent::enroll(&cfg, &authn, &code).await?;

    // A captured assertion, replayed (refused), to have assertion bytes in hand.
    let key = touchgate_agent::tunnel::SessionKey::generate()?;
    let endpoint = touchgate_agent::tunnel::client_endpoint(&cfg, &key)?;
    let t = touchgate_agent::tunnel::Tunnel::connect(&endpoint, &cfg).await?;
    let assertion = t.make_assertion(&authn, user, None).await?;
    t.finish_login(assertion.clone()).await?;
    assert!(t.finish_login(assertion.clone()).await.is_err());

    let agent = RunningAgent::start(cfg, authn).await?;
    let token = agent.session().expect("session").token;
    assert_eq!(
        get(
            agent.local_addr("api").expect("api"),
            "/x",
            &[("authorization", "Bearer user-secret-123")]
        )
        .await?
        .status,
        200
    );
    // A refused stream and a restart produce WARN and INFO lines.
    let _ = tokio::net::TcpStream::connect(agent.local_addr("nosuch").expect("nosuch")).await?;
    lab.restart_gateway().await?;
    touchgate_gateway::store::Store::open(&lab.dir.path().join("gateway.db"))?.revoke_user(user)?;
    agent.shutdown().await;

    let signature = assertion["response"]["signature"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let soft_key = std::fs::read_to_string(&key_path)?;
    let soft_state: serde_json::Value = serde_json::from_str(&soft_key)?;
    let soft_token_state = soft_state["token"].as_str().unwrap_or_default()[..40].to_owned();
    let secrets = [
        ("session token", token.as_str()),
        (
            "session token signature",
            token.rsplit('.').next().unwrap_or_default(),
        ),
        ("invite code", code.as_str()),
        ("assertion signature", signature.as_str()),
        ("caller's Authorization header", "user-secret-123"),
        ("software key state", soft_token_state.as_str()),
    ];
    let log_text = String::from_utf8(
        logs.0
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .clone(),
    )?;
    lab.gateway.flush_audit();
    let audit_text = std::fs::read_to_string(lab.dir.path().join("audit.jsonl"))?;
    assert!(
        log_text.contains("INFO") && log_text.contains("WARN"),
        "the run logged: {log_text}"
    );
    assert!(audit_text.lines().count() > 10);
    for (what, secret) in secrets {
        assert!(secret.len() >= 8, "{what} is too short to search for");
        assert!(
            !log_text.contains(secret),
            "{what} appears in the process log"
        );
        assert!(
            !audit_text.contains(secret),
            "{what} appears in the audit log"
        );
    }
    Ok(())
}

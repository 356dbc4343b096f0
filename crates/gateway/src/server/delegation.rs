//! Delegated grants on the control stream: a user approves a grant with a touch whose
//! assertion commits to its scope ([`Grant::binding`]), lists their grants and revokes one.
//!
//! Before the key has answered, only the grant's shape and the gateway's own `[delegation]`
//! policy are checked (a peer that merely names a user learns nothing about that user's
//! access); whether the user may use each service is checked once the key has proved them.

use touchgate_proto::{DelegationInfo, Grant};

use super::*;
use crate::rp::PendingLogin;

/// Longest label of a grant.
const MAX_LABEL: usize = 64;
/// Most services, methods or path prefixes one grant may list.
const MAX_ITEMS: usize = 32;
/// Longest path prefix.
const MAX_PREFIX: usize = 256;
/// How far a grant's expiry may pass `max_ttl`, for the agent's clock running ahead.
const CLOCK_SLACK_SECS: u64 = 60;

/// A delegation waiting for the key's answer on this connection.
pub(super) struct PendingDelegation {
    login: PendingLogin,
    grant: Grant,
}

/// Checks a grant's shape, its length and that the gateway delegates at all; returns it in
/// canonical form. Nothing here depends on the gateway's services or on the user.
pub fn check_grant(
    cfg: &crate::config::DelegationConfig,
    grant: &Grant,
    now: u64,
) -> Result<Grant, Refusal> {
    let g = grant.normalised();
    let bad = |msg: String| Err(Refusal::new(RefusalCode::BadRequest, msg));
    let refused = |msg: String| Err(Refusal::new(RefusalCode::DelegationRefused, msg));
    if !cfg.enabled {
        return refused("this gateway does not allow delegated access".into());
    }
    let label_ok = |c: char| c.is_ascii_alphanumeric() || "._@:+- ".contains(c);
    if g.label.is_empty()
        || g.label.len() > MAX_LABEL
        || !g.label.chars().all(label_ok)
        || !g.label.starts_with(|c: char| c.is_ascii_alphanumeric())
    {
        return bad(format!(
            "a grant's label has 1 to {MAX_LABEL} letters, digits, spaces or . _ @ : + - and starts with a letter or digit"
        ));
    }
    if g.services.is_empty() {
        return bad("a grant names at least one service".into());
    }
    if g.services.len() > MAX_ITEMS
        || g.methods.len() > MAX_ITEMS
        || g.path_prefixes.len() > MAX_ITEMS
    {
        return bad(format!(
            "a grant lists at most {MAX_ITEMS} services, methods and path prefixes each"
        ));
    }
    if g.services.iter().any(|s| s.is_empty() || s.len() > 128) {
        return bad("a service name has 1 to 128 bytes".into());
    }
    for m in &g.methods {
        if m.is_empty() || m.len() > 16 || !m.bytes().all(|b| b.is_ascii_uppercase()) {
            return bad(format!("{} is not an HTTP method", untrusted(m)));
        }
    }
    for p in &g.path_prefixes {
        if !p.starts_with('/')
            || p.len() > MAX_PREFIX
            || p.contains(['%', '\\', '?', '#', ';'])
            || p.chars().any(char::is_control)
            || p.split('/').any(|s| s == "." || s == "..")
        {
            return bad(format!(
                "path prefix {} must start with / and hold no dot segments, %, \\, ?, # or ;",
                untrusted(p)
            ));
        }
    }
    if g.key.len() != 43
        || !g
            .key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return bad("the grant's key is not a certificate thumbprint (x5t#S256)".into());
    }
    if g.expires_at <= now {
        return bad("the grant's expiry is in the past".into());
    }
    let max = cfg.max_ttl.as_secs();
    if g.expires_at > now + max + CLOCK_SLACK_SECS {
        return refused(format!(
            "a grant may last at most {} on this gateway ([delegation] max_ttl)",
            humantime::format_duration(cfg.max_ttl)
        ));
    }
    Ok(g)
}

/// Checks, once the key has proved `user` (in `groups`), that every service of `grant`
/// exists, may be delegated, is whole when it is a TCP service, and is one `user` may use.
pub fn check_services(
    cfg: &crate::GatewayConfig,
    grant: &Grant,
    user: &str,
    groups: &[String],
) -> Result<(), Refusal> {
    let bad = |msg: String| Err(Refusal::new(RefusalCode::BadRequest, msg));
    let refused = |msg: String| Err(Refusal::new(RefusalCode::DelegationRefused, msg));
    for s in &grant.services {
        let Some(svc) = cfg.service(s) else {
            return bad(format!(
                "this gateway has no service named {}",
                untrusted(s)
            ));
        };
        if let Err(why) = streams::delegable(&cfg.delegation, &svc.name) {
            return refused(why);
        }
        if svc.kind == touchgate_proto::ServiceKind::Tcp
            && (!grant.methods.is_empty() || !grant.path_prefixes.is_empty())
        {
            return bad(format!(
                "service {:?} is a TCP service: it is granted whole, without methods or path \
                 prefixes (make a separate grant for it)",
                svc.name
            ));
        }
        if !svc.allows(user, groups) {
            return refused(format!(
                "{user} may not use service {:?}, so cannot delegate it",
                svc.name
            ));
        }
    }
    Ok(())
}

impl ConnCtx {
    /// `DelegateBegin`: the challenge for a grant, once its shape and the policy allow it.
    pub(super) async fn delegate_begin(
        &self,
        user: &str,
        grant: &Grant,
    ) -> Result<(serde_json::Value, PendingDelegation), Refusal> {
        let gw = &self.gw;
        self.rate_limit(user)?;
        let grant = check_grant(&gw.cfg.delegation, grant, now_secs())?;
        let (options, login) = self.login_begin(user).await?;
        Ok((options, PendingDelegation { login, grant }))
    }

    /// `DelegateFinish`: verifies the key's assertion against the grant's binding, checks the
    /// user may use every service granted, records the grant and issues its token.
    pub(super) async fn delegate_finish(
        &self,
        p: PendingDelegation,
        credential: serde_json::Value,
    ) -> Result<ServerMsg, (Refusal, Option<String>)> {
        let gw = &self.gw;
        let user = p.login.user.clone();
        // Once the key has answered, a refusal names the user it verified.
        let named = |r: Refusal| (r, Some(user.clone()));
        let binding = p.grant.binding(&self.binding);
        let key = self
            .login_finish_bound(p.login, credential, &binding)
            .await
            .inspect_err(|r| {
                if r.code != RefusalCode::AccountDisabled {
                    self.count_failure(&user);
                }
            })
            .map_err(|r| (r, None))?;
        let grant = p.grant;
        check_services(&gw.cfg, &grant, &user, &gw.revocations.groups(&user)).map_err(named)?;
        // The identity provider's word on the user is as fresh as a sign-in needs, and a
        // grant ends no later than it does.
        if let Some(until) = self.idp_fresh(&user).await.map_err(|r| {
            named(Refusal::new(
                RefusalCode::DelegationRefused,
                format!(
                    "{} — sign in with your organisation again (touchgate up), then delegate",
                    r.message
                ),
            ))
        })? && grant.expires_at > until
        {
            return Err(named(Refusal::new(
                RefusalCode::DelegationRefused,
                format!(
                    "your organisation's sign-in is good for {} more: ask for a grant that ends by then",
                    humantime::format_duration(Duration::from_secs(
                        until.saturating_sub(now_secs())
                    ))
                ),
            )));
        }
        let id = format!("dlg-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        let (u, g, i, c) = (user.clone(), grant.clone(), id.clone(), key.cred.clone());
        let info = gw
            .db(move |s| s.add_delegation(&i, &u, &g, &c))
            .await
            .map_err(named)?;
        let epoch = gw.revocations.epoch(&user);
        let (token, _) = gw
            .signer
            .issue_delegation(&info, key.clone(), epoch)
            .map_err(|e| named(Refusal::new(RefusalCode::Internal, e.to_string())))?;
        let services = grant
            .services
            .iter()
            .filter_map(|s| gw.cfg.service(s))
            .map(|s| ServiceInfo {
                name: s.name.clone(),
                kind: s.kind,
            })
            .collect();
        tracing::info!(%user, delegate = %grant.label, id = %info.id, "delegated grant made");
        gw.audit.record(AuditEvent {
            user: Some(user),
            delegate: Some(grant.label.clone()),
            session: Some(info.id.clone()),
            service: Some(grant.services.join(",")),
            method: (!grant.methods.is_empty()).then(|| grant.methods.join(",")),
            path: (!grant.path_prefixes.is_empty()).then(|| grant.path_prefixes.join(",")),
            expires_at: Some(grant.expires_at),
            outcome: Some("ok".into()),
            ..self
                .event(AuditKind::DelegationGranted)
                .with_key(&gw.rp, &key)
        });
        Ok(ServerMsg::Delegated {
            info,
            token,
            services,
        })
    }

    /// The user of this connection's own session (not a delegate's), for listing and revoking
    /// grants.
    fn grant_owner(
        &self,
        session: &watch::Sender<Option<Arc<SessionClaims>>>,
    ) -> Result<String, Refusal> {
        let claims = session.borrow().clone();
        match claims.as_deref() {
            None => Err(Refusal::new(
                RefusalCode::Unauthenticated,
                "sign in on this connection before listing or revoking grants",
            )),
            Some(c) if c.dlg.is_some() => Err(Refusal::new(
                RefusalCode::DelegationRefused,
                "a delegate cannot list or change grants: only the person who approved them can",
            )),
            Some(c) if self.gw.revocations.revoked(c) => Err(revoked_refusal()),
            Some(c) => Ok(c.sub.clone()),
        }
    }

    /// `ListDelegations`.
    pub(super) async fn list_delegations(
        &self,
        session: &watch::Sender<Option<Arc<SessionClaims>>>,
    ) -> Result<Vec<DelegationInfo>, Refusal> {
        let user = self.grant_owner(session)?;
        self.gw.db(move |s| s.delegations(Some(&user))).await
    }

    /// `RevokeDelegation`: ends one of the user's grants; its delegate's connections close at
    /// the next revocation check (within a second or two).
    pub(super) async fn revoke_own_delegation(
        &self,
        session: &watch::Sender<Option<Arc<SessionClaims>>>,
        id: &str,
    ) -> Result<String, Refusal> {
        let gw = &self.gw;
        let user = self.grant_owner(session)?;
        let (u, i) = (user.clone(), id.to_owned());
        let store = gw.store.clone();
        let revoked = tokio::task::spawn_blocking(move || store.revoke_delegation(Some(&u), &i))
            .await
            .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))?
            .map_err(|e| match e {
                crate::store::StoreError::Conflict(msg) => {
                    Refusal::new(RefusalCode::BadRequest, msg)
                }
                e => control::db_refusal(e),
            })?;
        let Some(d) = revoked else {
            return Err(Refusal::new(
                RefusalCode::BadRequest,
                format!(
                    "you have no live grant with the id or label {}",
                    untrusted(id)
                ),
            ));
        };
        gw.revocations.revoke_delegation(&d.id);
        gw.audit.record(AuditEvent {
            user: Some(user),
            delegate: Some(d.grant.label.clone()),
            session: Some(d.id.clone()),
            outcome: Some("ok".into()),
            reason: Some("revoked by its owner".into()),
            ..self.event(AuditKind::DelegationRevoked)
        });
        Ok(d.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> crate::GatewayConfig {
        let text = r#"
listen = "127.0.0.1:0"
rp_id = "localhost"
database = "x.db"
[tls]
cert = "c.pem"
key = "k.pem"
[delegation]
max_ttl = "2h"
[[service]]
name = "api"
kind = "http"
upstream = "http://127.0.0.1:1"
allow = ["*"]
[[service]]
name = "db"
kind = "tcp"
upstream = "127.0.0.1:5432"
allow = ["*"]
"#;
        toml::from_str(text).expect("config")
    }

    fn grant() -> Grant {
        Grant {
            label: "ci-nightly".into(),
            services: vec!["api".into()],
            methods: vec!["get".into(), "HEAD".into(), "GET".into()],
            path_prefixes: vec!["/v1/".into()],
            expires_at: 1_000 + 3600,
            key: "A".repeat(43),
        }
    }

    #[test]
    fn a_grant_within_the_policy_comes_back_canonical() {
        let c = cfg();
        let g = check_grant(&c.delegation, &grant(), 1_000).expect("allowed");
        assert_eq!(g.methods, vec!["GET", "HEAD"]);
        check_services(&c, &g, "alice@example.com", &[]).expect("services allowed");
    }

    #[test]
    fn each_bad_grant_is_refused_with_its_reason() {
        let c = cfg();
        let check = |f: &dyn Fn(&mut Grant)| {
            let mut g = grant();
            f(&mut g);
            check_grant(&c.delegation, &g, 1_000).expect_err("refused")
        };
        let r = check(&|g| g.expires_at = 1_000 + 3 * 3600);
        assert_eq!(r.code, RefusalCode::DelegationRefused);
        assert!(r.message.contains("at most 2h"), "{}", r.message);
        assert_eq!(check(&|g| g.expires_at = 999).code, RefusalCode::BadRequest);
        assert!(
            check(&|g| g.label = "x\ny".into())
                .message
                .contains("label")
        );
        assert!(
            check(&|g| g.label = String::new())
                .message
                .contains("label")
        );
        assert!(
            check(&|g| g.services.clear())
                .message
                .contains("at least one")
        );
        assert!(
            check(&|g| g.methods = vec!["GE T".into()])
                .message
                .contains("not an HTTP method")
        );
        for p in [
            "v1/",
            "/v1/../admin",
            "/v1/%2e%2e/",
            "/a\\b",
            "/q?x",
            "/v1;x/",
        ] {
            assert!(
                check(&|g| g.path_prefixes = vec![p.into()])
                    .message
                    .contains("path prefix"),
                "{p}"
            );
        }
        assert!(
            check(&|g| g.key = "short".into())
                .message
                .contains("thumbprint")
        );
        // Nothing about the gateway's services is said before the key answers.
        let unknown = Grant {
            services: vec!["nope".into()],
            ..grant()
        };
        let g = check_grant(&c.delegation, &unknown, 1_000).expect("the shape only");
        let r = check_services(&c, &g, "alice@example.com", &[]).expect_err("unknown");
        assert!(r.message.contains("no service"), "{}", r.message);
        // A TCP service is granted whole.
        let tcp = Grant {
            services: vec!["db".into()],
            ..grant()
        };
        let r =
            check_services(&c, &tcp.normalised(), "alice@example.com", &[]).expect_err("refused");
        assert!(r.message.contains("TCP service"), "{}", r.message);
    }

    #[test]
    fn the_policy_can_turn_delegation_off_or_limit_it_to_services() {
        let mut c = cfg();
        c.delegation.services = vec!["db".into()];
        let g = check_grant(&c.delegation, &grant(), 1_000).expect("shape");
        let r = check_services(&c, &g, "alice@example.com", &[]).expect_err("refused");
        assert_eq!(r.code, RefusalCode::DelegationRefused);
        assert!(
            r.message
                .contains("does not allow delegating service \"api\""),
            "{}",
            r.message
        );
        c.delegation.enabled = false;
        let r = check_grant(&c.delegation, &grant(), 1_000).expect_err("refused");
        assert!(
            r.message.contains("does not allow delegated access"),
            "{}",
            r.message
        );
    }

    #[test]
    fn the_binding_commits_to_every_part_of_the_scope_and_to_the_connection() {
        let g = grant();
        let b = g.binding(b"exporter-a");
        assert_eq!(b, g.normalised().binding(b"exporter-a"));
        assert_ne!(b, g.binding(b"exporter-b"));
        let changed: [&dyn Fn(&mut Grant); 6] = [
            &|g| g.methods = vec!["POST".into()],
            &|g| g.path_prefixes = vec!["/".into()],
            &|g| g.services.push("db".into()),
            &|g| g.expires_at += 1,
            &|g| g.label = "other".into(),
            &|g| g.key = "B".repeat(43),
        ];
        for f in changed {
            let mut other = grant();
            f(&mut other);
            assert_ne!(other.binding(b"exporter-a"), b);
        }
    }
}

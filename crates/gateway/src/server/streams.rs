//! Data streams: the stream header, the decision whether a stream may be served, refusals,
//! and handing the stream to the HTTP proxy or the TCP splice.

use super::*;

/// Whether the gateway's `[delegation]` policy lets `service` be delegated; the words say why not.
pub fn delegable(cfg: &crate::config::DelegationConfig, service: &str) -> Result<(), String> {
    if !cfg.enabled {
        return Err(
            "this gateway does not allow delegated access ([delegation] enabled = false)".into(),
        );
    }
    if !cfg.services.is_empty() && !cfg.services.iter().any(|s| s == service) {
        return Err(format!(
            "this gateway does not allow delegating service {service:?} (it allows {})",
            cfg.services.join(", ")
        ));
    }
    Ok(())
}

/// How long a refusal to a stream opened before sign-in may take to be written.
const REFUSAL_WRITE_WAIT: Duration = Duration::from_secs(5);

/// Whether a stream for `service` may be served to the session `claims` (none: not signed
/// in; `revoked`: ended by an admin), whose user is in `groups`, at `now`: the service it
/// names and what granted it (see [`crate::config::ServiceConfig::grant`]), or the refusal to
/// send.
pub fn authorize_stream<'c>(
    claims: Option<&SessionClaims>,
    groups: &[String],
    revoked: bool,
    cfg: &'c crate::GatewayConfig,
    service: &str,
    now: u64,
) -> Result<(&'c crate::config::ServiceConfig, String), Refusal> {
    let Some(claims) = claims else {
        return Err(Refusal::new(
            RefusalCode::Unauthenticated,
            "sign in (or resume the session) on the control stream before opening streams",
        ));
    };
    if claims.exp <= now {
        return Err(Refusal::new(
            RefusalCode::SessionExpired,
            "your session has expired: touch your key to sign in again",
        ));
    }
    if revoked {
        return Err(revoked_refusal());
    }
    let Some(svc) = cfg.service(service) else {
        return Err(Refusal::new(
            RefusalCode::UnknownService,
            format!(
                "this gateway has no service named {}: check the service names in your agent config",
                untrusted(service)
            ),
        ));
    };
    if let Some(d) = &claims.dlg {
        let label = claims.act.as_ref().map_or("?", |a| a.sub.as_str());
        if let Err(why) = delegable(&cfg.delegation, &svc.name) {
            return Err(Refusal::new(RefusalCode::DelegationRefused, why));
        }
        if !d.services.contains(&svc.name) {
            return Err(Refusal::new(
                RefusalCode::DelegationRefused,
                format!(
                    "the grant {label:?} does not include service {:?} (it has {})",
                    svc.name,
                    d.services.join(", ")
                ),
            ));
        }
    }
    match svc.grant(&claims.sub, groups) {
        Some(grant) => Ok((svc, grant)),
        None => Err(Refusal::new(
            RefusalCode::Forbidden,
            format!(
                "{} may not use service {:?}: ask your admin for access",
                claims.sub, svc.name
            ),
        )),
    }
}

impl ConnCtx {
    pub(super) async fn data_stream(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        session: watch::Receiver<Option<Arc<SessionClaims>>>,
    ) {
        let gw = &self.gw;
        let open = match tokio::time::timeout(
            STREAM_OPEN_TIMEOUT,
            read_frame_limited::<StreamOpen, _>(&mut recv, STREAM_OPEN_MAX),
        )
        .await
        {
            Ok(Ok(Some(o))) => o,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                let r = Refusal::new(RefusalCode::BadRequest, format!("stream header: {e}"));
                self.stream_refused(&mut send, None, None, r).await;
                return;
            }
            Err(_) => {
                let r = Refusal::new(
                    RefusalCode::BadRequest,
                    format!(
                        "no stream header within {}",
                        humantime::format_duration(STREAM_OPEN_TIMEOUT)
                    ),
                );
                self.stream_refused(&mut send, None, None, r).await;
                return;
            }
        };
        let claims = session.borrow().clone();
        let revoked = claims.as_deref().is_some_and(|c| gw.revocations.revoked(c));
        let groups = claims
            .as_deref()
            .map(|c| gw.revocations.groups(&c.sub))
            .unwrap_or_else(|| Arc::from(Vec::new()));
        let (svc, grant) = match authorize_stream(
            claims.as_deref(),
            &groups,
            revoked,
            &gw.cfg,
            &open.service,
            now_secs(),
        ) {
            Ok(granted) => granted,
            Err(r) => {
                let user = claims.as_deref().map(|c| c.sub.as_str());
                self.stream_refused(&mut send, user, Some(&open.service), r)
                    .await;
                return;
            }
        };
        let Some(claims) = claims else { return };
        let user = claims.sub.as_str();
        let svc = Arc::new(svc.clone());
        let tcp = match svc.kind {
            touchgate_proto::ServiceKind::Tcp => {
                match tokio::time::timeout(
                    crate::proxy::UPSTREAM_CONNECT_TIMEOUT,
                    tokio::net::TcpStream::connect(&svc.upstream),
                )
                .await
                {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        Some(s)
                    }
                    Ok(Err(e)) => {
                        let r = Refusal::new(
                            RefusalCode::UpstreamUnavailable,
                            format!("service {} is unreachable: {e}", svc.name),
                        );
                        self.stream_refused(&mut send, Some(user), Some(&svc.name), r)
                            .await;
                        return;
                    }
                    Err(_) => {
                        let r = Refusal::new(
                            RefusalCode::UpstreamUnavailable,
                            format!(
                                "service {} did not accept a connection within {}",
                                svc.name,
                                humantime::format_duration(crate::proxy::UPSTREAM_CONNECT_TIMEOUT)
                            ),
                        );
                        self.stream_refused(&mut send, Some(user), Some(&svc.name), r)
                            .await;
                        return;
                    }
                }
            }
            touchgate_proto::ServiceKind::Http => None,
        };
        if write_frame(&mut send, &StreamReply::Accepted)
            .await
            .is_err()
        {
            return;
        }
        gw.activity.touch(&claims.jti);
        if let Some(d) = &claims.dlg
            && gw.revocations.note_delegation_use(&d.id)
        {
            let (store, id) = (gw.store.clone(), d.id.clone());
            tokio::task::spawn_blocking(move || {
                if let Err(e) = store.record_delegation_use(&id, now_secs()) {
                    tracing::warn!(error = %e, "cannot record a grant's use");
                }
            });
        }
        let _open = OpenStream::new(&self.open_streams);
        Metrics::inc(&gw.metrics.streams_total);
        Metrics::inc(&gw.metrics.streams_open);
        // Who is behind every line of this stream: the user, the session and its key.
        let who = AuditEvent {
            user: Some(user.to_owned()),
            service: Some(svc.name.clone()),
            session: Some(claims.jti.clone()),
            ..self
                .event(AuditKind::StreamOpened)
                .with_claims(&gw.rp, &claims)
        };
        gw.audit.record(AuditEvent {
            granted_by: Some(grant.clone()),
            ..who.clone()
        });
        let started = Instant::now();
        let io = Counted::new(tokio::io::join(recv, send));
        let (up, down) = (io.read.clone(), io.written.clone());
        let browser = BrowserPolicy::new(open.local.as_ref());
        let outcome = match tcp {
            Some(mut upstream) => {
                let refusal = Arc::new(std::sync::OnceLock::new());
                let mut io = FirstBytesGuard::new(io, browser, refusal.clone());
                let copied = tokio::io::copy_bidirectional_with_sizes(
                    &mut io,
                    &mut upstream,
                    64 * 1024,
                    64 * 1024,
                )
                .await;
                match (copied, refusal.get()) {
                    (_, Some(r)) => {
                        self.tcp_browser_refused(user, &svc.name, r);
                        "browser_refused".to_owned()
                    }
                    (Ok(_), None) => "ok".to_owned(),
                    (Err(e), None) => format!("error: {e}"),
                }
            }
            None => {
                let mut ctx = StreamContext::new(user, svc.clone(), browser).with_peer(self.peer);
                if let Some(scope) = &claims.dlg {
                    let label = claims.act.as_ref().map_or("?", |a| a.sub.as_str());
                    ctx = ctx.with_delegation(label, scope);
                }
                if gw.cfg.audit.requests && gw.audit.keeps() {
                    ctx = ctx.with_request_audit(AuditEvent {
                        event: AuditKind::Request,
                        granted_by: Some(grant),
                        ..who.clone()
                    });
                }
                gw.proxy.clone().serve_http(io, ctx).await;
                "ok".to_owned()
            }
        };
        let (up, down) = (up.load(Relaxed), down.load(Relaxed));
        gw.metrics.bytes_up_total.fetch_add(up, Relaxed);
        gw.metrics.bytes_down_total.fetch_add(down, Relaxed);
        Metrics::dec(&gw.metrics.streams_open);
        gw.activity.touch(&claims.jti);
        gw.audit.record(AuditEvent {
            event: AuditKind::StreamClosed,
            outcome: Some(outcome),
            bytes_up: Some(up),
            bytes_down: Some(down),
            duration_ms: Some(started.elapsed().as_millis() as u64),
            ..who
        });
    }

    /// A TCP service's stream whose first bytes were a browser's HTTP request: closed
    /// before anything was forwarded; counted, logged and audited.
    fn tcp_browser_refused(&self, user: &str, service: &str, r: &crate::browser::BrowserRefusal) {
        Metrics::inc(&self.gw.metrics.browser_refused_total);
        if !self.gw.audit.allow_refusal(Some(self.peer)) {
            return;
        }
        let msg = r.message(service);
        tracing::warn!(service, reason = %msg, "browser connection to a TCP service refused");
        self.gw.audit.record(AuditEvent {
            user: Some(user.to_owned()),
            service: Some(service.to_owned()),
            outcome: Some("refused".into()),
            reason: Some(msg),
            ..self.event(AuditKind::BrowserRequestRefused)
        });
    }

    /// Refuses a data stream opened before the connection has a session, without reading
    /// it: at most [`PRE_SESSION_STREAMS`] refusals are written at once, further streams
    /// are reset, so a peer that opens thousands of streams announcing large frames costs
    /// a few bytes each.
    pub(super) fn refuse_pre_session_stream(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let gw = &self.gw;
        Metrics::inc(&gw.metrics.streams_refused_total);
        let _ = recv.stop(0u32.into());
        let r = Refusal::new(
            RefusalCode::Unauthenticated,
            "sign in (or resume the session) on the control stream before opening streams",
        );
        if gw.audit.allow_refusal(Some(self.peer)) {
            tracing::info!(code = ?r.code, "stream refused before sign-in");
            gw.audit.record(AuditEvent {
                outcome: Some(code_name(r.code)),
                reason: Some(r.message.clone()),
                ..self.event(AuditKind::StreamRefused)
            });
        }
        let pending = self.pre_session_streams.clone();
        if pending.fetch_add(1, Relaxed) >= PRE_SESSION_STREAMS {
            pending.fetch_sub(1, Relaxed);
            let _ = send.reset(0u32.into());
            return;
        }
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                REFUSAL_WRITE_WAIT,
                write_frame(&mut send, &StreamReply::Refused(r)),
            )
            .await;
            let _ = send.finish();
            pending.fetch_sub(1, Relaxed);
        });
    }

    async fn stream_refused(
        &self,
        send: &mut quinn::SendStream,
        user: Option<&str>,
        service: Option<&str>,
        r: Refusal,
    ) {
        Metrics::inc(&self.gw.metrics.streams_refused_total);
        tracing::info!(user, service, code = ?r.code, reason = %r.message, "stream refused");
        self.gw.audit.record(AuditEvent {
            user: user.map(str::to_owned),
            service: service.map(str::to_owned),
            outcome: Some(code_name(r.code)),
            reason: Some(r.message.clone()),
            ..self.event(AuditKind::StreamRefused)
        });
        let _ = write_frame(send, &StreamReply::Refused(r)).await;
        let _ = send.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> crate::GatewayConfig {
        let text = r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
rp_id = "localhost"
database = "x.db"
[tls]
cert = "c.pem"
key = "k.pem"
[[service]]
name = "api"
kind = "http"
upstream = "http://127.0.0.1:1"
allow = ["alice@example.com"]
"#;
        toml::from_str(text).expect("config")
    }

    fn claims(sub: &str, exp: u64) -> SessionClaims {
        serde_json::from_value(serde_json::json!({
            "iss": "i", "sub": sub, "aud": "a", "iat": 0, "exp": exp, "jti": "j",
            "cnf": {"x5t#S256": "t"}, "epoch": 0
        }))
        .expect("claims")
    }

    #[test]
    fn a_live_session_reaches_a_service_it_is_allowed() {
        let cfg = cfg();
        let c = claims("alice@example.com", 100);
        let (svc, grant) =
            authorize_stream(Some(&c), &[], false, &cfg, "api", 99).expect("allowed");
        assert_eq!((svc.name.as_str(), grant.as_str()), ("api", "user"));
    }

    #[test]
    fn each_refusal_has_its_code() {
        let cfg = cfg();
        let alice = claims("alice@example.com", 100);
        let bob = claims("bob@example.com", 100);
        let code =
            |r: Result<(&crate::config::ServiceConfig, String), Refusal>| r.err().map(|r| r.code);
        assert_eq!(
            code(authorize_stream(None, &[], false, &cfg, "api", 1)),
            Some(RefusalCode::Unauthenticated)
        );
        assert_eq!(
            code(authorize_stream(Some(&alice), &[], false, &cfg, "api", 100)),
            Some(RefusalCode::SessionExpired)
        );
        assert_eq!(
            code(authorize_stream(Some(&alice), &[], true, &cfg, "api", 1)),
            Some(RefusalCode::SessionRevoked)
        );
        assert_eq!(
            code(authorize_stream(
                Some(&alice),
                &[],
                false,
                &cfg,
                "nosuch",
                1
            )),
            Some(RefusalCode::UnknownService)
        );
        assert_eq!(
            code(authorize_stream(Some(&bob), &[], false, &cfg, "api", 1)),
            Some(RefusalCode::Forbidden)
        );
    }
}

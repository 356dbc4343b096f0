//! The control stream: enrolment, sign-in, resume and renewal, with their limits and the
//! relying party and store glue.

use super::*;
use crate::rp::EnrolSource;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

#[derive(Default)]
struct Pending {
    enrol: Option<PendingEnrol>,
    login: Option<PendingLogin>,
    /// The nonce issued for a sign-in with the identity provider on this connection
    /// (single-use: a second code on the same connection is refused).
    idp_nonce: Option<String>,
    /// A user whose key's answer verified but whose last check with the identity provider is
    /// too old: the session waits for [`ClientMsg::IdpRecheck`].
    idp_recheck: Option<(String, KeyUsed)>,
    /// A device enrolment waiting for the user at the provider (the device code never leaves
    /// the gateway).
    device: Option<PendingDevice>,
    /// A delegated grant waiting for the key's answer.
    delegation: Option<super::delegation::PendingDelegation>,
}

/// A device authorization in progress on one connection.
struct PendingDevice {
    device_code: String,
    nonce: String,
    interval: u64,
    expires: std::time::Instant,
    software_ca_pem: Option<String>,
    /// When the provider may next be asked (it answers `slow_down` to eager pollers).
    next_poll: std::time::Instant,
}

impl ConnCtx {
    pub(super) async fn control_loop(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        session: watch::Sender<Option<Arc<SessionClaims>>>,
    ) {
        let mut pending = Pending::default();
        loop {
            let max = if session.borrow().is_some() {
                touchgate_proto::MAX_FRAME_LEN
            } else {
                PRE_SESSION_FRAME_MAX
            };
            let msg = match read_frame_limited::<ClientMsg, _>(&mut recv, max).await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(WireError::Io(_)) => break,
                Err(WireError::Frame(e)) => {
                    let r = Refusal::new(RefusalCode::BadRequest, format!("control stream: {e}"));
                    self.refused(AuditKind::FrameRefused, None, &r);
                    let _ = write_frame(&mut send, &ServerMsg::Error(r)).await;
                    // After a bad length the stream cannot be resynchronised.
                    if matches!(e, touchgate_proto::FrameError::Malformed(_)) {
                        continue;
                    }
                    break;
                }
            };
            let reply = self.handle_control(msg, &mut pending, &session).await;
            if write_frame(&mut send, &reply).await.is_err() {
                break;
            }
        }
        let _ = send.finish();
    }

    async fn handle_control(
        &self,
        msg: ClientMsg,
        pending: &mut Pending,
        session: &watch::Sender<Option<Arc<SessionClaims>>>,
    ) -> ServerMsg {
        let gw = &self.gw;
        if let ClientMsg::EnrollBegin { user, .. }
        | ClientMsg::LoginBegin { user }
        | ClientMsg::DelegateBegin { user, .. } = &msg
            && (user.is_empty() || user.len() > MAX_USER_LEN)
        {
            let r = Refusal::new(
                RefusalCode::BadRequest,
                format!("a user name must have 1 to {MAX_USER_LEN} bytes"),
            );
            self.refused(AuditKind::ChallengeRefused, Some(user), &r);
            return ServerMsg::Error(r);
        }
        match msg {
            ClientMsg::EnrollBegin { user, .. } if !gw.cfg.invite.enabled => {
                let r = Refusal::new(
                    RefusalCode::InvalidInvite,
                    "this gateway takes no invites: enrol by signing in with your organisation (touchgate enroll)",
                );
                self.refused(AuditKind::EnrolRefused, Some(&user), &r);
                ServerMsg::Error(r)
            }
            ClientMsg::IdpBegin => {
                let started = self.idp_begin().await;
                self.idp_started(started, &mut pending.idp_nonce)
            }
            ClientMsg::EnrollWithIdp {
                code,
                code_verifier,
                redirect_uri,
                software_ca_pem,
            } => {
                let nonce = pending.idp_nonce.take();
                match self
                    .enrol_with_idp(nonce, &code, &code_verifier, &redirect_uri, software_ca_pem)
                    .await
                {
                    Ok((options, p)) => self.registration_sent(options, p, &mut pending.enrol),
                    Err(r) => {
                        self.count_failure("");
                        self.refused(AuditKind::IdpRefused, None, &r);
                        ServerMsg::Error(r)
                    }
                }
            }
            ClientMsg::EnrollBegin {
                user,
                invite_code,
                software_ca_pem,
            } => match match self.rate_limit(&user) {
                Ok(()) => {
                    self.enrol_begin(&user, &invite_code, software_ca_pem.as_deref())
                        .await
                }
                Err(r) => Err(r),
            } {
                Ok((options, p)) => {
                    pending.enrol = Some(p);
                    gw.audit.record(AuditEvent {
                        user: Some(untrusted_user(&user)),
                        ..self.event(AuditKind::EnrolChallengeIssued)
                    });
                    ServerMsg::EnrollChallenge {
                        options,
                        origin: gw.rp.origin().to_owned(),
                    }
                }
                Err(r) => {
                    self.refused(AuditKind::EnrolRefused, Some(&user), &r);
                    ServerMsg::Error(r)
                }
            },
            ClientMsg::EnrollFinish { credential } => {
                let Some(p) = pending.enrol.take() else {
                    let r = Refusal::new(
                        RefusalCode::ChallengeExpired,
                        "no enrolment is in progress on this connection (challenges are single-use)",
                    );
                    self.refused(AuditKind::EnrolRefused, None, &r);
                    return ServerMsg::Error(r);
                };
                let user = p.user.clone();
                let kind = match p.source {
                    EnrolSource::Invite(_) => AuditKind::InviteUsed,
                    EnrolSource::Idp(_) => AuditKind::IdpEnrolled,
                };
                match self
                    .enrol_finish(p, credential)
                    .await
                    .inspect_err(|_| self.count_failure(&user))
                {
                    Ok(cred_id) => {
                        Metrics::inc(&gw.metrics.enrolments_total);
                        gw.audit.record(AuditEvent {
                            user: Some(user),
                            outcome: Some("ok".into()),
                            ..self.event(kind)
                        });
                        ServerMsg::Enrolled {
                            credential_id: cred_id,
                        }
                    }
                    Err(r) => {
                        self.refused(AuditKind::EnrolRefused, Some(&user), &r);
                        ServerMsg::Error(r)
                    }
                }
            }
            ClientMsg::LoginBegin { user } => match match self.rate_limit(&user) {
                Ok(()) => self.login_begin(&user).await,
                Err(r) => Err(r),
            } {
                Ok((options, p)) => {
                    pending.login = Some(p);
                    gw.audit.record(AuditEvent {
                        user: Some(untrusted_user(&user)),
                        ..self.event(AuditKind::ChallengeIssued)
                    });
                    ServerMsg::LoginChallenge {
                        options,
                        origin: gw.rp.origin().to_owned(),
                    }
                }
                Err(r) => {
                    self.refused(AuditKind::ChallengeRefused, Some(&user), &r);
                    ServerMsg::Error(r)
                }
            },
            ClientMsg::LoginFinish { credential } => {
                let Some(p) = pending.login.take() else {
                    let r = Refusal::new(
                        RefusalCode::ChallengeExpired,
                        "no sign-in is in progress on this connection: challenges are single-use, \
                         so a replayed assertion is refused",
                    );
                    self.refused(AuditKind::ChallengeRefused, None, &r);
                    return ServerMsg::Error(r);
                };
                let user = p.user.clone();
                match self.login_finish(p, credential).await.inspect_err(|r| {
                    if r.code != RefusalCode::AccountDisabled {
                        self.count_failure(&user);
                    }
                }) {
                    Ok(key) => {
                        gw.audit.record(AuditEvent {
                            user: Some(user.clone()),
                            outcome: Some("ok".into()),
                            ..self
                                .event(AuditKind::ChallengeVerified)
                                .with_key(&gw.rp, &key)
                        });
                        match self.idp_fresh(&user).await {
                            Ok(until) => self.issue_session(&user, until, key, session),
                            Err(r) => {
                                if r.code == RefusalCode::IdpCheckNeeded {
                                    pending.idp_recheck = Some((user.clone(), key));
                                }
                                self.refused(AuditKind::IdpRefused, Some(&user), &r);
                                ServerMsg::Error(r)
                            }
                        }
                    }
                    Err(r) => {
                        self.refused(AuditKind::ChallengeRefused, Some(&user), &r);
                        ServerMsg::Error(r)
                    }
                }
            }
            ClientMsg::EnrollWithDevice { software_ca_pem } => {
                let started = self.device_begin(software_ca_pem).await;
                self.idp_started(started, &mut pending.device)
            }
            ClientMsg::DevicePoll => match self.device_poll(&mut pending.device).await {
                Ok(Some((options, p))) => self.registration_sent(options, p, &mut pending.enrol),
                Ok(None) => ServerMsg::DevicePending {
                    interval: pending.device.as_ref().map_or(5, |d| d.interval),
                },
                Err(r) => {
                    pending.device = None;
                    self.refused(AuditKind::IdpRefused, None, &r);
                    ServerMsg::Error(r)
                }
            },
            ClientMsg::IdpRecheck {
                code,
                code_verifier,
                redirect_uri,
            } => {
                let (signed_in, nonce) = (pending.idp_recheck.take(), pending.idp_nonce.take());
                let (user, key) = signed_in.unzip();
                match self
                    .idp_recheck(user, nonce, &code, &code_verifier, &redirect_uri)
                    .await
                {
                    Ok((user, until)) => match key {
                        Some(key) => self.issue_session(&user, Some(until), key, session),
                        None => ServerMsg::Error(Refusal::new(
                            RefusalCode::Internal,
                            "no sign-in waits for the identity provider on this connection",
                        )),
                    },
                    Err(r) => {
                        self.count_failure("");
                        self.refused(AuditKind::IdpRefused, None, &r);
                        ServerMsg::Error(r)
                    }
                }
            }
            ClientMsg::DelegateBegin { user, grant } => {
                match self.delegate_begin(&user, &grant).await {
                    Ok((options, p)) => {
                        pending.delegation = Some(p);
                        gw.audit.record(AuditEvent {
                            user: Some(untrusted_user(&user)),
                            delegate: Some(crate::browser::untrusted(&grant.label)),
                            ..self.event(AuditKind::ChallengeIssued)
                        });
                        ServerMsg::LoginChallenge {
                            options,
                            origin: gw.rp.origin().to_owned(),
                        }
                    }
                    Err(r) => {
                        self.refused(AuditKind::DelegationRefused, Some(&user), &r);
                        ServerMsg::Error(r)
                    }
                }
            }
            ClientMsg::DelegateFinish { credential } => {
                let Some(p) = pending.delegation.take() else {
                    let r = Refusal::new(
                        RefusalCode::ChallengeExpired,
                        "no delegation is in progress on this connection: challenges are single-use",
                    );
                    self.refused(AuditKind::DelegationRefused, None, &r);
                    return ServerMsg::Error(r);
                };
                match self.delegate_finish(p, credential).await {
                    Ok(reply) => reply,
                    Err((r, user)) => {
                        self.refused(AuditKind::DelegationRefused, user.as_deref(), &r);
                        ServerMsg::Error(r)
                    }
                }
            }
            ClientMsg::ListDelegations => match self.list_delegations(session).await {
                Ok(grants) => ServerMsg::Delegations { grants },
                Err(r) => ServerMsg::Error(r),
            },
            ClientMsg::RevokeDelegation { id } => {
                match self.revoke_own_delegation(session, &id).await {
                    Ok(id) => ServerMsg::DelegationRevoked { id },
                    Err(r) => ServerMsg::Error(r),
                }
            }
            ClientMsg::Resume { token } => match self.resume(&token) {
                Ok(claims) => {
                    Metrics::inc(&gw.metrics.sessions_resumed_total);
                    gw.audit.record(AuditEvent {
                        user: Some(claims.sub.clone()),
                        session: Some(claims.jti.clone()),
                        expires_at: Some(claims.exp),
                        ..self
                            .event(AuditKind::SessionResumed)
                            .with_claims(&gw.rp, &claims)
                    });
                    self.start_session(token, claims, session)
                }
                Err(r) => {
                    self.refused(AuditKind::SessionRefused, None, &r);
                    ServerMsg::Error(r)
                }
            },
        }
    }

    /// Issues a session to `user`, whose key just answered, and starts it on this connection.
    /// It ends at `[session] max_age`, or at `until` if sooner (when the identity provider's
    /// check runs out: a leaver's session does not outlive it).
    fn issue_session(
        &self,
        user: &str,
        until: Option<u64>,
        key: KeyUsed,
        session: &watch::Sender<Option<Arc<SessionClaims>>>,
    ) -> ServerMsg {
        let gw = &self.gw;
        let now = now_secs();
        let exp = (now + gw.cfg.session.max_age.as_secs()).min(until.unwrap_or(u64::MAX));
        let epoch = gw.revocations.epoch(user);
        let (token, claims) =
            match gw
                .signer
                .issue_session_at_epoch(user, &self.thumb, now, exp, epoch, Some(key))
            {
                Ok(t) => t,
                Err(e) => {
                    return ServerMsg::Error(Refusal::new(RefusalCode::Internal, e.to_string()));
                }
            };
        Metrics::inc(&gw.metrics.sessions_issued_total);
        gw.audit.record(AuditEvent {
            user: Some(user.to_owned()),
            session: Some(claims.jti.clone()),
            expires_at: Some(claims.exp),
            ..self
                .event(AuditKind::SessionIssued)
                .with_claims(&gw.rp, &claims)
        });
        self.start_session(token, claims, session)
    }

    /// For a user enrolled through the identity provider: whether its last check is recent
    /// enough (`[oidc] max_age`), and until when it is. Asked only once the key has answered,
    /// so a peer that merely names someone learns nothing.
    pub(super) async fn idp_fresh(&self, user: &str) -> Result<Option<u64>, Refusal> {
        let gw = &self.gw;
        let Some(oidc) = gw.oidc.as_deref() else {
            return Ok(None);
        };
        let u = user.to_owned();
        let Some((_, checked)) = gw.db(move |s| s.idp_state_of(&u)).await? else {
            return Ok(None);
        };
        let max_age = oidc.config().max_age;
        if now_secs().saturating_sub(checked) <= max_age.as_secs() {
            return Ok(Some(checked + max_age.as_secs()));
        }
        Err(Refusal::new(
            RefusalCode::IdpCheckNeeded,
            format!(
                "sign in with {} again: the last check is more than {} old",
                oidc.config().name(),
                humantime::format_duration(max_age)
            ),
        ))
    }

    /// The fresh check with the identity provider a stale sign-in waits for: the same account
    /// (its subject) as enrolled, with this connection's nonce. Records the check and the
    /// groups it brings; returns the user and until when the check holds.
    async fn idp_recheck(
        &self,
        user: Option<String>,
        nonce: Option<String>,
        code: &str,
        code_verifier: &str,
        redirect_uri: &str,
    ) -> Result<(String, u64), Refusal> {
        let gw = &self.gw;
        let max_age = self.oidc()?.config().max_age;
        self.rate_limit("")?;
        let (Some(user), Some(nonce)) = (user, nonce) else {
            return Err(Refusal::new(
                RefusalCode::ChallengeExpired,
                "no sign-in waits for the identity provider on this connection",
            ));
        };
        let id = self
            .idp_identity(&nonce, code, code_verifier, redirect_uri)
            .await?;
        let u = user.clone();
        let stored = gw.db(move |s| s.idp_state_of(&u)).await?;
        if id.user != user || stored.is_none_or(|(sub, _)| sub != id.subject) {
            return Err(Refusal::new(
                RefusalCode::IdpRefused,
                format!(
                    "you signed in with the identity provider as {}, not as {user}",
                    id.user
                ),
            ));
        }
        gw.db(move |s| s.record_idp_check(&id)).await?;
        self.reload_groups(&user).await?;
        Ok((user, now_secs() + max_age.as_secs()))
    }

    fn start_session(
        &self,
        token: String,
        claims: SessionClaims,
        session: &watch::Sender<Option<Arc<SessionClaims>>>,
    ) -> ServerMsg {
        let gw = &self.gw;
        gw.activity.touch(&claims.jti);
        let groups = gw.revocations.groups(&claims.sub);
        let services = gw
            .cfg
            .services
            .iter()
            .filter(|s| s.allows(&claims.sub, &groups))
            .filter(|s| {
                claims
                    .dlg
                    .as_ref()
                    .is_none_or(|d| d.services.contains(&s.name))
            })
            .map(|s| ServiceInfo {
                name: s.name.clone(),
                kind: s.kind,
            })
            .collect();
        let info = SessionInfo {
            token,
            user: claims.sub.clone(),
            expires_at: claims.exp,
            services,
        };
        let claims = Arc::new(claims);
        // The room a signed-in agent needs (see `tls::quic_server_config`).
        self.conn
            .set_max_concurrent_bi_streams(gw.cfg.limits.max_streams_per_connection.into());
        self.conn
            .set_receive_window(touchgate_common::RECEIVE_WINDOW.into());
        gw.revocations
            .add(self.id, claims.clone(), self.conn.clone());
        session.send_replace(Some(claims));
        ServerMsg::Session(info)
    }

    /// Sign-in and enrolment attempts per source address, and failed ones per user and
    /// source address. Only failures count against a user, and only from the address they
    /// came from: a peer elsewhere that asks for challenges in someone's name, or sends
    /// garbage answers, cannot lock that person out.
    pub(super) fn rate_limit(&self, user: &str) -> Result<(), Refusal> {
        let gw = &self.gw;
        let per = gw.cfg.limits.signin_attempts_per_minute;
        let ip = self.peer.ip();
        let who = if !gw.limiter.attempt(ip, per) {
            format!("sign-in attempts from {ip}")
        } else if gw.limiter.failures_reached(user, ip, per) {
            format!("failed sign-ins for {} from {ip}", untrusted_user(user))
        } else {
            return Ok(());
        };
        Err(Refusal::new(
            RefusalCode::RateLimited,
            format!("too many {who} (more than {per} a minute): wait a minute and try again"),
        ))
    }

    /// Counts a failed enrolment or sign-in against the user from this source address.
    pub(super) fn count_failure(&self, user: &str) {
        self.gw.limiter.failure(user, self.peer.ip());
    }

    async fn enrol_begin(
        &self,
        user: &str,
        code: &str,
        software_ca_pem: Option<&str>,
    ) -> Result<(serde_json::Value, PendingEnrol), Refusal> {
        let gw = &self.gw;
        let (u, c) = (user.to_owned(), code.to_owned());
        invite_ok(gw.db(move |s| s.check_invite(&u, &c)).await?)?;
        self.registration(user, EnrolSource::Invite(code.to_owned()), software_ca_pem)
            .await
    }

    /// The registration challenge for `user` (made if new), entitled by `source`; their keys
    /// already enrolled are excluded.
    async fn registration(
        &self,
        user: &str,
        source: EnrolSource,
        software_ca_pem: Option<&str>,
    ) -> Result<(serde_json::Value, PendingEnrol), Refusal> {
        let gw = &self.gw;
        let u = user.to_owned();
        let user_id = gw.db(move |s| s.ensure_user(&u)).await?;
        let u = user.to_owned();
        let existing = gw
            .db(move |s| s.credentials(&u))
            .await?
            .iter()
            .filter_map(|c| base64_decode(&c.cred_id))
            .collect();
        let (ccr, p) = gw
            .rp
            .begin_enrol(user, user_id, source, existing, software_ca_pem)?;
        let v = serde_json::to_value(&ccr)
            .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))?;
        Ok((v, p))
    }

    async fn enrol_finish(
        &self,
        p: PendingEnrol,
        credential: serde_json::Value,
    ) -> Result<String, Refusal> {
        let gw = &self.gw;
        let user = p.user.clone();
        let source = p.source.clone();
        let enrolled = gw.rp.finish_enrol(p, credential, &self.binding)?;
        let key_json = serde_json::to_string(&enrolled.key)
            .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))?;
        let cred = StoredCredential {
            cred_id: enrolled.cred_id.clone(),
            user,
            key_json,
            aaguid: enrolled.aaguid.to_string(),
        };
        match source {
            EnrolSource::Invite(code) => invite_ok(gw.db(move |s| s.enrol(&code, &cred)).await?)?,
            EnrolSource::Idp(id) => {
                let user = id.user.clone();
                idp_ok(gw.db(move |s| s.enrol_via_idp(&id, &cred)).await?)?;
                self.reload_groups(&user).await?;
            }
        }
        Ok(enrolled.cred_id)
    }

    /// Where to send the browser, with a nonce made for this connection.
    async fn idp_begin(&self) -> Result<(ServerMsg, String), Refusal> {
        let oidc = self.oidc()?;
        // Each start holds the connection up to IDP_SIGNIN_DEADLINE: counted as an attempt.
        self.rate_limit("")?;
        let p = oidc.provider().await.map_err(idp_refusal)?;
        let nonce = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let cfg = oidc.config();
        Ok((
            ServerMsg::IdpStart {
                name: cfg.name(),
                authorization_endpoint: p.authorization_endpoint,
                client_id: cfg.client_id.clone(),
                scopes: cfg.scopes.clone(),
                nonce: nonce.clone(),
            },
            nonce,
        ))
    }

    /// Redeems the browser's code, checks the ID token against this connection's nonce and
    /// the gateway's rules, and starts the registration for the identity it names.
    async fn enrol_with_idp(
        &self,
        nonce: Option<String>,
        code: &str,
        code_verifier: &str,
        redirect_uri: &str,
        software_ca_pem: Option<String>,
    ) -> Result<(serde_json::Value, PendingEnrol), Refusal> {
        self.oidc()?;
        self.rate_limit("")?;
        let nonce = nonce.ok_or_else(|| {
            Refusal::new(
                RefusalCode::ChallengeExpired,
                "no sign-in with the identity provider is in progress on this connection (each one is single-use)",
            )
        })?;
        let id = self
            .idp_identity(&nonce, code, code_verifier, redirect_uri)
            .await?;
        self.idp_registration(id, software_ca_pem).await
    }

    /// The registration challenge for the identity the provider vouched for, unless that
    /// user is disabled or known under another subject.
    async fn idp_registration(
        &self,
        id: crate::oidc::Identity,
        software_ca_pem: Option<String>,
    ) -> Result<(serde_json::Value, PendingEnrol), Refusal> {
        let check = id.clone();
        idp_ok(self.gw.db(move |s| s.check_idp_identity(&check)).await?)?;
        // The provider's word enrols a first key only: someone who phished a sign-in (a device
        // code, a pasted callback) must not add their key to an account that has one.
        let u = id.user.clone();
        if !self.gw.db(move |s| s.credentials(&u)).await?.is_empty() {
            return Err(Refusal::new(
                RefusalCode::IdpRefused,
                format!(
                    "{} already has a security key: signing in with the organisation enrols a first key only; \
                     to add another (or replace a lost one) ask your admin for an invite",
                    id.user
                ),
            ));
        }
        let user = id.user.clone();
        self.registration(&user, EnrolSource::Idp(id), software_ca_pem.as_deref())
            .await
    }

    /// The audit line of an identity the provider vouched for, with its groups.
    fn audit_verified(&self, id: &crate::oidc::Identity) {
        self.gw.audit.record(AuditEvent {
            user: Some(id.user.clone()),
            outcome: Some(format!("groups: {}", id.groups.join(", "))),
            ..self.event(AuditKind::IdpVerified)
        });
    }

    /// Takes `user`'s groups from the store now (after a check with the identity provider), so
    /// the session that follows need not wait for the next reload.
    async fn reload_groups(&self, user: &str) -> Result<(), Refusal> {
        let source = self.gw.cfg.group_source();
        let mut all = self.gw.db(move |s| s.user_groups(source)).await?;
        let groups = all.remove(user).unwrap_or_default();
        self.gw.revocations.set_user_groups(user, groups);
        Ok(())
    }

    /// Sends the registration challenge of an identity-provider enrolment, kept in `slot`.
    fn registration_sent(
        &self,
        options: serde_json::Value,
        p: PendingEnrol,
        slot: &mut Option<PendingEnrol>,
    ) -> ServerMsg {
        self.gw.audit.record(AuditEvent {
            user: Some(p.user.clone()),
            ..self.event(AuditKind::EnrolChallengeIssued)
        });
        *slot = Some(p);
        ServerMsg::EnrollChallenge {
            options,
            origin: self.gw.rp.origin().to_owned(),
        }
    }

    /// A step with the identity provider has started (or was refused): what it must remember
    /// goes into `slot`, and the connection may now wait longer for its sign-in.
    fn idp_started<T>(
        &self,
        started: Result<(ServerMsg, T), Refusal>,
        slot: &mut Option<T>,
    ) -> ServerMsg {
        match started {
            Ok((reply, kept)) => {
                self.idp_step.store(true, Relaxed);
                *slot = Some(kept);
                reply
            }
            Err(r) => {
                self.refused(AuditKind::IdpRefused, None, &r);
                ServerMsg::Error(r)
            }
        }
    }

    /// Starts a device enrolment at the provider.
    async fn device_begin(
        &self,
        software_ca_pem: Option<String>,
    ) -> Result<(ServerMsg, PendingDevice), Refusal> {
        let oidc = self.oidc()?;
        if !oidc.config().device_flow {
            return Err(Refusal::new(
                RefusalCode::IdpRefused,
                "this gateway does not enrol with a code entered on another device ([oidc] device_flow): enrol on a machine with a browser",
            ));
        }
        self.rate_limit("")?;
        let nonce = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let d = oidc.device_begin(&nonce).await.map_err(idp_refusal)?;
        let interval = d.interval.unwrap_or(5).clamp(1, 60);
        let now = std::time::Instant::now();
        let expires_in = d.expires_in.min(3600);
        Ok((
            ServerMsg::DeviceCode {
                name: oidc.config().name(),
                verification_uri: d.verification_uri,
                verification_uri_complete: d.verification_uri_complete,
                user_code: d.user_code,
                expires_in,
                interval,
            },
            PendingDevice {
                device_code: d.device_code,
                nonce,
                interval,
                expires: now + Duration::from_secs(expires_in),
                software_ca_pem,
                next_poll: now,
            },
        ))
    }

    /// Asks the provider whether the user finished; when they have, checks the ID token and
    /// starts the registration. An agent polling faster than the interval is told to wait,
    /// without the provider being asked.
    async fn device_poll(
        &self,
        device: &mut Option<PendingDevice>,
    ) -> Result<Option<(serde_json::Value, PendingEnrol)>, Refusal> {
        let oidc = self.oidc()?;
        let Some(d) = device.as_mut() else {
            return Err(Refusal::new(
                RefusalCode::ChallengeExpired,
                "no device enrolment is in progress on this connection",
            ));
        };
        let now = std::time::Instant::now();
        if now >= d.expires {
            return Err(Refusal::new(
                RefusalCode::ChallengeExpired,
                "the code expired before the sign-in finished: start again",
            ));
        }
        if now < d.next_poll {
            return Ok(None);
        }
        let token = match oidc
            .device_poll(&d.device_code)
            .await
            .map_err(idp_refusal)?
        {
            crate::oidc::TokenAnswer::IdToken(t) => t,
            answer => {
                if answer == crate::oidc::TokenAnswer::SlowDown {
                    d.interval = (d.interval + 5).min(60);
                }
                d.next_poll = now + Duration::from_secs(d.interval);
                return Ok(None);
            }
        };
        let Some(d) = device.take() else {
            return Ok(None);
        };
        let id = oidc
            .verify_device(&token, &d.nonce)
            .await
            .map_err(idp_refusal)?;
        self.audit_verified(&id);
        self.idp_registration(id, d.software_ca_pem).await.map(Some)
    }

    /// Redeems the browser's code and checks the ID token against this connection's `nonce`;
    /// audits who the provider vouched for.
    async fn idp_identity(
        &self,
        nonce: &str,
        code: &str,
        code_verifier: &str,
        redirect_uri: &str,
    ) -> Result<crate::oidc::Identity, Refusal> {
        let oidc = self.oidc()?;
        check_loopback_redirect(redirect_uri)?;
        let token = oidc
            .redeem(code, code_verifier, redirect_uri)
            .await
            .map_err(idp_refusal)?;
        let id = oidc.verify(&token, nonce).await.map_err(idp_refusal)?;
        self.audit_verified(&id);
        Ok(id)
    }

    fn oidc(&self) -> Result<&crate::oidc::Oidc, Refusal> {
        self.gw.oidc.as_deref().ok_or_else(|| {
            Refusal::new(
                RefusalCode::NoIdentityProvider,
                "this gateway does not enrol through an identity provider: ask your admin for an invite",
            )
        })
    }

    /// A sign-in challenge. A user with no key (unknown, or removed) gets a challenge that
    /// looks the same, for a credential that does not exist (its id derived from a gateway
    /// secret, so it is stable per name): a peer cannot tell who is enrolled, and the
    /// answer fails as a wrong key's would.
    pub(super) async fn login_begin(
        &self,
        user: &str,
    ) -> Result<(serde_json::Value, PendingLogin), Refusal> {
        let gw = &self.gw;
        let u = user.to_owned();
        let keys = load_keys(&gw.db(move |s| s.credentials(&u)).await?)?;
        let (rcr, p) = if keys.is_empty() {
            gw.rp.begin_decoy_login(user, &gw.reset_key)?
        } else {
            gw.rp.begin_login(user, &keys)?
        };
        let v = serde_json::to_value(&rcr)
            .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))?;
        Ok((v, p))
    }

    async fn login_finish(
        &self,
        p: PendingLogin,
        credential: serde_json::Value,
    ) -> Result<KeyUsed, Refusal> {
        self.login_finish_bound(p, credential, &self.binding.clone())
            .await
    }

    /// Verifies a sign-in assertion that must carry `binding` (this connection's exporter, or
    /// a delegation's binding over it), advances the key's counter, and says which key it was.
    pub(super) async fn login_finish_bound(
        &self,
        p: PendingLogin,
        credential: serde_json::Value,
        binding: &[u8],
    ) -> Result<KeyUsed, Refusal> {
        let gw = &self.gw;
        let user = p.user.clone();
        let result = gw.rp.finish_login(p, credential, binding)?;
        // Persist the new counter before the session exists, so a clone cannot race it.
        let u = user.clone();
        let stored = gw.db(move |s| s.credentials(&u)).await?;
        let mut updated: Option<(String, String, String)> = None;
        for c in &stored {
            let mut key: webauthn_rs::prelude::SecurityKey = serde_json::from_str(&c.key_json)
                .map_err(|e| {
                    Refusal::new(
                        RefusalCode::Internal,
                        format!("stored credential unreadable: {e}"),
                    )
                })?;
            if key.update_credential(&result).is_some() {
                let json = serde_json::to_string(&key)
                    .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))?;
                updated = Some((c.cred_id.clone(), json, c.aaguid.clone()));
            }
        }
        let Some((cred_id, json, aaguid)) = updated else {
            return Err(Refusal::new(
                RefusalCode::VerificationFailed,
                "the assertion's credential is not enrolled for this user",
            ));
        };
        // Told only to someone who just proved they hold the key: a disabled account is not
        // revealed to a peer that merely names it.
        let (u, id, counter) = (user.clone(), cred_id.clone(), result.counter());
        if !gw
            .db(move |s| s.advance_credential(&id, &json, counter))
            .await?
        {
            return Err(Refusal::new(
                RefusalCode::CounterNotRising,
                "the key's signature counter did not rise: another sign-in with this credential \
                 got there first, so it may have been cloned, and this one is refused — contact your admin",
            ));
        }
        if gw.db(move |s| s.is_disabled(&u)).await? {
            return Err(disabled_refusal());
        }
        let key = KeyUsed {
            cred: cred_id.clone(),
            aaguid,
        };
        let (u, id) = (user.clone(), cred_id);
        let recorded = gw.store.clone();
        tokio::task::spawn_blocking(move || recorded.record_sign_in(&u, &id, now_secs()))
            .await
            .map_err(|e| Refusal::new(RefusalCode::Internal, e.to_string()))?
            .map_err(|e| {
                tracing::warn!(error = %e, "the credential was removed during the sign-in");
                Refusal::new(
                    RefusalCode::NotEnrolled,
                    "this key was removed from your account during the sign-in: ask your admin",
                )
            })?;
        Ok(key)
    }

    fn resume(&self, token: &str) -> Result<SessionClaims, Refusal> {
        let gw = &self.gw;
        let claims = gw
            .signer
            .verify_session(token, &self.thumb)
            .map_err(|e| match e {
                TokenError::Expired => Refusal::new(
                    RefusalCode::SessionExpired,
                    "your session has expired: touch your key to sign in again",
                ),
                TokenError::WrongKey => Refusal::new(
                    RefusalCode::WrongSessionKey,
                    "this session token belongs to another session key: a token is valid only from \
                 the agent that signed in",
                ),
                TokenError::Invalid(why) => Refusal::new(
                    RefusalCode::InvalidToken,
                    format!("the session token is not valid ({why}): sign in again"),
                ),
            })?;
        if gw.revocations.disabled(&claims.sub) {
            return Err(disabled_refusal());
        }
        if let Some(d) = &claims.dlg {
            if gw.revocations.delegation_revoked(&d.id) {
                return Err(Refusal::new(
                    RefusalCode::SessionRevoked,
                    "this delegated grant was revoked: ask its owner for a new one",
                ));
            }
            if !gw.cfg.delegation.enabled {
                return Err(Refusal::new(
                    RefusalCode::DelegationRefused,
                    "this gateway no longer allows delegated access ([delegation] enabled = false)",
                ));
            }
        }
        if gw.revocations.revoked(&claims) {
            return Err(revoked_refusal());
        }
        // A grant lasts until its expiry, however long its delegate is away.
        if let Some(idle) = gw
            .activity
            .idle_for(&claims.jti)
            .filter(|_| claims.dlg.is_none())
            && idle > gw.cfg.session.idle_timeout
        {
            return Err(Refusal::new(
                RefusalCode::SessionExpired,
                format!(
                    "your session ended after {} without a connection: touch your key to sign in again",
                    humantime::format_duration(Duration::from_secs(idle.as_secs()))
                ),
            ));
        }
        Ok(claims)
    }
}

fn idp_ok(r: Result<(), crate::store::IdpProblem>) -> Result<(), Refusal> {
    r.map_err(|p| match p {
        crate::store::IdpProblem::UserDisabled => disabled_refusal(),
        p => Refusal::new(RefusalCode::IdpRefused, p.to_string()),
    })
}

fn idp_refusal(e: crate::oidc::OidcError) -> Refusal {
    Refusal::new(RefusalCode::IdpRefused, e.to_string())
}

/// The browser comes back to the agent on this machine: `http://127.0.0.1:PORT/…` (RFC 8252
/// §7.3). Anything else would send the code elsewhere.
fn check_loopback_redirect(uri: &str) -> Result<(), Refusal> {
    let ok = url::Url::parse(uri).is_ok_and(|u| {
        u.scheme() == "http"
            && matches!(u.host(), Some(url::Host::Ipv4(ip)) if ip.is_loopback())
            && u.port().is_some()
    });
    if ok {
        Ok(())
    } else {
        Err(Refusal::new(
            RefusalCode::BadRequest,
            "the redirect URI must be the agent's loopback address (http://127.0.0.1:PORT/…)",
        ))
    }
}

fn invite_ok(r: Result<(), crate::store::InviteProblem>) -> Result<(), Refusal> {
    r.map_err(|p| match p {
        crate::store::InviteProblem::UserDisabled => disabled_refusal(),
        p => Refusal::new(
            RefusalCode::InvalidInvite,
            format!("{p}: ask your admin for a new invite (touchgate-gateway invite USER)"),
        ),
    })
}

pub(super) fn db_refusal(e: crate::store::StoreError) -> Refusal {
    tracing::error!(error = %e, "store failure");
    if let crate::store::StoreError::Unreachable(_) = e {
        // Sessions already open need no database: only sign-ins and enrolments wait for it.
        return Refusal::new(
            RefusalCode::Internal,
            "the gateway cannot reach its database: signing in fails until it is back (open \
             sessions keep working); try again in a moment",
        );
    }
    Refusal::new(
        RefusalCode::Internal,
        "the gateway's database failed; try again later",
    )
}

fn load_keys(
    creds: &[StoredCredential],
) -> Result<Vec<webauthn_rs::prelude::SecurityKey>, Refusal> {
    creds
        .iter()
        .map(|c| {
            serde_json::from_str(&c.key_json).map_err(|e| {
                Refusal::new(
                    RefusalCode::Internal,
                    format!("stored credential unreadable: {e}"),
                )
            })
        })
        .collect()
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
}

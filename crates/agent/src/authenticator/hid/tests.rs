//! The HID authenticator's decisions, with fake devices: UV and PIN choice, PIN retries and
//! blocking, timeout and cancel, and key selection.

use std::sync::{Arc, Mutex, mpsc};

use super::*;

fn info(product: &str, client_pin: Option<bool>, builtin_uv: bool) -> KeyInfo {
    KeyInfo {
        product: product.into(),
        path: format!("/dev/hidraw-{product}"),
        aaguid: "ee882879-721c-4913-9775-3dfcce97072a".into(),
        client_pin,
        builtin_uv,
        always_uv: false,
        pin_protocol_2: true,
        pin_retries: client_pin.filter(|p| *p).map(|_| 8),
    }
}

/// A key that checks its PIN, holds some credentials, and can be told to wait for a touch
/// that never comes (until cancelled).
struct FakeKey {
    info: Mutex<KeyInfo>,
    pin: Option<String>,
    creds: Vec<Vec<u8>>,
    wait_for_touch: bool,
    cancel_tx: Mutex<Option<mpsc::Sender<()>>>,
    calls: Mutex<Vec<(UvMethod, Option<String>, bool)>>,
}

impl FakeKey {
    fn new(info: KeyInfo, pin: Option<&str>, creds: Vec<Vec<u8>>) -> Arc<Self> {
        Arc::new(Self {
            info: Mutex::new(info),
            pin: pin.map(str::to_owned),
            creds,
            wait_for_touch: false,
            cancel_tx: Mutex::new(None),
            calls: Mutex::new(Vec::new()),
        })
    }

    fn stuck(info: KeyInfo) -> Arc<Self> {
        Arc::new(Self {
            info: Mutex::new(info),
            pin: None,
            creds: vec![b"cred".to_vec()],
            wait_for_touch: true,
            cancel_tx: Mutex::new(None),
            calls: Mutex::new(Vec::new()),
        })
    }

    fn check(&self, uv: UvMethod, pin: Option<&str>, up: bool) -> Result<(), DeviceError> {
        self.calls
            .lock()
            .expect("lock")
            .push((uv, pin.map(str::to_owned), up));
        if uv == UvMethod::Pin {
            let mut info = self.info.lock().expect("lock");
            if info.pin_retries == Some(0) {
                return Err(DeviceError::PinBlocked);
            }
            if pin != self.pin.as_deref() {
                info.pin_retries = info.pin_retries.map(|r| r - 1);
                return Err(DeviceError::PinInvalid);
            }
        }
        if self.wait_for_touch && up {
            let (tx, rx) = mpsc::channel();
            *self.cancel_tx.lock().expect("lock") = Some(tx);
            // Blocks like a key blinking for a touch, until CTAPHID_CANCEL arrives.
            let _ = rx.recv();
            return Err(DeviceError::Cancelled);
        }
        Ok(())
    }
}

impl FidoDevice for FakeKey {
    fn info(&self) -> Result<KeyInfo, DeviceError> {
        Ok(self.info.lock().expect("lock").clone())
    }

    fn make_credential(
        &self,
        req: &MakeCredential<'_>,
    ) -> Result<super::super::device::Attested, DeviceError> {
        self.check(req.uv, req.pin, true)?;
        Ok(super::super::device::Attested {
            fmt: "none".into(),
            auth_data: vec![0; 37],
            alg: -7,
            sig: vec![],
            x5c: vec![],
            credential_id: b"new".to_vec(),
        })
    }

    fn get_assertion(&self, req: &GetAssertion<'_>) -> Result<Asserted, DeviceError> {
        if !req.allow.iter().any(|a| self.creds.contains(a)) {
            return Err(DeviceError::NoCredentials);
        }
        self.check(req.uv, req.pin, req.up)?;
        Ok(Asserted {
            auth_data: vec![1; 37],
            signature: b"sig".to_vec(),
            credential_id: vec![],
        })
    }

    fn cancel(&self) {
        if let Some(tx) = self.cancel_tx.lock().expect("lock").take() {
            let _ = tx.send(());
        }
    }

    fn present(&self) -> bool {
        true
    }
}

/// Hands out PINs from a list and records what it was asked.
#[derive(Default)]
struct ScriptedPrompter {
    pins: Mutex<Vec<&'static str>>,
    asked: Mutex<Vec<Option<i32>>>,
    touches: Mutex<usize>,
}

impl Prompter for ScriptedPrompter {
    fn touch(&self, _key: &str) {
        *self.touches.lock().expect("lock") += 1;
    }
    fn pin(&self, _key: &str, retries: Option<i32>) -> Option<SecretString> {
        self.asked.lock().expect("lock").push(retries);
        let mut pins = self.pins.lock().expect("lock");
        (!pins.is_empty()).then(|| SecretString::from(pins.remove(0)))
    }
}

fn request(policy: UserVerificationPolicy, allow: &[&[u8]]) -> PublicKeyCredentialRequestOptions {
    serde_json::from_value(serde_json::json!({
        "challenge": "AAAA",
        "rpId": "gw.test",
        "allowCredentials": allow.iter().map(|a| serde_json::json!({"type": "public-key", "id": URL_SAFE_NO_PAD.encode(a)})).collect::<Vec<_>>(),
        "userVerification": policy,
    }))
    .expect("request options")
}

fn authn(
    devices: Vec<Arc<dyn FidoDevice>>,
    prompter: Arc<dyn Prompter>,
    timeout: Duration,
) -> HidAuthenticator {
    HidAuthenticator::new(devices, None, prompter, timeout).expect("devices")
}

#[test]
fn uv_decision_follows_policy_and_get_info() {
    use UserVerificationPolicy::*;
    let pin_key = info("pin", Some(true), false);
    let bio_key = info("bio", Some(true), true);
    let no_pin_yet = info("fresh", Some(false), false);
    let u2f_only = info("old", None, false);
    let cases: [(UserVerificationPolicy, &KeyInfo, Result<UvMethod, ()>); 7] = [
        (Required, &bio_key, Ok(UvMethod::BuiltIn)),
        (Required, &pin_key, Ok(UvMethod::Pin)),
        (Preferred, &bio_key, Ok(UvMethod::BuiltIn)),
        (Preferred, &pin_key, Ok(UvMethod::Pin)),
        (Preferred, &no_pin_yet, Ok(UvMethod::None)),
        (Discouraged_DO_NOT_USE, &pin_key, Ok(UvMethod::None)),
        (Discouraged_DO_NOT_USE, &bio_key, Ok(UvMethod::None)),
    ];
    for (policy, key, want) in cases {
        assert_eq!(
            decide_uv(&policy, key).ok(),
            want.ok(),
            "{policy:?} with {}",
            key.product
        );
    }
    assert!(matches!(
        decide_uv(&Required, &no_pin_yet),
        Err(AuthnError::PinNotSet)
    ));
    assert!(matches!(
        decide_uv(&Required, &u2f_only),
        Err(AuthnError::UvUnsupported)
    ));
    let mut always = info("always", Some(true), false);
    always.always_uv = true;
    assert_eq!(
        decide_uv(&Discouraged_DO_NOT_USE, &always).ok(),
        Some(UvMethod::Pin)
    );
}

#[test]
fn wrong_pin_is_retried_with_the_retries_left_then_succeeds() {
    let key = FakeKey::new(
        info("YubiKey 5", Some(true), false),
        Some("123456"),
        vec![b"c".to_vec()],
    );
    let prompter = Arc::new(ScriptedPrompter::default());
    prompter
        .pins
        .lock()
        .expect("lock")
        .extend(["000000", "123456"]);
    let mut a = authn(vec![key.clone()], prompter.clone(), Duration::from_secs(5));
    a.authenticate(&request(UserVerificationPolicy::Required, &[b"c"]), b"{}")
        .expect("second PIN works");
    assert_eq!(
        *prompter.asked.lock().expect("lock"),
        vec![Some(8), Some(7)]
    );
    let calls = key.calls.lock().expect("lock");
    assert_eq!(calls.last().map(|c| c.1.as_deref()), Some(Some("123456")));
}

#[test]
fn wrong_pins_end_with_retries_left_in_the_message() {
    let key = FakeKey::new(
        info("YubiKey 5", Some(true), false),
        Some("123456"),
        vec![b"c".to_vec()],
    );
    let prompter = Arc::new(ScriptedPrompter::default());
    prompter.pins.lock().expect("lock").extend(["1", "2", "3"]);
    let mut a = authn(vec![key], prompter, Duration::from_secs(5));
    let err = a
        .authenticate(&request(UserVerificationPolicy::Required, &[b"c"]), b"{}")
        .expect_err("3 wrong");
    assert!(
        matches!(err, AuthnError::PinWrong { retries: Some(5) }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "wrong PIN: 5 tries left before the key blocks its PIN"
    );
}

#[test]
fn blocked_pin_says_how_to_reset() {
    let mut i = info("YubiKey 5", Some(true), false);
    i.pin_retries = Some(0);
    let key = FakeKey::new(i, Some("123456"), vec![b"c".to_vec()]);
    let prompter = Arc::new(ScriptedPrompter::default());
    let mut a = authn(vec![key], prompter.clone(), Duration::from_secs(5));
    let err = a
        .authenticate(&request(UserVerificationPolicy::Required, &[b"c"]), b"{}")
        .expect_err("blocked");
    assert!(matches!(err, AuthnError::PinBlocked));
    assert!(err.to_string().contains("reset the key"), "{err}");
    assert!(
        prompter.asked.lock().expect("lock").is_empty(),
        "no PIN is asked for a blocked key"
    );
}

#[test]
fn cancelled_pin_prompt_cancels_the_operation() {
    let key = FakeKey::new(
        info("YubiKey 5", Some(true), false),
        Some("123456"),
        vec![b"c".to_vec()],
    );
    let mut a = authn(
        vec![key.clone()],
        Arc::new(ScriptedPrompter::default()),
        Duration::from_secs(5),
    );
    let err = a
        .authenticate(&request(UserVerificationPolicy::Required, &[b"c"]), b"{}")
        .expect_err("cancel");
    assert!(matches!(err, AuthnError::Cancelled));
    assert!(
        key.calls.lock().expect("lock").is_empty(),
        "the key was not asked"
    );
}

#[test]
fn no_touch_times_out_by_cancelling_the_key() {
    let key = FakeKey::stuck(info("Solo", Some(false), false));
    let prompter = Arc::new(ScriptedPrompter::default());
    let mut a = authn(vec![key], prompter.clone(), Duration::from_millis(50));
    let err = a
        .authenticate(
            &request(UserVerificationPolicy::Preferred, &[b"cred"]),
            b"{}",
        )
        .expect_err("timeout");
    assert!(matches!(err, AuthnError::Timeout(_)), "{err:?}");
    assert!(err.to_string().starts_with("no touch within"));
    assert_eq!(
        *prompter.touches.lock().expect("lock"),
        1,
        "the user was asked to touch"
    );
}

#[test]
fn with_several_keys_sign_in_uses_the_one_holding_the_credential() {
    let other = FakeKey::new(
        info("Feitian", Some(false), false),
        None,
        vec![b"someone-else".to_vec()],
    );
    let mine = FakeKey::new(
        info("YubiKey 5", Some(false), false),
        None,
        vec![b"mine".to_vec()],
    );
    let mut a = authn(
        vec![other.clone(), mine.clone()],
        Arc::new(ScriptedPrompter::default()),
        Duration::from_secs(5),
    );
    a.authenticate(
        &request(UserVerificationPolicy::Preferred, &[b"mine"]),
        b"{}",
    )
    .expect("signs");
    assert_eq!(a.chosen().map(|i| i.product.as_str()), Some("YubiKey 5"));
    // The silent probe asks for no touch; only the chosen key got the real request.
    assert!(mine.calls.lock().expect("lock").iter().any(|c| c.2));
    assert!(other.calls.lock().expect("lock").is_empty());
}

#[test]
fn with_several_keys_enrolment_asks_to_choose() {
    let a1 = FakeKey::new(info("A", Some(false), false), None, vec![]);
    let b1 = FakeKey::new(info("B", Some(false), false), None, vec![]);
    let mut a = authn(
        vec![a1.clone(), b1.clone()],
        Arc::new(NoPrompt),
        Duration::from_secs(5),
    );
    let opts: PublicKeyCredentialCreationOptions = serde_json::from_value(serde_json::json!({
        "rp": {"id": "gw.test", "name": "gw"},
        "user": {"id": "AAAA", "name": "a", "displayName": "a"},
        "challenge": "AAAA",
        "pubKeyCredParams": [{"type": "public-key", "alg": -7}],
    }))
    .expect("creation options");
    assert!(matches!(
        a.register(&opts, b"{}"),
        Err(AuthnError::SeveralDevices)
    ));
    let mut chosen = HidAuthenticator::new(
        vec![a1, b1],
        Some("B".into()),
        Arc::new(NoPrompt),
        Duration::from_secs(5),
    )
    .expect("devices");
    chosen.register(&opts, b"{}").expect("device = B picks one");
    assert_eq!(chosen.chosen().map(|i| i.product.as_str()), Some("B"));
}

#[test]
fn no_keys_is_a_clear_error() {
    let err = HidAuthenticator::new(vec![], None, Arc::new(NoPrompt), Duration::from_secs(1))
        .err()
        .expect("none");
    assert_eq!(
        err.to_string(),
        "no security key found: plug one in and try again"
    );
}

#[test]
fn attestation_object_has_the_webauthn_shape() {
    let obj =
        attestation_object("packed", -7, b"sig", &[b"cert".to_vec()], b"authdata").expect("encode");
    let v: Value = ciborium::from_reader(obj.as_slice()).expect("cbor");
    let m = v.as_map().expect("map");
    let get = |k: &str| {
        m.iter()
            .find(|(key, _)| key.as_text() == Some(k))
            .map(|(_, v)| v)
    };
    assert_eq!(get("fmt").and_then(|v| v.as_text()), Some("packed"));
    assert_eq!(
        get("authData")
            .and_then(|v| v.as_bytes())
            .map(|b| b.as_slice()),
        Some(&b"authdata"[..])
    );
    assert_eq!(
        get("attStmt").and_then(|v| v.as_map()).map(|m| m.len()),
        Some(3)
    );
}

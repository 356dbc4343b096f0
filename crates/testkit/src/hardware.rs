//! A fake hardware security key: a [`FidoDevice`] that makes real `packed` attestations under
//! a test vendor CA, with an AAGUID of the test's choosing, and real ES256 assertions. It lets
//! the tests drive the production HID path (UV decision, prompts, attestation-object encoding)
//! against the real relying party and its attestation policy. Only raw USB stays untested.

use std::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicU32, Ordering::Relaxed},
};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SigningKey,
};
use sha2::{Digest, Sha256};
use touchgate_agent::authenticator::device::{
    Asserted, Attested, DeviceError, FidoDevice, GetAssertion, KeyInfo, MakeCredential, UvMethod,
};

/// A vendor: a CA that signs attestation certificates for its models.
pub struct Vendor {
    ca_key: KeyPair,
    ca_params: CertificateParams,
    ca: rcgen::Certificate,
}

impl Vendor {
    /// A new test vendor CA.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, name);
        dn.push(DnType::CommonName, format!("{name} Test FIDO Root CA"));
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = p.self_signed(&ca_key)?;
        Ok(Self {
            ca_key,
            ca_params: p,
            ca,
        })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A key of model `aaguid` made by this vendor.
    pub fn make_key(
        &self,
        product: &str,
        aaguid: [u8; 16],
        pin: Option<&str>,
    ) -> anyhow::Result<FakeHardwareKey> {
        let att_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, "SE");
        dn.push(DnType::OrganizationName, "Test Vendor AB");
        dn.push(DnType::OrganizationalUnitName, "Authenticator Attestation");
        dn.push(DnType::CommonName, format!("{product} attestation"));
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        // id-fido-gen-ce-aaguid: an OCTET STRING holding the 16-byte AAGUID.
        let mut ext = vec![0x04, 0x10];
        ext.extend_from_slice(&aaguid);
        p.custom_extensions = vec![CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 45724, 1, 1, 4],
            ext,
        )];
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let att_cert = p.signed_by(&att_key, &issuer)?;
        Ok(FakeHardwareKey {
            product: product.into(),
            aaguid,
            pin: pin.map(str::to_owned),
            att_key,
            att_der: att_cert.der().to_vec(),
            creds: Mutex::new(Vec::new()),
            counter: AtomicU32::new(0),
            plugged: AtomicBool::new(true),
            drop_uv: AtomicBool::new(false),
            tamper: Mutex::new(Tamper::None),
        })
    }
}

/// Ways a broken or hostile key can get an assertion wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// An honest key.
    None,
    /// Sign for another relying party id.
    OtherRpId,
    /// Leave the user-present flag clear.
    NoUserPresence,
    /// Sign other data than `authData ‖ clientDataHash`.
    SignOtherData,
    /// Send authenticator data cut short.
    TruncateAuthData,
    /// Answer with the newest credential on the key, whatever the allow list says.
    UseNewestCredential,
}

/// A fake hardware key (see the module docs).
pub struct FakeHardwareKey {
    product: String,
    aaguid: [u8; 16],
    pin: Option<String>,
    att_key: KeyPair,
    att_der: Vec<u8>,
    creds: Mutex<Vec<(Vec<u8>, KeyPair)>>,
    counter: AtomicU32,
    plugged: AtomicBool,
    drop_uv: AtomicBool,
    tamper: Mutex<Tamper>,
}

impl FakeHardwareKey {
    /// Makes the key get its next assertions wrong in the given way.
    pub fn set_tamper(&self, t: Tamper) {
        if let Ok(mut g) = self.tamper.lock() {
            *g = t;
        }
    }

    /// Makes the key check the PIN but leave the UV flag clear, as a broken or hostile key might.
    pub fn set_drop_uv(&self, drop: bool) {
        self.drop_uv.store(drop, Relaxed);
    }

    /// Unplugs (or replugs) the key.
    pub fn set_plugged(&self, plugged: bool) {
        self.plugged.store(plugged, Relaxed);
    }

    fn flags(&self, uv: UvMethod, pin: Option<&str>) -> Result<u8, DeviceError> {
        match uv {
            UvMethod::Pin if pin.is_some() && pin == self.pin.as_deref() => {
                Ok(if self.drop_uv.load(Relaxed) {
                    0x01
                } else {
                    0x05
                })
            }
            UvMethod::Pin => Err(DeviceError::PinInvalid),
            UvMethod::BuiltIn => Err(DeviceError::Other(
                "this fake key has no fingerprint reader".into(),
            )),
            UvMethod::None => Ok(0x01),
        }
    }

    fn check_plugged(&self) -> Result<(), DeviceError> {
        if self.plugged.load(Relaxed) {
            Ok(())
        } else {
            Err(DeviceError::Removed)
        }
    }
}

fn sign(key: &KeyPair, auth_data: &[u8], client_data_json: &[u8]) -> Result<Vec<u8>, DeviceError> {
    let mut msg = auth_data.to_vec();
    msg.extend_from_slice(&Sha256::digest(client_data_json));
    key.sign(&msg)
        .map_err(|e| DeviceError::Other(e.to_string()))
}

fn cose_es256(raw: &[u8]) -> Result<Vec<u8>, DeviceError> {
    use ciborium::Value::{Bytes, Integer, Map};
    if raw.len() != 65 {
        return Err(DeviceError::Other("not an uncompressed P-256 point".into()));
    }
    let key = Map(vec![
        (Integer(1.into()), Integer(2.into())),
        (Integer(3.into()), Integer((-7).into())),
        (Integer((-1).into()), Integer(1.into())),
        (Integer((-2).into()), Bytes(raw[1..33].to_vec())),
        (Integer((-3).into()), Bytes(raw[33..].to_vec())),
    ]);
    let mut out = Vec::new();
    ciborium::into_writer(&key, &mut out).map_err(|e| DeviceError::Other(e.to_string()))?;
    Ok(out)
}

impl FidoDevice for FakeHardwareKey {
    fn info(&self) -> Result<KeyInfo, DeviceError> {
        self.check_plugged()?;
        Ok(KeyInfo {
            product: self.product.clone(),
            path: format!("/dev/hidraw-fake-{}", self.product),
            aaguid: touchgate_agent::authenticator::device::format_aaguid(&self.aaguid),
            client_pin: Some(self.pin.is_some()),
            builtin_uv: false,
            always_uv: false,
            pin_protocol_2: true,
            pin_retries: self.pin.as_ref().map(|_| 8),
        })
    }

    fn make_credential(&self, req: &MakeCredential<'_>) -> Result<Attested, DeviceError> {
        self.check_plugged()?;
        let flags = self.flags(req.uv, req.pin)? | 0x40;
        let cred_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| DeviceError::Other(e.to_string()))?;
        let cred_id: Vec<u8> = Sha256::digest(cred_key.public_key_raw()).to_vec();
        let mut auth_data = Sha256::digest(req.rp_id.as_bytes()).to_vec();
        auth_data.push(flags);
        auth_data.extend_from_slice(&self.counter.load(Relaxed).to_be_bytes());
        auth_data.extend_from_slice(&self.aaguid);
        auth_data.extend_from_slice(&(cred_id.len() as u16).to_be_bytes());
        auth_data.extend_from_slice(&cred_id);
        auth_data.extend_from_slice(&cose_es256(cred_key.public_key_raw())?);
        let sig = sign(&self.att_key, &auth_data, req.client_data_json)?;
        self.creds
            .lock()
            .map_err(|_| DeviceError::Other("poisoned".into()))?
            .push((cred_id.clone(), cred_key));
        Ok(Attested {
            fmt: "packed".into(),
            auth_data,
            alg: -7,
            sig,
            x5c: vec![self.att_der.clone()],
            credential_id: cred_id,
        })
    }

    fn get_assertion(&self, req: &GetAssertion<'_>) -> Result<Asserted, DeviceError> {
        self.check_plugged()?;
        let tamper = self.tamper.lock().map(|t| *t).unwrap_or(Tamper::None);
        let creds = self
            .creds
            .lock()
            .map_err(|_| DeviceError::Other("poisoned".into()))?;
        let found = if tamper == Tamper::UseNewestCredential {
            creds.last()
        } else {
            creds.iter().find(|(id, _)| req.allow.contains(id))
        };
        let Some((id, key)) = found else {
            return Err(DeviceError::NoCredentials);
        };
        let mut flags = self.flags(req.uv, req.pin)?;
        if !req.up || tamper == Tamper::NoUserPresence {
            flags &= !0x01;
        }
        let counter = self.counter.fetch_add(1, Relaxed) + 1;
        let rp_id = if tamper == Tamper::OtherRpId {
            "evil.example"
        } else {
            req.rp_id
        };
        let mut auth_data = Sha256::digest(rp_id.as_bytes()).to_vec();
        auth_data.push(flags);
        auth_data.extend_from_slice(&counter.to_be_bytes());
        let signed: &[u8] = if tamper == Tamper::SignOtherData {
            b"something else"
        } else {
            req.client_data_json
        };
        let signature = sign(key, &auth_data, signed)?;
        if tamper == Tamper::TruncateAuthData {
            auth_data.truncate(20);
        }
        // Like real keys with a one-entry allow list, leave the id out.
        let credential_id = if req.allow.len() == 1 && tamper != Tamper::UseNewestCredential {
            Vec::new()
        } else {
            id.clone()
        };
        Ok(Asserted {
            auth_data,
            signature,
            credential_id,
        })
    }

    fn cancel(&self) {}

    fn present(&self) -> bool {
        self.plugged.load(Relaxed)
    }
}

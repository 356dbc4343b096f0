//! The software key: webauthn-authenticator-rs's soft token, which makes real `packed`
//! attestations under its own CA, persisted to a file of mode 0600.
//!
//! For the demo, tests, and bots the gateway's policy explicitly allows. Its AAGUID marks it as
//! software, so gateways refuse it by default.

use std::path::{Path, PathBuf};

use base64::{Engine, engine::general_purpose::STANDARD};
use der::{EncodePem, pem::LineEnding};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use webauthn_authenticator_rs::{AuthenticatorBackendHashedClientData, softtoken::SoftToken};
use webauthn_rs_proto::{
    PublicKeyCredential, PublicKeyCredentialCreationOptions, PublicKeyCredentialRequestOptions,
    RegisterPublicKeyCredential,
};

use super::{Authenticator, AuthnError};

/// A software key stored in a file.
pub struct SoftKey {
    path: PathBuf,
    token: SoftToken,
    ca_pem: String,
}

#[derive(Serialize, Deserialize)]
struct SoftKeyFile {
    version: u32,
    ca_pem: String,
    /// The soft token's own CBOR state, base64.
    token: String,
}

impl SoftKey {
    /// Opens an existing software key.
    pub fn open(path: &Path) -> Result<Self, AuthnError> {
        if !path.exists() {
            return Err(AuthnError::SoftKeyMissing(path.display().to_string()));
        }
        let err = |reason: String| AuthnError::SoftKeyFile {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let file: SoftKeyFile = serde_json::from_str(&text)
            .map_err(|e| err(format!("not a touchgate software key: {e}")))?;
        let cbor = STANDARD
            .decode(&file.token)
            .map_err(|e| err(e.to_string()))?;
        let token =
            SoftToken::from_cbor(&cbor).map_err(|e| err(format!("corrupt key state: {e:?}")))?;
        Ok(Self {
            path: path.to_owned(),
            token,
            ca_pem: file.ca_pem,
        })
    }

    /// Opens the key at `path`, creating a new one there if it does not exist.
    pub fn open_or_create(path: &Path) -> Result<Self, AuthnError> {
        if path.exists() {
            return Self::open(path);
        }
        let (token, ca) =
            SoftToken::new(false).map_err(|e| AuthnError::Device(format!("{e:?}")))?;
        let ca_pem = ca
            .to_pem(LineEnding::LF)
            .map_err(|e| AuthnError::Encoding(e.to_string()))?;
        let key = Self {
            path: path.to_owned(),
            token,
            ca_pem,
        };
        key.save()?;
        Ok(key)
    }

    /// Writes the key state atomically (temp file, then rename), mode 0600.
    fn save(&self) -> Result<(), AuthnError> {
        let err = |reason: String| AuthnError::SoftKeyFile {
            path: self.path.display().to_string(),
            reason,
        };
        let cbor = self.token.to_cbor().map_err(|e| err(format!("{e:?}")))?;
        let file = SoftKeyFile {
            version: 1,
            ca_pem: self.ca_pem.clone(),
            token: STANDARD.encode(cbor),
        };
        let text = serde_json::to_string_pretty(&file).map_err(|e| err(e.to_string()))?;
        if let Some(dir) = self.path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let tmp = self.path.with_extension("tmp");
        write_private(&tmp, text.as_bytes()).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| err(e.to_string()))
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

impl Authenticator for SoftKey {
    fn describe(&self) -> String {
        format!("software key {}", self.path.display())
    }

    fn software_ca_pem(&self) -> Option<String> {
        Some(self.ca_pem.clone())
    }

    fn register(
        &mut self,
        options: &PublicKeyCredentialCreationOptions,
        client_data_json: &[u8],
    ) -> Result<RegisterPublicKeyCredential, AuthnError> {
        let hash = Sha256::digest(client_data_json).to_vec();
        let mut cred = self
            .token
            .perform_register(hash, options.clone(), 60_000)
            .map_err(|e| AuthnError::Device(format!("{e:?}")))?;
        cred.response.client_data_json = client_data_json.to_vec();
        self.save()?;
        Ok(cred)
    }

    fn authenticate(
        &mut self,
        options: &PublicKeyCredentialRequestOptions,
        client_data_json: &[u8],
    ) -> Result<PublicKeyCredential, AuthnError> {
        let hash = Sha256::digest(client_data_json).to_vec();
        let mut cred = self
            .token
            .perform_auth(hash, options.clone(), 60_000)
            .map_err(|e| AuthnError::Device(format!("{e:?}")))?;
        cred.response.client_data_json = client_data_json.to_vec();
        // The counter moved: persist before the assertion leaves, so it is never reused.
        self.save()?;
        Ok(cred)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_key_file_is_private_and_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys").join("soft.tgk");
        let key = SoftKey::open_or_create(&path).expect("create");
        assert!(
            key.software_ca_pem()
                .is_some_and(|p| p.starts_with("-----BEGIN CERTIFICATE-----"))
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = SoftKey::open(&path).expect("reopen");
        assert_eq!(again.ca_pem, key.ca_pem);
    }

    #[test]
    fn missing_soft_key_says_to_enrol() {
        let err = SoftKey::open(Path::new("/nonexistent/soft.tgk"))
            .err()
            .expect("missing");
        assert!(err.to_string().contains("touchgate enroll"), "{err}");
    }
}

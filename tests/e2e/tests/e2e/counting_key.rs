//! A software key that counts every time it is asked to sign, for tests that check no touch
//! was asked.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use touchgate_agent::{
    SharedAuthn,
    authenticator::{Authenticator, AuthnError, soft::SoftKey},
};
use webauthn_rs_proto::{
    PublicKeyCredential, PublicKeyCredentialCreationOptions, PublicKeyCredentialRequestOptions,
    RegisterPublicKeyCredential,
};

/// The software key at `path`, and the count of times it was asked to sign.
pub fn counting(path: &std::path::Path) -> anyhow::Result<(SharedAuthn, Arc<AtomicUsize>)> {
    let asked = Arc::new(AtomicUsize::new(0));
    let key = Counting {
        inner: Box::new(SoftKey::open_or_create(path)?),
        asked: asked.clone(),
    };
    Ok((Arc::new(Mutex::new(Box::new(key))), asked))
}

struct Counting {
    inner: Box<dyn Authenticator>,
    asked: Arc<AtomicUsize>,
}

impl Authenticator for Counting {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn software_ca_pem(&self) -> Option<String> {
        self.inner.software_ca_pem()
    }

    fn register(
        &mut self,
        options: &PublicKeyCredentialCreationOptions,
        client_data_json: &[u8],
    ) -> Result<RegisterPublicKeyCredential, AuthnError> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        self.inner.register(options, client_data_json)
    }

    fn authenticate(
        &mut self,
        options: &PublicKeyCredentialRequestOptions,
        client_data_json: &[u8],
    ) -> Result<PublicKeyCredential, AuthnError> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        self.inner.authenticate(options, client_data_json)
    }
}

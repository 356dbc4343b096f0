//! TLS for the QUIC endpoint: the server certificate, client-certificate handling, and a
//! development certificate generator.

use std::{path::Path, sync::Arc};

use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use sha2::{Digest, Sha256};

/// Errors building TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {what} from {path}: {reason}")]
    Pem {
        /// Certificate or key.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration error: {0}")]
    Rustls(#[from] rustls::Error),
    /// The certificate could not be generated.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing files failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// quinn refused the rustls configuration.
    #[error("QUIC TLS configuration error: {0}")]
    Quic(String),
}

/// Loads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |reason: String| TlsError::Pem {
        what: "certificate",
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no certificate in the file".into()));
    }
    Ok(certs)
}

/// Loads a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Bidirectional streams a peer without a session may have open at once (the control stream
/// and a few more, which are refused).
pub const PRE_SESSION_STREAMS: u32 = 8;

/// Bytes a peer without a session may have in flight over all its streams.
pub const PRE_SESSION_WINDOW: u32 = 256 * 1024;

/// The QUIC server config: TLS 1.3 only, ALPN `touchgate/1`, a client certificate required,
/// and transport settings sized for a tunnel.
pub fn quic_server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    max_streams: u32,
) -> Result<quinn::ServerConfig, TlsError> {
    quic_server_config_with(certs, key, max_streams, |_| {})
}

/// [`quic_server_config`], with `tune` applied to the transport settings last (the carrier's
/// larger datagrams).
pub fn quic_server_config_with(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    max_streams: u32,
    tune: fn(&mut quinn::TransportConfig),
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(SessionKeyCertVerifier {
        algs: provider.signature_verification_algorithms,
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![touchgate_proto::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // A connection starts with room for sign-in only: a few streams and a small window, so a
    // peer without a session cannot make the gateway buffer megabytes or hold thousands of
    // streams. A session raises both (`server::ConnCtx::start_session`).
    let mut transport = touchgate_common::transport_config(max_streams);
    transport.max_concurrent_bidi_streams(PRE_SESSION_STREAMS.into());
    transport.receive_window(PRE_SESSION_WINDOW.into());
    tune(&mut transport);
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// Accepts any client certificate whose handshake signature verifies.
///
/// The certificate is the agent's in-memory session key, self-signed: it proves possession of
/// that key, not an identity. Identity comes from the session token, whose `cnf` claim must
/// match this certificate's thumbprint; until a session is established or resumed on the
/// connection, the gateway serves nothing but the control stream.
#[derive(Debug)]
struct SessionKeyCertVerifier {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for SessionKeyCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// SHA-256 fingerprint of a DER certificate, as 64 lowercase hex digits.
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

/// A generated development certificate.
pub struct DevCert {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM private key.
    pub key_pem: String,
    /// SHA-256 fingerprint of the certificate.
    pub fingerprint: String,
}

/// Generates a self-signed certificate for `names` (development and demos).
pub fn generate_dev_cert(names: &[String]) -> Result<DevCert, TlsError> {
    let ck = rcgen::generate_simple_self_signed(names.to_vec())?;
    Ok(DevCert {
        cert_pem: ck.cert.pem(),
        key_pem: ck.signing_key.serialize_pem(),
        fingerprint: fingerprint(ck.cert.der()),
    })
}

/// Writes a development certificate as `dir/cert.pem` and `dir/key.pem` (the key mode 0600).
pub fn write_dev_cert(dir: &Path, cert: &DevCert) -> Result<(), TlsError> {
    let write = |name: &str, text: &str, private: bool| {
        let path = dir.join(name);
        let err = |source| TlsError::Write {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        write_file(&path, text.as_bytes(), private).map_err(err)
    };
    write("cert.pem", &cert.cert_pem, false)?;
    write("key.pem", &cert.key_pem, true)
}

fn write_file(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    opts.open(path)?.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_cert_round_trips_through_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = generate_dev_cert(&["gw.test".into()]).expect("generate");
        write_dev_cert(dir.path(), &cert).expect("write");
        let certs = load_certs(&dir.path().join("cert.pem")).expect("load certs");
        assert_eq!(fingerprint(&certs[0]), cert.fingerprint);
        assert_eq!(cert.fingerprint.len(), 64);
        load_key(&dir.path().join("key.pem")).expect("load key");
        quic_server_config(
            certs,
            load_key(&dir.path().join("key.pem")).expect("key"),
            16,
        )
        .expect("server config");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("key.pem"))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn missing_pem_file_says_which_file() {
        let err = load_certs(Path::new("/nonexistent/cert.pem")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }
}

//! TLS for the gRPC listener (tonic with rustls).
//!
//! A configured certificate and key are used as they are. Without one, the server makes its
//! own on first start, in `<data_dir>/tls/`: a private certificate authority (`ca.pem`, the
//! file clients trust: `grpcurl -cacert`, `satstream --cacert`) and a server certificate it
//! signs for the configured host names (`cert.pem`, `key.pem` mode 0600). The SHA-256
//! fingerprint of the certificate clients trust is logged and shown by `satstream config`.
//! Certificates are made with rcgen, never by hand.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("generating the TLS certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The certificate and key the listener serves, and what clients should trust.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate clients trust (`--cacert`): the generated CA, or the configured
    /// certificate itself.
    pub trust_path: PathBuf,
    /// SHA-256 of that certificate (DER), hex with colons, as browsers and openssl show it.
    pub fingerprint: String,
}

/// Where a generated certificate lives.
pub fn generated_dir(config: &Config) -> PathBuf {
    config.server.data_dir.join("tls")
}

/// The configured certificate, or the generated one (made now if it does not exist yet).
pub fn load_or_create(config: &Config) -> Result<ServerTls, TlsError> {
    let s = &config.server;
    if !s.tls_cert_file.as_os_str().is_empty() {
        let cert_pem = std::fs::read_to_string(&s.tls_cert_file).map_err(io(&s.tls_cert_file))?;
        let key_pem = std::fs::read_to_string(&s.tls_key_file).map_err(io(&s.tls_key_file))?;
        let fingerprint = fingerprint_pem(&cert_pem, &s.tls_cert_file)?;
        return Ok(ServerTls {
            cert_pem,
            key_pem,
            trust_path: s.tls_cert_file.clone(),
            fingerprint,
        });
    }
    let dir = generated_dir(config);
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    if !(ca.exists() && cert.exists() && key.exists()) {
        generate(&dir, &s.tls_hosts)?;
    }
    let ca_pem = std::fs::read_to_string(&ca).map_err(io(&ca))?;
    Ok(ServerTls {
        cert_pem: std::fs::read_to_string(&cert).map_err(io(&cert))?,
        key_pem: std::fs::read_to_string(&key).map_err(io(&key))?,
        fingerprint: fingerprint_pem(&ca_pem, &ca)?,
        trust_path: ca,
    })
}

/// Makes a CA and a server certificate for `hosts` (DNS names or IP addresses) in `dir`.
fn generate(dir: &Path, hosts: &[String]) -> Result<(), TlsError> {
    crate::files::private_dir(dir).map_err(io(dir))?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "satstream server CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(hosts.to_vec())?;
    leaf.distinguished_name
        .push(DnType::CommonName, "satstream");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let issuer = Issuer::new(ca, ca_key);
    let cert = leaf.signed_by(&key, &issuer)?;
    // The chain the server presents: its certificate, then the CA's.
    let chain = format!("{}{}", cert.pem(), ca_cert.pem());
    let write = |name: &str, text: &str, secret: bool| {
        let p = dir.join(name);
        let r = if secret {
            crate::files::write_private(&p, text.as_bytes())
        } else {
            std::fs::write(&p, text)
        };
        r.map_err(io(&p))
    };
    write("key.pem", &key.serialize_pem(), true)?;
    write("cert.pem", &chain, false)?;
    // Last: its presence says the set is complete.
    write("ca.pem", &ca_cert.pem(), false)?;
    tracing::info!(dir = %dir.display(), ?hosts, "generated a TLS certificate");
    Ok(())
}

/// SHA-256 of the first certificate of a PEM text.
pub fn fingerprint_pem(pem: &str, path: &Path) -> Result<String, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(|c| c.ok())
        .ok_or_else(|| TlsError::NoCertificate {
            path: path.display().to_string(),
        })?;
    Ok(Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_keeps_the_key_private() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.server.data_dir = dir.path().to_path_buf();
        let a = load_or_create(&c).unwrap();
        let b = load_or_create(&c).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint, "made once, then reused");
        assert_eq!(a.fingerprint.len(), 32 * 3 - 1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(generated_dir(&c).join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            a.cert_pem.matches("BEGIN CERTIFICATE").count() == 2,
            "leaf + CA"
        );
    }
}

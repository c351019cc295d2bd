//! Certificates made at test time for servers started with TLS on.
//!
//! [`TestPki::generate`] makes a certificate authority, a server certificate for the loopback
//! names (`localhost`, `127.0.0.1`, `::1`) and a client certificate signed by it, and a second,
//! unrelated authority that a test hands to a client to see it refuse the server. Everything
//! is written as PEM files into a temporary directory that lives as long as the [`TestPki`].

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// A certificate and its private key, as PEM files and strings.
#[derive(Debug, Clone)]
pub struct PemPair {
    /// The certificate file (PEM).
    pub cert_path: PathBuf,
    /// The private key file (PEM, PKCS#8, readable by its owner only).
    pub key_path: PathBuf,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM.
    pub key_pem: String,
}

/// A test certificate authority with a server and a client certificate it signed, and an
/// unrelated authority (see the module docs).
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
    /// The authority that signed [`TestPki::server`] and [`TestPki::client`].
    pub ca: PemPair,
    /// Server certificate for `localhost`, `127.0.0.1` and `::1`.
    pub server: PemPair,
    /// Client certificate (common name [`TestPki::CLIENT_NAME`]) for mutual TLS.
    pub client: PemPair,
    /// An authority that signed nothing here: a client that trusts only it must refuse the
    /// server.
    pub other_ca: PemPair,
}

impl TestPki {
    /// Common name of the client certificate (PostgreSQL's `cert` authentication maps it to
    /// the database user of the same name).
    pub const CLIENT_NAME: &'static str = "distlock";

    /// Makes the authorities and certificates and writes them to a new temporary directory.
    pub fn generate() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("distlock-pki-")
            .tempdir()
            .context("creating a directory for test certificates")?;
        let (ca, ca_params, ca_key) = authority(dir.path(), "ca", "distlock test CA")?;
        let (other_ca, _, _) = authority(dir.path(), "other-ca", "distlock unrelated CA")?;
        let issuer = Issuer::from_params(&ca_params, &ca_key);

        let mut server = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .context("server certificate names")?;
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            // etcd uses its server certificate as a client too (peer and gateway traffic).
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let server = leaf(dir.path(), "server", server, &issuer)?;

        let mut client = CertificateParams::new(Vec::<String>::new()).context("client params")?;
        client
            .distinguished_name
            .push(DnType::CommonName, Self::CLIENT_NAME);
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = leaf(dir.path(), "client", client, &issuer)?;

        Ok(TestPki {
            dir,
            ca,
            server,
            client,
            other_ca,
        })
    }

    /// The directory holding every file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn authority(
    dir: &Path,
    name: &str,
    common_name: &str,
) -> Result<(PemPair, CertificateParams, KeyPair)> {
    let key = KeyPair::generate().context("generating a CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).context("self-signing the CA")?;
    let pair = write_pair(dir, name, cert.pem(), key.serialize_pem())?;
    Ok((pair, params, key))
}

fn leaf(
    dir: &Path,
    name: &str,
    params: CertificateParams,
    issuer: &Issuer<'_, &KeyPair>,
) -> Result<PemPair> {
    let key = KeyPair::generate().with_context(|| format!("generating the {name} key"))?;
    let cert = params
        .signed_by(&key, issuer)
        .with_context(|| format!("signing the {name} certificate"))?;
    write_pair(dir, name, cert.pem(), key.serialize_pem())
}

fn write_pair(dir: &Path, name: &str, cert_pem: String, key_pem: String) -> Result<PemPair> {
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, &cert_pem)
        .with_context(|| format!("writing {}", cert_path.display()))?;
    std::fs::write(&key_path, &key_pem)
        .with_context(|| format!("writing {}", key_path.display()))?;
    // PostgreSQL refuses a key file that others can read.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", key_path.display()))?;
    }
    Ok(PemPair {
        cert_path,
        key_path,
        cert_pem,
        key_pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_written_and_parse_as_pem() -> Result<()> {
        let pki = TestPki::generate()?;
        for pair in [&pki.ca, &pki.server, &pki.client, &pki.other_ca] {
            let cert = std::fs::read_to_string(&pair.cert_path)?;
            anyhow::ensure!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
            let key = std::fs::read_to_string(&pair.key_path)?;
            anyhow::ensure!(key.contains("PRIVATE KEY-----"));
        }
        Ok(())
    }
}

//! TLS certificates: parsing an app's certificate and key (PEM), checking which host names the
//! certificate covers, and [`Certs`], the SNI table the HTTPS listener picks a certificate from.
//! Owns no listener (the proxy does) and no storage (the store keeps the PEMs; `deploy` says
//! which hosts use which app's certificate).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use thiserror::Error;

/// The largest certificate chain or key file `certs:add` accepts.
pub const MAX_PEM: usize = 256 * 1024;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("the certificate file holds no PEM certificate — pass the full chain (CERTIFICATE blocks), server certificate first")]
    NoCertificate,
    #[error("the certificate is not valid: {0} — pass the PEM chain your CA issued")]
    BadCertificate(String),
    #[error("the key file holds no usable private key ({0}) — pass the PEM key (PRIVATE KEY, RSA or EC) that goes with the certificate")]
    BadKey(String),
    #[error("the key does not belong to the certificate ({0}) — pass the key the certificate was issued for")]
    KeyMismatch(String),
    #[error("the PEM files are larger than {MAX_PEM} bytes — pass only the chain and the key")]
    TooLarge,
}

/// A parsed certificate chain with its key, ready to serve.
#[derive(Clone, Debug)]
pub struct Cert {
    key: Arc<CertifiedKey>,
    /// The server certificate's validity, as Unix seconds.
    not_before: i64,
    not_after: i64,
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

impl Cert {
    /// Parses a PEM chain (server certificate first) and its PEM private key, and checks that
    /// they belong together.
    pub fn parse(chain_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        if chain_pem.len() > MAX_PEM || key_pem.len() > MAX_PEM {
            return Err(TlsError::TooLarge);
        }
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| TlsError::BadCertificate(err.to_string()))?;
        let first = chain.first().ok_or(TlsError::NoCertificate)?;
        webpki::EndEntityCert::try_from(first)
            .map_err(|err| TlsError::BadCertificate(err.to_string()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(first)
            .map_err(|err| TlsError::BadCertificate(err.to_string()))?;
        let validity = parsed.validity();
        let (not_before, not_after) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|err| TlsError::BadKey(err.to_string()))?;
        let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|err| match err {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch(err.to_string()),
            other => TlsError::BadKey(other.to_string()),
        })?;
        Ok(Self {
            key: Arc::new(key),
            not_before,
            not_after,
        })
    }

    /// When the certificate stops being valid.
    pub fn not_after(&self) -> SystemTime {
        unix_time(self.not_after)
    }

    /// When it is due for renewal: once two thirds of its lifetime have passed (for Let's
    /// Encrypt's 90-day certificates, 30 days before they expire).
    pub fn renew_at(&self) -> SystemTime {
        unix_time(self.not_after - (self.not_after - self.not_before) / 3)
    }

    /// The `hosts` the certificate is valid for.
    pub fn covered(&self, hosts: &[String]) -> Vec<String> {
        hosts.iter().filter(|h| self.covers(h)).cloned().collect()
    }

    /// Whether the certificate is valid for `host` (its names, wildcards included).
    pub fn covers(&self, host: &str) -> bool {
        let (Some(first), Ok(name)) = (self.key.cert.first(), ServerName::try_from(host)) else {
            return false;
        };
        webpki::EndEntityCert::try_from(first)
            .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
    }
}

fn unix_time(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0).unsigned_abs())
}

/// Host → certificate, for the HTTPS listener (SNI). Reads are lock-free; a write replaces the
/// table.
#[derive(Default, Debug)]
pub struct Certs {
    by_host: ArcSwap<HashMap<String, Cert>>,
}

impl Certs {
    /// Serves `host` with `cert`, or with nothing (handshakes for it fail) when None.
    pub fn set(&self, host: &str, cert: Option<Cert>) {
        let host = host.to_ascii_lowercase();
        let key = |cert: Option<&Cert>| cert.map(|cert| Arc::as_ptr(&cert.key));
        if key(self.by_host.load().get(&host)) == key(cert.as_ref()) {
            return; // unchanged: routing calls this often
        }
        self.by_host.rcu(|table| {
            let mut table = HashMap::clone(table);
            match &cert {
                Some(cert) => table.insert(host.clone(), cert.clone()),
                None => table.remove(&host),
            };
            table
        });
    }

    /// A rustls server configuration that picks certificates from this table.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let host = hello.server_name()?.to_ascii_lowercase();
        self.by_host.load().get(&host).map(|cert| cert.key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `names` and its key, made by the real `openssl` CLI.
    fn self_signed(dir: &std::path::Path, cn: &str, names: &str) -> (String, String) {
        let (cert, key) = (dir.join(format!("{cn}.crt")), dir.join(format!("{cn}.key")));
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "2", "-subj", &format!("/CN={cn}")])
            .args(["-addext", &format!("subjectAltName={names}")])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("running openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            std::fs::read_to_string(cert).unwrap(),
            std::fs::read_to_string(key).unwrap(),
        )
    }

    #[test]
    fn certificates_parse_match_and_cover_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let (chain, key) = self_signed(
            dir.path(),
            "a",
            "DNS:www.example.test,DNS:*.apps.example.test",
        );
        let cert = Cert::parse(&chain, &key).unwrap();
        for (host, covered) in [
            ("www.example.test", true),
            ("WWW.example.test", true),
            ("x.apps.example.test", true),
            ("example.test", false),
            ("a.b.apps.example.test", false),
            ("other.test", false),
        ] {
            assert_eq!(cert.covers(host), covered, "{host}");
        }
        let lifetime = cert.not_after().duration_since(SystemTime::now()).unwrap();
        assert!(
            lifetime > Duration::from_secs(47 * 3600) && lifetime <= Duration::from_secs(48 * 3600),
            "openssl -days 2 gives a certificate valid for 2 days, parsed as {lifetime:?}"
        );
        let renew_in = cert.renew_at().duration_since(SystemTime::now()).unwrap();
        assert!(
            renew_in > Duration::from_secs(31 * 3600) && renew_in <= Duration::from_secs(32 * 3600),
            "renewal is due after two thirds of the 48 h, got {renew_in:?}"
        );
        let (_, other_key) = self_signed(dir.path(), "b", "DNS:b.test");
        assert!(matches!(
            Cert::parse(&chain, &other_key),
            Err(TlsError::KeyMismatch(_))
        ));
        assert!(matches!(
            Cert::parse("", &key),
            Err(TlsError::NoCertificate)
        ));
        assert!(matches!(
            Cert::parse(&chain, "nope"),
            Err(TlsError::BadKey(_))
        ));
        assert!(matches!(
            Cert::parse(&key, &key),
            Err(TlsError::NoCertificate)
        ));
        let huge = "x".repeat(MAX_PEM + 1);
        assert!(matches!(Cert::parse(&huge, &key), Err(TlsError::TooLarge)));
    }
}

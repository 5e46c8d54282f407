//! An app's host names and its TLS certificate (uploaded, or automatic through `acme`).

use serde::{Deserialize, Serialize};

use super::{Caller, Result, Service};
use crate::progress::Progress;
use crate::store::{AcmeRow, CertRow};

/// An app's hosts: the default one and the custom ones.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Domains {
    /// `APP.<domain>`, always served.
    pub default: String,
    pub custom: Vec<String>,
}

/// What `certs` shows.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CertInfo {
    /// The app's hosts the certificate covers.
    pub hosts: Vec<String>,
    pub expires: Option<String>,
    /// When an automatic certificate is renewed.
    pub renews: Option<String>,
    /// Set when certificates are automatic.
    #[schema(value_type = Option<Object>)]
    pub auto: Option<AcmeRow>,
}

/// An uploaded certificate.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
pub struct NewCert {
    /// PEM chain, server certificate first.
    pub chain: String,
    /// PEM private key.
    pub key: String,
    /// Redirect plain-HTTP requests to its hosts to HTTPS (308).
    #[serde(default)]
    pub redirect_https: bool,
}

/// Turning automatic certificates on.
#[derive(Debug, Default, Deserialize, Serialize, utoipa::ToSchema)]
pub struct AutoCert {
    #[serde(default)]
    pub redirect_https: bool,
}

impl Service {
    pub async fn domains(&self, who: &Caller, app: &str) -> Result<Domains> {
        self.app(who, app).await?;
        Ok(Domains {
            default: self.deployer.app_host(app),
            custom: self.store.domains(app).await?,
        })
    }

    /// Serves `app` at `host` too; returns the host as stored (lowercase).
    pub async fn add_domain(&self, who: &Caller, app: &str, host: &str) -> Result<String> {
        self.app(who, app).await?;
        let host = self.deployer.add_domain(app, host).await?;
        self.acme.wake();
        Ok(host)
    }

    pub async fn remove_domain(&self, who: &Caller, app: &str, host: &str) -> Result<()> {
        self.app(who, app).await?;
        self.deployer.remove_domain(app, host).await?;
        self.acme.wake();
        Ok(())
    }

    pub async fn certs(&self, who: &Caller, app: &str) -> Result<CertInfo> {
        self.app(who, app).await?;
        let cert = self.deployer.cert(app);
        let auto = self.store.acme(Some(app)).await?.pop();
        Ok(CertInfo {
            hosts: self.deployer.cert_hosts(app).await?,
            expires: cert.as_ref().map(|c| rfc3339(c.not_after())),
            renews: (cert.as_ref())
                .filter(|_| auto.is_some())
                .map(|c| rfc3339(c.renew_at())),
            auto,
        })
    }

    /// Serves `app` over HTTPS with an uploaded certificate; returns the hosts it covers.
    pub async fn add_cert(&self, who: &Caller, app: &str, cert: NewCert) -> Result<Vec<String>> {
        self.app(who, app).await?;
        let row = CertRow {
            app: app.to_string(),
            chain: cert.chain,
            key: cert.key,
            redirect_https: cert.redirect_https,
        };
        Ok(self.acme.manual(app, self.deployer.add_cert(&row)).await?)
    }

    /// Gets a certificate by ACME now and renews it from then on; returns its hosts.
    pub async fn auto_cert(
        &self,
        who: &Caller,
        app: &str,
        auto: AutoCert,
        out: &Progress,
    ) -> Result<CertInfo> {
        self.app(who, app).await?;
        self.acme.enable(app, auto.redirect_https, out).await?;
        self.certs(who, app).await
    }

    pub async fn remove_cert(&self, who: &Caller, app: &str) -> Result<()> {
        self.app(who, app).await?;
        Ok(self
            .acme
            .manual(app, self.deployer.remove_cert(app))
            .await?)
    }
}

pub(super) fn rfc3339(time: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

//! Automatic certificates (`certs:auto`) by ACME (RFC 8555) with HTTP-01 challenges: the ACME
//! account (its key kept in `DATA/acme-account.json`), ordering one certificate for all of an
//! app's hosts, the challenge answers the proxy serves on plain HTTP while an order runs, and
//! renewing each certificate once two thirds of its lifetime have passed (or when the app's hosts
//! changed). Which apps are automatic is in the store (`acme` table).
//!
//! Owns the ACME side only: certificates are stored and served through
//! [`Deployer::add_cert`], and the only route state it touches is the challenge answers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::deploy::{DeployError, Deployer};
use crate::locks::Locks;
use crate::progress::Progress;
use crate::proxy::Routes;
use crate::store::{CertRow, Store, StoreError};

/// Let's Encrypt's production directory, the default `--acme-directory`.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// How long one order may take, challenges and issuance included.
const ORDER_DEADLINE: Duration = Duration::from_secs(300);
/// How long after a failed renewal the next attempt is.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(600);
/// The longest the renewal loop sleeps without looking again.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

#[derive(Debug, Error)]
pub enum AcmeError {
    #[error("{app} has no host an ACME server can validate (names under .localhost never are) — add one with `berth domains:add {app} HOST`")]
    NoPublicHost { app: String },
    #[error("berth server runs without --https, so no certificate could be served — restart it with --https ADDR (e.g. 0.0.0.0:443)")]
    NoHttps,
    #[error("cannot use the ACME account at {directory} — check --acme-directory (and --acme-ca for a private ACME server) and that this server reaches it")]
    Account {
        directory: String,
        #[source]
        source: instant_acme::Error,
    },
    #[error("the ACME server did not issue a certificate for {hosts} — point these hosts' DNS at this server and make sure port 80 reaches berth's --http listener")]
    Order {
        hosts: String,
        #[source]
        source: instant_acme::Error,
    },
    #[error("the ACME server could not validate {host}: {detail} — point {host}'s DNS at this server and make sure port 80 reaches berth's --http listener")]
    Validation { host: String, detail: String },
    #[error("the ACME server took longer than {ORDER_DEADLINE:?} for {hosts} — try again later")]
    TimedOut { hosts: String },
    #[error("cannot keep the ACME account in {path}: {source} — check the data dir's disk space and permissions")]
    AccountFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Deploy(Box<DeployError>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<DeployError> for AcmeError {
    fn from(err: DeployError) -> Self {
        Self::Deploy(Box::new(err))
    }
}

/// Where certificates come from: `--acme-directory`, `--acme-email`, `--acme-ca`.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The ACME server's directory URL.
    pub directory: String,
    /// A contact address for the account (expiry warnings), if any.
    pub email: Option<String>,
    /// A PEM root certificate to trust for the ACME server itself (a private or test CA).
    pub ca: Option<PathBuf>,
}

/// The account as kept on disk: which directory it belongs to, and its credentials.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// Orders and renews certificates. Shared as `Arc<Acme>`.
pub struct Acme {
    config: AcmeConfig,
    account_file: PathBuf,
    store: Store,
    deployer: Arc<Deployer>,
    routes: Arc<Routes>,
    /// The account, once loaded or created.
    account: tokio::sync::Mutex<Option<Account>>,
    /// One lock per app: enabling, renewing and replacing an app's certificate run one at a time.
    locks: Locks,
    /// Wakes the renewal loop (hosts changed).
    wake: Notify,
}

impl Acme {
    pub fn new(
        config: AcmeConfig,
        account_file: PathBuf,
        store: Store,
        deployer: Arc<Deployer>,
        routes: Arc<Routes>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            account_file,
            store,
            deployer,
            routes,
            account: tokio::sync::Mutex::new(None),
            locks: Locks::default(),
            wake: Notify::new(),
        })
    }

    /// Turns automatic certificates on for `app` and gets its first one now. Returns the hosts
    /// it covers. When the order fails, automatic certificates stay off and nothing changes.
    pub async fn enable(
        &self,
        app: &str,
        redirect_https: bool,
        out: &Progress,
    ) -> Result<Vec<String>, AcmeError> {
        if !self.deployer.serves_https() {
            return Err(AcmeError::NoHttps);
        }
        let _guard = self.locks.lock(app).await;
        let hosts = self.issue(app, redirect_https, out).await?;
        self.store.set_acme(app, redirect_https).await?;
        self.wake.notify_one();
        Ok(hosts)
    }

    /// Runs `change` (an uploaded certificate, or none) with the app's automatic certificates
    /// turned off once it succeeded, so no renewal replaces what the user chose.
    pub async fn manual<T>(
        &self,
        app: &str,
        change: impl std::future::Future<Output = Result<T, DeployError>>,
    ) -> Result<T, AcmeError> {
        let _guard = self.locks.lock(app).await;
        let done = change.await?;
        self.store.remove_acme(app).await?;
        Ok(done)
    }

    /// Looks at every automatic certificate again now (an app's hosts changed).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Renews automatic certificates when they are due, until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let sleep = self.renew_due().await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Renews each automatic certificate that is due (or missing, or no longer covering all the
    /// app's hosts); returns how long until the next one is due.
    async fn renew_due(&self) -> Duration {
        let rows = match self.store.acme(None).await {
            Ok(rows) => rows,
            Err(err) => {
                warn!(%err, "listing automatic certificates failed");
                return RETRY_AFTER_FAILURE;
            }
        };
        let mut next = MAX_SLEEP;
        for row in rows {
            let due = self.due_in(&row.app).await;
            if due > Duration::ZERO {
                next = next.min(due);
                continue;
            }
            let _guard = self.locks.lock(&row.app).await;
            // Turned off (certs:add, certs:remove) while this loop waited for the lock.
            if !self
                .store
                .acme(Some(&row.app))
                .await
                .is_ok_and(|r| !r.is_empty())
            {
                continue;
            }
            let result = self
                .issue(&row.app, row.redirect_https, &Progress::discard())
                .await;
            let error = result.as_ref().err().map(ToString::to_string);
            if let Some(error) = &error {
                warn!(app = %row.app, %error, "renewing the certificate failed");
                next = next.min(RETRY_AFTER_FAILURE);
            } else {
                next = next.min(self.due_in(&row.app).await);
            }
            if let Err(err) = self.store.set_acme_error(&row.app, error.as_deref()).await {
                warn!(app = %row.app, %err, "recording the renewal's outcome failed");
            }
        }
        next.max(Duration::from_secs(1))
    }

    /// How long until `app`'s certificate is due for renewal: zero when it is due now, has none,
    /// or does not cover every host of the app.
    async fn due_in(&self, app: &str) -> Duration {
        let Some(cert) = self.deployer.cert(app) else {
            return Duration::ZERO;
        };
        match self.deployer.hosts(app).await {
            Ok(hosts) if hosts.iter().filter(|h| public(h)).all(|h| cert.covers(h)) => cert
                .renew_at()
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
            _ => Duration::ZERO,
        }
    }

    /// Orders a certificate for all of `app`'s hosts (but `.localhost` ones) and serves it. The
    /// caller holds the app's lock.
    async fn issue(
        &self,
        app: &str,
        redirect_https: bool,
        out: &Progress,
    ) -> Result<Vec<String>, AcmeError> {
        let mut hosts = self.deployer.hosts(app).await?;
        hosts.retain(|h| public(h));
        if hosts.is_empty() {
            return Err(AcmeError::NoPublicHost {
                app: app.to_string(),
            });
        }
        let listed = hosts.join(", ");
        out.line(format!(
            "-----> Ordering a certificate for {listed} from {}",
            self.config.directory
        ))
        .await;
        let order = self.order(&hosts, out).instrument(info_span!("acme", %app));
        let (chain, key) = tokio::time::timeout(ORDER_DEADLINE, order)
            .await
            .map_err(|_| AcmeError::TimedOut {
                hosts: listed.clone(),
            })??;
        let row = CertRow {
            app: app.to_string(),
            chain,
            key,
            redirect_https,
        };
        let covered = self.deployer.add_cert(&row).await?;
        info!(%app, hosts = %listed, "got a certificate by ACME");
        Ok(covered)
    }

    /// One ACME order for `hosts`: answers their HTTP-01 challenges, then returns the issued
    /// PEM chain and its new PEM key.
    async fn order(&self, hosts: &[String], out: &Progress) -> Result<(String, String), AcmeError> {
        let account = self.account().await?;
        let listed = hosts.join(", ");
        let failed = |source| AcmeError::Order {
            hosts: listed.clone(),
            source,
        };
        let identifiers: Vec<Identifier> =
            hosts.iter().map(|h| Identifier::Dns(h.clone())).collect();
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(failed)?;
        let mut answers = Answers {
            routes: &self.routes,
            tokens: Vec::new(),
        };
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.map_err(failed)?;
            if authorization.status != instant_acme::AuthorizationStatus::Pending {
                continue;
            }
            let host = authorization.identifier().to_string();
            let mut challenge =
                authorization
                    .challenge(ChallengeType::Http01)
                    .ok_or_else(|| AcmeError::Validation {
                        host: host.clone(),
                        detail: "the ACME server offers no HTTP-01 challenge for it".into(),
                    })?;
            answers.add(&challenge.token, challenge.key_authorization().as_str());
            challenge.set_ready().await.map_err(failed)?;
            out.line(format!("       Answering the HTTP-01 challenge for {host}"))
                .await;
        }
        let retries = RetryPolicy::new().timeout(ORDER_DEADLINE);
        let ready = order.poll_ready(&retries).await;
        if !matches!(ready, Ok(OrderStatus::Ready)) {
            if let Some(invalid) = self.why_invalid(&mut order).await {
                return Err(invalid);
            }
            return Err(match ready {
                Err(source) => failed(source),
                Ok(status) => AcmeError::Validation {
                    host: listed.clone(),
                    detail: format!("the order ended {status:?}"),
                },
            });
        }
        let key = order.finalize().await.map_err(failed)?;
        let chain = order.poll_certificate(&retries).await.map_err(failed)?;
        drop(answers);
        out.line("       Certificate issued").await;
        Ok((chain, key))
    }

    /// The first failed challenge's host and the ACME server's reason.
    async fn why_invalid(&self, order: &mut instant_acme::Order) -> Option<AcmeError> {
        let mut authorizations = order.authorizations();
        while let Some(Ok(mut authorization)) = authorizations.next().await {
            let Ok(state) = authorization.refresh().await else {
                continue;
            };
            let problem = state.challenges.iter().find_map(|c| c.error.as_ref());
            if let Some(problem) = problem {
                return Some(AcmeError::Validation {
                    host: state.identifier().to_string(),
                    detail: problem
                        .detail
                        .clone()
                        .unwrap_or_else(|| problem.to_string()),
                });
            }
        }
        None
    }

    /// The ACME account: loaded from the data dir, or created (and kept there) on first use or
    /// when `--acme-directory` changed.
    async fn account(&self) -> Result<Account, AcmeError> {
        let mut account = self.account.lock().await;
        if let Some(account) = &*account {
            return Ok(account.clone());
        }
        let directory = self.config.directory.clone();
        let failed = |source| AcmeError::Account {
            directory: directory.clone(),
            source,
        };
        let builder = || match &self.config.ca {
            Some(ca) => Account::builder_with_root(ca),
            None => Account::builder(),
        };
        let stored = std::fs::read(&self.account_file)
            .ok()
            .and_then(|json| serde_json::from_slice::<StoredAccount>(&json).ok())
            .filter(|stored| stored.directory == directory);
        let loaded = match stored {
            Some(stored) => builder()
                .map_err(failed)?
                .from_credentials(stored.credentials)
                .await
                .map_err(failed)?,
            None => {
                let contact = self.config.email.as_ref().map(|e| format!("mailto:{e}"));
                let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                let new = NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                let (created, credentials) = builder()
                    .map_err(failed)?
                    .create(&new, directory.clone(), None)
                    .await
                    .map_err(failed)?;
                self.keep(StoredAccount {
                    directory: directory.clone(),
                    credentials,
                })?;
                created
            }
        };
        *account = Some(loaded.clone());
        Ok(loaded)
    }

    /// Writes the account file (mode 0600), replacing it atomically.
    fn keep(&self, stored: StoredAccount) -> Result<(), AcmeError> {
        let json = serde_json::to_vec_pretty(&stored).expect("account credentials serialize");
        crate::paths::write_secret(&self.account_file, &json).map_err(|source| {
            AcmeError::AccountFile {
                path: self.account_file.clone(),
                source,
            }
        })
    }
}

/// Whether an ACME server may validate `host`: not `localhost` or a name under it (RFC 6761),
/// which berth's default `--domain` gives every app.
fn public(host: &str) -> bool {
    host != "localhost" && !host.ends_with(".localhost")
}

/// The challenge answers one order put in the proxy; dropping it takes them out again, however
/// the order ended.
struct Answers<'a> {
    routes: &'a Routes,
    tokens: Vec<String>,
}

impl Answers<'_> {
    fn add(&mut self, token: &str, key_authorization: &str) {
        self.routes
            .answer_acme(token, Some(key_authorization.to_string()));
        self.tokens.push(token.to_string());
    }
}

impl Drop for Answers<'_> {
    fn drop(&mut self) {
        for token in &self.tokens {
            self.routes.answer_acme(token, None);
        }
    }
}

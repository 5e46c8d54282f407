//! The service layer: every operation berth offers (apps, config, keys, releases, ps, logs,
//! domains, certificates, limits, network, images, users, tokens …), once, with typed inputs and
//! outputs, the caller's permissions checked, and one [`Error`] that each front end maps to what
//! it speaks (HTTP statuses and JSON in `api`, exit codes and `error:` lines in the CLI and over
//! SSH, messages in the dashboard). The REST API (`api`) is the only way in: the admin socket,
//! the remote CLI and SSH commands all go through it.
//!
//! Owns who may do what ([`Caller`]) and what each operation does through the store, `deploy`
//! and `acme`. Must not print (outputs are data; front ends render them) nor run containers
//! except through `deploy`.

use std::sync::Arc;

use crate::deploy::Deployer;
use crate::store::Store;

mod apps;
mod config;
mod domains;
mod images;
mod limits;
mod logs;
mod ps;
mod push;
mod users;

pub use apps::{app_state, running, AppInfo, AppOverview, AppSummary, Destroyed, ReleaseFacts};
pub use config::{ConfigChange, ConfigPatch};
pub use domains::{AutoCert, CertInfo, Domains, NewCert};
pub use images::{ExportTarget, ImageRow, ImageUser, Imported, Info, StackImages, Upload};
pub use limits::{BuildLimits, LimitsPatch, NetworkInfo, NetworkSet, TypeLimits};
pub use logs::{LogLine, LogQuery};
pub use ps::{PsEntry, Scaled, Traffic};
pub use push::Deploy;
pub use users::{CreatedToken, NewPassword, NewUser};

/// Everything the operations use. Built once by `server`.
pub struct Service {
    pub store: Store,
    pub deployer: Arc<Deployer>,
    pub acme: Arc<crate::acme::Acme>,
    pub paths: crate::paths::Paths,
    /// The git hook command installed into each app's repo (the hook's name follows).
    pub hook_command: String,
    /// The port of the SSH git endpoint, for the remotes berth prints.
    pub ssh_port: u16,
}

impl Service {
    /// Refuses unless `who` may act on `app` and it exists. A user who is not an admin gets the
    /// same refusal whether or not an app they were not granted exists.
    pub async fn app(&self, who: &Caller, app: &str) -> Result<()> {
        crate::app::validate(app)?;
        if !who.admin && !self.store.has_grant(app, &who.user).await? {
            return Err(Error::msg(
                Kind::Forbidden,
                format!(
                    "{} may not use app {app:?} — an admin can grant it: berth apps:grant {app} {}",
                    who.user, who.user
                ),
            ));
        }
        self.store.require_app(app).await?;
        Ok(())
    }

    /// Refuses unless `who` is an admin.
    pub fn admin(&self, who: &Caller, what: &str) -> Result<()> {
        match who.admin {
            true => Ok(()),
            false => Err(Error::msg(
                Kind::Forbidden,
                format!("only an admin may {what} — ask one, or use an admin's token"),
            )),
        }
    }
}

/// Who asks: a user (admin or not). Root on the server (the admin socket) is the built-in
/// admin user [`ADMIN`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user: String,
    pub admin: bool,
}

/// The built-in admin user: root on the server, and the owner of keys added before users existed.
pub const ADMIN: &str = "admin";

impl Caller {
    /// Root on the server.
    pub fn root() -> Self {
        Self {
            user: ADMIN.to_string(),
            admin: true,
        }
    }
}

/// What kind of failure an [`Error`] is; front ends map it to a status or exit code.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The request itself is malformed (HTTP 400).
    BadRequest,
    /// No credentials, or unknown or revoked ones (401).
    Unauthorized,
    /// The caller may not do this (403).
    Forbidden,
    /// What it names does not exist (404).
    NotFound,
    /// It clashes with what exists (409): a name taken, no release yet.
    Conflict,
    /// A value is not acceptable (422): a bad name, key, limit, config pair.
    Invalid,
    /// The operation ran and failed: a build, a check, a release command (500).
    Failed,
}

impl Kind {
    pub fn http_status(self) -> u16 {
        match self {
            Kind::BadRequest => 400,
            Kind::Unauthorized => 401,
            Kind::Forbidden => 403,
            Kind::NotFound => 404,
            Kind::Conflict => 409,
            Kind::Invalid => 422,
            Kind::Failed => 500,
        }
    }

    /// The CLI's exit code: 2 for input it should not have sent (as for a usage error), 4 when
    /// it may not, 1 for everything else.
    pub fn exit_code(self) -> i32 {
        match self {
            Kind::BadRequest | Kind::Invalid => 2,
            Kind::Unauthorized | Kind::Forbidden => 4,
            Kind::NotFound | Kind::Conflict | Kind::Failed => 1,
        }
    }
}

/// An operation's failure: its kind and a one-line message saying what went wrong and what to
/// do next.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: Kind,
    pub message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error of `kind` whose message is `source`'s, with the causes it names.
    pub fn new(kind: Kind, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        let mut message = source.to_string();
        let mut cause = source.source();
        while let Some(err) = cause {
            let text = err.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            cause = err.source();
        }
        Self {
            kind,
            message,
            source: Some(Box::new(source)),
        }
    }

    pub fn msg(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }
}

impl From<crate::store::StoreError> for Error {
    fn from(err: crate::store::StoreError) -> Self {
        use crate::store::StoreError as E;
        let kind = match &err {
            E::AppNotFound(_)
            | E::KeyNotFound(_)
            | E::DomainNotFound { .. }
            | E::UserNotFound(_)
            | E::TokenNotFound(_) => Kind::NotFound,
            E::AppExists(_)
            | E::KeyNameTaken(_)
            | E::KeyExists(_)
            | E::DomainTaken { .. }
            | E::UserExists(_)
            | E::TokenNameTaken(_) => Kind::Conflict,
            E::Db(_) | E::Migrate(_) | E::Corrupt(_) => Kind::Failed,
        };
        Self::new(kind, err)
    }
}

impl From<crate::deploy::DeployError> for Error {
    fn from(err: crate::deploy::DeployError) -> Self {
        use crate::deploy::DeployError as E;
        match err {
            E::Store(err) => err.into(),
            err => {
                let kind = match &err {
                    E::NothingDeployed(_) | E::NoEarlierRelease { .. } | E::Stopping => {
                        Kind::Conflict
                    }
                    E::NoSuchRelease { .. } | E::NoCert { .. } => Kind::NotFound,
                    E::Domain(_)
                    | E::Tls(_)
                    | E::CertCoversNothing { .. }
                    | E::NoSuchProcessType(_)
                    | E::UnknownProcessType { .. }
                    | E::TooMany { .. }
                    | E::ScaleRelease
                    | E::RollbackToFailed { .. }
                    | E::ImageCollected { .. } => Kind::Invalid,
                    _ => Kind::Failed,
                };
                Self::new(kind, err)
            }
        }
    }
}

macro_rules! invalid_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(err: $t) -> Self {
                Self::new(Kind::Invalid, err)
            }
        }
    )*};
}
invalid_from!(
    crate::config::ConfigError,
    crate::limits::LimitsError,
    crate::keys::KeyError,
    crate::app::InvalidAppName
);

impl From<crate::acme::AcmeError> for Error {
    fn from(err: crate::acme::AcmeError) -> Self {
        use crate::acme::AcmeError as E;
        match err {
            E::Store(err) => err.into(),
            E::Deploy(err) => (*err).into(),
            err @ (E::NoPublicHost { .. } | E::NoHttps) => Self::new(Kind::Conflict, err),
            err => Self::new(Kind::Failed, err),
        }
    }
}

/// An unexpected failure below (I/O, a task): reported as `Failed` with its whole chain.
pub(crate) fn failed(err: impl Into<anyhow::Error>) -> Error {
    let err: anyhow::Error = err.into();
    Error::msg(Kind::Failed, format!("{err:#}"))
}

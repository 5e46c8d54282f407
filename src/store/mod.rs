//! berth's state in SQLite (sqlx, WAL, `migrations/`): apps, config, releases (the `live` one is
//! what should run), SSH keys and the containers the daemon runs. Owns every SQL statement;
//! callers get plain structs.
//! Must not decide anything (that is `deploy`'s job) and must not touch files outside the database.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;
use thiserror::Error;

use crate::checks::Checks;
use crate::config::Config;
use crate::keys::ParsedKey;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("app {0:?} not found — see `berth apps`")]
    AppNotFound(String),
    #[error("app {0:?} already exists — pick another name, or see `berth apps:info {0}`")]
    AppExists(String),
    #[error("a key named {0:?} already exists — remove it first with `berth keys:remove {0}`")]
    KeyNameTaken(String),
    #[error("this key is already added as {0:?} — see `berth keys`")]
    KeyExists(String),
    #[error("no key named {0:?} — see `berth keys`")]
    KeyNotFound(String),
    #[error("{host} already belongs to app {app:?} — remove it there first: berth domains:remove {app} {host}")]
    DomainTaken { host: String, app: String },
    #[error("{host} is not a domain of {app} — see `berth domains {app}`")]
    DomainNotFound { host: String, app: String },
    #[error("database error: {0} — check that the data directory is writable and not full")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0} — was the data directory made by a newer berth?")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("no user named {0:?} — see `berth users`")]
    UserNotFound(String),
    #[error("a user named {0:?} already exists — see `berth users`")]
    UserExists(String),
    #[error("no token named {0:?} — see `berth tokens`")]
    TokenNotFound(String),
    #[error("a token named {0:?} already exists — revoke it first with `berth tokens:revoke {0}`, or pick another name")]
    TokenNameTaken(String),
    #[error("corrupt record in the database: {0}")]
    Corrupt(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AppRow {
    pub name: String,
    pub created_at: String,
}

/// Process type → command.
pub type ProcessTypes = BTreeMap<String, String>;
/// Process type → number of containers.
pub type Formation = BTreeMap<String, u32>;

/// Where a release is in its life. An app has at most one `live` release: the one that should run.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
#[sqlx(rename_all = "lowercase")]
pub enum ReleaseStatus {
    /// Its containers are starting and being checked.
    Deploying,
    /// What should run.
    Live,
    /// Was live; a later release replaced it.
    Superseded,
    /// Its build, start or check failed, or a server stop cut it short; `reason` says which.
    Failed,
}

impl ReleaseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deploying => "deploying",
            Self::Live => "live",
            Self::Superseded => "superseded",
            Self::Failed => "failed",
        }
    }
}

/// An immutable release `vN` of an app.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Release {
    pub app: String,
    pub version: i64,
    pub image: String,
    pub config: Config,
    pub process_types: ProcessTypes,
    pub formation: Formation,
    pub description: String,
    pub created_at: String,
    pub status: ReleaseStatus,
    /// Why it failed; empty otherwise.
    pub reason: String,
    /// The SSH key that pushed it, or `admin` for the local CLI.
    pub created_by: String,
    /// What its containers must pass before they get traffic.
    #[schema(value_type = Object)]
    pub checks: Checks,
}

/// What a new release is made of; the store assigns the version.
#[derive(Debug, Clone)]
pub struct NewRelease {
    pub image: String,
    pub config: Config,
    pub process_types: ProcessTypes,
    pub formation: Formation,
    pub description: String,
    pub created_by: String,
    pub checks: Checks,
}

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct KeyRow {
    pub name: String,
    pub fingerprint: String,
    pub created_at: String,
    /// The user it belongs to.
    pub user: String,
}

/// An app's releases in brief.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReleaseSummary {
    pub app: String,
    /// The live release's version.
    pub live: Option<i64>,
    /// Whether a release is being deployed.
    pub deploying: bool,
    /// The newest release's status.
    pub newest_status: ReleaseStatus,
    /// When the newest release was made.
    pub newest_at: String,
}

/// A user: keys and tokens belong to one.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct UserRow {
    pub name: String,
    /// May do anything; otherwise only what concerns the apps granted.
    pub admin: bool,
    pub created_at: String,
}

/// An API token as listed (its secret is never stored, only its SHA-256).
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TokenRow {
    pub user: String,
    pub name: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
}

/// An app's TLS certificate as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CertRow {
    pub app: String,
    /// PEM chain, server certificate first.
    pub chain: String,
    /// PEM private key.
    pub key: String,
    /// Plain-HTTP requests to the hosts it covers are redirected to HTTPS.
    pub redirect_https: bool,
}

/// What `builds:set` changed of an app's build limits; None keeps the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct BuildLimitsRow {
    pub memory: Option<i64>,
    pub cpu_millis: Option<i64>,
    pub pids: Option<i64>,
    pub timeout_secs: Option<i64>,
}

/// An app with automatic certificates (`certs:auto`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct AcmeRow {
    pub app: String,
    /// Plain-HTTP requests to the certificate's hosts are redirected to HTTPS.
    pub redirect_https: bool,
    /// Why the last order failed; None after a success.
    pub last_error: Option<String>,
}

/// Where a container is in its life, as the daemon decided it (whether its process still runs is
/// the runtime's to say).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
#[sqlx(rename_all = "lowercase")]
pub enum ContainerState {
    /// Started for a switch that has not completed; not routed.
    Starting,
    /// Part of what should run; routed when it is `web` and its process runs.
    Up,
    /// Replaced: finishing its requests, then stopped.
    Draining,
}

/// A container the daemon started.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ContainerRow {
    pub id: String,
    pub app: String,
    pub release: i64,
    pub process_type: String,
    pub number: i64,
    pub ip: String,
    pub port: i64,
    pub created_at: String,
    pub state: ContainerState,
    /// How many times this dyno (type.number) was restarted after crashing.
    pub restarts: i64,
    /// The exit code of the container this one replaced after a crash.
    pub last_exit: Option<i64>,
    /// Whether that container was killed for running out of memory.
    pub last_exit_oom: bool,
}

/// What `resources:set` changed of a process type's limits; None keeps the default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ResourcesRow {
    pub process_type: String,
    pub memory: Option<i64>,
    pub cpu_millis: Option<i64>,
    pub pids: Option<i64>,
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl Store {
    /// Opens (creating if needed) the database at `path` and applies the migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// Closes the pool, flushing the WAL.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn create_app(&self, name: &str) -> Result<()> {
        let result = sqlx::query("INSERT INTO apps (name, created_at) VALUES (?, ?)")
            .bind(name)
            .bind(now())
            .execute(&self.pool)
            .await;
        match result {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::AppExists(name.to_string()))
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    pub async fn app_exists(&self, name: &str) -> Result<bool> {
        let row = sqlx::query("SELECT 1 FROM apps WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// Fails with [`StoreError::AppNotFound`] unless the app exists.
    pub async fn require_app(&self, name: &str) -> Result<()> {
        if self.app_exists(name).await? {
            Ok(())
        } else {
            Err(StoreError::AppNotFound(name.to_string()))
        }
    }

    pub async fn apps(&self) -> Result<Vec<AppRow>> {
        Ok(
            sqlx::query_as("SELECT name, created_at FROM apps ORDER BY name")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// The names of all apps, sorted.
    pub async fn app_names(&self) -> Result<Vec<String>> {
        Ok(self.apps().await?.into_iter().map(|a| a.name).collect())
    }

    /// Whether `app`'s containers may open connections out of the bridge (`network:set`).
    pub async fn egress(&self, app: &str) -> Result<bool> {
        sqlx::query_scalar("SELECT egress FROM apps WHERE name = ?")
            .bind(app)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::AppNotFound(app.to_string()))
    }

    /// Stores whether `app`'s containers may open connections out of the bridge.
    pub async fn set_egress(&self, app: &str, egress: bool) -> Result<()> {
        let done = sqlx::query("UPDATE apps SET egress = ? WHERE name = ?")
            .bind(egress)
            .bind(app)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::AppNotFound(app.to_string()));
        }
        Ok(())
    }

    /// Deletes the app with its config and releases.
    pub async fn delete_app(&self, name: &str) -> Result<()> {
        let done = sqlx::query("DELETE FROM apps WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::AppNotFound(name.to_string()));
        }
        Ok(())
    }

    pub async fn config(&self, app: &str) -> Result<Config> {
        self.require_app(app).await?;
        let rows = sqlx::query("SELECT key, value FROM config WHERE app = ?")
            .bind(app)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("key"), r.get("value")))
            .collect())
    }

    /// Replaces the app's config with `config` in one transaction.
    pub async fn replace_config(&self, app: &str, config: &Config) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM config WHERE app = ?")
            .bind(app)
            .execute(&mut *tx)
            .await?;
        for (key, value) in config {
            sqlx::query("INSERT INTO config (app, key, value) VALUES (?, ?, ?)")
                .bind(app)
                .bind(key)
                .bind(value)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The app's releases, newest first.
    pub async fn releases(&self, app: &str) -> Result<Vec<Release>> {
        self.require_app(app).await?;
        let rows = sqlx::query("SELECT * FROM releases WHERE app = ? ORDER BY version DESC")
            .bind(app)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(release_from_row).collect()
    }

    /// The app's live release: what should run.
    pub async fn live_release(&self, app: &str) -> Result<Option<Release>> {
        let row = sqlx::query("SELECT * FROM releases WHERE app = ? AND status = 'live'")
            .bind(app)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(release_from_row).transpose()
    }

    /// Release `version` of `app`.
    pub async fn release(&self, app: &str, version: i64) -> Result<Option<Release>> {
        let row = sqlx::query("SELECT * FROM releases WHERE app = ? AND version = ?")
            .bind(app)
            .bind(version)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(release_from_row).transpose()
    }

    /// Records `new` as the next release of `app`, `deploying`. The version is assigned in the
    /// same statement, so two writers can never get the same one.
    pub async fn insert_release(&self, app: &str, new: &NewRelease) -> Result<Release> {
        let row = sqlx::query(
            "INSERT INTO releases (app, version, image, config, process_types, formation, description, created_at, status, created_by, checks)
             VALUES (?1, (SELECT COALESCE(MAX(version), 0) + 1 FROM releases WHERE app = ?1), ?2, ?3, ?4, ?5, ?6, ?7, 'deploying', ?8, ?9)
             RETURNING *",
        )
        .bind(app)
        .bind(&new.image)
        .bind(serde_json::to_string(&new.config)?)
        .bind(serde_json::to_string(&new.process_types)?)
        .bind(serde_json::to_string(&new.formation)?)
        .bind(&new.description)
        .bind(now())
        .bind(&new.created_by)
        .bind(serde_json::to_string(&new.checks)?)
        .fetch_one(&self.pool)
        .await?;
        release_from_row(&row)
    }

    /// Marks release `version` failed with `reason`.
    pub async fn fail_release(&self, app: &str, version: i64, reason: &str) -> Result<()> {
        sqlx::query(
            "UPDATE releases SET status = 'failed', reason = ? WHERE app = ? AND version = ?",
        )
        .bind(reason)
        .bind(app)
        .bind(version)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks every `deploying` release failed (a server stop cut it short); returns them as
    /// (app, version).
    pub async fn fail_interrupted(&self, reason: &str) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "UPDATE releases SET status = 'failed', reason = ? WHERE status = 'deploying' RETURNING app, version",
        )
        .bind(reason)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("app"), r.get("version")))
            .collect())
    }

    /// The switch, in one transaction: release `version` becomes the app's live one (the
    /// previous live one superseded), the `started` containers `up` and the `replaced` ones
    /// `draining`.
    pub async fn promote(
        &self,
        app: &str,
        version: i64,
        started: &[String],
        replaced: &[String],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE releases SET status = 'superseded' WHERE app = ? AND status = 'live' AND version != ?",
        )
        .bind(app)
        .bind(version)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE releases SET status = 'live' WHERE app = ? AND version = ?")
            .bind(app)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        for (ids, state) in [(started, "up"), (replaced, "draining")] {
            for id in ids {
                sqlx::query("UPDATE containers SET state = ? WHERE id = ?")
                    .bind(state)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// The keys of `user`, or everyone's.
    /// Each app's releases in brief, in one query (the dashboard's overview).
    pub async fn release_summaries(&self) -> Result<Vec<ReleaseSummary>> {
        Ok(sqlx::query_as(
            "SELECT app,
                MAX(CASE WHEN status = 'live' THEN version END) AS live,
                MAX(status = 'deploying') AS deploying,
                (SELECT status FROM releases AS n WHERE n.app = r.app
                    ORDER BY version DESC LIMIT 1) AS newest_status,
                MAX(created_at) AS newest_at
             FROM releases AS r GROUP BY app",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn keys(&self, user: Option<&str>) -> Result<Vec<KeyRow>> {
        Ok(sqlx::query_as(
            "SELECT name, fingerprint, created_at, user FROM keys
             WHERE ?1 IS NULL OR user = ?1 ORDER BY name",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn add_key(&self, user: &str, name: &str, key: &ParsedKey) -> Result<()> {
        if let Some((existing, _)) = self.key_owner(&key.openssh).await? {
            return Err(StoreError::KeyExists(existing));
        }
        self.user(user).await?;
        let result = sqlx::query(
            "INSERT INTO keys (name, openssh, fingerprint, created_at, user) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(name)
        .bind(&key.openssh)
        .bind(&key.fingerprint)
        .bind(now())
        .bind(user)
        .execute(&self.pool)
        .await;
        match result {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::KeyNameTaken(name.to_string()))
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    /// Removes the key `name` of `user` (of anyone's for None).
    pub async fn remove_key(&self, user: Option<&str>, name: &str) -> Result<()> {
        let done = sqlx::query("DELETE FROM keys WHERE name = ?1 AND (?2 IS NULL OR user = ?2)")
            .bind(name)
            .bind(user)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::KeyNotFound(name.to_string()));
        }
        Ok(())
    }

    /// The name and user of the stored key equal to `openssh` ("ALGORITHM BASE64"), if any.
    pub async fn key_owner(&self, openssh: &str) -> Result<Option<(String, String)>> {
        let row = sqlx::query("SELECT name, user FROM keys WHERE openssh = ?")
            .bind(openssh)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get("name"), r.get("user"))))
    }

    pub async fn users(&self) -> Result<Vec<UserRow>> {
        Ok(
            sqlx::query_as("SELECT name, admin, created_at FROM users ORDER BY name")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    pub async fn user(&self, name: &str) -> Result<UserRow> {
        sqlx::query_as("SELECT name, admin, created_at FROM users WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::UserNotFound(name.to_string()))
    }

    /// Adds a user with this password hash (argon2 PHC string).
    pub async fn add_user(&self, name: &str, admin: bool, password_hash: &str) -> Result<()> {
        let result = sqlx::query(
            "INSERT INTO users (name, admin, password_hash, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(name)
        .bind(admin)
        .bind(password_hash)
        .bind(now())
        .execute(&self.pool)
        .await;
        match result {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::UserExists(name.to_string()))
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    /// Removes a user with their keys, tokens and grants.
    pub async fn remove_user(&self, name: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM keys WHERE user = ?")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM users WHERE name = ?")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::UserNotFound(name.to_string()));
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn password_hash(&self, user: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT password_hash FROM users WHERE name = ?")
            .bind(user)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::UserNotFound(user.to_string()))?;
        Ok(row.get("password_hash"))
    }

    pub async fn set_password_hash(&self, user: &str, hash: &str) -> Result<()> {
        let done = sqlx::query("UPDATE users SET password_hash = ? WHERE name = ?")
            .bind(hash)
            .bind(user)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::UserNotFound(user.to_string()));
        }
        Ok(())
    }

    /// Lets `user` use `app` (idempotent).
    pub async fn grant(&self, app: &str, user: &str) -> Result<()> {
        self.require_app(app).await?;
        self.user(user).await?;
        sqlx::query("INSERT OR IGNORE INTO grants (app, user, created_at) VALUES (?, ?, ?)")
            .bind(app)
            .bind(user)
            .bind(now())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Takes `app` from `user`; false when they did not have it.
    pub async fn revoke_grant(&self, app: &str, user: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM grants WHERE app = ? AND user = ?")
            .bind(app)
            .bind(user)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn has_grant(&self, app: &str, user: &str) -> Result<bool> {
        let row = sqlx::query("SELECT 1 FROM grants WHERE app = ? AND user = ?")
            .bind(app)
            .bind(user)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// The apps granted to `user`.
    pub async fn granted_apps(&self, user: &str) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT app FROM grants WHERE user = ? ORDER BY app")
            .bind(user)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| r.get("app")).collect())
    }

    /// The users granted `app`.
    pub async fn app_users(&self, app: &str) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT user FROM grants WHERE app = ? ORDER BY user")
            .bind(app)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| r.get("user")).collect())
    }

    /// Stores a token of `user` by its hash.
    pub async fn add_token(&self, user: &str, name: &str, hash: &str) -> Result<()> {
        self.user(user).await?;
        let result =
            sqlx::query("INSERT INTO tokens (user, name, hash, created_at) VALUES (?, ?, ?, ?)")
                .bind(user)
                .bind(name)
                .bind(hash)
                .bind(now())
                .execute(&self.pool)
                .await;
        match result {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::TokenNameTaken(name.to_string()))
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    /// The tokens of `user`, or everyone's.
    pub async fn tokens(&self, user: Option<&str>) -> Result<Vec<TokenRow>> {
        Ok(sqlx::query_as(
            "SELECT user, name, created_at, last_used_at FROM tokens
             WHERE ?1 IS NULL OR user = ?1 ORDER BY user, name",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn revoke_token(&self, user: &str, name: &str) -> Result<()> {
        let done = sqlx::query("DELETE FROM tokens WHERE user = ? AND name = ?")
            .bind(user)
            .bind(name)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::TokenNotFound(name.to_string()));
        }
        Ok(())
    }

    /// The user (name, admin) whose token has this hash, noting its use.
    pub async fn token_user(&self, hash: &str) -> Result<Option<(String, bool)>> {
        let row = sqlx::query(
            "UPDATE tokens SET last_used_at = ? WHERE hash = ?
             RETURNING user, (SELECT admin FROM users WHERE users.name = tokens.user) AS admin",
        )
        .bind(now())
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| (r.get("user"), r.get("admin"))))
    }

    /// The custom domains of `app`, sorted.
    pub async fn domains(&self, app: &str) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT host FROM domains WHERE app = ? ORDER BY host")
            .bind(app)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| r.get("host")).collect())
    }

    /// Gives `host` to `app`; refuses a host another app (or this one) has.
    pub async fn add_domain(&self, app: &str, host: &str) -> Result<()> {
        self.require_app(app).await?;
        let result = sqlx::query("INSERT INTO domains (host, app, created_at) VALUES (?, ?, ?)")
            .bind(host)
            .bind(app)
            .bind(now())
            .execute(&self.pool)
            .await;
        match result {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                let owner = sqlx::query("SELECT app FROM domains WHERE host = ?")
                    .bind(host)
                    .fetch_one(&self.pool)
                    .await?;
                Err(StoreError::DomainTaken {
                    host: host.to_string(),
                    app: owner.get("app"),
                })
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    pub async fn remove_domain(&self, app: &str, host: &str) -> Result<()> {
        let done = sqlx::query("DELETE FROM domains WHERE host = ? AND app = ?")
            .bind(host)
            .bind(app)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::DomainNotFound {
                host: host.to_string(),
                app: app.to_string(),
            });
        }
        Ok(())
    }

    /// Stores `app`'s certificate, replacing any.
    pub async fn set_cert(&self, app: &str, cert: &CertRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO certs (app, chain, key, redirect_https, created_at) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (app) DO UPDATE SET chain = excluded.chain, key = excluded.key,
                 redirect_https = excluded.redirect_https, created_at = excluded.created_at",
        )
        .bind(app)
        .bind(&cert.chain)
        .bind(&cert.key)
        .bind(cert.redirect_https)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every app's certificate.
    pub async fn certs(&self) -> Result<Vec<CertRow>> {
        Ok(
            sqlx::query_as("SELECT app, chain, key, redirect_https FROM certs ORDER BY app")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Forgets `app`'s certificate; false when it had none.
    pub async fn remove_cert(&self, app: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM certs WHERE app = ?")
            .bind(app)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The slot of `app`'s host uid range (1, 2, …): handed out on first use, the same from
    /// then on, and never the slot of another app, not even of a destroyed one.
    pub async fn user_range(&self, app: &str) -> Result<u32> {
        self.require_app(app).await?;
        sqlx::query("INSERT OR IGNORE INTO user_ranges (app) VALUES (?)")
            .bind(app)
            .execute(&self.pool)
            .await?;
        let slot: i64 = sqlx::query_scalar("SELECT slot FROM user_ranges WHERE app = ?")
            .bind(app)
            .fetch_one(&self.pool)
            .await?;
        Ok(u32::try_from(slot).unwrap_or(u32::MAX))
    }

    /// What `resources:set` changed of `app`'s process types' limits.
    pub async fn resources(&self, app: &str) -> Result<Vec<ResourcesRow>> {
        Ok(sqlx::query_as(
            "SELECT process_type, memory, cpu_millis, pids FROM resources
             WHERE app = ? ORDER BY process_type",
        )
        .bind(app)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Stores the limits of `app`'s process type `row.process_type`, replacing what was set.
    pub async fn set_resources(&self, app: &str, row: &ResourcesRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO resources (app, process_type, memory, cpu_millis, pids)
             VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (app, process_type) DO UPDATE SET memory = excluded.memory,
                 cpu_millis = excluded.cpu_millis, pids = excluded.pids",
        )
        .bind(app)
        .bind(&row.process_type)
        .bind(row.memory)
        .bind(row.cpu_millis)
        .bind(row.pids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// What `builds:set` changed of `app`'s build limits.
    pub async fn build_limits(&self, app: &str) -> Result<BuildLimitsRow> {
        Ok(sqlx::query_as(
            "SELECT memory, cpu_millis, pids, timeout_secs FROM build_limits WHERE app = ?",
        )
        .bind(app)
        .fetch_optional(&self.pool)
        .await?
        .unwrap_or_default())
    }

    /// Stores `app`'s build limits, replacing what was set.
    pub async fn set_build_limits(&self, app: &str, limits: &BuildLimitsRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO build_limits (app, memory, cpu_millis, pids, timeout_secs)
             VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (app) DO UPDATE SET memory = excluded.memory,
                 cpu_millis = excluded.cpu_millis, pids = excluded.pids,
                 timeout_secs = excluded.timeout_secs",
        )
        .bind(app)
        .bind(limits.memory)
        .bind(limits.cpu_millis)
        .bind(limits.pids)
        .bind(limits.timeout_secs)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Turns automatic certificates on for `app` (again), with the given redirect.
    pub async fn set_acme(&self, app: &str, redirect_https: bool) -> Result<()> {
        sqlx::query(
            "INSERT INTO acme (app, redirect_https, enabled_at) VALUES (?, ?, ?)
             ON CONFLICT (app) DO UPDATE SET redirect_https = excluded.redirect_https",
        )
        .bind(app)
        .bind(redirect_https)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records why `app`'s last certificate order failed (None: it succeeded).
    pub async fn set_acme_error(&self, app: &str, error: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE acme SET last_error = ? WHERE app = ?")
            .bind(error)
            .bind(app)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The apps with automatic certificates, or just `app`'s row when given.
    pub async fn acme(&self, app: Option<&str>) -> Result<Vec<AcmeRow>> {
        Ok(sqlx::query_as(
            "SELECT app, redirect_https, last_error FROM acme
             WHERE ?1 IS NULL OR app = ?1 ORDER BY app",
        )
        .bind(app)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Turns automatic certificates off for `app`; false when they were off.
    pub async fn remove_acme(&self, app: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM acme WHERE app = ?")
            .bind(app)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn insert_container(&self, c: &ContainerRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO containers (id, app, release, process_type, number, ip, port, created_at, state, restarts, last_exit, last_exit_oom)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&c.id)
        .bind(&c.app)
        .bind(c.release)
        .bind(&c.process_type)
        .bind(c.number)
        .bind(&c.ip)
        .bind(c.port)
        .bind(&c.created_at)
        .bind(c.state)
        .bind(c.restarts)
        .bind(c.last_exit)
        .bind(c.last_exit_oom)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn set_container_state(&self, id: &str, state: ContainerState) -> Result<()> {
        sqlx::query("UPDATE containers SET state = ? WHERE id = ?")
            .bind(state)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn delete_container(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM containers WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Containers of `app`, or of every app when `app` is None.
    pub async fn containers(&self, app: Option<&str>) -> Result<Vec<ContainerRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM containers WHERE ?1 IS NULL OR app = ?1 ORDER BY app, process_type, number",
        )
        .bind(app)
        .fetch_all(&self.pool)
        .await?)
    }

    /// A new container's creation time, in the store's format.
    pub fn timestamp() -> String {
        now()
    }
}

fn release_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Release> {
    Ok(Release {
        app: r.get("app"),
        version: r.get("version"),
        image: r.get("image"),
        config: serde_json::from_str(r.get("config"))?,
        process_types: serde_json::from_str(r.get("process_types"))?,
        formation: serde_json::from_str(r.get("formation"))?,
        description: r.get("description"),
        created_at: r.get("created_at"),
        status: r.get("status"),
        reason: r.get("reason"),
        created_by: r.get("created_by"),
        checks: serde_json::from_str(r.get("checks"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("berth.db")).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn user_ranges_are_per_app_stable_and_never_reused() {
        let (_dir, s) = store().await;
        for app in ["a", "b", "c"] {
            s.create_app(app).await.unwrap();
        }
        let a = s.user_range("a").await.unwrap();
        let b = s.user_range("b").await.unwrap();
        assert_ne!(a, b);
        assert_eq!(s.user_range("a").await.unwrap(), a, "stable");
        s.delete_app("b").await.unwrap();
        s.create_app("b").await.unwrap();
        let c = s.user_range("c").await.unwrap();
        let b2 = s.user_range("b").await.unwrap();
        assert!(
            ![a, b].contains(&c) && ![a, b, c].contains(&b2),
            "{a} {b} {c} {b2}"
        );
        assert!(matches!(
            s.user_range("nope").await,
            Err(StoreError::AppNotFound(_))
        ));
    }

    #[tokio::test]
    async fn apps_config_releases() {
        let (_dir, s) = store().await;
        s.create_app("hello").await.unwrap();
        assert!(matches!(
            s.create_app("hello").await,
            Err(StoreError::AppExists(_))
        ));
        let apps = s.apps().await.unwrap();
        assert_eq!(
            apps.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
            ["hello"]
        );

        let c = ContainerRow {
            id: "hello-web-1-00000001".into(),
            app: "hello".into(),
            release: 1,
            process_type: "web".into(),
            number: 1,
            ip: "10.9.0.2".into(),
            port: 5000,
            created_at: Store::timestamp(),
            state: ContainerState::Starting,
            restarts: 2,
            last_exit: Some(137),
            last_exit_oom: true,
        };
        s.insert_container(&c).await.unwrap();
        let listed = s.containers(Some("hello")).await.unwrap();
        assert_eq!(
            (
                listed[0].id.as_str(),
                listed[0].port,
                listed[0].state,
                listed[0].restarts,
                listed[0].last_exit,
                listed[0].last_exit_oom
            ),
            (
                c.id.as_str(),
                5000,
                ContainerState::Starting,
                2,
                Some(137),
                true
            )
        );
        s.set_container_state(&c.id, ContainerState::Draining)
            .await
            .unwrap();
        assert_eq!(
            s.containers(None).await.unwrap()[0].state,
            ContainerState::Draining
        );
        assert!(s.containers(Some("other")).await.unwrap().is_empty());
        assert_eq!(s.containers(None).await.unwrap().len(), 1);
        s.delete_container(&c.id).await.unwrap();
        assert!(s.containers(None).await.unwrap().is_empty());
        assert!(matches!(
            s.config("nope").await,
            Err(StoreError::AppNotFound(_))
        ));

        let mut config = Config::new();
        config.insert("GREETING".into(), "hi \"there\"\nünï".into());
        s.replace_config("hello", &config).await.unwrap();
        assert_eq!(s.config("hello").await.unwrap(), config);
        s.delete_app("hello").await.unwrap();
        assert!(!s.app_exists("hello").await.unwrap());
    }

    #[tokio::test]
    async fn releases_move_through_their_states() {
        let (_dir, s) = store().await;
        s.create_app("hello").await.unwrap();
        let new = NewRelease {
            image: "sha256:abc".into(),
            config: [("A".to_string(), "1".to_string())].into(),
            process_types: [("web".to_string(), "python app.py".to_string())].into(),
            formation: [("web".to_string(), 1)].into(),
            description: "Deploy 1234567".into(),
            created_by: "laptop".into(),
            checks: crate::checks::from_app_json(
                r#"{"healthchecks": {"web": [{"path": "/health"}]}}"#,
            )
            .unwrap(),
        };
        let v1 = s.insert_release("hello", &new).await.unwrap();
        assert_eq!((v1.version, v1.status), (1, ReleaseStatus::Deploying));
        assert!(
            s.live_release("hello").await.unwrap().is_none(),
            "deploying is not live"
        );
        s.promote("hello", 1, &[], &[]).await.unwrap();
        let v2 = s.insert_release("hello", &new).await.unwrap();
        assert_eq!(v2.version, 2, "versions count up");
        s.fail_release("hello", 2, "web.1 answered 500")
            .await
            .unwrap();
        let v3 = s.insert_release("hello", &new).await.unwrap();
        assert_eq!(v3.version, 3, "a failed release keeps its number");
        assert_eq!(s.live_release("hello").await.unwrap().unwrap().version, 1);

        // Promoting v3 supersedes v1 and flips the containers' states in one go.
        let row = |id: &str, release| ContainerRow {
            id: id.into(),
            app: "hello".into(),
            release,
            process_type: "web".into(),
            number: 1,
            ip: "10.9.0.2".into(),
            port: 5000,
            created_at: Store::timestamp(),
            state: if release == 1 {
                ContainerState::Up
            } else {
                ContainerState::Starting
            },
            restarts: 0,
            last_exit: None,
            last_exit_oom: false,
        };
        s.insert_container(&row("old", 1)).await.unwrap();
        s.insert_container(&row("new", 3)).await.unwrap();
        s.promote("hello", 3, &["new".into()], &["old".into()])
            .await
            .unwrap();
        let states: Vec<_> = s
            .containers(None)
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.id, c.state))
            .collect();
        assert!(states.contains(&("old".into(), ContainerState::Draining)));
        assert!(states.contains(&("new".into(), ContainerState::Up)));
        let releases = s.releases("hello").await.unwrap();
        let summary: Vec<_> = releases
            .iter()
            .map(|r| {
                (
                    r.version,
                    r.status,
                    r.reason.as_str(),
                    r.created_by.as_str(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (3, ReleaseStatus::Live, "", "laptop"),
                (2, ReleaseStatus::Failed, "web.1 answered 500", "laptop"),
                (1, ReleaseStatus::Superseded, "", "laptop"),
            ]
        );
        assert_eq!(releases[0].config, new.config);
        assert_eq!(releases[0].checks, new.checks);

        // A server stop in the middle of v4's switch: the next start marks it failed.
        s.insert_release("hello", &new).await.unwrap();
        assert_eq!(
            s.fail_interrupted("cut short").await.unwrap(),
            vec![("hello".to_string(), 4)]
        );
        assert_eq!(
            s.release("hello", 4).await.unwrap().unwrap().status,
            ReleaseStatus::Failed
        );
        assert_eq!(s.live_release("hello").await.unwrap().unwrap().version, 3);

        s.delete_app("hello").await.unwrap();
        s.create_app("hello").await.unwrap();
        assert_eq!(
            s.insert_release("hello", &new).await.unwrap().version,
            1,
            "releases went with the app"
        );
    }

    #[tokio::test]
    async fn domains_have_one_owner() {
        let (_dir, s) = store().await;
        s.create_app("a").await.unwrap();
        s.create_app("b").await.unwrap();
        s.add_domain("a", "www.example.com").await.unwrap();
        s.add_domain("a", "example.com").await.unwrap();
        assert!(matches!(
            s.add_domain("b", "www.example.com").await,
            Err(StoreError::DomainTaken { app, .. }) if app == "a"
        ));
        assert_eq!(
            s.domains("a").await.unwrap(),
            ["example.com", "www.example.com"]
        );
        assert!(matches!(
            s.remove_domain("b", "example.com").await,
            Err(StoreError::DomainNotFound { .. })
        ));
        s.remove_domain("a", "example.com").await.unwrap();
        let cert = |chain: &str, redirect_https| CertRow {
            app: "a".into(),
            chain: chain.into(),
            key: "key".into(),
            redirect_https,
        };
        s.set_cert("a", &cert("chain1", false)).await.unwrap();
        s.set_cert("a", &cert("chain2", true)).await.unwrap();
        assert_eq!(s.certs().await.unwrap(), [cert("chain2", true)]);
        s.delete_app("a").await.unwrap();
        assert!(
            s.certs().await.unwrap().is_empty(),
            "certs went with the app"
        );
        assert!(!s.remove_cert("a").await.unwrap());
        s.add_domain("b", "www.example.com").await.unwrap();
    }

    #[tokio::test]
    async fn limits_and_acme_settings_round_trip_and_go_with_their_app() {
        let (_dir, s) = store().await;
        s.create_app("a").await.unwrap();
        assert_eq!(
            s.build_limits("a").await.unwrap(),
            BuildLimitsRow::default()
        );
        let build = BuildLimitsRow {
            memory: Some(1 << 30),
            timeout_secs: Some(60),
            ..Default::default()
        };
        s.set_build_limits("a", &build).await.unwrap();
        assert_eq!(s.build_limits("a").await.unwrap(), build);
        let web = ResourcesRow {
            process_type: "web".into(),
            memory: Some(256 << 20),
            cpu_millis: Some(500),
            pids: None,
        };
        s.set_resources("a", &web).await.unwrap();
        let cheaper = ResourcesRow {
            cpu_millis: Some(250),
            ..web.clone()
        };
        s.set_resources("a", &cheaper).await.unwrap();
        assert_eq!(s.resources("a").await.unwrap(), vec![cheaper]);
        s.set_acme("a", true).await.unwrap();
        s.set_acme_error("a", Some("no DNS")).await.unwrap();
        let acme = s.acme(Some("a")).await.unwrap();
        assert_eq!(
            (acme[0].redirect_https, acme[0].last_error.as_deref()),
            (true, Some("no DNS"))
        );
        s.delete_app("a").await.unwrap();
        assert!(s.resources("a").await.unwrap().is_empty());
        assert!(s.acme(None).await.unwrap().is_empty());
        assert_eq!(
            s.build_limits("a").await.unwrap(),
            BuildLimitsRow::default()
        );
    }

    #[tokio::test]
    async fn keys_belong_to_users() {
        let (_dir, s) = store().await;
        let key = ParsedKey {
            openssh: "ssh-ed25519 AAAA".into(),
            fingerprint: "SHA256:x".into(),
        };
        // `admin` exists from the start; other users must be added first.
        s.add_key("admin", "laptop", &key).await.unwrap();
        assert!(
            matches!(s.add_key("admin", "other", &key).await, Err(StoreError::KeyExists(n)) if n == "laptop")
        );
        let key2 = ParsedKey {
            openssh: "ssh-ed25519 BBBB".into(),
            fingerprint: "SHA256:y".into(),
        };
        assert!(matches!(
            s.add_key("admin", "laptop", &key2).await,
            Err(StoreError::KeyNameTaken(_))
        ));
        assert!(matches!(
            s.add_key("alice", "alices", &key2).await,
            Err(StoreError::UserNotFound(_))
        ));
        s.add_user("alice", false, "hash").await.unwrap();
        s.add_key("alice", "alices", &key2).await.unwrap();
        assert_eq!(
            s.key_owner("ssh-ed25519 AAAA").await.unwrap(),
            Some(("laptop".into(), "admin".into()))
        );
        let keys = s.keys(Some("alice")).await.unwrap();
        assert_eq!(
            (
                keys.len(),
                keys[0].name.as_str(),
                keys[0].fingerprint.as_str()
            ),
            (1, "alices", "SHA256:y")
        );
        assert_eq!(s.keys(None).await.unwrap().len(), 2);
        // Only the owner's name matches when a user is given.
        assert!(matches!(
            s.remove_key(Some("alice"), "laptop").await,
            Err(StoreError::KeyNotFound(_))
        ));
        s.remove_key(None, "laptop").await.unwrap();
        assert_eq!(s.key_owner("ssh-ed25519 AAAA").await.unwrap(), None);
        // Removing a user removes their keys and tokens.
        s.add_token("alice", "ci", "h1").await.unwrap();
        assert_eq!(
            s.token_user("h1").await.unwrap(),
            Some(("alice".into(), false))
        );
        s.remove_user("alice").await.unwrap();
        assert_eq!(s.key_owner("ssh-ed25519 BBBB").await.unwrap(), None);
        assert_eq!(s.token_user("h1").await.unwrap(), None);
    }

    #[tokio::test]
    async fn grants_and_tokens() {
        let (_dir, s) = store().await;
        s.create_app("shop").await.unwrap();
        s.add_user("bob", false, "hash").await.unwrap();
        assert!(!s.has_grant("shop", "bob").await.unwrap());
        s.grant("shop", "bob").await.unwrap();
        s.grant("shop", "bob").await.unwrap();
        assert!(s.has_grant("shop", "bob").await.unwrap());
        assert_eq!(s.granted_apps("bob").await.unwrap(), ["shop"]);
        assert!(s.revoke_grant("shop", "bob").await.unwrap());
        assert!(!s.revoke_grant("shop", "bob").await.unwrap());
        s.add_token("bob", "laptop", "hash-1").await.unwrap();
        assert!(matches!(
            s.add_token("bob", "laptop", "hash-2").await,
            Err(StoreError::TokenNameTaken(_))
        ));
        assert_eq!(s.tokens(Some("bob")).await.unwrap()[0].last_used_at, None);
        assert!(s.token_user("hash-1").await.unwrap().is_some());
        assert!(s.tokens(Some("bob")).await.unwrap()[0]
            .last_used_at
            .is_some());
        s.revoke_token("bob", "laptop").await.unwrap();
        assert_eq!(s.token_user("hash-1").await.unwrap(), None);
    }
}

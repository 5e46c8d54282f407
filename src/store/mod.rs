//! berth's state in SQLite (sqlx, WAL, `migrations/`): apps, config, releases, SSH keys and the
//! containers the daemon runs. Owns every SQL statement; callers get plain structs.
//! Must not decide anything (that is `deploy`'s job) and must not touch files outside the database.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;
use thiserror::Error;

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
    #[error("database error: {0} — check that the data directory is writable and not full")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0} — was the data directory made by a newer berth?")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt record in the database: {0}")]
    Corrupt(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AppRow {
    pub name: String,
    pub created_at: String,
}

/// Process type → command.
pub type ProcessTypes = BTreeMap<String, String>;
/// Process type → number of containers.
pub type Formation = BTreeMap<String, u32>;

/// An immutable release `vN` of an app.
#[derive(Debug, Clone, Serialize)]
pub struct Release {
    pub app: String,
    pub version: i64,
    pub image: String,
    pub config: Config,
    pub process_types: ProcessTypes,
    pub formation: Formation,
    pub description: String,
    pub created_at: String,
}

/// What a new release is made of; the store assigns the version.
#[derive(Debug, Clone)]
pub struct NewRelease {
    pub image: String,
    pub config: Config,
    pub process_types: ProcessTypes,
    pub formation: Formation,
    pub description: String,
}

impl NewRelease {
    /// The release this becomes as version `version` of `app`.
    pub fn release(&self, app: &str, version: i64, created_at: String) -> Release {
        Release {
            app: app.to_string(),
            version,
            image: self.image.clone(),
            config: self.config.clone(),
            process_types: self.process_types.clone(),
            formation: self.formation.clone(),
            description: self.description.clone(),
            created_at,
        }
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct KeyRow {
    pub name: String,
    pub fingerprint: String,
    pub created_at: String,
}

/// A container the daemon started.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ContainerRow {
    pub id: String,
    pub app: String,
    pub release: i64,
    pub process_type: String,
    pub number: i64,
    pub ip: String,
    pub port: i64,
    pub created_at: String,
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

    pub async fn current_release(&self, app: &str) -> Result<Option<Release>> {
        let row = sqlx::query("SELECT * FROM releases WHERE app = ? ORDER BY version DESC LIMIT 1")
            .bind(app)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(release_from_row).transpose()
    }

    /// The version the next release of `app` will get.
    pub async fn next_version(&self, app: &str) -> Result<i64> {
        let row =
            sqlx::query("SELECT COALESCE(MAX(version), 0) + 1 AS v FROM releases WHERE app = ?")
                .bind(app)
                .fetch_one(&self.pool)
                .await?;
        Ok(row.get("v"))
    }

    /// Records release `version` of `app`. Callers hold the app's deploy lock, so versions are
    /// assigned by [`Store::next_version`] without races; the primary key still refuses a twin.
    pub async fn insert_release(
        &self,
        app: &str,
        version: i64,
        new: &NewRelease,
    ) -> Result<Release> {
        let created_at = now();
        sqlx::query(
            "INSERT INTO releases (app, version, image, config, process_types, formation, description, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(app)
        .bind(version)
        .bind(&new.image)
        .bind(serde_json::to_string(&new.config)?)
        .bind(serde_json::to_string(&new.process_types)?)
        .bind(serde_json::to_string(&new.formation)?)
        .bind(&new.description)
        .bind(&created_at)
        .execute(&self.pool)
        .await?;
        Ok(new.release(app, version, created_at))
    }

    pub async fn keys(&self) -> Result<Vec<KeyRow>> {
        Ok(
            sqlx::query_as("SELECT name, fingerprint, created_at FROM keys ORDER BY name")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    pub async fn add_key(&self, name: &str, key: &ParsedKey) -> Result<()> {
        if let Some(existing) = self.key_name(&key.openssh).await? {
            return Err(StoreError::KeyExists(existing));
        }
        let result = sqlx::query(
            "INSERT INTO keys (name, openssh, fingerprint, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(name)
        .bind(&key.openssh)
        .bind(&key.fingerprint)
        .bind(now())
        .execute(&self.pool)
        .await;
        match result {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::KeyNameTaken(name.to_string()))
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    pub async fn remove_key(&self, name: &str) -> Result<()> {
        let done = sqlx::query("DELETE FROM keys WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::KeyNotFound(name.to_string()));
        }
        Ok(())
    }

    /// The name of the stored key equal to `openssh` ("ALGORITHM BASE64"), if any.
    pub async fn key_name(&self, openssh: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT name FROM keys WHERE openssh = ?")
            .bind(openssh)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get("name")))
    }

    pub async fn insert_container(&self, c: &ContainerRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO containers (id, app, release, process_type, number, ip, port, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&c.id)
        .bind(&c.app)
        .bind(c.release)
        .bind(&c.process_type)
        .bind(c.number)
        .bind(&c.ip)
        .bind(c.port)
        .bind(&c.created_at)
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
        };
        s.insert_container(&c).await.unwrap();
        let listed = s.containers(Some("hello")).await.unwrap();
        assert_eq!(
            (listed[0].id.as_str(), listed[0].port),
            (c.id.as_str(), 5000)
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

        assert_eq!(s.next_version("hello").await.unwrap(), 1);
        let new = NewRelease {
            image: "sha256:abc".into(),
            config: config.clone(),
            process_types: [("web".to_string(), "python app.py".to_string())].into(),
            formation: [("web".to_string(), 1)].into(),
            description: "Deploy 1234567".into(),
        };
        s.insert_release("hello", 1, &new).await.unwrap();
        assert!(
            s.insert_release("hello", 1, &new).await.is_err(),
            "versions are unique"
        );
        s.insert_release("hello", 2, &new).await.unwrap();
        let releases = s.releases("hello").await.unwrap();
        assert_eq!(
            releases.iter().map(|r| r.version).collect::<Vec<_>>(),
            vec![2, 1]
        );
        assert_eq!(releases[0].config, config);
        assert_eq!(
            s.current_release("hello").await.unwrap().unwrap().version,
            2
        );

        s.delete_app("hello").await.unwrap();
        assert!(!s.app_exists("hello").await.unwrap());
        assert_eq!(
            s.next_version("hello").await.unwrap(),
            1,
            "releases went with the app"
        );
    }

    #[tokio::test]
    async fn keys() {
        let (_dir, s) = store().await;
        let key = ParsedKey {
            openssh: "ssh-ed25519 AAAA".into(),
            fingerprint: "SHA256:x".into(),
        };
        s.add_key("laptop", &key).await.unwrap();
        assert!(
            matches!(s.add_key("other", &key).await, Err(StoreError::KeyExists(n)) if n == "laptop")
        );
        let key2 = ParsedKey {
            openssh: "ssh-ed25519 BBBB".into(),
            fingerprint: "SHA256:y".into(),
        };
        assert!(matches!(
            s.add_key("laptop", &key2).await,
            Err(StoreError::KeyNameTaken(_))
        ));
        assert_eq!(
            s.key_name("ssh-ed25519 AAAA").await.unwrap().as_deref(),
            Some("laptop")
        );
        let keys = s.keys().await.unwrap();
        assert_eq!(
            (keys[0].name.as_str(), keys[0].fingerprint.as_str()),
            ("laptop", "SHA256:x")
        );
        s.remove_key("laptop").await.unwrap();
        assert_eq!(s.key_name("ssh-ed25519 AAAA").await.unwrap(), None);
        assert!(matches!(
            s.remove_key("laptop").await,
            Err(StoreError::KeyNotFound(_))
        ));
    }
}

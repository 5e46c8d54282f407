//! Users, their SSH keys and API tokens, and how each front end learns who is asking.
//! Passwords (for the dashboard) are kept as argon2 hashes; tokens as SHA-256 hashes (they are
//! 256 random bits, so a slow hash adds nothing).

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Caller, Error, Kind, Result, Service};
pub use crate::store::{KeyRow, TokenRow, UserRow};

/// What starts every token, so people (and secret scanners) can tell one.
pub const TOKEN_PREFIX: &str = "berth_";

/// A new user and the password generated for them (shown once).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewUser {
    pub name: String,
    pub admin: bool,
    pub password: String,
}

/// A new token (its secret shown once; only its hash is kept).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedToken {
    pub user: String,
    pub name: String,
    pub token: String,
}

/// A new password (shown once).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewPassword {
    pub user: String,
    pub password: String,
}

impl Service {
    pub async fn users(&self, who: &Caller) -> Result<Vec<UserRow>> {
        self.admin(who, "list users")?;
        Ok(self.store.users().await?)
    }

    /// Adds a user with a generated password.
    pub async fn add_user(&self, who: &Caller, name: &str, admin: bool) -> Result<NewUser> {
        self.admin(who, "add users")?;
        validate_name("user", name)?;
        let password = secret(18);
        self.store
            .add_user(name, admin, &hash_password(&password)?)
            .await?;
        Ok(NewUser {
            name: name.to_string(),
            admin,
            password,
        })
    }

    /// Removes a user with their keys, tokens and grants.
    pub async fn remove_user(&self, who: &Caller, name: &str) -> Result<()> {
        self.admin(who, "remove users")?;
        if name == who.user || name == super::ADMIN {
            return Err(Error::msg(
                Kind::Conflict,
                format!("{name} cannot be removed: it is you or the built-in admin"),
            ));
        }
        Ok(self.store.remove_user(name).await?)
    }

    /// A new generated password for `user` (an admin's for anyone, anyone's for themself).
    pub async fn new_password(&self, who: &Caller, user: &str) -> Result<NewPassword> {
        self.same_or_admin(who, user, "change another user's password")?;
        let password = secret(18);
        self.store
            .set_password_hash(user, &hash_password(&password)?)
            .await?;
        Ok(NewPassword {
            user: user.to_string(),
            password,
        })
    }

    /// The user whose password this is (the dashboard's login).
    pub async fn login(&self, user: &str, password: &str) -> Result<Caller> {
        let refused = || Error::msg(Kind::Unauthorized, "wrong user name or password");
        let hash = match self.store.password_hash(user).await {
            Ok(Some(hash)) => hash,
            _ => return Err(refused()),
        };
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash).is_ok_and(|parsed| {
                argon2::Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
        })
        .await
        .map_err(super::failed)?;
        if !ok {
            return Err(refused());
        }
        let admin = self.store.user(user).await?.admin;
        Ok(Caller {
            user: user.to_string(),
            admin,
        })
    }

    /// The keys of `user` (default: the caller); an admin may list anyone's, or all with "*".
    pub async fn keys(&self, who: &Caller, user: Option<&str>) -> Result<Vec<KeyRow>> {
        let whose = self.whose(who, user, "list other users' keys")?;
        Ok(self.store.keys(whose).await?)
    }

    /// Lets an SSH public key (OpenSSH format) push and run commands as `user` (default: the
    /// caller).
    pub async fn add_key(
        &self,
        who: &Caller,
        user: Option<&str>,
        name: &str,
        key: &str,
    ) -> Result<KeyRow> {
        let user = user.unwrap_or(&who.user);
        self.same_or_admin(who, user, "add a key for another user")?;
        validate_name("key", name)?;
        let parsed = crate::keys::parse(key)?;
        self.store.add_key(user, name, &parsed).await?;
        let keys = self.store.keys(Some(user)).await?;
        keys.into_iter()
            .find(|k| k.name == name)
            .ok_or_else(|| Error::msg(Kind::Failed, "the key was not stored"))
    }

    /// Removes a key of the caller's (an admin's: anyone's).
    pub async fn remove_key(&self, who: &Caller, name: &str) -> Result<()> {
        let owner = (!who.admin).then_some(who.user.as_str());
        Ok(self.store.remove_key(owner, name).await?)
    }

    /// The key's name and the user it belongs to, for the SSH endpoint.
    pub async fn key_owner(&self, openssh_key: &str) -> Option<(String, Caller)> {
        let key = crate::keys::parse(openssh_key).ok()?;
        let (name, user) = self.store.key_owner(&key.openssh).await.ok()??;
        let admin = self.store.user(&user).await.ok()?.admin;
        Some((name, Caller { user, admin }))
    }

    /// The tokens of `user` (default: the caller); an admin may list anyone's, or all with "*".
    pub async fn tokens(&self, who: &Caller, user: Option<&str>) -> Result<Vec<TokenRow>> {
        let whose = self.whose(who, user, "list other users' tokens")?;
        Ok(self.store.tokens(whose).await?)
    }

    /// A new API token for `user` (default: the caller); its secret is returned once.
    pub async fn create_token(
        &self,
        who: &Caller,
        user: Option<&str>,
        name: &str,
    ) -> Result<CreatedToken> {
        let user = user.unwrap_or(&who.user);
        self.same_or_admin(who, user, "create a token for another user")?;
        validate_name("token", name)?;
        let token = format!("{TOKEN_PREFIX}{}", secret(32));
        self.store
            .add_token(user, name, &token_hash(&token))
            .await?;
        Ok(CreatedToken {
            user: user.to_string(),
            name: name.to_string(),
            token,
        })
    }

    pub async fn revoke_token(&self, who: &Caller, user: Option<&str>, name: &str) -> Result<()> {
        let user = user.unwrap_or(&who.user);
        self.same_or_admin(who, user, "revoke another user's token")?;
        Ok(self.store.revoke_token(user, name).await?)
    }

    /// A user as a caller (for a key's owner).
    pub async fn caller(&self, user: &str) -> Result<Caller> {
        let row = self.store.user(user).await?;
        Ok(Caller {
            user: row.name,
            admin: row.admin,
        })
    }

    /// Who a bearer token belongs to.
    pub async fn authenticate(&self, token: &str) -> Result<Caller> {
        let refused = || {
            Error::msg(
                Kind::Unauthorized,
                "the token is unknown or was revoked — create one with `berth tokens:create NAME`",
            )
        };
        if !token.starts_with(TOKEN_PREFIX) || token.len() > 128 {
            return Err(refused());
        }
        match self.store.token_user(&token_hash(token)).await? {
            Some((user, admin)) => Ok(Caller { user, admin }),
            None => Err(refused()),
        }
    }

    /// Whose things a listing shows: `user` (default: the caller's own), or everyone's (None)
    /// for "*"; another user's or everyone's only for an admin.
    fn whose<'a>(
        &self,
        who: &'a Caller,
        user: Option<&'a str>,
        what: &str,
    ) -> Result<Option<&'a str>> {
        match user {
            Some("*") => self.admin(who, what).map(|()| None),
            user => {
                let user = user.unwrap_or(&who.user);
                self.same_or_admin(who, user, what)?;
                Ok(Some(user))
            }
        }
    }

    fn same_or_admin(&self, who: &Caller, user: &str, what: &str) -> Result<()> {
        match who.user == user {
            true => Ok(()),
            false => self.admin(who, what),
        }
    }
}

/// `bytes` random bytes, base64url.
fn secret(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut raw);
    B64.encode(raw)
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn hash_password(password: &str) -> Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::msg(Kind::Failed, format!("cannot hash the password: {e}")))
}

/// Names of users, keys and tokens: 1–64 characters, no spaces or control characters.
fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "*"
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/');
    match ok {
        true => Ok(()),
        false => Err(Error::msg(
            Kind::Invalid,
            format!("invalid {what} name {name:?}: use up to 64 characters without spaces or '/' (e.g. laptop)"),
        )),
    }
}

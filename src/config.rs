//! Config vars: the 12-factor environment of an app. Owns the rules for keys and the parsing of
//! `KEY=VALUE` arguments; values are kept byte-exact (spaces, quotes, newlines, non-ASCII).
//! Must not touch the store.

use std::collections::BTreeMap;

use thiserror::Error;

/// An app's config: key → value, sorted by key.
pub type Config = BTreeMap<String, String>;

/// Keys berth sets itself; users may not override them.
pub const RESERVED: &[&str] = &["PORT", "DYNO"];

/// The registry login a Dockerfile's `FROM` pulls with.
pub const REGISTRY_USER: &str = "BERTH_REGISTRY_USER";
pub const REGISTRY_PASSWORD: &str = "BERTH_REGISTRY_PASSWORD";

/// Whether a config var is for berth's pulls only: the login stays out of the app's containers
/// and buildpacks, so a compromised app cannot take it.
pub fn is_registry_login(key: &str) -> bool {
    key == REGISTRY_USER || key == REGISTRY_PASSWORD
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "invalid config key {0:?}: use letters, digits and '_', not starting with a digit (e.g. DATABASE_URL)"
    )]
    InvalidKey(String),
    #[error("config key {0:?} is set by berth itself and cannot be changed")]
    ReservedKey(String),
    #[error("{0:?} is not KEY=VALUE: write e.g. GREETING=hello (quote values with spaces)")]
    NotAPair(String),
    #[error(
        "the value of {0} contains a NUL byte, which no environment variable can hold — remove it"
    )]
    NulInValue(String),
}

/// Checks a config value: anything but NUL, which an environment cannot carry.
pub fn validate_value(key: &str, value: &str) -> Result<(), ConfigError> {
    match value.contains('\0') {
        true => Err(ConfigError::NulInValue(key.to_string())),
        false => Ok(()),
    }
}

/// Checks a config key: `^[A-Za-z_][A-Za-z0-9_]*$` and not reserved.
pub fn validate_key(key: &str) -> Result<(), ConfigError> {
    let mut chars = key.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(ConfigError::InvalidKey(key.to_string()));
    }
    if RESERVED.contains(&key) {
        return Err(ConfigError::ReservedKey(key.to_string()));
    }
    Ok(())
}

/// Parses `KEY=VALUE` arguments; the value is everything after the first `=`, unchanged.
pub fn parse_pairs(pairs: &[String]) -> Result<Config, ConfigError> {
    pairs
        .iter()
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| ConfigError::NotAPair(pair.clone()))?;
            validate_key(key)?;
            validate_value(key, value)?;
            Ok((key.to_string(), value.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for (key, ok) in [
            ("GREETING", true),
            ("_X", true),
            ("db_url2", true),
            ("", false),
            ("1ABC", false),
            ("A-B", false),
            ("A B", false),
            ("PORT", false),
            ("É", false),
        ] {
            assert_eq!(validate_key(key).is_ok(), ok, "{key:?}");
        }
    }

    #[test]
    fn pairs_keep_values_exactly() {
        let value = "hi there \"quoted\" 'single'\nline2 ünïcødé = more";
        let parsed = parse_pairs(&[format!("A={value}"), "B=".into()]).unwrap();
        assert_eq!(parsed["A"], value);
        assert_eq!(parsed["B"], "");
        assert_eq!(
            parse_pairs(&["NOEQUALS".into()]),
            Err(ConfigError::NotAPair("NOEQUALS".into()))
        );
        assert_eq!(
            parse_pairs(&["BAD-KEY=1".into()]),
            Err(ConfigError::InvalidKey("BAD-KEY".into()))
        );
    }
}

//! App names: the one rule for what an app may be called, used by the CLI, the store, SSH and git.
//! Owns validation only; must not touch the store or the filesystem.

use thiserror::Error;

/// Why an app name was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InvalidAppName {
    #[error(
        "invalid app name {0:?}: use 1–63 characters, lowercase letters, digits and '-', starting with a letter (e.g. my-app)"
    )]
    Malformed(String),
    #[error("the app name {0:?} is reserved: berth.<domain> is berth's own host (its API) — pick another name")]
    Reserved(String),
}

/// The name no app may take: `berth.<domain>` is the API's and the dashboard's host.
pub const RESERVED: &str = "berth";

/// Checks `name` against `^[a-z][a-z0-9-]{0,62}$`, and that it is not [`RESERVED`].
pub fn validate(name: &str) -> Result<(), InvalidAppName> {
    if name == RESERVED {
        return Err(InvalidAppName::Reserved(name.to_string()));
    }
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if first_ok && rest_ok && name.len() <= 63 {
        Ok(())
    } else {
        Err(InvalidAppName::Malformed(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn app_names() {
        let long_ok = format!("a{}", "b".repeat(62));
        let too_long = format!("a{}", "b".repeat(63));
        for (name, ok) in [
            ("hello", true),
            ("berth", false),
            ("berth-2", true),
            ("a", true),
            ("my-app-2", true),
            (long_ok.as_str(), true),
            (too_long.as_str(), false),
            ("", false),
            ("Hello", false),
            ("2app", false),
            ("-app", false),
            ("a/b", false),
            ("..", false),
            ("a..b", false),
            ("app_x", false),
            ("app.git", false),
            ("héllo", false),
        ] {
            assert_eq!(validate(name).is_ok(), ok, "{name:?}");
        }
    }
}

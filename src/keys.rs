//! SSH public keys allowed to push: parsing an OpenSSH public key line and its fingerprint.
//! Owns the key format only; must not touch the store or the SSH server.

use russh::keys::{HashAlg, PublicKey};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("not an OpenSSH public key ({0}): pass the .pub file, e.g. ~/.ssh/id_ed25519.pub")]
    Invalid(String),
    #[error("the key file is empty: pass the .pub file, e.g. ~/.ssh/id_ed25519.pub")]
    Empty,
}

/// A parsed public key, as stored: `openssh` is "ALGORITHM BASE64" without the comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    pub openssh: String,
    pub fingerprint: String,
}

/// Parses the first non-comment line of an OpenSSH public key file.
pub fn parse(text: &str) -> Result<ParsedKey, KeyError> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or(KeyError::Empty)?;
    let key = PublicKey::from_openssh(line).map_err(|e| KeyError::Invalid(e.to_string()))?;
    Ok(from_public_key(&key))
}

/// The stored form of a key offered during SSH authentication.
pub fn from_public_key(key: &PublicKey) -> ParsedKey {
    let mut stripped = key.clone();
    stripped.set_comment("");
    let openssh = stripped
        .to_openssh()
        .expect("encoding a parsed public key cannot fail")
        .trim()
        .to_string();
    ParsedKey {
        openssh,
        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPyyKa0frylXklDoR4IIFI/HUs+zh7Yoe75ovkwa43/b me@laptop";

    #[test]
    fn parses_and_strips_comment() {
        let key = parse(&format!("# my key\n\n{ED}\n")).unwrap();
        assert!(key.openssh.starts_with("ssh-ed25519 AAAA"));
        assert!(!key.openssh.contains("me@laptop"));
        assert!(key.fingerprint.starts_with("SHA256:"));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(parse(""), Err(KeyError::Empty)));
        for bad in [
            "hello world",
            "ssh-ed25519 not-base64!!",
            "ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ",
            "-----BEGIN OPENSSH PRIVATE KEY-----",
        ] {
            assert!(matches!(parse(bad), Err(KeyError::Invalid(_))), "{bad}");
        }
    }
}

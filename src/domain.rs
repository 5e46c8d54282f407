//! Custom domains: the one rule for which host names an app may be served at (`domains:add`).
//! Owns validation only; the store keeps who owns a host and `deploy` routes it.

use thiserror::Error;

/// Why a host name was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InvalidDomain {
    #[error("{0:?} is not a host name: use labels of letters, digits and '-' joined by dots, like www.example.com (no scheme, port, path or wildcard)")]
    Malformed(String),
    #[error("{host:?} is reserved for app URLs under {domain} — every app already answers at APP.{domain}; add a host outside it")]
    Reserved { host: String, domain: String },
}

/// Normalizes `host` (lowercase, no trailing dot) and checks it: RFC 1123 labels of 1–63
/// characters, at most 253 in all, at least two labels, not all digits (an IP), and not of the
/// form `NAME.<domain>`, which berth gives every app.
pub fn validate(host: &str, domain: &str) -> Result<String, InvalidDomain> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let malformed = || InvalidDomain::Malformed(host.clone());
    let labels: Vec<&str> = host.split('.').collect();
    let label_ok = |l: &&str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.len() > 253 || labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err(malformed());
    }
    if labels.iter().all(|l| l.bytes().all(|b| b.is_ascii_digit())) {
        return Err(malformed());
    }
    let domain = domain.to_ascii_lowercase();
    if host == domain
        || host
            .strip_suffix(&format!(".{domain}"))
            .is_some_and(|name| !name.contains('.'))
    {
        return Err(InvalidDomain::Reserved { host, domain });
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        let long_label = "a".repeat(64);
        let too_long = format!("{}.com", "a.".repeat(125));
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("www.example.com", Ok("www.example.com")),
            ("WWW.Example.COM.", Ok("www.example.com")),
            ("my-app.example.co.uk", Ok("my-app.example.co.uk")),
            ("a.b.localhost", Ok("a.b.localhost")),
            ("xn--bcher-kva.example", Ok("xn--bcher-kva.example")),
            ("example", Err("malformed")),
            ("", Err("malformed")),
            ("-bad.example.com", Err("malformed")),
            ("bad-.example.com", Err("malformed")),
            ("a..example.com", Err("malformed")),
            ("*.example.com", Err("malformed")),
            ("http://example.com", Err("malformed")),
            ("example.com:8080", Err("malformed")),
            ("example.com/path", Err("malformed")),
            ("under_score.example.com", Err("malformed")),
            ("10.0.0.1", Err("malformed")),
            (&long_label, Err("malformed")),
            (&too_long, Err("malformed")),
            ("other.localhost", Err("reserved")),
            ("localhost", Err("malformed")),
        ];
        for (host, want) in cases {
            let got = validate(host, "localhost");
            match (want, &got) {
                (Ok(norm), Ok(h)) => assert_eq!(h, norm, "{host}"),
                (Err("malformed"), Err(InvalidDomain::Malformed(_))) => {}
                (Err("reserved"), Err(InvalidDomain::Reserved { .. })) => {}
                _ => panic!("{host:?}: want {want:?}, got {got:?}"),
            }
        }
        assert!(matches!(
            validate("apps.example.com", "example.com"),
            Err(InvalidDomain::Reserved { .. })
        ));
        assert_eq!(
            validate("example.com", "apps.example.com").unwrap(),
            "example.com"
        );
        assert!(matches!(
            validate("example.com", "example.com"),
            Err(InvalidDomain::Reserved { .. })
        ));
    }
}

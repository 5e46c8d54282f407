//! The output of a buildpack's `bin/release` (Heroku buildpack API v2), read with a YAML parser:
//!
//! ```yaml
//! ---
//! default_process_types:
//!   web: python app.py
//! ```
//!
//! Only `default_process_types` is used (other keys such as `addons:` or `config_vars:` are
//! ignored). Owns only that format; must not touch the filesystem or run anything.

use serde::Deserialize;

use super::procfile::valid_name;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    /// `message` is the parser's, with the line and column.
    #[error("bin/release output: {message} — fix the buildpack's bin/release")]
    Yaml {
        line: Option<usize>,
        message: String,
    },
    #[error("bin/release output: default_process_types must map names to commands, e.g. `web: python app.py` — fix the buildpack's bin/release")]
    NotAMap,
    #[error("bin/release output: process type `{name}` must be a name of letters, digits, `_` and `-` with a non-empty command — fix the buildpack's bin/release")]
    BadEntry { name: String },
}

#[derive(Deserialize)]
struct Release {
    #[serde(default)]
    default_process_types: Option<serde_norway::Value>,
}

/// The `default_process_types` of a `bin/release` output, in order. Empty, `{}`, `~` or a
/// missing section give no process types.
pub fn default_process_types(yaml: &str) -> Result<Vec<(String, String)>, ReleaseError> {
    if yaml.trim().is_empty() {
        return Ok(Vec::new());
    }
    let release: Option<Release> =
        serde_norway::from_str(yaml).map_err(|e| ReleaseError::Yaml {
            line: e.location().map(|l| l.line()),
            message: e.to_string(),
        })?;
    let types = match release.and_then(|r| r.default_process_types) {
        None | Some(serde_norway::Value::Null) => return Ok(Vec::new()),
        Some(serde_norway::Value::Mapping(map)) => map,
        Some(_) => return Err(ReleaseError::NotAMap),
    };
    let mut out = Vec::new();
    for (name, command) in types {
        let text = |v: &serde_norway::Value| match v {
            serde_norway::Value::String(s) => Some(s.trim().to_string()),
            _ => None,
        };
        match (text(&name), text(&command)) {
            (Some(name), Some(command)) if valid_name(&name) && !command.is_empty() => {
                out.push((name, command))
            }
            (shown, _) => {
                return Err(ReleaseError::BadEntry {
                    name: shown.unwrap_or_else(|| format!("{name:?}")),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_process_types() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("", &[]),
            ("---\n", &[]),
            ("--- {}\n", &[]),
            ("---\ndefault_process_types: {}\n", &[]),
            ("default_process_types:\n", &[]),
            ("---\naddons: []\n", &[]),
            (
                "---\ndefault_process_types:\n  web: gunicorn app:app --bind 0.0.0.0:$PORT\n  worker: \"python w.py\"\n",
                &[
                    ("web", "gunicorn app:app --bind 0.0.0.0:$PORT"),
                    ("worker", "python w.py"),
                ],
            ),
            (
                "addons:\n  - heroku-postgresql\ndefault_process_types:\n\n    web: 'python -m http.server $PORT'\nconfig_vars:\n  A: b\n",
                &[("web", "python -m http.server $PORT")],
            ),
            // Flow style and block scalars, which a line-by-line reader would get wrong.
            (
                "default_process_types: {web: node server.js, worker: 'x'}\n",
                &[("web", "node server.js"), ("worker", "x")],
            ),
            (
                "default_process_types:\n  clock: >-\n    python\n    clock.py\n",
                &[("clock", "python clock.py")],
            ),
        ];
        for (yaml, want) in cases {
            let want: Vec<(String, String)> = want
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            assert_eq!(default_process_types(yaml), Ok(want), "yaml {yaml:?}");
        }
    }

    #[test]
    fn rejects_bad_output() {
        let line = |yaml: &str| match default_process_types(yaml) {
            Err(ReleaseError::Yaml { line, .. }) => line,
            other => panic!("{yaml:?}: {other:?}"),
        };
        assert_eq!(
            line("---\ndefault_process_types:\n  web: a\n  x: [\n"),
            Some(5)
        );
        assert_eq!(
            line("default_process_types:\n  web: a\n  web: b\n"),
            Some(2)
        );
        for (yaml, want) in [
            ("default_process_types: web\n", ReleaseError::NotAMap),
            (
                "default_process_types:\n  web app: x\n",
                ReleaseError::BadEntry {
                    name: "web app".into(),
                },
            ),
            (
                "default_process_types:\n  web:\n",
                ReleaseError::BadEntry { name: "web".into() },
            ),
        ] {
            assert_eq!(default_process_types(yaml), Err(want), "yaml {yaml:?}");
        }
        let message = default_process_types("default_process_types:\n  web: [\n")
            .unwrap_err()
            .to_string();
        assert!(message.contains("at line 3"), "{message}");
    }
}

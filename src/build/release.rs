//! The output of a buildpack's `bin/release`: the tiny YAML subset Heroku buildpacks print,
//!
//! ```yaml
//! ---
//! default_process_types:
//!   web: python app.py
//! ```
//!
//! Owns only that format (other top-level keys such as `addons:` are ignored); must not touch
//! the filesystem or run anything.

use super::procfile::valid_name;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    #[error("bin/release output line {line}: expected `name: command` under default_process_types, got `{text}` — fix the buildpack's bin/release")]
    BadLine { line: usize, text: String },
    #[error("bin/release output line {line}: process type `{name}` may only use letters, digits, `_` and `-` — fix the buildpack's bin/release")]
    BadName { line: usize, name: String },
    #[error("bin/release output line {line}: process type `{name}` appears twice — fix the buildpack's bin/release")]
    Duplicate { line: usize, name: String },
}

/// The `default_process_types` of a `bin/release` output, in order. Empty, `{}` or a missing
/// section give no process types.
pub fn default_process_types(yaml: &str) -> Result<Vec<(String, String)>, ReleaseError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut in_section = false;
    for (i, raw) in yaml.lines().enumerate() {
        let line = i + 1;
        let text = raw.trim_end();
        let content = text.trim_start();
        if content.is_empty() || content.starts_with('#') || content == "---" {
            continue;
        }
        let indented = text.len() != content.len();
        if !indented {
            // A top-level key: ours, or another one we skip (its indented lines too).
            in_section = false;
            if let Some(rest) = content.strip_prefix("default_process_types:") {
                let rest = rest.trim();
                if !(rest.is_empty() || rest == "{}" || rest == "~" || rest == "null") {
                    return Err(ReleaseError::BadLine {
                        line,
                        text: content.to_string(),
                    });
                }
                in_section = rest.is_empty();
            }
            continue;
        }
        if !in_section {
            continue;
        }
        let Some((name, command)) = content.split_once(':') else {
            return Err(ReleaseError::BadLine {
                line,
                text: content.to_string(),
            });
        };
        let name = unquote(name.trim());
        let command = unquote(command.trim());
        if !valid_name(name) {
            return Err(ReleaseError::BadName {
                line,
                name: name.to_string(),
            });
        }
        if command.is_empty() {
            return Err(ReleaseError::BadLine {
                line,
                text: content.to_string(),
            });
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(ReleaseError::Duplicate {
                line,
                name: name.to_string(),
            });
        }
        out.push((name.to_string(), command.to_string()));
    }
    Ok(out)
}

/// Strips one pair of matching surrounding quotes (`'…'` or `"…"`).
fn unquote(s: &str) -> &str {
    for q in ['\'', '"'] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return &s[1..s.len() - 1];
        }
    }
    s
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
    fn rejects_bad_output_with_line_numbers() {
        use ReleaseError::*;
        let cases: &[(&str, ReleaseError)] = &[
            (
                "---\ndefault_process_types:\n  web python\n",
                BadLine {
                    line: 3,
                    text: "web python".into(),
                },
            ),
            (
                "default_process_types:\n  web app: x\n",
                BadName {
                    line: 2,
                    name: "web app".into(),
                },
            ),
            (
                "default_process_types:\n  web:\n",
                BadLine {
                    line: 2,
                    text: "web:".into(),
                },
            ),
            (
                "default_process_types:\n  web: a\n  web: b\n",
                Duplicate {
                    line: 3,
                    name: "web".into(),
                },
            ),
            (
                "default_process_types: web\n",
                BadLine {
                    line: 1,
                    text: "default_process_types: web".into(),
                },
            ),
        ];
        for (yaml, want) in cases {
            assert_eq!(
                default_process_types(yaml).as_ref(),
                Err(want),
                "yaml {yaml:?}"
            );
        }
    }
}

//! Procfile parsing: `name: command` lines → process types.
//!
//! Owns only the Procfile format; must not touch the filesystem or run anything. Errors carry
//! the 1-based line number and say how to fix the line.

/// A Procfile line that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcfileError {
    #[error("Procfile line {line}: expected `name: command`, got `{text}` — add a process type name and a colon, e.g. `web: python app.py`")]
    MissingColon { line: usize, text: String },
    #[error("Procfile line {line}: process type `{name}` may only use letters, digits, `_` and `-` — rename it, e.g. `web` or `worker-2`")]
    BadName { line: usize, name: String },
    #[error(
        "Procfile line {line}: process type `{name}` has no command — write one after the colon"
    )]
    EmptyCommand { line: usize, name: String },
    #[error("Procfile line {line}: process type `{name}` is already defined on line {first} — keep one of them")]
    Duplicate {
        line: usize,
        name: String,
        first: usize,
    },
}

/// Parses a Procfile into `(process type, command)` pairs in file order.
/// Blank lines and lines starting with `#` are ignored.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, ProcfileError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut first_line: Vec<usize> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let Some((name, command)) = trimmed.split_once(':') else {
            return Err(ProcfileError::MissingColon {
                line,
                text: trimmed.to_string(),
            });
        };
        let name = name.trim();
        if !valid_name(name) {
            return Err(ProcfileError::BadName {
                line,
                name: name.to_string(),
            });
        }
        let command = command.trim();
        if command.is_empty() {
            return Err(ProcfileError::EmptyCommand {
                line,
                name: name.to_string(),
            });
        }
        if let Some(pos) = out.iter().position(|(n, _)| n == name) {
            return Err(ProcfileError::Duplicate {
                line,
                name: name.to_string(),
                first: first_line[pos],
            });
        }
        out.push((name.to_string(), command.to_string()));
        first_line.push(line);
    }
    Ok(out)
}

/// `^[a-zA-Z0-9_-]+$`
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn parses_good_procfiles() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("", &[]),
            ("# only a comment\n\n", &[]),
            ("web: python app.py", &[("web", "python app.py")]),
            (
                "web: gunicorn app:app --bind 0.0.0.0:$PORT\r\n\n# jobs\nworker_2:  python w.py  \nrelease-x:echo hi\n",
                &[
                    ("web", "gunicorn app:app --bind 0.0.0.0:$PORT"),
                    ("worker_2", "python w.py"),
                    ("release-x", "echo hi"),
                ],
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text), Ok(pairs(want)), "Procfile {text:?}");
        }
    }

    #[test]
    fn rejects_bad_lines_with_their_number() {
        use ProcfileError::*;
        let cases: &[(&str, ProcfileError)] = &[
            (
                "web: a\npython app.py\n",
                MissingColon {
                    line: 2,
                    text: "python app.py".into(),
                },
            ),
            (
                "\n\nweb app: python\n",
                BadName {
                    line: 3,
                    name: "web app".into(),
                },
            ),
            (
                ": python\n",
                BadName {
                    line: 1,
                    name: "".into(),
                },
            ),
            (
                "web.1: python\n",
                BadName {
                    line: 1,
                    name: "web.1".into(),
                },
            ),
            (
                "# c\nworker:   \n",
                EmptyCommand {
                    line: 2,
                    name: "worker".into(),
                },
            ),
            (
                "web: a\n# c\nworker: b\nweb: c\n",
                Duplicate {
                    line: 4,
                    name: "web".into(),
                    first: 1,
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse(text).as_ref(), Err(want), "Procfile {text:?}");
        }
        let message = parse("web: a\nweb: b").unwrap_err().to_string();
        assert!(
            message.contains("line 2") && message.contains("line 1"),
            "{message}"
        );
    }
}

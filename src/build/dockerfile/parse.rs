//! The Dockerfile syntax: parser directives (`# escape=`), comments, line continuations, heredocs
//! (`RUN <<EOF`, `COPY <<EOF dest`), instruction flags and the JSON (exec) form. Every
//! instruction keeps its line number; an unknown or malformed one is a [`ParseError`] naming the
//! line and showing it. Words (`ENV a="b c"`) are split and `$VARS` expanded by [`words`] when a
//! step runs, because values depend on the `ARG`s and `ENV`s before it.
//!
//! Owns only the syntax; must not read files or run anything.

use std::collections::BTreeMap;

use thiserror::Error;

/// Why a Dockerfile was refused; shown to the pusher.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("Dockerfile line {line}: {problem}\n    {text}\nfix the Dockerfile and push again")]
pub struct ParseError {
    pub line: usize,
    pub text: String,
    pub problem: String,
}

/// A command in shell form (`RUN make all`) or exec form (`RUN ["make", "all"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Shell(String),
    Exec(Vec<String>),
}

/// A parsed instruction. Word arguments stay unexpanded (see [`words`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    From {
        image: String,
        name: Option<String>,
    },
    Run(Command),
    /// `COPY` (and `ADD`, with `add`): sources, then the destination, unexpanded; heredoc
    /// sources carry their text in `heredocs` (name → body).
    Copy {
        add: bool,
        args: Vec<String>,
        from: Option<String>,
        chown: Option<String>,
        chmod: Option<String>,
        heredocs: BTreeMap<String, String>,
    },
    /// `ENV` and `LABEL`: the raw `k=v …` (or legacy `k v`) text.
    Env(String),
    Label(String),
    Arg(String),
    Workdir(String),
    User(String),
    Expose(String),
    Volume(String),
    StopSignal(String),
    Cmd(Command),
    Entrypoint(Command),
    Shell(Vec<String>),
    /// `None` for `HEALTHCHECK NONE`.
    Healthcheck(Option<Healthcheck>),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Healthcheck {
    pub command: Vec<String>,
    pub interval_secs: Option<u64>,
    pub timeout_secs: Option<u64>,
    pub start_period_secs: Option<u64>,
    pub retries: Option<u32>,
}

/// One instruction and where it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// 1-based line of the instruction's first line.
    pub line: usize,
    /// The instruction as written (continuations joined), for `Step n/m : …`.
    pub text: String,
    pub kind: Kind,
}

/// Parses a whole Dockerfile.
pub fn parse(text: &str) -> Result<Vec<Instruction>, ParseError> {
    let lines: Vec<&str> = text.lines().collect();
    let escape = escape_directive(&lines)?;
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let start = i;
        let first = lines[i].trim();
        i += 1;
        if first.is_empty() || first.starts_with('#') {
            continue;
        }
        // Join continuation lines; comment and blank lines inside a continuation are dropped.
        let mut logical = String::new();
        let mut current = lines[start].trim_start().to_string();
        loop {
            let trimmed = current.trim_end();
            match trimmed.strip_suffix(escape) {
                Some(head) if i < lines.len() => {
                    logical.push_str(head);
                    logical.push(' ');
                    while i < lines.len() && {
                        let t = lines[i].trim();
                        t.is_empty() || t.starts_with('#')
                    } {
                        i += 1;
                    }
                    match lines.get(i) {
                        Some(next) => {
                            current = next.trim_start().to_string();
                            i += 1;
                        }
                        None => break,
                    }
                }
                _ => {
                    logical.push_str(trimmed);
                    break;
                }
            }
        }
        let fail = |problem: String| ParseError {
            line: start + 1,
            text: logical.clone(),
            problem,
        };
        let (keyword, rest) = split_keyword(&logical);
        let keyword = keyword.to_ascii_uppercase();
        // Heredocs: bodies follow the instruction line.
        let mut heredocs = Vec::new();
        if matches!(keyword.as_str(), "RUN" | "COPY" | "ADD") {
            for (word, strip_tabs) in heredoc_markers(rest) {
                let mut body = String::new();
                loop {
                    let Some(line) = lines.get(i) else {
                        return Err(fail(format!(
                            "the heredoc <<{word} is never closed: end it with a line `{word}`"
                        )));
                    };
                    i += 1;
                    let line = if strip_tabs {
                        line.trim_start_matches('\t')
                    } else {
                        line
                    };
                    if line == word {
                        break;
                    }
                    body.push_str(line);
                    body.push('\n');
                }
                heredocs.push((word, strip_tabs, body));
            }
        }
        let kind = instruction(&keyword, rest, &heredocs).map_err(fail)?;
        out.push(Instruction {
            line: start + 1,
            text: logical.clone(),
            kind,
        });
    }
    match out.first() {
        None => Err(ParseError {
            line: 1,
            text: String::new(),
            problem: "the Dockerfile has no instructions; start it with FROM".into(),
        }),
        Some(first) if !matches!(first.kind, Kind::From { .. } | Kind::Arg(_)) => Err(ParseError {
            line: first.line,
            text: first.text.clone(),
            problem: "the first instruction must be FROM (or ARG before FROM)".into(),
        }),
        Some(_) => {
            if let Some(bad) = out
                .iter()
                .take_while(|i| !matches!(i.kind, Kind::From { .. }))
                .find(|i| !matches!(i.kind, Kind::Arg(_)))
            {
                return Err(ParseError {
                    line: bad.line,
                    text: bad.text.clone(),
                    problem: "only ARG may come before the first FROM".into(),
                });
            }
            if !out.iter().any(|i| matches!(i.kind, Kind::From { .. })) {
                return Err(ParseError {
                    line: out[0].line,
                    text: out[0].text.clone(),
                    problem: "the Dockerfile has no FROM".into(),
                });
            }
            Ok(out)
        }
    }
}

/// `# escape=` among the leading parser directives (default `\`).
fn escape_directive(lines: &[&str]) -> Result<char, ParseError> {
    for (n, line) in lines.iter().enumerate() {
        let Some(directive) = line.trim().strip_prefix('#') else {
            break;
        };
        let Some((key, value)) = directive.split_once('=') else {
            break;
        };
        let key = key.trim().to_ascii_lowercase();
        if key.contains(' ') {
            break;
        }
        if key == "escape" {
            return match value.trim() {
                "\\" => Ok('\\'),
                "`" => Ok('`'),
                _ => Err(ParseError {
                    line: n + 1,
                    text: line.to_string(),
                    problem: "the escape directive takes `\\` or a backtick".into(),
                }),
            };
        }
    }
    Ok('\\')
}

fn split_keyword(line: &str) -> (&str, &str) {
    match line.find(char::is_whitespace) {
        Some(n) => (&line[..n], line[n..].trim()),
        None => (line, ""),
    }
}

/// `<<EOF`, `<<-EOF`, `<<"EOF"`, `<<'EOF'` markers in order: (word, strip leading tabs).
fn heredoc_markers(rest: &str) -> Vec<(String, bool)> {
    let mut found = Vec::new();
    let mut s = rest;
    while let Some(n) = s.find("<<") {
        s = &s[n + 2..];
        let strip = s.starts_with('-');
        let t = s.trim_start_matches('-');
        let t = t.trim_start_matches(['"', '\'']);
        let word: String = t
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !word.is_empty() {
            found.push((word, strip));
        }
    }
    found
}

/// Splits leading `--name=value` flags off; refuses flags not in `allowed`.
fn flags<'a>(
    rest: &'a str,
    allowed: &[&str],
) -> Result<(BTreeMap<String, String>, &'a str), String> {
    let mut found = BTreeMap::new();
    let mut s = rest.trim_start();
    while let Some(flag) = s.strip_prefix("--") {
        let end = flag.find(char::is_whitespace).unwrap_or(flag.len());
        let (name, value) = match flag[..end].split_once('=') {
            Some((n, v)) => (n, v),
            None => (&flag[..end], ""),
        };
        if !allowed.contains(&name) {
            return Err(format!(
                "the flag --{name} is not supported here (supported: {})",
                if allowed.is_empty() {
                    "none".to_string()
                } else {
                    allowed
                        .iter()
                        .map(|a| format!("--{a}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        }
        found.insert(name.to_string(), value.to_string());
        s = flag[end..].trim_start();
    }
    Ok((found, s))
}

/// The exec form when `rest` is a JSON array of strings, else the shell form.
fn command(rest: &str) -> Command {
    if rest.starts_with('[') {
        if let Ok(args) = serde_json::from_str::<Vec<String>>(rest) {
            return Command::Exec(args);
        }
    }
    Command::Shell(rest.to_string())
}

fn non_empty(keyword: &str, rest: &str) -> Result<String, String> {
    if rest.is_empty() {
        Err(format!("{keyword} needs an argument"))
    } else {
        Ok(rest.to_string())
    }
}

fn instruction(
    keyword: &str,
    rest: &str,
    heredocs: &[(String, bool, String)],
) -> Result<Kind, String> {
    let kind = match keyword {
        "FROM" => {
            let (_, rest) = flags(rest, &["platform"])?;
            let parts: Vec<&str> = rest.split_whitespace().collect();
            match parts.as_slice() {
                [image] => Kind::From {
                    image: image.to_string(),
                    name: None,
                },
                [image, as_, name] if as_.eq_ignore_ascii_case("as") => Kind::From {
                    image: image.to_string(),
                    name: Some(name.to_ascii_lowercase()),
                },
                _ => return Err("FROM takes an image and an optional `AS name`".into()),
            }
        }
        "RUN" => {
            let (_, rest) = flags(rest, &[])?;
            let rest = non_empty("RUN", rest)?;
            match heredocs {
                [] => Kind::Run(command(&rest)),
                // `RUN <<EOF` alone: the body is the script.
                [(word, _, body)]
                    if heredoc_markers(&rest).len() == 1 && {
                        let r = rest.trim_start_matches("<<").trim_start_matches('-');
                        r.trim_matches(['"', '\'']) == word
                    } =>
                {
                    Kind::Run(Command::Shell(body.clone()))
                }
                // `RUN python3 <<EOF`: the shell reads the heredoc itself.
                _ => {
                    let mut script = rest.clone();
                    for (word, _, body) in heredocs {
                        script.push('\n');
                        script.push_str(body);
                        script.push_str(word);
                    }
                    Kind::Run(Command::Shell(script))
                }
            }
        }
        "COPY" | "ADD" => {
            let allowed: &[&str] = if keyword == "COPY" {
                &["from", "chown", "chmod", "link"]
            } else {
                &["chown", "chmod", "link"]
            };
            let (found, rest) = flags(rest, allowed)?;
            let args = if rest.starts_with('[') {
                serde_json::from_str::<Vec<String>>(rest)
                    .map_err(|e| format!("the JSON form is not an array of strings ({e})"))?
            } else {
                words(rest, &BTreeMap::new())?;
                split_raw(rest)
            };
            if args.len() < 2 {
                return Err(format!(
                    "{keyword} takes one or more sources and a destination"
                ));
            }
            let bodies = heredocs
                .iter()
                .map(|(w, _, b)| (w.clone(), b.clone()))
                .collect();
            Kind::Copy {
                add: keyword == "ADD",
                args,
                from: found.get("from").cloned(),
                chown: found.get("chown").cloned(),
                chmod: found.get("chmod").cloned(),
                heredocs: bodies,
            }
        }
        "ENV" | "LABEL" => {
            let parts = words(&non_empty(keyword, rest)?, &BTreeMap::new())?;
            if parts[0].contains('=') {
                if let Some(bad) = split_raw(rest).iter().find(|w| !w.contains('=')) {
                    return Err(format!("`{bad}` is not KEY=VALUE"));
                }
            } else if parts.len() < 2 {
                return Err(format!("{keyword} takes KEY=VALUE pairs"));
            }
            if keyword == "ENV" {
                Kind::Env(rest.to_string())
            } else {
                Kind::Label(rest.to_string())
            }
        }
        "ARG" => {
            let parts = words(&non_empty("ARG", rest)?, &BTreeMap::new())?;
            if parts
                .iter()
                .any(|p| p.split('=').next().unwrap_or("").is_empty())
            {
                return Err("ARG takes NAME or NAME=default".into());
            }
            Kind::Arg(rest.to_string())
        }
        "WORKDIR" => Kind::Workdir(non_empty(keyword, rest)?),
        "USER" => Kind::User(non_empty(keyword, rest)?),
        "EXPOSE" => Kind::Expose(non_empty(keyword, rest)?),
        "VOLUME" => Kind::Volume(non_empty(keyword, rest)?),
        "STOPSIGNAL" => Kind::StopSignal(non_empty(keyword, rest)?),
        "CMD" => Kind::Cmd(command(&non_empty(keyword, rest)?)),
        "ENTRYPOINT" => Kind::Entrypoint(command(&non_empty(keyword, rest)?)),
        "SHELL" => match serde_json::from_str::<Vec<String>>(rest) {
            Ok(shell) if !shell.is_empty() => Kind::Shell(shell),
            _ => return Err("SHELL takes a JSON array such as [\"/bin/bash\", \"-c\"]".into()),
        },
        "HEALTHCHECK" => healthcheck(rest)?,
        "MAINTAINER" => Kind::Label(format!(
            "maintainer={}",
            serde_json::to_string(rest).expect("a string serializes")
        )),
        "ONBUILD" => return Err("ONBUILD is not supported by berth".into()),
        "" => return Err("empty instruction".into()),
        other => return Err(format!("unknown instruction `{other}`")),
    };
    Ok(kind)
}

fn healthcheck(rest: &str) -> Result<Kind, String> {
    if rest.eq_ignore_ascii_case("none") {
        return Ok(Kind::Healthcheck(None));
    }
    let (found, rest) = flags(
        rest,
        &[
            "interval",
            "timeout",
            "start-period",
            "start-interval",
            "retries",
        ],
    )?;
    let (cmd, rest) = split_keyword(rest);
    if !cmd.eq_ignore_ascii_case("CMD") || rest.is_empty() {
        return Err("HEALTHCHECK takes NONE or [OPTIONS] CMD command".into());
    }
    let secs = |name: &str| -> Result<Option<u64>, String> {
        found.get(name).map(|v| duration_secs(v)).transpose()
    };
    Ok(Kind::Healthcheck(Some(Healthcheck {
        command: match command(rest) {
            Command::Exec(args) => args,
            Command::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s],
        },
        interval_secs: secs("interval")?,
        timeout_secs: secs("timeout")?,
        start_period_secs: secs("start-period")?,
        retries: found
            .get("retries")
            .map(|r| {
                r.parse()
                    .map_err(|_| format!("--retries={r} is not a number"))
            })
            .transpose()?,
    })))
}

/// `30s`, `1m30s`, `2h`, `500ms` (rounded up to whole seconds).
fn duration_secs(text: &str) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a duration such as 30s or 1m30s");
    let mut total_ms: u64 = 0;
    let mut number = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().map_err(|_| bad())?;
        number.clear();
        let unit_ms = match c {
            'h' => 3_600_000,
            's' => 1000,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            'm' => 60_000,
            _ => return Err(bad()),
        };
        total_ms += n * unit_ms;
    }
    if !number.is_empty() {
        return Err(bad());
    }
    Ok(total_ms.div_ceil(1000))
}

/// Splits on unquoted whitespace, keeping quotes and `$` as written (for structure checks and
/// for expanding later).
fn split_raw(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
                continue;
            }
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (_, '\\') => {
                word.push(c);
                if let Some(next) = chars.next() {
                    word.push(next);
                }
                continue;
            }
            _ => {}
        }
        word.push(c);
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// Splits `text` into words as Docker does: unquoted whitespace separates words, quotes are
/// removed, `\` escapes, and `$NAME`, `${NAME}`, `${NAME:-default}`, `${NAME:+alt}` expand from
/// `vars` (not inside single quotes; unset names expand to nothing).
pub fn words(text: &str, vars: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => word.push(c),
            (_, '\\') => {
                in_word = true;
                if let Some(&next) = chars.get(i) {
                    // Inside double quotes only \" \\ \$ are escapes.
                    if quote.is_none() || matches!(next, '"' | '\\' | '$') {
                        word.push(next);
                    } else {
                        word.push('\\');
                        word.push(next);
                    }
                    i += 1;
                } else {
                    word.push('\\');
                }
            }
            (_, '$') => {
                in_word = true;
                i = expand_at(&chars, i, vars, &mut word)?;
            }
            (_, c) => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if let Some(q) = quote {
        return Err(format!("unterminated quote {q}"));
    }
    if in_word {
        out.push(word);
    }
    Ok(out)
}

/// Expands the variable reference after a `$` at `chars[i..]`; returns the index after it.
fn expand_at(
    chars: &[char],
    mut i: usize,
    vars: &BTreeMap<String, String>,
    out: &mut String,
) -> Result<usize, String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    if chars.get(i) == Some(&'{') {
        let close = chars[i..]
            .iter()
            .position(|&c| c == '}')
            .ok_or("unterminated ${…}")?;
        let inner: String = chars[i + 1..i + close].iter().collect();
        let (name, op) = match inner.find(':') {
            Some(n) => (&inner[..n], Some(&inner[n + 1..])),
            None => (inner.as_str(), None),
        };
        if name.is_empty() || !name.chars().all(is_name) {
            return Err(format!("bad variable reference ${{{inner}}}"));
        }
        let value = vars.get(name).filter(|v| !v.is_empty());
        match op {
            None => out.push_str(value.map(String::as_str).unwrap_or("")),
            Some(op) if op.starts_with('-') => match value {
                Some(v) => out.push_str(v),
                None => out.push_str(&op[1..]),
            },
            Some(op) if op.starts_with('+') => {
                if value.is_some() {
                    out.push_str(&op[1..])
                }
            }
            Some(_) => return Err(format!("unsupported variable reference ${{{inner}}}")),
        }
        return Ok(i + close + 1);
    }
    let start = i;
    while i < chars.len() && is_name(chars[i]) {
        i += 1;
    }
    if i == start {
        out.push('$');
        return Ok(i);
    }
    let name: String = chars[start..i].iter().collect();
    out.push_str(vars.get(&name).map(String::as_str).unwrap_or(""));
    Ok(i)
}

/// `KEY=VALUE …` pairs (or the legacy `KEY VALUE with spaces`), expanded.
pub fn pairs(text: &str, vars: &BTreeMap<String, String>) -> Result<Vec<(String, String)>, String> {
    let parts = words(text, vars)?;
    if parts.len() >= 2 && !parts[0].contains('=') {
        return Ok(vec![(parts[0].clone(), parts[1..].join(" "))]);
    }
    parts
        .into_iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("`{p}` is not KEY=VALUE")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Kind {
        let parsed = parse(&format!("FROM scratch\n{text}\n")).unwrap();
        parsed[1].kind.clone()
    }

    fn error(text: &str) -> ParseError {
        parse(text).unwrap_err()
    }

    #[test]
    fn instructions() {
        let vars = BTreeMap::new();
        assert_eq!(
            parse("# escape=\\\nFROM berth/stack-build AS Build\n").unwrap()[0].kind,
            Kind::From {
                image: "berth/stack-build".into(),
                name: Some("build".into())
            }
        );
        assert_eq!(
            one("RUN make \\\n  # a comment\n\n  all"),
            Kind::Run(Command::Shell("make  all".into()))
        );
        assert_eq!(
            one(r#"RUN ["make", "all"]"#),
            Kind::Run(Command::Exec(vec!["make".into(), "all".into()]))
        );
        assert_eq!(
            one("CMD [not json"),
            Kind::Cmd(Command::Shell("[not json".into()))
        );
        assert_eq!(
            one("RUN <<EOF\necho a\necho b\nEOF"),
            Kind::Run(Command::Shell("echo a\necho b\n".into()))
        );
        assert_eq!(
            one("RUN python3 <<-'PY'\n\tprint(1)\n\tPY"),
            Kind::Run(Command::Shell("python3 <<-'PY'\nprint(1)\nPY".into()))
        );
        match one("COPY --from=build --chown=1:2 <<EOF a* /app/\nhi\nEOF") {
            Kind::Copy {
                add,
                args,
                from,
                chown,
                heredocs,
                ..
            } => {
                assert!(!add);
                assert_eq!(args, ["<<EOF", "a*", "/app/"]);
                assert_eq!(from.as_deref(), Some("build"));
                assert_eq!(chown.as_deref(), Some("1:2"));
                assert_eq!(heredocs["EOF"], "hi\n");
            }
            other => panic!("{other:?}"),
        }
        match one("HEALTHCHECK --interval=1m30s --retries=2 CMD curl -f http://localhost/") {
            Kind::Healthcheck(Some(h)) => {
                assert_eq!(h.interval_secs, Some(90));
                assert_eq!(h.retries, Some(2));
                assert_eq!(h.command[2], "curl -f http://localhost/");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(one("HEALTHCHECK NONE"), Kind::Healthcheck(None));
        match one(r#"ENV A=1 B="two words" C=${A:-x}"#) {
            Kind::Env(raw) => {
                let mut vars = vars.clone();
                vars.insert("A".into(), "one".into());
                assert_eq!(
                    pairs(&raw, &vars).unwrap(),
                    [
                        ("A".into(), "1".into()),
                        ("B".into(), "two words".into()),
                        ("C".into(), "one".into())
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
        match one("ENV GREETING hello there") {
            Kind::Env(raw) => assert_eq!(
                pairs(&raw, &vars).unwrap(),
                [("GREETING".into(), "hello there".into())]
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse("# escape=`\nFROM scratch\nRUN a `\n b\n").unwrap()[1].kind,
            Kind::Run(Command::Shell("a  b".into()))
        );
    }

    #[test]
    fn words_quote_and_expand() {
        let vars = BTreeMap::from([("V".to_string(), "x y".to_string())]);
        let cases: &[(&str, &[&str])] = &[
            ("a b", &["a", "b"]),
            ("\"$V\" '$V' $V", &["x y", "$V", "x y"]),
            ("${V:+set}${NOPE:-dflt}", &["setdflt"]),
            (r#"a\ b "c\"d" ''"#, &["a b", "c\"d", ""]),
            ("$ alone", &["$", "alone"]),
        ];
        for (text, want) in cases {
            assert_eq!(words(text, &vars).unwrap(), *want, "{text}");
        }
        assert!(words("\"open", &vars).is_err());
    }

    #[test]
    fn refusals_name_the_line() {
        let cases = [
            ("FROM scratch\nRUNN make\n", 2, "unknown instruction `RUNN`"),
            ("RUN x\n", 1, "the first instruction must be FROM"),
            ("FROM a b c d\n", 1, "FROM takes"),
            ("FROM scratch\n\nCOPY onlyone\n", 3, "one or more sources"),
            ("FROM scratch\nRUN --mount=type=cache x\n", 2, "--mount"),
            ("FROM scratch\nENV A=1 B\n", 2, "`B` is not KEY=VALUE"),
            ("FROM scratch\nRUN <<EOF\nno end\n", 2, "never closed"),
            ("FROM scratch\nSHELL /bin/bash\n", 2, "JSON array"),
            (
                "FROM scratch\nHEALTHCHECK --interval=soon CMD x\n",
                2,
                "duration",
            ),
            ("FROM scratch\nLABEL a=\"open\n", 2, "unterminated quote"),
            ("", 1, "no instructions"),
        ];
        for (text, line, problem) in cases {
            let err = error(text);
            assert_eq!(err.line, line, "{text}: {err}");
            assert!(err.problem.contains(problem), "{text}: {err}");
        }
        let err = error("FROM scratch\nRUNN make\n");
        assert_eq!(
            err.to_string(),
            "Dockerfile line 2: unknown instruction `RUNN`\n    RUNN make\nfix the Dockerfile and push again"
        );
    }
}

//! App logs: one file per app (`DATA/logs/APP.log`) that the shims append lines to, as
//! `TIMESTAMP app[web.1]: text`. Owns reading it (last lines from its end, following it by
//! inotify), rotating it (`APP.log.1`), and berth's own lines about an app's containers
//! (`berth[web.1]: …`); the app's output is the shim's to write.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Appends one line of berth's own (`TIMESTAMP SOURCE: text`) in one write, as the shims do.
pub fn append(path: &Path, source: &str, text: &str) {
    use std::io::Write;
    let stamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let line = format!("{stamp} {source}: {text}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(line.as_bytes()));
    if let Err(err) = written {
        tracing::warn!(path = %path.display(), %err, "writing to an app log failed");
    }
}

/// How much of a log's end [`tail`] reads at most.
const MAX_TAIL: u64 = 8 << 20;
/// How large a log grows before [`rotate`] moves it aside.
pub const MAX_LOG: u64 = 16 << 20;

/// The last `n` lines of the log, read from its end (at most [`MAX_TAIL`] bytes of it).
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    tail_where(path, n, |_| true)
}

/// The last `n` lines of the log that `keep` accepts, read from its end (at most [`MAX_TAIL`]
/// bytes of it).
pub fn tail_where(path: &Path, n: usize, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut chunk = 64 << 10;
    loop {
        let start = len.saturating_sub(chunk);
        let mut buf = Vec::new();
        if file.seek(SeekFrom::Start(start)).is_err()
            || file
                .by_ref()
                .take(len - start)
                .read_to_end(&mut buf)
                .is_err()
        {
            return Vec::new();
        }
        let text = String::from_utf8_lossy(&buf);
        // Past the start of the file the first line is cut: it does not count.
        let lines: Vec<&str> = text
            .lines()
            .skip(usize::from(start > 0))
            .filter(|l| keep(l))
            .collect();
        if lines.len() >= n || start == 0 || chunk >= MAX_TAIL {
            return lines[lines.len().saturating_sub(n)..]
                .iter()
                .map(|l| l.to_string())
                .collect();
        }
        chunk = (chunk * 4).min(MAX_TAIL);
    }
}

/// One log line taken apart: `TIMESTAMP app[web.1]: text` or `TIMESTAMP berth[web.1]: text`.
#[derive(Debug, PartialEq, serde::Serialize)]
pub struct Line<'a> {
    pub time: &'a str,
    /// `app` for the app's own output, `berth` for berth's lines about it.
    pub source: &'a str,
    /// The container, e.g. `web.1`; empty for a line about the whole app.
    pub process: &'a str,
    pub text: &'a str,
}

impl<'a> Line<'a> {
    /// Parses a line as the shims and [`append`] write it; `None` for anything else.
    pub fn parse(line: &'a str) -> Option<Self> {
        let (time, rest) = line.split_once(' ')?;
        let (who, text) = rest
            .split_once(": ")
            .or_else(|| rest.strip_suffix(':').map(|w| (w, "")))?;
        let (source, process) = match who.split_once('[') {
            Some((source, process)) => (source, process.strip_suffix(']')?),
            None => (who, ""),
        };
        Some(Self {
            time,
            source,
            process,
            text,
        })
    }

    /// Whether the line comes from (or is about) a container of `process_type`.
    pub fn is_of_type(&self, process_type: &str) -> bool {
        let kind = self
            .process
            .split_once('.')
            .map_or(self.process, |(t, _)| t);
        kind == process_type
    }
}

/// Moves a log larger than [`MAX_LOG`] to `APP.log.1` (replacing the one before) by copying it
/// and truncating it, so the shims keep appending to the file they hold open (`O_APPEND` writes
/// go to the new end); a line written during the copy can be lost. Returns whether it rotated.
pub fn rotate(path: &Path) -> std::io::Result<bool> {
    if std::fs::metadata(path).map_or(true, |m| m.len() <= MAX_LOG) {
        return Ok(false);
    }
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    std::fs::copy(path, &old)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    Ok(true)
}

/// Wakes the receiver whenever the log changes (inotify on its folder, so it works before the
/// file exists and across rotations). Keep the watcher alive while receiving.
pub fn watch(
    path: &Path,
) -> notify::Result<(notify::RecommendedWatcher, tokio::sync::mpsc::Receiver<()>)> {
    use notify::Watcher;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let name = path.file_name().map(ToOwned::to_owned);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let ours = event.is_ok_and(|e| e.paths.iter().any(|p| p.file_name() == name.as_deref()));
        if ours {
            let _ = tx.try_send(()); // one pending wake is enough
        }
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok((watcher, rx))
}

/// The last `n` lines that mention `needle` (e.g. `app[web.1]`), joined for an error message.
pub fn tail_matching(path: &Path, needle: &str, n: usize) -> String {
    let shown = tail_where(path, n, |l| l.contains(needle));
    if shown.is_empty() {
        "       (no output)".to_string()
    } else {
        shown
            .iter()
            .map(|l| format!("       {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The log's current length, where [`read_from`] picks up.
pub fn end(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Complete lines written after `offset`; returns them and the new offset.
pub fn read_from(path: &Path, offset: u64) -> (Vec<String>, u64) {
    let Ok(mut file) = std::fs::File::open(path) else {
        return (vec![], offset);
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let offset = if len < offset { 0 } else { offset }; // truncated: start over
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(offset)).is_err() || file.read_to_end(&mut buf).is_err() {
        return (vec![], offset);
    }
    let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let lines = String::from_utf8_lossy(&buf[..complete])
        .lines()
        .map(str::to_string)
        .collect();
    (lines, offset + complete as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tail_and_follow() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        assert!(tail(&path, 5).is_empty());
        std::fs::write(
            &path,
            "1 app[web.1]: a\n2 app[worker.1]: b\n3 app[web.1]: c\n",
        )
        .unwrap();
        assert_eq!(
            tail(&path, 2),
            vec!["2 app[worker.1]: b", "3 app[web.1]: c"]
        );
        assert_eq!(
            tail_matching(&path, "app[web.1]", 1),
            "       3 app[web.1]: c"
        );
        let offset = end(&path);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"4 app[web.1]: d\n5 partial").unwrap();
        let (lines, offset) = read_from(&path, offset);
        assert_eq!(lines, vec!["4 app[web.1]: d"]);
        f.write_all(b" line\n").unwrap();
        assert_eq!(read_from(&path, offset).0, vec!["5 partial line"]);
    }

    #[test]
    fn tail_reads_from_the_end_and_rotation_keeps_the_old_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.log");
        let line = format!(
            "{} app[web.1]: {}\n",
            "2026-11-25T00:00:00Z",
            "x".repeat(1000)
        );
        let count = (MAX_LOG / line.len() as u64) as usize + 10;
        let mut text = line.repeat(count);
        text.push_str("last app[web.1]: the end\n");
        std::fs::write(&path, &text).unwrap();
        let last = tail(&path, 3);
        assert_eq!(last.len(), 3);
        assert_eq!(last[2], "last app[web.1]: the end");
        assert_eq!(last[1], line.trim_end(), "whole lines only");
        assert_eq!(tail(&path, 100).len(), 100, "more than one chunk back");

        assert!(rotate(&path).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        let old = dir.path().join("big.log.1");
        assert_eq!(tail(&old, 1), vec!["last app[web.1]: the end"]);
        assert!(!rotate(&path).unwrap(), "a small log stays");
        // A shim's O_APPEND handle writes at the new end, and following starts over.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"after app[web.1]: rotation\n").unwrap();
        assert_eq!(
            read_from(&path, text.len() as u64).0,
            vec!["after app[web.1]: rotation"]
        );
    }

    #[test]
    fn lines_parse_and_filter_by_process_type() {
        let line = Line::parse("2026-11-25T10:00:00Z app[worker.2]: a: b").unwrap();
        assert_eq!(
            line,
            Line {
                time: "2026-11-25T10:00:00Z",
                source: "app",
                process: "worker.2",
                text: "a: b"
            }
        );
        assert!(line.is_of_type("worker") && !line.is_of_type("web"));
        let about = Line::parse("2026-11-25T10:00:00Z berth[web.1]: out of memory").unwrap();
        assert_eq!((about.source, about.process), ("berth", "web.1"));
        assert!(about.is_of_type("web"));
        assert_eq!(
            Line::parse("2026-11-25T10:00:00Z berth: hi")
                .unwrap()
                .process,
            ""
        );
        assert!(Line::parse("garbage").is_none());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let mut text = String::from("0 app[web.1]: early web\n");
        text.push_str(&"1 app[worker.1]: busy\n".repeat(20_000));
        std::fs::write(&path, text).unwrap();
        let web = |l: &str| Line::parse(l).is_some_and(|l| l.is_of_type("web"));
        assert_eq!(
            tail_where(&path, 5, web),
            vec!["0 app[web.1]: early web"],
            "reads back past other types' lines"
        );
    }

    #[tokio::test]
    async fn watch_wakes_on_a_new_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        let (_watcher, mut woken) = watch(&path).unwrap();
        append(&path, "berth[web.1]", "hello");
        tokio::time::timeout(std::time::Duration::from_secs(5), woken.recv())
            .await
            .expect("no wake for a new line");
        assert_eq!(tail(&path, 1).len(), 1);
    }
}

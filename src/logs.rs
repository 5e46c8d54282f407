//! App logs: one file per app (`DATA/logs/APP.log`) that the shims append lines to, as
//! `TIMESTAMP app[web.1]: text`. Owns reading it (last lines, follow) and berth's own lines
//! about an app's containers (`berth[web.1]: …`); the app's output is the shim's to write.

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

/// The last `n` lines of the log.
pub fn tail(path: &Path, n: usize) -> Vec<String> {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// The last `n` lines that mention `needle` (e.g. `app[web.1]`), joined for an error message.
pub fn tail_matching(path: &Path, needle: &str, n: usize) -> String {
    let lines: Vec<String> = tail(path, 10_000)
        .into_iter()
        .filter(|l| l.contains(needle))
        .collect();
    let shown = &lines[lines.len().saturating_sub(n)..];
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
}

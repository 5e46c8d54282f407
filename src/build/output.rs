//! The build container's output, read line by line with a bound: build code is untrusted, and a
//! line without a newline must not grow a buffer without end. A line longer than
//! [`MAX_LINE_BYTES`] is cut there, marked, and the rest of it skipped.
//!
//! Owns only the splitting; must not decide where the lines go.

use std::io::{self, BufRead};

/// The longest build output line passed on; longer ones are cut.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// What replaces the end of a cut line.
pub const CUT_MARKER: &str = " … [line cut at 16 KiB]";

/// The lines of `reader` without their `\n`, each at most [`MAX_LINE_BYTES`] (plus the marker).
pub fn lines<R: BufRead>(mut reader: R) -> impl Iterator<Item = io::Result<String>> {
    std::iter::from_fn(move || read_line(&mut reader).transpose())
}

/// One line, or `None` at the end of the input.
fn read_line(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut cut = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if buf.is_empty() {
            if line.is_empty() && !cut {
                return Ok(None);
            }
            break;
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(end) => (&buf[..end], end + 1),
            None => (buf, buf.len()),
        };
        let room = MAX_LINE_BYTES - line.len();
        cut |= chunk.len() > room;
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let newline = done > chunk.len();
        reader.consume(done);
        if newline {
            break;
        }
    }
    let mut text = String::from_utf8_lossy(&line).into_owned();
    if cut {
        text.push_str(CUT_MARKER);
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[u8]) -> Vec<String> {
        // A tiny buffer, so lines span many fill_buf calls.
        lines(io::BufReader::with_capacity(7, input))
            .collect::<io::Result<_>>()
            .unwrap()
    }

    #[test]
    fn splits_and_bounds_lines() {
        assert_eq!(split(b""), Vec::<String>::new());
        assert_eq!(split(b"one\ntwo\n"), ["one", "two"]);
        assert_eq!(split(b"one\n\nno newline"), ["one", "", "no newline"]);
        assert_eq!(split(b"caf\xc3\xa9 \xff\n"), ["café \u{fffd}"]);

        let exact = "x".repeat(MAX_LINE_BYTES);
        assert_eq!(
            split(format!("{exact}\nnext\n").as_bytes()),
            [&exact, "next"]
        );

        let long = "y".repeat(MAX_LINE_BYTES * 3 + 5);
        let got = split(format!("{long}\nnext").as_bytes());
        assert_eq!(
            got.len(),
            2,
            "{:?}",
            got.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(got[0], format!("{}{CUT_MARKER}", &long[..MAX_LINE_BYTES]));
        assert_eq!(got[1], "next");
        // Cut at the end of the input, without a newline.
        assert_eq!(
            split(long.as_bytes()),
            [format!("{}{CUT_MARKER}", &long[..MAX_LINE_BYTES])]
        );
    }
}

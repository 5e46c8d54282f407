//! Progress: how a long operation (a build, a deploy, a command) tells whoever started it what is
//! happening, line by line. The lower layers (`build`, `deploy`) write to a [`Progress`]; each
//! front end (the admin socket today) adapts the [`Line`]s it receives to its own wire format.
//! Owns nothing else: it must not know who listens.

use tokio::sync::mpsc;

/// One line for the person waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// Normal output (stdout).
    Out(String),
    /// A warning (stderr).
    Warn(String),
}

/// Where progress goes. Cloning shares the listener; a listener that went away is not an
/// error: the work goes on.
#[derive(Clone)]
pub struct Progress(Option<mpsc::Sender<Line>>);

impl Progress {
    /// Progress sent to `tx`.
    pub fn new(tx: mpsc::Sender<Line>) -> Self {
        Self(Some(tx))
    }

    /// Progress nobody reads (work the server starts by itself, such as crash restarts).
    pub fn discard() -> Self {
        Self(None)
    }

    /// Writes one line of output.
    pub async fn line(&self, text: impl AsRef<str>) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(Line::Out(text.as_ref().to_string())).await;
        }
    }

    /// Writes one line of output from blocking code (build output readers).
    pub fn blocking_line(&self, text: impl AsRef<str>) {
        if let Some(tx) = &self.0 {
            let _ = tx.blocking_send(Line::Out(text.as_ref().to_string()));
        }
    }

    /// Writes one warning line.
    pub async fn warn(&self, text: impl AsRef<str>) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(Line::Warn(text.as_ref().to_string())).await;
        }
    }

    /// Whether the listener has gone (ends endless streams such as `logs -f`).
    pub fn is_closed(&self) -> bool {
        self.0.as_ref().is_none_or(|tx| tx.is_closed())
    }
}

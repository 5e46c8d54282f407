//! Progress: how a long operation (a build, a deploy, a command) tells whoever started it what is
//! happening, line by line. The lower layers (`build`, `deploy`) write to a [`Progress`]; each
//! front end (the admin socket today) adapts the [`Line`]s it receives to its own wire format.
//! Owns nothing else: it must not know who listens.

use std::sync::Arc;

use tokio::sync::mpsc;

/// One line for the person waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// Normal output (stdout).
    Out(String),
    /// A warning (stderr).
    Warn(String),
}

/// Something that sees every line too, and must not block.
type Copy = Arc<dyn Fn(&Line) + Send + Sync>;

/// Where progress goes. Cloning shares the listener; a listener that went away is not an
/// error: the work goes on.
#[derive(Clone)]
pub struct Progress {
    tx: Option<mpsc::Sender<Line>>,
    /// Also sees every line (a deploy's record, `deploy::journal`); never blocks.
    copy: Option<Copy>,
}

impl Progress {
    /// Progress sent to `tx`.
    pub fn new(tx: mpsc::Sender<Line>) -> Self {
        Self {
            tx: Some(tx),
            copy: None,
        }
    }

    /// Progress nobody reads (work the server starts by itself, such as crash restarts).
    pub fn discard() -> Self {
        Self {
            tx: None,
            copy: None,
        }
    }

    /// This progress, with each line also given to `copy` (which must not block).
    pub fn teed(&self, copy: impl Fn(&Line) + Send + Sync + 'static) -> Self {
        Self {
            tx: self.tx.clone(),
            copy: Some(Arc::new(copy)),
        }
    }

    /// Writes one line of output.
    pub async fn line(&self, text: impl AsRef<str>) {
        self.send(Line::Out(text.as_ref().to_string())).await
    }

    /// Writes one line of output from blocking code (build output readers).
    pub fn blocking_line(&self, text: impl AsRef<str>) {
        let line = Line::Out(text.as_ref().to_string());
        if let Some(copy) = &self.copy {
            copy(&line);
        }
        if let Some(tx) = &self.tx {
            let _ = tx.blocking_send(line);
        }
    }

    /// Writes one warning line.
    pub async fn warn(&self, text: impl AsRef<str>) {
        self.send(Line::Warn(text.as_ref().to_string())).await
    }

    async fn send(&self, line: Line) {
        if let Some(copy) = &self.copy {
            copy(&line);
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(line).await;
        }
    }
}

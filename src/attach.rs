//! Attach: how a front end (`berth run` on the admin socket, `run` over SSH) is wired to the
//! one-off container it runs: [`Input`] from the user (bytes, end of input, a new window size)
//! and [`Output`] to them (stdout and stderr bytes), each over a bounded channel, so a user who
//! reads slowly holds the container's output back instead of filling the daemon's memory.
//! [`pair`] makes both ends. The user's end going away (its output receiver dropped) means the
//! user is gone: the container is then stopped.
//!
//! Owns these messages and their channels; must not know who is on either side.

use tokio::sync::mpsc;

pub use berth_runtime::terminal::WindowSize;

/// How many messages each direction holds before its sender waits.
const DEPTH: usize = 32;

/// From the user to the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Bytes for the container's stdin (or its terminal).
    Data(Vec<u8>),
    /// The user's input ended: the container's stdin is closed (with a terminal nothing
    /// happens, as with `docker run -t`).
    Eof,
    /// The user's terminal changed size.
    Resize(WindowSize),
}

/// From the container to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Bytes of its stdout (with a terminal: everything the terminal shows).
    Stdout(Vec<u8>),
    /// Bytes of its stderr (and of berth's own messages about the run).
    Stderr(Vec<u8>),
}

/// The user's end: send input, receive output until the channel ends (the run is over).
pub struct Frontend {
    pub input: mpsc::Sender<Input>,
    pub output: mpsc::Receiver<Output>,
}

/// The container's end.
pub struct Attach {
    /// `Some`: the container gets a terminal of this size.
    pub terminal: Option<WindowSize>,
    pub input: mpsc::Receiver<Input>,
    pub output: mpsc::Sender<Output>,
}

/// Both ends of one attachment; `terminal` as in [`Attach::terminal`].
pub fn pair(terminal: Option<WindowSize>) -> (Frontend, Attach) {
    let (input_tx, input_rx) = mpsc::channel(DEPTH);
    let (output_tx, output_rx) = mpsc::channel(DEPTH);
    (
        Frontend {
            input: input_tx,
            output: output_rx,
        },
        Attach {
            terminal,
            input: input_rx,
            output: output_tx,
        },
    )
}

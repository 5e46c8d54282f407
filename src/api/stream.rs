//! Answers that come as a stream: an operation's progress lines before its result, and logs
//! that follow. One JSON value per line (`application/x-ndjson`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{ApiError, ErrorBody};
use crate::progress::{Line, Progress};
use crate::service::{self as svc, Caller, Service};

/// The media type of streamed answers.
pub const NDJSON: &str = "application/x-ndjson";

/// One line of a streamed answer: output and warnings as the operation goes, then its result
/// (`done`) or its error, and nothing after.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// A line of progress.
    Out(String),
    /// A warning.
    Err(String),
    /// The operation succeeded with this result.
    Done(serde_json::Value),
    /// The operation failed.
    Error(ErrorBody),
}

impl Event {
    fn bytes(&self) -> Bytes {
        let mut line = serde_json::to_vec(self).expect("events serialize");
        line.push(b'\n');
        Bytes::from(line)
    }
}

fn wants_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(NDJSON))
}

fn ndjson(body: Body) -> Response {
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    response
}

fn finished<T: Serialize>(
    result: Result<svc::Result<T>, tokio::task::JoinError>,
) -> svc::Result<T> {
    result.map_err(svc::failed)?
}

/// Runs `work` with a progress sink. Without `Accept: application/x-ndjson` the answer is its
/// result as JSON (or its error with its status). With it, the status is still the error's if
/// the operation fails before its first line; after that the answer is `200` and a stream of
/// [`Event`]s. The operation runs on if the client goes away (a deploy is not undone by a
/// dropped connection).
pub(super) async fn progress<T, F, Fut>(headers: &HeaderMap, work: F) -> Response
where
    T: Serialize + Send + 'static,
    F: FnOnce(Progress) -> Fut,
    Fut: Future<Output = svc::Result<T>> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Line>(256);
    let task = tokio::spawn(work(Progress::new(tx)));
    if !wants_stream(headers) {
        drop(rx);
        return match finished(task.await) {
            Ok(value) => Json(value).into_response(),
            Err(err) => ApiError(err).into_response(),
        };
    }
    let Some(first) = rx.recv().await else {
        return match finished(task.await) {
            Ok(value) => ndjson(Body::from(Event::Done(to_value(&value)).bytes())),
            Err(err) => ApiError(err).into_response(),
        };
    };
    let (body, lines) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut next = Some(first);
        while let Some(line) = match next.take() {
            Some(line) => Some(line),
            None => rx.recv().await,
        } {
            let event = match line {
                Line::Out(text) => Event::Out(text),
                Line::Warn(text) => Event::Err(text),
            };
            if body.send(event.bytes()).await.is_err() {
                return; // the client went away; dropping rx tells the operation
            }
        }
        let end = match finished(task.await) {
            Ok(value) => Event::Done(to_value(&value)),
            Err(err) => Event::Error(ApiError(err).body()),
        };
        let _ = body.send(end.bytes()).await;
    });
    ndjson(body_of(lines))
}

fn to_value(value: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// A body made of what arrives on `chunks`, ending when its sender is dropped.
pub(super) fn body_of(chunks: mpsc::Receiver<Bytes>) -> Body {
    Body::from_stream(futures::stream::unfold(chunks, |mut chunks| async move {
        let chunk = chunks.recv().await?;
        Some((Ok::<_, Infallible>(chunk), chunks))
    }))
}

/// An app's log lines: a JSON array, or, following, one JSON line each until the client goes
/// away.
pub(super) async fn logs(
    s: Arc<Service>,
    who: Caller,
    app: String,
    query: svc::LogQuery,
) -> Response {
    let (tx, mut rx) = mpsc::channel(256);
    if !query.follow {
        let (read, lines) = tokio::join!(s.logs(&who, &app, &query, tx), async {
            let mut lines = Vec::new();
            while let Some(line) = rx.recv().await {
                lines.push(line);
            }
            lines
        });
        return match read {
            Ok(()) => Json(lines).into_response(),
            Err(err) => ApiError(err).into_response(),
        };
    }
    // Refusals (no such app, no access) get their status before the stream starts.
    if let Err(err) = s.app(&who, &app).await {
        return ApiError(err).into_response();
    }
    let (body, chunks) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let forward = async move {
            while let Some(line) = rx.recv().await {
                let mut bytes = serde_json::to_vec(&line).expect("log lines serialize");
                bytes.push(b'\n');
                if body.send(Bytes::from(bytes)).await.is_err() {
                    return;
                }
            }
        };
        // Ends when the client goes away: the forwarder drops rx, and `logs` notices.
        let _ = tokio::join!(s.logs(&who, &app, &query, tx), forward);
    });
    ndjson(body_of(chunks))
}

/// A deploy in progress: its output so far, then each line until it ends.
pub(super) fn deploy(
    so_far: String,
    mut next: tokio::sync::broadcast::Receiver<Option<String>>,
) -> Response {
    let (body, chunks) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        for line in so_far.lines() {
            if body
                .send(Event::Out(line.to_string()).bytes())
                .await
                .is_err()
            {
                return;
            }
        }
        loop {
            let line = match next.recv().await {
                Ok(Some(line)) => line,
                Ok(None) | Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    format!("… ({n} lines skipped: this client read too slowly)")
                }
            };
            if body.send(Event::Out(line).bytes()).await.is_err() {
                return;
            }
        }
    });
    ndjson(body_of(chunks))
}

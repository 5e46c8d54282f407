//! The image and disk routes (admins only): list, import (the archive is the request body),
//! export (the archive is the answer's body), collect, info, stack builds.

use std::io::{self, Write};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{bad_request, stream, ApiError, ApiResult, ErrorBody, Who, S};
use crate::deploy::gc::GcReport;
use crate::service as svc;

/// The largest archive an import takes.
const MAX_IMPORT: u64 = 64 << 30;

#[utoipa::path(get, path = "/images", tag = "images", responses((status = 200, description = "Done", body = Vec<svc::ImageRow>), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
pub(super) async fn images(State(s): S, Extension(who): Who) -> ApiResult<Vec<svc::ImageRow>> {
    Ok(Json(s.images(&who).await?))
}

#[derive(Debug, Default, Serialize, Deserialize, utoipa::IntoParams)]
pub struct ImportParams {
    /// The name to tag it with (default: the name the archive carries).
    pub name: Option<String>,
}

#[utoipa::path(post, path = "/images", tag = "images", params(ImportParams),
    request_body(content = Vec<u8>, content_type = "application/x-tar", description = "A `docker save` tar or an OCI archive."),
    responses((status = 201, description = "Created", body = svc::Imported), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
pub(super) async fn import(
    State(s): S,
    Extension(who): Who,
    Query(params): Query<ImportParams>,
    body: Body,
) -> Result<(StatusCode, Json<svc::Imported>), ApiError> {
    let upload = s.upload(&who).await?;
    save(body, &upload.path).await?;
    let imported = s.import_image(&who, upload, params.name).await?;
    Ok((StatusCode::CREATED, Json(imported)))
}

/// Writes the request body to `path`, refusing more than [`MAX_IMPORT`] bytes.
async fn save(body: Body, path: &std::path::Path) -> svc::Result<()> {
    let mut file = tokio::fs::File::create(path).await.map_err(svc::failed)?;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| bad_request(format!("the upload broke off: {e}")).0)?;
        total += chunk.len() as u64;
        if total > MAX_IMPORT {
            return Err(bad_request(format!(
                "the archive is larger than {} GiB — export a smaller image",
                MAX_IMPORT >> 30
            ))
            .0);
        }
        file.write_all(&chunk).await.map_err(svc::failed)?;
    }
    file.flush().await.map_err(svc::failed)
}

#[derive(Debug, Serialize, Deserialize, utoipa::IntoParams)]
pub struct ExportParams {
    /// A tag (`berth/stack-run:trixie`), a release (`APP:vN`; `APP` for the live one) or a
    /// digest from `GET /images`.
    pub image: String,
}

#[utoipa::path(get, path = "/images/archive", tag = "images", params(ExportParams),
    description = "The image as one tar: a `docker save` archive that is also an OCI layout.",
    responses((status = 200, description = "Done", content_type = "application/x-tar", body = Vec<u8>), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
pub(super) async fn export(
    State(s): S,
    Extension(who): Who,
    Query(params): Query<ExportParams>,
) -> Response {
    let target = match s.export_target(&who, &params.image).await {
        Ok(target) => target,
        Err(err) => return ApiError(err).into_response(),
    };
    let (tx, chunks) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        if let Err(err) = s.export_image(target, ChannelWriter(tx)).await {
            // The status is sent; a cut-off body is what the client sees.
            tracing::warn!(%err, "an image export stopped");
        }
    });
    let mut response = stream::body_of(chunks).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-tar"),
    );
    response
}

/// Bytes for a response body, from blocking code; fails once the client went away.
struct ChannelWriter(mpsc::Sender<Bytes>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Bytes::copy_from_slice(buf))
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[utoipa::path(post, path = "/gc", tag = "images", description = "Removes images no kept release uses, and the build caches nothing needs.", responses((status = 200, description = "Done", body = GcReport), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
pub(super) async fn gc(State(s): S, Extension(who): Who) -> ApiResult<GcReport> {
    Ok(Json(s.gc(&who).await?))
}

#[utoipa::path(get, path = "/info", tag = "images", responses((status = 200, description = "Done", body = svc::Info), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
pub(super) async fn info(State(s): S, Extension(who): Who) -> ApiResult<svc::Info> {
    Ok(Json(s.info(&who).await?))
}

#[derive(Debug, Default, Serialize, Deserialize, utoipa::IntoParams)]
pub struct StackParams {
    /// Rebuild even if they exist.
    #[serde(default)]
    pub force: bool,
}

#[utoipa::path(post, path = "/stacks/{stack}/build", tag = "images", params(("stack" = String, Path, description = "trixie or bookworm"), StackParams),
    description = "Builds the stack's images from the Debian mirror. Streams progress with `Accept: application/x-ndjson`.",
    responses((status = 200, description = "Done", body = svc::StackImages), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
pub(super) async fn build_stack(
    State(s): S,
    Extension(who): Who,
    axum::extract::Path(stack): axum::extract::Path<String>,
    Query(params): Query<StackParams>,
    headers: HeaderMap,
) -> Response {
    stream::progress(&headers, move |out| async move {
        s.build_stack(&who, &stack, params.force, &out).await
    })
    .await
}

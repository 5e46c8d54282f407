//! Who is asking: bearer tokens on TCP (`--api`, `berth.<domain>`), root on the admin socket.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::service::{self as svc, Caller, Kind, Service};

/// Authenticates `Authorization: Bearer TOKEN`; refuses with 401 otherwise.
pub async fn bearer(State(s): State<Arc<Service>>, mut request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        return ApiError(svc::Error::msg(
            Kind::Unauthorized,
            "no token — send `Authorization: Bearer TOKEN` (an admin creates one with `berth tokens:create NAME --user USER`)",
        ))
        .into_response();
    };
    match s.authenticate(token).await {
        Ok(who) => {
            request.extensions_mut().insert(who);
            next.run(request).await
        }
        Err(err) => ApiError(err).into_response(),
    }
}

/// The admin socket: only root can open it (mode 0600), so whoever connects is the admin.
pub async fn local_admin(mut request: Request, next: Next) -> Response {
    request.extensions_mut().insert(Caller::root());
    next.run(request).await
}

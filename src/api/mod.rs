//! The REST API: JSON under `/api/v1`, every operation of the [`crate::service`] layer once,
//! with its OpenAPI document generated from these handlers (`GET /api/v1/openapi.json`).
//! Served on the admin socket (as root, the built-in admin), on `--api ADDR` and behind the
//! proxy at `berth.<domain>` (both with bearer tokens, [`auth`]). Long operations (deploys,
//! config changes, scaling, stack builds) answer with one JSON value, or, when the client
//! accepts `application/x-ndjson`, stream their progress as [`Event`] lines first ([`stream`]).
//!
//! Owns the routes, their wire types and the mapping of service errors to statuses. Must not
//! decide anything: every handler is one call into the service.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::config::Config;
use crate::service::{self as svc, Caller, Kind, Service};
use crate::store::{Formation, KeyRow, Release, TokenRow, UserRow};

mod auth;
mod images;
pub mod run;
mod stream;

pub use auth::{bearer, local_admin};
pub use stream::{Event, NDJSON};

type S = State<Arc<Service>>;
type Who = Extension<Caller>;
type ApiResult<T> = Result<Json<T>, ApiError>;

/// The path every route sits under.
pub const PREFIX: &str = "/api/v1";

#[derive(OpenApi)]
#[openapi(
    info(title = "berth", description = "berth's REST API: apps, config, releases, processes, logs, domains, certificates, limits, images, users and tokens. Authenticate with `Authorization: Bearer TOKEN` (`berth tokens:create NAME`)."),
    modifiers(&BearerScheme),
    security(("token" = [])),
    components(schemas(ErrorBody, Event))
)]
struct Doc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The API's routes (without authentication: each server adds its own, [`bearer`] or
/// [`local_admin`]) and its OpenAPI document.
pub fn routes() -> (axum::Router<Arc<Service>>, utoipa::openapi::OpenApi) {
    let api = OpenApiRouter::new()
        .routes(routes!(me))
        .routes(routes!(list_apps, create_app))
        .routes(routes!(app_info, destroy_app))
        .routes(routes!(grant, revoke))
        .routes(routes!(config, change_config))
        .routes(routes!(config_get))
        .routes(routes!(releases))
        .routes(routes!(rollback))
        .routes(routes!(release_output))
        .routes(routes!(watch_deploy))
        .routes(routes!(ps))
        .routes(routes!(scale))
        .routes(routes!(restart))
        .routes(routes!(logs))
        .routes(routes!(domains, add_domain))
        .routes(routes!(remove_domain))
        .routes(routes!(certs, add_cert, remove_cert))
        .routes(routes!(auto_cert))
        .routes(routes!(resources))
        .routes(routes!(set_resources))
        .routes(routes!(build_limits, set_build_limits))
        .routes(routes!(network, set_network))
        .routes(routes!(run::run))
        .routes(routes!(images::images, images::import))
        .routes(routes!(images::export))
        .routes(routes!(images::gc))
        .routes(routes!(images::info))
        .routes(routes!(images::build_stack))
        .routes(routes!(users, add_user))
        .routes(routes!(remove_user))
        .routes(routes!(new_password))
        .routes(routes!(keys, add_key))
        .routes(routes!(remove_key))
        .routes(routes!(tokens, create_token))
        .routes(routes!(revoke_token));
    let mut doc = Doc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    OpenApiRouter::with_openapi(doc)
        .nest(PREFIX, api)
        .split_for_parts()
}

/// An error as the API answers it, with the status of its kind.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    #[schema(value_type = String, example = "not_found")]
    pub code: String,
    /// What went wrong and what to do next.
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError(pub svc::Error);

impl From<svc::Error> for ApiError {
    fn from(err: svc::Error) -> Self {
        Self(err)
    }
}

impl ApiError {
    fn body(&self) -> ErrorBody {
        let code = serde_json::to_value(self.0.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        ErrorBody {
            code,
            message: self.0.message.clone(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.kind.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.body())).into_response()
    }
}

/// A refusal of the request itself (400).
pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(svc::Error::msg(Kind::BadRequest, message))
}

/// Who is asking.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Me {
    pub user: String,
    pub admin: bool,
}

#[utoipa::path(get, path = "/me", tag = "users", responses((status = 200, description = "Done", body = Me), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn me(Extension(who): Who) -> Json<Me> {
    Json(Me {
        user: who.user,
        admin: who.admin,
    })
}

#[utoipa::path(get, path = "/apps", tag = "apps", responses((status = 200, description = "Done", body = Vec<svc::AppSummary>), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn list_apps(State(s): S, Extension(who): Who) -> ApiResult<Vec<svc::AppSummary>> {
    Ok(Json(s.apps(&who).await?))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewApp {
    pub name: String,
}

#[utoipa::path(post, path = "/apps", tag = "apps", request_body = NewApp, responses((status = 201, description = "Created", body = svc::AppInfo), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn create_app(
    State(s): S,
    Extension(who): Who,
    Json(new): Json<NewApp>,
) -> Result<(StatusCode, Json<svc::AppInfo>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(s.create_app(&who, &new.name).await?),
    ))
}

#[utoipa::path(get, path = "/apps/{app}", tag = "apps", params(("app" = String, Path)), responses((status = 200, description = "Done", body = svc::AppInfo), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn app_info(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
) -> ApiResult<svc::AppInfo> {
    Ok(Json(s.app_info(&who, &app).await?))
}

#[utoipa::path(delete, path = "/apps/{app}", tag = "apps", params(("app" = String, Path)), responses((status = 200, description = "Done", body = svc::Destroyed), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn destroy_app(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
) -> ApiResult<svc::Destroyed> {
    Ok(Json(s.destroy_app(&who, &app).await?))
}

#[utoipa::path(put, path = "/apps/{app}/users/{user}", tag = "apps", params(("app" = String, Path), ("user" = String, Path)), responses((status = 204, description = "Done"), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn grant(
    State(s): S,
    Extension(who): Who,
    Path((app, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.grant(&who, &app, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/apps/{app}/users/{user}", tag = "apps", params(("app" = String, Path), ("user" = String, Path)), responses((status = 204, description = "Done"), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn revoke(
    State(s): S,
    Extension(who): Who,
    Path((app, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.revoke(&who, &app, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/apps/{app}/config", tag = "config", params(("app" = String, Path)), responses((status = 200, description = "Done", body = BTreeMap<String, String>), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn config(State(s): S, Extension(who): Who, Path(app): Path<String>) -> ApiResult<Config> {
    Ok(Json(s.config(&who, &app).await?))
}

#[utoipa::path(get, path = "/apps/{app}/config/{key}", tag = "config", params(("app" = String, Path), ("key" = String, Path)), responses((status = 200, description = "Done", body = String), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn config_get(
    State(s): S,
    Extension(who): Who,
    Path((app, key)): Path<(String, String)>,
) -> ApiResult<String> {
    Ok(Json(s.config_get(&who, &app, &key).await?))
}

#[utoipa::path(patch, path = "/apps/{app}/config", tag = "config", params(("app" = String, Path)), request_body = svc::ConfigPatch,
    description = "Sets (a string) and unsets (null) config vars; makes a new release unless `restart` is false. Streams progress with `Accept: application/x-ndjson`.",
    responses((status = 200, description = "Done", body = svc::ConfigChange), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn change_config(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
    headers: HeaderMap,
    Json(patch): Json<svc::ConfigPatch>,
) -> Response {
    stream::progress(&headers, move |out| async move {
        s.change_config(&who, &app, patch, &out).await
    })
    .await
}

#[utoipa::path(get, path = "/apps/{app}/releases", tag = "releases", params(("app" = String, Path)), responses((status = 200, description = "Done", body = Vec<Release>), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn releases(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
) -> ApiResult<Vec<Release>> {
    Ok(Json(s.releases(&who, &app).await?))
}

/// What the deploy that made a release printed.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReleaseOutput {
    pub version: i64,
    pub output: String,
}

#[utoipa::path(get, path = "/apps/{app}/releases/{version}/output", tag = "releases", params(("app" = String, Path), ("version" = i64, Path)),
    description = "What the deploy that made the release printed: build, release command, start and check (at most 1 MiB).",
    responses((status = 200, description = "Done", body = ReleaseOutput), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn release_output(
    State(s): S,
    Extension(who): Who,
    Path((app, version)): Path<(String, i64)>,
) -> ApiResult<ReleaseOutput> {
    let output = s.release_output(&who, &app, version).await?;
    Ok(Json(ReleaseOutput { version, output }))
}

#[utoipa::path(get, path = "/apps/{app}/deploy", tag = "releases", params(("app" = String, Path)),
    description = "The deploy of the app in progress (a push, config change, scale or rollback), as it runs: its output so far, then each line it prints, as `application/x-ndjson` `{\"out\": LINE}` lines, ending when it does. 404 when none runs.",
    responses((status = 200, description = "Done", content_type = "application/x-ndjson", body = Event), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn watch_deploy(State(s): S, Extension(who): Who, Path(app): Path<String>) -> Response {
    match s.watch_deploy(&who, &app).await {
        Ok((so_far, next)) => stream::deploy(so_far, next),
        Err(err) => ApiError(err).into_response(),
    }
}

#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rollback {
    /// The release to go back to (default: the one live before the current one).
    pub version: Option<i64>,
}

#[utoipa::path(post, path = "/apps/{app}/rollback", tag = "releases", params(("app" = String, Path)), request_body = Rollback,
    description = "A new release from an earlier one's image and config. Streams progress with `Accept: application/x-ndjson`.",
    responses((status = 200, description = "Done", body = Release), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn rollback(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
    headers: HeaderMap,
    Json(r): Json<Rollback>,
) -> Response {
    stream::progress(&headers, move |out| async move {
        s.rollback(&who, &app, r.version, &out).await
    })
    .await
}

#[utoipa::path(get, path = "/apps/{app}/ps", tag = "processes", params(("app" = String, Path)), responses((status = 200, description = "Done", body = Vec<svc::PsEntry>), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn ps(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
) -> ApiResult<Vec<svc::PsEntry>> {
    Ok(Json(s.ps(&who, &app).await?))
}

#[utoipa::path(patch, path = "/apps/{app}/formation", tag = "processes", params(("app" = String, Path)), request_body = BTreeMap<String, u32>,
    description = "Sets how many containers of each process type run (a new release, zero downtime). Streams progress with `Accept: application/x-ndjson`.",
    responses((status = 200, description = "Done", body = svc::Scaled), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn scale(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
    headers: HeaderMap,
    Json(formation): Json<Formation>,
) -> Response {
    stream::progress(&headers, move |out| async move {
        s.scale(&who, &app, &formation, &out).await
    })
    .await
}

#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Restart {
    /// Only this process type's containers (default: all).
    pub process_type: Option<String>,
}

#[utoipa::path(post, path = "/apps/{app}/restart", tag = "processes", params(("app" = String, Path)), request_body = Restart,
    description = "Replaces the app's containers with fresh ones, zero downtime. Streams progress with `Accept: application/x-ndjson`.",
    responses((status = 200, description = "Done", body = Restart), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn restart(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
    headers: HeaderMap,
    Json(r): Json<Restart>,
) -> Response {
    stream::progress(&headers, move |out| async move {
        s.restart(&who, &app, r.process_type.as_deref(), &out)
            .await
            .map(|()| r)
    })
    .await
}

#[utoipa::path(get, path = "/apps/{app}/logs", tag = "logs", params(("app" = String, Path), svc::LogQuery),
    description = "The app's last log lines (a JSON array); with `follow=true`, one JSON line each (`application/x-ndjson`) as they are written, until the client goes away.",
    responses((status = 200, description = "Done", body = Vec<svc::LogLine>), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn logs(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
    Query(query): Query<svc::LogQuery>,
) -> Response {
    stream::logs(s, who, app, query).await
}

#[utoipa::path(get, path = "/apps/{app}/domains", tag = "domains", params(("app" = String, Path)), responses((status = 200, description = "Done", body = svc::Domains), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn domains(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
) -> ApiResult<svc::Domains> {
    Ok(Json(s.domains(&who, &app).await?))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Host {
    pub host: String,
}

#[utoipa::path(post, path = "/apps/{app}/domains", tag = "domains", params(("app" = String, Path)), request_body = Host, responses((status = 201, description = "Created", body = Host), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn add_domain(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
    Json(h): Json<Host>,
) -> Result<(StatusCode, Json<Host>), ApiError> {
    let host = s.add_domain(&who, &app, &h.host).await?;
    Ok((StatusCode::CREATED, Json(Host { host })))
}

#[utoipa::path(delete, path = "/apps/{app}/domains/{host}", tag = "domains", params(("app" = String, Path), ("host" = String, Path)), responses((status = 204, description = "Done"), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn remove_domain(
    State(s): S,
    Extension(who): Who,
    Path((app, host)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    s.remove_domain(&who, &app, &host).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/apps/{app}/certs", tag = "domains", params(("app" = String, Path)), responses((status = 200, description = "Done", body = svc::CertInfo), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn certs(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
) -> ApiResult<svc::CertInfo> {
    Ok(Json(s.certs(&who, &app).await?))
}

#[utoipa::path(put, path = "/apps/{app}/certs", tag = "domains", params(("app" = String, Path)), request_body = svc::NewCert, responses((status = 200, description = "Done", body = Vec<String>), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn add_cert(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
    Json(cert): Json<svc::NewCert>,
) -> ApiResult<Vec<String>> {
    Ok(Json(s.add_cert(&who, &app, cert).await?))
}

#[utoipa::path(delete, path = "/apps/{app}/certs", tag = "domains", params(("app" = String, Path)), responses((status = 204, description = "Done"), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn remove_cert(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.remove_cert(&who, &app).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/apps/{app}/certs/auto", tag = "domains", params(("app" = String, Path)), request_body = svc::AutoCert,
    description = "Gets a certificate by ACME HTTP-01 now and renews it from then on. Streams progress with `Accept: application/x-ndjson`.",
    responses((status = 200, description = "Done", body = svc::CertInfo), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn auto_cert(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
    headers: HeaderMap,
    Json(auto): Json<svc::AutoCert>,
) -> Response {
    stream::progress(&headers, move |out| async move {
        s.auto_cert(&who, &app, auto, &out).await
    })
    .await
}

#[utoipa::path(get, path = "/apps/{app}/resources", tag = "limits", params(("app" = String, Path)), responses((status = 200, description = "Done", body = BTreeMap<String, svc::TypeLimits>), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn resources(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
) -> ApiResult<BTreeMap<String, svc::TypeLimits>> {
    Ok(Json(s.resources(&who, &app).await?))
}

#[utoipa::path(patch, path = "/apps/{app}/resources/{process_type}", tag = "limits", params(("app" = String, Path), ("process_type" = String, Path)), request_body = svc::LimitsPatch, responses((status = 200, description = "Done", body = svc::TypeLimits), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn set_resources(
    State(s): S,
    Extension(who): Who,
    Path((app, process_type)): Path<(String, String)>,
    Json(patch): Json<svc::LimitsPatch>,
) -> ApiResult<svc::TypeLimits> {
    Ok(Json(
        s.set_resources(&who, &app, &process_type, patch).await?,
    ))
}

#[utoipa::path(get, path = "/apps/{app}/builds", tag = "limits", params(("app" = String, Path)), responses((status = 200, description = "Done", body = svc::BuildLimits), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn build_limits(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
) -> ApiResult<svc::BuildLimits> {
    Ok(Json(s.build_limits(&who, &app).await?))
}

#[utoipa::path(patch, path = "/apps/{app}/builds", tag = "limits", params(("app" = String, Path)), request_body = svc::LimitsPatch, responses((status = 200, description = "Done", body = svc::BuildLimits), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn set_build_limits(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
    Json(patch): Json<svc::LimitsPatch>,
) -> ApiResult<svc::BuildLimits> {
    Ok(Json(s.set_build_limits(&who, &app, patch).await?))
}

#[utoipa::path(get, path = "/apps/{app}/network", tag = "limits", params(("app" = String, Path)), responses((status = 200, description = "Done", body = svc::NetworkInfo), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn network(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
) -> ApiResult<svc::NetworkInfo> {
    Ok(Json(s.network(&who, &app).await?))
}

#[utoipa::path(put, path = "/apps/{app}/network", tag = "limits", params(("app" = String, Path)), request_body = svc::NetworkInfo, responses((status = 200, description = "Done", body = svc::NetworkSet), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn set_network(
    State(s): S,
    Extension(who): Who,
    Path(app): Path<String>,
    Json(n): Json<svc::NetworkInfo>,
) -> ApiResult<svc::NetworkSet> {
    Ok(Json(s.set_network(&who, &app, n.egress).await?))
}

#[utoipa::path(get, path = "/users", tag = "users", responses((status = 200, description = "Done", body = Vec<UserRow>), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn users(State(s): S, Extension(who): Who) -> ApiResult<Vec<UserRow>> {
    Ok(Json(s.users(&who).await?))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AddUser {
    pub name: String,
    #[serde(default)]
    pub admin: bool,
}

#[utoipa::path(post, path = "/users", tag = "users", request_body = AddUser, description = "Adds a user; the answer holds their generated password, shown once.", responses((status = 201, description = "Created", body = svc::NewUser), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn add_user(
    State(s): S,
    Extension(who): Who,
    Json(u): Json<AddUser>,
) -> Result<(StatusCode, Json<svc::NewUser>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(s.add_user(&who, &u.name, u.admin).await?),
    ))
}

#[utoipa::path(delete, path = "/users/{user}", tag = "users", params(("user" = String, Path)), responses((status = 204, description = "Done"), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn remove_user(
    State(s): S,
    Extension(who): Who,
    Path(user): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.remove_user(&who, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/users/{user}/password", tag = "users", params(("user" = String, Path)), description = "Generates a new password, shown once.", responses((status = 200, description = "Done", body = svc::NewPassword), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn new_password(
    State(s): S,
    Extension(who): Who,
    Path(user): Path<String>,
) -> ApiResult<svc::NewPassword> {
    Ok(Json(s.new_password(&who, &user).await?))
}

/// Whose keys or tokens: a user's (default: the caller's), or everyone's with `*` (admins).
#[derive(Debug, Default, Serialize, Deserialize, utoipa::IntoParams)]
pub struct OfUser {
    pub user: Option<String>,
}

#[utoipa::path(get, path = "/keys", tag = "users", params(OfUser), responses((status = 200, description = "Done", body = Vec<KeyRow>), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn keys(
    State(s): S,
    Extension(who): Who,
    Query(of): Query<OfUser>,
) -> ApiResult<Vec<KeyRow>> {
    Ok(Json(s.keys(&who, of.user.as_deref()).await?))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AddKey {
    pub name: String,
    /// The OpenSSH public key (the `.pub` file's line).
    pub key: String,
    /// Whose key (default: the caller's).
    pub user: Option<String>,
}

#[utoipa::path(post, path = "/keys", tag = "users", request_body = AddKey, responses((status = 201, description = "Created", body = KeyRow), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn add_key(
    State(s): S,
    Extension(who): Who,
    Json(k): Json<AddKey>,
) -> Result<(StatusCode, Json<KeyRow>), ApiError> {
    let key = s.add_key(&who, k.user.as_deref(), &k.name, &k.key).await?;
    Ok((StatusCode::CREATED, Json(key)))
}

#[utoipa::path(delete, path = "/keys/{name}", tag = "users", params(("name" = String, Path)), responses((status = 204, description = "Done"), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn remove_key(
    State(s): S,
    Extension(who): Who,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.remove_key(&who, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/tokens", tag = "users", params(OfUser), responses((status = 200, description = "Done", body = Vec<TokenRow>), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn tokens(
    State(s): S,
    Extension(who): Who,
    Query(of): Query<OfUser>,
) -> ApiResult<Vec<TokenRow>> {
    Ok(Json(s.tokens(&who, of.user.as_deref()).await?))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewToken {
    pub name: String,
    /// Whose token (default: the caller's).
    pub user: Option<String>,
}

#[utoipa::path(post, path = "/tokens", tag = "users", request_body = NewToken, description = "Creates a token; the answer holds it, shown once (only its hash is kept).", responses((status = 201, description = "Created", body = svc::CreatedToken), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn create_token(
    State(s): S,
    Extension(who): Who,
    Json(t): Json<NewToken>,
) -> Result<(StatusCode, Json<svc::CreatedToken>), ApiError> {
    let token = s.create_token(&who, t.user.as_deref(), &t.name).await?;
    Ok((StatusCode::CREATED, Json(token)))
}

#[utoipa::path(delete, path = "/tokens/{name}", tag = "users", params(("name" = String, Path), OfUser), responses((status = 204, description = "Done"), (status = "4XX", description = "Refused or failed: see the code and message", body = ErrorBody)))]
async fn revoke_token(
    State(s): S,
    Extension(who): Who,
    Path(name): Path<String>,
    Query(of): Query<OfUser>,
) -> Result<StatusCode, ApiError> {
    s.revoke_token(&who, of.user.as_deref(), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The git hooks' routes, on the admin socket only (a checkout's path on the server is not
/// for remote callers): build, start and check a push, then make it live.
pub fn hook_routes() -> axum::Router<Arc<Service>> {
    axum::Router::new()
        .route(
            &format!("{PREFIX}/pushes"),
            axum::routing::post(prepare_push),
        )
        .route(
            &format!("{PREFIX}/pushes/{{push}}/promote"),
            axum::routing::post(promote_push),
        )
}

async fn prepare_push(
    State(s): S,
    Extension(who): Who,
    headers: HeaderMap,
    Json(deploy): Json<svc::Deploy>,
) -> Response {
    stream::progress(&headers, move |out| async move {
        s.prepare_push(&who, deploy, &out).await
    })
    .await
}

/// Which app a push promoted by the post-receive hook belongs to.
#[derive(Debug, Serialize, Deserialize)]
pub struct Promote {
    pub app: String,
}

async fn promote_push(
    State(s): S,
    Extension(who): Who,
    Path(push): Path<String>,
    headers: HeaderMap,
    Json(p): Json<Promote>,
) -> Response {
    stream::progress(&headers, move |out| async move {
        s.promote_push(&who, &p.app, &push, &out).await
    })
    .await
}

/// The API as each listener serves it.
pub struct Apps {
    /// The admin socket: every route and the hooks' ones, as the built-in admin.
    pub socket: axum::Router,
    /// `--api` and `berth.<domain>`: every route, with bearer tokens.
    pub tcp: axum::Router,
    /// For SSH commands (the caller is set on each request by `client::Client::local`).
    pub local: axum::Router,
}

impl Apps {
    pub fn new(service: Arc<Service>) -> Self {
        let (routes, doc) = routes();
        let doc = Arc::new(
            doc.to_pretty_json()
                .expect("the OpenAPI document serializes"),
        );
        let openapi = axum::Router::new().route(
            &format!("{PREFIX}/openapi.json"),
            axum::routing::get(move || {
                let doc = doc.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        doc.to_string(),
                    )
                }
            }),
        );
        let finish = |router: axum::Router<Arc<Service>>| {
            router
                .merge(openapi.clone())
                .fallback(not_found)
                .layer(axum::middleware::map_response(errors_as_json))
                .with_state(service.clone())
        };
        let socket = finish(
            routes
                .clone()
                .merge(hook_routes())
                .layer(axum::middleware::from_fn(local_admin)),
        );
        let tcp = finish(routes.clone().layer(axum::middleware::from_fn_with_state(
            service.clone(),
            bearer,
        )));
        let local = finish(routes);
        Self { socket, tcp, local }
    }
}

async fn not_found() -> ApiError {
    ApiError(svc::Error::msg(
        Kind::NotFound,
        "no such API route — see GET /api/v1/openapi.json",
    ))
}

/// Axum's own refusals (a body that is not the JSON a route takes, a wrong method) as JSON
/// errors like the service's.
async fn errors_as_json(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 4096).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    };
    let code = match status.as_u16() {
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        409 => "conflict",
        413 => "too_large",
        415 => "unsupported_media_type",
        422 => "invalid",
        400..=499 => "bad_request",
        _ => "failed",
    };
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_string(),
        text => format!("{text} — see GET /api/v1/openapi.json"),
    };
    let body = ErrorBody {
        code: code.to_string(),
        message,
    };
    (parts.status, Json(body)).into_response()
}

/// Serves `app` on `listener` until `shutdown`; connections in flight are dropped then.
pub async fn serve<L>(listener: L, app: axum::Router, shutdown: tokio_util::sync::CancellationToken)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    until(
        shutdown,
        std::future::IntoFuture::into_future(axum::serve(listener, app)),
    )
    .await
}

/// [`serve`] on TCP, with each request's peer address (`ConnectInfo<SocketAddr>`, which the
/// dashboard's login rate limit needs).
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    until(
        shutdown,
        std::future::IntoFuture::into_future(axum::serve(listener, app)),
    )
    .await
}

async fn until(
    shutdown: tokio_util::sync::CancellationToken,
    served: impl std::future::Future<Output = std::io::Result<()>>,
) {
    tokio::select! {
        served = served => {
            if let Err(err) = served {
                tracing::warn!(%err, "an API listener stopped");
            }
        }
        () = shutdown.cancelled() => {}
    }
}

//! The web dashboard: server-rendered HTML pages (tera templates from `templates/`, CSS and JS
//! from `assets/`, all embedded in the binary) at `/` on the API's TCP listener (`--api`, and
//! `berth.<domain>` through the proxy), beside the REST API under `/api/v1`.
//!
//! Login with a user name and password ([`Service::login`]); a session cookie (`HttpOnly`,
//! `SameSite=Strict`, `Secure` over HTTPS) names a server-side [`session::Session`]; every form
//! carries the session's CSRF token and every POST without it is refused (403); failed logins
//! are rate limited per user name and per client address (429). Without a session only the
//! login page and the assets answer.
//!
//! Owns the pages, their forms and the session handling. Must not decide anything nor touch the
//! store: every page and action is calls into the service as the logged-in user's [`Caller`],
//! and a refusal is shown as its message (with its status on a page of its own).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::progress::{Line, Progress};
use crate::service::{self as svc, Caller, Kind, PsEntry, Service};
use crate::store::{Release, ReleaseStatus};

mod session;
mod traffic;

use session::{Flash, LoginLimit, Session, Sessions};

/// The session cookie's name.
const COOKIE: &str = "berth_session";
/// How many progress lines of an operation a page shows.
const DETAIL_LINES: usize = 30;

struct Dashboard {
    service: Arc<Service>,
    tera: tera::Tera,
    sessions: Sessions,
    limit: LoginLimit,
    history: Arc<traffic::History>,
}

type D = State<Arc<Dashboard>>;

/// The dashboard's routes (to be merged with the API's on the TCP listener, which must be
/// served with `ConnectInfo<SocketAddr>` for the login rate limit). Starts sampling the apps'
/// requests for the charts, until `shutdown`.
pub fn router(service: Arc<Service>, shutdown: tokio_util::sync::CancellationToken) -> Router {
    let history = Arc::new(traffic::History::default());
    tokio::spawn(traffic::sample(service.clone(), history.clone(), shutdown));
    let dashboard = Arc::new(Dashboard {
        service,
        tera: templates(),
        sessions: Sessions::default(),
        limit: LoginLimit::default(),
        history,
    });
    Router::new()
        .route("/", get(overview))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/apps", post(create_app))
        .route("/apps/{app}", get(app_page))
        .route("/apps/{app}/destroy", post(destroy_app))
        .route("/apps/{app}/config", post(set_config))
        .route("/apps/{app}/config/unset", post(unset_config))
        .route("/apps/{app}/scale", post(scale))
        .route("/apps/{app}/rollback", post(rollback))
        .route("/apps/{app}/domains", post(add_domain))
        .route("/apps/{app}/domains/remove", post(remove_domain))
        .route("/apps/{app}/logs", get(logs))
        .route("/apps/{app}/releases/{version}", get(release_output))
        .route("/apps/{app}/deploy", get(deploy_events))
        .route("/assets/{file}", get(asset))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM))
        .layer(axum::middleware::map_response(safety_headers))
        .with_state(dashboard)
}

/// The largest form accepted (a config value is the largest field).
const MAX_FORM: usize = 1 << 20;

/// What every answer carries: scripts, styles and everything else only from berth itself
/// (a backstop behind escaping), never framed (clickjacking), and pages never cached (they
/// show config values).
async fn safety_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// The templates, embedded.
fn templates() -> tera::Tera {
    let mut tera = tera::Tera::default();
    tera.add_raw_templates([
        ("base.html", include_str!("../../templates/base.html")),
        ("login.html", include_str!("../../templates/login.html")),
        ("apps.html", include_str!("../../templates/apps.html")),
        ("app.html", include_str!("../../templates/app.html")),
        ("message.html", include_str!("../../templates/message.html")),
        ("output.html", include_str!("../../templates/output.html")),
    ])
    .expect("the dashboard's templates parse");
    tera
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "berth.css" => (include_str!("../../assets/berth.css"), "text/css"),
        "berth.js" => (include_str!("../../assets/berth.js"), "text/javascript"),
        "logo.svg" => (include_str!("../../assets/logo.svg"), "image/svg+xml"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// Whether the client reached berth over HTTPS: only the proxy (on loopback) can say so.
fn over_https(peer: SocketAddr, headers: &HeaderMap) -> bool {
    peer.ip().is_loopback()
        && headers
            .get("x-forwarded-proto")
            .is_some_and(|v| v.as_bytes() == b"https")
}

/// The client's address: the peer, or, when the peer is the proxy on loopback, the address
/// the proxy appended to `X-Forwarded-For`.
fn client_addr(peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    if !peer.ip().is_loopback() {
        return peer.ip();
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .next_back()
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or(peer.ip())
}

fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(&format!("{COOKIE}=")))
}

fn set_cookie(id: &str, secure: bool) -> HeaderValue {
    let max_age = session::IDLE.as_secs();
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .expect("session ids are hex")
}

/// What every page shows around its content.
#[derive(Serialize)]
struct Frame {
    user: Option<String>,
    admin: bool,
    csrf: String,
    flash: Option<Flash>,
}

/// An error page (or a message) with its status.
fn message(d: &Dashboard, status: StatusCode, title: &str, text: &str) -> Response {
    let mut ctx = tera::Context::new();
    ctx.insert("title", title);
    ctx.insert("text", text);
    ctx.insert(
        "frame",
        &Frame {
            user: None,
            admin: false,
            csrf: String::new(),
            flash: None,
        },
    );
    (status, render(d, "message.html", &ctx)).into_response()
}

fn render(d: &Dashboard, template: &str, ctx: &tera::Context) -> Response {
    match d.tera.render(template, ctx) {
        Ok(html) => Html(html).into_response(),
        Err(err) => {
            tracing::error!(error = ?err, template, "rendering a dashboard page failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered",
            )
                .into_response()
        }
    }
}

/// A service refusal or failure as its own page, with its status.
fn error_page(d: &Dashboard, err: &svc::Error) -> Response {
    let status =
        StatusCode::from_u16(err.kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let title = match err.kind {
        Kind::Forbidden => "Not allowed",
        Kind::NotFound => "Not found",
        _ => "Something went wrong",
    };
    message(d, status, title, &err.message)
}

/// The logged-in user of a request, or the answer to give instead: the login page for a
/// browser without a session.
async fn logged_in(d: &Dashboard, headers: &HeaderMap) -> Result<(Session, Caller), Response> {
    let session = session_id(headers).and_then(|id| d.sessions.get(id));
    let Some((session, user)) = session.and_then(|s| s.user.clone().map(|u| (s, u))) else {
        return Err(Redirect::to("/login").into_response());
    };
    match d.service.caller(&user).await {
        Ok(caller) => Ok((session, caller)),
        // The user was removed: the session ends with them.
        Err(_) => {
            d.sessions.remove(&session.id);
            Err(Redirect::to("/login").into_response())
        }
    }
}

/// [`logged_in`] for a POST: also refuses (403) a form without the session's CSRF token.
async fn posted(
    d: &Dashboard,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<(Session, Caller), Response> {
    let (session, caller) = logged_in(d, headers).await?;
    if !session::same(csrf, &session.csrf) {
        return Err(csrf_refused(d));
    }
    Ok((session, caller))
}

fn csrf_refused(d: &Dashboard) -> Response {
    message(
        d,
        StatusCode::FORBIDDEN,
        "Form refused",
        "The form did not carry this session's security token (it may be from an old page or another site). Go back, reload the page and send it again.",
    )
}

fn frame(d: &Dashboard, session: &Session, caller: &Caller) -> Frame {
    Frame {
        user: Some(caller.user.clone()),
        admin: caller.admin,
        csrf: session.csrf.clone(),
        flash: d.sessions.take_flash(&session.id),
    }
}

/// Keeps what an action did for the page it redirects to, and redirects there.
fn done<T>(
    d: &Dashboard,
    session: &Session,
    to: &str,
    result: Result<T, svc::Error>,
    ok: impl FnOnce(T) -> String,
    detail: Vec<String>,
) -> Response {
    let flash = match result {
        Ok(value) => Flash {
            error: false,
            text: ok(value),
            detail,
        },
        Err(err) => Flash {
            error: true,
            text: err.message,
            detail,
        },
    };
    d.sessions.flash(&session.id, flash);
    Redirect::to(to).into_response()
}

/// Runs a long operation (a deploy) to its end, keeping its last progress lines. It runs in a
/// task of its own, so a browser that goes away does not cut a deploy short.
async fn with_progress<T, F, Fut>(work: F) -> (svc::Result<T>, Vec<String>)
where
    T: Send + 'static,
    F: FnOnce(Progress) -> Fut,
    Fut: Future<Output = svc::Result<T>> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel(256);
    let task = tokio::spawn(work(Progress::new(tx)));
    let mut lines = VecDeque::new();
    while let Some(line) = rx.recv().await {
        let text = match line {
            Line::Out(text) | Line::Warn(text) => text,
        };
        if lines.len() == DETAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(text);
    }
    let result = task.await.map_err(svc::failed).and_then(|r| r);
    (result, lines.into())
}

// --- login ---

async fn login_page(
    State(d): D,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if logged_in(&d, &headers).await.is_ok() {
        return Redirect::to("/").into_response();
    }
    let session = match session_id(&headers).and_then(|id| d.sessions.get(id)) {
        Some(session) => session,
        None => d.sessions.create(None),
    };
    login_form(&d, &session, peer, &headers, StatusCode::OK, None, "")
}

fn login_form(
    d: &Dashboard,
    session: &Session,
    peer: SocketAddr,
    headers: &HeaderMap,
    status: StatusCode,
    error: Option<&str>,
    user: &str,
) -> Response {
    let mut ctx = tera::Context::new();
    ctx.insert(
        "frame",
        &Frame {
            user: None,
            admin: false,
            csrf: session.csrf.clone(),
            flash: error.map(|text| Flash {
                error: true,
                text: text.to_string(),
                detail: vec![],
            }),
        },
    );
    ctx.insert("name", user);
    let mut response = render(d, "login.html", &ctx);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(&session.id, over_https(peer, headers)),
    );
    response
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
}

async fn login(
    State(d): D,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let session = session_id(&headers).and_then(|id| d.sessions.get(id));
    let Some(session) = session.filter(|s| session::same(&form.csrf, &s.csrf)) else {
        return csrf_refused(&d);
    };
    let addr = client_addr(peer, &headers);
    let user = form.user.trim();
    if d.limit.blocked(user, addr) {
        let text = format!(
            "Too many failed logins for this user or from this address — wait {} minutes and try again, or ask an admin to set a new password (berth users:passwd NAME).",
            session::WINDOW.as_secs() / 60
        );
        return login_form(
            &d,
            &session,
            peer,
            &headers,
            StatusCode::TOO_MANY_REQUESTS,
            Some(&text),
            user,
        );
    }
    match d.service.login(user, &form.password).await {
        Ok(caller) => {
            tracing::info!(user = %caller.user, %addr, "dashboard login");
            d.sessions.remove(&session.id);
            let fresh = d.sessions.create(Some(caller.user));
            let mut response = Redirect::to("/").into_response();
            response.headers_mut().insert(
                header::SET_COOKIE,
                set_cookie(&fresh.id, over_https(peer, &headers)),
            );
            response
        }
        Err(err) => {
            tracing::info!(%user, %addr, "dashboard login refused");
            d.limit.failed(user, addr);
            let status =
                StatusCode::from_u16(err.kind.http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
            login_form(
                &d,
                &session,
                peer,
                &headers,
                status,
                Some(&err.message),
                user,
            )
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(State(d): D, headers: HeaderMap, Form(form): Form<CsrfForm>) -> Response {
    let (session, _) = match posted(&d, &headers, &form.csrf).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    d.sessions.remove(&session.id);
    Redirect::to("/login").into_response()
}

// --- the apps overview ---

/// An app at a glance.
#[derive(Serialize)]
struct AppRow {
    name: String,
    /// running, deploying, crashed, failed, idle (scaled to nothing) or new (never deployed).
    state: String,
    release: Option<i64>,
    url: String,
    containers: usize,
    last_deploy: String,
    last_deploy_age: String,
}

/// An app's state from its releases (newest first) and its containers' states.
fn app_state(releases: &[Release], container_states: &[String]) -> &'static str {
    svc::app_state(&svc::ReleaseFacts::of(releases), container_states)
}

fn container_states(ps: &[PsEntry]) -> Vec<String> {
    ps.iter()
        .filter_map(|e| match e {
            PsEntry::Container { status, .. } => Some(status.clone()),
            PsEntry::Run { .. } => None,
        })
        .collect()
}

async fn overview(State(d): D, headers: HeaderMap) -> Response {
    let (session, who) = match logged_in(&d, &headers).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let rows: Vec<AppRow> = match d.service.overview(&who).await {
        Ok(apps) => apps
            .into_iter()
            .map(|a| AppRow {
                last_deploy_age: crate::client::commands::age(&a.last_deploy),
                name: a.name,
                state: a.state,
                release: a.release,
                url: a.url,
                containers: a.containers,
                last_deploy: a.last_deploy,
            })
            .collect(),
        Err(err) => return error_page(&d, &err),
    };
    let mut ctx = tera::Context::new();
    ctx.insert("frame", &frame(&d, &session, &who));
    ctx.insert("apps", &rows);
    render(&d, "apps.html", &ctx)
}

#[derive(Deserialize)]
struct NameForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
}

async fn create_app(State(d): D, headers: HeaderMap, Form(form): Form<NameForm>) -> Response {
    let (session, who) = match posted(&d, &headers, &form.csrf).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let name = form.name.trim();
    let result = d.service.create_app(&who, name).await;
    let to = match &result {
        Ok(info) => format!("/apps/{}", info.name),
        Err(_) => "/".to_string(),
    };
    done(
        &d,
        &session,
        &to,
        result,
        |info| {
            format!(
                "Created {}. Deploy it with: git push {} main",
                info.name, info.git_remote
            )
        },
        vec![],
    )
}

async fn destroy_app(
    State(d): D,
    Path(app): Path<String>,
    headers: HeaderMap,
    Form(form): Form<NameForm>,
) -> Response {
    let (session, who) = match posted(&d, &headers, &form.csrf).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    if form.name.trim() != app {
        let refused = Err(svc::Error::msg(
            Kind::Invalid,
            format!("{app} was not destroyed — type its name, {app}, to confirm"),
        ));
        return done(
            &d,
            &session,
            &format!("/apps/{app}"),
            refused,
            |()| String::new(),
            vec![],
        );
    }
    let result = d.service.destroy_app(&who, &app).await;
    let to = match result {
        Ok(_) => "/".to_string(),
        Err(_) => format!("/apps/{app}"),
    };
    done(
        &d,
        &session,
        &to,
        result,
        |gone| format!("Destroyed {}.", gone.name),
        vec![],
    )
}

// --- an app's page ---

#[derive(Serialize)]
struct ProcessRow {
    name: String,
    release: i64,
    status: String,
    /// up, starting, draining, crashed: for the badge.
    state: String,
    restarts: i64,
    uptime: String,
    limits: String,
    /// Memory now and CPU time so far, as people read them; empty when it does not run.
    memory: String,
    cpu: String,
    /// Memory now and the limit, in bytes, for its gauge.
    memory_bytes: Option<u64>,
    memory_limit: u64,
}

/// `34.5 MiB`.
fn memory_text(bytes: Option<u64>) -> String {
    bytes.map_or(String::new(), |b| {
        format!("{:.1} MiB", b as f64 / 1048576.0)
    })
}

/// `1.25 s`.
fn cpu_text(secs: Option<f64>) -> String {
    secs.map_or(String::new(), |s| format!("{s:.2} s"))
}

#[derive(Serialize)]
struct ReleaseRow {
    #[serde(flatten)]
    release: Release,
    age: String,
    /// Whether a rollback to it makes sense (it ran and is not what runs now).
    can_roll_back: bool,
}

async fn app_page(State(d): D, Path(app): Path<String>, headers: HeaderMap) -> Response {
    let (session, who) = match logged_in(&d, &headers).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let s = &d.service;
    let loaded = tokio::try_join!(
        s.app_info(&who, &app),
        s.releases(&who, &app),
        s.ps(&who, &app),
        s.config(&who, &app),
        s.domains(&who, &app),
        s.traffic(&who, &app),
    );
    let (info, releases, ps, config, domains, requests) = match loaded {
        Ok(loaded) => loaded,
        Err(err) => return error_page(&d, &err),
    };
    let logs = match last_logs(s, &who, &app).await {
        Ok(logs) => logs,
        Err(err) => return error_page(&d, &err),
    };
    let states = container_states(&ps);
    let processes: Vec<ProcessRow> = ps
        .iter()
        .map(|entry| match entry {
            PsEntry::Container {
                container,
                status,
                limits,
                memory,
                cpu_secs,
                memory_limit,
            } => ProcessRow {
                memory_bytes: *memory,
                memory_limit: *memory_limit,
                memory: memory_text(*memory),
                cpu: cpu_text(*cpu_secs),
                name: format!("{}.{}", container.process_type, container.number),
                release: container.release,
                state: status.split(' ').next().unwrap_or_default().to_string(),
                status: status.clone(),
                restarts: container.restarts,
                uptime: crate::client::commands::age(&container.created_at),
                limits: limits.clone(),
            },
            PsEntry::Run {
                run,
                status,
                limits,
            } => ProcessRow {
                name: format!("{}.{} ({})", run.process_type, run.number, run.command),
                release: run.release,
                state: status.clone(),
                status: status.clone(),
                restarts: 0,
                uptime: crate::client::commands::age(&run.created_at),
                limits: limits.clone(),
                memory: String::new(),
                cpu: String::new(),
                memory_bytes: None,
                memory_limit: 0,
            },
        })
        .collect();
    let live = releases
        .iter()
        .find(|r| r.status == ReleaseStatus::Live)
        .cloned();
    let formation: BTreeMap<String, u32> = live
        .as_ref()
        .map(|r| {
            r.process_types
                .keys()
                .map(|t| (t.clone(), r.formation.get(t).copied().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    let state = app_state(&releases, &states);
    let rows: Vec<ReleaseRow> = releases
        .into_iter()
        .map(|r| ReleaseRow {
            age: crate::client::commands::age(&r.created_at),
            can_roll_back: r.status == ReleaseStatus::Superseded,
            release: r,
        })
        .collect();
    let mut ctx = tera::Context::new();
    ctx.insert("frame", &frame(&d, &session, &who));
    ctx.insert("app", &info);
    ctx.insert("state", state);
    ctx.insert("running", &svc::running(&states));
    ctx.insert("processes", &processes);
    ctx.insert("releases", &rows);
    // A deploy in progress: its output so far (the page's script follows the rest).
    if let Ok((so_far, _)) = s.watch_deploy(&who, &app).await {
        ctx.insert("deploy_lines", &so_far.lines().count());
        ctx.insert("deploy_output", &so_far);
    }
    ctx.insert("config", &config);
    ctx.insert("domains", &domains);
    ctx.insert("formation", &formation);
    ctx.insert("logs", &logs);
    ctx.insert(
        "traffic",
        &serde_json::json!({
            "requests": requests.requests,
            "shares": traffic::shares(&requests),
            "bars": traffic::bars(&d.history.per_minute(&app, &requests)),
            "width": traffic::CHART_WIDTH,
            "height": traffic::CHART_HEIGHT,
            "minutes": traffic::MINUTES,
        }),
    );
    render(&d, "app.html", &ctx)
}

/// How many log lines the app page shows (and the stream sends first).
const LOG_LINES: usize = 100;

async fn last_logs(s: &Service, who: &Caller, app: &str) -> svc::Result<Vec<svc::LogLine>> {
    let query = svc::LogQuery {
        num: LOG_LINES,
        process: None,
        follow: false,
    };
    let (tx, mut rx) = mpsc::channel(LOG_LINES + 1);
    s.logs(who, app, &query, tx).await?;
    let mut lines = Vec::new();
    while let Some(line) = rx.recv().await {
        lines.push(line);
    }
    Ok(lines)
}

#[derive(Deserialize)]
struct ConfigForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    key: String,
    value: Option<String>,
}

async fn change_config(
    d: Arc<Dashboard>,
    app: String,
    headers: HeaderMap,
    form: ConfigForm,
) -> Response {
    let (session, who) = match posted(&d, &headers, &form.csrf).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let patch = svc::ConfigPatch {
        vars: [(form.key.trim().to_string(), form.value)].into(),
        restart: true,
    };
    let (s, name) = (d.service.clone(), app.clone());
    let (result, detail) =
        with_progress(move |out| async move { s.change_config(&who, &name, patch, &out).await })
            .await;
    let ok = |change: svc::ConfigChange| match change.release {
        Some(v) => format!("{} — release v{v} is live.", change.description),
        None => format!("{} — it applies from the first deploy.", change.description),
    };
    done(
        &d,
        &session,
        &format!("/apps/{app}#config"),
        result,
        ok,
        detail,
    )
}

async fn set_config(
    State(d): D,
    Path(app): Path<String>,
    headers: HeaderMap,
    Form(form): Form<ConfigForm>,
) -> Response {
    let form = ConfigForm {
        value: Some(form.value.clone().unwrap_or_default()),
        ..form
    };
    change_config(d, app, headers, form).await
}

async fn unset_config(
    State(d): D,
    Path(app): Path<String>,
    headers: HeaderMap,
    Form(form): Form<ConfigForm>,
) -> Response {
    let form = ConfigForm {
        value: None,
        ..form
    };
    change_config(d, app, headers, form).await
}

async fn scale(
    State(d): D,
    Path(app): Path<String>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let csrf = form.get("csrf").map(String::as_str).unwrap_or_default();
    let (session, who) = match posted(&d, &headers, csrf).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let mut formation = BTreeMap::new();
    for (field, value) in &form {
        let Some(kind) = field.strip_prefix("count.") else {
            continue;
        };
        match value.trim().parse::<u32>() {
            Ok(n) => {
                formation.insert(kind.to_string(), n);
            }
            Err(_) => {
                let err = svc::Error::msg(
                    Kind::Invalid,
                    format!("{value:?} is not a number of containers for {kind} — give a whole number such as 2"),
                );
                return done(
                    &d,
                    &session,
                    &format!("/apps/{app}#processes"),
                    Err::<(), _>(err),
                    |()| String::new(),
                    vec![],
                );
            }
        }
    }
    let (s, name) = (d.service.clone(), app.clone());
    let (result, detail) =
        with_progress(move |out| async move { s.scale(&who, &name, &formation, &out).await }).await;
    let ok = |scaled: svc::Scaled| {
        let counts: Vec<String> = scaled
            .formation
            .iter()
            .map(|(t, n)| format!("{t}={n}"))
            .collect();
        format!(
            "Scaled to {} — release v{} is live.",
            counts.join(" "),
            scaled.version
        )
    };
    done(
        &d,
        &session,
        &format!("/apps/{app}#processes"),
        result,
        ok,
        detail,
    )
}

#[derive(Deserialize)]
struct RollbackForm {
    #[serde(default)]
    csrf: String,
    version: Option<i64>,
}

async fn rollback(
    State(d): D,
    Path(app): Path<String>,
    headers: HeaderMap,
    Form(form): Form<RollbackForm>,
) -> Response {
    let (session, who) = match posted(&d, &headers, &form.csrf).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let (s, name, version) = (d.service.clone(), app.clone(), form.version);
    let (result, detail) =
        with_progress(move |out| async move { s.rollback(&who, &name, version, &out).await }).await;
    let ok = |r: Release| format!("{} — release v{} is live.", r.description, r.version);
    done(
        &d,
        &session,
        &format!("/apps/{app}#releases"),
        result,
        ok,
        detail,
    )
}

#[derive(Deserialize)]
struct HostForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    host: String,
}

async fn add_domain(
    State(d): D,
    Path(app): Path<String>,
    headers: HeaderMap,
    Form(form): Form<HostForm>,
) -> Response {
    let (session, who) = match posted(&d, &headers, &form.csrf).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let result = d.service.add_domain(&who, &app, form.host.trim()).await;
    let ok = |host: String| format!("{app} is served at {host} too.");
    done(
        &d,
        &session,
        &format!("/apps/{app}#domains"),
        result,
        ok,
        vec![],
    )
}

async fn remove_domain(
    State(d): D,
    Path(app): Path<String>,
    headers: HeaderMap,
    Form(form): Form<HostForm>,
) -> Response {
    let (session, who) = match posted(&d, &headers, &form.csrf).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let host = form.host.trim();
    let result = d.service.remove_domain(&who, &app, host).await;
    let ok = |()| format!("{app} is no longer served at {host}.");
    done(
        &d,
        &session,
        &format!("/apps/{app}#domains"),
        result,
        ok,
        vec![],
    )
}

/// The app's last log lines, then each new one, as server-sent events (one JSON
/// [`svc::LogLine`] each), until the browser goes away. The page's script replaces the lines
/// the page was rendered with by these.
async fn logs(State(d): D, Path(app): Path<String>, headers: HeaderMap) -> Response {
    let (_, who) = match logged_in(&d, &headers).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    // Refusals get their status before the stream starts.
    if let Err(err) = d.service.app(&who, &app).await {
        return error_page(&d, &err);
    }
    let query = svc::LogQuery {
        num: LOG_LINES,
        process: None,
        follow: true,
    };
    let (tx, rx) = mpsc::channel(256);
    let s = d.service.clone();
    tokio::spawn(async move {
        // Ends when the browser goes away: the stream drops rx, and `logs` notices.
        if let Err(err) = s.logs(&who, &app, &query, tx).await {
            tracing::warn!(%err, %app, "following logs for the dashboard failed");
        }
    });
    let events = futures::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        let event = Event::default()
            .json_data(&line)
            .unwrap_or_else(|_| Event::default().data(line.text));
        Some((Ok::<_, std::convert::Infallible>(event), rx))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// What the deploy that made a release printed.
async fn release_output(
    State(d): D,
    Path((app, version)): Path<(String, i64)>,
    headers: HeaderMap,
) -> Response {
    let (session, who) = match logged_in(&d, &headers).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let output = match d.service.release_output(&who, &app, version).await {
        Ok(output) => output,
        Err(err) => return error_page(&d, &err),
    };
    let mut ctx = tera::Context::new();
    ctx.insert("frame", &frame(&d, &session, &who));
    ctx.insert("app", &app);
    ctx.insert("version", &version);
    ctx.insert("output", &output);
    render(&d, "output.html", &ctx)
}

/// How many lines of a deploy's output the page already shows.
#[derive(Deserialize)]
struct Shown {
    #[serde(default)]
    from: usize,
}

/// The deploy of the app in progress as server-sent events: its output so far (past the lines
/// the page shows) and each line it prints, then an `end` event when it is over (the page's
/// script then reloads).
async fn deploy_events(
    State(d): D,
    Path(app): Path<String>,
    Query(shown): Query<Shown>,
    headers: HeaderMap,
) -> Response {
    let (_, who) = match logged_in(&d, &headers).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let (so_far, next) = match d.service.watch_deploy(&who, &app).await {
        Ok(watch) => watch,
        Err(err) => return error_page(&d, &err),
    };
    use futures::StreamExt;
    let first: Vec<_> = so_far
        .lines()
        .skip(shown.from)
        .map(|line| Ok::<_, std::convert::Infallible>(Event::default().data(line)))
        .collect();
    let rest = futures::stream::unfold(Some(next), |next| async move {
        let mut next = next?;
        let event = match next.recv().await {
            Ok(Some(line)) => Event::default().data(line),
            Ok(None) | Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                return Some((Ok(Event::default().event("end").data("over")), None));
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                Event::default().data(format!("… ({n} lines skipped)"))
            }
        };
        Some((Ok(event), Some(next)))
    });
    Sse::new(futures::stream::iter(first).chain(rest))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(version: i64, status: ReleaseStatus) -> Release {
        Release {
            app: "shop".into(),
            version,
            image: String::new(),
            config: Default::default(),
            process_types: Default::default(),
            formation: Default::default(),
            description: String::new(),
            created_at: String::new(),
            status,
            reason: String::new(),
            created_by: String::new(),
            checks: Default::default(),
        }
    }

    #[test]
    fn states_at_a_glance() {
        use ReleaseStatus::*;
        let up = vec!["up".to_string()];
        let crashed = vec!["up".to_string(), "crashed (exit 1)".to_string()];
        let cases: &[(&[Release], &[String], &str)] = &[
            (&[], &[], "new"),
            (&[release(1, Failed)], &[], "failed"),
            (&[release(2, Live), release(1, Superseded)], &up, "running"),
            (&[release(2, Live)], &[], "idle"),
            (&[release(2, Deploying), release(1, Live)], &up, "deploying"),
            (&[release(2, Live)], &crashed, "crashed"),
            (&[release(3, Failed), release(2, Live)], &up, "failed"),
        ];
        for (releases, states, want) in cases {
            assert_eq!(
                app_state(releases, states),
                *want,
                "{releases:?} {states:?}"
            );
        }
    }

    #[test]
    fn usage_as_people_read_it() {
        assert_eq!(memory_text(Some(35 << 20)), "35.0 MiB");
        assert_eq!(memory_text(None), "");
        assert_eq!(cpu_text(Some(1.254)), "1.25 s");
        assert_eq!(cpu_text(None), "");
    }

    #[test]
    fn client_address_comes_from_the_proxy_only_on_loopback() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "1.2.3.4, 5.6.7.8".parse().unwrap());
        headers.insert("x-forwarded-proto", "https".parse().unwrap());
        let proxy: SocketAddr = ([127, 0, 0, 1], 9).into();
        let remote: SocketAddr = ([192, 0, 2, 1], 9).into();
        assert_eq!(client_addr(proxy, &headers), IpAddr::from([5, 6, 7, 8]));
        assert_eq!(client_addr(remote, &headers), remote.ip());
        assert!(over_https(proxy, &headers));
        assert!(!over_https(remote, &headers));
        assert_eq!(client_addr(proxy, &HeaderMap::new()), proxy.ip());
    }

    #[test]
    fn session_cookie() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "a=b; berth_session=abc12; c=d".parse().unwrap(),
        );
        assert_eq!(session_id(&headers), Some("abc12"));
        let cookie = set_cookie("abc12", true);
        let cookie = cookie.to_str().unwrap();
        for part in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
            assert!(cookie.contains(part), "{cookie}");
        }
        assert!(!set_cookie("x", false).to_str().unwrap().contains("Secure"));
    }

    #[test]
    fn templates_escape_what_they_show() {
        let tera = templates();
        let mut ctx = tera::Context::new();
        ctx.insert("title", "<script>alert(1)</script>");
        ctx.insert("text", "<b>bold</b>");
        ctx.insert(
            "frame",
            &Frame {
                user: None,
                admin: false,
                csrf: String::new(),
                flash: None,
            },
        );
        let html = tera.render("message.html", &ctx).unwrap();
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(!html.contains("<b>bold"), "{html}");
    }
}

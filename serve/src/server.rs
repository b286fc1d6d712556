//! The router: pages, server-sent events, artifacts and the JSON API.

use crate::api;
use crate::artifacts;
use crate::auth;
use crate::db::Db;
use crate::history::case_history;
use crate::pages::{self, HostView};
use crate::{Result, ServeError};
use axum::body::Body;
use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use hilrig_reports::{Outcome, Run};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    /// The results store.
    pub db: Arc<Db>,
    /// How often a live run page's event stream looks at the store.
    pub poll: Duration,
    /// Runs the host pages look at.
    pub host_runs: usize,
    /// Time a client has to send a request's headers (a slowloris client that
    /// trickles them, or connects and sends nothing, is dropped after it).
    pub header_timeout: Duration,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
}

impl AppState {
    /// State over `db` with the default poll (500 ms), 30 runs for hosts,
    /// [`HEADER_TIMEOUT`] and [`MAX_CONNECTIONS`].
    pub fn new(db: Arc<Db>) -> AppState {
        AppState {
            db,
            poll: Duration::from_millis(500),
            host_runs: 30,
            header_timeout: HEADER_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// An error shown as an HTML page.
pub struct PageError(pub ServeError);

impl From<ServeError> for PageError {
    fn from(e: ServeError) -> Self {
        PageError(e)
    }
}

/// The HTTP status of an error.
pub fn status_of(e: &ServeError) -> StatusCode {
    match e {
        ServeError::NotFound(_) => StatusCode::NOT_FOUND,
        ServeError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ServeError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        ServeError::Forbidden(_) => StatusCode::FORBIDDEN,
        ServeError::Artifact(artifacts::ArtifactError::Refused { .. }) => StatusCode::BAD_REQUEST,
        ServeError::Artifact(artifacts::ArtifactError::Open { .. }) => StatusCode::NOT_FOUND,
        ServeError::Webhook(crate::webhook::WebhookError::Url { .. }) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let st = status_of(&self.0);
        (st, html(pages::error(st.as_u16(), &self.0.to_string()))).into_response()
    }
}

type PageResult = std::result::Result<Response, PageError>;

/// An HTML response with the pages' security headers.
pub fn html(body: String) -> Response {
    let mut r = Html(body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(pages::CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

/// The whole router over `state`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/runs/{id}", get(run_page))
        .route("/runs/{id}/events", get(run_events))
        .route("/runs/{id}/artifacts/{*path}", get(artifact))
        .route("/history", get(history_page))
        .route("/campaigns/{name}", get(trends_page))
        .route("/hosts", get(hosts_page))
        .route("/hosts/{name}", get(host_page))
        .route("/queue", post(queue_form))
        .route("/queue/{id}/cancel", post(cancel_form))
        .route("/static/live.js", get(live_js))
        .merge(api::routes())
        .with_state(state)
}

/// Default time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default most connections served at once.
pub const MAX_CONNECTIONS: usize = 512;

/// Serve on `listener` until the process ends: HTTP/1.1, each request's headers
/// within `state.header_timeout` (`axum::serve` sets no timer, so a client that
/// never finished its headers held its connection for ever), at most
/// `state.max_connections` connections at once (the next ones wait in the
/// listen backlog until one ends).
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> Result<()> {
    let header_timeout = state.header_timeout;
    let slots = Arc::new(tokio::sync::Semaphore::new(state.max_connections.max(1)));
    let app = router(state);
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| ServeError::Task(e.to_string()))?;
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors and the like: wait, as axum::serve does.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!("connection: {e}");
            }
        });
    }
}

#[derive(Deserialize)]
struct IndexQuery {
    campaign: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

/// Regressions of each run: its FAIL/TIMEOUT cases that did not fail in the
/// next older run of the same campaign among `rows` (newest first).
pub fn regressions(
    rows: &[hilrig_campaigns::store::RunIndexRow],
    failing: &[(String, String)],
) -> BTreeMap<String, Vec<String>> {
    let mut by_run: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (r, c) in failing {
        by_run.entry(r).or_default().push(c);
    }
    let mut out = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        let Some(prev) = rows[i + 1..]
            .iter()
            .find(|p| p.run.campaign == r.run.campaign)
        else {
            continue;
        };
        let before = by_run
            .get(prev.run.id.as_str())
            .cloned()
            .unwrap_or_default();
        let now = by_run.get(r.run.id.as_str()).cloned().unwrap_or_default();
        let new: Vec<String> = now
            .into_iter()
            .filter(|c| !before.contains(c))
            .map(str::to_string)
            .collect();
        if !new.is_empty() {
            out.insert(r.run.id.clone(), new);
        }
    }
    out
}

async fn index(State(st): State<AppState>, Query(q): Query<IndexQuery>) -> PageResult {
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let offset = q.offset.unwrap_or(0);
    let (rows, failing, queue) = st
        .db
        .with(move |s| {
            // A few more rows than shown, to find each shown run's predecessor.
            let rows = s.run_index(q.campaign.as_deref(), limit + 20, offset)?;
            let ids: Vec<String> = rows.iter().map(|r| r.run.id.clone()).collect();
            let failing = s.failing_cases(&ids)?;
            let queue = s.queue(20)?;
            Ok((rows, failing, queue))
        })
        .await?;
    let reg = regressions(&rows, &failing);
    let shown = &rows[..rows.len().min(limit)];
    Ok(html(pages::index(shown, &reg, &queue)))
}

async fn run_page(State(st): State<AppState>, Path(id): Path<String>) -> PageResult {
    let id2 = id.clone();
    let (run, finished, prev) = st
        .db
        .with(move |s| {
            let Some(row) = s.run(&id2)? else {
                return Ok(None);
            };
            let run = s.load_run(&id2)?;
            let prev = match row.finished_ms {
                Some(_) => s.previous_run(&row.campaign, &row.id, row.started_ms)?,
                None => None,
            };
            Ok(run.map(|r| (r, row.finished_ms.is_some(), prev)))
        })
        .await?
        .ok_or_else(|| ServeError::NotFound(format!("run {id}")))?;
    if !finished {
        return Ok(html(pages::live_run(&run)));
    }
    let d = prev.as_ref().map(|p| hilrig_reports::diff(p, &run));
    let opts = hilrig_reports::HtmlOptions {
        // Raw: the report percent-encodes the whole link itself.
        artifact_base: format!("/runs/{}/artifacts", run.id),
        case_link_base: Some("/history?case=".into()),
        ..Default::default()
    };
    let page = hilrig_reports::to_html(&run, d.as_ref(), prev.as_ref(), &opts);
    let nav = format!(
        r#"<body><nav style="padding:10px 24px;background:#263238"><a style="color:#fff;margin-right:18px;font-weight:600" href="/">Runs</a><a style="color:#fff;margin-right:18px;font-weight:600" href="/campaigns/{}">Trends</a><a style="color:#fff;font-weight:600" href="/hosts">Hosts</a></nav>"#,
        pages::enc(&run.campaign)
    );
    Ok(html(page.replacen("<body>", &nav, 1)))
}

#[derive(Deserialize)]
struct EventsQuery {
    seen: Option<usize>,
}

/// One step of a live run's event stream.
struct Live {
    db: Arc<Db>,
    id: String,
    seen: usize,
    poll: Duration,
    ended: bool,
    first: bool,
}

async fn live_step(mut l: Live) -> Option<(Vec<Event>, Live)> {
    if l.ended {
        return None;
    }
    if !l.first {
        tokio::time::sleep(l.poll).await;
    }
    l.first = false;
    let id = l.id.clone();
    let got = l.db.with(move |s| Ok((s.run(&id)?, s.cases(&id)?))).await;
    let (row, cases) = match got {
        Ok(v) => v,
        Err(e) => {
            l.ended = true;
            return Some((vec![Event::default().event("error").data(e.to_string())], l));
        }
    };
    let mut evs = vec![];
    let total = cases.len();
    for c in cases.into_iter().skip(l.seen) {
        l.seen += 1;
        let data = serde_json::json!({
            "id": c.id, "outcome": c.outcome, "host": c.host,
            "duration_ms": c.duration_ms, "message": c.message, "done": l.seen,
        });
        evs.push(Event::default().event("case").data(data.to_string()));
    }
    let _ = total;
    match row {
        None => {
            l.ended = true;
            evs.push(Event::default().event("end").data("gone"));
        }
        Some(r) if r.finished_ms.is_some() => {
            l.ended = true;
            evs.push(Event::default().event("end").data("finished"));
        }
        Some(_) => {}
    }
    Some((evs, l))
}

async fn run_events(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Response {
    let live = Live {
        db: st.db.clone(),
        id,
        seen: q.seen.unwrap_or(0),
        poll: st.poll,
        ended: false,
        first: true,
    };
    let stream = futures_util::stream::unfold(live, live_step)
        .flat_map(|evs| futures_util::stream::iter(evs.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit('.').next().unwrap_or("");
    match ext {
        "txt" | "log" | "vcd" | "jsonl" => "text/plain; charset=utf-8",
        "json" => "application/json",
        _ => "application/octet-stream",
    }
}

async fn artifact(
    State(st): State<AppState>,
    Path((id, path)): Path<(String, String)>,
) -> PageResult {
    let id2 = id.clone();
    let row = st
        .db
        .with(move |s| s.run(&id2))
        .await?
        .ok_or_else(|| ServeError::NotFound(format!("run {id}")))?;
    // Checked and opened off the async threads (openat walks the directories).
    let dir = PathBuf::from(&row.run_dir);
    let p = path.clone();
    let (file, len) = tokio::task::spawn_blocking(move || artifacts::open(&dir, &p))
        .await
        .map_err(|e| ServeError::Task(e.to_string()))?
        .map_err(ServeError::from)?;
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(&path)),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    Ok(r)
}

/// `?case=ID&nights=N`.
#[derive(Deserialize)]
pub struct HistoryQuery {
    /// The case id.
    pub case: String,
    /// Nights (default 30, at most 1000).
    pub nights: Option<usize>,
}

/// Default nights of a history.
pub const DEFAULT_NIGHTS: usize = 30;
/// Most nights of a history.
pub const MAX_NIGHTS: usize = 1000;

async fn history_page(State(st): State<AppState>, Query(q): Query<HistoryQuery>) -> PageResult {
    let n = q.nights.unwrap_or(DEFAULT_NIGHTS).clamp(1, MAX_NIGHTS);
    let case = q.case.clone();
    let h = st.db.with(move |s| case_history(s, &case, n)).await?;
    if h.nights.is_empty() {
        return Err(ServeError::NotFound(format!("case {}", q.case)).into());
    }
    Ok(html(pages::history(&h)))
}

#[derive(Deserialize)]
struct TrendsQuery {
    nights: Option<usize>,
}

async fn trends_page(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<TrendsQuery>,
) -> PageResult {
    let n = q.nights.unwrap_or(DEFAULT_NIGHTS).clamp(1, 200);
    let name2 = name.clone();
    let runs: Vec<Run> = st
        .db
        .with(move |s| {
            let rows = s.run_index(Some(&name2), n, 0)?;
            let mut runs = vec![];
            for r in rows.iter().rev() {
                if r.run.finished_ms.is_some() {
                    if let Some(run) = s.load_run(&r.run.id)? {
                        runs.push(run);
                    }
                }
            }
            Ok(runs)
        })
        .await?;
    if runs.is_empty() {
        return Err(ServeError::NotFound(format!("finished runs of campaign {name}")).into());
    }
    Ok(html(pages::trends(&name, &runs)))
}

/// What the store (and the rig's lease table in the same database) knows of
/// the hosts, from the last `n` runs.
pub fn host_views(db: &Db, n: usize) -> Result<Vec<HostView>> {
    let runs: Vec<(Run, String)> = db.blocking(|s| {
        let rows = s.run_index(None, n, 0)?;
        let mut out = vec![];
        for r in rows {
            if let Some(run) = s.load_run(&r.run.id)? {
                out.push((run, r.run.run_dir.clone()));
            }
        }
        Ok(out)
    })?;
    let mut hosts: BTreeMap<String, HostView> = BTreeMap::new();
    for (run, _) in &runs {
        for h in &run.hosts {
            hosts.entry(h.name.clone()).or_insert_with(|| HostView {
                name: h.name.clone(),
                ..Default::default()
            });
        }
        for c in &run.cases {
            for a in &c.attempts {
                let v = hosts.entry(a.host.clone()).or_insert_with(|| HostView {
                    name: a.host.clone(),
                    ..Default::default()
                });
                v.attempts
                    .push((run.id.clone(), c.id.clone(), a.outcome, a.message.clone()));
            }
        }
    }
    // Last console lines: the newest non-empty console artifact of a case that
    // ended on the host.
    for v in hosts.values_mut() {
        'runs: for (run, dir) in &runs {
            for c in run.cases.iter().filter(|c| c.host == v.name) {
                for a in c
                    .artifacts
                    .iter()
                    .filter(|a| a.kind == hilrig_reports::ArtifactKind::Console)
                {
                    if let Ok(lines) = artifacts::tail_lines(std::path::Path::new(dir), &a.path, 20)
                    {
                        if !lines.is_empty() {
                            v.console = Some((run.id.clone(), a.path.clone(), lines));
                            break 'runs;
                        }
                    }
                }
            }
        }
    }
    // Device states: the rig's host-state table (SQLite results databases; the
    // runner records offline hosts there).
    let spec = db.spec();
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        for v in hosts.values_mut() {
            v.health_note = Some("not recorded: host states live in the runner's SQLite database, not in PostgreSQL stores".into());
        }
    } else {
        match hilrig_rig::hoststate::HostStates::open(spec).and_then(|s| s.list()) {
            Ok(rows) => {
                for r in rows {
                    let v = hosts.entry(r.host.clone()).or_insert_with(|| HostView {
                        name: r.host.clone(),
                        ..Default::default()
                    });
                    v.health = Some(r);
                }
            }
            Err(e) => {
                for v in hosts.values_mut() {
                    v.health_note = Some(format!("host-state table not readable: {e}"));
                }
            }
        }
    }
    // Leases: the rig's table, when it lives in this database.
    match hilrig_rig::lease::LeaseStore::open(db.spec()).and_then(|l| l.list()) {
        Ok(rows) => {
            for r in rows {
                let v = hosts.entry(r.host.clone()).or_insert_with(|| HostView {
                    name: r.host.clone(),
                    ..Default::default()
                });
                v.lease = Some((r.holder, r.active, r.expires_unix_ms));
            }
        }
        Err(e) => {
            for v in hosts.values_mut() {
                v.lease_note = Some(format!("lease table not readable: {e}"));
            }
        }
    }
    Ok(hosts.into_values().collect())
}

async fn hosts_page(State(st): State<AppState>) -> PageResult {
    let (db, n) = (st.db.clone(), st.host_runs);
    let list = tokio::task::spawn_blocking(move || host_views(&db, n))
        .await
        .map_err(|e| ServeError::Task(e.to_string()))??;
    Ok(html(pages::hosts(&list, st.host_runs)))
}

async fn host_page(State(st): State<AppState>, Path(name): Path<String>) -> PageResult {
    let (db, n) = (st.db.clone(), st.host_runs);
    let list = tokio::task::spawn_blocking(move || host_views(&db, n))
        .await
        .map_err(|e| ServeError::Task(e.to_string()))??;
    let h = list
        .into_iter()
        .find(|h| h.name == name)
        .ok_or_else(|| ServeError::NotFound(format!("host {name}")))?;
    Ok(html(pages::host(&h, st.host_runs)))
}

#[derive(Deserialize)]
struct SubmitForm {
    campaign: String,
    token: String,
}

async fn form_user(st: &AppState, headers: &HeaderMap, token: &str) -> Result<String> {
    auth::same_origin(headers)?;
    auth::user_of(&st.db, token)
        .await?
        .ok_or_else(|| ServeError::Unauthorized("unknown token".into()))
}

async fn queue_form(
    State(st): State<AppState>,
    headers: HeaderMap,
    Form(f): Form<SubmitForm>,
) -> PageResult {
    let user = form_user(&st, &headers, &f.token).await?;
    api::submit(&st, &user, f.campaign).await?;
    Ok(Redirect::to("/#queue").into_response())
}

#[derive(Deserialize)]
struct TokenForm {
    token: String,
}

async fn cancel_form(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Form(f): Form<TokenForm>,
) -> PageResult {
    form_user(&st, &headers, &f.token).await?;
    api::cancel(&st, id).await?;
    Ok(Redirect::to("/#queue").into_response())
}

async fn live_js() -> Response {
    let mut r = pages::LIVE_JS.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    r
}

/// Outcome letters for terminal strips (`hilrig runs history`).
pub fn outcome_letter(o: Outcome) -> char {
    match o {
        Outcome::Pass => '.',
        Outcome::Fail => 'F',
        Outcome::Timeout => 'T',
        Outcome::Infra => 'I',
        Outcome::Flaky => 'f',
        Outcome::Skipped => 's',
    }
}

/// A status for API errors.
pub fn json_error(e: &ServeError) -> Response {
    let st = status_of(e);
    (
        st,
        axum::Json(serde_json::json!({ "error": e.to_string(), "status": st.as_u16() })),
    )
        .into_response()
}

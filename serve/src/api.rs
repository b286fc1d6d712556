//! The JSON API (`/api/...`), described by the OpenAPI document at
//! `/api/openapi.json`. Reads are open; every write needs a bearer token.
//! All SQL behind it is parameterized (`hilrig_campaigns::store`).

use crate::auth;
use crate::history::case_history;
use crate::server::{json_error, AppState, HistoryQuery, DEFAULT_NIGHTS, MAX_NIGHTS};
use crate::ServeError;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hilrig_campaigns::store::WebhookRow;
use serde::Deserialize;

/// An API error: JSON `{ error, status }`.
pub struct ApiError(pub ServeError);

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_error(&self.0)
    }
}

type ApiResult = std::result::Result<Response, ApiError>;

/// Largest campaign file accepted (as `hilrig_campaigns::format` does for files).
pub const MAX_CAMPAIGN_BYTES: usize = 1 << 20;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/api/runs", get(list_runs))
        .route("/api/runs/{id}", get(run_results))
        .route("/api/history", get(history))
        .route("/api/queue", get(list_queue))
        .route("/api/campaigns", post(submit_api))
        .route("/api/queue/{id}/cancel", post(cancel_api))
        .route("/api/webhooks", post(webhook_api))
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response()
}

#[derive(Deserialize)]
struct ListQuery {
    campaign: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

async fn list_runs(State(st): State<AppState>, Query(q): Query<ListQuery>) -> ApiResult {
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let offset = q.offset.unwrap_or(0);
    let rows = st
        .db
        .with(move |s| s.run_index(q.campaign.as_deref(), limit, offset))
        .await?;
    let out: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|r| {
            serde_json::json!({
                "id": r.run.id, "campaign": r.run.campaign, "started_ms": r.run.started_ms,
                "finished_ms": r.run.finished_ms, "counts": r.counts,
            })
        })
        .collect();
    Ok(Json(out).into_response())
}

async fn run_results(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let id2 = id.clone();
    let run = st
        .db
        .with(move |s| s.load_run(&id2))
        .await?
        .ok_or_else(|| ServeError::NotFound(format!("run {id}")))?;
    let summary = hilrig_reports::RunSummary::of(&run, None);
    Ok(Json(serde_json::json!({ "summary": summary, "run": run })).into_response())
}

async fn history(State(st): State<AppState>, Query(q): Query<HistoryQuery>) -> ApiResult {
    let n = q.nights.unwrap_or(DEFAULT_NIGHTS).clamp(1, MAX_NIGHTS);
    let h = st.db.with(move |s| case_history(s, &q.case, n)).await?;
    Ok(Json(h).into_response())
}

async fn list_queue(State(st): State<AppState>) -> ApiResult {
    let q = st.db.with(|s| s.queue(200)).await?;
    Ok(Json(q).into_response())
}

/// Validate a campaign file's text and queue it for `user`; returns the queue id.
pub async fn submit(st: &AppState, user: &str, text: String) -> crate::Result<i64> {
    if text.len() > MAX_CAMPAIGN_BYTES {
        return Err(ServeError::BadRequest(format!(
            "campaign file of {} bytes (at most {MAX_CAMPAIGN_BYTES})",
            text.len()
        )));
    }
    let hosts = hilrig_campaigns::format::HostSpec::sim(2);
    let c = hilrig_campaigns::format::parse(&text, std::path::Path::new("submitted.toml"), &hosts)
        .map_err(|e| ServeError::BadRequest(e.to_string()))?;
    let user = user.to_string();
    st.db.with(move |s| s.enqueue(&c.name, &text, &user)).await
}

/// Cancel queue entry `id`; returns its new state.
pub async fn cancel(st: &AppState, id: i64) -> crate::Result<String> {
    st.db
        .with(move |s| s.queue_cancel(id))
        .await?
        .ok_or_else(|| ServeError::NotFound(format!("queued or running entry {id}")))
}

#[derive(Deserialize)]
struct SubmitBody {
    campaign: String,
}

async fn submit_api(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<SubmitBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let user = auth::bearer_user(&st.db, &headers).await?;
    let Json(b) = body.map_err(|e| ServeError::BadRequest(e.body_text()))?;
    let id = submit(&st, &user, b.campaign).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "id": id, "state": "queued", "submitted_by": user })),
    )
        .into_response())
}

async fn cancel_api(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> ApiResult {
    auth::bearer_user(&st.db, &headers).await?;
    let state = cancel(&st, id).await?;
    Ok(Json(serde_json::json!({ "id": id, "state": state })).into_response())
}

#[derive(Deserialize)]
struct WebhookBody {
    campaign: String,
    url: String,
    secret: String,
}

async fn webhook_api(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<WebhookBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    auth::bearer_user(&st.db, &headers).await?;
    let Json(b) = body.map_err(|e| ServeError::BadRequest(e.body_text()))?;
    crate::webhook::parse_url(&b.url).map_err(ServeError::from)?;
    if b.secret.len() < 16 {
        return Err(ServeError::BadRequest("webhook secret: at least 16 characters".into()).into());
    }
    let row = WebhookRow {
        campaign: b.campaign,
        url: b.url,
        secret: b.secret,
    };
    st.db.with(move |s| s.webhook_put(&row)).await?;
    Ok(StatusCode::CREATED.into_response())
}

/// The OpenAPI 3.1 document.
pub const OPENAPI: &str = r##"{
 "openapi": "3.1.0",
 "info": {"title": "hilrig lab service", "version": "1"},
 "components": {
  "securitySchemes": {"token": {"type": "http", "scheme": "bearer", "description": "hilrig serve token add NAME"}},
  "schemas": {
   "Error": {"type": "object", "required": ["error", "status"], "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}},
   "Outcome": {"type": "string", "enum": ["pass", "fail", "infra", "timeout", "flaky", "skipped"]},
   "RunRow": {"type": "object", "properties": {"id": {"type": "string"}, "campaign": {"type": "string"}, "started_ms": {"type": "integer"}, "finished_ms": {"type": ["integer", "null"]}, "counts": {"type": "object", "additionalProperties": {"type": "integer"}}}},
   "Night": {"type": "object", "properties": {"run_id": {"type": "string"}, "campaign": {"type": "string"}, "started_ms": {"type": "integer"}, "outcome": {"$ref": "#/components/schemas/Outcome"}, "host": {"type": "string"}, "duration_ms": {"type": "integer"}, "attempts": {"type": "integer"}, "message": {"type": "string"}, "artifacts": {"type": "array", "items": {"type": "object", "properties": {"kind": {"type": "string"}, "path": {"type": "string"}}}}}},
   "CaseHistory": {"type": "object", "properties": {"case_id": {"type": "string"}, "nights_asked": {"type": "integer"}, "nights": {"type": "array", "items": {"$ref": "#/components/schemas/Night"}}, "flake_rate": {"type": "number"}, "fail_rate": {"type": "number"}, "counts": {"type": "object"}, "change": {"type": ["object", "null"], "properties": {"last_good": {"$ref": "#/components/schemas/Night"}, "first_bad": {"$ref": "#/components/schemas/Night"}}}}},
   "QueueRow": {"type": "object", "properties": {"id": {"type": "integer"}, "campaign": {"type": "string"}, "submitted_by": {"type": "string"}, "submitted_ms": {"type": "integer"}, "state": {"type": "string", "enum": ["queued", "running", "cancelled", "cancel-requested", "done", "failed"]}, "run_id": {"type": ["string", "null"]}, "worker": {"type": ["string", "null"]}, "message": {"type": "string"}}}
  }
 },
 "paths": {
  "/api/runs": {"get": {"summary": "List runs, newest first", "parameters": [
     {"name": "campaign", "in": "query", "schema": {"type": "string"}},
     {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
     {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}}],
    "responses": {"200": {"description": "runs", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/RunRow"}}}}}}}},
  "/api/runs/{id}": {"get": {"summary": "A run's results (the report's model and summary)", "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
    "responses": {"200": {"description": "summary and run", "content": {"application/json": {"schema": {"type": "object", "properties": {"summary": {"type": "object"}, "run": {"type": "object"}}}}}}, "404": {"description": "no such run", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}}}},
  "/api/history": {"get": {"summary": "A case's history over its last N nights (the same as the page and `hilrig runs history`)", "parameters": [
     {"name": "case", "in": "query", "required": true, "schema": {"type": "string"}},
     {"name": "nights", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 30}}],
    "responses": {"200": {"description": "history", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CaseHistory"}}}}}}},
  "/api/queue": {"get": {"summary": "The campaign queue, newest first", "responses": {"200": {"description": "queue", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/QueueRow"}}}}}}}},
  "/api/campaigns": {"post": {"summary": "Submit a campaign file (queued; a worker runs it)", "security": [{"token": []}],
    "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["campaign"], "properties": {"campaign": {"type": "string", "description": "the campaign file (TOML), at most 1 MiB"}}}}}},
    "responses": {"201": {"description": "queued", "content": {"application/json": {"schema": {"type": "object", "properties": {"id": {"type": "integer"}, "state": {"type": "string"}, "submitted_by": {"type": "string"}}}}}}, "400": {"description": "not a valid campaign"}, "401": {"description": "no or unknown token"}}}},
  "/api/queue/{id}/cancel": {"post": {"summary": "Cancel a queued (or running) campaign", "security": [{"token": []}], "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}],
    "responses": {"200": {"description": "new state"}, "401": {"description": "no or unknown token"}, "404": {"description": "not queued or running"}}}},
  "/api/webhooks": {"post": {"summary": "Add a webhook to a campaign (POSTed on run end, signed X-Hilrig-Signature: sha256=HMAC)", "security": [{"token": []}],
    "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["campaign", "url", "secret"], "properties": {"campaign": {"type": "string"}, "url": {"type": "string", "description": "http://host:port/path"}, "secret": {"type": "string", "minLength": 16}}}}}},
    "responses": {"201": {"description": "added"}, "401": {"description": "no or unknown token"}}}}
 }
}"##;

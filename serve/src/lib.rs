//! The lab service (issue 19): `hilrig serve` over the results store.
//!
//! Server-rendered pages (runs index, run page — live over server-sent events
//! while the run goes —, case history, trends per campaign, hosts, artifacts
//! streamed from the run directories), a JSON API described by an OpenAPI
//! document, a campaign queue that workers take runs from, per-user API tokens,
//! and webhooks signed with HMAC-SHA256 on run end. The CLI over the same store
//! (`hilrig runs list|show|history`) reads the same functions as the pages.

pub mod api;
pub mod artifacts;
pub mod auth;
pub mod cli;
pub mod db;
pub mod history;
pub mod pages;
pub mod server;
pub mod webhook;
pub mod worker;

pub use cli::{RunsCmd, ServeCmd};
pub use db::Db;
pub use history::{case_history, CaseHistory, Night};
pub use server::{router, serve, AppState};

use hilrig_campaigns::store::StoreError;

/// Errors of the lab service.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The results store said no.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A blocking store task died.
    #[error("results store task: {0}")]
    Task(String),
    /// Not found.
    #[error("{0} not found")]
    NotFound(String),
    /// The request is wrong.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No or a wrong token.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// A cross-site form post.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// An artifact path refused.
    #[error(transparent)]
    Artifact(#[from] artifacts::ArtifactError),
    /// I/O (listening, reading).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A webhook could not be delivered.
    #[error(transparent)]
    Webhook(#[from] webhook::WebhookError),
}

/// `Result` of this crate.
pub type Result<T> = std::result::Result<T, ServeError>;

/// Unix ms now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

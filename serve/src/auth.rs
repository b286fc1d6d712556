//! Per-user API tokens: `hilrig serve token add NAME` prints a fresh random
//! token once; the store keeps only its SHA-256. Every write needs
//! `Authorization: Bearer TOKEN` (API) or the token in the form (pages).
//! Forms are CSRF-safe twice over: the credential is in the form body, never
//! in a cookie a browser would send by itself, and a form post whose `Origin`
//! (or `Referer`) is not this server is refused.

use crate::{db::Db, Result, ServeError};
use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Token prefix (makes a leaked token greppable).
pub const PREFIX: &str = "hlr_";

/// A fresh token: 32 random bytes, hex.
pub fn new_token() -> Result<String> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).map_err(|e| ServeError::Io {
        what: "random token".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(format!("{PREFIX}{}", hex::encode(b)))
}

/// What the store keeps of a token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Create (or replace) the token of user `name`; returns the token.
pub fn add_token(db: &Db, name: &str) -> Result<String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
    {
        return Err(ServeError::BadRequest(format!(
            "user name {name:?}: 1-64 of letters, digits, . _ - @"
        )));
    }
    let t = new_token()?;
    let h = token_hash(&t);
    let n = name.to_string();
    db.blocking(move |s| s.token_put(&n, &h))?;
    Ok(t)
}

/// The user of a token (None: unknown).
pub async fn user_of(db: &Arc<Db>, token: &str) -> Result<Option<String>> {
    let token = token.trim();
    if !token.starts_with(PREFIX) || token.len() > 200 {
        return Ok(None);
    }
    let h = token_hash(token);
    db.with(move |s| s.token_user(&h)).await
}

/// The user of the request's bearer token, or Unauthorized.
pub async fn bearer_user(db: &Arc<Db>, headers: &HeaderMap) -> Result<String> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ServeError::Unauthorized("no Authorization header".into()))?;
    let t = v
        .strip_prefix("Bearer ")
        .ok_or_else(|| ServeError::Unauthorized("Authorization is not `Bearer TOKEN`".into()))?;
    user_of(db, t)
        .await?
        .ok_or_else(|| ServeError::Unauthorized("unknown token".into()))
}

/// Refuse a form post from another origin: `Origin` (or, without it,
/// `Referer`) must name this server's `Host`. A post with neither is refused too.
pub fn same_origin(headers: &HeaderMap) -> Result<()> {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ServeError::Forbidden("no Host header".into()))?;
    let from = headers
        .get(axum::http::header::ORIGIN)
        .or_else(|| headers.get(axum::http::header::REFERER))
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ServeError::Forbidden("form post without Origin or Referer".into()))?;
    let rest = from
        .strip_prefix("http://")
        .or_else(|| from.strip_prefix("https://"))
        .unwrap_or("");
    let origin_host = rest.split('/').next().unwrap_or("");
    if origin_host.eq_ignore_ascii_case(host) {
        Ok(())
    } else {
        Err(ServeError::Forbidden(format!(
            "cross-site form post (origin {from:?}, host {host:?})"
        )))
    }
}

//! Webhooks per campaign on run end: a JSON notice of the regressions (new
//! failures, fixed, still failing) POSTed to each URL with
//! `X-Hilrig-Signature: sha256=<hex HMAC-SHA256(secret, body)>`, retried with
//! exponential backoff. Plain `http://` URLs (a lab network or a local relay).

use crate::db::Db;
use hilrig_reports::{Counts, Run};
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;

/// Why a webhook was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// The URL is not `http://host[:port]/path`.
    #[error("webhook URL {url:?}: {why}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        why: &'static str,
    },
    /// Every attempt failed; the last error.
    #[error("webhook {url}: {attempts} attempt(s) failed, last: {last}")]
    Failed {
        /// The URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
}

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-hilrig-signature";

/// What a webhook receives.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Notice {
    /// `run-end`.
    pub event: String,
    /// The campaign.
    pub campaign: String,
    /// The run.
    pub run_id: String,
    /// The run it was compared with.
    pub prev_run_id: Option<String>,
    /// Outcome counts.
    pub counts: Counts,
    /// FAIL/TIMEOUT now, not before.
    pub new_failures: Vec<String>,
    /// Failing before, passing now.
    pub fixed: Vec<String>,
    /// Failing before and now.
    pub still_failing: Vec<String>,
}

/// The notice of `run` against the campaign's previous run.
pub fn notice(run: &Run, prev: Option<&Run>) -> Notice {
    let d = prev.map(|p| hilrig_reports::diff(p, run));
    let ids = |f: fn(&hilrig_reports::RunDiff) -> &Vec<hilrig_reports::CaseChange>| {
        d.as_ref()
            .map(|d| f(d).iter().map(|c| c.id.clone()).collect())
            .unwrap_or_default()
    };
    Notice {
        event: "run-end".into(),
        campaign: run.campaign.clone(),
        run_id: run.id.clone(),
        prev_run_id: prev.map(|p| p.id.clone()),
        counts: run.counts(),
        new_failures: match &d {
            Some(_) => ids(|d| &d.new_failures),
            None => run
                .cases
                .iter()
                .filter(|c| {
                    matches!(
                        c.outcome,
                        hilrig_reports::Outcome::Fail | hilrig_reports::Outcome::Timeout
                    )
                })
                .map(|c| c.id.clone())
                .collect(),
        },
        fixed: ids(|d| &d.fixed),
        still_failing: ids(|d| &d.still_failing),
    }
}

/// `sha256=<hex>` of `body` under `secret`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length; this cannot fail.
    let mut m = match <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

/// Check a signature header against `body` (constant time).
pub fn verify(secret: &str, body: &[u8], header: &str) -> bool {
    let Some(hexsig) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hexsig) else {
        return false;
    };
    let Ok(mut m) = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    m.update(body);
    m.verify_slice(&sig).is_ok()
}

/// `(authority, host, port, path)` of an `http://` URL.
pub fn parse_url(url: &str) -> Result<(String, String, u16, String), WebhookError> {
    let bad = |why| WebhookError::Url {
        url: url.to_string(),
        why,
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("only http:// URLs are delivered"))?;
    let (auth, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if auth.is_empty() || auth.contains('@') {
        return Err(bad("no host, or credentials in the URL"));
    }
    let (host, port) = match auth.rsplit_once(':') {
        Some((h, p)) if !h.contains(']') || h.ends_with(']') => (
            h.trim_start_matches('[').trim_end_matches(']'),
            p.parse::<u16>().map_err(|_| bad("bad port"))?,
        ),
        _ => (auth, 80),
    };
    if host.is_empty() || path.chars().any(|c| c.is_control() || c == ' ') {
        return Err(bad("bad host or path"));
    }
    Ok((auth.to_string(), host.to_string(), port, path.to_string()))
}

/// Attempts and backoff.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts in all.
    pub attempts: u32,
    /// Wait before the second attempt; doubled each time.
    pub first: Duration,
    /// Longest wait.
    pub max: Duration,
    /// One attempt's time limit.
    pub timeout: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 6,
            first: Duration::from_millis(500),
            max: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Why one delivery attempt failed (kept as the `last` text of [`WebhookError::Failed`]).
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error(transparent)]
    Url(#[from] WebhookError),
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("handshake: {0}")]
    Handshake(hyper::Error),
    #[error("request: {0}")]
    Request(hyper::http::Error),
    #[error("sending: {0}")]
    Send(hyper::Error),
    #[error("no answer in {0:?}")]
    Timeout(Duration),
}

async fn post_once(
    url: &str,
    body: &[u8],
    sig: &str,
    timeout: Duration,
) -> Result<u16, AttemptError> {
    use axum::body::Bytes;
    let (auth, host, port, path) = parse_url(url)?;
    let go = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(AttemptError::Connect)?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(AttemptError::Handshake)?;
        tokio::spawn(conn);
        let req = hyper::Request::post(path)
            .header(hyper::header::HOST, auth)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, "hilrig-serve")
            .header(SIGNATURE_HEADER, sig)
            .header("x-hilrig-event", "run-end")
            .body(http_body_util::Full::new(Bytes::copy_from_slice(body)))
            .map_err(AttemptError::Request)?;
        let resp = send.send_request(req).await.map_err(AttemptError::Send)?;
        Ok::<u16, AttemptError>(resp.status().as_u16())
    };
    match tokio::time::timeout(timeout, go).await {
        Ok(r) => r,
        Err(_) => Err(AttemptError::Timeout(timeout)),
    }
}

/// POST `body` to `url`, signed, until a 2xx answer or the attempts run out.
/// Returns the attempts used.
pub async fn deliver(
    url: &str,
    secret: &str,
    body: &[u8],
    retry: Retry,
) -> Result<u32, WebhookError> {
    parse_url(url)?;
    let sig = sign(secret, body);
    let mut wait = retry.first;
    let mut last = String::new();
    for k in 1..=retry.attempts.max(1) {
        match post_once(url, body, &sig, retry.timeout).await {
            Ok(s) if (200..300).contains(&s) => return Ok(k),
            Ok(s) => last = format!("HTTP {s}"),
            Err(e) => last = e.to_string(),
        }
        if k < retry.attempts {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(retry.max);
        }
    }
    Err(WebhookError::Failed {
        url: url.to_string(),
        attempts: retry.attempts.max(1),
        last,
    })
}

/// Notify every webhook of the run's campaign; one result per URL.
pub async fn notify_run(
    db: &Arc<Db>,
    run_id: &str,
    retry: Retry,
) -> crate::Result<Vec<(String, Result<u32, WebhookError>)>> {
    let id = run_id.to_string();
    let got = db
        .with(move |s| {
            let Some(run) = s.load_run(&id)? else {
                return Ok(None);
            };
            let prev = s.previous_run(&run.campaign, &run.id, run.started_ms)?;
            let hooks = s.webhooks(&run.campaign)?;
            Ok(Some((run, prev, hooks)))
        })
        .await?;
    let Some((run, prev, hooks)) = got else {
        return Err(crate::ServeError::NotFound(format!("run {run_id}")));
    };
    let n = notice(&run, prev.as_ref());
    let body = serde_json::to_vec(&n).map_err(|e| crate::ServeError::BadRequest(e.to_string()))?;
    let mut out = vec![];
    for h in hooks {
        let r = deliver(&h.url, &h.secret, &body, retry).await;
        out.push((h.url, r));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_urls_parse() {
        let s = sign("k", b"body");
        assert!(verify("k", b"body", &s));
        assert!(!verify("k", b"body2", &s));
        assert!(!verify("other", b"body", &s));
        assert!(!verify("k", b"body", "sha256=zz"));
        assert_eq!(
            parse_url("http://127.0.0.1:8080/hook").unwrap(),
            (
                "127.0.0.1:8080".into(),
                "127.0.0.1".into(),
                8080,
                "/hook".into()
            )
        );
        assert_eq!(parse_url("http://lab/").unwrap().2, 80);
        for bad in [
            "https://x/",
            "ftp://x",
            "http://",
            "http://u:p@x/",
            "http://x:99999/",
            "http://x/a b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}

//! The control socket's protocol, both sides: [`Request`] and [`Reply`], one JSON
//! object per line (`{"op":"status"}` → `{"ok":true,"op":"status",...}` or
//! `{"ok":false,"error":"..."}`), and a blocking client ([`request`]).

use crate::summary::{PatchEvent, PolicySummary};
use crate::teardown::TeardownRecord;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest request or reply line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// Longest reply line a client reads (a teardown record with its counters).
pub const MAX_REPLY: usize = 1 << 20;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// VM state, versions, counters.
    Status {},
    /// Park every vCPU.
    Pause {},
    /// Resume after a pause.
    Resume {},
    /// Pause and resume at once, changing nothing: measures the bare blackout.
    Quiesce {},
    /// Apply a signed patch bundle.
    Patch {
        /// Path of the bundle file.
        bundle: PathBuf,
    },
    /// Secure teardown of the tenant.
    Teardown {},
    /// Take the device away from the guest and let the guest run on: unmapped,
    /// removed from its PCI bus, scrubbed, reset and verified.
    Detach {},
    /// Exit counts, alarms, blackouts.
    Metrics {},
}

impl Request {
    /// The request's `op` name.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Status {} => "status",
            Request::Pause {} => "pause",
            Request::Resume {} => "resume",
            Request::Quiesce {} => "quiesce",
            Request::Patch { .. } => "patch",
            Request::Teardown {} => "teardown",
            Request::Detach {} => "detach",
            Request::Metrics {} => "metrics",
        }
    }

    /// One request line (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Whether the VM is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// The guest runs (or is paused).
    Running,
    /// The run has a verdict.
    Finished,
}

/// Installed versions of the patchable modules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleVersions {
    /// The policy module.
    pub policy: u64,
    /// The native device-handler module.
    #[serde(rename = "device-handler")]
    pub device_handler: u64,
}

impl std::fmt::Display for ModuleVersions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_json::to_string(self).unwrap_or_default())
    }
}

/// The reply to `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Running or finished.
    pub state: VmState,
    /// The verdict, once finished.
    pub verdict: Option<String>,
    /// Milliseconds since the VM started.
    pub uptime_ms: u64,
    /// vCPUs still in their loops.
    pub vcpus: usize,
    /// Held paused by an operator.
    pub paused: bool,
    /// The policy profile.
    pub profile: String,
    /// Module versions.
    pub versions: ModuleVersions,
    /// Whether the VMM accepts patches (it has a trusted key).
    pub patchable: bool,
    /// Whether the tenant was torn down (or its device detached).
    pub torn_down: bool,
    /// Whether the device was detached (the guest runs on without it).
    #[serde(default)]
    pub detached: bool,
    /// SHA-256 (hex) of the running VMM build (what bundles target).
    #[serde(default)]
    pub build: Option<String>,
}

/// The reply to `pause`, `resume` and `quiesce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseReply {
    /// vCPUs parked.
    pub vcpus: usize,
    /// First kick to last resume, microseconds (resume and quiesce).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blackout_us: Option<u64>,
    /// First kick to the last vCPU parked, microseconds (quiesce).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub park_us: Option<u64>,
}

/// Blackout statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlackoutStats {
    /// Blackouts measured.
    pub count: usize,
    /// Median, microseconds.
    pub median_us: u64,
    /// 99th percentile, microseconds.
    pub p99_us: u64,
    /// Largest, microseconds.
    pub max_us: u64,
}

/// The reply to `metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// Pause and patch blackouts.
    pub blackouts: BlackoutStats,
    /// Patches applied.
    pub patches: Vec<PatchEvent>,
    /// The policy engine's counters so far (None: no policy).
    pub policy: Option<PolicySummary>,
    /// Calls through stale module handles (alarms).
    pub module_alarms: u64,
    /// Calls re-dispatched to a replacing module.
    pub module_retries: u64,
    /// Calls that reached an invalidated module.
    pub stale_module_calls: u64,
}

impl Metrics {
    /// Register parts decided by the policy so far (0 without a policy).
    pub fn parts(&self) -> u64 {
        self.policy.as_ref().map_or(0, |p| p.parts)
    }
}

/// A successful reply, tagged with the request's `op`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Reply {
    /// To `status`.
    Status(VmStatus),
    /// To `pause`.
    Pause(PauseReply),
    /// To `resume`.
    Resume(PauseReply),
    /// To `quiesce`.
    Quiesce(PauseReply),
    /// To `patch`: the patch applied.
    Patch(PatchEvent),
    /// To `teardown`: the signed record (the VM then ends).
    Teardown(Box<TeardownRecord>),
    /// To `detach`: the signed record (`detached: true`; the guest runs on).
    Detach(Box<TeardownRecord>),
    /// To `metrics`.
    Metrics(Box<Metrics>),
}

/// The VMM's refusal of a request, in its words (the wire's `error` field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

impl From<String> for Refusal {
    fn from(s: String) -> Refusal {
        Refusal(s)
    }
}

impl From<&str> for Refusal {
    fn from(s: &str) -> Refusal {
        Refusal(s.to_string())
    }
}

impl Refusal {
    /// Whether the refusal's words contain `s`.
    pub fn contains(&self, s: &str) -> bool {
        self.0.contains(s)
    }
}

/// What the VMM answers: a reply, or its refusal.
pub type Response = Result<Reply, Refusal>;

#[derive(Serialize, Deserialize)]
struct Wire<T> {
    ok: bool,
    #[serde(flatten)]
    body: T,
}

#[derive(Serialize, Deserialize)]
struct ErrorBody {
    error: String,
}

/// Encode a response as one line (without the newline).
pub fn encode(r: &Response) -> String {
    match r {
        Ok(body) => serde_json::to_string(&Wire { ok: true, body }),
        Err(e) => serde_json::to_string(&Wire {
            ok: false,
            body: ErrorBody { error: e.0.clone() },
        }),
    }
    .unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"encoding the reply: {e}\"}}"))
}

/// Why a request line was refused (the server replies with this as its error).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Over [`MAX_LINE`] bytes.
    #[error("request longer than {MAX_LINE} bytes ({0} bytes)")]
    TooLong(usize),
    /// Not a request: bad JSON, an unknown `op`, a missing or unknown field.
    #[error("bad request: {0}")]
    Bad(#[from] serde_json::Error),
}

/// Parse one request line as the server does: at most [`MAX_LINE`] bytes (checked
/// before anything else), invalid UTF-8 replaced, surrounding whitespace and the
/// newline trimmed; `Ok(None)` for a blank line. Never panics, on any bytes; its
/// work is bounded by the length limit (and serde_json's nesting limit).
pub fn parse_request(line: &[u8]) -> Result<Option<Request>, RequestError> {
    if line.len() > MAX_LINE {
        return Err(RequestError::TooLong(line.len()));
    }
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    Ok(Some(serde_json::from_str::<Request>(text)?))
}

/// Decode a response line.
pub fn decode(line: &str) -> Result<Response, serde_json::Error> {
    #[derive(Deserialize)]
    struct Ok_ {
        ok: bool,
    }
    let ok: Ok_ = serde_json::from_str(line)?;
    if ok.ok {
        let w: Wire<Reply> = serde_json::from_str(line)?;
        Ok(Ok(w.body))
    } else {
        let w: Wire<ErrorBody> = serde_json::from_str(line)?;
        Ok(Err(Refusal(w.body.error)))
    }
}

/// A control request that did not get a reply.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Connecting, writing or reading failed (or timed out).
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The reply is not a reply of this protocol.
    #[error("control socket {path}: bad reply {line:?}: {why}")]
    BadReply {
        /// The socket.
        path: PathBuf,
        /// The line (cut to 200 characters).
        line: String,
        /// Why it does not decode.
        why: String,
    },
    /// The reply does not answer the request (another `op`).
    #[error("control socket {path}: `{op}` answered with `{got}`")]
    Mismatch {
        /// The socket.
        path: PathBuf,
        /// The request.
        op: &'static str,
        /// What came back.
        got: String,
    },
}

/// Send `req` to the VMM at `path` and wait (at most `timeout` per read) for its
/// response: `Ok(Ok(reply))`, `Ok(Err(refusal))`, or a [`ControlError`] when no
/// well-formed reply came back.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = req.to_line();
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    let mut r = BufReader::new(s).take(MAX_REPLY as u64);
    let mut out = String::new();
    r.read_line(&mut out).map_err(io)?;
    let resp = decode(out.trim()).map_err(|e| ControlError::BadReply {
        path: path.to_path_buf(),
        line: out.chars().take(200).collect(),
        why: e.to_string(),
    })?;
    if let Ok(reply) = &resp {
        let got = reply_op(reply);
        if got != req.op() {
            return Err(ControlError::Mismatch {
                path: path.to_path_buf(),
                op: req.op(),
                got: got.to_string(),
            });
        }
    }
    Ok(resp)
}

fn reply_op(r: &Reply) -> &'static str {
    match r {
        Reply::Status(_) => "status",
        Reply::Pause(_) => "pause",
        Reply::Resume(_) => "resume",
        Reply::Quiesce(_) => "quiesce",
        Reply::Patch(_) => "patch",
        Reply::Teardown(_) => "teardown",
        Reply::Detach(_) => "detach",
        Reply::Metrics(_) => "metrics",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        for r in [
            Request::Status {},
            Request::Pause {},
            Request::Resume {},
            Request::Quiesce {},
            Request::Patch {
                bundle: "/b".into(),
            },
            Request::Teardown {},
            Request::Detach {},
            Request::Metrics {},
        ] {
            let line = r.to_line();
            assert!(line.contains(&format!("\"op\":\"{}\"", r.op())), "{line}");
            assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        }
        let replies: Vec<Response> = vec![
            Ok(Reply::Status(VmStatus {
                state: VmState::Running,
                verdict: None,
                uptime_ms: 5,
                vcpus: 2,
                paused: false,
                profile: "tenant".into(),
                versions: ModuleVersions {
                    policy: 1,
                    device_handler: 0,
                },
                patchable: true,
                torn_down: false,
                detached: false,
                build: Some("ab".repeat(32)),
            })),
            Ok(Reply::Quiesce(PauseReply {
                vcpus: 2,
                blackout_us: Some(40),
                park_us: Some(10),
            })),
            Ok(Reply::Pause(PauseReply {
                vcpus: 1,
                blackout_us: None,
                park_us: None,
            })),
            Ok(Reply::Patch(PatchEvent {
                component: "policy".into(),
                from: 1,
                to: 2,
                blackout_us: Some(80),
                ..Default::default()
            })),
            Ok(Reply::Metrics(Box::new(Metrics {
                blackouts: BlackoutStats::default(),
                patches: vec![],
                policy: Some(PolicySummary::default()),
                module_alarms: 0,
                module_retries: 0,
                stale_module_calls: 0,
            }))),
            Err("not now".into()),
        ];
        for r in replies {
            let line = encode(&r);
            assert_eq!(decode(&line).unwrap(), r, "{line}");
        }
        // The wire format: flat fields next to ok and op.
        let line = encode(&Ok(Reply::Patch(PatchEvent {
            component: "policy".into(),
            from: 1,
            to: 2,
            blackout_us: Some(80),
            ..Default::default()
        })));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["op"], "patch");
        assert_eq!(v["to"], 2);
        assert_eq!(
            encode(&Err("x".into())),
            r#"{"ok":false,"error":"x"}"#.to_string()
        );
        assert!(decode("{\"ok\":true,\"op\":\"reboot\"}").is_err());
        assert!(decode("nonsense").is_err());
    }
}

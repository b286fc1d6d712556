//! The signed teardown record: what a secure teardown did, step by step, with the
//! counters read out of band and the counters service's verdict.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hilrig_device::attest::Verdict;
use hilrig_device::oob::CounterReport;
use serde::{Deserialize, Serialize};

/// The steps of a detach, in order (the guest keeps its memory).
pub const DETACH_STEPS: [&str; 6] = [
    "pause",
    "unmap-device",
    "scrub-device-state",
    "reset-device",
    "read-counters",
    "verdict",
];

/// The teardown steps, in order.
pub const STEPS: [&str; 7] = [
    "pause",
    "unmap-device",
    "scrub-guest-memory",
    "scrub-device-state",
    "reset-device",
    "read-counters",
    "verdict",
];

/// The counters service's answer, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictSummary {
    /// The verdict.
    pub verdict: Verdict,
    /// Whether the device may go to the next tenant.
    pub handoff_ok: bool,
    /// Reasons.
    pub reasons: Vec<String>,
}

/// One step's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step name (one of [`STEPS`]).
    pub step: String,
    /// Duration in microseconds.
    pub micros: u64,
    /// Error, if the step failed (the teardown stopped there).
    pub error: Option<String>,
}

/// What started a teardown or a detach (issue 21.5): an operator's request, the end
/// of the run, or a breach trigger configured in the policy file's `[breach]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum BreachTrigger {
    /// A `teardown` or `detach` request on the control socket.
    Request {
        /// The request's op.
        op: String,
    },
    /// The VM ended and `--teardown-on-exit` tore the tenant down.
    Exit {},
    /// A register's alarms crossed their threshold: `count` alarms within `within_ms`.
    Alarms {
        /// The register (as the policy file names it).
        register: String,
        /// Alarms counted in the window.
        count: u64,
        /// The window, milliseconds.
        within_ms: u64,
    },
    /// The device's counters, read out of band while the guest ran, gave a verdict
    /// the policy lists (bypassed-trap, undercount, rolled-back, ...).
    Counters {
        /// The verdict.
        verdict: Verdict,
        /// Why.
        reasons: Vec<String>,
    },
    /// The module table caught calls into a retired module (stale handles or stale
    /// code addresses).
    StaleModuleCall {
        /// Stale calls seen since the VM started.
        calls: u64,
    },
}

impl BreachTrigger {
    /// One line naming the trigger.
    pub fn describe(&self) -> String {
        match self {
            BreachTrigger::Request { op } => format!("control request {op}"),
            BreachTrigger::Exit {} => "end of the run".into(),
            BreachTrigger::Alarms {
                register,
                count,
                within_ms,
            } => format!("{count} alarms on {register} within {within_ms} ms"),
            BreachTrigger::Counters { verdict, reasons } => {
                format!("counters verdict {verdict}: {}", reasons.join("; "))
            }
            BreachTrigger::StaleModuleCall { calls } => {
                format!("{calls} calls into a retired module")
            }
        }
    }

    /// Whether this is a breach (not an operator's request or the end of the run).
    pub fn is_breach(&self) -> bool {
        !matches!(self, BreachTrigger::Request { .. } | BreachTrigger::Exit {})
    }
}

/// The teardown record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeardownRecord {
    /// Which VM / tenant.
    pub vm: String,
    /// Unix time (seconds) at the start.
    pub started_unix: u64,
    /// Steps done, in order.
    pub steps: Vec<StepRecord>,
    /// Whether every step succeeded.
    pub complete: bool,
    /// Total microseconds.
    pub total_micros: u64,
    /// Guest memory bytes scrubbed.
    pub guest_bytes_scrubbed: u64,
    /// Device tenant-state bytes scrubbed.
    pub device_bytes_scrubbed: u64,
    /// Counters read out of band after the reset.
    pub counters: Option<CounterReport>,
    /// The counters service's verdict.
    pub verdict: Option<VerdictSummary>,
    /// What started it (None: an older VMM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<BreachTrigger>,
    /// A detach: the device was taken from the guest (unmapped, removed from its PCI
    /// bus), scrubbed, reset and verified while the guest kept running; guest memory
    /// was not scrubbed (the guest still uses it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detached: bool,
    /// Signer's public key, hex.
    pub signer: String,
    /// Ed25519 signature (hex) over the record's JSON with this field empty.
    pub signature: String,
}

/// Why a teardown record does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Another key signed it.
    #[error("signed by {0}, not by the given key")]
    OtherSigner(String),
    /// The signature field is not an Ed25519 signature.
    #[error("signature is not 128 hex digits")]
    Malformed,
    /// The signature does not match the record.
    #[error("signature does not verify: {0}")]
    Bad(String),
}

impl TeardownRecord {
    /// The bytes the signature covers: the record's JSON with an empty signature.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut c = self.clone();
        c.signature.clear();
        serde_json::to_vec(&c).unwrap_or_default()
    }

    /// Sign the record with `key` (sets `signer` and `signature`).
    pub fn sign(&mut self, key: &SigningKey) {
        self.signer = hex::encode(key.verifying_key().as_bytes());
        self.signature = hex::encode(key.sign(&self.signing_bytes()).to_bytes());
    }

    /// Verify the record's signature against `key` (and that `key` is its signer).
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), RecordError> {
        if hex::encode(key.as_bytes()) != self.signer {
            return Err(RecordError::OtherSigner(self.signer.clone()));
        }
        let sig: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(RecordError::Malformed)?;
        key.verify_strict(&self.signing_bytes(), &Signature::from_bytes(&sig))
            .map_err(|e| RecordError::Bad(e.to_string()))
    }

    /// The verdict, if the teardown got that far.
    pub fn counters_verdict(&self) -> Option<Verdict> {
        self.verdict.as_ref().map(|v| v.verdict)
    }
}

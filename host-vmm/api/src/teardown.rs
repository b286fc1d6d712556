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

/// A fresh random 256-bit value that binds a teardown record to the run that asked
/// for it (`--teardown-nonce`): whoever starts a VMM makes one, and a record carrying
/// another run's nonce is a replay ([`TeardownRecord::check_binding`]). Hex in JSON
/// and on the command line.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce(pub [u8; 32]);

impl Nonce {
    /// A fresh nonce from the kernel's CSPRNG.
    pub fn random() -> std::io::Result<Nonce> {
        hilrig_device::secure::random_key().map(Nonce)
    }
}

impl std::fmt::Debug for Nonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nonce({self})")
    }
}

impl std::fmt::Display for Nonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Why a string is not a [`Nonce`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a nonce is 64 hex digits, not {0:?}")]
pub struct NonceError(pub String);

impl std::str::FromStr for Nonce {
    type Err = NonceError;
    fn from_str(s: &str) -> Result<Nonce, NonceError> {
        let short = || NonceError(s.chars().take(80).collect());
        let v = hex::decode(s.trim()).map_err(|_| short())?;
        Ok(Nonce(v.try_into().map_err(|_| short())?))
    }
}

impl Serialize for Nonce {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Nonce {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Nonce, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a record must say to belong to the run that asked for it: the VM id and
/// nonce the runner gave the VMM, and the device serial it prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunBinding {
    /// The VM id given with `--vm-id`.
    pub vm: String,
    /// The device's serial.
    pub serial: u64,
    /// The nonce given with `--teardown-nonce`.
    pub nonce: Nonce,
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
    /// Which VM / tenant (`--vm-id`, else `hilrig-vmm pid N`).
    pub vm: String,
    /// The device's serial, read out of band at teardown (None: no reference device,
    /// or the read failed).
    #[serde(default)]
    pub serial: Option<u64>,
    /// The run's nonce (`--teardown-nonce`, else a fresh random one): a record from
    /// another run carries another nonce.
    #[serde(default)]
    pub nonce: Option<Nonce>,
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
    /// A signed record of another run (replayed) or another device.
    #[error("teardown record of another run: {field} is {got}, this run's is {want}")]
    OtherRun {
        /// Which field differs: `vm`, `serial` or `nonce`.
        field: &'static str,
        /// This run's value.
        want: String,
        /// The record's value.
        got: String,
    },
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

    /// Check that the record belongs to the run `want` describes: the same VM id,
    /// device serial and nonce (check the signature with [`Self::verify`] too). A
    /// record replayed from another run, or about another device, is refused.
    pub fn check_binding(&self, want: &RunBinding) -> Result<(), RecordError> {
        let other = |field, want: String, got: String| RecordError::OtherRun { field, want, got };
        let show = |v: Option<String>| v.unwrap_or_else(|| "missing".into());
        if self.nonce != Some(want.nonce) {
            return Err(other(
                "nonce",
                want.nonce.to_string(),
                show(self.nonce.map(|n| n.to_string())),
            ));
        }
        if self.serial != Some(want.serial) {
            return Err(other(
                "serial",
                want.serial.to_string(),
                show(self.serial.map(|s| s.to_string())),
            ));
        }
        if self.vm != want.vm {
            return Err(other("vm", want.vm.clone(), self.vm.clone()));
        }
        Ok(())
    }

    /// The verdict, if the teardown got that far.
    pub fn counters_verdict(&self) -> Option<Verdict> {
        self.verdict.as_ref().map(|v| v.verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(vm: &str, serial: u64, nonce: Nonce) -> TeardownRecord {
        let mut r = TeardownRecord {
            vm: vm.into(),
            serial: Some(serial),
            nonce: Some(nonce),
            started_unix: 1,
            steps: Vec::new(),
            complete: true,
            total_micros: 5,
            guest_bytes_scrubbed: 0,
            device_bytes_scrubbed: 0,
            counters: None,
            verdict: None,
            trigger: None,
            detached: false,
            signer: String::new(),
            signature: String::new(),
        };
        r.sign(&SigningKey::from_bytes(&[7; 32]));
        r
    }

    #[test]
    fn a_record_replayed_from_another_run_is_refused() {
        let key = SigningKey::from_bytes(&[7; 32]).verifying_key();
        let (n1, n2) = (Nonce::random().unwrap(), Nonce::random().unwrap());
        assert_ne!(n1, n2, "fresh nonces differ");
        let run = RunBinding {
            vm: "case-1-step-0".into(),
            serial: 42,
            nonce: n2,
        };
        // Yesterday's record: validly signed, same VM id and device, other nonce.
        let old = record("case-1-step-0", 42, n1);
        old.verify(&key).unwrap();
        let e = old.check_binding(&run).unwrap_err();
        assert!(
            matches!(e, RecordError::OtherRun { field: "nonce", .. }),
            "{e}"
        );
        // Another device's record with this run's nonce.
        let e = record("case-1-step-0", 43, n2)
            .check_binding(&run)
            .unwrap_err();
        assert!(
            matches!(
                e,
                RecordError::OtherRun {
                    field: "serial",
                    ..
                }
            ),
            "{e}"
        );
        let e = record("case-2-step-0", 42, n2)
            .check_binding(&run)
            .unwrap_err();
        assert!(
            matches!(e, RecordError::OtherRun { field: "vm", .. }),
            "{e}"
        );
        // A record without binding fields (an old VMM) is refused too.
        let mut bare = record("case-1-step-0", 42, n2);
        bare.nonce = None;
        assert!(bare.check_binding(&run).is_err());
        // This run's own record.
        let mine = record("case-1-step-0", 42, n2);
        mine.verify(&key).unwrap();
        mine.check_binding(&run).unwrap();
        // The binding is signed: editing the nonce breaks the signature.
        let mut forged = old.clone();
        forged.nonce = Some(n2);
        assert!(forged.verify(&key).is_err());
    }

    #[test]
    fn nonces_round_trip_as_hex() {
        let n = Nonce::random().unwrap();
        assert_eq!(n.to_string().parse::<Nonce>().unwrap(), n);
        let j = serde_json::to_string(&n).unwrap();
        assert_eq!(serde_json::from_str::<Nonce>(&j).unwrap(), n);
        assert!("abc".parse::<Nonce>().is_err());
        assert!("zz".repeat(32).parse::<Nonce>().is_err());
    }
}

//! Secure teardown of a tenant, in a fixed order where each step is checked before
//! the next: pause vCPUs → unmap the device from the guest → scrub guest memory →
//! scrub the device's tenant state (scratch registers, data buffers) → reset the
//! device (FLR) → read its counters out of band → get the counters service's verdict
//! → a teardown record (JSON) signed with the VMM's Ed25519 key.
//!
//! The steps are the VM's ([`TeardownOps`]); this module owns the order, the checks,
//! the timings and the record. A failed step stops the teardown there and says which:
//! the device is then not handed to anyone (fail closed).

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hilrig_device::oob::CounterReport;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The steps, in order.
pub const STEPS: [&str; 7] = [
    "pause",
    "unmap-device",
    "scrub-guest-memory",
    "scrub-device-state",
    "reset-device",
    "read-counters",
    "verdict",
];

/// What the VM provides for a teardown.
pub trait TeardownOps {
    /// Park every vCPU (bounded: a spinning or flooding guest is kicked out).
    fn pause(&mut self) -> Result<(), String>;
    /// Remove every guest mapping of the device (direct pages and traps).
    fn unmap_device(&mut self) -> Result<(), String>;
    /// Zero all guest memory and check it is zero; returns bytes scrubbed.
    fn scrub_guest_memory(&mut self) -> Result<u64, String>;
    /// Zero the device's tenant state (scratch, buffers) and check it; returns bytes.
    fn scrub_device_state(&mut self) -> Result<u64, String>;
    /// Function-level reset of the device, checked.
    fn reset_device(&mut self) -> Result<(), String>;
    /// Read the counters out of band.
    fn read_counters(&mut self) -> Result<CounterReport, String>;
    /// Ask the counters service for a verdict on these counters.
    fn verdict(&mut self, counters: &CounterReport) -> Result<VerdictSummary, String>;
}

/// The counters service's answer, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictSummary {
    /// Verdict name (trusted, accepted-update, quarantined, ...).
    pub verdict: String,
    /// Whether the device may go to the next tenant.
    pub handoff_ok: bool,
    /// Reasons.
    pub reasons: Vec<String>,
}

/// One step's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step name.
    pub step: String,
    /// Duration in microseconds.
    pub micros: u64,
    /// Error, if the step failed (the teardown stopped there).
    pub error: Option<String>,
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
    /// Signer's public key, hex.
    pub signer: String,
    /// Ed25519 signature (hex) over the record's JSON with this field empty.
    pub signature: String,
}

impl TeardownRecord {
    fn signing_bytes(&self) -> Vec<u8> {
        let mut c = self.clone();
        c.signature.clear();
        serde_json::to_vec(&c).unwrap_or_default()
    }

    /// Verify the record's signature against `key` (and that `key` is its signer).
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), String> {
        if hex::encode(key.as_bytes()) != self.signer {
            return Err(format!("signed by {}, not by the given key", self.signer));
        }
        let sig: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or("signature is not 128 hex digits")?;
        key.verify_strict(&self.signing_bytes(), &Signature::from_bytes(&sig))
            .map_err(|e| format!("signature does not verify: {e}"))
    }
}

/// Run the teardown. Always returns a signed record; `complete` says whether every
/// step succeeded (the failed step carries its error).
pub fn run(ops: &mut dyn TeardownOps, vm: &str, key: &SigningKey) -> TeardownRecord {
    let start = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut r = TeardownRecord {
        vm: vm.to_string(),
        started_unix,
        steps: Vec::new(),
        complete: false,
        total_micros: 0,
        guest_bytes_scrubbed: 0,
        device_bytes_scrubbed: 0,
        counters: None,
        verdict: None,
        signer: hex::encode(key.verifying_key().as_bytes()),
        signature: String::new(),
    };
    let step = |r: &mut TeardownRecord,
                name: &str,
                f: &mut dyn FnMut(&mut TeardownRecord) -> Result<(), String>| {
        let t = Instant::now();
        let res = f(r);
        r.steps.push(StepRecord {
            step: name.to_string(),
            micros: micros(t.elapsed()),
            error: res.as_ref().err().cloned(),
        });
        res.is_ok()
    };
    let ok = step(&mut r, STEPS[0], &mut |_| ops.pause())
        && step(&mut r, STEPS[1], &mut |_| ops.unmap_device())
        && step(&mut r, STEPS[2], &mut |r| {
            ops.scrub_guest_memory().map(|b| r.guest_bytes_scrubbed = b)
        })
        && step(&mut r, STEPS[3], &mut |r| {
            ops.scrub_device_state()
                .map(|b| r.device_bytes_scrubbed = b)
        })
        && step(&mut r, STEPS[4], &mut |_| ops.reset_device())
        && step(&mut r, STEPS[5], &mut |r| {
            ops.read_counters().map(|c| r.counters = Some(c))
        })
        && step(&mut r, STEPS[6], &mut |r| {
            let c = r.counters.ok_or("no counters")?;
            ops.verdict(&c).map(|v| r.verdict = Some(v))
        });
    r.complete = ok;
    r.total_micros = micros(start.elapsed());
    r.signature = hex::encode(key.sign(&r.signing_bytes()).to_bytes());
    r
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

/// Zero `len` bytes at `ptr` and check they read back as zero. Near memset bandwidth:
/// one write pass and one read pass over 8-byte words.
///
/// # Safety
/// `ptr..ptr+len` must be valid for writes and not concurrently used by anything that
/// expects its contents (the vCPUs are parked and the device unmapped).
pub unsafe fn scrub(ptr: *mut u8, len: usize) -> Result<(), usize> {
    // SAFETY: the caller guarantees the range.
    unsafe { std::ptr::write_bytes(ptr, 0, len) };
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    let words = len / 8;
    let w = ptr as *const u64;
    let mut acc = 0u64;
    let mut i = 0;
    while i < words {
        // SAFETY: in range; read_unaligned because ptr may not be 8-aligned.
        acc |= unsafe { std::ptr::read_unaligned(w.add(i)) };
        i += 1;
    }
    for j in words * 8..len {
        // SAFETY: in range.
        acc |= unsafe { *ptr.add(j) } as u64;
    }
    if acc != 0 {
        // Find the first non-zero byte for the report.
        let first = (0..len).find(|&j| unsafe { *ptr.add(j) } != 0).unwrap_or(0);
        return Err(first);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        calls: Vec<&'static str>,
        fail: Option<&'static str>,
    }

    impl Fake {
        fn go(&mut self, s: &'static str) -> Result<(), String> {
            self.calls.push(s);
            if self.fail == Some(s) {
                Err(format!("{s} failed"))
            } else {
                Ok(())
            }
        }
    }

    impl TeardownOps for Fake {
        fn pause(&mut self) -> Result<(), String> {
            self.go("pause")
        }
        fn unmap_device(&mut self) -> Result<(), String> {
            self.go("unmap-device")
        }
        fn scrub_guest_memory(&mut self) -> Result<u64, String> {
            self.go("scrub-guest-memory").map(|_| 4096)
        }
        fn scrub_device_state(&mut self) -> Result<u64, String> {
            self.go("scrub-device-state").map(|_| 64)
        }
        fn reset_device(&mut self) -> Result<(), String> {
            self.go("reset-device")
        }
        fn read_counters(&mut self) -> Result<CounterReport, String> {
            self.go("read-counters").map(|_| CounterReport {
                counters: [1, 2, 3],
                master: 6,
                fuse: false,
                slots_left: 5,
                width: 8,
                epoch: 0,
            })
        }
        fn verdict(&mut self, _: &CounterReport) -> Result<VerdictSummary, String> {
            self.go("verdict").map(|_| VerdictSummary {
                verdict: "trusted".into(),
                handoff_ok: true,
                reasons: vec![],
            })
        }
    }

    #[test]
    fn steps_run_in_order_and_the_record_is_signed() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut f = Fake::default();
        let r = run(&mut f, "vm1", &key);
        assert_eq!(f.calls, STEPS.to_vec());
        assert!(r.complete);
        assert_eq!(
            (r.guest_bytes_scrubbed, r.device_bytes_scrubbed),
            (4096, 64)
        );
        assert_eq!(r.verdict.as_ref().unwrap().verdict, "trusted");
        r.verify(&key.verifying_key()).unwrap();
        let mut t = r.clone();
        t.counters.as_mut().unwrap().master = 7;
        assert!(
            t.verify(&key.verifying_key()).is_err(),
            "a tampered record fails"
        );
        assert!(r
            .verify(&SigningKey::from_bytes(&[4; 32]).verifying_key())
            .is_err());
    }

    #[test]
    fn a_failed_step_stops_the_teardown_there() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut f = Fake {
            fail: Some("scrub-device-state"),
            ..Default::default()
        };
        let r = run(&mut f, "vm1", &key);
        assert_eq!(
            f.calls,
            STEPS[..4].to_vec(),
            "nothing after the failed step ran"
        );
        assert!(!r.complete);
        assert_eq!(
            r.steps.last().unwrap().error.as_deref(),
            Some("scrub-device-state failed")
        );
        assert!(r.verdict.is_none());
        r.verify(&key.verifying_key()).unwrap();
    }

    #[test]
    fn scrub_zeroes_and_checks() {
        let mut v = vec![0xabu8; 10_007];
        // SAFETY: our own buffer.
        assert_eq!(unsafe { scrub(v.as_mut_ptr().add(3), 10_000) }, Ok(()));
        assert!(v[3..10_003].iter().all(|&b| b == 0));
        assert_eq!(v[2], 0xab);
        assert_eq!(v[10_003], 0xab);
    }
}

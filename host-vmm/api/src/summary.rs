//! [`RunSummary`]: what a VMM run tells its caller (`--json` prints it; campaigns,
//! rollout and the rig read it back), and the records inside it.

use crate::exit::ExitStatus;
use crate::teardown::TeardownRecord;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Exit counts by kind (summed over vCPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounts {
    /// MMIO reads that trapped.
    pub mmio_read: u64,
    /// MMIO writes that trapped.
    pub mmio_write: u64,
    /// Port reads.
    pub io_in: u64,
    /// Port writes.
    pub io_out: u64,
    /// HLT.
    pub hlt: u64,
    /// Interrupted KVM_RUN (kicks).
    pub intr: u64,
    /// Shutdown, unknown and failed entries.
    pub other: u64,
    /// How long the VMM took to handle each trapped MMIO access.
    #[serde(default)]
    pub trap_latency: TrapLatency,
}

impl ExitCounts {
    /// Add another vCPU's counts.
    pub fn add(&mut self, o: &ExitCounts) {
        self.mmio_read += o.mmio_read;
        self.mmio_write += o.mmio_write;
        self.io_in += o.io_in;
        self.io_out += o.io_out;
        self.hlt += o.hlt;
        self.intr += o.intr;
        self.other += o.other;
        self.trap_latency.add(&o.trap_latency);
    }

    /// Trapped MMIO exits.
    pub fn mmio(&self) -> u64 {
        self.mmio_read + self.mmio_write
    }

    /// Every exit.
    pub fn total(&self) -> u64 {
        self.mmio() + self.io_in + self.io_out + self.hlt + self.intr + self.other
    }
}

impl std::fmt::Display for ExitCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mmio-read {}, mmio-write {}, io-in {}, io-out {}, hlt {}, intr {}, other {} (total {})",
            self.mmio_read,
            self.mmio_write,
            self.io_in,
            self.io_out,
            self.hlt,
            self.intr,
            self.other,
            self.total()
        )
    }
}

/// MMIO trap handling times (from the exit reaching the VMM to the access done,
/// policy, device and all): a log2 histogram, bucket `i` counting accesses handled
/// in `[2^i, 2^(i+1))` ns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrapLatency {
    /// Counts per log2-nanosecond bucket.
    pub log2_ns: [u64; 32],
}

impl TrapLatency {
    /// Count one access handled in `d`.
    #[inline]
    pub fn record(&mut self, d: Duration) {
        self.record_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Count one access handled in `ns` nanoseconds.
    #[inline]
    pub fn record_ns(&mut self, ns: u64) {
        let i = (63 - ns.max(1).leading_zeros() as usize).min(31);
        self.log2_ns[i] += 1;
    }

    /// Add another histogram.
    pub fn add(&mut self, o: &TrapLatency) {
        for (a, b) in self.log2_ns.iter_mut().zip(o.log2_ns.iter()) {
            *a += b;
        }
    }

    /// Accesses counted.
    pub fn count(&self) -> u64 {
        self.log2_ns.iter().sum()
    }

    /// The upper bound (ns) of the bucket holding the `q` quantile (0..=1), or 0
    /// with nothing counted.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        let n = self.count();
        if n == 0 {
            return 0;
        }
        let want = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.log2_ns.iter().enumerate() {
            seen += c;
            if seen >= want {
                return 1u64 << (i + 1);
            }
        }
        1u64 << 32
    }
}

/// What the policy did during a run (or so far: the control socket's metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicySummary {
    /// Profile name.
    pub profile: String,
    /// Where it came from.
    pub source: String,
    /// Enforcement on?
    pub enforce: bool,
    /// A trapped access no rule covers is denied (fail closed; false: the profile
    /// says `default = "allow"`, or a VMM from before the switch).
    pub default_deny: bool,
    /// Pages with rules that were mapped straight through, untrapped, because
    /// enforcement was off (MMIO restriction OFF); empty when on.
    pub untrapped_rule_pages: Vec<u32>,
    /// Every decided register part (with or without a rule).
    pub parts: u64,
    /// Decided parts that matched a rule, by action taken.
    pub allowed: u64,
    /// Dropped parts.
    pub dropped: u64,
    /// Shadowed parts.
    pub shadowed: u64,
    /// Accesses that faulted (exceptions injected).
    pub faults: u64,
    /// Every alarm raised.
    pub alarms: u64,
    /// Alarms written to the sink.
    pub alarms_written: u64,
    /// Alarms the rate limit kept out of the sink (still counted per register).
    pub alarms_suppressed: u64,
    /// Alarms per register.
    pub per_register: BTreeMap<String, u64>,
    /// The sink's first write error, if any.
    pub sink_error: Option<String>,
    /// Alarms aggregated per (register word, access, action): first/last time,
    /// count and how many were written (the rate limit is per key, so a flood of
    /// one never hides the first alarm of another).
    pub alarm_groups: Vec<AlarmGroup>,
}

/// The alarms of one key — (register word, access, action) — over a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AlarmGroup {
    /// Register name (e.g. `DEVICE_KEY[3]`).
    pub register: String,
    /// BAR0 offset of the register word.
    pub offset: u32,
    /// `read` or `write`.
    pub access: String,
    /// The action taken (`allow`, `drop`, `shadow`, `fault`).
    pub action: String,
    /// First alarm, µs since the VM started.
    pub first_us: u64,
    /// Last alarm, µs since the VM started.
    pub last_us: u64,
    /// Alarms raised.
    pub count: u64,
    /// Alarms written to the sink (the rest suppressed by this key's rate limit).
    pub written: u64,
}

impl PolicySummary {
    /// Alarms raised on `register` (by its table name, e.g. `HANG_TRIGGER`).
    pub fn alarms_on(&self, register: &str) -> u64 {
        self.per_register.get(register).copied().unwrap_or(0)
    }
}

/// One applied live patch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchEvent {
    /// Component (`policy`, `device-handler`).
    pub component: String,
    /// Version before.
    pub from: u64,
    /// Version after.
    pub to: u64,
    /// Blackout in microseconds (None when the operator already held the vCPUs paused).
    /// For a swap without quiesce: the time new calls could wait (the publish).
    pub blackout_us: Option<u64>,
    /// Whether the vCPUs were parked for it (policy patches; a device-handler swap is
    /// done under load: calls in flight are cancelled and retried in the new module).
    #[serde(default)]
    pub quiesced: bool,
    /// Publish to the old module drained and retired, in microseconds (swaps only).
    #[serde(default)]
    pub swap_us: Option<u64>,
    /// Calls that were inside the old module when it was replaced (swaps only).
    #[serde(default)]
    pub inflight: u64,
}

/// The measurement of a device's VBIOS before the guest gets the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VbiosMeasurement {
    /// ROM window size.
    pub size: u64,
    /// SHA-256 of the whole ROM window, hex.
    pub sha256: String,
    /// Why the ROM is not a valid expansion ROM, if it is not.
    pub invalid: Option<String>,
    /// Revision of the first image, if valid.
    pub revision: Option<u16>,
    /// Which catalog knows it ("builtin factory", "counters <db> (version, approver)").
    pub known_as: Option<String>,
    /// The operator ran the device anyway although it was refused.
    pub overridden: bool,
}

impl VbiosMeasurement {
    /// Whether the device may be handed to a guest without an override.
    pub fn acceptable(&self) -> bool {
        self.invalid.is_none() && self.known_as.is_some()
    }

    /// One line for the run's output.
    pub fn describe(&self) -> String {
        let state = match (&self.invalid, &self.known_as) {
            (Some(why), _) => format!("INVALID ({why})"),
            (None, Some(k)) => format!("known-good: {k}"),
            (None, None) => "NOT in the catalog".into(),
        };
        format!(
            "vbios: {} bytes, sha256 {}: {state}{}",
            self.size,
            self.sha256,
            if self.overridden {
                "; handed to the guest anyway by operator override"
            } else {
                ""
            }
        )
    }
}

/// What one VMM run tells: the one object `hilrig vm run --json` prints on standard
/// output, read back by every client with [`RunSummary::from_output`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Payload name (built-in name or file).
    pub payload: String,
    /// The device backend (`--device`), as given.
    pub device: String,
    /// How the run ended, in words (`PASS`, `TIMEOUT: ...`).
    pub verdict: String,
    /// Whether the guest passed.
    pub passed: bool,
    /// The process exit status this run ends with.
    pub exit_status: ExitStatus,
    /// Exits by kind (zero when the guest never ran).
    #[serde(default)]
    pub exits: ExitCounts,
    /// Wall time of the whole run, milliseconds.
    #[serde(default)]
    pub wall_ms: f64,
    /// From VM creation to the first exit, milliseconds.
    #[serde(default)]
    pub first_exit_ms: Option<f64>,
    /// BAR0 pages mapped straight into the guest.
    #[serde(default)]
    pub direct_pages: u64,
    /// What the policy engine did.
    #[serde(default)]
    pub policy: Option<PolicySummary>,
    /// The device's measured VBIOS.
    #[serde(default)]
    pub vbios: Option<VbiosMeasurement>,
    /// The signed teardown record, if the tenant was torn down.
    #[serde(default)]
    pub teardown: Option<TeardownRecord>,
    /// Live patches applied during the run.
    #[serde(default)]
    pub patches: Vec<PatchEvent>,
    /// Values the guest wrote to the result port, in order.
    #[serde(default)]
    pub results: Vec<u32>,
    /// Whether the device was wedged after the run (None: not known).
    #[serde(default)]
    pub device_hung: Option<bool>,
    /// How the VMM was confined (None: not reported, e.g. an older VMM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxSummary>,
    /// The counters service's provisioning gate (with `--counters-db`): what it read
    /// out of band and decided before the guest started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateRecord>,
}

/// How the provisioning gate ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GateOutcome {
    /// The service vouches for the device: the guest may have it.
    Trusted,
    /// The service gave a verdict that is not trusted (see `verdict`).
    Untrusted,
    /// The service does not know the device (never enrolled).
    UnknownDevice,
    /// The device's counters could not be read out of band (the link or the OOB
    /// interface failed): no verdict on the device, but not handed out either.
    TransportFault,
    /// The counters service itself failed (database, key): fail closed.
    ServiceError,
}

impl GateOutcome {
    /// Whether the guest may have the device.
    pub fn admits(self) -> bool {
        self == GateOutcome::Trusted
    }
}

impl std::fmt::Display for GateOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GateOutcome::Trusted => "trusted",
            GateOutcome::Untrusted => "untrusted",
            GateOutcome::UnknownDevice => "unknown-device",
            GateOutcome::TransportFault => "transport-fault",
            GateOutcome::ServiceError => "service-error",
        })
    }
}

/// The provisioning gate's record: the device's counters read out of band, checked
/// by the counters service against its enrolled expected values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateRecord {
    /// How it ended.
    pub outcome: GateOutcome,
    /// The device's serial (`0x...`) as it identified itself out of band, if read.
    #[serde(default)]
    pub serial: Option<String>,
    /// The service's verdict, when it gave one.
    #[serde(default)]
    pub verdict: Option<crate::CountersVerdict>,
    /// Why (the service's reasons, or the fault).
    #[serde(default)]
    pub reasons: Vec<String>,
    /// How long the gate took (out-of-band read and verdict), microseconds.
    #[serde(default)]
    pub micros: u64,
}

impl GateRecord {
    /// One line for people.
    pub fn describe(&self) -> String {
        format!(
            "counters gate: {}{}{} in {} us{}",
            self.outcome,
            self.serial
                .as_deref()
                .map_or(String::new(), |s| format!(", device {s}")),
            self.verdict
                .map_or(String::new(), |v| format!(", verdict {v}")),
            self.micros,
            if self.reasons.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.reasons.join("; "))
            }
        )
    }
}

/// How a VMM run was confined (issue 16: jail, seccomp, landlock).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSummary {
    /// Per-thread seccomp filters installed (false: `--seccomp off`, debugging only).
    pub seccomp: bool,
    /// What landlock enforced ("fully enforced", "not enforced ...", "off").
    #[serde(default)]
    pub landlock: String,
    /// The jail root (None: not jailed).
    #[serde(default)]
    pub jail: Option<String>,
    /// The uid and gid the VMM ran as.
    #[serde(default)]
    pub uid: u32,
    /// The gid.
    #[serde(default)]
    pub gid: u32,
    /// What was not applied, and why (e.g. cgroup limits without a writable
    /// cgroup v2 hierarchy).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// Standard output of a VMM run held no run summary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no run summary in the VMM's output ({lines} lines; last: {last:?})")]
pub struct NoSummary {
    /// Lines of output.
    pub lines: usize,
    /// The last non-empty line, cut to 200 characters.
    pub last: String,
}

impl RunSummary {
    /// The summary of a run that never started: the device was refused.
    pub fn refused(payload: &str, device: &str, vbios: VbiosMeasurement) -> RunSummary {
        RunSummary {
            payload: payload.to_string(),
            device: device.to_string(),
            verdict: "DEVICE REFUSED: measured VBIOS invalid or not in the catalog".into(),
            passed: false,
            exit_status: ExitStatus::DeviceRefused,
            exits: ExitCounts::default(),
            wall_ms: 0.0,
            first_exit_ms: None,
            direct_pages: 0,
            policy: None,
            vbios: Some(vbios),
            teardown: None,
            patches: Vec::new(),
            results: Vec::new(),
            device_hung: None,
            sandbox: None,
            gate: None,
        }
    }

    /// The summary of a run that never started: the provisioning gate refused the
    /// device (exit status [`ExitStatus::DeviceUntrusted`]).
    pub fn untrusted(payload: &str, device: &str, gate: GateRecord) -> RunSummary {
        RunSummary {
            verdict: format!("DEVICE UNTRUSTED: {}", gate.describe()),
            exit_status: ExitStatus::DeviceUntrusted,
            vbios: None,
            gate: Some(gate),
            ..RunSummary::synthetic(payload)
        }
        .with_device(device)
    }

    fn with_device(mut self, device: &str) -> RunSummary {
        self.device = device.to_string();
        self.passed = false;
        self
    }

    /// The summary for a step that ran no VMM (a synthetic pass).
    pub fn synthetic(what: &str) -> RunSummary {
        RunSummary {
            payload: what.to_string(),
            device: String::new(),
            verdict: "PASS".into(),
            passed: true,
            exit_status: ExitStatus::Pass,
            exits: ExitCounts::default(),
            wall_ms: 0.0,
            first_exit_ms: None,
            direct_pages: 0,
            policy: None,
            vbios: None,
            teardown: None,
            patches: Vec::new(),
            results: Vec::new(),
            device_hung: None,
            sandbox: None,
            gate: None,
        }
    }

    /// One JSON line.
    pub fn to_line(&self) -> String {
        // A struct of plain fields always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The summary in a VMM's standard output: the last line that parses as one
    /// (the console may share standard output without `--console`).
    pub fn from_output(stdout: &[u8]) -> Result<RunSummary, NoSummary> {
        let text = String::from_utf8_lossy(stdout);
        let found = text
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<RunSummary>(l.trim()).ok());
        found.ok_or_else(|| NoSummary {
            lines: text.lines().count(),
            last: text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .chars()
                .take(200)
                .collect(),
        })
    }

    /// Alarms raised (0 without a policy).
    pub fn alarms(&self) -> u64 {
        self.policy.as_ref().map_or(0, |p| p.alarms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trap_latency_buckets_and_quantiles() {
        let mut t = TrapLatency::default();
        assert_eq!(t.quantile_ns(0.5), 0);
        for ns in [0u64, 1, 2, 3, 1000, 1023, 1024, 5000, u64::MAX] {
            t.record(Duration::from_nanos(ns));
        }
        assert_eq!(t.log2_ns[0], 2, "0 and 1 ns");
        assert_eq!(t.log2_ns[1], 2, "2 and 3 ns");
        assert_eq!(t.log2_ns[9], 2, "1000 and 1023 ns");
        assert_eq!(t.log2_ns[10], 1);
        assert_eq!(t.log2_ns[12], 1);
        assert_eq!(t.log2_ns[31], 1, "huge values land in the last bucket");
        assert_eq!(t.count(), 9);
        assert_eq!(t.quantile_ns(0.5), 1 << 10);
        assert_eq!(t.quantile_ns(0.0), 1 << 1);
        let mut u = t;
        u.add(&t);
        assert_eq!(u.count(), 18);
    }

    #[test]
    fn summaries_round_trip_and_are_found_in_noisy_output() {
        let mut s = RunSummary::synthetic("pci-enum");
        s.results = vec![1, 2];
        s.exits.mmio_read = 5;
        s.policy = Some(PolicySummary {
            alarms: 2,
            per_register: [("HANG_TRIGGER".to_string(), 2)].into(),
            ..Default::default()
        });
        let out = format!("console line\n{}\nmore console {{\"x\":1}}\n", s.to_line());
        let back = RunSummary::from_output(out.as_bytes()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.alarms(), 2);
        assert_eq!(back.policy.unwrap().alarms_on("HANG_TRIGGER"), 2);
        let e = RunSummary::from_output(b"hello\n{\"verdict\":1}\n").unwrap_err();
        assert_eq!(e.lines, 2);
        // The refused summary carries its own status.
        let v = VbiosMeasurement {
            size: 4,
            sha256: "00".into(),
            invalid: None,
            revision: None,
            known_as: None,
            overridden: false,
        };
        let r = RunSummary::refused("p", "model", v);
        assert_eq!(r.exit_status, ExitStatus::DeviceRefused);
        assert!(!r.vbios.as_ref().unwrap().acceptable());
        assert_eq!(RunSummary::from_output(r.to_line().as_bytes()).unwrap(), r);
    }
}

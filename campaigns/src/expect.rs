//! What a case expects: the VMM verdict, alarms, counter moves, the counters
//! service's verdicts, teardown, fuse, flash and blackout bounds ([`Expect`]), and how
//! they combine and contradict each other.

use hilrig_device::attest::Verdict as CountersVerdict;
use hilrig_device::Region;
use hilrig_vmm_api::ExitStatus;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A counter a `counter_delta` may name: a region's, or MASTER.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Counter {
    /// The VBIOS region's counter.
    Vbios,
    /// The FIRMWARE region's counter.
    Firmware,
    /// The CONFIG region's counter.
    Config,
    /// MASTER.
    Master,
}

impl Counter {
    /// Every counter.
    pub const ALL: [Counter; 4] = [
        Counter::Vbios,
        Counter::Firmware,
        Counter::Config,
        Counter::Master,
    ];

    /// The region this counter counts (None for MASTER).
    pub fn region(self) -> Option<Region> {
        match self {
            Counter::Vbios => Some(Region::Vbios),
            Counter::Firmware => Some(Region::Firmware),
            Counter::Config => Some(Region::Config),
            Counter::Master => None,
        }
    }

    /// The counter of `region`.
    pub fn of(region: Region) -> Counter {
        match region {
            Region::Vbios => Counter::Vbios,
            Region::Firmware => Counter::Firmware,
            Region::Config => Counter::Config,
        }
    }

    /// Its name in campaign files and reports.
    pub fn name(self) -> &'static str {
        match self {
            Counter::Vbios => "vbios",
            Counter::Firmware => "firmware",
            Counter::Config => "config",
            Counter::Master => "master",
        }
    }
}

impl fmt::Display for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The verdict a step must end with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Exit 0.
    Pass,
    /// Exit 1: the payload reported failure.
    Fail,
    /// Exit 3: the VMM's watchdog stopped the guest.
    Timeout,
    /// Exit 4.
    TripleFault,
    /// Exit 5.
    BadAccess,
    /// Exit 10: the device was refused (measured VBIOS unknown or invalid).
    Refused,
}

impl Verdict {
    /// The VMM exit status of this verdict.
    pub fn exit_status(self) -> ExitStatus {
        match self {
            Verdict::Pass => ExitStatus::Pass,
            Verdict::Fail => ExitStatus::Fail,
            Verdict::Timeout => ExitStatus::Timeout,
            Verdict::TripleFault => ExitStatus::TripleFault,
            Verdict::BadAccess => ExitStatus::BadAccess,
            Verdict::Refused => ExitStatus::DeviceRefused,
        }
    }
}

/// Alarm count expectation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlarmExp {
    /// No alarm (`== 0`).
    None,
    /// At least one (`> 0`).
    Some,
}

/// Expected outcome of a case; every field is optional (unchecked when absent).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Verdict of the last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// Exact VMM exit status of the last step (alternative to `verdict`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<ExitStatus>,
    /// Alarm count: `none` (== 0) or `some` (> 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alarms: Option<AlarmExp>,
    /// Registers that must each have raised at least one alarm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alarm_registers: Option<Vec<String>>,
    /// Counter increments over the whole case, per region (`vbios`, `firmware`,
    /// `config`, `master`), read from the device state file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter_delta: Option<BTreeMap<Counter, u64>>,
    /// Counters verdict of the teardown record (`trusted`, `quarantined` ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters_verdict: Option<CountersVerdict>,
    /// The teardown record says complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teardown_complete: Option<bool>,
    /// The counters service's verdict on the device after the case (`trusted`,
    /// `accepted-update`, `quarantined` ...; see hilrig-counters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_verdict: Option<CountersVerdict>,
    /// The device's fuse is blown (`true`) or intact (`false`) after the case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuse: Option<bool>,
    /// Every flash region's contents are the same after the case as before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flash_unchanged: Option<bool>,
    /// Live-patch blackouts: at least one was measured and none exceeded this
    /// many microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blackout_max_us: Option<u64>,
}

impl Expect {
    /// `self`, with the fields it leaves out taken from `base`.
    pub fn over(&self, base: &Expect) -> Expect {
        Expect {
            verdict: self.verdict.or(if self.exit_status.is_some() {
                None
            } else {
                base.verdict
            }),
            exit_status: self.exit_status.or(if self.verdict.is_some() {
                None
            } else {
                base.exit_status
            }),
            alarms: self.alarms.or(base.alarms),
            alarm_registers: self
                .alarm_registers
                .clone()
                .or(base.alarm_registers.clone()),
            counter_delta: self.counter_delta.clone().or(base.counter_delta.clone()),
            counters_verdict: self.counters_verdict.or(base.counters_verdict),
            teardown_complete: self.teardown_complete.or(base.teardown_complete),
            service_verdict: self.service_verdict.or(base.service_verdict),
            fuse: self.fuse.or(base.fuse),
            flash_unchanged: self.flash_unchanged.or(base.flash_unchanged),
            blackout_max_us: self.blackout_max_us.or(base.blackout_max_us),
        }
    }

    /// Why these expectations cannot all hold, if they cannot.
    pub fn contradictions(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let (Some(v), Some(s)) = (self.verdict, self.exit_status) {
            if v.exit_status() != s {
                out.push(format!(
                    "verdict {v:?} means exit status {}, but exit_status = {s}",
                    v.exit_status()
                ));
            }
        }
        let refused = self.verdict == Some(Verdict::Refused)
            || self.exit_status == Some(ExitStatus::DeviceRefused);
        if self.alarms == Some(AlarmExp::None)
            && self.alarm_registers.as_ref().is_some_and(|r| !r.is_empty())
        {
            out.push("alarms = \"none\" but alarm_registers expects alarms".into());
        }
        if refused {
            if self.alarms == Some(AlarmExp::Some)
                || self.alarm_registers.as_ref().is_some_and(|r| !r.is_empty())
            {
                out.push("a refused device runs no guest, so it cannot raise alarms".into());
            }
            if self.teardown_complete == Some(true) || self.counters_verdict.is_some() {
                out.push("a refused device is never handed out, so there is no teardown".into());
            }
            if self
                .counter_delta
                .as_ref()
                .is_some_and(|d| d.values().any(|v| *v > 0))
            {
                out.push("a refused device runs no guest, so no counter can move".into());
            }
            if self.blackout_max_us.is_some() {
                out.push("a refused device runs no guest, so no patch can land".into());
            }
        }
        if self.blackout_max_us == Some(0) {
            out.push("blackout_max_us = 0: no blackout can be that short".into());
        }
        if self.flash_unchanged == Some(true)
            && self.service_verdict == Some(CountersVerdict::NeedsReflash)
        {
            out.push(
                "needs-reflash means a region's image changed, but flash_unchanged = true".into(),
            );
        }
        if self.fuse == Some(true) {
            if let Some(v) = self.service_verdict {
                if ![
                    CountersVerdict::Locked,
                    CountersVerdict::RolledBack,
                    CountersVerdict::Quarantined,
                    CountersVerdict::Unverifiable,
                ]
                .contains(&v)
                {
                    out.push(format!(
                        "a blown fuse is reported `locked` by the counters service, not `{v}`"
                    ));
                }
            }
        }
        if self.teardown_complete == Some(false) && self.counters_verdict.is_some() {
            out.push(
                "counters_verdict comes from a complete teardown, but teardown_complete = false"
                    .into(),
            );
        }
        if let Some(d) = &self.counter_delta {
            let regions: u64 = Region::ALL
                .iter()
                .filter_map(|r| d.get(&Counter::of(*r)))
                .sum();
            if let Some(m) = d.get(&Counter::Master) {
                if Region::ALL.iter().all(|r| d.contains_key(&Counter::of(*r)))
                    && (*m > regions || (*m == 0) != (regions == 0))
                {
                    out.push(format!("counter_delta: master +{m} cannot go with region increments summing to {regions} (MASTER moves with every region increment)"));
                }
            }
        }
        out
    }

    /// Short human form, for reports (`verdict pass, alarms some, ...`).
    pub fn describe(&self) -> String {
        let mut p = Vec::new();
        if let Some(v) = self.verdict {
            p.push(format!("verdict {v:?}").to_lowercase());
        }
        if let Some(s) = self.exit_status {
            p.push(format!("exit {s}"));
        }
        if let Some(a) = self.alarms {
            p.push(format!(
                "alarms {}",
                if a == AlarmExp::Some { ">0" } else { "==0" }
            ));
        }
        if let Some(r) = &self.alarm_registers {
            p.push(format!("alarms on {}", r.join("+")));
        }
        if let Some(d) = &self.counter_delta {
            let s: Vec<String> = d.iter().map(|(k, v)| format!("{k}+{v}")).collect();
            p.push(format!("counters {}", s.join(" ")));
        }
        if let Some(v) = &self.counters_verdict {
            p.push(format!("counters verdict {v}"));
        }
        if let Some(t) = self.teardown_complete {
            p.push(format!("teardown complete={t}"));
        }
        if let Some(v) = &self.service_verdict {
            p.push(format!("service verdict {v}"));
        }
        if let Some(f) = self.fuse {
            p.push(format!("fuse {}", if f { "blown" } else { "intact" }));
        }
        if let Some(f) = self.flash_unchanged {
            p.push(format!("flash unchanged={f}"));
        }
        if let Some(b) = self.blackout_max_us {
            p.push(format!("blackout <= {b} us"));
        }
        p.join(", ")
    }
}

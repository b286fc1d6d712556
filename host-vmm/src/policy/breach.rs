//! The policy file's `[breach]` table (issue 21.5): what makes the VMM take the
//! device away from a tenant on its own, and how.
//!
//! ```toml
//! [breach]
//! action = "teardown"            # or "detach": the device goes, the guest runs on
//! counters = ["bypassed-trap", "undercount", "rolled-back"]
//! counters_poll = "100ms"        # how often the counters are read out of band
//! stale_module_calls = true      # a call into a retired module is a breach
//!
//! [[breach.alarms]]
//! register = "HANG_TRIGGER"      # or "SCRATCH[3]"
//! count = 3                      # this many alarms on the register ...
//! within = "1s"                  # ... within this window
//! ```
//!
//! Validated when the policy is loaded, with the file and the reason: unknown
//! registers, a zero count or window, unknown or non-breach verdicts, a poll period
//! outside 1 ms..1 min, unknown keys.

use super::PolicyError;
use hilrig_device::attest::Verdict;
use serde::Deserialize;
use std::time::Duration;

/// What a breach does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BreachAction {
    /// Secure teardown: the VM ends.
    #[default]
    Teardown,
    /// Detach: the device is taken away (unmapped, removed from the guest's PCI
    /// bus), scrubbed, reset and verified; the guest runs on without it.
    Detach,
}

/// One alarm threshold as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlarmThresholdSpec {
    /// Register name (`NAME` or `NAME[i]`).
    pub register: String,
    /// Alarms that make a breach.
    pub count: u64,
    /// The window they must fall in (`500ms`, `2s`, `1m`).
    pub within: String,
}

/// The `[breach]` table as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BreachSpec {
    /// Teardown (default) or detach.
    #[serde(default)]
    pub action: BreachAction,
    /// Alarm thresholds per register.
    #[serde(default)]
    pub alarms: Vec<AlarmThresholdSpec>,
    /// Counters verdicts that are a breach (names as the counters service gives them).
    #[serde(default)]
    pub counters: Vec<String>,
    /// How often the counters are read out of band while the guest runs.
    #[serde(default)]
    pub counters_poll: Option<String>,
    /// A call into a retired module is a breach.
    #[serde(default)]
    pub stale_module_calls: bool,
}

/// A compiled alarm threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmThreshold {
    /// The register as written.
    pub register: String,
    /// Its byte range in BAR0.
    pub range: (u32, u32),
    /// Alarms that make a breach.
    pub count: u64,
    /// Window.
    pub within: Duration,
}

/// The compiled `[breach]` table (empty: no breach triggers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BreachConfig {
    /// Teardown or detach.
    pub action: BreachAction,
    /// Alarm thresholds.
    pub alarms: Vec<AlarmThreshold>,
    /// Counters verdicts that are a breach.
    pub counters: Vec<Verdict>,
    /// How often counters are read (when `counters` is not empty).
    pub counters_poll: Duration,
    /// Stale module calls are a breach.
    pub stale_module_calls: bool,
}

/// Verdicts a `[breach] counters` list may name: the ones that say the device was
/// touched behind the VMM or its counters cannot be believed.
pub const BREACH_VERDICTS: [Verdict; 6] = [
    Verdict::BypassedTrap,
    Verdict::Undercount,
    Verdict::RolledBack,
    Verdict::Changed,
    Verdict::Locked,
    Verdict::Quarantined,
];

/// Default counters poll period.
pub const DEFAULT_COUNTERS_POLL: Duration = Duration::from_millis(100);

impl BreachConfig {
    /// Whether anything triggers a breach.
    pub fn armed(&self) -> bool {
        !self.alarms.is_empty() || !self.counters.is_empty() || self.stale_module_calls
    }
}

/// Parse a window or period: `N` seconds or `Nms`/`Ns`/`Nm`.
fn duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v > 0.0 && v * unit <= 86_400.0).then(|| Duration::from_secs_f64(v * unit))
}

impl BreachSpec {
    /// Validate and compile; `file` names the policy in errors.
    pub fn compile(&self, file: &str) -> Result<BreachConfig, PolicyError> {
        let err = |rule: Option<String>, reason: String| PolicyError {
            file: file.to_string(),
            rule,
            reason,
        };
        let mut alarms = Vec::new();
        for (i, a) in self.alarms.iter().enumerate() {
            let at = Some(format!("breach alarm threshold {} ({})", i + 1, a.register));
            let (start, end, _) =
                super::resolve_register(&a.register).map_err(|e| err(at.clone(), e.to_string()))?;
            if a.count == 0 {
                return Err(err(at, "count must be at least 1".into()));
            }
            let within = duration(&a.within).ok_or_else(|| {
                err(
                    at.clone(),
                    format!(
                        "within = {:?} is not a window (e.g. 500ms, 2s, 1m; more than 0, at most a day)",
                        a.within
                    ),
                )
            })?;
            alarms.push(AlarmThreshold {
                register: a.register.clone(),
                range: (start, end),
                count: a.count,
                within,
            });
        }
        let mut counters = Vec::new();
        for name in &self.counters {
            let v = Verdict::parse(name)
                .filter(|v| BREACH_VERDICTS.contains(v))
                .ok_or_else(|| {
                    err(
                        Some("breach counters".into()),
                        format!(
                            "{name:?} is not a breach verdict; one of: {}",
                            BREACH_VERDICTS.map(|v| v.to_string()).join(", ")
                        ),
                    )
                })?;
            if !counters.contains(&v) {
                counters.push(v);
            }
        }
        let counters_poll = match &self.counters_poll {
            None => DEFAULT_COUNTERS_POLL,
            Some(s) => duration(s)
                .filter(|d| *d >= Duration::from_millis(1) && *d <= Duration::from_secs(60))
                .ok_or_else(|| {
                    err(
                        Some("breach counters_poll".into()),
                        format!("{s:?} is not a period from 1ms to 1m"),
                    )
                })?,
        };
        Ok(BreachConfig {
            action: self.action,
            alarms,
            counters,
            counters_poll,
            stale_module_calls: self.stale_module_calls,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::PolicyFile;

    const RULE: &str =
        "[[profile.t]]\nregister = \"HANG_TRIGGER\"\naccess = \"write\"\naction = \"drop\"\nalarm = true\n";

    fn compile(breach: &str) -> Result<crate::policy::Profile, crate::policy::PolicyError> {
        PolicyFile::parse(&format!("{breach}\n{RULE}"), "t.toml")?.compile("t", "t.toml")
    }

    #[test]
    fn a_breach_table_compiles_into_every_profile() {
        let p = compile(
            "[breach]\naction = \"detach\"\ncounters = [\"bypassed-trap\", \"undercount\", \"rolled-back\"]\ncounters_poll = \"20ms\"\nstale_module_calls = true\n[[breach.alarms]]\nregister = \"HANG_TRIGGER\"\ncount = 3\nwithin = \"2s\"\n",
        )
        .unwrap();
        let b = &p.breach;
        assert_eq!(b.action, super::BreachAction::Detach);
        assert_eq!(b.alarms.len(), 1);
        assert_eq!(b.alarms[0].count, 3);
        assert_eq!(b.alarms[0].within, std::time::Duration::from_secs(2));
        assert_eq!(b.alarms[0].range, (0x38, 0x3c));
        assert_eq!(b.counters.len(), 3);
        assert_eq!(b.counters_poll, std::time::Duration::from_millis(20));
        assert!(b.stale_module_calls && b.armed());
        // No table: nothing armed, teardown by default.
        let p = compile("").unwrap();
        assert!(!p.breach.armed());
        assert_eq!(p.breach.action, super::BreachAction::Teardown);
    }

    #[test]
    fn bad_breach_tables_are_refused_with_file_and_reason() {
        for (text, want) in [
            ("[breach]\naction = \"explode\"", "unknown variant"),
            ("[breach]\nwhatever = 1", "unknown field"),
            (
                "[[breach.alarms]]\nregister = \"NOPE\"\ncount = 1\nwithin = \"1s\"",
                "breach alarm threshold 1 (NOPE): unknown register",
            ),
            (
                "[[breach.alarms]]\nregister = \"SCRATCH[9]\"\ncount = 1\nwithin = \"1s\"",
                "out of range",
            ),
            (
                "[[breach.alarms]]\nregister = \"HANG_TRIGGER\"\ncount = 0\nwithin = \"1s\"",
                "count must be at least 1",
            ),
            (
                "[[breach.alarms]]\nregister = \"HANG_TRIGGER\"\ncount = 2\nwithin = \"soon\"",
                "is not a window",
            ),
            (
                "[[breach.alarms]]\nregister = \"HANG_TRIGGER\"\ncount = 2\nwithin = \"0s\"",
                "is not a window",
            ),
            (
                "[[breach.alarms]]\nregister = \"HANG_TRIGGER\"\ncount = 2",
                "missing field `within`",
            ),
            (
                "[breach]\ncounters = [\"trusted\"]",
                "\"trusted\" is not a breach verdict",
            ),
            (
                "[breach]\ncounters = [\"bogus\"]",
                "is not a breach verdict",
            ),
            (
                "[breach]\ncounters = [\"undercount\"]\ncounters_poll = \"2h\"",
                "not a period from 1ms to 1m",
            ),
        ] {
            let e = compile(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}\n=> {e}");
            assert!(e.starts_with("policy t.toml"), "{e}");
        }
    }
}

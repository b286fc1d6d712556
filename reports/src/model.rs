//! The results model: what one campaign run produced. The runner writes it, the
//! reports read it. Serialised as JSON (`run.json`), versioned by [`SCHEMA_VERSION`].

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

/// The schema number written into every run file. Readers accept this and older.
pub const SCHEMA_VERSION: u32 = 1;

fn schema_version() -> u32 {
    SCHEMA_VERSION
}

/// Read a list of numbers where `null` stands for a non-finite value (serde_json
/// writes NaN and infinities as `null`), so a run with a bad sample still loads;
/// the reports skip non-finite samples.
fn lenient_f64s<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<f64>, D::Error> {
    let v: Vec<Option<f64>> = Deserialize::deserialize(d)?;
    Ok(v.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
}

/// One campaign run on one or more hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Schema of this record ([`SCHEMA_VERSION`] when written by this build).
    #[serde(default = "schema_version")]
    pub schema: u32,
    /// Unique id of this run (e.g. `nightly-20261121-0200`).
    pub id: String,
    /// Campaign name; runs of the same campaign are diffed against each other.
    pub campaign: String,
    /// Start, unix milliseconds.
    pub started_ms: u64,
    /// End, unix milliseconds.
    pub finished_ms: u64,
    /// The hosts that took part.
    #[serde(default)]
    pub hosts: Vec<Host>,
    /// One entry per case (attack x backend x profile x host tag).
    #[serde(default)]
    pub cases: Vec<CaseResult>,
}

/// A host of the run's inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// Inventory name, e.g. `rack1-h03`.
    pub name: String,
    /// Inventory tags, e.g. `["sim"]`, `["ice40", "x86"]`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// `true` for a simulated host (a `hilrig-vmm` process and PTYs).
    #[serde(default)]
    pub simulated: bool,
}

/// The verdict of a case (or of one attempt of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Expectation met on the first attempt.
    Pass,
    /// Expectation not met: a test failure (a finding, or a regression).
    Fail,
    /// The rig failed (power, console, lease, boot ...) after all retries; says
    /// nothing about the device or VMM under test.
    Infra,
    /// The case did not finish within its timeout.
    Timeout,
    /// Failed at least once, then passed on a repeat.
    Flaky,
    /// Not run (no matching host, disabled, earlier stage failed ...).
    Skipped,
}

impl Outcome {
    /// Every outcome, in report order (worst first).
    pub const ALL: [Outcome; 6] = [
        Outcome::Fail,
        Outcome::Timeout,
        Outcome::Infra,
        Outcome::Flaky,
        Outcome::Pass,
        Outcome::Skipped,
    ];

    /// Lower-case name, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Infra => "infra",
            Outcome::Timeout => "timeout",
            Outcome::Flaky => "flaky",
            Outcome::Skipped => "skipped",
        }
    }

    /// A test failure: the thing under test did not behave (FAIL or TIMEOUT).
    pub fn is_failure(self) -> bool {
        matches!(self, Outcome::Fail | Outcome::Timeout)
    }

    /// Ended well (PASS or FLAKY).
    pub fn is_success(self) -> bool {
        matches!(self, Outcome::Pass | Outcome::Flaky)
    }

    /// The case actually ran (not SKIPPED and not lost to INFRA).
    pub fn ran(self) -> bool {
        !matches!(self, Outcome::Skipped | Outcome::Infra)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str().to_uppercase())
    }
}

/// The result of one case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// Stable across runs: `attack/backend/profile@host_tag` (see [`CaseResult::make_id`]).
    pub id: String,
    /// Attack name from the attack library.
    pub attack: String,
    /// Device backend: `model`, `rtl`, `vfio`, `lockstep` ...
    pub backend: String,
    /// Policy profile: `tenant`, `operator` ...
    pub profile: String,
    /// The host tag the case was scheduled on (part of the id).
    #[serde(default)]
    pub host_tag: String,
    /// The host that produced the final verdict.
    pub host: String,
    /// Final verdict.
    pub outcome: Outcome,
    /// Every attempt, in order (infra retries and repeats included).
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// Wall time of the case, all attempts, milliseconds.
    pub duration_ms: u64,
    /// One-line explanation of the verdict (empty for a plain pass).
    #[serde(default)]
    pub message: String,
    /// What the campaign expected, e.g. `blocked+alarm, counter delta 0`.
    #[serde(default)]
    pub expected: String,
    /// What was observed, in the same terms.
    #[serde(default)]
    pub observed: String,
    /// Measurements.
    #[serde(default)]
    pub metrics: Metrics,
    /// Files kept for this case, relative to the run directory.
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
}

impl CaseResult {
    /// The stable case id for `attack x backend x profile x host tag`.
    pub fn make_id(attack: &str, backend: &str, profile: &str, host_tag: &str) -> String {
        format!("{attack}/{backend}/{profile}@{host_tag}")
    }
}

/// One attempt of a case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// Verdict of this attempt.
    pub outcome: Outcome,
    /// Host it ran on.
    pub host: String,
    /// Wall time, milliseconds.
    pub duration_ms: u64,
    /// Explanation (error text for INFRA, mismatch for FAIL).
    #[serde(default)]
    pub message: String,
    /// The hilrig build that ran it: SHA-256 (hex) of the VMM executable
    /// (on an SSH host, the copy there is made identical by this hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
}

/// Measurements of one case.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// OOB counter readings over time.
    #[serde(default)]
    pub counters: Vec<CounterReading>,
    /// MMIO trap latencies (guest exit to resume on a trapped page).
    #[serde(default)]
    pub trap_latency: Latency,
    /// Live-patch blackouts (first kick to last resume), microseconds.
    #[serde(default, deserialize_with = "lenient_f64s")]
    pub blackouts_us: Vec<f64>,
    /// Secure teardown times (pause to signed record), microseconds.
    #[serde(default, deserialize_with = "lenient_f64s")]
    pub teardown_us: Vec<f64>,
    /// Policy alarms raised.
    #[serde(default)]
    pub alarms: u64,
    /// The counters service's verdicts met by the case (the provisioning gate's
    /// and each teardown's), counted by verdict name (`trusted`, `rollback`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counters_verdicts: BTreeMap<String, u64>,
}

/// One out-of-band read of a device's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterReading {
    /// When, unix milliseconds.
    pub t_ms: u64,
    /// Region counters by region name (`vbios`, `firmware`, `config`).
    pub regions: BTreeMap<String, u64>,
    /// The MASTER counter.
    pub master: u64,
}

/// Latency samples, raw or pre-binned (a runner with many exits sends a histogram).
/// Both may be present; reports merge them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Raw samples, microseconds.
    #[serde(default, deserialize_with = "lenient_f64s")]
    pub samples_us: Vec<f64>,
    /// Pre-binned samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<Histogram>,
}

impl Latency {
    /// Total number of samples (raw + binned).
    pub fn count(&self) -> u64 {
        self.samples_us.len() as u64 + self.histogram.as_ref().map_or(0, |h| h.total())
    }
}

/// A histogram: `counts[i]` samples fell in `[edges_us[i], edges_us[i+1])`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Bucket edges, ascending, microseconds; one more than `counts`.
    #[serde(deserialize_with = "lenient_f64s")]
    pub edges_us: Vec<f64>,
    /// Samples per bucket.
    pub counts: Vec<u64>,
}

impl Histogram {
    /// Number of samples.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(lo, hi, count)` per well-formed bucket.
    pub fn buckets(&self) -> impl Iterator<Item = (f64, f64, u64)> + '_ {
        self.edges_us
            .windows(2)
            .zip(&self.counts)
            .map(|(w, &c)| (w[0], w[1], c))
    }
}

/// Kind of a kept file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// Serial console capture.
    Console,
    /// Policy alarm log.
    Alarms,
    /// OOB transcript / counter readings.
    Oob,
    /// Signed teardown record.
    Teardown,
    /// VCD waveform (RTL divergence).
    Vcd,
    /// Anything else.
    #[serde(other)]
    Other,
}

impl ArtifactKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Console => "console",
            ArtifactKind::Alarms => "alarms",
            ArtifactKind::Oob => "oob",
            ArtifactKind::Teardown => "teardown",
            ArtifactKind::Vcd => "vcd",
            ArtifactKind::Other => "other",
        }
    }
}

/// A kept file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// What it is.
    pub kind: ArtifactKind,
    /// Path relative to the run directory (the directory holding `run.json`).
    pub path: String,
}

/// Counts by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// All cases.
    pub total: usize,
    /// PASS.
    pub pass: usize,
    /// FAIL.
    pub fail: usize,
    /// INFRA.
    pub infra: usize,
    /// TIMEOUT.
    pub timeout: usize,
    /// FLAKY.
    pub flaky: usize,
    /// SKIPPED.
    pub skipped: usize,
}

impl Counts {
    /// Count a run's cases.
    pub fn of(run: &Run) -> Counts {
        let mut c = Counts::default();
        for case in &run.cases {
            c.add(case.outcome);
        }
        c
    }

    /// Add one outcome.
    pub fn add(&mut self, o: Outcome) {
        self.total += 1;
        *self.get_mut(o) += 1;
    }

    fn get_mut(&mut self, o: Outcome) -> &mut usize {
        match o {
            Outcome::Pass => &mut self.pass,
            Outcome::Fail => &mut self.fail,
            Outcome::Infra => &mut self.infra,
            Outcome::Timeout => &mut self.timeout,
            Outcome::Flaky => &mut self.flaky,
            Outcome::Skipped => &mut self.skipped,
        }
    }

    /// Count of one outcome.
    pub fn get(&self, o: Outcome) -> usize {
        match o {
            Outcome::Pass => self.pass,
            Outcome::Fail => self.fail,
            Outcome::Infra => self.infra,
            Outcome::Timeout => self.timeout,
            Outcome::Flaky => self.flaky,
            Outcome::Skipped => self.skipped,
        }
    }
}

impl Run {
    /// Wall time of the run, milliseconds (0 if the clock went backwards).
    pub fn duration_ms(&self) -> u64 {
        self.finished_ms.saturating_sub(self.started_ms)
    }

    /// Counts by outcome.
    pub fn counts(&self) -> Counts {
        Counts::of(self)
    }

    /// Did the run end green for CI: no FAIL, TIMEOUT or INFRA.
    pub fn is_green(&self) -> bool {
        self.cases
            .iter()
            .all(|c| !c.outcome.is_failure() && c.outcome != Outcome::Infra)
    }

    /// Look a case up by id.
    pub fn case(&self, id: &str) -> Option<&CaseResult> {
        self.cases.iter().find(|c| c.id == id)
    }

    /// Check invariants: known schema, unique non-empty case ids.
    pub fn validate(&self) -> std::result::Result<(), crate::error::InvalidRun> {
        use crate::error::InvalidRun;
        if self.schema > SCHEMA_VERSION {
            return Err(InvalidRun::Schema {
                found: self.schema,
                supported: SCHEMA_VERSION,
            });
        }
        let mut seen = BTreeSet::new();
        for (index, c) in self.cases.iter().enumerate() {
            if c.id.is_empty() {
                return Err(InvalidRun::EmptyId {
                    index,
                    attack: c.attack.clone(),
                });
            }
            if !seen.insert(c.id.as_str()) {
                return Err(InvalidRun::DuplicateId(c.id.clone()));
            }
        }
        Ok(())
    }

    /// Parse a run from JSON text; `origin` names the source in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<Run> {
        // A `report.json` (`{ report_schema, summary, diff, run }`) carries the
        // run whole: read it from there (people hand `hilrig report` either file).
        #[derive(Deserialize)]
        struct ReportProbe {
            #[serde(rename = "report_schema")]
            _report_schema: u32,
            run: serde_json::Value,
        }
        if let Ok(ReportProbe { run, .. }) = serde_json::from_str::<ReportProbe>(text) {
            if run.is_object() {
                let inner = run.to_string();
                return Run::from_json(&inner, origin);
            }
        }
        // Look at the schema first so a newer file gets the upgrade message rather
        // than a confusing field error.
        #[derive(Deserialize)]
        struct Probe {
            #[serde(default)]
            schema: Option<u32>,
        }
        if let Ok(Probe {
            schema: Some(found),
        }) = serde_json::from_str::<Probe>(text)
        {
            if found > SCHEMA_VERSION {
                return Err(Error::Schema {
                    path: origin.to_path_buf(),
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
        }
        let run: Run = serde_json::from_str(text).map_err(|e| Error::Parse {
            path: origin.to_path_buf(),
            line: e.line(),
            column: e.column(),
            source: e,
        })?;
        run.validate().map_err(|reason| Error::Invalid {
            path: origin.to_path_buf(),
            reason,
        })?;
        Ok(run)
    }

    /// Load a run file.
    pub fn load(path: &Path) -> Result<Run> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            what: "reading",
            path: path.to_path_buf(),
            source,
        })?;
        Run::from_json(&text, path)
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::Encode {
            what: "run JSON",
            reason: e.to_string(),
        })
    }

    /// Save atomically (temporary file in the same directory, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::write_atomic(path, self.to_json()?.as_bytes())
    }
}

//! The JSON report: the run itself plus summary counts, statistics and the diff.

use crate::diff::{host_flake_rates, HostFlake, RunDiff};
use crate::error::{Error, Result};
use crate::model::{Counts, Run};
use crate::stats::{self, Summary};
use serde::{Deserialize, Serialize};

/// Schema of `report.json`.
pub const REPORT_SCHEMA: u32 = 1;

/// Summary of a run: counts and the main statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Counts by outcome.
    pub counts: Counts,
    /// No FAIL, TIMEOUT or INFRA.
    pub green: bool,
    /// Run wall time, milliseconds.
    pub duration_ms: u64,
    /// Host names.
    pub hosts: Vec<String>,
    /// Alarms over all cases.
    pub alarms: u64,
    /// MMIO trap latency, microseconds (all cases merged).
    pub trap_latency_us: Option<Summary>,
    /// MMIO trap latency per device backend, microseconds.
    pub trap_latency_by_backend_us: std::collections::BTreeMap<String, Summary>,
    /// Live-patch blackouts, microseconds.
    pub blackout_us: Option<Summary>,
    /// Teardown times, microseconds.
    pub teardown_us: Option<Summary>,
    /// Per-host flake rates (with the previous run's, when diffed).
    pub host_flake_rates: Vec<HostFlake>,
}

impl RunSummary {
    /// Summarise a run (and take the flake rates from the diff when there is one).
    pub fn of(run: &Run, diff: Option<&RunDiff>) -> RunSummary {
        let trap = stats::merged_trap_latency(run);
        let blackouts: Vec<f64> = run
            .cases
            .iter()
            .flat_map(|c| c.metrics.blackouts_us.iter().copied())
            .collect();
        let teardowns: Vec<f64> = run
            .cases
            .iter()
            .flat_map(|c| c.metrics.teardown_us.iter().copied())
            .collect();
        RunSummary {
            counts: run.counts(),
            green: run.is_green(),
            duration_ms: run.duration_ms(),
            hosts: run.hosts.iter().map(|h| h.name.clone()).collect(),
            alarms: run.cases.iter().map(|c| c.metrics.alarms).sum(),
            trap_latency_us: trap.summary(),
            trap_latency_by_backend_us: stats::trap_latency_by_backend(run)
                .into_iter()
                .filter_map(|(k, m)| m.summary().map(|s| (k, s)))
                .collect(),
            blackout_us: Summary::of(&blackouts),
            teardown_us: Summary::of(&teardowns),
            host_flake_rates: match diff {
                Some(d) => d.host_flake_rates.clone(),
                None => host_flake_rates(run),
            },
        }
    }
}

/// `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonReport {
    /// [`REPORT_SCHEMA`].
    pub report_schema: u32,
    /// Summary.
    pub summary: RunSummary,
    /// The diff against the previous run, if one was given.
    pub diff: Option<RunDiff>,
    /// The run, unchanged.
    pub run: Run,
}

/// Build the JSON report.
pub fn to_json_report(run: &Run, diff: Option<&RunDiff>) -> JsonReport {
    JsonReport {
        report_schema: REPORT_SCHEMA,
        summary: RunSummary::of(run, diff),
        diff: diff.cloned(),
        run: run.clone(),
    }
}

/// Render the JSON report as pretty text.
pub fn to_json(run: &Run, diff: Option<&RunDiff>) -> Result<String> {
    serde_json::to_string_pretty(&to_json_report(run, diff)).map_err(|e| Error::Encode {
        what: "JSON report",
        reason: e.to_string(),
    })
}

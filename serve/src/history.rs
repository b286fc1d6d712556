//! A case's history over N nights: the one function behind the history page,
//! `GET /api/history` and `hilrig runs history`.

use hilrig_campaigns::store::{Store, StoreError};
use hilrig_reports::{Artifact, Outcome};
use serde::Serialize;

/// One night of a case.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Night {
    /// The run.
    pub run_id: String,
    /// Its campaign.
    pub campaign: String,
    /// Run start, unix ms.
    pub started_ms: u64,
    /// The case's outcome that night.
    pub outcome: Outcome,
    /// The host it ended on.
    pub host: String,
    /// Time on hosts, ms.
    pub duration_ms: u64,
    /// Attempts made.
    pub attempts: usize,
    /// The case's message.
    pub message: String,
    /// Artifact paths, relative to the run directory.
    pub artifacts: Vec<Artifact>,
    /// The build that ran the case's last attempt (SHA-256 of the VMM
    /// executable), when the run recorded it.
    #[serde(default)]
    pub build: Option<String>,
}

/// Where a case changed from passing to failing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// The last night it passed before the current failing streak (None: it
    /// failed on every night shown).
    pub last_good: Option<Night>,
    /// The first night of the current failing streak.
    pub first_bad: Night,
}

/// A case over its last nights, newest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaseHistory {
    /// The case id.
    pub case_id: String,
    /// How many nights were asked for.
    pub nights_asked: usize,
    /// Newest first.
    pub nights: Vec<Night>,
    /// FLAKY nights over nights that ran (not SKIPPED).
    pub flake_rate: f64,
    /// FAIL or TIMEOUT nights over nights that ran.
    pub fail_rate: f64,
    /// Counts per outcome.
    pub counts: std::collections::BTreeMap<String, usize>,
    /// Set when the newest night fails: since when, and the runs either side.
    pub change: Option<Change>,
}

fn failing(o: Outcome) -> bool {
    matches!(o, Outcome::Fail | Outcome::Timeout)
}

fn good(o: Outcome) -> bool {
    matches!(o, Outcome::Pass | Outcome::Flaky)
}

/// The history of `case_id` over its last `nights` runs.
pub fn case_history(
    store: &mut Store,
    case_id: &str,
    nights: usize,
) -> Result<CaseHistory, StoreError> {
    // Only the fields a history shows are parsed (the metrics, the bulk of a
    // stored case, are skipped).
    #[derive(serde::Deserialize)]
    struct Brief {
        outcome: Outcome,
        #[serde(default)]
        host: String,
        #[serde(default)]
        duration_ms: u64,
        #[serde(default)]
        attempts: Vec<BriefAttempt>,
        #[serde(default)]
        message: String,
        #[serde(default)]
        artifacts: Vec<Artifact>,
    }
    #[derive(serde::Deserialize)]
    struct BriefAttempt {
        #[serde(default)]
        build: Option<String>,
    }
    let rows = store.case_history_json(case_id, nights)?;
    let mut nights_v = Vec::with_capacity(rows.len());
    for (run, json) in rows {
        let b: Brief = serde_json::from_str(&json).map_err(|e| StoreError::Data {
            db: "results store".into(),
            what: format!("case {case_id} of run {} is corrupt: {e}", run.id),
        })?;
        nights_v.push(Night {
            run_id: run.id,
            campaign: run.campaign,
            started_ms: run.started_ms,
            outcome: b.outcome,
            host: b.host,
            duration_ms: b.duration_ms,
            attempts: b.attempts.len(),
            build: b.attempts.last().and_then(|a| a.build.clone()),
            message: b.message,
            artifacts: b.artifacts,
        });
    }
    Ok(summarize(case_id, nights, nights_v))
}

/// The rates and the change point of nights (newest first).
pub fn summarize(case_id: &str, asked: usize, nights: Vec<Night>) -> CaseHistory {
    let mut counts = std::collections::BTreeMap::new();
    for n in &nights {
        *counts.entry(n.outcome.as_str().to_string()).or_insert(0) += 1;
    }
    let ran = nights
        .iter()
        .filter(|n| n.outcome != Outcome::Skipped)
        .count();
    let rate = |f: &dyn Fn(Outcome) -> bool| {
        if ran == 0 {
            0.0
        } else {
            nights.iter().filter(|n| f(n.outcome)).count() as f64 / ran as f64
        }
    };
    let flake_rate = rate(&|o| o == Outcome::Flaky);
    let fail_rate = rate(&failing);
    // The current failing streak: from the newest night back to the last good one
    // (INFRA and SKIPPED nights say nothing either way and are stepped over).
    let mut change = None;
    if nights.first().is_some_and(|n| failing(n.outcome)) {
        let mut first_bad = 0;
        let mut last_good = None;
        for (i, n) in nights.iter().enumerate() {
            if failing(n.outcome) {
                first_bad = i;
            } else if good(n.outcome) {
                last_good = Some(i);
                break;
            }
        }
        change = Some(Change {
            last_good: last_good.map(|i| nights[i].clone()),
            first_bad: nights[first_bad].clone(),
        });
    }
    CaseHistory {
        case_id: case_id.to_string(),
        nights_asked: asked,
        nights,
        flake_rate,
        fail_rate,
        counts,
        change,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn night(i: u64, o: Outcome) -> Night {
        Night {
            run_id: format!("r{i}"),
            campaign: "c".into(),
            started_ms: i,
            outcome: o,
            host: "h".into(),
            duration_ms: 1,
            attempts: 1,
            message: String::new(),
            artifacts: vec![],
            build: None,
        }
    }

    #[test]
    fn the_change_point_steps_over_infra() {
        use Outcome::*;
        // Newest first: fail, infra, fail, pass, fail.
        let n = vec![
            night(5, Fail),
            night(4, Infra),
            night(3, Timeout),
            night(2, Pass),
            night(1, Fail),
        ];
        let h = summarize("x", 5, n);
        let c = h.change.unwrap();
        assert_eq!(c.first_bad.run_id, "r3");
        assert_eq!(c.last_good.unwrap().run_id, "r2");
        assert!((h.fail_rate - 0.6).abs() < 1e-9);
        let h = summarize("x", 2, vec![night(2, Pass), night(1, Flaky)]);
        assert!(h.change.is_none());
        assert!((h.flake_rate - 0.5).abs() < 1e-9);
        assert_eq!(summarize("x", 0, vec![]).flake_rate, 0.0);
    }
}

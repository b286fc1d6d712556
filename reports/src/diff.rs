//! Run-to-run diff by case id: what regressed since the previous run of a campaign.

use crate::model::{Outcome, Run};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A case whose verdict is compared between two runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseChange {
    /// Case id.
    pub id: String,
    /// Verdict in the previous run (`None`: the case is new).
    pub prev: Option<Outcome>,
    /// Verdict in this run (`None`: the case is gone).
    pub cur: Option<Outcome>,
    /// This run's message (or the previous one's for a removed case).
    pub message: String,
}

/// Flake rate of one host in both runs: flaky cases / cases that ran there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostFlake {
    /// Host name.
    pub host: String,
    /// Cases that ran on the host in this run (not skipped, not infra).
    pub ran: usize,
    /// Of those, flaky.
    pub flaky: usize,
    /// Attempts that hit an infrastructure fault on this host in this run.
    pub infra_attempts: usize,
    /// `flaky / ran` in this run (0 if nothing ran).
    pub rate: f64,
    /// Same rate in the previous run (`None`: the host did not take part).
    pub prev_rate: Option<f64>,
}

/// The difference between two runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunDiff {
    /// Previous run id.
    pub prev_id: String,
    /// This run id.
    pub cur_id: String,
    /// Both runs are of the same campaign (a diff across campaigns is of little use).
    pub same_campaign: bool,
    /// Failing (FAIL/TIMEOUT) now, not failing before (or new case).
    pub new_failures: Vec<CaseChange>,
    /// Failing before, passing (PASS/FLAKY) now.
    pub fixed: Vec<CaseChange>,
    /// Failing in both.
    pub still_failing: Vec<CaseChange>,
    /// FLAKY now (whatever before).
    pub flaky: Vec<CaseChange>,
    /// INFRA now (the rig, not the code under test).
    pub infra: Vec<CaseChange>,
    /// In this run only (with its verdict).
    pub added: Vec<CaseChange>,
    /// In the previous run only.
    pub removed: Vec<CaseChange>,
    /// Per-host flake rates, by host name.
    pub host_flake_rates: Vec<HostFlake>,
}

impl RunDiff {
    /// Nothing got worse: no new failures.
    pub fn no_regressions(&self) -> bool {
        self.new_failures.is_empty()
    }
}

#[derive(Default)]
struct HostTally {
    ran: usize,
    flaky: usize,
    infra_attempts: usize,
}

fn host_tallies(run: &Run) -> BTreeMap<String, HostTally> {
    let mut m: BTreeMap<String, HostTally> = BTreeMap::new();
    for h in &run.hosts {
        m.entry(h.name.clone()).or_default();
    }
    for c in &run.cases {
        if c.outcome.ran() {
            let t = m.entry(c.host.clone()).or_default();
            t.ran += 1;
            if c.outcome == Outcome::Flaky {
                t.flaky += 1;
            }
        }
        for a in &c.attempts {
            if a.outcome == Outcome::Infra {
                m.entry(a.host.clone()).or_default().infra_attempts += 1;
            }
        }
    }
    m
}

fn rate(t: &HostTally) -> f64 {
    if t.ran == 0 {
        0.0
    } else {
        t.flaky as f64 / t.ran as f64
    }
}

/// Compare `cur` against `prev` by case id.
pub fn diff(prev: &Run, cur: &Run) -> RunDiff {
    let prev_by_id: BTreeMap<&str, _> = prev.cases.iter().map(|c| (c.id.as_str(), c)).collect();
    let cur_by_id: BTreeMap<&str, _> = cur.cases.iter().map(|c| (c.id.as_str(), c)).collect();
    let mut d = RunDiff {
        prev_id: prev.id.clone(),
        cur_id: cur.id.clone(),
        same_campaign: prev.campaign == cur.campaign,
        new_failures: vec![],
        fixed: vec![],
        still_failing: vec![],
        flaky: vec![],
        infra: vec![],
        added: vec![],
        removed: vec![],
        host_flake_rates: vec![],
    };
    for (id, c) in &cur_by_id {
        let p = prev_by_id.get(id).map(|p| p.outcome);
        let change = CaseChange {
            id: id.to_string(),
            prev: p,
            cur: Some(c.outcome),
            message: c.message.clone(),
        };
        let was_failing = p.is_some_and(Outcome::is_failure);
        if c.outcome.is_failure() {
            if was_failing {
                d.still_failing.push(change.clone());
            } else {
                d.new_failures.push(change.clone());
            }
        } else if c.outcome.is_success() && was_failing {
            d.fixed.push(change.clone());
        }
        match c.outcome {
            Outcome::Flaky => d.flaky.push(change.clone()),
            Outcome::Infra => d.infra.push(change.clone()),
            _ => {}
        }
        if p.is_none() {
            d.added.push(change);
        }
    }
    for (id, p) in &prev_by_id {
        if !cur_by_id.contains_key(id) {
            d.removed.push(CaseChange {
                id: id.to_string(),
                prev: Some(p.outcome),
                cur: None,
                message: p.message.clone(),
            });
        }
    }
    let prev_hosts = host_tallies(prev);
    for (host, t) in host_tallies(cur) {
        d.host_flake_rates.push(HostFlake {
            rate: rate(&t),
            prev_rate: prev_hosts.get(&host).map(rate),
            host,
            ran: t.ran,
            flaky: t.flaky,
            infra_attempts: t.infra_attempts,
        });
    }
    d
}

/// Per-host flake rates of a single run (no previous run to compare with).
pub fn host_flake_rates(run: &Run) -> Vec<HostFlake> {
    host_tallies(run)
        .into_iter()
        .map(|(host, t)| HostFlake {
            rate: rate(&t),
            prev_rate: None,
            host,
            ran: t.ran,
            flaky: t.flaky,
            infra_attempts: t.infra_attempts,
        })
        .collect()
}

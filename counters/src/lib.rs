//! hilrig-counters: counter semantics and verdicts.
//!
//! This crate will hold the attestation service (issue 5). It starts with the
//! comparison every verdict is built on: expected counters against actual ones.
#![deny(missing_docs)]

use hilrig_device::oob::CounterReport;
use serde::Serialize;

/// The outcome of comparing a device's counters with what was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Counters equal the expected values.
    Trusted,
    /// Counters advanced: updates happened that must be checked against the catalog.
    Changed,
    /// A counter is lower than expected within the same epoch: tampering or a
    /// restored state file.
    RolledBack,
    /// The fuse is blown: the device is locked for good; page a human.
    Locked,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Trusted => "trusted",
            Verdict::Changed => "changed",
            Verdict::RolledBack => "rolled-back",
            Verdict::Locked => "locked",
        })
    }
}

/// Compare actual counters with expected ones. Rollback is checked first (counters
/// never go backwards, and a lower MASTER or EPOCH is a rollback too), then the fuse.
pub fn compare(expected: &CounterReport, actual: &CounterReport) -> (Verdict, Vec<String>) {
    let mut reasons = Vec::new();
    if actual.epoch < expected.epoch {
        reasons.push(format!(
            "epoch {} < expected {}",
            actual.epoch, expected.epoch
        ));
    }
    if actual.master < expected.master {
        reasons.push(format!(
            "master {} < expected {}",
            actual.master, expected.master
        ));
    }
    if actual.epoch == expected.epoch {
        for (i, (a, e)) in actual.counters.iter().zip(&expected.counters).enumerate() {
            if a < e {
                let r = hilrig_device::Region::ALL[i];
                reasons.push(format!("{r} counter {a} < expected {e}"));
            }
        }
    }
    if !reasons.is_empty() {
        return (Verdict::RolledBack, reasons);
    }
    if actual.fuse {
        return (Verdict::Locked, vec!["fuse blown".into()]);
    }
    if actual == expected {
        return (Verdict::Trusted, vec![]);
    }
    for (i, (a, e)) in actual.counters.iter().zip(&expected.counters).enumerate() {
        if a != e {
            let r = hilrig_device::Region::ALL[i];
            reasons.push(format!("{r} counter {e} -> {a}"));
        }
    }
    if actual.epoch != expected.epoch {
        reasons.push(format!("epoch {} -> {}", expected.epoch, actual.epoch));
    }
    (Verdict::Changed, reasons)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(c: [u32; 3], epoch: u32, fuse: bool) -> CounterReport {
        CounterReport {
            counters: c,
            master: c.iter().sum(),
            fuse,
            slots_left: 0,
            width: 8,
            epoch,
        }
    }

    #[test]
    fn verdicts() {
        let e = rep([1, 2, 0], 0, false);
        assert_eq!(compare(&e, &e).0, Verdict::Trusted);
        assert_eq!(compare(&e, &rep([1, 3, 0], 0, false)).0, Verdict::Changed);
        assert_eq!(
            compare(&e, &rep([1, 1, 0], 0, false)).0,
            Verdict::RolledBack
        );
        assert_eq!(compare(&e, &rep([8, 2, 0], 0, true)).0, Verdict::Locked);
        let mut after_reset = rep([0, 0, 0], 1, false);
        after_reset.master = 3;
        assert_eq!(compare(&e, &after_reset).0, Verdict::Changed);
    }
}

//! hilrig-counters: the counters attestation service.
//!
//! - [`compare`]: the bare comparison of expected and actual counters;
//! - [`decide`]: the full verdict decision (counters, images, catalog, intents);
//! - [`store`]: the database (SQLite or PostgreSQL) with schema migrations and a MAC
//!   on every row;
//! - [`anchor`]: the history chain head's anchor outside the database (a file or a
//!   second database);
//! - [`bulk`]: bulk enrolment from a JSON-lines or CSV file;
//! - [`service`]: enrol, catalog, verify, authorised updates, history, master sums,
//!   the VMM cross-check;
//! - [`source`]: where observations come from (OOB serial port, model state file,
//!   any in-process device);
//! - [`conformance`]: the vendor conformance suite;
//! - [`cli`]: the `hilrig counters ...` subcommands.
//!
//! The benchmark (`hilrig bench counters`) is in the `hilrig-bench` crate.
#![deny(missing_docs)]

pub mod anchor;
pub mod bulk;
pub mod cli;
pub mod conformance;
pub mod crash;
pub mod decide;
mod error;
pub mod mac;
pub mod remediate;
pub mod service;
pub mod source;
pub mod store;

pub use cli::{run, CountersCmd};
pub use decide::{decide, Decision, DeviceState, Expected, Observation, Severity};
pub use error::{Error, Result};
pub use service::Service;

use hilrig_device::oob::CounterReport;

pub use hilrig_device::attest::Verdict;

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

    #[test]
    fn verdict_names_round_trip() {
        for v in Verdict::ALL {
            assert_eq!(Verdict::parse(&v.to_string()), Some(v));
            let j = serde_json::to_string(&v).unwrap_or_default();
            assert_eq!(j, format!("\"{v}\""));
        }
        assert_eq!(Verdict::parse("nope"), None);
    }
}

//! The attack library: attack name -> how to run it (device setup, one or more
//! `hilrig-vmm` steps with their flags) and the outcome expected by default per
//! policy profile. Campaign files override expectations field by field.

use crate::format::{Expect, Verdict};
use std::collections::BTreeMap;

/// How the device state file is prepared before the first step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// A factory-fresh device (the state the VMM would create itself).
    Factory,
    /// A factory device whose VBIOS region was overwritten with a well-formed
    /// expansion ROM that no catalog knows (simulation-only attack: direct flash).
    ForeignVbios,
}

/// One `hilrig-vmm` invocation of an attack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Built-in payload name (`--payload`).
    pub payload: &'static str,
    /// Extra VMM flags.
    pub flags: &'static [&'static str],
}

/// An attack of the library.
#[derive(Debug, Clone)]
pub struct Attack {
    /// Name used in campaign files.
    pub name: &'static str,
    /// One line: what it does.
    pub summary: String,
    /// Library group (`restricted`, `pci`, `teardown`, `vbios`).
    pub group: &'static str,
    /// Device preparation.
    pub setup: Setup,
    /// Steps, in order, on the same device state file. Every step but the last must
    /// pass (exit 0); the expectation applies to the last.
    pub steps: Vec<Step>,
}

const TEARDOWN: &[&str] = &["--teardown-on-exit"];
/// canary-scan walks all guest RAM; 16 MiB keeps it fast (the canary lies below).
const RESIDUE: &[&str] = &["--teardown-on-exit", "--mem", "16M"];

/// Every attack of the library.
pub fn library() -> Vec<Attack> {
    let mut v = Vec::new();
    for (name, what) in hilrig_vmm::attacks::ATTACKS {
        v.push(Attack {
            name,
            summary: format!("restricted registers: {what}"),
            group: "restricted",
            setup: Setup::Factory,
            steps: vec![Step {
                payload: name,
                flags: TEARDOWN,
            }],
        });
    }
    v.push(Attack {
        name: "pci-enum",
        summary: "enumerate PCI bus 0, size BAR0 and the ROM, read both".into(),
        group: "pci",
        setup: Setup::Factory,
        steps: vec![Step {
            payload: "pci-enum",
            flags: TEARDOWN,
        }],
    });
    v.push(Attack {
        name: "teardown-residue",
        summary: "canary-write (with secure teardown), then canary-scan on the same device state: no canary may survive".into(),
        group: "teardown",
        setup: Setup::Factory,
        steps: vec![
            Step {
                payload: "canary-write",
                flags: RESIDUE,
            },
            Step {
                payload: "canary-scan",
                flags: RESIDUE,
            },
        ],
    });
    v.push(Attack {
        name: "vbios-overwrite",
        summary: "flash a well-formed but non-catalog VBIOS into the state file; the VMM must refuse the device (exit 10)".into(),
        group: "vbios",
        setup: Setup::ForeignVbios,
        steps: vec![Step {
            payload: "pci-enum",
            flags: &[],
        }],
    });
    v
}

/// The attack `name`, if the library has it.
pub fn find(name: &str) -> Option<Attack> {
    library().into_iter().find(|a| a.name == name)
}

/// Names of the attacks in `group` (for `attacks = ["@restricted"]`).
pub fn group(group: &str) -> Vec<&'static str> {
    library()
        .into_iter()
        .filter(|a| a.group == group)
        .map(|a| a.name)
        .collect()
}

fn zero_delta() -> BTreeMap<String, u64> {
    ["vbios", "firmware", "config", "master"]
        .into_iter()
        .map(|r| (r.to_string(), 0))
        .collect()
}

/// What the library expects of `attack` under `profile` with enforcement `enforce`.
pub fn default_expect(attack: &Attack, profile: &str, enforce: bool) -> Expect {
    let mut e = Expect {
        verdict: Some(Verdict::Pass),
        ..Expect::default()
    };
    match attack.group {
        "restricted" => {
            e.teardown_complete = Some(true);
            if profile == "tenant" {
                // Every attack touches a register the tenant may not: alarmed.
                e.alarms = Some(crate::format::AlarmExp::Some);
                if enforce {
                    // Blocked: the device saw none of it.
                    e.counter_delta = Some(zero_delta());
                    e.counters_verdict = Some("trusted".into());
                    e.service_verdict = Some("trusted".into());
                }
            } else if attack.name != "attack-flash-program" {
                e.counter_delta = Some(zero_delta());
            }
        }
        "pci" | "teardown" => {
            e.teardown_complete = Some(true);
            e.counter_delta = Some(zero_delta());
            e.counters_verdict = Some("trusted".into());
            e.service_verdict = Some("trusted".into());
        }
        "vbios" => {
            // Refused before any guest ran: the device is as it was enrolled.
            e.verdict = Some(Verdict::Refused);
            e.counter_delta = Some(zero_delta());
            e.service_verdict = Some("trusted".into());
        }
        _ => {}
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_payloads_exist_in_the_vmm() {
        let builtins: Vec<&str> = hilrig_vmm::payload::BUILTINS.iter().map(|b| b.0).collect();
        for a in library() {
            for s in &a.steps {
                assert!(
                    builtins.contains(&s.payload)
                        || hilrig_vmm::attacks::attack(s.payload).is_some(),
                    "{}: payload {} unknown to the VMM",
                    a.name,
                    s.payload
                );
            }
            assert!(!a.steps.is_empty());
        }
        assert!(group("restricted").len() >= 10);
        assert!(find("vbios-overwrite").is_some());
        assert!(find("nope").is_none());
    }
}

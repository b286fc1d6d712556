//! The attack library: attack name -> how to run it (device setup, one or more
//! `hilrig-vmm` steps with their flags) and the outcome expected by default per
//! policy profile. Campaign files override expectations field by field.

use crate::expect::{Counter, Expect, Verdict};
use hilrig_device::attest::Verdict as CountersVerdict;
use hilrig_vmm_api::ExitStatus;
use std::collections::BTreeMap;

/// How the device state file is prepared before the first step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// A factory-fresh device (the state the VMM would create itself).
    Factory,
    /// A factory device whose VBIOS region was overwritten with a well-formed
    /// expansion ROM that no catalog knows (simulation-only attack: direct flash).
    ForeignVbios,
    /// A factory device with this counter width (a small budget, to reach the fuse),
    /// whatever the host's device has.
    Width(u8),
}

pub use hilrig_guest::scenario::Gen;

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Run the VMM with the built-in or attack payload `Step::payload`.
    Vmm,
    /// Run the VMM with a generated payload.
    Gen(Gen),
    /// Keep a copy of the device state file (the rollback attack's "old state").
    Snapshot,
    /// Put the copy back over the state file (only a simulation allows this).
    Restore,
    /// Ask the counters service for a verdict now; it must be this one.
    Verify(CountersVerdict),
    /// Forged and malformed requests on the device's OOB port: each must be
    /// answered with an error frame, and the counters must not move.
    OobForge,
    /// An authorised update as the rig does it: the image the `Gen` sequence
    /// produces is added to the catalog and the intent recorded before flashing.
    BeginUpdate(Gen),
    /// Run the VMM with the generated sequence and cut its power (SIGKILL) once the
    /// guest has announced `cut_after` steps on its console; then check that no
    /// counted attempt was lost.
    PowerCut {
        /// The program sequence.
        gen: Gen,
        /// Steps the guest must have finished before the cut.
        cut_after: u32,
    },
    /// A signed policy patch through the control socket while the guest storms
    /// trapped MMIO; blackouts are measured; then teardown over the socket.
    PatchStorm,
    /// Bad signature, tampered payload, wrong build, same and older version,
    /// truncated bundle: each refused with its reason, the VM serving on unchanged.
    BadBundles,
    /// A fleet of VMMs, one of which does not trust the signing key, patched by
    /// `hilrig_vmm::rollout` (canary 1, waves of 2): the rollout must stop at the
    /// bad host's wave, hosts before it patched, hosts after it untouched.
    Rollout,
}

/// Attacks that need the operator's rights (the flash controller) to mean anything.
pub const OPERATOR_ONLY: &[&str] = &["operator"];

/// How a step's VMM runs, beyond the case's device, profile and timeouts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepVm {
    /// Tear the tenant down when the VM exits (the record is kept as an artifact).
    pub teardown: bool,
    /// Guest RAM in bytes (None: the VMM's default).
    pub mem: Option<u64>,
}

impl StepVm {
    /// Apply to a VMM spec.
    pub fn apply(&self, spec: &mut hilrig_vmm_api::VmSpec) {
        spec.teardown_on_exit = self.teardown;
        if let Some(m) = self.mem {
            spec.mem = m;
        }
    }
}

/// One `hilrig-vmm` invocation of an attack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Built-in payload name (`--payload`).
    pub payload: &'static str,
    /// How the VMM runs.
    pub vm: StepVm,
    /// What the step does.
    pub kind: StepKind,
}

impl Step {
    /// A VMM step with a built-in payload.
    pub const fn vmm(payload: &'static str, vm: StepVm) -> Step {
        Step {
            payload,
            vm,
            kind: StepKind::Vmm,
        }
    }

    /// A step that is not a VMM run with a built-in payload (`label` names its files).
    pub const fn of(label: &'static str, kind: StepKind) -> Step {
        Step {
            payload: label,
            vm: TEARDOWN,
            kind,
        }
    }
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
    /// Profiles the attack can be run under (empty: any).
    pub profiles: &'static [&'static str],
    /// Timing-sensitive: by default the case runs alone on the machine (the
    /// simulated hosts share its CPUs), see `CaseSpec::exclusive`.
    pub exclusive: bool,
}

const TEARDOWN: StepVm = StepVm {
    teardown: true,
    mem: None,
};
/// canary-scan walks all guest RAM; 16 MiB keeps it fast (the canary lies below).
const RESIDUE: StepVm = StepVm {
    teardown: true,
    mem: Some(16 << 20),
};
/// No teardown (the device is refused before any guest runs).
const PLAIN: StepVm = StepVm {
    teardown: false,
    mem: None,
};

/// Every attack of the library.
pub fn library() -> Vec<Attack> {
    let mut v = Vec::new();
    for (name, what) in hilrig_vmm::attacks::ATTACKS {
        v.push(Attack {
            name,
            summary: format!("restricted registers: {what}"),
            group: "restricted",
            setup: Setup::Factory,
            steps: vec![Step::vmm(name, TEARDOWN)],
            profiles: &[],
            exclusive: false,
        });
    }
    v.push(Attack {
        name: "pci-enum",
        summary: "enumerate PCI bus 0, size BAR0 and the ROM, read both".into(),
        group: "pci",
        setup: Setup::Factory,
        steps: vec![Step::vmm("pci-enum", TEARDOWN)],
        profiles: &[],
        exclusive: false,
    });
    v.push(Attack {
        name: "teardown-residue",
        summary: "canary-write (with secure teardown), then canary-scan on the same device state: no canary may survive".into(),
        group: "teardown",
        setup: Setup::Factory,
        steps: vec![
            Step::vmm("canary-write", RESIDUE),
            Step::vmm("canary-scan", RESIDUE),
        ],
        profiles: &[],
        exclusive: false,
    });
    v.push(Attack {
        name: "vbios-overwrite",
        summary: "flash a well-formed but non-catalog VBIOS into the state file; the VMM must refuse the device (exit 10)".into(),
        group: "vbios",
        setup: Setup::ForeignVbios,
        steps: vec![Step::vmm("pci-enum", PLAIN)],
        profiles: &[],
        exclusive: false,
    });
    v.extend(scenario_attacks());
    v
}

/// PROGRAM commands of the power-cut sequence and the step after which power is cut.
pub const POWER_CUT_PROGRAMS: u32 = 12;
/// See [`POWER_CUT_PROGRAMS`].
pub const POWER_CUT_AFTER: u32 = 5;
/// Default bound on a live-patch blackout. The design's target is well under a
/// millisecond, and patches measure 40-50 us here under the storm; but on this
/// shared 2-core host a vCPU preempted by other processes stretches it (2 ms seen
/// with the whole test suite running), so the default is a regression tripwire.
pub const DEFAULT_BLACKOUT_BOUND_US: u64 = 10_000;
/// Counter width of the fuse-exhaustion attack's device.
pub const FUSE_WIDTH: u8 = 4;

/// The attacks that are more than one payload: counter rollback (registers, OOB,
/// restored state file), power cut mid-sequence, fuse exhaustion, live patching.
fn scenario_attacks() -> Vec<Attack> {
    let a = |name, summary: &str, group, setup, steps, profiles| Attack {
        name,
        summary: summary.to_string(),
        group,
        setup,
        steps,
        profiles,
        exclusive: name == "patch-under-storm",
    };
    vec![
        a(
            "rollback-registers",
            "one counted attempt, then every word of the counters page written (0, 1, ~0, 0x80000000 at 4 and 8 bytes) and a soft reset: the guest sees the counters unchanged",
            "rollback",
            Setup::Factory,
            vec![Step::of("counter-writes", StepKind::Gen(Gen::CounterWrites))],
            &[],
        ),
        a(
            "rollback-oob",
            "two counted attempts, then forged PHYSICAL_RESETs (zero key, another device's key, one bit off) and malformed frames on the OOB port: every one refused, counters unchanged",
            "rollback",
            Setup::Factory,
            vec![
                Step::of("flash-attempts", StepKind::Gen(Gen::FlashAttempts(2))),
                Step::of("verify", StepKind::Verify(CountersVerdict::AcceptedUpdate)),
                Step::of("oob-forge", StepKind::OobForge),
            ],
            OPERATOR_ONLY,
        ),
        a(
            "rollback-state-file",
            "snapshot the device state, make two counted attempts (service: accepted-update), put the old state file back: the counters service must flag the rollback",
            "rollback",
            Setup::Factory,
            vec![
                Step::of("snapshot", StepKind::Snapshot),
                Step::of("flash-attempts", StepKind::Gen(Gen::FlashAttempts(2))),
                Step::of("verify", StepKind::Verify(CountersVerdict::AcceptedUpdate)),
                Step::of("restore", StepKind::Restore),
            ],
            OPERATOR_ONLY,
        ),
        a(
            "power-cut-program",
            "an authorised FIRMWARE update (catalog + intent), power cut after 5 of 12 PROGRAMs, boot again: no counted attempt lost, the service says needs-reflash",
            "power",
            Setup::Factory,
            vec![
                Step::of("begin-update", StepKind::BeginUpdate(Gen::ProgramSeq(POWER_CUT_PROGRAMS))),
                Step::of(
                    "program-cut",
                    StepKind::PowerCut {
                        gen: Gen::ProgramSeq(POWER_CUT_PROGRAMS),
                        cut_after: POWER_CUT_AFTER,
                    },
                ),
                Step::vmm("pci-enum", TEARDOWN),
            ],
            OPERATOR_ONLY,
        ),
        a(
            "fuse-exhaustion",
            "a device of counter width 4: 6 locked PROGRAM attempts (the fuse blows at the 4th), then a correct unlock and PROGRAM: refused, flash unchanged, service verdict locked",
            "fuse",
            Setup::Width(FUSE_WIDTH),
            vec![Step::of("fuse-burn", StepKind::Gen(Gen::FuseBurn(FUSE_WIDTH as u32 + 2)))],
            OPERATOR_ONLY,
        ),
        a(
            "patch-under-storm",
            "2 vCPUs storm trapped SCRATCH writes; a signed policy patch lands through the control socket, then 5 bare quiesces; blackouts measured; teardown over the socket",
            "patch",
            Setup::Factory,
            vec![Step::of("patch-storm", StepKind::PatchStorm)],
            &[],
        ),
        a(
            "patch-bad-bundles",
            "bundles with a foreign signature, a tampered payload, another VMM build, the same and an older version, truncated: each refused with its reason; the VM keeps serving, version unchanged, never paused",
            "patch",
            Setup::Factory,
            vec![Step::of("bad-bundles", StepKind::BadBundles)],
            &[],
        ),
        a(
            "patch-rollout-bad-host",
            "4 VMMs, the third does not trust the signing key; rollout canary 1 then waves of 2: stops in wave 1 at the bad host, hosts 1-2 patched, host 4 untouched",
            "patch",
            Setup::Factory,
            vec![Step::of("rollout", StepKind::Rollout)],
            &[],
        ),
    ]
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

fn zero_delta() -> BTreeMap<Counter, u64> {
    Counter::ALL.into_iter().map(|c| (c, 0)).collect()
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
                e.alarms = Some(crate::expect::AlarmExp::Some);
                if enforce {
                    // Blocked: the device saw none of it.
                    e.counter_delta = Some(zero_delta());
                    e.counters_verdict = Some(CountersVerdict::Trusted);
                    e.service_verdict = Some(CountersVerdict::Trusted);
                }
            } else if attack.name != "attack-flash-program" {
                e.counter_delta = Some(zero_delta());
            }
        }
        "pci" | "teardown" => {
            e.teardown_complete = Some(true);
            e.counter_delta = Some(zero_delta());
            e.counters_verdict = Some(CountersVerdict::Trusted);
            e.service_verdict = Some(CountersVerdict::Trusted);
        }
        "rollback" | "power" | "fuse" => {
            let reaches_flash = profile == "operator" || !enforce;
            let delta = |n: u64| {
                let mut d = zero_delta();
                d.insert(Counter::Firmware, n);
                d.insert(Counter::Master, n);
                d
            };
            match attack.name {
                "rollback-registers" => {
                    e.teardown_complete = Some(true);
                    e.flash_unchanged = Some(true);
                    if reaches_flash {
                        // The one counted attempt moved them; nothing lowered them.
                        e.counter_delta = Some(delta(1));
                        e.service_verdict = Some(CountersVerdict::AcceptedUpdate);
                    } else {
                        e.counter_delta = Some(zero_delta());
                        e.counters_verdict = Some(CountersVerdict::Trusted);
                        e.service_verdict = Some(CountersVerdict::Trusted);
                    }
                }
                "rollback-oob" => {
                    e.counter_delta = Some(delta(2));
                    e.fuse = Some(false);
                    e.flash_unchanged = Some(true);
                    // Re-baselined at the intermediate verify; the forgeries moved nothing.
                    e.service_verdict = Some(CountersVerdict::Trusted);
                }
                "rollback-state-file" => {
                    e.counter_delta = Some(zero_delta());
                    e.service_verdict = Some(CountersVerdict::RolledBack);
                }
                "power-cut-program" => {
                    e.teardown_complete = Some(true);
                    e.counters_verdict = Some(CountersVerdict::Trusted);
                    e.flash_unchanged = Some(false);
                    e.service_verdict = Some(CountersVerdict::NeedsReflash);
                }
                "fuse-exhaustion" => {
                    e.counter_delta = Some(delta(FUSE_WIDTH as u64));
                    e.fuse = Some(true);
                    e.flash_unchanged = Some(true);
                    e.service_verdict = Some(CountersVerdict::Locked);
                }
                _ => {}
            }
        }
        "patch" => {
            e.counter_delta = Some(zero_delta());
            e.service_verdict = Some(CountersVerdict::Trusted);
            e.flash_unchanged = Some(true);
            if attack.name != "patch-rollout-bad-host" {
                // Ended by a teardown over the control socket: STOPPED.
                e.verdict = None;
                e.exit_status = Some(ExitStatus::Stopped);
                e.teardown_complete = Some(true);
                e.counters_verdict = Some(CountersVerdict::Trusted);
            }
            if attack.name == "patch-under-storm" {
                e.blackout_max_us = Some(DEFAULT_BLACKOUT_BOUND_US);
            }
        }
        "vbios" => {
            // Refused before any guest ran: the device is as it was enrolled.
            e.verdict = Some(Verdict::Refused);
            e.counter_delta = Some(zero_delta());
            e.service_verdict = Some(CountersVerdict::Trusted);
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
        let builtins: Vec<&str> = hilrig_guest::BUILTINS.iter().map(|b| b.0).collect();
        for a in library() {
            for s in a.steps.iter().filter(|s| s.kind == StepKind::Vmm) {
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

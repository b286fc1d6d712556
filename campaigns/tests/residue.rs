//! The campaign's teardown-residue check can fail: its negative control.
//!
//! `teardown-residue` runs `canary-write` then `canary-scan` as two VMM processes on
//! the same device. On the model backend the device's data buffers stay where the
//! next process finds them (the device stays powered between tenants: a buffer file
//! beside the state file; the rtl backend's buffer RAM is kept there too), so the
//! check means something: run as the campaign runs
//! it, the case passes; the same case with the teardown step switched off finds the
//! canary and fails. (Needs /dev/kvm and the built VMM; skips loudly otherwise.)

use hilrig_campaigns::attempt::run_attempt;
use hilrig_campaigns::HostSpec;
use hilrig_reports::Outcome;
use std::path::{Path, PathBuf};

fn kvm_and_vmm() -> Option<PathBuf> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("SKIPPED: /dev/kvm not available");
        return None;
    }
    match hilrig_rig::sim::find_vmm(None) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("SKIPPED: hilrig-vmm not built ({e}); cargo build -p hilrig-vmm");
            None
        }
    }
}

#[test]
fn the_residue_check_finds_the_canary_without_teardown_and_not_with_it() {
    residue_check_can_fail("model");
}

/// The same on `rtl`: the RTL backend's buffer RAM is kept beside the state file
/// too (without it the next process starts with an empty RAM and the negative
/// control passes: the check could not fail).
#[test]
fn the_residue_check_can_fail_on_rtl_too() {
    residue_check_can_fail("rtl");
}

fn residue_check_can_fail(backend: &str) {
    let Some(vmm) = kvm_and_vmm() else { return };
    let hosts = HostSpec::sim(1);
    let camp = hilrig_campaigns::format::parse(
        &format!(
            r#"
name = "residue"
[defaults]
case_timeout = "120s"
step_timeout = "60s"
tags = ["sim"]
[[case]]
attacks = ["teardown-residue"]
backends = ["{backend}"]
profiles = ["tenant"]
"#
        ),
        Path::new("residue.toml"),
        &hosts,
    )
    .expect("campaign parses");
    let case = camp.cases[0].clone();
    assert!(
        case.attack.steps.iter().all(|s| s.vm.teardown),
        "the library case tears down after every step"
    );
    let mut skipped = case.clone();
    for s in &mut skipped.attack.steps {
        s.vm.teardown = false;
    }
    let t = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let run = |case: &hilrig_campaigns::Case, name: &str| {
        let dir = t.path().join(name);
        rt.block_on(run_attempt(case, &hosts[0], &vmm, &[], t.path(), &dir))
    };

    // Negative control: the same check, teardown skipped: the canary is found.
    let r = run(&skipped, "no-teardown");
    assert_eq!(
        r.outcome,
        Outcome::Fail,
        "{backend}: without teardown the scan must find the canary: {} | {}",
        r.message,
        r.observed
    );
    assert!(
        r.message.contains("code 14"),
        "found in the data buffers: {}",
        r.message
    );

    // As the campaign runs it: teardown scrubs, the next tenant finds nothing.
    let r = run(&case, "teardown");
    assert_eq!(
        r.outcome,
        Outcome::Pass,
        "{backend}: with teardown: {} | {}",
        r.message,
        r.observed
    );
}

//! The campaign's provisioning gate verifies the device against the values
//! enrolled when the rig prepared it, never re-enrolling it from its own current
//! values (issue 21 item 4). Real state files, a real SQLite service database.

use hilrig_campaigns::attest::{self, AttestError};
use hilrig_campaigns::format::HostSpec;
use hilrig_device::attest::Verdict;
use hilrig_device::model::ops;
use hilrig_device::{DeviceConfig, Model, NvState, Region};
use std::path::{Path, PathBuf};

fn host() -> HostSpec {
    HostSpec::sim(1).remove(0)
}

/// A prepared factory device, saved to `dir/state.bin`, and enrolled.
fn prepared(dir: &Path) -> (PathBuf, NvState) {
    let h = host();
    let nv =
        hilrig_fw::factory::device(DeviceConfig::with_width(h.counter_width), h.serial).unwrap();
    let state = dir.join("state.bin");
    nv.save(&state).unwrap();
    attest::enroll(dir, &h, &nv).unwrap();
    (state, nv)
}

fn attempt_behind_the_back(state: &Path) {
    let mut m = Model::open(state).unwrap();
    ops::erase(&mut m, Region::Firmware).unwrap();
}

#[test]
fn an_untouched_device_passes_the_gate() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _) = prepared(dir.path());
    attest::provision(dir.path(), &state, &host()).unwrap();
    // And again (the gate does not consume anything).
    attest::provision(dir.path(), &state, &host()).unwrap();
}

#[test]
fn counters_advanced_behind_the_service_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _) = prepared(dir.path());
    attempt_behind_the_back(&state);
    match attest::provision(dir.path(), &state, &host()) {
        Err(AttestError::NotTrusted { reasons, .. }) => {
            assert!(reasons.contains("no authorised update"), "{reasons}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn counters_rolled_back_after_enrolment_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = host();
    // The rig prepared (and enrolled) a device that had made one attempt ...
    let state = dir.path().join("state.bin");
    let fresh =
        hilrig_fw::factory::device(DeviceConfig::with_width(h.counter_width), h.serial).unwrap();
    let after = {
        // The enrolled values: the device after its attempt.
        let p = dir.path().join("after.bin");
        fresh.save(&p).unwrap();
        let mut m = Model::open(&p).unwrap();
        ops::erase(&mut m, Region::Firmware).unwrap();
        drop(m);
        NvState::load(&p).unwrap()
    };
    attest::enroll(dir.path(), &h, &after).unwrap();
    // ... but the device on the host is the older, factory state: rolled back.
    fresh.save(&state).unwrap();
    match attest::provision(dir.path(), &state, &h) {
        Err(AttestError::NotTrusted { verdict, .. }) => {
            assert_eq!(verdict, Verdict::RolledBack)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Held: still refused when the counters catch up again.
    attempt_behind_the_back(&state);
    assert!(matches!(
        attest::provision(dir.path(), &state, &h),
        Err(AttestError::NotTrusted { .. })
    ));
}

#[test]
fn a_device_never_enrolled_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = host();
    let nv =
        hilrig_fw::factory::device(DeviceConfig::with_width(h.counter_width), h.serial).unwrap();
    let state = dir.path().join("state.bin");
    nv.save(&state).unwrap();
    assert!(attest::provision(dir.path(), &state, &h).is_err());
}

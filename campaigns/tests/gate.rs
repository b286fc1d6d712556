//! The campaign's provisioning gate (issue 21.4): it verifies against the values
//! enrolled before the case with `require_intents`, so a device whose counters rose
//! with no committed intent between cases is refused — and stays refused (held for
//! review) until an operator clears the hold. The prepared device's random reset
//! key is handed to the counters service at enrolment (issue 16.7).

use hilrig_campaigns::attacks::Setup;
use hilrig_campaigns::{attest, runner, HostSpec};
use hilrig_device::model::{ops, Model};
use hilrig_device::Region;

#[test]
fn an_unrecorded_update_attempt_between_cases_is_refused_until_the_hold_is_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let host = HostSpec::sim(1).remove(0);
    let state = dir.path().join("state.bin");
    let nv = runner::prepare_state(Setup::Factory, &host, &state).unwrap();
    // Random, not the serial-derived development key.
    assert_ne!(nv.reset_key, hilrig_device::state::dev_keys(host.serial).1);
    attest::enroll(dir.path(), &host, &nv).unwrap();
    attest::provision(dir.path(), &state, &host).unwrap();
    // Someone erases the config region between cases, with no intent recorded.
    {
        let mut m = Model::open(&state).unwrap();
        ops::unlock(&mut m).unwrap();
        assert!(ops::erase(&mut m, Region::Config).unwrap().done());
    }
    for attempt in 1..=2 {
        let e = attest::provision(dir.path(), &state, &host)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not trusted") && e.contains("changed"),
            "gate {attempt}: {e}"
        );
    }
    // The counters service holds the prepared device's reset key, by serial.
    let key = hilrig_counters::mac::Key::load(&dir.path().join("counters.key")).unwrap();
    let mut svc =
        hilrig_counters::Service::open(&dir.path().join("counters.sqlite").to_string_lossy(), key)
            .unwrap();
    assert_eq!(svc.reset_key(host.serial).unwrap(), nv.reset_key);
    // An operator reviews it and clears the hold: admitted again.
    let mut src = hilrig_counters::source::DeviceSource::model_file(&state).unwrap();
    svc.hold_clear(host.serial, "test: the erase was ours", &mut src)
        .unwrap();
    drop(svc);
    attest::provision(dir.path(), &state, &host).unwrap();
}

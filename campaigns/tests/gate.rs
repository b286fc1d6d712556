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

/// Remediation at the campaign gate (issue 21 item 4): a device the gate refuses
/// as locked is paged to a human through the inventory's `[counters] page`
/// command (the page names the serial and the verdict on its standard input and
/// in its environment), and the refusal says it paged; a trusted device pages
/// nobody (negative control).
#[test]
fn a_locked_device_at_the_campaign_gate_pages_the_inventory_command() {
    let dir = tempfile::tempdir().unwrap();
    // The page command (no shell of ours: `sh -c` is the argv) records its
    // environment and its standard input beside `paged`.
    let paged = dir.path().join("paged.json");
    let record =
        r#"'printf "%s %s\n" "$HILRIG_PAGE_SERIAL" "$HILRIG_PAGE_VERDICT" > "$0.env"; cat > "$0"'"#;
    let inv = sim_lab(
        dir.path(),
        &format!(
            "[counters]\ndb = \"x.sqlite\"\nkey = \"x.key\"\npage = [\"/bin/sh\", \"-c\", {record}, \"{}\"]\n",
            paged.display()
        ),
    );
    // The runner's pager: the inventory's page command.
    let pager = runner::gate_pager(&inv).unwrap().expect("the page command");
    let host = HostSpec {
        counter_width: 4,
        ..HostSpec::sim(1).remove(0)
    };
    let state = dir.path().join("state.bin");
    let nv = runner::prepare_state(Setup::Factory, &host, &state).unwrap();
    attest::enroll(dir.path(), &host, &nv).unwrap();
    // Negative control: a trusted device passes and pages nobody.
    attest::provision_paging(dir.path(), &state, &host, Some(&pager)).unwrap();
    assert!(!paged.exists(), "a trusted device paged someone");
    // The VBIOS budget burnt until the fuse blows: locked.
    {
        let mut m = Model::open(&state).unwrap();
        for _ in 0..8 {
            let _ = ops::erase(&mut m, Region::Vbios);
        }
    }
    let e = attest::provision_paging(dir.path(), &state, &host, Some(&pager)).unwrap_err();
    match &e {
        attest::AttestError::NotTrusted { verdict, paged, .. } => {
            assert_eq!(verdict.to_string(), "locked", "{e}");
            assert!(
                matches!(paged, attest::Paged::Sent(to) if to.contains("page command")),
                "{e}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The attempt's INFRA message is this error's text: it says it paged.
    assert!(e.to_string().contains("(paged: page command"), "{e}");
    // The page (standard input and environment) names the serial and verdict.
    let env = std::fs::read_to_string(format!("{}.env", paged.display())).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&paged).unwrap()).unwrap();
    let serial = format!("{:#x}", host.serial);
    let got = (v["serial"].as_str(), v["verdict"].as_str(), env.trim());
    assert_eq!(
        got,
        (Some(&*serial), Some("locked"), &*format!("{serial} locked"))
    );
    // A failing page command: still refused, and the refusal says paging failed.
    let broken = hilrig_counters::remediate::Pager::Command(vec!["/bin/false".into()]);
    let e = attest::provision_paging(dir.path(), &state, &host, Some(&broken))
        .unwrap_err()
        .to_string();
    assert!(e.contains("paging a human FAILED"), "{e}");
}

/// A rig inventory of one simulated host in `dir`, after `counters` (a
/// `[counters]` table, or nothing).
fn sim_lab(dir: &std::path::Path, counters: &str) -> std::path::PathBuf {
    let inv = dir.join("lab.toml");
    std::fs::write(
        &inv,
        format!(
            "{counters}\n[lab]\nworkdir = \"{}\"\n\n[[host]]\nname = \"sim-1\"\n[host.sim]\nserial = 101\n[host.power]\ndriver = \"sim\"\n[[host.console]]\nname = \"com1\"\ndriver = \"sim\"\n[host.oob]\ndriver = \"sim\"\n",
            dir.join("work").display()
        ),
    )
    .unwrap();
    inv
}

/// The runner's pager fails closed: a `[counters]` webhook without its key is an
/// error (the run does not start paging nobody); no `[counters]` pages nobody.
#[test]
fn the_runner_pager_of_an_inventory_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    assert!(runner::gate_pager(&sim_lab(dir.path(), ""))
        .unwrap()
        .is_none());
    let inv = sim_lab(
        dir.path(),
        "[counters]\ndb = \"x.sqlite\"\nkey = \"x.key\"\nwebhook = \"http://127.0.0.1:9/\"\n",
    );
    let e = runner::gate_pager(&inv).unwrap_err().to_string();
    assert!(e.contains("webhook_key"), "{e}");
}

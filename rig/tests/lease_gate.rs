//! Leases consult the counters service (issue 21 item 4): with a counters gate, a
//! host whose device the service does not vouch for is not leased, and the refusal
//! names the verdict. Real simulated hosts (their OOB port served from the state
//! file over a PTY) and a real SQLite counters database.

mod common;

use hilrig_counters::mac::Key;
use hilrig_counters::service::{Enrollment, Service};
use hilrig_counters::source::{CounterSource, DeviceSource};
use hilrig_device::model::ops;
use hilrig_device::{Model, Region};
use hilrig_rig::error::RigError;
use hilrig_rig::lease::{CountersGate, LeaseStore};
use hilrig_rig::Rig;
use std::time::Duration;

#[test]
fn a_device_not_trusted_by_the_counters_service_is_not_leased() {
    let t = tempfile::tempdir().unwrap();
    let inv = common::sim_inventory(t.path(), 2, 16);
    let rig = Rig::load(&inv).unwrap();
    let leases = LeaseStore::open(&t.path().join("leases.sqlite").to_string_lossy()).unwrap();
    let key = t.path().join("counters.key");
    Key::init(&key).unwrap();
    let db = t.path().join("counters.sqlite").display().to_string();
    let gate = CountersGate {
        db: db.clone(),
        key: key.clone(),
        anchor: None,
        pager: None,
    };
    // Enrol sim-1's device from its current values (sim-2 is never enrolled).
    rig.read_counters("sim-1").unwrap(); // creates the state file
    let state = rig.sim("sim-1").unwrap().state_path().to_path_buf();
    let obs = DeviceSource::model_file(&state).unwrap().observe().unwrap();
    let serial = rig.identify("sim-1").unwrap().2;
    Service::open(&db, Key::load(&key).unwrap())
        .unwrap()
        .enroll(
            &Enrollment {
                serial,
                host: "sim-1".into(),
                rack: "r1".into(),
                expected: obs.as_expected(),
            },
            false,
        )
        .unwrap();
    let ttl = Duration::from_secs(60);
    let l = leases
        .acquire_gated(&rig, "sim-1", "alice", ttl, Some(&gate))
        .expect("a trusted device is leased");
    leases.release(&l).unwrap();

    // Not enrolled: refused.
    match leases.acquire_gated(&rig, "sim-2", "alice", ttl, Some(&gate)) {
        Err(RigError::Untrusted { verdict, .. }) => assert_eq!(verdict, "unknown-device"),
        other => panic!("an unknown device was leased: {other:?}"),
    }

    // An update attempt made behind the service's back: refused, and it stays
    // refused (the counters that rose were not made the new expected values).
    {
        let mut m = Model::open(&state).unwrap();
        ops::erase(&mut m, Region::Firmware).unwrap();
    }
    for round in 0..2 {
        match leases.acquire_gated(&rig, "sim-1", "alice", ttl, Some(&gate)) {
            Err(e @ RigError::Untrusted { .. }) => {
                let m = e.to_string();
                assert!(m.contains("needs-review"), "round {round}: {m}");
                assert!(
                    m.contains("no authorised update intent"),
                    "round {round}: {m}"
                );
            }
            other => panic!("round {round}: a device held for review was leased: {other:?}"),
        }
        // The refused lease was given back.
        let row = leases
            .list()
            .unwrap()
            .into_iter()
            .find(|r| r.host == "sim-1")
            .unwrap();
        assert!(
            !row.active,
            "round {round}: the refused lease is still held"
        );
    }
    // Without the gate the host is leased as before.
    leases.acquire("sim-1", "alice", ttl).unwrap();
}

/// Remediation at the lease gate (issue 21 item 4): a locked device is refused AND
/// a human is paged through the inventory's `[counters] page` command, with the
/// serial and the verdict; a trusted device is leased and nobody is paged
/// (negative control).
#[test]
fn a_locked_device_at_a_lease_pages_the_inventory_command() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let inv = common::sim_inventory(t.path(), 2, 4);
    let key = t.path().join("counters.key");
    Key::init(&key).unwrap();
    let db = t.path().join("counters.sqlite").display().to_string();
    // The page command: records what it was given (environment and standard input).
    let script = t.path().join("page.sh");
    let paged = t.path().join("paged.json");
    std::fs::write(
        &script,
        "#!/bin/sh\nprintf '%s %s\\n' \"$HILRIG_PAGE_SERIAL\" \"$HILRIG_PAGE_VERDICT\" >> \"$1.env\"\ncat > \"$1\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut text = std::fs::read_to_string(&inv).unwrap();
    text = format!(
        "[counters]\ndb = \"{db}\"\nkey = \"{}\"\npage = [\"{}\", \"{}\"]\n\n{text}",
        key.display(),
        script.display(),
        paged.display()
    );
    std::fs::write(&inv, text).unwrap();
    let rig = Rig::load(&inv).unwrap();
    let gate = CountersGate::from_spec(rig.inv.counters.as_ref().unwrap()).unwrap();
    assert!(gate.pager.is_some(), "the inventory's page command");
    let leases = LeaseStore::open(&t.path().join("leases.sqlite").to_string_lossy()).unwrap();
    let ttl = Duration::from_secs(60);
    let mut serials = Vec::new();
    for host in ["sim-1", "sim-2"] {
        rig.read_counters(host).unwrap(); // creates the state file
        let state = rig.sim(host).unwrap().state_path().to_path_buf();
        let obs = DeviceSource::model_file(&state).unwrap().observe().unwrap();
        let serial = rig.identify(host).unwrap().2;
        Service::open(&db, Key::load(&key).unwrap())
            .unwrap()
            .enroll(
                &Enrollment {
                    serial,
                    host: host.into(),
                    rack: "r1".into(),
                    expected: obs.as_expected(),
                },
                false,
            )
            .unwrap();
        serials.push((serial, state));
    }
    // Negative control: the trusted device is leased, nobody is paged.
    let l = leases
        .acquire_gated(&rig, "sim-2", "alice", ttl, Some(&gate))
        .expect("a trusted device is leased");
    leases.release(&l).unwrap();
    assert!(!paged.exists(), "a trusted device paged someone");
    // sim-1's budget burnt until the fuse blows: locked.
    {
        let mut m = Model::open(&serials[0].1).unwrap();
        for _ in 0..8 {
            ops::erase(&mut m, Region::Vbios).unwrap();
        }
    }
    match leases.acquire_gated(&rig, "sim-1", "alice", ttl, Some(&gate)) {
        Err(RigError::Untrusted {
            verdict, detail, ..
        }) => {
            assert_eq!(verdict, "locked", "{detail}");
            assert!(detail.contains("paged: page command"), "{detail}");
        }
        other => panic!("a locked device was leased: {other:?}"),
    }
    let serial = format!("{:#x}", serials[0].0);
    assert_eq!(
        std::fs::read_to_string(format!("{}.env", paged.display())).unwrap(),
        format!("{serial} locked\n")
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&paged).unwrap()).unwrap();
    assert_eq!(v["serial"], serial.as_str());
    assert_eq!(v["verdict"], "locked");
    assert_eq!(v["observed"]["report"]["fuse"], true, "evidence: {v}");
    // The trusted host still pages nobody.
    std::fs::remove_file(&paged).unwrap();
    let l = leases
        .acquire_gated(&rig, "sim-2", "alice", ttl, Some(&gate))
        .expect("still leased");
    leases.release(&l).unwrap();
    assert!(!paged.exists());
}

//! The service on both backends: enrolment, catalog, verdicts, tampering, updates.

mod common;
use common::*;
use hilrig_counters::decide::{DeviceState, Expected};
use hilrig_counters::service::{Enrollment, GroupBy, Service};
use hilrig_counters::source::CounterSource;
use hilrig_counters::store::{self, Val};
use hilrig_counters::{Error, Verdict};
use hilrig_device::model::ops;
use hilrig_device::oob::Request;
use hilrig_device::{Model, NvState, Region};
use std::path::Path;

fn enroll_from(s: &mut Service, p: &Path, serial: u64, host: &str, rack: &str) {
    let obs = source(p).observe().unwrap();
    s.enroll(
        &Enrollment {
            serial,
            host: host.into(),
            rack: rack.into(),
            expected: obs.as_expected(),
        },
        false,
    )
    .unwrap();
}

fn verify(s: &mut Service, p: &Path, serial: u64) -> hilrig_counters::service::VerifyReport {
    s.verify(serial, &mut source(p)).unwrap()
}

#[test]
fn migrations_apply_in_order_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    let mut db = store::SqliteDb::open(&path).unwrap();
    let all: Vec<i64> = (1..=store::latest_version()).collect();
    assert_eq!(store::migrate(&mut db).unwrap(), all);
    assert_eq!(store::migrate(&mut db).unwrap(), Vec::<i64>::new());
    assert_eq!(
        store::schema_version(&mut db).unwrap(),
        store::latest_version()
    );
    use hilrig_counters::store::Db;
    db.exec(
        "INSERT INTO schema_version (version, applied_at) VALUES ($1, 0)",
        &[Val::I64(99)],
    )
    .unwrap();
    let e = store::migrate(&mut db).unwrap_err();
    assert!(matches!(e, Error::SchemaTooNew { found: 99, .. }), "{e}");
    if let Some((mut pg, url, schema)) = pg_db("migrations") {
        assert_eq!(store::migrate(&mut *pg).unwrap(), all);
        assert_eq!(store::migrate(&mut *pg).unwrap(), Vec::<i64>::new());
        drop(pg);
        store::PgDb::connect(&url, None)
            .unwrap()
            .drop_schema(&schema)
            .unwrap();
    } else {
        eprintln!("migrations: postgresql SKIPPED: HILRIG_TEST_PG not set");
    }
}

#[test]
fn bad_input_is_refused_and_nothing_is_stored() {
    each_backend("bad_input", |s, dir| {
        let p = make_device(dir, 0x10, 8);
        enroll_from(s, &p, 0x10, "h1", "r1");
        // Duplicate enrol: clear error, the first record untouched.
        let before = s.device(0x10).unwrap();
        let e = s
            .enroll(
                &Enrollment {
                    serial: 0x10,
                    host: "other".into(),
                    rack: "other".into(),
                    expected: Expected {
                        counters: [9; 3],
                        master: 27,
                        epoch: 0,
                        hashes: [[1; 32]; 3],
                    },
                },
                false,
            )
            .unwrap_err();
        assert!(matches!(e, Error::DuplicateDevice(_)), "{e}");
        assert!(e.to_string().contains("already enrolled"));
        let after = s.device(0x10).unwrap();
        assert_eq!(before.expected, after.expected);
        assert_eq!(after.host, "h1");
        // Wrong-length and non-hex hashes.
        for bad in ["abcd", &"a".repeat(63), &"z".repeat(64), ""] {
            let e = s
                .catalog_add(Region::Firmware, bad, "v1", "alice")
                .unwrap_err();
            assert!(matches!(e, Error::Input(_)), "{e}");
        }
        assert!(s.catalog_list().unwrap().is_empty());
        let h = "ab".repeat(32);
        s.catalog_add(Region::Firmware, &h, "v1", "alice").unwrap();
        let e = s
            .catalog_add(Region::Firmware, &h, "v1", "alice")
            .unwrap_err();
        assert!(matches!(e, Error::DuplicateImage { .. }), "{e}");
        assert_eq!(s.catalog_list().unwrap().len(), 1);
        let e = s.catalog_remove(Region::Vbios, &h).unwrap_err();
        assert!(matches!(e, Error::UnknownImage { .. }), "{e}");
        s.catalog_remove(Region::Firmware, &h).unwrap();
        assert!(s.catalog_list().unwrap().is_empty());
        // Unknown devices.
        let e = s.verify(0x99, &mut source(&p)).unwrap_err();
        assert!(matches!(e, Error::UnknownDevice(_)), "{e}");
        assert!(matches!(s.device(0x99), Err(Error::UnknownDevice(_))));
        assert!(s.begin_update(0x99, Region::Config, &h).is_err());
        // A device that identifies with another serial is not trusted.
        let p2 = make_device(dir, 0x11, 8);
        let r = s.verify(0x10, &mut source(&p2)).unwrap();
        assert_eq!(r.decision.verdict, Verdict::Unverifiable);
        assert!(!r.trusted());
        assert_eq!(s.history(Some(0x99), 10).unwrap().len(), 0);
    });
}

#[test]
fn verdict_flow_on_a_model_device() {
    each_backend("flow", |s, dir| {
        let serial = 0x5eed;
        let p = make_device(dir, serial, 64);
        enroll_from(s, &p, serial, "host-a", "rack-1");
        assert_eq!(s.device(serial).unwrap().state, DeviceState::Unknown);
        assert!(!s
            .is_trusted(serial, std::time::Duration::from_secs(60))
            .unwrap());
        // Fresh passing verify: trusted.
        let r = verify(s, &p, serial);
        assert_eq!(r.decision.verdict, Verdict::Trusted, "{:?}", r.decision);
        assert!(s
            .is_trusted(serial, std::time::Duration::from_secs(60))
            .unwrap());

        // An authorised update with a catalog image.
        let img = image(1, 5000);
        let h = image_hash(Region::Firmware, &img);
        s.catalog_add(Region::Firmware, &h, "fw-1.0", "alice")
            .unwrap();
        let id = s.begin_update(serial, Region::Firmware, &h).unwrap();
        assert_eq!(s.device(serial).unwrap().state, DeviceState::Unknown);
        flash(&p, Region::Firmware, &img);
        let r = s.commit_update(serial, id, &mut source(&p)).unwrap();
        assert_eq!(
            r.decision.verdict,
            Verdict::AcceptedUpdate,
            "{:?}",
            r.decision
        );
        assert!(r.trusted());
        assert_eq!(s.device(serial).unwrap().expected.counters, [0, 2, 0]);
        assert!(
            s.commit_update(serial, id, &mut source(&p)).is_err(),
            "closed"
        );

        // Refused attempts (locked) advance counters with known-good images: accepted.
        {
            let mut m = Model::open(&p).unwrap();
            ops::erase(&mut m, Region::Config).unwrap();
        }
        let r = verify(s, &p, serial);
        assert_eq!(
            r.decision.verdict,
            Verdict::AcceptedUpdate,
            "{:?}",
            r.decision
        );

        // An image not in the catalog with no intent: quarantined, recoverable by reflash.
        let bad = image(9, 3000);
        flash(&p, Region::Firmware, &bad);
        let r = verify(s, &p, serial);
        assert_eq!(r.decision.verdict, Verdict::Quarantined, "{:?}", r.decision);
        assert!(r.decision.recoverable);
        assert!(!r.trusted());
        flash(&p, Region::Firmware, &img);
        let r = verify(s, &p, serial);
        assert_eq!(
            r.decision.verdict,
            Verdict::AcceptedUpdate,
            "{:?}",
            r.decision
        );

        // An authorised update interrupted half-way (erased, not programmed): reflash.
        let img2 = image(2, 4000);
        let h2 = image_hash(Region::Firmware, &img2);
        s.catalog_add(Region::Firmware, &h2, "fw-2.0", "bob")
            .unwrap();
        let id2 = s.begin_update(serial, Region::Firmware, &h2).unwrap();
        {
            let mut m = Model::open(&p).unwrap();
            ops::unlock(&mut m).unwrap();
            ops::erase(&mut m, Region::Firmware).unwrap();
        }
        let r = verify(s, &p, serial);
        assert_eq!(
            r.decision.verdict,
            Verdict::NeedsReflash,
            "{:?}",
            r.decision
        );
        flash(&p, Region::Firmware, &img2);
        let r = s.commit_update(serial, id2, &mut source(&p)).unwrap();
        assert_eq!(
            r.decision.verdict,
            Verdict::AcceptedUpdate,
            "{:?}",
            r.decision
        );

        // Rollback: restore an older state file.
        let snapshot = std::fs::read(&p).unwrap();
        flash(&p, Region::Firmware, &img);
        assert_eq!(
            verify(s, &p, serial).decision.verdict,
            Verdict::AcceptedUpdate
        );
        std::fs::write(&p, &snapshot).unwrap();
        let r = verify(s, &p, serial);
        assert_eq!(r.decision.verdict, Verdict::RolledBack, "{:?}", r.decision);
        assert!(!r.decision.recoverable);
        // Held: even after the counters move forward again.
        flash(&p, Region::Firmware, &img);
        flash(&p, Region::Firmware, &img);
        let r = verify(s, &p, serial);
        assert_eq!(r.decision.verdict, Verdict::Quarantined, "{:?}", r.decision);
        assert!(s.device(serial).unwrap().hold.contains("master"));
        // Re-enrol on purpose clears it.
        let obs = source(&p).observe().unwrap();
        s.enroll(
            &Enrollment {
                serial,
                host: "host-a".into(),
                rack: "rack-1".into(),
                expected: obs.as_expected(),
            },
            true,
        )
        .unwrap();
        assert_eq!(verify(s, &p, serial).decision.verdict, Verdict::Trusted);

        let hist = s.history(Some(serial), 100).unwrap();
        assert!(hist.len() >= 10, "{}", hist.len());
        assert!(hist.iter().all(|h| h.intact));
        assert_eq!(hist[0].verdict, "trusted");
    });
}

#[test]
fn fuse_locks_and_physical_reset_is_distinct() {
    each_backend("fuse", |s, dir| {
        let serial = 0xf0;
        let p = make_device(dir, serial, 3);
        enroll_from(s, &p, serial, "h", "r");
        {
            let mut m = Model::open(&p).unwrap();
            for _ in 0..3 {
                ops::erase(&mut m, Region::Config).unwrap();
            }
        }
        let r = verify(s, &p, serial);
        assert_eq!(r.decision.verdict, Verdict::Locked, "{:?}", r.decision);
        assert_eq!(r.decision.state, DeviceState::Locked);
        assert!(r.decision.reasons[0].contains("page a human"));
        let e = s
            .begin_update(serial, Region::Config, &"ab".repeat(32))
            .unwrap_err();
        assert!(e.to_string().contains("locked"), "{e}");
        // Keyed physical reset: epoch advances; images unchanged and known-good.
        let key = NvState::load(&p).unwrap().reset_key;
        source(&p).request(&Request::PhysicalReset(key)).unwrap();
        let r = verify(s, &p, serial);
        assert_eq!(
            r.decision.verdict,
            Verdict::PhysicalReset,
            "{:?}",
            r.decision
        );
        assert!(r.trusted());
        assert_eq!(s.device(serial).unwrap().expected.epoch, 1);
        assert_eq!(verify(s, &p, serial).decision.verdict, Verdict::Trusted);
        // A physical reset plus an unknown image: not re-baselined.
        flash(&p, Region::Vbios, &image(5, 2048));
        let key = NvState::load(&p).unwrap().reset_key;
        source(&p).request(&Request::PhysicalReset(key)).unwrap();
        let r = verify(s, &p, serial);
        assert_eq!(r.decision.verdict, Verdict::PhysicalReset);
        assert_eq!(r.decision.state, DeviceState::NeedsReflash);
        assert_eq!(s.device(serial).unwrap().expected.epoch, 1);
    });
}

#[test]
fn tampered_rows_quarantine_the_device() {
    each_backend("tamper", |s, dir| {
        let serial = 0x7a;
        let p = make_device(dir, serial, 8);
        enroll_from(s, &p, serial, "h", "r");
        assert_eq!(verify(s, &p, serial).decision.verdict, Verdict::Trusted);
        let good_row = s
            .db_mut()
            .query("SELECT c1, master, mac FROM devices", &[])
            .unwrap();
        // Someone raises the expected counter by hand (to hide attempts).
        s.db_mut()
            .exec("UPDATE devices SET c1 = c1 + 5, master = master + 5", &[])
            .unwrap();
        let tampered_row = s
            .db_mut()
            .query("SELECT c1, master, mac FROM devices", &[])
            .unwrap();
        assert!(matches!(s.device(serial), Err(Error::Tampered { .. })));
        let r = verify(s, &p, serial);
        assert_eq!(r.decision.verdict, Verdict::Quarantined, "{:?}", r.decision);
        assert_eq!(r.decision.state, DeviceState::Quarantined);
        assert!(
            r.decision.reasons[0].contains("MAC"),
            "{:?}",
            r.decision.reasons
        );
        // The row is never rewritten: still as the attacker left it (evidence), and a
        // copy as found is in the evidence table.
        assert_eq!(
            s.db_mut()
                .query("SELECT c1, master, mac FROM devices", &[])
                .unwrap(),
            tampered_row
        );
        let ev = s.evidence().unwrap();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].0, "devices");
        assert!(
            ev[0].2.contains(
                &format!("{:?}", tampered_row[0][2])
                    .replace("Text(", "")
                    .replace(')', "")
            ),
            "{ev:?}"
        );
        // Stays quarantined, no second copy of the same evidence.
        assert_eq!(verify(s, &p, serial).decision.verdict, Verdict::Quarantined);
        assert_eq!(s.evidence().unwrap().len(), 1);
        // Putting the old row back (valid MAC) does not lift the hold.
        s.db_mut()
            .exec(
                "UPDATE devices SET c1 = $1, master = $2, mac = $3",
                &good_row[0],
            )
            .unwrap();
        let r = verify(s, &p, serial);
        assert_eq!(r.decision.verdict, Verdict::Quarantined, "{:?}", r.decision);
        assert_eq!(r.decision.state, DeviceState::Quarantined);
        // The old row is older than the device's history: a replayed row.
        assert!(
            r.decision.reasons[0].contains("replayed"),
            "{:?}",
            r.decision.reasons
        );
        assert!(matches!(s.device(serial), Err(Error::Tampered { .. })));
        // A tampered catalog entry is ignored.
        let img = image(3, 1000);
        let h = image_hash(Region::Config, &img);
        s.catalog_add(Region::Config, &h, "c1", "alice").unwrap();
        s.db_mut()
            .exec("UPDATE catalog SET approved_by = 'mallory'", &[])
            .unwrap();
        assert!(!s.catalog_list().unwrap()[0].intact);
        // A tampered history row shows.
        s.db_mut()
            .exec("UPDATE history SET verdict = 'trusted'", &[])
            .unwrap();
        assert!(s
            .history(Some(serial), 10)
            .unwrap()
            .iter()
            .any(|h| !h.intact));
        // Re-enrol, then an image approved by a tampered catalog row is not accepted.
        s.enroll(&enrollment(&p, serial), true).unwrap();
        flash(&p, Region::Config, &img);
        let r = verify(s, &p, serial);
        assert_eq!(r.decision.verdict, Verdict::Quarantined, "{:?}", r.decision);
        assert!(r
            .decision
            .reasons
            .iter()
            .any(|x| x.contains("fails its MAC")));
        // A tampered open intent is detected too.
        s.enroll(&enrollment(&p, serial), true).unwrap();
        s.db_mut().exec("DELETE FROM catalog", &[]).unwrap();
        s.catalog_add(Region::Config, &h, "c1", "alice").unwrap();
        s.begin_update(serial, Region::Config, &h).unwrap();
        s.db_mut()
            .exec(
                "UPDATE intents SET target = $1",
                &[Val::Text("cd".repeat(32))],
            )
            .unwrap();
        // Unchanged counters do not consult intents; the update does.
        assert_eq!(verify(s, &p, serial).decision.verdict, Verdict::Trusted);
        flash(&p, Region::Config, &img);
        let r = verify(s, &p, serial);
        assert_eq!(r.decision.verdict, Verdict::Quarantined, "{:?}", r.decision);
        assert!(
            r.decision.reasons[0].contains("intents"),
            "{:?}",
            r.decision.reasons
        );
    });
}

#[test]
fn unreadable_devices_fail_closed() {
    each_backend("unreadable", |s, dir| {
        let serial = 0x44;
        let p = make_device(dir, serial, 8);
        enroll_from(s, &p, serial, "h", "r");
        assert!(verify(s, &p, serial).trusted());
        let r = s
            .verify_observation(
                serial,
                Err(Error::Source {
                    source_name: "oob".into(),
                    detail: "OOB timeout".into(),
                }),
            )
            .unwrap();
        assert_eq!(r.decision.verdict, Verdict::Unverifiable);
        assert!(!r.trusted());
        assert_eq!(s.device(serial).unwrap().state, DeviceState::Unknown);
        assert!(!s
            .is_trusted(serial, std::time::Duration::from_secs(60))
            .unwrap());
        // A corrupt state file is unreadable, not trusted.
        std::fs::write(&p, b"garbage").unwrap();
        assert!(hilrig_counters::source::DeviceSource::model_file(&p).is_err());
    });
}

#[test]
fn rate_limit_master_sums_and_cross_check() {
    each_backend("misc", |s, dir| {
        let mut devs = Vec::new();
        for (i, (host, rack)) in [("h1", "r1"), ("h1", "r1"), ("h2", "r1"), ("h3", "r2")]
            .iter()
            .enumerate()
        {
            let serial = 0x100 + i as u64;
            let p = make_device(dir, serial, 16);
            for _ in 0..i {
                let mut m = Model::open(&p).unwrap();
                ops::erase(&mut m, Region::Config).unwrap();
            }
            enroll_from(s, &p, serial, host, rack);
            devs.push((serial, p));
        }
        let hosts = s.master_sums(GroupBy::Host).unwrap();
        let h1 = hosts.iter().find(|g| g.group == "h1").unwrap();
        assert_eq!((h1.master, h1.devices.len()), (1, 2));
        let racks = s.master_sums(GroupBy::Rack).unwrap();
        let r1 = racks.iter().find(|g| g.group == "r1").unwrap();
        assert_eq!((r1.master, r1.devices.len()), (3, 3));

        // Rate limit.
        s.rate_limit.max = 2;
        let h = image_hash(Region::Config, &image(1, 100));
        s.catalog_add(Region::Config, &h, "c", "alice").unwrap();
        let (serial, p) = devs[0].clone();
        s.begin_update(serial, Region::Config, &h).unwrap();
        s.begin_update(serial, Region::Config, &h).unwrap();
        let e = s.begin_update(serial, Region::Config, &h).unwrap_err();
        assert!(matches!(e, Error::RateLimited { .. }), "{e}");
        // Not in the catalog: refused.
        let e = s
            .begin_update(devs[1].0, Region::Config, &"ee".repeat(32))
            .unwrap_err();
        assert!(e.to_string().contains("not in the catalog"), "{e}");

        // VMM cross-check.
        let start = source(&p).counters().unwrap();
        {
            let mut m = Model::open(&p).unwrap();
            ops::erase(&mut m, Region::Vbios).unwrap();
            ops::erase(&mut m, Region::Vbios).unwrap();
        }
        let end = source(&p).counters().unwrap();
        let d = s.cross_check(serial, &start, &end, 2).unwrap();
        assert_eq!(d.verdict, Verdict::Trusted);
        let d = s.cross_check(serial, &start, &end, 1).unwrap();
        assert_eq!(d.verdict, Verdict::BypassedTrap, "{d:?}");
        assert_eq!(s.device(serial).unwrap().state, DeviceState::Quarantined);
        let d = s.cross_check(devs[2].0, &start, &end, 3).unwrap();
        assert_eq!(d.verdict, Verdict::Undercount);
        let d = s.cross_check(devs[3].0, &end, &start, 0).unwrap();
        assert_eq!(d.verdict, Verdict::RolledBack);
        assert_eq!(s.history(None, 100).unwrap()[0].verdict, "rolled-back");
    });
}

/// A cross-check where the VMM and the hardware agree rewrites the device row
/// with its history row: the next verify and `device()` do not take the row for
/// a replayed one (they did: the row was older than that history row).
#[test]
fn an_agreeing_cross_check_leaves_the_device_trusted() {
    each_backend("agreeing_cross_check", |s, dir| {
        for (serial, anchored) in [(0x51u64, false), (0x52, true)] {
            if anchored {
                s.set_anchor(&dir.join("anchor")).unwrap();
            }
            let p = make_device(dir, serial, 8);
            enroll_from(s, &p, serial, "h1", "r1");
            assert!(verify(s, &p, serial).trusted());
            // A tenancy without flash updates: both counted none.
            let start = source(&p).counters().unwrap();
            let d = s.cross_check(serial, &start, &start, 0).unwrap();
            assert_eq!(d.verdict, Verdict::Trusted, "{d:?}");
            let r = s.device(serial).unwrap();
            assert!(r.hold.is_empty(), "anchored {anchored}: {r:?}");
            assert_eq!(r.state, DeviceState::Trusted, "anchored {anchored}");
            let r = verify(s, &p, serial);
            assert!(r.trusted(), "anchored {anchored}: {r:?}");
            assert!(
                s.device(serial).unwrap().hold.is_empty(),
                "anchored {anchored}"
            );
        }
    });
}

#[test]
fn verify_over_a_pty_serial_port() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let p = make_device(dir.path(), 0xabc, 16);
    let pty = match hilrig_device::oob::PtyServer::new() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("SKIPPED: no PTY available: {e}");
            return;
        }
    };
    let path = pty.path().to_string();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let pp = p.clone();
    let t = std::thread::spawn(move || {
        let mut m = Model::open(&pp).unwrap();
        pty.serve(&mut m, &|| st.load(Ordering::Relaxed)).unwrap();
    });
    let db = store::SqliteDb::open(&dir.path().join("c.db")).unwrap();
    let mut s = Service::with_db(Box::new(db), key()).unwrap();
    let mut src = hilrig_counters::source::open_source(
        &format!("serial:{path}"),
        hilrig_device::oob::DEFAULT_BAUD,
        std::time::Duration::from_secs(2),
    )
    .unwrap();
    let obs = src.observe().unwrap();
    s.enroll(
        &Enrollment {
            serial: 0xabc,
            host: "h".into(),
            rack: "r".into(),
            expected: obs.as_expected(),
        },
        false,
    )
    .unwrap();
    let r = s.verify(0xabc, &mut *src).unwrap();
    assert_eq!(r.decision.verdict, Verdict::Trusted, "{:?}", r.decision);
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    // The port is gone: fail closed.
    let r = match hilrig_counters::source::open_source(
        "serial:/dev/nonexistent-hilrig",
        hilrig_device::oob::DEFAULT_BAUD,
        std::time::Duration::from_millis(200),
    ) {
        Ok(mut src) => s.verify(0xabc, &mut *src).unwrap(),
        Err(e) => s.verify_observation(0xabc, Err(e)).unwrap(),
    };
    assert_eq!(r.decision.verdict, Verdict::Unverifiable);
    assert!(!r.trusted());
}

/// Two rig controllers on one database: the per-device rate limit holds across them.
#[test]
fn concurrent_controllers_share_the_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let p = make_device(dir.path(), 0xcc, 16);
    let h = image_hash(Region::Config, &image(1, 64));
    let mut specs: Vec<(String, Box<dyn Fn() -> Service + Sync>)> = Vec::new();
    let file = dir.path().join("shared.db");
    specs.push((
        "sqlite".into(),
        Box::new(move || {
            Service::with_db(Box::new(store::SqliteDb::open(&file).unwrap()), key()).unwrap()
        }),
    ));
    let mut cleanup = None;
    match pg_url() {
        Some(url) => {
            let schema = fresh_schema("concurrent");
            cleanup = Some((url.clone(), schema.clone()));
            specs.push((
                "postgresql".into(),
                Box::new(move || {
                    let db = store::PgDb::connect(&url, Some(&schema)).unwrap();
                    Service::with_db(Box::new(db), key()).unwrap()
                }),
            ));
        }
        None => eprintln!("concurrent: postgresql SKIPPED: HILRIG_TEST_PG not set"),
    }
    for (name, open) in &specs {
        let mut s = open();
        enroll_from(&mut s, &p, 0xcc, "h", "r");
        s.catalog_add(Region::Config, &h, "c", "alice").unwrap();
        let ok = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..3 {
                sc.spawn(|| {
                    let mut s = open();
                    s.rate_limit.max = 5;
                    for _ in 0..6 {
                        match s.begin_update(0xcc, Region::Config, &h) {
                            Ok(_) => {
                                ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(Error::RateLimited { .. }) => {}
                            Err(e) => panic!("{name}: {e}"),
                        }
                    }
                });
            }
        });
        assert_eq!(ok.into_inner(), 5, "{name}");
    }
    if let Some((url, schema)) = cleanup {
        store::PgDb::connect(&url, None)
            .unwrap()
            .drop_schema(&schema)
            .unwrap();
    }
}

#[test]
fn verify_batch_is_all_or_nothing_and_sees_its_own_writes() {
    each_backend("batch", |s, dir| {
        let mut obs = Vec::new();
        for serial in [0x201u64, 0x202, 0x203] {
            let p = make_device(dir, serial, 16);
            enroll_from(s, &p, serial, "h", "r");
            obs.push((serial, p));
        }
        let o: Vec<_> = obs
            .iter()
            .map(|(k, p)| (*k, source(p).observe().unwrap()))
            .collect();
        // The same device twice: the second sees the first's write.
        {
            let mut m = Model::open(&obs[0].1).unwrap();
            ops::erase(&mut m, Region::Config).unwrap();
        }
        let later = (obs[0].0, source(&obs[0].1).observe().unwrap());
        let mut items = o.clone();
        items.push(later.clone());
        let r = s.verify_batch(&items).unwrap();
        let v: Vec<_> = r.iter().map(|x| x.decision.verdict).collect();
        assert_eq!(
            v,
            vec![
                Verdict::Trusted,
                Verdict::Trusted,
                Verdict::Trusted,
                Verdict::AcceptedUpdate
            ]
        );
        assert_eq!(s.history(None, 100).unwrap().len(), 4);
        assert!(s.history(None, 100).unwrap().iter().all(|h| h.intact));
        assert_eq!(s.device(0x201).unwrap().expected.counters, [0, 0, 1]);
        // An unknown device fails the batch; nothing from it is stored.
        let mut bad = o.clone();
        bad.push((0x999, later.1.clone()));
        assert!(matches!(s.verify_batch(&bad), Err(Error::UnknownDevice(_))));
        assert_eq!(s.history(None, 100).unwrap().len(), 4);
        // A stale observation in a batch is a rollback, like one by one.
        let r = s.verify_batch(&o[..1]).unwrap();
        assert_eq!(r[0].decision.verdict, Verdict::RolledBack);
    });
}

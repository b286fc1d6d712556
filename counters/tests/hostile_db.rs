//! The store against a hostile or racing database: a wrong key writes nothing, a
//! stale observation never quarantines a healthy device.

mod common;
use common::*;
use hilrig_counters::decide::DeviceState;
use hilrig_counters::mac::Key;
use hilrig_counters::service::Service;
use hilrig_counters::source::{CounterSource, DeviceSource};
use hilrig_counters::{Error, Result, Verdict};
use hilrig_device::oob::{Request, Response};
use hilrig_device::{Model, Region};
use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("counters.db"))
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_different_key_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("counters.db");
    let spec = db.display().to_string();
    let p = make_device(dir.path(), 0x51, 8);
    {
        let mut s = Service::open(&spec, key()).unwrap();
        enroll_from(&mut s, &p, 0x51);
        assert_eq!(
            s.verify(0x51, &mut source(&p)).unwrap().decision.verdict,
            Verdict::Trusted
        );
    }
    let before = files(dir.path());
    let wrong = Key::from_bytes([8u8; 32]);
    match Service::open(&spec, wrong) {
        Err(Error::WrongKey { stored, given }) => assert_ne!(stored, given),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a wrong key opened the database"),
    }
    assert_eq!(
        files(dir.path()),
        before,
        "a wrong key wrote to the database"
    );
    // The right key still works and the device is still trusted.
    let mut s = Service::open(&spec, key()).unwrap();
    assert_eq!(s.device(0x51).unwrap().state, DeviceState::Trusted);
}

/// Reads the device; once its first observation is complete, runs `hook` (another
/// process commits an authorised update) before the verify stores anything.
struct Racy {
    inner: DeviceSource<Model>,
    path: PathBuf,
    n: usize,
    hook: Option<Box<dyn FnOnce()>>,
}

impl CounterSource for Racy {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn request(&mut self, req: &Request) -> Result<Response> {
        // Reopen each time: the device file changes under us.
        self.inner = source(&self.path);
        let r = self.inner.request(req);
        self.n += 1;
        // IDENTIFY, READ_COUNTERS, 3 x READ_HASH, READ_COUNTERS: the observation.
        if self.n == 6 {
            if let Some(h) = self.hook.take() {
                h();
            }
        }
        r
    }
}

#[test]
fn a_stale_observation_never_quarantines_a_healthy_device() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("counters.db").display().to_string();
    let p = make_device(dir.path(), 0x52, 16);
    let mut s = Service::open(&spec, key()).unwrap();
    enroll_from(&mut s, &p, 0x52);
    assert_eq!(
        s.verify(0x52, &mut source(&p)).unwrap().decision.verdict,
        Verdict::Trusted
    );
    let img = image(9, 256);
    let h = image_hash(Region::Config, &img);
    s.catalog_add(Region::Config, &h, "c9", "alice").unwrap();
    let (spec2, p2, h2) = (spec.clone(), p.clone(), h.clone());
    let mut racy = Racy {
        inner: source(&p),
        path: p.clone(),
        n: 0,
        hook: Some(Box::new(move || {
            // Another rig controller: an authorised update, committed.
            let mut other = Service::open(&spec2, key()).unwrap();
            let id = other.begin_update(0x52, Region::Config, &h2).unwrap();
            flash(&p2, Region::Config, &img);
            let r = other.commit_update(0x52, id, &mut source(&p2)).unwrap();
            assert!(r.trusted(), "{:?}", r.decision);
        })),
    };
    let r = s.verify(0x52, &mut racy).unwrap();
    assert_eq!(r.decision.verdict, Verdict::Trusted, "{:?}", r.decision);
    let rec = s.device(0x52).unwrap();
    assert_eq!(rec.state, DeviceState::Trusted);
    assert!(rec.hold.is_empty(), "{}", rec.hold);
}

#[test]
fn a_replayed_database_is_refused_with_an_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let spec = live.join("counters.db").display().to_string();
    let anchor = dir.path().join("anchor");
    let p = make_device(dir.path(), 0x53, 16);
    let old_state = std::fs::read(&p).unwrap();
    {
        let mut s = Service::open(&spec, key()).unwrap();
        s.set_anchor(&anchor).unwrap();
        enroll_from(&mut s, &p, 0x53);
        assert!(s.verify(0x53, &mut source(&p)).unwrap().trusted());
    }
    copy_db(&live, &dir.path().join("backup"));
    {
        let mut s = Service::open(&spec, key()).unwrap();
        s.set_anchor(&anchor).unwrap();
        update(&mut s, &p, 0x53, 1);
        assert!(s.verify(0x53, &mut source(&p)).unwrap().trusted());
    }
    // The attacker restores the old database and rolls the device back.
    restore_db(&dir.path().join("backup"), &live);
    std::fs::write(&p, &old_state).unwrap();
    let mut s = Service::open(&spec, key()).unwrap();
    match s.set_anchor(&anchor) {
        Err(e @ Error::Replayed { .. }) => {
            let m = e.to_string();
            assert!(m.starts_with("database replayed: head 1, anchor "), "{m}");
        }
        other => panic!("a replayed database was accepted: {:?}", other.err()),
    }
    // Without the anchor the replay is invisible (the README says so).
    assert!(s.verify(0x53, &mut source(&p)).unwrap().trusted());
}

#[test]
fn a_replayed_device_row_then_a_device_rollback_is_never_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("counters.db").display().to_string();
    let p = make_device(dir.path(), 0x54, 16);
    let old_state = std::fs::read(&p).unwrap();
    let mut s = Service::open(&spec, key()).unwrap();
    enroll_from(&mut s, &p, 0x54);
    assert!(s.verify(0x54, &mut source(&p)).unwrap().trusted());
    let old_row = s
        .db_mut()
        .query(
            "SELECT state, c0, c1, c2, master, epoch, h0, h1, h2, reason, hold, verified_at, mac, hseq FROM devices",
            &[],
        )
        .unwrap();
    update(&mut s, &p, 0x54, 2);
    // The attacker puts the old row back (its own valid MAC) and rolls the device
    // back to match it.
    s.db_mut()
        .exec(
            "UPDATE devices SET state = $1, c0 = $2, c1 = $3, c2 = $4, master = $5, epoch = $6, h0 = $7, h1 = $8, h2 = $9, reason = $10, hold = $11, verified_at = $12, mac = $13, hseq = $14",
            &old_row[0],
        )
        .unwrap();
    std::fs::write(&p, &old_state).unwrap();
    let r = s.verify(0x54, &mut source(&p)).unwrap();
    assert_eq!(r.decision.verdict, Verdict::Quarantined, "{:?}", r.decision);
    assert!(!r.trusted());
    assert!(
        r.decision.reasons[0].contains("replayed"),
        "{:?}",
        r.decision
    );
    // Kept as evidence, held.
    assert_eq!(s.evidence().unwrap().len(), 1);
    assert!(!s.verify(0x54, &mut source(&p)).unwrap().trusted());
}

#[test]
fn a_revoked_image_stays_revoked_when_its_row_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("counters.db").display().to_string();
    let p = make_device(dir.path(), 0x55, 16);
    let mut s = Service::open(&spec, key()).unwrap();
    enroll_from(&mut s, &p, 0x55);
    let img = image(7, 256);
    let h = image_hash(Region::Config, &img);
    s.catalog_add(Region::Config, &h, "v7", "alice").unwrap();
    let row = s
        .db_mut()
        .query(
            "SELECT region, sha256, version, approved_by, added_at, mac FROM catalog",
            &[],
        )
        .unwrap();
    s.catalog_remove(Region::Config, &h).unwrap();
    // Re-inserted by hand, with its own valid MAC.
    s.db_mut()
        .exec(
            "INSERT INTO catalog (region, sha256, version, approved_by, added_at, mac) VALUES ($1,$2,$3,$4,$5,$6)",
            &row[0],
        )
        .unwrap();
    // Through the service: refused.
    assert!(s.catalog_add(Region::Config, &h, "v7", "alice").is_err());
    assert!(s.begin_update(0x55, Region::Config, &h).is_err());
    flash(&p, Region::Config, &img);
    let r = s.verify(0x55, &mut source(&p)).unwrap();
    assert!(!r.trusted(), "{:?}", r.decision);
    assert_ne!(r.decision.verdict, Verdict::AcceptedUpdate);
}

#[test]
fn a_tampered_rate_limit_entry_counts_as_an_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("counters.db").display().to_string();
    let p = make_device(dir.path(), 0x56, 32);
    let mut s = Service::open(&spec, key()).unwrap();
    s.rate_limit.max = 3;
    enroll_from(&mut s, &p, 0x56);
    let img = image(3, 256);
    let h = image_hash(Region::Config, &img);
    s.catalog_add(Region::Config, &h, "v", "alice").unwrap();
    for _ in 0..3 {
        s.begin_update(0x56, Region::Config, &h).unwrap();
    }
    assert!(matches!(
        s.begin_update(0x56, Region::Config, &h),
        Err(Error::RateLimited { .. })
    ));
    // The attacker ages the log (to reopen the window) and relabels entries.
    s.db_mut()
        .exec("UPDATE update_log SET at = 0, outcome = 'aborted'", &[])
        .unwrap();
    assert!(matches!(
        s.begin_update(0x56, Region::Config, &h),
        Err(Error::RateLimited { count: 3, .. })
    ));
    // Deleting the first entry breaks the chain: the break counts too.
    s.db_mut()
        .exec(
            "DELETE FROM update_log WHERE id = (SELECT MIN(id) FROM update_log)",
            &[],
        )
        .unwrap();
    assert!(matches!(
        s.begin_update(0x56, Region::Config, &h),
        Err(Error::RateLimited { .. })
    ));
}

/// The replay of `a_replayed_database_is_refused_with_an_anchor`, with the anchor
/// given as `anchor` (a file, `sqlite:PATH` or a PostgreSQL URL).
fn replay_is_detected_with(anchor: &str, dir: &Path) {
    let live = dir.join("live");
    std::fs::create_dir_all(&live).unwrap();
    let spec = live.join("counters.db").display().to_string();
    let p = make_device(dir, 0x54, 16);
    let old_state = std::fs::read(&p).unwrap();
    {
        let mut s = Service::open(&spec, key()).unwrap();
        s.set_anchor_spec(anchor).unwrap();
        enroll_from(&mut s, &p, 0x54);
        assert!(s.verify(0x54, &mut source(&p)).unwrap().trusted());
    }
    copy_db(&live, &dir.join("backup"));
    {
        let mut s = Service::open(&spec, key()).unwrap();
        s.set_anchor_spec(anchor).unwrap();
        update(&mut s, &p, 0x54, 2);
        assert!(s.verify(0x54, &mut source(&p)).unwrap().trusted());
    }
    // Another service database sharing the anchor database keeps its own row.
    {
        let other = dir.join("other.db").display().to_string();
        let mut s = Service::open(&other, Key::from_bytes([9u8; 32])).unwrap();
        s.set_anchor_spec(anchor).unwrap();
    }
    // The attacker restores the old database and rolls the device back.
    restore_db(&dir.join("backup"), &live);
    std::fs::write(&p, &old_state).unwrap();
    let mut s = Service::open(&spec, key()).unwrap();
    match s.set_anchor_spec(anchor) {
        Err(e @ Error::Replayed { .. }) => {
            let m = e.to_string();
            assert!(m.starts_with("database replayed: head 1, anchor "), "{m}");
        }
        other => panic!("a replayed database was accepted: {:?}", other.err()),
    }
}

#[test]
fn a_replayed_database_is_refused_with_the_anchor_in_a_sqlite_database() {
    let dir = tempfile::tempdir().unwrap();
    let a = format!("sqlite:{}", dir.path().join("anchor.db").display());
    replay_is_detected_with(&a, dir.path());
    // The anchor database is a SQLite file with one row per service database.
    let conn = hilrig_counters::store::SqliteDb::open(&dir.path().join("anchor.db")).unwrap();
    let mut db: Box<dyn hilrig_counters::store::Db> = Box::new(conn);
    let n = db.query("SELECT COUNT(*) FROM anchor", &[]).unwrap();
    assert_eq!(n[0][0], hilrig_counters::store::Val::I64(2));
}

#[test]
fn a_replayed_database_is_refused_with_the_anchor_in_another_postgresql_database() {
    let Some(url) = pg_url() else {
        eprintln!("SKIPPED: HILRIG_TEST_PG not set (the anchor on another PostgreSQL database)");
        return;
    };
    // A second database on the server: the anchor lives apart from the service's.
    let scratch =
        hilrig_db::ScratchPg::create(&url, "anchordb", &hilrig_db::Settings::new("counters-test"))
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    replay_is_detected_with(scratch.url(), dir.path());
}

#[test]
fn a_file_anchor_that_is_a_sqlite_database_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("anchor.db");
    drop(hilrig_counters::anchor::Anchor::open(&format!("sqlite:{}", a.display()), "x").unwrap());
    let mut s = Service::open(&dir.path().join("c.db").display().to_string(), key()).unwrap();
    let e = s.set_anchor(&a).unwrap_err().to_string();
    assert!(
        e.contains("is a SQLite database") && e.contains("sqlite:"),
        "{e}"
    );
}

#[test]
fn a_batch_racing_a_concurrent_verify_is_run_again_never_lost() {
    // The batched PostgreSQL write reads rows without locks and compares and swaps
    // on each row's MAC; a commit by another process in between (a device row and
    // the history chain moved on) makes the batch run again on fresh rows.
    each_backend("batchrace", |s, dir| {
        let p = make_device(dir, 0x61, 16);
        let q = make_device(dir, 0x62, 16);
        enroll_from(s, &p, 0x61);
        enroll_from(s, &q, 0x62);
        let obs = |path: &Path| source(path).observe().unwrap();
        let items = vec![(0x61, obs(&p)), (0x62, obs(&q))];
        // The other process: a second connection to the same database.
        let other: Option<Service> = match s.db_kind() {
            "sqlite" => None, // SQLite locks the whole database for the batch.
            _ => {
                let url = pg_url().unwrap();
                let schema: String = {
                    let r = s.db_mut().query("SELECT current_schema()", &[]).unwrap();
                    r[0][0].text("schema").unwrap()
                };
                let db = hilrig_counters::store::PgDb::connect(&url, Some(&schema)).unwrap();
                Some(Service::with_db(Box::new(db), key()).unwrap())
            }
        };
        let Some(mut other) = other else {
            eprintln!("batchrace: sqlite serialises writers; the race is PostgreSQL's");
            return;
        };
        let q2 = q.clone();
        let fired = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let f2 = fired.clone();
        let mut once = Some(move || {
            // Commits a verify of 0x62: its row and the chain head change.
            let r = other.verify(0x62, &mut source(&q2)).unwrap();
            assert!(r.trusted());
        });
        s.set_batch_hook(Some(Box::new(move || {
            f2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Some(mut f) = once.take() {
                f();
            }
        })));
        let reps = s.verify_batch(&items).unwrap();
        s.set_batch_hook(None);
        assert_eq!(
            fired.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "run twice"
        );
        assert!(reps.iter().all(|r| r.trusted()), "{reps:?}");
        // Nothing was lost: both rows are current, the chain is whole, and a fresh
        // verify of each is trusted (a lost update would read as a replayed row).
        for (serial, path) in [(0x61, &p), (0x62, &q)] {
            assert!(s.device(serial).is_ok(), "{serial:#x}");
            assert!(s.verify(serial, &mut source(path)).unwrap().trusted());
        }
        let h = s.history(Some(0x62), 10).unwrap();
        assert!(h.iter().all(|e| e.intact));
        assert_eq!(
            h.len(),
            3,
            "the concurrent verify, the batch's and the last"
        );
    });
}

/// Issue 15: a writer holding an older head (it committed before another process
/// that anchored after it) must never move a file anchor back, and writers racing
/// from several threads leave the newest head they wrote.
#[test]
fn a_file_anchor_is_never_moved_back_by_a_writer_with_an_older_head() {
    use hilrig_counters::anchor::Anchor;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("anchor");
    Anchor::File(path.clone()).write(10, "mac10").unwrap();
    // The late writer with head 5: the anchor stays at 10.
    Anchor::File(path.clone()).write(5, "mac5").unwrap();
    assert_eq!(
        Anchor::File(path.clone()).read().unwrap(),
        Some((10, "mac10".to_string()))
    );
    // The same sequence with another MAC never rewrites it either.
    Anchor::File(path.clone()).write(10, "other").unwrap();
    assert_eq!(
        Anchor::File(path.clone()).read().unwrap(),
        Some((10, "mac10".to_string()))
    );
    // Four threads write interleaved heads 11..=410 out of order; at every moment
    // the anchor only moves forward, and it ends at the newest.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut seen = 0;
                for i in 0..100i64 {
                    let seq = if t % 2 == 0 {
                        11 + i * 4 + t
                    } else {
                        410 - i * 4 - (t - 1)
                    };
                    Anchor::File(path.clone())
                        .write(seq, &format!("mac{seq}"))
                        .unwrap();
                    let (now, mac) = Anchor::File(path.clone()).read().unwrap().unwrap();
                    assert!(now >= seen, "anchor moved back from {seen} to {now}");
                    assert!(now >= seq, "anchor {now} behind a head {seq} just written");
                    assert_eq!(mac, format!("mac{now}"));
                    seen = now;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        Anchor::File(path.clone()).read().unwrap(),
        Some((410, "mac410".to_string()))
    );
    // Two processes: a child that anchors an older head leaves the newer one.
    if let Ok(exe) = std::env::current_exe() {
        if std::env::var_os("HILRIG_ANCHOR_CHILD").is_none() {
            let st = std::process::Command::new(exe)
                .args([
                    "--exact",
                    "a_file_anchor_written_by_a_child_process",
                    "--nocapture",
                ])
                .env("HILRIG_ANCHOR_CHILD", &path)
                .status()
                .unwrap();
            assert!(st.success());
            assert_eq!(
                Anchor::File(path.clone()).read().unwrap(),
                Some((410, "mac410".to_string()))
            );
        }
    }
}

/// The child half of the test above (does nothing when run on its own).
#[test]
fn a_file_anchor_written_by_a_child_process() {
    use hilrig_counters::anchor::Anchor;
    if let Some(p) = std::env::var_os("HILRIG_ANCHOR_CHILD") {
        Anchor::File(PathBuf::from(p)).write(7, "mac7").unwrap();
    }
}

/// A database anchor (SQLite and PostgreSQL), like a file anchor: a head at the
/// stored sequence with another MAC never replaces the stored one (the stored
/// head is kept; a database holding the other head at that sequence is then
/// refused by the anchor check), an older head never moves it back, a newer one
/// moves it on.
#[test]
fn a_database_anchor_keeps_its_head_against_the_same_sequence_with_another_mac() {
    use hilrig_counters::anchor::Anchor;
    let dir = tempfile::tempdir().unwrap();
    let mut specs = vec![format!("sqlite:{}", dir.path().join("anchor.db").display())];
    specs.extend(pg_url());
    let name = fresh_schema("anchor_same_seq");
    for spec in &specs {
        let mut a = Anchor::open(spec, &name).unwrap();
        a.write(10, "mac10").unwrap();
        a.write(10, "other").unwrap();
        assert_eq!(a.read().unwrap(), Some((10, "mac10".to_string())), "{spec}");
        a.write(9, "mac9").unwrap();
        assert_eq!(a.read().unwrap(), Some((10, "mac10".to_string())), "{spec}");
        a.write(11, "mac11").unwrap();
        assert_eq!(a.read().unwrap(), Some((11, "mac11".to_string())), "{spec}");
    }
}

/// Two services anchoring overlapping devices at once in a PostgreSQL anchor
/// database do not deadlock: each writes its device entries in serial order
/// (in hash order, the two statements locked the shared rows in different
/// orders and PostgreSQL aborted one with a deadlock).
#[test]
fn concurrent_anchor_writes_of_overlapping_devices_do_not_deadlock() {
    use hilrig_counters::anchor::Anchor;
    let Some(url) = pg_url() else {
        eprintln!("postgresql SKIPPED: HILRIG_TEST_PG not set");
        return;
    };
    let name = fresh_schema("anchor_deadlock");
    drop(Anchor::open(&url, &name).unwrap());
    let threads: Vec<_> = (0..2i64)
        .map(|t| {
            let (url, name) = (url.clone(), name.clone());
            std::thread::spawn(move || {
                let mut a = Anchor::open(&url, &name).unwrap();
                for round in 0..30i64 {
                    let mut devices: Vec<_> = (0..300)
                        .map(|i| (format!("0x{i:x}"), round * 2 + t + 1, format!("m{t}")))
                        .collect();
                    if t == 1 {
                        devices.reverse();
                    }
                    a.write_with(round * 2 + t + 1, "head", &devices).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut a = Anchor::open(&url, &name).unwrap();
    let got = a.devices(&["0x0".to_string()]).unwrap();
    assert_eq!(got.get("0x0").map(|e| e.0), Some(60));
}

/// An anchor file is read bounded: a FIFO (it waited for ever), a link to
/// /dev/zero (read until memory ran out) and a file over the limit are refused
/// without being read, naming the file.
#[test]
fn an_anchor_file_that_is_a_fifo_a_device_or_too_large_is_refused_unread() {
    use hilrig_counters::anchor::{Anchor, MAX_ANCHOR_FILE};
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let zero = dir.path().join("zero");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let big = dir.path().join("big");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(MAX_ANCHOR_FILE + 1)
        .unwrap();
    for (p, why) in [
        (&fifo, "not a regular file"),
        (&zero, "not a regular file"),
        (&big, "over the limit"),
    ] {
        let e = Anchor::File(p.clone()).read().unwrap_err().to_string();
        assert!(
            e.contains(why) && e.contains(&p.display().to_string()),
            "{e}"
        );
        let e = Anchor::File(p.clone())
            .devices(&["0x1".to_string()])
            .unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
    }
}

/// An anchor file's lines: an error names the line (a byte that is not UTF-8
/// on a device line named the head); a negative sequence is refused; a serial on
/// two lines keeps the higher sequence whatever the order (the last line won),
/// and two lines at one sequence with different MACs are refused.
#[test]
fn an_anchor_files_lines_are_checked_one_by_one() {
    use hilrig_counters::anchor::Anchor;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("anchor");
    let one = ["0x1".to_string()];
    let with = |bytes: &[u8]| {
        std::fs::write(&p, bytes).unwrap();
        Anchor::File(p.clone()).devices(&one)
    };
    let e = with(b"5 h\n0x1 3 a\n0x2 4 \xff\n").unwrap_err().to_string();
    assert!(e.contains("line 3") && e.contains("UTF-8"), "{e}");
    let e = with(b"-5 h\n").unwrap_err().to_string();
    assert!(e.contains("line 1"), "{e}");
    let e = with(b"5 h\n0x1 -3 a\n").unwrap_err().to_string();
    assert!(e.contains("line 2"), "{e}");
    for text in ["5 h\n0x1 3 a\n0x1 2 b\n", "5 h\n0x1 2 b\n0x1 3 a\n"] {
        let got = with(text.as_bytes()).unwrap();
        assert_eq!(got.get("0x1"), Some(&(3, "a".to_string())), "{text:?}");
    }
    let e = with(b"5 h\n0x1 3 a\n0x1 3 b\n").unwrap_err().to_string();
    assert!(e.contains("line 3") && e.contains("same sequence"), "{e}");
    // Negative control: a well-formed file reads.
    assert_eq!(
        with(b"5 h\n0x1 3 a\n0x2 4 b\n").unwrap().get("0x1"),
        Some(&(3, "a".to_string()))
    );
    assert_eq!(
        Anchor::File(p.clone()).read().unwrap(),
        Some((5, "h".to_string()))
    );
}

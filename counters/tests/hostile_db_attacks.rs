//! More attacks on the database → counters service boundary (design brief §6):
//! a replayed database dressed up to match its anchor, deleted and reordered
//! history, edited and malformed device rows, a truncated file. Each must fail
//! closed with an error naming what and where, keep what it found, never panic.

mod common;
use common::*;
use hilrig_counters::service::Service;
use hilrig_counters::source::CounterSource;
use hilrig_counters::store::Val;
use hilrig_counters::DeviceState;
use hilrig_counters::{Error, Verdict};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const HIST_COLS: &str =
    "serial, at, verdict, severity, recoverable, state, observed, expected, reasons, mac, seq, prev";

/// A live database with a file anchor: device 0x61 enrolled and verified (the
/// copy in `backup` is taken then), then updated and verified again.
struct Lab {
    _dir: tempfile::TempDir,
    root: PathBuf,
    spec: String,
    anchor: PathBuf,
    dev: PathBuf,
    old_state: Vec<u8>,
}

fn lab() -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let live = root.join("live");
    std::fs::create_dir_all(&live).unwrap();
    let spec = live.join("counters.db").display().to_string();
    let anchor = root.join("anchor");
    let dev = make_device(&root, 0x61, 16);
    let old_state = std::fs::read(&dev).unwrap();
    {
        let mut s = Service::open(&spec, key()).unwrap();
        s.set_anchor(&anchor).unwrap();
        enroll_from(&mut s, &dev, 0x61);
        assert!(s.verify(0x61, &mut source(&dev)).unwrap().trusted());
    }
    copy_db(&live, &root.join("backup"));
    {
        let mut s = Service::open(&spec, key()).unwrap();
        s.set_anchor(&anchor).unwrap();
        update(&mut s, &dev, 0x61, 1);
        assert!(s.verify(0x61, &mut source(&dev)).unwrap().trusted());
        // The chain's head is another device's (not in the older copy).
        let d2 = make_device(&root, 0x62, 16);
        enroll_from(&mut s, &d2, 0x62);
        assert!(s.verify(0x62, &mut source(&d2)).unwrap().trusted());
    }
    Lab {
        _dir: dir,
        root,
        spec,
        anchor,
        dev,
        old_state,
    }
}

/// The columns of a device row that a replay puts back (all but the serial).
const ROW_COLS: &str =
    "state, c0, c1, c2, master, epoch, h0, h1, h2, reason, hold, verified_at, mac, hseq";

/// Device 0x61's row in the lab's older copy of the database (valid MAC).
fn backup_row(l: &Lab) -> Vec<Val> {
    let mut b = Service::open(
        &l.root.join("backup/counters.db").display().to_string(),
        key(),
    )
    .unwrap();
    b.db_mut()
        .query(&format!("SELECT {ROW_COLS} FROM devices"), &[])
        .unwrap()
        .remove(0)
}

/// Put `row` (the [`ROW_COLS`] of an older row) back as device `serial`'s row.
fn put_row_back(db: &mut dyn hilrig_counters::store::Db, row: &[Val], serial: &str) {
    let mut p = row.to_vec();
    p.push(serial.into());
    db.exec(
        "UPDATE devices SET state = $1, c0 = $2, c1 = $3, c2 = $4, master = $5, epoch = $6, h0 = $7, h1 = $8, h2 = $9, reason = $10, hold = $11, verified_at = $12, mac = $13, hseq = $14 WHERE serial = $15",
        &p,
    )
    .unwrap();
}

fn anchor_head(p: &Path) -> (i64, String) {
    let t = std::fs::read_to_string(p).unwrap();
    let mut it = t.split_whitespace();
    (
        it.next().unwrap().parse().unwrap(),
        it.next().unwrap().to_string(),
    )
}

fn history_rows(s: &mut Service, from_seq: i64, to_seq: i64) -> Vec<Vec<Val>> {
    s.db_mut()
        .query(
            &format!("SELECT {HIST_COLS} FROM history WHERE seq >= $1 AND seq <= $2 ORDER BY seq"),
            &[Val::I64(from_seq), Val::I64(to_seq)],
        )
        .unwrap()
}

fn insert_history(s: &mut Service, row: &[Val]) {
    s.db_mut()
        .exec(
            &format!(
                "INSERT INTO history ({HIST_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)"
            ),
            row,
        )
        .unwrap();
}

/// After the dressed-up replay: the open must be refused as replayed, naming the
/// anchored row; if it were not, the rolled-back device would be trusted.
fn assert_replay_refused(l: &Lab, what: &str) {
    std::fs::write(&l.dev, &l.old_state).unwrap();
    let mut s = Service::open(&l.spec, key()).unwrap();
    match s.set_anchor(&l.anchor) {
        Err(e @ Error::Replayed { .. }) => {
            let m = e.to_string();
            assert!(m.contains("history row"), "{what}: {m}");
        }
        Err(e) => panic!("{what}: refused, but not as a replay: {e}"),
        Ok(()) => {
            let r = s.verify(0x61, &mut source(&l.dev)).unwrap();
            panic!(
                "{what}: the replayed database was accepted; the rolled-back device: {:?} {:?}",
                r.decision.verdict, r.decision.reasons
            );
        }
    }
}

/// The attacker restores the older database and adds one history row at the
/// anchor's sequence carrying the anchored MAC (read from the anchor file, or
/// from the live database): its content is forged.
#[test]
fn a_replay_with_a_forged_row_carrying_the_anchored_mac_is_refused() {
    let l = lab();
    let (aseq, amac) = anchor_head(&l.anchor);
    restore_db(&l.root.join("backup"), &l.root.join("live"));
    {
        let mut s = Service::open(&l.spec, key()).unwrap();
        insert_history(
            &mut s,
            &[
                "nobody".into(),
                Val::I64(0),
                "trusted".into(),
                "info".into(),
                Val::I64(1),
                "trusted".into(),
                "".into(),
                "".into(),
                "[]".into(),
                Val::Text(amac),
                Val::I64(aseq),
                "x".into(),
            ],
        );
    }
    assert_replay_refused(&l, "forged anchored row");
}

/// The same with the genuine anchored row copied from the live database into the
/// older copy (its MAC is valid; the rows before it are missing).
#[test]
fn a_replay_with_the_genuine_anchored_row_copied_in_is_refused() {
    let l = lab();
    let (aseq, _) = anchor_head(&l.anchor);
    let row = {
        let mut s = Service::open(&l.spec, key()).unwrap();
        history_rows(&mut s, aseq, aseq).remove(0)
    };
    restore_db(&l.root.join("backup"), &l.root.join("live"));
    {
        let mut s = Service::open(&l.spec, key()).unwrap();
        insert_history(&mut s, &row);
    }
    assert_replay_refused(&l, "genuine anchored row copied");
}

/// The genuine rows from the anchored one down to two before it copied in (the
/// gap below them stays): only a walk of the whole chain would see it at open,
/// and open does not walk it (its cost would grow with the history). The
/// rolled-back device is caught at verify instead: its anchor entry names a
/// newer history row than its record, and that row is gone.
#[test]
fn a_replay_with_other_devices_genuine_rows_copied_in_is_refused() {
    // Device 0x62 makes the newest history; 0x61's rows stay in the gap.
    let l = lab();
    let dev2 = l.root.join("dev-62.state");
    {
        let mut s = Service::open(&l.spec, key()).unwrap();
        s.set_anchor(&l.anchor).unwrap();
        for _ in 0..3 {
            assert!(s.verify(0x62, &mut source(&dev2)).unwrap().trusted());
        }
    }
    let (aseq, _) = anchor_head(&l.anchor);
    let rows = {
        let mut s = Service::open(&l.spec, key()).unwrap();
        history_rows(&mut s, aseq - 2, aseq)
    };
    assert!(rows.iter().all(|r| r[0] == Val::Text("0x62".into())));
    restore_db(&l.root.join("backup"), &l.root.join("live"));
    {
        let mut s = Service::open(&l.spec, key()).unwrap();
        for r in &rows {
            insert_history(&mut s, r);
        }
    }
    assert_rolled_back_device_caught(&l, "other devices' genuine rows copied");
}

/// After a replay the open passes (the head and the row before it are as
/// anchored): the rolled-back device must then be refused at verify by its
/// anchor entry: quarantined, held, kept as evidence, never trusted.
fn assert_rolled_back_device_caught(l: &Lab, what: &str) {
    std::fs::write(&l.dev, &l.old_state).unwrap();
    let mut s = Service::open(&l.spec, key()).unwrap();
    match s.set_anchor(&l.anchor) {
        Err(e @ Error::Replayed { .. }) => return assert!(e.to_string().contains("history row")),
        Err(e) => panic!("{what}: refused, but not as a replay: {e}"),
        Ok(()) => {}
    }
    assert!(
        s.device(0x61).is_err(),
        "{what}: the record read as current"
    );
    for i in 0..2 {
        let r = s.verify(0x61, &mut source(&l.dev)).unwrap();
        assert_eq!(r.decision.verdict, Verdict::Quarantined, "{what}: {r:?}");
        // The first time by its anchor entry; then it is held (and its record
        // is also older than the quarantine's own history row).
        assert!(
            i > 0 || r.decision.reasons.iter().any(|x| x.contains("anchor")),
            "{what}: {:?}",
            r.decision.reasons
        );
    }
    assert!(!matches!(
        s.is_trusted(0x61, std::time::Duration::from_secs(60)),
        Ok(true)
    ));
    let ev = s.evidence().unwrap();
    assert!(
        ev.iter().any(|(t, k, _)| t == "devices" && k == "0x61"),
        "{what}: kept as evidence: {ev:?}"
    );
}

/// Deleting the newest history rows puts the head behind the anchor.
#[test]
fn deleting_the_newest_history_rows_is_refused_as_a_replay() {
    let l = lab();
    let (aseq, _) = anchor_head(&l.anchor);
    {
        let mut s = Service::open(&l.spec, key()).unwrap();
        s.db_mut()
            .exec("DELETE FROM history WHERE seq > $1", &[Val::I64(aseq - 2)])
            .unwrap();
    }
    let mut s = Service::open(&l.spec, key()).unwrap();
    let e = s.set_anchor(&l.anchor).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "database replayed: head {}, anchor {aseq}",
            aseq - 2
        )),
        "{e}"
    );
}

/// The device's older row (valid MAC) put back after its newer history rows were
/// hidden by `hide` (run with $1 = the old row's history seq); the chain's head
/// (another device's) and the anchor are untouched. The rolled-back device must
/// not be trusted.
fn replayed_row_with_newer_history_hidden(hide: &str) -> Lab {
    let l = lab();
    let dev2 = l.root.join("dev-62.state");
    let mut s = Service::open(&l.spec, key()).unwrap();
    s.set_anchor(&l.anchor).unwrap();
    let old_row = backup_row(&l);
    let Val::I64(old_hseq) = old_row[13] else {
        panic!("{old_row:?}")
    };
    assert!(s.verify(0x62, &mut source(&dev2)).unwrap().trusted());
    put_row_back(s.db_mut(), &old_row, "0x61");
    s.db_mut().exec(hide, &[Val::I64(old_hseq)]).unwrap();
    // device() names the anchor, not a MAC mismatch.
    let e = s.device(0x61).unwrap_err();
    assert!(
        matches!(e, Error::Anchor { .. }) && e.to_string().contains("anchored history"),
        "{e}"
    );
    drop(s);
    std::fs::write(&l.dev, &l.old_state).unwrap();
    assert_rolled_back_device_caught(&l, hide);
    l
}

/// Deleting the device's newer (middle) history rows below the head makes its
/// older row look current to the history alone: its anchor entry catches it.
#[test]
fn a_replayed_row_with_its_newer_history_deleted_is_never_trusted() {
    replayed_row_with_newer_history_hidden(
        "DELETE FROM history WHERE serial = '0x61' AND seq > $1",
    );
}

/// Clearing the hold of a replayed row is refused before anything is written
/// (it rewrote the row with a fresh sequence, so the replay checks no longer
/// fired and the older record was trusted); the device stays held.
#[test]
fn clearing_the_hold_of_a_replayed_row_is_refused() {
    let l = replayed_row_with_newer_history_hidden(
        "DELETE FROM history WHERE serial = '0x61' AND seq > $1",
    );
    let mut s = Service::open(&l.spec, key()).unwrap();
    s.set_anchor(&l.anchor).unwrap();
    let e = s
        .hold_clear(0x61, "reviewed", &mut source(&l.dev))
        .unwrap_err();
    assert!(matches!(e, Error::Tampered { .. }), "{e}");
    let r = s.verify(0x61, &mut source(&l.dev)).unwrap();
    assert_eq!(r.decision.verdict, Verdict::Quarantined, "{r:?}");
    assert!(!matches!(
        s.is_trusted(0x61, std::time::Duration::from_secs(60)),
        Ok(true)
    ));
}

/// The same without a gap: the device's newer history rows are moved to a serial
/// nobody has (their MACs fail, but only `history` shows it); the anchor entry
/// names a row that is no longer the device's.
#[test]
fn a_replayed_row_with_its_newer_history_moved_to_another_serial_is_never_trusted() {
    replayed_row_with_newer_history_hidden(
        "UPDATE history SET serial = '0x6100' WHERE serial = '0x61' AND seq > $1",
    );
}

/// A restored older database together with an older anchor file is accepted:
/// the anchor is the trust root, it must live where the database's attacker
/// cannot write (README, threat model). Pinned here so a change is noticed.
#[test]
fn an_older_database_with_an_older_anchor_is_the_documented_limit() {
    let l = lab();
    let live = l.root.join("live");
    // The attacker kept both from the same moment.
    let older_anchor = l.root.join("older-anchor");
    {
        let b = l.root.join("backup2");
        copy_db(&live, &b);
        std::fs::copy(&l.anchor, &older_anchor).unwrap();
        let mut s = Service::open(&l.spec, key()).unwrap();
        s.set_anchor(&l.anchor).unwrap();
        update(&mut s, &l.dev, 0x61, 2);
        restore_db(&b, &live);
    }
    std::fs::copy(&older_anchor, &l.anchor).unwrap();
    let mut s = Service::open(&l.spec, key()).unwrap();
    assert!(s.set_anchor(&l.anchor).is_ok());
}

/// Editing a counter and recomputing an unkeyed SHA-256 as the "MAC", or moving a
/// row to another serial, or swapping two rows' contents: each is quarantined,
/// held, kept as found and never rewritten.
#[test]
fn edited_moved_and_swapped_device_rows_are_quarantined_and_kept_as_found() {
    each_backend("edited_rows", |s, dir| {
        let a = make_device(dir, 0x71, 16);
        let b = make_device(dir, 0x72, 16);
        let c = make_device(dir, 0x73, 16);
        for (p, n) in [(&a, 0x71), (&b, 0x72), (&c, 0x73)] {
            enroll_from(s, p, n);
            assert!(s.verify(n, &mut source(p)).unwrap().trusted());
        }
        let row = |s: &mut Service, serial: &str| {
            s.db_mut()
                .query(
                    "SELECT serial, host, rack, state, c0, c1, c2, master, epoch, h0, h1, h2, reason, hold, verified_at, mac, hseq FROM devices WHERE serial = $1",
                    &[serial.into()],
                )
                .unwrap()
                .remove(0)
        };
        // 0x71: c0 raised, "MAC" an unkeyed SHA-256 of the row.
        let r = row(s, "0x71");
        let forged = hex::encode(Sha256::digest(format!("{r:?}+1").as_bytes()));
        s.db_mut()
            .exec(
                "UPDATE devices SET c0 = c0 + 1, mac = $1 WHERE serial = '0x71'",
                &[Val::Text(forged)],
            )
            .unwrap();
        // 0x72's row and 0x73's row swap contents (each keeps its serial).
        let r2 = row(s, "0x72");
        let r3 = row(s, "0x73");
        for (target, from) in [("0x72", &r3), ("0x73", &r2)] {
            let mut p: Vec<Val> = from[1..].to_vec();
            p.push(target.into());
            s.db_mut()
                .exec(
                    "UPDATE devices SET host=$1, rack=$2, state=$3, c0=$4, c1=$5, c2=$6, master=$7, epoch=$8, h0=$9, h1=$10, h2=$11, reason=$12, hold=$13, verified_at=$14, mac=$15, hseq=$16 WHERE serial = $17",
                    &p,
                )
                .unwrap();
        }
        let before: Vec<_> = ["0x71", "0x72", "0x73"].iter().map(|k| row(s, k)).collect();
        for (p, n) in [(&a, 0x71u64), (&b, 0x72), (&c, 0x73)] {
            for _ in 0..2 {
                let r = s.verify(n, &mut source(p)).unwrap();
                assert_eq!(r.decision.verdict, Verdict::Quarantined, "{n:x}");
                assert!(
                    r.decision.reasons[0].contains(&format!("{n:#x}")),
                    "{:?}",
                    r.decision.reasons
                );
            }
        }
        let after: Vec<_> = ["0x71", "0x72", "0x73"].iter().map(|k| row(s, k)).collect();
        assert_eq!(before, after, "tampered rows are never rewritten");
        let ev = s.evidence().unwrap();
        assert_eq!(ev.len(), 3, "{ev:?}");
        // Moving a row to another serial: the moved row fails its MAC too.
        s.db_mut()
            .exec(
                "UPDATE devices SET serial = '0x74' WHERE serial = '0x71'",
                &[],
            )
            .unwrap();
        let d = make_device(dir, 0x74, 16);
        let r = s.verify(0x74, &mut source(&d)).unwrap();
        assert_eq!(r.decision.verdict, Verdict::Quarantined);
        assert!(matches!(s.device(0x74), Err(Error::Tampered { .. })));
    });
}

/// A device row whose columns do not parse (text in a counter, a hash that is
/// not hex, a negative counter): quarantined, kept as found byte for byte, never
/// rewritten, no panic — on every read path.
#[test]
fn a_malformed_device_row_is_kept_as_found_and_never_trusted() {
    each_backend("malformed_row", malformed_rows);
}

fn malformed_rows(s: &mut Service, dir: &Path) {
    let mut edits = vec![
        (
            0x81u64,
            "UPDATE devices SET c0 = 5000000000 WHERE serial = $1",
        ),
        (0x82, "UPDATE devices SET h1 = 'zz' WHERE serial = $1"),
        (0x83, "UPDATE devices SET master = -1 WHERE serial = $1"),
    ];
    if s.db_kind() == "sqlite" {
        // SQLite keeps whatever type it is given.
        edits.push((0x84, "UPDATE devices SET c1 = 'many' WHERE serial = $1"));
        edits.push((0x85, "UPDATE devices SET hseq = x'00ff' WHERE serial = $1"));
    }
    let mut devs = Vec::new();
    for (n, sql) in edits {
        let p = make_device(dir, n, 16);
        enroll_from(s, &p, n);
        assert!(s.verify(n, &mut source(&p)).unwrap().trusted());
        s.db_mut()
            .exec(sql, &[Val::Text(format!("{n:#x}"))])
            .unwrap();
        devs.push((n, p));
    }
    let all = |s: &mut Service| {
        s.db_mut()
            .query("SELECT * FROM devices ORDER BY serial", &[])
            .unwrap()
    };
    let before = all(s);
    for (n, p) in &devs {
        for _ in 0..2 {
            let r = s.verify(*n, &mut source(p)).unwrap();
            assert_eq!(r.decision.verdict, Verdict::Quarantined, "{n:x}: {r:?}");
            assert!(!r.trusted());
        }
        assert!(s.device(*n).is_err(), "{n:x}");
        assert!(!matches!(
            s.is_trusted(*n, std::time::Duration::from_secs(60)),
            Ok(true)
        ));
    }
    // The batch path too.
    let obs: Vec<_> = devs
        .iter()
        .map(|(n, p)| (*n, source(p).observe().unwrap()))
        .collect();
    for r in s.verify_batch(&obs).unwrap() {
        assert_eq!(r.decision.verdict, Verdict::Quarantined);
    }
    assert_eq!(before, all(s), "malformed rows are never rewritten");
    let ev = s.evidence().unwrap();
    for (n, _) in &devs {
        assert!(
            ev.iter()
                .any(|(t, k, _)| t == "devices" && k == &format!("{n:#x}")),
            "{n:x} kept as evidence: {ev:?}"
        );
    }
    let _ = s.devices().unwrap();
    let _ = s.history(None, 100).unwrap();
}

/// Swapping two history rows' sequence numbers (reordering the chain): both
/// show as not intact, and an anchored one refuses the open.
#[test]
fn reordered_history_rows_are_shown_and_an_anchored_one_refuses_the_open() {
    let l = lab();
    let (aseq, _) = anchor_head(&l.anchor);
    {
        let mut s = Service::open(&l.spec, key()).unwrap();
        for (from, to) in [(aseq, -1), (aseq - 1, aseq), (-1, aseq - 1)] {
            s.db_mut()
                .exec(
                    "UPDATE history SET seq = $2 WHERE seq = $1",
                    &[Val::I64(from), Val::I64(to)],
                )
                .unwrap();
        }
        let h = s.history(None, 2).unwrap();
        assert!(h.iter().all(|e| !e.intact), "{h:?}");
    }
    let mut s = Service::open(&l.spec, key()).unwrap();
    let e = s.set_anchor(&l.anchor).unwrap_err();
    assert!(matches!(e, Error::Replayed { .. }), "{e}");
}

/// A truncated database file or a garbage anchor file: an error naming the file,
/// no panic, nothing trusted.
#[test]
fn a_truncated_database_or_a_garbage_anchor_is_an_error_naming_the_file() {
    let l = lab();
    let live = l.root.join("live");
    // Fold the WAL in first, so the main file holds the data.
    {
        let mut s = Service::open(&l.spec, key()).unwrap();
        s.db_mut().batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    }
    let db = live.join("counters.db");
    let len = std::fs::metadata(&db).unwrap().len();
    for keep in [len / 2, 100, 0] {
        let bytes = std::fs::read(&db).unwrap();
        let trunc = l.root.join(format!("t{keep}"));
        std::fs::create_dir_all(&trunc).unwrap();
        let p = trunc.join("counters.db");
        std::fs::write(&p, &bytes[..keep as usize]).unwrap();
        let spec = p.display().to_string();
        match Service::open(&spec, key()) {
            Err(e) => assert!(e.to_string().contains(&spec), "{keep}: {e}"),
            Ok(mut s) => {
                // A zero-length file is a new empty database: the anchor says
                // otherwise.
                let e = s.set_anchor(&l.anchor).unwrap_err();
                assert!(matches!(e, Error::Replayed { .. }), "{keep}: {e}");
            }
        }
    }
    for garbage in [&b"\xff\xfe"[..], b"", b"12", b"99999999999999999999 ab"] {
        std::fs::write(&l.anchor, garbage).unwrap();
        let mut s = Service::open(&l.spec, key()).unwrap();
        match s.set_anchor(&l.anchor) {
            Err(e) => assert!(
                e.to_string().contains(&l.anchor.display().to_string()),
                "{garbage:?}: {e}"
            ),
            Ok(()) => panic!("{garbage:?}: a garbage anchor was accepted"),
        }
    }
}

/// On one open service with a file anchor: device 0x61 enrolled and verified,
/// updated; 0x62 enrolled and verified (the chain's head). Then the older
/// database is emulated in SQL on the service's own connection (the newer
/// history rows and 0x62 deleted, 0x61's older row put back) and the device
/// rolled back. Returns (anchor, 0x61's state file, the older head, the
/// genuine history row at the anchor's sequence, the anchored MAC).
fn replay_in_sql(s: &mut Service, dir: &Path) -> (PathBuf, PathBuf, i64, Vec<Val>, String) {
    let anchor = dir.join("anchor");
    s.set_anchor(&anchor).unwrap();
    let dev = make_device(dir, 0x61, 16);
    let old_state = std::fs::read(&dev).unwrap();
    enroll_from(s, &dev, 0x61);
    assert!(s.verify(0x61, &mut source(&dev)).unwrap().trusted());
    let old_row = s
        .db_mut()
        .query(&format!("SELECT {ROW_COLS} FROM devices"), &[])
        .unwrap()
        .remove(0);
    let (h_old, _) = s.chain_head().unwrap();
    update(s, &dev, 0x61, 1);
    let d2 = make_device(dir, 0x62, 16);
    enroll_from(s, &d2, 0x62);
    assert!(s.verify(0x62, &mut source(&d2)).unwrap().trusted());
    let (aseq, amac) = anchor_head(&anchor);
    let genuine = history_rows(s, aseq, aseq).remove(0);
    let db = s.db_mut();
    db.exec("DELETE FROM history WHERE seq > $1", &[Val::I64(h_old)])
        .unwrap();
    db.exec("DELETE FROM devices WHERE serial = '0x62'", &[])
        .unwrap();
    put_row_back(db, &old_row, "0x61");
    std::fs::write(&dev, &old_state).unwrap();
    (anchor, dev, h_old, genuine, amac)
}

/// The two dressed-up replays on each backend (PostgreSQL too): the older
/// database emulated by [`replay_in_sql`], then a row at the anchor's sequence
/// is added: forged with the anchored MAC, then the genuine one.
#[test]
fn dressed_up_replays_are_refused_on_each_backend() {
    each_backend("dressed_up_replay", |s, dir| {
        let (anchor, _, _, genuine, amac) = replay_in_sql(s, dir);
        let (aseq, _) = anchor_head(&anchor);
        let mut forged = genuine.clone();
        forged[0] = "0x99".into();
        forged[9] = Val::Text(amac);
        for (what, row) in [("forged", forged), ("genuine", genuine)] {
            s.db_mut()
                .exec("DELETE FROM history WHERE seq = $1", &[Val::I64(aseq)])
                .unwrap();
            insert_history(s, &row);
            match s.set_anchor(&anchor) {
                Err(e @ Error::Replayed { .. }) => {
                    let m = e.to_string();
                    assert!(m.contains("history row"), "{what}: {m}");
                }
                other => panic!("{what}: the replayed database was accepted: {other:?}"),
            }
        }
    });
}

/// Malformed rows in the other tables (SQLite keeps any type in any column): an
/// open intent whose time is text, a hold whose reason is a blob, history rows
/// whose reasons are not JSON or whose flag is text, a catalog row whose time is
/// text. No panic; the device is never trusted while its intent or hold is
/// malformed, and the malformed intent, once the update it covers is counted,
/// quarantines it like a tampered one.
#[test]
fn malformed_intent_hold_history_and_catalog_rows_fail_closed() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("counters.db").display().to_string();
    let mut s = Service::open(&spec, key()).unwrap();
    let p = make_device(dir.path(), 0x91, 16);
    enroll_from(&mut s, &p, 0x91);
    assert!(s.verify(0x91, &mut source(&p)).unwrap().trusted());
    let img = image(3, 256);
    let h = image_hash(hilrig_device::Region::Config, &img);
    s.catalog_add(hilrig_device::Region::Config, &h, "v", "alice")
        .unwrap();
    let id = s
        .begin_update(0x91, hilrig_device::Region::Config, &h)
        .unwrap();
    // Nothing flashed yet: trusted, the intent stays open.
    assert!(s.verify(0x91, &mut source(&p)).unwrap().trusted());
    s.db_mut()
        .exec(
            "UPDATE intents SET created_at = 'yesterday' WHERE id = $1",
            &[Val::I64(id)],
        )
        .unwrap();
    // The intent matters once the update is counted (an unchanged device does
    // not read its intents).
    flash(&p, hilrig_device::Region::Config, &img);
    let r = s.verify(0x91, &mut source(&p));
    match &r {
        Ok(r) => {
            assert_eq!(r.decision.verdict, Verdict::Quarantined, "{r:?}");
            assert!(
                r.decision.reasons[0].contains(&format!("intents row {id}")),
                "{:?}",
                r.decision.reasons
            );
        }
        Err(e) => panic!("a malformed intent row made verify fail instead of quarantining: {e}"),
    }
    assert!(!s
        .device(0x91)
        .unwrap()
        .state
        .eq(&hilrig_counters::decide::DeviceState::Trusted));
    // A hold whose reason is a blob still holds.
    let q = make_device(dir.path(), 0x92, 16);
    enroll_from(&mut s, &q, 0x92);
    s.db_mut()
        .exec(
            "INSERT INTO holds (serial, reason, at, mac) VALUES ('0x92', x'00ff', 0, '')",
            &[],
        )
        .unwrap();
    assert!(!s.verify(0x92, &mut source(&q)).unwrap().trusted());
    // History and catalog rows that do not parse: shown, never a panic.
    s.db_mut()
        .exec(
            "UPDATE history SET reasons = '{', recoverable = 'yes' WHERE serial = '0x92'",
            &[],
        )
        .unwrap();
    s.db_mut()
        .exec("UPDATE catalog SET added_at = 'soon'", &[])
        .unwrap();
    let _ = s.history(None, 100);
    let _ = s.history(Some(0x92), 100);
    let _ = s.catalog_list();
    let _ = s.devices();
}

/// The database replayed under a running service (one open, many commands: the
/// lab service, a rig controller), emulated by [`replay_in_sql`] on the
/// service's own connection. The anchor is only
/// read at open and never moved back, so the next verify must see that the
/// head it anchored is gone.
#[test]
fn a_database_replayed_under_a_running_service_is_refused() {
    each_backend("replayed_under_service", |s, dir| {
        let (_, dev, h_old, _, _) = replay_in_sql(s, dir);
        for _ in 0..2 {
            match s.verify(0x61, &mut source(&dev)) {
                Err(e @ Error::Replayed { .. }) => {
                    let m = e.to_string();
                    assert!(m.contains("while the service ran"), "{m}");
                }
                Err(e) => panic!("refused, but not as a replay: {e}"),
                Ok(r) => panic!(
                    "a database replayed under the running service was used: {:?} {:?}",
                    r.decision.verdict, r.decision.reasons
                ),
            }
        }
        // Nothing was written: the history is as the attacker left it.
        assert_eq!(s.chain_head().unwrap().0, h_old);
    });
}

/// The negative control of the check above: two services open on one database
/// and one anchor, taking turns (each sees the other's newer rows, and its own
/// anchor write is then older than the stored one), are never refused.
#[test]
fn two_running_services_on_one_database_and_anchor_are_never_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("counters.db").display().to_string();
    let anchor = dir.path().join("anchor");
    let mut a = Service::open(&spec, key()).unwrap();
    a.set_anchor(&anchor).unwrap();
    let mut b = Service::open(&spec, key()).unwrap();
    b.set_anchor(&anchor).unwrap();
    let pa = make_device(dir.path(), 0xa1, 16);
    let pb = make_device(dir.path(), 0xb1, 16);
    enroll_from(&mut a, &pa, 0xa1);
    enroll_from(&mut b, &pb, 0xb1);
    for round in 0..3u8 {
        assert!(a.verify(0xa1, &mut source(&pa)).unwrap().trusted());
        assert!(b.verify(0xb1, &mut source(&pb)).unwrap().trusted());
        update(&mut b, &pb, 0xb1, round);
        assert!(a.verify(0xb1, &mut source(&pb)).unwrap().trusted());
        update(&mut a, &pa, 0xa1, 10 + round);
        assert!(b.verify(0xa1, &mut source(&pa)).unwrap().trusted());
    }
    let head = a.chain_head().unwrap();
    let mut c = Service::open(&spec, key()).unwrap();
    c.set_anchor(&anchor).unwrap();
    assert_eq!(head.0, c.chain_head().unwrap().0);
}

/// The negative control of the per-device anchor entries: two services on one
/// database and one anchor (a file, then a SQLite anchor database; PostgreSQL
/// too when `HILRIG_TEST_PG` is set) take turns over many devices — single
/// verifies, batches, authorised updates, each service seeing the other's newer
/// rows and anchor entries — and nothing is ever refused or quarantined.
#[test]
fn many_devices_updated_by_two_services_on_one_anchor_are_never_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sq = format!("sqlite:{}", dir.path().join("anchor.db").display());
    let file = dir.path().join("anchor").display().to_string();
    let mut runs: Vec<(String, String)> = [file, sq]
        .iter()
        .enumerate()
        .map(|(i, a)| {
            (
                dir.path().join(format!("c{i}.db")).display().to_string(),
                a.clone(),
            )
        })
        .collect();
    let mut schema = None;
    let mut scratch = None;
    if let Some(url) = pg_url() {
        // The anchor in a database of its own on the server.
        let a = hilrig_db::ScratchPg::create(
            &url,
            "anchor2svc",
            &hilrig_db::Settings::new("counters-test"),
        )
        .unwrap();
        let sc = fresh_schema("two_services_many");
        runs.push((format!("pg:{sc}"), a.url().to_string()));
        schema = Some(sc);
        scratch = Some(a);
    }
    for (spec, anchor) in &runs {
        let open = || -> Service {
            let mut s = match spec.strip_prefix("pg:") {
                Some(sc) => {
                    let url = pg_url().unwrap();
                    let db = hilrig_counters::store::PgDb::connect(&url, Some(sc)).unwrap();
                    Service::with_db(Box::new(db), key()).unwrap()
                }
                None => Service::open(spec, key()).unwrap(),
            };
            s.set_anchor_spec(anchor).unwrap();
            s
        };
        let (mut a, mut b) = (open(), open());
        let sub = dir.path().join(format!("devs-{}", spec.len()));
        std::fs::create_dir_all(&sub).unwrap();
        let devs: Vec<(u64, PathBuf)> = (0..12u64)
            .map(|i| (0x700 + i, make_device(&sub, 0x700 + i, 16)))
            .collect();
        for (i, (n, p)) in devs.iter().enumerate() {
            enroll_from(if i % 2 == 0 { &mut a } else { &mut b }, p, *n);
        }
        for round in 0..4u8 {
            for (i, (n, p)) in devs.iter().enumerate() {
                let (x, y) = if (i + round as usize) % 2 == 0 {
                    (&mut a, &mut b)
                } else {
                    (&mut b, &mut a)
                };
                let r = x.verify(*n, &mut source(p)).unwrap();
                assert!(r.trusted(), "{anchor} {n:x}: {:?}", r.decision);
                if i % 3 == round as usize % 3 {
                    update(y, p, *n, round * 16 + i as u8);
                }
                assert!(x.device(*n).is_ok(), "{anchor} {n:x}");
            }
            let obs: Vec<_> = devs
                .iter()
                .map(|(n, p)| (*n, source(p).observe().unwrap()))
                .collect();
            let s = if round % 2 == 0 { &mut a } else { &mut b };
            for r in s.verify_batch(&obs).unwrap() {
                assert!(r.trusted(), "{anchor} batch: {:?}", r.decision);
            }
        }
        // A third service opening afterwards: every device as anchored.
        let mut c = open();
        for (n, p) in &devs {
            assert!(c.verify(*n, &mut source(p)).unwrap().trusted(), "{anchor}");
        }
        assert!(c.evidence().unwrap().is_empty(), "{anchor}");
    }
    if let (Some(sc), Some(url)) = (schema, pg_url()) {
        hilrig_counters::store::PgDb::connect(&url, None)
            .unwrap()
            .drop_schema(&sc)
            .unwrap();
    }
    drop(scratch);
}

/// Services A and B on one database and one anchor: A verifies (its last
/// anchored head), B moves the chain and the anchor on, then the database is
/// replayed to between the two heads (B's newer rows gone, A's row still
/// there). A's own anchored head is intact, but the anchor's is gone: A's next
/// commit must be refused (the anchor never moves back, so its write would be
/// dropped and the replay go unseen).
fn replayed_between_two_services(a: &mut Service, b: &mut Service, dir: &Path) {
    let anchor = dir.join("anchor");
    a.set_anchor(&anchor).unwrap();
    b.set_anchor(&anchor).unwrap();
    let pa = make_device(dir, 0xa1, 16);
    let pb = make_device(dir, 0xb1, 16);
    enroll_from(a, &pa, 0xa1);
    assert!(a.verify(0xa1, &mut source(&pa)).unwrap().trusted());
    let (h_a, _) = a.chain_head().unwrap();
    enroll_from(b, &pb, 0xb1);
    assert!(b.verify(0xb1, &mut source(&pb)).unwrap().trusted());
    let (aseq, _) = anchor_head(&anchor);
    assert!(aseq > h_a, "B moved the anchor on: {aseq} > {h_a}");
    let db = b.db_mut();
    db.exec("DELETE FROM history WHERE seq > $1", &[Val::I64(h_a)])
        .unwrap();
    db.exec("DELETE FROM devices WHERE serial = '0xb1'", &[])
        .unwrap();
    for _ in 0..2 {
        match a.verify(0xa1, &mut source(&pa)) {
            Err(e @ Error::Replayed { .. }) => {
                let m = e.to_string();
                assert!(m.contains(&format!("history row {aseq}")), "{m}");
            }
            Err(e) => panic!("refused, but not as a replay: {e}"),
            Ok(r) => panic!(
                "the database replayed past B's head was used by A: {:?}",
                r.decision.verdict
            ),
        }
    }
    assert_eq!(a.chain_head().unwrap().0, h_a, "nothing was written");
    assert_eq!(anchor_head(&anchor).0, aseq, "the anchor never moves back");
}

#[test]
fn a_replay_past_another_services_head_is_refused_on_each_backend() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("counters.db").display().to_string();
    let mut a = Service::open(&spec, key()).unwrap();
    let mut b = Service::open(&spec, key()).unwrap();
    replayed_between_two_services(&mut a, &mut b, dir.path());
    let Some(url) = pg_url() else {
        eprintln!("postgresql SKIPPED: HILRIG_TEST_PG not set");
        return;
    };
    let schema = fresh_schema("replay_two_services");
    let open = || {
        let db = hilrig_counters::store::PgDb::connect(&url, Some(&schema)).unwrap();
        Service::with_db(Box::new(db), key()).unwrap()
    };
    let (mut a, mut b) = (open(), open());
    let pgdir = dir.path().join("pg");
    std::fs::create_dir_all(&pgdir).unwrap();
    replayed_between_two_services(&mut a, &mut b, &pgdir);
    drop((a, b));
    hilrig_counters::store::PgDb::connect(&url, None)
        .unwrap()
        .drop_schema(&schema)
        .unwrap();
}

/// The anchored row's own MAC check, alone: the content of the anchored history
/// row is edited in the live database, its `mac` and `prev` and the row before
/// it kept (so the anchored MAC matches and the chain check passes). The open
/// must be refused by the row's own MAC check.
#[test]
fn an_edited_anchored_row_fails_its_own_mac_check() {
    each_backend("edited_anchored_row", |s, dir| {
        let anchor = dir.join("anchor");
        s.set_anchor(&anchor).unwrap();
        let d = make_device(dir, 0x65, 16);
        enroll_from(s, &d, 0x65);
        assert!(s.verify(0x65, &mut source(&d)).unwrap().trusted());
        assert!(s.verify(0x65, &mut source(&d)).unwrap().trusted());
        let (aseq, amac) = anchor_head(&anchor);
        assert!(aseq > 1, "{aseq}");
        let before = history_rows(s, aseq - 1, aseq);
        s.db_mut()
            .exec(
                "UPDATE history SET reasons = '[\"edited\"]', verdict = 'quarantined' WHERE seq = $1",
                &[Val::I64(aseq)],
            )
            .unwrap();
        let after = history_rows(s, aseq - 1, aseq);
        assert_eq!(before[0], after[0], "the row before is kept");
        assert_eq!(before[1][9..], after[1][9..], "mac, seq and prev are kept");
        assert_eq!(after[1][9], Val::Text(amac));
        assert_ne!(before[1], after[1], "the content is edited");
        match s.set_anchor(&anchor) {
            Err(e @ Error::Replayed { .. }) => {
                let m = e.to_string();
                assert!(m.contains("fails its own MAC check"), "{m}");
            }
            other => panic!("the edited anchored row was accepted: {other:?}"),
        }
    });
}

/// An agreeing cross-check (VMM and hardware counted the same) on a replayed row
/// (the older row put back; its history and anchor entry left as they are) must
/// not rewrite it: that pointed it at the new history row and moved its anchor
/// entry on, hiding the replay for good.
#[test]
fn an_agreeing_cross_check_never_hides_a_replayed_row() {
    let l = lab();
    let mut s = Service::open(&l.spec, key()).unwrap();
    s.set_anchor(&l.anchor).unwrap();
    let old_row = backup_row(&l);
    put_row_back(s.db_mut(), &old_row, "0x61");
    let start = source(&l.dev).counters().unwrap();
    let found = device_row(&mut s, "0x61");
    let d = s.cross_check(0x61, &start, &start, 0).unwrap();
    assert_eq!(
        device_row(&mut s, "0x61"),
        found,
        "a replayed row is never rewritten"
    );
    assert_eq!(d.state, DeviceState::Quarantined, "{d:?}");
    // The verdict says so too (the CLI's exit code follows it), and the row is
    // kept as found and held, as `verify` does.
    assert_eq!(d.verdict, Verdict::Quarantined, "{d:?}");
    assert!(d.reasons.iter().any(|r| r.contains("replayed")), "{d:?}");
    let ev = s.evidence().unwrap();
    assert!(
        ev.iter().any(|(t, k, _)| t == "devices" && k == "0x61"),
        "{ev:?}"
    );
    let held = s
        .db_mut()
        .query("SELECT reason FROM holds WHERE serial = '0x61'", &[])
        .unwrap();
    assert_eq!(held.len(), 1, "the hold lives beside the row");
    // Still caught afterwards, by every reader.
    assert!(s.device(0x61).is_err());
    assert!(!matches!(
        s.is_trusted(0x61, std::time::Duration::from_secs(60)),
        Ok(true)
    ));
    let r = s.verify(0x61, &mut source(&l.dev)).unwrap();
    assert!(!r.trusted(), "{r:?}");
}

/// A cross-check on a device row that fails its MAC (its expected values edited
/// outside the service) never rewrites it, whether the counts agree or not: a
/// fresh MAC would launder the edit. It is kept as found and held, and an
/// agreeing count does not make the verdict trusted (the CLI exits 1).
#[test]
fn a_cross_check_never_rewrites_a_row_that_fails_its_mac() {
    each_backend("cross_check_edited_row", |s, dir| {
        let d = make_device(dir, 0x75, 16);
        enroll_from(s, &d, 0x75);
        assert!(s.verify(0x75, &mut source(&d)).unwrap().trusted());
        s.db_mut()
            .exec("UPDATE devices SET c0 = c0 + 5 WHERE serial = '0x75'", &[])
            .unwrap();
        let row = |s: &mut Service| {
            s.db_mut()
                .query("SELECT * FROM devices WHERE serial = '0x75'", &[])
                .unwrap()
        };
        let found = row(s);
        let start = source(&d).counters().unwrap();
        let mut end = start;
        end.master += 2;
        // Disagreeing: the hardware counted two attempts the VMM never saw.
        let r = s.cross_check(0x75, &start, &end, 0).unwrap();
        assert_eq!(r.verdict, Verdict::BypassedTrap, "{r:?}");
        assert_eq!(r.state, DeviceState::Quarantined, "{r:?}");
        assert!(
            r.reasons.iter().any(|x| x.contains("MAC mismatch")),
            "{r:?}"
        );
        assert_eq!(row(s), found, "a row that fails its MAC is never rewritten");
        assert!(matches!(s.device(0x75), Err(Error::Tampered { .. })));
        let ev = s.evidence().unwrap();
        assert!(
            ev.iter().any(|(t, k, _)| t == "devices" && k == "0x75"),
            "{ev:?}"
        );
        let held = s
            .db_mut()
            .query("SELECT reason FROM holds WHERE serial = '0x75'", &[])
            .unwrap();
        assert_eq!(held.len(), 1, "the hold lives beside the row");
        // Agreeing: still not trusted, still not rewritten.
        let r = s.cross_check(0x75, &start, &start, 0).unwrap();
        assert_eq!(r.verdict, Verdict::Quarantined, "{r:?}");
        assert_eq!(r.state, DeviceState::Quarantined, "{r:?}");
        assert_eq!(row(s), found, "a row that fails its MAC is never rewritten");
        let v = s.verify(0x75, &mut source(&d)).unwrap();
        assert!(!v.trusted(), "{v:?}");
    });
}

/// Device `serial`'s whole row, as stored.
fn device_row(s: &mut Service, serial: &str) -> Vec<Vec<Val>> {
    s.db_mut()
        .query("SELECT * FROM devices WHERE serial = $1", &[serial.into()])
        .unwrap()
}

/// Without an anchor, a replayed row (its own older row put back, valid MAC) is
/// caught by its history alone: an agreeing cross-check quarantines it and never
/// rewrites it. A row that does not parse is kept as found the same way. A held
/// device with an intact row is not reported trusted by an agreeing count.
#[test]
fn an_agreeing_cross_check_on_a_replayed_unparsable_or_held_row_is_not_trusted() {
    each_backend("cross_check_rows", |s, dir| {
        let devs: Vec<_> = [0x76u64, 0x77, 0x78]
            .iter()
            .map(|&n| (n, make_device(dir, n, 16)))
            .collect();
        for (n, d) in &devs {
            enroll_from(s, d, *n);
            assert!(s.verify(*n, &mut source(d)).unwrap().trusted());
        }
        // 0x76: its older row put back after a newer verify.
        let old = s
            .db_mut()
            .query(
                &format!("SELECT {ROW_COLS} FROM devices WHERE serial = '0x76'"),
                &[],
            )
            .unwrap()
            .remove(0);
        assert!(s.verify(0x76, &mut source(&devs[0].1)).unwrap().trusted());
        put_row_back(s.db_mut(), &old, "0x76");
        // 0x77: a counter that does not parse.
        s.db_mut()
            .exec("UPDATE devices SET c0 = -1 WHERE serial = '0x77'", &[])
            .unwrap();
        // 0x78: intact, held beside its row.
        s.db_mut()
            .exec(
                "INSERT INTO holds (serial, reason, at, mac) VALUES ('0x78', 'held by the test', 0, 'x')",
                &[],
            )
            .unwrap();
        for (n, d, why) in [
            (0x76u64, &devs[0].1, "older than its own history"),
            (0x77, &devs[1].1, "MAC mismatch"),
            (0x78, &devs[2].1, "held by the test"),
        ] {
            let key = format!("{n:#x}");
            let found = device_row(s, &key);
            let start = source(d).counters().unwrap();
            let r = s.cross_check(n, &start, &start, 0).unwrap();
            assert_eq!(r.verdict, Verdict::Quarantined, "{key}: {r:?}");
            assert!(r.reasons.iter().any(|x| x.contains(why)), "{key}: {r:?}");
            if n != 0x78 {
                assert_eq!(device_row(s, &key), found, "{key} is never rewritten");
                let ev = s.evidence().unwrap();
                assert!(
                    ev.iter().any(|(t, k, _)| t == "devices" && *k == key),
                    "{ev:?}"
                );
            }
        }
    });
}

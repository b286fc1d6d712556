//! Crash consistency: the service is killed (abort) at every seeded crash point of
//! an enrol / verify / authorised-update scenario, run in a child process (this test
//! binary re-executed). Afterwards a verify must give the right verdict, and no
//! expected value may have gone backwards.

mod common;
use common::*;
use hilrig_counters::crash;
use hilrig_counters::decide::Expected;
use hilrig_counters::mac::Key;
use hilrig_counters::service::{Enrollment, Service};
use hilrig_counters::source::CounterSource;
use hilrig_counters::store::{Db, PgDb, SqliteDb};
use hilrig_counters::{Error, Verdict};
use hilrig_device::model::ops;
use hilrig_device::regmap::{Reg, FLASH_CMD_LOCK};
use hilrig_device::{Device, Model, Region};
use std::io::Write;
use std::path::{Path, PathBuf};

const SERIAL: u64 = 0xc4a5;
const ROUNDS: usize = 11;

fn images() -> [Vec<u8>; 2] {
    [image(11, 6000), image(12, 5000)]
}

fn open(dir: &Path, backend: &str) -> Service {
    let db: Box<dyn Db> = if backend == "sqlite" {
        Box::new(SqliteDb::open(&dir.join("c.db")).unwrap())
    } else {
        let (url, schema) = backend.split_once('#').unwrap();
        Box::new(PgDb::connect(url, Some(schema)).unwrap())
    };
    let mut s = Service::with_db(db, Key::from_bytes([3; 32])).unwrap();
    s.rate_limit.max = 1000;
    // The chain head's external anchor: whatever point the process died at, the
    // anchor is never ahead of the database (a refused open here fails the sweep).
    // SQLite runs keep it in a second (SQLite) database, PostgreSQL runs in a file,
    // so the sweep covers both kinds of anchor writes.
    let anchor = if backend == "sqlite" {
        format!("sqlite:{}", dir.join("anchor.db").display())
    } else {
        dir.join(format!("anchor-{}", backend.len()))
            .display()
            .to_string()
    };
    s.set_anchor_spec(&anchor)
        .unwrap_or_else(|e| panic!("after a crash: {e}"));
    s
}

fn log(dir: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))
        .unwrap();
    writeln!(f, "{line}").unwrap();
    f.sync_all().unwrap();
}

fn log_expected(dir: &Path, s: &mut Service) {
    let e = s.device(SERIAL).unwrap().expected;
    log(dir, &format!("exp {}", serde_json::to_string(&e).unwrap()));
}

fn flash_steps(p: &Path, region: Region, img: &[u8]) {
    let mut m = Model::open(p).unwrap();
    ops::unlock(&mut m).unwrap();
    crash::point("flash: unlocked");
    ops::erase(&mut m, region).unwrap();
    crash::point("flash: erased");
    ops::program(&mut m, region, 0, 0, img).unwrap();
    crash::point("flash: programmed");
    m.write32(Reg::FlashCmd.offset(), FLASH_CMD_LOCK).unwrap();
    crash::point("flash: locked");
}

/// The child: runs the scenario; HILRIG_CRASH_AT aborts it part-way.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("HILRIG_CRASH_DIR") else {
        return; // only meaningful when re-executed by crash_consistency
    };
    let dir = PathBuf::from(dir);
    let backend = std::env::var("HILRIG_CRASH_BACKEND").unwrap();
    let dev = dir.join("dev.state");
    let mut s = open(&dir, &backend);
    let obs = source(&dev).observe().unwrap();
    s.enroll(
        &Enrollment {
            serial: SERIAL,
            host: "h".into(),
            rack: "r".into(),
            expected: obs.as_expected(),
        },
        false,
    )
    .unwrap();
    log(&dir, "enrolled");
    log_expected(&dir, &mut s);
    s.verify(SERIAL, &mut source(&dev)).unwrap();
    log_expected(&dir, &mut s);
    let imgs = images();
    for k in 0..ROUNDS {
        if k % 3 == 2 {
            // A refused attempt (locked), then a verify.
            let mut m = Model::open(&dev).unwrap();
            ops::erase(&mut m, Region::Config).unwrap();
            drop(m);
            crash::point("refused attempt made");
            s.verify(SERIAL, &mut source(&dev)).unwrap();
            log_expected(&dir, &mut s);
            continue;
        }
        let img = &imgs[k % 2];
        let h = image_hash(Region::Firmware, img);
        let id = s.begin_update(SERIAL, Region::Firmware, &h).unwrap();
        flash_steps(&dev, Region::Firmware, img);
        let r = s.commit_update(SERIAL, id, &mut source(&dev)).unwrap();
        assert!(r.trusted(), "{:?}", r.decision);
        log_expected(&dir, &mut s);
        s.verify(SERIAL, &mut source(&dev)).unwrap();
        log_expected(&dir, &mut s);
        if k % 3 == 1 {
            // The batch path (a rack after a campaign) crashes consistently too.
            let o = source(&dev).observe().unwrap();
            s.verify_batch(&[(SERIAL, o.clone()), (SERIAL, o)]).unwrap();
            log_expected(&dir, &mut s);
        }
    }
    println!("\nPOINTS {}", crash::hits());
}

fn le(a: &Expected, b: &Expected) -> bool {
    a.master <= b.master
        && a.epoch <= b.epoch
        && (a.epoch < b.epoch || a.counters.iter().zip(&b.counters).all(|(x, y)| x <= y))
}

fn prepare(dir: &Path, backend: &str) {
    make_device(dir, SERIAL, 64);
    std::fs::rename(
        dir.join(format!("dev-{SERIAL:x}.state")),
        dir.join("dev.state"),
    )
    .unwrap();
    let mut s = open(dir, backend);
    for img in images() {
        s.catalog_add(
            Region::Firmware,
            &image_hash(Region::Firmware, &img),
            "v",
            "ci",
        )
        .unwrap();
    }
}

fn run_child(dir: &Path, backend: &str, at: Option<u64>) -> (bool, String) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env("HILRIG_CRASH_DIR", dir)
        .env("HILRIG_CRASH_BACKEND", backend)
        .env_remove(crash::ENV);
    if let Some(n) = at {
        cmd.env(crash::ENV, n.to_string());
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// After a crash at point `at`: resolve and check.
fn check_recovery(dir: &Path, backend: &str, at: u64) {
    let dev = dir.join("dev.state");
    let logtext = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    let lower: Option<Expected> = logtext
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("exp "))
        .map(|j| serde_json::from_str(j).unwrap());
    let mut s = open(dir, backend);
    let before = match s.device(SERIAL) {
        Ok(r) => r.expected,
        Err(Error::UnknownDevice(_)) => {
            assert!(
                !logtext.contains("enrolled"),
                "seed {at}: enrolled device vanished"
            );
            assert!(
                s.history(None, 10).unwrap().is_empty(),
                "seed {at}: half an enrol"
            );
            let obs = source(&dev).observe().unwrap();
            s.enroll(
                &Enrollment {
                    serial: SERIAL,
                    host: "h".into(),
                    rack: "r".into(),
                    expected: obs.as_expected(),
                },
                false,
            )
            .unwrap();
            s.device(SERIAL).unwrap().expected
        }
        Err(e) => panic!("seed {at}: {e}"),
    };
    if let Some(l) = &lower {
        assert!(
            le(l, &before),
            "seed {at}: expected went backwards: {l:?} -> {before:?}"
        );
    }
    let r = s.verify(SERIAL, &mut source(&dev)).unwrap();
    eprintln!("seed {at}: recovered with {}", r.decision.verdict);
    let r = match r.decision.verdict {
        Verdict::Trusted | Verdict::AcceptedUpdate => r,
        Verdict::NeedsReflash => {
            // Interrupted mid-flash: an open intent names the image to finish with.
            let target = s.history(Some(SERIAL), 1).unwrap();
            assert!(!target.is_empty());
            let imgs = images();
            let mut done = false;
            for img in &imgs {
                // Reflash the image of the open intent (whichever it is).
                let h = image_hash(Region::Firmware, img);
                let dbrows = s
                    .db_mut()
                    .query(
                        "SELECT id FROM intents WHERE status = 'open' AND target = $1",
                        &[h.clone().into()],
                    )
                    .unwrap();
                if !dbrows.is_empty() {
                    flash_steps(&dev, Region::Firmware, img);
                    done = true;
                    break;
                }
            }
            assert!(done, "seed {at}: needs-reflash without an open intent");
            let r = s.verify(SERIAL, &mut source(&dev)).unwrap();
            assert_eq!(
                r.decision.verdict,
                Verdict::AcceptedUpdate,
                "seed {at}: {:?}",
                r.decision
            );
            r
        }
        _ => panic!("seed {at}: wrong verdict after a crash: {:?}", r.decision),
    };
    assert!(r.trusted(), "seed {at}");
    let after = s.device(SERIAL).unwrap().expected;
    assert!(le(&before, &after), "seed {at}: {before:?} -> {after:?}");
    let obs = source(&dev).observe().unwrap();
    assert_eq!(after, obs.as_expected(), "seed {at}");
    assert!(
        s.history(None, 1000).unwrap().iter().all(|h| h.intact),
        "seed {at}"
    );
}

fn campaign(
    backend_for: &(dyn Fn(u64) -> (String, Option<String>) + Sync),
    seeds: Vec<u64>,
) -> usize {
    let seeds = std::sync::Mutex::new(seeds.into_iter());
    let done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| loop {
                let Some(at) = seeds.lock().unwrap().next() else {
                    return;
                };
                let dir = tempfile::tempdir().unwrap();
                let (backend, cleanup) = backend_for(at);
                prepare(dir.path(), &backend);
                let (ok, out) = run_child(dir.path(), &backend, Some(at));
                assert!(!ok, "seed {at}: the child did not crash:\n{out}");
                assert!(out.contains("crash point"), "seed {at}: {out}");
                check_recovery(dir.path(), &backend, at);
                if let Some(schema) = cleanup {
                    let url = backend.split_once('#').unwrap().0;
                    PgDb::connect(url, None)
                        .unwrap()
                        .drop_schema(&schema)
                        .unwrap();
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            });
        }
    });
    done.into_inner()
}

#[test]
fn crash_consistency() {
    if std::env::var("HILRIG_CRASH_DIR").is_ok() {
        return;
    }
    // A full run without a crash counts the points.
    let dir = tempfile::tempdir().unwrap();
    prepare(dir.path(), "sqlite");
    let (ok, out) = run_child(dir.path(), "sqlite", None);
    assert!(ok, "{out}");
    let total: u64 = out
        .lines()
        .find_map(|l| l.split("POINTS ").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no POINTS line:\n{out}"));
    assert!(total >= 200, "only {total} crash points");
    let n = campaign(&|_| ("sqlite".into(), None), (1..=total).collect());
    eprintln!("sqlite: crashed and recovered at {n} of {total} points");
    assert_eq!(n as u64, total);
    match pg_url() {
        None => eprintln!("crash_consistency: postgresql SKIPPED: HILRIG_TEST_PG not set"),
        Some(url) => {
            // Every 4th point on PostgreSQL (each needs its own schema).
            let seeds: Vec<u64> = (1..=total).filter(|n| n % 4 == 1).collect();
            let n = campaign(
                &|at| {
                    let schema = fresh_schema(&format!("crash{at}"));
                    (format!("{url}#{schema}"), Some(schema))
                },
                seeds.clone(),
            );
            eprintln!("postgresql: crashed and recovered at {n} points");
            assert_eq!(n, seeds.len());
        }
    }
}

//! `hilrig bench counters`: verifications per second over 100,000 enrolled devices,
//! on SQLite and on PostgreSQL in the same run.
//!
//! A verification here is the store-side decision: the observation (counters and
//! region hashes) is supplied in memory, so the device and its UART are not the
//! bottleneck (a real OOB read at 115200 baud takes milliseconds). Each one reads the
//! device row and checks its MAC, loads open intents, decides, rewrites the row with
//! a new MAC and appends a MACed history row. Devices are verified a rack (1,000) per
//! transaction, as the rig does after a campaign.
//!
//! Scale rows: at each size (`$HILRIG_BENCH_COUNTERS_SIZES`, default 1,000 and
//! 100,000 devices), `hilrig counters status` and `master --by rack` run as child
//! processes (time and their own peak RSS), and one `verify` call (its own
//! transaction) is timed; each row is compared with the same row at the smallest
//! size in the same run.

use crate::figure::Figure;
use hilrig_counters::decide::{decide, Expected, Observation};
use hilrig_counters::mac::Key;
use hilrig_counters::service::{Enrollment, Service};
use hilrig_counters::store::{Db, PgDb, SqliteDb};
use hilrig_counters::{Result, Verdict};
use hilrig_device::oob::CounterReport;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Devices enrolled for the benchmark.
pub const DEVICES: u64 = 100_000;
const BATCH: usize = 1000;

fn expected_of(i: u64) -> Expected {
    let c = [(i % 7) as u32, (i % 11) as u32, (i % 3) as u32];
    let mut hashes = [[0u8; 32]; 3];
    for (r, h) in hashes.iter_mut().enumerate() {
        h[..8].copy_from_slice(&i.to_le_bytes());
        h[8] = r as u8;
    }
    Expected {
        counters: c,
        master: c.iter().sum(),
        epoch: 0,
        hashes,
    }
}

fn observation_of(e: &Expected) -> Observation {
    Observation {
        report: CounterReport {
            counters: e.counters,
            master: e.master,
            fuse: false,
            slots_left: 64 - e.counters.iter().max().copied().unwrap_or(0),
            width: 64,
            epoch: e.epoch,
        },
        hashes: e.hashes,
    }
}

/// Enrol devices `from..to` (5,000 a transaction); returns devices per second.
fn populate(svc: &mut Service, from: u64, to: u64) -> Result<f64> {
    let t = Instant::now();
    let mut batch = Vec::with_capacity(5000);
    for i in from..to {
        batch.push(Enrollment {
            serial: 0x1_0000_0000 + i,
            host: format!("host-{}", i / 4),
            rack: format!("rack-{}", i / 160),
            expected: expected_of(i),
        });
        if batch.len() == 5000 {
            svc.enroll_many(&batch)?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        svc.enroll_many(&batch)?;
    }
    Ok((to - from) as f64 / t.elapsed().as_secs_f64())
}

/// Batched verification, measured in slices so two backends can take turns (the
/// machine's load then weighs on both alike).
struct Rater {
    items: Vec<(u64, Observation)>,
    off: usize,
    n: usize,
    secs: f64,
}

impl Rater {
    fn new() -> Rater {
        Rater {
            items: (0..DEVICES)
                .map(|i| (0x1_0000_0000 + i, observation_of(&expected_of(i))))
                .collect(),
            off: 0,
            n: 0,
            secs: 0.0,
        }
    }

    fn run(&mut self, svc: &mut Service, budget: Duration) -> Result<()> {
        let t = Instant::now();
        let mut n = 0;
        while t.elapsed() < budget || n == 0 {
            let end = (self.off + BATCH).min(self.items.len());
            // The batch after this one (read ahead while this one writes, where
            // the backend has a read-ahead connection).
            let next = if end == self.items.len() { 0 } else { end };
            let next_end = (next + BATCH).min(self.items.len());
            let reps =
                svc.verify_batch_ahead(&self.items[self.off..end], &self.items[next..next_end])?;
            if let Some(r) = reps.iter().find(|r| r.decision.verdict != Verdict::Trusted) {
                return Err(hilrig_counters::Error::Input(format!(
                    "benchmark device {} was not trusted: {:?}",
                    r.serial, r.decision
                )));
            }
            n += reps.len();
            self.off = if end == self.items.len() { 0 } else { end };
        }
        self.n += n;
        self.secs += t.elapsed().as_secs_f64();
        Ok(())
    }

    fn rate(&self) -> f64 {
        self.n as f64 / self.secs.max(1e-9)
    }
}

/// Database sizes of the scale rows: `$HILRIG_BENCH_COUNTERS_SIZES` (comma-separated
/// device counts, e.g. `1000,100000,1000000`), else 1,000 and 100,000.
fn sizes() -> Vec<u64> {
    let mut v: Vec<u64> = std::env::var("HILRIG_BENCH_COUNTERS_SIZES")
        .ok()
        .map(|s| {
            s.split(',')
                .filter_map(|x| x.trim().replace('_', "").parse().ok())
                .filter(|n| *n > 0)
                .collect()
        })
        .unwrap_or_default();
    if v.is_empty() {
        v = vec![1_000, DEVICES];
    }
    if !v.contains(&DEVICES) {
        v.push(DEVICES);
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// Run `cmd` (a `hilrig counters` command) to its end; returns (seconds, its peak
/// RSS in MiB). The peak is the child's own VmHWM, which it writes to a file named
/// by [`hilrig_counters::cli::PEAK_RSS_ENV`]: `ru_maxrss` from `wait4` would not do, as Linux
/// starts a child's at its parent's peak RSS when it execs (`exec_mmap`), so a big
/// parent hides a small child. Its stdout is discarded, its stderr goes to
/// `stderr_file` and is quoted when it fails.
pub fn run_measured(cmd: &mut std::process::Command, stderr_file: &Path) -> Result<(f64, f64)> {
    let shown = format!("{cmd:?}");
    let fail = |d: String| hilrig_counters::Error::Input(format!("measuring {shown}: {d}"));
    let err_file = std::fs::File::create(stderr_file)
        .map_err(|e| fail(format!("{}: {e}", stderr_file.display())))?;
    let rss_file = stderr_file.with_extension("peak-rss");
    let _ = std::fs::remove_file(&rss_file);
    let t = Instant::now();
    let out = cmd
        .env(hilrig_counters::cli::PEAK_RSS_ENV, &rss_file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(err_file)
        .status()
        .map_err(|e| fail(e.to_string()))?;
    let secs = t.elapsed().as_secs_f64();
    if !out.success() {
        let msg = std::fs::read_to_string(stderr_file).unwrap_or_default();
        return Err(fail(format!(
            "failed ({out}): {}",
            msg.chars().take(2000).collect::<String>()
        )));
    }
    let text = std::fs::read_to_string(&rss_file)
        .map_err(|e| fail(format!("its peak RSS ({}): {e}", rss_file.display())))?;
    let kib: f64 = text
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| fail(format!("its peak RSS {text:?} is not \"N kB\"")))?;
    Ok((secs, kib / 1024.0))
}

/// Run `hilrig counters ARGS` as a child process (this executable, which embeds
/// `counters`); returns (seconds, peak RSS in MiB).
fn child(args: &[&str], dir: &Path) -> Result<(f64, f64)> {
    let exe = std::env::current_exe().map_err(|e| {
        hilrig_counters::Error::Input(format!("bench: finding this executable: {e}"))
    })?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("counters").args(args);
    run_measured(&mut cmd, &dir.join("child.stderr"))
}

/// Seconds per single `verify` call (its own transaction, as `hilrig counters
/// verify` makes) over `n` enrolled devices.
fn verify_per_call(svc: &mut Service, n: u64, budget: Duration) -> Result<f64> {
    let t = Instant::now();
    let mut calls = 0u64;
    while t.elapsed() < budget || calls < 10 {
        let i = (calls.wrapping_mul(7919) + 13) % n;
        let r = svc.verify_observation(0x1_0000_0000 + i, Ok(observation_of(&expected_of(i))))?;
        if r.decision.verdict != Verdict::Trusted {
            return Err(hilrig_counters::Error::Input(format!(
                "benchmark device {} was not trusted: {:?}",
                r.serial, r.decision
            )));
        }
        calls += 1;
    }
    Ok(t.elapsed().as_secs_f64() / calls as f64)
}

/// One backend under test: its service, how a child process reaches it, and its
/// scale rows so far.
struct Backend {
    label: &'static str,
    svc: Service,
    db_arg: String,
    have: u64,
    first: Option<[usize; 5]>,
    enrol: f64,
}

/// The scale rows of `b` at every size in `sizes` (growing its database): `status`
/// and `master --by rack` as child processes (time and peak RSS) and one verify
/// call, each compared with the first size's row.
fn scale_rows(
    figs: &mut Vec<Figure>,
    b: &mut Backend,
    sizes: &[u64],
    key_file: &Path,
    dir: &Path,
    budget: Duration,
) -> Result<()> {
    let key_arg = key_file.display().to_string();
    for &n in sizes {
        let enr = populate(&mut b.svc, b.have, n)?;
        if n == DEVICES {
            b.enrol = enr;
        }
        b.have = n;
        let db = b.db_arg.clone();
        let (ts, rs) = child(&["status", "--db", &db, "--key", &key_arg], dir)?;
        let (tm, rm) = child(
            &["master", "--by", "rack", "--db", &db, "--key", &key_arg],
            dir,
        )?;
        let per = verify_per_call(&mut b.svc, n, budget / 4)?;
        let mut row = [0usize; 5];
        for (k, (name, v, unit)) in [
            ("status: time", ts * 1e3, "ms"),
            ("status: peak RSS", rs, "MiB"),
            ("master --by rack: time", tm * 1e3, "ms"),
            ("master --by rack: peak RSS", rm, "MiB"),
            ("verify: one call", per * 1e6, "us/call"),
        ]
        .into_iter()
        .enumerate()
        {
            row[k] = figs.len();
            let mut f = Figure::new(format!("{}: {n} devices, {name}", b.label), v, unit);
            if let Some(first) = b.first {
                f = f.vs(first[k]);
            }
            if k == 1 || k == 3 {
                f = f.target("flat from 1k (ratio ~1)");
            }
            figs.push(f);
        }
        if b.first.is_none() {
            b.first = Some(row);
        }
    }
    Ok(())
}

/// Where the SQLite database goes: `$HILRIG_BENCH_DIR`, else `/dev/shm` (memory:
/// no flush cost, as the test PostgreSQL server runs with `fsync=off`, so the two
/// rows compare the service's own work and not this machine's shared disk), else
/// the temporary directory.
fn bench_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HILRIG_BENCH_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

/// A database named `name` on the server of `url` (same credentials).
fn pg_db_url(url: &str, name: &str) -> String {
    let (main, query) = match url.split_once('?') {
        Some((m, q)) => (m, format!("?{q}")),
        None => (url, String::new()),
    };
    let after = main.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match main[after..].find('/') {
        Some(i) => &main[..after + i],
        None => main,
    };
    format!("{base}/{name}{query}")
}

/// Verifications per second on SQLite (and PostgreSQL when `pg_url` is given),
/// against the bare in-memory decision as the baseline; and the scale rows
/// (`status`, `master`, one verify) at each size of [`sizes`].
pub fn bench_counters(budget: Duration, pg_url: Option<&str>) -> Result<Vec<Figure>> {
    let key = Key::from_bytes([0x42; 32]);
    let mut figs = Vec::new();
    // Baseline: the decision alone, no store.
    let exps: Vec<Expected> = (0..1000).map(expected_of).collect();
    let obs: Vec<Observation> = exps.iter().map(observation_of).collect();
    let none = |_: hilrig_device::Region, _: &hilrig_counters::decide::Hash| false;
    let r = crate::figure::rate(budget, 1000, |i| {
        let k = (i % 1000) as usize;
        std::hint::black_box(decide(&exps[k], &obs[k], &none, &[]));
    });
    figs.push(Figure::new("decide() in memory (no store)", r, "verify/s"));

    let dir: PathBuf = bench_dir().join(format!("hilrig-bench-counters-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| hilrig_counters::Error::db(&format!("creating {}", dir.display()), e))?;
    let result = (|| -> Result<()> {
        // The same key as a key file, for the child processes.
        let key_file = dir.join("bench.key");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key_file)
                .and_then(|mut f| {
                    f.write_all(format!("{}\n", hex::encode([0x42u8; 32])).as_bytes())?;
                    Ok(f)
                })
                .map_err(|e| {
                    hilrig_counters::Error::Input(format!("bench: {}: {e}", key_file.display()))
                })?;
            let _ = f.flush();
        }
        let db_path = dir.join("bench.db");
        let sizes = sizes();
        let (small, large): (Vec<u64>, Vec<u64>) = sizes.iter().partition(|&&n| n <= DEVICES);
        let mut backends = vec![Backend {
            label: "sqlite",
            svc: Service::with_db(Box::new(SqliteDb::open(&db_path)?), key.clone())?,
            db_arg: db_path.display().to_string(),
            have: 0,
            first: None,
            enrol: 0.0,
        }];
        let pg_name = format!("hilrig_bench_{}", std::process::id());
        let mut admin = None;
        if let Some(url) = pg_url {
            let mut a = PgDb::connect(url, None)?;
            a.batch(&format!("CREATE DATABASE \"{pg_name}\""))?;
            admin = Some(a);
            let bench_url = pg_db_url(url, &pg_name);
            let db = PgDb::connect(&bench_url, None)?;
            let mut svc = Service::with_db(Box::new(db) as Box<dyn Db>, key.clone())?;
            // The next batch's rows are read on a second connection while a
            // batch writes (`Service::verify_batch_ahead`).
            svc.set_read_ahead(Box::new(PgDb::connect(&bench_url, None)?))?;
            backends.push(Backend {
                label: "postgresql",
                svc,
                db_arg: bench_url,
                have: 0,
                first: None,
                enrol: 0.0,
            });
        }
        let r = (|| -> Result<()> {
            for b in backends.iter_mut() {
                scale_rows(&mut figs, b, &small, &key_file, &dir, budget)?;
            }
            // Batched verify at 100,000 devices: the backends take turns, 8 slices
            // each, so a change in the machine's load weighs on both alike.
            let mut raters: Vec<Rater> = backends.iter().map(|_| Rater::new()).collect();
            for b in backends.iter_mut() {
                b.svc.reset_batch_profile();
            }
            for _ in 0..8 {
                for (b, r) in backends.iter_mut().zip(raters.iter_mut()) {
                    r.run(&mut b.svc, budget / 8)?;
                }
            }
            let first = figs.len();
            for (i, (b, r)) in backends.iter().zip(&raters).enumerate() {
                let f = Figure::new(
                    format!(
                        "{}: verify over {DEVICES} devices ({BATCH}/transaction)",
                        b.label
                    ),
                    r.rate(),
                    "verify/s",
                );
                figs.push(if i == 0 {
                    f.vs(0).target(">= 50,000/s")
                } else {
                    f.vs(first).target(">= 0.5 x sqlite")
                });
            }
            // The anchor's cost (SQLite): the same batched verify and one verify
            // call with a file anchor and with a SQLite anchor database, as
            // ratios against the unanchored rows of this run. Each commit reads
            // the device entries and writes the head and the entries of the
            // devices it verified; a file anchor is rewritten whole (one line per
            // device anchored so far).
            let batched = first;
            let per0 = verify_per_call(&mut backends[0].svc, DEVICES, budget / 4)?;
            let call0 = figs.len();
            figs.push(Figure::new(
                format!("sqlite: one verify call over {DEVICES} devices, no anchor"),
                per0 * 1e6,
                "us/call",
            ));
            let anchors = [
                ("file anchor", dir.join("anchor").display().to_string()),
                (
                    "anchor database (sqlite:)",
                    format!("sqlite:{}", dir.join("anchor.db").display()),
                ),
            ];
            for (label, spec) in anchors {
                let mut svc = Service::with_db(Box::new(SqliteDb::open(&db_path)?), key.clone())?;
                svc.set_anchor_spec(&spec)?;
                let mut r = Rater::new();
                r.run(&mut svc, budget / 4)?;
                figs.push(
                    Figure::new(
                        format!(
                            "sqlite: verify over {DEVICES} devices ({BATCH}/transaction), {label}"
                        ),
                        r.rate(),
                        "verify/s",
                    )
                    .vs(batched),
                );
                let per = verify_per_call(&mut svc, DEVICES, budget / 4)?;
                figs.push(
                    Figure::new(
                        format!(
                            "sqlite: one verify call over {DEVICES} devices, {label} ({} devices anchored)",
                            r.n.min(DEVICES as usize)
                        ),
                        per * 1e6,
                        "us/call",
                    )
                    .vs(call0),
                );
            }
            // Where a batch's time goes, per engine (ms per batch of 1,000).
            for b in backends.iter() {
                let p = b.svc.batch_profile();
                let per = |d: Duration| d.as_secs_f64() * 1e6 / p.batches.max(1) as f64;
                for (name, d) in [
                    ("BEGIN", p.begin),
                    ("read rows (queries + decode + MAC check)", p.read),
                    ("  of which parse + MAC check", p.read_check),
                    ("decide + MAC new rows", p.decide),
                    ("write rows + history", p.write),
                    ("  of which history (a separate statement)", p.write_history),
                    ("COMMIT", p.commit),
                ] {
                    figs.push(Figure::new(
                        format!("{}: per batch of {BATCH}: {name}", b.label),
                        per(d),
                        "us",
                    ));
                }
            }
            let first = figs.len();
            for (i, b) in backends.iter().enumerate() {
                let f = Figure::new(
                    format!("{}: enrol (5,000/transaction)", b.label),
                    b.enrol,
                    "devices/s",
                );
                figs.push(if i == 0 { f } else { f.vs(first) });
            }
            for b in backends.iter_mut() {
                scale_rows(&mut figs, b, &large, &key_file, &dir, budget)?;
            }
            Ok(())
        })();
        drop(backends);
        if let Some(mut a) = admin {
            let _ = a.batch(&format!(
                "DROP DATABASE IF EXISTS \"{pg_name}\" WITH (FORCE)"
            ));
        }
        r?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    Ok(figs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bench_database_urls() {
        assert_eq!(
            super::pg_db_url("postgresql://u@h:5/postgres", "b"),
            "postgresql://u@h:5/b"
        );
        assert_eq!(
            super::pg_db_url("postgresql://u@h:5/postgres?sslmode=disable", "b"),
            "postgresql://u@h:5/b?sslmode=disable"
        );
        assert_eq!(
            super::pg_db_url("postgresql://u@h:5", "b"),
            "postgresql://u@h:5/b"
        );
    }
}

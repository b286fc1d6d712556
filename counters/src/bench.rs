//! `hilrig bench counters`: verifications per second over 100,000 enrolled devices,
//! on SQLite and on PostgreSQL in the same run.
//!
//! A verification here is the store-side decision: the observation (counters and
//! region hashes) is supplied in memory, so the device and its UART are not the
//! bottleneck (a real OOB read at 115200 baud takes milliseconds). Each one reads the
//! device row and checks its MAC, loads open intents, decides, rewrites the row with
//! a new MAC and appends a MACed history row. Devices are verified a rack (1,000) per
//! transaction, as the rig does after a campaign.

use crate::decide::{decide, Expected, Observation};
use crate::mac::Key;
use crate::service::{Enrollment, Service};
use crate::store::{Db, PgDb, SqliteDb};
use crate::{Result, Verdict};
use hilrig_device::bench::Figure;
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

fn verify_rate(svc: &mut Service, budget: Duration) -> Result<f64> {
    let items: Vec<(u64, Observation)> = (0..DEVICES)
        .map(|i| (0x1_0000_0000 + i, observation_of(&expected_of(i))))
        .collect();
    let t = Instant::now();
    let mut n = 0usize;
    let mut off = 0usize;
    while t.elapsed() < budget || n == 0 {
        let end = (off + BATCH).min(items.len());
        let reps = svc.verify_batch(&items[off..end])?;
        if let Some(r) = reps.iter().find(|r| r.decision.verdict != Verdict::Trusted) {
            return Err(crate::Error::Input(format!(
                "benchmark device {} was not trusted: {:?}",
                r.serial, r.decision
            )));
        }
        n += reps.len();
        off = if end == items.len() { 0 } else { end };
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
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
/// by [`crate::cli::PEAK_RSS_ENV`]: `ru_maxrss` from `wait4` would not do, as Linux
/// starts a child's at its parent's peak RSS when it execs (`exec_mmap`), so a big
/// parent hides a small child. Its stdout is discarded, its stderr goes to
/// `stderr_file` and is quoted when it fails.
pub fn run_measured(cmd: &mut std::process::Command, stderr_file: &Path) -> Result<(f64, f64)> {
    let shown = format!("{cmd:?}");
    let fail = |d: String| crate::Error::Input(format!("measuring {shown}: {d}"));
    let err_file = std::fs::File::create(stderr_file)
        .map_err(|e| fail(format!("{}: {e}", stderr_file.display())))?;
    let rss_file = stderr_file.with_extension("peak-rss");
    let _ = std::fs::remove_file(&rss_file);
    let t = Instant::now();
    let out = cmd
        .env(crate::cli::PEAK_RSS_ENV, &rss_file)
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
    let exe = std::env::current_exe()
        .map_err(|e| crate::Error::Input(format!("bench: finding this executable: {e}")))?;
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
            return Err(crate::Error::Input(format!(
                "benchmark device {} was not trusted: {:?}",
                r.serial, r.decision
            )));
        }
        calls += 1;
    }
    Ok(t.elapsed().as_secs_f64() / calls as f64)
}

/// Rows of one backend: per size, `status` and `master --by rack` (time and peak
/// RSS of a child process) and a single verify call; at 100,000 devices, the
/// batched verify rate and the enrol rate. `verify_vs`: the figure the batched
/// verify rate is compared with (SQLite's, for PostgreSQL).
#[allow(clippy::too_many_arguments)]
fn backend_rows(
    figs: &mut Vec<Figure>,
    label: &str,
    svc: &mut Service,
    db_arg: &str,
    key_file: &Path,
    dir: &Path,
    budget: Duration,
    verify_vs: Option<usize>,
) -> Result<usize> {
    let key_arg = key_file.display().to_string();
    let mut have = 0u64;
    let mut first: Option<[usize; 5]> = None;
    let mut verify_idx = 0;
    for n in sizes() {
        let enr = populate(svc, have, n)?;
        have = n;
        let mut row = [0usize; 5];
        let vs = |k: usize| first.map(|f| f[k]);
        let (ts, rs) = child(&["status", "--db", db_arg, "--key", &key_arg], dir)?;
        let (tm, rm) = child(
            &["master", "--by", "rack", "--db", db_arg, "--key", &key_arg],
            dir,
        )?;
        let per = verify_per_call(svc, n, budget / 4)?;
        for (k, (name, v, unit)) in [
            ("status: time", ts, "s"),
            ("status: peak RSS", rs, "MiB"),
            ("master --by rack: time", tm, "s"),
            ("master --by rack: peak RSS", rm, "MiB"),
            ("verify: one call", per * 1e6, "us/call"),
        ]
        .into_iter()
        .enumerate()
        {
            row[k] = figs.len();
            let mut f = Figure::new(format!("{label}: {n} devices, {name}"), v, unit);
            if let Some(b) = vs(k) {
                f = f.vs(b);
            }
            if k == 1 || k == 3 {
                f = f.target("flat from 1k (ratio ~1)");
            }
            figs.push(f);
        }
        if first.is_none() {
            first = Some(row);
        }
        if n == DEVICES {
            let v = verify_rate(svc, budget)?;
            verify_idx = figs.len();
            let mut f = Figure::new(
                format!("{label}: verify over {DEVICES} devices ({BATCH}/transaction)"),
                v,
                "verify/s",
            );
            f = match verify_vs {
                None => f.vs(0).target(">= 50,000/s"),
                Some(i) => f.vs(i).target(">= 0.5 x sqlite"),
            };
            figs.push(f);
            figs.push(Figure::new(
                format!("{label}: enrol up to {n} (5,000/transaction)"),
                enr,
                "devices/s",
            ));
        }
    }
    Ok(verify_idx)
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
    let none = |_: hilrig_device::Region, _: &crate::decide::Hash| false;
    let r = hilrig_device::bench::rate(budget, 1000, |i| {
        let k = (i % 1000) as usize;
        std::hint::black_box(decide(&exps[k], &obs[k], &none, &[]));
    });
    figs.push(Figure::new("decide() in memory (no store)", r, "verify/s"));

    let dir: PathBuf =
        std::env::temp_dir().join(format!("hilrig-bench-counters-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| crate::Error::db(&format!("creating {}", dir.display()), e))?;
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
                .map_err(|e| crate::Error::Input(format!("bench: {}: {e}", key_file.display())))?;
            let _ = f.flush();
        }
        let db_path = dir.join("bench.db");
        let db = SqliteDb::open(&db_path)?;
        let mut svc = Service::with_db(Box::new(db), key.clone())?;
        let sqlite_idx = backend_rows(
            &mut figs,
            "sqlite",
            &mut svc,
            &db_path.display().to_string(),
            &key_file,
            &dir,
            budget,
            None,
        )?;
        drop(svc);
        let _ = std::fs::remove_file(&db_path);
        if let Some(url) = pg_url {
            let name = format!("hilrig_bench_{}", std::process::id());
            let mut admin = PgDb::connect(url, None)?;
            admin.batch(&format!("CREATE DATABASE \"{name}\""))?;
            let bench_url = pg_db_url(url, &name);
            let r = (|| -> Result<()> {
                let db = PgDb::connect(&bench_url, None)?;
                let mut svc = Service::with_db(Box::new(db) as Box<dyn Db>, key.clone())?;
                backend_rows(
                    &mut figs,
                    "postgresql",
                    &mut svc,
                    &bench_url,
                    &key_file,
                    &dir,
                    budget,
                    Some(sqlite_idx),
                )?;
                Ok(())
            })();
            let _ = admin.batch(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"));
            r?;
        }
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

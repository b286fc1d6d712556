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

fn populate(svc: &mut Service) -> Result<f64> {
    let t = Instant::now();
    let mut batch = Vec::with_capacity(5000);
    for i in 0..DEVICES {
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
    Ok(DEVICES as f64 / t.elapsed().as_secs_f64())
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

/// Verifications per second on SQLite (and PostgreSQL when `pg_url` is given),
/// against the bare in-memory decision as the baseline.
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

    let dir = std::env::temp_dir().join(format!("hilrig-bench-counters-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| crate::Error::db(&format!("creating {}", dir.display()), e))?;
    let result = (|| -> Result<()> {
        let db = SqliteDb::open(&dir.join("bench.db"))?;
        let mut svc = Service::with_db(Box::new(db), key.clone())?;
        let enr = populate(&mut svc)?;
        let v = verify_rate(&mut svc, budget)?;
        let sqlite_idx = figs.len();
        figs.push(
            Figure::new(
                format!("sqlite: verify over {DEVICES} devices ({BATCH}/transaction)"),
                v,
                "verify/s",
            )
            .vs(0)
            .target(">= 50,000/s"),
        );
        figs.push(Figure::new(
            "sqlite: enrol (5,000/transaction)",
            enr,
            "devices/s",
        ));
        if let Some(url) = pg_url {
            let schema = format!("hilrig_bench_{}", std::process::id());
            let db = PgDb::connect(url, Some(&schema))?;
            let r = (|| -> Result<()> {
                let mut svc = Service::with_db(Box::new(db) as Box<dyn Db>, key.clone())?;
                let enr = populate(&mut svc)?;
                let v = verify_rate(&mut svc, budget)?;
                figs.push(
                    Figure::new(
                        format!("postgresql: verify over {DEVICES} devices ({BATCH}/transaction)"),
                        v,
                        "verify/s",
                    )
                    .vs(sqlite_idx),
                );
                figs.push(
                    Figure::new("postgresql: enrol (5,000/transaction)", enr, "devices/s")
                        .vs(sqlite_idx + 1),
                );
                Ok(())
            })();
            let _ = PgDb::connect(url, None).and_then(|mut d| d.drop_schema(&schema));
            r?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    Ok(figs)
}

#![allow(dead_code)]
//! Shared test helpers: both backends, model devices, images.

use hilrig_counters::mac::Key;
use hilrig_counters::service::{Enrollment, Service};
use hilrig_counters::source::CounterSource;
use hilrig_counters::source::DeviceSource;
use hilrig_counters::store::{Db, PgDb, SqliteDb};
use hilrig_device::model::ops;
use hilrig_device::{DeviceConfig, Model, NvState, Region};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub fn key() -> Key {
    Key::from_bytes([7u8; 32])
}

/// Run `f` on a fresh SQLite database and, when HILRIG_TEST_PG is set, on a fresh
/// PostgreSQL schema.
pub fn each_backend(test: &str, f: impl Fn(&mut Service, &Path)) {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = SqliteDb::open(&dir.path().join("counters.db")).unwrap();
        let mut s = Service::with_db(Box::new(db), key()).unwrap();
        eprintln!("{test}: sqlite");
        f(&mut s, dir.path());
    }
    match pg_url() {
        None => eprintln!("{test}: postgresql SKIPPED: HILRIG_TEST_PG not set"),
        Some(url) => {
            let schema = fresh_schema(test);
            let db = PgDb::connect(&url, Some(&schema)).unwrap();
            let mut s = Service::with_db(Box::new(db), key()).unwrap();
            eprintln!("{test}: postgresql (schema {schema})");
            let pgdir = dir.path().join("pg");
            std::fs::create_dir_all(&pgdir).unwrap();
            f(&mut s, &pgdir);
            drop(s);
            PgDb::connect(&url, None)
                .unwrap()
                .drop_schema(&schema)
                .unwrap();
        }
    }
}

/// `HILRIG_TEST_PG`, or None (the test says SKIPPED); required under CI.
pub fn pg_url() -> Option<String> {
    hilrig_db::test_server().unwrap_or_else(|e| panic!("{e}"))
}

pub fn fresh_schema(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("t_{}_{}_{}", test, std::process::id(), nanos)
}

/// A fresh PG schema service (for tests that need a raw Db too).
pub fn pg_db(test: &str) -> Option<(Box<dyn Db>, String, String)> {
    let url = pg_url()?;
    let schema = fresh_schema(test);
    let db = PgDb::connect(&url, Some(&schema)).unwrap();
    Some((Box::new(db), url, schema))
}

pub fn make_device(dir: &Path, serial: u64, width: u8) -> PathBuf {
    let p = dir.join(format!("dev-{serial:x}.state"));
    let _ = std::fs::remove_file(&p);
    Model::create(
        &p,
        NvState::factory(DeviceConfig::with_width(width), serial).unwrap(),
    )
    .unwrap();
    p
}

pub fn source(p: &Path) -> DeviceSource<Model> {
    DeviceSource::model_file(p).unwrap()
}

pub fn image(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The region hash a device shows after `image` is flashed into `region`.
pub fn image_hash(region: Region, image: &[u8]) -> String {
    let size = DeviceConfig::default().region_size(region) as usize;
    let mut v = image.to_vec();
    v.resize(v.len().div_ceil(4) * 4, 0xff);
    v.resize(size, 0xff);
    hex::encode(Sha256::digest(&v))
}

pub fn flash(p: &Path, region: Region, img: &[u8]) {
    let mut m = Model::open(p).unwrap();
    ops::flash_region(&mut m, region, img).unwrap();
}

/// Enrol `serial` at the values its device shows now (not verified yet).
pub fn enroll_from(s: &mut Service, p: &Path, serial: u64) {
    s.enroll(&enrollment(p, serial), false).unwrap();
}

/// `serial` on host "h", rack "r", at the values its device shows now.
pub fn enrollment(p: &Path, serial: u64) -> Enrollment {
    Enrollment {
        serial,
        host: "h".into(),
        rack: "r".into(),
        expected: source(p).observe().unwrap().as_expected(),
    }
}

/// An authorised update of the config region (the counters go up).
pub fn update(s: &mut Service, p: &Path, serial: u64, seed: u8) {
    let img = image(seed, 256);
    let h = image_hash(Region::Config, &img);
    s.catalog_add(Region::Config, &h, "v", "alice").unwrap();
    let id = s.begin_update(serial, Region::Config, &h).unwrap();
    flash(p, Region::Config, &img);
    assert!(s
        .commit_update(serial, id, &mut source(p))
        .unwrap()
        .trusted());
}

/// The database files (main, WAL, shared memory) in `dir`.
pub fn db_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("counters.db"))
        .collect()
}

/// Copy the database files of `from` into `to` (a backup).
pub fn copy_db(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for p in db_files(from) {
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// Put the backup `from` in place of the database files in `to`.
pub fn restore_db(from: &Path, to: &Path) {
    for p in db_files(to) {
        std::fs::remove_file(&p).unwrap();
    }
    copy_db(from, to);
}

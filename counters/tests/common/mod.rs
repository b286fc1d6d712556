#![allow(dead_code)]
//! Shared test helpers: both backends, model devices, images.

use hilrig_counters::mac::Key;
use hilrig_counters::service::Service;
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

pub fn pg_url() -> Option<String> {
    std::env::var("HILRIG_TEST_PG")
        .ok()
        .filter(|s| !s.is_empty())
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

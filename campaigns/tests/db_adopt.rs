//! Results stores made by the code before hilrig-db (tables created with the old
//! SQL text, no `schema_migrations`) open, keep their rows and are adopted:
//! SQLite always, PostgreSQL when HILRIG_TEST_PG names a server (a fresh
//! database, dropped afterwards).

use hilrig_campaigns::claim::ClaimQueue;
use hilrig_campaigns::store::{Store, LAB_SCHEMA, RUN_QUEUE_SCHEMA, SCHEMA};
use std::path::Path;

const OLD_SQLITE: &str = "PRAGMA journal_mode=WAL;
CREATE TABLE IF NOT EXISTS runs (
   id TEXT PRIMARY KEY, campaign TEXT NOT NULL, file TEXT NOT NULL,
   run_dir TEXT NOT NULL, started_ms INTEGER NOT NULL, finished_ms INTEGER,
   hosts TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS cases (
   run_id TEXT NOT NULL REFERENCES runs(id), case_id TEXT NOT NULL,
   outcome TEXT NOT NULL, result TEXT NOT NULL,
   PRIMARY KEY (run_id, case_id));
CREATE TABLE IF NOT EXISTS samples (
   run_id TEXT NOT NULL, case_id TEXT NOT NULL, kind TEXT NOT NULL,
   seq INTEGER NOT NULL, value REAL NOT NULL,
   PRIMARY KEY (run_id, case_id, kind, seq));
CREATE INDEX IF NOT EXISTS cases_by_case_run ON cases(case_id, run_id);
CREATE TABLE IF NOT EXISTS lab_queue (
   id INTEGER PRIMARY KEY AUTOINCREMENT, campaign TEXT NOT NULL, campaign_text TEXT NOT NULL,
   submitted_by TEXT NOT NULL, submitted_ms INTEGER NOT NULL, state TEXT NOT NULL,
   run_id TEXT, worker TEXT, message TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS lab_tokens (
   name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE, created_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS lab_webhooks (
   campaign TEXT NOT NULL, url TEXT NOT NULL, secret TEXT NOT NULL,
   PRIMARY KEY (campaign, url));";

const OLD_PG: &str = "
CREATE TABLE IF NOT EXISTS runs (
   seq BIGSERIAL, id TEXT PRIMARY KEY, campaign TEXT NOT NULL, file TEXT NOT NULL,
   run_dir TEXT NOT NULL, started_ms BIGINT NOT NULL, finished_ms BIGINT,
   hosts TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS cases (
   seq BIGSERIAL, run_id TEXT NOT NULL REFERENCES runs(id), case_id TEXT NOT NULL,
   outcome TEXT NOT NULL, result TEXT NOT NULL,
   PRIMARY KEY (run_id, case_id));
CREATE TABLE IF NOT EXISTS samples (
   run_id TEXT NOT NULL, case_id TEXT NOT NULL, kind TEXT NOT NULL,
   seq INTEGER NOT NULL, value DOUBLE PRECISION NOT NULL,
   PRIMARY KEY (run_id, case_id, kind, seq));
CREATE TABLE IF NOT EXISTS run_queue (
   run_id TEXT NOT NULL REFERENCES runs(id), case_id TEXT NOT NULL, ord INTEGER NOT NULL,
   state TEXT NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'claimed', 'done')),
   claimant TEXT, generation BIGINT NOT NULL DEFAULT 0, lease_expires TIMESTAMPTZ,
   lost TEXT[] NOT NULL DEFAULT '{}',
   PRIMARY KEY (run_id, case_id));
CREATE INDEX IF NOT EXISTS cases_by_case_run ON cases(case_id, run_id);
CREATE TABLE IF NOT EXISTS lab_queue (
   id BIGSERIAL PRIMARY KEY, campaign TEXT NOT NULL, campaign_text TEXT NOT NULL,
   submitted_by TEXT NOT NULL, submitted_ms BIGINT NOT NULL, state TEXT NOT NULL,
   run_id TEXT, worker TEXT, message TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS lab_tokens (
   name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE, created_ms BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS lab_webhooks (
   campaign TEXT NOT NULL, url TEXT NOT NULL, secret TEXT NOT NULL,
   PRIMARY KEY (campaign, url));";

const OLD_ROWS: &str = "
INSERT INTO runs (id, campaign, file, run_dir, started_ms) VALUES ('r1', 'nightly', 'n.toml', '/tmp/r1', 5);
INSERT INTO cases (run_id, case_id, outcome, result) VALUES ('r1', 'c1', 'pass', '{}');
INSERT INTO lab_tokens (name, token_sha256, created_ms) VALUES ('ci', 'abc', 1);";

fn check_recorded(c: hilrig_db::ConnMut<'_>, pg: bool) {
    let mut c = c;
    for s in [&SCHEMA, &RUN_QUEUE_SCHEMA, &LAB_SCHEMA] {
        let rec = hilrig_db::recorded(c.reborrow(), "t", s.name).unwrap();
        assert_eq!(rec, vec![(1, s.migrations[0].sha256(pg))], "{}", s.name);
    }
}

#[test]
fn old_sqlite_store_is_adopted() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("results.sqlite");
    {
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch(OLD_SQLITE).unwrap();
        c.execute_batch(OLD_ROWS).unwrap();
    }
    let mut s = Store::open(&p).unwrap();
    let r = s.run("r1").unwrap().unwrap();
    assert_eq!(r.campaign, "nightly");
    assert_eq!(s.runs(None).unwrap().len(), 1);
    assert_eq!(s.token_user("abc").unwrap().as_deref(), Some("ci"));
    drop(s);
    let mut c = rusqlite::Connection::open(&p).unwrap();
    check_recorded(hilrig_db::ConnMut::Sqlite(&mut c), false);
    // Reopen: nothing to do.
    Store::open(&p).unwrap();
}

#[test]
fn a_partial_old_store_is_refused_not_patched() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("results.sqlite");
    {
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch("CREATE TABLE runs (id TEXT PRIMARY KEY, campaign TEXT NOT NULL)")
            .unwrap();
    }
    let e = Store::open(&p)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("cannot adopt"), "{e}");
    assert!(
        e.contains("table runs lacks column(s) file, run_dir"),
        "{e}"
    );
    let e = Store::open(Path::new("mysql://h/d"))
        .err()
        .map(|e| e.to_string());
    assert!(e.unwrap_or_default().contains("bad database spec"));
}

#[test]
fn old_postgres_store_is_adopted() {
    let Some(url) = hilrig_db::test_server().unwrap_or_else(|e| panic!("{e}")) else {
        eprintln!("SKIPPED: old PostgreSQL results store: HILRIG_TEST_PG not set");
        return;
    };
    let settings = hilrig_db::Settings::new("campaigns-test");
    let scratch = hilrig_db::ScratchPg::create(&url, "campaigns_adopt", &settings).unwrap();
    let db_url = scratch.url().to_string();
    {
        let mut c = hilrig_db::connect_pg(&db_url, &settings).unwrap();
        c.batch_execute(OLD_PG).unwrap();
        c.batch_execute(OLD_ROWS).unwrap();
    }
    {
        let mut s = Store::open(Path::new(&db_url)).unwrap();
        assert_eq!(s.run("r1").unwrap().unwrap().campaign, "nightly");
        assert_eq!(s.token_user("abc").unwrap().as_deref(), Some("ci"));
        let mut q = ClaimQueue::open(&db_url).unwrap();
        q.enqueue("r1", &["c2".to_string()]).unwrap();
        assert_eq!(q.state("r1").unwrap().queued, 1);
    }
    {
        let mut c = hilrig_db::connect_pg(&db_url, &settings).unwrap();
        check_recorded(hilrig_db::ConnMut::Pg(&mut c), true);
    }
}

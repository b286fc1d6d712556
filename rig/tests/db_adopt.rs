//! Databases made by the code before hilrig-db (tables created with the old SQL
//! text, no `schema_migrations`) open, keep their rows and are adopted: SQLite
//! always, PostgreSQL when HILRIG_TEST_PG names a server (a fresh database,
//! dropped afterwards).

use hilrig_rig::hoststate::HostStates;
use hilrig_rig::lease::LeaseStore;
use std::time::Duration;

const OLD_SQLITE_LEASES: &str = "CREATE TABLE IF NOT EXISTS rig_leases (
            host TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            generation INTEGER NOT NULL,
            acquired_ms INTEGER NOT NULL,
            expires_ms INTEGER NOT NULL)";
const OLD_PG_LEASES: &str = "CREATE TABLE IF NOT EXISTS rig_leases (
                    host TEXT PRIMARY KEY,
                    holder TEXT NOT NULL,
                    generation BIGINT NOT NULL,
                    acquired_ms BIGINT NOT NULL,
                    expires_ms BIGINT NOT NULL)";
const OLD_HOST_STATES: &str = "CREATE TABLE IF NOT EXISTS rig_host_states (
                host TEXT PRIMARY KEY,
                state TEXT NOT NULL,
                reason TEXT NOT NULL,
                since_ms INTEGER NOT NULL)";

fn far() -> i64 {
    hilrig_db::now_ms() + 3_600_000
}

#[test]
fn old_sqlite_database_is_adopted() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("results.sqlite");
    {
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch(OLD_SQLITE_LEASES).unwrap();
        c.execute_batch(OLD_HOST_STATES).unwrap();
        c.execute(
            "INSERT INTO rig_leases VALUES ('h1', 'alice', 4, 0, ?1)",
            [far()],
        )
        .unwrap();
        c.execute_batch("INSERT INTO rig_host_states VALUES ('h2', 'offline', 'cable', 5)")
            .unwrap();
    }
    let spec = p.to_str().unwrap();
    let s = LeaseStore::open(spec).unwrap();
    let rows = s.list().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].holder.as_str(), rows[0].generation), ("alice", 4));
    assert!(s.acquire("h1", "bob", Duration::from_secs(60)).is_err());
    let h = HostStates::open(spec).unwrap();
    assert_eq!(h.get("h2").unwrap().unwrap().reason, "cable");
    // Adopted: recorded, with this build's hashes; a reopen is a no-op.
    let mut c = rusqlite::Connection::open(&p).unwrap();
    for (schema, m) in [
        ("rig_leases", &hilrig_rig::lease::SCHEMA),
        ("rig_host_states", &hilrig_rig::hoststate::SCHEMA),
    ] {
        let rec = hilrig_db::recorded(hilrig_db::ConnMut::Sqlite(&mut c), "t", schema).unwrap();
        assert_eq!(rec, vec![(1, m.migrations[0].sha256(false))], "{schema}");
    }
    LeaseStore::open(spec).unwrap();
    HostStates::open(spec).unwrap();
}

#[test]
fn a_changed_migration_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("l.db");
    let spec = p.to_str().unwrap();
    LeaseStore::open(spec).unwrap();
    let c = rusqlite::Connection::open(&p).unwrap();
    c.execute_batch("UPDATE schema_migrations SET sha256 = 'a1b2' WHERE schema = 'rig_leases'")
        .unwrap();
    let e = LeaseStore::open(spec)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("schema rig_leases migration 1 differs: database a1b2, code "),
        "{e}"
    );
    let e = LeaseStore::open("mysql://h/d")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("bad database spec"), "{e}");
    let e = HostStates::open("postgresql://h/d")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("SQLite file, not PostgreSQL"), "{e}");
}

#[test]
fn old_postgres_database_is_adopted() {
    let Some(url) = hilrig_db::test_server().unwrap_or_else(|e| panic!("{e}")) else {
        eprintln!("SKIPPED: old PostgreSQL lease database: HILRIG_TEST_PG not set");
        return;
    };
    let settings = hilrig_db::Settings::new("rig-test");
    let scratch = hilrig_db::ScratchPg::create(&url, "rig_adopt", &settings).unwrap();
    let db_url = scratch.url().to_string();
    {
        let mut c = hilrig_db::connect_pg(&db_url, &settings).unwrap();
        c.batch_execute(OLD_PG_LEASES).unwrap();
        c.execute(
            "INSERT INTO rig_leases VALUES ('h1', 'alice', 4, 0, $1)",
            &[&(far())],
        )
        .unwrap();
    }
    let s = LeaseStore::open(&db_url).unwrap();
    let rows = s.list().unwrap();
    assert_eq!((rows[0].holder.as_str(), rows[0].generation), ("alice", 4));
    assert!(rows[0].active);
    drop(s);
    {
        let mut c = hilrig_db::connect_pg(&db_url, &settings).unwrap();
        let rec = hilrig_db::recorded(hilrig_db::ConnMut::Pg(&mut c), "t", "rig_leases").unwrap();
        assert_eq!(
            rec,
            vec![(1, hilrig_rig::lease::SCHEMA.migrations[0].sha256(true))]
        );
    }
    LeaseStore::open(&db_url).unwrap();
}

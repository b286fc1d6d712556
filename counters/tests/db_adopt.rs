//! A counters database made by the code before hilrig-db (its `schema_version`
//! table and the migrations' SQL run one by one, no `schema_migrations`) opens
//! and is adopted at its version: SQLite always, PostgreSQL when HILRIG_TEST_PG
//! names a server (a fresh schema, dropped afterwards).

mod common;
use common::*;
use hilrig_counters::mac::Key;
use hilrig_counters::service::Service;
use hilrig_counters::store::{self, Db, Val};

/// The old migration path: `schema_version`, then migrations 1..=upto each with
/// its row (the SQL text as the old code expanded it).
fn old_code_path(db: &mut dyn Db, upto: usize) {
    db.batch(
        "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .unwrap();
    let pg = db.kind() == "postgresql";
    let auto = if pg {
        "BIGSERIAL PRIMARY KEY"
    } else {
        "INTEGER PRIMARY KEY AUTOINCREMENT"
    };
    for &(v, sql) in &store::MIGRATIONS[..upto] {
        let mut sql = sql.replace("{ID}", auto);
        // `{PG:...}` parts run on PostgreSQL only.
        while let Some(i) = sql.find("{PG:") {
            let end = i + sql[i..].find('}').unwrap();
            let inner = sql[i + 4..end].to_string();
            sql.replace_range(i..=end, if pg { &inner } else { "" });
        }
        db.batch(&sql).unwrap();
        db.exec(
            "INSERT INTO schema_version (version, applied_at) VALUES ($1, 0)",
            &[Val::I64(v)],
        )
        .unwrap();
    }
}

fn recorded(db: &mut dyn Db) -> Vec<(i64, String)> {
    let name = db.name().to_string();
    hilrig_db::recorded(db.conn(), &name, "counters").unwrap()
}

fn check(db: &mut dyn Db, upto: usize) {
    old_code_path(db, upto);
    db.exec(
        "INSERT INTO meta (name, value) VALUES ('marker', 'kept')",
        &[],
    )
    .unwrap();
    let want: Vec<i64> = (upto as i64 + 1..=store::latest_version()).collect();
    assert_eq!(store::migrate(db).unwrap(), want, "{}", db.kind());
    assert_eq!(store::migrate(db).unwrap(), Vec::<i64>::new());
    let pg = db.kind() == "postgresql";
    let texts = store::migration_texts();
    let rec = recorded(db);
    assert_eq!(rec.len(), texts.len());
    for ((v, sha), (sq, p)) in rec.iter().zip(&texts) {
        let m = hilrig_db::Migration::per_engine(*v, sq, p);
        assert_eq!(*sha, m.sha256(pg), "version {v}");
    }
    assert_eq!(store::schema_version(db).unwrap(), store::latest_version());
    let rows = db
        .query("SELECT value FROM meta WHERE name = 'marker'", &[])
        .unwrap();
    assert_eq!(rows.len(), 1, "old rows kept");
}

#[test]
fn old_database_is_adopted_at_its_version() {
    for upto in [3, 5] {
        let dir = tempfile::tempdir().unwrap();
        let mut db = store::SqliteDb::open(&dir.path().join("c.db")).unwrap();
        check(&mut db, upto);
        // The service opens it (key fingerprint stored on first open).
        let db = store::SqliteDb::open(&dir.path().join("c.db")).unwrap();
        Service::with_db(Box::new(db), Key::from_bytes([3; 32])).unwrap();
        if let Some((mut pg, url, schema)) = pg_db(&format!("adopt{upto}")) {
            check(&mut *pg, upto);
            drop(pg);
            store::PgDb::connect(&url, None)
                .unwrap()
                .drop_schema(&schema)
                .unwrap();
        } else {
            eprintln!(
                "SKIPPED: adopting an old PostgreSQL counters database: HILRIG_TEST_PG not set"
            );
        }
    }
}

#[test]
fn a_changed_migration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = store::SqliteDb::open(&dir.path().join("c.db")).unwrap();
    store::migrate(&mut db).unwrap();
    db.exec(
        "UPDATE schema_migrations SET sha256 = 'a1b2' WHERE schema = 'counters' AND version = 3",
        &[],
    )
    .unwrap();
    let e = store::migrate(&mut db).unwrap_err().to_string();
    assert!(
        e.contains("schema counters migration 3 differs: database a1b2, code "),
        "{e}"
    );
    let e = store::open("mysql://h/d").err().map(|e| e.to_string());
    assert!(e.unwrap_or_default().contains("bad database spec"));
}

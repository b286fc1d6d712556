//! The migrations runner on SQLite and, with `HILRIG_TEST_PG` set, PostgreSQL
//! (each test in a fresh PostgreSQL schema, dropped afterwards).

use hilrig_db::{
    connect_pg, migrate, open_sqlite, recorded, Adopt, Conn, DbError, DbUrl, Migration, Schema,
    Settings,
};

const T1: &[(&str, &[&str])] = &[("widgets", &["id", "name"]), ("parts", &["w", "n"])];

const V1: Migration = Migration::per_engine(
    1,
    "CREATE TABLE widgets (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
     CREATE TABLE parts (w INTEGER NOT NULL, n INTEGER NOT NULL)",
    "CREATE TABLE widgets (id BIGINT PRIMARY KEY, name TEXT NOT NULL);
     CREATE TABLE parts (w BIGINT NOT NULL, n BIGINT NOT NULL)",
);
const V2: Migration = Migration::same(2, "CREATE INDEX parts_w ON parts (w)");
const V3: Migration = Migration::same(3, "ALTER TABLE widgets ADD COLUMN colour TEXT");

fn schema<'a>(m: &'a [Migration<'a>]) -> Schema<'a> {
    Schema {
        name: "widgets",
        migrations: m,
        adopt: Adopt::Tables(T1),
    }
}

/// A fresh database per engine: SQLite in a temp dir, PostgreSQL in a fresh
/// schema (when `HILRIG_TEST_PG` is set). `reopen` gives another connection to it.
struct Fresh {
    label: String,
    kind: &'static str,
    sqlite: Option<std::path::PathBuf>,
    pg: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Fresh {
    fn open(&self) -> Conn {
        if let Some(p) = &self.sqlite {
            return Conn::Sqlite(open_sqlite(p, &Settings::new("test")).expect("open sqlite"));
        }
        let (url, schema) = self.pg.as_ref().expect("pg");
        let mut c = connect_pg(url, &Settings::new("hilrig-db-test")).expect("connect");
        c.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}"
        ))
        .expect("schema");
        Conn::Pg(Box::new(c))
    }
    fn batch(&self, c: &mut Conn, sql: &str) {
        match c {
            Conn::Sqlite(c) => c.execute_batch(sql).expect(sql),
            Conn::Pg(c) => c.batch_execute(sql).expect(sql),
        }
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        if let Some((url, schema)) = &self.pg {
            if let Ok(mut c) = connect_pg(url, &Settings::new("hilrig-db-test")) {
                let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
            }
        }
    }
}

fn engines(test: &str) -> Vec<Fresh> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut v = vec![Fresh {
        label: "sqlite".into(),
        kind: "sqlite",
        sqlite: Some(dir.path().join("t.db")),
        pg: None,
        _dir: dir,
    }];
    match hilrig_db::test_server().unwrap_or_else(|e| panic!("{e}")) {
        Some(url) => {
            let schema = format!("dbt_{test}_{}", std::process::id());
            v.push(Fresh {
                label: "pg".into(),
                kind: "postgresql",
                sqlite: None,
                pg: Some((url, schema)),
                _dir: tempfile::tempdir().expect("tempdir"),
            });
        }
        _ => eprintln!("SKIPPED: {test} on PostgreSQL: HILRIG_TEST_PG not set"),
    }
    v
}

#[test]
fn applied_once_then_reopen_is_a_no_op() {
    for e in engines("once") {
        let mut c = e.open();
        let s = schema(&[V1, V2]);
        assert_eq!(
            migrate(c.as_mut(), &e.label, &s).unwrap(),
            vec![1, 2],
            "{}",
            e.kind
        );
        assert_eq!(
            migrate(c.as_mut(), &e.label, &s).unwrap(),
            Vec::<i64>::new()
        );
        drop(c);
        let mut c = e.open();
        assert_eq!(
            migrate(c.as_mut(), &e.label, &s).unwrap(),
            Vec::<i64>::new()
        );
        let rec = recorded(c.as_mut(), &e.label, "widgets").unwrap();
        let pg = e.kind == "postgresql";
        assert_eq!(
            rec,
            vec![(1, V1.sha256(pg)), (2, V2.sha256(pg))],
            "{}",
            e.kind
        );
        // A new migration in a later build: only it runs.
        let s3 = schema(&[V1, V2, V3]);
        assert_eq!(migrate(c.as_mut(), &e.label, &s3).unwrap(), vec![3]);
        e.batch(
            &mut c,
            "INSERT INTO widgets (id, name, colour) VALUES (1, 'a', 'red')",
        );
    }
}

#[test]
fn a_changed_migration_is_refused() {
    for e in engines("differs") {
        let mut c = e.open();
        migrate(c.as_mut(), &e.label, &schema(&[V1, V2])).unwrap();
        let other = Migration::same(2, "CREATE INDEX parts_w ON parts (w, n)");
        let err = migrate(c.as_mut(), &e.label, &schema(&[V1, other])).unwrap_err();
        let pg = e.kind == "postgresql";
        match &err {
            DbError::MigrationDiffers {
                schema,
                version,
                database,
                code,
                ..
            } => {
                assert_eq!((schema.as_str(), *version), ("widgets", 2));
                assert!(V2.sha256(pg).starts_with(database.trim_end_matches('…')));
                assert!(other.sha256(pg).starts_with(code.trim_end_matches('…')));
            }
            x => panic!("{}: {x}", e.kind),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("schema widgets migration 2 differs: database "),
            "{msg}"
        );
        assert!(msg.contains(", code "), "{msg}");
        // Also with the migration already applied and a new one pending.
        let err = migrate(c.as_mut(), &e.label, &schema(&[V1, other, V3])).unwrap_err();
        assert!(
            matches!(err, DbError::MigrationDiffers { version: 2, .. }),
            "{err}"
        );
        // A tampered record is refused the same way.
        e.batch(
            &mut c,
            "UPDATE schema_migrations SET sha256 = 'a1b2' WHERE schema = 'widgets' AND version = 1",
        );
        let err = migrate(c.as_mut(), &e.label, &schema(&[V1, V2])).unwrap_err();
        assert!(
            err.to_string()
                .contains("schema widgets migration 1 differs: database a1b2, code "),
            "{err}"
        );
    }
}

#[test]
fn a_newer_database_is_refused() {
    for e in engines("newer") {
        let mut c = e.open();
        migrate(c.as_mut(), &e.label, &schema(&[V1, V2, V3])).unwrap();
        let err = migrate(c.as_mut(), &e.label, &schema(&[V1, V2])).unwrap_err();
        assert!(
            matches!(
                err,
                DbError::TooNew {
                    database: 3,
                    code: 2,
                    ..
                }
            ),
            "{}: {err}",
            e.kind
        );
        assert!(err
            .to_string()
            .contains("schema widgets is at version 3, this build knows up to 2"));
    }
}

#[test]
fn a_failing_migration_leaves_nothing() {
    for e in engines("fails") {
        let mut c = e.open();
        let bad = Migration::same(2, "CREATE INDEX x ON no_such_table (y)");
        let err = migrate(c.as_mut(), &e.label, &schema(&[V1, bad])).unwrap_err();
        assert!(
            matches!(err, DbError::Migration { version: 2, .. }),
            "{err}"
        );
        assert!(recorded(c.as_mut(), &e.label, "widgets")
            .unwrap()
            .is_empty());
        // Migration 1 was rolled back with it: a clean run works.
        assert_eq!(
            migrate(c.as_mut(), &e.label, &schema(&[V1, V2])).unwrap(),
            vec![1, 2],
            "{}",
            e.kind
        );
    }
}

#[test]
fn an_old_database_is_adopted_when_its_tables_match() {
    for e in engines("adopt") {
        let mut c = e.open();
        let pg = e.kind == "postgresql";
        // Made by code before the migrations layer (its SQL text run by hand).
        e.batch(&mut c, V1.sql(pg));
        e.batch(&mut c, "INSERT INTO widgets (id, name) VALUES (7, 'kept')");
        assert_eq!(
            migrate(c.as_mut(), &e.label, &schema(&[V1, V2])).unwrap(),
            vec![2]
        );
        assert_eq!(recorded(c.as_mut(), &e.label, "widgets").unwrap().len(), 2);
        e.batch(&mut c, "INSERT INTO widgets (id, name) VALUES (8, 'new')");
    }
}

#[test]
fn a_database_with_other_tables_is_not_adopted() {
    for e in engines("noadopt") {
        let mut c = e.open();
        // A table of the same name with other columns.
        e.batch(&mut c, "CREATE TABLE widgets (id BIGINT, label TEXT)");
        e.batch(&mut c, "CREATE TABLE parts (w BIGINT, n BIGINT)");
        let err = migrate(c.as_mut(), &e.label, &schema(&[V1])).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DbError::NotAdoptable { .. }), "{msg}");
        assert!(msg.contains("table widgets lacks column(s) name"), "{msg}");
        // Only some of the tables.
        e.batch(&mut c, "DROP TABLE widgets");
        let msg = migrate(c.as_mut(), &e.label, &schema(&[V1]))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("parts are there but widgets missing"),
            "{}: {msg}",
            e.kind
        );
    }
}

#[test]
fn an_old_version_table_is_adopted_at_its_version() {
    let s = |m| Schema {
        name: "widgets",
        migrations: m,
        adopt: Adopt::VersionTable {
            table: "old_version",
            column: "version",
            tables: T1,
        },
    };
    for e in engines("vtable") {
        let mut c = e.open();
        let pg = e.kind == "postgresql";
        e.batch(
            &mut c,
            "CREATE TABLE old_version (version BIGINT PRIMARY KEY)",
        );
        e.batch(&mut c, V1.sql(pg));
        e.batch(&mut c, V2.sql(pg));
        e.batch(&mut c, "INSERT INTO old_version VALUES (1), (2)");
        assert_eq!(
            migrate(c.as_mut(), &e.label, &s(&[V1, V2, V3])).unwrap(),
            vec![3]
        );
        // Newer than the code: refused.
        e.batch(&mut c, "DELETE FROM schema_migrations");
        e.batch(&mut c, "INSERT INTO old_version VALUES (9)");
        let err = migrate(c.as_mut(), &e.label, &s(&[V1, V2, V3])).unwrap_err();
        assert!(matches!(err, DbError::TooNew { database: 9, .. }), "{err}");
    }
}

#[test]
fn schemas_share_a_database() {
    const OTHER: &[Migration] = &[Migration::same(1, "CREATE TABLE gadgets (g TEXT NOT NULL)")];
    for e in engines("share") {
        let mut c = e.open();
        migrate(c.as_mut(), &e.label, &schema(&[V1])).unwrap();
        let g = Schema {
            name: "gadgets",
            migrations: OTHER,
            adopt: Adopt::Tables(&[("gadgets", &["g"])]),
        };
        assert_eq!(migrate(c.as_mut(), &e.label, &g).unwrap(), vec![1]);
        assert_eq!(
            migrate(c.as_mut(), &e.label, &schema(&[V1, V2])).unwrap(),
            vec![2]
        );
        assert_eq!(recorded(c.as_mut(), &e.label, "gadgets").unwrap().len(), 1);
    }
}

#[test]
fn concurrent_openers_migrate_once() {
    for e in engines("race") {
        let e = std::sync::Arc::new(e);
        // Make the database (PostgreSQL: its schema) first: the race is the
        // migrations', not CREATE SCHEMA's.
        drop(e.open());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let e = e.clone();
                std::thread::spawn(move || {
                    let mut c = e.open();
                    migrate(c.as_mut(), &e.label, &schema(&[V1, V2, V3]))
                })
            })
            .collect();
        let mut total = Vec::new();
        for t in threads {
            total.extend(t.join().expect("thread").expect("migrate"));
        }
        total.sort();
        assert_eq!(total, vec![1, 2, 3], "{}", e.kind);
    }
}

#[test]
fn bad_specs_and_unreachable_servers_are_clear_errors() {
    let e = DbUrl::parse("mysql://h/d").unwrap_err().to_string();
    assert!(e.contains("unknown scheme `mysql`"), "{e}");
    // Nothing listens on port 1: refused at once, named, password hidden.
    let e = connect_pg("postgresql://u:secret@127.0.0.1:1/d", &Settings::new("t"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("postgresql://u:***@127.0.0.1:1/d: connecting"),
        "{e}"
    );
    assert!(!e.contains("secret"), "{e}");
    let e = connect_pg("postgresql://h:port/d", &Settings::new("t"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.starts_with("bad database spec"), "{e}");
    // A SQLite path that is a directory.
    let d = tempfile::tempdir().unwrap();
    let e = open_sqlite(d.path(), &Settings::new("t"))
        .err()
        .map(|e| e.to_string());
    assert!(e
        .unwrap_or_default()
        .contains(&d.path().display().to_string()));
}

#[test]
fn sqlite_settings_are_applied() {
    let d = tempfile::tempdir().unwrap();
    let c = open_sqlite(&d.path().join("a/b/s.db"), &Settings::new("t")).unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    let fk: i64 = c
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .unwrap();
    assert_eq!((mode.as_str(), fk), ("wal", 1));
    if let Some(url) = hilrig_db::test_server().unwrap_or_else(|e| panic!("{e}")) {
        let mut c = connect_pg(&url, &Settings::new("hilrig-db-test")).unwrap();
        let r = c.query_one("SHOW application_name", &[]).unwrap();
        assert_eq!(r.get::<_, String>(0), "hilrig-db-test");
    } else {
        eprintln!("SKIPPED: application_name on PostgreSQL: HILRIG_TEST_PG not set");
    }
}

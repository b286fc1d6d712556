//! Versioned schema migrations.
//!
//! A [`Schema`] is a named list of [`Migration`]s, versions 1, 2, 3, ... Each
//! applied migration is recorded in `schema_migrations(schema, version, sha256,
//! applied_ms)` with the SHA-256 of the SQL text that ran (the engine's text), so
//! several schemas can share one database (the results store holds the
//! campaigns', the lab service's and the rig's tables). [`migrate`]:
//!
//! 1. reads what is recorded, without a lock: a database whose recorded migration
//!    differs from the code's ([`DbError::MigrationDiffers`]) or is newer than
//!    the code ([`DbError::TooNew`]) is refused; when everything is applied it
//!    returns at once (the usual open costs one read);
//! 2. otherwise takes the migration lock (SQLite `BEGIN IMMEDIATE`, PostgreSQL a
//!    transaction-scoped advisory lock), checks again (another process may have
//!    migrated meanwhile), **adopts** a database made before this layer (no rows
//!    for the schema, but its tables there: see [`Adopt`]), applies the pending
//!    migrations and records them, all in that one transaction: a failing
//!    migration leaves nothing behind.
//!
//! Never edit a published migration: add a new one.

use crate::{ConnMut, DbError, Result};
use sha2::{Digest, Sha256};

/// The table migrations are recorded in.
pub const MIGRATIONS_TABLE: &str = "schema_migrations";

/// Key of the PostgreSQL advisory lock that serialises migrations ("hilrig").
const PG_LOCK: i64 = 0x6869_6c72_6967;

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    schema TEXT NOT NULL,
    version BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    applied_ms BIGINT NOT NULL,
    PRIMARY KEY (schema, version))";

/// One migration: its version and its SQL per engine (the same text where the
/// engines agree).
#[derive(Debug, Clone, Copy)]
pub struct Migration<'a> {
    /// 1, 2, 3, ... in order.
    pub version: i64,
    /// Statements run on SQLite.
    pub sqlite: &'a str,
    /// Statements run on PostgreSQL.
    pub pg: &'a str,
}

impl<'a> Migration<'a> {
    /// The same SQL on both engines.
    pub const fn same(version: i64, sql: &'a str) -> Migration<'a> {
        Migration {
            version,
            sqlite: sql,
            pg: sql,
        }
    }

    /// Different SQL per engine.
    pub const fn per_engine(version: i64, sqlite: &'a str, pg: &'a str) -> Migration<'a> {
        Migration {
            version,
            sqlite,
            pg,
        }
    }

    /// The text for an engine.
    pub fn sql(&self, pg: bool) -> &'a str {
        if pg {
            self.pg
        } else {
            self.sqlite
        }
    }

    /// SHA-256 (hex) of the text for an engine: what `schema_migrations` records.
    pub fn sha256(&self, pg: bool) -> String {
        hex::encode(Sha256::digest(self.sql(pg).as_bytes()))
    }
}

/// How a database made before this layer (no `schema_migrations` rows for the
/// schema) is recognised.
#[derive(Debug, Clone, Copy)]
pub enum Adopt<'a> {
    /// Migration 1 makes these tables with (at least) these columns. None of them
    /// there: a fresh database (every migration is applied). All of them there
    /// with their columns: adopted at version 1. Anything in between (some tables,
    /// a missing column) is refused with [`DbError::NotAdoptable`] naming what.
    Tables(&'a [(&'a str, &'a [&'a str])]),
    /// The schema kept its own version table (`table.column`, one row per applied
    /// version): adopted at its highest version (0 when the table is missing or
    /// empty). Migration 1's tables are checked as for [`Adopt::Tables`].
    VersionTable {
        /// The old version table.
        table: &'a str,
        /// Its version column.
        column: &'a str,
        /// Migration 1's tables and columns.
        tables: &'a [(&'a str, &'a [&'a str])],
    },
}

/// A named schema.
#[derive(Debug, Clone, Copy)]
pub struct Schema<'a> {
    /// Its name in `schema_migrations` (e.g. `campaigns`, `rig_leases`).
    pub name: &'a str,
    /// Its migrations, versions 1, 2, 3, ...
    pub migrations: &'a [Migration<'a>],
    /// How a database made before this layer is adopted.
    pub adopt: Adopt<'a>,
}

impl Schema<'_> {
    /// The newest version the code knows.
    pub fn latest(&self) -> i64 {
        self.migrations.last().map(|m| m.version).unwrap_or(0)
    }

    fn validate(&self) -> Result<()> {
        for (i, m) in self.migrations.iter().enumerate() {
            if m.version != i as i64 + 1 {
                return Err(DbError::BadSchema {
                    schema: self.name.to_string(),
                    detail: format!(
                        "migration #{} has version {}; versions must be 1, 2, 3, ...",
                        i + 1,
                        m.version
                    ),
                });
            }
        }
        Ok(())
    }
}

/// What the migrations need from a connection or a transaction.
trait Exec {
    fn pg(&self) -> bool;
    fn label(&self) -> &str;
    fn batch(&mut self, what: &str, sql: &str) -> Result<()>;
    fn has_table(&mut self, table: &str) -> Result<bool>;
    /// Column names, empty when the table does not exist.
    fn columns(&mut self, table: &str) -> Result<Vec<String>>;
    fn recorded(&mut self, schema: &str) -> Result<Vec<(i64, String)>>;
    fn record(&mut self, schema: &str, version: i64, sha: &str) -> Result<()>;
    fn max_version(&mut self, table: &str, column: &str) -> Result<Option<i64>>;
}

struct Sq<'c> {
    c: &'c rusqlite::Connection,
    db: String,
}

impl Sq<'_> {
    fn err(&self, what: &str) -> impl FnOnce(rusqlite::Error) -> DbError {
        let (db, what) = (self.db.clone(), what.to_string());
        move |source| DbError::Sqlite { db, what, source }
    }
}

impl Exec for Sq<'_> {
    fn pg(&self) -> bool {
        false
    }
    fn label(&self) -> &str {
        &self.db
    }
    fn batch(&mut self, what: &str, sql: &str) -> Result<()> {
        self.c.execute_batch(sql).map_err(self.err(what))
    }
    fn has_table(&mut self, table: &str) -> Result<bool> {
        let n: i64 = self
            .c
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get(0),
            )
            .map_err(self.err("reading the catalog"))?;
        Ok(n > 0)
    }
    fn columns(&mut self, table: &str) -> Result<Vec<String>> {
        let e = self.err("reading the catalog");
        let mut st = match self.c.prepare("SELECT name FROM pragma_table_info(?1)") {
            Ok(s) => s,
            Err(x) => return Err(e(x)),
        };
        let rows = st.query_map([table], |r| r.get::<_, String>(0));
        match rows {
            Ok(rows) => rows.collect::<std::result::Result<Vec<_>, _>>().map_err(e),
            Err(x) => Err(e(x)),
        }
    }
    fn recorded(&mut self, schema: &str) -> Result<Vec<(i64, String)>> {
        if !self.has_table(MIGRATIONS_TABLE)? {
            return Ok(Vec::new());
        }
        let e = self.err("reading schema_migrations");
        let mut st = match self.c.prepare(
            "SELECT version, sha256 FROM schema_migrations WHERE schema = ?1 ORDER BY version",
        ) {
            Ok(s) => s,
            Err(x) => return Err(e(x)),
        };
        let rows = st.query_map([schema], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        });
        match rows {
            Ok(rows) => rows.collect::<std::result::Result<Vec<_>, _>>().map_err(e),
            Err(x) => Err(e(x)),
        }
    }
    fn record(&mut self, schema: &str, version: i64, sha: &str) -> Result<()> {
        self.c
            .execute(
                "INSERT INTO schema_migrations (schema, version, sha256, applied_ms) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![schema, version, sha, crate::now_ms()],
            )
            .map(|_| ())
            .map_err(self.err("recording a migration"))
    }
    fn max_version(&mut self, table: &str, column: &str) -> Result<Option<i64>> {
        if !self.has_table(table)? {
            return Ok(None);
        }
        let q = format!("SELECT MAX({}) FROM {}", ident(column)?, ident(table)?);
        self.c
            .query_row(&q, [], |r| r.get::<_, Option<i64>>(0))
            .map_err(self.err(&format!("reading {table}")))
    }
}

struct Pg<'c, G: postgres::GenericClient> {
    c: &'c mut G,
    db: String,
}

impl<G: postgres::GenericClient> Pg<'_, G> {
    fn err(&self, what: &str) -> impl FnOnce(postgres::Error) -> DbError {
        let (db, what) = (self.db.clone(), what.to_string());
        move |source| DbError::Postgres { db, what, source }
    }
}

impl<G: postgres::GenericClient> Exec for Pg<'_, G> {
    fn pg(&self) -> bool {
        true
    }
    fn label(&self) -> &str {
        &self.db
    }
    fn batch(&mut self, what: &str, sql: &str) -> Result<()> {
        let e = self.err(what);
        self.c.batch_execute(sql).map_err(e)
    }
    fn has_table(&mut self, table: &str) -> Result<bool> {
        let e = self.err("reading the catalog");
        let rows = self
            .c
            .query(
                "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = $1",
                &[&table],
            )
            .map_err(e)?;
        Ok(!rows.is_empty())
    }
    fn columns(&mut self, table: &str) -> Result<Vec<String>> {
        let e = self.err("reading the catalog");
        let rows = self
            .c
            .query(
                "SELECT column_name::text FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
                &[&table],
            )
            .map_err(e)?;
        let e = self.err("reading the catalog");
        rows.iter()
            .map(|r| r.try_get::<_, String>(0))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(e)
    }
    fn recorded(&mut self, schema: &str) -> Result<Vec<(i64, String)>> {
        if !self.has_table(MIGRATIONS_TABLE)? {
            return Ok(Vec::new());
        }
        let e = self.err("reading schema_migrations");
        let rows = self
            .c
            .query(
                "SELECT version, sha256 FROM schema_migrations WHERE schema = $1 ORDER BY version",
                &[&schema],
            )
            .map_err(e)?;
        let e = self.err("reading schema_migrations");
        rows.iter()
            .map(|r| Ok((r.try_get::<_, i64>(0)?, r.try_get::<_, String>(1)?)))
            .collect::<std::result::Result<Vec<_>, postgres::Error>>()
            .map_err(e)
    }
    fn record(&mut self, schema: &str, version: i64, sha: &str) -> Result<()> {
        let e = self.err("recording a migration");
        self.c
            .execute(
                "INSERT INTO schema_migrations (schema, version, sha256, applied_ms) VALUES ($1, $2, $3, $4)",
                &[&schema, &version, &sha, &crate::now_ms()],
            )
            .map(|_| ())
            .map_err(e)
    }
    fn max_version(&mut self, table: &str, column: &str) -> Result<Option<i64>> {
        if !self.has_table(table)? {
            return Ok(None);
        }
        let q = format!(
            "SELECT MAX({})::BIGINT FROM {}",
            ident(column)?,
            ident(table)?
        );
        let e = self.err(&format!("reading {table}"));
        let row = self.c.query_one(&q, &[]).map_err(e)?;
        let e = self.err(&format!("reading {table}"));
        row.try_get::<_, Option<i64>>(0).map_err(e)
    }
}

/// A table or column name from a schema definition, checked before it is put
/// into SQL text.
fn ident(s: &str) -> Result<&str> {
    if !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
    {
        Ok(s)
    } else {
        Err(DbError::BadSchema {
            schema: String::new(),
            detail: format!("{s:?} is not a plain SQL name"),
        })
    }
}

fn short(h: &str) -> String {
    match h.get(..12) {
        Some(s) if h.len() > 12 => format!("{s}…"),
        _ => h.to_string(),
    }
}

/// Compare what the database recorded with the code. Returns whether every
/// migration of the code is recorded.
fn check(e: &dyn Exec, schema: &Schema<'_>, rec: &[(i64, String)]) -> Result<bool> {
    let latest = schema.latest();
    if let Some(&(v, _)) = rec.iter().find(|(v, _)| *v > latest || *v < 1) {
        let newest = rec.iter().map(|r| r.0).max().unwrap_or(v);
        return Err(DbError::TooNew {
            db: e.label().to_string(),
            schema: schema.name.to_string(),
            database: newest,
            code: latest,
        });
    }
    for (i, (v, sha)) in rec.iter().enumerate() {
        if *v != i as i64 + 1 {
            let list: Vec<String> = rec.iter().map(|r| r.0.to_string()).collect();
            return Err(DbError::NotAdoptable {
                db: e.label().to_string(),
                schema: schema.name.to_string(),
                detail: format!(
                    "recorded migrations {} have a gap (tampered or hand-edited schema_migrations)",
                    list.join(", ")
                ),
            });
        }
        let m = &schema.migrations[i];
        let code = m.sha256(e.pg());
        if *sha != code {
            return Err(DbError::MigrationDiffers {
                db: e.label().to_string(),
                schema: schema.name.to_string(),
                version: *v,
                database: short(sha),
                code: short(&code),
            });
        }
    }
    Ok(rec.len() as i64 == latest)
}

/// Check migration 1's tables: Ok(false) none there, Ok(true) all there with
/// their columns, else why not.
fn tables_present(
    e: &mut dyn Exec,
    schema: &Schema<'_>,
    tables: &[(&str, &[&str])],
) -> Result<bool> {
    let mut present = Vec::new();
    let mut missing = Vec::new();
    let mut problems = Vec::new();
    for (t, cols) in tables {
        let have = e.columns(t)?;
        if have.is_empty() {
            missing.push(*t);
            continue;
        }
        present.push(*t);
        let lack: Vec<&str> = cols
            .iter()
            .copied()
            .filter(|c| !have.iter().any(|h| h == c))
            .collect();
        if !lack.is_empty() {
            problems.push(format!("table {t} lacks column(s) {}", lack.join(", ")));
        }
    }
    if present.is_empty() {
        return Ok(false);
    }
    if !missing.is_empty() {
        problems.push(format!(
            "table(s) {} are there but {} missing",
            present.join(", "),
            missing.join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(true)
    } else {
        Err(DbError::NotAdoptable {
            db: e.label().to_string(),
            schema: schema.name.to_string(),
            detail: format!(
                "{} (not made by this program's schema {}, or only partly)",
                problems.join("; "),
                schema.name
            ),
        })
    }
}

/// The version an unrecorded database is at.
fn adopted_version(e: &mut dyn Exec, schema: &Schema<'_>) -> Result<i64> {
    match schema.adopt {
        Adopt::Tables(tables) => Ok(i64::from(tables_present(e, schema, tables)?)),
        Adopt::VersionTable {
            table,
            column,
            tables,
        } => {
            let v = e.max_version(table, column)?.unwrap_or(0);
            if v > schema.latest() {
                return Err(DbError::TooNew {
                    db: e.label().to_string(),
                    schema: schema.name.to_string(),
                    database: v,
                    code: schema.latest(),
                });
            }
            if v >= 1 && !tables_present(e, schema, tables)? {
                return Err(DbError::NotAdoptable {
                    db: e.label().to_string(),
                    schema: schema.name.to_string(),
                    detail: format!(
                        "{table} says version {v} but migration 1's tables are missing"
                    ),
                });
            }
            if v == 0 && tables_present(e, schema, tables)? {
                return Err(DbError::NotAdoptable {
                    db: e.label().to_string(),
                    schema: schema.name.to_string(),
                    detail: format!("its tables are there but {table} records no version"),
                });
            }
            Ok(v)
        }
    }
}

/// Under the lock: check, adopt, apply. Returns the versions applied.
fn apply_locked(e: &mut dyn Exec, schema: &Schema<'_>) -> Result<Vec<i64>> {
    e.batch("creating schema_migrations", CREATE_TABLE)?;
    let rec = e.recorded(schema.name)?;
    if check(e, schema, &rec)? {
        return Ok(Vec::new());
    }
    let mut at = rec.len() as i64;
    if rec.is_empty() {
        let v = adopted_version(e, schema)?;
        for m in &schema.migrations[..v as usize] {
            e.record(schema.name, m.version, &m.sha256(e.pg()))?;
        }
        at = v;
    }
    let mut applied = Vec::new();
    for m in &schema.migrations[at as usize..] {
        let pg = e.pg();
        let r = e
            .batch("running", m.sql(pg))
            .and_then(|()| e.record(schema.name, m.version, &m.sha256(pg)));
        if let Err(source) = r {
            return Err(DbError::Migration {
                db: e.label().to_string(),
                schema: schema.name.to_string(),
                version: m.version,
                source: Box::new(source),
            });
        }
        applied.push(m.version);
    }
    Ok(applied)
}

/// Bring `schema` up to date on `conn` (see the module docs). `label` names the
/// database in errors (a path, or a URL with its password hidden). Returns the
/// versions applied now (empty when the database was up to date; adopted
/// versions are recorded but not listed).
pub fn migrate(conn: ConnMut<'_>, label: &str, schema: &Schema<'_>) -> Result<Vec<i64>> {
    schema.validate()?;
    let db = label.to_string();
    match conn {
        ConnMut::Sqlite(c) => {
            {
                let mut e = Sq { c, db: db.clone() };
                let rec = e.recorded(schema.name)?;
                if check(&e, schema, &rec)? {
                    return Ok(Vec::new());
                }
            }
            // BEGIN IMMEDIATE waits through the busy timeout; on a database
            // being created by several processes at once SQLite can still answer
            // BUSY at once (WAL recovery): retried, bounded.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                match sqlite_locked(c, &db, schema) {
                    Err(DbError::Sqlite { source, .. })
                        if is_busy(&source) && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    r => return r,
                }
            }
        }
        ConnMut::Pg(c) => {
            {
                let mut e = Pg {
                    c: &mut *c,
                    db: db.clone(),
                };
                let rec = e.recorded(schema.name)?;
                if check(&e, schema, &rec)? {
                    return Ok(Vec::new());
                }
            }
            let pg = |what: &str| {
                let (db, what) = (db.clone(), what.to_string());
                move |source| DbError::Postgres { db, what, source }
            };
            let mut tx = c.transaction().map_err(pg("BEGIN"))?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PG_LOCK])
                .map_err(pg("taking the migration lock"))?;
            let applied = apply_locked(
                &mut Pg {
                    c: &mut tx,
                    db: db.clone(),
                },
                schema,
            )?;
            tx.commit().map_err(pg("committing migrations"))?;
            Ok(applied)
        }
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn sqlite_locked(c: &mut rusqlite::Connection, db: &str, schema: &Schema<'_>) -> Result<Vec<i64>> {
    let tx = c
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|source| DbError::Sqlite {
            db: db.to_string(),
            what: "taking the migration lock (BEGIN IMMEDIATE)".into(),
            source,
        })?;
    let applied = apply_locked(
        &mut Sq {
            c: &tx,
            db: db.to_string(),
        },
        schema,
    )?;
    tx.commit().map_err(|source| DbError::Sqlite {
        db: db.to_string(),
        what: "committing migrations".into(),
        source,
    })?;
    Ok(applied)
}

/// The migrations recorded for `schema`: (version, sha256), oldest first (empty
/// when none, or no `schema_migrations` table).
pub fn recorded(conn: ConnMut<'_>, label: &str, schema: &str) -> Result<Vec<(i64, String)>> {
    match conn {
        ConnMut::Sqlite(c) => Sq {
            c,
            db: label.into(),
        }
        .recorded(schema),
        ConnMut::Pg(c) => Pg {
            c,
            db: label.into(),
        }
        .recorded(schema),
    }
}

/// The columns of `table` (empty when it does not exist; PostgreSQL: in the
/// current schema).
pub fn table_columns(conn: ConnMut<'_>, label: &str, table: &str) -> Result<Vec<String>> {
    match conn {
        ConnMut::Sqlite(c) => Sq {
            c,
            db: label.into(),
        }
        .columns(table),
        ConnMut::Pg(c) => Pg {
            c,
            db: label.into(),
        }
        .columns(table),
    }
}

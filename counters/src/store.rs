//! The database behind the service: one [`Db`] trait, two implementations —
//! [`SqliteDb`] (embedded, zero set-up, WAL) and [`PgDb`] (PostgreSQL, for a lab with
//! several rig controllers) — and the schema migrations both run on open.
//!
//! SQL is written once with `$1`-style placeholders and portable types (BIGINT, TEXT);
//! the only dialect differences are the auto-increment key and row locking.

use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// A value bound to or read from SQL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Val {
    /// NULL (read only: the schema has no nullable columns).
    Null,
    /// An integer.
    I64(i64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
    /// A text array (PostgreSQL only: `= ANY($1)`, `unnest($1::text[])`).
    TextArray(Vec<String>),
    /// A BIGINT array (PostgreSQL only).
    I64Array(Vec<i64>),
}

impl Val {
    /// The integer, or an error naming the column.
    pub fn i64(&self, col: &str) -> Result<i64> {
        match self {
            Val::I64(v) => Ok(*v),
            other => Err(Error::db(
                "reading a row",
                format!("column {col}: expected an integer, got {other:?}"),
            )),
        }
    }
    /// The text, or an error naming the column.
    pub fn text(&self, col: &str) -> Result<String> {
        match self {
            Val::Text(v) => Ok(v.clone()),
            other => Err(Error::db(
                "reading a row",
                format!("column {col}: expected text, got {other:?}"),
            )),
        }
    }
}

impl From<i64> for Val {
    fn from(v: i64) -> Val {
        Val::I64(v)
    }
}
impl From<u32> for Val {
    fn from(v: u32) -> Val {
        Val::I64(v as i64)
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Val {
        Val::Text(v.to_string())
    }
}
impl From<String> for Val {
    fn from(v: String) -> Val {
        Val::Text(v)
    }
}

/// Rows fetched per round trip when streaming a query from PostgreSQL.
pub const STREAM_BATCH: i32 = 1000;

/// A database connection the service runs on.
pub trait Db: Send {
    /// "sqlite" or "postgresql".
    fn kind(&self) -> &'static str;
    /// Run a statement; returns rows affected.
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64>;
    /// Run a query; returns its rows.
    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Vec<Val>>>;
    /// Run a query and hand its rows to `f` one at a time, never holding them all
    /// (SQLite: stepping the statement; PostgreSQL: a portal fetched
    /// [`STREAM_BATCH`] rows at a time in one read-only snapshot). An error from
    /// `f` stops the query and is returned.
    fn query_each(
        &mut self,
        sql: &str,
        params: &[Val],
        f: &mut dyn FnMut(Vec<Val>) -> Result<()>,
    ) -> Result<()> {
        for row in self.query(sql, params)? {
            f(row)?;
        }
        Ok(())
    }
    /// Keep this connection's own memory small (a long scan, a report): no large
    /// page cache or memory map. A no-op where the server holds the data.
    fn low_memory(&mut self) -> Result<()> {
        Ok(())
    }
    /// Run several statements without parameters.
    fn batch(&mut self, sql: &str) -> Result<()>;
    /// Begin a write transaction.
    fn begin(&mut self) -> Result<()>;
    /// Commit it.
    fn commit(&mut self) -> Result<()>;
    /// Roll it back (errors are ignored: the connection may be gone).
    fn rollback(&mut self);
    /// Suffix that locks the selected rows for the transaction ("" where the whole
    /// database is locked by `begin`).
    fn for_update(&self) -> &'static str;
    /// Column type of an auto-increment primary key.
    fn auto_id(&self) -> &'static str;
    /// Statement that serialises migrations between processes, run inside `begin`.
    fn lock_migrations(&self) -> &'static str;
}

/// SQLite through rusqlite (bundled SQLite), in WAL mode.
pub struct SqliteDb {
    conn: rusqlite::Connection,
    sql_cache: HashMap<String, std::sync::Arc<str>>,
}

impl SqliteDb {
    /// Open (creating) the database file at `path`.
    pub fn open(path: &Path) -> Result<SqliteDb> {
        if let Some(d) = path.parent() {
            if !d.as_os_str().is_empty() && !d.exists() {
                std::fs::create_dir_all(d)
                    .map_err(|e| Error::db(&format!("creating directory {}", d.display()), e))?;
            }
        }
        let conn = rusqlite::Connection::open(path)
            .map_err(|e| Error::db(&format!("opening {}", path.display()), e))?;
        Self::setup(conn, &path.display().to_string())
    }

    /// An in-memory database (tests).
    pub fn memory() -> Result<SqliteDb> {
        let conn = rusqlite::Connection::open_in_memory()
            .map_err(|e| Error::db("opening an in-memory database", e))?;
        Self::setup(conn, ":memory:")
    }

    fn setup(conn: rusqlite::Connection, name: &str) -> Result<SqliteDb> {
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| Error::db(&format!("configuring {name}"), e))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; \
             PRAGMA cache_size=-65536; PRAGMA temp_store=MEMORY; PRAGMA mmap_size=268435456; \
             PRAGMA wal_autocheckpoint=8192;",
        )
        .map_err(|e| Error::db(&format!("configuring {name}"), e))?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(SqliteDb {
            conn,
            sql_cache: HashMap::new(),
        })
    }

    fn translate(&mut self, sql: &str) -> std::sync::Arc<str> {
        if let Some(s) = self.sql_cache.get(sql) {
            return s.clone();
        }
        let s: std::sync::Arc<str> = sql.replace('$', "?").into();
        self.sql_cache.insert(sql.to_string(), s.clone());
        s
    }
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Val::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Val::I64(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Val::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Val::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Val::TextArray(_) | Val::I64Array(_) => {
                return Err(rusqlite::Error::ToSqlConversionFailure(
                    "array parameters are for PostgreSQL only".into(),
                ))
            }
        })
    }
}

impl Db for SqliteDb {
    fn kind(&self) -> &'static str {
        "sqlite"
    }
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64> {
        let s = self.translate(sql);
        let mut st = self
            .conn
            .prepare_cached(&s)
            .map_err(|e| Error::db(&format!("preparing {sql}"), e))?;
        let n = st
            .execute(rusqlite::params_from_iter(params.iter()))
            .map_err(|e| Error::db(&format!("running {sql}"), e))?;
        Ok(n as u64)
    }
    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Vec<Val>>> {
        let mut out = Vec::new();
        self.query_each(sql, params, &mut |row| {
            out.push(row);
            Ok(())
        })?;
        Ok(out)
    }
    fn query_each(
        &mut self,
        sql: &str,
        params: &[Val],
        f: &mut dyn FnMut(Vec<Val>) -> Result<()>,
    ) -> Result<()> {
        let s = self.translate(sql);
        let mut st = self
            .conn
            .prepare_cached(&s)
            .map_err(|e| Error::db(&format!("preparing {sql}"), e))?;
        let ncol = st.column_count();
        let mut rows = st
            .query(rusqlite::params_from_iter(params.iter()))
            .map_err(|e| Error::db(&format!("running {sql}"), e))?;
        while let Some(r) = rows
            .next()
            .map_err(|e| Error::db(&format!("reading {sql}"), e))?
        {
            let mut row = Vec::with_capacity(ncol);
            for i in 0..ncol {
                use rusqlite::types::ValueRef;
                let v = r
                    .get_ref(i)
                    .map_err(|e| Error::db(&format!("reading {sql}"), e))?;
                row.push(match v {
                    ValueRef::Null => Val::Null,
                    ValueRef::Integer(x) => Val::I64(x),
                    ValueRef::Real(x) => Val::I64(x as i64),
                    ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Val::Blob(b.to_vec()),
                });
            }
            f(row)?;
        }
        Ok(())
    }
    fn low_memory(&mut self) -> Result<()> {
        // 2 MiB of page cache and no memory map: a scan of a million rows then
        // costs the same memory as one of a thousand.
        self.conn
            .execute_batch("PRAGMA cache_size=-2048; PRAGMA mmap_size=0;")
            .map_err(|e| Error::db("configuring a low-memory scan", e))
    }
    fn batch(&mut self, sql: &str) -> Result<()> {
        self.conn
            .execute_batch(sql)
            .map_err(|e| Error::db("running a batch", e))
    }
    fn begin(&mut self) -> Result<()> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| Error::db("BEGIN", e))
    }
    fn commit(&mut self) -> Result<()> {
        self.conn
            .execute_batch("COMMIT")
            .map_err(|e| Error::db("COMMIT", e))
    }
    fn rollback(&mut self) {
        let _ = self.conn.execute_batch("ROLLBACK");
    }
    fn for_update(&self) -> &'static str {
        ""
    }
    fn auto_id(&self) -> &'static str {
        "INTEGER PRIMARY KEY AUTOINCREMENT"
    }
    fn lock_migrations(&self) -> &'static str {
        "SELECT 1"
    }
}

/// PostgreSQL through the synchronous `postgres` client.
pub struct PgDb {
    client: postgres::Client,
    stmts: HashMap<String, postgres::Statement>,
    /// Inside a transaction begun by [`Db::begin`].
    in_tx: bool,
}

impl PgDb {
    /// Connect to `url` (postgresql://...). With `schema`, create it if needed and
    /// work inside it (tests isolate themselves this way).
    pub fn connect(url: &str, schema: Option<&str>) -> Result<PgDb> {
        let client = postgres::Client::connect(url, postgres::NoTls)
            .map_err(|e| Error::db(&format!("connecting to {}", redact(url)), pg_detail(&e)))?;
        let mut db = PgDb {
            client,
            stmts: HashMap::new(),
            in_tx: false,
        };
        if let Some(s) = schema {
            if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(Error::Input(format!(
                    "schema name {s:?}: use letters, digits and _"
                )));
            }
            db.batch(&format!(
                "CREATE SCHEMA IF NOT EXISTS \"{s}\"; SET search_path TO \"{s}\""
            ))?;
        }
        Ok(db)
    }

    /// Drop a schema and everything in it (test clean-up).
    pub fn drop_schema(&mut self, schema: &str) -> Result<()> {
        if !schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(Error::Input(format!("schema name {schema:?}")));
        }
        self.batch(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
    }

    fn stmt(&mut self, sql: &str) -> Result<postgres::Statement> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self
            .client
            .prepare(sql)
            .map_err(|e| Error::db(&format!("preparing {sql}"), pg_detail(&e)))?;
        self.stmts.insert(sql.to_string(), s.clone());
        Ok(s)
    }
}

fn pg_row(sql: &str, r: &postgres::Row) -> Result<Vec<Val>> {
    use postgres::types::Type;
    let rd = |e: postgres::Error| Error::db(&format!("reading {sql}"), pg_detail(&e));
    let mut row = Vec::with_capacity(r.len());
    for (i, c) in r.columns().iter().enumerate() {
        let t = c.type_();
        let v = if *t == Type::INT8 {
            r.try_get::<_, Option<i64>>(i).map_err(rd)?.map(Val::I64)
        } else if *t == Type::INT4 {
            r.try_get::<_, Option<i32>>(i)
                .map_err(rd)?
                .map(|x| Val::I64(x as i64))
        } else if *t == Type::INT2 {
            r.try_get::<_, Option<i16>>(i)
                .map_err(rd)?
                .map(|x| Val::I64(x as i64))
        } else if *t == Type::BYTEA {
            r.try_get::<_, Option<Vec<u8>>>(i)
                .map_err(rd)?
                .map(Val::Blob)
        } else if *t == Type::TEXT || *t == Type::VARCHAR || *t == Type::NAME {
            r.try_get::<_, Option<String>>(i)
                .map_err(rd)?
                .map(Val::Text)
        } else {
            return Err(Error::db(
                &format!("reading {sql}"),
                format!("column {} has unsupported type {t}", c.name()),
            ));
        };
        row.push(v.unwrap_or(Val::Null));
    }
    Ok(row)
}

/// A PostgreSQL error with the server's message, SQLSTATE and constraint (the
/// client's own Display says only "db error").
fn pg_detail(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => {
            let mut s = format!(
                "{}: {} (SQLSTATE {})",
                d.severity(),
                d.message(),
                d.code().code()
            );
            if let Some(c) = d.constraint() {
                s.push_str(&format!(", constraint {c}"));
            }
            if let Some(x) = d.detail() {
                s.push_str(&format!("; {x}"));
            }
            s
        }
        None => e.to_string(),
    }
}

/// A URL with any password replaced, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(a), Some(b)) if b > a => {
            let creds = &url[a + 3..b];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..a + 3], &creds[..c], &url[b..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl postgres::types::ToSql for Val {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
    {
        self.to_sql_checked(ty, out)
    }
    fn accepts(_: &postgres::types::Type) -> bool {
        // Checked per value in `to_sql_checked` (the variant decides).
        true
    }
    fn to_sql_checked(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
    {
        match self {
            Val::Null => Ok(postgres::types::IsNull::Yes),
            Val::I64(x) => x.to_sql_checked(ty, out),
            Val::Text(x) => x.to_sql_checked(ty, out),
            Val::Blob(x) => x.to_sql_checked(ty, out),
            Val::TextArray(x) => x.to_sql_checked(ty, out),
            Val::I64Array(x) => x.to_sql_checked(ty, out),
        }
    }
}

fn pg_params(params: &[Val]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|v| v as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

impl Db for PgDb {
    fn kind(&self) -> &'static str {
        "postgresql"
    }
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64> {
        let st = self.stmt(sql)?;
        let refs = pg_params(params);
        self.client
            .execute(&st, &refs)
            .map_err(|e| Error::db(&format!("running {sql}"), pg_detail(&e)))
    }
    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Vec<Val>>> {
        let st = self.stmt(sql)?;
        let refs = pg_params(params);
        let rows = self
            .client
            .query(&st, &refs)
            .map_err(|e| Error::db(&format!("running {sql}"), pg_detail(&e)))?;
        rows.iter().map(|r| pg_row(sql, r)).collect()
    }
    fn query_each(
        &mut self,
        sql: &str,
        params: &[Val],
        f: &mut dyn FnMut(Vec<Val>) -> Result<()>,
    ) -> Result<()> {
        if self.in_tx {
            // Inside the caller's transaction: no portal of our own.
            for row in self.query(sql, params)? {
                f(row)?;
            }
            return Ok(());
        }
        let st = self.stmt(sql)?;
        let refs = pg_params(params);
        let run = |e: postgres::Error| Error::db(&format!("running {sql}"), pg_detail(&e));
        let mut tx = self
            .client
            .build_transaction()
            .read_only(true)
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .start()
            .map_err(run)?;
        let portal = tx.bind(&st, &refs).map_err(run)?;
        loop {
            let rows = tx.query_portal(&portal, STREAM_BATCH).map_err(run)?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                f(pg_row(sql, r)?)?;
            }
        }
        tx.commit().map_err(run)
    }
    fn batch(&mut self, sql: &str) -> Result<()> {
        self.client
            .batch_execute(sql)
            .map_err(|e| Error::db("running a batch", pg_detail(&e)))
    }
    fn begin(&mut self) -> Result<()> {
        self.client
            .batch_execute("BEGIN")
            .map_err(|e| Error::db("BEGIN", pg_detail(&e)))?;
        self.in_tx = true;
        Ok(())
    }
    fn commit(&mut self) -> Result<()> {
        self.in_tx = false;
        self.client
            .batch_execute("COMMIT")
            .map_err(|e| Error::db("COMMIT", pg_detail(&e)))
    }
    fn rollback(&mut self) {
        self.in_tx = false;
        let _ = self.client.batch_execute("ROLLBACK");
    }
    fn for_update(&self) -> &'static str {
        " FOR UPDATE"
    }
    fn auto_id(&self) -> &'static str {
        "BIGSERIAL PRIMARY KEY"
    }
    fn lock_migrations(&self) -> &'static str {
        "LOCK TABLE schema_version IN EXCLUSIVE MODE"
    }
}

/// Open a database named by `spec`: a `postgresql://` (or `postgres://`) URL, or a
/// SQLite file path.
pub fn open(spec: &str) -> Result<Box<dyn Db>> {
    if spec.starts_with("postgresql://") || spec.starts_with("postgres://") {
        Ok(Box::new(PgDb::connect(spec, None)?))
    } else {
        Ok(Box::new(SqliteDb::open(Path::new(spec))?))
    }
}

/// Keep the text of `{PG:...}` parts on PostgreSQL, drop them elsewhere.
fn dialect(sql: &str, kind: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(i) = rest.find("{PG:") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 4..];
        let end = tail.find('}').unwrap_or(tail.len());
        if kind == "postgresql" {
            out.push_str(&tail[..end]);
        }
        rest = tail.get(end + 1..).unwrap_or("");
    }
    out.push_str(rest);
    out
}

/// The schema migrations, applied in order. `{ID}` stands for the dialect's
/// auto-increment key, `{PG:...}` for text only PostgreSQL runs. Never edit a published migration: add a new one.
pub const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE devices (
            serial TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            rack TEXT NOT NULL,
            state TEXT NOT NULL,
            c0 BIGINT NOT NULL, c1 BIGINT NOT NULL, c2 BIGINT NOT NULL,
            master BIGINT NOT NULL,
            epoch BIGINT NOT NULL,
            h0 TEXT NOT NULL, h1 TEXT NOT NULL, h2 TEXT NOT NULL,
            reason TEXT NOT NULL,
            hold TEXT NOT NULL,
            verified_at BIGINT NOT NULL,
            mac TEXT NOT NULL);
        CREATE TABLE catalog (
            region TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            version TEXT NOT NULL,
            approved_by TEXT NOT NULL,
            added_at BIGINT NOT NULL,
            mac TEXT NOT NULL,
            PRIMARY KEY (region, sha256));
        CREATE TABLE history (
            id {ID},
            serial TEXT NOT NULL,
            at BIGINT NOT NULL,
            verdict TEXT NOT NULL,
            severity TEXT NOT NULL,
            recoverable BIGINT NOT NULL,
            state TEXT NOT NULL,
            observed TEXT NOT NULL,
            expected TEXT NOT NULL,
            reasons TEXT NOT NULL,
            mac TEXT NOT NULL);
        CREATE TABLE intents (
            id {ID},
            serial TEXT NOT NULL,
            region TEXT NOT NULL,
            target TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            status TEXT NOT NULL,
            closed_at BIGINT NOT NULL,
            mac TEXT NOT NULL);
        CREATE TABLE update_log (
            id {ID},
            serial TEXT NOT NULL,
            at BIGINT NOT NULL,
            region TEXT NOT NULL,
            outcome TEXT NOT NULL,
            mac TEXT NOT NULL);",
    ),
    (
        2,
        "CREATE INDEX history_serial ON history (serial, id);
        CREATE INDEX intents_serial ON intents (serial, status);
        CREATE INDEX update_log_serial ON update_log (serial, at);
        CREATE INDEX devices_host ON devices (host);
        CREATE INDEX devices_rack ON devices (rack);",
    ),
    (
        3,
        "CREATE TABLE meta (
            name TEXT PRIMARY KEY,
            value TEXT NOT NULL);
        CREATE TABLE evidence (
            id {ID},
            tbl TEXT NOT NULL,
            row_key TEXT NOT NULL,
            found TEXT NOT NULL,
            at BIGINT NOT NULL,
            reason TEXT NOT NULL);
        CREATE TABLE holds (
            serial TEXT PRIMARY KEY,
            reason TEXT NOT NULL,
            at BIGINT NOT NULL,
            mac TEXT NOT NULL);",
    ),
    (
        4,
        "ALTER TABLE history ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
        ALTER TABLE history ADD COLUMN prev TEXT NOT NULL DEFAULT '';
        CREATE UNIQUE INDEX history_seq ON history (seq) WHERE seq > 0;
        CREATE INDEX history_serial_seq ON history (serial, seq);
        ALTER TABLE devices ADD COLUMN hseq BIGINT NOT NULL DEFAULT 0;
        ALTER TABLE update_log ADD COLUMN prev TEXT NOT NULL DEFAULT '';
        CREATE TABLE revoked (
            region TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            at BIGINT NOT NULL,
            mac TEXT NOT NULL,
            PRIMARY KEY (region, sha256));",
    ),
    (
        5,
        "DROP INDEX devices_host;
        DROP INDEX devices_rack;
        CREATE INDEX devices_host_serial ON devices (host, serial);
        CREATE INDEX devices_rack_serial ON devices (rack, serial);
        DROP INDEX history_serial;
        {PG:ALTER TABLE devices SET (fillfactor = 60);}",
    ),
];

/// The newest schema version this build knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// The schema version of a database (0 when empty).
pub fn schema_version(db: &mut dyn Db) -> Result<i64> {
    db.batch(
        "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )?;
    let rows = db.query(
        "SELECT version FROM schema_version ORDER BY version DESC LIMIT 1",
        &[],
    )?;
    match rows.first().and_then(|r| r.first()) {
        Some(v) => v.i64("version"),
        None => Ok(0),
    }
}

/// Apply every migration newer than the database's version, each in its own
/// transaction with its `schema_version` row. Returns the versions applied.
pub fn migrate(db: &mut dyn Db) -> Result<Vec<i64>> {
    let mut applied = Vec::new();
    let current = schema_version(db)?;
    if current > latest_version() {
        return Err(Error::SchemaTooNew {
            found: current,
            supported: latest_version(),
        });
    }
    for &(v, sql) in MIGRATIONS {
        if v <= current {
            continue;
        }
        db.begin()?;
        let r = (|| -> Result<bool> {
            let lock = db.lock_migrations();
            db.batch(lock)?;
            // Another process may have migrated while we waited for the lock.
            let rows = db.query(
                "SELECT version FROM schema_version WHERE version = $1",
                &[Val::I64(v)],
            )?;
            if !rows.is_empty() {
                return Ok(false);
            }
            let sql = dialect(&sql.replace("{ID}", db.auto_id()), db.kind());
            db.batch(&sql)?;
            db.exec(
                "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                &[Val::I64(v), Val::I64(now_ms())],
            )?;
            Ok(true)
        })();
        match r {
            Ok(did) => {
                db.commit()?;
                if did {
                    applied.push(v);
                }
            }
            Err(e) => {
                db.rollback();
                return Err(Error::db(&format!("applying schema migration {v}"), e));
            }
        }
    }
    Ok(applied)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod dialect_tests {
    #[test]
    fn postgresql_only_parts() {
        let s = "A;{PG:B;}C;{PG:D}";
        assert_eq!(super::dialect(s, "postgresql"), "A;B;C;D");
        assert_eq!(super::dialect(s, "sqlite"), "A;C;");
    }
}

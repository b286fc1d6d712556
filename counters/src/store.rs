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
    /// Begin a transaction whose `BEGIN` may wait until it is needed
    /// (PostgreSQL: sent before the first [`Db::exec`], [`Db::batch`] or locking
    /// `FOR UPDATE` query; a plain [`Db::query`] before it runs on its own, in
    /// one snapshot, as it would inside a READ COMMITTED transaction). While no
    /// `BEGIN` was sent ([`Db::tx_open`] false), a query that writes commits on
    /// its own: the caller may only use that for one final statement that is
    /// atomic by itself. [`Db::commit`] then has nothing to send.
    fn begin_deferred(&mut self) -> Result<()> {
        self.begin()
    }
    /// Whether the transaction begun has really begun (false only while a
    /// deferred `BEGIN` is still unsent).
    fn tx_open(&self) -> bool {
        true
    }
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
    /// The raw connection, for hilrig-db's migrations.
    fn conn(&mut self) -> hilrig_db::ConnMut<'_>;
    /// The database's name for messages (path, or URL without its password).
    fn name(&self) -> &str;
}

/// SQLite through rusqlite (bundled SQLite), in WAL mode.
pub struct SqliteDb {
    conn: rusqlite::Connection,
    sql_cache: HashMap<String, std::sync::Arc<str>>,
    name: String,
}

/// The connection settings of the counters service (hilrig-db's: WAL, 10 s busy
/// timeout, foreign keys; PostgreSQL connect timeout, `application_name`).
pub fn settings() -> hilrig_db::Settings {
    hilrig_db::Settings::new("hilrig-counters")
}

impl SqliteDb {
    /// Open (creating it and its directory) the database file at `path`.
    pub fn open(path: &Path) -> Result<SqliteDb> {
        owner_only_db_file(path)?;
        let conn = hilrig_db::open_sqlite(path, &settings())
            .map_err(|e| Error::db(&format!("opening {}", path.display()), e))?;
        let db = Self::setup(conn, &path.display().to_string())?;
        // The database holds sealed secrets (reset keys): owner-only, its WAL
        // and shared-memory files too (SQLite creates them with the main file's
        // mode, but an older database may have been made 0644).
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            let p = std::path::PathBuf::from(p);
            if let Ok(m) = std::fs::symlink_metadata(&p) {
                use std::os::unix::fs::PermissionsExt;
                if m.is_file() && m.permissions().mode() & 0o077 != 0 {
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                        .map_err(|e| Error::db(&format!("chmod 600 {}", p.display()), e))?;
                }
            }
        }
        Ok(db)
    }

    /// An in-memory database (tests).
    pub fn memory() -> Result<SqliteDb> {
        let conn = hilrig_db::open_sqlite_memory(&settings())
            .map_err(|e| Error::db("opening an in-memory database", e))?;
        Self::setup(conn, ":memory:")
    }

    /// The service's own SQLite settings on top of hilrig-db's.
    fn setup(conn: rusqlite::Connection, name: &str) -> Result<SqliteDb> {
        conn.execute_batch(
            "PRAGMA synchronous=FULL; \
             PRAGMA cache_size=-65536; PRAGMA temp_store=MEMORY; PRAGMA mmap_size=268435456; \
             PRAGMA wal_autocheckpoint=8192;",
        )
        .map_err(|e| Error::db(&format!("configuring {name}"), e))?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(SqliteDb {
            conn,
            sql_cache: HashMap::new(),
            name: name.to_string(),
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
    fn conn(&mut self) -> hilrig_db::ConnMut<'_> {
        hilrig_db::ConnMut::Sqlite(&mut self.conn)
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// PostgreSQL through the synchronous `postgres` client.
pub struct PgDb {
    client: postgres::Client,
    stmts: HashMap<String, postgres::Statement>,
    /// Inside a transaction begun by [`Db::begin`] or [`Db::begin_deferred`].
    in_tx: bool,
    /// `BEGIN` was sent (false while a deferred one waits).
    begun: bool,
    name: String,
}

impl PgDb {
    /// Connect to `url` (postgresql://...). With `schema`, create it if needed and
    /// work inside it (tests isolate themselves this way).
    pub fn connect(url: &str, schema: Option<&str>) -> Result<PgDb> {
        let client = hilrig_db::connect_pg(url, &settings())
            .map_err(|e| Error::db(&format!("connecting to {}", redact(url)), e))?;
        let mut db = PgDb {
            client,
            stmts: HashMap::new(),
            in_tx: false,
            begun: false,
            name: redact(url),
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

    /// Send a deferred `BEGIN` before a statement that writes or locks.
    fn ensure_begun(&mut self) -> Result<()> {
        if self.in_tx && !self.begun {
            self.client
                .batch_execute("BEGIN")
                .map_err(|e| Error::db("BEGIN", pg_detail(&e)))?;
            self.begun = true;
        }
        Ok(())
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
    hilrig_db::pg_detail(e)
}

/// A URL with any password replaced, for messages.
pub fn redact(url: &str) -> String {
    hilrig_db::redact(url)
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
        self.ensure_begun()?;
        let st = self.stmt(sql)?;
        let refs = pg_params(params);
        self.client
            .execute(&st, &refs)
            .map_err(|e| Error::db(&format!("running {sql}"), pg_detail(&e)))
    }
    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Vec<Val>>> {
        if sql.contains("FOR UPDATE") {
            self.ensure_begun()?;
        }
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
        self.ensure_begun()?;
        self.client
            .batch_execute(sql)
            .map_err(|e| Error::db("running a batch", pg_detail(&e)))
    }
    fn begin(&mut self) -> Result<()> {
        self.client
            .batch_execute("BEGIN")
            .map_err(|e| Error::db("BEGIN", pg_detail(&e)))?;
        self.in_tx = true;
        self.begun = true;
        Ok(())
    }
    fn begin_deferred(&mut self) -> Result<()> {
        self.in_tx = true;
        self.begun = false;
        Ok(())
    }
    fn tx_open(&self) -> bool {
        self.begun
    }
    fn commit(&mut self) -> Result<()> {
        self.in_tx = false;
        if !std::mem::replace(&mut self.begun, false) {
            return Ok(());
        }
        self.client
            .batch_execute("COMMIT")
            .map_err(|e| Error::db("COMMIT", pg_detail(&e)))
    }
    fn rollback(&mut self) {
        self.in_tx = false;
        if std::mem::replace(&mut self.begun, false) {
            let _ = self.client.batch_execute("ROLLBACK");
        }
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
    fn conn(&mut self) -> hilrig_db::ConnMut<'_> {
        hilrig_db::ConnMut::Pg(&mut self.client)
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// Open a database named by `spec` (see [`hilrig_db::DbUrl`]): a `postgresql://`
/// (or `postgres://`) URL, `sqlite:PATH`, or a SQLite file path.
pub fn open(spec: &str) -> Result<Box<dyn Db>> {
    match hilrig_db::DbUrl::parse(spec).map_err(|e| Error::Input(e.to_string()))? {
        hilrig_db::DbUrl::Postgres(url) => Ok(Box::new(PgDb::connect(&url, None)?)),
        hilrig_db::DbUrl::Sqlite(path) => Ok(Box::new(SqliteDb::open(&path)?)),
    }
}

/// Create a new SQLite database file owner-only (0600, `O_EXCL|O_NOFOLLOW`) before
/// SQLite opens it, so it never exists with a wider mode; an existing file is
/// left to the open (and tightened after it).
fn owner_only_db_file(path: &Path) -> Result<()> {
    if path.as_os_str().is_empty() || path.exists() {
        return Ok(());
    }
    if let Some(d) = path.parent() {
        if !d.as_os_str().is_empty() && !d.exists() {
            std::fs::create_dir_all(d)
                .map_err(|e| Error::db(&format!("creating {}", d.display()), e))?;
        }
    }
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::db(&format!("creating {}", path.display()), e)),
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
    (
        6,
        "CREATE TABLE reset_keys (
            serial TEXT PRIMARY KEY,
            sealed TEXT NOT NULL,
            at BIGINT NOT NULL,
            mac TEXT NOT NULL);",
    ),
    (
        7,
        // Serials compared byte by byte on PostgreSQL (SQLite's default already
        // is): index lookups and inserts on the verify path skip the locale's
        // collation. Serials are ASCII hex, so their order is unchanged.
        "{PG:ALTER TABLE devices ALTER COLUMN serial TYPE TEXT COLLATE \"C\";
        ALTER TABLE history ALTER COLUMN serial TYPE TEXT COLLATE \"C\";
        ALTER TABLE holds ALTER COLUMN serial TYPE TEXT COLLATE \"C\";
        ALTER TABLE intents ALTER COLUMN serial TYPE TEXT COLLATE \"C\";
        ALTER TABLE update_log ALTER COLUMN serial TYPE TEXT COLLATE \"C\";
        ALTER TABLE reset_keys ALTER COLUMN serial TYPE TEXT COLLATE \"C\";}",
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

/// Migration 1's tables (adopting a database made before hilrig-db).
const TABLES_V1: &[(&str, &[&str])] = &[
    (
        "devices",
        &[
            "serial",
            "host",
            "rack",
            "state",
            "c0",
            "c1",
            "c2",
            "master",
            "epoch",
            "h0",
            "h1",
            "h2",
            "reason",
            "hold",
            "verified_at",
            "mac",
        ],
    ),
    (
        "catalog",
        &[
            "region",
            "sha256",
            "version",
            "approved_by",
            "added_at",
            "mac",
        ],
    ),
    (
        "history",
        &[
            "id",
            "serial",
            "at",
            "verdict",
            "severity",
            "recoverable",
            "state",
            "observed",
            "expected",
            "reasons",
            "mac",
        ],
    ),
    (
        "intents",
        &[
            "id",
            "serial",
            "region",
            "target",
            "created_at",
            "status",
            "closed_at",
            "mac",
        ],
    ),
    (
        "update_log",
        &["id", "serial", "at", "region", "outcome", "mac"],
    ),
];

/// [`MIGRATIONS`] as each engine runs them (`{ID}` and `{PG:...}` expanded):
/// (sqlite, postgresql) per version.
pub fn migration_texts() -> Vec<(String, String)> {
    MIGRATIONS
        .iter()
        .map(|&(_, sql)| {
            (
                dialect(
                    &sql.replace("{ID}", "INTEGER PRIMARY KEY AUTOINCREMENT"),
                    "sqlite",
                ),
                dialect(&sql.replace("{ID}", "BIGSERIAL PRIMARY KEY"), "postgresql"),
            )
        })
        .collect()
}

/// Apply every migration newer than the database's version through hilrig-db
/// (schema `counters` in `schema_migrations`, all pending migrations in one locked
/// transaction; a database from before hilrig-db is adopted at its
/// `schema_version`). `schema_version` is kept as before, one row per version.
/// Returns the versions applied.
pub fn migrate(db: &mut dyn Db) -> Result<Vec<i64>> {
    let current = schema_version(db)?;
    if current > latest_version() {
        return Err(Error::SchemaTooNew {
            found: current,
            supported: latest_version(),
        });
    }
    let texts = migration_texts();
    let migrations: Vec<hilrig_db::Migration<'_>> = MIGRATIONS
        .iter()
        .zip(&texts)
        .map(|(&(v, _), (sq, pg))| hilrig_db::Migration::per_engine(v, sq, pg))
        .collect();
    let schema = hilrig_db::Schema {
        name: "counters",
        migrations: &migrations,
        adopt: hilrig_db::Adopt::VersionTable {
            table: "schema_version",
            column: "version",
            tables: TABLES_V1,
        },
    };
    let name = db.name().to_string();
    let applied = hilrig_db::migrate(db.conn(), &name, &schema).map_err(|e| match e {
        hilrig_db::DbError::TooNew { database, code, .. } => Error::SchemaTooNew {
            found: database,
            supported: code,
        },
        e => Error::db("applying schema migrations", e),
    })?;
    // The old version table, kept for older builds and tools that read it; a
    // crash between the two commits is mended here on the next open.
    for v in schema_version(db)? + 1..=latest_version() {
        db.exec(
            "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2) ON CONFLICT (version) DO NOTHING",
            &[Val::I64(v), Val::I64(now_ms())],
        )?;
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

//! The results store: runs, their finished cases (the whole `CaseResult` as JSON:
//! outcome, attempts, timings, counter readings, alarms, artifact paths) and the
//! per-case measurements as rows (`samples`: live-patch blackouts, trap latencies,
//! teardown times, counter readings) for queries across runs. Every finished case
//! is committed as soon as it ends, so a killed runner resumes without losing it.
//!
//! The same database choice as the counters service: a file path is SQLite
//! (embedded, WAL), a `postgresql://` (or `postgres://`) URL is PostgreSQL (a lab
//! with several rig controllers sharing one store).

use hilrig_reports::{CaseResult, Host, Run};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;

/// A run as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRow {
    /// Run id.
    pub id: String,
    /// Campaign name.
    pub campaign: String,
    /// Campaign file.
    pub file: String,
    /// Run directory.
    pub run_dir: String,
    /// Start, unix ms.
    pub started_ms: u64,
    /// End, unix ms (None while running or after a kill).
    pub finished_ms: Option<u64>,
}

/// Errors of the results store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("results store {db}: {what}: {source}")]
    Sqlite {
        /// The database.
        db: String,
        /// What was being done.
        what: String,
        /// Cause.
        source: rusqlite::Error,
    },
    /// PostgreSQL said no.
    #[error("results store {db}: {what}: {source}")]
    Postgres {
        /// The database (URL, password redacted).
        db: String,
        /// What was being done.
        what: String,
        /// Cause.
        source: postgres::Error,
    },
    /// A stored row does not parse, or a value cannot be stored.
    #[error("results store {db}: {what}")]
    Data {
        /// The database.
        db: String,
        /// What is wrong.
        what: String,
    },
    /// The directory of a SQLite file could not be created.
    #[error("results store: creating {path}: {source}")]
    Io {
        /// The directory.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

enum Conn {
    Sqlite(Connection),
    Pg(Box<postgres::Client>),
}

/// The store.
pub struct Store {
    conn: Conn,
    name: String,
}

/// Whether `spec` names a PostgreSQL database.
pub fn is_pg(spec: &str) -> bool {
    spec.starts_with("postgresql://") || spec.starts_with("postgres://")
}

const SQLITE_SCHEMA: &str = "PRAGMA journal_mode=WAL;
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
   PRIMARY KEY (run_id, case_id, kind, seq));";

const PG_SCHEMA: &str = "
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
   PRIMARY KEY (run_id, case_id));";

/// Create or migrate the PostgreSQL schema. Serialised between connections by an
/// advisory lock: runners starting together on a fresh database would otherwise
/// race in `CREATE TABLE IF NOT EXISTS` (a duplicate-key error on the catalog).
pub(crate) fn pg_migrate(
    client: &mut postgres::Client,
) -> std::result::Result<(), postgres::Error> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock(7202617017)", &[])?;
    tx.batch_execute(PG_SCHEMA)?;
    tx.commit()
}

/// Store (or replace) a finished case and its samples inside `tx` (PostgreSQL).
pub(crate) fn pg_put_case(
    tx: &mut postgres::Transaction<'_>,
    run_id: &str,
    c: &CaseResult,
    json: &str,
) -> std::result::Result<(), postgres::Error> {
    tx.execute(
        "INSERT INTO cases (run_id, case_id, outcome, result) VALUES ($1, $2, $3, $4)
         ON CONFLICT (run_id, case_id) DO UPDATE SET outcome = EXCLUDED.outcome, result = EXCLUDED.result",
        &[&run_id, &c.id, &c.outcome.as_str(), &json],
    )?;
    tx.execute(
        "DELETE FROM samples WHERE run_id = $1 AND case_id = $2",
        &[&run_id, &c.id],
    )?;
    for (kind, vals) in &samples(c) {
        for (i, v) in vals.iter().enumerate() {
            tx.execute(
                "INSERT INTO samples (run_id, case_id, kind, seq, value) VALUES ($1, $2, $3, $4, $5)",
                &[&run_id, &c.id, kind, &(i as i32), v],
            )?;
        }
    }
    Ok(())
}

/// The measurement rows of a case: (kind, values).
fn samples(c: &CaseResult) -> Vec<(&'static str, Vec<f64>)> {
    let m = &c.metrics;
    vec![
        ("blackout_us", m.blackouts_us.clone()),
        ("trap_latency_us", m.trap_latency.samples_us.clone()),
        ("teardown_us", m.teardown_us.clone()),
        (
            "master",
            m.counters.iter().map(|r| r.master as f64).collect(),
        ),
    ]
}

fn row_of(
    id: String,
    campaign: String,
    file: String,
    run_dir: String,
    s: i64,
    f: Option<i64>,
) -> RunRow {
    RunRow {
        id,
        campaign,
        file,
        run_dir,
        started_ms: s.max(0) as u64,
        finished_ms: f.map(|v| v.max(0) as u64),
    }
}

impl Store {
    /// Open (creating) the store named by `spec`: a SQLite file path or a
    /// `postgresql://` URL.
    pub fn open(spec: &Path) -> Result<Store> {
        let s = spec.to_string_lossy().into_owned();
        if is_pg(&s) {
            return Store::open_pg(&s);
        }
        if let Some(d) = spec.parent() {
            if !d.as_os_str().is_empty() {
                std::fs::create_dir_all(d).map_err(|source| StoreError::Io {
                    path: d.display().to_string(),
                    source,
                })?;
            }
        }
        let sq = |what: &str| {
            let (db, what) = (s.clone(), what.to_string());
            move |source| StoreError::Sqlite { db, what, source }
        };
        let conn = Connection::open(spec).map_err(sq("opening"))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sq("busy timeout"))?;
        conn.execute_batch(SQLITE_SCHEMA).map_err(sq("schema"))?;
        Ok(Store {
            conn: Conn::Sqlite(conn),
            name: s,
        })
    }

    fn open_pg(url: &str) -> Result<Store> {
        let name = hilrig_counters::store::redact(url);
        let mut client = postgres::Client::connect(url, postgres::NoTls).map_err(|source| {
            StoreError::Postgres {
                db: name.clone(),
                what: "connecting".into(),
                source,
            }
        })?;
        pg_migrate(&mut client).map_err(|source| StoreError::Postgres {
            db: name.clone(),
            what: "schema".into(),
            source,
        })?;
        Ok(Store {
            conn: Conn::Pg(Box::new(client)),
            name,
        })
    }

    /// `sqlite` or `postgresql`.
    pub fn kind(&self) -> &'static str {
        match self.conn {
            Conn::Sqlite(_) => "sqlite",
            Conn::Pg(_) => "postgresql",
        }
    }

    fn sq(&self, what: &str) -> impl FnOnce(rusqlite::Error) -> StoreError {
        let (db, what) = (self.name.clone(), what.to_string());
        move |source| StoreError::Sqlite { db, what, source }
    }

    fn pg_err(&self, what: &str) -> impl FnOnce(postgres::Error) -> StoreError {
        let (db, what) = (self.name.clone(), what.to_string());
        move |source| StoreError::Postgres { db, what, source }
    }

    fn data(&self, what: String) -> StoreError {
        StoreError::Data {
            db: self.name.clone(),
            what,
        }
    }

    /// Record a new run.
    pub fn create_run(&mut self, row: &RunRow, hosts: &[Host]) -> Result<()> {
        let hosts = serde_json::to_string(hosts).map_err(|e| self.data(format!("hosts: {e}")))?;
        let e = self.sq("creating run");
        let p = self.pg_err("creating run");
        match &mut self.conn {
            Conn::Sqlite(c) => c
                .execute(
                    "INSERT INTO runs (id, campaign, file, run_dir, started_ms, hosts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![row.id, row.campaign, row.file, row.run_dir, row.started_ms as i64, hosts],
                )
                .map(|_| ())
                .map_err(e),
            Conn::Pg(c) => c
                .execute(
                    "INSERT INTO runs (id, campaign, file, run_dir, started_ms, hosts) VALUES ($1, $2, $3, $4, $5, $6)",
                    &[&row.id, &row.campaign, &row.file, &row.run_dir, &(row.started_ms as i64), &hosts],
                )
                .map(|_| ())
                .map_err(p),
        }
    }

    /// The run `id`.
    pub fn run(&mut self, id: &str) -> Result<Option<RunRow>> {
        let e = self.sq("reading run");
        let p = self.pg_err("reading run");
        const Q: &str =
            "SELECT id, campaign, file, run_dir, started_ms, finished_ms FROM runs WHERE id = ";
        match &mut self.conn {
            Conn::Sqlite(c) => c
                .query_row(&format!("{Q}?1"), params![id], |r| {
                    Ok(row_of(
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })
                .optional()
                .map_err(e),
            Conn::Pg(c) => Ok(c
                .query_opt(&format!("{Q}$1"), &[&id])
                .map_err(p)?
                .map(|r| row_of(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))),
        }
    }

    /// Runs, newest first, optionally of one campaign only.
    pub fn runs(&mut self, campaign: Option<&str>) -> Result<Vec<RunRow>> {
        let name = self.name.clone();
        let e = self.sq("listing runs");
        let p = self.pg_err("listing runs");
        match &mut self.conn {
            Conn::Sqlite(c) => {
                let mut st = c
                    .prepare(
                        "SELECT id, campaign, file, run_dir, started_ms, finished_ms FROM runs
                         WHERE ?1 IS NULL OR campaign = ?1 ORDER BY started_ms DESC, rowid DESC",
                    )
                    .map_err(|x| StoreError::Sqlite {
                        db: name.clone(),
                        what: "listing runs".into(),
                        source: x,
                    })?;
                let rows = st.query_map(params![campaign], |r| {
                    Ok(row_of(
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                });
                match rows {
                    Ok(rows) => rows.collect::<std::result::Result<Vec<_>, _>>().map_err(e),
                    Err(x) => Err(e(x)),
                }
            }
            Conn::Pg(c) => Ok(c
                .query(
                    "SELECT id, campaign, file, run_dir, started_ms, finished_ms FROM runs
                     WHERE $1::text IS NULL OR campaign = $1 ORDER BY started_ms DESC, seq DESC",
                    &[&campaign],
                )
                .map_err(p)?
                .into_iter()
                .map(|r| row_of(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
                .collect()),
        }
    }

    /// Store (or replace) a finished case and its measurement rows, in one
    /// transaction.
    pub fn put_case(&mut self, run_id: &str, c: &CaseResult) -> Result<()> {
        let json =
            serde_json::to_string(c).map_err(|e| self.data(format!("case {}: {e}", c.id)))?;
        let rows = samples(c);
        let e = self.sq("storing case");
        let p = self.pg_err("storing case");
        match &mut self.conn {
            Conn::Sqlite(conn) => {
                let mut run = || -> rusqlite::Result<()> {
                    let tx = conn.transaction()?;
                    tx.execute(
                        "INSERT OR REPLACE INTO cases (run_id, case_id, outcome, result) VALUES (?1, ?2, ?3, ?4)",
                        params![run_id, c.id, c.outcome.as_str(), json],
                    )?;
                    tx.execute(
                        "DELETE FROM samples WHERE run_id = ?1 AND case_id = ?2",
                        params![run_id, c.id],
                    )?;
                    for (kind, vals) in &rows {
                        for (i, v) in vals.iter().enumerate() {
                            tx.execute(
                                "INSERT INTO samples (run_id, case_id, kind, seq, value) VALUES (?1, ?2, ?3, ?4, ?5)",
                                params![run_id, c.id, kind, i as i64, v],
                            )?;
                        }
                    }
                    tx.commit()
                };
                run().map_err(e)
            }
            Conn::Pg(client) => {
                let mut run = || -> std::result::Result<(), postgres::Error> {
                    let mut tx = client.transaction()?;
                    pg_put_case(&mut tx, run_id, c, &json)?;
                    tx.commit()
                };
                run().map_err(p)
            }
        }
    }

    /// Measurement rows of `kind` (`blackout_us`, `trap_latency_us`, `teardown_us`,
    /// `master`) of one case, in order.
    pub fn samples(&mut self, run_id: &str, case_id: &str, kind: &str) -> Result<Vec<f64>> {
        let name = self.name.clone();
        let e = self.sq("reading samples");
        let p = self.pg_err("reading samples");
        match &mut self.conn {
            Conn::Sqlite(c) => {
                let mut st = c
                    .prepare(
                        "SELECT value FROM samples WHERE run_id = ?1 AND case_id = ?2 AND kind = ?3 ORDER BY seq",
                    )
                    .map_err(|x| StoreError::Sqlite {
                        db: name.clone(),
                        what: "reading samples".into(),
                        source: x,
                    })?;
                let rows = st.query_map(params![run_id, case_id, kind], |r| r.get::<_, f64>(0));
                match rows {
                    Ok(rows) => rows.collect::<std::result::Result<Vec<_>, _>>().map_err(e),
                    Err(x) => Err(e(x)),
                }
            }
            Conn::Pg(c) => Ok(c
                .query(
                    "SELECT value FROM samples WHERE run_id = $1 AND case_id = $2 AND kind = $3 ORDER BY seq",
                    &[&run_id, &case_id, &kind],
                )
                .map_err(p)?
                .into_iter()
                .map(|r| r.get::<_, f64>(0))
                .collect()),
        }
    }

    /// The finished cases of `run_id`.
    pub fn cases(&mut self, run_id: &str) -> Result<Vec<CaseResult>> {
        let name = self.name.clone();
        let e = self.sq("reading cases");
        let p = self.pg_err("reading cases");
        let raw: Vec<(String, String)> = match &mut self.conn {
            Conn::Sqlite(c) => {
                let mut st = c
                    .prepare("SELECT case_id, result FROM cases WHERE run_id = ?1 ORDER BY rowid")
                    .map_err(|x| StoreError::Sqlite {
                        db: name.clone(),
                        what: "reading cases".into(),
                        source: x,
                    })?;
                let rows = st.query_map(params![run_id], |r| Ok((r.get(0)?, r.get(1)?)));
                match rows {
                    Ok(rows) => rows
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map_err(e)?,
                    Err(x) => return Err(e(x)),
                }
            }
            Conn::Pg(c) => c
                .query(
                    "SELECT case_id, result FROM cases WHERE run_id = $1 ORDER BY seq",
                    &[&run_id],
                )
                .map_err(p)?
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        };
        raw.into_iter()
            .map(|(id, json)| {
                serde_json::from_str(&json).map_err(|err| {
                    self.data(format!("case {id} of run {run_id} is corrupt: {err}"))
                })
            })
            .collect()
    }

    /// Mark `run_id` finished.
    pub fn finish_run(&mut self, run_id: &str, finished_ms: u64) -> Result<()> {
        let e = self.sq("finishing run");
        let p = self.pg_err("finishing run");
        match &mut self.conn {
            Conn::Sqlite(c) => c
                .execute(
                    "UPDATE runs SET finished_ms = ?2 WHERE id = ?1",
                    params![run_id, finished_ms as i64],
                )
                .map(|_| ())
                .map_err(e),
            Conn::Pg(c) => c
                .execute(
                    "UPDATE runs SET finished_ms = $2 WHERE id = $1",
                    &[&run_id, &(finished_ms as i64)],
                )
                .map(|_| ())
                .map_err(p),
        }
    }

    /// The whole run `id` as a results model.
    pub fn load_run(&mut self, id: &str) -> Result<Option<Run>> {
        let Some(row) = self.run(id)? else {
            return Ok(None);
        };
        let e = self.sq("reading run hosts");
        let p = self.pg_err("reading run hosts");
        let hosts: String = match &mut self.conn {
            Conn::Sqlite(c) => c
                .query_row("SELECT hosts FROM runs WHERE id = ?1", params![id], |r| {
                    r.get(0)
                })
                .map_err(e)?,
            Conn::Pg(c) => c
                .query_one("SELECT hosts FROM runs WHERE id = $1", &[&id])
                .map_err(p)?
                .get(0),
        };
        let hosts: Vec<Host> = serde_json::from_str(&hosts).unwrap_or_default();
        Ok(Some(Run {
            schema: hilrig_reports::SCHEMA_VERSION,
            id: row.id.clone(),
            campaign: row.campaign,
            started_ms: row.started_ms,
            finished_ms: row.finished_ms.unwrap_or(row.started_ms),
            hosts,
            cases: self.cases(&row.id)?,
        }))
    }

    /// The latest finished run of `campaign` started before `started_ms`, other than `not_id`.
    pub fn previous_run(
        &mut self,
        campaign: &str,
        not_id: &str,
        started_ms: u64,
    ) -> Result<Option<Run>> {
        let e = self.sq("finding the previous run");
        let p = self.pg_err("finding the previous run");
        let id: Option<String> = match &mut self.conn {
            Conn::Sqlite(c) => c
                .query_row(
                    "SELECT id FROM runs WHERE campaign = ?1 AND id != ?2 AND finished_ms IS NOT NULL
                     AND started_ms <= ?3 ORDER BY started_ms DESC, rowid DESC LIMIT 1",
                    params![campaign, not_id, started_ms as i64],
                    |r| r.get(0),
                )
                .optional()
                .map_err(e)?,
            Conn::Pg(c) => c
                .query_opt(
                    "SELECT id FROM runs WHERE campaign = $1 AND id != $2 AND finished_ms IS NOT NULL
                     AND started_ms <= $3 ORDER BY started_ms DESC, seq DESC LIMIT 1",
                    &[&campaign, &not_id, &(started_ms as i64)],
                )
                .map_err(p)?
                .map(|r| r.get(0)),
        };
        match id {
            Some(id) => self.load_run(&id),
            None => Ok(None),
        }
    }
}

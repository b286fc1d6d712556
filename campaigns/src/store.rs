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
    /// Opening or migrating the database (hilrig-db): a bad spec, a connection
    /// refused, a migration that differs from this build's or is newer.
    #[error("results store: {0}")]
    Db(#[from] hilrig_db::DbError),
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

/// Whether `spec` names a PostgreSQL database (see [`hilrig_db::DbUrl`]).
pub fn is_pg(spec: &str) -> bool {
    matches!(
        hilrig_db::DbUrl::parse(spec),
        Ok(hilrig_db::DbUrl::Postgres(_))
    )
}

// The results store's schemas (hilrig-db migrations). Migration 1 of each is the
// schema as created before the migrations layer (`CREATE ... IF NOT EXISTS`), so
// databases written by earlier builds are adopted when their tables match. Never
// edit a published migration: add one.

const SQLITE_SCHEMA: &str = "
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
   PRIMARY KEY (run_id, case_id, kind, seq));";

const RUN_QUEUE_PG_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS run_queue (
   run_id TEXT NOT NULL REFERENCES runs(id), case_id TEXT NOT NULL, ord INTEGER NOT NULL,
   state TEXT NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'claimed', 'done')),
   claimant TEXT, generation BIGINT NOT NULL DEFAULT 0, lease_expires TIMESTAMPTZ,
   lost TEXT[] NOT NULL DEFAULT '{}',
   PRIMARY KEY (run_id, case_id));";

/// Runs, their cases and samples.
pub const SCHEMA: hilrig_db::Schema<'static> = hilrig_db::Schema {
    name: "campaigns",
    migrations: &[hilrig_db::Migration::per_engine(
        1,
        SQLITE_SCHEMA,
        PG_SCHEMA,
    )],
    adopt: hilrig_db::Adopt::Tables(&[
        (
            "runs",
            &[
                "id",
                "campaign",
                "file",
                "run_dir",
                "started_ms",
                "finished_ms",
                "hosts",
            ],
        ),
        ("cases", &["run_id", "case_id", "outcome", "result"]),
        ("samples", &["run_id", "case_id", "kind", "seq", "value"]),
    ]),
};

/// The claim queue of a run shared by several runners (PostgreSQL only: nothing
/// on SQLite, where a run has one runner).
pub const RUN_QUEUE_SCHEMA: hilrig_db::Schema<'static> = hilrig_db::Schema {
    name: "run_queue",
    migrations: &[hilrig_db::Migration::per_engine(1, "", RUN_QUEUE_PG_SCHEMA)],
    adopt: hilrig_db::Adopt::Tables(&[(
        "run_queue",
        &[
            "run_id",
            "case_id",
            "ord",
            "state",
            "claimant",
            "generation",
            "lease_expires",
            "lost",
        ],
    )]),
};

/// The lab service's tables (`hilrig serve`): its queue, API tokens, webhooks,
/// and an index on `cases` for case histories.
pub const LAB_SCHEMA: hilrig_db::Schema<'static> = hilrig_db::Schema {
    name: "lab",
    migrations: &[hilrig_db::Migration::per_engine(
        1,
        LAB_SQLITE_SCHEMA,
        LAB_PG_SCHEMA,
    )],
    adopt: hilrig_db::Adopt::Tables(&[
        (
            "lab_queue",
            &[
                "id",
                "campaign",
                "campaign_text",
                "submitted_by",
                "submitted_ms",
                "state",
                "run_id",
                "worker",
                "message",
            ],
        ),
        ("lab_tokens", &["name", "token_sha256", "created_ms"]),
        ("lab_webhooks", &["campaign", "url", "secret"]),
    ]),
};

/// Bring every schema of the results store up to date (campaigns, the claim
/// queue, the lab service's tables), each under hilrig-db's migration lock.
pub(crate) fn migrate_all(
    conn: hilrig_db::ConnMut<'_>,
    label: &str,
) -> std::result::Result<(), hilrig_db::DbError> {
    let mut conn = conn;
    for schema in [&SCHEMA, &RUN_QUEUE_SCHEMA, &LAB_SCHEMA] {
        hilrig_db::migrate(conn.reborrow(), label, schema)?;
    }
    Ok(())
}

/// The connection settings of the results store.
pub(crate) fn settings() -> hilrig_db::Settings {
    hilrig_db::Settings::new("hilrig-campaigns")
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
        let url = hilrig_db::DbUrl::parse(&s)?;
        let name = url.label();
        let mut conn = hilrig_db::open(&url, &settings())?;
        migrate_all(conn.as_mut(), &name)?;
        Ok(Store {
            conn: match conn {
                hilrig_db::Conn::Sqlite(c) => Conn::Sqlite(c),
                hilrig_db::Conn::Pg(c) => Conn::Pg(c),
            },
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

// ---------------------------------------------------------------------------
// The lab service's tables and queries (issue 19): additive only. Existing
// stores gain the tables and the index on open; nothing above changes.

const LAB_SQLITE_SCHEMA: &str = "
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

const LAB_PG_SCHEMA: &str = "
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

/// One night of a case: the run and the case's result in it.
#[derive(Debug, Clone)]
pub struct HistoryRow {
    /// The run.
    pub run: RunRow,
    /// The case's result in that run.
    pub case: CaseResult,
}

/// A run with its outcome counts (the runs index).
#[derive(Debug, Clone)]
pub struct RunIndexRow {
    /// The run.
    pub run: RunRow,
    /// Finished cases per outcome (`pass`, `fail`, ...).
    pub counts: std::collections::BTreeMap<String, u64>,
}

/// A queued campaign.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueRow {
    /// Queue id.
    pub id: i64,
    /// Campaign name.
    pub campaign: String,
    /// The campaign file's text.
    #[serde(skip)]
    pub campaign_text: String,
    /// Who submitted it (token name).
    pub submitted_by: String,
    /// When, unix ms.
    pub submitted_ms: u64,
    /// `queued`, `running`, `cancelled`, `cancel-requested`, `done`, `failed`.
    pub state: String,
    /// The run, once a worker started it.
    pub run_id: Option<String>,
    /// The worker that took it.
    pub worker: Option<String>,
    /// Why it failed, or the run's summary.
    pub message: String,
}

/// A webhook of a campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRow {
    /// Campaign name.
    pub campaign: String,
    /// Where to POST.
    pub url: String,
    /// HMAC-SHA256 key of the signature header.
    pub secret: String,
}

fn run_row_sq(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<RunRow> {
    Ok(row_of(
        r.get(at)?,
        r.get(at + 1)?,
        r.get(at + 2)?,
        r.get(at + 3)?,
        r.get(at + 4)?,
        r.get(at + 5)?,
    ))
}

fn run_row_pg(r: &postgres::Row, at: usize) -> RunRow {
    row_of(
        r.get(at),
        r.get(at + 1),
        r.get(at + 2),
        r.get(at + 3),
        r.get(at + 4),
        r.get(at + 5),
    )
}

fn queue_sq(r: &rusqlite::Row<'_>) -> rusqlite::Result<QueueRow> {
    Ok(QueueRow {
        id: r.get(0)?,
        campaign: r.get(1)?,
        campaign_text: r.get(2)?,
        submitted_by: r.get(3)?,
        submitted_ms: r.get::<_, i64>(4)?.max(0) as u64,
        state: r.get(5)?,
        run_id: r.get(6)?,
        worker: r.get(7)?,
        message: r.get(8)?,
    })
}

fn queue_pg(r: &postgres::Row) -> QueueRow {
    QueueRow {
        id: r.get(0),
        campaign: r.get(1),
        campaign_text: r.get(2),
        submitted_by: r.get(3),
        submitted_ms: r.get::<_, i64>(4).max(0) as u64,
        state: r.get(5),
        run_id: r.get(6),
        worker: r.get(7),
        message: r.get(8),
    }
}

const QUEUE_COLS: &str =
    "id, campaign, campaign_text, submitted_by, submitted_ms, state, run_id, worker, message";

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    /// The last `nights` results of `case_id`, newest first, each with its run.
    pub fn case_history(&mut self, case_id: &str, nights: usize) -> Result<Vec<HistoryRow>> {
        self.case_history_json(case_id, nights)?
            .into_iter()
            .map(|(run, json)| {
                let case = serde_json::from_str(&json).map_err(|err| {
                    self.data(format!(
                        "case {case_id} of run {} is corrupt: {err}",
                        run.id
                    ))
                })?;
                Ok(HistoryRow { run, case })
            })
            .collect()
    }

    /// [`Store::case_history`] with each result as its stored JSON, for readers
    /// that need only some fields. The newest `nights` runs are chosen from the
    /// `(case_id, run_id)` index before any result text is read.
    pub fn case_history_json(
        &mut self,
        case_id: &str,
        nights: usize,
    ) -> Result<Vec<(RunRow, String)>> {
        let limit = nights.min(i64::MAX as usize) as i64;
        let e = self.sq("reading case history");
        let p = self.pg_err("reading case history");
        match &mut self.conn {
            Conn::Sqlite(c) => {
                let run = || -> rusqlite::Result<Vec<(RunRow, String)>> {
                    let mut st = c.prepare_cached(
                        "SELECT r.id, r.campaign, r.file, r.run_dir, r.started_ms, r.finished_ms, c.result
                         FROM (SELECT r2.id AS rid, r2.started_ms AS s, r2.rowid AS o
                               FROM cases c2 INDEXED BY cases_by_case_run JOIN runs r2 ON r2.id = c2.run_id
                               WHERE c2.case_id = ?1 ORDER BY r2.started_ms DESC, r2.rowid DESC LIMIT ?2) top
                         JOIN runs r ON r.id = top.rid
                         JOIN cases c ON c.run_id = top.rid AND c.case_id = ?1
                         ORDER BY top.s DESC, top.o DESC",
                    )?;
                    let rows = st.query_map(params![case_id, limit], |r| {
                        Ok((run_row_sq(r, 0)?, r.get(6)?))
                    })?;
                    rows.collect()
                };
                run().map_err(e)
            }
            Conn::Pg(c) => Ok(c
                .query(
                    "SELECT r.id, r.campaign, r.file, r.run_dir, r.started_ms, r.finished_ms, c.result
                     FROM (SELECT r2.id AS rid, r2.started_ms AS s, r2.seq AS o
                           FROM cases c2 JOIN runs r2 ON r2.id = c2.run_id
                           WHERE c2.case_id = $1 ORDER BY r2.started_ms DESC, r2.seq DESC LIMIT $2) top
                     JOIN runs r ON r.id = top.rid
                     JOIN cases c ON c.run_id = top.rid AND c.case_id = $1
                     ORDER BY top.s DESC, top.o DESC",
                    &[&case_id, &limit],
                )
                .map_err(p)?
                .iter()
                .map(|r| (run_row_pg(r, 0), r.get(6)))
                .collect()),
        }
    }

    /// Runs newest first (`limit` of them from `offset`, optionally of one
    /// campaign) with their outcome counts.
    pub fn run_index(
        &mut self,
        campaign: Option<&str>,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<RunIndexRow>> {
        let (limit, offset) = (limit.min(1 << 30) as i64, offset.min(1 << 30) as i64);
        let e = self.sq("reading the runs index");
        let p = self.pg_err("reading the runs index");
        let mut out: Vec<RunIndexRow> = vec![];
        let mut counts: Vec<(String, String, i64)> = vec![];
        match &mut self.conn {
            Conn::Sqlite(c) => {
                let mut run = || -> rusqlite::Result<()> {
                    let mut st = c.prepare_cached(
                        "SELECT id, campaign, file, run_dir, started_ms, finished_ms FROM runs
                         WHERE ?1 IS NULL OR campaign = ?1 ORDER BY started_ms DESC, rowid DESC
                         LIMIT ?2 OFFSET ?3",
                    )?;
                    for r in st.query_map(params![campaign, limit, offset], |r| run_row_sq(r, 0))? {
                        out.push(RunIndexRow {
                            run: r?,
                            counts: Default::default(),
                        });
                    }
                    let mut st = c.prepare_cached(
                        "SELECT run_id, outcome, COUNT(*) FROM cases WHERE run_id = ?1 GROUP BY run_id, outcome",
                    )?;
                    for row in &out {
                        for r in st.query_map(params![row.run.id], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                        })? {
                            counts.push(r?);
                        }
                    }
                    Ok(())
                };
                run().map_err(e)?;
            }
            Conn::Pg(c) => {
                out = c
                    .query(
                        "SELECT id, campaign, file, run_dir, started_ms, finished_ms FROM runs
                         WHERE $1::text IS NULL OR campaign = $1 ORDER BY started_ms DESC, seq DESC
                         LIMIT $2 OFFSET $3",
                        &[&campaign, &limit, &offset],
                    )
                    .map_err(|x| StoreError::Postgres {
                        db: self.name.clone(),
                        what: "reading the runs index".into(),
                        source: x,
                    })?
                    .iter()
                    .map(|r| RunIndexRow {
                        run: run_row_pg(r, 0),
                        counts: Default::default(),
                    })
                    .collect();
                let ids: Vec<String> = out.iter().map(|r| r.run.id.clone()).collect();
                counts = c
                    .query(
                        "SELECT run_id, outcome, COUNT(*) FROM cases WHERE run_id = ANY($1)
                         GROUP BY run_id, outcome",
                        &[&ids],
                    )
                    .map_err(p)?
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
                    .collect();
            }
        }
        for (run_id, outcome, n) in counts {
            if let Some(row) = out.iter_mut().find(|r| r.run.id == run_id) {
                row.counts.insert(outcome, n.max(0) as u64);
            }
        }
        Ok(out)
    }

    /// Store many finished cases of one run in one transaction (bulk loads:
    /// imports, generated bench stores); the rows are those of [`Store::put_case`].
    pub fn put_cases_bulk(&mut self, run_id: &str, cases: &[CaseResult]) -> Result<()> {
        let mut rows = vec![];
        for c in cases {
            let json =
                serde_json::to_string(c).map_err(|e| self.data(format!("case {}: {e}", c.id)))?;
            rows.push((c, json, samples(c)));
        }
        let e = self.sq("storing cases");
        let p = self.pg_err("storing cases");
        match &mut self.conn {
            Conn::Sqlite(conn) => {
                let mut run = || -> rusqlite::Result<()> {
                    let tx = conn.transaction()?;
                    {
                        let mut ins = tx.prepare_cached(
                            "INSERT OR REPLACE INTO cases (run_id, case_id, outcome, result) VALUES (?1, ?2, ?3, ?4)",
                        )?;
                        let mut del = tx.prepare_cached(
                            "DELETE FROM samples WHERE run_id = ?1 AND case_id = ?2",
                        )?;
                        let mut smp = tx.prepare_cached(
                            "INSERT INTO samples (run_id, case_id, kind, seq, value) VALUES (?1, ?2, ?3, ?4, ?5)",
                        )?;
                        for (c, json, kinds) in &rows {
                            ins.execute(params![run_id, c.id, c.outcome.as_str(), json])?;
                            del.execute(params![run_id, c.id])?;
                            for (kind, vals) in kinds {
                                for (i, v) in vals.iter().enumerate() {
                                    smp.execute(params![run_id, c.id, kind, i as i64, v])?;
                                }
                            }
                        }
                    }
                    tx.commit()
                };
                run().map_err(e)
            }
            Conn::Pg(client) => {
                let mut run = || -> std::result::Result<(), postgres::Error> {
                    let mut tx = client.transaction()?;
                    let ins = tx.prepare(
                        "INSERT INTO cases (run_id, case_id, outcome, result) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (run_id, case_id) DO UPDATE SET outcome = EXCLUDED.outcome, result = EXCLUDED.result",
                    )?;
                    let del =
                        tx.prepare("DELETE FROM samples WHERE run_id = $1 AND case_id = $2")?;
                    for (c, json, kinds) in &rows {
                        tx.execute(&ins, &[&run_id, &c.id, &c.outcome.as_str(), json])?;
                        tx.execute(&del, &[&run_id, &c.id])?;
                        // All of a case's samples in one statement (arrays, unnested).
                        let (mut k, mut q, mut v): (Vec<&str>, Vec<i32>, Vec<f64>) =
                            (vec![], vec![], vec![]);
                        for (kind, vals) in kinds {
                            for (i, x) in vals.iter().enumerate() {
                                k.push(kind);
                                q.push(i as i32);
                                v.push(*x);
                            }
                        }
                        if !k.is_empty() {
                            tx.execute(
                                "INSERT INTO samples (run_id, case_id, kind, seq, value)
                                 SELECT $1, $2, k, s, v FROM UNNEST($3::text[], $4::int[], $5::float8[]) AS t(k, s, v)",
                                &[&run_id, &c.id, &k, &q, &v],
                            )?;
                        }
                    }
                    tx.commit()
                };
                run().map_err(p)
            }
        }
    }

    /// The FAIL and TIMEOUT case ids of each of `run_ids`: `(run_id, case_id)`.
    pub fn failing_cases(&mut self, run_ids: &[String]) -> Result<Vec<(String, String)>> {
        let e = self.sq("reading failing cases");
        let p = self.pg_err("reading failing cases");
        match &mut self.conn {
            Conn::Sqlite(c) => {
                let run = || -> rusqlite::Result<Vec<(String, String)>> {
                    let mut st = c.prepare_cached(
                        "SELECT run_id, case_id FROM cases WHERE run_id = ?1
                         AND outcome IN ('fail', 'timeout')",
                    )?;
                    let mut out = vec![];
                    for id in run_ids {
                        for r in st.query_map(params![id], |r| Ok((r.get(0)?, r.get(1)?)))? {
                            out.push(r?);
                        }
                    }
                    Ok(out)
                };
                run().map_err(e)
            }
            Conn::Pg(c) => Ok(c
                .query(
                    "SELECT run_id, case_id FROM cases WHERE run_id = ANY($1)
                     AND outcome IN ('fail', 'timeout')",
                    &[&run_ids],
                )
                .map_err(p)?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect()),
        }
    }

    /// Queue a campaign (its file's text); returns the queue id.
    pub fn enqueue(&mut self, campaign: &str, text: &str, by: &str) -> Result<i64> {
        let now = now_unix_ms();
        let e = self.sq("queueing a campaign");
        let p = self.pg_err("queueing a campaign");
        match &mut self.conn {
            Conn::Sqlite(c) => c
                .execute(
                    "INSERT INTO lab_queue (campaign, campaign_text, submitted_by, submitted_ms, state)
                     VALUES (?1, ?2, ?3, ?4, 'queued')",
                    params![campaign, text, by, now],
                )
                .map(|_| c.last_insert_rowid())
                .map_err(e),
            Conn::Pg(c) => c
                .query_one(
                    "INSERT INTO lab_queue (campaign, campaign_text, submitted_by, submitted_ms, state)
                     VALUES ($1, $2, $3, $4, 'queued') RETURNING id",
                    &[&campaign, &text, &by, &now],
                )
                .map(|r| r.get(0))
                .map_err(p),
        }
    }

    /// The queue, newest first (at most `limit`).
    pub fn queue(&mut self, limit: usize) -> Result<Vec<QueueRow>> {
        let limit = limit.min(1 << 30) as i64;
        let e = self.sq("reading the queue");
        let p = self.pg_err("reading the queue");
        match &mut self.conn {
            Conn::Sqlite(c) => {
                let run = || -> rusqlite::Result<Vec<QueueRow>> {
                    let mut st = c.prepare_cached(&format!(
                        "SELECT {QUEUE_COLS} FROM lab_queue ORDER BY id DESC LIMIT ?1"
                    ))?;
                    let rows = st.query_map(params![limit], queue_sq)?;
                    rows.collect()
                };
                run().map_err(e)
            }
            Conn::Pg(c) => Ok(c
                .query(
                    &format!("SELECT {QUEUE_COLS} FROM lab_queue ORDER BY id DESC LIMIT $1"),
                    &[&limit],
                )
                .map_err(p)?
                .iter()
                .map(queue_pg)
                .collect()),
        }
    }

    /// One queue entry.
    pub fn queue_entry(&mut self, id: i64) -> Result<Option<QueueRow>> {
        let e = self.sq("reading a queue entry");
        let p = self.pg_err("reading a queue entry");
        match &mut self.conn {
            Conn::Sqlite(c) => c
                .query_row(
                    &format!("SELECT {QUEUE_COLS} FROM lab_queue WHERE id = ?1"),
                    params![id],
                    queue_sq,
                )
                .optional()
                .map_err(e),
            Conn::Pg(c) => Ok(c
                .query_opt(
                    &format!("SELECT {QUEUE_COLS} FROM lab_queue WHERE id = $1"),
                    &[&id],
                )
                .map_err(p)?
                .as_ref()
                .map(queue_pg)),
        }
    }

    /// Cancel: a queued entry becomes `cancelled` (no worker will take it); a
    /// running one `cancel-requested` (its worker stops it). Returns the new
    /// state, or None when the entry does not exist or has ended.
    pub fn queue_cancel(&mut self, id: i64) -> Result<Option<String>> {
        const Q: &str = "UPDATE lab_queue SET state = CASE state WHEN 'queued' THEN 'cancelled'
             ELSE 'cancel-requested' END
             WHERE id = ? AND state IN ('queued', 'running') RETURNING state";
        let e = self.sq("cancelling a queue entry");
        let p = self.pg_err("cancelling a queue entry");
        match &mut self.conn {
            Conn::Sqlite(c) => c
                .query_row(&Q.replace('?', "?1"), params![id], |r| r.get(0))
                .optional()
                .map_err(e),
            Conn::Pg(c) => Ok(c
                .query_opt(&Q.replace('?', "$1"), &[&id])
                .map_err(p)?
                .map(|r| r.get(0))),
        }
    }

    /// Take the oldest queued campaign for `worker` (atomically: two workers
    /// never take the same entry), marking it `running`.
    pub fn queue_take(&mut self, worker: &str) -> Result<Option<QueueRow>> {
        let e = self.sq("taking from the queue");
        let p = self.pg_err("taking from the queue");
        match &mut self.conn {
            Conn::Sqlite(c) => c
                .query_row(
                    &format!(
                        "UPDATE lab_queue SET state = 'running', worker = ?1
                         WHERE id = (SELECT id FROM lab_queue WHERE state = 'queued' ORDER BY id LIMIT 1)
                         RETURNING {QUEUE_COLS}"
                    ),
                    params![worker],
                    queue_sq,
                )
                .optional()
                .map_err(e),
            Conn::Pg(c) => Ok(c
                .query_opt(
                    &format!(
                        "UPDATE lab_queue SET state = 'running', worker = $1
                         WHERE id = (SELECT id FROM lab_queue WHERE state = 'queued' ORDER BY id
                                     LIMIT 1 FOR UPDATE SKIP LOCKED)
                         RETURNING {QUEUE_COLS}"
                    ),
                    &[&worker],
                )
                .map_err(p)?
                .as_ref()
                .map(queue_pg)),
        }
    }

    /// Record a queue entry's run, state and message.
    pub fn queue_update(
        &mut self,
        id: i64,
        state: &str,
        run_id: Option<&str>,
        message: &str,
    ) -> Result<()> {
        let e = self.sq("updating a queue entry");
        let p = self.pg_err("updating a queue entry");
        match &mut self.conn {
            Conn::Sqlite(c) => c
                .execute(
                    "UPDATE lab_queue SET state = ?2, run_id = COALESCE(?3, run_id), message = ?4 WHERE id = ?1",
                    params![id, state, run_id, message],
                )
                .map(|_| ())
                .map_err(e),
            Conn::Pg(c) => c
                .execute(
                    "UPDATE lab_queue SET state = $2, run_id = COALESCE($3, run_id), message = $4 WHERE id = $1",
                    &[&id, &state, &run_id, &message],
                )
                .map(|_| ())
                .map_err(p),
        }
    }

    /// Store (or replace) the API token of user `name` by its SHA-256 (hex).
    pub fn token_put(&mut self, name: &str, token_sha256: &str) -> Result<()> {
        let now = now_unix_ms();
        let e = self.sq("storing a token");
        let p = self.pg_err("storing a token");
        match &mut self.conn {
            Conn::Sqlite(c) => c
                .execute(
                    "INSERT OR REPLACE INTO lab_tokens (name, token_sha256, created_ms) VALUES (?1, ?2, ?3)",
                    params![name, token_sha256, now],
                )
                .map(|_| ())
                .map_err(e),
            Conn::Pg(c) => c
                .execute(
                    "INSERT INTO lab_tokens (name, token_sha256, created_ms) VALUES ($1, $2, $3)
                     ON CONFLICT (name) DO UPDATE SET token_sha256 = EXCLUDED.token_sha256,
                     created_ms = EXCLUDED.created_ms",
                    &[&name, &token_sha256, &now],
                )
                .map(|_| ())
                .map_err(p),
        }
    }

    /// The user whose token has this SHA-256 (hex), if any.
    pub fn token_user(&mut self, token_sha256: &str) -> Result<Option<String>> {
        let e = self.sq("checking a token");
        let p = self.pg_err("checking a token");
        match &mut self.conn {
            Conn::Sqlite(c) => c
                .query_row(
                    "SELECT name FROM lab_tokens WHERE token_sha256 = ?1",
                    params![token_sha256],
                    |r| r.get(0),
                )
                .optional()
                .map_err(e),
            Conn::Pg(c) => Ok(c
                .query_opt(
                    "SELECT name FROM lab_tokens WHERE token_sha256 = $1",
                    &[&token_sha256],
                )
                .map_err(p)?
                .map(|r| r.get(0))),
        }
    }

    /// Add (or replace the secret of) a webhook of `campaign`.
    pub fn webhook_put(&mut self, w: &WebhookRow) -> Result<()> {
        let e = self.sq("storing a webhook");
        let p = self.pg_err("storing a webhook");
        match &mut self.conn {
            Conn::Sqlite(c) => c
                .execute(
                    "INSERT OR REPLACE INTO lab_webhooks (campaign, url, secret) VALUES (?1, ?2, ?3)",
                    params![w.campaign, w.url, w.secret],
                )
                .map(|_| ())
                .map_err(e),
            Conn::Pg(c) => c
                .execute(
                    "INSERT INTO lab_webhooks (campaign, url, secret) VALUES ($1, $2, $3)
                     ON CONFLICT (campaign, url) DO UPDATE SET secret = EXCLUDED.secret",
                    &[&w.campaign, &w.url, &w.secret],
                )
                .map(|_| ())
                .map_err(p),
        }
    }

    /// The webhooks of `campaign`.
    pub fn webhooks(&mut self, campaign: &str) -> Result<Vec<WebhookRow>> {
        let e = self.sq("reading webhooks");
        let p = self.pg_err("reading webhooks");
        match &mut self.conn {
            Conn::Sqlite(c) => {
                let run = || -> rusqlite::Result<Vec<WebhookRow>> {
                    let mut st = c.prepare_cached(
                        "SELECT campaign, url, secret FROM lab_webhooks WHERE campaign = ?1 ORDER BY url",
                    )?;
                    let rows = st.query_map(params![campaign], |r| {
                        Ok(WebhookRow {
                            campaign: r.get(0)?,
                            url: r.get(1)?,
                            secret: r.get(2)?,
                        })
                    })?;
                    rows.collect()
                };
                run().map_err(e)
            }
            Conn::Pg(c) => Ok(c
                .query(
                    "SELECT campaign, url, secret FROM lab_webhooks WHERE campaign = $1 ORDER BY url",
                    &[&campaign],
                )
                .map_err(p)?
                .iter()
                .map(|r| WebhookRow {
                    campaign: r.get(0),
                    url: r.get(1),
                    secret: r.get(2),
                })
                .collect()),
        }
    }
}

//! The results store (SQLite): runs and their finished cases. Every finished case is
//! committed as soon as it ends, so a killed runner resumes without losing it.

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

/// The store.
pub struct Store {
    conn: Connection,
}

fn e(what: &str, err: rusqlite::Error) -> anyhow::Error {
    anyhow::anyhow!("results store: {what}: {err}")
}

impl Store {
    /// Open (creating) the store at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        if let Some(d) = path.parent() {
            if !d.as_os_str().is_empty() {
                std::fs::create_dir_all(d)
                    .map_err(|err| anyhow::anyhow!("creating {}: {err}", d.display()))?;
            }
        }
        let conn = Connection::open(path)
            .map_err(|err| anyhow::anyhow!("results store {}: {err}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|err| e("busy timeout", err))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE IF NOT EXISTS runs (
                id TEXT PRIMARY KEY, campaign TEXT NOT NULL, file TEXT NOT NULL,
                run_dir TEXT NOT NULL, started_ms INTEGER NOT NULL, finished_ms INTEGER,
                hosts TEXT NOT NULL DEFAULT '[]');
             CREATE TABLE IF NOT EXISTS cases (
                run_id TEXT NOT NULL REFERENCES runs(id), case_id TEXT NOT NULL,
                outcome TEXT NOT NULL, result TEXT NOT NULL,
                PRIMARY KEY (run_id, case_id));",
        )
        .map_err(|err| anyhow::anyhow!("results store {}: schema: {err}", path.display()))?;
        Ok(Store { conn })
    }

    /// Record a new run.
    pub fn create_run(&self, row: &RunRow, hosts: &[Host]) -> anyhow::Result<()> {
        let hosts = serde_json::to_string(hosts)?;
        self.conn
            .execute(
                "INSERT INTO runs (id, campaign, file, run_dir, started_ms, hosts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![row.id, row.campaign, row.file, row.run_dir, row.started_ms as i64, hosts],
            )
            .map_err(|err| e("creating run", err))?;
        Ok(())
    }

    /// The run `id`.
    pub fn run(&self, id: &str) -> anyhow::Result<Option<RunRow>> {
        self.conn
            .query_row(
                "SELECT id, campaign, file, run_dir, started_ms, finished_ms FROM runs WHERE id = ?1",
                params![id],
                |r| {
                    Ok(RunRow {
                        id: r.get(0)?,
                        campaign: r.get(1)?,
                        file: r.get(2)?,
                        run_dir: r.get(3)?,
                        started_ms: r.get::<_, i64>(4)? as u64,
                        finished_ms: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
                    })
                },
            )
            .optional()
            .map_err(|err| e("reading run", err))
    }

    /// Runs, newest first, optionally of one campaign only.
    pub fn runs(&self, campaign: Option<&str>) -> anyhow::Result<Vec<RunRow>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, campaign, file, run_dir, started_ms, finished_ms FROM runs
                 WHERE ?1 IS NULL OR campaign = ?1 ORDER BY started_ms DESC, rowid DESC",
            )
            .map_err(|err| e("listing runs", err))?;
        let rows = st
            .query_map(params![campaign], |r| {
                Ok(RunRow {
                    id: r.get(0)?,
                    campaign: r.get(1)?,
                    file: r.get(2)?,
                    run_dir: r.get(3)?,
                    started_ms: r.get::<_, i64>(4)? as u64,
                    finished_ms: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
                })
            })
            .map_err(|err| e("listing runs", err))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|err| e("listing runs", err))
    }

    /// Store (or replace) a finished case.
    pub fn put_case(&self, run_id: &str, c: &CaseResult) -> anyhow::Result<()> {
        let json = serde_json::to_string(c)?;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO cases (run_id, case_id, outcome, result) VALUES (?1, ?2, ?3, ?4)",
                params![run_id, c.id, c.outcome.as_str(), json],
            )
            .map_err(|err| e("storing case", err))?;
        Ok(())
    }

    /// The finished cases of `run_id`.
    pub fn cases(&self, run_id: &str) -> anyhow::Result<Vec<CaseResult>> {
        let mut st = self
            .conn
            .prepare("SELECT case_id, result FROM cases WHERE run_id = ?1 ORDER BY rowid")
            .map_err(|err| e("reading cases", err))?;
        let rows = st
            .query_map(params![run_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(|err| e("reading cases", err))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, json) = row.map_err(|err| e("reading cases", err))?;
            let c: CaseResult = serde_json::from_str(&json).map_err(|err| {
                anyhow::anyhow!("results store: case {id} of run {run_id} is corrupt: {err}")
            })?;
            out.push(c);
        }
        Ok(out)
    }

    /// Mark `run_id` finished.
    pub fn finish_run(&self, run_id: &str, finished_ms: u64) -> anyhow::Result<()> {
        self.conn
            .execute(
                "UPDATE runs SET finished_ms = ?2 WHERE id = ?1",
                params![run_id, finished_ms as i64],
            )
            .map_err(|err| e("finishing run", err))?;
        Ok(())
    }

    /// The whole run `id` as a results model.
    pub fn load_run(&self, id: &str) -> anyhow::Result<Option<Run>> {
        let Some(row) = self.run(id)? else {
            return Ok(None);
        };
        let hosts: String = self
            .conn
            .query_row("SELECT hosts FROM runs WHERE id = ?1", params![id], |r| {
                r.get(0)
            })
            .map_err(|err| e("reading run hosts", err))?;
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
        &self,
        campaign: &str,
        not_id: &str,
        started_ms: u64,
    ) -> anyhow::Result<Option<Run>> {
        let id: Option<String> = self
            .conn
            .query_row(
                "SELECT id FROM runs WHERE campaign = ?1 AND id != ?2 AND finished_ms IS NOT NULL
                 AND started_ms <= ?3 ORDER BY started_ms DESC, rowid DESC LIMIT 1",
                params![campaign, not_id, started_ms as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(|err| e("finding the previous run", err))?;
        match id {
            Some(id) => self.load_run(&id),
            None => Ok(None),
        }
    }
}

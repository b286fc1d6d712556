//! Device states of hosts (LAVA's Good/Bad): a host whose health check failed is
//! `offline` with the reason and the time, and gets no work from any runner
//! using the same database until an operator brings it back
//! (`hilrig rig host DB online NAME`). Table `rig_host_states(host PRIMARY KEY,
//! state, reason, since_ms)` in a SQLite file (the runner's results database).

use crate::error::RigError;

/// A host's recorded state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostState {
    /// The host.
    pub host: String,
    /// `online` or `offline`.
    pub state: String,
    /// Why (the failed health check, or the operator's words).
    pub reason: String,
    /// Since when, Unix ms.
    pub since_unix_ms: i64,
}

impl HostState {
    /// True when the host may be given work.
    pub fn online(&self) -> bool {
        self.state != "offline"
    }
}

/// The host-state table in a SQLite file.
pub struct HostStates {
    db: rusqlite::Connection,
    path: String,
}

/// The `rig_host_states` schema. Migration 1 is the table as created before the
/// migrations layer. Never edit a published migration: add one.
pub const SCHEMA: hilrig_db::Schema<'static> = hilrig_db::Schema {
    name: "rig_host_states",
    migrations: &[hilrig_db::Migration::same(
        1,
        "CREATE TABLE IF NOT EXISTS rig_host_states (
                host TEXT PRIMARY KEY,
                state TEXT NOT NULL,
                reason TEXT NOT NULL,
                since_ms INTEGER NOT NULL)",
    )],
    adopt: hilrig_db::Adopt::Tables(&[(
        "rig_host_states",
        &["host", "state", "reason", "since_ms"],
    )]),
};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl HostStates {
    /// Open (creating the file and table if missing): a SQLite file path or
    /// `sqlite:PATH` (see [`hilrig_db::DbUrl`]); the `rig_host_states` schema is
    /// migrated. A PostgreSQL URL is refused (host states live in the runner's
    /// SQLite results database).
    pub fn open(path: &str) -> Result<HostStates, RigError> {
        let err = |d: String| RigError::Lease {
            store: path.to_string(),
            detail: format!("host states: {d}"),
        };
        let file = match hilrig_db::DbUrl::parse(path).map_err(|e| err(e.to_string()))? {
            hilrig_db::DbUrl::Sqlite(p) => p,
            hilrig_db::DbUrl::Postgres(_) => {
                return Err(err(
                    "host states are kept in a SQLite file, not PostgreSQL".into()
                ))
            }
        };
        let mut db = hilrig_db::open_sqlite(&file, &hilrig_db::Settings::new("hilrig-rig"))
            .map_err(|e| err(e.to_string()))?;
        hilrig_db::migrate(hilrig_db::ConnMut::Sqlite(&mut db), path, &SCHEMA)
            .map_err(|e| err(e.to_string()))?;
        Ok(HostStates {
            db,
            path: path.to_string(),
        })
    }

    fn err(&self, e: rusqlite::Error) -> RigError {
        RigError::Lease {
            store: self.path.clone(),
            detail: format!("host states: {e}"),
        }
    }

    fn set(&self, host: &str, state: &str, reason: &str) -> Result<(), RigError> {
        crate::inventory::validate_host_name(host).map_err(|m| RigError::Lease {
            store: self.path.clone(),
            detail: m.0,
        })?;
        self.db
            .execute(
                "INSERT INTO rig_host_states (host, state, reason, since_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(host) DO UPDATE SET state = ?2, reason = ?3, since_ms = ?4",
                rusqlite::params![host, state, reason, now_ms()],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Take `host` offline with `reason`.
    pub fn set_offline(&self, host: &str, reason: &str) -> Result<(), RigError> {
        tracing::warn!("host {host} offline: {reason}");
        self.set(host, "offline", reason)
    }

    /// Bring `host` back (`reason`: who and why).
    pub fn set_online(&self, host: &str, reason: &str) -> Result<(), RigError> {
        self.set(host, "online", reason)
    }

    /// The recorded state of `host` (`None`: never recorded, i.e. online).
    pub fn get(&self, host: &str) -> Result<Option<HostState>, RigError> {
        let mut st = self
            .db
            .prepare("SELECT host, state, reason, since_ms FROM rig_host_states WHERE host = ?1")
            .map_err(|e| self.err(e))?;
        let mut rows = st
            .query_map([host], row)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows.pop())
    }

    /// Every recorded host state.
    pub fn list(&self) -> Result<Vec<HostState>, RigError> {
        let mut st = self
            .db
            .prepare("SELECT host, state, reason, since_ms FROM rig_host_states ORDER BY host")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], row)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows)
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<HostState> {
    Ok(HostState {
        host: r.get(0)?,
        state: r.get(1)?,
        reason: r.get(2)?,
        since_unix_ms: r.get(3)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_until_online() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("r.sqlite");
        let s = HostStates::open(&p.to_string_lossy()).unwrap();
        assert_eq!(s.get("h1").unwrap(), None);
        s.set_offline("h1", "ssh: connection refused").unwrap();
        // Another connection (another runner) sees it.
        let s2 = HostStates::open(&p.to_string_lossy()).unwrap();
        let st = s2.get("h1").unwrap().unwrap();
        assert!(!st.online());
        assert_eq!(st.reason, "ssh: connection refused");
        s2.set_online("h1", "operator: fixed cable").unwrap();
        assert!(s.get("h1").unwrap().unwrap().online());
        assert_eq!(s.list().unwrap().len(), 1);
        assert!(s.set_offline("../x", "bad name").is_err());
    }
}

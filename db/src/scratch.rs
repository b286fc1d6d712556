//! A scratch PostgreSQL database on a server: created fresh under a unique name,
//! dropped (with its connections) when the value is dropped. For tests and
//! benches that need a database of their own next to others on one server.

use crate::{connect_pg, pg_detail, DbError, Result, Settings};

/// A database created on a PostgreSQL server for one test or bench, dropped on
/// drop (`DROP DATABASE … WITH (FORCE)`: connections still open are closed).
pub struct ScratchPg {
    admin: postgres::Client,
    name: String,
    url: String,
}

impl ScratchPg {
    /// Creates database `PREFIX_PID_N` (lower case; any earlier one of that name
    /// dropped first) on the server `server_url` names, connecting with
    /// `application_name` from `settings`.
    pub fn create(server_url: &str, prefix: &str, settings: &Settings) -> Result<ScratchPg> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let safe: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let name = format!(
            "{safe}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = connect_pg(server_url, settings)?;
        let err = |what: &str, source| DbError::Postgres {
            db: crate::redact(server_url),
            what: format!("{what} database {name}"),
            source,
        };
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .map_err(|e| err("dropping", e))?;
        // Not in one batch with the drop: CREATE DATABASE cannot run in a transaction block.
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .map_err(|e| err("creating", e))?;
        let url = database_url(server_url, &name);
        Ok(ScratchPg { admin, name, url })
    }

    /// The scratch database's URL (the server URL with its database replaced).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ScratchPg {
    fn drop(&mut self) {
        if let Err(e) = self.admin.batch_execute(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        )) {
            eprintln!("dropping scratch database {}: {}", self.name, pg_detail(&e));
        }
    }
}

/// `url` with its database name replaced by `name` (a query string kept).
pub fn database_url(url: &str, name: &str) -> String {
    let (main, query) = match url.split_once('?') {
        Some((m, q)) => (m, format!("?{q}")),
        None => (url, String::new()),
    };
    let after = main.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match main[after..].find('/') {
        Some(i) => &main[..after + i],
        None => main,
    };
    format!("{base}/{name}{query}")
}

/// The PostgreSQL server tests and benches use: `HILRIG_TEST_PG` (a server URL),
/// `Ok(None)` when it is unset or empty (the caller says SKIPPED). Under CI
/// (`CI=true`, exported by `.ci/run`) an unset variable is
/// [`DbError::NoTestServer`]: `scripts/test` starts a server, so a test that
/// skipped its PostgreSQL half there would pass without checking anything.
pub fn test_server() -> Result<Option<String>> {
    test_server_of(
        std::env::var("HILRIG_TEST_PG").ok(),
        std::env::var("CI").ok(),
    )
}

fn test_server_of(pg: Option<String>, ci: Option<String>) -> Result<Option<String>> {
    match pg {
        Some(u) if !u.is_empty() => Ok(Some(u)),
        _ if ci.as_deref() == Some("true") => Err(DbError::NoTestServer),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_is_replaced_and_the_query_kept() {
        use super::database_url as u;
        assert_eq!(u("postgresql://h:5/db", "x"), "postgresql://h:5/x");
        assert_eq!(u("postgresql://h:5", "x"), "postgresql://h:5/x");
        assert_eq!(
            u("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }

    #[test]
    fn a_missing_test_server_is_a_skip_here_and_an_error_under_ci() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(test_server_of(s("pg://x"), None).unwrap(), s("pg://x"));
        assert_eq!(test_server_of(s("pg://x"), s("true")).unwrap(), s("pg://x"));
        assert_eq!(test_server_of(None, None).unwrap(), None);
        assert_eq!(test_server_of(s(""), s("false")).unwrap(), None);
        for pg in [None, s("")] {
            let e = test_server_of(pg, s("true")).unwrap_err();
            assert!(matches!(e, DbError::NoTestServer), "{e}");
            assert!(e.to_string().contains("HILRIG_TEST_PG"), "{e}");
        }
    }
}

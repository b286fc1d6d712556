//! Database specs: what `--db`, `--store`, `--anchor` and friends accept.

use crate::{DbError, Result};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A parsed database spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbUrl {
    /// A SQLite file (`sqlite:PATH` or a plain path).
    Sqlite(PathBuf),
    /// A PostgreSQL server: a `postgresql://` / `postgres://` URL, or a libpq
    /// `key=value` string naming a `dbname=`.
    Postgres(String),
}

/// Whether `spec` is libpq's `key=value ...` form with a database name.
fn is_pg_keyvalue(spec: &str) -> bool {
    spec.split_whitespace().any(|w| w.starts_with("dbname="))
        && spec.split_whitespace().all(|w| w.contains('='))
}

impl DbUrl {
    /// Parse a spec: `postgresql://...` / `postgres://...` (checked by the
    /// PostgreSQL client's own parser), a `host=... dbname=...` string,
    /// `sqlite:PATH`, or a plain path. Anything else — an empty spec, another
    /// scheme (`mysql://`), `sqlite:` without a path, a URL the client cannot
    /// parse — is [`DbError::BadSpec`].
    pub fn parse(spec: &str) -> Result<DbUrl> {
        let bad = |why: &str| DbError::BadSpec {
            spec: redact(spec),
            why: why.to_string(),
        };
        if spec.trim().is_empty() {
            return Err(bad("empty"));
        }
        if spec.contains('\0') {
            return Err(bad("contains a NUL byte"));
        }
        if spec.starts_with("postgresql://") || spec.starts_with("postgres://") {
            postgres::Config::from_str(spec)
                .map_err(|e| bad(&format!("not a PostgreSQL URL the client accepts: {e}")))?;
            return Ok(DbUrl::Postgres(spec.to_string()));
        }
        if is_pg_keyvalue(spec) {
            postgres::Config::from_str(spec).map_err(|e| {
                bad(&format!(
                    "not a PostgreSQL connection string the client accepts: {e}"
                ))
            })?;
            return Ok(DbUrl::Postgres(spec.to_string()));
        }
        if let Some(rest) = spec.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(bad("`sqlite:` needs a file path after it"));
            }
            return Ok(DbUrl::Sqlite(PathBuf::from(path)));
        }
        if let Some(i) = spec.find("://") {
            let scheme = &spec[..i];
            if !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            {
                return Err(bad(&format!("unknown scheme `{scheme}`")));
            }
        }
        Ok(DbUrl::Sqlite(PathBuf::from(spec)))
    }

    /// A SQLite file path as a spec.
    pub fn sqlite(path: &Path) -> DbUrl {
        DbUrl::Sqlite(path.to_path_buf())
    }

    /// "sqlite" or "postgresql".
    pub fn kind(&self) -> &'static str {
        match self {
            DbUrl::Sqlite(_) => "sqlite",
            DbUrl::Postgres(_) => "postgresql",
        }
    }

    /// Is this PostgreSQL?
    pub fn is_pg(&self) -> bool {
        matches!(self, DbUrl::Postgres(_))
    }

    /// The name for messages: the path, or the URL with its password hidden.
    pub fn label(&self) -> String {
        match self {
            DbUrl::Sqlite(p) => p.display().to_string(),
            DbUrl::Postgres(u) => redact(u),
        }
    }
}

impl FromStr for DbUrl {
    type Err = DbError;
    fn from_str(s: &str) -> Result<DbUrl> {
        DbUrl::parse(s)
    }
}

impl std::fmt::Display for DbUrl {
    /// The spec with any password hidden.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbUrl::Sqlite(p) => write!(f, "{}", p.display()),
            DbUrl::Postgres(u) => f.write_str(&redact(u)),
        }
    }
}

/// A URL (or `key=value` string) with any password replaced, for messages.
pub fn redact(url: &str) -> String {
    if let (Some(a), Some(b)) = (url.find("://"), url.rfind('@')) {
        if b > a {
            let creds = &url[a + 3..b];
            return match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..a + 3], &creds[..c], &url[b..]),
                None => url.to_string(),
            };
        }
        return url.to_string();
    }
    if url.contains("password=") {
        return url
            .split_whitespace()
            .map(|w| {
                if w.starts_with("password=") {
                    "password=***"
                } else {
                    w
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(
            DbUrl::parse("/tmp/x.db").ok(),
            Some(DbUrl::Sqlite("/tmp/x.db".into()))
        );
        assert_eq!(
            DbUrl::parse("sqlite:rel/x.db").ok(),
            Some(DbUrl::Sqlite("rel/x.db".into()))
        );
        assert_eq!(
            DbUrl::parse("sqlite:///abs/x.db").ok(),
            Some(DbUrl::Sqlite("/abs/x.db".into()))
        );
        assert!(matches!(
            DbUrl::parse("postgresql://u:p@h:5432/d"),
            Ok(DbUrl::Postgres(_))
        ));
        assert!(matches!(
            DbUrl::parse("postgres://h/d"),
            Ok(DbUrl::Postgres(_))
        ));
        assert!(matches!(
            DbUrl::parse("host=/tmp dbname=x user=postgres"),
            Ok(DbUrl::Postgres(_))
        ));
    }

    #[test]
    fn bad_specs_name_the_problem() {
        for (spec, want) in [
            ("", "empty"),
            ("   ", "empty"),
            ("sqlite:", "needs a file path"),
            ("mysql://h/d", "unknown scheme `mysql`"),
            ("postgresql://u:secret@h:notaport/d", "not a PostgreSQL URL"),
            ("a\0b", "NUL"),
        ] {
            let e = DbUrl::parse(spec).err().map(|e| e.to_string());
            let e = e.unwrap_or_else(|| panic!("{spec:?} accepted"));
            assert!(e.contains(want), "{spec:?}: {e}");
            assert!(e.starts_with("bad database spec"), "{e}");
            assert!(!e.contains("secret"), "password shown: {e}");
        }
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact("postgres://u:secret@db/x"), "postgres://u:***@db/x");
        assert_eq!(redact("/tmp/l.db"), "/tmp/l.db");
        assert_eq!(
            redact("host=h password=s dbname=d"),
            "host=h password=*** dbname=d"
        );
        let u = DbUrl::parse("postgresql://u:secret@h/d").map(|u| u.to_string());
        assert_eq!(u.ok().as_deref(), Some("postgresql://u:***@h/d"));
    }
}

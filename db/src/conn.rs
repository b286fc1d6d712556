//! Opening a database with the project's settings.

use crate::{DbError, DbUrl, Result};
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Connection settings. [`Settings::new`] gives the project's defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    /// PostgreSQL `application_name` (unless the URL sets one): who is connected,
    /// as `pg_stat_activity` shows it.
    pub application_name: String,
    /// PostgreSQL connect timeout (unless the URL sets one).
    pub connect_timeout: Duration,
    /// SQLite: how long a statement waits for another writer's lock.
    pub busy_timeout: Duration,
    /// SQLite: enforce `REFERENCES` constraints.
    pub foreign_keys: bool,
}

impl Settings {
    /// The project's settings for `application_name` (e.g. `hilrig-counters`):
    /// 10 s connect timeout, 10 s busy timeout, foreign keys on.
    pub fn new(application_name: &str) -> Settings {
        Settings {
            application_name: application_name.to_string(),
            connect_timeout: Duration::from_secs(10),
            busy_timeout: Duration::from_secs(10),
            foreign_keys: true,
        }
    }
}

/// An open connection of either engine.
pub enum Conn {
    /// SQLite.
    Sqlite(rusqlite::Connection),
    /// PostgreSQL.
    Pg(Box<postgres::Client>),
}

impl Conn {
    /// Borrow it for [`crate::migrate`].
    pub fn as_mut(&mut self) -> ConnMut<'_> {
        match self {
            Conn::Sqlite(c) => ConnMut::Sqlite(c),
            Conn::Pg(c) => ConnMut::Pg(c),
        }
    }
}

/// A borrowed connection of either engine (what [`crate::migrate`] runs on; a
/// crate with its own connection wrapper lends its raw connection this way).
pub enum ConnMut<'a> {
    /// SQLite.
    Sqlite(&'a mut rusqlite::Connection),
    /// PostgreSQL.
    Pg(&'a mut postgres::Client),
}

impl ConnMut<'_> {
    /// Borrow again (to run several schemas' migrations on one connection).
    pub fn reborrow(&mut self) -> ConnMut<'_> {
        match self {
            ConnMut::Sqlite(c) => ConnMut::Sqlite(c),
            ConnMut::Pg(c) => ConnMut::Pg(c),
        }
    }
}

/// Open the database `url` names with `settings`.
pub fn open(url: &DbUrl, settings: &Settings) -> Result<Conn> {
    match url {
        DbUrl::Sqlite(p) => Ok(Conn::Sqlite(open_sqlite(p, settings)?)),
        DbUrl::Postgres(u) => Ok(Conn::Pg(Box::new(connect_pg(u, settings)?))),
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Open (creating it and its directory) the SQLite file at `path`: busy timeout,
/// WAL journal, foreign keys as `settings` say. Switching to WAL takes a write
/// lock the busy handler does not always wait for: retried for up to twice the
/// busy timeout.
pub fn open_sqlite(path: &Path, settings: &Settings) -> Result<rusqlite::Connection> {
    let db = path.display().to_string();
    if let Some(d) = path.parent() {
        if !d.as_os_str().is_empty() && !d.exists() {
            std::fs::create_dir_all(d).map_err(|source| DbError::Io {
                db: db.clone(),
                dir: d.display().to_string(),
                source,
            })?;
        }
    }
    let deadline = Instant::now() + settings.busy_timeout * 2;
    loop {
        let r = rusqlite::Connection::open(path)
            .map_err(|e| ("opening", e))
            .and_then(|c| setup_sqlite(&c, settings).map(|()| c));
        match r {
            Ok(c) => return Ok(c),
            Err((_, e)) if is_busy(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err((what, source)) => {
                return Err(DbError::Sqlite {
                    db,
                    what: what.to_string(),
                    source,
                })
            }
        }
    }
}

/// An in-memory SQLite database with `settings` (tests).
pub fn open_sqlite_memory(settings: &Settings) -> Result<rusqlite::Connection> {
    let sq = |what: &'static str| {
        move |source| DbError::Sqlite {
            db: ":memory:".into(),
            what: what.into(),
            source,
        }
    };
    let c = rusqlite::Connection::open_in_memory().map_err(sq("opening"))?;
    setup_sqlite(&c, settings).map_err(|(w, e)| sq(w)(e))?;
    Ok(c)
}

fn setup_sqlite(
    c: &rusqlite::Connection,
    s: &Settings,
) -> std::result::Result<(), (&'static str, rusqlite::Error)> {
    c.busy_timeout(s.busy_timeout)
        .map_err(|e| ("setting the busy timeout", e))?;
    c.pragma_update(None, "journal_mode", "WAL")
        .map_err(|e| ("switching to WAL", e))?;
    c.pragma_update(
        None,
        "foreign_keys",
        if s.foreign_keys { "ON" } else { "OFF" },
    )
    .map_err(|e| ("setting foreign_keys", e))?;
    Ok(())
}

/// Connect to PostgreSQL at `url` (a `postgresql://` URL or a libpq `key=value`
/// string), with the settings' connect timeout and `application_name` unless the
/// URL gives its own.
pub fn connect_pg(url: &str, settings: &Settings) -> Result<postgres::Client> {
    let label = crate::redact(url);
    let mut cfg = postgres::Config::from_str(url).map_err(|e| DbError::BadSpec {
        spec: label.clone(),
        why: format!("not a PostgreSQL URL the client accepts: {e}"),
    })?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(settings.connect_timeout);
    }
    if cfg.get_application_name().is_none() && !settings.application_name.is_empty() {
        cfg.application_name(&settings.application_name);
    }
    cfg.connect(postgres::NoTls)
        .map_err(|source| DbError::Postgres {
            db: label,
            what: "connecting".into(),
            source,
        })
}

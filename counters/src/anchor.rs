//! The external anchor of the history chain's head: what detects a database that
//! was replayed (restored from an older copy) or rolled back.
//!
//! It lives outside the service's database, where that database's attacker cannot
//! write: a small file (`SEQ MAC`, written atomically with fsync), or a second
//! database given by URL — a SQLite file (`sqlite:PATH`) or a PostgreSQL database
//! (`postgresql://...`). A database anchor holds one row per service database,
//! named by the key's fingerprint, and only ever moves forward (a writer that
//! committed an older head never moves it back).

use crate::store::{self, Db, Val};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The anchor database's schema. Migration 1 is the table as created before
/// hilrig-db. Never edit a published migration: add one.
pub const SCHEMA: hilrig_db::Schema<'static> = hilrig_db::Schema {
    name: "counters_anchor",
    migrations: &[hilrig_db::Migration::same(
        1,
        "CREATE TABLE IF NOT EXISTS anchor (name TEXT PRIMARY KEY, seq BIGINT NOT NULL, mac TEXT NOT NULL, at BIGINT NOT NULL)",
    )],
    adopt: hilrig_db::Adopt::Tables(&[("anchor", &["name", "seq", "mac", "at"])]),
};

/// Where the chain head is anchored.
pub enum Anchor {
    /// A file holding "SEQ MAC".
    File(PathBuf),
    /// A table `anchor (name, seq, mac, at)` in a second database.
    Db {
        /// The database.
        db: Box<dyn Db>,
        /// The spec it was opened from (a URL's password redacted), for messages.
        spec: String,
        /// The row of this service database (the key's fingerprint by default).
        name: String,
    },
}

/// Whether `spec` names an anchor database (`postgresql://`, `postgres://`,
/// `sqlite:`) rather than an anchor file.
pub fn is_db_spec(spec: &str) -> bool {
    spec.starts_with("postgresql://")
        || spec.starts_with("postgres://")
        || spec.starts_with("sqlite:")
}

impl Anchor {
    /// Open the anchor named by `spec`: `postgresql://...` or `sqlite:PATH` for a
    /// database, anything else a file path. `name` keys the database row.
    pub fn open(spec: &str, name: &str) -> Result<Anchor> {
        if !is_db_spec(spec) {
            return Ok(Anchor::File(PathBuf::from(spec)));
        }
        let shown = store::redact(spec);
        let fail = |e: Error| Error::Anchor {
            path: PathBuf::from(&shown),
            detail: e.to_string(),
        };
        if spec
            .strip_prefix("sqlite:")
            .map(|p| p.strip_prefix("//").unwrap_or(p))
            == Some("")
        {
            return Err(Error::Input(format!(
                "anchor {spec:?}: give a file after sqlite: (sqlite:/var/lib/hilrig/anchor.db)"
            )));
        }
        let url =
            hilrig_db::DbUrl::parse(spec).map_err(|e| Error::Input(format!("anchor: {e}")))?;
        let mut db: Box<dyn Db> = match &url {
            hilrig_db::DbUrl::Sqlite(path) => Box::new(store::SqliteDb::open(path).map_err(fail)?),
            hilrig_db::DbUrl::Postgres(u) => Box::new(store::PgDb::connect(u, None).map_err(fail)?),
        };
        hilrig_db::migrate(db.conn(), &shown, &SCHEMA)
            .map_err(|e| fail(Error::db("migrating the anchor table", e)))?;
        Ok(Anchor::Db {
            db,
            spec: shown,
            name: name.to_string(),
        })
    }

    /// What the anchor is, for messages.
    pub fn describe(&self) -> String {
        match self {
            Anchor::File(p) => p.display().to_string(),
            Anchor::Db { spec, name, .. } => format!("{spec} (row {name})"),
        }
    }

    fn err(&self, detail: String) -> Error {
        Error::Anchor {
            path: PathBuf::from(self.describe()),
            detail,
        }
    }

    /// The anchored head (seq, MAC); None when nothing was anchored yet.
    pub fn read(&mut self) -> Result<Option<(i64, String)>> {
        match self {
            Anchor::File(path) => read_file(path),
            Anchor::Db { db, name, .. } => {
                let rows = db
                    .query(
                        "SELECT seq, mac FROM anchor WHERE name = $1",
                        &[Val::Text(name.clone())],
                    )
                    .map_err(|e| e.to_string());
                let rows = match rows {
                    Ok(r) => r,
                    Err(d) => return Err(self.err(format!("reading: {d}"))),
                };
                match rows.first() {
                    None => Ok(None),
                    Some(r) => {
                        let got = (|| -> Result<(i64, String)> {
                            Ok((r[0].i64("seq")?, r[1].text("mac")?))
                        })();
                        got.map(Some)
                            .map_err(|e| self.err(format!("reading its row: {e}")))
                    }
                }
            }
        }
    }

    /// Record the head (after the database committed it). An anchor never moves
    /// back: a head older than (or as old as) the one stored leaves it as it is —
    /// at the same sequence the stored MAC is kept even when `mac` differs (file
    /// and database alike; a database whose row at that sequence is the other one
    /// is then refused by the anchor check at its next commit or open). A
    /// file anchor is compared and advanced under an exclusive lock on its lock file
    /// (`.NAME.lock` beside it), so two writers cannot interleave read and rename.
    pub fn write(&mut self, seq: i64, mac: &str) -> Result<()> {
        match self {
            Anchor::File(path) => write_file_forward(path, seq, mac),
            Anchor::Db { db, name, .. } => {
                let r = db.exec(
                    "INSERT INTO anchor (name, seq, mac, at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, mac = excluded.mac, at = excluded.at \
                     WHERE anchor.seq < excluded.seq",
                    &[
                        Val::Text(name.clone()),
                        Val::I64(seq),
                        Val::Text(mac.to_string()),
                        Val::I64(store::now_ms()),
                    ],
                );
                r.map(|_| ()).map_err(|e| self.err(format!("writing: {e}")))
            }
        }
    }
}

/// The lock file of an anchor file: `.NAME.lock` beside it (the anchor itself is
/// replaced by a rename on every write, so a lock on it would not be shared).
pub fn file_lock_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "anchor".into());
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    dir.join(format!(".{name}.lock"))
}

/// Compare-and-advance of a file anchor: under an exclusive `flock` on its lock
/// file, read the stored head and write `seq mac` only when `seq` is newer. A writer
/// holding an older head (it committed before another process that anchored after
/// it) leaves the newer head in place.
fn write_file_forward(path: &Path, seq: i64, mac: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let lp = file_lock_path(path);
    let fail = |what: &str, e: std::io::Error| Error::Anchor {
        path: path.to_path_buf(),
        detail: format!("{what} {}: {e}", lp.display()),
    };
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&lp)
        .map_err(|e| fail("opening its lock file", e))?;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(fail("locking", e));
        }
    }
    if let Some((stored, _)) = read_file(path)? {
        if stored >= seq {
            return Ok(()); // never back, never rewritten at the same sequence
        }
    }
    let r = hilrig_device::state::write_atomic(path, format!("{seq} {mac}\n").as_bytes()).map_err(
        |e| Error::Anchor {
            path: path.to_path_buf(),
            detail: format!("writing: {e}"),
        },
    );
    drop(lock); // closing the descriptor releases the lock
    r
}

/// The history chain's head as an anchor file holds it: "SEQ MAC".
fn read_file(path: &Path) -> Result<Option<(i64, String)>> {
    let bytes = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Anchor {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })
        }
    };
    if bytes.starts_with(b"SQLite format 3\0") {
        return Err(Error::Anchor {
            path: path.to_path_buf(),
            detail: format!(
                "is a SQLite database, not an anchor file: give it as sqlite:{}",
                path.display()
            ),
        });
    }
    let bad = || Error::Anchor {
        path: path.to_path_buf(),
        detail: format!(
            "{:?} is not \"SEQ MAC\"",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ),
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| bad())?;
    let mut it = text.split_whitespace();
    let seq = it
        .next()
        .and_then(|x| x.parse::<i64>().ok())
        .ok_or_else(bad)?;
    let mac = it.next().ok_or_else(bad)?.to_string();
    Ok(Some((seq, mac)))
}

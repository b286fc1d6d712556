//! The external anchor of the history chain's head: what detects a database that
//! was replayed (restored from an older copy) or rolled back.
//!
//! It lives outside the service's database, where that database's attacker cannot
//! write: a small file (`SEQ MAC` on its first line, written atomically with
//! fsync), or a second database given by URL — a SQLite file (`sqlite:PATH`) or a
//! PostgreSQL database (`postgresql://...`). A database anchor holds one row per
//! service database, named by the key's fingerprint, and only ever moves forward
//! (a writer that committed an older head never moves it back).
//!
//! Besides the head it keeps each device's newest history row (serial → seq and
//! MAC): a file anchor one `SERIAL SEQ MAC` line per device after the head, a
//! database anchor one `anchor_devices` row per (service database, serial). Each
//! entry also only moves forward, on its own (a writer whose head is older than
//! the stored one still records a device row newer than that device's entry).
//! Verify checks a device against its entry (see `Service::verify`), so a
//! device's history rolled back below the head is caught at the cost of one
//! lookup per device, whatever the size of the history. An anchor file from
//! before (the head alone) reads as one with no device entries and gains them on
//! its next write.

use crate::store::{self, Db, Val};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The anchor database's schema. Migration 1 is the table as created before
/// hilrig-db. Never edit a published migration: add one.
pub const SCHEMA: hilrig_db::Schema<'static> = hilrig_db::Schema {
    name: "counters_anchor",
    migrations: &[
        hilrig_db::Migration::same(
            1,
            "CREATE TABLE IF NOT EXISTS anchor (name TEXT PRIMARY KEY, seq BIGINT NOT NULL, mac TEXT NOT NULL, at BIGINT NOT NULL)",
        ),
        hilrig_db::Migration::same(
            2,
            "CREATE TABLE anchor_devices (name TEXT NOT NULL, serial TEXT NOT NULL, seq BIGINT NOT NULL, mac TEXT NOT NULL, PRIMARY KEY (name, serial))",
        ),
    ],
    adopt: hilrig_db::Adopt::Tables(&[("anchor", &["name", "seq", "mac", "at"])]),
};

/// A device's newest history row as the anchor keeps it: (serial, seq, MAC).
pub type DeviceHead = (String, i64, String);

/// What an anchor file holds: the head, and each device's newest history row.
type FileAnchor = (
    Option<(i64, String)>,
    std::collections::BTreeMap<String, (i64, String)>,
);

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
            Anchor::File(path) => Ok(read_file_as(path, Lines::Head)?.0),
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
        self.write_with(seq, mac, &[])
    }

    /// Each of `serials`' newest history row as anchored: (seq, MAC) by serial;
    /// a serial with no entry (never written since the anchor kept devices) is
    /// left out.
    pub fn devices(
        &mut self,
        serials: &[String],
    ) -> Result<std::collections::HashMap<String, (i64, String)>> {
        let mut out = std::collections::HashMap::with_capacity(serials.len());
        if serials.is_empty() {
            return Ok(out);
        }
        match self {
            Anchor::File(path) => {
                let want: std::collections::HashSet<&str> =
                    serials.iter().map(|s| s.as_str()).collect();
                out.extend(read_file_as(path, Lines::Only(&want))?.1);
                Ok(out)
            }
            Anchor::Db { db, name, .. } => {
                let got = (|| -> Result<()> {
                    for chunk in serials.chunks(500) {
                        let (sql, mut params) = if db.kind() == "postgresql" {
                            (
                                "SELECT serial, seq, mac FROM anchor_devices WHERE name = $1 AND serial = ANY($2)".to_string(),
                                vec![Val::TextArray(chunk.to_vec())],
                            )
                        } else {
                            let list: Vec<String> =
                                (2..chunk.len() + 2).map(|i| format!("${i}")).collect();
                            (
                                format!(
                                    "SELECT serial, seq, mac FROM anchor_devices WHERE name = $1 AND serial IN ({})",
                                    list.join(",")
                                ),
                                chunk.iter().map(|k| Val::Text(k.clone())).collect(),
                            )
                        };
                        params.insert(0, Val::Text(name.clone()));
                        for r in db.query(&sql, &params)? {
                            if r.len() != 3 {
                                return Err(Error::db(
                                    "reading a device entry",
                                    "3 columns expected",
                                ));
                            }
                            out.insert(r[0].text("serial")?, (r[1].i64("seq")?, r[2].text("mac")?));
                        }
                    }
                    Ok(())
                })();
                match got {
                    Ok(()) => Ok(out),
                    Err(e) => Err(self.err(format!("reading device entries: {e}"))),
                }
            }
        }
    }

    /// [`Anchor::write`] of the head, and of `devices`' newest history rows
    /// (each device's entry moves forward only, on its own, whatever the head
    /// does: at the same sequence the stored MAC is kept).
    pub fn write_with(&mut self, seq: i64, mac: &str, devices: &[DeviceHead]) -> Result<()> {
        match self {
            Anchor::File(path) => write_file_forward(path, seq, mac, devices),
            Anchor::Db { db, name, .. } => {
                let r = write_db(&mut **db, name, seq, mac, devices);
                r.map_err(|e| self.err(format!("writing: {e}")))
            }
        }
    }
}

/// Record the head and device entries in an anchor database, each moving
/// forward only (SQLite: one transaction; PostgreSQL: the device entries in one
/// statement of array parameters, then the head).
fn write_db(
    db: &mut dyn Db,
    name: &str,
    seq: i64,
    mac: &str,
    devices: &[DeviceHead],
) -> Result<()> {
    let head = |db: &mut dyn Db| {
        db.exec(
            "INSERT INTO anchor (name, seq, mac, at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, mac = excluded.mac, at = excluded.at \
             WHERE anchor.seq < excluded.seq",
            &[
                Val::Text(name.to_string()),
                Val::I64(seq),
                Val::Text(mac.to_string()),
                Val::I64(store::now_ms()),
            ],
        )
        .map(|_| ())
    };
    if devices.is_empty() {
        return head(db);
    }
    // The newest row of each device only (a batch may verify one twice), in
    // serial order: two writers lock the rows they share in the same order, so
    // they cannot deadlock (PostgreSQL locks them row by row as it inserts).
    let mut newest: std::collections::BTreeMap<&str, (i64, &str)> =
        std::collections::BTreeMap::new();
    for (s, q, m) in devices {
        let e = newest.entry(s.as_str()).or_insert((*q, m.as_str()));
        if *q > e.0 {
            *e = (*q, m.as_str());
        }
    }
    const UPSERT: &str =
        "ON CONFLICT (name, serial) DO UPDATE SET seq = excluded.seq, mac = excluded.mac \
                          WHERE anchor_devices.seq < excluded.seq";
    if db.kind() == "postgresql" {
        let (mut ss, mut qs, mut ms) = (Vec::new(), Vec::new(), Vec::new());
        for (s, (q, m)) in newest {
            ss.push(s.to_string());
            qs.push(q);
            ms.push(m.to_string());
        }
        db.exec(
            &format!(
                "INSERT INTO anchor_devices (name, serial, seq, mac) \
                 SELECT $1, * FROM unnest($2::text[], $3::bigint[], $4::text[]) {UPSERT}"
            ),
            &[
                Val::Text(name.to_string()),
                Val::TextArray(ss),
                Val::I64Array(qs),
                Val::TextArray(ms),
            ],
        )?;
        return head(db);
    }
    db.begin()?;
    let sql = format!(
        "INSERT INTO anchor_devices (name, serial, seq, mac) VALUES ($1, $2, $3, $4) {UPSERT}"
    );
    for (s, (q, m)) in newest {
        if let Err(e) = db.exec(
            &sql,
            &[
                Val::Text(name.to_string()),
                Val::Text(s.to_string()),
                Val::I64(q),
                Val::Text(m.to_string()),
            ],
        ) {
            db.rollback();
            return Err(e);
        }
    }
    if let Err(e) = head(db) {
        db.rollback();
        return Err(e);
    }
    // A COMMIT that fails (busy, disk full) leaves the transaction open.
    db.commit().inspect_err(|_| db.rollback())
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
/// file, read the stored head and device entries, move forward those that
/// `seq mac` and `devices` are newer than, and write the file again (only if
/// anything moved). A writer holding an older head (it committed before another
/// process that anchored after it) leaves the newer head in place.
fn write_file_forward(path: &Path, seq: i64, mac: &str, devices: &[DeviceHead]) -> Result<()> {
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
    let (head, mut entries) = read_file(path)?;
    let mut moved = false;
    // Never back, never rewritten at the same sequence: the head and each device.
    let head = match head {
        Some((stored, smac)) if stored >= seq => (stored, smac),
        _ => {
            moved = true;
            (seq, mac.to_string())
        }
    };
    for (s, q, m) in devices {
        match entries.get(s) {
            Some((stored, _)) if stored >= q => {}
            _ => {
                entries.insert(s.clone(), (*q, m.clone()));
                moved = true;
            }
        }
    }
    if !moved {
        return Ok(());
    }
    let mut text = format!("{} {}\n", head.0, head.1);
    for (s, (q, m)) in &entries {
        text.push_str(&format!("{s} {q} {m}\n"));
    }
    let r = hilrig_device::state::write_atomic(path, text.as_bytes()).map_err(|e| Error::Anchor {
        path: path.to_path_buf(),
        detail: format!("writing: {e}"),
    });
    drop(lock); // closing the descriptor releases the lock
    r
}

/// Which device lines [`read_file_as`] parses.
enum Lines<'a> {
    /// None: the head only.
    Head,
    /// Those of these serials.
    Only(&'a std::collections::HashSet<&'a str>),
    /// All of them.
    All,
}

/// The history chain's head as an anchor file holds it: "SEQ MAC" on the first
/// line, then "SERIAL SEQ MAC" per device (none in a file from before).
fn read_file(path: &Path) -> Result<FileAnchor> {
    read_file_as(path, Lines::All)
}

/// The largest anchor file read: 64 MiB, some 600,000 device lines of
/// `SERIAL SEQ MAC`. A larger one is refused before it is read.
pub const MAX_ANCHOR_FILE: u64 = 64 << 20;

/// The anchor file's text, read bounded: a regular file only (opened
/// non-blocking and checked on the descriptor: a FIFO is refused, never waited
/// on; `/dev/zero` is refused, never read), at most [`MAX_ANCHOR_FILE`] bytes;
/// None when there is none. Text that is not UTF-8 is refused naming the line
/// (or as a SQLite database given as a file).
fn read_text(path: &Path) -> Result<Option<String>> {
    use hilrig_device::secure::{read_bounded, SecureFileError};
    let fail = |detail: String| Error::Anchor {
        path: path.to_path_buf(),
        detail,
    };
    match read_bounded(path, MAX_ANCHOR_FILE) {
        Ok(t) => Ok(Some(t)),
        Err(SecureFileError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(SecureFileError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::InvalidData =>
        {
            Err(fail(not_text(path)))
        }
        Err(e) => Err(fail(format!("{e}; refused without reading it"))),
    }
}

/// Why the anchor file (a regular file just read whole, not UTF-8) is not
/// text: a SQLite database, or the line of the first byte that is not UTF-8
/// (read again, bounded, for the message only).
fn not_text(path: &Path) -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = Vec::new();
    let read = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .and_then(|f| f.take(MAX_ANCHOR_FILE).read_to_end(&mut bytes));
    if read.is_err() {
        return "not UTF-8 text".into();
    }
    if bytes.starts_with(b"SQLite format 3\0") {
        return format!(
            "is a SQLite database, not an anchor file: give it as sqlite:{}",
            path.display()
        );
    }
    let at = std::str::from_utf8(&bytes)
        .err()
        .map_or(0, |e| e.valid_up_to());
    let line = 1 + bytes[..at].iter().filter(|b| **b == b'\n').count();
    format!("line {line}: not UTF-8 text (at byte {at})")
}

/// [`read_file`], parsing only the device lines `lines` names (the head is always
/// parsed; a device line that is parsed and malformed is an error, naming its
/// line). A negative sequence is refused. A serial on two lines keeps the
/// higher sequence; two lines of one serial at the same sequence with different
/// MACs are refused.
fn read_file_as(path: &Path, lines: Lines<'_>) -> Result<FileAnchor> {
    let Some(text) = read_text(path)? else {
        return Ok((None, Default::default()));
    };
    if text.starts_with("SQLite format 3\0") {
        return Err(Error::Anchor {
            path: path.to_path_buf(),
            detail: not_text(path),
        });
    }
    let bad = |n: usize, line: &str, want: &str| Error::Anchor {
        path: path.to_path_buf(),
        detail: format!(
            "line {n}: {:?} is not \"{want}\" (SEQ a whole number, 0 or more)",
            line.chars().take(200).collect::<String>()
        ),
    };
    let seq_of = |q: &str| q.parse::<i64>().ok().filter(|q| *q >= 0);
    let head = text.lines().next().unwrap_or("");
    let (seq, mac) = match head.split_whitespace().collect::<Vec<_>>().as_slice() {
        [q, m] => match seq_of(q) {
            Some(q) => (q, m.to_string()),
            None => return Err(bad(1, head, "SEQ MAC")),
        },
        _ => return Err(bad(1, head, "SEQ MAC")),
    };
    let mut devices: std::collections::BTreeMap<String, (i64, String)> = Default::default();
    for (n, line) in text.lines().enumerate().skip(1) {
        match &lines {
            Lines::Head => break,
            Lines::Only(want) => {
                let first = line.split_whitespace().next().unwrap_or("");
                if !want.contains(first) {
                    continue;
                }
            }
            Lines::All => {}
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let (s, q, m) = match f.as_slice() {
            [] => continue,
            [s, q, m] => match seq_of(q) {
                Some(q) => (*s, q, *m),
                None => return Err(bad(n + 1, line, "SERIAL SEQ MAC")),
            },
            _ => return Err(bad(n + 1, line, "SERIAL SEQ MAC")),
        };
        match devices.get(s) {
            Some((stored, smac)) if *stored == q && smac != m => {
                return Err(Error::Anchor {
                    path: path.to_path_buf(),
                    detail: format!(
                        "line {}: device {s} is on an earlier line at the same sequence {q} with another MAC",
                        n + 1
                    ),
                })
            }
            Some((stored, _)) if *stored >= q => {}
            _ => {
                devices.insert(s.to_string(), (q, m.to_string()));
            }
        }
    }
    Ok((Some((seq, mac)), devices))
}

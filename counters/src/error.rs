//! The library's error type.

use std::path::PathBuf;

/// Everything the counters service can fail with. Every variant names what failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database failed (SQLite or PostgreSQL).
    #[error("database {what}: {detail}")]
    Db {
        /// Which operation.
        what: String,
        /// The driver's message.
        detail: String,
    },
    /// The database holds a schema newer than this build understands.
    #[error(
        "database schema version {found} is newer than this build's {supported}; upgrade hilrig"
    )]
    SchemaTooNew {
        /// Version found.
        found: i64,
        /// Newest this build knows.
        supported: i64,
    },
    /// The key file could not be read or created.
    #[error("key file {path}: {detail}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Bad input from the caller (a wrong-length hash, an unknown region ...).
    #[error("{0}")]
    Input(String),
    /// No reset key stored for the device.
    #[error("device {0}: the counters service holds no OOB reset key for it (enrol it with --reset-key-file)")]
    NoResetKey(String),

    /// A stored reset key that fails to open (tampered, moved, wrong key).
    #[error("device {serial}: stored OOB reset key: {detail}")]
    ResetKey {
        /// The device.
        serial: String,
        /// What is wrong (never the key).
        detail: String,
    },

    /// The device is not enrolled.
    #[error("device {0} is not enrolled")]
    UnknownDevice(String),
    /// The device is already enrolled.
    #[error("device {0} is already enrolled (use --replace to re-baseline it on purpose)")]
    DuplicateDevice(String),
    /// The catalog already holds this image.
    #[error("catalog already holds {region} image {sha256}")]
    DuplicateImage {
        /// Region.
        region: String,
        /// Hash, hex.
        sha256: String,
    },
    /// No such catalog entry.
    #[error("catalog holds no {region} image {sha256}")]
    UnknownImage {
        /// Region.
        region: String,
        /// Hash, hex.
        sha256: String,
    },
    /// No such update intent.
    #[error("no open update intent {id} for device {serial}")]
    UnknownIntent {
        /// Device.
        serial: String,
        /// Intent id.
        id: i64,
    },
    /// Too many update attempts.
    #[error("device {serial}: update rate limit reached ({count} attempts in the last {window_s} s, limit {limit}); try later")]
    RateLimited {
        /// Device.
        serial: String,
        /// Attempts in the window.
        count: i64,
        /// Limit.
        limit: i64,
        /// Window in seconds.
        window_s: i64,
    },
    /// A stored row failed its MAC check.
    #[error("{table} row {row}: MAC mismatch (edited outside the service)")]
    Tampered {
        /// Table.
        table: &'static str,
        /// Row key.
        row: String,
    },
    /// The key file is not the one this database was initialised with.
    #[error("the key does not match this database (key fingerprint {stored} stored at init, this key's is {given}): wrong --key / $HILRIG_COUNTERS_KEY? Refusing to read or write anything")]
    WrongKey {
        /// Fingerprint stored in the database.
        stored: String,
        /// Fingerprint of the key given.
        given: String,
    },
    /// The observation is older than the stored state (another process changed the
    /// device record after the device was read); nothing was written.
    #[error("device {0}: the stored state changed after the device was read; read it again")]
    Stale(String),
    /// The database is older than its external anchor (restored from a copy).
    #[error("database replayed: head {head}, anchor {anchor} ({detail}); refusing to use it")]
    Replayed {
        /// The database's history chain head.
        head: i64,
        /// The anchor's.
        anchor: i64,
        /// What differs.
        detail: String,
    },
    /// The anchor (a file or a second database) could not be read or written.
    #[error("anchor {path}: {detail}")]
    Anchor {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Reading the device failed.
    #[error("reading device {source_name}: {detail}")]
    Source {
        /// The source (port, state file).
        source_name: String,
        /// What went wrong.
        detail: String,
    },
    /// Paging a human failed (the command, the webhook).
    #[error("paging through {to}: {detail}")]
    Page {
        /// The page command or webhook.
        to: String,
        /// What went wrong.
        detail: String,
    },
    /// An update could not be committed as asked.
    #[error("update of device {serial}: {detail}")]
    Update {
        /// Device.
        serial: String,
        /// Why.
        detail: String,
    },
}

impl Error {
    /// A database error: what was being done, and what the database said.
    pub fn db(what: &str, e: impl std::fmt::Display) -> Error {
        Error::Db {
            what: what.to_string(),
            detail: e.to_string(),
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

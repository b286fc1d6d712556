//! The library's error type.

use std::path::PathBuf;

/// Everything that can go wrong loading runs and writing reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// "reading" / "writing" / "creating directory".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A run file is not valid JSON for the results model.
    #[error("{path}: not a valid run result (line {line}, column {column}): {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A run file was written by a newer hilrig with a schema this one cannot read.
    #[error(
        "{path}: run result schema {found} is newer than the supported {supported}; upgrade hilrig"
    )]
    Schema {
        /// The file.
        path: PathBuf,
        /// The schema number in the file.
        found: u32,
        /// The newest schema this build reads.
        supported: u32,
    },
    /// A run is internally inconsistent (e.g. two cases with one id).
    #[error("{path}: invalid run result: {reason}")]
    Invalid {
        /// The file (or `<memory>`).
        path: PathBuf,
        /// What is wrong.
        reason: InvalidRun,
    },
    /// Serialising a report failed (should not happen for valid runs).
    #[error("encoding {what}: {reason}")]
    Encode {
        /// Which report.
        what: &'static str,
        /// The cause.
        reason: String,
    },
}

/// Why a run breaks the results model's invariants ([`crate::Run::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRun {
    /// Written with a newer schema than this build reads.
    #[error("schema {found} is newer than the supported {supported}")]
    Schema {
        /// The run's schema.
        found: u32,
        /// The newest this build reads.
        supported: u32,
    },
    /// A case without an id.
    #[error("case #{index} ({attack}) has an empty id")]
    EmptyId {
        /// Its position in the run.
        index: usize,
        /// Its attack.
        attack: String,
    },
    /// Two cases with one id.
    #[error("case id {0:?} appears twice")]
    DuplicateId(String),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

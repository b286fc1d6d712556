//! [`GuestError`]: why a payload could not be built or loaded.

use std::path::PathBuf;

/// Why a payload could not be built or loaded.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The assembler refused an instruction (a bug in a payload builder).
    #[error("assembling payload: {0}")]
    Asm(#[from] iced_x86::IcedError),
    /// The payload is unusable (unknown name, empty, too large).
    #[error("payload {what}: {detail}")]
    Payload {
        /// File name or built-in name.
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A payload file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Results of payload builders.
pub type Result<T = ()> = std::result::Result<T, GuestError>;

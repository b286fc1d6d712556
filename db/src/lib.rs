//! One database layer for the crates that keep state in SQL (counters, campaigns'
//! results store and claim queue, the lab service's tables, rig leases and host
//! states):
//!
//! - [`DbUrl`]: a database spec — `sqlite:PATH`, a plain path (SQLite), or a
//!   `postgresql://` / `postgres://` URL (or a libpq `key=value` string with
//!   `dbname=`) — parsed once, with one clear error for a bad spec;
//! - [`open`], [`open_sqlite`], [`connect_pg`]: the project's connection settings
//!   (SQLite: WAL, busy timeout, foreign keys; PostgreSQL: connect timeout,
//!   `application_name`);
//! - [`migrate`]: versioned schema migrations, each schema a named list recorded in
//!   `schema_migrations(schema, version, sha256)`, applied in one locked
//!   transaction; a database whose recorded migration differs from the code's, or
//!   that is newer than the code, is refused; a database made before this layer
//!   (no `schema_migrations`) is adopted when its tables match;
//! - [`mac`]: HMAC-SHA256 over a canonical (length-prefixed) row encoding, a
//!   constant-time compare and a key fingerprint;
//! - [`ScratchPg`]: a fresh PostgreSQL database for a test or bench, dropped on drop;
//!   [`test_server`]: the server tests use (`HILRIG_TEST_PG`; required under CI).
//!
//! Queries stay with their crates (as SQL text on the raw `rusqlite` / `postgres`
//! connection): this crate owns how a database is named, opened and migrated.

mod conn;
mod error;
pub mod mac;
mod migrate;
mod scratch;
mod url;

pub use conn::{connect_pg, open, open_sqlite, open_sqlite_memory, Conn, ConnMut, Settings};
pub use error::{pg_detail, DbError, Result};
pub use migrate::{migrate, recorded, table_columns, Adopt, Migration, Schema, MIGRATIONS_TABLE};
pub use scratch::{database_url, test_server, ScratchPg};
pub use url::{redact, DbUrl};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

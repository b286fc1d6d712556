//! Errors of the database layer.

/// A database layer error; every variant names the database (password hidden)
/// or the spec it is about.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database spec is not one this layer understands.
    #[error(
        "bad database spec {spec:?}: {why} (use a SQLite file path, `sqlite:PATH`, \
         or a `postgresql://` URL)"
    )]
    BadSpec {
        /// The spec as given (password hidden).
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// SQLite said no.
    #[error("database {db}: {what}: {source}")]
    Sqlite {
        /// The database.
        db: String,
        /// What was being done.
        what: String,
        /// Cause.
        source: rusqlite::Error,
    },
    /// PostgreSQL said no (the server's message, SQLSTATE and constraint).
    #[error("database {db}: {what}: {}", pg_detail(.source))]
    Postgres {
        /// The database (URL, password hidden).
        db: String,
        /// What was being done.
        what: String,
        /// Cause.
        source: postgres::Error,
    },
    /// A directory for a SQLite file could not be created.
    #[error("database {db}: creating directory {dir}: {source}")]
    Io {
        /// The database.
        db: String,
        /// The directory.
        dir: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A recorded migration is not the code's migration of that version.
    #[error(
        "database {db}: schema {schema} migration {version} differs: database {database}, code {code} \
         (the database was migrated by another build; refusing to use it)"
    )]
    MigrationDiffers {
        /// The database.
        db: String,
        /// The schema.
        schema: String,
        /// The version.
        version: i64,
        /// SHA-256 recorded in the database.
        database: String,
        /// SHA-256 of this build's migration.
        code: String,
    },
    /// The database has a migration this build does not know.
    #[error(
        "database {db}: schema {schema} is at version {database}, this build knows up to {code} \
         (upgrade hilrig)"
    )]
    TooNew {
        /// The database.
        db: String,
        /// The schema.
        schema: String,
        /// Newest version recorded in the database.
        database: i64,
        /// Newest version in the code.
        code: i64,
    },
    /// A database without `schema_migrations` whose tables are not this schema's.
    #[error("database {db}: schema {schema}: cannot adopt an existing database: {detail}")]
    NotAdoptable {
        /// The database.
        db: String,
        /// The schema.
        schema: String,
        /// What does not match.
        detail: String,
    },
    /// A schema definition in the code is malformed (versions not 1, 2, 3, ...).
    #[error("schema {schema}: bad definition: {detail}")]
    BadSchema {
        /// The schema.
        schema: String,
        /// What is wrong.
        detail: String,
    },
    /// A migration failed and was rolled back.
    #[error("database {db}: schema {schema}: applying migration {version}: {source}")]
    Migration {
        /// The database.
        db: String,
        /// The schema.
        schema: String,
        /// The version that failed.
        version: i64,
        /// Cause.
        source: Box<DbError>,
    },
    /// `HILRIG_TEST_PG` is not set where it must be (under CI, `scripts/test`
    /// starts a server and sets it: a missing one is a broken install step).
    #[error(
        "HILRIG_TEST_PG is not set under CI=true: scripts/test starts a PostgreSQL \
         server on loopback and sets it, so its absence is an install failure, not a skip"
    )]
    NoTestServer,
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, DbError>;

/// A PostgreSQL error with the server's message, SQLSTATE, constraint and detail
/// (the client's own Display says only "db error").
pub fn pg_detail(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => {
            let mut s = format!(
                "{}: {} (SQLSTATE {})",
                d.severity(),
                d.message(),
                d.code().code()
            );
            if let Some(c) = d.constraint() {
                s.push_str(&format!(", constraint {c}"));
            }
            if let Some(x) = d.detail() {
                s.push_str(&format!("; {x}"));
            }
            s
        }
        None => e.to_string(),
    }
}

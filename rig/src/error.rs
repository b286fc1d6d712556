//! Errors of the rig, and the line between infrastructure faults and test outcomes.

use std::path::PathBuf;

/// Results of the rig library.
pub type Result<T, E = RigError> = std::result::Result<T, E>;

/// A name or field that fails a check (a host name, a console name, an SSH spec field).
/// The message names the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidField(pub String);

/// Everything that can go wrong in the rig. Every variant names where: the inventory
/// file, the host, the driver.
#[derive(Debug, thiserror::Error)]
pub enum RigError {
    /// The inventory file is unreadable or invalid.
    #[error("inventory {}: {}{}{detail}", file.display(), host.as_deref().map(|h| format!("host `{h}`: ")).unwrap_or_default(), driver.as_deref().map(|d| format!("{d}: ")).unwrap_or_default())]
    Inventory {
        /// The file.
        file: PathBuf,
        /// The host concerned, if any.
        host: Option<String>,
        /// The driver section concerned (e.g. `power driver \`serial-relay\``), if any.
        driver: Option<String>,
        /// What is wrong.
        detail: String,
    },
    /// No host of that name in the inventory.
    #[error("no host `{host}` in inventory {}", file.display())]
    UnknownHost {
        /// The file.
        file: PathBuf,
        /// The name asked for.
        host: String,
    },
    /// A driver failed: no answer, a garbage answer, a readback that does not match,
    /// a command that exited non-zero. An infrastructure fault.
    #[error("host `{host}`: {driver} driver: {detail}")]
    Driver {
        /// The host.
        host: String,
        /// The driver, e.g. `power/serial-relay`, `oob/serial`, `console/com1`.
        driver: String,
        /// What happened.
        detail: String,
    },
    /// A simulated host's VMM died unexpectedly, or another fault of the host itself
    /// (not of the code under test). An infrastructure fault.
    #[error("host `{host}`: infrastructure fault: {detail}")]
    Infra {
        /// The host.
        host: String,
        /// What happened.
        detail: String,
    },
    /// The driver or feature is not available in this build or on this hardware.
    #[error("host `{host}`: {driver} driver: {detail}")]
    Unsupported {
        /// The host ("-" when none).
        host: String,
        /// The driver.
        driver: String,
        /// Why.
        detail: String,
    },
    /// Lease database failures.
    #[error("lease store {store}: {detail}")]
    Lease {
        /// The database (path or URL without password).
        store: String,
        /// What happened.
        detail: String,
    },
    /// The host is leased by someone else.
    #[error("host `{host}` is leased by `{holder}` until {} ({expires_unix_ms} unix ms)", crate::lease::format_unix_ms(*expires_unix_ms))]
    Leased {
        /// The host.
        host: String,
        /// Its current holder.
        holder: String,
        /// Expiry of the holder's lease.
        expires_unix_ms: i64,
    },
    /// The counters service does not vouch for the host's device (quarantined,
    /// locked, held, needs-reflash, unknown, or it could not be read): the host is
    /// not handed out.
    #[error("host `{host}`: device refused by the counters service: {verdict}: {detail}")]
    Untrusted {
        /// The host.
        host: String,
        /// The verdict (or what failed: `unknown-device`, `transport-fault`,
        /// `service-error`).
        verdict: String,
        /// Why.
        detail: String,
    },
    /// Local I/O (work directories, capture files).
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A directory or file a local user could have prepared against us (a work
    /// directory owned by someone else or group/other-writable, a symlink).
    #[error("refusing an unsafe path: {0}")]
    UnsafePath(#[from] hilrig_device::secure::SecureFileError),
}

/// Coarse classes of [`RigError`], as a runner treats them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad configuration: fix the inventory, do not retry.
    Config,
    /// Infrastructure fault: retry on this or another host, never a test failure.
    Infra,
    /// The host is busy (leased): wait or pick another.
    Busy,
}

impl std::fmt::Display for ErrorKind {
    /// `CONFIG`, `INFRA` or `BUSY` (as results and messages name the class).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorKind::Config => "CONFIG",
            ErrorKind::Infra => "INFRA",
            ErrorKind::Busy => "BUSY",
        })
    }
}

impl RigError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RigError::Inventory { .. } | RigError::UnknownHost { .. } => ErrorKind::Config,
            RigError::Unsupported { .. } | RigError::UnsafePath(_) => ErrorKind::Config,
            RigError::Leased { .. } | RigError::Untrusted { .. } => ErrorKind::Busy,
            RigError::Driver { .. }
            | RigError::Infra { .. }
            | RigError::Lease { .. }
            | RigError::Io { .. } => ErrorKind::Infra,
        }
    }

    /// True for infrastructure faults (see [`ErrorKind::Infra`]).
    pub fn is_infra(&self) -> bool {
        self.kind() == ErrorKind::Infra
    }

    pub(crate) fn driver(host: &str, driver: &str, detail: impl Into<String>) -> RigError {
        RigError::Driver {
            host: host.to_string(),
            driver: driver.to_string(),
            detail: detail.into(),
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> RigError {
        RigError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Why a case failed: its expectation was not met (the code under test misbehaved,
/// not the rig).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CaseFailure(pub String);

impl From<String> for CaseFailure {
    fn from(reason: String) -> Self {
        CaseFailure(reason)
    }
}

impl From<&str> for CaseFailure {
    fn from(reason: &str) -> Self {
        CaseFailure(reason.to_string())
    }
}

/// The outcome of one test case on one host, as the runner records it. An
/// infrastructure fault is never a test failure: it is its own outcome, retried
/// and reported apart.
#[derive(Debug)]
pub enum Outcome {
    /// The case met its expectation.
    Pass,
    /// The code under test misbehaved (the expectation was not met).
    Fail {
        /// Why.
        reason: String,
    },
    /// The rig could not run the case: power, console, OOB, VMM died, lease lost.
    Infra(RigError),
}

impl Outcome {
    /// Classify the result of running a case: `Ok(Ok(()))` pass, `Ok(Err(failure))`
    /// failure of the code under test, `Err(rig error)` by kind (infra faults and
    /// configuration errors are both outcomes the case itself is not blamed for).
    pub fn from_result(r: Result<Result<(), CaseFailure>, RigError>) -> Outcome {
        match r {
            Ok(Ok(())) => Outcome::Pass,
            Ok(Err(CaseFailure(reason))) => Outcome::Fail { reason },
            Err(e) => Outcome::Infra(e),
        }
    }

    /// True when the case should be retried (infrastructure faults only).
    pub fn retryable(&self) -> bool {
        matches!(self, Outcome::Infra(e) if e.is_infra())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infra_faults_are_not_test_failures() {
        let infra = RigError::Infra {
            host: "sim-2".into(),
            detail: "the VMM exited unexpectedly".into(),
        };
        assert!(infra.is_infra());
        let o = Outcome::from_result(Err(infra));
        assert!(matches!(o, Outcome::Infra(_)) && o.retryable());
        let f = Outcome::from_result(Ok(Err("counter went backwards".into())));
        assert!(matches!(f, Outcome::Fail { .. }) && !f.retryable());
        assert!(matches!(Outcome::from_result(Ok(Ok(()))), Outcome::Pass));
        let cfg = Outcome::from_result(Err(RigError::UnknownHost {
            file: "lab.toml".into(),
            host: "nope".into(),
        }));
        assert!(!cfg.retryable());
        let busy = RigError::Leased {
            host: "h".into(),
            holder: "r1".into(),
            expires_unix_ms: 0,
        };
        assert_eq!(busy.kind(), ErrorKind::Busy);
        let e = RigError::Inventory {
            file: "lab.toml".into(),
            host: Some("h".into()),
            driver: Some("power driver `x`".into()),
            detail: "unknown driver".into(),
        };
        assert_eq!(
            e.to_string(),
            "inventory lab.toml: host `h`: power driver `x`: unknown driver"
        );
    }
}

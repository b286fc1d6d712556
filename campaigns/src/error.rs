//! The runner's errors: why a campaign run could not start or go on. Each
//! variant names what it was doing and where; errors of the parts it drives
//! (store, claim queue, rig, campaign file) keep their own types as sources.

use std::path::PathBuf;

/// Why [`crate::run_campaign`] (or validating a campaign against its hosts) failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A file or directory operation.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done (e.g. "creating").
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The campaign file.
    #[error(transparent)]
    Campaign(#[from] crate::format::CampaignError),
    /// The results store.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The PostgreSQL claim queue (scale-out).
    #[error(transparent)]
    Claim(#[from] crate::claim::ClaimError),
    /// The rig (inventory, host states, leases) at `what`.
    #[error("{what}: {source}")]
    Rig {
        /// What the rig was asked (e.g. "inventory rig/inventory/sim.toml").
        what: String,
        /// The rig's error.
        #[source]
        source: hilrig_rig::error::RigError,
    },
    /// No VMM executable was found.
    #[error("finding the VMM: {0}")]
    FindVmm(#[from] hilrig_rig::sim::FindVmmError),
    /// The labgrid coordinator at `address` (its class named: a place unknown
    /// or not published is CONFIG, the coordinator down INFRA).
    #[error("--labgrid {address}: {}: {source}", source.kind())]
    Labgrid {
        /// The coordinator's address.
        address: String,
        /// The labgrid client's error.
        #[source]
        source: hilrig_rig::labgrid::LabgridError,
    },
    /// `--inventory` with `--labgrid`: an inventory host and a reserved place
    /// share a name (a setup error: rename one).
    #[error("--inventory {} and --labgrid {address}: host `{name}` is both an inventory host and a reserved place (names must be unique: rename one)", inventory.display())]
    HostNameClash {
        /// The clashing name.
        name: String,
        /// The inventory.
        inventory: PathBuf,
        /// The coordinator's address.
        address: String,
    },
    /// Options that cannot be used together or that name something absent.
    #[error("{0}")]
    Options(String),
    /// A run id that cannot name a run (`--join`).
    #[error(transparent)]
    BadRunId(#[from] crate::claim::BadRunId),
    /// The inventory has no host the runner can reach.
    #[error("inventory {}: no host the runner can reach (give hosts an `[host.ssh]` section, or simulated drivers)", .0.display())]
    NoReachableHost(PathBuf),
    /// A shared run's queue holds a case this campaign file does not have.
    #[error("run {run}: queued case {case} is not in this campaign file (another version of the campaign joined the run?)")]
    UnknownQueuedCase {
        /// The run.
        run: String,
        /// The case id found in the queue.
        case: String,
    },
    /// Encoding the run's hosts for the store.
    #[error("encoding the run's hosts: {0}")]
    Json(#[from] serde_json::Error),
    /// Writing the reports.
    #[error("writing reports: {0}")]
    Reports(#[from] hilrig_reports::error::Error),
    /// A task of the runner died (panicked or was cancelled).
    #[error("{what}: {source}")]
    Task {
        /// Which task.
        what: &'static str,
        /// Its join error.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The runner's async runtime could not start.
    #[error("starting the runner's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The claim queue was closed while a worker still used it.
    #[error("claim queue already closed")]
    QueueClosed,
}

/// Exit statuses of `campaign run` (and `hilrig run`), defined once: the run's
/// ([`crate::runner::RunSummary::exit_status`]) and a run that could not start
/// ([`RunError::exit_code`]).
pub mod exit {
    /// Every case PASS or FLAKY.
    pub const PASSED: u8 = 0;
    /// A case FAILed or TIMEd OUT.
    pub const FAILED: u8 = 1;
    /// A setup error (CONFIG): fix the campaign, inventory or lab; not retried.
    pub const CONFIG: u8 = 2;
    /// Cases could not run (INFRA after retries, SKIPPED), or the run could not
    /// start for an infrastructure fault: try again.
    pub const INFRA: u8 = 3;
}

impl RunError {
    /// The class of this error: an infrastructure fault (the labgrid
    /// coordinator down, a store or file that failed, a task that died: try
    /// again) or a setup error (a bad campaign, inventory, option or place:
    /// fix it first). A place busy with someone else counts as INFRA (it may
    /// be free later).
    pub fn kind(&self) -> hilrig_rig::ErrorKind {
        use hilrig_rig::ErrorKind;
        let infra_or_config = |k: ErrorKind| match k {
            ErrorKind::Config => ErrorKind::Config,
            ErrorKind::Infra | ErrorKind::Busy => ErrorKind::Infra,
        };
        match self {
            RunError::Labgrid { source, .. } => infra_or_config(source.kind()),
            RunError::Rig { source, .. } => infra_or_config(source.kind()),
            RunError::Io { .. }
            | RunError::Store(_)
            | RunError::Claim(_)
            | RunError::Json(_)
            | RunError::Reports(_)
            | RunError::Task { .. }
            | RunError::Runtime(_)
            | RunError::QueueClosed => ErrorKind::Infra,
            RunError::Campaign(_)
            | RunError::FindVmm(_)
            | RunError::Options(_)
            | RunError::BadRunId(_)
            | RunError::NoReachableHost(_)
            | RunError::UnknownQueuedCase { .. }
            | RunError::HostNameClash { .. } => ErrorKind::Config,
        }
    }

    /// The process exit status of a run that failed with this error:
    /// [`exit::CONFIG`] or [`exit::INFRA`] by [`RunError::kind`], as the run's
    /// own setup errors and infrastructure faults exit.
    pub fn exit_code(&self) -> u8 {
        match self.kind() {
            hilrig_rig::ErrorKind::Config => exit::CONFIG,
            _ => exit::INFRA,
        }
    }

    /// An I/O error at `path`.
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> RunError {
        RunError::Io {
            what,
            path: path.into(),
            source,
        }
    }
    /// A rig error while doing `what`.
    pub fn rig(what: impl Into<String>, source: hilrig_rig::error::RigError) -> RunError {
        RunError::Rig {
            what: what.into(),
            source,
        }
    }
}

/// The runner's result.
pub type RunResult<T> = std::result::Result<T, RunError>;

//! hilrig-vmm-api: the typed interface of hilrig's VMM, shared by the VMM and every
//! client (the `hilrig` CLI, campaigns, fleet rollout, the rig).
//!
//! - [`exit`]: [`ExitStatus`], the one place the VMM's exit statuses are defined;
//! - [`spec`]: [`VmSpec`] (the VMM's command line as a value, turned into arguments
//!   with [`VmSpec::to_args`]) and [`DeviceSpec`] (`--device`);
//! - [`summary`]: [`RunSummary`], what `--json` prints and clients read back, with
//!   [`ExitCounts`], [`PolicySummary`], [`PatchEvent`], [`VbiosMeasurement`];
//! - [`teardown`]: the signed [`TeardownRecord`];
//! - [`control`]: the control socket's [`Request`] and [`Reply`], and a client.
//!
//! No client reads the VMM's JSON by field name: it deserializes these types.
#![deny(missing_docs)]

pub mod control;
pub mod exit;
pub mod spec;
pub mod summary;
pub mod teardown;

pub use control::{Reply, Request, Response};
pub use exit::ExitStatus;
pub use hilrig_device::attest::Verdict as CountersVerdict;
pub use hilrig_device::{BackendKind, Region};
pub use spec::{ConsoleOwner, DeviceSpec, Irqchip, OnUnemulated, SpecError, VmSpec};
pub use summary::{
    AlarmGroup, ExitCounts, GateOutcome, GateRecord, PatchEvent, PolicySummary, RunSummary,
    SandboxSummary, TrapLatency, VbiosMeasurement,
};
pub use teardown::{BreachTrigger, Nonce, RunBinding, TeardownRecord, VerdictSummary};

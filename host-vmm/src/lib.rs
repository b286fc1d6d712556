//! hilrig-vmm: a KVM VMM that boots bare-metal x86-64 payloads with the reference
//! device on PCI. See README.md and `docs/architecture.md`.
//!
//! - [`vstate`]: the VM, its vCPU threads and exit dispatch, the guest layout;
//! - [`devices`]: PCI config space, the BAR0 page plan, device backends (model, rtl,
//!   lockstep, vfio, fpga) and the patchable handler in front of them;
//! - [`policy`]: MMIO policy files, compiled profiles, the per-access engine, faults;
//! - [`lifecycle`]: quiesce, live patching and its module table, secure teardown,
//!   the measured VBIOS and the control socket;
//! - guest code (payload builder, built-ins, attacks) is the `hilrig-guest` crate,
//!   re-exported as [`payload`] and [`attacks`];
//! - [`cli`]: `hilrig vm run` / `hilrig-vmm`; the typed interface every client uses
//!   is the `hilrig-vmm-api` crate (re-exported as [`api`]);
//! - the benchmarks (`hilrig bench vm-exit|policy|patch|teardown`) are in the
//!   `hilrig-bench` crate.
#![deny(missing_docs)]

pub mod cli;
pub mod devices;
pub mod error;
pub mod jail;
pub mod lifecycle;
pub mod modtable;
pub mod policy;
pub mod seccomp;
pub mod ticks;
pub mod verdict;
pub mod vstate;

pub use cli::{run_cli, VmArgs};
pub use devices::backend::Backend;
pub use devices::plan::{DirectWindow, PageMap, PagePlan, TrapSet};
pub use devices::{open_backend, DeviceSpec};
pub use error::VmmError;
pub use hilrig_guest::{attacks, payload};
pub use hilrig_vmm_api as api;
pub use vstate::vm::{
    Console, ExitCounts, ExitStatus, RunReport, StopHandle, Verdict, Vm, VmConfig,
};

/// Whether /dev/kvm can be opened. When it cannot, says so loudly on stderr
/// (`SKIPPED: ...`), so tests that need KVM skip visibly, never silently.
pub fn kvm_available() -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        return true;
    }
    eprintln!("SKIPPED: /dev/kvm not available");
    false
}

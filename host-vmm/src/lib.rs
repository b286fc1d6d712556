//! hilrig-vmm: a KVM VMM that boots bare-metal x86-64 payloads with the reference
//! device on PCI. See README.md.
//!
//! - [`vm`]: the VM, vCPU threads, exit dispatch, watchdog, [`Verdict`];
//! - [`layout`]: guest-physical layout, long-mode setup, the entry ABI;
//! - [`pci`]: configuration mechanism #1, host bridge and the device function;
//! - [`plan`]: which BAR0 pages are mapped and which trap ([`PagePlan`]);
//! - [`backend`]: device backends (model, rtl, lockstep, vfio) behind one type;
//! - [`vfio`]: the VFIO backend;
//! - [`payload`]: guest payloads built with iced-x86 (and the fault handler);
//! - [`policy`]: MMIO policy files and compiled profiles; [`engine`]: the per-access
//!   policy engine, shadow store and alarm sink; [`attacks`]: attack payloads;
//! - [`cli`]: [`VmArgs`] and [`run_cli`]; [`bench`](mod@bench): [`bench_vm_exit`];
//!   [`bench_policy`](mod@bench_policy): [`bench_policy()`].
#![deny(missing_docs)]

pub mod attacks;
pub mod backend;
pub mod bench;
pub mod bench_lifecycle;
pub mod bench_policy;
pub mod cli;
pub mod control;
pub mod engine;
pub mod error;
pub(crate) mod fault;
pub mod handled;
pub mod layout;
pub mod lifecycle;
pub mod measured;
pub mod modules;
pub mod patch;
pub mod payload;
pub mod pci;
pub mod plan;
pub mod policy;
pub mod quiesce;
pub mod rollout;
pub mod teardown;
pub mod ticks;
pub mod vfio;
pub mod vm;

pub use backend::{open_backend, Backend, DeviceSpec};
pub use bench::bench_vm_exit;
pub use bench_policy::bench_policy;
pub use cli::{run_cli, VmArgs};
pub use error::VmmError;
pub use plan::{DirectWindow, PageMap, PagePlan, TrapSet};
pub use vm::{Console, ExitCounts, RunReport, StopHandle, Verdict, Vm, VmConfig};

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

//! The virtual machine's state, after Firecracker's `vstate/`: the VM ([`vm`]), its
//! vCPU threads as a state machine ([`vcpu`]), exit dispatch against a narrow bus
//! interface, testable without KVM ([`dispatch`]), the guest-physical layout and
//! long-mode entry ([`layout`]). The cheap clock the trap path times itself with is
//! [`crate::ticks`] (the policy engine's alarms use it too).

pub mod dispatch;
pub mod layout;
pub(crate) mod stuck;
pub(crate) mod vcpu;
pub mod vm;

pub use crate::verdict::Verdict;

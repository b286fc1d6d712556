//! The virtual machine's state, after Firecracker's `vstate/`: the VM and its vCPU
//! threads ([`vm`]), the guest-physical layout and long-mode entry ([`layout`]), and
//! the cheap clock the trap path times itself with ([`ticks`]).

pub mod layout;
pub mod ticks;
pub mod vm;

//! hilrig-fpga: the reference device in rust-hdl (see README.md).
//!
//! - [`core::DeviceCore`]: the synthesizable device core, decoded from the register
//!   table; [`bram`], [`uart`], [`oob`] (the OOB protocol engine), [`sha`]
//!   (SHA-256 of a region): its building blocks; [`sim`]: how they are simulated
//!   fast (hand-written `Block` impls, gated blocks, clock fan-out);
//! - [`uartsim`]: software ends of a UART line, for simulation drivers;
//! - [`Rtl`]: the `rtl` backend, the core simulated in-process;
//! - [`Lockstep`]: the `lockstep` backend, model and RTL compared on every operation;
//! - [`difftest`]: seeded random differential testing through `Lockstep`;
//! - [`icarus`]: the generated Verilog run under Icarus Verilog, for test benches.
//!
//! The figures of `hilrig bench rtl` are in the `hilrig-bench` crate.
#![deny(missing_docs)]

pub mod bram;
pub mod core;
pub mod counter;
pub mod difftest;
pub mod icarus;
pub mod lockstep;
pub mod oob;
pub mod rtl;
pub mod sha;
pub mod sim;
pub mod uart;
pub mod uartsim;

pub use lockstep::{DynLockstep, Lockstep, Side};
pub use rtl::Rtl;

use hilrig_device::device::{Device, DeviceError};
use std::path::Path;

/// The device backends this crate provides, by their command-line names
/// (`--backend rtl|lockstep`).
pub const BACKENDS: &[&str] = &["rtl", "lockstep"];

/// Why a backend could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The name is not one of `BACKENDS`.
    #[error("unknown device backend {0:?} (this crate provides: rtl, lockstep)")]
    Unknown(String),
    /// Opening failed (state file, configuration).
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// Open the backend named `name` on the state file at `state`.
pub fn open_backend(name: &str, state: &Path) -> Result<Box<dyn Device>, BackendError> {
    Ok(match name {
        "rtl" => Box::new(Rtl::open(state)?),
        "lockstep" => Box::new(Lockstep::open(state)?),
        other => return Err(BackendError::Unknown(other.to_string())),
    })
}

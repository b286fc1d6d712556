//! hilrig-device: what every part of hilrig shares about the reference device.
//!
//! - [`attest`]: the counters service's [`attest::Verdict`];
//! - [`backend`]: [`BackendKind`], the in-process backends by name;
//! - [`regmap`]: the register table, the one source of truth for decode, policies
//!   and docs;
//! - [`device`]: the `Device` trait every backend implements, and the access rules;
//! - [`model`]: the fast behavioural model;
//! - [`state`]: nonvolatile state and its atomic, checksummed state file;
//! - [`secure`]: atomic writes with random temporary names, secret-key-file and
//!   work-directory checks, bounded reads of regular files;
//! - [`oob`]: the framed out-of-band protocol, device and requester sides;
//! - `testkit` (feature `testkit`): the property tests every backend runs.
//!
//! This crate has no HDL dependency, so the VMM, the rig and the counters service
//! use it without compiling rust-hdl.
#![deny(missing_docs)]

pub mod attest;
pub mod backend;
pub mod device;
pub mod model;
pub mod oob;
pub mod regmap;
pub mod secure;
pub mod state;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use backend::{BackendKind, UnknownBackend};
pub use device::{Device, DeviceError, ResetKind};
pub use model::Model;
pub use regmap::{Reg, Region};
pub use state::{DeviceConfig, NvState};

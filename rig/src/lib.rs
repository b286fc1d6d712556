//! hilrig-rig: the rig controller's hardware side. An [`inventory::Inventory`] says
//! what hosts exist and how their power, consoles, OOB port and boards are wired;
//! [`rig::Rig`] turns it into drivers (real or simulated), checks their health,
//! captures consoles, reads counters out of band, and [`lease`] hands each host to
//! one runner at a time; [`rollout`] rolls a live patch out over a fleet of VMMs
//! (canaries, then waves). See README.md.

pub mod board;
pub mod cli;
pub mod console;
pub mod error;
pub mod hoststate;
pub mod inventory;
pub mod labgrid;
pub mod lease;
pub mod oob;
pub mod power;
pub mod recover;
pub mod remote;
pub mod rfc2217;
pub mod rig;
pub mod rollout;
pub mod sim;
pub mod simlab;

pub use cli::{run, RigCmd};
pub use error::{ErrorKind, InvalidField, Outcome, RigError};
pub use inventory::Inventory;
pub use power::{Power, PowerState};
pub use rig::{check, HealthTable, Rig};

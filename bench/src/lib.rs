//! hilrig-bench: every benchmark of `hilrig bench NAME`, and its [`Figure`]s (see
//! README.md). Each benchmark measures its figures with a baseline measured in the
//! same run and prints the ratio; [`run`] dispatches by name, [`BENCHES`] lists them.
//!
//! - [`figure`]: [`Figure`] and [`rate`];
//! - [`run`]: the dispatcher, the `model`, `campaign` and `lab` benchmarks;
//! - [`rtl`], [`verilator`], [`board`]: the device's RTL, its Verilator build, the
//!   board over its host bridge;
//! - [`vm_exit`], [`policy`], [`lifecycle`]: the VMM's exit path, the MMIO policy,
//!   live patching and teardown;
//! - [`counters`], [`serve`], [`scale`]: the attestation service, the lab service,
//!   campaign scale-out over PostgreSQL.
//!
//! The library crates compile no bench code; what a benchmark needs of a crate's
//! internals is that crate's public API.

pub mod board;
pub mod counters;
pub mod figure;
pub mod lifecycle;
pub mod policy;
pub mod rtl;
pub mod run;
pub mod scale;
pub mod serve;
pub mod verilator;
pub mod vm_exit;

pub use figure::{rate, Figure};
pub use run::{print_table, run, BENCHES};

//! The MMIO policy: files and compiled profiles ([`profile`], re-exported here), the
//! per-access engine with its shadow store and alarm sink ([`engine`]), and the
//! exception injection for `fault` rules (`fault`).

pub mod breach;
pub mod engine;
pub(crate) mod fault;
pub mod profile;

pub use profile::*;

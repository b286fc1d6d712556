//! The MMIO policy: files and compiled profiles ([`profile`], re-exported here), the
//! per-access engine with its shadow store and alarm sink ([`engine`]), the
//! exception injection for `fault` rules (`fault`), and device description files
//! ([`desc`]: register names, tenant access and scrub values of a passed-through
//! device, from which its default policy is built).

pub mod breach;
pub mod desc;
pub mod engine;
pub(crate) mod fault;
pub mod profile;

pub use profile::*;

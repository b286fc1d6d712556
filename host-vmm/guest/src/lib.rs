//! hilrig-guest: every piece of guest code in one place, assembled with iced-x86
//! (no byte arrays): the entry ABI the VMM implements ([`abi`]), the payload builder
//! and the built-in payloads ([`payload`], [`builtins`]), the attack payloads
//! ([`attacks`]), the campaign scenarios' generated payloads ([`scenario`]) and the
//! simulated host's idle guest ([`idle`]).
#![deny(missing_docs)]

pub mod abi;
pub mod attacks;
pub mod builtins;
pub mod detach;
pub mod error;
pub mod idle;
pub mod intx;
pub mod payload;
pub mod scenario;

pub use builtins::{builtin, load, BUILTINS};
pub use error::GuestError;
pub use payload::{Payload, Width};

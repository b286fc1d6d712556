//! A running VM's lifecycle: pause/resume at a rendezvous ([`quiesce`]), verified live
//! patches ([`patch`]) through the versioned module table ([`modules`]), secure
//! teardown ([`teardown`]), the measured VBIOS at hand-over ([`measured`]), and the
//! control socket that exposes them ([`control`]); [`Life`] holds a VM's lifecycle
//! state and the operations on it.

pub mod applied;
pub mod breach;
pub mod control;
pub mod gate;
mod life;
pub mod measured;
pub mod patch;
pub mod patch_path;
pub mod quiesce;
pub mod teardown;

pub use crate::modtable::{modules, sealed};
pub use life::*;

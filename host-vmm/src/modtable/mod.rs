//! The module table's primitives (issue 21 item 1): versioned [`modules::Slot`]s
//! with in-flight counts, retry and retirement, native handler modules loaded from
//! a sealed memfd ([`sealed`]), and the process-wide module alarm count. Below both
//! the policy engine (whose profile is a slot on every access) and the lifecycle
//! (which swaps slots on a patch): neither imports the other through it.
//! `lifecycle::modules` and `lifecycle::sealed` re-export these modules.

use std::sync::atomic::AtomicU64;

pub mod modules;
pub mod sealed;

/// The policy's component name in the module table and in patch manifests.
pub const POLICY: &str = "policy";

/// Module-table alarms (calls through stale handles or retired code) since the
/// process started.
pub static MODULE_ALARMS: AtomicU64 = AtomicU64::new(0);

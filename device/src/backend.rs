//! The in-process device backends by name: one type every crate parses and prints
//! (`--backend`, `--device`, campaign files, conformance targets), so a backend name is
//! never matched as a string anywhere else.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A device backend that runs in-process on a state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The fast behavioural model (this crate).
    Model,
    /// The rust-hdl RTL driven cycle by cycle in-process (`hilrig-fpga`).
    Rtl,
    /// Model and RTL side by side, compared on every operation (`hilrig-fpga`).
    Lockstep,
    /// The generated Verilog compiled with Verilator (`hilrig-verilator`).
    Verilator,
}

impl BackendKind {
    /// Every in-process backend, in the order help texts list them.
    pub const ALL: [BackendKind; 4] = [
        BackendKind::Model,
        BackendKind::Rtl,
        BackendKind::Lockstep,
        BackendKind::Verilator,
    ];

    /// The name used on command lines and in files.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Model => "model",
            BackendKind::Rtl => "rtl",
            BackendKind::Lockstep => "lockstep",
            BackendKind::Verilator => "verilator",
        }
    }

    /// The names of every backend, joined for error messages (`model, rtl, ...`).
    pub fn names() -> String {
        BackendKind::ALL.map(BackendKind::name).join(", ")
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device backend `{0}` (expected one of: {names})", names = BackendKind::names())]
pub struct UnknownBackend(pub String);

impl FromStr for BackendKind {
    type Err = UnknownBackend;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackendKind::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| UnknownBackend(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for b in BackendKind::ALL {
            assert_eq!(b.name().parse::<BackendKind>(), Ok(b));
            assert_eq!(
                serde_json::to_string(&b).unwrap(),
                format!("\"{}\"", b.name())
            );
        }
        let e = "fpga9000".parse::<BackendKind>().unwrap_err();
        assert!(e.to_string().contains("fpga9000") && e.to_string().contains("verilator"));
    }
}

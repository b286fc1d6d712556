//! hilrig-verilator: the `verilator` device backend (see README.md).
//!
//! - [`build`]: verilating Verilog into a shared library, cached by SHA-256 and
//!   renamed into place atomically;
//! - [`core`]: the device core's library (the C ABI of `cpp/wrapper.cpp`), loaded
//!   with libloading;
//! - [`Verilator`]: `hilrig_device::Device` on the verilated core, with the `rtl`
//!   backend's state files, persist protocol, OOB byte interface and resets;
//! - [`open_backend`], [`new_backend`]: any in-process backend by [`BackendKind`];
//!   [`open_side`], [`open_pair`], [`pair`]: lockstep of any two;
//! - [`board`]: the board top (core + host bridge + OOB UART) verilated, a
//!   `hilrig_board::BoardCircuit` for the simulated board ([`sim_board`]).
//!
//! The Verilator rows of `hilrig bench rtl` are in the `hilrig-bench` crate.
#![deny(missing_docs)]

pub mod board;
pub mod build;
pub mod core;
pub mod device;

pub use board::{sim_board, VerilatedBoard};
pub use build::BuildOptions;
pub use device::Verilator;

use hilrig_device::device::DeviceError;
use hilrig_device::model::Model;
use hilrig_device::state::NvState;
use hilrig_device::BackendKind;
use hilrig_fpga::{DynLockstep, Lockstep, Rtl, Side};
use std::path::{Path, PathBuf};

/// What can go wrong building, loading or running the Verilator backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `verilator` could not be run.
    #[error(
        "verilator is not installed or cannot be run ({program}: {source}); \
         install Debian's `verilator` package or set HILRIG_VERILATOR"
    )]
    VerilatorMissing {
        /// The program tried.
        program: PathBuf,
        /// Why it could not be run.
        source: std::io::Error,
    },
    /// Verilating or compiling failed.
    #[error("{what} failed ({status}); build directory {dir}:\n{log}")]
    Build {
        /// What was being built.
        what: String,
        /// The exit status.
        status: String,
        /// The build directory (kept, with build.log).
        dir: PathBuf,
        /// The end of the build log.
        log: String,
    },
    /// The cache directory could not be used.
    #[error("verilator cache {path}: {source}")]
    Cache {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A built library could not be loaded or is not of this ABI.
    #[error("loading the verilated core {path}: {detail}")]
    Load {
        /// The library.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// VCD tracing needs a trace build (`BuildOptions { trace: true, .. }`), or the
    /// trace file could not be opened.
    #[error("VCD tracing needs a trace build of the core (BuildOptions::trace) and a writable temporary directory")]
    NoTrace,
    /// The verilated core could not be instantiated.
    #[error("the verilated core could not be created (out of memory)")]
    Create,
    /// A state does not fit the board it is loaded into.
    #[error("{what} is {state} bytes in the state but {board} bytes on this board build (the geometry of the state and of the board differ)")]
    Geometry {
        /// Which RAM.
        what: String,
        /// Its size on the board.
        board: usize,
        /// Its size in the state.
        state: usize,
    },
    /// A backend that is not simulated in-process cannot be a lockstep side here.
    #[error("backend {0} cannot be a lockstep side (use model, rtl or verilator)")]
    NotASide(BackendKind),
    /// The device itself (state file, configuration, transport).
    #[error(transparent)]
    Device(#[from] DeviceError),
}

impl From<Error> for DeviceError {
    fn from(e: Error) -> DeviceError {
        match e {
            Error::Device(d) => d,
            other => DeviceError::Transport {
                what: "verilator backend".into(),
                detail: other.to_string(),
            },
        }
    }
}

/// The in-process backend `kind` on the state file at `state` (model, rtl,
/// lockstep = model + rtl, verilator): one call for every `BackendKind`.
pub fn open_backend(
    kind: BackendKind,
    state: &Path,
) -> Result<Box<dyn hilrig_device::Device>, Error> {
    Ok(match kind {
        BackendKind::Model => Box::new(Model::open(state)?),
        BackendKind::Rtl => Box::new(Rtl::open(state)?),
        BackendKind::Lockstep => Box::new(Lockstep::open(state)?),
        BackendKind::Verilator => Box::new(Verilator::open(state)?),
    })
}

/// The in-process backend `kind` on the device in `state`, powered as a VMM's
/// device is: the model and the RTL keep their data buffers in the file beside the
/// state file (they outlive the process, as a powered device's do; a power cycle
/// removes them), so the next process finds what the last one left unless
/// teardown scrubbed it.
pub fn open_powered_backend(
    kind: BackendKind,
    state: &Path,
) -> Result<Box<dyn hilrig_device::Device>, Error> {
    Ok(match kind {
        BackendKind::Model => {
            let mut m = Model::open(state)?;
            m.keep_buffers_beside_state()?;
            Box::new(m)
        }
        BackendKind::Rtl => {
            let mut r = Rtl::open(state)?;
            r.keep_buffers_beside_state()?;
            Box::new(r)
        }
        other => open_backend(other, state)?,
    })
}

/// The in-process backend `kind` on `nv`, in memory (no state file).
pub fn new_backend(
    kind: BackendKind,
    nv: NvState,
) -> Result<Box<dyn hilrig_device::Device>, Error> {
    Ok(match kind {
        BackendKind::Lockstep => Box::new(Lockstep::new(nv)?),
        other => Box::new(open_side(other, nv)?),
    })
}

/// A backend of `kind` on `nv`, in memory, as a lockstep side.
pub fn open_side(kind: BackendKind, nv: NvState) -> Result<Box<dyn Side>, Error> {
    Ok(match kind {
        BackendKind::Model => Box::new(Model::new(nv)?),
        BackendKind::Rtl => Box::new(Rtl::new(nv)?),
        BackendKind::Verilator => Box::new(Verilator::new(nv)?),
        BackendKind::Lockstep => return Err(Error::NotASide(kind)),
    })
}

/// `a` and `b` in lockstep on the state file at `state`: `a` keeps the file (and
/// answers); `b` starts from the same state in memory.
pub fn open_pair(a: BackendKind, b: BackendKind, state: &Path) -> Result<DynLockstep, Error> {
    let first: Box<dyn Side> = match a {
        BackendKind::Model => Box::new(Model::open(state)?),
        BackendKind::Rtl => Box::new(Rtl::open(state)?),
        BackendKind::Verilator => Box::new(Verilator::open(state)?),
        BackendKind::Lockstep => return Err(Error::NotASide(a)),
    };
    let nv = first.nv_state();
    Ok(Lockstep::pair(first, open_side(b, nv)?))
}

/// `a` and `b` in lockstep on `nv`, in memory.
pub fn pair(a: BackendKind, b: BackendKind, nv: NvState) -> Result<DynLockstep, Error> {
    Ok(Lockstep::pair(open_side(a, nv.clone())?, open_side(b, nv)?))
}

/// Whether `verilator` can be run here; says loudly that `test` is skipped if not.
pub fn available(test: &str) -> bool {
    match build::verilator_version(&BuildOptions::default().verilator) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED {test}: {e}");
            false
        }
    }
}

//! hilrig-flow: the iCE40 tool flow and the MPSSE flash programmer (see README.md).
//!
//! - [`board`]: board definitions (part, package, pins, clock, FTDI programmer).
//! - [`flow`]: verilator lint, yosys, nextpnr-ice40, icepack.
//! - [`mpsse`], [`usb`], [`program`]: SPI flash programming over FTDI MPSSE with rusb;
//!   [`sim`] is a byte-level simulated FT2232H + SPI NOR flash for tests.
//! - [`cli`]: clap subcommands for the `hilrig` binary.
#![deny(missing_docs)]

pub mod board;
pub mod cli;
pub mod flow;
pub mod mpsse;
pub mod program;
pub mod sim;
pub mod usb;

pub use board::{board, boards, Board};
pub use program::{program, ProgError, ProgramOptions, Report};

//! hilrig-board: the reference device on an FPGA dev board (see README.md).
//!
//! - [`proto`]: the host-bridge framed protocol (host side, and the spec);
//! - [`bridge::HostBridge`]: the bridge in rust-hdl (UART, parser, bus master);
//! - [`top::BoardTop`]: device core + bridge + OOB UART + LEDs + power-on reset;
//! - [`backend::Fpga`]: the `fpga` device backend over a byte transport;
//! - [`simboard`]: the board simulated in-process, over a pipe or a PTY;
//! - [`uartsim`]: software UART line ends for simulation drivers (from `hilrig_fpga`).
//!
//! The figures of `hilrig bench board` are in the `hilrig-bench` crate.
#![deny(missing_docs)]

pub mod backend;
pub mod bridge;
pub mod proto;
pub mod simboard;
pub mod top;
/// Software ends of a UART line (moved to `hilrig_fpga`; re-exported).
pub use hilrig_fpga::uartsim;

pub use backend::{Fpga, FpgaOptions, SerialTransport, Transport};
pub use simboard::{BoardCircuit, PtyBoard, RtlBoard, SimBoard, SimPipe};
pub use top::{board_top_verilog, BoardParams, BoardTop};

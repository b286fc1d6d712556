//! hilrig-board: the reference device on an FPGA dev board (see README.md).
#![deny(missing_docs)]

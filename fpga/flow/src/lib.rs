//! hilrig-flow: the iCE40 tool flow and the MPSSE flash programmer (see README.md).
#![deny(missing_docs)]

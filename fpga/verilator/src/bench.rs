//! The Verilator rows of `hilrig bench rtl`.

//! `hilrig bench serve` (filled in below).

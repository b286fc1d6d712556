//! FPGA/MCU boards behind debug probes, through probe-rs: list probes, flash an
//! ELF or raw binary by chip name and probe selector, reset.
//!
//! probe-rs is heavy to compile, so it sits behind the cargo feature `probe-rs`
//! (off by default; `cargo build -p hilrig-rig --features probe-rs`). Without it,
//! every board operation fails with [`RigError::Unsupported`] saying "built
//! without probe-rs support", and `check` reports such a host unhealthy.

use crate::error::RigError;
use std::path::{Path, PathBuf};

/// Message of every board operation in a build without the feature.
pub const NO_PROBE_RS: &str = "built without probe-rs support (rebuild with `--features probe-rs`)";

/// A debug probe attached to this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeInfo {
    /// Probe name.
    pub identifier: String,
    /// USB vendor id.
    pub vid: u16,
    /// USB product id.
    pub pid: u16,
    /// Serial number, if the probe reports one.
    pub serial: Option<String>,
}

impl ProbeInfo {
    /// The selector string `VID:PID[:SERIAL]` (hex ids), as the inventory takes it.
    pub fn selector(&self) -> String {
        match &self.serial {
            Some(s) => format!("{:04x}:{:04x}:{s}", self.vid, self.pid),
            None => format!("{:04x}:{:04x}", self.vid, self.pid),
        }
    }
}

/// One host's board.
#[derive(Debug, Clone)]
pub struct Board {
    /// The host.
    pub host: String,
    /// probe-rs chip name.
    pub chip: String,
    /// Probe selector.
    pub probe: Option<String>,
    /// Default image.
    pub image: Option<PathBuf>,
}

/// List the attached probes.
pub fn list_probes() -> Result<Vec<ProbeInfo>, RigError> {
    imp::list_probes()
}

impl Board {
    /// Attach to the target through the probe and halt-free detach: proves the
    /// probe and the chip answer.
    pub fn probe(&self) -> Result<String, RigError> {
        imp::probe(self)
    }

    /// Flash `image` (ELF if it parses as one, else a raw binary at the start of
    /// flash), verify, and reset the target.
    pub fn flash(&self, image: Option<&Path>) -> Result<(), RigError> {
        let img = image
            .map(Path::to_path_buf)
            .or_else(|| self.image.clone())
            .ok_or_else(|| {
                RigError::driver(
                    &self.host,
                    "board/probe-rs",
                    "no image given and none in the inventory",
                )
            })?;
        imp::flash(self, &img)
    }

    /// Reset the target (run after reset).
    pub fn reset(&self) -> Result<(), RigError> {
        imp::reset(self)
    }
}

#[cfg(not(feature = "probe-rs"))]
mod imp {
    use super::*;

    fn unsupported(host: &str) -> RigError {
        RigError::Unsupported {
            host: host.to_string(),
            driver: "board/probe-rs".into(),
            detail: NO_PROBE_RS.into(),
        }
    }

    pub fn list_probes() -> Result<Vec<ProbeInfo>, RigError> {
        Err(unsupported("-"))
    }
    pub fn probe(b: &Board) -> Result<String, RigError> {
        Err(unsupported(&b.host))
    }
    pub fn flash(b: &Board, _: &Path) -> Result<(), RigError> {
        Err(unsupported(&b.host))
    }
    pub fn reset(b: &Board) -> Result<(), RigError> {
        Err(unsupported(&b.host))
    }
}

#[cfg(feature = "probe-rs")]
mod imp {
    use super::*;
    use probe_rs::config::MemoryRegion;
    use probe_rs::flashing::{BinLoader, BinOptions, ElfLoader, ElfOptions};
    use probe_rs::probe::list::Lister;
    use probe_rs::probe::DebugProbeSelector;
    use probe_rs::{Permissions, Session};

    fn fail(b: &Board, what: &str, e: impl std::fmt::Display) -> RigError {
        RigError::driver(&b.host, "board/probe-rs", format!("{what}: {e}"))
    }

    pub fn list_probes() -> Result<Vec<ProbeInfo>, RigError> {
        Ok(Lister::new()
            .list_all()
            .into_iter()
            .map(|p| ProbeInfo {
                identifier: p.identifier,
                vid: p.vendor_id,
                pid: p.product_id,
                serial: p.serial_number,
            })
            .collect())
    }

    fn session(b: &Board) -> Result<Session, RigError> {
        let lister = Lister::new();
        let probe = match &b.probe {
            Some(sel) => {
                let s: DebugProbeSelector = sel
                    .parse()
                    .map_err(|e| fail(b, &format!("probe selector `{sel}`"), e))?;
                lister
                    .open(s)
                    .map_err(|e| fail(b, &format!("opening probe {sel}"), e))?
            }
            None => {
                let all = lister.list_all();
                match all.as_slice() {
                    [one] => one.open().map_err(|e| fail(b, "opening the probe", e))?,
                    [] => return Err(fail(b, "no debug probe attached", "list is empty")),
                    many => {
                        return Err(fail(
                            b,
                            "several probes attached; set `probe` in the inventory",
                            many.iter()
                                .map(|p| format!("{:04x}:{:04x}", p.vendor_id, p.product_id))
                                .collect::<Vec<_>>()
                                .join(", "),
                        ))
                    }
                }
            }
        };
        probe
            .attach(b.chip.as_str(), Permissions::default())
            .map_err(|e| fail(b, &format!("attaching to chip {}", b.chip), e))
    }

    pub fn probe(b: &Board) -> Result<String, RigError> {
        let s = session(b)?;
        Ok(format!(
            "attached to {} ({} core(s))",
            s.target().name,
            s.list_cores().len()
        ))
    }

    pub fn flash(b: &Board, image: &Path) -> Result<(), RigError> {
        let mut s = session(b)?;
        let head = std::fs::read(image)
            .map_err(|e| fail(b, &format!("reading {}", image.display()), e))?;
        let r = if head.starts_with(b"\x7fELF") {
            probe_rs::flashing::download_file(&mut s, image, ElfLoader(ElfOptions::default()))
        } else {
            // A raw binary goes to the start of the boot flash.
            let base = s.target().memory_map.iter().find_map(|m| match m {
                MemoryRegion::Nvm(n) if n.is_boot_memory() => Some(n.range.start),
                _ => None,
            });
            probe_rs::flashing::download_file(
                &mut s,
                image,
                BinLoader(BinOptions {
                    base_address: base,
                    skip: 0,
                }),
            )
        };
        r.map_err(|e| fail(b, &format!("flashing {}", image.display()), e))?;
        let mut core = s.core(0).map_err(|e| fail(b, "core 0", e))?;
        core.reset().map_err(|e| fail(b, "reset after flashing", e))
    }

    pub fn reset(b: &Board) -> Result<(), RigError> {
        let mut s = session(b)?;
        let mut core = s.core(0).map_err(|e| fail(b, "core 0", e))?;
        core.reset().map_err(|e| fail(b, "reset", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "probe-rs")]
    #[test]
    fn with_the_feature_missing_hardware_is_a_clear_error() {
        // No probe attached in CI: listing works, attaching fails naming the host.
        let probes = list_probes().unwrap();
        let b = Board {
            host: "mcu-1".into(),
            chip: "STM32F411CEUx".into(),
            probe: Some("1209:0001:none".into()),
            image: None,
        };
        if probes.is_empty() {
            let e = b.reset().unwrap_err().to_string();
            assert!(e.contains("mcu-1") && e.contains("board/probe-rs"), "{e}");
        }
    }

    #[cfg(not(feature = "probe-rs"))]
    #[test]
    fn without_the_feature_boards_say_so() {
        let b = Board {
            host: "mcu-1".into(),
            chip: "STM32F411CEUx".into(),
            probe: None,
            image: None,
        };
        let e = b.reset().unwrap_err().to_string();
        assert!(
            e.contains("mcu-1") && e.contains("built without probe-rs support"),
            "{e}"
        );
        assert!(list_probes().unwrap_err().to_string().contains("probe-rs"));
    }

    #[test]
    fn selectors() {
        let p = ProbeInfo {
            identifier: "ST-Link V2".into(),
            vid: 0x0483,
            pid: 0x3748,
            serial: Some("ABC".into()),
        };
        assert_eq!(p.selector(), "0483:3748:ABC");
    }
}

//! Device backends behind one type: the VMM dispatches MMIO to a `Box<dyn Device>`
//! and maps the memory windows the backend offers.

use crate::error::VmmError;
use crate::plan::DirectWindow;
use hilrig_device::regmap::{BUFFER_BASE, BUFFER_SIZE};
use hilrig_device::{Device, DeviceConfig, Model};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Which backend to use (`--device`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The behavioural model (in-process).
    Model,
    /// The rust-hdl RTL driven in-process.
    Rtl,
    /// Model and RTL side by side, compared on every operation.
    Lockstep,
    /// A PCI function bound to vfio-pci, by its sysfs path.
    Vfio(PathBuf),
}

impl FromStr for DeviceSpec {
    type Err = VmmError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "model" => Ok(DeviceSpec::Model),
            "rtl" => Ok(DeviceSpec::Rtl),
            "lockstep" => Ok(DeviceSpec::Lockstep),
            _ => match s.strip_prefix("vfio=") {
                Some(p) if !p.is_empty() => Ok(DeviceSpec::Vfio(PathBuf::from(p))),
                _ => Err(VmmError::Config(format!(
                    "unknown device backend `{s}` (expected model, rtl, lockstep or vfio=<sysfs-path>)"
                ))),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Model => f.write_str("model"),
            DeviceSpec::Rtl => f.write_str("rtl"),
            DeviceSpec::Lockstep => f.write_str("lockstep"),
            DeviceSpec::Vfio(p) => write!(f, "vfio={}", p.display()),
        }
    }
}

/// An opened backend: the device, the host memory it offers for BAR0, and whatever
/// keeps that memory mapped.
pub struct Backend {
    /// Name for reports.
    pub name: String,
    /// MMIO, ROM and reset go here.
    pub device: Box<dyn Device>,
    /// Host memory offered for parts of BAR0 (mapped straight into the guest where
    /// no policy rule needs a trap).
    pub windows: Vec<DirectWindow>,
    /// Keeps the windows' mappings alive.
    pub(crate) keep: Vec<Box<dyn Send>>,
}

impl Backend {
    /// A backend from any device that offers no memory: every page traps.
    pub fn trapping(name: impl Into<String>, device: Box<dyn Device>) -> Backend {
        Backend {
            name: name.into(),
            device,
            windows: Vec::new(),
            keep: Vec::new(),
        }
    }

    /// The behavioural model; its data buffers (pages 4..=15) are offered as a window.
    pub fn model(model: Model) -> Result<Backend, VmmError> {
        let map = match model.buffer_fd() {
            Some(fd) => Some(
                memmap2::MmapOptions::new()
                    .len(BUFFER_SIZE)
                    .map_raw(&fd)
                    .map_err(|e| VmmError::Backend {
                        backend: "model".into(),
                        detail: format!("mapping the data-buffer memfd: {e}"),
                    })?,
            ),
            None => None,
        };
        let mut b = Backend::trapping("model", Box::new(model));
        if let Some(map) = map {
            b.windows.push(DirectWindow {
                bar_offset: u64::from(BUFFER_BASE),
                len: BUFFER_SIZE as u64,
                host_addr: map.as_ptr() as u64,
            });
            b.keep.push(Box::new(map));
        }
        Ok(b)
    }

    /// Keep `thing` alive as long as the backend (e.g. a VFIO mapping).
    pub fn keep(&mut self, thing: Box<dyn Send>) {
        self.keep.push(thing);
    }
}

/// A factory-fresh model (serial number `serial`, in memory only).
pub fn fresh_model(serial: u64) -> Result<Model, VmmError> {
    let nv = hilrig_fw::factory::device(DeviceConfig::default(), serial)
        .map_err(|e| VmmError::Device(e.into()))?;
    Ok(Model::new(nv)?)
}

/// Open the backend `spec`. For the model, `state` names a device state file to use
/// (created factory-fresh if missing); without it the model lives in memory.
pub fn open_backend(spec: &DeviceSpec, state: Option<&Path>) -> Result<Backend, VmmError> {
    match spec {
        DeviceSpec::Model => {
            let model = match state {
                Some(p) if p.exists() => Model::open(p)?,
                Some(p) => {
                    let nv = hilrig_fw::factory::device(DeviceConfig::default(), 1)
                        .map_err(|e| VmmError::Device(e.into()))?;
                    Model::create(p, nv)?
                }
                None => fresh_model(1)?,
            };
            Backend::model(model)
        }
        DeviceSpec::Rtl | DeviceSpec::Lockstep => {
            // The RTL keeps its buffers in block RAM: every BAR0 page traps.
            let name = spec.to_string();
            let dev: Box<dyn Device> = match state {
                Some(p) => {
                    if !p.exists() {
                        let nv = hilrig_fw::factory::device(DeviceConfig::default(), 1)
                            .map_err(|e| VmmError::Device(e.into()))?;
                        drop(Model::create(p, nv)?);
                    }
                    hilrig_fpga::open_backend(&name, p).map_err(|e| VmmError::Backend {
                        backend: name.clone(),
                        detail: e.to_string(),
                    })?
                }
                None => {
                    let nv = hilrig_fw::factory::device(DeviceConfig::default(), 1)
                        .map_err(|e| VmmError::Device(e.into()))?;
                    match spec {
                        DeviceSpec::Rtl => Box::new(hilrig_fpga::Rtl::new(nv)?),
                        _ => Box::new(hilrig_fpga::Lockstep::new(nv)?),
                    }
                }
            };
            Ok(Backend::trapping(name, dev))
        }
        DeviceSpec::Vfio(path) => crate::vfio::open(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_specs() {
        assert_eq!("model".parse::<DeviceSpec>().ok(), Some(DeviceSpec::Model));
        assert_eq!("rtl".parse::<DeviceSpec>().ok(), Some(DeviceSpec::Rtl));
        assert_eq!(
            "vfio=/sys/bus/pci/devices/0000:01:00.0"
                .parse::<DeviceSpec>()
                .ok(),
            Some(DeviceSpec::Vfio("/sys/bus/pci/devices/0000:01:00.0".into()))
        );
        assert!("vfio=".parse::<DeviceSpec>().is_err());
        assert!("fpga".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn rtl_and_lockstep_open_and_trap_everything() {
        for s in [DeviceSpec::Rtl, DeviceSpec::Lockstep] {
            let mut b = open_backend(&s, None).expect("rtl backend");
            assert!(
                b.windows.is_empty(),
                "no direct windows: buffers are block RAM"
            );
            assert_eq!(
                b.device.read32(hilrig_device::Reg::Id.offset()).unwrap(),
                hilrig_device::regmap::DEVICE_ID_VALUE
            );
        }
    }

    #[test]
    fn model_offers_its_buffers() {
        let b = open_backend(&DeviceSpec::Model, None).expect("model");
        assert_eq!(b.windows.len(), 1);
        assert_eq!(b.windows[0].bar_offset, 0x4000);
        assert_eq!(b.windows[0].len, 0xc000);
        assert!(b.device.rom_size() > 0);
    }
}

//! What the guest sees of the device: PCI configuration space ([`pci`]), which BAR0
//! pages are mapped and which trap ([`plan`]), the device backends behind one type
//! ([`backend`], [`vfio`]) and the patchable handler in front of them ([`handled`]).

pub mod backend;
pub mod handled;
pub mod pci;
pub mod plan;
pub mod vfio;

use crate::error::VmmError;
use backend::{fresh_model, Backend};
use hilrig_device::{Device, DeviceConfig, Model};
use std::path::Path;

pub use hilrig_vmm_api::spec::{DeviceSpec, FPGA_BAUD};

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
        DeviceSpec::Verilator => Err(VmmError::Backend {
            backend: spec.to_string(),
            detail: "the verilator backend is not built into this VMM yet".into(),
        }),
        DeviceSpec::Vfio(path) => vfio::open(path),
        DeviceSpec::Fpga { port, oob, baud } => {
            // The board keeps its nonvolatile state itself: no state file here.
            if let Some(p) = state {
                return Err(VmmError::Config(format!(
                    "--device-state {} does not apply to the fpga backend (the board keeps its own state)",
                    p.display()
                )));
            }
            let mut dev = hilrig_board::backend::Fpga::open_serial(port, *baud)?;
            if let Some(o) = oob {
                dev.set_oob(Box::new(hilrig_board::backend::SerialTransport::open(
                    o, *baud,
                )?));
            }
            // Buffers live in the board's block RAM: every BAR0 page traps.
            Ok(Backend::trapping(spec.to_string(), Box::new(dev)))
        }
    }
}

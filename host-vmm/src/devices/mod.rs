//! What the guest sees of the device: PCI configuration space ([`pci`]), which BAR0
//! pages are mapped and which trap ([`plan`]), the device backends behind one type
//! ([`backend`], [`vfio`]) and the patchable handler in front of them ([`handled`]).
//! Device description files are [`crate::policy::desc`] (re-exported as [`desc`]).

pub mod backend;
/// Device description files (moved to [`crate::policy::desc`]; re-exported).
pub use crate::policy::desc;
pub mod handled;
pub mod irq;
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
///
/// A state file is held exclusively for the backend's whole life
/// ([`hilrig_device::state::StateLock`], kept in the returned [`Backend`]): a second
/// VMM, a rig action or an OOB physical reset on the same file is refused with an
/// error naming the file and this VMM's pid, before it reads or writes anything.
pub fn open_backend(spec: &DeviceSpec, state: Option<&Path>) -> Result<Backend, VmmError> {
    let lock = match (spec, state) {
        (
            DeviceSpec::Model | DeviceSpec::Rtl | DeviceSpec::Lockstep | DeviceSpec::Verilator,
            Some(p),
        ) => Some(
            hilrig_device::state::StateLock::acquire(p)
                .map_err(hilrig_device::DeviceError::from)?,
        ),
        _ => None,
    };
    let mut backend = open_unlocked(spec, state)?;
    if let Some(l) = lock {
        backend.keep.push(Box::new(l));
    }
    Ok(backend)
}

fn open_unlocked(spec: &DeviceSpec, state: Option<&Path>) -> Result<Backend, VmmError> {
    match spec {
        DeviceSpec::Model => {
            let mut model = match state {
                Some(p) if p.exists() => Model::open(p)?,
                Some(p) => {
                    let nv = hilrig_fw::factory::device(DeviceConfig::default(), 1)
                        .map_err(|e| VmmError::Device(e.into()))?;
                    Model::create(p, nv)?
                }
                None => fresh_model(1)?,
            };
            // The device stays powered between VMM processes: its data buffers are
            // where the next tenant finds them, unless teardown scrubs them.
            model.keep_buffers_beside_state()?;
            Backend::model(model)
        }
        DeviceSpec::Rtl | DeviceSpec::Lockstep | DeviceSpec::Verilator => {
            // The RTL (simulated or verilated) keeps its buffers in block RAM (the
            // rtl backend also in the file beside the state): every BAR0 page traps.
            let name = spec.to_string();
            let kind = spec
                .backend_kind()
                .ok_or_else(|| VmmError::Config(format!("{name} is not an in-process backend")))?;
            let backend_err = |e: hilrig_verilator::Error| VmmError::Backend {
                backend: name.clone(),
                detail: e.to_string(),
            };
            let dev: Box<dyn Device> = match state {
                Some(p) => {
                    if !p.exists() {
                        let nv = hilrig_fw::factory::device(DeviceConfig::default(), 1)
                            .map_err(|e| VmmError::Device(e.into()))?;
                        drop(Model::create(p, nv)?);
                    }
                    // Powered: the rtl backend's data buffers outlive the
                    // process in `.NAME.buffers`, as the model's do.
                    hilrig_verilator::open_powered_backend(kind, p).map_err(backend_err)?
                }
                None => {
                    let nv = hilrig_fw::factory::device(DeviceConfig::default(), 1)
                        .map_err(|e| VmmError::Device(e.into()))?;
                    hilrig_verilator::new_backend(kind, nv).map_err(backend_err)?
                }
            };
            Ok(Backend::trapping(name, dev))
        }
        DeviceSpec::Vfio { path, desc } => {
            let desc = desc
                .as_deref()
                .map(crate::policy::desc::DeviceDesc::load)
                .transpose()
                .map_err(|e| VmmError::Config(e.to_string()))?;
            vfio::open(path, desc.as_ref())
        }
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

//! hilrig-fw: firmware images for the reference device.
//!
//! - [`vbios`]: PCI expansion-ROM images (builder and strict parser);
//! - [`image`]: signed flash images for the FIRMWARE and CONFIG regions;
//! - [`bundle`]: signed (optionally encrypted) patch bundles for live patching;
//! - [`keys`]: Ed25519 and X25519 key files;
//! - [`factory`]: the contents a factory-fresh reference device ships with.
#![deny(missing_docs)]

pub mod bundle;
pub mod image;
pub mod keys;
pub mod vbios;

/// Factory contents of a reference device.
pub mod factory {
    use hilrig_device::state::{DeviceConfig, NvState, StateError};
    use hilrig_device::Region;

    /// The payload of the factory VBIOS.
    pub const FACTORY_VBIOS_PAYLOAD: &[u8] = b"hilrig reference VBIOS 1.0\0";

    /// The factory VBIOS image (revision 1).
    pub fn vbios() -> Result<Vec<u8>, super::vbios::RomError> {
        super::vbios::build(&super::vbios::VbiosSpec::reference(
            1,
            FACTORY_VBIOS_PAYLOAD,
        ))
    }

    /// A factory-fresh device: the factory VBIOS programmed at manufacture (not an
    /// attempt: counting starts when the device ships), the rest erased.
    pub fn device(config: DeviceConfig, serial: u64) -> Result<NvState, StateError> {
        let mut nv = NvState::factory(config, serial)?;
        let rom = vbios().map_err(|e| StateError::Config(format!("factory VBIOS: {e}")))?;
        let flash = &mut nv.flash[Region::Vbios as usize];
        if rom.len() > flash.len() {
            return Err(StateError::Config(format!(
                "the factory VBIOS ({} bytes) does not fit the {}-byte vbios region",
                rom.len(),
                flash.len()
            )));
        }
        flash[..rom.len()].copy_from_slice(&rom);
        Ok(nv)
    }
}

//! Measured VBIOS: before a guest gets the device, the VMM reads the device's whole
//! expansion ROM, validates it as a PCI expansion ROM, hashes it (SHA-256 of the whole
//! ROM window = the VBIOS flash region, the same hash the OOB port reports for the
//! vbios region) and looks the hash up in the catalog of known-good images: the
//! built-in factory VBIOS, plus the counters service's catalog when one is given. A
//! ROM that is invalid or not in the catalog is refused, unless the operator runs
//! anyway (`--allow-unknown-vbios`), which is recorded in the run's output.

use hilrig_device::Device;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// Where known-good VBIOS hashes come from.
#[derive(Debug, Clone, Default)]
pub struct CatalogSpec {
    /// The counters service's database (SQLite path or postgresql:// URL) and MAC key.
    pub counters: Option<(String, PathBuf)>,
}

/// The measurement of a device's VBIOS.
pub type Measurement = hilrig_vmm_api::VbiosMeasurement;

/// Why a device's VBIOS could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The ROM BAR's size is unusable.
    #[error("expansion ROM size {0} is not usable (1 byte to 16 MiB)")]
    RomSize(u64),
    /// Reading the ROM failed.
    #[error("reading the expansion ROM: {0}")]
    Read(hilrig_device::DeviceError),
    /// The counters service's catalog could not be read.
    #[error("the counters service's catalog: {0}")]
    Catalog(#[from] hilrig_counters::Error),
}

/// The hash of the factory VBIOS in a ROM window of `size` bytes (erased padding).
pub fn factory_hash(size: u64) -> Option<String> {
    let mut rom = hilrig_fw::factory::vbios().ok()?;
    if rom.len() as u64 > size {
        return None;
    }
    rom.resize(size as usize, 0xff);
    Some(hex::encode(Sha256::digest(&rom)))
}

/// Measure `dev`'s VBIOS and look it up in `catalog`.
pub fn measure(dev: &mut dyn Device, catalog: &CatalogSpec) -> Result<Measurement, MeasureError> {
    let size = dev.rom_size();
    if size == 0 || size > 16 << 20 {
        return Err(MeasureError::RomSize(size));
    }
    let mut rom = vec![0u8; size as usize];
    for (i, chunk) in rom.chunks_mut(4096).enumerate() {
        dev.rom_read(i as u64 * 4096, chunk)
            .map_err(MeasureError::Read)?;
    }
    let sha256 = hex::encode(Sha256::digest(&rom));
    let (invalid, revision) = match hilrig_fw::vbios::parse(&rom) {
        Ok(images) => (None, images.first().map(|i| i.revision)),
        Err(e) => (Some(e.to_string()), None),
    };
    let mut known_as = (factory_hash(size).as_deref() == Some(sha256.as_str()))
        .then(|| "builtin factory VBIOS".to_string());
    if known_as.is_none() {
        if let Some((db, key)) = &catalog.counters {
            let key = hilrig_counters::mac::Key::load(key)?;
            let mut svc = hilrig_counters::Service::open(db, key)?;
            let list = svc.catalog_list()?;
            known_as = list
                .iter()
                .find(|c| {
                    c.intact && c.region == hilrig_device::Region::Vbios && c.sha256 == sha256
                })
                .map(|c| {
                    format!(
                        "counters catalog {db} (version {:?}, approved by {})",
                        c.version, c.approved_by
                    )
                });
        }
    }
    Ok(Measurement {
        size,
        sha256,
        invalid,
        revision,
        known_as,
        overridden: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hilrig_device::{DeviceConfig, Model, Region};

    #[test]
    fn factory_vbios_is_known_and_an_overwritten_one_is_not() {
        let nv = hilrig_fw::factory::device(DeviceConfig::default(), 1).unwrap();
        let mut m = Model::new(nv).unwrap();
        let meas = measure(&mut m, &CatalogSpec::default()).unwrap();
        assert!(meas.acceptable(), "{}", meas.describe());
        assert_eq!(meas.revision, Some(1));
        // An operator flashes another (valid) VBIOS: valid but unknown.
        let rom =
            hilrig_fw::vbios::build(&hilrig_fw::vbios::VbiosSpec::reference(9, b"evil")).unwrap();
        hilrig_device::model::ops::flash_region(&mut m, Region::Vbios, &rom).unwrap();
        let meas = measure(&mut m, &CatalogSpec::default()).unwrap();
        assert!(
            meas.invalid.is_none() && meas.known_as.is_none(),
            "{}",
            meas.describe()
        );
        assert!(!meas.acceptable());
        // Garbage: invalid, named.
        hilrig_device::model::ops::flash_region(&mut m, Region::Vbios, &[0u8; 64]).unwrap();
        let meas = measure(&mut m, &CatalogSpec::default()).unwrap();
        assert!(
            meas.invalid.as_deref().unwrap().contains("signature"),
            "{}",
            meas.describe()
        );
        // The measured hash is the OOB region hash.
        let h = match hilrig_device::oob::request_device(
            &mut m,
            &hilrig_device::oob::Request::ReadHash(Region::Vbios),
        )
        .unwrap()
        {
            hilrig_device::oob::Response::Hash { sha256, .. } => hex::encode(sha256),
            other => panic!("{other:?}"),
        };
        assert_eq!(meas.sha256, h);
    }
}

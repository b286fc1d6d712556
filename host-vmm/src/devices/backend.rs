//! Device backends behind one type: the VMM dispatches MMIO to a `Box<dyn Device>`
//! and maps the memory windows the backend offers.

use crate::devices::plan::DirectWindow;
use crate::error::VmmError;
use hilrig_device::regmap::{BUFFER_BASE, BUFFER_SIZE};
use hilrig_device::{Device, DeviceConfig, Model};

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
    /// Where guest RAM is mapped for the device's DMA (VFIO: the IOMMU); None for
    /// backends that do not DMA.
    pub dma: Option<std::sync::Arc<crate::devices::vfio::GuestDma>>,
    /// The identity the guest sees in config space when it is not the reference
    /// device's: (vendor, device, class code << 8 | revision) read from the real
    /// device.
    pub pci_identity: Option<(u16, u16, u32)>,
    /// The device's interrupt line (VFIO INTx; a simulated one in tests), wired to
    /// the guest's IOAPIC when the VM has an in-kernel irqchip; None: it has none.
    pub intx: Option<std::sync::Arc<dyn crate::devices::irq::IntxSource>>,
}

impl Backend {
    /// A backend from any device that offers no memory: every page traps.
    pub fn trapping(name: impl Into<String>, device: Box<dyn Device>) -> Backend {
        Backend {
            name: name.into(),
            device,
            windows: Vec::new(),
            keep: Vec::new(),
            dma: None,
            pci_identity: None,
            intx: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{open_backend, DeviceSpec, FPGA_BAUD};

    #[test]
    fn parse_specs() {
        assert_eq!("model".parse::<DeviceSpec>().ok(), Some(DeviceSpec::Model));
        assert_eq!("rtl".parse::<DeviceSpec>().ok(), Some(DeviceSpec::Rtl));
        assert_eq!(
            "vfio=/sys/bus/pci/devices/0000:01:00.0"
                .parse::<DeviceSpec>()
                .ok(),
            Some(DeviceSpec::Vfio {
                path: "/sys/bus/pci/devices/0000:01:00.0".into(),
                desc: None
            })
        );
        assert!("vfio=".parse::<DeviceSpec>().is_err());
        for (text, port, oob, baud) in [
            ("fpga=/dev/ttyUSB1", "/dev/ttyUSB1", None, FPGA_BAUD),
            (
                "fpga=/dev/ttyUSB1,oob=/dev/ttyUSB2,baud=1000000",
                "/dev/ttyUSB1",
                Some("/dev/ttyUSB2"),
                1_000_000,
            ),
        ] {
            let spec = text.parse::<DeviceSpec>().unwrap();
            assert_eq!(
                spec,
                DeviceSpec::Fpga {
                    port: port.into(),
                    oob: oob.map(String::from),
                    baud
                }
            );
            assert_eq!(spec.to_string(), text, "round trip");
        }
        for bad in [
            "fpga=",
            "fpga=/dev/x,baud=0",
            "fpga=/dev/x,baud=fast",
            "fpga=/dev/x,speed=1",
            "fpga=/dev/x,oob=",
        ] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains("fpga="), "{bad}: {e}");
        }
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

//! VFIO backend: a PCI function bound to vfio-pci (a real reference device, or the
//! FPGA board's PCIe endpoint) driven through vfio-ioctls.
//!
//! - container (`/dev/vfio/vfio`, type-1 IOMMU) + the function's group + device fd;
//! - BAR0 (region 0) must be 64 KiB; its mmap'able areas (the whole region, or the
//!   sparse-mmap capability's areas) are offered as [`DirectWindow`]s, so pages no
//!   policy rule touches are mapped straight into the guest;
//! - trapped accesses are forwarded with `pread`/`pwrite` of exactly the guest's
//!   width at the region offset (no splitting: the device sees the guest's access);
//! - the expansion ROM (region 6) serves the ROM BAR; config space (region 7) is read
//!   to check IDs and to turn on memory decode;
//! - [`Device::reset`] issues `VFIO_DEVICE_RESET` (FLR or whatever reset the kernel
//!   uses for the function) and reports a failure as an error.
//!
//! The reference device does not DMA, so guest memory is not mapped into the IOMMU.

use crate::devices::backend::Backend;
use crate::devices::plan::DirectWindow;
use crate::error::VmmError;
use hilrig_device::device::check_access;
use hilrig_device::regmap::{BAR0_SIZE, PAGE_SIZE, PCI_DEVICE_ID, PCI_VENDOR_ID};
use hilrig_device::{Device, DeviceError, ResetKind};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_ROM_REGION_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps, VfioRegionInfoCap};

/// `VFIO_DEVICE_RESET` = `_IO(VFIO_TYPE, VFIO_BASE + 11)`.
const VFIO_DEVICE_RESET: libc::c_ulong =
    ((VFIO_TYPE as libc::c_ulong) << 8) | (VFIO_BASE as libc::c_ulong + 11);

/// One mmap'able area of a region: offset and length within the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Area {
    /// Offset within the region.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

/// Which parts of a region may be mmap'ed: none without the MMAP flag; with a
/// sparse-mmap capability only its areas (clipped to the region, page-aligned
/// inwards, empty ones dropped); otherwise the whole region.
pub fn mappable_areas(flags: u32, size: u64, caps: &[VfioRegionInfoCap]) -> Vec<Area> {
    if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || size == 0 {
        return Vec::new();
    }
    let sparse = caps.iter().find_map(|c| match c {
        VfioRegionInfoCap::SparseMmap(s) => Some(s),
        _ => None,
    });
    let raw: Vec<Area> = match sparse {
        Some(s) => s
            .areas
            .iter()
            .map(|a| Area {
                offset: a.offset,
                len: a.size,
            })
            .collect(),
        None => vec![Area {
            offset: 0,
            len: size,
        }],
    };
    raw.into_iter()
        .filter_map(|a| {
            let start = a.offset.checked_next_multiple_of(PAGE_SIZE)?;
            let end = a.offset.checked_add(a.len)?.min(size) / PAGE_SIZE * PAGE_SIZE;
            (end > start).then_some(Area {
                offset: start,
                len: end - start,
            })
        })
        .collect()
}

/// A VFIO-backed device.
pub struct VfioBackend {
    device: Arc<VfioDevice>,
    _container: Arc<VfioContainer>,
    bar0_offset: u64,
    rom_offset: u64,
    rom_size: u64,
    name: String,
}

fn verr(what: impl Into<String>) -> impl FnOnce(String) -> VmmError {
    let what = what.into();
    move |detail| VmmError::Vfio { what, detail }
}

impl VfioBackend {
    fn transport(&self, detail: String) -> DeviceError {
        DeviceError::Transport {
            what: format!("vfio {}", self.name),
            detail,
        }
    }

    fn pread(&self, buf: &mut [u8], at: u64) -> Result<(), DeviceError> {
        // SAFETY: reads into our own buffer of the given length.
        let n = unsafe {
            libc::pread(
                self.device.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                at as libc::off_t,
            )
        };
        if n != buf.len() as isize {
            return Err(self.transport(format!(
                "pread of {} bytes at {at:#x}: {}",
                buf.len(),
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    fn pwrite(&self, buf: &[u8], at: u64) -> Result<(), DeviceError> {
        // SAFETY: writes from our own buffer of the given length.
        let n = unsafe {
            libc::pwrite(
                self.device.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                at as libc::off_t,
            )
        };
        if n != buf.len() as isize {
            return Err(self.transport(format!(
                "pwrite of {} bytes at {at:#x}: {}",
                buf.len(),
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// `VFIO_DEVICE_RESET`; an error if the kernel refuses (no reset method, busy).
    pub fn flr(&self) -> Result<(), DeviceError> {
        // SAFETY: an argument-less ioctl on our device fd.
        let r = unsafe { libc::ioctl(self.device.as_raw_fd(), VFIO_DEVICE_RESET as _) };
        if r != 0 {
            return Err(self.transport(format!(
                "VFIO_DEVICE_RESET failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}

impl Device for VfioBackend {
    fn read_word(&mut self, word: u32, _mask: u8) -> Result<u32, DeviceError> {
        let mut b = [0u8; 4];
        self.pread(&mut b, self.bar0_offset + u64::from(word))?;
        Ok(u32::from_le_bytes(b))
    }

    fn write_word(&mut self, word: u32, value: u32, mask: u8) -> Result<(), DeviceError> {
        let b = value.to_le_bytes();
        if mask == 0xf {
            return self.pwrite(&b, self.bar0_offset + u64::from(word));
        }
        for (i, byte) in b.iter().enumerate() {
            if mask & (1 << i) != 0 {
                self.pwrite(&[*byte], self.bar0_offset + u64::from(word) + i as u64)?;
            }
        }
        Ok(())
    }

    /// Forwarded with the guest's exact width.
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        check_access(offset, data.len())?;
        self.pread(data, self.bar0_offset + offset)
    }

    /// Forwarded with the guest's exact width.
    fn mmio_write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        check_access(offset, data.len())?;
        self.pwrite(data, self.bar0_offset + offset)
    }

    fn rom_size(&self) -> u64 {
        self.rom_size
    }

    fn rom_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        hilrig_device::device::check_rom(offset, data.len(), self.rom_size)?;
        self.pread(data, self.rom_offset + offset)
    }

    fn reset(&mut self, kind: ResetKind) -> Result<(), DeviceError> {
        match kind {
            ResetKind::Flr | ResetKind::Reset => self.flr(),
            ResetKind::PowerCycle => {
                Err(self.transport("a power cycle needs the rig's power driver, not VFIO".into()))
            }
        }
    }

    fn oob(&mut self, _request: &[u8]) -> Result<Vec<u8>, DeviceError> {
        Err(self.transport(
            "the OOB port is the device's UART, reached by the rig, not through VFIO".into(),
        ))
    }
}

/// Open the PCI function at `sysfs` (e.g. `/sys/bus/pci/devices/0000:01:00.0`,
/// bound to vfio-pci) as a backend.
pub fn open(sysfs: &Path) -> Result<Backend, VmmError> {
    let name = sysfs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| sysfs.display().to_string());
    if !sysfs.join("iommu_group").exists() {
        return Err(VmmError::Vfio {
            what: format!("opening {}", sysfs.display()),
            detail: "no iommu_group link: not a PCI function with an IOMMU (see README: binding to vfio-pci)".into(),
        });
    }
    let container = Arc::new(
        VfioContainer::new(None).map_err(|e| verr("opening /dev/vfio/vfio")(e.to_string()))?,
    );
    let ops: Arc<dyn VfioOps> = container.clone();
    let device = Arc::new(VfioDevice::new(sysfs, ops, false).map_err(|e| {
        verr(format!("opening {} through its group", sysfs.display()))(e.to_string())
    })?);
    let bar0 = VFIO_PCI_BAR0_REGION_INDEX;
    let bar0_size = device.get_region_size(bar0);
    if bar0_size != BAR0_SIZE {
        return Err(VmmError::Vfio {
            what: format!("{name} BAR0"),
            detail: format!(
                "is {bar0_size:#x} bytes; the reference device's BAR0 is {BAR0_SIZE:#x}"
            ),
        });
    }
    let be = VfioBackend {
        device: device.clone(),
        _container: container,
        bar0_offset: device.get_region_offset(bar0),
        rom_offset: device.get_region_offset(VFIO_PCI_ROM_REGION_INDEX),
        rom_size: device.get_region_size(VFIO_PCI_ROM_REGION_INDEX),
        name: name.clone(),
    };
    // Config space: check IDs (warn only: the guest sees the emulated header) and
    // turn on memory decode so BAR accesses reach the device.
    let cfg = device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX);
    let mut id = [0u8; 4];
    be.pread(&mut id, cfg)?;
    let ids = u32::from_le_bytes(id);
    let want = u32::from(PCI_DEVICE_ID) << 16 | u32::from(PCI_VENDOR_ID);
    if ids != want {
        tracing::warn!("{name}: IDs {ids:#010x}, the reference device is {want:#010x}");
    }
    let mut cmd = [0u8; 2];
    be.pread(&mut cmd, cfg + 4)?;
    let cmd = u16::from_le_bytes(cmd) | 0x2;
    be.pwrite(&cmd.to_le_bytes(), cfg + 4)?;

    let areas = mappable_areas(
        device.get_region_flags(bar0),
        bar0_size,
        &device.get_region_caps(bar0),
    );
    let mut maps = Vec::new();
    let mut windows = Vec::new();
    for a in areas {
        let map = memmap2::MmapOptions::new()
            .offset(be.bar0_offset + a.offset)
            .len(a.len as usize)
            .map_raw(be.device.as_raw_fd())
            .map_err(|e| VmmError::Vfio {
                what: format!("mmap of {name} BAR0+{:#x} ({:#x} bytes)", a.offset, a.len),
                detail: e.to_string(),
            })?;
        windows.push(DirectWindow {
            bar_offset: a.offset,
            len: a.len,
            host_addr: map.as_ptr() as u64,
        });
        maps.push(map);
    }
    let mut b = Backend::trapping(format!("vfio {name}"), Box::new(be));
    b.windows = windows;
    for m in maps {
        b.keep(Box::new(m));
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_ioctls::{VfioRegionInfoCapSparseMmap, VfioRegionSparseMmapArea};

    const MMAP: u32 = VFIO_REGION_INFO_FLAG_MMAP;

    #[test]
    fn whole_region_without_sparse_cap() {
        assert_eq!(
            mappable_areas(MMAP | 3, 0x10000, &[]),
            vec![Area {
                offset: 0,
                len: 0x10000
            }]
        );
    }

    #[test]
    fn nothing_without_mmap_flag() {
        assert!(mappable_areas(3, 0x10000, &[]).is_empty());
        assert!(mappable_areas(MMAP, 0, &[]).is_empty());
    }

    #[test]
    fn sparse_areas_clipped_and_aligned() {
        let caps = [VfioRegionInfoCap::SparseMmap(VfioRegionInfoCapSparseMmap {
            areas: vec![
                VfioRegionSparseMmapArea {
                    offset: 0x4000,
                    size: 0xc000,
                },
                // Not page-aligned: shrinks to whole pages inside it.
                VfioRegionSparseMmapArea {
                    offset: 0x800,
                    size: 0x1800,
                },
                // Past the region's end: clipped.
                VfioRegionSparseMmapArea {
                    offset: 0xf000,
                    size: 0x4000,
                },
                VfioRegionSparseMmapArea { offset: 0, size: 0 },
            ],
        })];
        assert_eq!(
            mappable_areas(MMAP, 0x10000, &caps),
            vec![
                Area {
                    offset: 0x4000,
                    len: 0xc000
                },
                Area {
                    offset: 0x1000,
                    len: 0x1000
                },
                Area {
                    offset: 0xf000,
                    len: 0x1000
                },
            ]
        );
    }

    #[test]
    fn sparse_areas_feed_the_page_plan() {
        use crate::devices::plan::{PagePlan, TrapSet};
        let caps = [VfioRegionInfoCap::SparseMmap(VfioRegionInfoCapSparseMmap {
            areas: vec![VfioRegionSparseMmapArea {
                offset: 0x4000,
                size: 0xc000,
            }],
        })];
        let windows: Vec<DirectWindow> = mappable_areas(MMAP, 0x10000, &caps)
            .into_iter()
            .map(|a| DirectWindow {
                bar_offset: a.offset,
                len: a.len,
                host_addr: 0x7000_0000_0000 + a.offset,
            })
            .collect();
        let plan = PagePlan::decide(TrapSet::from_pages([0, 5]), &windows);
        assert!((0..4).all(|p| plan.traps(p)));
        assert!(plan.traps(5));
        assert_eq!(plan.direct_pages(), 11);
    }

    #[test]
    fn reset_ioctl_number() {
        assert_eq!(VFIO_DEVICE_RESET, 0x3b6f);
    }

    #[test]
    fn missing_device_is_a_clear_error() {
        let e = open(Path::new("/sys/bus/pci/devices/0000:ff:1f.7"))
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("iommu_group")));
    }
}

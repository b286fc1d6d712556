//! PCI configuration space behind configuration mechanism #1 (ports 0xCF8/0xCFC):
//! a host bridge at 00:00.0 and the reference device at 00:01.0.
//!
//! The device function has a type-0 header with the register table's IDs and class,
//! a command register (memory decode and bus master are writable; with memory decode
//! off BAR0 and the ROM read all-ones and drop writes), BAR0 (32-bit, non-prefetchable,
//! 64 KiB, the usual sizing protocol) and an expansion-ROM BAR serving the VBIOS.

use hilrig_device::regmap::{BAR0_SIZE, PCI_CLASS_CODE, PCI_DEVICE_ID, PCI_VENDOR_ID};

pub use hilrig_guest::abi::DEVICE_SLOT;
/// Host bridge IDs (Intel Q35 DRAM controller).
pub const BRIDGE_VENDOR_ID: u16 = 0x8086;
/// Host bridge device ID.
pub const BRIDGE_DEVICE_ID: u16 = 0x29c0;
/// Revision ID of the reference device function.
pub const REVISION: u8 = 1;

const CMD_MEM: u32 = 1 << 1;
const CMD_WRITABLE: u32 = (1 << 1) | (1 << 2) | (1 << 10);
const ROM_ENABLE: u32 = 1;

/// Where BAR0 and the ROM decode now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decode {
    /// BAR0 base, if memory decode is on.
    pub bar0: Option<u64>,
    /// ROM base, if memory decode and the ROM enable bit are on.
    pub rom: Option<u64>,
}

/// What an MMIO address belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// BAR0 at this offset.
    Bar0(u64),
    /// The expansion ROM at this offset.
    Rom(u64),
    /// A BAR that is programmed here but not decoding (memory decode or ROM enable
    /// off): reads all-ones, writes dropped.
    Disabled,
    /// Nothing claims it.
    Unclaimed,
}

/// The configuration space of bus 0.
#[derive(Debug, Clone)]
pub struct PciBus {
    addr: u32,
    command: u32,
    bar0: u32,
    rom: u32,
    rom_window: u32,
    rom_size: u64,
    int_line: u32,
    /// Interrupt pin (config byte 0x3d: 0 none, 1 INTA); read-only.
    int_pin: u8,
    /// Device:vendor ID the guest reads (the reference device's unless a
    /// passed-through device's description gives its own).
    ids: u32,
    /// Class code and revision (config dword 2).
    class_rev: u32,
    /// The function was removed from the bus (detach): its config space reads all
    /// ones, writes are dropped, and its BARs decode nothing.
    detached: bool,
}

impl PciBus {
    /// A bus whose device has a ROM of `rom_size` bytes (0: no ROM BAR).
    pub fn new(rom_size: u64) -> PciBus {
        let rom_window = if rom_size == 0 {
            0
        } else {
            rom_size.next_power_of_two().clamp(2048, 1 << 31) as u32
        };
        PciBus {
            addr: 0,
            command: 0,
            bar0: 0,
            rom: 0,
            rom_window,
            rom_size,
            int_line: 0,
            int_pin: 0,
            ids: u32::from(PCI_DEVICE_ID) << 16 | u32::from(PCI_VENDOR_ID),
            class_rev: (PCI_CLASS_CODE << 8) | u32::from(REVISION),
            detached: false,
        }
    }

    /// Remove the device function from the bus (a detach, the guest running on):
    /// from now on its configuration space reads all ones (vendor ID 0xffff: no
    /// function there), writes to it are dropped, and its BAR0 and ROM decode
    /// nothing (an access where they were reads all ones and drops writes, as a
    /// master abort does; it never reaches the device). There is no way back.
    pub fn detach(&mut self) {
        self.detached = true;
        self.command = 0;
    }

    /// Whether the device function was removed ([`PciBus::detach`]).
    pub fn detached(&self) -> bool {
        self.detached
    }

    /// Show the guest another device's identity (a passed-through device that is
    /// not the reference device): vendor, device, and config dword 2 (class code
    /// and revision) as the real device has them.
    pub fn set_identity(&mut self, vendor: u16, device: u16, class_rev: u32) {
        self.ids = u32::from(device) << 16 | u32::from(vendor);
        self.class_rev = class_rev;
    }

    /// Give the device an interrupt: pin `pin` (1 = INTA) routed to the IOAPIC
    /// input `line` (config bytes 0x3d and 0x3c, as firmware would set them).
    pub fn set_interrupt(&mut self, pin: u8, line: u8) {
        self.int_pin = pin;
        self.int_line = u32::from(line);
    }

    /// Size of the ROM BAR window (a power of two, at least 2 KiB; 0 if none).
    pub fn rom_window(&self) -> u64 {
        u64::from(self.rom_window)
    }

    /// Size of the ROM image itself.
    pub fn rom_size(&self) -> u64 {
        self.rom_size
    }

    /// Firmware-style setup: BAR0 and the ROM BAR at the given addresses, memory
    /// decode on, the ROM left disabled.
    pub fn assign(&mut self, bar0: u64, rom: u64) {
        self.bar0 = (bar0 as u32) & bar0_mask();
        self.rom = (rom as u32) & self.rom_mask();
        self.command |= CMD_MEM;
    }

    fn rom_mask(&self) -> u32 {
        if self.rom_window == 0 {
            0
        } else {
            !(self.rom_window - 1) & 0xffff_f800
        }
    }

    /// Current decode state.
    pub fn decode(&self) -> Decode {
        let mem = self.command & CMD_MEM != 0 && !self.detached;
        Decode {
            bar0: mem.then_some(u64::from(self.bar0)),
            rom: (mem && self.rom & ROM_ENABLE != 0 && self.rom_window != 0)
                .then_some(u64::from(self.rom & self.rom_mask())),
        }
    }

    /// Which BAR an MMIO address falls in.
    pub fn route(&self, addr: u64) -> Route {
        let inside = |base: u64, size: u64| addr >= base && addr < base + size;
        let bar0 = u64::from(self.bar0);
        let rom = u64::from(self.rom & self.rom_mask());
        let d = self.decode();
        if let Some(b) = d.bar0 {
            if inside(b, BAR0_SIZE) {
                return Route::Bar0(addr - b);
            }
        }
        if let Some(r) = d.rom {
            if inside(r, self.rom_window()) {
                return Route::Rom(addr - r);
            }
        }
        if (d.bar0.is_none() && bar0 != 0 && inside(bar0, BAR0_SIZE))
            || (d.rom.is_none() && rom != 0 && inside(rom, self.rom_window()))
        {
            return Route::Disabled;
        }
        Route::Unclaimed
    }

    /// Port read (`port` in 0xCF8..=0xCFF) of `data.len()` bytes.
    pub fn io_read(&mut self, port: u16, data: &mut [u8]) {
        let v: u32 = match port {
            0xcf8..=0xcfb => self.addr >> (8 * u32::from(port - 0xcf8)),
            0xcfc..=0xcff => match self.target() {
                Some((dev, reg)) => self.config_read(dev, reg) >> (8 * u32::from(port - 0xcfc)),
                None => u32::MAX,
            },
            _ => u32::MAX,
        };
        let b = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(i).copied().unwrap_or(0xff);
        }
    }

    /// Port write; returns true if the decode state may have changed.
    pub fn io_write(&mut self, port: u16, data: &[u8]) -> bool {
        match port {
            0xcf8..=0xcfb => {
                if port == 0xcf8 && data.len() == 4 {
                    self.addr = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                }
                false
            }
            0xcfc..=0xcff => {
                let shift = usize::from(port - 0xcfc);
                let mut val = [0u8; 4];
                let mut mask = 0u32;
                for (i, &d) in data.iter().enumerate() {
                    if shift + i < 4 {
                        val[shift + i] = d;
                        mask |= 0xff << (8 * (shift + i));
                    }
                }
                match self.target() {
                    Some((dev, reg)) => {
                        let before = self.decode();
                        self.config_write(dev, reg, u32::from_le_bytes(val), mask);
                        self.decode() != before
                    }
                    None => false,
                }
            }
            _ => false,
        }
    }

    /// (device, dword register) selected by CONFIG_ADDRESS, if enabled and on bus 0 function 0.
    fn target(&self) -> Option<(u8, u8)> {
        let a = self.addr;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        let dev = ((a >> 11) & 0x1f) as u8;
        let func = (a >> 8) & 7;
        (enabled && bus == 0 && func == 0).then_some((dev, ((a >> 2) & 0x3f) as u8))
    }

    /// Read the dword register `reg` (0..64) of device `dev` on bus 0.
    pub fn config_read(&self, dev: u8, reg: u8) -> u32 {
        match dev {
            0 => match reg {
                0 => u32::from(BRIDGE_DEVICE_ID) << 16 | u32::from(BRIDGE_VENDOR_ID),
                2 => 0x0600_0000, // host bridge, revision 0
                _ => 0,
            },
            DEVICE_SLOT if self.detached => u32::MAX,
            DEVICE_SLOT => match reg {
                0 => self.ids,
                1 => self.command, // status 0: no capabilities
                2 => self.class_rev,
                3 => 0, // header type 0, single function
                4 => self.bar0,
                11 => self.ids,
                12 => self.rom,
                // Interrupt line, pin (0: none unless `set_interrupt`).
                15 => self.int_line | u32::from(self.int_pin) << 8,
                _ => 0,
            },
            _ => u32::MAX,
        }
    }

    /// Write `value` under byte-bit `mask` to dword register `reg` of `dev`.
    pub fn config_write(&mut self, dev: u8, reg: u8, value: u32, mask: u32) {
        if dev != DEVICE_SLOT || self.detached {
            return;
        }
        let merge = |old: u32| (old & !mask) | (value & mask);
        match reg {
            1 => self.command = merge(self.command) & CMD_WRITABLE,
            4 => self.bar0 = merge(self.bar0) & bar0_mask(),
            12 => self.rom = merge(self.rom) & (self.rom_mask() | ROM_ENABLE),
            15 => self.int_line = merge(self.int_line) & 0xff,
            _ => {}
        }
    }
}

fn bar0_mask() -> u32 {
    !((BAR0_SIZE as u32) - 1)
}

/// The CONFIG_ADDRESS value selecting `dev` register byte `offset` on bus 0.
pub fn config_address(dev: u8, offset: u8) -> u32 {
    0x8000_0000 | (u32::from(dev) << 11) | u32::from(offset & 0xfc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(bus: &mut PciBus, dev: u8, off: u8) -> u32 {
        bus.io_write(0xcf8, &config_address(dev, off).to_le_bytes());
        let mut b = [0u8; 4];
        bus.io_read(0xcfc, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(bus: &mut PciBus, dev: u8, off: u8, v: u32) -> bool {
        bus.io_write(0xcf8, &config_address(dev, off).to_le_bytes());
        bus.io_write(0xcfc, &v.to_le_bytes())
    }

    #[test]
    fn interrupt_pin_and_line() {
        let mut bus = PciBus::new(0);
        assert_eq!(rd(&mut bus, 1, 0x3c), 0, "no interrupt by default");
        bus.set_interrupt(1, 16);
        assert_eq!(rd(&mut bus, 1, 0x3c), 0x0110);
        // The line is the guest's to write, the pin is read-only.
        wr(&mut bus, 1, 0x3c, 0xffff_ff05);
        assert_eq!(rd(&mut bus, 1, 0x3c), 0x0105);
    }

    #[test]
    fn ids_and_class() {
        let mut bus = PciBus::new(16 * 1024);
        assert_eq!(
            rd(&mut bus, 1, 0),
            u32::from(PCI_DEVICE_ID) << 16 | u32::from(PCI_VENDOR_ID)
        );
        assert_eq!(rd(&mut bus, 1, 8) >> 8, PCI_CLASS_CODE);
        assert_eq!(rd(&mut bus, 0, 8) >> 8, 0x06_00_00);
        assert_eq!(rd(&mut bus, 5, 0), u32::MAX);
    }

    #[test]
    fn bar0_sizing_protocol() {
        let mut bus = PciBus::new(16 * 1024);
        bus.assign(0xe000_0000, 0xe010_0000);
        assert!(wr(&mut bus, 1, 4, 0)); // memory decode off
        wr(&mut bus, 1, 0x10, u32::MAX);
        let mask = rd(&mut bus, 1, 0x10);
        assert_eq!(!(mask & 0xffff_fff0) + 1, 0x1_0000);
        wr(&mut bus, 1, 0x10, 0xd000_0000);
        assert!(wr(&mut bus, 1, 4, 2));
        assert_eq!(bus.decode().bar0, Some(0xd000_0000));
        assert_eq!(bus.route(0xd000_0010), Route::Bar0(0x10));
        assert_eq!(bus.route(0xd001_0000), Route::Unclaimed);
    }

    #[test]
    fn rom_bar_sizing_and_enable() {
        let mut bus = PciBus::new(16 * 1024);
        bus.assign(0xe000_0000, 0xe010_0000);
        wr(&mut bus, 1, 0x30, 0xffff_f800);
        let mask = rd(&mut bus, 1, 0x30);
        assert_eq!(!(mask & 0xffff_f800) + 1, 16 * 1024);
        wr(&mut bus, 1, 0x30, 0xe010_0000);
        assert_eq!(bus.route(0xe010_0000), Route::Disabled);
        assert!(wr(&mut bus, 1, 0x30, 0xe010_0001));
        assert_eq!(bus.route(0xe010_0002), Route::Rom(2));
    }

    #[test]
    fn decode_off_reads_disabled() {
        let mut bus = PciBus::new(2048);
        bus.assign(0xe000_0000, 0xe010_0000);
        wr(&mut bus, 1, 4, 0);
        assert_eq!(bus.route(0xe000_0000), Route::Disabled);
        assert_eq!(bus.decode().bar0, None);
    }

    #[test]
    fn a_detached_function_reads_all_ones_and_decodes_nothing() {
        let mut bus = PciBus::new(16 * 1024);
        bus.assign(0xe000_0000, 0xe010_0000);
        wr(&mut bus, 1, 0x30, 0xe010_0001);
        assert_eq!(bus.route(0xe000_0010), Route::Bar0(0x10));
        bus.detach();
        assert!(bus.detached());
        for off in (0..0x40).step_by(4) {
            assert_eq!(rd(&mut bus, 1, off), u32::MAX, "config {off:#x}");
        }
        // Sub-dword: the vendor ID alone reads 0xffff.
        bus.io_write(0xcf8, &config_address(1, 0).to_le_bytes());
        let mut b = [0u8; 2];
        bus.io_read(0xcfc, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0xffff);
        // Writes do nothing: decode stays off, the BARs stay all ones.
        assert!(!wr(&mut bus, 1, 4, 2));
        wr(&mut bus, 1, 0x10, 0xd000_0000);
        assert_eq!(rd(&mut bus, 1, 0x10), u32::MAX);
        assert_eq!(
            bus.decode(),
            Decode {
                bar0: None,
                rom: None
            }
        );
        assert_eq!(bus.route(0xe000_0010), Route::Disabled);
        assert_eq!(bus.route(0xe010_0000), Route::Disabled);
        // The host bridge is still there.
        assert_eq!(rd(&mut bus, 0, 0) & 0xffff, u32::from(BRIDGE_VENDOR_ID));
    }

    #[test]
    fn sub_dword_config_access() {
        let mut bus = PciBus::new(2048);
        bus.io_write(0xcf8, &config_address(1, 0).to_le_bytes());
        let mut b = [0u8; 2];
        bus.io_read(0xcfe, &mut b);
        assert_eq!(u16::from_le_bytes(b), PCI_DEVICE_ID);
        bus.io_write(0xcf8, &config_address(1, 0x3c).to_le_bytes());
        bus.io_write(0xcfc, &[0x0b]);
        let mut b = [0u8; 1];
        bus.io_read(0xcfc, &mut b);
        assert_eq!(b[0], 0x0b);
    }
}

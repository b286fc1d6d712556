//! The reference device's register map: ONE table from which the model's decode,
//! the RTL decode, default MMIO policies and `docs/registers.md` are all derived.
//!
//! Every register is 32 bits wide and 4-byte aligned. Register arrays (SCRATCH,
//! COUNTER, DEVICE_KEY, BUFFER) are one entry with a `count`. Offsets are byte
//! offsets into BAR0 (64 KiB, 16 pages of 4 KiB).

use serde::Serialize;

/// Size of BAR0 in bytes.
pub const BAR0_SIZE: u64 = 0x1_0000;
/// Size of one page of BAR0.
pub const PAGE_SIZE: u64 = 0x1000;
/// Number of pages in BAR0.
pub const PAGES: usize = (BAR0_SIZE / PAGE_SIZE) as usize;
/// First byte of the data-buffer area (pages 4..=15).
pub const BUFFER_BASE: u32 = 0x4000;
/// Size of the data-buffer area in bytes.
pub const BUFFER_SIZE: usize = (BAR0_SIZE as usize) - BUFFER_BASE as usize;

/// PCI vendor ID of the reference device (0x1d1d: a test/experimental ID; see README).
pub const PCI_VENDOR_ID: u16 = 0x1d1d;
/// PCI device ID of the reference device.
pub const PCI_DEVICE_ID: u16 = 0x4852;
/// PCI class code (0x12 processing accelerator, subclass 0, prog-if 0).
pub const PCI_CLASS_CODE: u32 = 0x12_00_00;

/// Value of the ID register: ASCII "HILR".
pub const DEVICE_ID_VALUE: u32 = 0x4849_4C52;
/// Value of the VERSION register: major 1, minor 0.
pub const DEVICE_VERSION_VALUE: u32 = 0x0001_0000;
/// Writing this to HANG_TRIGGER wedges the device: every MMIO and ROM read returns
/// all-ones and writes are ignored until reset, FLR or power cycle. ASCII "HANG".
pub const HANG_MAGIC: u32 = 0x4841_4E47;
/// Writing this to SOFT_RESET resets the device's volatile state. ASCII "RST!".
pub const SOFT_RESET_MAGIC: u32 = 0x5253_5421;
/// First word of the flash unlock sequence (ASCII "UNLK").
pub const UNLOCK_KEY1: u32 = 0x554E_4C4B;
/// Second word of the flash unlock sequence (ASCII "FLSH").
pub const UNLOCK_KEY2: u32 = 0x464C_5348;

/// FLASH_CMD: erase the selected region (all bytes to 0xFF). An attempt.
pub const FLASH_CMD_ERASE: u32 = 1;
/// FLASH_CMD: program FLASH_LEN bytes from the buffer area at FLASH_SRC into the
/// selected region at FLASH_ADDR (bitwise AND, like NOR flash). An attempt.
pub const FLASH_CMD_PROGRAM: u32 = 2;
/// FLASH_CMD: lock the flash controller again. Not an attempt.
pub const FLASH_CMD_LOCK: u32 = 3;

/// STATUS: the fuse is blown.
pub const STATUS_FUSE_BLOWN: u32 = 1 << 1;
/// STATUS: flash controller unlocked.
pub const STATUS_FLASH_UNLOCKED: u32 = 1 << 2;
/// STATUS: an enabled interrupt is pending.
pub const STATUS_IRQ_PENDING: u32 = 1 << 3;
/// CONTROL: interrupt enable.
pub const CONTROL_IRQ_ENABLE: u32 = 1 << 0;
/// IRQ_STATUS: the doorbell was rung.
pub const IRQ_DOORBELL: u32 = 1 << 0;

/// FLASH_STATUS: controller unlocked.
pub const FLASH_STATUS_UNLOCKED: u32 = 1 << 0;
/// FLASH_STATUS: the last command completed.
pub const FLASH_STATUS_DONE: u32 = 1 << 1;
/// FLASH_STATUS: the last command was refused because the controller was locked.
pub const FLASH_STATUS_REFUSED_LOCKED: u32 = 1 << 2;
/// FLASH_STATUS: the last command was refused because the fuse is blown.
pub const FLASH_STATUS_REFUSED_FUSE: u32 = 1 << 3;
/// FLASH_STATUS: the last command was refused because of bad arguments.
pub const FLASH_STATUS_REFUSED_ARGS: u32 = 1 << 4;
/// FLASH_STATUS: a wrong unlock key was written since the last successful unlock.
pub const FLASH_STATUS_BAD_KEY: u32 = 1 << 5;

/// Flash regions, in COUNTER array order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
pub enum Region {
    /// The PCI expansion ROM image, also served through the expansion-ROM BAR.
    Vbios = 0,
    /// Device firmware.
    Firmware = 1,
    /// Device configuration.
    Config = 2,
}

impl Region {
    /// All regions, in index order.
    pub const ALL: [Region; 3] = [Region::Vbios, Region::Firmware, Region::Config];

    /// The region with index `i` (the FLASH_REGION value), if any.
    pub fn from_index(i: u32) -> Option<Region> {
        Self::ALL.get(i as usize).copied()
    }

    /// Lower-case name, as used on command lines and in files.
    pub fn name(self) -> &'static str {
        match self {
            Region::Vbios => "vbios",
            Region::Firmware => "firmware",
            Region::Config => "config",
        }
    }

    /// Parse a lower-case region name.
    pub fn parse(s: &str) -> Option<Region> {
        Self::ALL
            .into_iter()
            .find(|r| r.name() == s.to_ascii_lowercase())
    }
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the hardware does with an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hw {
    /// Read/write storage.
    Rw,
    /// Read-only: writes are ignored.
    Ro,
    /// Write-only trigger: reads return 0; the write acts on its (byte-masked) value.
    Wo,
    /// Read, write 1 to clear.
    W1c,
}

/// What a privilege profile may do with a register (turned into default policies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Perm {
    /// No access: reads and writes are restricted.
    None,
    /// Reads allowed, writes restricted.
    R,
    /// Writes allowed, reads restricted.
    W,
    /// Reads and writes allowed.
    Rw,
}

impl Perm {
    /// Whether reads are allowed.
    pub fn can_read(self) -> bool {
        matches!(self, Perm::R | Perm::Rw)
    }
    /// Whether writes are allowed.
    pub fn can_write(self) -> bool {
        matches!(self, Perm::W | Perm::Rw)
    }
    fn label(self) -> &'static str {
        match self {
            Perm::None => "none",
            Perm::R => "R",
            Perm::W => "W",
            Perm::Rw => "RW",
        }
    }
}

/// Whether a register's contents survive reset, FLR and power cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Persistence {
    /// Lost on reset, FLR and power cycle.
    Volatile,
    /// Kept across reset, FLR and power cycle (state file).
    Nonvolatile,
    /// Computed from other state; not stored.
    Derived,
}

/// A bit field of a register, for documentation and RTL generation.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Field {
    /// Field name.
    pub name: &'static str,
    /// Lowest bit.
    pub lsb: u8,
    /// Width in bits.
    pub width: u8,
    /// One-line description.
    pub doc: &'static str,
}

/// One row of the register table.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RegisterDef {
    /// Which register this is.
    #[serde(skip)]
    pub reg: Reg,
    /// Upper-case name.
    pub name: &'static str,
    /// Byte offset of the first element in BAR0.
    pub offset: u32,
    /// Number of 32-bit elements (1 for a plain register).
    pub count: u32,
    /// Width of one element in bits (always 32).
    pub width: u8,
    /// Hardware behaviour.
    pub hw: Hw,
    /// What a tenant may do.
    pub tenant: Perm,
    /// What an operator may do.
    pub operator: Perm,
    /// Value after reset. For nonvolatile registers: the factory value. For derived
    /// registers it is computed (e.g. FLASH_DATA reads flash); the doc says from what.
    pub reset: u32,
    /// Volatile, nonvolatile or derived.
    pub persistence: Persistence,
    /// Register group (page name).
    pub group: &'static str,
    /// One-line description.
    pub doc: &'static str,
    /// Bit fields, if the register has named fields.
    pub fields: &'static [Field],
}

impl RegisterDef {
    /// Byte offset one past the last element.
    pub fn end(&self) -> u32 {
        self.offset + self.count * 4
    }
    /// The page (0..=15) this register starts on.
    pub fn page(&self) -> usize {
        (self.offset as u64 / PAGE_SIZE) as usize
    }
    /// Whether `offset` falls inside this register (or register array).
    pub fn contains(&self, offset: u32) -> bool {
        offset >= self.offset && offset < self.end()
    }
    /// Display name of the element holding `offset`, e.g. `SCRATCH[3]`.
    pub fn element_name(&self, offset: u32) -> String {
        if self.count == 1 {
            self.name.to_string()
        } else {
            format!("{}[{}]", self.name, (offset - self.offset) / 4)
        }
    }
}

macro_rules! field {
    ($name:literal, $lsb:literal, $width:literal, $doc:literal) => {
        Field {
            name: $name,
            lsb: $lsb,
            width: $width,
            doc: $doc,
        }
    };
}

macro_rules! registers {
    ($(
        $variant:ident $name:literal @ $offset:literal x $count:literal :
        $hw:ident, tenant $tenant:ident, operator $operator:ident,
        reset $reset:expr, $pers:ident, $group:literal, $doc:literal
        $(, fields [$($field:expr),* $(,)?])? ;
    )*) => {
        /// Every register of the device, in address order.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
        pub enum Reg { $(#[doc = $doc] $variant),* }

        /// The register table, in address order.
        pub const REGISTERS: &[RegisterDef] = &[$(
            RegisterDef {
                reg: Reg::$variant,
                name: $name,
                offset: $offset,
                count: $count,
                width: 32,
                hw: Hw::$hw,
                tenant: Perm::$tenant,
                operator: Perm::$operator,
                reset: $reset,
                persistence: Persistence::$pers,
                group: $group,
                doc: $doc,
                fields: &[$($($field),*)?],
            }
        ),*];

        impl Reg {
            /// This register's table row.
            pub fn def(self) -> &'static RegisterDef {
                &REGISTERS[self as usize]
            }
            /// Byte offset of this register (of its first element).
            pub const fn offset(self) -> u32 {
                match self { $(Reg::$variant => $offset),* }
            }
        }
    };
}

registers! {
    Id "ID" @ 0x0000 x 1: Ro, tenant R, operator R, reset DEVICE_ID_VALUE, Derived, "identity",
        "Device identification, ASCII \"HILR\"";
    Version "VERSION" @ 0x0004 x 1: Ro, tenant R, operator R, reset DEVICE_VERSION_VALUE, Derived, "identity",
        "Register-map version: major in bits 31:16, minor in 15:0";
    Status "STATUS" @ 0x0008 x 1: Ro, tenant R, operator R, reset 0, Derived, "identity",
        "Device status summary",
        fields [
            field!("FUSE_BLOWN", 1, 1, "the counter budget is spent; flash is read-only for good"),
            field!("FLASH_UNLOCKED", 2, 1, "the flash controller is unlocked"),
            field!("IRQ_PENDING", 3, 1, "an enabled interrupt is pending (IRQ_STATUS & CONTROL.IRQ_ENABLE)"),
        ];
    Control "CONTROL" @ 0x000C x 1: Rw, tenant Rw, operator Rw, reset 0, Volatile, "identity",
        "Device control",
        fields [field!("IRQ_ENABLE", 0, 1, "enable the doorbell interrupt")];
    Scratch "SCRATCH" @ 0x0010 x 8: Rw, tenant Rw, operator Rw, reset 0, Volatile, "identity",
        "Tenant scratch registers (tenant state: scrubbed at teardown)";
    Doorbell "DOORBELL" @ 0x0030 x 1: Rw, tenant Rw, operator Rw, reset 0, Volatile, "identity",
        "Doorbell: a write stores the value and sets IRQ_STATUS.DOORBELL";
    IrqStatus "IRQ_STATUS" @ 0x0034 x 1: W1c, tenant Rw, operator Rw, reset 0, Volatile, "identity",
        "Interrupt status, write 1 to clear",
        fields [field!("DOORBELL", 0, 1, "the doorbell was rung")];
    HangTrigger "HANG_TRIGGER" @ 0x0038 x 1: Wo, tenant None, operator W, reset 0, Volatile, "identity",
        "Writing HANG_MAGIC (0x4841_4E47) wedges the device until reset, FLR or power cycle";
    SoftReset "SOFT_RESET" @ 0x003C x 1: Wo, tenant None, operator W, reset 0, Volatile, "identity",
        "Writing SOFT_RESET_MAGIC (0x5253_5421) resets the device's volatile state";
    Serial "SERIAL" @ 0x0040 x 2: Ro, tenant R, operator R, reset 0, Nonvolatile, "identity",
        "Device serial number, low word first";
    FlashRegion "FLASH_REGION" @ 0x1000 x 1: Rw, tenant None, operator Rw, reset 0, Volatile, "flash",
        "Selected flash region: 0 VBIOS, 1 FIRMWARE, 2 CONFIG (bits 1:0 stored)";
    FlashAddr "FLASH_ADDR" @ 0x1004 x 1: Rw, tenant None, operator Rw, reset 0, Volatile, "flash",
        "Byte offset in the selected region (for FLASH_DATA and PROGRAM)";
    FlashData "FLASH_DATA" @ 0x1008 x 1: Ro, tenant None, operator R, reset 0, Derived, "flash",
        "Read window: the flash word at FLASH_ADDR (rounded down to 4) in the selected region; all-ones past its end";
    FlashLen "FLASH_LEN" @ 0x100C x 1: Rw, tenant None, operator Rw, reset 0, Volatile, "flash",
        "PROGRAM length in bytes (multiple of 4)";
    FlashSrc "FLASH_SRC" @ 0x1010 x 1: Rw, tenant None, operator Rw, reset 0, Volatile, "flash",
        "PROGRAM source: byte offset into the data-buffer area (pages 4-15)";
    FlashCmd "FLASH_CMD" @ 0x1014 x 1: Wo, tenant None, operator W, reset 0, Volatile, "flash",
        "Command: 1 ERASE, 2 PROGRAM (both are counted attempts), 3 LOCK";
    FlashStatus "FLASH_STATUS" @ 0x1018 x 1: Ro, tenant None, operator R, reset 0, Volatile, "flash",
        "Result of the last flash command",
        fields [
            field!("UNLOCKED", 0, 1, "the controller is unlocked"),
            field!("DONE", 1, 1, "the last command completed"),
            field!("REFUSED_LOCKED", 2, 1, "the last command was refused: controller locked"),
            field!("REFUSED_FUSE", 3, 1, "the last command was refused: fuse blown"),
            field!("REFUSED_ARGS", 4, 1, "the last command was refused: bad region, address, length or source"),
            field!("BAD_KEY", 5, 1, "a wrong unlock word was written since the last unlock"),
        ];
    FlashUnlock "FLASH_UNLOCK" @ 0x101C x 1: Wo, tenant None, operator W, reset 0, Volatile, "flash",
        "Unlock sequence: UNLOCK_KEY1 (0x554E_4C4B) then UNLOCK_KEY2 (0x464C_5348); any other value restarts it and sets BAD_KEY";
    Counter "COUNTER" @ 0x2000 x 3: Ro, tenant R, operator R, reset 0, Nonvolatile, "counters",
        "Attempt counter per region (VBIOS, FIRMWARE, CONFIG): thermometer bits set";
    Master "MASTER" @ 0x200C x 1: Ro, tenant R, operator R, reset 0, Nonvolatile, "counters",
        "Incremented whenever any region counter increments; never cleared";
    Fuse "FUSE" @ 0x2010 x 1: Ro, tenant R, operator R, reset 0, Nonvolatile, "counters",
        "1 when the fuse is blown (a region counter reached WIDTH)";
    SlotsLeft "SLOTS_LEFT" @ 0x2014 x 1: Ro, tenant R, operator R, reset 0, Derived, "counters",
        "WIDTH minus the largest region counter: attempts left before the fuse blows (WIDTH on a fresh device)";
    Width "WIDTH" @ 0x2018 x 1: Ro, tenant R, operator R, reset 0, Nonvolatile, "counters",
        "Counter budget: thermometer width in bits (1..=64)";
    Epoch "EPOCH" @ 0x201C x 1: Ro, tenant R, operator R, reset 0, Nonvolatile, "counters",
        "Number of authorised OOB physical resets; never decreases";
    DeviceKey "DEVICE_KEY" @ 0x3000 x 8: Ro, tenant None, operator R, reset 0, Nonvolatile, "secrets",
        "Provisioned 256-bit device key, little-endian words; a tenant must never read it";
    Buffer "BUFFER" @ 0x4000 x 12288: Rw, tenant Rw, operator Rw, reset 0, Volatile, "buffers",
        "Data buffers (pages 4-15): plain RAM, tenant state; PROGRAM source";
}

/// Which register (and element) a BAR0 byte offset belongs to: a per-word
/// lookup over pages 0..=3 plus the buffer range, built from the table.
pub struct Decoder {
    words: [Option<Reg>; 4096],
}

impl Decoder {
    /// Build the decoder from `REGISTERS`.
    pub const fn new() -> Decoder {
        let mut words = [None; 4096];
        let mut i = 0;
        while i < REGISTERS.len() {
            let def = &REGISTERS[i];
            if def.offset < BUFFER_BASE {
                let mut w = 0;
                while w < def.count {
                    words[((def.offset / 4) + w) as usize] = Some(def.reg);
                    w += 1;
                }
            }
            i += 1;
        }
        Decoder { words }
    }

    /// Decode the 4-byte-aligned word at `offset` (any offset inside BAR0).
    /// Returns the register and the element index; `None` for unmapped holes.
    #[inline]
    pub fn decode(&self, offset: u32) -> Option<(Reg, u32)> {
        if offset >= BUFFER_BASE {
            if (offset as u64) < BAR0_SIZE {
                return Some((Reg::Buffer, (offset - BUFFER_BASE) / 4));
            }
            return None;
        }
        let reg = self.words[(offset / 4) as usize]?;
        Some((reg, (offset - reg.offset()) / 4))
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

/// The decoder, built at compile time.
pub static DECODER: Decoder = Decoder::new();

/// The table row of the register holding `offset`, if any.
pub fn lookup(offset: u32) -> Option<&'static RegisterDef> {
    DECODER.decode(offset & !3).map(|(r, _)| r.def())
}

/// Page groups, for documentation and policy: (page range, group, tenant access note).
pub const PAGE_GROUPS: &[(u32, u32, &str, &str)] = &[
    (
        0,
        0,
        "identity",
        "mixed: tenant-safe registers beside restricted ones",
    ),
    (1, 1, "flash", "restricted"),
    (2, 2, "counters", "read-only"),
    (3, 3, "secrets", "restricted read"),
    (
        4,
        15,
        "buffers",
        "unrestricted (mapped straight into the guest)",
    ),
];

/// The register table as JSON (for `hilrig device regmap --json`).
pub fn to_json() -> String {
    #[derive(Serialize)]
    struct Export<'a> {
        bar0_size: u64,
        page_size: u64,
        pci_vendor_id: u16,
        pci_device_id: u16,
        constants: Vec<(&'static str, u32)>,
        registers: &'a [RegisterDef],
    }
    let e = Export {
        bar0_size: BAR0_SIZE,
        page_size: PAGE_SIZE,
        pci_vendor_id: PCI_VENDOR_ID,
        pci_device_id: PCI_DEVICE_ID,
        constants: CONSTANTS.to_vec(),
        registers: REGISTERS,
    };
    // Serializing plain data with derived impls cannot fail.
    serde_json::to_string_pretty(&e).unwrap_or_default()
}

/// Named magic values, documented with the table.
pub const CONSTANTS: &[(&str, u32)] = &[
    ("HANG_MAGIC", HANG_MAGIC),
    ("SOFT_RESET_MAGIC", SOFT_RESET_MAGIC),
    ("UNLOCK_KEY1", UNLOCK_KEY1),
    ("UNLOCK_KEY2", UNLOCK_KEY2),
    ("FLASH_CMD_ERASE", FLASH_CMD_ERASE),
    ("FLASH_CMD_PROGRAM", FLASH_CMD_PROGRAM),
    ("FLASH_CMD_LOCK", FLASH_CMD_LOCK),
];

/// The register table as Markdown: the content of `docs/registers.md`.
pub fn to_markdown() -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "# Reference device registers\n");
    let _ = writeln!(
        s,
        "Generated by `hilrig device regmap --markdown` from the register table in \
         `fpga/core/src/regmap.rs`. Do not edit: a test fails when this file differs.\n"
    );
    let _ = writeln!(
        s,
        "BAR0 is {} KiB: {} pages of {} KiB. PCI vendor 0x{:04x}, device 0x{:04x}, class 0x{:06x}. \
         Every register is 32 bits wide and 4-byte aligned.\n",
        BAR0_SIZE / 1024,
        PAGES,
        PAGE_SIZE / 1024,
        PCI_VENDOR_ID,
        PCI_DEVICE_ID,
        PCI_CLASS_CODE
    );
    let _ = writeln!(
        s,
        "## Pages\n\n| pages | group | tenant access |\n|---|---|---|"
    );
    for (a, b, g, n) in PAGE_GROUPS {
        let pages = if a == b {
            format!("{a}")
        } else {
            format!("{a}-{b}")
        };
        let _ = writeln!(s, "| {pages} | {g} | {n} |");
    }
    let _ = writeln!(
        s,
        "\n## Registers\n\n| offset | name | count | hw | tenant | operator | reset | persistence | description |\n|---|---|---|---|---|---|---|---|---|"
    );
    for r in REGISTERS {
        let _ = writeln!(
            s,
            "| 0x{:04x} | {} | {} | {:?} | {} | {} | 0x{:08x} | {:?} | {} |",
            r.offset,
            r.name,
            r.count,
            r.hw,
            r.tenant.label(),
            r.operator.label(),
            r.reset,
            r.persistence,
            r.doc.replace('|', "\\|")
        );
    }
    let _ = writeln!(s, "\n## Fields\n");
    for r in REGISTERS.iter().filter(|r| !r.fields.is_empty()) {
        let _ = writeln!(
            s,
            "### {}\n\n| bits | name | description |\n|---|---|---|",
            r.name
        );
        for f in r.fields {
            let bits = if f.width == 1 {
                format!("{}", f.lsb)
            } else {
                format!("{}:{}", f.lsb + f.width - 1, f.lsb)
            };
            let _ = writeln!(s, "| {bits} | {} | {} |", f.name, f.doc);
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "## Constants\n\n| name | value |\n|---|---|");
    for (n, v) in CONSTANTS {
        let _ = writeln!(s, "| {n} | 0x{v:08x} |");
    }
    let _ = writeln!(s, "\n## Access rules\n\n{}", ACCESS_RULES);
    s
}

/// The documented MMIO access rules (also in the `Device` trait docs).
pub const ACCESS_RULES: &str = "\
- An access is 1 to 8 bytes at any byte offset; it must lie wholly inside BAR0 \
(offset + length <= 0x10000), otherwise it is refused with an out-of-range error \
and nothing happens. Lengths 0 or above 8 are refused as bad widths.
- An access is split into the 32-bit registers it touches, performed one register \
at a time in ascending address order, each with a byte mask. Such a split access is \
not atomic.
- A partial write to a storage register (RW, W1C) changes only the written bytes. A \
partial write to a trigger register (WO) acts on the written bytes with zeros in the \
others, so a byte write never completes a 32-bit magic value.
- Reads have no side effects. WO registers and unmapped holes read as 0; writes to \
read-only registers and holes are ignored.
- While the device is hung (HANG_MAGIC written to HANG_TRIGGER), every MMIO and \
expansion-ROM read returns all-ones and every write is ignored; the OOB port still answers.
- Expansion-ROM reads past the ROM's end are refused as out of range.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_aligned_and_disjoint() {
        for w in REGISTERS.windows(2) {
            assert!(
                w[0].end() <= w[1].offset,
                "{} overlaps {}",
                w[0].name,
                w[1].name
            );
        }
        for (i, r) in REGISTERS.iter().enumerate() {
            assert_eq!(r.reg as usize, i, "{} is out of order", r.name);
            assert_eq!(r.offset % 4, 0, "{} is unaligned", r.name);
            assert!(r.end() as u64 <= BAR0_SIZE, "{} is past BAR0", r.name);
            assert!(r.count >= 1);
            assert_eq!(r.width, 32);
            // A register array never crosses a page boundary, except the buffer area.
            if r.reg != Reg::Buffer {
                assert_eq!(
                    r.page(),
                    ((r.end() - 1) as u64 / PAGE_SIZE) as usize,
                    "{}",
                    r.name
                );
            }
        }
    }

    #[test]
    fn decoder_agrees_with_table_for_every_word() {
        for off in (0..BAR0_SIZE as u32).step_by(4) {
            let expect = REGISTERS.iter().find(|r| r.contains(off));
            let got = DECODER.decode(off);
            match (expect, got) {
                (None, None) => {}
                (Some(r), Some((reg, idx))) => {
                    assert_eq!(r.reg, reg, "offset {off:#x}");
                    assert_eq!(idx, (off - r.offset) / 4);
                }
                (e, g) => panic!(
                    "offset {off:#x}: table {:?} decoder {:?}",
                    e.map(|r| r.name),
                    g
                ),
            }
        }
        assert!(DECODER.decode(BAR0_SIZE as u32).is_none());
    }

    #[test]
    fn groups_match_pages() {
        for r in REGISTERS {
            let (_, _, g, _) = PAGE_GROUPS
                .iter()
                .find(|(a, b, _, _)| (*a..=*b).contains(&(r.page() as u32)))
                .expect("every page has a group");
            assert_eq!(*g, r.group, "{}", r.name);
        }
        // The mixed page really is mixed; restricted pages are restricted for tenants.
        let page0: Vec<_> = REGISTERS.iter().filter(|r| r.page() == 0).collect();
        assert!(page0.iter().any(|r| r.tenant == Perm::None));
        assert!(page0.iter().any(|r| r.tenant == Perm::Rw));
        assert!(REGISTERS
            .iter()
            .filter(|r| r.group == "flash")
            .all(|r| r.tenant == Perm::None));
        assert!(REGISTERS
            .iter()
            .filter(|r| r.group == "counters")
            .all(|r| r.tenant == Perm::R));
    }

    #[test]
    fn region_names_round_trip() {
        for r in Region::ALL {
            assert_eq!(Region::parse(r.name()), Some(r));
            assert_eq!(Region::from_index(r as u32), Some(r));
        }
        assert_eq!(Region::parse("nope"), None);
        assert_eq!(Region::from_index(3), None);
    }
}

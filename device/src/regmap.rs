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

/// What a bit field does with writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldAccess {
    /// Read-only: set by the hardware, writes are ignored.
    Ro,
    /// Read/write storage.
    Rw,
    /// Set by the hardware; writing 1 clears it, writing 0 keeps it.
    W1c,
}

/// A bit field of a register: documentation, bit constants, masks and RTL constants.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Field {
    /// Field name.
    pub name: &'static str,
    /// Lowest bit.
    pub lsb: u8,
    /// Width in bits.
    pub width: u8,
    /// What writes do to the field.
    pub access: FieldAccess,
    /// One-line description.
    pub doc: &'static str,
}

impl Field {
    /// The field's bits in the register.
    pub const fn mask(&self) -> u32 {
        bit_mask(self.lsb, self.width)
    }
}

/// `width` bits from bit `lsb` (a field's mask).
pub const fn bit_mask(lsb: u8, width: u8) -> u32 {
    if width >= 32 {
        u32::MAX << lsb
    } else {
        ((1u32 << width) - 1) << lsb
    }
}

/// The union of the masks of `fields` with access `access`.
const fn fields_mask(fields: &[Field], access: FieldAccess) -> u32 {
    let mut m = 0;
    let mut i = 0;
    while i < fields.len() {
        let hit = matches!(
            (fields[i].access, access),
            (FieldAccess::Ro, FieldAccess::Ro)
                | (FieldAccess::Rw, FieldAccess::Rw)
                | (FieldAccess::W1c, FieldAccess::W1c)
        );
        if hit {
            m |= fields[i].mask();
        }
        i += 1;
    }
    m
}

/// The writable mask of a register: the bits a write stores (and a read returns).
/// A RW register without fields stores all 32 bits; with fields, its RW fields.
/// Other registers store nothing (RO ignores writes, WO acts on them, W1C clears).
pub const fn writable_mask(hw: Hw, fields: &[Field]) -> u32 {
    match hw {
        Hw::Rw if fields.is_empty() => u32::MAX,
        Hw::Rw => fields_mask(fields, FieldAccess::Rw),
        Hw::Ro | Hw::Wo | Hw::W1c => 0,
    }
}

/// The write-1-to-clear bits of a register: all bits of a W1C register without
/// fields, else its W1C fields.
pub const fn w1c_mask(hw: Hw, fields: &[Field]) -> u32 {
    match hw {
        Hw::W1c if fields.is_empty() => u32::MAX,
        Hw::W1c => fields_mask(fields, FieldAccess::W1c),
        Hw::Ro | Hw::Wo | Hw::Rw => 0,
    }
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
    /// Bits a write stores (and a read returns): [`writable_mask`] of `hw` and the
    /// fields. The model and the RTL mask writes with it.
    pub writable: u32,
    /// Bits a write of 1 clears: [`w1c_mask`] of `hw` and the fields.
    pub w1c: u32,
    /// Tenant state: what a tenant can leave behind, scrubbed at teardown
    /// ([`tenant_state`]).
    pub tenant_state: bool,
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
    pub const fn end(&self) -> u32 {
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
    /// The value of one element after a write of `value` with the bit mask `bits`
    /// (the written bytes, see [`crate::device::byte_mask_bits`]) over `old`, as the
    /// table says: writable bits take the written bits, W1C bits written as 1 clear,
    /// every other bit keeps its value. (Side effects, such as the doorbell setting
    /// IRQ_STATUS, are the device's, not the table's.)
    #[inline]
    pub const fn write(&self, old: u32, value: u32, bits: u32) -> u32 {
        let w = bits & self.writable;
        let stored = (old & !w) | (value & w);
        stored & !(value & bits & self.w1c)
    }
}

/// Row of the table with the register `reg` (usable in constants).
pub const fn def(reg: Reg) -> &'static RegisterDef {
    &REGISTERS[reg as usize]
}

macro_rules! registers {
    (@ts scrub) => { true };
    (@ts keep) => { false };
    ($(
        $variant:ident $name:literal @ $offset:literal x $count:literal :
        $hw:ident, tenant $tenant:ident, operator $operator:ident,
        reset $reset:expr, $pers:ident, $ts:ident, $group:literal, $doc:literal
        $(, fields [$(
            $cname:ident = $fname:literal @ $lsb:literal x $fwidth:literal $facc:ident : $fdoc:literal
        ),* $(,)?])? ;
    )*) => {
        /// Every register of the device, in address order.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
        pub enum Reg { $(#[doc = $doc] $variant),* }

        $($($(
            #[doc = concat!($name, ".", $fname, ": ", $fdoc)]
            pub const $cname: u32 = bit_mask($lsb, $fwidth);
        )*)?)*

        /// The register table, in address order.
        pub const REGISTERS: &[RegisterDef] = &[$(
            {
                const FIELDS: &[Field] = &[$($(Field {
                    name: $fname,
                    lsb: $lsb,
                    width: $fwidth,
                    access: FieldAccess::$facc,
                    doc: $fdoc,
                }),*)?];
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
                    writable: writable_mask(Hw::$hw, FIELDS),
                    w1c: w1c_mask(Hw::$hw, FIELDS),
                    tenant_state: registers!(@ts $ts),
                    persistence: Persistence::$pers,
                    group: $group,
                    doc: $doc,
                    fields: FIELDS,
                }
            }
        ),*];

        impl Reg {
            /// This register's table row.
            pub const fn def(self) -> &'static RegisterDef {
                &REGISTERS[self as usize]
            }
            /// Byte offset of this register (of its first element).
            pub const fn offset(self) -> u32 {
                match self { $(Reg::$variant => $offset),* }
            }
        }
    };
}

// Columns: variant "NAME" @ offset x count: hw, tenant perm, operator perm,
// reset value, persistence, tenant state (`scrub`: teardown clears it; `keep`),
// group, doc, and the fields: CONSTANT = "NAME" @ lsb x width access: doc. Each
// field's CONSTANT (its bit mask) is generated from the same entry.
registers! {
    Id "ID" @ 0x0000 x 1: Ro, tenant R, operator R, reset DEVICE_ID_VALUE, Derived, keep, "identity",
        "Device identification, ASCII \"HILR\"";
    Version "VERSION" @ 0x0004 x 1: Ro, tenant R, operator R, reset DEVICE_VERSION_VALUE, Derived, keep, "identity",
        "Register-map version: major in bits 31:16, minor in 15:0";
    Status "STATUS" @ 0x0008 x 1: Ro, tenant R, operator R, reset 0, Derived, keep, "identity",
        "Device status summary",
        fields [
            STATUS_FUSE_BLOWN = "FUSE_BLOWN" @ 1 x 1 Ro: "the counter budget is spent; flash is read-only for good",
            STATUS_FLASH_UNLOCKED = "FLASH_UNLOCKED" @ 2 x 1 Ro: "the flash controller is unlocked",
            STATUS_IRQ_PENDING = "IRQ_PENDING" @ 3 x 1 Ro: "an enabled interrupt is pending (IRQ_STATUS & CONTROL.IRQ_ENABLE)",
        ];
    Control "CONTROL" @ 0x000C x 1: Rw, tenant Rw, operator Rw, reset 0, Volatile, scrub, "identity",
        "Device control",
        fields [CONTROL_IRQ_ENABLE = "IRQ_ENABLE" @ 0 x 1 Rw: "enable the doorbell interrupt"];
    Scratch "SCRATCH" @ 0x0010 x 8: Rw, tenant Rw, operator Rw, reset 0, Volatile, scrub, "identity",
        "Tenant scratch registers (tenant state: scrubbed at teardown)";
    Doorbell "DOORBELL" @ 0x0030 x 1: Rw, tenant Rw, operator Rw, reset 0, Volatile, scrub, "identity",
        "Doorbell: a write stores the value and sets IRQ_STATUS.DOORBELL";
    IrqStatus "IRQ_STATUS" @ 0x0034 x 1: W1c, tenant Rw, operator Rw, reset 0, Volatile, scrub, "identity",
        "Interrupt status, write 1 to clear",
        fields [IRQ_DOORBELL = "DOORBELL" @ 0 x 1 W1c: "the doorbell was rung"];
    HangTrigger "HANG_TRIGGER" @ 0x0038 x 1: Wo, tenant None, operator W, reset 0, Volatile, keep, "identity",
        "Writing HANG_MAGIC (0x4841_4E47) wedges the device until reset, FLR or power cycle";
    SoftReset "SOFT_RESET" @ 0x003C x 1: Wo, tenant None, operator W, reset 0, Volatile, keep, "identity",
        "Writing SOFT_RESET_MAGIC (0x5253_5421) resets the device's volatile state";
    Serial "SERIAL" @ 0x0040 x 2: Ro, tenant R, operator R, reset 0, Nonvolatile, keep, "identity",
        "Device serial number, low word first";
    FlashRegion "FLASH_REGION" @ 0x1000 x 1: Rw, tenant None, operator Rw, reset 0, Volatile, keep, "flash",
        "Selected flash region: 0 VBIOS, 1 FIRMWARE, 2 CONFIG (bits 1:0 stored)",
        fields [FLASH_REGION_SELECT = "REGION" @ 0 x 2 Rw: "the region: 0 VBIOS, 1 FIRMWARE, 2 CONFIG (3 selects none)"];
    FlashAddr "FLASH_ADDR" @ 0x1004 x 1: Rw, tenant None, operator Rw, reset 0, Volatile, keep, "flash",
        "Byte offset in the selected region (for FLASH_DATA and PROGRAM)";
    FlashData "FLASH_DATA" @ 0x1008 x 1: Ro, tenant None, operator R, reset 0, Derived, keep, "flash",
        "Read window: the flash word at FLASH_ADDR (rounded down to 4) in the selected region; all-ones past its end";
    FlashLen "FLASH_LEN" @ 0x100C x 1: Rw, tenant None, operator Rw, reset 0, Volatile, keep, "flash",
        "PROGRAM length in bytes (multiple of 4)";
    FlashSrc "FLASH_SRC" @ 0x1010 x 1: Rw, tenant None, operator Rw, reset 0, Volatile, keep, "flash",
        "PROGRAM source: byte offset into the data-buffer area (pages 4-15)";
    FlashCmd "FLASH_CMD" @ 0x1014 x 1: Wo, tenant None, operator W, reset 0, Volatile, keep, "flash",
        "Command: 1 ERASE, 2 PROGRAM (both are counted attempts), 3 LOCK";
    FlashStatus "FLASH_STATUS" @ 0x1018 x 1: Ro, tenant None, operator R, reset 0, Volatile, keep, "flash",
        "Result of the last flash command",
        fields [
            FLASH_STATUS_UNLOCKED = "UNLOCKED" @ 0 x 1 Ro: "the controller is unlocked",
            FLASH_STATUS_DONE = "DONE" @ 1 x 1 Ro: "the last command completed",
            FLASH_STATUS_REFUSED_LOCKED = "REFUSED_LOCKED" @ 2 x 1 Ro: "the last command was refused: controller locked",
            FLASH_STATUS_REFUSED_FUSE = "REFUSED_FUSE" @ 3 x 1 Ro: "the last command was refused: fuse blown",
            FLASH_STATUS_REFUSED_ARGS = "REFUSED_ARGS" @ 4 x 1 Ro: "the last command was refused: bad region, address, length or source",
            FLASH_STATUS_BAD_KEY = "BAD_KEY" @ 5 x 1 Ro: "a wrong unlock word was written since the last unlock",
        ];
    FlashUnlock "FLASH_UNLOCK" @ 0x101C x 1: Wo, tenant None, operator W, reset 0, Volatile, keep, "flash",
        "Unlock sequence: UNLOCK_KEY1 (0x554E_4C4B) then UNLOCK_KEY2 (0x464C_5348); any other value restarts it and sets BAD_KEY";
    Counter "COUNTER" @ 0x2000 x 3: Ro, tenant R, operator R, reset 0, Nonvolatile, keep, "counters",
        "Attempt counter per region (VBIOS, FIRMWARE, CONFIG): thermometer bits set";
    Master "MASTER" @ 0x200C x 1: Ro, tenant R, operator R, reset 0, Nonvolatile, keep, "counters",
        "Incremented whenever any region counter increments; never cleared";
    Fuse "FUSE" @ 0x2010 x 1: Ro, tenant R, operator R, reset 0, Nonvolatile, keep, "counters",
        "1 when the fuse is blown (a region counter reached WIDTH)";
    SlotsLeft "SLOTS_LEFT" @ 0x2014 x 1: Ro, tenant R, operator R, reset 0, Derived, keep, "counters",
        "WIDTH minus the largest region counter: attempts left before the fuse blows (WIDTH on a fresh device)";
    Width "WIDTH" @ 0x2018 x 1: Ro, tenant R, operator R, reset 0, Nonvolatile, keep, "counters",
        "Counter budget: thermometer width in bits (1..=64)";
    Epoch "EPOCH" @ 0x201C x 1: Ro, tenant R, operator R, reset 0, Nonvolatile, keep, "counters",
        "Number of authorised OOB physical resets; never decreases";
    DeviceKey "DEVICE_KEY" @ 0x3000 x 8: Ro, tenant None, operator R, reset 0, Nonvolatile, keep, "secrets",
        "Provisioned 256-bit device key, little-endian words; a tenant must never read it";
    Buffer "BUFFER" @ 0x4000 x 12288: Rw, tenant Rw, operator Rw, reset 0, Volatile, scrub, "buffers",
        "Data buffers (pages 4-15): plain RAM, tenant state; PROGRAM source";
}

/// One tenant-state register (or register array) and how teardown scrubs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TenantState {
    /// The register.
    #[serde(skip)]
    pub reg: Reg,
    /// Its name.
    pub name: &'static str,
    /// Byte offset of the first element.
    pub offset: u32,
    /// Number of 32-bit elements.
    pub count: u32,
    /// The value to write to every element to scrub it: the W1C bits of a W1C
    /// register, else the reset value.
    pub scrub: u32,
    /// What every element reads after the scrub: the reset value.
    pub expect: u32,
}

impl TenantState {
    /// Byte offsets of the elements, in ascending order.
    pub fn words(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.count).map(move |i| self.offset + 4 * i)
    }
    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.count as u64 * 4
    }
}

/// The tenant state, from the table's tenant-state column, in address order — the
/// order to scrub it in: a write to DOORBELL sets IRQ_STATUS, which follows it.
/// Teardown writes each element's `scrub` value and checks it reads `expect`.
pub fn tenant_state() -> Vec<TenantState> {
    REGISTERS
        .iter()
        .filter(|r| r.tenant_state)
        .map(|r| TenantState {
            reg: r.reg,
            name: r.name,
            offset: r.offset,
            count: r.count,
            scrub: if r.w1c != 0 { r.w1c } else { r.reset },
            expect: r.reset,
        })
        .collect()
}

/// A privilege profile of the default MMIO policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// An operator: the rig's own access (flash updates, triggers).
    Operator,
    /// A tenant: the guest the device is lent to.
    Tenant,
}

impl Profile {
    /// Every profile, in name order.
    pub const ALL: [Profile; 2] = [Profile::Operator, Profile::Tenant];

    /// Lower-case name, as in policy files.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Operator => "operator",
            Profile::Tenant => "tenant",
        }
    }

    /// Parse a lower-case profile name.
    pub fn parse(s: &str) -> Option<Profile> {
        Self::ALL.into_iter().find(|p| p.name() == s)
    }

    /// What this profile may do with `def` (its column of the table).
    pub fn perm(self, def: &RegisterDef) -> Perm {
        match self {
            Profile::Operator => def.operator,
            Profile::Tenant => def.tenant,
        }
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which accesses a policy rule covers (as in policy files).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAccess {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Reads and writes.
    Both,
}

/// What a policy rule does (as in policy files).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// The access reaches the device.
    Allow,
    /// Writes are ignored; reads return the rule's value.
    Drop,
    /// Reads return the guest's shadow copy; writes update only the shadow.
    Shadow,
    /// The guest receives an exception.
    Fault,
}

fn ser_reg_name<S: serde::Serializer>(reg: &Reg, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(reg.def().name)
}

/// One rule of the default MMIO policy. Serializes as a rule of a policy file
/// (`register`, `access`, `action`, `alarm`, and `value` when set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DefaultRule {
    /// The register (serialized by its table name).
    #[serde(serialize_with = "ser_reg_name")]
    pub register: Reg,
    /// Which accesses the rule covers.
    pub access: RuleAccess,
    /// What it does.
    pub action: RuleAction,
    /// Whether it raises an alarm.
    pub alarm: bool,
    /// For `drop`: the value reads return (none: 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<u32>,
}

/// The default rules of `profile`, from the table's tenant and operator columns, in
/// address order: every access the profile may not make is dropped (reads return 0)
/// and raises an alarm; registers it may read and write get no rule.
pub fn default_rules(profile: Profile) -> Vec<DefaultRule> {
    REGISTERS
        .iter()
        .filter_map(|r| {
            let p = profile.perm(r);
            let access = match (p.can_read(), p.can_write()) {
                (true, true) => return None,
                (false, false) => RuleAccess::Both,
                (true, false) => RuleAccess::Write,
                (false, true) => RuleAccess::Read,
            };
            Some(DefaultRule {
                register: r.reg,
                access,
                action: RuleAction::Drop,
                alarm: true,
                value: None,
            })
        })
        .collect()
}

/// The default MMIO policy: enforcing, with [`default_rules`] for every profile.
/// Serializes as a policy file (e.g. with `toml::to_string`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DefaultPolicy {
    /// Enforce the rules (always true here).
    pub enforce: bool,
    /// Rules by profile name, in name order.
    pub profile: std::collections::BTreeMap<&'static str, Vec<DefaultRule>>,
}

/// The default MMIO policy (see [`DefaultPolicy`]).
pub fn default_policy() -> DefaultPolicy {
    DefaultPolicy {
        enforce: true,
        profile: Profile::ALL
            .into_iter()
            .map(|p| (p.name(), default_rules(p)))
            .collect(),
    }
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
         `device/src/regmap.rs`. Do not edit: a test fails when this file differs.\n"
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
        "\n## Registers\n\nwritable: the bits a write stores (and a read returns); W1C: the bits a \
         write of 1 clears; tenant state: scrubbed at teardown (in this order).\n\n\
         | offset | name | count | hw | tenant | operator | reset | writable | W1C | tenant state | persistence | description |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in REGISTERS {
        let _ = writeln!(
            s,
            "| 0x{:04x} | {} | {} | {:?} | {} | {} | 0x{:08x} | 0x{:08x} | 0x{:08x} | {} | {:?} | {} |",
            r.offset,
            r.name,
            r.count,
            r.hw,
            r.tenant.label(),
            r.operator.label(),
            r.reset,
            r.writable,
            r.w1c,
            if r.tenant_state { "yes" } else { "no" },
            r.persistence,
            r.doc.replace('|', "\\|")
        );
    }
    let _ = writeln!(s, "\n## Fields\n");
    for r in REGISTERS.iter().filter(|r| !r.fields.is_empty()) {
        let _ = writeln!(
            s,
            "### {}\n\n| bits | name | access | description |\n|---|---|---|---|",
            r.name
        );
        for f in r.fields {
            let bits = if f.width == 1 {
                format!("{}", f.lsb)
            } else {
                format!("{}:{}", f.lsb + f.width - 1, f.lsb)
            };
            let _ = writeln!(s, "| {bits} | {} | {:?} | {} |", f.name, f.access, f.doc);
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
    fn fields_fit_do_not_overlap_and_match_the_hw_kind() {
        for r in REGISTERS {
            let mut seen = 0u32;
            for f in r.fields {
                assert!(
                    f.width >= 1 && f.lsb as u32 + f.width as u32 <= 32,
                    "{}.{}",
                    r.name,
                    f.name
                );
                assert_eq!(seen & f.mask(), 0, "{}.{} overlaps", r.name, f.name);
                seen |= f.mask();
                let ok = match f.access {
                    FieldAccess::Ro => matches!(r.hw, Hw::Ro | Hw::Rw | Hw::W1c),
                    FieldAccess::Rw => r.hw == Hw::Rw,
                    FieldAccess::W1c => r.hw == Hw::W1c,
                };
                assert!(
                    ok,
                    "{}.{}: a {:?} field in a {:?} register",
                    r.name, f.name, f.access, r.hw
                );
            }
            // Masks follow the kind: only storage stores, only W1C clears.
            assert_eq!(r.writable != 0, r.hw == Hw::Rw, "{} writable", r.name);
            assert_eq!(r.w1c != 0, r.hw == Hw::W1c, "{} w1c", r.name);
            assert_eq!(r.writable & r.w1c, 0, "{}", r.name);
            // The reset value fits what the register can hold.
            if r.hw == Hw::Rw && r.persistence == Persistence::Volatile {
                assert_eq!(
                    r.reset & !r.writable,
                    0,
                    "{} reset outside writable",
                    r.name
                );
            }
        }
    }

    /// The generated bit constants are the field masks, and keep the values the
    /// hand-written constants had.
    #[test]
    fn bit_constants_come_from_the_field_lists() {
        let field = |reg: Reg, name: &str| {
            reg.def()
                .fields
                .iter()
                .find(|f| f.name == name)
                .map(|f| f.mask())
                .unwrap_or_else(|| panic!("{reg:?}.{name}"))
        };
        for (c, reg, name, old) in [
            (STATUS_FUSE_BLOWN, Reg::Status, "FUSE_BLOWN", 1 << 1),
            (STATUS_FLASH_UNLOCKED, Reg::Status, "FLASH_UNLOCKED", 1 << 2),
            (STATUS_IRQ_PENDING, Reg::Status, "IRQ_PENDING", 1 << 3),
            (CONTROL_IRQ_ENABLE, Reg::Control, "IRQ_ENABLE", 1),
            (IRQ_DOORBELL, Reg::IrqStatus, "DOORBELL", 1),
            (FLASH_REGION_SELECT, Reg::FlashRegion, "REGION", 3),
            (FLASH_STATUS_UNLOCKED, Reg::FlashStatus, "UNLOCKED", 1),
            (FLASH_STATUS_DONE, Reg::FlashStatus, "DONE", 1 << 1),
            (
                FLASH_STATUS_REFUSED_LOCKED,
                Reg::FlashStatus,
                "REFUSED_LOCKED",
                1 << 2,
            ),
            (
                FLASH_STATUS_REFUSED_FUSE,
                Reg::FlashStatus,
                "REFUSED_FUSE",
                1 << 3,
            ),
            (
                FLASH_STATUS_REFUSED_ARGS,
                Reg::FlashStatus,
                "REFUSED_ARGS",
                1 << 4,
            ),
            (FLASH_STATUS_BAD_KEY, Reg::FlashStatus, "BAD_KEY", 1 << 5),
        ] {
            assert_eq!(c, field(reg, name), "{reg:?}.{name}");
            assert_eq!(c, old, "{reg:?}.{name} kept its value");
        }
        assert_eq!(bit_mask(0, 32), u32::MAX);
        assert_eq!(bit_mask(4, 4), 0xf0);
        // Masks as the model and RTL used them before they came from the table.
        assert_eq!(Reg::Control.def().writable, 1);
        assert_eq!(Reg::FlashRegion.def().writable, 3);
        assert_eq!(Reg::IrqStatus.def().w1c, 1);
        assert_eq!(Reg::Scratch.def().writable, u32::MAX);
    }

    #[test]
    fn register_write_applies_writable_and_w1c_bits() {
        let c = Reg::Control.def();
        assert_eq!(c.write(0, u32::MAX, u32::MAX), 1);
        assert_eq!(c.write(1, 0, 0xff00), 1, "byte 0 not written: kept");
        assert_eq!(c.write(1, 0, 0xff), 0);
        let s = Reg::Scratch.def();
        assert_eq!(s.write(0x1122_3344, 0xaa00, 0xff00), 0x1122_aa44);
        let i = Reg::IrqStatus.def();
        assert_eq!(i.write(1, 0, u32::MAX), 1, "0 keeps");
        assert_eq!(i.write(1, u32::MAX, 0xff00), 1, "byte 0 not written: kept");
        assert_eq!(i.write(1, 1, 0xff), 0, "1 clears");
        for r in REGISTERS.iter().filter(|r| matches!(r.hw, Hw::Ro | Hw::Wo)) {
            assert_eq!(
                r.write(0x5a5a_5a5a, u32::MAX, u32::MAX),
                0x5a5a_5a5a,
                "{}",
                r.name
            );
        }
    }

    #[test]
    fn tenant_state_is_what_teardown_scrubs() {
        let t = tenant_state();
        let names: Vec<_> = t.iter().map(|t| t.name).collect();
        assert_eq!(
            names,
            ["CONTROL", "SCRATCH", "DOORBELL", "IRQ_STATUS", "BUFFER"],
            "teardown scrubs these, in this order"
        );
        for s in &t {
            let d = s.reg.def();
            // A tenant can write it, so a tenant can leave something in it.
            assert!(d.tenant.can_write(), "{}", d.name);
            assert_eq!(d.persistence, Persistence::Volatile, "{}", d.name);
            assert_eq!((s.offset, s.count, s.expect), (d.offset, d.count, d.reset));
        }
        let irq = t.iter().find(|s| s.reg == Reg::IrqStatus).unwrap();
        assert_eq!(irq.scrub, IRQ_DOORBELL, "W1C: written with its W1C bits");
        // DOORBELL's write sets IRQ_STATUS: it must be scrubbed before IRQ_STATUS.
        let pos = |r| t.iter().position(|s| s.reg == r).unwrap();
        assert!(pos(Reg::Doorbell) < pos(Reg::IrqStatus));
        // Every register a tenant may write is tenant state.
        for r in REGISTERS.iter().filter(|r| r.tenant.can_write()) {
            assert!(
                r.tenant_state,
                "{} is tenant-writable but not scrubbed",
                r.name
            );
        }
        let bytes: u64 = t.iter().map(|s| s.bytes()).sum();
        assert_eq!(bytes, 11 * 4 + BUFFER_SIZE as u64);
    }

    #[test]
    fn default_rules_follow_the_permission_columns() {
        for p in Profile::ALL {
            assert_eq!(Profile::parse(p.name()), Some(p));
            let rules = default_rules(p);
            for r in REGISTERS {
                let perm = p.perm(r);
                let rule = rules.iter().find(|x| x.register == r.reg);
                let want = match (perm.can_read(), perm.can_write()) {
                    (true, true) => None,
                    (false, false) => Some(RuleAccess::Both),
                    (true, false) => Some(RuleAccess::Write),
                    (false, true) => Some(RuleAccess::Read),
                };
                assert_eq!(rule.map(|x| x.access), want, "{p} {}", r.name);
                if let Some(x) = rule {
                    assert_eq!((x.action, x.alarm, x.value), (RuleAction::Drop, true, None));
                }
            }
        }
        let t = default_rules(Profile::Tenant);
        assert!(t
            .iter()
            .any(|x| x.register == Reg::DeviceKey && x.access == RuleAccess::Both));
        assert!(t.iter().any(|x| x.register == Reg::HangTrigger));
        assert!(!t
            .iter()
            .any(|x| x.register == Reg::Scratch || x.register == Reg::Buffer));
        // As a policy file: rules by profile name, each with the file's field names.
        let j = serde_json::to_value(default_policy()).unwrap();
        assert_eq!(j["enforce"], true);
        let k = &j["profile"]["tenant"][0];
        assert_eq!(k["register"], "ID");
        assert_eq!(k["access"], "write");
        assert_eq!(k["action"], "drop");
        assert_eq!(k["alarm"], true);
        assert!(k.get("value").is_none());
        assert_eq!(
            j["profile"]["operator"].as_array().unwrap().len(),
            default_rules(Profile::Operator).len()
        );
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

//! The register table's behaviour columns (reset value, writable mask, W1C bits,
//! tenant state) against the behavioural model: what the table says is what the
//! model does. (`fpga/tests/regmap.rs` checks the same against the RTL.)

use hilrig_device::device::{scrub_tenant_state, Device, ResetKind, ScrubError};
use hilrig_device::model::Model;
use hilrig_device::regmap::*;
use hilrig_device::state::{DeviceConfig, NvState};

fn model() -> Model {
    Model::new(NvState::factory(DeviceConfig::with_width(8), 0).unwrap()).unwrap()
}

/// Elements to probe: every element of small registers, a few of the buffer area.
fn elements(def: &RegisterDef) -> Vec<u32> {
    let n = if def.reg == Reg::Buffer { 3 } else { def.count };
    let mut v: Vec<u32> = (0..n).map(|i| def.offset + 4 * i).collect();
    if def.reg == Reg::Buffer {
        v.push(def.end() - 4);
    }
    v
}

/// Registers whose table reset value is what they read after reset. The others
/// read the device's configuration (SERIAL, WIDTH, SLOTS_LEFT = WIDTH, DEVICE_KEY)
/// or flash (FLASH_DATA), as their docs say.
fn reset_is_a_value(def: &RegisterDef) -> bool {
    !matches!(
        def.reg,
        Reg::Serial | Reg::Width | Reg::SlotsLeft | Reg::DeviceKey | Reg::FlashData
    )
}

#[test]
fn every_register_reads_its_reset_value_after_reset() {
    let mut m = model();
    // Dirty every writable register first, then reset.
    for def in REGISTERS
        .iter()
        .filter(|d| d.hw == Hw::Rw || d.hw == Hw::W1c)
    {
        for off in elements(def) {
            m.write32(off, u32::MAX).unwrap();
        }
    }
    m.write32(Reg::Doorbell.offset(), 1).unwrap();
    for kind in [ResetKind::Flr, ResetKind::PowerCycle] {
        m.reset(kind).unwrap();
        for def in REGISTERS.iter().filter(|d| reset_is_a_value(d)) {
            for off in elements(def) {
                assert_eq!(
                    m.read32(off).unwrap(),
                    def.reset,
                    "{} after {kind:?}",
                    def.element_name(off)
                );
            }
        }
    }
}

#[test]
fn all_ones_reads_back_as_the_writable_mask() {
    let mut m = model();
    for def in REGISTERS.iter().filter(|d| d.hw == Hw::Rw) {
        for off in elements(def) {
            m.write32(off, u32::MAX).unwrap();
            assert_eq!(
                m.read32(off).unwrap(),
                def.writable,
                "{}",
                def.element_name(off)
            );
            m.write32(off, 0).unwrap();
            assert_eq!(m.read32(off).unwrap(), 0, "{}", def.element_name(off));
        }
    }
    // Read-only registers ignore writes; write-only ones read 0.
    for def in REGISTERS.iter().filter(|d| d.hw == Hw::Ro) {
        for off in elements(def) {
            let before = m.read32(off).unwrap();
            m.write32(off, !before).unwrap();
            assert_eq!(m.read32(off).unwrap(), before, "{}", def.element_name(off));
        }
    }
    for def in REGISTERS.iter().filter(|d| d.hw == Hw::Wo) {
        assert_eq!(m.read32(def.offset).unwrap(), 0, "{}", def.name);
    }
}

#[test]
fn w1c_bits_clear_on_write_one_and_keep_on_zero() {
    let mut m = model();
    for def in REGISTERS.iter().filter(|d| d.hw == Hw::W1c) {
        // IRQ_STATUS is the only W1C register: the doorbell sets it.
        assert_eq!(
            def.reg,
            Reg::IrqStatus,
            "a new W1C register needs a setter here"
        );
        m.write32(Reg::Doorbell.offset(), 7).unwrap();
        assert_eq!(m.read32(def.offset).unwrap(), def.w1c);
        m.write32(def.offset, !def.w1c).unwrap();
        assert_eq!(m.read32(def.offset).unwrap(), def.w1c, "0 keeps");
        // A byte write that misses the W1C byte keeps it too.
        m.mmio_write(def.offset as u64 + 1, &[0xff]).unwrap();
        assert_eq!(m.read32(def.offset).unwrap(), def.w1c, "other bytes keep");
        m.write32(def.offset, def.w1c).unwrap();
        assert_eq!(m.read32(def.offset).unwrap(), 0, "1 clears");
    }
}

/// Fill every tenant-writable register a tenant could leave something in.
fn dirty(m: &mut dyn Device) {
    for def in REGISTERS.iter().filter(|d| d.tenant.can_write()) {
        for off in elements(def) {
            m.write32(off, 0xdead_beef).unwrap();
        }
    }
    m.write32(Reg::Control.offset(), 1).unwrap();
    m.write32(Reg::Doorbell.offset(), 0x5a).unwrap();
}

#[test]
fn scrubbing_the_tenant_state_leaves_nothing_readable() {
    let mut m = model();
    dirty(&mut m);
    let bytes = scrub_tenant_state(&mut m).unwrap();
    assert_eq!(bytes, 11 * 4 + BUFFER_SIZE as u64);
    for def in REGISTERS.iter().filter(|d| d.tenant.can_read()) {
        for off in (def.offset..def.end()).step_by(4) {
            if def.tenant_state {
                assert_eq!(
                    m.read32(off).unwrap(),
                    def.reset,
                    "{}",
                    def.element_name(off)
                );
            }
        }
    }
    assert_eq!(
        m.read32(Reg::Status.offset()).unwrap() & STATUS_IRQ_PENDING,
        0
    );
}

/// A device that ignores writes to one element: the scrub names it.
struct Sticky(Model, u32);

impl Device for Sticky {
    fn read_word(&mut self, word: u32, mask: u8) -> Result<u32, hilrig_device::DeviceError> {
        self.0.read_word(word, mask)
    }
    fn write_word(
        &mut self,
        word: u32,
        value: u32,
        mask: u8,
    ) -> Result<(), hilrig_device::DeviceError> {
        if word == self.1 {
            return Ok(());
        }
        self.0.write_word(word, value, mask)
    }
    fn rom_size(&self) -> u64 {
        self.0.rom_size()
    }
    fn rom_read(&mut self, o: u64, d: &mut [u8]) -> Result<(), hilrig_device::DeviceError> {
        self.0.rom_read(o, d)
    }
    fn reset(&mut self, k: ResetKind) -> Result<(), hilrig_device::DeviceError> {
        self.0.reset(k)
    }
}

#[test]
fn a_scrub_that_does_not_take_is_named() {
    for (off, name) in [
        (Reg::Scratch.offset() + 12, "SCRATCH[3]"),
        (Reg::IrqStatus.offset(), "IRQ_STATUS"),
        (BUFFER_BASE + 4 * 17, "BUFFER[17]"),
    ] {
        let mut d = Sticky(model(), off);
        dirty(&mut d.0);
        if off >= BUFFER_BASE {
            d.0.write32(off, 0xdead_beef).unwrap();
        }
        let e = scrub_tenant_state(&mut d).unwrap_err();
        assert!(matches!(e, ScrubError::NotScrubbed { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(name) && msg.contains("after scrubbing"),
            "{msg}"
        );
    }
}

#[test]
fn a_hung_device_fails_the_scrub_check() {
    let mut m = model();
    dirty(&mut m);
    m.write32(Reg::HangTrigger.offset(), HANG_MAGIC).unwrap();
    let e = scrub_tenant_state(&mut m).unwrap_err().to_string();
    assert!(e.contains("CONTROL reads 0xffffffff"), "{e}");
}

/// The default policy serializes as the policy file the VMM writes by hand today
/// (`host-vmm`'s `default_policy_toml`: per profile, in name order, one
/// `[[profile.NAME]]` table per rule with register, access, action, alarm).
#[test]
fn default_policy_serializes_as_the_policy_file() {
    let generated: toml::Value =
        toml::from_str(&toml::to_string(&default_policy()).unwrap()).unwrap();
    let mut by_hand = String::from("enforce = true\n");
    for p in Profile::ALL {
        for r in default_rules(p) {
            let access = match r.access {
                RuleAccess::Read => "read",
                RuleAccess::Write => "write",
                RuleAccess::Both => "both",
            };
            by_hand.push_str(&format!(
                "\n[[profile.{}]]\nregister = \"{}\"\naccess = \"{access}\"\naction = \"drop\"\nalarm = true\n",
                p.name(),
                r.register.def().name
            ));
        }
    }
    let by_hand: toml::Value = toml::from_str(&by_hand).unwrap();
    assert_eq!(generated, by_hand);
    let tenant = generated["profile"]["tenant"].as_array().unwrap();
    assert!(tenant
        .iter()
        .any(|r| r["register"].as_str() == Some("DEVICE_KEY")
            && r["access"].as_str() == Some("both")));
}

/// The storage registers (RW and W1C), as (register, element offset) pairs.
fn storage_words() -> Vec<(&'static RegisterDef, u32)> {
    REGISTERS
        .iter()
        .filter(|d| matches!(d.hw, Hw::Rw | Hw::W1c))
        .flat_map(|d| elements(d).into_iter().map(move |o| (d, o)))
        .collect()
}

proptest::proptest! {
    /// Any sequence of byte-masked writes to the storage registers leaves each one
    /// reading what the table's `RegisterDef::write` computes on a shadow copy
    /// (plus the doorbell's documented side effect on IRQ_STATUS).
    #[test]
    fn masked_writes_follow_the_table(
        ops in proptest::collection::vec((0usize..64, proptest::prelude::any::<u32>(), 1u8..16), 1..200)
    ) {
        let words = storage_words();
        let mut m = model();
        let mut shadow: std::collections::HashMap<u32, u32> =
            words.iter().map(|(d, o)| (*o, d.reset)).collect();
        for (i, value, mask) in ops {
            let (def, off) = words[i % words.len()];
            m.write_word(off, value, mask).unwrap();
            let bits = hilrig_device::device::byte_mask_bits(mask);
            let old = shadow[&off];
            shadow.insert(off, def.write(old, value, bits));
            if def.reg == Reg::Doorbell {
                *shadow.get_mut(&Reg::IrqStatus.offset()).unwrap() |= IRQ_DOORBELL;
            }
            for (d, o) in &words {
                proptest::prop_assert_eq!(
                    m.read32(*o).unwrap(),
                    shadow[o],
                    "{} after a write of {:#x} (bytes {:#x}) to {}",
                    d.element_name(*o),
                    value,
                    mask,
                    def.element_name(off)
                );
            }
        }
    }
}

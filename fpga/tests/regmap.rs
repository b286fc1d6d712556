//! The RTL's register decode and behaviour agree with the register table.

use hilrig_device::device::{Device, ResetKind};
use hilrig_device::model::Model;
use hilrig_device::regmap::*;
use hilrig_device::state::{DeviceConfig, NvState};
use hilrig_fpga::Rtl;

fn fresh() -> (Model, Rtl) {
    let nv = NvState::factory(DeviceConfig::with_width(8), 42).unwrap();
    (Model::new(nv.clone()).unwrap(), Rtl::new(nv).unwrap())
}

#[test]
fn rtl_decode_matches_the_table() {
    let (_, rtl) = fresh();
    let map = rtl.core().decode_map();
    assert_eq!(map.len(), REGISTERS.len(), "every register decoded once");
    for def in REGISTERS {
        let (name, _, start, end) = map
            .iter()
            .find(|(_, r, _, _)| *r == def.reg)
            .unwrap_or_else(|| panic!("{} is not decoded by the RTL", def.name));
        assert_eq!(*name, def.name);
        assert_eq!(*start * 4, def.offset, "{} offset", def.name);
        assert_eq!(*end * 4, def.end(), "{} extent", def.name);
    }
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

#[test]
fn rtl_reset_values_and_access_kinds_match_the_table() {
    let (mut model, mut rtl) = fresh();
    rtl.reset(ResetKind::PowerCycle).unwrap();
    for def in REGISTERS {
        for off in elements(def) {
            let name = def.element_name(off);
            let r = rtl.read32(off).unwrap();
            assert_eq!(r, model.read32(off).unwrap(), "{name} after reset");
            // FLASH_DATA is a window onto flash (table: volatile, reset 0), so after
            // reset it shows the flash word at address 0, like the model does.
            if (matches!(def.persistence, Persistence::Volatile) && def.reg != Reg::FlashData)
                || matches!(def.reg, Reg::Id | Reg::Version | Reg::Status)
            {
                assert_eq!(r, def.reset, "{name} reset value");
            }
        }
    }
    for def in REGISTERS {
        for off in elements(def) {
            let name = def.element_name(off);
            let r = rtl.read32(off).unwrap();
            match def.hw {
                Hw::Ro => {
                    rtl.write32(off, !r).unwrap();
                    assert_eq!(rtl.read32(off).unwrap(), r, "{name} is read-only");
                }
                Hw::Wo => {
                    assert_eq!(r, 0, "{name} is write-only: reads 0");
                }
                Hw::Rw => {
                    for pat in [0xa5a5_5a5b_u32, 0x1234_5679] {
                        rtl.write32(off, pat).unwrap();
                        model.write32(off, pat).unwrap();
                        let got = rtl.read32(off).unwrap();
                        assert_eq!(
                            got,
                            model.read32(off).unwrap(),
                            "{name} stores like the model"
                        );
                        assert_ne!(got, 0, "{name} stores something");
                        // A byte write changes only that byte.
                        rtl.mmio_write(off as u64 + 1, &[0x77]).unwrap();
                        model.mmio_write(off as u64 + 1, &[0x77]).unwrap();
                        assert_eq!(
                            rtl.read32(off).unwrap(),
                            model.read32(off).unwrap(),
                            "{name}"
                        );
                    }
                }
                Hw::W1c => {
                    // IRQ_STATUS: set by the doorbell, cleared by writing 1.
                    rtl.write32(Reg::Doorbell.offset(), 1).unwrap();
                    assert_eq!(rtl.read32(off).unwrap(), IRQ_DOORBELL);
                    rtl.write32(off, 0).unwrap();
                    assert_eq!(rtl.read32(off).unwrap(), IRQ_DOORBELL, "{name}: 0 keeps");
                    rtl.write32(off, IRQ_DOORBELL).unwrap();
                    assert_eq!(rtl.read32(off).unwrap(), 0, "{name}: 1 clears");
                }
            }
        }
    }
    // Holes read 0 and ignore writes.
    rtl.write32(0x0ffc, 7).unwrap();
    assert_eq!(rtl.read32(0x0ffc).unwrap(), 0);
}

/// Registers whose table reset value is what they read after reset (the others
/// read the configuration: SERIAL, WIDTH, SLOTS_LEFT, DEVICE_KEY; or flash:
/// FLASH_DATA).
fn reset_is_a_value(def: &RegisterDef) -> bool {
    !matches!(
        def.reg,
        Reg::Serial | Reg::Width | Reg::SlotsLeft | Reg::DeviceKey | Reg::FlashData
    )
}

/// Every register a tenant or operator can write, dirtied with all-ones (and the
/// doorbell rung), so a reset or scrub has something to clear.
fn dirty(d: &mut dyn Device) {
    for def in REGISTERS
        .iter()
        .filter(|d| matches!(d.hw, Hw::Rw | Hw::W1c))
    {
        for off in elements(def) {
            d.write32(off, u32::MAX).unwrap();
        }
    }
    d.write32(Reg::Doorbell.offset(), 1).unwrap();
}

#[test]
fn rtl_reads_every_reset_value_of_the_table_after_each_reset() {
    let (mut model, mut rtl) = fresh();
    for kind in [ResetKind::Flr, ResetKind::PowerCycle] {
        dirty(&mut rtl);
        dirty(&mut model);
        rtl.reset(kind).unwrap();
        model.reset(kind).unwrap();
        for def in REGISTERS {
            for off in elements(def) {
                let name = def.element_name(off);
                let r = rtl.read32(off).unwrap();
                assert_eq!(r, model.read32(off).unwrap(), "{name} after {kind:?}");
                if reset_is_a_value(def) {
                    assert_eq!(r, def.reset, "{name}: the table's reset value");
                }
            }
        }
    }
    // SOFT_RESET clears the same volatile registers.
    dirty(&mut rtl);
    rtl.write32(Reg::SoftReset.offset(), SOFT_RESET_MAGIC)
        .unwrap();
    for def in REGISTERS.iter().filter(|d| reset_is_a_value(d)) {
        for off in elements(def) {
            assert_eq!(
                rtl.read32(off).unwrap(),
                def.reset,
                "{} after SOFT_RESET",
                def.element_name(off)
            );
        }
    }
}

#[test]
fn rtl_all_ones_reads_back_as_the_writable_mask() {
    let (mut model, mut rtl) = fresh();
    for def in REGISTERS.iter().filter(|d| d.hw == Hw::Rw) {
        for off in elements(def) {
            let name = def.element_name(off);
            for d in [&mut rtl as &mut dyn Device, &mut model] {
                d.write32(off, u32::MAX).unwrap();
                assert_eq!(d.read32(off).unwrap(), def.writable, "{name}");
                // Each byte alone sets only that byte's writable bits.
                for b in 0..4u32 {
                    d.write32(off, 0).unwrap();
                    d.mmio_write(off as u64 + b as u64, &[0xff]).unwrap();
                    assert_eq!(
                        d.read32(off).unwrap(),
                        def.writable & (0xff << (8 * b)),
                        "{name} byte {b}"
                    );
                }
                d.write32(off, 0).unwrap();
            }
        }
    }
}

#[test]
fn rtl_w1c_bits_clear_on_write_one() {
    let (_, mut rtl) = fresh();
    for def in REGISTERS.iter().filter(|d| d.hw == Hw::W1c) {
        assert_eq!(
            def.reg,
            Reg::IrqStatus,
            "a new W1C register needs a setter here"
        );
        rtl.write32(Reg::Doorbell.offset(), 1).unwrap();
        assert_eq!(rtl.read32(def.offset).unwrap(), def.w1c);
        rtl.write32(def.offset, !def.w1c).unwrap();
        assert_eq!(rtl.read32(def.offset).unwrap(), def.w1c, "0 keeps");
        rtl.mmio_write(def.offset as u64 + 1, &[0xff]).unwrap();
        assert_eq!(rtl.read32(def.offset).unwrap(), def.w1c, "other bytes keep");
        rtl.write32(def.offset, u32::MAX).unwrap();
        assert_eq!(rtl.read32(def.offset).unwrap(), 0, "1 clears");
    }
    // IRQ_PENDING is IRQ_STATUS & CONTROL.IRQ_ENABLE.
    rtl.write32(Reg::Control.offset(), CONTROL_IRQ_ENABLE)
        .unwrap();
    rtl.write32(Reg::Doorbell.offset(), 1).unwrap();
    assert_ne!(
        rtl.read32(Reg::Status.offset()).unwrap() & STATUS_IRQ_PENDING,
        0
    );
    rtl.write32(Reg::IrqStatus.offset(), IRQ_DOORBELL).unwrap();
    assert_eq!(
        rtl.read32(Reg::Status.offset()).unwrap() & STATUS_IRQ_PENDING,
        0
    );
}

#[test]
fn rtl_tenant_state_scrubs_to_the_reset_values() {
    let (_, mut rtl) = fresh();
    dirty(&mut rtl);
    for off in [BUFFER_BASE + 4 * 100, BUFFER_BASE + 4 * 5000] {
        rtl.write32(off, 0xdead_beef).unwrap();
    }
    let bytes = hilrig_device::device::scrub_tenant_state(&mut rtl).unwrap();
    assert_eq!(bytes, tenant_state().iter().map(|t| t.bytes()).sum::<u64>());
}

/// Seeded byte-masked writes to every storage register (RW and W1C): the RTL reads
/// back what the table's `RegisterDef::write` computes on a shadow copy (plus the
/// doorbell's side effect on IRQ_STATUS), as the model does.
#[test]
fn rtl_masked_writes_follow_the_table() {
    let (mut model, mut rtl) = fresh();
    let words: Vec<(&RegisterDef, u32)> = REGISTERS
        .iter()
        .filter(|d| matches!(d.hw, Hw::Rw | Hw::W1c))
        .flat_map(|d| elements(d).into_iter().map(move |o| (d, o)))
        .collect();
    let mut shadow: std::collections::HashMap<u32, u32> =
        words.iter().map(|(d, o)| (*o, d.reset)).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for step in 0..600 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (def, off) = words[(x % words.len() as u64) as usize];
        let value = (x >> 16) as u32 ^ (x >> 40) as u32;
        let mask = 1 + ((x >> 8) % 15) as u8;
        rtl.write_word(off, value, mask).unwrap();
        model.write_word(off, value, mask).unwrap();
        let bits = hilrig_device::device::byte_mask_bits(mask);
        let old = shadow[&off];
        shadow.insert(off, def.write(old, value, bits));
        if def.reg == Reg::Doorbell {
            *shadow.get_mut(&Reg::IrqStatus.offset()).unwrap() |= IRQ_DOORBELL;
        }
        for (d, o) in &words {
            let name = d.element_name(*o);
            let got = rtl.read32(*o).unwrap();
            assert_eq!(
                got,
                shadow[o],
                "step {step}: {name} after {value:#x} (bytes {mask:#x}) to {}",
                def.element_name(off)
            );
            assert_eq!(got, model.read32(*o).unwrap(), "step {step}: {name}");
        }
    }
}

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

//! Cycle-level behaviour of the flash controller: ERASE and PROGRAM are multi-cycle
//! state machines (BUSY meanwhile), one word per cycle for ERASE, two for PROGRAM.

use hilrig_device::device::Device;
use hilrig_device::model::ops;
use hilrig_device::regmap::*;
use hilrig_device::state::{DeviceConfig, NvState};
use hilrig_fpga::Rtl;

#[test]
fn erase_and_program_take_cycles_proportional_to_their_size() {
    let cfg = DeviceConfig::with_width(16);
    let words = cfg.region_sizes[Region::Firmware as usize] as u64 / 4;
    let mut rtl = Rtl::new(NvState::factory(cfg, 1).unwrap()).unwrap();
    ops::unlock(&mut rtl).unwrap();
    rtl.write32(Reg::FlashRegion.offset(), Region::Firmware as u32)
        .unwrap();
    let c0 = rtl.cycles();
    rtl.write32(Reg::FlashCmd.offset(), FLASH_CMD_ERASE)
        .unwrap();
    let erase = rtl.cycles() - c0;
    assert!(
        (words..words + 16).contains(&erase),
        "erase of {words} words took {erase} cycles"
    );
    // A plain register write is two cycles.
    let c0 = rtl.cycles();
    rtl.write32(Reg::Scratch.offset(), 1).unwrap();
    assert_eq!(rtl.cycles() - c0, 2);
    // PROGRAM of 256 words: two cycles a word.
    for i in 0..256u32 {
        rtl.write32(BUFFER_BASE + 4 * i, i).unwrap();
    }
    rtl.write32(Reg::FlashAddr.offset(), 0).unwrap();
    rtl.write32(Reg::FlashSrc.offset(), 0).unwrap();
    rtl.write32(Reg::FlashLen.offset(), 1024).unwrap();
    let c0 = rtl.cycles();
    rtl.write32(Reg::FlashCmd.offset(), FLASH_CMD_PROGRAM)
        .unwrap();
    let program = rtl.cycles() - c0;
    assert!(
        (512..512 + 16).contains(&program),
        "program of 256 words took {program} cycles"
    );
    assert_ne!(
        rtl.read32(Reg::FlashStatus.offset()).unwrap() & FLASH_STATUS_DONE,
        0
    );
    assert!(
        !rtl.core().busy.val(),
        "BUSY drops when the command is done"
    );
}

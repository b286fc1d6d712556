//! The simulated host's idle guest: what a powered-on simulated host runs.

use crate::error::Result;
use crate::payload::{Payload, Width};
use hilrig_device::regmap::{Reg, Region, FLASH_CMD_ERASE};
use iced_x86::code_asm::*;

/// The line the idle guest prints once it runs.
pub const BOOT_BANNER: &str = "hilrig-sim: up";
/// Marker the idle guest leaves in SCRATCH[0] (volatile: gone after power off).
pub const SCRATCH_MARK: u32 = 0x5A5A_5A5A;

/// The idle guest: reads SCRATCH[0] and prints `scratch: kept` if it holds
/// [`SCRATCH_MARK`] (volatile state survived) or `scratch: clear`, writes the mark,
/// prints [`BOOT_BANNER`], then spins on `pause` forever. With `count_boot`, every
/// boot first makes one ERASE attempt on the CONFIG region (refused: flash stays
/// locked, but counted, so each boot raises the CONFIG counter and MASTER by one,
/// persisted by the VMM before the banner appears).
pub fn idle(count_boot: bool) -> Result<Vec<u8>> {
    let mut p = Payload::new()?;
    if count_boot {
        p.mmio_write(Width::B4, Reg::FlashRegion.offset(), Region::Config as u64)?;
        p.mmio_write(
            Width::B4,
            Reg::FlashCmd.offset(),
            u64::from(FLASH_CMD_ERASE),
        )?;
    }
    let mut clear = p.a.create_label();
    let mut after = p.a.create_label();
    p.mmio_read(Width::B4, Reg::Scratch.offset())?;
    p.a.cmp(eax, SCRATCH_MARK as i32)?;
    p.a.jne(clear)?;
    p.print("scratch: kept\n")?;
    p.a.jmp(after)?;
    p.a.set_label(&mut clear)?;
    p.print("scratch: clear\n")?;
    p.a.set_label(&mut after)?;
    p.mmio_write(Width::B4, Reg::Scratch.offset(), u64::from(SCRATCH_MARK))?;
    p.print(&format!("{BOOT_BANNER}\n"))?;
    let mut spin = p.a.create_label();
    p.a.set_label(&mut spin)?;
    p.a.pause()?;
    p.a.jmp(spin)?;
    p.build()
}

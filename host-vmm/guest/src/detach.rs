//! Payloads that outlive their device (issue 21.5, detach): the guest uses the
//! device, the VMM takes it away (a control `detach`, or a `[breach]` trigger with
//! `action = "detach"`), and the guest sees it gone and keeps running.

use crate::abi::DEVICE_SLOT;
use crate::payload::{Payload, Width};
use hilrig_device::regmap::{Reg, HANG_MAGIC, PCI_DEVICE_ID, PCI_VENDOR_ID};
use iced_x86::code_asm::*;

type R<T = ()> = crate::error::Result<T>;

/// What the payload leaves in SCRATCH[0] (tenant state the detach must scrub).
pub const SECRET: u32 = 0x5EC2_E7D7;
/// Printed once the device is in use: the VMM may detach it from now on.
pub const READY: &str = "detach: device in use, waiting for it to go\n";
/// Printed after the device is gone and the guest still runs.
pub const SURVIVED: &str = "detach: device gone, guest still running\n";
/// Sent to the result port after the device is gone.
pub const MARKER: u32 = 0xDE7A_C4ED;

/// Verdict codes of the detach payloads (0 = pass).
pub mod codes {
    /// Before the detach the device's IDs did not read as the reference device's.
    pub const NOT_THERE: u32 = 0x21;
    /// SCRATCH[0] did not keep the secret.
    pub const SCRATCH: u32 = 0x22;
    /// After the detach BAR0's config register did not read all ones.
    pub const BAR0_NOT_ONES: u32 = 0x23;
    /// After the detach a read where BAR0 was did not read all ones.
    pub const MMIO_NOT_ONES: u32 = 0x24;
    /// After the detach the device ID half of config dword 0 was not 0xffff.
    pub const DEVICE_ID_NOT_ONES: u32 = 0x25;
}

/// `detach-wait` (`hang_writes` = 0) / `detach-alarms` (3): vCPU 0 checks the device
/// is there (config IDs), leaves [`SECRET`] in SCRATCH[0] and reads it back, prints
/// [`READY`], writes HANG_MAGIC to HANG_TRIGGER `hang_writes` times (a tenant's
/// writes are dropped with an alarm: what a `[breach]` alarm threshold counts), then
/// polls the vendor ID in config space until it reads 0xffff. Then it checks the
/// device ID and BAR0's config register read all ones and a read where BAR0 was
/// reads all ones, prints [`SURVIVED`], sends [`MARKER`] to the result port and
/// passes.
pub fn detach_wait(hang_writes: u32) -> R<Vec<u8>> {
    use codes::*;
    let mut p = Payload::new()?;
    p.park_secondaries()?;
    let ids = u32::from(PCI_DEVICE_ID) << 16 | u32::from(PCI_VENDOR_ID);
    // r12d: CONFIG_ADDRESS of the device, register 0.
    p.a.mov(r12d, 0x8000_0000u32 | (u32::from(DEVICE_SLOT) << 11))?;
    p.cfg_read(r12d, 0)?;
    p.expect_rax(u64::from(ids), NOT_THERE)?;
    p.mmio_write(Width::B4, Reg::Scratch.offset(), u64::from(SECRET))?;
    p.mmio_read(Width::B4, Reg::Scratch.offset())?;
    p.expect_rax(u64::from(SECRET), SCRATCH)?;
    p.print(READY)?;
    for _ in 0..hang_writes {
        p.mmio_write(Width::B4, Reg::HangTrigger.offset(), u64::from(HANG_MAGIC))?;
    }
    // Poll the vendor ID until the function is gone.
    let mut poll = p.a.create_label();
    p.a.set_label(&mut poll)?;
    p.a.pause()?;
    p.cfg_read(r12d, 0)?;
    p.a.cmp(ax, 0xffffu32 as i32)?;
    p.a.jne(poll)?;
    p.a.shr(eax, 16)?;
    p.expect_rax(0xffff, DEVICE_ID_NOT_ONES)?;
    p.cfg_read(r12d, 0x10)?;
    p.expect_rax(0xffff_ffff, BAR0_NOT_ONES)?;
    p.mmio_read(Width::B4, Reg::Scratch.offset())?;
    p.expect_rax(0xffff_ffff, MMIO_NOT_ONES)?;
    p.print(SURVIVED)?;
    p.a.mov(eax, MARKER)?;
    p.result_eax()?;
    p.report(0)?;
    p.build()
}

//! The campaign scenarios' generated payloads: guest code built from the device
//! state it will run on (counted flash attempts, writes to the counters page, a
//! program sequence a power cut interrupts, fuse exhaustion).

use crate::error::{GuestError, Result};
use crate::payload::{Payload, Width};
use hilrig_device::regmap::{
    Reg, BUFFER_BASE, FLASH_CMD_PROGRAM, SOFT_RESET_MAGIC, UNLOCK_KEY1, UNLOCK_KEY2,
};
use hilrig_device::{NvState, Region};

/// A guest payload generated for the attempt (`--payload <file>`), from the device
/// state it will run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gen {
    /// `n` PROGRAM commands on FIRMWARE with the controller locked: each one refused
    /// and counted, flash unchanged.
    FlashAttempts(u32),
    /// One refused (counted) attempt, then 0 / 1 / ~0 / 0x80000000 written to every
    /// word of the counters page at 4 and 8 bytes and the soft-reset magic; the
    /// counters page is read before and after (results: 8 words, then 8 words).
    CounterWrites,
    /// An authorised-looking update: unlock, then `n` 4-byte PROGRAMs of zeros
    /// into FIRMWARE words that are not zero, each followed by a console marker
    /// `P<i>` and a delay (so the rig can cut power between two of them).
    ProgramSeq(u32),
    /// `n` locked PROGRAM attempts on FIRMWARE (past the fuse), then a correct
    /// unlock and a PROGRAM that the blown fuse must refuse. Results: FLASH_STATUS,
    /// FUSE, SLOTS_LEFT, MASTER.
    FuseBurn(u32),
}

/// MMIO reads of ID between two steps of [`Gen::ProgramSeq`] (each a trapped exit,
/// ~10 µs here: a pause of ~20 ms the rig can cut power in).
pub const STEP_DELAY_READS: u64 = 2000;

/// Counters-page words read before and after [`Gen::CounterWrites`]' writes:
/// COUNTER[0..3], MASTER, FUSE, SLOTS_LEFT, WIDTH, EPOCH.
pub const COUNTER_PAGE_WORDS: u32 = 8;

fn w(p: &mut Payload, reg: Reg, v: u32) -> Result {
    p.guard(|p| p.mmio_write(Width::B4, reg.offset(), v as u64))
}

/// Report the register at `off` (a faulting read reports `attacks::MARK`).
fn report_reg(p: &mut Payload, off: u32) -> Result {
    p.guard(|p| {
        p.a.mov(iced_x86::code_asm::eax, crate::attacks::MARK)?;
        p.mmio_read(Width::B4, off)
    })?;
    p.result_eax()
}

/// One locked PROGRAM attempt on FIRMWARE: refused and counted.
fn locked_attempt(p: &mut Payload) -> Result {
    w(p, Reg::FlashRegion, Region::Firmware as u32)?;
    w(p, Reg::FlashAddr, 0)?;
    w(p, Reg::FlashLen, 4)?;
    w(p, Reg::FlashSrc, 0)?;
    w(p, Reg::FlashCmd, FLASH_CMD_PROGRAM)
}

/// The FIRMWARE words [`Gen::ProgramSeq`] programs (zeros into words that are not
/// zero, so every step changes the image).
pub fn program_words(nv: &NvState, n: u32) -> Result<Vec<u32>> {
    let fw = &nv.flash[Region::Firmware as usize];
    let words: Vec<u32> = fw
        .chunks_exact(4)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|b| *b != 0))
        .map(|(i, _)| 4 * i as u32)
        .take(n as usize)
        .collect();
    if words.len() < n as usize {
        return Err(GuestError::Payload {
            what: format!("program sequence of {n}"),
            detail: format!("the FIRMWARE image has only {} non-zero words", words.len()),
        });
    }
    Ok(words)
}

/// The generated payload `gen` for a device in state `nv`.
pub fn payload(gen: Gen, nv: &NvState) -> Result<Vec<u8>> {
    let mut p = Payload::new()?;
    p.park_secondaries()?;
    p.install_fault_handler()?;
    let counters = Reg::Counter.offset();
    match gen {
        Gen::FlashAttempts(n) => {
            for _ in 0..n {
                locked_attempt(&mut p)?;
            }
        }
        Gen::CounterWrites => {
            locked_attempt(&mut p)?;
            for i in 0..COUNTER_PAGE_WORDS {
                report_reg(&mut p, counters + 4 * i)?;
            }
            for i in 0..COUNTER_PAGE_WORDS {
                for v in [0u64, 1, 0xffff_ffff, 0x8000_0000] {
                    p.guard(|p| p.mmio_write(Width::B4, counters + 4 * i, v))?;
                }
            }
            for i in 0..COUNTER_PAGE_WORDS / 2 {
                for v in [0u64, u64::MAX] {
                    p.guard(|p| p.mmio_write(Width::B8, counters + 8 * i, v))?;
                }
            }
            w(&mut p, Reg::SoftReset, SOFT_RESET_MAGIC)?;
            for i in 0..COUNTER_PAGE_WORDS {
                report_reg(&mut p, counters + 4 * i)?;
            }
        }
        Gen::ProgramSeq(n) => {
            let words = program_words(nv, n)?;
            w(&mut p, Reg::FlashUnlock, UNLOCK_KEY1)?;
            w(&mut p, Reg::FlashUnlock, UNLOCK_KEY2)?;
            p.mmio_write(Width::B4, BUFFER_BASE, 0)?;
            w(&mut p, Reg::FlashRegion, Region::Firmware as u32)?;
            w(&mut p, Reg::FlashLen, 4)?;
            w(&mut p, Reg::FlashSrc, 0)?;
            for (i, addr) in words.iter().enumerate() {
                w(&mut p, Reg::FlashAddr, *addr)?;
                w(&mut p, Reg::FlashCmd, FLASH_CMD_PROGRAM)?;
                p.print(&format!("P{}\n", i + 1))?;
                p.repeat(STEP_DELAY_READS, |p| {
                    p.mmio_read(Width::B4, Reg::Id.offset())
                })?;
            }
        }
        Gen::FuseBurn(n) => {
            for _ in 0..n {
                locked_attempt(&mut p)?;
            }
            w(&mut p, Reg::FlashUnlock, UNLOCK_KEY1)?;
            w(&mut p, Reg::FlashUnlock, UNLOCK_KEY2)?;
            p.mmio_write(Width::B4, BUFFER_BASE, 0)?;
            w(&mut p, Reg::FlashCmd, FLASH_CMD_PROGRAM)?;
            for r in [Reg::FlashStatus, Reg::Fuse, Reg::SlotsLeft, Reg::Master] {
                report_reg(&mut p, r.offset())?;
            }
        }
    }
    p.report(0)?;
    p.build()
}

//! Attack payloads against the MMIO policy: every instruction form the policy must
//! decide per register (mov of 1/2/4/8 bytes, `rep movs`/`rep stos` across a
//! restricted/unrestricted boundary both ways and with DF set, `xchg`, lock-prefixed
//! read-modify-writes, 16/32-byte vector loads and stores straddling registers), the
//! hang magic, the flash unlock + program sequence, and DEVICE_KEY reads.
//!
//! Each payload installs the fault handler ([`Payload::install_fault_handler`]),
//! guards every restricted access ([`Payload::guard`]), reports what it saw through
//! the result port (see each payload's docs for the sequence) and ends with the
//! fault count as its last result and verdict 0. A faulting read leaves its
//! destination register with [`MARK`].

use crate::payload::{Payload, Width};
use hilrig_device::regmap::{
    Reg, FLASH_CMD_PROGRAM, HANG_MAGIC, SOFT_RESET_MAGIC, UNLOCK_KEY1, UNLOCK_KEY2,
};
use iced_x86::code_asm::*;

type R<T = ()> = crate::error::Result<T>;

/// Guest RAM the attacks use as a source/destination buffer (below the page tables).
pub const RAM_BUF: u64 = 0x4000;
/// What a register holds when the read that should have filled it faulted.
pub const MARK: u32 = 0xFA17_FA17;
/// The value `vector`/`avx` store in `SCRATCH[7]` and DOORBELL.
pub const VEC_VALUES: [u32; 4] = [0x7777_7777, 0x0d0d_0d0d, 0, HANG_MAGIC];

/// The attacks: name and what they report.
pub const ATTACKS: &[(&str, &str)] = &[
    ("attack-mov-widths", "FLASH_LEN/FLASH_SRC: 1/2/4/8-byte writes each read back (lo, hi)"),
    ("attack-hang", "write HANG_MAGIC to HANG_TRIGGER; report ID"),
    ("attack-key-read", "DEVICE_KEY[0..8] at 4 bytes, then 8 bytes at KEY+4 (lo, hi)"),
    ("attack-rep-movs-write", "rep movsd RAM->BAR 0x30..0x48 (DOORBELL..SERIAL, the hang and reset magics); report SCRATCH[0], ID, DOORBELL"),
    ("attack-rep-movs-write-df", "the same with DF set (descending)"),
    ("attack-rep-movs-read", "rep movsd BAR 0x2ff8..0x3010 (into DEVICE_KEY) -> RAM; report the 6 dwords"),
    ("attack-rep-movs-read-df", "the same with DF set"),
    ("attack-rep-stos", "rep stosd HANG_MAGIC over 0x30..0x40; report SCRATCH[0], ID, DOORBELL"),
    ("attack-rep-stos-df", "the same with DF set"),
    ("attack-xchg", "xchg with DEVICE_KEY[0] and with HANG_TRIGGER (magic); report old values, ID"),
    ("attack-lock-rmw", "lock or/add/xadd on FLASH_LEN, lock cmpxchg on DEVICE_KEY[0], lock or of the hang magic; report cmpxchg eax, xadd old, FLASH_LEN, ID"),
    ("attack-vector", "movdqu loads at 0x2ff8 and 0x2ffc (into DEVICE_KEY), a 16-byte store over SCRATCH[7]..HANG_TRIGGER; report 8 dwords, SCRATCH[7], DOORBELL, ID"),
    ("attack-avx", "vmovdqu 32-byte load at 0x2ff0, 32-byte store over SCRATCH[4]..SOFT_RESET; report 8 dwords, SCRATCH[4], ID"),
    ("attack-flash-program", "unlock, select FIRMWARE, program 4 bytes; report FLASH_STATUS, COUNTER[1], MASTER"),
];

/// Attacks on the VMM itself from the guest (issue 16, guest-facing): each ends in a
/// verdict, an exception or alarms, never a VMM error. Not in [`ATTACKS`] (the
/// campaigns' policy library, which expects every attack to pass under every
/// profile); `tests/hostile_guest.rs` runs them.
pub const HOSTILE: &[(&str, &str)] = &[
    ("attack-alarm-flood", "300 DEVICE_KEY[0] reads, then the flash unlock + program sequence (its alarms must not be hidden by the flood)"),
    ("attack-rep-ins-outs", "rep insd of 4 PCI IDs into RAM, rep insd of 2 into BAR0 up to HANG_TRIGGER, rep outsd of 3 to the result port; report the 4 dwords, the 3 outs, ID"),
    ("attack-bad-access-write", "a 4-byte write past BAR0 (nothing claims it) followed by other instructions: BAD ACCESS must name the write"),
    ("attack-cmpxchg16b", "cmpxchg16b on SCRATCH[0..4] (KVM cannot emulate it on MMIO); report fault vector"),
    ("attack-fxsave", "fxsave to BAR0 0x100 (512 bytes over page 0; KVM cannot emulate it on MMIO); report fault vector"),
    ("attack-enter-nested", "enter 16, 2 with rbp in BAR0 (nesting reads the frame from MMIO; KVM cannot emulate it); report fault vector"),
    ("attack-sgdt", "sgdt to SCRATCH[0] (a trapped page: KVM loops on it inside KVM_RUN, no exit reaches the VMM); report fault vector"),
    ("attack-sidt", "sidt to SCRATCH[0] (the same); report fault vector"),
    ("attack-code-on-bar", "copy `mov eax,[rdi+3000h]; ret` into the first data-buffer page (mapped straight into the guest) and call it: the DEVICE_KEY read's alarm must name it"),
    ("attack-split-store-page", "a 16-byte movdqu store at BAR0 0x2ffc: 4 bytes on page 2, 12 on page 3 (KVM: 4 + 8 + 4); report fault count"),
    ("attack-split-store-ram", "8-byte stores across a RAM page and the key page (linear pages: RAM, BAR0 page 3, RAM) both ways, and from page 3 onto the data buffers; report the RAM/buffer dwords and the fault count"),
    ("attack-buffer-write", "write BUFFER_MAGIC to the first data-buffer word and read it back (a page without rules: under --trap all the profile's default decides); report the value read"),
];

/// Build the attack `name`, if there is one.
pub fn attack(name: &str) -> Option<R<Vec<u8>>> {
    Some(match name {
        "attack-mov-widths" => mov_widths(),
        "attack-hang" => hang(),
        "attack-key-read" => key_read(),
        "attack-rep-movs-write" => rep_movs_write(false),
        "attack-rep-movs-write-df" => rep_movs_write(true),
        "attack-rep-movs-read" => rep_movs_read(false),
        "attack-rep-movs-read-df" => rep_movs_read(true),
        "attack-rep-stos" => rep_stos(false),
        "attack-rep-stos-df" => rep_stos(true),
        "attack-xchg" => xchg_attack(),
        "attack-lock-rmw" => lock_rmw(),
        "attack-vector" => vector(),
        "attack-avx" => avx(),
        "attack-flash-program" => flash_program(),
        "attack-alarm-flood" => alarm_flood(),
        "attack-rep-ins-outs" => rep_ins_outs(),
        "attack-bad-access-write" => bad_access_write(),
        "attack-cmpxchg16b" => unemulated(Unemulated::Cmpxchg16b),
        "attack-fxsave" => unemulated(Unemulated::Fxsave),
        "attack-enter-nested" => unemulated(Unemulated::EnterNested),
        "attack-sgdt" => unemulated(Unemulated::Sgdt),
        "attack-sidt" => unemulated(Unemulated::Sidt),
        "attack-split-store-page" => split_store_page(),
        "attack-code-on-bar" => code_on_bar(),
        "attack-buffer-write" => buffer_write(),
        "attack-split-store-ram" => split_store_ram(),
        _ => return None,
    })
}

fn off(r: Reg) -> i32 {
    r.offset() as i32
}

fn wrap(body: impl FnOnce(&mut Payload) -> R) -> R<Vec<u8>> {
    let mut p = Payload::new()?;
    p.park_secondaries()?;
    p.install_fault_handler()?;
    body(&mut p)?;
    p.result_fault_count()?;
    p.report(0)?;
    p.build()
}

/// Report the 4-byte register at BAR0 + `o` (unguarded read).
fn report_reg(p: &mut Payload, o: i32) -> R {
    p.a.mov(eax, dword_ptr(rdi + o))?;
    p.result_eax()
}

/// Store `vals` as dwords at [`RAM_BUF`].
fn fill_ram(p: &mut Payload, vals: &[u32]) -> R {
    p.a.mov(rbx, RAM_BUF)?;
    for (i, v) in vals.iter().enumerate() {
        p.a.mov(dword_ptr(rbx + 4 * i as i32), *v)?;
    }
    Ok(())
}

/// Report `n` dwords from [`RAM_BUF`].
fn report_ram(p: &mut Payload, n: usize) -> R {
    for i in 0..n {
        p.a.mov(rbx, RAM_BUF)?;
        p.a.mov(eax, dword_ptr(rbx + 4 * i as i32))?;
        p.result_eax()?;
    }
    Ok(())
}

/// `attack-mov-widths`: results `[0x11, 0, 0x2222, 0, 0x3333_3333, 0, 0x5555_5555,
/// 0x4444_4444]` when allowed (FLASH_LEN, then FLASH_LEN+FLASH_SRC at 8 bytes).
pub fn mov_widths() -> R<Vec<u8>> {
    wrap(|p| {
        let o = Reg::FlashLen.offset();
        let steps: [(Width, u64); 4] = [
            (Width::B1, 0x11),
            (Width::B2, 0x2222),
            (Width::B4, 0x3333_3333),
            (Width::B8, 0x4444_4444_5555_5555),
        ];
        for (w, v) in steps {
            p.guard(|p| p.mmio_write(w, o, v))?;
            p.guard(|p| {
                p.a.mov(rax, MARK as u64)?;
                p.mmio_read(w, o)
            })?;
            p.result64(rax)?;
        }
        Ok(())
    })
}

/// `attack-hang`: results `[ID]` (all-ones once the device hung).
pub fn hang() -> R<Vec<u8>> {
    wrap(|p| {
        p.guard(|p| p.mmio_write(Width::B4, Reg::HangTrigger.offset(), HANG_MAGIC as u64))?;
        report_reg(p, off(Reg::Id))
    })
}

/// `attack-key-read`: results `DEVICE_KEY[0..8]`, then `KEY[1]`, `KEY[2]` (one 8-byte read).
pub fn key_read() -> R<Vec<u8>> {
    wrap(|p| {
        let k = Reg::DeviceKey.offset();
        for i in 0..8 {
            p.guard(|p| {
                p.a.mov(rax, MARK as u64)?;
                p.mmio_read(Width::B4, k + 4 * i)
            })?;
            p.result_eax()?;
        }
        p.guard(|p| {
            p.a.mov(rax, (MARK as u64) << 32 | MARK as u64)?;
            p.mmio_read(Width::B8, k + 4)
        })?;
        p.result64(rax)
    })
}

/// The dwords `attack-rep-movs-write` copies to BAR0 0x30..0x48.
pub const REP_MOVS_VALUES: [u32; 6] =
    [1, 0, HANG_MAGIC, SOFT_RESET_MAGIC, 0x5a5a_5a5a, 0xa5a5_a5a5];

/// `SCRATCH[0]` before the string attacks (a soft reset would clear it).
pub const SCRATCH_MARK: u32 = 0x600d;

fn after_string_write(p: &mut Payload) -> R {
    report_reg(p, off(Reg::Scratch))?;
    report_reg(p, off(Reg::Id))?;
    report_reg(p, off(Reg::Doorbell))
}

/// `attack-rep-movs-write[-df]`: results `[SCRATCH[0], ID, DOORBELL]`.
pub fn rep_movs_write(df: bool) -> R<Vec<u8>> {
    wrap(|p| {
        p.a.mov(dword_ptr(rdi + off(Reg::Scratch)), SCRATCH_MARK)?;
        fill_ram(p, &REP_MOVS_VALUES)?;
        p.a.mov(r12, rdi)?;
        p.guard(|p| {
            let n = REP_MOVS_VALUES.len() as i32;
            if df {
                p.a.std()?;
                p.a.lea(rdi, ptr(r12 + 0x30 + 4 * (n - 1)))?;
                p.a.mov(rsi, RAM_BUF + 4 * (n as u64 - 1))?;
            } else {
                p.a.lea(rdi, ptr(r12 + 0x30))?;
                p.a.mov(rsi, RAM_BUF)?;
            }
            p.a.mov(ecx, n as u32)?;
            p.a.rep().movsd()?;
            Ok(())
        })?;
        p.a.mov(rdi, r12)?;
        after_string_write(p)
    })
}

/// `attack-rep-movs-read[-df]`: results the 6 dwords at BAR0 0x2ff8..0x3010 as the
/// guest copied them (DEVICE_KEY[0..4] in the last four).
pub fn rep_movs_read(df: bool) -> R<Vec<u8>> {
    wrap(|p| {
        fill_ram(p, &[MARK; 6])?;
        p.a.mov(r12, rdi)?;
        p.guard(|p| {
            if df {
                p.a.std()?;
                p.a.lea(rsi, ptr(r12 + 0x300c))?;
                p.a.mov(rdi, RAM_BUF + 20)?;
            } else {
                p.a.lea(rsi, ptr(r12 + 0x2ff8))?;
                p.a.mov(rdi, RAM_BUF)?;
            }
            p.a.mov(ecx, 6u32)?;
            p.a.rep().movsd()?;
            Ok(())
        })?;
        p.a.mov(rdi, r12)?;
        report_ram(p, 6)
    })
}

/// `attack-rep-stos[-df]`: results `[SCRATCH[0], ID, DOORBELL]`.
pub fn rep_stos(df: bool) -> R<Vec<u8>> {
    wrap(|p| {
        p.a.mov(dword_ptr(rdi + off(Reg::Scratch)), SCRATCH_MARK)?;
        p.a.mov(r12, rdi)?;
        p.guard(|p| {
            if df {
                p.a.std()?;
                p.a.lea(rdi, ptr(r12 + 0x3c))?;
            } else {
                p.a.lea(rdi, ptr(r12 + 0x30))?;
            }
            p.a.mov(eax, HANG_MAGIC)?;
            p.a.mov(ecx, 4u32)?;
            p.a.rep().stosd()?;
            Ok(())
        })?;
        p.a.mov(rdi, r12)?;
        after_string_write(p)
    })
}

/// `attack-xchg`: results `[old DEVICE_KEY[0], old HANG_TRIGGER, ID]`.
pub fn xchg_attack() -> R<Vec<u8>> {
    wrap(|p| {
        p.guard(|p| {
            p.a.mov(eax, 0x1111_1111u32)?;
            p.a.xchg(dword_ptr(rdi + off(Reg::DeviceKey)), eax)?;
            Ok(())
        })?;
        p.result_eax()?;
        p.guard(|p| {
            p.a.mov(eax, HANG_MAGIC)?;
            p.a.xchg(dword_ptr(rdi + off(Reg::HangTrigger)), eax)?;
            Ok(())
        })?;
        p.result_eax()?;
        report_reg(p, off(Reg::Id))
    })
}

/// `attack-lock-rmw`: results `[cmpxchg eax, xadd old, FLASH_LEN, ID]`.
pub fn lock_rmw() -> R<Vec<u8>> {
    wrap(|p| {
        let fl = off(Reg::FlashLen);
        p.guard(|p| {
            p.a.lock().or(dword_ptr(rdi + fl), 0xf0)?;
            Ok(())
        })?;
        p.guard(|p| {
            p.a.lock().add(dword_ptr(rdi + fl), 1)?;
            Ok(())
        })?;
        p.guard(|p| {
            p.a.mov(eax, 0u32)?;
            p.a.mov(ecx, 0x2222_2222u32)?;
            p.a.lock()
                .cmpxchg(dword_ptr(rdi + off(Reg::DeviceKey)), ecx)?;
            Ok(())
        })?;
        p.result_eax()?;
        p.guard(|p| {
            p.a.mov(eax, 5u32)?;
            p.a.lock().xadd(dword_ptr(rdi + fl), eax)?;
            Ok(())
        })?;
        p.result_eax()?;
        p.guard(|p| {
            p.a.mov(eax, MARK)?;
            p.a.mov(eax, dword_ptr(rdi + fl))?;
            Ok(())
        })?;
        p.result_eax()?;
        p.guard(|p| {
            p.a.lock()
                .or(dword_ptr(rdi + off(Reg::HangTrigger)), HANG_MAGIC as i32)?;
            Ok(())
        })?;
        report_reg(p, off(Reg::Id))
    })
}

/// `attack-vector`: results the 4 dwords of a movdqu load at 0x2ff8, the 4 of one at
/// 0x2ffc, then `SCRATCH[7]`, DOORBELL and ID after a movdqu store of [`VEC_VALUES`]
/// at 0x2c (`SCRATCH[7]`, DOORBELL, IRQ_STATUS, HANG_TRIGGER).
pub fn vector() -> R<Vec<u8>> {
    wrap(|p| {
        for at in [0x2ff8, 0x2ffc] {
            fill_ram(p, &[MARK; 4])?;
            p.a.movdqu(xmm1, xmmword_ptr(rbx))?;
            p.guard(|p| {
                p.a.movdqu(xmm1, xmmword_ptr(rdi + at))?;
                Ok(())
            })?;
            p.a.mov(rbx, RAM_BUF)?;
            p.a.movdqu(xmmword_ptr(rbx), xmm1)?;
            report_ram(p, 4)?;
        }
        fill_ram(p, &VEC_VALUES)?;
        p.a.movdqu(xmm0, xmmword_ptr(rbx))?;
        p.guard(|p| {
            p.a.movdqu(xmmword_ptr(rdi + 0x2c), xmm0)?;
            Ok(())
        })?;
        report_reg(p, off(Reg::Scratch) + 28)?;
        report_reg(p, off(Reg::Doorbell))?;
        report_reg(p, off(Reg::Id))
    })
}

/// The 8 dwords `attack-avx` stores at 0x20 (SCRATCH[4..8], DOORBELL, IRQ_STATUS,
/// HANG_TRIGGER, SOFT_RESET).
pub const AVX_VALUES: [u32; 8] = [
    0x4444_4444,
    0x5555_5555,
    0x6666_6666,
    0x7777_7777,
    0x0d0d_0d0d,
    0,
    HANG_MAGIC,
    0,
];

/// `attack-avx`: results the 8 dwords of a vmovdqu load at 0x2ff0 (DEVICE_KEY[0..4]
/// in the last four), then `SCRATCH[4]` and ID after a vmovdqu store of
/// [`AVX_VALUES`] at 0x20. Needs AVX (check `RunReport::vector`).
pub fn avx() -> R<Vec<u8>> {
    wrap(|p| {
        fill_ram(p, &[MARK; 8])?;
        p.a.vmovdqu(ymm1, ymmword_ptr(rbx))?;
        p.guard(|p| {
            p.a.vmovdqu(ymm1, ymmword_ptr(rdi + 0x2ff0))?;
            Ok(())
        })?;
        p.a.mov(rbx, RAM_BUF)?;
        p.a.vmovdqu(ymmword_ptr(rbx), ymm1)?;
        report_ram(p, 8)?;
        fill_ram(p, &AVX_VALUES)?;
        p.a.vmovdqu(ymm0, ymmword_ptr(rbx))?;
        p.guard(|p| {
            p.a.vmovdqu(ymmword_ptr(rdi + 0x20), ymm0)?;
            Ok(())
        })?;
        report_reg(p, off(Reg::Scratch) + 16)?;
        report_reg(p, off(Reg::Id))
    })
}

/// `attack-flash-program`: results `[FLASH_STATUS, COUNTER[1], MASTER]`.
pub fn flash_program() -> R<Vec<u8>> {
    wrap(|p| {
        let steps: [(Reg, u32); 7] = [
            (Reg::FlashUnlock, UNLOCK_KEY1),
            (Reg::FlashUnlock, UNLOCK_KEY2),
            (Reg::FlashRegion, 1),
            (Reg::FlashAddr, 0),
            (Reg::FlashLen, 4),
            (Reg::FlashSrc, 0),
            (Reg::FlashCmd, FLASH_CMD_PROGRAM),
        ];
        for (r, v) in steps {
            p.guard(|p| p.mmio_write(Width::B4, r.offset(), v as u64))?;
        }
        p.guard(|p| {
            p.a.mov(eax, MARK)?;
            p.a.mov(eax, dword_ptr(rdi + off(Reg::FlashStatus)))?;
            Ok(())
        })?;
        p.result_eax()?;
        report_reg(p, off(Reg::Counter) + 4)?;
        report_reg(p, off(Reg::Master))
    })
}

/// `attack-alarm-flood`: 300 guarded DEVICE_KEY[0] reads, then the
/// [`flash_program`] sequence; results: the fault count.
pub fn alarm_flood() -> R<Vec<u8>> {
    wrap(|p| {
        p.repeat(300, |p| {
            p.guard(|p| p.mmio_read(Width::B4, Reg::DeviceKey.offset()))
        })?;
        for (r, v) in [
            (Reg::FlashUnlock, UNLOCK_KEY1),
            (Reg::FlashUnlock, UNLOCK_KEY2),
            (Reg::FlashCmd, FLASH_CMD_PROGRAM),
        ] {
            p.guard(|p| p.mmio_write(Width::B4, r.offset(), v as u64))?;
        }
        Ok(())
    })
}

/// `attack-rep-ins-outs`: `rep insd` of 4 elements from the PCI data port
/// (vendor/device of 00:01.0) into [`RAM_BUF`]; `rep insd` of 2 into BAR0 at
/// HANG_TRIGGER - 4 (the word before HANG_TRIGGER, and HANG_TRIGGER);
/// `rep outsd` of the 3 dwords at [`RAM_BUF`]+16 (1, 2, 3) to the result port.
/// Results: the 4 dwords, then 1, 2, 3, then ID, then the fault count.
pub fn rep_ins_outs() -> R<Vec<u8>> {
    use crate::abi::{PORT_PCI_ADDR, PORT_PCI_DATA, PORT_RESULT};
    wrap(|p| {
        fill_ram(p, &[0, 0, 0, 0, 1, 2, 3])?;
        p.a.mov(dx, PORT_PCI_ADDR as u32)?;
        p.a.mov(eax, 0x8000_0800u32)?;
        p.a.out(dx, eax)?;
        p.a.mov(r12, rdi)?;
        p.a.mov(rdi, RAM_BUF)?;
        p.a.mov(ecx, 4u32)?;
        p.a.mov(dx, PORT_PCI_DATA as u32)?;
        p.a.rep().insd()?;
        p.a.mov(rdi, r12)?;
        report_ram(p, 4)?;
        p.guard(|p| {
            p.a.lea(rdi, ptr(r12 + (off(Reg::HangTrigger) - 4)))?;
            p.a.mov(ecx, 2u32)?;
            p.a.mov(dx, PORT_PCI_DATA as u32)?;
            p.a.rep().insd()?;
            Ok(())
        })?;
        p.a.mov(rdi, r12)?;
        p.a.mov(rsi, RAM_BUF + 16)?;
        p.a.mov(ecx, 3u32)?;
        p.a.mov(dx, PORT_RESULT as u32)?;
        p.a.rep().outsd()?;
        report_reg(p, off(Reg::Id))
    })
}

/// `attack-bad-access-write`: `mov [rdi+10000h],eax` (past BAR0: nothing claims
/// it), then `nop`s and a pass: the run must end BAD ACCESS naming the `mov`.
pub fn bad_access_write() -> R<Vec<u8>> {
    let mut p = Payload::new()?;
    p.park_secondaries()?;
    p.a.mov(eax, 0x5eed_u32)?;
    p.a.mov(dword_ptr(rdi + 0x1_0000), eax)?;
    p.a.nop()?;
    p.a.inc(eax)?;
    p.report(0)?;
    p.build()
}

/// An instruction KVM's emulator cannot carry out on MMIO.
#[derive(Debug, Clone, Copy)]
pub enum Unemulated {
    /// `cmpxchg16b` on SCRATCH[0..4].
    Cmpxchg16b,
    /// `fxsave` to BAR0 + 0x100.
    Fxsave,
    /// `enter 16, 2` with rbp in BAR0 (the nesting reads frame pointers there).
    EnterNested,
    /// `sgdt` to SCRATCH[0] (KVM loops on it inside KVM_RUN: no exit at all).
    Sgdt,
    /// `sidt` to SCRATCH[0] (the same).
    Sidt,
}

/// The guarded instruction; results: fault count, then the last fault's vector
/// (0 if none), then the fault count again (as every attack ends).
pub fn unemulated(which: Unemulated) -> R<Vec<u8>> {
    wrap(|p| {
        p.guard(|p| {
            match which {
                Unemulated::Cmpxchg16b => {
                    p.a.xor(eax, eax)?;
                    p.a.xor(edx, edx)?;
                    p.a.xor(ebx, ebx)?;
                    p.a.xor(ecx, ecx)?;
                    p.a.cmpxchg16b(xmmword_ptr(rdi + off(Reg::Scratch)))?;
                }
                Unemulated::Fxsave => p.a.fxsave(ptr(rdi + 0x100))?,
                Unemulated::Sgdt => p.a.sgdt(ptr(rdi + off(Reg::Scratch)))?,
                Unemulated::Sidt => p.a.sidt(ptr(rdi + off(Reg::Scratch)))?,
                Unemulated::EnterNested => {
                    p.a.mov(r12, rbp)?;
                    p.a.mov(r13, rsp)?;
                    p.a.lea(rbp, ptr(rdi + (off(Reg::Scratch) + 8)))?;
                    p.a.enter(16u32, 2u32)?;
                    p.a.mov(rsp, r13)?;
                    p.a.mov(rbp, r12)?;
                }
            }
            Ok(())
        })?;
        // The guard resumes with rsp/rbp as the handler left them: restore.
        if matches!(which, Unemulated::EnterNested) {
            p.a.mov(rsp, r13)?;
            p.a.mov(rbp, r12)?;
        }
        p.result_fault_count()?;
        p.a.mov(rbx, crate::payload::fault_abi::VECTOR)?;
        p.a.mov(rax, qword_ptr(rbx))?;
        p.result_eax()
    })
}

/// `attack-code-on-bar`: writes `mov eax,[rdi+3000h]` (8B 87 00 30 00 00) and
/// `ret` (C3) to the first data-buffer page and calls it: code fetched from a BAR
/// page reads DEVICE_KEY[0]. Results: what it read, then the fault count.
pub fn code_on_bar() -> R<Vec<u8>> {
    use hilrig_device::regmap::BUFFER_BASE;
    wrap(|p| {
        let b = BUFFER_BASE as i32;
        p.a.mov(dword_ptr(rdi + b), 0x3000_878bu32)?;
        p.a.mov(dword_ptr(rdi + (b + 4)), 0x00c3_0000u32)?;
        p.a.lea(rax, ptr(rdi + b))?;
        p.a.call(rax)?;
        p.result_eax()
    })
}

/// Where `attack-split-store-ram` maps its pages: linear `SPLIT_LINEAR` = RAM page
/// 0x61_0000, `+0x1000` = BAR0 page 3 (DEVICE_KEY), `+0x2000` = RAM page 0x62_0000
/// (through a page table at 0x60_0000 in place of the 2 MiB mapping of 1 GiB).
pub const SPLIT_LINEAR: u64 = 0x4000_0000;
/// What `attack-split-store-ram` stores (8 bytes).
pub const SPLIT_VALUE: u64 = 0x2222_2222_2222_2222;

/// `attack-split-store-ram`: three 8-byte stores of [`SPLIT_VALUE`], each half on a
/// page that faults (BAR0 page 3) and half on memory mapped into the guest: RAM →
/// page 3 (linear), page 3 → RAM (linear), page 3 → the first data-buffer page
/// (BAR0 0x3ffc, physical). Before them the RAM dwords hold 0x1111_1111 and
/// 0x3333_3333. Results: the RAM dword before page 3, the RAM dword after it, the
/// first buffer dword, then the fault count.
pub fn split_store_ram() -> R<Vec<u8>> {
    const PT: u64 = 0x60_0000;
    const PD_1G: u64 = 0xC000;
    wrap(|p| {
        p.a.mov(rbx, PT)?;
        p.a.mov(rax, 0x61_0000u64 | 3)?;
        p.a.mov(qword_ptr(rbx), rax)?;
        p.a.lea(rax, ptr(rdi + (0x3000 | 0x1b)))?;
        p.a.mov(qword_ptr(rbx + 8), rax)?;
        p.a.mov(rax, 0x62_0000u64 | 3)?;
        p.a.mov(qword_ptr(rbx + 16), rax)?;
        p.a.mov(rax, PT | 3)?;
        p.a.mov(rcx, PD_1G)?;
        p.a.mov(qword_ptr(rcx), rax)?;
        p.a.mov(rax, cr3)?;
        p.a.mov(cr3, rax)?;
        p.a.mov(rcx, SPLIT_LINEAR)?;
        p.a.mov(dword_ptr(rcx + 0xffc), 0x1111_1111u32)?;
        p.a.mov(dword_ptr(rcx + 0x2000), 0x3333_3333u32)?;
        for at in [0xffc_i32, 0x1ffc] {
            p.guard(|p| {
                p.a.mov(rcx, SPLIT_LINEAR)?;
                p.a.mov(rax, SPLIT_VALUE)?;
                p.a.mov(qword_ptr(rcx + at), rax)?;
                Ok(())
            })?;
        }
        p.guard(|p| {
            p.a.mov(rax, SPLIT_VALUE)?;
            p.a.mov(qword_ptr(rdi + 0x3ffc), rax)?;
            Ok(())
        })?;
        p.a.mov(rcx, SPLIT_LINEAR)?;
        p.a.mov(eax, dword_ptr(rcx + 0xffc))?;
        p.result_eax()?;
        p.a.mov(rcx, SPLIT_LINEAR)?;
        p.a.mov(eax, dword_ptr(rcx + 0x2000))?;
        p.result_eax()?;
        report_reg(p, hilrig_device::regmap::BUFFER_BASE as i32)
    })
}

/// What `attack-buffer-write` writes to the first data-buffer word.
pub const BUFFER_MAGIC: u32 = 0x5151_5151;

/// `attack-buffer-write`: BUFFER_MAGIC to the first data-buffer word, read back.
/// Results: the value read, then the fault count.
pub fn buffer_write() -> R<Vec<u8>> {
    use hilrig_device::regmap::BUFFER_BASE;
    wrap(|p| {
        p.a.mov(dword_ptr(rdi + BUFFER_BASE as i32), BUFFER_MAGIC)?;
        report_reg(p, BUFFER_BASE as i32)
    })
}

/// `attack-split-store-page`: `movdqu [rdi+2FFCh],xmm0` with xmm0 = 0x11.. bytes:
/// 4 bytes at the end of page 2, 12 at the start of page 3 (DEVICE_KEY[0..3]).
/// Results: the fault count.
pub fn split_store_page() -> R<Vec<u8>> {
    wrap(|p| {
        fill_ram(p, &[0x1111_1111; 4])?;
        p.a.mov(rbx, RAM_BUF)?;
        p.a.movdqu(xmm0, xmmword_ptr(rbx))?;
        p.guard(|p| {
            p.a.movdqu(xmmword_ptr(rdi + 0x2ffc), xmm0)?;
            Ok(())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_attack_assembles() {
        for (name, _) in ATTACKS.iter().chain(HOSTILE) {
            let code = attack(name).expect("listed").expect("assembles");
            assert!(code.len() > 20, "{name}");
        }
    }
}

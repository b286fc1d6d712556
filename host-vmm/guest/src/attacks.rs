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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_attack_assembles() {
        for (name, _) in ATTACKS {
            let code = attack(name).expect("listed").expect("assembles");
            assert!(code.len() > 100, "{name}");
        }
    }
}

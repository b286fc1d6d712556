//! Guest payloads built with iced-x86's `CodeAssembler`, so every instruction form
//! (width, addressing) is exactly the one intended.
//!
//! Entry ABI (see `layout`): the payload runs in 64-bit long mode at
//! [`PAYLOAD_ADDR`] with `rdi` = BAR0 guest-physical address, `rsi` = vCPU index,
//! `rdx` = vCPU count, `rcx` = RAM size, `rsp` = a private stack. A verdict is a
//! write to port [`PORT_EXIT`] (0 = pass). The helpers below keep `rdi` intact.

use crate::abi::{PAYLOAD_ADDR, PORT_COM1, PORT_EXIT, PORT_PCI_ADDR, PORT_PCI_DATA, PORT_RESULT};
use hilrig_device::regmap::{
    Reg, BUFFER_BASE, DEVICE_ID_VALUE, PCI_CLASS_CODE, PCI_DEVICE_ID, PCI_VENDOR_ID,
};
use iced_x86::code_asm::*;

/// Access width of an MMIO access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// 1 byte.
    B1,
    /// 2 bytes.
    B2,
    /// 4 bytes.
    B4,
    /// 8 bytes.
    B8,
}

impl Width {
    /// All widths.
    pub const ALL: [Width; 4] = [Width::B1, Width::B2, Width::B4, Width::B8];

    /// Bytes.
    pub fn bytes(self) -> usize {
        match self {
            Width::B1 => 1,
            Width::B2 => 2,
            Width::B4 => 4,
            Width::B8 => 8,
        }
    }
}

/// A payload under construction.
pub struct Payload {
    /// The assembler; use it directly for anything the helpers do not cover.
    pub a: CodeAssembler,
}

type R<T = ()> = crate::error::Result<T>;

impl Payload {
    /// An empty 64-bit payload.
    pub fn new() -> R<Payload> {
        Ok(Payload {
            a: CodeAssembler::new(64)?,
        })
    }

    /// Assemble for [`PAYLOAD_ADDR`].
    pub fn build(mut self) -> R<Vec<u8>> {
        Ok(self.a.assemble(PAYLOAD_ADDR)?)
    }

    /// Every vCPU but 0 halts here for good.
    pub fn park_secondaries(&mut self) -> R {
        let mut primary = self.a.create_label();
        let mut park = self.a.create_label();
        self.a.test(esi, esi)?;
        self.a.jz(primary)?;
        self.a.set_label(&mut park)?;
        self.a.hlt()?;
        self.a.jmp(park)?;
        self.a.set_label(&mut primary)?;
        Ok(())
    }

    /// Report verdict `code` (0 = pass) and stop.
    pub fn report(&mut self, code: u32) -> R {
        self.a.mov(eax, code)?;
        self.report_eax()
    }

    /// Report the verdict in `eax` and stop.
    pub fn report_eax(&mut self) -> R {
        let mut again = self.a.create_label();
        self.a.mov(dx, PORT_EXIT as u32)?;
        self.a.set_label(&mut again)?;
        self.a.out(dx, eax)?;
        self.a.hlt()?;
        self.a.jmp(again)?;
        Ok(())
    }

    /// Write `s` to the serial console (COM1, polled transmit).
    pub fn print(&mut self, s: &str) -> R {
        self.a.mov(dx, PORT_COM1 as u32)?;
        for b in s.bytes() {
            self.a.mov(al, b as u32)?;
            self.a.out(dx, al)?;
        }
        Ok(())
    }

    /// `eax` = PCI config dword at `addr_reg | offset` (addr_reg holds a
    /// CONFIG_ADDRESS value with register bits 0). Clobbers `eax`, `edx`.
    pub fn cfg_read(&mut self, addr_reg: AsmRegister32, offset: u8) -> R {
        self.a.mov(eax, addr_reg)?;
        self.a.or(eax, offset as u32)?;
        self.a.mov(dx, PORT_PCI_ADDR as u32)?;
        self.a.out(dx, eax)?;
        self.a.mov(dx, PORT_PCI_DATA as u32)?;
        self.a.in_(eax, dx)?;
        Ok(())
    }

    /// Write `value` (a register other than eax/edx) to the PCI config dword.
    pub fn cfg_write(&mut self, addr_reg: AsmRegister32, offset: u8, value: AsmRegister32) -> R {
        self.a.mov(eax, addr_reg)?;
        self.a.or(eax, offset as u32)?;
        self.a.mov(dx, PORT_PCI_ADDR as u32)?;
        self.a.out(dx, eax)?;
        self.a.mov(eax, value)?;
        self.a.mov(dx, PORT_PCI_DATA as u32)?;
        self.a.out(dx, eax)?;
        Ok(())
    }

    /// MMIO write of `value` at BAR0 + `offset` with the given width (one `mov`;
    /// the value is staged in `rax`).
    pub fn mmio_write(&mut self, width: Width, offset: u32, value: u64) -> R {
        self.a.mov(rax, value)?;
        let m = rdi + offset as i32;
        match width {
            Width::B1 => self.a.mov(byte_ptr(m), al)?,
            Width::B2 => self.a.mov(word_ptr(m), ax)?,
            Width::B4 => self.a.mov(dword_ptr(m), eax)?,
            Width::B8 => self.a.mov(qword_ptr(m), rax)?,
        }
        Ok(())
    }

    /// MMIO read at BAR0 + `offset` into `rax` (zero-extended; one access).
    pub fn mmio_read(&mut self, width: Width, offset: u32) -> R {
        let m = rdi + offset as i32;
        match width {
            Width::B1 => self.a.movzx(eax, byte_ptr(m))?,
            Width::B2 => self.a.movzx(eax, word_ptr(m))?,
            Width::B4 => self.a.mov(eax, dword_ptr(m))?,
            Width::B8 => self.a.mov(rax, qword_ptr(m))?,
        }
        Ok(())
    }

    /// Unless `rax == expected`, report `code`.
    pub fn expect_rax(&mut self, expected: u64, code: u32) -> R {
        let mut ok = self.a.create_label();
        self.a.mov(rcx, expected)?;
        self.a.cmp(rax, rcx)?;
        self.a.je(ok)?;
        self.report(code)?;
        self.a.set_label(&mut ok)?;
        Ok(())
    }

    /// Repeat the code `body` emits `count` times (counter in `r15`, kept by body).
    pub fn repeat(&mut self, count: u64, body: impl FnOnce(&mut Payload) -> R) -> R {
        let mut top = self.a.create_label();
        let mut done = self.a.create_label();
        self.a.mov(r15, count)?;
        self.a.test(r15, r15)?;
        self.a.jz(done)?;
        self.a.set_label(&mut top)?;
        body(self)?;
        self.a.dec(r15)?;
        self.a.jnz(top)?;
        self.a.set_label(&mut done)?;
        Ok(())
    }
}

/// Guest code's view of the fault ABI (see the README): the exception handler that
/// [`Payload::install_fault_handler`] installs fills [`crate::abi::FAULT_AREA`].
pub mod fault_abi {
    use crate::abi::FAULT_AREA;
    /// Faults taken so far (u64).
    pub const COUNT: u64 = FAULT_AREA;
    /// Vector of the last fault.
    pub const VECTOR: u64 = FAULT_AREA + 8;
    /// Error code of the last fault (0 for vectors without one).
    pub const ERROR: u64 = FAULT_AREA + 16;
    /// RIP the last fault pushed.
    pub const RIP: u64 = FAULT_AREA + 24;
    /// Where the handler resumes (set by [`super::Payload::guard`]); 0: the handler
    /// reports verdict [`VERDICT_BASE`] + vector through the exit port.
    pub const RESUME: u64 = FAULT_AREA + 32;
    /// Verdict code of an unguarded fault: `0xFA00 + vector` (#GP: 0xFA0D).
    pub const VERDICT_BASE: u32 = 0xFA00;
}

impl Payload {
    /// Install an IDT (at [`crate::abi::FAULT_IDT_ADDR`], vectors 0..32) whose handler counts the
    /// fault in the fault area, records vector, error code and RIP, and resumes at
    /// the resume address (see [`Payload::guard`]) or, when none is set, reports
    /// verdict `0xFA00 + vector`. Clobbers rax, rbx, rcx; keeps rdi.
    pub fn install_fault_handler(&mut self) -> R {
        use crate::abi::{FAULT_AREA, FAULT_IDT_ADDR};
        let mut setup = self.a.create_label();
        let mut common = self.a.create_label();
        let mut fatal = self.a.create_label();
        self.a.jmp(setup)?;
        let mut stubs = Vec::new();
        for v in 0..32u32 {
            let mut l = self.a.create_label();
            self.a.set_label(&mut l)?;
            // Vectors that push an error code: #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP, #VC, #SX.
            if !matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30) {
                self.a.push(0)?;
            }
            self.a.push(v as i32)?;
            self.a.jmp(common)?;
            stubs.push(l);
        }
        // [rsp]=rbx [8]=rax [16]=vector [24]=error [32]=rip [40]=cs [48]=rflags ...
        self.a.set_label(&mut common)?;
        self.a.push(rax)?;
        self.a.push(rbx)?;
        self.a.mov(rbx, FAULT_AREA)?;
        self.a.inc(qword_ptr(rbx))?;
        self.a.mov(rax, qword_ptr(rsp + 16))?;
        self.a.mov(qword_ptr(rbx + 8), rax)?;
        self.a.mov(rax, qword_ptr(rsp + 24))?;
        self.a.mov(qword_ptr(rbx + 16), rax)?;
        self.a.mov(rax, qword_ptr(rsp + 32))?;
        self.a.mov(qword_ptr(rbx + 24), rax)?;
        self.a.mov(rax, qword_ptr(rbx + 32))?;
        self.a.test(rax, rax)?;
        self.a.jz(fatal)?;
        self.a.mov(qword_ptr(rsp + 32), rax)?;
        self.a.pop(rbx)?;
        self.a.pop(rax)?;
        self.a.add(rsp, 16)?;
        self.a.iretq()?;
        self.a.set_label(&mut fatal)?;
        self.a.mov(rax, qword_ptr(rsp + 16))?;
        self.a.or(eax, fault_abi::VERDICT_BASE)?;
        self.report_eax()?;
        self.a.set_label(&mut setup)?;
        self.a.mov(rbx, FAULT_IDT_ADDR)?;
        for (v, l) in stubs.iter().enumerate() {
            let g = 16 * v as i32;
            self.a.lea(rax, ptr(*l))?;
            self.a.mov(ecx, eax)?;
            self.a.and(ecx, 0xffff)?;
            self.a.or(ecx, 0x0008_0000)?;
            self.a.mov(dword_ptr(rbx + g), ecx)?;
            self.a.mov(ecx, eax)?;
            self.a.and(ecx, 0xffff_0000u32)?;
            self.a.or(ecx, 0x8e00)?;
            self.a.mov(dword_ptr(rbx + g + 4), ecx)?;
            self.a.shr(rax, 32)?;
            self.a.mov(dword_ptr(rbx + g + 8), eax)?;
            self.a.mov(dword_ptr(rbx + g + 12), 0)?;
        }
        self.a.mov(word_ptr(rbx + 0x800), 32 * 16 - 1)?;
        self.a.mov(qword_ptr(rbx + 0x802), rbx)?;
        self.a.lidt(ptr(rbx + 0x800))?;
        self.a.mov(rbx, FAULT_AREA)?;
        for i in 0..5 {
            self.a.mov(qword_ptr(rbx + 8 * i), 0)?;
        }
        Ok(())
    }

    /// Run `body` with the fault handler's resume address set to just after it: a
    /// fault in `body` skips the rest of it (see [`Payload::install_fault_handler`]).
    /// The direction flag is cleared after. Clobbers rax, rbx around `body`.
    pub fn guard(&mut self, body: impl FnOnce(&mut Payload) -> R) -> R {
        let mut after = self.a.create_label();
        self.a.lea(rax, ptr(after))?;
        self.a.mov(rbx, fault_abi::RESUME)?;
        self.a.mov(qword_ptr(rbx), rax)?;
        body(self)?;
        self.a.set_label(&mut after)?;
        self.a.cld()?;
        self.a.mov(rbx, fault_abi::RESUME)?;
        self.a.mov(qword_ptr(rbx), 0)?;
        Ok(())
    }

    /// Send `eax` to the result port. Clobbers dx.
    pub fn result_eax(&mut self) -> R {
        self.a.mov(dx, PORT_RESULT as u32)?;
        self.a.out(dx, eax)?;
        Ok(())
    }

    /// Send a 64-bit register to the result port, low dword then high. Clobbers rax, dx.
    pub fn result64(&mut self, r: AsmRegister64) -> R {
        self.a.mov(rax, r)?;
        self.result_eax()?;
        self.a.shr(rax, 32)?;
        self.result_eax()
    }

    /// Send the fault count to the result port. Clobbers rax, rbx, dx.
    pub fn result_fault_count(&mut self) -> R {
        self.a.mov(rbx, fault_abi::COUNT)?;
        self.a.mov(rax, qword_ptr(rbx))?;
        self.result_eax()
    }
}

/// Failure codes of `pci-enum`.
pub mod pci_enum_codes {
    /// The device's vendor/device IDs were not found on bus 0.
    pub const NOT_FOUND: u32 = 1;
    /// Wrong class code.
    pub const CLASS: u32 = 2;
    /// BAR0 does not size as 64 KiB memory.
    pub const BAR0_SIZE: u32 = 3;
    /// The ROM BAR size is not a power of two of at least 2 KiB.
    pub const ROM_SIZE: u32 = 4;
    /// The ROM does not start with the 0x55 0xAA signature.
    pub const ROM_SIGNATURE: u32 = 5;
    /// BAR0's ID register is wrong.
    pub const ID_REGISTER: u32 = 6;
    /// BAR0's address in config space is not the one passed in rdi.
    pub const BAR0_ADDRESS: u32 = 7;
}

/// `pci-enum`: scan bus 0 for the device by IDs, check class, size BAR0 (64 KiB) and
/// the ROM BAR, read the ROM signature and BAR0's ID register.
pub fn pci_enum() -> R<Vec<u8>> {
    use pci_enum_codes::*;
    let mut p = Payload::new()?;
    p.park_secondaries()?;
    let ids = u32::from(PCI_DEVICE_ID) << 16 | u32::from(PCI_VENDOR_ID);
    let mut scan = p.a.create_label();
    let mut found = p.a.create_label();
    p.a.xor(ebx, ebx)?;
    p.a.set_label(&mut scan)?;
    p.a.mov(r12d, ebx)?;
    p.a.shl(r12d, 11)?;
    p.a.or(r12d, 0x8000_0000u32)?;
    p.cfg_read(r12d, 0)?;
    p.a.cmp(eax, ids)?;
    p.a.je(found)?;
    p.a.inc(ebx)?;
    p.a.cmp(ebx, 32)?;
    p.a.jb(scan)?;
    p.report(NOT_FOUND)?;
    p.a.set_label(&mut found)?;
    // Class code.
    let mut class_ok = p.a.create_label();
    p.cfg_read(r12d, 0x08)?;
    p.a.shr(eax, 8)?;
    p.a.cmp(eax, PCI_CLASS_CODE)?;
    p.a.je(class_ok)?;
    p.report(CLASS)?;
    p.a.set_label(&mut class_ok)?;
    // Memory decode off while sizing.
    p.cfg_read(r12d, 0x04)?;
    p.a.mov(r13d, eax)?;
    p.a.mov(ecx, eax)?;
    p.a.and(ecx, !2u32)?;
    p.cfg_write(r12d, 0x04, ecx)?;
    // BAR0 sizing.
    let mut bar_ok = p.a.create_label();
    p.cfg_read(r12d, 0x10)?;
    p.a.mov(r14d, eax)?;
    p.a.mov(ecx, u32::MAX)?;
    p.cfg_write(r12d, 0x10, ecx)?;
    p.cfg_read(r12d, 0x10)?;
    p.a.mov(esi, eax)?;
    p.cfg_write(r12d, 0x10, r14d)?;
    p.a.and(esi, 0xffff_fff0u32)?;
    p.a.neg(esi)?;
    p.a.cmp(esi, 0x1_0000)?;
    p.a.je(bar_ok)?;
    p.report(BAR0_SIZE)?;
    p.a.set_label(&mut bar_ok)?;
    // ROM BAR sizing.
    let mut rom_bad = p.a.create_label();
    let mut rom_ok = p.a.create_label();
    p.cfg_read(r12d, 0x30)?;
    p.a.mov(r15d, eax)?;
    p.a.mov(ecx, 0xffff_f800u32)?;
    p.cfg_write(r12d, 0x30, ecx)?;
    p.cfg_read(r12d, 0x30)?;
    p.a.mov(esi, eax)?;
    p.a.and(esi, 0xffff_f800u32)?;
    p.a.neg(esi)?;
    p.a.cmp(esi, 2048)?;
    p.a.jb(rom_bad)?;
    p.a.lea(ecx, ptr(rsi - 1))?;
    p.a.test(esi, ecx)?;
    p.a.jz(rom_ok)?;
    p.a.set_label(&mut rom_bad)?;
    p.report(ROM_SIZE)?;
    p.a.set_label(&mut rom_ok)?;
    // Enable the ROM at its address, memory decode back on.
    p.a.mov(ecx, r15d)?;
    p.a.and(ecx, 0xffff_f800u32)?;
    p.a.or(ecx, 1)?;
    p.cfg_write(r12d, 0x30, ecx)?;
    p.a.mov(ecx, r13d)?;
    p.a.or(ecx, 2)?;
    p.cfg_write(r12d, 0x04, ecx)?;
    // BAR0 address matches the entry register.
    let mut addr_ok = p.a.create_label();
    p.a.cmp(r14d, edi)?;
    p.a.je(addr_ok)?;
    p.report(BAR0_ADDRESS)?;
    p.a.set_label(&mut addr_ok)?;
    // ROM signature.
    let mut sig_ok = p.a.create_label();
    p.a.mov(eax, r15d)?;
    p.a.and(eax, 0xffff_f800u32)?;
    p.a.movzx(ecx, word_ptr(rax))?;
    p.a.cmp(ecx, 0xaa55)?;
    p.a.je(sig_ok)?;
    p.report(ROM_SIGNATURE)?;
    p.a.set_label(&mut sig_ok)?;
    // ID register.
    p.mmio_read(Width::B4, Reg::Id.offset())?;
    p.expect_rax(u64::from(DEVICE_ID_VALUE), ID_REGISTER)?;
    p.print("hilrig pci-enum: device found, BAR0 64K, ROM ok\n")?;
    p.report(0)?;
    p.build()
}

/// What `mmio-widths` leaves in SCRATCH (register index, value).
pub const MMIO_WIDTHS_EXPECT: [(usize, u32); 5] = [
    (0, 0x5a),
    (1, 0xbeef),
    (2, 0xdead_beef),
    (4, 0x89ab_cdef),
    (5, 0x0123_4567),
];

/// `mmio-widths`: write SCRATCH with 1-, 2-, 4- and 8-byte movs, read each back at
/// the same width, read a byte in the middle of a register, check ID.
pub fn mmio_widths() -> R<Vec<u8>> {
    let s = Reg::Scratch.offset();
    let mut p = Payload::new()?;
    p.park_secondaries()?;
    let writes: [(Width, u32, u64); 4] = [
        (Width::B1, s, 0x5a),
        (Width::B2, s + 4, 0xbeef),
        (Width::B4, s + 8, 0xdead_beef),
        (Width::B8, s + 16, 0x0123_4567_89ab_cdef),
    ];
    for (w, off, v) in writes {
        p.mmio_write(w, off, v)?;
    }
    for (i, (w, off, v)) in writes.into_iter().enumerate() {
        p.mmio_read(w, off)?;
        p.expect_rax(v, 10 + i as u32)?;
    }
    p.mmio_read(Width::B1, s + 9)?;
    p.expect_rax(0xbe, 20)?;
    p.mmio_read(Width::B2, s + 18)?;
    p.expect_rax(0x89ab, 21)?;
    p.mmio_read(Width::B4, Reg::Id.offset())?;
    p.expect_rax(u64::from(DEVICE_ID_VALUE), 22)?;
    p.report(0)?;
    p.build()
}

/// `buffer-loop`: `n` 8-byte writes spread over the first data-buffer page
/// (unrestricted: mapped, zero exits), then one write of `0x600d` to `SCRATCH[0]`
/// (a trapping page: exactly one exit), then pass. The buffer's qword `k` ends up
/// holding the last loop count `c` with `c % 512 == k`.
pub fn buffer_loop(n: u64) -> R<Vec<u8>> {
    buffer_writes(n, true)
}

/// `n` writes over the first buffer page, then (if `trap_write`) one SCRATCH write,
/// then pass.
pub fn buffer_writes(n: u64, trap_write: bool) -> R<Vec<u8>> {
    let mut p = Payload::new()?;
    p.park_secondaries()?;
    p.a.lea(rbx, ptr(rdi + BUFFER_BASE as i32))?;
    p.repeat(n, |p| {
        p.a.mov(rax, r15)?;
        p.a.and(eax, 0x1ff)?;
        p.a.mov(qword_ptr(rbx + rax * 8), r15)?;
        Ok(())
    })?;
    if trap_write {
        p.mmio_write(Width::B4, Reg::Scratch.offset(), 0x600d)?;
    }
    p.report(0)?;
    p.build()
}

/// `mmio-loop`: `n` 4-byte writes to BAR0 + `offset` (each one an exit when the
/// page traps), then pass.
pub fn mmio_loop(n: u64, offset: u32) -> R<Vec<u8>> {
    let mut p = Payload::new()?;
    p.park_secondaries()?;
    p.repeat(n, |p| {
        p.a.mov(dword_ptr(rdi + offset as i32), r15d)?;
        Ok(())
    })?;
    p.report(0)?;
    p.build()
}

/// A payload that only reports `code`: its first instruction's exit marks the
/// start of guest execution.
pub fn report_only(code: u32) -> R<Vec<u8>> {
    let mut p = Payload::new()?;
    p.report(code)?;
    p.build()
}

/// `hello`: print a line per... on vCPU 0 and pass.
pub fn hello() -> R<Vec<u8>> {
    let mut p = Payload::new()?;
    p.park_secondaries()?;
    p.print("hello from hilrig-vmm\n")?;
    p.report(0)?;
    p.build()
}

/// `triple-fault`: `ud2` with an empty IDT.
pub fn triple_fault() -> R<Vec<u8>> {
    let mut p = Payload::new()?;
    p.a.ud2()?;
    p.build()
}

/// `spin`: loop forever (the watchdog must stop it).
pub fn spin() -> R<Vec<u8>> {
    let mut p = Payload::new()?;
    let mut l = p.a.create_label();
    p.a.set_label(&mut l)?;
    p.a.pause()?;
    p.a.jmp(l)?;
    p.build()
}

/// `past-bar`: a 4-byte read just past BAR0's end (nothing decodes there).
pub fn past_bar() -> R<Vec<u8>> {
    let mut p = Payload::new()?;
    p.mmio_read(Width::B4, 0x1_0000)?;
    p.report(0)?;
    p.build()
}

/// `straddle-bar`: an 8-byte read at BAR0 + 0xfffc, half of it past the end.
pub fn straddle_bar() -> R<Vec<u8>> {
    let mut p = Payload::new()?;
    p.mmio_read(Width::B8, 0xfffc)?;
    p.report(0)?;
    p.build()
}

/// `smp-scratch`: every vCPU *i* writes *i + 1* to `SCRATCH[i]` (concurrently, from
/// its own thread); vCPU 0 waits until it sees every vCPU's write, then passes.
pub fn smp_scratch() -> R<Vec<u8>> {
    let s = Reg::Scratch.offset() as i32;
    let mut p = Payload::new()?;
    p.a.mov(eax, esi)?;
    p.a.inc(eax)?;
    p.a.mov(dword_ptr(rdi + rsi * 4 + s), eax)?;
    p.park_secondaries()?;
    let mut outer = p.a.create_label();
    let mut inner = p.a.create_label();
    let mut done = p.a.create_label();
    p.a.xor(ebx, ebx)?;
    p.a.set_label(&mut outer)?;
    p.a.cmp(ebx, edx)?;
    p.a.jae(done)?;
    p.a.set_label(&mut inner)?;
    p.a.mov(eax, dword_ptr(rdi + rbx * 4 + s))?;
    p.a.test(eax, eax)?;
    p.a.jz(inner)?;
    p.a.inc(ebx)?;
    p.a.jmp(outer)?;
    p.a.set_label(&mut done)?;
    p.report(0)?;
    p.build()
}

/// `storm`: an MMIO storm on the trapping identity page: every vCPU *i* writes
/// 1, 2, 3, ... to `SCRATCH[i]` forever (each value once, so every access can be told
/// apart in a decision log). Stopped from outside.
pub fn storm() -> R<Vec<u8>> {
    let s = Reg::Scratch.offset() as i32;
    let mut p = Payload::new()?;
    let mut l = p.a.create_label();
    p.a.mov(ecx, 1u32)?;
    p.a.set_label(&mut l)?;
    p.a.mov(dword_ptr(rdi + rsi * 4 + s), ecx)?;
    p.a.inc(ecx)?;
    p.a.jmp(l)?;
    p.build()
}

/// The pattern `canary-write` leaves and `canary-scan` looks for.
pub const CANARY: u32 = 0xC0FF_EE5A;
/// Where `canary-write` puts its RAM canary (2 MiB from 2 MiB; needs >= 4 MiB RAM).
pub const CANARY_RAM: (u64, u64) = (2 << 20, 2 << 20);

/// `canary-write`: a tenant leaves [`CANARY`] in RAM ([`CANARY_RAM`]), in every
/// SCRATCH register and in every data-buffer word, then passes. (vCPU 0 only.)
pub fn canary_write() -> R<Vec<u8>> {
    let mut p = Payload::new()?;
    p.park_secondaries()?;
    p.a.mov(r8, rdi)?;
    p.a.mov(eax, CANARY)?;
    p.a.cld()?;
    // RAM.
    p.a.mov(rdi, CANARY_RAM.0)?;
    p.a.mov(rcx, CANARY_RAM.1 / 4)?;
    p.a.rep().stosd()?;
    // Buffers (mapped pages: no exits).
    p.a.lea(rdi, qword_ptr(r8 + BUFFER_BASE as i32))?;
    p.a.mov(rcx, (hilrig_device::regmap::BUFFER_SIZE / 4) as u64)?;
    p.a.rep().stosd()?;
    // Scratch registers (trapped, allowed for a tenant).
    for i in 0..8 {
        p.a.mov(dword_ptr(r8 + (Reg::Scratch.offset() + 4 * i) as i32), eax)?;
    }
    p.report(0)?;
    p.build()
}

/// `canary-scan`: a second tenant looks for [`CANARY`] in all RAM above 2 MiB, in the
/// SCRATCH registers and in the data buffers. Verdict 0: none found; 0x0C in RAM,
/// 0x0D in SCRATCH, 0x0E in the buffers. (vCPU 0 only.)
pub fn canary_scan() -> R<Vec<u8>> {
    let mut p = Payload::new()?;
    p.park_secondaries()?;
    p.a.mov(r8, rdi)?;
    p.a.mov(r9, rcx)?; // RAM size
    p.a.cld()?;
    let mut ram_hit = p.a.create_label();
    let mut scratch_hit = p.a.create_label();
    let mut buf_hit = p.a.create_label();
    // RAM: repne scasd from 2 MiB to the end.
    p.a.mov(eax, CANARY)?;
    p.a.mov(rdi, CANARY_RAM.0)?;
    p.a.mov(rcx, r9)?;
    p.a.sub(rcx, CANARY_RAM.0 as i32)?;
    p.a.shr(rcx, 2)?;
    p.a.repne().scasd()?;
    p.a.je(ram_hit)?;
    // Buffers.
    p.a.lea(rdi, qword_ptr(r8 + BUFFER_BASE as i32))?;
    p.a.mov(rcx, (hilrig_device::regmap::BUFFER_SIZE / 4) as u64)?;
    p.a.repne().scasd()?;
    p.a.je(buf_hit)?;
    // Scratch.
    for i in 0..8 {
        p.a.cmp(dword_ptr(r8 + (Reg::Scratch.offset() + 4 * i) as i32), eax)?;
        p.a.je(scratch_hit)?;
    }
    p.report(0)?;
    p.a.set_label(&mut ram_hit)?;
    p.report(0x0C)?;
    p.a.set_label(&mut scratch_hit)?;
    p.report(0x0D)?;
    p.a.set_label(&mut buf_hit)?;
    p.report(0x0E)?;
    p.build()
}

/// Where `bar-move` moves BAR0.
pub const BAR_MOVE_TARGET: u32 = 0xd000_0000;

/// `bar-move`: write a buffer word through the mapped page, turn memory decode off
/// (BAR0 must read all-ones), move BAR0 to [`BAR_MOVE_TARGET`], turn decode on, and
/// read the word back (mapped again: no exit) and ID (trapped) at the new address.
/// Failure codes: 30 decode-off read not all-ones, 31 buffer word lost, 32 ID wrong.
pub fn bar_move() -> R<Vec<u8>> {
    let dev = crate::abi::DEVICE_CONFIG_BASE;
    let mut p = Payload::new()?;
    p.park_secondaries()?;
    p.mmio_write(Width::B4, BUFFER_BASE, 0x1234_5678)?;
    p.a.mov(r12d, dev)?;
    p.cfg_read(r12d, 0x04)?;
    p.a.mov(r13d, eax)?;
    p.a.mov(ecx, eax)?;
    p.a.and(ecx, !2u32)?;
    p.cfg_write(r12d, 0x04, ecx)?;
    p.mmio_read(Width::B4, Reg::Id.offset())?;
    p.expect_rax(0xffff_ffff, 30)?;
    p.a.mov(ecx, BAR_MOVE_TARGET)?;
    p.cfg_write(r12d, 0x10, ecx)?;
    p.a.mov(ecx, r13d)?;
    p.a.or(ecx, 2)?;
    p.cfg_write(r12d, 0x04, ecx)?;
    p.a.mov(edi, BAR_MOVE_TARGET)?;
    p.mmio_read(Width::B4, BUFFER_BASE)?;
    p.expect_rax(0x1234_5678, 31)?;
    p.mmio_read(Width::B4, Reg::Id.offset())?;
    p.expect_rax(u64::from(DEVICE_ID_VALUE), 32)?;
    p.report(0)?;
    p.build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtins::{builtin, load, BUILTINS};

    #[test]
    fn every_builtin_assembles() {
        for (name, _) in BUILTINS {
            let p = builtin(name).expect("listed").expect("assembles");
            assert!(!p.is_empty(), "{name}");
        }
        assert!(builtin("nope").is_none());
    }

    #[test]
    fn mmio_write_is_one_instruction_of_the_right_width() {
        for w in Width::ALL {
            let mut p = Payload::new().expect("asm");
            p.mmio_write(w, 0x10, 1).expect("emit");
            let code = p.build().expect("build");
            let mut d = iced_x86::Decoder::with_ip(64, &code, PAYLOAD_ADDR, 0);
            let _mov_rax = d.decode();
            let store = d.decode();
            assert_eq!(store.memory_displacement64(), 0x10);
            assert_eq!(store.memory_size().size(), w.bytes());
        }
    }

    #[test]
    fn unknown_payload_names_the_builtins() {
        let e = load("/nonexistent/payload.bin")
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("pci-enum")));
    }

    #[test]
    fn empty_file_refused() {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        let e = load(&f.path().to_string_lossy())
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("empty")));
    }
}

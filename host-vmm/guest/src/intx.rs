//! Receiving a device's interrupt (issue 18): an IDT with a handler for the
//! device's vector and one for a LAPIC-timer timeout, the LAPIC enabled, the PIC
//! masked, and the IOAPIC input the device's config space names (interrupt line,
//! config byte 0x3c) routed to the device's vector, level-triggered (PCI INTx).
//! Needs the VMM's in-kernel irqchip (`--irqchip`, automatic for a VFIO device with
//! INTx): without it the LAPIC access is MMIO nothing claims (BAD ACCESS).
//!
//! [`setup`] once, then [`wait`] per interrupt: it arms the timeout, stamps the
//! TSC, runs the code that makes the device interrupt, and `hlt`s (`sti; hlt`, so
//! no wake-up is lost) until the handler has run or the timer fired. The handler
//! stamps the TSC, reads and acknowledges the device's status register (if it has
//! one), and signals EOI to the LAPIC — after the device's acknowledgement, so the
//! level-triggered line is low when KVM resamples it.
//!
//! Results (result port) per [`wait`]: the vector received, the status the handler
//! read, the latency in TSC ticks (raise to handler, low 32 bits). The timeout path
//! prints `no interrupt` on the console, reports vector 0 and the device's status
//! register as it is (still raised: nobody took the interrupt; then acknowledges
//! it, leaving the device clean), and fails with
//! [`codes::NO_INTERRUPT`].

use crate::abi::{DEVICE_CONFIG_BASE, FAULT_IDT_ADDR};
use crate::error::Result;
use crate::payload::Payload;
use iced_x86::code_asm::*;

/// The LAPIC's MMIO base (xAPIC).
pub const LAPIC: u64 = 0xFEE0_0000;
/// The IOAPIC's MMIO base (IOREGSEL at +0, IOWIN at +0x10).
pub const IOAPIC: u64 = 0xFEC0_0000;
/// The vector the device's interrupt is routed to.
pub const VECTOR: u32 = 0x40;
/// The LAPIC timer's vector (the timeout).
pub const TIMER_VECTOR: u32 = 0x41;
/// The LAPIC's spurious vector.
pub const SPURIOUS_VECTOR: u32 = 0xFF;
/// LAPIC timer ticks of the timeout, divide-by-1 (KVM's APIC bus runs at 1 GHz:
/// about one second).
pub const TIMEOUT_TICKS: u32 = 1_000_000_000;

/// The interrupt area (guest RAM): what the handlers record.
pub mod area {
    /// Base address (after the fault area).
    pub const BASE: u64 = 0x2100;
    /// Device interrupts taken (u64).
    pub const COUNT: u64 = BASE;
    /// The last device vector (u64).
    pub const VECTOR: u64 = BASE + 8;
    /// The device status the handler read (u64).
    pub const STATUS: u64 = BASE + 16;
    /// TSC when the handler ran (u64).
    pub const TSC: u64 = BASE + 24;
    /// Non-zero once the timeout timer fired (u64).
    pub const TIMED_OUT: u64 = BASE + 32;
    /// BAR0's address, for the handler (u64).
    pub const BAR0: u64 = BASE + 40;
    /// The IDTR pseudo-descriptor (10 bytes).
    pub const IDTR: u64 = BASE + 48;
}

/// Failure codes.
pub mod codes {
    /// The device has no interrupt pin in config space (the VMM gave it none: no
    /// irqchip, or a device without INTx).
    pub const NO_LINE: u32 = 0x1A01;
    /// The timeout fired before the device's interrupt arrived.
    pub const NO_INTERRUPT: u32 = 0x1A02;
    /// An interrupt arrived, but not on the device's vector.
    pub const WRONG_VECTOR: u32 = 0x1A03;
}

/// The device's status and acknowledgement registers (BAR0 offsets): the handler
/// reads the status and writes the value read to the acknowledgement register
/// (edu: IRQ_STATUS 0x24, IRQ_ACK 0x64). None: a device with nothing to acknowledge
/// (the simulated source, whose line KVM lowers at EOI).
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    /// Status register offset.
    pub status: u32,
    /// Acknowledgement register offset.
    pub ack: u32,
}

/// Write the 64-bit interrupt gate for `vector` to the IDT at `rbx`, pointing at
/// `target`. Clobbers rax, rcx.
fn gate(p: &mut Payload, vector: u32, target: CodeLabel) -> Result<()> {
    let g = 16 * vector as i32;
    p.a.lea(rax, ptr(target))?;
    p.a.mov(ecx, eax)?;
    p.a.and(ecx, 0xffff)?;
    p.a.or(ecx, 0x0008_0000)?;
    p.a.mov(dword_ptr(rbx + g), ecx)?;
    p.a.mov(ecx, eax)?;
    p.a.and(ecx, 0xffff_0000u32)?;
    p.a.or(ecx, 0x8e00)?;
    p.a.mov(dword_ptr(rbx + g + 4), ecx)?;
    p.a.shr(rax, 32)?;
    p.a.mov(dword_ptr(rbx + g + 8), eax)?;
    p.a.mov(dword_ptr(rbx + g + 12), 0)?;
    Ok(())
}

/// LAPIC EOI. Clobbers rbx.
fn eoi(p: &mut Payload) -> Result<()> {
    p.a.mov(rbx, LAPIC)?;
    p.a.mov(dword_ptr(rbx + 0xB0), 0)?;
    Ok(())
}

/// Install the fault handler and the interrupt handlers, enable the LAPIC (timer
/// armed by [`wait`]), mask the PIC, route the device's IOAPIC input (config byte
/// 0x3c) to [`VECTOR`], level-triggered. Reports the IOAPIC input on the result
/// port. Interrupts stay disabled. Keeps rdi (BAR0); clobbers rax, rbx, rcx, rdx, r8.
pub fn setup(p: &mut Payload, ack: Option<Ack>) -> Result<()> {
    p.install_fault_handler()?;
    let mut skip = p.a.create_label();
    let mut device = p.a.create_label();
    let mut timer = p.a.create_label();
    let mut spurious = p.a.create_label();
    p.a.jmp(skip)?;

    // The device's handler.
    p.a.set_label(&mut device)?;
    p.a.push(rax)?;
    p.a.push(rbx)?;
    p.a.push(rcx)?;
    p.a.push(rdx)?;
    p.a.rdtsc()?;
    p.a.shl(rdx, 32)?;
    p.a.or(rax, rdx)?;
    p.a.mov(rbx, area::BASE)?;
    p.a.mov(qword_ptr(rbx + (area::TSC - area::BASE) as i32), rax)?;
    p.a.inc(qword_ptr(rbx + (area::COUNT - area::BASE) as i32))?;
    p.a.mov(
        qword_ptr(rbx + (area::VECTOR - area::BASE) as i32),
        VECTOR as i32,
    )?;
    if let Some(a) = ack {
        p.a.mov(rcx, qword_ptr(rbx + (area::BAR0 - area::BASE) as i32))?;
        p.a.mov(eax, dword_ptr(rcx + a.status as i32))?;
        p.a.mov(qword_ptr(rbx + (area::STATUS - area::BASE) as i32), rax)?;
        p.a.mov(dword_ptr(rcx + a.ack as i32), eax)?;
    }
    eoi(p)?;
    p.a.pop(rdx)?;
    p.a.pop(rcx)?;
    p.a.pop(rbx)?;
    p.a.pop(rax)?;
    p.a.iretq()?;

    // The timeout.
    p.a.set_label(&mut timer)?;
    p.a.push(rbx)?;
    p.a.mov(rbx, area::TIMED_OUT)?;
    p.a.mov(qword_ptr(rbx), 1)?;
    eoi(p)?;
    p.a.pop(rbx)?;
    p.a.iretq()?;

    // Spurious: no EOI.
    p.a.set_label(&mut spurious)?;
    p.a.iretq()?;

    p.a.set_label(&mut skip)?;
    // The interrupt area.
    p.a.mov(rbx, area::BASE)?;
    for i in 0..6 {
        p.a.mov(qword_ptr(rbx + 8 * i), 0)?;
    }
    p.a.mov(qword_ptr(rbx + (area::BAR0 - area::BASE) as i32), rdi)?;
    // The IDT: the fault handler's 32 gates, then ours; the fault handler kept its
    // IDTR at gate 128's place: clear that gate, load a 256-gate IDTR.
    p.a.mov(rbx, FAULT_IDT_ADDR)?;
    p.a.mov(qword_ptr(rbx + 0x800), 0)?;
    p.a.mov(qword_ptr(rbx + 0x808), 0)?;
    gate(p, VECTOR, device)?;
    gate(p, TIMER_VECTOR, timer)?;
    gate(p, SPURIOUS_VECTOR, spurious)?;
    p.a.mov(rbx, area::IDTR)?;
    p.a.mov(word_ptr(rbx), 256 * 16 - 1)?;
    p.a.mov(rax, FAULT_IDT_ADDR)?;
    p.a.mov(qword_ptr(rbx + 2), rax)?;
    p.a.lidt(ptr(rbx))?;
    // The PIC: every input masked (OCW1).
    p.a.mov(al, 0xff)?;
    p.a.mov(dx, 0x21)?;
    p.a.out(dx, al)?;
    p.a.mov(dx, 0xa1)?;
    p.a.out(dx, al)?;
    // The LAPIC: LINT0 masked, task priority 0, enabled with the spurious vector,
    // the timer one-shot on its vector, divide by 1 (armed by `wait`).
    p.a.mov(rbx, LAPIC)?;
    p.a.mov(dword_ptr(rbx + 0x350), 0x1_0000)?;
    p.a.mov(dword_ptr(rbx + 0x80), 0)?;
    p.a.mov(dword_ptr(rbx + 0xF0), (0x100 | SPURIOUS_VECTOR) as i32)?;
    p.a.mov(dword_ptr(rbx + 0x3E0), 0xB)?;
    p.a.mov(dword_ptr(rbx + 0x320), TIMER_VECTOR as i32)?;
    // The device's interrupt pin and line (config 0x3d, 0x3c).
    let mut has_pin = p.a.create_label();
    p.a.mov(r8d, DEVICE_CONFIG_BASE)?;
    p.cfg_read(r8d, 0x3c)?;
    p.a.mov(ecx, eax)?;
    p.a.and(ecx, 0xff)?;
    p.a.test(eax, 0xff00)?;
    p.a.jnz(has_pin)?;
    p.print("no interrupt pin\n")?;
    p.report(codes::NO_LINE)?;
    p.a.set_label(&mut has_pin)?;
    p.a.mov(eax, ecx)?;
    p.result_eax()?;
    // IOAPIC redirection entry `line`: destination APIC 0 (high dword first), then
    // vector, fixed, physical, active high, level-triggered, unmasked.
    p.a.mov(rbx, IOAPIC)?;
    p.a.lea(eax, dword_ptr(rcx * 2 + 0x11))?;
    p.a.mov(dword_ptr(rbx), eax)?;
    p.a.mov(dword_ptr(rbx + 0x10), 0)?;
    p.a.lea(eax, dword_ptr(rcx * 2 + 0x10))?;
    p.a.mov(dword_ptr(rbx), eax)?;
    p.a.mov(dword_ptr(rbx + 0x10), (0x8000 | VECTOR) as i32)?;
    Ok(())
}

/// Arm the timeout, stamp the TSC, run `raise` (the code that makes the device
/// interrupt; it must keep r12 and rdi), then `sti; hlt` until the device's handler
/// ran (interrupts disabled again, the timer stopped, results: vector, status,
/// latency; `eax` = the status) or the timeout fired (the failure path in the module
/// doc). Clobbers rax, rbx, rcx, rdx, r12.
pub fn wait(
    p: &mut Payload,
    ack: Option<Ack>,
    raise: impl FnOnce(&mut Payload) -> Result<()>,
) -> Result<()> {
    let mut top = p.a.create_label();
    let mut got = p.a.create_label();
    let mut timeout = p.a.create_label();
    let mut right = p.a.create_label();
    p.a.cli()?;
    p.a.mov(rbx, area::BASE)?;
    p.a.mov(qword_ptr(rbx + (area::COUNT - area::BASE) as i32), 0)?;
    p.a.mov(qword_ptr(rbx + (area::TIMED_OUT - area::BASE) as i32), 0)?;
    p.a.mov(qword_ptr(rbx + (area::VECTOR - area::BASE) as i32), 0)?;
    p.a.mov(rbx, LAPIC)?;
    p.a.mov(dword_ptr(rbx + 0x380), TIMEOUT_TICKS as i32)?;
    p.a.rdtsc()?;
    p.a.shl(rdx, 32)?;
    p.a.or(rax, rdx)?;
    p.a.mov(r12, rax)?;
    raise(p)?;
    p.a.set_label(&mut top)?;
    p.a.cli()?;
    p.a.mov(rbx, area::BASE)?;
    p.a.cmp(qword_ptr(rbx + (area::COUNT - area::BASE) as i32), 0)?;
    p.a.jne(got)?;
    p.a.cmp(qword_ptr(rbx + (area::TIMED_OUT - area::BASE) as i32), 0)?;
    p.a.jne(timeout)?;
    p.a.sti()?;
    p.a.hlt()?;
    p.a.jmp(top)?;

    p.a.set_label(&mut timeout)?;
    p.print("no interrupt\n")?;
    p.a.xor(eax, eax)?;
    p.result_eax()?;
    if let Some(a) = ack {
        // What the device has raised (nobody took it), then acknowledged so the
        // device is left clean for whoever comes next.
        p.mmio_read(crate::payload::Width::B4, a.status)?;
        p.result_eax()?;
        p.a.mov(dword_ptr(rdi + a.ack as i32), eax)?;
    }
    p.report(codes::NO_INTERRUPT)?;

    p.a.set_label(&mut got)?;
    // Stop the timer; interrupts stay off.
    p.a.mov(rbx, LAPIC)?;
    p.a.mov(dword_ptr(rbx + 0x380), 0)?;
    p.a.mov(rbx, area::BASE)?;
    p.a.mov(rax, qword_ptr(rbx + (area::VECTOR - area::BASE) as i32))?;
    p.result_eax()?;
    p.a.cmp(eax, VECTOR)?;
    p.a.je(right)?;
    p.report(codes::WRONG_VECTOR)?;
    p.a.set_label(&mut right)?;
    p.a.mov(rbx, area::BASE)?;
    p.a.mov(rax, qword_ptr(rbx + (area::STATUS - area::BASE) as i32))?;
    p.result_eax()?;
    p.a.mov(rax, qword_ptr(rbx + (area::TSC - area::BASE) as i32))?;
    p.a.sub(rax, r12)?;
    p.result_eax()?;
    p.a.mov(rbx, area::BASE)?;
    p.a.mov(rax, qword_ptr(rbx + (area::STATUS - area::BASE) as i32))?;
    Ok(())
}

/// `intx-wait`: for a device whose interrupt is already pending (the VMM's
/// simulated source in tests): set up, wait for one interrupt, pass. Results:
/// IOAPIC input, vector, status (0), latency.
pub fn intx_wait() -> Result<Vec<u8>> {
    let mut p = Payload::new()?;
    p.park_secondaries()?;
    setup(&mut p, None)?;
    wait(&mut p, None, |_| Ok(()))?;
    p.report(0)?;
    p.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles() {
        let b = intx_wait().expect("intx-wait assembles");
        assert!(b.len() > 200);
    }

    // The interrupt area stays clear of the fault area and the IDT (checked at
    // compile time).
    const _: () = {
        use crate::abi::FAULT_AREA;
        assert!(area::BASE >= FAULT_AREA + 40);
        assert!(area::IDTR + 10 <= 0x3000);
        assert!(FAULT_IDT_ADDR + 256 * 16 <= FAULT_AREA);
    };
}

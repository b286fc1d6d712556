//! The built-in payloads by name, and `--payload` resolution (a built-in name or a
//! raw binary file).

use crate::attacks;
use crate::error::{GuestError, Result};
use crate::payload::*;

/// The built-in payloads: name and description.
pub const BUILTINS: &[(&str, &str)] = &[
    (
        "pci-enum",
        "enumerate bus 0, find the device, size BAR0 and the ROM, read both",
    ),
    ("mmio-widths", "SCRATCH writes and reads at 1/2/4/8 bytes"),
    (
        "buffer-loop",
        "100000 writes to a mapped buffer page (0 exits) and 1 to SCRATCH",
    ),
    (
        "bar-move",
        "move BAR0 with decode off/on; mapped buffer pages follow it",
    ),
    (
        "smp-scratch",
        "each vCPU writes SCRATCH[index]; vCPU 0 waits for all",
    ),
    ("hello", "print a line on the serial console and pass"),
    ("triple-fault", "ud2 with no IDT: KVM_EXIT_SHUTDOWN"),
    ("spin", "loop forever (watchdog)"),
    (
        "storm",
        "every vCPU writes 1, 2, 3, ... to SCRATCH[index] forever",
    ),
    (
        "canary-write",
        "leave a canary in RAM, SCRATCH and the buffers",
    ),
    (
        "canary-scan",
        "look for the canary in RAM, SCRATCH and the buffers",
    ),
    ("past-bar", "read just past BAR0's end"),
    (
        "intx-wait",
        "set up IDT/LAPIC/IOAPIC from config space, hlt until the device's (pending) interrupt",
    ),
    (
        "detach-wait",
        "use the device, wait until it is detached (vendor ID 0xffff), run on, pass",
    ),
    (
        "detach-alarms",
        "detach-wait with 3 HANG_TRIGGER writes (3 alarms for a tenant) before waiting",
    ),
    ("straddle-bar", "8-byte read straddling BAR0's end"),
    (
        "edu-id",
        "QEMU edu: ID, liveness (inverts) on page 0, all-ones on page 1",
    ),
    ("edu-factorial", "QEMU edu: 10! through MMIO, polled"),
    (
        "edu-dma",
        "QEMU edu: DMA 2 KiB of guest RAM into edu's buffer and back, compared",
    ),
    (
        "edu-irq",
        "QEMU edu: receive its interrupt (IDT, LAPIC, IOAPIC; raise, hlt, ack) and the factorial-done one",
    ),
    (
        "edu-restricted",
        "QEMU edu: write IRQ_RAISE (a policy drops it) and check nothing was raised",
    ),
];

/// Build the built-in payload `name`, if there is one.
pub fn builtin(name: &str) -> Option<Result<Vec<u8>>> {
    Some(match name {
        "pci-enum" => pci_enum(),
        "mmio-widths" => mmio_widths(),
        "buffer-loop" => buffer_loop(100_000),
        "bar-move" => bar_move(),
        "smp-scratch" => smp_scratch(),
        "hello" => hello(),
        "triple-fault" => triple_fault(),
        "spin" => spin(),
        "storm" => storm(),
        "canary-write" => canary_write(),
        "canary-scan" => canary_scan(),
        "past-bar" => past_bar(),
        "intx-wait" => crate::intx::intx_wait(),
        "detach-wait" => crate::detach::detach_wait(0),
        "detach-alarms" => crate::detach::detach_wait(3),
        "straddle-bar" => straddle_bar(),
        "edu-id" => edu::id(),
        "edu-factorial" => edu::factorial(),
        "edu-dma" => edu::dma(),
        "edu-irq" => edu::irq(),
        "edu-restricted" => edu::restricted(),
        _ => return attacks::attack(name),
    })
}

/// Resolve `--payload`: a built-in name, else a raw binary file. Empty files are
/// refused here; size against guest memory is checked when the VM is built.
pub fn load(spec: &str) -> Result<(String, Vec<u8>)> {
    if let Some(p) = builtin(spec) {
        return Ok((spec.to_string(), p?));
    }
    let path = std::path::Path::new(spec);
    if !path.exists() {
        let names: Vec<&str> = BUILTINS.iter().map(|(n, _)| *n).collect();
        return Err(GuestError::Payload {
            what: spec.to_string(),
            detail: format!(
                "is neither a file nor a built-in payload ({})",
                names.join(", ")
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| GuestError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(GuestError::Payload {
            what: spec.to_string(),
            detail: "is empty (0 bytes)".into(),
        });
    }
    Ok((spec.to_string(), bytes))
}

/// Payloads for QEMU's `edu` device passed through with VFIO (issue 18; registers as
/// in `host-vmm/devices/edu.toml`). Each reports what it saw on the result port and
/// fails with a code `0xED..` naming the check.
pub mod edu {
    use crate::error::Result;
    use crate::payload::{Payload, Width};
    use iced_x86::code_asm::*;

    /// Register offsets (edu.toml).
    pub const ID: u32 = 0x00;
    /// Liveness: reads the inverse of what was written.
    pub const LIVENESS: u32 = 0x04;
    /// Factorial.
    pub const FACTORIAL: u32 = 0x08;
    /// Status (bit 0: computing).
    pub const STATUS: u32 = 0x20;
    /// Interrupt status.
    pub const IRQ_STATUS: u32 = 0x24;
    /// Raise an interrupt.
    pub const IRQ_RAISE: u32 = 0x60;
    /// Acknowledge an interrupt.
    pub const IRQ_ACK: u32 = 0x64;
    /// DMA source address.
    pub const DMA_SRC: u32 = 0x80;
    /// DMA destination address.
    pub const DMA_DST: u32 = 0x88;
    /// DMA length.
    pub const DMA_COUNT: u32 = 0x90;
    /// DMA command (bit 0 start/running, bit 1 device to RAM).
    pub const DMA_CMD: u32 = 0x98;
    /// edu's DMA buffer in its own address space.
    pub const DMA_BUFFER: u64 = 0x40000;
    /// Guest RAM the DMA payload copies from and to (IOVA = guest-physical).
    pub const DMA_FROM: u64 = 0x30_0000;
    /// ... and back to.
    pub const DMA_TO: u64 = 0x30_1000;
    /// The value the liveness check writes.
    pub const LIVE: u32 = 0x1234_5678;
    /// The interrupt cause the IRQ payloads raise.
    pub const CAUSE: u32 = 0x5a;

    /// Failure codes.
    pub mod codes {
        /// ID's low byte is not 0xed.
        pub const ID: u32 = 0xED01;
        /// Liveness did not invert.
        pub const LIVENESS: u32 = 0xED02;
        /// Page 1 (no registers) did not read all-ones.
        pub const PAGE1: u32 = 0xED03;
        /// The factorial is wrong.
        pub const FACTORIAL: u32 = 0xED11;
        /// STATUS stayed busy.
        pub const BUSY: u32 = 0xED12;
        /// The data came back different.
        pub const DMA_DATA: u32 = 0xED21;
        /// DMA_CMD stayed busy.
        pub const DMA_BUSY: u32 = 0xED22;
        /// IRQ_STATUS is not the raised cause.
        pub const IRQ_RAISED: u32 = 0xED31;
        /// IRQ_STATUS not clear after the acknowledgement.
        pub const IRQ_ACKED: u32 = 0xED32;
        /// The factorial-done interrupt's IRQ_STATUS is not FACT_IRQ.
        pub const FACT_IRQ: u32 = 0xED33;
        /// The restricted write reached the device.
        pub const RESTRICTED: u32 = 0xED41;
    }

    /// Poll bound: iterations of a 4-byte MMIO read (the VM's watchdog bounds
    /// wall time anyway).
    const POLL: u64 = 200_000_000;

    /// Wait until the `width` register at `offset` has `bit` clear, else report `code`.
    fn wait_clear(p: &mut Payload, width: Width, offset: u32, bit: u32, code: u32) -> Result<()> {
        let mut top = p.a.create_label();
        let mut done = p.a.create_label();
        p.a.mov(r15, POLL)?;
        p.a.set_label(&mut top)?;
        p.mmio_read(width, offset)?;
        p.a.test(eax, bit)?;
        p.a.jz(done)?;
        p.a.dec(r15)?;
        p.a.jnz(top)?;
        p.report(code)?;
        p.a.set_label(&mut done)?;
        Ok(())
    }

    /// ID and liveness on page 0, page 1 reads all-ones. Results: ID, liveness read
    /// back, page 1.
    pub fn id() -> Result<Vec<u8>> {
        let mut p = Payload::new()?;
        p.park_secondaries()?;
        p.mmio_read(Width::B4, ID)?;
        p.result_eax()?;
        p.a.and(eax, 0xff)?;
        p.expect_rax(0xed, codes::ID)?;
        p.mmio_write(Width::B4, LIVENESS, u64::from(LIVE))?;
        p.mmio_read(Width::B4, LIVENESS)?;
        p.result_eax()?;
        p.expect_rax(u64::from(!LIVE), codes::LIVENESS)?;
        p.mmio_read(Width::B4, 0x1000)?;
        p.result_eax()?;
        p.expect_rax(0xffff_ffff, codes::PAGE1)?;
        p.report(0)?;
        p.build()
    }

    /// 10! through FACTORIAL, STATUS polled. Result: the value read.
    pub fn factorial() -> Result<Vec<u8>> {
        let mut p = Payload::new()?;
        p.park_secondaries()?;
        p.mmio_write(Width::B4, FACTORIAL, 10)?;
        wait_clear(&mut p, Width::B4, STATUS, 1, codes::BUSY)?;
        p.mmio_read(Width::B4, FACTORIAL)?;
        p.result_eax()?;
        p.expect_rax(3_628_800, codes::FACTORIAL)?;
        p.report(0)?;
        p.build()
    }

    /// One DMA transfer: `count` bytes from `src` to `dst`, `cmd` (1: RAM to device,
    /// 3: device to RAM), waited for.
    fn transfer(p: &mut Payload, src: u64, dst: u64, count: u64, cmd: u64) -> Result<()> {
        p.mmio_write(Width::B8, DMA_SRC, src)?;
        p.mmio_write(Width::B8, DMA_DST, dst)?;
        p.mmio_write(Width::B8, DMA_COUNT, count)?;
        p.mmio_write(Width::B8, DMA_CMD, cmd)?;
        wait_clear(p, Width::B8, DMA_CMD, 1, codes::DMA_BUSY)
    }

    /// Bytes the DMA payload moves each way. Not the buffer's whole 4 KiB: QEMU 7.2's
    /// edu refuses a transfer that ends on the buffer's last byte with a hardware
    /// error that aborts QEMU (an off-by-one in its range check).
    pub const DMA_LEN: u64 = 0x800;

    /// Fill [`DMA_LEN`] bytes of guest RAM with a pattern, DMA them into edu's
    /// buffer, DMA the buffer back to other RAM (zeroed first), compare. Results:
    /// the first and last dword copied back.
    pub fn dma() -> Result<Vec<u8>> {
        let mut p = Payload::new()?;
        p.park_secondaries()?;
        let mut fill = p.a.create_label();
        let mut same = p.a.create_label();
        // Pattern: dword i = 0xD0A0_0000 + i at DMA_FROM; zeros at DMA_TO.
        p.a.mov(rbx, DMA_FROM)?;
        p.a.xor(ecx, ecx)?;
        p.a.set_label(&mut fill)?;
        p.a.lea(eax, dword_ptr(rcx + 0xD0A0_0000u32 as i32))?;
        p.a.mov(dword_ptr(rbx + rcx * 4), eax)?;
        p.a.mov(dword_ptr(rbx + rcx * 4 + 0x1000), 0u32)?;
        p.a.inc(ecx)?;
        p.a.cmp(ecx, (DMA_LEN / 4) as u32)?;
        p.a.jb(fill)?;
        p.a.mfence()?;
        transfer(&mut p, DMA_FROM, DMA_BUFFER, DMA_LEN, 1)?;
        transfer(&mut p, DMA_BUFFER, DMA_TO, DMA_LEN, 3)?;
        p.a.mfence()?;
        p.a.mov(rbx, DMA_TO)?;
        p.a.mov(eax, dword_ptr(rbx))?;
        p.result_eax()?;
        p.a.mov(rbx, DMA_TO)?;
        p.a.mov(eax, dword_ptr(rbx + (DMA_LEN - 4) as i32))?;
        p.result_eax()?;
        // Compare (rdi is BAR0: keep it).
        p.a.push(rdi)?;
        p.a.mov(rsi, DMA_FROM)?;
        p.a.mov(rdi, DMA_TO)?;
        p.a.mov(rcx, DMA_LEN / 4)?;
        p.a.cld()?;
        p.a.repe().cmpsd()?;
        p.a.pop(rdi)?;
        p.a.je(same)?;
        p.report(codes::DMA_DATA)?;
        p.a.set_label(&mut same)?;
        p.report(0)?;
        p.build()
    }

    /// The handler's acknowledgement: read IRQ_STATUS, write it to IRQ_ACK.
    pub const ACK: crate::intx::Ack = crate::intx::Ack {
        status: IRQ_STATUS,
        ack: IRQ_ACK,
    };

    /// STATUS bit: raise an interrupt when a factorial is done.
    pub const STATUS_IRQ_FACT: u32 = 0x80;
    /// IRQ_STATUS bit of the factorial-done interrupt.
    pub const FACT_IRQ: u32 = 0x1;

    /// Receive edu's interrupt (needs the VMM's irqchip, automatic for VFIO with
    /// INTx): IDT, LAPIC, IOAPIC input from config space ([`crate::intx`]); raise
    /// cause [`CAUSE`] through IRQ_RAISE and `hlt` until the vector arrives (the
    /// handler reads IRQ_STATUS and acknowledges it); check IRQ_STATUS is clear;
    /// then the factorial-done interrupt (STATUS bit 0x80, 5!). Results: IOAPIC
    /// input; vector, IRQ_STATUS in the handler, latency (TSC ticks, raise to
    /// handler); IRQ_STATUS after; vector, IRQ_STATUS, latency of the factorial
    /// interrupt; the factorial. No interrupt within the timeout: `no interrupt`
    /// on the console, results vector 0 and IRQ_STATUS, verdict
    /// [`crate::intx::codes::NO_INTERRUPT`].
    pub fn irq() -> Result<Vec<u8>> {
        use crate::intx;
        let mut p = Payload::new()?;
        p.park_secondaries()?;
        intx::setup(&mut p, Some(ACK))?;
        intx::wait(&mut p, Some(ACK), |p| {
            p.mmio_write(Width::B4, IRQ_RAISE, u64::from(CAUSE))
        })?;
        p.expect_rax(u64::from(CAUSE), codes::IRQ_RAISED)?;
        p.mmio_read(Width::B4, IRQ_STATUS)?;
        p.result_eax()?;
        p.expect_rax(0, codes::IRQ_ACKED)?;
        intx::wait(&mut p, Some(ACK), |p| {
            p.mmio_write(Width::B4, STATUS, u64::from(STATUS_IRQ_FACT))?;
            p.mmio_write(Width::B4, FACTORIAL, 5)
        })?;
        p.expect_rax(u64::from(FACT_IRQ), codes::FACT_IRQ)?;
        p.mmio_write(Width::B4, STATUS, 0)?;
        p.mmio_read(Width::B4, FACTORIAL)?;
        p.result_eax()?;
        p.expect_rax(120, codes::FACTORIAL)?;
        p.report(0)?;
        p.build()
    }

    /// Write IRQ_RAISE (restricted by the test's policy: dropped with an alarm) and
    /// check IRQ_STATUS stayed clear. Result: IRQ_STATUS.
    pub fn restricted() -> Result<Vec<u8>> {
        let mut p = Payload::new()?;
        p.park_secondaries()?;
        p.mmio_write(Width::B4, IRQ_RAISE, u64::from(CAUSE))?;
        p.mmio_read(Width::B4, IRQ_STATUS)?;
        p.result_eax()?;
        p.expect_rax(0, codes::RESTRICTED)?;
        p.report(0)?;
        p.build()
    }
}

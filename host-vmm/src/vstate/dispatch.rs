//! Exit dispatch, separated from KVM: what one `KVM_RUN` exit does to the VM.
//!
//! [`handle_exit`] and the MMIO/port handlers work against [`ExitBus`], the narrow
//! interface of the VM a vCPU needs to answer an exit (MMIO to BAR0, the ROM and
//! addresses no RAM claims, the PCI configuration ports, the serial port, the
//! result port, and the verdict). `Shared` implements it for the real VM; the unit
//! tests below use a dummy bus and run without `/dev/kvm` (a `VcpuExit` can be
//! built directly). What needs the vCPU itself (registers, `immediate_exit`, the
//! policy engine's faults) is the vCPU thread's ([`super::vcpu`]): the dispatcher
//! only says so ([`Next`]).

use crate::devices::pci::Route;
use crate::error::VmmError;
use crate::vstate::layout::*;
use hilrig_device::DeviceError;
use kvm_ioctls::VcpuExit;
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use crate::verdict::Verdict;
pub use hilrig_vmm_api::ExitCounts;

/// What a vCPU needs from the VM to answer an exit. Every method is called with no
/// lock of the caller held.
pub(crate) trait ExitBus {
    /// Where a guest-physical MMIO address goes (BAR0, ROM, decode off, nothing).
    fn route(&self, addr: u64) -> Route;
    /// Whether trapped BAR0 accesses go through the policy engine (then the vCPU
    /// thread carries them out: [`Next::Policy`]).
    fn policy_on(&self) -> bool;
    /// A BAR0 access straight to the device.
    fn bar0(&self, off: u64, data: MmioData<'_>) -> Result<(), DeviceError>;
    /// Size of the expansion ROM image in bytes.
    fn rom_size(&self) -> u64;
    /// Read the expansion ROM at `off`.
    fn rom_read(&self, off: u64, data: &mut [u8]) -> Result<(), DeviceError>;
    /// A byte written to UART register `reg` (0..8).
    fn serial_write(&self, reg: u8, value: u8);
    /// A byte read from UART register `reg` (0..8).
    fn serial_read(&self, reg: u8) -> u8;
    /// A write to the PCI configuration ports (0xCF8..=0xCFF), re-mapping BAR0's
    /// direct pages if the write moved it or toggled memory decode.
    fn pci_write(&self, port: u16, data: &[u8]) -> Result<(), VmmError>;
    /// A read of the PCI configuration ports.
    fn pci_read(&self, port: u16, data: &mut [u8]);
    /// A value written to the result port (kept up to [`MAX_RESULTS`]).
    fn push_result(&self, value: u32);
    /// Record the verdict (the first wins) and stop every vCPU.
    fn finish(&self, verdict: Verdict);
}

/// What the exit handler wants the vCPU thread to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    /// Back to the guest.
    Continue,
    /// End the VM with this verdict, after filling in the guest's RIP.
    Bad(Box<Verdict>),
    /// `hlt`: this vCPU stops.
    Halt,
    /// The VM is stopping (a verdict was recorded).
    Stop,
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    Shutdown,
    /// KVM_EXIT_INTERNAL_ERROR (usually an instruction KVM cannot emulate on MMIO).
    Emulation,
    /// A BAR0 access for the policy engine (needs the vCPU: read data, RIP, faults).
    Policy(Pending),
}

/// A trapped BAR0 access copied out of `kvm_run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pending {
    /// Guest-physical address.
    pub addr: u64,
    /// Offset in BAR0.
    pub off: u64,
    /// Bytes (at most 8).
    pub len: usize,
    /// A write (else a read).
    pub write: bool,
    /// The written bytes.
    pub buf: [u8; 8],
}

/// The data of an MMIO exit.
pub(crate) enum MmioData<'a> {
    /// To be filled in for the guest.
    Read(&'a mut [u8]),
    /// What the guest wrote.
    Write(&'a [u8]),
}

/// Count the exit and carry it out against `bus`. `io_size` is the element size of a
/// port exit (`kvm_run.io.size`; a `rep ins`/`rep outs` hands over `count` elements
/// at once, each carried out on its own); 0 takes the data as one element.
#[inline]
pub(crate) fn handle_exit<B: ExitBus + ?Sized>(
    idx: u8,
    exit: VcpuExit<'_>,
    bus: &B,
    counts: &mut ExitCounts,
    first_mmio: &mut Option<Instant>,
    io_size: usize,
) -> Next {
    match exit {
        VcpuExit::MmioWrite(addr, data) => {
            counts.mmio_write += 1;
            first_mmio.get_or_insert_with(Instant::now);
            mmio(idx, bus, addr, MmioData::Write(data))
        }
        VcpuExit::MmioRead(addr, data) => {
            counts.mmio_read += 1;
            first_mmio.get_or_insert_with(Instant::now);
            mmio(idx, bus, addr, MmioData::Read(data))
        }
        VcpuExit::IoOut(port, data) => {
            counts.io_out += 1;
            let size = element(io_size, data.len());
            for e in data.chunks(size) {
                let next = io_out(idx, bus, port, e);
                if next != Next::Continue {
                    return next;
                }
            }
            Next::Continue
        }
        VcpuExit::IoIn(port, data) => {
            counts.io_in += 1;
            let size = element(io_size, data.len());
            for e in data.chunks_mut(size) {
                io_in(bus, port, e);
            }
            Next::Continue
        }
        VcpuExit::Hlt => {
            counts.hlt += 1;
            Next::Halt
        }
        VcpuExit::Intr => {
            counts.intr += 1;
            Next::Continue
        }
        VcpuExit::Shutdown => {
            counts.other += 1;
            Next::Shutdown
        }
        VcpuExit::FailEntry(reason, cpu) => {
            counts.other += 1;
            bus.finish(Verdict::Internal(format!(
                "vCPU {idx}: VM entry failed (hardware reason {reason:#x}, cpu {cpu})"
            )));
            Next::Stop
        }
        VcpuExit::InternalError => {
            counts.other += 1;
            Next::Emulation
        }
        other => {
            counts.other += 1;
            bus.finish(unknown_exit(idx, &other));
            Next::Stop
        }
    }
}

/// The element size of a port exit of `len` bytes (1, 2 or 4 dividing `len`; else
/// the whole data as one element).
fn element(io_size: usize, len: usize) -> usize {
    match io_size {
        1 | 2 | 4 if len % io_size == 0 => io_size,
        _ => len.max(1),
    }
}

/// The instruction at guest address `rip` (identity-mapped: virtual = physical),
/// decoded in Intel syntax; a description of the problem if it cannot be read.
pub fn describe_insn(mem: &GuestMemoryMmap, rip: u64) -> String {
    use iced_x86::Formatter;
    let mut buf = [0u8; 15];
    let n = match mem.read(&mut buf, GuestAddress(rip)) {
        Ok(n) => n,
        Err(_) => return format!("(rip {rip:#x} is not in guest RAM)"),
    };
    let mut d = iced_x86::Decoder::with_ip(64, &buf[..n], rip, iced_x86::DecoderOptions::NONE);
    let insn = d.decode();
    if insn.is_invalid() {
        return format!("(undecodable bytes {:02x?})", &buf[..n.min(8)]);
    }
    let mut out = String::new();
    iced_x86::IntelFormatter::new().format(&insn, &mut out);
    out
}

/// The verdict for an exit the VMM does not handle.
pub fn unknown_exit(vcpu: u8, exit: &VcpuExit<'_>) -> Verdict {
    Verdict::UnknownExit {
        vcpu,
        exit: format!("{exit:?}"),
    }
}

/// A BAD ACCESS verdict for the loop to complete with the guest's RIP.
fn bad(idx: u8, addr: u64, len: usize, write: bool, detail: String) -> Next {
    Next::Bad(Box::new(Verdict::BadAccess {
        vcpu: idx,
        addr,
        len,
        write,
        detail,
        rip: 0,
        insn: String::new(),
    }))
}

#[inline]
fn mmio<B: ExitBus + ?Sized>(idx: u8, bus: &B, addr: u64, data: MmioData<'_>) -> Next {
    let (len, write) = match &data {
        MmioData::Read(d) => (d.len(), false),
        MmioData::Write(d) => (d.len(), true),
    };
    let r = match bus.route(addr) {
        Route::Bar0(off) if bus.policy_on() => return Next::Policy(pending(addr, off, &data)),
        Route::Bar0(off) => bus.bar0(off, data),
        Route::Rom(off) => match data {
            MmioData::Read(d) => rom(bus, off, d),
            MmioData::Write(_) => Ok(()),
        },
        Route::Disabled => {
            if let MmioData::Read(d) = data {
                d.fill(0xff);
            }
            Ok(())
        }
        Route::Unclaimed => {
            return bad(
                idx,
                addr,
                len,
                write,
                "no RAM or device claims this address".into(),
            )
        }
    };
    match r {
        Ok(()) => Next::Continue,
        Err(e) => bad(idx, addr, len, write, e.to_string()),
    }
}

/// A BAR0 access for the policy engine, copied out of `kvm_run`.
#[inline]
fn pending(addr: u64, off: u64, data: &MmioData<'_>) -> Pending {
    let (len, write) = match data {
        MmioData::Read(d) => (d.len().min(8), false),
        MmioData::Write(d) => (d.len().min(8), true),
    };
    let mut p = Pending {
        addr,
        off,
        len,
        write,
        buf: [0; 8],
    };
    if let MmioData::Write(d) = data {
        p.buf[..len].copy_from_slice(&d[..len]);
    }
    p
}

/// A read of the expansion ROM window: bytes past the image read as all-ones.
fn rom<B: ExitBus + ?Sized>(bus: &B, off: u64, d: &mut [u8]) -> Result<(), DeviceError> {
    let rom_size = bus.rom_size();
    d.fill(0xff);
    let avail = rom_size.saturating_sub(off).min(d.len() as u64) as usize;
    if avail > 0 {
        bus.rom_read(off, &mut d[..avail])?;
    }
    Ok(())
}

/// Up to 4 little-endian bytes as a u32 (wider writes keep their low 4 bytes).
fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(data) {
        *d = *s;
    }
    u32::from_le_bytes(b)
}

fn io_out<B: ExitBus + ?Sized>(idx: u8, bus: &B, port: u16, data: &[u8]) -> Next {
    match port {
        PORT_EXIT => {
            let code = le_u32(data);
            bus.finish(if code == 0 {
                Verdict::Pass
            } else {
                Verdict::Fail { code, vcpu: idx }
            });
            Next::Stop
        }
        PORT_DEBUG => {
            tracing::debug!(vcpu = idx, ?data, "guest debug port");
            // Test hook (armed only by HILRIG_VMM_SECCOMP_PROBE=1): a forbidden
            // syscall from this vCPU thread.
            if data == crate::seccomp::PROBE_MAGIC.to_le_bytes() {
                crate::seccomp::probe();
            }
            Next::Continue
        }
        PORT_RESULT => {
            bus.push_result(le_u32(data));
            Next::Continue
        }
        p if (PORT_COM1..PORT_COM1 + 8).contains(&p) => {
            if let Some(&b) = data.first() {
                bus.serial_write((p - PORT_COM1) as u8, b);
            }
            Next::Continue
        }
        PORT_PCI_ADDR..=0xcff => match bus.pci_write(port, data) {
            Ok(()) => Next::Continue,
            Err(e) => {
                bus.finish(Verdict::Internal(format!("remapping BAR0: {e}")));
                Next::Stop
            }
        },
        _ => Next::Continue,
    }
}

fn io_in<B: ExitBus + ?Sized>(bus: &B, port: u16, data: &mut [u8]) {
    match port {
        p if (PORT_COM1..PORT_COM1 + 8).contains(&p) => {
            let v = bus.serial_read((p - PORT_COM1) as u8);
            data.fill(0);
            if let Some(d) = data.first_mut() {
                *d = v;
            }
        }
        PORT_PCI_ADDR..=0xcff => bus.pci_read(port, data),
        _ => data.fill(0xff),
    }
}

#[cfg(test)]
mod tests {
    //! Exit dispatch against a dummy bus: a real `PciBus` (config space, routing),
    //! a recording device, UART bytes, results and verdicts kept in memory. No KVM.
    use super::*;
    use crate::devices::pci::PciBus;
    use std::cell::RefCell;

    #[derive(Default)]
    struct Log {
        device: Vec<(u64, bool, Vec<u8>)>,
        serial: Vec<(u8, u8)>,
        results: Vec<u32>,
        verdicts: Vec<Verdict>,
    }

    struct Dummy {
        pci: RefCell<PciBus>,
        log: RefCell<Log>,
        policy: bool,
        /// The device refuses accesses at or past this BAR0 offset.
        refuse_from: u64,
        remap_fails: bool,
    }

    const ROM: &[u8] = b"\x55\xaaROM";

    impl Dummy {
        fn new() -> Dummy {
            let mut pci = PciBus::new(ROM.len() as u64);
            pci.assign(BAR0_DEFAULT, ROM_DEFAULT);
            Dummy {
                pci: RefCell::new(pci),
                log: RefCell::default(),
                policy: false,
                refuse_from: u64::MAX,
                remap_fails: false,
            }
        }
        fn verdicts(&self) -> Vec<Verdict> {
            self.log.borrow().verdicts.clone()
        }
    }

    impl ExitBus for Dummy {
        fn route(&self, addr: u64) -> Route {
            self.pci.borrow().route(addr)
        }
        fn policy_on(&self) -> bool {
            self.policy
        }
        fn bar0(&self, off: u64, data: MmioData<'_>) -> Result<(), DeviceError> {
            if off >= self.refuse_from {
                return Err(DeviceError::Access {
                    offset: off,
                    len: 1,
                    reason: hilrig_device::device::AccessFault::OutOfRange,
                });
            }
            let mut log = self.log.borrow_mut();
            match data {
                MmioData::Read(d) => {
                    d.fill(0xab);
                    log.device.push((off, false, d.to_vec()));
                }
                MmioData::Write(d) => log.device.push((off, true, d.to_vec())),
            }
            Ok(())
        }
        fn rom_size(&self) -> u64 {
            ROM.len() as u64
        }
        fn rom_read(&self, off: u64, data: &mut [u8]) -> Result<(), DeviceError> {
            let off = off as usize;
            data.copy_from_slice(&ROM[off..off + data.len()]);
            Ok(())
        }
        fn serial_write(&self, reg: u8, value: u8) {
            self.log.borrow_mut().serial.push((reg, value));
        }
        fn serial_read(&self, reg: u8) -> u8 {
            0x60 | reg
        }
        fn pci_write(&self, port: u16, data: &[u8]) -> Result<(), VmmError> {
            if self.pci.borrow_mut().io_write(port, data) && self.remap_fails {
                return Err(VmmError::Config("slot refused".into()));
            }
            Ok(())
        }
        fn pci_read(&self, port: u16, data: &mut [u8]) {
            self.pci.borrow_mut().io_read(port, data)
        }
        fn push_result(&self, value: u32) {
            self.log.borrow_mut().results.push(value);
        }
        fn finish(&self, verdict: Verdict) {
            self.log.borrow_mut().verdicts.push(verdict);
        }
    }

    fn exit(bus: &Dummy, e: VcpuExit<'_>) -> (Next, ExitCounts) {
        let mut counts = ExitCounts::default();
        let mut first = None;
        let next = handle_exit(2, e, bus, &mut counts, &mut first, 0);
        (next, counts)
    }

    #[test]
    fn exit_port_zero_passes_and_non_zero_fails_naming_the_vcpu() {
        let bus = Dummy::new();
        let (n, c) = exit(&bus, VcpuExit::IoOut(PORT_EXIT, &[0]));
        assert_eq!((n, c.io_out), (Next::Stop, 1));
        assert_eq!(bus.verdicts(), vec![Verdict::Pass]);
        let bus = Dummy::new();
        let (n, _) = exit(&bus, VcpuExit::IoOut(PORT_EXIT, &[0x34, 0x12, 0, 0]));
        assert_eq!(n, Next::Stop);
        assert_eq!(
            bus.verdicts(),
            vec![Verdict::Fail {
                code: 0x1234,
                vcpu: 2
            }]
        );
    }

    #[test]
    fn string_port_io_carries_out_every_element() {
        // `rep outsd` of 3 elements to the result port; `rep insd` of 4 from the
        // PCI data port (vendor/device of 00:01.0) and of 3 bytes from the UART.
        let bus = Dummy::new();
        let mut counts = ExitCounts::default();
        let mut first = None;
        let out = [1u8, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0];
        let n = handle_exit(
            0,
            VcpuExit::IoOut(PORT_RESULT, &out),
            &bus,
            &mut counts,
            &mut first,
            4,
        );
        assert_eq!(n, Next::Continue);
        assert_eq!(bus.log.borrow().results, vec![1, 2, 3]);
        handle_exit(
            0,
            VcpuExit::IoOut(PORT_PCI_ADDR, &0x8000_0800u32.to_le_bytes()),
            &bus,
            &mut counts,
            &mut first,
            4,
        );
        let mut d = [0u8; 16];
        handle_exit(
            0,
            VcpuExit::IoIn(PORT_PCI_DATA, &mut d),
            &bus,
            &mut counts,
            &mut first,
            4,
        );
        let ids = &d[..4];
        assert_ne!(ids, &[0xff; 4]);
        for e in d.chunks(4) {
            assert_eq!(e, ids, "every element filled: {d:02x?}");
        }
        let mut u = [0u8; 3];
        handle_exit(
            0,
            VcpuExit::IoIn(PORT_COM1 + 5, &mut u),
            &bus,
            &mut counts,
            &mut first,
            1,
        );
        assert_eq!(u, [0x65; 3]);
    }

    #[test]
    fn result_port_appends_and_debug_port_continues() {
        let bus = Dummy::new();
        assert_eq!(
            exit(&bus, VcpuExit::IoOut(PORT_RESULT, &[7, 0])).0,
            Next::Continue
        );
        exit(&bus, VcpuExit::IoOut(PORT_RESULT, &[1, 2, 3, 4]));
        assert_eq!(
            exit(&bus, VcpuExit::IoOut(PORT_DEBUG, &[9])).0,
            Next::Continue
        );
        let log = bus.log.borrow();
        assert_eq!(log.results, vec![7, 0x0403_0201]);
        assert!(log.verdicts.is_empty() && log.device.is_empty());
    }

    #[test]
    fn pci_config_ports_read_the_device_header() {
        let bus = Dummy::new();
        // Bus 0, device 1, function 0, register 0: vendor and device IDs.
        let addr = 0x8000_0800u32.to_le_bytes();
        assert_eq!(
            exit(&bus, VcpuExit::IoOut(PORT_PCI_ADDR, &addr)).0,
            Next::Continue
        );
        let mut d = [0u8; 4];
        let (n, c) = exit(&bus, VcpuExit::IoIn(0xcfc, &mut d));
        assert_eq!((n, c.io_in), (Next::Continue, 1));
        let id = u32::from_le_bytes(d);
        assert_eq!(id & 0xffff, u32::from(hilrig_device::regmap::PCI_VENDOR_ID));
        assert_eq!(id >> 16, u32::from(hilrig_device::regmap::PCI_DEVICE_ID));
        // The address port reads back.
        let mut a = [0u8; 4];
        exit(&bus, VcpuExit::IoIn(PORT_PCI_ADDR, &mut a));
        assert_eq!(a, addr);
    }

    #[test]
    fn a_failed_remap_after_a_config_write_ends_the_vm() {
        let mut bus = Dummy::new();
        bus.remap_fails = true;
        exit(
            &bus,
            VcpuExit::IoOut(PORT_PCI_ADDR, &0x8000_0804u32.to_le_bytes()),
        );
        // Command register: memory decode off (a decode change re-maps BAR0).
        let (n, _) = exit(&bus, VcpuExit::IoOut(0xcfc, &[0, 0]));
        assert_eq!(n, Next::Stop);
        match bus.verdicts().as_slice() {
            [Verdict::Internal(m)] => assert!(m.contains("remapping BAR0"), "{m}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn serial_port_bytes_reach_the_uart() {
        let bus = Dummy::new();
        exit(&bus, VcpuExit::IoOut(PORT_COM1, b"h"));
        exit(&bus, VcpuExit::IoOut(PORT_COM1 + 3, &[0x80]));
        let mut d = [0xeeu8; 2];
        exit(&bus, VcpuExit::IoIn(PORT_COM1 + 5, &mut d));
        assert_eq!(d, [0x65, 0]);
        assert_eq!(bus.log.borrow().serial, vec![(0, b'h'), (3, 0x80)]);
        // A port nobody serves reads all-ones.
        let mut d = [0u8; 2];
        exit(&bus, VcpuExit::IoIn(0x80, &mut d));
        assert_eq!(d, [0xff, 0xff]);
    }

    #[test]
    fn mmio_inside_bar0_reaches_the_device() {
        let bus = Dummy::new();
        let (n, c) = exit(
            &bus,
            VcpuExit::MmioWrite(BAR0_DEFAULT + 0x40, &[1, 2, 3, 4]),
        );
        assert_eq!((n, c.mmio_write), (Next::Continue, 1));
        let mut d = [0u8; 8];
        let mut first = None;
        let mut counts = ExitCounts::default();
        let n = handle_exit(
            0,
            VcpuExit::MmioRead(BAR0_DEFAULT + 0xfff8, &mut d),
            &bus,
            &mut counts,
            &mut first,
            0,
        );
        assert_eq!((n, counts.mmio_read), (Next::Continue, 1));
        assert!(first.is_some(), "the first MMIO exit is stamped");
        assert_eq!(d, [0xab; 8]);
        assert_eq!(
            bus.log.borrow().device,
            vec![
                (0x40, true, vec![1, 2, 3, 4]),
                (0xfff8, false, vec![0xab; 8])
            ]
        );
    }

    #[test]
    fn mmio_with_a_policy_goes_to_the_vcpu_thread() {
        let mut bus = Dummy::new();
        bus.policy = true;
        let (n, _) = exit(
            &bus,
            VcpuExit::MmioWrite(BAR0_DEFAULT + 0x38, &[1, 2, 3, 4]),
        );
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            n,
            Next::Policy(Pending {
                addr: BAR0_DEFAULT + 0x38,
                off: 0x38,
                len: 4,
                write: true,
                buf
            })
        );
        assert!(bus.log.borrow().device.is_empty(), "not decided here");
    }

    #[test]
    fn mmio_nothing_claims_is_a_bad_access_naming_the_address() {
        let bus = Dummy::new();
        let addr = BAR0_DEFAULT + 0x1_0000;
        let mut d = [0u8; 4];
        let (n, _) = exit(&bus, VcpuExit::MmioRead(addr, &mut d));
        match n {
            Next::Bad(v) => match *v {
                Verdict::BadAccess {
                    vcpu,
                    addr: a,
                    len,
                    write,
                    ref detail,
                    ..
                } => {
                    assert_eq!((vcpu, a, len, write), (2, addr, 4, false));
                    assert!(detail.contains("no RAM or device"), "{detail}");
                }
                ref v => panic!("{v:?}"),
            },
            n => panic!("{n:?}"),
        }
        assert!(bus.log.borrow().device.is_empty());
    }

    #[test]
    fn a_refused_device_access_is_a_bad_access() {
        let mut bus = Dummy::new();
        bus.refuse_from = 0x100;
        let (n, _) = exit(&bus, VcpuExit::MmioWrite(BAR0_DEFAULT + 0x100, &[1]));
        assert!(
            matches!(&n, Next::Bad(v) if matches!(**v, Verdict::BadAccess { write: true, len: 1, .. })),
            "{n:?}"
        );
    }

    #[test]
    fn rom_reads_past_the_image_are_all_ones() {
        let bus = Dummy::new();
        // The ROM BAR is assigned but not enabled: decode off reads all-ones.
        let mut d = [0u8; 4];
        assert_eq!(
            exit(&bus, VcpuExit::MmioRead(ROM_DEFAULT, &mut d)).0,
            Next::Continue
        );
        assert_eq!(d, [0xff; 4]);
        // Enable it (config 0x30 bit 0).
        exit(
            &bus,
            VcpuExit::IoOut(PORT_PCI_ADDR, &0x8000_0830u32.to_le_bytes()),
        );
        exit(
            &bus,
            VcpuExit::IoOut(0xcfc, &(ROM_DEFAULT as u32 | 1).to_le_bytes()),
        );
        let mut d = [0u8; 8];
        exit(&bus, VcpuExit::MmioRead(ROM_DEFAULT + 2, &mut d));
        assert_eq!(d, [b'R', b'O', b'M', 0xff, 0xff, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn an_unknown_exit_ends_the_vm_as_unknown_exit() {
        let bus = Dummy::new();
        let (n, c) = exit(&bus, VcpuExit::Nmi);
        assert_eq!((n, c.other), (Next::Stop, 1));
        match bus.verdicts().as_slice() {
            [Verdict::UnknownExit { vcpu: 2, exit }] => assert!(exit.contains("Nmi"), "{exit}"),
            v => panic!("{v:?}"),
        }
        assert_eq!(
            bus.verdicts()[0].exit_status(),
            hilrig_vmm_api::ExitStatus::UnknownExit
        );
    }

    #[test]
    fn hlt_is_counted_and_halts_this_vcpu_only() {
        let bus = Dummy::new();
        let mut counts = ExitCounts::default();
        let mut first = None;
        for _ in 0..3 {
            let n = handle_exit(0, VcpuExit::Hlt, &bus, &mut counts, &mut first, 0);
            assert_eq!(n, Next::Halt);
        }
        assert_eq!(counts.hlt, 3);
        assert!(bus.verdicts().is_empty(), "a halt records no verdict");
        assert!(first.is_none());
    }

    #[test]
    fn shutdown_internal_error_and_failed_entry() {
        let bus = Dummy::new();
        assert_eq!(exit(&bus, VcpuExit::Shutdown).0, Next::Shutdown);
        assert_eq!(exit(&bus, VcpuExit::InternalError).0, Next::Emulation);
        assert!(bus.verdicts().is_empty());
        assert_eq!(exit(&bus, VcpuExit::FailEntry(0x21, 1)).0, Next::Stop);
        assert!(matches!(bus.verdicts().as_slice(), [Verdict::Internal(m)] if m.contains("0x21")));
        assert_eq!(
            exit(&bus, VcpuExit::Intr),
            (
                Next::Continue,
                ExitCounts {
                    intr: 1,
                    ..Default::default()
                }
            )
        );
    }
}

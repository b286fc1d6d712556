//! The stuck-RIP detector: an instruction KVM loops on inside `KVM_RUN` without
//! ever exiting to the VMM (`sgdt`/`sidt` with a trapped BAR0 page or an address
//! nothing claims as operand: KVM's emulator re-enters the guest at the same RIP
//! forever) used to hold its vCPU until the watchdog.
//!
//! The watchdog loop kicks every vCPU once per [`SAMPLE_EVERY`] (bounded: one
//! signal per vCPU per period, counted in `RunReport::kicks`). A kicked vCPU leaves
//! `KVM_RUN` and samples itself ([`Stuck::sample`]): its registers, the exits it
//! handled and the CPU time its thread used. A vCPU that, over [`STREAK`] samples
//! in a row, handled no exit, kept every register (RIP included) and kept using the
//! CPU (so it really ran: a parked or starved thread proves nothing) is stuck;
//! if the instruction at its RIP has a memory operand on guest-physical memory
//! that is neither RAM nor a BAR0 page mapped into the guest (so every access of it
//! must exit, and none did), KVM is looping on it: the VM ends with a verdict
//! naming the instruction and the address, or with `--on-unemulated ud` the guest
//! gets #UD there. A vCPU spinning on anything else (`jmp $`) is left to the
//! watchdog.

use crate::vstate::vcpu::VcpuHost;
use iced_x86::{Decoder, DecoderOptions, InstructionInfoFactory, OpAccess};
use kvm_bindings::kvm_regs;
use kvm_ioctls::VcpuFd;
use std::time::Duration;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// How often the watchdog loop samples every vCPU.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Samples in a row without progress before the instruction is examined.
pub(crate) const STREAK: u32 = 3;
/// CPU time a vCPU thread must have used between two samples for the interval to
/// count (it ran, and still did not move).
const MIN_CPU_NS: u64 = 2_000_000;

/// One vCPU's sampling state.
#[derive(Default)]
pub(crate) struct Stuck {
    last: Option<(kvm_regs, u64)>,
    cpu_ns: u64,
    streak: u32,
    round: u64,
}

/// A vCPU KVM loops on: where, what, and the access it cannot complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StuckAt {
    pub rip: u64,
    pub insn: String,
    pub gpa: u64,
    pub write: bool,
    pub what: String,
}

impl StuckAt {
    /// The verdict's text.
    pub fn describe(&self, idx: u8) -> String {
        format!(
            "vCPU {idx}: stuck at rip {:#x}: KVM loops on `{}` ({} {} at {:#x}) inside KVM_RUN without an exit to the VMM (an instruction KVM cannot emulate on MMIO; --on-unemulated ud gives the guest #UD instead)",
            self.rip,
            self.insn,
            if self.write { "writes" } else { "reads" },
            self.what,
            self.gpa
        )
    }
}

fn same(a: &kvm_regs, b: &kvm_regs) -> bool {
    let f = |r: &kvm_regs| {
        [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags,
        ]
    };
    f(a) == f(b)
}

/// CPU time this thread has used (ns), 0 if unknown.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a plain clock_gettime into a local timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

impl Stuck {
    /// Take a sample after a kick; `exits` is the number of exits this vCPU has
    /// handled so far. Some when KVM is looping on the instruction at RIP.
    pub(crate) fn sample<H: VcpuHost>(
        &mut self,
        fd: &VcpuFd,
        shared: &H,
        exits: u64,
    ) -> Option<StuckAt> {
        // Only the watchdog's sampling kicks (not a pause's or a stop's).
        let round = shared.sample_round();
        if round == self.round {
            return None;
        }
        self.round = round;
        let regs = fd.get_regs().ok()?;
        let cpu = thread_cpu_ns();
        let ran = cpu.saturating_sub(self.cpu_ns) >= MIN_CPU_NS;
        self.cpu_ns = cpu;
        let still = matches!(&self.last, Some((r, e)) if *e == exits && same(r, &regs));
        self.last = Some((regs, exits));
        if !still {
            self.streak = 0;
            return None;
        }
        if ran {
            self.streak += 1;
        }
        if self.streak < STREAK {
            return None;
        }
        self.streak = 0;
        let at = looping_on(fd, shared, &regs);
        if at.is_none() {
            // Spinning on something else (`jmp $`): the watchdog's business. Do not
            // decode it again at every sample.
            self.last = None;
        }
        at
    }
}

/// The memory operand of the instruction at RIP that lies on memory every access
/// of which must exit (not RAM, not a mapped BAR0 page), if any.
fn looping_on<H: VcpuHost>(fd: &VcpuFd, shared: &H, regs: &kvm_regs) -> Option<StuckAt> {
    let sregs = fd.get_sregs().ok()?;
    let walk = crate::policy::fault::Walk {
        mem: shared.guest_mem(),
        sregs: &sregs,
    };
    let mut b = [0u8; 15];
    let n = walk.fetch(regs.rip, &mut b);
    if n == 0 {
        return None;
    }
    let mut d = Decoder::with_ip(64, &b[..n], regs.rip, DecoderOptions::NONE);
    let i = d.decode();
    if i.is_invalid() {
        return None;
    }
    let mut info = InstructionInfoFactory::new();
    for m in info.info(&i).used_memory() {
        let Some(va) = m.virtual_address(0, |r, _, _| crate::policy::fault::reg_value(regs, r))
        else {
            continue;
        };
        let size = m.memory_size().size().max(1) as u64;
        let write = matches!(
            m.access(),
            OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
        );
        for va in [va, va.wrapping_add(size - 1)] {
            let Some(gpa) = walk.translate(va) else {
                continue;
            };
            if let Some(what) = exiting_memory(shared, gpa) {
                return Some(StuckAt {
                    rip: regs.rip,
                    insn: crate::policy::fault::format_insn(&i),
                    gpa,
                    write,
                    what,
                });
            }
        }
    }
    None
}

/// What `gpa` is if every access to it exits to the VMM (neither guest RAM nor a
/// BAR0 page mapped into the guest).
fn exiting_memory<H: VcpuHost>(shared: &H, gpa: u64) -> Option<String> {
    if shared.guest_mem().address_in_range(GuestAddress(gpa)) || shared.read_direct(gpa, &mut [0u8])
    {
        return None;
    }
    Some(match crate::vstate::dispatch::ExitBus::route(shared, gpa) {
        crate::devices::pci::Route::Bar0(off) => {
            format!("BAR0 + {off:#x}, a trapped page")
        }
        crate::devices::pci::Route::Rom(off) => format!("the expansion ROM + {off:#x}"),
        crate::devices::pci::Route::Disabled => "BAR0 with memory decode off".into(),
        crate::devices::pci::Route::Unclaimed => "an address nothing claims".into(),
    })
}

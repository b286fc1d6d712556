//! The vCPU side of the policy engine: alarms (guest RIP, the instruction fetched
//! through the guest's page tables and decoded) and fault injection.
//!
//! Fault injection (see the README's fault ABI): at a faulting access KVM is in the
//! middle of emulating the instruction. The VMM snapshots the registers (and the
//! XSAVE state), lets KVM finish the emulation without running the guest
//! (`immediate_exit`; any further MMIO of the instruction reads zeros and writes
//! nothing), restores the snapshot and injects #GP(0). For a read the snapshot is the
//! state before the instruction (RIP at it: a precise fault); for a write KVM has
//! already retired the instruction when it exits, so RIP is past it (mid-`rep`, at
//! it with the registers of the remaining iterations).

use crate::policy::engine::{Outcome, PolicyEngine};
use crate::verdict::Verdict;
use iced_x86::{
    Decoder, DecoderOptions, Formatter, Instruction, InstructionInfoFactory, IntelFormatter,
    OpAccess, Register,
};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicBool, Ordering};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Code fetches for alarms and verdicts from BAR0 pages mapped straight into the
/// guest (code run from a data-buffer page). The VM implements it; a vCPU thread
/// names its VM here for the length of its loop ([`set_direct_pages`]).
pub(crate) trait DirectPages {
    /// Read `out.len()` bytes at guest-physical `gpa` if they lie in a BAR0 page
    /// mapped into the guest; false if not.
    fn read_direct(&self, gpa: u64, out: &mut [u8]) -> bool;
}

thread_local! {
    /// The VM this vCPU thread runs (set for the length of its loop), for [`read_direct`].
    static DIRECT_PAGES: std::cell::Cell<Option<*const dyn DirectPages>> =
        const { std::cell::Cell::new(None) };
}

/// Name (or, with `None`, forget) the VM whose direct BAR0 pages this thread's code
/// fetches may read.
///
/// # Safety
/// The pointee must stay alive until this thread calls `set_direct_pages(None)`.
pub(crate) unsafe fn set_direct_pages(vm: Option<*const dyn DirectPages>) {
    DIRECT_PAGES.with(|c| c.set(vm));
}

/// Read `out.len()` bytes at guest-physical `gpa` from a BAR0 page mapped straight
/// into the guest of this vCPU thread's VM (code run from a data-buffer page); false
/// if it is not one (or not on a vCPU thread).
fn read_direct(gpa: u64, out: &mut [u8]) -> bool {
    DIRECT_PAGES.with(|c| match c.get() {
        // SAFETY: set_direct_pages's caller keeps the VM alive until it clears it.
        Some(p) => unsafe { &*p }.read_direct(gpa, out),
        None => false,
    })
}

/// What the vCPU thread needs from the VM.
pub(crate) struct Ctx<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub engine: &'a PolicyEngine,
    pub stop: &'a AtomicBool,
}

/// General-purpose exception: the vector the engine injects.
pub const GP_VECTOR: u8 = 13;

impl Ctx<'_> {
    /// Record the alarms of `out` that the sink admits (RIP and instruction are
    /// looked up once, only when an alarm is admitted). `synced`: KVM copied the
    /// registers into `kvm_run` at this exit (the run asked for them), so RIP
    /// costs no ioctl.
    #[allow(clippy::too_many_arguments)]
    #[inline(never)]
    pub fn raise_alarms(
        &self,
        idx: u8,
        vcpu: &VcpuFd,
        synced: bool,
        gpa: u64,
        len: usize,
        write: bool,
        out: &Outcome,
        cache: &mut SiteCache,
    ) {
        let mut site: Option<(u64, Option<u64>, String)> = None;
        for hit in out.hits.iter().flatten() {
            let t_us = self.engine.elapsed_us();
            let Some(key) = self.engine.alarms.admit(hit, t_us) else {
                continue;
            };
            let (rip, insn_rip, insn) = site
                .get_or_insert_with(|| locate(self.mem, vcpu, synced, gpa, len, write, cache))
                .clone();
            let by = out.decided_by;
            let mut a = self.engine.alarm(by, idx, rip, insn_rip, insn, len, hit);
            a.t_us = t_us;
            a.count = key.count;
            a.first_us = key.first_us;
            self.engine.alarms.push(a);
        }
    }

    /// Deliver #GP(0) for the faulting access (see the module docs). Ok(false): the
    /// VM is stopping.
    pub fn inject_gp(&self, idx: u8, vcpu: &mut VcpuFd) -> Result<bool, Verdict> {
        let err = |what: &str, e: kvm_ioctls::Error| {
            Verdict::Internal(format!("vCPU {idx}: injecting a fault: {what}: {e}"))
        };
        let regs = vcpu.get_regs().map_err(|e| err("KVM_GET_REGS", e))?;
        let xsave = vcpu.get_xsave().map_err(|e| err("KVM_GET_XSAVE", e))?;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(false);
            }
            vcpu.set_kvm_immediate_exit(1);
            match vcpu.run() {
                Err(e) if e.errno() == libc::EINTR => break,
                Err(e) if e.errno() == libc::EAGAIN => {}
                Ok(VcpuExit::MmioRead(_, d)) => d.fill(0),
                Ok(VcpuExit::MmioWrite(..)) => {}
                Ok(other) => {
                    tracing::debug!(vcpu = idx, "finishing a faulting access: {other:?}");
                    break;
                }
                Err(e) => {
                    vcpu.set_kvm_immediate_exit(0);
                    return Err(err("KVM_RUN", e));
                }
            }
        }
        vcpu.set_kvm_immediate_exit(0);
        vcpu.set_regs(&regs).map_err(|e| err("KVM_SET_REGS", e))?;
        // SAFETY: the buffer came from KVM_GET_XSAVE on this vCPU a moment ago.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(|e| err("KVM_SET_XSAVE", e))?;
        let mut ev = vcpu
            .get_vcpu_events()
            .map_err(|e| err("KVM_GET_VCPU_EVENTS", e))?;
        ev.exception.injected = 1;
        ev.exception.pending = 0;
        ev.exception.nr = GP_VECTOR;
        ev.exception.has_error_code = 1;
        ev.exception.error_code = 0;
        vcpu.set_vcpu_events(&ev)
            .map_err(|e| err("KVM_SET_VCPU_EVENTS", e))?;
        Ok(true)
    }
}

/// The memory operand size of the instruction that made a write of `len` bytes at
/// `gpa` (KVM has retired it; see [`find_writer`]), if it can be found.
pub(crate) fn store_size(
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    gpa: u64,
    len: usize,
) -> Option<usize> {
    let regs = vcpu.get_regs().ok()?;
    let sregs = vcpu.get_sregs().ok()?;
    let walk = Walk { mem, sregs: &sregs };
    find_writer(&walk, &regs, gpa, len).map(|(_, i)| i.memory_size().size())
}

/// The guest RIP and the instruction that made an access of `len` bytes at `gpa`,
/// fetched through the guest's page tables: for a read the instruction at RIP; for a
/// write (KVM has retired it, RIP is past it) the instruction found by decoding
/// backwards ([`find_writer`]), else the one at RIP marked `(before)`.
pub(crate) fn name_access(
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    gpa: u64,
    len: usize,
    write: bool,
) -> (u64, String) {
    let regs = match vcpu.get_regs() {
        Ok(r) => r,
        Err(e) => return (0, format!("(registers unavailable: {e})")),
    };
    let sregs = match vcpu.get_sregs() {
        Ok(s) => s,
        Err(e) => return (regs.rip, format!("(special registers unavailable: {e})")),
    };
    let walk = Walk { mem, sregs: &sregs };
    let mut at_rip = [0u8; 15];
    let n = walk.fetch(regs.rip, &mut at_rip);
    let (found, insn) = describe_access(&walk, &regs, &at_rip[..n], gpa, len, write);
    (found.unwrap_or(regs.rip), insn)
}

/// The guest RIP and the instruction there, fetched through the guest's page tables.
pub(crate) fn name_rip(mem: &GuestMemoryMmap, vcpu: &VcpuFd) -> (u64, String) {
    let regs = match vcpu.get_regs() {
        Ok(r) => r,
        Err(e) => return (0, format!("(registers unavailable: {e})")),
    };
    match vcpu.get_sregs() {
        Ok(sregs) => (regs.rip, Walk { mem, sregs: &sregs }.describe(regs.rip)),
        Err(e) => (regs.rip, format!("(special registers unavailable: {e})")),
    }
}

/// Deliver exception `vector` (no error code) at the guest's current RIP: for an
/// instruction KVM could not emulate (RIP is still at it), #UD.
pub(crate) fn inject_exception(vcpu: &VcpuFd, vector: u8) -> Result<(), kvm_ioctls::Error> {
    let mut ev = vcpu.get_vcpu_events()?;
    ev.exception.injected = 1;
    ev.exception.pending = 0;
    ev.exception.nr = vector;
    ev.exception.has_error_code = 0;
    ev.exception.error_code = 0;
    vcpu.set_vcpu_events(&ev)
}

/// Invalid opcode: what `--on-unemulated ud` injects.
pub const UD_VECTOR: u8 = 6;

/// The last alarm site of a vCPU: a guest hammering one register from one
/// instruction is described without asking KVM for the special registers or
/// decoding again — the code bytes around RIP, fetched through the page tables
/// that were current when the site was first described, must be unchanged.
#[derive(Default)]
pub(crate) struct SiteCache {
    site: Option<(u64, u64, usize, bool)>,
    sregs: Option<kvm_sregs>,
    bytes: [u8; 30],
    n: usize,
    found: Option<u64>,
    insn: String,
}

/// (RIP, address of the accessing instruction if found, the instruction decoded).
/// `sync`: KVM copied the registers into `kvm_run` at this exit (KVM_CAP_SYNC_REGS),
/// so RIP costs no ioctl.
fn locate(
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    sync: bool,
    gpa: u64,
    len: usize,
    write: bool,
    cache: &mut SiteCache,
) -> (u64, Option<u64>, String) {
    let regs = if sync {
        vcpu.sync_regs().regs
    } else {
        match vcpu.get_regs() {
            Ok(r) => r,
            Err(e) => return (0, None, format!("(registers unavailable: {e})")),
        }
    };
    let site = (regs.rip, gpa, len, write);
    let mut bytes = [0u8; 30];
    if cache.site == Some(site) {
        if let Some(sregs) = cache.sregs.as_ref() {
            let walk = Walk { mem, sregs };
            let n = walk.fetch(regs.rip.saturating_sub(15), &mut bytes);
            if n == cache.n && bytes == cache.bytes {
                return (regs.rip, cache.found, cache.insn.clone());
            }
        }
    }
    let sregs = match vcpu.get_sregs() {
        Ok(s) => s,
        Err(e) => {
            return (
                regs.rip,
                None,
                format!("(special registers unavailable: {e})"),
            )
        }
    };
    let walk = Walk { mem, sregs: &sregs };
    let start = regs.rip.saturating_sub(15);
    let n = walk.fetch(start, &mut bytes);
    // The description is made from these same bytes (cached with them below): a
    // second fetch could see other bytes, and the cache would pair the two.
    let at_rip = ((regs.rip - start) as usize).min(n);
    let (found, insn) = describe_access(&walk, &regs, &bytes[at_rip..n], gpa, len, write);
    *cache = SiteCache {
        site: Some(site),
        sregs: Some(sregs),
        bytes,
        n,
        found,
        insn: insn.clone(),
    };
    (regs.rip, found, insn)
}

/// `at_rip`: the guest's bytes from RIP on, as fetched once by the caller.
fn describe_access(
    walk: &Walk<'_>,
    regs: &kvm_regs,
    at_rip: &[u8],
    gpa: u64,
    len: usize,
    write: bool,
) -> (Option<u64>, String) {
    if !write {
        // KVM exits on a read before retiring it: the instruction is at RIP — unless
        // another vCPU rewrote the bytes since the access (guest memory is read
        // after the exit). An instruction that reads no memory did not make it.
        let b = &at_rip[..at_rip.len().min(15)];
        let n = b.len();
        let i = Decoder::with_ip(64, b, regs.rip, DecoderOptions::NONE).decode();
        let reads = !i.is_invalid()
            && InstructionInfoFactory::new()
                .info(&i)
                .used_memory()
                .iter()
                .any(|m| {
                    !matches!(
                        m.access(),
                        OpAccess::Write | OpAccess::CondWrite | OpAccess::NoMemAccess
                    )
                });
        if n > 0 && !i.is_invalid() && !reads {
            return (
                None,
                format!(
                    "(changed since the access: `{}` at RIP now reads no memory)",
                    format_insn(&i)
                ),
            );
        }
        if n == 0 || i.is_invalid() {
            return (Some(regs.rip), walk.describe(regs.rip));
        }
        // Named from the same bytes that were checked (a second fetch could see
        // other bytes again).
        return (Some(regs.rip), format_insn(&i));
    }
    match find_writer(walk, regs, gpa, len) {
        Some((at, insn)) => (Some(at), format_insn(&insn)),
        None => (None, format!("(before) {}", walk.describe(regs.rip))),
    }
}

pub(crate) fn format_insn(i: &Instruction) -> String {
    let mut s = String::new();
    IntelFormatter::new().format(i, &mut s);
    s
}

/// Guest-virtual to guest-physical through the guest's own page tables.
pub(crate) struct Walk<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub sregs: &'a kvm_sregs,
}

const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

impl Walk<'_> {
    /// Translate `gva` (4-level paging, 4 KiB / 2 MiB / 1 GiB pages; identity when
    /// paging is off). None when not present or the tables are not in RAM.
    pub fn translate(&self, gva: u64) -> Option<u64> {
        if self.sregs.cr0 & (1 << 31) == 0 {
            return Some(gva);
        }
        let read = |a: u64| -> Option<u64> { self.mem.read_obj::<u64>(GuestAddress(a)).ok() };
        let mut table = self.sregs.cr3 & ADDR_MASK;
        for level in (0..4).rev() {
            let shift = 12 + 9 * level;
            let e = read(table + 8 * ((gva >> shift) & 0x1ff))?;
            if e & 1 == 0 {
                return None;
            }
            if level == 0 || (level <= 2 && e & 0x80 != 0) {
                let page = e & ADDR_MASK & !((1u64 << shift) - 1);
                return Some(page | (gva & ((1u64 << shift) - 1)));
            }
            table = e & ADDR_MASK;
        }
        None
    }

    /// Fetch up to `out.len()` bytes at `gva` (page by page; from guest RAM, or on a
    /// vCPU thread from a BAR0 page mapped straight into the guest); returns how many.
    pub fn fetch(&self, gva: u64, out: &mut [u8]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let va = gva.wrapping_add(n as u64);
            let Some(pa) = self.translate(va) else { break };
            let in_page = (0x1000 - (va & 0xfff)) as usize;
            let k = in_page.min(out.len() - n);
            if self
                .mem
                .read_slice(&mut out[n..n + k], GuestAddress(pa))
                .is_err()
                && !read_direct(pa, &mut out[n..n + k])
            {
                break;
            }
            n += k;
        }
        n
    }

    /// The instruction at `rip`, decoded, or why not.
    pub fn describe(&self, rip: u64) -> String {
        let mut b = [0u8; 15];
        let n = self.fetch(rip, &mut b);
        if n == 0 {
            return format!("(rip {rip:#x} is not mapped to guest RAM)");
        }
        let mut d = Decoder::with_ip(64, &b[..n], rip, DecoderOptions::NONE);
        let i = d.decode();
        if i.is_invalid() {
            return format!("(undecodable bytes {:02x?})", &b[..n.min(8)]);
        }
        format_insn(&i)
    }
}

pub(crate) fn reg_value(regs: &kvm_regs, r: Register) -> Option<u64> {
    let full = r.full_register();
    let v = match full {
        Register::RAX => regs.rax,
        Register::RBX => regs.rbx,
        Register::RCX => regs.rcx,
        Register::RDX => regs.rdx,
        Register::RSI => regs.rsi,
        Register::RDI => regs.rdi,
        Register::RSP => regs.rsp,
        Register::RBP => regs.rbp,
        Register::R8 => regs.r8,
        Register::R9 => regs.r9,
        Register::R10 => regs.r10,
        Register::R11 => regs.r11,
        Register::R12 => regs.r12,
        Register::R13 => regs.r13,
        Register::R14 => regs.r14,
        Register::R15 => regs.r15,
        Register::RIP => regs.rip,
        Register::ES | Register::CS | Register::SS | Register::DS => 0,
        _ => return None,
    };
    Some(match r.size() {
        4 => v & 0xffff_ffff,
        2 => v & 0xffff,
        1 => v & 0xff,
        _ => v,
    })
}

/// KVM reports a write after retiring its instruction: find the instruction that
/// made it. Mid-`rep`, RIP still points at the string instruction; otherwise decode
/// backwards from RIP for instructions that end exactly there and write memory,
/// preferring one whose operand address (from the current registers, through the
/// page tables) covers the access, then the longest.
fn find_writer(
    walk: &Walk<'_>,
    regs: &kvm_regs,
    gpa: u64,
    len: usize,
) -> Option<(u64, Instruction)> {
    let rip = regs.rip;
    let mut b = [0u8; 30];
    let start = rip.saturating_sub(15);
    let back = (rip - start) as usize;
    let n = walk.fetch(start, &mut b);
    let mut info = InstructionInfoFactory::new();
    if n > back {
        let mut d = Decoder::with_ip(64, &b[back..n], rip, DecoderOptions::NONE);
        let i = d.decode();
        // Mid-`rep` (and at its last element) RIP is still at the string instruction.
        if !i.is_invalid()
            && i.is_string_instruction()
            && writer_score(walk, regs, &mut info, &i, gpa, len) >= 5
        {
            return Some((rip, i));
        }
    }
    let mut best: Option<(u32, usize, Instruction)> = None;
    for k in 1..=back.min(n) {
        let s = back - k;
        let mut d = Decoder::with_ip(64, &b[s..back], rip - k as u64, DecoderOptions::NONE);
        let i = d.decode();
        if i.is_invalid() || i.len() != k {
            continue;
        }
        let score = writer_score(walk, regs, &mut info, &i, gpa, len);
        if score > 0
            && best
                .as_ref()
                .is_none_or(|(bs, bk, _)| (score, k) > (*bs, *bk))
        {
            best = Some((score, k, i));
        }
    }
    best.map(|(_, k, i)| (rip - k as u64, i))
}

/// How well `i` explains a write of `len` bytes at `gpa` (0: it writes no memory,
/// or less than `len`): +1 writes memory, +4 its operand (from the current
/// registers; for string instructions the element just stored, behind rdi) covers
/// the access, +2 its operand size fits the access (equal, or a KVM split). Ties
/// go to the longest candidate (prefixes such as F3 in `movdqu`, `lock`, `rep`).
fn writer_score(
    walk: &Walk<'_>,
    regs: &kvm_regs,
    info: &mut InstructionInfoFactory,
    i: &Instruction,
    gpa: u64,
    len: usize,
) -> u32 {
    let mut best = 0;
    for m in info.info(i).used_memory() {
        if !matches!(
            m.access(),
            OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
        ) {
            continue;
        }
        // rep-prefixed string forms report no size per element: take the
        // instruction's.
        let size = match m.memory_size().size() {
            0 => i.memory_size().size().max(1) as u64,
            n => n as u64,
        };
        // An operand is never smaller than the exit; larger only when KVM split
        // it (16/32-byte moves into 8-byte exits, or at a page end).
        let len64 = len as u64;
        let split = (len == 8 && (size == 16 || size == 32)) || (gpa + len64) % 4096 == 0;
        // KVM hands a `rep ins`/`rep movs` over as several elements in one exit.
        let string = i.is_string_instruction();
        let batch = string && len64 > size && len64 % size == 0;
        if size < len64 && !batch {
            continue;
        }
        let span = size.max(len64);
        let mut score = 1;
        if size == len64 || split || batch {
            score += 2;
        }
        let mut addrs = [None, None];
        addrs[0] = m.virtual_address(0, |r, _, _| reg_value(regs, r));
        if i.is_string_instruction() {
            // rdi has already moved past the element just stored.
            let df = regs.rflags & (1 << 10) != 0;
            addrs[1] = Some(if df {
                regs.rdi.wrapping_add(size)
            } else {
                regs.rdi.wrapping_sub(span)
            });
        }
        for va in addrs.into_iter().flatten() {
            if let Some(pa) = walk.translate(va) {
                if pa <= gpa && gpa + len as u64 <= pa + span {
                    score += 4;
                    break;
                }
            }
        }
        best = best.max(score);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("mem")
    }

    /// Identity-mapped guest (the VMM's own tables) with `code` at 0x10_0000.
    fn guest(code: &[u8]) -> (GuestMemoryMmap, kvm_sregs) {
        let m = mem();
        crate::vstate::layout::write_system_tables(&m).expect("tables");
        m.write_slice(code, GuestAddress(0x10_0000)).expect("code");
        let sregs = crate::vstate::layout::long_mode_sregs(kvm_sregs::default());
        (m, sregs)
    }

    fn writer(code: &[u8], regs: kvm_regs, gpa: u64, len: usize) -> Option<(u64, String)> {
        let (m, sregs) = guest(code);
        let walk = Walk {
            mem: &m,
            sregs: &sregs,
        };
        find_writer(&walk, &regs, gpa, len).map(|(at, i)| (at, format_insn(&i)))
    }

    #[test]
    fn backward_decode_finds_the_writer() {
        let bar = 0xE000_0000u64;
        // mov eax, 0x48414E47 (ends in 0x48, a REX.W byte); xchg [rdi+38h], eax
        let code = [0xb8, 0x47, 0x4e, 0x41, 0x48, 0x87, 0x47, 0x38];
        let regs = kvm_regs {
            rip: 0x10_0008,
            rdi: bar,
            ..Default::default()
        };
        assert_eq!(
            writer(&code, regs, bar + 0x38, 4),
            Some((0x10_0005, "xchg [rdi+38h],eax".into())),
            "not the REX.W form: the exit was 4 bytes"
        );
        // movdqu [rdi+2Ch], xmm0 (F3 0F 7F 47 2C): without F3 it would be an MMX movq.
        let code = [0x90, 0xf3, 0x0f, 0x7f, 0x47, 0x2c];
        let regs = kvm_regs {
            rip: 0x10_0006,
            rdi: bar,
            ..Default::default()
        };
        for piece in [0, 8] {
            assert_eq!(
                writer(&code, regs, bar + 0x2c + piece, 8),
                Some((0x10_0001, "movdqu [rdi+2Ch],xmm0".into()))
            );
        }
        // rep stosd mid-way: RIP still at it, rdi already past the element stored.
        let code = [0xf3, 0xab];
        let regs = kvm_regs {
            rip: 0x10_0000,
            rdi: bar + 0x34,
            rcx: 2,
            rflags: 2,
            ..Default::default()
        };
        assert_eq!(
            writer(&code, regs, bar + 0x30, 4),
            Some((0x10_0000, "rep stosd [rdi]".into()))
        );
        // ... and after its last element (RIP past it), descending (DF set).
        let regs = kvm_regs {
            rip: 0x10_0002,
            rdi: bar + 0x2c,
            rflags: 2 | 1 << 10,
            ..Default::default()
        };
        assert_eq!(
            writer(&code, regs, bar + 0x30, 4),
            Some((0x10_0000, "rep stosd [rdi]".into()))
        );
    }

    #[test]
    fn walk_follows_4k_2m_and_1g_pages() {
        let m = mem();
        let w = |a: u64, v: u64| m.write_obj(v, GuestAddress(a)).expect("write");
        // PML4 at 0x10000; PML4[0] -> PDPT 0x11000; PDPT[0] -> PD 0x12000;
        // PD[0] -> PT 0x13000; PT[5] -> 0x20_5000 (4K); PD[1] 2M page at 0x40_0000;
        // PDPT[1] 1G page at 0x8000_0000; PML4[1] not present.
        w(0x10000, 0x11000 | 3);
        w(0x11000, 0x12000 | 3);
        w(0x12000, 0x13000 | 3);
        w(0x13000 + 8 * 5, 0x20_5000 | 3);
        w(0x12000 + 8, 0x40_0000 | 0x83);
        w(0x11000 + 8, 0x8000_0000 | 0x83);
        let sregs = kvm_sregs {
            cr0: 1 << 31 | 1,
            cr3: 0x10000,
            ..Default::default()
        };
        let walk = Walk {
            mem: &m,
            sregs: &sregs,
        };
        assert_eq!(walk.translate(0x5123), Some(0x20_5123));
        assert_eq!(walk.translate(0x6000), None, "PTE not present");
        assert_eq!(walk.translate(0x20_1234), Some(0x40_1234));
        assert_eq!(walk.translate(0x4000_0042), Some(0x8000_0042));
        assert_eq!(walk.translate(1 << 39), None, "PML4E not present");
        let off = kvm_sregs::default();
        let flat = Walk {
            mem: &m,
            sregs: &off,
        };
        assert_eq!(flat.translate(0x1234), Some(0x1234), "paging off");
        // Fetch across a page boundary through two different mappings.
        m.write_slice(&[0x48, 0x89], GuestAddress(0x20_5ffe))
            .expect("w");
        w(0x13000 + 8 * 6, 0x30_0000 | 3);
        m.write_slice(&[0x07], GuestAddress(0x30_0000)).expect("w");
        let mut b = [0u8; 3];
        assert_eq!(walk.fetch(0x5ffe, &mut b), 3);
        assert_eq!(walk.describe(0x5ffe), "mov [rdi],rax");
    }
}

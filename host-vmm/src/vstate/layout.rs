//! Guest-physical layout and the x86-64 long-mode setup done by the VMM.
//!
//! | guest-physical | what |
//! |---|---|
//! | `0x0500` | GDT: null, code (0x08, 64-bit), data (0x10), TSS (0x18) |
//! | `0x0520` | IDT: empty (limit 0): any exception escalates to a triple fault |
//! | `0x9000` | PML4; `0xA000` PDPT; `0xB000..0xF000` four page directories |
//! | `0x2_0000..0xA_0000` | vCPU stacks, 64 KiB each, vCPU *i* starts with `rsp = 0xA_0000 - i * 0x1_0000` |
//! | `0x10_0000` | the payload (flat binary), entered at its first byte |
//! | `mem_size..` | nothing: the PCI hole; BAR0 defaults to `0xE000_0000`, the ROM BAR to `0xE010_0000` |
//!
//! The first 4 GiB are identity-mapped with 2 MiB pages (RAM and the BAR window
//! alike; pages at or above 3 GiB are uncached).

use crate::error::VmmError;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use hilrig_guest::abi::*;

/// GDT address.
pub const GDT_ADDR: u64 = 0x500;
/// IDT address.
pub const IDT_ADDR: u64 = 0x520;
/// PML4 address (CR3).
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT address.
pub const PDPT_ADDR: u64 = 0xA000;
/// First of four page directories.
pub const PD_ADDR: u64 = 0xB000;
/// Most vCPUs a VM may have (the stack area fits this many).
pub const MAX_VCPUS: u8 = 8;
/// Smallest guest RAM.
pub const MIN_MEM: u64 = 2 << 20;
/// Largest guest RAM (RAM stays below the 3 GiB PCI hole).
pub const MAX_MEM: u64 = 3 << 30;
/// Start of the PCI hole.
pub const PCI_HOLE: u64 = 3 << 30;
/// TSS address KVM wants for its real-mode emulation (unused in long mode).
pub const TSS_ADDR: usize = 0xfffb_d000;

/// Most values the result port keeps per run (later ones are counted, not kept).
pub const MAX_RESULTS: usize = 1 << 20;

const X86_CR0_PE: u64 = 1;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_WP: u64 = 1 << 16;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
/// CR4.OSXSAVE: XSAVE/XGETBV and the AVX state enabled (set when the CPU has XSAVE).
pub const X86_CR4_OSXSAVE: u64 = 1 << 18;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT entry from flags, base and limit (the classic encoding).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The KVM segment register a GDT entry describes.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let g = bit(55);
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((entry & 0xff00_0000_0000_0000) >> 32)
            | ((entry & 0x0000_00ff_0000_0000) >> 16)
            | ((entry & 0x0000_0000_ffff_0000) >> 16),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The GDT the VMM installs.
pub fn gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS (busy)
    ]
}

/// Page-directory entries identity-mapping the first 4 GiB with 2 MiB pages.
pub fn page_directory_entries() -> impl Iterator<Item = u64> {
    (0..2048u64).map(|i| {
        let addr = i << 21;
        let uncached = if addr >= PCI_HOLE { 0x18 } else { 0 };
        addr | 0x83 | uncached // present, writable, 2 MiB page
    })
}

/// Write the GDT, IDT and page tables into guest memory.
pub fn write_system_tables(mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| VmmError::Memory(format!("writing system tables at {a:#x}: {e}")))
    };
    for (i, e) in gdt().iter().enumerate() {
        w(*e, GDT_ADDR + 8 * i as u64)?;
    }
    w(0, IDT_ADDR)?;
    w(PDPT_ADDR | 0x3, PML4_ADDR)?;
    for i in 0..4u64 {
        w((PD_ADDR + i * 0x1000) | 0x3, PDPT_ADDR + 8 * i)?;
    }
    for (i, e) in page_directory_entries().enumerate() {
        w(e, PD_ADDR + 8 * i as u64)?;
    }
    Ok(())
}

/// Special registers for 64-bit long mode with the VMM's tables.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let gdt = gdt();
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers at entry (the guest entry ABI).
pub fn entry_regs(bar0: u64, vcpu: u8, vcpus: u8, mem_size: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: PAYLOAD_ADDR,
        rsp: stack_top(vcpu),
        rbp: stack_top(vcpu),
        rdi: bar0,
        rsi: u64::from(vcpu),
        rdx: u64::from(vcpus),
        rcx: mem_size,
        ..Default::default()
    }
}

/// The initial stack pointer of vCPU `vcpu`.
pub fn stack_top(vcpu: u8) -> u64 {
    STACK_TOP - u64::from(vcpu) * STACK_SIZE
}

/// What the (KVM-supported) CPUID offers for vector state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VectorFeatures {
    /// XSAVE (CPUID.1:ECX.26): the VMM sets CR4.OSXSAVE and XCR0.
    pub xsave: bool,
    /// AVX (CPUID.1:ECX.28) with YMM state in XCR0 (CPUID.0xD:EAX.2).
    pub avx: bool,
    /// The XCR0 value the VMM sets (x87 | SSE, plus AVX when available).
    pub xcr0: u64,
}

/// Vector features from CPUID entries `(function, index, eax, ecx)`.
pub fn vector_features(entries: impl IntoIterator<Item = (u32, u32, u32, u32)>) -> VectorFeatures {
    let (mut ecx1, mut eax_d) = (0u32, 0u32);
    for (f, i, eax, ecx) in entries {
        if f == 1 {
            ecx1 = ecx;
        }
        if f == 0xd && i == 0 {
            eax_d = eax;
        }
    }
    let xsave = ecx1 & (1 << 26) != 0;
    let avx = xsave && ecx1 & (1 << 28) != 0 && eax_d & 0x4 != 0;
    VectorFeatures {
        xsave,
        avx,
        xcr0: if avx { 0x7 } else { 0x3 },
    }
}

/// FPU/SSE state at entry.
pub fn entry_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let g = gdt();
        let cs = segment_from_gdt(g[1], 1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.type_),
            (8, 1, 0, 1, 0xb)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(g[2], 2);
        assert_eq!((ds.selector, ds.db, ds.type_, ds.s), (0x10, 1, 3, 1));
        let null = segment_from_gdt(g[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn identity_map_covers_bar_window() {
        let e: Vec<u64> = page_directory_entries().collect();
        assert_eq!(e.len(), 2048);
        let idx = (BAR0_DEFAULT >> 21) as usize;
        assert_eq!(e[idx] & !0xfff, BAR0_DEFAULT & !0x1f_ffff);
        assert_eq!(e[idx] & 0x18, 0x18);
        assert_eq!(e[0] & 0x18, 0);
    }

    const _: () = assert!(STACK_TOP <= PAYLOAD_ADDR);

    #[test]
    fn stacks_stay_below_payload_and_above_tables() {
        let lowest = stack_top(MAX_VCPUS - 1) - STACK_SIZE;
        assert!(lowest >= PD_ADDR + 0x4000);
    }
}

//! Which BAR0 pages are mapped straight into the guest and which trap.
//!
//! Inputs: the set of pages a policy has rules on ([`TrapSet`], filled by the policy
//! engine — issue 6 — and empty today), and the memory a backend offers
//! ([`DirectWindow`]s: the model's data buffers, a VFIO BAR's mmap'able areas).
//! Output: a [`PagePlan`], one decision per 4 KiB page, and the KVM memory slots it
//! needs (contiguous direct pages coalesced).

use hilrig_device::regmap::{PAGES, PAGE_SIZE};

/// Pages (0..16) that a policy has at least one rule on: they must trap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrapSet(u16);

impl TrapSet {
    /// No rules: every page the backend can back is mapped directly.
    pub const fn none() -> TrapSet {
        TrapSet(0)
    }

    /// Every page traps (e.g. policy enforcement of the whole BAR, or a debug run).
    pub const fn all() -> TrapSet {
        TrapSet(u16::MAX)
    }

    /// The given pages trap; pages past 15 are ignored.
    pub fn from_pages(pages: impl IntoIterator<Item = usize>) -> TrapSet {
        let mut s = TrapSet(0);
        for p in pages {
            s.insert(p);
        }
        s
    }

    /// Mark page `p` as trapping.
    pub fn insert(&mut self, p: usize) {
        if p < PAGES {
            self.0 |= 1 << p;
        }
    }

    /// Whether page `p` traps.
    pub fn contains(&self, p: usize) -> bool {
        p < PAGES && self.0 & (1 << p) != 0
    }
}

/// Host memory a backend offers for part of BAR0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectWindow {
    /// Offset in BAR0 (page-aligned to be useful).
    pub bar_offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host virtual address of the first byte (kept mapped by the backend).
    pub host_addr: u64,
}

/// Why a page traps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapReason {
    /// A policy rule covers the page.
    Policy,
    /// The backend has no memory to offer for it (registers).
    NoBacking,
}

/// The decision for one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageMap {
    /// Mapped into the guest: host address of the page.
    Direct {
        /// Host virtual address of the page.
        host_addr: u64,
    },
    /// Every access exits to the VMM.
    Trap(TrapReason),
}

/// One KVM memory slot a plan needs (relative to the BAR base).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRange {
    /// Offset in BAR0.
    pub bar_offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host virtual address.
    pub host_addr: u64,
}

/// Per-page decisions for BAR0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagePlan {
    /// One entry per page.
    pub pages: [PageMap; PAGES],
}

impl PagePlan {
    /// Decide every page: trap if the policy has rules on it or if no window covers
    /// it wholly; otherwise map it. Windows that are not page-aligned only back the
    /// pages they cover completely.
    pub fn decide(trap: TrapSet, windows: &[DirectWindow]) -> PagePlan {
        let mut pages = [PageMap::Trap(TrapReason::NoBacking); PAGES];
        for (p, slot) in pages.iter_mut().enumerate() {
            if trap.contains(p) {
                *slot = PageMap::Trap(TrapReason::Policy);
                continue;
            }
            let start = p as u64 * PAGE_SIZE;
            let end = start + PAGE_SIZE;
            let covering = windows.iter().find(|w| {
                w.len > 0
                    && w.bar_offset <= start
                    && w.bar_offset.checked_add(w.len).is_some_and(|e| e >= end)
                    && (w.host_addr + (start - w.bar_offset)) % PAGE_SIZE == 0
            });
            if let Some(w) = covering {
                *slot = PageMap::Direct {
                    host_addr: w.host_addr + (start - w.bar_offset),
                };
            }
        }
        PagePlan { pages }
    }

    /// A plan in which every page traps.
    pub fn all_trap() -> PagePlan {
        PagePlan {
            pages: [PageMap::Trap(TrapReason::NoBacking); PAGES],
        }
    }

    /// Number of directly mapped pages.
    pub fn direct_pages(&self) -> usize {
        self.pages
            .iter()
            .filter(|p| matches!(p, PageMap::Direct { .. }))
            .count()
    }

    /// Whether page `p` traps.
    pub fn traps(&self, p: usize) -> bool {
        !matches!(self.pages.get(p), Some(PageMap::Direct { .. }))
    }

    /// The memory slots for the direct pages: runs of adjacent pages whose host
    /// memory is contiguous become one slot.
    pub fn slots(&self) -> Vec<SlotRange> {
        let mut out: Vec<SlotRange> = Vec::new();
        for (p, m) in self.pages.iter().enumerate() {
            let PageMap::Direct { host_addr } = *m else {
                continue;
            };
            let off = p as u64 * PAGE_SIZE;
            if let Some(last) = out.last_mut() {
                if last.bar_offset + last.len == off && last.host_addr + last.len == host_addr {
                    last.len += PAGE_SIZE;
                    continue;
                }
            }
            out.push(SlotRange {
                bar_offset: off,
                len: PAGE_SIZE,
                host_addr,
            });
        }
        out
    }

    /// One line per page, for logs and `--explain`-style output.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (p, m) in self.pages.iter().enumerate() {
            let what = match m {
                PageMap::Direct { .. } => "direct (no exits)",
                PageMap::Trap(TrapReason::Policy) => "trap (policy rule)",
                PageMap::Trap(TrapReason::NoBacking) => "trap (registers)",
            };
            s.push_str(&format!(
                "page {p:2} @ BAR0+{:#06x}: {what}\n",
                p as u64 * PAGE_SIZE
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hilrig_device::regmap::{BUFFER_BASE, BUFFER_SIZE};

    const HOST: u64 = 0x7f00_0000_0000;

    fn model_window() -> DirectWindow {
        DirectWindow {
            bar_offset: BUFFER_BASE as u64,
            len: BUFFER_SIZE as u64,
            host_addr: HOST,
        }
    }

    #[test]
    fn model_buffers_direct_registers_trap() {
        let plan = PagePlan::decide(TrapSet::none(), &[model_window()]);
        for p in 0..4 {
            assert_eq!(plan.pages[p], PageMap::Trap(TrapReason::NoBacking));
        }
        for p in 4..16 {
            assert_eq!(
                plan.pages[p],
                PageMap::Direct {
                    host_addr: HOST + (p as u64 - 4) * PAGE_SIZE
                }
            );
        }
        assert_eq!(plan.direct_pages(), 12);
        assert_eq!(
            plan.slots(),
            vec![SlotRange {
                bar_offset: 0x4000,
                len: 0xc000,
                host_addr: HOST
            }]
        );
    }

    #[test]
    fn policy_rule_splits_the_slot() {
        let plan = PagePlan::decide(TrapSet::from_pages([7]), &[model_window()]);
        assert_eq!(plan.pages[7], PageMap::Trap(TrapReason::Policy));
        let slots = plan.slots();
        assert_eq!(slots.len(), 2);
        assert_eq!((slots[0].bar_offset, slots[0].len), (0x4000, 0x3000));
        assert_eq!(
            (slots[1].bar_offset, slots[1].len, slots[1].host_addr),
            (0x8000, 0x8000, HOST + 0x4000)
        );
    }

    #[test]
    fn trap_all_maps_nothing() {
        let plan = PagePlan::decide(TrapSet::all(), &[model_window()]);
        assert_eq!(plan.direct_pages(), 0);
        assert!(plan.slots().is_empty());
        assert_eq!(plan, {
            let mut p = PagePlan::all_trap();
            for m in p.pages.iter_mut() {
                *m = PageMap::Trap(TrapReason::Policy);
            }
            p
        });
    }

    #[test]
    fn partial_and_misaligned_windows_do_not_map() {
        // A VFIO sparse area covering half a page and one whose host address is not
        // page-aligned: neither page can be mapped.
        let w = [
            DirectWindow {
                bar_offset: 0x0,
                len: 0x800,
                host_addr: HOST,
            },
            DirectWindow {
                bar_offset: 0x1000,
                len: 0x1000,
                host_addr: HOST + 0x10,
            },
        ];
        let plan = PagePlan::decide(TrapSet::none(), &w);
        assert_eq!(plan.direct_pages(), 0);
    }

    #[test]
    fn non_contiguous_host_memory_gives_separate_slots() {
        let w = [
            DirectWindow {
                bar_offset: 0x4000,
                len: 0x1000,
                host_addr: HOST,
            },
            DirectWindow {
                bar_offset: 0x5000,
                len: 0x1000,
                host_addr: HOST + 0x10_0000,
            },
        ];
        let plan = PagePlan::decide(TrapSet::none(), &w);
        assert_eq!(plan.slots().len(), 2);
    }

    #[test]
    fn trapset_ignores_out_of_range_pages() {
        let s = TrapSet::from_pages([0, 15, 16, 99]);
        assert!(s.contains(0) && s.contains(15));
        assert!(!s.contains(16));
    }
}

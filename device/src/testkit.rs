//! Property tests over arbitrary sequences of MMIO accesses, flash commands, resets,
//! FLRs and power cycles, for any backend (feature `testkit`; DESIGN.md §2):
//! - no counter (region, MASTER, EPOCH) ever decreases;
//! - MASTER equals the number of counted attempts (every attempt while its region has
//!   slots left), and each region counter equals min(attempts, WIDTH);
//! - once the budget is spent the fuse is blown and no flash byte changes (checked
//!   through OOB READ_HASH of every region);
//! - the OOB read equals the in-band read;
//! - the hang magic wedges the device (all-ones reads, ignored writes) until a reset.
//!
//! `model`, `rtl` and the board's `fpga` backend all run [`check`] from their tests.

use crate::device::{Device, DeviceError, ResetKind};
use crate::model::ops;
use crate::oob::{self, CounterReport, Request, Response};
use crate::regmap::*;
use crate::state::{DeviceConfig, NvState};
use proptest::prelude::*;
use std::path::Path;

/// A device made (or reopened) for a property test.
pub type Made = Result<Box<dyn Device>, DeviceError>;

/// How a property test makes and reopens devices of one backend.
pub struct Backend<'a> {
    /// A device of `nv` kept in memory.
    pub new: &'a dyn Fn(NvState) -> Made,
    /// A device of `nv` saved in a new state file at the path.
    pub create: &'a dyn Fn(&Path, NvState) -> Made,
    /// The device saved in the state file at the path (after a power cycle).
    pub open: &'a dyn Fn(&Path) -> Made,
}

fn fail<E: std::fmt::Display>(e: E) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// SHA-256 of each flash region, read over OOB.
fn flash_hashes(d: &mut dyn Device) -> Result<[[u8; 32]; 3], TestCaseError> {
    let mut out = [[0u8; 32]; 3];
    for (i, r) in [Region::Vbios, Region::Firmware, Region::Config]
        .into_iter()
        .enumerate()
    {
        match oob::request_device(d, &Request::ReadHash(r)).map_err(fail)? {
            Response::Hash { sha256, .. } => out[i] = sha256,
            other => return Err(fail(format!("READ_HASH answered with {other:?}"))),
        }
    }
    Ok(out)
}

/// One step of a property-test sequence.
#[derive(Debug, Clone)]
pub enum Op {
    /// Any write (1..=8 bytes) at any offset on pages 0, 2, 3 or the buffers, except the
    /// flash page, where `Cmd` and `Unlock` make the oracle exact.
    Write {
        /// BAR0 offset.
        off: u64,
        /// Bytes written.
        data: Vec<u8>,
    },
    /// Any read.
    Read {
        /// BAR0 offset.
        off: u64,
        /// Bytes read.
        len: usize,
    },
    /// A structured flash command on a region.
    Cmd {
        /// ERASE (else PROGRAM).
        erase: bool,
        /// FLASH_REGION (3 is out of range).
        region: u8,
        /// FLASH_ADDR.
        addr: u32,
        /// FLASH_LEN.
        len: u32,
        /// FLASH_SRC.
        src: u32,
    },
    /// The unlock sequence, right or wrong.
    Unlock {
        /// The right second key.
        good: bool,
    },
    /// Lock the controller.
    Lock,
    /// Write the hang magic.
    Hang,
    /// A reset of this kind.
    Reset(ResetKind),
}

/// Offsets off the flash page: pages 0, 2, 3 and the buffers.
pub fn non_flash_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..0x50,
        0x2000u64..0x2030,
        0x3000u64..0x3030,
        0x4000u64..0x4100,
        0xfff0u64..0x10000,
    ]
}

/// Any step, weighted towards writes and flash commands.
pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (non_flash_offset(), proptest::collection::vec(any::<u8>(), 1..=8))
            .prop_map(|(off, data)| Op::Write { off, data }),
        4 => (0u64..0x10000, 1usize..=8).prop_map(|(off, len)| Op::Read { off, len }),
        6 => (any::<bool>(), 0u8..4, 0u32..64, 0u32..64, 0u32..64)
            .prop_map(|(erase, region, addr, len, src)| Op::Cmd { erase, region, addr: addr * 4, len: len * 4, src: src * 4 }),
        3 => any::<bool>().prop_map(|good| Op::Unlock { good }),
        1 => Just(Op::Lock),
        1 => Just(Op::Hang),
        2 => prop_oneof![Just(ResetKind::Reset), Just(ResetKind::Flr), Just(ResetKind::PowerCycle)].prop_map(Op::Reset),
    ]
}

/// The counters as the registers show them.
fn in_band(d: &mut dyn Device) -> Result<CounterReport, TestCaseError> {
    let r = |d: &mut dyn Device, o: u32| d.read32(o).map_err(fail);
    Ok(CounterReport {
        counters: [
            r(d, Reg::Counter.offset())?,
            r(d, Reg::Counter.offset() + 4)?,
            r(d, Reg::Counter.offset() + 8)?,
        ],
        master: r(d, Reg::Master.offset())?,
        fuse: r(d, Reg::Fuse.offset())? != 0,
        slots_left: r(d, Reg::SlotsLeft.offset())?,
        width: r(d, Reg::Width.offset())? as u8,
        epoch: r(d, Reg::Epoch.offset())?,
    })
}

/// Run `ops` on a device of counter width `width` and region sizes `regions` made by
/// `backend`; with `state`, power cycles drop the device and reopen it from that
/// state file (otherwise they are `Device::reset(PowerCycle)`).
pub fn check(
    backend: &Backend<'_>,
    width: u8,
    regions: [u32; 3],
    ops_: &[Op],
    state: Option<&Path>,
) -> Result<(), TestCaseError> {
    let cfg = DeviceConfig {
        counter_width: width,
        region_sizes: regions,
    };
    let nv = NvState::factory(cfg, 1).map_err(fail)?;
    let mut m = match state {
        Some(p) => (backend.create)(p, nv).map_err(fail)?,
        None => (backend.new)(nv).map_err(fail)?,
    };
    let m = &mut m;
    let mut attempts = [0u32; 3];
    let mut hung = false;
    let mut prev = oob::read_counters(&mut **m).map_err(fail)?;
    let mut flash_at_fuse: Option<[[u8; 32]; 3]> = None;
    for (i, op) in ops_.iter().enumerate() {
        match op {
            Op::Write { off, data } => {
                let r = m.mmio_write(*off, data);
                prop_assert_eq!(r.is_ok(), off + data.len() as u64 <= BAR0_SIZE, "op {}", i);
                // Did this write complete the hang magic? (A full aligned write of it.)
                let hang = Reg::HangTrigger.offset() as u64;
                if !hung && *off <= hang && off + data.len() as u64 >= hang + 4 && r.is_ok() {
                    let s = (hang - off) as usize;
                    if data[s..s + 4] == HANG_MAGIC.to_le_bytes() {
                        hung = true;
                    }
                }
                let sr = Reg::SoftReset.offset() as u64;
                if !hung && *off <= sr && off + data.len() as u64 >= sr + 4 && r.is_ok() {
                    let s = (sr - off) as usize;
                    if data[s..s + 4] == SOFT_RESET_MAGIC.to_le_bytes() {
                        hung = false;
                    }
                }
            }
            Op::Read { off, len } => {
                let mut b = vec![0u8; *len];
                let r = m.mmio_read(*off, &mut b);
                prop_assert_eq!(r.is_ok(), off + *len as u64 <= BAR0_SIZE);
                if hung && r.is_ok() {
                    prop_assert!(
                        b.iter().all(|&x| x == 0xff),
                        "op {}: hung device read {:02x?}",
                        i,
                        b
                    );
                }
            }
            Op::Cmd {
                erase,
                region,
                addr,
                len,
                src,
            } => {
                let buf = [0x5au8; 256];
                let r = if *erase {
                    m.write32(Reg::FlashRegion.offset(), *region as u32)
                        .map_err(fail)?;
                    m.write32(Reg::FlashCmd.offset(), FLASH_CMD_ERASE)
                } else {
                    m.write32(Reg::FlashRegion.offset(), *region as u32)
                        .map_err(fail)?;
                    m.write32(Reg::FlashAddr.offset(), *addr).map_err(fail)?;
                    m.write32(Reg::FlashSrc.offset(), *src).map_err(fail)?;
                    m.write32(Reg::FlashLen.offset(), *len).map_err(fail)?;
                    m.mmio_write(BUFFER_BASE as u64 + *src as u64, &buf[..8])
                        .map_err(fail)?;
                    m.write32(Reg::FlashCmd.offset(), FLASH_CMD_PROGRAM)
                };
                r.map_err(fail)?;
                if !hung && *region < 3 {
                    attempts[*region as usize] += 1;
                }
            }
            Op::Unlock { good } => {
                if *good {
                    ops::unlock(&mut **m).map_err(fail)?;
                } else {
                    m.write32(Reg::FlashUnlock.offset(), UNLOCK_KEY1)
                        .map_err(fail)?;
                    m.write32(Reg::FlashUnlock.offset(), 0xbad).map_err(fail)?;
                }
            }
            Op::Lock => m
                .write32(Reg::FlashCmd.offset(), FLASH_CMD_LOCK)
                .map_err(fail)?,
            Op::Hang => {
                m.write32(Reg::HangTrigger.offset(), HANG_MAGIC)
                    .map_err(fail)?;
                hung = true;
                prop_assert_eq!(m.read32(Reg::Id.offset()).map_err(fail)?, u32::MAX);
                prop_assert_eq!(m.read32(Reg::Counter.offset()).map_err(fail)?, u32::MAX);
            }
            Op::Reset(kind) => {
                match (kind, state) {
                    (ResetKind::PowerCycle, Some(p)) => {
                        let old = std::mem::replace(
                            m,
                            (backend.new)(NvState::factory(cfg, 9).map_err(fail)?).map_err(fail)?,
                        );
                        drop(old);
                        *m = (backend.open)(p).map_err(fail)?;
                    }
                    _ => m.reset(*kind).map_err(fail)?,
                }
                hung = false;
                prop_assert_eq!(m.read32(Reg::Id.offset()).map_err(fail)?, DEVICE_ID_VALUE);
                prop_assert_eq!(
                    m.read32(Reg::Scratch.offset()).map_err(fail)?,
                    0,
                    "volatile state survived {:?}",
                    kind
                );
            }
        }
        prop_assert_eq!(
            m.read32(Reg::Id.offset()).map_err(fail)? == u32::MAX,
            hung,
            "op {}: hang state",
            i
        );
        let now = oob::read_counters(&mut **m).map_err(fail)?;
        let w = width as u32;
        // Never backwards.
        for r in 0..3 {
            prop_assert!(
                now.counters[r] >= prev.counters[r],
                "op {}: counter {} decreased",
                i,
                r
            );
        }
        prop_assert!(now.master >= prev.master && now.epoch >= prev.epoch);
        // Exact counts: each region min(attempts, W); MASTER their sum.
        let expect: Vec<u32> = attempts.iter().map(|&a| a.min(w)).collect();
        prop_assert_eq!(&now.counters[..], &expect[..], "op {}", i);
        prop_assert_eq!(now.master, expect.iter().sum::<u32>());
        prop_assert_eq!(now.fuse, attempts.iter().any(|&a| a >= w));
        prop_assert_eq!(
            now.slots_left,
            w - expect.iter().max().copied().unwrap_or(0)
        );
        // Fuse blown: flash frozen from then on.
        if now.fuse {
            let hashes = flash_hashes(&mut **m)?;
            match &flash_at_fuse {
                None => flash_at_fuse = Some(hashes),
                Some(f) => {
                    prop_assert!(f == &hashes, "op {}: flash changed after the fuse blew", i)
                }
            }
        }
        // OOB equals in-band (in-band reads are all-ones while hung).
        if !hung {
            prop_assert_eq!(in_band(&mut **m)?, now);
        }
        prev = now;
    }
    Ok(())
}

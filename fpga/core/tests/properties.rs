//! Property tests over arbitrary sequences of MMIO accesses, flash commands, resets,
//! FLRs and power cycles against the behavioural model (DESIGN.md §2):
//! - no counter (region, MASTER, EPOCH) ever decreases;
//! - MASTER equals the number of counted attempts (every attempt while its region has
//!   slots left), and each region counter equals min(attempts, WIDTH);
//! - once the budget is spent the fuse is blown and no flash byte changes;
//! - the OOB read equals the in-band read;
//! - the hang magic wedges the device (all-ones reads, ignored writes) until a reset.

use hilrig_device::device::{Device, ResetKind};
use hilrig_device::model::ops;
use hilrig_device::oob::{self, CounterReport};
use hilrig_device::regmap::*;
use hilrig_device::state::{DeviceConfig, NvState};
use hilrig_device::Model;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Any write (1..=8 bytes) at any offset on pages 0, 2, 3 or the buffers, except the
    /// flash page, where `Cmd` and `Unlock` make the oracle exact.
    Write {
        off: u64,
        data: Vec<u8>,
    },
    /// Any read.
    Read {
        off: u64,
        len: usize,
    },
    /// A structured flash command on a region.
    Cmd {
        erase: bool,
        region: u8,
        addr: u32,
        len: u32,
        src: u32,
    },
    /// The unlock sequence, right or wrong.
    Unlock {
        good: bool,
    },
    /// Lock the controller.
    Lock,
    /// Write the hang magic.
    Hang,
    Reset(ResetKind),
}

fn non_flash_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..0x50,
        0x2000u64..0x2030,
        0x3000u64..0x3030,
        0x4000u64..0x4100,
        0xfff0u64..0x10000,
    ]
}

fn op() -> impl Strategy<Value = Op> {
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

fn in_band(d: &mut dyn Device) -> CounterReport {
    let r = |d: &mut dyn Device, o: u32| d.read32(o).unwrap();
    CounterReport {
        counters: [
            r(d, Reg::Counter.offset()),
            r(d, Reg::Counter.offset() + 4),
            r(d, Reg::Counter.offset() + 8),
        ],
        master: r(d, Reg::Master.offset()),
        fuse: r(d, Reg::Fuse.offset()) != 0,
        slots_left: r(d, Reg::SlotsLeft.offset()),
        width: r(d, Reg::Width.offset()) as u8,
        epoch: r(d, Reg::Epoch.offset()),
    }
}

/// Run `ops` on a device of counter width `width`; `state` is a state file used for
/// power cycles (the model is dropped and reopened), or None for in-memory.
fn check(width: u8, ops_: &[Op], state: Option<&std::path::Path>) -> Result<(), TestCaseError> {
    let nv = NvState::factory(DeviceConfig::with_width(width), 1).unwrap();
    let mut m = match state {
        Some(p) => Model::create(p, nv).unwrap(),
        None => Model::new(nv).unwrap(),
    };
    let mut attempts = [0u32; 3];
    let mut hung = false;
    let mut prev = oob::read_counters(&mut m).unwrap();
    let mut flash_at_fuse: Option<[Vec<u8>; 3]> = None;
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
                        .unwrap();
                    m.write32(Reg::FlashCmd.offset(), FLASH_CMD_ERASE)
                } else {
                    m.write32(Reg::FlashRegion.offset(), *region as u32)
                        .unwrap();
                    m.write32(Reg::FlashAddr.offset(), *addr).unwrap();
                    m.write32(Reg::FlashSrc.offset(), *src).unwrap();
                    m.write32(Reg::FlashLen.offset(), *len).unwrap();
                    m.mmio_write(BUFFER_BASE as u64 + *src as u64, &buf[..8])
                        .unwrap();
                    m.write32(Reg::FlashCmd.offset(), FLASH_CMD_PROGRAM)
                };
                r.unwrap();
                if !hung && *region < 3 {
                    attempts[*region as usize] += 1;
                }
            }
            Op::Unlock { good } => {
                if *good {
                    ops::unlock(&mut m).unwrap();
                } else {
                    m.write32(Reg::FlashUnlock.offset(), UNLOCK_KEY1).unwrap();
                    m.write32(Reg::FlashUnlock.offset(), 0xbad).unwrap();
                }
            }
            Op::Lock => m.write32(Reg::FlashCmd.offset(), FLASH_CMD_LOCK).unwrap(),
            Op::Hang => {
                m.write32(Reg::HangTrigger.offset(), HANG_MAGIC).unwrap();
                hung = true;
                prop_assert_eq!(m.read32(Reg::Id.offset()).unwrap(), u32::MAX);
                prop_assert_eq!(m.read32(Reg::Counter.offset()).unwrap(), u32::MAX);
            }
            Op::Reset(kind) => {
                match (kind, state) {
                    (ResetKind::PowerCycle, Some(p)) => {
                        drop(m);
                        m = Model::open(p).unwrap();
                    }
                    _ => m.reset(*kind).unwrap(),
                }
                hung = false;
                prop_assert_eq!(m.read32(Reg::Id.offset()).unwrap(), DEVICE_ID_VALUE);
                prop_assert_eq!(
                    m.read32(Reg::Scratch.offset()).unwrap(),
                    0,
                    "volatile state survived {:?}",
                    kind
                );
            }
        }
        prop_assert_eq!(m.is_hung(), hung, "op {}: hang state", i);
        let now = oob::read_counters(&mut m).unwrap();
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
            match &flash_at_fuse {
                None => flash_at_fuse = Some(m.nv().flash.clone()),
                Some(f) => prop_assert!(
                    f == &m.nv().flash,
                    "op {}: flash changed after the fuse blew",
                    i
                ),
            }
        }
        // OOB equals in-band (in-band reads are all-ones while hung).
        if !hung {
            prop_assert_eq!(in_band(&mut m), now);
        }
        prev = now;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn counters_fuse_hang_in_memory(width in 1u8..=6, ops_ in proptest::collection::vec(op(), 1..80)) {
        check(width, &ops_, None)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn counters_survive_power_cycles_through_the_state_file(width in 2u8..=5, ops_ in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        check(width, &ops_, Some(&dir.path().join("dev.state")))?;
    }
}

#[test]
fn oob_physical_reset_is_keyed_and_bumps_epoch() {
    let nv = NvState::factory(DeviceConfig::with_width(2), 4).unwrap();
    let key = nv.reset_key;
    let mut m = Model::new(nv).unwrap();
    ops::unlock(&mut m).unwrap();
    ops::erase(&mut m, hilrig_device::Region::Config).unwrap();
    ops::erase(&mut m, hilrig_device::Region::Config).unwrap();
    assert!(oob::read_counters(&mut m).unwrap().fuse);
    let wrong = oob::request_device(&mut m, &oob::Request::PhysicalReset([1; 32]));
    assert!(matches!(
        wrong,
        Err(oob::OobError::Refused {
            code: oob::ErrorCode::BadKey,
            ..
        })
    ));
    assert!(oob::read_counters(&mut m).unwrap().fuse);
    oob::request_device(&mut m, &oob::Request::PhysicalReset(key)).unwrap();
    let c = oob::read_counters(&mut m).unwrap();
    assert_eq!(
        (c.fuse, c.epoch, c.master, c.counters),
        (false, 1, 2, [0, 0, 0])
    );
    // Flash works again.
    assert!(ops::erase(&mut m, hilrig_device::Region::Config)
        .unwrap()
        .done());
}

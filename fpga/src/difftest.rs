//! Seeded random differential testing: random operations through `Lockstep`, so the
//! model and the RTL must agree on every one.

use crate::lockstep::{Lockstep, Side};
use hilrig_device::device::{Device, DeviceError, ResetKind};
use hilrig_device::oob::{encode_request, Request};
use hilrig_device::regmap::*;
use hilrig_device::state::{DeviceConfig, NvState};

/// A small, fast, seedable generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True with probability `p` per mille.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// What a differential run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Operations checked.
    pub ops: u64,
    /// Flash commands issued.
    pub commands: u64,
    /// Resets.
    pub resets: u64,
    /// OOB requests.
    pub oob: u64,
    /// ERASE/PROGRAM commands that completed (DONE).
    pub done: u64,
    /// ERASE/PROGRAM commands that were refused.
    pub refused: u64,
    /// RTL clock cycles simulated.
    pub cycles: u64,
}

/// A device configuration for seed `seed`: counter width 3..=6, and either the
/// default geometry or a small one (faster erases), chosen by the seed.
pub fn config_for(seed: u64) -> DeviceConfig {
    let mut r = Rng::new(seed ^ 0x5eed);
    let width = 3 + r.below(4) as u8;
    if r.chance(250) {
        DeviceConfig::with_width(width)
    } else {
        DeviceConfig {
            counter_width: width,
            region_sizes: [2048, 1024, 256],
        }
    }
}

fn interesting_offset(r: &mut Rng) -> u64 {
    match r.below(10) {
        0..=2 => r.below(0x50),
        3..=4 => 0x1000 + r.below(0x24),
        5 => 0x2000 + r.below(0x24),
        6 => 0x3000 + r.below(0x24),
        7 => r.below(0x4000),
        8 => BUFFER_BASE as u64 + r.below(0x100),
        _ => BUFFER_BASE as u64 + r.below(BUFFER_SIZE as u64),
    }
}

fn value(r: &mut Rng) -> u32 {
    match r.below(24) {
        0 => HANG_MAGIC,
        1 | 2 => SOFT_RESET_MAGIC,
        3..=5 => UNLOCK_KEY1,
        6..=8 => UNLOCK_KEY2,
        9..=11 => r.below(5) as u32,
        12 => u32::MAX,
        _ => r.next_u64() as u32,
    }
}

/// Why a differential run failed. Every variant names the seed.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// The device pair could not be set up.
    #[error("seed {seed}: {source}")]
    Setup {
        /// The seed.
        seed: u64,
        /// What failed.
        source: DeviceError,
    },
    /// The model and the RTL disagreed.
    #[error(
        "differential test seed {seed} (width {width}, region sizes {region_sizes:?}) \
         after {ops} operations: {source}"
    )]
    Diverged {
        /// The seed.
        seed: u64,
        /// Counter width of the device.
        width: u8,
        /// Its region sizes.
        region_sizes: [u32; 3],
        /// Operations done before the divergence.
        ops: u64,
        /// The divergence.
        source: DeviceError,
    },
}

/// Run `ops` random operations with `seed` through lockstep (model and RTL).
/// Errors name the seed.
pub fn run(seed: u64, ops: u64) -> Result<DiffStats, DiffError> {
    run_on(seed, ops, Lockstep::new)
}

/// [`run`] on the lockstep pair `make` builds from the seed's device state (e.g.
/// the model and the Verilator backend); `cycles` counts the second side's cycles.
pub fn run_on<A: Side, B: Side, E: Into<DeviceError>>(
    seed: u64,
    ops: u64,
    make: impl FnOnce(NvState) -> Result<Lockstep<A, B>, E>,
) -> Result<DiffStats, DiffError> {
    let cfg = config_for(seed);
    let serial = seed & 0xffff;
    let setup = |source: DeviceError| DiffError::Setup { seed, source };
    let nv = NvState::factory(cfg, serial).map_err(|e| setup(e.into()))?;
    let reset_key = nv.reset_key;
    let mut d = make(nv).map_err(|e| setup(e.into()))?;
    let mut r = Rng::new(seed);
    let mut st = DiffStats::default();
    let fail = |source: DeviceError, st: &DiffStats| DiffError::Diverged {
        seed,
        width: cfg.counter_width,
        region_sizes: cfg.region_sizes,
        ops: st.ops,
        source,
    };
    let mut seq = 0u8;
    while st.ops < ops {
        let before = d.ops();
        let res: Result<(), DeviceError> = (|| {
            match r.below(1000) {
                // Plain MMIO reads and writes at every width, aligned or not.
                0..=599 => {
                    let len = 1 + r.below(8) as usize;
                    let off = interesting_offset(&mut r).min(BAR0_SIZE - len as u64);
                    if r.chance(500) {
                        let mut b = vec![0u8; len];
                        d.mmio_read(off, &mut b)?;
                    } else {
                        let v = ((value(&mut r) as u64) << 32) | value(&mut r) as u64;
                        let mut b = v.to_le_bytes().to_vec();
                        if r.chance(500) {
                            b = value(&mut r).to_le_bytes().to_vec();
                        }
                        b.truncate(len);
                        // Keep hangs rare: they make every later access trivial.
                        if off as u32 & !3 == Reg::HangTrigger.offset() && !r.chance(100) {
                            return Ok(());
                        }
                        d.mmio_write(off, &b)?;
                    }
                }
                // Out-of-range and bad-width accesses (refused by both).
                600..=609 => {
                    let mut b = vec![0u8; r.below(10) as usize];
                    let off = BAR0_SIZE - r.below(8);
                    let _ = d.mmio_read(off, &mut b);
                    let _ = d.mmio_write(off, &b);
                }
                // Flash sequences.
                610..=799 => {
                    st.commands += 1;
                    if r.chance(700) {
                        d.write32(Reg::FlashUnlock.offset(), UNLOCK_KEY1)?;
                        let k2 = if r.chance(900) {
                            UNLOCK_KEY2
                        } else {
                            r.next_u64() as u32
                        };
                        d.write32(Reg::FlashUnlock.offset(), k2)?;
                    }
                    let region = if r.chance(950) { r.below(3) } else { 3 } as u32;
                    d.write32(Reg::FlashRegion.offset(), region)?;
                    let size = cfg.region_sizes[(region as usize).min(2)] as u64;
                    let cmd = match r.below(10) {
                        0..=1 => FLASH_CMD_ERASE,
                        2..=7 => FLASH_CMD_PROGRAM,
                        8 => FLASH_CMD_LOCK,
                        _ => r.below(6) as u32,
                    };
                    if cmd == FLASH_CMD_PROGRAM {
                        let len = if r.chance(900) {
                            4 * (1 + r.below(16))
                        } else {
                            r.below(0x100)
                        };
                        let addr = if r.chance(900) {
                            4 * r.below(size / 4)
                        } else {
                            r.below(size + 64)
                        };
                        let src = if r.chance(900) {
                            4 * r.below(64)
                        } else {
                            r.below(BUFFER_SIZE as u64 + 64)
                        };
                        for i in 0..len.div_ceil(8).min(8) {
                            let o = BUFFER_BASE as u64 + (src & !3) + 8 * i;
                            if o + 8 <= BAR0_SIZE {
                                d.mmio_write(o, &r.next_u64().to_le_bytes())?;
                            }
                        }
                        d.write32(Reg::FlashAddr.offset(), addr as u32)?;
                        d.write32(Reg::FlashSrc.offset(), src as u32)?;
                        d.write32(Reg::FlashLen.offset(), len as u32)?;
                    }
                    d.write32(Reg::FlashCmd.offset(), cmd)?;
                    let status = d.read32(Reg::FlashStatus.offset())?;
                    if cmd == FLASH_CMD_ERASE || cmd == FLASH_CMD_PROGRAM {
                        if status & FLASH_STATUS_DONE != 0 {
                            st.done += 1;
                        } else {
                            st.refused += 1;
                        }
                    }
                    // Read some flash back through the window.
                    for _ in 0..r.below(4) {
                        d.write32(Reg::FlashAddr.offset(), r.below(size + 8) as u32)?;
                        d.read32(Reg::FlashData.offset())?;
                    }
                }
                // Counter registers.
                800..=849 => {
                    for off in (Reg::Counter.offset()..=Reg::Epoch.offset()).step_by(4) {
                        d.read32(off)?;
                    }
                }
                // Expansion ROM.
                850..=899 => {
                    let size = d.rom_size();
                    let len = 1 + r.below(16) as usize;
                    let off = if r.chance(950) {
                        r.below(size)
                    } else {
                        size - r.below(8)
                    };
                    let mut b = vec![0u8; len];
                    let _ = d.rom_read(off, &mut b);
                }
                // Resets.
                900..=909 => {
                    st.resets += 1;
                    let kind = [ResetKind::Reset, ResetKind::Flr, ResetKind::PowerCycle]
                        [r.below(3) as usize];
                    d.reset(kind)?;
                }
                // OOB requests, good and bad.
                _ => {
                    st.oob += 1;
                    seq = seq.wrapping_add(1);
                    let req = match r.below(8) {
                        0 => Request::Identify,
                        1 | 2 => Request::ReadCounters,
                        3 => Request::ReadHash(Region::ALL[r.below(3) as usize]),
                        4 | 5 => Request::PhysicalReset(reset_key),
                        6 => {
                            let mut k = reset_key;
                            k[r.below(32) as usize] ^= 1;
                            Request::PhysicalReset(k)
                        }
                        _ => Request::ReadCounters,
                    };
                    let mut f = encode_request(seq, &req);
                    if r.chance(100) {
                        let i = r.below(f.len() as u64) as usize;
                        f[i] ^= 0x40;
                    }
                    d.oob(&f)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = res {
            if matches!(e, DeviceError::Divergence(_)) {
                return Err(fail(e, &st));
            }
        }
        st.ops += (d.ops() - before).max(1);
    }
    st.cycles = d.b().sim_cycles().unwrap_or(0);
    Ok(st)
}

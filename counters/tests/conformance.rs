//! The conformance suite passes the reference model and catches broken devices.

use hilrig_counters::conformance::{self, DeviceTarget, Options, Status};
use hilrig_device::regmap::{Reg, FLASH_CMD_LOCK, FLASH_STATUS_DONE, UNLOCK_KEY1, UNLOCK_KEY2};
use hilrig_device::{Device, DeviceConfig, DeviceError, Model, NvState, ResetKind};
use std::os::fd::BorrowedFd;

fn nv(width: u8) -> NvState {
    NvState::factory(DeviceConfig::with_width(width), 0xc0f).unwrap()
}

fn opts(burn: bool) -> Options {
    Options {
        burn_fuse: burn,
        reset_key: Some(hilrig_device::state::dev_keys(0xc0f).1),
    }
}

#[test]
fn the_model_passes_every_property() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.state");
    Model::create(&p, nv(24)).unwrap();
    let mut t = DeviceTarget::model_file(&p).unwrap();
    let r = conformance::run(&mut t, &opts(true));
    println!("{}", r.text());
    assert!(r.passed(), "{}", r.text());
    assert!(
        r.results.iter().all(|x| x.status == Status::Pass),
        "{}",
        r.text()
    );
}

#[test]
fn fuse_property_skips_unless_asked() {
    let mut t = DeviceTarget::new(Box::new(Model::new(nv(24)).unwrap()), "model in memory");
    let r = conformance::run(&mut t, &Options::default());
    // Skipped properties: INCOMPLETE, never PASS.
    assert_eq!(r.overall, conformance::Overall::Incomplete, "{}", r.text());
    assert_eq!(r.counts.failed, 0, "{}", r.text());
    assert_eq!(r.get("budget-and-fuse").unwrap().status, Status::Skip);
    assert_eq!(r.get("physical-reset").unwrap().status, Status::Skip);
}

/// Broken: drops program/erase commands while the controller is locked, so refused
/// attempts are never counted.
struct NoRefusedCount {
    inner: Model,
    unlocked: bool,
    stage1: bool,
}

/// Broken: counts in volatile memory and persists only when a command succeeds, so a
/// power cycle loses refused (and interrupted) attempts.
struct LazyPersist {
    inner: Model,
    durable: NvState,
}

macro_rules! delegate_rest {
    () => {
        fn rom_size(&self) -> u64 {
            self.inner.rom_size()
        }
        fn rom_read(&mut self, o: u64, d: &mut [u8]) -> Result<(), DeviceError> {
            self.inner.rom_read(o, d)
        }
        fn oob(&mut self, r: &[u8]) -> Result<Vec<u8>, DeviceError> {
            self.inner.oob(r)
        }
        fn buffer_fd(&self) -> Option<BorrowedFd<'_>> {
            self.inner.buffer_fd()
        }
        fn read_word(&mut self, w: u32, m: u8) -> Result<u32, DeviceError> {
            self.inner.read_word(w, m)
        }
    };
}

impl Device for NoRefusedCount {
    delegate_rest!();
    fn write_word(&mut self, w: u32, v: u32, m: u8) -> Result<(), DeviceError> {
        if w == Reg::FlashUnlock.offset() {
            if v == UNLOCK_KEY1 {
                self.stage1 = true;
            } else {
                self.unlocked = v == UNLOCK_KEY2 && self.stage1;
                self.stage1 = false;
            }
        }
        if w == Reg::FlashCmd.offset() {
            if v == FLASH_CMD_LOCK {
                self.unlocked = false;
            } else if !self.unlocked {
                return Ok(()); // the bug: refused commands never reach the counter
            }
        }
        self.inner.write_word(w, v, m)
    }
    fn reset(&mut self, k: ResetKind) -> Result<(), DeviceError> {
        self.unlocked = false;
        self.inner.reset(k)
    }
}

impl Device for LazyPersist {
    delegate_rest!();
    fn write_word(&mut self, w: u32, v: u32, m: u8) -> Result<(), DeviceError> {
        self.inner.write_word(w, v, m)?;
        if w == Reg::FlashCmd.offset()
            && v != FLASH_CMD_LOCK
            && self.inner.read_word(Reg::FlashStatus.offset(), 0xf)? & FLASH_STATUS_DONE != 0
        {
            self.durable = self.inner.nv().clone();
        }
        Ok(())
    }
    fn reset(&mut self, k: ResetKind) -> Result<(), DeviceError> {
        if k == ResetKind::PowerCycle {
            // the bug: only what a successful command persisted comes back
            self.inner = Model::new(self.durable.clone())?;
            Ok(())
        } else {
            self.inner.reset(k)
        }
    }
}

#[test]
fn a_device_that_does_not_count_refused_attempts_fails() {
    let dev = NoRefusedCount {
        inner: Model::new(nv(24)).unwrap(),
        unlocked: false,
        stage1: false,
    };
    let mut t = DeviceTarget::new(Box::new(dev), "broken: no refused count");
    let r = conformance::run(&mut t, &opts(true));
    println!("{}", r.text());
    assert!(!r.passed());
    assert_eq!(
        r.get("refused-attempts-counted").unwrap().status,
        Status::Fail
    );
    assert_eq!(r.get("count-before-act").unwrap().status, Status::Fail);
    assert!(r.get("refused-attempts-counted").unwrap().evidence[0].contains("not counted"));
    assert_eq!(
        r.get("accepted-attempts-counted").unwrap().status,
        Status::Pass
    );
}

#[test]
fn a_device_that_loses_counts_on_power_cycle_fails() {
    let inner = Model::new(nv(24)).unwrap();
    let durable = inner.nv().clone();
    let mut t = DeviceTarget::new(
        Box::new(LazyPersist { inner, durable }),
        "broken: lazy persist",
    );
    let r = conformance::run(&mut t, &opts(false));
    println!("{}", r.text());
    assert!(!r.passed());
    assert_eq!(r.get("count-before-act").unwrap().status, Status::Fail);
    assert_eq!(r.get("persistence").unwrap().status, Status::Fail);
    assert_eq!(
        r.get("refused-attempts-counted").unwrap().status,
        Status::Pass
    );
}

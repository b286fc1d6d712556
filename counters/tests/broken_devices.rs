//! The library of broken devices: each one is served on a PTY (its OOB port, as a
//! vendor's UART) and driven in-process for attempts and resets; the conformance
//! suite must FAIL it on the named property, or end as TRANSPORT for a link fault,
//! and must PASS the correct device.

mod pty;

use hilrig_counters::conformance::{self, Options, Overall, Report, Status};
use hilrig_device::oob::{self, FrameReader, Request, Response, StreamEvent};
use hilrig_device::regmap::{
    Reg, FLASH_CMD_ERASE, FLASH_CMD_PROGRAM, FLASH_STATUS_DONE, FLASH_STATUS_UNLOCKED, UNLOCK_KEY1,
    UNLOCK_KEY2,
};
use hilrig_device::{Device, DeviceError, Model, NvState, ResetKind};
use pty::{nv, opts, spawn_pty, PtyDevice};
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a device is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Correct,
    /// A "refused" erase or program (controller locked) really acts.
    IgnoresLock,
    /// READ_HASH of a region reports a different hash after a refused program.
    HashLiesAfterRefusedProgram,
    /// Accepted attempts are counted when the command completes (its status is
    /// read), after acting: a power cut in between loses the count.
    CountsAcceptedAfterActing,
    /// MASTER restarts at 0 after a physical reset.
    WrongMasterAfterPhysicalReset,
    /// A counter at the end of its budget wraps to 0 instead of blowing the fuse.
    WrappedCounters,
    /// The counter saturates but the fuse never blows (commands keep acting).
    FuseNeverBlows,
    /// READ_COUNTERS answers from a cache filled at the last reset.
    StaleCachedCounters,
    /// MASTER increments only for accepted attempts.
    MasterSkipsRefused,
    /// Refused attempts never reach the counter.
    NoRefusedCount,
    /// Counts live in volatile memory and persist only when a command succeeds.
    LazyPersist,
    /// Writing 0 to a counters-page register clears the counters.
    ClearedByRegisterWrite,
    /// A physical reset with a wrong key is carried out.
    AcceptsWrongResetKey,
    /// The in-band counters page is a copy taken at the last reset: the OOB port is
    /// right, the registers lag after an attempt and agree again after a reset.
    StaleInband,
}

struct Broken {
    class: Class,
    inner: Model,
    region: u32,
    lie: [bool; 3],
    pending: Option<NvState>,
    cache: Option<Vec<u8>>,
    inband_cache: Option<[u32; 4]>,
    durable: NvState,
}

impl Broken {
    fn new(class: Class, width: u8) -> Broken {
        let n = nv(width);
        Broken {
            class,
            inner: Model::new(n.clone()).unwrap(),
            region: 0,
            lie: [false; 3],
            pending: None,
            cache: None,
            inband_cache: None,
            durable: n,
        }
    }

    fn set_nv(&mut self, f: impl FnOnce(&mut NvState)) -> Result<(), DeviceError> {
        let mut n = self.inner.nv().clone();
        f(&mut n);
        self.inner = Model::new(n)?;
        Ok(())
    }

    fn locked(&mut self) -> Result<bool, DeviceError> {
        Ok(self.inner.read_word(Reg::FlashStatus.offset(), 0xf)? & FLASH_STATUS_UNLOCKED == 0)
    }
}

fn thermometer(v: u32) -> u64 {
    if v >= 64 {
        u64::MAX
    } else {
        (1u64 << v) - 1
    }
}

impl Device for Broken {
    fn read_word(&mut self, w: u32, m: u8) -> Result<u32, DeviceError> {
        if w == Reg::FlashStatus.offset() {
            self.pending = None; // the command completed: counted now
        }
        let page = Reg::Counter.offset()..Reg::Counter.offset() + 16;
        if self.class == Class::StaleInband && page.contains(&w) {
            let snap = match self.inband_cache {
                Some(s) => s,
                None => {
                    let mut s = [0u32; 4];
                    for (i, x) in (0u32..).zip(s.iter_mut()) {
                        *x = self.inner.read_word(page.start + 4 * i, 0xf)?;
                    }
                    *self.inband_cache.insert(s)
                }
            };
            return Ok(snap[((w - page.start) / 4) as usize]);
        }
        self.inner.read_word(w, m)
    }

    fn write_word(&mut self, w: u32, v: u32, m: u8) -> Result<(), DeviceError> {
        use Class::*;
        if w == Reg::FlashRegion.offset() {
            self.region = v;
        }
        if (0x2000..0x2040).contains(&w) && v == 0 && self.class == ClearedByRegisterWrite {
            return self.set_nv(|n| {
                n.counters = [0; 3];
            });
        }
        if w != Reg::FlashCmd.offset() || !(v == FLASH_CMD_ERASE || v == FLASH_CMD_PROGRAM) {
            return self.inner.write_word(w, v, m);
        }
        let locked = self.locked()?;
        let r = (self.region as usize).min(2);
        match self.class {
            IgnoresLock if locked => {
                self.inner
                    .write_word(Reg::FlashUnlock.offset(), UNLOCK_KEY1, 0xf)?;
                self.inner
                    .write_word(Reg::FlashUnlock.offset(), UNLOCK_KEY2, 0xf)?;
                self.inner.write_word(w, v, m)
            }
            NoRefusedCount if locked => Ok(()),
            HashLiesAfterRefusedProgram if locked && v == FLASH_CMD_PROGRAM => {
                self.lie[r] = true;
                self.inner.write_word(w, v, m)
            }
            CountsAcceptedAfterActing if !locked => {
                let pre = self.inner.nv().clone();
                self.inner.write_word(w, v, m)?;
                self.pending = Some(pre);
                Ok(())
            }
            MasterSkipsRefused if locked => {
                self.inner.write_word(w, v, m)?;
                self.set_nv(|n| n.master = n.master.wrapping_sub(1))
            }
            WrappedCounters => {
                self.inner.write_word(w, v, m)?;
                if self.inner.nv().fuse {
                    self.set_nv(|n| {
                        n.fuse = false;
                        n.counters[r] = thermometer(0);
                    })?;
                }
                Ok(())
            }
            FuseNeverBlows => {
                self.inner.write_word(w, v, m)?;
                if self.inner.nv().fuse {
                    self.set_nv(|n| n.fuse = false)?;
                }
                Ok(())
            }
            LazyPersist => {
                self.inner.write_word(w, v, m)?;
                if self.inner.read_word(Reg::FlashStatus.offset(), 0xf)? & FLASH_STATUS_DONE != 0 {
                    self.durable = self.inner.nv().clone();
                }
                Ok(())
            }
            _ => self.inner.write_word(w, v, m),
        }
    }

    fn rom_size(&self) -> u64 {
        self.inner.rom_size()
    }

    fn rom_read(&mut self, o: u64, d: &mut [u8]) -> Result<(), DeviceError> {
        self.inner.rom_read(o, d)
    }

    fn reset(&mut self, k: ResetKind) -> Result<(), DeviceError> {
        self.cache = None;
        self.inband_cache = None;
        if k == ResetKind::PowerCycle {
            if let Some(pre) = self.pending.take() {
                // Acted, never counted.
                self.set_nv(|n| {
                    n.counters = pre.counters;
                    n.master = pre.master;
                    n.fuse = pre.fuse;
                })?;
            }
            if self.class == Class::LazyPersist {
                self.inner = Model::new(self.durable.clone())?;
                return Ok(());
            }
        }
        self.inner.reset(k)
    }

    fn oob(&mut self, req: &[u8]) -> Result<Vec<u8>, DeviceError> {
        let Ok((seq, parsed)) = oob::decode_request(req) else {
            return self.inner.oob(req);
        };
        match (self.class, &parsed) {
            (Class::StaleCachedCounters, Request::ReadCounters) => {
                if self.cache.is_none() {
                    self.cache = Some(self.inner.oob(req)?);
                }
                let cached = self.cache.clone().unwrap_or_default();
                let (_, resp) =
                    oob::decode_response(&cached).map_err(|e| DeviceError::Transport {
                        what: "cached reply".into(),
                        detail: e.to_string(),
                    })?;
                Ok(oob::encode_response(seq, &resp))
            }
            (Class::HashLiesAfterRefusedProgram, Request::ReadHash(r)) if self.lie[*r as usize] => {
                let mut sha256 = self.inner.nv().region_hash(*r);
                sha256[0] ^= 0x5a;
                Ok(oob::encode_response(
                    seq,
                    &Response::Hash { region: *r, sha256 },
                ))
            }
            (Class::WrongMasterAfterPhysicalReset, Request::PhysicalReset(_)) => {
                let out = self.inner.oob(req)?;
                if matches!(
                    oob::decode_response(&out),
                    Ok((_, Response::ResetDone { .. }))
                ) {
                    self.set_nv(|n| n.master = 0)?;
                }
                Ok(out)
            }
            (Class::AcceptsWrongResetKey, Request::PhysicalReset(_)) => {
                let key = self.inner.nv().reset_key;
                self.inner
                    .oob(&oob::encode_request(seq, &Request::PhysicalReset(key)))
            }
            _ => self.inner.oob(req),
        }
    }
}

/// A fault of the link between the device and the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Clean,
    /// Every reply is sent twice.
    Duplicated,
    /// Every reply comes after the suite's timeout.
    Late(Duration),
    /// Every reply has a bad CRC.
    Corrupt,
}

fn serve(dev: Arc<Mutex<Box<dyn Device>>>, link: Link) -> PtyDevice {
    spawn_pty(Duration::from_millis(5), move |mut master, st| {
        let mut reader = FrameReader::default();
        let mut buf = [0u8; 256];
        while !st.load(Ordering::Relaxed) {
            let n: usize = master.read(&mut buf).unwrap_or_default();
            for &b in &buf[..n] {
                let Some(StreamEvent::Frame(f)) = reader.push(b) else {
                    continue;
                };
                let out = match dev.lock().unwrap().oob(&f) {
                    Ok(o) => o,
                    Err(_) => continue,
                };
                match link {
                    Link::Clean => {
                        let _ = master.write_all(&out);
                    }
                    Link::Duplicated => {
                        let _ = master.write_all(&out);
                        let _ = master.write_all(&out);
                    }
                    Link::Late(d) => {
                        std::thread::sleep(d);
                        let _ = master.write_all(&out);
                    }
                    Link::Corrupt => {
                        let mut o = out;
                        if let Some(x) = o.last_mut() {
                            *x ^= 0xff;
                        }
                        let _ = master.write_all(&o);
                    }
                }
                let _ = master.flush();
            }
        }
    })
}

fn run_over_pty(dev: Box<dyn Device>, link: Link, timeout: Duration, o: &Options) -> Report {
    let dev = Arc::new(Mutex::new(dev));
    let pty = serve(dev.clone(), link);
    pty::run_suite(dev, &pty, timeout, o, &format!("{link:?}"))
}

fn broken(class: Class, width: u8) -> Report {
    run_over_pty(
        Box::new(Broken::new(class, width)),
        Link::Clean,
        Duration::from_millis(1000),
        &opts(),
    )
}

fn assert_caught(class: Class, property: &str) {
    let r = broken(class, 8);
    assert_eq!(r.overall, Overall::Fail, "{class:?}\n{}", r.text());
    assert_eq!(
        r.get(property).unwrap().status,
        Status::Fail,
        "{class:?} must fail {property}\n{}",
        r.text()
    );
}

#[test]
fn the_correct_device_passes_over_a_pty() {
    let r = broken(Class::Correct, 8);
    assert_eq!(r.overall, Overall::Pass, "{}", r.text());
    assert!(r.transport_faults.is_empty(), "{}", r.text());
    assert!(
        r.results.iter().all(|x| x.status == Status::Pass),
        "{}",
        r.text()
    );
}

#[test]
fn a_width_4_device_with_burn_fuse_passes_by_planning_its_budget() {
    let r = broken(Class::Correct, 4);
    assert_eq!(r.overall, Overall::Pass, "{}", r.text());
    assert!(
        r.plan.iter().any(|p| p.contains("physical reset")),
        "{}",
        r.text()
    );
}

#[test]
fn without_a_reset_key_a_small_budget_is_incomplete_not_pass() {
    let r = run_over_pty(
        Box::new(Broken::new(Class::Correct, 6)),
        Link::Clean,
        Duration::from_millis(1000),
        &Options {
            burn_fuse: false,
            reset_key: None,
        },
    );
    assert_eq!(r.overall, Overall::Incomplete, "{}", r.text());
    assert_eq!(r.overall.exit_code(), 3);
    let skipped: Vec<_> = r
        .results
        .iter()
        .filter(|x| x.status == Status::Skip)
        .collect();
    assert!(!skipped.is_empty());
    assert!(skipped
        .iter()
        .all(|x| x.evidence[0].starts_with("skipped: ")));
    assert_eq!(r.counts.failed, 0, "{}", r.text());
}

#[test]
fn ignores_the_lock() {
    assert_caught(Class::IgnoresLock, "refused-leaves-flash-unchanged");
}

#[test]
fn read_hash_lies_after_a_refused_program() {
    assert_caught(
        Class::HashLiesAfterRefusedProgram,
        "refused-leaves-flash-unchanged",
    );
}

#[test]
fn counts_accepted_attempts_after_acting() {
    assert_caught(Class::CountsAcceptedAfterActing, "count-before-act");
    // Only that property: the accepted attempts are counted when they complete.
    let r = broken(Class::CountsAcceptedAfterActing, 8);
    assert_eq!(r.counts.failed, 1, "{}", r.text());
}

#[test]
fn wrong_master_after_a_physical_reset() {
    assert_caught(
        Class::WrongMasterAfterPhysicalReset,
        "master-across-physical-reset",
    );
}

#[test]
fn wrapped_counters() {
    assert_caught(Class::WrappedCounters, "budget-and-fuse");
}

#[test]
fn a_fuse_that_never_blows() {
    assert_caught(Class::FuseNeverBlows, "budget-and-fuse");
}

#[test]
fn stale_cached_counters() {
    assert_caught(Class::StaleCachedCounters, "refused-attempts-counted");
}

#[test]
fn master_skips_refused_attempts() {
    assert_caught(Class::MasterSkipsRefused, "master");
}

#[test]
fn refused_attempts_never_counted() {
    assert_caught(Class::NoRefusedCount, "refused-attempts-counted");
}

#[test]
fn counts_lost_on_a_power_cycle() {
    assert_caught(Class::LazyPersist, "persistence");
}

#[test]
fn counters_cleared_by_a_register_write() {
    assert_caught(Class::ClearedByRegisterWrite, "no-decrement");
}

#[test]
fn a_physical_reset_with_a_wrong_key_is_carried_out() {
    assert_caught(Class::AcceptsWrongResetKey, "no-decrement");
}

#[test]
fn in_band_registers_that_lag_the_oob_port() {
    assert_caught(Class::StaleInband, "oob-equals-inband");
}

fn transport(link: Link, timeout: Duration) {
    let r = run_over_pty(
        Box::new(Broken::new(Class::Correct, 8)),
        link,
        timeout,
        &opts(),
    );
    assert_eq!(r.overall, Overall::Transport, "{link:?}\n{}", r.text());
    assert_eq!(r.overall.exit_code(), 4);
    assert_eq!(
        r.counts.failed,
        0,
        "{link:?} must not be a FAIL\n{}",
        r.text()
    );
    assert!(!r.transport_faults.is_empty());
}

#[test]
fn duplicated_frames_are_transport_not_fail() {
    transport(Link::Duplicated, Duration::from_millis(1000));
}

#[test]
fn late_replies_are_transport() {
    transport(
        Link::Late(Duration::from_millis(150)),
        Duration::from_millis(100),
    );
}

#[test]
fn corrupt_replies_are_transport() {
    transport(Link::Corrupt, Duration::from_millis(1000));
}

#[test]
fn junit_has_one_testcase_per_property() {
    let r = broken(Class::MasterSkipsRefused, 8);
    let j = r.junit();
    assert_eq!(
        j.matches("<testcase ").count(),
        conformance::PROPERTIES.len()
    );
    assert!(j.contains("name=\"master\"><failure"), "{j}");
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["overall"], "fail");
    assert_eq!(v["counts"]["failed"], r.counts.failed);
}

//! The vendor conformance suite: does a device's firmware-update counter follow the
//! reference semantics (datasheet §2)?
//!
//! A target offers four things ([`ConformanceTarget`]): OOB frames, "make one
//! program/erase attempt on a region (refused or accepted)", "reset (reset, FLR,
//! power cycle)", and optionally an in-band register view. [`DeviceTarget`] adapts any
//! `Box<dyn hilrig_device::Device>` (model now, RTL later); [`SerialTarget`] drives a
//! vendor device over its OOB serial port with external commands for the attempts
//! and resets (see the README for the command templates).
//!
//! Properties: attempts counted including refused ones; increment before acting
//! (an attempt cut by a power cycle is still counted); MASTER; budget and fuse;
//! persistence across reset/FLR/power cycle; no decrement by any register write or
//! OOB request; OOB equals in-band; the keyed physical reset.

use hilrig_device::model::ops;
use hilrig_device::oob::{self, CounterReport, Request, Response};
use hilrig_device::regmap::{Reg, FLASH_CMD_ERASE, FLASH_CMD_LOCK, HANG_MAGIC, SOFT_RESET_MAGIC};
use hilrig_device::{Device, DeviceError, Region, ResetKind};
use serde::Serialize;

/// Program or erase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttemptKind {
    /// PROGRAM.
    Program,
    /// ERASE.
    Erase,
}

impl AttemptKind {
    /// Name used in command templates.
    pub fn name(self) -> &'static str {
        match self {
            AttemptKind::Program => "program",
            AttemptKind::Erase => "erase",
        }
    }
}

/// A device under test.
pub trait ConformanceTarget {
    /// Name in the report.
    fn name(&self) -> String;
    /// Send one raw OOB frame, return the raw response frame.
    fn oob_raw(&mut self, frame: &[u8]) -> Result<Vec<u8>, String>;
    /// Make one program or erase attempt on `region`. `accepted = false`: an attempt
    /// the device must refuse (flash controller locked); `true`: a valid, unlocked
    /// command (a program of all-ones bytes, which changes no data).
    fn attempt(&mut self, region: Region, kind: AttemptKind, accepted: bool) -> Result<(), String>;
    /// Reset the device.
    fn reset(&mut self, kind: ResetKind) -> Result<(), String>;
    /// Issue an attempt and cut power before anything else (no status read); the
    /// device comes back up. Default: a refused attempt, then a power cycle.
    fn attempt_then_cut(&mut self, region: Region) -> Result<(), String> {
        self.attempt(region, AttemptKind::Erase, false)?;
        self.reset(ResetKind::PowerCycle)
    }
    /// The counters as the in-band registers show them, if the target has them.
    fn inband(&mut self) -> Option<Result<CounterReport, String>> {
        None
    }
    /// Write a BAR0 register, if the target allows it.
    fn write_register(&mut self, _offset: u32, _value: u32) -> Option<Result<(), String>> {
        None
    }
}

/// Pass, fail or skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Holds.
    Pass,
    /// Violated.
    Fail,
    /// Not run (with the reason in the evidence).
    Skip,
}

/// One property's result.
#[derive(Debug, Clone, Serialize)]
pub struct PropertyResult {
    /// Property name.
    pub name: &'static str,
    /// Outcome.
    pub status: Status,
    /// What was observed.
    pub evidence: Vec<String>,
}

/// The suite's report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Target name.
    pub target: String,
    /// One per property.
    pub results: Vec<PropertyResult>,
}

impl Report {
    /// No property failed.
    pub fn passed(&self) -> bool {
        self.results.iter().all(|r| r.status != Status::Fail)
    }
    /// A property's result.
    pub fn get(&self, name: &str) -> Option<&PropertyResult> {
        self.results.iter().find(|r| r.name == name)
    }
    /// Readable text.
    pub fn text(&self) -> String {
        let mut s = format!("conformance of {}\n", self.target);
        for r in &self.results {
            let st = match r.status {
                Status::Pass => "PASS",
                Status::Fail => "FAIL",
                Status::Skip => "SKIP",
            };
            s.push_str(&format!("{st}  {}\n", r.name));
            for e in &r.evidence {
                s.push_str(&format!("      {e}\n"));
            }
        }
        let n = |st| self.results.iter().filter(|r| r.status == st).count();
        s.push_str(&format!(
            "{} passed, {} failed, {} skipped\n",
            n(Status::Pass),
            n(Status::Fail),
            n(Status::Skip)
        ));
        s
    }
}

/// Suite options.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Run the budget-and-fuse property: makes attempts until the fuse blows.
    pub burn_fuse: bool,
    /// The OOB physical-reset key: enables the physical-reset property (and recovers
    /// the device after the fuse property).
    pub reset_key: Option<[u8; 32]>,
}

/// Property names, in run order.
pub const PROPERTIES: &[&str] = &[
    "refused-attempts-counted",
    "accepted-attempts-counted",
    "count-before-act",
    "master",
    "persistence",
    "no-decrement",
    "oob-equals-inband",
    "budget-and-fuse",
    "physical-reset",
];

fn request(t: &mut dyn ConformanceTarget, req: &Request) -> Result<Response, String> {
    let out = t.oob_raw(&oob::encode_request(0x33, req))?;
    let (seq, resp) = oob::decode_response(&out).map_err(|e| e.to_string())?;
    if seq != 0x33 {
        return Err(format!("response sequence {seq} for request 0x33"));
    }
    Ok(resp)
}

fn counters(t: &mut dyn ConformanceTarget) -> Result<CounterReport, String> {
    match request(t, &Request::ReadCounters)? {
        Response::Counters(c) => Ok(c),
        other => Err(format!("READ_COUNTERS answered {other:?}")),
    }
}

fn hash(t: &mut dyn ConformanceTarget, r: Region) -> Result<[u8; 32], String> {
    match request(t, &Request::ReadHash(r))? {
        Response::Hash { sha256, .. } => Ok(sha256),
        other => Err(format!("READ_HASH answered {other:?}")),
    }
}

fn show(c: &CounterReport) -> String {
    format!(
        "counters {:?} master {} fuse {} slots {} epoch {}",
        c.counters, c.master, c.fuse as u8, c.slots_left, c.epoch
    )
}

/// Check that exactly one attempt on `region` was counted between `a` and `b`.
fn one_counted(a: &CounterReport, b: &CounterReport, region: Region) -> Result<(), String> {
    let i = region as usize;
    let mut want = a.counters;
    want[i] = want[i].wrapping_add(1);
    if a.counters[i] == u32::MAX
        || a.master == u32::MAX
        || b.counters != want
        || b.master != a.master.wrapping_add(1)
    {
        return Err(format!(
            "{region}: before {}, after {}; want {region} +1 and master +1",
            show(a),
            show(b)
        ));
    }
    Ok(())
}

fn never_lower(a: &CounterReport, b: &CounterReport) -> Option<String> {
    let lower = b.epoch < a.epoch
        || b.master < a.master
        || (b.epoch == a.epoch && b.counters.iter().zip(&a.counters).any(|(x, y)| x < y))
        || (b.epoch == a.epoch && a.fuse && !b.fuse);
    lower.then(|| format!("went down: {} -> {}", show(a), show(b)))
}

type Prop = Result<Vec<String>, Vec<String>>;

/// Run the suite.
pub fn run(t: &mut dyn ConformanceTarget, opts: &Options) -> Report {
    let mut results = Vec::new();
    for &name in PROPERTIES {
        let r: Result<Prop, String> = match name {
            "refused-attempts-counted" => p_attempts(t, false),
            "accepted-attempts-counted" => p_attempts(t, true),
            "count-before-act" => p_before_act(t),
            "master" => p_master(t),
            "persistence" => p_persistence(t),
            "no-decrement" => p_no_decrement(t, opts),
            "oob-equals-inband" => p_inband(t),
            "budget-and-fuse" => p_fuse(t, opts),
            "physical-reset" => p_physical_reset(t, opts),
            _ => Ok(Err(vec!["unknown property".into()])),
        };
        let (status, evidence) = match r {
            Ok(Ok(ev)) if ev.first().is_some_and(|e| e.starts_with("skipped")) => {
                (Status::Skip, ev)
            }
            Ok(Ok(ev)) => (Status::Pass, ev),
            Ok(Err(ev)) => (Status::Fail, ev),
            Err(e) => (Status::Fail, vec![format!("target error: {e}")]),
        };
        let mut evidence = evidence;
        if evidence.len() > 10 {
            let more = evidence.len() - 8;
            evidence.truncate(8);
            evidence.push(format!("... and {more} more"));
        }
        results.push(PropertyResult {
            name,
            status,
            evidence,
        });
    }
    Report {
        target: t.name(),
        results,
    }
}

fn need_slots(t: &mut dyn ConformanceTarget, n: u32) -> Result<Option<String>, String> {
    let c = counters(t)?;
    if c.fuse || c.slots_left < n {
        Ok(Some(format!(
            "skipped: needs {n} attempts of budget, device has {} (fuse {})",
            c.slots_left, c.fuse as u8
        )))
    } else {
        Ok(None)
    }
}

fn p_attempts(t: &mut dyn ConformanceTarget, accepted: bool) -> Result<Prop, String> {
    if let Some(s) = need_slots(t, 2)? {
        return Ok(Ok(vec![s]));
    }
    let mut ev = Vec::new();
    let mut bad = Vec::new();
    for r in Region::ALL {
        for k in [AttemptKind::Erase, AttemptKind::Program] {
            if accepted && k == AttemptKind::Erase && r == Region::Vbios {
                // Keep the VBIOS (expansion ROM) intact: a program of all-ones suffices.
                continue;
            }
            let a = counters(t)?;
            t.attempt(r, k, accepted)?;
            let b = counters(t)?;
            match one_counted(&a, &b, r) {
                Ok(()) => ev.push(format!(
                    "{} {} {r}: {} -> {}",
                    if accepted { "accepted" } else { "refused" },
                    k.name(),
                    a.counters[r as usize],
                    b.counters[r as usize]
                )),
                Err(e) => bad.push(format!(
                    "{} {} not counted: {e}",
                    if accepted { "accepted" } else { "refused" },
                    k.name()
                )),
            }
        }
    }
    Ok(if bad.is_empty() { Ok(ev) } else { Err(bad) })
}

fn p_before_act(t: &mut dyn ConformanceTarget) -> Result<Prop, String> {
    if let Some(s) = need_slots(t, 1)? {
        return Ok(Ok(vec![s]));
    }
    let mut ev = Vec::new();
    let mut bad = Vec::new();
    for r in Region::ALL {
        let a = counters(t)?;
        t.attempt_then_cut(r)?;
        let b = counters(t)?;
        match one_counted(&a, &b, r) {
            Ok(()) => ev.push(format!(
                "{r}: attempt then power cut, count {} -> {} survived",
                a.counters[r as usize], b.counters[r as usize]
            )),
            Err(e) => bad.push(format!("attempt cut by a power cycle was lost: {e}")),
        }
    }
    Ok(if bad.is_empty() { Ok(ev) } else { Err(bad) })
}

fn p_master(t: &mut dyn ConformanceTarget) -> Result<Prop, String> {
    if let Some(s) = need_slots(t, 2)? {
        return Ok(Ok(vec![s]));
    }
    let a = counters(t)?;
    let plan = [
        (Region::Config, AttemptKind::Erase, false),
        (Region::Firmware, AttemptKind::Program, false),
        (Region::Vbios, AttemptKind::Program, true),
        (Region::Config, AttemptKind::Program, true),
    ];
    for (r, k, acc) in plan {
        t.attempt(r, k, acc)?;
    }
    let b = counters(t)?;
    let region_delta: i64 = (0..3)
        .map(|i| b.counters[i] as i64 - a.counters[i] as i64)
        .sum();
    let master_delta = b.master as i64 - a.master as i64;
    let ev = vec![format!(
        "4 attempts: region deltas sum {region_delta}, master delta {master_delta} ({} -> {})",
        show(&a),
        show(&b)
    )];
    Ok(if region_delta == 4 && master_delta == 4 {
        Ok(ev)
    } else {
        Err(ev)
    })
}

fn p_persistence(t: &mut dyn ConformanceTarget) -> Result<Prop, String> {
    if let Some(s) = need_slots(t, 2)? {
        return Ok(Ok(vec![s]));
    }
    let mut ev = Vec::new();
    let mut bad = Vec::new();
    for (kind, r) in [
        (ResetKind::Reset, Region::Vbios),
        (ResetKind::Flr, Region::Firmware),
        (ResetKind::PowerCycle, Region::Config),
    ] {
        t.attempt(r, AttemptKind::Erase, false)?;
        let a = counters(t)?;
        t.reset(kind)?;
        let b = counters(t)?;
        if a == b {
            ev.push(format!("{kind:?}: {} kept", show(&b)));
        } else {
            bad.push(format!("{kind:?}: {} -> {}", show(&a), show(&b)));
        }
    }
    Ok(if bad.is_empty() { Ok(ev) } else { Err(bad) })
}

fn p_no_decrement(t: &mut dyn ConformanceTarget, opts: &Options) -> Result<Prop, String> {
    let mut ev = Vec::new();
    let mut bad = Vec::new();
    let start = counters(t)?;
    let mut writes = 0;
    let check =
        |t: &mut dyn ConformanceTarget, what: &str, bad: &mut Vec<String>| -> Result<(), String> {
            let now = counters(t)?;
            if let Some(e) = never_lower(&start, &now) {
                bad.push(format!("after {what}: {e}"));
            }
            Ok(())
        };
    // Every word of the counters page, with values that would clear or lower them.
    let mut supported = true;
    'outer: for off in (0x2000u32..0x2040).step_by(4) {
        for v in [0u32, 1, 0xffff_ffff, 0x8000_0000] {
            match t.write_register(off, v) {
                None => {
                    supported = false;
                    break 'outer;
                }
                Some(r) => r?,
            }
            writes += 1;
        }
        check(t, &format!("writes to BAR0+{off:#x}"), &mut bad)?;
    }
    if supported {
        for (off, v, what) in [
            (Reg::SoftReset.offset(), SOFT_RESET_MAGIC, "soft reset"),
            (Reg::HangTrigger.offset(), HANG_MAGIC, "hang trigger"),
        ] {
            if let Some(r) = t.write_register(off, v) {
                r?;
                writes += 1;
            }
            check(t, what, &mut bad)?;
        }
        t.reset(ResetKind::Flr)?;
        ev.push(format!(
            "{writes} register writes (counters page, soft reset, hang)"
        ));
    } else {
        ev.push("the target offers no register writes: OOB only".into());
    }
    // OOB: a wrong physical-reset key, malformed frames, every read request.
    let wrong = match opts.reset_key {
        Some(k) => {
            let mut w = k;
            w[0] ^= 1;
            w
        }
        None => [0u8; 32],
    };
    match request(t, &Request::PhysicalReset(wrong))? {
        Response::Error { .. } => ev.push("physical reset with a wrong key refused".into()),
        other => bad.push(format!(
            "physical reset with a wrong key answered {other:?}"
        )),
    }
    check(t, "a wrong-key physical reset", &mut bad)?;
    let mut frames: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xA5],
        vec![0xA5, 0xff, 0, 4],
        oob::frame(1, 0x04, &[0u8; 31]),
        oob::frame(1, 0x7f, &[]),
        oob::frame(1, 0x05, &[1, 2, 3]),
    ];
    let mut x = 0x1234_5678u32;
    for _ in 0..40 {
        let len = (x % 40) as usize;
        let mut f = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            f.push(x as u8);
        }
        frames.push(f);
    }
    for f in &frames {
        let _ = t.oob_raw(f)?;
    }
    for r in [
        Request::Identify,
        Request::ReadCounters,
        Request::ReadHash(Region::Config),
    ] {
        let _ = request(t, &r)?;
    }
    check(t, "malformed and read-only OOB frames", &mut bad)?;
    ev.push(format!(
        "{} malformed OOB frames and the read requests: counters never lower ({})",
        frames.len(),
        show(&start)
    ));
    Ok(if bad.is_empty() { Ok(ev) } else { Err(bad) })
}

fn p_inband(t: &mut dyn ConformanceTarget) -> Result<Prop, String> {
    let Some(ib) = t.inband() else {
        return Ok(Ok(vec![
            "skipped: the target has no in-band register view".into()
        ]));
    };
    let ib = ib?;
    let o = counters(t)?;
    let ev = vec![format!("OOB {} / in-band {}", show(&o), show(&ib))];
    Ok(if ib == o { Ok(ev) } else { Err(ev) })
}

fn p_fuse(t: &mut dyn ConformanceTarget, opts: &Options) -> Result<Prop, String> {
    if !opts.burn_fuse {
        return Ok(Ok(vec![
            "skipped: pass burn-fuse (uses up the budget; the reset key recovers the device)"
                .into(),
        ]));
    }
    let mut ev = Vec::new();
    let mut bad = Vec::new();
    let r = Region::Config;
    let start = counters(t)?;
    if start.fuse {
        return Ok(Err(vec![format!("fuse already blown: {}", show(&start))]));
    }
    let w = start.width as u32;
    let mut prev = start;
    let mut n = 0;
    while !prev.fuse && n < 70 {
        t.attempt(r, AttemptKind::Erase, false)?;
        n += 1;
        let c = counters(t)?;
        if let Err(e) = one_counted(&prev, &c, r) {
            bad.push(format!("attempt {n}: {e}"));
            if c == prev && n >= 3 {
                bad.push("attempts are not counted: giving up before the fuse".into());
                return Ok(Err(bad));
            }
        }
        let want_slots = w.saturating_sub(*c.counters.iter().max().unwrap_or(&0));
        if c.slots_left != want_slots {
            bad.push(format!(
                "attempt {n}: slots_left {} != width - max counter {want_slots}",
                c.slots_left
            ));
        }
        let want_fuse = c.counters.iter().any(|&x| x >= w);
        if c.fuse != want_fuse {
            bad.push(format!(
                "attempt {n}: fuse {} but counters {:?} width {w}",
                c.fuse, c.counters
            ));
        }
        prev = c;
    }
    ev.push(format!("fuse blew after {n} attempts: {}", show(&prev)));
    // Blown: every further command refused, counters saturated, no data changes.
    let h = hash(t, Region::Firmware)?;
    t.attempt(Region::Firmware, AttemptKind::Erase, true)?;
    t.attempt(r, AttemptKind::Erase, true)?;
    let after = counters(t)?;
    let h2 = hash(t, Region::Firmware)?;
    if h != h2 {
        bad.push("an unlocked erase changed the firmware region with the fuse blown".into());
    } else {
        ev.push("unlocked erase with the fuse blown: refused, region unchanged".into());
    }
    if after.counters[r as usize] != w || !after.fuse || after.slots_left != 0 {
        bad.push(format!(
            "after the fuse blew: {} (want {r} at {w}, fuse 1, slots 0)",
            show(&after)
        ));
    }
    if after.counters[Region::Firmware as usize]
        != prev.counters[Region::Firmware as usize].wrapping_add(1)
        && prev.counters[Region::Firmware as usize] < w
    {
        bad.push(format!(
            "a firmware attempt with the fuse blown was not counted: {} -> {}",
            show(&prev),
            show(&after)
        ));
    }
    t.reset(ResetKind::PowerCycle)?;
    let pc = counters(t)?;
    if !pc.fuse {
        bad.push(format!("fuse cleared by a power cycle: {}", show(&pc)));
    } else {
        ev.push("fuse survives a power cycle".into());
    }
    Ok(if bad.is_empty() { Ok(ev) } else { Err(bad) })
}

fn p_physical_reset(t: &mut dyn ConformanceTarget, opts: &Options) -> Result<Prop, String> {
    let Some(key) = opts.reset_key else {
        return Ok(Ok(vec!["skipped: no reset key given".into()]));
    };
    let a = counters(t)?;
    let resp = request(t, &Request::PhysicalReset(key))?;
    let b = counters(t)?;
    let ev = vec![format!("{:?}: {} -> {}", resp, show(&a), show(&b))];
    let ok = matches!(resp, Response::ResetDone { epoch } if epoch == a.epoch.wrapping_add(1))
        && b.epoch == a.epoch.wrapping_add(1)
        && b.counters == [0, 0, 0]
        && !b.fuse
        && b.master == a.master
        && b.slots_left == b.width as u32;
    Ok(if ok { Ok(ev) } else { Err(ev) })
}

/// Reopens a device after a power cycle (e.g. `Model::open` on its state file).
pub type Reopen = Box<dyn FnMut() -> Result<Box<dyn Device>, DeviceError>>;

/// Any in-process device as a target.
pub struct DeviceTarget {
    dev: Box<dyn Device>,
    reopen: Option<Reopen>,
    label: String,
}

impl DeviceTarget {
    /// A device; a power cycle is the device's own `reset(PowerCycle)`.
    pub fn new(dev: Box<dyn Device>, label: impl Into<String>) -> Self {
        DeviceTarget {
            dev,
            reopen: None,
            label: label.into(),
        }
    }

    /// On a power cycle, drop the device and get it back from `reopen` (so only what
    /// it persisted survives).
    pub fn with_reopen(mut self, reopen: Reopen) -> Self {
        self.reopen = Some(reopen);
        self
    }

    /// A model device from its state file; power cycles reopen the file.
    pub fn model_file(path: &std::path::Path) -> Result<Self, DeviceError> {
        let dev = hilrig_device::Model::open(path)?;
        let p = path.to_path_buf();
        Ok(
            DeviceTarget::new(Box::new(dev), format!("model {}", path.display())).with_reopen(
                Box::new(move || Ok(Box::new(hilrig_device::Model::open(&p)?) as Box<dyn Device>)),
            ),
        )
    }

    /// The device.
    pub fn device(&mut self) -> &mut dyn Device {
        &mut *self.dev
    }
}

fn e(x: DeviceError) -> String {
    x.to_string()
}

impl ConformanceTarget for DeviceTarget {
    fn name(&self) -> String {
        self.label.clone()
    }
    fn oob_raw(&mut self, frame: &[u8]) -> Result<Vec<u8>, String> {
        self.dev.oob(frame).map_err(e)
    }
    fn attempt(&mut self, region: Region, kind: AttemptKind, accepted: bool) -> Result<(), String> {
        let d = &mut *self.dev;
        if accepted {
            ops::unlock(d).map_err(e)?;
        } else {
            d.write32(Reg::FlashCmd.offset(), FLASH_CMD_LOCK)
                .map_err(e)?;
        }
        match kind {
            AttemptKind::Erase => {
                ops::erase(d, region).map_err(e)?;
            }
            AttemptKind::Program => {
                ops::program(d, region, 0, 0, &[0xff; 8]).map_err(e)?;
            }
        }
        d.write32(Reg::FlashCmd.offset(), FLASH_CMD_LOCK)
            .map_err(e)?;
        Ok(())
    }
    fn reset(&mut self, kind: ResetKind) -> Result<(), String> {
        self.dev.reset(kind).map_err(e)?;
        if kind == ResetKind::PowerCycle {
            if let Some(r) = &mut self.reopen {
                self.dev = r().map_err(e)?;
            }
        }
        Ok(())
    }
    fn attempt_then_cut(&mut self, region: Region) -> Result<(), String> {
        let d = &mut *self.dev;
        d.write32(Reg::FlashCmd.offset(), FLASH_CMD_LOCK)
            .map_err(e)?;
        d.write32(Reg::FlashRegion.offset(), region as u32)
            .map_err(e)?;
        d.write32(Reg::FlashCmd.offset(), FLASH_CMD_ERASE)
            .map_err(e)?;
        self.reset(ResetKind::PowerCycle)
    }
    fn inband(&mut self) -> Option<Result<CounterReport, String>> {
        let d = &mut *self.dev;
        let r = (|| -> Result<CounterReport, DeviceError> {
            let c = |d: &mut dyn Device, i: u32| d.read32(Reg::Counter.offset() + 4 * i);
            Ok(CounterReport {
                counters: [c(d, 0)?, c(d, 1)?, c(d, 2)?],
                master: d.read32(Reg::Master.offset())?,
                fuse: d.read32(Reg::Fuse.offset())? != 0,
                slots_left: d.read32(Reg::SlotsLeft.offset())?,
                width: d.read32(Reg::Width.offset())? as u8,
                epoch: d.read32(Reg::Epoch.offset())?,
            })
        })();
        Some(r.map_err(e))
    }
    fn write_register(&mut self, offset: u32, value: u32) -> Option<Result<(), String>> {
        Some(self.dev.write32(offset, value).map_err(e))
    }
}

/// A vendor device over its OOB serial port; attempts and resets are made by
/// external commands (shell templates):
/// - `attempt_cmd`: `{region}` (vbios|firmware|config), `{op}` (program|erase),
///   `{mode}` (refused|accepted); must exit 0 once the command was issued;
/// - `reset_cmd`: `{kind}` (reset|flr|power-cycle); must exit 0 once the device is
///   back up and its OOB port answers;
/// - `cut_cmd` (optional): `{region}`: issue an attempt and cut power before it
///   completes, then restore power.
pub struct SerialTarget {
    port: Box<dyn serialport::SerialPort>,
    path: String,
    /// Attempt command template.
    pub attempt_cmd: String,
    /// Reset command template.
    pub reset_cmd: String,
    /// Attempt-then-power-cut command template.
    pub cut_cmd: Option<String>,
    timeout: std::time::Duration,
}

impl SerialTarget {
    /// Open the OOB port.
    pub fn open(
        path: &str,
        baud: u32,
        timeout: std::time::Duration,
        attempt_cmd: String,
        reset_cmd: String,
        cut_cmd: Option<String>,
    ) -> Result<SerialTarget, String> {
        let port = serialport::new(path, baud)
            .timeout(std::time::Duration::from_millis(20))
            .open()
            .map_err(|e| format!("{path}: {e}"))?;
        Ok(SerialTarget {
            port,
            path: path.to_string(),
            attempt_cmd,
            reset_cmd,
            cut_cmd,
            timeout,
        })
    }

    fn sh(&self, cmd: &str) -> Result<(), String> {
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .status()
            .map_err(|e| format!("running {cmd:?}: {e}"))?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("{cmd:?} exited with {st}"))
        }
    }
}

impl ConformanceTarget for SerialTarget {
    fn name(&self) -> String {
        format!("serial {}", self.path)
    }
    fn oob_raw(&mut self, frame: &[u8]) -> Result<Vec<u8>, String> {
        use std::io::{Read, Write};
        let io = |e: std::io::Error| format!("{}: {e}", self.path);
        self.port.write_all(frame).map_err(io)?;
        self.port.flush().map_err(io)?;
        let deadline = std::time::Instant::now() + self.timeout;
        let mut reader = oob::FrameReader::default();
        let mut buf = [0u8; 64];
        while std::time::Instant::now() < deadline {
            let n = match self.port.read(&mut buf) {
                Ok(n) => n,
                Err(x) if x.kind() == std::io::ErrorKind::TimedOut => 0,
                Err(x) => return Err(format!("{}: {x}", self.path)),
            };
            for &b in &buf[..n] {
                if let Some(oob::StreamEvent::Frame(f)) = reader.push(b) {
                    return Ok(f);
                }
            }
        }
        Err(format!(
            "{}: no response within {:?}",
            self.path, self.timeout
        ))
    }
    fn attempt(&mut self, region: Region, kind: AttemptKind, accepted: bool) -> Result<(), String> {
        let c = self
            .attempt_cmd
            .replace("{region}", region.name())
            .replace("{op}", kind.name())
            .replace("{mode}", if accepted { "accepted" } else { "refused" });
        self.sh(&c)
    }
    fn reset(&mut self, kind: ResetKind) -> Result<(), String> {
        let k = match kind {
            ResetKind::Reset => "reset",
            ResetKind::Flr => "flr",
            ResetKind::PowerCycle => "power-cycle",
        };
        self.sh(&self.reset_cmd.replace("{kind}", k))
    }
    fn attempt_then_cut(&mut self, region: Region) -> Result<(), String> {
        match &self.cut_cmd {
            Some(c) => self.sh(&c.replace("{region}", region.name())),
            None => {
                self.attempt(region, AttemptKind::Erase, false)?;
                self.reset(ResetKind::PowerCycle)
            }
        }
    }
}

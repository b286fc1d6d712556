//! The vendor conformance suite: does a device's firmware-update counter follow the
//! reference semantics (datasheet §2)?
//!
//! A target offers ([`ConformanceTarget`]): OOB frames, "make one program/erase
//! attempt on a region (refused or accepted)", "reset (reset, FLR, power cycle)", "an
//! attempt cut by a power loss", and optionally an in-band register view.
//! [`DeviceTarget`] adapts any `Box<dyn hilrig_device::Device>` (model, RTL);
//! [`SerialTarget`] drives a device over its OOB serial port, with an [`Actuator`] for
//! the attempts and resets: external commands ([`CommandActuator`], see the README
//! for the templates) or an in-process device ([`DeviceActuator`]).
//!
//! Every OOB request carries a fresh sequence number; stale input is drained before
//! each request; a request is retried at most [`RETRIES`] times. Timeouts, duplicated,
//! late or corrupt replies are TRANSPORT faults, never a property failure.
//!
//! The suite reads the device's width and slots left first. Every attempt is a step of
//! its own: before it the suite reads the counters, and if the attempt would not fit
//! the budget (the fuse blown, or the region's counter at its width) it restores the
//! budget with the keyed physical reset, when it has the key. The attempt that fills
//! a region's last slot is made too (the datasheet: it is counted, blows the fuse and
//! is still acted on), so a device of any width 1..=64 can be checked in full with the
//! key. Without the key a property runs only if all its attempts fit below the fuse;
//! a property that cannot run is SKIPPED with its reason, and the overall result is
//! then INCOMPLETE, never PASS.

use hilrig_device::model::ops;
use hilrig_device::oob::{self, CounterReport, ErrorCode, Request, Response};
use hilrig_device::regmap::{
    Reg, FLASH_CMD_ERASE, FLASH_CMD_LOCK, FLASH_CMD_PROGRAM, FLASH_STATUS_DONE,
    FLASH_STATUS_REFUSED_FUSE, FLASH_STATUS_REFUSED_LOCKED, HANG_MAGIC, SOFT_RESET_MAGIC,
};
use hilrig_device::{Device, DeviceError, Region, ResetKind};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Attempts per OOB request (the first try and the retries) before a TRANSPORT fault.
pub const RETRIES: usize = 3;

/// How many times a PHYSICAL_RESET answered BUSY is asked in all.
pub const BUSY_TRIES: usize = 5;
/// The pause before a PHYSICAL_RESET answered BUSY is asked again.
pub const BUSY_WAIT: Duration = Duration::from_millis(100);

/// Why a target could not do what the suite asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TargetError {
    /// The link to the device failed: timeout, I/O error, corrupt, duplicated or late
    /// frames. Not the device's counter semantics.
    #[error("transport: {0}")]
    Transport(String),
    /// The target could not carry out an action (a command failed, a backend error).
    #[error("target: {0}")]
    Target(String),
    /// The device answered a request with a reply that came over the link intact
    /// (right sequence number, good CRC) but is not an answer to it: a reply of
    /// another kind, another region's hash, a payload that does not decode. The
    /// device's fault, not the link's: the property it happened in FAILS.
    #[error("device: {0}")]
    Device(String),
}

/// Result with [`TargetError`].
pub type TResult<T> = Result<T, TargetError>;

fn terr(e: DeviceError) -> TargetError {
    TargetError::Target(e.to_string())
}

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
    /// Send one raw OOB frame and return the first complete frame that comes back
    /// (no answer in time is a [`TargetError::Transport`]).
    fn oob_raw(&mut self, frame: &[u8]) -> TResult<Vec<u8>>;
    /// Send bytes and do not wait for an answer (garbage, cut frames).
    fn oob_send(&mut self, bytes: &[u8]) -> TResult<()> {
        self.oob_raw(bytes).map(|_| ())
    }
    /// Read the next complete frame that arrives within the response timeout, if any
    /// (a stream target; an in-process target answers at once and has none pending).
    fn oob_read(&mut self) -> TResult<Option<Vec<u8>>> {
        Ok(None)
    }
    /// Discard input that arrived unasked; returns the number of bytes discarded.
    fn drain(&mut self) -> TResult<usize> {
        Ok(0)
    }
    /// The complete frames among the bytes the last [`drain`](Self::drain) discarded
    /// (a stream target; none by default).
    fn drained_frames(&mut self) -> Vec<Vec<u8>> {
        Vec::new()
    }
    /// Make one program or erase attempt on `region`. `accepted = false`: an attempt
    /// the device must refuse (flash controller locked); `true`: a valid, unlocked
    /// command (a program of all-ones bytes, which changes no data). Returns
    /// FLASH_STATUS right after the command, if the target can read it.
    fn attempt(
        &mut self,
        region: Region,
        kind: AttemptKind,
        accepted: bool,
    ) -> TResult<Option<u32>>;
    /// Reset the device.
    fn reset(&mut self, kind: ResetKind) -> TResult<()>;
    /// Issue an attempt (refused, or an accepted program) and cut power before
    /// anything else (no status read); the device comes back up. Default: the attempt,
    /// then a power cycle.
    fn attempt_then_cut(&mut self, region: Region, accepted: bool) -> TResult<()> {
        let kind = if accepted {
            AttemptKind::Program
        } else {
            AttemptKind::Erase
        };
        self.attempt(region, kind, accepted)?;
        self.reset(ResetKind::PowerCycle)
    }
    /// The counters as the in-band registers show them, if the target has them.
    fn inband(&mut self) -> Option<TResult<CounterReport>> {
        None
    }
    /// Write a BAR0 register, if the target allows it.
    fn write_register(&mut self, _offset: u32, _value: u32) -> Option<TResult<()>> {
        None
    }
}

/// Pass, fail, skip, not applicable, or could not be decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Holds.
    Pass,
    /// Violated.
    Fail,
    /// Not run (with the reason in the evidence): the result is INCOMPLETE.
    Skip,
    /// The target does not offer what the property compares (e.g. no in-band view).
    NotApplicable,
    /// The link to the device failed: no verdict on the property.
    Transport,
    /// The target could not carry out an action (a command failed).
    Error,
}

impl Status {
    /// Upper-case label.
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skip => "SKIPPED",
            Status::NotApplicable => "N/A",
            Status::Transport => "TRANSPORT",
            Status::Error => "ERROR",
        }
    }
}

/// The suite's overall verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overall {
    /// Every property that applies ran and held, over a clean link.
    Pass,
    /// At least one property was violated.
    Fail,
    /// No failure, but the link had faults (timeouts, duplicated, late or corrupt
    /// frames): the run proves nothing either way.
    Transport,
    /// No failure, but the target could not carry out an action.
    Error,
    /// No failure, but a property was skipped: not a pass.
    Incomplete,
}

impl Overall {
    /// Upper-case label.
    pub fn label(self) -> &'static str {
        match self {
            Overall::Pass => "PASS",
            Overall::Fail => "FAIL",
            Overall::Transport => "TRANSPORT",
            Overall::Error => "ERROR",
            Overall::Incomplete => "INCOMPLETE",
        }
    }
    /// Exit status of `hilrig counters conformance`: 0 pass, 1 fail, (2 usage),
    /// 3 incomplete, 4 transport, 5 target error.
    pub fn exit_code(self) -> u8 {
        match self {
            Overall::Pass => 0,
            Overall::Fail => 1,
            Overall::Incomplete => 3,
            Overall::Transport => 4,
            Overall::Error => 5,
        }
    }
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

/// Counts by status.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// Passed.
    pub passed: usize,
    /// Failed.
    pub failed: usize,
    /// Skipped.
    pub skipped: usize,
    /// Not applicable.
    pub not_applicable: usize,
    /// Transport faults.
    pub transport: usize,
    /// Target errors.
    pub error: usize,
}

/// The suite's report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Target name.
    pub target: String,
    /// Overall verdict.
    pub overall: Overall,
    /// Counts by status.
    pub counts: Counts,
    /// The budget plan (width, slots left, physical resets made to restore budget).
    pub plan: Vec<String>,
    /// Transport faults seen (retried requests, stale input drained).
    pub transport_faults: Vec<String>,
    /// One per property.
    pub results: Vec<PropertyResult>,
}

impl Report {
    /// The overall verdict is PASS.
    pub fn passed(&self) -> bool {
        self.overall == Overall::Pass
    }
    /// A property's result.
    pub fn get(&self, name: &str) -> Option<&PropertyResult> {
        self.results.iter().find(|r| r.name == name)
    }
    /// Readable text.
    pub fn text(&self) -> String {
        let mut s = format!("conformance of {}\n", self.target);
        for p in &self.plan {
            s.push_str(&format!("plan: {p}\n"));
        }
        for r in &self.results {
            s.push_str(&format!("{:<10} {}\n", r.status.label(), r.name));
            for e in &r.evidence {
                s.push_str(&format!("      {e}\n"));
            }
        }
        for t in self.transport_faults.iter().take(10) {
            s.push_str(&format!("transport fault: {t}\n"));
        }
        if self.transport_faults.len() > 10 {
            s.push_str(&format!(
                "... and {} more transport faults\n",
                self.transport_faults.len() - 10
            ));
        }
        let c = &self.counts;
        s.push_str(&format!(
            "{}: {} passed, {} failed, {} skipped, {} n/a, {} transport, {} error\n",
            self.overall.label(),
            c.passed,
            c.failed,
            c.skipped,
            c.not_applicable,
            c.transport,
            c.error
        ));
        s
    }
    /// JUnit XML: one testsuite, one testcase per property.
    pub fn junit(&self) -> String {
        let c = &self.counts;
        let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        s.push_str(&format!(
            "<testsuites><testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\">\n",
            xml(&format!("conformance {}", self.target)),
            self.results.len(),
            c.failed,
            c.transport + c.error,
            c.skipped + c.not_applicable
        ));
        for r in &self.results {
            let ev = xml(&r.evidence.join("\n"));
            s.push_str(&format!(
                "  <testcase classname=\"conformance\" name=\"{}\">",
                r.name
            ));
            match r.status {
                Status::Pass => s.push_str(&format!("<system-out>{ev}</system-out>")),
                Status::Fail => s.push_str(&format!(
                    "<failure message=\"property violated\">{ev}</failure>"
                )),
                Status::Skip | Status::NotApplicable => {
                    s.push_str(&format!("<skipped message=\"{ev}\"/>"))
                }
                Status::Transport => s.push_str(&format!(
                    "<error type=\"transport\" message=\"transport fault\">{ev}</error>"
                )),
                Status::Error => s.push_str(&format!(
                    "<error type=\"target\" message=\"target error\">{ev}</error>"
                )),
            }
            s.push_str("</testcase>\n");
        }
        s.push_str(&format!(
            "  <system-out>overall {}</system-out>\n</testsuite></testsuites>\n",
            self.overall.label()
        ));
        s
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Suite options.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Run the budget-and-fuse property: makes attempts until the fuse blows.
    pub burn_fuse: bool,
    /// The OOB physical-reset key: enables the physical-reset properties and lets the
    /// suite restore the budget between properties.
    pub reset_key: Option<[u8; 32]>,
}

/// Property names, in run order.
pub const PROPERTIES: &[&str] = &[
    "refused-attempts-counted",
    "refused-leaves-flash-unchanged",
    "accepted-attempts-counted",
    "count-before-act",
    "master",
    "persistence",
    "no-decrement",
    "oob-equals-inband",
    "budget-and-fuse",
    "physical-reset",
    "master-across-physical-reset",
];

/// Attempts per region (VBIOS, FIRMWARE, CONFIG) a property makes.
fn cost(name: &str) -> [u32; 3] {
    match name {
        "refused-attempts-counted" | "refused-leaves-flash-unchanged" | "count-before-act" => {
            [2, 2, 2]
        }
        "accepted-attempts-counted" => [1, 2, 2],
        "master" => [1, 1, 2],
        "persistence" => [1, 1, 1],
        "oob-equals-inband" => [1, 1, 1],
        _ => [0, 0, 0],
    }
}

/// The region hashes that only refused attempts may follow until
/// refused-leaves-flash-unchanged checks them. Taken before the suite's first attempt
/// and taken again after every physical reset the suite makes before that property
/// (the datasheet does not say a physical reset leaves the flash alone); just before
/// each such reset the flash is compared with the reference, so a refused attempt that
/// changed it is still caught.
struct Baseline {
    hashes: [[u8; 32]; 3],
    /// When the reference was taken.
    taken: String,
    /// Differences seen just before a physical reset, after refused attempts only.
    changed: Vec<String>,
}

/// The OOB requester of one run: fresh sequence numbers, drain, bounded retries.
struct Session<'a> {
    t: &'a mut dyn ConformanceTarget,
    seq: u8,
    faults: Vec<String>,
    /// The reference region hashes for refused-leaves-flash-unchanged, while it has
    /// not run yet (see [`Baseline`]).
    baseline: Option<Baseline>,
    /// The OOB physical-reset key, if given: restores the budget between attempts.
    key: Option<[u8; 32]>,
    /// The budget plan and the physical resets made to restore the budget.
    plan: Vec<String>,
    /// Every keyed physical reset the suite made: (MASTER before, MASTER after).
    resets: Vec<(u32, u32)>,
    /// The last request's sequence number and its reply frame.
    last_reply: Option<(u8, Vec<u8>)>,
}

impl Session<'_> {
    fn next_seq(&mut self) -> u8 {
        self.seq = self.seq.wrapping_add(1);
        if self.seq == 0 {
            self.seq = 1;
        }
        self.seq
    }

    fn drain(&mut self, what: &str) -> TResult<()> {
        let n = self.t.drain()?;
        if n > 0 {
            self.faults
                .push(format!("{n} stale bytes drained before {what}"));
        }
        // A second, intact reply to the last request that says something else.
        // Never a PASS; not a device fault either: a request the link delivered
        // twice is answered twice, before and after what the suite did in between
        // (a transport fault is never a device fault, DESIGN §6).
        let last = self.last_reply.take();
        if let Some((seq, reply)) = &last {
            for f in self.t.drained_frames() {
                if f != *reply && matches!(oob::parse_frame(&f), Ok((q, _, _)) if q == *seq) {
                    return Err(TargetError::Transport(format!(
                        "the request with sequence {seq} was answered twice, differently (a device answering twice, or a request the link delivered twice): {reply:02x?}, then {f:02x?}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// One request; error frames are returned as `Response::Error`.
    fn raw_request(&mut self, cmd: u8, payload: &[u8], what: &str) -> TResult<Response> {
        let mut last = String::new();
        for attempt in 1..=RETRIES {
            self.drain(what)?;
            let seq = self.next_seq();
            let f = oob::frame(seq, cmd, payload);
            let out = match self.t.oob_raw(&f) {
                Ok(o) => o,
                Err(TargetError::Transport(e)) => {
                    last = e;
                    self.faults
                        .push(format!("{what} (try {attempt}/{RETRIES}): {last}"));
                    continue;
                }
                Err(e) => return Err(e),
            };
            match oob::decode_response(&out) {
                // The device saw this request corrupted (a frame the suite built
                // has a good CRC and sync): the link's fault, asked again.
                Ok((
                    s,
                    Response::Error {
                        code: code @ (ErrorCode::BadCrc | ErrorCode::BadSync),
                        ..
                    },
                )) if s == seq => {
                    last = format!("the device received the request corrupted ({code:?})");
                }
                Ok((s, resp)) if s == seq => {
                    self.last_reply = Some((seq, out));
                    return Ok(resp);
                }
                Ok((s, _)) => last = format!("reply with sequence {s} to request {seq}"),
                // Framing and CRC hold, the sequence is this request's: the device
                // built this reply, the link delivered it intact.
                Err(e) if matches!(oob::parse_frame(&out), Ok((s, _, _)) if s == seq) => {
                    return Err(TargetError::Device(format!(
                        "{what}: an intact reply that does not decode {out:02x?}: {e}"
                    )))
                }
                Err(e) => last = format!("corrupt reply {out:02x?}: {e}"),
            }
            self.faults
                .push(format!("{what} (try {attempt}/{RETRIES}): {last}"));
        }
        Err(TargetError::Transport(format!(
            "{what}: no good reply in {RETRIES} tries; last: {last}"
        )))
    }

    fn request(&mut self, req: &Request) -> TResult<Response> {
        let f = oob::encode_request(0, req);
        let what = match req {
            Request::Identify => "IDENTIFY",
            Request::ReadCounters => "READ_COUNTERS",
            Request::ReadHash(_) => "READ_HASH",
            Request::PhysicalReset(_) => "PHYSICAL_RESET",
        };
        // payload sits between the 4-byte header and the 2-byte CRC
        self.raw_request(f[3], &f[4..f.len() - 2], what)
    }

    fn counters(&mut self) -> TResult<CounterReport> {
        match self.request(&Request::ReadCounters)? {
            Response::Counters(c) => Ok(c),
            other @ Response::Error { .. } => Err(TargetError::Target(format!(
                "READ_COUNTERS answered {other:?}"
            ))),
            other => Err(TargetError::Device(format!(
                "READ_COUNTERS answered {other:?}"
            ))),
        }
    }

    fn hash(&mut self, r: Region) -> TResult<[u8; 32]> {
        match self.request(&Request::ReadHash(r))? {
            Response::Hash { sha256, region } if region == r => Ok(sha256),
            other @ Response::Error { .. } => Err(TargetError::Target(format!(
                "READ_HASH {r} answered {other:?}"
            ))),
            other => Err(TargetError::Device(format!(
                "READ_HASH {r} answered {other:?}"
            ))),
        }
    }

    /// A PHYSICAL_RESET. BUSY (the device cannot act now; nothing changed) is asked
    /// again after [`BUSY_WAIT`], at most [`BUSY_TRIES`] times in all: a device that
    /// stays busy is a target error, not a property violation.
    fn physical_reset(&mut self, key: [u8; 32]) -> TResult<Response> {
        for _ in 1..BUSY_TRIES {
            match self.request(&Request::PhysicalReset(key))? {
                Response::Error {
                    code: ErrorCode::Busy,
                    ..
                } => std::thread::sleep(BUSY_WAIT),
                other => return Ok(other),
            }
        }
        match self.request(&Request::PhysicalReset(key))? {
            Response::Error {
                code: ErrorCode::Busy,
                ..
            } => Err(TargetError::Target(format!(
                "PHYSICAL_RESET: the device answered BUSY {BUSY_TRIES} times, {BUSY_WAIT:?} apart"
            ))),
            other => Ok(other),
        }
    }

    /// The region hashes (VBIOS, FIRMWARE, CONFIG).
    fn hashes(&mut self) -> TResult<[[u8; 32]; 3]> {
        let mut h = [[0u8; 32]; 3];
        for (x, r) in h.iter_mut().zip(Region::ALL) {
            *x = self.hash(r)?;
        }
        Ok(h)
    }

    /// The counters before property `name` makes one attempt on `region`: if the
    /// attempt would not fit the budget (fuse blown, or the region's counter at the
    /// width), read after a keyed physical reset that restores it, when the suite has
    /// the key; `Err(why)` if there is no room.
    fn room_for(&mut self, name: &str, region: Region) -> TResult<Result<CounterReport, String>> {
        let c = self.counters()?;
        if room_for_one(&c, region) {
            return Ok(Ok(c));
        }
        let Some(key) = self.key else {
            return Ok(Err(format!(
                "no room for an attempt on {region} below the end of the budget: {}; give --reset-key-file or --reset-key-from-service to let the suite restore it",
                show(&c)
            )));
        };
        let at = format!("the physical reset before {name}'s attempt on {region}");
        // Refused attempts only since the reference hashes: compare before the
        // reset, take the reference again after it.
        if let Some(reference) = self.baseline.as_ref().map(|b| b.hashes) {
            let now = self.hashes()?;
            if let Some(b) = &mut self.baseline {
                for ((r, x), y) in Region::ALL.iter().zip(&reference).zip(&now) {
                    if x != y {
                        b.changed.push(format!(
                            "{r}: READ_HASH {} {}, {} just before {at}, after refused attempts only",
                            oob::hex_string(&x[..8]),
                            b.taken,
                            oob::hex_string(&y[..8])
                        ));
                    }
                }
            }
        }
        let (_, resp, after) = self.keyed_reset(key)?;
        self.plan.push(format!(
            "{name}: physical reset before an attempt on {region} ({resp:?}): {} -> {}",
            show(&c),
            show(&after)
        ));
        if self.baseline.is_some() {
            let hashes = self.hashes()?;
            if let Some(b) = &mut self.baseline {
                b.hashes = hashes;
                b.taken = format!("after {at}");
            }
        }
        if room_for_one(&after, region) {
            Ok(Ok(after))
        } else {
            Ok(Err(format!(
                "the budget did not come back after a keyed physical reset: {}",
                show(&after)
            )))
        }
    }

    /// A keyed physical reset, with MASTER read around it (for
    /// master-across-physical-reset).
    fn keyed_reset(&mut self, key: [u8; 32]) -> TResult<(CounterReport, Response, CounterReport)> {
        let a = self.counters()?;
        let resp = self.physical_reset(key)?;
        let b = self.counters()?;
        if matches!(resp, Response::ResetDone { .. }) {
            self.resets.push((a.master, b.master));
        }
        Ok((a, resp, b))
    }
}

fn show(c: &CounterReport) -> String {
    format!(
        "counters {:?} master {} fuse {} slots {} epoch {}",
        c.counters, c.master, c.fuse as u8, c.slots_left, c.epoch
    )
}

/// A counting check that did not hold (what was seen).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Mismatch(String);

/// Check that exactly one attempt on `region` was counted between `a` and `b`.
fn one_counted(a: &CounterReport, b: &CounterReport, region: Region) -> Result<(), Mismatch> {
    let i = region as usize;
    let mut want = a.counters;
    want[i] = want[i].wrapping_add(1);
    // The datasheet: the fuse blows when a counter reaches the end of the budget (the
    // attempt that fills the last slot), and only a physical reset clears it, with the
    // counters; so it is blown exactly when a counter is at the width.
    let w = b.width as u32;
    let fuse = b.counters.iter().any(|&x| x >= w);
    if a.counters[i] == u32::MAX
        || a.master == u32::MAX
        || b.counters != want
        || b.master != a.master.wrapping_add(1)
        || b.width != a.width
        || b.fuse != fuse
    {
        return Err(Mismatch(format!(
            "{region}: before {}, after {}; want {region} +1 and master +1, and the fuse blown exactly when a counter is at the width {w}",
            show(a),
            show(b)
        )));
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

/// A property's outcome: Ok(evidence) holds, Err(evidence) violated.
type Prop = Result<Vec<String>, Vec<String>>;

enum Outcome {
    Ran(Prop),
    Skip(String),
    NotApplicable(String),
}

fn verdict(ev: Vec<String>, bad: Vec<String>) -> Outcome {
    Outcome::Ran(if bad.is_empty() { Ok(ev) } else { Err(bad) })
}

/// A property that could not make its next attempt (`why`): FAIL if it has already
/// seen a violation, else SKIPPED.
fn cut_short(mut bad: Vec<String>, why: String) -> Outcome {
    if bad.is_empty() {
        Outcome::Skip(why)
    } else {
        bad.push(format!("then stopped: {why}"));
        Outcome::Ran(Err(bad))
    }
}

/// Whether one more attempt on `region` fits the budget: the fuse intact and the
/// region's counter below the width (the attempt may fill the last slot).
fn room_for_one(c: &CounterReport, region: Region) -> bool {
    !c.fuse && c.counters[region as usize] < c.width as u32 && c.slots_left > 0
}

/// Run the suite.
pub fn run(t: &mut dyn ConformanceTarget, opts: &Options) -> Report {
    let target = t.name();
    let mut s = Session {
        t,
        seq: 0,
        faults: Vec::new(),
        baseline: None,
        key: opts.reset_key,
        plan: Vec::new(),
        resets: Vec::new(),
        last_reply: None,
    };
    let mut results = Vec::new();
    // Read the device's width and budget first.
    let start = s.counters();
    match &start {
        Ok(c) => {
            let total: u32 = PROPERTIES
                .iter()
                .filter(|p| wanted(p, opts))
                .map(|p| cost(p).iter().max().copied().unwrap_or(0))
                .sum();
            s.plan.push(format!(
                "width {}, slots left {}, fuse {}; the planned properties need up to {total} attempts per region{}",
                c.width,
                c.slots_left,
                c.fuse as u8,
                match (total <= c.slots_left, opts.reset_key.is_some()) {
                    (true, _) => "",
                    (false, true) => ": the keyed physical reset restores the budget whenever the next attempt would not fit",
                    (false, false) => ": properties that do not fit are skipped (give --reset-key-file or --reset-key-from-service to restore the budget)",
                }
            ));
        }
        Err(e) => s
            .plan
            .push(format!("could not read the device's budget: {e}")),
    }
    // The flash before any attempt: only refused attempts come before
    // refused-leaves-flash-unchanged, so the flash must still hash the same there.
    s.baseline = s.hashes().ok().map(|hashes| Baseline {
        hashes,
        taken: "before the suite's first (refused) attempt".into(),
        changed: Vec::new(),
    });
    for &name in PROPERTIES {
        let r = run_one(&mut s, name, opts);
        let (status, mut evidence) = match r {
            Ok(Outcome::Ran(Ok(ev))) => (Status::Pass, ev),
            Ok(Outcome::Ran(Err(ev))) => (Status::Fail, ev),
            Ok(Outcome::Skip(why)) => (Status::Skip, vec![format!("skipped: {why}")]),
            Ok(Outcome::NotApplicable(why)) => (Status::NotApplicable, vec![why]),
            Err(TargetError::Transport(e)) => (Status::Transport, vec![format!("transport: {e}")]),
            Err(TargetError::Target(e)) => (Status::Error, vec![format!("target error: {e}")]),
            Err(TargetError::Device(e)) => (Status::Fail, vec![format!("device: {e}")]),
        };
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
    let n = |st| results.iter().filter(|r| r.status == st).count();
    let counts = Counts {
        passed: n(Status::Pass),
        failed: n(Status::Fail),
        skipped: n(Status::Skip),
        not_applicable: n(Status::NotApplicable),
        transport: n(Status::Transport),
        error: n(Status::Error),
    };
    let faults = std::mem::take(&mut s.faults);
    let plan = std::mem::take(&mut s.plan);
    let overall = if counts.failed > 0 {
        Overall::Fail
    } else if counts.transport > 0 || !faults.is_empty() {
        Overall::Transport
    } else if counts.error > 0 {
        Overall::Error
    } else if counts.skipped > 0 {
        Overall::Incomplete
    } else {
        Overall::Pass
    };
    Report {
        target,
        overall,
        counts,
        plan,
        transport_faults: faults,
        results,
    }
}

fn wanted(name: &str, opts: &Options) -> bool {
    match name {
        "budget-and-fuse" => opts.burn_fuse,
        "physical-reset" | "master-across-physical-reset" => opts.reset_key.is_some(),
        _ => true,
    }
}

/// Without the reset key a property runs only if all its attempts fit below the fuse
/// as the device stands: the reason it cannot, if not.
fn fits_without_key(s: &mut Session, name: &str) -> TResult<Option<String>> {
    let need = cost(name);
    let c = s.counters()?;
    let w = c.width as u32;
    if !c.fuse
        && (0..3).all(|i| c.counters[i].saturating_add(need[i]) < w)
        && need.iter().max().copied().unwrap_or(0) <= c.slots_left
    {
        return Ok(None);
    }
    Ok(Some(format!(
        "needs {need:?} attempts (vbios, firmware, config) below the fuse; the device has {} of width {w}, fuse {}, slots left {}; give --reset-key-file or --reset-key-from-service to let the suite restore the budget",
        format_args!("{:?}", c.counters),
        c.fuse as u8,
        c.slots_left
    )))
}

fn run_one(s: &mut Session, name: &str, opts: &Options) -> TResult<Outcome> {
    match name {
        "budget-and-fuse" if !opts.burn_fuse => {
            return Ok(Outcome::Skip(
                "pass --burn-fuse (uses up the budget; the reset key recovers the device)".into(),
            ))
        }
        "physical-reset" | "master-across-physical-reset" if opts.reset_key.is_none() => {
            return Ok(Outcome::Skip(
                "no reset key given (--reset-key-file or --reset-key-from-service)".into(),
            ))
        }
        _ => {}
    }
    if name == "oob-equals-inband" && s.t.inband().is_none() {
        return Ok(Outcome::NotApplicable(
            "the target has no in-band register view".into(),
        ));
    }
    // With the key, every attempt makes its own room (Session::room_for).
    if s.key.is_none() && cost(name) != [0, 0, 0] {
        if let Some(why) = fits_without_key(s, name)? {
            return Ok(Outcome::Skip(why));
        }
    }
    match name {
        "refused-attempts-counted" => p_attempts(s, name, false),
        "refused-leaves-flash-unchanged" => p_refused_unchanged(s, name),
        "accepted-attempts-counted" => p_attempts(s, name, true),
        "count-before-act" => p_before_act(s, name),
        "master" => p_master(s, name),
        "persistence" => p_persistence(s, name),
        "no-decrement" => p_no_decrement(s, opts),
        "oob-equals-inband" => p_inband(s, name),
        "budget-and-fuse" => p_fuse(s, opts),
        "physical-reset" => p_physical_reset(s, opts),
        "master-across-physical-reset" => p_master_reset(s, opts),
        other => Err(TargetError::Target(format!("unknown property {other}"))),
    }
}

fn p_attempts(s: &mut Session, name: &str, accepted: bool) -> TResult<Outcome> {
    let mut ev = Vec::new();
    let mut bad = Vec::new();
    let label = if accepted { "accepted" } else { "refused" };
    for r in Region::ALL {
        for k in [AttemptKind::Erase, AttemptKind::Program] {
            if accepted && k == AttemptKind::Erase && r == Region::Vbios {
                // Keep the VBIOS (expansion ROM) intact: a program of all-ones suffices.
                continue;
            }
            let a = match s.room_for(name, r)? {
                Ok(a) => a,
                Err(why) => return Ok(cut_short(bad, why)),
            };
            s.t.attempt(r, k, accepted)?;
            let b = s.counters()?;
            match one_counted(&a, &b, r) {
                Ok(()) => ev.push(format!(
                    "{label} {} {r}: {} -> {}",
                    k.name(),
                    a.counters[r as usize],
                    b.counters[r as usize]
                )),
                Err(e) => bad.push(format!("{label} {} not counted: {e}", k.name())),
            }
        }
    }
    Ok(verdict(ev, bad))
}

fn p_refused_unchanged(s: &mut Session, name: &str) -> TResult<Outcome> {
    let mut ev = Vec::new();
    let mut bad = Vec::new();
    // The reference is closed here: from now on each attempt is checked on its own.
    if let Some(base) = s.baseline.take() {
        bad.extend(base.changed);
        for (b, r) in base.hashes.iter().zip(Region::ALL) {
            let now = s.hash(r)?;
            if &now != b {
                bad.push(format!(
                    "{r}: READ_HASH {} {}, {} now, after refused attempts only",
                    oob::hex_string(&b[..8]),
                    base.taken,
                    oob::hex_string(&now[..8])
                ));
            }
        }
        if bad.is_empty() {
            ev.push(format!(
                "every region hashes as {}, after the refused attempts of refused-attempts-counted",
                base.taken
            ));
        }
    }
    for r in Region::ALL {
        for k in [AttemptKind::Erase, AttemptKind::Program] {
            if let Err(why) = s.room_for(name, r)? {
                return Ok(cut_short(bad, why));
            }
            let before = s.hash(r)?;
            let status = s.t.attempt(r, k, false)?;
            let after = s.hash(r)?;
            // Read it twice: a device whose READ_HASH is not a function of the flash
            // contents shows here too.
            let again = s.hash(r)?;
            if before != after || after != again {
                bad.push(format!(
                    "refused {} {r} changed what READ_HASH reports: {} -> {} -> {}",
                    k.name(),
                    oob::hex_string(&before[..8]),
                    oob::hex_string(&after[..8]),
                    oob::hex_string(&again[..8])
                ));
            }
            match status {
                Some(st)
                    if st & FLASH_STATUS_DONE != 0
                        || st & (FLASH_STATUS_REFUSED_LOCKED | FLASH_STATUS_REFUSED_FUSE) == 0 =>
                {
                    bad.push(format!(
                        "refused {} {r}: FLASH_STATUS {st:#x} does not say refused",
                        k.name()
                    ))
                }
                Some(st) => ev.push(format!(
                    "refused {} {r}: FLASH_STATUS {st:#x}, hash unchanged",
                    k.name()
                )),
                None => ev.push(format!(
                    "refused {} {r}: hash unchanged (FLASH_STATUS not readable on this target)",
                    k.name()
                )),
            }
        }
    }
    Ok(verdict(ev, bad))
}

fn p_before_act(s: &mut Session, name: &str) -> TResult<Outcome> {
    let mut ev = Vec::new();
    let mut bad = Vec::new();
    for accepted in [false, true] {
        let label = if accepted {
            "accepted program"
        } else {
            "refused erase"
        };
        for r in Region::ALL {
            let a = match s.room_for(name, r)? {
                Ok(a) => a,
                Err(why) => return Ok(cut_short(bad, why)),
            };
            s.t.attempt_then_cut(r, accepted)?;
            let b = s.counters()?;
            match one_counted(&a, &b, r) {
                Ok(()) => ev.push(format!(
                    "{label} {r} then power cut: count {} -> {} survived",
                    a.counters[r as usize], b.counters[r as usize]
                )),
                Err(e) => bad.push(format!("{label} cut by a power loss was lost: {e}")),
            }
        }
    }
    Ok(verdict(ev, bad))
}

fn p_master(s: &mut Session, name: &str) -> TResult<Outcome> {
    let plan = [
        (Region::Config, AttemptKind::Erase, false),
        (Region::Firmware, AttemptKind::Program, false),
        (Region::Vbios, AttemptKind::Program, true),
        (Region::Config, AttemptKind::Program, true),
    ];
    let mut ev = Vec::new();
    let mut bad = Vec::new();
    // Summed over the attempts (a physical reset between two of them clears the
    // region counters; MASTER it keeps, which master-across-physical-reset checks).
    let (mut region_delta, mut master_delta) = (0i64, 0i64);
    for (r, k, acc) in plan {
        let prev = match s.room_for(name, r)? {
            Ok(a) => a,
            Err(why) => return Ok(cut_short(bad, why)),
        };
        s.t.attempt(r, k, acc)?;
        let c = s.counters()?;
        let d = c.master as i64 - prev.master as i64;
        region_delta += (0..3)
            .map(|i| c.counters[i] as i64 - prev.counters[i] as i64)
            .sum::<i64>();
        master_delta += d;
        let what = format!(
            "{} {} {r}",
            if acc { "accepted" } else { "refused" },
            k.name()
        );
        if d != 1 {
            bad.push(format!(
                "{what}: master {} -> {} (want +1)",
                prev.master, c.master
            ));
        } else {
            ev.push(format!("{what}: master {} -> {}", prev.master, c.master));
        }
    }
    let line = format!("4 attempts: region deltas sum {region_delta}, master delta {master_delta}");
    if region_delta != 4 || master_delta != 4 {
        bad.push(line);
    } else {
        ev.push(line);
    }
    Ok(verdict(ev, bad))
}

fn p_persistence(s: &mut Session, name: &str) -> TResult<Outcome> {
    let mut ev = Vec::new();
    let mut bad = Vec::new();
    for (kind, r) in [
        (ResetKind::Reset, Region::Vbios),
        (ResetKind::Flr, Region::Firmware),
        (ResetKind::PowerCycle, Region::Config),
    ] {
        if let Err(why) = s.room_for(name, r)? {
            return Ok(cut_short(bad, why));
        }
        s.t.attempt(r, AttemptKind::Erase, false)?;
        let a = s.counters()?;
        s.t.reset(kind)?;
        let b = s.counters()?;
        if a == b {
            ev.push(format!("{kind:?}: {} kept", show(&b)));
        } else {
            bad.push(format!("{kind:?}: {} -> {}", show(&a), show(&b)));
        }
    }
    Ok(verdict(ev, bad))
}

fn p_no_decrement(s: &mut Session, opts: &Options) -> TResult<Outcome> {
    let mut ev = Vec::new();
    let mut bad = Vec::new();
    let start = s.counters()?;
    let mut writes = 0;
    let check = |s: &mut Session, what: &str, bad: &mut Vec<String>| -> TResult<()> {
        let now = s.counters()?;
        if let Some(e) = never_lower(&start, &now) {
            bad.push(format!("after {what}: {e}"));
        }
        Ok(())
    };
    // Every word of the counters page, with values that would clear or lower them.
    let mut supported = true;
    'outer: for off in (0x2000u32..0x2040).step_by(4) {
        for v in [0u32, 1, 0xffff_ffff, 0x8000_0000] {
            match s.t.write_register(off, v) {
                None => {
                    supported = false;
                    break 'outer;
                }
                Some(r) => r?,
            }
            writes += 1;
        }
        check(s, &format!("writes to BAR0+{off:#x}"), &mut bad)?;
    }
    if supported {
        for (off, v, what) in [
            (Reg::SoftReset.offset(), SOFT_RESET_MAGIC, "soft reset"),
            (Reg::HangTrigger.offset(), HANG_MAGIC, "hang trigger"),
        ] {
            if let Some(r) = s.t.write_register(off, v) {
                r?;
                writes += 1;
            }
            check(s, what, &mut bad)?;
        }
        s.t.reset(ResetKind::Flr)?;
        ev.push(format!(
            "{writes} register writes (counters page, soft reset, hang)"
        ));
    } else {
        ev.push("the target offers no register writes: OOB only".into());
    }
    // OOB: a wrong physical-reset key.
    let wrong = match opts.reset_key {
        Some(k) => {
            let mut w = k;
            w[0] ^= 1;
            w
        }
        None => [0u8; 32],
    };
    match s.physical_reset(wrong)? {
        Response::Error {
            code: ErrorCode::BadKey,
            ..
        } => ev.push("physical reset with a wrong key refused".into()),
        other => bad.push(format!(
            "physical reset with a wrong key answered {other:?}"
        )),
    }
    check(s, "a wrong-key physical reset", &mut bad)?;
    // Well-framed bad requests must get error frames (with their sequence number).
    for (cmd, payload, what) in [
        (0x7fu8, &[][..], "unknown command"),
        (oob::cmd::READ_HASH, &[9u8][..], "READ_HASH of region 9"),
        (oob::cmd::READ_HASH, &[0u8, 0][..], "READ_HASH with 2 bytes"),
        (
            oob::cmd::READ_COUNTERS,
            &[1u8, 2, 3][..],
            "READ_COUNTERS with a payload",
        ),
        (
            oob::cmd::PHYSICAL_RESET,
            &[0u8; 31][..],
            "PHYSICAL_RESET with 31 bytes",
        ),
    ] {
        match s.raw_request(cmd, payload, what)? {
            Response::Error { .. } => {}
            other => bad.push(format!("{what} answered {other:?}, not an error frame")),
        }
    }
    // Garbage: a frame with a bad CRC, one announcing an oversized payload, random
    // bytes. Not every one has an answer (a serial line skips bytes before a SYNC),
    // but the device must keep answering and lower nothing.
    let mut badcrc = oob::encode_request(0x44, &Request::ReadCounters);
    badcrc[4] ^= 0xff;
    let mut garbage: Vec<Vec<u8>> = vec![badcrc, vec![0xA5, 0xff, 0, 4], vec![0x00, 0x13]];
    let mut x = 0x1234_5678u32;
    for _ in 0..20 {
        let len = 1 + (x % 40) as usize;
        let mut f = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            f.push(x as u8);
        }
        // Keep a SYNC out of it, so no half frame waits for more bytes.
        f.iter_mut().for_each(|b| {
            if *b == oob::SYNC {
                *b = 0
            }
        });
        garbage.push(f);
    }
    for g in &garbage {
        s.t.oob_send(g)?;
    }
    let garbage_bytes: usize = garbage.iter().map(Vec::len).sum();
    // Answers to garbage are not stale replies to a request: skip them up to the
    // reply to a marker request (a slow device answers a cut frame only after its
    // inter-byte timeout, and a simulated one takes its time over the bytes).
    let marker = s.next_seq();
    s.t.oob_send(&oob::frame(marker, oob::cmd::IDENTIFY, &[]))?;
    let mut skipped = 0;
    // The marker's reply by its sequence number AND its kind: an error frame that
    // answers garbage may carry any sequence byte, the marker's included.
    while let Some(f) = s.t.oob_read()? {
        if matches!(oob::decode_response(&f), Ok((q, Response::Identity { .. })) if q == marker) {
            break;
        }
        skipped += 1;
        // A device may answer every garbage byte with its own BAD_SYNC error frame.
        if skipped > garbage_bytes + 4 * garbage.len() + 8 {
            return Err(TargetError::Transport(format!(
                "{skipped} frames after the garbage and no reply to the marker request"
            )));
        }
    }
    for r in [
        Request::Identify,
        Request::ReadCounters,
        Request::ReadHash(Region::Config),
    ] {
        if let Response::Error { code, .. } = s.request(&r)? {
            bad.push(format!("{r:?} after garbage answered error {code:?}"))
        }
    }
    check(s, "malformed and read-only OOB frames", &mut bad)?;
    ev.push(format!(
        "5 bad requests answered with error frames; {} garbage frames, then the read requests: counters never lower ({})",
        garbage.len(),
        show(&start)
    ));
    Ok(verdict(ev, bad))
}

fn p_inband(s: &mut Session, name: &str) -> TResult<Outcome> {
    let Some(ib) = s.t.inband() else {
        return Ok(Outcome::NotApplicable(
            "the target has no in-band register view".into(),
        ));
    };
    let mut ev = Vec::new();
    let mut bad = Vec::new();
    let mut first = Some(ib);
    // At rest, then after a refused attempt on each region: in-band registers that
    // only catch up at a reset agree at rest and lag after an attempt.
    for step in [
        None,
        Some(Region::Vbios),
        Some(Region::Firmware),
        Some(Region::Config),
    ] {
        if let Some(r) = step {
            if let Err(why) = s.room_for(name, r)? {
                return Ok(cut_short(bad, why));
            }
            s.t.attempt(r, AttemptKind::Erase, false)?;
        }
        let what = match step {
            None => "at rest".to_string(),
            Some(r) => format!("after a refused erase of {r}"),
        };
        let ib = match first.take() {
            Some(x) => x?,
            None => match s.t.inband() {
                Some(x) => x?,
                None => break,
            },
        };
        let o = s.counters()?;
        let ib2 = match s.t.inband() {
            Some(x) => x?,
            None => ib,
        };
        let line = format!("{what}: OOB {} / in-band {}", show(&o), show(&ib));
        if ib == o && ib2 == o {
            ev.push(line);
        } else {
            bad.push(line);
        }
    }
    Ok(verdict(ev, bad))
}

fn p_fuse(s: &mut Session, opts: &Options) -> TResult<Outcome> {
    let mut ev = Vec::new();
    let mut bad = Vec::new();
    let r = Region::Config;
    let mut start = s.counters()?;
    if start.fuse || start.counters != [0, 0, 0] {
        if let Some(key) = opts.reset_key {
            let (_, resp, after) = s.keyed_reset(key)?;
            s.plan.push(format!(
                "before budget-and-fuse: physical reset to start from an empty budget ({resp:?}): {} -> {}",
                show(&start),
                show(&after)
            ));
            start = after;
        }
    }
    if start.fuse {
        return Ok(Outcome::Skip(format!(
            "the fuse is already blown and no reset key was given: {}",
            show(&start)
        )));
    }
    let w = start.width as u32;
    let mut prev = start;
    let mut n = 0;
    // At most WIDTH attempts reach the end of a region's budget; two more to see a
    // counter that wraps or a fuse that never blows.
    let limit = w.saturating_sub(start.counters[r as usize]) + 2;
    while !prev.fuse && n < limit {
        s.t.attempt(r, AttemptKind::Erase, false)?;
        n += 1;
        let c = s.counters()?;
        if let Err(e) = one_counted(&prev, &c, r) {
            bad.push(format!("attempt {n}: {e}"));
        }
        if let Some(e) = never_lower(&prev, &c) {
            bad.push(format!("attempt {n}: counter wrapped: {e}"));
        }
        let want_slots = w.saturating_sub(c.counters.iter().max().copied().unwrap_or(0));
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
                c.fuse as u8, c.counters
            ));
        }
        prev = c;
    }
    if !prev.fuse {
        bad.push(format!(
            "the fuse never blew after {n} attempts on {r} (width {w}): {}",
            show(&prev)
        ));
        return Ok(verdict(ev, bad));
    }
    ev.push(format!("fuse blew after {n} attempts: {}", show(&prev)));
    // Blown: every further command refused, counters saturated, no data changes.
    let h = s.hash(Region::Firmware)?;
    let mut statuses = vec![(
        Region::Firmware,
        s.t.attempt(Region::Firmware, AttemptKind::Erase, true)?,
    )];
    for _ in 0..2 {
        statuses.push((r, s.t.attempt(r, AttemptKind::Erase, true)?));
    }
    // A blank region does not change when erased: FLASH_STATUS, where the target
    // reads it, must say the fuse refused the command.
    for (region, st) in statuses {
        if let Some(st) = st {
            if st & FLASH_STATUS_DONE != 0 || st & FLASH_STATUS_REFUSED_FUSE == 0 {
                bad.push(format!(
                    "unlocked erase of {region} with the fuse blown: FLASH_STATUS {st:#x} does not say refused by the fuse"
                ));
            }
        }
    }
    let after = s.counters()?;
    let h2 = s.hash(Region::Firmware)?;
    if h != h2 {
        bad.push("an unlocked erase changed the firmware region with the fuse blown".into());
    } else {
        ev.push("unlocked erase with the fuse blown: refused, region unchanged".into());
    }
    if after.counters[r as usize] != w || !after.fuse || after.slots_left != 0 {
        bad.push(format!(
            "saturation: after the fuse blew and 2 more attempts: {} (want {r} at {w}, fuse 1, slots 0)",
            show(&after)
        ));
    } else {
        ev.push(format!("{r} saturates at its width {w}: no wrap"));
    }
    if prev.counters[Region::Firmware as usize] < w
        && after.counters[Region::Firmware as usize]
            != prev.counters[Region::Firmware as usize].wrapping_add(1)
    {
        bad.push(format!(
            "a firmware attempt with the fuse blown was not counted: {} -> {}",
            show(&prev),
            show(&after)
        ));
    }
    s.t.reset(ResetKind::PowerCycle)?;
    let pc = s.counters()?;
    if !pc.fuse {
        bad.push(format!("fuse cleared by a power cycle: {}", show(&pc)));
    } else {
        ev.push("fuse survives a power cycle".into());
    }
    Ok(verdict(ev, bad))
}

fn p_physical_reset(s: &mut Session, opts: &Options) -> TResult<Outcome> {
    let Some(key) = opts.reset_key else {
        return Ok(Outcome::Skip("no reset key given".into()));
    };
    let (a, resp, b) = s.keyed_reset(key)?;
    let ev = vec![format!("{:?}: {} -> {}", resp, show(&a), show(&b))];
    let ok = matches!(resp, Response::ResetDone { epoch } if epoch == a.epoch.wrapping_add(1))
        && b.epoch == a.epoch.wrapping_add(1)
        && b.counters == [0, 0, 0]
        && !b.fuse
        && b.master == a.master
        && b.slots_left == b.width as u32;
    Ok(Outcome::Ran(if ok { Ok(ev) } else { Err(ev) }))
}

/// MASTER is kept across a physical reset (the counters are cleared, MASTER is not),
/// survives a power cycle after it, and keeps counting from where it was.
fn p_master_reset(s: &mut Session, opts: &Options) -> TResult<Outcome> {
    let Some(key) = opts.reset_key else {
        return Ok(Outcome::Skip("no reset key given".into()));
    };
    let mut ev = Vec::new();
    let mut bad = Vec::new();
    let (a, resp, _) = s.keyed_reset(key)?;
    if !matches!(resp, Response::ResetDone { .. }) {
        bad.push(format!(
            "physical reset with the right key answered {resp:?}"
        ));
        return Ok(verdict(ev, bad));
    }
    s.t.reset(ResetKind::PowerCycle)?;
    let b = s.counters()?;
    if b.master != a.master {
        bad.push(format!(
            "MASTER {} -> {} across a physical reset and power cycle (want kept)",
            a.master, b.master
        ));
    } else {
        ev.push(format!(
            "MASTER {} kept across a physical reset and power cycle",
            b.master
        ));
    }
    s.t.attempt(Region::Config, AttemptKind::Erase, false)?;
    let c = s.counters()?;
    match one_counted(&b, &c, Region::Config) {
        Ok(()) => ev.push(format!(
            "after the reset an attempt counts on: master {} -> {}",
            b.master, c.master
        )),
        Err(e) => bad.push(format!("an attempt after the physical reset: {e}")),
    }
    let lost: Vec<_> = s.resets.iter().filter(|(x, y)| x != y).collect();
    if lost.is_empty() {
        ev.push(format!(
            "MASTER kept across all {} keyed physical resets of the run",
            s.resets.len()
        ));
    } else {
        bad.push(format!(
            "MASTER changed across {} of the run's {} keyed physical resets (before, after): {lost:?}",
            lost.len(),
            s.resets.len()
        ));
    }
    Ok(verdict(ev, bad))
}

/// Makes attempts and resets on a device whose OOB port the suite reads separately.
pub trait Actuator {
    /// See [`ConformanceTarget::attempt`].
    fn attempt(
        &mut self,
        region: Region,
        kind: AttemptKind,
        accepted: bool,
    ) -> TResult<Option<u32>>;
    /// See [`ConformanceTarget::reset`].
    fn reset(&mut self, kind: ResetKind) -> TResult<()>;
    /// See [`ConformanceTarget::attempt_then_cut`].
    fn attempt_then_cut(&mut self, region: Region, accepted: bool) -> TResult<()>;
    /// See [`ConformanceTarget::inband`].
    fn inband(&mut self) -> Option<TResult<CounterReport>> {
        None
    }
    /// See [`ConformanceTarget::write_register`].
    fn write_register(&mut self, _offset: u32, _value: u32) -> Option<TResult<()>> {
        None
    }
}

/// Make one attempt on an in-process device (see [`ConformanceTarget::attempt`]);
/// returns FLASH_STATUS after the command.
pub fn device_attempt(
    d: &mut dyn Device,
    region: Region,
    kind: AttemptKind,
    accepted: bool,
) -> Result<u32, DeviceError> {
    if accepted {
        ops::unlock(d)?;
    } else {
        d.write32(Reg::FlashCmd.offset(), FLASH_CMD_LOCK)?;
    }
    let r = match kind {
        AttemptKind::Erase => ops::erase(d, region)?,
        AttemptKind::Program => ops::program(d, region, 0, 0, &[0xff; 8])?,
    };
    d.write32(Reg::FlashCmd.offset(), FLASH_CMD_LOCK)?;
    Ok(r.status)
}

/// Issue an attempt's command on an in-process device without reading its status
/// (the power cut follows).
pub fn device_cut_command(
    d: &mut dyn Device,
    region: Region,
    accepted: bool,
) -> Result<(), DeviceError> {
    if accepted {
        ops::unlock(d)?;
        // Stage all-ones, then PROGRAM: no status read, no lock.
        d.mmio_write(hilrig_device::regmap::BUFFER_BASE as u64, &[0xff; 8])?;
        d.write32(Reg::FlashRegion.offset(), region as u32)?;
        d.write32(Reg::FlashAddr.offset(), 0)?;
        d.write32(Reg::FlashSrc.offset(), 0)?;
        d.write32(Reg::FlashLen.offset(), 8)?;
        d.write32(Reg::FlashCmd.offset(), FLASH_CMD_PROGRAM)
    } else {
        d.write32(Reg::FlashCmd.offset(), FLASH_CMD_LOCK)?;
        d.write32(Reg::FlashRegion.offset(), region as u32)?;
        d.write32(Reg::FlashCmd.offset(), FLASH_CMD_ERASE)
    }
}

/// The counter registers of an in-process device, read in-band.
pub fn device_inband(d: &mut dyn Device) -> Result<CounterReport, DeviceError> {
    let c = |d: &mut dyn Device, i: u32| d.read32(Reg::Counter.offset() + 4 * i);
    Ok(CounterReport {
        counters: [c(d, 0)?, c(d, 1)?, c(d, 2)?],
        master: d.read32(Reg::Master.offset())?,
        fuse: d.read32(Reg::Fuse.offset())? != 0,
        slots_left: d.read32(Reg::SlotsLeft.offset())?,
        width: d.read32(Reg::Width.offset())? as u8,
        epoch: d.read32(Reg::Epoch.offset())?,
    })
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

impl ConformanceTarget for DeviceTarget {
    fn name(&self) -> String {
        self.label.clone()
    }
    fn oob_raw(&mut self, frame: &[u8]) -> TResult<Vec<u8>> {
        self.dev.oob(frame).map_err(terr)
    }
    fn attempt(
        &mut self,
        region: Region,
        kind: AttemptKind,
        accepted: bool,
    ) -> TResult<Option<u32>> {
        device_attempt(&mut *self.dev, region, kind, accepted)
            .map(Some)
            .map_err(terr)
    }
    fn reset(&mut self, kind: ResetKind) -> TResult<()> {
        self.dev.reset(kind).map_err(terr)?;
        if kind == ResetKind::PowerCycle {
            if let Some(r) = &mut self.reopen {
                self.dev = r().map_err(terr)?;
            }
        }
        Ok(())
    }
    fn attempt_then_cut(&mut self, region: Region, accepted: bool) -> TResult<()> {
        device_cut_command(&mut *self.dev, region, accepted).map_err(terr)?;
        self.reset(ResetKind::PowerCycle)
    }
    fn inband(&mut self) -> Option<TResult<CounterReport>> {
        Some(device_inband(&mut *self.dev).map_err(terr))
    }
    fn write_register(&mut self, offset: u32, value: u32) -> Option<TResult<()>> {
        Some(self.dev.write32(offset, value).map_err(terr))
    }
}

/// A device shared between its OOB server (a thread serving a PTY) and the suite's
/// actuator: attempts, resets and in-band reads made in-process.
#[derive(Clone)]
pub struct DeviceActuator {
    /// The device.
    pub dev: Arc<Mutex<Box<dyn Device>>>,
}

impl DeviceActuator {
    fn with<T>(&self, f: impl FnOnce(&mut dyn Device) -> Result<T, DeviceError>) -> TResult<T> {
        let mut g = self
            .dev
            .lock()
            .map_err(|_| TargetError::Target("device lock poisoned".into()))?;
        f(&mut **g).map_err(terr)
    }
}

impl Actuator for DeviceActuator {
    fn attempt(
        &mut self,
        region: Region,
        kind: AttemptKind,
        accepted: bool,
    ) -> TResult<Option<u32>> {
        self.with(|d| device_attempt(d, region, kind, accepted))
            .map(Some)
    }
    fn reset(&mut self, kind: ResetKind) -> TResult<()> {
        self.with(|d| d.reset(kind))
    }
    fn attempt_then_cut(&mut self, region: Region, accepted: bool) -> TResult<()> {
        self.with(|d| {
            device_cut_command(d, region, accepted)?;
            d.reset(ResetKind::PowerCycle)
        })
    }
    fn inband(&mut self) -> Option<TResult<CounterReport>> {
        Some(self.with(device_inband))
    }
    fn write_register(&mut self, offset: u32, value: u32) -> Option<TResult<()>> {
        Some(self.with(|d| d.write32(offset, value)))
    }
}

/// Attempts and resets by external commands (shell templates):
/// - `attempt_cmd`: `{region}` (vbios|firmware|config), `{op}` (program|erase),
///   `{mode}` (refused|accepted); must exit 0 once the command was issued;
/// - `reset_cmd`: `{kind}` (reset|flr|power-cycle); must exit 0 once the device is
///   back up and its OOB port answers;
/// - `cut_cmd` (optional): `{region}`, `{mode}`: issue an attempt and cut power
///   before it completes, then restore power.
pub struct CommandActuator {
    /// Attempt command template.
    pub attempt_cmd: String,
    /// Reset command template.
    pub reset_cmd: String,
    /// Attempt-then-power-cut command template.
    pub cut_cmd: Option<String>,
    /// Command printing the in-band counter registers as JSON (a `CounterReport`:
    /// counters, master, fuse, slots_left, width, epoch), if the device has them.
    pub inband_cmd: Option<String>,
}

fn sh(cmd: &str) -> TResult<()> {
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .map_err(|e| TargetError::Target(format!("running {cmd:?}: {e}")))?;
    if st.success() {
        Ok(())
    } else {
        Err(TargetError::Target(format!("{cmd:?} exited with {st}")))
    }
}

impl Actuator for CommandActuator {
    fn inband(&mut self) -> Option<TResult<CounterReport>> {
        let cmd = self.inband_cmd.as_ref()?;
        let out = match std::process::Command::new("sh").arg("-c").arg(cmd).output() {
            Ok(o) => o,
            Err(e) => return Some(Err(TargetError::Target(format!("running {cmd:?}: {e}")))),
        };
        if !out.status.success() {
            return Some(Err(TargetError::Target(format!(
                "{cmd:?} exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))));
        }
        Some(serde_json::from_slice(&out.stdout).map_err(|e| {
            TargetError::Target(format!(
                "{cmd:?} printed {:?}, not counters JSON: {e}",
                String::from_utf8_lossy(&out.stdout)
            ))
        }))
    }
    fn attempt(
        &mut self,
        region: Region,
        kind: AttemptKind,
        accepted: bool,
    ) -> TResult<Option<u32>> {
        let c = self
            .attempt_cmd
            .replace("{region}", region.name())
            .replace("{op}", kind.name())
            .replace("{mode}", if accepted { "accepted" } else { "refused" });
        sh(&c).map(|()| None)
    }
    fn reset(&mut self, kind: ResetKind) -> TResult<()> {
        let k = match kind {
            ResetKind::Reset => "reset",
            ResetKind::Flr => "flr",
            ResetKind::PowerCycle => "power-cycle",
        };
        sh(&self.reset_cmd.replace("{kind}", k))
    }
    fn attempt_then_cut(&mut self, region: Region, accepted: bool) -> TResult<()> {
        match &self.cut_cmd {
            Some(c) => sh(&c
                .replace("{region}", region.name())
                .replace("{mode}", if accepted { "accepted" } else { "refused" })
                .replace("{op}", if accepted { "program" } else { "erase" })),
            None => {
                let kind = if accepted {
                    AttemptKind::Program
                } else {
                    AttemptKind::Erase
                };
                self.attempt(region, kind, accepted)?;
                self.reset(ResetKind::PowerCycle)
            }
        }
    }
}

/// A device over its OOB serial port (a UART or a PTY), with an [`Actuator`] for
/// attempts and resets.
pub struct SerialTarget {
    port: Box<dyn serialport::SerialPort>,
    path: String,
    actuator: Box<dyn Actuator>,
    timeout: Duration,
    reader: oob::FrameReader,
    /// Complete frames among the bytes the last drain discarded.
    drained: Vec<Vec<u8>>,
}

impl SerialTarget {
    /// Open the OOB port; attempts and resets by external commands.
    pub fn open(
        path: &str,
        baud: u32,
        timeout: Duration,
        attempt_cmd: String,
        reset_cmd: String,
        cut_cmd: Option<String>,
    ) -> TResult<SerialTarget> {
        Self::with_actuator(
            path,
            baud,
            timeout,
            Box::new(CommandActuator {
                attempt_cmd,
                reset_cmd,
                cut_cmd,
                inband_cmd: None,
            }),
        )
    }

    /// Open the OOB port with any actuator.
    pub fn with_actuator(
        path: &str,
        baud: u32,
        timeout: Duration,
        actuator: Box<dyn Actuator>,
    ) -> TResult<SerialTarget> {
        let port = serialport::new(path, baud)
            .timeout(Duration::from_millis(10))
            .open()
            .map_err(|e| TargetError::Target(format!("opening OOB port {path}: {e}")))?;
        Ok(SerialTarget {
            port,
            path: path.to_string(),
            actuator,
            timeout,
            reader: oob::FrameReader::default(),
            drained: Vec::new(),
        })
    }

    fn read_some(&mut self, buf: &mut [u8]) -> TResult<usize> {
        use std::io::Read;
        match self.port.read(buf) {
            Ok(n) => Ok(n),
            Err(x)
                if matches!(
                    x.kind(),
                    std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                Ok(0)
            }
            Err(x) => Err(TargetError::Transport(format!("{}: {x}", self.path))),
        }
    }

    fn write_frame(&mut self, bytes: &[u8]) -> TResult<()> {
        use std::io::Write;
        let p = self.path.clone();
        let io = |e: std::io::Error| TargetError::Transport(format!("{p}: {e}"));
        self.port.write_all(bytes).map_err(io)?;
        self.port.flush().map_err(io)
    }
}

/// Quiet time that ends a drain.
const DRAIN_QUIET: Duration = Duration::from_millis(30);

impl ConformanceTarget for SerialTarget {
    fn name(&self) -> String {
        format!("serial {}", self.path)
    }
    fn oob_raw(&mut self, frame: &[u8]) -> TResult<Vec<u8>> {
        self.write_frame(frame)?;
        let deadline = std::time::Instant::now() + self.timeout;
        let mut reader = oob::FrameReader::default();
        let mut buf = [0u8; 64];
        // Bytes that belong to no frame (noise, an oversized frame's header) before
        // the reply: the line is not clean, even if a good reply follows.
        let mut noise = 0usize;
        while std::time::Instant::now() < deadline {
            let n = self.read_some(&mut buf)?;
            for (i, &b) in buf[..n].iter().enumerate() {
                let f = match reader.push(b) {
                    Some(oob::StreamEvent::Frame(f)) => f,
                    Some(oob::StreamEvent::Garbage(k)) => {
                        noise += k;
                        continue;
                    }
                    Some(oob::StreamEvent::Oversized) => {
                        noise += 2;
                        continue;
                    }
                    None => continue,
                };
                {
                    if noise > 0 {
                        return Err(TargetError::Transport(format!(
                            "{}: {noise} bytes that belong to no frame before the reply {f:02x?}",
                            self.path
                        )));
                    }
                    if i + 1 < n {
                        // Bytes after the reply were not asked for: the next drain
                        // reports them.
                        let rest = buf[i + 1..n].to_vec();
                        return Err(TargetError::Transport(format!(
                            "{}: {} unexpected bytes after the reply {f:02x?}: {rest:02x?}",
                            self.path,
                            rest.len()
                        )));
                    }
                    return Ok(f);
                }
            }
        }
        Err(TargetError::Transport(format!(
            "{}: no response within {:?} (the response timeout, --timeout-ms {}: it may be below this device's latency for the request; a device that answers later needs a larger --timeout-ms)",
            self.path,
            self.timeout,
            self.timeout.as_millis()
        )))
    }
    fn oob_send(&mut self, bytes: &[u8]) -> TResult<()> {
        self.write_frame(bytes)
    }
    fn oob_read(&mut self) -> TResult<Option<Vec<u8>>> {
        let deadline = std::time::Instant::now() + self.timeout;
        let mut byte = [0u8; 1];
        // One byte at a time: nothing after the frame is consumed.
        while std::time::Instant::now() < deadline {
            if self.read_some(&mut byte)? == 1 {
                if let Some(oob::StreamEvent::Frame(f)) = self.reader.push(byte[0]) {
                    return Ok(Some(f));
                }
            }
        }
        Ok(None)
    }
    fn drain(&mut self) -> TResult<usize> {
        let mut total = self.reader.take_partial().len();
        let mut buf = [0u8; 256];
        let mut quiet_since = std::time::Instant::now();
        let hard = quiet_since + self.timeout.max(Duration::from_millis(200));
        let mut frames = oob::FrameReader::default();
        self.drained.clear();
        while quiet_since.elapsed() < DRAIN_QUIET && std::time::Instant::now() < hard {
            let n = self.read_some(&mut buf)?;
            if n > 0 {
                total += n;
                quiet_since = std::time::Instant::now();
                for &b in &buf[..n] {
                    if let Some(oob::StreamEvent::Frame(f)) = frames.push(b) {
                        // Bounded: a drain lasts at most its hard limit.
                        if self.drained.len() < 64 {
                            self.drained.push(f);
                        }
                    }
                }
            }
        }
        Ok(total)
    }
    fn drained_frames(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.drained)
    }
    fn attempt(
        &mut self,
        region: Region,
        kind: AttemptKind,
        accepted: bool,
    ) -> TResult<Option<u32>> {
        self.actuator.attempt(region, kind, accepted)
    }
    fn reset(&mut self, kind: ResetKind) -> TResult<()> {
        self.actuator.reset(kind)
    }
    fn attempt_then_cut(&mut self, region: Region, accepted: bool) -> TResult<()> {
        self.actuator.attempt_then_cut(region, accepted)
    }
    fn inband(&mut self) -> Option<TResult<CounterReport>> {
        self.actuator.inband()
    }
    fn write_register(&mut self, offset: u32, value: u32) -> Option<TResult<()>> {
        self.actuator.write_register(offset, value)
    }
}

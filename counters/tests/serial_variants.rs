//! Device variants over a PTY, as an independent tester would bring them: byte-level
//! peers that answer the suite's OOB requests with the reference model, shaped the way
//! a real vendor device (or its USB-serial bridge) may legitimately shape them, and
//! hostile or broken ones. A correct device must PASS; a device that lies must FAIL;
//! a link fault must be TRANSPORT (never FAIL); nothing may panic or hang.

mod pty;

use hilrig_counters::conformance::{Options, Overall, Report, Status};
use hilrig_device::oob::{self, CounterReport, ErrorCode, FrameReader, Response, StreamEvent};
use hilrig_device::regmap::{
    Reg, FLASH_CMD_ERASE, FLASH_CMD_PROGRAM, FLASH_STATUS_DONE, FLASH_STATUS_UNLOCKED,
};
use hilrig_device::{Device, DeviceError, Model, NvState, Region, ResetKind};
use pty::{nv, opts, spawn_pty, PtyDevice};
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the peer puts its replies on the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One write per reply, at once.
    Plain,
    /// Each reply in pieces of `piece` bytes with `gap` between them (a slow MCU
    /// writing its UART FIFO, a USB-serial bridge's latency timer).
    Split { piece: usize, gap: Duration },
    /// Replies to requests with command `cmd` (0: every request) come after `delay`
    /// (hashing a flash region on a slow MCU), within the suite's timeout.
    Slow { cmd: u8, delay: Duration },
    /// Replies are held while input keeps coming and sent in one burst once the line
    /// has been idle for the given time: the replies to back-to-back frames arrive
    /// together, the end of one with the start of the next.
    Coalesce(Duration),
    /// Every other PHYSICAL_RESET is answered BUSY (nothing changed; the protocol's
    /// error code for a device that cannot act now) and must be asked again.
    BusyEveryOtherReset,
    /// Every PHYSICAL_RESET is answered BUSY.
    AlwaysBusy,
    /// Every byte outside a frame is answered with a BAD_SYNC error frame (the
    /// datasheet: a malformed request, bad sync included, gets an error frame).
    BadSyncPerByte,
    /// Like `BadSyncPerByte`, but each error frame carries the sequence number the
    /// device expects next (the last request's plus one): garbage has no sequence of
    /// its own, and the protocol does not say which one an error frame for it has.
    BadSyncNumberedAhead,
    // --- link faults ---
    /// Line noise (and an oversized frame header) before every reply.
    NoiseBefore,
    /// Every `n`-th reply stops half way: the device goes silent mid-reply.
    SilentMidReply(usize),
    /// After `n` replies the device never answers again.
    SilentAfter(usize),
    /// Every `n`-th reply is replaced by a frame announcing a 200-byte payload.
    OversizedReply(usize),
    // --- device lies on the OOB port ---
    /// Every `n`-th READ_COUNTERS reports the counters and MASTER one lower.
    GlitchLow(usize),
    /// READ_HASH answered with another region's hash (and that region's number).
    OtherRegionHash,
    /// READ_COUNTERS answered with a fuse byte of 2 (intact frame, right sequence).
    BadFuseByte,
    /// READ_COUNTERS is answered twice with the same sequence number, the second
    /// time with MASTER one higher (two different answers to one question; or a
    /// request the link delivered twice, answered before and after a change).
    ConflictingDuplicate,
    /// Every `n`-th request reaches the device corrupted (a flipped bit on the
    /// wire): the device answers BAD_CRC with the request's sequence number and
    /// does nothing, as the datasheet says.
    CorruptedRequest(usize),
}

fn error_frame(seq: u8, code: ErrorCode, request: u8) -> Vec<u8> {
    oob::encode_response(seq, &Response::Error { code, request })
}

/// A READ_COUNTERS reply with its report changed by `f` (other replies unchanged).
fn edit_counters(out: &[u8], f: impl FnOnce(&mut CounterReport)) -> Vec<u8> {
    match oob::decode_response(out) {
        Ok((seq, Response::Counters(mut c))) => {
            f(&mut c);
            oob::encode_response(seq, &Response::Counters(c))
        }
        _ => out.to_vec(),
    }
}

fn serve(dev: Arc<Mutex<Box<dyn Device>>>, shape: Shape) -> PtyDevice {
    spawn_pty(Duration::from_millis(2), move |mut master, st| {
        let mut reader = FrameReader::default();
        let mut buf = [0u8; 256];
        let mut replies = 0usize;
        let mut counter_reads = 0usize;
        let mut resets = 0usize;
        let mut held: Vec<u8> = Vec::new();
        let mut last_in = Instant::now();
        let put = |m: &mut serialport::TTYPort, bytes: &[u8]| {
            let _ = m.write_all(bytes);
            let _ = m.flush();
        };
        let mut requests = 0usize;
        let mut last_seq = 0u8;
        while !st.load(Ordering::Relaxed) {
            let n: usize = master.read(&mut buf).unwrap_or_default();
            if n == 0 {
                if let Shape::Coalesce(idle) = shape {
                    if !held.is_empty() && last_in.elapsed() >= idle {
                        let b = std::mem::take(&mut held);
                        put(&mut master, &b);
                    }
                }
                if reader.pending() > 0 && last_in.elapsed() > oob::INTER_BYTE_TIMEOUT {
                    let p = reader.take_partial();
                    let f = error_frame(
                        p.get(2).copied().unwrap_or(0),
                        ErrorCode::Truncated,
                        p.get(3).copied().unwrap_or(0),
                    );
                    put(&mut master, &f);
                }
                continue;
            }
            last_in = Instant::now();
            for &b in &buf[..n] {
                let (req, mut out) = match reader.push(b) {
                    Some(StreamEvent::Frame(f)) => {
                        requests += 1;
                        // A request with a good CRC (the garbage has a bad one).
                        if let Ok((q, _, _)) = oob::parse_frame(&f) {
                            last_seq = q;
                        }
                        if let Shape::CorruptedRequest(k) = shape {
                            if requests % k == 0 {
                                let out = error_frame(f[2], ErrorCode::BadCrc, 0);
                                put(&mut master, &out);
                                continue;
                            }
                        }
                        let reset = f.get(3) == Some(&oob::cmd::PHYSICAL_RESET);
                        if reset {
                            resets += 1;
                        }
                        let busy = match shape {
                            Shape::BusyEveryOtherReset => resets % 2 == 1,
                            Shape::AlwaysBusy => true,
                            _ => false,
                        };
                        if reset && busy {
                            let out = error_frame(f[2], ErrorCode::Busy, f[3]);
                            put(&mut master, &out);
                            continue;
                        }
                        let out = match dev.lock().unwrap().oob(&f) {
                            Ok(o) => o,
                            Err(_) => continue,
                        };
                        (f, out)
                    }
                    Some(StreamEvent::Oversized) => {
                        (Vec::new(), error_frame(0, ErrorCode::Oversized, 0))
                    }
                    Some(StreamEvent::Garbage(_)) if shape == Shape::BadSyncPerByte => {
                        (Vec::new(), error_frame(0, ErrorCode::BadSync, 0))
                    }
                    Some(StreamEvent::Garbage(_)) if shape == Shape::BadSyncNumberedAhead => (
                        Vec::new(),
                        error_frame(last_seq.wrapping_add(1), ErrorCode::BadSync, 0),
                    ),
                    Some(StreamEvent::Garbage(_)) | None => continue,
                };
                let cmd = req.get(3).copied().unwrap_or(0);
                replies += 1;
                if cmd == oob::cmd::READ_COUNTERS {
                    counter_reads += 1;
                }
                match shape {
                    Shape::Plain
                    | Shape::CorruptedRequest(_)
                    | Shape::BadSyncPerByte
                    | Shape::BadSyncNumberedAhead
                    | Shape::BusyEveryOtherReset
                    | Shape::AlwaysBusy => put(&mut master, &out),
                    Shape::Split { piece, gap } => {
                        for (i, c) in out.chunks(piece).enumerate() {
                            if i > 0 {
                                std::thread::sleep(gap);
                            }
                            put(&mut master, c);
                        }
                    }
                    Shape::Slow { cmd: c, delay } => {
                        if c == 0 || c == cmd {
                            std::thread::sleep(delay);
                        }
                        put(&mut master, &out);
                    }
                    Shape::Coalesce(_) => held.extend_from_slice(&out),
                    Shape::NoiseBefore => {
                        put(&mut master, &[0x00, 0x13, 0xff, oob::SYNC, 0xc8, 0x00]);
                        put(&mut master, &out);
                    }
                    Shape::SilentMidReply(k) => {
                        if replies % k == 0 {
                            out.truncate(out.len() / 2);
                        }
                        put(&mut master, &out);
                    }
                    Shape::SilentAfter(k) => {
                        if replies <= k {
                            put(&mut master, &out);
                        }
                    }
                    Shape::OversizedReply(k) => {
                        if replies % k == 0 {
                            out = vec![oob::SYNC, 200];
                            out.extend_from_slice(&[0x5a; 204]);
                        }
                        put(&mut master, &out);
                    }
                    Shape::GlitchLow(k) => {
                        if cmd == oob::cmd::READ_COUNTERS && counter_reads % k == 0 {
                            out = edit_counters(&out, |c| {
                                for x in c.counters.iter_mut() {
                                    *x = x.saturating_sub(1);
                                }
                                c.master = c.master.saturating_sub(1);
                            });
                        }
                        put(&mut master, &out);
                    }
                    Shape::OtherRegionHash => {
                        if let Ok((seq, Response::Hash { region, .. })) = oob::decode_response(&out)
                        {
                            let other = hilrig_device::Region::ALL[(region as usize + 1) % 3];
                            let nv = dev
                                .lock()
                                .unwrap()
                                .oob(&oob::encode_request(seq, &oob::Request::ReadHash(other)));
                            out = nv.unwrap_or(out);
                        }
                        put(&mut master, &out);
                    }
                    Shape::BadFuseByte => {
                        if let Ok((seq, Response::Counters(_))) = oob::decode_response(&out) {
                            let mut p = out[4..out.len() - 2].to_vec();
                            p[16] = 2;
                            out = oob::frame(seq, out[3], &p);
                        }
                        put(&mut master, &out);
                    }
                    Shape::ConflictingDuplicate => {
                        put(&mut master, &out);
                        if cmd == oob::cmd::READ_COUNTERS {
                            let other = edit_counters(&out, |c| c.master += 1);
                            std::thread::sleep(Duration::from_millis(5));
                            put(&mut master, &other);
                        }
                    }
                }
            }
        }
    })
}

fn run_with(dev: Box<dyn Device>, shape: Shape, timeout: Duration, o: &Options) -> Report {
    let dev = Arc::new(Mutex::new(dev));
    let peer = serve(dev.clone(), shape);
    pty::run_suite(dev, &peer, timeout, o, &format!("{shape:?}"))
}

fn model(width: u8) -> Box<dyn Device> {
    Box::new(Model::new(nv(width)).unwrap())
}

fn run(shape: Shape, timeout: Duration) -> Report {
    run_with(model(8), shape, timeout, &opts())
}

fn assert_pass(r: &Report) {
    assert_eq!(r.overall, Overall::Pass, "{}", r.text());
    assert!(r.transport_faults.is_empty(), "{}", r.text());
}

fn assert_transport(r: &Report) {
    assert_eq!(r.overall, Overall::Transport, "{}", r.text());
    assert_eq!(
        r.counts.failed,
        0,
        "a link fault is not a FAIL\n{}",
        r.text()
    );
}

// ---------------------------------------------------------------- correct devices

#[test]
fn replies_split_into_pieces_with_gaps_pass() {
    assert_pass(&run(
        Shape::Split {
            piece: 5,
            gap: Duration::from_millis(4),
        },
        Duration::from_millis(1000),
    ));
}

#[test]
fn replies_byte_by_byte_pass() {
    assert_pass(&run(
        Shape::Split {
            piece: 1,
            gap: Duration::from_millis(1),
        },
        Duration::from_millis(1000),
    ));
}

#[test]
fn replies_coalesced_into_one_burst_pass() {
    assert_pass(&run(
        Shape::Coalesce(Duration::from_millis(20)),
        Duration::from_millis(1000),
    ));
}

#[test]
fn a_slow_read_hash_within_the_timeout_passes() {
    assert_pass(&run(
        Shape::Slow {
            cmd: oob::cmd::READ_HASH,
            delay: Duration::from_millis(120),
        },
        Duration::from_millis(200),
    ));
}

#[test]
fn a_device_slow_on_every_request_within_the_timeout_passes() {
    assert_pass(&run(
        Shape::Slow {
            cmd: 0,
            delay: Duration::from_millis(60),
        },
        Duration::from_millis(150),
    ));
}

#[test]
fn a_device_at_the_widest_budget_passes() {
    assert_pass(&run_with(
        model(64),
        Shape::Plain,
        Duration::from_millis(1000),
        &opts(),
    ));
}

#[test]
fn a_device_near_the_end_of_its_budget_with_history_passes() {
    // A device from the field: several physical resets behind it, MASTER large, one
    // slot left on FIRMWARE.
    let mut n = nv(8);
    n.epoch = 1_000_000;
    n.master = 3_000_000_000;
    n.counters = [0b11, (1 << 7) - 1, 0];
    assert_pass(&run_with(
        Box::new(Model::new(n).unwrap()),
        Shape::Plain,
        Duration::from_millis(1000),
        &opts(),
    ));
}

#[test]
fn a_device_answering_every_garbage_byte_with_bad_sync_passes() {
    assert_pass(&run(Shape::BadSyncPerByte, Duration::from_millis(1000)));
}

#[test]
fn a_device_busy_at_a_physical_reset_then_ready_passes() {
    assert_pass(&run(
        Shape::BusyEveryOtherReset,
        Duration::from_millis(1000),
    ));
}

#[test]
fn a_device_always_busy_at_a_physical_reset_is_an_error_not_a_fail() {
    let r = run(Shape::AlwaysBusy, Duration::from_millis(1000));
    assert_eq!(r.overall, Overall::Error, "{}", r.text());
    assert_eq!(r.counts.failed, 0, "{}", r.text());
}

/// The marker request after the garbage is recognised by its sequence number and its
/// kind (an IDENTIFY reply): before, the first error frame for garbage that carried
/// the marker's sequence number was taken for its reply, and the real reply was then
/// drained as stale input (TRANSPORT).
#[test]
fn an_error_frame_for_garbage_with_the_markers_sequence_is_not_its_reply() {
    assert_pass(&run(
        Shape::BadSyncNumberedAhead,
        Duration::from_millis(1000),
    ));
}

/// A correct device of width `w`, over the plain PTY peer, with the reset key: every
/// property runs (none SKIPPED) and holds; the keyed physical reset restores the
/// budget between attempts.
fn narrow_passes(w: u8) {
    let r = run_with(model(w), Shape::Plain, Duration::from_millis(1000), &opts());
    assert_pass(&r);
    assert_eq!(r.counts.skipped, 0, "{}", r.text());
    assert!(
        r.plan.iter().any(|p| p.contains("physical reset")),
        "{}",
        r.text()
    );
}

#[test]
fn a_correct_device_of_width_1_passes() {
    narrow_passes(1);
}

#[test]
fn a_correct_device_of_width_2_passes() {
    narrow_passes(2);
}

/// Without the reset key a narrow device cannot have its budget restored: the
/// counting properties are SKIPPED with the reason, and the run is INCOMPLETE.
#[test]
fn a_narrow_device_without_the_reset_key_is_incomplete_with_reasons() {
    let o = Options {
        burn_fuse: false,
        reset_key: None,
    };
    let r = run_with(model(2), Shape::Plain, Duration::from_millis(1000), &o);
    assert_eq!(r.overall, Overall::Incomplete, "{}", r.text());
    let s = r.get("refused-attempts-counted").unwrap();
    assert_eq!(s.status, Status::Skip, "{}", r.text());
    assert!(s.evidence[0].contains("width 2"), "{}", r.text());
}

/// How a narrow device is broken at the end of its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Refused attempts on CONFIG are refused but never counted.
    MissesRefusedConfig,
    /// The counter that fills its last slot wraps to 0 and the fuse stays intact.
    Wraps,
    /// With the fuse blown an unlocked erase still acts and FLASH_STATUS says done
    /// (the controller forgets to check the fuse).
    FuseLetsEraseThrough,
    /// Not a fault: the keyed physical reset rewrites the CONFIG region with its
    /// defaults (the datasheet does not say a physical reset leaves the flash alone).
    ResetRewritesConfig,
    /// A refused erase of CONFIG (counted, FLASH_STATUS refused) scribbles zeros on it.
    RefusedEraseScribblesConfig,
}

/// The reference model with one [`Fault`].
struct Narrow {
    fault: Fault,
    inner: Model,
    region: u32,
    /// An erase went through with the fuse blown: FLASH_STATUS says done.
    let_through: bool,
    /// FLASH_STATUS of the last command, kept across a rebuild.
    status: Option<u32>,
}

impl Narrow {
    fn rebuild(&mut self, f: impl FnOnce(&mut NvState)) -> Result<(), DeviceError> {
        let mut n = self.inner.nv().clone();
        f(&mut n);
        self.inner = Model::new(n)?;
        Ok(())
    }
}

impl Device for Narrow {
    fn read_word(&mut self, w: u32, m: u8) -> Result<u32, DeviceError> {
        if w == Reg::FlashStatus.offset() && self.let_through {
            return Ok(FLASH_STATUS_DONE | FLASH_STATUS_UNLOCKED);
        }
        if w == Reg::FlashStatus.offset() {
            if let Some(st) = self.status {
                return Ok(st);
            }
        }
        self.inner.read_word(w, m)
    }
    fn write_word(&mut self, w: u32, v: u32, m: u8) -> Result<(), DeviceError> {
        if w == Reg::FlashRegion.offset() {
            self.region = v;
        }
        if w != Reg::FlashCmd.offset() || !(v == FLASH_CMD_ERASE || v == FLASH_CMD_PROGRAM) {
            return self.inner.write_word(w, v, m);
        }
        self.let_through = false;
        self.status = None;
        let pre = self.inner.nv().clone();
        let unlocked =
            self.inner.read_word(Reg::FlashStatus.offset(), 0xf)? & FLASH_STATUS_UNLOCKED != 0;
        let r = (self.region as usize).min(2);
        self.inner.write_word(w, v, m)?;
        match self.fault {
            Fault::MissesRefusedConfig if !unlocked && r == Region::Config as usize => self
                .rebuild(|n| {
                    n.counters = pre.counters;
                    n.master = pre.master;
                    n.fuse = pre.fuse;
                }),
            Fault::Wraps if self.inner.nv().fuse && !pre.fuse => self.rebuild(|n| {
                n.fuse = false;
                n.counters[r] = 0;
            }),
            Fault::FuseLetsEraseThrough if pre.fuse && unlocked && v == FLASH_CMD_ERASE => {
                self.rebuild(|n| n.flash[r].fill(0xff))?;
                self.let_through = true;
                Ok(())
            }
            Fault::RefusedEraseScribblesConfig
                if !unlocked && v == FLASH_CMD_ERASE && r == Region::Config as usize =>
            {
                let st = self.inner.read_word(Reg::FlashStatus.offset(), 0xf)?;
                self.rebuild(|n| n.flash[r].fill(0))?;
                self.status = Some(st);
                Ok(())
            }
            _ => Ok(()),
        }
    }
    fn rom_size(&self) -> u64 {
        self.inner.rom_size()
    }
    fn rom_read(&mut self, o: u64, d: &mut [u8]) -> Result<(), DeviceError> {
        self.inner.rom_read(o, d)
    }
    fn reset(&mut self, k: ResetKind) -> Result<(), DeviceError> {
        self.let_through = false;
        self.status = None;
        self.inner.reset(k)
    }
    fn oob(&mut self, req: &[u8]) -> Result<Vec<u8>, DeviceError> {
        let out = self.inner.oob(req)?;
        if self.fault == Fault::ResetRewritesConfig
            && matches!(
                oob::decode_response(&out),
                Ok((_, Response::ResetDone { .. }))
            )
        {
            self.rebuild(|n| n.flash[Region::Config as usize].fill(0x5a))?;
        }
        Ok(out)
    }
}

/// A narrow device with `fault` over the same plain PTY peer, with every property
/// and the key.
fn run_narrow(fault: Fault, w: u8) -> Report {
    let dev = Narrow {
        fault,
        inner: Model::new(nv(w)).unwrap(),
        region: 0,
        let_through: false,
        status: None,
    };
    run_with(
        Box::new(dev),
        Shape::Plain,
        Duration::from_millis(1000),
        &opts(),
    )
}

/// A broken narrow device: FAIL, on `property` among others.
fn narrow_fails(fault: Fault, w: u8, property: &str) -> Report {
    let r = run_narrow(fault, w);
    assert_eq!(
        r.overall,
        Overall::Fail,
        "{fault:?} width {w}\n{}",
        r.text()
    );
    assert_eq!(
        r.get(property).unwrap().status,
        Status::Fail,
        "{fault:?} width {w} must fail {property}\n{}",
        r.text()
    );
    r
}

/// refused-leaves-flash-unchanged's reference hashes are taken again after each
/// physical reset the suite makes before it (at width 1 one before every attempt):
/// a device whose physical reset rewrites a region PASSES (before: FAIL, "READ_HASH
/// ... before the suite's first (refused) attempt, ... now").
#[test]
fn a_physical_reset_that_rewrites_flash_is_not_taken_for_a_refused_attempt() {
    let r = run_narrow(Fault::ResetRewritesConfig, 1);
    assert_pass(&r);
    let ev = r
        .get("refused-leaves-flash-unchanged")
        .unwrap()
        .evidence
        .join("\n");
    assert!(
        ev.contains("after the physical reset before"),
        "{}",
        r.text()
    );
}

/// Negative control: a refused erase that scribbles on CONFIG in
/// refused-attempts-counted, followed by a physical reset, is still caught (compared
/// just before the reset); the region is already scribbled by then, so the
/// property's own attempts see no change.
#[test]
fn a_refused_attempt_that_changes_flash_before_a_physical_reset_fails() {
    let r = narrow_fails(
        Fault::RefusedEraseScribblesConfig,
        1,
        "refused-leaves-flash-unchanged",
    );
    let ev = r
        .get("refused-leaves-flash-unchanged")
        .unwrap()
        .evidence
        .join("\n");
    assert!(
        ev.contains("just before the physical reset"),
        "{}",
        r.text()
    );
}

/// `fault` at width 1 and at width 2: FAIL, on the property named for each width.
fn narrow_fails_at_1_and_2(fault: Fault, property: [&str; 2]) {
    narrow_fails(fault, 1, property[0]);
    narrow_fails(fault, 2, property[1]);
}

#[test]
fn a_narrow_counter_that_misses_an_attempt_fails() {
    let p = "refused-attempts-counted";
    narrow_fails_at_1_and_2(Fault::MissesRefusedConfig, [p, p]);
}

/// Seen at the first attempt that fills the last slot, and by budget-and-fuse.
#[test]
fn a_narrow_counter_that_wraps_instead_of_fusing_fails() {
    narrow_fails_at_1_and_2(
        Fault::Wraps,
        ["refused-attempts-counted", "budget-and-fuse"],
    );
}

#[test]
fn a_narrow_fuse_that_lets_an_erase_through_fails() {
    let p = "budget-and-fuse";
    narrow_fails_at_1_and_2(Fault::FuseLetsEraseThrough, [p, p]);
}

/// A reply later than --timeout-ms is TRANSPORT, and the report says the timeout
/// (named with its value) may be below the device's latency.
#[test]
fn a_timeout_below_the_devices_latency_is_transport_and_says_so() {
    let r = run(
        Shape::Slow {
            cmd: oob::cmd::PHYSICAL_RESET,
            delay: Duration::from_millis(250),
        },
        Duration::from_millis(100),
    );
    assert_transport(&r);
    let t = r.text();
    assert!(t.contains("--timeout-ms 100"), "{t}");
    assert!(t.contains("may be below this device's latency"), "{t}");
}

// ---------------------------------------------------------------- link faults

#[test]
fn noise_before_every_reply_is_transport() {
    assert_transport(&run(Shape::NoiseBefore, Duration::from_millis(300)));
}

#[test]
fn a_device_silent_mid_reply_is_transport() {
    assert_transport(&run(Shape::SilentMidReply(17), Duration::from_millis(150)));
}

#[test]
fn a_device_that_goes_silent_is_transport_in_bounded_time() {
    let t0 = Instant::now();
    let r = run(Shape::SilentAfter(20), Duration::from_millis(100));
    assert_transport(&r);
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
}

#[test]
fn oversized_reply_frames_are_transport() {
    assert_transport(&run(Shape::OversizedReply(13), Duration::from_millis(150)));
}

// ---------------------------------------------------------------- lying devices

#[test]
fn counters_that_sometimes_read_lower_fail() {
    let r = run(Shape::GlitchLow(7), Duration::from_millis(1000));
    assert_eq!(r.overall, Overall::Fail, "{}", r.text());
}

#[test]
fn read_hash_answered_with_another_regions_hash_fails() {
    let r = run(Shape::OtherRegionHash, Duration::from_millis(1000));
    assert_eq!(r.overall, Overall::Fail, "{}", r.text());
}

#[test]
fn an_intact_reply_that_does_not_decode_fails() {
    let r = run(Shape::BadFuseByte, Duration::from_millis(1000));
    assert_eq!(r.overall, Overall::Fail, "{}", r.text());
    assert!(r.transport_faults.is_empty(), "{}", r.text());
}

/// Two different answers to one request are never PASS, and never a device FAIL
/// either: a request the link delivered twice is answered twice, before and after
/// whatever the suite did in between (a transport fault, DESIGN §6).
#[test]
fn two_different_answers_to_one_request_are_transport_not_a_device_fail() {
    let r = run(Shape::ConflictingDuplicate, Duration::from_millis(1000));
    assert_transport(&r);
    assert!(r.text().contains("answered twice"), "{}", r.text());
}

/// A request corrupted on its way to the device comes back as BAD_CRC with its
/// own sequence number: a transport fault, asked again, never the device's answer
/// (before: the wrong-key reset "answered Error BadCrc" FAILed no-decrement, and
/// counter and hash reads were ERROR).
#[test]
fn a_request_corrupted_on_the_wire_is_transport_and_asked_again() {
    let r = run(Shape::CorruptedRequest(9), Duration::from_millis(300));
    assert_transport(&r);
    assert_eq!(r.counts.error, 0, "{}", r.text());
}

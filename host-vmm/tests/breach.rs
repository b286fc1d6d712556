//! Teardown on breach and detach without stopping (issue 21.5), on real KVM with the
//! behavioural model: the policy file's `[breach]` triggers (alarm thresholds,
//! counters verdicts read out of band while the guest runs), the `detach` action
//! and control request, and what a guest sees when its device goes away. Each test
//! skips loudly when /dev/kvm is absent.

#[path = "common/skip.rs"]
mod skip;

use ed25519_dalek::SigningKey;
use hilrig_device::attest::Verdict as CountersVerdict;
use hilrig_device::regmap::{Reg, BUFFER_BASE, BUFFER_SIZE};
use hilrig_device::{Device, DeviceError, ResetKind};
use hilrig_guest::detach::{MARKER, SECRET, SURVIVED};
use hilrig_vmm::lifecycle::teardown::{TeardownRecord, DETACH_STEPS, STEPS};
use hilrig_vmm::lifecycle::LifecycleConfig;
use hilrig_vmm::policy::{default_policy_toml, PolicyFile, Profile};
use hilrig_vmm::{Backend, Console, RunReport, Verdict, Vm, VmConfig};
use hilrig_vmm_api::teardown::BreachTrigger;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The built-in policy plus `breach` (a `[breach]` table), compiled for `profile`.
fn profile_with(breach: &str, profile: &str) -> Arc<Profile> {
    let text = format!("{}\n{breach}", default_policy_toml());
    Arc::new(
        PolicyFile::parse(&text, "breach.toml")
            .and_then(|f| f.compile(profile, "breach.toml"))
            .expect("policy"),
    )
}

fn model() -> Box<dyn Device> {
    Box::new(hilrig_vmm::devices::backend::fresh_model(0xb7ea).expect("model"))
}

fn config(payload: Vec<u8>, profile: Arc<Profile>, control: Option<PathBuf>) -> VmConfig {
    VmConfig {
        vcpus: 1,
        mem_size: 8 << 20,
        payload,
        payload_name: "breach".into(),
        // Long enough for a loaded machine; a run that should have been cut short by
        // a breach and was not ends here (and fails its test).
        timeout: Duration::from_secs(30),
        console: Console::Capture,
        policy: Some(profile),
        control,
        lifecycle: LifecycleConfig {
            vmm_key: Some(SigningKey::from_bytes(&[9; 32])),
            ..Default::default()
        },
        ..VmConfig::default()
    }
}

fn run(payload: Vec<u8>, profile: Arc<Profile>, device: Box<dyn Device>) -> RunReport {
    Vm::new(
        config(payload, profile, None),
        Backend::trapping("model", device),
    )
    .expect("vm")
    .run()
    .expect("run")
}

fn builtin(name: &str) -> Vec<u8> {
    hilrig_guest::builtin(name)
        .expect("builtin")
        .expect("builds")
}

/// No trace of the tenant on the device: SCRATCH and the data buffers read their
/// reset values, and the device answers its ID.
fn assert_no_residue(dev: &mut dyn Device) {
    assert_eq!(
        dev.read32(Reg::Id.offset()).unwrap(),
        hilrig_device::regmap::DEVICE_ID_VALUE
    );
    for i in 0..8 {
        let v = dev.read32(Reg::Scratch.offset() + 4 * i).unwrap();
        assert_ne!(v, SECRET, "SCRATCH[{i}] still holds the tenant's secret");
        assert_eq!(v, 0, "SCRATCH[{i}]");
    }
    for off in (0..BUFFER_SIZE as u32).step_by(4) {
        assert_eq!(
            dev.read32(BUFFER_BASE + off).unwrap(),
            0,
            "buffer +{off:#x}"
        );
    }
}

/// The run ended by a breach teardown: its record.
fn torn_down(r: RunReport) -> TeardownRecord {
    assert_eq!(
        r.verdict,
        Verdict::Stopped("torn down".into()),
        "{}",
        r.verdict
    );
    r.teardown.expect("a teardown record")
}

const ALARMS3: &str =
    "[[breach.alarms]]\nregister = \"HANG_TRIGGER\"\ncount = 3\nwithin = \"30s\"\n";

#[test]
fn an_alarm_threshold_tears_the_tenant_down_with_the_trigger_named() {
    if !skip::kvm!() {
        return;
    }
    // The guest writes HANG_TRIGGER 3 times (dropped, alarmed for a tenant), then
    // waits forever for its device to go: only the breach ends the run.
    let p = profile_with(
        &format!("[breach]\naction = \"teardown\"\n{ALARMS3}"),
        "tenant",
    );
    let r = run(builtin("detach-alarms"), p, model());
    assert_eq!(
        r.verdict,
        Verdict::Stopped("torn down".into()),
        "{}",
        r.verdict
    );
    let rec = r.teardown.clone().expect("a teardown record");
    assert!(rec.complete, "{rec:?}");
    assert!(!rec.detached);
    assert_eq!(
        rec.trigger,
        Some(BreachTrigger::Alarms {
            register: "HANG_TRIGGER".into(),
            count: 3,
            within_ms: 30_000
        })
    );
    assert_eq!(
        rec.steps
            .iter()
            .map(|s| s.step.as_str())
            .collect::<Vec<_>>(),
        STEPS.to_vec()
    );
    assert_eq!(rec.guest_bytes_scrubbed, 8 << 20);
    rec.verify(&SigningKey::from_bytes(&[9; 32]).verifying_key())
        .unwrap();
    // The RunSummary carries the record, trigger included.
    let line = serde_json::to_string(&rec).unwrap();
    assert!(line.contains("\"kind\":\"alarms\""), "{line}");
    let mut dev = r.device.expect("device back");
    assert_no_residue(&mut *dev);
}

#[test]
fn alarms_below_the_threshold_or_too_slow_are_no_breach() {
    if !skip::kvm!() {
        return;
    }
    // 3 alarms, but the threshold asks for 4: the guest's own verdict ends the run.
    let mut p = hilrig_guest::Payload::new().unwrap();
    p.park_secondaries().unwrap();
    for _ in 0..3 {
        p.mmio_write(
            hilrig_guest::Width::B4,
            Reg::HangTrigger.offset(),
            u64::from(hilrig_device::regmap::HANG_MAGIC),
        )
        .unwrap();
    }
    p.report(0).unwrap();
    let code = p.build().unwrap();
    let prof = profile_with(
        "[[breach.alarms]]\nregister = \"HANG_TRIGGER\"\ncount = 4\nwithin = \"30s\"\n",
        "tenant",
    );
    let r = run(code, prof, model());
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.verdict);
    assert!(r.teardown.is_none());
    assert_eq!(r.policy.as_ref().unwrap().alarms, 3);
}

#[test]
fn detach_on_a_breach_lets_the_guest_run_on_without_its_device() {
    if !skip::kvm!() {
        return;
    }
    let p = profile_with(
        &format!("[breach]\naction = \"detach\"\n{ALARMS3}"),
        "tenant",
    );
    let r = run(builtin("detach-alarms"), p, model());
    // The guest saw its device go (vendor ID 0xffff, BAR0 all ones, MMIO all ones),
    // kept running and passed.
    let console = String::from_utf8_lossy(&r.console).to_string();
    assert_eq!(r.verdict, Verdict::Pass, "{}\n{console}", r.verdict);
    assert_eq!(r.results, vec![MARKER]);
    assert!(console.contains(SURVIVED), "{console}");
    let rec = r.teardown.clone().expect("a detach record");
    assert!(rec.detached && rec.complete, "{rec:?}");
    assert!(matches!(
        rec.trigger,
        Some(BreachTrigger::Alarms { count: 3, .. })
    ));
    assert_eq!(
        rec.steps
            .iter()
            .map(|s| s.step.as_str())
            .collect::<Vec<_>>(),
        DETACH_STEPS.to_vec()
    );
    assert_eq!(rec.guest_bytes_scrubbed, 0, "the guest keeps its memory");
    assert!(rec.device_bytes_scrubbed >= BUFFER_SIZE as u64);
    assert_eq!(
        rec.verdict.as_ref().unwrap().verdict,
        CountersVerdict::Trusted
    );
    rec.verify(&SigningKey::from_bytes(&[9; 32]).verifying_key())
        .unwrap();
    let mut dev = r.device.expect("device back");
    assert_no_residue(&mut *dev);
}

/// One raw request line, its raw reply.
fn ask(sock: &Path, line: &str) -> Value {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("control socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut out = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut out)
        .expect("control reply");
    serde_json::from_str(&out).expect("a JSON reply")
}

#[test]
fn detach_by_request_then_teardown_and_detach_again_get_clear_replies() {
    if !skip::kvm!() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("vm.sock");
    let p = profile_with("", "tenant");
    let vm = Vm::new(
        config(builtin("detach-wait"), p, Some(sock.clone())),
        Backend::trapping("model", model()),
    )
    .expect("vm");
    let t = std::thread::spawn(move || vm.run().expect("run"));
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Wait until the guest has used the device (its SCRATCH write and read decided).
    loop {
        let m = ask(&sock, r#"{"op":"metrics"}"#);
        if m["policy"]["parts"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "guest never used the device: {m}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Held paused by an operator across the requests below (so the guest cannot
    // see its device go and end the run before they are answered); the detach
    // leaves it paused.
    let paused = ask(&sock, r#"{"op":"pause"}"#);
    assert_eq!(paused["ok"], true, "{paused}");
    let reply = ask(&sock, r#"{"op":"detach"}"#);
    assert_eq!(
        (&reply["ok"], &reply["op"]),
        (&Value::Bool(true), &"detach".into()),
        "{reply}"
    );
    let rec: TeardownRecord = serde_json::from_value(reply.clone()).unwrap();
    assert!(rec.detached && rec.complete, "{rec:?}");
    assert_eq!(
        rec.trigger,
        Some(BreachTrigger::Request {
            op: "detach".into()
        })
    );
    // Idempotent: a second detach answers the same record.
    let again = ask(&sock, r#"{"op":"detach"}"#);
    assert_eq!(again["ok"], true, "{again}");
    assert_eq!(
        serde_json::from_value::<TeardownRecord>(again).unwrap(),
        rec
    );
    // Teardown after a detach is refused, saying why.
    let td = ask(&sock, r#"{"op":"teardown"}"#);
    assert_eq!(td["ok"], false, "{td}");
    assert!(
        td["error"].as_str().unwrap().contains("already detached"),
        "{td}"
    );
    let st = ask(&sock, r#"{"op":"status"}"#);
    assert_eq!(
        (&st["detached"], &st["paused"]),
        (&Value::Bool(true), &Value::Bool(true)),
        "{st}"
    );
    let resumed = ask(&sock, r#"{"op":"resume"}"#);
    assert_eq!(resumed["ok"], true, "{resumed}");
    let rep = t.join().unwrap();
    assert_eq!(
        rep.verdict,
        Verdict::Pass,
        "{}\n{}",
        rep.verdict,
        String::from_utf8_lossy(&rep.console)
    );
    assert_eq!(rep.results, vec![MARKER]);
    assert_eq!(rep.teardown.as_ref(), Some(&rec));
    let mut dev = rep.device.expect("device back");
    assert_no_residue(&mut *dev);
}

/// A model with a hidden path to its flash controller (a backdoor sequencer): a
/// write of [`BACKDOOR`] to SCRATCH[7] makes the device erase the CONFIG region
/// itself — an attempt the hardware counts and the VMM never saw. With `swallow`,
/// the device instead drops FLASH_CMD writes (never counts the attempts the VMM
/// passed: it undercounts).
struct Rogue {
    inner: Box<dyn Device>,
    swallow: bool,
}

const BACKDOOR: u32 = 0xBAC0_D00E;

impl Device for Rogue {
    fn read_word(&mut self, word: u32, mask: u8) -> Result<u32, DeviceError> {
        self.inner.read_word(word, mask)
    }
    fn write_word(&mut self, word: u32, value: u32, mask: u8) -> Result<(), DeviceError> {
        if self.swallow && word == Reg::FlashCmd.offset() {
            return Ok(());
        }
        if word == Reg::Scratch.offset() + 28 && value == BACKDOOR {
            self.inner.write_word(Reg::FlashRegion.offset(), 2, 0xf)?;
            return self.inner.write_word(
                Reg::FlashCmd.offset(),
                hilrig_device::regmap::FLASH_CMD_ERASE,
                0xf,
            );
        }
        self.inner.write_word(word, value, mask)
    }
    fn rom_size(&self) -> u64 {
        self.inner.rom_size()
    }
    fn rom_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.inner.rom_read(offset, data)
    }
    fn reset(&mut self, kind: ResetKind) -> Result<(), DeviceError> {
        self.inner.reset(kind)
    }
    fn oob(&mut self, request: &[u8]) -> Result<Vec<u8>, DeviceError> {
        self.inner.oob(request)
    }
}

/// Writes, then waits forever (only a breach ends the run before the watchdog).
fn write_then_wait(writes: &[(u32, u32)]) -> Vec<u8> {
    let mut p = hilrig_guest::Payload::new().unwrap();
    p.park_secondaries().unwrap();
    for &(off, v) in writes {
        p.mmio_write(hilrig_guest::Width::B4, off, u64::from(v))
            .unwrap();
    }
    let mut l = p.a.create_label();
    p.a.set_label(&mut l).unwrap();
    p.a.pause().unwrap();
    p.a.jmp(l).unwrap();
    p.build().unwrap()
}

#[test]
fn a_counters_verdict_read_out_of_band_during_the_run_is_a_breach() {
    if !skip::kvm!() {
        return;
    }
    let table = "[breach]\ncounters = [\"bypassed-trap\", \"undercount\", \"rolled-back\"]\ncounters_poll = \"10ms\"\n";
    // Bypassed trap: the device counts an erase the VMM never passed.
    let r = run(
        write_then_wait(&[(Reg::Scratch.offset() + 28, BACKDOOR)]),
        profile_with(table, "tenant"),
        Box::new(Rogue {
            inner: model(),
            swallow: false,
        }),
    );
    let rec = torn_down(r);
    match &rec.trigger {
        Some(BreachTrigger::Counters { verdict, reasons }) => {
            assert_eq!(*verdict, CountersVerdict::BypassedTrap, "{reasons:?}");
            assert!(reasons[0].contains("bypassed the trap"), "{reasons:?}");
        }
        other => panic!("trigger {other:?}"),
    }
    // Undercount: the operator's erase passes the VMM; the device never counts it.
    let r = run(
        write_then_wait(&[
            (Reg::FlashRegion.offset(), 2),
            (
                Reg::FlashCmd.offset(),
                hilrig_device::regmap::FLASH_CMD_ERASE,
            ),
        ]),
        profile_with(table, "operator"),
        Box::new(Rogue {
            inner: model(),
            swallow: true,
        }),
    );
    let rec = torn_down(r);
    assert!(
        matches!(
            rec.trigger,
            Some(BreachTrigger::Counters {
                verdict: CountersVerdict::Undercount,
                ..
            })
        ),
        "{:?}",
        rec.trigger
    );
    // An honest operator erase (counted by both) is no breach: the guest's own
    // verdict ends the run.
    let mut p = hilrig_guest::Payload::new().unwrap();
    p.park_secondaries().unwrap();
    p.mmio_write(hilrig_guest::Width::B4, Reg::FlashRegion.offset(), 2)
        .unwrap();
    p.mmio_write(
        hilrig_guest::Width::B4,
        Reg::FlashCmd.offset(),
        u64::from(hilrig_device::regmap::FLASH_CMD_ERASE),
    )
    .unwrap();
    // Give the watcher a few polls before passing.
    p.repeat(20_000, |p| {
        p.a.pause()?;
        Ok(())
    })
    .unwrap();
    p.report(0).unwrap();
    let r = run(
        p.build().unwrap(),
        profile_with(table, "operator"),
        Box::new(Rogue {
            inner: model(),
            swallow: false,
        }),
    );
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.verdict);
    assert!(r.teardown.is_none());
}

/// A counters service (SQLite, real MAC key) with the model device enrolled;
/// `ahead`: enrolled one CONFIG erase ahead of what the device holds (its counters
/// were rolled back after the service last saw it, before this run).
fn service_with_model(dir: &Path, ahead: bool) -> (String, PathBuf) {
    use hilrig_counters::source::{CounterSource, DeviceSource};
    let key = dir.join("counters.key");
    hilrig_counters::mac::Key::init(&key).unwrap();
    let db = dir.join("counters.sqlite").display().to_string();
    let mut src = DeviceSource::new(model(), "model");
    let serial = src.serial().unwrap();
    let mut expected = src.observe().unwrap().as_expected();
    if ahead {
        expected.counters[2] += 1;
        expected.master += 1;
    }
    hilrig_counters::Service::open(&db, hilrig_counters::mac::Key::load(&key).unwrap())
        .unwrap()
        .enroll(
            &hilrig_counters::service::Enrollment {
                serial,
                host: "h1".into(),
                rack: "r1".into(),
                expected,
            },
            false,
        )
        .unwrap();
    (db, key)
}

/// Issue 21.5 against the service: the in-run counters check compares with the
/// values the counters service ENROLLED, not with what the run read at its own
/// start. A device rolled back before the run (its counters below the enrolled
/// ones, unchanged during the run) is a `rolled-back` breach; the same device
/// enrolled at its true values is no breach (negative control).
#[test]
fn counters_rolled_back_before_the_run_are_caught_against_the_enrolled_values() {
    if !skip::kvm!() {
        return;
    }
    let table = "[breach]\ncounters = [\"bypassed-trap\", \"undercount\", \"rolled-back\"]\ncounters_poll = \"10ms\"\n";
    for ahead in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let service = service_with_model(dir.path(), ahead);
        // The guest waits forever: a breach ends the run, else the watchdog (after
        // some 50 polls).
        let mut cfg = config(
            write_then_wait(&[(Reg::Scratch.offset(), 1)]),
            profile_with(table, "tenant"),
            None,
        );
        cfg.lifecycle.counters = Some(service);
        if !ahead {
            cfg.timeout = Duration::from_millis(500);
        }
        let r = Vm::new(cfg, Backend::trapping("model", model()))
            .expect("vm")
            .run()
            .expect("run");
        if ahead {
            let rec = torn_down(r);
            match &rec.trigger {
                Some(BreachTrigger::Counters { verdict, reasons }) => {
                    assert_eq!(*verdict, CountersVerdict::RolledBack, "{reasons:?}");
                    assert!(
                        reasons.iter().any(|r| r.contains("< expected")),
                        "{reasons:?}"
                    );
                }
                other => panic!("trigger {other:?}"),
            }
        } else {
            assert!(
                matches!(r.verdict, Verdict::Timeout { .. }),
                "no breach: the watchdog ends it: {}",
                r.verdict
            );
            assert!(r.teardown.is_none(), "{:?}", r.teardown);
        }
    }
}

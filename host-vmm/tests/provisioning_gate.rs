//! The provisioning gate (issue 21 item 4): with `--counters-db`, the VMM reads the
//! device's counters out of band and the counters service must vouch for it before
//! the guest starts. Real model state files and a real SQLite service database.

#[path = "common/skip.rs"]
mod skip;

use hilrig_counters::mac::Key;
use hilrig_counters::service::{Enrollment, Service};
use hilrig_counters::source::{CounterSource, DeviceSource};
use hilrig_device::model::ops;
use hilrig_device::{Device, DeviceConfig, DeviceError, Model, Region, ResetKind};
use hilrig_vmm::lifecycle::gate;
use hilrig_vmm_api::{CountersVerdict, ExitStatus, GateOutcome, RunSummary};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Rig {
    dir: tempfile::TempDir,
    db: String,
    key: PathBuf,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("counters.key");
        Key::init(&key).unwrap();
        let db = dir.path().join("counters.sqlite").display().to_string();
        Rig { dir, db, key }
    }

    fn svc(&self) -> Service {
        Service::open(&self.db, Key::load(&self.key).unwrap()).unwrap()
    }

    /// A factory-fresh model device with `serial`.
    fn device(&self, serial: u64) -> PathBuf {
        let p = self.dir.path().join(format!("dev-{serial:x}.state"));
        Model::create(
            &p,
            hilrig_fw::factory::device(DeviceConfig::default(), serial).unwrap(),
        )
        .unwrap();
        p
    }

    /// Enrol the device of `state` with its current values (the lab's enrolment).
    fn enroll(&self, serial: u64, state: &Path) {
        let obs = DeviceSource::model_file(state).unwrap().observe().unwrap();
        self.svc()
            .enroll(
                &Enrollment {
                    serial,
                    host: "h1".into(),
                    rack: "r1".into(),
                    expected: obs.as_expected(),
                },
                false,
            )
            .unwrap();
    }

    fn gate(&self, state: &Path) -> hilrig_vmm_api::GateRecord {
        let mut m = Model::open(state).unwrap();
        gate::check(&mut m, "model", &self.db, &self.key, None)
    }

    fn vmm(&self, state: &Path) -> (i32, Option<RunSummary>, String) {
        self.vmm_with(state, &[])
    }

    fn vmm_with(&self, state: &Path, extra: &[&str]) -> (i32, Option<RunSummary>, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_hilrig-vmm"))
            .args(extra)
            .args(["--payload", "pci-enum", "--mem", "16M", "--device-state"])
            .arg(state)
            .args(["--counters-db", &self.db, "--counters-key"])
            .arg(&self.key)
            .arg("--json")
            .output()
            .expect("run hilrig-vmm");
        (
            out.status.code().unwrap_or(-1),
            RunSummary::from_output(&out.stdout).ok(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The VMM refuses the device before the guest runs (no KVM needed: the gate
    /// runs first), with the gate's record in the summary.
    fn refused(&self, state: &Path) -> hilrig_vmm_api::GateRecord {
        let (code, s, err) = self.vmm(state);
        assert_eq!(code, i32::from(ExitStatus::DeviceUntrusted.code()), "{err}");
        let s = s.expect("a run summary");
        assert_eq!(s.exit_status, ExitStatus::DeviceUntrusted);
        assert!(!s.passed);
        assert_eq!(s.exits.total(), 0, "the guest never ran");
        assert!(err.contains("counters gate:"), "{err}");
        s.gate.expect("the gate's record")
    }
}

/// A refused (locked) erase made on the state file, outside the service: the
/// firmware counter and MASTER rise, nothing is flashed.
fn attempt_behind_the_back(state: &Path) {
    let mut m = Model::open(state).unwrap();
    ops::erase(&mut m, Region::Firmware).unwrap();
}

#[test]
fn an_enrolled_untouched_device_is_trusted_and_starts() {
    let rig = Rig::new();
    let st = rig.device(0x5eed);
    rig.enroll(0x5eed, &st);
    let g = rig.gate(&st);
    assert_eq!(g.outcome, GateOutcome::Trusted, "{g:?}");
    assert_eq!(g.verdict, Some(CountersVerdict::Trusted));
    assert_eq!(g.serial.as_deref(), Some("0x5eed"));
    if !skip::kvm!() {
        return;
    }
    let (code, s, err) = rig.vmm(&st);
    assert_eq!(code, 0, "{err}");
    let s = s.expect("a run summary");
    assert!(s.passed, "{s:?}");
    let g = s.gate.expect("the gate's record in the summary");
    assert_eq!(g.outcome, GateOutcome::Trusted);
    assert_eq!(g.verdict, Some(CountersVerdict::Trusted));
}

#[test]
fn an_unrecorded_update_attempt_is_refused() {
    let rig = Rig::new();
    let st = rig.device(0x5eed);
    rig.enroll(0x5eed, &st);
    attempt_behind_the_back(&st);
    let g = rig.refused(&st);
    assert_eq!(g.outcome, GateOutcome::Untrusted, "{g:?}");
    assert!(
        g.reasons.iter().any(|r| r.contains("no authorised update")),
        "{g:?}"
    );
}

/// Issue 21.4: the refusal sticks. The counters that rose with no authorised
/// intent are not made the new expected values: the device is held for review
/// (hold + the observation as evidence), the VMM with `--counters-db` refuses it
/// twice in a row, and so does a plain `verify`, until an operator clears the
/// hold (logged in the history chain).
#[test]
fn an_unrecorded_update_attempt_is_refused_twice_in_a_row_until_cleared() {
    let rig = Rig::new();
    let st = rig.device(0x5eed);
    rig.enroll(0x5eed, &st);
    let before = rig.svc().device(0x5eed).unwrap().expected;
    attempt_behind_the_back(&st);
    for round in 0..2 {
        let g = rig.refused(&st);
        assert_eq!(g.outcome, GateOutcome::Untrusted, "round {round}: {g:?}");
        assert_eq!(
            g.verdict,
            Some(CountersVerdict::Changed),
            "round {round}: {g:?}"
        );
        assert!(
            g.reasons.iter().any(|r| r.contains("needs-review")),
            "round {round}: {g:?}"
        );
    }
    let mut svc = rig.svc();
    let d = svc.device(0x5eed).unwrap();
    assert_eq!(d.expected, before, "not re-baselined");
    assert_eq!(d.state.name(), "needs-review");
    assert!(!d.hold.is_empty());
    assert!(
        svc.evidence()
            .unwrap()
            .iter()
            .any(|(t, k, _)| t == "observation" && k == "0x5eed"),
        "the observation is kept as evidence"
    );
    // An operator's plain verify (the catalog rule) does not lift it either.
    let r = svc
        .verify(0x5eed, &mut DeviceSource::model_file(&st).unwrap())
        .unwrap();
    assert!(!r.trusted(), "{:?}", r.decision);
    // Cleared by an operator with a reason: logged, then trusted (the factory
    // images are unchanged: a refused erase), and the gate admits it again.
    assert!(svc
        .hold_clear(0x5eed, "", &mut DeviceSource::model_file(&st).unwrap())
        .is_err());
    let r = svc
        .hold_clear(
            0x5eed,
            "ticket 7: the lab's locked-erase test",
            &mut DeviceSource::model_file(&st).unwrap(),
        )
        .unwrap();
    assert!(r.trusted(), "{:?}", r.decision);
    let h = svc.history(Some(0x5eed), 1).unwrap();
    assert!(
        h[0].reasons[0].starts_with("hold cleared by an operator: ticket 7"),
        "{:?}",
        h[0]
    );
    assert!(h[0].intact);
    drop(svc);
    assert_eq!(rig.gate(&st).outcome, GateOutcome::Trusted);
}

#[test]
fn a_rolled_back_then_quarantined_device_is_refused() {
    let rig = Rig::new();
    let st = rig.device(0x5eed);
    let before = std::fs::read(&st).unwrap();
    attempt_behind_the_back(&st);
    rig.enroll(0x5eed, &st);
    // The state file is put back to before the attempt: a rollback.
    std::fs::write(&st, &before).unwrap();
    let g = rig.refused(&st);
    assert_eq!(g.outcome, GateOutcome::Untrusted, "{g:?}");
    assert_eq!(g.verdict, Some(CountersVerdict::RolledBack), "{g:?}");
    // Held: moving the counters forward again does not make it trusted.
    attempt_behind_the_back(&st);
    let g = rig.refused(&st);
    assert_eq!(g.verdict, Some(CountersVerdict::Quarantined), "{g:?}");
    // Untouched since, still quarantined.
    let g = rig.refused(&st);
    assert_eq!(g.verdict, Some(CountersVerdict::Quarantined), "{g:?}");
}

#[test]
fn an_unknown_device_is_refused() {
    let rig = Rig::new();
    let enrolled = rig.device(0x5eed);
    rig.enroll(0x5eed, &enrolled);
    let other = rig.device(0x99);
    let g = rig.refused(&other);
    assert_eq!(g.outcome, GateOutcome::UnknownDevice, "{g:?}");
    assert_eq!(g.verdict, None);
    assert_eq!(g.serial.as_deref(), Some("0x99"));
}

#[test]
fn a_missing_or_foreign_key_is_a_service_error_not_trusted() {
    let rig = Rig::new();
    let st = rig.device(0x5eed);
    rig.enroll(0x5eed, &st);
    let other_key = rig.dir.path().join("other.key");
    Key::init(&other_key).unwrap();
    let mut m = Model::open(&st).unwrap();
    let g = gate::check(&mut m, "model", &rig.db, &other_key, None);
    assert_eq!(g.outcome, GateOutcome::ServiceError, "{g:?}");
    let g = gate::check(
        &mut m,
        "model",
        &rig.db,
        &rig.dir.path().join("nope.key"),
        None,
    );
    assert_eq!(g.outcome, GateOutcome::ServiceError, "{g:?}");
}

/// The model, with its OOB byte interface broken in a chosen way.
struct FaultyOob {
    inner: Model,
    fault: Fault,
}

#[derive(Clone, Copy)]
enum Fault {
    /// The OOB link fails.
    Down,
    /// One bit of every response frame flips (CRC fails).
    Corrupt,
    /// IDENTIFY answers; the counters reads time out (fail after the first reply).
    AfterIdentify,
}

impl Device for FaultyOob {
    fn read_word(&mut self, word: u32, mask: u8) -> Result<u32, DeviceError> {
        self.inner.read_word(word, mask)
    }
    fn write_word(&mut self, word: u32, value: u32, mask: u8) -> Result<(), DeviceError> {
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
        let down = DeviceError::Unsupported {
            backend: "faulty-oob test device",
            what: "out-of-band requests (link down)",
        };
        match self.fault {
            Fault::Down => Err(down),
            Fault::Corrupt => {
                let mut r = self.inner.oob(request)?;
                if let Some(b) = r.get_mut(3) {
                    *b ^= 0x10;
                }
                Ok(r)
            }
            Fault::AfterIdentify => {
                self.fault = Fault::Down;
                self.inner.oob(request)
            }
        }
    }
}

#[test]
fn a_transport_fault_on_the_oob_read_is_reported_as_such() {
    let rig = Rig::new();
    let st = rig.device(0x5eed);
    rig.enroll(0x5eed, &st);
    let history = rig.svc().history(Some(0x5eed), 100).unwrap().len();
    for (fault, what) in [
        (Fault::Down, "link down"),
        (Fault::Corrupt, "corrupt frames"),
        (Fault::AfterIdentify, "fails after IDENTIFY"),
    ] {
        let mut d = FaultyOob {
            inner: Model::open(&st).unwrap(),
            fault,
        };
        let g = gate::check(&mut d, "faulty", &rig.db, &rig.key, None);
        assert_eq!(g.outcome, GateOutcome::TransportFault, "{what}: {g:?}");
        assert_eq!(g.verdict, None, "{what}: no verdict on the device");
        assert!(!g.outcome.admits());
        assert!(
            g.reasons.iter().any(|r| r.contains("out of band")),
            "{what}: {g:?}"
        );
    }
    // Nothing was recorded against the device, which is still trusted.
    assert_eq!(
        rig.svc().history(Some(0x5eed), 100).unwrap().len(),
        history,
        "a transport fault writes no verdict"
    );
    assert_eq!(rig.gate(&st).outcome, GateOutcome::Trusted);
}

#[test]
fn the_gate_reads_out_of_band_not_the_in_band_registers() {
    // A device whose in-band counter registers lie (all zero) but whose OOB
    // interface tells the truth: the gate sees the unrecorded attempt.
    struct LyingInBand(Model);
    impl Device for LyingInBand {
        fn read_word(&mut self, word: u32, mask: u8) -> Result<u32, DeviceError> {
            let off = u64::from(word) * 4;
            // Page 2: the in-band counter registers.
            if (0x2000..0x3000).contains(&off) {
                return Ok(0);
            }
            self.0.read_word(word, mask)
        }
        fn write_word(&mut self, word: u32, value: u32, mask: u8) -> Result<(), DeviceError> {
            self.0.write_word(word, value, mask)
        }
        fn rom_size(&self) -> u64 {
            self.0.rom_size()
        }
        fn rom_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
            self.0.rom_read(offset, data)
        }
        fn reset(&mut self, kind: ResetKind) -> Result<(), DeviceError> {
            self.0.reset(kind)
        }
        fn oob(&mut self, request: &[u8]) -> Result<Vec<u8>, DeviceError> {
            self.0.oob(request)
        }
    }
    let rig = Rig::new();
    let st = rig.device(0x5eed);
    rig.enroll(0x5eed, &st);
    attempt_behind_the_back(&st);
    let mut d = LyingInBand(Model::open(&st).unwrap());
    let g = gate::check(&mut d, "lying", &rig.db, &rig.key, None);
    assert_eq!(g.outcome, GateOutcome::Untrusted, "{g:?}");
}

/// Remediation at the VMM's gate: a refused quarantined (rolled back) device pages
/// a human through `--page-cmd` with its serial and verdict; a trusted device
/// starts and pages nobody (negative control).
#[test]
fn a_quarantined_device_at_the_vmm_gate_pages_the_command() {
    use std::os::unix::fs::PermissionsExt;
    let rig = Rig::new();
    let script = rig.dir.path().join("page.sh");
    let paged = rig.dir.path().join("paged.json");
    std::fs::write(
        &script,
        "#!/bin/sh\nprintf '%s %s\\n' \"$HILRIG_PAGE_SERIAL\" \"$HILRIG_PAGE_VERDICT\" >> \"$1.env\"\ncat > \"$1\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
    let cmd = format!("{} {}", script.display(), paged.display());
    let page = ["--page-cmd", cmd.as_str()];
    if skip::kvm!() {
        let good = rig.device(0x600d);
        rig.enroll(0x600d, &good);
        let (code, _, err) = rig.vmm_with(&good, &page);
        assert_eq!(code, 0, "{err}");
        assert!(!paged.exists(), "a trusted device paged someone");
    }
    let st = rig.device(0x5eed);
    let before = std::fs::read(&st).unwrap();
    attempt_behind_the_back(&st);
    rig.enroll(0x5eed, &st);
    std::fs::write(&st, &before).unwrap();
    let (code, s, err) = rig.vmm_with(&st, &page);
    assert_eq!(code, i32::from(ExitStatus::DeviceUntrusted.code()), "{err}");
    let g = s.expect("a run summary").gate.expect("the gate's record");
    assert_eq!(g.verdict, Some(CountersVerdict::RolledBack), "{g:?}");
    assert!(
        g.reasons
            .iter()
            .any(|r| r.starts_with("paged: page command")),
        "{g:?}"
    );
    assert_eq!(
        std::fs::read_to_string(format!("{}.env", paged.display())).unwrap(),
        "0x5eed rolled-back\n"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&paged).unwrap()).unwrap();
    assert_eq!(v["serial"], "0x5eed");
    assert_eq!(v["state"], "quarantined");
}

//! Quiesced live patches (issue 21 item 7): with `quiesce_patches`, a patch claims
//! every vCPU (those inside KVM_RUN by state, without a kick) and waits only for
//! vCPUs busy in a handler. A test probe makes every handler call slow (a handler
//! that is preempted or just long) and checks, throughout every swap, that no vCPU
//! is inside a handler; the accesses stay old-then-new, each decided once.
//!
//! A vCPU held inside its decision (made under the old rules, device lock held, not
//! committed) does not hold up a quiesced patch: it is claimed by state, and its
//! access is decided again under the new rules, once.
//!
//! A test binary of its own: the probe and the hold are process-wide (the tests
//! here take turns). Skips loudly without /dev/kvm.

#[path = "common/skip.rs"]
mod skip;

mod common;

use common::old_then_new;
use ed25519_dalek::SigningKey;
use hilrig_vmm::lifecycle::patch::PatchAuthority;
use hilrig_vmm::lifecycle::quiesce::{
    handler_probe_for_test, held_deciding_for_test, hold_deciding_for_test, probe_handlers_for_test,
};
use hilrig_vmm::lifecycle::LifecycleConfig;
use hilrig_vmm::policy::{default_policy_toml, PolicyFile, Profile};
use hilrig_vmm::{open_backend, payload, Console, DeviceSpec, RunReport, Verdict, Vm, VmConfig};
use serde_json::Value;
use std::path::Path;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The tests of this binary take turns (the probe and the hold are process-wide).
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const BUILD: [u8; 32] = [5; 32];
const VCPUS: u8 = 8;
const PATCHES: u64 = 40;

/// The default tenant policy plus a rule for every vCPU's own SCRATCH word.
fn policy(action: &str) -> String {
    let mut t = default_policy_toml();
    for i in 0..VCPUS {
        t.push_str(&format!(
            "\n[[profile.tenant]]\nregister = \"SCRATCH[{i}]\"\naccess = \"write\"\naction = \"{action}\"\nalarm = true\n"
        ));
    }
    t
}

fn compile(text: &str) -> Profile {
    PolicyFile::parse(text, "test")
        .unwrap()
        .compile("tenant", "test")
        .unwrap()
}

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

/// Alarms so far on each vCPU's SCRATCH word: each vCPU's own progress.
fn progress(sock: &Path, vcpus: u8) -> Vec<u64> {
    let m = ask(sock, r#"{"op":"metrics"}"#);
    (0..vcpus)
        .map(|i| {
            m["policy"]["per_register"][format!("SCRATCH[{i}]")]
                .as_u64()
                .unwrap_or(0)
        })
        .collect()
}

fn wait_each(sock: &Path, from: &[u64], n: u64, what: &str) {
    let t0 = Instant::now();
    loop {
        let now = progress(sock, from.len() as u8);
        if now.iter().zip(from).all(|(a, b)| *a >= b + n) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what}: per-vCPU progress {now:?} from {from:?}, want +{n}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A storming VM with `vcpus` vCPUs, policy v1 (`allow`, alarmed, per vCPU) and
/// quiesced patches.
struct Storm {
    d: tempfile::TempDir,
    key: SigningKey,
    sock: PathBuf,
    stop: hilrig_vmm::StopHandle,
    thread: std::thread::JoinHandle<RunReport>,
}

fn storm(vcpus: u8) -> Storm {
    let d = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[4; 32]);
    let sock = d.path().join("vm.sock");
    let cfg = VmConfig {
        vcpus,
        mem_size: 8 << 20,
        payload: payload::storm().unwrap(),
        payload_name: "storm".into(),
        timeout: Duration::from_secs(120),
        console: Console::Capture,
        policy: Some(Arc::new(compile(&policy("allow")))),
        record_decisions: true,
        control: Some(sock.clone()),
        lifecycle: LifecycleConfig {
            patch: Some(Arc::new(PatchAuthority {
                trusted: vec![key.verifying_key()],
                decrypt_key: None,
                build_sha256: BUILD,
                module_dir: d.path().join("modules"),
                applied: None,
                allow_widening: false,
            })),
            quiesce_patches: true,
            ..Default::default()
        },
        ..VmConfig::default()
    };
    let vm = Vm::new(cfg, open_backend(&DeviceSpec::Model, None).unwrap()).unwrap();
    let stop = vm.stop_handle();
    let thread = std::thread::spawn(move || vm.run().expect("run"));
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    Storm {
        d,
        key,
        sock,
        stop,
        thread,
    }
}

impl Storm {
    /// Send policy `v` (`drop`, alarmed) as a patch; the reply.
    fn patch(&self, v: u64) -> Value {
        let bundle = hilrig_fw::bundle::build(
            &hilrig_fw::bundle::BundleSpec {
                component: "policy",
                version: v,
                target_vmm_sha256: BUILD,
                payloads: vec![("rules.toml".into(), policy("drop").into_bytes())],
                encrypt_to: None,
                patch_path_sha256: Some(hilrig_vmm::lifecycle::patch_path::measure_patch_path()),
            },
            &self.key,
        )
        .unwrap();
        let path = self.d.path().join(format!("v{v}.bundle"));
        std::fs::write(&path, bundle).unwrap();
        ask(
            &self.sock,
            &serde_json::json!({"op": "patch", "bundle": path}).to_string(),
        )
    }

    /// Stop the VM; its report (stopped as asked).
    fn end(self) -> RunReport {
        self.stop.stop("test done");
        let rep: RunReport = self.thread.join().unwrap();
        assert!(
            matches!(rep.verdict, Verdict::Stopped(_)),
            "{}",
            rep.verdict
        );
        rep
    }
}

#[test]
fn no_quiesced_patch_runs_while_a_vcpu_is_inside_a_handler() {
    let _turn = serial();
    if !skip::kvm!() {
        return;
    }
    let vm = storm(VCPUS);
    let sock = vm.sock.clone();
    wait_each(&sock, &[0; VCPUS as usize], 20, "before the patches");
    // Every handler call now lasts at least 30 us: a pause that did not wait for
    // busy vCPUs would swap under one.
    probe_handlers_for_test(true, Duration::from_micros(30));
    for v in 2..2 + PATCHES {
        let reply = vm.patch(v);
        assert_eq!(reply["ok"], true, "{reply}");
        assert_eq!(reply["quiesced"], true, "{reply}");
        assert!(reply["blackout_us"].as_u64().is_some(), "{reply}");
    }
    let (checks, violations) = handler_probe_for_test();
    probe_handlers_for_test(false, Duration::ZERO);
    assert_eq!(
        checks,
        2 * PATCHES,
        "each patch checked before and after its swap"
    );
    assert_eq!(
        violations, 0,
        "a quiesced patch swapped while a vCPU was inside a handler"
    );
    let after = progress(&sock, VCPUS);
    wait_each(&sock, &after, 20, "after the patches");
    let mut rep = vm.end();
    assert_eq!(rep.patches.len(), PATCHES as usize);
    assert!(rep.patches.iter().all(|p| p.quiesced));
    assert_eq!(rep.blackouts.len(), PATCHES as usize);
    old_then_new(&mut rep, VCPUS);
}

/// Issue 21.7: a vCPU preempted inside its decision — here held there by a test
/// hook, with the access decided under v1 and the device's lock held — does not
/// hold up a quiesced patch: the gate claims it by state. Released, it finds its
/// decision void at its commit point and decides the access again, under v2,
/// exactly once. (Before the commit point existed the vCPU was busy there: the
/// patch waited for it and timed out.)
#[test]
fn a_vcpu_held_inside_its_decision_does_not_hold_up_a_quiesced_patch() {
    let _turn = serial();
    if !skip::kvm!() {
        return;
    }
    const N: u8 = 2;
    let vm = storm(N);
    let sock = vm.sock.clone();
    wait_each(&sock, &[0; N as usize], 20, "before the hold");
    hold_deciding_for_test(1 << 1);
    let t0 = Instant::now();
    while held_deciding_for_test() != 1 << 1 {
        assert!(t0.elapsed() < Duration::from_secs(30), "never held");
        std::thread::sleep(Duration::from_millis(1));
    }
    // vCPU 1's accesses carried out so far (each alarms once, when carried out).
    let before = progress(&sock, N);
    let reply = vm.patch(2);
    let held_after = held_deciding_for_test();
    let held_progress = progress(&sock, N)[1];
    hold_deciding_for_test(0);
    assert_eq!(
        reply["ok"], true,
        "the patch waited for the held vCPU: {reply}"
    );
    assert_eq!(reply["quiesced"], true, "{reply}");
    assert_eq!(
        held_after,
        1 << 1,
        "the held vCPU had to go on for the patch"
    );
    assert_eq!(
        held_progress, before[1],
        "vCPU 1 carried out an access while held"
    );
    let after = progress(&sock, N);
    wait_each(&sock, &after, 20, "after the patch");
    let mut rep = vm.end();
    let switch = old_then_new(&mut rep, N);
    // The held access (decided `allow` by v1 while held) was decided again by v2:
    // the first of vCPU 1's accesses v2 decided, and none carried out twice.
    assert_eq!(
        switch[1] as u64, before[1],
        "vCPU 1: the access held inside its decision was not re-decided by the new rules"
    );
}

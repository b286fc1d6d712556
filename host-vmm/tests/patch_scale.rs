//! Live patching when vCPU threads outnumber cores (issue 21 item 7): a policy
//! patch parks vCPUs by their published state, so vCPU threads the host is not
//! running (here: held between exits by a test hook, like stopped threads) do not
//! hold it up, and they resume correctly under the new rules.
//!
//! A test binary of its own: the hold hook is process-wide. Skips loudly without
//! /dev/kvm.

#[path = "common/skip.rs"]
mod skip;

mod common;

use ed25519_dalek::SigningKey;
use hilrig_vmm::lifecycle::patch::PatchAuthority;
use hilrig_vmm::lifecycle::quiesce::{held_vcpus_for_test, hold_vcpus_for_test};
use hilrig_vmm::lifecycle::LifecycleConfig;
use hilrig_vmm::policy::{default_policy_toml, PolicyFile, Profile};
use hilrig_vmm::{open_backend, payload, Console, DeviceSpec, RunReport, Verdict, Vm, VmConfig};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BUILD: [u8; 32] = [9; 32];
const VCPUS: u8 = 8;
/// vCPUs 4..8 are held outside KVM_RUN while the patch happens.
const HELD: u64 = 0xf0;

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

fn regs() -> Vec<String> {
    (0..VCPUS).map(|i| format!("SCRATCH[{i}]")).collect()
}

/// Alarms so far on each vCPU's SCRATCH word: each vCPU's own progress.
fn progress(sock: &Path) -> Vec<u64> {
    let m = ask(sock, r#"{"op":"metrics"}"#);
    regs()
        .iter()
        .map(|r| m["policy"]["per_register"][r].as_u64().unwrap_or(0))
        .collect()
}

/// Wait (bounded) until each vCPU in `which` (index bits) made `n` accesses since `from`.
fn wait_each(sock: &Path, which: u64, from: &[u64], n: u64, what: &str) {
    let t0 = Instant::now();
    loop {
        let now = progress(sock);
        if (0..VCPUS as usize).all(|i| which & (1 << i) == 0 || now[i] >= from[i] + n) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what}: per-vCPU progress {now:?} from {from:?}, want +{n} for {which:#x}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_patch_with_8_vcpus_does_not_wait_for_vcpus_held_outside_kvm_run() {
    if !skip::kvm!() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[3; 32]);
    let sock = d.path().join("vm.sock");
    let cfg = VmConfig {
        vcpus: VCPUS,
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
    // Every vCPU storms under v1 (allowed, alarmed).
    wait_each(&sock, 0xff, &[0; 8], 20, "before the hold");
    // Hold vCPUs 4..8 between exits, as if their threads were stopped.
    hold_vcpus_for_test(HELD);
    let t0 = Instant::now();
    while held_vcpus_for_test() != HELD {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "held {:#x}",
            held_vcpus_for_test()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = progress(&sock);
    // The others go on.
    wait_each(&sock, 0x0f, &before, 20, "held: the others");
    let bundle = hilrig_fw::bundle::build(
        &hilrig_fw::bundle::BundleSpec {
            component: "policy",
            version: 2,
            target_vmm_sha256: BUILD,
            payloads: vec![("rules.toml".into(), policy("drop").into_bytes())],
            encrypt_to: None,
            patch_path_sha256: Some(hilrig_vmm::lifecycle::patch_path::measure_patch_path()),
        },
        &key,
    )
    .unwrap();
    let path = d.path().join("v2.bundle");
    std::fs::write(&path, bundle).unwrap();
    let reply = ask(
        &sock,
        &serde_json::json!({"op": "patch", "bundle": path}).to_string(),
    );
    let held_after = held_vcpus_for_test();
    assert_eq!(reply["ok"], true, "{reply}");
    // A policy patch is a swap of the policy's module-table slot: no vCPU waits.
    assert_eq!(reply["quiesced"], false, "{reply}");
    assert!(reply["blackout_us"].as_u64().is_some(), "{reply}");
    // The patch is done while the held vCPUs are still held: it did not wait for them.
    assert_eq!(held_after, HELD, "a held vCPU had to run for the patch");
    // A quiesce (every vCPU parked) also completes while they are held: they are
    // parked by their published state, not by waiting for them to run.
    let q = ask(&sock, &serde_json::json!({"op": "quiesce"}).to_string());
    assert_eq!(q["ok"], true, "{q}");
    assert_eq!(
        held_vcpus_for_test(),
        HELD,
        "a held vCPU had to run for the quiesce"
    );
    let held_progress = progress(&sock);
    for (i, (now, was)) in held_progress.iter().zip(&before).enumerate().skip(4) {
        assert_eq!(
            now, was,
            "vCPU {i} ran while held: {held_progress:?} {before:?}"
        );
    }
    // Released, every vCPU (the held ones too) makes progress under v2.
    hold_vcpus_for_test(0);
    let after = progress(&sock);
    wait_each(&sock, 0xff, &after, 20, "after the patch");
    stop.stop("test done");
    let mut rep: RunReport = thread.join().unwrap();
    assert!(
        matches!(rep.verdict, Verdict::Stopped(_)),
        "{}",
        rep.verdict
    );
    assert_eq!(rep.blackouts.len(), 1);
    assert_eq!(rep.blackouts[0].vcpus, VCPUS as usize);
    common::old_then_new(&mut rep, VCPUS);
}

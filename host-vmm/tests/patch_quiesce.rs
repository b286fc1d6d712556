//! Quiesced live patches (issue 21 item 7): with `quiesce_patches`, a patch claims
//! every vCPU (those inside KVM_RUN by state, without a kick) and waits only for
//! vCPUs busy in a handler. A test probe makes every handler call slow (a handler
//! that is preempted or just long) and checks, throughout every swap, that no vCPU
//! is inside a handler; the accesses stay old-then-new, each decided once.
//!
//! A test binary of its own: the probe is process-wide. Skips loudly without
//! /dev/kvm.

use ed25519_dalek::SigningKey;
use hilrig_device::regmap::Reg;
use hilrig_vmm::lifecycle::patch::PatchAuthority;
use hilrig_vmm::lifecycle::quiesce::{handler_probe_for_test, probe_handlers_for_test};
use hilrig_vmm::lifecycle::LifecycleConfig;
use hilrig_vmm::policy::{default_policy_toml, Action, PolicyFile, Profile};
use hilrig_vmm::{
    kvm_available, open_backend, payload, Console, DeviceSpec, RunReport, Verdict, Vm, VmConfig,
};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
fn progress(sock: &Path) -> Vec<u64> {
    let m = ask(sock, r#"{"op":"metrics"}"#);
    (0..VCPUS)
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
        let now = progress(sock);
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

#[test]
fn no_quiesced_patch_runs_while_a_vcpu_is_inside_a_handler() {
    if !kvm_available() {
        eprintln!("SKIPPED: /dev/kvm not available");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[4; 32]);
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
    wait_each(&sock, &[0; VCPUS as usize], 20, "before the patches");
    // Every handler call now lasts at least 30 us: a pause that did not wait for
    // busy vCPUs would swap under one.
    probe_handlers_for_test(true, Duration::from_micros(30));
    for v in 2..2 + PATCHES {
        let bundle = hilrig_fw::bundle::build(
            &hilrig_fw::bundle::BundleSpec {
                component: "policy",
                version: v,
                target_vmm_sha256: BUILD,
                payloads: vec![("rules.toml".into(), policy("drop").into_bytes())],
                encrypt_to: None,
                patch_path_sha256: Some(hilrig_vmm::lifecycle::patch_path::measure_patch_path()),
            },
            &key,
        )
        .unwrap();
        let path = d.path().join(format!("v{v}.bundle"));
        std::fs::write(&path, bundle).unwrap();
        let reply = ask(
            &sock,
            &serde_json::json!({"op": "patch", "bundle": path}).to_string(),
        );
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
    let after = progress(&sock);
    wait_each(&sock, &after, 20, "after the patches");
    stop.stop("test done");
    let mut rep: RunReport = thread.join().unwrap();
    assert!(
        matches!(rep.verdict, Verdict::Stopped(_)),
        "{}",
        rep.verdict
    );
    assert_eq!(rep.patches.len(), PATCHES as usize);
    assert!(rep.patches.iter().all(|p| p.quiesced));
    assert_eq!(rep.blackouts.len(), PATCHES as usize);
    let pol = rep.policy.take().unwrap();
    let mut dev = rep.device.take().unwrap();
    for vcpu in 0..VCPUS as u32 {
        let word = Reg::Scratch.offset() + 4 * vcpu;
        let writes: Vec<_> = pol
            .decided
            .iter()
            .filter(|x| x.write && x.word == word)
            .collect();
        for (i, w) in writes.iter().enumerate() {
            assert_eq!(
                w.bits,
                i as u32 + 1,
                "vCPU {vcpu}: access {i} out of order or twice"
            );
        }
        let switch = writes
            .iter()
            .position(|w| w.action == Action::Drop)
            .unwrap_or_else(|| panic!("vCPU {vcpu}: the new rules decided none"));
        assert!(switch > 0, "vCPU {vcpu}: the old rules decided none");
        assert!(writes[switch..].iter().all(|w| w.action == Action::Drop));
        assert_eq!(dev.read32(word).unwrap(), switch as u32, "vCPU {vcpu}");
    }
}

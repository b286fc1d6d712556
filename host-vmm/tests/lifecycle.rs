//! Live patching and secure teardown on real KVM, driven through the control socket.
//! Each test skips loudly when /dev/kvm is absent.

#[path = "common/skip.rs"]
mod skip;

mod common;

use ed25519_dalek::SigningKey;
use hilrig_device::regmap::Reg;
use hilrig_vmm::lifecycle::patch::PatchAuthority;
use hilrig_vmm::lifecycle::LifecycleConfig;
use hilrig_vmm::policy::{default_policy_toml, load_profile};
use hilrig_vmm::{open_backend, payload, Console, DeviceSpec, RunReport, Verdict, Vm, VmConfig};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BUILD: [u8; 32] = [7; 32];

fn authority(dir: &Path) -> Arc<PatchAuthority> {
    Arc::new(PatchAuthority {
        trusted: vec![SigningKey::from_bytes(&[1; 32]).verifying_key()],
        decrypt_key: None,
        build_sha256: BUILD,
        module_dir: dir.join("modules"),
        applied: None,
        allow_widening: false,
    })
}

fn bundle(
    dir: &Path,
    name: &str,
    component: &str,
    version: u64,
    payload: (&str, Vec<u8>),
    key: u8,
    build: [u8; 32],
) -> PathBuf {
    let b = hilrig_fw::bundle::build(
        &hilrig_fw::bundle::BundleSpec {
            component,
            version,
            target_vmm_sha256: build,
            payloads: vec![(payload.0.to_string(), payload.1)],
            encrypt_to: None,
            patch_path_sha256: Some(hilrig_vmm::lifecycle::patch_path::measure_patch_path()),
        },
        &SigningKey::from_bytes(&[key; 32]),
    )
    .unwrap();
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

/// The default tenant policy plus: writes to SCRATCH[0] and SCRATCH[1] dropped with an alarm.
fn policy_v2() -> Vec<u8> {
    let mut t = default_policy_toml();
    for i in 0..2 {
        t.push_str(&format!(
            "\n[[profile.tenant]]\nregister = \"SCRATCH[{i}]\"\naccess = \"write\"\naction = \"drop\"\nalarm = true\n"
        ));
    }
    t.into_bytes()
}

struct Running {
    sock: PathBuf,
    thread: std::thread::JoinHandle<RunReport>,
    stop: hilrig_vmm::StopHandle,
    handler: Arc<HandlerSlot>,
}

type HandlerSlot =
    hilrig_vmm::lifecycle::modules::Slot<Option<hilrig_vmm::lifecycle::modules::NativeHandler>>;

fn start(
    dir: &Path,
    payload: Vec<u8>,
    vcpus: u8,
    record: bool,
    life: LifecycleConfig,
    backend: hilrig_vmm::Backend,
) -> Running {
    start_with(
        dir,
        payload,
        vcpus,
        record,
        life,
        backend,
        load_profile(None, "tenant").unwrap(),
    )
}

fn start_with(
    dir: &Path,
    payload: Vec<u8>,
    vcpus: u8,
    record: bool,
    life: LifecycleConfig,
    backend: hilrig_vmm::Backend,
    profile: hilrig_vmm::policy::Profile,
) -> Running {
    let sock = dir.join("vm.sock");
    let cfg = VmConfig {
        vcpus,
        mem_size: 8 << 20,
        payload,
        payload_name: "test".into(),
        timeout: Duration::from_secs(60),
        console: Console::Capture,
        policy: Some(Arc::new(profile)),
        record_decisions: record,
        control: Some(sock.clone()),
        lifecycle: life,
        ..VmConfig::default()
    };
    let vm = Vm::new(cfg, backend).expect("vm");
    let stop = vm.stop_handle();
    let handler = vm.handler_slot();
    let thread = std::thread::spawn(move || vm.run().expect("run"));
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "control socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Running {
        sock,
        thread,
        stop,
        handler,
    }
}

/// One raw request line, its raw reply: these tests check the wire format itself.
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

fn patch(sock: &Path, bundle: &Path) -> Value {
    ask(
        sock,
        &serde_json::json!({"op": "patch", "bundle": bundle}).to_string(),
    )
}

fn model() -> hilrig_vmm::Backend {
    open_backend(&DeviceSpec::Model, None).expect("model backend")
}

/// Wait until the guest has made progress (decided accesses keep growing).
fn settle(sock: &Path) {
    let t0 = Instant::now();
    loop {
        let m = ask(sock, r#"{"op":"metrics"}"#);
        if m["policy"]["parts"].as_u64().unwrap_or(0) > 20 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the guest made no progress: {m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The default tenant policy plus: writes to SCRATCH[0] and SCRATCH[1] allowed with
/// an alarm (so each vCPU's own progress shows in the per-register alarm counts).
fn policy_v1_alarmed() -> hilrig_vmm::policy::Profile {
    let mut t = default_policy_toml();
    for i in 0..2 {
        t.push_str(&format!(
            "\n[[profile.tenant]]\nregister = \"SCRATCH[{i}]\"\naccess = \"write\"\naction = \"allow\"\nalarm = true\n"
        ));
    }
    hilrig_vmm::policy::PolicyFile::parse(&t, "v1")
        .unwrap()
        .compile("tenant", "v1")
        .unwrap()
}

/// Alarms raised so far on each of `regs` (the metrics' per-register counts).
fn alarms_per(sock: &Path, regs: &[&str]) -> Vec<u64> {
    let m = ask(sock, r#"{"op":"metrics"}"#);
    regs.iter()
        .map(|r| m["policy"]["per_register"][*r].as_u64().unwrap_or(0))
        .collect()
}

/// Wait (bounded) until every register in `regs` has `n` more alarms than `from`:
/// each vCPU's own progress, not a total one vCPU could make alone.
fn wait_each(sock: &Path, regs: &[&str], from: &[u64], n: u64, what: &str) {
    let t0 = Instant::now();
    loop {
        let now = alarms_per(sock, regs);
        if now.iter().zip(from).all(|(a, b)| *a >= b + n) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what}: per-register alarms {now:?}, from {from:?}, want +{n} each"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn policy_patch_under_an_mmio_storm_is_atomic_per_access() {
    if !skip::kvm!() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let life = LifecycleConfig {
        patch: Some(authority(d.path())),
        ..Default::default()
    };
    let r = start_with(
        d.path(),
        payload::storm().unwrap(),
        2,
        true,
        life,
        model(),
        policy_v1_alarmed(),
    );
    // Both vCPUs (each writes its own SCRATCH word) have made progress under v1.
    let regs = ["SCRATCH[0]", "SCRATCH[1]"];
    wait_each(&r.sock, &regs, &[0, 0], 20, "before the patch");
    let b = bundle(
        d.path(),
        "p2.bundle",
        "policy",
        2,
        ("rules.toml", policy_v2()),
        1,
        BUILD,
    );
    let reply = patch(&r.sock, &b);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(
        (reply["from"].as_u64(), reply["to"].as_u64()),
        (Some(1), Some(2))
    );
    assert!(reply["blackout_us"].as_u64().is_some(), "{reply}");
    // Let the storm run under the new rules until each vCPU has had 20 of its own
    // writes dropped (alarmed), then stop.
    let after = alarms_per(&r.sock, &regs);
    wait_each(&r.sock, &regs, &after, 20, "after the patch");
    r.stop.stop("test done");
    let mut rep = r.thread.join().unwrap();
    assert!(
        matches!(rep.verdict, Verdict::Stopped(_)),
        "the guest saw no fault: {}",
        rep.verdict
    );
    common::old_then_new(&mut rep, 2);
    assert_eq!(rep.patches.len(), 1);
    // The policy is a module-table slot: swapped without parking the vCPUs.
    assert!(!rep.patches[0].quiesced, "{:?}", rep.patches[0]);
    assert!(rep.patches[0].blackout_us.is_some());
    assert!(rep.blackouts.is_empty(), "no quiesce: {:?}", rep.blackouts);
}

#[test]
fn bad_bundles_are_refused_and_the_vm_runs_on_unchanged() {
    if !skip::kvm!() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let life = LifecycleConfig {
        patch: Some(authority(d.path())),
        ..Default::default()
    };
    let r = start(d.path(), payload::storm().unwrap(), 1, false, life, model());
    settle(&r.sock);
    let good = std::fs::read(bundle(
        d.path(),
        "good",
        "policy",
        3,
        ("r.toml", policy_v2()),
        1,
        BUILD,
    ))
    .unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let mut tampered = good.clone();
    let n = tampered.len();
    tampered[n - 3] ^= 1;
    let cases = [
        (
            bundle(
                d.path(),
                "sig",
                "policy",
                3,
                ("r.toml", policy_v2()),
                9,
                BUILD,
            ),
            "not a trusted key",
        ),
        (write("hash", &tampered), "SHA-256 does not match"),
        (
            bundle(
                d.path(),
                "build",
                "policy",
                3,
                ("r.toml", policy_v2()),
                1,
                [8; 32],
            ),
            "targets VMM build",
        ),
        (
            bundle(
                d.path(),
                "same",
                "policy",
                1,
                ("r.toml", policy_v2()),
                1,
                BUILD,
            ),
            "not newer",
        ),
        (
            bundle(
                d.path(),
                "older",
                "policy",
                0,
                ("r.toml", policy_v2()),
                1,
                BUILD,
            ),
            "not newer",
        ),
        (write("trunc", &good[..good.len() / 2]), "truncated"),
        (d.path().join("missing"), "No such file"),
    ];
    for (path, want) in cases {
        let reply = patch(&r.sock, &path);
        assert_eq!(reply["ok"], false, "{path:?} was accepted");
        assert!(
            reply["error"].as_str().unwrap().contains(want),
            "{path:?}: {reply}"
        );
        let st = ask(&r.sock, r#"{"op":"status"}"#);
        assert_eq!(st["state"], "running", "{st}");
        assert_eq!(st["versions"]["policy"], 1, "{st}");
    }
    // Still running and still deciding accesses under the original rules.
    let m0 = ask(&r.sock, r#"{"op":"metrics"}"#)["policy"]["parts"]
        .as_u64()
        .unwrap();
    let t0 = Instant::now();
    while ask(&r.sock, r#"{"op":"metrics"}"#)["policy"]["parts"]
        .as_u64()
        .unwrap()
        <= m0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the VM stopped making progress"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        ask(&r.sock, r#"{"op":"metrics"}"#)["blackouts"]["count"],
        0,
        "a refused patch never paused the VM"
    );
    r.stop.stop("test done");
    let rep = r.thread.join().unwrap();
    assert!(rep.patches.is_empty());
}

fn run_tenant(payload: Vec<u8>, backend: hilrig_vmm::Backend, teardown: bool) -> RunReport {
    let cfg = VmConfig {
        vcpus: 1,
        mem_size: 8 << 20,
        payload,
        payload_name: "tenant".into(),
        timeout: Duration::from_secs(60),
        console: Console::Capture,
        policy: Some(Arc::new(load_profile(None, "tenant").unwrap())),
        lifecycle: LifecycleConfig {
            teardown_on_exit: teardown,
            vmm_key: Some(SigningKey::from_bytes(&[5; 32])),
            ..Default::default()
        },
        ..VmConfig::default()
    };
    Vm::new(cfg, backend).expect("vm").run().expect("run")
}

#[test]
fn no_canary_survives_teardown_for_the_next_tenant() {
    if !skip::kvm!() {
        return;
    }
    // Negative control: without teardown the next tenant finds the first one's data.
    let first = run_tenant(payload::canary_write().unwrap(), model(), false);
    assert_eq!(first.verdict, Verdict::Pass, "{}", first.verdict);
    let dev = first.device.expect("device back");
    let second = run_tenant(
        payload::canary_scan().unwrap(),
        hilrig_vmm::Backend::trapping("model", dev),
        false,
    );
    assert!(
        matches!(
            second.verdict,
            Verdict::Fail {
                code: 0x0D | 0x0E,
                ..
            }
        ),
        "the scanner must see leftovers: {}",
        second.verdict
    );

    // With teardown: nothing is left in RAM, SCRATCH or the buffers.
    let first = run_tenant(payload::canary_write().unwrap(), model(), true);
    assert_eq!(first.verdict, Verdict::Pass, "{}", first.verdict);
    let rec = first.teardown.clone().expect("teardown record");
    assert!(rec.complete, "{rec:?}");
    assert_eq!(rec.guest_bytes_scrubbed, 8 << 20);
    assert!(rec.device_bytes_scrubbed >= hilrig_device::regmap::BUFFER_SIZE as u64);
    assert_eq!(
        rec.steps
            .iter()
            .map(|s| s.step.as_str())
            .collect::<Vec<_>>(),
        hilrig_vmm::lifecycle::teardown::STEPS.to_vec()
    );
    assert_eq!(
        rec.verdict.as_ref().unwrap().verdict,
        hilrig_device::attest::Verdict::Trusted,
        "no update attempts: counters unchanged"
    );
    rec.verify(&SigningKey::from_bytes(&[5; 32]).verifying_key())
        .unwrap();
    let dev = first.device.expect("device back");
    let second = run_tenant(
        payload::canary_scan().unwrap(),
        hilrig_vmm::Backend::trapping("model", dev),
        false,
    );
    assert_eq!(
        second.verdict,
        Verdict::Pass,
        "canary found after teardown: {}",
        second.verdict
    );
}

#[test]
fn teardown_under_a_flooding_or_spinning_guest_finishes_within_its_bound() {
    if !skip::kvm!() {
        return;
    }
    // A storm of trapped writes on 2 vCPUs, and a guest spinning with interrupts off.
    let mut spin = hilrig_vmm::payload::Payload::new().unwrap();
    {
        let mut l = spin.a.create_label();
        spin.a.cli().unwrap();
        spin.a.set_label(&mut l).unwrap();
        spin.a.jmp(l).unwrap();
    }
    for (name, code) in [
        ("storm", payload::storm().unwrap()),
        ("cli-spin", spin.build().unwrap()),
    ] {
        let d = tempfile::tempdir().unwrap();
        let life = LifecycleConfig {
            teardown_record: Some(d.path().join("teardown.json")),
            ..Default::default()
        };
        let r = start(d.path(), code, 2, false, life, model());
        std::thread::sleep(Duration::from_millis(200));
        let reply = ask(&r.sock, r#"{"op":"teardown"}"#);
        assert_eq!(reply["ok"], true, "{name}: {reply}");
        let rec: hilrig_vmm::lifecycle::teardown::TeardownRecord =
            serde_json::from_value(reply.clone()).unwrap();
        assert!(rec.complete, "{name}: {rec:?}");
        // The pause is bounded (250 ms to park, then escalation to stopping within
        // 4x that) whatever the guest does, also on a loaded machine.
        let pause = rec.steps[0].micros;
        assert!(pause < 1_250_000, "{name}: pausing took {pause} us");
        let rep = r.thread.join().unwrap();
        assert_eq!(rep.verdict, Verdict::Stopped("torn down".into()), "{name}");
        let on_disk: hilrig_vmm::lifecycle::teardown::TeardownRecord =
            serde_json::from_slice(&std::fs::read(d.path().join("teardown.json")).unwrap())
                .unwrap();
        assert_eq!(on_disk, rec);
    }
}

#[test]
fn a_native_device_handler_patch_lands_in_the_running_guest() {
    if !skip::kvm!() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // The guest reads VERSION until it changes, reports the new value, and passes.
    let mut p = hilrig_vmm::payload::Payload::new().unwrap();
    {
        use iced_x86::code_asm::*;
        let mut l = p.a.create_label();
        p.a.set_label(&mut l).unwrap();
        p.a.mov(eax, dword_ptr(rdi + Reg::Version.offset() as i32))
            .unwrap();
        p.a.cmp(eax, hilrig_device::regmap::DEVICE_VERSION_VALUE)
            .unwrap();
        p.a.je(l).unwrap();
        p.a.mov(dx, hilrig_vmm::vstate::layout::PORT_RESULT as u32)
            .unwrap();
        p.a.out(dx, eax).unwrap();
    }
    p.report(0).unwrap();
    let life = LifecycleConfig {
        patch: Some(authority(d.path())),
        ..Default::default()
    };
    let r = start(d.path(), p.build().unwrap(), 1, false, life, model());
    settle(&r.sock);
    let lib = build_demo_module(d.path(), 2, 0x0001_0002);
    let b = bundle(
        d.path(),
        "h.bundle",
        "device-handler",
        2,
        ("libdemo.so", std::fs::read(lib).unwrap()),
        1,
        BUILD,
    );
    let reply = patch(&r.sock, &b);
    assert_eq!(reply["ok"], true, "{reply}");
    let rep = r.thread.join().unwrap();
    assert_eq!(rep.verdict, Verdict::Pass, "{}", rep.verdict);
    assert_eq!(
        rep.results,
        vec![0x0001_0002],
        "the guest saw the new module's VERSION"
    );
}

/// Issue 21.3 pull mode: a bundle dropped into the patch source directory is applied
/// to the running guest with no control request.
#[test]
fn a_bundle_in_the_patch_source_directory_is_applied() {
    if !skip::kvm!() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mut p = hilrig_vmm::payload::Payload::new().unwrap();
    {
        use iced_x86::code_asm::*;
        let mut l = p.a.create_label();
        p.a.set_label(&mut l).unwrap();
        p.a.mov(eax, dword_ptr(rdi + Reg::Version.offset() as i32))
            .unwrap();
        p.a.cmp(eax, hilrig_device::regmap::DEVICE_VERSION_VALUE)
            .unwrap();
        p.a.je(l).unwrap();
        p.a.mov(dx, hilrig_vmm::vstate::layout::PORT_RESULT as u32)
            .unwrap();
        p.a.out(dx, eax).unwrap();
    }
    p.report(0).unwrap();
    let source = d.path().join("incoming");
    std::fs::create_dir(&source).unwrap();
    let life = LifecycleConfig {
        patch: Some(authority(d.path())),
        patch_source: Some(source.clone()),
        patch_poll: Duration::from_millis(20),
        ..Default::default()
    };
    let r = start(d.path(), p.build().unwrap(), 1, false, life, model());
    settle(&r.sock);
    let lib = build_demo_module(d.path(), 2, 0x0001_0002);
    let b = bundle(
        d.path(),
        "h.tmp",
        "device-handler",
        2,
        ("libdemo.so", std::fs::read(lib).unwrap()),
        1,
        BUILD,
    );
    // Noise the poller must ignore: another extension, a directory.
    std::fs::write(source.join("notes.txt"), b"x").unwrap();
    std::fs::create_dir(source.join("d.bundle")).unwrap();
    std::fs::rename(&b, source.join("h.bundle")).unwrap();
    let rep = r.thread.join().unwrap();
    assert_eq!(rep.verdict, Verdict::Pass, "{}", rep.verdict);
    assert_eq!(
        rep.results,
        vec![0x0001_0002],
        "the pulled handler answered"
    );
}

/// Issue 21.5, the module table's trigger end to end: a VM runs, its device handler
/// is swapped (v2 → v3, under load: v2's code retired), a call through v2's stale
/// code address faults and is turned back, and the policy file's
/// `[breach] stale_module_calls = true` tears the tenant down with the trigger named.
/// Negative control: the same stale call under a policy without the trigger is an
/// alarm only; the VM runs on.
#[test]
fn a_stale_module_call_is_a_breach_that_tears_the_tenant_down() {
    use hilrig_vmm::lifecycle::modules::STALE_CODE;
    use hilrig_vmm_api::teardown::BreachTrigger;
    if !skip::kvm!() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let libs: Vec<Vec<u8>> = [2u64, 3]
        .iter()
        .map(|&v| std::fs::read(build_demo_module(d.path(), v, 0x0001_0000 + v as u32)).unwrap())
        .collect();
    for armed in [true, false] {
        let dir = d.path().join(format!("armed-{armed}"));
        std::fs::create_dir(&dir).unwrap();
        let breach = if armed {
            "[breach]\naction = \"teardown\"\nstale_module_calls = true\n"
        } else {
            ""
        };
        let text = format!("{}\n{breach}", default_policy_toml());
        let profile = hilrig_vmm::policy::PolicyFile::parse(&text, "breach.toml")
            .and_then(|f| f.compile("tenant", "breach.toml"))
            .expect("policy");
        let life = LifecycleConfig {
            patch: Some(authority(&dir)),
            ..Default::default()
        };
        let r = start_with(
            &dir,
            payload::storm().unwrap(),
            1,
            false,
            life,
            model(),
            profile,
        );
        let mut kept = None;
        for (i, lib) in libs.iter().enumerate() {
            let version = 2 + i as u64;
            let b = bundle(
                &dir,
                &format!("h{version}.bundle"),
                "device-handler",
                version,
                ("libdemo.so", lib.clone()),
                1,
                BUILD,
            );
            let reply = patch(&r.sock, &b);
            assert_eq!(reply["ok"], true, "{reply}");
            if version == 2 {
                // A caller that keeps v2's code address across the next swap.
                kept = Some(r.handler.handle());
            }
        }
        let kept = kept.unwrap();
        let old = kept
            .module_unchecked()
            .as_ref()
            .expect("v2 is a native module");
        assert_eq!(
            old.on_access(Reg::Version.offset(), false, 0),
            Err(STALE_CODE),
            "v2's retired code must fault, not run"
        );
        if armed {
            let rep = r.thread.join().unwrap();
            assert_eq!(
                rep.verdict,
                Verdict::Stopped("torn down".into()),
                "{}",
                rep.verdict
            );
            let rec = rep.teardown.expect("a teardown record");
            assert!(rec.complete, "{rec:?}");
            assert!(
                matches!(rec.trigger, Some(BreachTrigger::StaleModuleCall { calls }) if calls >= 1),
                "{:?}",
                rec.trigger
            );
        } else {
            // Not a breach here: the VM runs on (well past the watcher's tick).
            std::thread::sleep(Duration::from_millis(300));
            let st = ask(&r.sock, r#"{"op":"status"}"#);
            assert_eq!(st["ok"], true, "the VM runs on: {st}");
            let m = ask(&r.sock, r#"{"op":"metrics"}"#);
            assert!(m["module_alarms"].as_u64().unwrap() >= 1, "{m}");
            r.stop.stop("test done");
            let rep = r.thread.join().unwrap();
            assert!(rep.teardown.is_none(), "{:?}", rep.teardown);
            assert!(
                matches!(rep.verdict, Verdict::Stopped(ref w) if w != "torn down"),
                "{}",
                rep.verdict
            );
        }
    }
}

/// Issue 21.7: a long-running VMM patched many times never runs out of room for
/// its retired code. One VM takes more than 64 device-handler patches (each swap
/// retires the version before it); every swap retires its old code (the reply
/// carries the swap's duration: no retire failed), and calls through the stale code
/// of the first and of the last retired versions both fault and are counted. Fails
/// with a fixed table of 64 retired modules: the 65th retire failed and left that
/// version's code executable. (Quick: one module build, its declared version
/// rewritten per patch; a 1-vCPU guest.) Retired modules' memfds are closed: the
/// descriptors do not pile up either.
#[test]
fn more_than_64_handler_patches_in_one_vmm_still_fault_stale_calls() {
    use hilrig_vmm::lifecycle::modules::{stale_address_faults, STALE_CODE};
    if !skip::kvm!() {
        return;
    }
    const PATCHES: u64 = 70;
    const MAGIC: u64 = 0x7e57_ab1e_0000_0000;
    let d = tempfile::tempdir().unwrap();
    let lib = std::fs::read(build_demo_module(d.path(), MAGIC, 0x0001_0000)).unwrap();
    // The descriptor's version: the one place the magic sits in the library.
    let at: Vec<usize> = lib
        .windows(8)
        .enumerate()
        .filter(|(_, w)| *w == MAGIC.to_le_bytes())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "the module's version word is unique");
    let life = LifecycleConfig {
        patch: Some(authority(d.path())),
        ..Default::default()
    };
    let r = start(d.path(), payload::storm().unwrap(), 1, false, life, model());
    let mut kept = Vec::new();
    for version in 2..2 + PATCHES {
        let mut so = lib.clone();
        so[at[0]..at[0] + 8].copy_from_slice(&version.to_le_bytes());
        let b = bundle(
            d.path(),
            &format!("h{version}.bundle"),
            "device-handler",
            version,
            ("libdemo.so", so),
            1,
            BUILD,
        );
        let reply = patch(&r.sock, &b);
        assert_eq!(reply["ok"], true, "v{version}: {reply}");
        if version > 2 {
            assert!(
                reply["swap_us"].is_u64(),
                "v{version}: the old code was not retired: {reply}"
            );
        }
        kept.push(r.handler.handle());
    }
    // Every version but the last is retired: its code faults, it never runs.
    let version_reg = Reg::Version.offset();
    for (i, h) in [(0, &kept[0]), (kept.len() - 2, &kept[kept.len() - 2])] {
        let before = stale_address_faults();
        let old = h.module_unchecked().as_ref().expect("a native module");
        assert_eq!(
            old.on_access(version_reg, false, 0),
            Err(STALE_CODE),
            "v{}: retired code must fault, not run",
            i + 2
        );
        assert!(stale_address_faults() > before, "counted");
    }
    // Retired modules hold no descriptor (their memfds are closed; the mappings
    // keep the bytes): a long-running VMM does not run out of fds either.
    let memfds = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().contains("memfd:hilrig-module-"))
        .count();
    assert!(
        memfds < 20,
        "{memfds} module memfds open after {PATCHES} patches"
    );
    // The installed one runs.
    let last = kept[kept.len() - 1]
        .module_unchecked()
        .as_ref()
        .expect("a native module");
    assert!(last.on_access(version_reg, false, 0).is_ok());
    r.stop.stop("test done");
    r.thread.join().unwrap();
}

fn build_demo_module(dir: &Path, version: u64, reg: u32) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("modules/demo_handler.rs");
    let out = dir.join(format!("libdemo_v{version}.so"));
    let st = std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args([
            "--edition=2021",
            "--crate-type=cdylib",
            "-O",
            "--crate-name",
            "demo_handler",
            "-o",
        ])
        .arg(&out)
        .arg(&src)
        .env("DEMO_VERSION", version.to_string())
        .env("DEMO_VERSION_REG", format!("{reg:#x}"))
        .status()
        .expect("rustc");
    assert!(st.success());
    out
}

/// Issue 16.5 (attack: act on a tenant after its teardown): once torn down, the
/// VM answers only status, metrics and the teardown record; pause, resume, quiesce,
/// patch and detach are refused — asked on the same connection right after the
/// teardown reply, while the VMM is still winding down.
#[test]
fn requests_after_teardown_are_refused() {
    use std::io::{BufRead, Write};
    if !skip::kvm!() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let r = start(
        d.path(),
        payload::storm().unwrap(),
        1,
        false,
        LifecycleConfig::default(),
        model(),
    );
    let s = std::os::unix::net::UnixStream::connect(&r.sock).expect("control socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut rd = std::io::BufReader::new(s);
    let mut line = |req: &str| -> Option<Value> {
        w.write_all(format!("{req}\n").as_bytes()).ok()?;
        let mut out = String::new();
        rd.read_line(&mut out).ok()?;
        serde_json::from_str(&out).ok()
    };
    let rec = line(r#"{"op":"teardown"}"#).expect("teardown reply");
    assert_eq!(rec["ok"], true, "{rec}");
    let bundle = d.path().join("p.bundle");
    std::fs::write(&bundle, b"not a bundle").unwrap();
    for req in [
        r#"{"op":"pause"}"#.to_string(),
        r#"{"op":"quiesce"}"#.to_string(),
        r#"{"op":"detach"}"#.to_string(),
        serde_json::json!({"op": "patch", "bundle": bundle}).to_string(),
    ] {
        // A reply refuses; no reply means the VMM is already gone (also nothing done).
        if let Some(v) = line(&req) {
            assert_eq!(v["ok"], false, "{req} after teardown: {v}");
            let e = v["error"].as_str().unwrap_or_default().to_string();
            assert!(
                e.contains("torn down") || e.contains("finished"),
                "{req}: {e}"
            );
        }
    }
    let rep = r.thread.join().unwrap();
    assert_eq!(rep.verdict, Verdict::Stopped("torn down".into()));
}

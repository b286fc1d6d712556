//! The `hilrig-vmm` binary: exit statuses and messages.

#[path = "common/skip.rs"]
mod skip;

use std::process::Command;

#[path = "common/record.rs"]
mod record;

fn vmm(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hilrig-vmm"))
        .args(args)
        .output()
        .expect("run hilrig-vmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn pci_enum_exits_zero_and_prints_the_summary() {
    if !skip::kvm!() {
        return;
    }
    let (code, out, err) = vmm(&["--payload", "pci-enum", "--mem", "16M"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("device found"));
    assert!(err.contains("verdict: PASS"));
    assert!(err.contains("exits:"));
    assert!(err.contains("wall:"));
}

#[test]
fn guest_faults_give_distinct_nonzero_statuses() {
    if !skip::kvm!() {
        return;
    }
    let (code, _, err) = vmm(&["--payload", "triple-fault"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("TRIPLE FAULT"));
    let (code, _, err) = vmm(&["--payload", "spin", "--timeout", "200ms", "--vcpus", "2"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("watchdog"));
    let (code, _, err) = vmm(&["--payload", "past-bar"]);
    assert_eq!(code, 5, "{err}");
}

#[test]
fn console_goes_to_a_file() {
    if !skip::kvm!() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let con = dir.path().join("console.log");
    let con_s = con.to_string_lossy().into_owned();
    let (code, _, err) = vmm(&["--payload", "hello", "--console", &con_s, "--json"]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&con).expect("console file");
    assert_eq!(text, "hello from hilrig-vmm\n");
    // With --json and no --console, stdout is exactly one JSON object.
    let (code, out, err) = vmm(&["--payload", "hello", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("hello from hilrig-vmm"));
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(v["passed"], serde_json::Value::Bool(true));
    assert_eq!(v["exit_status"], 0);
}

#[test]
fn bad_input_is_refused_with_status_2() {
    let dir = tempfile::tempdir().expect("tmp");
    let empty = dir.path().join("empty.bin");
    std::fs::write(&empty, b"").expect("write");
    let (code, _, err) = vmm(&["--payload", &empty.to_string_lossy()]);
    assert_eq!(code, 2);
    assert!(err.contains("empty"), "{err}");
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![0x90u8; 3 << 20]).expect("write");
    let (code, _, err) = vmm(&["--payload", &big.to_string_lossy(), "--mem", "2M"]);
    assert_eq!(code, 2);
    assert!(err.contains("3145728 bytes"), "{err}");
    let (code, _, err) = vmm(&["--device", "fpga"]);
    assert_eq!(code, 2);
    assert!(err.contains("fpga"), "{err}");
    let bad_state = dir.path().join("bad.state");
    std::fs::write(&bad_state, b"not a state file").expect("write");
    let (code, _, err) = vmm(&[
        "--device",
        "rtl",
        "--device-state",
        &bad_state.to_string_lossy(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("bad.state"), "{err}");
    let (code, _, err) = vmm(&["--device", "vfio=/nonexistent"]);
    assert_eq!(code, 2);
    assert!(err.contains("iommu_group"), "{err}");
    let (code, _, _) = vmm(&["--mem", "lots"]);
    assert_eq!(code, 2);
}

#[test]
fn bad_policies_are_refused_before_any_vm_starts() {
    let dir = tempfile::tempdir().expect("tmp");
    for (i, (text, want)) in [
        (
            "[[profile.tenant]]\nregister = \"NO_SUCH_REG\"\naccess = \"write\"\naction = \"drop\"\n",
            "profile tenant rule 1 (NO_SUCH_REG): unknown register",
        ),
        (
            "[[profile.tenant]]\nregister = \"CONTROL\"\naccess = \"write\"\naction = \"fault\"\n[[profile.tenant]]\nrange = [0x0, 0x40]\naccess = \"both\"\naction = \"drop\"\n",
            "rule 2 (0x0..0x40): conflicts with rule 1",
        ),
        (
            "[[profile.tenant]]\nrange = [0xf000, 0x10100]\naccess = \"read\"\naction = \"drop\"\n",
            "is not a range inside BAR0",
        ),
        (
            "[[profile.tenant]]\nregister = \"CONTROL\"\naccess = \"write\"\naction = \"fault\"\nfilter = { deny = [0x100000000] }\n",
            "wider than the 32-bit register",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let f = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&f, text).expect("write");
        let fs = f.to_string_lossy().into_owned();
        let (code, out, err) = vmm(&["--payload", "hello", "--policy", &fs]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(&fs), "names the file: {err}");
        assert!(err.contains(want), "{want:?} in {err}");
        assert!(!out.contains("hello from"), "a VM ran: {out}");
    }
    let (code, _, err) = vmm(&["--payload", "hello", "--profile", "root"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no profile \"root\""), "{err}");
    let (code, _, err) = vmm(&["--payload", "hello", "--enforce", "maybe"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn alarms_go_to_a_json_lines_file() {
    if !skip::kvm!() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let alarms = dir.path().join("alarms.jsonl");
    let a = alarms.to_string_lossy().into_owned();
    let (code, _, err) = vmm(&["--payload", "attack-hang", "--alarms", &a]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("policy:  profile tenant"), "{err}");
    assert!(err.contains("HANG_TRIGGER: 1 alarms"), "{err}");
    let text = std::fs::read_to_string(&alarms).expect("alarms file");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["register"], "HANG_TRIGGER");
    assert_eq!(lines[0]["action"], "drop");
    assert_eq!(lines[0]["profile"], "tenant");
    assert_eq!(lines[0]["insn"], "mov [rdi+38h],eax");
    // Operator may hang the device; enforce off lets the tenant do it (and alarms).
    let (code, out, err) = vmm(&[
        "--payload",
        "attack-hang",
        "--profile",
        "operator",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["policy"]["alarms"], 0);
    let (code, out, err) = vmm(&["--payload", "attack-hang", "--enforce", "off", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["policy"]["enforce"], false);
    assert_eq!(v["policy"]["alarms"], 1);
}

/// `--quiesce-patches` (issue 21): a live patch applied to a VMM started with it parks
/// the vCPUs for the swap, and the run summary's patch event says so; without it the
/// same patch is swapped under load (`quiesced: false`).
#[test]
fn quiesce_patches_flag_reaches_the_patch_and_the_run_summary() {
    use hilrig_vmm_api::control::{request, Reply, Request};
    use sha2::{Digest, Sha256};
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    if !skip::kvm!() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let d = |n: &str| dir.path().join(n);
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    hilrig_fw::keys::write_key(
        &d("authority.pub"),
        hilrig_fw::keys::KeyKind::SignPublic,
        key.verifying_key().as_bytes(),
    )
    .expect("public key");
    // A policy bundle for this very executable: build hash and patching-code hash.
    let exe = std::fs::read(env!("CARGO_BIN_EXE_hilrig-vmm")).expect("the VMM binary");
    let mut rules = hilrig_vmm::policy::default_policy_toml();
    rules.push_str(
        "\n[[profile.tenant]]\nregister = \"HANG_TRIGGER\"\naccess = \"write\"\naction = \"drop\"\nalarm = true\n",
    );
    let bundle = hilrig_fw::bundle::build(
        &hilrig_fw::bundle::BundleSpec {
            component: "policy",
            version: 2,
            target_vmm_sha256: Sha256::digest(&exe).into(),
            payloads: vec![("rules.toml".to_string(), rules.into_bytes())],
            encrypt_to: None,
            patch_path_sha256: Some(
                hilrig_fw::bundle::patch_path_sha256_of_elf(&exe).expect("patch path"),
            ),
        },
        &key,
    )
    .expect("bundle");
    std::fs::write(d("p.bundle"), bundle).unwrap();
    for quiesce in [false, true] {
        let sock = d(&format!("vm-{quiesce}.sock"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hilrig-vmm"));
        cmd.args([
            "--payload",
            "spin",
            "--mem",
            "8M",
            "--timeout",
            "60s",
            "--json",
        ])
        .arg("--control")
        .arg(&sock)
        .arg("--patch-pubkey")
        .arg(d("authority.pub"))
        .args(record::args(dir.path(), &format!("applied-{quiesce}")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if quiesce {
            cmd.arg("--quiesce-patches");
        }
        let child = cmd.spawn().expect("spawn hilrig-vmm");
        let t0 = Instant::now();
        while !sock.exists() {
            assert!(t0.elapsed() < Duration::from_secs(20), "no control socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        let ask = |req: &Request| {
            request(&sock, req, Duration::from_secs(20))
                .expect("control socket")
                .expect("accepted")
        };
        match ask(&Request::Patch {
            bundle: d("p.bundle"),
        }) {
            Reply::Patch(ev) => assert_eq!(ev.quiesced, quiesce, "{ev:?}"),
            other => panic!("patch answered {other:?}"),
        }
        ask(&Request::Teardown {});
        let out = child.wait_with_output().expect("VMM exits");
        let s = hilrig_vmm_api::RunSummary::from_output(&out.stdout).unwrap_or_else(|e| {
            panic!("no summary ({e}): {}", String::from_utf8_lossy(&out.stderr))
        });
        assert_eq!(s.patches.len(), 1, "{:?}", s.patches);
        assert_eq!(s.patches[0].to, 2);
        assert_eq!(
            s.patches[0].quiesced, quiesce,
            "--quiesce-patches {quiesce}: {:?}",
            s.patches[0]
        );
    }
}

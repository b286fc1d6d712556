//! The `hilrig-vmm` binary: exit statuses and messages.

use std::process::Command;

fn kvm_available() -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        return true;
    }
    eprintln!("SKIPPED: /dev/kvm not available");
    false
}

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
    if !kvm_available() {
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
    if !kvm_available() {
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
    if !kvm_available() {
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
    let (code, _, err) = vmm(&["--device", "lockstep"]);
    assert_eq!(code, 2);
    assert!(err.contains("not built yet"), "{err}");
    let (code, _, err) = vmm(&["--device", "vfio=/nonexistent"]);
    assert_eq!(code, 2);
    assert!(err.contains("iommu_group"), "{err}");
    let (code, _, _) = vmm(&["--mem", "lots"]);
    assert_eq!(code, 2);
}

//! `hilrig counters conformance --target serial:PTY` passes a correct device served by
//! `hilrig device serve-oob` and a correct simulated board served by
//! `hilrig fpga serve-sim`, with the attempts and resets made by `hilrig counters sim`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_hilrig");

fn hilrig(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("spawn hilrig")
}

fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], lines: usize) -> (Server, Vec<String>) {
    let mut c = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut r = BufReader::new(c.stdout.take().unwrap());
    let mut out = Vec::new();
    for _ in 0..lines {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        out.push(line.trim().to_string());
    }
    (Server(c), out)
}

/// The OOB reset-key file `device init` wrote for the device in `state` (random;
/// `STATE.reset-key`).
fn key_file(state: &Path) -> String {
    let mut k = state.as_os_str().to_owned();
    k.push(".reset-key");
    k.to_string_lossy().into_owned()
}

fn conformance(oob: &str, dev: &str, backend: &str, extra: &[&str]) -> (Output, String) {
    let sim = format!("{BIN} counters sim --backend {backend} {dev}");
    let attempt = format!("{sim} attempt --region {{region}} --op {{op}} --mode {{mode}}");
    let reset = format!("{sim} reset --kind {{kind}}");
    let cut = format!("{sim} cut --region {{region}} --mode {{mode}}");
    let inband = format!("{sim} inband");
    let target = format!("serial:{oob}");
    let mut args = vec![
        "counters",
        "conformance",
        "--target",
        &target,
        "--attempt-cmd",
        &attempt,
        "--reset-cmd",
        &reset,
        "--cut-cmd",
        &cut,
        "--inband-cmd",
        &inband,
        "--timeout-ms",
        "3000",
    ];
    args.extend_from_slice(extra);
    let o = hilrig(&args);
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o, text)
}

#[test]
fn a_correct_device_passes_over_serve_oob() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("d.state");
    let o = hilrig(&["device", "init", p(&st), "--width", "4", "--serial", "9"]);
    assert!(o.status.success());
    let (_server, lines) = spawn(&["device", "serve-oob", p(&st), "--seconds", "600"], 1);
    let junit = dir.path().join("junit.xml");
    let key = key_file(&st);
    let (o, text) = conformance(
        &lines[0],
        p(&st),
        "model",
        &[
            "--burn-fuse",
            "--reset-key-file",
            &key,
            "--junit",
            p(&junit),
        ],
    );
    println!("{text}");
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert!(
        text.contains("PASS: 11 passed, 0 failed, 0 skipped, 0 n/a, 0 transport, 0 error"),
        "{text}"
    );
    let j = std::fs::read_to_string(&junit).unwrap();
    assert_eq!(j.matches("<testcase ").count(), 11);
    assert!(!j.contains("<failure"), "{j}");
}

#[test]
fn a_physical_reset_through_serve_oob_keeps_what_others_wrote() {
    // serve-oob started before the device was flashed and counted: a physical reset
    // through it must not write its start-up snapshot back.
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("d.state");
    assert!(
        hilrig(&["device", "init", p(&st), "--width", "8", "--serial", "3"])
            .status
            .success()
    );
    let (_server, lines) = spawn(&["device", "serve-oob", p(&st), "--seconds", "600"], 1);
    let img = dir.path().join("cfg.bin");
    std::fs::write(&img, b"config!!").unwrap();
    let o = hilrig(&["device", "flash", p(&st), "--region", "config", p(&img)]);
    assert!(o.status.success());
    let hash_before = hilrig(&["device", "oob", p(&st), "hash", "--region", "config"]);
    let o = hilrig(&[
        "device",
        "oob",
        &lines[0],
        "physical-reset",
        "--reset-key-file",
        &key_file(&st),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let hash_after = hilrig(&["device", "oob", p(&st), "hash", "--region", "config"]);
    assert_eq!(
        hash_before.stdout, hash_after.stdout,
        "the flashed image was undone"
    );
    let c = String::from_utf8_lossy(&hilrig(&["device", "oob", p(&st), "counters"]).stdout)
        .into_owned();
    // MASTER kept the flash's attempts (the stale snapshot had MASTER 0).
    assert!(!c.contains("\"master\": 0"), "{c}");
}

#[test]
fn a_small_budget_without_a_reset_key_is_incomplete_with_its_own_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("d.state");
    assert!(
        hilrig(&["device", "init", p(&st), "--width", "6", "--serial", "9"])
            .status
            .success()
    );
    let (_server, lines) = spawn(&["device", "serve-oob", p(&st), "--seconds", "600"], 1);
    let (o, text) = conformance(&lines[0], p(&st), "model", &["--json"]);
    assert_eq!(o.status.code(), Some(3), "{text}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["overall"], "incomplete");
    assert_eq!(v["counts"]["failed"], 0);
}

#[test]
fn a_correct_simulated_board_passes_over_serve_sim() {
    let (_server, lines) = spawn(
        &[
            "fpga",
            "serve-sim",
            "--width",
            "4",
            "--serial",
            "5",
            "--seconds",
            "900",
        ],
        2,
    );
    let host = lines[0].strip_prefix("host ").unwrap().to_string();
    let oob = lines[1].strip_prefix("oob ").unwrap().to_string();
    // `fpga serve-sim` boards carry the documented development keys.
    let dir = tempfile::tempdir().unwrap();
    let kf = dir.path().join("board.reset-key");
    hilrig_device::secure::write_reset_key_file(&kf, &hilrig_device::state::dev_keys(5).1).unwrap();
    let (o, text) = conformance(
        &oob,
        &host,
        "fpga",
        &["--burn-fuse", "--reset-key-file", p(&kf)],
    );
    println!("{text}");
    assert_eq!(o.status.code(), Some(0), "{text}");
}

#[test]
fn conformance_target_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.state");
    let o = hilrig(&[
        "counters",
        "conformance",
        "--target",
        &format!("model:{}", p(&missing)),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("does not exist") && e.contains("hilrig device init"),
        "{e}"
    );
    // --target model: a fresh temporary device (its own development key).
    let o = hilrig(&[
        "counters",
        "conformance",
        "--target",
        "model",
        "--width",
        "4",
        "--burn-fuse",
    ]);
    let t = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{t}");
}

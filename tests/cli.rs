//! The `hilrig` binary end to end: the main job, device state files, OOB over a
//! state file and over a real PTY, flashing, firmware images, bad input.

#[path = "../host-vmm/tests/common/skip.rs"]
mod skip;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

#[path = "../host-vmm/tests/common/record.rs"]
mod record;

fn hilrig(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hilrig"))
        .args(args)
        .output()
        .expect("spawn hilrig")
}

fn ok(args: &[&str]) -> String {
    let o = hilrig(args);
    assert!(
        o.status.success(),
        "hilrig {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(args: &[&str]) -> String {
    let o = hilrig(args);
    assert!(!o.status.success(), "hilrig {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Write a secret key file, owner-only.
fn secret(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The VMM's run summary in a `vm run --json` output.
fn summary(stdout: &[u8]) -> hilrig_vmm_api::RunSummary {
    hilrig_vmm_api::RunSummary::from_output(stdout).expect("a run summary")
}

#[test]
fn main_job_passes_and_prints_counters_and_verdict() {
    let out = ok(&["run", "--device-only"]);
    assert!(out.contains("verdict: trusted"), "{out}");
    assert!(
        out.contains("counters (OOB): vbios 0 firmware 2 config 1 | master 3"),
        "{out}"
    );
    assert!(out.contains("6 passed, 0 failed"), "{out}");
}

#[test]
fn init_flash_and_oob_over_a_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("d.state");
    ok(&["device", "init", p(&st), "--width", "8", "--serial", "42"]);
    // Refuses to replace it.
    assert!(fails(&["device", "init", p(&st)]).contains("already exists"));
    let img = dir.path().join("fw.bin");
    std::fs::write(&img, vec![0x11u8; 3000]).unwrap();
    let out = ok(&["device", "flash", p(&st), "--region", "firmware", p(&img)]);
    assert!(
        out.contains("firmware counter 0 -> 2, master 0 -> 2, slots left 6"),
        "{out}"
    );
    let c: serde_json::Value =
        serde_json::from_str(&ok(&["device", "oob", p(&st), "counters"])).unwrap();
    assert_eq!(c["counters"], serde_json::json!([0, 2, 0]));
    assert_eq!(c["master"], 2);
    let id: serde_json::Value =
        serde_json::from_str(&ok(&["device", "oob", p(&st), "identify"])).unwrap();
    assert_eq!(id["serial"], 42);
    // The region hash is the SHA-256 of the programmed bytes, erased (0xff) after them.
    let h: serde_json::Value = serde_json::from_str(&ok(&[
        "device",
        "oob",
        p(&st),
        "hash",
        "--region",
        "firmware",
    ]))
    .unwrap();
    let mut region = vec![0x11u8; 3000];
    region.resize(32 * 1024, 0xff);
    use sha2::Digest;
    assert_eq!(h["sha256"], hex::encode(sha2::Sha256::digest(&region)));
}

#[test]
fn bad_input_is_named_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("d.state");
    ok(&["device", "init", p(&st)]);
    let img = dir.path().join("big.bin");
    std::fs::write(&img, vec![0u8; 5000]).unwrap();
    let e = fails(&["device", "flash", p(&st), "--region", "config", p(&img)]);
    assert!(e.contains("5000 bytes") && e.contains("config"), "{e}");
    assert!(
        fails(&["device", "flash", p(&st), "--region", "bogus", p(&img)])
            .contains("unknown region")
    );
    assert!(fails(&["device", "oob", p(&st), "frobnicate"]).contains("unknown OOB request"));
    let short = dir.path().join("short.key");
    secret(&short, "00");
    let e = fails(&[
        "device",
        "oob",
        p(&st),
        "physical-reset",
        "--reset-key-file",
        p(&short),
    ]);
    assert!(e.contains("short.key") && e.contains("32"), "{e}");
    let zero = dir.path().join("zero.key");
    secret(&zero, &"00".repeat(32));
    let e = fails(&[
        "device",
        "oob",
        p(&st),
        "physical-reset",
        "--reset-key-file",
        p(&zero),
    ]);
    assert!(e.contains("BadKey"), "{e}");
    // A corrupt state file: a clear error naming it, and the file is left as it was.
    let mut bytes = std::fs::read(&st).unwrap();
    bytes[200] ^= 0x40;
    std::fs::write(&st, &bytes).unwrap();
    let e = fails(&["device", "oob", p(&st), "counters"]);
    assert!(e.contains("d.state") && e.contains("checksum"), "{e}");
    let e = fails(&["device", "flash", p(&st), "--region", "config", p(&img)]);
    assert!(e.contains("checksum"), "{e}");
    assert_eq!(std::fs::read(&st).unwrap(), bytes);
}

#[test]
fn oob_over_a_pty_reads_the_same_as_the_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("d.state");
    ok(&["device", "init", p(&st), "--width", "5", "--serial", "7"]);
    let img = dir.path().join("cfg.bin");
    std::fs::write(&img, b"config!!").unwrap();
    ok(&["device", "flash", p(&st), "--region", "config", p(&img)]);
    let direct = ok(&["device", "oob", p(&st), "counters"]);

    let mut server = Command::new(env!("CARGO_BIN_EXE_hilrig"))
        .args(["device", "serve-oob", p(&st), "--seconds", "20"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pty = line.trim().to_string();
    assert!(pty.starts_with("/dev/pts/"), "serve-oob printed {pty:?}");
    let over_serial = ok(&["device", "oob", &pty, "counters"]);
    let hash_serial = ok(&["device", "oob", &pty, "hash", "--region", "config"]);
    let wrong = dir.path().join("wrong.key");
    secret(&wrong, &"ab".repeat(32));
    let e = fails(&[
        "device",
        "oob",
        &pty,
        "physical-reset",
        "--reset-key-file",
        p(&wrong),
    ]);
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(over_serial, direct);
    assert_eq!(
        hash_serial,
        ok(&["device", "oob", p(&st), "hash", "--region", "config"])
    );
    assert!(e.contains("BadKey"), "{e}");
}

#[test]
fn regmap_exports_and_vbios_tools() {
    let v: serde_json::Value = serde_json::from_str(&ok(&["device", "regmap", "--json"])).unwrap();
    assert_eq!(v["registers"][0]["name"], "ID");
    let md = ok(&["device", "regmap", "--markdown"]);
    let on_disk =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/registers.md"))
            .unwrap();
    assert_eq!(md, on_disk);

    let dir = tempfile::tempdir().unwrap();
    let rom = dir.path().join("vbios.rom");
    ok(&["fw", "build-vbios", "-o", p(&rom), "--revision", "9"]);
    let imgs: serde_json::Value = serde_json::from_str(&ok(&["fw", "inspect", p(&rom)])).unwrap();
    assert_eq!(imgs["kind"], "expansion-rom");
    assert_eq!(imgs["images"][0]["revision"], 9);
    let mut bytes = std::fs::read(&rom).unwrap();
    bytes[0x40] ^= 1;
    std::fs::write(&rom, &bytes).unwrap();
    let e = fails(&["fw", "inspect", p(&rom)]);
    assert!(e.contains("checksum at offset 0x1ff"), "{e}");
}

#[test]
fn bench_model_prints_figures_with_ratios() {
    let out = ok(&["bench", "model", "--seconds", "0.05"]);
    assert!(
        out.contains("plain memory read/write loop (baseline)"),
        "{out}"
    );
    let line = out
        .lines()
        .find(|l| l.starts_with("model MMIO 4-byte ops"))
        .expect(&out);
    let ratio: f64 = line
        .split_whitespace()
        .rev()
        .nth(3)
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{line}"));
    assert!(ratio > 0.0, "{line}");
    assert!(fails(&["bench", "nope"]).contains("unknown benchmark"));
}

#[test]
fn signed_images_and_bundles_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    ok(&["fw", "keygen", p(&d("vendor"))]);
    ok(&["fw", "keygen", p(&d("other"))]);
    ok(&["fw", "keygen", "--encryption", p(&d("vmm"))]);
    assert!(fails(&["fw", "keygen", p(&d("vendor"))]).contains("vendor.key"));
    std::fs::write(d("fw.bin"), vec![0xabu8; 1000]).unwrap();
    ok(&[
        "fw",
        "sign",
        "--key",
        p(&d("vendor.key")),
        "--region",
        "firmware",
        "--version",
        "5",
        "-o",
        p(&d("fw.img")),
        p(&d("fw.bin")),
    ]);
    let out = ok(&[
        "fw",
        "verify",
        "--pubkey",
        p(&d("vendor.pub")),
        p(&d("fw.img")),
    ]);
    assert!(out.contains("signature OK (firmware v5"), "{out}");
    let e = fails(&[
        "fw",
        "verify",
        "--pubkey",
        p(&d("other.pub")),
        p(&d("fw.img")),
    ]);
    assert!(
        e.contains("fw.img") && e.contains("signer") && e.contains("not a trusted key"),
        "{e}"
    );
    let mut img = std::fs::read(d("fw.img")).unwrap();
    img[8] ^= 1; // the version field: parses, but the signature no longer verifies
    std::fs::write(d("bad.img"), &img).unwrap();
    let e = fails(&[
        "fw",
        "verify",
        "--pubkey",
        p(&d("vendor.pub")),
        p(&d("bad.img")),
    ]);
    assert!(e.contains("signature at offset 80"), "{e}");
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["fw", "inspect", p(&d("fw.img"))])).unwrap();
    assert_eq!(info["image"]["version"], 5);

    // The signed image flashes into a device like any image.
    let st = d("dev.state");
    ok(&["device", "init", p(&st)]);
    ok(&[
        "device",
        "flash",
        p(&st),
        "--region",
        "firmware",
        p(&d("fw.img")),
    ]);

    std::fs::write(d("rules.toml"), b"[rules]\n").unwrap();
    ok(&[
        "fw",
        "bundle",
        "--key",
        p(&d("vendor.key")),
        "--component",
        "policy",
        "--version",
        "2",
        "--target-vmm-file",
        env!("CARGO_BIN_EXE_hilrig"),
        "--encrypt-to",
        p(&d("vmm.pub")),
        "-o",
        p(&d("p.bundle")),
        p(&d("rules.toml")),
    ]);
    let out = ok(&[
        "fw",
        "verify",
        "--pubkey",
        p(&d("vendor.pub")),
        "--decrypt-key",
        p(&d("vmm.key")),
        p(&d("p.bundle")),
    ]);
    assert!(
        out.contains("signature OK (policy v2, 1 payloads checked)"),
        "{out}"
    );
    let m: serde_json::Value =
        serde_json::from_str(&ok(&["fw", "inspect", p(&d("p.bundle"))])).unwrap();
    assert_eq!(m["manifest"]["payloads"][0]["name"], "rules.toml");
    assert!(m["manifest"]["encryption"]["ephemeral_public"].is_string());
    let mut b = std::fs::read(d("p.bundle")).unwrap();
    let n = b.len();
    b[n - 1] ^= 1;
    std::fs::write(d("t.bundle"), &b).unwrap();
    let e = fails(&[
        "fw",
        "verify",
        "--pubkey",
        p(&d("vendor.pub")),
        "--decrypt-key",
        p(&d("vmm.key")),
        p(&d("t.bundle")),
    ]);
    assert!(
        e.contains("payload rules.toml") && e.contains("decrypt"),
        "{e}"
    );
    std::fs::write(d("junk"), b"hello").unwrap();
    assert!(fails(&["fw", "inspect", p(&d("junk"))]).contains("not a firmware file"));
}

#[test]
fn counters_service_through_the_hilrig_binary() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let db = d("c.db");
    let key = d("c.key");
    let st = d("dev.state");
    let common = |args: &[&str]| {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(["--db".into(), p(&db).into(), "--key".into(), p(&key).into()]);
        v
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        hilrig(&refs)
    };
    ok(&["device", "init", p(&st), "--serial", "77"]);
    let src = format!("model:{}", p(&st));
    assert!(run(common(&["counters", "init"])).status.success());
    assert!(run(common(&["counters", "enroll", "77", "--source", &src]))
        .status
        .success());
    let o = run(common(&["counters", "verify", "77", "--source", &src]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).contains("trusted"));
    // Keep the state file as it is now, update the firmware.
    let old = std::fs::read(&st).unwrap();
    std::fs::write(d("fw.bin"), [1u8; 64]).unwrap();
    ok(&[
        "device",
        "flash",
        p(&st),
        "--region",
        "firmware",
        p(&d("fw.bin")),
    ]);
    let o = run(common(&["counters", "verify", "77", "--source", &src]));
    assert!(
        !o.status.success(),
        "an image not in the catalog is not trusted"
    );
    // The operator approves the image; the next verify accepts the update.
    let h: serde_json::Value = serde_json::from_str(&ok(&[
        "device",
        "oob",
        p(&st),
        "hash",
        "--region",
        "firmware",
    ]))
    .unwrap();
    let hash = h["sha256"].as_str().unwrap().to_string();
    let add = common(&[
        "counters",
        "catalog",
        "add",
        "--region",
        "firmware",
        "--approved-by",
        "test",
        &hash,
    ]);
    assert!(run(add).status.success());
    let o = run(common(&["counters", "verify", "77", "--source", &src]));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("accepted-update"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = run(common(&["counters", "verify", "77", "--source", &src]));
    assert!(o.status.success(), "trusted after the accepted update");
    // Restore the old state file: an attack only the simulation allows. Counters went
    // backwards, which the service must call a rollback.
    std::fs::write(&st, &old).unwrap();
    let o = run(common(&["counters", "verify", "77", "--source", &src]));
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("rolled-back"), "{out}");
}

#[test]
fn rtl_and_lockstep_backends_behave_like_the_model() {
    for b in ["rtl", "lockstep"] {
        let out = ok(&["run", "--device-only", "--backend", b]);
        assert!(out.contains(&format!("smoke run ({b} device")), "{out}");
        assert!(
            out.contains("verdict: trusted") && out.contains("6 passed, 0 failed"),
            "{out}"
        );
    }
    // A state file written through the RTL reads the same through the model.
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("d.state");
    ok(&["device", "init", p(&st), "--width", "6"]);
    let img = dir.path().join("c.bin");
    std::fs::write(&img, [9u8; 40]).unwrap();
    ok(&[
        "device",
        "flash",
        p(&st),
        "--region",
        "config",
        p(&img),
        "--backend",
        "rtl",
    ]);
    let via_model = ok(&["device", "oob", p(&st), "hash", "--region", "config"]);
    let via_rtl = ok(&[
        "device",
        "oob",
        p(&st),
        "hash",
        "--region",
        "config",
        "--backend",
        "rtl",
    ]);
    assert_eq!(via_model, via_rtl);
    let c: serde_json::Value =
        serde_json::from_str(&ok(&["device", "oob", p(&st), "counters"])).unwrap();
    assert_eq!(c["counters"], serde_json::json!([0, 0, 2]));
    assert!(
        fails(&["run", "--device-only", "--backend", "fpga9"]).contains("unknown device backend")
    );
}

#[test]
fn verilator_backend_behaves_like_the_model() {
    if !hilrig_verilator::available("verilator_backend_behaves_like_the_model") {
        return;
    }
    let out = ok(&["run", "--device-only", "--backend", "verilator"]);
    assert!(out.contains("smoke run (verilator device"), "{out}");
    assert!(
        out.contains("verdict: trusted") && out.contains("6 passed, 0 failed"),
        "{out}"
    );
    // A state file written through the verilated core reads the same through the model.
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("d.state");
    ok(&["device", "init", p(&st), "--width", "6"]);
    let img = dir.path().join("c.bin");
    std::fs::write(&img, [7u8; 44]).unwrap();
    ok(&[
        "device",
        "flash",
        p(&st),
        "--region",
        "config",
        p(&img),
        "--backend",
        "verilator",
    ]);
    let via_model = ok(&["device", "oob", p(&st), "hash", "--region", "config"]);
    let via_verilator = ok(&[
        "device",
        "oob",
        p(&st),
        "hash",
        "--region",
        "config",
        "--backend",
        "verilator",
    ]);
    assert_eq!(via_model, via_verilator);
    // The counters conformance suite on a verilator target (the binary's opener).
    let st = dir.path().join("conf.state");
    ok(&["device", "init", p(&st), "--width", "32", "--serial", "9"]);
    // The random reset key `device init` wrote beside the state file.
    let key = dir.path().join("conf.state.reset-key");
    let out = ok(&[
        "counters",
        "conformance",
        "--target",
        &format!("verilator:{}", p(&st)),
        "--burn-fuse",
        "--reset-key-file",
        p(&key),
    ]);
    assert!(out.contains("PASS: 11 passed, 0 failed"), "{out}");
    for prop in ["count-before-act", "persistence"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("PASS") && l.trim_end().ends_with(prop)),
            "{prop}: {out}"
        );
    }
}

#[test]
fn counter_conformance_passes_on_model_and_rtl() {
    let dir = tempfile::tempdir().unwrap();
    for b in ["model", "rtl"] {
        let st = dir.path().join(format!("{b}.state"));
        let init = ok(&["device", "init", p(&st), "--width", "32", "--serial", "9"]);
        // The random reset key `device init` wrote beside the state file goes to
        // the counters service at enrolment; the suite takes it from there.
        let key = std::fs::read_to_string(dir.path().join(format!("{b}.state.reset-key")))
            .unwrap()
            .trim()
            .to_string();
        let db = dir.path().join(format!("{b}.db"));
        let ck = dir.path().join(format!("{b}.key"));
        let c = ["--db", p(&db), "--key", p(&ck)];
        let mut outs = vec![init];
        let with = |a: &[&str]| -> Vec<String> {
            a.iter().chain(c.iter()).map(|s| s.to_string()).collect()
        };
        let run = |a: &[&str]| {
            let v = with(a);
            let r: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
            ok(&r)
        };
        outs.push(run(&["counters", "init"]));
        outs.push(run(&[
            "counters",
            "enroll",
            "9",
            "--source",
            &format!("model:{}", p(&st)),
        ]));
        let out = run(&[
            "counters",
            "conformance",
            "--target",
            &format!("{b}:{}", p(&st)),
            "--burn-fuse",
            "--reset-key-from-service",
            "9",
        ]);
        outs.push(out.clone());
        outs.push(run(&["counters", "status", "--json"]));
        outs.push(run(&["counters", "history", "--json"]));
        outs.push(run(&["counters", "status"]));
        // The key never appears in any output, nor in the database.
        for o in &outs {
            assert!(
                !o.to_lowercase().contains(&key),
                "{b}: the reset key in {o}"
            );
        }
        let dbtext = String::from_utf8_lossy(&std::fs::read(&db).unwrap()).to_lowercase();
        assert!(!dbtext.contains(&key), "{b}: the reset key in the database");
        assert!(out.contains("PASS: 11 passed, 0 failed"), "{b}: {out}");
        assert!(
            out.contains("PASS       count-before-act") && out.contains("PASS       persistence"),
            "{b}: {out}"
        );
    }
    let e = fails(&["counters", "conformance", "--target", "bogus"]);
    assert!(e.contains("KIND:PATH"), "{e}");
}

#[test]
fn rig_check_of_the_sample_inventory_is_all_healthy() {
    if !skip::kvm!() {
        return;
    }
    let inv = Path::new(env!("CARGO_MANIFEST_DIR")).join("rig/inventory/sim.toml");
    let out = ok(&["rig", "check", p(&inv)]);
    assert!(out.contains("3/3 hosts healthy"), "{out}");
    assert!(!out.contains("UNHEALTHY"), "{out}");
}

struct Kill(Vec<std::process::Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn patch_rollout_across_three_vmms_stops_at_the_bad_host() {
    if !skip::kvm!() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    ok(&["fw", "keygen", p(&d("authority"))]);
    ok(&["fw", "keygen", p(&d("other"))]);
    // Three VMMs; the second trusts another patch authority.
    let mut vmms = Kill(Vec::new());
    for (i, key) in ["authority.pub", "other.pub", "authority.pub"]
        .iter()
        .enumerate()
    {
        let sock = d(&format!("vm{i}.sock"));
        vmms.0.push(
            Command::new(env!("CARGO_BIN_EXE_hilrig"))
                .args([
                    "vm",
                    "run",
                    "--payload",
                    "spin",
                    "--mem",
                    "8M",
                    "--timeout",
                    "120s",
                ])
                .args(["--control", p(&sock), "--patch-pubkey", p(&d(key))])
                .args(record::args(dir.path(), &format!("vm{i}-applied")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let t0 = std::time::Instant::now();
    while !(0..3).all(|i| d(&format!("vm{i}.sock")).exists()) {
        assert!(
            t0.elapsed().as_secs() < 20,
            "VMM control sockets never appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The built-in rules plus one more drop: narrower than the running policy (a
    // widening patch would need a declaration and --allow-policy-widening).
    std::fs::write(
        d("rules.toml"),
        format!(
            "{}\n[[profile.tenant]]\nregister = \"HANG_TRIGGER\"\naccess = \"write\"\naction = \"drop\"\nalarm = true\n",
            hilrig_vmm::policy::default_policy_toml()
        ),
    )
    .unwrap();
    ok(&[
        "fw",
        "bundle",
        "--key",
        p(&d("authority.key")),
        "--component",
        "policy",
        "--version",
        "2",
        "--target-vmm-file",
        env!("CARGO_BIN_EXE_hilrig"),
        "-o",
        p(&d("p.bundle")),
        p(&d("rules.toml")),
    ]);
    let o = hilrig(&[
        "patch",
        "rollout",
        "--vmm",
        p(&d("vm0.sock")),
        "--vmm",
        p(&d("vm1.sock")),
        "--vmm",
        p(&d("vm2.sock")),
        "--bundle",
        p(&d("p.bundle")),
        "--canary",
        "1",
        "--wave",
        "1",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1), "an incomplete rollout exits 1");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["hosts"][0]["outcome"]["result"], "applied", "{r}");
    assert!(r["hosts"][0]["outcome"]["blackout_us"].as_u64().is_some());
    assert_eq!(r["hosts"][1]["outcome"]["result"], "refused", "{r}");
    assert!(
        r["hosts"][1]["outcome"]["reason"]
            .as_str()
            .unwrap()
            .contains("not a trusted key"),
        "{r}"
    );
    assert_eq!(
        r["hosts"][2]["outcome"]["result"], "skipped",
        "the rollout stopped at the bad host: {r}"
    );
    let versions: Vec<_> = (0..3)
        .map(|i| r["hosts"][i]["versions"]["policy"].as_u64())
        .collect();
    assert_eq!(versions, vec![Some(2), Some(1), Some(1)], "{r}");
    // The control client: status shows the new version (a typed reply); a request
    // that is not one is refused before anything is sent.
    let st: hilrig_vmm_api::Reply =
        serde_json::from_str(&ok(&["vm", "ctl", p(&d("vm0.sock")), "status"])).unwrap();
    match st {
        hilrig_vmm_api::Reply::Status(st) => assert_eq!(st.versions.policy, 2, "{st:?}"),
        other => panic!("status answered {other:?}"),
    }
    let o = hilrig(&["vm", "ctl", p(&d("vm0.sock")), "reboot"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown request `reboot`"));
    let o = hilrig(&["vm", "ctl", p(&d("vm0.sock")), r#"{"op":"reboot"}"#]);
    assert_eq!(o.status.code(), Some(2));
    // The remaining good host on its own.
    let out = ok(&[
        "patch",
        "rollout",
        "--vmm",
        p(&d("vm2.sock")),
        "--bundle",
        p(&d("p.bundle")),
    ]);
    assert!(out.contains("rollout complete: 1 hosts patched"), "{out}");
}

#[test]
fn an_overwritten_vbios_is_refused_until_it_is_in_the_catalog() {
    if !skip::kvm!() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let st = d("dev.state");
    ok(&["device", "init", p(&st)]);
    // The factory VBIOS is known: the guest gets the device.
    ok(&[
        "vm",
        "run",
        "--payload",
        "pci-enum",
        "--device-state",
        p(&st),
    ]);
    ok(&[
        "fw",
        "build-vbios",
        "-o",
        p(&d("new.rom")),
        "--revision",
        "9",
    ]);
    ok(&[
        "device",
        "flash",
        p(&st),
        "--region",
        "vbios",
        p(&d("new.rom")),
    ]);
    let o = hilrig(&[
        "vm",
        "run",
        "--payload",
        "pci-enum",
        "--device-state",
        p(&st),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(10), "an unknown VBIOS is refused");
    let v = hilrig_vmm_api::RunSummary::from_output(&o.stdout).unwrap();
    assert_eq!(v.exit_status, hilrig_vmm_api::ExitStatus::DeviceRefused);
    let hash = v.vbios.as_ref().unwrap().sha256.clone();
    // The operator may run anyway; the output records it.
    let o = hilrig(&[
        "vm",
        "run",
        "--payload",
        "pci-enum",
        "--device-state",
        p(&st),
        "--allow-unknown-vbios",
        "--json",
    ]);
    assert!(o.status.success());
    let v = hilrig_vmm_api::RunSummary::from_output(&o.stdout).unwrap();
    assert!(v.vbios.unwrap().overridden);
    // Once approved in the counters catalog, it is accepted.
    let (db, key) = (d("c.db"), d("c.key"));
    ok(&["counters", "init", "--db", p(&db), "--key", p(&key)]);
    ok(&[
        "counters",
        "catalog",
        "add",
        "--db",
        p(&db),
        "--key",
        p(&key),
        "--region",
        "vbios",
        "--approved-by",
        "qa",
        &hash,
    ]);
    // With --counters-db the provisioning gate needs the device enrolled.
    let src = format!("model:{}", p(&st));
    ok(&[
        "counters",
        "enroll",
        "1",
        "--source",
        &src,
        "--db",
        p(&db),
        "--key",
        p(&key),
    ]);
    let o = hilrig(&[
        "vm",
        "run",
        "--payload",
        "pci-enum",
        "--device-state",
        p(&st),
        "--counters-db",
        p(&db),
        "--counters-key",
        p(&key),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = summary(&o.stdout);
    assert!(
        v.vbios
            .as_ref()
            .and_then(|m| m.known_as.as_deref())
            .unwrap_or("")
            .contains("approved by qa"),
        "{v:?}"
    );
    assert!(!v.vbios.as_ref().unwrap().overridden);
    // Teardown asks the counters service for the verdict: enrolled and unchanged
    // during the tenancy, the device is trusted for the next tenant.
    let mut a = vec![
        "vm",
        "run",
        "--payload",
        "pci-enum",
        "--device-state",
        p(&st),
    ];
    a.extend_from_slice(&[
        "--counters-db",
        p(&db),
        "--counters-key",
        p(&key),
        "--teardown-on-exit",
        "--json",
    ]);
    let o = hilrig(&a);
    let t = summary(&o.stdout).teardown.expect("a teardown record");
    assert!(t.complete, "{t:?}");
    let verdict = t.verdict.expect("a verdict");
    assert_eq!(verdict.verdict, hilrig_vmm_api::CountersVerdict::Trusted);
    assert!(verdict.handoff_ok);
    // A device the service cannot vouch for (never enrolled) is never "trusted".
    let other = d("other.state");
    ok(&["device", "init", p(&other), "--serial", "99"]);
    let o = hilrig(&[
        "vm",
        "run",
        "--payload",
        "pci-enum",
        "--device-state",
        p(&other),
        "--counters-db",
        p(&db),
        "--counters-key",
        p(&key),
        "--teardown-on-exit",
        "--json",
    ]);
    // The provisioning gate refuses it before the guest runs (no teardown).
    assert_eq!(
        o.status.code(),
        Some(i32::from(
            hilrig_vmm_api::ExitStatus::DeviceUntrusted.code()
        ))
    );
    let v = summary(&o.stdout);
    assert!(v.teardown.is_none());
    assert_eq!(
        v.gate.expect("the gate's record").outcome,
        hilrig_vmm_api::GateOutcome::UnknownDevice
    );
}

#[test]
fn the_main_job_runs_the_smoke_campaign_and_writes_the_report() {
    if !skip::kvm!() {
        return;
    }
    // Exactly as the README runs it: no options, the default relative output
    // directory `hilrig-out` (relative paths must survive the jailed VMMs, whose
    // working directory is their jail root).
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_hilrig"))
        .arg("run")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or("");
    assert!(
        last.ends_with("report.html") && Path::new(last).is_file(),
        "{stdout}"
    );
    assert!(stderr.contains("0 fail, 0 timeout, 0 infra"), "{stderr}");
    // The cases ran on this executable's own VMM (`hilrig vm run`).
    assert!(stderr.contains(env!("CARGO_BIN_EXE_hilrig")), "{stderr}");
    let junit = std::fs::read_to_string(Path::new(last).with_file_name("junit.xml")).unwrap();
    assert!(
        junit.contains("<testsuite") && !junit.contains("<failure"),
        "{junit}"
    );
}

fn tool_missing(test: &str, tools: &[&str]) -> bool {
    for t in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
            .unwrap_or(false);
        if !found {
            eprintln!("SKIPPED {test}: {t} is not installed");
            return true;
        }
    }
    false
}

#[test]
fn fpga_verilog_writes_core_bridge_and_board_top() {
    let dir = tempfile::tempdir().unwrap();
    let o = hilrig(&["fpga", "verilog", "-o", p(dir.path())]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["device_core.v", "host_bridge.v", "board_top.v"] {
        let v = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(v.contains("module top"), "{f}");
    }
    let top = std::fs::read_to_string(dir.path().join("board_top.v")).unwrap();
    for port in ["clock", "uart_rx", "uart_tx", "oob_rx", "oob_tx", "leds"] {
        assert!(top.contains(port), "the board top has no port {port}");
    }
    let o = hilrig(&["fpga", "verilog", "-o", p(dir.path()), "--width", "0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--width 0"));
}

/// The board's bitstream, built in CI exactly as `hilrig fpga synth` builds it for
/// a user: board top Verilog, yosys, nextpnr-ice40 for the Alchitry Cu's HX8K with
/// its pins, the PLL at 25 MHz, icepack. Timing must be met.
#[test]
fn fpga_synth_builds_the_alchitry_cu_bitstream_and_meets_timing() {
    let test = "fpga_synth_builds_the_alchitry_cu_bitstream_and_meets_timing";
    if tool_missing(test, &["yosys", "nextpnr-ice40", "icepack"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let o = hilrig(&[
        "fpga",
        "synth",
        "--board",
        "alchitry-cu",
        "-o",
        p(dir.path()),
    ]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("timing:     met"), "{out}");
    assert!(out.contains("BRAM:"), "{out}");
    let bin = out
        .lines()
        .find_map(|l| l.strip_prefix("bitstream:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let len = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    // An iCE40-HX8K bitstream is 135,100 bytes.
    assert_eq!(len, 135_100, "bitstream {bin}: {len} bytes\n{out}");
    eprintln!("{out}");
}

#[test]
fn fpga_lint_of_the_board_top_is_clean() {
    if tool_missing("fpga_lint_of_the_board_top_is_clean", &["verilator"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let o = hilrig(&["fpga", "lint", "-o", p(dir.path())]);
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("lint clean"));
}

#[test]
fn fpga_program_without_a_board_says_which_device_it_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("x.bin");
    std::fs::write(&bin, vec![0u8; 1024]).unwrap();
    let o = hilrig(&["fpga", "program", "--board", "alchitry-cu", p(&bin)]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("0403:6010") && err.contains("alchitry-cu"),
        "{err}"
    );
    let o = hilrig(&["fpga", "program", "--board", "nope", p(&bin)]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("known boards: alchitry-cu, icebreaker"));
}

/// A guest on the VMM reaches the device through the `fpga` backend: the host
/// bridge and the board top's RTL behind two PTYs (`hilrig fpga serve-sim`), the
/// same serial code path as a board's USB-serial ports. The OOB port answers too.
#[test]
fn a_guest_uses_the_device_on_the_simulated_board() {
    guest_on_simulated_board("rtl");
}

/// The same with the board top's Verilog — the file that is synthesised — compiled
/// by Verilator (`serve-sim --engine verilator`).
#[test]
fn a_guest_uses_the_device_on_the_verilated_board() {
    if !hilrig_verilator::available("a_guest_uses_the_device_on_the_verilated_board") {
        return;
    }
    guest_on_simulated_board("verilator");
}

fn guest_on_simulated_board(engine: &str) {
    if !skip::kvm!() {
        return;
    }
    let mut sim = Command::new(env!("CARGO_BIN_EXE_hilrig"))
        .args(["fpga", "serve-sim", "--seconds", "120", "--engine", engine])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sim.stdout.take().unwrap()).lines();
    let host = lines.next().unwrap().unwrap();
    let oob = lines.next().unwrap().unwrap();
    let host = host.strip_prefix("host ").unwrap().to_string();
    let oob = oob.strip_prefix("oob ").unwrap().to_string();
    let o = hilrig(&[
        "vm",
        "run",
        "--payload",
        "mmio-widths",
        "--device",
        &format!("fpga={host},oob={oob}"),
        "--json",
    ]);
    let v = hilrig_vmm_api::RunSummary::from_output(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stderr)));
    assert_eq!(v.exit_status, hilrig_vmm_api::ExitStatus::Pass, "{v:?}");
    assert_eq!(
        v.vbios.and_then(|m| m.known_as).as_deref(),
        Some("builtin factory VBIOS")
    );
    let o = hilrig(&["device", "oob", &oob, "counters"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(c["width"], 8, "{c}");
    let _ = sim.kill();
    let _ = sim.wait();
}

/// `hilrig runs list|show|history` and `hilrig serve` over a store filled by
/// two real `hilrig campaign run`s (with a stand-in VMM): the CLI's history and
/// the served API's history are the same document.
#[test]
fn runs_and_serve_over_a_store_filled_by_campaign_runs() {
    use hilrig_campaigns::testkit::{stand_in_vmm, FAIL_JSON};
    let t = tempfile::tempdir().unwrap();
    let vmm = stand_in_vmm(t.path(), &format!("echo '{FAIL_JSON}'; exit 1")).unwrap();
    let camp = t.path().join("n.toml");
    std::fs::write(
        &camp,
        "name = \"n\"\n[defaults]\nretries = 0\n[[case]]\nattacks = [\"attack-hang\"]\n",
    )
    .unwrap();
    let out = t.path().join("out");
    for _ in 0..2 {
        let o = hilrig(&[
            "campaign",
            "run",
            p(&camp),
            "--hosts",
            "1",
            "--out",
            p(&out),
            "--vmm",
            p(&vmm),
        ]);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let db = out.join("results.sqlite");
    let list: serde_json::Value =
        serde_json::from_str(&ok(&["runs", "list", "--db", p(&db), "--json"])).unwrap();
    let runs = list.as_array().unwrap();
    assert_eq!(runs.len(), 2, "{list}");
    let run = runs[0]["id"].as_str().unwrap().to_string();
    let show = ok(&["runs", "show", &run, "--db", p(&db)]);
    assert!(show.contains("attack-hang/model/tenant@sim"), "{show}");
    let case = "attack-hang/model/tenant@sim";
    let cli: serde_json::Value =
        serde_json::from_str(&ok(&["runs", "history", case, "--db", p(&db), "--json"])).unwrap();
    assert_eq!(cli["nights"].as_array().unwrap().len(), 2, "{cli}");
    // A typo names the case and exits non-zero.
    let e = fails(&["runs", "history", "no/such/case", "--db", p(&db)]);
    assert!(e.contains("no/such/case"), "{e}");

    let mut srv = Command::new(env!("CARGO_BIN_EXE_hilrig"))
        .args(["serve", "--db", p(&db), "--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = srv.stderr.take().unwrap();
    let srv = Kill(srv);
    let mut line = String::new();
    BufReader::new(stderr).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("hilrig serve: http://")
        .and_then(|s| s.strip_suffix('/'))
        .unwrap_or_else(|| panic!("serve said: {line}"))
        .to_string();
    let body = http_get(
        &addr,
        &format!(
            "/api/history?case={}",
            case.replace('/', "%2F").replace('@', "%40")
        ),
    );
    let api: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(api, cli, "the API's history is the CLI's");
    let page = http_get(&addr, "/");
    assert!(page.contains(&run), "the index lists the run");
    drop(srv);
}

/// A plain HTTP/1.1 GET on loopback; the body.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = Vec::new();
    s.read_to_end(&mut r).unwrap();
    let r = String::from_utf8_lossy(&r).to_string();
    let (head, body) = r.split_once("\r\n\r\n").unwrap_or((&r, ""));
    assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    }
}

fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = b.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        b = &rest[n + 2..];
    }
    out
}

#[test]
fn device_init_makes_a_random_owner_only_reset_key_read_only_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.state"), dir.path().join("b.state"));
    let out = ok(&["device", "init", p(&a), "--width", "4", "--serial", "9"]);
    let ka = dir.path().join("a.state.reset-key");
    assert!(out.contains(p(&ka)), "{out}");
    let kb = dir.path().join("b.key");
    ok(&[
        "device",
        "init",
        p(&b),
        "--width",
        "4",
        "--serial",
        "9",
        "--reset-key-file",
        p(&kb),
    ]);
    // State files and key files: owner-only.
    for f in [&a, &b, &ka, &kb] {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    // Random, not derived from the serial: two devices with the same serial differ.
    let (ta, tb) = (
        std::fs::read_to_string(&ka).unwrap(),
        std::fs::read_to_string(&kb).unwrap(),
    );
    assert_ne!(ta.trim(), tb.trim());
    let derived = hex::encode(hilrig_device::state::dev_keys(9).1);
    assert_ne!(ta.trim(), derived);
    assert_eq!(
        hilrig_device::NvState::load(&a).unwrap().reset_key.to_vec(),
        hex::decode(ta.trim()).unwrap()
    );
    // An existing key file is never replaced (and no state file is made).
    let c = dir.path().join("c.state");
    let e = fails(&["device", "init", p(&c), "--reset-key-file", p(&kb)]);
    assert!(e.contains("b.key"), "{e}");
    assert!(!c.exists());
    // A key on the command line is refused, pointing to the file flag.
    let e = fails(&["device", "oob", p(&a), "physical-reset", "--key", ta.trim()]);
    assert!(e.contains("--reset-key-file"), "{e}");
    // A key file others can read is refused, naming the file and its mode.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ka, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = fails(&[
        "device",
        "oob",
        p(&a),
        "physical-reset",
        "--reset-key-file",
        p(&ka),
    ]);
    assert!(e.contains("a.state.reset-key") && e.contains("0644"), "{e}");
    std::fs::set_permissions(&ka, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The device's own key file works.
    let r: serde_json::Value = serde_json::from_str(&ok(&[
        "device",
        "oob",
        p(&a),
        "physical-reset",
        "--reset-key-file",
        p(&ka),
    ]))
    .unwrap();
    assert_eq!(r["epoch"], 1, "{r}");
}

/// Wait until the state file's lock records `pid` as its holder.
fn wait_for_holder(state: &Path, pid: u32, vmm: &mut std::process::Child) {
    let lock = hilrig_device::state::lock_path(state);
    loop {
        if std::fs::read_to_string(&lock).is_ok_and(|t| t.trim() == pid.to_string()) {
            return;
        }
        if let Ok(Some(st)) = vmm.try_wait() {
            panic!("the first VMM ended ({st}) before taking the state file");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_second_vmm_on_a_held_state_file_is_refused_and_oob_reads_still_work() {
    if !skip::kvm!() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("d.state");
    ok(&["device", "init", p(&st), "--width", "8", "--serial", "5"]);
    let key = dir.path().join("d.state.reset-key");
    let first = Command::new(env!("CARGO_BIN_EXE_hilrig"))
        .args([
            "vm",
            "run",
            "--payload",
            "spin",
            "--mem",
            "8M",
            "--timeout",
            "120s",
        ])
        .args(["--device", "model", "--device-state", p(&st)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = first.id();
    let mut held = Kill(vec![first]);
    wait_for_holder(&st, pid, &mut held.0[0]);
    let before = std::fs::read(&st).unwrap();

    // A second VMM: refused before it reads or writes anything, naming file and pid.
    let e = fails(&[
        "vm",
        "run",
        "--payload",
        "hello",
        "--mem",
        "8M",
        "--device",
        "model",
        "--device-state",
        p(&st),
    ]);
    assert!(
        e.contains("d.state") && e.contains(&format!("pid {pid}")),
        "{e}"
    );
    // Rig actions that write: refused the same way.
    let img = dir.path().join("cfg.bin");
    std::fs::write(&img, b"config!!").unwrap();
    let e = fails(&["device", "flash", p(&st), "--region", "config", p(&img)]);
    assert!(e.contains(&format!("pid {pid}")), "{e}");
    let e = fails(&[
        "device",
        "oob",
        p(&st),
        "physical-reset",
        "--reset-key-file",
        p(&key),
    ]);
    assert!(e.contains(&format!("pid {pid}")), "{e}");
    // Reads work while the VMM holds the file: directly and over an OOB server's PTY,
    // whose PHYSICAL_RESET is answered BUSY.
    let c: serde_json::Value =
        serde_json::from_str(&ok(&["device", "oob", p(&st), "counters"])).unwrap();
    assert_eq!(c["master"], 0, "{c}");
    let mut server = Command::new(env!("CARGO_BIN_EXE_hilrig"))
        .args(["device", "serve-oob", p(&st), "--seconds", "60"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    held.0.push(server);
    let pty = line.trim().to_string();
    let over_pty: serde_json::Value =
        serde_json::from_str(&ok(&["device", "oob", &pty, "counters"])).unwrap();
    assert_eq!(over_pty, c);
    let e = fails(&[
        "device",
        "oob",
        &pty,
        "physical-reset",
        "--reset-key-file",
        p(&key),
    ]);
    assert!(e.contains("Busy"), "{e}");
    assert_eq!(std::fs::read(&st).unwrap(), before, "nothing was written");

    // Once the VMM is gone, the same reset goes through the same server.
    let mut vmm = held.0.remove(0);
    vmm.kill().unwrap();
    vmm.wait().unwrap();
    let r: serde_json::Value = serde_json::from_str(&ok(&[
        "device",
        "oob",
        &pty,
        "physical-reset",
        "--reset-key-file",
        p(&key),
    ]))
    .unwrap();
    assert_eq!(r["epoch"], 1, "{r}");
}

#[test]
fn the_residue_of_a_tenant_without_teardown_is_found_by_the_next_process() {
    if !skip::kvm!() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("d.state");
    ok(&["device", "init", p(&st)]);
    let run = |payload: &str, teardown: bool| {
        let mut args = vec![
            "vm",
            "run",
            "--payload",
            payload,
            "--mem",
            "16M",
            "--device",
            "model",
            "--device-state",
            p(&st),
            "--json",
        ];
        if teardown {
            args.push("--teardown-on-exit");
        }
        summary(&hilrig(&args).stdout)
    };
    // Negative control: no teardown; the next VMM process finds the canary in the
    // device's data buffers (the device stays powered between tenants).
    assert!(run("canary-write", false).passed);
    let scan = run("canary-scan", false);
    assert!(
        !scan.passed && scan.verdict.contains("code 14"),
        "{}",
        scan.verdict
    );
    // With teardown it does not.
    assert!(run("canary-write", true).passed);
    let scan = run("canary-scan", false);
    assert!(scan.passed, "{}", scan.verdict);
}

#[test]
fn the_vmm_refuses_secret_key_files_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    ok(&["fw", "keygen", p(&d("vmm"))]);
    ok(&["fw", "keygen", p(&d("box")), "--encryption"]);
    ok(&["fw", "keygen", p(&d("auth"))]);
    secret(&d("mac.key"), &"11".repeat(32));
    use std::os::unix::fs::PermissionsExt;
    let open = |f: &Path| {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o640)).unwrap();
    };
    let close = |f: &Path| {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    let (vmm, bx, mac) = (d("vmm.key"), d("box.key"), d("mac.key"));
    let rec = d("applied.json");
    let auth = d("auth.pub");
    // Ed25519 (teardown signing), X25519 (bundle decryption), MAC (patch record).
    let cases: [(&Path, Vec<&str>); 3] = [
        (&vmm, vec!["--vmm-key", p(&vmm)]),
        (
            &bx,
            vec![
                "--patch-pubkey",
                p(&auth),
                "--patch-decrypt-key",
                p(&bx),
                "--patch-record",
                p(&rec),
                "--patch-record-key",
                p(&mac),
            ],
        ),
        (
            &mac,
            vec![
                "--patch-pubkey",
                p(&auth),
                "--patch-record",
                p(&rec),
                "--patch-record-key",
                p(&mac),
            ],
        ),
    ];
    for (file, flags) in &cases {
        open(file);
        let mut args = vec!["vm", "run", "--payload", "hello", "--mem", "8M"];
        args.extend(flags.iter().copied());
        let e = fails(&args);
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(
            e.contains(name) && e.contains("0640") && e.contains("chmod 600"),
            "{flags:?}: {e}"
        );
        close(file);
    }
}

/// `campaign run --labgrid`: a labgrid failure before the run is reported with
/// its class and exits as the run's own errors of that class do (the codes of
/// `hilrig_campaigns::error::exit`): a coordinator that is down is INFRA (3,
/// try again), an address that cannot name one CONFIG (2, fix it). Before,
/// both exited 2 with no class.
#[test]
fn campaign_run_labgrid_failures_exit_by_class() {
    use hilrig_campaigns::error::exit;
    let smoke = concat!(env!("CARGO_MANIFEST_DIR"), "/campaigns/smoke.toml");
    let out = tempfile::tempdir().unwrap();
    let out = out.path().to_str().unwrap();
    // A loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = format!("127.0.0.1:{port}");
    for (addr, class, code) in [
        (down.as_str(), "INFRA", exit::INFRA),
        ("no-port-here", "CONFIG", exit::CONFIG),
    ] {
        let o = hilrig(&["campaign", "run", smoke, "--out", out, "--labgrid", addr]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code.into()), "{addr}: {err}");
        assert!(
            err.contains(&format!("--labgrid {addr}: {class}: ")),
            "{addr}: {err}"
        );
    }
}

//! Attacks on the rig through its inventory and its work directories (issue 16).
//! Each test names its attack in its first comment.

use hilrig_rig::inventory::{Inventory, MAX_INVENTORY_BYTES};
use hilrig_rig::sim::SimHost;
use hilrig_rig::{ErrorKind, RigError};
use proptest::prelude::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

fn host(name: &str) -> String {
    format!(
        "[[host]]\nname = {}\n[host.power]\ndriver = \"sim\"\n",
        toml_str(name)
    )
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn parse(text: &str) -> Result<Inventory, RigError> {
    Inventory::parse(text, Path::new("lab.toml"))
}

#[test]
fn a_64_kib_host_name_is_refused_with_a_short_clear_error() {
    // Attack: a 64 KiB host name (panicked `hilrig rig check`).
    let name = "a".repeat(64 * 1024);
    let e = parse(&host(&name)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    let msg = e.to_string();
    assert!(
        msg.contains("lab.toml") && msg.contains("65536 bytes") && msg.contains("at most 64"),
        "{msg}"
    );
    assert!(
        msg.len() < 400,
        "the error repeats the name: {} bytes",
        msg.len()
    );
    // 64 bytes is still fine.
    parse(&host(&"b".repeat(64))).unwrap();
}

#[test]
fn host_names_that_traverse_out_of_the_work_directory_are_refused() {
    // Attack: host names used as directory names escape the work directory.
    for bad in [
        "../../etc",
        "..",
        "a/b",
        "/abs",
        "a..b",
        ".hidden",
        "-rf",
        "",
        "with space",
        "nul\0",
        "caf\u{e9}",
    ] {
        let e = parse(&host(bad)).unwrap_err().to_string();
        assert!(e.contains("host"), "{bad:?}: {e}");
    }
    for good in ["sim-1", "x86_7.lab", "A", "n0.d-e_f"] {
        parse(&host(good)).unwrap();
    }
}

#[test]
fn console_names_that_traverse_out_of_the_capture_directory_are_refused() {
    // Attack: a console name becomes `<case>.<console>.log` in the artifact directory.
    let text = format!(
        "{}[[host.console]]\nname = \"../../../etc/cron.d/x\"\ndriver = \"sim\"\n",
        host("h")
    );
    let e = parse(&text).unwrap_err().to_string();
    assert!(e.contains("host `h`") && e.contains("console"), "{e}");
}

#[test]
fn an_oversized_inventory_is_refused_before_parsing() {
    // Attack: a huge inventory file (memory exhaustion in the TOML parser).
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("big.toml");
    let mut text = host("a");
    text.push_str(&"#".repeat(MAX_INVENTORY_BYTES as usize));
    std::fs::write(&p, &text).unwrap();
    let e = Inventory::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("big.toml")
            && e.contains(&text.len().to_string())
            && e.contains(&MAX_INVENTORY_BYTES.to_string()),
        "{e}"
    );
}

#[test]
fn an_inventory_that_is_a_fifo_or_device_is_refused() {
    // Attack: a FIFO (hangs the rig) or /dev/zero (endless) as the inventory.
    let e = Inventory::load(Path::new("/dev/zero"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/dev/zero") && e.contains("not a regular file"),
        "{e}"
    );
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("lab.toml");
    match std::process::Command::new("mkfifo").arg(&fifo).status() {
        Ok(s) if s.success() => {
            let e = Inventory::load(&fifo).unwrap_err().to_string();
            assert!(e.contains("FIFO"), "{e}");
        }
        _ => eprintln!("SKIPPED: the FIFO case (no mkfifo)"),
    }
}

fn sim_inventory(workdir: Option<&Path>) -> Inventory {
    let lab = match workdir {
        Some(w) => format!("[lab]\nworkdir = {}\n", toml_str(&w.to_string_lossy())),
        None => String::new(),
    };
    parse(&format!("{lab}{}", host("h1"))).unwrap()
}

fn ensure(inv: &Inventory) -> Result<(), RigError> {
    SimHost::new(inv, inv.host("h1").unwrap()).ensure()
}

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

#[test]
fn a_world_writable_work_directory_made_by_someone_else_first_is_refused() {
    // Attack: a local user pre-creates the work directory 0777 so root writes into it.
    let d = tempfile::tempdir().unwrap();
    let w = d.path().join("work");
    std::fs::create_dir(&w).unwrap();
    chmod(&w, 0o777);
    let inv = sim_inventory(Some(&w));
    let e = ensure(&inv).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    let msg = e.to_string();
    assert!(msg.contains("work") && msg.contains("0777"), "{msg}");
    assert!(!w.join("h1").exists());
    // A missing work directory is created 0700, and so is the host's.
    let w2 = d.path().join("fresh");
    ensure(&sim_inventory(Some(&w2))).unwrap();
    assert_eq!(std::fs::metadata(&w2).unwrap().mode() & 0o777, 0o700);
    assert_eq!(
        std::fs::metadata(w2.join("h1")).unwrap().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(w2.join("h1/device.state"))
            .unwrap()
            .mode()
            & 0o777,
        0o600
    );
}

#[test]
fn the_default_work_directory_under_tmpdir_is_refused_when_planted() {
    // Attack: `$TMPDIR/hilrig-rig` pre-created by another user (0777) before the rig runs.
    let d = tempfile::tempdir().unwrap();
    // Each test runs in its own process under nextest; nothing else reads TMPDIR here.
    std::env::set_var("TMPDIR", d.path());
    let planted = d.path().join("hilrig-rig");
    std::fs::create_dir(&planted).unwrap();
    chmod(&planted, 0o777);
    let inv = sim_inventory(None);
    assert_eq!(inv.workdir(), planted);
    let e = ensure(&inv).unwrap_err().to_string();
    assert!(e.contains("hilrig-rig") && e.contains("0777"), "{e}");
    let e = inv.private_workdir().unwrap_err().to_string();
    assert!(e.contains("0777"), "{e}");
}

#[test]
fn a_work_directory_owned_by_another_user_is_refused() {
    // Attack: a local user (uid 65534 here) owns the work directory, 0755.
    let d = tempfile::tempdir().unwrap();
    let w = d.path().join("work");
    std::fs::create_dir(&w).unwrap();
    if std::fs::metadata(&w).unwrap().uid() != 0 {
        eprintln!(
            "SKIPPED: a_work_directory_owned_by_another_user_is_refused (needs root to chown)"
        );
        return;
    }
    match std::process::Command::new("chown")
        .arg("65534:65534")
        .arg(&w)
        .status()
    {
        Ok(s) if s.success() => {}
        _ => {
            eprintln!("SKIPPED: a_work_directory_owned_by_another_user_is_refused (chown failed)");
            return;
        }
    }
    let e = ensure(&sim_inventory(Some(&w))).unwrap_err().to_string();
    assert!(e.contains("owned by uid 65534"), "{e}");
}

#[test]
fn a_symlinked_host_directory_is_refused() {
    // Attack: `<workdir>/<host>` planted as a symlink to a directory root cares about.
    let d = tempfile::tempdir().unwrap();
    let w = d.path().join("work");
    let victim = d.path().join("victim");
    std::fs::create_dir(&w).unwrap();
    std::fs::create_dir(&victim).unwrap();
    std::os::unix::fs::symlink(&victim, w.join("h1")).unwrap();
    let e = ensure(&sim_inventory(Some(&w))).unwrap_err().to_string();
    assert!(e.contains("symlink"), "{e}");
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    // Attack: arbitrary inventory text (no input may panic the parser).
    #[test]
    fn random_inventory_text_never_panics(s in "\\PC{0,400}") {
        let _ = parse(&s);
    }

    // Attack: arbitrary host names and console names in otherwise valid files.
    #[test]
    fn random_host_and_console_names_never_panic(
        name in "\\PC{0,80}",
        console in "[a-z./\\-]{0,20}",
    ) {
        let text = format!("{}[[host.console]]\nname = {}\ndriver = \"sim\"\n", host(&name), toml_str(&console));
        if let Ok(inv) = parse(&text) {
            let h = &inv.hosts[0];
            prop_assert!(!h.name.contains('/') && !h.name.contains("..") && h.name.len() <= 64);
            prop_assert!(!h.consoles[0].name.contains('/'));
        }
    }
}

#[test]
fn a_world_writable_capture_directory_is_refused() {
    // Attack: the artifact directory for console captures is pre-created 0777.
    let d = tempfile::tempdir().unwrap();
    let caps = d.path().join("caps");
    std::fs::create_dir(&caps).unwrap();
    chmod(&caps, 0o777);
    let rig = hilrig_rig::Rig::new(sim_inventory(Some(&d.path().join("work"))));
    let e = rig
        .start_captures("h1", &caps, "case-1")
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("caps") && e.contains("0777"), "{e}");
}

#[test]
fn a_symlink_or_fifo_planted_at_a_console_capture_path_is_refused() {
    // Attack: `hilrig rig console --out PATH` (or a capture directory's file) with a
    // symlink to another file planted at PATH (the capture would truncate it) or a
    // FIFO nobody reads (the capture would hang in open).
    use hilrig_rig::console::{Capture, Source};
    let d = tempfile::tempdir().unwrap();
    let com1 = d.path().join("com1");
    std::fs::write(&com1, "").unwrap();
    let victim = d.path().join("victim.conf");
    std::fs::write(&victim, "precious\n").unwrap();
    let link = d.path().join("case.com1.log");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let msg = match Capture::start("h", "com1", Source::Tail(com1.clone()), &link) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(
        msg.contains(link.to_str().unwrap()) && msg.contains("symlink"),
        "{msg}"
    );
    let fifo = d.path().join("fifo.log");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; mkfifo has no other preconditions.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let (src, f2) = (com1.clone(), fifo.clone());
    std::thread::spawn(move || {
        let r = Capture::start("h", "com1", Source::Tail(src), &f2).map(|c| c.stop());
        let _ = tx.send(r.err().map(|e| e.to_string()).unwrap_or_default());
    });
    let msg = rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("the capture hung opening a FIFO");
    assert!(
        msg.contains(fifo.to_str().unwrap()) && msg.contains("FIFO"),
        "{msg}"
    );
    // Negative control: a fresh path captures.
    let ok = d.path().join("ok.log");
    Capture::start("h", "com1", Source::Tail(com1), &ok)
        .unwrap()
        .stop()
        .unwrap();
    assert!(ok.is_file());
}

/// A program file at `p` (a shell script), mode `mode`.
fn program(p: &Path, mode: u32) {
    std::fs::write(p, "#!/bin/sh\necho planted\n").unwrap();
    chmod(p, mode);
}

#[test]
fn a_vmm_on_a_path_entry_others_can_write_is_never_run() {
    // Attack: root's PATH holds a directory a user can write (0777, not sticky);
    // the user drops a `hilrig-vmm` there. A rig whose executable has no VMM beside
    // it (a program linking the rig library, or `hilrig` copied alone) fell back to
    // PATH and would start the user's program as root for every simulated host.
    use hilrig_rig::sim::{find_vmm_beside, FindVmmError};
    let d = tempfile::tempdir().unwrap();
    let hostile = d.path().join("hostile-bin");
    std::fs::create_dir(&hostile).unwrap();
    chmod(&hostile, 0o777);
    program(&hostile.join("hilrig-vmm"), 0o755);
    // The running program, with nothing beside it.
    let bin = d.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    chmod(&bin, 0o755);
    let exe = bin.join("lab-tool");
    program(&exe, 0o755);
    let path = std::env::join_paths(
        std::iter::once(hostile.clone()).chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )),
    )
    .unwrap();
    // The finder reads no PATH now; set it as an attacker's would be, for this
    // process (its own process under nextest), without a HILRIG_VMM that would
    // be used first.
    std::env::set_var("PATH", &path);
    std::env::remove_var("HILRIG_VMM");
    let r = find_vmm_beside(&exe, None);
    assert!(
        matches!(&r, Err(FindVmmError::NotFound(dir)) if dir == &bin),
        "{r:?}"
    );
    // A VMM beside the executable, in a directory others can write: refused, not
    // run and not skipped for another.
    program(&bin.join("hilrig-vmm"), 0o755);
    chmod(&bin, 0o777);
    let r = find_vmm_beside(&exe, None);
    assert!(
        matches!(&r, Err(FindVmmError::Untrusted { reason, .. })
            if reason.contains(bin.to_str().unwrap()) && reason.contains("writable by group or others")),
        "{r:?}"
    );
    // A VMM others can write itself (the directory fine): refused.
    chmod(&bin, 0o755);
    chmod(&bin.join("hilrig-vmm"), 0o757);
    let r = find_vmm_beside(&exe, None);
    assert!(
        matches!(&r, Err(FindVmmError::Untrusted { reason, .. }) if reason.contains("0757")),
        "{r:?}"
    );
    // A configured one (lab.vmm) in the hostile directory: refused too.
    let r = find_vmm_beside(&exe, Some(&hostile.join("hilrig-vmm")));
    assert!(matches!(&r, Err(FindVmmError::Untrusted { .. })), "{r:?}");
    // Negative control: the VMM beside the executable, ours and not writable by
    // others, in directories only we can change.
    chmod(&bin.join("hilrig-vmm"), 0o755);
    assert_eq!(
        find_vmm_beside(&exe, None).unwrap(),
        std::fs::canonicalize(bin.join("hilrig-vmm")).unwrap()
    );
}

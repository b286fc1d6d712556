//! Campaigns on simulated hosts that are real hosts on loopback (`scripts/sim-lab`:
//! sshds on 127.0.0.11.., their own users; needs root and openssh-server, and
//! /dev/kvm with a built VMM for the real runs; otherwise SKIPPED loudly).

use hilrig_campaigns::runner::{run_campaign, RunOptions};
use hilrig_reports::Outcome;
use hilrig_rig::simlab::{LabError, SimLab};
use std::path::{Path, PathBuf};

mod common;

fn lab(test: &str, n: usize) -> Option<SimLab> {
    match SimLab::start(n) {
        Ok(l) => Some(l),
        Err(LabError::Skipped(why)) => {
            eprintln!("SKIPPED: {test}: {why}");
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

fn kvm_and_vmm(test: &str) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("SKIPPED: {test}: /dev/kvm not available");
        return false;
    }
    if let Err(e) = hilrig_rig::sim::find_vmm(None) {
        eprintln!("SKIPPED: {test}: {e}");
        return false;
    }
    true
}

fn campaigns_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn opts(out: &Path, file: PathBuf, inventory: &Path) -> RunOptions {
    let mut o = RunOptions::new(file);
    o.inventory = Some(inventory.to_path_buf());
    o.out_dir = out.to_path_buf();
    o.progress = Some(false);
    o
}

/// The shipped smoke campaign, unchanged, on two SSH hosts and a local one: every
/// case passes, VMM cases run on the SSH hosts with their artifacts brought back.
#[test]
fn smoke_campaign_on_ssh_hosts() {
    let test = "smoke_campaign_on_ssh_hosts";
    if !kvm_and_vmm(test) {
        return;
    }
    let Some(lab) = lab(test, 2) else { return };
    let t = tempfile::tempdir().unwrap();
    let s = run_campaign(opts(
        t.path(),
        campaigns_dir().join("smoke.toml"),
        &lab.inventory,
    ))
    .expect("run");
    for c in &s.run.cases {
        assert_eq!(c.outcome, Outcome::Pass, "{}: {}", c.id, c.message);
    }
    assert_eq!(s.exit_status(), 0);
    assert!(s.offline_hosts.is_empty(), "{:?}", s.offline_hosts);
    let remote: Vec<_> = s
        .run
        .cases
        .iter()
        .filter(|c| c.host.starts_with("sim-ssh-"))
        .collect();
    // How many cases each host gets depends on how fast each is (a local host is
    // quicker than one over SSH); that the SSH hosts ran cases, with their
    // artifacts brought back, is what this checks.
    assert!(
        !remote.is_empty(),
        "no case ran on an SSH host; attempts: {:?}",
        s.run
            .cases
            .iter()
            .flat_map(|c| c.attempts.iter().map(|a| (&a.host, a.outcome, &a.message)))
            .collect::<Vec<_>>()
    );
    let run_dir = t.path().join(&s.run.id);
    for c in &remote {
        let kinds: Vec<String> = c.artifacts.iter().map(|a| a.path.clone()).collect();
        // A console, where the guest printed one, is the controller's capture
        // of the host's console line (timestamped lines), not a fetched file.
        for p in kinds.iter().filter(|p| p.ends_with("console.txt")) {
            if let Ok(text) = std::fs::read_to_string(run_dir.join(p)) {
                assert!(
                    text.lines()
                        .all(|l| l.starts_with('[') && l.contains("Z +")),
                    "{}: {p}: {text}",
                    c.id
                );
            }
        }
        assert!(
            kinds.iter().any(|p| p.ends_with("vmm.json")),
            "{}: {kinds:?}",
            c.id
        );
        // A hung guest and a refused VBIOS (the VMM stops before the guest) leave no
        // teardown record.
        if c.attack != "attack-hang" && c.attack != "vbios-overwrite" {
            assert!(
                kinds.iter().any(|p| p.ends_with("teardown.json")),
                "{}: no teardown record brought back: {kinds:?}",
                c.id
            );
        }
    }
    // Local-only attacks (control socket, power cut) stayed on the local host.
    for c in &s.run.cases {
        if [
            "patch-under-storm",
            "patch-bad-bundles",
            "power-cut-program",
        ]
        .contains(&c.attack.as_str())
        {
            assert_eq!(c.host, "local-1", "{}", c.id);
        }
    }
}

/// A host that fails its health check before the run and does not come back
/// from recovery (wedged, and it never powers on again) is taken offline with
/// the reason and never given work; it stays offline in the results database
/// for later runs (even once reachable again) until an operator brings it back.
#[test]
fn unreachable_host_goes_offline() {
    let test = "unreachable_host_goes_offline";
    let Some(lab) = lab(test, 1) else { return };
    assert!(lab.host("fault", 1, "dead"));
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c.toml");
    std::fs::write(
        &c,
        "name = \"t\"\n[defaults]\ncase_timeout = \"5s\"\n[[case]]\nattacks = [\"attack-hang\"]\ntags = [\"ssh\"]\n",
    )
    .unwrap();
    // A stand-in VMM: the case must not get as far as running one.
    let quick = hilrig_rig::recover::RecoverOptions {
        ssh_timeout: std::time::Duration::from_secs(3),
        wait: std::time::Duration::from_secs(5),
    };
    let mut o = opts(t.path(), c.clone(), &lab.inventory);
    o.vmm = Some(PathBuf::from("/bin/true"));
    o.recover = quick;
    let s = run_campaign(o).expect("run");
    assert_eq!(s.offline_hosts.len(), 1, "{:?}", s.offline_hosts);
    assert_eq!(s.offline_hosts[0].0, "sim-ssh-1");
    // Marked Bad only after the recovery was tried.
    assert!(
        s.offline_hosts[0].1.contains("recovery before the run")
            && s.offline_hosts[0].1.contains("power cycle"),
        "{:?}",
        s.offline_hosts
    );
    let case = &s.run.cases[0];
    assert_eq!(case.outcome, Outcome::Skipped, "{case:?}");
    assert!(case.attempts.is_empty(), "{case:?}");
    assert!(
        case.message.contains("offline") && case.message.contains("sim-ssh-1"),
        "{}",
        case.message
    );
    assert_eq!(s.exit_status(), 3);
    assert!(lab.host("fault", 1, "fix"));

    // Powered on again, it is still offline: recorded, until an operator says so.
    assert!(lab.host("power", 1, "on"));
    let mut o = opts(t.path(), c.clone(), &lab.inventory);
    o.vmm = Some(PathBuf::from("/bin/true"));
    let s = run_campaign(o).expect("run");
    assert_eq!(s.offline_hosts.len(), 1, "{:?}", s.offline_hosts);
    assert!(
        s.offline_hosts[0].1.contains("online sim-ssh-1"),
        "{:?}",
        s.offline_hosts
    );
    assert!(s.run.cases[0].attempts.is_empty());
    // `hilrig rig host DB online sim-ssh-1`: the host gets work again.
    let db = t.path().join("results.sqlite");
    hilrig_rig::hoststate::HostStates::open(&db.to_string_lossy())
        .unwrap()
        .set_online("sim-ssh-1", "test: operator")
        .unwrap();
    let mut o = opts(t.path(), c, &lab.inventory);
    o.vmm = Some(PathBuf::from("/bin/true"));
    let s = run_campaign(o).expect("run");
    assert!(s.offline_hosts.is_empty(), "{:?}", s.offline_hosts);
    assert!(!s.run.cases[0].attempts.is_empty());
    assert!(s.run.cases[0]
        .attempts
        .iter()
        .all(|a| a.host == "sim-ssh-1"));
}

/// LAVA-style health check: a host that fails it before the run (powered off:
/// SSH unreachable) is first recovered through its power driver and checked
/// again; back, it stays online and gets work.
#[test]
fn powered_off_host_is_recovered_before_the_run() {
    let test = "powered_off_host_is_recovered_before_the_run";
    let Some(lab) = lab(test, 1) else { return };
    assert!(lab.host("power", 1, "off"));
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c.toml");
    std::fs::write(
        &c,
        "name = \"t\"\n[defaults]\ncase_timeout = \"5s\"\ninfra_retries = 0\n[[case]]\nattacks = [\"attack-hang\"]\ntags = [\"ssh\"]\n",
    )
    .unwrap();
    let mut o = opts(t.path(), c, &lab.inventory);
    o.vmm = Some(PathBuf::from("/bin/true"));
    o.recover = hilrig_rig::recover::RecoverOptions {
        ssh_timeout: std::time::Duration::from_secs(3),
        wait: std::time::Duration::from_secs(20),
    };
    let s = run_campaign(o).expect("run");
    assert!(s.offline_hosts.is_empty(), "{:?}", s.offline_hosts);
    let case = &s.run.cases[0];
    assert!(!case.attempts.is_empty(), "{case:?}");
    assert!(case.attempts.iter().all(|a| a.host == "sim-ssh-1"));
}

/// A stand-in VMM for the wedge tests: `--version` answers (the health check);
/// its first run marks the host for the test to wedge and then never finishes;
/// later runs fail at once (no verdict: INFRA, on a host that answers).
fn wedging_vmm(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("wedge-vmm");
    std::fs::write(
        &p,
        "#!/bin/sh\ncase \"$1\" in --version) echo 'wedge stand-in 1'; exit 0;; esac\n\
         w=$(dirname \"$0\")/..\n\
         if [ ! -e \"$w/wedged-once\" ]; then touch \"$w/wedged-once\" \"$w/wedge-me\"; exec sleep 600; fi\n\
         echo 'stand-in: second run, no verdict' >&2; exit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Run a one-case campaign on `sim-ssh-1` with the wedging stand-in; once its
/// first attempt is running there, `scripts/sim-lab fault DIR 1 <fault>`.
fn run_wedged(lab: &SimLab, t: &Path, fault: &'static str) -> hilrig_campaigns::runner::RunSummary {
    let inv = hilrig_rig::Inventory::load(&lab.inventory).unwrap();
    let workdir = inv.host("sim-ssh-1").unwrap().ssh.clone().unwrap().workdir;
    let marker = PathBuf::from(&workdir).join("wedge-me");
    let c = t.join("c.toml");
    std::fs::write(
        &c,
        "name = \"t\"\n[defaults]\ncase_timeout = \"20s\"\ninfra_retries = 1\n[[case]]\nattacks = [\"attack-hang\"]\ntags = [\"ssh\"]\n",
    )
    .unwrap();
    let mut o = opts(t, c, &lab.inventory);
    o.vmm = Some(wedging_vmm(t));
    o.recover = hilrig_rig::recover::RecoverOptions {
        ssh_timeout: std::time::Duration::from_secs(5),
        wait: std::time::Duration::from_secs(20),
    };
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (d, labdir) = (done.clone(), lab.dir().to_path_buf());
    let watcher = std::thread::spawn(move || {
        while !d.load(std::sync::atomic::Ordering::SeqCst) {
            if marker.exists() {
                let st = std::process::Command::new(hilrig_rig::simlab::script())
                    .arg("fault")
                    .arg(&labdir)
                    .args(["1", fault])
                    .status()
                    .unwrap();
                assert!(st.success());
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        false
    });
    let s = run_campaign(o).expect("run");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(watcher.join().unwrap(), "the first attempt never started");
    s
}

/// A host that wedges during an attempt (its sshd and processes stopped: SSH
/// hangs) is recovered soft -> hard -> power cycle through its power driver and
/// waited for; the attempt is INFRA and retried on it; it stays online.
#[test]
fn wedged_host_is_recovered_by_power_cycle() {
    let test = "wedged_host_is_recovered_by_power_cycle";
    let Some(lab) = lab(test, 1) else { return };
    let t = tempfile::tempdir().unwrap();
    let s = run_wedged(&lab, t.path(), "hang");
    let case = &s.run.cases[0];
    assert_eq!(case.attempts.len(), 2, "{case:?}");
    let a0 = &case.attempts[0];
    assert_eq!(a0.outcome, Outcome::Infra, "{a0:?}");
    assert!(
        a0.message.contains("recovered by power cycle"),
        "{}",
        a0.message
    );
    // Retried on the recovered host, which answered (its stand-in fails at once).
    assert_eq!(case.attempts[1].host, "sim-ssh-1");
    assert!(
        case.attempts[1].message.contains("no verdict"),
        "{}",
        case.attempts[1].message
    );
    assert!(s.offline_hosts.is_empty(), "{:?}", s.offline_hosts);
}

/// A wedged host that does not power on again goes offline with the reason
/// (the recovery steps tried); the case is not run elsewhere (no other host).
#[test]
fn wedged_host_that_never_comes_back_goes_offline() {
    let test = "wedged_host_that_never_comes_back_goes_offline";
    let Some(lab) = lab(test, 1) else { return };
    let t = tempfile::tempdir().unwrap();
    let s = run_wedged(&lab, t.path(), "dead");
    let case = &s.run.cases[0];
    assert_eq!(case.attempts.len(), 1, "{case:?}");
    assert_eq!(case.attempts[0].outcome, Outcome::Infra);
    assert_eq!(s.offline_hosts.len(), 1, "{:?}", s.offline_hosts);
    let (h, why) = &s.offline_hosts[0];
    assert_eq!(h, "sim-ssh-1");
    assert!(
        why.contains("does not come back") && why.contains("power cycle"),
        "{why}"
    );
    assert!(case.attempts[0].message.contains("offline") || why.contains("recovery"));
    // Recorded: the next run does not give it work either.
    let db = t.path().join("results.sqlite");
    let st = hilrig_rig::hoststate::HostStates::open(&db.to_string_lossy())
        .unwrap()
        .get("sim-ssh-1")
        .unwrap()
        .unwrap();
    assert!(!st.online(), "{st:?}");
}

/// The host's device as the lab made it: its state file on the host, its OOB
/// server's pid and its OOB port on the controller (`None`: the lab has no
/// per-host devices, e.g. no `hilrig` build to run them).
fn host_device(lab: &SimLab, host: &str) -> Option<(PathBuf, PathBuf)> {
    let inv = hilrig_rig::Inventory::load(&lab.inventory).unwrap();
    let h = inv.host(host).unwrap();
    let state = h.sim.state.clone()?;
    let i = host.trim_start_matches("sim-ssh-");
    Some((state, lab.dir().join(format!("h{i}")).join("oob.pid")))
}

const PROGRAM_CASE: &str = "name = \"t\"\n[defaults]\ncase_timeout = \"60s\"\nstep_timeout = \"20s\"\n\
     retries = 0\ninfra_retries = 0\n[[case]]\nattacks = [\"attack-flash-program\"]\n\
     backends = [\"model\"]\nprofiles = [\"operator\"]\ntags = [\"ssh\"]\n\
     expect = { counter_delta = { firmware = 1, master = 1 }, service_verdict = \"quarantined\" }\n";

/// Negative control for the OOB path: the counters the runner judges are the
/// host's, read through its OOB port. A counted flash program on the SSH host
/// passes with the expected deltas, while the controller's copy of the state
/// (the one the rig prepared) never moved: had the runner read it, the deltas
/// would be zero and the case would fail. The console came through the host's
/// console line.
#[test]
fn counters_come_from_the_hosts_oob_port() {
    let test = "counters_come_from_the_hosts_oob_port";
    if !kvm_and_vmm(test) {
        return;
    }
    let Some(lab) = lab(test, 1) else { return };
    let Some((host_state, _)) = host_device(&lab, "sim-ssh-1") else {
        eprintln!("SKIPPED: {test}: the lab has no per-host devices (no hilrig build)");
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c.toml");
    // And a case whose guest prints on its console.
    let pci = "[[case]]\nattacks = [\"pci-enum\"]\nbackends = [\"model\"]\n\
               profiles = [\"tenant\"]\ntags = [\"ssh\"]\n";
    std::fs::write(&c, format!("{PROGRAM_CASE}{pci}")).unwrap();
    let s = run_campaign(opts(t.path(), c, &lab.inventory)).expect("run");
    for c in &s.run.cases {
        assert_eq!(c.host, "sim-ssh-1");
        assert_eq!(c.outcome, Outcome::Pass, "{}: {}", c.id, c.message);
    }
    // The device the runner read is the one in the host's own state file.
    let nv = hilrig_device::state::NvState::load(&host_state).unwrap();
    assert_eq!(nv.serial, 2001);
    // The controller's copy is the prepared, factory state: never consulted.
    common::controller_copies_never_moved(t.path());
    // The console: captured on the controller through the console driver
    // (timestamped lines), not a file fetched back.
    common::captured_console(&s, t.path(), "pci-enum");
}

/// Run the one-case program campaign on `sim-ssh-1` after `breaking` its OOB
/// line (given the lab and the line's path on the controller): every attempt
/// is INFRA naming the OOB line, never a counters FAIL (nor a PASS judged from
/// a state file on the controller).
fn oob_broken_case_is_infra(test: &str, breaking: impl FnOnce(&SimLab, &Path)) {
    let Some(lab) = lab(test, 1) else { return };
    if host_device(&lab, "sim-ssh-1").is_none() {
        eprintln!("SKIPPED: {test}: the lab has no per-host devices (no hilrig build)");
        return;
    }
    if !kvm_and_vmm(test) {
        return;
    }
    breaking(&lab, &lab.dir().join("h1").join("oob"));
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c.toml");
    std::fs::write(&c, PROGRAM_CASE).unwrap();
    let s = run_campaign(opts(t.path(), c, &lab.inventory)).expect("run");
    let case = &s.run.cases[0];
    assert!(!case.attempts.is_empty(), "{case:?}");
    for a in &case.attempts {
        assert_eq!(a.outcome, Outcome::Infra, "{a:?}");
        assert!(a.message.contains("OOB line"), "{}", a.message);
    }
    assert_ne!(case.outcome, Outcome::Fail, "{case:?}");
    assert_ne!(case.outcome, Outcome::Pass, "{case:?}");
}

/// Adversarial: the host's OOB server hung (the port is there but never
/// answers; a killed server's PTY number may be reused by another lab's line
/// while tests run in parallel, so it is stopped, not killed).
#[test]
fn broken_oob_line_is_infra() {
    oob_broken_case_is_infra("broken_oob_line_is_infra", |lab, _| {
        let (_, pid_file) = host_device(lab, "sim-ssh-1").unwrap();
        let pid = std::fs::read_to_string(pid_file).unwrap();
        let st = std::process::Command::new("kill")
            .args(["-STOP", pid.trim()])
            .status()
            .unwrap();
        assert!(st.success());
    });
}

/// Adversarial: garbage on the host's OOB line (the controller's end of it
/// now a PTY whose other side answers every byte with noise).
#[test]
fn garbage_on_the_oob_line_is_infra() {
    let noise = std::sync::Arc::new(std::sync::Mutex::new(None));
    let keep = noise.clone();
    oob_broken_case_is_infra("garbage_on_the_oob_line_is_infra", move |_, line| {
        let mut child = std::process::Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import os,sys\nm,s=os.openpty()\nimport tty\ntty.setraw(s)\n\
                 print(os.ttyname(s),flush=True)\nwhile True:\n    os.read(m,4096)\n    \
                 os.write(m,b'\\x7e\\x00\\xffnoise\\r\\n'*8)\n",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut first,
        )
        .unwrap();
        let _ = std::fs::remove_file(line);
        std::os::unix::fs::symlink(first.trim(), line).unwrap();
        *keep.lock().unwrap() = Some(Killed(child));
    });
    // Ended when the guard drops, also when the test panics.
    drop(noise);
}

/// A child process killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
/// One fpga case on the hosts with a board, no retries.
const FPGA_KEY_READ: &str = "name = \"t\"\n[defaults]\nretries = 0\ninfra_retries = 0\n\
     case_timeout = \"60s\"\ntags = [\"fpga\"]\n[[case]]\nattacks = [\"attack-key-read\"]\n\
     backends = [\"fpga\"]\n";

/// Run [`FPGA_KEY_READ`] on `lab` with `vmm`.
fn key_read_on_board(lab: &SimLab, vmm: PathBuf) -> hilrig_campaigns::runner::RunSummary {
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c.toml");
    std::fs::write(&c, FPGA_KEY_READ).unwrap();
    let mut o = opts(t.path(), c, &lab.inventory);
    o.vmm = Some(vmm);
    run_campaign(o).expect("run")
}

/// Every attempt of the run's one case, and the case, INFRA on `sim-ssh-1` with
/// a message naming one of `words`.
fn all_infra(s: &hilrig_campaigns::runner::RunSummary, words: &[&str]) {
    let case = &s.run.cases[0];
    assert!(!case.attempts.is_empty(), "{case:?}");
    for a in &case.attempts {
        assert_eq!(
            (a.outcome, a.host.as_str()),
            (Outcome::Infra, "sim-ssh-1"),
            "{a:?}"
        );
        assert!(words.iter().any(|w| a.message.contains(w)), "{}", a.message);
    }
    assert_eq!(case.outcome, Outcome::Infra, "{case:?}");
}

/// The `hilrig` build (the VMM as `hilrig vm run`, and `hilrig fpga relay-oob`).
fn hilrig_build() -> PathBuf {
    let vmm = hilrig_rig::sim::find_vmm(None).unwrap();
    hilrig_campaigns::board::find_hilrig(None, &vmm).expect("a hilrig build beside the VMM")
}

/// A lab whose SSH hosts each have a board (`scripts/sim-lab` with
/// `SIM_LAB_FPGA=1`: `hilrig fpga serve-sim` as the host's user), or SKIPPED.
fn fpga_lab(test: &str) -> Option<SimLab> {
    if !kvm_and_vmm(test) {
        return None;
    }
    match SimLab::start_with_fpga(1) {
        Ok(l) => Some(l),
        Err(LabError::Skipped(why)) => {
            eprintln!("SKIPPED: {test}: {why}");
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

/// The smoke campaign's fpga case, and the counted operator flash program, on
/// the board of an SSH host (tag `fpga`: only the SSH host has a board in the
/// inventory). The VMM runs there with `--device fpga=PORT` on the board's
/// bridge port on the host; the board's OOB port is on the controller: the rig
/// resets and reads it there (the program's FIRMWARE +1 and the service's
/// quarantine come from it), and lends it to the VMM for its teardown through
/// the host's `hilrig fpga relay-oob` (a complete teardown record with a
/// trusted counters verdict). No serve-sim of the runner's own is used.
#[test]
fn fpga_cases_run_on_an_ssh_hosts_board() {
    let test = "fpga_cases_run_on_an_ssh_hosts_board";
    let Some(lab) = fpga_lab(test) else { return };
    let inv = hilrig_rig::Inventory::load(&lab.inventory).unwrap();
    let h = inv.host("sim-ssh-1").unwrap();
    assert!(h.device.starts_with("fpga="), "{}", h.device);
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c.toml");
    std::fs::write(
        &c,
        "name = \"smoke-fpga\"\n[defaults]\nretries = 0\ninfra_retries = 0\n\
         case_timeout = \"240s\"\nstep_timeout = \"120s\"\ntags = [\"fpga\"]\n\
         [[case]]\nattacks = [\"attack-key-read\"]\nbackends = [\"fpga\"]\nprofiles = [\"tenant\"]\n\
         [[case]]\nattacks = [\"attack-flash-program\"]\nbackends = [\"fpga\"]\nprofiles = [\"operator\"]\n\
         expect = { counter_delta = { firmware = 1, master = 1 }, service_verdict = \"quarantined\" }\n",
    )
    .unwrap();
    let mut o = opts(t.path(), c, &lab.inventory);
    // `hilrig` itself (as `hilrig campaign run`): its `fpga relay-oob` on the host.
    o.vmm = Some(hilrig_build());
    // Any serve-sim the runner started would fail: the board must be the host's.
    o.fpga_sim = Some(t.path().join("no-such-hilrig"));
    let s = run_campaign(o).expect("run");
    for c in &s.run.cases {
        let on = (c.outcome, c.host.as_str());
        assert_eq!(on, (Outcome::Pass, "sim-ssh-1"), "{}: {}", c.id, c.message);
        // The tenant's VMM read the board through the relay for its teardown;
        // the operator's program was counted on the board, read here.
        let want = match c.profile.as_str() {
            "tenant" => "counters verdict trusted",
            _ => "firmware+1",
        };
        assert!(c.observed.contains(want), "{}: {}", c.id, c.observed);
    }
    assert_eq!(s.exit_status(), 0);
}

/// Negative control: the board's OOB line on the controller's end dead (the
/// host's serve-sim stopped: its ports there but never answering): the board
/// fails its check before the case, INFRA naming the board, never a device
/// verdict. And a runner whose VMM is a bare `hilrig-vmm` (no `hilrig fpga
/// relay-oob` on the host) is a CONFIG error before the board is touched.
#[test]
fn an_ssh_hosts_board_with_a_dead_oob_line_is_infra() {
    let test = "an_ssh_hosts_board_with_a_dead_oob_line_is_infra";
    let Some(lab) = fpga_lab(test) else { return };
    let bare = hilrig_rig::sim::find_vmm(None).unwrap();
    if hilrig_rig::sim::vmm_prefix(&bare).is_empty() {
        let s = key_read_on_board(&lab, bare);
        let case = &s.run.cases[0];
        assert_eq!(case.outcome, Outcome::Skipped, "{case:?}");
        assert!(
            case.message.contains("CONFIG") && case.message.contains("relay-oob"),
            "{}",
            case.message
        );
    }
    let pid = std::fs::read_to_string(lab.dir().join("h1").join("fpga.pid")).unwrap();
    let st = std::process::Command::new("kill")
        .args(["-STOP", pid.trim()])
        .status()
        .unwrap();
    assert!(st.success());
    let s = key_read_on_board(&lab, hilrig_build());
    all_infra(&s, &["the board's OOB port"]);
}

/// Adversarial: the board stops answering while the VMM runs on the host (its
/// serve-sim stopped once the step's OOB relay is up): whatever the VMM makes of
/// a dead device, the runner finds the board gone after the step: INFRA naming
/// the board's transport, never FAIL.
#[test]
fn an_ssh_hosts_board_dying_mid_step_is_infra_not_fail() {
    let test = "an_ssh_hosts_board_dying_mid_step_is_infra_not_fail";
    let Some(lab) = fpga_lab(test) else { return };
    let inv = hilrig_rig::Inventory::load(&lab.inventory).unwrap();
    let user = inv.host("sim-ssh-1").unwrap().ssh.clone().unwrap().user;
    let pid = std::fs::read_to_string(lab.dir().join("h1").join("fpga.pid")).unwrap();
    let pid = pid.trim().to_string();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let watcher = std::thread::spawn(move || {
        while !d.load(std::sync::atomic::Ordering::SeqCst) {
            let relay_up = std::process::Command::new("pgrep")
                .args(["-u", &user, "-f", "fpga relay-oob"])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if relay_up {
                let st = std::process::Command::new("kill")
                    .args(["-STOP", &pid])
                    .status()
                    .unwrap();
                return st.success();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    });
    let s = key_read_on_board(&lab, hilrig_build());
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(watcher.join().unwrap(), "the step's relay never came up");
    all_infra(&s, &["transport", "OOB"]);
}

/// The console of a case on an SSH host is complete: a last line written on
/// the host's console line right before its VMM exits (after the guest's own
/// output, with no newline) is in the controller's capture, and the capture's
/// end marker is not. The stand-in build on the host is `hilrig` itself with
/// that one line added after `vm run`.
#[test]
fn console_keeps_the_last_line_before_the_vmm_exits() {
    use std::os::unix::fs::PermissionsExt;
    let test = "console_keeps_the_last_line_before_the_vmm_exits";
    if !kvm_and_vmm(test) {
        return;
    }
    let Some(lab) = lab(test, 1) else { return };
    let Ok(build) = std::fs::read_to_string(lab.dir().join("device-build")) else {
        eprintln!("SKIPPED: {test}: the lab has no per-host devices (no hilrig build)");
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let bin = t.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let vmm = bin.join("hilrig");
    let last = "stand-in: the last words before the VMM exits";
    std::fs::write(
        &vmm,
        format!(
            "#!/bin/sh\nH='{}'\ncase \"$1\" in vm) ;; *) exec \"$H\" \"$@\";; esac\n\
             tty=; prev=\nfor a in \"$@\"; do [ \"$prev\" = --console ] && tty=$a; prev=$a; done\n\
             \"$H\" \"$@\"; c=$?\nprintf '\\n{last}' >> \"$tty\"\nexit $c\n",
            build.trim()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
    let c = t.path().join("c.toml");
    std::fs::write(
        &c,
        "name = \"t\"\n[defaults]\nretries = 0\ninfra_retries = 0\n[[case]]\nattacks = [\"pci-enum\"]\n\
         backends = [\"model\"]\nprofiles = [\"tenant\"]\ntags = [\"ssh\"]\n",
    )
    .unwrap();
    let mut o = opts(t.path(), c, &lab.inventory);
    o.vmm = Some(vmm);
    let s = run_campaign(o).expect("run");
    let case = &s.run.cases[0];
    assert_eq!(
        (case.outcome, case.host.as_str()),
        (Outcome::Pass, "sim-ssh-1"),
        "{}",
        case.message
    );
    let text = common::captured_console(&s, t.path(), "pci-enum");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 1, "the guest's own output is missing: {text}");
    assert!(
        lines
            .last()
            .is_some_and(|l| l.ends_with(&format!("] {last}"))),
        "the last line is not the capture's last: {text}"
    );
}

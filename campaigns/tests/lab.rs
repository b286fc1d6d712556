//! Campaigns on simulated hosts that are real hosts on loopback (`scripts/sim-lab`:
//! sshds on 127.0.0.11.., their own users; needs root and openssh-server, and
//! /dev/kvm with a built VMM for the real runs; otherwise SKIPPED loudly).

use hilrig_campaigns::runner::{run_campaign, RunOptions};
use hilrig_reports::Outcome;
use hilrig_rig::simlab::{LabError, SimLab};
use std::path::{Path, PathBuf};

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
    for c in &remote {
        let kinds: Vec<String> = c.artifacts.iter().map(|a| a.path.clone()).collect();
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

/// A host that fails its health check before the run (powered off: SSH
/// unreachable) is taken offline with the reason and never given work; it stays
/// offline in the results database for later runs (even once reachable again)
/// until an operator brings it back.
#[test]
fn unreachable_host_goes_offline() {
    let test = "unreachable_host_goes_offline";
    let Some(lab) = lab(test, 1) else { return };
    let off = std::process::Command::new(hilrig_rig::simlab::script())
        .arg("power")
        .arg(lab.dir())
        .args(["1", "off"])
        .status()
        .unwrap();
    assert!(off.success());
    let t = tempfile::tempdir().unwrap();
    let c = t.path().join("c.toml");
    std::fs::write(
        &c,
        "name = \"t\"\n[defaults]\ncase_timeout = \"5s\"\n[[case]]\nattacks = [\"attack-hang\"]\ntags = [\"ssh\"]\n",
    )
    .unwrap();
    // A stand-in VMM: the case must not get as far as running one.
    let mut o = opts(t.path(), c.clone(), &lab.inventory);
    o.vmm = Some(PathBuf::from("/bin/true"));
    let s = run_campaign(o).expect("run");
    assert_eq!(s.offline_hosts.len(), 1, "{:?}", s.offline_hosts);
    assert_eq!(s.offline_hosts[0].0, "sim-ssh-1");
    let case = &s.run.cases[0];
    assert_eq!(case.outcome, Outcome::Skipped, "{case:?}");
    assert!(case.attempts.is_empty(), "{case:?}");
    assert!(
        case.message.contains("offline") && case.message.contains("sim-ssh-1"),
        "{}",
        case.message
    );
    assert_eq!(s.exit_status(), 3);

    // Powered on again, it is still offline: recorded, until an operator says so.
    let on = std::process::Command::new(hilrig_rig::simlab::script())
        .arg("power")
        .arg(lab.dir())
        .args(["1", "on"])
        .status()
        .unwrap();
    assert!(on.success());
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

//! The SSH transport against real sshds on loopback (`scripts/sim-lab`; needs root
//! and openssh-server, else SKIPPED): files moved byte for byte whatever their
//! names, the build ensured by hash (copied when missing or different, not when
//! equal), a host key that is not the pinned one refused, power through the
//! host's power driver (off: SSH unreachable; on: reachable again), each host's
//! own device through the rig's OOB and console drivers.

use hilrig_rig::remote::{file_sha256, HostSource, Remote, RemoteError, Ssh};
use hilrig_rig::simlab::{LabError, SimLab};
use hilrig_rig::{Inventory, PowerState, Rig};
use std::os::unix::fs::PermissionsExt;

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

fn ssh_of(inv: &Inventory, host: &str) -> Ssh {
    let h = inv.host(host).expect("host");
    match Remote::of(h).expect("transport") {
        Remote::Ssh(s) => *s,
        Remote::Local => panic!("{host} is local"),
    }
}

#[test]
fn files_and_build_over_ssh() {
    let Some(lab) = lab("files_and_build_over_ssh", 1) else {
        return;
    };
    let inv = Inventory::load(&lab.inventory).expect("generated inventory");
    let hosts = inv.hosts().expect("hosts");
    assert!(hosts.iter().any(|h| h.ssh.is_some()));
    assert!(hosts.iter().any(|h| h.name == "local-1" && h.ssh.is_none()));
    let ssh = ssh_of(&inv, "sim-ssh-1");
    let wd = ssh.spec().workdir.clone();

    // Hostile names and bytes go through unchanged (quoting), atomically put.
    let data: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    for name in ["plain.bin", "it's $(id) `x` a b;c", "-n"] {
        let p = format!("{wd}/t/{name}");
        ssh.put(&p, &data, 0o600).expect("put");
        assert_eq!(
            ssh.get(&p).expect("get").as_deref(),
            Some(&data[..]),
            "{name}"
        );
    }
    assert_eq!(ssh.get(&format!("{wd}/none")).expect("get"), None);

    // The build: copied when missing, not when equal, again when different.
    let t = tempfile::tempdir().unwrap();
    let local = t.path().join("hilrig");
    std::fs::write(&local, "#!/bin/sh\necho hilrig 9.9.9-test\n").unwrap();
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o755)).unwrap();
    let want = file_sha256(&local).unwrap();
    let path = ssh.ensure_hilrig(&local).expect("copied");
    assert_eq!(ssh.sha256(&path).unwrap().as_deref(), Some(want.as_str()));
    assert_eq!(ssh.alive().expect("--version answers"), "hilrig 9.9.9-test");
    // A stale copy on the host (another build): a new connection replaces it.
    ssh.put(&path, b"#!/bin/sh\necho stale\n", 0o755).unwrap();
    let ssh2 = ssh_of(&inv, "sim-ssh-1");
    ssh2.ensure_hilrig(&local).expect("replaced");
    assert_eq!(ssh2.sha256(&path).unwrap().as_deref(), Some(want.as_str()));
    assert_eq!(ssh2.alive().unwrap(), "hilrig 9.9.9-test");
}

#[test]
fn unpinned_host_key_is_refused() {
    let Some(lab) = lab("unpinned_host_key_is_refused", 2) else {
        return;
    };
    // Pin host 2's key for host 1's address: host 1 is not who it should be.
    let kh = lab.dir().join("known_hosts");
    let text = std::fs::read_to_string(&kh).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let key2 = lines[1].split_once(' ').unwrap().1;
    let addr1 = lines[0].split_once(' ').unwrap().0;
    std::fs::write(&kh, format!("{addr1} {key2}\n")).unwrap();
    let inv = Inventory::load(&lab.inventory).unwrap();
    let ssh = ssh_of(&inv, "sim-ssh-1");
    match ssh.sh("true", None) {
        Err(RemoteError::Ssh { detail, .. }) => {
            assert!(detail.contains("Host key verification failed"), "{detail}")
        }
        other => panic!("a host with an unpinned key was used: {other:?}"),
    }
    // Host 2 (not in known_hosts at all now) is refused too: no trust on first use.
    let ssh = ssh_of(&inv, "sim-ssh-2");
    assert!(matches!(ssh.sh("true", None), Err(RemoteError::Ssh { .. })));
}

#[test]
fn power_through_the_hosts_driver() {
    let Some(lab) = lab("power_through_the_hosts_driver", 1) else {
        return;
    };
    let rig = Rig::load(&lab.inventory).unwrap();
    let mut p = rig.power("sim-ssh-1").unwrap();
    assert_eq!(p.status().unwrap(), PowerState::On);
    p.off().expect("off, read back");
    assert_eq!(p.status().unwrap(), PowerState::Off);
    let inv = Inventory::load(&lab.inventory).unwrap();
    assert!(ssh_of(&inv, "sim-ssh-1").sh("true", None).is_err());
    p.on().expect("on, read back");
    ssh_of(&inv, "sim-ssh-1")
        .sh("true", None)
        .expect("reachable after power on");
}

#[test]
fn shipped_sim_ssh_inventory_parses() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("inventory/sim-ssh.toml");
    let inv = Inventory::load(&p).expect("rig/inventory/sim-ssh.toml");
    let ssh: Vec<_> = inv.hosts.iter().filter(|h| h.ssh.is_some()).collect();
    assert_eq!(ssh.len(), 2);
    assert_eq!(ssh[0].ssh.as_ref().unwrap().address, "127.0.0.11");
    // Each SSH host's own device: state on the host, OOB and console as serial
    // lines on the controller, the VMM's end of the console on the host.
    for h in &ssh {
        assert!(h.sim.state.is_some(), "{}", h.name);
        assert!(
            matches!(h.oob, Some(hilrig_rig::inventory::OobSpec::Serial { .. })),
            "{}",
            h.name
        );
        assert!(h.ssh.as_ref().unwrap().console.is_some(), "{}", h.name);
        assert!(h.consoles.iter().any(|c| matches!(
            c.driver,
            hilrig_rig::inventory::ConsoleDriver::Serial { .. }
        )));
    }
    // A hostile [host.ssh] is refused with the host and section named.
    let bad = "[[host]]\nname = \"h\"\n[host.power]\ndriver = \"sim\"\n[host.ssh]\naddress = \"-oProxyCommand=sh\"\nuser = \"u\"\nidentity = \"k\"\nknown_hosts = \"kh\"\nworkdir = \"/w\"\n";
    let e = Inventory::parse(bad, std::path::Path::new("lab.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("host `h`") && e.contains("ssh") && e.contains("must not start with `-`"),
        "{e}"
    );
}

/// The step agent over SSH, against fake agents on a real sshd: a reply cut
/// short, an oversized frame, garbage and a silent exit are transport errors
/// (never a step output, so never a device verdict); a build without the agent
/// is `Unsupported` (the runner falls back to the step script); an `error`
/// frame is the host's own message and the session stays usable.
#[test]
fn step_agent_frames_from_the_host_are_checked() {
    use hilrig_rig::remote::{StepError, StepRequest, AGENT_HELLO};
    let Some(lab) = lab("step_agent_frames_from_the_host_are_checked", 1) else {
        return;
    };
    let inv = Inventory::load(&lab.inventory).unwrap();
    let ssh = ssh_of(&inv, "sim-ssh-1");
    let wd = ssh.spec().workdir.clone();
    // Each fake reads the request up to its `run 0` line, then answers.
    // (A body is not newline-terminated: `run 0` ends the last line.)
    let read_req = "while IFS= read -r l; do case \"$l\" in *'run 0') break;; esac; done";
    let fake = |name: &str, body: &str| -> String {
        let p = format!("{wd}/fake/{name}");
        let script = format!("#!/bin/sh\necho '{AGENT_HELLO}'\n{read_req}\n{body}\n");
        ssh.put(&p, script.as_bytes(), 0o755)
            .expect("put fake agent");
        p
    };
    let req = StepRequest {
        dir: format!("{wd}/att/s-0"),
        argv: vec!["true".into()],
        puts: vec![],
        fetch: vec![format!("{wd}/att/s-0/state.bin")],
        ..StepRequest::default()
    };
    let t = std::time::Duration::from_secs(20);
    for (name, body, want) in [
        ("cut", "printf 'exit 0\\nout 10\\n{\"a\"'", "cut short"),
        (
            "huge",
            "printf 'exit 0\\nout 99999999999\\n'; sleep 2",
            "too large",
        ),
        ("garbage", "printf 'PASS\\n'; sleep 2", "header"),
        ("silent", "exit 0", "exit"),
        ("nofile", "printf 'exit 0\\nout 2\\n{}err 0\\n'", "f0"),
    ] {
        let p = fake(name, body);
        match ssh.step(&p, &req, t) {
            Err(StepError::Transport { why, .. }) => {
                assert!(why.contains(want), "{name}: {why}")
            }
            other => panic!("{name}: a broken reply was taken: {other:?}"),
        }
    }
    // An error frame: the host's message; the next request is served.
    let p = fake(
        "err",
        &format!("printf 'error 4\\nnope'\n{read_req}\nprintf 'exit 7\\nout 0\\nerr 0\\nf0 -1\\n'; sleep 2"),
    );
    match ssh.step(&p, &req, t) {
        Err(StepError::Remote { why, .. }) => assert_eq!(why, "nope"),
        other => panic!("error frame: {other:?}"),
    }
    let s = ssh.step(&p, &req, t).expect("the session stays usable");
    assert_eq!((s.code, s.files.clone()), (7, vec![None]));
    // No agent in the build (usage on stderr, exit 2): unsupported, remembered.
    let none = format!("{wd}/fake/none");
    ssh.put(
        &none,
        b"#!/bin/sh\necho 'usage: no such command' >&2\nexit 2\n",
        0o755,
    )
    .unwrap();
    let ssh2 = ssh_of(&inv, "sim-ssh-1");
    for _ in 0..2 {
        match ssh2.step(&none, &req, t) {
            Err(StepError::Unsupported { why, .. }) => assert!(why.contains("usage"), "{why}"),
            other => panic!("no agent: {other:?}"),
        }
    }
}

/// The sim lab's power is a real pdudaemon (`localcmdline`) when pdudaemon is
/// installed (else SKIPPED: the lab falls back to the command driver).
#[test]
fn sim_lab_power_is_pdudaemon() {
    let test = "sim_lab_power_is_pdudaemon";
    let have = std::process::Command::new("pdudaemon")
        .arg("--help")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        eprintln!("SKIPPED: {test}: pdudaemon not installed (pip install pdudaemon==1.1.1)");
        return;
    }
    let Some(lab) = lab(test, 1) else { return };
    let inv = Inventory::load(&lab.inventory).unwrap();
    assert_eq!(
        inv.host("sim-ssh-1").unwrap().power.driver_name(),
        "pdudaemon"
    );
}

/// A wedged host (sshd and the user's processes stopped) is brought back by the
/// recovery ladder: soft and hard do not help, the power cycle through its power
/// driver does; a host that does not power on again is an error naming the steps.
#[test]
fn wedged_host_recovered_through_the_power_driver() {
    use hilrig_rig::recover::{recover_host, RecoverError, RecoverOptions, Recovered};
    let test = "wedged_host_recovered_through_the_power_driver";
    let Some(lab) = lab(test, 1) else { return };
    let rig = Rig::load(&lab.inventory).unwrap();
    let inv = Inventory::load(&lab.inventory).unwrap();
    let ssh = ssh_of(&inv, "sim-ssh-1");
    let fault = |what: &str| {
        let st = std::process::Command::new(hilrig_rig::simlab::script())
            .arg("fault")
            .arg(lab.dir())
            .args(["1", what])
            .status()
            .unwrap();
        assert!(st.success());
    };
    let opts = RecoverOptions {
        ssh_timeout: std::time::Duration::from_secs(5),
        wait: std::time::Duration::from_secs(20),
    };
    // `true --version` stands in for the build's version check.
    ssh.sh("true", None).expect("reachable");
    fault("hang");
    assert!(ssh.alive_within("true", opts.ssh_timeout).is_err());
    let step = recover_host(&ssh, "true", Some(rig.power("sim-ssh-1").unwrap()), opts)
        .expect("back after a power cycle");
    assert_eq!(step, Recovered::PowerCycle);
    ssh.sh("true", None).expect("reachable after the recovery");
    // A host that answers is recovered by the soft step alone.
    let step = recover_host(&ssh, "true", Some(rig.power("sim-ssh-1").unwrap()), opts).unwrap();
    assert_eq!(step, Recovered::Soft);
    // Never powers on again: an error naming every step; without a power driver
    // the ladder stops after the hard step.
    fault("dead");
    let e = recover_host(&ssh, "true", None, opts).unwrap_err();
    let RecoverError::NotBack { tried, .. } = &e;
    assert!(tried.contains("no power driver"), "{e}");
    let e = recover_host(&ssh, "true", Some(rig.power("sim-ssh-1").unwrap()), opts).unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("sim-ssh-1")
            && m.contains("soft")
            && m.contains("hard")
            && m.contains("power cycle"),
        "{m}"
    );
}

/// Each sim-lab host's own device through the rig's drivers: its OOB port (a
/// PTY served by `hilrig device serve-oob` as the host's user on the state file
/// in its work directory) answers IDENTIFY with the host's serial and the
/// counters of that file, also while the host is powered off (a BMC's port);
/// what the host writes on its console tty is captured on the controller by the
/// serial console driver, and what the line held before the capture is not.
#[test]
fn hosts_own_device_through_oob_and_console_drivers() {
    let test = "hosts_own_device_through_oob_and_console_drivers";
    let Some(lab) = lab(test, 1) else { return };
    let inv = Inventory::load(&lab.inventory).unwrap();
    let h = inv.host("sim-ssh-1").unwrap();
    if h.oob.is_none() {
        eprintln!("SKIPPED: {test}: the lab has no per-host devices (no hilrig build)");
        return;
    }
    let rig = Rig::load(&lab.inventory).unwrap();
    let (_, _, serial, width) = rig.identify("sim-ssh-1").expect("identify over OOB");
    assert_eq!((serial, width), (2001, 16));
    assert_eq!(rig.read_counters("sim-ssh-1").unwrap().counters, [0, 0, 0]);
    let tty = h.ssh.as_ref().unwrap().console.clone().unwrap();
    let ssh = ssh_of(&inv, "sim-ssh-1");
    // Before the capture: held by the line, not captured.
    ssh.sh(&format!("echo stale-line > {tty}"), None).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("com1.log");
    let src = rig.console_source("sim-ssh-1", "com1").unwrap();
    let cap = hilrig_rig::console::Capture::start("sim-ssh-1", "com1", src, &out).unwrap();
    ssh.sh(
        &format!("printf 'boot banner\\nsecond line\\n' > {tty}"),
        None,
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sum = cap.stop().unwrap();
    let text = std::fs::read_to_string(&sum.path).unwrap();
    assert!(
        text.contains("] boot banner") && text.contains("] second line"),
        "{text}"
    );
    assert!(!text.contains("stale-line"), "{text}");
    // Powered off: SSH gone, the OOB port still answers.
    let mut p = rig.power("sim-ssh-1").unwrap();
    p.off().expect("off");
    assert_eq!(rig.identify("sim-ssh-1").unwrap().2, 2001);
    p.on().expect("on");
}

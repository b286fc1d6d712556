//! `campaign run --labgrid`: hosts are places reserved by tags from a real labgrid
//! coordinator (PyPI `labgrid`, installed by scripts/test) on loopback; the run
//! uses the free place, releases it at the end, and never touches a place
//! acquired by someone else. Says SKIPPED loudly without labgrid.

use hilrig_campaigns::hostsource::LabgridOptions;
use hilrig_campaigns::runner::{run_campaign, RunOptions};
use hilrig_reports::Outcome;
use hilrig_rig::labgrid::{holder, Coordinator};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The stand-in VMM reads the run's binding from its flags (VM id, teardown nonce,
/// the device serial from the state file) and echoes it in its teardown record, as
/// the real VMM does: the runner refuses a record of another run.
const BIND: &str = r#"VMID=; NONCE=; STATE=; prev=
for a in "$@"; do case "$prev" in --vm-id) VMID=$a;; --teardown-nonce) NONCE=$a;; --device-state) STATE=$a;; esac; prev=$a; done
SERIAL=$(od -An -tu8 -j23 -N8 "$STATE" 2>/dev/null | tr -d ' '); SERIAL=${SERIAL:-0}
"#;

const PASS_JSON: &str = r#"{"payload":"attack-hang","device":"model","verdict":"PASS","passed":true,"exit_status":0,"policy":{"alarms":1,"per_register":{"HANG_TRIGGER":1}},"teardown":{"vm":"'"$VMID"'","serial":'"$SERIAL"',"nonce":"'"$NONCE"'","started_unix":0,"steps":[],"complete":true,"total_micros":10,"guest_bytes_scrubbed":0,"device_bytes_scrubbed":0,"counters":null,"verdict":{"verdict":"trusted","handoff_ok":true,"reasons":[]},"signer":"","signature":""}}"#;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A labgrid coordinator on a free loopback port, working in `dir` (it keeps
/// places.yaml there), once it accepts a session: (the process, its address).
fn coordinator(dir: &std::path::Path) -> (Kill, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let coord = Kill(
        Command::new("labgrid-coordinator")
            .args(["-l", &addr])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while let Err(e) = Coordinator::connect(&addr, "testhost/probe", Duration::from_secs(5)) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no coordinator: {e}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (coord, addr)
}

/// `labgrid-client -x addr ARGS` as `testhost/<user>`; must succeed.
fn client(addr: &str, args: &[&str], user: &str) {
    let out = Command::new("labgrid-client")
        .args(["-x", addr])
        .args(args)
        .env("LG_USERNAME", user)
        .env("LG_HOSTNAME", "testhost")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "labgrid-client {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A campaign of `attacks` (TOML array items) on `sim` hosts, run with `vmm` on
/// one place tagged `hilrig=sim` reserved from the coordinator at `addr`
/// (`--labgrid-wait wait`), its files in `dir`.
fn sim_run(
    dir: &std::path::Path,
    attacks: &str,
    vmm: std::path::PathBuf,
    addr: &str,
    wait: Duration,
) -> RunOptions {
    let file = dir.join("c.toml");
    std::fs::write(
        &file,
        format!("name = \"lg\"\n[defaults]\ntags = [\"sim\"]\n[[case]]\nattacks = [{attacks}]\n"),
    )
    .unwrap();
    let mut o = RunOptions::new(&file);
    o.out_dir = dir.join("out");
    o.vmm = Some(vmm);
    o.progress = Some(false);
    o.labgrid = Some(LabgridOptions {
        address: addr.to_string(),
        user: Some("testhost/hilrig".into()),
        tags: [("hilrig".to_string(), "sim".to_string())].into(),
        places: 1,
        wait,
        config: None,
    });
    o
}

#[test]
fn campaign_on_places_reserved_from_labgrid() {
    for t in ["labgrid-coordinator", "labgrid-client"] {
        if !have(t) {
            eprintln!(
                "SKIPPED campaign_on_places_reserved_from_labgrid: {t} not found (pip install labgrid; scripts/test does)"
            );
            return;
        }
    }
    let t = tempfile::tempdir().unwrap();
    let (_coord, addr) = coordinator(t.path());
    let client = |args: &[&str], user: &str| client(&addr, args, user);
    // Both places carry the tag; alice holds rack-b.
    for place in ["rack-a", "rack-b"] {
        client(&["-p", place, "create"], "admin");
        client(&["-p", place, "set-tags", "hilrig=sim"], "admin");
    }
    client(&["-p", "rack-b", "acquire"], "alice");

    let vmm = t.path().join("fake-vmm");
    std::fs::write(&vmm, format!("#!/bin/sh\n{BIND}echo '{PASS_JSON}'\n")).unwrap();
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = sim_run(
        t.path(),
        "\"attack-hang\", \"attack-key-read\"",
        vmm,
        &addr,
        Duration::from_secs(60),
    );
    let s = run_campaign(o).unwrap();
    assert_eq!(s.run.cases.len(), 2);
    for c in &s.run.cases {
        assert_ne!(c.outcome, Outcome::Infra, "{}: {}", c.id, c.message);
        assert_eq!(c.host, "rack-a", "{c:?}");
    }
    let mut c = Coordinator::connect(&addr, "testhost/check", Duration::from_secs(5)).unwrap();
    assert_eq!(
        holder(&c.place("rack-a").unwrap()),
        None,
        "released after the run"
    );
    assert_eq!(
        holder(&c.place("rack-b").unwrap()),
        Some("testhost/alice"),
        "the foreign place was touched"
    );
}

/// A place whose exporter publishes a loopback sshd of the simulated SSH lab
/// (`scripts/sim-lab`: its own user, key and pinned host key), its power port
/// (driven by the lab's power commands) and a serial port: the campaign's cases
/// run over SSH on the place's `NetworkService`, the place is released after,
/// and a place acquired by someone else stays untouched. Needs root, sshd,
/// /dev/kvm and a built VMM, and labgrid; else SKIPPED loudly.
#[test]
fn campaign_runs_over_ssh_on_a_labgrid_place() {
    let test = "campaign_runs_over_ssh_on_a_labgrid_place";
    for t in ["labgrid-coordinator", "labgrid-client", "labgrid-exporter"] {
        if !have(t) {
            eprintln!("SKIPPED {test}: {t} not found (pip install labgrid; scripts/test does)");
            return;
        }
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("SKIPPED {test}: /dev/kvm not available");
        return;
    }
    if let Err(e) = hilrig_rig::sim::find_vmm(None) {
        eprintln!("SKIPPED {test}: {e}");
        return;
    }
    let lab = match hilrig_rig::simlab::SimLab::start(1) {
        Ok(l) => l,
        Err(hilrig_rig::simlab::LabError::Skipped(why)) => {
            eprintln!("SKIPPED {test}: {why}");
            return;
        }
        Err(e) => panic!("{test}: {e}"),
    };
    let inv = hilrig_rig::Inventory::load(&lab.inventory).unwrap();
    let h = inv
        .hosts
        .iter()
        .find(|h| h.ssh.is_some())
        .expect("an SSH host in the sim lab");
    let ssh = h.ssh.clone().unwrap();
    // The place's power: the sim lab's own power script for that host (whatever
    // driver the lab's inventory uses for it: pdudaemon or the command driver).
    let host_no = h.name.rsplit('-').next().unwrap_or("1").to_string();
    let cmd = |what: &str| {
        format!(
            "{} power {} {host_no} {what}",
            hilrig_rig::simlab::script().display(),
            lab.dir().display()
        )
    };
    let (on, off, status) = (cmd("on"), cmd("off"), cmd("status"));
    let t = tempfile::tempdir().unwrap();
    let (_coord, addr) = coordinator(t.path());
    // The place's resources: the sim host's sshd, a power port, a serial port.
    let yaml = format!(
        "{name}:\n  NetworkService:\n    address: {a}\n    username: {u}\n    port: {p}\n  NetworkPowerPort:\n    model: gude\n    host: 127.0.0.1\n    index: \"1\"\n  NetworkSerialPort:\n    host: 127.0.0.1\n    port: 1\n",
        name = "rack-ssh",
        a = ssh.address,
        u = ssh.user,
        p = ssh.port
    );
    std::fs::write(t.path().join("exporter.yaml"), yaml).unwrap();
    let _exporter = Kill(
        Command::new("labgrid-exporter")
            .args(["-c", &addr, "-n", "exp1", "exporter.yaml"])
            .current_dir(t.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    loop {
        let mut c = Coordinator::connect(&addr, "testhost/probe", Duration::from_secs(5)).unwrap();
        c.sync().unwrap();
        if c.resource_count() >= 3 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the exporter never published"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let client = |args: &[&str], user: &str| client(&addr, args, user);
    client(&["-p", "rack-ssh", "create"], "admin");
    client(&["-p", "rack-ssh", "add-match", "exp1/rack-ssh/*"], "admin");
    client(&["-p", "rack-ssh", "set-tags", "hilrig=sim"], "admin");
    client(&["-p", "rack-busy", "create"], "admin");
    client(&["-p", "rack-busy", "set-tags", "hilrig=sim"], "admin");
    client(&["-p", "rack-busy", "acquire"], "alice");
    // The lab's labgrid config: the runner's key and the pinned host key, the
    // sim lab's power commands.
    let cfg = t.path().join("labgrid.toml");
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    std::fs::write(
        &cfg,
        format!(
            "[ssh]\nidentity = {}\nknown_hosts = {}\nworkdir = {}\n[power]\non = {}\noff = {}\nstatus = {}\n",
            q(&ssh.identity.display().to_string()),
            q(&ssh.known_hosts.display().to_string()),
            q(&ssh.workdir),
            q(&on),
            q(&off),
            q(&status)
        ),
    )
    .unwrap();
    let file = t.path().join("c.toml");
    std::fs::write(
        &file,
        "name = \"lg-ssh\"\n[defaults]\ntags = [\"sim\"]\n[[case]]\nattacks = [\"attack-key-read\", \"attack-hang\"]\n",
    )
    .unwrap();
    let mut o = RunOptions::new(&file);
    o.out_dir = t.path().join("out");
    o.progress = Some(false);
    o.labgrid = Some(LabgridOptions {
        address: addr.clone(),
        user: Some("testhost/hilrig".into()),
        tags: [("hilrig".to_string(), "sim".to_string())].into(),
        places: 1,
        wait: Duration::from_secs(60),
        config: Some(cfg),
    });
    let s = run_campaign(o).unwrap();
    assert_eq!(s.run.cases.len(), 2);
    for c in &s.run.cases {
        assert_eq!(c.outcome, Outcome::Pass, "{}: {}", c.id, c.message);
        assert_eq!(c.host, "rack-ssh", "{c:?}");
        assert!(
            c.artifacts.iter().any(|a| a.path.ends_with("vmm.json")),
            "{}: no artifacts brought back over SSH",
            c.id
        );
    }
    let mut c = Coordinator::connect(&addr, "testhost/check", Duration::from_secs(5)).unwrap();
    assert_eq!(
        holder(&c.place("rack-ssh").unwrap()),
        None,
        "released after the run"
    );
    assert_eq!(
        holder(&c.place("rack-busy").unwrap()),
        Some("testhost/alice")
    );
    drop(lab);
}

/// A reserved place whose exporter never publishes: the run does not start on
/// it (without the wait it ran the cases on a place with none of its resources)
/// but fails within `--labgrid-wait` with a CONFIG error naming the place and
/// the match nothing satisfies; the place is released, the reservation
/// cancelled.
#[test]
fn campaign_fails_naming_a_place_its_exporter_never_published() {
    let test = "campaign_fails_naming_a_place_its_exporter_never_published";
    for t in ["labgrid-coordinator", "labgrid-client"] {
        if !have(t) {
            eprintln!("SKIPPED {test}: {t} not found (pip install labgrid; scripts/test does)");
            return;
        }
    }
    let t = tempfile::tempdir().unwrap();
    let (_coord, addr) = coordinator(t.path());
    client(&addr, &["-p", "rack-x", "create"], "admin");
    client(
        &addr,
        &["-p", "rack-x", "add-match", "exp1/rack-x/*"],
        "admin",
    );
    client(&addr, &["-p", "rack-x", "set-tags", "hilrig=sim"], "admin");
    let o = sim_run(
        t.path(),
        "\"attack-hang\"",
        t.path().join("no-vmm-needed"),
        &addr,
        Duration::from_secs(1),
    );
    let e = match run_campaign(o) {
        Err(e) => e,
        Ok(s) => panic!(
            "ran on a place nothing was published for: {:?}",
            s.run.cases
        ),
    };
    let s = e.to_string();
    assert!(
        s.contains("place `rack-x`") && s.contains("exp1/rack-x/*: not published"),
        "{s}"
    );
    match &e {
        hilrig_campaigns::error::RunError::Labgrid { source, .. } => {
            assert_eq!(source.kind(), hilrig_rig::ErrorKind::Config, "{source}")
        }
        other => panic!("not a labgrid error: {other}"),
    }
    let mut c = Coordinator::connect(&addr, "testhost/check", Duration::from_secs(5)).unwrap();
    assert_eq!(holder(&c.place("rack-x").unwrap()), None, "not released");
}

/// True (and SKIPPED said) when labgrid's coordinator or client is missing.
fn lacks_labgrid(test: &str) -> bool {
    let missing = ["labgrid-coordinator", "labgrid-client"]
        .into_iter()
        .find(|t| !have(t));
    if let Some(t) = missing {
        eprintln!("SKIPPED {test}: {t} not found (pip install labgrid; scripts/test does)");
    }
    missing.is_some()
}

/// A stand-in VMM in `dir` whose every step passes (bound to its run).
fn passing_vmm(dir: &std::path::Path) -> std::path::PathBuf {
    let vmm = dir.join("passing-vmm");
    std::fs::write(&vmm, format!("#!/bin/sh\n{BIND}echo '{PASS_JSON}'\n")).unwrap();
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
    vmm
}

/// `--labgrid` with `--inventory`: the run's hosts are the inventory's (here a
/// local simulated host) plus the reserved place; each case runs where its tag
/// sends it (the `labgrid` case on the place, the `bench` case on the
/// inventory's host), and the place is released after. Negative control: an
/// inventory host named like the place is a CONFIG error naming it, nothing
/// runs, the place is released.
#[test]
fn campaign_on_inventory_hosts_plus_labgrid_places() {
    if lacks_labgrid("campaign_on_inventory_hosts_plus_labgrid_places") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (_coord, addr) = coordinator(t.path());
    client(&addr, &["-p", "rack-a", "create"], "admin");
    client(&addr, &["-p", "rack-a", "set-tags", "hilrig=sim"], "admin");
    let inventory = |name: &str| {
        let f = t.path().join(format!("{name}.toml"));
        std::fs::write(
            &f,
            format!(
                "[lab]\nname = \"mixed\"\nworkdir = \"{}\"\n[[host]]\nname = \"{name}\"\ntags = [\"bench\"]\ndevice = \"model\"\n[host.sim]\ncounter_width = 16\nserial = 2100\n[host.power]\ndriver = \"sim\"\n[[host.console]]\nname = \"com1\"\ndriver = \"sim\"\n[host.oob]\ndriver = \"sim\"\n",
                t.path().join("work").display()
            ),
        )
        .unwrap();
        f
    };
    let vmm = passing_vmm(t.path());
    let file = t.path().join("mixed.toml");
    std::fs::write(
        &file,
        "name = \"mixed\"\n[[case]]\nattacks = [\"attack-hang\"]\ntags = [\"labgrid\"]\n[[case]]\nattacks = [\"attack-key-read\"]\ntags = [\"bench\"]\n",
    )
    .unwrap();
    let opts = |inv: std::path::PathBuf, out: &str| {
        let mut o = sim_run(t.path(), "", vmm.clone(), &addr, Duration::from_secs(60));
        o.campaign = file.clone();
        o.out_dir = t.path().join(out);
        o.inventory = Some(inv);
        o
    };
    let released = || {
        let mut c = Coordinator::connect(&addr, "testhost/check", Duration::from_secs(5)).unwrap();
        holder(&c.place("rack-a").unwrap()).is_none()
    };

    let s = run_campaign(opts(inventory("bench-1"), "out")).unwrap();
    let mut ran: Vec<(String, String)> = s
        .run
        .cases
        .iter()
        .map(|c| {
            assert_eq!(c.outcome, Outcome::Pass, "{}: {}", c.id, c.message);
            (c.id.clone(), c.host.clone())
        })
        .collect();
    ran.sort();
    assert_eq!(
        ran,
        [
            ("attack-hang/model/tenant@labgrid".into(), "rack-a".into()),
            (
                "attack-key-read/model/tenant@bench".into(),
                "bench-1".into()
            ),
        ]
    );
    assert!(released(), "rack-a not released after the run");

    // Negative control: the inventory has a host named like the place.
    let e = match run_campaign(opts(inventory("rack-a"), "out2")) {
        Err(e) => e,
        Ok(s) => panic!("ran with two hosts named rack-a: {:?}", s.run.cases),
    };
    assert!(
        matches!(
            &e,
            hilrig_campaigns::error::RunError::HostNameClash { name, .. } if name == "rack-a"
        ),
        "{e}"
    );
    assert!(e.to_string().contains("host `rack-a`"), "{e}");
    assert!(!t.path().join("out2").exists(), "the run started: {e}");
    assert!(released(), "rack-a not released after the clash");
}

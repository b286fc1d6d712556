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

mod common;

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

/// Whether `tools` are all installed; else SKIPPED said for `test`.
fn labgrid_tools(test: &str, tools: &[&str]) -> bool {
    match tools.iter().find(|t| !have(t)) {
        Some(t) => {
            eprintln!("SKIPPED {test}: {t} not found (pip install labgrid; scripts/test does)");
            false
        }
        None => true,
    }
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

/// labgrid's exporter `exp1` publishing `yaml` (written to `dir/exporter.yaml`)
/// to the coordinator at `addr`, once the coordinator has at least `n`
/// resources.
fn exporter(dir: &std::path::Path, addr: &str, yaml: &str, n: usize) -> Kill {
    std::fs::write(dir.join("exporter.yaml"), yaml).unwrap();
    let err = std::fs::File::create(dir.join("exporter.err")).unwrap();
    let k = Kill(
        Command::new("labgrid-exporter")
            .args(["-c", addr, "-n", "exp1", "exporter.yaml"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    loop {
        let mut c = Coordinator::connect(addr, "testhost/probe", Duration::from_secs(5)).unwrap();
        c.sync().unwrap();
        if c.resource_count() >= n {
            return k;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the exporter never published: {}",
            std::fs::read_to_string(dir.join("exporter.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
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

/// Campaign file `file` run on one place tagged `hilrig=sim` reserved from the
/// coordinator at `addr` (`--labgrid-wait wait`, `--labgrid-config config`),
/// its results in `out`.
fn lg_opts(
    file: &std::path::Path,
    out: std::path::PathBuf,
    addr: &str,
    wait: Duration,
    config: Option<std::path::PathBuf>,
) -> RunOptions {
    let mut o = RunOptions::new(file);
    o.out_dir = out;
    o.progress = Some(false);
    o.labgrid = Some(LabgridOptions {
        address: addr.to_string(),
        user: Some("testhost/hilrig".into()),
        tags: [("hilrig".to_string(), "sim".to_string())].into(),
        places: 1,
        wait,
        config,
    });
    o
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
    let mut o = lg_opts(&file, dir.join("out"), addr, wait, None);
    o.vmm = Some(vmm);
    o
}

#[test]
fn campaign_on_places_reserved_from_labgrid() {
    if !labgrid_tools(
        "campaign_on_places_reserved_from_labgrid",
        &["labgrid-coordinator", "labgrid-client"],
    ) {
        return;
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

/// A simulated SSH lab of one host (scripts/sim-lab), when labgrid, /dev/kvm,
/// a built VMM, root and sshd are all there; else `None`, SKIPPED said.
fn ssh_lab(test: &str) -> Option<hilrig_rig::simlab::SimLab> {
    if !labgrid_tools(
        test,
        &["labgrid-coordinator", "labgrid-client", "labgrid-exporter"],
    ) {
        return None;
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("SKIPPED {test}: /dev/kvm not available");
        return None;
    }
    if let Err(e) = hilrig_rig::sim::find_vmm(None) {
        eprintln!("SKIPPED {test}: {e}");
        return None;
    }
    match hilrig_rig::simlab::SimLab::start(1) {
        Ok(l) => Some(l),
        Err(hilrig_rig::simlab::LabError::Skipped(why)) => {
            eprintln!("SKIPPED {test}: {why}");
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
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
    let Some(lab) = ssh_lab(test) else { return };
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
    let _exporter = exporter(t.path(), &addr, &yaml, 3);
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
    let o = lg_opts(
        &file,
        t.path().join("out"),
        &addr,
        Duration::from_secs(60),
        Some(cfg),
    );
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
    if !labgrid_tools(test, &["labgrid-coordinator", "labgrid-client"]) {
        return;
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
    // Reported with its class, exiting as the run's setup errors do.
    assert!(s.contains(": CONFIG: "), "{s}");
    assert_eq!(e.exit_code(), hilrig_campaigns::error::exit::CONFIG);
    let mut c = Coordinator::connect(&addr, "testhost/check", Duration::from_secs(5)).unwrap();
    assert_eq!(holder(&c.place("rack-x").unwrap()), None, "not released");
}

/// ser2net (Debian's, as labgrid's exporter runs it) serving PTYs on loopback
/// (`(name, pty, port, raw)`: RFC 2217, or plain TCP when raw), each
/// connection traced to `dir/NAME.trace`: the process, once every port accepts.
fn ser2net(dir: &std::path::Path, ports: &[(&str, &str, u16, bool)]) -> Kill {
    let mut cfg = String::new();
    for (name, pty, port, raw) in ports {
        let accepter = if *raw {
            "tcp"
        } else {
            "telnet(rfc2217,mode=server),tcp"
        };
        cfg.push_str(&format!(
            "connection: &{name}\n  accepter: {accepter},127.0.0.1,{port}\n  \
             connector: serialdev(nouucplock=true),{pty},115200n81,local\n  options:\n    \
             kickolduser: true\n    trace-both: {}\n",
            dir.join(format!("{name}.trace")).display()
        ));
    }
    std::fs::write(dir.join("ser2net.yaml"), cfg).unwrap();
    let err = std::fs::File::create(dir.join("ser2net.err")).unwrap();
    let k = Kill(
        Command::new("ser2net")
            .args(["-n", "-u", "-c"])
            .arg(dir.join("ser2net.yaml"))
            .arg("-P")
            .arg(dir.join("ser2net.pid"))
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    for (_, _, port, _) in ports {
        while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "ser2net never listened on {port}: {}",
                std::fs::read_to_string(dir.join("ser2net.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    k
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    hilrig_rig::simlab::free_port_on("127.0.0.1").expect("a free port on 127.0.0.1")
}

const PROGRAM_CASE: &str = "[[case]]\nattacks = [\"attack-flash-program\"]\nbackends = [\"model\"]\n\
     profiles = [\"operator\"]\ntags = [\"sim\"]\n\
     expect = { counter_delta = { firmware = 1, master = 1 }, service_verdict = \"quarantined\" }\n";

/// The labgrid place `rack-dev` over the sim lab's host 1 and its own device:
/// labgrid's exporter publishes the host's sshd (`NetworkService`), its power
/// (`NetworkPowerPort`: the lab's pdudaemon outlet when it has one, else its
/// power commands) and its console and OOB lines as `NetworkSerialPort`s served
/// by ser2net over the host's PTYs (the OOB over RFC 2217, the console as raw
/// TCP: labgrid's `protocol: raw`); the labgrid config's `[device.rack-dev]`
/// says where the host keeps its device.
struct DevPlace {
    addr: String,
    cfg: std::path::PathBuf,
    /// The device's state file on the host.
    state: std::path::PathBuf,
    /// ser2net (`None` once stopped).
    serial: std::cell::RefCell<Option<Kill>>,
    _exporter: Kill,
    _coord: Kill,
    t: tempfile::TempDir,
    lab: hilrig_rig::simlab::SimLab,
}

impl DevPlace {
    /// The place, or `None` (SKIPPED said) without ser2net, labgrid, the sim
    /// lab or its per-host devices.
    fn start(test: &str) -> Option<DevPlace> {
        if !std::path::Path::new("/usr/sbin/ser2net").exists() && !have("ser2net") {
            eprintln!(
                "SKIPPED {test}: ser2net not installed (apt-get install ser2net; scripts/test does)"
            );
            return None;
        }
        let lab = ssh_lab(test)?;
        let inv = hilrig_rig::Inventory::load(&lab.inventory).unwrap();
        let h = inv.host("sim-ssh-1").unwrap();
        let Some(state) = h.sim.state.clone() else {
            eprintln!("SKIPPED {test}: the lab has no per-host devices (no hilrig build)");
            return None;
        };
        let ssh = h.ssh.clone().unwrap();
        let pty = |n: &str| {
            std::fs::canonicalize(lab.dir().join("h1").join(n))
                .unwrap()
                .display()
                .to_string()
        };
        let t = tempfile::tempdir().unwrap();
        let (p_oob, p_con) = (free_port(), free_port());
        let serial = ser2net(
            t.path(),
            &[
                ("oob", &pty("oob"), p_oob, false),
                ("console", &pty("console"), p_con, true),
            ],
        );
        let (coord, addr) = coordinator(t.path());
        // The place's power: the lab's pdudaemon outlet, read back with the lab's
        // status command; without pdudaemon its power commands.
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        let (power_yaml, power_cfg) = match &h.power {
            hilrig_rig::inventory::PowerSpec::Pdudaemon {
                url,
                pdu,
                port,
                status_command,
                ..
            } => (
                format!("model: pdudaemon\n    host: {url}/{pdu}\n    index: \"{port}\""),
                format!("status_command = {}\n", q(status_command)),
            ),
            _ => {
                let cmd = |what: &str| {
                    format!(
                        "{} power {} 1 {what}",
                        hilrig_rig::simlab::script().display(),
                        lab.dir().display()
                    )
                };
                (
                    "model: gude\n    host: 127.0.0.1\n    index: \"1\"".to_string(),
                    format!(
                        "on = {}\noff = {}\nstatus = {}\n",
                        q(&cmd("on")),
                        q(&cmd("off")),
                        q(&cmd("status"))
                    ),
                )
            }
        };
        let yaml = format!(
            "rack-dev:\n  NetworkService:\n    address: {a}\n    username: {u}\n    port: {p}\n  \
             NetworkPowerPort:\n    {power_yaml}\n  \
             console:\n    cls: NetworkSerialPort\n    host: 127.0.0.1\n    port: {p_con}\n    speed: 115200\n    protocol: raw\n  \
             oob:\n    cls: NetworkSerialPort\n    host: 127.0.0.1\n    port: {p_oob}\n    speed: 115200\n",
            a = ssh.address,
            u = ssh.user,
            p = ssh.port
        );
        let exporter = exporter(t.path(), &addr, &yaml, 4);
        client(&addr, &["-p", "rack-dev", "create"], "admin");
        client(
            &addr,
            &["-p", "rack-dev", "add-match", "exp1/rack-dev/*"],
            "admin",
        );
        client(
            &addr,
            &["-p", "rack-dev", "set-tags", "hilrig=sim"],
            "admin",
        );
        let cfg = t.path().join("labgrid.toml");
        std::fs::write(
            &cfg,
            format!(
                "[ssh]\nidentity = {}\nknown_hosts = {}\nworkdir = {}\n[power]\n{power_cfg}settle_ms = 5000\n\
                 [device.rack-dev]\nstate = {}\nserial = 2001\ncounter_width = 16\nconsole = \"console.tty\"\n",
                q(&ssh.identity.display().to_string()),
                q(&ssh.known_hosts.display().to_string()),
                q(&ssh.workdir),
                q(&state.display().to_string()),
            ),
        )
        .unwrap();
        Some(DevPlace {
            addr,
            cfg,
            state,
            serial: std::cell::RefCell::new(Some(serial)),
            _exporter: exporter,
            _coord: coord,
            t,
            lab,
        })
    }

    /// Run campaign `name` of `cases` (TOML `[[case]]`s; no retries) on the
    /// place, `tweak` applied to its options; results under `dir()/name`.
    fn run(
        &self,
        name: &str,
        cases: &str,
        tweak: impl FnOnce(&mut RunOptions),
    ) -> hilrig_campaigns::runner::RunSummary {
        let file = self.dir().join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "name = \"{name}\"\n[defaults]\ncase_timeout = \"60s\"\nstep_timeout = \"20s\"\n\
                 retries = 0\ninfra_retries = 0\n{cases}"
            ),
        )
        .unwrap();
        let mut o = lg_opts(
            &file,
            self.dir().join(name),
            &self.addr,
            Duration::from_secs(30),
            Some(self.cfg.clone()),
        );
        tweak(&mut o);
        run_campaign(o).unwrap()
    }

    fn dir(&self) -> &std::path::Path {
        self.t.path()
    }
}

/// Issue 17 end to end on a labgrid place ([`DevPlace`]). A counted flash
/// program passes with the expected deltas and a guest's console is captured:
/// - counters through the place's network OOB port: ser2net's trace of the
///   `oob` connection carries the traffic, and the controller's copy of the
///   device (the state the rig prepared) never moved — had the runner read it
///   instead of the port, the deltas would be zero and the case would FAIL;
/// - the console through the network console (timestamped capture lines, and
///   ser2net's trace of the `console` connection);
/// - forged and malformed OOB frames through the network port are refused.
///
/// Then ser2net is stopped (hung, then gone): the same case is INFRA naming the
/// OOB line, never a device verdict.
#[test]
fn places_network_oob_and_console_carry_the_campaign() {
    let Some(place) = DevPlace::start("places_network_oob_and_console_carry_the_campaign") else {
        return;
    };
    let t = place.dir().to_path_buf();
    let state = place.state.clone();
    let run = |name: &str, cases: &str| place.run(name, cases, |_| {});
    let pci = "[[case]]\nattacks = [\"pci-enum\"]\nbackends = [\"model\"]\n\
               profiles = [\"tenant\"]\ntags = [\"sim\"]\n";
    // And forged and malformed OOB frames through the network OOB port.
    let forge = "[[case]]\nattacks = [\"rollback-oob\"]\nbackends = [\"model\"]\n\
                 profiles = [\"operator\"]\ntags = [\"sim\"]\n";
    let s = run("lg-dev", &format!("{PROGRAM_CASE}{pci}{forge}"));
    assert_eq!(s.run.cases.len(), 3);
    for c in &s.run.cases {
        assert_eq!(c.host, "rack-dev");
        assert_eq!(c.outcome, Outcome::Pass, "{}: {}", c.id, c.message);
    }
    // The device the runner judged is the host's own, reached through ser2net.
    let nv = hilrig_device::state::NvState::load(&state).unwrap();
    assert_eq!(nv.serial, 2001);
    let traced = |n: &str| std::fs::metadata(t.join(format!("{n}.trace"))).map_or(0, |m| m.len());
    assert!(traced("oob") > 0, "no OOB traffic through ser2net");
    // Negative control: the controller's copies (what the rig prepared) are
    // factory-fresh; read instead of the port, the deltas would be zero.
    common::controller_copies_never_moved(&t.join("lg-dev"));
    // The console: the controller's capture of the network console.
    common::captured_console(&s, &t.join("lg-dev"), "pci-enum");
    assert!(traced("console") > 0, "no console traffic through ser2net");

    // A broken network OOB is INFRA, never a verdict: ser2net hung (SIGSTOP:
    // the port still accepts, nothing answers), then gone (the port refuses).
    let broken = |name: &str| {
        let s = run(name, PROGRAM_CASE);
        let case = &s.run.cases[0];
        assert!(!case.attempts.is_empty(), "{case:?}");
        for a in &case.attempts {
            assert_eq!(a.outcome, Outcome::Infra, "{name}: {a:?}");
            assert!(
                a.message.contains("OOB line") && a.message.contains("oob/rfc2217"),
                "{name}: {}",
                a.message
            );
        }
        assert_ne!(case.outcome, Outcome::Fail, "{case:?}");
        assert_ne!(case.outcome, Outcome::Pass, "{case:?}");
    };
    let pid = place
        .serial
        .borrow()
        .as_ref()
        .map(|k| k.0.id().to_string())
        .unwrap();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    broken("lg-hung");
    drop(place.serial.borrow_mut().take());
    broken("lg-refused");
}

/// `campaign run --labgrid` with tags no place carries (a typo): a CONFIG error
/// at once naming the tags and the places there are, exit code 2 — not a
/// reservation that waits all of `--labgrid-wait` (labgrid never allocates it)
/// and then fails as INFRA (try again), as before.
#[test]
fn campaign_on_tags_no_place_carries_is_config_at_once() {
    let test = "campaign_on_tags_no_place_carries_is_config_at_once";
    if !labgrid_tools(test, &["labgrid-coordinator", "labgrid-client"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (_coord, addr) = coordinator(t.path());
    client(&addr, &["-p", "rack-a", "create"], "admin");
    client(&addr, &["-p", "rack-a", "set-tags", "hilrig=x86"], "admin");
    let o = sim_run(
        t.path(),
        "\"attack-hang\"",
        t.path().join("no-vmm-needed"),
        &addr,
        Duration::from_secs(60),
    );
    let t0 = Instant::now();
    let e = match run_campaign(o) {
        Err(e) => e,
        Ok(s) => panic!("ran on {:?}", s.run.cases),
    };
    assert!(t0.elapsed() < Duration::from_secs(20), "waited for a place");
    let s = e.to_string();
    assert!(
        s.contains(": CONFIG: ")
            && s.contains("no labgrid place carries the tags hilrig=sim")
            && s.contains("rack-a [hilrig=x86]"),
        "{s}"
    );
    assert_eq!(e.exit_code(), hilrig_campaigns::error::exit::CONFIG);
}

/// Power through the place's `NetworkPowerPort`: the place's host is powered
/// off before the run (SSH unreachable), so it fails its health check; the
/// runner recovers it through the place's power driver (pdudaemon's outlet,
/// read back by the lab's status command) and checks it again; back, it gets
/// its case, which passes on its own device. Before, a labgrid place had no
/// drivers for recovery and went offline.
#[test]
fn a_powered_off_place_is_recovered_through_its_power_port() {
    let Some(place) = DevPlace::start("a_powered_off_place_is_recovered_through_its_power_port")
    else {
        return;
    };
    assert!(place.lab.host("power", 1, "off"));
    let s = place.run(
        "lg-power",
        "[[case]]\nattacks = [\"attack-key-read\"]\nbackends = [\"model\"]\n\
         profiles = [\"tenant\"]\ntags = [\"sim\"]\n",
        |o| {
            o.recover = hilrig_rig::recover::RecoverOptions {
                ssh_timeout: Duration::from_secs(3),
                wait: Duration::from_secs(20),
            }
        },
    );
    assert!(s.offline_hosts.is_empty(), "{:?}", s.offline_hosts);
    let c = &s.run.cases[0];
    assert_eq!(c.host, "rack-dev");
    assert_eq!(c.outcome, Outcome::Pass, "{}: {}", c.id, c.message);
    assert!(place.lab.host("power", 1, "status"));
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
    if !labgrid_tools(
        "campaign_on_inventory_hosts_plus_labgrid_places",
        &["labgrid-coordinator", "labgrid-client"],
    ) {
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
    assert_eq!(
        e.exit_code(),
        hilrig_campaigns::error::exit::CONFIG,
        "a setup error"
    );
    assert!(!t.path().join("out2").exists(), "the run started: {e}");
    assert!(released(), "rack-a not released after the clash");
}

/// A TCP relay to `upstream`: the connections made so far can be made to go
/// dead (nothing forwarded any more, the sockets left open: a session through a
/// NAT or firewall that dropped it), new ones pass.
struct Relay {
    addr: String,
    /// Connections with a lower number are dead.
    cut: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Connections accepted so far.
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Relay {
    fn start(upstream: String) -> Relay {
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (c, acc) = (cut.clone(), accepted.clone());
        std::thread::spawn(move || {
            for (n, a) in l.incoming().enumerate() {
                acc.store(n + 1, Ordering::SeqCst);
                let (Ok(a), Ok(b)) = (a, std::net::TcpStream::connect(&upstream)) else {
                    continue;
                };
                for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)]
                {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 16384];
                        while let Ok(k) = from.read(&mut buf) {
                            if k == 0 {
                                break;
                            }
                            while n < c.load(Ordering::SeqCst) {
                                // Dead: hold the sockets, forward nothing.
                                std::thread::sleep(Duration::from_secs(1));
                            }
                            if to.write_all(&buf[..k]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Relay {
            addr,
            cut,
            accepted,
        }
    }

    /// The connections made so far go dead.
    fn cut(&self) {
        use std::sync::atomic::Ordering;
        self.cut
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// The coordinator connection the places were taken on breaks during the run:
/// releasing them reconnects once and releases them (before, the release went
/// over the broken connection, failed, and the place stayed acquired).
#[test]
fn places_are_released_over_a_fresh_connection_when_the_first_broke() {
    use hilrig_campaigns::hostsource::{HostSource, LabgridSource};
    let test = "places_are_released_over_a_fresh_connection_when_the_first_broke";
    if !labgrid_tools(test, &["labgrid-coordinator", "labgrid-client"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (_coord, addr) = coordinator(t.path());
    // A place with no resources to wait for: a local simulated host.
    client(&addr, &["-p", "rack-r", "create"], "admin");
    client(&addr, &["-p", "rack-r", "set-tags", "hilrig=sim"], "admin");
    let relay = Relay::start(addr.clone());
    let mut src = LabgridSource::new(LabgridOptions {
        address: relay.addr.clone(),
        user: Some("testhost/hilrig".into()),
        tags: [("hilrig".to_string(), "sim".to_string())].into(),
        places: 1,
        wait: Duration::from_secs(10),
        config: None,
    });
    let (hosts, _) = src.hosts().expect("a place reserved");
    assert_eq!(hosts[0].name, "rack-r");
    let mut c = Coordinator::connect(&addr, "testhost/check", Duration::from_secs(5)).unwrap();
    assert_eq!(holder(&c.place("rack-r").unwrap()), Some("testhost/hilrig"));
    // The connection the place was taken on goes dead.
    relay.cut();
    src.release();
    assert_eq!(
        holder(&c.place("rack-r").unwrap()),
        None,
        "the place stayed acquired"
    );
}

/// A place whose exporter went away (crashed) after this session saw its
/// resources published: the place's resources are withdrawn, the lab's fault
/// (INFRA: retried, the host marked), not a setup error; a session that never
/// saw them published cannot tell it from a place never configured (CONFIG).
#[test]
fn a_place_whose_exporter_went_away_is_infra_not_config() {
    let test = "a_place_whose_exporter_went_away_is_infra_not_config";
    if !labgrid_tools(
        test,
        &["labgrid-coordinator", "labgrid-client", "labgrid-exporter"],
    ) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (_coord, addr) = coordinator(t.path());
    client(&addr, &["-p", "rack-e", "create"], "admin");
    client(
        &addr,
        &["-p", "rack-e", "add-match", "exp1/rack-e/*"],
        "admin",
    );
    let exp = exporter(
        t.path(),
        &addr,
        "rack-e:\n  NetworkPowerPort:\n    model: gude\n    host: 127.0.0.1\n    index: \"1\"\n",
        1,
    );
    let mut c = Coordinator::connect(&addr, "testhost/hilrig", Duration::from_secs(5)).unwrap();
    c.wait_published("rack-e", Duration::from_secs(10))
        .expect("published");
    drop(exp); // killed
    let t0 = Instant::now();
    let e = loop {
        match c.wait_published("rack-e", Duration::ZERO) {
            Err(e) => break e,
            Ok(()) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "the coordinator never withdrew the exporter's resources"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert_eq!(e.kind(), hilrig_rig::ErrorKind::Infra, "{e}");
    assert!(e.to_string().contains("withdrawn"), "{e}");
    // Negative control: a session that never saw them published.
    let mut fresh = Coordinator::connect(&addr, "testhost/other", Duration::from_secs(5)).unwrap();
    let e = fresh
        .wait_published("rack-e", Duration::ZERO)
        .expect_err("nothing published");
    assert_eq!(e.kind(), hilrig_rig::ErrorKind::Config, "{e}");
}

//! The labgrid client against a real labgrid coordinator and exporter (PyPI
//! `labgrid`, installed by scripts/test) on loopback: places reserved by tags,
//! acquired and released, resources mapped to hilrig drivers, and a place acquired
//! by someone else left alone. Says SKIPPED loudly without labgrid.

use hilrig_rig::labgrid::{holder, Coordinator, LabgridError};
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    hilrig_rig::simlab::free_port_on("127.0.0.1").expect("a free port on 127.0.0.1")
}

/// A coordinator and an exporter on loopback, killed on drop.
struct Lab {
    addr: String,
    kids: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for k in &mut self.kids {
            let _ = k.kill();
            let _ = k.wait();
        }
    }
}

const EXPORTER: &str = r#"
lab-1:
  NetworkPowerPort:
    model: pdudaemon
    host: http://127.0.0.1:16421/pdu-a
    index: "1"
  NetworkSerialPort:
    host: 127.0.0.1
    port: 40001
    speed: 115200
  oob:
    cls: NetworkSerialPort
    host: 127.0.0.1
    port: 40002
  NetworkService:
    address: 127.0.0.11
    username: hilrig
lab-2:
  NetworkPowerPort:
    model: pdudaemon
    host: http://127.0.0.1:16421/pdu-a
    index: "2"
  NetworkService:
    address: 127.0.0.12
    username: hilrig
"#;

impl Lab {
    fn client(&self, args: &[&str], user: &str) {
        let out = Command::new("labgrid-client")
            .args(["-x", &self.addr])
            .args(args)
            .env("LG_USERNAME", user)
            .env("LG_HOSTNAME", "testhost")
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "labgrid-client {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(test: &str) -> Option<Lab> {
        Lab::start_with(
            test,
            EXPORTER,
            6,
            &[("lab-1", "hilrig=sim"), ("lab-2", "hilrig=busy")],
            &[],
        )
    }

    fn start_with(
        test: &str,
        exporter_yaml: &str,
        min_resources: usize,
        places: &[(&str, &str)],
        exporter_args: &[&str],
    ) -> Option<Lab> {
        let mut lab = Lab::coordinator(test)?;
        lab.exporter(exporter_yaml, exporter_args);
        lab.wait_published(min_resources);
        lab.places(places);
        Some(lab)
    }

    /// A coordinator alone (no exporter yet); `None` (SKIPPED said) without labgrid.
    fn coordinator(test: &str) -> Option<Lab> {
        for t in ["labgrid-coordinator", "labgrid-exporter", "labgrid-client"] {
            if !have(t) {
                eprintln!("SKIPPED {test}: {t} not found (pip install labgrid; scripts/test does)");
                return None;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        // The coordinator keeps places.yaml in its working directory.
        let coord = Command::new("labgrid-coordinator")
            .args(["-l", &addr])
            .current_dir(dir.path())
            .stdout(log(dir.path(), "coordinator.log"))
            .stderr(log(dir.path(), "coordinator.err"))
            .spawn()
            .unwrap();
        let lab = Lab {
            addr,
            kids: vec![coord],
            dir,
        };
        // Wait (bounded) for the coordinator to accept a session.
        let t0 = Instant::now();
        while let Err(e) = Coordinator::connect(&lab.addr, "testhost/probe", Duration::from_secs(5))
        {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the coordinator never came up ({e}): {}",
                std::fs::read_to_string(lab.dir.path().join("coordinator.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(lab)
    }

    /// Start the exporter `exp1` serving `exporter_yaml`.
    fn exporter(&mut self, exporter_yaml: &str, exporter_args: &[&str]) {
        std::fs::write(self.dir.path().join("exporter.yaml"), exporter_yaml).unwrap();
        let exporter = Command::new("labgrid-exporter")
            .args(["-c", &self.addr, "-n", "exp1"])
            .args(exporter_args)
            .arg("exporter.yaml")
            .current_dir(self.dir.path())
            .stdout(log(self.dir.path(), "exporter.log"))
            .stderr(log(self.dir.path(), "exporter.err"))
            .spawn()
            .unwrap();
        self.kids.push(exporter);
    }

    /// Wait (bounded) until the exporter published `min_resources` resources.
    fn wait_published(&self, min_resources: usize) {
        let t0 = Instant::now();
        loop {
            let mut c =
                Coordinator::connect(&self.addr, "testhost/probe", Duration::from_secs(5)).unwrap();
            c.sync().unwrap();
            let n = c.resource_count();
            if n >= min_resources {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the exporter never published: {}",
                std::fs::read_to_string(self.dir.path().join("exporter.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Create the places (`name`, `tag`), each matching `exp1/<name>/*`.
    fn places(&self, places: &[(&str, &str)]) {
        for &(place, tag) in places {
            self.client(&["-p", place, "create"], "admin");
            self.client(
                &["-p", place, "add-match", &format!("exp1/{place}/*")],
                "admin",
            );
            self.client(&["-p", place, "set-tags", tag], "admin");
        }
    }
}

/// A labgrid config whose power commands keep each outlet's state in
/// `dir/<index>` (`on`/`off`; none: off).
fn file_power_config(dir: &std::path::Path) -> std::path::PathBuf {
    let pd = dir.display();
    let cfg = dir.join("labgrid.toml");
    std::fs::write(
        &cfg,
        format!(
            "[power]\non = \"echo on > {pd}/{{port}}\"\noff = \"echo off > {pd}/{{port}}\"\nstatus = \"cat {pd}/{{port}} 2>/dev/null || echo off\"\n"
        ),
    )
    .unwrap();
    cfg
}

fn log(dir: &std::path::Path, name: &str) -> std::fs::File {
    std::fs::File::create(dir.join(name)).unwrap()
}

fn tags(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn reserve_acquire_map_release_and_leave_foreign_places_alone() {
    let Some(lab) = Lab::start("reserve_acquire_map_release_and_leave_foreign_places_alone") else {
        return;
    };
    let mut c =
        Coordinator::connect(&lab.addr, "testhost/hilrig", Duration::from_secs(10)).unwrap();
    // Reserved by tags: only lab-1 carries hilrig=sim.
    let r = c
        .reserve(&tags(&[("hilrig", "sim")]), Duration::from_secs(60))
        .unwrap();
    assert_eq!(r.place, "lab-1");
    c.acquire("lab-1").unwrap();
    assert_eq!(holder(&c.place("lab-1").unwrap()), Some("testhost/hilrig"));
    let h = c.host("lab-1").unwrap();
    assert_eq!(h.tags.get("hilrig").map(String::as_str), Some("sim"));
    let power = h.power.clone().expect("power port");
    assert_eq!(
        power.pdudaemon(),
        Some(("http://127.0.0.1:16421".into(), "pdu-a".into(), "1".into()))
    );
    assert_eq!(h.consoles.len(), 1, "{h:?}");
    assert_eq!((h.consoles[0].port, h.consoles[0].speed), (40001, 115200));
    assert_eq!(h.consoles[0].protocol, "rfc2217");
    assert_eq!(h.oob.as_ref().map(|o| o.port), Some(40002));
    let ssh = h.ssh.clone().expect("ssh service");
    assert_eq!((ssh.address.as_str(), ssh.port), ("127.0.0.11", 22));
    c.release("lab-1").unwrap();
    assert_eq!(holder(&c.place("lab-1").unwrap()), None);
    c.cancel(&r.token).unwrap();

    // Someone else acquires lab-2: hilrig neither acquires nor releases it.
    lab.client(&["-p", "lab-2", "acquire"], "alice");
    let p2 = c.place("lab-2").unwrap();
    assert_eq!(holder(&p2), Some("testhost/alice"));
    match c.acquire("lab-2") {
        Err(LabgridError::AcquiredByOther { place, by, .. }) => {
            assert_eq!((place.as_str(), by.as_str()), ("lab-2", "testhost/alice"))
        }
        other => panic!("acquired a foreign place: {other:?}"),
    }
    match c.release("lab-2") {
        Err(LabgridError::AcquiredByOther { .. }) => {}
        other => panic!("released a foreign place: {other:?}"),
    }
    assert_eq!(
        holder(&c.place("lab-2").unwrap()),
        Some("testhost/alice"),
        "the foreign place was touched"
    );
    // A reservation that only lab-2 could satisfy gets no place while alice has it.
    let e = c
        .reserve(&tags(&[("hilrig", "busy")]), Duration::from_secs(1))
        .unwrap_err();
    assert!(matches!(e, LabgridError::Reservation { .. }), "{e}");
    assert_eq!(holder(&c.place("lab-2").unwrap()), Some("testhost/alice"));
    // An unknown place is a clear error.
    assert!(matches!(
        c.acquire("no-such"),
        Err(LabgridError::NoPlace(_))
    ));
}

#[test]
fn unreachable_coordinator_is_a_clear_error() {
    let port = free_port(); // bound and released: nothing listens there
    let e = Coordinator::connect(
        &format!("127.0.0.1:{port}"),
        "testhost/hilrig",
        Duration::from_secs(5),
    )
    .err()
    .expect("no coordinator there");
    let s = e.to_string();
    assert!(s.contains(&format!("127.0.0.1:{port}")), "{s}");
    assert!(matches!(
        Coordinator::connect("nonsense", "u", Duration::from_secs(1)),
        Err(LabgridError::BadAddress(_))
    ));
}

/// labgrid's exporter publishes a PTY through ser2net (`RawSerialPort` ->
/// `NetworkSerialPort`, RFC 2217): the place's `oob` port answers the rig's OOB
/// driver with the device model's counters, its console is captured, its power
/// goes through the configured commands; `hilrig rig --labgrid` acts on a free
/// place (acquiring it for the action and releasing it after) and refuses a place
/// acquired by someone else unless forced with a reason.
#[test]
fn ser2net_serial_ports_power_and_rig_labgrid_on_places() {
    use hilrig_device::model::{ops, Model};
    use hilrig_device::regmap::Region;
    use hilrig_device::state::{DeviceConfig, NvState};
    use hilrig_rig::cli::{LabgridCmd, OobAction, PowerAction};
    use hilrig_rig::RigCmd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let test = "ser2net_serial_ports_power_and_rig_labgrid_on_places";
    if !std::path::Path::new("/usr/sbin/ser2net").exists() && !have("ser2net") {
        eprintln!(
            "SKIPPED {test}: ser2net not installed (apt-get install ser2net; scripts/test does)"
        );
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("dev.state");
    let mut m = Model::create(
        &state,
        NvState::factory(DeviceConfig::with_width(6), 77).unwrap(),
    )
    .unwrap();
    ops::unlock(&mut m).unwrap();
    ops::erase(&mut m, Region::Firmware).unwrap();
    let server = hilrig_device::oob::PtyServer::new().unwrap();
    let oob_pty = server.path().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let srv = std::thread::spawn(move || server.serve(&mut m, &|| st.load(Ordering::Relaxed)));
    let power_dir = d.path().join("power");
    std::fs::create_dir(&power_dir).unwrap();
    let exporter = format!(
        "lab-3:\n  NetworkPowerPort:\n    model: gude\n    host: 127.0.0.1\n    index: \"4\"\n  oob:\n    cls: RawSerialPort\n    port: {oob_pty}\n    speed: 115200\n\
         lab-4:\n  NetworkPowerPort:\n    model: gude\n    host: 127.0.0.1\n    index: \"5\"\n"
    );
    let Some(lab) = Lab::start_with(
        test,
        &exporter,
        3,
        &[("lab-3", "hilrig=net"), ("lab-4", "hilrig=other")],
        &["--hostname", "127.0.0.1"],
    ) else {
        stop.store(true, Ordering::Relaxed);
        return;
    };
    let cfg = d.path().join("labgrid.toml");
    let pd = power_dir.display();
    std::fs::write(
        &cfg,
        format!(
            "[power]\non = \"echo on > {pd}/{{port}}\"\noff = \"echo off > {pd}/{{port}}\"\nstatus = \"cat {pd}/{{port}} 2>/dev/null || echo off\"\nsettle_ms = 2000\n"
        ),
    )
    .unwrap();
    // The mapping: the oob port is the exporter's ser2net on 127.0.0.1.
    let mut c =
        Coordinator::connect(&lab.addr, "testhost/hilrig", Duration::from_secs(10)).unwrap();
    // The exporter starts ser2net (and publishes its TCP port) only while the
    // place is acquired: hilrig holds lab-3 for the test (the CLI, same user,
    // then acts on it as ours).
    // Free, its ser2net port not served yet: listed (`rig --labgrid hosts`),
    // port 0, not an error; the drivers' mapping needs the acquisition.
    let listed = c.listing("lab-3").expect("a free place is listed");
    assert_eq!(
        listed.oob.as_ref().map(|s| (s.host.as_str(), s.port)),
        Some(("127.0.0.1", 0)),
        "{listed:?}"
    );
    assert!(c.host("lab-3").is_err(), "mapped without a served port");
    c.acquire("lab-3").unwrap();
    // Acquired: waiting for the place's resources includes the served port.
    c.wait_published("lab-3", Duration::from_secs(60)).unwrap();
    assert!(
        c.host("lab-3")
            .is_ok_and(|h| h.oob.is_some_and(|s| s.port > 0)),
        "published without its port"
    );
    let t0 = Instant::now();
    let h = loop {
        match c.host("lab-3") {
            Ok(h) if h.oob.is_some() => break h,
            other => {
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "ser2net port never published ({other:?}): {}",
                    std::fs::read_to_string(lab.dir.path().join("exporter.err"))
                        .unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    let oob = h.oob.clone().expect("oob port published by the exporter");
    assert_eq!(
        (oob.host.as_str(), oob.protocol.as_str()),
        ("127.0.0.1", "rfc2217"),
        "{h:?}"
    );
    let run = |cmd: LabgridCmd| {
        hilrig_rig::run(RigCmd::Labgrid {
            address: lab.addr.clone(),
            labgrid_config: Some(cfg.clone()),
            user: Some("testhost/hilrig".into()),
            labgrid_wait: Duration::from_secs(10),
            cmd,
        })
    };
    // OOB through ser2net (RFC 2217) reads the model: one FIRMWARE attempt.
    let inv = hilrig_rig::labgrid::places_inventory(
        &lab.addr,
        &[h],
        &hilrig_rig::labgrid::LabgridConfig::load(&cfg).unwrap(),
    )
    .unwrap();
    let rig = hilrig_rig::Rig::new(inv);
    let counters = rig.read_counters("lab-3").unwrap();
    assert_eq!(
        (counters.counters, counters.master, counters.width),
        ([0, 1, 0], 1, 6)
    );
    run(LabgridCmd::Oob {
        place: "lab-3".into(),
        action: OobAction::Identify,
        force: None,
    })
    .unwrap();
    // Power through the CLI: the free place is acquired for the action, released after.
    run(LabgridCmd::Power {
        place: "lab-3".into(),
        action: PowerAction::On,
        json: false,
        force: None,
    })
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(power_dir.join("4")).unwrap().trim(),
        "on"
    );
    assert_eq!(
        holder(&c.place("lab-3").unwrap()),
        Some("testhost/hilrig"),
        "ours stays ours"
    );
    // Someone else's place: refused, untouched; forced only with a reason.
    lab.client(&["-p", "lab-4", "acquire"], "alice");
    let e = run(LabgridCmd::Power {
        place: "lab-4".into(),
        action: PowerAction::On,
        json: false,
        force: None,
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("lab-4") && e.contains("testhost/alice"), "{e}");
    assert!(!power_dir.join("5").exists(), "a foreign place was powered");
    assert!(run(LabgridCmd::Power {
        place: "lab-4".into(),
        action: PowerAction::On,
        json: false,
        force: Some(" ".into())
    })
    .is_err());
    assert!(!power_dir.join("5").exists());
    run(LabgridCmd::Power {
        place: "lab-4".into(),
        action: PowerAction::On,
        json: false,
        force: Some("PDU maintenance".into()),
    })
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(power_dir.join("5")).unwrap().trim(),
        "on"
    );
    assert_eq!(
        holder(&c.place("lab-4").unwrap()),
        Some("testhost/alice"),
        "still alice's"
    );
    // check: lab-3 probed (healthy), lab-4 left alone.
    run(LabgridCmd::Check {
        places: vec![],
        tags: vec![],
        json: true,
    })
    .unwrap();
    c.release("lab-3").unwrap();
    stop.store(true, Ordering::Relaxed);
    drop(lab);
    let _ = srv.join();
}

/// `hilrig rig --labgrid ... power` on a place whose exporter is not up yet: with
/// `--labgrid-wait` the command waits (bounded) until the exporter has published
/// the place's resources, then powers it through them; with `--labgrid-wait 0`
/// (the negative control: the behaviour without the wait) it fails at once with
/// a CONFIG error naming the place and the match nothing satisfies, and the
/// place it acquired for the action is released.
#[test]
fn rig_labgrid_waits_for_the_exporter_to_publish() {
    use hilrig_rig::cli::{LabgridCmd, PowerAction};
    use hilrig_rig::error::ErrorKind;
    use hilrig_rig::RigCmd;
    let test = "rig_labgrid_waits_for_the_exporter_to_publish";
    let Some(mut lab) = Lab::coordinator(test) else {
        return;
    };
    lab.places(&[("lab-1", "hilrig=sim")]);
    let d = tempfile::tempdir().unwrap();
    let cfg = file_power_config(d.path());
    let addr = lab.addr.clone();
    let power_on = |wait: Duration| {
        hilrig_rig::run(RigCmd::Labgrid {
            address: addr.clone(),
            labgrid_config: Some(cfg.clone()),
            user: Some("testhost/hilrig".into()),
            labgrid_wait: wait,
            cmd: LabgridCmd::Power {
                place: "lab-1".into(),
                action: PowerAction::On,
                json: false,
                force: None,
            },
        })
    };
    let mut c = Coordinator::connect(&lab.addr, "testhost/check", Duration::from_secs(10)).unwrap();

    // Negative control: no wait, no exporter yet: a clear CONFIG error.
    let e = power_on(Duration::ZERO).unwrap_err();
    let s = format!("{e:#}");
    assert!(
        s.contains("place `lab-1`") && s.contains("exp1/lab-1/*: not published"),
        "{s}"
    );
    let lg = e.downcast_ref::<LabgridError>().expect("a labgrid error");
    assert!(matches!(lg, LabgridError::NotPublished { .. }), "{lg:?}");
    assert_eq!(lg.kind(), ErrorKind::Config);
    assert!(!d.path().join("1").exists(), "powered without a power port");
    assert_eq!(holder(&c.place("lab-1").unwrap()), None, "not released");

    // The command starts waiting first; the exporter comes up after.
    let waiting = std::thread::scope(|sc| {
        let h = sc.spawn(|| power_on(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(700));
        assert!(!h.is_finished(), "did not wait for the exporter");
        lab.exporter(
            "lab-1:\n  NetworkPowerPort:\n    model: gude\n    host: 127.0.0.1\n    index: \"1\"\n\
             \x20 NetworkSerialPort:\n    host: 127.0.0.1\n    port: 40001\n",
            &[],
        );
        h.join().unwrap()
    });
    waiting.unwrap();
    assert_eq!(
        std::fs::read_to_string(d.path().join("1")).unwrap().trim(),
        "on"
    );
    assert_eq!(holder(&c.place("lab-1").unwrap()), None, "not released");
}

/// `hilrig rig --labgrid ADDR check` when one place's exporter never publishes:
/// that place is an UNHEALTHY row with the reason (CONFIG: not published,
/// naming the match), the other place is still probed (healthy: its power
/// reads back), and the command exits 1 as check does for an unhealthy host.
/// Before, the whole command failed on the first such place.
#[test]
fn rig_labgrid_check_lists_an_unpublished_place_and_checks_the_others() {
    use hilrig_rig::cli::LabgridCmd;
    use hilrig_rig::RigCmd;
    let test = "rig_labgrid_check_lists_an_unpublished_place_and_checks_the_others";
    let Some(lab) = Lab::start_with(
        test,
        "lab-1:\n  NetworkPowerPort:\n    model: gude\n    host: 127.0.0.1\n    index: \"1\"\n",
        1,
        &[("lab-1", "hilrig=sim"), ("lab-x", "hilrig=sim")],
        &[],
    ) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let cfg = file_power_config(d.path());
    let mut c =
        Coordinator::connect(&lab.addr, "testhost/hilrig", Duration::from_secs(10)).unwrap();
    let places = c.places().unwrap();
    let (t, foreign) = hilrig_rig::labgrid::check_places(
        &mut c,
        &lab.addr,
        &hilrig_rig::labgrid::LabgridConfig::load(&cfg).unwrap(),
        places,
        Duration::from_secs(1),
    )
    .unwrap();
    assert!(foreign.is_empty());
    let names: Vec<&str> = t.rows.iter().map(|r| r.host.as_str()).collect();
    assert_eq!(names, ["lab-1", "lab-x"], "{t}");
    assert!(t.is_healthy("lab-1"), "{t}");
    assert!(!t.is_healthy("lab-x"), "{t}");
    let why = &t.rows[1].probes[0].detail;
    assert!(
        why.starts_with("CONFIG: ")
            && why.contains("place `lab-x`")
            && why.contains("exp1/lab-x/*: not published"),
        "{why}"
    );
    // The command: the table printed, exit 1 (an unhealthy place).
    let code = hilrig_rig::run(RigCmd::Labgrid {
        address: lab.addr.clone(),
        labgrid_config: Some(cfg.clone()),
        user: Some("testhost/hilrig".into()),
        labgrid_wait: Duration::from_secs(1),
        cmd: LabgridCmd::Check {
            places: vec![],
            tags: vec![],
            json: true,
        },
    })
    .expect("check runs through an unpublished place");
    assert_eq!(code, std::process::ExitCode::from(1));
}

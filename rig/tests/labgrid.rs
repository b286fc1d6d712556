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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
        for t in ["labgrid-coordinator", "labgrid-exporter", "labgrid-client"] {
            if !have(t) {
                eprintln!("SKIPPED {test}: {t} not found (pip install labgrid; scripts/test does)");
                return None;
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let logdir = dir.path().to_path_buf();
        let log = move |n: &str| std::fs::File::create(logdir.join(n)).unwrap();
        // The coordinator keeps places.yaml in its working directory.
        let coord = Command::new("labgrid-coordinator")
            .args(["-l", &addr])
            .current_dir(dir.path())
            .stdout(log("coordinator.log"))
            .stderr(log("coordinator.err"))
            .spawn()
            .unwrap();
        let mut lab = Lab {
            addr,
            kids: vec![coord],
            dir,
        };
        std::fs::write(lab.dir.path().join("exporter.yaml"), EXPORTER).unwrap();
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
        let exporter = Command::new("labgrid-exporter")
            .args(["-c", &lab.addr, "-n", "exp1", "exporter.yaml"])
            .current_dir(lab.dir.path())
            .stdout(log("exporter.log"))
            .stderr(log("exporter.err"))
            .spawn()
            .unwrap();
        lab.kids.push(exporter);
        // Wait (bounded) until the exporter published its resources.
        let t0 = Instant::now();
        loop {
            let mut c =
                Coordinator::connect(&lab.addr, "testhost/probe", Duration::from_secs(5)).unwrap();
            c.sync().unwrap();
            let n = c.resource_count();
            if n >= 6 {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the exporter never published: {}",
                std::fs::read_to_string(lab.dir.path().join("exporter.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        for (place, tag) in [("lab-1", "hilrig=sim"), ("lab-2", "hilrig=busy")] {
            lab.client(&["-p", place, "create"], "admin");
            lab.client(
                &["-p", place, "add-match", &format!("exp1/{place}/*")],
                "admin",
            );
            lab.client(&["-p", place, "set-tags", tag], "admin");
        }
        Some(lab)
    }
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

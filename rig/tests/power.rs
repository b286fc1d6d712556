//! Power drivers against peers: a simulated LCUS relay board on a PTY (good and
//! garbage), shell scripts for the command driver, and a real pdudaemon.

use hilrig_rig::{ErrorKind, PowerState, Rig};
use serialport::SerialPort;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A simulated relay board: answers the LCUS byte protocol on the PTY master.
/// `garbage`: answers every query with noise instead.
struct RelayBoard {
    path: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _slave: serialport::TTYPort,
}

impl RelayBoard {
    fn start(garbage: bool) -> RelayBoard {
        let (mut master, slave) = serialport::TTYPort::pair().unwrap();
        master.set_timeout(Duration::from_millis(10)).unwrap();
        let path = slave.name().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut relays = [0u8; 9];
            let mut frame = Vec::new();
            let mut b = [0u8; 64];
            while !st.load(Ordering::Relaxed) {
                let n: usize = master.read(&mut b).unwrap_or_default();
                for &x in &b[..n] {
                    if frame.is_empty() && x != 0xA0 {
                        continue;
                    }
                    frame.push(x);
                    if frame.len() < 4 {
                        continue;
                    }
                    let f = std::mem::take(&mut frame);
                    let (ch, op) = (f[1] as usize, f[2]);
                    if f[3] != 0xA0u8.wrapping_add(f[1]).wrapping_add(op) || ch == 0 || ch > 8 {
                        continue;
                    }
                    match op {
                        0 | 1 => relays[ch] = op,
                        2 if garbage => {
                            master.write_all(b"\x13\x37GARBAGE\r\n").unwrap();
                        }
                        2 => {
                            let s = relays[ch];
                            master
                                .write_all(&[
                                    0xA0,
                                    ch as u8,
                                    s,
                                    0xA0u8.wrapping_add(ch as u8).wrapping_add(s),
                                ])
                                .unwrap();
                        }
                        _ => {}
                    }
                }
            }
        });
        RelayBoard {
            path,
            stop,
            thread: Some(thread),
            _slave: slave,
        }
    }
}

impl Drop for RelayBoard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_inv(dir: &Path, body: &str) -> Rig {
    let p = dir.join("lab.toml");
    std::fs::write(&p, body).unwrap();
    Rig::load(&p).unwrap()
}

#[test]
fn serial_relay_against_a_simulated_board() {
    let d = tempfile::tempdir().unwrap();
    let good = RelayBoard::start(false);
    let bad = RelayBoard::start(true);
    let rig = write_inv(
        d.path(),
        &format!(
            "[[host]]\nname = \"relay-good\"\n[host.power]\ndriver = \"serial-relay\"\nport = \"{}\"\nchannel = 2\n\n\
             [[host]]\nname = \"relay-bad\"\n[host.power]\ndriver = \"serial-relay\"\nport = \"{}\"\nchannel = 1\nretries = 2\ntimeout_ms = 300\n",
            good.path, bad.path
        ),
    );
    let mut p = rig.power("relay-good").unwrap();
    assert_eq!(p.status().unwrap(), PowerState::Off);
    p.on().unwrap();
    assert_eq!(p.status().unwrap(), PowerState::On);
    p.cycle().unwrap();
    assert_eq!(p.status().unwrap(), PowerState::On);
    p.off().unwrap();
    assert_eq!(p.status().unwrap(), PowerState::Off);

    let mut p = rig.power("relay-bad").unwrap();
    let e = p.status().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Infra);
    let s = e.to_string();
    assert!(
        s.contains("relay-bad") && s.contains("power/serial-relay") && s.contains("garbage"),
        "{s}"
    );
    let e = p.on().unwrap_err().to_string();
    assert!(e.contains("relay-bad") && e.contains("serial-relay"), "{e}");

    let t = rig.check();
    assert_eq!(t.healthy_hosts(), vec!["relay-good"], "{t}");
    assert!(!t.is_healthy("relay-bad"));
    assert!(t.to_string().contains("UNHEALTHY"), "{t}");
}

fn script(dir: &Path, name: &str, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p.display().to_string()
}

#[test]
fn command_driver_with_scripts() {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let state = dp.join("outlet");
    std::fs::write(&state, "Chassis Power is off\n").unwrap();
    let on = script(
        dp,
        "on.sh",
        &format!(
            "echo \"Chassis Power is on\" > {}/outlet.$2; echo $1 > {}/last-host",
            dp.display(),
            dp.display()
        ),
    );
    let off = script(
        dp,
        "off.sh",
        &format!("echo \"Chassis Power is off\" > {}/outlet.$2", dp.display()),
    );
    let status = script(dp, "status.sh", &format!("cat {}/outlet.$2", dp.display()));
    std::fs::write(dp.join("outlet.7"), "Chassis Power is off\n").unwrap();
    let cycle = script(
        dp,
        "cycle.sh",
        &format!(
            "echo cycled >> {}/cycles; echo \"Chassis Power is on\" > {}/outlet.$2",
            dp.display(),
            dp.display()
        ),
    );
    let liar = script(dp, "liar.sh", "exit 0");
    let fail = script(dp, "fail.sh", "echo 'BMC unreachable' >&2; exit 3");
    let slow = script(dp, "slow.sh", "sleep 10");
    let rig = write_inv(
        dp,
        &format!(
            "[[host]]\nname = \"ipmi-1\"\n[host.power]\ndriver = \"command\"\nport = \"7\"\non = \"{on} {{host}} {{port}}\"\noff = \"{off} {{host}} {{port}}\"\nstatus = \"{status} {{host}} {{port}}\"\ncycle = \"{cycle} {{host}} {{port}}\"\n\n\
             [[host]]\nname = \"liar\"\n[host.power]\ndriver = \"command\"\nport = \"7\"\non = \"{liar}\"\noff = \"{liar}\"\nstatus = \"{status} {{host}} {{port}}\"\nsettle_ms = 100\nretries = 2\n\n\
             [[host]]\nname = \"broken\"\n[host.power]\ndriver = \"command\"\non = \"{fail}\"\noff = \"{fail}\"\nstatus = \"{fail}\"\n\n\
             [[host]]\nname = \"hung\"\n[host.power]\ndriver = \"command\"\non = \"{slow}\"\noff = \"{slow}\"\nstatus = \"{slow}\"\ntimeout_ms = 200\n"
        ),
    );
    let mut p = rig.power("ipmi-1").unwrap();
    assert_eq!(p.status().unwrap(), PowerState::Off);
    p.on().unwrap();
    assert_eq!(p.status().unwrap(), PowerState::On);
    assert_eq!(
        std::fs::read_to_string(dp.join("last-host"))
            .unwrap()
            .trim(),
        "ipmi-1"
    );
    p.cycle().unwrap();
    assert_eq!(
        std::fs::read_to_string(dp.join("cycles")).unwrap(),
        "cycled\n"
    );
    assert_eq!(p.status().unwrap(), PowerState::On);
    p.off().unwrap();
    assert_eq!(p.status().unwrap(), PowerState::Off);

    // A command that "succeeds" without switching is caught by the readback.
    let e = rig.power("liar").unwrap().on().unwrap_err().to_string();
    assert!(e.contains("liar") && e.contains("read back off"), "{e}");
    let e = rig
        .power("broken")
        .unwrap()
        .status()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("broken") && e.contains("power/command") && e.contains("BMC unreachable"),
        "{e}"
    );
    let e = rig.power("hung").unwrap().status().unwrap_err().to_string();
    assert!(e.contains("hung") && e.contains("timed out"), "{e}");

    let t = rig.check();
    assert_eq!(t.healthy_hosts(), vec!["ipmi-1", "liar"], "{t}");
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    hilrig_rig::simlab::free_port_on("127.0.0.1").expect("a free port on 127.0.0.1")
}

struct Daemon(std::process::Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn pdudaemon_against_a_real_pdudaemon() {
    let have = std::process::Command::new("pdudaemon")
        .arg("--help")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        eprintln!("SKIPPED: pdudaemon_against_a_real_pdudaemon: pdudaemon not installed (pip install pdudaemon==1.1.1)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let port = free_port();
    let conf = dp.join("pdudaemon.conf");
    std::fs::write(
        &conf,
        format!(
            r#"{{"daemon": {{"hostname": "127.0.0.1", "port": {port}, "listener": "http", "logging_level": "DEBUG"}},
 "pdus": {{"lab-pdu": {{"driver": "localcmdline", "cmd_on": "echo on > {dir}/outlet-%s", "cmd_off": "echo off > {dir}/outlet-%s"}}}}}}"#,
            dir = dp.display()
        ),
    )
    .unwrap();
    std::fs::write(dp.join("outlet-3"), "off\n").unwrap();
    let log = std::fs::File::create(dp.join("pdudaemon.log")).unwrap();
    let _daemon = Daemon(
        std::process::Command::new("pdudaemon")
            .arg("--conf")
            .arg(&conf)
            .arg("--listener")
            .arg("http")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "pdudaemon did not listen: {}",
            std::fs::read_to_string(dp.join("pdudaemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let rig = write_inv(
        dp,
        &format!(
            "[[host]]\nname = \"pdu-host\"\n[host.power]\ndriver = \"pdudaemon\"\nurl = \"http://127.0.0.1:{port}\"\npdu = \"lab-pdu\"\nport = \"3\"\nstatus_command = \"cat {dir}/outlet-{{port}}\"\nsettle_ms = 30000\n\n\
             [[host]]\nname = \"pdu-unknown\"\n[host.power]\ndriver = \"pdudaemon\"\nurl = \"http://127.0.0.1:{port}\"\npdu = \"no-such-pdu\"\nport = \"1\"\nstatus_command = \"echo off\"\nretries = 1\n",
            dir = dp.display()
        ),
    );
    let mut p = rig.power("pdu-host").unwrap();
    assert_eq!(p.status().unwrap(), PowerState::Off);
    p.on().unwrap();
    assert_eq!(
        std::fs::read_to_string(dp.join("outlet-3")).unwrap().trim(),
        "on"
    );
    p.off().unwrap();
    assert_eq!(p.status().unwrap(), PowerState::Off);
    p.cycle().unwrap();
    assert_eq!(p.status().unwrap(), PowerState::On);

    let e = rig
        .power("pdu-unknown")
        .unwrap()
        .on()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pdu-unknown") && e.contains("power/pdudaemon") && e.contains("500"),
        "{e}"
    );
}

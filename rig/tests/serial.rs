//! Real-hardware code paths against PTY peers: a serial console captured line by
//! line from before the "boot", and an OOB UART (`driver = "serial"`) served by a
//! device model on a PTY.

use hilrig_device::model::{ops, Model};
use hilrig_device::regmap::Region;
use hilrig_device::state::{DeviceConfig, NvState};
use hilrig_rig::Rig;
use serialport::SerialPort;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[test]
fn serial_console_and_oob_uart_on_ptys() {
    let d = tempfile::tempdir().unwrap();
    // The console: the test writes "boot output" on the PTY master.
    let (mut master, slave) = serialport::TTYPort::pair().unwrap();
    let con_path = slave.name().unwrap();
    // The OOB UART: a model served on a PTY, like `hilrig device serve-oob`.
    let state = d.path().join("dev.state");
    let mut m = Model::create(
        &state,
        NvState::factory(DeviceConfig::with_width(6), 77).unwrap(),
    )
    .unwrap();
    ops::unlock(&mut m).unwrap();
    ops::erase(&mut m, Region::Firmware).unwrap();
    let server = hilrig_device::oob::PtyServer::new().unwrap();
    let oob_path = server.path().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let t = std::thread::spawn(move || server.serve(&mut m, &|| st.load(Ordering::Relaxed)));

    let inv = d.path().join("lab.toml");
    std::fs::write(
        &inv,
        format!(
            "[[host]]\nname = \"hw-1\"\n[host.power]\ndriver = \"command\"\non = \"true\"\noff = \"true\"\nstatus = \"echo on\"\n\
             [[host.console]]\nname = \"com1\"\ndriver = \"serial\"\npath = \"{con_path}\"\n\
             [host.oob]\ndriver = \"serial\"\npath = \"{oob_path}\"\n"
        ),
    )
    .unwrap();
    let rig = Rig::load(&inv).unwrap();

    let caps = rig
        .start_captures("hw-1", &d.path().join("art"), "case-7")
        .unwrap();
    master
        .write_all(b"BIOS v1\r\nbooting kernel\r\npartial")
        .unwrap();
    master.flush().unwrap();
    // Let the bytes reach the capture before stopping: wait for them in the file.
    let p = caps[0].path().to_path_buf();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&p)
        .unwrap_or_default()
        .contains("booting kernel")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "console bytes never arrived"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let sums: Vec<_> = caps.into_iter().map(|c| c.stop().unwrap()).collect();
    assert!(sums[0].path.ends_with("case-7.com1.log"));
    let text = std::fs::read_to_string(&sums[0].path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].ends_with("] BIOS v1") && lines[1].ends_with("] booting kernel"),
        "{text}"
    );
    assert!(lines[2].ends_with("] partial"), "{text}");

    let c = rig.read_counters("hw-1").unwrap();
    assert_eq!((c.counters, c.master, c.width), ([0, 1, 0], 1, 6));
    let t2 = rig.check();
    assert!(t2.all_healthy(), "{t2}");

    stop.store(true, Ordering::Relaxed);
    t.join().unwrap().unwrap();
    drop(slave);
}

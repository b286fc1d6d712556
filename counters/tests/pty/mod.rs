//! What the PTY conformance tests share: the device under test, the suite's options,
//! a device's OOB port served on a PTY by a thread, and one run of the suite over it.
#![allow(dead_code)] // each test binary uses its own part

use hilrig_counters::conformance::{self, DeviceActuator, Options, Report, SerialTarget};
use hilrig_device::{Device, DeviceConfig, NvState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The serial number of every test device (its reset key derives from it).
pub const SERIAL: u64 = 0xc0f;

/// A factory-fresh device of counter width `width`.
pub fn nv(width: u8) -> NvState {
    NvState::factory(DeviceConfig::with_width(width), SERIAL).unwrap()
}

/// Every property: burn the fuse, with the device's reset key.
pub fn opts() -> Options {
    Options {
        burn_fuse: true,
        reset_key: Some(hilrig_device::state::dev_keys(SERIAL).1),
    }
}

/// The device's OOB port on a PTY, served by a thread until dropped.
pub struct PtyDevice {
    /// The path the suite opens.
    pub path: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for PtyDevice {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A new PTY pair whose master side (reads timing out after `read_timeout`) is
/// served by `body` on a thread until the stop flag it is given is set.
pub fn spawn_pty(
    read_timeout: Duration,
    body: impl FnOnce(serialport::TTYPort, &AtomicBool) + Send + 'static,
) -> PtyDevice {
    use serialport::SerialPort;
    let (mut master, slave) = serialport::TTYPort::pair().expect("a PTY pair");
    master.set_timeout(read_timeout).unwrap();
    let path = slave.name().expect("the PTY's path");
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let thread = std::thread::spawn(move || {
        let _slave = slave;
        body(master, &st)
    });
    PtyDevice {
        path,
        stop,
        thread: Some(thread),
    }
}

/// Run the suite over `pty`, attempts and resets made in-process on `dev`; prints
/// the report with how long it took under `label`.
pub fn run_suite(
    dev: Arc<Mutex<Box<dyn Device>>>,
    pty: &PtyDevice,
    timeout: Duration,
    o: &Options,
    label: &str,
) -> Report {
    let mut t = SerialTarget::with_actuator(
        &pty.path,
        115_200,
        timeout,
        Box::new(DeviceActuator { dev }),
    )
    .unwrap();
    let started = Instant::now();
    let r = conformance::run(&mut t, o);
    println!("{label}: {:?}\n{}", started.elapsed(), r.text());
    r
}

//! Simulated hosts: a `hilrig-vmm` process (the host's "power"), the device state
//! file (its nonvolatile memory), the VMM's COM1 output (its console) and the
//! device's OOB UART served on a PTY from the state file (its OOB port).
//!
//! Power on starts the VMM with an idle guest that prints a boot banner; power
//! off kills it (SIGKILL: volatile device state is lost, the state file keeps
//! counters and flash). Status is "the VMM process is alive". The work directory
//! of a host (`<workdir>/<host>/`) holds `device.state`, `console.log` (appended
//! across boots), `vmm.pid`, `vmm.stderr` and `power.want`, so a host powered on
//! by one `hilrig` invocation can be read and powered off by the next.
//!
//! A VMM that dies while the host should be on is an infrastructure fault naming
//! the host ([`SimHost::check_alive`], and every status readback).

use crate::error::RigError;
use crate::inventory::{HostSpec, Inventory};
use crate::power::{PowerBackend, PowerError, PowerState};
use hilrig_device::device::{Device, DeviceError};
use hilrig_device::model::Model;
use hilrig_device::state::DeviceConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use hilrig_guest::idle::{BOOT_BANNER, SCRATCH_MARK};

/// The idle guest ([`hilrig_guest::idle::idle`]) without boot counting.
pub fn idle_payload() -> Result<Vec<u8>, hilrig_guest::GuestError> {
    hilrig_guest::idle::idle(false)
}

/// Why the `hilrig-vmm` binary was not found, or not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FindVmmError {
    /// The inventory's `lab.vmm` names no file.
    #[error("lab.vmm {} does not exist", .0.display())]
    Configured(PathBuf),
    /// `HILRIG_VMM` names no file.
    #[error("HILRIG_VMM={} does not exist", .0.display())]
    Env(PathBuf),
    /// Neither beside the running executable nor configured.
    #[error(
        "neither hilrig nor hilrig-vmm beside {} (build it: cargo build --release; or set lab.vmm / HILRIG_VMM)",
        .0.display()
    )]
    NotFound(PathBuf),
    /// Found, but a user other than us or root could replace it (the file, or a
    /// directory above it or above where its links lead, is theirs or writable by
    /// them): the rig would run their program, as root where it runs as root.
    #[error(
        "refusing to run {}: {reason} (a build under a umask of 002 leaves group-writable directories: chmod g-w them, or set lab.vmm / HILRIG_VMM to a copy only you or root can change)",
        .path.display()
    )]
    Untrusted {
        /// The binary.
        path: PathBuf,
        /// Why (the file or directory and what is wrong with it).
        reason: String,
    },
}

/// Why the OOB PTY server of a state file could not be started.
#[derive(Debug, thiserror::Error)]
pub enum OobServeError {
    /// The PTY pair could not be created.
    #[error("creating the OOB PTY: {0}")]
    Pty(std::io::Error),
    /// The server thread could not be started.
    #[error("starting the OOB PTY thread: {0}")]
    Thread(std::io::Error),
}

/// For callers whose errors are still text (`?` in a function whose error is a `String`).
impl From<OobServeError> for String {
    fn from(e: OobServeError) -> String {
        e.to_string()
    }
}

/// Locate the `hilrig-vmm` binary: the inventory's `lab.vmm`, else `HILRIG_VMM`,
/// else beside the running executable ([`find_vmm_beside`]). Never `PATH` nor a
/// build directory: a directory a user can write there would have the rig run
/// their program. Whichever is found must pass
/// [`hilrig_device::secure::check_trusted_program`] (owned by us or root, not
/// group/other-writable, in directories only we or root can change); the path
/// returned has its symlinks resolved.
pub fn find_vmm(configured: Option<&Path>) -> Result<PathBuf, FindVmmError> {
    let exe = std::env::current_exe().map_err(|_| FindVmmError::NotFound(PathBuf::new()))?;
    find_vmm_beside(&exe, configured)
}

/// [`find_vmm`] for a program at `exe`: `configured` (`lab.vmm`), `HILRIG_VMM`,
/// `exe` itself when it is the `hilrig` binary (a VMM too: `hilrig vm run`), else
/// `hilrig-vmm` or `hilrig` beside it or one directory up (cargo's
/// `target/debug/deps` for tests). The first that exists is checked and used;
/// one that is not trusted is refused, not skipped.
pub fn find_vmm_beside(exe: &Path, configured: Option<&Path>) -> Result<PathBuf, FindVmmError> {
    let trusted = |p: &Path| {
        hilrig_device::secure::check_trusted_program(p).map_err(|e| FindVmmError::Untrusted {
            path: p.to_path_buf(),
            reason: e.to_string(),
        })
    };
    if let Some(p) = configured {
        return if p.is_file() {
            trusted(p)
        } else {
            Err(FindVmmError::Configured(p.to_path_buf()))
        };
    }
    if let Some(p) = std::env::var_os("HILRIG_VMM") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            trusted(&p)
        } else {
            Err(FindVmmError::Env(p))
        };
    }
    if exe.file_stem().and_then(|s| s.to_str()) == Some("hilrig") {
        return trusted(exe);
    }
    let mut candidates = Vec::new();
    if let Some(d) = exe.parent() {
        candidates.push(d.join("hilrig-vmm"));
        candidates.push(d.join("hilrig"));
        if let Some(u) = d.parent() {
            candidates.push(u.join("hilrig-vmm"));
            candidates.push(u.join("hilrig"));
        }
    }
    match candidates.into_iter().find(|p| p.is_file()) {
        Some(p) => trusted(&p),
        None => Err(FindVmmError::NotFound(
            exe.parent().unwrap_or(Path::new("/")).to_path_buf(),
        )),
    }
}

/// The arguments that make `vmm` (found by [`find_vmm`]) run a VM: `vm run` for the
/// `hilrig` binary, nothing for `hilrig-vmm`.
pub fn vmm_prefix(vmm: &Path) -> &'static [&'static str] {
    if vmm.file_stem().and_then(|s| s.to_str()) == Some("hilrig") {
        &["vm", "run"]
    } else {
        &[]
    }
}

/// VMM children started by this process, so they are reaped (a killed child is
/// otherwise a zombie that still looks alive) and their exit status is known.
fn children() -> &'static Mutex<HashMap<u32, Child>> {
    static C: OnceLock<Mutex<HashMap<u32, Child>>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Process start time (clock ticks since boot, field 22 of /proc/PID/stat) and
/// whether it is a zombie; None when there is no such process.
fn proc_stat(pid: u32) -> Option<(u64, bool)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.get(s.rfind(')')? + 2..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let zombie = fields.first().is_some_and(|st| *st == "Z" || *st == "X");
    let start = fields.get(19)?.parse().ok()?;
    Some((start, zombie))
}

/// One simulated host.
#[derive(Debug, Clone)]
pub struct SimHost {
    name: String,
    dir: PathBuf,
    state: PathBuf,
    device: String,
    payload: Option<String>,
    count_boot: bool,
    vmm_args: Vec<String>,
    max_on_s: u64,
    vcpus: u8,
    counter_width: u8,
    serial: u64,
    boot_timeout: Duration,
    vmm: Option<PathBuf>,
}

/// How a simulated host's VMM ended, if it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmState {
    /// Running, with this pid.
    Running(u32),
    /// Not running (never started, or powered off on purpose).
    Stopped,
    /// Died while the host should be on: the detail for the infra fault.
    Crashed(String),
}

impl SimHost {
    /// The simulated host for inventory host `spec`.
    pub fn new(inv: &Inventory, spec: &HostSpec) -> SimHost {
        let dir = inv.workdir().join(&spec.name);
        let state = match &spec.sim.state {
            Some(p) if p.is_absolute() => p.clone(),
            Some(p) => inv.base_dir().join(p),
            None => dir.join("device.state"),
        };
        let serial = spec.sim.serial.unwrap_or_else(|| {
            // A stable serial from the name when none is given.
            spec.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            })
        });
        SimHost {
            name: spec.name.clone(),
            dir,
            state,
            device: spec.device.clone(),
            payload: spec.sim.payload.clone(),
            count_boot: spec.sim.count_boot,
            vmm_args: spec.sim.vmm_args.clone(),
            max_on_s: spec.sim.max_on_s,
            vcpus: spec.sim.vcpus,
            counter_width: spec.sim.counter_width,
            serial,
            boot_timeout: Duration::from_secs_f64(spec.sim.boot_timeout_s.max(0.1)),
            vmm: inv.lab.vmm.as_ref().map(|p| {
                if p.is_absolute() {
                    p.clone()
                } else {
                    inv.base_dir().join(p)
                }
            }),
        }
    }

    /// `--jail <host dir>/jail` when the controller can jail its VMMs (root), so
    /// every simulated host's VMM runs jailed and unprivileged; else nothing
    /// (logged).
    fn jail_args(&self) -> Vec<std::ffi::OsString> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            tracing::warn!("{}: not root, the VMM runs without --jail", self.name);
            return Vec::new();
        }
        let jailable = self
            .device
            .parse::<hilrig_vmm_api::DeviceSpec>()
            .is_ok_and(|d| d.jailable());
        if !jailable {
            tracing::warn!("{}: device {} cannot be jailed", self.name, self.device);
            return Vec::new();
        }
        vec!["--jail".into(), self.file("jail").into_os_string()]
    }

    /// The control socket of this host's running VMM (status, pause, patch, teardown).
    pub fn control_path(&self) -> PathBuf {
        self.file("vmm.sock")
    }

    /// The `hilrig-vmm` binary this host would start.
    pub fn vmm_path(&self) -> Result<PathBuf, FindVmmError> {
        find_vmm(self.vmm.as_deref())
    }

    /// Host name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device state file.
    pub fn state_path(&self) -> &Path {
        &self.state
    }

    /// The device's OOB reset-key file (`STATE.reset-key`, 0600), written when the
    /// state file is made.
    pub fn reset_key_path(&self) -> PathBuf {
        hilrig_device::secure::reset_key_path(&self.state)
    }

    /// The console log (COM1 of every boot, appended).
    pub fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn infra(&self, detail: impl Into<String>) -> RigError {
        RigError::Infra {
            host: self.name.clone(),
            detail: detail.into(),
        }
    }

    /// Create the work directory, the console log and a factory-fresh state file
    /// (if missing). Idempotent.
    pub fn ensure(&self) -> Result<(), RigError> {
        // The work directory and the host's directory in it: ours alone (a
        // directory planted by another user under $TMPDIR is refused).
        if let Some(w) = self.dir.parent() {
            hilrig_device::secure::ensure_private_dir(w)?;
        }
        hilrig_device::secure::ensure_private_dir(&self.dir)?;
        if !self.state.exists() {
            // Factory-fresh: the factory VBIOS programmed (the VMM measures it), a
            // random OOB reset key (never derived from the serial) written first to
            // `STATE.reset-key` (0600, never replaced), as `hilrig device init` does;
            // enrolment hands it to the counters service.
            let mut nv = hilrig_fw::factory::device(
                DeviceConfig::with_width(self.counter_width),
                self.serial,
            )
            .map_err(|e| self.infra(format!("factory state: {e}")))?;
            nv.reset_key = hilrig_device::secure::random_key()
                .map_err(|e| self.infra(format!("random reset key: {e}")))?;
            let kf = self.reset_key_path();
            if kf.exists() {
                // A key file left from a state file removed by hand: a new device
                // gets a new key; the old one goes.
                std::fs::remove_file(&kf)
                    .map_err(|e| RigError::io(format!("removing {}", kf.display()), e))?;
            }
            hilrig_device::secure::write_reset_key_file(&kf, &nv.reset_key)?;
            Model::create(&self.state, nv)
                .map_err(|e| self.infra(format!("creating {}: {e}", self.state.display())))?;
        }
        let c = self.console_path();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&c)
            .map_err(|e| RigError::io(format!("creating {}", c.display()), e))?;
        Ok(())
    }

    fn pid_record(&self) -> Option<(u32, u64)> {
        let s = std::fs::read_to_string(self.file("vmm.pid")).ok()?;
        let mut it = s.split_whitespace();
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    }

    fn wants_on(&self) -> bool {
        std::fs::read_to_string(self.file("power.want")).is_ok_and(|s| s.trim() == "on")
    }

    fn set_want(&self, on: bool) -> Result<(), RigError> {
        let p = self.file("power.want");
        std::fs::write(&p, if on { "on\n" } else { "off\n" })
            .map_err(|e| RigError::io(format!("writing {}", p.display()), e))
    }

    fn stderr_tail(&self) -> String {
        let s = std::fs::read_to_string(self.file("vmm.stderr")).unwrap_or_default();
        let lines: Vec<&str> = s.lines().rev().take(4).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// Whether the VMM runs, and if not, whether that was unexpected.
    pub fn vmm_state(&self) -> VmmState {
        let Some((pid, start)) = self.pid_record() else {
            return if self.wants_on() {
                VmmState::Crashed("no VMM pid recorded although the host is on".into())
            } else {
                VmmState::Stopped
            };
        };
        let mut exit = None;
        {
            let mut ch = lock(children());
            if let Some(c) = ch.get_mut(&pid) {
                match c.try_wait() {
                    Ok(Some(st)) => {
                        exit = Some(st.to_string());
                        ch.remove(&pid);
                    }
                    Ok(None) => return VmmState::Running(pid),
                    Err(_) => {}
                }
            }
        }
        if exit.is_none() {
            if let Some((s, zombie)) = proc_stat(pid) {
                if s == start && !zombie {
                    return VmmState::Running(pid);
                }
            }
        }
        if self.wants_on() {
            VmmState::Crashed(format!(
                "the VMM (pid {pid}) exited unexpectedly{}; stderr: {}",
                exit.map(|e| format!(" ({e})")).unwrap_or_default(),
                self.stderr_tail()
            ))
        } else {
            VmmState::Stopped
        }
    }

    /// Infra fault if the host should be on but its VMM is gone.
    pub fn check_alive(&self) -> Result<(), RigError> {
        match self.vmm_state() {
            VmmState::Running(_) => Ok(()),
            VmmState::Stopped => Err(self.infra("powered off")),
            VmmState::Crashed(d) => Err(self.infra(d)),
        }
    }

    /// Start the VMM (no-op if it runs) and wait for the boot banner.
    pub fn power_on(&self) -> Result<(), RigError> {
        self.ensure()?;
        if let VmmState::Running(_) = self.vmm_state() {
            return Ok(());
        }
        let vmm = self.vmm_path().map_err(|e| self.infra(e.to_string()))?;
        let payload = match &self.payload {
            Some(p) => p.clone(),
            None => {
                let p = self.file("idle.bin");
                let code = hilrig_guest::idle::idle(self.count_boot)
                    .map_err(|e| self.infra(e.to_string()))?;
                std::fs::write(&p, code)
                    .map_err(|e| RigError::io(format!("writing {}", p.display()), e))?;
                p.to_string_lossy().into_owned()
            }
        };
        let console = self.console_path();
        let banner_from = std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console)
            .map_err(|e| RigError::io(format!("opening {}", console.display()), e))?;
        let errp = self.file("vmm.stderr");
        let err = std::fs::File::create(&errp)
            .map_err(|e| RigError::io(format!("creating {}", errp.display()), e))?;
        let mut cmd = Command::new(&vmm);
        cmd.args(vmm_prefix(&vmm))
            .arg("--payload")
            .arg(&payload)
            .arg("--device")
            .arg(&self.device)
            .arg("--device-state")
            .arg(&self.state)
            .arg("--vcpus")
            .arg(self.vcpus.to_string())
            .arg("--mem")
            .arg("16M")
            .arg("--timeout")
            .arg(format!("{}s", self.max_on_s))
            .arg("--control")
            .arg(self.control_path())
            .args(self.jail_args())
            .args(&self.vmm_args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        use std::os::unix::process::CommandExt;
        // Own process group: a Ctrl-C at the controller's terminal does not cut
        // the host's power; it outlives a CLI invocation like real hardware does.
        cmd.process_group(0);
        // SAFETY: nice(2) is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(|| {
                // The idle guest spins; keep it from starving the controller.
                libc::nice(10);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| self.infra(format!("starting {}: {e}", vmm.display())))?;
        let pid = child.id();
        let start = proc_stat(pid).map(|s| s.0).unwrap_or(0);
        lock(children()).insert(pid, child);
        let pidf = self.file("vmm.pid");
        std::fs::write(&pidf, format!("{pid} {start}\n"))
            .map_err(|e| RigError::io(format!("writing {}", pidf.display()), e))?;
        self.set_want(true)?;
        // Readback: the guest is running once its banner is on the console.
        let deadline = Instant::now() + self.boot_timeout;
        loop {
            if self.console_since(banner_from).contains(BOOT_BANNER) {
                return Ok(());
            }
            if let VmmState::Crashed(d) = self.vmm_state() {
                return Err(self.infra(format!("power on failed: {d}")));
            }
            if Instant::now() >= deadline {
                let _ = self.power_off();
                return Err(self.infra(format!(
                    "power on: no boot banner within {:?}; stderr: {}",
                    self.boot_timeout,
                    self.stderr_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Console bytes written since offset `from`.
    pub fn console_since(&self, from: u64) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.console_path()) {
            if f.seek(SeekFrom::Start(from)).is_ok() {
                let mut b = Vec::new();
                let _ = f.read_to_end(&mut b);
                s = String::from_utf8_lossy(&b).into_owned();
            }
        }
        s
    }

    /// Kill the VMM (SIGKILL) and wait until it is gone.
    pub fn power_off(&self) -> Result<(), RigError> {
        self.set_want(false)?;
        let Some((pid, start)) = self.pid_record() else {
            return Ok(());
        };
        let ours = lock(children()).remove(&pid);
        if let Some(mut c) = ours {
            let _ = c.kill();
            let _ = c.wait();
        } else if proc_stat(pid).is_some_and(|(s, z)| s == start && !z) {
            // SAFETY: kill(2) on a pid we recorded whose start time still matches.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while proc_stat(pid).is_some_and(|(s, z)| s == start && !z) {
                if Instant::now() > deadline {
                    return Err(self.infra(format!("VMM pid {pid} survives SIGKILL")));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = std::fs::remove_file(self.file("vmm.pid"));
        // Power is cut: the device's volatile data buffers are gone.
        hilrig_device::model::power_cycle_buffers(&self.state);
        Ok(())
    }

    /// Power state readback; a crashed VMM is an infrastructure fault.
    pub fn status(&self) -> Result<PowerState, RigError> {
        match self.vmm_state() {
            VmmState::Running(_) => Ok(PowerState::On),
            VmmState::Stopped => Ok(PowerState::Off),
            VmmState::Crashed(d) => Err(self.infra(d)),
        }
    }

    /// The PTY path of the device's OOB UART (served by a thread of this process
    /// from the state file; started on first use).
    pub fn oob_path(&self) -> Result<String, RigError> {
        self.ensure()?;
        serve_state_oob(&self.state).map_err(|e| self.infra(format!("OOB PTY: {e}")))
    }
}

/// The error without the host prefix ([`crate::power::Power`] adds it).
fn sim_detail(e: RigError) -> PowerError {
    PowerError::Sim(match e {
        RigError::Infra { detail, .. } => format!("infrastructure fault: {detail}"),
        e => e.to_string(),
    })
}

/// The simulated power driver.
pub struct SimPower(pub SimHost);

impl PowerBackend for SimPower {
    fn driver(&self) -> &'static str {
        "sim"
    }
    fn set(&mut self, state: PowerState) -> Result<(), PowerError> {
        match state {
            PowerState::On => self.0.power_on(),
            PowerState::Off => self.0.power_off(),
        }
        .map_err(sim_detail)
    }
    fn status(&mut self) -> Result<PowerState, PowerError> {
        self.0.status().map_err(sim_detail)
    }
    fn settle(&self) -> Duration {
        Duration::from_millis(200)
    }
    fn retries(&self) -> u32 {
        2
    }
}

/// A device whose only path is OOB, answered by the state file's current
/// contents: each request re-reads the file, so it sees what the running VMM
/// persisted (and serves while the host is off, as a real OOB UART on standby
/// power does). Reads take no lock; a PHYSICAL_RESET writes the file under its
/// [`hilrig_device::state::StateLock`], so while the host's VMM runs (and holds
/// the lock) it is refused with a BUSY error frame and nothing changes.
pub struct StateFileOob {
    path: PathBuf,
}

impl StateFileOob {
    /// Serve the device in `path`.
    pub fn new(path: &Path) -> StateFileOob {
        StateFileOob {
            path: path.to_path_buf(),
        }
    }
}

const OOB_ONLY: DeviceError = DeviceError::Unsupported {
    backend: "state-file OOB",
    what: "in-band access",
};

impl Device for StateFileOob {
    fn read_word(&mut self, _: u32, _: u8) -> Result<u32, DeviceError> {
        Err(OOB_ONLY)
    }
    fn write_word(&mut self, _: u32, _: u32, _: u8) -> Result<(), DeviceError> {
        Err(OOB_ONLY)
    }
    fn rom_size(&self) -> u64 {
        0
    }
    fn rom_read(&mut self, _: u64, _: &mut [u8]) -> Result<(), DeviceError> {
        Err(OOB_ONLY)
    }
    fn reset(&mut self, _: hilrig_device::device::ResetKind) -> Result<(), DeviceError> {
        Err(OOB_ONLY)
    }
    fn oob(&mut self, request: &[u8]) -> Result<Vec<u8>, DeviceError> {
        // Reads load the file's current contents without a lock (the VMM holding it
        // only ever replaces it whole); a PHYSICAL_RESET is answered under the state
        // file's lock, and refused with a BUSY error frame while the VMM holds it.
        let mut open =
            |p: &Path| -> Result<Box<dyn Device>, DeviceError> { Ok(Box::new(Model::open(p)?)) };
        hilrig_device::oob::serve_state_request(&self.path, &mut open, request)
    }
}

struct OobServer {
    path: String,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

fn oob_servers() -> &'static Mutex<HashMap<PathBuf, OobServer>> {
    static S: OnceLock<Mutex<HashMap<PathBuf, OobServer>>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Serve the OOB port of the device in state file `state` on a PTY (one per state
/// file per process); returns the PTY path to open as a serial port.
pub fn serve_state_oob(state: &Path) -> Result<String, OobServeError> {
    let mut servers = lock(oob_servers());
    if let Some(s) = servers.get(state) {
        if !s.thread.is_finished() {
            return Ok(s.path.clone());
        }
    }
    let server = hilrig_device::oob::PtyServer::new().map_err(OobServeError::Pty)?;
    let path = server.path().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let mut dev = StateFileOob::new(state);
    let name = state.display().to_string();
    let thread = std::thread::Builder::new()
        .name("sim-oob".into())
        .spawn(move || {
            if let Err(e) = server.serve(&mut dev, &|| st.load(Ordering::Relaxed)) {
                tracing::error!("OOB PTY server for {name} stopped: {e}");
            }
        })
        .map_err(OobServeError::Thread)?;
    servers.insert(
        state.to_path_buf(),
        OobServer {
            path: path.clone(),
            stop,
            thread,
        },
    );
    Ok(path)
}

/// Stop the OOB PTY server of `state`, if this process runs one.
pub fn stop_state_oob(state: &Path) {
    if let Some(s) = lock(oob_servers()).remove(state) {
        s.stop.store(true, Ordering::Relaxed);
        let _ = s.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_payload_assembles() {
        let p = idle_payload().expect("assembles");
        assert!(!p.is_empty() && p.len() < 400);
    }
}

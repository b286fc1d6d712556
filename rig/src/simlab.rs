//! Simulated hosts that are real hosts on loopback, for tests and benchmarks:
//! `scripts/sim-lab` starts per host an sshd on 127.0.0.(10+i) with its own host
//! key, user (group kvm), authorized key and work directory, and writes an
//! inventory (`sim-ssh.toml`: the SSH hosts and one local simulated host).
//! [`SimLab::start`] runs it on a free port; dropping the lab stops the sshds and
//! removes the users.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running simulated SSH lab.
#[derive(Debug)]
pub struct SimLab {
    dir: tempfile::TempDir,
    script: PathBuf,
    /// The generated inventory.
    pub inventory: PathBuf,
    /// The sshds' port.
    pub port: u16,
}

/// Why a lab could not be started. [`LabError::Skipped`] means the machine cannot
/// host one (not root, no sshd): tests print it as `SKIPPED: ...`.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// This machine cannot run the lab.
    #[error("{0}")]
    Skipped(String),
    /// The script failed.
    #[error("scripts/sim-lab failed: {0}")]
    Failed(String),
}

/// The workspace's `scripts/sim-lab`.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("sim-lab")
}

/// The `hilrig` build the hosts run their devices with: the VMM when it is
/// `hilrig`, else `hilrig` beside it (none: the lab's hosts have no devices).
fn device_build() -> Option<PathBuf> {
    crate::sim::find_vmm(None).ok().and_then(|v| {
        if v.file_stem().and_then(|s| s.to_str()) == Some("hilrig") {
            return Some(v);
        }
        let beside = v.with_file_name("hilrig");
        beside.is_file().then_some(beside)
    })
}

/// A TCP port free (when asked) on the loopback address `ip`: the kernel's pick
/// for a listener bound to port 0, closed again. Labs and tests start their
/// servers on it.
pub fn free_port_on(ip: &str) -> std::io::Result<u16> {
    std::net::TcpListener::bind((ip, 0))?
        .local_addr()
        .map(|a| a.port())
}

/// A TCP port free on 127.0.0.11.
fn free_port() -> Result<u16, LabError> {
    free_port_on("127.0.0.11")
        .map_err(|e| LabError::Skipped(format!("cannot bind 127.0.0.11: {e}")))
}

impl SimLab {
    /// Start `n` SSH hosts (`sim-ssh-1..n`, tags sim, ssh, model) plus the local
    /// simulated host `local-1`.
    pub fn start(n: usize) -> Result<SimLab, LabError> {
        SimLab::start_with_build(n, None)
    }

    /// [`SimLab::start`], every host sharing one root-owned copy of `build` as
    /// its `hilrig` (`SIM_LAB_BUILD`: many hosts without a copy each).
    pub fn start_with_build(n: usize, build: Option<&Path>) -> Result<SimLab, LabError> {
        SimLab::start_with(n, build, device_build().as_deref())
    }

    /// [`SimLab::start`], each SSH host with a board too (`SIM_LAB_FPGA=1`):
    /// `hilrig fpga serve-sim` run there as the host's user, its bridge PTY on
    /// the host, its OOB PTY linked for the controller, the inventory's
    /// `device = "fpga=PORT,oob=PORT"` and tag `fpga`. Skipped without a
    /// `hilrig` build to run it.
    pub fn start_with_fpga(n: usize) -> Result<SimLab, LabError> {
        let Some(device) = device_build() else {
            return Err(LabError::Skipped(
                "no `hilrig` build for the hosts' boards (cargo build -p hilrig)".into(),
            ));
        };
        SimLab::start_inner(n, None, Some(&device), true)
    }

    /// [`SimLab::start_with_build`]; `device`: the `hilrig` build each host runs
    /// its own device with (`SIM_LAB_DEVICE`: a state file in its work
    /// directory, `hilrig device serve-oob` on it as the OOB port, a console
    /// line), so the inventory gets `[host.oob]` and `[[host.console]]` through
    /// the rig's serial drivers.
    pub fn start_with(
        n: usize,
        build: Option<&Path>,
        device: Option<&Path>,
    ) -> Result<SimLab, LabError> {
        SimLab::start_inner(n, build, device, false)
    }

    fn start_inner(
        n: usize,
        build: Option<&Path>,
        device: Option<&Path>,
        fpga: bool,
    ) -> Result<SimLab, LabError> {
        let script = script();
        if !script.is_file() {
            return Err(LabError::Skipped(format!("{} not found", script.display())));
        }
        let dir = tempfile::Builder::new()
            .prefix("hilrig-simlab-")
            .tempdir()
            .map_err(|e| LabError::Failed(format!("temporary directory: {e}")))?;
        let port = free_port()?;
        let mut c = Command::new(&script);
        if let Some(b) = build {
            c.env("SIM_LAB_BUILD", b);
        }
        if let Some(d) = device {
            c.env("SIM_LAB_DEVICE", d);
        }
        if fpga {
            c.env("SIM_LAB_FPGA", "1");
        }
        let out = c
            .arg("start")
            .arg(dir.path())
            .arg(n.to_string())
            .arg(port.to_string())
            .output()
            .map_err(|e| LabError::Failed(format!("running {}: {e}", script.display())))?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        match out.status.code() {
            Some(0) => {}
            Some(77) => return Err(LabError::Skipped(stderr)),
            _ => return Err(LabError::Failed(format!("{}: {stderr}", out.status))),
        }
        Ok(SimLab {
            inventory: dir.path().join("sim-ssh.toml"),
            dir,
            script,
            port,
        })
    }

    /// The lab's directory (keys, known_hosts, sshd configs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `scripts/sim-lab CMD DIR I WHAT` on host `i` (e.g. `power`, `1`, `off`;
    /// `fault`, `1`, `hang`): whether it succeeded.
    pub fn host(&self, cmd: &str, i: usize, what: &str) -> bool {
        Command::new(&self.script)
            .arg(cmd)
            .arg(self.dir.path())
            .arg(i.to_string())
            .arg(what)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for SimLab {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

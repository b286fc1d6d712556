//! The rig: an inventory turned into drivers, health checks, OOB access and
//! console captures. Simulation and hardware share everything above the driver.

use crate::board::Board;
use crate::console::{Capture, Source};
use crate::error::RigError;
use crate::inventory::{BoardSpec, ConsoleDriver, HostSpec, Inventory, OobSpec, PowerSpec};
use crate::power::command::{CommandConfig, CommandPower};
use crate::power::pdudaemon::{PdudaemonConfig, PdudaemonPower};
use crate::power::relay::RelayPower;
use crate::power::{Power, PowerState};
use crate::sim::{SimHost, SimPower};
use hilrig_device::oob::{CounterReport, Request, Response};

/// Why a simulated host could not be powered on (a health probe's detail).
#[derive(Debug, thiserror::Error)]
enum SimNotReady {
    #[error("/dev/kvm: {0}")]
    Kvm(std::io::Error),
    #[error("{0}")]
    Host(#[from] Box<RigError>),
    #[error(transparent)]
    Vmm(#[from] crate::sim::FindVmmError),
}
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The rig controller's view of a lab.
#[derive(Debug, Clone)]
pub struct Rig {
    /// The inventory.
    pub inv: Inventory,
    /// Lease enforcement on power, console and OOB actions (none: not enforced).
    guard: Option<std::sync::Arc<crate::lease::LeaseGuard>>,
}

impl Rig {
    /// A rig over a validated inventory.
    pub fn new(inv: Inventory) -> Rig {
        Rig { inv, guard: None }
    }

    /// Enforce leases: power, console and OOB actions on a host leased by someone
    /// other than `guard.holder` are refused (unless forced with a reason).
    pub fn with_leases(mut self, guard: crate::lease::LeaseGuard) -> Rig {
        self.guard = Some(std::sync::Arc::new(guard));
        self
    }

    fn guard(&self, host: &str, what: &str) -> Result<(), RigError> {
        match &self.guard {
            Some(g) => g.check(host, what),
            None => Ok(()),
        }
    }

    /// Load an inventory file.
    pub fn load(path: &Path) -> Result<Rig, RigError> {
        Ok(Rig::new(Inventory::load(path)?))
    }

    /// The inventory entry of `host`.
    pub fn host(&self, host: &str) -> Result<&HostSpec, RigError> {
        self.inv.host(host)
    }

    /// The simulated host behind `host` (any host may be simulated this way; its
    /// `sim` drivers use it).
    pub fn sim(&self, host: &str) -> Result<SimHost, RigError> {
        Ok(SimHost::new(&self.inv, self.host(host)?))
    }

    /// The power driver of `host`, with readback.
    pub fn power(&self, host: &str) -> Result<Power, RigError> {
        let h = self.host(host)?;
        self.guard(host, "power")?;
        let ms = Duration::from_millis;
        let bad = |e: crate::power::DriverConfigError| {
            RigError::driver(
                host,
                &format!("power/{}", h.power.driver_name()),
                e.to_string(),
            )
        };
        let backend: Box<dyn crate::power::PowerBackend> = match &h.power {
            PowerSpec::Sim {} => Box::new(SimPower(self.sim(host)?)),
            PowerSpec::SerialRelay {
                port,
                channel,
                baud,
                timeout_ms,
                retries,
            } => Box::new(RelayPower::new(
                port,
                *channel,
                *baud,
                ms(*timeout_ms),
                *retries,
            )),
            PowerSpec::Pdudaemon {
                url,
                pdu,
                port,
                delay,
                status_command,
                on_pattern,
                off_pattern,
                timeout_ms,
                settle_ms,
                retries,
            } => Box::new(
                PdudaemonPower::new(
                    host,
                    PdudaemonConfig {
                        url: url.clone(),
                        pdu: pdu.clone(),
                        port: port.clone(),
                        delay: *delay,
                        status_command: status_command.clone(),
                        on_pattern: on_pattern.clone(),
                        off_pattern: off_pattern.clone(),
                        timeout: ms(*timeout_ms),
                        settle: ms(*settle_ms),
                        retries: *retries,
                    },
                )
                .map_err(bad)?,
            ),
            PowerSpec::Command {
                on,
                off,
                status,
                cycle,
                soft_reset,
                hard_reset,
                port,
                on_pattern,
                off_pattern,
                timeout_ms,
                settle_ms,
                retries,
            } => Box::new(
                CommandPower::new(
                    host,
                    CommandConfig {
                        on: on.clone(),
                        off: off.clone(),
                        status: status.clone(),
                        cycle: cycle.clone(),
                        soft_reset: soft_reset.clone(),
                        hard_reset: hard_reset.clone(),
                        port: port.clone(),
                        on_pattern: on_pattern.clone(),
                        off_pattern: off_pattern.clone(),
                        timeout: ms(*timeout_ms),
                        settle: ms(*settle_ms),
                        retries: *retries,
                    },
                )
                .map_err(bad)?,
            ),
        };
        Ok(Power::new(host, backend))
    }

    /// The serial path, baud and timeout of `host`'s OOB port (for a simulated
    /// host, a PTY served by this process from the state file).
    pub fn oob_port(&self, host: &str) -> Result<(String, u32, Duration), RigError> {
        match &self.host(host)?.oob {
            None => Err(RigError::Unsupported {
                host: host.into(),
                driver: "oob".into(),
                detail: "no [host.oob] in the inventory".into(),
            }),
            Some(OobSpec::Sim {}) => Ok((
                self.sim(host)?.oob_path()?,
                hilrig_device::oob::DEFAULT_BAUD,
                Duration::from_secs(2),
            )),
            Some(OobSpec::Serial {
                path,
                baud,
                timeout_ms,
            }) => Ok((path.clone(), *baud, Duration::from_millis(*timeout_ms))),
            // Not a device path: `oob_request` connects it (RFC 2217).
            Some(OobSpec::Rfc2217 {
                host: h,
                port,
                baud,
                timeout_ms,
                ..
            }) => Ok((
                format!("rfc2217://{h}:{port}"),
                *baud,
                Duration::from_millis(*timeout_ms),
            )),
        }
    }

    fn oob_label(&self, host: &str) -> String {
        match self.inv.host(host).ok().and_then(|h| h.oob.as_ref()) {
            Some(o) => crate::oob::label(o).into(),
            None => "oob/serial".into(),
        }
    }

    /// Open `host`'s OOB port through its OOB driver (serial, RFC 2217 or raw
    /// TCP; a simulated host's PTY served from its state file): a counters
    /// source whose transport faults are the driver's errors (INFRA).
    pub fn open_oob(&self, host: &str) -> Result<crate::oob::OobPort, RigError> {
        self.guard(host, "oob")?;
        match &self.host(host)?.oob {
            Some(OobSpec::Sim {}) => {
                let (path, baud, timeout) = self.oob_port(host)?;
                crate::oob::OobPort::open_serial(host, &path, baud, timeout)
            }
            Some(spec) => crate::oob::OobPort::open(host, spec),
            None => Err(RigError::Unsupported {
                host: host.into(),
                driver: "oob".into(),
                detail: "no [host.oob] in the inventory".into(),
            }),
        }
    }

    /// One OOB request to `host`'s device, through its OOB driver.
    pub fn oob_request(&self, host: &str, req: &Request) -> Result<Response, RigError> {
        self.open_oob(host)?.send(req)
    }

    /// Read `host`'s counters out of band.
    pub fn read_counters(&self, host: &str) -> Result<CounterReport, RigError> {
        match self.oob_request(host, &Request::ReadCounters)? {
            Response::Counters(c) => Ok(c),
            other => Err(RigError::driver(
                host,
                &self.oob_label(host),
                format!("READ_COUNTERS answered with {other:?}"),
            )),
        }
    }

    /// IDENTIFY `host`'s device: (id, version, serial, width).
    pub fn identify(&self, host: &str) -> Result<(u32, u32, u64, u8), RigError> {
        match self.oob_request(host, &Request::Identify)? {
            Response::Identity {
                id,
                version,
                serial,
                width,
            } => Ok((id, version, serial, width)),
            other => Err(RigError::driver(
                host,
                &self.oob_label(host),
                format!("IDENTIFY answered with {other:?}"),
            )),
        }
    }

    /// Where console `console` of `host` reads from.
    pub fn console_source(&self, host: &str, console: &str) -> Result<Source, RigError> {
        self.guard(host, "console")?;
        let h = self.host(host)?;
        let c = h
            .consoles
            .iter()
            .find(|c| c.name == console)
            .ok_or_else(|| RigError::Unsupported {
                host: host.into(),
                driver: format!("console/{console}"),
                detail: format!(
                    "no such console (have: {})",
                    h.consoles
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        match c.driver.source() {
            Some(src) => Ok(src),
            None => {
                let s = self.sim(host)?;
                s.ensure()?;
                Ok(Source::Tail(s.console_path()))
            }
        }
    }

    /// Start capturing every console of `host` into `dir/<case>.<console>.log`
    /// (`dir` created 0700 if missing; refused if someone else owns it or
    /// group/other can write it).
    /// Call before powering the host on.
    pub fn start_captures(
        &self,
        host: &str,
        dir: &Path,
        case: &str,
    ) -> Result<Vec<Capture>, RigError> {
        // Captures are created in a directory only we can write into (0700 if new;
        // an existing one must be ours and not group/other-writable).
        hilrig_device::secure::ensure_private_dir(dir)?;
        let mut caps = Vec::new();
        for c in &self.host(host)?.consoles {
            let path: PathBuf = dir.join(format!("{case}.{}.log", c.name));
            let src = self.console_source(host, &c.name)?;
            caps.push(Capture::start(host, &c.name, src, &path)?);
        }
        Ok(caps)
    }

    /// The board of `host`, if it has one.
    pub fn board(&self, host: &str) -> Result<Option<Board>, RigError> {
        Ok(match &self.host(host)?.board {
            None | Some(BoardSpec::None {}) => None,
            Some(BoardSpec::ProbeRs { chip, probe, image }) => Some(Board {
                host: host.into(),
                chip: chip.clone(),
                probe: probe.clone(),
                image: image.as_ref().map(|p| {
                    if p.is_absolute() {
                        p.clone()
                    } else {
                        self.inv.base_dir().join(p)
                    }
                }),
            }),
        })
    }

    /// Lease a host for work: the first host carrying `tags` that `health` found
    /// healthy and nobody holds. Unhealthy hosts are never handed out. `None`
    /// when every candidate is busy.
    pub fn lease_host<S: AsRef<str>>(
        &self,
        health: &HealthTable,
        tags: &[S],
        store: &crate::lease::LeaseStore,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<crate::lease::Lease>, RigError> {
        let candidates: Vec<&str> = self
            .inv
            .select(tags)
            .into_iter()
            .map(|h| h.name.as_str())
            .filter(|h| health.is_healthy(h))
            .collect();
        if candidates.is_empty() {
            return Ok(None);
        }
        store.acquire_any(&candidates, holder, ttl)
    }

    /// Probe every driver of every host (in parallel, one thread per host).
    pub fn check(&self) -> HealthTable {
        let rows = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .inv
                .hosts
                .iter()
                .map(|h| s.spawn(move || self.check_host(&h.name)))
                .collect();
            handles
                .into_iter()
                .zip(&self.inv.hosts)
                .map(|(t, h)| {
                    t.join().unwrap_or_else(|_| HostHealth {
                        host: h.name.clone(),
                        probes: vec![Probe::bad("check", "-", "the probe thread panicked")],
                    })
                })
                .collect()
        });
        HealthTable { rows }
    }

    /// Probe every driver of one host.
    pub fn check_host(&self, host: &str) -> HostHealth {
        let Ok(h) = self.host(host) else {
            return HostHealth {
                host: host.into(),
                probes: vec![Probe::bad("inventory", "-", "no such host")],
            };
        };
        let mut probes = Vec::new();
        let pd = h.power.driver_name();
        let sim_ready = || -> Result<String, SimNotReady> {
            // A simulated host can only be powered on with KVM and the VMM binary.
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .map_err(SimNotReady::Kvm)?;
            let vmm = self.sim(host).map_err(Box::new)?.vmm_path()?;
            Ok(format!("; vmm {}", vmm.display()))
        };
        probes.push(match self.power(host).and_then(|mut p| p.status()) {
            Ok(s) => match &h.power {
                PowerSpec::Sim {} => match sim_ready() {
                    Ok(extra) => Probe::ok("power", pd, format!("reads back {s}{extra}")),
                    Err(e) => {
                        Probe::bad("power", pd, format!("reads back {s}, cannot power on: {e}"))
                    }
                },
                _ => Probe::ok("power", pd, format!("reads back {s}")),
            },
            Err(e) => Probe::bad("power", pd, e.to_string()),
        });
        for c in &h.consoles {
            let what = format!("console/{}", c.name);
            let drv = match c.driver {
                ConsoleDriver::Sim {} => "sim",
                ConsoleDriver::Serial { .. } => "serial",
                ConsoleDriver::Rfc2217 { .. } => "rfc2217",
            };
            let r = self
                .console_source(host, &c.name)
                .and_then(|src| match src {
                    Source::Serial { path, baud } => serialport::new(&path, baud)
                        .timeout(Duration::from_millis(20))
                        .open()
                        .map(|_| format!("{path} opens"))
                        .map_err(|e| {
                            RigError::driver(host, &what, format!("cannot open {path}: {e}"))
                        }),
                    Source::Net {
                        host: h,
                        port,
                        baud,
                        raw,
                    } => crate::rfc2217::NetSerialPort::connect(
                        &h,
                        port,
                        if raw {
                            crate::rfc2217::Protocol::Raw
                        } else {
                            crate::rfc2217::Protocol::Rfc2217
                        },
                        crate::rfc2217::LineSettings::n81(baud),
                        Duration::from_secs(5),
                    )
                    .map(|p| format!("{} connects at {baud} 8N1", p.addr()))
                    .map_err(|e| RigError::driver(host, &what, e.to_string())),
                    Source::Tail(p) => std::fs::File::open(&p)
                        .map(|_| format!("{} opens", p.display()))
                        .map_err(|e| {
                            RigError::driver(host, &what, format!("{}: {e}", p.display()))
                        }),
                });
            probes.push(match r {
                Ok(d) => Probe::ok(&what, drv, d),
                Err(e) => Probe::bad(&what, drv, e.to_string()),
            });
        }
        if let Some(o) = &h.oob {
            let drv = match o {
                OobSpec::Sim {} => "sim",
                OobSpec::Serial { .. } => "serial",
                OobSpec::Rfc2217 { .. } => "rfc2217",
            };
            probes.push(match self.identify(host) {
                Ok((id, version, serial, width)) => Probe::ok(
                    "oob",
                    drv,
                    format!("IDENTIFY: id {id:#010x} version {version:#010x} serial {serial} width {width}"),
                ),
                Err(e) => Probe::bad("oob", drv, e.to_string()),
            });
        }
        if h.ssh.is_some() {
            // The transport: SSH reachable with the pinned key, and which build runs there.
            let r = crate::remote::Remote::of(h).and_then(|r| match r {
                crate::remote::Remote::Ssh(ssh) => {
                    let path = ssh.spec().hilrig_path();
                    ssh.sh(
                        &format!(
                            "{} --version 2>/dev/null || echo 'no hilrig build yet (the runner copies it)'",
                            crate::remote::shell_quote(&path)
                        ),
                        None,
                    )
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                    .map_err(|e| e.into_rig(host))
                }
                crate::remote::Remote::Local => Ok(String::new()),
            });
            probes.push(match r {
                Ok(v) => Probe::ok("transport", "ssh", format!("reachable; {v}")),
                Err(e) => Probe::bad("transport", "ssh", e.to_string()),
            });
        }
        match self.board(host) {
            Ok(None) => {}
            Ok(Some(b)) => probes.push(match b.probe() {
                Ok(d) => Probe::ok("board", "probe-rs", d),
                Err(e) => Probe::bad("board", "probe-rs", e.to_string()),
            }),
            Err(e) => probes.push(Probe::bad("board", "-", e.to_string())),
        }
        HostHealth {
            host: host.into(),
            probes,
        }
    }
}

/// Check an inventory: probe every driver of every host.
pub fn check(inv: &Inventory) -> HealthTable {
    Rig::new(inv.clone()).check()
}

/// One driver probe.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    /// What was probed (`power`, `console/com1`, `oob`, `board`).
    pub what: String,
    /// The driver.
    pub driver: String,
    /// Healthy.
    pub ok: bool,
    /// What the probe saw.
    pub detail: String,
}

impl Probe {
    /// A passed probe.
    pub fn ok(what: &str, driver: &str, detail: impl Into<String>) -> Probe {
        Probe {
            what: what.into(),
            driver: driver.into(),
            ok: true,
            detail: detail.into(),
        }
    }
    /// A failed probe.
    pub fn bad(what: &str, driver: &str, detail: impl Into<String>) -> Probe {
        Probe {
            ok: false,
            ..Probe::ok(what, driver, detail)
        }
    }
}

/// Probes of one host.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostHealth {
    /// The host.
    pub host: String,
    /// Its probes.
    pub probes: Vec<Probe>,
}

impl HostHealth {
    /// Every probe passed.
    pub fn healthy(&self) -> bool {
        self.probes.iter().all(|p| p.ok)
    }
}

/// The result of [`Rig::check`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct HealthTable {
    /// One row per host, inventory order.
    pub rows: Vec<HostHealth>,
}

impl HealthTable {
    /// Hosts that may be given work.
    pub fn healthy_hosts(&self) -> Vec<&str> {
        self.rows
            .iter()
            .filter(|r| r.healthy())
            .map(|r| r.host.as_str())
            .collect()
    }

    /// True when every host is healthy.
    pub fn all_healthy(&self) -> bool {
        self.rows.iter().all(HostHealth::healthy)
    }

    /// Whether `host` is healthy (false for unknown hosts).
    pub fn is_healthy(&self, host: &str) -> bool {
        self.rows.iter().any(|r| r.host == host && r.healthy())
    }
}

impl std::fmt::Display for HealthTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hw = self
            .rows
            .iter()
            .map(|r| r.host.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let ww = self
            .rows
            .iter()
            .flat_map(|r| r.probes.iter().map(|p| p.what.len() + p.driver.len() + 1))
            .max()
            .unwrap_or(6)
            .max(6);
        writeln!(
            f,
            "{:hw$}  {:9}  {:ww$}  detail",
            "host", "health", "driver"
        )?;
        for r in &self.rows {
            let verdict = if r.healthy() { "HEALTHY" } else { "UNHEALTHY" };
            for (i, p) in r.probes.iter().enumerate() {
                let (h, v) = if i == 0 {
                    (r.host.as_str(), verdict)
                } else {
                    ("", "")
                };
                let d = format!("{}/{}", p.what, p.driver);
                let mark = if p.ok { "ok  " } else { "FAIL" };
                writeln!(f, "{h:hw$}  {v:9}  {d:ww$}  {mark} {}", p.detail)?;
            }
        }
        let healthy = self.healthy_hosts().len();
        write!(f, "{healthy}/{} hosts healthy", self.rows.len())
    }
}

/// Power `host` to `state` (a convenience for the CLI).
pub fn set_power(rig: &Rig, host: &str, state: PowerState) -> Result<(), RigError> {
    rig.power(host)?.set(state)
}

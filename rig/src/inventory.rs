//! The lab's wiring: which hosts exist, their tags, and how each one's power,
//! consoles, OOB port and board are reached. Campaigns never name wiring; they
//! select hosts by tag ([`Inventory::select`]).

use crate::error::{InvalidField, RigError};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A parsed, validated inventory.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// The file it came from (errors name it).
    pub file: PathBuf,
    /// Lab-wide settings.
    pub lab: LabSpec,
    /// Hosts, in file order.
    pub hosts: Vec<HostSpec>,
    /// `[counters]`: the counters service leases consult, and whom to page.
    pub counters: Option<CountersSpec>,
}

/// `[counters]`: the counters attestation service of the lab. With it, `rig lease
/// acquire` verifies a host's device out of band and refuses a device that is not
/// trusted; `page`/`webhook` say whom `hilrig counters remediate` pages for a
/// locked device. Relative paths are relative to the inventory file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountersSpec {
    /// The database: a SQLite path or a postgresql:// URL.
    pub db: String,
    /// The MAC key file.
    pub key: PathBuf,
    /// The anchor (file, `sqlite:PATH` or URL).
    #[serde(default)]
    pub anchor: Option<String>,
    /// A command run to page a human (argv; the page as JSON on its standard input).
    #[serde(default)]
    pub page: Vec<String>,
    /// A webhook URL (http://) POSTed the page as JSON, signed with `webhook_key`.
    #[serde(default)]
    pub webhook: Option<String>,
    /// The webhook's HMAC key file.
    #[serde(default)]
    pub webhook_key: Option<PathBuf>,
}

impl CountersSpec {
    /// Whom a refused locked or quarantined device is paged to: the `page` command
    /// (it wins over a `webhook`), or the `webhook` with its `webhook_key` (a
    /// webhook without its key, or a key others can read, is an error); `None` if
    /// neither is set. Shared by rig leases and the campaign gate.
    pub fn pager(&self) -> Result<Option<hilrig_counters::remediate::Pager>, RigError> {
        use hilrig_counters::remediate::{load_webhook_key, Pager};
        match (&self.page, &self.webhook, &self.webhook_key) {
            (argv, _, _) if !argv.is_empty() => Ok(Some(Pager::Command(argv.clone()))),
            (_, Some(url), Some(k)) => Ok(Some(Pager::Webhook {
                url: url.clone(),
                key: load_webhook_key(k).map_err(|e| RigError::Inventory {
                    file: k.clone(),
                    host: None,
                    driver: Some("[counters] webhook_key".into()),
                    detail: e.to_string(),
                })?,
            })),
            (_, Some(_), None) => Err(RigError::Inventory {
                file: self.key.clone(),
                host: None,
                driver: Some("[counters]".into()),
                detail: "a webhook needs its webhook_key".into(),
            }),
            _ => Ok(None),
        }
    }
}

/// `[lab]`: settings shared by all hosts.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabSpec {
    /// Lab name (shown in reports).
    #[serde(default)]
    pub name: Option<String>,
    /// Work directory of simulated hosts (state files, console logs, pid files);
    /// relative paths are relative to the inventory file. Default: the system
    /// temporary directory + `hilrig-rig`.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// Path of the `hilrig-vmm` binary for simulated hosts. Default: `HILRIG_VMM`,
    /// then `hilrig-vmm` next to the running executable (or its parent directory),
    /// then the workspace's target/{debug,release}, then `PATH`.
    #[serde(default)]
    pub vmm: Option<PathBuf>,
}

/// One `[[host]]`.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// Unique name.
    pub name: String,
    /// Tags campaigns select on (e.g. `sim`, `fpga`, `x86`).
    pub tags: BTreeSet<String>,
    /// Device backend the host's VMM is started with (`model`, `rtl`, `vfio=...`).
    pub device: String,
    /// Simulated-host settings (used by `sim` drivers).
    pub sim: SimSpec,
    /// The power driver.
    pub power: PowerSpec,
    /// Consoles, in file order (several allowed).
    pub consoles: Vec<ConsoleSpec>,
    /// The device's OOB port.
    pub oob: Option<OobSpec>,
    /// The FPGA/MCU board, if any.
    pub board: Option<BoardSpec>,
    /// `[host.ssh]`: the host is reached over SSH (else it is this machine, `local`).
    pub ssh: Option<crate::remote::SshSpec>,
}

impl HostSpec {
    /// True when any driver of the host is the simulated one.
    pub fn is_sim(&self) -> bool {
        matches!(self.power, PowerSpec::Sim {})
            || self
                .consoles
                .iter()
                .any(|c| matches!(c.driver, ConsoleDriver::Sim {}))
            || matches!(self.oob, Some(OobSpec::Sim {}))
    }

    /// True when the host carries every tag in `tags`.
    pub fn has_tags<S: AsRef<str>>(&self, tags: &[S]) -> bool {
        tags.iter().all(|t| self.tags.contains(t.as_ref()))
    }
}

/// `[host.sim]`: the simulated host's device and guest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimSpec {
    /// Device state file; default `<workdir>/<host>/device.state` (created
    /// factory-fresh on first use).
    #[serde(default)]
    pub state: Option<PathBuf>,
    /// Counter width of a factory-fresh device.
    #[serde(default = "default_width")]
    pub counter_width: u8,
    /// Serial number of a factory-fresh device.
    #[serde(default)]
    pub serial: Option<u64>,
    /// Guest payload the VMM idles in (a built-in name or a file). Default: the
    /// rig's idle payload, which prints a boot banner and then spins on `pause`.
    #[serde(default)]
    pub payload: Option<String>,
    /// The idle payload makes one (refused, counted) CONFIG erase attempt per boot,
    /// so boots show in the counters (for tests of counter persistence).
    #[serde(default)]
    pub count_boot: bool,
    /// Extra `hilrig-vmm` arguments, e.g. `["--profile", "operator"]` (the
    /// VMM's default tenant policy drops the flash writes of `count_boot`).
    #[serde(default)]
    pub vmm_args: Vec<String>,
    /// The VMM's watchdog: a simulated host left on longer than this many
    /// seconds stops by itself (then reads as an infrastructure fault). Caps
    /// what a leaked VMM can cost.
    #[serde(default = "default_max_on")]
    pub max_on_s: u64,
    /// vCPUs of the VMM.
    #[serde(default = "one")]
    pub vcpus: u8,
    /// Seconds to wait for the boot banner after power on.
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_s: f64,
}

impl Default for SimSpec {
    fn default() -> Self {
        SimSpec {
            state: None,
            counter_width: default_width(),
            serial: None,
            payload: None,
            count_boot: false,
            vmm_args: Vec::new(),
            max_on_s: default_max_on(),
            vcpus: 1,
            boot_timeout_s: default_boot_timeout(),
        }
    }
}

fn default_width() -> u8 {
    16
}
fn default_max_on() -> u64 {
    86_400
}
fn one() -> u8 {
    1
}
fn default_boot_timeout() -> f64 {
    20.0
}
fn default_relay_baud() -> u32 {
    9600
}
fn default_oob_baud() -> u32 {
    hilrig_device::oob::DEFAULT_BAUD
}
fn default_timeout_ms() -> u64 {
    1000
}
fn default_command_timeout_ms() -> u64 {
    10_000
}
fn default_retries() -> u32 {
    3
}
fn default_settle_ms() -> u64 {
    10_000
}
fn default_on_pattern() -> String {
    r"(?i)\bon\b".to_string()
}
fn default_off_pattern() -> String {
    r"(?i)\boff\b".to_string()
}

/// `[host.power]`, selected by `driver = "..."`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "driver", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PowerSpec {
    /// The simulated host: on = start the VMM, off = kill it, status = alive.
    Sim {},
    /// A USB relay board (LCUS protocol) on a serial port.
    SerialRelay {
        /// Serial device, e.g. /dev/ttyUSB0 or /dev/serial/by-id/...
        port: String,
        /// Relay channel, 1-based.
        channel: u8,
        /// Baud rate (LCUS boards: 9600).
        #[serde(default = "default_relay_baud")]
        baud: u32,
        /// Reply timeout in milliseconds.
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
        /// Attempts per action before giving up.
        #[serde(default = "default_retries")]
        retries: u32,
    },
    /// pdudaemon's HTTP API; readback through `status_command`.
    Pdudaemon {
        /// Base URL, e.g. http://127.0.0.1:16421
        url: String,
        /// The PDU's name in pdudaemon's configuration (`hostname=`).
        pdu: String,
        /// Outlet (`port=`).
        port: String,
        /// pdudaemon's `delay=` for reboot, seconds.
        #[serde(default)]
        delay: Option<u32>,
        /// The command that reads the outlet state (pdudaemon has no status
        /// endpoint); `{host}`/`{port}`/`{pdu}` substituted; stdout matched.
        status_command: String,
        /// Regex meaning "on" in the status output.
        #[serde(default = "default_on_pattern")]
        on_pattern: String,
        /// Regex meaning "off" in the status output.
        #[serde(default = "default_off_pattern")]
        off_pattern: String,
        /// HTTP and status-command timeout, milliseconds.
        #[serde(default = "default_command_timeout_ms")]
        timeout_ms: u64,
        /// How long the queued request may take to show in the readback, ms.
        #[serde(default = "default_settle_ms")]
        settle_ms: u64,
        /// Attempts per action.
        #[serde(default = "default_retries")]
        retries: u32,
    },
    /// External commands (ipmitool, vendor PDU tools), run with `sh -c`.
    Command {
        /// Power on.
        on: String,
        /// Power off.
        off: String,
        /// Read the state (stdout matched against the patterns).
        status: String,
        /// Optional native cycle (else off + on).
        #[serde(default)]
        cycle: Option<String>,
        /// Optional soft reset (e.g. `ipmitool ... power soft`/ACPI reset).
        #[serde(default)]
        soft_reset: Option<String>,
        /// Optional hard reset (e.g. `ipmitool ... power reset`).
        #[serde(default)]
        hard_reset: Option<String>,
        /// Value substituted for `{port}`.
        #[serde(default)]
        port: Option<String>,
        /// Regex meaning "on" in the status output.
        #[serde(default = "default_on_pattern")]
        on_pattern: String,
        /// Regex meaning "off" in the status output.
        #[serde(default = "default_off_pattern")]
        off_pattern: String,
        /// Per-command timeout, milliseconds.
        #[serde(default = "default_command_timeout_ms")]
        timeout_ms: u64,
        /// How long the state may take to show in the readback, ms.
        #[serde(default = "default_settle_ms")]
        settle_ms: u64,
        /// Attempts per action.
        #[serde(default = "default_retries")]
        retries: u32,
    },
}

impl PowerSpec {
    /// The driver's name as written in the inventory.
    pub fn driver_name(&self) -> &'static str {
        match self {
            PowerSpec::Sim {} => "sim",
            PowerSpec::SerialRelay { .. } => "serial-relay",
            PowerSpec::Pdudaemon { .. } => "pdudaemon",
            PowerSpec::Command { .. } => "command",
        }
    }
}

/// Known power drivers.
pub const POWER_DRIVERS: &[&str] = &["sim", "serial-relay", "pdudaemon", "command"];
/// Known console drivers.
pub const CONSOLE_DRIVERS: &[&str] = &["sim", "serial", "rfc2217"];
/// Known OOB drivers.
pub const OOB_DRIVERS: &[&str] = &["sim", "serial", "rfc2217"];
/// Known board drivers.
pub const BOARD_DRIVERS: &[&str] = &["none", "probe-rs"];

/// One `[[host.console]]`.
#[derive(Debug, Clone)]
pub struct ConsoleSpec {
    /// Name (unique per host), e.g. `com1`, `bmc`.
    pub name: String,
    /// Where the bytes come from.
    pub driver: ConsoleDriver,
}

#[derive(Deserialize)]
#[serde(tag = "driver", rename_all = "kebab-case", deny_unknown_fields)]
enum RawConsole {
    Sim {
        name: String,
    },
    Serial {
        name: String,
        path: String,
        #[serde(default = "default_oob_baud")]
        baud: u32,
    },
    Rfc2217 {
        name: String,
        host: String,
        port: u16,
        #[serde(default = "default_oob_baud")]
        baud: u32,
        #[serde(default)]
        raw: bool,
    },
}

impl From<RawConsole> for ConsoleSpec {
    fn from(r: RawConsole) -> ConsoleSpec {
        match r {
            RawConsole::Sim { name } => ConsoleSpec {
                name,
                driver: ConsoleDriver::Sim {},
            },
            RawConsole::Serial { name, path, baud } => ConsoleSpec {
                name,
                driver: ConsoleDriver::Serial { path, baud },
            },
            RawConsole::Rfc2217 {
                name,
                host,
                port,
                baud,
                raw,
            } => ConsoleSpec {
                name,
                driver: ConsoleDriver::Rfc2217 {
                    host,
                    port,
                    baud,
                    raw,
                },
            },
        }
    }
}

/// Console drivers.
#[derive(Debug, Clone)]
pub enum ConsoleDriver {
    /// The simulated host's COM1 (the VMM's console output).
    Sim {},
    /// A serial port.
    Serial {
        /// Device path.
        path: String,
        /// Baud rate.
        baud: u32,
    },
    /// A serial port served over the network (RFC 2217, e.g. by ser2net for a
    /// labgrid exporter's `NetworkSerialPort`).
    Rfc2217 {
        /// Host serving the port.
        host: String,
        /// TCP port.
        port: u16,
        /// Baud rate set through COM-PORT-OPTION.
        baud: u32,
        /// Plain TCP bytes instead of telnet/RFC 2217 (labgrid's `protocol: raw`).
        raw: bool,
    },
}

impl ConsoleDriver {
    /// Where a real console driver reads from (a serial port, or a network
    /// serial port); `None` for `sim` (a simulated host's COM1, which a rig
    /// serves from its work directory).
    pub fn source(&self) -> Option<crate::console::Source> {
        match self {
            ConsoleDriver::Sim {} => None,
            ConsoleDriver::Serial { path, baud } => Some(crate::console::Source::Serial {
                path: path.clone(),
                baud: *baud,
            }),
            ConsoleDriver::Rfc2217 {
                host,
                port,
                baud,
                raw,
            } => Some(crate::console::Source::Net {
                host: host.clone(),
                port: *port,
                baud: *baud,
                raw: *raw,
            }),
        }
    }
}

/// `[host.oob]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "driver", rename_all = "kebab-case", deny_unknown_fields)]
pub enum OobSpec {
    /// The simulated device's OOB UART, served on a PTY from its state file.
    Sim {},
    /// A real OOB UART.
    Serial {
        /// Device path.
        path: String,
        /// Baud rate.
        #[serde(default = "default_oob_baud")]
        baud: u32,
        /// Reply timeout, milliseconds.
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
    },
    /// A device's OOB UART served over the network (RFC 2217).
    Rfc2217 {
        /// Host serving the port.
        host: String,
        /// TCP port.
        port: u16,
        /// Baud rate set through COM-PORT-OPTION.
        #[serde(default = "default_oob_baud")]
        baud: u32,
        /// Reply timeout, milliseconds (also the connect/negotiation timeout).
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
        /// Plain TCP bytes instead of telnet/RFC 2217.
        #[serde(default)]
        raw: bool,
    },
}

/// `[host.board]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "driver", rename_all = "kebab-case", deny_unknown_fields)]
pub enum BoardSpec {
    /// No board.
    None {},
    /// An MCU/FPGA board behind a debug probe (needs the `probe-rs` feature).
    ProbeRs {
        /// probe-rs chip name, e.g. `STM32F411CEUx`, `nRF52840_xxAA`.
        chip: String,
        /// Probe selector `VID:PID[:SERIAL]`; default: the only probe attached.
        #[serde(default)]
        probe: Option<String>,
        /// Image flashed by `flash` when none is given (ELF or .bin).
        #[serde(default)]
        image: Option<PathBuf>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    lab: Option<LabSpec>,
    #[serde(default)]
    host: Vec<toml::Table>,
    #[serde(default)]
    counters: Option<CountersSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default = "default_device")]
    device: String,
    #[serde(default)]
    sim: Option<SimSpec>,
    power: toml::Table,
    #[serde(default)]
    console: Vec<toml::Table>,
    #[serde(default)]
    oob: Option<toml::Table>,
    #[serde(default)]
    board: Option<toml::Table>,
    #[serde(default)]
    ssh: Option<crate::remote::SshSpec>,
}

fn default_device() -> String {
    "model".to_string()
}

/// Largest inventory file read (bytes); a larger one is refused before parsing.
pub const MAX_INVENTORY_BYTES: u64 = 1 << 20;
/// Longest host name (bytes).
pub const MAX_HOST_NAME: usize = 64;

/// Check a host name: 1..=[`MAX_HOST_NAME`] bytes of `[A-Za-z0-9._-]`, not starting
/// with `.` or `-`, no `..` (host names become directory names under the work
/// directory and appear in shell command templates).
pub fn validate_host_name(name: &str) -> Result<(), InvalidField> {
    if name.is_empty() {
        return Err(InvalidField("host name is empty".into()));
    }
    if name.len() > MAX_HOST_NAME {
        return Err(InvalidField(format!(
            "host name is {} bytes long; at most {MAX_HOST_NAME} allowed",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(InvalidField(format!(
            "host name {name:?} contains {c:?}; only A-Z a-z 0-9 . _ - are allowed"
        )));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(InvalidField(format!(
            "host name {name:?} must not start with `.` or `-`"
        )));
    }
    if name.contains("..") {
        return Err(InvalidField(format!(
            "host name {name:?} must not contain `..`"
        )));
    }
    Ok(())
}

/// A host name as shown in an error: at most 64 bytes of it, escaped.
fn shown_name(name: &str) -> String {
    if name.len() <= MAX_HOST_NAME {
        return format!("{name:?}");
    }
    let mut end = MAX_HOST_NAME;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &name[..end], name.len())
}

impl Inventory {
    /// Read and validate an inventory file: a regular file of at most
    /// [`MAX_INVENTORY_BYTES`] (refused before parsing otherwise), read with a bound.
    pub fn load(path: &Path) -> Result<Inventory, RigError> {
        let text = hilrig_device::secure::read_bounded(path, MAX_INVENTORY_BYTES).map_err(|e| {
            RigError::Inventory {
                file: path.to_path_buf(),
                host: None,
                driver: None,
                detail: format!("cannot read: {e}"),
            }
        })?;
        Inventory::parse(&text, path)
    }

    /// Parse and validate inventory text; `file` is named in errors and anchors
    /// relative paths.
    pub fn parse(text: &str, file: &Path) -> Result<Inventory, RigError> {
        let err =
            |host: Option<&str>, driver: Option<String>, detail: String| RigError::Inventory {
                file: file.to_path_buf(),
                host: host.map(str::to_string),
                driver,
                detail,
            };
        let raw: RawFile = toml::from_str(text).map_err(|e| err(None, None, e.to_string()))?;
        let mut hosts: Vec<HostSpec> = Vec::new();
        for (i, t) in raw.host.into_iter().enumerate() {
            let label = match t.get("name").and_then(|v| v.as_str()) {
                Some(n) if validate_host_name(n).is_ok() => n.to_string(),
                Some(n) => format!("#{} {}", i + 1, shown_name(n)),
                None => format!("#{} (unnamed)", i + 1),
            };
            let h: RawHost = toml::Table::try_into(t)
                .map_err(|e| err(Some(&label), None, one_line(&e.to_string())))?;
            validate_host_name(&h.name).map_err(|m| err(Some(&label), None, m.0))?;
            if hosts.iter().any(|o| o.name == h.name) {
                return Err(err(Some(&h.name), None, "duplicate host name".into()));
            }
            let name = h.name.clone();
            let power: PowerSpec = section(&h.power, "power", POWER_DRIVERS)
                .map_err(|(d, m)| err(Some(&name), Some(d), m))?;
            let mut consoles: Vec<ConsoleSpec> = Vec::new();
            for c in &h.console {
                let cs: ConsoleSpec = section::<RawConsole>(c, "console", CONSOLE_DRIVERS)
                    .map_err(|(d, m)| err(Some(&name), Some(d), m))?
                    .into();
                // Console names become capture file names (`<case>.<console>.log`).
                validate_host_name(&cs.name).map_err(|m| {
                    err(
                        Some(&name),
                        Some(format!("console {}", shown_name(&cs.name))),
                        m.0.replacen("host name", "console name", 2),
                    )
                })?;
                if consoles.iter().any(|o| o.name == cs.name) {
                    return Err(err(
                        Some(&name),
                        Some(format!("console `{}`", cs.name)),
                        "duplicate console name".into(),
                    ));
                }
                consoles.push(cs);
            }
            let oob: Option<OobSpec> = h
                .oob
                .as_ref()
                .map(|t| section(t, "oob", OOB_DRIVERS))
                .transpose()
                .map_err(|(d, m)| err(Some(&name), Some(d), m))?;
            let board: Option<BoardSpec> = h
                .board
                .as_ref()
                .map(|t| section(t, "board", BOARD_DRIVERS))
                .transpose()
                .map_err(|(d, m)| err(Some(&name), Some(d), m))?;
            if let Some(ssh) = &h.ssh {
                ssh.validate()
                    .map_err(|m| err(Some(&name), Some("ssh".into()), m.0))?;
            }
            let base = file
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            let spec = HostSpec {
                ssh: h.ssh.map(|s| s.anchored(&base)),
                name: h.name,
                tags: h.tags.into_iter().collect(),
                device: h.device,
                sim: h.sim.unwrap_or_default(),
                power,
                consoles,
                oob,
                board,
            };
            validate_host(&spec).map_err(|(d, m)| err(Some(&name), Some(d), m))?;
            hosts.push(spec);
        }
        Ok(Inventory {
            file: file.to_path_buf(),
            lab: raw.lab.unwrap_or_default(),
            hosts,
            counters: raw.counters.map(|mut c| {
                let base = file.parent().unwrap_or(Path::new("."));
                let rel = |p: &Path| {
                    if p.is_relative() {
                        base.join(p)
                    } else {
                        p.to_path_buf()
                    }
                };
                if !(c.db.contains("://") || c.db.contains("dbname=")) {
                    c.db = rel(Path::new(&c.db)).display().to_string();
                }
                c.key = rel(&c.key);
                c.webhook_key = c.webhook_key.as_deref().map(rel);
                c
            }),
        })
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> Result<&HostSpec, RigError> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| RigError::UnknownHost {
                file: self.file.clone(),
                host: name.to_string(),
            })
    }

    /// Hosts carrying every tag in `tags` (all hosts for no tags), in file order.
    pub fn select<S: AsRef<str>>(&self, tags: &[S]) -> Vec<&HostSpec> {
        self.hosts.iter().filter(|h| h.has_tags(tags)).collect()
    }

    /// The directory relative paths in the file are anchored at.
    pub fn base_dir(&self) -> PathBuf {
        self.file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// The simulated hosts' work directory (not checked; see
    /// [`Inventory::private_workdir`]).
    pub fn workdir(&self) -> PathBuf {
        match &self.lab.workdir {
            Some(p) if p.is_absolute() => p.clone(),
            Some(p) => self.base_dir().join(p),
            None => std::env::temp_dir().join("hilrig-rig"),
        }
    }
}

impl Inventory {
    /// The work directory, made safe to write into: created 0700 if missing; an
    /// existing one is refused unless it is a directory (not a symlink) owned by
    /// the current user and not writable by group or others.
    pub fn private_workdir(&self) -> Result<PathBuf, RigError> {
        let w = self.workdir();
        hilrig_device::secure::ensure_private_dir(&w)?;
        Ok(w)
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Deserialize one driver section, naming the driver in errors.
fn section<T: serde::de::DeserializeOwned>(
    t: &toml::Table,
    what: &str,
    known: &[&str],
) -> Result<T, (String, String)> {
    let name = t.get("name").and_then(|v| v.as_str());
    let label = |d: &str| match name {
        Some(n) => format!("{what} `{n}` driver `{d}`"),
        None => format!("{what} driver `{d}`"),
    };
    let driver = match t.get("driver") {
        Some(toml::Value::String(s)) => s.clone(),
        Some(_) => return Err((what.to_string(), "`driver` must be a string".into())),
        None => {
            return Err((
                what.to_string(),
                format!("missing `driver` (one of: {})", known.join(", ")),
            ))
        }
    };
    if !known.contains(&driver.as_str()) {
        return Err((
            label(&driver),
            format!("unknown driver (known: {})", known.join(", ")),
        ));
    }
    t.clone()
        .try_into()
        .map_err(|e: toml::de::Error| (label(&driver), one_line(e.message())))
}

fn validate_host(h: &HostSpec) -> Result<(), (String, String)> {
    match &h.power {
        PowerSpec::SerialRelay { port, channel, .. } => {
            if port.trim().is_empty() {
                return Err(("power driver `serial-relay`".into(), "missing port".into()));
            }
            if *channel == 0 {
                return Err((
                    "power driver `serial-relay`".into(),
                    "channel is 1-based".into(),
                ));
            }
        }
        PowerSpec::Pdudaemon {
            url,
            on_pattern,
            off_pattern,
            ..
        } => {
            crate::power::pdudaemon::parse_url(url)
                .map_err(|e| ("power driver `pdudaemon`".to_string(), e.to_string()))?;
            check_regex(on_pattern, off_pattern, "pdudaemon")?;
        }
        PowerSpec::Command {
            on_pattern,
            off_pattern,
            ..
        } => check_regex(on_pattern, off_pattern, "command")?,
        PowerSpec::Sim {} => {}
    }
    for c in &h.consoles {
        if let ConsoleDriver::Serial { path, .. } = &c.driver {
            if path.trim().is_empty() {
                return Err((
                    format!("console `{}` driver `serial`", c.name),
                    "missing path".into(),
                ));
            }
        }
    }
    if let Some(OobSpec::Serial { path, .. }) = &h.oob {
        if path.trim().is_empty() {
            return Err(("oob driver `serial`".into(), "missing path".into()));
        }
    }
    let net = |host: &str, port: u16, baud: u32| {
        if host.trim().is_empty() || host.starts_with('-') {
            Err("bad or missing host".to_string())
        } else if port == 0 {
            Err("port 0".to_string())
        } else if baud == 0 {
            Err("baud 0".to_string())
        } else {
            Ok(())
        }
    };
    for c in &h.consoles {
        if let ConsoleDriver::Rfc2217 {
            host, port, baud, ..
        } = &c.driver
        {
            net(host, *port, *baud)
                .map_err(|m| (format!("console `{}` driver `rfc2217`", c.name), m))?;
        }
    }
    if let Some(OobSpec::Rfc2217 {
        host, port, baud, ..
    }) = &h.oob
    {
        net(host, *port, *baud).map_err(|m| ("oob driver `rfc2217`".to_string(), m))?;
    }
    check_device(h)?;
    if h.sim.max_on_s == 0 || h.sim.max_on_s > 86_400 {
        return Err(("sim".into(), "max_on_s must be 1..=86400".into()));
    }
    if h.sim.vcpus == 0 || h.sim.vcpus > 8 {
        return Err(("sim".into(), "vcpus must be 1..=8".into()));
    }
    Ok(())
}

/// `device`: a backend the VMM knows (`model`, `rtl`, `vfio=...`, `fpga=...`).
/// A board (`fpga=PORT,oob=PORT`) on a host reached over SSH has its bridge port
/// on that host and its OOB port on the controller: the OOB port is required
/// (the rig reads the board's counters there, never through the VMM).
fn check_device(h: &HostSpec) -> Result<(), (String, String)> {
    use hilrig_vmm_api::DeviceSpec;
    let spec: DeviceSpec = h
        .device
        .parse()
        .map_err(|e: hilrig_vmm_api::spec::SpecError| ("device".to_string(), e.to_string()))?;
    if let DeviceSpec::Fpga { oob: None, .. } = spec {
        if h.ssh.is_some() {
            return Err((
                "device".into(),
                format!(
                    "`{}`: a board on a host reached over SSH needs oob=PORT, its OOB port on the controller (fpga=PORT is its bridge port on the host)",
                    h.device
                ),
            ));
        }
    }
    Ok(())
}

fn check_regex(on: &str, off: &str, driver: &str) -> Result<(), (String, String)> {
    for (what, p) in [("on_pattern", on), ("off_pattern", off)] {
        regex::Regex::new(p).map_err(|e| {
            (
                format!("power driver `{driver}`"),
                format!("{what}: {}", one_line(&e.to_string())),
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Inventory, RigError> {
        Inventory::parse(s, Path::new("lab.toml"))
    }

    #[test]
    fn sample_inventory_parses_and_selects_by_tag() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("inventory/sim.toml");
        let inv = Inventory::load(&p).unwrap();
        assert_eq!(inv.hosts.len(), 3);
        assert!(inv.hosts.iter().all(|h| h.is_sim()));
        assert_eq!(inv.select(&["sim"]).len(), 3);
        let none: [&str; 0] = [];
        assert_eq!(inv.select(&none).len(), 3);
        assert_eq!(inv.select(&["sim", "no-such-tag"]).len(), 0);
        assert!(!inv.select(&["fast"]).is_empty());
    }

    /// `[host.ssh] console_owner`: a user name or a uid (integer or digits),
    /// typed; anything else, or an owner without a console, refused naming the
    /// host and the value.
    #[test]
    fn console_owner_is_a_user_name_or_a_uid() {
        use hilrig_vmm_api::ConsoleOwner;
        let host = |owner: &str| {
            format!(
                "[[host]]\nname = \"k\"\n[host.ssh]\naddress = \"127.0.0.11\"\nuser = \"u\"\nidentity = \"/k\"\nknown_hosts = \"/kh\"\nworkdir = \"/w\"\nconsole = \"/dev/pts/9\"\n{owner}[host.power]\ndriver = \"sim\"\n"
            )
        };
        let owner_of = |line: &str| {
            parse(&host(line)).unwrap().hosts[0]
                .ssh
                .as_ref()
                .unwrap()
                .console_owner
                .clone()
        };
        assert_eq!(owner_of(""), None);
        assert_eq!(
            owner_of("console_owner = \"ser2net\"\n"),
            Some(ConsoleOwner::User("ser2net".into()))
        );
        assert_eq!(
            owner_of("console_owner = \"_labgrid-exp.1\"\n"),
            Some(ConsoleOwner::User("_labgrid-exp.1".into()))
        );
        assert_eq!(
            owner_of("console_owner = 110\n"),
            Some(ConsoleOwner::Uid(110))
        );
        assert_eq!(
            owner_of("console_owner = \"110\"\n"),
            Some(ConsoleOwner::Uid(110))
        );
        for bad in [
            "\"-oProxy\"",
            "\"ser 2net\"",
            "\"ser2net;id\"",
            "\"\"",
            "\"1x\"",
            "-1",
            "4294967296",
            "\"99999999999\"",
            "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"",
            "true",
        ] {
            let e = parse(&host(&format!("console_owner = {bad}\n")))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("host `k`")
                    && (e.contains("console owner") || e.contains("console_owner")),
                "{bad}: {e}"
            );
        }
        // An owner without the console it owns.
        let e =
            parse(&host("console_owner = \"ser2net\"\n").replace("console = \"/dev/pts/9\"\n", ""))
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("host `k`") && e.contains("console_owner") && e.contains("without console"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_file_host_and_driver() {
        let e = parse("[[host]]\nname = \"a\"\n[host.power]\ndriver = \"telepathy\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lab.toml") && e.contains("host `a`"), "{e}");
        assert!(
            e.contains("telepathy") && e.contains("unknown driver"),
            "{e}"
        );

        let e =
            parse("[[host]]\nname = \"b\"\n[host.power]\ndriver = \"serial-relay\"\nchannel = 1\n")
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("host `b`") && e.contains("serial-relay") && e.contains("port"),
            "{e}"
        );

        let two = "[[host]]\nname = \"c\"\n[host.power]\ndriver = \"sim\"\n";
        let e = parse(&format!("{two}{two}")).unwrap_err().to_string();
        assert!(e.contains("host `c`") && e.contains("duplicate"), "{e}");

        let e = parse("[[host]]\nname = \"d\"\ncolour = 1\n[host.power]\ndriver = \"sim\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("host `d`") && e.contains("colour"), "{e}");

        let e = parse("[[host]]\nname = \"e\"\n[host.power]\ndriver = \"sim\"\n[host.oob]\ndriver = \"serial\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("host `e`") && e.contains("oob") && e.contains("path"),
            "{e}"
        );

        let e = parse("[[host]]\nname = \"f\"\n[host.power]\ndriver = \"command\"\non = \"x\"\noff = \"y\"\nstatus = \"z\"\non_pattern = \"(\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("host `f`") && e.contains("on_pattern"), "{e}");

        let e = parse(
            "[[host]]\nname = \"h\"\ndevice = \"fpga9000\"\n[host.power]\ndriver = \"sim\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("host `h`") && e.contains("device") && e.contains("fpga9000"),
            "{e}"
        );

        // A board on an SSH host: its bridge port there, its OOB port here.
        let ssh = "[host.ssh]\naddress = \"127.0.0.11\"\nuser = \"u\"\nidentity = \"/k\"\nknown_hosts = \"/kh\"\nworkdir = \"/w\"\n[host.power]\ndriver = \"sim\"\n";
        let e = parse(&format!(
            "[[host]]\nname = \"i\"\ndevice = \"fpga=/dev/ttyUSB1\"\n{ssh}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("host `i`") && e.contains("device") && e.contains("oob=PORT"),
            "{e}"
        );
        let inv = parse(&format!(
            "[[host]]\nname = \"j\"\ndevice = \"fpga=/dev/ttyUSB1,oob=/dev/ttyUSB7\"\n{ssh}"
        ))
        .unwrap();
        assert_eq!(inv.hosts[0].device, "fpga=/dev/ttyUSB1,oob=/dev/ttyUSB7");

        let e = parse("[[host]]\nname = \"g\"\n[host.power]\ndriver = \"sim\"\nspeed = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("host `g`") && e.contains("power driver `sim`") && e.contains("speed"),
            "{e}"
        );
    }
}

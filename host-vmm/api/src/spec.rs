//! What to run: [`DeviceSpec`] (`--device`) and [`VmSpec`], the VMM's whole command
//! line as a typed value. `hilrig vm run` and `hilrig-vmm` parse their arguments into
//! a [`VmSpec`]; clients build one and turn it into arguments with
//! [`VmSpec::to_args`], so no client assembles or searches flag strings.

use hilrig_device::BackendKind;
use std::ffi::OsString;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Baud rate of a board's UARTs unless `baud=` says otherwise.
pub const FPGA_BAUD: u32 = 115_200;

/// Which device the VM gets (`--device`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The behavioural model (in-process).
    Model,
    /// The rust-hdl RTL driven in-process.
    Rtl,
    /// Model and RTL side by side, compared on every operation.
    Lockstep,
    /// The generated Verilog compiled with Verilator, in-process.
    Verilator,
    /// A PCI function bound to vfio-pci, by its sysfs path
    /// (`vfio=PATH[,desc=FILE]`); a device that is not the reference device comes
    /// with its description file (registers, BAR0 size, ID check).
    Vfio {
        /// The function's sysfs path, e.g. `/sys/bus/pci/devices/0000:00:03.0`.
        path: PathBuf,
        /// Its device description file (None: the reference device).
        desc: Option<PathBuf>,
    },
    /// The device on an FPGA board, through its host bridge on a serial port
    /// (`fpga=PORT[,oob=PORT][,baud=N]`).
    Fpga {
        /// The bridge's serial port (the board's FTDI UART).
        port: String,
        /// The board's OOB UART, if wired.
        oob: Option<String>,
        /// Baud rate of both.
        baud: u32,
    },
}

impl DeviceSpec {
    /// The in-process backend this names, if it is one.
    pub fn backend_kind(&self) -> Option<BackendKind> {
        match self {
            DeviceSpec::Model => Some(BackendKind::Model),
            DeviceSpec::Rtl => Some(BackendKind::Rtl),
            DeviceSpec::Lockstep => Some(BackendKind::Lockstep),
            DeviceSpec::Verilator => Some(BackendKind::Verilator),
            DeviceSpec::Vfio { .. } | DeviceSpec::Fpga { .. } => None,
        }
    }
}

impl From<BackendKind> for DeviceSpec {
    fn from(b: BackendKind) -> DeviceSpec {
        match b {
            BackendKind::Model => DeviceSpec::Model,
            BackendKind::Rtl => DeviceSpec::Rtl,
            BackendKind::Lockstep => DeviceSpec::Lockstep,
            BackendKind::Verilator => DeviceSpec::Verilator,
        }
    }
}

/// A command-line value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// `--device` names no backend.
    #[error("unknown device backend `{0}` (expected model, rtl, lockstep, verilator, vfio=<sysfs-path>[,desc=<file>] or fpga=<serial port>[,oob=<port>][,baud=N])")]
    UnknownDevice(String),
    /// `vfio=...` is malformed.
    #[error("device backend `vfio={spec}`: {why}")]
    Vfio {
        /// What followed `vfio=`.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// `fpga=...` is malformed.
    #[error("device backend `fpga={spec}`: {why}")]
    Fpga {
        /// What follows `fpga=`.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// A size is malformed.
    #[error("`{0}` is not a size (e.g. 64M; suffixes K, M, G)")]
    Size(String),
    /// A duration is malformed.
    #[error("`{0}` is not a duration (e.g. 10s, 500ms, 2m; at most a day)")]
    Duration(String),
    /// An on/off switch is malformed.
    #[error("`{0}`: expected on or off")]
    OnOff(String),
    /// A console owner is neither a uid nor a user name.
    #[error("console owner {0:?}: expected a uid (e.g. 110) or a user name (e.g. ser2net: letters, digits, `_`, `.`, `-`, at most 32, not starting with `-` or a digit)")]
    ConsoleOwner(String),
}

/// Longest user name a [`ConsoleOwner`] takes (as useradd's limit).
pub const MAX_USER_NAME: usize = 32;

/// Whose terminal may be the console besides us and root (`--console-owner`):
/// a uid, or a user name resolved on the host where the VMM runs (uids are per
/// host; a name that does not resolve there is an error, never ignored).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConsoleOwner {
    /// A numeric uid, taken as it is.
    Uid(u32),
    /// A user name, looked up in the host's user database when the VMM starts.
    User(String),
}

impl FromStr for ConsoleOwner {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let bad = || SpecError::ConsoleOwner(s.to_string());
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse().map(ConsoleOwner::Uid).map_err(|_| bad());
        }
        let mut b = s.bytes();
        let first_ok = b
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_');
        if !first_ok
            || s.len() > MAX_USER_NAME
            || !b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
        {
            return Err(bad());
        }
        Ok(ConsoleOwner::User(s.to_string()))
    }
}

impl std::fmt::Display for ConsoleOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConsoleOwner::Uid(u) => write!(f, "{u}"),
            ConsoleOwner::User(n) => f.write_str(n),
        }
    }
}

impl serde::Serialize for ConsoleOwner {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ConsoleOwner::Uid(u) => s.serialize_u32(*u),
            ConsoleOwner::User(n) => s.serialize_str(n),
        }
    }
}

/// A uid (an integer) or a user name (a string; a string of digits is a uid).
impl<'de> serde::Deserialize<'de> for ConsoleOwner {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ConsoleOwner;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a uid (e.g. 110) or a user name (e.g. \"ser2net\")")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ConsoleOwner, E> {
                u32::try_from(v)
                    .map(ConsoleOwner::Uid)
                    .map_err(|_| E::custom(SpecError::ConsoleOwner(v.to_string())))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ConsoleOwner, E> {
                u32::try_from(v)
                    .map(ConsoleOwner::Uid)
                    .map_err(|_| E::custom(SpecError::ConsoleOwner(v.to_string())))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ConsoleOwner, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

fn parse_vfio(rest: &str) -> Result<DeviceSpec, SpecError> {
    let bad = |why: &str| SpecError::Vfio {
        spec: rest.to_string(),
        why: why.to_string(),
    };
    let mut parts = rest.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err(bad("no sysfs path"));
    }
    let mut desc = None;
    for opt in parts {
        match opt.split_once('=') {
            Some(("desc", f)) if !f.is_empty() && desc.is_none() => desc = Some(PathBuf::from(f)),
            Some(("desc", _)) => return Err(bad("desc= needs one file name")),
            _ => return Err(bad(&format!("unknown option `{opt}` (expected desc=FILE)"))),
        }
    }
    Ok(DeviceSpec::Vfio {
        path: PathBuf::from(path),
        desc,
    })
}

fn parse_fpga(rest: &str) -> Result<DeviceSpec, SpecError> {
    let bad = |why: String| SpecError::Fpga {
        spec: rest.to_string(),
        why,
    };
    let mut parts = rest.split(',');
    let port = parts.next().unwrap_or_default();
    if port.is_empty() {
        return Err(bad(
            "no serial port (expected fpga=PORT[,oob=PORT][,baud=N])".into(),
        ));
    }
    let (mut oob, mut baud) = (None, FPGA_BAUD);
    for part in parts {
        match part.split_once('=') {
            Some(("oob", p)) if !p.is_empty() => oob = Some(p.to_string()),
            Some(("baud", b)) => {
                baud = b
                    .parse()
                    .ok()
                    .filter(|&b| b > 0)
                    .ok_or_else(|| bad(format!("bad baud rate `{b}`")))?
            }
            _ => {
                return Err(bad(format!(
                    "unknown option `{part}` (expected oob=PORT or baud=N)"
                )))
            }
        }
    }
    Ok(DeviceSpec::Fpga {
        port: port.to_string(),
        oob,
        baud,
    })
}

impl FromStr for DeviceSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(b) = s.parse::<BackendKind>() {
            return Ok(b.into());
        }
        if let Some(rest) = s.strip_prefix("fpga=") {
            return parse_fpga(rest);
        }
        match s.strip_prefix("vfio=") {
            Some(rest) => parse_vfio(rest),
            _ => Err(SpecError::UnknownDevice(s.to_string())),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(b) = self.backend_kind() {
            return f.write_str(b.name());
        }
        match self {
            DeviceSpec::Vfio { path, desc } => {
                write!(f, "vfio={}", path.display())?;
                if let Some(d) = desc {
                    write!(f, ",desc={}", d.display())?;
                }
                Ok(())
            }
            DeviceSpec::Fpga { port, oob, baud } => {
                write!(f, "fpga={port}")?;
                if let Some(o) = oob {
                    write!(f, ",oob={o}")?;
                }
                if *baud != FPGA_BAUD {
                    write!(f, ",baud={baud}")?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parse a size: bytes, or with a K/M/G suffix (binary units).
pub fn parse_size(s: &str) -> Result<u64, SpecError> {
    let t = s.trim();
    let bad = || SpecError::Size(s.to_string());
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(bad()),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(bad)
}

/// Parse `on`/`off` (also true/false, yes/no, 1/0).
pub fn parse_on_off(s: &str) -> Result<bool, SpecError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(SpecError::OnOff(s.to_string())),
    }
}

/// Parse a duration: seconds, or with an ms/s/m suffix; at most a day.
pub fn parse_duration(s: &str) -> Result<Duration, SpecError> {
    let t = s.trim();
    let bad = || SpecError::Duration(s.to_string());
    let (num, unit) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v <= 0.0 || v * unit > 86_400.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(v * unit))
}

/// A VM run: the arguments of `hilrig vm run` / `hilrig-vmm`.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct VmSpec {
    /// Guest payload: a built-in name (see --list-payloads) or a raw binary file,
    /// loaded at 0x100000 and entered in 64-bit mode.
    #[arg(long, default_value = "pci-enum")]
    pub payload: String,
    /// Device backend: model | rtl | lockstep | verilator | vfio=<sysfs path of a
    /// vfio-pci function>[,desc=<device description file>] | fpga=<bridge serial port>[,oob=<OOB serial port>][,baud=N]
    /// (a board, see hilrig-board).
    #[arg(long, default_value = "model")]
    pub device: DeviceSpec,
    /// Device state file of an in-process backend (created factory-fresh if missing).
    #[arg(long)]
    pub device_state: Option<PathBuf>,
    /// Number of vCPUs (1..=8), each on its own thread.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest RAM, e.g. 64M, 1G, 4194304.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub mem: u64,
    /// MMIO policy file (TOML; see the README); default: the built-in policy
    /// generated from the register table. Refused at load (exit 2) if invalid.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Privilege profile of the policy to run the guest under.
    #[arg(long, default_value = "tenant")]
    pub profile: String,
    /// Override the policy's global enforce switch: off = every access allowed,
    /// alarms still raised.
    #[arg(long, value_parser = parse_on_off)]
    pub enforce: Option<bool>,
    /// Alarm sink: JSON lines, one alarm per line (rate-limited, see --alarm-rate).
    #[arg(long)]
    pub alarms: Option<PathBuf>,
    /// Alarms written per second (bursts of a tenth of it); the rest are counted as
    /// suppressed (per-register counters still count them all).
    #[arg(long, default_value_t = 1000)]
    pub alarm_rate: u32,
    /// Serial console (COM1) output file; default: standard output (standard error with --json).
    #[arg(long)]
    pub console: Option<PathBuf>,
    /// A user (uid or name, the name resolved on this host) besides us and root
    /// whose terminal may be the console (repeatable): the lab's console service
    /// (ser2net, a labgrid exporter) that holds the pty it serves; a name that
    /// does not resolve is an error. A terminal anyone else owns is refused; every
    /// symlink on the way must be in directories only us or root can write.
    #[arg(long = "console-owner")]
    pub console_owners: Vec<ConsoleOwner>,
    /// Wall-clock watchdog, e.g. 10s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Trap every BAR0 page (no direct mappings), e.g. to compare with the fast path.
    #[arg(long)]
    pub trap_all: bool,
    /// Print the BAR0 page plan (which pages are mapped, which trap).
    #[arg(long)]
    pub show_plan: bool,
    /// Print the result as one JSON object (a `RunSummary`) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Serve the control socket here (owner-only; JSON lines: status, pause, resume,
    /// patch, teardown, metrics).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Accept live patches signed by this Ed25519 public key file (repeatable).
    /// Needs --patch-record and --patch-record-key (refused at start without them).
    #[arg(long = "patch-pubkey")]
    pub patch_pubkeys: Vec<PathBuf>,
    /// X25519 secret key file to decrypt encrypted patch bundles (needs
    /// --patch-pubkey: refused at start without it).
    #[arg(long)]
    pub patch_decrypt_key: Option<PathBuf>,
    /// This host's record of applied patch versions (MACed; a restarted VMM refuses
    /// bundles not newer than those; a record that does not verify stops the VMM).
    /// Required with --patch-pubkey, refused without it. Created if missing: it does
    /// not protect against someone who can restore an older copy of it or delete it.
    #[arg(long, requires = "patch_record_key")]
    pub patch_record: Option<PathBuf>,
    /// MAC key file (0600, 64 hex digits) of --patch-record.
    #[arg(long, requires = "patch_record")]
    pub patch_record_key: Option<PathBuf>,
    /// Pull mode: poll this directory for `*.bundle` files and apply each new one
    /// (needs --patch-pubkey), for hosts the control plane cannot reach.
    #[arg(long)]
    pub patch_source: Option<PathBuf>,
    /// How often --patch-source is polled, e.g. 1s, 200ms.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub patch_poll: Duration,
    /// Apply live patches quiesced: every vCPU parked for the swap (claimed by state
    /// for a handler or same-pages policy patch; the guest stopped when the BAR0
    /// memory slots change) instead of swapping the module under load. The run
    /// summary's patch events say `quiesced: true`.
    #[arg(long)]
    pub quiesce_patches: bool,
    /// Ed25519 secret key file that signs teardown records (default: an ephemeral key).
    #[arg(long)]
    pub vmm_key: Option<PathBuf>,
    /// Tear the tenant down when the VM exits (scrub, reset, counters, signed record).
    #[arg(long)]
    pub teardown_on_exit: bool,
    /// Write the teardown record (JSON) here.
    #[arg(long)]
    pub teardown_record: Option<PathBuf>,
    /// The nonce (64 hex digits) the teardown record must carry: whoever starts the
    /// VMM makes a fresh one and checks it in the record (a replayed record of
    /// another run carries another). Default: a fresh random one.
    #[arg(long)]
    pub teardown_nonce: Option<crate::teardown::Nonce>,
    /// The VM id the teardown record names (default: `hilrig-vmm pid N`).
    #[arg(long)]
    pub vm_id: Option<String>,
    /// The counters service's database (SQLite path or postgresql:// URL; needs
    /// --counters-key): its catalog also vouches for VBIOS hashes (the factory VBIOS
    /// is always known), and teardown asks it for the verdict on the device.
    #[arg(long)]
    pub counters_db: Option<String>,
    /// MAC key file of the counters service (with --counters-db).
    #[arg(long)]
    pub counters_key: Option<PathBuf>,
    /// Page a human when the provisioning gate refuses a locked or quarantined
    /// device: this command (argv split on whitespace, no shell) gets the page as
    /// JSON on its standard input, `HILRIG_PAGE_SERIAL`/`HILRIG_PAGE_VERDICT` in its
    /// environment (with --counters-db).
    #[arg(long, requires = "counters_db")]
    pub page_cmd: Option<String>,
    /// Hand the device to the guest even if its measured VBIOS is invalid or unknown
    /// (recorded in the output).
    #[arg(long)]
    pub allow_unknown_vbios: bool,
    /// List the built-in payloads and exit.
    #[arg(long)]
    pub list_payloads: bool,
    /// Apply a signed policy patch that widens the running policy when its manifest
    /// declares `widens = true` (refused otherwise, and always without this flag).
    #[arg(long)]
    pub allow_policy_widening: bool,
    /// What an instruction KVM cannot emulate on a trapped page (cmpxchg16b,
    /// fxsave, enter with nesting, ...) gets: `stop` ends the VM with a verdict
    /// naming it; `ud` injects #UD into the guest and goes on.
    #[arg(long, value_enum, default_value_t = OnUnemulated::Stop)]
    pub on_unemulated: OnUnemulated,
    /// Per-thread seccomp filters and landlock (default on; `off` is for debugging
    /// only: logged, and recorded in the run summary).
    #[arg(long, value_parser = parse_on_off)]
    pub seccomp: Option<bool>,
    /// The in-kernel interrupt controller (LAPIC/IOAPIC/PIC, `KVM_CREATE_IRQCHIP`):
    /// `auto` creates it only when the device has an interrupt to deliver (a VFIO
    /// function with INTx), wired to the guest's IOAPIC through a KVM irqfd; `on`
    /// always; `off` never (the device's interrupts are not delivered); `unwired`
    /// creates it but leaves the device's interrupt unconnected (a negative control:
    /// the guest sees an interrupt line that never fires). Without it `hlt` stops a
    /// vCPU for good; with it `hlt` waits for an interrupt inside KVM.
    #[arg(long, value_enum, default_value_t = Irqchip::Auto)]
    pub irqchip: Irqchip,
    /// Run the VMM jailed under this directory: a per-VM root (pivot_root) holding
    /// only /dev/kvm and the files it needs, new mount/pid/ipc/net namespaces, an
    /// unprivileged uid/gid, cgroup v2 limits where available, no inherited fds.
    #[arg(long)]
    pub jail: Option<PathBuf>,
    /// The uid the jailed VMM runs as (default 65534, nobody).
    #[arg(long)]
    pub uid: Option<u32>,
    /// The gid the jailed VMM runs as (default: the kvm group, else 65534).
    #[arg(long)]
    pub gid: Option<u32>,
}

/// What an instruction KVM cannot emulate on MMIO gets (`--on-unemulated`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum OnUnemulated {
    /// End the VM with a verdict naming the instruction.
    #[default]
    Stop,
    /// Inject #UD (invalid opcode) into the guest and go on.
    Ud,
}

/// The in-kernel interrupt controller (`--irqchip`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Irqchip {
    /// Only when the device has an interrupt to deliver (then wired).
    #[default]
    Auto,
    /// Always (the device's interrupt wired when it has one).
    On,
    /// Never: no interrupt is ever delivered.
    Off,
    /// Created, but the device's interrupt left unconnected (negative control).
    Unwired,
}

impl Irqchip {
    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Irqchip::Auto => "auto",
            Irqchip::On => "on",
            Irqchip::Off => "off",
            Irqchip::Unwired => "unwired",
        }
    }
}

impl Default for VmSpec {
    fn default() -> Self {
        VmSpec {
            payload: "pci-enum".into(),
            device: DeviceSpec::Model,
            device_state: None,
            vcpus: 1,
            mem: 64 << 20,
            policy: None,
            profile: "tenant".into(),
            enforce: None,
            alarms: None,
            alarm_rate: 1000,
            console: None,
            console_owners: Vec::new(),
            timeout: Duration::from_secs(10),
            trap_all: false,
            show_plan: false,
            json: false,
            control: None,
            patch_pubkeys: Vec::new(),
            patch_decrypt_key: None,
            patch_record: None,
            patch_record_key: None,
            patch_source: None,
            patch_poll: Duration::from_secs(1),
            quiesce_patches: false,
            vmm_key: None,
            teardown_on_exit: false,
            teardown_record: None,
            teardown_nonce: None,
            vm_id: None,
            counters_db: None,
            counters_key: None,
            page_cmd: None,
            allow_unknown_vbios: false,
            list_payloads: false,
            allow_policy_widening: false,
            on_unemulated: OnUnemulated::Stop,
            irqchip: Irqchip::Auto,
            seccomp: None,
            jail: None,
            uid: None,
            gid: None,
        }
    }
}

/// A duration as `--timeout` reads it back (whole milliseconds when it is one,
/// else seconds with nanosecond digits).
fn duration_arg(d: Duration) -> String {
    if d.subsec_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}.{:09}s", d.as_secs(), d.subsec_nanos())
    }
}

impl DeviceSpec {
    /// Whether a VMM with this backend can run under `--jail`: the in-process
    /// backends (model, rtl, lockstep). Verilator's generated model runs threads
    /// (they do not survive the jail's fork); VFIO and FPGA boards need host device
    /// nodes the jail does not bind.
    pub fn jailable(&self) -> bool {
        matches!(
            self,
            DeviceSpec::Model | DeviceSpec::Rtl | DeviceSpec::Lockstep
        )
    }
}

impl VmSpec {
    /// A run of `payload` with everything else at its default.
    pub fn new(payload: impl Into<String>) -> VmSpec {
        VmSpec {
            payload: payload.into(),
            ..VmSpec::default()
        }
    }

    /// The command-line arguments that parse back into this spec (flags at their
    /// default are left out).
    pub fn to_args(&self) -> Vec<OsString> {
        let d = VmSpec::default();
        let mut a: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, v: OsString| {
            a.push(format!("--{name}").into());
            a.push(v);
        };
        flag("payload", self.payload.clone().into());
        if self.device != d.device {
            flag("device", self.device.to_string().into());
        }
        let path = |p: &Option<PathBuf>| p.clone().map(OsString::from);
        for (name, v) in [
            ("device-state", path(&self.device_state)),
            ("policy", path(&self.policy)),
            ("alarms", path(&self.alarms)),
            ("console", path(&self.console)),
            ("control", path(&self.control)),
            ("patch-decrypt-key", path(&self.patch_decrypt_key)),
            ("patch-record", path(&self.patch_record)),
            ("patch-record-key", path(&self.patch_record_key)),
            ("patch-source", path(&self.patch_source)),
            ("vmm-key", path(&self.vmm_key)),
            ("teardown-record", path(&self.teardown_record)),
            (
                "teardown-nonce",
                self.teardown_nonce.map(|n| OsString::from(n.to_string())),
            ),
            ("vm-id", self.vm_id.clone().map(OsString::from)),
            ("counters-db", self.counters_db.clone().map(OsString::from)),
            ("counters-key", path(&self.counters_key)),
            ("page-cmd", self.page_cmd.clone().map(OsString::from)),
            ("jail", path(&self.jail)),
            (
                "seccomp",
                self.seccomp
                    .map(|e| OsString::from(if e { "on" } else { "off" })),
            ),
            ("uid", self.uid.map(|u| OsString::from(u.to_string()))),
            ("gid", self.gid.map(|g| OsString::from(g.to_string()))),
        ] {
            if let Some(v) = v {
                flag(name, v);
            }
        }
        if self.vcpus != d.vcpus {
            flag("vcpus", self.vcpus.to_string().into());
        }
        if self.mem != d.mem {
            flag("mem", self.mem.to_string().into());
        }
        if self.profile != d.profile {
            flag("profile", self.profile.clone().into());
        }
        if let Some(e) = self.enforce {
            flag("enforce", if e { "on" } else { "off" }.into());
        }
        if self.on_unemulated != d.on_unemulated {
            flag("on-unemulated", "ud".into());
        }
        if self.irqchip != d.irqchip {
            flag("irqchip", self.irqchip.as_str().into());
        }
        if self.alarm_rate != d.alarm_rate {
            flag("alarm-rate", self.alarm_rate.to_string().into());
        }
        if self.timeout != d.timeout {
            flag("timeout", duration_arg(self.timeout).into());
        }
        if self.patch_poll != d.patch_poll {
            flag("patch-poll", duration_arg(self.patch_poll).into());
        }
        for k in &self.patch_pubkeys {
            flag("patch-pubkey", k.clone().into());
        }
        for u in &self.console_owners {
            flag("console-owner", u.to_string().into());
        }
        for (name, on) in [
            ("trap-all", self.trap_all),
            ("show-plan", self.show_plan),
            ("json", self.json),
            ("teardown-on-exit", self.teardown_on_exit),
            ("quiesce-patches", self.quiesce_patches),
            ("allow-unknown-vbios", self.allow_unknown_vbios),
            ("list-payloads", self.list_payloads),
            ("allow-policy-widening", self.allow_policy_widening),
        ] {
            if on {
                a.push(format!("--{name}").into());
            }
        }
        a
    }

    /// Whether the seccomp filters are on (the default).
    pub fn seccomp_on(&self) -> bool {
        self.seccomp != Some(false)
    }

    /// Whether a teardown runs when the VM exits.
    pub fn tears_down(&self) -> bool {
        self.teardown_on_exit || self.teardown_record.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        spec: VmSpec,
    }

    fn parse(args: &[OsString]) -> VmSpec {
        let mut v: Vec<OsString> = vec!["vmm".into()];
        v.extend(args.iter().cloned());
        Cli::try_parse_from(v).expect("parses").spec
    }

    #[test]
    fn specs_round_trip_through_arguments() {
        assert_eq!(parse(&VmSpec::default().to_args()), VmSpec::default());
        let s = VmSpec {
            payload: "storm".into(),
            device: "fpga=/dev/ttyUSB1,oob=/dev/ttyUSB2,baud=9600"
                .parse()
                .unwrap(),
            device_state: Some("/s/dev.state".into()),
            vcpus: 4,
            mem: 16 << 20,
            policy: Some("lab.toml".into()),
            profile: "operator".into(),
            enforce: Some(false),
            alarms: Some("a.jsonl".into()),
            alarm_rate: 7,
            console: Some("c.txt".into()),
            console_owners: vec![ConsoleOwner::Uid(110), ConsoleOwner::User("ser2net".into())],
            timeout: Duration::from_millis(1500),
            trap_all: true,
            show_plan: true,
            json: true,
            control: Some("/run/vm.sock".into()),
            patch_pubkeys: vec!["k1.pub".into(), "k2.pub".into()],
            patch_decrypt_key: Some("x.key".into()),
            patch_record: Some("applied.json".into()),
            patch_record_key: Some("applied.key".into()),
            patch_source: Some("/srv/bundles".into()),
            patch_poll: Duration::from_millis(250),
            quiesce_patches: true,
            vmm_key: Some("vmm.key".into()),
            teardown_on_exit: true,
            teardown_record: Some("t.json".into()),
            teardown_nonce: Some(crate::teardown::Nonce([0x5a; 32])),
            vm_id: Some("case 3 step 1".into()),
            counters_db: Some("postgresql://u@127.0.0.1/db".into()),
            counters_key: Some("mac.key".into()),
            page_cmd: Some("pager --team lab".into()),
            allow_unknown_vbios: true,
            list_payloads: false,
            allow_policy_widening: true,
            on_unemulated: OnUnemulated::Ud,
            irqchip: Irqchip::Unwired,
            seccomp: Some(false),
            jail: Some("/srv/jail/vm1".into()),
            uid: Some(1000),
            gid: Some(107),
        };
        assert_eq!(parse(&s.to_args()), s);
        let odd = VmSpec {
            timeout: Duration::from_nanos(1_234_567_891),
            ..VmSpec::default()
        };
        assert_eq!(parse(&odd.to_args()), odd);
    }

    #[test]
    fn console_owners_are_uids_or_user_names() {
        for (s, o) in [
            ("110", ConsoleOwner::Uid(110)),
            ("0", ConsoleOwner::Uid(0)),
            ("ser2net", ConsoleOwner::User("ser2net".into())),
            ("_lg-exp.2", ConsoleOwner::User("_lg-exp.2".into())),
        ] {
            assert_eq!(s.parse::<ConsoleOwner>().unwrap(), o);
            assert_eq!(o.to_string(), s);
        }
        for bad in [
            "",
            "-1",
            "4294967296",
            "1x",
            "-oX",
            "a b",
            "a/b",
            "a$",
            "é",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            let e = bad.parse::<ConsoleOwner>().unwrap_err();
            assert_eq!(e, SpecError::ConsoleOwner(bad.into()), "{bad}");
        }
    }

    #[test]
    fn device_specs() {
        for s in [
            "model",
            "rtl",
            "lockstep",
            "verilator",
            "vfio=/sys/bus/pci/devices/0000:00:03.0",
            "vfio=/sys/bus/pci/devices/0000:00:03.0,desc=host-vmm/devices/edu.toml",
            "fpga=/dev/ttyUSB1",
            "fpga=/dev/pts/3,oob=/dev/pts/4,baud=9600",
        ] {
            let d: DeviceSpec = s.parse().unwrap();
            assert_eq!(d.to_string(), s);
            let j = serde_json::to_string(&d).unwrap();
            assert_eq!(serde_json::from_str::<DeviceSpec>(&j).unwrap(), d);
        }
        assert_eq!(
            "fpga=/dev/x,baud=115200"
                .parse::<DeviceSpec>()
                .unwrap()
                .to_string(),
            "fpga=/dev/x"
        );
        for bad in [
            "fpga9000",
            "vfio=",
            "vfio=,desc=x",
            "vfio=/p,desc=",
            "vfio=/p,desc=a,desc=b",
            "vfio=/p,colour=red",
            "fpga=",
            "fpga=/p,baud=0",
            "fpga=/p,speed=1",
        ] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_durations_switches() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_on_off("on"), Ok(true));
        assert_eq!(parse_on_off("No"), Ok(false));
        assert!(parse_on_off("maybe").is_err());
    }
}

//! The campaign file (TOML): parsing, validation against the attack library and a
//! host set, and expansion of the matrix into concrete cases with stable ids.

use crate::attacks::{self, Attack, StepKind};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hilrig_device::BackendKind;

pub use crate::expect::{AlarmExp, Counter, Expect, Verdict};

/// In-process device backends every host can run (a simulated device in its VMM).
pub const BACKENDS: [BackendKind; 4] = BackendKind::ALL;

/// A case's device backend: one of the in-process backends ([`BACKENDS`]), or
/// `fpga`: the device on an FPGA board over its host bridge (a board named by
/// the host's inventory, or `hilrig fpga serve-sim` in simulation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Backend {
    /// The behavioural model.
    Model,
    /// The rust-hdl RTL in-process.
    Rtl,
    /// Model and RTL side by side.
    Lockstep,
    /// The generated Verilog through Verilator.
    Verilator,
    /// A board (or its simulation) over serial ports: `--device fpga=PORT,oob=PORT`.
    Fpga,
}

impl Backend {
    /// Every campaign backend, in the order help texts list them.
    pub const ALL: [Backend; 5] = [
        Backend::Model,
        Backend::Rtl,
        Backend::Lockstep,
        Backend::Verilator,
        Backend::Fpga,
    ];

    /// The in-process backend this is (`None` for `fpga`).
    pub fn in_process(self) -> Option<BackendKind> {
        match self {
            Backend::Model => Some(BackendKind::Model),
            Backend::Rtl => Some(BackendKind::Rtl),
            Backend::Lockstep => Some(BackendKind::Lockstep),
            Backend::Verilator => Some(BackendKind::Verilator),
            Backend::Fpga => None,
        }
    }

    /// The name in campaign files and case ids.
    pub fn name(self) -> &'static str {
        match self.in_process() {
            Some(k) => k.name(),
            None => "fpga",
        }
    }
}

impl From<BackendKind> for Backend {
    fn from(k: BackendKind) -> Backend {
        match k {
            BackendKind::Model => Backend::Model,
            BackendKind::Rtl => Backend::Rtl,
            BackendKind::Lockstep => Backend::Lockstep,
            BackendKind::Verilator => Backend::Verilator,
        }
    }
}

impl PartialEq<BackendKind> for Backend {
    fn eq(&self, other: &BackendKind) -> bool {
        self.in_process() == Some(*other)
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown device backend `{s}` (campaign backends: {})",
                    Backend::ALL.map(Backend::name).join(", ")
                )
            })
    }
}

/// A board's serial ports, from a host's inventory `device = "fpga=PORT,oob=PORT"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Board {
    /// The host bridge's serial port (the board's FTDI UART), on the machine
    /// the VMM runs on (the lab host, for a host reached over SSH).
    pub port: String,
    /// The board's OOB serial port (counters, hashes, the keyed physical reset),
    /// on the controller (the rig reads it).
    pub oob: String,
    /// Baud rate of both.
    pub baud: u32,
}

/// How a host runs the `fpga` backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FpgaTarget {
    /// No board: the runner starts `hilrig fpga serve-sim` (the board top's RTL
    /// behind two PTYs) for each attempt, on this machine.
    Sim,
    /// The host's board (its inventory names the ports; on an SSH host `port`
    /// is on the host, `oob` on the controller).
    Board(Board),
    /// The host cannot run `fpga` (why).
    Unavailable(String),
}

impl FpgaTarget {
    /// The `fpga` target of an inventory host: its board when `device` names one
    /// (`fpga=PORT,oob=PORT[,baud=N]`), the simulated board for a local host
    /// without one. On a host reached over SSH (`ssh`), `fpga=PORT` is the
    /// board's host bridge on that host (the VMM's port there) and `oob=PORT` the
    /// board's OOB port on the controller's end (read by the rig, lent to the
    /// host's VMM for its teardown reads through `hilrig fpga relay-oob`); an SSH
    /// host without a board cannot run `fpga`.
    pub fn of_inventory(device: &str, ssh: bool) -> FpgaTarget {
        use hilrig_vmm_api::DeviceSpec;
        if !device.starts_with("fpga=") {
            if ssh {
                return FpgaTarget::Unavailable(
                    "reached over SSH, and its inventory names no board (device = \"fpga=PORT,oob=PORT\": the bridge port on the host, the OOB port on the controller)"
                        .into(),
                );
            }
            return FpgaTarget::Sim;
        }
        match device.parse::<DeviceSpec>() {
            Ok(DeviceSpec::Fpga {
                port,
                oob: Some(oob),
                baud,
            }) => FpgaTarget::Board(Board { port, oob, baud }),
            Ok(_) => FpgaTarget::Unavailable(format!(
                "device `{device}` names no OOB port (oob=PORT): its counters cannot be read out of band"
            )),
            Err(e) => FpgaTarget::Unavailable(e.to_string()),
        }
    }
}

/// Why `attack` cannot run on the `fpga` backend, if it cannot: a board has no
/// state file to write, snapshot or restore, and live patching and the power cut
/// drive the VMM, not the device.
pub fn fpga_unsupported(a: &Attack) -> Option<&'static str> {
    if a.setup == crate::attacks::Setup::ForeignVbios {
        return Some("it writes a VBIOS straight into the device's state file (a board has none)");
    }
    for s in &a.steps {
        let why = match s.kind {
            StepKind::Snapshot | StepKind::Restore => {
                "it copies the device's state file back (a board has none; only a simulation allows it)"
            }
            StepKind::PowerCut { .. } | StepKind::BeginUpdate(_) => {
                "its power cut kills the VMM, which a board's nonvolatile state outlives"
            }
            StepKind::PatchStorm | StepKind::BadBundles | StepKind::Rollout => {
                "it patches the VMM live (run it on model or rtl)"
            }
            _ => continue,
        };
        return Some(why);
    }
    None
}
/// Policy profiles of the built-in policy.
pub const PROFILES: &[&str] = &["tenant", "operator"];

/// A campaign file as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignFile {
    /// Campaign name (runs of the same name are diffed against each other).
    pub name: String,
    /// One line of description.
    #[serde(default)]
    pub description: String,
    /// Defaults for every case.
    #[serde(default)]
    pub defaults: Defaults,
    /// Case matrices.
    #[serde(default, rename = "case")]
    pub cases: Vec<CaseSpec>,
}

/// Campaign-wide defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Defaults {
    /// Whole campaign wall-clock bound; cases not started by then are SKIPPED.
    pub campaign_timeout: String,
    /// One attempt of a case (all its steps); exceeded: the VMM is killed, TIMEOUT.
    pub case_timeout: String,
    /// One VMM step (the VMM's own watchdog, `--timeout`).
    pub step_timeout: String,
    /// Times each case runs; all must end well.
    pub repeats: u32,
    /// Re-runs of a FAIL/TIMEOUT attempt; a later pass makes the case FLAKY.
    pub retries: u32,
    /// Re-runs of an INFRA attempt, each on another host when there is one.
    pub infra_retries: u32,
    /// Host tags cases run on when they name none.
    pub tags: Vec<String>,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            campaign_timeout: "30m".into(),
            case_timeout: "60s".into(),
            step_timeout: "20s".into(),
            repeats: 1,
            retries: 0,
            infra_retries: 2,
            tags: vec!["sim".into()],
        }
    }
}

/// One `[[case]]` block: attacks x backends x profiles x tags.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CaseSpec {
    /// Attack names, or `@group` for a whole library group (e.g. `@restricted`).
    pub attacks: Vec<String>,
    /// Attacks to leave out of `attacks` (e.g. one of a `@group`).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Device backends (default `["model"]`).
    #[serde(default)]
    pub backends: Vec<String>,
    /// Policy profiles (default `["tenant"]`).
    #[serde(default)]
    pub profiles: Vec<String>,
    /// Host tags (default: `defaults.tags`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Policy enforcement (default on); off adds `+enforce-off` to the profile in ids.
    #[serde(default)]
    pub enforce: Option<bool>,
    /// Override of `defaults.repeats`.
    #[serde(default)]
    pub repeats: Option<u32>,
    /// Override of `defaults.retries`.
    #[serde(default)]
    pub retries: Option<u32>,
    /// Override of `defaults.case_timeout`.
    #[serde(default)]
    pub timeout: Option<String>,
    /// Run each attempt alone on the machine: simulated hosts share its CPUs, and
    /// a timing bound (blackouts) measures the host scheduler when other cases run
    /// beside it. Default: the attack's (on for `patch-under-storm`).
    #[serde(default)]
    pub exclusive: Option<bool>,
    /// Expected outcome; fields left out come from the attack library.
    #[serde(default)]
    pub expect: Expect,
}

/// A simulated or real host the runner may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    /// Host name.
    pub name: String,
    /// Tags campaigns select hosts by.
    pub tags: Vec<String>,
    /// In-process backends the host can run.
    pub backends: Vec<BackendKind>,
    /// How it runs the `fpga` backend (a board, serve-sim, or not at all).
    pub fpga: FpgaTarget,
    /// Counter width of the simulated device (factory state of each attempt).
    pub counter_width: u8,
    /// Serial number of the simulated device.
    pub serial: u64,
    /// How the runner reaches the host: `None` = this machine (`local`), else
    /// over SSH (`[host.ssh]` of the inventory).
    pub ssh: Option<hilrig_rig::remote::SshSpec>,
    /// An SSH host's own device, reached through the rig's drivers (`None`: the
    /// runner stages the device state with each step).
    pub device: Option<HostDevice>,
}

/// An SSH host's own device: its state file stays on the host (`[host.sim]
/// state`), its counters are read through its OOB port (`[host.oob]`: a serial
/// port, or a network serial port over RFC 2217 or raw TCP, as a labgrid
/// place's `oob` NetworkSerialPort maps to) and its VMM's console is captured
/// through its console driver (`[host.ssh] console` is the tty the VMM writes,
/// wired to a serial or network `[[host.console]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDevice {
    /// The device state file on the host.
    pub state: String,
    /// The OOB port as the controller reaches it (the rig's OOB driver:
    /// `serial` or `rfc2217`).
    pub oob: hilrig_rig::inventory::OobSpec,
    /// The console line, if the host has one.
    pub console: Option<HostConsole>,
}

/// A lab host's console line: the VMM writes `tty` on the host, the controller
/// reads `source` (the rig's serial or network console driver).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConsole {
    /// The console's name in the inventory (e.g. `com1`).
    pub name: String,
    /// The controller's end (serial device or PTY, or a network serial port).
    pub source: hilrig_rig::console::Source,
    /// The host's end, which the VMM's `--console` names.
    pub tty: String,
    /// Who owns `tty` on the host besides the SSH user and root (`[host.ssh]
    /// console_owner`): the VMM's `--console-owner`, resolved there.
    pub owner: Option<hilrig_vmm_api::ConsoleOwner>,
}

impl HostConsole {
    /// Point `spec`'s console at this line's tty on the host, its owner named
    /// (`--console-owner`, resolved there); returns where the spec's console
    /// went before (the controller's capture file).
    pub fn wire(&self, spec: &mut hilrig_vmm_api::VmSpec) -> Option<std::path::PathBuf> {
        spec.console_owners.extend(self.owner.iter().cloned());
        spec.console.replace(std::path::PathBuf::from(&self.tty))
    }
}

impl HostDevice {
    /// The device of inventory host `h`: an SSH host with a `[host.sim] state`
    /// and a `serial` or `rfc2217` `[host.oob]`; its console when `[host.ssh]
    /// console` is set and it has a `serial` or `rfc2217` `[[host.console]]`
    /// (the first).
    pub fn of_inventory(h: &hilrig_rig::inventory::HostSpec) -> Option<HostDevice> {
        use hilrig_rig::inventory::OobSpec;
        let ssh = h.ssh.as_ref()?;
        let state = h.sim.state.as_ref()?.to_string_lossy().into_owned();
        let oob = match h.oob.as_ref()? {
            OobSpec::Sim {} => return None,
            o => o.clone(),
        };
        let console = ssh.console.as_ref().and_then(|tty| {
            h.consoles.iter().find_map(|c| {
                c.driver.source().map(|source| HostConsole {
                    name: c.name.clone(),
                    source,
                    tty: tty.clone(),
                    owner: ssh.console_owner.clone(),
                })
            })
        });
        Some(HostDevice {
            state,
            oob,
            console,
        })
    }
}

impl HostSpec {
    /// True when this host can run `case`: it has the case's tag and backend, and
    /// (for attacks driven through a VMM's local control socket) it is local.
    pub fn fits(&self, case: &Case) -> bool {
        self.tags.contains(&case.tag)
            && self.runs(case.backend)
            && (case.backend != Backend::Fpga || self.board_width_fits(&case.attack))
            && (self.ssh.is_none() || !needs_local(&case.attack))
    }

    /// False when this host's board cannot serve `a`: a board's counter width is
    /// its bitstream's (the host's `counter_width`), and `a` needs another
    /// (`fuse-exhaustion`: width 4). A simulated board is started with any width.
    pub fn board_width_fits(&self, a: &Attack) -> bool {
        match (&self.fpga, a.setup) {
            (FpgaTarget::Board(_), crate::attacks::Setup::Width(w)) => w == self.counter_width,
            _ => true,
        }
    }

    /// True when this host can run backend `b`.
    pub fn runs(&self, b: Backend) -> bool {
        match b.in_process() {
            Some(k) => self.backends.contains(&k),
            None => !matches!(self.fpga, FpgaTarget::Unavailable(_)),
        }
    }

    /// `n` simulated hosts `sim-1..=n`, tagged `sim`, running model, rtl, lockstep,
    /// verilator and fpga (on `hilrig fpga serve-sim`).
    pub fn sim(n: usize) -> Vec<HostSpec> {
        (1..=n.max(1))
            .map(|i| HostSpec {
                name: format!("sim-{i}"),
                tags: vec!["sim".into()],
                backends: BACKENDS.to_vec(),
                fpga: FpgaTarget::Sim,
                counter_width: 64,
                serial: 1,
                ssh: None,
                device: None,
            })
            .collect()
    }

    /// The hosts of a rig inventory this runner can drive: those reached over SSH
    /// (`[host.ssh]`) and the local simulated ones (model, rtl and lockstep;
    /// device counter width and serial from the inventory's `[host.sim]`). Other
    /// hosts (hardware with no `[host.ssh]`) are left out and named in the second
    /// list.
    pub fn from_inventory(inv: &hilrig_rig::inventory::Inventory) -> (Vec<HostSpec>, Vec<String>) {
        Self::from_hosts(&inv.hosts)
    }

    /// [`HostSpec::from_inventory`] over any host source's hosts.
    pub fn from_hosts(hosts: &[hilrig_rig::inventory::HostSpec]) -> (Vec<HostSpec>, Vec<String>) {
        let (mut sim, mut other) = (Vec::new(), Vec::new());
        for h in hosts {
            if h.ssh.is_some() || h.is_sim() {
                sim.push(HostSpec {
                    name: h.name.clone(),
                    tags: h.tags.iter().cloned().collect(),
                    backends: BACKENDS.to_vec(),
                    fpga: FpgaTarget::of_inventory(&h.device, h.ssh.is_some()),
                    counter_width: h.sim.counter_width,
                    serial: h.sim.serial.unwrap_or(1),
                    ssh: h.ssh.clone(),
                    device: HostDevice::of_inventory(h),
                });
            } else {
                other.push(h.name.clone());
            }
        }
        (sim, other)
    }
}

/// True for attacks whose steps the runner drives on this machine while the VMM
/// runs (a control socket: live patches, the fleet rollout; the power cut watches
/// the console and kills the VMM): they run on `local` hosts only.
pub fn needs_local(a: &Attack) -> bool {
    a.steps.iter().any(|s| {
        matches!(
            s.kind,
            StepKind::PatchStorm
                | StepKind::BadBundles
                | StepKind::Rollout
                | StepKind::PowerCut { .. }
        )
    })
}

/// One concrete case of an expanded campaign.
#[derive(Debug, Clone)]
pub struct Case {
    /// `attack/backend/profile@tag` (profile gets `+enforce-off` when enforcement is off).
    pub id: String,
    /// The attack.
    pub attack: Attack,
    /// Device backend.
    pub backend: Backend,
    /// Policy profile.
    pub profile: String,
    /// Enforcement.
    pub enforce: bool,
    /// Host tag.
    pub tag: String,
    /// Expected outcome (campaign over library defaults).
    pub expect: Expect,
    /// Runs of the case.
    pub repeats: u32,
    /// FAIL/TIMEOUT re-runs.
    pub retries: u32,
    /// INFRA re-runs.
    pub infra_retries: u32,
    /// One attempt's bound.
    pub timeout: Duration,
    /// One VMM step's watchdog.
    pub step_timeout: Duration,
    /// Attempts run alone on the machine.
    pub exclusive: bool,
}

/// A validated, expanded campaign.
#[derive(Debug, Clone)]
pub struct Campaign {
    /// Campaign name.
    pub name: String,
    /// Where it was read from.
    pub file: PathBuf,
    /// Whole-campaign bound.
    pub timeout: Duration,
    /// Cases, in file order.
    pub cases: Vec<Case>,
}

/// One reason a campaign file was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `case[i]` (and the case id when known), or empty for the file as a whole.
    pub case: String,
    /// What is wrong.
    pub reason: String,
}

/// Errors reading a campaign.
#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Refused before parsing: not a regular file, or over [`MAX_CAMPAIGN_BYTES`]
    /// (the message names the file and the sizes).
    #[error("campaign file {0}")]
    Refused(hilrig_device::secure::SecureFileError),
    /// Not valid campaign TOML.
    #[error("{}: {message}", path.display())]
    Parse {
        /// File.
        path: PathBuf,
        /// The TOML/serde error (names line and field).
        message: String,
    },
    /// Parsed, but refused by validation.
    #[error("{}: campaign refused:\n{}", path.display(), problems.iter().map(|p| if p.case.is_empty() { format!("  {}", p.reason) } else { format!("  {}: {}", p.case, p.reason) }).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// File.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

/// A duration field of the file; the problem names the field.
fn dur(s: &str, what: &str) -> Result<Duration, Problem> {
    hilrig_vmm_api::spec::parse_duration(s).map_err(|e| Problem {
        case: String::new(),
        reason: format!("{what}: {e}"),
    })
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// Largest campaign file read (bytes); a larger one is refused before parsing.
pub const MAX_CAMPAIGN_BYTES: u64 = 1 << 20;

/// Read, validate and expand the campaign at `path` for `hosts`. The file must be
/// a regular file of at most [`MAX_CAMPAIGN_BYTES`]; it is read with that bound.
pub fn load(path: &Path, hosts: &[HostSpec]) -> Result<Campaign, CampaignError> {
    use hilrig_device::secure::{read_bounded, SecureFileError};
    let text = read_bounded(path, MAX_CAMPAIGN_BYTES).map_err(|e| match e {
        SecureFileError::Io { path, source } => CampaignError::Io { path, source },
        e => CampaignError::Refused(e),
    })?;
    parse(&text, path, hosts)
}

/// [`load`] from text (`path` names it in errors).
pub fn parse(text: &str, path: &Path, hosts: &[HostSpec]) -> Result<Campaign, CampaignError> {
    let file: CampaignFile = toml::from_str(text).map_err(|e| CampaignError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    expand(&file, path, hosts)
}

/// The attacks a case names (groups expanded, exclusions applied); unknown names are
/// problems.
fn resolve_attacks(spec: &CaseSpec, bad: &mut dyn FnMut(String)) -> Vec<Attack> {
    let mut attacks_v: Vec<Attack> = Vec::new();
    if spec.attacks.is_empty() {
        bad("attacks is empty".into());
    }
    for a in &spec.attacks {
        if let Some(g) = a.strip_prefix('@') {
            let names = attacks::group(g);
            if names.is_empty() {
                bad(format!("unknown attack group `@{g}`"));
            }
            attacks_v.extend(names.into_iter().filter_map(attacks::find));
        } else {
            match attacks::find(a) {
                Some(x) => attacks_v.push(x),
                None => bad(format!(
                    "unknown attack `{a}` (see `hilrig campaign list-attacks`)"
                )),
            }
        }
    }
    for x in &spec.exclude {
        if attacks::find(x).is_none() {
            bad(format!("exclude names unknown attack `{x}`"));
        }
    }
    attacks_v.retain(|a| !spec.exclude.iter().any(|x| x == a.name));
    attacks_v
}

/// The backends a case names (default: the model); unknown ones are problems.
fn resolve_backends(spec: &CaseSpec, bad: &mut dyn FnMut(String)) -> Vec<Backend> {
    let mut backends = Vec::new();
    if spec.backends.is_empty() {
        backends.push(Backend::Model);
    }
    for b in &spec.backends {
        match b.parse::<Backend>() {
            Ok(k) => backends.push(k),
            Err(e) => bad(e),
        }
    }
    backends
}

/// Why no host tagged `tag` runs `b` (for the matrix error).
fn cannot_run(hosts: &[HostSpec], tag: &str, b: Backend) -> String {
    let mut s = format!("no host tagged `{tag}` can run backend `{b}`");
    if b == Backend::Fpga {
        let why: Vec<String> = hosts
            .iter()
            .filter(|h| h.tags.iter().any(|t| t == tag))
            .filter_map(|h| match &h.fpga {
                FpgaTarget::Unavailable(w) => Some(format!("{}: {w}", h.name)),
                _ => None,
            })
            .collect();
        if !why.is_empty() {
            s.push_str(&format!(" ({})", why.join("; ")));
        }
    }
    s
}

/// The profiles a case names (default: tenant); unknown ones are problems.
fn resolve_profiles(spec: &CaseSpec, bad: &mut dyn FnMut(String)) -> Vec<String> {
    let profiles = if spec.profiles.is_empty() {
        vec!["tenant".to_string()]
    } else {
        spec.profiles.clone()
    };
    for p in &profiles {
        if !PROFILES.contains(&p.as_str()) {
            bad(format!(
                "unknown profile `{p}` (known: {})",
                PROFILES.join(", ")
            ));
        }
    }
    profiles
}

/// The host tags a case runs on (default: the campaign's); tags no host has are
/// problems.
fn resolve_tags(
    spec: &CaseSpec,
    d: &Defaults,
    known_tags: &BTreeSet<&str>,
    bad: &mut dyn FnMut(String),
) -> Vec<String> {
    let tags = if spec.tags.is_empty() {
        d.tags.clone()
    } else {
        spec.tags.clone()
    };
    for t in &tags {
        if !known_tags.contains(t.as_str()) {
            bad(format!(
                "unknown host tag `{t}` (the hosts have: {})",
                known_tags.iter().copied().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    tags
}

/// Validate `file` and expand its matrices.
pub fn expand(
    file: &CampaignFile,
    path: &Path,
    hosts: &[HostSpec],
) -> Result<Campaign, CampaignError> {
    let mut problems = Vec::new();
    let mut top = |reason: String| {
        problems.push(Problem {
            case: String::new(),
            reason,
        })
    };
    if file.name.trim().is_empty()
        || !file
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        top(format!(
            "name `{}` must be non-empty letters, digits, - and _",
            file.name
        ));
    }
    let d = &file.defaults;
    let timeout = dur(&d.campaign_timeout, "defaults.campaign_timeout").unwrap_or_else(|e| {
        top(e.reason);
        Duration::from_secs(1)
    });
    let case_timeout = dur(&d.case_timeout, "defaults.case_timeout").unwrap_or_else(|e| {
        top(e.reason);
        Duration::from_secs(1)
    });
    let step_timeout = dur(&d.step_timeout, "defaults.step_timeout").unwrap_or_else(|e| {
        top(e.reason);
        Duration::from_secs(1)
    });
    if d.repeats == 0 {
        top("defaults.repeats must be at least 1".into());
    }
    if file.cases.is_empty() {
        top("no [[case]]: nothing to run".into());
    }
    let known_tags: BTreeSet<&str> = hosts
        .iter()
        .flat_map(|h| h.tags.iter().map(|t| t.as_str()))
        .collect();
    let mut cases = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, spec) in file.cases.iter().enumerate() {
        let at = format!("case[{i}]");
        let mut bad = |reason: String| {
            problems.push(Problem {
                case: at.clone(),
                reason,
            })
        };
        let attacks_v = resolve_attacks(spec, &mut bad);
        let backends = resolve_backends(spec, &mut bad);
        let profiles = resolve_profiles(spec, &mut bad);
        let tags = resolve_tags(spec, d, &known_tags, &mut bad);
        let case_timeout = match &spec.timeout {
            Some(t) => dur(t, "timeout").unwrap_or_else(|e| {
                bad(e.reason);
                case_timeout
            }),
            None => case_timeout,
        };
        let repeats = spec.repeats.unwrap_or(d.repeats);
        if repeats == 0 {
            bad("repeats must be at least 1".into());
        }
        let enforce = spec.enforce.unwrap_or(true);
        for a in &attacks_v {
            for b in &backends {
                for p in &profiles {
                    for t in &tags {
                        let prof_id = if enforce {
                            p.clone()
                        } else {
                            format!("{p}+enforce-off")
                        };
                        let id = format!("{}/{b}/{prof_id}@{t}", a.name);
                        if enforce
                            && !a.profiles.is_empty()
                            && PROFILES.contains(&p.as_str())
                            && !a.profiles.contains(&p.as_str())
                        {
                            bad(format!(
                                "{id}: attack `{}` needs profile {} or enforce = false (it drives the flash controller)",
                                a.name,
                                a.profiles.join(" or ")
                            ));
                        }
                        let expect = spec.expect.over(&attacks::default_expect(a, p, enforce));
                        for c in expect.contradictions() {
                            bad(format!("{id}: contradictory expectations: {c}"));
                        }
                        if *b == Backend::Fpga {
                            if let Some(why) = fpga_unsupported(a) {
                                bad(format!(
                                    "{id}: attack `{}` cannot run on the fpga backend: {why}",
                                    a.name
                                ));
                            }
                        }
                        let tagged = |h: &&HostSpec| h.tags.contains(t) && h.runs(*b);
                        if known_tags.contains(t.as_str()) && !hosts.iter().any(|h| tagged(&h)) {
                            bad(format!("{id}: {}", cannot_run(hosts, t, *b)));
                        } else if known_tags.contains(t.as_str())
                            && *b == Backend::Fpga
                            && !hosts.iter().filter(tagged).any(|h| h.board_width_fits(a))
                        {
                            bad(format!(
                                "{id}: attack `{}` needs a device of another counter width than every board tagged `{t}` has (a board's width is its bitstream's)",
                                a.name
                            ));
                        } else if known_tags.contains(t.as_str())
                            && needs_local(a)
                            && !hosts
                                .iter()
                                .any(|h| h.tags.contains(t) && h.runs(*b) && h.ssh.is_none())
                        {
                            bad(format!(
                                "{id}: attack `{}` drives its VMM through a local control socket or power cut; no local host tagged `{t}` (every one is reached over SSH)",
                                a.name
                            ));
                        }
                        if let Some(j) = seen.insert(id.clone(), i) {
                            bad(format!("{id}: duplicate of a case in case[{j}]"));
                        }
                        cases.push(Case {
                            id,
                            attack: a.clone(),
                            backend: *b,
                            profile: p.clone(),
                            enforce,
                            tag: t.clone(),
                            expect,
                            repeats: repeats.max(1),
                            retries: spec.retries.unwrap_or(d.retries),
                            infra_retries: d.infra_retries,
                            timeout: case_timeout,
                            step_timeout,
                            exclusive: spec.exclusive.unwrap_or(a.exclusive),
                        });
                    }
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(CampaignError::Invalid {
            path: path.to_path_buf(),
            problems,
        });
    }
    Ok(Campaign {
        name: file.name.clone(),
        file: path.to_path_buf(),
        timeout,
        cases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Campaign, CampaignError> {
        parse(text, Path::new("t.toml"), &HostSpec::sim(2))
    }

    #[test]
    fn expands_matrix_with_stable_ids() {
        let c = p(r#"
name = "t"
[[case]]
attacks = ["attack-hang", "pci-enum"]
backends = ["model", "rtl"]
profiles = ["tenant", "operator"]
"#)
        .unwrap();
        assert_eq!(c.cases.len(), 8);
        assert_eq!(c.cases[0].id, "attack-hang/model/tenant@sim");
        assert!(c.cases.iter().any(|k| k.id == "pci-enum/rtl/operator@sim"));
        let hang = &c.cases[0];
        assert_eq!(hang.expect.alarms, Some(AlarmExp::Some));
    }

    #[test]
    fn groups_expand() {
        let c = p("name = \"t\"\n[[case]]\nattacks = [\"@restricted\"]\n").unwrap();
        assert_eq!(c.cases.len(), hilrig_vmm::attacks::ATTACKS.len());
    }

    fn problems(e: CampaignError) -> Vec<Problem> {
        match e {
            CampaignError::Invalid { problems, .. } => problems,
            other => panic!("expected Invalid, got {other}"),
        }
    }

    #[test]
    fn unknown_attack_backend_profile_tag_refused() {
        let e = p(r#"
name = "t"
[[case]]
attacks = ["attack-nope"]
backends = ["fpga9000"]
profiles = ["root"]
tags = ["rack7"]
"#)
        .unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("t.toml: campaign refused"), "{text}");
        let pr = problems(e);
        assert!(pr.iter().all(|p| p.case == "case[0]"));
        for w in ["attack-nope", "fpga9000", "root", "rack7"] {
            assert!(pr.iter().any(|p| p.reason.contains(w)), "{w}: {pr:?}");
        }
    }

    #[test]
    fn contradictory_expectations_refused() {
        let e = p(r#"
name = "t"
[[case]]
attacks = ["attack-hang"]
expect = { alarms = "none", alarm_registers = ["HANG_TRIGGER"] }
[[case]]
attacks = ["vbios-overwrite"]
expect = { alarms = "some" }
[[case]]
attacks = ["pci-enum"]
expect = { verdict = "pass", exit_status = 3 }
"#)
        .unwrap_err();
        let pr = problems(e);
        assert!(pr.iter().any(|p| p.case == "case[0]"
            && p.reason.contains("attack-hang/model/tenant@sim")
            && p.reason.contains("alarm_registers")));
        assert!(pr
            .iter()
            .any(|p| p.case == "case[1]" && p.reason.contains("refused")));
        assert!(pr
            .iter()
            .any(|p| p.case == "case[2]" && p.reason.contains("exit_status = 3")));
    }

    #[test]
    fn host_set_that_cannot_run_refused() {
        let hosts = vec![HostSpec {
            name: "h".into(),
            tags: vec!["sim".into()],
            backends: vec![BackendKind::Model],
            fpga: FpgaTarget::Unavailable("no board".into()),
            counter_width: 64,
            serial: 1,
            ssh: None,
            device: None,
        }];
        let e = parse(
            "name = \"t\"\n[[case]]\nattacks = [\"pci-enum\"]\nbackends = [\"rtl\"]\n",
            Path::new("t.toml"),
            &hosts,
        )
        .unwrap_err();
        assert!(e
            .to_string()
            .contains("no host tagged `sim` can run backend `rtl`"));
    }

    #[test]
    fn unknown_fields_and_duplicates_refused() {
        let e = p("name = \"t\"\n[[case]]\nattacks = [\"pci-enum\"]\nbogus = 1\n").unwrap_err();
        assert!(matches!(e, CampaignError::Parse { .. }), "{e}");
        assert!(e.to_string().contains("bogus"));
        let e = p("name = \"t\"\n[[case]]\nattacks = [\"pci-enum\"]\n[[case]]\nattacks = [\"pci-enum\"]\n")
            .unwrap_err();
        assert!(e.to_string().contains("duplicate"), "{e}");
    }

    #[test]
    fn operator_only_attacks_refused_for_an_enforced_tenant() {
        let e = p(
            "name = \"t\"\n[[case]]\nattacks = [\"fuse-exhaustion\"]\nprofiles = [\"tenant\"]\n",
        )
        .unwrap_err();
        let pr = problems(e);
        assert!(
            pr.iter().any(|p| p.case == "case[0]"
                && p.reason.contains("fuse-exhaustion/model/tenant@sim")
                && p.reason.contains("needs profile operator")),
            "{pr:?}"
        );
        // Enforcement off lets the tenant reach the flash controller: allowed.
        p("name = \"t\"\n[[case]]\nattacks = [\"fuse-exhaustion\"]\nprofiles = [\"tenant\"]\nenforce = false\n")
            .unwrap();
        let e = p("name = \"t\"\n[[case]]\nattacks = [\"patch-under-storm\"]\nexpect = { blackout_max_us = 0 }\n[[case]]\nattacks = [\"fuse-exhaustion\"]\nprofiles = [\"operator\"]\nexpect = { service_verdict = \"trusted\" }\n")
            .unwrap_err();
        let pr = problems(e);
        assert!(
            pr.iter()
                .any(|p| p.case == "case[0]" && p.reason.contains("blackout_max_us = 0")),
            "{pr:?}"
        );
        assert!(
            pr.iter()
                .any(|p| p.case == "case[1]" && p.reason.contains("blown fuse")),
            "{pr:?}"
        );
    }

    #[test]
    fn timing_sensitive_attacks_are_exclusive_by_default() {
        let c = p("name = \"t\"\n[[case]]\nattacks = [\"patch-under-storm\", \"pci-enum\"]\n[[case]]\nattacks = [\"patch-under-storm\"]\nprofiles = [\"operator\"]\nexclusive = false\n").unwrap();
        let ex: Vec<(&str, bool)> = c
            .cases
            .iter()
            .map(|k| (k.id.as_str(), k.exclusive))
            .collect();
        assert_eq!(
            ex,
            vec![
                ("patch-under-storm/model/tenant@sim", true),
                ("pci-enum/model/tenant@sim", false),
                ("patch-under-storm/model/operator@sim", false),
            ]
        );
    }

    #[test]
    fn fpga_cases_expand_and_what_a_board_cannot_do_is_refused() {
        let c = p("name = \"t\"\n[[case]]\nattacks = [\"pci-enum\", \"fuse-exhaustion\"]\nbackends = [\"fpga\"]\nprofiles = [\"operator\"]\n")
            .unwrap();
        let ids: Vec<&str> = c.cases.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "pci-enum/fpga/operator@sim",
                "fuse-exhaustion/fpga/operator@sim"
            ]
        );
        assert_eq!(c.cases[0].backend, Backend::Fpga);
        // A board has no state file to restore or write a VBIOS into; the power cut
        // and live patching drive the VMM.
        let e = p("name = \"t\"\n[[case]]\nattacks = [\"rollback-state-file\", \"vbios-overwrite\", \"power-cut-program\", \"patch-under-storm\"]\nbackends = [\"fpga\"]\nprofiles = [\"operator\"]\n")
            .unwrap_err();
        let pr = problems(e);
        for a in [
            "rollback-state-file",
            "vbios-overwrite",
            "power-cut-program",
            "patch-under-storm",
        ] {
            assert!(
                pr.iter().any(|p| p.reason.contains(&format!("{a}/fpga/"))
                    && p.reason.contains("cannot run on the fpga backend")),
                "{a}: {pr:?}"
            );
        }
    }

    #[test]
    fn a_tag_whose_hosts_cannot_run_fpga_is_a_matrix_error() {
        let ssh = HostSpec {
            name: "far".into(),
            tags: vec!["lab".into()],
            backends: BACKENDS.to_vec(),
            fpga: FpgaTarget::of_inventory("model", true),
            counter_width: 64,
            serial: 1,
            ssh: None,
            device: None,
        };
        let e = parse(
            "name = \"t\"\n[defaults]\ntags = [\"lab\"]\n[[case]]\nattacks = [\"pci-enum\"]\nbackends = [\"fpga\"]\n",
            Path::new("t.toml"),
            &[ssh],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("pci-enum/fpga/tenant@lab: no host tagged `lab` can run backend `fpga` (far: reached over SSH, and its inventory names no board"),
            "{e}"
        );
    }

    #[test]
    fn a_board_of_another_width_gets_no_case_needing_one() {
        let board = HostSpec {
            name: "bench".into(),
            tags: vec!["lab".into()],
            backends: BACKENDS.to_vec(),
            fpga: FpgaTarget::of_inventory("fpga=/dev/ttyUSB1,oob=/dev/ttyUSB2", false),
            counter_width: 16,
            serial: 1,
            ssh: None,
            device: None,
        };
        let text = "name = \"t\"\n[defaults]\ntags = [\"lab\"]\n[[case]]\nattacks = [\"fuse-exhaustion\"]\nbackends = [\"fpga\"]\nprofiles = [\"operator\"]\n";
        let e = parse(text, Path::new("t.toml"), std::slice::from_ref(&board))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("fuse-exhaustion/fpga/operator@lab") && e.contains("counter width"),
            "{e}"
        );
        // With a simulated board beside it the case runs, never on the board.
        let mut sim = board.clone();
        sim.name = "sim".into();
        sim.fpga = FpgaTarget::Sim;
        let c = parse(text, Path::new("t.toml"), &[board.clone(), sim.clone()]).unwrap();
        assert!(!board.fits(&c.cases[0]) && sim.fits(&c.cases[0]));
    }

    #[test]
    fn an_ssh_hosts_board_has_its_bridge_there_and_its_oob_here() {
        assert_eq!(
            FpgaTarget::of_inventory("fpga=/home/u/fpga-bridge,oob=/lab/h1/fpga-oob", true),
            FpgaTarget::Board(Board {
                port: "/home/u/fpga-bridge".into(),
                oob: "/lab/h1/fpga-oob".into(),
                baud: 115_200
            })
        );
        // Without the controller's end of the OOB line the rig cannot read it.
        let FpgaTarget::Unavailable(why) = FpgaTarget::of_inventory("fpga=/dev/ttyUSB1", true)
        else {
            panic!("an SSH host's board without oob= was accepted")
        };
        assert!(why.contains("oob=PORT"), "{why}");
    }

    /// `[host.ssh] console_owner` reaches the step's VMM as `--console-owner`
    /// with the host's console tty (a name, resolved on the host).
    #[test]
    fn a_console_owner_in_the_inventory_reaches_the_vmm_spec() {
        let text = "[[host]]\nname = \"h1\"\n[host.sim]\nstate = \"/w/device.state\"\n[host.ssh]\naddress = \"127.0.0.11\"\nuser = \"u\"\nidentity = \"/k\"\nknown_hosts = \"/kh\"\nworkdir = \"/w\"\nconsole = \"/w/console.tty\"\nconsole_owner = \"ser2net\"\n[[host.console]]\nname = \"com1\"\ndriver = \"serial\"\npath = \"/tmp/c\"\n[host.oob]\ndriver = \"serial\"\npath = \"/tmp/o\"\n[host.power]\ndriver = \"sim\"\n";
        let inv = hilrig_rig::inventory::Inventory::parse(text, std::path::Path::new("lab.toml"))
            .unwrap();
        let dev = HostDevice::of_inventory(&inv.hosts[0]).unwrap();
        let line = dev.console.unwrap();
        let mut spec = hilrig_vmm_api::VmSpec {
            console: Some("/out/console.txt".into()),
            ..hilrig_vmm_api::VmSpec::default()
        };
        assert_eq!(line.wire(&mut spec), Some("/out/console.txt".into()));
        assert_eq!(spec.console, Some("/w/console.tty".into()));
        let args: Vec<String> = spec
            .to_args()
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            args.windows(2)
                .any(|w| w[0] == "--console-owner" && w[1] == "ser2net"),
            "{args:?}"
        );
        // Without it: no owner named, the VMM refuses another user's terminal.
        let inv = hilrig_rig::inventory::Inventory::parse(
            &text.replace("console_owner = \"ser2net\"\n", ""),
            std::path::Path::new("lab.toml"),
        )
        .unwrap();
        let mut spec = hilrig_vmm_api::VmSpec::default();
        HostDevice::of_inventory(&inv.hosts[0])
            .unwrap()
            .console
            .unwrap()
            .wire(&mut spec);
        assert!(spec.console_owners.is_empty());
    }

    #[test]
    fn an_inventory_device_names_the_board() {
        assert_eq!(
            FpgaTarget::of_inventory("fpga=/dev/ttyUSB1,oob=/dev/ttyUSB2", false),
            FpgaTarget::Board(Board {
                port: "/dev/ttyUSB1".into(),
                oob: "/dev/ttyUSB2".into(),
                baud: 115_200
            })
        );
        assert_eq!(FpgaTarget::of_inventory("model", false), FpgaTarget::Sim);
        // No OOB port: the counters cannot be read out of band.
        let FpgaTarget::Unavailable(why) = FpgaTarget::of_inventory("fpga=/dev/ttyUSB1", false)
        else {
            panic!("a board without oob= was accepted")
        };
        assert!(why.contains("oob=PORT"), "{why}");
        let FpgaTarget::Unavailable(why) = FpgaTarget::of_inventory("fpga=/dev/x,baud=0", false)
        else {
            panic!("a bad baud rate was accepted")
        };
        assert!(why.contains("baud"), "{why}");
    }

    #[test]
    fn shipped_campaigns_validate() {
        for f in ["smoke.toml", "nightly.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            let c = load(&path, &HostSpec::sim(2)).unwrap_or_else(|e| panic!("{e}"));
            assert!(!c.cases.is_empty());
        }
    }
}

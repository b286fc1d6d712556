//! `hilrig rig ...`: the command-line edge (anyhow lives only here).

use crate::lease::{default_holder, LeaseStore};
use crate::power::PowerState;
use crate::rig::Rig;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Power actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PowerAction {
    /// Power on (read back).
    On,
    /// Power off (read back).
    Off,
    /// Off then on (both read back).
    Cycle,
    /// Read the state back.
    Status,
}

/// OOB requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OobAction {
    /// Counters, master, fuse, slots left, width, epoch (JSON).
    Counters,
    /// Device identity.
    Identify,
}

/// Lease commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum LeaseCmd {
    /// Every lease row.
    List,
    /// Who holds a host, until when.
    Who {
        /// The host.
        host: String,
    },
    /// Take a host (fails if someone else holds it, or the inventory has no such host).
    Acquire {
        /// The host.
        host: String,
        /// The inventory the host must be in.
        #[arg(long)]
        inventory: PathBuf,
        /// Holder name (default: hostname:pid:nonce, printed).
        #[arg(long)]
        holder: Option<String>,
        /// Lease time, e.g. 60s, 10m.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        ttl: Duration,
        /// The counters service to consult (SQLite path or postgresql:// URL;
        /// default: the inventory's `[counters] db`): a host whose device it does
        /// not vouch for (quarantined, locked, held, needs-reflash, unknown) is
        /// refused with the verdict.
        #[arg(long, requires = "counters_key")]
        counters_db: Option<String>,
        /// The counters service's MAC key file.
        #[arg(long)]
        counters_key: Option<PathBuf>,
        /// The counters service's anchor (file, sqlite:PATH or URL).
        #[arg(long)]
        counters_anchor: Option<String>,
    },
    /// Give a host back.
    Release {
        /// The host.
        host: String,
        /// The holder that took it.
        #[arg(long)]
        holder: String,
    },
}

/// Lease enforcement for power, console and OOB actions.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LeaseArgs {
    /// The lease database (SQLite path or postgres:// URL; default
    /// `HILRIG_LEASES`): an action on a host someone else holds is refused.
    #[arg(long)]
    pub leases: Option<String>,
    /// Who is acting (default `HILRIG_HOLDER`, else `$USER@hostname`).
    #[arg(long)]
    pub holder: Option<String>,
    /// Act on a host leased by someone else anyway; the reason is logged.
    #[arg(long, value_name = "REASON")]
    pub force: Option<String>,
}

impl LeaseArgs {
    /// The rig, enforcing leases when a lease database is named.
    pub fn apply(&self, rig: Rig) -> Result<Rig> {
        let db = self.leases.clone().or_else(|| {
            std::env::var("HILRIG_LEASES")
                .ok()
                .filter(|s| !s.is_empty())
        });
        let Some(db) = db else { return Ok(rig) };
        if matches!(&self.force, Some(r) if r.trim().is_empty()) {
            anyhow::bail!("--force needs a reason");
        }
        Ok(rig.with_leases(crate::lease::LeaseGuard {
            store: LeaseStore::open(&db)?,
            holder: self.holder.clone().unwrap_or_else(cli_holder),
            force: self.force.clone(),
        }))
    }
}

/// The holder name of a person at the command line: `HILRIG_HOLDER`, else
/// `$USER@hostname`.
pub fn cli_holder() -> String {
    if let Ok(h) = std::env::var("HILRIG_HOLDER") {
        if !h.is_empty() {
            return h;
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
    format!("{user}@{host}")
}

/// Host device-state commands (LAVA's Good/Bad).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum HostCmd {
    /// Every recorded host state.
    List,
    /// Bring a host back after a failed health check.
    Online {
        /// The host.
        host: String,
        /// Why (recorded).
        #[arg(long, default_value = "brought back by an operator")]
        reason: String,
    },
    /// Take a host out of service.
    Offline {
        /// The host.
        host: String,
        /// Why (recorded, shown to runners).
        #[arg(long)]
        reason: String,
    },
}

/// Board commands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BoardCmd {
    /// Attach through the probe and identify the target.
    Probe,
    /// Flash an ELF or binary (default: the inventory's image) and reset.
    Flash {
        /// The image.
        image: Option<PathBuf>,
    },
    /// Reset the target.
    Reset,
}

/// `hilrig rig --labgrid HOST:PORT ...`: the same commands on labgrid places.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum LabgridCmd {
    /// Places carrying all the given tags (`key=value`), with their holder and
    /// mapped drivers.
    Hosts {
        /// Required tags, `key=value`.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// JSON lines instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Probe the drivers of places (named, or by tag; default all). A place
    /// acquired by someone else is not probed (listed as left alone).
    Check {
        /// Places.
        places: Vec<String>,
        /// Required tags, `key=value`.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// One JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Power a place on/off/cycle, or read its state back.
    Power {
        /// Place.
        place: String,
        /// Action.
        action: PowerAction,
        /// A JSON line instead of text.
        #[arg(long)]
        json: bool,
        /// Act on a place acquired by someone else anyway; the reason is logged.
        #[arg(long, value_name = "REASON")]
        force: Option<String>,
    },
    /// Capture a place's console (RFC 2217) for a while.
    Console {
        /// Place.
        place: String,
        /// Console (resource) name; default the first.
        #[arg(long)]
        console: Option<String>,
        /// How long to capture, e.g. 10s.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        /// Act on a place acquired by someone else anyway; the reason is logged.
        #[arg(long, value_name = "REASON")]
        force: Option<String>,
    },
    /// Ask a place's device over its `oob` serial port.
    Oob {
        /// Place.
        place: String,
        /// Request.
        action: OobAction,
        /// Act on a place acquired by someone else anyway; the reason is logged.
        #[arg(long, value_name = "REASON")]
        force: Option<String>,
    },
}

/// `hilrig rig` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum RigCmd {
    /// Hosts from a labgrid coordinator (`hilrig rig --labgrid HOST:PORT
    /// hosts|check|power|console|oob ...`): places by name or tags, acquired for
    /// the action when free, refused when acquired by someone else.
    #[command(long_flag = "labgrid")]
    Labgrid {
        /// The coordinator, HOST:PORT.
        address: String,
        /// Lab settings labgrid does not publish (SSH key, pinned host keys,
        /// power readback), TOML; see rig/README.md.
        #[arg(long)]
        labgrid_config: Option<PathBuf>,
        /// Our user name at the coordinator (default LG_HOSTNAME/LG_USERNAME,
        /// as labgrid-client).
        #[arg(long)]
        user: Option<String>,
        /// How long to wait for a place's exporter to publish every resource
        /// the place's matches name (and mark it available) before acting on
        /// it, e.g. 10s; 0: do not wait. Not in time: an error naming the place
        /// and what is missing.
        #[arg(long, default_value = "10s", value_parser = parse_wait)]
        labgrid_wait: Duration,
        /// Command.
        #[command(subcommand)]
        cmd: LabgridCmd,
    },
    /// Probe every driver of every host and print a health table (exit 1 if any
    /// host is unhealthy).
    Check {
        /// Inventory file (TOML).
        inventory: PathBuf,
        /// One JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// List hosts carrying all the given tags.
    Hosts {
        /// Inventory file.
        inventory: PathBuf,
        /// Required tags.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// JSON lines instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Power a host on/off/cycle, or read its state; every action is read back.
    Power {
        /// Inventory file.
        inventory: PathBuf,
        /// Host name.
        host: String,
        /// Action.
        action: PowerAction,
        /// A JSON line instead of text.
        #[arg(long)]
        json: bool,
        /// Lease enforcement.
        #[command(flatten)]
        lease: LeaseArgs,
    },
    /// Capture a host's console (timestamped lines) to a file or standard output.
    Console {
        /// Inventory file.
        inventory: PathBuf,
        /// Host name.
        host: String,
        /// Console name (default: the host's first console).
        #[arg(long)]
        console: Option<String>,
        /// Capture file (default: standard output at the end).
        #[arg(long)]
        out: Option<PathBuf>,
        /// How long to capture, e.g. 10s.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        /// Attach: print the timestamped lines as they come, until interrupted
        /// (the capture file, if any, keeps them too); `--duration` is ignored.
        #[arg(long)]
        follow: bool,
        /// Lease enforcement.
        #[command(flatten)]
        lease: LeaseArgs,
    },
    /// Ask a host's device over its OOB UART.
    Oob {
        /// Inventory file.
        inventory: PathBuf,
        /// Host name.
        host: String,
        /// Request.
        action: OobAction,
        /// Lease enforcement.
        #[command(flatten)]
        lease: LeaseArgs,
    },
    /// Host leases in a results database (SQLite path or postgres:// URL).
    Lease {
        /// Database.
        db: String,
        /// JSON lines instead of text.
        #[arg(long)]
        json: bool,
        /// Command.
        #[command(subcommand)]
        cmd: LeaseCmd,
    },
    /// Host device states (online / offline with the reason) in a results
    /// database (SQLite file): a host a health check took offline stays so for
    /// every runner until `online`.
    Host {
        /// Database (SQLite file).
        db: String,
        /// JSON lines instead of text.
        #[arg(long)]
        json: bool,
        /// Command.
        #[command(subcommand)]
        cmd: HostCmd,
    },
    /// List attached debug probes (probe-rs).
    Probes,
    /// A host's MCU/FPGA board through its debug probe.
    Board {
        /// Inventory file.
        inventory: PathBuf,
        /// Host name.
        host: String,
        /// Command.
        #[command(subcommand)]
        cmd: BoardCmd,
    },
    /// The host side of a runner's SSH steps: framed step requests on standard
    /// input, framed results on standard output (`remote::serve_steps`).
    #[command(hide = true)]
    StepAgent,
}

/// A command-line duration that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a duration (e.g. 10s, 500ms, 2m)")]
pub struct DurationError(pub String);

/// `--labgrid-wait`: a duration as [`parse_duration`], or `0` (no wait).
pub fn parse_wait(s: &str) -> std::result::Result<Duration, DurationError> {
    match s.trim() {
        "0" | "0s" | "0ms" => Ok(Duration::ZERO),
        _ => parse_duration(s),
    }
}

/// Parse `500ms`, `10s`, `2m`, `1h` or plain seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, DurationError> {
    let t = s.trim();
    let bad = || DurationError(s.to_string());
    let (n, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = n.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v <= 0.0 || v * mult > 7.0 * 86_400.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(v * mult))
}

/// `key=value` tags.
type Tags = std::collections::BTreeMap<String, String>;

fn parse_tags(tags: &[String]) -> Result<Tags> {
    tags.iter()
        .map(|t| {
            t.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("tag {t:?}: expected key=value"))
        })
        .collect()
}

/// A place acted on: acquired for the action when it was free (released after),
/// ours already, or someone else's and forced (logged).
/// The place's resources are waited for (`wait`) once it is held: an exporter
/// may publish some only while the place is acquired.
fn with_place<T>(
    c: &mut crate::labgrid::Coordinator,
    (addr, wait): (&str, Duration),
    cfg: &crate::labgrid::LabgridConfig,
    place: &str,
    force: &Option<String>,
    act: impl FnOnce(&Rig) -> Result<T>,
) -> Result<T> {
    let p = c.place(place)?;
    let mut acquired = false;
    match crate::labgrid::holder(&p) {
        Some(by) if by != c.user() => match force {
            Some(r) if !r.trim().is_empty() => {
                tracing::warn!(
                    "labgrid place {place} is acquired by {by}: forced by {}: {r}",
                    c.user()
                );
                eprintln!("WARNING: labgrid place {place} is acquired by {by}; acting anyway (forced: {r})");
            }
            Some(_) => anyhow::bail!("--force needs a reason"),
            None => {
                return Err(crate::labgrid::LabgridError::AcquiredByOther {
                    place: place.to_string(),
                    by: by.to_string(),
                    us: c.user().to_string(),
                }
                .into())
            }
        },
        Some(_) => {}
        None => {
            c.acquire(place)?;
            acquired = true;
        }
    }
    let r = c
        .wait_published(place, wait)
        .and_then(|()| c.host(place))
        .map_err(anyhow::Error::from)
        .and_then(|h| Ok(crate::labgrid::places_inventory(addr, &[h], cfg)?))
        .and_then(|inv| act(&Rig::new(inv)));
    if acquired {
        if let Err(e) = c.release(place) {
            eprintln!("labgrid: releasing {place}: {e}");
        }
    }
    r
}

fn run_labgrid(
    addr: &str,
    config: Option<PathBuf>,
    user: Option<String>,
    wait: Duration,
    cmd: LabgridCmd,
) -> Result<ExitCode> {
    let cfg = match &config {
        Some(p) => crate::labgrid::LabgridConfig::load(p)?,
        None => crate::labgrid::LabgridConfig::default(),
    };
    let user = user.unwrap_or_else(crate::labgrid::default_user);
    let mut c = crate::labgrid::Coordinator::connect(addr, &user, Duration::from_secs(10))?;
    let select = |c: &mut crate::labgrid::Coordinator,
                  names: &[String],
                  tags: &[String]|
     -> Result<Vec<crate::labgrid::proto::Place>> {
        let want = parse_tags(tags)?;
        let mut out = Vec::new();
        for p in c.places()? {
            let ok_tags = want.iter().all(|(k, v)| p.tags.get(k) == Some(v));
            if ok_tags && (names.is_empty() || names.contains(&p.name)) {
                out.push(p);
            }
        }
        for n in names {
            if !out.iter().any(|p| &p.name == n) {
                return Err(crate::labgrid::LabgridError::NoPlace(n.clone()).into());
            }
        }
        Ok(out)
    };
    match cmd {
        LabgridCmd::Hosts { tags, json } => {
            for p in select(&mut c, &[], &tags)? {
                let holder = crate::labgrid::holder(&p).unwrap_or("free").to_string();
                // A free place's serial ports have no TCP port yet (served
                // while acquired): listed as such, not an error.
                let mapped = c.listing(&p.name);
                let port = |s: &crate::labgrid::NetSerial| match s.port {
                    0 => "(served when acquired)".to_string(),
                    n => n.to_string(),
                };
                let (power, consoles, oob, transport) = match &mapped {
                    Ok(h) => (
                        h.power
                            .as_ref()
                            .map(|p| format!("{} {} {}", p.model, p.host, p.index))
                            .unwrap_or_else(|| "-".into()),
                        h.consoles
                            .iter()
                            .map(|s| format!("{}={}:{}", s.name, s.host, port(s)))
                            .collect::<Vec<_>>()
                            .join(","),
                        h.oob
                            .as_ref()
                            .map(|s| format!("{}:{}", s.host, port(s)))
                            .unwrap_or_else(|| "-".into()),
                        h.ssh
                            .as_ref()
                            .map(|s| format!("ssh {}@{}:{}", s.username, s.address, s.port))
                            .unwrap_or_else(|| "local".into()),
                    ),
                    Err(e) => (
                        format!("error: {e}"),
                        String::new(),
                        String::new(),
                        String::new(),
                    ),
                };
                let tags: Vec<String> = p.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"place": p.name, "acquired": holder, "tags": tags,
                            "power": power, "consoles": consoles, "oob": oob, "transport": transport})
                    );
                } else {
                    println!(
                        "{}\t{holder}\t{}\tpower {power}\tconsoles {consoles}\toob {oob}\t{transport}",
                        p.name,
                        tags.join(",")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LabgridCmd::Check { places, tags, json } => {
            let selected = select(&mut c, &places, &tags)?;
            let (t, foreign) = crate::labgrid::check_places(&mut c, addr, &cfg, selected, wait)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"table": t, "left_alone": foreign.iter()
                        .map(|(p, by)| serde_json::json!({"place": p, "acquired": by}))
                        .collect::<Vec<_>>()})
                );
            } else {
                println!("{t}");
                for (p, by) in &foreign {
                    println!("{p}: acquired by {by}: left alone (not probed)");
                }
            }
            Ok(if t.all_healthy() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        LabgridCmd::Power {
            place,
            action,
            json,
            force,
        } => {
            let s = with_place(&mut c, (addr, wait), &cfg, &place, &force, |rig| {
                let mut p = rig.power(&place)?;
                match action {
                    PowerAction::On => p.on()?,
                    PowerAction::Off => p.off()?,
                    PowerAction::Cycle => p.cycle()?,
                    PowerAction::Status => {}
                }
                Ok(p.status()?)
            })?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"place": place, "power": s.to_string()})
                );
            } else {
                println!("{place}: {s}");
            }
            Ok(ExitCode::SUCCESS)
        }
        LabgridCmd::Console {
            place,
            console,
            duration,
            force,
        } => {
            let text = with_place(&mut c, (addr, wait), &cfg, &place, &force, |rig| {
                let h = rig.host(&place)?;
                let name = match &console {
                    Some(n) => n.clone(),
                    None => h
                        .consoles
                        .first()
                        .map(|c| c.name.clone())
                        .with_context(|| {
                            format!("place `{place}` has no NetworkSerialPort console")
                        })?,
                };
                let dir = tempfile::Builder::new()
                    .prefix("hilrig-console-")
                    .tempdir()
                    .context("creating a temporary directory for the capture")?;
                let path = dir.path().join("capture.log");
                let src = rig.console_source(&place, &name)?;
                let cap = crate::console::Capture::start(&place, &name, src, &path)?;
                std::thread::sleep(duration);
                let sum = cap.stop()?;
                Ok(std::fs::read_to_string(&sum.path)?)
            })?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        LabgridCmd::Oob {
            place,
            action,
            force,
        } => {
            let line = with_place(&mut c, (addr, wait), &cfg, &place, &force, |rig| {
                Ok(match action {
                    OobAction::Counters => {
                        let c = rig.read_counters(&place)?;
                        serde_json::json!({"place": place, "counters": c.counters,
                            "master": c.master, "fuse": c.fuse, "slots_left": c.slots_left,
                            "width": c.width, "epoch": c.epoch})
                        .to_string()
                    }
                    OobAction::Identify => {
                        let (id, version, serial, width) = rig.identify(&place)?;
                        format!("{place}: id {id:#010x} version {version:#010x} serial {serial} width {width}")
                    }
                })
            })?;
            println!("{line}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Run a `hilrig rig` command.
pub fn run(cmd: RigCmd) -> Result<ExitCode> {
    match cmd {
        RigCmd::Labgrid {
            address,
            labgrid_config,
            user,
            labgrid_wait,
            cmd,
        } => run_labgrid(&address, labgrid_config, user, labgrid_wait, cmd),
        RigCmd::Check { inventory, json } => {
            let rig = Rig::load(&inventory)?;
            let t = rig.check();
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!("{t}");
            }
            Ok(if t.all_healthy() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        RigCmd::Hosts {
            inventory,
            tags,
            json,
        } => {
            let rig = Rig::load(&inventory)?;
            for h in rig.inv.select(&tags) {
                let tags: Vec<&str> = h.tags.iter().map(String::as_str).collect();
                let transport = match &h.ssh {
                    Some(s) => format!("ssh {}@{}:{}", s.user, s.address, s.port),
                    None => "local".to_string(),
                };
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"host": h.name, "power": h.power.driver_name(),
                            "tags": tags, "transport": transport})
                    );
                } else {
                    println!(
                        "{}\t{}\t{}\t{transport}",
                        h.name,
                        h.power.driver_name(),
                        tags.join(",")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        RigCmd::Power {
            inventory,
            host,
            action,
            json,
            lease,
        } => {
            let rig = lease.apply(Rig::load(&inventory)?)?;
            let mut p = rig.power(&host)?;
            match action {
                PowerAction::On => p.on()?,
                PowerAction::Off => p.off()?,
                PowerAction::Cycle => p.cycle()?,
                PowerAction::Status => {}
            }
            let s = p.status()?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"host": host, "power": s.to_string()})
                );
            } else {
                println!("{host}: {s}");
            }
            Ok(ExitCode::SUCCESS)
        }
        RigCmd::Console {
            inventory,
            host,
            console,
            out,
            duration,
            follow,
            lease,
        } => {
            let rig = lease.apply(Rig::load(&inventory)?)?;
            let h = rig.host(&host)?;
            let name = match console {
                Some(c) => c,
                None => h
                    .consoles
                    .first()
                    .map(|c| c.name.clone())
                    .with_context(|| format!("host `{host}` has no console"))?,
            };
            // No --out: a capture file in a fresh private (0700, random name)
            // temporary directory, removed afterwards; never a predictable path.
            let tmpdir;
            let path = match &out {
                Some(p) => p.clone(),
                None => {
                    tmpdir = tempfile::Builder::new()
                        .prefix("hilrig-console-")
                        .tempdir()
                        .context("creating a temporary directory for the capture")?;
                    tmpdir.path().join(format!("{host}-{name}.log"))
                }
            };
            let src = rig.console_source(&host, &name)?;
            let cap = crate::console::Capture::start(&host, &name, src, &path)?;
            if follow {
                // Attached: the capture's lines as they are written, until interrupted.
                use std::io::{Read, Seek, Write};
                let mut f = std::fs::File::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                let mut pos = 0u64;
                let mut buf = Vec::new();
                let stdout = std::io::stdout();
                loop {
                    f.seek(std::io::SeekFrom::Start(pos))?;
                    buf.clear();
                    let n = f.read_to_end(&mut buf)?;
                    if n > 0 {
                        pos += n as u64;
                        let mut o = stdout.lock();
                        if o.write_all(&buf).and_then(|_| o.flush()).is_err() {
                            // Standard output closed (e.g. `| head`): detach.
                            break;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                cap.stop()?;
                return Ok(ExitCode::SUCCESS);
            }
            let end = Instant::now() + duration;
            while Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
            let sum = cap.stop()?;
            if out.is_none() {
                print!("{}", std::fs::read_to_string(&sum.path)?);
                let _ = std::fs::remove_file(&sum.path);
            } else {
                eprintln!("{} lines -> {}", sum.lines, sum.path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        RigCmd::Oob {
            inventory,
            host,
            action,
            lease,
        } => {
            let rig = lease.apply(Rig::load(&inventory)?)?;
            match action {
                OobAction::Counters => {
                    let c = rig.read_counters(&host)?;
                    println!(
                        "{{\"host\":\"{host}\",\"counters\":[{},{},{}],\"master\":{},\"fuse\":{},\"slots_left\":{},\"width\":{},\"epoch\":{}}}",
                        c.counters[0], c.counters[1], c.counters[2], c.master, c.fuse, c.slots_left, c.width, c.epoch
                    );
                }
                OobAction::Identify => {
                    let (id, version, serial, width) = rig.identify(&host)?;
                    println!("{host}: id {id:#010x} version {version:#010x} serial {serial} width {width}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        RigCmd::Host { db, json, cmd } => {
            let st = crate::hoststate::HostStates::open(&db)?;
            match cmd {
                HostCmd::List => {
                    for h in st.list()? {
                        if json {
                            println!("{}", serde_json::to_string(&h)?);
                        } else {
                            println!(
                                "{}\t{}\tsince {}\t{}",
                                h.host,
                                h.state,
                                crate::lease::format_unix_ms(h.since_unix_ms),
                                h.reason
                            );
                        }
                    }
                }
                HostCmd::Online { host, reason } => {
                    st.set_online(&host, &reason)?;
                    println!("{host}: online");
                }
                HostCmd::Offline { host, reason } => {
                    st.set_offline(&host, &reason)?;
                    println!("{host}: offline ({reason})");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        RigCmd::Lease { db, json, cmd } => {
            let store = LeaseStore::open(&db)?;
            match cmd {
                LeaseCmd::List => {
                    for r in store.list()? {
                        if json {
                            println!(
                                "{}",
                                serde_json::json!({"host": r.host, "held": r.active,
                                    "holder": r.holder, "generation": r.generation,
                                    "expires_unix_ms": r.expires_unix_ms,
                                    "expires": crate::lease::format_unix_ms(r.expires_unix_ms)})
                            );
                            continue;
                        }
                        println!(
                            "{}\t{}\t{}\tgeneration {}\texpires {}",
                            r.host,
                            if r.active { "HELD" } else { "free" },
                            if r.holder.is_empty() { "-" } else { &r.holder },
                            r.generation,
                            crate::lease::format_unix_ms(r.expires_unix_ms)
                        );
                    }
                    Ok(ExitCode::SUCCESS)
                }
                LeaseCmd::Who { host } => {
                    match store.who(&host)? {
                        Some(r) if json => println!(
                            "{}",
                            serde_json::json!({"host": r.host, "holder": r.holder,
                                "expires": crate::lease::format_unix_ms(r.expires_unix_ms),
                                "expires_unix_ms": r.expires_unix_ms})
                        ),
                        Some(r) => println!(
                            "{host}: held by {} until {}",
                            r.holder,
                            crate::lease::format_unix_ms(r.expires_unix_ms)
                        ),
                        None if json => {
                            println!("{}", serde_json::json!({"host": host, "holder": null}))
                        }
                        None => println!("{host}: free"),
                    }
                    Ok(ExitCode::SUCCESS)
                }
                LeaseCmd::Acquire {
                    host,
                    inventory,
                    holder,
                    ttl,
                    counters_db,
                    counters_key,
                    counters_anchor,
                } => {
                    let holder = holder.unwrap_or_else(default_holder);
                    let inv = crate::inventory::Inventory::load(&inventory)?;
                    // Whom to page comes from the inventory's `[counters]` either way.
                    let from_inv = inv
                        .counters
                        .as_ref()
                        .map(crate::lease::CountersGate::from_spec)
                        .transpose()?;
                    let gate = match (counters_db, counters_key, from_inv) {
                        (Some(db), Some(key), inv_gate) => Some(crate::lease::CountersGate {
                            db,
                            key,
                            anchor: counters_anchor,
                            pager: inv_gate.and_then(|g| g.pager),
                        }),
                        (_, _, Some(g)) => Some(crate::lease::CountersGate {
                            anchor: counters_anchor.or(g.anchor.clone()),
                            ..g
                        }),
                        _ => None,
                    };
                    let rig = Rig::new(inv);
                    let l = store.acquire_gated(&rig, &host, &holder, ttl, gate.as_ref())?;
                    println!(
                        "{}\t{}\tgeneration {}\texpires {}",
                        l.host,
                        l.holder,
                        l.generation,
                        crate::lease::format_unix_ms(l.expires_unix_ms)
                    );
                    Ok(ExitCode::SUCCESS)
                }
                LeaseCmd::Release { host, holder } => {
                    if store.release_host(&host, &holder, None)? {
                        println!("{host}: released");
                        Ok(ExitCode::SUCCESS)
                    } else {
                        eprintln!("{host}: not held by {holder}");
                        Ok(ExitCode::from(1))
                    }
                }
            }
        }
        RigCmd::StepAgent => {
            crate::remote::serve_steps(std::io::stdin(), std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        RigCmd::Probes => {
            for p in crate::board::list_probes()? {
                println!("{}\t{}", p.selector(), p.identifier);
            }
            Ok(ExitCode::SUCCESS)
        }
        RigCmd::Board {
            inventory,
            host,
            cmd,
        } => {
            let rig = Rig::load(&inventory)?;
            let b = rig.board(&host)?.with_context(|| {
                format!("host `{host}` has no board in {}", inventory.display())
            })?;
            match cmd {
                BoardCmd::Probe => println!("{host}: {}", b.probe()?),
                BoardCmd::Flash { image } => {
                    b.flash(image.as_deref())?;
                    println!("{host}: flashed and reset");
                }
                BoardCmd::Reset => {
                    b.reset()?;
                    println!("{host}: reset");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Power a host from code the way the CLI does (for the runner).
pub fn power(rig: &Rig, host: &str, state: PowerState) -> crate::error::Result<()> {
    rig.power(host)?.set(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(subcommand)]
        cmd: RigCmd,
    }

    #[test]
    fn parses() {
        let t = T::try_parse_from(["t", "power", "lab.toml", "sim-1", "cycle"]).unwrap();
        assert!(matches!(
            t.cmd,
            RigCmd::Power {
                action: PowerAction::Cycle,
                ..
            }
        ));
        let t = T::try_parse_from([
            "t",
            "lease",
            "l.db",
            "acquire",
            "sim-1",
            "--inventory",
            "lab.toml",
            "--ttl",
            "5m",
        ])
        .unwrap();
        assert!(
            matches!(t.cmd, RigCmd::Lease { cmd: LeaseCmd::Acquire { ttl, .. }, .. } if ttl == Duration::from_secs(300))
        );
        assert!(T::try_parse_from(["t", "power", "lab.toml", "sim-1", "explode"]).is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn labgrid_wait_parses_with_a_default_and_zero() {
        let wait = |args: &[&str]| {
            let mut v = vec!["t", "--labgrid", "127.0.0.1:20408"];
            v.extend_from_slice(args);
            v.push("hosts");
            match T::try_parse_from(v).map(|t| t.cmd) {
                Ok(RigCmd::Labgrid { labgrid_wait, .. }) => Ok(labgrid_wait),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(wait(&[]), Ok(Duration::from_secs(10)));
        assert_eq!(wait(&["--labgrid-wait", "0"]), Ok(Duration::ZERO));
        assert_eq!(
            wait(&["--labgrid-wait", "2m"]),
            Ok(Duration::from_secs(120))
        );
        for bad in ["-1", "soon", "30d"] {
            assert!(wait(&["--labgrid-wait", bad]).is_err(), "{bad}");
        }
    }
}

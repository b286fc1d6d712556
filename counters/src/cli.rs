//! `hilrig counters ...`: the command line of the attestation service. The `hilrig`
//! binary embeds [`CountersCmd`] as a subcommand and calls [`run`].
//!
//! Exit status: 0 = success (verify: trusted; conformance: every property held),
//! 1 = the answer is "no" (not trusted, a property failed), errors via `Err`.

// Flattened option groups need no docs of their own (clap shows their fields').
#![allow(missing_docs)]

use crate::conformance::{self, AttemptKind, DeviceTarget, SerialTarget};
use crate::decide::{parse_hash, parse_region, Expected};
use crate::mac::Key;
use crate::service::{parse_serial, Enrollment, GroupBy, Service, VerifyReport};
use crate::source::open_source;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hilrig_device::oob::{CounterReport, DEFAULT_BAUD};
use hilrig_device::Region;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Options every command shares.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Database: a SQLite file or a postgresql:// URL [default: $HILRIG_COUNTERS_DB,
    /// else counters.db in the data dir ($HILRIG_DATA_DIR, $XDG_DATA_HOME/hilrig or
    /// ~/.local/share/hilrig)].
    #[arg(long)]
    pub db: Option<String>,
    /// MAC key file [default: $HILRIG_COUNTERS_KEY, else counters.key in the data dir].
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Anchor of the history chain's head, outside the database (written after
    /// every change, checked on every open: a replayed database is refused): a FILE
    /// (written atomically), or a second database, `sqlite:PATH` or a
    /// `postgresql://` URL [default: $HILRIG_COUNTERS_ANCHOR].
    #[arg(long, value_name = "FILE|URL")]
    pub anchor: Option<String>,
}

/// Where the device is read from.
#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// model:STATE_FILE (a model device) or serial:PORT (an OOB UART or PTY).
    #[arg(long)]
    pub source: String,
    /// Baud rate of a serial source.
    #[arg(long, default_value_t = DEFAULT_BAUD)]
    pub baud: u32,
    /// Per-request timeout of a serial source, ms.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
}

/// `hilrig counters ...`.
#[derive(Subcommand, Debug, Clone)]
pub enum CountersCmd {
    /// Create the MAC key file (mode 0600) if missing and the database, applying its
    /// schema migrations.
    Init {
        #[command(flatten)]
        c: Common,
    },
    /// Enrol a device: expected counters and known-good region hashes, read from the
    /// device (--source) or given (--counters/--master/--epoch/--hash).
    Enroll {
        #[command(flatten)]
        c: Common,
        /// Serial (decimal or 0x-hex), as the device's OOB IDENTIFY reports it.
        #[arg(required_unless_present = "from")]
        serial: Option<String>,
        /// Enrol many devices from a file: JSON lines or CSV (see the README), at
        /// most 4096 bytes a line, one transaction per 5,000 devices; a malformed
        /// file writes nothing.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["serial", "source", "counters", "master", "hash", "replace"])]
        from: Option<PathBuf>,
        /// Host the device is in.
        #[arg(long, default_value = "")]
        host: String,
        /// Rack the host is in.
        #[arg(long, default_value = "")]
        rack: String,
        /// Read the expected values from the device: model:STATE_FILE or serial:PORT.
        #[arg(long, conflicts_with_all = ["counters", "master", "epoch", "hash"])]
        source: Option<String>,
        /// Expected region counters VBIOS,FIRMWARE,CONFIG.
        #[arg(long)]
        counters: Option<String>,
        /// Expected MASTER [default: sum of the counters].
        #[arg(long)]
        master: Option<u32>,
        /// Expected EPOCH.
        #[arg(long, default_value_t = 0)]
        epoch: u32,
        /// Known-good hash per region, REGION=SHA256 (all three regions).
        #[arg(long)]
        hash: Vec<String>,
        /// Re-baseline an enrolled device on purpose (clears a quarantine hold).
        #[arg(long)]
        replace: bool,
        /// The device's OOB reset-key file (64 hex digits, mode 0600, as `hilrig
        /// device init` writes it), stored sealed in the service [default: with
        /// `--source model:STATE`, `STATE.reset-key` if it exists]. Never a value on
        /// the command line.
        #[arg(long, value_name = "FILE", conflicts_with = "from")]
        reset_key_file: Option<PathBuf>,
    },
    /// The catalog of known-good images.
    Catalog {
        #[command(subcommand)]
        cmd: CatalogCmd,
    },
    /// Read a device out of band and decide a verdict (exit 0 only when trusted).
    Verify {
        #[command(flatten)]
        c: Common,
        /// Serial.
        serial: String,
        #[command(flatten)]
        s: SourceArgs,
        /// Require an authorised intent for every counted attempt (as the
        /// provisioning gate and rig leases do): counters that rose without one
        /// are not accepted; the device is held `needs-review`.
        #[arg(long)]
        require_intent: bool,
    },
    /// Holds: a device held (quarantine, review) stays refused until an operator
    /// acts.
    Hold {
        #[command(subcommand)]
        cmd: HoldCmd,
    },
    /// Act on a device the service does not vouch for: reflash exactly the regions
    /// whose counters rose (needs-reflash, or an image not in the catalog) from
    /// catalog images through the authorised-update path; page a human for a
    /// locked or held device. Exit 0 when the device ends trusted or a human was
    /// paged.
    Remediate {
        #[command(flatten)]
        c: Common,
        /// Serial.
        serial: String,
        /// The device, in band and out of band: model:STATE_FILE (or another
        /// backend the binary knows: rtl:, lockstep:, fpga:PORT).
        #[arg(long)]
        target: String,
        /// A known-good image file for a region, REGION=FILE (repeatable); used only
        /// if its hash is in the catalog.
        #[arg(long, value_name = "REGION=FILE")]
        image: Vec<String>,
        /// Page a human with this command (whitespace-separated argv, no shell; the
        /// page as JSON on its standard input).
        #[arg(long)]
        page_cmd: Option<String>,
        /// Page a human by POSTing the page to this http:// URL.
        #[arg(long, requires = "webhook_key")]
        webhook: Option<String>,
        /// The webhook's HMAC-SHA256 key file (mode 0600): header
        /// `X-Hilrig-Signature: sha256=HEX` over the body.
        #[arg(long)]
        webhook_key: Option<PathBuf>,
    },
    /// Show enrolled devices and their states.
    Status {
        #[command(flatten)]
        c: Common,
        /// One device.
        serial: Option<String>,
    },
    /// Stored verdicts, newest first.
    History {
        #[command(flatten)]
        c: Common,
        /// One device.
        serial: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// MASTER sums per host or rack, with the devices in each.
    Master {
        #[command(flatten)]
        c: Common,
        /// host or rack.
        #[arg(long, default_value = "host")]
        by: String,
    },
    /// Record the intent to flash a catalog image, BEFORE flashing; prints the intent id.
    BeginUpdate {
        #[command(flatten)]
        c: Common,
        /// Serial.
        serial: String,
        /// vbios, firmware or config.
        #[arg(long)]
        region: String,
        /// The catalog image's SHA-256.
        #[arg(long)]
        hash: String,
    },
    /// After flashing: verify and close the intent.
    CommitUpdate {
        #[command(flatten)]
        c: Common,
        /// Serial.
        serial: String,
        /// Intent id from begin-update.
        #[arg(long)]
        intent: i64,
        #[command(flatten)]
        s: SourceArgs,
    },
    /// Compare the VMM's count of flash attempts over a tenancy with the hardware's
    /// MASTER delta (exit 0 when they agree).
    CrossCheck {
        #[command(flatten)]
        c: Common,
        /// Serial.
        serial: String,
        /// MASTER at the tenancy's start.
        #[arg(long)]
        start_master: u32,
        /// EPOCH at the tenancy's start.
        #[arg(long, default_value_t = 0)]
        start_epoch: u32,
        /// Attempts the VMM passed to the device.
        #[arg(long)]
        vmm_attempts: u64,
        #[command(flatten)]
        s: SourceArgs,
    },
    /// The vendor conformance suite against a simulated device or a vendor's serial
    /// device. Exit status: 0 PASS, 1 FAIL, 2 usage, 3 INCOMPLETE (a property was
    /// skipped), 4 TRANSPORT (the link failed), 5 target error.
    Conformance {
        /// model (a fresh temporary device), model:STATE_FILE, rtl:STATE_FILE,
        /// lockstep:STATE_FILE (simulated devices) or serial:PORT[,BAUD] (a device's
        /// OOB UART or PTY).
        #[arg(long)]
        target: String,
        /// Serial target: command making one attempt ({region} {op} {mode}).
        #[arg(long)]
        attempt_cmd: Option<String>,
        /// Serial target: command resetting the device ({kind}).
        #[arg(long)]
        reset_cmd: Option<String>,
        /// Serial target: command making an attempt then cutting power ({region}
        /// {mode} {op}).
        #[arg(long)]
        cut_cmd: Option<String>,
        /// Serial target: command printing the in-band counter registers as JSON
        /// (enables oob-equals-inband).
        #[arg(long)]
        inband_cmd: Option<String>,
        /// Run the budget-and-fuse property (uses up the counter budget).
        #[arg(long)]
        burn_fuse: bool,
        /// Refused: a key on the command line is visible to every local user. Use
        /// --reset-key-file or --reset-key-from-service.
        #[arg(long, hide = true)]
        reset_key: Option<String>,
        /// OOB physical-reset key file (64 hex digits, mode 0600; enables the
        /// physical-reset properties and lets the suite restore the budget between
        /// properties). A fresh temporary model uses its own key.
        #[arg(long, value_name = "FILE", conflicts_with = "reset_key_from_service")]
        reset_key_file: Option<PathBuf>,
        /// Take the OOB physical-reset key of device SERIAL from the counters
        /// service (stored at enrolment); with --db/--key/--anchor.
        #[arg(long, value_name = "SERIAL")]
        reset_key_from_service: Option<String>,
        /// The counters database for --reset-key-from-service [default as for every
        /// counters command].
        #[arg(long)]
        db: Option<String>,
        /// The MAC key file for --reset-key-from-service.
        #[arg(long)]
        key: Option<PathBuf>,
        /// The anchor for --reset-key-from-service.
        #[arg(long, value_name = "FILE|URL")]
        anchor: Option<String>,
        /// Counter width of a fresh temporary model (`--target model`).
        #[arg(long, default_value_t = 8)]
        width: u8,
        /// Baud rate of a serial target.
        #[arg(long, default_value_t = DEFAULT_BAUD)]
        baud: u32,
        /// Response timeout of a serial target, ms: how long the suite waits for one
        /// reply. Set it above the device's slowest answer (a READ_HASH of the largest
        /// region, a PHYSICAL_RESET, a BUSY): a reply later than this is a TRANSPORT
        /// fault (the report names this value), not a FAIL.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Also write a JUnit XML report (one testcase per property) to this file.
        #[arg(long)]
        junit: Option<PathBuf>,
        /// Print JSON (overall verdict, counts, properties).
        #[arg(long)]
        json: bool,
    },
    /// Act on a simulated device's state file as a vendor tool acts on a device (for
    /// the conformance suite's --attempt-cmd/--reset-cmd/--cut-cmd against
    /// `hilrig device serve-oob`); takes the state file's lock.
    Sim {
        /// The device's state file (taken under its lock), or with `--backend fpga`
        /// the host-bridge port of a (simulated) board.
        state: PathBuf,
        /// Backend: model (default), rtl, lockstep, or fpga (a board's host-bridge
        /// port; what the `hilrig` binary's opener knows).
        #[arg(long, default_value = "model")]
        backend: String,
        #[command(subcommand)]
        action: SimAction,
    },
}

/// `hilrig counters sim STATE ...`.
#[derive(Subcommand, Debug, Clone)]
pub enum SimAction {
    /// One program or erase attempt.
    Attempt {
        /// vbios, firmware or config.
        #[arg(long)]
        region: String,
        /// program or erase.
        #[arg(long)]
        op: String,
        /// refused (controller locked) or accepted (unlocked; a program of all-ones).
        #[arg(long)]
        mode: String,
    },
    /// A reset: reset, flr or power-cycle (a state-file device keeps nothing volatile
    /// between commands, so each is a reopen of the file).
    Reset {
        /// reset, flr or power-cycle.
        #[arg(long)]
        kind: String,
    },
    /// Print the in-band counter registers as JSON (for --inband-cmd).
    Inband,
    /// An attempt whose power is cut before its status is read.
    Cut {
        /// vbios, firmware or config.
        #[arg(long)]
        region: String,
        /// refused or accepted.
        #[arg(long)]
        mode: String,
    },
}

/// `hilrig counters hold ...`.
#[derive(Subcommand, Debug, Clone)]
pub enum HoldCmd {
    /// Lift a device's hold after review: the reason and the hold it lifts are
    /// logged in the history chain with the verdict of a fresh reading (catalog
    /// rule). A rollback or tampered-record hold comes straight back (re-enrol
    /// those with `enroll --replace`).
    Clear {
        #[command(flatten)]
        c: Common,
        /// Serial.
        serial: String,
        /// Why (logged).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        s: SourceArgs,
    },
}

/// `hilrig counters catalog ...`.
#[derive(Subcommand, Debug, Clone)]
pub enum CatalogCmd {
    /// Add a known-good image.
    Add {
        #[command(flatten)]
        c: Common,
        /// vbios, firmware or config.
        #[arg(long)]
        region: String,
        /// SHA-256 of the whole region as the device reports it (64 hex digits).
        sha256: String,
        /// Version label.
        #[arg(long, default_value = "")]
        version: String,
        /// Who approved it.
        #[arg(long)]
        approved_by: String,
    },
    /// List the catalog.
    List {
        #[command(flatten)]
        c: Common,
    },
    /// Remove an image.
    Remove {
        #[command(flatten)]
        c: Common,
        /// vbios, firmware or config.
        #[arg(long)]
        region: String,
        /// SHA-256.
        sha256: String,
    },
}

/// The data directory.
pub fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HILRIG_DATA_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("hilrig");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/share/hilrig");
    }
    PathBuf::from(".hilrig")
}

impl Common {
    fn db_spec(&self) -> String {
        self.db
            .clone()
            .or_else(|| std::env::var("HILRIG_COUNTERS_DB").ok())
            .unwrap_or_else(|| data_dir().join("counters.db").display().to_string())
    }
    fn key_path(&self) -> PathBuf {
        self.key
            .clone()
            .or_else(|| std::env::var_os("HILRIG_COUNTERS_KEY").map(PathBuf::from))
            .unwrap_or_else(|| data_dir().join("counters.key"))
    }
    fn open(&self) -> Result<Service> {
        let key = Key::load(&self.key_path())?;
        let spec = self.db_spec();
        let mut svc = Service::open(&spec, key)
            .with_context(|| format!("opening database {}", crate::store::redact(&spec)))?;
        let anchor = self.anchor.clone().or_else(|| {
            std::env::var("HILRIG_COUNTERS_ANCHOR")
                .ok()
                .filter(|v| !v.is_empty())
        });
        match anchor {
            Some(a) => svc.set_anchor_spec(&a)?,
            None => eprintln!("anchor: none — replay of the whole database is not detected"),
        }
        Ok(svc)
    }
}

/// Milliseconds since the Unix epoch as an RFC 3339 UTC time.
pub fn fmt_ms(ms: i64) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_verify(r: &VerifyReport, json: bool) -> Result<ExitCode> {
    if json {
        print_json(r)?;
    } else {
        let d = &r.decision;
        println!(
            "device {}: {} (state {}, severity {}, {})",
            r.serial,
            d.verdict,
            d.state,
            d.severity,
            if d.recoverable {
                "recoverable"
            } else {
                "not recoverable: page a human"
            }
        );
        if let Some(o) = &r.observed {
            println!(
                "  observed: counters {:?} master {} epoch {} fuse {} slots left {}",
                o.report.counters,
                o.report.master,
                o.report.epoch,
                o.report.fuse as u8,
                o.report.slots_left
            );
        }
        if let Some(e) = &r.expected {
            println!(
                "  expected: counters {:?} master {} epoch {}",
                e.counters, e.master, e.epoch
            );
        }
        for x in &d.reasons {
            println!("  - {x}");
        }
    }
    Ok(if r.trusted() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn parse_counters(s: &str) -> Result<[u32; 3]> {
    let v: Vec<&str> = s.split(',').map(str::trim).collect();
    if v.len() != 3 {
        bail!("--counters {s:?}: give three numbers VBIOS,FIRMWARE,CONFIG");
    }
    let mut out = [0u32; 3];
    for (o, x) in out.iter_mut().zip(&v) {
        *o = x
            .parse()
            .with_context(|| format!("--counters {s:?}: {x:?} is not a number"))?;
    }
    Ok(out)
}

fn source_of(s: &SourceArgs) -> Result<Box<dyn crate::source::CounterSource>> {
    Ok(open_source(
        &s.source,
        s.baud,
        Duration::from_millis(s.timeout_ms),
    )?)
}

fn print_status(
    out: &mut impl std::io::Write,
    d: &crate::service::DeviceRecord,
    ok: bool,
    json: bool,
    first: bool,
) -> std::io::Result<()> {
    if json {
        let v = serde_json::json!({"device": d, "intact": ok});
        return write!(out, "{}\n  {v}", if first { "" } else { "," });
    }
    writeln!(
        out,
        "{:<20} {:<14} host {:<12} rack {:<8} counters {:?} master {} epoch {} verified {}{}",
        d.serial,
        if ok { d.state.name() } else { "TAMPERED" },
        d.host,
        d.rack,
        d.expected.counters,
        d.expected.master,
        d.expected.epoch,
        fmt_ms(d.verified_at),
        if d.hold.is_empty() {
            String::new()
        } else {
            format!(" HOLD: {}", d.hold)
        }
    )
}

fn print_group(
    out: &mut impl std::io::Write,
    g: &crate::service::MasterSum,
    json: bool,
    first: bool,
) -> std::io::Result<()> {
    if json {
        let v = serde_json::to_value(g).map_err(std::io::Error::other)?;
        return write!(out, "{}\n  {v}", if first { "" } else { "," });
    }
    writeln!(
        out,
        "{:<16} master {}",
        if g.group.is_empty() {
            "(none)"
        } else {
            &g.group
        },
        g.master
    )?;
    for (s, m, st, ok) in &g.devices {
        writeln!(
            out,
            "    {s:<20} {m:>8} {st}{}",
            if *ok { "" } else { " TAMPERED (not summed)" }
        )?;
    }
    Ok(())
}

/// Run one `hilrig counters` command.
pub fn run(cmd: CountersCmd) -> Result<ExitCode> {
    run_with(cmd, model_only)
}

/// Opens a simulated device by backend name on a state file (for conformance
/// targets); the `hilrig` binary passes one that knows rtl and lockstep too.
pub type DeviceOpener =
    fn(
        &str,
        &std::path::Path,
    ) -> std::result::Result<Box<dyn hilrig_device::Device>, hilrig_device::DeviceError>;

/// The opener that knows the model only.
pub fn model_only(
    backend: &str,
    path: &std::path::Path,
) -> std::result::Result<Box<dyn hilrig_device::Device>, hilrig_device::DeviceError> {
    match backend {
        "model" => {
            hilrig_device::Model::open(path).map(|m| Box::new(m) as Box<dyn hilrig_device::Device>)
        }
        other => Err(hilrig_device::DeviceError::Transport {
            what: format!("backend {other:?}"),
            detail: "not available here (this build opens: model)".into(),
        }),
    }
}

/// With this variable naming a file, a `hilrig counters` command writes its own
/// peak resident set (VmHWM, e.g. "9584 kB") there when it ends (the benchmark's
/// scale rows). The rusage of a child cannot tell it: the kernel starts a child's
/// `ru_maxrss` at its parent's peak when it execs.
pub const PEAK_RSS_ENV: &str = "HILRIG_COUNTERS_PEAK_RSS";

fn report_peak_rss() {
    let Some(p) = std::env::var_os(PEAK_RSS_ENV) else {
        return;
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(l) = status.lines().find(|l| l.starts_with("VmHWM:")) {
        let _ = std::fs::write(p, l.trim_start_matches("VmHWM:").trim());
    }
}

/// Run a `hilrig counters` command, opening simulated conformance targets with `open`.
pub fn run_with(cmd: CountersCmd, open: DeviceOpener) -> Result<ExitCode> {
    let r = run_cmd(cmd, open);
    report_peak_rss();
    r
}

fn run_cmd(cmd: CountersCmd, open: DeviceOpener) -> Result<ExitCode> {
    match cmd {
        CountersCmd::Init { c } => {
            let kp = c.key_path();
            let created = if kp.exists() {
                Key::load(&kp)?;
                false
            } else {
                Key::init(&kp)?;
                true
            };
            let svc = c.open()?;
            let spec = c.db_spec();
            if c.json {
                print_json(&serde_json::json!({
                    "key": kp, "key_created": created,
                    "db": crate::store::redact(&spec), "db_kind": svc.db_kind(),
                    "schema_version": crate::store::latest_version(),
                }))?;
            } else {
                println!(
                    "key {} ({}); database {} ({}) at schema version {}",
                    kp.display(),
                    if created {
                        "created, mode 0600"
                    } else {
                        "exists, kept"
                    },
                    crate::store::redact(&spec),
                    svc.db_kind(),
                    crate::store::latest_version()
                );
            }
        }
        CountersCmd::Enroll {
            c,
            serial,
            from,
            host,
            rack,
            source,
            counters,
            master,
            epoch,
            hash,
            replace,
            reset_key_file,
        } => {
            if let Some(file) = from {
                let mut svc = c.open()?;
                let n = crate::bulk::enroll_file(&mut svc, &file, crate::bulk::BATCH)?;
                if c.json {
                    print_json(&serde_json::json!({"enrolled": n}))?;
                } else {
                    println!(
                        "enrolled {n} devices from {}; each unknown until its first verify",
                        file.display()
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            let serial = parse_serial(serial.as_deref().context("give SERIAL or --from FILE")?)?;
            let reset_key_file = reset_key_file.or_else(|| {
                let state = source.as_deref()?.strip_prefix("model:")?;
                let p = hilrig_device::secure::reset_key_path(std::path::Path::new(state));
                p.exists().then_some(p)
            });
            let reset_key = reset_key_file
                .as_deref()
                .map(hilrig_device::secure::read_reset_key_file)
                .transpose()?;
            let expected = match source {
                Some(src) => {
                    let mut s = open_source(&src, DEFAULT_BAUD, Duration::from_secs(2))?;
                    let id = s.serial()?;
                    if id != serial {
                        bail!("{src} identifies as {id:#x}, not {serial:#x}");
                    }
                    s.observe()?.as_expected()
                }
                None => {
                    let counters =
                        parse_counters(counters.as_deref().context(
                            "give --source, or --counters with --hash for every region",
                        )?)?;
                    let mut hashes: [Option<[u8; 32]>; 3] = [None; 3];
                    for h in &hash {
                        let (r, x) = h
                            .split_once('=')
                            .with_context(|| format!("--hash {h:?}: use REGION=SHA256"))?;
                        let r = parse_region(r)?;
                        hashes[r as usize] = Some(parse_hash(x)?);
                    }
                    let mut hs = [[0u8; 32]; 3];
                    for (i, r) in Region::ALL.iter().enumerate() {
                        hs[i] =
                            hashes[i].with_context(|| format!("--hash {r}=SHA256 is missing"))?;
                    }
                    Expected {
                        counters,
                        master: master.unwrap_or(counters.iter().sum()),
                        epoch,
                        hashes: hs,
                    }
                }
            };
            let mut svc = c.open()?;
            let e = Enrollment {
                serial,
                host,
                rack,
                expected: expected.clone(),
            };
            match &reset_key {
                Some(k) => svc.enroll_with_reset_key(&e, replace, k)?,
                None => svc.enroll(&e, replace)?,
            }
            if c.json {
                print_json(&svc.device(serial)?)?;
            } else {
                println!(
                    "enrolled {serial:#x}: counters {:?} master {} epoch {}; OOB reset key {}; state unknown until its first verify",
                    expected.counters,
                    expected.master,
                    expected.epoch,
                    match &reset_key_file {
                        Some(f) => format!("stored sealed (from {})", f.display()),
                        None => "not given (no keyed reset through the service)".into(),
                    }
                );
            }
        }
        CountersCmd::Catalog { cmd } => match cmd {
            CatalogCmd::Add {
                c,
                region,
                sha256,
                version,
                approved_by,
            } => {
                let r = parse_region(&region)?;
                c.open()?.catalog_add(r, &sha256, &version, &approved_by)?;
                println!("added {r} image {}", sha256.trim());
            }
            CatalogCmd::List { c } => {
                let l = c.open()?.catalog_list()?;
                if c.json {
                    print_json(&l)?;
                } else {
                    println!(
                        "{:<9} {:<64} {:<12} {:<12} intact",
                        "region", "sha256", "version", "approved by"
                    );
                    for e in l {
                        println!(
                            "{:<9} {:<64} {:<12} {:<12} {}",
                            e.region.name(),
                            e.sha256,
                            e.version,
                            e.approved_by,
                            if e.intact {
                                "yes"
                            } else {
                                "NO: MAC mismatch, ignored"
                            }
                        );
                    }
                }
            }
            CatalogCmd::Remove { c, region, sha256 } => {
                let r = parse_region(&region)?;
                c.open()?.catalog_remove(r, &sha256)?;
                println!("removed {r} image {}", sha256.trim());
            }
        },
        CountersCmd::Verify {
            c,
            serial,
            s,
            require_intent,
        } => {
            let serial = parse_serial(&serial)?;
            // A source that cannot be opened (a missing file, a mistyped path, no such
            // port) is a usage error: nothing was reached, nothing is written. Only a
            // device that was reached and did not answer correctly is unverifiable.
            let mut src = source_of(&s).with_context(|| {
                format!(
                    "--source {}: cannot be opened; nothing was recorded",
                    s.source
                )
            })?;
            let mut svc = c.open()?;
            svc.require_intents = require_intent;
            let r = svc.verify(serial, &mut *src)?;
            return print_verify(&r, c.json);
        }
        CountersCmd::Hold {
            cmd:
                HoldCmd::Clear {
                    c,
                    serial,
                    reason,
                    s,
                },
        } => {
            let serial = parse_serial(&serial)?;
            let mut src = source_of(&s).with_context(|| {
                format!(
                    "--source {}: cannot be opened; nothing was recorded",
                    s.source
                )
            })?;
            let mut svc = c.open()?;
            let r = svc.hold_clear(serial, &reason, &mut *src)?;
            return print_verify(&r, c.json);
        }
        CountersCmd::Remediate {
            c,
            serial,
            target,
            image,
            page_cmd,
            webhook,
            webhook_key,
        } => {
            use crate::remediate::{ImageFile, Outcome, Pager};
            let serial = parse_serial(&serial)?;
            let images = image
                .iter()
                .map(|s| ImageFile::parse(s))
                .collect::<crate::Result<Vec<_>>>()?;
            let pager = match (page_cmd, webhook, webhook_key) {
                (Some(cmd), _, _) => {
                    let argv: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
                    if argv.is_empty() {
                        bail!("--page-cmd is empty");
                    }
                    Some(Pager::Command(argv))
                }
                (None, Some(url), Some(k)) => Some(Pager::Webhook {
                    url,
                    key: crate::remediate::load_webhook_key(&k)?,
                }),
                _ => None,
            };
            let (backend, path) = target.split_once(':').with_context(|| {
                format!("--target {target:?}: give BACKEND:PATH, e.g. model:dev.state")
            })?;
            let path = std::path::Path::new(path);
            let mut dev = open(backend, path).with_context(|| {
                format!("--target {target}: cannot be opened; nothing was recorded")
            })?;
            // Image hashes at the device's own region sizes (its state file's
            // geometry), not the defaults: READ_HASH covers the whole region.
            let sizes = hilrig_device::NvState::load(path)
                .map(|nv| nv.config.region_sizes)
                .with_context(|| format!("--target {target}: reading its region sizes"))?;
            let images = images
                .iter()
                .map(|f| f.sized(sizes[f.region as usize]))
                .collect::<crate::Result<Vec<_>>>()?;
            let mut svc = c.open()?;
            let out = crate::remediate::remediate(
                &mut svc,
                serial,
                &mut *dev,
                &target,
                &images,
                pager.as_ref(),
            )?;
            if c.json {
                print_json(&out)?;
            } else {
                match &out {
                    Outcome::Trusted { report } => {
                        println!("device {}: trusted; nothing to do", report.serial)
                    }
                    Outcome::Reflashed {
                        regions,
                        intents,
                        report,
                    } => println!(
                        "device {}: reflashed {} (intents {:?}) through the authorised-update path: {}",
                        report.serial,
                        regions.join(", "),
                        intents,
                        report.decision.verdict
                    ),
                    Outcome::Paged { to, page } => println!(
                        "device {}: {} ({}): paged through {to}",
                        page.serial, page.verdict, page.state
                    ),
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        CountersCmd::Status { c, serial } => {
            use std::io::Write;
            let mut svc = c.open()?;
            svc.low_memory()?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let json = c.json;
            if json {
                write!(out, "[").context("writing the status")?;
            }
            let mut first = true;
            let mut show = |d: crate::service::DeviceRecord, ok: bool| -> crate::Result<()> {
                print_status(&mut out, &d, ok, json, first)
                    .map_err(|e| crate::Error::Input(format!("writing the status: {e}")))?;
                first = false;
                Ok(())
            };
            match serial {
                Some(s) => {
                    let s = parse_serial(&s)?;
                    match svc.device(s) {
                        Ok(d) => show(d, true)?,
                        // Kept as found: a row that fails its MAC, or that its
                        // anchor entry says was replayed, is listed as not intact,
                        // with the reason on stderr.
                        Err(e @ (crate::Error::Tampered { .. } | crate::Error::Anchor { .. })) => {
                            eprintln!("device {s:#x}: {e}");
                            let replayed = matches!(e, crate::Error::Anchor { .. });
                            let want = crate::service::serial_key(s);
                            svc.devices_each(|d, ok| {
                                if d.serial == want {
                                    show(d, ok && !replayed)?;
                                }
                                Ok(())
                            })?
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                // Streamed: one row at a time from the database to stdout.
                None => svc.devices_each(&mut show)?,
            }
            if json {
                writeln!(out, "\n]").context("writing the status")?;
            }
            out.flush().context("writing the status")?;
        }
        CountersCmd::History { c, serial, limit } => {
            let serial = serial.as_deref().map(parse_serial).transpose()?;
            let h = c.open()?.history(serial, limit)?;
            if c.json {
                print_json(&h)?;
            } else {
                for e in h {
                    println!(
                        "#{} {} {} {} ({}, {}){}",
                        e.id,
                        fmt_ms(e.at),
                        e.serial,
                        e.verdict,
                        e.severity,
                        e.state,
                        if e.intact {
                            ""
                        } else {
                            " [MAC MISMATCH: edited outside the service]"
                        }
                    );
                    for r in e.reasons {
                        println!("    - {r}");
                    }
                }
            }
        }
        CountersCmd::Master { c, by } => {
            let by = match by.as_str() {
                "host" => GroupBy::Host,
                "rack" => GroupBy::Rack,
                other => bail!("--by {other:?}: use host or rack"),
            };
            use std::io::Write;
            let mut svc = c.open()?;
            svc.low_memory()?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let json = c.json;
            if json {
                write!(out, "[").context("writing the sums")?;
            }
            let mut first = true;
            // Streamed: one group at a time (devices come in group order).
            svc.master_sums_each(by, |g| {
                print_group(&mut out, &g, json, first)
                    .map_err(|e| crate::Error::Input(format!("writing the sums: {e}")))?;
                first = false;
                Ok(())
            })?;
            if json {
                writeln!(out, "\n]").context("writing the sums")?;
            }
            out.flush().context("writing the sums")?;
        }
        CountersCmd::BeginUpdate {
            c,
            serial,
            region,
            hash,
        } => {
            let serial = parse_serial(&serial)?;
            let r = parse_region(&region)?;
            let id = c.open()?.begin_update(serial, r, &hash)?;
            if c.json {
                print_json(&serde_json::json!({"intent": id}))?;
            } else {
                println!("intent {id}: flash {r} of {serial:#x} with {}, then commit-update --intent {id}", hash.trim());
            }
        }
        CountersCmd::CommitUpdate {
            c,
            serial,
            intent,
            s,
        } => {
            let serial = parse_serial(&serial)?;
            let mut src = source_of(&s).with_context(|| {
                format!(
                    "--source {}: cannot be opened; nothing was recorded",
                    s.source
                )
            })?;
            let mut svc = c.open()?;
            let r = svc.commit_update(serial, intent, &mut *src)?;
            return print_verify(&r, c.json);
        }
        CountersCmd::CrossCheck {
            c,
            serial,
            start_master,
            start_epoch,
            vmm_attempts,
            s,
        } => {
            let serial = parse_serial(&serial)?;
            let mut src = source_of(&s).with_context(|| {
                format!(
                    "--source {}: cannot be opened; nothing was recorded",
                    s.source
                )
            })?;
            let mut svc = c.open()?;
            let end = src.counters()?;
            let start = CounterReport {
                master: start_master,
                epoch: start_epoch,
                ..end
            };
            let d = svc.cross_check(serial, &start, &end, vmm_attempts)?;
            if c.json {
                print_json(&d)?;
            } else {
                println!("device {serial:#x}: {} ({})", d.verdict, d.severity);
                for r in &d.reasons {
                    println!("  - {r}");
                }
            }
            return Ok(if d.verdict == crate::Verdict::Trusted {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        CountersCmd::Conformance {
            target,
            attempt_cmd,
            reset_cmd,
            cut_cmd,
            inband_cmd,
            burn_fuse,
            reset_key,
            reset_key_file,
            reset_key_from_service,
            db,
            key,
            anchor,
            width,
            baud,
            timeout_ms,
            junit,
            json,
        } => {
            if reset_key.is_some() {
                bail!("--reset-key is refused: a key on the command line is visible to every local user (ps, /proc, shell history); give --reset-key-file FILE (0600) or --reset-key-from-service SERIAL (the key stored at enrolment)");
            }
            let mut reset_key = match (reset_key_file, reset_key_from_service) {
                (Some(f), _) => Some(hilrig_device::secure::read_reset_key_file(&f)?),
                (None, Some(serial)) => {
                    let serial = parse_serial(&serial)?;
                    let c = Common {
                        db,
                        key,
                        json: false,
                        anchor,
                    };
                    Some(c.open()?.reset_key(serial)?)
                }
                (None, None) => None,
            };
            let (kind, rest) = match target.split_once(':') {
                Some((k, r)) => (k, r),
                None if target == "model" => ("model", ""),
                None => bail!(
                    "--target {target:?}: use KIND:PATH (model:STATE_FILE, rtl:STATE_FILE, lockstep:STATE_FILE or serial:PORT), or model alone for a fresh temporary device"
                ),
            };
            let _tmp; // keeps a fresh temporary device's directory alive
            let report = match kind {
                "serial" => {
                    let (port, baud) = match rest.split_once(',') {
                        Some((p, b)) => (
                            p.to_string(),
                            b.parse::<u32>().with_context(|| {
                                format!("--target {target:?}: baud {b:?} is not a number")
                            })?,
                        ),
                        None => (rest.to_string(), baud),
                    };
                    let (Some(a), Some(r)) = (attempt_cmd, reset_cmd) else {
                        bail!("a serial target needs --attempt-cmd and --reset-cmd (see the counters README)");
                    };
                    if !std::path::Path::new(&port).exists() {
                        bail!("--target {target:?}: no such port {port}");
                    }
                    let mut t = SerialTarget::with_actuator(
                        &port,
                        baud,
                        Duration::from_millis(timeout_ms),
                        Box::new(conformance::CommandActuator {
                            attempt_cmd: a,
                            reset_cmd: r,
                            cut_cmd,
                            inband_cmd,
                        }),
                    )?;
                    conformance::run(
                        &mut t,
                        &conformance::Options {
                            burn_fuse,
                            reset_key,
                        },
                    )
                }
                backend => {
                    let path = if rest.is_empty() {
                        if !(1..=32).contains(&width) {
                            bail!("--width {width}: a temporary model's width is 1..=32");
                        }
                        let dir = tempfile_dir()?;
                        let p = dir.join("device.state");
                        let serial = 1;
                        let mut nv = hilrig_device::NvState::factory(
                            hilrig_device::DeviceConfig::with_width(width),
                            serial,
                        )
                        .map_err(|e| anyhow::anyhow!("a fresh device of width {width}: {e}"))?;
                        // Its own random key (or the one given).
                        nv.reset_key = match reset_key {
                            Some(k) => k,
                            None => hilrig_device::secure::random_key()
                                .context("reading random bytes")?,
                        };
                        reset_key = Some(nv.reset_key);
                        hilrig_device::Model::create(&p, nv)
                            .map_err(|e| anyhow::anyhow!("creating {}: {e}", p.display()))?;
                        _tmp = TempDir(dir);
                        p
                    } else {
                        PathBuf::from(rest)
                    };
                    if !path.exists() {
                        bail!(
                            "--target {target:?}: state file {} does not exist; create one with `hilrig device init {} --width 8`, or use --target model for a fresh temporary device",
                            path.display(),
                            path.display()
                        );
                    }
                    let dev = open(backend, &path)
                        .map_err(|e| anyhow::anyhow!("--target {target:?}: {e}"))?;
                    let p2 = path.clone();
                    let b2 = backend.to_string();
                    let mut t = DeviceTarget::new(dev, format!("{backend} {}", path.display()))
                        .with_reopen(Box::new(move || open(&b2, &p2)));
                    conformance::run(
                        &mut t,
                        &conformance::Options {
                            burn_fuse,
                            reset_key,
                        },
                    )
                }
            };
            if let Some(j) = &junit {
                hilrig_device::state::write_atomic(j, report.junit().as_bytes())
                    .with_context(|| format!("writing JUnit report {}", j.display()))?;
            }
            if json {
                print_json(&report)?;
            } else {
                print!("{}", report.text());
            }
            return Ok(ExitCode::from(report.overall.exit_code()));
        }
        CountersCmd::Sim {
            state,
            backend,
            action,
        } => {
            sim(&state, &backend, action, open)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for i in 0..100u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let d = base.join(format!(
            "hilrig-conformance-{}-{nanos:x}-{i}",
            std::process::id()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", d.display())),
        }
    }
    bail!(
        "could not create a temporary directory under {}",
        base.display()
    )
}

fn sim(
    state: &std::path::Path,
    backend: &str,
    action: SimAction,
    open: DeviceOpener,
) -> Result<()> {
    use hilrig_device::ResetKind;
    if !state.exists() {
        bail!("{} does not exist", state.display());
    }
    let open_dev = |p: &std::path::Path| open(backend, p);
    // A state file is read-modified-written under its lock; a board's port is not a
    // file anyone else rewrites.
    let locked = |f: &mut dyn FnMut() -> std::result::Result<(), hilrig_device::DeviceError>| {
        if backend == "fpga" {
            f()
        } else {
            hilrig_device::oob::with_state_lock(state, f)
        }
    };
    let mode = |m: &str| -> Result<bool> {
        match m {
            "refused" => Ok(false),
            "accepted" => Ok(true),
            other => bail!("--mode {other:?}: refused or accepted"),
        }
    };
    match action {
        SimAction::Attempt {
            region,
            op,
            mode: m,
        } => {
            let region = parse_region(&region)?;
            let kind = match op.as_str() {
                "program" => AttemptKind::Program,
                "erase" => AttemptKind::Erase,
                other => bail!("--op {other:?}: program or erase"),
            };
            let accepted = mode(&m)?;
            locked(&mut || {
                let mut d = open_dev(state)?;
                conformance::device_attempt(&mut *d, region, kind, accepted).map(|_| ())
            })?;
        }
        SimAction::Reset { kind } => {
            let k = match kind.as_str() {
                "reset" => ResetKind::Reset,
                "flr" => ResetKind::Flr,
                "power-cycle" => ResetKind::PowerCycle,
                other => bail!("--kind {other:?}: reset, flr or power-cycle"),
            };
            locked(&mut || open_dev(state)?.reset(k))?;
        }
        SimAction::Inband => {
            let mut report = None;
            locked(&mut || {
                let mut d = open_dev(state)?;
                report = Some(conformance::device_inband(&mut *d)?);
                Ok(())
            })?;
            print_json(&report)?;
        }
        SimAction::Cut { region, mode: m } => {
            let region = parse_region(&region)?;
            let accepted = mode(&m)?;
            locked(&mut || {
                let mut d = open_dev(state)?;
                conformance::device_cut_command(&mut *d, region, accepted)?;
                d.reset(ResetKind::PowerCycle)
            })?;
        }
    }
    Ok(())
}

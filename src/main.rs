//! `hilrig`: the one command-line tool for users of the rig.

mod fpga;
mod fw;
mod smoke;

use hilrig_bench as bench;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hilrig_device::oob::{self, OobClient, Request, Response};
use hilrig_device::{regmap, Device, DeviceConfig, Model, Region};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "hilrig",
    version,
    about = "Hardware-in-the-loop test rig with an FPGA-backed reference device"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The main job on embedded defaults: the smoke campaign on simulated hosts
    /// (SQLite results, model and rtl backends), ending with the HTML report's path.
    Run {
        /// Where the run's results, artifacts and reports go.
        #[arg(long, default_value = "hilrig-out")]
        out: PathBuf,
        /// Instead: a quick smoke run of one device, without VMs.
        #[arg(long)]
        device_only: bool,
        /// With --device-only: keep its files in this directory.
        #[arg(long, requires = "device_only")]
        keep: Option<PathBuf>,
        /// With --device-only: the device backend (model, rtl, lockstep or verilator).
        #[arg(long, default_value = "model")]
        backend: String,
    },
    /// Campaigns: run, validate, list the attack library.
    Campaign {
        #[command(subcommand)]
        cmd: hilrig_campaigns::CampaignCmd,
    },
    /// The reference device: register map, state files, OOB, flashing.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Firmware images.
    #[command(subcommand)]
    Fw(fw::FwCmd),
    /// Counters attestation service: enroll, catalog, verify, history, conformance.
    #[command(subcommand)]
    Counters(hilrig_counters::CountersCmd),
    /// The device on an FPGA board: Verilog, iCE40 flow, programming, a simulated
    /// board on PTYs.
    #[command(subcommand)]
    Fpga(fpga::FpgaCmd),
    /// The KVM VMM: boot guest payloads with the reference device on PCI.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Live patches for a fleet of VMMs.
    #[command(subcommand)]
    Patch(PatchCmd),
    /// Rig controller: inventory, power, consoles, OOB, leases, boards.
    Rig {
        #[command(subcommand)]
        cmd: hilrig_rig::RigCmd,
    },
    /// Render JUnit XML, JSON and HTML reports of a campaign run.
    Report(hilrig_reports::ReportCmd),
    /// The lab service: runs, case histories, hosts, artifacts, a JSON API, the
    /// campaign queue (`serve worker`), tokens and webhooks.
    Serve(hilrig_serve::ServeCmd),
    /// The results store from the command line: list, show RUN, history CASE.
    Runs(hilrig_serve::RunsCmd),
    /// Benchmarks: figures with ratios against a baseline measured in the same run.
    Bench {
        /// Benchmark name (see --list).
        name: Option<String>,
        /// List the benchmarks.
        #[arg(long)]
        list: bool,
        /// Seconds per measured loop.
        #[arg(long, default_value_t = 0.5)]
        seconds: f64,
    },
}

#[derive(Subcommand)]
enum PatchCmd {
    /// Roll a signed bundle out over many VMMs: canary hosts first, then waves; stops
    /// at the first refused or failed patch and reports which host runs which version.
    Rollout {
        /// An inventory: its simulated hosts' VMMs (optionally --tag filtered).
        #[arg(long, conflicts_with = "vmm")]
        inventory: Option<PathBuf>,
        /// Hosts with all these tags (with --inventory).
        #[arg(long)]
        tag: Vec<String>,
        /// VMM control sockets (repeatable).
        #[arg(long)]
        vmm: Vec<PathBuf>,
        /// The signed bundle.
        #[arg(long)]
        bundle: PathBuf,
        /// Canary hosts patched first.
        #[arg(long, default_value_t = 1)]
        canary: usize,
        /// Hosts per wave after the canaries.
        #[arg(long, default_value_t = 2)]
        wave: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Boot a guest payload with the device (same as the `hilrig-vmm` binary).
    Run(Box<hilrig_vmm::VmArgs>),
    /// Send one request to a running VMM's control socket and print the reply.
    Ctl {
        /// The control socket.
        socket: PathBuf,
        /// status | pause | resume | quiesce | metrics | teardown | patch (with
        /// --bundle), or a raw JSON request object.
        request: String,
        /// Bundle file for `patch`.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Reply timeout in seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Print the SHA-256 of this build's patching code as mapped in memory (the
    /// reference `hilrig fw bundle --patch-path` takes; `--target-vmm-file` reads the
    /// same value from the executable).
    MeasurePatchPath,
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Print the register map generated from the register table.
    Regmap {
        /// As Markdown (docs/registers.md).
        #[arg(long, conflicts_with = "json")]
        markdown: bool,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a factory-fresh device state file.
    Init {
        /// The state file to create (refuses to replace an existing one).
        state: PathBuf,
        /// Counter budget (thermometer width, 1..=64).
        #[arg(long, default_value_t = 64)]
        width: u8,
        /// Serial number.
        #[arg(long, default_value_t = 1)]
        serial: u64,
        /// Where to write the device's OOB reset key (random, 64 hex digits, mode
        /// 0600, never replaced); default: the state file's path + `.reset-key`.
        /// Give this file to the counters service at enrolment and to
        /// `device oob ... physical-reset --reset-key-file`.
        #[arg(long)]
        reset_key_file: Option<PathBuf>,
    },
    /// Send an OOB request to a device: a state file (in-process model) or a serial port.
    Oob {
        /// A state file, or a serial port / PTY path (a character device).
        target: PathBuf,
        /// identify | counters | hash | physical-reset
        request: String,
        /// Region for `hash`: vbios, firmware, config.
        #[arg(long)]
        region: Option<String>,
        /// Refused: a key on the command line is visible to every local user (ps,
        /// /proc, shell history). Use --reset-key-file.
        #[arg(long, hide = true)]
        key: Option<String>,
        /// For `physical-reset`: the file holding the OOB reset key (64 hex digits,
        /// mode 0600; group/other access is refused), as `device init` wrote it.
        #[arg(long)]
        reset_key_file: Option<PathBuf>,
        /// Baud rate for a serial target.
        #[arg(long, default_value_t = oob::DEFAULT_BAUD)]
        baud: u32,
        /// Response timeout in milliseconds for a serial target.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Backend for a state-file target: model, rtl, lockstep or verilator.
        #[arg(long, default_value = "model")]
        backend: String,
    },
    /// Program an image into a region through the in-band flash controller, as an operator.
    Flash {
        /// The device's state file.
        state: PathBuf,
        /// vbios, firmware or config.
        #[arg(long)]
        region: String,
        /// The image file.
        image: PathBuf,
        /// Device backend: model, rtl, lockstep or verilator.
        #[arg(long, default_value = "model")]
        backend: String,
    },
    /// Serve a state-file device's OOB port on a new PTY; prints the PTY's path.
    ServeOob {
        /// The device's state file.
        state: PathBuf,
        /// Stop after this many seconds (default: run until killed).
        #[arg(long)]
        seconds: Option<f64>,
        /// Device backend: model, rtl, lockstep or verilator.
        #[arg(long, default_value = "model")]
        backend: String,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match dispatch(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            // A campaign run that could not start exits by its class (CONFIG 2,
            // INFRA 3), as a run's own setup errors and faults do; anything else 2.
            std::process::ExitCode::from(
                e.downcast_ref::<hilrig_campaigns::RunError>()
                    .map_or(2, hilrig_campaigns::RunError::exit_code),
            )
        }
    }
}

/// The error and its causes in one line, leaving out a cause whose text the line
/// already holds (library errors often quote their source in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn dispatch(cmd: Cmd) -> Result<std::process::ExitCode> {
    use std::process::ExitCode;
    match cmd {
        Cmd::Run {
            out,
            device_only,
            keep,
            backend,
        } => {
            return if device_only {
                smoke::run(keep.as_deref(), &backend)
            } else {
                hilrig_campaigns::main_job(Some(&out))
            }
        }
        Cmd::Campaign { cmd } => return hilrig_campaigns::run(cmd),
        Cmd::Device(d) => device(d)?,
        Cmd::Fw(f) => fw::run(f)?,
        Cmd::Fpga(f) => fpga::run(f)?,
        Cmd::Vm(VmCmd::Run(args)) => return hilrig_vmm::run_cli(*args),
        Cmd::Vm(VmCmd::MeasurePatchPath) => println!(
            "{}",
            hex::encode(hilrig_vmm::lifecycle::patch_path::measure_patch_path())
        ),
        Cmd::Vm(VmCmd::Ctl {
            socket,
            request,
            bundle,
            timeout,
        }) => {
            use hilrig_vmm_api::control::Request;
            let req: Request = if request.trim_start().starts_with('{') {
                serde_json::from_str(&request)
                    .with_context(|| format!("request {request}: not a control request"))?
            } else {
                match request.as_str() {
                    "status" => Request::Status {},
                    "pause" => Request::Pause {},
                    "resume" => Request::Resume {},
                    "quiesce" => Request::Quiesce {},
                    "teardown" => Request::Teardown {},
                    "detach" => Request::Detach {},
                    "metrics" => Request::Metrics {},
                    "patch" => {
                        let b = bundle.context("`patch` needs --bundle FILE")?;
                        let bundle = std::fs::canonicalize(&b)
                            .with_context(|| format!("bundle {}", b.display()))?;
                        Request::Patch { bundle }
                    }
                    other => anyhow::bail!(
                        "unknown request `{other}` (status, pause, resume, quiesce, patch, teardown, detach, metrics)"
                    ),
                }
            };
            let response = hilrig_vmm_api::control::request(
                &socket,
                &req,
                Duration::from_secs_f64(timeout.max(0.1)),
            )?;
            return Ok(match response {
                Ok(reply) => {
                    println!("{}", serde_json::to_string_pretty(&reply)?);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("refused: {e}");
                    ExitCode::from(1)
                }
            });
        }
        Cmd::Report(r) => return hilrig_reports::run(r),
        Cmd::Serve(c) => return hilrig_serve::cli::serve(c),
        Cmd::Runs(c) => return hilrig_serve::cli::runs(c),
        Cmd::Rig { cmd } => return hilrig_rig::run(cmd),
        Cmd::Patch(PatchCmd::Rollout {
            inventory,
            tag,
            vmm,
            bundle,
            canary,
            wave,
            json,
        }) => {
            return rollout(
                inventory.as_deref(),
                &tag,
                &vmm,
                &bundle,
                canary,
                wave,
                json,
            )
        }
        Cmd::Counters(c) => {
            return hilrig_counters::cli::run_with(c, |b, p| {
                let err = |detail: String| hilrig_device::DeviceError::Transport {
                    what: p.display().to_string(),
                    detail,
                };
                if b == "fpga" {
                    // A (simulated) board's host-bridge port.
                    let port = p.to_str().ok_or_else(|| err("not UTF-8".into()))?;
                    return hilrig_board::Fpga::open_serial(port, 115_200)
                        .map(|f| Box::new(f) as Box<dyn Device>)
                        .map_err(|e| err(format!("board host bridge: {e}")));
                }
                open_device(b, p).map_err(|e| err(format!("{e:#}")))
            });
        }
        Cmd::Bench {
            name,
            list,
            seconds,
        } => match (name, list) {
            (Some(n), false) => {
                bench::run(&n, seconds)?;
            }
            _ => {
                for (n, what) in bench::BENCHES {
                    println!("{n:<12} {what}");
                }
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_region(s: &str) -> Result<Region> {
    Region::parse(s).with_context(|| format!("unknown region {s:?}; use vbios, firmware or config"))
}

fn device(cmd: DeviceCmd) -> Result<()> {
    match cmd {
        DeviceCmd::Regmap { json, .. } => {
            if json {
                println!("{}", regmap::to_json());
            } else {
                print!("{}", regmap::to_markdown());
            }
        }
        DeviceCmd::Init {
            state,
            width,
            serial,
            reset_key_file,
        } => {
            let key_file = reset_key_file.unwrap_or_else(|| default_reset_key_file(&state));
            init_device(&state, &key_file, width, serial)?;
            println!(
                "created {} (serial {serial}, counter width {width}); OOB reset key in {} (mode 0600)",
                state.display(),
                key_file.display()
            );
        }
        DeviceCmd::Oob {
            target,
            request,
            region,
            key,
            reset_key_file,
            baud,
            timeout_ms,
            backend,
        } => {
            if key.is_some() {
                bail!("--key is refused: a key on the command line is visible to every local user (ps, /proc, shell history); put the 64 hex digits in a file only you can read (chmod 600) and give --reset-key-file FILE");
            }
            let req = match request.as_str() {
                "identify" => Request::Identify,
                "counters" => Request::ReadCounters,
                "hash" => Request::ReadHash(parse_region(
                    region.as_deref().context("`hash` needs --region")?,
                )?),
                "physical-reset" => {
                    let f = reset_key_file.context(
                        "`physical-reset` needs --reset-key-file FILE (the key file `device init` wrote)",
                    )?;
                    Request::PhysicalReset(read_reset_key(&f)?)
                }
                other => bail!(
                    "unknown OOB request {other:?}; use identify, counters, hash or physical-reset"
                ),
            };
            let resp = oob_request(
                &target,
                &req,
                baud,
                Duration::from_millis(timeout_ms),
                &backend,
            )?;
            println!("{}", serde_json::to_string_pretty(&resp)?);
        }
        DeviceCmd::Flash {
            state,
            region,
            image,
            backend,
        } => {
            let region = parse_region(&region)?;
            let size = hilrig_device::NvState::load(&state)?
                .config
                .region_size(region);
            // Never more than the region holds (+1 to tell "too large").
            let img = fw::read_bounded(&image, u64::from(size) + 1)
                .with_context(|| format!("image for the {region} region ({size} bytes)"))?;
            // A writer: hold the state file (refused while a VMM runs on it).
            let _lock = hilrig_device::state::StateLock::acquire(&state)?;
            let mut m = open_device(&backend, &state)?;
            if img.is_empty() || img.len() > size as usize {
                bail!(
                    "image {} is {} bytes; the {region} region holds 1 to {size}",
                    image.display(),
                    img.len()
                );
            }
            let before = oob::read_counters(&mut *m)?;
            let attempts = hilrig_device::model::ops::flash_region(&mut *m, region, &img)
                .with_context(|| format!("flashing {} into {region}", image.display()))?;
            let after = oob::read_counters(&mut *m)?;
            println!(
                "flashed {} bytes into {region} with {attempts} attempts; {region} counter {} -> {}, master {} -> {}, slots left {}",
                img.len(),
                before.counters[region as usize],
                after.counters[region as usize],
                before.master,
                after.master,
                after.slots_left
            );
        }
        DeviceCmd::ServeOob {
            state,
            seconds,
            backend,
        } => {
            // Check the state file opens before printing the port.
            drop(open_device(&backend, &state)?);
            let server = oob::PtyServer::new().context("creating a PTY")?;
            println!("{}", server.path());
            use std::io::Write;
            std::io::stdout().flush()?;
            let deadline = seconds.map(|s| std::time::Instant::now() + Duration::from_secs_f64(s));
            // Every request reads the state file's current contents under its lock and
            // keeps nothing: a PHYSICAL_RESET never writes back a stale snapshot over
            // counts or an image another process wrote since this server started.
            let mut open = |p: &Path| {
                open_device(&backend, p).map_err(|e| hilrig_device::DeviceError::Transport {
                    what: p.display().to_string(),
                    detail: format!("{e:#}"),
                })
            };
            server.serve_with(
                &mut |req| oob::serve_state_request(&state, &mut open, req),
                &|| deadline.is_some_and(|d| std::time::Instant::now() > d),
            )?;
        }
    }
    Ok(())
}

fn rollout(
    inventory: Option<&Path>,
    tags: &[String],
    vmm: &[PathBuf],
    bundle: &Path,
    canary: usize,
    wave: usize,
    json: bool,
) -> Result<std::process::ExitCode> {
    use hilrig_rig::rollout::{self, HostOutcome, Target};
    let bundle =
        std::fs::canonicalize(bundle).with_context(|| format!("bundle {}", bundle.display()))?;
    let targets: Vec<Target> = match inventory {
        Some(inv_path) => {
            let inv = hilrig_rig::Inventory::load(inv_path)?;
            let mut out = Vec::new();
            for h in inv.select(tags) {
                if !h.is_sim() {
                    bail!(
                        "host {} in {}: only simulated hosts' VMM control sockets are reachable from the controller; use --vmm SOCKET for others",
                        h.name,
                        inv_path.display()
                    );
                }
                out.push(Target {
                    name: h.name.clone(),
                    socket: hilrig_rig::sim::SimHost::new(&inv, h).control_path(),
                });
            }
            out
        }
        None => vmm
            .iter()
            .map(|s| Target {
                name: s.display().to_string(),
                socket: s.clone(),
            })
            .collect(),
    };
    if targets.is_empty() {
        bail!("no VMMs to patch: give --vmm SOCKET... or --inventory FILE (with matching --tag)");
    }
    let fleet = rollout::Sockets {
        timeout: Duration::from_secs(30),
    };
    let report = rollout::rollout(&fleet, &targets, &bundle, canary, wave);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for h in &report.hosts {
            let what = match &h.outcome {
                HostOutcome::Applied {
                    component,
                    from,
                    to,
                    blackout_us,
                } => {
                    format!("applied {component} v{from} -> v{to}, blackout {blackout_us} us")
                }
                HostOutcome::Refused { reason } => format!("REFUSED: {reason}"),
                HostOutcome::Failed { reason } => format!("FAILED: {reason}"),
                HostOutcome::Skipped => "skipped".into(),
                HostOutcome::NotApplicable { reason } => format!("not applicable: {reason}"),
            };
            let versions = h
                .versions
                .as_ref()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "unreachable".into());
            println!(
                "wave {} {:<24} {what}; now {versions}",
                h.wave, h.target.name
            );
        }
        match &report.stopped {
            Some(why) => println!("rollout stopped: {why}"),
            None => println!("rollout complete: {} hosts patched", report.hosts.len()),
        }
    }
    Ok(if report.complete {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    })
}

/// Open the device in state file `state` on backend `backend` (model, rtl, lockstep,
/// verilator).
pub fn open_device(backend: &str, state: &Path) -> Result<Box<dyn Device>> {
    Ok(match backend.parse::<hilrig_device::BackendKind>()? {
        hilrig_device::BackendKind::Model => Box::new(Model::open(state)?),
        hilrig_device::BackendKind::Verilator => {
            Box::new(hilrig_verilator::Verilator::open(state)?)
        }
        other => hilrig_fpga::open_backend(other.name(), state)?,
    })
}

/// Send one OOB request to a state file (in-process device) or a serial port.
fn oob_request(
    target: &Path,
    req: &Request,
    baud: u32,
    timeout: Duration,
    backend: &str,
) -> Result<Response> {
    use std::os::unix::fs::FileTypeExt;
    let meta =
        std::fs::metadata(target).with_context(|| format!("OOB target {}", target.display()))?;
    if meta.file_type().is_char_device() {
        let path = target.to_str().context("serial path is not UTF-8")?;
        let mut c = OobClient::open_serial(path, baud, timeout)?;
        Ok(c.request(req)?)
    } else {
        // Reads take no lock; a PHYSICAL_RESET writes the state file and holds it
        // (refused while a VMM runs on it, naming its pid).
        let _lock = match req {
            Request::PhysicalReset(_) => Some(hilrig_device::state::StateLock::acquire(target)?),
            _ => None,
        };
        let mut dev = open_device(backend, target)?;
        Ok(oob::request_device(&mut *dev, req)?)
    }
}

/// The reset-key file `device init` writes by default: `STATE.reset-key`.
fn default_reset_key_file(state: &Path) -> PathBuf {
    let mut s = state.as_os_str().to_owned();
    s.push(".reset-key");
    PathBuf::from(s)
}

/// Create a factory-fresh device in `state` with a random OOB reset key (from the
/// kernel's CSPRNG, not derived from the serial), written to `key_file` first
/// (0600, `O_EXCL|O_NOFOLLOW`): an existing state or key file is never replaced.
fn init_device(state: &Path, key_file: &Path, width: u8, serial: u64) -> Result<()> {
    hilrig_device::state::refuse_existing(state)?;
    let mut nv = hilrig_fw::factory::device(DeviceConfig::with_width(width), serial)?;
    nv.reset_key = hilrig_device::secure::random_key().context("reading random bytes")?;
    let text = format!("{}\n", hex::encode(nv.reset_key));
    hilrig_device::secure::create_secret_file(key_file, text.as_bytes())
        .context("writing the OOB reset key")?;
    if let Err(e) = Model::create(state, nv) {
        let _ = std::fs::remove_file(key_file);
        return Err(e.into());
    }
    Ok(())
}

/// Read an OOB reset key file: 64 hex digits, the file owner-only (a key readable
/// by group/other is refused, naming the file and its mode).
fn read_reset_key(path: &Path) -> Result<[u8; 32]> {
    let text = hilrig_device::secure::read_secret_file(path, 4096)?;
    let bytes = hex::decode(text.trim())
        .with_context(|| format!("reset key file {}: not hex", path.display()))?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        anyhow::anyhow!(
            "reset key file {}: {} bytes, a reset key has 32 (64 hex digits)",
            path.display(),
            b.len()
        )
    })
}

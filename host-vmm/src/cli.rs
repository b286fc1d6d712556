//! The command-line surface: `hilrig vm run` and the `hilrig-vmm` binary share it.

use crate::backend::{open_backend, DeviceSpec};
use crate::engine::AlarmConfig;
use crate::payload;
use crate::plan::TrapSet;
use crate::policy::{load_profile, PolicyError, Profile};
use crate::vm::{Console, Vm, VmConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `hilrig vm run` / `hilrig-vmm`.
#[derive(Debug, Clone, clap::Args)]
pub struct VmArgs {
    /// Guest payload: a built-in name (see --list-payloads) or a raw binary file,
    /// loaded at 0x100000 and entered in 64-bit mode.
    #[arg(long, default_value = "pci-enum")]
    pub payload: String,
    /// Device backend: model | rtl | lockstep | vfio=<sysfs path of a vfio-pci function> |
    /// fpga=<bridge serial port>[,oob=<OOB serial port>][,baud=N] (a board, see hilrig-board).
    #[arg(long, default_value = "model")]
    pub device: String,
    /// Model backend: device state file (created factory-fresh if missing).
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
    /// Wall-clock watchdog, e.g. 10s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Trap every BAR0 page (no direct mappings), e.g. to compare with the fast path.
    #[arg(long)]
    pub trap_all: bool,
    /// Print the BAR0 page plan (which pages are mapped, which trap).
    #[arg(long)]
    pub show_plan: bool,
    /// Print the result as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Serve the control socket here (owner-only; JSON lines: status, pause, resume,
    /// patch, teardown, metrics).
    #[arg(long)]
    pub control: Option<std::path::PathBuf>,
    /// Accept live patches signed by this Ed25519 public key file (repeatable).
    #[arg(long = "patch-pubkey")]
    pub patch_pubkeys: Vec<std::path::PathBuf>,
    /// X25519 secret key file to decrypt encrypted patch bundles.
    #[arg(long)]
    pub patch_decrypt_key: Option<std::path::PathBuf>,
    /// Ed25519 secret key file that signs teardown records (default: an ephemeral key).
    #[arg(long)]
    pub vmm_key: Option<std::path::PathBuf>,
    /// Tear the tenant down when the VM exits (scrub, reset, counters, signed record).
    #[arg(long)]
    pub teardown_on_exit: bool,
    /// Write the teardown record (JSON) here.
    #[arg(long)]
    pub teardown_record: Option<std::path::PathBuf>,
    /// The counters service's database (SQLite path or postgresql:// URL; needs
    /// --counters-key): its catalog also vouches for VBIOS hashes (the factory VBIOS
    /// is always known), and teardown asks it for the verdict on the device.
    #[arg(long)]
    pub counters_db: Option<String>,
    /// MAC key file of the counters service (with --counters-db).
    #[arg(long)]
    pub counters_key: Option<std::path::PathBuf>,
    /// Hand the device to the guest even if its measured VBIOS is invalid or unknown
    /// (recorded in the output).
    #[arg(long)]
    pub allow_unknown_vbios: bool,
    /// List the built-in payloads and exit.
    #[arg(long)]
    pub list_payloads: bool,
}

/// Parse a size: bytes, or with a K/M/G suffix (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("`{s}`: unknown size suffix `{c}` (use K, M or G)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("`{s}` is not a size (e.g. 64M)"))
}

/// Parse `on`/`off` (also true/false, yes/no, 1/0).
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("`{s}`: expected on or off")),
    }
}

/// Load and compile the profile `args` name, with the enforce override applied.
/// Errors name the file, the rule and the reason.
pub fn load_policy(args: &VmArgs) -> Result<Profile, PolicyError> {
    let mut p = load_profile(args.policy.as_deref(), &args.profile)?;
    if let Some(e) = args.enforce {
        p.enforce = e;
    }
    Ok(p)
}

/// Parse a duration: seconds, or with an ms/s/m suffix.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("`{s}` is not a duration (e.g. 10s, 500ms)");
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

/// Run a VM as the CLI does: print the verdict, exit counts by kind and wall time;
/// the exit code is the verdict's ([`crate::Verdict::exit_status`]). Setup errors
/// (bad payload, backend, KVM) are returned as `Err`; callers exit with 2.
pub fn run_cli(args: VmArgs) -> anyhow::Result<ExitCode> {
    if args.list_payloads {
        for (name, what) in payload::BUILTINS {
            println!("{name:14} {what}");
        }
        for (name, what) in crate::attacks::ATTACKS {
            println!("{name:24} {what}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let t0 = Instant::now();
    let spec: DeviceSpec = args.device.parse()?;
    let (name, bytes) = payload::load(&args.payload)?;
    let profile = Arc::new(load_policy(&args)?);
    let mut backend = open_backend(&spec, args.device_state.as_deref())?;
    // Measured VBIOS: refuse a device whose expansion ROM is invalid or unknown.
    let catalog = crate::measured::CatalogSpec {
        counters: match (&args.counters_db, &args.counters_key) {
            (Some(db), Some(k)) => Some((db.clone(), k.clone())),
            (Some(_), None) => anyhow::bail!("--counters-db needs --counters-key"),
            _ => None,
        },
    };
    let mut vbios = crate::measured::measure(&mut *backend.device, &catalog)
        .map_err(|e| anyhow::anyhow!("measuring the device's VBIOS: {e}"))?;
    if !vbios.acceptable() {
        if !args.allow_unknown_vbios {
            eprintln!("{}", vbios.describe());
            eprintln!(
                "refusing to hand the device to a guest (run anyway with --allow-unknown-vbios)"
            );
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"verdict": "device refused", "exit_status": EXIT_REFUSED, "vbios": vbios})
                );
            }
            return Ok(ExitCode::from(EXIT_REFUSED));
        }
        vbios.overridden = true;
        tracing::warn!("{}", vbios.describe());
    }
    let config = VmConfig {
        vcpus: args.vcpus,
        mem_size: args.mem,
        payload: bytes,
        payload_name: name.clone(),
        timeout: args.timeout,
        console: match &args.console {
            Some(p) => Console::File(p.clone()),
            // Keep standard output a single JSON object with --json.
            None if args.json => Console::Stderr,
            None => Console::Stdout,
        },
        trap: if args.trap_all {
            TrapSet::all()
        } else {
            TrapSet::none()
        },
        policy: Some(profile.clone()),
        alarms: AlarmConfig {
            file: args.alarms.clone(),
            capture: false,
            rate: args.alarm_rate,
            burst: (args.alarm_rate / 10).max(10),
        },
        record_decisions: false,
        control: args.control.clone(),
        lifecycle: lifecycle_config(&args)?,
    };
    let vm = Vm::new(config, backend)?;
    if args.show_plan && !args.json {
        eprint!("{}", vm.plan().describe());
    }
    let mut report = vm.run()?;
    // Whether the device is wedged after the run (after teardown's reset, if any:
    // the teardown record says what it found).
    let device_hung = report.device.as_mut().map(|d| {
        d.read32(hilrig_device::Reg::Id.offset()).ok()
            != Some(hilrig_device::regmap::DEVICE_ID_VALUE)
    });
    let wall = t0.elapsed();
    if args.json {
        let v = serde_json::json!({
            "payload": name,
            "device": spec.to_string(),
            "verdict": report.verdict.to_string(),
            "passed": report.verdict.passed(),
            "exit_status": report.verdict.exit_status(),
            "exits": report.exits,
            "wall_ms": wall.as_secs_f64() * 1e3,
            "first_exit_ms": report.first_exit.map(|d| d.as_secs_f64() * 1e3),
            "direct_pages": report.plan.direct_pages(),
            "policy": report.policy,
            "vbios": vbios,
            "teardown": report.teardown,
            "patches": report.patches,
            "results": report.results,
            "device_hung": device_hung,
        });
        println!("{v}");
    } else {
        eprintln!("{}", vbios.describe());
        if let Some(t) = &report.teardown {
            eprintln!(
                "teardown: {} in {} us, verdict {}",
                if t.complete { "complete" } else { "INCOMPLETE" },
                t.total_micros,
                t.verdict
                    .as_ref()
                    .map(|v| v.verdict.as_str())
                    .unwrap_or("none")
            );
        }
        eprintln!("verdict: {}", report.verdict);
        eprintln!("exits:   {}", report.exits);
        eprintln!(
            "wall:    {:.3} ms (payload {name}, device {spec}, {} direct BAR0 pages)",
            wall.as_secs_f64() * 1e3,
            report.plan.direct_pages()
        );
        if let Some(p) = &report.policy {
            eprintln!(
                "policy:  profile {} from {} (enforce {}): {} alarms ({} written, {} suppressed), {} dropped, {} shadowed, {} faults",
                p.profile,
                p.source,
                if p.enforce { "on" } else { "off" },
                p.alarms,
                p.alarms_written,
                p.alarms_suppressed,
                p.dropped,
                p.shadowed,
                p.faults
            );
            for (reg, n) in &p.per_register {
                eprintln!("         {reg}: {n} alarms");
            }
        }
    }
    Ok(ExitCode::from(report.verdict.exit_status()))
}

/// Exit status when the device is refused before the guest starts (measured VBIOS).
pub const EXIT_REFUSED: u8 = 10;

/// Live-patch and teardown settings from the command line.
pub fn lifecycle_config(args: &VmArgs) -> anyhow::Result<crate::lifecycle::LifecycleConfig> {
    use anyhow::Context;
    let patch = if args.patch_pubkeys.is_empty() {
        None
    } else {
        let trusted = args
            .patch_pubkeys
            .iter()
            .map(|p| hilrig_fw::keys::verifying_key(p))
            .collect::<Result<Vec<_>, _>>()?;
        let decrypt_key = args
            .patch_decrypt_key
            .as_deref()
            .map(|p| hilrig_fw::keys::read_key(p, hilrig_fw::keys::KeyKind::BoxSecret))
            .transpose()?;
        let build_sha256 = crate::patch::running_build_sha256()
            .context("hashing the running VMM executable (/proc/self/exe)")?;
        Some(Arc::new(crate::patch::PatchAuthority {
            trusted,
            decrypt_key,
            build_sha256,
            module_dir: std::env::temp_dir()
                .join(format!("hilrig-vmm-modules-{}", std::process::id())),
        }))
    };
    let vmm_key = args
        .vmm_key
        .as_deref()
        .map(hilrig_fw::keys::signing_key)
        .transpose()?;
    Ok(crate::lifecycle::LifecycleConfig {
        patch,
        vmm_key,
        teardown_record: args.teardown_record.clone(),
        counters: args.counters_db.clone().zip(args.counters_key.clone()),
        teardown_on_exit: args.teardown_on_exit || args.teardown_record.is_some(),
        profile_name: args.profile.clone(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}

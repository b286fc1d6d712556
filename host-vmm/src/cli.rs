//! The command-line surface: `hilrig vm run` and the `hilrig-vmm` binary share it.

use crate::devices::open_backend;
use crate::devices::plan::TrapSet;
use crate::policy::engine::AlarmConfig;
use crate::policy::{load_profile, PolicyError, Profile};
use crate::vstate::vm::{Console, Vm, VmConfig};
use hilrig_vmm_api::{ExitStatus, RunSummary, VmSpec};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// Arguments of `hilrig vm run` / `hilrig-vmm`: the typed [`VmSpec`].
pub type VmArgs = VmSpec;

pub use hilrig_vmm_api::spec::{parse_duration, parse_on_off, parse_size};

/// Load and compile the profile `args` name, with the enforce override applied.
/// Errors name the file, the rule and the reason.
pub fn load_policy(args: &VmArgs) -> Result<Profile, PolicyError> {
    let mut p = load_profile(args.policy.as_deref(), &args.profile)?;
    if let Some(e) = args.enforce {
        p.enforce = e;
    }
    Ok(p)
}

/// Measure the device's VBIOS: `Ok(Err(()))` when it is refused (printed, and the
/// refusal's summary printed with `--json`), `Ok(Ok(m))` when the guest may have it.
fn measure_vbios(
    backend: &mut crate::devices::backend::Backend,
    catalog: &crate::lifecycle::measured::CatalogSpec,
    args: &VmArgs,
    name: &str,
    spec: &hilrig_vmm_api::DeviceSpec,
) -> anyhow::Result<Result<hilrig_vmm_api::VbiosMeasurement, ()>> {
    let mut vbios = crate::lifecycle::measured::measure(&mut *backend.device, catalog)
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
                    RunSummary::refused(name, &spec.to_string(), vbios).to_line()
                );
            }
            return Ok(Err(()));
        }
        vbios.overridden = true;
        tracing::warn!("{}", vbios.describe());
    }
    Ok(Ok(vbios))
}

/// Run a VM as the CLI does: print the verdict, exit counts by kind and wall time;
/// the exit code is the verdict's ([`crate::Verdict::exit_status`]). Setup errors
/// (bad payload, backend, KVM) are returned as `Err`; callers exit with 2.
pub fn run_cli(args: VmArgs) -> anyhow::Result<ExitCode> {
    if args.list_payloads {
        for (name, what) in hilrig_guest::BUILTINS {
            println!("{name:14} {what}");
        }
        for (name, what) in crate::attacks::ATTACKS
            .iter()
            .chain(crate::attacks::HOSTILE)
        {
            println!("{name:24} {what}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    // The fds this process inherited (a jail closes them).
    let inherited = crate::jail::open_fds();
    let t0 = Instant::now();
    let mut args = args;
    let spec = args.device.clone();
    // Read as the caller, before any jail: payload, policy, keys, the device
    // (a backend may need tools or device nodes the jail does not have).
    let (name, bytes) = hilrig_guest::load(&args.payload)?;
    // A passed-through device that is not the reference device: its description
    // names the registers the policy, alarms and teardown use.
    let desc = match &spec {
        hilrig_vmm_api::DeviceSpec::Vfio {
            desc: Some(path), ..
        } => Some(Arc::new(crate::policy::desc::DeviceDesc::load(path)?)),
        _ => None,
    };
    let profile = Arc::new(match &desc {
        Some(d) => {
            let mut p = d.compile(args.policy.as_deref(), &args.profile)?;
            if let Some(e) = args.enforce {
                p.enforce = e;
            }
            p
        }
        None => load_policy(&args)?,
    });
    // Console owners by name: looked up here, as the caller, before any jail
    // (whose root has no user database).
    let console_owners = resolve_console_owners(&args.console_owners)?;
    let lifecycle = crate::lifecycle::LifecycleConfig {
        device_desc: desc.clone(),
        ..lifecycle_config(&args)?
    };
    let jail = match args.jail.clone() {
        Some(_) if !spec.jailable() => anyhow::bail!(
            "--jail works with the model, rtl and lockstep backends, not {spec} (it runs threads or needs host device nodes)"
        ),
        Some(dir) => Some(jail_spec(&mut args, &dir, inherited)?),
        None => None,
    };
    // A jailed VMM binds its control socket and opens its console and alarm files
    // inside the jail, where the host's real directories above them are out of sight
    // (and another user's file may look like the jail uid's own): check them here,
    // as the caller. The console and alarm files are bound into the jail by
    // themselves: made here (0600, ours) when missing, so there is a file to bind.
    if let Some(jail) = &jail {
        if let Some(sock) = &args.control {
            crate::lifecycle::control::check_socket_dirs(sock)?;
        }
        for f in &jail.rw_files {
            // A terminal cannot be reached from inside the jail (device nodes and
            // /dev/pts are not there): say so instead of a refusal that blames its
            // owner or a bind that leads nowhere.
            if std::fs::metadata(f).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_char_device()
            }) {
                anyhow::bail!(
                    "{}: a terminal cannot be a jailed VMM's console or alarm file (device nodes are not reachable inside the jail): write to a file, or run without --jail",
                    f.display()
                );
            }
            hilrig_device::secure::check_output_path(f)?;
            if std::fs::symlink_metadata(f).is_err() {
                hilrig_device::secure::create_output_file(f)?;
            }
        }
    }
    let mut backend = open_backend(&spec, args.device_state.as_deref())?;
    // Measured VBIOS: refuse a device whose expansion ROM is invalid or unknown.
    let catalog = crate::lifecycle::measured::CatalogSpec {
        counters: match (&args.counters_db, &args.counters_key) {
            (Some(db), Some(k)) => Some((db.clone(), k.clone())),
            (Some(_), None) => anyhow::bail!("--counters-db needs --counters-key"),
            _ => None,
        },
    };
    // Provisioning gate: with a counters service, the device's counters are read out
    // of band and must be vouched for before anything else touches it.
    let gate = match &catalog.counters {
        Some((db, key)) if desc.is_none() => {
            let pager = match args.page_cmd.as_deref().map(str::split_whitespace) {
                Some(argv) => {
                    let argv: Vec<String> = argv.map(str::to_string).collect();
                    if argv.is_empty() {
                        anyhow::bail!("--page-cmd is empty");
                    }
                    Some(hilrig_counters::remediate::Pager::Command(argv))
                }
                None => None,
            };
            let g = crate::lifecycle::gate::check(
                &mut *backend.device,
                &spec.to_string(),
                db,
                key,
                pager.as_ref(),
            );
            if !g.outcome.admits() {
                eprintln!("{}", g.describe());
                eprintln!("refusing to hand the device to a guest");
                if args.json {
                    println!(
                        "{}",
                        RunSummary::untrusted(&name, &spec.to_string(), g).to_line()
                    );
                }
                return Ok(ExitStatus::DeviceUntrusted.into());
            }
            Some(g)
        }
        _ => None,
    };
    // A described device without an expansion ROM has no VBIOS to measure (the
    // measured VBIOS is the reference device's); every other device is measured.
    let vbios = if desc.is_some() && backend.device.rom_size() == 0 {
        None
    } else {
        match measure_vbios(&mut backend, &catalog, &args, &name, &spec)? {
            Ok(v) => Some(v),
            Err(()) => return Ok(ExitStatus::DeviceRefused.into()),
        }
    };
    if let Some(jail) = &jail {
        match crate::jail::enter(jail)? {
            crate::jail::Entered::Parent(code) => return Ok(code),
            crate::jail::Entered::Child => {}
        }
    }
    crate::jail::probe_from_env();
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
        console_owners,
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
        lifecycle,
        on_unemulated: args.on_unemulated,
        irqchip: args.irqchip,
    };
    let has_intx = backend.intx.is_some();
    let mut vm = Vm::new(config, backend)?;
    if vm.irqchip() {
        eprintln!(
            "interrupts: in-kernel irqchip; {}",
            match (has_intx, vm.interrupt_wired()) {
                (_, true) => format!(
                    "the device's INTx wired to IOAPIC input {}",
                    crate::vstate::vm::INTX_GSI
                ),
                (true, false) => "the device's INTx NOT wired (--irqchip unwired)".into(),
                (false, false) => "the device has no interrupt line".into(),
            }
        );
    }
    let sandbox = sandbox(&args, &mut vm);
    if args.show_plan && !args.json {
        eprint!("{}", vm.plan().describe());
    }
    let mut report = vm.run()?;
    // Whether the device is wedged after the run (after teardown's reset, if any:
    // the teardown record says what it found).
    let device_hung = report.device.as_mut().map(|d| match &desc {
        Some(desc) => desc.check_id(&mut **d).is_err(),
        None => {
            d.read32(hilrig_device::Reg::Id.offset()).ok()
                != Some(hilrig_device::regmap::DEVICE_ID_VALUE)
        }
    });
    let wall = t0.elapsed();
    if args.json {
        let summary = RunSummary {
            payload: name.clone(),
            device: spec.to_string(),
            verdict: report.verdict.to_string(),
            passed: report.verdict.passed(),
            exit_status: report.verdict.exit_status(),
            exits: report.exits,
            wall_ms: wall.as_secs_f64() * 1e3,
            first_exit_ms: report.first_exit.map(|d| d.as_secs_f64() * 1e3),
            direct_pages: report.plan.direct_pages() as u64,
            policy: report.policy.as_ref().map(|p| p.summary.clone()),
            vbios: vbios.clone(),
            teardown: report.teardown.clone(),
            patches: report.patches.clone(),
            results: report.results.clone(),
            device_hung,
            sandbox: Some(sandbox),
            gate: gate.clone(),
        };
        println!("{}", summary.to_line());
    } else {
        if let Some(g) = &gate {
            eprintln!("{}", g.describe());
        }
        if let Some(v) = &vbios {
            eprintln!("{}", v.describe());
        }
        if let Some(t) = &report.teardown {
            eprintln!(
                "teardown: {} in {} us, verdict {}",
                if t.complete { "complete" } else { "INCOMPLETE" },
                t.total_micros,
                t.counters_verdict()
                    .map_or("none".to_string(), |v| v.to_string())
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
            if !p.untrapped_rule_pages.is_empty() {
                eprintln!(
                    "         enforcement off: pages {:?} with rules mapped straight through (not trapped)",
                    p.untrapped_rule_pages
                );
            }
            for (reg, n) in &p.per_register {
                eprintln!("         {reg}: {n} alarms");
            }
        }
    }
    Ok(report.verdict.exit_status().into())
}

/// The uids of `owners` (`--console-owner`): a uid as it is, a user name looked
/// up in this host's user database. A name that does not resolve is an error
/// naming it and this host (uids are per host: a name is resolved where the VMM
/// runs), never skipped.
pub fn resolve_console_owners(owners: &[hilrig_vmm_api::ConsoleOwner]) -> anyhow::Result<Vec<u32>> {
    use hilrig_vmm_api::ConsoleOwner;
    owners
        .iter()
        .map(|o| match o {
            ConsoleOwner::Uid(u) => Ok(*u),
            ConsoleOwner::User(name) => match uid_of_user(name) {
                Ok(Some(uid)) => Ok(uid),
                Ok(None) => anyhow::bail!(
                    "--console-owner {name:?}: no such user on host {} (a console owner's name is looked up on the host where the VMM runs)",
                    host_name()
                ),
                Err(e) => anyhow::bail!(
                    "--console-owner {name:?}: looking the user up on host {}: {e}",
                    host_name()
                ),
            },
        })
        .collect()
}

/// The uid of user `name` in this host's user database (`getpwnam_r`).
fn uid_of_user(name: &str) -> std::io::Result<Option<u32>> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: a zeroed passwd is a valid out-parameter for getpwnam_r.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: name is NUL-terminated, buf is writable for its length, and
        // pw/found are valid out-pointers for the call.
        let rc = unsafe {
            libc::getpwnam_r(
                c.as_ptr(),
                &mut pw,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        match rc {
            0 if found.is_null() => return Ok(None),
            0 => return Ok(Some(pw.pw_uid)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            // Not found, as some C libraries report it.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(std::io::Error::from_raw_os_error(e)),
        }
    }
}

/// This host's name, for messages (`?` if it cannot be had).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "?".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The directories the VMM writes in: those of the state file, console, alarms,
/// teardown record, control socket and a SQLite counters database.
pub fn write_dirs(args: &VmArgs) -> Vec<std::path::PathBuf> {
    let mut files = written_in_place(args);
    files.extend(written_by_rename(args));
    dirs_of(&files)
}

/// The files the VMM opens and writes in place: console and alarms.
pub fn written_in_place(args: &VmArgs) -> Vec<std::path::PathBuf> {
    [&args.console, &args.alarms]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
}

/// The files the VMM creates or renames into place, so it needs their
/// directories: state file, teardown record, control socket, patch record and a SQLite
/// counters database (with its journal).
fn written_by_rename(args: &VmArgs) -> Vec<std::path::PathBuf> {
    let mut files: Vec<std::path::PathBuf> = [
        &args.device_state,
        &args.teardown_record,
        &args.control,
        // Rewritten (atomically) before each live patch is applied.
        &args.patch_record,
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect();
    if let Some(db) = &args.counters_db {
        if !db.contains("://") {
            files.push(db.into());
        }
    }
    files
}

/// The directories `files` are in (absolute, sorted, once each).
fn dirs_of(files: &[std::path::PathBuf]) -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<std::path::PathBuf> = files
        .iter()
        .map(|f| {
            let abs = std::path::absolute(f).unwrap_or_else(|_| f.clone());
            abs.parent()
                .map(|p| p.to_path_buf())
                .unwrap_or_else(|| "/".into())
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// The jail `args` ask for; makes the paths in `args` absolute (the jailed VMM
/// sees them at the same absolute paths).
pub fn jail_spec(
    args: &mut VmArgs,
    dir: &std::path::Path,
    close_fds: Vec<i32>,
) -> anyhow::Result<crate::jail::JailSpec> {
    let abs = |p: &mut Option<std::path::PathBuf>| -> anyhow::Result<()> {
        if let Some(x) = p.as_mut() {
            *x = std::path::absolute(&*x)?;
        }
        Ok(())
    };
    abs(&mut args.device_state)?;
    abs(&mut args.console)?;
    abs(&mut args.alarms)?;
    abs(&mut args.teardown_record)?;
    abs(&mut args.control)?;
    abs(&mut args.counters_key)?;
    abs(&mut args.patch_source)?;
    abs(&mut args.patch_record)?;
    if let Some(db) = &args.counters_db {
        if !db.contains("://") {
            args.counters_db = Some(std::path::absolute(db)?.to_string_lossy().into_owned());
        }
    }
    let mut ro_files = Vec::new();
    if let Some(k) = &args.counters_key {
        ro_files.push(k.clone());
    }
    Ok(crate::jail::JailSpec {
        dir: std::path::absolute(dir)?,
        uid: args.uid.unwrap_or(crate::jail::DEFAULT_UID),
        gid: args
            .gid
            .or_else(crate::jail::kvm_gid)
            .unwrap_or(crate::jail::DEFAULT_UID),
        // The console and alarm files by themselves (another VMM's files may share
        // their directory); the directories of what is created or renamed.
        rw_dirs: dirs_of(&written_by_rename(args)),
        rw_files: written_in_place(args),
        ro_files,
        // The pull-mode patch source: its poller lists and reads it in the jail.
        ro_dirs: args.patch_source.iter().cloned().collect(),
        close_fds,
        memory_max: crate::jail::DEFAULT_MEMORY_MAX,
        pids_max: crate::jail::DEFAULT_PIDS_MAX,
    })
}

/// Confine the run as `args` say: landlock on this thread now (inherited by the
/// VM's threads), the seccomp filters as each thread starts ([`Vm::sandbox`]).
fn sandbox(args: &VmArgs, vm: &mut Vm) -> hilrig_vmm_api::SandboxSummary {
    crate::seccomp::arm_probe_from_env();
    let network = args
        .counters_db
        .as_deref()
        .is_some_and(|d| d.starts_with("postgres"));
    let mut summary = hilrig_vmm_api::SandboxSummary {
        seccomp: args.seccomp_on(),
        landlock: "off".into(),
        jail: args.jail.as_ref().map(|j| j.display().to_string()),
        // SAFETY: getuid/getgid have no preconditions.
        uid: unsafe { libc::getuid() },
        gid: unsafe { libc::getgid() },
        notes: crate::jail::notes(),
    };
    if !args.seccomp_on() {
        tracing::warn!("--seccomp off: no seccomp filters, no landlock (debugging only)");
        summary
            .notes
            .push("seccomp and landlock off (--seccomp off)".into());
        return summary;
    }
    summary.landlock = match crate::seccomp::landlock(&write_dirs(args)) {
        Ok(st) => st,
        Err(e) => {
            tracing::warn!("landlock not applied: {e}");
            format!("not applied: {e}")
        }
    };
    vm.sandbox(crate::seccomp::Sandbox {
        seccomp: true,
        network,
    });
    summary
}

/// Live-patch and teardown settings from the command line.
pub fn lifecycle_config(args: &VmArgs) -> anyhow::Result<crate::lifecycle::LifecycleConfig> {
    use anyhow::Context;
    let patch =
        if args.patch_pubkeys.is_empty() {
            // A patch setting without a key that signs patches does nothing: say so
            // rather than run a VMM its operator believes is patchable (a key flag
            // mistyped or lost on the way).
            let stray = [
                args.patch_record.as_ref().map(|_| "--patch-record"),
                args.patch_record_key.as_ref().map(|_| "--patch-record-key"),
                args.patch_decrypt_key
                    .as_ref()
                    .map(|_| "--patch-decrypt-key"),
            ];
            let stray: Vec<_> = stray.into_iter().flatten().collect();
            if !stray.is_empty() {
                anyhow::bail!(
                "{} given without --patch-pubkey: this VMM would accept no patch, so {} nothing; \
                 add --patch-pubkey KEY or drop {}",
                stray.join(" and "),
                if stray.len() == 1 { "it does" } else { "they do" },
                if stray.len() == 1 { "it" } else { "them" },
            );
            }
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
            let build_sha256 = crate::lifecycle::patch::running_build_sha256()
                .context("hashing the running VMM executable (/proc/self/exe)")?;
            Some(Arc::new(crate::lifecycle::patch::PatchAuthority {
                trusted,
                decrypt_key,
                build_sha256,
                module_dir: std::env::temp_dir()
                    .join(format!("hilrig-vmm-modules-{}", std::process::id())),
                // Fail closed: without a record of applied versions a restart would
                // re-open every downgrade (a validly signed older bundle applied).
                applied: match (&args.patch_record, &args.patch_record_key) {
                    (Some(rec), Some(key)) => {
                        // Absolute: it is rewritten later, perhaps inside a jail.
                        Some(Arc::new(crate::lifecycle::applied::AppliedVersions::open(
                            &std::path::absolute(rec)?,
                            key,
                            &crate::lifecycle::applied::host_name(),
                        )?))
                    }
                    (rec, key) => anyhow::bail!(
                    "a patchable VMM (--patch-pubkey) needs a record of applied patch versions: \
                     missing {}; without it a restart re-opens downgrades",
                    [
                        rec.is_none().then_some("--patch-record FILE"),
                        key.is_none().then_some("--patch-record-key KEY"),
                    ]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" and ")
                ),
                },
                allow_widening: args.allow_policy_widening,
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
        patch_source: match (&args.patch_source, args.patch_pubkeys.is_empty()) {
            (Some(_), true) => anyhow::bail!(
                "--patch-source needs --patch-pubkey (who signs the bundles it applies)"
            ),
            (s, _) => s.clone(),
        },
        patch_poll: args.patch_poll.max(std::time::Duration::from_millis(10)),
        teardown_nonce: args.teardown_nonce,
        vm_id: args.vm_id.clone(),
        quiesce_patches: args.quiesce_patches,
        ..Default::default()
    })
}

//! `hilrig bench <name>`: figures with ratios against a baseline measured in the same run.

use crate::figure::{rate, Figure};
use anyhow::{bail, Result};
use hilrig_device::regmap::{Reg, BUFFER_BASE, BUFFER_SIZE};
use hilrig_device::{Device, DeviceConfig, Model};
use std::hint::black_box;
use std::time::Duration;

/// The registered benchmarks: (name, what it measures).
pub const BENCHES: &[(&str, &str)] = &[
    (
        "model",
        "MMIO register ops/s through the behavioural model vs a plain memory loop",
    ),
    (
        "policy",
        "trapped accesses/s through the MMIO policy vs the raw KVM exit loop; decision cost in ns",
    ),
    (
        "patch",
        "live-patch blackout median/p99 over >= 100 patches under an MMIO storm, 1/2/4/8 vCPUs (vs a bare stopping pause)",
    ),
    (
        "teardown",
        "whole teardown of a 256 MiB and a 1 GiB guest that touched all its RAM vs memset of the same size; provisioning-gate cost",
    ),
    (
        "rtl",
        "RTL cycles/s and MMIO ops/s vs the model, and the simple_sim! harness rate; the Verilator backend vs a bare Verilator harness",
    ),
    (
        "campaign",
        "smoke campaign cases/min vs bare hilrig-vmm runs; the controller's CPU time per host-hour",
    ),
    (
        "counters",
        "verifications/s over 100,000 enrolled devices: SQLite and PostgreSQL ($HILRIG_TEST_PG) vs the bare decision",
    ),
    (
        "board",
        "fpga backend ops/s through the host-bridge RTL (pipe and PTY) vs the core driven directly",
    ),
    (
        "lab-scale",
        "campaign scale-out: cases/min of 1 vs 3 runner processes sharing one run on one PostgreSQL",
    ),
    (
        "serve",
        "lab service over a generated 1,000 nights x 100 cases store: runs index and case history median, API history p99 at 500 req/s; SQLite and PostgreSQL ($HILRIG_TEST_PG)",
    ),
    (
        "lab",
        "per-case rate through SSH to a loopback host (scripts/sim-lab) vs the same cases run locally, same run",
    ),
    (
        "lab-hosts",
        "32 simulated SSH hosts (HILRIG_BENCH_HOSTS) running idle guests vs 1: controller CPU per host-hour, memory per host",
    ),
    (
        "vm-exit",
        "hilrig-vmm's MMIO path vs a raw KVM exit loop; exits on an unrestricted page; VM start time",
    ),
];

/// Run one benchmark by name and print its table.
pub fn run(name: &str, seconds: f64) -> Result<Vec<Figure>> {
    let budget = Duration::from_secs_f64(seconds.max(0.05));
    let figures = match name {
        "model" => bench_model(budget)?,
        "vm-exit" => crate::vm_exit::bench_vm_exit(budget)?,
        "rtl" => {
            let mut figures = crate::rtl::bench_rtl(budget)?;
            // The Verilator rows (backend and bare harness, same run); loudly
            // skipped without verilator.
            if hilrig_verilator::available("bench rtl: the Verilator rows") {
                crate::verilator::append_rows(&mut figures, budget)?;
            }
            figures
        }
        "board" => {
            let mut figures = crate::board::bench_board(budget)?;
            if hilrig_verilator::available("bench board: the verilated board rows") {
                crate::verilator::append_board_rows(&mut figures, budget / 3)?;
            }
            figures
        }
        "campaign" => bench_campaign()?,
        "lab-scale" => crate::scale::bench_lab_scale()?,
        "serve" => crate::serve::bench_serve(
            &crate::serve::BenchOptions::default(),
            std::env::var("HILRIG_TEST_PG")
                .ok()
                .filter(|s| !s.is_empty())
                .as_deref(),
        )?,
        "lab" => bench_lab()?,
        "lab-hosts" => crate::scale::bench_lab_hosts(budget.max(Duration::from_secs(10)))?,
        "policy" => crate::policy::bench_policy(budget)?,
        "patch" => crate::lifecycle::bench_patch(budget)?,
        "teardown" => crate::lifecycle::bench_teardown(budget)?,
        "counters" => crate::counters::bench_counters(
            budget,
            std::env::var("HILRIG_TEST_PG")
                .ok()
                .filter(|s| !s.is_empty())
                .as_deref(),
        )?,
        other => {
            let names: Vec<_> = BENCHES.iter().map(|(n, _)| *n).collect();
            bail!("unknown benchmark {other:?}; known: {}", names.join(", "))
        }
    };
    print_table(name, &figures);
    Ok(figures)
}

/// Print figures as a table with ratios to their baselines.
pub fn print_table(name: &str, figures: &[Figure]) {
    println!("bench {name}");
    println!(
        "{:<64} {:>16} {:<10} {:>10}  target",
        "figure", "value", "unit", "ratio"
    );
    for f in figures {
        let ratio = f
            .baseline
            .and_then(|b| figures.get(b))
            .map(|b| {
                let r = f.value / b.value;
                if r != 0.0 && r.abs() < 0.01 {
                    format!("{r:.2e}")
                } else {
                    format!("{r:.3}")
                }
            })
            .unwrap_or_else(|| "baseline".into());
        println!(
            "{:<64} {:>16} {:<10} {:>10}  {}",
            f.name,
            fmt_num(f.value),
            f.unit,
            ratio,
            f.target.as_deref().unwrap_or("")
        );
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.2}")
    }
}

/// The access pattern both loops run: alternate 4-byte writes and reads over scratch
/// registers and the buffer area.
fn offset_for(i: u64) -> u32 {
    if i & 4 == 0 {
        Reg::Scratch.offset() + ((i as u32) & 7) * 4
    } else {
        BUFFER_BASE
            + (((i as u32).wrapping_mul(2654435761) as usize % (BUFFER_SIZE / 4)) * 4) as u32
    }
}

fn bench_model(budget: Duration) -> Result<Vec<Figure>> {
    // Baseline: the same access pattern on plain memory (a Vec of 16 K words).
    let mut mem = vec![0u32; 0x1_0000 / 4];
    let base = rate(budget, 4096, |i| {
        let w = (offset_for(i) / 4) as usize;
        if i & 1 == 0 {
            mem[w] = black_box(i as u32);
        } else {
            black_box(mem[w]);
        }
    });

    let mut model = Model::new(hilrig_fw::factory::device(DeviceConfig::default(), 1)?)?;
    let dev: &mut dyn Device = &mut model;
    let mut errors = 0u64;
    let model_rate = rate(budget, 4096, |i| {
        let off = offset_for(i) as u64;
        let r = if i & 1 == 0 {
            dev.mmio_write(off, &(i as u32).to_le_bytes())
        } else {
            let mut b = [0u8; 4];
            dev.mmio_read(off, &mut b).map(|_| {
                black_box(b);
            })
        };
        errors += r.is_err() as u64;
    });
    let split_rate = rate(budget, 4096, |i| {
        // 8-byte accesses at 4-aligned offsets: each is split into two registers.
        let off = offset_for(i) as u64 & !7;
        let r = if i & 1 == 0 {
            dev.mmio_write(off, &i.to_le_bytes())
        } else {
            let mut b = [0u8; 8];
            dev.mmio_read(off, &mut b).map(|_| {
                black_box(b);
            })
        };
        errors += r.is_err() as u64;
    });
    if errors > 0 {
        bail!("{errors} model accesses failed during the benchmark");
    }
    Ok(vec![
        Figure::new("plain memory read/write loop (baseline)", base, "ops/s"),
        Figure::new(
            "model MMIO 4-byte ops (dyn Device, scratch+buffers)",
            model_rate,
            "ops/s",
        )
        .vs(0)
        .target(">= 10M ops/s"),
        Figure::new(
            "model MMIO 8-byte ops (split into 2 registers)",
            split_rate,
            "ops/s",
        )
        .vs(0),
    ])
}

fn cpu_time_self() -> Duration {
    // SAFETY: getrusage fills the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// The embedded smoke campaign on 2 simulated hosts, against the same number of bare
/// `hilrig-vmm --payload pci-enum` runs, 2 at a time, in the same run.
fn bench_campaign() -> Result<Vec<Figure>> {
    let dir = tempfile::tempdir()?;
    let mut opts = hilrig_campaigns::RunOptions::new("<embedded>/campaigns/smoke.toml");
    opts.campaign_text = Some(hilrig_campaigns::cli::SMOKE.to_string());
    opts.out_dir = dir.path().to_path_buf();
    opts.progress = Some(false);
    // This executable is the VMM (`hilrig vm run`), for the campaign and the baseline.
    let exe = std::env::current_exe()?;
    opts.vmm = Some(exe.clone());
    opts.vmm_args = vec!["vm".into(), "run".into()];
    let hosts = opts.hosts;
    let cpu0 = cpu_time_self();
    let summary = hilrig_campaigns::run_campaign(opts)?;
    let cpu = cpu_time_self() - cpu0;
    let cases = summary.run.cases.len();
    if summary.exit_status() != 0 {
        bail!("the smoke campaign did not pass: {:?}", summary.counts);
    }
    let per_min = cases as f64 / summary.wall.as_secs_f64() * 60.0;
    // Baseline: the same number of bare VMM runs, `hosts` in parallel.
    let t = std::time::Instant::now();
    for _ in 0..cases.div_ceil(hosts) {
        let kids: Vec<_> = (0..hosts)
            .map(|_| {
                std::process::Command::new(&exe)
                    .args(["vm", "run", "--payload", "pci-enum", "--json"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
            })
            .collect::<Result<_, _>>()?;
        for mut k in kids {
            k.wait()?;
        }
    }
    let bare = (cases.div_ceil(hosts) * hosts) as f64 / t.elapsed().as_secs_f64() * 60.0;
    let host_hours = hosts as f64 * summary.wall.as_secs_f64() / 3600.0;
    Ok(vec![
        Figure::new(
            format!("bare `hilrig vm run --payload pci-enum`, {hosts} at a time (baseline)"),
            bare,
            "cases/min",
        ),
        Figure::new(
            format!("smoke campaign: {cases} cases on {hosts} simulated hosts"),
            per_min,
            "cases/min",
        )
        .vs(0),
        Figure::new(
            "controller CPU time (runner process itself)",
            cpu.as_secs_f64() * 1e3,
            "ms",
        ),
        Figure::new(
            "controller CPU time per host-hour",
            cpu.as_secs_f64() / host_hours,
            "s/host-h",
        ),
    ])
}

/// The same cases (4 VM attacks x 5 repeats, one host, one at a time) on a local
/// simulated host and on a simulated SSH host on loopback (`scripts/sim-lab`: an
/// sshd, its own user; the build copied once by hash), in the same run.
fn bench_lab() -> Result<Vec<Figure>> {
    let lab = match hilrig_rig::simlab::SimLab::start(1) {
        Ok(l) => l,
        Err(hilrig_rig::simlab::LabError::Skipped(why)) => bail!("SKIPPED: bench lab: {why}"),
        Err(e) => bail!("bench lab: {e}"),
    };
    let exe = std::env::current_exe()?;
    let dir = tempfile::tempdir()?;
    let campaign = |tag: &str| {
        format!(
            "name = \"lab-bench\"\n[defaults]\nrepeats = 5\ntags = [\"{tag}\"]\n[[case]]\nattacks = [\"pci-enum\", \"attack-key-read\", \"vbios-overwrite\", \"attack-hang\"]\n"
        )
    };
    let run = |tag: &str, inventory: Option<&std::path::Path>| -> Result<(f64, usize, Duration)> {
        let mut o = hilrig_campaigns::RunOptions::new(format!("<bench>/lab-{tag}.toml"));
        o.campaign_text = Some(campaign(tag));
        o.out_dir = dir.path().join(tag);
        o.progress = Some(false);
        o.hosts = 1;
        o.inventory = inventory.map(std::path::Path::to_path_buf);
        o.vmm = Some(exe.clone());
        o.vmm_args = vec!["vm".into(), "run".into()];
        let cpu0 = cpu_time_self();
        let s = hilrig_campaigns::run_campaign(o)?;
        let cpu = cpu_time_self() - cpu0;
        if s.exit_status() != 0 {
            bail!("bench lab ({tag}): the cases did not pass: {:?}", s.counts);
        }
        let attempts: usize = s.run.cases.iter().map(|c| c.attempts.len()).sum();
        // Host time per case: the attempts' durations (not the setup before them).
        let on_hosts: u64 = s.run.cases.iter().map(|c| c.duration_ms).sum();
        let rate = attempts as f64 / (on_hosts.max(1) as f64 / 1000.0) * 60.0;
        Ok((rate, attempts, cpu))
    };
    // Warm the SSH host once (the build's first copy is not per-case overhead).
    run("ssh", Some(&lab.inventory))?;
    let (local, n_local, _) = run("sim", None)?;
    let (ssh, n_ssh, cpu_ssh) = run("ssh", Some(&lab.inventory))?;
    Ok(vec![
        Figure::new(
            format!("{n_local} cases on a local simulated host, one at a time (baseline)"),
            local,
            "cases/min",
        ),
        Figure::new(
            format!("{n_ssh} cases on an SSH host on loopback (sshd, own user)"),
            ssh,
            "cases/min",
        )
        .vs(0)
        .target(">= 0.75 x local"),
        Figure::new(
            "controller CPU time per SSH case",
            cpu_ssh.as_secs_f64() * 1e3 / n_ssh.max(1) as f64,
            "ms",
        ),
    ])
}

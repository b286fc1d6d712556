//! A developer's A/B of two exit-loop arms in one process, for finding where the
//! VMM's exit path spends its time against the raw KVM loop:
//!
//! `cargo run --release -p hilrig-bench --example exit_ab -- ROUNDS WRITES A B [VAR[=VALUE]]`
//!
//! Arms: `raw` (the bare KVM loop of `bench vm-exit`/`bench policy`), `vmm` (the
//! VMM's MMIO path, no policy), `policy` (the tenant policy, SCRATCH allowed),
//! `seccomp` (as `policy`, seccomp filters on), `dropped` (the tenant policy's
//! alarm flood on HANG_TRIGGER). Each round runs A and B back to back (the order
//! alternating); the figure is the median of the rounds' B ÷ A ratios, with the
//! quartiles (the spread a reader should expect of a median of that many rounds).
//! With VAR, the environment variable is set while B runs (an experiment's switch
//! read by a patched build). `raw raw` is the A/A control: how far from 1.00 two
//! identical arms land on this machine.

use hilrig_bench::figure::median;
use hilrig_bench::policy::{policy_mmio_loop, policy_mmio_loop_seccomp};
use hilrig_bench::vm_exit::{raw_mmio_loop, vmm_mmio_loop};
use hilrig_device::regmap::Reg;
use std::sync::Arc;
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage =
        "usage: exit_ab ROUNDS WRITES A B [VAR[=VALUE]] (arms: raw vmm policy seccomp dropped)";
    let [rounds, n, a, b, rest @ ..] = args.as_slice() else {
        anyhow::bail!("{usage}");
    };
    let rounds: usize = rounds
        .parse()
        .map_err(|e| anyhow::anyhow!("ROUNDS {rounds:?}: {e}"))?;
    let n: u64 = n
        .parse()
        .map_err(|e| anyhow::anyhow!("WRITES {n:?}: {e}"))?;
    const ARMS: [&str; 5] = ["raw", "vmm", "policy", "seccomp", "dropped"];
    for arm in [a, b] {
        if !ARMS.contains(&arm.as_str()) {
            anyhow::bail!("unknown arm {arm:?}; {usage}");
        }
    }
    let var = rest.first().map(|v| {
        let (k, val) = v.split_once('=').unwrap_or((v.as_str(), "1"));
        (k.to_string(), val.to_string())
    });
    let tenant = Arc::new(hilrig_vmm::policy::load_profile(None, "tenant")?);
    let timeout = Duration::from_secs(120);
    let run = |arm: &str| -> anyhow::Result<f64> {
        let (e, s) = match arm {
            "raw" => raw_mmio_loop(n)?,
            "vmm" => vmm_mmio_loop(n, timeout)?,
            "policy" => policy_mmio_loop(n, Reg::Scratch.offset(), tenant.clone(), timeout)?,
            "seccomp" => {
                policy_mmio_loop_seccomp(n, Reg::Scratch.offset(), tenant.clone(), timeout)?
            }
            "dropped" => policy_mmio_loop(n, Reg::HangTrigger.offset(), tenant.clone(), timeout)?,
            other => anyhow::bail!("unknown arm {other:?}"),
        };
        Ok(if s.is_zero() {
            0.0
        } else {
            e as f64 / s.as_secs_f64()
        })
    };
    let run_b = || -> anyhow::Result<f64> {
        if let Some((k, v)) = &var {
            std::env::set_var(k, v);
        }
        let r = run(b);
        if let Some((k, _)) = &var {
            std::env::remove_var(k);
        }
        r
    };
    let mut ratios = Vec::with_capacity(rounds);
    for r in 0..rounds.max(1) {
        let (ra, rb) = if r % 2 == 0 {
            let ra = run(a)?;
            (ra, run_b()?)
        } else {
            let rb = run_b()?;
            (run(a)?, rb)
        };
        ratios.push(if ra > 0.0 { rb / ra } else { 0.0 });
    }
    ratios.sort_by(f64::total_cmp);
    let q = |f: f64| ratios[((ratios.len() - 1) as f64 * f).round() as usize];
    let with = var.map(|(k, v)| format!(" ({k}={v})")).unwrap_or_default();
    println!(
        "{b}{with} / {a}: median {:.3} (quartiles {:.3}-{:.3}) over {} rounds of {n} writes",
        median(&ratios),
        q(0.25),
        q(0.75),
        ratios.len()
    );
    Ok(())
}

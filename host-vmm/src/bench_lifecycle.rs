//! `hilrig bench patch` and `hilrig bench teardown`.

use crate::lifecycle::control;
use crate::lifecycle::patch::PatchAuthority;
use crate::lifecycle::LifecycleConfig;
use crate::policy::{default_policy_toml, load_profile};
use crate::{open_backend, payload, Console, DeviceSpec, Vm, VmConfig};
use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;
use hilrig_device::bench::Figure;
use hilrig_vmm_api::control::{Reply, Request};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BUILD: [u8; 32] = [0xb1; 32];

fn ask(sock: &Path, req: Request) -> Result<Reply> {
    match control::request(sock, &req, Duration::from_secs(30))? {
        Ok(r) => Ok(r),
        Err(e) => bail!("control request {} failed: {e}", req.op()),
    }
}

fn pct(mut v: Vec<u64>, q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q).round() as usize] as f64
}

struct Running {
    sock: PathBuf,
    stop: crate::StopHandle,
    thread: std::thread::JoinHandle<()>,
}

fn start(
    dir: &Path,
    vcpus: u8,
    mem: u64,
    payload: Vec<u8>,
    life: LifecycleConfig,
) -> Result<Running> {
    let sock = dir.join(format!("bench-{vcpus}.sock"));
    let cfg = VmConfig {
        vcpus,
        mem_size: mem,
        payload,
        payload_name: "bench".into(),
        timeout: Duration::from_secs(600),
        console: Console::Capture,
        policy: Some(Arc::new(load_profile(None, "tenant")?)),
        control: Some(sock.clone()),
        lifecycle: life,
        ..VmConfig::default()
    };
    let vm = Vm::new(cfg, open_backend(&DeviceSpec::Model, None)?)?;
    let stop = vm.stop_handle();
    let thread = std::thread::spawn(move || {
        let _ = vm.run();
    });
    let t0 = Instant::now();
    while !sock.exists() {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("the benchmark VM's control socket never appeared");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(Running { sock, stop, thread })
}

/// Blackout of live policy patches under an MMIO storm (every vCPU writing to a
/// trapped page), with 1, 2 and 4 vCPUs; baseline: a bare pause/resume of the same VM.
pub fn bench_patch(budget: Duration) -> Result<Vec<Figure>> {
    let dir = tempfile::tempdir()?;
    let key = SigningKey::from_bytes(&[0x42; 32]);
    let n = ((budget.as_secs_f64() * 200.0) as usize).clamp(100, 1000);
    // Bundles v2..=v(n+1), built before anything is measured.
    let rules = default_policy_toml().into_bytes();
    let mut bundles = Vec::with_capacity(n);
    for v in 0..n as u64 {
        let b = hilrig_fw::bundle::build(
            &hilrig_fw::bundle::BundleSpec {
                component: "policy",
                version: v + 2,
                target_vmm_sha256: BUILD,
                payloads: vec![("rules.toml".into(), rules.clone())],
                encrypt_to: None,
            },
            &key,
        )?;
        let p = dir.path().join(format!("p{v}.bundle"));
        std::fs::write(&p, b)?;
        bundles.push(p);
    }
    let mut figs = Vec::new();
    for vcpus in [1u8, 2, 4] {
        let life = LifecycleConfig {
            patch: Some(Arc::new(PatchAuthority {
                trusted: vec![key.verifying_key()],
                decrypt_key: None,
                build_sha256: BUILD,
                module_dir: dir.path().join("modules"),
                allow_widening: false,
            })),
            ..Default::default()
        };
        let r = start(dir.path(), vcpus, 8 << 20, payload::storm()?, life)?;
        std::thread::sleep(Duration::from_millis(100));
        let mut pauses = Vec::with_capacity(n);
        for _ in 0..n {
            let v = match ask(&r.sock, Request::Quiesce {})? {
                Reply::Quiesce(q) => q.blackout_us,
                _ => None,
            };
            pauses.push(v.context("quiesce reply without blackout")?);
        }
        let mut patches = Vec::with_capacity(n);
        for b in &bundles {
            let v = match ask(&r.sock, Request::Patch { bundle: b.clone() })? {
                Reply::Patch(ev) => ev.blackout_us,
                _ => None,
            };
            patches.push(v.context("patch reply without blackout")?);
        }
        r.stop.stop("benchmark done");
        let _ = r.thread.join();
        let base = figs.len();
        figs.push(Figure::new(
            format!("{vcpus} vCPU: bare quiesce (park + resume), median (baseline)"),
            pct(pauses.clone(), 0.5),
            "us",
        ));
        figs.push(
            Figure::new(
                format!("{vcpus} vCPU: policy patch blackout, median of {n}"),
                pct(patches.clone(), 0.5),
                "us",
            )
            .vs(base)
            .target("< 200 us"),
        );
        figs.push(
            Figure::new(
                format!("{vcpus} vCPU: policy patch blackout, p99"),
                pct(patches, 0.99),
                "us",
            )
            .vs(base),
        );
    }
    Ok(figs)
}

/// Scrub bandwidth against a plain memset of the same size, and a whole teardown of a
/// 256 MiB guest.
pub fn bench_teardown(budget: Duration) -> Result<Vec<Figure>> {
    const SIZE: usize = 256 << 20;
    let mut mem = memmap2::MmapMut::map_anon(SIZE)?;
    // Touch every page once so neither loop pays for first faults.
    mem.fill(1);
    let rounds = ((budget.as_secs_f64() * 8.0) as usize).clamp(3, 40);
    let mut memset = f64::MAX;
    let mut scrub = f64::MAX;
    for _ in 0..rounds {
        mem[0] = 1;
        let t = Instant::now();
        // SAFETY: our own mapping.
        unsafe { std::ptr::write_bytes(mem.as_mut_ptr(), 0, SIZE) };
        std::hint::black_box(&mem[SIZE - 1]);
        memset = memset.min(t.elapsed().as_secs_f64());
        mem[12345] = 7;
        let t = Instant::now();
        // SAFETY: our own mapping.
        unsafe { crate::lifecycle::teardown::scrub(mem.as_mut_ptr(), SIZE) }
            .map_err(|at| anyhow::anyhow!("scrub left byte {at}"))?;
        scrub = scrub.min(t.elapsed().as_secs_f64());
    }
    drop(mem);
    let gib = |secs: f64| SIZE as f64 / secs / (1u64 << 30) as f64;
    // A whole teardown of a 256 MiB guest running a trapped-write storm.
    let dir = tempfile::tempdir()?;
    let r = start(
        dir.path(),
        2,
        SIZE as u64,
        payload::storm()?,
        LifecycleConfig::default(),
    )?;
    std::thread::sleep(Duration::from_millis(100));
    let rec = ask(&r.sock, Request::Teardown {})?;
    let _ = r.thread.join();
    let Reply::Teardown(rec) = rec else {
        bail!("teardown answered with {rec:?}");
    };
    if !rec.complete {
        bail!("the benchmark teardown did not complete: {rec:?}");
    }
    let step = |name: &str| {
        rec.steps
            .iter()
            .find(|s| s.step == name)
            .map(|s| s.micros as f64 / 1e3)
            .unwrap_or(0.0)
    };
    Ok(vec![
        Figure::new("memset of 256 MiB (baseline)", gib(memset), "GiB/s"),
        Figure::new(
            "teardown scrub (zero + verify) of 256 MiB",
            gib(scrub),
            "GiB/s",
        )
        .vs(0)
        .target(">= 0.5 x memset"),
        Figure::new(
            "teardown of a 256 MiB guest (2 vCPUs storming): total",
            rec.total_micros as f64 / 1e3,
            "ms",
        ),
        Figure::new("  pause", step("pause"), "ms"),
        Figure::new("  scrub guest memory", step("scrub-guest-memory"), "ms"),
        Figure::new("  scrub device state", step("scrub-device-state"), "ms"),
        Figure::new(
            "  reset + counters + verdict",
            step("reset-device") + step("read-counters") + step("verdict"),
            "ms",
        ),
    ])
}

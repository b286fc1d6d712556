//! `hilrig bench patch` and `hilrig bench teardown`.

use crate::figure::Figure;
use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;
use hilrig_vmm::lifecycle::control;
use hilrig_vmm::lifecycle::patch::PatchAuthority;
use hilrig_vmm::lifecycle::LifecycleConfig;
use hilrig_vmm::policy::{default_policy_toml, load_profile};
use hilrig_vmm::{open_backend, payload, Console, DeviceSpec, Vm, VmConfig};
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
    stop: hilrig_vmm::StopHandle,
    thread: std::thread::JoinHandle<Option<hilrig_vmm::RunReport>>,
}

impl Running {
    /// Stop the VM; its report (None if it failed).
    fn end(self) -> Option<hilrig_vmm::RunReport> {
        self.stop.stop("benchmark done");
        self.thread.join().ok().flatten()
    }
}

fn start(
    dir: &Path,
    vcpus: u8,
    mem: u64,
    payload: Vec<u8>,
    life: LifecycleConfig,
) -> Result<Running> {
    let sock = dir.join(format!(
        "bench-{vcpus}-{}.sock",
        if life.quiesce_patches { "q" } else { "s" }
    ));
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
    let thread = std::thread::spawn(move || vm.run().ok());
    let t0 = Instant::now();
    while !sock.exists() {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("the benchmark VM's control socket never appeared");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(Running { sock, stop, thread })
}

/// Send every bundle as a `patch` request; the replies' blackouts (us).
fn patch_all(sock: &Path, bundles: &[PathBuf], quiesced: bool) -> Result<Vec<u64>> {
    let mut out = Vec::with_capacity(bundles.len());
    for b in bundles {
        match ask(sock, Request::Patch { bundle: b.clone() })? {
            Reply::Patch(ev) if ev.quiesced == quiesced => {
                out.push(ev.blackout_us.context("patch reply without blackout")?)
            }
            other => bail!("policy patch (quiesced: {quiesced}) answered {other:?}"),
        }
    }
    Ok(out)
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Blackout of live patches under an MMIO storm (every vCPU writing to a trapped
/// page), with 1, 2, 4 and 8 vCPUs on however many cores. Baseline: a bare stopping
/// pause/resume (`quiesce`: every vCPU kicked, parked, resumed) of the same VM.
/// Rows: policy patches as a slot swap (no quiesce: the publish); QUIESCED policy
/// patches (a VM with `quiesce_patches`: every vCPU claimed by state without a kick,
/// the busy ones waited for, swap, release), their blackout to the release and to
/// the last held vCPU running again; device-handler swaps WITHOUT quiesce (the
/// publish, and until the old code is drained and retired).
///
/// `HILRIG_BENCH_TRACE=1` adds a diagnostic pass per vCPU count (not timed: the
/// vCPUs stamp their busy sections) and prints what the holds waited for.
pub fn bench_patch(budget: Duration) -> Result<Vec<Figure>> {
    let dir = tempfile::tempdir()?;
    let key = SigningKey::from_bytes(&[0x42; 32]);
    let n = ((budget.as_secs_f64() * 200.0) as usize).clamp(100, 1000);
    let trace = std::env::var_os("HILRIG_BENCH_TRACE").is_some_and(|v| v != "0");
    // Bundles v2..=v(2n+1), built before anything is measured.
    let rules = default_policy_toml().into_bytes();
    let mut bundles = Vec::with_capacity(2 * n);
    for v in 0..2 * n as u64 {
        let b = hilrig_fw::bundle::build(
            &hilrig_fw::bundle::BundleSpec {
                component: "policy",
                version: v + 2,
                target_vmm_sha256: BUILD,
                payloads: vec![("rules.toml".into(), rules.clone())],
                encrypt_to: None,
                patch_path_sha256: Some(hilrig_vmm::lifecycle::patch_path::measure_patch_path()),
            },
            &key,
        )?;
        let p = dir.path().join(format!("p{v}.bundle"));
        std::fs::write(&p, b)?;
        bundles.push(p);
    }
    // Device-handler modules v2..=v(k+1) for the swaps without quiesce (built once
    // with rustc; each VM loads its own copies).
    let k = (n / 20).clamp(5, 20);
    let handlers = build_handlers(dir.path(), k);
    let mut figs = Vec::new();
    for vcpus in [1u8, 2, 4, 8] {
        let life = |quiesce_patches| LifecycleConfig {
            patch: Some(Arc::new(PatchAuthority {
                trusted: vec![key.verifying_key()],
                decrypt_key: None,
                build_sha256: BUILD,
                module_dir: dir.path().join(format!("modules-{vcpus}")),
                applied: None,
                allow_widening: false,
            })),
            quiesce_patches,
            ..Default::default()
        };
        // A VM whose patches swap modules under load.
        let r = start(dir.path(), vcpus, 8 << 20, payload::storm()?, life(false))?;
        std::thread::sleep(Duration::from_millis(100));
        let mut pauses = Vec::with_capacity(n);
        for _ in 0..n {
            let v = match ask(&r.sock, Request::Quiesce {})? {
                Reply::Quiesce(q) => q.blackout_us,
                _ => None,
            };
            pauses.push(v.context("quiesce reply without blackout")?);
        }
        let swaps_policy = patch_all(&r.sock, &bundles[..n], false)?;
        // Device-handler swaps under the storm, without quiesce.
        let (mut swap_blackouts, mut swaps) = (Vec::new(), Vec::new());
        if let Ok(h) = &handlers {
            for (i, so) in h.iter().enumerate() {
                let b = hilrig_fw::bundle::build(
                    &hilrig_fw::bundle::BundleSpec {
                        component: "device-handler",
                        version: i as u64 + 2,
                        target_vmm_sha256: BUILD,
                        payloads: vec![("libdemo.so".into(), so.clone())],
                        encrypt_to: None,
                        patch_path_sha256: Some(
                            hilrig_vmm::lifecycle::patch_path::measure_patch_path(),
                        ),
                    },
                    &key,
                )?;
                let p = dir.path().join(format!("h{vcpus}-{i}.bundle"));
                std::fs::write(&p, b)?;
                match ask(&r.sock, Request::Patch { bundle: p })? {
                    Reply::Patch(ev) if !ev.quiesced => {
                        swap_blackouts.push(ev.blackout_us.context("swap without blackout")?);
                        swaps.push(ev.swap_us.context("swap without its duration")?);
                    }
                    other => bail!("device-handler patch answered {other:?}"),
                }
            }
        }
        r.end();
        // A VM whose patches are quiesced.
        let r = start(dir.path(), vcpus, 8 << 20, payload::storm()?, life(true))?;
        std::thread::sleep(Duration::from_millis(100));
        let quiesced = patch_all(&r.sock, &bundles[..n], true)?;
        if trace {
            hilrig_vmm::lifecycle::quiesce::trace_holds(true);
            let _ = hilrig_vmm::lifecycle::quiesce::take_hold_traces();
            patch_all(&r.sock, &bundles[n..], true)?;
            for _ in 0..n {
                ask(&r.sock, Request::Quiesce {})?;
            }
            hilrig_vmm::lifecycle::quiesce::trace_holds(false);
            print_traces(vcpus, &hilrig_vmm::lifecycle::quiesce::take_hold_traces());
        }
        let rep = r.end().context("the quiesced-patch VM gave no report")?;
        // The same patches' blackouts to the release (the reply carries the time to
        // the last held vCPU running again).
        let released: Vec<u64> = rep
            .blackouts
            .iter()
            .take(n)
            .map(|b| us(b.released))
            .collect();
        let base = figs.len();
        figs.push(Figure::new(
            format!("{vcpus} vCPU: bare quiesce (stopping pause: kick, park, resume), median (baseline)"),
            pct(pauses.clone(), 0.5),
            "us",
        ));
        figs.push(Figure::new(
            format!("{vcpus} vCPU: bare quiesce, p99"),
            pct(pauses.clone(), 0.99),
            "us",
        ));
        figs.push(
            Figure::new(
                format!(
                    "{vcpus} vCPU: policy patch as a slot swap (no quiesce): blackout (publish), median of {n}"
                ),
                pct(swaps_policy.clone(), 0.5),
                "us",
            )
            .vs(base),
        );
        figs.push(Figure::new(
            format!("{vcpus} vCPU: policy patch as a slot swap, p99"),
            pct(swaps_policy, 0.99),
            "us",
        ));
        figs.push(
            Figure::new(
                format!(
                    "{vcpus} vCPU: QUIESCED policy patch (claimed by state, no kick): blackout to the last vCPU running again, median of {n}"
                ),
                pct(quiesced.clone(), 0.5),
                "us",
            )
            .vs(base)
            .target("< 200 us"),
        );
        figs.push(
            Figure::new(
                format!("{vcpus} vCPU: QUIESCED policy patch: blackout, p99"),
                pct(quiesced, 0.99),
                "us",
            )
            .vs(base + 1)
            .target("< 1000 us"),
        );
        figs.push(
            Figure::new(
                format!("{vcpus} vCPU: QUIESCED policy patch: request to release, median"),
                pct(released.clone(), 0.5),
                "us",
            )
            .vs(base),
        );
        figs.push(Figure::new(
            format!("{vcpus} vCPU: QUIESCED policy patch: request to release, p99"),
            pct(released, 0.99),
            "us",
        ));
        match &handlers {
            Ok(_) => {
                figs.push(
                    Figure::new(
                        format!(
                            "{vcpus} vCPU: device-handler swap WITHOUT quiesce: blackout (publish), median of {k}"
                        ),
                        pct(swap_blackouts.clone(), 0.5),
                        "us",
                    )
                    .vs(base),
                );
                figs.push(Figure::new(
                    format!("{vcpus} vCPU: device-handler swap WITHOUT quiesce: blackout, p99"),
                    pct(swap_blackouts, 0.99),
                    "us",
                ));
                figs.push(Figure::new(
                    format!(
                        "{vcpus} vCPU: device-handler swap: publish to old code retired, median"
                    ),
                    pct(swaps, 0.5),
                    "us",
                ));
            }
            Err(why) => eprintln!("SKIPPED: device-handler swap rows: {why}"),
        }
    }
    Ok(figs)
}

/// Print what the traced holds waited for (`HILRIG_BENCH_TRACE`).
fn print_traces(vcpus: u8, traces: &[hilrig_vmm::lifecycle::quiesce::HoldTrace]) {
    for stopping in [false, true] {
        let t: Vec<_> = traces.iter().filter(|t| t.stopping == stopping).collect();
        if t.is_empty() {
            continue;
        }
        let col = |f: &dyn Fn(&hilrig_vmm::lifecycle::quiesce::HoldTrace) -> u64| {
            let v: Vec<u64> = t.iter().map(|x| f(x)).collect();
            format!(
                "{:.0}/{:.0}/{:.0}",
                pct(v.clone(), 0.5),
                pct(v.clone(), 0.99),
                pct(v, 1.0)
            )
        };
        let waited: Vec<_> = t.iter().filter(|x| x.busy_at_start > 0).collect();
        let off_cpu: Vec<u64> = waited
            .iter()
            .map(|x| us(x.slowest_busy_wall.saturating_sub(x.slowest_busy_cpu)))
            .collect();
        eprintln!(
            "trace {vcpus} vCPU {} x{}: busy at first claim (med/p99/max) {}; holds that waited for a busy vCPU {}; park us {}; slowest busy wall us {}, its CPU us {}, off-CPU us (waited holds) {:.0}/{:.0}; waiters {}; request to release us {}; resume lag us {}; tries {}; backed off (nobody held) us {}",
            if stopping { "stopping pause" } else { "quiesced patch (gate)" },
            t.len(),
            col(&|x| x.busy_at_start as u64),
            waited.len(),
            col(&|x| us(x.park)),
            col(&|x| us(x.slowest_busy_wall)),
            col(&|x| us(x.slowest_busy_cpu)),
            pct(off_cpu.clone(), 0.5),
            pct(off_cpu, 0.99),
            col(&|x| x.waiters as u64),
            col(&|x| us(x.released)),
            col(&|x| us(x.resume_lag)),
            col(&|x| u64::from(x.tries)),
            col(&|x| us(x.backoff)),
        );
    }
}

/// Why the demo device-handler module could not be built (its rows are skipped).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BuildError(String);

impl From<String> for BuildError {
    fn from(why: String) -> Self {
        BuildError(why)
    }
}

/// Build the demo device-handler module at versions 2..=k+1 with rustc.
fn build_handlers(dir: &Path, k: usize) -> std::result::Result<Vec<Vec<u8>>, BuildError> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../host-vmm/modules/demo_handler.rs");
    if !src.exists() {
        return Err(format!("{} is not here", src.display()).into());
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    (0..k)
        .map(|i| {
            let version = i as u64 + 2;
            let out = dir.join(format!("libdemo-bench-v{version}.so"));
            let st = std::process::Command::new(&rustc)
                .args(["--edition=2021", "--crate-type=cdylib", "-O"])
                .args(["--crate-name", "demo_handler", "-o"])
                .arg(&out)
                .arg(&src)
                .env("DEMO_VERSION", version.to_string())
                .env("DEMO_VERSION_REG", format!("{:#x}", 0x0001_0000 + version))
                .status()
                .map_err(|e| format!("running {rustc}: {e}"))?;
            if !st.success() {
                return Err(format!("{rustc} failed building the demo module").into());
            }
            std::fs::read(&out).map_err(|e| BuildError(format!("{}: {e}", out.display())))
        })
        .collect()
}

/// The process's resident set in bytes (0 when /proc cannot be read).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// A guest whose vCPU 0 writes one word to every 4 KiB page of its RAM above 2 MiB,
/// then, like every other vCPU, storms SCRATCH writes.
fn touch_all_then_storm() -> Result<Vec<u8>> {
    use iced_x86::code_asm::*;
    let s = hilrig_device::Reg::Scratch.offset() as i32;
    let mut p = payload::Payload::new()?;
    let a = &mut p.a;
    let mut storm = a.create_label();
    let mut touch = a.create_label();
    a.test(rsi, rsi)?;
    a.jnz(storm)?;
    a.mov(rbx, 2u64 << 20)?;
    a.set_label(&mut touch)?;
    a.mov(qword_ptr(rbx), rbx)?;
    a.add(rbx, 4096)?;
    a.cmp(rbx, rcx)?;
    a.jb(touch)?;
    a.set_label(&mut storm)?;
    let mut l = a.create_label();
    a.mov(ecx, 1u32)?;
    a.set_label(&mut l)?;
    a.mov(dword_ptr(rdi + rsi * 4 + s), ecx)?;
    a.inc(ecx)?;
    a.jmp(l)?;
    Ok(p.build()?)
}

/// Per guest size (256 MiB and 1 GiB): a plain memset of that size (baseline), the
/// teardown's scrub function alone, and a whole teardown of a guest of that size
/// that touched every page of its RAM (vs memset: target >= 0.5), same run.
pub fn bench_teardown(budget: Duration) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for size in [256usize << 20, 1 << 30] {
        teardown_rows(&mut figures, size, budget)?;
    }
    gate_rows(&mut figures, budget)?;
    Ok(figures)
}

fn teardown_rows(figures: &mut Vec<Figure>, size: usize, budget: Duration) -> Result<()> {
    let label = if size >= 1 << 30 {
        format!("{} GiB", size >> 30)
    } else {
        format!("{} MiB", size >> 20)
    };
    let gib = |secs: f64| size as f64 / secs / (1u64 << 30) as f64;
    // The baseline memset runs on memory like the guest's RAM: transparent huge
    // pages advised (the VMM advises them on guest RAM). A memset of a mapping left
    // at 4 KiB pages is shown beside it.
    let memset_4k = {
        let mut mem = memmap2::MmapMut::map_anon(size)?;
        mem.fill(1);
        let mut best = f64::MAX;
        for _ in 0..3 {
            mem[0] = 1;
            let t = Instant::now();
            // SAFETY: our own mapping.
            unsafe { std::ptr::write_bytes(mem.as_mut_ptr(), 0, size) };
            std::hint::black_box(&mem[size - 1]);
            best = best.min(t.elapsed().as_secs_f64());
        }
        best
    };
    let (memset, scrub) = {
        let mut mem = memmap2::MmapMut::map_anon(size)?;
        // Like guest RAM (best effort, as there).
        let _ = mem.advise(memmap2::Advice::HugePage);
        // Touch every page once so neither loop pays for first faults.
        mem.fill(1);
        let rounds = ((budget.as_secs_f64() * 8.0) as usize).clamp(3, 40);
        let (mut memset, mut scrub) = (f64::MAX, f64::MAX);
        for _ in 0..rounds {
            mem[0] = 1;
            let t = Instant::now();
            // SAFETY: our own mapping.
            unsafe { std::ptr::write_bytes(mem.as_mut_ptr(), 0, size) };
            std::hint::black_box(&mem[size - 1]);
            memset = memset.min(t.elapsed().as_secs_f64());
            mem[12345] = 7;
            let t = Instant::now();
            // SAFETY: our own mapping.
            unsafe { hilrig_vmm::lifecycle::teardown::scrub(mem.as_mut_ptr(), size) }
                .map_err(|at| anyhow::anyhow!("scrub left byte {at}"))?;
            scrub = scrub.min(t.elapsed().as_secs_f64());
        }
        (memset, scrub)
    };
    // A whole teardown of a guest that touched all its RAM, then storms trapped
    // writes: wait until the guest's pages are resident (the process's resident set
    // grew by the guest's RAM), bounded.
    let dir = tempfile::tempdir()?;
    let rss0 = resident_bytes();
    let r = start(
        dir.path(),
        2,
        size as u64,
        touch_all_then_storm()?,
        LifecycleConfig::default(),
    )?;
    let t0 = Instant::now();
    while resident_bytes().saturating_sub(rss0) < size as u64 * 9 / 10 {
        if t0.elapsed() > Duration::from_secs(300) {
            r.stop.stop("benchmark gave up");
            let _ = r.thread.join();
            bail!("the guest did not touch its {label} of RAM within 300 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let rec = ask(&r.sock, Request::Teardown {})?;
    // After the record: the VM ends and unmaps its memory (the zeroed pages go back
    // to the kernel here).
    let t_end = Instant::now();
    let _ = r.thread.join();
    let vm_end = t_end.elapsed().as_secs_f64() * 1e3;
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
    let base = figures.len();
    figures.extend([
        Figure::new(
            format!("memset of {label} (baseline; huge pages advised, like guest RAM)"),
            gib(memset),
            "GiB/s",
        ),
        Figure::new(
            format!("teardown scrub (zero + check) of {label}"),
            gib(scrub),
            "GiB/s",
        )
        .vs(base)
        .target(">= 0.5 x memset"),
        Figure::new(
            format!(
                "whole teardown of a {label} guest that touched all its RAM (2 vCPUs storming)"
            ),
            gib(rec.total_micros.max(1) as f64 / 1e6),
            "GiB/s",
        )
        .vs(base)
        .target(">= 0.5 x memset"),
        Figure::new("  its total", rec.total_micros as f64 / 1e3, "ms"),
        Figure::new("  memset of the same size", memset * 1e3, "ms"),
        Figure::new(
            "  memset of the same size on 4 KiB pages (no advice)",
            memset_4k * 1e3,
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
        Figure::new(
            "  after the record: VM end, guest RAM unmapped (pages handed back)",
            vm_end,
            "ms",
        ),
    ]);
    Ok(())
}

/// The provisioning gate's cost per VM start (issue 21 item 4): the same VM start
/// (open the model from its state file, create the VM, run a payload that passes at
/// once) with and without the counters gate (an OOB read of counters and hashes and
/// a verify in a SQLite service), alternating, medians.
fn gate_rows(figures: &mut Vec<Figure>, budget: Duration) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("dev.state");
    hilrig_device::Model::create(
        &state,
        hilrig_fw::factory::device(hilrig_device::DeviceConfig::default(), 0x5eed)?,
    )?;
    let key = dir.path().join("counters.key");
    hilrig_counters::mac::Key::init(&key)?;
    let db = dir.path().join("counters.sqlite").display().to_string();
    {
        use hilrig_counters::source::CounterSource;
        let obs = hilrig_counters::source::DeviceSource::model_file(&state)?.observe()?;
        hilrig_counters::Service::open(&db, hilrig_counters::mac::Key::load(&key)?)?.enroll(
            &hilrig_counters::service::Enrollment {
                serial: 0x5eed,
                host: "bench".into(),
                rack: "bench".into(),
                expected: obs.as_expected(),
            },
            false,
        )?;
    }
    let pass = {
        let mut p = payload::Payload::new()?;
        p.report(0)?;
        p.build()?
    };
    let start_vm = |gate: bool| -> Result<(u64, u64)> {
        let t0 = Instant::now();
        let mut backend = open_backend(&DeviceSpec::Model, Some(&state))?;
        let mut gate_us = 0;
        if gate {
            let g =
                hilrig_vmm::lifecycle::gate::check(&mut *backend.device, "bench", &db, &key, None);
            if !g.outcome.admits() {
                bail!("the benchmark device was refused: {}", g.describe());
            }
            gate_us = g.micros;
        }
        let cfg = VmConfig {
            vcpus: 1,
            mem_size: 16 << 20,
            payload: pass.clone(),
            payload_name: "pass".into(),
            timeout: Duration::from_secs(60),
            console: Console::Capture,
            ..VmConfig::default()
        };
        let report = Vm::new(cfg, backend)?.run()?;
        if !report.verdict.passed() {
            bail!("the benchmark VM did not pass: {}", report.verdict);
        }
        Ok((t0.elapsed().as_micros() as u64, gate_us))
    };
    let rounds = ((budget.as_secs_f64() * 20.0) as usize).clamp(5, 100);
    let (mut without, mut with, mut alone) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        without.push(start_vm(false)?.0);
        let (t, g) = start_vm(true)?;
        with.push(t);
        alone.push(g);
    }
    let base = figures.len();
    figures.push(Figure::new(
        "VM start to PASS, no counters gate (baseline, median)",
        pct(without, 0.5) / 1e3,
        "ms",
    ));
    figures.push(
        Figure::new(
            "VM start to PASS with the provisioning gate (median)",
            pct(with, 0.5) / 1e3,
            "ms",
        )
        .vs(base),
    );
    figures.push(Figure::new(
        "  the gate alone: OOB read + verify (median)",
        pct(alone, 0.5) / 1e3,
        "ms",
    ));
    Ok(())
}

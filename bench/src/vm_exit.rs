//! `hilrig bench vm-exit`: exit-path figures, as ratios within one run.

use crate::figure::Figure;
use hilrig_device::regmap::Reg;
use hilrig_vmm::devices::{open_backend, DeviceSpec};
use hilrig_vmm::error::VmmError;
use hilrig_vmm::payload;
use hilrig_vmm::vstate::layout::*;
use hilrig_vmm::vstate::vm::{Console, Vm, VmConfig};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const BENCH_MEM: u64 = 16 << 20;

/// Shortest measured run of an exit loop, in seconds: shorter runs are dominated by
/// the host's jitter (a paging hiccup of a few ms is 5% of a 100 ms run).
pub(crate) const MIN_RUN_S: f64 = 0.2;

/// Baseline: the same guest loop on a bare KVM VM in this process, its MMIO writes
/// to an address nothing backs, the exit loop returning at once. Returns
/// (exits, time from the first MMIO exit to the verdict).
pub fn raw_mmio_loop(n: u64) -> Result<(u64, Duration), VmmError> {
    let code = payload::mmio_loop(n, Reg::Scratch.offset())?;
    let kvm = Kvm::new().map_err(VmmError::kvm("opening /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?;
    vm.set_tss_address(TSS_ADDR)
        .map_err(VmmError::kvm("KVM_SET_TSS_ADDR"))?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), BENCH_MEM as usize)])
        .map_err(|e| VmmError::Memory(e.to_string()))?;
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: `mem` outlives `vm` (declared before it, dropped after it).
        unsafe { vm.set_user_memory_region(r) }.map_err(VmmError::kvm("registering RAM"))?;
    }
    write_system_tables(&mem)?;
    mem.write_slice(&code, GuestAddress(PAYLOAD_ADDR))
        .map_err(|e| VmmError::Memory(e.to_string()))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(VmmError::kvm("KVM_CREATE_VCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(VmmError::kvm("KVM_SET_CPUID2"))?;
    let sregs = vcpu.get_sregs().map_err(VmmError::kvm("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&long_mode_sregs(sregs))
        .map_err(VmmError::kvm("KVM_SET_SREGS"))?;
    vcpu.set_fpu(&entry_fpu())
        .map_err(VmmError::kvm("KVM_SET_FPU"))?;
    vcpu.set_regs(&entry_regs(BAR0_DEFAULT, 0, 1, BENCH_MEM))
        .map_err(VmmError::kvm("KVM_SET_REGS"))?;
    let mut exits = 0u64;
    let mut first = None;
    loop {
        match vcpu.run() {
            Ok(VcpuExit::MmioWrite(..)) => {
                exits += 1;
                if first.is_none() {
                    first = Some(Instant::now());
                }
            }
            Ok(VcpuExit::MmioRead(_, d)) => d.fill(0),
            Ok(VcpuExit::IoOut(PORT_EXIT, _)) => break,
            Ok(VcpuExit::IoOut(..)) | Ok(VcpuExit::IoIn(..)) => {}
            Ok(other) => {
                return Err(VmmError::Config(format!(
                    "raw benchmark guest: unexpected exit {other:?}"
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                return Err(VmmError::Kvm {
                    what: "KVM_RUN",
                    source: e,
                })
            }
        }
    }
    let span = first.map(|t| t.elapsed()).unwrap_or_default();
    Ok((exits, span))
}

fn vm_run(name: &str, code: Vec<u8>, timeout: Duration) -> Result<hilrig_vmm::RunReport, VmmError> {
    vm_run_with(name, code, timeout, None, false)
}

/// Run a VM on a thread of its own (so the main-thread seccomp filter it installs
/// ends with that thread), with the per-thread seccomp filters when `seccomp`.
pub(crate) fn vm_run_with(
    name: &str,
    code: Vec<u8>,
    timeout: Duration,
    policy: Option<std::sync::Arc<hilrig_vmm::policy::Profile>>,
    seccomp: bool,
) -> Result<hilrig_vmm::RunReport, VmmError> {
    let name = name.to_string();
    let run = move || -> Result<hilrig_vmm::RunReport, VmmError> {
        let cfg = VmConfig {
            vcpus: 1,
            mem_size: BENCH_MEM,
            payload: code,
            payload_name: name,
            timeout,
            console: Console::Null,
            policy,
            ..VmConfig::default()
        };
        let backend = open_backend(&DeviceSpec::Model, None)?;
        let mut vm = Vm::new(cfg, backend)?;
        vm.sandbox(hilrig_vmm::seccomp::Sandbox {
            seccomp,
            network: false,
        });
        vm.run()
    };
    if !seccomp {
        return run();
    }
    std::thread::spawn(run)
        .join()
        .map_err(|_| VmmError::Thread("the sandboxed benchmark VM's thread panicked".into()))?
}

/// `n` 4-byte MMIO writes to BAR0 + `offset` by the mmio-loop guest through the
/// VMM, with `policy` (None: no policy) and, with `seccomp`, the per-thread seccomp
/// filters. Returns (exits, span from the first MMIO exit to the end); a guest
/// without a passing verdict is an error naming `what`.
pub fn vmm_mmio_arm(
    what: &str,
    n: u64,
    offset: u32,
    policy: Option<std::sync::Arc<hilrig_vmm::policy::Profile>>,
    seccomp: bool,
    timeout: Duration,
) -> Result<(u64, Duration), VmmError> {
    let r = vm_run_with(
        "mmio-loop",
        payload::mmio_loop(n, offset)?,
        timeout,
        policy,
        seccomp,
    )?;
    if !r.verdict.passed() {
        return Err(VmmError::Config(format!("{what}: {}", r.verdict)));
    }
    Ok((r.exits.mmio_write, r.mmio_span.unwrap_or_default()))
}

/// As [`vmm_mmio_loop`], under the per-thread seccomp filters.
pub fn vmm_mmio_loop_seccomp(n: u64, timeout: Duration) -> Result<(u64, Duration), VmmError> {
    let what = "mmio-loop benchmark guest (seccomp)";
    vmm_mmio_arm(what, n, Reg::Scratch.offset(), None, true, timeout)
}

/// The same guest as [`raw_mmio_loop`], through hilrig-vmm's full MMIO path
/// (vCPU thread, PCI routing, the model). Returns (exits, span).
pub fn vmm_mmio_loop(n: u64, timeout: Duration) -> Result<(u64, Duration), VmmError> {
    let what = "mmio-loop benchmark guest";
    vmm_mmio_arm(what, n, Reg::Scratch.offset(), None, false, timeout)
}

/// Exits per second over `span` (0 for an empty span).
pub(crate) fn rate(exits: u64, span: Duration) -> f64 {
    if span.is_zero() {
        0.0
    } else {
        exits as f64 / span.as_secs_f64()
    }
}

/// Measure the VM exit figures within about `budget`:
/// 0. raw KVM MMIO exit loop (exits/s, baseline);
/// 1. hilrig-vmm's MMIO path into the model (exits/s, vs 0; target ≥ 0.95);
///    as its median ratio to 0 over paired rounds ([`crate::figure::paired_rounds`]);
/// 2. MMIO exits of a guest writing an unrestricted buffer page (target 0);
/// 3. VM start to first guest instruction (ms, median of 5);
/// 4. figure 1 with the per-thread seccomp filters on (vs 0, target ≥ 0.95).
pub fn bench_vm_exit(budget: Duration) -> anyhow::Result<Vec<Figure>> {
    let timeout = budget
        .saturating_mul(10)
        .saturating_add(Duration::from_secs(30));
    // Calibrate the loop length so each measured run takes about budget / 16; the
    // paths run in paired rounds (order alternating) and each figure is its median
    // ratio to the raw loop of the same round, so a noisy neighbour or the host's
    // paging drifting over the run hits both sides of a pair alike.
    const ROUNDS: usize = 15;
    let (e, s) = raw_mmio_loop(20_000)?;
    let per_run = (budget.as_secs_f64() / 16.0).max(MIN_RUN_S);
    let n = ((rate(e, s) * per_run) as u64).clamp(10_000, 50_000_000);
    let mut raw_arm = || -> Result<f64, VmmError> {
        let (e, s) = raw_mmio_loop(n)?;
        Ok(rate(e, s))
    };
    let mut vmm_arm = || -> Result<f64, VmmError> {
        let (e, s) = vmm_mmio_loop(n, timeout)?;
        Ok(rate(e, s))
    };
    let mut filtered_arm = || -> Result<f64, VmmError> {
        let (e, s) = vmm_mmio_loop_seccomp(n, timeout)?;
        Ok(rate(e, s))
    };
    let r =
        crate::figure::paired_rounds(ROUNDS, &mut [&mut raw_arm, &mut vmm_arm, &mut filtered_arm])?;
    let (raw, vmm, filtered) = (r[0], r[1], r[2]);
    let writes = (n * 10).clamp(100_000, 100_000_000);
    let r = vm_run(
        "buffer-writes",
        payload::buffer_writes(writes, false)?,
        timeout,
    )?;
    if !r.verdict.passed() {
        anyhow::bail!("buffer-writes benchmark guest: {}", r.verdict);
    }
    let buffer_exits = r.exits.mmio();
    let mut starts = Vec::new();
    for _ in 0..5 {
        let r = vm_run("report-only", payload::report_only(0)?, timeout)?;
        if let Some(t) = r.first_exit {
            starts.push(t.as_secs_f64() * 1e3);
        }
    }
    starts.sort_by(f64::total_cmp);
    let start_ms = starts.get(starts.len() / 2).copied().unwrap_or(f64::NAN);
    Ok(vec![
        Figure::new(
            format!(
                "raw KVM MMIO exit loop ({n} writes, unbacked address; median of {ROUNDS} rounds)"
            ),
            raw,
            "exits/s",
        ),
        Figure::new(
            format!("hilrig-vmm MMIO path into the model ({n} writes to SCRATCH)"),
            vmm,
            "exits/s",
        )
        .vs(0)
        .target(">= 0.95 x raw"),
        Figure::new(
            format!("MMIO exits for {writes} writes to an unrestricted buffer page"),
            buffer_exits as f64,
            "exits",
        )
        .target("0"),
        Figure::new(
            "VM start to first guest instruction (median of 5)",
            start_ms,
            "ms",
        ),
        Figure::new(
            format!("hilrig-vmm MMIO path into the model, seccomp filters on ({n} writes)"),
            filtered,
            "exits/s",
        )
        .vs(0)
        .target(">= 0.95 x raw"),
    ])
}

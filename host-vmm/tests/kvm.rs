//! VM tests on real KVM. Each skips loudly when /dev/kvm is absent.

#[path = "common/skip.rs"]
mod skip;

use hilrig_device::regmap::Reg;
use hilrig_device::Device;
use hilrig_vmm::payload;
use hilrig_vmm::{open_backend, Console, DeviceSpec, ExitStatus, RunReport, Verdict, Vm, VmConfig};
use std::time::Duration;

fn run(name: &str, bytes: Vec<u8>, vcpus: u8, timeout: Duration) -> RunReport {
    let cfg = VmConfig {
        vcpus,
        mem_size: 16 << 20,
        payload: bytes,
        payload_name: name.into(),
        timeout,
        console: Console::Capture,
        ..VmConfig::default()
    };
    let backend = open_backend(&DeviceSpec::Model, None).expect("model backend");
    let vm = Vm::new(cfg, backend).expect("vm");
    vm.run().expect("run")
}

#[test]
fn hello_prints_and_passes() {
    if !skip::kvm!() {
        return;
    }
    let r = run(
        "hello",
        payload::hello().expect("asm"),
        1,
        Duration::from_secs(20),
    );
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.verdict);
    assert_eq!(
        String::from_utf8_lossy(&r.console),
        "hello from hilrig-vmm\n"
    );
    assert_eq!(r.verdict.exit_status(), ExitStatus::Pass);
}

#[test]
fn pci_enum_passes_on_model() {
    if !skip::kvm!() {
        return;
    }
    let r = run(
        "pci-enum",
        payload::pci_enum().expect("asm"),
        1,
        Duration::from_secs(20),
    );
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.verdict);
    assert!(String::from_utf8_lossy(&r.console).contains("device found"));
}

#[test]
fn pci_enum_passes_with_several_vcpus() {
    if !skip::kvm!() {
        return;
    }
    let r = run(
        "pci-enum",
        payload::pci_enum().expect("asm"),
        4,
        Duration::from_secs(20),
    );
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.verdict);
}

#[test]
fn mmio_widths_reach_the_model() {
    if !skip::kvm!() {
        return;
    }
    let r = run(
        "mmio-widths",
        payload::mmio_widths().expect("asm"),
        1,
        Duration::from_secs(20),
    );
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.verdict);
    let mut dev = r.device.expect("device back");
    for (i, v) in payload::MMIO_WIDTHS_EXPECT {
        let got = dev
            .read32(Reg::Scratch.offset() + 4 * i as u32)
            .expect("read scratch");
        assert_eq!(got, v, "SCRATCH[{i}]");
    }
    // Four writes and eight reads (one per access, whatever its width).
    assert_eq!(r.exits.mmio_write, 4);
    assert_eq!(r.exits.mmio_read, 7);
    // Every trapped access is timed; handling one takes more than a nanosecond and
    // (on the model) less than a second.
    let lat = r.exits.trap_latency;
    assert_eq!(lat.count(), 11, "{lat:?}");
    assert_eq!(lat.log2_ns[0], 0);
    assert!(lat.quantile_ns(1.0) <= 1 << 30, "{lat:?}");
}

#[test]
fn unrestricted_buffer_page_costs_no_exits() {
    if !skip::kvm!() {
        return;
    }
    let n = 10_000;
    let r = run(
        "buffer-loop",
        payload::buffer_loop(n).expect("asm"),
        1,
        Duration::from_secs(20),
    );
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.verdict);
    // Only the single SCRATCH write traps.
    assert_eq!(r.exits.mmio_write, 1);
    assert_eq!(r.exits.mmio_read, 0);
    let mut dev = r.device.expect("device back");
    assert_eq!(dev.read32(Reg::Scratch.offset()).expect("scratch"), 0x600d);
    // The guest's buffer writes are in the device's buffer memory: qword k holds the
    // last count c with c % 512 == k (counts run n..=1).
    assert_eq!(dev.read32(0x4000 + 8).expect("buffer"), 1);
    assert_eq!(dev.read32(0x4000 + 8 * 511).expect("buffer"), 511);
    assert_eq!(r.plan.direct_pages(), 12);
}

#[test]
fn triple_fault_is_a_verdict() {
    if !skip::kvm!() {
        return;
    }
    let r = run(
        "triple-fault",
        payload::triple_fault().expect("asm"),
        1,
        Duration::from_secs(20),
    );
    assert!(
        matches!(r.verdict, Verdict::TripleFault { vcpu: 0, .. }),
        "{}",
        r.verdict
    );
    assert_ne!(r.verdict.exit_status(), ExitStatus::Pass);
}

#[test]
fn watchdog_stops_a_spinning_guest() {
    if !skip::kvm!() {
        return;
    }
    let r = run(
        "spin",
        payload::spin().expect("asm"),
        2,
        Duration::from_millis(300),
    );
    assert!(
        matches!(r.verdict, Verdict::Timeout { .. }),
        "{}",
        r.verdict
    );
    assert!(r.verdict.to_string().contains("watchdog"));
    assert_ne!(r.verdict.exit_status(), ExitStatus::Pass);
    // Attack (issue 16): a guest that keeps spinning past the deadline must not make
    // the VMM flood the host with kick signals. Kicks are paced (1 ms doubling to
    // 20 ms) once the VM stops; unpaced, the loop re-kicked with a wait of 0.
    assert!(
        r.kicks <= 40,
        "{} kick rounds to stop 2 spinning vCPUs",
        r.kicks
    );
}

#[test]
fn access_past_bar0_is_a_verdict() {
    if !skip::kvm!() {
        return;
    }
    for (name, p) in [
        ("past-bar", payload::past_bar()),
        ("straddle-bar", payload::straddle_bar()),
    ] {
        let r = run(name, p.expect("asm"), 1, Duration::from_secs(20));
        assert!(
            matches!(r.verdict, Verdict::BadAccess { write: false, .. }),
            "{name}: {}",
            r.verdict
        );
        assert_ne!(r.verdict.exit_status(), ExitStatus::Pass);
    }
}

#[test]
fn failure_code_is_reported() {
    if !skip::kvm!() {
        return;
    }
    let r = run(
        "fail",
        payload::report_only(42).expect("asm"),
        1,
        Duration::from_secs(20),
    );
    assert_eq!(r.verdict, Verdict::Fail { code: 42, vcpu: 0 });
    assert_eq!(r.verdict.exit_status(), ExitStatus::Fail);
}

#[test]
fn halting_without_verdict_is_no_verdict() {
    if !skip::kvm!() {
        return;
    }
    let mut p = payload::Payload::new().expect("asm");
    p.a.hlt().expect("hlt");
    let r = run("halt", p.build().expect("asm"), 2, Duration::from_secs(20));
    assert_eq!(r.verdict, Verdict::NoVerdict);
}

#[test]
fn empty_and_oversized_payloads_are_refused() {
    // No KVM needed: refused before the VM exists.
    let backend = || open_backend(&DeviceSpec::Model, None).expect("model backend");
    let cfg = VmConfig {
        payload: Vec::new(),
        payload_name: "empty.bin".into(),
        mem_size: 4 << 20,
        ..VmConfig::default()
    };
    let e = Vm::new(cfg, backend()).err().map(|e| e.to_string());
    assert!(
        e.as_deref()
            .is_some_and(|e| e.contains("empty.bin") && e.contains("empty")),
        "{e:?}"
    );
    let cfg = VmConfig {
        payload: vec![0x90; 4 << 20],
        payload_name: "big.bin".into(),
        mem_size: 4 << 20,
        ..VmConfig::default()
    };
    let e = Vm::new(cfg, backend()).err().map(|e| e.to_string());
    assert!(
        e.as_deref()
            .is_some_and(|e| e.contains("big.bin") && e.contains("4194304 bytes")),
        "{e:?}"
    );
}

#[test]
fn guest_moves_bar0_and_mappings_follow() {
    if !skip::kvm!() {
        return;
    }
    let r = run(
        "bar-move",
        payload::bar_move().expect("asm"),
        1,
        Duration::from_secs(20),
    );
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.verdict);
    // Only the two ID reads trap (one with decode off, one at the new address); the
    // buffer word is read through the re-registered mapping.
    assert_eq!(r.exits.mmio_read, 2);
    assert_eq!(r.exits.mmio_write, 0);
}

#[test]
fn unknown_exit_is_a_verdict() {
    let exit = kvm_ioctls::VcpuExit::Watchdog;
    let v = hilrig_vmm::vstate::vm::unknown_exit(3, &exit);
    assert!(matches!(v, Verdict::UnknownExit { vcpu: 3, .. }));
    assert!(v.to_string().contains("Watchdog"));
    assert_ne!(v.exit_status(), ExitStatus::Pass);
}

#[test]
fn trapping_every_page_still_reaches_the_buffers() {
    if !skip::kvm!() {
        return;
    }
    let n = 500;
    let cfg = VmConfig {
        mem_size: 16 << 20,
        payload: payload::buffer_loop(n).expect("asm"),
        payload_name: "buffer-loop".into(),
        console: Console::Capture,
        trap: hilrig_vmm::TrapSet::all(),
        ..VmConfig::default()
    };
    let backend = open_backend(&DeviceSpec::Model, None).expect("model backend");
    let r = Vm::new(cfg, backend).expect("vm").run().expect("run");
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.verdict);
    assert_eq!(r.plan.direct_pages(), 0);
    assert_eq!(r.exits.mmio_write, n + 1);
    let mut dev = r.device.expect("device back");
    assert_eq!(dev.read32(0x4000 + 8).expect("buffer"), 1);
}

#[test]
fn every_vcpu_runs_on_its_own_thread() {
    if !skip::kvm!() {
        return;
    }
    let r = run(
        "smp-scratch",
        payload::smp_scratch().expect("asm"),
        4,
        Duration::from_secs(20),
    );
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.verdict);
    let mut dev = r.device.expect("device back");
    for i in 0..4u32 {
        assert_eq!(
            dev.read32(Reg::Scratch.offset() + 4 * i).expect("scratch"),
            i + 1
        );
    }
}

#[test]
fn watchdog_stops_a_guest_flooding_exits() {
    if !skip::kvm!() {
        return;
    }
    let code = payload::mmio_loop(u64::MAX, Reg::Scratch.offset()).expect("asm");
    let r = run("mmio-flood", code, 2, Duration::from_millis(300));
    assert!(
        matches!(r.verdict, Verdict::Timeout { .. }),
        "{}",
        r.verdict
    );
    assert!(r.exits.mmio_write > 0);
}

#[test]
fn stop_handle_ends_a_running_vm() {
    if !skip::kvm!() {
        return;
    }
    let cfg = VmConfig {
        vcpus: 2,
        mem_size: 16 << 20,
        payload: payload::spin().expect("asm"),
        payload_name: "spin".into(),
        timeout: Duration::from_secs(60),
        console: Console::Null,
        ..VmConfig::default()
    };
    let backend = open_backend(&DeviceSpec::Model, None).expect("model backend");
    let vm = Vm::new(cfg, backend).expect("vm");
    let h = vm.stop_handle();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        h.stop("test teardown");
    });
    let r = vm.run().expect("run");
    t.join().expect("stopper");
    assert_eq!(r.verdict, Verdict::Stopped("test teardown".into()));
    assert_eq!(r.verdict.exit_status(), ExitStatus::Stopped);
    assert!(r.device.is_some(), "the device comes back after a stop");
}

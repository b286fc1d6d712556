//! Interrupt delivery on the host, without QEMU or VFIO (issue 18): the in-kernel
//! irqchip (`KVM_CREATE_IRQCHIP`) and a device interrupt line wired through a KVM
//! irqfd with a resample fd, the same path a VFIO function's INTx takes. The line is
//! the simulated source `SimulatedIntx` (a level-triggered line stuck
//! asserted: it fires when connected and again after every resample); the payload `intx-wait` sets
//! up an IDT, the LAPIC and the IOAPIC input config space names, and `hlt`s until
//! the vector arrives. Each test skips loudly when /dev/kvm is absent.

#[path = "common/skip.rs"]
mod skip;

use hilrig_guest::intx;
use hilrig_vmm::api::Irqchip;
use hilrig_vmm::devices::irq::SimulatedIntx;
use hilrig_vmm::{open_backend, Console, DeviceSpec, RunReport, Verdict, Vm, VmConfig};
use std::sync::Arc;
use std::time::Duration;

/// Run `intx-wait` on the model with `source` as its interrupt line (if any).
fn run(source: Option<Arc<SimulatedIntx>>, irqchip: Irqchip, vcpus: u8) -> (RunReport, bool, bool) {
    let mut backend = open_backend(&DeviceSpec::Model, None).expect("model backend");
    if let Some(s) = source {
        backend.intx = Some(s);
    }
    let cfg = VmConfig {
        vcpus,
        mem_size: 16 << 20,
        payload: intx::intx_wait().expect("asm"),
        payload_name: "intx-wait".into(),
        timeout: Duration::from_secs(30),
        console: Console::Capture,
        irqchip,
        ..VmConfig::default()
    };
    let vm = Vm::new(cfg, backend).expect("vm");
    let (chip, wired) = (vm.irqchip(), vm.interrupt_wired());
    (vm.run().expect("run"), chip, wired)
}

#[test]
fn pending_interrupt_reaches_the_payload_through_an_irqfd() {
    if !skip::kvm!() {
        return;
    }
    let src = Arc::new(SimulatedIntx::new());
    let (r, chip, wired) = run(Some(src.clone()), Irqchip::Auto, 1);
    assert!(
        chip && wired,
        "auto: an irqchip because the device has a line"
    );
    assert!(
        matches!(r.verdict, Verdict::Pass),
        "{} {:?} {}",
        r.verdict,
        r.results,
        String::from_utf8_lossy(&r.console)
    );
    // IOAPIC input 16 from config space; the device's vector; no status register.
    assert_eq!(r.results[..3], [16, intx::VECTOR, 0], "{:?}", r.results);
    // KVM resampled the line through the source's resample fd: when the guest
    // unmasked the pending input (KVM drops it and asks the source to fire again)
    // and at the guest's EOI.
    assert!(src.resamples() >= 2, "{}", src.resamples());
}

#[test]
fn secondary_vcpus_run_with_an_irqchip() {
    if !skip::kvm!() {
        return;
    }
    // With an in-kernel LAPIC the other vCPUs would wait for INIT/SIPI; the VMM
    // makes them runnable (they park with `hlt`, which now waits inside KVM).
    let (r, chip, _) = run(Some(Arc::new(SimulatedIntx::new())), Irqchip::On, 2);
    assert!(chip);
    assert!(matches!(r.verdict, Verdict::Pass), "{}", r.verdict);
}

#[test]
fn unwired_line_gives_no_interrupt() {
    if !skip::kvm!() {
        return;
    }
    // Negative control: the same payload and source, the irqchip present but the
    // line not connected: the payload's timeout fires and it says so.
    let src = Arc::new(SimulatedIntx::new());
    let (r, chip, wired) = run(Some(src.clone()), Irqchip::Unwired, 1);
    assert!(chip && !wired);
    assert!(
        matches!(r.verdict, Verdict::Fail { code, .. } if code == intx::codes::NO_INTERRUPT),
        "{}",
        r.verdict
    );
    assert!(String::from_utf8_lossy(&r.console).contains("no interrupt"));
    assert_eq!(r.results, vec![16, 0]);
    assert_eq!(src.resamples(), 0);
}

#[test]
fn no_line_no_irqchip_unless_asked() {
    if !skip::kvm!() {
        return;
    }
    // The model has no interrupt line: `auto` makes no irqchip (every existing
    // payload runs as before); `on` makes one and the guest finds no pin.
    let backend = open_backend(&DeviceSpec::Model, None).expect("model backend");
    let vm = Vm::new(
        VmConfig {
            payload: hilrig_vmm::payload::hello().expect("asm"),
            payload_name: "hello".into(),
            console: Console::Capture,
            ..VmConfig::default()
        },
        backend,
    )
    .expect("vm");
    assert!(!vm.irqchip() && !vm.interrupt_wired());
    let (r, chip, wired) = run(None, Irqchip::On, 1);
    assert!(chip && !wired);
    assert!(
        matches!(r.verdict, Verdict::Fail { code, .. } if code == intx::codes::NO_LINE),
        "{}",
        r.verdict
    );
}

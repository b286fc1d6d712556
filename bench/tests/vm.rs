//! The VMM's benchmarks report their figures (moved from host-vmm/tests/kvm.rs and
//! host-vmm/tests/policy.rs). Without /dev/kvm they return at once.

#[path = "../../host-vmm/tests/common/skip.rs"]
mod skip;

use std::time::Duration;

#[test]
fn bench_reports_the_five_figures() {
    if !skip::kvm!() {
        return;
    }
    let figs = hilrig_bench::vm_exit::bench_vm_exit(Duration::from_millis(300)).expect("bench");
    assert_eq!(figs.len(), 5);
    assert_eq!(figs[1].baseline, Some(0));
    // The same path with the seccomp filters on, against the same baseline.
    assert_eq!(figs[4].baseline, Some(0));
    assert!(figs[4].value > 0.0);
    assert!(figs[0].value > 0.0 && figs[1].value > 0.0);
    assert_eq!(figs[2].value, 0.0, "unrestricted page must cost no exits");
    assert_eq!(figs[3].unit, "ms");
}

#[test]
fn bench_policy_reports_its_figures() {
    if !skip::kvm!() {
        return;
    }
    let f = hilrig_bench::policy::bench_policy(Duration::from_millis(500)).expect("bench");
    assert_eq!(f.len(), 6);
    assert!(f[0].value > 0.0 && f[1].value > 0.0 && f[2].value > 0.0);
    // Figure 1 with the seccomp filters on, same baseline.
    assert!(f[5].value > 0.0 && f[5].baseline == Some(0), "{:?}", f[5]);
    assert_eq!((f[1].baseline, f[2].baseline), (Some(0), Some(0)));
    assert!(f[3].value > 0.0 && f[3].value < 10_000.0, "{:?}", f[3]);
}

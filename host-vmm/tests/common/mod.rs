//! Helpers shared by the live-patch tests (`mod common;`).

use hilrig_device::regmap::Reg;
use hilrig_vmm::policy::Action;
use hilrig_vmm::RunReport;

/// Each vCPU's writes to its own SCRATCH word (the `storm` payload writes 1, 2,
/// 3, ...) were decided in order, each exactly once: allowed by the old rules up to
/// a point, dropped by the new ones after it; the device holds the last value the
/// old rules let through. Returns, per vCPU, how many the old rules carried out.
pub fn old_then_new(rep: &mut RunReport, vcpus: u8) -> Vec<usize> {
    let pol = rep.policy.as_ref().expect("a policy report");
    let dev = rep.device.as_mut().expect("the device");
    (0..vcpus as u32)
        .map(|vcpu| {
            let word = Reg::Scratch.offset() + 4 * vcpu;
            let writes: Vec<_> = pol
                .decided
                .iter()
                .filter(|x| x.write && x.word == word)
                .collect();
            for (i, w) in writes.iter().enumerate() {
                assert_eq!(
                    w.bits,
                    i as u32 + 1,
                    "vCPU {vcpu}: access {i} decided out of order or twice"
                );
            }
            let switch = writes
                .iter()
                .position(|w| w.action == Action::Drop)
                .unwrap_or_else(|| panic!("vCPU {vcpu}: the new rules decided none"));
            assert!(switch > 0, "vCPU {vcpu}: the old rules decided none");
            assert!(writes[..switch].iter().all(|w| w.action == Action::Allow));
            assert!(writes[switch..]
                .iter()
                .all(|w| w.action == Action::Drop && w.rule.is_some()));
            assert_eq!(dev.read32(word).unwrap(), switch as u32, "vCPU {vcpu}");
            switch
        })
        .collect()
}

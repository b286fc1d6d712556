//! The shared Device property tests (`hilrig_device::testkit`) on the Verilator
//! backend, in memory and across power cycles through the state file. SKIPPED
//! loudly without verilator. Widths are a few fixed ones: each width (and serial)
//! is a Verilator build, cached after the first run.

use hilrig_device::testkit::{check, op, Backend};
use hilrig_verilator::{available, Verilator};
use proptest::prelude::*;

const REGIONS: [u32; 3] = [2048, 1024, 256];

fn verilator() -> Backend<'static> {
    Backend {
        new: &|nv| Ok(Box::new(Verilator::new(nv)?)),
        create: &|p, nv| Ok(Box::new(Verilator::create(p, nv)?)),
        open: &|p| Ok(Box::new(Verilator::open(p)?)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn verilator_counters_fuse_hang_in_memory(width in prop_oneof![Just(1u8), Just(3u8), Just(6u8)], ops_ in proptest::collection::vec(op(), 1..60)) {
        if !available("verilator_counters_fuse_hang_in_memory") {
            return Ok(());
        }
        check(&verilator(), width, REGIONS, &ops_, None)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn verilator_counters_survive_power_cycles_through_the_state_file(width in prop_oneof![Just(3u8)], ops_ in proptest::collection::vec(op(), 1..40)) {
        if !available("verilator_counters_survive_power_cycles_through_the_state_file") {
            return Ok(());
        }
        let dir = tempfile::tempdir().unwrap();
        check(&verilator(), width, REGIONS, &ops_, Some(&dir.path().join("dev.state")))?;
    }
}

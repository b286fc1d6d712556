//! The Device property tests every backend runs (`hilrig_device::testkit`), on the
//! `rtl` backend: counters never decrease and count exactly, the fuse freezes the
//! flash, OOB equals in-band, the hang wedges until a reset — in memory and across
//! power cycles through the state file. Region sizes are the small build's, so that
//! the READ_HASH checks after the fuse blows stay cheap in simulation.

use hilrig_device::testkit::{check, op, Backend};
use hilrig_fpga::Rtl;
use proptest::prelude::*;

const REGIONS: [u32; 3] = [2048, 1024, 256];

fn rtl() -> Backend<'static> {
    Backend {
        new: &|nv| Ok(Box::new(Rtl::new(nv)?)),
        create: &|p, nv| Ok(Box::new(Rtl::create(p, nv)?)),
        open: &|p| Ok(Box::new(Rtl::open(p)?)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn rtl_counters_fuse_hang_in_memory(width in 1u8..=6, ops_ in proptest::collection::vec(op(), 1..60)) {
        check(&rtl(), width, REGIONS, &ops_, None)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn rtl_counters_survive_power_cycles_through_the_state_file(width in 2u8..=5, ops_ in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        check(&rtl(), width, REGIONS, &ops_, Some(&dir.path().join("dev.state")))?;
    }
}

//! Property tests over arbitrary sequences of MMIO accesses, flash commands, resets,
//! FLRs and power cycles against the behavioural model (DESIGN.md §2):
//! - no counter (region, MASTER, EPOCH) ever decreases;
//! - MASTER equals the number of counted attempts (every attempt while its region has
//!   slots left), and each region counter equals min(attempts, WIDTH);
//! - once the budget is spent the fuse is blown and no flash byte changes;
//! - the OOB read equals the in-band read;
//! - the hang magic wedges the device (all-ones reads, ignored writes) until a reset.

use hilrig_device::model::ops;
use hilrig_device::oob;
use hilrig_device::state::{DeviceConfig, NvState};
use hilrig_device::testkit::{check, op, Backend};
use hilrig_device::Model;
use proptest::prelude::*;

fn model() -> Backend<'static> {
    Backend {
        new: &|nv| Ok(Box::new(Model::new(nv)?)),
        create: &|p, nv| Ok(Box::new(Model::create(p, nv)?)),
        open: &|p| Ok(Box::new(Model::open(p)?)),
    }
}

fn regions() -> [u32; 3] {
    DeviceConfig::default().region_sizes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn counters_fuse_hang_in_memory(width in 1u8..=6, ops_ in proptest::collection::vec(op(), 1..80)) {
        check(&model(), width, regions(), &ops_, None)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn counters_survive_power_cycles_through_the_state_file(width in 2u8..=5, ops_ in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        check(&model(), width, regions(), &ops_, Some(&dir.path().join("dev.state")))?;
    }
}

#[test]
fn oob_physical_reset_is_keyed_and_bumps_epoch() {
    let nv = NvState::factory(DeviceConfig::with_width(2), 4).unwrap();
    let key = nv.reset_key;
    let mut m = Model::new(nv).unwrap();
    ops::unlock(&mut m).unwrap();
    ops::erase(&mut m, hilrig_device::Region::Config).unwrap();
    ops::erase(&mut m, hilrig_device::Region::Config).unwrap();
    assert!(oob::read_counters(&mut m).unwrap().fuse);
    let wrong = oob::request_device(&mut m, &oob::Request::PhysicalReset([1; 32]));
    assert!(matches!(
        wrong,
        Err(oob::OobError::Refused {
            code: oob::ErrorCode::BadKey,
            ..
        })
    ));
    assert!(oob::read_counters(&mut m).unwrap().fuse);
    oob::request_device(&mut m, &oob::Request::PhysicalReset(key)).unwrap();
    let c = oob::read_counters(&mut m).unwrap();
    assert_eq!(
        (c.fuse, c.epoch, c.master, c.counters),
        (false, 1, 2, [0, 0, 0])
    );
    // Flash works again.
    assert!(ops::erase(&mut m, hilrig_device::Region::Config)
        .unwrap()
        .done());
}

//! The Device property tests every backend runs (`hilrig_device::testkit`), on the
//! `fpga` backend against the simulated board (board top RTL behind the host bridge
//! and the OOB UART, bit by bit): counters never decrease and count exactly, the fuse
//! freezes the flash, OOB equals in-band, the hang wedges until a reset. The board
//! keeps no state file, so power cycles are `Device::reset(PowerCycle)` here; the
//! state-file variant runs on `model` and `rtl`. Few cases: every access crosses two
//! simulated UARTs.

mod common;

use hilrig_board::{SimBoard, SimPipe};
use hilrig_device::device::DeviceError;
use hilrig_device::testkit::{check, op, Backend};
use proptest::prelude::*;

const REGIONS: [u32; 3] = [2048, 1024, 256];

fn no_state_file(_: &std::path::Path) -> DeviceError {
    DeviceError::Unsupported {
        backend: "fpga",
        what: "state files (the board keeps its own state)",
    }
}

fn fpga() -> Backend<'static> {
    Backend {
        new: &|nv| {
            let board = SimBoard::with_nv(common::params(nv.config.counter_width, nv.serial), &nv);
            let pipe = SimPipe::new(board);
            Ok(Box::new(common::fpga_on(&pipe)))
        },
        create: &|p, _| Err(no_state_file(p)),
        open: &|p| Err(no_state_file(p)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10))]

    #[test]
    fn fpga_counters_fuse_hang_on_the_simulated_board(width in 1u8..=4, ops_ in proptest::collection::vec(op(), 1..30)) {
        check(&fpga(), width, REGIONS, &ops_, None)?;
    }
}

//! Shared helpers of the board tests.
#![allow(dead_code)]

use hilrig_board::top::BoardParams;
use hilrig_board::{Fpga, FpgaOptions, SimBoard, SimPipe};
use hilrig_device::state::{DeviceConfig, NvState};
use hilrig_fpga::core::CoreParams;
use std::time::Duration;

/// Simulation divisors: bridge UART and OOB UART.
pub const HOST_DIV: u16 = 4;
pub const OOB_DIV: u16 = 5;

/// The small board geometry as a device configuration.
pub fn config(width: u8) -> DeviceConfig {
    DeviceConfig {
        counter_width: width,
        region_sizes: [2048, 1024, 256],
    }
}

pub fn params(width: u8, serial: u64) -> BoardParams {
    BoardParams::with_divisors(CoreParams::small(width, serial), HOST_DIV, OOB_DIV)
}

/// A factory-fresh board of `width` with `nv`'s flash and keys, on a pipe.
pub fn pipe_board(width: u8, serial: u64) -> (SimPipe, NvState) {
    let nv = NvState::factory(config(width), serial).expect("factory state");
    let board = SimBoard::with_nv(params(width, serial), &nv);
    (SimPipe::new(board), nv)
}

pub fn fpga_on(pipe: &SimPipe) -> Fpga {
    let mut f = Fpga::with_options(
        Box::new(pipe.host()),
        FpgaOptions {
            timeout: Duration::from_secs(2),
            retries: 4,
        },
    )
    .expect("the bridge answers IDENTIFY");
    f.set_oob(Box::new(pipe.oob()));
    f
}

//! `hilrig bench board`: the `fpga` backend against the simulated board, as ratios
//! in one run: register ops/s through the host bridge over the in-memory pipe and
//! over a PTY (the serialport code path used with a board), against the same core
//! driven directly by `Rtl` (no bridge, no UART) as the baseline.

use crate::figure::{rate, Figure};
use hilrig_board::backend::{Fpga, FpgaOptions};
use hilrig_board::simboard::{PtyBoard, SimBoard, SimPipe};
use hilrig_board::top::BoardParams;
use hilrig_device::device::{Device, DeviceError};
use hilrig_device::regmap::Reg;
use hilrig_device::state::{DeviceConfig, NvState};
use hilrig_fpga::core::CoreParams;
use std::time::{Duration, Instant};

/// UART divisors of the simulated board here (cycles per bit).
const DIVISORS: (u16, u16) = (4, 5);

/// The board the bench simulates (width 8, serial 1, UART divisors 4 and 5).
pub fn params() -> BoardParams {
    BoardParams::with_divisors(CoreParams::small(8, 1), DIVISORS.0, DIVISORS.1)
}

/// A write or a read of SCRATCH, checked (`i` even: write `i`; odd: read it back).
fn op(d: &mut dyn Device, i: u64) -> Result<(), DeviceError> {
    let v = (i / 2) as u32;
    if i % 2 == 0 {
        d.write32(Reg::Scratch.offset(), v)
    } else {
        match d.read32(Reg::Scratch.offset())? {
            r if r == v => Ok(()),
            r => Err(DeviceError::Divergence(format!(
                "SCRATCH read {r:#x} after writing {v:#x}"
            ))),
        }
    }
}

fn measure(d: &mut dyn Device, budget: Duration) -> Result<f64, DeviceError> {
    let mut err = None;
    let r = rate(budget, 16, |i| {
        if err.is_none() {
            if let Err(e) = op(d, i) {
                err = Some(e);
            }
        }
    });
    err.map_or(Ok(r), Err)
}

/// SCRATCH ops/s of the `fpga` backend on `board` over the in-memory pipe, and the
/// board's clock cycles/s meanwhile, measured for about `budget`.
pub fn pipe_rate(board: SimBoard, budget: Duration) -> Result<(f64, f64), DeviceError> {
    let opts = FpgaOptions {
        timeout: Duration::from_secs(2),
        retries: 2,
    };
    let pipe = SimPipe::new(board);
    let mut f = Fpga::with_options(Box::new(pipe.host()), opts)?;
    let c0 = pipe.with_board(|b| b.cycles()).unwrap_or(0);
    let t = Instant::now();
    let ops = measure(&mut f, budget)?;
    let cycles = pipe.with_board(|b| b.cycles()).unwrap_or(0) - c0;
    Ok((ops, cycles as f64 / t.elapsed().as_secs_f64()))
}

/// The figures, in about `budget`.
pub fn bench_board(budget: Duration) -> Result<Vec<Figure>, DeviceError> {
    let slice = budget / 3;
    let cfg = DeviceConfig {
        counter_width: 8,
        region_sizes: CoreParams::small(8, 1).region_sizes,
    };
    let mut rtl = hilrig_fpga::Rtl::new(NvState::factory(cfg, 1)?)?;
    let direct = measure(&mut rtl, slice)?;
    let opts = FpgaOptions {
        timeout: Duration::from_secs(2),
        retries: 2,
    };
    let (piped, board_cps) = pipe_rate(SimBoard::new(params()), slice)?;
    let pty = PtyBoard::spawn(SimBoard::new(params())).map_err(|e| DeviceError::Transport {
        what: "simulated board PTYs".into(),
        detail: e.to_string(),
    })?;
    let mut g = Fpga::open_serial_with(pty.host_path(), 115_200, opts)?;
    let over_pty = measure(&mut g, slice)?;
    drop(g);
    pty.stop();
    Ok(vec![
        Figure::new("rtl: SCRATCH ops/s, core driven directly", direct, "ops/s"),
        Figure::new(
            "fpga backend: SCRATCH ops/s via the bridge RTL, in-memory pipe",
            piped,
            "ops/s",
        )
        .vs(0),
        Figure::new(
            "fpga backend: SCRATCH ops/s via the bridge RTL, over a PTY (serialport)",
            over_pty,
            "ops/s",
        )
        .vs(1),
        Figure::new(
            "simulated board clock cycles/s while serving the pipe",
            board_cps,
            "cycles/s",
        ),
        Figure::new(
            "simulated board cycles per op (UART divisor 4: 10-byte frames)",
            board_cps / piped.max(1e-9),
            "cycles",
        ),
    ])
}

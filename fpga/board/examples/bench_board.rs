//! Figures for the README: ops/s of the `Fpga` backend against the simulated board,
//! over the in-memory pipe and over a PTY (the serialport code path).
//!
//! `cargo run --release -p hilrig-board --example bench_board -- [seconds]`

use hilrig_board::top::BoardParams;
use hilrig_board::{Fpga, FpgaOptions, PtyBoard, SimBoard, SimPipe};
use hilrig_device::device::Device;
use hilrig_device::regmap::Reg;
use hilrig_fpga::core::CoreParams;
use std::time::{Duration, Instant};

fn params() -> BoardParams {
    BoardParams::with_divisors(CoreParams::small(8, 1), 4, 5)
}

/// Alternate 32-bit writes and reads of SCRATCH for `budget`; returns ops/s.
fn measure(f: &mut Fpga, budget: Duration) -> Result<f64, hilrig_device::DeviceError> {
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < budget {
        let v = n as u32;
        f.write32(Reg::Scratch.offset(), v)?;
        let r = f.read32(Reg::Scratch.offset())?;
        if r != v {
            return Err(hilrig_device::DeviceError::Divergence(format!(
                "read {r:#x} after writing {v:#x}"
            )));
        }
        n += 2;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let budget = Duration::from_secs_f64(secs);

    let pipe = SimPipe::new(SimBoard::new(params()));
    let mut f = Fpga::with_options(
        Box::new(pipe.host()),
        FpgaOptions {
            timeout: Duration::from_secs(2),
            retries: 2,
        },
    )?;
    let c0 = pipe.with_board(|b| b.cycles()).unwrap_or(0);
    let t = Instant::now();
    let pipe_ops = measure(&mut f, budget)?;
    let cycles = pipe.with_board(|b| b.cycles()).unwrap_or(0) - c0;
    let cps = cycles as f64 / t.elapsed().as_secs_f64();
    println!(
        "pipe: {pipe_ops:.0} ops/s, {:.0} cycles/op, {cps:.0} board cycles/s",
        cps / pipe_ops
    );

    let pty = PtyBoard::spawn(SimBoard::new(params()))?;
    let mut g = Fpga::open_serial(pty.host_path(), 115_200)?;
    let pty_ops = measure(&mut g, budget)?;
    println!("pty ({}): {pty_ops:.0} ops/s", pty.host_path());
    Ok(())
}

//! `hilrig bench rtl`: how fast the RTL backend runs, as ratios in one run.

use crate::figure::{rate, Figure};
use hilrig_device::device::{Device, DeviceError};
use hilrig_device::model::Model;
use hilrig_device::regmap::{Reg, BUFFER_BASE};
use hilrig_device::state::{DeviceConfig, NvState};
use hilrig_fpga::core::{CoreParams, DeviceCore, BUF_WORDS};
use hilrig_fpga::counter;
use hilrig_fpga::rtl::Rtl;
use rust_hdl::prelude::*;
use std::time::{Duration, Instant};

/// The MMIO mix of the bench: a register write, a register read, a buffer write and a
/// buffer read, by `i % 4` (shared with the Verilator rows).
pub fn mmio_mix(d: &mut dyn Device, i: u64) -> Result<(), DeviceError> {
    // Alternate a register write, a register read, a buffer write and a buffer read.
    match i % 4 {
        0 => d.write32(Reg::Scratch.offset() + 4 * (i as u32 / 4 % 8), i as u32),
        1 => d
            .read32(Reg::Scratch.offset() + 4 * (i as u32 / 4 % 8))
            .map(|_| ()),
        2 => d.write32(BUFFER_BASE + 4 * (i as u32 % 1024), i as u32),
        _ => d.read32(BUFFER_BASE + 4 * (i as u32 % 1024)).map(|_| ()),
    }
}

/// Run the whole device core under `simple_sim!` for `cycles` clock cycles;
/// returns cycles/s (0 if the simulation failed).
pub fn simple_sim_device(cycles: u64) -> f64 {
    let d = DeviceConfig::default();
    let core = DeviceCore::new(CoreParams {
        width: d.counter_width,
        region_sizes: d.region_sizes,
        serial: 1,
        buffer_words: BUF_WORDS,
        oob_divisor: hilrig_fpga::core::OOB_DIVISOR,
    });
    let mut sim = simple_sim!(DeviceCore, clock, 100_000_000, ep, {
        let mut x = ep.init()?;
        wait_clock_cycles!(ep, clock, x, cycles);
        ep.done(x)
    });
    let t = Instant::now();
    let ok = sim.run(Box::new(core), (cycles + 10) * 10_000).is_ok();
    let rate = cycles as f64 / t.elapsed().as_secs_f64();
    if ok {
        rate
    } else {
        0.0
    }
}

/// Measure the RTL backend for about `budget` in total. Figures: MMIO ops/s through
/// `Model` and `Rtl` (the ratio is the RTL's cost); whole-device clock cycles/s
/// through `Rtl` (idle, and while serving MMIO) against the same core under
/// `simple_sim!`; the step-0 32-bit counter under `simple_sim!` and driven directly.
pub fn bench_rtl(budget: Duration) -> Result<Vec<Figure>, DeviceError> {
    let slice = budget / 6;
    let nv = NvState::factory(DeviceConfig::default(), 1)?;
    let mut figs = Vec::new();

    let mut model = Model::new(nv.clone())?;
    let mut err = None;
    let m = rate(slice, 1024, |i| {
        if let Err(e) = mmio_mix(&mut model, i) {
            err = Some(e);
        }
    });
    figs.push(Figure::new(
        "model: MMIO ops/s (32-bit, registers and buffers)",
        m,
        "ops/s",
    ));

    let mut rtl = Rtl::new(nv)?;
    let c0 = rtl.cycles();
    let t = Instant::now();
    let r = rate(slice, 256, |i| {
        if let Err(e) = mmio_mix(&mut rtl, i) {
            err = Some(e);
        }
    });
    let mmio_cycles = (rtl.cycles() - c0) as f64 / t.elapsed().as_secs_f64();
    if let Some(e) = err {
        return Err(e);
    }
    figs.push(
        Figure::new(
            "rtl: MMIO ops/s (32-bit, registers and buffers)",
            r,
            "ops/s",
        )
        .vs(0)
        .target(">= 150k ops/s"),
    );

    // simple_sim! on the counter: run a fixed number of cycles scaled to the slice.
    let t = Instant::now();
    let mut n = 1000u64;
    let mut s = counter::simple_sim_counter(n);
    while t.elapsed() < slice / 2 {
        n *= 2;
        s = counter::simple_sim_counter(n);
    }
    figs.push(Figure::new(
        "simple_sim!: 32-bit counter cycles/s",
        s,
        "cycles/s",
    ));
    let (_, c) = counter::drive_counter((s.max(1.0) as u64).max(1) * 200);
    figs.push(Figure::new("direct drive: 32-bit counter cycles/s", c, "cycles/s").vs(2));

    let t = Instant::now();
    let mut n = 1000u64;
    let mut sd = simple_sim_device(n);
    while t.elapsed() < slice / 2 {
        n *= 2;
        sd = simple_sim_device(n);
    }
    figs.push(Figure::new(
        "simple_sim!: whole-device clock cycles/s",
        sd,
        "cycles/s",
    ));

    let t = Instant::now();
    let c0 = rtl.cycles();
    while t.elapsed() < slice {
        for _ in 0..1024 {
            rtl.tick();
        }
    }
    let cy = (rtl.cycles() - c0) as f64 / t.elapsed().as_secs_f64();
    figs.push(
        Figure::new(
            "rtl: whole-device clock cycles/s (idle bus)",
            cy,
            "cycles/s",
        )
        .vs(4)
        .target(">= 1M cycles/s"),
    );
    figs.push(
        Figure::new(
            "rtl: whole-device clock cycles/s (serving MMIO)",
            mmio_cycles,
            "cycles/s",
        )
        .vs(4),
    );
    Ok(figs)
}

//! The Verilator rows of `hilrig bench rtl`: the Verilator backend, and a bare
//! Verilator harness (`cpp/harness.cpp`, a plain C++ loop on the same
//! `device_core.v`) built and run in the same bench as the baseline.

use crate::figure::{rate, Figure};
use hilrig_device::device::{Device, DeviceError};
use hilrig_device::regmap::Reg;
use hilrig_device::state::{DeviceConfig, NvState};
use hilrig_fpga::core::CoreParams;
use hilrig_verilator::build::{self, BuildOptions, Sources};
use hilrig_verilator::{Error, Verilator};
use std::process::Command;
use std::time::{Duration, Instant};

/// The bare harness's C++ source.
pub const HARNESS: &str = include_str!("../cpp/harness.cpp");

/// What the bare harness measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HarnessFigures {
    /// Idle clock cycles/s.
    pub idle_cycles: f64,
    /// SCRATCH writes and reads/s.
    pub mmio_ops: f64,
}

/// Build (or take from the cache) and run the bare harness on the core of `p` for
/// about `secs` per figure.
pub fn run_harness(p: CoreParams, secs: f64, opts: &BuildOptions) -> Result<HarnessFigures, Error> {
    let src = Sources {
        what: "bare harness",
        verilog: vec![("device_core.v", hilrig_fpga::core::verilog(p))],
        config: vec![],
        cpp: vec![("harness.cpp", HARNESS)],
        shared: false,
        args: vec![],
    };
    let built = build::build(&src, opts)?;
    let out = Command::new(&built.path)
        .arg(format!("{secs}"))
        .arg(format!("{}", Reg::Scratch.offset()))
        .output()
        .map_err(|e| Error::Load {
            path: built.path.clone(),
            detail: format!("running the harness: {e}"),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| -> Result<f64, Error> {
        text.lines()
            .filter_map(|l| l.strip_prefix(k))
            .find_map(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| Error::Load {
                path: built.path.clone(),
                detail: format!("the harness printed no `{k}` ({}): {text}", out.status),
            })
    };
    if !out.status.success() {
        return Err(Error::Load {
            path: built.path.clone(),
            detail: format!("the harness failed ({}): {text}", out.status),
        });
    }
    Ok(HarnessFigures {
        idle_cycles: field("idle_cycles_per_s")?,
        mmio_ops: field("mmio_ops_per_s")?,
    })
}

fn index_of(figs: &[Figure], prefix: &str) -> Option<usize> {
    figs.iter().position(|f| f.name.starts_with(prefix))
}

/// Append the Verilator rows to `figs` (the figures of `crate::rtl::bench_rtl`,
/// measured in the same run): the bare harness (baseline), the backend's MMIO
/// ops/s (SCRATCH write + read, as the harness) and idle cycles/s against it, and
/// the `rtl` backend's idle cycles/s against the harness. Builds first (cached),
/// outside the timed parts.
pub fn append_rows(figs: &mut Vec<Figure>, budget: Duration) -> Result<(), Error> {
    let nv = NvState::factory(DeviceConfig::default(), 1).map_err(DeviceError::from)?;
    let p = CoreParams::of(&nv);
    let opts = BuildOptions::default();
    let mut v = Verilator::new(nv)?;
    let slice = budget / 6;
    let h = run_harness(p, slice.as_secs_f64().max(0.05), &opts)?;
    let hi = figs.len();
    figs.push(Figure::new(
        "verilator bare harness: idle clock cycles/s",
        h.idle_cycles,
        "cycles/s",
    ));
    figs.push(Figure::new(
        "verilator bare harness: MMIO ops/s (SCRATCH write + read)",
        h.mmio_ops,
        "ops/s",
    ));

    let scratch = Reg::Scratch.offset();
    let mut err: Option<DeviceError> = None;
    let ops = rate(slice, 256, |i| {
        let r = if i % 2 == 0 {
            v.write32(scratch, i as u32)
        } else {
            match v.read32(scratch) {
                Ok(x) if x == (i - 1) as u32 => Ok(()),
                Ok(x) => Err(DeviceError::Divergence(format!(
                    "SCRATCH read {x:#x}, wrote {:#x}",
                    (i - 1) as u32
                ))),
                Err(e) => Err(e),
            }
        };
        if let Err(e) = r {
            err = Some(e);
        }
    });
    if let Some(e) = err {
        return Err(e.into());
    }
    figs.push(
        Figure::new(
            "verilator backend: MMIO ops/s (SCRATCH write + read)",
            ops,
            "ops/s",
        )
        .vs(hi + 1)
        .target(">= 0.8 x bare harness"),
    );

    let t = Instant::now();
    let c0 = v.cycles();
    while t.elapsed() < slice {
        for _ in 0..1024 {
            v.tick();
        }
    }
    let cy = (v.cycles() - c0) as f64 / t.elapsed().as_secs_f64();
    figs.push(
        Figure::new(
            "verilator backend: idle clock cycles/s (a call a cycle)",
            cy,
            "cycles/s",
        )
        .vs(hi),
    );

    let mut err: Option<DeviceError> = None;
    let mix = rate(slice, 256, |i| {
        if let Err(e) = crate::rtl::mmio_mix(&mut v, i) {
            err = Some(e);
        }
    });
    if let Some(e) = err {
        return Err(e.into());
    }
    let mut f = Figure::new(
        "verilator backend: MMIO ops/s (32-bit, registers and buffers)",
        mix,
        "ops/s",
    );
    if let Some(r) = index_of(figs, "rtl: MMIO ops/s") {
        f = f.vs(r);
    }
    figs.push(f);

    if let Some(r) = index_of(figs, "rtl: whole-device clock cycles/s (idle bus)") {
        let value = figs[r].value;
        figs.push(
            Figure::new(
                "rtl: whole-device clock cycles/s (idle bus), vs the bare harness",
                value,
                "cycles/s",
            )
            .vs(hi),
        );
    }
    Ok(())
}

/// The verilated board top's rows of `hilrig bench board`: the `fpga` backend over
/// the in-memory pipe on the board top's Verilog through Verilator, against the
/// rust-hdl board's pipe row (figure 1 of `crate::board::bench_board`).
pub fn append_board_rows(figs: &mut Vec<Figure>, budget: Duration) -> Result<(), Error> {
    let p = crate::board::params();
    let cfg = DeviceConfig {
        counter_width: p.core.width,
        region_sizes: p.core.region_sizes,
    };
    let nv = NvState::factory(cfg, p.core.serial).map_err(DeviceError::from)?;
    let board = hilrig_verilator::board::sim_board(p, &nv, &BuildOptions::default())?;
    let (ops, cps) = crate::board::pipe_rate(board, budget)?;
    figs.push(
        Figure::new(
            "fpga backend: SCRATCH ops/s via the verilated board top, in-memory pipe",
            ops,
            "ops/s",
        )
        .vs(1),
    );
    figs.push(Figure::new(
        "verilated board clock cycles/s while serving the pipe",
        cps,
        "cycles/s",
    ));
    Ok(())
}

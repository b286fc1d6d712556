//! `hilrig fpga`: the device on an FPGA board — Verilog, the iCE40 flow (lint,
//! synthesis, place and route, bitstream), programming the board's SPI flash, and
//! a simulated board on PTYs for the `fpga` backend without hardware.

use anyhow::{Context, Result};
use clap::Subcommand;
use hilrig_board::{BoardParams, PtyBoard, SimBoard};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `hilrig fpga ...`
#[derive(Subcommand)]
pub enum FpgaCmd {
    /// Write the Verilog of the device core, the host bridge and the board top
    /// (core + bridge + OOB UART + LEDs) into a directory.
    Verilog {
        /// Output directory (created if missing).
        #[arg(short, long)]
        out: PathBuf,
        /// Counter width of the build.
        #[arg(long, default_value_t = 8)]
        width: u8,
        /// Serial number of the build.
        #[arg(long, default_value_t = 1)]
        serial: u64,
    },
    /// Serve a simulated board (the board top's RTL, bit-accurate UARTs) on two new
    /// PTYs and print their paths: use them as `--device fpga=HOST,oob=OOB` or with
    /// `hilrig_board::Fpga`, exactly as a board's USB-serial ports.
    ServeSim {
        /// Counter width of the build.
        #[arg(long, default_value_t = 8)]
        width: u8,
        /// Serial number of the build.
        #[arg(long, default_value_t = 1)]
        serial: u64,
        /// Stop after this many seconds (default: run until killed).
        #[arg(long)]
        seconds: Option<f64>,
    },
}

/// Clock cycles per UART bit in the simulated board (fast; the baud rate of a PTY
/// means nothing).
const SIM_DIVISOR: u16 = 4;

pub fn run(cmd: FpgaCmd) -> Result<()> {
    match cmd {
        FpgaCmd::Verilog { out, width, serial } => {
            check_width(width)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let p = BoardParams::board(width, serial);
            let files = [
                ("device_core.v", hilrig_fpga::core::verilog(p.core)),
                (
                    "host_bridge.v",
                    hilrig_board::bridge::bridge_verilog(p.bridge),
                ),
                ("board_top.v", hilrig_board::board_top_verilog(p)),
            ];
            for (name, text) in files {
                let path = out.join(name);
                std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("{}", path.display());
            }
        }
        FpgaCmd::ServeSim {
            width,
            serial,
            seconds,
        } => {
            check_width(width)?;
            let p = BoardParams::with_divisors(
                hilrig_fpga::core::CoreParams::small(width, serial),
                SIM_DIVISOR,
                SIM_DIVISOR,
            );
            // A factory-fresh board: the factory VBIOS in its small VBIOS region.
            let cfg = hilrig_device::DeviceConfig {
                counter_width: width,
                region_sizes: p.core.region_sizes,
            };
            let nv = hilrig_fw::factory::device(cfg, serial)?;
            let board = PtyBoard::spawn(SimBoard::with_nv(p, &nv)).context("opening the PTYs")?;
            println!("host {}", board.host_path());
            println!("oob {}", board.oob_path());
            let start = Instant::now();
            while seconds.is_none_or(|s| start.elapsed().as_secs_f64() < s) {
                std::thread::sleep(Duration::from_millis(50));
            }
            board.stop();
        }
    }
    Ok(())
}

fn check_width(width: u8) -> Result<()> {
    if !(1..=64).contains(&width) {
        anyhow::bail!("--width {width}: the counter width is 1..=64");
    }
    Ok(())
}

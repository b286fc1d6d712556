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
    /// Build the board's bitstream: the board top's Verilog (device core, host
    /// bridge, OOB UART, LEDs), yosys `synth_ice40` (no latches, no undriven wires),
    /// nextpnr-ice40 with the board's pins and clock, icepack. Prints LUTs, BRAMs
    /// and fmax against the clock; fails if timing is not met.
    Synth {
        /// Board name (see `hilrig fpga boards`).
        #[arg(long, default_value = "alchitry-cu")]
        board: String,
        /// Output directory (Verilog, reports, bitstream).
        #[arg(short, long, default_value = "hilrig-fpga")]
        out: PathBuf,
        /// Core clock in MHz, from the board's PLL (default: the board clock when
        /// the design meets it, else 25 MHz from the PLL).
        #[arg(long)]
        core_mhz: Option<f64>,
        /// Counter width of the build.
        #[arg(long, default_value_t = 8)]
        width: u8,
        /// Serial number of the build.
        #[arg(long, default_value_t = 1)]
        serial: u64,
        /// nextpnr placer seeds, tried in order while routing stalls.
        #[arg(long = "seed", num_args = 1.., default_values_t = [1u64, 2, 3, 4])]
        seeds: Vec<u64>,
    },
    /// `verilator --lint-only -Wall` on the board top's Verilog (rust-hdl's generated
    /// code gets only the waivers documented in hilrig-flow).
    Lint {
        /// Output directory (Verilog, log, waivers).
        #[arg(short, long, default_value = "hilrig-fpga-lint")]
        out: PathBuf,
    },
    /// Write a bitstream into a board's SPI flash over its FTDI chip (MPSSE), read it
    /// back and verify.
    Program {
        /// Board name (see `hilrig fpga boards`).
        #[arg(long)]
        board: String,
        /// The bitstream (`.bin` from `hilrig fpga synth`).
        bitstream: PathBuf,
        /// Only read back and compare.
        #[arg(long)]
        verify_only: bool,
        /// The FTDI chip's USB serial number, when several boards are attached.
        #[arg(long)]
        usb_serial: Option<String>,
    },
    /// The boards the flow knows: part, package, clock, pins, programmer.
    Boards,
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
        /// What simulates the board top: `rtl` (the rust-hdl circuit in-process) or
        /// `verilator` (the board top's Verilog, the very file that is synthesised,
        /// compiled with Verilator and cached; needs Debian's `verilator`).
        #[arg(long, value_enum, default_value_t = Engine::Rtl)]
        engine: Engine,
    },
    /// Relay a board's OOB port to this machine for a VMM here (a lab host whose
    /// board's OOB UART is wired to the rig controller): a new PTY, its path
    /// printed as `oob PATH`; each OOB frame written to it goes out on standard
    /// output, and the next frame read from standard input is its answer (the
    /// campaign runner reads the board on the controller's end and writes the
    /// board's answer back). No answer within 5 s: the request gets none (the
    /// VMM's own OOB timeout reports it). Ends at end of input.
    RelayOob {
        /// Stop after this many seconds (default: at end of input only).
        #[arg(long)]
        seconds: Option<f64>,
    },
}

/// What simulates the board top in `serve-sim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// The rust-hdl circuit.
    Rtl,
    /// The board top's Verilog through Verilator.
    Verilator,
}

/// Clock cycles per UART bit in the simulated board (fast; the baud rate of a PTY
/// means nothing).
const SIM_DIVISOR: u16 = 4;

/// Baud rate of both board UARTs (host bridge and OOB).
const BOARD_BAUD: u32 = 115_200;

/// Core clock from the PLL when the design cannot meet the board clock.
const PLL_MHZ: f64 = 25.0;

/// The design meets timing up to about this (nextpnr on an HX8K: ~35 MHz).
const DESIGN_MHZ: f64 = 30.0;

pub fn run(cmd: FpgaCmd) -> Result<()> {
    match cmd {
        FpgaCmd::Synth {
            board,
            out,
            core_mhz,
            width,
            serial,
            seeds,
        } => {
            check_width(width)?;
            let mut b = hilrig_flow::board::board(&board)?;
            let mhz = core_mhz.unwrap_or(if b.clock_mhz > DESIGN_MHZ {
                PLL_MHZ
            } else {
                b.clock_mhz
            });
            let pll = (mhz - b.clock_mhz).abs() > 1e-9;
            if pll {
                b = b.with_core_clock(mhz)?;
            }
            // The UART divisors follow the clock the core actually runs at.
            let hz = (b.core_clock_mhz() * 1e6).round() as u32;
            let p = BoardParams::for_clock(width, serial, hz, BOARD_BAUD);
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let v = out.join("board_top.v");
            std::fs::write(&v, hilrig_board::board_top_verilog(p))
                .with_context(|| format!("writing {}", v.display()))?;
            let opts = hilrig_flow::flow::PnrOptions {
                seeds,
                wrap_pll: pll,
                ..Default::default()
            };
            let r = hilrig_flow::flow::build(&[v], "top", &b, &out, &opts)?;
            println!("{r}");
            if !r.timing_met() {
                anyhow::bail!(
                    "timing not met on {} at {:.2} MHz (bitstream written anyway: {})",
                    b.name,
                    r.core_clock_mhz,
                    r.bitstream.display()
                );
            }
        }
        FpgaCmd::Lint { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let v = out.join("board_top.v");
            std::fs::write(
                &v,
                hilrig_board::board_top_verilog(BoardParams::board(8, 1)),
            )
            .with_context(|| format!("writing {}", v.display()))?;
            let waivers = hilrig_flow::flow::rust_hdl_waivers("*/board_top.v");
            let r = hilrig_flow::flow::lint(&[v], "top", &waivers, &out)?;
            println!(
                "lint clean ({} waivers for rust-hdl's generated code); log {}",
                waivers.len(),
                r.log.display()
            );
        }
        FpgaCmd::Program {
            board,
            bitstream,
            verify_only,
            usb_serial,
        } => {
            let b = hilrig_flow::board::board(&board)?;
            let bits = std::fs::read(&bitstream)
                .with_context(|| format!("reading the bitstream {}", bitstream.display()))?;
            let opts = hilrig_flow::program::ProgramOptions {
                serial: usb_serial,
                verify_only,
                ..Default::default()
            };
            let r = hilrig_flow::program::program(&b, &bits, &opts)?;
            println!(
                "{} {} bytes on {} (flash JEDEC id {:02x?}); CDONE {}; {:.1} s",
                if verify_only {
                    "verified"
                } else {
                    "programmed and verified"
                },
                r.verified,
                b.name,
                r.jedec_id,
                if r.cdone { "high" } else { "low" },
                r.elapsed.as_secs_f64()
            );
        }
        FpgaCmd::Boards => {
            for b in hilrig_flow::board::boards() {
                println!("{b}");
            }
        }
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
            engine,
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
            let sim = match engine {
                Engine::Rtl => SimBoard::with_nv(p, &nv),
                Engine::Verilator => {
                    hilrig_verilator::sim_board(p, &nv, &hilrig_verilator::BuildOptions::default())
                        .context("verilating the board top")?
                }
            };
            let board = PtyBoard::spawn(sim).context("opening the PTYs")?;
            println!("host {}", board.host_path());
            println!("oob {}", board.oob_path());
            let start = Instant::now();
            while seconds.is_none_or(|s| start.elapsed().as_secs_f64() < s) {
                std::thread::sleep(Duration::from_millis(50));
            }
            board.stop();
        }
        FpgaCmd::RelayOob { seconds } => relay_oob(seconds)?,
    }
    Ok(())
}

/// How long the relay waits for the controller's answer to one OOB frame.
const RELAY_REPLY: Duration = Duration::from_secs(5);

/// `hilrig fpga relay-oob`: OOB frames from a PTY out on standard output, their
/// answers in from standard input.
fn relay_oob(seconds: Option<f64>) -> Result<()> {
    use hilrig_device::oob::{FrameReader, PtyServer, StreamEvent};
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let server = PtyServer::new().context("creating a PTY")?;
    println!("oob {}", server.path());
    std::io::stdout().flush()?;
    let ended = std::sync::Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let end = ended.clone();
    std::thread::spawn(move || {
        let mut input = std::io::stdin().lock();
        let mut reader = FrameReader::default();
        let mut buf = [0u8; 512];
        loop {
            match input.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    for &b in &buf[..n] {
                        if let Some(StreamEvent::Frame(f)) = reader.push(b) {
                            if tx.send(f).is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        }
        end.store(true, Ordering::SeqCst);
    });
    // (Seconds too large for a Duration, or infinite: no deadline.)
    let deadline = seconds
        .and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok())
        .and_then(|d| Instant::now().checked_add(d));
    server.serve_with(
        &mut |req| {
            // An answer that came too late for an earlier request is not this one's.
            while rx.try_recv().is_ok() {}
            let mut out = std::io::stdout().lock();
            let sent = out.write_all(req).and_then(|_| out.flush());
            if let Err(e) = sent {
                return Err(hilrig_device::DeviceError::Transport {
                    what: "the relay's standard output".into(),
                    detail: e.to_string(),
                });
            }
            // No answer in time (or the input ended): none is made up.
            Ok(rx.recv_timeout(RELAY_REPLY).unwrap_or_default())
        },
        &|| ended.load(Ordering::SeqCst) || deadline.is_some_and(|d| Instant::now() > d),
    )?;
    Ok(())
}

fn check_width(width: u8) -> Result<()> {
    if !(1..=64).contains(&width) {
        anyhow::bail!("--width {width}: the counter width is 1..=64");
    }
    Ok(())
}

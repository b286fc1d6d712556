//! clap subcommands for the `hilrig` binary: `synth`, `lint`, `program`, `boards`.
//!
//! Wire in with `#[command(flatten)]` or as a nested subcommand, and call
//! [`run`] with stdout.

use crate::board::{self, BoardError};
use crate::flow::{self, FlowError};
use crate::program::{self, ProgError, ProgramOptions};
use std::io::Write;
use std::path::PathBuf;

/// The FPGA flow subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum FlowCommand {
    /// Synthesize, place and route and pack a design for a board; print LUTs, BRAMs,
    /// fmax against the clock and the bitstream path.
    Synth(SynthArgs),
    /// Lint Verilog with `verilator --lint-only -Wall` (waivers only for rust-hdl
    /// generated files named with --rust-hdl).
    Lint(LintArgs),
    /// Write a bitstream into a board's SPI flash over its FTDI chip and verify it.
    Program(ProgramArgs),
    /// List the known boards.
    Boards,
}

/// `synth` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SynthArgs {
    /// Board name (see `boards`).
    #[arg(long)]
    pub board: String,
    /// Verilog file(s).
    #[arg(long, required = true, num_args = 1..)]
    pub verilog: Vec<PathBuf>,
    /// Top module.
    #[arg(long)]
    pub top: String,
    /// Output directory.
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Run the design from an SB_PLL40_CORE at about this many MHz; timing is checked
    /// against the PLL output. The top instantiates `hilrig_pll` itself, or (with
    /// --wrap-pll) the flow wraps a PLL-free top in `hilrig_pll_top`.
    #[arg(long)]
    pub core_mhz: Option<f64>,
    /// Wrap the PLL-free top in `hilrig_pll_top`, which clocks it from the PLL.
    #[arg(long, requires = "core_mhz")]
    pub wrap_pll: bool,
    /// nextpnr placer seeds, tried in order while routing stalls.
    #[arg(long = "seed", num_args = 1.., default_values_t = [1u64, 2, 3, 4])]
    pub seeds: Vec<u64>,
    /// Give up on a seed when routing has not improved for this many seconds.
    #[arg(long, default_value_t = 90)]
    pub stall_seconds: u64,
    /// nextpnr router (router1, router2).
    #[arg(long, default_value = "router1")]
    pub router: String,
    /// Stop nextpnr after this many minutes.
    #[arg(long, default_value_t = 30)]
    pub pnr_minutes: u64,
    /// Exit successfully even when timing is not met.
    #[arg(long)]
    pub allow_timing_fail: bool,
}

/// `lint` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct LintArgs {
    /// Hand-written Verilog file(s): nothing is waived in them.
    #[arg(long, num_args = 1..)]
    pub verilog: Vec<PathBuf>,
    /// rust-hdl generated Verilog file(s): the rust-hdl waivers apply to these only.
    #[arg(long = "rust-hdl", num_args = 1..)]
    pub rust_hdl: Vec<PathBuf>,
    /// Top module.
    #[arg(long)]
    pub top: String,
    /// Output directory (log and waiver file).
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
}

/// `program` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ProgramArgs {
    /// Board name (see `boards`).
    #[arg(long)]
    pub board: String,
    /// The bitstream (`.bin` from icepack).
    pub bitstream: PathBuf,
    /// Compare the flash with the bitstream; write nothing.
    #[arg(long)]
    pub verify_only: bool,
    /// FTDI serial number, when several boards are attached.
    #[arg(long)]
    pub serial: Option<String>,
    /// USB bus:address, when several boards are attached.
    #[arg(long, value_parser = parse_bus_addr)]
    pub bus_addr: Option<(u8, u8)>,
    /// SPI clock in kHz.
    #[arg(long, default_value_t = 6000)]
    pub spi_khz: u32,
}

/// A `--bus-addr` argument that is not `BUS:ADDR`.
#[derive(Debug, thiserror::Error)]
pub enum BusAddrError {
    /// No colon.
    #[error("{0:?}: expected BUS:ADDR, e.g. 001:004")]
    Form(String),
    /// A part is not a number from 0 to 255.
    #[error("{input:?}: {part:?} is not a bus/address number: {source}")]
    Number {
        /// The whole argument.
        input: String,
        /// The bad part.
        part: String,
        /// Why.
        source: std::num::ParseIntError,
    },
}

fn parse_bus_addr(s: &str) -> Result<(u8, u8), BusAddrError> {
    let (b, a) = s
        .split_once(':')
        .ok_or_else(|| BusAddrError::Form(s.to_string()))?;
    let p = |x: &str| {
        x.parse::<u8>().map_err(|source| BusAddrError::Number {
            input: s.to_string(),
            part: x.to_string(),
            source,
        })
    };
    Ok((p(b)?, p(a)?))
}

/// A subcommand failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Board lookup.
    #[error(transparent)]
    Board(#[from] BoardError),
    /// The tool flow.
    #[error(transparent)]
    Flow(#[from] FlowError),
    /// Programming.
    #[error(transparent)]
    Program(#[from] ProgError),
    /// Reading the bitstream or writing output.
    #[error("{what} {path}: {source}")]
    Io {
        /// What.
        what: &'static str,
        /// Which file ("stdout" for output).
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Timing was not met (and `--allow-timing-fail` was not given).
    #[error("timing not met on board {board}: {detail} (bitstream written anyway: {bitstream}); use a PLL (--core-mhz) or --allow-timing-fail")]
    TimingNotMet {
        /// Board.
        board: &'static str,
        /// Per clock.
        detail: String,
        /// The bitstream.
        bitstream: PathBuf,
    },
}

fn out_err(source: std::io::Error) -> CliError {
    CliError::Io {
        what: "writing",
        path: "stdout".into(),
        source,
    }
}

/// Run `cmd`, printing to `out`.
pub fn run(cmd: &FlowCommand, out: &mut dyn Write) -> Result<(), CliError> {
    match cmd {
        FlowCommand::Boards => {
            for b in board::boards() {
                writeln!(out, "{b}").map_err(out_err)?;
            }
        }
        FlowCommand::Lint(a) => {
            let mut files = a.rust_hdl.clone();
            files.extend(a.verilog.iter().cloned());
            let mut waivers = Vec::new();
            for g in &a.rust_hdl {
                let name = g
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                waivers.extend(flow::rust_hdl_waivers(&format!("*/{name}")));
            }
            let r = flow::lint(&files, &a.top, &waivers, &a.out)?;
            writeln!(
                out,
                "lint clean ({} waiver(s) for rust-hdl files); log {}",
                waivers.len(),
                r.log.display()
            )
            .map_err(out_err)?;
        }
        FlowCommand::Synth(a) => {
            let mut b = board::board(&a.board)?;
            if let Some(mhz) = a.core_mhz {
                b = b.with_core_clock(mhz)?;
            }
            let opts = flow::PnrOptions {
                seeds: a.seeds.clone(),
                stall: std::time::Duration::from_secs(a.stall_seconds),
                wrap_pll: a.wrap_pll,
                router: a.router.clone(),
                timeout: std::time::Duration::from_secs(a.pnr_minutes.saturating_mul(60)),
            };
            let r = flow::build(&a.verilog, &a.top, &b, &a.out, &opts)?;
            writeln!(out, "{r}").map_err(out_err)?;
            if !r.timing_met() && !a.allow_timing_fail {
                return Err(CliError::TimingNotMet {
                    board: b.name,
                    detail: r
                        .pnr
                        .clocks
                        .iter()
                        .map(|c| {
                            format!("{} {:.2} MHz < {:.2} MHz", c.net, c.fmax_mhz, c.target_mhz)
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    bitstream: r.bitstream,
                });
            }
        }
        FlowCommand::Program(a) => {
            let b = board::board(&a.board)?;
            let bits = std::fs::read(&a.bitstream).map_err(|source| CliError::Io {
                what: "reading bitstream",
                path: a.bitstream.clone(),
                source,
            })?;
            let opts = ProgramOptions {
                serial: a.serial.clone(),
                bus_addr: a.bus_addr,
                verify_only: a.verify_only,
                spi_hz: a.spi_khz.saturating_mul(1000),
                ..Default::default()
            };
            let r = program::program(&b, &bits, &opts)?;
            writeln!(
                out,
                "{} {} bytes on {} (flash {:02x?}, {} bytes; {} erased, {} pages); CDONE {}; {:.1} s",
                if a.verify_only { "verified" } else { "programmed and verified" },
                r.verified,
                b.name,
                r.jedec_id,
                r.flash_bytes,
                r.erased,
                r.pages,
                if r.cdone { "high" } else { "low" },
                r.elapsed.as_secs_f64()
            )
            .map_err(out_err)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: FlowCommand,
    }

    #[test]
    fn parses_and_runs_boards_and_program_errors() {
        let c = Cli::try_parse_from([
            "hilrig",
            "synth",
            "--board",
            "alchitry-cu",
            "--verilog",
            "a.v",
            "b.v",
            "--top",
            "t",
            "-o",
            "out",
        ])
        .unwrap();
        match c.cmd {
            FlowCommand::Synth(a) => assert_eq!(a.verilog.len(), 2),
            other => panic!("{other:?}"),
        }
        let c = Cli::try_parse_from([
            "hilrig",
            "program",
            "--board",
            "icebreaker",
            "x.bin",
            "--verify-only",
            "--bus-addr",
            "1:4",
        ])
        .unwrap();
        let FlowCommand::Program(p) = &c.cmd else {
            panic!("{c:?}")
        };
        assert_eq!((p.bus_addr, p.verify_only), (Some((1, 4)), true));
        assert!(Cli::try_parse_from([
            "hilrig",
            "program",
            "--board",
            "x",
            "b",
            "--bus-addr",
            "14"
        ])
        .is_err());

        let mut out = Vec::new();
        run(&FlowCommand::Boards, &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("alchitry-cu") && s.contains("icebreaker"), "{s}");

        let e = run(&c.cmd, &mut Vec::new()).unwrap_err().to_string();
        assert!(e.contains("reading bitstream x.bin"), "{e}");
        let mut bad = p.clone();
        bad.board = "nope".into();
        let e = run(&FlowCommand::Program(bad), &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("known boards: alchitry-cu, icebreaker"), "{e}");
    }
}

//! Board definitions: the iCE40 part and package for nextpnr, the clock, the pin
//! constraints of the hilrig board-top port contract, and the FTDI programmer.
//!
//! # Port contract
//!
//! The top module the flow builds for a board has exactly these ports (the PCF names
//! them; nextpnr refuses a design that lacks one):
//!
//! | port | dir | meaning |
//! |---|---|---|
//! | `clock` | in | the board oscillator ([`Board::clock_mhz`]) |
//! | `uart_rx` | in | host bridge UART, from the board's FTDI (host -> FPGA) |
//! | `uart_tx` | out | host bridge UART, to the board's FTDI (FPGA -> host) |
//! | `oob_rx` | in | OOB UART on a header (rig -> device) |
//! | `oob_tx` | out | OOB UART on a header (device -> rig) |
//! | `leds[7:0]` | out | eight status outputs (LEDs where the board has them) |
//! | `reset_n` | in | optional: the board's reset button, active low (`-nowarn`) |
//!
//! With a PLL configured ([`Board::with_core_clock`]) the top instantiates
//! [`PLL_MODULE`] (its Verilog is written by [`pll_verilog`]) and runs the core on
//! its output.

use std::fmt::{self, Write};

/// The iCE40 part of a board.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// iCE40HX8K: 7,680 logic cells, 32 block RAMs.
    Hx8k,
    /// iCE40UP5K: 5,280 logic cells, 30 block RAMs.
    Up5k,
}

impl Device {
    /// The nextpnr-ice40 device flag (`--hx8k`, `--up5k`).
    pub fn nextpnr_flag(self) -> &'static str {
        match self {
            Device::Hx8k => "--hx8k",
            Device::Up5k => "--up5k",
        }
    }
    /// Logic cells (one LUT4 + one flip-flop each).
    pub fn luts(self) -> u32 {
        match self {
            Device::Hx8k => 7680,
            Device::Up5k => 5280,
        }
    }
    /// 4 Kbit block RAMs (`SB_RAM40_4K`).
    pub fn brams(self) -> u32 {
        match self {
            Device::Hx8k => 32,
            Device::Up5k => 30,
        }
    }
}

/// An output pin for one of the eight `leds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedPin {
    /// Package pin.
    pub pin: &'static str,
    /// Where it goes on the board ("on-board LED", "header ...").
    pub note: &'static str,
}

/// How the FPGA's configuration flash is reached over the board's FTDI chip
/// (the iceprog wiring: ADBUS0 SCK, ADBUS1 MOSI, ADBUS2 MISO, plus the GPIOs here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsbProgrammer {
    /// USB vendor ID.
    pub vid: u16,
    /// USB product ID.
    pub pid: u16,
    /// FTDI interface used for MPSSE (0 = A, 1 = B).
    pub interface: u8,
    /// ADBUS bit of the flash chip select (active low).
    pub cs_bit: u8,
    /// ADBUS bit of the FPGA's CRESET_B (low holds the FPGA in reset).
    pub creset_bit: u8,
    /// ADBUS bit of the FPGA's CDONE (input).
    pub cdone_bit: u8,
}

impl UsbProgrammer {
    /// The FT2232H of iceprog-compatible boards: 0403:6010, interface A,
    /// CS on ADBUS4, CDONE on ADBUS6, CRESET_B on ADBUS7.
    pub const FT2232H_ICEPROG: UsbProgrammer = UsbProgrammer {
        vid: 0x0403,
        pid: 0x6010,
        interface: 0,
        cs_bit: 4,
        creset_bit: 7,
        cdone_bit: 6,
    };
}

/// SB_PLL40_CORE parameters (simple feedback), as `icepll` computes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PllParams {
    /// Input frequency in MHz.
    pub f_in: f64,
    /// Requested output frequency in MHz.
    pub f_requested: f64,
    /// Achieved output frequency in MHz.
    pub f_out: f64,
    /// Reference divider (DIVR, 0..=15).
    pub divr: u8,
    /// Feedback divider (DIVF, 0..=127).
    pub divf: u8,
    /// Output divider (DIVQ, 1..=6).
    pub divq: u8,
    /// Loop filter range (FILTER_RANGE, 1..=6).
    pub filter_range: u8,
    /// `SB_PLL40_PAD` (the clock pin is the PLL's own pad, as on the UP5K's pin 35)
    /// instead of `SB_PLL40_CORE`.
    pub pad: bool,
}

/// The PLL could not be set up.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PllError {
    /// No DIVR/DIVF/DIVQ reaches the request within the iCE40 PLL's limits.
    #[error("no SB_PLL40_CORE setting makes {f_out} MHz from {f_in} MHz (PFD 10-133 MHz, VCO 533-1066 MHz, output 16-275 MHz)")]
    Unreachable {
        /// Input MHz.
        f_in: f64,
        /// Requested output MHz.
        f_out: f64,
    },
}

impl PllParams {
    /// The `icepll` search (simple feedback): the first setting closest to `f_out`.
    pub fn compute(f_in: f64, f_out: f64) -> Result<PllParams, PllError> {
        let bad = PllError::Unreachable { f_in, f_out };
        if !(16.0..=275.0).contains(&f_out) || !(10.0..=133.0).contains(&f_in) {
            return Err(bad);
        }
        let mut best: Option<PllParams> = None;
        for divr in 0u8..=15 {
            let f_pfd = f_in / f64::from(divr + 1);
            if !(10.0..=133.0).contains(&f_pfd) {
                continue;
            }
            for divf in 0u8..=127 {
                let f_vco = f_pfd * f64::from(divf + 1);
                if !(533.0..=1066.0).contains(&f_vco) {
                    continue;
                }
                for divq in 1u8..=6 {
                    let fo = f_vco / f64::from(1u32 << divq);
                    let better = best
                        .map(|b| (fo - f_out).abs() < (b.f_out - f_out).abs())
                        .unwrap_or(true);
                    if better {
                        best = Some(PllParams {
                            f_in,
                            f_requested: f_out,
                            f_out: fo,
                            divr,
                            divf,
                            divq,
                            filter_range: filter_range(f_pfd),
                            pad: false,
                        });
                    }
                }
            }
        }
        best.ok_or(bad)
    }
}

fn filter_range(f_pfd: f64) -> u8 {
    match f_pfd {
        f if f < 17.0 => 1,
        f if f < 26.0 => 2,
        f if f < 44.0 => 3,
        f if f < 66.0 => 4,
        f if f < 101.0 => 5,
        _ => 6,
    }
}

/// The module name of the PLL wrapper: `hilrig_pll(input clock_in, output clock_out,
/// output locked)`.
pub const PLL_MODULE: &str = "hilrig_pll";

/// The Verilog of [`PLL_MODULE`] for `p` (an `SB_PLL40_CORE`, or `SB_PLL40_PAD` fed
/// straight from the clock pad when `p.pad`; simple feedback).
pub fn pll_verilog(p: &PllParams) -> String {
    let (prim, input) = if p.pad {
        ("SB_PLL40_PAD", "PACKAGEPIN")
    } else {
        ("SB_PLL40_CORE", "REFERENCECLK")
    };
    format!(
        "// {PLL_MODULE}: {fi:.3} MHz in, {fo:.3} MHz out (requested {fr:.3}); written by hilrig-flow\n\
         module {PLL_MODULE}(input wire clock_in, output wire clock_out, output wire locked);\n\
         \x20   {prim} #(\n\
         \x20       .FEEDBACK_PATH(\"SIMPLE\"),\n\
         \x20       .DIVR(4'd{divr}),\n\
         \x20       .DIVF(7'd{divf}),\n\
         \x20       .DIVQ(3'd{divq}),\n\
         \x20       .FILTER_RANGE(3'd{fr_})\n\
         \x20   ) pll (\n\
         \x20       .{input}(clock_in),\n\
         \x20       .PLLOUTGLOBAL(clock_out),\n\
         \x20       .LOCK(locked),\n\
         \x20       .RESETB(1'b1),\n\
         \x20       .BYPASS(1'b0)\n\
         \x20   );\n\
         endmodule\n",
        fi = p.f_in,
        fo = p.f_out,
        fr = p.f_requested,
        divr = p.divr,
        divf = p.divf,
        divq = p.divq,
        fr_ = p.filter_range,
    )
}

/// The module name of the wrapper [`pll_wrapper`] writes.
pub const PLL_WRAPPER: &str = "hilrig_pll_top";

/// A top with the port contract that runs the PLL-free top `inner` (same ports,
/// `clock` included) from [`PLL_MODULE`]'s output: so a board top needs no PLL of its
/// own. `locked` is not used: the inner top's power-on reset must outlast the PLL's
/// lock time (under 50 us for SB_PLL40_CORE), or its `clock` domain must tolerate it.
pub fn pll_wrapper(inner: &str) -> String {
    format!(
        "// {PLL_WRAPPER}: {inner} clocked from {PLL_MODULE}; written by hilrig-flow\n\
         module {PLL_WRAPPER}(\n\
         \x20   input wire clock, input wire uart_rx, output wire uart_tx,\n\
         \x20   input wire oob_rx, output wire oob_tx, output wire [7:0] leds\n\
         );\n\
         \x20   wire core_clock;\n\
         \x20   wire locked;\n\
         \x20   {PLL_MODULE} pll (.clock_in(clock), .clock_out(core_clock), .locked(locked));\n\
         \x20   {inner} inner (\n\
         \x20       .clock(core_clock), .uart_rx(uart_rx), .uart_tx(uart_tx),\n\
         \x20       .oob_rx(oob_rx), .oob_tx(oob_tx), .leds(leds)\n\
         \x20   );\n\
         endmodule\n"
    )
}

/// A behavioural [`PLL_MODULE`] for lint and simulation (verilator and Icarus do not
/// know `SB_PLL40_CORE`): the output is the input, locked at once.
pub fn pll_lint_stub() -> String {
    format!(
        "// {PLL_MODULE} for lint/simulation only, written by hilrig-flow\n\
         module {PLL_MODULE}(input wire clock_in, output wire clock_out, output wire locked);\n\
         \x20   assign clock_out = clock_in;\n\
         \x20   assign locked = 1'b1;\n\
         endmodule\n"
    )
}

/// A board: everything the flow and the programmer need to know about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Board {
    /// Lookup name (`alchitry-cu`).
    pub name: &'static str,
    /// One line for people.
    pub description: &'static str,
    /// The iCE40 part.
    pub device: Device,
    /// The nextpnr `--package`.
    pub package: &'static str,
    /// Clock input pin.
    pub clock_pin: &'static str,
    /// Board oscillator in MHz.
    pub clock_mhz: f64,
    /// Reset button pin (active low), if the board has one: optional port `reset_n`.
    pub reset_pin: Option<&'static str>,
    /// Host bridge UART: FPGA input from the FTDI.
    pub uart_rx_pin: &'static str,
    /// Host bridge UART: FPGA output to the FTDI.
    pub uart_tx_pin: &'static str,
    /// OOB UART on a header: FPGA input.
    pub oob_rx_pin: &'static str,
    /// OOB UART on a header: FPGA output.
    pub oob_tx_pin: &'static str,
    /// Where the OOB pins are on the board, for the person wiring it.
    pub oob_note: &'static str,
    /// `leds[0]` .. `leds[7]`.
    pub leds: [LedPin; 8],
    /// The FTDI chip that programs the flash.
    pub usb: UsbProgrammer,
    /// The configuration flash size the board is built with, in bytes (a smaller
    /// JEDEC size than the bitstream is refused).
    pub flash_min_bytes: u32,
    /// A PLL that makes the core clock from the board clock, if set.
    pub pll: Option<PllParams>,
    /// The clock pin is a PLL pad: use `SB_PLL40_PAD`.
    pub pll_pad: bool,
}

/// Lookup failed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BoardError {
    /// No board of that name.
    #[error("unknown board {name:?}; known boards: {known}")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
    /// The PLL request could not be met.
    #[error("board {board}: {source}")]
    Pll {
        /// Board name.
        board: &'static str,
        /// Why.
        #[source]
        source: PllError,
    },
}

impl Board {
    /// The clock the core runs at: the PLL output if one is set, else the board clock.
    pub fn core_clock_mhz(&self) -> f64 {
        self.pll.map(|p| p.f_out).unwrap_or(self.clock_mhz)
    }

    /// This board with an SB_PLL40_CORE making about `mhz` for the core (the flow
    /// then checks timing against the PLL's achieved output).
    pub fn with_core_clock(mut self, mhz: f64) -> Result<Board, BoardError> {
        let p = PllParams::compute(self.clock_mhz, mhz).map_err(|source| BoardError::Pll {
            board: self.name,
            source,
        })?;
        self.pll = Some(PllParams {
            pad: self.pll_pad,
            ..p
        });
        Ok(self)
    }

    /// The PCF text: every port of the contract, plus `set_frequency` on `clock`.
    pub fn pcf(&self) -> String {
        let mut s = format!(
            "# {} ({}), written by hilrig-flow\nset_io clock {}\nset_frequency clock {}\n",
            self.name, self.description, self.clock_pin, self.clock_mhz
        );
        if let Some(r) = self.reset_pin {
            let _ = writeln!(s, "set_io -nowarn reset_n {r}");
        }
        let _ = writeln!(s, "set_io uart_rx {}", self.uart_rx_pin);
        let _ = writeln!(s, "set_io uart_tx {}", self.uart_tx_pin);
        let _ = writeln!(s, "# OOB UART: {}", self.oob_note);
        let _ = writeln!(s, "set_io oob_rx {}", self.oob_rx_pin);
        let _ = writeln!(s, "set_io oob_tx {}", self.oob_tx_pin);
        for (i, l) in self.leds.iter().enumerate() {
            let _ = writeln!(s, "set_io leds[{i}] {} # {}", l.pin, l.note);
        }
        s
    }
}

impl fmt::Display for Board {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<12} {} ({:?} {}, {} MHz clock on {}, FTDI {:04x}:{:04x} interface {})",
            self.name,
            self.description,
            self.device,
            self.package,
            self.clock_mhz,
            self.clock_pin,
            self.usb.vid,
            self.usb.pid,
            (b'A' + self.usb.interface) as char
        )
    }
}

/// Alchitry Cu: iCE40HX8K-CB132, 100 MHz oscillator on P7, reset button on P8, eight
/// LEDs, FT2232H (interface A: flash over MPSSE, interface B: UART on P14/M9).
/// OOB UART on connector bank B pins 40 (C11, rx) and 39 (C12, tx).
pub fn alchitry_cu() -> Board {
    const fn led(pin: &'static str) -> LedPin {
        LedPin {
            pin,
            note: "on-board LED",
        }
    }
    Board {
        name: "alchitry-cu",
        description: "Alchitry Cu, iCE40HX8K-CB132",
        device: Device::Hx8k,
        package: "cb132",
        clock_pin: "P7",
        clock_mhz: 100.0,
        reset_pin: Some("P8"),
        uart_rx_pin: "P14",
        uart_tx_pin: "M9",
        oob_rx_pin: "C11",
        oob_tx_pin: "C12",
        oob_note: "connector bank B pin 40 (C11, IOT_174) = oob_rx, pin 39 (C12, IOT_172) = oob_tx; on the Io element board these are DIP switches 1 and 2, so use a Br breakout",
        leds: [
            led("J11"),
            led("K11"),
            led("K12"),
            led("K14"),
            led("L12"),
            led("L14"),
            led("M12"),
            led("N14"),
        ],
        usb: UsbProgrammer::FT2232H_ICEPROG,
        flash_min_bytes: 1 << 20,
        pll: None,
        pll_pad: false,
    }
}

/// 1BitSquared iCEBreaker: iCE40UP5K-SG48, 12 MHz on pin 35, user button BTN_N on
/// 10, FT2232H (interface A: flash, interface B: UART on 6/9). Only two on-board
/// LEDs (red 11, green 37, both active low); `leds[2..7]` are the five LEDs of the
/// break-off PMOD (on PMOD2) and `leds[7]` is PMOD1A pin 3. OOB UART on PMOD1A
/// pins 1 (4, rx) and 2 (2, tx).
pub fn icebreaker() -> Board {
    Board {
        name: "icebreaker",
        description: "1BitSquared iCEBreaker, iCE40UP5K-SG48",
        device: Device::Up5k,
        package: "sg48",
        clock_pin: "35",
        clock_mhz: 12.0,
        reset_pin: Some("10"),
        uart_rx_pin: "6",
        uart_tx_pin: "9",
        oob_rx_pin: "4",
        oob_tx_pin: "2",
        oob_note: "PMOD1A pin 1 (4) = oob_rx, PMOD1A pin 2 (2) = oob_tx",
        leds: [
            LedPin {
                pin: "11",
                note: "on-board red LED, active low",
            },
            LedPin {
                pin: "37",
                note: "on-board green LED, active low",
            },
            LedPin {
                pin: "26",
                note: "break-off PMOD2 LED1",
            },
            LedPin {
                pin: "27",
                note: "break-off PMOD2 LED2",
            },
            LedPin {
                pin: "25",
                note: "break-off PMOD2 LED3",
            },
            LedPin {
                pin: "23",
                note: "break-off PMOD2 LED4",
            },
            LedPin {
                pin: "21",
                note: "break-off PMOD2 LED5",
            },
            LedPin {
                pin: "47",
                note: "header PMOD1A pin 3 (no LED)",
            },
        ],
        usb: UsbProgrammer::FT2232H_ICEPROG,
        flash_min_bytes: 1 << 20,
        pll: None,
        // Pin 35 (IOT_46b_G0) is the PLL's pad: SB_PLL40_CORE cannot be placed.
        pll_pad: true,
    }
}

/// All known boards.
pub fn boards() -> Vec<Board> {
    vec![alchitry_cu(), icebreaker()]
}

/// The board called `name` (case-insensitive; `_` and `-` alike).
pub fn board(name: &str) -> Result<Board, BoardError> {
    let norm = name.trim().to_ascii_lowercase().replace('_', "-");
    boards()
        .into_iter()
        .find(|b| b.name == norm)
        .ok_or_else(|| BoardError::Unknown {
            name: name.to_string(),
            known: boards()
                .iter()
                .map(|b| b.name)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_and_unknown() {
        assert_eq!(board("Alchitry_Cu").map(|b| b.name), Ok("alchitry-cu"));
        assert_eq!(board("icebreaker").map(|b| b.device), Ok(Device::Up5k));
        let e = board("de0-nano").unwrap_err().to_string();
        assert!(
            e.contains("de0-nano") && e.contains("alchitry-cu, icebreaker"),
            "{e}"
        );
    }

    #[test]
    fn pcf_names_every_port_once_and_pins_are_distinct() {
        for b in boards() {
            let pcf = b.pcf();
            for port in ["clock", "uart_rx", "uart_tx", "oob_rx", "oob_tx"] {
                assert_eq!(
                    pcf.lines()
                        .filter(|l| l.starts_with(&format!("set_io {port} ")))
                        .count(),
                    1,
                    "{}: {port}",
                    b.name
                );
            }
            let mut pins: Vec<&str> = pcf
                .lines()
                .filter(|l| l.starts_with("set_io"))
                .filter_map(|l| l.split('#').next()?.split_whitespace().last())
                .collect();
            assert_eq!(pins.len(), 14, "{}", b.name);
            pins.sort_unstable();
            pins.dedup();
            assert_eq!(pins.len(), 14, "{}: a pin is used twice", b.name);
        }
    }

    #[test]
    fn pll_matches_icepll() {
        // Figures printed by `icepll -i 100 -o 50`, `-i 100 -o 33`, `-i 12 -o 25`.
        let p = PllParams::compute(100.0, 50.0).unwrap();
        assert_eq!((p.divr, p.divf, p.divq, p.filter_range), (0, 7, 4, 5));
        assert_eq!(p.f_out, 50.0);
        let p = PllParams::compute(100.0, 33.0).unwrap();
        assert_eq!((p.divr, p.divf, p.divq, p.filter_range), (8, 94, 5, 1));
        assert!((p.f_out - 32.986).abs() < 0.001);
        let p = PllParams::compute(12.0, 25.0).unwrap();
        assert_eq!((p.divr, p.divf, p.divq, p.filter_range), (0, 66, 5, 1));
        assert!(PllParams::compute(100.0, 5.0).is_err());
        let b = alchitry_cu().with_core_clock(50.0).unwrap();
        assert_eq!(b.core_clock_mhz(), 50.0);
        let v = pll_verilog(&b.pll.unwrap());
        assert!(
            v.contains(".DIVF(7'd7)") && v.contains("SB_PLL40_CORE"),
            "{v}"
        );
        let v = pll_verilog(&icebreaker().with_core_clock(48.0).unwrap().pll.unwrap());
        assert!(
            v.contains("SB_PLL40_PAD") && v.contains(".PACKAGEPIN(clock_in)"),
            "{v}"
        );
    }
}

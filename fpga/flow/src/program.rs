//! Writing an iCE40 board's configuration flash over FTDI MPSSE, as iceprog does:
//! hold the FPGA in reset (CRESET_B low), wake the flash, check its JEDEC ID, erase
//! 64 KiB blocks, program 256-byte pages with status polling, read back and verify,
//! put the flash to sleep and release CRESET_B.

use crate::board::Board;
use crate::mpsse::{self, Flash, Mpsse, MpsseError, Pins, Transport};
use crate::usb::{OpenError, RusbTransport, Selector};
use std::time::{Duration, Instant};

/// How to program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramOptions {
    /// Only the FTDI device with this serial number.
    pub serial: Option<String>,
    /// Only the device at this USB bus and address.
    pub bus_addr: Option<(u8, u8)>,
    /// Compare the flash with the bitstream; write nothing.
    pub verify_only: bool,
    /// SPI clock in Hz (iceprog: 6 MHz).
    pub spi_hz: u32,
    /// Longest wait for one erase or page program.
    pub busy_timeout: Duration,
    /// Refuse a flash whose JEDEC ID differs.
    pub expect_jedec: Option<[u8; 3]>,
    /// Erase 4 KiB sectors (0x20) instead of 64 KiB blocks (0xD8).
    pub sector_erase: bool,
}

impl Default for ProgramOptions {
    fn default() -> Self {
        ProgramOptions {
            serial: None,
            bus_addr: None,
            verify_only: false,
            spi_hz: 6_000_000,
            busy_timeout: Duration::from_secs(5),
            expect_jedec: None,
            sector_erase: false,
        }
    }
}

/// What programming did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The flash's JEDEC ID.
    pub jedec_id: [u8; 3],
    /// Flash size from the ID, in bytes.
    pub flash_bytes: u64,
    /// Blocks or sectors erased.
    pub erased: u32,
    /// Pages programmed.
    pub pages: u32,
    /// Bytes verified equal.
    pub verified: usize,
    /// CDONE after releasing CRESET_B (the FPGA configured itself).
    pub cdone: bool,
    /// Time taken.
    pub elapsed: Duration,
}

/// Programming failed.
#[derive(Debug, thiserror::Error)]
pub enum ProgError {
    /// Nothing to write.
    #[error("the bitstream is empty")]
    EmptyBitstream,
    /// The USB device could not be opened.
    #[error("board {board}: {source}")]
    Open {
        /// Board name.
        board: &'static str,
        /// Why.
        #[source]
        source: OpenError,
    },
    /// An MPSSE or flash step failed.
    #[error("board {board}: {step}: {source}")]
    Mpsse {
        /// Board name.
        board: &'static str,
        /// The step.
        step: &'static str,
        /// Why.
        #[source]
        source: MpsseError,
    },
    /// No flash answered.
    #[error("board {board}: no SPI flash answered on FTDI interface {interface} (JEDEC ID {id:02x?}): wrong board or interface, or the flash is not wired to the FTDI chip")]
    NoFlash {
        /// Board name.
        board: &'static str,
        /// Interface letter.
        interface: char,
        /// What 0x9F returned.
        id: [u8; 3],
    },
    /// The flash is not the one expected.
    #[error("board {board}: flash JEDEC ID {got:02x?} is not the expected {expected:02x?} (wrong board?)")]
    WrongFlash {
        /// Board name.
        board: &'static str,
        /// Expected.
        expected: [u8; 3],
        /// Read.
        got: [u8; 3],
    },
    /// The bitstream is larger than the flash.
    #[error("board {board}: bitstream of {bitstream} bytes does not fit the {flash}-byte flash (JEDEC ID {id:02x?})")]
    TooLarge {
        /// Board name.
        board: &'static str,
        /// Bitstream size.
        bitstream: usize,
        /// Flash size.
        flash: u64,
        /// ID.
        id: [u8; 3],
    },
    /// Read-back differs.
    #[error("board {board}: verify failed: {mismatches} byte(s) differ, first at 0x{addr:06x}: flash has 0x{got:02x}, bitstream 0x{expected:02x}")]
    Verify {
        /// Board name.
        board: &'static str,
        /// First differing address.
        addr: u32,
        /// Bitstream byte.
        expected: u8,
        /// Flash byte.
        got: u8,
        /// How many differ.
        mismatches: usize,
    },
}

/// Flash size from a JEDEC ID's capacity byte (2^n bytes), if plausible.
pub fn jedec_size(id: [u8; 3]) -> Option<u64> {
    (0x10..=0x22).contains(&id[2]).then(|| 1u64 << id[2])
}

/// Program (or, with `verify_only`, verify) `bitstream` into the flash of `board`
/// over USB.
pub fn program(
    board: &Board,
    bitstream: &[u8],
    opts: &ProgramOptions,
) -> Result<Report, ProgError> {
    if bitstream.is_empty() {
        return Err(ProgError::EmptyBitstream);
    }
    let sel = Selector {
        vid: board.usb.vid,
        pid: board.usb.pid,
        interface: board.usb.interface,
        serial: opts.serial.clone(),
        bus_addr: opts.bus_addr,
    };
    let t = RusbTransport::open(&sel).map_err(|source| ProgError::Open {
        board: board.name,
        source,
    })?;
    program_with(t, board, bitstream, opts)
}

/// [`program`] over any transport (the simulated peer in tests).
pub fn program_with<T: Transport>(
    t: T,
    board: &Board,
    bitstream: &[u8],
    opts: &ProgramOptions,
) -> Result<Report, ProgError> {
    if bitstream.is_empty() {
        return Err(ProgError::EmptyBitstream);
    }
    let t0 = Instant::now();
    let name = board.name;
    let pins = Pins {
        cs: board.usb.cs_bit,
        creset: board.usb.creset_bit,
        cdone: board.usb.cdone_bit,
    };
    let err = |step: &'static str| {
        move |source: MpsseError| ProgError::Mpsse {
            board: name,
            step,
            source,
        }
    };
    let mut m = Mpsse::new(t, board.usb.interface, pins);
    m.init(opts.spi_hz).map_err(err("MPSSE init"))?;
    // Hold the FPGA in reset, CS high, and give it 100 us.
    m.set_pins(false, false)
        .map_err(err("hold FPGA in reset"))?;
    std::thread::sleep(Duration::from_micros(100));
    let mut f = Flash {
        m: &mut m,
        busy_timeout: opts.busy_timeout,
    };
    f.release_power_down()
        .map_err(err("flash release power-down"))?;
    std::thread::sleep(Duration::from_micros(50));
    let id = f.jedec_id().map_err(err("read JEDEC ID"))?;
    if id == [0xFF; 3] || id == [0; 3] {
        return Err(ProgError::NoFlash {
            board: name,
            interface: (b'A' + board.usb.interface) as char,
            id,
        });
    }
    if let Some(expected) = opts.expect_jedec {
        if expected != id {
            return Err(ProgError::WrongFlash {
                board: name,
                expected,
                got: id,
            });
        }
    }
    let flash_bytes = jedec_size(id).unwrap_or(u64::from(board.flash_min_bytes));
    if bitstream.len() as u64 > flash_bytes {
        return Err(ProgError::TooLarge {
            board: name,
            bitstream: bitstream.len(),
            flash: flash_bytes,
            id,
        });
    }
    let (mut erased, mut pages) = (0u32, 0u32);
    if !opts.verify_only {
        let (op, size) = if opts.sector_erase {
            (mpsse::FLASH_ERASE_4K, 4096usize)
        } else {
            (mpsse::FLASH_ERASE_64K, 65536usize)
        };
        for a in (0..bitstream.len()).step_by(size) {
            f.erase(op, a as u32).map_err(err("erase"))?;
            erased += 1;
        }
        for (i, page) in bitstream.chunks(256).enumerate() {
            f.page_program((i * 256) as u32, page)
                .map_err(err("page program"))?;
            pages += 1;
        }
    }
    let back = f.read(0, bitstream.len()).map_err(err("read back"))?;
    let mut diffs = back
        .iter()
        .zip(bitstream)
        .enumerate()
        .filter(|(_, (a, b))| a != b);
    if let Some((addr, (&got, &expected))) = diffs.next() {
        return Err(ProgError::Verify {
            board: name,
            addr: addr as u32,
            expected,
            got,
            mismatches: 1 + diffs.count(),
        });
    }
    f.power_down().map_err(err("flash power-down"))?;
    // Release the FPGA: it reads its configuration from the flash.
    m.set_pins(false, true).map_err(err("release CRESET_B"))?;
    let mut cdone = false;
    let t_cd = Instant::now();
    while t_cd.elapsed() < Duration::from_millis(500) {
        cdone = m.cdone().map_err(err("read CDONE"))?;
        if cdone {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(Report {
        jedec_id: id,
        flash_bytes,
        erased,
        pages,
        verified: bitstream.len(),
        cdone,
        elapsed: t0.elapsed(),
    })
}

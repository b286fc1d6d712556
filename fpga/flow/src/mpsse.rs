//! FTDI MPSSE (FTDI AN_108) as an SPI master, and the SPI NOR flash commands an
//! iCE40 board's configuration flash understands, over a [`Transport`].
//!
//! Pins (the iceprog wiring, low byte ADBUS): bit 0 SCK, bit 1 MOSI, bit 2 MISO,
//! chip select, CDONE and CRESET_B at the bits the board names.

use std::time::{Duration, Instant};

/// MPSSE: clock data bytes out on -ve edge, MSB first, no read.
pub const MPSSE_OUT: u8 = 0x11;
/// MPSSE: clock data bytes in on +ve edge, MSB first, no write.
pub const MPSSE_IN: u8 = 0x20;
/// MPSSE: clock data bytes out on -ve edge and in on +ve edge, MSB first.
pub const MPSSE_INOUT: u8 = 0x31;
/// MPSSE: set data bits low byte (value, direction).
pub const SET_LOW: u8 = 0x80;
/// MPSSE: read data bits low byte.
pub const GET_LOW: u8 = 0x81;
/// MPSSE: disconnect TDI/TDO loopback.
pub const LOOPBACK_OFF: u8 = 0x85;
/// MPSSE: set TCK divisor (lo, hi).
pub const SET_DIVISOR: u8 = 0x86;
/// MPSSE: send immediate (flush the chip's reply buffer to the host).
pub const SEND_IMMEDIATE: u8 = 0x87;
/// MPSSE (H-type): disable clock divide by 5 (60 MHz master clock).
pub const DIV5_OFF: u8 = 0x8A;
/// MPSSE (H-type): disable 3-phase data clocking.
pub const THREE_PHASE_OFF: u8 = 0x8D;
/// MPSSE (H-type): disable adaptive clocking.
pub const ADAPTIVE_OFF: u8 = 0x97;
/// An invalid opcode, answered with 0xFA and the opcode (used to synchronise).
pub const BOGUS: u8 = 0xAA;

/// FTDI vendor request: reset / purge (`SIO_RESET`).
pub const SIO_RESET: u8 = 0x00;
/// FTDI vendor request: latency timer.
pub const SIO_SET_LATENCY: u8 = 0x09;
/// FTDI vendor request: bit mode (value = mode << 8 | mask).
pub const SIO_SET_BITMODE: u8 = 0x0B;
/// Bit mode MPSSE.
pub const BITMODE_MPSSE: u8 = 0x02;

/// SPI NOR: release from deep power-down.
pub const FLASH_RELEASE_PD: u8 = 0xAB;
/// SPI NOR: deep power-down.
pub const FLASH_POWER_DOWN: u8 = 0xB9;
/// SPI NOR: read JEDEC ID.
pub const FLASH_JEDEC_ID: u8 = 0x9F;
/// SPI NOR: write enable.
pub const FLASH_WRITE_ENABLE: u8 = 0x06;
/// SPI NOR: read status register 1 (bit 0 busy, bit 1 WEL).
pub const FLASH_READ_STATUS: u8 = 0x05;
/// SPI NOR: erase a 64 KiB block.
pub const FLASH_ERASE_64K: u8 = 0xD8;
/// SPI NOR: erase a 4 KiB sector.
pub const FLASH_ERASE_4K: u8 = 0x20;
/// SPI NOR: page program (up to 256 bytes).
pub const FLASH_PAGE_PROGRAM: u8 = 0x02;
/// SPI NOR: read data.
pub const FLASH_READ: u8 = 0x03;

/// The bytes of one bulk IN packet the FTDI chip prefixes with modem status.
pub const STATUS_BYTES: usize = 2;
/// Bytes per transfer chunk (the FT2232H has 4 KiB buffers).
const CHUNK: usize = 4096;

/// A transport failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TransportError {
    /// The USB operation failed.
    #[error("USB {op} failed: {detail}")]
    Usb {
        /// bulk write / bulk read / control.
        op: &'static str,
        /// The library's message.
        detail: String,
    },
}

/// The byte pipe to an FTDI interface: what the USB library does, nothing more.
pub trait Transport {
    /// Bulk OUT: send `data`; returns bytes taken.
    fn bulk_write(&mut self, data: &[u8]) -> Result<usize, TransportError>;
    /// Bulk IN: raw packets, each starting with [`STATUS_BYTES`] modem status bytes
    /// (at most [`Transport::max_packet`] bytes a packet); returns bytes read.
    fn bulk_read(&mut self, buf: &mut [u8]) -> Result<usize, TransportError>;
    /// Vendor control OUT request `request` with `value` and `index` (no data).
    fn control(&mut self, request: u8, value: u16, index: u16) -> Result<(), TransportError>;
    /// Bulk IN packet size (512 on a high-speed FT2232H).
    fn max_packet(&self) -> usize {
        512
    }
}

impl<T: Transport + ?Sized> Transport for &mut T {
    fn bulk_write(&mut self, data: &[u8]) -> Result<usize, TransportError> {
        (**self).bulk_write(data)
    }
    fn bulk_read(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        (**self).bulk_read(buf)
    }
    fn control(&mut self, request: u8, value: u16, index: u16) -> Result<(), TransportError> {
        (**self).control(request, value, index)
    }
    fn max_packet(&self) -> usize {
        (**self).max_packet()
    }
}

/// An MPSSE or flash step failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MpsseError {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The interface did not answer the MPSSE synchronisation (bad-command echo).
    #[error("interface {interface} does not speak MPSSE (sent bogus opcode 0xAA, got {got:02x?} instead of [fa, aa]): wrong interface or not an FT2232H/FT232H")]
    NotMpsse {
        /// Interface letter.
        interface: char,
        /// What came back.
        got: Vec<u8>,
    },
    /// The chip sent fewer bytes than were clocked in.
    #[error("MPSSE reply timed out: expected {expected} byte(s), got {got} after {waited_ms} ms")]
    NoReply {
        /// Expected.
        expected: usize,
        /// Received.
        got: usize,
        /// Waited.
        waited_ms: u128,
    },
    /// A bulk write was cut short.
    #[error("USB bulk write took {took} of {len} bytes")]
    ShortWrite {
        /// Taken.
        took: usize,
        /// Offered.
        len: usize,
    },
    /// The flash stayed busy.
    #[error("flash still busy {waited_ms} ms after {op} at 0x{addr:06x} (status 0x{status:02x})")]
    FlashBusy {
        /// The command (erase, page program).
        op: &'static str,
        /// Its address.
        addr: u32,
        /// Waited.
        waited_ms: u128,
        /// The last status read.
        status: u8,
    },
}

/// The pins an MPSSE SPI master drives, as ADBUS bit numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pins {
    /// Chip select (active low).
    pub cs: u8,
    /// CRESET_B.
    pub creset: u8,
    /// CDONE (input).
    pub cdone: u8,
}

impl Pins {
    /// Direction byte: SCK, MOSI, CS, CRESET outputs.
    pub fn direction(self) -> u8 {
        0x03 | (1 << self.cs) | (1 << self.creset)
    }
}

/// The TCK divisor for `hz` from the 60 MHz master clock (TCK = 60 MHz / ((1 + d) * 2)).
pub fn divisor_for(hz: u32) -> u16 {
    let hz = hz.clamp(1, 30_000_000);
    let d = 30_000_000u32.div_ceil(hz).saturating_sub(1);
    d.min(0xFFFF) as u16
}

/// An MPSSE SPI master on one FTDI interface.
pub struct Mpsse<T: Transport> {
    t: T,
    /// Interface number (0 = A).
    interface: u8,
    pins: Pins,
    gpio: u8,
    read_timeout: Duration,
}

impl<T: Transport> Mpsse<T> {
    /// Wrap `t` (interface `interface`, 0 = A); call [`Mpsse::init`] next.
    pub fn new(t: T, interface: u8, pins: Pins) -> Mpsse<T> {
        Mpsse {
            t,
            interface,
            pins,
            gpio: 1 << pins.cs,
            read_timeout: Duration::from_millis(2000),
        }
    }

    /// The transport (for tests).
    pub fn transport(&mut self) -> &mut T {
        &mut self.t
    }

    /// The transport back.
    pub fn into_transport(self) -> T {
        self.t
    }

    fn index(&self) -> u16 {
        u16::from(self.interface) + 1
    }

    /// Reset the interface, purge, latency 1 ms, MPSSE mode, synchronise, 60 MHz
    /// master clock without adaptive or 3-phase clocking, divisor for `spi_hz`,
    /// loopback off; CS high and CRESET_B low (the FPGA held in reset).
    pub fn init(&mut self, spi_hz: u32) -> Result<(), MpsseError> {
        let ix = self.index();
        self.t.control(SIO_RESET, 0, ix)?;
        self.t.control(SIO_RESET, 1, ix)?; // purge RX
        self.t.control(SIO_RESET, 2, ix)?; // purge TX
        self.t.control(SIO_SET_LATENCY, 1, ix)?;
        self.t.control(SIO_SET_BITMODE, 0x0000, ix)?;
        self.t
            .control(SIO_SET_BITMODE, u16::from(BITMODE_MPSSE) << 8 | 0xFF, ix)?;
        // Synchronise: a bogus opcode is echoed as 0xFA, opcode.
        self.write(&[BOGUS, SEND_IMMEDIATE])?;
        let got = self.read_upto(2, Duration::from_millis(200))?;
        if got != [0xFA, BOGUS] {
            return Err(MpsseError::NotMpsse {
                interface: (b'A' + self.interface) as char,
                got,
            });
        }
        let d = divisor_for(spi_hz);
        self.write(&[
            DIV5_OFF,
            ADAPTIVE_OFF,
            THREE_PHASE_OFF,
            SET_DIVISOR,
            d as u8,
            (d >> 8) as u8,
            LOOPBACK_OFF,
        ])?;
        self.gpio = 1 << self.pins.cs;
        self.set_gpio()
    }

    fn set_gpio(&mut self) -> Result<(), MpsseError> {
        self.write(&[SET_LOW, self.gpio, self.pins.direction()])
    }

    /// Drive CS (true = selected, pin low) and CRESET_B (true = released, pin high).
    pub fn set_pins(&mut self, selected: bool, creset_released: bool) -> Result<(), MpsseError> {
        let mut g = 0u8;
        if !selected {
            g |= 1 << self.pins.cs;
        }
        if creset_released {
            g |= 1 << self.pins.creset;
        }
        self.gpio = g;
        self.set_gpio()
    }

    /// Whether CDONE reads high.
    pub fn cdone(&mut self) -> Result<bool, MpsseError> {
        self.write(&[GET_LOW, SEND_IMMEDIATE])?;
        let b = self.read_exact(1)?;
        Ok(b[0] & (1 << self.pins.cdone) != 0)
    }

    fn write(&mut self, data: &[u8]) -> Result<(), MpsseError> {
        let took = self.t.bulk_write(data)?;
        if took != data.len() {
            return Err(MpsseError::ShortWrite {
                took,
                len: data.len(),
            });
        }
        Ok(())
    }

    /// Read up to `n` payload bytes (stripping the status bytes of each packet)
    /// until `n` arrived or `timeout` passed.
    fn read_upto(&mut self, n: usize, timeout: Duration) -> Result<Vec<u8>, MpsseError> {
        let mp = self.t.max_packet().max(STATUS_BYTES + 1);
        let mut out = Vec::with_capacity(n);
        let t0 = Instant::now();
        let mut buf = vec![0u8; mp * 8];
        while out.len() < n {
            let got = self.t.bulk_read(&mut buf)?;
            for pkt in buf[..got.min(buf.len())].chunks(mp) {
                if pkt.len() > STATUS_BYTES {
                    out.extend_from_slice(&pkt[STATUS_BYTES..]);
                }
            }
            if out.len() < n && t0.elapsed() > timeout {
                break;
            }
        }
        out.truncate(n);
        Ok(out)
    }

    fn read_exact(&mut self, n: usize) -> Result<Vec<u8>, MpsseError> {
        let t0 = Instant::now();
        let got = self.read_upto(n, self.read_timeout)?;
        if got.len() < n {
            return Err(MpsseError::NoReply {
                expected: n,
                got: got.len(),
                waited_ms: t0.elapsed().as_millis(),
            });
        }
        Ok(got)
    }

    /// Clock `data` out and return the bytes clocked in (CS unchanged).
    pub fn xfer(&mut self, data: &[u8]) -> Result<Vec<u8>, MpsseError> {
        let mut rx = Vec::with_capacity(data.len());
        for c in data.chunks(CHUNK) {
            let n = c.len() - 1;
            let mut cmd = Vec::with_capacity(c.len() + 4);
            cmd.extend_from_slice(&[MPSSE_INOUT, n as u8, (n >> 8) as u8]);
            cmd.extend_from_slice(c);
            cmd.push(SEND_IMMEDIATE);
            self.write(&cmd)?;
            rx.extend(self.read_exact(c.len())?);
        }
        Ok(rx)
    }

    /// Clock `data` out, ignoring what comes in (CS unchanged).
    pub fn send(&mut self, data: &[u8]) -> Result<(), MpsseError> {
        for c in data.chunks(CHUNK) {
            let n = c.len() - 1;
            let mut cmd = Vec::with_capacity(c.len() + 3);
            cmd.extend_from_slice(&[MPSSE_OUT, n as u8, (n >> 8) as u8]);
            cmd.extend_from_slice(c);
            self.write(&cmd)?;
        }
        Ok(())
    }

    /// Clock `n` bytes in (CS unchanged).
    pub fn receive(&mut self, n: usize) -> Result<Vec<u8>, MpsseError> {
        let mut rx = Vec::with_capacity(n);
        let mut left = n;
        while left > 0 {
            let c = left.min(CHUNK);
            let l = c - 1;
            self.write(&[MPSSE_IN, l as u8, (l >> 8) as u8, SEND_IMMEDIATE])?;
            rx.extend(self.read_exact(c)?);
            left -= c;
        }
        Ok(rx)
    }
}

/// SPI NOR flash commands through an [`Mpsse`] (the FPGA must be held in reset).
pub struct Flash<'a, T: Transport> {
    /// The MPSSE master.
    pub m: &'a mut Mpsse<T>,
    /// How long to poll the busy bit after an erase or program.
    pub busy_timeout: Duration,
}

fn addr3(a: u32) -> [u8; 3] {
    [(a >> 16) as u8, (a >> 8) as u8, a as u8]
}

impl<T: Transport> Flash<'_, T> {
    /// One command with CS low around it, returning the bytes clocked in.
    pub fn command(&mut self, bytes: &[u8]) -> Result<Vec<u8>, MpsseError> {
        self.m.set_pins(true, false)?;
        let r = self.m.xfer(bytes);
        self.m.set_pins(false, false)?;
        r
    }

    /// One command that only sends.
    fn send(&mut self, bytes: &[u8]) -> Result<(), MpsseError> {
        self.m.set_pins(true, false)?;
        let r = self.m.send(bytes);
        self.m.set_pins(false, false)?;
        r
    }

    /// 0xAB: release from deep power-down.
    pub fn release_power_down(&mut self) -> Result<(), MpsseError> {
        self.send(&[FLASH_RELEASE_PD])
    }

    /// 0xB9: deep power-down.
    pub fn power_down(&mut self) -> Result<(), MpsseError> {
        self.send(&[FLASH_POWER_DOWN])
    }

    /// 0x9F: manufacturer, memory type, capacity.
    pub fn jedec_id(&mut self) -> Result<[u8; 3], MpsseError> {
        let r = self.command(&[FLASH_JEDEC_ID, 0, 0, 0])?;
        Ok([r[1], r[2], r[3]])
    }

    /// 0x05: status register 1.
    pub fn status(&mut self) -> Result<u8, MpsseError> {
        Ok(self.command(&[FLASH_READ_STATUS, 0])?[1])
    }

    /// 0x06: write enable.
    pub fn write_enable(&mut self) -> Result<(), MpsseError> {
        self.send(&[FLASH_WRITE_ENABLE])
    }

    fn wait(&mut self, op: &'static str, addr: u32) -> Result<(), MpsseError> {
        let t0 = Instant::now();
        loop {
            let s = self.status()?;
            if s & 1 == 0 {
                return Ok(());
            }
            if t0.elapsed() > self.busy_timeout {
                return Err(MpsseError::FlashBusy {
                    op,
                    addr,
                    waited_ms: t0.elapsed().as_millis(),
                    status: s,
                });
            }
            if self.busy_timeout > Duration::from_millis(100) {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// 0xD8 (64 KiB block) or 0x20 (4 KiB sector) erase at `addr`, then wait.
    pub fn erase(&mut self, opcode: u8, addr: u32) -> Result<(), MpsseError> {
        self.write_enable()?;
        let a = addr3(addr);
        self.send(&[opcode, a[0], a[1], a[2]])?;
        self.wait("erase", addr)
    }

    /// 0x02 page program of up to 256 bytes at `addr` (not crossing a page), then wait.
    pub fn page_program(&mut self, addr: u32, data: &[u8]) -> Result<(), MpsseError> {
        self.write_enable()?;
        let a = addr3(addr);
        let mut cmd = Vec::with_capacity(4 + data.len());
        cmd.extend_from_slice(&[FLASH_PAGE_PROGRAM, a[0], a[1], a[2]]);
        cmd.extend_from_slice(data);
        self.send(&cmd)?;
        self.wait("page program", addr)
    }

    /// 0x03 read of `len` bytes at `addr`.
    pub fn read(&mut self, addr: u32, len: usize) -> Result<Vec<u8>, MpsseError> {
        let a = addr3(addr);
        self.m.set_pins(true, false)?;
        let r = self
            .m
            .send(&[FLASH_READ, a[0], a[1], a[2]])
            .and_then(|()| self.m.receive(len));
        self.m.set_pins(false, false)?;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divisors() {
        assert_eq!(divisor_for(30_000_000), 0);
        assert_eq!(divisor_for(6_000_000), 4);
        assert_eq!(divisor_for(1_000_000), 29);
        assert_eq!(divisor_for(50_000), 599);
        assert_eq!(divisor_for(0), 0xFFFF);
    }
}

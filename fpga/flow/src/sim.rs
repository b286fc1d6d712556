//! A simulated FT2232H interface with an SPI NOR flash behind it, at the byte level:
//! it takes the vendor control requests and the MPSSE command stream a real chip
//! takes, models the ADBUS GPIOs (CS, CRESET_B, CDONE), answers bulk reads with
//! 2-byte modem status packets, and implements the flash commands (JEDEC ID,
//! status with busy and WEL, write enable, 4K/64K erase, page program, read, deep
//! power-down). Faults: a corrupted read-back byte, a flash that never leaves busy,
//! an interface that is not in MPSSE mode, no flash on the bus.

use crate::mpsse::{self, Pins, Transport, TransportError};

/// Faults the peer can inject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Reads of this flash address return the stored byte XOR 0x01.
    pub corrupt_read_at: Option<u32>,
    /// The busy bit never clears after an erase or program.
    pub stuck_busy: bool,
    /// The interface never answers MPSSE commands (a UART-only interface).
    pub not_mpsse: bool,
    /// No flash: MISO floats high.
    pub no_flash: bool,
}

/// The simulated chip and flash.
#[derive(Debug, Clone)]
pub struct SimFt2232h {
    /// Flash contents.
    pub flash: Vec<u8>,
    /// JEDEC ID answered to 0x9F.
    pub jedec: [u8; 3],
    /// Faults.
    pub faults: Faults,
    /// Every bulk OUT byte, in order.
    pub written: Vec<u8>,
    /// Every control request `(request, value, index)`.
    pub controls: Vec<(u8, u16, u16)>,
    /// Status polls an erase or program stays busy for.
    pub busy_polls: u32,
    /// SPI traffic seen while CRESET_B was released (the FPGA would fight it).
    pub contention: bool,
    /// The TCK divisor last set.
    pub divisor: Option<u16>,
    pins: Pins,
    mpsse: bool,
    gpio: u8,
    dir: u8,
    pending: Vec<u8>,
    reply: Vec<u8>,
    // flash state
    wel: bool,
    busy: u32,
    powered_down: bool,
    txn: Vec<u8>,
    in_txn: bool,
}

impl SimFt2232h {
    /// A chip whose flash has `size` bytes (erased) and `jedec` as its ID, wired as
    /// `pins`.
    pub fn new(size: usize, jedec: [u8; 3], pins: Pins) -> SimFt2232h {
        SimFt2232h {
            flash: vec![0xFF; size],
            jedec,
            faults: Faults::default(),
            written: Vec::new(),
            controls: Vec::new(),
            busy_polls: 3,
            contention: false,
            divisor: None,
            pins,
            mpsse: false,
            gpio: 0,
            dir: 0,
            pending: Vec::new(),
            reply: Vec::new(),
            wel: false,
            busy: 0,
            powered_down: true,
            txn: Vec::new(),
            in_txn: false,
        }
    }

    /// A Winbond W25Q128 (16 MiB, ID ef 40 18) on the iceprog wiring.
    pub fn w25q128() -> SimFt2232h {
        SimFt2232h::new(
            16 << 20,
            [0xEF, 0x40, 0x18],
            Pins {
                cs: 4,
                creset: 7,
                cdone: 6,
            },
        )
    }

    /// Whether CRESET_B is driven high (the FPGA released).
    pub fn creset_released(&self) -> bool {
        self.dir & (1 << self.pins.creset) != 0 && self.gpio & (1 << self.pins.creset) != 0
    }

    fn cs_low(&self) -> bool {
        self.dir & (1 << self.pins.cs) != 0 && self.gpio & (1 << self.pins.cs) == 0
    }

    /// CDONE: high once the FPGA is released and the flash holds an iCE40 bitstream
    /// (the sync word 7e aa 99 7e in its first 256 bytes).
    pub fn cdone(&self) -> bool {
        self.creset_released()
            && self
                .flash
                .iter()
                .take(256)
                .collect::<Vec<_>>()
                .windows(4)
                .any(|w| *w[0] == 0x7E && *w[1] == 0xAA && *w[2] == 0x99 && *w[3] == 0x7E)
    }

    fn set_gpio(&mut self, val: u8, dir: u8) {
        let was_low = self.cs_low();
        self.gpio = val;
        self.dir = dir;
        let now_low = self.cs_low();
        if !was_low && now_low {
            self.txn.clear();
            self.in_txn = true;
        } else if was_low && !now_low {
            self.end_txn();
            self.in_txn = false;
        }
    }

    fn end_txn(&mut self) {
        let t = std::mem::take(&mut self.txn);
        let Some(&op) = t.first() else { return };
        if self.powered_down {
            if op == mpsse::FLASH_RELEASE_PD {
                self.powered_down = false;
            }
            return;
        }
        if self.busy > 0 {
            return; // a busy flash ignores everything but status reads
        }
        let addr = |t: &[u8]| -> Option<usize> {
            (t.len() >= 4)
                .then(|| (usize::from(t[1]) << 16) | (usize::from(t[2]) << 8) | usize::from(t[3]))
        };
        match op {
            mpsse::FLASH_POWER_DOWN => self.powered_down = true,
            mpsse::FLASH_WRITE_ENABLE => self.wel = true,
            0x04 => self.wel = false,
            mpsse::FLASH_ERASE_64K | mpsse::FLASH_ERASE_4K if self.wel => {
                if let Some(a) = addr(&t) {
                    let size = if op == mpsse::FLASH_ERASE_64K {
                        65536
                    } else {
                        4096
                    };
                    let base = (a & !(size - 1)) % self.flash.len().max(1);
                    let end = (base + size).min(self.flash.len());
                    self.flash[base..end].fill(0xFF);
                    self.start_busy();
                }
            }
            mpsse::FLASH_PAGE_PROGRAM if self.wel => {
                if let Some(a) = addr(&t) {
                    let page = a & !0xFF;
                    for (i, &b) in t[4..].iter().enumerate() {
                        // Wraps within the page, as NOR flash does.
                        let at = (page | ((a + i) & 0xFF)) % self.flash.len().max(1);
                        self.flash[at] &= b;
                    }
                    self.start_busy();
                }
            }
            _ => {}
        }
    }

    fn start_busy(&mut self) {
        self.wel = false;
        self.busy = if self.faults.stuck_busy {
            u32::MAX
        } else {
            self.busy_polls.max(1)
        };
    }

    /// One byte on the SPI bus: MOSI in, MISO out.
    fn spi(&mut self, mosi: u8) -> u8 {
        if !self.cs_low() {
            return 0xFF;
        }
        if self.creset_released() {
            self.contention = true;
        }
        let idx = self.txn.len();
        self.txn.push(mosi);
        if self.faults.no_flash || idx == 0 {
            return 0xFF;
        }
        let op = self.txn[0];
        if self.powered_down {
            return 0xFF;
        }
        match op {
            mpsse::FLASH_READ_STATUS => {
                let s = u8::from(self.busy > 0) | (u8::from(self.wel) << 1);
                if self.busy > 0 && self.busy != u32::MAX {
                    self.busy -= 1;
                }
                s
            }
            _ if self.busy > 0 => 0xFF,
            mpsse::FLASH_JEDEC_ID if idx <= 3 => self.jedec[idx - 1],
            mpsse::FLASH_READ if idx >= 4 => {
                let a = (usize::from(self.txn[1]) << 16)
                    | (usize::from(self.txn[2]) << 8)
                    | usize::from(self.txn[3]);
                let at = (a + idx - 4) % self.flash.len().max(1);
                let mut b = self.flash[at];
                if self.faults.corrupt_read_at == Some(at as u32) {
                    b ^= 0x01;
                }
                b
            }
            _ => 0xFF,
        }
    }

    /// Decode complete MPSSE commands from `pending`.
    fn run(&mut self) {
        loop {
            let p = &self.pending;
            let Some(&op) = p.first() else { return };
            let need = match op {
                mpsse::MPSSE_OUT | mpsse::MPSSE_INOUT => {
                    if p.len() < 3 {
                        return;
                    }
                    3 + usize::from(u16::from_le_bytes([p[1], p[2]])) + 1
                }
                mpsse::MPSSE_IN | mpsse::SET_DIVISOR => 3,
                mpsse::SET_LOW | 0x82 => 3,
                _ => 1,
            };
            if p.len() < need {
                return;
            }
            let cmd: Vec<u8> = self.pending.drain(..need).collect();
            match op {
                mpsse::MPSSE_OUT => {
                    for &b in &cmd[3..] {
                        self.spi(b);
                    }
                }
                mpsse::MPSSE_INOUT => {
                    for &b in &cmd[3..] {
                        let r = self.spi(b);
                        self.reply.push(r);
                    }
                }
                mpsse::MPSSE_IN => {
                    let n = usize::from(u16::from_le_bytes([cmd[1], cmd[2]])) + 1;
                    for _ in 0..n {
                        let r = self.spi(0x00);
                        self.reply.push(r);
                    }
                }
                mpsse::SET_LOW => self.set_gpio(cmd[1], cmd[2]),
                0x82 => {}
                mpsse::GET_LOW => {
                    let mut v = self.gpio & self.dir;
                    if self.cdone() {
                        v |= 1 << self.pins.cdone;
                    }
                    self.reply.push(v);
                }
                mpsse::SET_DIVISOR => self.divisor = Some(u16::from_le_bytes([cmd[1], cmd[2]])),
                mpsse::SEND_IMMEDIATE
                | mpsse::DIV5_OFF
                | 0x8B
                | mpsse::ADAPTIVE_OFF
                | 0x96
                | mpsse::THREE_PHASE_OFF
                | 0x8C
                | 0x84
                | mpsse::LOOPBACK_OFF => {}
                bad => self.reply.extend_from_slice(&[0xFA, bad]),
            }
        }
    }
}

impl Transport for SimFt2232h {
    fn bulk_write(&mut self, data: &[u8]) -> Result<usize, TransportError> {
        self.written.extend_from_slice(data);
        if self.mpsse && !self.faults.not_mpsse {
            self.pending.extend_from_slice(data);
            self.run();
        }
        Ok(data.len())
    }

    fn bulk_read(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        let mp = self.max_packet();
        let mut n = 0;
        // At least one (status-only) packet; then as many as there is data for.
        while buf.len() - n >= mpsse::STATUS_BYTES {
            buf[n] = 0x32;
            buf[n + 1] = 0x60;
            n += 2;
            let take = self.reply.len().min(mp - 2).min(buf.len() - n);
            buf[n..n + take].copy_from_slice(&self.reply[..take]);
            self.reply.drain(..take);
            n += take;
            if self.reply.is_empty() || buf.len() - n < mp {
                break;
            }
        }
        Ok(n)
    }

    fn control(&mut self, request: u8, value: u16, index: u16) -> Result<(), TransportError> {
        self.controls.push((request, value, index));
        match (request, value) {
            (mpsse::SIO_RESET, 0) => {
                self.pending.clear();
                self.reply.clear();
            }
            (mpsse::SIO_RESET, 1) => self.reply.clear(),
            (mpsse::SIO_RESET, 2) => self.pending.clear(),
            (mpsse::SIO_SET_BITMODE, v) => {
                self.mpsse = (v >> 8) as u8 == mpsse::BITMODE_MPSSE;
            }
            _ => {}
        }
        Ok(())
    }
}

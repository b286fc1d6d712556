//! Software ends of a UART line for simulation drivers: [`LineDriver`] turns bytes
//! into line levels at a divisor, [`SoftRx`] decodes a line sampled once a cycle.

use std::collections::VecDeque;

/// Drives a UART line (8N1, LSB first) from queued bytes, one level per cycle.
#[derive(Debug, Clone)]
pub struct LineDriver {
    divisor: u16,
    bits: VecDeque<bool>,
    phase: u16,
}

impl LineDriver {
    /// A driver sending a bit every `divisor` cycles.
    pub fn new(divisor: u16) -> LineDriver {
        LineDriver {
            divisor: divisor.max(1),
            bits: VecDeque::new(),
            phase: 0,
        }
    }

    /// Queue bytes (sent back to back).
    pub fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.bits.push_back(false);
            self.bits.extend((0..8).map(|i| b & (1 << i) != 0));
            self.bits.push_back(true);
        }
    }

    /// The line level this cycle (high when idle).
    pub fn level(&self) -> bool {
        self.bits.front().copied().unwrap_or(true)
    }

    /// Move on by one cycle.
    pub fn advance(&mut self) {
        if self.bits.is_empty() {
            return;
        }
        self.phase += 1;
        if self.phase >= self.divisor {
            self.phase = 0;
            self.bits.pop_front();
        }
    }

    /// Nothing left to send.
    pub fn is_idle(&self) -> bool {
        self.bits.is_empty()
    }

    /// Whole bytes still queued (a byte being sent counts).
    pub fn queued_bytes(&self) -> usize {
        self.bits.len().div_ceil(10)
    }
}

/// An 8N1 receiver sampling a line once a cycle, mid-bit.
#[derive(Debug, Clone)]
pub struct SoftRx {
    d: u64,
    busy: bool,
    n: u64,
    shift: u8,
    bytes: Vec<u8>,
    errors: u64,
}

impl SoftRx {
    /// A receiver for a bit every `divisor` cycles.
    pub fn new(divisor: u16) -> SoftRx {
        SoftRx {
            d: divisor.max(2) as u64,
            busy: false,
            n: 0,
            shift: 0,
            bytes: Vec::new(),
            errors: 0,
        }
    }

    /// Sample the line for one cycle.
    #[inline]
    pub fn sample(&mut self, level: bool) {
        if !self.busy {
            if !level {
                self.busy = true;
                self.n = 0;
                self.shift = 0;
            }
            return;
        }
        self.n += 1;
        let half = self.d / 2;
        if self.n < half || (self.n - half) % self.d != 0 {
            return;
        }
        match (self.n - half) / self.d {
            0 => {
                if level {
                    self.busy = false; // a glitch, not a start bit
                }
            }
            k @ 1..=8 => {
                if level {
                    self.shift |= 1 << (k - 1);
                }
            }
            _ => {
                if level {
                    self.bytes.push(self.shift);
                } else {
                    self.errors += 1;
                }
                self.busy = false;
            }
        }
    }

    /// A byte is being received.
    pub fn is_busy(&self) -> bool {
        self.busy
    }

    /// Bytes received since the last call.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }

    /// Whether bytes are waiting to be taken.
    pub fn has_bytes(&self) -> bool {
        !self.bytes.is_empty()
    }

    /// Framing errors so far.
    pub fn framing_errors(&self) -> u64 {
        self.errors
    }
}

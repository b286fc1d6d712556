//! A UART (8N1) for the OOB port: transmitter and receiver with an elaboration-time
//! baud divisor (clock cycles per bit). rust-hdl has no UART widget.
//!
//! `DeviceCore` instantiates both at `CoreParams::oob_divisor` in front of the OOB
//! protocol engine (`crate::oob`); see `Rtl::oob_uart` for an end-to-end exchange.

use rust_hdl::prelude::*;

/// UART transmitter, 8 data bits, no parity, 1 stop bit, LSB first.
pub struct UartTx {
    /// Clock.
    pub clock: Signal<In, Clock>,
    /// Byte to send (sampled when `start` is high while `ready`).
    pub data: Signal<In, Bits<8>>,
    /// Send `data`.
    pub start: Signal<In, Bit>,
    /// Idle: a byte may be started.
    pub ready: Signal<Out, Bit>,
    /// The serial line (idle high).
    pub tx: Signal<Out, Bit>,
    busy: DFF<Bit>,
    shift: DFF<Bits<10>>,
    bitcnt: DFF<Bits<4>>,
    divcnt: DFF<Bits<16>>,
    k_div_last: Constant<Bits<16>>,
    k_stop: Constant<Bits<10>>,
    /// Simulation only: the last evaluation changed nothing (see `crate::sim`).
    _quiet: bool,
}

crate::sim_block!(gated(_quiet) impl[] UartTx, UartTx {
    clock: clock,
    data: input,
    start: input,
    ready: output,
    tx: output,
    busy: dff,
    shift: dff,
    bitcnt: dff,
    divcnt: dff,
    k_div_last: konst,
    k_stop: konst,
    _quiet: skip,
});

impl UartTx {
    /// A transmitter sending one bit every `divisor` clock cycles (2..=65535).
    pub fn new(divisor: u16) -> UartTx {
        assert!(divisor >= 2, "baud divisor {divisor} is below 2");
        UartTx {
            clock: Default::default(),
            data: Default::default(),
            start: Default::default(),
            ready: Default::default(),
            tx: Default::default(),
            busy: Default::default(),
            shift: Default::default(),
            bitcnt: Default::default(),
            divcnt: Default::default(),
            k_div_last: Constant::new(((divisor - 1) as u64).into()),
            k_stop: Constant::new(0x200u64.into()),
            _quiet: false,
        }
    }
}

impl Logic for UartTx {
    #[hdl_gen]
    fn update(&mut self) {
        dff_setup!(self, clock, busy, shift, bitcnt, divcnt);
        self.tx.next = true;
        self.ready.next = false;
        if !self.busy.q.val() {
            self.ready.next = true;
            if self.start.val() {
                // Start bit (0), data LSB first, stop bit (1).
                self.shift.d.next = (bit_cast::<10, 8>(self.data.val()) << 1) | self.k_stop.val();
                self.busy.d.next = true;
                self.bitcnt.d.next = 0.into();
                self.divcnt.d.next = 0.into();
            }
        } else {
            self.tx.next = self.shift.q.val().get_bit(0);
            self.divcnt.d.next = self.divcnt.q.val() + 1;
            if self.divcnt.q.val() == self.k_div_last.val() {
                self.divcnt.d.next = 0.into();
                self.shift.d.next = self.shift.q.val() >> 1;
                self.bitcnt.d.next = self.bitcnt.q.val() + 1;
                if self.bitcnt.q.val() == 9 {
                    self.busy.d.next = false;
                }
            }
        }
    }
}

/// UART receiver, 8N1: a two-flop synchronizer, start-bit check at mid-bit, data
/// sampled mid-bit, stop bit checked.
pub struct UartRx {
    /// Clock.
    pub clock: Signal<In, Clock>,
    /// The serial line.
    pub rx: Signal<In, Bit>,
    /// The last byte received.
    pub data: Signal<Out, Bits<8>>,
    /// High for one cycle when `data` holds a new byte.
    pub valid: Signal<Out, Bit>,
    /// High for one cycle when a byte's stop bit was low (the byte is dropped).
    pub frame_error: Signal<Out, Bit>,
    sync1: DFFWithInit<Bit>,
    sync2: DFFWithInit<Bit>,
    busy: DFF<Bit>,
    divcnt: DFF<Bits<16>>,
    bitcnt: DFF<Bits<4>>,
    shift: DFF<Bits<8>>,
    out: DFF<Bits<8>>,
    valid_r: DFF<Bit>,
    ferr_r: DFF<Bit>,
    k_div_last: Constant<Bits<16>>,
    k_half_last: Constant<Bits<16>>,
    k_msb: Constant<Bits<8>>,
    /// Simulation only: the last evaluation changed nothing (see `crate::sim`).
    _quiet: bool,
}

crate::sim_block!(gated(_quiet) impl[] UartRx, UartRx {
    clock: clock,
    rx: input,
    data: output,
    valid: output,
    frame_error: output,
    sync1: block,
    sync2: block,
    busy: dff,
    divcnt: dff,
    bitcnt: dff,
    shift: dff,
    out: dff,
    valid_r: dff,
    ferr_r: dff,
    k_div_last: konst,
    k_half_last: konst,
    k_msb: konst,
    _quiet: skip,
});

impl UartRx {
    /// A receiver for one bit every `divisor` clock cycles (2..=65535).
    pub fn new(divisor: u16) -> UartRx {
        assert!(divisor >= 2, "baud divisor {divisor} is below 2");
        UartRx {
            _quiet: false,
            clock: Default::default(),
            rx: Default::default(),
            data: Default::default(),
            valid: Default::default(),
            frame_error: Default::default(),
            // The idle line is high: so is the synchronizer out of configuration.
            sync1: DFFWithInit::new(true),
            sync2: DFFWithInit::new(true),
            busy: Default::default(),
            divcnt: Default::default(),
            bitcnt: Default::default(),
            shift: Default::default(),
            out: Default::default(),
            valid_r: Default::default(),
            ferr_r: Default::default(),
            k_div_last: Constant::new(((divisor - 1) as u64).into()),
            k_half_last: Constant::new(((divisor / 2).max(1) as u64 - 1).into()),
            k_msb: Constant::new(0x80u64.into()),
        }
    }
}

impl Logic for UartRx {
    #[hdl_gen]
    fn update(&mut self) {
        dff_setup!(self, clock, sync1, sync2, busy, divcnt, bitcnt, shift, out, valid_r, ferr_r);
        self.sync1.d.next = self.rx.val();
        self.sync2.d.next = self.sync1.q.val();
        self.valid_r.d.next = false;
        self.ferr_r.d.next = false;
        self.data.next = self.out.q.val();
        self.valid.next = self.valid_r.q.val();
        self.frame_error.next = self.ferr_r.q.val();
        if !self.busy.q.val() {
            if !self.sync2.q.val() {
                self.busy.d.next = true;
                self.divcnt.d.next = 0.into();
                self.bitcnt.d.next = 0.into();
            }
        } else {
            self.divcnt.d.next = self.divcnt.q.val() + 1;
            if self.bitcnt.q.val() == 0 {
                // Middle of the start bit: still low, or it was a glitch.
                if self.divcnt.q.val() == self.k_half_last.val() {
                    self.divcnt.d.next = 0.into();
                    self.bitcnt.d.next = 1.into();
                    if self.sync2.q.val() {
                        self.busy.d.next = false;
                    }
                }
            } else if self.divcnt.q.val() == self.k_div_last.val() {
                self.divcnt.d.next = 0.into();
                self.bitcnt.d.next = self.bitcnt.q.val() + 1;
                if self.bitcnt.q.val() == 9 {
                    self.busy.d.next = false;
                    if self.sync2.q.val() {
                        self.out.d.next = self.shift.q.val();
                        self.valid_r.d.next = true;
                    } else {
                        self.ferr_r.d.next = true;
                    }
                } else {
                    self.shift.d.next = self.shift.q.val() >> 1;
                    if self.sync2.q.val() {
                        self.shift.d.next = (self.shift.q.val() >> 1) | self.k_msb.val();
                    }
                }
            }
        }
    }
}

/// Transmitter looped into receiver: the UART's own test bench circuit.
#[derive(LogicBlock)]
pub struct UartLoopback {
    /// Clock.
    pub clock: Signal<In, Clock>,
    /// Byte to send.
    pub data: Signal<In, Bits<8>>,
    /// Send it.
    pub start: Signal<In, Bit>,
    /// Transmitter ready.
    pub ready: Signal<Out, Bit>,
    /// The line, for checking bit timing.
    pub line: Signal<Out, Bit>,
    /// Received byte.
    pub rx_data: Signal<Out, Bits<8>>,
    /// Received strobe.
    pub rx_valid: Signal<Out, Bit>,
    /// Framing error strobe.
    pub rx_error: Signal<Out, Bit>,
    /// Transmitter.
    pub txu: UartTx,
    /// Receiver.
    pub rxu: UartRx,
}

impl UartLoopback {
    /// Both ends at `divisor` cycles per bit.
    pub fn new(divisor: u16) -> UartLoopback {
        UartLoopback {
            clock: Default::default(),
            data: Default::default(),
            start: Default::default(),
            ready: Default::default(),
            line: Default::default(),
            rx_data: Default::default(),
            rx_valid: Default::default(),
            rx_error: Default::default(),
            txu: UartTx::new(divisor),
            rxu: UartRx::new(divisor),
        }
    }
}

impl Logic for UartLoopback {
    #[hdl_gen]
    fn update(&mut self) {
        clock!(self, clock, txu, rxu);
        self.txu.data.next = self.data.val();
        self.txu.start.next = self.start.val();
        self.ready.next = self.txu.ready.val();
        self.line.next = self.txu.tx.val();
        self.rxu.rx.next = self.txu.tx.val();
        self.rx_data.next = self.rxu.data.val();
        self.rx_valid.next = self.rxu.valid.val();
        self.rx_error.next = self.rxu.frame_error.val();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter::settle;

    fn tick<B: Block>(b: &mut B, clock: impl Fn(&mut B) -> &mut Signal<In, Clock>) {
        settle(b);
        clock(b).next = Clock { clk: true };
        settle(b);
        clock(b).next = Clock { clk: false };
        settle(b);
    }

    /// Send `bytes` through the loopback; returns the received bytes and checks the
    /// line's bit timing (start bit low for `divisor` cycles, LSB first, stop high).
    fn loopback(divisor: u16, bytes: &[u8]) -> Vec<u8> {
        let mut u = UartLoopback::new(divisor);
        u.connect_all();
        // Idle line high first, so the receiver's synchronizer starts at 1.
        for _ in 0..4 {
            tick(&mut u, |u| &mut u.clock);
        }
        let mut got = Vec::new();
        for &b in bytes {
            while !u.ready.val() {
                tick(&mut u, |u| &mut u.clock);
                if u.rx_valid.val() {
                    got.push(u.rx_data.val().to_u8());
                }
            }
            u.data.next = (b as u64).into();
            u.start.next = true;
            tick(&mut u, |u| &mut u.clock);
            u.start.next = false;
            // Sample the line once per bit, in the middle.
            let mut line = Vec::new();
            for c in 0..10 * divisor as usize {
                if c % divisor as usize == divisor as usize / 2 {
                    line.push(u.line.val());
                }
                if u.rx_valid.val() {
                    got.push(u.rx_data.val().to_u8());
                }
                assert!(!u.rx_error.val(), "framing error at divisor {divisor}");
                tick(&mut u, |u| &mut u.clock);
            }
            let mut expect = vec![false];
            expect.extend((0..8).map(|i| b >> i & 1 != 0));
            expect.push(true);
            assert_eq!(line, expect, "bit timing of {b:#04x} at divisor {divisor}");
        }
        for _ in 0..4 * divisor as usize {
            tick(&mut u, |u| &mut u.clock);
            if u.rx_valid.val() {
                got.push(u.rx_data.val().to_u8());
            }
        }
        got
    }

    #[test]
    fn loopback_at_several_divisors() {
        let bytes = [0xA5u8, 0x00, 0xFF, 0x01, 0x80, 0x5A, 0x3C];
        for divisor in [2u16, 3, 4, 7, 16, 104] {
            assert_eq!(loopback(divisor, &bytes), bytes, "divisor {divisor}");
        }
    }

    #[test]
    fn receiver_flags_a_missing_stop_bit_and_ignores_glitches() {
        let div = 8usize;
        let mut rx = UartRx::new(div as u16);
        rx.connect_all();
        let mut errors = 0;
        let mut valid = 0;
        let mut drive = |rx: &mut UartRx, level: bool, cycles: usize| {
            rx.rx.next = level;
            for _ in 0..cycles {
                tick(rx, |r| &mut r.clock);
                errors += rx.frame_error.val() as u32;
                valid += rx.valid.val() as u32;
            }
        };
        drive(&mut rx, true, 20);
        // A one-cycle glitch is not a start bit.
        drive(&mut rx, false, 1);
        drive(&mut rx, true, 40);
        // Start bit, eight zero bits, and a low stop bit: framing error.
        drive(&mut rx, false, 10 * div);
        drive(&mut rx, true, 4 * div);
        assert_eq!((errors, valid), (1, 0));
    }

    #[test]
    fn uart_generates_verilog() {
        let mut u = UartLoopback::new(104);
        u.connect_all();
        let v = generate_verilog(&u);
        assert!(v.contains("module top"));
    }
}

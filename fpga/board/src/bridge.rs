//! `HostBridge`: the board's host bridge in rust-hdl. UART receiver -> frame parser
//! (streaming CRC-16, error responses for bad frames, resync on the sync byte,
//! inter-byte timeout) -> bus master on `DeviceCore`'s bus port -> response framer
//! -> UART transmitter. The protocol is [`crate::proto`]'s.
//!
//! - A request is parsed byte by byte: the CRC is updated as each byte arrives
//!   (residue 0 for a good frame, the CRC being sent big-endian). Bytes outside a
//!   frame are skipped until a [`REQ_SYNC`](crate::proto::REQ_SYNC). A frame that
//!   stops short is dropped after `byte_timeout` cycles without a byte (no response:
//!   the host times out and retries). A `len` above 8 is answered `BadLength` at
//!   once (the rest of that frame is then skipped as noise).
//! - A good frame repeating the last executed request's `seq` and `op` is answered
//!   with the remembered response and not executed (a retried write to FLASH_CMD
//!   acts once). IDENTIFY always executes and forgets the remembered request;
//!   errors (bad CRC/op/length/argument, busy timeout) are not remembered.
//! - Bus: waits for `ready` (up to `busy_timeout` cycles, else `BusyTimeout`,
//!   nothing done), raises `strobe` in the same cycle it sees `ready` (so no OOB
//!   command of the core can slip in between), takes `rdata` on `ack`. RESET
//!   raises `dev_reset` for one cycle (from a register: the core's `ready` answers
//!   `reset` combinationally) and waits for `ready` again.
//! - Bytes arriving while a request is executed or answered are dropped (the host
//!   sends one request at a time).

use hilrig_fpga::oob::Crc16Step;
use hilrig_fpga::uart::{UartRx, UartTx};
use rust_hdl::prelude::*;

/// Elaboration parameters of the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgeParams {
    /// Clock cycles per UART bit (12 MHz / 115200 baud: 104; simulation: 4..8).
    pub divisor: u16,
    /// Cycles without a byte after which a partial request is dropped (at most
    /// 2^24 - 1).
    pub byte_timeout: u32,
    /// Cycles the bridge waits for the device's `ready` before answering
    /// `BusyTimeout` (at most 2^24 - 1).
    pub busy_timeout: u32,
    /// Size of the expansion ROM in 32-bit words (ROM_READ addresses are below it).
    pub rom_words: u32,
}

impl BridgeParams {
    /// Parameters for `divisor` cycles a bit: a partial frame is dropped after 64
    /// character times of silence (5.5 ms at 115200 baud), the device may stay busy
    /// for 2^22 cycles (0.35 s at 12 MHz: more than erasing a 1 MiB region).
    pub fn new(divisor: u16, rom_words: u32) -> BridgeParams {
        BridgeParams {
            divisor,
            byte_timeout: 640 * divisor as u32,
            busy_timeout: 1 << 22,
            rom_words,
        }
    }
}

/// Bridge states.
#[derive(Copy, Clone, PartialEq, Eq, Debug, LogicState)]
pub enum BridgeState {
    /// Skipping bytes until a sync byte.
    Hunt,
    /// Receiving a frame.
    Recv,
    /// Judging the received frame.
    Check,
    /// Waiting for the device to be ready; strobes when it is.
    Wait,
    /// Waiting for the access's `ack`.
    Acked,
    /// RESET: `dev_reset` high for this cycle.
    ResetPulse,
    /// RESET: waiting for the device to be ready again.
    ResetWait,
    /// Sending the response.
    Send,
}

/// The host bridge.
pub struct HostBridge {
    /// Clock.
    pub clock: Signal<In, Clock>,
    /// Synchronous reset (power-on): forget everything, hunt for a frame.
    pub reset: Signal<In, Bit>,
    /// UART receive line from the host (idle high).
    pub rx: Signal<In, Bit>,
    /// UART transmit line to the host.
    pub tx: Signal<Out, Bit>,
    /// Bus: access strobe.
    pub strobe: Signal<Out, Bit>,
    /// Bus: word address.
    pub addr: Signal<Out, Bits<18>>,
    /// Bus: write.
    pub we: Signal<Out, Bit>,
    /// Bus: write data.
    pub wdata: Signal<Out, Bits<32>>,
    /// Bus: byte enables.
    pub be: Signal<Out, Bits<4>>,
    /// Bus: expansion ROM instead of BAR0.
    pub rom_sel: Signal<Out, Bit>,
    /// Device reset (volatile state), one cycle.
    pub dev_reset: Signal<Out, Bit>,
    /// Bus: the device is ready for an access.
    pub ready: Signal<In, Bit>,
    /// Bus: access acknowledged.
    pub ack: Signal<In, Bit>,
    /// Bus: read data.
    pub rdata: Signal<In, Bits<32>>,
    /// Nothing in progress (hunting, transmitter idle): for simulation drivers.
    pub idle: Signal<Out, Bit>,
    /// A frame is partly received: for simulation drivers.
    pub receiving: Signal<Out, Bit>,
    /// UART receiver.
    pub urx: UartRx,
    /// UART transmitter.
    pub utx: UartTx,
    /// CRC step of the receive path.
    pub crx: Crc16Step,
    /// CRC step of the transmit path.
    pub ctx: Crc16Step,

    state: DFF<BridgeState>,
    cnt: DFF<Bits<8>>,
    seq: DFF<Bits<8>>,
    opc: DFF<Bits<8>>,
    len: DFF<Bits<8>>,
    faddr: DFF<Bits<24>>,
    fbe: DFF<Bits<8>>,
    fdata: DFF<Bits<32>>,
    crc: DFF<Bits<16>>,
    timer: DFF<Bits<24>>,
    status: DFF<Bits<8>>,
    rword: DFF<Bits<32>>,
    txi: DFF<Bits<4>>,
    tcrc: DFF<Bits<16>>,
    last_valid: DFF<Bit>,
    last_seq: DFF<Bits<8>>,
    last_op: DFF<Bits<8>>,
    last_status: DFF<Bits<8>>,
    last_data: DFF<Bits<32>>,

    exp_len: Signal<Local, Bits<8>>,
    op_ok: Signal<Local, Bit>,
    arg_ok: Signal<Local, Bit>,
    fi: Signal<Local, Bits<8>>,
    tx_byte: Signal<Local, Bits<8>>,
    tx_go: Signal<Local, Bit>,

    k_byte_to: Constant<Bits<24>>,
    k_busy_to: Constant<Bits<24>>,
    k_rom_words: Constant<Bits<24>>,
    k_bar0_words: Constant<Bits<24>>,
    k_ident: Constant<Bits<32>>,
    k_req_sync: Constant<Bits<8>>,
    k_resp_sync: Constant<Bits<8>>,
    k_max_len: Constant<Bits<8>>,
}

hilrig_fpga::sim_block!(impl[] HostBridge, HostBridge {
    clock: clock,
    reset: input,
    rx: input,
    tx: output,
    strobe: output,
    addr: output,
    we: output,
    wdata: output,
    be: output,
    rom_sel: output,
    dev_reset: output,
    ready: input,
    ack: input,
    rdata: input,
    idle: output,
    receiving: output,
    urx: block,
    utx: block,
    crx: block,
    ctx: block,
    state: dff,
    cnt: dff,
    seq: dff,
    opc: dff,
    len: dff,
    faddr: dff,
    fbe: dff,
    fdata: dff,
    crc: dff,
    timer: dff,
    status: dff,
    rword: dff,
    txi: dff,
    tcrc: dff,
    last_valid: dff,
    last_seq: dff,
    last_op: dff,
    last_status: dff,
    last_data: dff,
    exp_len: local,
    op_ok: local,
    arg_ok: local,
    fi: local,
    tx_byte: local,
    tx_go: local,
    k_byte_to: konst,
    k_busy_to: konst,
    k_rom_words: konst,
    k_bar0_words: konst,
    k_ident: konst,
    k_req_sync: konst,
    k_resp_sync: konst,
    k_max_len: konst,
});

impl HostBridge {
    /// Elaborate the bridge for `p`.
    pub fn new(p: BridgeParams) -> HostBridge {
        let c32 = |v: u32| Constant::<Bits<32>>::new((v as u64).into());
        let c8 = |v: u8| Constant::<Bits<8>>::new((v as u64).into());
        let c24 = |v: u32| Constant::<Bits<24>>::new(((v as u64).min(0xff_ffff)).into());
        HostBridge {
            clock: Default::default(),
            reset: Default::default(),
            rx: Default::default(),
            tx: Default::default(),
            strobe: Default::default(),
            addr: Default::default(),
            we: Default::default(),
            wdata: Default::default(),
            be: Default::default(),
            rom_sel: Default::default(),
            dev_reset: Default::default(),
            ready: Default::default(),
            ack: Default::default(),
            rdata: Default::default(),
            idle: Default::default(),
            receiving: Default::default(),
            urx: UartRx::new(p.divisor),
            utx: UartTx::new(p.divisor),
            crx: Crc16Step::new(),
            ctx: Crc16Step::new(),
            state: Default::default(),
            cnt: Default::default(),
            seq: Default::default(),
            opc: Default::default(),
            len: Default::default(),
            faddr: Default::default(),
            fbe: Default::default(),
            fdata: Default::default(),
            crc: Default::default(),
            timer: Default::default(),
            status: Default::default(),
            rword: Default::default(),
            txi: Default::default(),
            tcrc: Default::default(),
            last_valid: Default::default(),
            last_seq: Default::default(),
            last_op: Default::default(),
            last_status: Default::default(),
            last_data: Default::default(),
            exp_len: Default::default(),
            op_ok: Default::default(),
            arg_ok: Default::default(),
            fi: Default::default(),
            tx_byte: Default::default(),
            tx_go: Default::default(),
            k_byte_to: c24(p.byte_timeout.max(1)),
            k_busy_to: c24(p.busy_timeout.max(1)),
            k_rom_words: c24(p.rom_words),
            k_bar0_words: c24(crate::proto::BAR0_WORDS),
            k_ident: c32(((crate::proto::VERSION as u32) << 24) | p.rom_words.min(0xff_ffff)),
            k_req_sync: c8(crate::proto::REQ_SYNC),
            k_resp_sync: c8(crate::proto::RESP_SYNC),
            k_max_len: c8(crate::proto::MAX_FIELDS as u8),
        }
    }

    /// The current state (for tests).
    pub fn state(&self) -> BridgeState {
        self.state.q.val()
    }
}

impl Logic for HostBridge {
    #[hdl_gen]
    fn update(&mut self) {
        dff_setup!(
            self,
            clock,
            state,
            cnt,
            seq,
            opc,
            len,
            faddr,
            fbe,
            fdata,
            crc,
            timer,
            status,
            rword,
            txi,
            tcrc,
            last_valid,
            last_seq,
            last_op,
            last_status,
            last_data
        );
        clock!(self, clock, urx, utx);
        self.urx.rx.next = self.rx.val();
        self.tx.next = self.utx.tx.val();

        // Defaults.
        self.strobe.next = false;
        self.addr.next = bit_cast::<18, 24>(self.faddr.q.val());
        self.we.next = self.opc.q.val() == 3;
        self.wdata.next = self.fdata.q.val();
        self.be.next = bit_cast::<4, 8>(self.fbe.q.val());
        self.rom_sel.next = false;
        self.dev_reset.next = false;
        self.idle.next = (self.state.q.val() == BridgeState::Hunt) & self.utx.ready.val();
        self.receiving.next = self.state.q.val() == BridgeState::Recv;
        self.tx_go.next = false;
        self.fi.next = self.cnt.q.val() - 3;

        // What the received op needs (IDENTIFY 1, READ 2, WRITE 3, ROM_READ 4, RESET 5).
        self.op_ok.next = true;
        self.exp_len.next = 0.into();
        self.arg_ok.next = true;
        if self.opc.q.val() == 1 {
            self.exp_len.next = 0.into();
        } else if self.opc.q.val() == 2 {
            self.exp_len.next = 4.into();
            self.arg_ok.next =
                (self.faddr.q.val() < self.k_bar0_words.val()) & (self.fbe.q.val() < 16);
        } else if self.opc.q.val() == 3 {
            self.exp_len.next = 8.into();
            self.arg_ok.next =
                (self.faddr.q.val() < self.k_bar0_words.val()) & (self.fbe.q.val() < 16);
        } else if self.opc.q.val() == 4 {
            self.exp_len.next = 3.into();
            self.arg_ok.next = self.faddr.q.val() < self.k_rom_words.val();
        } else if self.opc.q.val() == 5 {
            self.exp_len.next = 0.into();
        } else {
            self.op_ok.next = false;
        }

        // The response byte at `txi`.
        self.tx_byte.next = self.k_resp_sync.val();
        if self.txi.q.val() == 1 {
            self.tx_byte.next = self.seq.q.val();
        }
        if self.txi.q.val() == 2 {
            self.tx_byte.next = self.opc.q.val();
        }
        if self.txi.q.val() == 3 {
            self.tx_byte.next = self.status.q.val();
        }
        if (self.txi.q.val() >= 4) & (self.txi.q.val() < 8) {
            self.tx_byte.next = bit_cast::<8, 32>(self.rword.q.val());
        }
        if self.txi.q.val() == 8 {
            self.tx_byte.next = bit_cast::<8, 16>(self.tcrc.q.val() >> 8);
        }
        if self.txi.q.val() == 9 {
            self.tx_byte.next = bit_cast::<8, 16>(self.tcrc.q.val());
        }

        match self.state.q.val() {
            BridgeState::Hunt => {
                if self.urx.valid.val() & (self.urx.data.val() == self.k_req_sync.val()) {
                    self.state.d.next = BridgeState::Recv;
                    self.cnt.d.next = 0.into();
                    self.crc.d.next = 0xffff.into();
                    self.timer.d.next = 0.into();
                    self.faddr.d.next = 0.into();
                    self.fbe.d.next = 0.into();
                    self.fdata.d.next = 0.into();
                }
            }
            BridgeState::Recv => {
                self.timer.d.next = self.timer.q.val() + 1;
                if self.timer.q.val() == self.k_byte_to.val() {
                    // A frame cut short: drop it.
                    self.state.d.next = BridgeState::Hunt;
                }
                if self.urx.valid.val() {
                    self.timer.d.next = 0.into();
                    self.crc.d.next = self.crx.crc_out.val();
                    self.cnt.d.next = self.cnt.q.val() + 1;
                    if self.cnt.q.val() == 0 {
                        self.seq.d.next = self.urx.data.val();
                    }
                    if self.cnt.q.val() == 1 {
                        self.opc.d.next = self.urx.data.val();
                    }
                    if self.cnt.q.val() == 2 {
                        self.len.d.next = self.urx.data.val();
                        if self.urx.data.val() > self.k_max_len.val() {
                            self.status.d.next = 3.into();
                            self.rword.d.next = 0.into();
                            self.txi.d.next = 0.into();
                            self.state.d.next = BridgeState::Send;
                        }
                    }
                    if (self.cnt.q.val() >= 3) & (self.fi.val() < self.len.q.val()) {
                        if self.fi.val() < 3 {
                            self.faddr.d.next = (self.faddr.q.val() >> 8)
                                | (bit_cast::<24, 8>(self.urx.data.val()) << 16);
                        }
                        if self.fi.val() == 3 {
                            self.fbe.d.next = self.urx.data.val();
                        }
                        if self.fi.val() >= 4 {
                            self.fdata.d.next = (self.fdata.q.val() >> 8)
                                | (bit_cast::<32, 8>(self.urx.data.val()) << 24);
                        }
                    }
                    if (self.cnt.q.val() >= 4) & (self.cnt.q.val() == self.len.q.val() + 4) {
                        self.state.d.next = BridgeState::Check;
                    }
                }
            }
            BridgeState::Check => {
                self.txi.d.next = 0.into();
                self.timer.d.next = 0.into();
                self.rword.d.next = 0.into();
                self.state.d.next = BridgeState::Send;
                if self.crc.q.val() != 0 {
                    self.status.d.next = 1.into();
                } else if !self.op_ok.val() {
                    self.status.d.next = 2.into();
                } else if self.len.q.val() != self.exp_len.val() {
                    self.status.d.next = 3.into();
                } else if self.opc.q.val() == 1 {
                    self.status.d.next = 0.into();
                    self.rword.d.next = self.k_ident.val();
                    self.last_valid.d.next = false;
                } else if self.last_valid.q.val()
                    & (self.seq.q.val() == self.last_seq.q.val())
                    & (self.opc.q.val() == self.last_op.q.val())
                {
                    // A retry of the last executed request: answer it again.
                    self.status.d.next = self.last_status.q.val();
                    self.rword.d.next = self.last_data.q.val();
                } else if !self.arg_ok.val() {
                    self.status.d.next = 4.into();
                } else {
                    self.state.d.next = BridgeState::Wait;
                }
            }
            BridgeState::Wait => {
                self.timer.d.next = self.timer.q.val() + 1;
                if self.ready.val() {
                    if self.opc.q.val() == 5 {
                        self.state.d.next = BridgeState::ResetPulse;
                    } else {
                        self.strobe.next = true;
                        self.rom_sel.next = self.opc.q.val() == 4;
                        self.timer.d.next = 0.into();
                        self.state.d.next = BridgeState::Acked;
                    }
                } else if self.timer.q.val() == self.k_busy_to.val() {
                    self.status.d.next = 5.into();
                    self.state.d.next = BridgeState::Send;
                }
            }
            BridgeState::Acked => {
                self.timer.d.next = self.timer.q.val() + 1;
                if self.ack.val() {
                    self.status.d.next = 0.into();
                    if self.opc.q.val() != 3 {
                        self.rword.d.next = self.rdata.val();
                        self.last_data.d.next = self.rdata.val();
                    } else {
                        self.last_data.d.next = 0.into();
                    }
                    self.last_valid.d.next = true;
                    self.last_seq.d.next = self.seq.q.val();
                    self.last_op.d.next = self.opc.q.val();
                    self.last_status.d.next = 0.into();
                    self.state.d.next = BridgeState::Send;
                } else if self.timer.q.val() == self.k_busy_to.val() {
                    self.status.d.next = 5.into();
                    self.state.d.next = BridgeState::Send;
                }
            }
            BridgeState::ResetPulse => {
                self.dev_reset.next = true;
                self.timer.d.next = 0.into();
                self.state.d.next = BridgeState::ResetWait;
            }
            BridgeState::ResetWait => {
                self.timer.d.next = self.timer.q.val() + 1;
                if self.ready.val() {
                    self.status.d.next = 0.into();
                    self.last_valid.d.next = true;
                    self.last_seq.d.next = self.seq.q.val();
                    self.last_op.d.next = self.opc.q.val();
                    self.last_status.d.next = 0.into();
                    self.last_data.d.next = 0.into();
                    self.state.d.next = BridgeState::Send;
                } else if self.timer.q.val() == self.k_busy_to.val() {
                    // The reset happened; the device is still busy after it.
                    self.status.d.next = 5.into();
                    self.state.d.next = BridgeState::Send;
                }
            }
            BridgeState::Send => {
                if self.utx.ready.val() {
                    self.tx_go.next = true;
                    self.txi.d.next = self.txi.q.val() + 1;
                    if self.txi.q.val() == 0 {
                        self.tcrc.d.next = 0xffff.into();
                    }
                    if (self.txi.q.val() >= 1) & (self.txi.q.val() < 8) {
                        self.tcrc.d.next = self.ctx.crc_out.val();
                    }
                    if (self.txi.q.val() >= 4) & (self.txi.q.val() < 8) {
                        self.rword.d.next = self.rword.q.val() >> 8;
                    }
                    if self.txi.q.val() == 9 {
                        self.state.d.next = BridgeState::Hunt;
                    }
                }
            }
        }

        if self.reset.val() {
            self.state.d.next = BridgeState::Hunt;
            self.last_valid.d.next = false;
            self.txi.d.next = 0.into();
        }

        // Sub-block inputs, each assigned once (see the fpga crate's Verilog rule).
        self.crx.crc_in.next = self.crc.q.val();
        self.crx.data_in.next = self.urx.data.val();
        self.ctx.crc_in.next = self.tcrc.q.val();
        self.ctx.data_in.next = self.tx_byte.val();
        self.utx.data.next = self.tx_byte.val();
        self.utx.start.next = self.tx_go.val();
    }
}

/// The bridge's Verilog on its own (rust-hdl's checks run first).
pub fn bridge_verilog(p: BridgeParams) -> String {
    let mut b = HostBridge::new(p);
    b.connect_all();
    generate_verilog(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{self, Request, Response, Status};
    use crate::uartsim::{LineDriver, SoftRx};
    use hilrig_fpga::sim::Clocked;

    /// The bridge with a software bus slave: 64 words of RAM, `ready` low while
    /// `busy` is non-zero, every strobe counted.
    struct Bench {
        b: HostBridge,
        ram: [u32; 64],
        busy: u64,
        strobes: u32,
        resets: u32,
        pending_ack: Option<u32>,
        drv: LineDriver,
        rx: SoftRx,
        reader: proto::ResponseReader,
        cycles: u64,
    }

    impl Bench {
        fn new(divisor: u16) -> Bench {
            let mut b = HostBridge::new(BridgeParams {
                byte_timeout: 40 * divisor as u32,
                busy_timeout: 500,
                ..BridgeParams::new(divisor, 16)
            });
            b.connect_all();
            b.rx.next = true;
            let mut s = Bench {
                b,
                ram: [0; 64],
                busy: 0,
                strobes: 0,
                resets: 0,
                pending_ack: None,
                drv: LineDriver::new(divisor),
                rx: SoftRx::new(divisor),
                reader: Default::default(),
                cycles: 0,
            };
            s.tick();
            s
        }

        fn settle(&mut self) {
            loop {
                self.b.update_all();
                if !self.b.has_changed() {
                    break;
                }
            }
        }

        fn tick(&mut self) {
            // Bus slave outputs for this cycle.
            self.b.ready.next = self.busy == 0;
            self.b.ack.next = self.pending_ack.is_some();
            self.b.rdata.next = (self.pending_ack.unwrap_or(0) as u64).into();
            self.b.rx.next = self.drv.level();
            self.settle();
            // The slave samples the strobe at the rising edge.
            let strobe = self.b.strobe.val() && self.busy == 0;
            let (a, we, wd, be) = (
                self.b.addr.val().index(),
                self.b.we.val(),
                self.b.wdata.val().to_u32(),
                self.b.be.val().index() as u32,
            );
            let rom = self.b.rom_sel.val();
            if self.b.dev_reset.val() {
                self.resets += 1;
                self.busy = 3;
            }
            self.pending_ack = None;
            if strobe {
                self.strobes += 1;
                let slot = a % 64;
                if we {
                    let m = hilrig_device::device::byte_mask_bits(be as u8);
                    self.ram[slot] = (self.ram[slot] & !m) | (wd & m);
                }
                self.pending_ack = Some(if rom {
                    0x7070_0000u32.wrapping_add(a as u32)
                } else {
                    self.ram[slot]
                });
            }
            self.busy = self.busy.saturating_sub(1);
            self.b.clock_to(true, false);
            self.settle();
            self.b.clock_to(false, false);
            self.drv.advance();
            self.rx.sample(self.b.tx.val());
            self.cycles += 1;
        }

        /// Send bytes and run until `n` responses came back (or the bridge is idle
        /// for a while); returns them.
        fn exchange(&mut self, bytes: &[u8], n: usize) -> Vec<Result<Response, proto::ProtoError>> {
            self.drv.push(bytes);
            let mut out = Vec::new();
            let mut quiet = 0;
            while out.len() < n && quiet < 2000 {
                self.tick();
                for b in self.rx.take() {
                    if let Some(r) = self.reader.push(b) {
                        out.push(r);
                    }
                }
                if self.drv.is_idle() && self.b.idle.val() {
                    quiet += 1;
                } else {
                    quiet = 0;
                }
            }
            out
        }

        fn one(&mut self, seq: u8, req: &Request) -> Response {
            let r = self.exchange(&proto::encode_request(seq, req), 1);
            assert_eq!(r.len(), 1, "{req}: no response");
            r[0].clone().expect("a well-formed response")
        }
    }

    fn bench_at(divisor: u16) {
        let mut t = Bench::new(divisor);
        let id = t.one(1, &Request::Identify);
        assert_eq!(id.status, Status::Ok);
        assert_eq!(id.data, (1 << 24) | 16);
        // Write with byte enables, read back.
        let w = t.one(
            2,
            &Request::Write {
                addr: 5,
                be: 0xf,
                data: 0x1122_3344,
            },
        );
        assert_eq!((w.seq, w.op, w.status), (2, proto::op::WRITE, Status::Ok));
        t.one(
            3,
            &Request::Write {
                addr: 5,
                be: 0b0010,
                data: 0xaaaa_bbbb,
            },
        );
        let r = t.one(4, &Request::Read { addr: 5, be: 0xf });
        assert_eq!((r.status, r.data), (Status::Ok, 0x1122_bb44));
        assert_eq!(t.strobes, 3);
        // A repeated seq+op is answered from memory, not executed again.
        let again = t.one(4, &Request::Read { addr: 5, be: 0xf });
        assert_eq!(again, r);
        t.one(
            5,
            &Request::Write {
                addr: 6,
                be: 0xf,
                data: 1,
            },
        );
        let before = t.strobes;
        let dup = t.one(
            5,
            &Request::Write {
                addr: 6,
                be: 0xf,
                data: 1,
            },
        );
        assert_eq!(dup.status, Status::Ok);
        assert_eq!(t.strobes, before, "a retried write was executed twice");
        // ROM window.
        let rom = t.one(6, &Request::RomRead { addr: 3 });
        assert_eq!(rom.data, 0x7070_0003);
        assert_eq!(
            t.one(7, &Request::RomRead { addr: 16 }).status,
            Status::BadArgument
        );
        assert_eq!(
            t.one(
                8,
                &Request::Read {
                    addr: 1 << 14,
                    be: 1
                }
            )
            .status,
            Status::BadArgument
        );
        // Bad CRC, bad op, bad length: answered, not executed, not remembered.
        let mut bad = proto::encode_request(
            9,
            &Request::Write {
                addr: 7,
                be: 0xf,
                data: 9,
            },
        );
        bad[6] ^= 0x40;
        let s = t.strobes;
        let r = t.exchange(&bad, 1);
        assert_eq!(r[0].as_ref().map(|r| r.status), Ok(Status::BadCrc));
        assert_eq!(t.strobes, s);
        let ok = t.one(
            9,
            &Request::Write {
                addr: 7,
                be: 0xf,
                data: 9,
            },
        );
        assert_eq!(ok.status, Status::Ok);
        assert_eq!(t.strobes, s + 1);
        let mut f = vec![proto::REQ_SYNC, 10, 0x33, 0];
        let c = proto::crc16(&f[1..]);
        f.extend_from_slice(&c.to_be_bytes());
        assert_eq!(
            t.exchange(&f, 1)[0].as_ref().map(|r| r.status),
            Ok(Status::BadOp)
        );
        let mut f = vec![proto::REQ_SYNC, 11, proto::op::READ, 1, 0];
        let c = proto::crc16(&f[1..]);
        f.extend_from_slice(&c.to_be_bytes());
        assert_eq!(
            t.exchange(&f, 1)[0].as_ref().map(|r| r.status),
            Ok(Status::BadLength)
        );
        let r = t.exchange(&[proto::REQ_SYNC, 12, 2, 200], 1);
        assert_eq!(
            r[0].as_ref().map(|r| (r.seq, r.status)),
            Ok((12, Status::BadLength))
        );
        // Garbage, then a truncated frame, then silence: the bridge resyncs.
        let mut g = vec![0x00, 0xff, 0x13];
        g.extend_from_slice(&proto::encode_request(13, &Request::Read { addr: 7, be: 0xf })[..5]);
        assert!(
            t.exchange(&g, 1).is_empty(),
            "a truncated frame was answered"
        );
        assert_eq!(
            t.b.state(),
            BridgeState::Hunt,
            "timeout did not drop the frame"
        );
        assert_eq!(t.one(14, &Request::Read { addr: 7, be: 0xf }).data, 9);
        // Busy device: BusyTimeout, and the request is not executed.
        t.busy = 100_000;
        let s = t.strobes;
        assert_eq!(
            t.one(
                15,
                &Request::Write {
                    addr: 8,
                    be: 0xf,
                    data: 3
                }
            )
            .status,
            Status::BusyTimeout
        );
        assert_eq!(t.strobes, s);
        t.busy = 0;
        assert_eq!(
            t.one(
                15,
                &Request::Write {
                    addr: 8,
                    be: 0xf,
                    data: 3
                }
            )
            .status,
            Status::Ok
        );
        assert_eq!(t.strobes, s + 1);
        // RESET pulses once, also when retried.
        t.one(16, &Request::Reset);
        t.one(16, &Request::Reset);
        assert_eq!(t.resets, 1);
        // IDENTIFY forgets the remembered request: seq 16 executes anew.
        t.one(16, &Request::Identify);
        t.one(16, &Request::Reset);
        assert_eq!(t.resets, 2);
    }

    #[test]
    fn bridge_bench_divisor_4() {
        bench_at(4);
    }

    #[test]
    fn bridge_bench_divisor_7() {
        bench_at(7);
    }

    #[test]
    fn bridge_generates_verilog() {
        let v = bridge_verilog(BridgeParams::new(104, 512));
        assert!(v.contains("module top"));
    }
}

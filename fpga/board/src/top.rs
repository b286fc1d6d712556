//! `BoardTop`: what goes on the FPGA. The device core ([`DeviceCore`], built with
//! [`CoreParams::small`] for synthesis) driven by the [`HostBridge`] on the FTDI
//! UART pins, the core's OOB UART on a second pair of pins, eight LEDs showing
//! MASTER's low bits, and a power-on reset.
//!
//! Nonvolatile state on a board: there is no host-side state file, so the top acks
//! every `persist_req` of the core itself, at once. Counters, MASTER, fuse, EPOCH
//! and flash live in the FPGA's registers and block RAM: they survive device resets
//! (RESET over the bridge, SOFT_RESET) but **not** power-off or reconfiguration,
//! which bring the device back factory-fresh (flash as configured in the bitstream,
//! counters zero).

use crate::bridge::{BridgeParams, HostBridge};
use hilrig_fpga::core::{CoreParams, DeviceCore};
use hilrig_fpga::sim::{move_clock, Clocked};
use rust_hdl::prelude::*;

/// Cycles the power-on reset holds the core and the bridge in reset.
pub const POR_CYCLES: u8 = 16;

/// Elaboration parameters of the board top.
///
/// The top's ports follow the board flow's port contract (`fpga/flow`): `clock`,
/// `uart_rx`, `uart_tx`, `oob_rx`, `oob_tx`, `leds[7:0]` (active high), module `top`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoardParams {
    /// The device core (use [`CoreParams::small`] for an iCE40; its `oob_divisor`
    /// sets the OOB UART's baud rate).
    pub core: CoreParams,
    /// The host bridge (its `divisor` sets the FTDI UART's baud rate).
    pub bridge: BridgeParams,
}

impl BoardParams {
    /// The iCE40 build: a small core of counter `width` and `serial`, both UARTs at
    /// 115200 baud from a 12 MHz clock.
    pub fn board(width: u8, serial: u64) -> BoardParams {
        BoardParams::with_divisors(CoreParams::small(width, serial), 104, 104)
    }

    /// The build for a board clocked at `clock_hz` with both UARTs at `baud`
    /// (divisor `clock_hz / baud`, rounded; e.g. 100 MHz at 115200: 868).
    pub fn for_clock(width: u8, serial: u64, clock_hz: u32, baud: u32) -> BoardParams {
        let d = ((clock_hz as u64 + baud.max(1) as u64 / 2) / baud.max(1) as u64)
            .clamp(2, u16::MAX as u64) as u16;
        BoardParams::with_divisors(CoreParams::small(width, serial), d, d)
    }

    /// `core` with the bridge UART at `host_divisor` and the OOB UART at
    /// `oob_divisor` cycles a bit (simulation uses 4..8).
    pub fn with_divisors(core: CoreParams, host_divisor: u16, oob_divisor: u16) -> BoardParams {
        let core = CoreParams {
            oob_divisor,
            ..core
        };
        BoardParams {
            core,
            bridge: BridgeParams::new(host_divisor, core.region_sizes[0] / 4),
        }
    }
}

/// The board's top level.
pub struct BoardTop {
    /// The board clock (12 MHz on an iCE40 dev board).
    pub clock: Signal<In, Clock>,
    /// FTDI UART, host to board (idle high).
    pub uart_rx: Signal<In, Bit>,
    /// FTDI UART, board to host.
    pub uart_tx: Signal<Out, Bit>,
    /// OOB UART receive pin (idle high).
    pub oob_rx: Signal<In, Bit>,
    /// OOB UART transmit pin.
    pub oob_tx: Signal<Out, Bit>,
    /// LEDs: MASTER's low eight bits.
    pub leds: Signal<Out, Bits<8>>,
    /// The device core.
    pub core: DeviceCore,
    /// The host bridge.
    pub bridge: HostBridge,
    por: DFF<Bits<8>>,
    in_reset: Signal<Local, Bit>,
    k_por: Constant<Bits<8>>,
    /// Simulation only: the core's last evaluation changed nothing (it is skipped
    /// while its inputs stay put and its clock edges change nothing).
    _core_quiet: bool,
}

impl Block for BoardTop {
    fn connect_all(&mut self) {
        self.connect();
        self.clock.connect_all();
        self.uart_rx.connect_all();
        self.uart_tx.connect_all();
        self.oob_rx.connect_all();
        self.oob_tx.connect_all();
        self.leds.connect_all();
        self.core.connect_all();
        self.bridge.connect_all();
        self.por.connect_all();
        self.in_reset.connect_all();
        self.k_por.connect_all();
    }

    fn update_all(&mut self) {
        self.update();
        self.clock.update_all();
        self.uart_rx.update_all();
        self.uart_tx.update_all();
        self.oob_rx.update_all();
        self.oob_tx.update_all();
        self.leds.update_all();
        // The core is skipped while evaluating it would change nothing: its last
        // evaluation changed nothing and none of the inputs driven here moved.
        let c = &self.core;
        let steady = c.reset.next == c.reset.val()
            && c.strobe.next == c.strobe.val()
            && c.addr.next == c.addr.val()
            && c.we.next == c.we.val()
            && c.wdata.next == c.wdata.val()
            && c.be.next == c.be.val()
            && c.rom_sel.next == c.rom_sel.val()
            && c.persist_ack.next == c.persist_ack.val()
            && c.uart_rx.next == c.uart_rx.val();
        if !(self._core_quiet && steady) {
            self.core.update_all();
            self._core_quiet = !self.core.has_changed();
        }
        self.bridge.update_all();
        self.por.update_all();
        self.in_reset.update_all();
        self.k_por.update_all();
    }

    fn has_changed(&self) -> bool {
        self.clock.has_changed()
            || self.uart_rx.has_changed()
            || self.uart_tx.has_changed()
            || self.oob_rx.has_changed()
            || self.oob_tx.has_changed()
            || self.leds.has_changed()
            // A quiet core's change flags are all clear (see `update_all`).
            || (!self._core_quiet && self.core.has_changed())
            || self.bridge.has_changed()
            || self.por.clock.has_changed()
            || self.por.q.has_changed()
            || self.in_reset.has_changed()
    }

    fn accept(&self, name: &str, probe: &mut dyn Probe) {
        probe.visit_start_scope(name, self);
        self.clock.accept("clock", probe);
        self.uart_rx.accept("uart_rx", probe);
        self.uart_tx.accept("uart_tx", probe);
        self.oob_rx.accept("oob_rx", probe);
        self.oob_tx.accept("oob_tx", probe);
        self.leds.accept("leds", probe);
        self.core.accept("core", probe);
        self.bridge.accept("bridge", probe);
        self.por.accept("por", probe);
        self.in_reset.accept("in_reset", probe);
        self.k_por.accept("k_por", probe);
        probe.visit_end_scope(name, self);
    }
}

impl BoardTop {
    #[allow(dead_code, clippy::needless_pass_by_value)]
    fn exhaustive_field_list(x: BoardTop) {
        let BoardTop {
            clock: _,
            uart_rx: _,
            uart_tx: _,
            oob_rx: _,
            oob_tx: _,
            leds: _,
            core: _,
            bridge: _,
            por: _,
            in_reset: _,
            k_por: _,
            _core_quiet: _,
        } = x;
    }
}

impl BoardTop {
    /// Elaborate the top for `p`.
    pub fn new(p: BoardParams) -> BoardTop {
        BoardTop {
            clock: Default::default(),
            uart_rx: Default::default(),
            uart_tx: Default::default(),
            oob_rx: Default::default(),
            oob_tx: Default::default(),
            leds: Default::default(),
            core: DeviceCore::new(p.core),
            bridge: HostBridge::new(p.bridge),
            por: Default::default(),
            in_reset: Default::default(),
            k_por: Constant::new((POR_CYCLES as u64).into()),
            _core_quiet: false,
        }
    }

    /// Whether the power-on reset is still running.
    pub fn in_power_on_reset(&self) -> bool {
        self.por.q.val().index() < POR_CYCLES as usize
    }
}

impl Clocked for BoardTop {
    fn clock_to(&mut self, clk: bool, silent: bool) {
        move_clock(&mut self.clock, clk, silent);
        move_clock(&mut self.por.clock, clk, silent);
        // A rising edge that changes nothing in a quiet core is not shown to it.
        let silent_core = silent || (clk && self._core_quiet && self.core.edge_is_noop());
        if clk && !silent_core {
            self._core_quiet = false;
        }
        Clocked::clock_to(&mut self.core, clk, silent_core);
        self.bridge.clock_to(clk, silent);
    }
    fn edge_is_noop(&self) -> bool {
        false
    }
}

impl Logic for BoardTop {
    #[hdl_gen]
    fn update(&mut self) {
        dff_setup!(self, clock, por);
        clock!(self, clock, core, bridge);

        // Power-on reset: POR_CYCLES cycles from configuration.
        self.in_reset.next = self.por.q.val() < self.k_por.val();
        if self.por.q.val() < self.k_por.val() {
            self.por.d.next = self.por.q.val() + 1;
        }

        // Host bridge on the FTDI UART, mastering the core's bus.
        self.bridge.reset.next = self.in_reset.val();
        self.bridge.rx.next = self.uart_rx.val();
        self.uart_tx.next = self.bridge.tx.val();
        self.core.reset.next = self.in_reset.val() | self.bridge.dev_reset.val();
        self.core.strobe.next = self.bridge.strobe.val();
        self.core.addr.next = self.bridge.addr.val();
        self.core.we.next = self.bridge.we.val();
        self.core.wdata.next = self.bridge.wdata.val();
        self.core.be.next = self.bridge.be.val();
        self.core.rom_sel.next = self.bridge.rom_sel.val();
        self.bridge.ready.next = self.core.ready.val();
        self.bridge.ack.next = self.core.ack.val();
        self.bridge.rdata.next = self.core.rdata.val();

        // No host-side state file: nonvolatile saves are acked at once.
        self.core.persist_ack.next = self.core.persist_req.val();
        self.core.persist_nak.next = false;
        self.core.nv_load.next = false;
        self.core.nv_ctr0_lo_in.next = 0.into();
        self.core.nv_ctr0_hi_in.next = 0.into();
        self.core.nv_ctr1_lo_in.next = 0.into();
        self.core.nv_ctr1_hi_in.next = 0.into();
        self.core.nv_ctr2_lo_in.next = 0.into();
        self.core.nv_ctr2_hi_in.next = 0.into();
        self.core.nv_cnt0_in.next = 0.into();
        self.core.nv_cnt1_in.next = 0.into();
        self.core.nv_cnt2_in.next = 0.into();
        self.core.nv_master_in.next = 0.into();
        self.core.nv_fuse_in.next = false;
        self.core.nv_epoch_in.next = 0.into();

        // The OOB port on its own pins; the byte interface is unused.
        self.core.oob_uart.next = true;
        self.core.uart_rx.next = self.oob_rx.val();
        self.oob_tx.next = self.core.uart_tx.val();
        self.core.oob_rx_data.next = 0.into();
        self.core.oob_rx_valid.next = false;
        self.core.oob_rx_end.next = false;
        self.core.oob_tx_ready.next = false;

        self.leds.next = bit_cast::<8, 32>(self.core.nv_master.val());
    }
}

/// The Verilog of the board top elaborated for `p` (module `top`; rust-hdl's checks
/// run first).
pub fn board_top_verilog(p: BoardParams) -> String {
    let mut t = BoardTop::new(p);
    t.connect_all();
    generate_verilog(&t)
}

//! The device core in rust-hdl: a bus-slave register file decoded from the
//! register table, the flash controller (keyed unlock, ERASE/PROGRAM state
//! machines, thermometer counters counted before acting, MASTER, fuse), hang
//! trigger, soft reset, the expansion-ROM window and the data buffers.
//!
//! Bus protocol (one 32-bit word per access, byte enables):
//! - while `ready` is high, hold `strobe` high for one rising edge with `addr` (byte
//!   address, 4-aligned), `we`, `wdata`, `be` and `rom_sel` (expansion ROM instead of
//!   BAR0) valid;
//! - the next cycle `ack` is high and, for reads, `rdata` holds the word;
//! - a FLASH_CMD keeps `ready` low until the command is done (`busy` meanwhile);
//! - `reset` (reset, FLR, power cycle) or SOFT_RESET_MAGIC clears the volatile
//!   registers in one cycle and bumps the data-buffer generation: buffer words
//!   written in an older generation read as 0 (and merge as 0 under byte writes and
//!   PROGRAM). Every 255th reset the generation wraps and the core walks the buffer
//!   RAM to zero, keeping `ready` low meanwhile;
//! - nonvolatile changes raise `persist_req` and wait for `persist_ack` (go on) or
//!   `persist_nak` (saving failed: stop, as the model does). The first is raised after
//!   the counter increments and BEFORE the command acts.
//!
//! Nonvolatile registers are loaded through `nv_load` (the boot-time read of the
//! nonvolatile store) and read back through the `nv_*` outputs; flash and keys live
//! in block RAMs loaded at configuration.

use crate::bram::Bram;
use crate::oob::OobEngine;
use crate::sim::Clocked;
use crate::uart::{UartRx, UartTx};
use hilrig_device::regmap::{self, Reg, BUFFER_SIZE};
use rust_hdl::prelude::*;

/// Word-address bits of a flash region RAM (1 MiB / 4).
pub const FLASH_ABITS: usize = 18;
/// Word-address bits of the data-buffer RAM.
pub const BUF_ABITS: usize = 14;
/// Words in the data-buffer area.
pub const BUF_WORDS: usize = BUFFER_SIZE / 4;

/// Geometry and identity the core is elaborated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreParams {
    /// Counter width (1..=64).
    pub width: u8,
    /// Region sizes in bytes (multiples of 4).
    pub region_sizes: [u32; 3],
    /// Serial number.
    pub serial: u64,
    /// Words of data-buffer RAM (the full area for simulation; fewer for a small
    /// synthesis build, where the rest of the area reads 0).
    pub buffer_words: usize,
    /// Clock cycles per bit of the OOB UART (115200 baud at 12 MHz: 104).
    pub oob_divisor: u16,
}

/// The default OOB UART divisor: 115200 baud from a 12 MHz clock.
pub const OOB_DIVISOR: u16 = 104;

impl CoreParams {
    /// The device `nv` describes, with the full data-buffer area (for simulation).
    pub fn of(nv: &hilrig_device::NvState) -> CoreParams {
        CoreParams {
            width: nv.config.counter_width,
            region_sizes: nv.config.region_sizes,
            serial: nv.serial,
            buffer_words: BUF_WORDS,
            oob_divisor: OOB_DIVISOR,
        }
    }

    /// A small build for synthesis on an iCE40 board: 2 KiB VBIOS, 1 KiB FIRMWARE,
    /// 256 B CONFIG, 1 KiB of data buffers (the rest of the area reads 0).
    pub fn small(width: u8, serial: u64) -> CoreParams {
        CoreParams {
            width,
            region_sizes: [2048, 1024, 256],
            serial,
            buffer_words: 256,
            oob_divisor: OOB_DIVISOR,
        }
    }
}

/// Control states.
#[derive(Copy, Clone, PartialEq, Debug, LogicState)]
pub enum CoreState {
    /// Waiting for a bus access.
    Idle,
    /// Completing a bus access (ack).
    Access,
    /// Counting a flash attempt.
    Count,
    /// Waiting for the count to be made durable.
    PersistCount,
    /// Deciding whether the attempt is refused.
    Decide,
    /// Erasing the region.
    Erase,
    /// Program: read flash and buffer words.
    ProgRead,
    /// Program: write the ANDed word.
    ProgWrite,
    /// Waiting for the flash change to be made durable.
    PersistDone,
    /// Walking the data-buffer RAM to zero (when the buffer generation wraps).
    Clear,
    /// An OOB PHYSICAL_RESET: the cleared state is offered for saving (`nv_*` show
    /// it) and committed on `persist_ack`; `persist_nak` leaves everything as it was.
    OobPersist,
    /// An OOB READ_HASH: the flash read port belongs to the SHA-256 unit.
    OobHash,
}

/// The device core.
pub struct DeviceCore {
    /// Clock.
    pub clock: Signal<In, Clock>,
    /// Synchronous reset of volatile state (reset, FLR, power cycle).
    pub reset: Signal<In, Bit>,
    /// Bus: access strobe.
    pub strobe: Signal<In, Bit>,
    /// Bus: word address (byte offset / 4).
    pub addr: Signal<In, Bits<18>>,
    /// Bus: write.
    pub we: Signal<In, Bit>,
    /// Bus: write data.
    pub wdata: Signal<In, Bits<32>>,
    /// Bus: byte enables.
    pub be: Signal<In, Bits<4>>,
    /// Bus: access the expansion ROM instead of BAR0 (reads only).
    pub rom_sel: Signal<In, Bit>,
    /// Bus: ready for an access.
    pub ready: Signal<Out, Bit>,
    /// Bus: access acknowledged; `rdata` valid.
    pub ack: Signal<Out, Bit>,
    /// Bus: read data.
    pub rdata: Signal<Out, Bits<32>>,
    /// A flash command is running.
    pub busy: Signal<Out, Bit>,
    /// Nonvolatile state changed: save it.
    pub persist_req: Signal<Out, Bit>,
    /// Saved.
    pub persist_ack: Signal<In, Bit>,
    /// Saving failed.
    pub persist_nak: Signal<In, Bit>,
    /// Load nonvolatile registers from the `nv_*_in` inputs (in Idle).
    pub nv_load: Signal<In, Bit>,
    /// Counter thermometer to load, bits 31:0.
    pub nv_ctr0_lo_in: Signal<In, Bits<32>>,
    /// Counter thermometer to load, bits 63:32.
    pub nv_ctr0_hi_in: Signal<In, Bits<32>>,
    /// Counter thermometer to load, bits 31:0.
    pub nv_ctr1_lo_in: Signal<In, Bits<32>>,
    /// Counter thermometer to load, bits 63:32.
    pub nv_ctr1_hi_in: Signal<In, Bits<32>>,
    /// Counter thermometer to load, bits 31:0.
    pub nv_ctr2_lo_in: Signal<In, Bits<32>>,
    /// Counter thermometer to load, bits 63:32.
    pub nv_ctr2_hi_in: Signal<In, Bits<32>>,
    /// Counter values (bits set) to load.
    pub nv_cnt0_in: Signal<In, Bits<8>>,
    /// Counter values (bits set) to load.
    pub nv_cnt1_in: Signal<In, Bits<8>>,
    /// Counter values (bits set) to load.
    pub nv_cnt2_in: Signal<In, Bits<8>>,
    /// MASTER to load.
    pub nv_master_in: Signal<In, Bits<32>>,
    /// Fuse to load.
    pub nv_fuse_in: Signal<In, Bit>,
    /// EPOCH to load.
    pub nv_epoch_in: Signal<In, Bits<32>>,
    /// Counter thermometer, bits 31:0.
    pub nv_ctr0_lo: Signal<Out, Bits<32>>,
    /// Counter thermometer, bits 63:32.
    pub nv_ctr0_hi: Signal<Out, Bits<32>>,
    /// Counter thermometer, bits 31:0.
    pub nv_ctr1_lo: Signal<Out, Bits<32>>,
    /// Counter thermometer, bits 63:32.
    pub nv_ctr1_hi: Signal<Out, Bits<32>>,
    /// Counter thermometer, bits 31:0.
    pub nv_ctr2_lo: Signal<Out, Bits<32>>,
    /// Counter thermometer, bits 63:32.
    pub nv_ctr2_hi: Signal<Out, Bits<32>>,
    /// MASTER.
    pub nv_master: Signal<Out, Bits<32>>,
    /// Fuse.
    pub nv_fuse: Signal<Out, Bit>,
    /// EPOCH.
    pub nv_epoch: Signal<Out, Bits<32>>,
    /// Hung (for tests and the backend).
    pub hung_out: Signal<Out, Bit>,
    /// OOB byte interface: request byte (bypassing the UART).
    pub oob_rx_data: Signal<In, Bits<8>>,
    /// OOB byte interface: `oob_rx_data` holds a byte.
    pub oob_rx_valid: Signal<In, Bit>,
    /// OOB byte interface: the request is complete.
    pub oob_rx_end: Signal<In, Bit>,
    /// OOB byte interface: response byte.
    pub oob_tx_data: Signal<Out, Bits<8>>,
    /// OOB byte interface: `oob_tx_data` holds a byte.
    pub oob_tx_valid: Signal<Out, Bit>,
    /// OOB byte interface: the response byte is taken (when `oob_uart` is low).
    pub oob_tx_ready: Signal<In, Bit>,
    /// Send OOB responses on the UART (`uart_tx`) instead of the byte interface.
    pub oob_uart: Signal<In, Bit>,
    /// OOB UART receive line (idle high).
    pub uart_rx: Signal<In, Bit>,
    /// OOB UART transmit line.
    pub uart_tx: Signal<Out, Bit>,
    /// The OOB protocol engine.
    pub oob: OobEngine,
    /// OOB UART receiver.
    pub urx: UartRx,
    /// OOB UART transmitter.
    pub utx: UartTx,

    /// Flash region RAMs (VBIOS, FIRMWARE, CONFIG).
    pub flash0: Bram<FLASH_ABITS>,
    /// FIRMWARE.
    pub flash1: Bram<FLASH_ABITS>,
    /// CONFIG.
    pub flash2: Bram<FLASH_ABITS>,
    /// Data buffers.
    pub bufram: Bram<BUF_ABITS>,
    /// Generation tags of the data-buffer words (a word whose tag is not the current
    /// generation reads as 0): a volatile reset bumps the generation instead of
    /// walking the RAM, and walks it only when the generation wraps.
    pub tags: Bram<BUF_ABITS>,
    /// DEVICE_KEY words.
    pub keys: Bram<3>,

    // Volatile registers.
    control: DFF<Bits<32>>,
    scratch0: DFF<Bits<32>>,
    scratch1: DFF<Bits<32>>,
    scratch2: DFF<Bits<32>>,
    scratch3: DFF<Bits<32>>,
    scratch4: DFF<Bits<32>>,
    scratch5: DFF<Bits<32>>,
    scratch6: DFF<Bits<32>>,
    scratch7: DFF<Bits<32>>,
    doorbell: DFF<Bits<32>>,
    irq: DFF<Bits<32>>,
    hung: DFF<Bit>,
    fregion: DFF<Bits<2>>,
    faddr: DFF<Bits<32>>,
    flen: DFF<Bits<32>>,
    fsrc: DFF<Bits<32>>,
    fresult: DFF<Bits<32>>,
    unlocked: DFF<Bit>,
    ustage: DFF<Bit>,
    badkey: DFF<Bit>,
    // Nonvolatile registers.
    ctr0_lo: DFF<Bits<32>>,
    ctr0_hi: DFF<Bits<32>>,
    ctr1_lo: DFF<Bits<32>>,
    ctr1_hi: DFF<Bits<32>>,
    ctr2_lo: DFF<Bits<32>>,
    ctr2_hi: DFF<Bits<32>>,
    cnt0: DFF<Bits<8>>,
    cnt1: DFF<Bits<8>>,
    cnt2: DFF<Bits<8>>,
    master: DFF<Bits<32>>,
    fuse: DFF<Bit>,
    epoch: DFF<Bits<32>>,
    // Control.
    state: DFF<CoreState>,
    q_addr: DFF<Bits<18>>,
    faddr_w: DFF<Bits<32>>,
    q_we: DFF<Bit>,
    q_wdata: DFF<Bits<32>>,
    q_be: DFF<Bits<4>>,
    q_rom: DFF<Bit>,
    fwb: DFF<Bit>,
    gen: DFF<Bits<8>>,
    is_prog: DFF<Bit>,
    cregion: DFF<Bits<2>>,
    ptr: DFF<Bits<20>>,
    nwords: DFF<Bits<20>>,
    dst_w: DFF<Bits<20>>,
    src_w: DFF<Bits<20>>,
    idle: DFF<Bits<32>>,
    // Inputs of the OOB engine, each assigned once a pass (a sub-block input written
    // twice in one Verilog evaluation glitches, and the engine answers combinationally).
    o_rx_data: Signal<Local, Bits<8>>,
    o_tx_ready: Signal<Local, Bit>,
    o_pr_ok: Signal<Local, Bit>,
    o_pr_fail: Signal<Local, Bit>,
    o_hash_grant: Signal<Local, Bit>,
    o_hash_rdata: Signal<Local, Bits<32>>,

    // Combinational helpers.
    bm0: Signal<Local, Bits<32>>,
    bm1: Signal<Local, Bits<32>>,
    bm2: Signal<Local, Bits<32>>,
    bm3: Signal<Local, Bits<32>>,
    bmask: Signal<Local, Bits<32>>,
    trig: Signal<Local, Bits<32>>,
    s_id: Signal<Local, Bit>,
    s_version: Signal<Local, Bit>,
    s_status: Signal<Local, Bit>,
    s_control: Signal<Local, Bit>,
    s_scratch: Signal<Local, Bit>,
    s_doorbell: Signal<Local, Bit>,
    s_irq: Signal<Local, Bit>,
    s_hang: Signal<Local, Bit>,
    s_softreset: Signal<Local, Bit>,
    s_serial: Signal<Local, Bit>,
    s_fregion: Signal<Local, Bit>,
    s_faddr: Signal<Local, Bit>,
    s_fdata: Signal<Local, Bit>,
    s_flen: Signal<Local, Bit>,
    s_fsrc: Signal<Local, Bit>,
    s_fcmd: Signal<Local, Bit>,
    s_fstatus: Signal<Local, Bit>,
    s_funlock: Signal<Local, Bit>,
    s_counter: Signal<Local, Bit>,
    s_master: Signal<Local, Bit>,
    s_fuse: Signal<Local, Bit>,
    s_slots: Signal<Local, Bit>,
    s_width: Signal<Local, Bit>,
    s_epoch: Signal<Local, Bit>,
    s_key: Signal<Local, Bit>,
    s_buffer: Signal<Local, Bit>,
    sc_idx: Signal<Local, Bits<18>>,
    se_idx: Signal<Local, Bits<18>>,
    co_idx: Signal<Local, Bits<18>>,
    rd: Signal<Local, Bits<32>>,
    status_v: Signal<Local, Bits<32>>,
    st_f: Signal<Local, Bits<32>>,
    st_u: Signal<Local, Bits<32>>,
    st_i: Signal<Local, Bits<32>>,
    fs_u: Signal<Local, Bits<32>>,
    fs_b: Signal<Local, Bits<32>>,
    fdata_v: Signal<Local, Bits<32>>,
    max_cnt: Signal<Local, Bits<8>>,
    slots_v: Signal<Local, Bits<32>>,
    cur_top: Signal<Local, Bit>,
    cur_cnt: Signal<Local, Bits<8>>,
    new_cnt: Signal<Local, Bits<8>>,
    r_words: Signal<Local, Bits<32>>,
    r_rdata: Signal<Local, Bits<32>>,
    args_ok: Signal<Local, Bit>,
    do_clear: Signal<Local, Bit>,
    stale: Signal<Local, Bit>,
    buf_v: Signal<Local, Bits<32>>,
    fl_raddr: Signal<Local, Bits<FLASH_ABITS>>,
    fl_waddr: Signal<Local, Bits<FLASH_ABITS>>,
    fl_wdata: Signal<Local, Bits<32>>,
    fl_we: Signal<Local, Bit>,

    // Elaboration-time constants from the register table.
    a_id: Constant<Bits<18>>,
    a_version: Constant<Bits<18>>,
    a_status: Constant<Bits<18>>,
    a_control: Constant<Bits<18>>,
    a_scratch: Constant<Bits<18>>,
    e_scratch: Constant<Bits<18>>,
    a_doorbell: Constant<Bits<18>>,
    a_irq: Constant<Bits<18>>,
    a_hang: Constant<Bits<18>>,
    a_softreset: Constant<Bits<18>>,
    a_serial: Constant<Bits<18>>,
    e_serial: Constant<Bits<18>>,
    a_fregion: Constant<Bits<18>>,
    a_faddr: Constant<Bits<18>>,
    a_fdata: Constant<Bits<18>>,
    a_flen: Constant<Bits<18>>,
    a_fsrc: Constant<Bits<18>>,
    a_fcmd: Constant<Bits<18>>,
    a_fstatus: Constant<Bits<18>>,
    a_funlock: Constant<Bits<18>>,
    a_counter: Constant<Bits<18>>,
    e_counter: Constant<Bits<18>>,
    a_master: Constant<Bits<18>>,
    a_fuse: Constant<Bits<18>>,
    a_slots: Constant<Bits<18>>,
    a_width: Constant<Bits<18>>,
    a_epoch: Constant<Bits<18>>,
    a_key: Constant<Bits<18>>,
    e_key: Constant<Bits<18>>,
    a_buffer: Constant<Bits<18>>,
    e_buffer: Constant<Bits<18>>,
    k_id: Constant<Bits<32>>,
    k_version: Constant<Bits<32>>,
    k_hang: Constant<Bits<32>>,
    k_softreset: Constant<Bits<32>>,
    k_key1: Constant<Bits<32>>,
    k_key2: Constant<Bits<32>>,
    k_erase: Constant<Bits<32>>,
    k_program: Constant<Bits<32>>,
    k_lock: Constant<Bits<32>>,
    k_done: Constant<Bits<32>>,
    k_ref_locked: Constant<Bits<32>>,
    k_ref_fuse: Constant<Bits<32>>,
    k_ref_args: Constant<Bits<32>>,
    k_fs_unlocked: Constant<Bits<32>>,
    k_fs_badkey: Constant<Bits<32>>,
    k_st_fuse: Constant<Bits<32>>,
    k_st_unlocked: Constant<Bits<32>>,
    k_st_irq: Constant<Bits<32>>,
    k_width: Constant<Bits<8>>,
    k_words0: Constant<Bits<32>>,
    k_words1: Constant<Bits<32>>,
    k_words2: Constant<Bits<32>>,
    k_size0: Constant<Bits<32>>,
    k_size1: Constant<Bits<32>>,
    k_size2: Constant<Bits<32>>,
    k_bufsize: Constant<Bits<32>>,
    k_bufwords: Constant<Bits<20>>,
    k_serial_lo: Constant<Bits<32>>,
    k_serial_hi: Constant<Bits<32>>,
    k_bm3: Constant<Bits<32>>,
    k_w_control: Constant<Bits<32>>,
    k_w_scratch: Constant<Bits<32>>,
    k_w_doorbell: Constant<Bits<32>>,
    k_w1c_irq: Constant<Bits<32>>,
    k_w_fregion: Constant<Bits<32>>,
    k_w_faddr: Constant<Bits<32>>,
    k_w_flen: Constant<Bits<32>>,
    k_w_fsrc: Constant<Bits<32>>,
    k_r_control: Constant<Bits<32>>,
    k_r_scratch: Constant<Bits<32>>,
    k_r_doorbell: Constant<Bits<32>>,
    k_r_irq: Constant<Bits<32>>,
    k_r_fregion: Constant<Bits<2>>,
    k_r_faddr: Constant<Bits<32>>,
    k_r_faddr_w: Constant<Bits<32>>,
    k_r_flen: Constant<Bits<32>>,
    k_r_fsrc: Constant<Bits<32>>,
    k_r_fresult: Constant<Bits<32>>,
    k_irq_doorbell: Constant<Bits<32>>,
    k_irq_enable: Constant<Bits<32>>,
    k_gen_last: Constant<Bits<8>>,
    k_ones: Constant<Bits<32>>,
    k_idle: Constant<Bits<32>>,
}

crate::sim_block!(impl[] DeviceCore, DeviceCore {
    clock: clock,
    reset: input,
    strobe: input,
    addr: input,
    we: input,
    wdata: input,
    be: input,
    rom_sel: input,
    ready: output,
    ack: output,
    rdata: output,
    busy: output,
    persist_req: output,
    persist_ack: input,
    persist_nak: input,
    nv_load: input,
    nv_ctr0_lo_in: input,
    nv_ctr0_hi_in: input,
    nv_ctr1_lo_in: input,
    nv_ctr1_hi_in: input,
    nv_ctr2_lo_in: input,
    nv_ctr2_hi_in: input,
    nv_cnt0_in: input,
    nv_cnt1_in: input,
    nv_cnt2_in: input,
    nv_master_in: input,
    nv_fuse_in: input,
    nv_epoch_in: input,
    nv_ctr0_lo: output,
    nv_ctr0_hi: output,
    nv_ctr1_lo: output,
    nv_ctr1_hi: output,
    nv_ctr2_lo: output,
    nv_ctr2_hi: output,
    nv_master: output,
    nv_fuse: output,
    nv_epoch: output,
    hung_out: output,
    oob_rx_data: input,
    oob_rx_valid: input,
    oob_rx_end: input,
    oob_tx_data: output,
    oob_tx_valid: output,
    oob_tx_ready: input,
    oob_uart: input,
    uart_rx: input,
    uart_tx: output,
    oob: block,
    urx: block,
    utx: block,
    flash0: block,
    flash1: block,
    flash2: block,
    bufram: block,
    tags: block,
    keys: block,
    control: dff,
    scratch0: dff,
    scratch1: dff,
    scratch2: dff,
    scratch3: dff,
    scratch4: dff,
    scratch5: dff,
    scratch6: dff,
    scratch7: dff,
    doorbell: dff,
    irq: dff,
    hung: dff,
    fregion: dff,
    faddr: dff,
    flen: dff,
    fsrc: dff,
    fresult: dff,
    unlocked: dff,
    ustage: dff,
    badkey: dff,
    ctr0_lo: dff,
    ctr0_hi: dff,
    ctr1_lo: dff,
    ctr1_hi: dff,
    ctr2_lo: dff,
    ctr2_hi: dff,
    cnt0: dff,
    cnt1: dff,
    cnt2: dff,
    master: dff,
    fuse: dff,
    epoch: dff,
    state: dff,
    q_addr: dff,
    faddr_w: dff,
    q_we: dff,
    q_wdata: dff,
    q_be: dff,
    q_rom: dff,
    fwb: dff,
    gen: dff,
    is_prog: dff,
    cregion: dff,
    ptr: dff,
    nwords: dff,
    dst_w: dff,
    src_w: dff,
    idle: dff,
    o_rx_data: local,
    o_tx_ready: local,
    o_pr_ok: local,
    o_pr_fail: local,
    o_hash_grant: local,
    o_hash_rdata: local,
    bm0: local,
    bm1: local,
    bm2: local,
    bm3: local,
    bmask: local,
    trig: local,
    s_id: local,
    s_version: local,
    s_status: local,
    s_control: local,
    s_scratch: local,
    s_doorbell: local,
    s_irq: local,
    s_hang: local,
    s_softreset: local,
    s_serial: local,
    s_fregion: local,
    s_faddr: local,
    s_fdata: local,
    s_flen: local,
    s_fsrc: local,
    s_fcmd: local,
    s_fstatus: local,
    s_funlock: local,
    s_counter: local,
    s_master: local,
    s_fuse: local,
    s_slots: local,
    s_width: local,
    s_epoch: local,
    s_key: local,
    s_buffer: local,
    sc_idx: local,
    se_idx: local,
    co_idx: local,
    rd: local,
    status_v: local,
    st_f: local,
    st_u: local,
    st_i: local,
    fs_u: local,
    fs_b: local,
    fdata_v: local,
    max_cnt: local,
    slots_v: local,
    cur_top: local,
    cur_cnt: local,
    new_cnt: local,
    r_words: local,
    r_rdata: local,
    args_ok: local,
    do_clear: local,
    stale: local,
    buf_v: local,
    fl_raddr: local,
    fl_waddr: local,
    fl_wdata: local,
    fl_we: local,
    a_id: konst,
    a_version: konst,
    a_status: konst,
    a_control: konst,
    a_scratch: konst,
    e_scratch: konst,
    a_doorbell: konst,
    a_irq: konst,
    a_hang: konst,
    a_softreset: konst,
    a_serial: konst,
    e_serial: konst,
    a_fregion: konst,
    a_faddr: konst,
    a_fdata: konst,
    a_flen: konst,
    a_fsrc: konst,
    a_fcmd: konst,
    a_fstatus: konst,
    a_funlock: konst,
    a_counter: konst,
    e_counter: konst,
    a_master: konst,
    a_fuse: konst,
    a_slots: konst,
    a_width: konst,
    a_epoch: konst,
    a_key: konst,
    e_key: konst,
    a_buffer: konst,
    e_buffer: konst,
    k_id: konst,
    k_version: konst,
    k_hang: konst,
    k_softreset: konst,
    k_key1: konst,
    k_key2: konst,
    k_erase: konst,
    k_program: konst,
    k_lock: konst,
    k_done: konst,
    k_ref_locked: konst,
    k_ref_fuse: konst,
    k_ref_args: konst,
    k_fs_unlocked: konst,
    k_fs_badkey: konst,
    k_st_fuse: konst,
    k_st_unlocked: konst,
    k_st_irq: konst,
    k_width: konst,
    k_words0: konst,
    k_words1: konst,
    k_words2: konst,
    k_size0: konst,
    k_size1: konst,
    k_size2: konst,
    k_bufsize: konst,
    k_bufwords: konst,
    k_serial_lo: konst,
    k_serial_hi: konst,
    k_bm3: konst,
    k_w_control: konst,
    k_w_scratch: konst,
    k_w_doorbell: konst,
    k_w1c_irq: konst,
    k_w_fregion: konst,
    k_w_faddr: konst,
    k_w_flen: konst,
    k_w_fsrc: konst,
    k_r_control: konst,
    k_r_scratch: konst,
    k_r_doorbell: konst,
    k_r_irq: konst,
    k_r_fregion: konst,
    k_r_faddr: konst,
    k_r_faddr_w: konst,
    k_r_flen: konst,
    k_r_fsrc: konst,
    k_r_fresult: konst,
    k_irq_doorbell: konst,
    k_irq_enable: konst,
    k_gen_last: konst,
    k_ones: konst,
    k_idle: konst,
});

fn c20(v: u32) -> Constant<Bits<20>> {
    Constant::new((v as u64).into())
}
fn c32(v: u32) -> Constant<Bits<32>> {
    Constant::new((v as u64).into())
}
fn c18(v: u32) -> Constant<Bits<18>> {
    Constant::new((v as u64).into())
}
// The storage registers' table rows: the core masks writes with their writable
// and W1C bits and resets them to their reset values (elaboration-time constants).
const CONTROL: &regmap::RegisterDef = regmap::def(Reg::Control);
const SCRATCH: &regmap::RegisterDef = regmap::def(Reg::Scratch);
const DOORBELL: &regmap::RegisterDef = regmap::def(Reg::Doorbell);
const IRQ_STATUS: &regmap::RegisterDef = regmap::def(Reg::IrqStatus);
const FLASH_REGION: &regmap::RegisterDef = regmap::def(Reg::FlashRegion);
const FLASH_ADDR: &regmap::RegisterDef = regmap::def(Reg::FlashAddr);
const FLASH_LEN: &regmap::RegisterDef = regmap::def(Reg::FlashLen);
const FLASH_SRC: &regmap::RegisterDef = regmap::def(Reg::FlashSrc);
// What the core's register file can hold: FLASH_REGION is 2 bits wide, SCRATCH
// has 8 registers, the buffer RAM stores whole bytes under byte enables.
const _: () = assert!(
    FLASH_REGION.writable < 4 && FLASH_REGION.reset < 4,
    "FLASH_REGION is a 2-bit register in the RTL"
);
const _: () = assert!(SCRATCH.count == 8, "the RTL has 8 scratch registers");
const _: () = assert!(
    regmap::def(Reg::Buffer).writable == u32::MAX,
    "the buffer RAM stores every bit a write enables"
);

/// Word address of a register's first element, from the table.
fn start(r: Reg) -> Constant<Bits<18>> {
    c18(r.def().offset / 4)
}
/// Word address one past a register's last element, from the table.
fn stop(r: Reg) -> Constant<Bits<18>> {
    c18(r.def().end() / 4)
}

impl DeviceCore {
    /// Elaborate the core for `p`.
    pub fn new(p: CoreParams) -> DeviceCore {
        use regmap::*;
        let words = p.region_sizes.map(|s| (s / 4) as usize);
        DeviceCore {
            clock: Default::default(),
            reset: Default::default(),
            strobe: Default::default(),
            addr: Default::default(),
            we: Default::default(),
            wdata: Default::default(),
            be: Default::default(),
            rom_sel: Default::default(),
            ready: Default::default(),
            ack: Default::default(),
            rdata: Default::default(),
            busy: Default::default(),
            persist_req: Default::default(),
            persist_ack: Default::default(),
            persist_nak: Default::default(),
            nv_load: Default::default(),
            nv_ctr0_lo_in: Default::default(),
            nv_ctr0_hi_in: Default::default(),
            nv_ctr1_lo_in: Default::default(),
            nv_ctr1_hi_in: Default::default(),
            nv_ctr2_lo_in: Default::default(),
            nv_ctr2_hi_in: Default::default(),
            nv_cnt0_in: Default::default(),
            nv_cnt1_in: Default::default(),
            nv_cnt2_in: Default::default(),
            nv_master_in: Default::default(),
            nv_fuse_in: Default::default(),
            nv_epoch_in: Default::default(),
            nv_ctr0_lo: Default::default(),
            nv_ctr0_hi: Default::default(),
            nv_ctr1_lo: Default::default(),
            nv_ctr1_hi: Default::default(),
            nv_ctr2_lo: Default::default(),
            nv_ctr2_hi: Default::default(),
            nv_master: Default::default(),
            nv_fuse: Default::default(),
            nv_epoch: Default::default(),
            hung_out: Default::default(),
            oob_rx_data: Default::default(),
            oob_rx_valid: Default::default(),
            oob_rx_end: Default::default(),
            oob_tx_data: Default::default(),
            oob_tx_valid: Default::default(),
            oob_tx_ready: Default::default(),
            oob_uart: Default::default(),
            uart_rx: Default::default(),
            uart_tx: Default::default(),
            oob: OobEngine::new(p.width, p.serial, p.region_sizes),
            urx: UartRx::new(p.oob_divisor),
            utx: UartTx::new(p.oob_divisor),
            flash0: Bram::new(words[0]),
            flash1: Bram::new(words[1]),
            flash2: Bram::new(words[2]),
            bufram: Bram::new(p.buffer_words),
            tags: Bram::new(p.buffer_words),
            keys: Bram::new(8),
            control: Default::default(),
            scratch0: Default::default(),
            scratch1: Default::default(),
            scratch2: Default::default(),
            scratch3: Default::default(),
            scratch4: Default::default(),
            scratch5: Default::default(),
            scratch6: Default::default(),
            scratch7: Default::default(),
            doorbell: Default::default(),
            irq: Default::default(),
            hung: Default::default(),
            fregion: Default::default(),
            faddr: Default::default(),
            flen: Default::default(),
            fsrc: Default::default(),
            fresult: Default::default(),
            unlocked: Default::default(),
            ustage: Default::default(),
            badkey: Default::default(),
            ctr0_lo: Default::default(),
            ctr0_hi: Default::default(),
            ctr1_lo: Default::default(),
            ctr1_hi: Default::default(),
            ctr2_lo: Default::default(),
            ctr2_hi: Default::default(),
            cnt0: Default::default(),
            cnt1: Default::default(),
            cnt2: Default::default(),
            master: Default::default(),
            fuse: Default::default(),
            epoch: Default::default(),
            state: Default::default(),
            q_addr: Default::default(),
            faddr_w: Default::default(),
            q_we: Default::default(),
            q_wdata: Default::default(),
            q_be: Default::default(),
            q_rom: Default::default(),
            fwb: Default::default(),
            gen: Default::default(),
            is_prog: Default::default(),
            cregion: Default::default(),
            ptr: Default::default(),
            nwords: Default::default(),
            dst_w: Default::default(),
            src_w: Default::default(),
            idle: Default::default(),
            o_rx_data: Default::default(),
            o_tx_ready: Default::default(),
            o_pr_ok: Default::default(),
            o_pr_fail: Default::default(),
            o_hash_grant: Default::default(),
            o_hash_rdata: Default::default(),
            bm0: Default::default(),
            bm1: Default::default(),
            bm2: Default::default(),
            bm3: Default::default(),
            bmask: Default::default(),
            trig: Default::default(),
            s_id: Default::default(),
            s_version: Default::default(),
            s_status: Default::default(),
            s_control: Default::default(),
            s_scratch: Default::default(),
            s_doorbell: Default::default(),
            s_irq: Default::default(),
            s_hang: Default::default(),
            s_softreset: Default::default(),
            s_serial: Default::default(),
            s_fregion: Default::default(),
            s_faddr: Default::default(),
            s_fdata: Default::default(),
            s_flen: Default::default(),
            s_fsrc: Default::default(),
            s_fcmd: Default::default(),
            s_fstatus: Default::default(),
            s_funlock: Default::default(),
            s_counter: Default::default(),
            s_master: Default::default(),
            s_fuse: Default::default(),
            s_slots: Default::default(),
            s_width: Default::default(),
            s_epoch: Default::default(),
            s_key: Default::default(),
            s_buffer: Default::default(),
            sc_idx: Default::default(),
            se_idx: Default::default(),
            co_idx: Default::default(),
            rd: Default::default(),
            status_v: Default::default(),
            st_f: Default::default(),
            st_u: Default::default(),
            st_i: Default::default(),
            fs_u: Default::default(),
            fs_b: Default::default(),
            fdata_v: Default::default(),
            max_cnt: Default::default(),
            slots_v: Default::default(),
            cur_top: Default::default(),
            cur_cnt: Default::default(),
            new_cnt: Default::default(),
            r_words: Default::default(),
            r_rdata: Default::default(),
            args_ok: Default::default(),
            do_clear: Default::default(),
            stale: Default::default(),
            buf_v: Default::default(),
            fl_raddr: Default::default(),
            fl_waddr: Default::default(),
            fl_wdata: Default::default(),
            fl_we: Default::default(),
            a_id: start(Reg::Id),
            a_version: start(Reg::Version),
            a_status: start(Reg::Status),
            a_control: start(Reg::Control),
            a_scratch: start(Reg::Scratch),
            e_scratch: stop(Reg::Scratch),
            a_doorbell: start(Reg::Doorbell),
            a_irq: start(Reg::IrqStatus),
            a_hang: start(Reg::HangTrigger),
            a_softreset: start(Reg::SoftReset),
            a_serial: start(Reg::Serial),
            e_serial: stop(Reg::Serial),
            a_fregion: start(Reg::FlashRegion),
            a_faddr: start(Reg::FlashAddr),
            a_fdata: start(Reg::FlashData),
            a_flen: start(Reg::FlashLen),
            a_fsrc: start(Reg::FlashSrc),
            a_fcmd: start(Reg::FlashCmd),
            a_fstatus: start(Reg::FlashStatus),
            a_funlock: start(Reg::FlashUnlock),
            a_counter: start(Reg::Counter),
            e_counter: stop(Reg::Counter),
            a_master: start(Reg::Master),
            a_fuse: start(Reg::Fuse),
            a_slots: start(Reg::SlotsLeft),
            a_width: start(Reg::Width),
            a_epoch: start(Reg::Epoch),
            a_key: start(Reg::DeviceKey),
            e_key: stop(Reg::DeviceKey),
            a_buffer: start(Reg::Buffer),
            e_buffer: stop(Reg::Buffer),
            k_id: c32(Reg::Id.def().reset),
            k_version: c32(Reg::Version.def().reset),
            k_hang: c32(HANG_MAGIC),
            k_softreset: c32(SOFT_RESET_MAGIC),
            k_key1: c32(UNLOCK_KEY1),
            k_key2: c32(UNLOCK_KEY2),
            k_erase: c32(FLASH_CMD_ERASE),
            k_program: c32(FLASH_CMD_PROGRAM),
            k_lock: c32(FLASH_CMD_LOCK),
            k_done: c32(FLASH_STATUS_DONE),
            k_ref_locked: c32(FLASH_STATUS_REFUSED_LOCKED),
            k_ref_fuse: c32(FLASH_STATUS_REFUSED_FUSE),
            k_ref_args: c32(FLASH_STATUS_REFUSED_ARGS),
            k_fs_unlocked: c32(FLASH_STATUS_UNLOCKED),
            k_fs_badkey: c32(FLASH_STATUS_BAD_KEY),
            k_st_fuse: c32(STATUS_FUSE_BLOWN),
            k_st_unlocked: c32(STATUS_FLASH_UNLOCKED),
            k_st_irq: c32(STATUS_IRQ_PENDING),
            k_width: Constant::new((p.width as u64).into()),
            k_words0: c32(words[0] as u32),
            k_words1: c32(words[1] as u32),
            k_words2: c32(words[2] as u32),
            k_size0: c32(p.region_sizes[0]),
            k_size1: c32(p.region_sizes[1]),
            k_size2: c32(p.region_sizes[2]),
            k_bufsize: c32(BUFFER_SIZE as u32),
            k_bufwords: c20(p.buffer_words as u32),
            k_serial_lo: c32(p.serial as u32),
            k_serial_hi: c32((p.serial >> 32) as u32),
            k_bm3: c32(0xff00_0000),
            k_w_control: c32(CONTROL.writable),
            k_w_scratch: c32(SCRATCH.writable),
            k_w_doorbell: c32(DOORBELL.writable),
            k_w1c_irq: c32(IRQ_STATUS.w1c),
            k_w_fregion: c32(FLASH_REGION.writable),
            k_w_faddr: c32(FLASH_ADDR.writable),
            k_w_flen: c32(FLASH_LEN.writable),
            k_w_fsrc: c32(FLASH_SRC.writable),
            k_r_control: c32(CONTROL.reset),
            k_r_scratch: c32(SCRATCH.reset),
            k_r_doorbell: c32(DOORBELL.reset),
            k_r_irq: c32(IRQ_STATUS.reset),
            k_r_fregion: Constant::new((FLASH_REGION.reset as u64).into()),
            k_r_faddr: c32(FLASH_ADDR.reset),
            k_r_faddr_w: c32(FLASH_ADDR.reset >> 2),
            k_r_flen: c32(FLASH_LEN.reset),
            k_r_fsrc: c32(FLASH_SRC.reset),
            k_r_fresult: c32(def(Reg::FlashStatus).reset),
            k_irq_doorbell: c32(IRQ_DOORBELL),
            k_irq_enable: c32(CONTROL_IRQ_ENABLE),
            k_gen_last: Constant::new(255u64.into()),
            k_ones: c32(u32::MAX),
            // Two character times of silence end an OOB request on the UART.
            k_idle: c32(20 * p.oob_divisor as u32),
        }
    }
}

impl DeviceCore {
    /// The address decode this core was elaborated with, as the RTL names it: (name,
    /// register, first word address, word address one past the end). Every register
    /// of the table appears once; a test checks this against `regmap::REGISTERS`.
    pub fn decode_map(&self) -> Vec<(&'static str, Reg, u32, u32)> {
        let w = |c: &Constant<Bits<18>>| c.val().to_u32();
        let one = |name, reg, c: &Constant<Bits<18>>| (name, reg, w(c), w(c) + 1);
        vec![
            one("ID", Reg::Id, &self.a_id),
            one("VERSION", Reg::Version, &self.a_version),
            one("STATUS", Reg::Status, &self.a_status),
            one("CONTROL", Reg::Control, &self.a_control),
            (
                "SCRATCH",
                Reg::Scratch,
                w(&self.a_scratch),
                w(&self.e_scratch),
            ),
            one("DOORBELL", Reg::Doorbell, &self.a_doorbell),
            one("IRQ_STATUS", Reg::IrqStatus, &self.a_irq),
            one("HANG_TRIGGER", Reg::HangTrigger, &self.a_hang),
            one("SOFT_RESET", Reg::SoftReset, &self.a_softreset),
            ("SERIAL", Reg::Serial, w(&self.a_serial), w(&self.e_serial)),
            one("FLASH_REGION", Reg::FlashRegion, &self.a_fregion),
            one("FLASH_ADDR", Reg::FlashAddr, &self.a_faddr),
            one("FLASH_DATA", Reg::FlashData, &self.a_fdata),
            one("FLASH_LEN", Reg::FlashLen, &self.a_flen),
            one("FLASH_SRC", Reg::FlashSrc, &self.a_fsrc),
            one("FLASH_CMD", Reg::FlashCmd, &self.a_fcmd),
            one("FLASH_STATUS", Reg::FlashStatus, &self.a_fstatus),
            one("FLASH_UNLOCK", Reg::FlashUnlock, &self.a_funlock),
            (
                "COUNTER",
                Reg::Counter,
                w(&self.a_counter),
                w(&self.e_counter),
            ),
            one("MASTER", Reg::Master, &self.a_master),
            one("FUSE", Reg::Fuse, &self.a_fuse),
            one("SLOTS_LEFT", Reg::SlotsLeft, &self.a_slots),
            one("WIDTH", Reg::Width, &self.a_width),
            one("EPOCH", Reg::Epoch, &self.a_epoch),
            ("DEVICE_KEY", Reg::DeviceKey, w(&self.a_key), w(&self.e_key)),
            ("BUFFER", Reg::Buffer, w(&self.a_buffer), w(&self.e_buffer)),
        ]
    }
}

/// The Verilog of the core elaborated for `p` (rust-hdl's checks run first).
pub fn verilog(p: CoreParams) -> String {
    let mut uut = DeviceCore::new(p);
    uut.connect_all();
    generate_verilog(&uut)
}

impl DeviceCore {
    /// Move the clock on every register and RAM at once, without an evaluation
    /// pass (see [`Clocked::clock_to`]): what the `rtl` backend does on each edge.
    pub fn clock_to(&mut self, clk: bool) {
        Clocked::clock_to(self, clk, false);
    }
}

impl Logic for DeviceCore {
    #[hdl_gen]
    fn update(&mut self) {
        dff_setup!(
            self, clock, faddr_w, control, scratch0, scratch1, scratch2, scratch3, scratch4,
            scratch5, scratch6, scratch7, doorbell, irq, hung, fregion, faddr, flen, fsrc, fresult,
            unlocked, ustage, badkey, ctr0_lo, ctr0_hi, ctr1_lo, ctr1_hi, ctr2_lo, ctr2_hi, cnt0,
            cnt1, cnt2, master, fuse, epoch, state, q_addr, q_we, q_wdata, q_be, q_rom, fwb,
            is_prog, cregion, ptr, nwords, dst_w, src_w, gen, idle
        );
        clock!(self, clock, flash0, flash1, flash2, bufram, tags, keys, oob, urx, utx);

        // OOB: requests from the byte interface or the UART; a request on the UART
        // ends after two character times of silence; responses to the byte
        // interface or the UART.
        self.urx.rx.next = self.uart_rx.val();
        self.o_rx_data.next = self.oob_rx_data.val();
        if self.urx.valid.val() {
            self.o_rx_data.next = self.urx.data.val();
        }
        self.oob.rx_valid.next = self.oob_rx_valid.val() | self.urx.valid.val();
        self.idle.d.next = 0.into();
        if self.oob.pending.val() & !self.urx.valid.val() {
            self.idle.d.next = self.idle.q.val() + 1;
        }
        self.oob.rx_end.next = self.oob_rx_end.val() | (self.idle.q.val() == self.k_idle.val());
        self.utx.data.next = self.oob.tx_data.val();
        self.utx.start.next = self.oob_uart.val() & self.oob.tx_valid.val();
        self.o_tx_ready.next = self.oob_tx_ready.val();
        if self.oob_uart.val() {
            self.o_tx_ready.next = self.utx.ready.val();
        }
        self.uart_tx.next = self.utx.tx.val();
        self.oob_tx_data.next = self.oob.tx_data.val();
        self.oob_tx_valid.next = self.oob.tx_valid.val() & !self.oob_uart.val();
        self.oob.cnt0.next = self.cnt0.q.val();
        self.oob.cnt1.next = self.cnt1.q.val();
        self.oob.cnt2.next = self.cnt2.q.val();
        self.oob.master.next = self.master.q.val();
        self.oob.fuse.next = self.fuse.q.val();
        self.oob.epoch.next = self.epoch.q.val();
        self.o_pr_ok.next = false;
        self.o_pr_fail.next = false;
        self.o_hash_grant.next = false;
        self.o_hash_rdata.next = self.flash0.rdata.val();
        if self.oob.hash_region.val() == 1 {
            self.o_hash_rdata.next = self.flash1.rdata.val();
        }
        if self.oob.hash_region.val() == 2 {
            self.o_hash_rdata.next = self.flash2.rdata.val();
        }

        // Byte enables of the latched access, as a bit mask; the trigger value.
        self.bm0.next = 0.into();
        self.bm1.next = 0.into();
        self.bm2.next = 0.into();
        self.bm3.next = 0.into();
        if self.q_be.q.val().get_bit(0) {
            self.bm0.next = 0xff.into();
        }
        if self.q_be.q.val().get_bit(1) {
            self.bm1.next = 0xff00.into();
        }
        if self.q_be.q.val().get_bit(2) {
            self.bm2.next = 0xff_0000.into();
        }
        if self.q_be.q.val().get_bit(3) {
            self.bm3.next = self.k_bm3.val();
        }
        self.bmask.next = self.bm0.val() | self.bm1.val() | self.bm2.val() | self.bm3.val();
        self.trig.next = self.q_wdata.q.val() & self.bmask.val();

        // Decode of the latched address, from the register table's constants.
        self.s_id.next = self.q_addr.q.val() == self.a_id.val();
        self.s_version.next = self.q_addr.q.val() == self.a_version.val();
        self.s_status.next = self.q_addr.q.val() == self.a_status.val();
        self.s_control.next = self.q_addr.q.val() == self.a_control.val();
        self.s_scratch.next = (self.q_addr.q.val() >= self.a_scratch.val())
            & (self.q_addr.q.val() < self.e_scratch.val());
        self.s_doorbell.next = self.q_addr.q.val() == self.a_doorbell.val();
        self.s_irq.next = self.q_addr.q.val() == self.a_irq.val();
        self.s_hang.next = self.q_addr.q.val() == self.a_hang.val();
        self.s_softreset.next = self.q_addr.q.val() == self.a_softreset.val();
        self.s_serial.next = (self.q_addr.q.val() >= self.a_serial.val())
            & (self.q_addr.q.val() < self.e_serial.val());
        self.s_fregion.next = self.q_addr.q.val() == self.a_fregion.val();
        self.s_faddr.next = self.q_addr.q.val() == self.a_faddr.val();
        self.s_fdata.next = self.q_addr.q.val() == self.a_fdata.val();
        self.s_flen.next = self.q_addr.q.val() == self.a_flen.val();
        self.s_fsrc.next = self.q_addr.q.val() == self.a_fsrc.val();
        self.s_fcmd.next = self.q_addr.q.val() == self.a_fcmd.val();
        self.s_fstatus.next = self.q_addr.q.val() == self.a_fstatus.val();
        self.s_funlock.next = self.q_addr.q.val() == self.a_funlock.val();
        self.s_counter.next = (self.q_addr.q.val() >= self.a_counter.val())
            & (self.q_addr.q.val() < self.e_counter.val());
        self.s_master.next = self.q_addr.q.val() == self.a_master.val();
        self.s_fuse.next = self.q_addr.q.val() == self.a_fuse.val();
        self.s_slots.next = self.q_addr.q.val() == self.a_slots.val();
        self.s_width.next = self.q_addr.q.val() == self.a_width.val();
        self.s_epoch.next = self.q_addr.q.val() == self.a_epoch.val();
        self.s_key.next =
            (self.q_addr.q.val() >= self.a_key.val()) & (self.q_addr.q.val() < self.e_key.val());
        self.s_buffer.next = (self.q_addr.q.val() >= self.a_buffer.val())
            & (self.q_addr.q.val() < self.e_buffer.val());
        // Element index within a register array.
        self.sc_idx.next = self.q_addr.q.val() - self.a_scratch.val();
        self.se_idx.next = self.q_addr.q.val() - self.a_serial.val();
        self.co_idx.next = self.q_addr.q.val() - self.a_counter.val();

        // Derived registers.
        self.st_f.next = 0.into();
        self.st_u.next = 0.into();
        self.st_i.next = 0.into();
        if self.fuse.q.val() {
            self.st_f.next = self.k_st_fuse.val();
        }
        if self.unlocked.q.val() {
            self.st_u.next = self.k_st_unlocked.val();
        }
        if (self.irq.q.val() & self.control.q.val() & self.k_irq_enable.val()) != 0 {
            self.st_i.next = self.k_st_irq.val();
        }
        self.status_v.next = self.st_f.val() | self.st_u.val() | self.st_i.val();
        self.fs_u.next = 0.into();
        self.fs_b.next = 0.into();
        if self.unlocked.q.val() {
            self.fs_u.next = self.k_fs_unlocked.val();
        }
        if self.badkey.q.val() {
            self.fs_b.next = self.k_fs_badkey.val();
        }
        self.max_cnt.next = self.cnt0.q.val();
        if self.cnt1.q.val() > self.max_cnt.val() {
            self.max_cnt.next = self.cnt1.q.val();
        }
        if self.cnt2.q.val() > self.max_cnt.val() {
            self.max_cnt.next = self.cnt2.q.val();
        }
        self.slots_v.next = 0.into();
        if self.k_width.val() > self.max_cnt.val() {
            self.slots_v.next = bit_cast::<32, 8>(self.k_width.val() - self.max_cnt.val());
        }
        self.oob.slots.next = self.slots_v.val();
        // FLASH_DATA: the selected region's word at FLASH_ADDR, all-ones past its end.
        self.fdata_v.next = self.k_ones.val();
        if (self.fregion.q.val() == 0) & (self.faddr_w.q.val() < self.k_words0.val()) {
            self.fdata_v.next = self.flash0.rdata.val();
        }
        if (self.fregion.q.val() == 1) & (self.faddr_w.q.val() < self.k_words1.val()) {
            self.fdata_v.next = self.flash1.rdata.val();
        }
        if (self.fregion.q.val() == 2) & (self.faddr_w.q.val() < self.k_words2.val()) {
            self.fdata_v.next = self.flash2.rdata.val();
        }

        // The command's region: current counter, size and RAM read data.
        self.cur_top.next = self.ctr0_hi.q.val().get_bit(31);
        self.cur_cnt.next = self.cnt0.q.val();
        self.r_words.next = self.k_words0.val();
        self.r_rdata.next = self.flash0.rdata.val();
        self.args_ok.next = ((self.faddr.q.val() & 3) == 0)
            & ((self.flen.q.val() & 3) == 0)
            & ((self.fsrc.q.val() & 3) == 0)
            & (self.flen.q.val() != 0)
            & (self.flen.q.val() <= self.k_bufsize.val())
            & (self.fsrc.q.val() <= self.k_bufsize.val() - self.flen.q.val())
            & (self.flen.q.val() <= self.k_size0.val())
            & (self.faddr.q.val() <= self.k_size0.val() - self.flen.q.val());
        if self.cregion.q.val() == 1 {
            self.cur_top.next = self.ctr1_hi.q.val().get_bit(31);
            self.cur_cnt.next = self.cnt1.q.val();
            self.r_words.next = self.k_words1.val();
            self.r_rdata.next = self.flash1.rdata.val();
            self.args_ok.next = ((self.faddr.q.val() & 3) == 0)
                & ((self.flen.q.val() & 3) == 0)
                & ((self.fsrc.q.val() & 3) == 0)
                & (self.flen.q.val() != 0)
                & (self.flen.q.val() <= self.k_bufsize.val())
                & (self.fsrc.q.val() <= self.k_bufsize.val() - self.flen.q.val())
                & (self.flen.q.val() <= self.k_size1.val())
                & (self.faddr.q.val() <= self.k_size1.val() - self.flen.q.val());
        }
        if self.cregion.q.val() == 2 {
            self.cur_top.next = self.ctr2_hi.q.val().get_bit(31);
            self.cur_cnt.next = self.cnt2.q.val();
            self.r_words.next = self.k_words2.val();
            self.r_rdata.next = self.flash2.rdata.val();
            self.args_ok.next = ((self.faddr.q.val() & 3) == 0)
                & ((self.flen.q.val() & 3) == 0)
                & ((self.fsrc.q.val() & 3) == 0)
                & (self.flen.q.val() != 0)
                & (self.flen.q.val() <= self.k_bufsize.val())
                & (self.fsrc.q.val() <= self.k_bufsize.val() - self.flen.q.val())
                & (self.flen.q.val() <= self.k_size2.val())
                & (self.faddr.q.val() <= self.k_size2.val() - self.flen.q.val());
        }
        self.new_cnt.next = self.cur_cnt.val() + 1;
        if self.cur_top.val() {
            self.new_cnt.next = self.cur_cnt.val();
        }

        // Buffer words of an older generation read as 0.
        self.stale.next = bit_cast::<8, 32>(self.tags.rdata.val()) != self.gen.q.val();
        self.buf_v.next = self.bufram.rdata.val();
        if self.stale.val() {
            self.buf_v.next = 0.into();
        }

        // Read data of the latched access.
        self.rd.next = 0.into();
        if self.s_id.val() {
            self.rd.next = self.k_id.val();
        }
        if self.s_version.val() {
            self.rd.next = self.k_version.val();
        }
        if self.s_status.val() {
            self.rd.next = self.status_v.val();
        }
        if self.s_control.val() {
            self.rd.next = self.control.q.val();
        }
        if self.s_scratch.val() {
            match self.sc_idx.val().index() {
                0 => self.rd.next = self.scratch0.q.val(),
                1 => self.rd.next = self.scratch1.q.val(),
                2 => self.rd.next = self.scratch2.q.val(),
                3 => self.rd.next = self.scratch3.q.val(),
                4 => self.rd.next = self.scratch4.q.val(),
                5 => self.rd.next = self.scratch5.q.val(),
                6 => self.rd.next = self.scratch6.q.val(),
                _ => self.rd.next = self.scratch7.q.val(),
            }
        }
        if self.s_doorbell.val() {
            self.rd.next = self.doorbell.q.val();
        }
        if self.s_irq.val() {
            self.rd.next = self.irq.q.val();
        }
        if self.s_serial.val() {
            if self.se_idx.val().get_bit(0) {
                self.rd.next = self.k_serial_hi.val();
            } else {
                self.rd.next = self.k_serial_lo.val();
            }
        }
        if self.s_fregion.val() {
            self.rd.next = bit_cast::<32, 2>(self.fregion.q.val());
        }
        if self.s_faddr.val() {
            self.rd.next = self.faddr.q.val();
        }
        if self.s_fdata.val() {
            self.rd.next = self.fdata_v.val();
        }
        if self.s_flen.val() {
            self.rd.next = self.flen.q.val();
        }
        if self.s_fsrc.val() {
            self.rd.next = self.fsrc.q.val();
        }
        if self.s_fstatus.val() {
            self.rd.next = self.fresult.q.val() | self.fs_u.val() | self.fs_b.val();
        }
        if self.s_counter.val() {
            match self.co_idx.val().index() {
                0 => self.rd.next = bit_cast::<32, 8>(self.cnt0.q.val()),
                1 => self.rd.next = bit_cast::<32, 8>(self.cnt1.q.val()),
                _ => self.rd.next = bit_cast::<32, 8>(self.cnt2.q.val()),
            }
        }
        if self.s_master.val() {
            self.rd.next = self.master.q.val();
        }
        if self.s_fuse.val() & self.fuse.q.val() {
            self.rd.next = 1.into();
        }
        if self.s_slots.val() {
            self.rd.next = self.slots_v.val();
        }
        if self.s_width.val() {
            self.rd.next = bit_cast::<32, 8>(self.k_width.val());
        }
        if self.s_epoch.val() {
            self.rd.next = self.epoch.q.val();
        }
        if self.s_key.val() {
            self.rd.next = self.keys.rdata.val();
        }
        if self.s_buffer.val() {
            self.rd.next = self.buf_v.val();
        }
        if self.q_rom.q.val() {
            self.rd.next = self.flash0.rdata.val();
        }
        if self.hung.q.val() {
            self.rd.next = self.k_ones.val();
        }

        // Default RAM ports: reads follow the bus (buffers, keys, ROM) and FLASH_ADDR.
        self.fl_raddr.next = bit_cast::<FLASH_ABITS, 32>(self.faddr_w.q.val());
        if self.rom_sel.val() {
            self.fl_raddr.next = self.addr.val();
        }
        self.fl_waddr.next = bit_cast::<FLASH_ABITS, 20>(self.ptr.q.val());
        self.fl_wdata.next = self.k_ones.val();
        self.fl_we.next = false;
        self.bufram.raddr.next = bit_cast::<BUF_ABITS, 18>(self.addr.val() - self.a_buffer.val());
        self.bufram.waddr.next =
            bit_cast::<BUF_ABITS, 18>(self.q_addr.q.val() - self.a_buffer.val());
        self.bufram.wdata.next = self.q_wdata.q.val();
        self.bufram.wbe.next = self.q_be.q.val();
        self.bufram.we.next = false;
        self.tags.raddr.next = bit_cast::<BUF_ABITS, 18>(self.addr.val() - self.a_buffer.val());
        self.tags.waddr.next = bit_cast::<BUF_ABITS, 18>(self.q_addr.q.val() - self.a_buffer.val());
        self.tags.wdata.next = bit_cast::<32, 8>(self.gen.q.val());
        self.tags.wbe.next = 0xf.into();
        self.tags.we.next = false;
        self.keys.raddr.next = bit_cast::<3, 18>(self.addr.val() - self.a_key.val());
        self.keys.waddr.next = 0.into();
        self.keys.wdata.next = 0.into();
        self.keys.wbe.next = 0.into();
        self.keys.we.next = false;

        // Outputs.
        self.ready.next = false;
        self.ack.next = false;
        self.busy.next = false;
        self.persist_req.next = false;
        self.rdata.next = self.rd.val();
        self.nv_ctr0_lo.next = self.ctr0_lo.q.val();
        self.nv_ctr0_hi.next = self.ctr0_hi.q.val();
        self.nv_ctr1_lo.next = self.ctr1_lo.q.val();
        self.nv_ctr1_hi.next = self.ctr1_hi.q.val();
        self.nv_ctr2_lo.next = self.ctr2_lo.q.val();
        self.nv_ctr2_hi.next = self.ctr2_hi.q.val();
        self.nv_master.next = self.master.q.val();
        self.nv_fuse.next = self.fuse.q.val();
        self.nv_epoch.next = self.epoch.q.val();
        self.hung_out.next = self.hung.q.val();
        self.do_clear.next = false;

        match self.state.q.val() {
            CoreState::Idle => {
                self.ready.next = !self.reset.val();
                if self.strobe.val() {
                    self.q_addr.d.next = self.addr.val();
                    self.q_we.d.next = self.we.val();
                    self.q_wdata.d.next = self.wdata.val();
                    self.q_be.d.next = self.be.val();
                    self.q_rom.d.next = self.rom_sel.val();
                    self.state.d.next = CoreState::Access;
                }
                if self.oob.pr_req.val()
                    & !self.strobe.val()
                    & !self.nv_load.val()
                    & !self.reset.val()
                {
                    self.state.d.next = CoreState::OobPersist;
                }
                if self.oob.hash_req.val()
                    & !self.strobe.val()
                    & !self.nv_load.val()
                    & !self.reset.val()
                {
                    self.state.d.next = CoreState::OobHash;
                }
                if self.nv_load.val() {
                    self.ctr0_lo.d.next = self.nv_ctr0_lo_in.val();
                    self.ctr0_hi.d.next = self.nv_ctr0_hi_in.val();
                    self.ctr1_lo.d.next = self.nv_ctr1_lo_in.val();
                    self.ctr1_hi.d.next = self.nv_ctr1_hi_in.val();
                    self.ctr2_lo.d.next = self.nv_ctr2_lo_in.val();
                    self.ctr2_hi.d.next = self.nv_ctr2_hi_in.val();
                    self.cnt0.d.next = self.nv_cnt0_in.val();
                    self.cnt1.d.next = self.nv_cnt1_in.val();
                    self.cnt2.d.next = self.nv_cnt2_in.val();
                    self.master.d.next = self.nv_master_in.val();
                    self.fuse.d.next = self.nv_fuse_in.val();
                    self.epoch.d.next = self.nv_epoch_in.val();
                }
            }
            CoreState::Access => {
                self.ack.next = true;
                self.state.d.next = CoreState::Idle;
                if self.q_we.q.val() & !self.q_rom.q.val() & !self.hung.q.val() {
                    // Storage registers: the written bits of the writable mask change.
                    if self.s_control.val() {
                        self.control.d.next = (self.control.q.val()
                            & !(self.bmask.val() & self.k_w_control.val()))
                            | (self.trig.val() & self.k_w_control.val());
                    }
                    if self.s_scratch.val() {
                        match self.sc_idx.val().index() {
                            0 => {
                                self.scratch0.d.next = (self.scratch0.q.val()
                                    & !(self.bmask.val() & self.k_w_scratch.val()))
                                    | (self.trig.val() & self.k_w_scratch.val())
                            }
                            1 => {
                                self.scratch1.d.next = (self.scratch1.q.val()
                                    & !(self.bmask.val() & self.k_w_scratch.val()))
                                    | (self.trig.val() & self.k_w_scratch.val())
                            }
                            2 => {
                                self.scratch2.d.next = (self.scratch2.q.val()
                                    & !(self.bmask.val() & self.k_w_scratch.val()))
                                    | (self.trig.val() & self.k_w_scratch.val())
                            }
                            3 => {
                                self.scratch3.d.next = (self.scratch3.q.val()
                                    & !(self.bmask.val() & self.k_w_scratch.val()))
                                    | (self.trig.val() & self.k_w_scratch.val())
                            }
                            4 => {
                                self.scratch4.d.next = (self.scratch4.q.val()
                                    & !(self.bmask.val() & self.k_w_scratch.val()))
                                    | (self.trig.val() & self.k_w_scratch.val())
                            }
                            5 => {
                                self.scratch5.d.next = (self.scratch5.q.val()
                                    & !(self.bmask.val() & self.k_w_scratch.val()))
                                    | (self.trig.val() & self.k_w_scratch.val())
                            }
                            6 => {
                                self.scratch6.d.next = (self.scratch6.q.val()
                                    & !(self.bmask.val() & self.k_w_scratch.val()))
                                    | (self.trig.val() & self.k_w_scratch.val())
                            }
                            _ => {
                                self.scratch7.d.next = (self.scratch7.q.val()
                                    & !(self.bmask.val() & self.k_w_scratch.val()))
                                    | (self.trig.val() & self.k_w_scratch.val())
                            }
                        }
                    }
                    if self.s_doorbell.val() {
                        self.doorbell.d.next = (self.doorbell.q.val()
                            & !(self.bmask.val() & self.k_w_doorbell.val()))
                            | (self.trig.val() & self.k_w_doorbell.val());
                        self.irq.d.next = self.irq.q.val() | self.k_irq_doorbell.val();
                    }
                    // W1C: the written 1s of the W1C bits clear.
                    if self.s_irq.val() {
                        self.irq.d.next =
                            self.irq.q.val() & !(self.trig.val() & self.k_w1c_irq.val());
                    }
                    if self.s_hang.val() & (self.trig.val() == self.k_hang.val()) {
                        self.hung.d.next = true;
                    }
                    if self.s_softreset.val() & (self.trig.val() == self.k_softreset.val()) {
                        self.do_clear.next = true;
                    }
                    if self.s_fregion.val() {
                        self.fregion.d.next = bit_cast::<2, 32>(
                            (bit_cast::<32, 2>(self.fregion.q.val())
                                & !(self.bmask.val() & self.k_w_fregion.val()))
                                | (self.trig.val() & self.k_w_fregion.val()),
                        );
                    }
                    if self.s_faddr.val() {
                        self.faddr.d.next = (self.faddr.q.val()
                            & !(self.bmask.val() & self.k_w_faddr.val()))
                            | (self.trig.val() & self.k_w_faddr.val());
                        self.faddr_w.d.next = ((self.faddr.q.val()
                            & !(self.bmask.val() & self.k_w_faddr.val()))
                            | (self.trig.val() & self.k_w_faddr.val()))
                            >> 2;
                    }
                    if self.s_flen.val() {
                        self.flen.d.next = (self.flen.q.val()
                            & !(self.bmask.val() & self.k_w_flen.val()))
                            | (self.trig.val() & self.k_w_flen.val());
                    }
                    if self.s_fsrc.val() {
                        self.fsrc.d.next = (self.fsrc.q.val()
                            & !(self.bmask.val() & self.k_w_fsrc.val()))
                            | (self.trig.val() & self.k_w_fsrc.val());
                    }
                    if self.s_fcmd.val() {
                        if self.trig.val() == self.k_lock.val() {
                            self.unlocked.d.next = false;
                            self.fresult.d.next = self.k_done.val();
                        } else if (self.trig.val() == self.k_erase.val())
                            | (self.trig.val() == self.k_program.val())
                        {
                            if self.fregion.q.val() == 3 {
                                self.fresult.d.next = self.k_ref_args.val();
                            } else {
                                self.is_prog.d.next = self.trig.val() == self.k_program.val();
                                self.cregion.d.next = self.fregion.q.val();
                                self.state.d.next = CoreState::Count;
                            }
                        } else {
                            self.fresult.d.next = self.k_ref_args.val();
                        }
                    }
                    if self.s_funlock.val() {
                        if self.trig.val() == self.k_key1.val() {
                            self.ustage.d.next = true;
                        } else if (self.trig.val() == self.k_key2.val()) & self.ustage.q.val() {
                            self.ustage.d.next = false;
                            self.unlocked.d.next = true;
                            self.badkey.d.next = false;
                        } else {
                            self.ustage.d.next = false;
                            self.badkey.d.next = true;
                        }
                    }
                    if self.s_buffer.val() {
                        self.bufram.we.next = true;
                        self.tags.we.next = true;
                        // A stale word is rewritten whole: unwritten bytes become 0.
                        if self.stale.val() {
                            self.bufram.wbe.next = 0xf.into();
                            self.bufram.wdata.next = self.trig.val();
                        }
                    }
                }
            }
            CoreState::Count => {
                self.busy.next = true;
                self.fwb.d.next = self.fuse.q.val();
                self.state.d.next = CoreState::Decide;
                if self.cur_cnt.val() < self.k_width.val() {
                    self.state.d.next = CoreState::PersistCount;
                    self.master.d.next = self.master.q.val() + 1;
                    if self.new_cnt.val() >= self.k_width.val() {
                        self.fuse.d.next = true;
                    }
                    if self.cregion.q.val() == 0 {
                        self.ctr0_lo.d.next = (self.ctr0_lo.q.val() << 1) | 1;
                        self.ctr0_hi.d.next = (self.ctr0_hi.q.val() << 1)
                            | bit_cast::<32, 1>(self.ctr0_lo.q.val().get_bits::<1>(31));
                        self.cnt0.d.next = self.new_cnt.val();
                    }
                    if self.cregion.q.val() == 1 {
                        self.ctr1_lo.d.next = (self.ctr1_lo.q.val() << 1) | 1;
                        self.ctr1_hi.d.next = (self.ctr1_hi.q.val() << 1)
                            | bit_cast::<32, 1>(self.ctr1_lo.q.val().get_bits::<1>(31));
                        self.cnt1.d.next = self.new_cnt.val();
                    }
                    if self.cregion.q.val() == 2 {
                        self.ctr2_lo.d.next = (self.ctr2_lo.q.val() << 1) | 1;
                        self.ctr2_hi.d.next = (self.ctr2_hi.q.val() << 1)
                            | bit_cast::<32, 1>(self.ctr2_lo.q.val().get_bits::<1>(31));
                        self.cnt2.d.next = self.new_cnt.val();
                    }
                }
            }
            CoreState::PersistCount => {
                self.busy.next = true;
                self.persist_req.next = true;
                if self.persist_ack.val() {
                    self.state.d.next = CoreState::Decide;
                }
                if self.persist_nak.val() {
                    self.state.d.next = CoreState::Idle;
                }
            }
            CoreState::Decide => {
                self.busy.next = true;
                self.ptr.d.next = 0.into();
                self.nwords.d.next = bit_cast::<20, 32>(self.flen.q.val() >> 2);
                self.dst_w.d.next = bit_cast::<20, 32>(self.faddr.q.val() >> 2);
                self.src_w.d.next = bit_cast::<20, 32>(self.fsrc.q.val() >> 2);
                self.state.d.next = CoreState::Idle;
                if self.fwb.q.val() {
                    self.fresult.d.next = self.k_ref_fuse.val();
                } else if !self.unlocked.q.val() {
                    self.fresult.d.next = self.k_ref_locked.val();
                } else if self.is_prog.q.val() & !self.args_ok.val() {
                    self.fresult.d.next = self.k_ref_args.val();
                } else if self.is_prog.q.val() {
                    self.state.d.next = CoreState::ProgRead;
                } else {
                    self.state.d.next = CoreState::Erase;
                }
            }
            CoreState::Erase => {
                self.busy.next = true;
                self.fl_we.next = true;
                self.ptr.d.next = self.ptr.q.val() + 1;
                if bit_cast::<32, 20>(self.ptr.q.val() + 1) == self.r_words.val() {
                    self.state.d.next = CoreState::PersistDone;
                }
            }
            CoreState::ProgRead => {
                self.busy.next = true;
                self.fl_raddr.next =
                    bit_cast::<FLASH_ABITS, 20>(self.dst_w.q.val() + self.ptr.q.val());
                self.bufram.raddr.next =
                    bit_cast::<BUF_ABITS, 20>(self.src_w.q.val() + self.ptr.q.val());
                self.tags.raddr.next =
                    bit_cast::<BUF_ABITS, 20>(self.src_w.q.val() + self.ptr.q.val());
                self.state.d.next = CoreState::ProgWrite;
            }
            CoreState::ProgWrite => {
                self.busy.next = true;
                self.fl_waddr.next =
                    bit_cast::<FLASH_ABITS, 20>(self.dst_w.q.val() + self.ptr.q.val());
                self.fl_wdata.next = self.r_rdata.val() & self.buf_v.val();
                self.fl_we.next = true;
                self.ptr.d.next = self.ptr.q.val() + 1;
                self.state.d.next = CoreState::ProgRead;
                if self.ptr.q.val() + 1 == self.nwords.q.val() {
                    self.state.d.next = CoreState::PersistDone;
                }
            }
            CoreState::PersistDone => {
                self.busy.next = true;
                self.persist_req.next = true;
                if self.persist_ack.val() {
                    self.fresult.d.next = self.k_done.val();
                    self.state.d.next = CoreState::Idle;
                }
                if self.persist_nak.val() {
                    self.state.d.next = CoreState::Idle;
                }
            }
            CoreState::OobPersist => {
                // The state after the physical reset: counters and fuse cleared,
                // EPOCH + 1, MASTER kept.
                self.persist_req.next = true;
                self.nv_ctr0_lo.next = 0.into();
                self.nv_ctr0_hi.next = 0.into();
                self.nv_ctr1_lo.next = 0.into();
                self.nv_ctr1_hi.next = 0.into();
                self.nv_ctr2_lo.next = 0.into();
                self.nv_ctr2_hi.next = 0.into();
                self.nv_fuse.next = false;
                self.nv_epoch.next = self.epoch.q.val() + 1;
                if self.persist_ack.val() {
                    self.ctr0_lo.d.next = 0.into();
                    self.ctr0_hi.d.next = 0.into();
                    self.ctr1_lo.d.next = 0.into();
                    self.ctr1_hi.d.next = 0.into();
                    self.ctr2_lo.d.next = 0.into();
                    self.ctr2_hi.d.next = 0.into();
                    self.cnt0.d.next = 0.into();
                    self.cnt1.d.next = 0.into();
                    self.cnt2.d.next = 0.into();
                    self.fuse.d.next = false;
                    self.epoch.d.next = self.epoch.q.val() + 1;
                    self.o_pr_ok.next = true;
                    self.state.d.next = CoreState::Idle;
                }
                if self.persist_nak.val() {
                    self.o_pr_fail.next = true;
                    self.state.d.next = CoreState::Idle;
                }
            }
            CoreState::OobHash => {
                self.o_hash_grant.next = true;
                self.fl_raddr.next = self.oob.hash_raddr.val();
                if !self.oob.hash_req.val() {
                    self.state.d.next = CoreState::Idle;
                }
            }
            CoreState::Clear => {
                self.bufram.waddr.next = bit_cast::<BUF_ABITS, 20>(self.ptr.q.val());
                self.bufram.wdata.next = 0.into();
                self.bufram.wbe.next = 0xf.into();
                self.bufram.we.next = true;
                self.tags.waddr.next = bit_cast::<BUF_ABITS, 20>(self.ptr.q.val());
                self.tags.wdata.next = 0.into();
                self.tags.we.next = true;
                self.ptr.d.next = self.ptr.q.val() + 1;
                if (self.ptr.q.val() + 1 == self.k_bufwords.val()) | (self.k_bufwords.val() == 0) {
                    self.state.d.next = CoreState::Idle;
                }
            }
        }

        self.oob.rx_data.next = self.o_rx_data.val();
        self.oob.tx_ready.next = self.o_tx_ready.val();
        self.oob.pr_ok.next = self.o_pr_ok.val();
        self.oob.pr_fail.next = self.o_pr_fail.val();
        self.oob.hash_grant.next = self.o_hash_grant.val();
        self.oob.hash_rdata.next = self.o_hash_rdata.val();

        // Flash RAM ports: the command's region is written.
        self.flash0.raddr.next = self.fl_raddr.val();
        self.flash1.raddr.next = self.fl_raddr.val();
        self.flash2.raddr.next = self.fl_raddr.val();
        self.flash0.waddr.next = self.fl_waddr.val();
        self.flash1.waddr.next = self.fl_waddr.val();
        self.flash2.waddr.next = self.fl_waddr.val();
        self.flash0.wdata.next = self.fl_wdata.val();
        self.flash1.wdata.next = self.fl_wdata.val();
        self.flash2.wdata.next = self.fl_wdata.val();
        self.flash0.wbe.next = 0xf.into();
        self.flash1.wbe.next = 0xf.into();
        self.flash2.wbe.next = 0xf.into();
        self.flash0.we.next = self.fl_we.val() & (self.cregion.q.val() == 0);
        self.flash1.we.next = self.fl_we.val() & (self.cregion.q.val() == 1);
        self.flash2.we.next = self.fl_we.val() & (self.cregion.q.val() == 2);

        // Volatile reset: reset, FLR, power cycle, or SOFT_RESET_MAGIC.
        if self.reset.val() | self.do_clear.val() {
            // Bump the buffer generation; walk the RAM only when it wraps.
            self.state.d.next = CoreState::Idle;
            self.gen.d.next = self.gen.q.val() + 1;
            if self.gen.q.val() == self.k_gen_last.val() {
                self.state.d.next = CoreState::Clear;
                self.gen.d.next = 0.into();
            }
            self.ptr.d.next = 0.into();
            // Every volatile register to its reset value from the table.
            self.control.d.next = self.k_r_control.val();
            self.scratch0.d.next = self.k_r_scratch.val();
            self.scratch1.d.next = self.k_r_scratch.val();
            self.scratch2.d.next = self.k_r_scratch.val();
            self.scratch3.d.next = self.k_r_scratch.val();
            self.scratch4.d.next = self.k_r_scratch.val();
            self.scratch5.d.next = self.k_r_scratch.val();
            self.scratch6.d.next = self.k_r_scratch.val();
            self.scratch7.d.next = self.k_r_scratch.val();
            self.doorbell.d.next = self.k_r_doorbell.val();
            self.irq.d.next = self.k_r_irq.val();
            self.hung.d.next = false;
            self.fregion.d.next = self.k_r_fregion.val();
            self.faddr.d.next = self.k_r_faddr.val();
            self.faddr_w.d.next = self.k_r_faddr_w.val();
            self.flen.d.next = self.k_r_flen.val();
            self.fsrc.d.next = self.k_r_fsrc.val();
            self.fresult.d.next = self.k_r_fresult.val();
            self.unlocked.d.next = false;
            self.ustage.d.next = false;
            self.badkey.d.next = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter::settle;

    fn small_core() -> DeviceCore {
        let mut c = DeviceCore::new(CoreParams {
            width: 4,
            region_sizes: [2048, 1024, 256],
            serial: 1,
            buffer_words: 16,
            oob_divisor: 4,
        });
        c.connect_all();
        settle(&mut c);
        c
    }

    #[test]
    fn clock_fanout_is_complete() {
        let mut c = small_core();
        for _ in 0..3 {
            c.clock.next = Clock { clk: true };
            settle(&mut c);
            c.clock_to(false);
            // A full pass now must find nothing left to change.
            c.update_all();
            assert!(
                !c.has_changed(),
                "a register's clock is missing from clock_to"
            );
        }
    }

    /// Fanning the rising edge out before the settle latches the same values as
    /// letting the clock propagate pass by pass: two cores, one clocked each way,
    /// driven with the same bus traffic, agree on every output after every edge.
    #[test]
    fn rising_edge_fanout_matches_propagation() {
        let mut a = small_core();
        let mut b = small_core();
        let mut x = 0x1234_5678u32;
        for cycle in 0..4000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            for c in [&mut a, &mut b] {
                c.strobe.next = x & 3 == 0;
                c.addr.next = (((x >> 8) % 0x1100) as u64).into();
                c.we.next = x & 4 != 0;
                c.wdata.next = ((x.rotate_left(7)) as u64).into();
                c.be.next = (((x >> 4) & 0xf) as u64).into();
                c.persist_ack.next = c.persist_req.val();
                c.oob_rx_valid.next = x & 0x30 == 0x30;
                c.oob_rx_data.next = (((x >> 20) & 0xff) as u64).into();
                c.oob_tx_ready.next = true;
                settle(c);
            }
            a.clock_to(true);
            settle(&mut a);
            a.clock_to(false);
            b.clock.next = Clock { clk: true };
            settle(&mut b);
            b.clock.next = Clock { clk: false };
            settle(&mut b);
            let out = |c: &DeviceCore| {
                (
                    c.ready.val(),
                    c.ack.val(),
                    c.rdata.val(),
                    c.persist_req.val(),
                    c.oob_tx_valid.val(),
                    c.oob_tx_data.val(),
                    c.nv_master.val(),
                    c.nv_ctr0_lo.val(),
                )
            };
            assert_eq!(out(&a), out(&b), "cycle {cycle}");
        }
    }
}

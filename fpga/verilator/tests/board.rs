//! The board top verilated (the `fpga` path with the Verilog that goes on the
//! board): cycle-by-cycle equal to the rust-hdl board top on the same pins, and the
//! `fpga` backend on it passes the Device properties every backend runs.

use hilrig_board::proto::{encode_request, Request};
use hilrig_board::top::BoardParams;
use hilrig_board::{BoardCircuit, Fpga, FpgaOptions, RtlBoard, SimPipe};
use hilrig_device::device::DeviceError;
use hilrig_device::oob;
use hilrig_device::regmap::Reg;
use hilrig_device::state::{DeviceConfig, NvState};
use hilrig_device::testkit::{check, op, Backend};
use hilrig_fpga::core::CoreParams;
use hilrig_fpga::uartsim::{LineDriver, SoftRx};
use hilrig_verilator::{available, sim_board, BuildOptions, VerilatedBoard};
use proptest::prelude::*;
use std::time::Duration;

const WIDTH: u8 = 4;
const SERIAL: u64 = 1;
const HOST_DIV: u16 = 4;
const OOB_DIV: u16 = 5;
const REGIONS: [u32; 3] = [2048, 1024, 256];

fn params() -> BoardParams {
    BoardParams::with_divisors(CoreParams::small(WIDTH, SERIAL), HOST_DIV, OOB_DIV)
}

fn factory() -> NvState {
    let cfg = DeviceConfig {
        counter_width: WIDTH,
        region_sizes: REGIONS,
    };
    NvState::factory(cfg, SERIAL).expect("factory state")
}

/// Every output of both circuits, packed, after a cycle.
fn outs(c: &dyn BoardCircuit) -> (bool, bool, u8, bool, bool, bool) {
    (
        c.uart_tx(),
        c.oob_tx(),
        c.leds(),
        c.bridge_idle(),
        c.bridge_receiving(),
        c.core_busy(),
    )
}

/// A deterministic byte stream (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn verilated_board_equals_the_rtl_board_cycle_by_cycle() {
    if !available("verilated_board_equals_the_rtl_board_cycle_by_cycle") {
        return;
    }
    let nv = factory();
    let mut v = VerilatedBoard::with_nv(params(), &nv, &BuildOptions::default())
        .expect("the board top verilates and loads");
    let mut r = RtlBoard::with_nv(params(), &nv);
    // Negative control: a board of another serial on the same pins must differ
    // somewhere (the OOB IDENTIFY answer), or the comparison could not fail.
    let other = BoardParams::with_divisors(CoreParams::small(WIDTH, SERIAL + 1), HOST_DIV, OOB_DIV);
    let mut control = RtlBoard::with_nv(other, &nv);
    let mut control_differed = false;
    // Host frames: good ones (identify, writes that unlock and program the flash,
    // reads, ROM reads, a reset), a corrupted one and line noise; OOB: a counters
    // read, a wrong-key reset and noise — on both UARTs at once.
    let mut host: Vec<Vec<u8>> = Vec::new();
    let mut seq = 0u8;
    let mut frame = |req: Request| {
        seq = seq.wrapping_add(1);
        encode_request(seq, &req)
    };
    host.push(frame(Request::Identify));
    for (reg, val) in [
        (Reg::Scratch, 0x1234_5678u32),
        (Reg::FlashUnlock, hilrig_device::regmap::UNLOCK_KEY1),
        (Reg::FlashUnlock, hilrig_device::regmap::UNLOCK_KEY2),
    ] {
        host.push(frame(Request::Write {
            addr: reg.offset() / 4,
            be: 0xf,
            data: val,
        }));
    }
    host.push(frame(Request::Read {
        addr: Reg::Scratch.offset() / 4,
        be: 0xf,
    }));
    host.push(frame(Request::RomRead { addr: 3 }));
    let mut bad = frame(Request::Read {
        addr: Reg::Id.offset() / 4,
        be: 0xf,
    });
    bad[5] ^= 0x40;
    host.push(bad);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    host.push((0..24).map(|_| rng.next() as u8).collect());
    host.push(frame(Request::Read {
        addr: Reg::Counter.offset() / 4,
        be: 0xf,
    }));
    host.push(frame(Request::Reset));
    // Back to back, while the bridge may still be answering the one before.
    host.push(frame(Request::Identify));
    host.push(frame(Request::Identify));
    let oob_frames = vec![
        oob::encode_request(1, &oob::Request::ReadCounters),
        (0..16).map(|_| rng.next() as u8).collect(),
        oob::encode_request(2, &oob::Request::PhysicalReset([0u8; 32])),
        oob::encode_request(3, &oob::Request::Identify),
    ];

    let mut h = LineDriver::new(HOST_DIV);
    let mut o = LineDriver::new(OOB_DIV);
    // One frame at a time, a gap after each (the host waits for its answer), except
    // the last two which go back to back.
    let (mut hq, mut oq) = (host.into_iter(), oob_frames.into_iter());
    let (mut h_next, mut o_next) = (0u64, 0u64);
    let mut host_rx = SoftRx::new(HOST_DIV);
    let mut oob_rx = SoftRx::new(OOB_DIV);
    for cycle in 0..120_000u64 {
        if h.is_idle() && cycle >= h_next {
            if let Some(f) = hq.next() {
                h.push(&f);
                h_next = cycle + if hq.len() == 1 { 0 } else { 3_000 };
            }
        }
        if o.is_idle() && cycle >= o_next {
            if let Some(f) = oq.next() {
                o.push(&f);
                o_next = cycle + 8_000;
            }
        }
        let (hp, op) = (h.level(), o.level());
        v.cycle(hp, op);
        r.cycle(hp, op);
        control.cycle(hp, op);
        let (a, b) = (outs(&v), outs(&r));
        assert_eq!(a, b, "cycle {cycle}: verilated {a:?} vs rtl {b:?}");
        control_differed |= outs(&control) != b;
        host_rx.sample(a.0);
        oob_rx.sample(a.1);
        h.advance();
        o.advance();
    }
    // The comparison saw the circuits answer on both UARTs: the good host frames
    // and the bad-CRC one (at least 10 answers of 10 bytes), and OOB answers.
    let (hb, ob) = (host_rx.take(), oob_rx.take());
    assert!(
        control_differed,
        "a board of another serial answered identically: the comparison cannot fail"
    );
    assert!(
        hb.len() >= 100,
        "{} response bytes on the bridge UART: {hb:02x?}",
        hb.len()
    );
    assert!(
        ob.len() >= 20,
        "{} response bytes on the OOB UART: {ob:02x?}",
        ob.len()
    );
}

fn fpga_on(pipe: &SimPipe) -> Result<Fpga, DeviceError> {
    let mut f = Fpga::with_options(
        Box::new(pipe.host()),
        FpgaOptions {
            timeout: Duration::from_secs(2),
            retries: 4,
        },
    )?;
    f.set_oob(Box::new(pipe.oob()));
    Ok(f)
}

fn no_state_file(_: &std::path::Path) -> DeviceError {
    DeviceError::Unsupported {
        backend: "fpga",
        what: "state files (the board keeps its own state)",
    }
}

fn fpga_verilated() -> Backend<'static> {
    Backend {
        new: &|nv| {
            let p = BoardParams::with_divisors(
                CoreParams::small(nv.config.counter_width, nv.serial),
                HOST_DIV,
                OOB_DIV,
            );
            let board = sim_board(p, &nv, &BuildOptions::default()).map_err(DeviceError::from)?;
            let pipe = SimPipe::new(board);
            Ok(Box::new(fpga_on(&pipe)?))
        },
        create: &|p, _| Err(no_state_file(p)),
        open: &|p| Err(no_state_file(p)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// The shared Device properties (counters count exactly and never decrease,
    /// the fuse freezes the flash, OOB equals in-band, the hang wedges until a
    /// reset) on the `fpga` backend against the verilated board top.
    #[test]
    fn fpga_properties_on_the_verilated_board(ops_ in proptest::collection::vec(op(), 1..30)) {
        if !available("fpga_properties_on_the_verilated_board") {
            return Ok(());
        }
        check(&fpga_verilated(), WIDTH, REGIONS, &ops_, None)?;
    }
}

#[test]
fn a_state_of_another_geometry_is_refused_by_name() {
    if !available("a_state_of_another_geometry_is_refused_by_name") {
        return;
    }
    let cfg = DeviceConfig {
        counter_width: WIDTH,
        region_sizes: [4096, 1024, 256],
    };
    let nv = NvState::factory(cfg, SERIAL).expect("factory state");
    let e = VerilatedBoard::with_nv(params(), &nv, &BuildOptions::default())
        .err()
        .expect("a 4 KiB region 0 does not fit the small board");
    let msg = e.to_string();
    assert!(
        msg.contains("flash region 0") && msg.contains("4096"),
        "{msg}"
    );
}

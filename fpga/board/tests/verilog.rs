//! The board top's Verilog: it elaborates, the bridge synthesizes without latches
//! (yosys), and under Icarus Verilog the whole board answers directed UART traffic
//! (unlock, program, counter increments, a retried trigger write, the fuse, bad
//! frames, ROM window, reset, OOB frames on the second UART) with exactly the bytes
//! the rust-hdl simulation sends. Tests needing a tool skip loudly without it.

mod common;

use common::*;
use hilrig_board::bridge::{bridge_verilog, BridgeParams};
use hilrig_board::proto::{self, Request};
use hilrig_board::{board_top_verilog, BoardParams, SimBoard};
use hilrig_device::oob;
use hilrig_device::regmap::*;
use std::fmt::Write;
#[test]
fn board_top_generates_verilog() {
    let v = board_top_verilog(BoardParams::board(8, 7));
    assert!(v.contains("module top"));
    assert!(v.contains("uart_rx") && v.contains("oob_tx") && v.contains("leds"));
    let p = BoardParams::for_clock(8, 7, 100_000_000, 115_200);
    assert_eq!((p.bridge.divisor, p.core.oob_divisor), (868, 868));
    assert_eq!(
        BoardParams::for_clock(8, 7, 12_000_000, 115_200),
        BoardParams::board(8, 7)
    );
}

/// The bridge alone synthesizes for iCE40 through the project's flow, which fails
/// on latches and undriven wires.
#[test]
fn bridge_synthesizes_without_latches() {
    use hilrig_flow::flow;
    if !flow::tool_available(flow::YOSYS) {
        eprintln!("SKIPPED bridge_synthesizes_without_latches: yosys is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("bridge.v");
    std::fs::write(&v, bridge_verilog(BridgeParams::new(104, 512))).unwrap();
    let board = hilrig_flow::board::board("alchitry-cu").unwrap();
    let r = flow::synth(&[v], "top", &board, &dir.path().join("synth"))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("bridge alone: {} LUT4, {} flip-flops", r.luts, r.flip_flops);
    assert!(r.luts > 0);
}

enum Step {
    Host(Vec<u8>),
    /// Host bytes that get no response (a truncated frame): wait out the timeout.
    HostSilent(Vec<u8>),
    Oob(Vec<u8>),
}

fn w(seq: u8, reg: u32, v: u32) -> Step {
    Step::Host(proto::encode_request(
        seq,
        &Request::Write {
            addr: reg / 4,
            be: 0xf,
            data: v,
        },
    ))
}

fn r(seq: u8, reg: u32) -> Step {
    Step::Host(proto::encode_request(
        seq,
        &Request::Read {
            addr: reg / 4,
            be: 0xf,
        },
    ))
}

#[test]
fn board_verilog_answers_uart_traffic_like_the_simulation() {
    if !hilrig_fpga::icarus::available("board_verilog_answers_uart_traffic_like_the_simulation") {
        return;
    }
    let width = 3;
    let p = BoardParams {
        bridge: BridgeParams {
            byte_timeout: 200,
            ..params(width, 0x77).bridge
        },
        ..params(width, 0x77)
    };
    let mut board = SimBoard::new(p);
    let verilog = board.verilog().expect("an rtl board has Verilog");
    let mut steps = vec![
        Step::Host(proto::encode_request(1, &Request::Identify)),
        w(2, Reg::FlashUnlock.offset(), UNLOCK_KEY1),
        w(3, Reg::FlashUnlock.offset(), UNLOCK_KEY2),
    ];
    let mut seq = 4u8;
    let mut next = || {
        seq = seq.wrapping_add(1);
        seq
    };
    for i in 0..4 {
        steps.push(w(next(), BUFFER_BASE + 4 * i, 0x1234_5678 ^ (i * 0x1111)));
    }
    for (reg, v) in [
        (Reg::FlashRegion, 2),
        (Reg::FlashAddr, 8),
        (Reg::FlashSrc, 0),
        (Reg::FlashLen, 16),
        (Reg::FlashCmd, FLASH_CMD_PROGRAM),
    ] {
        steps.push(w(next(), reg.offset(), v));
    }
    for reg in [Reg::FlashStatus, Reg::Master] {
        steps.push(r(next(), reg.offset()));
    }
    steps.push(r(next(), Reg::Counter.offset() + 8));
    steps.push(w(next(), Reg::FlashAddr.offset(), 12));
    steps.push(r(next(), Reg::FlashData.offset()));
    // A retried ERASE (same seq twice): counted once.
    let s = next();
    steps.push(w(s, Reg::FlashCmd.offset(), FLASH_CMD_ERASE));
    steps.push(w(s, Reg::FlashCmd.offset(), FLASH_CMD_ERASE));
    steps.push(r(next(), Reg::Counter.offset() + 8));
    // Third attempt blows the fuse (width 3); the fourth is refused.
    steps.push(w(next(), Reg::FlashCmd.offset(), FLASH_CMD_ERASE));
    steps.push(w(next(), Reg::FlashCmd.offset(), FLASH_CMD_ERASE));
    for reg in [
        Reg::FlashStatus,
        Reg::Fuse,
        Reg::SlotsLeft,
        Reg::Status,
        Reg::Master,
    ] {
        steps.push(r(next(), reg.offset()));
    }
    // Bad frames: a flipped bit, an unknown op, garbage then a truncated frame.
    let mut bad = proto::encode_request(next(), &Request::Read { addr: 1, be: 0xf });
    bad[5] ^= 4;
    steps.push(Step::Host(bad));
    let mut unknown = vec![proto::REQ_SYNC, next(), 0x66, 0];
    let c = proto::crc16(&unknown[1..]);
    unknown.extend_from_slice(&c.to_be_bytes());
    steps.push(Step::Host(unknown));
    let mut cut = vec![0x00, 0x42];
    cut.extend_from_slice(&proto::encode_request(next(), &Request::Read { addr: 0, be: 0xf })[..6]);
    steps.push(Step::HostSilent(cut));
    steps.push(Step::Host(proto::encode_request(
        next(),
        &Request::RomRead { addr: 5 },
    )));
    steps.push(w(next(), Reg::Scratch.offset(), 0xfeed_f00d));
    steps.push(Step::Host(proto::encode_request(next(), &Request::Reset)));
    steps.push(r(next(), Reg::Scratch.offset()));
    steps.push(r(next(), Reg::Counter.offset() + 8));
    // OOB on the second UART.
    steps.push(Step::Oob(oob::encode_request(
        9,
        &oob::Request::ReadCounters,
    )));
    steps.push(Step::Oob(oob::encode_request(10, &oob::Request::Identify)));
    steps.push(Step::Oob(oob::frame(11, 0x55, &[1, 2])));

    // The simulation's answers, and the test bench that asks the Verilog the same.
    let hd = p.bridge.divisor;
    let od = p.core.oob_divisor;
    let mut want = String::new();
    let (mut hn, mut on) = (0usize, 0usize);
    let mut tb = format!(
        "`timescale 1ns/1ps
module tb;
  reg clock = 0;
  always #5 clock = ~clock;
  reg uart_rx = 1, oob_rx = 1;
  wire uart_tx, oob_tx;
  wire [7:0] leds;
  integer hn = 0, on = 0, guard;
  top uut(.clock(clock), .uart_rx(uart_rx), .uart_tx(uart_tx), .oob_rx(oob_rx),
    .oob_tx(oob_tx), .leds(leds));
  task send(input which, input [7:0] b);
  integer i, d;
  begin
    d = which ? {od} : {hd};
    @(negedge clock);
    if (which) oob_rx = 0; else uart_rx = 0;
    repeat (d) @(negedge clock);
    for (i = 0; i < 8; i = i + 1) begin
      if (which) oob_rx = b[i]; else uart_rx = b[i];
      repeat (d) @(negedge clock);
    end
    if (which) oob_rx = 1; else uart_rx = 1;
    repeat (d) @(negedge clock);
  end
  endtask
  // Receivers: sample mid-bit on falling clock edges.
  reg [7:0] hb, ob;
  integer k;
  initial forever begin
    @(negedge uart_tx);
    repeat ({hh}) @(negedge clock);
    for (k = 0; k < 8; k = k + 1) begin repeat ({hd}) @(negedge clock); hb[k] = uart_tx; end
    repeat ({hd}) @(negedge clock);
    $display(\"H %h\", hb); hn = hn + 1;
  end
  integer j;
  initial forever begin
    @(negedge oob_tx);
    repeat ({oh}) @(negedge clock);
    for (j = 0; j < 8; j = j + 1) begin repeat ({od}) @(negedge clock); ob[j] = oob_tx; end
    repeat ({od}) @(negedge clock);
    $display(\"O %h\", ob); on = on + 1;
  end
  task hwait(input integer n);
  begin
    guard = 0;
    while (hn < n && guard < 200000) begin @(negedge clock); guard = guard + 1; end
    if (guard >= 200000) $display(\"TIMEOUT\");
    repeat (8) @(negedge clock);
  end
  endtask
  task owait(input integer n);
  begin
    guard = 0;
    while (on < n && guard < 200000) begin @(negedge clock); guard = guard + 1; end
    if (guard >= 200000) $display(\"TIMEOUT\");
    repeat (8) @(negedge clock);
  end
  endtask
  initial begin
    repeat (40) @(negedge clock);
",
        hh = hd / 2,
        oh = od / 2,
    );
    for step in &steps {
        match step {
            Step::Host(b) | Step::HostSilent(b) => {
                board.push_host(b);
                board.run(u64::MAX, false);
                let out = board.take_host();
                for x in &out {
                    writeln!(want, "H {x:02x}").unwrap();
                }
                hn += out.len();
                for x in b {
                    writeln!(tb, "    send(0, 8'h{x:02x});").unwrap();
                }
                if matches!(step, Step::HostSilent(_)) {
                    assert!(out.is_empty(), "a truncated frame was answered");
                    writeln!(
                        tb,
                        "    repeat ({}) @(negedge clock);",
                        p.bridge.byte_timeout + 50
                    )
                    .unwrap();
                } else {
                    assert_eq!(out.len(), proto::RESP_LEN, "one response a frame");
                    writeln!(tb, "    hwait({hn});").unwrap();
                }
            }
            Step::Oob(b) => {
                board.push_oob(b);
                board.run(u64::MAX, false);
                let out = board.take_oob();
                assert!(!out.is_empty(), "OOB request unanswered");
                for x in &out {
                    writeln!(want, "O {x:02x}").unwrap();
                }
                on += out.len();
                for x in b {
                    writeln!(tb, "    send(1, 8'h{x:02x});").unwrap();
                }
                writeln!(tb, "    owait({on});").unwrap();
            }
        }
    }
    writeln!(want, "L {:02x}", board.leds()).unwrap();
    tb.push_str(
        "    $display(\"L %h\", leds);\n    $display(\"DONE\");\n    $finish;\n  end\nendmodule\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let text = hilrig_fpga::icarus::run(dir.path(), &tb, &verilog).unwrap();
    assert!(text.contains("DONE"), "vvp: {text}");
    assert!(
        !text.contains("TIMEOUT"),
        "the Verilog stopped answering: {text}"
    );
    let got: String = text
        .lines()
        .filter(|l| l.starts_with("H ") || l.starts_with("O ") || l.starts_with("L "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(got, want, "UART bytes: verilog (left), simulation (right)");
    eprintln!(
        "{} host and {} OOB response bytes equal; sim {} cycles",
        hn,
        on,
        board.cycles()
    );
    // The directed vectors did what they say (checked on the simulation's bytes).
    assert!(want.contains("L 03"), "MASTER 3 on the LEDs:\n{want}");
}

//! The core elaborates to Verilog (rust-hdl's checks pass) at a small synthesis size,
//! and the Verilog behaves like the simulation under Icarus. (Its synthesis for the
//! iCE40 is tested by hilrig-flow and by `hilrig fpga synth` in tests/cli.rs.)

use hilrig_fpga::core::CoreParams;

#[test]
fn core_generates_verilog() {
    let v = hilrig_fpga::core::verilog(CoreParams::small(8, 7));
    assert!(v.contains("module top"), "{}", &v[..v.len().min(400)]);
    assert!(
        v.contains("reg [31:0] mem [0:511]"),
        "flash RAM sized by the configuration"
    );
    std::fs::write(std::env::temp_dir().join("hilrig_core.v"), &v).ok();
}

/// The generated Verilog behaves like the rust-hdl simulation: the same seeded
/// bus-access sequence (registers, buffers, flash commands, ROM window, resets) is
/// run on `Rtl` and, under Icarus Verilog, on the Verilog of the same device; every
/// read must agree. Skipped loudly without iverilog.
#[test]
fn generated_verilog_matches_the_simulation_under_iverilog() {
    use hilrig_device::device::{Device, ResetKind};
    use hilrig_device::regmap::*;
    use hilrig_device::state::{DeviceConfig, NvState};
    use hilrig_fpga::difftest::Rng;
    use std::fmt::Write;

    if !hilrig_fpga::icarus::available("generated_verilog_matches_the_simulation_under_iverilog") {
        return;
    }
    enum Op {
        Read(u32, u8),
        Write(u32, u32, u8),
        Rom(u32),
        Reset,
    }
    let cfg = DeviceConfig {
        counter_width: 24,
        region_sizes: [2048, 1024, 256],
    };
    let nv = NvState::factory(cfg, 3).unwrap();
    let mut rtl = hilrig_fpga::Rtl::new(nv).unwrap();
    let verilog = rtl.verilog();
    let mut r = Rng::new(2024);
    let regs: Vec<u32> = REGISTERS
        .iter()
        .filter(|d| d.reg != Reg::Buffer)
        .flat_map(|d| (0..d.count).map(move |i| d.offset + 4 * i))
        .collect();
    let mut ops = Vec::new();
    let word = |r: &mut Rng| -> u32 {
        match r.below(4) {
            0 | 1 => regs[r.below(regs.len() as u64) as usize],
            2 => BUFFER_BASE + 4 * r.below(64) as u32,
            _ => 4 * r.below(0x4000) as u32,
        }
    };
    while ops.len() < 3000 {
        match r.below(100) {
            0..=39 => ops.push(Op::Read(word(&mut r), 1 + r.below(15) as u8)),
            40..=69 => {
                let w = word(&mut r);
                if w == Reg::HangTrigger.offset() && !r.chance(200) {
                    continue;
                }
                let v = match r.below(6) {
                    0 => SOFT_RESET_MAGIC,
                    1 => r.below(4) as u32,
                    _ => r.next_u64() as u32,
                };
                ops.push(Op::Write(w, v, 1 + r.below(15) as u8));
                // Read back often: byte lanes and merges show there.
                if r.chance(500) {
                    ops.push(Op::Read(w, 0xf));
                }
            }
            70..=89 => {
                let region = r.below(4) as u32;
                ops.push(Op::Write(Reg::FlashUnlock.offset(), UNLOCK_KEY1, 0xf));
                ops.push(Op::Write(Reg::FlashUnlock.offset(), UNLOCK_KEY2, 0xf));
                ops.push(Op::Write(Reg::FlashRegion.offset(), region, 0xf));
                ops.push(Op::Write(
                    Reg::FlashAddr.offset(),
                    4 * r.below(80) as u32,
                    0xf,
                ));
                ops.push(Op::Write(
                    Reg::FlashSrc.offset(),
                    4 * r.below(64) as u32,
                    0xf,
                ));
                ops.push(Op::Write(
                    Reg::FlashLen.offset(),
                    4 * r.below(40) as u32,
                    0xf,
                ));
                ops.push(Op::Write(
                    BUFFER_BASE + 4 * r.below(64) as u32,
                    r.next_u64() as u32,
                    0xf,
                ));
                let cmd = [
                    FLASH_CMD_ERASE,
                    FLASH_CMD_PROGRAM,
                    FLASH_CMD_PROGRAM,
                    FLASH_CMD_LOCK,
                    7,
                ][r.below(5) as usize];
                ops.push(Op::Write(Reg::FlashCmd.offset(), cmd, 0xf));
                ops.push(Op::Read(Reg::FlashStatus.offset(), 0xf));
                ops.push(Op::Read(Reg::FlashData.offset(), 0xf));
                for off in (Reg::Counter.offset()..=Reg::Epoch.offset()).step_by(4) {
                    ops.push(Op::Read(off, 0xf));
                }
            }
            90..=97 => ops.push(Op::Rom(4 * r.below(512) as u32)),
            _ => ops.push(Op::Reset),
        }
    }
    // The simulation's answers, and the test bench that asks the Verilog the same.
    let mut want = Vec::new();
    let mut tb = String::from(
        "`timescale 1ns/1ps
module tb;
  reg clock = 0;
  always #5 clock = ~clock;
  reg reset = 0, strobe = 0, we = 0, rom_sel = 0, persist_nak = 0, nv_load = 0, nv_fuse_in = 0;
  reg [17:0] addr = 0;
  reg [31:0] wdata = 0;
  reg [3:0] be = 0;
  reg [31:0] z32 = 0;
  reg [7:0] z8 = 0;
  wire ready, ack, busy, persist_req, nv_fuse, hung_out;
  wire [31:0] rdata, nv_ctr0_lo, nv_ctr0_hi, nv_ctr1_lo, nv_ctr1_hi, nv_ctr2_lo, nv_ctr2_hi, nv_master, nv_epoch;
  top uut(.clock(clock), .reset(reset), .strobe(strobe), .addr(addr), .we(we), .wdata(wdata),
    .be(be), .rom_sel(rom_sel), .ready(ready), .ack(ack), .rdata(rdata), .busy(busy),
    .persist_req(persist_req), .persist_ack(persist_req), .persist_nak(persist_nak),
    .nv_load(nv_load), .nv_ctr0_lo_in(z32), .nv_ctr0_hi_in(z32), .nv_ctr1_lo_in(z32),
    .nv_ctr1_hi_in(z32), .nv_ctr2_lo_in(z32), .nv_ctr2_hi_in(z32), .nv_cnt0_in(z8),
    .nv_cnt1_in(z8), .nv_cnt2_in(z8), .nv_master_in(z32), .nv_fuse_in(nv_fuse_in),
    .nv_epoch_in(z32), .nv_ctr0_lo(nv_ctr0_lo), .nv_ctr0_hi(nv_ctr0_hi),
    .nv_ctr1_lo(nv_ctr1_lo), .nv_ctr1_hi(nv_ctr1_hi), .nv_ctr2_lo(nv_ctr2_lo),
    .nv_ctr2_hi(nv_ctr2_hi), .nv_master(nv_master), .nv_fuse(nv_fuse), .nv_epoch(nv_epoch),
    .hung_out(hung_out), .oob_rx_data(z8), .oob_rx_valid(1'b0), .oob_rx_end(1'b0),
    .oob_tx_ready(1'b0), .oob_uart(1'b0), .uart_rx(1'b1));
  task acc(input w, input rom, input [17:0] a, input [31:0] d, input [3:0] b);
  begin
    @(negedge clock); while (!ready) @(negedge clock);
    strobe = 1; we = w; rom_sel = rom; addr = a; wdata = d; be = b;
    @(negedge clock); strobe = 0; rom_sel = 0;
    if (!ack) $display(\"NOACK\");
    if (!w) $display(\"R %h\", rdata);
  end
  endtask
  task rst;
  begin
    @(negedge clock); while (!ready) @(negedge clock);
    reset = 1; @(negedge clock); reset = 0;
  end
  endtask
  initial begin
",
    );
    for op in &ops {
        match *op {
            Op::Read(w, m) => {
                want.push(rtl.read_word(w, m).unwrap());
                writeln!(tb, "    acc(0, 0, {}, 0, {m});", w / 4).unwrap();
            }
            Op::Write(w, v, m) => {
                rtl.write_word(w, v, m).unwrap();
                writeln!(tb, "    acc(1, 0, {}, 32'h{v:08x}, {m});", w / 4).unwrap();
            }
            Op::Rom(w) => {
                let mut b = [0u8; 4];
                rtl.rom_read(w as u64, &mut b).unwrap();
                want.push(u32::from_le_bytes(b));
                writeln!(tb, "    acc(0, 1, {}, 0, 15);", w / 4).unwrap();
            }
            Op::Reset => {
                rtl.reset(ResetKind::Flr).unwrap();
                writeln!(tb, "    rst;").unwrap();
            }
        }
    }
    tb.push_str("    @(negedge clock); while (!ready) @(negedge clock);\n    $display(\"DONE\");\n    $finish;\n  end\nendmodule\n");
    let dir = tempfile::tempdir().unwrap();
    let text = hilrig_fpga::icarus::run(dir.path(), &tb, &verilog).unwrap();
    assert!(text.contains("DONE"), "vvp: {text}");
    assert!(!text.contains("NOACK"), "an access was not acknowledged");
    let got: Vec<u32> = text
        .lines()
        .filter_map(|l| l.strip_prefix("R "))
        .map(|h| u32::from_str_radix(h.trim(), 16).unwrap_or(0xdead_0bad))
        .collect();
    assert_eq!(got.len(), want.len(), "number of reads");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "read #{i}: verilog {g:#010x}, simulation {w:#010x}");
    }
}

/// The OOB engine of the generated Verilog (framing, CRC, key compare, the
/// hand-written SHA-256 unit, PHYSICAL_RESET) answers as the rust-hdl simulation
/// does, byte for byte, through the OOB byte interface under Icarus Verilog.
/// Skipped loudly without iverilog.
#[test]
fn generated_verilog_serves_oob_like_the_simulation() {
    use hilrig_device::device::Device;
    use hilrig_device::oob::{encode_request, frame, Request};
    use hilrig_device::regmap::Region;
    use hilrig_device::state::{DeviceConfig, NvState};
    use hilrig_fpga::difftest::Rng;
    use std::fmt::Write;

    if !hilrig_fpga::icarus::available("generated_verilog_serves_oob_like_the_simulation") {
        return;
    }
    let cfg = DeviceConfig {
        counter_width: 6,
        region_sizes: [2048, 1024, 256],
    };
    let mut nv = NvState::factory(cfg, 0x1122_3344_5566_7788).unwrap();
    let mut r = Rng::new(99);
    for f in nv.flash.iter_mut() {
        for b in f.iter_mut() {
            *b = r.next_u64() as u8;
        }
    }
    let key = nv.reset_key;
    let mut rtl = hilrig_fpga::Rtl::new(nv).unwrap();
    let verilog = rtl.verilog();
    let mut badcrc = encode_request(3, &Request::ReadCounters);
    badcrc[5] ^= 0x10;
    let mut badkey = key;
    badkey[17] ^= 4;
    let requests = [
        encode_request(1, &Request::Identify),
        encode_request(2, &Request::ReadCounters),
        encode_request(3, &Request::ReadHash(Region::Vbios)),
        encode_request(4, &Request::ReadHash(Region::Firmware)),
        encode_request(5, &Request::ReadHash(Region::Config)),
        frame(6, 3, &[7]),
        badcrc,
        vec![0xa5, 0x02, 0x09],
        frame(8, 0x77, &[]),
        encode_request(9, &Request::PhysicalReset(badkey)),
        encode_request(10, &Request::PhysicalReset(key)),
        encode_request(11, &Request::ReadCounters),
    ];
    let mut want = String::new();
    let mut tb = String::from(
        "`timescale 1ns/1ps
module tb;
  reg clock = 0;
  always #5 clock = ~clock;
  reg [7:0] rxd = 0;
  reg rxv = 0, rxe = 0;
  reg [31:0] z32 = 0;
  reg [7:0] z8 = 0;
  wire [7:0] txd;
  wire txv, persist_req;
  top uut(.clock(clock), .reset(1'b0), .strobe(1'b0), .addr(18'd0), .we(1'b0), .wdata(z32),
    .be(4'd0), .rom_sel(1'b0), .persist_req(persist_req), .persist_ack(persist_req),
    .persist_nak(1'b0), .nv_load(1'b0), .nv_ctr0_lo_in(z32), .nv_ctr0_hi_in(z32),
    .nv_ctr1_lo_in(z32), .nv_ctr1_hi_in(z32), .nv_ctr2_lo_in(z32), .nv_ctr2_hi_in(z32),
    .nv_cnt0_in(z8), .nv_cnt1_in(z8), .nv_cnt2_in(z8), .nv_master_in(z32), .nv_fuse_in(1'b0),
    .nv_epoch_in(z32), .oob_rx_data(rxd), .oob_rx_valid(rxv), .oob_rx_end(rxe),
    .oob_tx_data(txd), .oob_tx_valid(txv), .oob_tx_ready(1'b1), .oob_uart(1'b0),
    .uart_rx(1'b1));
  task sb(input [7:0] b);
  begin
    @(negedge clock); rxd = b; rxv = 1; @(negedge clock); rxv = 0;
  end
  endtask
  task fin;
  integer n, w, guard;
  begin
    @(negedge clock); rxe = 1; @(negedge clock); rxe = 0;
    n = 0; w = 1000; guard = 0;
    while (n < w && guard < 100000) begin
      if (txv) begin
        $display(\"O %h\", txd);
        if (n == 1) w = txd + 6;
        n = n + 1;
      end
      guard = guard + 1;
      @(negedge clock);
    end
    $display(\"F\");
  end
  endtask
  initial begin
",
    );
    for f in &requests {
        let resp = rtl.oob(f).unwrap();
        for b in &resp {
            writeln!(want, "O {b:02x}").unwrap();
        }
        want.push_str("F\n");
        for b in f {
            writeln!(tb, "    sb(8'h{b:02x});").unwrap();
        }
        tb.push_str("    fin;\n");
    }
    tb.push_str("    $display(\"DONE\");\n    $finish;\n  end\nendmodule\n");
    let dir = tempfile::tempdir().unwrap();
    let text = hilrig_fpga::icarus::run(dir.path(), &tb, &verilog).unwrap();
    assert!(text.contains("DONE"), "vvp: {text}");
    let got: String = text
        .lines()
        .filter(|l| l.starts_with("O ") || *l == "F")
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        got, want,
        "OOB responses: verilog (left), simulation (right)"
    );
}

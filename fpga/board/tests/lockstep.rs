//! The same seeded operation sequence on the simulated board (through `Fpga`) and
//! on the behavioural model: every read, counter and status must agree.

mod common;

use common::*;
use hilrig_device::device::{Device, ResetKind};
use hilrig_device::regmap::*;
use hilrig_device::Model;
use hilrig_fpga::difftest::Rng;

/// Buffer bytes the small board keeps (the rest of the area reads 0 there).
const BOARD_BUFFER: u32 = 1024;

fn run(seed: u64, ops: usize) {
    let width = 4;
    let (pipe, nv) = pipe_board(width, 0xabc0 + seed);
    let mut board = fpga_on(&pipe);
    let mut model = Model::new(nv).unwrap();
    let mut r = Rng::new(seed);
    let regs: Vec<u32> = REGISTERS
        .iter()
        .filter(|d| d.reg != Reg::Buffer && d.reg != Reg::HangTrigger)
        .flat_map(|d| (0..d.count).map(move |i| d.offset + 4 * i))
        .collect();
    let mut reads = 0;
    let check = |i: usize, what: &str, a: u32, b: u32| {
        assert_eq!(
            a, b,
            "seed {seed} op {i}: {what}: board {a:#010x}, model {b:#010x}"
        );
    };
    for i in 0..ops {
        match r.below(100) {
            0..=34 => {
                let w = if r.chance(300) {
                    BUFFER_BASE + 4 * r.below(BOARD_BUFFER as u64 / 4) as u32
                } else {
                    regs[r.below(regs.len() as u64) as usize]
                };
                let m = 1 + r.below(15) as u8;
                let (a, b) = (
                    board.read_word(w, m).unwrap(),
                    model.read_word(w, m).unwrap(),
                );
                // The model may return the whole word; compare the bytes asked for.
                let bits = hilrig_device::device::byte_mask_bits(m);
                check(i, &format!("read {w:#x} mask {m:#x}"), a & bits, b & bits);
                reads += 1;
            }
            35..=59 => {
                let w = if r.chance(500) {
                    BUFFER_BASE + 4 * r.below(64) as u32
                } else {
                    regs[r.below(regs.len() as u64) as usize]
                };
                let v = match r.below(5) {
                    0 => r.below(4) as u32,
                    _ => r.next_u64() as u32,
                };
                let m = 1 + r.below(15) as u8;
                board.write_word(w, v, m).unwrap();
                model.write_word(w, v, m).unwrap();
            }
            60..=84 => {
                // A flash command with mostly sensible arguments.
                let region = r.below(4) as u32;
                let mut seq = vec![
                    (Reg::FlashRegion.offset(), region),
                    (Reg::FlashAddr.offset(), 4 * r.below(64) as u32),
                    (Reg::FlashSrc.offset(), 4 * r.below(32) as u32),
                    (Reg::FlashLen.offset(), 4 * r.below(24) as u32),
                    (BUFFER_BASE + 4 * r.below(32) as u32, r.next_u64() as u32),
                ];
                if r.chance(700) {
                    seq.insert(0, (Reg::FlashUnlock.offset(), UNLOCK_KEY2));
                    seq.insert(0, (Reg::FlashUnlock.offset(), UNLOCK_KEY1));
                }
                let cmd = [
                    FLASH_CMD_ERASE,
                    FLASH_CMD_PROGRAM,
                    FLASH_CMD_PROGRAM,
                    FLASH_CMD_LOCK,
                ][r.below(4) as usize];
                seq.push((Reg::FlashCmd.offset(), cmd));
                for (w, v) in seq {
                    board.write32(w, v).unwrap();
                    model.write32(w, v).unwrap();
                }
                for reg in [
                    Reg::FlashStatus,
                    Reg::FlashData,
                    Reg::Master,
                    Reg::Fuse,
                    Reg::SlotsLeft,
                ] {
                    let (a, b) = (
                        board.read32(reg.offset()).unwrap(),
                        model.read32(reg.offset()).unwrap(),
                    );
                    check(i, reg.def().name, a, b);
                }
                for k in 0..3 {
                    let o = Reg::Counter.offset() + 4 * k;
                    check(
                        i,
                        "COUNTER",
                        board.read32(o).unwrap(),
                        model.read32(o).unwrap(),
                    );
                }
                reads += 8;
            }
            85..=89 => {
                // An OOB request on the board's second UART vs the model's answer.
                use hilrig_device::oob::{encode_request, Request};
                let region = Region::from_index(r.below(3) as u32).unwrap_or(Region::Config);
                let req = [
                    Request::Identify,
                    Request::ReadCounters,
                    Request::ReadCounters,
                    Request::ReadHash(region),
                ][r.below(4) as usize]
                    .clone();
                let f = encode_request(r.below(256) as u8, &req);
                let (a, b) = (board.oob(&f).unwrap(), model.oob(&f).unwrap());
                assert_eq!(a, b, "seed {seed} op {i}: OOB {req:?}");
                reads += 1;
            }
            90..=94 => {
                let off = r.below(2048 - 8);
                let len = 1 + r.below(8) as usize;
                let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
                board.rom_read(off, &mut a).unwrap();
                model.rom_read(off, &mut b).unwrap();
                assert_eq!(a, b, "seed {seed} op {i}: ROM read at {off:#x}");
                reads += 1;
            }
            _ => {
                board.reset(ResetKind::Flr).unwrap();
                model.reset(ResetKind::Flr).unwrap();
            }
        }
    }
    let nv = model.nv();
    assert!(reads > ops / 3);
    for (k, c) in nv.counter_values().iter().enumerate() {
        let o = Reg::Counter.offset() + 4 * k as u32;
        assert_eq!(board.read32(o).unwrap(), *c, "final counter {k}");
    }
    assert_eq!(board.read32(Reg::Master.offset()).unwrap(), nv.master);
    eprintln!(
        "seed {seed}: {ops} ops, {reads} reads compared, MASTER {}, fuse {}",
        nv.master, nv.fuse
    );
}

#[test]
fn board_agrees_with_the_model_seed_1() {
    run(1, 120);
}

#[test]
fn board_agrees_with_the_model_seed_2() {
    run(2, 120);
}

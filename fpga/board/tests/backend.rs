//! The `Fpga` backend against the simulated board (over the in-memory pipe).

mod common;

use common::*;
use hilrig_device::device::Device;
use hilrig_device::regmap::*;
use std::time::Instant;

#[test]
fn registers_read_and_write() {
    let (pipe, _nv) = pipe_board(8, 0x1234_5678_9abc_def0);
    let mut f = fpga_on(&pipe);
    let t = Instant::now();
    assert_eq!(f.read32(Reg::Id.offset()).unwrap(), DEVICE_ID_VALUE);
    assert_eq!(
        f.read32(Reg::Version.offset()).unwrap(),
        DEVICE_VERSION_VALUE
    );
    assert_eq!(f.read32(Reg::Serial.offset()).unwrap(), 0x9abc_def0);
    assert_eq!(f.read32(Reg::Serial.offset() + 4).unwrap(), 0x1234_5678);
    let s = Reg::Scratch.offset();
    f.write32(s, 0xdead_beef).unwrap();
    f.mmio_write(s as u64 + 1, &[0x55]).unwrap();
    assert_eq!(f.read32(s).unwrap(), 0xdead_55ef);
    let n = 100;
    for i in 0..n {
        f.write32(s + 4 * (i % 8), i).unwrap();
        assert_eq!(f.read32(s + 4 * (i % 8)).unwrap(), i);
    }
    let (cycles, passes) = pipe.with_board(|b| (b.cycles(), b.passes())).unwrap();
    eprintln!(
        "{} ops in {:?}, {} cycles, {} passes",
        2 * n + 6,
        t.elapsed(),
        cycles,
        passes
    );
    assert_eq!(f.stats().retries, 0);
}

#[test]
fn buffers_hold_data_and_reset_clears_them() {
    let (pipe, _nv) = pipe_board(8, 1);
    let mut f = fpga_on(&pipe);
    let base = BUFFER_BASE;
    for i in 0..8u32 {
        f.write32(base + 4 * i, 0x1000_0000 + i).unwrap();
    }
    let mut b = [0u8; 8];
    f.mmio_read(base as u64 + 2, &mut b).unwrap();
    assert_eq!(b, [0x00, 0x10, 0x01, 0x00, 0x00, 0x10, 0x02, 0x00]);
    f.mmio_write(base as u64 + 13, &[0xaa, 0xbb]).unwrap();
    assert_eq!(f.read32(base + 12).unwrap(), 0x10bb_aa03);
    assert_eq!(f.read32(base + 16).unwrap(), 0x1000_0004);
    f.reset(hilrig_device::ResetKind::Flr).unwrap();
    assert_eq!(f.read32(base).unwrap(), 0, "a reset clears the buffers");
    f.write32(Reg::Scratch.offset(), 5).unwrap();
    f.write32(Reg::SoftReset.offset(), SOFT_RESET_MAGIC)
        .unwrap();
    assert_eq!(f.read32(Reg::Scratch.offset()).unwrap(), 0);
}

#[test]
fn unlock_program_and_counters() {
    use hilrig_device::model::ops;
    let (pipe, _nv) = pipe_board(8, 2);
    let mut f = fpga_on(&pipe);
    // Locked: refused, but counted.
    let r = ops::erase(&mut f, Region::Firmware).unwrap();
    assert_ne!(r.status & FLASH_STATUS_REFUSED_LOCKED, 0);
    assert_eq!(f.read32(Reg::Counter.offset() + 4).unwrap(), 1);
    ops::unlock(&mut f).unwrap();
    assert_ne!(
        f.read32(Reg::FlashStatus.offset()).unwrap() & FLASH_STATUS_UNLOCKED,
        0
    );
    let data: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37)).collect();
    let r = ops::program(&mut f, Region::Firmware, 64, 0, &data).unwrap();
    assert!(r.done(), "status {:#x}", r.status);
    assert_eq!(f.read32(Reg::Counter.offset() + 4).unwrap(), 2);
    assert_eq!(f.read32(Reg::Master.offset()).unwrap(), 2);
    assert_eq!(f.read32(Reg::SlotsLeft.offset()).unwrap(), 6);
    let back = ops::read_region(&mut f, Region::Firmware, 128).unwrap();
    assert_eq!(&back[64..96], &data[..]);
    assert!(back[..64].iter().all(|&b| b == 0xff));
    assert_eq!(pipe.with_board(|b| b.leds()), Some(2), "LEDs show MASTER");
    // Counters survive a reset.
    f.reset(hilrig_device::ResetKind::Reset).unwrap();
    assert_eq!(f.read32(Reg::Master.offset()).unwrap(), 2);
    assert_eq!(f.stats().retries, 0);
}

#[test]
fn fuse_blows_at_the_end_of_a_small_budget() {
    use hilrig_device::model::ops;
    let (pipe, _nv) = pipe_board(3, 3);
    let mut f = fpga_on(&pipe);
    ops::unlock(&mut f).unwrap();
    for i in 1..=3 {
        let r = ops::erase(&mut f, Region::Config).unwrap();
        assert!(r.done(), "erase {i}: {:#x}", r.status);
    }
    assert_eq!(f.read32(Reg::Fuse.offset()).unwrap(), 1);
    assert_eq!(f.read32(Reg::SlotsLeft.offset()).unwrap(), 0);
    let r = ops::erase(&mut f, Region::Vbios).unwrap();
    assert_ne!(r.status & FLASH_STATUS_REFUSED_FUSE, 0);
    assert_eq!(
        f.read32(Reg::Counter.offset()).unwrap(),
        1,
        "refused attempts count"
    );
    assert_eq!(f.read32(Reg::Master.offset()).unwrap(), 4);
    for _ in 0..2 {
        ops::erase(&mut f, Region::Config).unwrap();
    }
    assert_eq!(
        f.read32(Reg::Counter.offset() + 8).unwrap(),
        3,
        "stays at its maximum"
    );
    assert_ne!(
        f.read32(Reg::Status.offset()).unwrap() & STATUS_FUSE_BLOWN,
        0
    );
}

#[test]
fn oob_over_the_second_uart() {
    use hilrig_device::model::ops;
    use hilrig_device::oob::{
        decode_response, encode_request, frame, ErrorCode, Request, Response,
    };
    let (pipe, nv) = pipe_board(2, 4);
    let mut f = fpga_on(&pipe);
    ops::unlock(&mut f).unwrap();
    ops::erase(&mut f, Region::Config).unwrap();
    ops::erase(&mut f, Region::Config).unwrap();
    let resp = f.oob(&encode_request(7, &Request::ReadCounters)).unwrap();
    let (seq, r) = decode_response(&resp).unwrap();
    assert_eq!(seq, 7);
    match r {
        Response::Counters(c) => {
            assert_eq!(c.counters, [0, 0, 2]);
            assert_eq!((c.master, c.fuse, c.slots_left, c.width), (2, true, 0, 2));
        }
        other => panic!("{other:?}"),
    }
    let resp = f
        .oob(&encode_request(8, &Request::ReadHash(Region::Config)))
        .unwrap();
    match decode_response(&resp).unwrap().1 {
        Response::Hash { region, sha256 } => {
            assert_eq!(region, Region::Config);
            assert_eq!(
                sha256,
                nv.region_hash(Region::Config),
                "erased CONFIG is all 0xff"
            );
        }
        other => panic!("{other:?}"),
    }
    let bad = frame(9, 0x42, &[]);
    assert!(matches!(
        decode_response(&f.oob(&bad).unwrap()).unwrap().1,
        Response::Error {
            code: ErrorCode::UnknownCommand,
            ..
        }
    ));
    let resp = f
        .oob(&encode_request(10, &Request::PhysicalReset(nv.reset_key)))
        .unwrap();
    assert_eq!(
        decode_response(&resp).unwrap().1,
        Response::ResetDone { epoch: 1 }
    );
    assert_eq!(f.read32(Reg::Fuse.offset()).unwrap(), 0);
    assert_eq!(f.read32(Reg::Epoch.offset()).unwrap(), 1);
    assert_eq!(f.read32(Reg::Master.offset()).unwrap(), 2, "MASTER is kept");
    assert!(ops::erase(&mut f, Region::Config).unwrap().done());
}

#[test]
fn rom_window_reads() {
    use hilrig_device::model::ops;
    let (pipe, _nv) = pipe_board(8, 5);
    let mut f = fpga_on(&pipe);
    assert_eq!(f.rom_size(), 2048);
    ops::unlock(&mut f).unwrap();
    let data: Vec<u8> = (0..24u8).map(|i| 0x55 ^ i.wrapping_mul(11)).collect();
    assert!(ops::program(&mut f, Region::Vbios, 8, 0, &data)
        .unwrap()
        .done());
    let mut got = [0u8; 21];
    f.rom_read(9, &mut got).unwrap();
    assert_eq!(&got[..], &data[1..22]);
    let mut tail = [0u8; 4];
    f.rom_read(2044, &mut tail).unwrap();
    assert_eq!(tail, [0xff; 4]);
    assert!(matches!(
        f.rom_read(2046, &mut tail),
        Err(hilrig_device::DeviceError::RomRange { .. })
    ));
}

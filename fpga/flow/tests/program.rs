//! MPSSE and SPI-flash byte sequences (golden bytes from FTDI AN_108 and the SPI NOR
//! command set), whole program + verify runs against the simulated FT2232H + flash,
//! fault detection, and the errors against real USB (no board attached here).

use hilrig_flow::board::{alchitry_cu, icebreaker};
use hilrig_flow::mpsse::{Flash, Mpsse, MpsseError, Pins};
use hilrig_flow::program::{program, program_with, ProgError, ProgramOptions};
use hilrig_flow::sim::SimFt2232h;
use std::time::Duration;

const PINS: Pins = Pins {
    cs: 4,
    creset: 7,
    cdone: 6,
};

/// CS high, CRESET_B low: `80 10 93` (SCK, MOSI, CS, CRESET outputs = 0x93).
const DESELECT: [u8; 3] = [0x80, 0x10, 0x93];
/// CS low, CRESET_B low.
const SELECT: [u8; 3] = [0x80, 0x00, 0x93];

fn ready() -> Mpsse<SimFt2232h> {
    let mut m = Mpsse::new(SimFt2232h::w25q128(), 0, PINS);
    m.init(6_000_000).unwrap();
    m.transport().written.clear();
    m
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn init_sends_ftdi_requests_and_mpsse_setup_bytes() {
    let mut m = Mpsse::new(SimFt2232h::w25q128(), 0, PINS);
    m.init(6_000_000).unwrap();
    let s = m.transport();
    // SIO_RESET reset/purge RX/purge TX, latency 1 ms, bitmode reset, bitmode MPSSE
    // with all pins in the mask (as iceprog: ftdi_set_bitmode(0xff, BITMODE_MPSSE));
    // wIndex 1 = interface A.
    assert_eq!(
        s.controls,
        vec![
            (0x00, 0, 1),
            (0x00, 1, 1),
            (0x00, 2, 1),
            (0x09, 1, 1),
            (0x0B, 0x0000, 1),
            (0x0B, 0x02FF, 1)
        ]
    );
    assert_eq!(
        s.written,
        cat(&[
            &[0xAA, 0x87],       // bogus opcode + send immediate: answered FA AA
            &[0x8A, 0x97, 0x8D], // 60 MHz (no /5), no adaptive, no 3-phase clocking
            &[0x86, 0x04, 0x00], // divisor 4: 60 MHz / ((1 + 4) * 2) = 6 MHz
            &[0x85],             // loopback off
            &DESELECT,
        ])
    );
    assert_eq!(s.divisor, Some(4));
}

#[test]
fn flash_commands_have_the_datasheet_bytes() {
    let mut m = ready();
    let mut f = Flash {
        m: &mut m,
        busy_timeout: Duration::from_secs(1),
    };
    // 0xAB release power-down: clock one byte out (0x11, length-1 = 0).
    f.release_power_down().unwrap();
    assert_eq!(
        f.m.transport().written,
        cat(&[&SELECT, &[0x11, 0x00, 0x00, 0xAB], &DESELECT])
    );
    f.m.transport().written.clear();

    // 0x9F JEDEC ID: 4 bytes in/out (0x31, length-1 = 3) and send immediate.
    assert_eq!(f.jedec_id().unwrap(), [0xEF, 0x40, 0x18]);
    assert_eq!(
        f.m.transport().written,
        cat(&[&SELECT, &[0x31, 0x03, 0x00, 0x9F, 0, 0, 0, 0x87], &DESELECT])
    );
    f.m.transport().written.clear();

    // 0x06 write enable, then 0x05 status shows WEL (bit 1).
    f.write_enable().unwrap();
    assert_eq!(f.status().unwrap(), 0x02);
    assert_eq!(
        f.m.transport().written,
        cat(&[
            &SELECT,
            &[0x11, 0x00, 0x00, 0x06],
            &DESELECT,
            &SELECT,
            &[0x31, 0x01, 0x00, 0x05, 0x00, 0x87],
            &DESELECT
        ])
    );
    f.m.transport().written.clear();

    // 0xD8 64 KiB erase at 0x010000, then status polls until not busy (the peer
    // stays busy for 3 polls: 01 01 01 00).
    f.m.transport().busy_polls = 3;
    f.erase(0xD8, 0x01_0000).unwrap();
    let status = cat(&[&SELECT, &[0x31, 0x01, 0x00, 0x05, 0x00, 0x87], &DESELECT]);
    assert_eq!(
        f.m.transport().written,
        cat(&[
            &SELECT,
            &[0x11, 0x00, 0x00, 0x06],
            &DESELECT,
            &SELECT,
            &[0x11, 0x03, 0x00, 0xD8, 0x01, 0x00, 0x00],
            &DESELECT,
            &status,
            &status,
            &status,
            &status,
        ])
    );
    f.m.transport().written.clear();

    // 0x20 4 KiB sector erase.
    f.erase(0x20, 0x00_3000).unwrap();
    assert!(f
        .m
        .transport()
        .written
        .windows(7)
        .any(|w| w == [0x11, 0x03, 0x00, 0x20, 0x00, 0x30, 0x00]));
    f.m.transport().written.clear();

    // 0x02 page program of 4 bytes at 0x000100: 8 bytes out (length-1 = 7).
    f.page_program(0x100, &[1, 2, 3, 4]).unwrap();
    let w = f.m.transport().written.clone();
    assert_eq!(
        w[..13],
        cat(&[&SELECT, &[0x11, 0x00, 0x00, 0x06], &DESELECT, &SELECT])[..]
    );
    assert_eq!(
        w[13..24],
        [0x11, 0x07, 0x00, 0x02, 0x00, 0x01, 0x00, 1, 2, 3, 4]
    );
    f.m.transport().written.clear();

    // 0x03 read: 4 bytes out, then 0x20 (bytes in, length-1 = 5) + send immediate.
    assert_eq!(f.read(0xFE, 6).unwrap(), [0xFF, 0xFF, 1, 2, 3, 4]);
    assert_eq!(
        f.m.transport().written,
        cat(&[
            &SELECT,
            &[0x11, 0x03, 0x00, 0x03, 0x00, 0x00, 0xFE],
            &[0x20, 0x05, 0x00, 0x87],
            &DESELECT
        ])
    );
    f.m.transport().written.clear();

    // 0xB9 deep power-down; afterwards the flash answers nothing.
    f.power_down().unwrap();
    assert_eq!(
        f.m.transport().written,
        cat(&[&SELECT, &[0x11, 0x00, 0x00, 0xB9], &DESELECT])
    );
    assert_eq!(f.jedec_id().unwrap(), [0xFF; 3]);

    // CDONE: 0x81 read low byte + send immediate.
    f.m.transport().written.clear();
    assert!(!f.m.cdone().unwrap());
    assert_eq!(f.m.transport().written, [0x81, 0x87]);
}

/// A large transfer is split into 4 KiB MPSSE commands and the 512-byte packets'
/// status bytes are stripped.
#[test]
fn long_reads_span_packets_and_chunks() {
    let mut m = ready();
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
    m.transport().flash[..data.len()].copy_from_slice(&data);
    let mut f = Flash {
        m: &mut m,
        busy_timeout: Duration::from_secs(1),
    };
    f.release_power_down().unwrap();
    assert_eq!(f.read(0, data.len()).unwrap(), data);
    let w = &f.m.transport().written;
    // 4096 + 4096 + 1808 bytes: lengths-1 0x0FFF, 0x0FFF, 0x070F.
    assert!(w.windows(4).any(|x| x == [0x20, 0xFF, 0x0F, 0x87]));
    assert!(w.windows(4).any(|x| x == [0x20, 0x0F, 0x07, 0x87]));
}

fn bitstream(len: usize) -> Vec<u8> {
    // icepack output starts ff 00 00 ff, then the sync word 7e aa 99 7e.
    let mut v = vec![0xFF, 0x00, 0x00, 0xFF, 0x7E, 0xAA, 0x99, 0x7E];
    let mut x = 0x1234_5678u32;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.push(x as u8);
    }
    v
}

#[test]
fn program_and_verify_a_bitstream() {
    // The size of an iCE40HX8K bitstream.
    let bits = bitstream(135_100);
    let mut sim = SimFt2232h::w25q128();
    sim.flash[..300_000].fill(0x00); // old contents, must be erased
    let board = alchitry_cu();
    let r = program_with(&mut sim, &board, &bits, &ProgramOptions::default()).unwrap();
    assert_eq!(r.jedec_id, [0xEF, 0x40, 0x18]);
    assert_eq!(r.flash_bytes, 16 << 20);
    assert_eq!(r.erased, 3, "three 64 KiB blocks");
    assert_eq!(r.pages, 528, "ceil(135100 / 256)");
    assert_eq!(r.verified, bits.len());
    assert!(r.cdone, "the FPGA configured from the new bitstream");
    assert_eq!(&sim.flash[..bits.len()], &bits[..]);
    assert!(sim.flash[bits.len()..3 * 65536].iter().all(|&b| b == 0xFF));
    assert!(
        sim.flash[3 * 65536..300_000].iter().all(|&b| b == 0x00),
        "erase stops at the last block"
    );
    assert!(
        !sim.contention,
        "no SPI traffic while the FPGA was released"
    );
    assert!(sim.creset_released());

    // Verify-only: no erase or program command is sent.
    sim.written.clear();
    let opts = ProgramOptions {
        verify_only: true,
        ..Default::default()
    };
    let r = program_with(&mut sim, &board, &bits, &opts).unwrap();
    assert_eq!((r.erased, r.pages), (0, 0));
    assert!(
        !sim.written
            .windows(4)
            .any(|w| w == [0x11, 0x00, 0x00, 0x06]),
        "no write enable"
    );

    // Sector erase mode on the iCEBreaker: 33 sectors for 135,100 bytes.
    let mut sim = SimFt2232h::w25q128();
    let opts = ProgramOptions {
        sector_erase: true,
        expect_jedec: Some([0xEF, 0x40, 0x18]),
        ..Default::default()
    };
    let r = program_with(&mut sim, &icebreaker(), &bits, &opts).unwrap();
    assert_eq!(r.erased, 33);
}

#[test]
fn verify_failure_names_the_address() {
    let bits = bitstream(5000);
    let mut sim = SimFt2232h::w25q128();
    sim.faults.corrupt_read_at = Some(4097);
    let e = program_with(&mut sim, &alchitry_cu(), &bits, &ProgramOptions::default()).unwrap_err();
    match &e {
        ProgError::Verify {
            addr, mismatches, ..
        } => assert_eq!((*addr, *mismatches), (4097, 1)),
        other => panic!("{other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("verify failed") && msg.contains("0x001001"),
        "{msg}"
    );
    assert!(
        !sim.creset_released(),
        "the FPGA stays in reset after a failed verify"
    );
}

#[test]
fn a_flash_that_stays_busy_times_out() {
    let mut sim = SimFt2232h::w25q128();
    sim.faults.stuck_busy = true;
    let opts = ProgramOptions {
        busy_timeout: Duration::from_millis(50),
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let e = program_with(&mut sim, &alchitry_cu(), &bitstream(1000), &opts).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5));
    match &e {
        ProgError::Mpsse {
            step: "erase",
            source: MpsseError::FlashBusy { status, .. },
            ..
        } => assert_eq!(status & 1, 1),
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("still busy"), "{e}");
}

#[test]
fn wrong_interface_wrong_flash_and_too_small_are_clear_errors() {
    let bits = bitstream(1000);
    let board = alchitry_cu();
    let opts = ProgramOptions::default();

    let mut sim = SimFt2232h::w25q128();
    sim.faults.not_mpsse = true;
    let e = program_with(&mut sim, &board, &bits, &opts).unwrap_err();
    assert!(e.to_string().contains("does not speak MPSSE"), "{e}");

    let mut sim = SimFt2232h::w25q128();
    sim.faults.no_flash = true;
    let e = program_with(&mut sim, &board, &bits, &opts).unwrap_err();
    assert!(matches!(e, ProgError::NoFlash { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("no SPI flash answered on FTDI interface A"),
        "{e}"
    );

    let mut sim = SimFt2232h::w25q128();
    let e = program_with(
        &mut sim,
        &board,
        &bits,
        &ProgramOptions {
            expect_jedec: Some([0x20, 0xBA, 0x16]),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("is not the expected [20, ba, 16]"),
        "{e}"
    );

    // A 64 KiB flash (capacity byte 0x10) cannot take a 135,100-byte bitstream.
    let mut sim = SimFt2232h::new(64 << 10, [0xEF, 0x40, 0x10], PINS);
    let e = program_with(&mut sim, &board, &bitstream(135_100), &opts).unwrap_err();
    assert!(
        e.to_string().contains("does not fit the 65536-byte flash"),
        "{e}"
    );

    let mut sim = SimFt2232h::w25q128();
    let e = program_with(&mut sim, &board, &[], &opts).unwrap_err();
    assert!(matches!(e, ProgError::EmptyBitstream));
}

/// No FTDI board is attached to this machine (nor CI's): the error names the
/// VID:PID and lists what is attached.
#[test]
fn program_without_a_board_says_no_device() {
    let e = program(&alchitry_cu(), &bitstream(100), &ProgramOptions::default()).unwrap_err();
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("board alchitry-cu: no USB device 0403:6010 found; attached: "),
        "{msg}"
    );
    let e = program(
        &icebreaker(),
        &bitstream(100),
        &ProgramOptions {
            serial: Some("FT1234".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("no USB device 0403:6010 with serial \"FT1234\" found"),
        "{msg}"
    );
}

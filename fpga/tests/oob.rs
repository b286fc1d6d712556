//! The RTL OOB engine answers every request byte for byte as
//! `hilrig_device::oob::serve` does on the same nonvolatile state, and changes that
//! state the same way (PHYSICAL_RESET), through the byte interface and end to end
//! through the UART.

use hilrig_device::device::Device;
use hilrig_device::oob::{self, cmd, encode_request, frame, serve, Request};
use hilrig_device::regmap::Region;
use hilrig_device::state::{DeviceConfig, NvState};
use hilrig_fpga::difftest::Rng;
use hilrig_fpga::Rtl;

fn small(width: u8, serial: u64) -> NvState {
    let cfg = DeviceConfig {
        counter_width: width,
        region_sizes: [2048, 1024, 256],
    };
    NvState::factory(cfg, serial).unwrap()
}

/// Every request type and every malformed-frame class, for the state `nv`.
fn requests(nv: &NvState, r: &mut Rng) -> Vec<Vec<u8>> {
    let key = nv.reset_key;
    let mut bad_key = key;
    bad_key[31] ^= 0x80;
    let mut bad_key0 = key;
    bad_key0[0] ^= 1;
    let good = encode_request(7, &Request::ReadCounters);
    let reset = encode_request(9, &Request::PhysicalReset(key));
    let mut v = vec![
        encode_request(1, &Request::Identify),
        encode_request(2, &Request::ReadCounters),
        encode_request(3, &Request::ReadHash(Region::Vbios)),
        encode_request(4, &Request::ReadHash(Region::Config)),
        encode_request(4, &Request::ReadHash(Region::Firmware)),
        encode_request(5, &Request::PhysicalReset(bad_key)),
        encode_request(6, &Request::PhysicalReset(bad_key0)),
        // Bad region, bad lengths, unknown commands.
        frame(8, cmd::READ_HASH, &[3]),
        frame(8, cmd::READ_HASH, &[0xff]),
        frame(8, cmd::READ_HASH, &[]),
        frame(8, cmd::READ_HASH, &[0, 0]),
        frame(8, cmd::IDENTIFY, &[1]),
        frame(8, cmd::READ_COUNTERS, &[0; 5]),
        frame(8, cmd::PHYSICAL_RESET, &key[..31]),
        frame(8, cmd::PHYSICAL_RESET, &[0; 33]),
        frame(8, 0x00, &[]),
        frame(8, 0x42, &[1, 2, 3]),
        frame(8, cmd::ERROR, &[]),
        frame(8, 0x81, &[]),
        frame(0xff, 0x05, &[0; 64]),
        // Framing: empty, bad sync, truncated at every length, oversized.
        vec![],
        vec![0x00],
        vec![0x5a, 0x00, 0x01, 0x01, 0x00, 0x00],
        {
            let mut f = good.clone();
            f.push(0);
            f
        },
        {
            let mut f = reset.clone();
            f.extend_from_slice(&[1, 2, 3]);
            f
        },
        {
            let mut f = good.clone();
            f[1] = 65;
            f
        },
        {
            let mut f = good.clone();
            f[1] = 200;
            f
        },
        vec![oob::SYNC, 0xff],
        vec![oob::SYNC, 0xff, 0x10],
        vec![oob::SYNC, 0xff, 0x10, 0x20],
        vec![0xa5; 300],
    ];
    for n in 1..good.len() {
        v.push(good[..n].to_vec());
    }
    for n in [1, 2, 3, 4, 5, 20, 36, 37] {
        v.push(reset[..n].to_vec());
    }
    // Bad CRC: every byte of a frame flipped in turn.
    for i in 1..good.len() {
        let mut f = good.clone();
        f[i] ^= 0x40;
        v.push(f);
    }
    for i in [1, 2, 3, 4, 20, 35, 36, 37] {
        let mut f = reset.clone();
        f[i] ^= 1;
        v.push(f);
    }
    // Random bytes, and random corruptions of good frames.
    for _ in 0..20 {
        let n = r.below(12) as usize;
        let mut f: Vec<u8> = (0..n).map(|_| r.next_u64() as u8).collect();
        if r.chance(500) && !f.is_empty() {
            f[0] = oob::SYNC;
        }
        v.push(f);
        let mut g = encode_request(r.next_u64() as u8, &Request::Identify);
        let i = r.below(g.len() as u64) as usize;
        g[i] = r.next_u64() as u8;
        v.push(g);
    }
    // The good reset last (it changes the state).
    v.push(reset);
    v
}

/// Run `frames` through the RTL and through `serve` on a copy of the state.
fn check_all(rtl: &mut Rtl, model: &mut NvState, frames: &[Vec<u8>]) {
    for f in frames {
        let want = serve(model, f, &mut |_| true);
        let got = rtl.oob(f).unwrap();
        assert_eq!(
            oob::hex_string(&got),
            oob::hex_string(&want),
            "request {}",
            oob::hex_string(f)
        );
        assert_eq!(rtl.nv(), *model, "state after {}", oob::hex_string(f));
    }
}

#[test]
fn rtl_oob_engine_matches_serve_byte_for_byte() {
    let mut r = Rng::new(11);
    for (width, serial) in [(4u8, 9u64), (8, 0x0123_4567_89ab_cdef), (64, u64::MAX)] {
        let mut nv = small(width, serial);
        // Counters, MASTER, fuse in several states.
        let mut rtl = Rtl::new(nv.clone()).unwrap();
        let frames = requests(&nv, &mut r);
        check_all(&mut rtl, &mut nv, &frames);
        for k in 0..width.min(6) as usize {
            nv.count_attempt(Region::ALL[k % 3]);
        }
        nv.count_attempt(Region::Firmware);
        nv.master = nv.master.wrapping_add(0x1234_5678);
        for f in nv.flash.iter_mut() {
            for b in f.iter_mut() {
                *b = r.next_u64() as u8;
            }
        }
        nv.epoch = 0xdead_beef;
        let mut rtl = Rtl::new(nv.clone()).unwrap();
        let frames = requests(&nv, &mut r);
        check_all(&mut rtl, &mut nv, &frames);
    }
}

#[test]
fn physical_reset_in_rtl_clears_the_fuse_and_is_saved() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.state");
    let mut nv = small(3, 5);
    for _ in 0..3 {
        nv.count_attempt(Region::Config);
    }
    nv.count_attempt(Region::Vbios);
    assert!(nv.fuse);
    let mut rtl = Rtl::create(&path, nv.clone()).unwrap();
    let saves = rtl.saves();
    let key = nv.reset_key;
    let f = encode_request(3, &Request::PhysicalReset(key));
    let want = serve(&mut nv, &f, &mut |_| true);
    assert_eq!(rtl.oob(&f).unwrap(), want);
    assert_eq!(rtl.saves(), saves + 1);
    assert_eq!(NvState::load(&path).unwrap(), nv, "saved");
    assert_eq!((nv.fuse, nv.epoch, nv.master), (false, 1, 4));
    // A reset whose save fails changes nothing and says Internal.
    drop(dir);
    let want = serve(&mut nv, &f, &mut |_| false);
    assert_eq!(rtl.oob(&f).unwrap(), want);
    assert_eq!(rtl.nv(), nv);
    assert_eq!(
        oob::decode_response(&want).unwrap().1,
        oob::Response::Error {
            code: oob::ErrorCode::Internal,
            request: cmd::PHYSICAL_RESET
        }
    );
    // The device keeps answering.
    let f = encode_request(4, &Request::ReadCounters);
    assert_eq!(rtl.oob(&f).unwrap(), serve(&mut nv, &f, &mut |_| true));
}

#[test]
fn oob_through_the_uart_end_to_end_at_two_divisors() {
    for divisor in [2u16, 7] {
        let mut nv = small(4, 77);
        nv.count_attempt(Region::Firmware);
        let mut rtl = Rtl::with_oob_divisor(nv.clone(), divisor).unwrap();
        let key = nv.reset_key;
        let mut badcrc = encode_request(1, &Request::Identify);
        badcrc[4] ^= 1;
        let frames = [
            encode_request(1, &Request::Identify),
            encode_request(2, &Request::ReadCounters),
            encode_request(2, &Request::ReadHash(Region::Config)),
            badcrc,
            encode_request(3, &Request::ReadCounters)[..4].to_vec(),
            frame(4, 0x42, &[]),
            encode_request(5, &Request::PhysicalReset([0; 32])),
            encode_request(6, &Request::PhysicalReset(key)),
            encode_request(7, &Request::ReadCounters),
        ];
        for f in &frames {
            let want = serve(&mut nv, f, &mut |_| true);
            let got = rtl.oob_uart(f).unwrap();
            assert_eq!(
                oob::hex_string(&got),
                oob::hex_string(&want),
                "divisor {divisor}, request {}",
                oob::hex_string(f)
            );
            assert_eq!(rtl.nv(), nv);
        }
        // The bus still works after OOB traffic.
        assert_eq!(
            rtl.read_word(hilrig_device::regmap::Reg::Epoch.offset(), 0xf)
                .unwrap(),
            1
        );
    }
}

#[test]
fn oob_cycle_counts() {
    let nv = small(8, 1);
    let mut rtl = Rtl::new(nv.clone()).unwrap();
    for req in [
        Request::Identify,
        Request::ReadCounters,
        Request::ReadHash(Region::Vbios),
        Request::ReadHash(Region::Firmware),
        Request::ReadHash(Region::Config),
        Request::PhysicalReset([0; 32]),
        Request::PhysicalReset(nv.reset_key),
    ] {
        let f = encode_request(1, &req);
        let c0 = rtl.cycles();
        rtl.oob_rtl(&f).unwrap();
        let n = rtl.cycles() - c0;
        eprintln!("{req:?}: {} request bytes, {n} cycles", f.len());
        // Two cycles a request byte, one for the end, one a response byte, a few of
        // latency (and the save of a reset, or the hash of a region).
        let hash = match req {
            Request::ReadHash(r) => hilrig_fpga::sha::hash_cycles(nv.config.region_size(r)),
            _ => 0,
        };
        assert!(
            n <= 2 * f.len() as u64 + 1 + 40 + 8 + hash,
            "{req:?}: {n} cycles"
        );
    }
}

/// A host reset (PCIe reset, FLR) during READ_HASH takes the flash read port back
/// from the SHA-256 unit for a few cycles; the unit stalls and the digest is still
/// the region's (the OOB port does not belong to the host). Resets land at many
/// points of the hash, including back to back.
#[test]
fn host_resets_during_read_hash_do_not_change_the_digest() {
    let mut nv = small(8, 5);
    let mut r = Rng::new(77);
    for b in nv.flash[0].iter_mut() {
        *b = r.next_u64() as u8;
    }
    let req = encode_request(3, &Request::ReadHash(Region::Vbios));
    let mut reference = nv.clone();
    let want = serve(&mut reference, &req, &mut |_| true);
    let mut rtl = Rtl::new(nv).unwrap();
    for resets in [
        vec![],
        vec![40],
        vec![40, 41, 42],
        vec![100, 700, 701, 1500, 2100],
        (30..2300).step_by(97).collect::<Vec<u64>>(),
    ] {
        let got = rtl.oob_rtl_with_host_resets(&req, &resets).unwrap();
        assert_eq!(
            oob::hex_string(&got),
            oob::hex_string(&want),
            "host resets at {resets:?}"
        );
    }
}

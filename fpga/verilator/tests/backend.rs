//! The Verilator backend against the `rtl` backend and the model on directed
//! accesses; the cache (rebuilt when broken, atomic under concurrent builds); a
//! missing verilator is a typed error. Every test says SKIPPED without verilator.

use hilrig_device::device::{Device, ResetKind};
use hilrig_device::oob::{self, Request, Response};
use hilrig_device::regmap::*;
use hilrig_device::state::{DeviceConfig, NvState};
use hilrig_fpga::core::{CoreParams, OOB_DIVISOR};
use hilrig_verilator::build::BuildOptions;
use hilrig_verilator::core::CoreLib;
use hilrig_verilator::{available, Error, Verilator};
use std::path::PathBuf;

fn small_nv(width: u8, serial: u64) -> NvState {
    let cfg = DeviceConfig {
        counter_width: width,
        region_sizes: [2048, 1024, 256],
    };
    NvState::factory(cfg, serial).unwrap()
}

#[test]
fn registers_flash_and_oob_match_the_model() {
    if !available("registers_flash_and_oob_match_the_model") {
        return;
    }
    let nv = small_nv(4, 1);
    let mut v = Verilator::new(nv.clone()).unwrap();
    let mut m = hilrig_device::Model::new(nv).unwrap();
    for d in [&mut v as &mut dyn Device, &mut m] {
        assert_eq!(d.read32(Reg::Id.offset()).unwrap(), DEVICE_ID_VALUE);
        d.write32(Reg::Scratch.offset(), 0xdead_beef).unwrap();
        assert_eq!(d.read32(Reg::Scratch.offset()).unwrap(), 0xdead_beef);
        d.mmio_write(Reg::Scratch.offset() as u64 + 1, &[0x11])
            .unwrap();
        d.mmio_write(BUFFER_BASE as u64, &[1, 2, 3, 4, 5, 6, 7, 8])
            .unwrap();
        hilrig_device::model::ops::unlock(d).unwrap();
        d.write32(Reg::FlashRegion.offset(), 1).unwrap();
        d.write32(Reg::FlashAddr.offset(), 8).unwrap();
        d.write32(Reg::FlashSrc.offset(), 0).unwrap();
        d.write32(Reg::FlashLen.offset(), 8).unwrap();
        d.write32(Reg::FlashCmd.offset(), FLASH_CMD_PROGRAM)
            .unwrap();
    }
    let regs = [
        Reg::Scratch.offset(),
        Reg::FlashStatus.offset(),
        Reg::Counter.offset() + 4,
        Reg::Master.offset(),
        Reg::Serial.offset(),
        BUFFER_BASE + 4,
    ];
    for r in regs {
        assert_eq!(v.read32(r).unwrap(), m.read32(r).unwrap(), "{r:#x}");
    }
    assert_eq!(v.nv().flash, m.nv().flash);
    assert_eq!(v.nv().counters, m.nv().counters);
    for req in [
        Request::Identify,
        Request::ReadCounters,
        Request::ReadHash(Region::Firmware),
    ] {
        let f = oob::encode_request(3, &req);
        assert_eq!(v.oob(&f).unwrap(), m.oob(&f).unwrap(), "{req:?}");
    }
    let mut rom = [0u8; 13];
    let mut rom_m = [0u8; 13];
    v.rom_read(5, &mut rom).unwrap();
    m.rom_read(5, &mut rom_m).unwrap();
    assert_eq!(rom, rom_m);
    for d in [&mut v as &mut dyn Device, &mut m] {
        d.reset(ResetKind::Flr).unwrap();
        assert_eq!(d.read32(Reg::Scratch.offset()).unwrap(), 0);
    }
}

#[test]
fn state_file_round_trip_with_the_model_and_rtl() {
    if !available("state_file_round_trip_with_the_model_and_rtl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dev.state");
    let mut v = Verilator::create(&p, small_nv(4, 1)).unwrap();
    assert!(
        Verilator::create(&p, small_nv(4, 1)).is_err(),
        "replaced a file"
    );
    // Count attempts until the fuse blows: each is saved before the command acts.
    for _ in 0..4 {
        v.write32(Reg::FlashRegion.offset(), 2).unwrap();
        v.write32(Reg::FlashCmd.offset(), FLASH_CMD_ERASE).unwrap();
    }
    assert!(v.saves() >= 4);
    let saved = NvState::load(&p).unwrap();
    assert_eq!(saved.counter_values(), [0, 0, 4]);
    assert!(saved.fuse);
    drop(v);
    // The model and rtl read the same file the same way.
    let mut m = hilrig_device::Model::open(&p).unwrap();
    let mut r = hilrig_fpga::Rtl::open(&p).unwrap();
    let mut v = Verilator::open(&p).unwrap();
    for off in [
        Reg::Counter.offset() + 8,
        Reg::Fuse.offset(),
        Reg::Master.offset(),
    ] {
        let want = m.read32(off).unwrap();
        assert_eq!(r.read32(off).unwrap(), want);
        assert_eq!(v.read32(off).unwrap(), want);
    }
    // PHYSICAL_RESET through OOB clears the fuse and is saved.
    let key = saved.reset_key;
    match oob::request_device(&mut v, &Request::PhysicalReset(key)).unwrap() {
        Response::ResetDone { .. } => {}
        other => panic!("PHYSICAL_RESET answered {other:?}"),
    }
    let after = NvState::load(&p).unwrap();
    assert!(!after.fuse);
    assert_eq!(after.epoch, saved.epoch + 1);
    // A bad file is refused and left untouched.
    std::fs::write(&p, b"garbage").unwrap();
    let e = Verilator::open(&p).unwrap_err();
    assert!(matches!(e, Error::Device(_)), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), b"garbage");
}

#[test]
fn a_failed_save_stops_the_command_as_in_rtl() {
    if !available("a_failed_save_stops_the_command_as_in_rtl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (sv, sr) = (dir.path().join("v"), dir.path().join("r"));
    std::fs::create_dir(&sv).unwrap();
    std::fs::create_dir(&sr).unwrap();
    let mut v = Verilator::create(&sv.join("dev.state"), small_nv(4, 1)).unwrap();
    let mut r = hilrig_fpga::Rtl::create(&sr.join("dev.state"), small_nv(4, 1)).unwrap();
    // The state files' directories become files: every save fails.
    for d in [&sv, &sr] {
        std::fs::remove_dir_all(d).unwrap();
        std::fs::write(d, b"not a directory").unwrap();
    }
    let mut outcomes = Vec::new();
    for d in [&mut v as &mut dyn Device, &mut r] {
        d.write32(Reg::FlashRegion.offset(), 0).unwrap();
        let e = d.write32(Reg::FlashCmd.offset(), FLASH_CMD_ERASE);
        let status = d.read32(Reg::FlashStatus.offset()).unwrap();
        outcomes.push((e.is_err(), d.read32(Reg::Counter.offset()).unwrap(), status));
    }
    assert_eq!(outcomes[0], outcomes[1], "verilator vs rtl");
    assert!(outcomes[0].0, "a failed save must fail the command");
}

#[test]
fn oob_uart_and_host_resets_during_read_hash() {
    if !available("oob_uart_and_host_resets_during_read_hash") {
        return;
    }
    let nv = small_nv(4, 1);
    let mut m = hilrig_device::Model::new(nv.clone()).unwrap();
    let opts = BuildOptions::default();
    let mut v = Verilator::with_options(nv, 4, &opts).unwrap();
    let f = oob::encode_request(1, &Request::ReadCounters);
    assert_eq!(v.oob_uart(&f).unwrap(), m.oob(&f).unwrap());
    let f = oob::encode_request(2, &Request::ReadHash(Region::Vbios));
    let want = m.oob(&f).unwrap();
    assert_eq!(v.oob_with_host_resets(&f, &[5, 40, 41, 300]).unwrap(), want);
    // A malformed frame gets the model's error frame.
    let mut bad = oob::encode_request(3, &Request::Identify);
    bad[2] ^= 0x40;
    assert_eq!(v.oob(&bad).unwrap(), m.oob(&bad).unwrap());
}

#[test]
fn missing_verilator_is_a_typed_error() {
    let opts = BuildOptions {
        verilator: PathBuf::from("/nonexistent/verilator-for-this-test"),
        cache_dir: tempfile::tempdir().unwrap().path().to_path_buf(),
        jobs: 1,
        trace: false,
    };
    let e = Verilator::with_options(small_nv(4, 1), OOB_DIVISOR, &opts).unwrap_err();
    assert!(matches!(e, Error::VerilatorMissing { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("verilator") && msg.contains("/nonexistent"),
        "{msg}"
    );
}

#[test]
fn a_broken_cache_entry_is_rebuilt() {
    if !available("a_broken_cache_entry_is_rebuilt") {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let opts = BuildOptions {
        cache_dir: cache.path().to_path_buf(),
        ..BuildOptions::default()
    };
    let p = CoreParams::small(4, 1);
    let src = hilrig_verilator::core::sources(p);
    let first = hilrig_verilator::build::build(&src, &opts).unwrap();
    assert!(first.fresh);
    let again = hilrig_verilator::build::build(&src, &opts).unwrap();
    assert!(!again.fresh, "a whole cache entry is reused");
    // Truncate the library: the manifest no longer matches, so it is rebuilt.
    let bytes = std::fs::read(&first.path).unwrap();
    std::fs::write(&first.path, &bytes[..bytes.len() / 2]).unwrap();
    let rebuilt = hilrig_verilator::build::build(&src, &opts).unwrap();
    assert!(rebuilt.fresh, "a broken entry must be rebuilt");
    let lib = CoreLib::load(&rebuilt.path, true).unwrap();
    assert!(lib.path().starts_with(cache.path()));
    // Nothing half-built is left under a final name.
    for e in std::fs::read_dir(cache.path()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            name == first.key || name.starts_with('.'),
            "unexpected cache entry {name}"
        );
    }
}

#[test]
fn concurrent_builds_of_one_key_agree() {
    if !available("concurrent_builds_of_one_key_agree") {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let opts = BuildOptions {
        cache_dir: cache.path().to_path_buf(),
        jobs: 1,
        ..BuildOptions::default()
    };
    let p = CoreParams::small(4, 1);
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let opts = opts.clone();
            std::thread::spawn(move || {
                let src = hilrig_verilator::core::sources(p);
                hilrig_verilator::build::build(&src, &opts)
            })
        })
        .collect();
    let built: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert_eq!(built[0].path, built[1].path);
    assert_eq!(built.iter().filter(|b| b.fresh).count(), 1, "built once");
    CoreLib::load(&built[0].path, false).unwrap();
}

#[test]
fn a_cached_library_that_does_not_load_is_rebuilt() {
    if !available("a_cached_library_that_does_not_load_is_rebuilt") {
        return;
    }
    use sha2::{Digest, Sha256};
    let cache = tempfile::tempdir().unwrap();
    let opts = BuildOptions {
        cache_dir: cache.path().to_path_buf(),
        ..BuildOptions::default()
    };
    let p = CoreParams::small(4, 1);
    let first = hilrig_verilator::build::build(&hilrig_verilator::core::sources(p), &opts).unwrap();
    // Whole by its manifest, but not a library: a stale entry from a broken toolchain.
    let junk = b"not an ELF shared object".to_vec();
    std::fs::write(&first.path, &junk).unwrap();
    std::fs::write(
        first.path.with_file_name("artefact.sha256"),
        hex::encode(Sha256::digest(&junk)),
    )
    .unwrap();
    assert!(CoreLib::load(&first.path, false).is_err());
    let lib = CoreLib::get(p, &opts).unwrap();
    assert!(lib.fresh(), "the stale entry must be rebuilt");
    assert_ne!(std::fs::read(lib.path()).unwrap(), junk);
}

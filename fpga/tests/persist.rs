//! The RTL backend keeps the model's state-file format and its durability rules.

use hilrig_device::device::{Device, DeviceError};
use hilrig_device::model::{ops, Model};
use hilrig_device::oob;
use hilrig_device::regmap::*;
use hilrig_device::state::{DeviceConfig, NvState};
use hilrig_fpga::Rtl;

fn factory(width: u8) -> NvState {
    NvState::factory(DeviceConfig::with_width(width), 9).unwrap()
}

#[test]
fn state_file_moves_between_model_and_rtl() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dev.state");
    drop(Model::create(&p, factory(8)).unwrap());
    let mut rtl = Rtl::open(&p).unwrap();
    let img: Vec<u8> = (0..600u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(
        ops::flash_region(&mut rtl, Region::Firmware, &img).unwrap(),
        2
    );
    assert!(rtl.saves() >= 4, "saved before and after each command");
    drop(rtl);
    let mut m = Model::open(&p).unwrap();
    assert_eq!(m.nv().counter(Region::Firmware), 2);
    assert_eq!(m.nv().master, 2);
    assert_eq!(
        ops::read_region(&mut m, Region::Firmware, 600).unwrap(),
        img
    );
    // And back: the model's erase is seen by the RTL.
    ops::unlock(&mut m).unwrap();
    assert!(ops::erase(&mut m, Region::Config).unwrap().done());
    drop(m);
    let mut rtl = Rtl::open(&p).unwrap();
    assert_eq!(rtl.read32(Reg::Counter.offset() + 8).unwrap(), 1);
    assert_eq!(rtl.read32(Reg::Master.offset()).unwrap(), 3);
    assert_eq!(
        ops::read_region(&mut rtl, Region::Firmware, 600).unwrap(),
        img
    );
}

#[test]
fn counter_is_durable_before_the_command_acts() {
    for backend in ["model", "rtl"] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev.state");
        drop(Model::create(&p, factory(8)).unwrap());
        let mut d: Box<dyn Device> = if backend == "model" {
            Box::new(Model::open(&p).unwrap())
        } else {
            Box::new(Rtl::open(&p).unwrap())
        };
        ops::unlock(&mut *d).unwrap();
        // The state file's directory disappears: the count cannot be saved, so the
        // erase must not act.
        std::fs::remove_dir_all(dir.path()).unwrap();
        let e = ops::erase(&mut *d, Region::Vbios);
        assert!(
            matches!(e, Err(DeviceError::Persist { .. })),
            "{backend}: {e:?}"
        );
        let st = d.read32(Reg::FlashStatus.offset()).unwrap();
        assert_eq!(
            st & FLASH_STATUS_DONE,
            0,
            "{backend}: the erase did not act"
        );
        // The attempt is still counted in the device (never undercount).
        assert_eq!(d.read32(Reg::Counter.offset()).unwrap(), 1, "{backend}");
    }
}

#[test]
fn bad_state_files_are_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.state");
    drop(Model::create(&p, factory(8)).unwrap());
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.truncate(50);
    std::fs::write(&p, &bytes).unwrap();
    let e = Rtl::open(&p).err().unwrap().to_string();
    assert!(e.contains("bad.state") && e.contains("truncated"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), bytes);
    assert!(
        Rtl::create(&p, factory(8)).is_err(),
        "create refuses to replace"
    );
}

#[test]
fn fuse_blows_and_oob_physical_reset_clears_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dev.state");
    let nv = factory(3);
    let key = nv.reset_key;
    let mut rtl = Rtl::create(&p, nv).unwrap();
    ops::unlock(&mut rtl).unwrap();
    for _ in 0..3 {
        assert!(ops::erase(&mut rtl, Region::Config).unwrap().done());
    }
    assert_eq!(rtl.read32(Reg::Fuse.offset()).unwrap(), 1);
    assert_eq!(rtl.read32(Reg::SlotsLeft.offset()).unwrap(), 0);
    let r = ops::program(&mut rtl, Region::Vbios, 0, 0, &[0; 8]).unwrap();
    assert_ne!(r.status & FLASH_STATUS_REFUSED_FUSE, 0);
    let c = oob::read_counters(&mut rtl).unwrap();
    assert!(c.fuse);
    let f = oob::encode_request(1, &oob::Request::PhysicalReset(key));
    let (_, resp) = oob::decode_response(&rtl.oob(&f).unwrap()).unwrap();
    assert_eq!(resp, oob::Response::ResetDone { epoch: 1 });
    assert_eq!(rtl.read32(Reg::Fuse.offset()).unwrap(), 0);
    assert_eq!(rtl.read32(Reg::Epoch.offset()).unwrap(), 1);
    assert_eq!(
        rtl.read32(Reg::Master.offset()).unwrap(),
        4,
        "MASTER is kept"
    );
    drop(rtl);
    let nv = NvState::load(&p).unwrap();
    assert_eq!((nv.fuse, nv.epoch, nv.counter_values()), (false, 1, [0; 3]));
}

#[test]
fn hang_wedges_until_reset_and_rom_reads_all_ones() {
    let mut rtl = Rtl::new(factory(8)).unwrap();
    let mut rom = [0u8; 6];
    rtl.rom_read(1, &mut rom).unwrap();
    assert_eq!(rom, [0xff; 6]);
    assert!(rtl.rom_read(rtl.rom_size() - 2, &mut rom).is_err());
    rtl.write32(Reg::HangTrigger.offset(), HANG_MAGIC).unwrap();
    assert_eq!(rtl.read32(Reg::Id.offset()).unwrap(), u32::MAX);
    rtl.write32(Reg::SoftReset.offset(), SOFT_RESET_MAGIC)
        .unwrap();
    assert!(rtl.is_hung(), "writes are ignored while hung");
    rtl.reset(hilrig_device::ResetKind::Flr).unwrap();
    assert_eq!(rtl.read32(Reg::Id.offset()).unwrap(), DEVICE_ID_VALUE);
}

/// The rtl backend's data buffers outlive the process as a powered device's do
/// (issue 16: without this the residue check could not fail on rtl): kept in
/// `.NAME.buffers` beside the state file, written through, cleared by a reset,
/// gone after a power cycle.
#[test]
fn rtl_buffers_kept_beside_the_state_outlive_the_process_until_reset_or_power_off() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.state");
    drop(Rtl::create(&p, factory(8)).unwrap());
    let canary = 0xc0ffee11u32;
    let word = BUFFER_BASE + 0x40;
    {
        let mut r = Rtl::open(&p).unwrap();
        r.keep_buffers_beside_state().unwrap();
        r.write_word(word, canary, 0xf).unwrap();
        r.write_word(word + 4, 0x1234_5678, 0x3).unwrap();
        assert_eq!(r.read_word(word, 0xf).unwrap(), canary);
    }
    let file = hilrig_device::model::buffers_path(&p);
    assert!(file.exists(), "{} kept", file.display());
    // The next process on the powered device finds what the last one left.
    let mut r = Rtl::open(&p).unwrap();
    r.keep_buffers_beside_state().unwrap();
    assert_eq!(r.read_word(word, 0xf).unwrap(), canary);
    assert_eq!(r.read_word(word + 4, 0xf).unwrap(), 0x5678);
    // The model, on the same kept file, sees the same bytes.
    {
        let mut m = Model::open(&p).unwrap();
        m.keep_buffers_beside_state().unwrap();
        assert_eq!(m.read_word(word, 0xf).unwrap(), canary);
    }
    // A process that does not keep them (the old rtl backend) starts empty.
    assert_eq!(Rtl::open(&p).unwrap().read_word(word, 0xf).unwrap(), 0);
    // A reset clears them, for the next process too.
    r.reset(hilrig_device::device::ResetKind::Flr).unwrap();
    assert_eq!(r.read_word(word, 0xf).unwrap(), 0);
    drop(r);
    let mut r = Rtl::open(&p).unwrap();
    r.keep_buffers_beside_state().unwrap();
    assert_eq!(r.read_word(word, 0xf).unwrap(), 0);
    r.write_word(word, canary, 0xf).unwrap();
    drop(r);
    // Power off: gone.
    hilrig_device::model::power_cycle_buffers(&p);
    let mut r = Rtl::open(&p).unwrap();
    r.keep_buffers_beside_state().unwrap();
    assert_eq!(r.read_word(word, 0xf).unwrap(), 0);
}

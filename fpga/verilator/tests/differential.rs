//! The 100k-operation differential test against the model (`hilrig_fpga::difftest`)
//! on the Verilator backend, and lockstep pairs of any two backends by
//! `BackendKind`. SKIPPED loudly without verilator.

use hilrig_device::device::Device;
use hilrig_device::regmap::Reg;
use hilrig_device::state::{DeviceConfig, NvState};
use hilrig_device::{BackendKind, DeviceError, Model};
use hilrig_fpga::difftest::{self, config_for};
use hilrig_fpga::Lockstep;
use hilrig_verilator::{available, open_pair, pair, Verilator};

/// Ten seeds sharing one serial (the serial is elaborated into the Verilog, so each
/// serial is a build): two for each counter width 3..=6 on the small geometry, two
/// on the default one. Few builds, every width and both geometries.
fn seeds() -> Vec<u64> {
    let small = [2048, 1024, 256];
    let mut want: Vec<(Option<u8>, bool, usize)> = (3..=6)
        .map(|w| (Some(w), true, 2))
        .chain([(None, false, 2)])
        .collect();
    let mut out = Vec::new();
    for k in 0..10_000u64 {
        let seed = (k << 16) | 1;
        let c = config_for(seed);
        let is_small = c.region_sizes == small;
        if let Some(slot) = want
            .iter_mut()
            .find(|(w, s, n)| *n > 0 && *s == is_small && w.is_none_or(|w| w == c.counter_width))
        {
            slot.2 -= 1;
            out.push(seed);
        }
        if want.iter().all(|s| s.2 == 0) {
            break;
        }
    }
    out
}

#[test]
fn differential_100k_ops_model_vs_verilator() {
    if !available("differential_100k_ops_model_vs_verilator") {
        return;
    }
    let seeds = seeds();
    assert_eq!(seeds.len(), 10);
    let mut total = 0;
    let mut done = 0;
    for seed in seeds {
        let st = difftest::run_on(seed, 10_000, |nv| {
            Ok::<_, hilrig_verilator::Error>(Lockstep::pair(
                Model::new(nv.clone())?,
                Verilator::new(nv)?,
            ))
        })
        .unwrap_or_else(|e| panic!("{e}"));
        eprintln!("seed {seed}: {st:?}");
        total += st.ops;
        done += st.done;
    }
    assert!(total >= 100_000, "{total} operations");
    assert!(done > 0, "some flash commands completed");
}

#[test]
fn rtl_and_verilator_in_lockstep_on_a_state_file() {
    if !available("rtl_and_verilator_in_lockstep_on_a_state_file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dev.state");
    let cfg = DeviceConfig {
        counter_width: 4,
        region_sizes: [2048, 1024, 256],
    };
    NvState::factory(cfg, 1).unwrap().save(&p).unwrap();
    // rtl keeps the file; verilator runs alongside.
    let mut d = open_pair(BackendKind::Rtl, BackendKind::Verilator, &p).unwrap();
    for i in 0..200u32 {
        d.write32(Reg::Scratch.offset() + 4 * (i % 8), i * 7)
            .unwrap();
        d.read32(Reg::Scratch.offset() + 4 * (i % 8)).unwrap();
    }
    d.write32(Reg::FlashRegion.offset(), 1).unwrap();
    d.write32(
        Reg::FlashCmd.offset(),
        hilrig_device::regmap::FLASH_CMD_ERASE,
    )
    .unwrap();
    assert_eq!(NvState::load(&p).unwrap().counter_values(), [0, 1, 0]);
    // Every backend by kind reads the state the pair left.
    for kind in BackendKind::ALL {
        let mut d = hilrig_verilator::open_backend(kind, &p).unwrap();
        assert_eq!(d.read32(Reg::Counter.offset() + 4).unwrap(), 1, "{kind}");
        let mut n = hilrig_verilator::new_backend(kind, NvState::load(&p).unwrap()).unwrap();
        assert_eq!(n.read32(Reg::Counter.offset() + 4).unwrap(), 1, "{kind}");
    }
    // Lockstep is not a side.
    let e = open_pair(BackendKind::Lockstep, BackendKind::Model, &p).err();
    assert!(e.is_some_and(|e| e.to_string().contains("lockstep")));
}

#[test]
fn a_verilator_divergence_names_the_sides_and_register() {
    if !available("a_verilator_divergence_names_the_sides_and_register") {
        return;
    }
    let cfg = DeviceConfig {
        counter_width: 4,
        region_sizes: [2048, 1024, 256],
    };
    let nv = NvState::factory(cfg, 1).unwrap();
    let mut d = pair(BackendKind::Model, BackendKind::Verilator, nv).unwrap();
    d.write32(Reg::Scratch.offset(), 1).unwrap();
    // Fault injection: a write the model does not see.
    d.b_mut().write32(Reg::Scratch.offset(), 2).unwrap();
    let e = d.read32(Reg::Scratch.offset()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DeviceError::Divergence(_)), "{msg}");
    assert!(
        msg.contains("SCRATCH")
            && msg.contains("model 0x00000001")
            && msg.contains("verilator 0x00000002"),
        "{msg}"
    );
}

#[test]
fn a_divergence_writes_the_verilator_vcd() {
    if !available("a_divergence_writes_the_verilator_vcd") {
        return;
    }
    let cfg = DeviceConfig {
        counter_width: 4,
        region_sizes: [2048, 1024, 256],
    };
    let nv = NvState::factory(cfg, 1).unwrap();
    let opts = hilrig_verilator::BuildOptions {
        trace: true,
        ..Default::default()
    };
    let v = Verilator::with_options(nv.clone(), hilrig_fpga::core::OOB_DIVISOR, &opts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vcd = dir.path().join("div.vcd");
    let mut d = Lockstep::pair(Model::new(nv.clone()).unwrap(), v).with_vcd(vcd.clone(), 16);
    // More than one window of cycles, then a fault the model does not see.
    for i in 0..40 {
        d.write32(Reg::Scratch.offset(), i).unwrap();
    }
    d.b_mut().write32(Reg::Scratch.offset(), 0x5a5a).unwrap();
    let msg = d.read32(Reg::Scratch.offset()).unwrap_err().to_string();
    assert!(
        msg.contains("div.vcd") && msg.contains("div.vcd.prev.vcd"),
        "{msg}"
    );
    let text = std::fs::read_to_string(&vcd).unwrap();
    assert!(
        text.contains("$enddefinitions") && text.contains("strobe"),
        "{}",
        &text[..text.len().min(400)]
    );
    assert!(std::fs::read_to_string(dir.path().join("div.vcd.prev.vcd"))
        .unwrap()
        .contains("$enddefinitions"));
    // Without a trace build there is no VCD, and the backend says why.
    let mut plain = Verilator::new(nv).unwrap();
    assert!(matches!(
        plain.trace_vcd(16),
        Err(hilrig_verilator::Error::NoTrace)
    ));
}

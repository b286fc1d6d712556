//! The main job on embedded defaults. Today: a smoke run of the model device that
//! exercises flash updates, refused attempts, a hang, resets and a power cycle, then
//! reads the counters out of band and gives a verdict. (The campaign issue turns
//! this into the nightly campaign on simulated hosts.)

use anyhow::{bail, Context, Result};
use hilrig_counters::{compare, Verdict};
use hilrig_device::model::ops;
use hilrig_device::oob::{self, CounterReport};
use hilrig_device::regmap::{Reg, HANG_MAGIC};
use hilrig_device::{Device, DeviceConfig, Model, Region, ResetKind};
use std::path::Path;
use std::process::ExitCode;

struct Step {
    what: &'static str,
    ok: bool,
    detail: String,
}

/// Run the smoke job; exit status 0 when every check passed and the verdict is the
/// expected one.
pub fn run(keep: Option<&Path>, backend: &str) -> Result<ExitCode> {
    let tmp;
    let dir = match keep {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.to_path_buf()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let state = dir.join("device.state");
    if state.exists() {
        std::fs::remove_file(&state)
            .with_context(|| format!("removing old {}", state.display()))?;
    }
    println!(
        "hilrig smoke run ({backend} device, state file {})",
        state.display()
    );
    let nv = hilrig_fw::factory::device(DeviceConfig::with_width(16), 0x5eed)?;
    drop(Model::create(&state, nv)?);
    let mut m = crate::open_device(backend, &state)?;
    let mut steps = Vec::new();
    let expected0 = oob::read_counters(&mut *m)?;

    // 1. An operator updates the firmware region: erase + program = 2 attempts.
    let image: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    let attempts = ops::flash_region(&mut *m, Region::Firmware, &image)?;
    let back = ops::read_region(&mut *m, Region::Firmware, image.len() as u32)?;
    steps.push(Step {
        what: "operator firmware update reads back",
        ok: back == image && attempts == 2,
        detail: format!("{attempts} attempts, {} bytes", image.len()),
    });

    // 2. A program attempt while locked is refused but counted.
    let r = ops::program(&mut *m, Region::Config, 0, 0, &[0u8; 16])?;
    steps.push(Step {
        what: "locked program refused",
        ok: !r.done(),
        detail: format!(
            "FLASH_STATUS {:#x} ({})",
            r.status,
            ops::describe_flash_status(r.status)
        ),
    });

    // 3. The hang magic wedges the device until FLR; OOB still answers.
    m.write32(Reg::HangTrigger.offset(), HANG_MAGIC)?;
    let wedged = m.read32(Reg::Id.offset())? == u32::MAX;
    let oob_alive = oob::read_counters(&mut *m).is_ok();
    m.reset(ResetKind::Flr)?;
    let back_up = m.read32(Reg::Id.offset())? != u32::MAX;
    steps.push(Step {
        what: "hang magic wedges until FLR",
        ok: wedged && oob_alive && back_up,
        detail: format!("wedged={wedged} oob={oob_alive} after-flr={back_up}"),
    });

    // 4. Power cycle: volatile state lost, counters kept (reopen the state file).
    m.write32(Reg::Scratch.offset(), 0xfeed)?;
    drop(m);
    let mut m = crate::open_device(backend, &state)?;
    let scratch = m.read32(Reg::Scratch.offset())?;
    steps.push(Step {
        what: "power cycle clears volatile state",
        ok: scratch == 0,
        detail: format!("SCRATCH[0] = {scratch:#x}"),
    });

    // 5. Read the counters out of band and compare with what the run expects.
    let actual = oob::read_counters(&mut *m)?;
    let mut expected = expected0;
    expected.counters[Region::Firmware as usize] += 2;
    expected.counters[Region::Config as usize] += 1;
    expected.master += 3;
    expected.slots_left -= 2;
    let inband = in_band_counters(&mut *m)?;
    steps.push(Step {
        what: "OOB counters equal in-band counters",
        ok: inband == actual,
        detail: format!("in-band {:?}", inband.counters),
    });
    let (verdict, reasons) = compare(&expected, &actual);
    steps.push(Step {
        what: "counters verdict is trusted",
        ok: verdict == Verdict::Trusted,
        detail: if reasons.is_empty() {
            "no differences".into()
        } else {
            reasons.join("; ")
        },
    });

    for s in &steps {
        println!(
            "  [{}] {:<40} {}",
            if s.ok { "PASS" } else { "FAIL" },
            s.what,
            s.detail
        );
    }
    println!(
        "counters (OOB): vbios {} firmware {} config {} | master {} | fuse {} | slots left {} of {} | epoch {}",
        actual.counters[0],
        actual.counters[1],
        actual.counters[2],
        actual.master,
        if actual.fuse { "BLOWN" } else { "intact" },
        actual.slots_left,
        actual.width,
        actual.epoch
    );
    println!("verdict: {verdict}");
    let failed = steps.iter().filter(|s| !s.ok).count();
    println!("{} passed, {} failed", steps.len() - failed, failed);
    if failed > 0 {
        if keep.is_none() {
            bail!("smoke run failed; rerun with --keep DIR to keep its files");
        }
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn in_band_counters(d: &mut dyn Device) -> Result<CounterReport> {
    let r = |d: &mut dyn Device, reg: Reg, i: u32| d.read32(reg.offset() + 4 * i);
    Ok(CounterReport {
        counters: [
            r(d, Reg::Counter, 0)?,
            r(d, Reg::Counter, 1)?,
            r(d, Reg::Counter, 2)?,
        ],
        master: r(d, Reg::Master, 0)?,
        fuse: r(d, Reg::Fuse, 0)? != 0,
        slots_left: r(d, Reg::SlotsLeft, 0)?,
        width: r(d, Reg::Width, 0)? as u8,
        epoch: r(d, Reg::Epoch, 0)?,
    })
}

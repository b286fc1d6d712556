//! Simulated hosts: power cycle keeps counters and loses volatile state; OOB over
//! the PTY reads what the in-band model reads; a crashed VMM is an infra fault.

mod common;

use hilrig_device::device::Device;
use hilrig_device::model::{ops, Model};
use hilrig_device::oob;
use hilrig_device::regmap::Region;
use hilrig_rig::sim::VmmState;
use hilrig_rig::{ErrorKind, PowerState, Rig};

#[test]
fn oob_over_pty_reads_what_the_model_reads_in_band() {
    let d = tempfile::tempdir().unwrap();
    let rig = Rig::load(&common::sim_inventory(d.path(), 1, 8)).unwrap();
    let sim = rig.sim("sim-1").unwrap();
    sim.ensure().unwrap();
    {
        let mut m = Model::open(sim.state_path()).unwrap();
        ops::unlock(&mut m).unwrap();
        ops::erase(&mut m, Region::Config).unwrap();
        ops::erase(&mut m, Region::Firmware).unwrap();
    }
    let over_pty = rig.read_counters("sim-1").unwrap();
    let mut m = Model::open(sim.state_path()).unwrap();
    let dev: &mut dyn Device = &mut m;
    let in_band = oob::read_counters(dev).unwrap();
    assert_eq!(over_pty, in_band);
    assert_eq!(over_pty.counters, [0, 1, 1]);
    assert_eq!(over_pty.master, 2);
    let (id, _, serial, width) = rig.identify("sim-1").unwrap();
    assert_eq!(id, hilrig_device::regmap::DEVICE_ID_VALUE);
    assert_eq!((serial, width), (101, 8));
}

#[test]
fn power_cycle_keeps_counters_and_loses_volatile_state() {
    if common::skip_without_vmm("power_cycle_keeps_counters_and_loses_volatile_state") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // Every boot of this host makes one counted CONFIG erase attempt in the VMM.
    let rig = Rig::load(&common::sim_inventory_with(
        d.path(),
        1,
        8,
        "count_boot = true\nvmm_args = [\"--profile\", \"operator\"]",
    ))
    .unwrap();
    let _off = common::OffOnDrop(&rig, vec!["sim-1"]);
    let sim = rig.sim("sim-1").unwrap();
    sim.ensure().unwrap();
    {
        let mut m = Model::open(sim.state_path()).unwrap();
        ops::unlock(&mut m).unwrap();
        ops::erase(&mut m, Region::Firmware).unwrap();
    }
    let boots = |n: u32, base: oob::CounterReport| {
        let mut c = base;
        c.counters[Region::Config as usize] += n;
        c.master += n;
        c.slots_left = 8 - c.counters.iter().max().copied().unwrap_or(0);
        c
    };
    let before = rig.read_counters("sim-1").unwrap();
    let mut power = rig.power("sim-1").unwrap();
    assert_eq!(power.status().unwrap(), PowerState::Off);

    // Console captured from before power on.
    let caps = rig
        .start_captures("sim-1", &d.path().join("art"), "boot1")
        .unwrap();
    power.on().unwrap();
    assert_eq!(power.status().unwrap(), PowerState::On);
    assert_eq!(rig.read_counters("sim-1").unwrap(), boots(1, before));
    power.cycle().unwrap();
    assert_eq!(power.status().unwrap(), PowerState::On);
    let sums: Vec<_> = caps.into_iter().map(|c| c.stop().unwrap()).collect();
    let text = std::fs::read_to_string(&sums[0].path).unwrap();
    // Two boots; the guest's SCRATCH mark from the first did not survive the cycle.
    assert_eq!(
        text.matches(hilrig_rig::sim::BOOT_BANNER).count(),
        2,
        "{text}"
    );
    assert_eq!(text.matches("scratch: clear").count(), 2, "{text}");
    assert!(!text.contains("scratch: kept"), "{text}");
    assert!(text.lines().all(|l| l.starts_with('[')), "{text}");

    // The VMM was SIGKILLed twice; what it counted in both boots is kept.
    power.off().unwrap();
    assert_eq!(power.status().unwrap(), PowerState::Off);
    assert_eq!(rig.read_counters("sim-1").unwrap(), boots(2, before));
    assert_eq!(
        before.counters,
        [0, 1, 0],
        "the firmware erase before the first boot"
    );
}

#[test]
fn a_vmm_that_dies_is_an_infra_fault_naming_the_host() {
    if common::skip_without_vmm("a_vmm_that_dies_is_an_infra_fault_naming_the_host") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let rig = Rig::load(&common::sim_inventory(d.path(), 2, 8)).unwrap();
    let _off = common::OffOnDrop(&rig, vec!["sim-1", "sim-2"]);
    // Hosts run in parallel.
    std::thread::scope(|s| {
        for h in ["sim-1", "sim-2"] {
            let rig = &rig;
            s.spawn(move || rig.power(h).unwrap().on().unwrap());
        }
    });
    let sim = rig.sim("sim-2").unwrap();
    let VmmState::Running(pid) = sim.vmm_state() else {
        panic!("sim-2 not running: {:?}", sim.vmm_state());
    };
    // SAFETY: killing the VMM child this test started.
    unsafe {
        libc_kill(pid as i32);
    }
    let e = loop {
        match rig.power("sim-2").unwrap().status() {
            Ok(PowerState::On) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Ok(PowerState::Off) => panic!("a crashed VMM must not read back as a clean off"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.kind(), ErrorKind::Infra);
    let s = e.to_string();
    assert!(
        s.contains("sim-2") && s.contains("exited unexpectedly"),
        "{s}"
    );
    assert!(rig.sim("sim-2").unwrap().check_alive().is_err());
    assert!(rig.sim("sim-1").unwrap().check_alive().is_ok());
    // The health check marks it unhealthy; the other stays healthy.
    let t = rig.check();
    assert_eq!(t.healthy_hosts(), vec!["sim-1"], "{t}");
    // Powering on again recovers it.
    rig.power("sim-2").unwrap().on().unwrap();
    for h in ["sim-1", "sim-2"] {
        rig.power(h).unwrap().off().unwrap();
    }
}

unsafe fn libc_kill(pid: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    kill(pid, 9);
}

#[test]
fn oob_reads_work_while_the_vmm_holds_the_state_and_a_reset_waits_for_power_off() {
    if common::skip_without_vmm(
        "oob_reads_work_while_the_vmm_holds_the_state_and_a_reset_waits_for_power_off",
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let rig = Rig::load(&common::sim_inventory(d.path(), 1, 8)).unwrap();
    let _off = common::OffOnDrop(&rig, vec!["sim-1"]);
    let sim = rig.sim("sim-1").unwrap();
    sim.ensure().unwrap();
    let key = hilrig_device::NvState::load(sim.state_path())
        .unwrap()
        .reset_key;
    let before = std::fs::read(sim.state_path()).unwrap();
    let mut power = rig.power("sim-1").unwrap();
    power.on().unwrap();
    let VmmState::Running(pid) = sim.vmm_state() else {
        panic!("not running: {:?}", sim.vmm_state());
    };
    // The VMM holds the state file.
    let e = hilrig_device::state::StateLock::acquire(sim.state_path()).unwrap_err();
    assert!(e.to_string().contains(&format!("pid {pid}")), "{e}");
    // Reads over the OOB port work while it runs.
    let c = rig.read_counters("sim-1").unwrap();
    assert_eq!(c.master, 0);
    // A keyed PHYSICAL_RESET is refused BUSY; nothing is written.
    let e = rig
        .oob_request("sim-1", &oob::Request::PhysicalReset(key))
        .unwrap_err();
    assert!(e.to_string().contains("Busy"), "{e}");
    assert_eq!(std::fs::read(sim.state_path()).unwrap(), before);
    // Powered off, the same request goes through.
    power.off().unwrap();
    match rig
        .oob_request("sim-1", &oob::Request::PhysicalReset(key))
        .unwrap()
    {
        oob::Response::ResetDone { epoch } => assert_eq!(epoch, 1),
        other => panic!("{other:?}"),
    }
}

//! `check` on the shipped sample inventory: every simulated host healthy.

mod common;

use hilrig_rig::{Inventory, Rig};
use std::path::Path;

#[test]
fn check_on_the_sample_inventory_prints_all_healthy() {
    // Simulated hosts are healthy only where they can be powered on.
    if common::skip_without_vmm("check_on_the_sample_inventory_prints_all_healthy") {
        return;
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("inventory/sim.toml");
    let mut inv = Inventory::load(&p).unwrap();
    // Same file, private work directory (state files, console logs).
    let d = tempfile::tempdir().unwrap();
    inv.lab.workdir = Some(d.path().to_path_buf());
    let t = Rig::new(inv).check();
    let text = t.to_string();
    println!("{text}");
    assert!(t.all_healthy(), "{text}");
    assert_eq!(t.healthy_hosts(), vec!["sim-1", "sim-2", "sim-3"]);
    assert!(text.contains("3/3 hosts healthy"), "{text}");
    for probe in ["power/sim", "console/com1/sim", "oob/sim"] {
        assert_eq!(text.matches(probe).count(), 3, "{probe}: {text}");
    }
    assert!(
        text.contains("reads back off") && text.contains("IDENTIFY"),
        "{text}"
    );
}

#[test]
fn a_host_whose_oob_port_is_missing_is_unhealthy() {
    if common::skip_without_vmm("a_host_whose_oob_port_is_missing_is_unhealthy") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("lab.toml");
    std::fs::write(
        &p,
        format!(
            "[lab]\nworkdir = \"{}\"\n[[host]]\nname = \"ok\"\n[host.power]\ndriver = \"sim\"\n[host.oob]\ndriver = \"sim\"\n\n\
             [[host]]\nname = \"no-uart\"\n[host.power]\ndriver = \"sim\"\n[host.oob]\ndriver = \"serial\"\npath = \"/dev/does-not-exist\"\n\n\
             [[host]]\nname = \"mcu\"\n[host.power]\ndriver = \"sim\"\n[host.board]\ndriver = \"probe-rs\"\nchip = \"STM32F411CEUx\"\n",
            d.path().join("w").display()
        ),
    )
    .unwrap();
    let t = Rig::load(&p).unwrap().check();
    let text = t.to_string();
    assert_eq!(t.healthy_hosts(), vec!["ok"], "{text}");
    assert!(
        text.contains("no-uart") && text.contains("/dev/does-not-exist"),
        "{text}"
    );
    if cfg!(not(feature = "probe-rs")) {
        assert!(text.contains("built without probe-rs support"), "{text}");
    }
}

#![allow(dead_code)]
//! Shared test helpers.

use std::path::{Path, PathBuf};

/// True (and a loud SKIPPED line) when /dev/kvm or hilrig-vmm is missing.
pub fn skip_without_vmm(test: &str) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("SKIPPED: {test}: /dev/kvm not available");
        return true;
    }
    if let Err(e) = hilrig_rig::sim::find_vmm(None) {
        eprintln!("SKIPPED: {test}: {e}");
        return true;
    }
    false
}

/// A sim inventory of `n` hosts in `dir` (workdir = dir).
pub fn sim_inventory(dir: &Path, n: usize, width: u8) -> PathBuf {
    sim_inventory_with(dir, n, width, "")
}

/// [`sim_inventory`] with extra `[host.sim]` lines.
pub fn sim_inventory_with(dir: &Path, n: usize, width: u8, sim_extra: &str) -> PathBuf {
    let mut s = format!("[lab]\nworkdir = \"{}\"\n", dir.join("work").display());
    for i in 1..=n {
        s.push_str(&format!(
            "\n[[host]]\nname = \"sim-{i}\"\ntags = [\"sim\"]\n[host.sim]\ncounter_width = {width}\nserial = {}\nmax_on_s = 600\n{sim_extra}\n[host.power]\ndriver = \"sim\"\n[[host.console]]\nname = \"com1\"\ndriver = \"sim\"\n[host.oob]\ndriver = \"sim\"\n",
            100 + i
        ));
    }
    let p = dir.join("lab.toml");
    std::fs::write(&p, s).unwrap();
    p
}

/// Powers the named simulated hosts off when dropped (also on a panicking test),
/// so no VMM outlives its test.
pub struct OffOnDrop<'a>(pub &'a hilrig_rig::Rig, pub Vec<&'static str>);

impl Drop for OffOnDrop<'_> {
    fn drop(&mut self) {
        for h in &self.1 {
            if let Ok(s) = self.0.sim(h) {
                let _ = s.power_off();
            }
        }
    }
}

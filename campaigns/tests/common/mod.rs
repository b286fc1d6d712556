//! Checks shared by the lab tests (`lab.rs`, `labgrid.rs`) on an SSH host's own
//! device.

use hilrig_campaigns::runner::RunSummary;
use std::path::{Path, PathBuf};

/// Files under `d`, recursively.
pub fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Negative control for the OOB path: the controller's copies of the device
/// under `out` (`state.bin`, the state the rig prepared for each attempt) are
/// factory-fresh. A case judged from them would see zero counter deltas.
pub fn controller_copies_never_moved(out: &Path) {
    let local: Vec<PathBuf> = walk(out)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "state.bin"))
        .collect();
    assert!(!local.is_empty(), "no state.bin under {}", out.display());
    for p in local {
        let nv = hilrig_device::state::NvState::load(&p).unwrap();
        assert_eq!(
            hilrig_device::oob::CounterReport::of(&nv).counters,
            [0, 0, 0],
            "{}",
            p.display()
        );
    }
}

/// The console artifact of `attack`'s case in `s` (results under `out`): the
/// controller's capture through the console driver (timestamped lines), not a
/// file fetched back. Returns its text.
pub fn captured_console(s: &RunSummary, out: &Path, attack: &str) -> String {
    let case = s.run.cases.iter().find(|c| c.attack == attack).unwrap();
    let art = case
        .artifacts
        .iter()
        .find(|a| a.path.ends_with("console.txt"))
        .unwrap_or_else(|| panic!("no console: {:?}", case.artifacts));
    let text = walk(out)
        .into_iter()
        .find(|p| p.ends_with(&art.path))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .unwrap_or_else(|| panic!("{} not under {}", art.path, out.display()));
    assert!(
        text.lines().count() > 0
            && text
                .lines()
                .all(|l| l.starts_with('[') && l.contains("Z +")),
        "{text}"
    );
    // It ended at its end marker (not kept), not at the bound.
    assert!(!text.contains("HILRIG-CONSOLE-END"), "{text}");
    assert!(
        !case.observed.contains("console end marker"),
        "{}",
        case.observed
    );
    text
}

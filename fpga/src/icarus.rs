//! Running a design's Verilog under Icarus Verilog (`iverilog` + `vvp`), for the
//! test benches that check the generated Verilog against the rust-hdl simulation.

use std::path::Path;
use std::process::Command;

/// Whether `iverilog` can be run here; says loudly that `test` is skipped if not.
pub fn available(test: &str) -> bool {
    if Command::new("iverilog").arg("-V").output().is_ok() {
        return true;
    }
    eprintln!("SKIPPED {test}: iverilog is not installed");
    false
}

/// Compile the test bench `tb` with the design `design` in `dir` and run it; returns
/// what the bench printed. Errors carry iverilog's or vvp's own messages.
pub fn run(dir: &Path, tb: &str, design: &str) -> Result<String, String> {
    let tb_v = dir.join("tb.v");
    let design_v = dir.join("design.v");
    let exe = dir.join("sim");
    for (path, text) in [(&tb_v, tb), (&design_v, design)] {
        std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    let out = Command::new("iverilog")
        .arg("-o")
        .arg(&exe)
        .arg(&tb_v)
        .arg(&design_v)
        .output()
        .map_err(|e| format!("running iverilog: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "iverilog: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let out = Command::new("vvp")
        .arg(&exe)
        .output()
        .map_err(|e| format!("running vvp: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

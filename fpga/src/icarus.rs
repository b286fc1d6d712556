//! Running a design's Verilog under Icarus Verilog (`iverilog` + `vvp`), for the
//! test benches that check the generated Verilog against the rust-hdl simulation.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether `iverilog` can be run here; says loudly that `test` is skipped if not.
pub fn available(test: &str) -> bool {
    if Command::new("iverilog").arg("-V").output().is_ok() {
        return true;
    }
    eprintln!("SKIPPED {test}: iverilog is not installed");
    false
}

/// Why a bench could not be run under Icarus.
#[derive(Debug, thiserror::Error)]
pub enum IcarusError {
    /// A source file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A tool could not be started.
    #[error("running {tool}: {source}")]
    Spawn {
        /// `iverilog` or `vvp`.
        tool: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// iverilog refused the sources.
    #[error("iverilog: {stderr}")]
    Compile {
        /// What iverilog printed.
        stderr: String,
    },
}

/// Compile the test bench `tb` with the design `design` in `dir` and run it; returns
/// what the bench printed. Errors carry iverilog's or vvp's own messages.
pub fn run(dir: &Path, tb: &str, design: &str) -> Result<String, IcarusError> {
    let tb_v = dir.join("tb.v");
    let design_v = dir.join("design.v");
    let exe = dir.join("sim");
    for (path, text) in [(&tb_v, tb), (&design_v, design)] {
        std::fs::write(path, text).map_err(|source| IcarusError::Write {
            path: path.clone(),
            source,
        })?;
    }
    let out = Command::new("iverilog")
        .arg("-o")
        .arg(&exe)
        .arg(&tb_v)
        .arg(&design_v)
        .output()
        .map_err(|source| IcarusError::Spawn {
            tool: "iverilog",
            source,
        })?;
    if !out.status.success() {
        return Err(IcarusError::Compile {
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let out = Command::new("vvp")
        .arg(&exe)
        .output()
        .map_err(|source| IcarusError::Spawn {
            tool: "vvp",
            source,
        })?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

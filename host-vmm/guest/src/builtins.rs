//! The built-in payloads by name, and `--payload` resolution (a built-in name or a
//! raw binary file).

use crate::attacks;
use crate::error::{GuestError, Result};
use crate::payload::*;

/// The built-in payloads: name and description.
pub const BUILTINS: &[(&str, &str)] = &[
    (
        "pci-enum",
        "enumerate bus 0, find the device, size BAR0 and the ROM, read both",
    ),
    ("mmio-widths", "SCRATCH writes and reads at 1/2/4/8 bytes"),
    (
        "buffer-loop",
        "100000 writes to a mapped buffer page (0 exits) and 1 to SCRATCH",
    ),
    (
        "bar-move",
        "move BAR0 with decode off/on; mapped buffer pages follow it",
    ),
    (
        "smp-scratch",
        "each vCPU writes SCRATCH[index]; vCPU 0 waits for all",
    ),
    ("hello", "print a line on the serial console and pass"),
    ("triple-fault", "ud2 with no IDT: KVM_EXIT_SHUTDOWN"),
    ("spin", "loop forever (watchdog)"),
    (
        "storm",
        "every vCPU writes 1, 2, 3, ... to SCRATCH[index] forever",
    ),
    (
        "canary-write",
        "leave a canary in RAM, SCRATCH and the buffers",
    ),
    (
        "canary-scan",
        "look for the canary in RAM, SCRATCH and the buffers",
    ),
    ("past-bar", "read just past BAR0's end"),
    ("straddle-bar", "8-byte read straddling BAR0's end"),
];

/// Build the built-in payload `name`, if there is one.
pub fn builtin(name: &str) -> Option<Result<Vec<u8>>> {
    Some(match name {
        "pci-enum" => pci_enum(),
        "mmio-widths" => mmio_widths(),
        "buffer-loop" => buffer_loop(100_000),
        "bar-move" => bar_move(),
        "smp-scratch" => smp_scratch(),
        "hello" => hello(),
        "triple-fault" => triple_fault(),
        "spin" => spin(),
        "storm" => storm(),
        "canary-write" => canary_write(),
        "canary-scan" => canary_scan(),
        "past-bar" => past_bar(),
        "straddle-bar" => straddle_bar(),
        _ => return attacks::attack(name),
    })
}

/// Resolve `--payload`: a built-in name, else a raw binary file. Empty files are
/// refused here; size against guest memory is checked when the VM is built.
pub fn load(spec: &str) -> Result<(String, Vec<u8>)> {
    if let Some(p) = builtin(spec) {
        return Ok((spec.to_string(), p?));
    }
    let path = std::path::Path::new(spec);
    if !path.exists() {
        let names: Vec<&str> = BUILTINS.iter().map(|(n, _)| *n).collect();
        return Err(GuestError::Payload {
            what: spec.to_string(),
            detail: format!(
                "is neither a file nor a built-in payload ({})",
                names.join(", ")
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| GuestError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(GuestError::Payload {
            what: spec.to_string(),
            detail: "is empty (0 bytes)".into(),
        });
    }
    Ok((spec.to_string(), bytes))
}

//! For tests (feature `testkit`): a stand-in VMM — a shell script that prints a
//! `RunSummary` line as the real VMM does, echoing the run's binding (VM id,
//! teardown nonce, the device serial from the state file) in its teardown record,
//! so the runner's binding check passes as it does for the real VMM.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Shell lines reading the binding from the VMM flags into `$VMID`, `$NONCE` and
/// `$SERIAL` (`"$@"` are the VMM's flags).
pub const BIND: &str = r#"VMID=; NONCE=; STATE=; prev=
for a in "$@"; do case "$prev" in --vm-id) VMID=$a;; --teardown-nonce) NONCE=$a;; --device-state) STATE=$a;; esac; prev=$a; done
SERIAL=$(od -An -tu8 -j23 -N8 "$STATE" 2>/dev/null | tr -d ' '); SERIAL=${SERIAL:-0}
"#;

/// A passing verdict line (one alarm, trusted teardown) for `echo '…'` in the script.
pub const PASS_JSON: &str = r#"{"payload":"attack-hang","device":"model","verdict":"PASS","passed":true,"exit_status":0,"policy":{"alarms":1,"per_register":{"HANG_TRIGGER":1}},"teardown":{"vm":"'"$VMID"'","serial":'"$SERIAL"',"nonce":"'"$NONCE"'","started_unix":0,"steps":[],"complete":true,"total_micros":10,"guest_bytes_scrubbed":0,"device_bytes_scrubbed":0,"counters":null,"verdict":{"verdict":"trusted","handoff_ok":true,"reasons":[]},"signer":"","signature":""}}"#;

/// A failing verdict line (code 1, trusted teardown) for `echo '…'` in the script.
pub const FAIL_JSON: &str = r#"{"payload":"attack-hang","device":"model","verdict":"FAIL: code 1","passed":false,"exit_status":1,"policy":{"alarms":0,"per_register":{}},"teardown":{"vm":"'"$VMID"'","serial":'"$SERIAL"',"nonce":"'"$NONCE"'","started_unix":0,"steps":[],"complete":true,"total_micros":10,"guest_bytes_scrubbed":0,"device_bytes_scrubbed":0,"counters":null,"verdict":{"verdict":"trusted","handoff_ok":true,"reasons":[]},"signer":"","signature":""}}"#;

/// `line` as the shell expands it for VM id `vm`, serial `serial` and nonce `nonce`.
pub fn expand(line: &str, vm: &str, serial: u64, nonce: &str) -> String {
    line.replace("'\"$VMID\"'", vm)
        .replace("'\"$SERIAL\"'", &serial.to_string())
        .replace("'\"$NONCE\"'", nonce)
}

/// Writes an executable stand-in VMM `dir/fake-vmm` running `body` after
/// [`BIND`] (sh; `"$@"` are the VMM flags).
pub fn stand_in_vmm(dir: &Path, body: &str) -> std::io::Result<PathBuf> {
    let p = dir.join("fake-vmm");
    std::fs::write(&p, format!("#!/bin/sh\n{BIND}{body}\n"))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_lines_are_run_summaries() {
        for l in [super::PASS_JSON, super::FAIL_JSON] {
            let l = super::expand(l, "case-0-x", 1, &"5a".repeat(32));
            hilrig_vmm_api::RunSummary::from_output(l.as_bytes()).expect("a RunSummary line");
        }
    }
}

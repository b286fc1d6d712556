//! Attacks on the VMM through its policy file (issue 16). Each test names its attack
//! in its first comment. (Named `hostile_files` so it does not collide with the
//! lead's `hostile` suite for the VMM's other attacks.)

use hilrig_vmm::policy::{PolicyFile, MAX_POLICY_BYTES};
use std::path::Path;

#[test]
fn an_oversized_policy_file_is_refused_before_parsing() {
    // Attack: a huge policy file (memory exhaustion in the TOML parser).
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("huge-policy.toml");
    let size = MAX_POLICY_BYTES as usize + 1;
    std::fs::write(&p, vec![b'#'; size]).unwrap();
    let msg = PolicyFile::load(&p).unwrap_err().to_string();
    assert!(
        msg.contains("huge-policy.toml")
            && msg.contains(&size.to_string())
            && msg.contains(&MAX_POLICY_BYTES.to_string()),
        "{msg}"
    );
}

#[test]
fn a_policy_file_that_is_a_fifo_or_device_is_refused() {
    // Attack: /dev/zero (endless) or a FIFO (hangs the VMM at start) as the policy.
    let msg = PolicyFile::load(Path::new("/dev/zero"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("/dev/zero") && msg.contains("not a regular file"),
        "{msg}"
    );
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("p.toml");
    match std::process::Command::new("mkfifo").arg(&fifo).status() {
        Ok(s) if s.success() => {
            let msg = PolicyFile::load(&fifo).unwrap_err().to_string();
            assert!(msg.contains("FIFO"), "{msg}");
        }
        _ => eprintln!("SKIPPED: the FIFO case (no mkfifo)"),
    }
}

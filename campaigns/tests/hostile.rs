//! Attacks on the campaign runner through its campaign file (issue 16). Each test
//! names its attack in its first comment.

use hilrig_campaigns::format::{load, CampaignError, MAX_CAMPAIGN_BYTES};
use std::path::Path;

#[test]
fn an_oversized_campaign_file_is_refused_before_parsing() {
    // Attack: a 17 MB campaign file took 850 MB of memory to parse.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("huge.toml");
    let size = MAX_CAMPAIGN_BYTES as usize + 1;
    std::fs::write(&p, vec![b'#'; size]).unwrap();
    let e = load(&p, &[]).unwrap_err();
    assert!(matches!(e, CampaignError::Refused(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("huge.toml")
            && msg.contains(&size.to_string())
            && msg.contains(&MAX_CAMPAIGN_BYTES.to_string()),
        "{msg}"
    );
}

#[test]
fn a_campaign_file_that_is_a_fifo_or_device_is_refused() {
    // Attack: /dev/zero (endless) or a FIFO (hangs the runner) as the campaign file.
    let e = load(Path::new("/dev/zero"), &[]).unwrap_err().to_string();
    assert!(
        e.contains("/dev/zero") && e.contains("not a regular file"),
        "{e}"
    );
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("c.toml");
    match std::process::Command::new("mkfifo").arg(&fifo).status() {
        Ok(s) if s.success() => {
            let e = load(&fifo, &[]).unwrap_err().to_string();
            assert!(e.contains("FIFO"), "{e}");
        }
        _ => eprintln!("SKIPPED: the FIFO case (no mkfifo)"),
    }
}

#[test]
fn a_missing_campaign_file_is_still_an_io_error_naming_it() {
    // Not an attack: the old error kind is kept for a file that is not there.
    let e = load(Path::new("/nonexistent/c.toml"), &[]).unwrap_err();
    assert!(matches!(e, CampaignError::Io { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/c.toml"));
}

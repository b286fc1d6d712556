//! Attacks on the campaign runner through its campaign file and its output
//! directory (issue 16). Each test names its attack in its first comment.

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

/// A one-case campaign in `dir` run by a stand-in VMM that passes; the closure runs
/// it with its output under the directory it is given.
fn runner_in(dir: &Path) -> impl Fn(&Path) -> Result<hilrig_campaigns::runner::RunSummary, String> {
    let c = dir.join("c.toml");
    std::fs::write(&c, "name = \"t\"\n[[case]]\nattacks = [\"attack-hang\"]\n").unwrap();
    let v = hilrig_campaigns::testkit::stand_in_vmm(
        dir,
        &format!("echo '{}'", hilrig_campaigns::testkit::PASS_JSON),
    )
    .unwrap();
    move |out: &Path| {
        let mut o = hilrig_campaigns::runner::RunOptions::new(c.clone());
        o.out_dir = out.to_path_buf();
        o.vmm = Some(v.clone());
        o.progress = Some(false);
        hilrig_campaigns::runner::run_campaign(o).map_err(|e| e.to_string())
    }
}

#[test]
fn an_output_directory_another_user_owns_or_all_can_write_is_refused() {
    // Attack: a local user pre-creates the run's output directory (a predictable
    // path such as /tmp/campaign-out) or it is world-writable: they could plant
    // symlinks at the case files the runner (often root) writes there.
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let run = runner_in(t.path());
    let open = t.path().join("open-out");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let msg = run(&open).unwrap_err();
    assert!(
        msg.contains(open.to_str().unwrap()) && msg.contains("group/other write"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_dir(&open).unwrap().count(),
        0,
        "nothing written"
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let theirs = t.path().join("their-out");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let msg = run(&theirs).unwrap_err();
        assert!(
            msg.contains(theirs.to_str().unwrap()) && msg.contains("owned by uid 65534"),
            "{msg}"
        );
        assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
    } else {
        eprintln!("SKIPPED: the other-owner case needs root");
    }
    // Negative control: a fresh directory is made 0700 and the run goes ahead.
    let fresh = t.path().join("fresh-out");
    let s = run(&fresh).unwrap();
    assert_eq!(s.exit_status(), 0);
    assert_eq!(
        std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

#[test]
fn an_output_directory_under_a_directory_another_user_owns_is_refused() {
    // Attack: a local user pre-creates /tmp/hilrig (theirs, 0755), then root runs a
    // campaign with `--out /tmp/hilrig/nightly`: the runner made `nightly` itself
    // (0700, root's) and went ahead, but the parent's owner can rename it away
    // later and put a symlink in its place, so the runner's next write lands where
    // they chose.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root to make a directory another user owns");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let run = runner_in(t.path());
    let theirs = t.path().join("hilrig");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    for out in [theirs.join("nightly"), theirs.join("a/b/nightly")] {
        let msg = run(&out).unwrap_err();
        assert!(
            msg.contains(&format!("directory {}:", theirs.display()))
                && msg.contains("owned by uid 65534"),
            "{msg}"
        );
        assert_eq!(
            std::fs::read_dir(&theirs).unwrap().count(),
            0,
            "nothing made"
        );
    }
    // Also when the leaf exists already (made earlier, before they took the parent).
    let ours = t.path().join("ours");
    std::fs::create_dir(&ours).unwrap();
    let leaf = ours.join("nightly");
    std::fs::create_dir(&leaf).unwrap();
    std::os::unix::fs::chown(&ours, Some(65534), Some(65534)).unwrap();
    let msg = run(&leaf).unwrap_err();
    assert!(msg.contains("owned by uid 65534"), "{msg}");
    // Negative control: the same under a parent of our own runs.
    std::os::unix::fs::chown(&ours, Some(0), Some(0)).unwrap();
    assert_eq!(run(&leaf).unwrap().exit_status(), 0);
}
